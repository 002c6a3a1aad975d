//! Replica files: the [`ReplicaTarget`] trait and its implementations.
//!
//! A target presents the *virtual* disk (what the source disk holds) whatever
//! the container: [`RawFile`] is the disk byte for byte (VHD sources, which
//! already are VHDs, replicate this way), [`FixedVhd`] is a raw source kept
//! as a fixed VHD (the data followed by a 512-byte footer).
//!
//! [`FixedVhd`] is vdrep's one fixed-VHD implementation; its footer and
//! geometry come from [`crate::vhd::footer`]. A fixed VHD of a sparse source
//! stays sparse on disk (zero ranges are punched). [`open_target`] is the one
//! place that picks an implementation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::util::readahead::ReadAhead;

/// How the replica file stores the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaFormat {
    /// Byte for byte (the source is a VHD already, or another format kept as is).
    Raw,
    /// A raw source (`.img`, `.raw`) kept as a VHD.
    VhdOfRaw,
}

impl ReplicaFormat {
    /// The format and replica file name for a source disk file name:
    /// `x.img` / `x.raw` → (`VhdOfRaw`, `x.vhd`); anything else (notably
    /// `x.vhd`) → (`Raw`, same name).
    pub fn for_source(name: &str) -> (ReplicaFormat, String) {
        let lower = name.to_ascii_lowercase();
        for ext in [".img", ".raw"] {
            if lower.len() > ext.len() && lower.ends_with(ext) {
                let stem = &name[..name.len() - ext.len()];
                return (ReplicaFormat::VhdOfRaw, format!("{stem}.vhd"));
            }
        }
        (ReplicaFormat::Raw, name.to_string())
    }
}

/// A replica of one virtual disk: random access to the disk's bytes.
/// Offsets and lengths are those of the virtual disk.
pub trait ReplicaTarget: Send {
    /// Virtual disk size in bytes.
    fn len(&self) -> u64;
    /// True for a zero-length disk.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; bytes at or past [`len`](Self::len) read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `data` at `offset` (must lie within [`len`](Self::len)).
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// [`write_at`](Self::write_at) for a long sequential copy (the initial
    /// copy): where the format stores the disk as plain file bytes, long
    /// aligned pieces bypass the page cache ([`crate::util::direct`]);
    /// durable, as any write, after [`flush`](Self::flush).
    fn write_bulk(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(data, offset)
    }
    /// Make `len` bytes at `offset` read as zeros (holes where possible).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Resize the virtual disk (new bytes read as zeros).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Start writing to the device what was written so far, without
    /// waiting for it ([`flush`](Self::flush) still makes it durable): a
    /// long copy's disk writes then overlap its transfer instead of all
    /// waiting for its final flush. Nothing by default.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Make everything written so far durable (fsync; container metadata
    /// included).
    /// fdatasync: the data and every piece of metadata needed to read it
    /// back (size, block allocation) are durable; only timestamps may lag,
    /// and nothing reads them.
    fn flush(&mut self) -> io::Result<()> {
        self.prepare_flush()?.sync_data()
    }
    /// What [`flush`](Self::flush) does before its sync (a container's
    /// footer), returning the file whose fdatasync then makes the disk
    /// durable: for a caller that syncs it with other files in one pass.
    fn prepare_flush(&mut self) -> io::Result<&File>;
    /// A reader is about to read `ranges[at]` of `ranges` (`(offset, len)`
    /// of the virtual disk, in reading order): start reading the next ones
    /// into the page cache without waiting ([`ReadAhead`]). A hint only:
    /// what [`read_at`](Self::read_at) returns is the same without it.
    /// Nothing by default.
    fn read_ahead(&self, _ahead: &mut ReadAhead, _ranges: &[(u64, u64)], _at: usize) {}
    /// Where data starts at or after `offset` (`SEEK_DATA`; the disk's
    /// length if only holes follow), or `None` if the file cannot tell.
    fn next_data(&self, _offset: u64) -> Option<u64> {
        None
    }
    /// The disk bytes `offset..offset + len` mapped read-only, without
    /// copying them (for hashing), when the format stores them as plain
    /// file bytes; `None` otherwise. Not populated (the reader faults its
    /// part in: [`crate::util::mapped::populate`]). Only while nothing
    /// shrinks the file.
    fn map(&self, _offset: u64, _len: usize) -> Option<io::Result<MappedRange>> {
        None
    }
}

/// A read-only shared mapping of part of a replica file (see
/// [`ReplicaTarget::map`]); unmapped on drop. Dereferences to the wanted
/// bytes (memmap2 aligns the mapping to pages and hides the slack).
pub type MappedRange = memmap2::Mmap;

