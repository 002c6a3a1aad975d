//! In-memory copies of the running cycle's whole-block writes, so that the
//! cut's log writer takes a changed block from memory instead of reading it
//! back from the disk.
//!
//! A VM's `O_DIRECT` writes leave nothing in the page cache, so every
//! changed block of a cycle was read back from the device to be logged: at
//! 256 continuous VMs and 50 MiB/s that was 12,000 device reads a second
//! (`kernel-notes/replication-speed.md`, sessions 28–29). Here each whole
//! block a write carries is copied (after its backing write succeeded);
//! the cut moves the copies into the sealed cycle with its bitmap, under
//! the disk's exclusive cut lock, and they are its content as of the cut.
//!
//! **The rule that keeps the copies equal to the disk.** Writes to the same
//! block may run at once (parallel direct writes); the file keeps whichever
//! the kernel ordered last, which need not be the one whose copy lands last
//! here. So every change registers its blocks while it runs
//! ([`Kept::begin`]); a change that overlaps another one in flight is
//! *contested*, and a contested change drops its blocks' copies instead of
//! keeping its own ([`Kept::end`]): those blocks are read from the disk at
//! the cut, as before. A change that carries no bytes here (a splice, an
//! io_uring write, a truncate or `fallocate`), a short or failed write and
//! a block only partly written drop the copies of their blocks too. So a
//! copy exists only for a block whose last change was an uncontested
//! whole-block write that returned in full: its bytes are the file's.
//!
//! Copies are kept only for disks cut often (a cut within
//! [`KEEP_IF_CUT_WITHIN`] of the one before: continuous or short
//! schedules), switched at a cut (no change in flight), and only within
//! the mount's byte budget ([`Budget`], `keep_writes` in the configuration):
//! past it a write keeps nothing and its block is read back at the cut.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// A disk whose cut follows the previous one within this keeps copies of
/// its writes until its next cut; a disk cut less often keeps none (its
/// copies would hold the budget for minutes).
pub const KEEP_IF_CUT_WITHIN: Duration = Duration::from_secs(10);

/// Default of the mount's budget for copies (`keep_writes`).
pub const DEFAULT_KEEP_WRITES: u64 = 256 << 20;

