//! FUSE request handlers: the [`fuser::Filesystem`] implementation.

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags, WritePayload,
};

use super::handle::{DirEnt, OpenDir, OpenFile};
use super::inode::{Inode, ROOT_INO};
use super::VdrepFs;
use crate::fuse::uring;
use crate::metrics::fuse::{self as metrics, FuseOp};
use crate::sys::{self, cstr, AlignedBuf};
use crate::tracking::TrackedDisk;

/// Unwrap an `io::Result`, or answer the request with its errno and return.
macro_rules! tri {
    ($e:expr, $reply:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                $reply.error(Errno::from(err));
                return;
            }
        }
    };
}

const GEN: Generation = Generation(0);

/// A data request (write, fsync, fallocate) failed: the VM sees an I/O
/// error. Counted (`vdrep_fuse_request_errors_total`) and logged, at most
/// one line per second so a failing disk cannot flood the log.
fn data_error(op: FuseOp, fh: u64, offset: u64, len: u64, e: &io::Error) {
    static LAST_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let total = metrics::failed(op);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST_LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    if now > last
        && LAST_LOGGED
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(
            "{} of file handle {fh} at offset {offset} ({len} bytes) failed: {e}; the application (the VM) sees an I/O error ({total} {} errors since the worker started)",
            op.name(),
            op.name()
        );
    }
}

fn estale() -> io::Error {
    io::Error::from_raw_os_error(libc::ESTALE)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

thread_local! {
    /// Per-thread scratch buffer for buffered reads.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Per-thread aligned buffer for `O_DIRECT` reads and writes.
    static DIO_BUF: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::empty()) };
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(t: u8) -> Option<FileType> {
    Some(match t {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

fn to_attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec),
        mtime: systime(st.st_mtime, st.st_mtime_nsec),
        ctime: systime(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = -(d.subsec_nanos() as i64);
                if nsec < 0 {
                    nsec += 1_000_000_000;
                    sec -= 1;
                }
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

/// Flags for the backing descriptor of a FUSE open with `flags`.
fn backing_flags(flags: i32, writeback: bool) -> i32 {
    // The kernel handles O_APPEND (it sends the offset); pwrite on an
    // O_APPEND descriptor would ignore it. O_TRUNC arrives as a setattr.
    let mut f = flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_TRUNC
            | libc::O_APPEND
            | libc::O_NOFOLLOW
            | libc::O_DIRECTORY);
    // With the writeback cache the kernel may read through write-only files.
    if writeback && f & libc::O_ACCMODE == libc::O_WRONLY {
        f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
    }
    f
}

fn is_aligned(offset: u64, len: usize) -> bool {
    offset % 512 == 0 && len % 512 == 0
}

/// Read until `buf` is full or end of file.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    crate::util::read_full_at(f, buf, offset)
}

/// Write all of `data`, through the tracked disk if there is one.
fn write_full(disk: Option<&TrackedDisk>, f: &File, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let off = offset + done as u64;
        let r = match disk {
            Some(d) => d.write_at(f, off, &data[done..]),
            None => f.write_at(&data[done..], off),
        };
        match r {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done > 0 => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Serve a READ on `h` (any thread): O_DIRECT handles read aligned requests
/// into an aligned buffer, everything else goes through the buffered fd.
fn serve_read(h: &OpenFile, offset: u64, size: usize, reply: ReplyData) {
    let mut reply = Some(reply);
    if h.direct && is_aligned(offset, size) {
        // On EINVAL (the backing fs wants a larger alignment) fall back to
        // the buffered twin.
        DIO_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let r = b.get(size).and_then(|buf| {
                let n = read_full(&h.file, buf, offset)?;
                Ok(&buf[..n])
            });
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => {
                    if let Some(r) = reply.take() {
                        r.error(Errno::from(e));
                    }
                }
                Ok(data) => {
                    if let Some(r) = reply.take() {
                        r.data(data);
                    }
                }
            }
        });
    }
    let Some(reply) = reply else { return };
    let f = tri!(h.buffered(), reply);
    READ_BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < size {
            b.resize(size, 0);
        }
        match read_full(f, &mut b[..size], offset) {
            Ok(n) => reply.data(&b[..n]),
            Err(e) => reply.error(Errno::from(e)),
        }
    });
}

