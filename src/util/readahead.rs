//! Read-ahead hints for a reader that reads many scattered ranges of one
//! file in a known order (the dirty blocks of a sealed cycle, the
//! pre-images of a replica): [`ReadAhead`] keeps `posix_fadvise(WILLNEED)`
//! hints a window of ranges ahead of the reader, so the disk serves that
//! many reads at once instead of one cold 4 KiB read after another.
//!
//! A hint never changes what a read returns (the page cache is the file's
//! one view of its bytes); a failed hint is ignored. Ranges of
//! [`LARGE`] bytes or more get no hint: the kernel's own read-ahead already
//! follows a long sequential read, and a hint would only pin memory ahead
//! of it.

use std::os::fd::RawFd;

/// Ranges hinted ahead of the reader at most.
pub const WINDOW: usize = 64;

/// Ranges this long or longer are left to the kernel's read-ahead.
pub const LARGE: u64 = 256 << 10;

/// Keeps read-ahead hints [`WINDOW`] ranges ahead of an ordered reader.
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// Ranges `[0, hinted)` were hinted (or skipped).
    hinted: usize,
    /// Hints given (for tests and diagnostics).
    pub hints: u64,
}

impl ReadAhead {
    pub fn new() -> ReadAhead {
        ReadAhead::default()
    }

    /// The reader is about to read `ranges[at]` (`(offset, len)`, in
    /// reading order): hint every range of `ranges[at..at + WINDOW]` not
    /// hinted yet.
    pub fn before(&mut self, fd: RawFd, ranges: &[(u64, u64)], at: usize) {
        let end = at.saturating_add(WINDOW).min(ranges.len());
        self.hinted = self.hinted.max(at);
        while self.hinted < end {
            let (off, len) = ranges[self.hinted];
            self.hinted += 1;
            if len == 0 || len >= LARGE {
                continue;
            }
            if willneed(fd, off, len) {
                self.hints += 1;
            }
        }
    }
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)` over `len` bytes at `offset`:
/// starts reading them into the page cache without waiting for them.
/// False if the hint was refused (it is only a hint).
fn willneed(fd: RawFd, offset: u64, len: u64) -> bool {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: plain syscall on a descriptor the caller owns; no memory is
    // passed.
    unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_WILLNEED) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn hints_a_window_ahead_once_and_skips_long_ranges() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100 << 20).unwrap();
        let ranges: Vec<(u64, u64)> = (0..200u64)
            .map(|i| (i * 8192, if i % 10 == 9 { LARGE } else { 4096 }))
            .collect();
        let mut ra = ReadAhead::new();
        ra.before(f.as_raw_fd(), &ranges, 0);
        // 64 ranges, of which 6 (9, 19, ..., 59) are long.
        assert_eq!(ra.hints, 58);
        ra.before(f.as_raw_fd(), &ranges, 0);
        assert_eq!(ra.hints, 58, "nothing is hinted twice");
        ra.before(f.as_raw_fd(), &ranges, 1);
        assert_eq!(ra.hints, 59, "range 64 joins the window");
        // A reader that skipped ahead: ranges it passed get no hint.
        ra.before(f.as_raw_fd(), &ranges, 190);
        // Ranges 190..200 minus the long one (199).
        assert_eq!(ra.hints, 59 + 9);
        ra.before(f.as_raw_fd(), &ranges, 500);
        assert_eq!(ra.hints, 68, "past the end: nothing more");
    }
}
