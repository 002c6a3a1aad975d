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
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex};

use crate::tracking::TrackError;

/// One mount's shared flush.
pub struct FlushGate {
    dir: PathBuf,
    state: Mutex<GateState>,
    done: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Flushes started so far (the running one included).
    started: u64,
    /// The newest flush that finished, and how.
    finished: u64,
    outcome: Option<(io::ErrorKind, String)>,
    running: bool,
}

impl FlushGate {
    pub fn new(dir: &Path) -> Self {
        FlushGate {
            dir: dir.to_path_buf(),
            state: Mutex::new(GateState::default()),
            done: Condvar::new(),
        }
    }

    /// Flush the mount's cached writes: returns once a `syncfs` that
    /// started after this call finished (blocking; run it off the async
    /// threads).
    pub fn flush(&self) -> Result<(), TrackError> {
        let mut g = self.state.lock();
        // A flush already running may have missed our writes.
        let need = g.started + 1;
        loop {
            if g.finished >= need {
                let outcome = g.outcome.clone();
                return outcome.map_or(Ok(()), |(kind, msg)| {
                    Err(self.error(io::Error::new(kind, msg)))
                });
            }
            if !g.running {
                g.running = true;
                g.started += 1;
                let gen = g.started;
                drop(g);
                let r = syncfs(&self.dir);
                let mut g = self.state.lock();
                g.running = false;
                g.finished = gen;
                g.outcome = r.as_ref().err().map(|e| (e.kind(), e.to_string()));
                self.done.notify_all();
                return r.map_err(|e| self.error(e));
            }
            self.done.wait(&mut g);
        }
    }

    fn error(&self, source: io::Error) -> TrackError {
        TrackError::Io {
            what: format!(
                "flushing the cached writes of {} before the cut",
                self.dir.display()
            ),
            source,
            note:
                " (a write-back error; the cut is retried; check the disks' file system and kernel log)"
                    .into(),
        }
    }
}

fn syncfs(dir: &Path) -> io::Result<()> {
    let d = std::fs::File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)
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
        let s = gate.state.lock();
        assert!(!s.running);
        assert_eq!(s.started, s.finished);
        // Each of the 320 calls was covered by a flush, and no flush ran
        // for nothing: at most one per call.
        assert!(s.started >= 20 && s.started <= 320, "{}", s.started);
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
        assert_eq!(gate.state.lock().started, 2);
    }
}
