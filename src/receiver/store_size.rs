//! The bytes the store folder takes on disk, for the receiver's metrics
//! (`vdrep_receiver_store_bytes`): [`StoreSize`] owns a thread that walks
//! the store in the background and keeps the last result, which a scrape
//! reports with the time it was measured.
//!
//! The walk is one `lstat` per file, and the history is one undo record
//! per cycle per disk: a continuous VM keeps 7,200–14,400 of them per
//! disk, so 256 VMs are ~3.7 M files. Walked at every scrape, that alone
//! takes longer than Prometheus' 10 s scrape timeout
//! (`kernel-notes/replication-speed.md`, session 34). The thread walks
//! again [`WALK_EVERY`] after the last walk, or 10 times the last walk's
//! length if that is longer (at most a tenth of its time walking).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

/// The shortest time between two walks.
pub const WALK_EVERY: Duration = Duration::from_secs(60);

/// Shortens [`WALK_EVERY`] (milliseconds), for tests that must see the
/// store measured again soon.
pub const WALK_EVERY_ENV: &str = "VDREP_TEST_STORE_WALK_MIN_MS";

/// One walk's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    /// Bytes allocated ([`allocated_bytes`]).
    pub bytes: u64,
    /// When the walk began (it counted what was there by then, and what
    /// changed during it).
    pub at: SystemTime,
    /// How long the walk took.
    pub took: Duration,
}

struct Shared {
    last: Mutex<Option<Measured>>,
    stopping: AtomicBool,
}

/// The background walk of a store folder; dropping it stops the thread
/// (a walk under way gives up at its next folder) and waits for it.
pub struct StoreSize {
    shared: Arc<Shared>,
    /// Dropped to wake the thread from its wait between walks.
    wake: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StoreSize {
    /// Start walking `dir` now, then again `every` (or 10 times the last
    /// walk's length, if longer) after each walk ends.
    pub fn start(dir: PathBuf, every: Duration) -> std::io::Result<StoreSize> {
        let shared = Arc::new(Shared {
            last: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        let (wake, asleep) = mpsc::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vdrep-store-size".into())
            .spawn(move || {
                // A walk of millions of files must not take CPU or disk
                // from replication and the VMs on a busy host.
                if let Err(e) = crate::sys::background_priority() {
                    tracing::debug!("the store walk keeps its priority: {e}");
                }
                walk_loop(&dir, &sh, &asleep, every)
            })?;
        Ok(StoreSize {
            shared,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// The last walk's result (`None` until the first one ends).
    pub fn last(&self) -> Option<Measured> {
        *self.shared.last.lock()
    }
}

/// The thread's body: walk, keep the result, wait, until stopped.
fn walk_loop(dir: &Path, sh: &Shared, asleep: &mpsc::Receiver<()>, every: Duration) {
    loop {
        let at = SystemTime::now();
        let t = Instant::now();
        let stop = || sh.stopping.load(Ordering::Relaxed);
        let Some(bytes) = walk(dir, &stop) else {
            return;
        };
        let took = t.elapsed();
        *sh.last.lock() = Some(Measured { bytes, at, took });
        match asleep.recv_timeout(every.max(took.saturating_mul(10))) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Dropped: stop.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Drop for StoreSize {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes allocated to the files under `dir` on its file system (sparse
/// replicas count what they use, not their size); unreadable entries and
/// other mounts are skipped.
pub fn allocated_bytes(dir: &Path) -> u64 {
    walk(dir, &|| false).unwrap_or(0)
}

/// [`allocated_bytes`], or `None` if `stop` said so before a folder.
fn walk(dir: &Path, stop: &dyn Fn() -> bool) -> Option<u64> {
    let Ok(root) = dir.metadata() else {
        return Some(0);
    };
    let mut total = 0;
    let mut todo: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if stop() {
            return None;
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.dev() != root.dev() {
                // A mount under the store (a test failover's view): not
                // the store's bytes.
                continue;
            }
            if md.is_dir() {
                todo.push(e.path());
            } else {
                total += md.blocks() * 512;
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, mut f: impl FnMut() -> Option<Measured>) -> Measured {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(m) = f() {
                return m;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The thread measures what [`allocated_bytes`] says, measures again
    /// after a change (a later walk, seen by its time), and ends when the
    /// [`StoreSize`] is dropped.
    #[test]
    fn the_walk_is_repeated_and_stops_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 8192]).unwrap();
        let size = StoreSize::start(dir.path().to_path_buf(), Duration::from_millis(20)).unwrap();
        let first = wait_for("a first walk", || size.last());
        assert_eq!(first.bytes, allocated_bytes(dir.path()));
        assert!(first.bytes >= 8192, "{first:?}");
        std::fs::write(dir.path().join("sub/b"), vec![2u8; 64 << 10]).unwrap();
        let later = wait_for("a walk after the change", || {
            size.last()
                .filter(|m| m.at > first.at && m.bytes != first.bytes)
        });
        assert_eq!(later.bytes, allocated_bytes(dir.path()));
        assert!(later.bytes >= first.bytes + (64 << 10), "{later:?}");
        let shared = Arc::downgrade(&size.shared);
        drop(size);
        // Joined: the thread's reference is gone with it.
        assert!(shared.upgrade().is_none());
    }

    /// (nice, I/O class) of every walk thread of this process, by name
    /// (the kernel keeps 15 bytes of it).
    fn walk_threads() -> Vec<(i64, u32)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != "vdrep-store-siz" {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue; // ended meanwhile
            };
            let after = stat.rsplit_once(')').unwrap().1;
            let nice: i64 = after.split_whitespace().nth(16).unwrap().parse().unwrap();
            let tid: libc::pid_t = e.file_name().to_str().unwrap().parse().unwrap();
            let Ok(class) = crate::sys::io_class(tid) else {
                continue;
            };
            out.push((nice, class));
        }
        out
    }

    /// The walk runs at the lowest CPU priority and in the idle I/O class
    /// (other tests' walk threads, if any, settle at spawn as well).
    #[test]
    fn the_walk_gives_way_to_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let size = StoreSize::start(dir.path().to_path_buf(), Duration::from_secs(3600)).unwrap();
        wait_for("a first walk", || size.last());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let threads = walk_threads();
            let background = (19, crate::sys::IOPRIO_CLASS_IDLE);
            if !threads.is_empty() && threads.iter().all(|t| *t == background) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "walk threads (nice, I/O class): {threads:?}, want all {background:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(size);
    }

    /// A sparse file counts the blocks it uses, not its length.
    #[test]
    fn a_sparse_file_counts_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        assert!(allocated_bytes(dir.path()) < 1 << 20);
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
    }
}
