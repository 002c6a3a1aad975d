//! `fuse_floor`: the smallest FUSE server that serves a folder's files, to
//! measure what FUSE itself costs on a host, apart from anything vdrep does
//! (issue 12's write-path targets). `scripts/bench-writepath.sh` runs it as
//! the targets `fuse-min` and `fuse-passthrough`.
//!
//! ```text
//! cargo run --release --example fuse_floor -- DIR [--threads N] [--passthrough]
//! ```
//! Mounts a FUSE file system over `DIR` (like `vdrep mount`: the folder is
//! opened first and served from under the mount) with `DIR`'s regular files
//! at its top level, and serves until unmounted (`fusermount3 -u DIR` or
//! `umount DIR`). No tracking, no metrics, no locks on the data path.
//!
//! - default: every READ and WRITE is a `pread`/`pwrite` on the backing file
//!   in the worker that received it, with vdrep's mount choices: the same
//!   INIT capabilities and limits, `N` workers each with its own cloned
//!   `/dev/fuse` descriptor (default 20, vdrep's 4 + 16 direct-I/O workers),
//!   `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES` for `O_DIRECT` opens,
//!   the write-back cache and `FOPEN_KEEP_CACHE` for the others.
//! - `--passthrough`: opens reply `FOPEN_PASSTHROUGH` with a backing id for
//!   the backing file (`FUSE_PASSTHROUGH`, Linux 6.9+): the kernel serves
//!   reads and writes itself and the server never sees them, so nothing
//!   could track them. The kernel refuses passthrough with the write-back
//!   cache, so that mode runs without it.
//!
//! Prints `mounted DIR pid PID` on stdout once the session is set up, and
//! at unmount how many READs and WRITEs it served (none with passthrough:
//! the proof the kernel served them).

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, SessionACL,
    WriteFlags,
};
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

struct Args {
    dir: PathBuf,
    threads: usize,
    passthrough: bool,
}

fn usage() -> ! {
    eprintln!("usage: fuse_floor DIR [--threads N] [--passthrough]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        dir: PathBuf::new(),
        threads: 20,
        passthrough: false,
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--threads" => {
                a.threads = match it.next().and_then(|v| v.parse().ok()) {
                    Some(n) if n > 0 => n,
                    _ => usage(),
                }
            }
            "--passthrough" => a.passthrough = true,
            s if !s.starts_with('-') && a.dir.as_os_str().is_empty() => a.dir = PathBuf::from(s),
            _ => usage(),
        }
    }
    if a.dir.as_os_str().is_empty() {
        usage()
    }
    a
}

/// One open of a backing file; in passthrough mode the inode's backing id.
struct Open {
    file: File,
    ino: u64,
}

/// An inode's backing id and how many opens share it (the kernel wants
/// one backing file per inode while any open uses passthrough).
struct Backing {
    id: Arc<BackingId>,
    opens: usize,
}

