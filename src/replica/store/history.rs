//! Chains of undo records: which records rebuild a recovery point, and
//! which runs of them a prune merges.
//!
//! A disk's history is its undo records, `<base>-<cycle>.undo` (the
//! pre-images of what the log of `cycle` overwrote at `base`, or a merge of
//! consecutive ones). The point at cycle `p` of a replica at cycle `rc` is
//! the replica with the records of the chain from `p` to `rc` laid over
//! it: from each cycle, the record that reaches furthest without passing
//! the next point or `rc`. A chain therefore never jumps over a point, and
//! the chain of a point is the segment to the next point followed by that
//! point's chain.
//!
//! [`History`] indexes the records by base (a map, then a binary search by
//! cycle) and the points (sorted), so a step costs `O(log n)` and a chain
//! `O(length × log n)`; [`History::needed`] walks every segment once,
//! whatever the number of points. Before, each step scanned every record
//! and every point, and a prune walked a whole chain from every point: a
//! prune grew with the cube of the history (11 ms for a disk with 250
//! points, 3.9 s with 2,000: a continuous VM reaches that in half an hour
//! under the default retention), holding the VM's lock
//! (kernel-notes/replication-speed.md, session 33).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// An undo record: `(base, cycle, file name)`.
pub(crate) type Record = (u64, u64, String);

/// A disk's undo records and the VM's points, indexed for chain walks.
pub(crate) struct History<'a> {
    /// Records by base cycle, each list ascending by cycle.
    by_base: HashMap<u64, Vec<&'a Record>>,
    /// Point cycles, ascending, without duplicates.
    points: Vec<u64>,
}

impl<'a> History<'a> {
    /// Index `recs` (a record whose cycle is not above its base is
    /// ignored: it leads nowhere) and the point cycles `points` (any order).
    pub(crate) fn new(recs: &'a [Record], points: &[u64]) -> History<'a> {
        let mut by_base: HashMap<u64, Vec<&'a Record>> = HashMap::new();
        for r in recs.iter().filter(|r| r.1 > r.0) {
            by_base.entry(r.0).or_default().push(r);
        }
        for v in by_base.values_mut() {
            v.sort_by_key(|r| r.1);
        }
        let mut points = points.to_vec();
        points.sort_unstable();
        points.dedup();
        History { by_base, points }
    }

    fn is_point(&self, cycle: u64) -> bool {
        self.points.binary_search(&cycle).is_ok()
    }

    /// The first point above `at` (`u64::MAX` if none).
    fn next_point(&self, at: u64) -> u64 {
        let i = self.points.partition_point(|&p| p <= at);
        self.points.get(i).copied().unwrap_or(u64::MAX)
    }

    /// The record a chain takes from `at` towards `rc`: based at `at`,
    /// reaching furthest without passing `rc` or the next point.
    fn step(&self, at: u64, rc: u64) -> Option<&'a Record> {
        let limit = rc.min(self.next_point(at));
        let v = self.by_base.get(&at)?;
        let i = v.partition_point(|r| r.1 <= limit);
        i.checked_sub(1).map(|i| v[i])
    }

    /// The chain from `from` to `rc`, or the cycle where it breaks (no
    /// record from there).
    pub(crate) fn chain(&self, from: u64, rc: u64) -> Result<Vec<Record>, u64> {
        let mut out = Vec::new();
        let mut at = from;
        while at < rc {
            let r = self.step(at, rc).ok_or(at)?;
            out.push(r.clone());
            at = r.1;
        }
        Ok(out)
    }

    /// The names of the records some point's chain to `rc` uses (a point
    /// above `rc` starts at `rc`: it needs nothing yet). A point whose
    /// chain breaks needs nothing (it cannot be rebuilt anyway), but the
    /// records it shares with the chains of newer points are needed by
    /// those.
    pub(crate) fn needed(&self, rc: u64) -> HashSet<&'a str> {
        let mut needed = HashSet::new();
        // Whether the chain from a point (or from `rc`) reaches `rc`;
        // filled newest first, so the point a segment ends at is known.
        let mut reaches: HashMap<u64, bool> = HashMap::from([(rc, true)]);
        for &pc in self.points.iter().rev() {
            let from = pc.min(rc);
            if reaches.contains_key(&from) {
                continue;
            }
            let mut segment = Vec::new();
            let mut at = from;
            let ok = loop {
                let Some(r) = self.step(at, rc) else {
                    break false;
                };
                segment.push(r.2.as_str());
                at = r.1;
                if at == rc || self.is_point(at) {
                    break reaches.get(&at).copied().unwrap_or(false);
                }
            };
            if ok {
                needed.extend(segment);
            }
            reaches.insert(from, ok);
        }
        needed
    }
}

