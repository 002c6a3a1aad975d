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
//!
//! The seal that follows is shared the same way ([`SealGate`]): the VMs
//! that ask for a cut while one is being sealed are sealed together by the
//! next one, at one instant and with one cycle number. Each seal stops
//! every write of the mount for an instant (the cut lock) and queues on
//! the mount's cut serialisation; with 256 continuous VMs one seal per VM
//! meant 256 of both per round.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex};

use crate::tracking::{CutSelect, Sealed, TrackError, Tracker};

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

/// One mount's shared seal (see the module documentation).
#[derive(Default)]
pub struct SealGate {
    state: Mutex<SealState>,
    done: Condvar,
}

#[derive(Default)]
struct SealState {
    next_id: u64,
    /// Requests for the next seal: id, disks.
    waiting: Vec<(u64, Vec<String>)>,
    running: bool,
    /// What each request of a finished seal gets (taken by its caller).
    results: HashMap<u64, Result<Sealed, (io::ErrorKind, String)>>,
    /// Seals run and requests served (for the tests and the log).
    seals: u64,
    served: u64,
}

impl SealGate {
    /// Seal `disks` of `tracker` at one instant, together with the disks of
    /// every other caller waiting for the same seal (blocking; run it off
    /// the async threads). The result holds only `disks`' cycles and
    /// skipped entries; its cycle number may be shared with other VMs'.
    /// `VDREP_CUT_BATCH=0`: a seal per caller (to measure).
    pub fn seal(&self, tracker: &Tracker, disks: &[String]) -> Result<Sealed, TrackError> {
        if std::env::var("VDREP_CUT_BATCH").is_ok_and(|v| v == "0") {
            return tracker.seal(&select(disks.to_vec()));
        }
        let mut g = self.state.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.waiting.push((id, disks.to_vec()));
        loop {
            if let Some(r) = g.results.remove(&id) {
                return r.map_err(|(kind, msg)| TrackError::Io {
                    what: "sealing the cut".into(),
                    source: io::Error::new(kind, msg),
                    note: String::new(),
                });
            }
            if !g.running {
                g.running = true;
                let batch = std::mem::take(&mut g.waiting);
                drop(g);
                let all: Vec<String> = batch.iter().flat_map(|(_, d)| d.clone()).collect();
                let r = tracker.seal(&select(all));
                let mut parts = split(r, &batch);
                let mine = parts.remove(&id);
                let mut g = self.state.lock();
                g.running = false;
                g.seals += 1;
                g.served += batch.len() as u64;
                g.results.extend(parts);
                self.done.notify_all();
                drop(g);
                return match mine {
                    Some(Ok(s)) => Ok(s),
                    Some(Err((kind, msg))) => Err(TrackError::Io {
                        what: "sealing the cut".into(),
                        source: io::Error::new(kind, msg),
                        note: String::new(),
                    }),
                    // Not reached: the leader's request is in its batch.
                    None => Err(TrackError::Refused("the cut was not sealed".into())),
                };
            }
            self.done.wait(&mut g);
        }
    }
}

fn select(disks: Vec<String>) -> CutSelect {
    CutSelect {
        disks: Some(disks),
        ..Default::default()
    }
}

/// One seal's outcome, by request: each gets its own disks' part (the
/// same error for all if the seal failed).
fn split(
    r: Result<Sealed, TrackError>,
    batch: &[(u64, Vec<String>)],
) -> HashMap<u64, Result<Sealed, (io::ErrorKind, String)>> {
    let mut sealed = match r {
        Ok(s) => s,
        Err(e) => {
            let kind = match &e {
                TrackError::State { source, .. } | TrackError::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::Other,
            };
            let msg = e.to_string();
            return batch
                .iter()
                .map(|(id, _)| (*id, Err((kind, msg.clone()))))
                .collect();
        }
    };
    let mut out = HashMap::new();
    for (id, disks) in batch {
        let mine = |d: &str| disks.iter().any(|x| x == d);
        let (cycles, rest) = std::mem::take(&mut sealed.cycles)
            .into_iter()
            .partition(|c| mine(&c.header.disk_name));
        sealed.cycles = rest;
        let (skipped, rest) = std::mem::take(&mut sealed.skipped)
            .into_iter()
            .partition(|e| mine(&e.disk));
        sealed.skipped = rest;
        out.insert(
            *id,
            Ok(Sealed {
                cycle: sealed.cycle,
                cut_unix_ns: sealed.cut_unix_ns,
                cycles,
                skipped,
            }),
        );
    }
    out
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
    fn vms_that_wait_for_a_seal_are_sealed_together_each_with_its_own_disks() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir.path())
            .unwrap();
        let tracker = Arc::new(
            Tracker::open(
                root.into(),
                dir.path(),
                crate::tracking::TrackConfig::default(),
            )
            .unwrap(),
        );
        let names: Vec<String> = (0..3).map(|i| format!("vm{i}.img")).collect();
        let mut files = Vec::new();
        for n in &names {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(n))
                .unwrap();
            f.set_len(1 << 20).unwrap();
            tracker.attach(Path::new(n), &f).unwrap().unwrap();
            files.push(f);
        }
        // A seal is running: the three VMs that ask now wait for the next.
        let gate = Arc::new(SealGate::default());
        gate.state.lock().running = true;
        let threads: Vec<_> = names
            .iter()
            .map(|n| {
                let (g, t, n) = (gate.clone(), tracker.clone(), n.clone());
                std::thread::spawn(move || (n.clone(), g.seal(&t, &[n]).unwrap()))
            })
            .collect();
        while gate.state.lock().waiting.len() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        {
            let mut g = gate.state.lock();
            g.running = false;
            gate.done.notify_all();
        }
        let mut cycles = Vec::new();
        for t in threads {
            let (name, sealed) = t.join().unwrap();
            let disks: Vec<&str> = sealed
                .cycles
                .iter()
                .map(|c| c.header.disk_name.as_str())
                .collect();
            assert_eq!(disks, [name.as_str()], "each VM gets its own disk only");
            assert!(sealed.skipped.is_empty());
            cycles.push(sealed.cycle);
            for sc in sealed.cycles {
                tracker.finish(sc, true).unwrap();
            }
        }
        // One seal, one instant and cycle number, for the three.
        let g = gate.state.lock();
        assert_eq!((g.seals, g.served), (1, 3));
        assert!(cycles.windows(2).all(|w| w[0] == w[1]), "{cycles:?}");
        assert!(g.results.is_empty() && g.waiting.is_empty() && !g.running);
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
