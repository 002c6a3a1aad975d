//! The node journal: what the kernel was told about inodes and open handles,
//! kept in a memory file that outlives the worker process.
//!
//! After a worker crash or a handover the kernel still holds the FUSE inode
//! numbers (`nodeid`) and handle ids (`fh`) the old worker gave it, and
//! re-sent requests use them. The journal records, before each answer that
//! hands one out or takes one back, enough to rebuild both tables in the
//! next worker: per inode its backing file handle (`name_to_handle_at`,
//! reopened with `open_by_handle_at`) and lookup count, per open file its
//! inode and open flags, per open directory its inode.
//!
//! Layout of the memfd (held by the supervisor, [`crate::fuse`]): a 4 KiB
//! header (`magic`, index of the active region), then two regions of
//! [`REGION`] bytes. Records are appended to the active region; each is
//! `u32 len, u32 kind, body` and becomes visible when `len` is stored
//! (release), so a worker killed mid-append leaves a record that is simply
//! not there, and that record's answer was never sent. When the active
//! region is half full, a snapshot (at most a quarter of a region) of the current tables is written into
//! the other region (hole-punched to zero first) and the header switches to
//! it with one store. A record is only written under the journal's lock, so
//! records are in the order the tables changed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::sys;

/// Size of the memfd to create for a journal.
pub const JOURNAL_BYTES: u64 = HEADER + 2 * REGION;
const HEADER: u64 = 4096;
const REGION: u64 = 64 << 20;
const MAGIC: u64 = u64::from_le_bytes(*b"VDNJRNL1");
/// `MAX_HANDLE_SZ` of the kernel.
const MAX_HANDLE: usize = 128;

const K_NODE: u32 = 1;
const K_REF: u32 = 2;
const K_FORGET: u32 = 3;
const K_OPEN: u32 = 4;
const K_RELEASE: u32 = 5;
const K_OPENDIR: u32 = 6;
const K_RELEASEDIR: u32 = 7;

/// A backing object's file handle (`struct file_handle`'s type and bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileHandle {
    pub(crate) kind: i32,
    pub(crate) bytes: Vec<u8>,
}

impl FileHandle {
    /// The handle of the object behind `fd` (any descriptor, `O_PATH` too).
    pub(crate) fn of(fd: RawFd) -> io::Result<FileHandle> {
        let mut buf = HandleBuf::new(MAX_HANDLE as u32, 0);
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `buf` holds a `struct file_handle` header followed by
        // MAX_HANDLE bytes, as `handle_bytes` says.
        sys::cvt(unsafe {
            libc::name_to_handle_at(
                fd,
                c"".as_ptr(),
                buf.as_mut_ptr(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        })?;
        Ok(buf.handle())
    }

    /// Open the object (`flags`, e.g. `O_PATH`) on the file system of
    /// `mount_fd`. Needs `CAP_DAC_READ_SEARCH`.
    pub(crate) fn open(&self, mount_fd: RawFd, flags: i32) -> io::Result<OwnedFd> {
        if self.bytes.len() > MAX_HANDLE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut buf = HandleBuf::new(self.bytes.len() as u32, self.kind);
        buf.0[8..8 + self.bytes.len()].copy_from_slice(&self.bytes);
        // SAFETY: `buf` is a valid `struct file_handle` of `handle_bytes`.
        let fd = sys::cvt(unsafe {
            libc::open_by_handle_at(mount_fd, buf.as_mut_ptr(), flags | libc::O_CLOEXEC)
        })?;
        // SAFETY: a new descriptor we own.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}

/// A `struct file_handle` with room for the largest handle, 4-byte aligned.
struct HandleBuf([u8; 8 + MAX_HANDLE]);

impl HandleBuf {
    fn new(len: u32, kind: i32) -> Self {
        let mut b = [0u8; 8 + MAX_HANDLE];
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[4..8].copy_from_slice(&kind.to_ne_bytes());
        HandleBuf(b)
    }
    fn as_mut_ptr(&mut self) -> *mut libc::file_handle {
        self.0.as_mut_ptr().cast()
    }
    fn handle(&self) -> FileHandle {
        let len = (u32::from_ne_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]) as usize)
            .min(MAX_HANDLE);
        FileHandle {
            kind: i32::from_ne_bytes([self.0[4], self.0[5], self.0[6], self.0[7]]),
            bytes: self.0[8..8 + len].to_vec(),
        }
    }
}

/// One inode as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRec {
    pub(crate) handle: FileHandle,
    pub(crate) nlookup: u64,
}

/// The tables the journal describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tables {
    pub(crate) nodes: HashMap<u64, NodeRec>,
    /// fh → (inode, open flags of the backing descriptor).
    pub(crate) files: HashMap<u64, (u64, i32)>,
    /// fh → inode.
    pub(crate) dirs: HashMap<u64, u64>,
}

