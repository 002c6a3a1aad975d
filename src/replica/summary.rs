//! [`PointsSummary`]: what the receiver's metrics scrape needs of one VM's
//! recovery points (how many, the newest cut, how many are not applied to
//! every replica yet, the newest applied cut), small enough for the
//! directory store to keep one per VM and answer a scrape without reading
//! every point ([`ReplicaStore::points_summary`](super::ReplicaStore::points_summary)).
//!
//! Read whole, a continuous VM's 2 h of points are 7,200–14,400 records
//! (~1.7 MB of JSON), and deciding which are applied took a walk over all
//! of them: 256 such VMs made one scrape take ~13 s, past Prometheus'
//! 10 s timeout (`kernel-notes/replication-speed.md`, session 34).
//!
//! Which points are applied is [`Point::applied`]'s rule: every disk of
//! the point has a replica at or past the point's cycle. Points are
//! grouped by their set of disks; within a group a point is applied iff
//! its cycle is at most the lowest replica cycle of the group's disks (no
//! point is if one of them has none), so the applied points of a group
//! are the prefix of its points sorted by cycle up to that cycle, found
//! by binary search. Across groups they need not be a prefix (a VM whose
//! disk set changed keeps older points over a disk whose replica stopped
//! at an older cycle), so each group is searched. Each entry carries the
//! latest cut time of its group's points up to it (cut times need not
//! grow with the cycle), so the newest applied cut is one read per group.

use super::store::Point;
use std::collections::HashMap;
use std::sync::Arc;

/// A VM's points reduced to what a metrics scrape needs. Cheap to clone
/// (the groups are shared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PointsSummary {
    groups: Arc<Vec<Group>>,
}

/// The points over one set of disks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    /// The disks (hex ids), sorted, without duplicates.
    disks: Vec<String>,
    /// `(cycle, the latest cut time of this group's points of a cycle up
    /// to this one)`, sorted by cycle.
    points: Vec<(u64, u64)>,
}

/// [`PointsSummary::applied`]: which points every replica holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedSummary {
    /// Points committed (on durable logs) that some replica does not hold
    /// yet.
    pub pending: usize,
    /// The latest cut time among the points every replica holds, ns since
    /// the Unix epoch (`None`: no such point).
    pub newest_time_ns: Option<u64>,
}

fn disk_set(p: &Point) -> Vec<String> {
    let mut d = p.disks.clone();
    d.sort();
    d.dedup();
    d
}

/// The group of `disks` in `groups` (kept sorted by disks), added if new.
fn group_of(groups: &mut Vec<Group>, disks: Vec<String>) -> &mut Group {
    let i = match groups.binary_search_by(|g| g.disks.cmp(&disks)) {
        Ok(i) => i,
        Err(i) => {
            groups.insert(
                i,
                Group {
                    disks,
                    points: Vec::new(),
                },
            );
            i
        }
    };
    &mut groups[i]
}

impl PointsSummary {
    /// The summary of `points` (in any order).
    pub fn from_points(points: &[Point]) -> PointsSummary {
        let mut sorted: Vec<&Point> = points.iter().collect();
        sorted.sort_by_key(|p| p.cycle);
        let mut groups: Vec<Group> = Vec::new();
        for p in sorted {
            let g = group_of(&mut groups, disk_set(p));
            let upto = g.points.last().map_or(0, |&(_, t)| t).max(p.time_unix_ns);
            g.points.push((p.cycle, upto));
        }
        for g in &mut groups {
            g.points.shrink_to_fit();
        }
        PointsSummary {
            groups: Arc::new(groups),
        }
    }

    /// Add `p` (as [`from_points`](Self::from_points) would have counted
    /// it); a cycle already present is left as it is (as reading the
    /// points keeps the first record of a cycle).
    pub fn insert(&mut self, p: &Point) {
        if self.contains(p.cycle) {
            return;
        }
        let g = group_of(Arc::make_mut(&mut self.groups), disk_set(p));
        let at = g.points.partition_point(|&(c, _)| c < p.cycle);
        let before = at.checked_sub(1).map_or(0, |i| g.points[i].1);
        g.points.insert(at, (p.cycle, before.max(p.time_unix_ns)));
        // The latest cut up to each later point now includes this one.
        for e in &mut g.points[at + 1..] {
            e.1 = e.1.max(p.time_unix_ns);
        }
    }

