//! Checksum resync and online verify: the pieces that do not touch the
//! network or the tracker (those live in [`crate::sender`] and
//! [`crate::receiver`]).
//!
//! Source and replica are split into the disk's tracking blocks (4 KiB by
//! default); each side computes the xxh3-128 digest of every block
//! ([`block_digest`], all-zero blocks short-cut to a constant), in parallel
//! on every core ([`digest_blocks`]). Digests travel in batches
//! ([`BATCH_BYTES`] of disk per request), so memory stays bounded whatever
//! the disk size; only the blocks whose digests differ are shipped, as one
//! ordinary `.hrl` log (one cycle, applied with an undo record, so the
//! receiver keeps its recovery history and the resync becomes a point).
//!
//! A resync that stops (network, receiver crash, clean restart of the
//! mount, kill -9 of the mount daemon) resumes from its [`Progress`]: the
//! compare offset it reached and the blocks found different so far. The
//! next attempt seals a new cut and re-reads only those blocks, the blocks
//! written since the previous cut (the tracker's bitmap; after a kill -9,
//! the extents of the disk's activity log,
//! [`crate::tracking::activity`]) and everything past the offset. A resync
//! after an unclean stop with the activity log on compares only the log's
//! extents (and the blocks of unshipped logs), starts at once whatever the
//! window, and is not resumed but redone if interrupted (it is small).
//!
//! The window for automatic resyncs is a [`Window`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

/// Disk bytes covered by one digest request (and one local hashing batch).
/// Small enough that glibc serves the buffers from its heap (no fresh
/// `mmap` + page faults per batch, which cost more than the hashing), large
/// enough that per-request costs vanish.
pub const BATCH_BYTES: u64 = 8 << 20;

/// Digest of a block the replica does not have (past its end). Never the
/// digest of real data in practice (xxh3-128 would have to produce 0).
pub const MISSING: u128 = 0;

/// Digest of one block: xxh3-128 of its bytes; all-zero blocks (holes) of
/// a given length always get the same value, computed without hashing.
pub fn block_digest(b: &[u8]) -> u128 {
    if is_zero(b) {
        zero_digest(b.len())
    } else {
        xxh3_128(b)
    }
}

/// All bytes zero? Checked 256 bytes at a time (vectorised OR), so a block
/// of data is rejected after its first bytes instead of being read twice
/// (once here, once by the hash).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Digest of `len` zero bytes (cached for the common block sizes).
pub fn zero_digest(len: usize) -> u128 {
    use std::sync::OnceLock;
    static Z4K: OnceLock<u128> = OnceLock::new();
    if len == 4096 {
        return *Z4K.get_or_init(|| xxh3_128(&[0u8; 4096]));
    }
    xxh3_128(&vec![0u8; len])
}

/// Threads used for hashing: every core the process may use, as found
/// the first time (each `available_parallelism` call reads the affinity
/// mask and three cgroup files: a 2 GiB compare asked 512 times).
pub fn hash_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 16)
    })
}

/// Pad `out` with [`MISSING`] for the whole blocks of a `span`-byte range
/// that lie past the `have` bytes the replica holds (a replica shorter than
/// the source).
pub fn pad_missing(out: &mut Vec<u128>, have: u64, span: u64, bs: u64) {
    let bs = bs.max(1);
    let got = have.div_ceil(bs);
    let want = span / bs;
    out.extend(std::iter::repeat_n(
        MISSING,
        want.saturating_sub(got) as usize,
    ));
}

/// Digests of the consecutive `bs`-byte blocks of `buf` (the last one may
/// be short), computed on `threads` threads.
pub fn digest_blocks(buf: &[u8], bs: usize, threads: usize) -> Vec<u128> {
    let bs = bs.max(1);
    let n = buf.len().div_ceil(bs);
    let mut out = vec![0u128; n];
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 || buf.len() < (1 << 20) {
        for (o, b) in out.iter_mut().zip(buf.chunks(bs)) {
            *o = block_digest(b);
        }
        return out;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, outs) in out.chunks_mut(per).enumerate() {
            let start = i * per * bs;
            let end = (start + outs.len() * bs).min(buf.len());
            let part = &buf[start..end];
            s.spawn(move || {
                for (o, b) in outs.iter_mut().zip(part.chunks(bs)) {
                    *o = block_digest(b);
                }
            });
        }
    });
    out
}