/// The mount's byte budget for copies, shared by every disk and by the
/// running and sealed cycles.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicU64::new(0),
            limit,
        })
    }

    /// Bytes held by copies now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserve `n` bytes; false (nothing reserved) past the limit.
    fn reserve(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn free(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Copies of blocks, by block number, counted against a [`Budget`] (given
/// back as they leave, and when the map is dropped).
pub struct Copies {
    blocks: HashMap<u64, Box<[u8]>>,
    bytes: u64,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copies")
            .field("blocks", &self.blocks.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Copies {
    pub fn new(budget: Arc<Budget>) -> Copies {
        Copies {
            blocks: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.keys().copied()
    }

    pub fn get(&self, block: u64) -> Option<&[u8]> {
        self.blocks.get(&block).map(|b| &b[..])
    }

    /// Take `block`'s copy out (its bytes go back to the budget).
    pub fn remove(&mut self, block: u64) -> Option<Box<[u8]>> {
        let v = self.blocks.remove(&block)?;
        self.bytes -= v.len() as u64;
        self.budget.free(v.len() as u64);
        Some(v)
    }

    /// Drop the copies of blocks `first..=last`.
    pub fn remove_range(&mut self, first: u64, last: u64) {
        if self.blocks.is_empty() {
            return;
        }
        if last.saturating_sub(first) < self.blocks.len() as u64 {
            for b in first..=last {
                self.remove(b);
            }
        } else {
            let mut freed = 0u64;
            self.blocks.retain(|b, v| {
                let keep = *b < first || *b > last;
                if !keep {
                    freed += v.len() as u64;
                }
                keep
            });
            self.bytes -= freed;
            self.budget.free(freed);
        }
    }

    /// Put a copy reserved by the caller in (an older copy of the block
    /// goes).
    fn put(&mut self, block: u64, data: Box<[u8]>) {
        self.bytes += data.len() as u64;
        if let Some(old) = self.blocks.insert(block, data) {
            self.bytes -= old.len() as u64;
            self.budget.free(old.len() as u64);
        }
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        self.budget.free(self.bytes);
    }
}

/// A change in flight: its blocks and whether another change overlapped it.
#[derive(Debug)]
struct Flight {
    id: u64,
    first: u64,
    last: u64,
    contested: bool,
}

#[derive(Debug)]
struct State {
    copies: Copies,
    flights: Vec<Flight>,
    next_id: u64,
}

/// One disk's copies of its running cycle, and the changes in flight.
#[derive(Debug)]
pub struct Kept {
    /// Copies are kept this cycle (set at a cut only: no change in flight).
    on: AtomicBool,
    budget: Arc<Budget>,
    state: Mutex<State>,
}

/// A change registered by [`Kept::begin`], to pass to [`Kept::end`].
#[derive(Debug)]
#[must_use]
pub struct Ticket(u64);

impl Kept {
    pub fn new(budget: Arc<Budget>) -> Kept {
        Kept {
            on: AtomicBool::new(false),
            budget: budget.clone(),
            state: Mutex::new(State {
                copies: Copies::new(budget),
                flights: Vec::new(),
                next_id: 0,
            }),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// A change of blocks `first..=last` starts (the caller holds the
    /// disk's cut lock shared until [`Kept::end`]). `None` when copies are
    /// off this cycle.
    pub fn begin(&self, first: u64, last: u64) -> Option<Ticket> {
        if !self.is_on() {
            return None;
        }
        let mut st = self.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        let mut contested = false;
        for f in st.flights.iter_mut() {
            if f.first <= last && first <= f.last {
                f.contested = true;
                contested = true;
            }
        }
        st.flights.push(Flight {
            id,
            first,
            last,
            contested,
        });
        Some(Ticket(id))
    }

    /// The change of `ticket` is over. `written`: it wrote `data` at
    /// `offset` in full (not for a change that carries no bytes here, a
    /// failed or a short write). Its whole blocks are kept (within the
    /// budget) unless another change overlapped it; every other block it
    /// touched loses its copy.
    pub fn end(&self, ticket: Ticket, written: Option<(u64, &[u8])>, bs: u64) {
        // The copies are made before the lock (and given back if the
        // change turns out contested, which is rare). The flight leaves
        // the list only under the same lock as its copies go in: a change
        // of the same blocks that starts later finds it there (and both
        // keep nothing), or starts after the copies are in and replaces
        // them when it ends.
        let made: Vec<(u64, Box<[u8]>)> = match written {
            Some((offset, data)) => whole_blocks(offset, data, bs)
                .map_while(|(b, bytes)| {
                    self.budget
                        .reserve(bytes.len() as u64)
                        .then(|| (b, Box::<[u8]>::from(bytes)))
                })
                .collect(),
            None => Vec::new(),
        };
        let mut st = self.state.lock();
        let contested = match st.flights.iter().position(|f| f.id == ticket.0) {
            Some(at) => {
                let f = st.flights.swap_remove(at);
                st.copies.remove_range(f.first, f.last);
                f.contested
            }
            None => true,
        };
        if contested {
            for (_, v) in &made {
                self.budget.free(v.len() as u64);
            }
            return;
        }
        for (b, v) in made {
            st.copies.put(b, v);
        }
    }

    /// At a cut (the disk's cut lock held exclusively, so no change is in
    /// flight): the running cycle's copies, for the sealed cycle; copies go
    /// on for the next cycle if `keep`.
    pub fn take(&self, keep: bool) -> Copies {
        let mut st = self.state.lock();
        let out = std::mem::replace(&mut st.copies, Copies::new(self.budget.clone()));
        self.on.store(keep, Ordering::Relaxed);
        out
    }

    /// Copies held for the running cycle.
    pub fn len(&self) -> usize {
        self.state.lock().copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Changed blocks the cuts' log writers took from kept copies, and those
/// they read back from the disk (this process).
static FROM_COPIES: AtomicU64 = AtomicU64::new(0);
static READ_BACK: AtomicU64 = AtomicU64::new(0);

/// Count `n` blocks passed on from kept copies.
pub fn note_from_copies(n: u64) {
    FROM_COPIES.fetch_add(n, Ordering::Relaxed);
}

/// Count `n` blocks read back from the disk to be passed on.
pub fn note_read_back(n: u64) {
    READ_BACK.fetch_add(n, Ordering::Relaxed);
}

/// `(blocks from kept copies, blocks read back)` so far.
pub fn counts() -> (u64, u64) {
    (
        FROM_COPIES.load(Ordering::Relaxed),
        READ_BACK.load(Ordering::Relaxed),
    )
}

/// Nanoseconds on a monotonic clock (since the first call; never 0).
pub fn mono_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
        + 1
}

/// The whole blocks of a write of `data` at `offset`: `(block, bytes)`.
fn whole_blocks(offset: u64, data: &[u8], bs: u64) -> impl Iterator<Item = (u64, &[u8])> {
    let end = offset + data.len() as u64;
    let first = offset.div_ceil(bs);
    let last_end = end / bs;
    (first..last_end.max(first)).map(move |b| {
        let o = (b * bs - offset) as usize;
        (b, &data[o..o + bs as usize])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn kept(limit: u64) -> Kept {
        let k = Kept::new(Budget::new(limit));
        drop(k.take(true));
        k
    }

    fn block(v: u8) -> Vec<u8> {
        vec![v; BS as usize]
    }

    #[test]
    fn a_whole_block_write_is_kept_and_a_later_one_replaces_it() {
        let k = kept(1 << 20);
        let t = k.begin(3, 3).unwrap();
        k.end(t, Some((3 * BS, &block(1))), BS);
        let t = k.begin(3, 3).unwrap();
        k.end(t, Some((3 * BS, &block(2))), BS);
        let c = k.take(true);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(3).unwrap(), &block(2)[..]);
    }

    #[test]
    fn overlapping_changes_keep_nothing_of_their_blocks() {
        let k = kept(1 << 20);
        // A copy from before: the overlap must drop it too.
        let t = k.begin(5, 5).unwrap();
        k.end(t, Some((5 * BS, &block(9))), BS);
        let a = k.begin(4, 5).unwrap();
        let b = k.begin(5, 6).unwrap();
        let mut two = block(1);
        two.extend(block(1));
        k.end(a, Some((4 * BS, &two)), BS);
        let mut two = block(2);
        two.extend(block(2));
        k.end(b, Some((5 * BS, &two)), BS);
        let c = k.take(true);
        assert!(c.is_empty(), "{c:?}");
        // A write to block 7 while they ran was not contested.
        let a = k.begin(7, 7).unwrap();
        let b = k.begin(8, 8).unwrap();
        k.end(b, Some((8 * BS, &block(8))), BS);
        k.end(a, Some((7 * BS, &block(7))), BS);
        let c = k.take(true);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn partial_blocks_bytesless_changes_and_failures_drop_copies() {
        let k = kept(1 << 20);
        for b in 0..4 {
            let t = k.begin(b, b).unwrap();
            k.end(t, Some((b * BS, &block(1))), BS);
        }
        // Half of block 0 and all of block 1.
        let t = k.begin(0, 1).unwrap();
        k.end(t, Some((BS / 2, &vec![2u8; (BS + BS / 2) as usize])), BS);
        // A change without bytes (splice, truncate): block 2.
        let t = k.begin(2, 2).unwrap();
        k.end(t, None, BS);
        let c = k.take(true);
        let mut got: Vec<u64> = c.blocks().collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 3]);
        assert_eq!(c.get(1).unwrap(), &vec![2u8; BS as usize][..]);
    }

    #[test]
    fn the_budget_bounds_the_copies_and_is_given_back() {
        let budget = Budget::new(2 * BS);
        let k = Kept::new(budget.clone());
        assert!(k.begin(0, 0).is_none(), "off until a cut turns it on");
        drop(k.take(true));
        for b in 0..4 {
            let t = k.begin(b, b).unwrap();
            k.end(t, Some((b * BS, &block(1))), BS);
        }
        assert_eq!(k.len(), 2);
        assert_eq!(budget.used(), 2 * BS);
        let sealed = k.take(false);
        assert!(k.begin(0, 0).is_none(), "a cut turned it off");
        assert_eq!(budget.used(), 2 * BS);
        drop(sealed);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn whole_blocks_of_unaligned_writes() {
        let data = vec![0u8; (3 * BS) as usize];
        let got: Vec<u64> = whole_blocks(BS / 2, &data, BS).map(|(b, _)| b).collect();
        assert_eq!(got, vec![1, 2]);
        let got: Vec<u64> = whole_blocks(0, &data[..100], BS).map(|(b, _)| b).collect();
        assert!(got.is_empty());
    }
}
