//! Alerts and events of the protected VMs.
//!
//! - The **RPO alert** (`rpo_alert` in the configuration, `protect
//!   --rpo-alert`): when a VM's lag (the age of its newest recovery point)
//!   passes the threshold while changes are waiting to be shipped, the VM
//!   shows as `Warning` with the typed reason [`Alert::RpoExceeded`]
//!   ("RPO exceeded"); it clears as soon as the lag is back under. A VM
//!   with nothing pending is up to date whatever the age of its last point
//!   (a continuous VM on an idle disk takes no cuts), so it never alerts.
//!   The alert is derived where the status is made (`apply`): the
//!   worker's own state is left alone, so its retry schedule is unchanged.
//! - **Error accounting** ([`Health::errors`]): failed sessions counted by
//!   [`ErrorKind`] (the metrics' `vdrep_vm_errors_total{kind}`).
//! - **Events**: a watcher task (`watch`) looks at every VM's status
//!   once a second and emits on [`crate::events::Bus`] what changed:
//!   protection started/stopped, state changes with their reason, alerts
//!   raised/cleared, points committed, resyncs started/finished.

use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::overload::Rates;
use super::{ErrorKind, Replicator, VmState, VmStatus};
use crate::events::{Bus, EventKind};

/// How often the watcher looks at the VMs.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A condition that puts a running VM in `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alert {
    /// The lag passed the VM's `rpo_alert` with changes waiting.
    RpoExceeded,
    /// The VM's disks are written faster than its link sends the changes
    /// and the sender never caught up over the last seconds
    /// ([`super::overload`]; the rates are in [`Health::rates`]). Takes
    /// precedence over [`Alert::RpoExceeded`]: it says why.
    LinkOverloaded,
}

impl Alert {
    /// The alert's kind, as events and metrics name it.
    pub fn name(self) -> &'static str {
        match self {
            Alert::RpoExceeded => "rpo_exceeded",
            Alert::LinkOverloaded => "link_overloaded",
        }
    }

    /// The reason shown to people.
    pub fn reason(self) -> &'static str {
        match self {
            Alert::RpoExceeded => "RPO exceeded",
            Alert::LinkOverloaded => "changes arrive faster than the link sends them",
        }
    }
}

impl Alert {
    /// Every alert, in label order (metrics).
    pub const ALL: [Alert; 2] = [Alert::RpoExceeded, Alert::LinkOverloaded];
}

impl std::fmt::Display for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// A VM's alerting and error accounting (part of [`VmStatus`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The RPO alert threshold, seconds (none: no alert).
    #[serde(default)]
    pub rpo_alert_secs: Option<u64>,
    /// The alert raised now.
    #[serde(default)]
    pub alert: Option<Alert>,
    /// Failed sessions since protection started, by error kind
    /// ([`kind_label`]).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// The VM's write and send rates over the last seconds (none until
    /// the window spans a few seconds).
    #[serde(default)]
    pub rates: Option<Rates>,
    /// Why the VM is not `Normal`, in words ([`reason`]).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Health {
    /// Count one failed session.
    pub(super) fn count_error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind_label(kind).to_string()).or_default() += 1;
    }
}

/// The label of an error kind (metrics, `status --json`).
pub fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Retry => "retry",
        ErrorKind::ResyncRequired => "resync_required",
        ErrorKind::Fatal => "fatal",
        ErrorKind::Invalid => "invalid",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::TimedOut => "timed_out",
    }
}

/// A VM that sent less than this (bytes/s) over the rates' window is not
/// using its link (a receiver that does not answer): not `link_overloaded`.
pub const SENDING_MIN_BPS: f64 = 8_000.0;

/// Raise or clear the alerts of `s` (its lag, pending bytes and rates are
/// current): the RPO alert against `rpo_alert_secs` (0: none), the link
/// overload from [`Health::rates`]. A `Normal` VM with an alert raised
/// shows as `Warning`; [`Health::reason`] says why.
pub(super) fn apply(s: &mut VmStatus, rpo_alert_secs: u64) {
    s.health.rpo_alert_secs = (rpo_alert_secs > 0).then_some(rpo_alert_secs);
    let exceeded = rpo_alert_secs > 0
        && s.bytes_pending > 0
        && s.lag_secs.is_some_and(|l| l > rpo_alert_secs as f64);
    // Only a VM that is sending: one that cannot reach its receiver is
    // `Warning` for that reason (its churn outruns a link that sends
    // nothing, but the link is not the cause). Before the worker notices
    // a lost receiver (up to its 5 s idle timeout) only keep-alives and
    // probes leave: measured 0.4 kB/s in metrics_e2e.
    let overloaded = s.state == VmState::Normal
        && s.last_error.is_none()
        && s.health
            .rates
            .is_some_and(|r| r.sent_bps >= SENDING_MIN_BPS && r.overloaded());
    s.health.alert = if overloaded {
        Some(Alert::LinkOverloaded)
    } else {
        exceeded.then_some(Alert::RpoExceeded)
    };
    if s.health.alert.is_some() && s.state == VmState::Normal {
        s.state = VmState::Warning;
    }
    s.health.reason = reason(s);
}

