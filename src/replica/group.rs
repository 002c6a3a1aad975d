//! Consistency groups at the receiver: the group record a member VM's
//! point carries, which cycles are *group points* (every member has a
//! point there, each with the same record), and what retention must keep
//! so that a group point stays whole or goes whole.
//!
//! A group's cut holds every disk of every member at one instant because
//! one mount seals them all in one [`crate::tracking::Tracker::seal`]: a
//! cycle number of that mount (the record's `origin`) names one instant.
//! So a cycle every member has a point at, each saying the same origin and
//! members, is consistent across all their disks; nothing else is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Consistency, Ctx, Point, StoreError};

/// The group a point of a member VM was cut for (the sender's
/// `PointCommit` says it; kept in `groups/CYCLE.json` of the VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// The cycle numbering shared by the members (the sending mount).
    pub origin: String,
    /// Every member VM, sorted.
    pub members: Vec<String>,
}

/// One member's point of a group point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub vm: String,
    /// The member's point id (`vdrep points VM`, `failover VM --point`).
    pub point: u64,
    /// Disks in the member's point.
    pub disks: usize,
}

/// A recovery point of a whole group: one instant of every disk of every
/// member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub group: String,
    /// The point id (the cut's cycle; each member's point has it too).
    pub cycle: u64,
    pub time_unix_ns: u64,
    /// `App` only if every member's point is.
    pub consistency: Consistency,
    pub members: Vec<GroupMember>,
}

/// A VM's points (oldest first), each with its group record.
pub type VmPoints = (String, Vec<(Point, Option<GroupRecord>)>);

/// Where one point with a group record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Every member has a point at the cycle with the same record.
    Whole,
    /// Some member has no such point yet (it has no point past the cycle
    /// either: its point may still come).
    Waiting,
    /// Some member went past the cycle without a point there with the
    /// same record (it was pruned or never cut): never a group point.
    Broken,
}

/// Where `rec`'s point at `cycle` stands among `all` (every VM of the
/// site that has points).
pub fn standing(rec: &GroupRecord, cycle: u64, all: &[VmPoints]) -> Standing {
    let mut waiting = false;
    for m in &rec.members {
        let pts = all.iter().find(|(vm, _)| vm == m).map(|(_, p)| p);
        let Some(pts) = pts else {
            waiting = true;
            continue;
        };
        let here = pts
            .iter()
            .any(|(p, r)| p.cycle == cycle && r.as_ref() == Some(rec));
        if here {
            continue;
        }
        if pts.iter().any(|(p, _)| p.cycle > cycle) {
            return Standing::Broken;
        }
        waiting = true;
    }
    if waiting {
        Standing::Waiting
    } else {
        Standing::Whole
    }
}

/// The group points of `group` (oldest first) among the points of every
/// VM of a site.
pub fn group_points(group: &str, all: &[VmPoints]) -> Vec<GroupPoint> {
    // cycle -> (the record, the VMs' points with it)
    type AtCycle<'a> = (&'a GroupRecord, Vec<(&'a str, &'a Point)>);
    let mut by_cycle: BTreeMap<u64, AtCycle<'_>> = BTreeMap::new();
    for (vm, pts) in all {
        for (p, rec) in pts {
            let Some(rec) = rec.as_ref().filter(|r| r.name == group) else {
                continue;
            };
            by_cycle
                .entry(p.cycle)
                .or_insert_with(|| (rec, Vec::new()))
                .1
                .push((vm, p));
        }
    }
    let mut out = Vec::new();
    for (cycle, (rec, pts)) in by_cycle {
        if standing(rec, cycle, all) != Standing::Whole {
            continue;
        }
        let mut members: Vec<GroupMember> = pts
            .iter()
            .filter(|(vm, _)| rec.members.iter().any(|m| m == vm))
            .map(|(vm, p)| GroupMember {
                vm: vm.to_string(),
                point: p.cycle,
                disks: p.disks.len(),
            })
            .collect();
        members.sort_by(|a, b| a.vm.cmp(&b.vm));
        let consistency = if pts.iter().all(|(_, p)| p.consistency == Consistency::App) {
            Consistency::App
        } else {
            Consistency::Crash
        };
        out.push(GroupPoint {
            group: group.to_string(),
            cycle,
            time_unix_ns: pts.iter().map(|(_, p)| p.time_unix_ns).max().unwrap_or(0),
            consistency,
            members,
        });
    }
    out
}

