//! The activity log of a disk (`disks/<folder>/al`): the durable set of the
//! 4 MiB extents that may hold writes not yet durably tracked in a sealed
//! cycle (DRBD's activity log, issue 15).
//!
//! **Rule (the crash-safety argument, `kernel-notes/activity-log.md`):**
//! before the first write into an extent that is not *hot*, the extent's bit
//! is written into this file and `fdatasync`ed; only then does the write
//! reach the backing file (and hence only then is it acknowledged). Later
//! writes into a hot extent cost one shared lock and an atomic load. An
//! extent leaves lazily, when a cycle of the disk finished well (its log is
//! durable, or the receiver applied it) and no write since that cycle's cut
//! touched it ([`ActivityLog::prune`], driven by the tracker under its cut
//! lock, so no write is between its check here and its bitmap mark) **and**
//! the log holds more than its budget of hot extents: the least recently
//! written idle extents leave first ([`ActivityLog::victims`]), DRBD's
//! `al-extents`. A random writer over a disk no larger than the budget then
//! pays its syncs once, not again after every cut (with continuous cycles,
//! that was one sync per write: `kernel-notes/activity-log.md`); an unclean
//! stop compares at most the budget's extents more.
//!
//! So after any stop, clean or not, every block written since the disk's
//! last finished cycle lies in an extent whose bit is set in the file: an
//! unclean stop needs only those extents compared with the replica (plus
//! the blocks of the sealed logs not shipped yet), not the whole disk. The
//! same set is what a resync interrupted by a kill -9 of the daemon needs
//! to resume (the blocks written since its cut): the [`epoch`]
//! (`ActivityLog::epoch`) changes before any bit is cleared, so a resync's
//! progress that recorded the epoch knows whether the log still holds every
//! extent written since its cut. That replaces the former touched-region
//! map, which was this mechanism restricted to resyncs.
//!
//! Layout (little endian): magic `VDREPAL1`, `epoch: u64`, `extent_shift:
//! u32`, `0u32`, then one bit per extent (extent `e` = byte `e / 8`, bit
//! `e % 8`). Setting bits is a `pwrite` of the changed bytes + `fdatasync`
//! (a crash leaves each byte old or new); clearing bits is a `pwrite`
//! without a sync (a lost clear only over-approximates). A bitmap rather
//! than DRBD's ring of transactions: bounded (32 KiB per TiB), no replay,
//! no slot eviction: the set shrinks only at cuts, and only the extents
//! above the budget.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::bitmap::Bitmap;

/// File name in the disk's state folder.
pub const FILE: &str = "al";
/// Extent size: 4 MiB (a power of two).
pub const EXTENT_SHIFT: u32 = 22;
const MAGIC: &[u8; 8] = b"VDREPAL1";
const HEADER: u64 = 24;

/// A disk's activity log (see the module docs).
pub struct ActivityLog {
    /// Extents whose bit is durable in the file. Set only under `inner`'s
    /// lock, after the sync; cleared only by [`ActivityLog::prune`].
    hot: RwLock<Bitmap>,
    inner: Mutex<Inner>,
    /// Cold extents announced by writers waiting for `inner` (group
    /// commit: whoever syncs next takes them all in the same sync).
    pending: Mutex<Vec<u64>>,
    /// `fdatasync`s made for new extents (the write path's extra cost).
    syncs: AtomicU64,
    /// Recency: per extent, the prune round in which it was last recorded
    /// or seen busy (in memory only: after a restart every hot extent is
    /// as old as the others).
    used: Mutex<Recency>,
}

#[derive(Default)]
struct Recency {
    round: u64,
    used: Vec<u64>,
}

impl Recency {
    fn touch(&mut self, e: u64) {
        let i = e as usize;
        if i >= self.used.len() {
            self.used.resize(i + 1, 0);
        }
        self.used[i] = self.round;
    }

    fn of(&self, e: u64) -> u64 {
        self.used.get(e as usize).copied().unwrap_or(0)
    }
}

struct Inner {
    file: File,
    epoch: u64,
    /// The file's bit bytes as last written.
    image: Vec<u8>,
}

fn bit(image: &[u8], e: u64) -> bool {
    image
        .get((e / 8) as usize)
        .is_some_and(|b| b & (1 << (e % 8)) != 0)
}

/// Parse a log's bytes: `(epoch, bit bytes)`; `None` if it is not one.
fn parse(b: &[u8]) -> Option<(u64, Vec<u8>)> {
    if b.len() < HEADER as usize || &b[..8] != MAGIC {
        return None;
    }
    let epoch = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let shift = u32::from_le_bytes(b[16..20].try_into().ok()?);
    if epoch == 0 || shift != EXTENT_SHIFT {
        return None;
    }
    Some((epoch, b[HEADER as usize..].to_vec()))
}