/// What alert `a` of `s` says, with its figures where it has some.
pub fn alert_reason(s: &VmStatus, a: Alert) -> String {
    match (a, s.health.rates) {
        (Alert::LinkOverloaded, Some(r)) => r.describe(),
        _ => a.reason().to_string(),
    }
}

/// Why `s` is not `Normal`, in words (none if it is).
pub fn reason(s: &VmStatus) -> Option<String> {
    if s.state == VmState::Normal {
        return None;
    }
    match (&s.last_error, s.health.alert) {
        (Some(e), _) => Some(e.clone()),
        (None, Some(a)) => Some(alert_reason(s, a)),
        (None, None) => None,
    }
}

/// What the watcher remembers of a VM between two looks.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    state: VmState,
    alert: Option<Alert>,
    last_point: Option<u64>,
    /// `(mode, disk)` of the running resync or verify.
    resync: Option<(String, String)>,
}

impl Seen {
    /// A VM just protected: what `Replicator::start` sets.
    fn fresh() -> Self {
        Seen {
            state: VmState::InitialReplication,
            alert: None,
            last_point: None,
            resync: None,
        }
    }
}

/// Emit on `bus` what changed between `seen` and `now`, and remember `now`.
fn diff(bus: &Bus, seen: &mut HashMap<String, Seen>, now: &[VmStatus]) {
    for s in now {
        let vm = Some(s.vm.as_str());
        let prev = match seen.get(&s.vm) {
            Some(p) => p.clone(),
            None => {
                bus.emit(vm, EventKind::ProtectionStarted { to: s.to.clone() });
                Seen::fresh()
            }
        };
        if prev.state != s.state {
            bus.emit(
                vm,
                EventKind::StateChanged {
                    from: format!("{:?}", prev.state),
                    to: format!("{:?}", s.state),
                    reason: reason(s),
                },
            );
        }
        if let (Some(cycle), true) = (s.last_point, s.last_point > prev.last_point) {
            bus.emit(
                vm,
                EventKind::PointCommitted {
                    cycle,
                    app_consistent: s.last_app_point == Some(cycle),
                    point_unix_ns: s.last_point_unix_ns.unwrap_or_default(),
                },
            );
        }
        if prev.alert != s.health.alert {
            let threshold_secs = s.health.rpo_alert_secs.unwrap_or_default() as f64;
            let lag_secs = s.lag_secs.unwrap_or_default();
            if let Some(a) = prev.alert {
                bus.emit(
                    vm,
                    EventKind::AlertCleared {
                        alert: a.name().into(),
                        reason: a.reason().into(),
                        lag_secs,
                        threshold_secs,
                    },
                );
            }
            if let Some(a) = s.health.alert {
                bus.emit(
                    vm,
                    EventKind::AlertRaised {
                        alert: a.name().into(),
                        reason: alert_reason(s, a),
                        lag_secs,
                        threshold_secs,
                    },
                );
            }
        }
        let resync = s.resync.as_ref().map(|r| (r.mode.clone(), r.disk.clone()));
        if prev.resync != resync {
            if let Some((mode, disk)) = prev.resync {
                let blocks_differ = s
                    .last_resync
                    .as_ref()
                    .filter(|l| l.disk == disk && l.mode == mode)
                    .map_or(0, |l| l.blocks_differ);
                bus.emit(
                    vm,
                    EventKind::ResyncFinished {
                        mode,
                        disk,
                        blocks_differ,
                    },
                );
            }
            if let Some((mode, disk)) = resync.clone() {
                bus.emit(vm, EventKind::ResyncStarted { mode, disk });
            }
        }
        seen.insert(
            s.vm.clone(),
            Seen {
                state: s.state,
                alert: s.health.alert,
                last_point: s.last_point.max(prev.last_point),
                resync,
            },
        );
    }
    let gone: Vec<String> = seen
        .keys()
        .filter(|vm| !now.iter().any(|s| &s.vm == *vm))
        .cloned()
        .collect();
    for vm in gone {
        seen.remove(&vm);
        bus.emit(Some(&vm), EventKind::ProtectionStopped);
    }
}

