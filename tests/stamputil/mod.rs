//! Stamped writes for crash-consistency checks: a writer thread that
//! stamps a sequence number into every 4 KiB block it writes (direct I/O,
//! random blocks of one VM's disks), and the check that a recovery point
//! holds exactly the writes up to some sequence number on every disk.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const DISK_BYTES: u64 = 8 << 20;
pub const BLK: usize = 4096;

/// The content of a block written by write `seq` (fully determined).
pub fn stamp(seq: u64, disk: usize, block: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..16].copy_from_slice(&((disk as u64) << 32 | block).to_le_bytes());
    let f = (seq.wrapping_mul(31) ^ block) as u8;
    out[16..].fill(f);
}

/// The sequence number in a block read back (0: never written); panics on
/// a torn or foreign block.
pub fn read_stamp(b: &[u8], disk: usize, block: u64, what: &str) -> u64 {
    if b.iter().all(|&x| x == 0) {
        return 0;
    }
    let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
    let mut want = vec![0u8; BLK];
    stamp(seq, disk, block, &mut want);
    assert!(
        b == &want[..],
        "{what}: disk {disk} block {block} is torn or foreign (stamp {seq})"
    );
    seq
}

/// Consistent iff some s makes every block hold its last write with
/// seq <= s; s can only be the largest stamp seen (see the argument in
/// the function body). Returns it.
pub fn check_consistent(
    what: &str,
    disks: &[Vec<u8>],
    history: &HashMap<(usize, u64), Vec<u64>>,
) -> u64 {
    consistent(what, disks, history).unwrap_or_else(|e| panic!("{e}"))
}

/// [`check_consistent`], answering instead of panicking on an
/// inconsistent state (a torn block still panics).
pub fn consistent(
    what: &str,
    disks: &[Vec<u8>],
    history: &HashMap<(usize, u64), Vec<u64>>,
) -> Result<u64, String> {
    // If the point is the state after write s, every stamp is <= s, so the
    // largest stamp M <= s; no write in (M, s] exists (it would be the last
    // write <= s of its block, a stamp > M), so the state after s equals the
    // state after M: checking s = M is necessary and sufficient.
    let mut seen = HashMap::new();
    let mut max = 0;
    for (d, data) in disks.iter().enumerate() {
        for (b, blk) in data.chunks(BLK).enumerate() {
            let s = read_stamp(blk, d, b as u64, what);
            max = max.max(s);
            seen.insert((d, b as u64), s);
        }
    }
    for ((d, b), s) in &seen {
        let want = history
            .get(&(*d, *b))
            .and_then(|v| v.iter().rev().find(|&&x| x <= max).copied())
            .unwrap_or(0);
        if *s != want {
            return Err(format!(
                "{what}: not crash-consistent: disk {d} block {b} holds write {s}, but the state after write {max} (the newest write in the point) has {want} there"
            ));
        }
    }
    Ok(max)
}

/// 4 KiB-aligned buffer for O_DIRECT.
pub struct Aligned(*mut u8);
impl Aligned {
    pub fn new() -> Aligned {
        let l = std::alloc::Layout::from_size_align(BLK, BLK).unwrap();
        // SAFETY: non-zero size layout.
        Aligned(unsafe { std::alloc::alloc_zeroed(l) })
    }
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: allocated with BLK bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0, BLK) }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        let l = std::alloc::Layout::from_size_align(BLK, BLK).unwrap();
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(self.0, l) }
    }
}

/// A writer thread: stamped 4 KiB direct-I/O writes to random blocks of
/// `paths` (one VM's disks) until `stop`; returns (seq, disk, block) of
/// every write. With `quiesce`, it behaves like a guest under fsfreeze:
/// when `quiesce/freeze-req` appears it syncs, reports the last sequence
/// number it wrote in `quiesce/frozen` and blocks until the request goes.
/// A failed write (the mount went away) ends it; that write is logged
/// too (it may have landed) and the error kept ([`Written::failed`]).
pub fn stamp_writer(
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    seed: u64,
    quiesce: Option<PathBuf>,
) -> std::thread::JoinHandle<Written> {
    stamp_writer_after(0, paths, stop, written, seed, quiesce)
}

/// [`stamp_writer`] continuing the sequence of an earlier writer that
/// wrote `after` writes (its first write is `after + 1`).
pub fn stamp_writer_after(
    after: u64,
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    seed: u64,
    quiesce: Option<PathBuf>,
) -> std::thread::JoinHandle<Written> {
    std::thread::spawn(move || {
        let files: Vec<std::fs::File> = paths
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(p)
                    .unwrap()
            })
            .collect();
        let mut buf = Aligned::new();
        let mut x = seed;
        let mut log = Vec::new();
        let mut seq = after;
        while !stop.load(Ordering::Relaxed) {
            if let Some(q) = quiesce.as_ref().filter(|q| q.join("freeze-req").exists()) {
                for f in &files {
                    f.sync_all().unwrap();
                }
                std::fs::write(q.join("frozen.tmp"), seq.to_string()).unwrap();
                std::fs::rename(q.join("frozen.tmp"), q.join("frozen")).unwrap();
                while q.join("freeze-req").exists() && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            seq += 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = (x % files.len() as u64) as usize;
            let b = (x >> 8) % (DISK_BYTES / BLK as u64);
            stamp(seq, d, b, buf.buf());
            let r = files[d].write_all_at(buf.buf(), b * BLK as u64);
            log.push((seq, d, b));
            if let Err(e) = r {
                return Written {
                    log,
                    failed: Some(format!("write {seq}: {e}")),
                };
            }
            written.store(seq, Ordering::Relaxed);
            if seq % 8 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Written { log, failed: None }
    })
}

/// What a [`stamp_writer`] wrote: (seq, disk, block) of every write.
pub struct Written {
    pub log: Vec<(u64, usize, u64)>,
    /// The error that ended it early.
    pub failed: Option<String>,
}

impl Written {
    /// The log, asserting that every write succeeded.
    pub fn all_ok(self) -> Vec<(u64, usize, u64)> {
        assert!(
            self.failed.is_none(),
            "the writer failed: {:?}",
            self.failed
        );
        self.log
    }
}

/// Every write's sequence numbers, by (disk, block), in order.
pub fn history(log: &[(u64, usize, u64)]) -> HashMap<(usize, u64), Vec<u64>> {
    let mut h: HashMap<(usize, u64), Vec<u64>> = HashMap::new();
    for &(s, d, b) in log {
        h.entry((d, b)).or_default().push(s);
    }
    h
}

/// Read every disk `dN.img` of `vm`'s point `p` from the store into
/// `disks[N]`.
pub fn read_point_disks(
    st: &vdrep::replica::Site<'_>,
    vm: &str,
    p: &vdrep::replica::Point,
    disks: &mut [Vec<u8>],
) {
    for idh in &p.disks {
        let mut id = [0u8; 16];
        for (i, o) in id.iter_mut().enumerate() {
            *o = u8::from_str_radix(&idh[2 * i..2 * i + 2], 16).unwrap();
        }
        let name = st.disk_state(vm, &id).unwrap().name;
        let i: usize = name[1..name.len() - 4].parse().unwrap();
        let rd = st.read_point(vm, &id, p.cycle).unwrap();
        let mut b = vec![0u8; DISK_BYTES as usize];
        rd.read_at(&mut b, 0).unwrap();
        disks[i] = b;
    }
}
