//! The mount daemon's metrics of its protected VMs and tracked disks, read
//! from [`Replicator::status`] and the tracker's status at scrape time
//! (the exposition itself is [`crate::metrics`]'s).

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;

use super::{alert, Replicator, VmState, VmStatus};
use crate::metrics::{counter, gauge, Labels, Registry, Unit};
use crate::tracking::TrackerStatus;

/// Every state, in label order.
const STATES: [VmState; 6] = [
    VmState::InitialReplication,
    VmState::Normal,
    VmState::Warning,
    VmState::Critical,
    VmState::ResyncRequired,
    VmState::Resynchronizing,
];

/// The `state` label.
fn state_label(s: VmState) -> &'static str {
    match s {
        VmState::InitialReplication => "initial_replication",
        VmState::Normal => "normal",
        VmState::Warning => "warning",
        VmState::Critical => "critical",
        VmState::ResyncRequired => "resync_required",
        VmState::Resynchronizing => "resynchronizing",
    }
}

fn vm(s: &VmStatus) -> Labels {
    vec![("vm", s.vm.clone())]
}

/// Register the VM, disk and FUSE collectors of a mount daemon.
pub fn register(registry: &mut Registry, rep: Arc<Replicator>) {
    crate::metrics::register(registry, move |enc| {
        encode_vms(enc, &rep.status())?;
        encode_disks(enc, &rep.tracker.status())?;
        crate::metrics::fuse::encode(enc)
    });
}

/// Per-VM families.
// A table: one `gauge`/`counter` call per family (name, help, unit,
// samples); the calls look alike by design.
pub fn encode_vms(enc: &mut DescriptorEncoder, vms: &[VmStatus]) -> fmt::Result {
    gauge(
        enc,
        "vdrep_vm_state",
        "1 for the VM's replication state, 0 for the others",
        None,
        vms.iter().flat_map(|s| {
            STATES.iter().map(move |st| {
                let mut l = vm(s);
                l.push(("state", state_label(*st).to_string()));
                (l, i64::from(s.state == *st))
            })
        }),
    )?;
    gauge(
        enc,
        "vdrep_vm_lag",
        "Age of the newest recovery point at the receiver (the RPO)",
        Some(&Unit::Seconds),
        vms.iter().filter_map(|s| Some((vm(s), s.lag_secs?))),
    )?;
    gauge(
        enc,
        "vdrep_vm_rpo_alert_threshold",
        "The VM's rpo_alert threshold",
        Some(&Unit::Seconds),
        vms.iter()
            .filter_map(|s| Some((vm(s), s.health.rpo_alert_secs? as f64))),
    )?;
    gauge(
        enc,
        "vdrep_vm_alert",
        "1 while the alert is raised (alert=rpo_exceeded, link_overloaded)",
        None,
        vms.iter().flat_map(|s| {
            alert::Alert::ALL.iter().map(move |a| {
                let mut l = vm(s);
                l.push(("alert", a.name().to_string()));
                (l, i64::from(s.health.alert == Some(*a)))
            })
        }),
    )?;
    gauge(
        enc,
        "vdrep_vm_churn_bytes_per_second",
        "Bytes written to the VM's disks per second over the last seconds",
        None,
        vms.iter()
            .filter_map(|s| Some((vm(s), s.health.rates?.churn_bps))),
    )?;
    gauge(
        enc,
        "vdrep_vm_send_bytes_per_second",
        "Bytes the VM's connections sent (UDP) per second over the last seconds",
        None,
        vms.iter()
            .filter_map(|s| Some((vm(s), s.health.rates?.sent_bps))),
    )?;
    gauge(
        enc,
        "vdrep_vm_last_point_timestamp",
        "Cut time of the newest recovery point, Unix seconds",
        Some(&Unit::Seconds),
        vms.iter()
            .filter_map(|s| Some((vm(s), s.last_point_unix_ns? as f64 / 1e9))),
    )?;
    gauge(
        enc,
        "vdrep_vm_last_point_cycle",
        "Cycle of the newest recovery point",
        None,
        vms.iter().filter_map(|s| Some((vm(s), s.last_point?))),
    )?;
    counter(
        enc,
        "vdrep_vm_points_committed",
        "Recovery points committed since the mount daemon started",
        None,
        vms.iter().map(|s| (vm(s), s.points_committed)),
    )?;
    gauge(
        enc,
        "vdrep_vm_pending",
        "Bytes not yet at the receiver (dirty blocks and sealed logs)",
        Some(&Unit::Bytes),
        vms.iter().map(|s| (vm(s), s.bytes_pending)),
    )?;
    counter(
        enc,
        "vdrep_vm_sent",
        "Payload bytes sent (log and copy data, after compression)",
        Some(&Unit::Bytes),
        vms.iter().map(|s| (vm(s), s.bytes_sent)),
    )?;
    counter(
        enc,
        "vdrep_vm_wire_sent",
        "UDP bytes the VM's connections sent",
        Some(&Unit::Bytes),
        vms.iter().map(|s| (vm(s), s.wire_bytes_sent)),
    )?;
    counter(
        enc,
        "vdrep_vm_retries",
        "Failed sessions that were retried",
        None,
        vms.iter().map(|s| (vm(s), s.retries)),
    )?;
    gauge(
        enc,
        "vdrep_vm_next_retry_timestamp",
        "When the VM tries again after a failure, Unix seconds (only while it waits)",
        Some(&Unit::Seconds),
        vms.iter().filter_map(|s| Some((vm(s), s.next_retry_unix?))),
    )?;
    counter(
        enc,
        "vdrep_vm_errors",
        "Failed sessions by error kind",
        None,
        vms.iter().flat_map(|s| {
            s.health.errors.iter().map(move |(k, n)| {
                let mut l = vm(s);
                l.push(("kind", k.clone()));
                (l, *n)
            })
        }),
    )?;
    gauge(
        enc,
        "vdrep_vm_initial_copy_done",
        "Bytes of the initial copy done",
        Some(&Unit::Bytes),
        vms.iter().map(|s| (vm(s), s.initial_done)),
    )?;
    gauge(
        enc,
        "vdrep_vm_initial_copy_total",
        "Bytes of the initial copy in all",
        Some(&Unit::Bytes),
        vms.iter().map(|s| (vm(s), s.initial_total)),
    )?;
    gauge(
        enc,
        "vdrep_vm_resync_progress_ratio",
        "Fraction of the running resync or verify compared (mode, disk)",
        None,
        vms.iter().filter_map(|s| {
            let r = s.resync.as_ref()?;
            let mut l = vm(s);
            l.push(("mode", r.mode.clone()));
            l.push(("disk", r.disk.clone()));
            Some((l, r.blocks_compared as f64 / r.blocks_total.max(1) as f64))
        }),
    )?;
    gauge(
        enc,
        "vdrep_vm_resync_pending_disks",
        "Disks waiting for a resync",
        None,
        vms.iter().map(|s| (vm(s), s.resync_pending.len() as u64)),
    )
}

