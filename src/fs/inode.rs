//! Inode table: one `O_PATH | O_NOFOLLOW` descriptor per FUSE inode, keyed by
//! the backing `(st_dev, st_ino)` so hard links share one inode, with kernel
//! lookup counts. FUSE inode numbers are never reused within a mount, so the
//! generation number is constant.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::journal::{FileHandle, Journal};

/// FUSE inode number of the root.
pub(crate) const ROOT_INO: u64 = 1;

/// One inode the kernel knows about.
#[derive(Debug)]
pub(crate) struct Inode {
    /// FUSE inode number.
    pub(crate) ino: u64,
    /// `O_PATH | O_NOFOLLOW` descriptor of the backing object.
    pub(crate) fd: OwnedFd,
    /// Backing `(st_dev, st_ino)`.
    pub(crate) key: (u64, u64),
    /// `st_mode & S_IFMT` at lookup time (the type never changes).
    pub(crate) fmt: u32,
}

impl Inode {
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    pub(crate) fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }
}

struct Entry {
    inode: Arc<Inode>,
    nlookup: u64,
}

#[derive(Default)]
struct Maps {
    by_ino: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
}

/// All inodes currently referenced by the kernel (plus the root).
pub(crate) struct InodeTable {
    maps: RwLock<Maps>,
    next: AtomicU64,
    /// Where every change is recorded for a successor worker, if any.
    journal: Option<Arc<Journal>>,
}

impl InodeTable {
    /// A table holding only the root, backed by `root_fd`.
    pub(crate) fn new(root_fd: OwnedFd, st: &libc::stat) -> Self {
        let key = (st.st_dev, st.st_ino);
        let mut maps = Maps::default();
        maps.by_ino.insert(
            ROOT_INO,
            Entry {
                inode: Arc::new(Inode {
                    ino: ROOT_INO,
                    fd: root_fd,
                    key,
                    fmt: st.st_mode & libc::S_IFMT,
                }),
                // The root is never forgotten.
                nlookup: u64::MAX / 2,
            },
        );
        maps.by_key.insert(key, ROOT_INO);
        InodeTable {
            maps: RwLock::new(maps),
            next: AtomicU64::new(ROOT_INO + 1),
            journal: None,
        }
    }

    /// Record every change in `journal` from now on.
    pub(crate) fn set_journal(&mut self, journal: Arc<Journal>) {
        self.journal = Some(journal);
    }

    /// Put back an inode a previous worker handed out (`ino`, `nlookup`
    /// kernel references), behind `fd`. Not recorded: the journal has it.
    pub(crate) fn restore(&self, ino: u64, fd: OwnedFd, st: &libc::stat, nlookup: u64) {
        let key = (st.st_dev, st.st_ino);
        let mut maps = self.maps.write();
        maps.by_ino.insert(
            ino,
            Entry {
                inode: Arc::new(Inode {
                    ino,
                    fd,
                    key,
                    fmt: st.st_mode & libc::S_IFMT,
                }),
                nlookup,
            },
        );
        maps.by_key.entry(key).or_insert(ino);
        self.next.fetch_max(ino + 1, Ordering::Relaxed);
    }

    /// The inode `ino`, if the kernel still references it.
    pub(crate) fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.maps.read().by_ino.get(&ino).map(|e| e.inode.clone())
    }

    /// The FUSE inode number already assigned to a backing object, if any.
    pub(crate) fn ino_of(&self, key: (u64, u64)) -> Option<u64> {
        self.maps.read().by_key.get(&key).copied()
    }

    /// Record one kernel lookup of the object behind `fd` (stat `st`). If it
    /// is already known (e.g. another hard link), `fd` is dropped and the
    /// existing inode is returned.
    pub(crate) fn insert_lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut maps = self.maps.write();
        if let Some(&ino) = maps.by_key.get(&key) {
            if let Some(e) = maps.by_ino.get_mut(&ino) {
                e.nlookup += 1;
                if let Some(j) = &self.journal {
                    j.node_ref(ino, 1);
                }
                return e.inode.clone();
            }
        }
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            match FileHandle::of(fd.as_raw_fd()) {
                Ok(h) => j.node(ino, &h),
                Err(e) => tracing::warn!(
                    "inode {ino} has no file handle ({e}): a worker restart will answer ESTALE for it"
                ),
            }
        }
        let inode = Arc::new(Inode {
            ino,
            fd,
            key,
            fmt: st.st_mode & libc::S_IFMT,
        });
        maps.by_ino.insert(
            ino,
            Entry {
                inode: inode.clone(),
                nlookup: 1,
            },
        );
        maps.by_key.insert(key, ino);
        inode
    }

    /// Drop `n` kernel references; the descriptor is closed at zero (once no
    /// request still holds the `Arc`).
    pub(crate) fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut maps = self.maps.write();
        self.forget_locked(&mut maps, ino, n);
    }

    fn forget_locked(&self, maps: &mut Maps, ino: u64, n: u64) {
        let remove = match maps.by_ino.get_mut(&ino) {
            Some(e) => {
                if let Some(j) = &self.journal {
                    j.forget(ino, n);
                }
                e.nlookup = e.nlookup.saturating_sub(n);
                e.nlookup == 0
            }
            None => false,
        };
        if remove {
            if let Some(e) = maps.by_ino.remove(&ino) {
                if maps.by_key.get(&e.inode.key) == Some(&ino) {
                    maps.by_key.remove(&e.inode.key);
                }
            }
        }
    }

    /// Number of inodes currently held (root included); for tests.
    pub(crate) fn len(&self) -> usize {
        self.maps.read().by_ino.len()
    }
}
