//! The operator's side of role changes: planned and unplanned failover,
//! commit, cancel and reverse (`vdrep failover --planned`, `--unplanned`,
//! `--commit`, `--cancel`, `vdrep reverse`). Each drives the local mount,
//! the local receiver and the other site; the steps a site takes itself
//! are [`crate::roles`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::FailoverError;
use crate::daemon::control::{self, call_ok, FenceReport, Request};
use crate::receiver::control::{self as rctl, call_ok as rcall_ok};
use crate::roles::domain::DomainStart;
use crate::roles::GroupBack;
use crate::roles::{admin_call, AdminReply, AdminRequest, Adoption, Origin};

type Result<T> = std::result::Result<T, FailoverError>;
use crate::util::now_ns;

/// The running mount protecting `vm` (or `dir` if given).
pub(super) fn mount_of_vm(vm: &str, dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()));
    }
    control::mount_of_vm(vm).ok_or_else(|| {
        FailoverError::Refused(format!(
            "no running vdrep mount protects {vm}: give the folder with --dir"
        ))
    })
}

pub(super) fn fence(dir: &Path, vm: &str, on: bool) -> Result<FenceReport> {
    fence_request(dir, vm, on, false)
}

pub(super) fn fence_request(dir: &Path, vm: &str, on: bool, peek: bool) -> Result<FenceReport> {
    call_ok(
        dir,
        &Request::Fence {
            vm: vm.to_string(),
            on,
            peek,
        },
    )?
    .fence
    .ok_or_else(|| FailoverError::Answer("the daemon answered without a fence report".into()))
}

/// The adoption of the fenced VM's disks (in `dir`, protected as `rep`)
/// by this site's store, as the replica of `peer` at `cycle` (cut at
/// `cut_unix_ns`); not marked for resync, not staged.
fn adoption(
    dir: &Path,
    keys: &Path,
    rep: &FenceReport,
    peer: &str,
    vm: &str,
    cycle: u64,
    cut_unix_ns: u64,
) -> Adoption {
    let origin = Origin {
        dir: dir.to_path_buf(),
        keys: Some(keys.to_path_buf()),
        block_size: rep.block_size,
        names: rep
            .disks
            .iter()
            .map(|(n, id, _)| (id.clone(), n.clone()))
            .collect(),
    };
    let disks = rep
        .disks
        .iter()
        .filter_map(|(n, id, _)| Some((n.clone(), crate::replica::parse_hex_id(id)?)))
        .collect();
    Adoption {
        site: peer.into(),
        vm: vm.into(),
        cycle,
        cut_unix_ns,
        origin,
        disks,
        needs_resync: None,
        staged: None,
    }
}

/// Ask the other site (the receiver `rep` replicates to), as the mount's
/// identity `keys`.
pub(super) fn ask_peer(
    keys: &Path,
    rep: &FenceReport,
    req: &AdminRequest,
) -> crate::roles::RoleResult<(String, AdminReply)> {
    admin_call(keys, &rep.spec.to, &rep.spec.trust, req)
}

/// The mount's disks that belong to other VMs (a role change moves the
/// whole folder, so there must be none).
fn foreign_disks(rep: &FenceReport) -> Vec<&str> {
    rep.mount_disks
        .iter()
        .filter(|d| !rep.spec.disks.contains(d))
        .map(String::as_str)
        .collect()
}

/// Options of a planned failover.
pub struct Planned<'a> {
    pub vm: &'a str,
    /// The tracking folder (found from the running mounts if `None`).
    pub dir: Option<&'a Path>,
    /// This site's store (its receiver takes the replica of the other site).
    pub store: &'a Path,
    /// This site's receiver address as the other site reaches it.
    pub reverse_to: &'a str,
    pub timeout: Duration,
    /// Start this domain at the other site on the live disks, from the
    /// final point's definition (checked there before anything changes).
    pub domain: Option<DomainStart>,
    /// A member of a group failed over together ([`super::group::planned`]).
    pub group: Option<GroupBack>,
}