/// The watcher task: every [`WATCH_EVERY`], the events of what changed,
/// until the replicator is gone.
pub(super) async fn watch(rep: Weak<Replicator>) {
    let mut seen = HashMap::new();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        // `status` stats every disk and lists its logs: off the async
        // threads, which drive every VM's connection (with 256 VMs it
        // held one of the two for milliseconds every second).
        let w = rep.clone();
        let now = tokio::task::spawn_blocking(move || {
            w.upgrade().map(|r| (r.status(), r.events.clone()))
        })
        .await;
        let Ok(Some((now, events))) = now else { return };
        diff(&events, &mut seen, &now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    fn status(state: VmState, lag: Option<f64>, pending: u64) -> VmStatus {
        let mut s: VmStatus = serde_json::from_value(serde_json::json!({
            "vm": "web1", "to": "b:7700", "state": "Normal", "disks": ["a.img"],
            "last_point": null, "last_point_unix_ns": null, "lag_secs": null,
            "bytes_pending": 0, "initial_done": 0, "initial_total": 0,
            "throughput_bps": 0.0, "bytes_sent": 0, "last_error": null,
            "next_retry_unix": null, "every_secs": 1
        }))
        .unwrap();
        s.state = state;
        s.lag_secs = lag;
        s.bytes_pending = pending;
        s
    }

    fn kinds(evs: &[Event]) -> Vec<&'static str> {
        evs.iter().map(|e| e.kind.name()).collect()
    }

    #[test]
    fn rpo_alert_turns_normal_into_warning_only_with_changes_waiting() {
        let mut s = status(VmState::Normal, Some(61.0), 4096);
        apply(&mut s, 60);
        assert_eq!(s.state, VmState::Warning);
        assert_eq!(s.health.alert, Some(Alert::RpoExceeded));
        assert_eq!(reason(&s).as_deref(), Some("RPO exceeded"));
        // Under the threshold, nothing pending, or no threshold: no alert.
        for (lag, pending, thr) in [(59.0, 4096, 60), (61.0, 0, 60), (1e6, 4096, 0)] {
            let mut s = status(VmState::Normal, Some(lag), pending);
            apply(&mut s, thr);
            assert_eq!((s.state, s.health.alert), (VmState::Normal, None));
        }
        // A worker's Warning keeps its own reason; the alert is raised too.
        let mut s = status(VmState::Warning, Some(61.0), 1);
        s.last_error = Some("connection lost".into());
        apply(&mut s, 60);
        assert_eq!(s.health.alert, Some(Alert::RpoExceeded));
        assert_eq!(reason(&s).as_deref(), Some("connection lost"));
    }

    #[test]
    fn link_overload_says_why_and_yields_to_an_outage() {
        let rates = Rates {
            churn_bps: 2.6e6,
            sent_bps: 1.2e6,
            pending_bytes: 12_900_000,
            never_caught_up: true,
            min_pending_bytes: 8_000_000,
            looks: 4,
            span_secs: 3.0,
        };
        let mut s = status(VmState::Normal, Some(61.0), 12_900_000);
        s.health.rates = Some(rates);
        apply(&mut s, 60);
        assert_eq!(s.state, VmState::Warning);
        assert_eq!(s.health.alert, Some(Alert::LinkOverloaded));
        assert_eq!(
            s.health.reason.as_deref(),
            Some("changes arrive faster than the link sends them: 2.6 MB/s of churn, 1.2 MB/s sent, 12.9 MB waiting")
        );
        // The receiver is unreachable: nothing is sent, the worker's own
        // reason stands and the RPO alert is the one raised.
        let mut s = status(VmState::Warning, Some(61.0), 12_900_000);
        s.last_error = Some("connection lost".into());
        s.health.rates = Some(Rates {
            sent_bps: 400.0,
            ..rates
        });
        apply(&mut s, 60);
        assert_eq!(s.health.alert, Some(Alert::RpoExceeded));
        assert_eq!(s.health.reason.as_deref(), Some("connection lost"));
    }

    #[test]
    fn the_watcher_emits_what_changed() {
        let bus = Bus::default();
        let mut seen = HashMap::new();
        let mut s = status(VmState::Normal, Some(0.5), 0);
        s.last_point = Some(7);
        s.last_point_unix_ns = Some(1);
        diff(&bus, &mut seen, std::slice::from_ref(&s));
        assert_eq!(
            kinds(&bus.recent()),
            ["protection_started", "state_changed", "point_committed"]
        );
        // Nothing changed: nothing emitted.
        diff(&bus, &mut seen, std::slice::from_ref(&s));
        assert_eq!(bus.recent().len(), 3);
        // The lag passes the threshold: Warning + alert.
        s.lag_secs = Some(5.0);
        s.bytes_pending = 1;
        apply(&mut s, 2);
        diff(&bus, &mut seen, std::slice::from_ref(&s));
        let evs = bus.since(3, Duration::ZERO).events;
        assert_eq!(kinds(&evs), ["state_changed", "alert_raised"]);
        match &evs[0].kind {
            EventKind::StateChanged { from, to, reason } => {
                assert_eq!((from.as_str(), to.as_str()), ("Normal", "Warning"));
                assert_eq!(reason.as_deref(), Some("RPO exceeded"));
            }
            k => panic!("{k:?}"),
        }
        // A new point: back under, cleared.
        s.state = VmState::Normal;
        s.last_point = Some(8);
        s.lag_secs = Some(0.2);
        apply(&mut s, 2);
        diff(&bus, &mut seen, std::slice::from_ref(&s));
        let evs = bus.since(5, Duration::ZERO).events;
        assert_eq!(
            kinds(&evs),
            ["state_changed", "point_committed", "alert_cleared"]
        );
        // Unprotected.
        diff(&bus, &mut seen, &[]);
        assert_eq!(
            bus.recent().last().map(|e| e.kind.name()),
            Some("protection_stopped")
        );
    }
}
