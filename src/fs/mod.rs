//! The FUSE passthrough file system mounted over a VM disk folder.
//!
//! This module owns everything between `/dev/fuse` and the backing folder:
//! opening the folder before mounting over it ([`mount`]), the inode table
//! (`inode`), open file/directory handles (`handle`), fd-relative system
//! calls (`sys`) and the request handlers (`ops`). Every write, truncate and
//! fallocate that reaches a regular file goes through the disk returned by
//! [`Tracker::attach`], so the tracking module sees every change.
//!
//! Nothing below the mountpoint is ever reached by path (that would re-enter
//! this mount): all access is relative to per-inode `O_PATH` descriptors or
//! through `/proc/self/fd/N`.
//!
//! A mount run by a supervisor ([`crate::fuse::supervisor`]) is served by
//! [`serve_handed_over`]: the worker gets the connection's descriptors, and
//! the node journal (`journal`) lets a successor worker rebuild the inode
//! and handle tables the kernel still refers to.

mod handle;
mod inode;
mod journal;
mod ops;

pub use journal::{JournalError, JOURNAL_BYTES};

use crate::sys;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::fuse::{uring, FuseTransport};
use crate::tracking::{TrackedDisk, Tracker, STATE_DIR};

use handle::Handles;
use inode::InodeTable;

/// Mount-time options of the passthrough file system.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FsOptions {
    /// FUSE worker threads (each with its own cloned `/dev/fuse` fd).
    pub n_threads: usize,
    /// Let the kernel cache writes (`FUSE_WRITEBACK_CACHE`).
    pub writeback_cache: bool,
    /// Largest single WRITE request, in bytes (at most 1 MiB: the kernel's
    /// default `fs.fuse.max_pages_limit` of 256 pages).
    pub max_write: u32,
    /// Mount with `allow_other` (VMs run as other users).
    pub allow_other: bool,
    /// `fsname=` shown in the mount table.
    pub fsname: String,
    /// How requests travel (`FUSE_OVER_IO_URING` is asked for in INIT
    /// with `Uring`).
    #[serde(default)]
    pub fuse_transport: crate::fuse::FuseTransport,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            n_threads: 4,
            writeback_cache: true,
            max_write: DEFAULT_MAX_WRITE,
            allow_other: true,
            fsname: "vdrep".to_string(),
            fuse_transport: crate::fuse::FuseTransport::Dev,
        }
    }
}

/// [`FsOptions::max_write`]'s default: 1 MiB (the kernel's default limit).
/// 512 KiB (`VDREP_FUSE_MAX_WRITE=524288`) makes the kernel split a 1 MiB
/// O_DIRECT write in two requests sent together (1.25-1.5x MB/s at QD4)
/// but made buffered 1 MiB writes 15 % slower in 2 of 3 runs; 4 MiB
/// (raising `max_pages_limit`) halved them (kernel-notes/writepath.md,
/// session 12).
pub const DEFAULT_MAX_WRITE: u32 = 1 << 20;

/// The `max_write` of a mount whose daemon may not make the 2 MiB pipe a
/// spliced 1 MiB WRITE needs (root without `CAP_SYS_RESOURCE` and the
/// default `fs.pipe-max-size` of 1 MiB): 512 KiB WRITEs fit a 1 MiB pipe,
/// and splicing them measured faster than copying 1 MiB ones (buffered
/// 1 MiB writes 1.06x MB/s at 0.66x daemon CPU per MiB, 1 MiB O_DIRECT
/// QD4 1.05x MB/s at 1.4x; kernel-notes/writepath.md, session 14).
pub const SPLICE_FALLBACK_MAX_WRITE: u32 = 512 << 10;