/// On a ring thread of the io_uring transport: an aligned read of an
/// `O_DIRECT` handle goes to the thread's own ring, straight into the ring
/// entry's payload, and its completion replies (one sleep of the thread
/// serves several requests). `Some`: not taken, serve it synchronously.
fn read_async(
    h: &Arc<OpenFile>,
    offset: u64,
    size: usize,
    reply: ReplyData,
    timer: metrics::OpTimer,
) -> Option<(ReplyData, metrics::OpTimer)> {
    if !(h.direct && size > 0 && is_aligned(offset, size) && uring::async_io()) {
        return Some((reply, timer));
    }
    let h2 = h.clone();
    let done: uring::ReadDone = Box::new(move |r, buf| {
        let _timer = timer;
        let Some(buf) = buf.get_mut(..size) else {
            reply.error(Errno::from(io::Error::from_raw_os_error(libc::EIO)));
            return;
        };
        // As read_full: until the buffer is full or end of file.
        let r = r.and_then(|n| {
            if n == 0 || n >= size {
                Ok(n.min(size))
            } else {
                read_full(&h2.file, &mut buf[n..], offset + n as u64).map(|m| n + m)
            }
        });
        match r {
            Ok(n) => reply.data(&buf[..n]),
            // The backing fs wants a larger alignment: the buffered twin.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                match h2.buffered().and_then(|f| read_full(f, buf, offset)) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(e) => reply.error(Errno::from(e)),
                }
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    });
    if let Err(done) = uring::submit_read(h.file.as_raw_fd(), size, offset, done) {
        // Not queued (the ring failed): read here, into the thread's
        // aligned buffer.
        DIO_BUF.with(|b| {
            let mut b = b.borrow_mut();
            match b.get(size) {
                Ok(buf) => {
                    let r = read_full(&h.file, buf, offset);
                    done(r, buf);
                }
                Err(e) => done(Err(e), &mut []),
            }
        });
    }
    None
}

/// On a ring thread of the io_uring transport: the backing write of an
/// aligned request on an `O_DIRECT` handle goes to the thread's own ring
/// (its data stays in the ring entry until the reply) and its completion
/// replies. The tracking steps before the write run here
/// ([`TrackedDisk::try_begin_write`]); the write holds its share of the cut
/// lock until it completed and is marked. `Some`: not taken (not a ring
/// thread, or [`uring::write_on_ring`] says `pwrite` here: with the
/// adaptive mode when the thread has nothing else in flight or waiting),
/// serve it synchronously (the thread's writes in flight are completed
/// first when a cut is waiting for the cut lock).
fn write_async(
    h: &Arc<OpenFile>,
    fh: u64,
    offset: u64,
    data: &[u8],
    reply: ReplyWrite,
    timer: metrics::OpTimer,
) -> Option<(ReplyWrite, metrics::OpTimer)> {
    if !(h.direct
        && !data.is_empty()
        && is_aligned(offset, data.len())
        && (data.as_ptr() as usize) % sys::DIO_ALIGN == 0
        && uring::write_on_ring())
    {
        return Some((reply, timer));
    }
    let ticket = match &h.disk {
        None => None,
        Some(d) => match d.try_begin_write(offset, data.len()) {
            Ok(Some(t)) => Some(t),
            Ok(None) => {
                // A cut holds or waits for the cut lock, and this thread's
                // writes in flight hold it shared: complete them, then
                // write synchronously (waiting for the cut).
                uring::drain();
                return Some((reply, timer));
            }
            Err(e) => {
                data_error(FuseOp::Write, fh, offset, data.len() as u64, &e);
                reply.error(Errno::from(e));
                return None;
            }
        },
    };
    let h2 = h.clone();
    let done: uring::WriteDone = Box::new(move |r, data| {
        let _timer = timer;
        let r = match r {
            Ok(n) if n >= data.len() => Ok(n),
            // Short: the rest as write_full would, under the same share
            // of the cut lock (the blocks are already logged).
            Ok(n) if n > 0 => write_full(None, &h2.file, &data[n..], offset + n as u64)
                .map(|m| n + m)
                .or(Ok(n)),
            Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => h2
                .buffered()
                .and_then(|f| write_full(None, f, data, offset)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                write_full(None, &h2.file, data, offset)
            }
            Err(e) => Err(e),
        };
        // Marked (and the cut lock released) whatever the outcome, before
        // the reply.
        if let Some(t) = ticket {
            t.finish(*r.as_ref().unwrap_or(&0));
        }
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                data_error(FuseOp::Write, fh, offset, data.len() as u64, &e);
                reply.error(Errno::from(e));
            }
        }
    });
    // write_on_ring() said this is a ring thread dispatching, and the data is
    // the request's: submit_write takes it unless the ring failed.
    match uring::submit_write(h.file.as_raw_fd(), data, offset, done) {
        Ok(()) => metrics::ring_write(),
        Err(done) => {
            // Not queued (the ring failed): write here, under the same
            // share of the cut lock.
            let r = write_full(None, &h.file, data, offset);
            done(r, data);
        }
    }
    None
}