fn new_epoch_value(old: u64) -> u64 {
    let r = u64::from_le_bytes(crate::util::random_id()[..8].try_into().unwrap_or([7u8; 8]));
    if r == 0 || r == old {
        old.wrapping_add(1).max(1)
    } else {
        r
    }
}

/// Extents `first..=last` covering bytes `lo..=hi`.
pub fn extents_of(lo: u64, hi: u64) -> (u64, u64) {
    (lo >> EXTENT_SHIFT, hi >> EXTENT_SHIFT)
}

impl ActivityLog {
    /// A fresh, empty log written into `file` (opened read-write, empty)
    /// and made durable. The caller syncs the folder it was created in.
    pub fn create(file: File) -> io::Result<ActivityLog> {
        let epoch = new_epoch_value(0);
        let mut head = Vec::with_capacity(HEADER as usize);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&epoch.to_le_bytes());
        head.extend_from_slice(&EXTENT_SHIFT.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        file.set_len(0)?;
        file.write_all_at(&head, 0)?;
        file.sync_all()?;
        Ok(Self::from_parts(file, epoch, Vec::new()))
    }

    fn from_parts(file: File, epoch: u64, image: Vec<u8>) -> ActivityLog {
        let hot = Bitmap::new(image.len() as u64 * 8);
        for e in 0..image.len() as u64 * 8 {
            if bit(&image, e) {
                hot.set_range(e, e);
            }
        }
        ActivityLog {
            hot: RwLock::new(hot),
            inner: Mutex::new(Inner { file, epoch, image }),
            pending: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            used: Mutex::new(Recency::default()),
        }
    }

    /// Parse the log in `file` (opened read-write); `None` if it is not one.
    pub fn load(file: File) -> io::Result<Option<ActivityLog>> {
        match read_all(&file)?.as_deref().and_then(parse) {
            Some((epoch, image)) => Ok(Some(Self::from_parts(file, epoch, image))),
            None => Ok(None),
        }
    }

    /// The extents named by the log in `file`, ascending; `None` if it is
    /// not a log.
    pub fn read_extents(file: &File) -> io::Result<Option<Vec<u64>>> {
        Ok(read_all(file)?.as_deref().and_then(parse).map(|(_, img)| {
            (0..img.len() as u64 * 8)
                .filter(|&e| bit(&img, e))
                .collect()
        }))
    }

    /// Are all extents of bytes `lo..=hi` hot (durable in the log)? The
    /// write path's fast check.
    #[inline]
    pub fn covers(&self, lo: u64, hi: u64) -> bool {
        let (f, l) = extents_of(lo, hi);
        let hot = self.hot.read();
        (f..=l).all(|e| hot.get(e))
    }

    /// Is extent `e` hot?
    #[inline]
    pub fn is_hot(&self, e: u64) -> bool {
        self.hot.read().get(e)
    }

    /// Make the extents of bytes `lo..=hi` durable in the log (a no-op for
    /// hot ones); when this returns, a write into them may proceed.
    /// Group commit: writers to cold extents announce them, then queue on
    /// one lock; the writer holding it syncs every extent announced so far,
    /// so the writers that waited meanwhile find theirs hot and return
    /// without a sync of their own (N concurrent writers: ~2 syncs, not N).
    pub fn record(&self, lo: u64, hi: u64) -> io::Result<()> {
        let (f, l) = extents_of(lo, hi);
        self.record_extents(f..=l)
    }

    /// [`ActivityLog::record`] for a list of extents.
    pub fn record_extents(&self, extents: impl IntoIterator<Item = u64>) -> io::Result<()> {
        let mine: Vec<u64> = {
            let hot = self.hot.read();
            extents.into_iter().filter(|&e| !hot.get(e)).collect()
        };
        if mine.is_empty() {
            return Ok(());
        }
        self.pending.lock().extend_from_slice(&mine);
        let mut g = self.inner.lock();
        // Taken by the writer that synced while we waited? (A failed sync
        // leaves them cold: then this writer syncs them itself.)
        let mut batch = std::mem::take(&mut *self.pending.lock());
        batch.extend_from_slice(&mine);
        batch.sort_unstable();
        batch.dedup();
        let batch: Vec<u64> = {
            let hot = self.hot.read();
            batch.into_iter().filter(|&e| !hot.get(e)).collect()
        };
        let mut new = Vec::new();
        for e in batch {
            let i = (e / 8) as usize;
            if i >= g.image.len() {
                g.image.resize(i + 1, 0);
            }
            // Set in the file image already (a prune cleared only the hot
            // bit in memory, or another writer of the same byte): the
            // byte still goes out with this sync, which is harmless.
            g.image[i] |= 1 << (e % 8);
            new.push(e);
        }
        if new.is_empty() {
            return Ok(());
        }
        let first = (new.iter().min().copied().unwrap_or(0) / 8) as usize;
        let last = (new.iter().max().copied().unwrap_or(0) / 8) as usize;
        g.file
            .write_all_at(&g.image[first..=last], HEADER + first as u64)?;
        g.file.sync_data()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        {
            let mut used = self.used.lock();
            for &e in &new {
                used.touch(e);
            }
        }
        let mut hot = self.hot.write();
        if let Some(&max) = new.iter().max() {
            hot.grow(max + 1);
        }
        for e in new {
            hot.set_range(e, e);
        }
        Ok(())
    }

