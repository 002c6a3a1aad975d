//! The FUSE file system of one test failover: a flat folder with one
//! read-write VHD file per disk of the exposed point.
//!
//! A file's bytes are the point's disk (a [`PointRead`]: the directory
//! store's replica and undo records, or a bucket's chunks and logs) followed, for a
//! raw source kept as a fixed VHD, by that VHD's 512-byte footer (for a VHD
//! source the disk *is* the VHD file). Writes never reach the replica: they
//! go copy-on-write to a sparse scratch file of the same length, 4 KiB
//! blocks at a time, with an in-memory bitmap saying which blocks live
//! there (a partial block is read, merged and written whole). Reads split
//! the range into runs of overlay and base blocks and serve each run with
//! one read.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::replica::PointRead;

/// Copy-on-write granularity of the scratch overlay.
pub const OVERLAY_BLOCK: u64 = 4096;

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);
const GEN: Generation = Generation(0);

/// One exposed disk.
pub struct ViewFile {
    pub name: String,
    /// The point's bytes; [`switch_base`](Self::switch_base) replaces it
    /// with an equal source (a hydrated local copy) while the view runs.
    reader: parking_lot::RwLock<Arc<dyn PointRead>>,
    /// Footer appended after the disk (raw sources kept as fixed VHDs).
    footer: Option<[u8; 512]>,
    /// Length of the exposed file. A file without a footer (a qcow2 or
    /// other growable image) grows when the test VM writes past its end,
    /// as the image file would (qcow2 allocates clusters at the end); a
    /// fixed VHD keeps its size.
    len: AtomicU64,
    overlay: File,
    /// One bit per [`OVERLAY_BLOCK`]: the block lives in `overlay` (grows
    /// with the file).
    bits: parking_lot::RwLock<Vec<AtomicU64>>,
    /// Serialises writers (read-modify-write of partial blocks).
    wlock: parking_lot::Mutex<()>,
    /// Bytes of blocks written to the overlay.
    overlay_bytes: AtomicU64,
    /// Where the block map is kept across a crash (an unplanned failover's
    /// view; none for a test view, whose overlay is scratch).
    map: Option<File>,
}

impl ViewFile {
    /// `overlay` is an empty scratch file (sized here, sparse).
    pub fn new(
        name: String,
        reader: Box<dyn PointRead>,
        footer: Option<[u8; 512]>,
        overlay: File,
    ) -> io::Result<ViewFile> {
        let len = reader.len() + if footer.is_some() { 512 } else { 0 };
        overlay.set_len(len)?;
        let blocks = len.div_ceil(OVERLAY_BLOCK);
        let words = blocks.div_ceil(64) as usize;
        Ok(ViewFile {
            name,
            reader: parking_lot::RwLock::new(Arc::from(reader)),
            footer,
            len: AtomicU64::new(len),
            overlay,
            bits: parking_lot::RwLock::new((0..words).map(|_| AtomicU64::new(0)).collect()),
            wlock: parking_lot::Mutex::new(()),
            overlay_bytes: AtomicU64::new(0),
            map: None,
        })
    }