/// Write `data` at `offset` through `h` (and its tracked disk, if any).
fn write_handle(h: &OpenFile, offset: u64, data: &[u8]) -> io::Result<usize> {
    let disk = h.disk.as_deref();
    if h.direct && is_aligned(offset, data.len()) {
        // The request buffer places WRITE payloads on a page boundary
        // (vendor/fuser read_buf.rs): write them as they are, no bounce copy.
        let r = if (data.as_ptr() as usize) % sys::DIO_ALIGN == 0 {
            write_full(disk, &h.file, data, offset)
        } else {
            DIO_BUF.with(|b| {
                let mut b = b.borrow_mut();
                let buf = b.get(data.len())?;
                buf.copy_from_slice(data);
                write_full(disk, &h.file, buf, offset)
            })
        };
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            r => return r,
        }
    }
    write_full(disk, h.buffered()?, data, offset)
}

/// [`write_handle`] for a WRITE whose data is still in its splice pipe:
/// the same choice of backing descriptor, the data moved by `splice(2)`.
fn write_handle_pipe(h: &OpenFile, offset: u64, data: &mut WritePayload<'_>) -> io::Result<usize> {
    let disk = h.disk.as_deref();
    let len = data.remaining();
    if h.direct && is_aligned(offset, len) {
        match splice_full(disk, &h.file, data, offset) {
            // Nothing consumed (the backing fs wants a larger alignment):
            // the buffered twin, as write_handle does.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && data.remaining() == len => {}
            r => return r,
        }
    }
    splice_full(disk, h.buffered()?, data, offset)
}