/// The `max_write` of a mount that sets none ([`FsOptions::max_write`]):
/// [`DEFAULT_MAX_WRITE`] where this process may make the pipes that
/// splicing it takes (or splicing is off), else
/// [`SPLICE_FALLBACK_MAX_WRITE`] if that one's pipes are allowed.
pub fn default_max_write() -> u32 {
    let (min, _) = splice_setting(std::env::var("VDREP_FUSE_SPLICE").ok().as_deref());
    choose_max_write(min, |bytes| sys::sized_pipe(bytes).is_ok())
}

/// [`default_max_write`] for a splice threshold `splice_min` (0 = off) and
/// a probe saying whether a pipe of so many bytes may be made.
fn choose_max_write(splice_min: usize, pipe_ok: impl Fn(usize) -> bool) -> u32 {
    if splice_min == 0 || pipe_ok(splice_pipe_bytes(DEFAULT_MAX_WRITE)) {
        DEFAULT_MAX_WRITE
    } else if pipe_ok(splice_pipe_bytes(SPLICE_FALLBACK_MAX_WRITE)) {
        SPLICE_FALLBACK_MAX_WRITE
    } else {
        DEFAULT_MAX_WRITE
    }
}

/// The passthrough file system (implements [`fuser::Filesystem`]).
pub struct VdrepFs {
    inodes: InodeTable,
    handles: Handles,
    tracker: Option<Arc<Tracker>>,
    /// Real path of the backing root folder, to compute tracker paths.
    root_path: PathBuf,
    opts: FsOptions,
    entry_ttl: Duration,
    attr_ttl: Duration,
    /// `FUSE_OVER_IO_URING` was asked for and granted in INIT.
    uring_granted: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for VdrepFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdrepFs")
            .field("root_path", &self.root_path)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl VdrepFs {
    /// A file system serving the folder behind `root_fd` (an `O_PATH` or
    /// ordinary descriptor of a directory, opened before mounting). With
    /// `tracker == None` nothing is tracked (tests, plain passthrough).
    pub fn new(
        root_fd: OwnedFd,
        tracker: Option<Arc<Tracker>>,
        opts: &FsOptions,
    ) -> io::Result<Self> {
        let st = sys::fstat(root_fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let root_path = sys::fd_path(root_fd.as_raw_fd())?;
        // ~1 s: the kernel owns size/mtime under the writeback cache, and
        // nothing but this mount changes the backing files.
        let (entry_ttl, attr_ttl) = (Duration::from_secs(1), Duration::from_secs(1));
        Ok(VdrepFs {
            inodes: InodeTable::new(root_fd, &st),
            handles: Handles::new(),
            tracker,
            root_path,
            opts: opts.clone(),
            entry_ttl,
            attr_ttl,
            uring_granted: Arc::default(),
        })
    }

    /// Number of inodes the kernel currently references (root included).
    #[doc(hidden)]
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Number of open file handles.
    #[doc(hidden)]
    pub fn open_file_count(&self) -> usize {
        self.handles.open_files()
    }

    /// Path of the object behind `fd` relative to the mount root, or `None`
    /// if it is outside the root or deleted.
    fn rel_path(&self, fd: i32) -> Option<PathBuf> {
        let p = sys::fd_path(fd).ok()?;
        if p.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        p.strip_prefix(&self.root_path).ok().map(Path::to_path_buf)
    }

    /// Path of `name` in the directory behind `dir_fd`, relative to the root.
    fn rel_child(&self, dir_fd: i32, name: &std::ffi::OsStr) -> Option<PathBuf> {
        self.rel_path(dir_fd).map(|p| p.join(name))
    }

    fn is_state_path(rel: &Path) -> bool {
        rel.components()
            .next()
            .is_some_and(|c| c.as_os_str() == STATE_DIR)
    }

    /// Attach the regular file behind `inode_fd` (open as `file`) to the
    /// tracker, unless untracked or under the state folder.
    fn attach(&self, inode_fd: i32, file: &std::fs::File) -> io::Result<Option<Arc<TrackedDisk>>> {
        if self.tracker.is_none() {
            return Ok(None);
        }
        self.attach_rel(self.rel_path(inode_fd).as_deref(), file)
    }

    /// [`attach`](Self::attach) with the relative path already known.
    fn attach_rel(
        &self,
        rel: Option<&Path>,
        file: &std::fs::File,
    ) -> io::Result<Option<Arc<TrackedDisk>>> {
        let Some(tracker) = &self.tracker else {
            return Ok(None);
        };
        let Some(rel) = rel else {
            // A disk moved into a store by a failover, still reachable
            // through a cached entry: it must not change behind vdrep.
            if tracker.is_released(file) {
                return Err(io::Error::from_raw_os_error(libc::EROFS));
            }
            return Ok(None);
        };
        if rel.as_os_str().is_empty() || Self::is_state_path(rel) {
            return Ok(None);
        }
        tracker.attach(rel, file)
    }
}

/// Workers added to `FsOptions::n_threads`: `O_DIRECT` requests are served
/// on the worker that read them and block on the device, so without extra
/// workers the device queue depth would be capped at `n_threads`. A separate
/// pool fed by the workers cost a thread hand-off per request (strace -c:
/// ~3 futex + ~3 sched_yield per 4 KiB read with a crossbeam channel, ~2.6
/// futex with a mutex/condvar queue) and reached about half the IOPS; see
/// kernel-notes/writepath.md.
pub const DIRECT_IO_WORKERS: usize = 16;

/// The `fuser` session configuration for `opts`.
fn session_config(opts: &FsOptions) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("vdrep".to_string()),
        MountOption::DefaultPermissions,
    ];
    c.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c.n_threads = Some(opts.n_threads.max(1) + DIRECT_IO_WORKERS);
    c.clone_fd = true;
    // Every request buffer mapped up front: a kill -9 of the worker while
    // the kernel copies a request into a page not yet faulted in ends that
    // request with EIO instead of leaving it for the next worker
    // (kernel-notes/fuse-connection.md). Costs max_write of memory per thread.
    // VDREP_FUSE_PREFAULT=0 turns it off (to measure the difference).
    c.prefault_bytes = if std::env::var_os("VDREP_FUSE_PREFAULT").is_some_and(|v| v == "0") {
        0
    } else {
        opts.max_write.max(4096) as usize
    };
    let (min, always) = splice_setting(std::env::var("VDREP_FUSE_SPLICE").ok().as_deref());
    // A slot per page of the largest WRITE plus one for its header page,
    // rounded up to a power of two by the kernel (vendor/fuser splice.rs).
    let pipe = splice_pipe_bytes(opts.max_write);
    c.splice_write_min = if min > 0 && splice_pipe_possible(pipe) {
        min
    } else {
        0
    };
    c.splice_always = always;
    c.splice_pipe_bytes = pipe;
    if c.splice_write_min > 0 {
        tracing::info!(
            "WRITEs of {} bytes or more are spliced (max_write {}, pipes of {pipe} bytes)",
            c.splice_write_min,
            opts.max_write
        );
    }
    c
}