    /// How many points.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.points.len()).sum()
    }

    /// True if there is no point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a point of `cycle` is among them.
    pub fn contains(&self, cycle: u64) -> bool {
        self.groups
            .iter()
            .any(|g| g.points.binary_search_by_key(&cycle, |&(c, _)| c).is_ok())
    }

    /// The latest cut time of all points, ns since the Unix epoch.
    pub fn newest_time_ns(&self) -> Option<u64> {
        self.groups
            .iter()
            .filter_map(|g| g.points.last().map(|&(_, t)| t))
            .max()
    }

    /// Which points every replica holds, by [`Point::applied`]'s rule:
    /// `replica_cycle` gives the cycle of a disk's replica (hex id;
    /// `None`: unknown) and is asked once per disk.
    pub fn applied(&self, mut replica_cycle: impl FnMut(&str) -> Option<u64>) -> AppliedSummary {
        let mut cycles: HashMap<&str, Option<u64>> = HashMap::new();
        let mut out = AppliedSummary {
            pending: 0,
            newest_time_ns: None,
        };
        for g in self.groups.iter() {
            // The highest cycle every disk of the group reached (`None`:
            // one has no replica cycle; no disk: every point).
            let mut upto = Some(u64::MAX);
            for d in &g.disks {
                let c = *cycles.entry(d).or_insert_with(|| replica_cycle(d));
                upto = upto.zip(c).map(|(a, b)| a.min(b));
            }
            let n = upto.map_or(0, |u| g.points.partition_point(|&(c, _)| c <= u));
            out.pending += g.points.len() - n;
            if let Some(&(_, t)) = n.checked_sub(1).and_then(|i| g.points.get(i)) {
                out.newest_time_ns = Some(out.newest_time_ns.map_or(t, |o| o.max(t)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::{applied_flags, Consistency};
    use super::*;
    use proptest::prelude::*;

    const DISKS: [&str; 3] = ["aa", "bb", "not-hex"];

    fn point(cycle: u64, time: u64, disks: u8) -> Point {
        Point {
            cycle,
            time_unix_ns: time,
            bytes: 0,
            consistency: Consistency::Crash,
            disks: DISKS
                .iter()
                .enumerate()
                .filter(|(i, _)| disks & (1 << i) != 0)
                .map(|(_, d)| d.to_string())
                .collect(),
        }
    }

    /// What the metrics scrape computed before the summary: every point
    /// and [`applied_flags`].
    fn by_points(
        points: &[Point],
        rc: &dyn Fn(&str) -> Option<u64>,
    ) -> (usize, Option<u64>, AppliedSummary) {
        let flags = applied_flags(points, rc);
        let applied: Vec<&Point> = points
            .iter()
            .zip(flags)
            .filter_map(|(p, a)| a.then_some(p))
            .collect();
        (
            points.len(),
            points.iter().map(|p| p.time_unix_ns).max(),
            AppliedSummary {
                pending: points.len() - applied.len(),
                newest_time_ns: applied.iter().map(|p| p.time_unix_ns).max(),
            },
        )
    }

    fn of(
        s: &PointsSummary,
        rc: &dyn Fn(&str) -> Option<u64>,
    ) -> (usize, Option<u64>, AppliedSummary) {
        (s.len(), s.newest_time_ns(), s.applied(rc))
    }

    proptest! {
        /// The summary, built whole or point by point in any order, says
        /// what every point and `applied_flags` say, for any disk sets
        /// (a disk without a replica cycle, a point without disks), cut
        /// times out of cycle order and replica cycles anywhere.
        #[test]
        fn the_summary_says_what_every_point_says(
            raw in proptest::collection::vec((0u64..40, 0u64..30, 0u8..8), 0..40),
            rc in proptest::collection::vec(proptest::option::weighted(0.8, 0u64..45), 3),
        ) {
            // One record per cycle (the first, as the points file keeps).
            let mut seen = std::collections::HashSet::new();
            let points: Vec<Point> = raw
                .iter()
                .filter(|(c, _, _)| seen.insert(*c))
                .map(|&(c, t, d)| point(c, t, d))
                .collect();
            let rc = |hex: &str| DISKS.iter().position(|d| *d == hex).and_then(|i| rc[i]);
            let want = by_points(&points, &rc);
            let whole = PointsSummary::from_points(&points);
            prop_assert_eq!(of(&whole, &rc), want);
            let mut one_by_one = PointsSummary::default();
            for p in &points {
                one_by_one.insert(p);
            }
            // A cycle inserted again changes nothing.
            for &(c, t, d) in &raw {
                one_by_one.insert(&point(c, t + 1, d));
            }
            prop_assert_eq!(of(&one_by_one, &rc), want);
            prop_assert_eq!(&one_by_one, &whole);
            for &(c, _, _) in &raw {
                prop_assert!(whole.contains(c));
            }
            prop_assert!(!whole.contains(1000));
        }
    }

    /// Replica cycles are asked once per disk, however many points.
    #[test]
    fn each_disk_is_asked_once() {
        let points: Vec<Point> = (1..100).map(|c| point(c, c, 1 + (c % 3) as u8)).collect();
        let s = PointsSummary::from_points(&points);
        let mut asked = Vec::new();
        let a = s.applied(|d| {
            asked.push(d.to_string());
            Some(50)
        });
        asked.sort();
        assert_eq!(asked, ["aa", "bb"]);
        assert_eq!(a.newest_time_ns, Some(50));
        assert_eq!(a.pending, 49);
    }
}
