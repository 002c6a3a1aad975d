//! A consistency group's failover: one group point chosen for every VM of
//! the group ([`crate::replica::group`]), then each member's test or
//! unplanned failover to that point. Refused, changing nothing, when the
//! point is not a group point; a member that fails midway leaves the
//! others as they are, and the error says which were done and how to undo
//! them. A planned failover of the group ([`planned`]) shuts down the
//! members' libvirt domains, fences every member, ships one final group
//! cut, verifies every member, then hands them over one after the other
//! (the other site starts their domains); commit and cancel act on every
//! member.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::domain::{self, StoppedDomain, TestDomain};
use super::role_change::{self, Planned, PlannedReport};
use super::{test, FailoverError};
use crate::daemon::control as mount_ctl;
use crate::ipc::CallErrorKind;
use crate::libvirt::{Definition, Virsh};
use crate::receiver::control::{self, Request};
use crate::replica::{GroupPoint, LiveInfo};
use crate::roles::domain::DomainStart;
use crate::roles::{CancelReport, GroupBack};
use crate::testview::{PointSel, ViewInfo};
use crate::util::steps::Steps;

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

/// One member's test failover: its view and, when its point carries a
/// libvirt domain definition, the running test copy of that domain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberTest {
    #[serde(flatten)]
    pub view: ViewInfo,
    /// The domain (its name in the definition) and its test copy.
    pub domain: Option<(String, TestDomain)>,
}

/// The libvirt domain definition kept with point `cycle` of `vm`, if any.
fn point_definition(
    store: &Path,
    site: &str,
    vm: &str,
    cycle: u64,
) -> Result<Option<Definition>, FailoverError> {
    let (_, pts) = test::points(store, Some(site.to_string()), vm)?;
    pts.iter()
        .find(|p| p.point.cycle == cycle)
        .and_then(|p| p.definition.as_deref())
        .map(Definition::parse)
        .transpose()
        .map_err(FailoverError::from)
}

/// Remove the members' test failovers: every domain's test copy first,
/// then the views. (A QEMU started after another member's view was
/// mounted may hold a copy of that mount in its own mount namespace:
/// libvirt gives each QEMU one, and on a host whose mounts do not
/// propagate (no systemd) the view's unmount does not reach it, so the
/// view's FUSE session ends only when that QEMU does.)
fn remove_member_tests(virsh: &Virsh, store: &Path, site: &str, made: &[MemberTest]) {
    for t in made {
        if let Some((d, _)) = &t.domain {
            let _ = domain::cleanup_test_copy(virsh, d);
        }
    }
    for t in made {
        let _ = test::cleanup(store, Some(site.to_string()), &t.view.vm);
    }
}

