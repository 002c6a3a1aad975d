//! Dirty-block bitmap: one bit per tracking block, set lock-free by writers.

use std::sync::atomic::{AtomicU64, Ordering};

/// A growable bitmap whose bits can be set concurrently through `&self`.
/// Memory: one bit per block (32 KiB per GiB of disk at 4 KiB blocks).
#[derive(Debug, Default)]
pub struct Bitmap {
    words: Vec<AtomicU64>,
    nbits: u64,
}

impl Bitmap {
    pub fn new(nbits: u64) -> Self {
        let nwords = nbits.div_ceil(64) as usize;
        let mut words = Vec::with_capacity(nwords);
        words.resize_with(nwords, || AtomicU64::new(0));
        Bitmap { words, nbits }
    }

    pub fn len(&self) -> u64 {
        self.nbits
    }

    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Grow to at least `nbits` bits (new bits clear). Never shrinks.
    pub fn grow(&mut self, nbits: u64) {
        if nbits <= self.nbits {
            return;
        }
        let nwords = nbits.div_ceil(64) as usize;
        self.words.resize_with(nwords, || AtomicU64::new(0));
        self.nbits = nbits;
    }

    pub fn get(&self, bit: u64) -> bool {
        if bit >= self.nbits {
            return false;
        }
        let w = self.words[(bit / 64) as usize].load(Ordering::Acquire);
        w & (1u64 << (bit % 64)) != 0
    }

    /// The words covering bits `first..=last` (clipped to the end), each
    /// with the mask of those bits in it.
    #[inline]
    fn masks(&self, first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
        let empty = self.nbits == 0 || first > last || first >= self.nbits;
        let last = last.min(self.nbits.saturating_sub(1));
        let (fw, lw) = (first / 64, last / 64);
        let n = if empty { 0 } else { lw - fw + 1 };
        let words = fw..fw + n;
        words.map(move |w| {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            (w as usize, mask)
        })
    }

    /// Set bits `first..=last`; bits past the end are ignored (grow first).
    pub fn set_range(&self, first: u64, last: u64) {
        for (w, mask) in self.masks(first, last) {
            self.words[w].fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Is any bit of `first..=last` set? (Bits past the end are clear.)
    pub fn any_in(&self, first: u64, last: u64) -> bool {
        self.masks(first, last)
            .any(|(w, mask)| self.words[w].load(Ordering::Acquire) & mask != 0)
    }

    /// Clear one bit (past the end: nothing).
    pub fn clear(&self, bit: u64) {
        if bit < self.nbits {
            self.words[(bit / 64) as usize].fetch_and(!(1u64 << (bit % 64)), Ordering::AcqRel);
        }
    }

    pub fn set_all(&self) {
        if self.nbits > 0 {
            self.set_range(0, self.nbits - 1);
        }
    }

    /// OR every bit of `other` into `self` (grows `self` if needed).
    pub fn merge_from(&mut self, other: &Bitmap) {
        self.grow(other.nbits);
        for (i, w) in other.words.iter().enumerate() {
            let v = w.load(Ordering::Acquire);
            if v != 0 {
                self.words[i].fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Runs of set bits as `(first, count)`, in order, limited to bits `< limit`.
    pub fn runs(&self, limit: u64) -> Vec<(u64, u64)> {
        let limit = limit.min(self.nbits);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let tz = u64::from(v.trailing_zeros());
                let bit = wi as u64 * 64 + tz;
                if bit >= limit {
                    return out;
                }
                match out.last_mut() {
                    Some((s, n)) if *s + *n == bit => *n += 1,
                    _ => out.push((bit, 1)),
                }
                v &= v - 1;
            }
        }
        out
    }

    /// Little-endian words, for persistence.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    pub fn from_words(nbits: u64, words: &[u64]) -> Option<Self> {
        if words.len() as u64 != nbits.div_ceil(64) {
            return None;
        }
        Some(Bitmap {
            words: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            nbits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_and_runs() {
        let b = Bitmap::new(300);
        b.set_range(3, 3);
        b.set_range(60, 130);
        b.set_range(299, 400);
        assert_eq!(b.runs(u64::MAX), vec![(3, 1), (60, 71), (299, 1)]);
        assert_eq!(b.count(), 73);
        assert_eq!(b.runs(100), vec![(3, 1), (60, 40)]);
        assert!(b.get(64) && !b.get(131) && !b.get(1000));
        assert!(b.any_in(0, 3) && b.any_in(131, 299) && b.any_in(5, 60));
        assert!(!b.any_in(4, 59) && !b.any_in(131, 298) && !b.any_in(300, 900));
        b.clear(3);
        assert!(!b.any_in(0, 59) && !b.get(3));
    }

    #[test]
    fn full_word_and_merge() {
        let b = Bitmap::new(128);
        b.set_range(64, 127);
        assert_eq!(b.count(), 64);
        let mut c = Bitmap::new(10);
        c.merge_from(&b);
        assert_eq!(c.len(), 128);
        assert_eq!(c.runs(u64::MAX), vec![(64, 64)]);
        let w = c.to_words();
        let d = Bitmap::from_words(128, &w).map(|d| d.count());
        assert_eq!(d, Some(64));
    }
}
