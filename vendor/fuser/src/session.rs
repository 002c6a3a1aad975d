//! Filesystem session
//!
//! A session runs a filesystem implementation while it is being mounted to a specific mount
//! point. A session begins by mounting the filesystem and ends by unmounting it. While the
//! filesystem is mounted, the session loop receives, dispatches and replies to kernel requests
//! for filesystem operations under its mount point.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::thread::{self};

use log::debug;
use log::error;
use log::info;
use log::warn;
use nix::errno::Errno as NixErrno;
use nix::unistd::Uid;
use nix::unistd::geteuid;
use parking_lot::Mutex;

use crate::Errno;
use crate::Filesystem;
use crate::KernelConfig;
use crate::MountOption;
use crate::ReplyEmpty;
use crate::Request;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::channel::ReplySink;
use crate::dev_fuse::DevFuse;
use crate::ll;
use crate::ll::Operation;
use crate::ll::ResponseErrno;
use crate::ll::Version;
use crate::ll::flags::init_flags::InitFlags;
use crate::ll::fuse_abi as abi;
use crate::mnt::Mount;
use crate::mnt::mount_options::Config;
use crate::mnt::mount_options::check_option_conflicts;
use crate::notify::Notifier;
use crate::read_buf::FuseReadBuf;
use crate::reply::Reply;
use crate::reply::ReplyRaw;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::splice::SplicePipe;
use crate::splice::WRITE_HEADER;
use crate::splice::WritePayload;

/// The max size of write requests from the kernel. The absolute minimum is 4k,
/// FUSE recommends at least 128k, max 16M. The FUSE default is 16M on macOS
/// and 128k on other systems.
pub(crate) const MAX_WRITE_SIZE: usize = 16 * 1024 * 1024;

#[derive(Default, Debug, Eq, PartialEq, Clone, Copy)]
/// How requests should be filtered based on the calling UID.
pub enum SessionACL {
    /// Allow requests from any user. Corresponds to the `allow_other` mount option.
    All,
    /// Allow requests from root. Corresponds to the `allow_root` mount option.
    RootAndOwner,
    /// Allow requests from the owning UID. This is FUSE's default mode of operation.
    #[default]
    Owner,
}

impl SessionACL {
    /// Returns the mount option string for kernel/fusermount/libfuse paths.
    /// Both `All` and `RootAndOwner` map to `allow_other` - the kernel only
    /// understands `allow_other`, and fuser enforces the root-only restriction internally.
    #[allow(dead_code)]
    pub(crate) fn to_mount_option(self) -> Option<&'static str> {
        match self {
            SessionACL::All | SessionACL::RootAndOwner => Some("allow_other"),
            SessionACL::Owner => None,
        }
    }
}

/// Calls `destroy` on drop.
#[derive(Debug)]
pub(crate) struct FilesystemHolder<FS: Filesystem> {
    pub(crate) fs: Option<FS>,
}

impl<FS: Filesystem> FilesystemHolder<FS> {
    fn destroy(&mut self) {
        if let Some(mut fs) = self.fs.take() {
            fs.destroy();
        }
    }
}

impl<FS: Filesystem> Drop for FilesystemHolder<FS> {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[derive(Debug)]
struct UmountOnDrop {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl UmountOnDrop {
    fn umount(&self) -> io::Result<()> {
        if let Some(mount) = self.mount.lock().take() {
            mount.umount()?;
        }
        Ok(())
    }
}

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.umount() {
            warn!("Failed to umount filesystem: {}", e);
        }
    }
}

/// The session data structure
#[derive(Debug)]
pub struct Session<FS: Filesystem> {
    /// Filesystem operation implementations. None after `destroy` called.
    pub(crate) filesystem: FilesystemHolder<FS>,
    /// Communication channel to the kernel driver
    pub(crate) ch: Channel,
    /// Handle to the mount.  Dropping this unmounts.
    mount: UmountOnDrop,
    /// Whether to restrict access to owner, root + owner, or unrestricted
    /// Used to implement `allow_root` and `auto_unmount`
    pub(crate) allowed: SessionACL,
    /// User that launched the fuser process
    pub(crate) session_owner: Uid,
    /// FUSE protocol version, as reported by the kernel.
    /// The field is set to `Some` when the init message is received.
    pub(crate) proto_version: Option<Version>,
    pub(crate) config: Config,
    /// Further descriptors of the same connection supplied by the caller
    /// (`from_fds`); when non-empty, `run` serves each on its own thread
    /// instead of cloning `ch`.
    extra: Vec<Channel>,
}