impl Tables {
    fn apply(&mut self, kind: u32, b: &[u8]) -> Option<()> {
        let u = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        match kind {
            K_NODE => {
                let hk = i32::from_le_bytes(b.get(16..20)?.try_into().ok()?);
                let hl = u32::from_le_bytes(b.get(20..24)?.try_into().ok()?) as usize;
                let bytes = b.get(24..24 + hl)?.to_vec();
                self.nodes.insert(
                    u(0)?,
                    NodeRec {
                        handle: FileHandle { kind: hk, bytes },
                        nlookup: u(8)?,
                    },
                );
            }
            K_REF => {
                if let Some(n) = self.nodes.get_mut(&u(0)?) {
                    n.nlookup = n.nlookup.saturating_add(u(8)?);
                }
            }
            K_FORGET => {
                let ino = u(0)?;
                if let Some(n) = self.nodes.get_mut(&ino) {
                    n.nlookup = n.nlookup.saturating_sub(u(8)?);
                    if n.nlookup == 0 {
                        self.nodes.remove(&ino);
                    }
                }
            }
            K_OPEN => {
                let flags = i32::from_le_bytes(b.get(16..20)?.try_into().ok()?);
                self.files.insert(u(0)?, (u(8)?, flags));
            }
            K_RELEASE => {
                self.files.remove(&u(0)?);
            }
            K_OPENDIR => {
                self.dirs.insert(u(0)?, u(8)?);
            }
            K_RELEASEDIR => {
                self.dirs.remove(&u(0)?);
            }
            _ => return None,
        }
        Some(())
    }
}

/// Encoders of the record bodies.
fn node_body(ino: u64, nlookup: u64, h: &FileHandle) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + h.bytes.len());
    b.extend_from_slice(&ino.to_le_bytes());
    b.extend_from_slice(&nlookup.to_le_bytes());
    b.extend_from_slice(&h.kind.to_le_bytes());
    b.extend_from_slice(&(h.bytes.len() as u32).to_le_bytes());
    b.extend_from_slice(&h.bytes);
    b
}

fn pair_body(a: u64, c: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&a.to_le_bytes());
    b.extend_from_slice(&c.to_le_bytes());
    b
}

struct Inner {
    tables: Tables,
    active: u64,
    used: u64,
    /// Appends failed (a snapshot did not fit): a successor cannot trust
    /// the journal.
    broken: bool,
}

