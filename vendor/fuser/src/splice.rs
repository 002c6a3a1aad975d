//! vdrep patch (issue 12): requests received with `splice(2)`, so that the
//! payload of a large WRITE stays in a pipe and goes to the backing file
//! with a second `splice(2)` instead of being copied into the request
//! buffer and out of it again.
//!
//! What the kernel does (`fuse_dev_splice_read`): it moves the whole
//! request into the pipe; the header and arguments are copied into a
//! page of their own, the data of a write-back WRITE (page-cache folios)
//! is *referenced* (no copy), the data of a direct WRITE (user pages) is
//! copied into fresh pages. `splice(pipe → file)` then copies the pages
//! once into the backing file's page cache (or DMAs them for `O_DIRECT`).
//! With `read(2)` the daemon copies every byte twice (into its buffer, out
//! of it) and pins its buffer (`get_user_pages`) per request.
//!
//! The pipe must be empty and have a slot for every page of the largest
//! request before each receive: the kernel takes a request off its queue
//! *before* it checks that the pipe has room, and a request that does not
//! fit is ended with `EIO` (the application's write fails). So the pipe is
//! sized for `max_write` plus the header page, every payload is consumed or
//! discarded before the next receive, and a pipe whose contents are no
//! longer known (a failed read or discard) is replaced.

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;

use nix::errno::Errno;

/// Bytes of `fuse_in_header` + `fuse_write_in`: what precedes a WRITE's data.
pub(crate) const WRITE_HEADER: usize = 80;

/// A pipe to receive requests through, and `/dev/null` to discard what a
/// filesystem did not consume.
#[derive(Debug)]
pub(crate) struct SplicePipe {
    r: OwnedFd,
    w: OwnedFd,
    null: OwnedFd,
    /// Contents no longer known: replace the pipe before the next receive.
    broken: Cell<bool>,
}

impl SplicePipe {
    /// A non-blocking pipe of at least `bytes` (rounded up by the kernel to
    /// a power of two pages). Above `/proc/sys/fs/pipe-max-size` this needs
    /// `CAP_SYS_RESOURCE`; the error says so.
    pub(crate) fn new(bytes: usize) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open descriptors we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        if got < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot size a pipe to {bytes} bytes for splice ({e}); \
                     raise /proc/sys/fs/pipe-max-size or run as root"
                ),
            ));
        }
        if (got as usize) < bytes {
            return Err(io::Error::other(format!(
                "the kernel sized the splice pipe to {got} bytes, {bytes} are needed"
            )));
        }
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")?
            .into();
        Ok(Self {
            r,
            w,
            null,
            broken: Cell::new(false),
        })
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// Move the next request of `dev` into the (empty) pipe; blocks like
    /// `read(2)` on the device. Returns the request's length.
    pub(crate) fn receive(&self, dev: BorrowedFd<'_>, max: usize) -> nix::Result<usize> {
        // SAFETY: plain splice(2) between descriptors that stay open for the
        // call; null offsets (neither end is seekable here).
        let n = unsafe {
            libc::splice(
                dev.as_raw_fd(),
                std::ptr::null_mut(),
                self.w.as_raw_fd(),
                std::ptr::null_mut(),
                max,
                0,
            )
        };
        if n < 0 {
            return Err(Errno::last());
        }
        Ok(n as usize)
    }

    /// Read exactly `buf.len()` bytes of the pipe into `buf`. Anything short
    /// breaks the pipe (its contents no longer match the request).
    pub(crate) fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            // SAFETY: reading into the unfilled rest of `buf`.
            let n = unsafe {
                libc::read(
                    self.r.as_raw_fd(),
                    buf[done..].as_mut_ptr().cast(),
                    buf.len() - done,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.broken.set(true);
                return Err(e);
            }
            if n == 0 {
                self.broken.set(true);
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Move up to `len` bytes from the pipe to `fd` at `offset`.
    fn splice_out(&self, fd: i32, offset: Option<&mut i64>, len: usize) -> io::Result<usize> {
        let off = match offset {
            Some(o) => o as *mut i64,
            None => std::ptr::null_mut(),
        };
        loop {
            // SAFETY: splice(2) from our pipe to an open descriptor; `off`
            // is null or points to a live i64.
            let n = unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    fd,
                    off,
                    len,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Throw away the next `len` bytes of the pipe.
    fn discard(&self, mut len: usize) {
        while len > 0 {
            match self.splice_out(self.null.as_raw_fd(), None, len) {
                Ok(n) if n > 0 => len -= n,
                _ => {
                    self.broken.set(true);
                    return;
                }
            }
        }
    }
}

/// The data of a WRITE request, still in the pipe it was received into
/// ([`crate::Filesystem::write_pipe`]). Whatever the filesystem does not
/// consume is discarded when this is dropped, so the next request starts
/// with an empty pipe.
#[derive(Debug)]
pub struct WritePayload<'a> {
    pipe: &'a SplicePipe,
    len: usize,
    left: usize,
}

impl<'a> WritePayload<'a> {
    pub(crate) fn new(pipe: &'a SplicePipe, len: usize) -> Self {
        Self {
            pipe,
            len,
            left: len,
        }
    }

    /// Bytes of the write (`fuse_write_in.size`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the write carries no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// Move up to `len` of the remaining bytes into `fd` at `offset`
    /// (`splice(2)`, the file's position is not used or changed). Returns
    /// the bytes written, which may be fewer (as `pwrite` may); on an error
    /// nothing was consumed (the caller may retry on another descriptor).
    pub fn splice_to(&mut self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let len = len.min(self.left);
        if len == 0 {
            return Ok(0);
        }
        let mut off =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let n = self.pipe.splice_out(fd.as_raw_fd(), Some(&mut off), len)?;
        if n == 0 {
            // The pipe is empty although the request said otherwise.
            self.pipe.broken.set(true);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.left -= n;
        Ok(n)
    }

    /// Copy the next `buf.len()` bytes (at most the remaining ones) into
    /// `buf`; returns how many.
    pub fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.left);
        self.pipe.read_exact(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

impl Drop for WritePayload<'_> {
    fn drop(&mut self) {
        if self.left > 0 && !self.pipe.is_broken() {
            self.pipe.discard(self.left);
        }
    }
}
