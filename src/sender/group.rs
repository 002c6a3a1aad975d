//! Consistency groups at the sender: the protected VMs of one mount with
//! the same `group` share every recovery point.
//!
//! One coordinator task per group ([`Replicator::coordinate`]) owns the
//! group's schedule (the shortest `--every` of its members; continuous if
//! one is) and cuts: it freezes every member that has an app hook due,
//! flushes the mount, seals **every disk of every member in one
//! [`Tracker::seal`]** (one cycle number, one instant), thaws, writes the
//! logs and hands each member its cycle. The members' workers never cut in
//! their steady state; they ship what the coordinator sealed, and their
//! `PointCommit`s name the group ([`wire::PointGroup`]). The receiver makes
//! a cycle a group point once every member has a point there
//! ([`crate::replica::group`]).
//!
//! A group is cut only while every member is connected and in its steady
//! state: while one is in its initial copy, a resync, a retry or a job, no
//! member is cut (no point that is not a group point), and every member's
//! status says why (`group_waiting`). Members must be under this mount:
//! its cycle numbers are the instants (`origin`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{app_hook, retry, AppCut, Replicator, SendError, Vm, VmState};
use crate::tracking::{CutEntry, CutSelect, TrackError, Tracker};
use crate::wire;

/// How often a waiting coordinator looks at its members again.
const GROUP_POLL: Duration = Duration::from_millis(200);

/// A running group coordinator.
#[derive(Default)]
pub(super) struct GroupCtl {
    wake: Notify,
    /// A member's `vdrep sync` asked for a cut now.
    sync: AtomicBool,
}

/// One VM's part of a cut: its name, its app hook if due, its disks.
pub(super) struct CutPart {
    pub vm: String,
    pub hook: Option<app_hook::AppHookSpec>,
    pub disks: Vec<String>,
}

/// Freeze every part whose hook is due, flush, seal all their disks at one
/// instant, thaw, and write the logs (a part's logs are app-consistent iff
/// its freeze worked). Every disk is sealed or none: a skipped disk gives
/// every sealed cycle back (unless `partial_ok`: a VM's own cut, whose
/// caller reads the skipped entries). With `note`, the sealed cycle gets
/// it durably before any log is written ([`Tracker::note_cut`]: a group
/// cut's record survives a restart with its logs). One [`AppCut`] per
/// part.
pub(super) fn freeze_seal_thaw(
    tracker: &Tracker,
    flush: &super::flush::FlushGate,
    parts: &[CutPart],
    partial_ok: bool,
    note: Option<&[u8]>,
) -> Result<(Vec<CutEntry>, Vec<AppCut>), TrackError> {
    // Quiesce the guests first: what they flush must reach the mount
    // (syncfs) before the cut.
    let mut apps: Vec<AppCut> = parts.iter().map(|_| AppCut::default()).collect();
    for (p, app) in parts.iter().zip(apps.iter_mut()) {
        if let Some(h) = &p.hook {
            app.tried = true;
            match app_hook::run(h, "freeze", &p.vm) {
                Ok(_) => app.frozen = true,
                Err(e) => app.error = Some(e.to_string()),
            }
        }
    }
    let frozen_at = Instant::now();
    let disks: Vec<String> = parts.iter().flat_map(|p| p.disks.clone()).collect();
    // A failed flush skips the cut (the guests are still thawed).
    let asked = Instant::now();
    let who = parts.first().map_or("", |p| p.vm.as_str());
    let sealed = flush.flush().and_then(|()| {
        crate::util::phase::done("flush", who, asked);
        // Bitmap-only disks are sealed too: this cycle ships all their
        // changes at once.
        for d in &disks {
            tracker.enforce_log_limit(d);
        }
        tracker.seal(&CutSelect {
            disks: Some(disks.clone()),
            ..Default::default()
        })
    });
    // Thaw whenever freeze was started, also when it failed (part of the
    // guest may be frozen) or the cut failed.
    for (p, app) in parts.iter().zip(apps.iter_mut()) {
        if let Some(h) = &p.hook {
            app.frozen_ms = Some(frozen_at.elapsed().as_secs_f64() * 1e3);
            if let Err(e) = app_hook::run(h, "thaw", &p.vm) {
                tracing::error!(vm = %p.vm, "{e}: the guest may still be frozen");
                app.error.get_or_insert(e.to_string());
            }
        }
    }
    let sealed = sealed?;
    if !partial_ok && !sealed.skipped.is_empty() {
        for sc in sealed.cycles {
            tracker.finish(sc, false)?;
        }
        return Ok((sealed.skipped, apps));
    }
    if let Some(note) = note {
        if let Err(e) = tracker.note_cut(sealed.cycle, note) {
            for sc in sealed.cycles {
                tracker.finish(sc, false)?;
            }
            return Err(e);
        }
    }
    let mut out = sealed.skipped;
    for mut sc in sealed.cycles {
        let part = parts
            .iter()
            .position(|p| p.disks.contains(&sc.header.disk_name));
        sc.header.app_consistent = part.is_some_and(|i| apps[i].frozen);
        out.push(tracker.write_log(sc));
    }
    Ok((out, apps))
}