impl<FS: Filesystem> AsFd for Session<FS> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ch.as_fd()
    }
}

impl<FS: Filesystem> Session<FS> {
    /// Create a new session by mounting the given filesystem to the given mountpoint
    /// # Errors
    /// Returns an error if the options are incorrect, or if the fuse device can't be mounted.
    pub fn new<P: AsRef<Path>>(
        filesystem: FS,
        mountpoint: P,
        options: &Config,
    ) -> io::Result<Session<FS>> {
        check_option_conflicts(options)?;

        let mountpoint = mountpoint.as_ref();
        info!("Mounting {}", mountpoint.display());
        // If AutoUnmount is requested, but not AllowRoot or AllowOther, return an error
        // because fusermount needs allow_root or allow_other to handle the auto_unmount option
        if options.mount_options.contains(&MountOption::AutoUnmount)
            && options.acl == SessionACL::Owner
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("auto_unmount requires acl != Owner, got: {:?}", options.acl),
            ));
        }
        let (file, mount) = Mount::new(mountpoint, &options.mount_options, options.acl)?;

        let ch = Channel::new(file);

        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(Some(mount))),
            },
            allowed: options.acl,
            session_owner: geteuid(),
            proto_version: None,
            config: options.clone(),
            extra: Vec::new(),
        };

        session.handshake()?;

        Ok(session)
    }

    /// Wrap an existing /dev/fuse file descriptor. This doesn't mount the
    /// filesystem anywhere; that must be done separately.
    pub fn from_fd(
        filesystem: FS,
        fd: OwnedFd,
        acl: SessionACL,
        config: Config,
    ) -> io::Result<Self> {
        let ch = Channel::new(Arc::new(DevFuse(File::from(fd))));
        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: None,
            config,
            extra: Vec::new(),
        };

        session.handshake()?;

        Ok(session)
    }

    /// Serve existing descriptors of one FUSE connection (a descriptor
    /// handover between processes). `fds[0]` is the connection's device
    /// descriptor, the others are clones of it (`FUSE_DEV_IOC_CLONE`);
    /// `run` serves each on its own thread and clones nothing, so the caller
    /// decides which process keeps them open. With `initialized == false`
    /// the INIT request is read and answered first, as `from_fd` does; with
    /// `true` the connection's INIT was already answered (by a previous
    /// process) and requests are served at once.
    pub fn from_fds(
        filesystem: FS,
        fds: Vec<OwnedFd>,
        acl: SessionACL,
        config: Config,
        initialized: bool,
    ) -> io::Result<Self> {
        let mut chans = fds
            .into_iter()
            .map(|fd| Channel::new(Arc::new(DevFuse(File::from(fd)))));
        let Some(ch) = chans.next() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "from_fds needs at least one descriptor",
            ));
        };
        let mut session = Session {
            filesystem: FilesystemHolder {
                fs: Some(filesystem),
            },
            ch,
            mount: UmountOnDrop {
                mount: Arc::new(Mutex::new(None)),
            },
            allowed: acl,
            session_owner: geteuid(),
            proto_version: None,
            config,
            extra: chans.collect(),
        };
        if !initialized {
            session.handshake()?;
        }
        Ok(session)
    }

    /// Run the session loop in a background thread. If the returned handle is dropped,
    /// the filesystem is unmounted and the given session ends.
    pub fn spawn(self) -> io::Result<BackgroundSession> {
        let sender = self.ch.sender();
        // Take the fuse_session, so that we can unmount it
        let mount = std::mem::take(&mut *self.mount.mount.lock());
        let guard = thread::Builder::new()
            .name("fuser-bg".to_string())
            .spawn(move || self.run())?;
        Ok(BackgroundSession {
            guard,
            sender,
            mount,
        })
    }

    /// Run the session loop that receives kernel requests and dispatches them to method
    /// calls into the filesystem. This read-dispatch-loop is non-concurrent to prevent
    /// having multiple buffers (which take up much memory), but the filesystem methods
    /// may run concurrent by spawning threads.
    /// # Errors
    /// Returns any final error when the session comes to an end.
    pub fn run(self) -> io::Result<()> {
        self.run_with(None, None::<fn(Dispatcher<FS>) -> io::Result<()>>)
    }

    /// vdrep patch: like [`Session::run`], but with `dev_threads` the
    /// device is read by only that many threads (the first descriptors),
    /// and with `transport` a further thread runs it with a [`Dispatcher`]
    /// (a request transport other than `read(2)` on the device, e.g. FUSE
    /// over io_uring). `destroy` is called once every thread and the
    /// transport have returned; the transport must drop every clone of its
    /// dispatcher before it returns.
    pub fn run_with<T>(self, dev_threads: Option<usize>, transport: Option<T>) -> io::Result<()>
    where
        T: FnOnce(Dispatcher<FS>) -> io::Result<()> + Send + 'static,
    {
        let Session {
            filesystem,
            ch,
            mount: _do_not_umount_yet,
            allowed,
            session_owner,
            proto_version: _,
            config,
            extra,
        } = self;

        let n_threads = config.n_threads.unwrap_or(1);

        if !cfg!(target_os = "linux") && n_threads != 1 {
            // TODO: check whether it works on macOS/FreeBSD and enable if it works.
            return Err(io::Error::other(
                "n_threads != 1 is only supported on Linux",
            ));
        }

        let Some(n_threads_minus_one) = n_threads.checked_sub(1) else {
            return Err(io::Error::other("n_threads"));
        };

        let mut filesystem = Arc::new(filesystem);

        let mut channels = Vec::with_capacity(n_threads);

        let n_threads_minus_one = if extra.is_empty() {
            n_threads_minus_one
        } else {
            channels.extend(extra);
            0
        };
        for _ in 0..n_threads_minus_one {
            if config.clone_fd {
                #[cfg(target_os = "linux")]
                {
                    channels.push(ch.clone_fd()?);
                    continue;
                }
                #[cfg(not(target_os = "linux"))]
                {
                    return Err(io::Error::other("clone_fd is only supported on Linux"));
                }
            } else {
                channels.push(ch.clone());
            }
        }
        channels.push(ch);
        if let Some(n) = dev_threads {
            // The connection's own descriptor is last: keep it.
            let keep = n.max(1).min(channels.len());
            let drop = channels.len() - keep;
            channels.drain(..drop);
        }

        let mut threads = Vec::with_capacity(n_threads + 1);
        if let Some(transport) = transport {
            let Some(first) = channels.first() else {
                return Err(io::Error::other("no FUSE device channel"));
            };
            let dispatcher = Dispatcher {
                el: Arc::new(SessionEventLoop {
                    thread_name: "fuser-transport".to_string(),
                    filesystem: filesystem.clone(),
                    ch: first.clone(),
                    allowed,
                    session_owner,
                    prefault_bytes: 0,
                    splice_write_min: 0,
                    splice_pipe_bytes: 0,
                    splice_always: false,
                }),
            };
            threads.push(
                thread::Builder::new()
                    .name("fuser-transport".to_string())
                    .spawn(move || transport(dispatcher))?,
            );
        }

        for (i, ch) in channels.into_iter().enumerate() {
            let thread_name = format!("fuser-{i}");
            let event_loop = SessionEventLoop {
                thread_name: thread_name.clone(),
                filesystem: filesystem.clone(),
                ch,
                allowed,
                session_owner,
                prefault_bytes: config.prefault_bytes,
                splice_write_min: config.splice_write_min,
                splice_pipe_bytes: config.splice_pipe_bytes,
                splice_always: config.splice_always,
            };
            threads.push(
                thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || event_loop.event_loop())?,
            );
        }

        let mut reply: io::Result<()> = Ok(());
        for thread in threads {
            let res = match thread.join() {
                Ok(res) => res,
                Err(_) => {
                    return Err(io::Error::other("event loop thread panicked"));
                }
            };
            if let Err(e) = res {
                if reply.is_ok() {
                    reply = Err(e);
                }
            }
        }

        let Some(filesystem) = Arc::get_mut(&mut filesystem) else {
            return Err(io::Error::other(
                "BUG: must have one refcount for filesystem",
            ));
        };

        filesystem.destroy();

        reply
    }

    fn handshake(&mut self) -> io::Result<()> {
        let mut buf = FuseReadBuf::new();
        let buf = buf.as_mut();

        loop {
            // Read the init request from the kernel
            let size = match self.ch.receive_retrying(buf) {
                Ok(size) => size,
                Err(nix::errno::Errno::ENODEV) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "FUSE device disconnected during handshake",
                    ));
                }
                Err(err) => return Err(err.into()),
            };

            // Parse the request
            let request = match ll::AnyRequest::try_from(&buf[..size]) {
                Ok(request) => request,
                Err(err) => {
                    error!("{err}");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, err.to_string()));
                }
            };

            // Extract the init operation
            let op = match request.operation() {
                Ok(op) => op,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Failed to parse FUSE operation",
                    ));
                }
            };

            let init = match op {
                ll::Operation::Init(init) => init,
                _ => {
                    error!("Received non-init FUSE operation before init: {}", request);
                    // Send error response and return error - non-init during handshake is invalid
                    <ReplyRaw as Reply>::new(
                        request.unique(),
                        ReplySender::Channel(self.ch.sender()),
                    )
                    .send_ll(&ResponseErrno(ll::Errno::EIO));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "Received non-init FUSE operation during handshake",
                    ));
                }
            };

            let v = init.version();
            if v.0 > abi::FUSE_KERNEL_VERSION {
                // Kernel has a newer major version than we support.
                // Send our version and wait for a second INIT request with a compatible version.
                debug!(
                    "INIT: Kernel version {} > our version {}, sending our version and waiting for next init",
                    v.0,
                    abi::FUSE_KERNEL_VERSION
                );
                let response = init.reply_version_only();
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&response);
                continue;
            }

            // We don't support ABI versions before 7.6
            if v < Version(7, 6) {
                error!("Unsupported FUSE ABI version {v}");
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(ll::Errno::EPROTO));
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("Unsupported FUSE ABI version {v}"),
                ));
            }

            let mut config = KernelConfig::new(init.capabilities(), init.max_readahead(), v);

            // Call filesystem init method and give it a chance to return an error
            let Some(filesystem) = &mut self.filesystem.fs else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Bug: filesystem must be initialized during handshake",
                ));
            };
            let res = filesystem.init(Request::ref_cast(request.header()), &mut config);
            if let Err(error) = res {
                let errno = Errno::from_i32(error.raw_os_error().unwrap_or(0));
                <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                    .send_ll(&ResponseErrno(errno));
                return Err(error);
            }

            // Remember the ABI version supported by kernel and mark the session initialized.
            self.proto_version = Some(v);

            // Log capability status for debugging
            for bit in 0..64 {
                let bitflags = InitFlags::from_bits_retain(1 << bit);
                if bitflags == InitFlags::FUSE_INIT_EXT {
                    continue;
                }
                let bitflag_is_known = InitFlags::all().contains(bitflags);
                let kernel_supports = init.capabilities().contains(bitflags);
                let we_requested = config.requested.contains(bitflags);
                // On macOS, there's a clash between linux and macOS constants,
                // so we pick macOS ones (last).
                let name = if let Some((name, _)) = bitflags.iter_names().last() {
                    Cow::Borrowed(name)
                } else {
                    Cow::Owned(format!("(1 << {bit})"))
                };
                if we_requested && kernel_supports {
                    debug!("capability {name} enabled")
                } else if we_requested {
                    debug!("capability {name} not supported by kernel")
                } else if kernel_supports {
                    debug!("capability {name} not requested by client")
                } else if bitflag_is_known {
                    debug!("capability {name} not supported nor requested")
                }
            }

            // Reply with our desired version and settings.
            debug!(
                "INIT response: ABI {}.{}, flags {:#x}, max readahead {}, max write {}",
                abi::FUSE_KERNEL_VERSION,
                abi::FUSE_KERNEL_MINOR_VERSION,
                init.capabilities() & config.requested,
                config.max_readahead,
                config.max_write
            );

            let response = init.reply(&config);
            <ReplyRaw as Reply>::new(request.unique(), ReplySender::Channel(self.ch.sender()))
                .send_ll(&response);

            return Ok(());
        }
    }

    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        self.mount.umount()
    }

    /// Returns a thread-safe object that can be used to unmount the Filesystem
    pub fn unmount_callable(&mut self) -> SessionUnmounter {
        SessionUnmounter {
            mount: self.mount.mount.clone(),
        }
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.ch.sender())
    }
}