/// The journal of one mount (shared by the inode and handle tables).
pub(crate) struct Journal {
    fd: OwnedFd,
    map: memmap2::MmapRaw,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

/// Why a journal could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the node journal cannot be mapped: {0}")]
    Map(#[source] io::Error),
    #[error("the node journal is not one (bad magic)")]
    Magic,
}

impl Journal {
    /// Map the memfd `fd` ([`JOURNAL_BYTES`] long). A fresh (all-zero) one
    /// is initialised; an existing one is read back into [`Tables`] (`map`).
    pub(crate) fn map(fd: OwnedFd) -> Result<(Journal, Tables), JournalError> {
        let map = memmap2::MmapOptions::new()
            .len(JOURNAL_BYTES as usize)
            .map_raw(&fd)
            .map_err(JournalError::Map)?;
        let j = Journal {
            fd,
            map,
            inner: Mutex::new(Inner {
                tables: Tables::default(),
                active: 0,
                used: 0,
                broken: false,
            }),
        };
        let magic = j.word(0).load(Ordering::Acquire);
        let tables = if magic == 0 {
            j.word(0).store(MAGIC, Ordering::Release);
            Tables::default()
        } else if magic != MAGIC {
            return Err(JournalError::Magic);
        } else {
            let active = j.word(8).load(Ordering::Acquire);
            if active > 1 {
                // Serving with nothing restored beats not serving: requests
                // on the old inodes and handles get ESTALE/EBADF.
                tracing::error!(
                    "the previous worker's node journal was incomplete: files open on the mount will fail (ESTALE/EBADF) until reopened"
                );
                j.word(8).store(0, Ordering::Release);
                Tables::default()
            } else {
                j.scan(active).0
            }
        };
        {
            let mut g = j.inner.lock();
            g.tables = tables.clone();
            g.active = j.word(8).load(Ordering::Acquire);
            g.used = j.scan(g.active).1;
            // Start the new worker from a compact snapshot.
            j.compact(&mut g);
            if g.broken {
                j.mark_broken(&mut g);
            }
        }
        Ok((j, tables))
    }

    fn word(&self, off: u64) -> &AtomicU64 {
        // SAFETY: `off` is 8-aligned inside the header of the mapping,
        // which lives as long as `self`.
        unsafe { &*(self.map.as_mut_ptr().add(off as usize) as *const AtomicU64) }
    }

    fn region(&self, r: u64) -> u64 {
        HEADER + r * REGION
    }

    /// Read region `r`'s committed records: the tables and bytes used.
    fn scan(&self, r: u64) -> (Tables, u64) {
        let base = self.region(r);
        let mut t = Tables::default();
        let mut pos = 0u64;
        while pos + 8 <= REGION {
            // SAFETY: 4-aligned, inside the mapping.
            let len =
                unsafe { &*(self.map.as_mut_ptr().add((base + pos) as usize) as *const AtomicU32) }
                    .load(Ordering::Acquire) as u64;
            if len < 8 || pos + len > REGION {
                break;
            }
            // SAFETY: the record [pos, pos+len) is committed and in bounds.
            let rec = unsafe {
                std::slice::from_raw_parts(
                    self.map.as_ptr().add((base + pos) as usize),
                    len as usize,
                )
            };
            let kind = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
            if t.apply(kind, &rec[8..]).is_none() {
                break;
            }
            pos += len;
        }
        (t, pos)
    }

    /// Write one record of `len` bytes (length word, `kind`, `body`) at
    /// `at` in the map; the length word goes last (Release), so a reader
    /// sees the record whole or not at all.
    ///
    /// # Safety
    /// `[at, at + len)` lies inside the map and is unused, `len >= 8 +
    /// body.len()`, and the caller holds the journal's lock (one writer).
    unsafe fn put_record(&self, at: usize, len: u64, kind: u32, body: &[u8]) {
        let p = self.map.as_mut_ptr().add(at);
        std::ptr::copy_nonoverlapping(kind.to_le_bytes().as_ptr(), p.add(4), 4);
        std::ptr::copy_nonoverlapping(body.as_ptr(), p.add(8), body.len());
        (*(p as *const AtomicU32)).store(len as u32, Ordering::Release);
    }

    /// Append one record (the journal's lock is held by the caller).
    fn append(&self, g: &mut Inner, kind: u32, body: &[u8]) {
        if g.broken {
            return;
        }
        let len = (8 + body.len() as u64).next_multiple_of(8);
        if g.used + len + 8 > REGION {
            self.compact(g);
            if g.broken || g.used + len + 8 > REGION {
                self.mark_broken(g);
                return;
            }
        }
        let at = (self.region(g.active) + g.used) as usize;
        // SAFETY: [at, at+len) is inside the active region and unused; the
        // lock serialises writers.
        unsafe { self.put_record(at, len, kind, body) };
        g.used += len;
        if g.tables.apply(kind, body).is_none() {
            self.mark_broken(g);
        }
        if g.used > REGION / 2 {
            self.compact(g);
            if g.broken {
                self.mark_broken(g);
            }
        }
    }

