//! Open file and directory handles.
//!
//! File handles live in a sharded map (handle id → `Arc<OpenFile>`) so the
//! read/write path never takes a global lock. Each handle owns the backing
//! descriptor (possibly `O_DIRECT`), an optional lazily opened buffered twin
//! for unaligned direct requests, and the tracked disk, if any.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use super::journal::Journal;
use crate::sys;
use crate::tracking::TrackedDisk;

/// One open regular file (or other node opened through `open`).
pub(crate) struct OpenFile {
    /// FUSE inode number.
    pub(crate) ino: u64,
    /// The backing descriptor, with the caller's `O_DIRECT`/`O_SYNC` flags.
    pub(crate) file: File,
    /// Flags `file` was opened with.
    pub(crate) flags: i32,
    /// `file` is `O_DIRECT`.
    pub(crate) direct: bool,
    /// The same file without `O_DIRECT`, for unaligned requests.
    buffered: OnceLock<File>,
    /// Tracked disk behind this file, if it is one.
    pub(crate) disk: Option<Arc<TrackedDisk>>,
}

impl OpenFile {
    pub(crate) fn new(ino: u64, file: File, flags: i32, disk: Option<Arc<TrackedDisk>>) -> Self {
        OpenFile {
            ino,
            file,
            flags,
            direct: flags & libc::O_DIRECT != 0,
            buffered: OnceLock::new(),
            disk,
        }
    }

    /// The non-`O_DIRECT` twin of `file` (or `file` itself if not direct).
    pub(crate) fn buffered(&self) -> io::Result<&File> {
        if !self.direct {
            return Ok(&self.file);
        }
        if let Some(f) = self.buffered.get() {
            return Ok(f);
        }
        let f = sys::reopen(self.file.as_raw_fd(), self.flags & !libc::O_DIRECT)?;
        let _ = self.buffered.set(f);
        self.buffered
            .get()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }
}

/// One directory entry in a snapshot.
pub(crate) struct DirEnt {
    pub(crate) name: Vec<u8>,
    pub(crate) dtype: u8,
    pub(crate) ino: u64,
}

/// One open directory: a snapshot of its entries, refreshed on offset 0.
pub(crate) struct OpenDir {
    pub(crate) ino: u64,
    pub(crate) entries: Mutex<Option<Arc<Vec<DirEnt>>>>,
}

const SHARDS: usize = 16;

/// Handle id → handle, for files (sharded) and directories.
pub(crate) struct Handles {
    next: AtomicU64,
    files: [RwLock<HashMap<u64, Arc<OpenFile>>>; SHARDS],
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    /// Where every open and release is recorded for a successor worker.
    journal: Option<Arc<Journal>>,
}

impl Handles {
    pub(crate) fn new() -> Self {
        Handles {
            next: AtomicU64::new(1),
            files: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            journal: None,
        }
    }

    /// Record every open and release in `journal` from now on.
    pub(crate) fn set_journal(&mut self, journal: Arc<Journal>) {
        self.journal = Some(journal);
    }

    /// Put back file handle `fh` of a previous worker (not recorded).
    pub(crate) fn restore_file(&self, fh: u64, f: OpenFile) {
        self.next.fetch_max(fh + 1, Ordering::Relaxed);
        self.shard(fh).write().insert(fh, Arc::new(f));
    }

    /// Put back directory handle `fh` of a previous worker (not recorded).
    pub(crate) fn restore_dir(&self, fh: u64, d: OpenDir) {
        self.next.fetch_max(fh + 1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(d));
    }

    fn shard(&self, fh: u64) -> &RwLock<HashMap<u64, Arc<OpenFile>>> {
        &self.files[(fh as usize) % SHARDS]
    }

    pub(crate) fn add_file(&self, f: OpenFile) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            j.open(fh, f.ino, f.flags);
        }
        self.shard(fh).write().insert(fh, Arc::new(f));
        fh
    }

    pub(crate) fn file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.shard(fh).read().get(&fh).cloned()
    }

    pub(crate) fn remove_file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        let f = self.shard(fh).write().remove(&fh);
        if let (Some(j), Some(_)) = (&self.journal, &f) {
            j.release(fh);
        }
        f
    }

    pub(crate) fn add_dir(&self, d: OpenDir) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            j.opendir(fh, d.ino);
        }
        self.dirs.lock().insert(fh, Arc::new(d));
        fh
    }

    pub(crate) fn dir(&self, fh: u64) -> Option<Arc<OpenDir>> {
        self.dirs.lock().get(&fh).cloned()
    }

    pub(crate) fn remove_dir(&self, fh: u64) -> Option<Arc<OpenDir>> {
        let d = self.dirs.lock().remove(&fh);
        if let (Some(j), Some(_)) = (&self.journal, &d) {
            j.releasedir(fh);
        }
        d
    }

    /// Number of open file handles; for tests.
    pub(crate) fn open_files(&self) -> usize {
        self.files.iter().map(|s| s.read().len()).sum()
    }
}