/// The runs of consecutive records of `links` (a chain) that a prune
/// merges into one: those whose inner boundaries are neither a point nor
/// at or above `keep_from` (the newest point the replica reached: a cycle
/// above it may still become a point). Each run has two records or more.
pub(crate) fn merge_runs(links: &[Record], points: &[u64], keep_from: u64) -> Vec<Range<usize>> {
    let points: HashSet<u64> = points.iter().copied().collect();
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 0..links.len() {
        let boundary = links[i].1;
        let last = i + 1 == links.len();
        if last || points.contains(&boundary) || boundary >= keep_from {
            if i > start {
                runs.push(start..i + 1);
            }
            start = i + 1;
        }
    }
    runs
}

/// Records merged in one pass ([`crate::replica::undo::merge_undo`] keeps
/// one piece and one buffered reader of each input).
pub(crate) const FAN_IN: usize = 32;

/// How a prune merges a run of `n` records, level by level: each level
/// is a list of consecutive groups, a group of one passes to the next
/// level as it is. At most [`FAN_IN`] records go into one merge, so a
/// run of `n` costs about `n / (FAN_IN - 1)` merges (one create and one
/// sync each) and every byte is rewritten `log_FAN_IN(n)` times. When the
/// run is longer than one merge, its first (oldest) record is left alone
/// on the first level: in a long-running receiver it is the record the
/// previous prunes merged (every point older than `thin_after` of its
/// interval, possibly large) and the rest are the cycles that aged out
/// since; it is then rewritten once per prune, not once per level.
pub(crate) fn merge_levels(n: usize) -> Vec<Vec<Range<usize>>> {
    let mut levels = Vec::new();
    let mut n = n;
    let mut first_alone = n > FAN_IN;
    while n > 1 {
        let mut groups = Vec::new();
        let mut at = 0;
        if first_alone {
            groups.push(0..1);
            at = 1;
        }
        while at < n {
            let end = (at + FAN_IN).min(n);
            groups.push(at..end);
            at = end;
        }
        n = groups.len();
        levels.push(groups);
        first_alone = false;
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(b: u64, c: u64) -> Record {
        (b, c, format!("{b}-{c}.undo"))
    }

    /// The walk as it was written before the index (every step scans every
    /// record and point): the reference the index must agree with.
    fn chain_by_scan(
        recs: &[Record],
        from: u64,
        rc: u64,
        points: &[u64],
    ) -> Result<Vec<Record>, u64> {
        let mut out = Vec::new();
        let mut at = from;
        while at < rc {
            let next_point = points
                .iter()
                .copied()
                .filter(|&p| p > at)
                .min()
                .unwrap_or(u64::MAX);
            let best = recs
                .iter()
                .filter(|(b, c, _)| *b == at && *c > at && *c <= rc && *c <= next_point)
                .max_by_key(|(_, c, _)| *c);
            match best {
                Some(r) => {
                    out.push(r.clone());
                    at = r.1;
                }
                None => return Err(at),
            }
        }
        Ok(out)
    }

    #[test]
    fn a_chain_stops_at_every_point_and_takes_the_longest_record() {
        let recs = vec![
            rec(1, 2),
            rec(2, 3),
            rec(1, 3),
            rec(3, 4),
            rec(3, 6),
            rec(4, 6),
        ];
        let h = History::new(&recs, &[1, 3, 6]);
        let names = |v: Vec<Record>| v.into_iter().map(|r| r.2).collect::<Vec<_>>();
        assert_eq!(names(h.chain(1, 6).unwrap()), ["1-3.undo", "3-6.undo"]);
        // Point 4 now: 3-6 would jump over it.
        let h = History::new(&recs, &[1, 4, 6]);
        assert_eq!(
            names(h.chain(1, 6).unwrap()),
            ["1-3.undo", "3-4.undo", "4-6.undo"]
        );
        assert_eq!(h.chain(5, 6), Err(5));
        assert_eq!(h.chain(6, 6), Ok(Vec::new()));
    }

    #[test]
    fn runs_stop_at_points_and_at_the_newest_reached() {
        let links = vec![
            rec(1, 2),
            rec(2, 3),
            rec(3, 4),
            rec(4, 5),
            rec(5, 6),
            rec(6, 7),
        ];
        // Point 4 splits; 6 and above are kept as they are.
        assert_eq!(merge_runs(&links, &[1, 4, 7], 6), vec![0..3, 3..5]);
        assert_eq!(
            merge_runs(&links, &[1, 2, 3, 4, 5, 6, 7], 7),
            Vec::<Range<usize>>::new()
        );
        assert_eq!(merge_runs(&links[..1], &[1], 9), Vec::<Range<usize>>::new());
    }

    #[test]
    fn merge_levels_cover_each_level_and_end_in_one_record() {
        assert!(merge_levels(1).is_empty());
        assert_eq!(merge_levels(5), vec![vec![0..5]]);
        // 121 = the merged record and 120 aged-out cycles: it is merged once.
        let l = merge_levels(121);
        assert_eq!(l[0][0], 0..1);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1], vec![0..l[0].len()]);
        for n in 1..3000 {
            let mut len = n;
            for level in merge_levels(n) {
                let mut at = 0;
                for g in &level {
                    assert_eq!(g.start, at);
                    assert!(!g.is_empty() && g.len() <= FAN_IN);
                    at = g.end;
                }
                assert_eq!(at, len);
                len = level.len();
            }
            assert_eq!(len, 1);
        }
    }

    proptest! {
        /// The indexed walk and `needed` agree with walking every point's
        /// chain by scanning, on random histories with gaps, merged
        /// records and points anywhere.
        #[test]
        fn the_index_agrees_with_the_scan(
            spans in proptest::collection::vec((0u64..40, 1u64..6), 0..60),
            pts in proptest::collection::vec(0u64..45, 0..12),
            rc in 0u64..45,
        ) {
            let mut recs: Vec<Record> = spans.iter().map(|&(b, l)| rec(b, b + l)).collect();
            recs.sort();
            recs.dedup();
            let h = History::new(&recs, &pts);
            for from in 0..=rc {
                prop_assert_eq!(h.chain(from, rc), chain_by_scan(&recs, from, rc, &pts));
            }
            let mut want = HashSet::new();
            for &pc in &pts {
                if let Ok(ch) = chain_by_scan(&recs, pc.min(rc), rc, &pts) {
                    want.extend(ch.into_iter().map(|r| r.2));
                }
            }
            let got: HashSet<String> = h.needed(rc).into_iter().map(str::to_string).collect();
            prop_assert_eq!(got, want);
        }

        /// Merging each run leaves a chain whose boundaries are exactly the
        /// kept ones: every point and every cycle from `keep_from` on.
        #[test]
        fn runs_keep_exactly_the_kept_boundaries(
            n in 1usize..30,
            pts in proptest::collection::vec(0u64..32, 0..10),
            keep_from in 0u64..32,
        ) {
            let links: Vec<Record> = (0..n as u64).map(|i| rec(i, i + 1)).collect();
            let runs = merge_runs(&links, &pts, keep_from);
            let mut boundaries = Vec::new();
            let mut i = 0;
            while i < links.len() {
                let end = runs.iter().find(|r| r.start == i).map_or(i + 1, |r| r.end);
                boundaries.push(links[end - 1].1);
                i = end;
            }
            let last = links[links.len() - 1].1;
            let want: Vec<u64> = links
                .iter()
                .map(|r| r.1)
                .filter(|&b| b == last || pts.contains(&b) || b >= keep_from)
                .collect();
            prop_assert_eq!(boundaries, want);
        }
    }
}
