//! The store seam: [`ReplicaStore`], what the receiver needs from a replica
//! store (litestream's `ReplicaClient` and mountpoint-s3's `ObjectClient`
//! are the models), and the small types it speaks in.
//!
//! The directory store ([`Store`]) is the first implementation;
//! [`FailStore`](super::FailStore) wraps any implementation to inject
//! failures. Every implementation runs the same test suite
//! (`tests/store_suite/`), so the promises below are checked, not hoped for:
//!
//! - [`store_log`](ReplicaStore::store_log) returns only once the log is
//!   durable and verified (the receiver then acknowledges it durable);
//! - [`apply`](ReplicaStore::apply) is at most once and crash-atomic: after a
//!   crash and [`recover`](ReplicaStore::recover) the replica is exactly at
//!   the previous cycle or at the log's cycle, never in between;
//! - a point is committed only when every disk of the VM reached it (its
//!   log applied, or, in a store that [commits durable
//!   logs](ReplicaStore::commits_durable_logs), durable and chained onto the
//!   replica), and [`read_point`](ReplicaStore::read_point) gives its exact
//!   bytes until [`prune`](ReplicaStore::prune) drops it.
//!
//! What stays on the concrete [`Store`] (inherently local-directory, used by
//! the failover and role code, not by the replication data path): failover
//! views and pins ([`Store::pin`]), roles and their undo journals
//! ([`Site::promote`](super::Site::promote), `cancel_failover`, `adopt`,
//! `relocate_live`, `commit_failover`), and the replica's file path
//! ([`Site::replica_path`](super::Site::replica_path)): they move files the
//! VM then boots from, which only makes sense on a local file system.

use super::error::{Ctx, StoreError};
use super::group::{GroupPoint, GroupRecord};
use super::store::{
    ApplyOutcome, Consistency, DiskInfo, ForgetReport, InitialData, InitialState, LiveInfo, Point,
    PruneReport, RecoveryReport, ReplicaState, RetentionPolicy, Site, Store, StoreOutcome,
};
use super::summary::PointsSummary;
use super::undo::PointReader;
use std::any::Any;
use std::io::Read;

type Result<T> = std::result::Result<T, StoreError>;

/// One disk of one VM in one sending site's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRef<'a> {
    pub site: &'a str,
    pub vm: &'a str,
    pub disk_id: &'a [u8; 16],
}