/// Per-disk families.
pub fn encode_disks(enc: &mut DescriptorEncoder, t: &TrackerStatus) -> fmt::Result {
    let disk = |name: &str| -> Labels { vec![("disk", name.to_string())] };
    gauge(
        enc,
        "vdrep_kept_writes",
        "Memory held by copies of the running cycles' whole-block writes (mount.keep_writes), over every disk",
        Some(&Unit::Bytes),
        [(Labels::new(), t.kept_bytes)],
    )?;
    let (from_copies, read_back) = crate::tracking::kept::counts();
    counter(
        enc,
        "vdrep_logged_blocks",
        "Changed blocks the cuts passed on, by where their bytes came from: memory (a kept copy of the write) or disk (read from the disk file, holes included)",
        None,
        [
            (vec![("from", "memory".to_string())], from_copies),
            (vec![("from", "disk".to_string())], read_back),
        ],
    )?;
    gauge(
        enc,
        "vdrep_disk_dirty",
        "Bytes written since the last cut",
        Some(&Unit::Bytes),
        t.disks.iter().map(|d| (disk(&d.name), d.dirty_bytes)),
    )?;
    gauge(
        enc,
        "vdrep_disk_size",
        "Size of the disk",
        Some(&Unit::Bytes),
        t.disks.iter().map(|d| (disk(&d.name), d.size)),
    )?;
    gauge(
        enc,
        "vdrep_disk_cycle",
        "The disk's current cycle",
        None,
        t.disks.iter().map(|d| (disk(&d.name), d.cycle)),
    )?;
    gauge(
        enc,
        "vdrep_disk_bitmap_only",
        "1 while the disk is tracked bitmap-only (its pending changes passed the resync threshold)",
        None,
        t.disks
            .iter()
            .map(|d| (disk(&d.name), i64::from(d.bitmap_only))),
    )
}
