//! State-change events of a daemon, as `drbdsetup events2` gives DRBD's:
//! protection started/stopped, a VM's state changing (Warning, Critical
//! and back, with the reason), recovery points committed, alerts raised
//! and cleared (RPO exceeded), resyncs started and finished, and the
//! failover steps the mount daemon takes (fence, release, failback, commit).
//!
//! This module owns the [`Event`] type (its JSON is what `vdrep events
//! --json` prints and what `notify_command` reads on stdin) and the
//! in-daemon broadcast, [`Bus`]: a bounded ring of recent events that
//! readers poll with [`Bus::since`] (blocking until something newer
//! arrives, so the control socket can serve `vdrep events --follow` as a
//! long poll), plus an optional bounded hand-off to the notifier
//! ([`notify`]). Emitting never blocks on a reader or on the notifier.
//!
//! Producers (the sender's watcher) describe states as strings; this
//! module imports nothing of the crate but [`crate::util`].

pub mod notify;

use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

/// The longest a reader's poll waits at a daemon ([`Bus::since`] over a
/// control socket): short enough that a stopping daemon is not held up by
/// it (it closes the bus, which ends every wait at once anyway).
pub const MAX_WAIT_SECS: u64 = 10;

/// Events a [`Bus`] keeps for late readers (`vdrep events` without
/// `--follow`).
pub const RING: usize = 1024;

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 within one daemon run.
    pub seq: u64,
    /// When it happened, ns since the Unix epoch.
    pub unix_ns: u64,
    /// The VM it is about (none: the daemon itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A VM is protected (by `vdrep protect`, the configuration, or at
    /// start-up for VMs protected before).
    ProtectionStarted { to: String },
    /// A VM is no longer protected.
    ProtectionStopped,
    /// The VM's state changed (`Normal`, `Warning`, `Critical`, ...);
    /// `reason` says why it is not `Normal`.
    StateChanged {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The receiver committed a new recovery point (the newest, if several
    /// were committed since the last event).
    PointCommitted {
        cycle: u64,
        app_consistent: bool,
        /// The cut's time, ns since the Unix epoch.
        point_unix_ns: u64,
    },
    /// An alert started: `alert` is its kind (`rpo_exceeded`), `reason`
    /// its words (`RPO exceeded`).
    AlertRaised {
        alert: String,
        reason: String,
        lag_secs: f64,
        threshold_secs: f64,
    },
    /// The alert is over.
    AlertCleared {
        alert: String,
        reason: String,
        lag_secs: f64,
        threshold_secs: f64,
    },
    /// A checksum resync (`mode` resync) or an online verify (`verify`)
    /// of a disk started.
    ResyncStarted { mode: String, disk: String },
    /// It finished (or was interrupted: the next session resumes it).
    ResyncFinished {
        mode: String,
        disk: String,
        blocks_differ: u64,
    },
    /// A failover step this daemon took: at the primary's mount with the
    /// disks it concerned, at the receiver with the sending site of the VM.
    FailoverStep {
        step: FailoverStep,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        disks: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        site: Option<String>,
    },
    /// Receiver: a full copy of a disk ended recovery points of the VM
    /// (every point that includes the disk): its replica was lost from the
    /// store, or the disk had to be copied whole again. `reason` says which.
    PointsDropped {
        site: String,
        disk: String,
        cycles: Vec<u64>,
        reason: String,
    },
    /// Receiver: a change log of the VM could not be applied to its
    /// replica (a full store, a log damaged at rest, an I/O error). Once
    /// per disk and cycle, not per retry; `retryable`: the sender sends it
    /// again by itself. Its point, if committed, stays unreadable until
    /// the apply succeeds.
    ApplyFailed {
        site: String,
        disk: String,
        cycle: u64,
        error: String,
        retryable: bool,
    },
    /// The receiver's scheduled boot verification (`verify_boot`) booted a
    /// recovery point: it became ready (`verified`) after `secs`, or not
    /// (`detail` says why, with the console's tail).
    BootVerified {
        site: String,
        cycle: u64,
        verified: bool,
        secs: f64,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
}

/// The failover steps a mount daemon or a receiver takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverStep {
    /// Mount: planned failover: the VM's disks are fenced (writes
    /// refused) for the last sync.
    Fenced,
    /// Mount: the fence is lifted (the failover was cancelled or is done).
    Unfenced,
    /// Mount: planned failover of one VM of a shared folder: its disks
    /// moved out.
    Released,
    /// Mount: failback: disks taken into the running mount.
    Taken,
    /// A failover was committed (mount: the disks' pre-images are
    /// dropped; receiver: the history before it is let go).
    Committed,
    /// Receiver: a test failover exposes a point.
    TestStarted,
    /// Receiver: the test failover is removed.
    TestCleanedUp,
    /// Receiver: the VM is promoted to a point (failover).
    Promoted,
    /// Receiver: an uncommitted failover is cancelled.
    Cancelled,
    /// Receiver: a VM's disks are adopted (reverse replication, failback).
    Adopted,
    /// Receiver: a VM's replica and history were deleted (`vdrep forget`).
    Forgotten,
}

impl FailoverStep {
    pub fn name(self) -> &'static str {
        match self {
            FailoverStep::Fenced => "fenced",
            FailoverStep::Unfenced => "unfenced",
            FailoverStep::Released => "released",
            FailoverStep::Taken => "taken",
            FailoverStep::Committed => "committed",
            FailoverStep::TestStarted => "test_started",
            FailoverStep::TestCleanedUp => "test_cleaned_up",
            FailoverStep::Forgotten => "forgotten",
            FailoverStep::Promoted => "promoted",
            FailoverStep::Cancelled => "cancelled",
            FailoverStep::Adopted => "adopted",
        }
    }
}

