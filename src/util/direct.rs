//! Bulk reads that bypass the page cache: [`DirectReader`] reads long
//! ranges of a file through an `O_DIRECT` descriptor of its own into an
//! aligned scratch buffer, then copies them out.
//!
//! Why: on this kind of host a buffered read of a cold 2 GiB file costs
//! 1.2–1.6 CPU-seconds in the reading thread (allocating and filling the
//! page cache), an `O_DIRECT` read 0.15–0.17 CPU-s, and is faster (1.4 s
//! against 1.7–2.1 s; `kernel-notes/replication-speed.md`, session 23). An
//! initial copy reads a whole disk once: the page cache gains nothing from
//! it, and it would evict what the host uses.
//!
//! What it does not change: a direct read of a range first writes back the
//! dirty page-cache pages of that range (the kernel keeps `O_DIRECT` reads
//! coherent with buffered writes), so it returns what a buffered read
//! would. Where the file system refuses `O_DIRECT` (`EINVAL` at open or at
//! the first read), the reader drops the flag and reads buffered.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Alignment of offsets, lengths and memory of a direct read: the largest
/// logical block size of the devices in use (4 KiB), a multiple of every
/// smaller one.
pub const ALIGN: usize = 4096;

/// Reads shorter than this stay buffered (scattered small reads want the
/// page cache's read-ahead; one direct read each would wait for the disk
/// one by one).
pub const MIN_DIRECT: usize = 256 << 10;

/// Scratch memory whose usable part starts on an [`ALIGN`] boundary (the
/// memory of a direct read or write must be aligned; the callers' is not).
#[derive(Debug, Default)]
struct Aligned {
    buf: Vec<u8>,
    at: usize,
}

impl Aligned {
    /// `len` bytes of aligned memory (contents unspecified).
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < self.at + len {
            self.buf = vec![0u8; len + ALIGN];
            self.at = self.buf.as_ptr().align_offset(ALIGN);
        }
        &mut self.buf[self.at..self.at + len]
    }
}

/// A reader of long ranges of one file through its own `O_DIRECT`
/// descriptor (see the module's documentation).
#[derive(Debug)]
pub struct DirectReader {
    file: File,
    scratch: Aligned,
    /// `O_DIRECT` is set on `file` (false once the file system refused it).
    direct: bool,
}

impl DirectReader {
    /// A direct reader of the file behind `file`, or `None` if it cannot be
    /// opened with `O_DIRECT` (the caller reads buffered).
    pub fn open(file: &File) -> Option<DirectReader> {
        match crate::sys::reopen(file.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECT) {
            Ok(file) => Some(DirectReader {
                file,
                scratch: Aligned::default(),
                direct: true,
            }),
            Err(e) => {
                tracing::debug!("no direct reader ({e}); reading through the page cache");
                None
            }
        }
    }