/// Bytes of the splice pipe a WRITE of up to `max_write` bytes needs.
pub fn splice_pipe_bytes(max_write: u32) -> usize {
    (max_write.max(4096) as usize + 4096).next_power_of_two()
}

/// Whether this process may make pipes of `bytes` (above
/// `fs.pipe-max-size`, 1 MiB by default, that takes `CAP_SYS_RESOURCE`).
/// When not, large writes are copied as before and the log says why and
/// what to change (once per process).
fn splice_pipe_possible(bytes: usize) -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    match sys::sized_pipe(bytes) {
        Ok(_) => true,
        Err(e) => {
            SAID.call_once(|| {
                tracing::warn!(
                    "large writes are copied through the daemon, not spliced: a {bytes}-byte \
                     pipe is refused ({e}); allow it with `sysctl fs.pipe-max-size={bytes}` or \
                     CAP_SYS_RESOURCE for the daemon, or use a max_write of at most half the \
                     current fs.pipe-max-size (VDREP_FUSE_MAX_WRITE)"
                )
            });
            false
        }
    }
}

/// WRITEs of at least this many bytes are received with `splice(2)` and
/// written from the pipe (one copy of their data in the daemon instead of
/// two, no pinning of a request buffer; kernel-notes/writepath.md, session
/// 13). Smaller requests keep `read(2)`: splicing costs them a system call.
pub const SPLICE_WRITE_MIN: usize = 64 << 10;

