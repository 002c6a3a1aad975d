//! A consistency group's failover: one group point chosen for every VM of
//! the group ([`crate::replica::group`]), then each member's test or
//! unplanned failover to that point. Refused, changing nothing, when the
//! point is not a group point; a member that fails midway leaves the
//! others as they are, and the error says which were done and how to undo
//! them.

use std::path::Path;

use super::{role_change, test, FailoverError};
use crate::ipc::CallErrorKind;
use crate::receiver::control::{self, Request};
use crate::replica::{GroupPoint, LiveInfo};
use crate::testview::{PointSel, ViewInfo};

/// The group points of `group` (oldest first) and their site: from the
/// running receiver of `store`, or from the store itself when none runs.
pub fn points(
    store: &Path,
    site: Option<String>,
    group: &str,
) -> Result<(String, Vec<GroupPoint>), FailoverError> {
    crate::replica::validate_name("group", group)
        .map_err(|e| FailoverError::Invalid(e.to_string()))?;
    let req = Request::GroupPoints {
        site: site.clone(),
        group: group.to_string(),
    };
    match control::call_ok(store, &req) {
        Ok(r) => Ok((
            r.site.unwrap_or_default(),
            r.group_points.unwrap_or_default(),
        )),
        Err(e) if e.kind() == CallErrorKind::NotRunning => {
            let st = crate::replica::Store::open(store)
                .map_err(|e| FailoverError::Store(e.to_string()))?;
            crate::replica::group::site_group_points(&st, site.as_deref(), group)
                .map_err(|e| FailoverError::Store(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// The group point `sel` names among `pts` (oldest first).
pub fn choose(pts: &[GroupPoint], sel: PointSel, group: &str) -> Result<GroupPoint, FailoverError> {
    let pt = match sel {
        PointSel::Latest => pts.last(),
        PointSel::Cycle { cycle } => pts.iter().find(|p| p.cycle == cycle),
        PointSel::Time { unix_ns } => pts.iter().rev().find(|p| p.time_unix_ns <= unix_ns),
    };
    pt.cloned().ok_or_else(|| {
        FailoverError::Invalid(format!(
            "group {group} has no group point {}: list them with `vdrep points --group {group}` (a point of one VM that is not in that list does not hold the other VMs at the same instant)",
            match sel {
                PointSel::Latest => "yet".to_string(),
                PointSel::Cycle { cycle } => cycle.to_string(),
                PointSel::Time { unix_ns } =>
                    format!("at or before {} UTC", crate::testview::format_utc(unix_ns)),
            }
        ))
    })
}

/// Test failover of every member at one group point: one view per VM.
/// If a member cannot be exposed, the views already made are removed.
pub fn test(
    store: &Path,
    site: Option<String>,
    group: &str,
    sel: PointSel,
) -> Result<(GroupPoint, Vec<ViewInfo>), FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let gp = choose(&pts, sel, group)?;
    let mut views = Vec::new();
    for m in &gp.members {
        let at = PointSel::Cycle { cycle: m.point };
        match test::expose(store, Some(site.clone()), &m.vm, at, None) {
            Ok(v) => views.push(v),
            Err(e) => {
                for v in &views {
                    let _ = test::cleanup(store, Some(site.clone()), &v.vm);
                }
                return Err(FailoverError::Noted {
                    source: Box::new(e),
                    note: format!(
                        "test failover of group {group}: VM {} could not be exposed; nothing of the group is exposed",
                        m.vm
                    ),
                });
            }
        }
    }
    Ok((gp, views))
}

/// What cleanup did for one VM: its removed view (if it had one), or why
/// not.
pub type Cleaned = (String, Result<Option<ViewInfo>, FailoverError>);

/// Remove the test failover of every VM of the group's group points.
pub fn cleanup(
    store: &Path,
    site: Option<String>,
    group: &str,
) -> Result<Vec<Cleaned>, FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let mut vms: Vec<String> = pts
        .iter()
        .flat_map(|p| p.members.iter().map(|m| m.vm.clone()))
        .collect();
    vms.sort();
    vms.dedup();
    Ok(vms
        .into_iter()
        .map(|vm| {
            let r = test::cleanup(store, Some(site.clone()), &vm).map(|(v, _)| v);
            (vm, r)
        })
        .collect())
}

/// Unplanned failover of every member to one group point. A member that
/// fails stops it: the error names the members already failed over (undo
/// each with `vdrep failover VM --cancel`).
pub fn unplanned(
    store: &Path,
    site: Option<String>,
    group: &str,
    sel: PointSel,
) -> Result<(GroupPoint, Vec<LiveInfo>), FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let gp = choose(&pts, sel, group)?;
    let mut live = Vec::new();
    for m in &gp.members {
        match role_change::unplanned(store, Some(&site), &m.vm, Some(m.point)) {
            Ok(l) => live.push(l),
            Err(e) if live.is_empty() => return Err(e),
            Err(e) => {
                let done: Vec<String> = gp
                    .members
                    .iter()
                    .take(live.len())
                    .map(|m| m.vm.clone())
                    .collect();
                return Err(FailoverError::Noted {
                    source: Box::new(e),
                    note: format!(
                        "unplanned failover of group {group} to point {} stopped at VM {}: {} failed over already (cancel each with `vdrep failover VM --cancel --store {}`, or fail {} over by itself)",
                        gp.cycle,
                        m.vm,
                        done.join(", "),
                        store.display(),
                        m.vm
                    ),
                });
            }
        }
    }
    Ok((gp, live))
}