#[derive(Debug)]
/// A thread-safe object that can be used to unmount a Filesystem
pub struct SessionUnmounter {
    mount: Arc<Mutex<Option<Mount>>>,
}

impl SessionUnmounter {
    /// Unmount the filesystem
    pub fn unmount(&mut self) -> io::Result<()> {
        if let Some(mount) = std::mem::take(&mut *self.mount.lock()) {
            mount.umount()?;
        }
        Ok(())
    }
}

pub(crate) struct SessionEventLoop<FS: Filesystem> {
    /// Cache thread name for faster `debug!`.
    pub(crate) thread_name: String,
    pub(crate) ch: Channel,
    pub(crate) filesystem: Arc<FilesystemHolder<FS>>,
    pub(crate) allowed: SessionACL,
    pub(crate) session_owner: Uid,
    /// vdrep patch: see [`crate::Config::prefault_bytes`].
    pub(crate) prefault_bytes: usize,
    /// vdrep patch: see [`crate::Config::splice_write_min`] (0: off).
    pub(crate) splice_write_min: usize,
    /// vdrep patch: see [`crate::Config::splice_pipe_bytes`].
    pub(crate) splice_pipe_bytes: usize,
    /// vdrep patch: see [`crate::Config::splice_always`].
    pub(crate) splice_always: bool,
}