/// Map `len` bytes of `file` at `offset` read-only (not populated).
fn map_range(file: &File, offset: u64, len: usize) -> io::Result<MappedRange> {
    // The file must hold every mapped byte: a page past its end would
    // fault (SIGBUS) when read.
    if file.metadata()?.len() < offset + len as u64 || len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "range past the end of the replica file",
        ));
    }
    // SAFETY: the mapping is read-only, and the file holds every mapped byte
    // (checked above); replicas are only shrunk or rewritten under the disk
    // lock the reader holds, so the bytes do not change or vanish while the
    // mapping is in use.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}

/// `SEEK_DATA` on `file` from `offset`, clipped to `len`.
fn seek_data(file: &File, offset: u64, len: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd; lseek has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: nothing but holes from `offset` on.
        return (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(len);
    }
    Some((r as u64).min(len))
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over all of `file`: start the
/// writeback of its dirty pages, do not wait for it.
fn start_writeback(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd; sync_file_range has no memory effects.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("write of {len} bytes at offset {offset} runs past the disk size {size}"),
    )
}

/// Read into `buf` from `file` at `offset`, zero-filling past `limit`
/// (the end of the data) and at end of file.
fn read_limited(file: &File, buf: &mut [u8], offset: u64, limit: u64) -> io::Result<()> {
    let avail = limit.saturating_sub(offset).min(buf.len() as u64) as usize;
    let done = crate::util::read_full_at(file, &mut buf[..avail], offset)?;
    buf[done..].fill(0);
    Ok(())
}

/// Punch a hole, or write zeros where the file system cannot.
pub(crate) fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    crate::util::zero_range(file, offset, len, &mut true)
}

/// The disk byte for byte in a regular file.
pub struct RawFile {
    file: File,
    len: u64,
    /// Opened at the first [`ReplicaTarget::write_bulk`].
    direct: Option<crate::util::direct::DirectWriter>,
}

impl RawFile {
    /// Open (or create, empty) the file at `path`; the disk size is the file size.
    pub fn open(path: &Path, create: bool) -> io::Result<RawFile> {
        let file = open_file(path, create)?;
        let len = file.metadata()?.len();
        Ok(RawFile {
            file,
            len,
            direct: None,
        })
    }
}

fn open_file(path: &Path, create: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

impl ReplicaTarget for RawFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_limited(&self.file, buf, offset, self.len)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(data.len() as u64) > self.len {
            return Err(out_of_range(offset, data.len() as u64, self.len));
        }
        self.file.write_all_at(data, offset)
    }
    fn write_bulk(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(data.len() as u64) > self.len {
            return Err(out_of_range(offset, data.len() as u64, self.len));
        }
        let file = &self.file;
        self.direct
            .get_or_insert_with(|| crate::util::direct::DirectWriter::open(file))
            .write_at(file, data, offset)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if offset.saturating_add(len) > self.len {
            return Err(out_of_range(offset, len, self.len));
        }
        zero_file_range(&self.file, offset, len)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }
    fn start_writeback(&self) -> io::Result<()> {
        start_writeback(&self.file)
    }
    fn read_ahead(&self, ahead: &mut ReadAhead, ranges: &[(u64, u64)], at: usize) {
        use std::os::fd::AsRawFd;
        ahead.before(self.file.as_raw_fd(), ranges, at);
    }
    fn prepare_flush(&mut self) -> io::Result<&File> {
        Ok(&self.file)
    }
    fn next_data(&self, offset: u64) -> Option<u64> {
        seek_data(&self.file, offset, self.len)
    }
    fn map(&self, offset: u64, len: usize) -> Option<io::Result<MappedRange>> {
        if offset.saturating_add(len as u64) > self.len {
            return None;
        }
        Some(map_range(&self.file, offset, len))
    }
}

/// Size of a VHD footer.
pub const VHD_FOOTER_LEN: u64 = crate::vhd::footer::FOOTER_SIZE as u64;

/// A fixed VHD: the disk's bytes, then a 512-byte footer (its footer comes from [`crate::vhd`]). The footer is rewritten on
/// every [`set_len`](ReplicaTarget::set_len) and [`flush`](ReplicaTarget::flush),
/// so a file left with a stale footer by a crash is repaired by the next
/// apply (which always sets the length and flushes).
pub struct FixedVhd {
    /// The data part: a raw file whose `len` is the virtual size (the
    /// footer lies just past it).
    raw: RawFile,
    unique_id: [u8; 16],
    timestamp: u32,
}

impl FixedVhd {
    /// Open (or create) the VHD at `path` holding a disk of `virtual_size`
    /// bytes (the caller's record, not the footer, is authoritative).
    pub fn open(
        path: &Path,
        virtual_size: u64,
        unique_id: [u8; 16],
        timestamp: u32,
        create: bool,
    ) -> io::Result<FixedVhd> {
        let file = open_file(path, create)?;
        let file_len = file.metadata()?.len();
        let mut v = FixedVhd {
            raw: RawFile {
                file,
                len: virtual_size,
                direct: None,
            },
            unique_id,
            timestamp,
        };
        if create && file_len != virtual_size + VHD_FOOTER_LEN {
            v.set_len(virtual_size)?;
        }
        Ok(v)
    }

