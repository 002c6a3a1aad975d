//! vdrep's FUSE connection layer: the `/dev/fuse` connection as an object
//! that outlives the process serving it.
//!
//! This module owns the connection's descriptors and their life cycle:
//! opening `/dev/fuse` and mounting it ([`Connection::mount`]), the
//! per-thread clones (`FUSE_DEV_IOC_CLONE`), handing every held descriptor
//! to a worker process over a Unix socket (`SCM_RIGHTS`, [`send_fds`] /
//! [`recv_fds`]), asking the kernel to resend the requests a dead worker
//! had read but not answered ([`notify_resend`]), and telling whether the
//! connection is still alive ([`connection_alive`]). [`supervisor`] is the
//! process that holds them and restarts the worker; [`fusectl`] aborts the
//! connection of a mount whose server is gone.
//!
//! The request transport ([`FuseTransport`]) is fuser's read loop, one
//! thread per held descriptor (`Session::from_fds` in `vendor/fuser`), or
//! FUSE over io_uring ([`uring`], issue 12): rings owned by the worker,
//! which cannot be handed over (kernel-notes/fuse-uring.md).
//! The request handlers themselves are [`crate::fs`]'s.

pub mod fusectl;
pub mod supervisor;
pub mod uring;

/// How requests travel between the kernel and the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FuseTransport {
    /// `read(2)`/`writev(2)` on `/dev/fuse`, one thread per descriptor; a
    /// crashed worker is replaced without a guest error.
    #[default]
    Dev,
    /// FUSE over io_uring ([`uring`]); falls back to `Dev` when the kernel
    /// does not offer it. A worker crash ends the mount (no handover).
    Uring,
}

impl FuseTransport {
    /// `dev` or `uring`.
    pub fn parse(s: &str) -> Option<FuseTransport> {
        match s.trim() {
            "dev" => Some(FuseTransport::Dev),
            "uring" => Some(FuseTransport::Uring),
            _ => None,
        }
    }
}

impl std::fmt::Display for FuseTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FuseTransport::Dev => "dev",
            FuseTransport::Uring => "uring",
        })
    }
}

use std::ffi::CString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::sys;

/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, protocol 7.40, Linux
/// 6.9): move every request read but not answered back to the input queue.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// Largest number of descriptors passed in one handover message (the
/// kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 250;

nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);

/// How the mount is made: the options `fuser`'s own mount would pass.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// `fsname=` (the mount's source in the mount table).
    pub fsname: String,
    /// Mount with `allow_other`.
    pub allow_other: bool,
    /// Number of device descriptors to serve (one thread each): the
    /// connection's own plus `threads - 1` clones.
    pub threads: usize,
}

/// The descriptors of one mounted FUSE connection: the device descriptor
/// first, then its clones.
#[derive(Debug)]
pub struct Connection {
    pub devs: Vec<OwnedFd>,
}

impl Connection {
    /// Open `/dev/fuse`, mount it over `dir` and clone it `spec.threads - 1`
    /// times. The kernel queues `FUSE_INIT`; the first worker answers it.
    pub fn mount(dir: &Path, spec: &MountSpec) -> io::Result<Connection> {
        let dev = open_dev()?;
        let st = nix::sys::stat::stat(dir).map_err(io::Error::from)?;
        let mut opts = format!(
            "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
            dev.as_raw_fd(),
            st.st_mode & libc::S_IFMT,
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        if spec.allow_other {
            opts.push_str(",allow_other");
        }
        nix::mount::mount(
            Some(spec.fsname.as_str()),
            dir,
            Some("fuse"),
            nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOSUID,
            Some(opts.as_str()),
        )
        .map_err(io::Error::from)?;
        let mut devs = vec![dev];
        for _ in 1..spec.threads.max(1) {
            devs.push(clone_dev(devs[0].as_fd())?);
        }
        Ok(Connection { devs })
    }
}

fn open_dev() -> io::Result<OwnedFd> {
    let c = CString::new("/dev/fuse").map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::openat(libc::AT_FDCWD, &c, libc::O_RDWR | libc::O_CLOEXEC, 0)
}

/// A new device descriptor attached to `dev`'s connection. The kernel
/// spreads requests over all of them; a request read through one is
/// answered through the same one.
pub fn clone_dev(dev: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let new = open_dev()?;
    let mut src = dev.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source fd) from `src`.
    unsafe { fuse_dev_ioc_clone(new.as_raw_fd(), &mut src) }.map_err(io::Error::from)?;
    Ok(new)
}

/// Ask the kernel to queue again every request of the connection that was
/// read but not answered (on any of its descriptors). Resent requests carry
/// bit 63 in their `unique`; their answers echo it. Fails with `EINVAL` on
/// kernels before 6.9.
pub fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (= notify code); u64 unique (= 0) }
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    let n = nix::unistd::write(dev, &msg).map_err(io::Error::from)?;
    if n != msg.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Whether the connection behind `dev` still serves a mount (false once it
/// was unmounted or aborted: the device then polls `POLLERR`).
pub fn connection_alive(dev: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(dev, PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL)),
        Err(_) => false,
    }
}

/// An anonymous memory file of `size` bytes (sparse), for state that must
/// outlive a worker (the node journal, [`crate::fs`]).
pub fn memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain system call on a valid C string.
    let fd = sys::cvt(unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: memfd_create returned a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::ftruncate(&fd, size as i64).map_err(io::Error::from)?;
    Ok(fd)
}

/// Send `payload` with `fds` over the Unix socket `sock`.
pub fn send_fds(sock: BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    let iov = [IoSlice::new(payload)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    Ok(())
}

/// Receive one message and its descriptors (close-on-exec) from `sock`.
/// An empty payload with no descriptors means the peer closed the socket.
pub fn recv_fds(sock: BorrowedFd<'_>, max_len: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; max_len];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel installed these descriptors for us.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(n);
    Ok((buf, fds))
}
