//! Read-only mappings of a file for hashing its bytes where they lie in
//! the page cache: no copy into a buffer (a `pread` copy cost the resync's
//! sender more than the hashing itself), and no `POSIX_FADV_WILLNEED`
//! (its read-ahead fills the cache with 4 KiB folios, which every later
//! pass then maps or copies page by page; the kernel's own read-ahead of a
//! mapping, or of a `read`, builds folios of up to 2 MiB here).
//! `kernel-notes/resync.md` (session 25) has the figures.
//!
//! A [`Window`] keeps one aligned stretch of the file mapped (never
//! populated whole: holes are not read) while a reader walks the file in
//! ascending pieces; [`populate`] faults a piece in at once
//! (`MADV_POPULATE_READ`: one page walk, and an error instead of `SIGBUS`
//! for a page past the file's end).
//!
//! **The caller must keep the file from shrinking while it reads the
//! mapping, and read only below the length it found meanwhile** (a read
//! past the end of the file is a `SIGBUS`). A mapping made before a shrink
//! stays usable below the new end: truncation unmaps only the pages it
//! removes.

use std::fs::File;
use std::io;

/// Bytes a [`Window`] maps at once (aligned to this in the file, so large
/// folios can be mapped whole).
pub const WINDOW: u64 = 8 << 20;

/// `MADV_POPULATE_READ` (Linux 5.14; not in every libc crate release).
const MADV_POPULATE_READ: libc::c_int = 22;

/// One mapped stretch of a file (see the module doc).
#[derive(Default)]
pub struct Window {
    map: Option<memmap2::Mmap>,
    /// File offset of the mapping's first byte.
    start: u64,
}

impl Window {
    /// The bytes `offset..offset + len` of `file`, mapped (not populated),
    /// when the file holds all of them (`file_len`: its length, read while
    /// the caller keeps it from shrinking); `None` when part of the range
    /// lies past `file_len`.
    pub fn get(
        &mut self,
        file: &File,
        file_len: u64,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<&[u8]>> {
        let end = offset.saturating_add(len as u64);
        if len == 0 || end > file_len {
            return Ok(None);
        }
        let fits = self
            .map
            .as_ref()
            .is_some_and(|m| offset >= self.start && end <= self.start + m.len() as u64);
        if !fits {
            self.map = None;
            let start = offset - offset % WINDOW;
            // Cover the range even if it straddles the window's end.
            let stop = file_len.min((start + WINDOW).max(end));
            // SAFETY: a read-only shared mapping of bytes the file holds;
            // the caller keeps the file from shrinking while it reads the
            // mapping, and reads only below the length it found meanwhile.
            let m = unsafe {
                memmap2::MmapOptions::new()
                    .offset(start)
                    .len((stop - start) as usize)
                    .map(file)?
            };
            self.map = Some(m);
            self.start = start;
        }
        match self.map.as_ref() {
            Some(m) => {
                let a = (offset - self.start) as usize;
                Ok(Some(&m[a..a + len]))
            }
            None => Ok(None),
        }
    }

    /// Unmap.
    pub fn clear(&mut self) {
        self.map = None;
    }
}

/// Fault every page of `bytes` (a slice of a read-only file mapping) in at
/// once: read from the disk if needed, mapped without a fault per page. An
/// error (`EFAULT`) instead of a `SIGBUS` if a page lies past the file's
/// end. On kernels before 5.14 (no `MADV_POPULATE_READ`: `EINVAL`) it does
/// nothing and succeeds: the reads then fault the pages in one by one.
pub fn populate(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let page = page_size();
    let addr = bytes.as_ptr() as usize;
    let start = addr - addr % page;
    let len = addr + bytes.len() - start;
    // SAFETY: the range lies inside a live mapping (page-rounded outward
    // within it: mappings are page-aligned); MADV_POPULATE_READ only
    // faults pages in.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_POPULATE_READ) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        Ok(())
    } else {
        Err(e)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_window_gives_the_file_bytes_and_refuses_past_the_end() {
        let mut f = tempfile::tempfile().expect("temp");
        let data: Vec<u8> = (0..(WINDOW as usize + 3 * 4096 + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).expect("write");
        let len = data.len() as u64;
        let mut w = Window::default();
        for &(off, n) in &[
            (0u64, 4096usize),
            (4096, 65536),
            (WINDOW - 4096, 8192), // straddles the window's end
            (WINDOW + 4096, 2 * 4096 + 100),
        ] {
            let got = w.get(&f, len, off, n).expect("map").expect("inside");
            populate(got).expect("populate");
            assert_eq!(got, &data[off as usize..off as usize + n], "at {off}");
        }
        assert!(w.get(&f, len, len - 10, 11).expect("map").is_none());
    }

    #[test]
    fn populate_past_the_end_is_an_error_not_a_signal() {
        let mut f = tempfile::tempfile().expect("temp");
        f.write_all(&vec![7u8; 3 * 4096]).expect("write");
        let mut w = Window::default();
        let m = w
            .get(&f, 3 * 4096, 0, 3 * 4096)
            .expect("map")
            .expect("inside");
        let (ptr, n) = (m.as_ptr(), m.len());
        f.set_len(4096).expect("shrink");
        // SAFETY: test only: the slice is not read, only populated.
        let s = unsafe { std::slice::from_raw_parts(ptr, n) };
        let e = populate(&s[2 * 4096..]).expect_err("past the end");
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
    }
}