/// `VDREP_FUSE_SPLICE`: unset = [`SPLICE_WRITE_MIN`]; `0`/`off` = never;
/// `always` = splice every request (for measurements); a number = that
/// many bytes. Returns (minimum WRITE size, splice every request). An
/// unreadable value keeps the default, with a warning.
fn splice_setting(v: Option<&str>) -> (usize, bool) {
    match v.map(str::trim) {
        None | Some("") => (SPLICE_WRITE_MIN, false),
        Some("0") | Some("off") => (0, false),
        Some("always") => (SPLICE_WRITE_MIN, true),
        Some(n) => match n.parse::<usize>() {
            Ok(b) => (b.max(4096), false),
            Err(_) => {
                tracing::warn!(
                    "VDREP_FUSE_SPLICE={n:?} is not 0, off, always or a byte count: \
                     splicing writes of {SPLICE_WRITE_MIN} bytes or more"
                );
                (SPLICE_WRITE_MIN, false)
            }
        },
    }
}

fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Open `dir` (`O_PATH | O_DIRECTORY`, before mounting), then mount the FS
/// over `dir` itself. The caller runs the returned session (`run`/`spawn`).
pub fn mount(dir: &Path, tracker: Arc<Tracker>, opts: &FsOptions) -> io::Result<Session<VdrepFs>> {
    mount_inner(dir, Some(tracker), opts)
}

/// Like [`mount`] without a tracker: a plain passthrough (for tests).
#[doc(hidden)]
pub fn mount_untracked(dir: &Path, opts: &FsOptions) -> io::Result<Session<VdrepFs>> {
    mount_inner(dir, None, opts)
}

/// The descriptors a worker serves, handed over by its supervisor.
#[derive(Debug)]
pub struct HandedOver {
    /// The backing folder, opened before the mount.
    pub root: OwnedFd,
    /// The node journal's memfd ([`JOURNAL_BYTES`] long).
    pub journal: OwnedFd,
    /// The connection's device descriptor, then its clones.
    pub devs: Vec<OwnedFd>,
    /// `FUSE_INIT` was answered by an earlier worker.
    pub initialized: bool,
}

/// What [`serve_handed_over`] put back from the journal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub inodes: usize,
    pub files: usize,
    pub dirs: usize,
    /// Inodes or handles that could not be reopened (deleted meanwhile):
    /// the kernel's requests on them get `ESTALE`/`EBADF`.
    pub lost: usize,
}

/// A session over handed-over descriptors: the tables of the previous
/// worker (if any) are rebuilt from the journal first, and every open
/// tracked disk is attached to `tracker` again. With `h.initialized ==
/// false` the session answers `FUSE_INIT` before returning.
///
/// With [`FuseTransport::Uring`] granted in INIT, `before_rings` runs just
/// before the first ring is registered (from then on a dead worker would
/// leave requests on its rings: the caller tells the supervisor).
pub fn serve_handed_over(
    h: HandedOver,
    tracker: Option<Arc<Tracker>>,
    opts: &FsOptions,
    before_rings: impl FnOnce(),
) -> Result<(Serving, Restored), HandoverError> {
    let (journal, tables) = journal::Journal::map(h.journal)?;
    let mut fs = VdrepFs::new(h.root, tracker, opts).map_err(HandoverError::Root)?;
    let restored = fs.restore(&tables);
    let journal = Arc::new(journal);
    fs.inodes.set_journal(journal.clone());
    fs.handles.set_journal(journal);
    let mut config = session_config(opts);
    config.n_threads = Some(h.devs.len().max(1));
    config.clone_fd = false;
    let acl = config.acl;
    let granted = fs.uring_granted.clone();
    let session = Session::from_fds(fs, h.devs, acl, config, h.initialized)
        .map_err(HandoverError::Session)?;
    let rings = rings_for(&session, &granted, opts, before_rings);
    Ok((Serving { session, rings }, restored))
}