struct Floor {
    /// The served folder, opened before the mount hid it.
    dir: OwnedFd,
    /// Top-level regular files: inode number (index + 2) → name.
    names: Vec<CString>,
    passthrough: bool,
    opens: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    backing: Mutex<HashMap<u64, Backing>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn systime(s: i64, ns: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec),
        mtime: systime(st.st_mtime, st.st_mtime_nsec),
        ctime: systime(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: if ino == ROOT {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: 0,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn fstatat(dir: i32, name: &CString, flags: i32) -> io::Result<libc::stat> {
    // SAFETY: a zeroed stat is a valid out-buffer; name is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

impl Floor {
    fn name(&self, ino: u64) -> Option<&CString> {
        ino.checked_sub(2).and_then(|i| self.names.get(i as usize))
    }

    fn stat(&self, ino: u64) -> io::Result<libc::stat> {
        if ino == ROOT {
            let dot = CString::new(".").map_err(io::Error::other)?;
            return fstatat(self.dir.as_raw_fd(), &dot, 0);
        }
        let name = self
            .name(ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        fstatat(self.dir.as_raw_fd(), name, libc::AT_SYMLINK_NOFOLLOW)
    }

    fn open_of(&self, fh: FileHandle) -> Option<Arc<Open>> {
        self.opens.lock().get(&fh.0).cloned()
    }

    fn do_open(&self, ino: u64, flags: i32) -> io::Result<(u64, File)> {
        let name = self
            .name(ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let mut f = flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_NOCTTY
                | libc::O_TRUNC
                | libc::O_APPEND
                | libc::O_NOFOLLOW);
        if !self.passthrough && f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR; // the write-back cache reads
        }
        // SAFETY: valid dirfd and NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                f | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        Ok((fh, file))
    }
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(n) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(n);
        }
        if let Err(n) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(n);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        if self.passthrough {
            config.set_max_stack_depth(1).map_err(|_| {
                io::Error::other("the kernel refuses a passthrough stack depth of 1")
            })?;
            want |= InitFlags::FUSE_PASSTHROUGH;
        } else {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        for flag in want.iter() {
            let _ = config.add_capabilities(flag);
        }
        if self.passthrough
            && config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .is_err()
        {
            return Err(io::Error::other(
                "this kernel does not offer FUSE_PASSTHROUGH (CONFIG_FUSE_PASSTHROUGH, Linux 6.9+)",
            ));
        }
        Ok(())
    }

    fn destroy(&mut self) {
        println!(
            "served {} reads, {} writes",
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed)
        );
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(i) = self
            .names
            .iter()
            .position(|n| n.as_bytes() == name.as_bytes())
        else {
            return reply.error(Errno::ENOENT);
        };
        let ino = i as u64 + 2;
        match self.stat(ino) {
            Ok(st) => reply.entry(&TTL, &attr(ino, &st), fuser::Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = match fh.and_then(|f| self.open_of(f)) {
            Some(o) => {
                // SAFETY: a zeroed stat is a valid out-buffer; fd is open.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstat(o.file.as_raw_fd(), &mut st) } != 0 {
                    return reply.error(errno(&io::Error::last_os_error()));
                }
                Ok(st)
            }
            None => self.stat(ino.0),
        };
        match st {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(size) = size {
            let r = match fh.and_then(|f| self.open_of(f)) {
                Some(o) => o.file.set_len(size),
                None => match self.do_open(ino.0, libc::O_WRONLY) {
                    Ok((_, f)) => f.set_len(size),
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                return reply.error(errno(&e));
            }
        }
        match self.stat(ino.0) {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fh, file) = match self.do_open(ino.0, flags.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno(&e)),
        };
        let direct = flags.0 & libc::O_DIRECT != 0;
        if self.passthrough {
            let id = {
                let mut b = self.backing.lock();
                match b.get_mut(&ino.0) {
                    Some(x) => {
                        x.opens += 1;
                        x.id.clone()
                    }
                    None => match reply.open_backing(&file) {
                        Ok(id) => {
                            let id = Arc::new(id);
                            b.insert(
                                ino.0,
                                Backing {
                                    id: id.clone(),
                                    opens: 1,
                                },
                            );
                            id
                        }
                        Err(e) => {
                            eprintln!("fuse_floor: FUSE_DEV_IOC_BACKING_OPEN: {e}");
                            return reply.error(errno(&e));
                        }
                    },
                }
            };
            self.opens
                .lock()
                .insert(fh, Arc::new(Open { file, ino: ino.0 }));
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        }
        self.opens
            .lock()
            .insert(fh, Arc::new(Open { file, ino: ino.0 }));
        let fopen = if direct {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
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
        self.reads.fetch_add(1, Ordering::Relaxed);
        let Some(o) = self.open_of(fh) else {
            return reply.error(Errno::EBADF);
        };
        thread_local! {
            static BUF: std::cell::RefCell<AlignedBuf> = const { std::cell::RefCell::new(AlignedBuf::new()) };
        }
        BUF.with_borrow_mut(|b| {
            let buf = b.get(size as usize);
            let mut done = 0;
            while done < buf.len() {
                match o.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            reply.data(&buf[..done]);
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let Some(o) = self.open_of(fh) else {
            return reply.error(Errno::EBADF);
        };
        // fuser's request buffer puts a WRITE's data on a page boundary, so
        // an O_DIRECT backing file takes it as it is.
        match o.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
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
        if let Some(o) = self.opens.lock().remove(&fh.0) {
            let mut b = self.backing.lock();
            if let Some(x) = b.get_mut(&o.ino) {
                x.opens -= 1;
                if x.opens == 0 {
                    b.remove(&o.ino);
                }
            }
        }
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
        let Some(o) = self.open_of(fh) else {
            return reply.error(Errno::EBADF);
        };
        let r = if datasync {
            o.file.sync_data()
        } else {
            o.file.sync_all()
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        for (i, n) in self.names.iter().enumerate().skip(offset as usize) {
            let name = OsStr::from_bytes(n.as_bytes());
            if reply.add(
                INodeNo(i as u64 + 2),
                (i + 1) as u64,
                FileType::RegularFile,
                name,
            ) {
                break;
            }
        }
        reply.ok();
    }
}

/// A page-aligned read buffer (an `O_DIRECT` backing file needs one).
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

impl AlignedBuf {
    const fn new() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            let cap = len.next_power_of_two().max(4096);
            let layout = match std::alloc::Layout::from_size_align(cap, 4096) {
                Ok(l) => l,
                Err(_) => return &mut [],
            };
            if !self.ptr.is_null() {
                if let Ok(old) = std::alloc::Layout::from_size_align(self.cap, 4096) {
                    // SAFETY: allocated with this layout below.
                    unsafe { std::alloc::dealloc(self.ptr, old) };
                }
            }
            // SAFETY: non-zero size.
            self.ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if self.ptr.is_null() {
                self.cap = 0;
                return &mut [];
            }
            self.cap = cap;
        }
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: ptr holds cap >= len initialised bytes owned by this thread.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let (false, Ok(l)) = (
            self.ptr.is_null(),
            std::alloc::Layout::from_size_align(self.cap, 4096),
        ) {
            // SAFETY: allocated with this layout in `get`.
            unsafe { std::alloc::dealloc(self.ptr, l) };
        }
    }
}

fn main() {
    let a = parse_args();
    let dir = match File::open(&a.dir) {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            eprintln!("fuse_floor: cannot open {}: {e}", a.dir.display());
            std::process::exit(1)
        }
    };
    let mut names = Vec::new();
    match std::fs::read_dir(&a.dir) {
        Ok(rd) => {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    if let Ok(c) = CString::new(e.file_name().as_bytes()) {
                        names.push(c);
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("fuse_floor: cannot list {}: {e}", a.dir.display());
            std::process::exit(1)
        }
    }
    names.sort();
    let fs = Floor {
        dir,
        names,
        passthrough: a.passthrough,
        opens: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        backing: Mutex::new(HashMap::new()),
        reads: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    };
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName("fuse_floor".to_string()),
        MountOption::Subtype("floor".to_string()),
        MountOption::DefaultPermissions,
    ];
    c.acl = SessionACL::All;
    c.n_threads = Some(a.threads);
    c.clone_fd = true;
    c.prefault_bytes = 1 << 20;
    let session = match Session::new(fs, &a.dir, &c) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fuse_floor: mount on {} failed: {e}", a.dir.display());
            std::process::exit(1)
        }
    };
    println!("mounted {} pid {}", a.dir.display(), std::process::id());
    if let Err(e) = session.run() {
        eprintln!("fuse_floor: session ended: {e}");
        std::process::exit(1)
    }
}