/// Retention of `vm`'s points made group-aware: `own` is what the policy
/// keeps of them by itself (`retention_keep`), `others` what it keeps of
/// each other VM's points (same order as in `all`). A whole group point
/// is kept if any member keeps it (so every member keeps it); a broken
/// one is dropped (its other halves are gone or never came); a waiting
/// one follows `own`. Pinned points stay whatever this says (the caller
/// keeps them).
pub fn group_keep(vm: &str, own: &[bool], all: &[VmPoints], others: &[Vec<bool>]) -> Vec<bool> {
    let Some((_, mine)) = all.iter().find(|(v, _)| v == vm) else {
        return own.to_vec();
    };
    let mut keep = own.to_vec();
    for (i, (p, rec)) in mine.iter().enumerate() {
        let Some(rec) = rec else { continue };
        match standing(rec, p.cycle, all) {
            Standing::Waiting => {}
            Standing::Broken => keep[i] = false,
            Standing::Whole => {
                let kept_elsewhere = all.iter().zip(others).any(|((v, pts), flags)| {
                    rec.members.contains(v)
                        && pts
                            .iter()
                            .zip(flags)
                            .any(|((q, _), &k)| k && q.cycle == p.cycle)
                });
                keep[i] = keep[i] || kept_elsewhere;
            }
        }
    }
    keep
}

/// The group points of `group` in `store` (oldest first) and the site
/// they belong to: `site`, else the one site with points of that group
/// (none yet: the store's only site, with no points). Refused when
/// several sites have points of the group and `site` is not given.
pub fn site_group_points(
    store: &super::Store,
    site: Option<&str>,
    group: &str,
) -> Result<(String, Vec<GroupPoint>), StoreError> {
    let sites = match site {
        Some(s) => vec![s.to_string()],
        None => store.site_names(),
    };
    let mut found = Vec::new();
    for s in sites.clone() {
        let pts = store.site(&s).and_then(|st| st.group_points(group))?;
        if !pts.is_empty() || site.is_some() {
            found.push((s, pts));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Ok((
            if sites.len() == 1 {
                sites[0].clone()
            } else {
                String::new()
            },
            Vec::new(),
        )),
        _ => Err(StoreError::NotReady {
            ctx: Ctx::new(&found[0].0, "", ""),
            what: format!(
                "group {group:?} has points from several sites ({}): say which with --site",
                found
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(cycle: u64) -> Point {
        Point {
            cycle,
            time_unix_ns: cycle * 1_000,
            bytes: 0,
            consistency: Consistency::Crash,
            disks: vec!["d".into()],
        }
    }

    fn rec() -> GroupRecord {
        GroupRecord {
            name: "erp".into(),
            origin: "m1".into(),
            members: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn only_cycles_every_member_has_are_group_points() {
        let r = Some(rec());
        let all: Vec<VmPoints> = vec![
            // a: 3 (initial copy, no record), 5 and 7 group cuts, 9 cut
            // while b had not shipped 9 yet.
            (
                "a".into(),
                vec![
                    (pt(3), None),
                    (pt(5), r.clone()),
                    (pt(7), r.clone()),
                    (pt(9), r.clone()),
                ],
            ),
            ("b".into(), vec![(pt(5), r.clone()), (pt(7), r.clone())]),
        ];
        let g = group_points("erp", &all);
        assert_eq!(g.iter().map(|p| p.cycle).collect::<Vec<_>>(), vec![5, 7]);
        assert_eq!(g[0].members.len(), 2);
        assert_eq!(standing(&rec(), 9, &all), Standing::Waiting);
        assert!(group_points("other", &all).is_empty());
        // Another origin (another mount's cycle numbers) at the same
        // cycle is not the same instant.
        let mut other = rec();
        other.origin = "m2".into();
        let all2: Vec<VmPoints> = vec![
            ("a".into(), vec![(pt(5), r.clone())]),
            ("b".into(), vec![(pt(5), Some(other)), (pt(6), None)]),
        ];
        assert!(group_points("erp", &all2).is_empty());
        assert_eq!(standing(&rec(), 5, &all2), Standing::Broken);
    }

    #[test]
    fn a_group_point_stays_whole_or_goes_whole() {
        let r = Some(rec());
        let all: Vec<VmPoints> = vec![
            (
                "a".into(),
                vec![(pt(5), r.clone()), (pt(7), r.clone()), (pt(8), None)],
            ),
            ("b".into(), vec![(pt(5), r.clone()), (pt(7), r.clone())]),
        ];
        // a's own policy would drop 5 and 7 (keep last 1), b keeps 7.
        let own_a = vec![false, false, true];
        let own_b = vec![false, true];
        let others = vec![own_a.clone(), own_b.clone()];
        assert_eq!(
            group_keep("a", &own_a, &all, &others),
            vec![false, true, true]
        );
        assert_eq!(group_keep("b", &own_b, &all, &others), vec![false, true]);
        // b lost 5 already: a's 5 is broken and goes too, whatever a's
        // policy says.
        let all: Vec<VmPoints> = vec![
            ("a".into(), vec![(pt(5), r.clone()), (pt(7), r.clone())]),
            ("b".into(), vec![(pt(7), r.clone())]),
        ];
        let others = vec![vec![true, true], vec![true]];
        assert_eq!(
            group_keep("a", &[true, true], &all, &others),
            vec![false, true]
        );
    }
}
