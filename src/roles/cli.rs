//! The operator's side of role changes: `vdrep failover --planned`,
//! `--unplanned`, `--commit` and `vdrep reverse`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{admin_call, AdminRequest, Origin, RoleResult};
use crate::control::{self, FenceReport, Request};
use crate::receiver::control as rctl;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The running mount protecting `vm` (or `dir` if given).
fn mount_of_vm(vm: &str, dir: Option<&Path>) -> RoleResult<PathBuf> {
    if let Some(d) = dir {
        return Ok(std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()));
    }
    for m in control::running_mounts() {
        if let Ok(r) = control::call(&m, &Request::Status) {
            if r.replication.unwrap_or_default().iter().any(|s| s.vm == vm) {
                return Ok(m);
            }
        }
    }
    Err(format!(
        "no running vdrep mount protects {vm}: give the folder with --dir"
    ))
}

fn call_ok(dir: &Path, req: &Request) -> RoleResult<control::Response> {
    let r = control::call(dir, req).map_err(|e| e.to_string())?;
    if !r.ok {
        return Err(r.error.unwrap_or_else(|| "failed".into()));
    }
    Ok(r)
}

fn rcall_ok(store: &Path, req: &rctl::Request) -> RoleResult<rctl::Response> {
    let r = rctl::call(store, req).map_err(|e| e.to_string())?;
    if !r.ok {
        return Err(r.error.unwrap_or_else(|| "failed".into()));
    }
    Ok(r)
}

fn fence(dir: &Path, vm: &str, on: bool) -> RoleResult<FenceReport> {
    call_ok(
        dir,
        &Request::Fence {
            vm: vm.to_string(),
            on,
        },
    )?
    .fence
    .ok_or_else(|| "the daemon answered without a fence report".to_string())
}