/// vdrep patch: whether a read of the device that failed with `ECONNABORTED`
/// means the connection was aborted (fusectl `abort` with `FUSE_ABORT_ERROR`
/// negotiated), so the loop ends with that error, or only that a plain
/// unmount raced the read: the kernel (`fuse_dev_do_read`) also answers
/// `ECONNABORTED` when it had dequeued a request (an asynchronous `RELEASE`)
/// and the unmount's `fuse_abort_conn` ran before the request was queued for
/// its reply. Reading again tells them apart: the connection is already
/// marked disconnected, so the next read returns at once, `ENODEV` after an
/// unmount (the loop ends cleanly) and `ECONNABORTED` again after an abort.
/// A few tries cover requests dequeued while the abort is still under way.
fn ended_by_abort(aborted_reads: &mut u32) -> bool {
    const TRIES: u32 = 8;
    *aborted_reads += 1;
    *aborted_reads > TRIES
}

impl<FS: Filesystem> SessionEventLoop<FS> {
    fn event_loop(&self) -> io::Result<()> {
        // Buffer for receiving requests from the kernel. Only one is allocated and
        // it is reused immediately after dispatching to conserve memory and allocations.
        let mut buf = FuseReadBuf::new();
        buf.prefault(self.prefault_bytes);
        let buf = buf.as_mut();
        // vdrep patch: see `Config::splice_write_min` and src/splice.rs.
        let mut pipe = self.splice_pipe();
        let mut splicing = self.splice_always;
        // vdrep patch: `ECONNABORTED` reads so far (see `ended_by_abort`).
        let mut aborted_reads = 0u32;
        loop {
            if let (Some(p), true) = (&pipe, splicing) {
                let n = match p.receive(self.ch.as_fd(), buf.len()) {
                    Ok(n) => n,
                    Err(NixErrno::ENOENT | NixErrno::EINTR | NixErrno::EAGAIN) => continue,
                    Err(NixErrno::ENODEV) => return Ok(()),
                    Err(NixErrno::ECONNABORTED) if !ended_by_abort(&mut aborted_reads) => continue,
                    Err(err @ (NixErrno::EIO | NixErrno::ENOMEM | NixErrno::EINVAL)) => {
                        // The pipe could not take a request (the kernel
                        // answered that one itself): a fresh pipe, and
                        // read(2) for the next request.
                        warn!("{}: splicing a request: {err}; using a new pipe", self.thread_name);
                        pipe = self.splice_pipe();
                        splicing = false;
                        continue;
                    }
                    Err(err) => return Err(err.into()),
                };
                match self.serve_spliced(p, buf, n)? {
                    Served::Destroy => return Ok(()),
                    Served::LargeWrite => {}
                    Served::Other => splicing = self.splice_always,
                }
                if p.is_broken() {
                    warn!("{}: the splice pipe lost track of its contents; using a new one", self.thread_name);
                    pipe = self.splice_pipe();
                }
                continue;
            }
            // Read the next request from the given channel to kernel driver
            // The kernel driver makes sure that we get exactly one request per read
            match self.ch.receive_retrying(buf) {
                Ok(size) => {
                    let request = &buf[..size];
                    if pipe.is_some() && self.large_write_len(request, size).is_some() {
                        // More are likely to follow (write-back, a big copy).
                        splicing = true;
                    }
                    if let Served::Destroy = self.serve(request)? {
                        return Ok(());
                    }
                }
                Err(nix::errno::Errno::ENODEV) => return Ok(()),
                Err(nix::errno::Errno::ECONNABORTED) if !ended_by_abort(&mut aborted_reads) => {
                    continue
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Decode and run one request received whole.
    fn serve(&self, request: &[u8]) -> io::Result<Served> {
        match RequestWithSender::new(self.ch.sender(), request) {
            // Dispatch request
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                    Ok(Served::Destroy)
                } else {
                    req.dispatch(self);
                    Ok(Served::Other)
                }
            }
            // Quit loop on illegal request
            None => Err(io::Error::new(io::ErrorKind::InvalidData, "Invalid request")),
        }
    }

    /// vdrep patch: the pipe of this event loop, or none when splicing is
    /// off or the pipe cannot be sized (logged once per thread).
    fn splice_pipe(&self) -> Option<SplicePipe> {
        if self.splice_write_min == 0 {
            return None;
        }
        match SplicePipe::new(self.splice_pipe_bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!("{}: large writes are copied, not spliced: {e}", self.thread_name);
                None
            }
        }
    }

    /// vdrep patch: the data length of `request` (whose whole length is
    /// `total`: it may hold only the first bytes) if it is a WRITE of at
    /// least `splice_write_min` bytes whose data follows its 80-byte header
    /// directly.
    fn large_write_len(&self, request: &[u8], total: usize) -> Option<usize> {
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(request.get(at..at + 4)?.try_into().ok()?))
        };
        let len = word(0)? as usize;
        let opcode = word(4)?;
        let total_extlen = word(36)? & 0xffff;
        let size = word(56)? as usize;
        (opcode == abi::fuse_opcode::FUSE_WRITE as u32
            && total_extlen == 0
            && len == total
            && size.checked_add(WRITE_HEADER) == Some(total)
            && size >= self.splice_write_min)
            .then_some(size)
    }

    /// vdrep patch: serve the request of `n` bytes just spliced into `p`
    /// (empty before). A large WRITE goes to `Filesystem::write_pipe` with
    /// its data left in the pipe; anything else is read out and served as
    /// by `read(2)`.
    fn serve_spliced(&self, p: &SplicePipe, buf: &mut [u8], n: usize) -> io::Result<Served> {
        let head = n.min(WRITE_HEADER);
        if n > buf.len() {
            // Cannot happen: the splice asked for at most buf.len() bytes.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request larger than the buffer"));
        }
        // Failing here, the request cannot be answered (its id is unread):
        // the loop ends and the connection's other loops go on.
        p.read_exact(&mut buf[..head])?;
        if let Some(size) = self.large_write_len(&buf[..head], n) {
            // A header-only view of the request: its length and data size
            // say "no data", so the common decoder accepts it; the data is
            // the payload in the pipe.
            buf[0..4].copy_from_slice(&(WRITE_HEADER as u32).to_ne_bytes());
            buf[56..60].copy_from_slice(&0u32.to_ne_bytes());
            let payload = WritePayload::new(p, size);
            match RequestWithSender::new(self.ch.sender(), &buf[..WRITE_HEADER]) {
                Some(req) => req.dispatch_write_pipe(self, payload),
                None => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "Invalid request"));
                }
            }
            return Ok(Served::LargeWrite);
        }
        if n > head {
            if let Err(e) = p.read_exact(&mut buf[head..n]) {
                // The header is known: answer the request instead of leaving
                // it without one.
                if head >= std::mem::size_of::<abi::fuse_in_header>() {
                    let unique = u64::from_ne_bytes(buf[8..16].try_into().map_err(io::Error::other)?);
                    crate::request::reply_errno(self.ch.sender(), unique, Errno::EIO);
                }
                warn!("{}: reading a spliced request: {e}", self.thread_name);
                return Ok(Served::Other);
            }
        }
        self.serve(&buf[..n])
    }
}