/// Test failover of every member at one group point: one view per VM,
/// and for a member whose point carries a libvirt domain definition, its
/// test copy `D-test` started on the isolated `network` (as `failover
/// --domain D --test`). If a member cannot be exposed or started, what
/// was made for the others is removed again.
pub fn test(
    store: &Path,
    site: Option<String>,
    group: &str,
    sel: PointSel,
    (virsh, network): (&Virsh, &str),
) -> Result<(GroupPoint, Vec<MemberTest>), FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let gp = choose(&pts, sel, group)?;
    let mut made: Vec<MemberTest> = Vec::new();
    for m in &gp.members {
        let at = PointSel::Cycle { cycle: m.point };
        let one = point_definition(store, &site, &m.vm, m.point).and_then(|def| match def {
            Some(def) => {
                let o = domain::TestOptions {
                    store,
                    site: Some(site.clone()),
                    vm: &m.vm,
                    point: at,
                    at: None,
                    definition: &domain::DefinitionFrom::Point(def.name.clone()),
                    network,
                };
                domain::test_failover(virsh, &o, &mut Steps::start()).map(|(view, t)| MemberTest {
                    view,
                    domain: Some((def.name.clone(), t)),
                })
            }
            None => test::expose(store, Some(site.clone()), &m.vm, at, None)
                .map(|view| MemberTest { view, domain: None }),
        });
        match one {
            Ok(t) => made.push(t),
            Err(e) => {
                remove_member_tests(virsh, store, &site, &made);
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
    Ok((gp, made))
}

/// What cleanup did for one VM: its removed view (if it had one), or why
/// not.
pub type Cleaned = (String, Result<Option<ViewInfo>, FailoverError>);

/// Remove the test failover of every VM of the group's group points,
/// and the test copy of every libvirt domain their points name: every
/// copy first, then the views (see [`remove_member_tests`]); a VM whose
/// copy could not be removed keeps its view.
pub fn cleanup(
    store: &Path,
    site: Option<String>,
    group: &str,
    virsh: &Virsh,
) -> Result<Vec<Cleaned>, FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let copies: Vec<(String, Result<(), FailoverError>)> = member_names(&pts)
        .into_iter()
        .map(|vm| {
            let r = remove_domain_copies(virsh, store, &site, &vm);
            (vm, r)
        })
        .collect();
    Ok(copies
        .into_iter()
        .map(|(vm, r)| {
            let r = r.and_then(|()| test::cleanup(store, Some(site.clone()), &vm).map(|(v, _)| v));
            (vm, r)
        })
        .collect())
}

/// Destroy and undefine the test copies of the domains `vm`'s points
/// name (a domain renamed between points has one name per definition).
fn remove_domain_copies(
    virsh: &Virsh,
    store: &Path,
    site: &str,
    vm: &str,
) -> Result<(), FailoverError> {
    let (_, pts) = test::points(store, Some(site.to_string()), vm)?;
    let mut names: Vec<String> = pts
        .iter()
        .filter_map(|p| Definition::parse(p.definition.as_deref()?).ok())
        .map(|d| d.name)
        .collect();
    names.sort();
    names.dedup();
    for d in names {
        domain::cleanup_test_copy(virsh, &d)?;
    }
    Ok(())
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

/// The VMs of `group` protected by the mount at `dir`, by name.
fn members_at(dir: &Path, group: &str) -> Result<Vec<String>, FailoverError> {
    let r = mount_ctl::call_ok(dir, &mount_ctl::Request::Status)?;
    let mut v: Vec<String> = r
        .replication
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.group.as_deref() == Some(group))
        .map(|s| s.vm)
        .collect();
    v.sort();
    Ok(v)
}

/// Each member's newest committed point, from the mount at `dir`.
fn last_points(dir: &Path, members: &[String]) -> Result<Vec<Option<u64>>, FailoverError> {
    let r = mount_ctl::call_ok(dir, &mount_ctl::Request::Status)?;
    let st = r.replication.unwrap_or_default();
    Ok(members
        .iter()
        .map(|m| st.iter().find(|s| &s.vm == m).and_then(|s| s.last_point))
        .collect())
}

/// Options of a group's planned failover.
pub struct PlannedGroup<'a> {
    pub group: &'a str,
    /// The group's tracking folder (found from the running mounts if `None`).
    pub dir: Option<&'a Path>,
    /// This site's store (its receiver takes the replicas).
    pub store: &'a Path,
    /// This site's receiver address as the other site reaches it.
    pub reverse_to: &'a str,
    pub timeout: Duration,
    /// Members protected as libvirt domains: the daemon here, the network
    /// map of the other site, and how long each guest gets to power off.
    pub domains: GroupDomains<'a>,
}

/// How a group's planned failover treats members that are libvirt
/// domains (`protect --domain D --group G`).
pub struct GroupDomains<'a> {
    pub virsh: &'a Virsh,
    /// A NIC on the key's network or bridge lands on the value's at the
    /// other site.
    pub network_map: BTreeMap<String, String>,
    pub shutdown_timeout: Duration,
}

/// What a group's planned failover did: the final group point, each
/// member's planned failover, and the domains stopped here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedGroupReport {
    pub group: String,
    pub cycle: u64,
    pub vms: Vec<PlannedReport>,
    /// The members' libvirt domains, as they were stopped here (each
    /// member's `domain` says it was started at the other site).
    pub stopped: Vec<StoppedDomain>,
}