    /// A file whose overlay outlives the process: `map` holds the block map
    /// as of the last [`persist`](Self::persist) (empty: a new overlay),
    /// loaded here; blocks written after it are not in the overlay.
    pub fn durable(
        name: String,
        reader: Box<dyn PointRead>,
        footer: Option<[u8; 512]>,
        overlay: File,
        map: File,
    ) -> io::Result<ViewFile> {
        let mut f = ViewFile::new(name, reader, footer, overlay)?;
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut &map, &mut raw)?;
        if !raw.is_empty() {
            let want = f.bits.read().len() * 8;
            if raw.len() != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the overlay's block map has {} bytes, not {want}",
                        raw.len()
                    ),
                ));
            }
            let bits = f.bits.get_mut();
            let mut n = 0u64;
            for (w, c) in bits.iter_mut().zip(raw.chunks_exact(8)) {
                let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
                n += u64::from(v.count_ones());
                *w.get_mut() = v;
            }
            *f.overlay_bytes.get_mut() = n * OVERLAY_BLOCK;
        }
        f.map = Some(map);
        Ok(f)
    }

    /// Make every write acknowledged so far durable (a durable file only):
    /// the block map is taken first, the overlay synced, then the map
    /// written and synced, so the map never names a block whose data is
    /// not on disk.
    pub fn persist(&self) -> io::Result<()> {
        let Some(map) = &self.map else {
            return Ok(());
        };
        let snap: Vec<u8> = self
            .bits
            .read()
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        self.overlay.sync_data()?;
        map.write_all_at(&snap, 0)?;
        map.sync_data()
    }

    /// Length of the exposed file.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Can the file grow past the point's size (no VHD footer)?
    fn growable(&self) -> bool {
        self.footer.is_none()
    }

    /// Grow the file to `new_len` (a growable file only; never shrinks).
    fn grow_to(&self, new_len: u64) -> io::Result<()> {
        if new_len <= self.len() {
            return Ok(());
        }
        if !self.growable() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let words = new_len.div_ceil(OVERLAY_BLOCK).div_ceil(64) as usize;
        {
            let mut bits = self.bits.write();
            while bits.len() < words {
                bits.push(AtomicU64::new(0));
            }
        }
        self.len.fetch_max(new_len, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes the test VM wrote (whole blocks) so far.
    pub fn overlay_bytes(&self) -> u64 {
        self.overlay_bytes.load(Ordering::Relaxed)
    }

    fn in_overlay(&self, block: u64) -> bool {
        let bits = self.bits.read();
        bits.get((block / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (block % 64)) != 0)
    }

    fn set_overlay(&self, block: u64) {
        if let Some(w) = self.bits.read().get((block / 64) as usize) {
            w.fetch_or(1 << (block % 64), Ordering::Release);
        }
    }

    /// The source of the point's disk bytes now.
    pub fn base(&self) -> Arc<dyn PointRead> {
        self.reader.read().clone()
    }

    /// Serve the point's bytes from `r` from now on. `r` must hold the
    /// same bytes as the current source (a hydrated copy of it): readers
    /// see no change.
    pub fn switch_base(&self, r: Arc<dyn PointRead>) {
        *self.reader.write() = r;
    }

    /// The VHD footer after the disk, for a raw source kept as a fixed VHD.
    pub fn footer(&self) -> Option<&[u8; 512]> {
        self.footer.as_ref()
    }

    /// Write every overlay block (what the VM wrote) into `dst` at its
    /// offset, then fsync `dst`; the bytes written.
    pub fn fold_overlay_into(&self, dst: &File) -> io::Result<u64> {
        let _g = self.wlock.lock();
        let mut buf = vec![0u8; OVERLAY_BLOCK as usize];
        let mut n = 0;
        for b in 0..self.len().div_ceil(OVERLAY_BLOCK) {
            if self.in_overlay(b) {
                let off = b * OVERLAY_BLOCK;
                let k = (self.len() - off).min(OVERLAY_BLOCK) as usize;
                self.read_overlay(&mut buf[..k], off)?;
                dst.write_all_at(&buf[..k], off)?;
                n += k as u64;
            }
        }
        dst.sync_all()?;
        Ok(n)
    }

    /// The point's bytes (disk, then footer) without the overlay.
    fn read_base(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let reader = self.base();
        let disk = reader.len();
        let n_disk = disk.saturating_sub(off).min(buf.len() as u64) as usize;
        reader.read_at(&mut buf[..n_disk], off)?;
        if n_disk < buf.len() {
            let rest = &mut buf[n_disk..];
            let foff = (off + n_disk as u64 - disk) as usize;
            match &self.footer {
                Some(f) if foff < f.len() => {
                    let n = rest.len().min(f.len() - foff);
                    rest[..n].copy_from_slice(&f[foff..foff + n]);
                    rest[n..].fill(0);
                }
                _ => rest.fill(0),
            }
        }
        Ok(())
    }

    fn read_overlay(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        crate::util::read_at_zero_filled(&self.overlay, buf, off)
    }

    /// Read at `off` (clipped to the file; returns the bytes read).
    pub fn read(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let n = self.len().saturating_sub(off).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let end = off + n as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / OVERLAY_BLOCK;
            let ov = self.in_overlay(b);
            // Extend the run while blocks are of the same kind.
            let mut stop = ((b + 1) * OVERLAY_BLOCK).min(end);
            while stop < end && self.in_overlay(stop / OVERLAY_BLOCK) == ov {
                stop = (stop + OVERLAY_BLOCK).min(end);
            }
            let part = &mut buf[(pos - off) as usize..(stop - off) as usize];
            if ov {
                self.read_overlay(part, pos)?;
            } else {
                self.read_base(part, pos)?;
            }
            pos = stop;
        }
        Ok(n)
    }

    /// Write `data` at `off` into the overlay. Past the end, a growable
    /// file grows; a fixed VHD answers `ENOSPC`.
    pub fn write(&self, data: &[u8], off: u64) -> io::Result<usize> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(0);
        }
        let _g = self.wlock.lock();
        self.grow_to(end)?;
        let a = off / OVERLAY_BLOCK * OVERLAY_BLOCK;
        let z = end.div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK;
        let z = z.min(self.len());
        let mut buf = vec![0u8; (z - a) as usize];
        // Partial head and tail blocks: current content first.
        if off > a {
            let hb = (OVERLAY_BLOCK.min(z - a)) as usize;
            self.read(&mut buf[..hb], a)?;
        }
        let tail_start = (end - 1) / OVERLAY_BLOCK * OVERLAY_BLOCK;
        if end < z && (tail_start > a || off == a) {
            let t = (tail_start - a) as usize;
            self.read(&mut buf[t..], tail_start)?;
        }
        buf[(off - a) as usize..(end - a) as usize].copy_from_slice(data);
        self.overlay.write_all_at(&buf, a)?;
        let mut fresh = 0u64;
        for b in a / OVERLAY_BLOCK..z.div_ceil(OVERLAY_BLOCK) {
            if !self.in_overlay(b) {
                fresh += OVERLAY_BLOCK;
                self.set_overlay(b);
            }
        }
        self.overlay_bytes.fetch_add(fresh, Ordering::Relaxed);
        Ok(data.len())
    }
}