/// What an event loop did with one request (vdrep patch).
enum Served {
    /// A WRITE served from the splice pipe.
    LargeWrite,
    /// Any other request.
    Other,
    /// `FUSE_DESTROY`: the connection is ending.
    Destroy,
}

/// vdrep patch: runs requests that arrive by another transport than
/// `read(2)` on the device ([`Session::run_with`]) through the same
/// decoding, access check and [`Filesystem`] calls as the device loop.
pub struct Dispatcher<FS: Filesystem> {
    el: Arc<SessionEventLoop<FS>>,
}

impl<FS: Filesystem> Clone for Dispatcher<FS> {
    fn clone(&self) -> Self {
        Dispatcher {
            el: self.el.clone(),
        }
    }
}

impl<FS: Filesystem> std::fmt::Debug for Dispatcher<FS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// What [`Dispatcher::dispatch`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// Decoded and run; its reply (if the operation has one) went to the sink.
    Served,
    /// `FUSE_DESTROY`: answered; the connection is ending.
    Destroy,
    /// The bytes are not a request (nothing was answered).
    Invalid,
}

impl<FS: Filesystem> Dispatcher<FS> {
    /// Decode `request` (the `/dev/fuse` layout: `fuse_in_header`, then the
    /// arguments) and run it; the reply goes to `sink` (synchronously for
    /// every reply made before the filesystem method returns).
    pub fn dispatch(&self, request: &[u8], sink: Arc<dyn ReplySink>) -> Dispatched {
        match RequestWithSender::new(self.el.ch.sender_to(sink), request) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                    Dispatched::Destroy
                } else {
                    req.dispatch(&self.el);
                    Dispatched::Served
                }
            }
            None => Dispatched::Invalid,
        }
    }
}

/// The background session data structure
#[derive(Debug)]
pub struct BackgroundSession {
    /// Thread guard of the background session
    pub guard: JoinHandle<io::Result<()>>,
    /// Object for creating Notifiers for client use
    sender: ChannelSender,
    /// Ensures the filesystem is unmounted when the session ends
    mount: Option<Mount>,
}

impl BackgroundSession {
    /// Unmount the filesystem and join the background thread.
    pub fn umount_and_join(mut self) -> io::Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.umount()?;
        }
        self.join()
    }

    /// Returns an object that can be used to send notifications to the kernel
    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.sender.clone())
    }

    /// Join the filesystem thread.
    pub fn join(self) -> io::Result<()> {
        self.guard
            .join()
            .map_err(|_panic: Box<dyn std::any::Any + Send>| {
                io::Error::new(
                    io::ErrorKind::Other,
                    "filesystem background thread panicked",
                )
            })?
    }
}