impl Replicator {
    /// The members of `group` protected here, by name.
    fn members(&self, group: &str) -> Vec<Arc<Vm>> {
        let mut v: Vec<Arc<Vm>> = self
            .vms
            .lock()
            .values()
            .filter(|v| v.spec.group.as_deref() == Some(group))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spec.vm.cmp(&b.spec.vm));
        v
    }

    /// Start `group`'s coordinator unless it runs.
    pub(super) fn join_group(self: &Arc<Self>, group: &str) {
        let mut groups = self.groups.lock();
        if groups.contains_key(group) {
            return;
        }
        let ctl = Arc::new(GroupCtl::default());
        groups.insert(group.to_string(), ctl.clone());
        let me = self.clone();
        let name = group.to_string();
        self.rt.spawn(async move { me.coordinate(name, ctl).await });
    }

    /// A member's `vdrep sync`: cut the group now.
    pub(super) fn group_sync(&self, group: &str) {
        if let Some(g) = self.groups.lock().get(group) {
            g.sync.store(true, SeqCst);
            g.wake.notify_one();
        }
    }

    /// Why `members` cannot be cut together now (`None`: they can).
    fn group_blocked(members: &[Arc<Vm>]) -> Option<String> {
        // A member protected back after a planned failover names the
        // others: until they are protected here too, none is cut.
        for m in members {
            if let Some(missing) = m
                .spec
                .group_members
                .iter()
                .find(|w| !members.iter().any(|h| &h.spec.vm == *w))
            {
                return Some(format!(
                    "no group point: VM {missing} of the group is not protected here yet ({} names it); the group is cut once it is",
                    m.spec.vm
                ));
            }
        }
        for m in members {
            if m.steady.load(SeqCst) {
                continue;
            }
            let s = m.status.lock();
            let why = match s.state {
                VmState::InitialReplication => "is in its initial copy".to_string(),
                VmState::ResyncRequired | VmState::Resynchronizing => {
                    "is being resynchronized".to_string()
                }
                VmState::Critical => {
                    format!("is Critical ({})", s.last_error.clone().unwrap_or_default())
                }
                VmState::Warning => format!(
                    "is not connected ({})",
                    s.last_error.clone().unwrap_or_default()
                ),
                VmState::Normal => "is busy (a resync or verify job, or reconnecting)".into(),
            };
            return Some(format!(
                "no group point: VM {} {why}; the group is cut again when it is back",
                m.spec.vm
            ));
        }
        None
    }

    /// The group's coordinator: cut every member at one instant on the
    /// group's schedule; ends when the group has no member left.
    async fn coordinate(self: Arc<Self>, group: String, ctl: Arc<GroupCtl>) {
        let mut next_cut = Instant::now();
        loop {
            let members = self.members(&group);
            if members.is_empty() {
                self.groups.lock().remove(&group);
                return;
            }
            let every = members.iter().map(|m| m.spec.every_secs).min().unwrap_or(0);
            let blocked = Self::group_blocked(&members);
            for m in &members {
                m.status.lock().group_waiting = blocked.clone();
            }
            let sync = ctl.sync.load(SeqCst);
            let due = if blocked.is_some() {
                false
            } else if sync {
                true
            } else if every > 0 {
                Instant::now() >= next_cut
            } else {
                // Continuous: once the previous cut is shipped, as soon as
                // a member has new writes.
                let disks: Vec<String> =
                    members.iter().flat_map(|m| m.spec.disks.clone()).collect();
                members.iter().all(|m| !m.logs_ready.load(SeqCst))
                    && disks
                        .iter()
                        .all(|d| self.tracker.pending_cycles(d).is_empty())
                    && self.tracker.dirty_blocks_of(&disks) > 0
            };
            if !due {
                let wait = if every > 0 && blocked.is_none() && !sync {
                    next_cut.saturating_duration_since(Instant::now())
                } else {
                    GROUP_POLL
                };
                let _ = tokio::time::timeout(wait.min(GROUP_POLL), ctl.wake.notified()).await;
                continue;
            }
            ctl.sync.store(false, SeqCst);
            let started = Instant::now();
            match self.cut_group(&group, &members).await {
                Ok(cycle) => tracing::debug!(%group, cycle, "group cut"),
                Err(e) => {
                    tracing::warn!(%group, "group cut failed: {e}; tried again shortly");
                    for m in &members {
                        m.status.lock().group_waiting = Some(format!("no group point: {e}"));
                    }
                    if sync {
                        ctl.sync.store(true, SeqCst);
                    }
                    tokio::time::sleep(GROUP_POLL).await;
                    continue;
                }
            }
            if every > 0 {
                next_cut = (started + Duration::from_secs(every)).max(next_cut);
            }
        }
    }

    /// One cut of every disk of every member; each member gets its
    /// cycle's group and is woken to ship it.
    async fn cut_group(&self, group: &str, members: &[Arc<Vm>]) -> Result<u64, SendError> {
        let mut parts = Vec::new();
        for m in members {
            parts.push(CutPart {
                vm: m.spec.vm.clone(),
                hook: m.app_hook_due(),
                disks: m.spec.disks.clone(),
            });
        }
        let pg = wire::PointGroup {
            name: group.to_string(),
            origin: self.origin.clone(),
            members: members.iter().map(|m| m.spec.vm.clone()).collect(),
        };
        let note = serde_json::to_vec(&pg).map_err(|e| retry(e.to_string()))?;
        let tracker = self.tracker.clone();
        let flush = self.flush.clone();
        let (entries, apps) = tokio::task::spawn_blocking(move || {
            let cut = freeze_seal_thaw(&tracker, &flush, &parts, false, Some(&note));
            if let Ok((entries, _)) = &cut {
                if let Some(e) = entries.first().filter(|e| e.log.is_some()) {
                    // Test hook: a worker killed between a group cut and
                    // its shipping.
                    crate::tracking::hold_for_test("hold-ship", "held-ship", &e.cycle.to_string());
                }
            }
            cut
        })
        .await
        .map_err(|e| retry(format!("group cut task failed: {e}")))?
        .map_err(retry)?;
        for (m, app) in members.iter().zip(&apps) {
            m.note_app_cut(app);
        }
        if let Some(e) = entries.iter().find(|e| e.log.is_none()) {
            return Err(retry(format!(
                "{}: {}",
                e.disk,
                e.error.clone().unwrap_or_default()
            )));
        }
        let Some(cycle) = entries.first().map(|e| e.cycle) else {
            return Err(retry("the group has no disk to cut"));
        };
        for m in members {
            m.group_cycles.lock().insert(cycle, pg.clone());
            m.logs_ready.store(true, SeqCst);
            m.status.lock().group_waiting = None;
            m.wake.notify_one();
        }
        Ok(cycle)
    }
}