/// Random access to one disk as of one recovery point.
pub trait PointRead: Send + Sync {
    /// The disk's size at the point.
    fn len(&self) -> u64;
    /// True for a zero-length disk.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; bytes past [`len`](Self::len) read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl PointRead for PointReader {
    fn len(&self) -> u64 {
        PointReader::len(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        PointReader::read_at(self, buf, offset)
    }
}

/// What [`ReplicaStore::block_hashes`] keeps between the requests of one
/// checksum compare: one slot an implementation fills with its own scratch
/// state (the directory store keeps the opened replica and a read buffer).
#[derive(Default)]
pub struct DigestCache {
    slot: Option<Box<dyn Any + Send>>,
}

impl DigestCache {
    /// The implementation's scratch state, created on first use (or when
    /// another implementation's state is in the slot).
    pub fn get<T: Any + Send + Default>(&mut self) -> &mut T {
        if !self.slot.as_ref().is_some_and(|s| s.is::<T>()) {
            self.slot = Some(Box::<T>::default());
        }
        match self.slot.as_mut().and_then(|s| s.downcast_mut::<T>()) {
            Some(t) => t,
            None => unreachable!("the slot was just filled with a T"),
        }
    }
}

/// What the receiver's replication data path needs from a replica store.
///
/// Grouped by use: start-up ([`recover`](Self::recover)), the handshake
/// ([`free_bytes`](Self::free_bytes), [`failed_over`](Self::failed_over),
/// [`replica_state`](Self::replica_state)), the initial copy
/// (`begin`/`rebase`/`write`/`finish_initial`), deltas
/// ([`store_log`](Self::store_log), [`apply`](Self::apply)), resync
/// ([`block_hashes`](Self::block_hashes), [`resync_prepared`](Self::resync_prepared),
/// [`set_needs_resync`](Self::set_needs_resync)), points
/// ([`commit_point`](Self::commit_point), [`points`](Self::points),
/// [`points_summary`](Self::points_summary),
/// [`read_point`](Self::read_point)) and retention ([`vms`](Self::vms),
/// [`prune`](Self::prune)). Names from a peer are validated by the store.
pub trait ReplicaStore: Send + Sync {
    /// Bring every disk to a clean state after a crash (roll interrupted
    /// applies forward, drop temporary and orphan data, apply durable logs
    /// that chain on). Call once before serving.
    fn recover(&self) -> Result<RecoveryReport>;
    /// Bytes the store can still take (0 if unknown), told to senders.
    fn free_bytes(&self) -> u64;
    /// Every (site, vm) the store holds.
    fn vms(&self) -> Vec<(String, String)>;
    /// `Some` if `vm` failed over to this site (replication into it is over).
    fn failed_over(&self, site: &str, vm: &str) -> Result<Option<LiveInfo>>;
    /// The replica's state; [`StoreError::NotReady`] for an unknown disk.
    fn replica_state(&self, d: DiskRef<'_>) -> Result<ReplicaState>;

    /// Start (or resume) the initial copy of a disk.
    fn begin_initial(&self, site: &str, vm: &str, info: &DiskInfo) -> Result<InitialState>;
    /// Continue an interrupted initial copy as part of the newer cut
    /// `new_cycle`; returns the offset it resumes at.
    fn rebase_initial(&self, d: DiskRef<'_>, new_cycle: u64) -> Result<u64>;
    /// Write one piece of the initial copy at `offset`.
    fn write_initial(&self, d: DiskRef<'_>, offset: u64, data: InitialData<'_>) -> Result<()>;
    /// The initial copy is complete as of `cycle` (cut at `time_ns`).
    fn finish_initial(&self, d: DiskRef<'_>, cycle: u64, time_ns: u64) -> Result<()>;

    /// Receive a log durably (verified); nothing is applied.
    fn store_log(&self, d: DiskRef<'_>, log: &mut dyn Read) -> Result<StoreOutcome>;
    /// Apply the durable log of `cycle` to the replica, at most once.
    fn apply(&self, d: DiskRef<'_>, cycle: u64) -> Result<ApplyOutcome>;

    /// Whether [`commit_point`](Self::commit_point) records a point once
    /// every disk's log up to it is durable, before it is applied (the
    /// receiver then asks for the commit without waiting for the applies).
    /// Such a store applies pending logs itself wherever a point is read or
    /// handed over ([`read_point`](Self::read_point), failover) and in
    /// [`drain`](Self::drain).
    fn commits_durable_logs(&self) -> bool {
        false
    }
    /// Apply the disk's durable logs that chain onto its replica, in order,
    /// up to `upto` (all if `None`); returns the replica's cycle afterwards.
    /// A store that applies each log at once has nothing to do.
    fn drain(&self, d: DiskRef<'_>, upto: Option<u64>) -> Result<u64> {
        let _ = upto;
        Ok(self.replica_state(d)?.cycle.unwrap_or(0))
    }

    /// Mark the replica untrusted until a checksum resync (or clear it).
    fn set_needs_resync(&self, d: DiskRef<'_>, reason: Option<&str>) -> Result<()>;
    /// A checksum compare against the replica at `replica_cycle` ended; its
    /// log is `cycle`.
    fn resync_prepared(&self, d: DiskRef<'_>, replica_cycle: u64, cycle: u64) -> Result<()>;
    /// Digests of the blocks of `runs` (offset, block count) of the replica
    /// at `replica_cycle`: (replica size, one digest per block).
    fn block_hashes(
        &self,
        d: DiskRef<'_>,
        replica_cycle: u64,
        block_size: u32,
        runs: &[(u64, u32)],
        cache: &mut DigestCache,
    ) -> Result<(u64, Vec<u128>)>;

    /// Record a point of `vm` at `cycle` over `disks` if every one reached
    /// it (`None` otherwise). Idempotent.
    fn commit_point(
        &self,
        site: &str,
        vm: &str,
        cycle: u64,
        disks: &[[u8; 16]],
        consistency: Consistency,
    ) -> Result<Option<Point>>;
    /// Store `vm`'s domain definition as of the cut of `cycle`, before
    /// the point of `cycle` is committed (unchanged text is not stored
    /// again).
    fn save_definition(&self, site: &str, vm: &str, cycle: u64, xml: &str) -> Result<()>;
    /// `vm`'s domain definition as of point `cycle` (`None`: the point has
    /// none, e.g. a VM not protected by domain, or a dropped point).
    fn definition(&self, site: &str, vm: &str, cycle: u64) -> Result<Option<String>>;
    /// Store the consistency group `vm`'s point of `cycle` was cut for,
    /// before the point is committed. A store that keeps no group records
    /// (the object store: senders refuse `--group` to one) refuses it.
    fn save_group(&self, site: &str, vm: &str, cycle: u64, rec: &GroupRecord) -> Result<()> {
        let _ = (cycle, rec);
        Err(StoreError::NotReady {
            ctx: Ctx::new(site, vm, ""),
            what: "this store keeps no consistency groups: protect the VM without --group".into(),
        })
    }
    /// The group points of `group` at `site`, oldest first (none in a
    /// store that keeps no group records).
    fn group_points(&self, site: &str, group: &str) -> Result<Vec<GroupPoint>> {
        let _ = (site, group);
        Ok(Vec::new())
    }
    /// The points of `vm`, oldest first.
    fn points(&self, site: &str, vm: &str) -> Result<Vec<Point>>;
    /// The newest point of `vm`, or none; its `bytes` may be left 0. What
    /// the receiver's drainer asks of every VM on every pass: a store can
    /// answer it without [`points`](Self::points)' accounting.
    fn newest_point(&self, site: &str, vm: &str) -> Result<Option<Point>> {
        Ok(self.points(site, vm)?.into_iter().max_by_key(|p| p.cycle))
    }
    /// What the receiver's metrics scrape needs of `vm`'s points (how
    /// many, the newest cut, which every replica holds), asked of every VM
    /// on every scrape: a store can answer it without
    /// [`points`](Self::points)' accounting and without reading every
    /// point. Must say what [`points`](Self::points) says.
    fn points_summary(&self, site: &str, vm: &str) -> Result<PointsSummary> {
        Ok(PointsSummary::from_points(&self.points(site, vm)?))
    }
    /// One disk as of point `cycle`.
    fn read_point(&self, d: DiskRef<'_>, cycle: u64) -> Result<Box<dyn PointRead>>;
    /// Drop points of `vm` by `keep` (pinned points stay).
    fn prune(&self, site: &str, vm: &str, keep: &RetentionPolicy) -> Result<PruneReport>;
    /// Delete `vm`'s replica and its whole history (`vdrep forget`).
    /// Refused with [`StoreError::InUse`] while the VM runs here after a
    /// failover or a point of it is exposed; [`StoreError::NotReady`] if
    /// the store holds no such VM. Afterwards the VM is unknown: a sender
    /// that still replicates it starts over with an initial copy.
    fn forget(&self, site: &str, vm: &str) -> Result<ForgetReport>;
}

impl Store {
    fn with_site<T>(&self, site: &str, f: impl FnOnce(&Site<'_>) -> Result<T>) -> Result<T> {
        f(&self.site(site)?)
    }
}

// Each method repeats the trait's signature (Rust requires it) and forwards
// to `Site`; the pairs `duplicates` lists here are those signatures.
impl ReplicaStore for Store {
    fn recover(&self) -> Result<RecoveryReport> {
        Store::recover(self)
    }
    fn free_bytes(&self) -> u64 {
        nix::sys::statvfs::statvfs(self.root())
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(0)
    }
    fn vms(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in self.site_names() {
            if let Ok(site) = self.site(&name) {
                out.extend(site.vms().into_iter().map(|vm| (name.clone(), vm)));
            }
        }
        out
    }
    fn failed_over(&self, site: &str, vm: &str) -> Result<Option<LiveInfo>> {
        self.with_site(site, |s| s.live(vm))
    }
    fn replica_state(&self, d: DiskRef<'_>) -> Result<ReplicaState> {
        self.with_site(d.site, |s| s.disk_state(d.vm, d.disk_id))
    }
    fn begin_initial(&self, site: &str, vm: &str, info: &DiskInfo) -> Result<InitialState> {
        self.with_site(site, |s| s.begin_initial(vm, info))
    }
    fn rebase_initial(&self, d: DiskRef<'_>, new_cycle: u64) -> Result<u64> {
        self.with_site(d.site, |s| s.rebase_initial(d.vm, d.disk_id, new_cycle))
    }
    fn write_initial(&self, d: DiskRef<'_>, offset: u64, data: InitialData<'_>) -> Result<()> {
        self.with_site(d.site, |s| s.write_initial(d.vm, d.disk_id, offset, data))
    }
    fn finish_initial(&self, d: DiskRef<'_>, cycle: u64, time_ns: u64) -> Result<()> {
        self.with_site(d.site, |s| {
            s.finish_initial(d.vm, d.disk_id, cycle, time_ns)
        })
    }
    fn store_log(&self, d: DiskRef<'_>, log: &mut dyn Read) -> Result<StoreOutcome> {
        self.with_site(d.site, |s| s.store_log(d.vm, d.disk_id, log))
    }
    fn apply(&self, d: DiskRef<'_>, cycle: u64) -> Result<ApplyOutcome> {
        self.with_site(d.site, |s| s.apply(d.vm, d.disk_id, cycle))
    }
    fn commits_durable_logs(&self) -> bool {
        true
    }
    fn drain(&self, d: DiskRef<'_>, upto: Option<u64>) -> Result<u64> {
        self.with_site(d.site, |s| s.drain(d.vm, d.disk_id, upto))
    }
    fn set_needs_resync(&self, d: DiskRef<'_>, reason: Option<&str>) -> Result<()> {
        self.with_site(d.site, |s| s.set_needs_resync(d.vm, d.disk_id, reason))
    }
    fn resync_prepared(&self, d: DiskRef<'_>, replica_cycle: u64, cycle: u64) -> Result<()> {
        self.with_site(d.site, |s| {
            s.resync_prepared(d.vm, d.disk_id, replica_cycle, cycle)
        })
    }
    fn block_hashes(
        &self,
        d: DiskRef<'_>,
        replica_cycle: u64,
        block_size: u32,
        runs: &[(u64, u32)],
        cache: &mut DigestCache,
    ) -> Result<(u64, Vec<u128>)> {
        self.with_site(d.site, |s| {
            s.block_hashes(d.vm, d.disk_id, replica_cycle, block_size, runs, cache)
        })
    }
    fn commit_point(
        &self,
        site: &str,
        vm: &str,
        cycle: u64,
        disks: &[[u8; 16]],
        consistency: Consistency,
    ) -> Result<Option<Point>> {
        self.with_site(site, |s| s.commit_point(vm, cycle, disks, consistency))
    }
    fn save_definition(&self, site: &str, vm: &str, cycle: u64, xml: &str) -> Result<()> {
        self.with_site(site, |s| s.save_definition(vm, cycle, xml))
    }
    fn definition(&self, site: &str, vm: &str, cycle: u64) -> Result<Option<String>> {
        self.with_site(site, |s| s.definition(vm, cycle))
    }
    fn save_group(&self, site: &str, vm: &str, cycle: u64, rec: &GroupRecord) -> Result<()> {
        self.with_site(site, |s| s.save_group(vm, cycle, rec))
    }
    fn group_points(&self, site: &str, group: &str) -> Result<Vec<GroupPoint>> {
        self.with_site(site, |s| s.group_points(group))
    }
    fn points(&self, site: &str, vm: &str) -> Result<Vec<Point>> {
        self.with_site(site, |s| s.points(vm))
    }
    fn newest_point(&self, site: &str, vm: &str) -> Result<Option<Point>> {
        self.with_site(site, |s| s.newest_point(vm))
    }
    fn points_summary(&self, site: &str, vm: &str) -> Result<PointsSummary> {
        self.with_site(site, |s| s.points_summary(vm))
    }
    fn read_point(&self, d: DiskRef<'_>, cycle: u64) -> Result<Box<dyn PointRead>> {
        self.with_site(d.site, |s| {
            Ok(Box::new(s.read_point(d.vm, d.disk_id, cycle)?) as Box<dyn PointRead>)
        })
    }
    fn prune(&self, site: &str, vm: &str, keep: &RetentionPolicy) -> Result<PruneReport> {
        self.with_site(site, |s| s.prune(vm, keep))
    }
    fn forget(&self, site: &str, vm: &str) -> Result<ForgetReport> {
        self.with_site(site, |s| s.forget(vm))
    }
}