    /// Stop recording, and tell a successor not to trust the journal.
    fn mark_broken(&self, g: &mut Inner) {
        if !g.broken || self.word(8).load(Ordering::Acquire) <= 1 {
            tracing::error!(
                "the node journal cannot record more: a worker restart will not find every open file"
            );
        }
        g.broken = true;
        self.word(8).store(u64::MAX, Ordering::Release);
    }

    /// Write the tables as a snapshot into the other region and switch.
    fn compact(&self, g: &mut Inner) {
        let other = 1 - g.active.min(1);
        let base = self.region(other);
        // Zero the other region without allocating memory for it.
        // SAFETY: plain fallocate on our memfd.
        let punched = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                base as i64,
                REGION as i64,
            )
        };
        if punched != 0 {
            g.broken = true;
            return;
        }
        let old = std::mem::replace(
            g,
            Inner {
                tables: Tables::default(),
                active: other,
                used: 0,
                broken: false,
            },
        );
        let t = old.tables;
        let mut recs: Vec<(u32, Vec<u8>)> = Vec::new();
        recs.extend(
            t.nodes
                .iter()
                .map(|(ino, n)| (K_NODE, node_body(*ino, n.nlookup, &n.handle))),
        );
        recs.extend(t.files.iter().map(|(fh, (ino, fl))| {
            let mut b = pair_body(*fh, *ino);
            b.extend_from_slice(&fl.to_le_bytes());
            (K_OPEN, b)
        }));
        recs.extend(
            t.dirs
                .iter()
                .map(|(fh, ino)| (K_OPENDIR, pair_body(*fh, *ino))),
        );
        let total: u64 = recs
            .iter()
            .map(|(_, b)| (8 + b.len() as u64).next_multiple_of(8))
            .sum();
        if total + 8 > REGION / 4 {
            *g = Inner {
                broken: true,
                ..old_inner(t, old.active, old.used)
            };
            return;
        }
        for (k, b) in recs {
            // No compaction inside: a snapshot fills at most a quarter.
            let len = (8 + b.len() as u64).next_multiple_of(8);
            let at = (base + g.used) as usize;
            // SAFETY: as in `append`.
            unsafe { self.put_record(at, len, k, &b) };
            g.used += len;
            g.tables.apply(k, &b);
        }
        self.word(8).store(other, Ordering::Release);
    }

    /// A new inode `ino` with one lookup.
    pub(crate) fn node(&self, ino: u64, handle: &FileHandle) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_NODE, &node_body(ino, 1, handle));
    }

    /// `n` more lookups of `ino`.
    pub(crate) fn node_ref(&self, ino: u64, n: u64) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_REF, &pair_body(ino, n));
    }

    /// `n` lookups of `ino` forgotten.
    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_FORGET, &pair_body(ino, n));
    }

    /// File handle `fh` opened on `ino` with `flags`.
    pub(crate) fn open(&self, fh: u64, ino: u64, flags: i32) {
        let mut b = pair_body(fh, ino);
        b.extend_from_slice(&flags.to_le_bytes());
        let mut g = self.inner.lock();
        self.append(&mut g, K_OPEN, &b);
    }

    /// File handle `fh` released.
    pub(crate) fn release(&self, fh: u64) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_RELEASE, &pair_body(fh, 0));
    }

    /// Directory handle `fh` opened on `ino`.
    pub(crate) fn opendir(&self, fh: u64, ino: u64) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_OPENDIR, &pair_body(fh, ino));
    }

    /// Directory handle `fh` released.
    pub(crate) fn releasedir(&self, fh: u64) {
        let mut g = self.inner.lock();
        self.append(&mut g, K_RELEASEDIR, &pair_body(fh, 0));
    }

    /// The tables as recorded so far (for tests).
    #[cfg(test)]
    pub(crate) fn tables(&self) -> Tables {
        self.inner.lock().tables.clone()
    }
}