/// This mount's cycle-numbering identity: made once (random) and kept in
/// its state folder, so a group point's halves shipped before and after a
/// restart still match.
pub(super) fn mount_origin(tracker: &Tracker) -> String {
    let path = tracker.state_file(super::PROTECT_DIR).join("origin");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if wire::safe_component(s).is_ok() {
            return s.to_string();
        }
    }
    let id = crate::util::hex(&crate::util::random_id());
    let tmp = path.with_extension("tmp");
    let saved = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, &id))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = saved {
        tracing::warn!(
            "cannot keep the mount's group origin in {}: {e}; group points cut before a restart will not match those after it",
            path.display()
        );
    }
    id
}

/// A member's cycles cut for its group, not yet known committed.
pub(super) type GroupCycles = BTreeMap<u64, wire::PointGroup>;

/// The group cuts of `vm` (a member of `group`) whose logs wait on disk,
/// from their durable notes: after a restart they still ship as halves of
/// their group points.
pub(super) fn sealed_group_cycles(tracker: &Tracker, group: &str, vm: &str) -> GroupCycles {
    let mut out = GroupCycles::new();
    for (cycle, note) in tracker.cut_notes() {
        match serde_json::from_slice::<wire::PointGroup>(&note) {
            Ok(pg) if pg.name == group && pg.members.iter().any(|m| m == vm) => {
                out.insert(cycle, pg);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                %vm,
                "the group record of sealed cycle {cycle} cannot be read ({e}): that cycle's point is not a group point"
            ),
        }
    }
    out
}

/// The running coordinators, by group.
pub(super) type Groups = HashMap<String, Arc<GroupCtl>>;