/// What a planned failover did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedReport {
    pub vm: String,
    pub cycle: u64,
    pub peer: String,
    pub live_dir: PathBuf,
    pub live_disks: Vec<PathBuf>,
    pub verified_blocks: u64,
    pub warnings: Vec<String>,
    /// The domain started at the other site.
    pub domain: Option<String>,
}

/// Ask the other site whether it can take `o` over, changing nothing at
/// either site (the mount is asked with `peek`, not fenced): it must be
/// reachable, the VM not live there and, with a domain, the domain
/// startable there from the newest point's definition (every NIC on a
/// network that exists there under the map; whether it already runs there
/// is checked by the request after the stop, as the two sites may share
/// one libvirt). A refusal there is [`FailoverError::Refused`], like one
/// here. A domain's planned failover runs this before it shuts the
/// domain down, so a refusal leaves it running.
pub fn preflight(o: &Planned<'_>) -> Result<()> {
    let vm = o.vm;
    let dir = mount_of_vm(vm, o.dir)?;
    let rep = fence_request(&dir, vm, true, true)?;
    let Some(keys) = rep.keys.clone() else {
        return Err(FailoverError::Refused(format!(
            "{} was mounted without --keys: cannot talk to the other site",
            dir.display()
        )));
    };
    let (peer, live) = ask_peer(&keys, &rep, &live_request(o, true))?;
    match live.live {
        Some(l) => Err(already_live(vm, &peer, &l)),
        None => Ok(()),
    }
}

/// The question a planned failover asks the other site (`before_stop`:
/// the pre-flight, see [`AdminRequest::Live`]).
pub(super) fn live_request(o: &Planned<'_>, before_stop: bool) -> AdminRequest {
    AdminRequest::Live {
        vm: o.vm.into(),
        domain: o.domain.clone(),
        before_stop,
    }
}

pub(super) fn already_live(vm: &str, peer: &str, l: &crate::replica::LiveInfo) -> FailoverError {
    FailoverError::Refused(format!(
        "{vm} is already live at {peer} ({}); fail it back from there",
        l.dir.display()
    ))
}

/// Planned failover from this (active) site to the other one. See the
/// module docs of [`crate::roles`] for the steps.
pub fn planned(o: &Planned<'_>, say: &dyn Fn(&str)) -> Result<PlannedReport> {
    let vm = o.vm;
    let dir = mount_of_vm(vm, o.dir)?;
    let rep = fence(&dir, vm, true)?;
    let undo_fence = |e: FailoverError| -> FailoverError {
        match fence(&dir, vm, false) {
            Ok(_) => e.noted(format!("(the failover was abandoned; {vm} is active here again, writes are allowed)")),
            Err(u) => e.noted(format!("(unfencing {vm} failed too: {u}; run `vdrep failover {vm} --planned` again or remount)")),
        }
    };
    let Some(keys) = rep.keys.clone() else {
        return Err(undo_fence(FailoverError::Refused(format!(
            "{} was mounted without --keys: cannot talk to the other site",
            dir.display()
        ))));
    };
    say(&format!(
        "fenced {vm}: writes to its disks now fail (EROFS)"
    ));
    // The other site must be reachable and not already running the VM.
    let (peer, live) =
        ask_peer(&keys, &rep, &live_request(o, false)).map_err(|e| undo_fence(e.into()))?;
    if let Some(l) = live.live {
        return Err(undo_fence(already_live(vm, &peer, &l)));
    }
    // This site's receiver must be up to take the replica.
    rcall_ok(o.store, &rctl::Request::Ping).map_err(|e| undo_fence(e.into()))?;
    // 1. Ship the last cycle.
    let synced = call_ok(
        &dir,
        &Request::Sync {
            vm: Some(vm.into()),
            timeout_secs: o.timeout.as_secs(),
        },
    )
    .map_err(|e| undo_fence(e.into()))?;
    let cycle = synced
        .synced
        .unwrap_or_default()
        .into_iter()
        .find(|(v, _)| v == vm)
        .map(|(_, c)| c)
        .ok_or_else(|| {
            undo_fence(FailoverError::Answer(
                "the sync reported no recovery point".into(),
            ))
        })?;
    say(&format!(
        "shipped the last cycle: recovery point {cycle} at {peer}"
    ));
    // 2. Prove it: every block's digest equals the replica's.
    let verified = verify_equal(&dir, vm, o.timeout).map_err(undo_fence)?;
    say(&format!(
        "verified: {verified} blocks of the source equal the replica at point {cycle}"
    ));
    hand_over(o, &dir, (&keys, &peer), (cycle, verified), say)
}