/// Planned failover of every member of `o.group` from this (active) site
/// to the other one, zero loss across all of them: fence every member,
/// one final group cut shipped by all, every member verified equal to its
/// replica, then each handed over (the other site starts them in one
/// folder and protects them back as the group). Members protected as
/// libvirt domains are shut down here first (all at once: an ACPI
/// request, a timeout, then destroy), after the other site said it can
/// start each, and are started there on their live disks from the final
/// point's definitions; failback is the same from the other site.
/// Refused before the hand-over starts: every member active here again
/// (its domain started again if it ran). A member failing
/// during the hand-over: the error names the members already live at the
/// other site and those active here again, and how to finish or undo.
pub fn planned(
    o: &PlannedGroup<'_>,
    say: &dyn Fn(&str),
) -> Result<PlannedGroupReport, FailoverError> {
    let group = o.group;
    crate::replica::validate_name("group", group)
        .map_err(|e| FailoverError::Invalid(e.to_string()))?;
    let dir: PathBuf = match o.dir {
        Some(d) => std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()),
        None => mount_ctl::running_mounts()
            .into_iter()
            .find(|m| members_at(m, group).is_ok_and(|v| !v.is_empty()))
            .ok_or_else(|| {
                FailoverError::Refused(format!(
                    "no running vdrep mount protects a VM of group {group}: give the folder with --dir"
                ))
            })?,
    };
    let members = members_at(&dir, group)?;
    if members.is_empty() {
        return Err(FailoverError::Refused(format!(
            "the mount of {} protects no VM of group {group}",
            dir.display()
        )));
    }
    let back = GroupBack {
        name: group.to_string(),
        members: members.clone(),
    };
    // Members that are libvirt domains: the other site must be able to
    // start each (asked before anything changes here: a refusal leaves
    // them running), then all are shut down here at once, before the
    // fence, so the guests' last writes at shutdown still ship.
    let mut plans = Vec::new();
    for vm in &members {
        let domain = role_change::fence_request(&dir, vm, true, true)?
            .spec
            .domain
            .map(|name| DomainStart {
                name,
                network_map: o.domains.network_map.clone(),
            });
        plans.push(planned_of(vm, &dir, o, &back, domain));
    }
    let named: Vec<(String, String)> = plans
        .iter()
        .filter_map(|p| Some((p.vm.to_string(), p.domain.as_ref()?.name.clone())))
        .collect();
    for p in plans.iter().filter(|p| p.domain.is_some()) {
        role_change::preflight(p)?;
    }
    let virsh = o.domains.virsh;
    let stopped = if named.is_empty() {
        Vec::new()
    } else {
        domain::stop_all(virsh, &named, o.domains.shutdown_timeout, say)?
    };
    let unfence = |vms: &[String], e: FailoverError| -> FailoverError {
        let failed: Vec<String> = vms
            .iter()
            .filter(|vm| role_change::fence(&dir, vm, false).is_err())
            .cloned()
            .collect();
        let e = if failed.is_empty() {
            e.noted(format!("(the failover of group {group} was abandoned; every member is active here again, writes are allowed)"))
        } else {
            e.noted(format!("(the failover of group {group} was abandoned, but unfencing {} failed: run `vdrep failover --group {group} --planned` again or remount {})", failed.join(", "), dir.display()))
        };
        e.noted_if(domain::restart(virsh, &stopped, vms))
    };
    // 1. Fence every member: from here on no member's disk changes.
    let mut fenced = Vec::new();
    for vm in &members {
        match role_change::fence(&dir, vm, true) {
            Ok(rep) => fenced.push(rep),
            Err(e) => return Err(unfence(&members, e)),
        }
    }
    say(&format!(
        "fenced group {group} ({}): writes to their disks now fail (EROFS)",
        members.join(", ")
    ));
    let Some(keys) = fenced[0].keys.clone() else {
        return Err(unfence(
            &members,
            FailoverError::Refused(format!(
                "{} was mounted without --keys: cannot talk to the other site",
                dir.display()
            )),
        ));
    };
    // The other site must be reachable and run none of them; this site's
    // receiver must be up to take the replicas.
    let mut peer = String::new();
    for ((vm, rep), plan) in members.iter().zip(&fenced).zip(&plans) {
        let (p, live) = role_change::ask_peer(&keys, rep, &role_change::live_request(plan, false))
            .map_err(|e| unfence(&members, e.into()))?;
        if let Some(l) = live.live {
            return Err(unfence(&members, role_change::already_live(vm, &p, &l)));
        }
        peer = p;
    }
    control::call_ok(o.store, &Request::Ping).map_err(|e| unfence(&members, e.into()))?;
    // 2. One final group cut of every member, shipped by all.
    let cycle = final_group_cut(&dir, &members, o.timeout).map_err(|e| unfence(&members, e))?;
    say(&format!(
        "shipped the last writes of every member: group point {cycle} at {peer}"
    ));
    // 3. Prove it: every block of every member equals its replica.
    let mut verified = Vec::new();
    for vm in &members {
        let v = role_change::verify_equal(&dir, vm, o.timeout).map_err(|e| unfence(&members, e))?;
        say(&format!(
            "verified: {v} blocks of {vm} equal its replica at point {cycle}"
        ));
        verified.push(v);
    }
    // 4. Hand each over.
    let mut vms = Vec::new();
    for (i, vm) in members.iter().enumerate() {
        match role_change::hand_over(&plans[i], &dir, (&keys, &peer), (cycle, verified[i]), say) {
            Ok(r) => {
                say(&format!("{vm} is live at {peer}"));
                vms.push(r);
            }
            Err(e) => {
                let rest = &members[i + 1..];
                let _ = rest
                    .iter()
                    .map(|vm| role_change::fence(&dir, vm, false))
                    .collect::<Vec<_>>();
                let e = e.noted_if(domain::restart(virsh, &stopped, rest));
                let done: Vec<&str> = vms.iter().map(|r: &PlannedReport| r.vm.as_str()).collect();
                return Err(e.noted(format!(
                    "planned failover of group {group} stopped at {vm}: {} live at {peer} already (replicating back here); {} active here again. Finish: fix the cause and run `vdrep failover --group {group} --planned` again here (it moves the members still protected here); undo: fail {} back with `vdrep failover VM --planned` at {peer}",
                    if done.is_empty() { "none".to_string() } else { done.join(", ") },
                    if rest.is_empty() { "no other member is".to_string() } else { format!("{} are", rest.join(", ")) },
                    if done.is_empty() { "nothing".to_string() } else { done.join(", ") },
                )));
            }
        }
    }
    Ok(PlannedGroupReport {
        group: group.to_string(),
        cycle,
        vms,
        stopped,
    })
}

