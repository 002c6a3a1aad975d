//! Read-ahead hints for a reader that reads many scattered ranges of one
//! file in a known order (the dirty blocks of a sealed cycle, the
//! pre-images of a replica): [`ReadAhead`] keeps `posix_fadvise(WILLNEED)`
//! hints a window of ranges ahead of the reader, so the disk serves that
//! many reads at once instead of one cold 4 KiB read after another.
//!
//! A hint never changes what a read returns (the page cache is the file's
//! one view of its bytes); a failed hint is ignored. Ranges of [`LARGE`]
//! bytes or more are not hinted whole (that would pin up to the whole range
//! in memory ahead of the reader): a reader going through one in pieces
//! keeps [`BYTES_AHEAD`] of it hinted ahead of itself with
//! [`ReadAhead::within`], [`PIECE`] bytes per hint. The kernel's own
//! read-ahead alone is not enough: a buffered sequential read of 1 MiB
//! pieces ran at 542 MB/s on the test host's virtio disk, 2,163 MB/s with
//! 1 MiB hints kept 8 MiB ahead (`kernel-notes/replication-speed.md`,
//! session 17).

use std::os::fd::RawFd;

/// Ranges hinted ahead of the reader at most.
pub const WINDOW: usize = 64;

/// Ranges this long or longer are hinted piece by piece as the reader
/// goes through them ([`ReadAhead::within`]), not whole.
pub const LARGE: u64 = 256 << 10;

/// Bytes of a long range kept hinted ahead of the reader.
pub const BYTES_AHEAD: u64 = 8 << 20;

/// Bytes per hint inside a long range: a hint allocates its pages and
/// submits their reads before it returns, so one hint of many MiB stalls
/// the reader (4–32 MiB hints refilled at half the window: 1.3–1.7 GB/s,
/// against 2.1 GB/s with 1 MiB hints).
pub const PIECE: u64 = 1 << 20;

/// Keeps read-ahead hints [`WINDOW`] ranges ahead of an ordered reader.
#[derive(Debug, Default)]
pub struct ReadAhead {
    /// Ranges `[0, hinted)` were hinted (or skipped).
    hinted: usize,
    /// The long range the reader is in (its start) and the end of what
    /// was hinted of it.
    long: Option<(u64, u64)>,
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

    /// The reader is about to read from `pos` on inside the range
    /// `(offset, len)`: if that range is [`LARGE`], keep its next
    /// [`BYTES_AHEAD`] bytes hinted, [`PIECE`] bytes per hint. Shorter
    /// ranges are [`before`](Self::before)'s.
    pub fn within(&mut self, fd: RawFd, range: (u64, u64), pos: u64) {
        let (start, len) = range;
        if len < LARGE {
            return;
        }
        let end = start.saturating_add(len);
        let mut to = match self.long {
            Some((s, to)) if s == start => to.max(pos),
            _ => pos.max(start),
        };
        let want = pos.saturating_add(BYTES_AHEAD).min(end);
        while to < want {
            let n = PIECE.min(end - to);
            if willneed(fd, to, n) {
                self.hints += 1;
            }
            to += n;
        }
        self.long = Some((start, to));
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

    #[test]
    fn keeps_a_byte_window_hinted_inside_a_long_range() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100 << 20).unwrap();
        let fd = f.as_raw_fd();
        let mut ra = ReadAhead::new();
        // A short range: `before`'s, not `within`'s.
        ra.within(fd, (0, LARGE - 1), 0);
        assert_eq!(ra.hints, 0);
        // A 20 MiB range from 1 MiB: the first 8 MiB, one MiB per hint.
        let long = (1 << 20, 20 << 20);
        ra.within(fd, long, 1 << 20);
        assert_eq!(ra.hints, BYTES_AHEAD / PIECE);
        ra.within(fd, long, 1 << 20);
        assert_eq!(ra.hints, 8, "nothing is hinted twice");
        // One MiB read: one more MiB joins the window.
        ra.within(fd, long, 2 << 20);
        assert_eq!(ra.hints, 9);
        // A reader that skipped ahead to 18 MiB: what it passed gets no
        // hint, and nothing goes past the range's end (21 MiB).
        ra.within(fd, long, 18 << 20);
        assert_eq!(ra.hints, 12, "18..21 MiB: three hints");
        ra.within(fd, long, 20 << 20);
        assert_eq!(ra.hints, 12);
        // The next long range starts its own window, ending in a short piece.
        ra.within(fd, (40 << 20, (1 << 20) + 4096), 40 << 20);
        assert_eq!(ra.hints, 14);
    }
}