    /// The log's epoch: it changes (durably) before any extent leaves.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Hot extents, ascending.
    pub fn extents(&self) -> Vec<u64> {
        let hot = self.hot.read();
        hot.runs(u64::MAX)
            .into_iter()
            .flat_map(|(s, n)| s..s + n)
            .collect()
    }

    /// Hot extents as block runs `(first block, count)` of `block_size`-byte
    /// blocks.
    pub fn block_runs(&self, block_size: u64) -> Vec<(u64, u64)> {
        let per = ((1u64 << EXTENT_SHIFT) / block_size.max(1)).max(1);
        self.hot
            .read()
            .runs(u64::MAX)
            .into_iter()
            .map(|(s, n)| (s * per, n * per))
            .collect()
    }

    /// `fdatasync`s made for new extents since the log was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// One prune round's choice: every hot extent for which `used` holds
    /// (written since the last round) is marked as used now; if more than
    /// `budget` extents are hot, the least recently used ones (ties: lowest
    /// first) are returned, as many as are above the budget. The caller
    /// keeps those that are still busy (written since the last cut) when it
    /// prunes, so fewer may leave. Empty:
    /// nothing to let go, so no epoch change and no write is needed.
    /// Called without the cut lock: a write that makes a victim busy
    /// meanwhile is seen by [`ActivityLog::prune`]'s `keep`, which the
    /// caller re-checks under the lock.
    pub fn victims(&self, used_now: impl Fn(u64) -> bool, budget: u64) -> Vec<u64> {
        let all = self.extents();
        let mut used = self.used.lock();
        used.round += 1;
        for &e in &all {
            if used_now(e) {
                used.touch(e);
            }
        }
        let excess = (all.len() as u64).saturating_sub(budget) as usize;
        if excess == 0 {
            return Vec::new();
        }
        let mut order = all;
        order.sort_by_key(|&e| (used.of(e), e));
        order.truncate(excess);
        order
    }

    /// First step of a prune: durably move to a new epoch (a crash after it
    /// leaves the new epoch with the old, larger set: safe). Call without
    /// the cut lock (it syncs), before [`ActivityLog::prune`].
    pub fn advance_epoch(&self) -> io::Result<()> {
        let mut g = self.inner.lock();
        let e = new_epoch_value(g.epoch);
        g.file.write_all_at(&e.to_le_bytes(), 8)?;
        g.file.sync_data()?;
        g.epoch = e;
        Ok(())
    }

    /// Remove every hot extent for which `keep` is false. The caller holds
    /// its disk's cut lock exclusively (no write is between its check
    /// here and its bitmap mark) and called [`ActivityLog::advance_epoch`]
    /// first. The cleared bits are written without a sync. Returns how many
    /// extents left.
    pub fn prune(&self, keep: impl Fn(u64) -> bool) -> io::Result<u64> {
        let mut g = self.inner.lock();
        let hot = self.hot.read();
        let (mut first, mut last, mut n) = (usize::MAX, 0usize, 0u64);
        for (s, c) in hot.runs(u64::MAX) {
            for e in s..s + c {
                if keep(e) {
                    continue;
                }
                hot.clear(e);
                let i = (e / 8) as usize;
                if let Some(b) = g.image.get_mut(i) {
                    *b &= !(1 << (e % 8));
                }
                first = first.min(i);
                last = last.max(i);
                n += 1;
            }
        }
        if n > 0 && last < g.image.len() {
            g.file
                .write_all_at(&g.image[first..=last], HEADER + first as u64)?;
        }
        Ok(n)
    }

    /// Is any extent hot?
    pub fn any_hot(&self) -> bool {
        self.hot.read().count() > 0
    }
}