/// The file system: root folder + [`ViewFile`]s (inode 2 + index).
pub struct ViewFs {
    files: Arc<Vec<Arc<ViewFile>>>,
    time: SystemTime,
    uid: u32,
    gid: u32,
}

impl ViewFs {
    pub fn new(files: Arc<Vec<Arc<ViewFile>>>, time_unix_ns: u64) -> ViewFs {
        ViewFs {
            files,
            time: UNIX_EPOCH + Duration::from_nanos(time_unix_ns),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn file(&self, ino: INodeNo) -> Option<&ViewFile> {
        let i = ino.0.checked_sub(2)?;
        self.files.get(usize::try_from(i).ok()?).map(|f| &**f)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            let f = self.file(INodeNo(ino))?;
            (FileType::RegularFile, 0o644, f.len(), 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: OVERLAY_BLOCK as u32,
            flags: 0,
        })
    }
}

fn enoent() -> Errno {
    Errno::from_i32(libc::ENOENT)
}

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(n) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(n);
        }
        if let Err(n) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(n);
        }
        for flag in (InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_PARALLEL_DIROPS)
            .iter()
        {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(enoent());
        }
        let Some(i) = self.files.iter().position(|f| OsStr::new(&f.name) == name) else {
            return reply.error(enoent());
        };
        match self.attr(i as u64 + 2) {
            Some(a) => reply.entry(&TTL, &a, GEN),
            None => reply.error(enoent()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(enoent()),
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
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino.0) else {
            return reply.error(enoent());
        };
        // The disks of a test failover never shrink; a growable image (no
        // VHD footer) may grow. Other attribute changes are accepted and
        // not kept.
        if let Some(s) = size.filter(|&s| s != a.size) {
            let grown = match self.file(ino) {
                Some(f) if s > a.size => {
                    let _g = f.wlock.lock();
                    f.grow_to(s)
                }
                _ => Err(io::Error::from_raw_os_error(libc::EPERM)),
            };
            if let Err(e) = grown {
                let errno = e.raw_os_error().unwrap_or(libc::EPERM);
                return reply.error(Errno::from_i32(if errno == libc::ENOSPC {
                    libc::EPERM
                } else {
                    errno
                }));
            }
            match self.attr(ino.0) {
                Some(a) => return reply.attr(&TTL, &a),
                None => return reply.error(enoent()),
            }
        }
        reply.attr(&TTL, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(enoent());
        }
        let fopen = if flags.0 & libc::O_DIRECT != 0 {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            // Only this file system changes the files: keep cached pages.
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(enoent());
        };
        let mut buf = vec![0u8; size as usize];
        match f.read(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => {
                tracing::warn!("failover view: reading {} at {offset}: {e}", f.name);
                reply.error(Errno::from(e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(enoent());
        };
        match f.write(data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Errno::from(e)),
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
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A test view's overlay is scratch; an unplanned failover's is
        // made durable (the guest's flush reaches here).
        match self.file(_ino).map(|f| f.persist()) {
            Some(Err(e)) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
            _ => reply.ok(),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != ROOT {
            return reply.error(Errno::from_i32(libc::ENOTDIR));
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
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
            return reply.error(Errno::from_i32(libc::ENOTDIR));
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, &f.name));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // fuser's signatures, as in `fs::ops`: this view answers from memory.
    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.files.iter().map(|f| f.len().div_ceil(4096)).sum();
        reply.statfs(total, 0, 0, self.files.len() as u64, 0, 4096, 255, 4096);
    }
}