/// Digests of the consecutive `bs`-byte blocks of `parts` taken end to
/// end (read-only file mappings, not yet populated; every part but the
/// last a whole number of blocks), one thread per part: each thread faults
/// its part in ([`crate::util::mapped::populate`]), hashes it and unmaps
/// it, so mapping and unmapping the pages (more than the hashing when the
/// page cache holds 4 KiB folios) run on every core too. A part that
/// cannot be populated (past the file's end) is an error, never a `SIGBUS`.
pub fn digest_mapped(parts: Vec<memmap2::Mmap>, bs: usize) -> std::io::Result<Vec<u128>> {
    let bs = bs.max(1);
    let hash = |m: memmap2::Mmap| -> std::io::Result<Vec<u128>> {
        crate::util::mapped::populate(&m)?;
        Ok(m.chunks(bs).map(block_digest).collect())
    };
    if parts.len() <= 1 {
        return Ok(match parts.into_iter().next() {
            Some(m) => hash(m)?,
            None => Vec::new(),
        });
    }
    let done: Vec<std::io::Result<Vec<u128>>> = std::thread::scope(|s| {
        let hs: Vec<_> = parts
            .into_iter()
            .map(|m| s.spawn(move || hash(m)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::new();
    for d in done {
        out.extend(d?);
    }
    Ok(out)
}

/// Indices where `ours` and `theirs` differ (missing digests count as
/// different).
pub fn differing(ours: &[u128], theirs: &[u128]) -> Vec<usize> {
    ours.iter()
        .enumerate()
        .filter(|(i, d)| theirs.get(*i) != Some(d) || theirs.get(*i) == Some(&MISSING))
        .map(|(i, _)| i)
        .collect()
}

/// Block numbers (ascending) as merged runs `(first, count)`.
pub fn runs_of(blocks: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            Some((s, n)) if b < *s + *n => {} // duplicate
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Byte ranges `(offset, length)` of block runs, clipped to `size`.
pub fn byte_ranges(runs: &[(u64, u64)], bs: u64, size: u64) -> Vec<(u64, u64)> {
    runs.iter()
        .filter_map(|&(s, n)| {
            let a = s.saturating_mul(bs);
            let e = (s + n).saturating_mul(bs).min(size.max(a));
            (e > a).then_some((a, e - a))
        })
        .collect()
}

/// What a resync or verify is doing (shown by `vdrep status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResyncProgress {
    /// `resync` or `verify`.
    pub mode: String,
    pub disk: String,
    /// Blocks this pass will compare (after a resume: fewer than the disk).
    pub blocks_total: u64,
    pub blocks_compared: u64,
    /// Blocks that differ (shipped by a resync).
    pub blocks_differ: u64,
    /// Blocks shipped to the receiver (set once the log went out).
    pub blocks_sent: u64,
    /// Digest bytes received from the receiver.
    pub digest_bytes: u64,
    /// Disk bytes compared per second.
    pub rate_bps: f64,
    pub eta_secs: Option<f64>,
    /// Compare offset reached (disk bytes).
    pub offset: u64,
    /// This pass resumed an interrupted one (at `resumed_from`).
    pub resumed_from: Option<u64>,
    pub started_unix: u64,
}

/// Durable progress of an interrupted resync of one disk (JSON in the
/// mount's state folder).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub disk: String,
    /// Hex id of the disk.
    pub disk_id: String,
    pub block_size: u32,
    /// The replica cycle the compare was made against.
    pub replica_cycle: u64,
    /// Every block below this offset was compared (as of some cut since
    /// which the tracker's bitmap holds every write).
    pub compared_to: u64,
    /// Runs `(first block, count)` below `compared_to` found different.
    pub differ: Vec<(u64, u64)>,
    /// Identity of the daemon that wrote this (resuming across daemons
    /// needs a bitmap saved by a clean stop, or the activity log).
    pub daemon: String,
    /// Epoch of the disk's activity log ([`crate::tracking::activity`])
    /// read after the cut this progress was made at: while the log keeps
    /// that epoch, no extent left it since, so it holds every extent
    /// written since that cut, even across a kill -9 of the daemon. (Named
    /// after the touched-region map it replaced; the JSON keeps the name.)
    #[serde(default)]
    pub touch_epoch: Option<u64>,
}

impl Progress {
    pub fn load(path: &Path) -> Option<Progress> {
        let b = std::fs::read(path).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Write atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let b = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&b)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    pub fn differ_blocks(&self) -> u64 {
        self.differ.iter().map(|r| r.1).sum()
    }
}

/// When automatic resyncs may run: a [`crate::schedule::Calendar`] on
/// local time (`mon..fri 22:00-06:00; sat,sun`, `always`, ...). The
/// default is outside office hours: 18:00-08:00 and all weekend.
pub type Window = crate::schedule::Calendar;

/// Why a resync window is refused by [`Window::parse`].
pub type WindowError = crate::schedule::CalendarError;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digests_parallel_equal_serial() {
        let buf: Vec<u8> = (0..(3 << 20) + 1000).map(|i| (i * 7 % 251) as u8).collect();
        let a = digest_blocks(&buf, 4096, 1);
        let b = digest_blocks(&buf, 4096, 3);
        assert_eq!(a, b);
        assert_eq!(a.len(), buf.len().div_ceil(4096));
        assert_eq!(block_digest(&[0u8; 4096]), xxh3_128(&[0u8; 4096]));
        assert_eq!(block_digest(&[0u8; 100]), xxh3_128(&[0u8; 100]));
    }

    #[test]
    fn mapped_digests_equal_digests_of_the_bytes() {
        use std::io::Write;
        let buf: Vec<u8> = (0..(5 << 20) + 1000).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::tempfile().expect("temp");
        f.write_all(&buf).expect("write");
        let map = |off: usize, len: usize| {
            // SAFETY: test file, not shrunk while mapped.
            unsafe {
                memmap2::MmapOptions::new()
                    .offset(off as u64)
                    .len(len)
                    .map(&f)
                    .expect("map")
            }
        };
        let want = digest_blocks(&buf, 4096, 1);
        let split = 3 << 20;
        let parts = vec![map(0, split), map(split, buf.len() - split)];
        assert_eq!(digest_mapped(parts, 4096).expect("digests"), want);
        assert_eq!(
            digest_mapped(vec![map(0, buf.len())], 4096).expect("digests"),
            want
        );
    }

    #[test]
    fn runs_and_ranges() {
        assert_eq!(runs_of([1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(
            byte_ranges(&[(0, 2), (5, 1)], 4096, 5 * 4096 + 100),
            vec![(0, 8192), (5 * 4096, 100)]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Model: random source and replica that share most blocks; the
        /// blocks the compare picks are exactly the blocks whose bytes
        /// differ (including a size change at the end).
        #[test]
        fn compare_finds_exactly_the_differing_blocks(
            nblocks in 1usize..300,
            tail in 0usize..4096,
            seed in any::<u64>(),
            flips in proptest::collection::vec((any::<usize>(), any::<usize>(), 1u8..=255), 0..40),
            shrink in 0usize..3,
            threads in 1usize..4,
        ) {
            let bs = 4096usize;
            let len = nblocks * bs + tail;
            let mut x = seed | 1;
            let src: Vec<u8> = (0..len).map(|i| {
                if (i / bs) % 5 == 0 { return 0 } // some zero blocks
                x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8
            }).collect();
            let mut rep = src.clone();
            for (b, at, v) in &flips {
                let i = (b % nblocks) * bs + at % bs;
                rep[i] ^= v;
            }
            rep.truncate(len.saturating_sub(shrink * bs));
            let ours = digest_blocks(&src, bs, threads);
            let mut theirs = digest_blocks(&rep, bs, 2);
            // The receiver answers MISSING for blocks past its end.
            theirs.resize(ours.len(), MISSING);
            let got: Vec<usize> = differing(&ours, &theirs);
            let want: Vec<usize> = (0..ours.len()).filter(|&k| {
                let a = &src[k * bs..((k + 1) * bs).min(src.len())];
                let e = ((k + 1) * bs).min(rep.len());
                let b = if k * bs < rep.len() { &rep[k * bs..e] } else { &[][..] };
                a != b
            }).collect();
            prop_assert_eq!(got, want);
        }
    }
}