impl EventKind {
    /// The `event` tag (`state_changed`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::ProtectionStarted { .. } => "protection_started",
            EventKind::ProtectionStopped => "protection_stopped",
            EventKind::StateChanged { .. } => "state_changed",
            EventKind::PointCommitted { .. } => "point_committed",
            EventKind::AlertRaised { .. } => "alert_raised",
            EventKind::AlertCleared { .. } => "alert_cleared",
            EventKind::ResyncStarted { .. } => "resync_started",
            EventKind::ResyncFinished { .. } => "resync_finished",
            EventKind::FailoverStep { .. } => "failover_step",
            EventKind::PointsDropped { .. } => "points_dropped",
            EventKind::ApplyFailed { .. } => "apply_failed",
            EventKind::BootVerified { .. } => "boot_verified",
        }
    }
}

impl Event {
    /// One line for people: `TIME EVENT vm:NAME key:value ...` (the
    /// shape of `drbdsetup events2`).
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} {}",
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_nanos(self.unix_ns)
            ),
            self.kind.name()
        );
        if let Some(vm) = &self.vm {
            s += &format!(" vm:{vm}");
        }
        match &self.kind {
            EventKind::ProtectionStarted { to } => s += &format!(" to:{to}"),
            EventKind::ProtectionStopped => {}
            EventKind::StateChanged { from, to, reason } => {
                s += &format!(" from:{from} to:{to}");
                if let Some(r) = reason {
                    s += &format!(" reason:{r:?}");
                }
            }
            EventKind::PointCommitted {
                cycle,
                app_consistent,
                ..
            } => {
                let c = if *app_consistent { "app" } else { "crash" };
                s += &format!(" cycle:{cycle} consistency:{c}");
            }
            EventKind::AlertRaised {
                alert,
                reason,
                lag_secs,
                threshold_secs,
            }
            | EventKind::AlertCleared {
                alert,
                reason,
                lag_secs,
                threshold_secs,
            } => {
                s += &format!(
                " alert:{alert} reason:{reason:?} lag:{lag_secs:.1}s threshold:{threshold_secs}s"
            )
            }
            EventKind::ResyncStarted { mode, disk } => s += &format!(" mode:{mode} disk:{disk}"),
            EventKind::ResyncFinished {
                mode,
                disk,
                blocks_differ,
            } => s += &format!(" mode:{mode} disk:{disk} blocks_differ:{blocks_differ}"),
            EventKind::FailoverStep { step, disks, site } => {
                s += &format!(" step:{}", step.name());
                if let Some(site) = site {
                    s += &format!(" site:{site}");
                }
                if !disks.is_empty() {
                    s += &format!(" disks:{}", disks.join(","));
                }
            }
            EventKind::PointsDropped {
                site,
                disk,
                cycles,
                reason,
            } => {
                let c: Vec<String> = cycles.iter().map(u64::to_string).collect();
                s += &format!(
                    " site:{site} disk:{disk} cycles:{} reason:{reason:?}",
                    c.join(",")
                );
            }
            EventKind::ApplyFailed {
                site,
                disk,
                cycle,
                error,
                retryable,
            } => {
                s += &format!(
                    " site:{site} disk:{disk} cycle:{cycle} retryable:{retryable} error:{error:?}"
                );
            }
            EventKind::BootVerified {
                site,
                cycle,
                verified,
                secs,
                detail,
            } => {
                s += &format!(" site:{site} cycle:{cycle} verified:{verified} secs:{secs:.1}");
                if !detail.is_empty() {
                    s += &format!(" detail:{:?}", detail.lines().next().unwrap_or_default());
                }
            }
        }
        s
    }
}

/// What [`Bus::since`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Since {
    /// Events newer than the reader's, oldest first.
    pub events: Vec<Event>,
    /// Events the reader will never see: they left the ring before it
    /// asked.
    pub missed: u64,
    /// The bus was closed (the daemon is stopping).
    pub closed: bool,
}

struct Ring {
    events: VecDeque<Event>,
    next_seq: u64,
    closed: bool,
}

/// The in-daemon broadcast of [`Event`]s.
pub struct Bus {
    ring: Mutex<Ring>,
    arrived: Condvar,
    /// The notifier's queue ([`notify::Notifier`]); a full queue drops.
    sink: Mutex<Option<SyncSender<Event>>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(RING),
                next_seq: 1,
                closed: false,
            }),
            arrived: Condvar::new(),
            sink: Mutex::new(None),
            dropped: 0.into(),
        }
    }
}

