//! How a store makes what it wrote durable: one `fsync` per file and per
//! directory ([`Durability::PerFile`]), or one `syncfs` of the whole file
//! system shared by every caller waiting at the same time
//! ([`Durability::Shared`], group commit through a [`SyncGate`]).
//!
//! `syncfs` writes back every dirty page and inode of the file system and
//! flushes the device cache, so it makes durable everything an `fsync` of
//! any file or directory on it would, for every caller whose writes
//! finished before it started. With many disks applying cycles at once
//! (256 continuous VMs to one receiver), each apply's syncs become a share
//! of a few `syncfs` calls. The cost: a `syncfs` also writes back whatever
//! else is dirty on that file system: other programs' buffered writes, and
//! above all the replicas' own applied blocks, scattered 4 KiB writes.
//!
//! A store therefore has two paths ([`StoreDurability`]):
//! - the **commit** path, what a recovery point waits for (a log stored in
//!   `incoming/`, the points journal, a definition saved with a point):
//!   small files written front to back. With `auto` each is an `fsync` of
//!   its own file: under the 256-VM load a stored log's `fdatasync` took
//!   15 ms (median) where waiting for a shared `syncfs` took 640 ms, the
//!   pass being busy writing back the replicas' applies (session 26,
//!   kernel-notes/replication-speed.md);
//! - the **apply** path (undo records, the replica, state files): its
//!   latency is no point's (a point is committed on durable logs), so it
//!   takes the shared `syncfs` under load.
//!
//! [`SyncMode::Auto`] (the default) uses the shared `syncfs` only on the
//! apply path and only for a caller that arrives while another caller of
//! the same store is syncing; a caller alone fsyncs its own file, so one
//! VM's cycle never waits for a file-system-wide flush. `fs` sends both
//! paths through the gate, `file` neither.
//!
//! Ordering is the caller's, as with fsync: data that must be durable
//! before a rename is synced (one gate pass), then renamed, then the
//! directory synced (a second pass).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// One file system's shared `syncfs`.
#[derive(Debug)]
pub struct SyncGate {
    dir: PathBuf,
    state: Mutex<GateState>,
    done: Condvar,
    /// Callers inside a sync of any kind now (`auto` decides on it).
    active: AtomicUsize,
}

#[derive(Debug, Default)]
struct GateState {
    /// Passes started so far (the running one included).
    started: u64,
    /// The newest pass that finished, and how.
    finished: u64,
    outcome: Option<(io::ErrorKind, String)>,
    running: bool,
    /// Passes that ran (for status and tests).
    passes: u64,
    /// Callers served (for status and tests).
    callers: u64,
}

impl SyncGate {
    /// A gate for the file system holding `dir`.
    pub fn new(dir: &Path) -> Self {
        SyncGate {
            dir: dir.to_path_buf(),
            state: Mutex::new(GateState::default()),
            done: Condvar::new(),
            active: AtomicUsize::new(0),
        }
    }

    /// Returns once a `syncfs` that started after this call finished
    /// (blocking: call it off async threads). A caller arriving while a
    /// pass runs waits for the next one, which the first such caller
    /// starts, so every caller's writes are covered. A failed pass fails
    /// every caller it was to cover.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_ran().0
    }

    /// [`sync`](Self::sync), and whether this caller ran the pass.
    fn sync_ran(&self) -> (io::Result<()>, bool) {
        let mut g = self.state.lock();
        g.callers += 1;
        let need = g.started + 1;
        loop {
            if g.finished >= need {
                let r = match &g.outcome {
                    None => Ok(()),
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                };
                return (r, false);
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
                g.passes += 1;
                g.outcome = r.as_ref().err().map(|e| (e.kind(), e.to_string()));
                self.done.notify_all();
                return (r, true);
            }
            self.done.wait(&mut g);
        }
    }

    /// The folder whose file system this gate flushes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `(syncfs passes, callers served)` so far.
    pub fn counts(&self) -> (u64, u64) {
        let g = self.state.lock();
        (g.passes, g.callers)
    }
}

fn syncfs(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)
}