/// The io_uring rings of a session whose INIT granted `FUSE_OVER_IO_URING`
/// (asked for with [`FuseTransport::Uring`]); `None` (one log line says
/// why) serves `/dev/fuse` only.
fn rings_for(
    session: &Session<VdrepFs>,
    granted: &std::sync::atomic::AtomicBool,
    opts: &FsOptions,
    before: impl FnOnce(),
) -> Option<uring::Rings> {
    use std::os::fd::AsFd;
    if opts.fuse_transport != FuseTransport::Uring {
        return None;
    }
    if !granted.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!(
            "FUSE over io_uring: not offered on this connection (the kernel's INIT had no FUSE_OVER_IO_URING, or an earlier worker answered INIT); serving through /dev/fuse"
        );
        return None;
    }
    // Every queue as deep as the /dev/fuse transport: one process's
    // requests all go to its CPU's queue.
    let per_queue = opts.n_threads.max(1) + DIRECT_IO_WORKERS;
    let payload = (opts.max_write.max(4096) as usize).max(1 << 20);
    before();
    match uring::register(session.as_fd(), per_queue, payload) {
        Ok(r) => {
            tracing::info!(
                "FUSE over io_uring: {} rings of {} entries on {} queues",
                r.len(),
                uring::entries_per_ring(),
                uring::queues()
            );
            Some(r)
        }
        Err(e) => {
            tracing::warn!(
                "FUSE over io_uring: {e}; serving through /dev/fuse (still without a worker handover: some rings may have registered)"
            );
            None
        }
    }
}

/// A worker's session with its transport chosen ([`serve_handed_over`]).
pub struct Serving {
    session: Session<VdrepFs>,
    rings: Option<uring::Rings>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("rings", &self.rings)
            .finish_non_exhaustive()
    }
}

/// `/dev/fuse` reader threads kept beside the rings: FORGET and INTERRUPT
/// (and requests before every queue has an entry) still come that way.
const DEV_THREADS_WITH_RINGS: usize = 2;

impl Serving {
    /// Requests come through io_uring rings owned by this process: the
    /// connection cannot be handed to another worker.
    pub fn uring(&self) -> bool {
        self.rings.is_some()
    }

    /// Serve until the connection ends.
    pub fn run(self) -> io::Result<()> {
        match self.rings {
            None => self.session.run(),
            Some(rings) => self
                .session
                .run_with(Some(DEV_THREADS_WITH_RINGS), Some(move |d| rings.serve(d))),
        }
    }
}

impl std::os::fd::AsFd for Serving {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.session.as_fd()
    }
}

/// Why a worker could not serve its handed-over connection.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("the backing folder: {0}")]
    Root(#[source] io::Error),
    #[error("the FUSE session: {0}")]
    Session(#[source] io::Error),
}

/// The kinds of [`HandoverError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverErrorKind {
    Journal,
    Root,
    Session,
}

impl HandoverError {
    pub fn kind(&self) -> HandoverErrorKind {
        match self {
            HandoverError::Journal(_) => HandoverErrorKind::Journal,
            HandoverError::Root(_) => HandoverErrorKind::Root,
            HandoverError::Session(_) => HandoverErrorKind::Session,
        }
    }
}

