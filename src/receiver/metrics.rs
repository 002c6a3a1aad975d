//! The receiver's metrics endpoint (`[receiver] metrics_listen`): recovery
//! points per VM, read at scrape time from each VM's points summary
//! ([`ReplicaStore::points_summary`]: not every point), the store's size,
//! from a background walk ([`StoreSize`]), and the connection and
//! apply-latency counters of [`crate::metrics::receiver`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::store_size::{StoreSize, WALK_EVERY, WALK_EVERY_ENV};
use super::ReceiverError;
use crate::metrics::{gauge, Labels, Registry, Unit};
use crate::replica::ReplicaStore;

/// Start serving the receiver's metrics on `addr`.
pub(super) fn serve(
    addr: SocketAddr,
    store: Arc<dyn ReplicaStore>,
    dir: &Path,
) -> Result<(), ReceiverError> {
    let mut registry = Registry::default();
    let dir = dir.to_path_buf();
    let every = std::env::var(WALK_EVERY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(WALK_EVERY, Duration::from_millis);
    let size = StoreSize::start(dir.clone(), every).map_err(|source| ReceiverError::Start {
        what: "store size thread (metrics_listen)",
        source,
    })?;
    crate::metrics::register(&mut registry, move |enc| {
        let mut points: Vec<(Labels, u64)> = Vec::new();
        let mut newest: Vec<(Labels, f64)> = Vec::new();
        let mut pending: Vec<(Labels, u64)> = Vec::new();
        let mut newest_applied: Vec<(Labels, f64)> = Vec::new();
        let (mut boot_ok, mut boot_at, mut boot_secs) = (Vec::new(), Vec::new(), Vec::new());
        for (site, vm) in store.vms() {
            let labels = vec![("site", site.clone()), ("vm", vm.clone())];
            if let Some(c) = crate::replica::boot::last_boot_check(&dir, &site, &vm) {
                boot_ok.push((labels.clone(), u64::from(c.verified)));
                boot_at.push((labels.clone(), c.at_unix_ns as f64 / 1e9));
                boot_secs.push((labels.clone(), c.secs));
            }
            let Ok(p) = store.points_summary(&site, &vm) else {
                continue;
            };
            if let Some(t) = p.newest_time_ns() {
                newest.push((labels.clone(), t as f64 / 1e9));
            }
            // Committed on durable logs, not applied yet (commit before
            // apply).
            let applied = p.applied(|hex| {
                let id = crate::replica::parse_hex_id(hex)?;
                let d = crate::replica::DiskRef {
                    site: &site,
                    vm: &vm,
                    disk_id: &id,
                };
                store.replica_state(d).ok()?.cycle
            });
            pending.push((labels.clone(), applied.pending as u64));
            if let Some(t) = applied.newest_time_ns {
                newest_applied.push((labels.clone(), t as f64 / 1e9));
            }
            points.push((labels, p.len() as u64));
        }
        gauge(
            enc,
            "vdrep_receiver_points",
            "Recovery points kept, per sending site and VM",
            None,
            points,
        )?;
        gauge(
            enc,
            "vdrep_receiver_last_point_timestamp",
            "Cut time of the newest recovery point, Unix seconds",
            Some(&Unit::Seconds),
            newest,
        )?;
        gauge(
            enc,
            "vdrep_receiver_points_pending_apply",
            "Recovery points committed on change logs durable here that are not applied to every replica yet (a failover to one applies them first)",
            None,
            pending,
        )?;
        gauge(
            enc,
            "vdrep_receiver_last_applied_point_timestamp",
            "Cut time of the newest recovery point every replica file holds, Unix seconds (behind vdrep_receiver_last_point_timestamp_seconds while logs are applied; a gap that grows: an apply keeps failing)",
            Some(&Unit::Seconds),
            newest_applied,
        )?;
        gauge(
            enc,
            "vdrep_receiver_boot_verified",
            "1 if the newest boot check (verify --boot, verify_boot) of the VM became ready, 0 if it failed",
            None,
            boot_ok,
        )?;
        gauge(
            enc,
            "vdrep_receiver_boot_check_timestamp",
            "When the newest boot check of the VM ran, Unix seconds",
            Some(&Unit::Seconds),
            boot_at,
        )?;
        gauge(
            enc,
            "vdrep_receiver_boot_ready",
            "Seconds from the newest boot check's test failover to ready (or to its failure)",
            Some(&Unit::Seconds),
            boot_secs,
        )?;
        // Walked in the background: none until the first walk ends.
        let measured = size.last();
        gauge(
            enc,
            "vdrep_receiver_store",
            "Bytes the store folder takes on disk (replicas, history, logs)",
            Some(&Unit::Bytes),
            measured.map(|m| (Labels::new(), m.bytes)),
        )?;
        gauge(
            enc,
            "vdrep_receiver_store_measured_timestamp",
            "When vdrep_receiver_store_bytes was measured (the walk of the store folder began), Unix seconds; the store is walked in the background every minute, or every 10 times the last walk's length if longer",
            Some(&Unit::Seconds),
            measured.map(|m| {
                let at = m
                    .at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                (Labels::new(), at)
            }),
        )?;
        gauge(
            enc,
            "vdrep_receiver_store_free",
            "Bytes free on the store's file system",
            Some(&Unit::Bytes),
            [(Labels::new(), store.free_bytes())],
        )?;
        crate::metrics::receiver::encode(enc)
    });
    let srv = crate::metrics::serve(addr, registry, "vdrep-recv-metrics").map_err(|source| {
        ReceiverError::Start {
            what: "metrics endpoint (metrics_listen)",
            source,
        }
    })?;
    tracing::info!("metrics on http://{}/metrics", srv.addr);
    Ok(())
}
