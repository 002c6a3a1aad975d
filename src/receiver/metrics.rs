//! The receiver's metrics endpoint (`[receiver] metrics_listen`): recovery
//! points per VM and the store's size, read at scrape time, with the
//! connection and apply-latency counters of [`crate::metrics::receiver`].

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
            let Ok(p) = store.points(&site, &vm) else {
                continue;
            };
            if let Some(t) = p.iter().map(|p| p.time_unix_ns).max() {
                newest.push((labels.clone(), t as f64 / 1e9));
            }
            // Committed on durable logs, not applied yet (commit before
            // apply).
            let flags = crate::replica::applied_flags(&p, |hex| {
                let id = crate::replica::parse_hex_id(hex)?;
                let d = crate::replica::DiskRef {
                    site: &site,
                    vm: &vm,
                    disk_id: &id,
                };
                store.replica_state(d).ok()?.cycle
            });
            let applied: Vec<&crate::replica::Point> = p
                .iter()
                .zip(flags)
                .filter_map(|(p, a)| a.then_some(p))
                .collect();
            pending.push((labels.clone(), (p.len() - applied.len()) as u64));
            if let Some(t) = applied.iter().map(|p| p.time_unix_ns).max() {
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
        gauge(
            enc,
            "vdrep_receiver_store",
            "Bytes the store folder takes on disk (replicas, history, logs)",
            Some(&Unit::Bytes),
            [(Labels::new(), allocated_bytes(&dir))],
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

/// Bytes allocated to the files under `dir` on its file system (sparse
/// replicas count what they use, not their size); unreadable entries and
/// other mounts are skipped.
fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(root) = dir.metadata() else {
        return 0;
    };
    let mut total = 0;
    let mut todo: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.dev() != root.dev() {
                // A mount under the store (a test failover's view): not
                // the store's bytes.
                continue;
            }
            if md.is_dir() {
                todo.push(e.path());
            } else {
                total += md.blocks() * 512;
            }
        }
    }
    total
}