/// Which [`Durability`] a store uses (`store_sync = "auto" | "fs" | "file"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// A caller alone fsyncs its own files; callers that meet another
    /// caller's sync share a `syncfs` (group commit only under load).
    #[default]
    Auto,
    /// Every sync is a share of a `syncfs`.
    Fs,
    /// An fsync per file and directory.
    File,
}

impl SyncMode {
    /// `auto`, `fs` or `file`.
    pub fn parse(s: &str) -> Option<SyncMode> {
        match s {
            "auto" => Some(SyncMode::Auto),
            "fs" => Some(SyncMode::Fs),
            "file" => Some(SyncMode::File),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Auto => "auto",
            SyncMode::Fs => "fs",
            SyncMode::File => "file",
        }
    }

    /// The durability of a store whose file system holds `dir`.
    pub fn durability(self, dir: &Path) -> StoreDurability {
        match self {
            SyncMode::File => StoreDurability::default(),
            SyncMode::Fs => {
                let shared = Durability::Shared {
                    gate: Arc::new(SyncGate::new(dir)),
                    auto: false,
                };
                StoreDurability {
                    commit: shared.clone(),
                    apply: shared,
                }
            }
            SyncMode::Auto => StoreDurability {
                commit: Durability::PerFile,
                apply: Durability::Shared {
                    gate: Arc::new(SyncGate::new(dir)),
                    auto: true,
                },
            },
        }
    }
}

/// A store's two durability paths (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct StoreDurability {
    /// What a recovery point waits for: a log stored in `incoming/`, the
    /// points journal, a definition or group saved with a point.
    pub commit: Durability,
    /// What only an apply waits for: undo records, the replica, the
    /// disk's state files.
    pub apply: Durability,
}

/// Syncs of this process's stores since it started ([`Durability::Shared`];
/// the mount's cut flush, which uses a [`SyncGate`] too, is not counted),
/// for the metrics: `syncfs` passes, callers a pass served, and fsyncs of
/// single files or directories (`auto` with no other caller).
static PASSES: AtomicU64 = AtomicU64::new(0);
static SHARED: AtomicU64 = AtomicU64::new(0);
static ALONE: AtomicU64 = AtomicU64::new(0);

/// `(syncfs passes, callers served by them, lone fsyncs)` of this process's
/// shared-sync stores.
pub fn counts() -> (u64, u64, u64) {
    (
        PASSES.load(Ordering::Relaxed),
        SHARED.load(Ordering::Relaxed),
        ALONE.load(Ordering::Relaxed),
    )
}

/// How writes are made durable (see the module documentation).
#[derive(Debug, Clone, Default)]
pub enum Durability {
    /// `fdatasync`/`fsync` of each file, `fsync` of each directory.
    #[default]
    PerFile,
    /// One shared `syncfs` of the file system per group of callers; with
    /// `auto`, a caller that meets no other caller's sync fsyncs alone.
    Shared { gate: Arc<SyncGate>, auto: bool },
}

impl Durability {
    fn run(&self, alone: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        match self {
            Durability::PerFile => alone(),
            Durability::Shared { gate, auto } => {
                let others = gate.active.fetch_add(1, Ordering::AcqRel);
                let r = if *auto && others == 0 {
                    ALONE.fetch_add(1, Ordering::Relaxed);
                    alone()
                } else {
                    let (r, ran) = gate.sync_ran();
                    SHARED.fetch_add(1, Ordering::Relaxed);
                    if ran {
                        PASSES.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                };
                gate.active.fetch_sub(1, Ordering::AcqRel);
                r
            }
        }
    }

    /// The data and size of `f` (what reading it back needs).
    pub fn sync_data(&self, f: &File) -> io::Result<()> {
        self.run(|| f.sync_data())
    }

    /// All of `f`, metadata included.
    pub fn sync_all(&self, f: &File) -> io::Result<()> {
        self.run(|| f.sync_all())
    }

    /// The entries of `dir` (a rename or create into it).
    pub fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run(|| File::open(dir)?.sync_all())
    }

    /// Several files at once, `(file, data only)`: one shared pass, or
    /// an fdatasync/fsync of each.
    pub fn sync_files(&self, files: &[(&File, bool)]) -> io::Result<()> {
        self.run(|| {
            for (f, data_only) in files {
                if *data_only {
                    f.sync_data()?;
                } else {
                    f.sync_all()?;
                }
            }
            Ok(())
        })
    }

