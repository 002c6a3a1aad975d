//! The receiver's hot-path counters: connections open now, the time to
//! apply a change log to a replica, recovery points a full copy ended, and
//! the store's syncs (read from [`crate::util::durable::counts`]). Process-wide atomics (one receiver per
//! process); the store's own figures (points, bytes) are read at scrape
//! time by `receiver::metrics`.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, gauge, histogram, Histogram, Labels, Unit};

static ACTIVE: AtomicI64 = AtomicI64::new(0);
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static APPLY: Histogram = Histogram::latency();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static SESSIONS: AtomicI64 = AtomicI64::new(0);

/// Counts one connection as active while it lives.
#[must_use = "the connection counts as active while the guard lives"]
pub struct ConnGuard(());

/// A sender connected.
pub fn connection() -> ConnGuard {
    ACTIVE.fetch_add(1, Ordering::Relaxed);
    ACCEPTED.fetch_add(1, Ordering::Relaxed);
    ConnGuard(())
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one session of a multiplexed connection (`vdrep-mux/1`) as
/// active while it lives.
#[must_use = "the session counts as active while the guard lives"]
pub struct SessionGuard(());

/// A session began on a multiplexed connection.
pub fn session() -> SessionGuard {
    SESSIONS.fetch_add(1, Ordering::Relaxed);
    SessionGuard(())
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run `f` (applying one log) and record how long it took.
pub fn time_apply<T>(f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let r = f();
    APPLY.observe(t.elapsed());
    r
}

/// A full copy ended `n` recovery points (see `replica::PointsDropped`).
pub fn points_dropped(n: u64) {
    DROPPED.fetch_add(n, Ordering::Relaxed);
}

/// Encode the connection gauges and the apply-latency histogram.
pub fn encode(enc: &mut DescriptorEncoder) -> fmt::Result {
    gauge(
        enc,
        "vdrep_receiver_connections",
        "Sender connections open now",
        None,
        [(Labels::new(), ACTIVE.load(Ordering::Relaxed))],
    )?;
    gauge(
        enc,
        "vdrep_receiver_mux_sessions",
        "Sessions (one per VM) open now on multiplexed sender connections (vdrep-mux/1)",
        None,
        [(Labels::new(), SESSIONS.load(Ordering::Relaxed))],
    )?;
    counter(
        enc,
        "vdrep_receiver_connections_accepted",
        "Sender connections accepted since the receiver started",
        None,
        [(Labels::new(), ACCEPTED.load(Ordering::Relaxed))],
    )?;
    counter(
        enc,
        "vdrep_receiver_points_dropped",
        "Recovery points ended by a full copy of one of their disks (replica lost, or copied whole again) since the receiver started",
        None,
        [(Labels::new(), DROPPED.load(Ordering::Relaxed))],
    )?;
    let (passes, shared, alone) = crate::util::durable::counts();
    counter(
        enc,
        "vdrep_receiver_store_syncfs",
        "syncfs calls of the store's file system (store_sync auto or fs: one serves every disk syncing at the same time)",
        None,
        [(Labels::new(), passes)],
    )?;
    counter(
        enc,
        "vdrep_receiver_store_sync_shared",
        "Store syncs served by a shared syncfs (store_sync auto or fs); divided by vdrep_receiver_store_syncfs_total: disks per flush",
        None,
        [(Labels::new(), shared)],
    )?;
    counter(
        enc,
        "vdrep_receiver_store_sync_alone",
        "Store syncs done as an fsync of their own file because no other disk was syncing (store_sync auto)",
        None,
        [(Labels::new(), alone)],
    )?;
    histogram(
        enc,
        "vdrep_receiver_apply_duration",
        "Time to apply one change log to a replica (durable)",
        Some(&Unit::Seconds),
        [(Labels::new(), APPLY.snapshot())],
    )
}