    /// Whether reads bypass the page cache (false once the file system
    /// refused `O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Read `out.len()` bytes at `offset`, or up to the end of the file:
    /// the bytes read (the rest of `out` is untouched).
    pub fn read_at(&mut self, out: &mut [u8], offset: u64) -> io::Result<usize> {
        if !self.direct {
            return crate::util::read_full_at(&self.file, out, offset);
        }
        match self.read_direct(out, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Refused by this file system after all: buffered from now on.
                tracing::debug!("O_DIRECT read refused ({e}); reading through the page cache");
                self.clear_direct()?;
                crate::util::read_full_at(&self.file, out, offset)
            }
            r => r,
        }
    }

    fn read_direct(&mut self, out: &mut [u8], offset: u64) -> io::Result<usize> {
        let a = ALIGN as u64;
        let start = offset / a * a;
        let head = (offset - start) as usize;
        let total = (head + out.len()).div_ceil(ALIGN) * ALIGN;
        let scratch = self.scratch.get(total);
        let mut got = 0;
        while got < total {
            match self
                .file
                .read_at(&mut scratch[got..total], start + got as u64)
            {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    // A short read that ends off the alignment is the end
                    // of the file (the next read there would be refused).
                    if got % ALIGN != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = got.saturating_sub(head).min(out.len());
        out[..n].copy_from_slice(&scratch[head..head + n]);
        Ok(n)
    }

    fn clear_direct(&mut self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: plain fcntl calls on a descriptor this reader owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }
}

/// A writer of long aligned ranges of one file through its own `O_DIRECT`
/// descriptor (a receiver's initial copy: 2 GiB written buffered and then
/// fdatasynced cost 2.8-3.6 CPU-s here, written direct 0.3 CPU-s, and
/// took 3.7-4.6 s against 1.4 s). Writes that are short or off the
/// alignment go through the buffered descriptor the caller passes. The
/// data is durable only after an `fdatasync` of the file (any descriptor
/// of it): a direct write may sit in the device's volatile cache, and the
/// allocation of the blocks it filled is metadata.
#[derive(Debug)]
pub struct DirectWriter {
    /// `None` once the file system refused `O_DIRECT`.
    file: Option<File>,
    scratch: Aligned,
}

impl DirectWriter {
    /// A direct writer of the file behind `file` (falls back to `file`
    /// itself for every write if `O_DIRECT` is refused).
    pub fn open(file: &File) -> DirectWriter {
        let direct = match crate::sys::reopen(file.as_raw_fd(), libc::O_WRONLY | libc::O_DIRECT) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!("no direct writer ({e}); writing through the page cache");
                None
            }
        };
        DirectWriter {
            file: direct,
            scratch: Aligned::default(),
        }
    }

    /// Whether long aligned writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.file.is_some()
    }

    /// Write all of `data` at `offset`: direct if it is long and aligned,
    /// else through `buffered` (the same file).
    pub fn write_at(&mut self, buffered: &File, data: &[u8], offset: u64) -> io::Result<()> {
        let aligned = offset % ALIGN as u64 == 0 && data.len() % ALIGN == 0;
        match &self.file {
            Some(f) if aligned && data.len() >= MIN_DIRECT => {
                let scratch = self.scratch.get(data.len());
                scratch.copy_from_slice(data);
                match f.write_all_at(scratch, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!(
                            "O_DIRECT write refused ({e}); writing through the page cache"
                        );
                        self.file = None;
                        buffered.write_all_at(data, offset)
                    }
                    r => r,
                }
            }
            _ => buffered.write_all_at(data, offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn direct_writes_read_back_and_mix_with_buffered_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        let len = 3 * (1 << 20) + 100;
        f.set_len(len).expect("size");
        let mut w = DirectWriter::open(&f);
        let mut want = vec![0u8; len as usize];
        // Aligned and long (direct), unaligned (buffered), short (buffered),
        // the unaligned tail, and a buffered write over a direct one.
        let writes: &[(u64, usize, u8)] = &[
            (0, 1 << 20, 1),
            (1 << 20, 1 << 20, 2),
            ((2 << 20) + 7, 300_000, 3),
            ((3 << 20) - 4096, 4096, 4),
            (3 << 20, 100, 5),
            (4096, 8192, 6),
        ];
        for &(off, n, v) in writes {
            let data: Vec<u8> = (0..n).map(|i| v.wrapping_add(i as u8)).collect();
            w.write_at(&f, &data, off).expect("write");
            want[off as usize..off as usize + n].copy_from_slice(&data);
        }
        f.sync_data().expect("fdatasync");
        assert_eq!(std::fs::read(&path).expect("read back"), want);
    }

    #[test]
    fn reads_equal_buffered_reads_at_any_offset_length_and_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        // A size off the alignment, so reads run into a short last block.
        let len = 3 * (1 << 20) + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&data))
            .expect("write test file");
        let f = File::open(&path).expect("open");
        let mut d = DirectReader::open(&f).expect("direct reader");
        let cases: &[(u64, usize)] = &[
            (0, 1 << 20),
            (4096, 1 << 20),
            (1, 300_000),
            (5000, 4096),
            (len as u64 - 100, 4096),
            (len as u64 - 1 - (1 << 20), 1 << 20),
            (len as u64, 4096),
            (len as u64 + 9000, 4096),
        ];
        for &(off, n) in cases {
            let mut out = vec![0xAAu8; n];
            let got = d.read_at(&mut out, off).expect("read");
            let want = data.len().saturating_sub(off as usize).min(n);
            assert_eq!(got, want, "bytes read at {off}+{n}");
            assert_eq!(
                &out[..got],
                &data[(off as usize).min(data.len())..][..got],
                "at {off}+{n}"
            );
            assert!(
                out[got..].iter().all(|&b| b == 0xAA),
                "past the end untouched"
            );
        }
    }
}
