//! Durable coarse map of the regions of a disk written while a checksum
//! resync of it is in progress (`disks/<folder>/touched`).
//!
//! A resync compares the disk as of its cut and saves its progress (the
//! offset reached, the blocks found different) every few seconds. To resume
//! after the mount daemon is killed, the next daemon must know which blocks
//! below that offset changed since the cut: the in-memory dirty bitmap died
//! with the daemon. So, from just before the resync's first cut until the
//! resync completes (across daemon restarts: the map is loaded when the
//! disk is attached, before any write), the **first** write to each region
//! sets the region's bit in this file and `fdatasync`s it before the write
//! itself is made (and hence before it is acknowledged). Later writes to a
//! region find its bit set in memory and cost one shared lock. Outside a
//! resync there is no map and a write costs one atomic load.
//!
//! Layout (little endian): magic `VDREPTM1`, `epoch: u64` (random, names
//! this map in the resync's progress file), `region_shift: u32`, `0u32`,
//! then one bit per region (region `r` = byte `r / 8`, bit `r % 8`). A bit
//! is set by a one-byte `pwrite` + `fdatasync`, so a crash leaves either the
//! old or the new byte. A file that does not parse is ignored (the resync
//! then compares everything again).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 8] = b"VDREPTM1";
const HEADER: u64 = 24;

/// Region size for a disk of `size` bytes: about 4096 regions, between
/// 1 MiB and 64 MiB (a power of two).
pub fn region_shift_for(size: u64) -> u32 {
    let want = (size / 4096).max(1).next_power_of_two();
    want.trailing_zeros().clamp(20, 26)
}

/// The map of one disk (see the module docs).
pub struct TouchMap {
    file: File,
    pub epoch: u64,
    shift: u32,
    bits: Vec<u8>,
}

impl TouchMap {
    /// Write a fresh, empty map for a disk of `size` bytes into `file`
    /// (opened for writing, empty) and make it durable. The caller renames
    /// it into place and syncs the folder.
    pub fn create(file: File, size: u64, epoch: u64) -> io::Result<TouchMap> {
        let shift = region_shift_for(size);
        let regions = size.div_ceil(1 << shift).max(1);
        let bits = vec![0u8; regions.div_ceil(8) as usize];
        let mut head = Vec::with_capacity(HEADER as usize + bits.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&epoch.to_le_bytes());
        head.extend_from_slice(&shift.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&bits);
        file.write_all_at(&head, 0)?;
        file.sync_all()?;
        Ok(TouchMap {
            file,
            epoch,
            shift,
            bits,
        })
    }

    /// Parse a map from `file` (opened read-write); `None` if it is not one.
    pub fn load(file: File) -> io::Result<Option<TouchMap>> {
        let len = file.metadata()?.len();
        if !(HEADER..=HEADER + (64 << 20)).contains(&len) {
            return Ok(None);
        }
        let mut b = vec![0u8; len as usize];
        file.read_exact_at(&mut b, 0)?;
        if &b[..8] != MAGIC {
            return Ok(None);
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&b[8..16]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[16..20]);
        let (epoch, shift) = (u64::from_le_bytes(e), u32::from_le_bytes(s));
        if epoch == 0 || !(9..=40).contains(&shift) {
            return Ok(None);
        }
        let bits = b.split_off(HEADER as usize);
        Ok(Some(TouchMap {
            file,
            epoch,
            shift,
            bits,
        }))
    }

    fn regions(&self, lo: u64, hi: u64) -> std::ops::RangeInclusive<u64> {
        (lo >> self.shift)..=(hi >> self.shift)
    }

    fn get(&self, r: u64) -> bool {
        self.bits
            .get((r / 8) as usize)
            .is_some_and(|b| b & (1 << (r % 8)) != 0)
    }

    /// Every region of bytes `lo..=hi` already marked?
    pub fn covers(&self, lo: u64, hi: u64) -> bool {
        self.regions(lo, hi).all(|r| self.get(r))
    }

    /// Mark the regions of bytes `lo..=hi`; durable when this returns.
    pub fn touch(&mut self, lo: u64, hi: u64) -> io::Result<()> {
        let (mut first, mut last) = (usize::MAX, 0usize);
        for r in self.regions(lo, hi) {
            if self.get(r) {
                continue;
            }
            let i = (r / 8) as usize;
            if i >= self.bits.len() {
                self.bits.resize(i + 1, 0);
            }
            self.bits[i] |= 1 << (r % 8);
            first = first.min(i);
            last = last.max(i);
        }
        if first > last {
            return Ok(());
        }
        self.file
            .write_all_at(&self.bits[first..=last], HEADER + first as u64)?;
        self.file.sync_data()
    }

    /// The marked regions as block runs `(first block, count)` of
    /// `block_size`-byte blocks.
    pub fn block_runs(&self, block_size: u64) -> Vec<(u64, u64)> {
        let per = ((1u64 << self.shift) / block_size.max(1)).max(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..self.bits.len() as u64 * 8 {
            if !self.get(r) {
                continue;
            }
            match out.last_mut() {
                Some((s, n)) if *s + *n == r * per => *n += per,
                _ => out.push((r * per, per)),
            }
        }
        out
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        1 << self.shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile() -> File {
        let p = std::env::temp_dir().join(format!(
            "vdrep-touch-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn touch_is_durable_and_reloads() {
        let f = tmpfile();
        let g = f.try_clone().unwrap();
        let size = 256u64 << 20;
        assert_eq!(region_shift_for(size), 20);
        assert_eq!(region_shift_for(2 << 40), 26);
        let mut m = TouchMap::create(f, size, 77).unwrap();
        assert!(!m.covers(0, 0));
        m.touch(5 << 20, (5 << 20) + 4095).unwrap();
        m.touch((7 << 20) - 1, 7 << 20).unwrap(); // spans regions 6 and 7
        m.touch(300 << 20, 300 << 20).unwrap(); // past the size at creation
        assert!(m.covers(5 << 20, (6 << 20) - 1));
        let l = TouchMap::load(g).unwrap().unwrap();
        assert_eq!(l.epoch, 77);
        assert_eq!(
            l.block_runs(4096),
            vec![(5 * 256, 3 * 256), (300 * 256, 256)]
        );
    }

    #[test]
    fn garbage_is_not_a_map() {
        let f = tmpfile();
        f.write_all_at(b"not a touched map at all....", 0).unwrap();
        assert!(TouchMap::load(f).unwrap().is_none());
    }
}