impl Bus {
    /// Record an event, wake the readers and hand it to the notifier
    /// (never waiting for it). Returns the event as recorded.
    pub fn emit(&self, vm: Option<&str>, kind: EventKind) -> Event {
        let ev = {
            let mut r = self.ring.lock();
            let ev = Event {
                seq: r.next_seq,
                unix_ns: crate::util::now_ns(),
                vm: vm.map(str::to_string),
                kind,
            };
            r.next_seq += 1;
            if r.events.len() == RING {
                r.events.pop_front();
            }
            r.events.push_back(ev.clone());
            ev
        };
        self.arrived.notify_all();
        tracing::info!(target: "vdrep::events", "{}", ev.line());
        if let Some(tx) = self.sink.lock().as_ref() {
            match tx.try_send(ev.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    let n = self
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    // Logged at the 1st, 2nd, 4th, 8th... drop: a slow
                    // command must not flood the log either.
                    if n.is_power_of_two() {
                        tracing::warn!(
                            "notify_command is too slow: event {} not delivered ({n} not delivered so far)",
                            ev.seq
                        );
                    }
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        ev
    }

    /// Hand every later event to `tx` too (the notifier).
    pub fn set_sink(&self, tx: SyncSender<Event>) {
        *self.sink.lock() = Some(tx);
    }

    /// Events the notifier could not take because its queue was full.
    pub fn notify_dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The events still in the ring, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.ring.lock().events.iter().cloned().collect()
    }

    /// The events after `after` (a `seq`; 0: all in the ring). If there
    /// are none, wait up to `wait` for one (or for [`Bus::close`]).
    pub fn since(&self, after: u64, wait: Duration) -> Since {
        let deadline = Instant::now() + wait;
        let mut r = self.ring.lock();
        loop {
            let newer: Vec<Event> = r.events.iter().filter(|e| e.seq > after).cloned().collect();
            if !newer.is_empty() || r.closed || Instant::now() >= deadline {
                let first = newer.first().map_or(r.next_seq, |e| e.seq);
                return Since {
                    missed: first.saturating_sub(after + 1),
                    events: newer,
                    closed: r.closed,
                };
            }
            let _ = self.arrived.wait_until(&mut r, deadline);
        }
    }

    /// Wake every waiting reader for good (the daemon is stopping).
    pub fn close(&self) {
        self.ring.lock().closed = true;
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn json_round_trip_and_line() {
        let bus = Bus::default();
        let ev = bus.emit(
            Some("web1"),
            EventKind::AlertRaised {
                alert: "rpo_exceeded".into(),
                reason: "RPO exceeded".into(),
                lag_secs: 75.25,
                threshold_secs: 60.0,
            },
        );
        let j = serde_json::to_string(&ev).unwrap();
        assert!(j.contains(r#""event":"alert_raised""#), "{j}");
        assert!(j.contains(r#""reason":"RPO exceeded""#), "{j}");
        let back: Event = serde_json::from_str(&j).unwrap();
        assert_eq!(back, ev);
        let l = ev.line();
        assert!(
            l.ends_with(r#"alert_raised vm:web1 alert:rpo_exceeded reason:"RPO exceeded" lag:75.2s threshold:60s"#)
                || l.ends_with(r#"alert_raised vm:web1 alert:rpo_exceeded reason:"RPO exceeded" lag:75.3s threshold:60s"#),
            "{l}"
        );
        let stopped = bus.emit(Some("web1"), EventKind::ProtectionStopped);
        let j = serde_json::to_string(&stopped).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&j).unwrap(), stopped);
    }

    #[test]
    fn since_waits_for_new_events_and_counts_missed_ones() {
        let bus = Arc::new(Bus::default());
        for _ in 0..RING + 5 {
            bus.emit(None, EventKind::ProtectionStopped);
        }
        let s = bus.since(0, Duration::ZERO);
        assert_eq!(s.events.len(), RING);
        assert_eq!(s.missed, 5);
        let last = s.events.last().unwrap().seq;
        // Nothing newer: waits, then returns empty.
        let t = Instant::now();
        let s = bus.since(last, Duration::from_millis(100));
        assert!(s.events.is_empty() && s.missed == 0);
        assert!(t.elapsed() >= Duration::from_millis(100));
        // A new event wakes a waiting reader.
        let b2 = bus.clone();
        let h = std::thread::spawn(move || b2.since(last, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        bus.emit(Some("a"), EventKind::ProtectionStopped);
        let s = h.join().unwrap();
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[0].seq, last + 1);
        // close wakes readers at once.
        let b3 = bus.clone();
        let h = std::thread::spawn(move || b3.since(last + 1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        bus.close();
        assert!(h.join().unwrap().closed);
    }

    #[test]
    fn a_full_notifier_queue_drops_instead_of_blocking() {
        let bus = Bus::default();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        bus.set_sink(tx);
        bus.emit(None, EventKind::ProtectionStopped);
        bus.emit(None, EventKind::ProtectionStopped);
        assert_eq!(bus.notify_dropped(), 1);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
    }
}