    /// Several directories at once: one shared pass, or an fsync of each.
    pub fn sync_dirs(&self, dirs: &[&Path]) -> io::Result<()> {
        self.run(|| {
            for d in dirs {
                File::open(d)?.sync_all()?;
            }
            Ok(())
        })
    }

    /// The shared gate's `(passes, callers)`, `None` per file.
    #[cfg(test)]
    fn counts(&self) -> Option<(u64, u64)> {
        match self {
            Durability::PerFile => None,
            Durability::Shared { gate, .. } => Some(gate.counts()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn concurrent_callers_share_passes_and_each_is_covered() {
        let dir = std::env::temp_dir().join(format!("vdrep-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gate = Arc::new(SyncGate::new(&dir));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        g.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (passes, callers) = gate.counts();
        assert_eq!(callers, 320);
        assert!((1..=320).contains(&passes), "{passes} passes");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_caller_arriving_during_a_pass_waits_for_the_next() {
        // Hold the gate "running" by hand: the caller must not return on
        // the running pass's outcome, only on a pass started after it.
        let dir = std::env::temp_dir().join(format!("vdrep-gate2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gate = Arc::new(SyncGate::new(&dir));
        {
            let mut g = gate.state.lock();
            g.running = true;
            g.started = 1;
        }
        let returned = Arc::new(AtomicBool::new(false));
        let t = {
            let (g, r) = (gate.clone(), returned.clone());
            std::thread::spawn(move || {
                g.sync().unwrap();
                r.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The running pass (started before the caller) ends.
        {
            let mut g = gate.state.lock();
            g.running = false;
            g.finished = 1;
            gate.done.notify_all();
        }
        t.join().unwrap();
        assert!(returned.load(Ordering::SeqCst));
        // The caller could not return on pass 1: it started pass 2 itself.
        assert_eq!(gate.counts().0, 1, "the caller ran a pass of its own");
        assert_eq!(gate.state.lock().finished, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn auto_fsyncs_alone_and_shares_a_pass_when_another_caller_syncs() {
        let dir = std::env::temp_dir().join(format!("vdrep-gate3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let both = SyncMode::Auto.durability(&dir);
        // What a point waits for is never behind a file-system-wide flush.
        assert!(matches!(both.commit, Durability::PerFile), "{both:?}");
        let d = both.apply;
        let Durability::Shared { gate, auto: true } = &d else {
            panic!("auto's apply path is a shared gate: {d:?}");
        };
        let f = File::create(dir.join("f")).unwrap();
        // Alone: its own fsync, no pass of the gate.
        d.sync_data(&f).unwrap();
        d.sync_dir(&dir).unwrap();
        assert_eq!(gate.counts(), (0, 0));
        // Another caller is syncing: this one joins the gate.
        gate.active.fetch_add(1, Ordering::AcqRel);
        d.sync_all(&f).unwrap();
        assert_eq!(gate.counts(), (1, 1));
        gate.active.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(gate.active.load(Ordering::Acquire), 0);
        // fs: always the gate, one gate for both paths; file: never.
        let fs = SyncMode::Fs.durability(&dir);
        fs.commit.sync_data(&f).unwrap();
        fs.apply.sync_data(&f).unwrap();
        assert_eq!(fs.apply.counts(), Some((2, 2)));
        let file = SyncMode::File.durability(&dir);
        assert!(file.commit.counts().is_none() && file.apply.counts().is_none());
        for m in ["auto", "fs", "file"] {
            assert_eq!(SyncMode::parse(m).map(SyncMode::as_str), Some(m));
        }
        assert_eq!(SyncMode::parse("FS"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_pass_fails_its_callers() {
        let gate = SyncGate::new(Path::new("/nonexistent/vdrep-gate"));
        assert_eq!(gate.sync().unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(matches!(
            Durability::Shared {
                gate: Arc::new(gate),
                auto: false
            }
            .sync_dir(Path::new("/")),
            Err(e) if e.kind() == io::ErrorKind::NotFound
        ));
    }
}