impl VdrepFs {
    /// Rebuild the tables a previous worker recorded in the journal.
    fn restore(&self, t: &journal::Tables) -> Restored {
        let mut r = Restored::default();
        let root = self.inodes.get(inode::ROOT_INO);
        let Some(root) = root else {
            return r;
        };
        // open_by_handle_at refuses an O_PATH descriptor as its mount_fd.
        let mount_fd = match sys::reopen(root.raw(), libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("handover: cannot open the backing folder: {e}");
                r.lost = t.nodes.len() + t.files.len();
                return r;
            }
        };
        for (&ino, n) in &t.nodes {
            let fd = match n
                .handle
                .open(mount_fd.as_raw_fd(), libc::O_PATH | libc::O_NOFOLLOW)
            {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!("handover: inode {ino} cannot be reopened: {e}");
                    r.lost += 1;
                    continue;
                }
            };
            match sys::fstat(fd.as_raw_fd()) {
                Ok(st) => {
                    self.inodes.restore(ino, fd, &st, n.nlookup);
                    r.inodes += 1;
                }
                Err(_) => r.lost += 1,
            }
        }
        for (&fh, &(ino, flags)) in &t.files {
            match self.reopen_handle(ino, flags) {
                Ok(f) => {
                    self.handles.restore_file(fh, f);
                    r.files += 1;
                }
                Err(e) => {
                    tracing::warn!("handover: file handle {fh} (inode {ino}) is lost: {e}");
                    r.lost += 1;
                }
            }
        }
        for (&fh, &ino) in &t.dirs {
            self.handles.restore_dir(
                fh,
                handle::OpenDir {
                    ino,
                    entries: parking_lot::Mutex::new(None),
                },
            );
            r.dirs += 1;
        }
        r
    }

    /// Open inode `ino` again as an earlier worker had (`flags` are the
    /// backing descriptor's), attached to the tracker as `open` does.
    fn reopen_handle(&self, ino: u64, flags: i32) -> io::Result<handle::OpenFile> {
        let inode = self
            .inodes
            .get(ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let file = sys::reopen(inode.raw(), flags)?;
        let disk = self.disk_for_open(&inode, &file, flags)?;
        Ok(handle::OpenFile::new(ino, file, flags, disk))
    }
}

/// Whether `dir` is already the top of a mount of ours (same `fsname`).
/// Mounting again would stack the FS on itself (double tracking, and
/// unmounting by path would hit the wrong layer).
fn already_mounted(dir: &Path, fsname: &str) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy();
    mi.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            return false;
        };
        f.get(4) == Some(&want.as_ref())
            && f.get(sep + 1).is_some_and(|t| t.starts_with("fuse"))
            && f.get(sep + 2) == Some(&fsname)
    })
}

/// `Err(ResourceBusy)` if `dir` is already the top of a mount of ours.
pub fn check_not_mounted(dir: &Path, fsname: &str) -> io::Result<()> {
    if already_mounted(dir, fsname) {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{} is already a {} mount", dir.display(), fsname),
        ));
    }
    Ok(())
}