/// [`write_full`] from a splice pipe: every chunk tracked as
/// [`TrackedDisk::write_at`] tracks it.
fn splice_full(
    disk: Option<&TrackedDisk>,
    f: &File,
    data: &mut WritePayload<'_>,
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while data.remaining() > 0 {
        let off = offset + done as u64;
        let left = data.remaining();
        let r = match disk {
            Some(d) => d.write_with(off, left, || data.splice_to(f.as_fd(), off, left)),
            None => data.splice_to(f.as_fd(), off, left),
        };
        match r {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl VdrepFs {
    fn inode(&self, ino: INodeNo) -> io::Result<Arc<Inode>> {
        self.inodes.get(ino.0).ok_or_else(estale)
    }

    fn open_file(&self, fh: FileHandle) -> io::Result<Arc<OpenFile>> {
        self.handles.file(fh.0).ok_or_else(ebadf)
    }

    /// Look `name` up in `parent`, counting one kernel reference.
    pub(super) fn do_lookup(&self, parent: &Inode, name: &OsStr) -> io::Result<FileAttr> {
        let fd = if parent.ino == ROOT_INO && name.as_bytes() == b".." {
            parent.fd.try_clone()?
        } else {
            let c = cstr(name)?;
            sys::openat(parent.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?
        };
        let st = sys::fstat(fd.as_raw_fd())?;
        let inode = self.inodes.insert_lookup(fd, &st);
        Ok(to_attr(inode.ino, &st))
    }

    /// Owner for a node created by `req` in `parent`: the caller's uid and,
    /// unless the directory is set-group-ID, the caller's gid.
    fn new_owner(&self, req: &Request, parent: &Inode) -> (u32, u32, bool) {
        let sgid = sys::fstat(parent.raw())
            .map(|st| st.st_mode & libc::S_ISGID != 0)
            .unwrap_or(false);
        let gid = if sgid { u32::MAX } else { req.gid() };
        (req.uid(), gid, sgid)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> io::Result<FileAttr> {
        let inode = self.inode(ino)?;
        let handle = fh.and_then(|f| self.handles.file(f.0));
        if let Some(mode) = mode {
            if inode.fmt != libc::S_IFLNK {
                match &handle {
                    Some(h) => h
                        .file
                        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?,
                    None => sys::chmod_fd(inode.raw(), mode & 0o7777)?,
                }
            }
        }
        if uid.is_some() || gid.is_some() {
            sys::chown_at(
                inode.raw(),
                None,
                uid.unwrap_or(u32::MAX),
                gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(size) = size {
            match &handle {
                Some(h) => match &h.disk {
                    Some(d) => d.set_len(&h.file, size)?,
                    None => h.file.set_len(size)?,
                },
                None => {
                    let f = sys::reopen(inode.raw(), libc::O_WRONLY)?;
                    match self.attach(inode.raw(), &f)? {
                        Some(d) => d.set_len(&f, size)?,
                        None => f.set_len(size)?,
                    }
                }
            }
            // We write as root, so the backing fs does not drop set-ID bits
            // on truncation by an ordinary user; do it here.
            if req.uid() != 0 && mode.is_none() {
                self.kill_suidgid(&inode)?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = [timespec(atime), timespec(mtime)];
            match &handle {
                Some(h) => sys::utimens(h.file.as_raw_fd(), true, &times)?,
                None => sys::utimens(inode.raw(), false, &times)?,
            }
        }
        let st = sys::fstat(inode.raw())?;
        Ok(to_attr(inode.ino, &st))
    }

    /// Clear set-user-ID (and group-executable set-group-ID) bits.
    /// The open file a WRITE of `len` bytes at `offset` goes to, with the
    /// set-user/group-ID bits dropped first when the kernel asks for it
    /// (`FUSE_WRITE_KILL_SUIDGID`). The same for `write` and `write_pipe`;
    /// an unknown handle is logged as a failed write.
    fn write_target(
        &self,
        fh: FileHandle,
        offset: u64,
        len: u64,
        write_flags: WriteFlags,
    ) -> Result<Arc<OpenFile>, Errno> {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            // On a ring thread: nothing of this thread's in flight while
            // the mode changes (a no-op on a /dev/fuse thread).
            uring::drain();
            if let Ok(h) = self.open_file(fh) {
                if let Some(inode) = self.inodes.get(h.ino) {
                    self.kill_suidgid(&inode).map_err(Errno::from)?;
                }
            }
        }
        self.open_file(fh).map_err(|e| {
            data_error(FuseOp::Write, fh.0, offset, len, &e);
            Errno::from(e)
        })
    }

    fn kill_suidgid(&self, inode: &Inode) -> io::Result<()> {
        let st = sys::fstat(inode.raw())?;
        let mut m = st.st_mode & 0o7777;
        let before = m;
        m &= !libc::S_ISUID;
        if m & libc::S_IXGRP != 0 {
            m &= !libc::S_ISGID;
        }
        if m != before {
            sys::chmod_fd(inode.raw(), m)?;
        }
        Ok(())
    }

    fn do_open(&self, inode: &Inode, flags: i32) -> io::Result<(u64, FopenFlags)> {
        let bflags = backing_flags(flags, self.opts.writeback_cache);
        let file = match sys::reopen(inode.raw(), bflags) {
            Err(e)
                if e.raw_os_error() == Some(libc::EACCES)
                    && bflags & libc::O_ACCMODE != flags & libc::O_ACCMODE =>
            {
                // Not allowed to upgrade O_WRONLY to O_RDWR (non-root daemon).
                sys::reopen(inode.raw(), backing_flags(flags, false))?
            }
            r => r?,
        };
        self.finish_open(inode, file, bflags)
    }

    fn finish_open(&self, inode: &Inode, file: File, bflags: i32) -> io::Result<(u64, FopenFlags)> {
        let (disk, state) = self.disk_and_state(inode, &file, bflags)?;
        let direct = bflags & libc::O_DIRECT != 0;
        let fopen = if direct {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else if state {
            FopenFlags::FOPEN_DIRECT_IO
        } else if self.opts.writeback_cache
            // A disk a failback brought back behind the kernel: its first
            // cached open drops the pages cached before it left (the kernel
            // invalidates an inode's pages on an open without
            // FOPEN_KEEP_CACHE).
            && !self
                .tracker
                .as_ref()
                .is_some_and(|t| t.drop_cached_pages(&file))
        {
            // Only we change the backing files (the folder is hidden under
            // the mount), so cached pages stay valid across opens.
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        let fh = self
            .handles
            .add_file(OpenFile::new(inode.ino, file, bflags, disk));
        Ok((fh, fopen))
    }

    /// The tracked disk behind `file` (opened on `inode` with `bflags`), if
    /// writable and tracked; and whether it is a state file.
    fn disk_and_state(
        &self,
        inode: &Inode,
        file: &File,
        bflags: i32,
    ) -> io::Result<(Option<Arc<TrackedDisk>>, bool)> {
        let writable = bflags & libc::O_ACCMODE != libc::O_RDONLY;
        let regular = inode.fmt == libc::S_IFREG;
        let rel = if regular {
            self.rel_path(inode.raw())
        } else {
            None
        };
        // The daemon writes its state files behind the mount (through its
        // own descriptors), so they are never cached by the kernel.
        let state = rel.as_deref().is_some_and(VdrepFs::is_state_path);
        let disk = if writable && regular && !state {
            self.attach_rel(rel.as_deref(), file)?
        } else {
            None
        };
        Ok((disk, state))
    }

    /// [`disk_and_state`](Self::disk_and_state)'s disk only.
    pub(super) fn disk_for_open(
        &self,
        inode: &Inode,
        file: &File,
        bflags: i32,
    ) -> io::Result<Option<Arc<TrackedDisk>>> {
        Ok(self.disk_and_state(inode, file, bflags)?.0)
    }

    fn load_dir(&self, inode: &Inode) -> io::Result<Vec<DirEnt>> {
        let raw = sys::read_dir_all(inode.raw())?;
        let dev = inode.key.0;
        let mut out = Vec::with_capacity(raw.len() + 2);
        out.push(DirEnt {
            name: b".".to_vec(),
            dtype: libc::DT_DIR,
            ino: inode.ino,
        });
        out.push(DirEnt {
            name: b"..".to_vec(),
            dtype: libc::DT_DIR,
            ino: if inode.ino == ROOT_INO {
                ROOT_INO
            } else {
                inode.ino
            },
        });
        for (name, dtype, bino) in raw {
            let ino = self.inodes.ino_of((dev, bino)).unwrap_or(bino);
            out.push(DirEnt { name, dtype, ino });
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        kind: u32,
    ) -> io::Result<FileAttr> {
        let p = self.inode(parent)?;
        let c = cstr(name)?;
        let (uid, gid, sgid) = self.new_owner(req, &p);
        let perm = mode & !umask & 0o7777;
        match kind {
            libc::S_IFDIR => {
                // SAFETY: valid C string.
                sys::cvt(unsafe { libc::mkdirat(p.raw(), c.as_ptr(), perm as libc::mode_t) })?;
            }
            _ => {
                // SAFETY: valid C string.
                sys::cvt(unsafe {
                    libc::mknodat(
                        p.raw(),
                        c.as_ptr(),
                        ((mode & libc::S_IFMT) | perm) as libc::mode_t,
                        rdev as libc::dev_t,
                    )
                })?;
            }
        }
        let keep_sgid = if kind == libc::S_IFDIR && sgid {
            libc::S_ISGID
        } else {
            0
        };
        if let Err(e) = sys::set_owner_mode(p.raw(), &c, uid, gid, Some(perm | keep_sgid)) {
            let flag = if kind == libc::S_IFDIR {
                libc::AT_REMOVEDIR
            } else {
                0
            };
            // SAFETY: valid C string; best-effort cleanup.
            unsafe { libc::unlinkat(p.raw(), c.as_ptr(), flag) };
            return Err(e);
        }
        self.do_lookup(&p, name)
    }

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> io::Result<(FileAttr, u64, FopenFlags)> {
        let p = self.inode(parent)?;
        let c = cstr(name)?;
        let perm = mode & !umask & 0o7777;
        let bflags = backing_flags(flags, self.opts.writeback_cache);
        let (fd, created) = match sys::openat(
            p.raw(),
            &c,
            bflags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            perm,
        ) {
            Ok(fd) => (fd, true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => (
                sys::openat(p.raw(), &c, bflags | libc::O_NOFOLLOW, 0)?,
                false,
            ),
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        if created {
            let (uid, gid, _) = self.new_owner(req, &p);
            let r = sys::chown_at(file.as_raw_fd(), None, uid, gid)
                .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(perm)));
            if let Err(e) = r {
                // SAFETY: valid C string; best-effort cleanup.
                unsafe { libc::unlinkat(p.raw(), c.as_ptr(), 0) };
                return Err(e);
            }
        }
        let pfd = sys::openat(
            libc::AT_FDCWD,
            &sys::proc_path(file.as_raw_fd()),
            libc::O_PATH,
            0,
        )?;
        let st = sys::fstat(pfd.as_raw_fd())?;
        let inode = self.inodes.insert_lookup(pfd, &st);
        match self.finish_open(&inode, file, bflags) {
            Ok((fh, fopen)) => Ok((to_attr(inode.ino, &st), fh, fopen)),
            Err(e) => {
                self.inodes.forget(inode.ino, 1);
                Err(e)
            }
        }
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        let c = cstr(name)?;
        let nc = cstr(newname)?;
        let from = self.rel_child(p.raw(), name);
        let to = self.rel_child(np.raw(), newname);
        // SAFETY: valid C strings.
        sys::cvt(unsafe {
            libc::renameat2(p.raw(), c.as_ptr(), np.raw(), nc.as_ptr(), flags.bits())
        })?;
        if let (Some(t), Some(from), Some(to)) = (&self.tracker, from, to) {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                t.on_exchange(&from, &to);
            } else {
                t.on_rename(&from, &to);
            }
        }
        Ok(())
    }

    fn do_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> io::Result<()> {
        let p = self.inode(parent)?;
        let c = cstr(name)?;
        let rel = if dir {
            None
        } else {
            self.rel_child(p.raw(), name)
        };
        let flag = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid C string.
        sys::cvt(unsafe { libc::unlinkat(p.raw(), c.as_ptr(), flag) })?;
        if let (Some(t), Some(rel)) = (&self.tracker, rel) {
            t.on_unlink(&rel);
        }
        Ok(())
    }
}

impl Filesystem for VdrepFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max_write = self.opts.max_write.max(4096);
        if let Err(nearest) = config.set_max_write(max_write) {
            let _ = config.set_max_write(nearest);
        }
        // Readahead stays at 1 MiB whatever max_write is (not measured
        // otherwise); the kernel's max_pages follows the larger of the two.
        if let Err(nearest) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        // Ask for what the kernel supports, one by one.
        for flag in want.iter() {
            let _ = config.add_capabilities(flag);
        }
        // Offered only while /sys/module/fuse/parameters/enable_uring = Y.
        if self.opts.fuse_transport == crate::fuse::FuseTransport::Uring {
            let ok = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            self.uring_granted
                .store(ok, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = metrics::time(FuseOp::Lookup);
        let p = tri!(self.inode(parent), reply);
        let attr = tri!(self.do_lookup(&p, name), reply);
        reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GEN);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = metrics::time(FuseOp::Getattr);
        let inode = tri!(self.inode(ino), reply);
        let st = match fh.and_then(|f| self.handles.file(f.0)) {
            Some(h) => tri!(sys::fstat(h.file.as_raw_fd()), reply),
            None => tri!(sys::fstat(inode.raw()), reply),
        };
        reply.attr(&self.attr_ttl, &to_attr(inode.ino, &st));
    }

    // fuser's signature; the work is `do_setattr`'s (same parameters).
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _t = metrics::time(FuseOp::Setattr);
        let attr = tri!(
            self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, fh),
            reply
        );
        reply.attr(&self.attr_ttl, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let inode = tri!(self.inode(ino), reply);
        let target = tri!(sys::readlink_fd(inode.raw()), reply);
        reply.data(&target);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        let attr = tri!(
            self.do_mknod(req, parent, name, mode, umask, rdev, kind),
            reply
        );
        reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GEN);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let attr = tri!(
            self.do_mknod(req, parent, name, mode, umask, 0, libc::S_IFDIR),
            reply
        );
        reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GEN);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = metrics::time(FuseOp::Unlink);
        tri!(self.do_unlink(parent, name, false), reply);
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tri!(self.do_unlink(parent, name, true), reply);
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let p = tri!(self.inode(parent), reply);
        let c = tri!(cstr(link_name), reply);
        let t = tri!(cstr(target.as_os_str()), reply);
        // SAFETY: valid C strings.
        tri!(
            sys::cvt(unsafe { libc::symlinkat(t.as_ptr(), p.raw(), c.as_ptr()) }),
            reply
        );
        let (uid, gid, _) = self.new_owner(req, &p);
        if let Err(e) = sys::chown_at(p.raw(), Some(&c), uid, gid) {
            // SAFETY: valid C string; best-effort cleanup.
            unsafe { libc::unlinkat(p.raw(), c.as_ptr(), 0) };
            return reply.error(Errno::from(e));
        }
        let attr = tri!(self.do_lookup(&p, link_name), reply);
        reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GEN);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::time(FuseOp::Rename);
        tri!(
            self.do_rename(parent, name, newparent, newname, flags),
            reply
        );
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let inode = tri!(self.inode(ino), reply);
        let np = tri!(self.inode(newparent), reply);
        let c = tri!(cstr(newname), reply);
        let src = sys::proc_path(inode.raw());
        // SAFETY: valid C strings.
        tri!(
            sys::cvt(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    np.raw(),
                    c.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            }),
            reply
        );
        let attr = tri!(self.do_lookup(&np, newname), reply);
        reply.entry_with_ttls(&self.attr_ttl, &self.entry_ttl, &attr, GEN);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = metrics::time(FuseOp::Open);
        let inode = tri!(self.inode(ino), reply);
        let (fh, fopen) = tri!(self.do_open(&inode, flags.0), reply);
        reply.opened(FileHandle(fh), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = metrics::time(FuseOp::Read);
        // Direct requests are served here too, on the worker that read them:
        // the session has `DIRECT_IO_WORKERS` extra workers so the device
        // queue depth is not capped by `n_threads`. On a ring thread of the
        // io_uring transport they go to its ring.
        let h = tri!(self.open_file(fh), reply);
        let Some((reply, _t)) = read_async(&h, offset, size as usize, reply, t) else {
            return;
        };
        serve_read(&h, offset, size as usize, reply);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = metrics::time(FuseOp::Write);
        let h = match self.write_target(fh, offset, data.len() as u64, write_flags) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Some((reply, _t)) = write_async(&h, fh.0, offset, data, reply, t) else {
            return;
        };
        // Synchronously: on a ring thread, its writes in flight hold the
        // cut lock shared and write_handle may wait for it.
        uring::drain();
        let r = write_handle(&h, offset, data);
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                data_error(FuseOp::Write, fh.0, offset, data.len() as u64, &e);
                reply.error(Errno::from(e));
            }
        }
    }

    fn write_pipe(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut data: WritePayload<'_>,
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _t = metrics::time(FuseOp::Write);
        let len = data.len() as u64;
        let h = match self.write_target(fh, offset, len, write_flags) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        metrics::spliced_write();
        match write_handle_pipe(&h, offset, &mut data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                data_error(FuseOp::Write, fh.0, offset, len, &e);
                reply.error(Errno::from(e));
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::time(FuseOp::Flush);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::time(FuseOp::Release);
        self.handles.remove_file(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::time(FuseOp::Fsync);
        let r = self.open_file(fh).and_then(|h| {
            if datasync {
                h.file.sync_data()
            } else {
                h.file.sync_all()
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                data_error(FuseOp::Fsync, fh.0, 0, 0, &e);
                reply.error(Errno::from(e));
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let inode = tri!(self.inode(ino), reply);
        if !inode.is_dir() {
            return reply.error(Errno::from_i32(libc::ENOTDIR));
        }
        let fh = self.handles.add_dir(OpenDir {
            ino: inode.ino,
            entries: parking_lot::Mutex::new(None),
        });
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = metrics::time(FuseOp::Readdir);
        let d = tri!(self.handles.dir(fh.0).ok_or_else(ebadf), reply);
        let inode = tri!(self.inode(INodeNo(d.ino)), reply);
        let _ = ino;
        let snap = {
            let mut g = d.entries.lock();
            match &*g {
                Some(s) if offset != 0 => s.clone(),
                _ => {
                    let s = Arc::new(tri!(self.load_dir(&inode), reply));
                    *g = Some(s.clone());
                    s
                }
            }
        };
        for (i, e) in snap.iter().enumerate().skip(offset as usize) {
            let kind = match kind_of_dtype(e.dtype) {
                Some(k) => k,
                None => match CString::new(e.name.clone())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
                    .and_then(|c| sys::fstatat(inode.raw(), &c))
                {
                    Ok(st) => kind_of(st.st_mode),
                    Err(_) => FileType::RegularFile,
                },
            };
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.remove_dir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let inode = tri!(self.inode(ino), reply);
        let fd = tri!(
            sys::openat(
                inode.raw(),
                &CString::from(c"."),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0
            ),
            reply
        );
        let f = File::from(fd);
        tri!(
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            },
            reply
        );
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _t = metrics::time(FuseOp::Statfs);
        let inode = tri!(
            self.inode(ino).or_else(|_| self.inode(INodeNo(ROOT_INO))),
            reply
        );
        let st = tri!(sys::fstatvfs(inode.raw()), reply);
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let inode = tri!(self.inode(ino), reply);
        let c = tri!(cstr(name), reply);
        tri!(sys::xattr::set(inode.raw(), &c, value, flags), reply);
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let inode = tri!(self.inode(ino), reply);
        let c = tri!(cstr(name), reply);
        let (n, data) = tri!(sys::xattr::get(inode.raw(), &c, size as usize), reply);
        if size == 0 {
            reply.size(n as u32);
        } else {
            reply.data(&data);
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let inode = tri!(self.inode(ino), reply);
        let (n, data) = tri!(sys::xattr::list(inode.raw(), size as usize), reply);
        if size == 0 {
            reply.size(n as u32);
        } else {
            reply.data(&data);
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let inode = tri!(self.inode(ino), reply);
        let c = tri!(cstr(name), reply);
        tri!(sys::xattr::remove(inode.raw(), &c), reply);
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let inode = tri!(self.inode(ino), reply);
        let p = sys::proc_path(inode.raw());
        // SAFETY: valid C string.
        tri!(
            sys::cvt(unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask.bits(), 0) }),
            reply
        );
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _t = metrics::time(FuseOp::Create);
        let (attr, fh, fopen) = tri!(self.do_create(req, parent, name, mode, umask, flags), reply);
        reply.created(&self.attr_ttl, &attr, GEN, FileHandle(fh), fopen);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::time(FuseOp::Fallocate);
        let r = self.open_file(fh).and_then(|h| match &h.disk {
            Some(d) => d.fallocate(&h.file, mode, offset, length),
            None => sys::fallocate(h.file.as_raw_fd(), mode, offset, length),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                // Not supported by the backing file system is an answer, not a failure.
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    data_error(FuseOp::Fallocate, fh.0, offset, length, &e);
                }
                reply.error(Errno::from(e));
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let h = tri!(self.open_file(fh), reply);
        let off = tri!(sys::lseek(h.file.as_raw_fd(), offset, whence), reply);
        reply.offset(off);
    }
}