/// Stop the tracking mount at `dir` cleanly (waits for the daemon to exit).
pub(super) fn umount(dir: &Path) -> RoleResult<()> {
    let r = call_ok(dir, &Request::Shutdown { lazy: false })?;
    if let Some(pid) = r.pid {
        if !crate::daemon::wait_pid_gone(pid, Duration::from_secs(120)) {
            return Err(format!(
                "{} is unmounted but its daemon (pid {pid}) did not exit",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Where the fenced VM's disks live, for the store that adopts them.
fn origin_of(dir: &Path, keys: &Path, rep: &FenceReport) -> (Origin, Vec<(String, [u8; 16])>) {
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
    (origin, disks)
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
}

/// Planned failover from this (active) site to the other one. See the
/// module docs of [`crate::roles`] for the steps.
pub fn planned(o: &Planned<'_>, say: &dyn Fn(&str)) -> RoleResult<PlannedReport> {
    let vm = o.vm;
    let dir = mount_of_vm(vm, o.dir)?;
    let rep = fence(&dir, vm, true)?;
    let undo_fence = |e: String| -> String {
        match fence(&dir, vm, false) {
            Ok(_) => format!("{e}\n(the failover was abandoned; {vm} is active here again, writes are allowed)"),
            Err(u) => format!("{e}\n(unfencing {vm} failed too: {u}; run `vdrep failover {vm} --planned` again or remount)"),
        }
    };
    // Other VMs' disks in the folder keep running: only this VM's disks
    // leave it (fenced per VM), the mount stays.
    let shared = !foreign_disks(&rep).is_empty();
    let Some(keys) = rep.keys.clone() else {
        return Err(undo_fence(format!(
            "{} was mounted without --keys: cannot talk to the other site",
            dir.display()
        )));
    };
    say(&format!(
        "fenced {vm}: writes to its disks now fail (EROFS)"
    ));
    // The other site must be reachable and not already running the VM.
    let (peer, live) = admin_call(
        &keys,
        &rep.spec.to,
        &rep.spec.trust,
        &AdminRequest::Live { vm: vm.into() },
    )
    .map_err(undo_fence)?;
    if let Some(l) = live.live {
        return Err(undo_fence(format!(
            "{vm} is already live at {peer} ({}); fail it back from there",
            l.dir.display()
        )));
    }
    // This site's receiver must be up to take the replica.
    rcall_ok(o.store, &rctl::Request::Ping).map_err(undo_fence)?;
    // 1. Ship the last cycle.
    let synced = call_ok(
        &dir,
        &Request::Sync {
            vm: Some(vm.into()),
            timeout_secs: o.timeout.as_secs(),
        },
    )
    .map_err(undo_fence)?;
    let cycle = synced
        .synced
        .unwrap_or_default()
        .into_iter()
        .find(|(v, _)| v == vm)
        .map(|(_, c)| c)
        .ok_or_else(|| undo_fence("the sync reported no recovery point".into()))?;
    say(&format!(
        "shipped the last cycle: recovery point {cycle} at {peer}"
    ));
    // 2. Prove it: every block's digest equals the replica's.
    let verified = verify_equal(&dir, vm, o.timeout).map_err(undo_fence)?;
    say(&format!(
        "verified: {verified} blocks of the source equal the replica at point {cycle}"
    ));
    // 3. Stop replicating and unmount, then take the disks into our store.
    let rep = fence(&dir, vm, true).map_err(undo_fence)?;
    call_ok(&dir, &Request::Unprotect { vm: vm.into() }).map_err(undo_fence)?;
    let staged = if shared {
        let to = o.store.join(".staging").join(vm);
        call_ok(
            &dir,
            &Request::Release {
                vm: vm.into(),
                disks: rep.disks.iter().map(|(n, _, _)| n.clone()).collect(),
                to: to.clone(),
            },
        )
        .map_err(|e| {
            format!("{e}\n({vm} is fenced and unprotected, the other VMs of {} keep running; shut {vm} down and retry `vdrep failover {vm} --planned`)", dir.display())
        })?;
        say(&format!(
            "{vm}'s disks left {} (the other VMs there keep running)",
            dir.display()
        ));
        Some(to)
    } else {
        umount(&dir).map_err(|e| {
            format!("{e}\n({vm} is fenced and unprotected; stop what holds {} open and run `vdrep umount {}`, then retry)", dir.display(), dir.display())
        })?;
        None
    };
    let (origin, disks) = origin_of(&dir, &keys, &rep);
    rcall_ok(
        o.store,
        &rctl::Request::Adopt(super::Adoption {
            site: peer.clone(),
            vm: vm.into(),
            cycle,
            cut_unix_ns: now_ns(),
            origin,
            disks,
            needs_resync: None,
            staged: staged.clone(),
        }),
    )
    .map_err(|e| match &staged {
        Some(st) => format!(
            "{e}\n({vm} is stopped here; its disks are in {}: fix the cause and retry the adoption, or move them back into {} to make it active again)",
            st.display(),
            dir.display()
        ),
        None => format!(
            "{e}\n({vm} is stopped here: remount {} to make it active again)",
            dir.display()
        ),
    })?;
    if let Some(st) = &staged {
        let _ = std::fs::remove_dir(st);
    }
    say(&format!(
        "{vm}'s disks are now the replica of {peer} in {}",
        o.store.display()
    ));
    // 4. The other site takes over and replicates back.
    let (_, ans) = admin_call(
        &keys,
        &rep.spec.to,
        &rep.spec.trust,
        &AdminRequest::Promote {
            vm: vm.into(),
            point: Some(cycle),
            reverse_to: Some(o.reverse_to.to_string()),
            every_secs: rep.spec.every_secs,
            max_rate: rep.spec.max_rate,
            policy: super::ResyncPolicy::of(&rep.spec),
        },
    )
    .map_err(|e| {
        format!("{e}\n(the disks are safe in {} as the replica at cycle {cycle}; retry the promotion with `vdrep failover {vm} --planned` from here once {peer} is reachable)", o.store.display())
    })?;
    let live = ans
        .live
        .ok_or_else(|| format!("{peer} did not say where {vm} is live"))?;
    Ok(PlannedReport {
        vm: vm.into(),
        cycle,
        peer,
        live_disks: live.disks.iter().map(|d| d.path.clone()).collect(),
        live_dir: live.dir,
        verified_blocks: verified,
        warnings: ans.warnings,
    })
}

/// Compare every block of the VM's disks with the newest point at the
/// receiver; the number of blocks compared, or an error naming the
/// differing ranges.
fn verify_equal(dir: &Path, vm: &str, timeout: Duration) -> RoleResult<u64> {
    let r = call_ok(
        dir,
        &Request::Verify {
            vm: vm.into(),
            timeout_secs: timeout.as_secs(),
        },
    )?;
    let disks = r
        .verify
        .ok_or_else(|| "the daemon answered without a verify report".to_string())?;
    let mut blocks = 0;
    for d in &disks {
        if !d.differ.is_empty() {
            return Err(format!(
                "{}: the replica (point {}) differs from the source in {} range(s), first at byte {}: NOT failing over",
                d.disk,
                d.replica_cycle,
                d.differ.len(),
                d.differ[0].0
            ));
        }
        if d.blocks_skipped > 0 {
            return Err(format!(
                "{}: {} blocks changed after the fence: NOT failing over",
                d.disk, d.blocks_skipped
            ));
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
) -> RoleResult<crate::replica::LiveInfo> {
    let r = rcall_ok(
        store,
        &rctl::Request::Promote {
            site: site.map(str::to_string),
            vm: vm.into(),
            point,
        },
    )?;
    r.live
        .ok_or_else(|| "the receiver did not say where the VM is live".to_string())
}

/// Make the failover of `vm` at this site final.
pub fn commit(store: &Path, site: Option<&str>, vm: &str) -> RoleResult<crate::replica::LiveInfo> {
    let r = rcall_ok(
        store,
        &rctl::Request::CommitFailover {
            site: site.map(str::to_string),
            vm: vm.into(),
        },
    )?;
    let live = r
        .live
        .ok_or_else(|| "the receiver did not say where the VM is live".to_string())?;
    for w in super::drop_preimages(&live) {
        say(&format!("warning: {w}"));
    }
    Ok(live)
}

/// Cancel the uncommitted failover of `vm` at this site.
pub fn cancel(store: &Path, site: Option<&str>, vm: &str) -> RoleResult<super::CancelReport> {
    let r = rcall_ok(
        store,
        &rctl::Request::CancelFailover {
            site: site.map(str::to_string),
            vm: vm.into(),
        },
    )?;
    r.cancel
        .ok_or_else(|| "the receiver answered without a report".to_string())
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
pub fn reverse(
    o: &Reverse<'_>,
    say: &dyn Fn(&str),
) -> RoleResult<(String, crate::replica::LiveInfo)> {
    let vm = o.vm;
    let dir = std::fs::canonicalize(o.dir).unwrap_or_else(|_| o.dir.to_path_buf());
    let rep = fence(&dir, vm, true).map_err(|e| {
        format!("{e}\n(`vdrep reverse` needs the old primary's folder mounted with {vm} protected: `vdrep mount {} --keys ...`)", dir.display())
    })?;
    let unfence = |e: String| -> String {
        let _ = fence(&dir, vm, false);
        e
    };
    let keys = rep
        .keys
        .clone()
        .ok_or_else(|| unfence(format!("{} was mounted without --keys", dir.display())))?;
    let (peer, ans) = admin_call(
        &keys,
        &rep.spec.to,
        &rep.spec.trust,
        &AdminRequest::Live { vm: vm.into() },
    )
    .map_err(unfence)?;
    let Some(live) = ans.live else {
        return Err(unfence(format!(
            "{vm} is not live at {peer}: there is nothing to reverse (this site is still the primary)"
        )));
    };
    rcall_ok(o.store, &rctl::Request::Ping).map_err(unfence)?;
    let others = foreign_disks(&rep);
    if !others.is_empty() {
        return Err(unfence(format!(
            "{} also holds disks of other VMs ({}): keep each VM in its own folder",
            dir.display(),
            others.join(", ")
        )));
    }
    call_ok(&dir, &Request::Unprotect { vm: vm.into() })?;
    umount(&dir)?;
    say(&format!("stopped {vm} here ({} unmounted)", dir.display()));
    let (origin, disks) = origin_of(&dir, &keys, &rep);
    rcall_ok(
        o.store,
        &rctl::Request::Adopt(super::Adoption {
            site: peer.clone(),
            vm: vm.into(),
            cycle: live.cycle,
            cut_unix_ns: live.time_unix_ns,
            origin,
            disks,
            needs_resync: Some(format!(
                "old primary after an unplanned failover to {peer}: it may hold writes that never reached the replica"
            )),
            staged: None,
        }),
    )?;
    say(&format!(
        "{vm}'s disks are now the replica of {peer} in {} (to be resynced by checksums)",
        o.store.display()
    ));
    let (_, ans) = admin_call(
        &keys,
        &rep.spec.to,
        &rep.spec.trust,
        &AdminRequest::Reverse {
            vm: vm.into(),
            to: o.reverse_to.to_string(),
            every_secs: rep.spec.every_secs,
            max_rate: rep.spec.max_rate,
            policy: super::ResyncPolicy::of(&rep.spec),
        },
    )?;
    Ok((peer, ans.live.unwrap_or(live)))
}

fn say(s: &str) {
    eprintln!("vdrep: {s}");
}

/// `vdrep failover NAME --planned | --unplanned | --commit | --cancel`.
pub fn run_failover(a: crate::cli::FailoverArgs) -> i32 {
    let vm = a.name.as_str();
    if a.mode.planned {
        let Some(reverse_to) = a.reverse_to.as_deref() else {
            eprintln!("vdrep: --planned needs --reverse-to HOST:PORT (this site's receiver, for replicating back)");
            return 2;
        };
        let o = Planned {
            vm,
            dir: a.dir.as_deref(),
            store: &a.store,
            reverse_to,
            timeout: Duration::from_secs(a.timeout),
        };
        return match planned(&o, &say) {
            Ok(r) => {
                for w in &r.warnings {
                    eprintln!("vdrep: warning: {w}");
                }
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    println!(
                        "{vm}: planned failover done: nothing lost (recovery point {}, {} blocks verified equal); now live at {} in {}, replicating back to this site",
                        r.cycle,
                        r.verified_blocks,
                        r.peer,
                        r.live_dir.display()
                    );
                    for d in &r.live_disks {
                        println!("{}", d.display());
                    }
                }
                0
            }
            Err(e) => {
                eprintln!("vdrep: planned failover of {vm} failed: {e}");
                1
            }
        };
    }
    if a.mode.cancel {
        return match cancel(&a.store, a.site.as_deref(), vm) {
            Ok(r) => {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                } else {
                    println!(
                        "{vm}: failover cancelled: {} written on the failed-over disks undone, {} stopped; the replica is back at its newest point {} with its {} recovery point(s) as before; replication from the original primary resumes (re-protect it there if it went Critical)",
                        crate::cli::human(r.undone_bytes),
                        r.dir.display(),
                        r.points.last().map_or(r.cycle, |p| p.cycle),
                        r.points.len()
                    );
                }
                0
            }
            Err(e) => {
                eprintln!("vdrep: cancel of the failover of {vm}: {e}");
                1
            }
        };
    }
    if a.mode.commit {
        return match commit(&a.store, a.site.as_deref(), vm) {
            Ok(l) => {
                println!(
                    "{vm}: failover committed; live at {} from point {}; the history before it was dropped",
                    l.dir.display(),
                    l.cycle
                );
                0
            }
            Err(e) => {
                eprintln!("vdrep: commit of {vm}: {e}");
                1
            }
        };
    }
    // Unplanned.
    let point = match resolve_point(&a.store, a.site.as_deref(), vm, a.point.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vdrep: --point: {e}");
            return 2;
        }
    };
    match unplanned(&a.store, a.site.as_deref(), vm, point) {
        Ok(l) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&l).unwrap_or_default());
            } else {
                println!(
                    "{vm}: unplanned failover to point {}: live (tracked, not yet protected) in {}",
                    l.cycle,
                    l.dir.display()
                );
                for d in &l.disks {
                    println!("{}", d.path.display());
                }
                eprintln!(
                    "vdrep: start the VM on these disks; when the old primary is back run `vdrep reverse {vm}` there; `vdrep failover {vm} --commit` makes this final"
                );
            }
            0
        }
        Err(e) => {
            eprintln!("vdrep: unplanned failover of {vm} failed: {e}");
            1
        }
    }
}

/// A `--point` argument as a cycle (`None`: the newest point).
fn resolve_point(
    store: &Path,
    site: Option<&str>,
    vm: &str,
    arg: Option<&str>,
) -> RoleResult<Option<u64>> {
    use crate::failover::PointSel;
    let sel = match arg {
        None => return Ok(None),
        Some(a) => PointSel::parse(a)?,
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
                .ok_or_else(|| "no recovery point at or before that time".to_string())
        }
    }
}

/// `vdrep reverse NAME --dir DIR --store STORE --reverse-to ADDR`.
pub fn run_reverse(vm: &str, dir: &Path, store: &Path, reverse_to: &str) -> i32 {
    let o = Reverse {
        vm,
        dir,
        store,
        reverse_to,
    };
    match reverse(&o, &say) {
        Ok((peer, live)) => {
            println!(
                "{vm}: reverse replication started: {peer} (live in {}) replicates back to this site; the first cycle is a checksum resync",
                live.dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("vdrep: reverse of {vm} failed: {e}");
            1
        }
    }
}