/// The end of a planned failover of the fenced, shipped and verified
/// `o.vm` (its final point `cycle`, `verified` blocks): stop replicating
/// it, move its disks into this site's store (released from a folder
/// other VMs keep running from, or the mount stopped), and have the other
/// site (`peer`, reached as `keys`) take it over and replicate back.
pub(super) fn hand_over(
    o: &Planned<'_>,
    dir: &Path,
    (keys, peer): (&Path, &str),
    (cycle, verified): (u64, u64),
    say: &dyn Fn(&str),
) -> Result<PlannedReport> {
    let vm = o.vm;
    let undo_fence = |e: FailoverError| -> FailoverError {
        match fence(dir, vm, false) {
            Ok(_) => e.noted(format!("(the failover was abandoned; {vm} is active here again, writes are allowed)")),
            Err(u) => e.noted(format!("(unfencing {vm} failed too: {u}; run `vdrep failover {vm} --planned` again or remount)")),
        }
    };
    // 3. Stop replicating and unmount, then take the disks into our store.
    let rep = fence(dir, vm, true).map_err(undo_fence)?;
    // Other VMs' disks in the folder keep running: only this VM's disks
    // leave it (fenced per VM), the mount stays.
    let shared = !foreign_disks(&rep).is_empty();
    call_ok(dir, &Request::Unprotect { vm: vm.into() }).map_err(|e| undo_fence(e.into()))?;
    let staged = if shared {
        let to = o.store.join(".staging").join(vm);
        call_ok(
            dir,
            &Request::Release {
                vm: vm.into(),
                disks: rep.disks.iter().map(|(n, _, _)| n.clone()).collect(),
                to: to.clone(),
            },
        )
        .map_err(|e| {
            FailoverError::from(e).noted(format!("({vm} is fenced and unprotected, the other VMs of {} keep running; shut {vm} down and retry `vdrep failover {vm} --planned`)", dir.display()))
        })?;
        say(&format!(
            "{vm}'s disks left {} (the other VMs there keep running)",
            dir.display()
        ));
        Some(to)
    } else {
        crate::daemon::stop(dir, false).map_err(|e| {
            FailoverError::from(e).noted(format!("({vm} is fenced and unprotected; stop what holds {} open and run `vdrep umount {}`, then retry)", dir.display(), dir.display()))
        })?;
        None
    };
    rcall_ok(
        o.store,
        &rctl::Request::Adopt(Adoption {
            staged: staged.clone(),
            ..adoption(dir, keys, &rep, peer, vm, cycle, now_ns())
        }),
    )
    .map_err(|e| {
        FailoverError::from(e).noted(match &staged {
            Some(st) => format!(
                "({vm} is stopped here; its disks are in {}: fix the cause and retry the adoption, or move them back into {} to make it active again)",
                st.display(),
                dir.display()
            ),
            None => format!(
                "({vm} is stopped here: remount {} to make it active again)",
                dir.display()
            ),
        })
    })?;
    if let Some(st) = &staged {
        let _ = std::fs::remove_dir(st);
    }
    say(&format!(
        "{vm}'s disks are now the replica of {peer} in {}",
        o.store.display()
    ));
    // 4. The other site takes over and replicates back.
    let (_, ans) = ask_peer(
        keys,
        &rep,
        &AdminRequest::Promote {
            vm: vm.into(),
            point: Some(cycle),
            reverse_to: Some(o.reverse_to.to_string()),
            every_secs: rep.spec.every_secs,
            max_rate: rep.spec.max_rate,
            policy: crate::roles::ResyncPolicy::of(&rep.spec),
            domain: o.domain.clone(),
            group: o.group.clone(),
        },
    )
    .map_err(|e| {
        FailoverError::from(e).noted(format!("(the disks are safe in {} as the replica at cycle {cycle}; retry the promotion with `vdrep failover {vm} --planned` from here once {peer} is reachable)", o.store.display()))
    })?;
    let live = ans
        .live
        .ok_or_else(|| FailoverError::Answer(format!("{peer} did not say where {vm} is live")))?;
    Ok(PlannedReport {
        vm: vm.into(),
        cycle,
        peer: peer.to_string(),
        live_disks: live.disks.iter().map(|d| d.path.clone()).collect(),
        live_dir: live.dir,
        verified_blocks: verified,
        warnings: ans.warnings,
        domain: ans.domain,
    })
}

