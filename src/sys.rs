//! Thin, fd-relative system-call wrappers: a leaf below the passthrough file
//! system ([`crate::fs`]) and the tracking ([`crate::tracking`]), which both use it.
//!
//! Everything here works relative to a directory or inode descriptor, or via
//! the `/proc/self/fd/N` magic link, never through a path below the
//! mountpoint (which would re-enter our own FUSE mount and deadlock).
//! `proc_fd_path` is the one place that spells `/proc/self/fd/N` paths;
//! [`crate::tracking`] uses these wrappers too (it runs below the mount).

use std::alloc::{self, Layout};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Turn a `-1` return into the current `errno`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A C string for a single path component (or a link target).
pub(crate) fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N/REL` (`REL` empty: `/proc/self/fd/N`): opening it
/// reaches the real file behind `fd` (or `REL` below the directory `fd`)
/// without going through any mount above it.
pub(crate) fn proc_fd_path(fd: RawFd, rel: &Path) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{fd}"));
    if !rel.as_os_str().is_empty() {
        p.push(rel);
    }
    p
}

/// [`proc_fd_path`] of `fd` itself, as a C string.
pub(crate) fn proc_path(fd: RawFd) -> CString {
    // A formatted integer never contains a NUL byte.
    CString::new(proc_fd_path(fd, Path::new("")).into_os_string().into_vec()).unwrap_or_default()
}

/// `openat(dirfd, name, flags, mode)` with `O_CLOEXEC`.
pub(crate) fn openat(dirfd: RawFd, name: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with a valid C string.
    let fd = cvt(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopen the file behind `fd` (typically `O_PATH`) with `flags`.
pub(crate) fn reopen(fd: RawFd, flags: i32) -> io::Result<File> {
    let p = proc_path(fd);
    let fd = openat(libc::AT_FDCWD, &p, flags & !libc::O_NOFOLLOW, 0)?;
    Ok(File::from(fd))
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: works on `O_PATH`.
pub(crate) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers, empty C string literal.
    cvt(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn fstatat(dirfd: RawFd, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    cvt(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `readlink` of the magic link of `fd`: the real path of the open file.
pub(crate) fn fd_path(fd: RawFd) -> io::Result<PathBuf> {
    std::fs::read_link(proc_fd_path(fd, Path::new("")))
}

/// `readlinkat(fd, "")` on an `O_PATH` descriptor of a symlink.
pub(crate) fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer is valid for buf.len() bytes.
    let n = cvt_size(unsafe {
        libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `fchownat(dirfd, name, uid, gid, AT_SYMLINK_NOFOLLOW [| AT_EMPTY_PATH])`.
/// `u32::MAX` leaves the id unchanged.
pub(crate) fn chown_at(dirfd: RawFd, name: Option<&CString>, uid: u32, gid: u32) -> io::Result<()> {
    let (p, flags) = match name {
        Some(n) => (n.as_ptr(), libc::AT_SYMLINK_NOFOLLOW),
        None => (
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        ),
    };
    // SAFETY: valid C strings.
    cvt(unsafe { libc::fchownat(dirfd, p, uid, gid, flags) })?;
    Ok(())
}

/// `chmod` through the magic link (fchmod does not work on `O_PATH`).
pub(crate) fn chmod_fd(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// `fchmodat(dirfd, name, mode)`.
pub(crate) fn chmod_at(dirfd: RawFd, name: &CString, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchmodat(dirfd, name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// Fix up ownership and mode of a node just created at `dirfd/name`.
pub(crate) fn set_owner_mode(
    dirfd: RawFd,
    name: &CString,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
) -> io::Result<()> {
    chown_at(dirfd, Some(name), uid, gid)?;
    if let Some(m) = mode {
        chmod_at(dirfd, name, m & 0o7777)?;
    }
    Ok(())
}

/// `utimensat` through the magic link of `fd` (or `futimens` on an open file).
pub(crate) fn utimens(fd: RawFd, open_file: bool, times: &[libc::timespec; 2]) -> io::Result<()> {
    if open_file {
        // SAFETY: valid pointer to two timespecs.
        cvt(unsafe { libc::futimens(fd, times.as_ptr()) })?;
    } else {
        let p = proc_path(fd);
        // SAFETY: valid pointers.
        cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
    }
    Ok(())
}

/// `fallocate(2)` directly on a descriptor.
pub(crate) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) })?;
    Ok(())
}

/// `renameat(2)`: `old` (relative to `olddirfd`) becomes `new` (relative to
/// `newdirfd`; `AT_FDCWD` for absolute or cwd-relative paths).
pub(crate) fn renameat(
    olddirfd: RawFd,
    old: &CString,
    newdirfd: RawFd,
    new: &CString,
) -> io::Result<()> {
    // SAFETY: plain syscall with valid C strings.
    cvt(unsafe { libc::renameat(olddirfd, old.as_ptr(), newdirfd, new.as_ptr()) })?;
    Ok(())
}

/// `lseek(2)` (used for `SEEK_DATA`/`SEEK_HOLE`).
pub(crate) fn lseek(fd: RawFd, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fstatvfs` (works on `O_PATH`).
pub(crate) fn fstatvfs(fd: RawFd) -> io::Result<libc::statvfs> {
    // SAFETY: zeroed statvfs is a valid out-buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    cvt(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st)
}

/// Extended attributes, through the `/proc/self/fd/N` path of an inode fd.
pub(crate) mod xattr {
    use super::*;