fn read_all(file: &File) -> io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if !(HEADER..=HEADER + (64 << 20)).contains(&len) {
        return Ok(None);
    }
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, 0)?;
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(tag: &str) -> File {
        let p = std::env::temp_dir().join(format!(
            "vdrep-al-{tag}-{}-{:?}",
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

    const MIB: u64 = 1 << 20;

    #[test]
    fn records_are_durable_and_reload() {
        let f = tmpfile("reload");
        let g = f.try_clone().unwrap();
        let al = ActivityLog::create(f).unwrap();
        assert!(!al.covers(0, 0));
        al.record(5 * MIB, 5 * MIB + 4095).unwrap(); // extent 1
        al.record(8 * MIB - 1, 8 * MIB).unwrap(); // extents 1 and 2
        al.record(300 * MIB, 300 * MIB).unwrap(); // extent 75
        assert_eq!(al.syncs(), 3);
        al.record(4 * MIB, 12 * MIB - 1).unwrap(); // all hot: no sync
        assert_eq!(al.syncs(), 3);
        assert!(al.covers(4 * MIB, 12 * MIB - 1));
        assert_eq!(ActivityLog::read_extents(&g).unwrap(), Some(vec![1, 2, 75]));
        let l = ActivityLog::load(g).unwrap().unwrap();
        assert_eq!(l.epoch(), al.epoch());
        assert_eq!(l.extents(), vec![1, 2, 75]);
        assert_eq!(l.block_runs(4096), vec![(1024, 2048), (75 * 1024, 1024)]);
    }

    #[test]
    fn prune_clears_durably_after_a_new_epoch() {
        let f = tmpfile("prune");
        let g = f.try_clone().unwrap();
        let al = ActivityLog::create(f).unwrap();
        al.record_extents([0, 3, 9, 17]).unwrap();
        let e0 = al.epoch();
        al.advance_epoch().unwrap();
        assert_ne!(al.epoch(), e0);
        assert_eq!(al.prune(|e| e == 9).unwrap(), 3);
        assert_eq!(al.extents(), vec![9]);
        assert!(!al.covers(0, 0));
        // A write into a pruned extent logs it again.
        al.record(3 << EXTENT_SHIFT, 3 << EXTENT_SHIFT).unwrap();
        let l = ActivityLog::load(g).unwrap().unwrap();
        assert_eq!(l.extents(), vec![3, 9]);
        assert_eq!(l.epoch(), al.epoch());
    }

    /// The budget: nothing leaves while the log holds at most `budget`
    /// extents; above it the least recently used extents are chosen first
    /// (recorded, or reported used by the caller at a round).
    #[test]
    fn victims_are_the_least_recently_used_extents_above_the_budget() {
        let al = ActivityLog::create(tmpfile("lru")).unwrap();
        al.record_extents([0, 1, 2]).unwrap(); // round 0
        assert!(al.victims(|_| false, 3).is_empty(), "at the budget");
        // Round 2: extents 0 and 2 were used; 5 and 6 enter.
        assert!(al.victims(|e| e == 0 || e == 2, 8).is_empty());
        al.record_extents([5, 6]).unwrap();
        // 5 hot, budget 3: the two least recently used: 1 (round 0), then
        // 0 (round 2; ties go lowest first).
        assert_eq!(al.victims(|_| false, 3), vec![1, 0]);
        // Round 4: all but 6 used: 6 is now the oldest.
        assert_eq!(al.victims(|e| e != 6, 4), vec![6]);
        // Budget 0: every extent, oldest first.
        assert_eq!(al.victims(|e| e == 2, 0), vec![6, 0, 1, 5, 2]);
        let v = [0, 1, 5, 6];
        al.advance_epoch().unwrap();
        assert_eq!(al.prune(|e| !v.contains(&e)).unwrap(), 4);
        assert_eq!(al.extents(), vec![2]);
    }

    /// Group commit: writers entering different cold extents at once share
    /// syncs, and every one of them returns with its extent durable.
    #[test]
    fn concurrent_cold_extents_share_syncs() {
        let f = tmpfile("group");
        let al = std::sync::Arc::new(ActivityLog::create(f.try_clone().unwrap()).unwrap());
        let writers = 16u64;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(writers as usize));
        let threads: Vec<_> = (0..writers)
            .map(|i| {
                let (al, barrier) = (al.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let lo = (i * 3) << EXTENT_SHIFT;
                    al.record(lo, lo + 4095).unwrap();
                    assert!(al.covers(lo, lo + 4095));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let want: Vec<u64> = (0..writers).map(|i| i * 3).collect();
        assert_eq!(al.extents(), want);
        assert_eq!(ActivityLog::read_extents(&f).unwrap(), Some(want));
        println!("{writers} writers, {} syncs", al.syncs());
        assert!(
            al.syncs() < writers,
            "{} syncs for {writers} concurrent writers: no group commit",
            al.syncs()
        );
    }

    #[test]
    fn garbage_is_not_a_log() {
        let f = tmpfile("garbage");
        f.write_all_at(b"not an activity log at all..", 0).unwrap();
        assert!(ActivityLog::read_extents(&f).unwrap().is_none());
        assert!(ActivityLog::load(f).unwrap().is_none());
    }
}