/// Compare every block of the VM's disks with the newest point at the
/// receiver; the number of blocks compared, or an error naming the
/// differing ranges.
pub(super) fn verify_equal(dir: &Path, vm: &str, timeout: Duration) -> Result<u64> {
    let r = call_ok(
        dir,
        &Request::Verify {
            vm: vm.into(),
            timeout_secs: timeout.as_secs(),
        },
    )?;
    let disks = r.verify.ok_or_else(|| {
        FailoverError::Answer("the daemon answered without a verify report".into())
    })?;
    let mut blocks = 0;
    for d in &disks {
        if !d.differ.is_empty() {
            return Err(FailoverError::Differs(format!(
                "{}: the replica (point {}) differs from the source in {} range(s), first at byte {}: NOT failing over",
                d.disk,
                d.replica_cycle,
                d.differ.len(),
                d.differ[0].0
            )));
        }
        if d.blocks_skipped > 0 {
            return Err(FailoverError::Differs(format!(
                "{}: {} blocks changed after the fence: NOT failing over",
                d.disk, d.blocks_skipped
            )));
        }
        blocks += d.blocks_compared;
    }
    Ok(blocks)
}

/// Unplanned failover at this (replica) site: `point` (newest if `None`) of
/// `vm` becomes its live disks, mounted and tracked, not protected.
pub fn unplanned(
    store: &Path,
    site: Option<&str>,
    vm: &str,
    point: Option<u64>,
) -> Result<crate::replica::LiveInfo> {
    let r = rcall_ok(
        store,
        &rctl::Request::Promote {
            site: site.map(str::to_string),
            vm: vm.into(),
            point,
        },
    )?;
    r.live.ok_or_else(|| {
        FailoverError::Answer("the receiver did not say where the VM is live".into())
    })
}

/// Make the failover of `vm` at this site final (warnings go to `say`).
pub fn commit(
    store: &Path,
    site: Option<&str>,
    vm: &str,
    say: &dyn Fn(&str),
) -> Result<crate::replica::LiveInfo> {
    let r = rcall_ok(
        store,
        &rctl::Request::CommitFailover {
            site: site.map(str::to_string),
            vm: vm.into(),
        },
    )?;
    let live = r.live.ok_or_else(|| {
        FailoverError::Answer("the receiver did not say where the VM is live".into())
    })?;
    for w in crate::roles::drop_preimages(&live) {
        say(&format!("warning: {w}"));
    }
    Ok(live)
}

/// Cancel the uncommitted failover of `vm` at this site.
pub fn cancel(store: &Path, site: Option<&str>, vm: &str) -> Result<crate::roles::CancelReport> {
    let r = rcall_ok(
        store,
        &rctl::Request::CancelFailover {
            site: site.map(str::to_string),
            vm: vm.into(),
        },
    )?;
    r.cancel
        .ok_or_else(|| FailoverError::Answer("the receiver answered without a report".into()))
}

/// Options of `vdrep reverse`.
pub struct Reverse<'a> {
    pub vm: &'a str,
    /// The old primary's tracking folder.
    pub dir: &'a Path,
    pub store: &'a Path,
    /// This site's receiver address as the other site reaches it.
    pub reverse_to: &'a str,
}