    fn write_footer(&self) -> io::Result<()> {
        let f = vhd_fixed_footer(self.raw.len, self.timestamp, self.unique_id);
        self.raw.file.write_all_at(&f, self.raw.len)
    }
}

impl ReplicaTarget for FixedVhd {
    fn len(&self) -> u64 {
        self.raw.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.raw.read_at(buf, offset)
    }
    fn read_ahead(&self, ahead: &mut ReadAhead, ranges: &[(u64, u64)], at: usize) {
        // The disk's bytes are the file's from offset 0 on.
        self.raw.read_ahead(ahead, ranges, at)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.raw.write_at(data, offset)
    }
    fn write_bulk(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        // The disk's bytes are the file's from offset 0 on.
        self.raw.write_bulk(data, offset)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.raw.write_zeroes(offset, len)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let old = self.raw.len;
        self.raw.file.set_len(len + VHD_FOOTER_LEN)?;
        if len > old {
            // Grow: the old footer becomes disk data that must read as zeros.
            zero_file_range(&self.raw.file, old, VHD_FOOTER_LEN.min(len - old))?;
        }
        self.raw.len = len;
        self.write_footer()
    }
    fn start_writeback(&self) -> io::Result<()> {
        start_writeback(&self.raw.file)
    }
    fn prepare_flush(&mut self) -> io::Result<&File> {
        self.write_footer()?;
        Ok(&self.raw.file)
    }
    fn next_data(&self, offset: u64) -> Option<u64> {
        self.raw.next_data(offset)
    }
    fn map(&self, offset: u64, len: usize) -> Option<io::Result<MappedRange>> {
        self.raw.map(offset, len)
    }
}

/// A fixed-disk VHD footer for a disk of `size` bytes, from [`crate::vhd`]
/// (creator `qem2`: QEMU sizes the disk by its exact current size).
pub fn vhd_fixed_footer(size: u64, timestamp: u32, unique_id: [u8; 16]) -> [u8; 512] {
    crate::vhd::footer::Footer::new(
        crate::vhd::footer::DISK_TYPE_FIXED,
        size,
        timestamp,
        unique_id,
    )
    .encode()
}

/// Open the replica file `path` of `format` holding `size` bytes — the one
/// place that picks a [`ReplicaTarget`] implementation.
pub fn open_target(
    path: &Path,
    format: ReplicaFormat,
    size: u64,
    vhd_id: [u8; 16],
    vhd_time: u32,
    create: bool,
) -> io::Result<Box<dyn ReplicaTarget>> {
    Ok(match format {
        ReplicaFormat::Raw => {
            let mut f = RawFile::open(path, create)?;
            if create && f.len() != size {
                f.set_len(size)?;
            }
            // The state's size is authoritative (a crash may have left the
            // file at another length; the next apply sets it).
            f.len = size;
            Box::new(f)
        }
        ReplicaFormat::VhdOfRaw => Box::new(FixedVhd::open(path, size, vhd_id, vhd_time, create)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_formats() {
        assert_eq!(
            ReplicaFormat::for_source("disk0.img"),
            (ReplicaFormat::VhdOfRaw, "disk0.vhd".into())
        );
        assert_eq!(
            ReplicaFormat::for_source("d.RAW"),
            (ReplicaFormat::VhdOfRaw, "d.vhd".into())
        );
        assert_eq!(
            ReplicaFormat::for_source("d.vhd"),
            (ReplicaFormat::Raw, "d.vhd".into())
        );
        assert_eq!(
            ReplicaFormat::for_source(".img").0,
            ReplicaFormat::Raw,
            "no stem"
        );
    }

    #[test]
    fn footer_checksum_and_geometry() {
        let f = vhd_fixed_footer(10 << 20, 12345, [9; 16]);
        let sum: u32 = f
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
        assert_eq!(u32::from_be_bytes([f[64], f[65], f[66], f[67]]), !sum);
        // 10 MiB: 20480 sectors -> spt 17, heads 4, cyl 301 (spec algorithm).
        let chs = |size| {
            let g = crate::vhd::footer::Geometry::for_size(size);
            (g.cylinders, g.heads, g.sectors_per_track)
        };
        assert_eq!(chs(10 << 20), (301, 4, 17));
        assert_eq!(chs(u64::MAX / 2), (65535, 16, 255));
    }

    #[test]
    fn fixed_vhd_grow_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.vhd");
        let mut v = FixedVhd::open(&p, 4096, [1; 16], 7, true).unwrap();
        v.write_at(&[0xaa; 4096], 0).unwrap();
        v.flush().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096 + 512);
        v.set_len(8192).unwrap();
        let mut b = vec![1u8; 4096];
        v.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0), "grown area reads zeros");
        v.set_len(1024).unwrap();
        v.flush().unwrap();
        let all = std::fs::read(&p).unwrap();
        assert_eq!(all.len(), 1024 + 512);
        assert_eq!(&all[1024..1032], b"conectix");
    }
}