    /// Returns the value's full size and (when `size > 0`) the value.
    /// Run an xattr call that fills a caller buffer of `size` bytes (size 0
    /// asks only for the needed length): returns (needed length, data).
    fn sized(
        size: usize,
        call: impl FnOnce(*mut libc::c_void) -> isize,
    ) -> io::Result<(usize, Vec<u8>)> {
        let mut buf = vec![0u8; size];
        let ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        let n = cvt_size(call(ptr))?;
        buf.truncate(n.min(size));
        Ok((n, buf))
    }

    pub(crate) fn get(fd: RawFd, name: &CString, size: usize) -> io::Result<(usize, Vec<u8>)> {
        let p = proc_path(fd);
        // SAFETY: `sized` passes a buffer valid for `size` bytes, or null when size == 0.
        sized(size, |buf| unsafe {
            libc::getxattr(p.as_ptr(), name.as_ptr(), buf, size)
        })
    }

    pub(crate) fn list(fd: RawFd, size: usize) -> io::Result<(usize, Vec<u8>)> {
        let p = proc_path(fd);
        // SAFETY: `sized` passes a buffer valid for `size` bytes, or null when size == 0.
        sized(size, |buf| unsafe {
            libc::listxattr(p.as_ptr(), buf.cast(), size)
        })
    }

    pub(crate) fn set(fd: RawFd, name: &CString, value: &[u8], flags: i32) -> io::Result<()> {
        let p = proc_path(fd);
        // SAFETY: valid pointers and length.
        cvt(unsafe {
            libc::setxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(())
    }

    pub(crate) fn remove(fd: RawFd, name: &CString) -> io::Result<()> {
        let p = proc_path(fd);
        // SAFETY: valid C strings.
        cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) })?;
        Ok(())
    }
}

/// Read the whole of a directory (opened from an `O_PATH` fd) as
/// `(name, d_type, d_ino)` triples, excluding `.` and `..`.
pub(crate) fn read_dir_all(fd: RawFd) -> io::Result<Vec<(Vec<u8>, u8, u64)>> {
    let dfd = openat(
        fd,
        &CString::from(c"."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    // SAFETY: fdopendir takes ownership of the descriptor on success.
    let dir = unsafe { libc::fdopendir(dfd.as_raw_fd()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dfd);
    let mut out = Vec::new();
    loop {
        // SAFETY: errno is thread-local; reset so end-of-stream is distinguishable.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dir is a valid DIR*.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: dir is valid and closed exactly once.
            unsafe { libc::closedir(dir) };
            if err.raw_os_error().unwrap_or(0) != 0 {
                return Err(err);
            }
            return Ok(out);
        }
        // SAFETY: ent points to a valid dirent64 until the next readdir call.
        let (name, ty, ino) = unsafe {
            let e = &*ent;
            let name = std::ffi::CStr::from_ptr(e.d_name.as_ptr())
                .to_bytes()
                .to_vec();
            (name, e.d_type, e.d_ino)
        };
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name, ty, ino));
    }
}

/// A heap buffer aligned for `O_DIRECT` I/O.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

/// Alignment used for `O_DIRECT` buffers.
pub(crate) const DIO_ALIGN: usize = 4096;

impl AlignedBuf {
    pub(crate) const fn empty() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// A zero-initialised aligned slice of at least `len` bytes (reused).
    pub(crate) fn get(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if len > self.cap {
            self.free();
            let cap = len.div_ceil(DIO_ALIGN).max(1) * DIO_ALIGN;
            let layout = Layout::from_size_align(cap, DIO_ALIGN)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: ptr is valid for cap >= len initialised bytes.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            if let Ok(layout) = Layout::from_size_align(self.cap, DIO_ALIGN) {
                // SAFETY: allocated with this exact layout.
                unsafe { alloc::dealloc(self.ptr, layout) };
            }
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// A pipe (read end, write end) of at least `bytes`, non-blocking and
/// close-on-exec. `EPERM` when `bytes` is above `fs.pipe-max-size` and the
/// process lacks `CAP_SYS_RESOURCE`.
pub fn sized_pipe(bytes: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are open descriptors nobody else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let want =
        libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
    let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if (got as usize) < bytes {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    }
    Ok((r, w))
}

/// `ioprio_set`/`ioprio_get`'s "which" for one task (a thread here).
const IOPRIO_WHO_PROCESS: libc::c_long = 1;
/// The idle I/O class: served only when no other class wants the disk.
pub(crate) const IOPRIO_CLASS_IDLE: u32 = 3;
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// Make the calling thread a background one: CPU nice 19 and the idle I/O
/// class, so housekeeping (the receiver's walk of its store) gives way to
/// replication and to the VMs on a busy host. Affects this thread only.
pub fn background_priority() -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: setpriority on the calling thread's own id.
    cvt(unsafe { libc::setpriority(libc::PRIO_PROCESS, who, 19) })?;
    let prio = libc::c_long::from(IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT);
    // SAFETY: ioprio_set with integer arguments only, on the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            libc::c_long::from(tid),
            prio,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The I/O class of thread `tid` (`IOPRIO_CLASS_*`; 0: none set, it
/// follows its CPU nice). Tests check [`background_priority`] with it.
#[cfg(test)]
pub(crate) fn io_class(tid: libc::pid_t) -> io::Result<u32> {
    // SAFETY: ioprio_get with integer arguments only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_get,
            IOPRIO_WHO_PROCESS,
            libc::c_long::from(tid),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(r >> IOPRIO_CLASS_SHIFT).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
