//! The flush of the mount before a cut, shared by the VMs that cut at the
//! same time (group commit).
//!
//! Every cut first pushes the kernel's cached writes of the mount down to
//! the daemon (`syncfs`), so that every write(2) that returned before the
//! cut is in it. `syncfs` covers the whole mount, so one call serves every
//! VM whose cut waits for it, provided it *started* after that VM asked:
//! a caller that arrives while a flush runs waits for the next one, which
//! the first of the waiters starts. With 256 continuous VMs on one mount
//! this replaces 256 serialised `syncfs` calls per round by a few.
//!
//! A failed flush (a write-back error the kernel reports once) fails every
//! cut it was to cover; each retries.

use std::io;
use std::path::Path;

use crate::tracking::TrackError;
use crate::util::durable::SyncGate;

/// One mount's shared flush.
pub struct FlushGate {
    gate: SyncGate,
}

impl FlushGate {
    pub fn new(dir: &Path) -> Self {
        FlushGate {
            gate: SyncGate::new(dir),
        }
    }

    /// Flush the mount's cached writes: returns once a `syncfs` that
    /// started after this call finished (blocking; run it off the async
    /// threads).
    pub fn flush(&self) -> Result<(), TrackError> {
        self.gate.sync().map_err(|e| self.error(e))
    }

    fn error(&self, source: io::Error) -> TrackError {
        TrackError::Io {
            what: format!(
                "flushing the cached writes of {} before the cut",
                self.gate.dir().display()
            ),
            source,
            note:
                " (a write-back error; the cut is retried; check the disks' file system and kernel log)"
                    .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_flushes_that_started_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(FlushGate::new(dir.path()));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        g.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Each of the 320 calls was covered by a flush, and no flush ran
        // for nothing: at most one per call.
        let (passes, callers) = gate.gate.counts();
        assert_eq!(callers, 320);
        assert!((20..=320).contains(&passes), "{passes}");
    }

    #[test]
    fn a_failed_flush_fails_the_cut_with_the_reason() {
        let gate = FlushGate::new(Path::new("/nonexistent/vdrep-flush-test"));
        let e = gate.flush().unwrap_err();
        assert!(
            matches!(&e, TrackError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
        // The next call tries again (a flush of its own).
        assert!(gate.flush().is_err());
        assert_eq!(gate.gate.counts().0, 2);
    }
}