fn mount_inner(
    dir: &Path,
    tracker: Option<Arc<Tracker>>,
    opts: &FsOptions,
) -> io::Result<Session<VdrepFs>> {
    check_not_mounted(dir, &opts.fsname)?;
    let root = open_root(dir)?;
    let fs = VdrepFs::new(root, tracker, opts)?;
    Session::new(fs, dir, &session_config(opts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn fs_over(dir: &Path) -> VdrepFs {
        let root = open_root(dir).expect("open root");
        VdrepFs::new(root, None, &FsOptions::default()).expect("new")
    }

    #[test]
    fn max_write_falls_back_to_what_a_splice_pipe_allows() {
        let allowed = |max: usize| move |bytes: usize| bytes <= max;
        // A 2 MiB pipe allowed (CAP_SYS_RESOURCE or a raised sysctl): 1 MiB.
        assert_eq!(
            choose_max_write(SPLICE_WRITE_MIN, allowed(2 << 20)),
            1 << 20
        );
        // Only the default 1 MiB pipes: 512 KiB WRITEs, which fit them.
        assert_eq!(
            choose_max_write(SPLICE_WRITE_MIN, allowed(1 << 20)),
            512 << 10
        );
        // Splicing off: the pipes do not matter.
        assert_eq!(choose_max_write(0, allowed(1 << 20)), 1 << 20);
        // Not even a 1 MiB pipe: copy, at the default size.
        assert_eq!(
            choose_max_write(SPLICE_WRITE_MIN, allowed(512 << 10)),
            1 << 20
        );
        // The pipe sizes asked for are the ones a WRITE of that size needs.
        assert_eq!(splice_pipe_bytes(1 << 20), 2 << 20);
        assert_eq!(splice_pipe_bytes(512 << 10), 1 << 20);
    }

    #[test]
    fn rel_paths_follow_renames_and_skip_state_dir() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("vm1")).expect("mkdir");
        std::fs::write(d.path().join("vm1/disk.vhd"), b"x").expect("write");
        let fs = fs_over(d.path());
        let root = fs.inodes.get(inode::ROOT_INO).expect("root");
        let vm1 = fs.do_lookup(&root, OsStr::new("vm1")).expect("lookup");
        let vm1 = fs.inodes.get(vm1.ino.0).expect("vm1 inode");
        let disk = fs
            .do_lookup(&vm1, OsStr::new("disk.vhd"))
            .expect("lookup disk");
        let disk = fs.inodes.get(disk.ino.0).expect("disk inode");
        assert_eq!(
            fs.rel_path(disk.raw()).as_deref(),
            Some(Path::new("vm1/disk.vhd"))
        );
        assert_eq!(fs.rel_path(root.raw()).as_deref(), Some(Path::new("")));
        std::fs::rename(d.path().join("vm1"), d.path().join("vm2")).expect("rename");
        assert_eq!(
            fs.rel_path(disk.raw()).as_deref(),
            Some(Path::new("vm2/disk.vhd"))
        );
        assert_eq!(
            fs.rel_child(vm1.raw(), OsStr::new("new.img")).as_deref(),
            Some(Path::new("vm2/new.img"))
        );
        assert!(VdrepFs::is_state_path(Path::new(".vdrep/state.json")));
        assert!(!VdrepFs::is_state_path(Path::new("vm/.vdrep")));
        std::fs::remove_file(d.path().join("vm2/disk.vhd")).expect("unlink");
        assert_eq!(fs.rel_path(disk.raw()), None, "deleted files have no path");
    }

    #[test]
    fn hard_links_share_an_inode_and_forget_frees_it() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("a"), b"x").expect("write");
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).expect("link");
        let fs = fs_over(d.path());
        let root = fs.inodes.get(inode::ROOT_INO).expect("root");
        let a = fs.do_lookup(&root, OsStr::new("a")).expect("a");
        let b = fs.do_lookup(&root, OsStr::new("b")).expect("b");
        assert_eq!(a.ino, b.ino);
        assert_eq!(fs.inode_count(), 2);
        fs.inodes.forget(a.ino.0, 1);
        assert!(fs.inodes.get(a.ino.0).is_some(), "one lookup left");
        fs.inodes.forget(a.ino.0, 1);
        assert!(fs.inodes.get(a.ino.0).is_none());
        assert_eq!(fs.inode_count(), 1);
        fs.inodes.forget(inode::ROOT_INO, 1_000);
        assert!(
            fs.inodes.get(inode::ROOT_INO).is_some(),
            "root is never forgotten"
        );
        // A new lookup gets a fresh, never reused number.
        let a2 = fs.do_lookup(&root, OsStr::new("a")).expect("a again");
        assert!(a2.ino.0 > a.ino.0);
    }
}