/// The planned failover of member `vm` of the group `back` (with its
/// libvirt domain, if it is one).
fn planned_of<'a>(
    vm: &'a str,
    dir: &'a Path,
    o: &PlannedGroup<'a>,
    back: &GroupBack,
    domain: Option<DomainStart>,
) -> Planned<'a> {
    Planned {
        vm,
        dir: Some(dir),
        store: o.store,
        reverse_to: o.reverse_to,
        timeout: o.timeout,
        domain,
        group: Some(back.clone()),
    }
}

/// With every member fenced: cut the group (a sync of one member cuts
/// all) and wait until every member's newest point is that same cycle,
/// the group point that holds all of their writes.
fn final_group_cut(
    dir: &Path,
    members: &[String],
    timeout: Duration,
) -> Result<u64, FailoverError> {
    let synced = mount_ctl::call_ok(
        dir,
        &mount_ctl::Request::Sync {
            vm: members.first().cloned(),
            timeout_secs: timeout.as_secs(),
        },
    )?;
    let want = synced
        .synced
        .unwrap_or_default()
        .into_iter()
        .map(|(_, c)| c)
        .max()
        .ok_or_else(|| FailoverError::Answer("the sync reported no recovery point".into()))?;
    let t0 = Instant::now();
    loop {
        let at = last_points(dir, members)?;
        if let Some(Some(c)) = at.first() {
            if *c >= want && at.iter().all(|p| *p == Some(*c)) {
                return Ok(*c);
            }
        }
        if t0.elapsed() > timeout {
            let shown: Vec<String> = members
                .iter()
                .zip(&at)
                .map(|(m, p)| format!("{m} at {}", p.map_or("no point".into(), |c| c.to_string())))
                .collect();
            return Err(FailoverError::Answer(format!(
                "the members did not reach one final group point {want} within {} s ({})",
                timeout.as_secs(),
                shown.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every VM of any of `pts`, by name.
fn member_names(pts: &[GroupPoint]) -> Vec<String> {
    let mut vms: Vec<String> = pts
        .iter()
        .flat_map(|p| p.members.iter().map(|m| m.vm.clone()))
        .collect();
    vms.sort();
    vms.dedup();
    vms
}

/// The VMs of `group` at this site (every member of its group points).
fn store_members(
    store: &Path,
    site: Option<String>,
    group: &str,
) -> Result<(String, Vec<String>), FailoverError> {
    let (site, pts) = points(store, site, group)?;
    let vms = member_names(&pts);
    if vms.is_empty() {
        return Err(FailoverError::Invalid(format!(
            "group {group} has no group point here: `vdrep points --group {group}` lists them"
        )));
    }
    Ok((site, vms))
}

/// Run `each` for every member of `group` in order; the first that fails
/// stops it, and the error names the members already done.
fn every_member<T>(
    store: &Path,
    site: Option<String>,
    group: &str,
    what: &str,
    each: &dyn Fn(&str, &str) -> Result<T, FailoverError>,
) -> Result<Vec<(String, T)>, FailoverError> {
    let (site, vms) = store_members(store, site, group)?;
    let mut done = Vec::new();
    for vm in &vms {
        match each(&site, vm) {
            Ok(t) => done.push((vm.clone(), t)),
            Err(e) => {
                let names: Vec<&str> = done.iter().map(|(v, _)| v.as_str()).collect();
                return Err(e.noted(format!(
                    "{what} of group {group} stopped at {vm}: {} done already; the others are as they were (fix the cause and run it again for the rest, or `vdrep failover VM --{what}` for each)",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )));
            }
        }
    }
    Ok(done)
}

/// Make the failover of every member of `group` at this site final.
pub fn commit(
    store: &Path,
    site: Option<String>,
    group: &str,
    say: &dyn Fn(&str),
) -> Result<Vec<(String, LiveInfo)>, FailoverError> {
    every_member(store, site, group, "commit", &|site, vm| {
        role_change::commit(store, Some(site), vm, say)
    })
}

/// Cancel the uncommitted failover of every member of `group` here.
pub fn cancel(
    store: &Path,
    site: Option<String>,
    group: &str,
) -> Result<Vec<(String, CancelReport)>, FailoverError> {
    every_member(store, site, group, "cancel", &|site, vm| {
        role_change::cancel(store, Some(site), vm)
    })
}