fn old_inner(tables: Tables, active: u64, used: u64) -> Inner {
    Inner {
        tables,
        active,
        used,
        broken: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn memfd() -> OwnedFd {
        crate::fuse::memfd("test-journal", JOURNAL_BYTES).expect("memfd")
    }

    #[test]
    fn records_survive_a_reopen_and_compaction() {
        let fd = memfd();
        let dup = fd.try_clone().expect("dup");
        let (j, t) = Journal::map(fd).expect("open");
        assert_eq!(t, Tables::default());
        let h = FileHandle {
            kind: 1,
            bytes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        j.node(2, &h);
        j.node_ref(2, 2);
        j.node(3, &h);
        j.forget(3, 1);
        j.open(10, 2, libc::O_RDWR);
        j.open(11, 2, libc::O_RDONLY);
        j.release(11);
        j.opendir(12, 1);
        let want = j.tables();
        assert_eq!(want.nodes[&2].nlookup, 3);
        assert!(!want.nodes.contains_key(&3));
        assert_eq!(want.files.get(&10), Some(&(2, libc::O_RDWR)));
        assert!(!want.files.contains_key(&11));
        drop(j);
        let again = dup.try_clone().expect("dup");
        let (j2, t2) = Journal::map(dup).expect("reopen");
        assert_eq!(t2, want);
        // Enough appends to compact several times; the tables stay exact.
        for i in 0..2_000_000u64 {
            j2.open(100 + (i % 7), 2, 0);
            j2.release(100 + (i % 7));
        }
        j2.open(99, 2, 1);
        let want2 = j2.tables();
        drop(j2);
        let (_j3, t3) = Journal::map(again).expect("reopen 2");
        assert_eq!(t3, want2);
    }

    #[test]
    fn a_torn_record_is_ignored() {
        let fd = memfd();
        let dup = fd.try_clone().expect("dup");
        let (j, _) = Journal::map(fd).expect("open");
        j.open(5, 2, 0);
        // A record whose length word was never stored: body bytes only.
        let active = j.word(8).load(Ordering::Acquire);
        let at = (j.region(active) + j.inner.lock().used) as usize;
        // SAFETY: inside the mapping.
        unsafe { *j.map.as_mut_ptr().add(at + 8) = 0xff };
        drop(j);
        let (_j, t) = Journal::map(dup).expect("reopen");
        assert_eq!(t.files.len(), 1);
        assert!(t.files.contains_key(&5));
    }

    #[test]
    fn a_broken_journal_restores_nothing_and_records_again() {
        let fd = memfd();
        let dup = fd.try_clone().expect("dup");
        let dup2 = fd.try_clone().expect("dup");
        let (j, _) = Journal::map(fd).expect("open");
        j.open(5, 2, 0);
        j.mark_broken(&mut j.inner.lock());
        j.open(6, 2, 0);
        drop(j);
        let (j, t) = Journal::map(dup).expect("reopen");
        assert_eq!(t, Tables::default(), "nothing from a broken journal");
        j.open(7, 2, 0);
        drop(j);
        let (_j, t) = Journal::map(dup2).expect("reopen 2");
        assert_eq!(t.files.keys().copied().collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn file_handles_reopen_the_same_inode() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("f"), b"x").expect("write");
        let f = std::fs::File::open(d.path().join("f")).expect("open");
        let root = std::fs::File::open(d.path()).expect("root");
        let opath = crate::sys::openat(
            libc::AT_FDCWD,
            &std::ffi::CString::new(d.path().as_os_str().as_encoded_bytes()).expect("c"),
            libc::O_PATH,
            0,
        )
        .expect("O_PATH root");
        let h = FileHandle::of(f.as_raw_fd()).expect("handle");
        assert!(
            h.open(opath.as_raw_fd(), libc::O_PATH).is_err(),
            "open_by_handle_at takes no O_PATH mount_fd"
        );
        std::fs::rename(d.path().join("f"), d.path().join("g")).expect("rename");
        let fd = h
            .open(root.as_raw_fd(), libc::O_PATH)
            .expect("open_by_handle_at");
        let a = sys::fstat(f.as_raw_fd()).expect("stat");
        let b = sys::fstat(fd.as_raw_fd()).expect("stat");
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }
}