/// At the old primary, after an unplanned failover: take this site's disks
/// of `vm` into the local store (marked for a checksum resync: they may
/// hold writes that never reached the other site) and ask the active site
/// to replicate back. Returns the active site's name and live state.
pub fn reverse(o: &Reverse<'_>, say: &dyn Fn(&str)) -> Result<(String, crate::replica::LiveInfo)> {
    let vm = o.vm;
    let dir = std::fs::canonicalize(o.dir).unwrap_or_else(|_| o.dir.to_path_buf());
    let rep = fence(&dir, vm, true).map_err(|e| {
        e.noted(format!("(`vdrep reverse` needs the old primary's folder mounted with {vm} protected: `vdrep mount {} --keys ...`)", dir.display()))
    })?;
    let unfence = |e: FailoverError| -> FailoverError {
        let _ = fence(&dir, vm, false);
        e
    };
    let keys = rep.keys.clone().ok_or_else(|| {
        unfence(FailoverError::Refused(format!(
            "{} was mounted without --keys",
            dir.display()
        )))
    })?;
    let (peer, ans) = ask_peer(
        &keys,
        &rep,
        &AdminRequest::Live {
            vm: vm.into(),
            domain: None,
            before_stop: false,
        },
    )
    .map_err(|e| unfence(e.into()))?;
    let Some(live) = ans.live else {
        return Err(unfence(FailoverError::Refused(format!(
            "{vm} is not live at {peer}: there is nothing to reverse (this site is still the primary)"
        ))));
    };
    rcall_ok(o.store, &rctl::Request::Ping).map_err(|e| unfence(e.into()))?;
    let others = foreign_disks(&rep);
    if !others.is_empty() {
        return Err(unfence(FailoverError::Refused(format!(
            "{} also holds disks of other VMs ({}): keep each VM in its own folder",
            dir.display(),
            others.join(", ")
        ))));
    }
    call_ok(&dir, &Request::Unprotect { vm: vm.into() })?;
    crate::daemon::stop(&dir, false)?;
    say(&format!("stopped {vm} here ({} unmounted)", dir.display()));
    rcall_ok(
        o.store,
        &rctl::Request::Adopt(Adoption {
            needs_resync: Some(format!(
                "old primary after an unplanned failover to {peer}: it may hold writes that never reached the replica"
            )),
            ..adoption(&dir, &keys, &rep, &peer, vm, live.cycle, live.time_unix_ns)
        }),
    )?;
    say(&format!(
        "{vm}'s disks are now the replica of {peer} in {} (to be resynced by checksums)",
        o.store.display()
    ));
    let (_, ans) = ask_peer(
        &keys,
        &rep,
        &AdminRequest::Reverse {
            vm: vm.into(),
            to: o.reverse_to.to_string(),
            every_secs: rep.spec.every_secs,
            max_rate: rep.spec.max_rate,
            policy: crate::roles::ResyncPolicy::of(&rep.spec),
        },
    )?;
    Ok((peer, ans.live.unwrap_or(live)))
}

/// A `--point` argument as a cycle (`None`: the newest point).
pub fn resolve_point(
    store: &Path,
    site: Option<&str>,
    vm: &str,
    arg: Option<&str>,
) -> Result<Option<u64>> {
    use crate::testview::PointSel;
    let sel = match arg {
        None => return Ok(None),
        Some(a) => PointSel::parse(a).map_err(|e| FailoverError::Invalid(e.to_string()))?,
    };
    match sel {
        PointSel::Latest => Ok(None),
        PointSel::Cycle { cycle } => Ok(Some(cycle)),
        PointSel::Time { unix_ns } => {
            let r = rcall_ok(
                store,
                &rctl::Request::Points {
                    site: site.map(str::to_string),
                    vm: vm.into(),
                },
            )?;
            r.points
                .unwrap_or_default()
                .iter()
                .rev()
                .find(|p| p.point.time_unix_ns <= unix_ns)
                .map(|p| Some(p.point.cycle))
                .ok_or_else(|| {
                    FailoverError::Invalid("no recovery point at or before that time".into())
                })
        }
    }
}
