//! The store: namespaces, disk state, initial copy, logs, apply, points.

use super::api::DigestCache;
use super::error::{hrl_err, io_err, Ctx, StoreError};
use super::fault::{crash_point, Pause, PauseState};
use super::group::GroupRecord;
use super::names::{check_inside, ensure_dir, validate_name};
use super::summary::PointsSummary;
use super::target::{open_target, ReplicaFormat, ReplicaTarget, VHD_FOOTER_LEN};
use super::undo::{self, PointReader, ReaderBuilder, ReaderShared, UndoLayer};
use crate::util::durable::{Durability, StoreDurability, SyncMode};
use crate::util::{hex, now_ns, phase, random_id, recycle};
use crate::vhd::footer::vhd_timestamp_now;
use history::History;

mod forget;
mod history;
mod points;
mod roles;
use crate::hrl::format::{self, ParseError};
use crate::hrl::{HrlHeader, HrlReader};
pub use forget::ForgetReport;
use parking_lot::Mutex;
pub(crate) use points::is_journal_name as is_points_journal;
pub use points::{points_in, JOURNAL_MAX as POINTS_JOURNAL_MAX};
pub use roles::{AdoptDisk, LiveDisk, LiveInfo};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type Result<T> = std::result::Result<T, StoreError>;

/// During an initial copy, progress is made durable (replica fsynced, then
/// the resume offset recorded) every this many bytes, and at the end.
pub const INITIAL_SYNC_EVERY: u64 = 64 << 20;

/// During an initial copy, the writeback of what was written starts every
/// this many bytes ([`ReplicaTarget::start_writeback`]), so that the
/// fsyncs of [`INITIAL_SYNC_EVERY`] and the end find little left to write
/// (64 MiB took 45-76 ms to fsync at the end of a copy on the test host,
/// `kernel-notes/wan.md`, round 8b). `VDREP_INITIAL_WRITEBACK=0`: only the
/// fsyncs, as before (to measure). Not done while a log is applied: its
/// scattered writes then waited on the started writeback (write 13 → 50
/// ms, final sync 30 → 2 ms for a 21 MB log, 9 ms worse in sum; session 17).
const INITIAL_WRITEBACK_EVERY: u64 = 4 << 20;

fn initial_writeback() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("VDREP_INITIAL_WRITEBACK").map_or(true, |v| v != "0"))
}

const STATE: &str = "state.json";
/// State files saved through a spare swapped in ([`recycle::replace`])
/// instead of a new temp file renamed over them: written every cycle.
const REUSED: &[&str] = &[STATE];
const POINTS: &str = "points.json";
const INCOMING: &str = "incoming";
const UNDO: &str = "undo";
/// A VM's domain definitions, one `CYCLE.xml` per point that has one.
const DEFINITIONS: &str = "definitions";
/// A VM's consistency-group records, one `CYCLE.json` per point cut for
/// its group ([`super::group`]).
const GROUPS: &str = "groups";

/// What the sender says about a disk when starting its initial copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's stable identity (as in its logs).
    pub disk_id: [u8; 16],
    /// The source disk's file name (one component: `disk0.img`, `a.vhd`).
    pub name: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// Tracking block size.
    pub block_size: u32,
    /// The cut the initial copy reads the disk as of. An interrupted copy
    /// resumes only for the same cut (and size); another cut restarts it.
    pub cycle: u64,
}

/// Where an initial copy (re)starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialState {
    /// Everything below this offset is already in the replica (durably).
    pub resume_offset: u64,
    /// The recovery points this copy ended (a warning to log), if any.
    pub dropped: Option<PointsDropped>,
}

/// Recovery points a full copy of one disk ended: every point that
/// includes the disk, and only those (the points of the VM from before
/// the disk was part of it stay whole: their disks are untouched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recovery point(s) {cycles:?} of VM {vm} were dropped: {why}")]
pub struct PointsDropped {
    pub vm: String,
    /// The disk copied whole (hex id) and its file name.
    pub disk_id: String,
    pub disk: String,
    pub cycles: Vec<u64>,
    pub why: DropReason,
}

/// Why a full copy ends the points that include its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The disk had a replica (at `replica_cycle`): a whole copy rewrites
    /// it without pre-images, so its history cannot lead back through it.
    ReCopy { replica_cycle: u64 },
    /// The disk's replica is gone from the store (removed by hand, lost):
    /// the points cannot rebuild it any more.
    ReplicaLost,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::ReCopy { replica_cycle } => write!(
                f,
                "they include a disk whose replica (at cycle {replica_cycle}) is being copied whole again, and history does not lead back through a whole copy"
            ),
            DropReason::ReplicaLost => f.write_str(
                "they include a disk whose replica is no longer in the store (its history went with it); it is being copied whole",
            ),
        }
    }
}

/// One piece of an initial copy.
#[derive(Debug, Clone, Copy)]
pub enum InitialData<'a> {
    Data(&'a [u8]),
    /// This many zero bytes (holes, all-zero blocks).
    Zeroes(u64),
}

/// The state of one replica, `state.json` in its directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaState {
    pub version: u32,
    /// 32 hex digits.
    pub disk_id: String,
    /// The source disk's file name.
    pub name: String,
    /// The replica's file name in the disk directory.
    pub replica_file: String,
    pub format: ReplicaFormat,
    /// Virtual size at `cycle` (or the size being copied during an initial copy).
    pub size: u64,
    pub block_size: u32,
    /// VHD unique id (hex) and time stamp, stable for the replica's life.
    pub vhd_id: String,
    pub vhd_time: u32,
    /// Set while an initial copy runs: everything below is durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_offset: Option<u64>,
    /// The cut the running initial copy is taken at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_cycle: Option<u64>,
    /// The cut the replica is at; `None` before the first initial copy finished.
    pub cycle: Option<u64>,
    /// Time of that cut (ns since the Unix epoch; 0 if unknown).
    #[serde(default)]
    pub cycle_time_ns: u64,
    /// Set while the log leading to this cycle is being written into the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applying: Option<u64>,
    /// The replica cannot be trusted (the reason): the sender must resync it
    /// by checksums; until then only the resync's log is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_resync: Option<String>,
    /// The cycle whose log carries a completed resync (announced by the
    /// sender after the compare); applying it clears `needs_resync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_cycle: Option<u64>,
}

impl ReplicaState {
    /// The state of a replica file that replaces `old` (if any): at no
    /// cycle, trusted, nothing in progress. It keeps `old`'s VHD identity
    /// (stable for the replica's life) or takes a new one.
    fn replacing(
        old: Option<&ReplicaState>,
        disk_id: &[u8; 16],
        name: &str,
        replica_file: &str,
        format: ReplicaFormat,
        size: u64,
        block_size: u32,
    ) -> ReplicaState {
        let (vhd_id, vhd_time) = match old {
            Some(o) => (o.vhd_id.clone(), o.vhd_time),
            None => (hex(&random_id()), vhd_timestamp_now()),
        };
        ReplicaState {
            version: 1,
            disk_id: hex(disk_id),
            name: name.to_string(),
            replica_file: replica_file.to_string(),
            format,
            size,
            block_size,
            vhd_id,
            vhd_time,
            initial_offset: None,
            initial_cycle: None,
            cycle: None,
            cycle_time_ns: 0,
            applying: None,
            needs_resync: None,
            resync_cycle: None,
        }
    }

    fn id_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self
                .vhd_id
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
        out
    }
}

/// What [`Site::store_log`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The log is durable in `incoming/` (acknowledge it as durable).
    Stored {
        cycle: u64,
        base_cycle: u64,
        bytes: u64,
    },
    /// The same log was already durable: nothing done.
    AlreadyStored { cycle: u64 },
    /// The replica is already at or past this cycle: a resend; acknowledge
    /// it as applied, nothing was written.
    AlreadyApplied { cycle: u64, replica_cycle: u64 },
}

/// What [`Site::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied {
        cycle: u64,
        /// Disk bytes written.
        bytes: u64,
        /// Size of the undo record kept as history.
        undo_bytes: u64,
        /// An interrupted apply of this log was completed.
        rolled_forward: bool,
    },
    /// The replica is already at or past this cycle (resend).
    AlreadyApplied { cycle: u64, replica_cycle: u64 },
}

/// Crash-consistent (one cut) or application-consistent (the guest was
/// quiesced for the cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Crash,
    App,
}

/// A VM recovery point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub cycle: u64,
    /// Time of the cut, ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// Bytes of history that keep this point reachable (the undo records
    /// of the next cycle); 0 for the newest point.
    #[serde(default)]
    pub bytes: u64,
    pub consistency: Consistency,
    /// The disks (hex ids) of the point.
    pub disks: Vec<String>,
}

impl Point {
    /// Is the point in every one of its disks' replicas? `replica_cycle`
    /// gives the cycle a disk's replica file is at (its `state.json`;
    /// `None`: unknown). `false` for a point committed on durable logs not
    /// applied yet (row 10 of SEMANTICS.md).
    pub fn applied(&self, mut replica_cycle: impl FnMut(&str) -> Option<u64>) -> bool {
        self.disks
            .iter()
            .all(|hex| replica_cycle(hex).is_some_and(|c| c >= self.cycle))
    }
}

/// [`Point::applied`] of each of `points`, asking `replica_cycle` once per
/// disk (a `state.json` read), not once per point.
pub fn applied_flags(
    points: &[Point],
    mut replica_cycle: impl FnMut(&str) -> Option<u64>,
) -> Vec<bool> {
    let mut cycles: HashMap<String, Option<u64>> = HashMap::new();
    points
        .iter()
        .map(|p| {
            p.applied(|hex| {
                *cycles
                    .entry(hex.to_string())
                    .or_insert_with(|| replica_cycle(hex))
            })
        })
        .collect()
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct PointsFile {
    points: Vec<Point>,
    /// Which journal (`points-<gen>.jsonl`) adds to this snapshot
    /// ([`points`]); 0 in a store written before the journal.
    #[serde(default)]
    gen: u64,
    /// Points of `points` read from the journal (not stored).
    #[serde(skip)]
    journaled: usize,
}

/// Which points [`Site::prune`] keeps. A point is dropped if it is beyond
/// the newest `keep_last` or older than `max_age`; of the points older than
/// `thin_after`, only the newest of each `thin_every` interval is kept (e.g.
/// every point for 2 h, then one per hour: `thin_after` 2 h, `thin_every`
/// 1 h, `max_age` 72 h). The newest point is always kept.
#[derive(Debug, Clone, Default)]
pub struct RetentionPolicy {
    pub keep_last: Option<usize>,
    pub max_age: Option<std::time::Duration>,
    pub thin_after: Option<std::time::Duration>,
    pub thin_every: Option<std::time::Duration>,
}

/// What [`Site::prune`] dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub dropped_points: Vec<u64>,
    /// Bytes of undo records deleted, less the merged records written.
    pub freed_bytes: u64,
    /// Undo records merged over thinned-out points.
    pub merged: u64,
}

/// What [`Store::recover`] did, one line per action.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub actions: Vec<String>,
    /// Disks that could not be recovered (with the reason); the rest are fine.
    pub errors: Vec<String>,
}

/// A held [`Runtime`] lock ([`Store::lock`]).
type RuntimeGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, Runtime>;

#[derive(Default)]
struct Runtime {
    initial: Option<InitialSession>,
}

struct InitialSession {
    target: Box<dyn ReplicaTarget>,
    progress: u64,
    unsynced: u64,
    /// Bytes written since the last [`ReplicaTarget::start_writeback`].
    unstarted: u64,
}

/// A replica store rooted at one directory. Thread-safe; one process per
/// store (an exclusive `flock` on `DIR/.lock`).
pub struct Store {
    root: PathBuf,
    sites: PathBuf,
    _lock: nix::fcntl::Flock<File>,
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<Runtime>>>>,
    tmp_seq: AtomicU64,
    /// Open [`PointReader`]s per disk directory: an apply pushes its undo
    /// layer into each before it writes the replica.
    readers: Mutex<HashMap<PathBuf, Vec<std::sync::Weak<ReaderShared>>>>,
    /// `(site, vm)` -> pinned point cycles (exposed by a test failover):
    /// [`Site::prune`] never drops them.
    pins: Mutex<HashMap<(String, String), Vec<u64>>>,
    /// Test pauses at steps ([`Store::pause_at`]); empty in production.
    pauses: Mutex<Vec<Arc<PauseState>>>,
    /// How a replication cycle's files are made durable: an fsync each,
    /// or a `syncfs` of the store's file system shared by every disk
    /// syncing at the same time; one way for what a point waits for
    /// (`commit`), another for what only an apply waits for (`apply`)
    /// ([`crate::util::durable`]).
    sync: StoreDurability,
    /// Per VM folder, what a point commit needs ([`points`]).
    points_meta: Mutex<HashMap<PathBuf, points::PointsMeta>>,
    /// Undo records a point reader indexes before it merges them into one
    /// ([`Store::set_reader_chunk`]).
    reader_chunk: std::sync::atomic::AtomicUsize,
}

/// Files deleted when dropped (a point reader's private merges).
#[derive(Default)]
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Undo records a point reader keeps open before it merges them: one
/// file each, and a point two hours back on a continuous VM has ~7,000–
/// 14,400 of them (the open-files limit is often 1,024, 65,536 in the
/// systemd units).
pub const READER_CHUNK: usize = 512;

/// A JSON state file written to its temp name, to be synced (possibly with
/// other files in one pass) and then renamed ([`Site::stage_json`]).
struct Staged {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    /// `tmp` is `path`'s spare, swapped in ([`recycle::replace`]).
    reused: bool,
}

/// One sending site's namespace in a [`Store`].
pub struct Site<'a> {
    store: &'a Store,
    name: String,
    dir: PathBuf,
}

/// The cycles of the definitions in `dir`, ascending.
fn definition_cycles(dir: &Path) -> Vec<u64> {
    cycle_files(dir, ".xml")
}

/// The cycles of the `CYCLE{ext}` files in `dir`, ascending.
fn cycle_files(dir: &Path, ext: &str) -> Vec<u64> {
    let mut v: Vec<u64> = list_dir(dir)
        .iter()
        .filter_map(|n| n.strip_suffix(ext)?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Store {
    /// Open (creating if needed) the store at `dir` and lock it. Call
    /// [`Store::recover`] once before serving.
    pub fn open(dir: &Path) -> Result<Store> {
        let ctx = Ctx::default();
        let fresh = !dir.exists();
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err(&ctx, dir, "creating the store", dir, e))?;
        if fresh {
            // Replicas are VM disks: private to the receiver.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let root = std::fs::canonicalize(dir)
            .map_err(|e| io_err(&ctx, dir, "opening the store", dir, e))?;
        let lock_path = root.join(".lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| io_err(&ctx, &root, "opening the store lock", &lock_path, e))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked {
                path: lock_path.clone(),
            })?;
        let _ = lock.set_len(0);
        let _ = lock.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);
        let sites = ensure_dir(&ctx, &root, &root, "sites", true)?;
        Ok(Store {
            root,
            sites,
            _lock: lock,
            locks: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
            readers: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            pauses: Mutex::new(Vec::new()),
            sync: StoreDurability::default(),
            points_meta: Mutex::new(HashMap::new()),
            reader_chunk: std::sync::atomic::AtomicUsize::new(READER_CHUNK),
        })
    }

    /// How many undo records a point reader keeps open before it merges
    /// them into one private record ([`READER_CHUNK`] by default; at
    /// least 2). Lower: fewer open files per reader, more merging when it
    /// opens.
    pub fn set_reader_chunk(&self, records: usize) {
        self.reader_chunk.store(records, Ordering::Relaxed);
    }

    /// How the cycle path's writes (logs, undo records, replicas, state and
    /// points files) become durable: an fsync per file and directory, or a
    /// `syncfs` of the store's file system shared by the disks syncing at
    /// the same time (group commit; [`crate::util::durable`]).
    pub fn set_sync(&mut self, mode: SyncMode) {
        self.sync = mode.durability(&self.root);
    }

    /// Test hook: the first store operation that reaches `step` (one of
    /// the crash steps of [`super::fault`]: `state-applying`,
    /// `replica-half`, …) waits there until the returned [`Pause`] is
    /// released or dropped. For deterministic tests of races (a new
    /// connection meeting an apply of a connection that just ended).
    pub fn pause_at(&self, step: &str) -> Pause {
        let inner = PauseState::new(step);
        self.pauses.lock().push(inner.clone());
        Pause { inner }
    }

    /// A step inside a store operation: a crash step
    /// (`VDREP_CRASH_AT`), and a test's [`Store::pause_at`].
    fn step(&self, name: &str) {
        crash_point(name);
        let pauses: Vec<Arc<PauseState>> = {
            let mut g = self.pauses.lock();
            if g.is_empty() {
                return;
            }
            // Pauses whose test is gone are forgotten.
            g.retain(|p| Arc::strong_count(p) > 1);
            g.iter().filter(|p| p.step == name).cloned().collect()
        };
        for p in pauses {
            p.hold(name);
        }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sending sites that have a namespace here.
    pub fn site_names(&self) -> Vec<String> {
        list_dir(&self.sites)
            .into_iter()
            .filter(|n| validate_name("site", n).is_ok())
            .collect()
    }

    /// The namespace of site `name` (validated; created if needed).
    pub fn site(&self, name: &str) -> Result<Site<'_>> {
        validate_name("site", name)?;
        let ctx = Ctx::new(name, "", "");
        let dir = ensure_dir(&ctx, &self.root, &self.sites, name, true)?;
        check_inside(&ctx, &self.sites, &dir)?;
        Ok(Site {
            store: self,
            name: name.to_string(),
            dir,
        })
    }

    /// Pin point `cycle` of `vm` of `site`: [`Site::prune`] keeps it until
    /// it is unpinned (in memory: pins end with the process). Pins count.
    pub fn pin(&self, site: &str, vm: &str, cycle: u64) {
        self.pins
            .lock()
            .entry((site.to_string(), vm.to_string()))
            .or_default()
            .push(cycle);
    }

    /// Undo one [`Store::pin`].
    pub fn unpin(&self, site: &str, vm: &str, cycle: u64) {
        let mut g = self.pins.lock();
        let key = (site.to_string(), vm.to_string());
        if let Some(v) = g.get_mut(&key) {
            if let Some(i) = v.iter().position(|&c| c == cycle) {
                v.remove(i);
            }
            if v.is_empty() {
                g.remove(&key);
            }
        }
    }

    /// The pinned points of `vm` of `site`.
    pub fn pins(&self, site: &str, vm: &str) -> Vec<u64> {
        self.pins
            .lock()
            .get(&(site.to_string(), vm.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// The live point readers of the disk in `dir` (dead ones forgotten).
    fn live_readers(&self, dir: &Path) -> Vec<Arc<ReaderShared>> {
        let mut g = self.readers.lock();
        let Some(v) = g.get_mut(dir) else {
            return Vec::new();
        };
        v.retain(|w| w.strong_count() > 0);
        let out: Vec<_> = v.iter().filter_map(|w| w.upgrade()).collect();
        if v.is_empty() {
            g.remove(dir);
        }
        out
    }

    /// Lock the runtime of `key` (a disk's or a VM's folder): held until
    /// the guard drops; one apply, copy or role change at a time.
    fn lock(&self, key: &Path) -> RuntimeGuard {
        // The map's lock is released before waiting for the runtime's.
        self.runtime(key).lock_arc()
    }

    /// [`lock`](Self::lock) if no one holds it, without waiting.
    fn try_lock(&self, key: &Path) -> Option<RuntimeGuard> {
        self.runtime(key).try_lock_arc()
    }

    /// The runtime of `key`, made on first use.
    fn runtime(&self, key: &Path) -> Arc<Mutex<Runtime>> {
        self.locks
            .lock()
            .entry(key.to_path_buf())
            .or_default()
            .clone()
    }

    /// Bring every disk to a clean state after a crash: remove temp files,
    /// roll interrupted applies forward, delete orphan undo records and
    /// applied logs, then apply the durable logs that chain onto each
    /// replica. Errors on one disk are reported and do not stop the others.
    pub fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        for site in list_dir(&self.sites) {
            if validate_name("site", &site).is_err() {
                continue;
            }
            let s = match self.site(&site) {
                Ok(s) => s,
                Err(e) => {
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            for gone in s.clean_forgotten() {
                report.actions.push(format!(
                    "finished deleting {gone} (a forget was interrupted)"
                ));
            }
            for vm in list_dir(&s.dir.join("vms")) {
                if validate_name("vm", &vm).is_err() {
                    continue;
                }
                for d in list_dir(&s.dir.join("vms").join(&vm).join("disks")) {
                    let Some(id) = parse_hex_id(&d) else { continue };
                    if let Err(e) = s.recover_disk(&vm, id, &mut report) {
                        report.errors.push(e.to_string());
                    }
                }
            }
        }
        Ok(report)
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// A disk id from its 32 hex digits.
pub(crate) fn parse_hex_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Read and parse a JSON state file; `None` if it does not exist.
fn read_json_opt<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    root: &Path,
    path: &Path,
) -> Result<Option<T>> {
    // `state.json` is replaced by swapping it with its spare
    // (`recycle::replace`): only what the name holds after the read counts.
    match recycle::read_published(path, open_nofollow, |b| serde_json::from_slice::<T>(b)) {
        Ok(parsed) => parsed.map(Some).map_err(|e| StoreError::BadState {
            path: path.to_path_buf(),
            what: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(io_err(ctx, root, &format!("reading {name}"), path, e))
        }
    }
}

/// What [`Site::block_hashes`] keeps between the requests of one compare
/// (in the [`DigestCache`] slot).
#[derive(Default)]
struct DigestScratch {
    buf: Vec<u8>,
    open: Option<OpenReplica>,
}

struct OpenReplica {
    site: String,
    vm: String,
    disk_id: [u8; 16],
    paths: DiskPaths,
    /// `state.json` as read when `target` was opened.
    state_bytes: Vec<u8>,
    size: u64,
    rpath: PathBuf,
    target: Box<dyn ReplicaTarget>,
}

/// Paths of one disk.
#[derive(Clone)]
struct DiskPaths {
    ctx: Ctx,
    dir: PathBuf,
    incoming: PathBuf,
    undo: PathBuf,
}

impl DiskPaths {
    fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    fn log(&self, cycle: u64) -> PathBuf {
        self.incoming.join(format!("{cycle}.hrl"))
    }
}

impl Site<'_> {
    /// The site's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ctx(&self, vm: &str, disk: &str) -> Ctx {
        Ctx::new(&self.name, vm, disk)
    }

    fn vm_dir(&self, vm: &str, create: bool) -> Result<PathBuf> {
        validate_name("vm", vm)?;
        let ctx = self.ctx(vm, "");
        let vms = ensure_dir(&ctx, &self.store.root, &self.dir, "vms", create)?;
        let d = ensure_dir(&ctx, &self.store.root, &vms, vm, create)?;
        check_inside(&ctx, &self.dir, &d)?;
        Ok(d)
    }

    fn disk(&self, vm: &str, disk_id: &[u8; 16], create: bool) -> Result<DiskPaths> {
        let idh = hex(disk_id);
        let ctx = self.ctx(vm, &idh);
        let vmd = self.vm_dir(vm, create)?;
        let root = &self.store.root;
        let disks = ensure_dir(&ctx, root, &vmd, "disks", create)?;
        let dir = ensure_dir(&ctx, root, &disks, &idh, create)?;
        let incoming = ensure_dir(&ctx, root, &dir, INCOMING, true)?;
        let undo = ensure_dir(&ctx, root, &dir, UNDO, true)?;
        check_inside(&ctx, &self.dir, &dir)?;
        Ok(DiskPaths {
            ctx,
            dir,
            incoming,
            undo,
        })
    }

    fn io(&self, ctx: &Ctx, doing: &str, path: &Path, e: std::io::Error) -> StoreError {
        io_err(ctx, &self.store.root, doing, path, e)
    }

    fn read_state(&self, p: &DiskPaths) -> Result<Option<ReplicaState>> {
        read_json_opt(&p.ctx, &self.store.root, &p.state())
    }

    fn state_or_unknown(&self, p: &DiskPaths) -> Result<ReplicaState> {
        self.read_state(p)?.ok_or_else(|| StoreError::NotReady {
            ctx: p.ctx.clone(),
            what: "this disk is unknown to the receiver: start its initial replication".into(),
        })
    }

    /// The opening of every change to one known disk: its paths, its
    /// runtime locked (until the guard drops) and its state.
    fn lock_disk(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
    ) -> Result<(DiskPaths, RuntimeGuard, ReplicaState)> {
        let p = self.disk(vm, disk_id, false)?;
        let rt = self.store.lock(&p.dir);
        let st = self.state_or_unknown(&p)?;
        Ok((p, rt, st))
    }

    /// `v` written whole to `dir/name` and made durable on the apply path
    /// (state and role files: no point waits for them).
    fn write_json<T: serde::Serialize>(
        &self,
        ctx: &Ctx,
        dir: &Path,
        name: &str,
        v: &T,
    ) -> Result<()> {
        self.write_json_on(&self.store.sync.apply, ctx, dir, name, v)
    }

    /// [`Site::write_json`] made durable by `sync` (the commit path for
    /// what a point waits for).
    fn write_json_on<T: serde::Serialize>(
        &self,
        sync: &Durability,
        ctx: &Ctx,
        dir: &Path,
        name: &str,
        v: &T,
    ) -> Result<()> {
        let staged = self.stage_json(ctx, dir, name, v)?;
        sync.sync_all(&staged.file)
            .map_err(|e| self.io(ctx, &format!("writing {name}"), &staged.path, e))?;
        self.publish_json(ctx, staged)?;
        sync.sync_dir(dir)
            .map_err(|e| self.io(ctx, &format!("writing {name}"), &dir.join(name), e))
    }

    /// `v` written to `dir/name.tmp`, not yet synced nor renamed (see
    /// [`Staged`]).
    fn stage_json<T: serde::Serialize>(
        &self,
        ctx: &Ctx,
        dir: &Path,
        name: &str,
        v: &T,
    ) -> Result<Staged> {
        let path = dir.join(name);
        // A file rewritten every cycle is written to its spare and swapped
        // in: no inode allocated or freed per save ([`recycle`]).
        let reused = REUSED.contains(&name);
        let tmp = if reused {
            recycle::spare_of(&path)
        } else {
            dir.join(format!("{name}.tmp"))
        };
        let json = serde_json::to_vec_pretty(v).map_err(|e| StoreError::BadState {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let res = (|| {
            let mut f = create_nofollow(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            Ok(f)
        })();
        match res {
            Ok(file) => Ok(Staged {
                file,
                tmp,
                path,
                reused,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(self.io(ctx, &format!("writing {name}"), &path, e))
            }
        }
    }

    /// Rename a staged file into place (its data synced by the caller; the
    /// directory is the caller's to sync).
    fn publish_json(&self, ctx: &Ctx, s: Staged) -> Result<()> {
        let Staged {
            file,
            tmp,
            path,
            reused,
        } = s;
        drop(file);
        let moved = if reused {
            recycle::replace(&tmp, &path)
        } else {
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io(ctx, "publishing a state file", &path, e));
        }
        Ok(())
    }

    fn write_state(&self, p: &DiskPaths, st: &ReplicaState) -> Result<()> {
        self.write_json(&p.ctx, &p.dir, STATE, st)
    }

    fn open_replica(
        &self,
        p: &DiskPaths,
        st: &ReplicaState,
        create: bool,
    ) -> Result<Box<dyn ReplicaTarget>> {
        let path = p.dir.join(&st.replica_file);
        open_target(
            &path,
            st.format,
            st.size,
            st.id_bytes(),
            st.vhd_time,
            create,
        )
        .map_err(|e| self.io(&p.ctx, "opening the replica", &path, e))
    }

    // ---------------------------------------------------------------
    // Initial replication

    /// Start (or resume) the initial copy of a disk of VM `vm`. Returns the
    /// offset to resume from: 0 for a new disk, the durable progress of an
    /// interrupted copy of the same cut and size. On a disk that is already
    /// replicated this starts a full re-copy: its history is dropped, and
    /// so is every recovery point that includes the disk (the others stay:
    /// see [`PointsDropped`], reported in the answer).
    pub fn begin_initial(&self, vm: &str, info: &DiskInfo) -> Result<InitialState> {
        validate_name("vm", vm)?;
        validate_name("disk", &info.name)?;
        let (format, replica_file) = ReplicaFormat::for_source(&info.name);
        validate_name("replica file", &replica_file)?;
        self.check_replicating(vm)?;
        let p = self.disk(vm, &info.disk_id, true)?;
        // VM lock (points.json), then the disk's (the order of commit_point).
        let vmd = self.vm_dir(vm, false)?;
        let _vg = self.store.lock(&vmd);
        let mut rt = self.store.lock(&p.dir);
        if !self.store.live_readers(&p.dir).is_empty() {
            return Err(StoreError::Busy {
                ctx: p.ctx.clone(),
                what: "a recovery point of this disk is exposed (test failover): a full copy would end its history; it waits until `vdrep failover NAME --cleanup` removes the view".into(),
            });
        }
        rt.initial = None;
        let old = self.read_state(&p)?;
        if let Some(st) = &old {
            if st.name != info.name {
                return Err(StoreError::IdentityMismatch {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "disk {} is replicated here as {:?}, the sender now calls it {:?}; use a new disk id or remove the old replica",
                        st.disk_id, st.name, info.name
                    ),
                });
            }
            if let Some(off) = st.initial_offset {
                if st.size == info.size && st.initial_cycle == Some(info.cycle) {
                    let off = off.min(info.size);
                    return Ok(InitialState {
                        resume_offset: off,
                        dropped: None,
                    });
                }
            }
        }
        let resync = matches!(&old, Some(st) if st.cycle.is_some());
        // The points that include this disk cannot be rebuilt once the copy
        // starts (or already could not: its replica is gone).
        let idh = hex(&info.disk_id);
        let mut pf = self.read_points(vm)?;
        let (gone, kept): (Vec<Point>, Vec<Point>) = std::mem::take(&mut pf.points)
            .into_iter()
            .partition(|pt| pt.disks.contains(&idh));
        pf.points = kept;
        let why = match old.as_ref().and_then(|st| st.cycle) {
            Some(replica_cycle) => DropReason::ReCopy { replica_cycle },
            None => DropReason::ReplicaLost,
        };
        let dropped = (!gone.is_empty()).then(|| PointsDropped {
            vm: vm.to_string(),
            disk_id: idh.clone(),
            disk: info.name.clone(),
            cycles: gone.iter().map(|pt| pt.cycle).collect(),
            why,
        });
        let st = ReplicaState {
            initial_offset: Some(0),
            initial_cycle: Some(info.cycle),
            ..ReplicaState::replacing(
                old.as_ref(),
                &info.disk_id,
                &info.name,
                &replica_file,
                format,
                info.size,
                info.block_size,
            )
        };
        if dropped.is_some() {
            self.write_points(&p.ctx, &vmd, &mut pf)?;
            let cycles: Vec<u64> = pf.points.iter().map(|pt| pt.cycle).collect();
            self.drop_definitions(&vmd, &cycles);
        }
        if resync {
            // History cannot chain through a full re-copy.
            for f in list_dir(&p.undo) {
                let _ = std::fs::remove_file(p.undo.join(f));
            }
            for f in list_dir(&p.incoming) {
                let _ = std::fs::remove_file(p.incoming.join(f));
            }
        }
        // The replica's content is rewritten from 0; fix its size first.
        let mut t = self.open_replica(&p, &st, true)?;
        t.set_len(info.size).and_then(|()| t.flush()).map_err(|e| {
            self.io(
                &p.ctx,
                "creating the replica",
                &p.dir.join(&replica_file),
                e,
            )
        })?;
        self.write_state(&p, &st)?;
        Ok(InitialState {
            resume_offset: 0,
            dropped,
        })
    }

    /// Write one piece of the initial copy at `offset`. Pieces should come
    /// in ascending order; a gap before `offset` is zeroed. Progress is made
    /// durable every [`INITIAL_SYNC_EVERY`] bytes.
    pub fn write_initial(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        offset: u64,
        data: InitialData<'_>,
    ) -> Result<()> {
        let (p, mut rt, st) = self.lock_disk(vm, disk_id)?;
        let Some(durable) = st.initial_offset else {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: "no initial copy is in progress for this disk: call begin_initial first"
                    .into(),
            });
        };
        if rt.initial.is_none() {
            rt.initial = Some(InitialSession {
                target: self.open_replica(&p, &st, false)?,
                progress: durable,
                unsynced: 0,
                unstarted: 0,
            });
        }
        let rpath = p.dir.join(&st.replica_file);
        let Some(s) = rt.initial.as_mut() else {
            return Ok(());
        };
        let len = match data {
            InitialData::Data(d) => d.len() as u64,
            InitialData::Zeroes(n) => n,
        };
        let end = offset.saturating_add(len);
        if end > st.size {
            return Err(StoreError::IdentityMismatch {
                ctx: p.ctx.clone(),
                what: format!(
                    "initial data at offset {offset} ({len} bytes) runs past the disk size {}: restart the initial copy with the right size",
                    st.size
                ),
            });
        }
        let res = (|| {
            if offset > s.progress {
                s.target.write_zeroes(s.progress, offset - s.progress)?;
            }
            match data {
                InitialData::Data(d) => s.target.write_bulk(d, offset),
                InitialData::Zeroes(n) => s.target.write_zeroes(offset, n),
            }
        })();
        if let Err(e) = res {
            rt.initial = None;
            return Err(self.io(&p.ctx, "writing the initial copy", &rpath, e));
        }
        if end > s.progress {
            s.unsynced += end - s.progress;
            s.unstarted += end - s.progress;
            s.progress = end;
        }
        if s.unstarted >= INITIAL_WRITEBACK_EVERY
            && s.unsynced < INITIAL_SYNC_EVERY
            && initial_writeback()
        {
            s.unstarted = 0;
            // Only a head start: a failure shows in the fsync that follows.
            if let Err(e) = s.target.start_writeback() {
                tracing::debug!("starting the writeback of {}: {e}", rpath.display());
            }
        }
        if s.unsynced >= INITIAL_SYNC_EVERY {
            let progress = s.progress;
            if let Err(e) = s.target.flush() {
                rt.initial = None;
                return Err(self.io(&p.ctx, "syncing the initial copy", &rpath, e));
            }
            s.unsynced = 0;
            s.unstarted = 0;
            let mut st = st;
            st.initial_offset = Some(progress);
            self.write_state(&p, &st)?;
            self.store.step("initial-progress");
        }
        Ok(())
    }

    /// Move an interrupted initial copy to a newer cut: the sender resumes
    /// at the durable offset with a copy taken at `new_cycle` that also
    /// carries every block below the offset that changed since the old cut,
    /// so the finished replica is the disk as of `new_cycle`. Returns the
    /// durable offset the copy continues from.
    pub fn rebase_initial(&self, vm: &str, disk_id: &[u8; 16], new_cycle: u64) -> Result<u64> {
        let (p, mut rt, mut st) = self.lock_disk(vm, disk_id)?;
        let Some(off) = st.initial_offset else {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: "no initial copy is in progress for this disk: nothing to resume".into(),
            });
        };
        rt.initial = None;
        st.initial_cycle = Some(new_cycle);
        self.write_state(&p, &st)?;
        Ok(off)
    }

    /// End the initial copy: the replica is the disk as of cut `cycle`
    /// (taken at `cut_unix_ns`, 0 if unknown). Bytes not written since the
    /// copy began (a tail of holes) are zeroed. Idempotent.
    pub fn finish_initial(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        cycle: u64,
        cut_unix_ns: u64,
    ) -> Result<()> {
        let (p, mut rt, mut st) = self.lock_disk(vm, disk_id)?;
        let Some(durable) = st.initial_offset else {
            if st.cycle == Some(cycle) {
                return Ok(());
            }
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: format!(
                    "no initial copy is in progress (the replica is at cycle {:?}): cannot finish one at cycle {cycle}",
                    st.cycle
                ),
            });
        };
        if st.initial_cycle.is_some_and(|c| c != cycle) {
            return Err(StoreError::IdentityMismatch {
                ctx: p.ctx.clone(),
                what: format!(
                    "the initial copy was started as of cycle {:?} but is finished as cycle {cycle}: restart it (begin_initial) with the cycle it is read at",
                    st.initial_cycle
                ),
            });
        }
        let (mut target, progress) = match rt.initial.take() {
            Some(s) => (s.target, s.progress),
            None => (self.open_replica(&p, &st, false)?, durable),
        };
        let rpath = p.dir.join(&st.replica_file);
        let res = (|| {
            if progress < st.size {
                target.write_zeroes(progress, st.size - progress)?;
            }
            target.set_len(st.size)?;
            target.flush()
        })();
        res.map_err(|e| self.io(&p.ctx, "finishing the initial copy", &rpath, e))?;
        st.initial_offset = None;
        st.initial_cycle = None;
        st.cycle = Some(cycle);
        st.cycle_time_ns = cut_unix_ns;
        st.applying = None;
        self.write_state(&p, &st)?;
        // Logs up to this cycle are covered by the copy.
        for (c, name) in self.incoming_logs(&p) {
            if c <= cycle {
                let _ = std::fs::remove_file(p.incoming.join(name));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------
    // Delta replication

    /// `(cycle, file name)` of the durable logs in `incoming/`, ascending.
    fn incoming_logs(&self, p: &DiskPaths) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = list_dir(&p.incoming)
            .into_iter()
            .filter_map(|n| {
                let c = n.strip_suffix(".hrl")?.parse().ok()?;
                Some((c, n))
            })
            .collect();
        v.sort();
        v
    }

    /// `(base, cycle, file name)` of the undo records, ascending by cycle.
    fn undo_records(&self, p: &DiskPaths) -> Vec<(u64, u64, String)> {
        let mut v: Vec<(u64, u64, String)> = list_dir(&p.undo)
            .into_iter()
            .filter_map(|n| {
                let (b, c) = undo::parse_undo_name(&n)?;
                Some((b, c, n))
            })
            .collect();
        v.sort_by_key(|x| (x.1, x.0));
        v
    }

    /// Receive a log for disk `disk_id` of `vm` from `src` and make it
    /// durable in `incoming/` (streamed to a temp file and verified
    /// completely on the way, fsynced, renamed, directory fsynced). A log
    /// the replica already holds is recognised from its header and
    /// acknowledged without being stored (the rest of `src` is not read).
    pub fn store_log<R: Read>(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        mut src: R,
    ) -> Result<StoreOutcome> {
        let p = self.disk(vm, disk_id, false)?;
        self.check_replicating(vm)?;
        let rlabel = p.incoming.join("<received>");
        // Header first: it says which cycle this is.
        let mut head = Vec::new();
        let mut want = format::HEADER_FIXED_LEN;
        let header: HrlHeader = loop {
            let have = head.len();
            head.resize(want, 0);
            if let Err(e) = src.read_exact(&mut head[have..]) {
                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    StoreError::CorruptLog {
                        ctx: p.ctx.clone(),
                        cycle: 0,
                        source: crate::hrl::HrlError::Corrupt {
                            path: rlabel,
                            offset: have as u64,
                            what: "the log ends inside its header".into(),
                        },
                    }
                } else {
                    self.io(&p.ctx, "receiving a log", &rlabel, e)
                });
            }
            match format::parse_header(&head) {
                Ok((h, _)) => break h,
                Err(ParseError::Short { need }) if need > head.len() => want = need,
                Err(ParseError::Short { .. }) => unreachable_short(&p.ctx, &rlabel)?,
                Err(ParseError::Bad { at, what }) => {
                    return Err(StoreError::CorruptLog {
                        ctx: p.ctx.clone(),
                        cycle: 0,
                        source: crate::hrl::HrlError::Corrupt {
                            path: rlabel,
                            offset: at as u64,
                            what,
                        },
                    })
                }
            }
        };
        let cycle = header.cycle;
        if header.disk_id != *disk_id {
            return Err(StoreError::IdentityMismatch {
                ctx: p.ctx.clone(),
                what: format!(
                    "the log for cycle {cycle} is for disk {} ({}), not this disk: the sender mixed up its disks",
                    hex(&header.disk_id),
                    header.disk_name
                ),
            });
        }
        if let Some(done) = self.check_log_fits(&p, &header)? {
            return Ok(done);
        }
        // Stream the rest to a temp file (no lock held: may take long).
        let n = self.store.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = p
            .incoming
            .join(format!("{cycle}.{}-{n}.hrl.tmp", std::process::id()));
        let fin = p.log(cycle);
        let res = (|| -> Result<u64> {
            // An applied log's file if one is spare (truncated on open):
            // no inode allocated per cycle ([`recycle`]).
            recycle::take(&p.incoming, &tmp);
            let mut f =
                create_nofollow(&tmp).map_err(|e| self.io(&p.ctx, "storing a log", &tmp, e))?;
            f.write_all(&head)
                .map_err(|e| self.io(&p.ctx, "storing a log", &tmp, e))?;
            // Checked as it arrives (every record's checksum, order and
            // bounds, the whole-log checksum, the counts, the seal, nothing
            // after it), from the very bytes written to the temp file: no
            // read-back. A bad or truncated log is never renamed into place.
            let mut tee = Tee {
                src: &mut src,
                file: &mut f,
                bytes: head.len() as u64,
                read_err: None,
                write_err: None,
            };
            let mut hints = self.preimage_hints(&p, &header);
            let checked = HrlReader::streaming(
                std::io::Read::chain(&head[..], BufReader::with_capacity(256 << 10, &mut tee)),
                &tmp,
            )
            .and_then(|mut r| {
                while let Some(rec) = r.next_record()? {
                    hints.note(rec.offset, rec.length);
                }
                r.finish()
            });
            if let Some(e) = tee.read_err.take() {
                return Err(self.io(&p.ctx, "receiving a log", &tmp, e));
            }
            if let Some(e) = tee.write_err.take() {
                return Err(self.io(&p.ctx, "storing a log", &tmp, e));
            }
            checked.map_err(|e| hrl_err(&p.ctx, &self.store.root, "verifying a log", cycle, e))?;
            let len = tee.bytes;
            // fdatasync: the bytes and the size (all that reading needs).
            let t_sync = std::time::Instant::now();
            self.store
                .sync
                .commit
                .sync_data(&f)
                .map_err(|e| self.io(&p.ctx, "storing a log", &tmp, e))?;
            phase::done("recv_store_log_sync", p.ctx.vm(), t_sync);
            self.store.step("log-tmp-synced");
            Ok(len)
        })();
        let len = match res {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // Stores of this disk's logs go one at a time (`incoming/`'s own
        // lock), but not behind the disk's lock: an apply holds that for
        // its whole length, and the next cycle's log need not wait for it
        // (the receiver stores a disk's next log while the previous one is
        // applied). Nothing else creates files in `incoming/`, and an apply
        // only removes the log it applied, at or below the replica's cycle.
        // A log replacing one already here takes the disk's lock too: it
        // must not change under an apply that reads it.
        let _in = self.store.lock(&p.incoming);
        let _g = fin.exists().then(|| self.store.lock(&p.dir));
        // Re-check: an apply may have moved on meanwhile (`state.json` is
        // replaced whole, so it reads consistent without the disk's lock).
        let again = self.check_log_fits(&p, &header);
        let done = match again {
            Ok(Some(done)) => Some(done),
            Ok(None) => None,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Some(done) = done {
            let _ = std::fs::remove_file(&tmp);
            return Ok(done);
        }
        // A resend of a log already here with the same trailer (the hash
        // of its whole content) is the same log: kept, unless the stored
        // copy no longer verifies (damaged at rest: its apply fails with
        // `CorruptLog`, and only this resend can heal it). The stored copy
        // is read whole for that, on a resend only.
        let same = fin.exists() && same_trailer(&fin, &tmp).unwrap_or(false);
        let damaged = same && crate::hrl::verify(&fin).is_err();
        if damaged {
            tracing::warn!(vm, disk = %hex(disk_id), cycle,
                "the stored log of cycle {cycle} is damaged; replacing it with the copy the sender sent again");
        } else if fin.exists() {
            if same {
                let _ = std::fs::remove_file(&tmp);
                return Ok(StoreOutcome::AlreadyStored { cycle });
            }
            // A point may be committed on a durable log before it is
            // applied: that log is then part of the point and stays.
            let idh = hex(disk_id);
            if self
                .read_points(vm)?
                .points
                .iter()
                .any(|pt| pt.cycle >= cycle && pt.disks.contains(&idh))
            {
                let _ = std::fs::remove_file(&tmp);
                return Err(StoreError::IdentityMismatch {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "a different log for cycle {cycle} is already part of a committed recovery point; the sender's log changed after it was sent: resync the disk"
                    ),
                });
            }
            let st = self.read_state(&p)?;
            if st.and_then(|s| s.applying) == Some(cycle) {
                let _ = std::fs::remove_file(&tmp);
                return Err(StoreError::IdentityMismatch {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "a different log for cycle {cycle} is being applied; the sender's log changed after it was sent: resync the disk"
                    ),
                });
            }
        }
        if let Err(e) = std::fs::rename(&tmp, &fin) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io(&p.ctx, "storing a log", &fin, e));
        }
        self.store.step("log-renamed");
        self.store
            .sync
            .commit
            .sync_dir(&p.incoming)
            .map_err(|e| self.io(&p.ctx, "storing a log", &p.incoming, e))?;
        Ok(StoreOutcome::Stored {
            cycle,
            base_cycle: header.base_cycle,
            bytes: len,
        })
    }

    /// Hints for the replica's pre-images of the log with `header`, given
    /// as it arrives ([`undo::PreimageHints`]). The replica is opened only
    /// for a long log; none when it cannot be (not copied yet, or any
    /// error: hints are optional).
    fn preimage_hints<'a>(
        &'a self,
        p: &'a DiskPaths,
        header: &HrlHeader,
    ) -> undo::PreimageHints<'a> {
        undo::PreimageHints::new(header.base_size, move || {
            let st = self.read_state(p).ok()??;
            if st.initial_offset.is_some() || st.cycle.is_none() {
                return None;
            }
            self.open_replica(p, &st, false).ok()
        })
    }

    /// Decide from the state whether a log with `h` is a resend (returns the
    /// outcome), storable (None) or out of order (error).
    fn check_log_fits(&self, p: &DiskPaths, h: &HrlHeader) -> Result<Option<StoreOutcome>> {
        let st = self.state_or_unknown(p)?;
        let Some(rc) = st.cycle else {
            return Ok(None); // initial copy running: keep the log for later
        };
        if st.applying == Some(h.cycle) {
            return Ok(Some(StoreOutcome::AlreadyStored { cycle: h.cycle }));
        }
        if h.cycle <= rc {
            return Ok(Some(StoreOutcome::AlreadyApplied {
                cycle: h.cycle,
                replica_cycle: rc,
            }));
        }
        if let Some(why) = &st.needs_resync {
            if st.resync_cycle != Some(h.cycle) {
                return Err(StoreError::NeedsResync {
                    ctx: p.ctx.clone(),
                    why: why.clone(),
                });
            }
        }
        if h.base_cycle < rc {
            return Err(StoreError::OutOfOrder {
                ctx: p.ctx.clone(),
                cycle: h.cycle,
                base_cycle: h.base_cycle,
                replica_cycle: rc,
                applying: st.applying,
                what: "the log starts before the replica's cycle and ends after it: the chains diverged; resync the disk".into(),
            });
        }
        Ok(None)
    }

    /// Apply the durable log of `cycle` to the replica, at most once and
    /// crash-atomically (see the module documentation). A cycle the replica
    /// already has is acknowledged as [`ApplyOutcome::AlreadyApplied`]. On
    /// a failure while writing the replica (disk full…) the replica is
    /// rolled back to its previous cycle and the error says whether to retry.
    pub fn apply(&self, vm: &str, disk_id: &[u8; 16], cycle: u64) -> Result<ApplyOutcome> {
        let p = self.disk(vm, disk_id, false)?;
        let _g = self.store.lock(&p.dir);
        self.check_replicating(vm)?;
        self.apply_locked(&p, cycle)
    }

    /// Apply the durable logs of a disk that chain onto its replica, in
    /// order, up to cycle `upto` (all of them if `None`); returns the
    /// replica's cycle afterwards. A recovery point may be committed once
    /// every disk's log is durable ([`Site::commit_point`]), before it is
    /// applied; whatever reads the replica as of a point or hands it over
    /// drains first. Idempotent; stops quietly at a log that does not chain
    /// on (a gap: nothing past it can be applied) and fails on a log that
    /// chains on but cannot be applied (damaged at rest, the disk full).
    pub fn drain(&self, vm: &str, disk_id: &[u8; 16], upto: Option<u64>) -> Result<u64> {
        let p = self.disk(vm, disk_id, false)?;
        let _g = self.store.lock(&p.dir);
        self.check_replicating(vm)?;
        self.drain_locked(&p, upto, &mut |_| {})
    }

    /// [`Site::drain`] with the disk's lock held; `applied` hears each
    /// cycle applied (also when a later one fails).
    fn drain_locked(
        &self,
        p: &DiskPaths,
        upto: Option<u64>,
        applied: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let st = self.state_or_unknown(p)?;
        let Some(mut rc) = st.cycle.filter(|_| st.initial_offset.is_none()) else {
            return Ok(st.cycle.unwrap_or(0));
        };
        if let Some(a) = st.applying {
            // Finish (or roll back) the interrupted apply first.
            let _ = self.apply_locked(p, a)?;
            rc = self.state_or_unknown(p)?.cycle.unwrap_or(rc);
        }
        loop {
            let next = self
                .incoming_logs(p)
                .into_iter()
                .find(|(c, _)| *c > rc && upto.is_none_or(|u| *c <= u));
            let Some((c, _)) = next else { break };
            match self.apply_locked(p, c) {
                Ok(_) => {
                    applied(c);
                    rc = c;
                }
                // The next log is not based on the replica's cycle: a gap.
                Err(StoreError::OutOfOrder { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(rc)
    }

    fn apply_locked(&self, p: &DiskPaths, cycle: u64) -> Result<ApplyOutcome> {
        let mut st = self.state_or_unknown(p)?;
        let Some(rc) = st.cycle.filter(|_| st.initial_offset.is_none()) else {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: format!(
                    "cannot apply cycle {cycle}: the initial copy of this disk has not finished"
                ),
            });
        };
        if let Some(a) = st.applying {
            let out = self.roll_forward(p, &mut st, a)?;
            if a == cycle {
                return Ok(out);
            }
        }
        let rc = st.cycle.unwrap_or(rc);
        if cycle <= rc {
            recycle::give(&p.incoming, &p.log(cycle));
            return Ok(ApplyOutcome::AlreadyApplied {
                cycle,
                replica_cycle: rc,
            });
        }
        let logp = p.log(cycle);
        let log = match open_nofollow(&logp) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "no durable log for cycle {cycle} (the replica is at cycle {rc}): send (store) the log before applying it"
                    ),
                })
            }
            Err(e) => return Err(self.io(&p.ctx, "opening a log", &logp, e)),
        };
        // Only the header here: the log was checked completely as it was
        // stored, and the undo record's pass below (`undo::write_undo` reads
        // every record up to the seal) checks it again before the replica is
        // touched; a bad log fails there and is never applied
        // (`apply_rejects_a_log_damaged_after_it_was_stored`).
        let header = self.log_header(p, &log, &logp, cycle)?;
        let out_of_order = |what: String| StoreError::OutOfOrder {
            ctx: p.ctx.clone(),
            cycle,
            base_cycle: header.base_cycle,
            replica_cycle: rc,
            applying: None,
            what,
        };
        if header.base_cycle != rc {
            return Err(out_of_order(format!(
                "logs must be applied in order: apply cycle(s) after {rc} first, or resync the disk if they are lost"
            )));
        }
        if header.base_size != st.size {
            return Err(out_of_order(format!(
                "the log starts from a disk of {} bytes but the replica is {} bytes: resync the disk",
                header.base_size, st.size
            )));
        }
        // 1. Undo record (pre-images) and the state marked `applying`,
        //    both durable before anything changes: written, synced in one
        //    pass, renamed, their folders synced in one pass.
        let target = self.open_replica(p, &st, false)?;
        let t_undo = std::time::Instant::now();
        let undop = p.undo.join(undo::undo_name(rc, cycle));
        let undo_err = |what: &str, e| hrl_err(&p.ctx, &self.store.root, what, cycle, e);
        let sealed = undo::prepare_undo(&undop, &log, &logp, target.as_ref(), st.cycle_time_ns)
            .map_err(|e| undo_err("saving pre-images (undo record)", e))?;
        phase::done("recv_apply_undo", p.ctx.vm(), t_undo);
        let t_mark = std::time::Instant::now();
        st.applying = Some(cycle);
        let staged = self.stage_json(&p.ctx, &p.dir, STATE, &st)?;
        self.store
            .sync
            .apply
            .sync_files(&[(sealed.file(), false), (&staged.file, false)])
            .map_err(|e| self.io(&p.ctx, "saving pre-images (undo record)", &undop, e))?;
        let undo_bytes = sealed
            .publish()
            .map_err(|e| undo_err("saving pre-images (undo record)", e))?
            .file_bytes;
        self.store.step("undo-written");
        // Open point readers must not see the replica change under them:
        // give each the new undo layer (newest last: older layers win)
        // before anything is written. Each push waits for reads in progress.
        let readers = self.store.live_readers(&p.dir);
        if !readers.is_empty() {
            let layer = match UndoLayer::open(&undop) {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    let _ = std::fs::remove_file(&undop);
                    return Err(undo_err("indexing the undo record for exposed points", e));
                }
            };
            for r in &readers {
                r.push(layer.clone());
            }
        }
        // 2. Mark applying.
        if let Err(e) = self.publish_json(&p.ctx, staged).and_then(|()| {
            self.store
                .sync
                .apply
                .sync_dirs(&[&p.undo, &p.dir])
                .map_err(|e| self.io(&p.ctx, "marking the apply", &p.dir, e))
        }) {
            let _ = std::fs::remove_file(&undop);
            return Err(e);
        }
        self.store.step("state-applying");
        phase::done("recv_apply_mark", p.ctx.vm(), t_mark);
        // 3. Write; on failure roll back from the undo record.
        let mut target = target;
        let t_write = std::time::Instant::now();
        match self.write_records(p, &log, &logp, &header, target.as_mut()) {
            Ok(bytes) => {
                phase::done("recv_apply_write", p.ctx.vm(), t_write);
                let t_fin = std::time::Instant::now();
                self.finish_apply(p, &mut st, &header, target.as_mut())?;
                phase::done("recv_apply_finish", p.ctx.vm(), t_fin);
                Ok(ApplyOutcome::Applied {
                    cycle,
                    bytes,
                    undo_bytes,
                    rolled_forward: false,
                })
            }
            Err(e) => {
                let restored = undo::apply_undo(&undop, target.as_mut()).is_ok();
                if restored {
                    st.applying = None;
                    if self.write_state(p, &st).is_ok() {
                        let _ = std::fs::remove_file(&undop);
                    }
                }
                Err(e)
            }
        }
    }

    /// A reader of the log of `cycle` (`log`, at `logp`) from its start;
    /// `what` names the step in a parse error.
    fn read_log<'f>(
        &self,
        p: &DiskPaths,
        log: &'f File,
        logp: &Path,
        cycle: u64,
        what: &str,
    ) -> Result<HrlReader<BufReader<&'f File>>> {
        let io = |e| self.io(&p.ctx, "reading a log", logp, e);
        let len = log.metadata().map_err(io)?.len();
        let mut lf = log;
        lf.seek(SeekFrom::Start(0)).map_err(io)?;
        HrlReader::new(BufReader::with_capacity(256 << 10, lf), len, logp)
            .map_err(|e| hrl_err(&p.ctx, &self.store.root, what, cycle, e))
    }

    fn verify_log(&self, p: &DiskPaths, log: &File, logp: &Path, cycle: u64) -> Result<HrlHeader> {
        let r = self.read_log(p, log, logp, cycle, "verifying a log")?;
        let h = r.header().clone();
        r.finish()
            .map_err(|e| hrl_err(&p.ctx, &self.store.root, "verifying a log", cycle, e))?;
        self.check_log_identity(p, logp, cycle, h)
    }

    /// The header of the log of `cycle`, checked to be this disk's log of
    /// `cycle` (the records are not read).
    fn log_header(&self, p: &DiskPaths, log: &File, logp: &Path, cycle: u64) -> Result<HrlHeader> {
        let r = self.read_log(p, log, logp, cycle, "verifying a log")?;
        let h = r.header().clone();
        self.check_log_identity(p, logp, cycle, h)
    }

    fn check_log_identity(
        &self,
        p: &DiskPaths,
        logp: &Path,
        cycle: u64,
        h: HrlHeader,
    ) -> Result<HrlHeader> {
        let want = parse_hex_id(p.ctx.disk()).unwrap_or_default();
        if h.disk_id != want || h.cycle != cycle {
            return Err(StoreError::IdentityMismatch {
                ctx: p.ctx.clone(),
                what: format!(
                    "{} holds cycle {} of disk {}: it is not this disk's log for cycle {cycle}; delete it and resend",
                    logp.display(),
                    h.cycle,
                    hex(&h.disk_id)
                ),
            });
        }
        Ok(h)
    }

    /// Set the length, write every record, fsync. Returns disk bytes written.
    fn write_records(
        &self,
        p: &DiskPaths,
        log: &File,
        logp: &Path,
        h: &HrlHeader,
        target: &mut dyn ReplicaTarget,
    ) -> Result<u64> {
        let rpath = p.dir.join("<replica>");
        let cycle = h.cycle;
        let tio = |e| {
            self.io(
                &p.ctx,
                &format!("applying cycle {cycle} to the replica"),
                &rpath,
                e,
            )
        };
        target.set_len(h.disk_size).map_err(tio)?;
        let herr = |e| hrl_err(&p.ctx, &self.store.root, "reading a log", cycle, e);
        let mut r = self.read_log(p, log, logp, cycle, "reading a log")?;
        let mut bytes = 0u64;
        let mut n = 0u64;
        while let Some(rec) = r.next_record().map_err(herr)? {
            match rec.data {
                Some(d) => target.write_at(d, rec.offset).map_err(tio)?,
                None => target
                    .write_zeroes(rec.offset, u64::from(rec.length))
                    .map_err(tio)?,
            }
            bytes += u64::from(rec.length);
            n += 1;
            if n == 2 {
                self.store.step("replica-half");
            }
        }
        Ok(bytes)
    }

    /// The replica written by [`write_records`](Self::write_records) and
    /// the state saying so, durable in one pass (the replica and the new
    /// state's temp file synced together, then the rename, then the
    /// folder), then the applied log removed.
    fn finish_apply(
        &self,
        p: &DiskPaths,
        st: &mut ReplicaState,
        h: &HrlHeader,
        target: &mut dyn ReplicaTarget,
    ) -> Result<()> {
        st.cycle = Some(h.cycle);
        st.size = h.disk_size;
        st.cycle_time_ns = h.cut_unix_ns;
        st.applying = None;
        if st.resync_cycle == Some(h.cycle) {
            st.resync_cycle = None;
            st.needs_resync = None;
        }
        let staged = self.stage_json(&p.ctx, &p.dir, STATE, &*st)?;
        let rpath = p.dir.join("<replica>");
        let synced = target.prepare_flush().and_then(|replica| {
            self.store
                .sync
                .apply
                .sync_files(&[(replica, true), (&staged.file, false)])
        });
        synced.map_err(|e| {
            self.io(
                &p.ctx,
                &format!("applying cycle {} to the replica", h.cycle),
                &rpath,
                e,
            )
        })?;
        self.store.step("replica-synced");
        self.publish_json(&p.ctx, staged)?;
        self.store
            .sync
            .apply
            .sync_dir(&p.dir)
            .map_err(|e| self.io(&p.ctx, "recording the applied cycle", &p.dir, e))?;
        self.store.step("state-applied");
        // No fsync of `incoming/` for the removal: a log that comes back
        // after a crash is for a cycle the durable state already has, and
        // is dropped as such (by `recover_disk`, or by the next apply of
        // it); the next stored log's fsync of the directory makes the
        // removal durable anyway. The file is kept as a spare for the
        // next stored log ([`recycle`]).
        recycle::give(&p.incoming, &p.log(h.cycle));
        Ok(())
    }

    /// Complete an interrupted apply of `cycle` (state says `applying`).
    fn roll_forward(
        &self,
        p: &DiskPaths,
        st: &mut ReplicaState,
        cycle: u64,
    ) -> Result<ApplyOutcome> {
        let base = st.cycle.unwrap_or(0);
        let undop = p.undo.join(undo::undo_name(base, cycle));
        let logp = p.log(cycle);
        let mut target = self.open_replica(p, st, false)?;
        match open_nofollow(&logp) {
            Ok(log) => {
                let header = self.verify_log(p, &log, &logp, cycle)?;
                let bytes = self.write_records(p, &log, &logp, &header, target.as_mut())?;
                self.finish_apply(p, st, &header, target.as_mut())?;
                let undo_bytes = std::fs::metadata(&undop).map(|m| m.len()).unwrap_or(0);
                Ok(ApplyOutcome::Applied {
                    cycle,
                    bytes,
                    undo_bytes,
                    rolled_forward: true,
                })
            }
            Err(_) => {
                // No log to roll forward with: roll back to the base.
                undo::apply_undo(&undop, target.as_mut()).map_err(|e| {
                    hrl_err(
                        &p.ctx,
                        &self.store.root,
                        "rolling back an interrupted apply",
                        cycle,
                        e,
                    )
                })?;
                st.applying = None;
                self.write_state(p, st)?;
                let _ = std::fs::remove_file(&undop);
                Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "the log of interrupted cycle {cycle} was lost; the replica was rolled back to cycle {base}: resend cycle {cycle}"
                    ),
                })
            }
        }
    }

    fn recover_disk(&self, vm: &str, id: [u8; 16], rep: &mut RecoveryReport) -> Result<()> {
        let p = self.disk(vm, &id, false)?;
        let mut rt = self.store.lock(&p.dir);
        rt.initial = None;
        let what = format!("site {} vm {} disk {}", self.name, vm, hex(&id));
        for d in [&p.dir, &p.incoming, &p.undo] {
            for f in list_dir(d) {
                if f.ends_with(".tmp") {
                    let _ = std::fs::remove_file(d.join(&f));
                    rep.actions.push(format!("{what}: removed temp file {f}"));
                }
            }
        }
        let Some(mut st) = self.read_state(&p)? else {
            return Ok(());
        };
        let Some(mut rc) = st.cycle.filter(|_| st.initial_offset.is_none()) else {
            return Ok(()); // initial copy: resumes from its durable offset
        };
        if let Some(a) = st.applying {
            self.roll_forward(&p, &mut st, a)?;
            rep.actions.push(format!(
                "{what}: rolled forward the interrupted apply of cycle {a}"
            ));
            rc = st.cycle.unwrap_or(rc);
        }
        for (_, c, n) in self.undo_records(&p) {
            if c > rc {
                let _ = std::fs::remove_file(p.undo.join(&n));
                rep.actions
                    .push(format!("{what}: removed orphan undo record {n}"));
            }
        }
        for (c, n) in self.incoming_logs(&p) {
            if c <= rc {
                let _ = std::fs::remove_file(p.incoming.join(&n));
                rep.actions.push(format!("{what}: removed applied log {n}"));
            }
        }
        // Apply the durable logs that chain on.
        let mut applied = Vec::new();
        let drained = self.drain_locked(&p, None, &mut |c| applied.push(c));
        for c in applied {
            rep.actions
                .push(format!("{what}: applied durable log of cycle {c}"));
        }
        match drained {
            Err(e) => rep.errors.push(e.to_string()),
            Ok(rc) => {
                if let Some((c, _)) = self.incoming_logs(&p).into_iter().find(|(c, _)| *c > rc) {
                    rep.errors.push(format!(
                        "{what}: the durable log of cycle {c} does not chain onto the replica's cycle {rc}; it stays until the sender sends the cycles between, or the disk is resynced"
                    ));
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------
    // Resync

    /// Mark the replica of a disk as untrusted (`Some(reason)`) or trusted
    /// again (`None`). While marked, the receiver tells the sender so in
    /// the wire's `DiskState` and accepts only a resync's log (see
    /// [`Site::resync_prepared`]). For adopted replicas after an unplanned
    /// failover, damaged or out-of-order logs, or by hand.
    pub fn set_needs_resync(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        reason: Option<&str>,
    ) -> Result<()> {
        let (p, _g, mut st) = self.lock_disk(vm, disk_id)?;
        st.needs_resync = reason.map(str::to_string);
        st.resync_cycle = None;
        self.write_state(&p, &st)
    }

    /// The sender compared the whole disk against the replica at
    /// `replica_cycle`; the log of `cycle` carries every difference, and
    /// applying it makes the replica trusted again.
    pub fn resync_prepared(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        replica_cycle: u64,
        cycle: u64,
    ) -> Result<()> {
        let (p, _g, mut st) = self.lock_disk(vm, disk_id)?;
        self.check_replicating(vm)?;
        if st.cycle != Some(replica_cycle) || st.applying.is_some() {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: format!(
                    "the resync compared against cycle {replica_cycle} but the replica is at {:?}: compare again",
                    st.cycle
                ),
            });
        }
        if st.needs_resync.is_some() {
            st.resync_cycle = Some(cycle);
            self.write_state(&p, &st)?;
        }
        Ok(())
    }

    /// Digests ([`crate::resync::block_digest`]) of the replica's blocks
    /// in `runs` (`(offset, blocks)` of `block_size` bytes, ascending), at
    /// `replica_cycle`, which must be the replica's stable cycle. Blocks at
    /// or past the replica's end get [`crate::resync::MISSING`]; the last
    /// block may be short. Returns the replica's size and the digests.
    /// Hashes on every core; holds the disk's lock (no apply meanwhile).
    ///
    /// `cache` is kept by the caller for the whole compare: the disk's
    /// paths, its parsed state and the opened replica are reused as long
    /// as `state.json` holds the same bytes (re-read, under the disk's
    /// lock, on every call), and so is the read buffer (never zero-filled).
    /// Pieces that are holes of the replica file (`SEEK_DATA`) are not read.
    pub fn block_hashes(
        &self,
        vm: &str,
        disk_id: &[u8; 16],
        replica_cycle: u64,
        block_size: u32,
        runs: &[(u64, u32)],
        cache: &mut DigestCache,
    ) -> Result<(u64, Vec<u128>)> {
        let cache = cache.get::<DigestScratch>();
        let same_disk = cache
            .open
            .as_ref()
            .is_some_and(|c| c.site == self.name && c.vm == vm && c.disk_id == *disk_id);
        if !same_disk {
            cache.open = None;
        }
        let p = match cache.open.as_ref() {
            Some(c) => c.paths.clone(),
            None => self.disk(vm, disk_id, false)?,
        };
        let _g = self.store.lock(&p.dir);
        let raw = match open_nofollow(&p.state()).and_then(|mut f| {
            let mut v = Vec::with_capacity(4096);
            f.read_to_end(&mut v).map(|_| v)
        }) {
            Ok(b) => b,
            Err(_) => {
                // Let the ordinary reader say what is wrong.
                cache.open = None;
                self.state_or_unknown(&p)?;
                return Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: "the replica's state changed while it was read: restart the compare"
                        .into(),
                });
            }
        };
        if cache.open.as_ref().is_none_or(|c| c.state_bytes != raw) {
            cache.open = None;
            let st: ReplicaState = match serde_json::from_slice(&raw) {
                Ok(st) => st,
                Err(e) => {
                    return Err(StoreError::BadState {
                        path: p.state(),
                        what: e.to_string(),
                    })
                }
            };
            let stable = st.applying.is_none() && st.initial_offset.is_none();
            if !stable || st.cycle != Some(replica_cycle) {
                return Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "digests of cycle {replica_cycle} were asked for, but the replica is at {:?}{}: open the disk again and restart the compare",
                        st.cycle,
                        if stable { "" } else { " and not stable" }
                    ),
                });
            }
            let target = self.open_replica(&p, &st, false)?;
            cache.open = Some(OpenReplica {
                site: self.name.clone(),
                vm: vm.to_string(),
                disk_id: *disk_id,
                paths: p.clone(),
                state_bytes: raw,
                size: st.size,
                rpath: p.dir.join(&st.replica_file),
                target,
            });
        }
        let Some(open) = cache.open.as_ref() else {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: "the replica could not be opened: restart the compare".into(),
            });
        };
        let target = open.target.as_ref();
        let size = open.size;
        let bs = u64::from(block_size);
        let total: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        let mut out = Vec::with_capacity(total as usize);
        let buf = &mut cache.buf;
        let threads = crate::resync::hash_threads();
        // Read at most this much at once, whatever a run's length.
        let piece = (crate::resync::BATCH_BYTES / bs).max(1) * bs;
        for &(off, n) in runs {
            let end = off.saturating_add(u64::from(n) * bs);
            let mut at = off;
            while at < end {
                let stop = (at + piece).min(end);
                if at >= size {
                    out.extend(std::iter::repeat_n(
                        crate::resync::MISSING,
                        ((stop - at) / bs) as usize,
                    ));
                    at = stop;
                    continue;
                }
                let have_end = stop.min(size);
                let len = (have_end - at) as usize;
                if target.next_data(at).is_some_and(|d| d >= have_end) {
                    // A hole: every block reads as zeros.
                    let full = len / bs as usize;
                    out.extend(std::iter::repeat_n(
                        crate::resync::zero_digest(bs as usize),
                        full,
                    ));
                    if len % bs as usize != 0 {
                        out.push(crate::resync::zero_digest(len % bs as usize));
                    }
                } else if let Some(parts) = map_parts(target, at, len, bs, threads) {
                    // Hashed straight from the page cache (no copy), one
                    // part per thread.
                    let d =
                        crate::resync::digest_mapped(parts, block_size as usize).map_err(|e| {
                            self.io(&p.ctx, "reading the replica for a resync", &open.rpath, e)
                        })?;
                    out.extend(d);
                } else {
                    if buf.len() < len {
                        buf.resize(len, 0);
                    }
                    target.read_at(&mut buf[..len], at).map_err(|e| {
                        self.io(&p.ctx, "reading the replica for a resync", &open.rpath, e)
                    })?;
                    out.extend(crate::resync::digest_blocks(
                        &buf[..len],
                        block_size as usize,
                        threads,
                    ));
                }
                crate::resync::pad_missing(&mut out, have_end - at, stop - at, bs);
                at = stop;
            }
        }
        Ok((size, out))
    }

    /// The state of a disk (for status displays and tests).
    pub fn disk_state(&self, vm: &str, disk_id: &[u8; 16]) -> Result<ReplicaState> {
        let p = self.disk(vm, disk_id, false)?;
        self.state_or_unknown(&p)
    }

    /// Path of a disk's replica file (for tools and tests; read it only
    /// while no apply runs).
    pub fn replica_path(&self, vm: &str, disk_id: &[u8; 16]) -> Result<PathBuf> {
        let p = self.disk(vm, disk_id, false)?;
        let st = self.state_or_unknown(&p)?;
        Ok(p.dir.join(st.replica_file))
    }

    // ---------------------------------------------------------------
    // Recovery points

    /// Record a recovery point of `vm` at `cycle` over `disk_ids` if every
    /// one of them reached it. Returns `None` when some disk is still below
    /// `cycle` (call again once it got there). Idempotent.
    ///
    /// An apply of one of the disks that is under way (a log of a later
    /// cycle, of this connection or of one that just ended) is waited for
    /// (the disk's lock): the disk is then past `cycle` and its undo
    /// record leads back to it. Without the wait the point was refused
    /// while the session had seen every disk reach `cycle` (the point's
    /// commit raced the next cycle's apply), which cost a session.
    pub fn commit_point(
        &self,
        vm: &str,
        cycle: u64,
        disk_ids: &[[u8; 16]],
        consistency: Consistency,
    ) -> Result<Option<Point>> {
        let vmd = self.vm_dir(vm, false)?;
        let _g = self.store.lock(&vmd);
        self.check_replicating(vm)?;
        let mut time = 0;
        for id in disk_ids {
            let p = self.disk(vm, id, false)?;
            // Not under the disk's lock: an apply holds it for its whole
            // length, and a point whose logs are durable need not wait for
            // it. `state.json` is replaced whole, so it reads consistent.
            let st = self.state_or_unknown(&p)?;
            let Some(rc) = st.cycle.filter(|_| st.initial_offset.is_none()) else {
                return Ok(None);
            };
            if rc < cycle {
                // Not applied yet: committed if the durable logs chain from
                // the replica's cycle to `cycle`.
                match self.durable_chain(&p, &st, rc, cycle)? {
                    Some(t) => time = time.max(t),
                    None => return Ok(None),
                }
                continue;
            }
            time = time.max(self.reached_time(&p, &st, rc, cycle)?);
        }
        let vctx = self.ctx(vm, "");
        if let Some(pt) = self.find_point(&vctx, &vmd, cycle)? {
            return Ok(Some(pt));
        }
        let mut disks: Vec<String> = disk_ids.iter().map(|d| hex(d)).collect();
        disks.sort();
        let pt = Point {
            cycle,
            time_unix_ns: time,
            bytes: 0,
            consistency,
            disks,
        };
        self.store.step("point-before-commit");
        self.add_point(&vctx, &vmd, pt.clone())?;
        Ok(Some(pt))
    }

    /// The cut time of `cycle` for a disk whose replica reached it (state
    /// `st` at cycle `rc >= cycle`): at `cycle` itself (also while the next
    /// cycle is being applied: its undo record, published before the state
    /// said `applying`, keeps this cycle readable, and the apply's end, or
    /// its roll back, leaves it so), or past it with an undo record based
    /// on it.
    fn reached_time(&self, p: &DiskPaths, st: &ReplicaState, rc: u64, cycle: u64) -> Result<u64> {
        if rc == cycle {
            return Ok(st.cycle_time_ns);
        }
        let rec = self
            .undo_records(p)
            .into_iter()
            .find(|(b, _, _)| *b == cycle);
        let Some((_, _, n)) = rec else {
            return Err(StoreError::NoSuchPoint {
                ctx: p.ctx.clone(),
                cycle,
                what: format!("this disk went from an earlier cycle past {cycle} (replica at {rc}): no consistent point can be made there"),
            });
        };
        let l = UndoLayer::open(&p.undo.join(n))
            .map_err(|e| hrl_err(&p.ctx, &self.store.root, "reading history", cycle, e))?;
        Ok(l.header.cut_unix_ns)
    }

    /// The cut time of `cycle` if the disk's durable logs in `incoming/`
    /// chain from the replica's cycle `rc` (state `st`) to `cycle`: each
    /// one this disk's, based on the cycle and size the previous one left.
    /// `None` if they do not (a log still arriving, a gap). Read without the
    /// disk's lock, so an apply may finish meanwhile and remove the first
    /// log: the state is read again afterwards, and if it moved the check
    /// is made again from the new cycle. Every log was verified whole as
    /// it was stored; each is verified again before it is applied.
    fn durable_chain(
        &self,
        p: &DiskPaths,
        st: &ReplicaState,
        rc: u64,
        cycle: u64,
    ) -> Result<Option<u64>> {
        let (mut st, mut rc) = (st.clone(), rc);
        for _ in 0..8 {
            let found = self.chain_of_logs(p, &st, rc, cycle);
            let again = self.state_or_unknown(p)?;
            if again == st {
                return found;
            }
            let Some(c) = again.cycle.filter(|_| again.initial_offset.is_none()) else {
                return Ok(None);
            };
            if c >= cycle {
                // Applied meanwhile.
                return self.reached_time(p, &again, c, cycle).map(Some);
            }
            (st, rc) = (again, c);
        }
        Ok(None)
    }

    fn chain_of_logs(
        &self,
        p: &DiskPaths,
        st: &ReplicaState,
        rc: u64,
        cycle: u64,
    ) -> Result<Option<u64>> {
        let (mut at, mut size, mut time) = (rc, st.size, None);
        for (c, _) in self.incoming_logs(p) {
            if c <= rc || c > cycle {
                continue;
            }
            let logp = p.log(c);
            let Ok(log) = open_nofollow(&logp) else {
                return Ok(None);
            };
            let h = match self.log_header(p, &log, &logp, c) {
                Ok(h) => h,
                Err(StoreError::Io { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if h.base_cycle != at || h.base_size != size {
                return Ok(None);
            }
            (at, size, time) = (c, h.disk_size, Some(h.cut_unix_ns));
        }
        Ok(time.filter(|_| at == cycle))
    }

    /// Store `vm`'s domain definition as of the cut of `cycle`, durably,
    /// before its point is committed ([`Site::commit_point`]). The same
    /// text as the newest older definition is a hard link to it: an
    /// unchanged definition costs no space per point.
    pub fn save_definition(&self, vm: &str, cycle: u64, xml: &str) -> Result<()> {
        let vmd = self.vm_dir(vm, false)?;
        let ctx = self.ctx(vm, "");
        let dir = ensure_dir(&ctx, &self.store.root, &vmd, DEFINITIONS, true)?;
        let path = dir.join(format!("{cycle}.xml"));
        let tmp = dir.join(format!(".{cycle}.xml.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let prev = definition_cycles(&dir)
            .into_iter()
            .rev()
            .find(|&c| c < cycle)
            .map(|c| dir.join(format!("{c}.xml")));
        let same = prev
            .as_ref()
            .is_some_and(|p| std::fs::read(p).is_ok_and(|b| b == xml.as_bytes()));
        let res = (|| {
            match prev.filter(|_| same) {
                Some(p) => std::fs::hard_link(p, &tmp)?,
                None => {
                    let mut f = create_nofollow(&tmp)?;
                    f.write_all(xml.as_bytes())?;
                    self.store.sync.commit.sync_all(&f)?;
                }
            }
            std::fs::rename(&tmp, &path)?;
            self.store.sync.commit.sync_dir(&dir)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io(&ctx, "writing the domain definition", &path, e));
        }
        Ok(())
    }

    /// `vm`'s domain definition as of point `cycle` (`None`: the point has
    /// none, e.g. a VM protected by its disks).
    pub fn definition(&self, vm: &str, cycle: u64) -> Result<Option<String>> {
        let vmd = self.vm_dir(vm, false)?;
        let path = vmd.join(DEFINITIONS).join(format!("{cycle}.xml"));
        match std::fs::read_to_string(&path) {
            Ok(x) => Ok(Some(x)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&self.ctx(vm, ""), "reading the domain definition", &path, e)),
        }
    }

    /// Delete the definitions and group records of cycles below the newest
    /// point that are no point (pruned, or never committed). Those above it
    /// may belong to a point being committed.
    fn drop_definitions(&self, vmd: &Path, points: &[u64]) {
        let Some(&newest) = points.last() else { return };
        for (sub, ext) in [(DEFINITIONS, ".xml"), (GROUPS, ".json")] {
            let dir = vmd.join(sub);
            for c in cycle_files(&dir, ext) {
                if c < newest && !points.contains(&c) {
                    let _ = std::fs::remove_file(dir.join(format!("{c}{ext}")));
                }
            }
        }
    }

    /// Store the consistency group `vm`'s point of `cycle` was cut for,
    /// durably, before the point is committed ([`Site::commit_point`]).
    pub fn save_group(&self, vm: &str, cycle: u64, rec: &GroupRecord) -> Result<()> {
        let vmd = self.vm_dir(vm, false)?;
        let ctx = self.ctx(vm, "");
        let dir = ensure_dir(&ctx, &self.store.root, &vmd, GROUPS, true)?;
        self.write_json_on(
            &self.store.sync.commit,
            &ctx,
            &dir,
            &format!("{cycle}.json"),
            rec,
        )
    }

    /// The consistency group of `vm`'s point `cycle` (`None`: not cut for
    /// a group).
    pub fn group(&self, vm: &str, cycle: u64) -> Result<Option<GroupRecord>> {
        let vmd = self.vm_dir(vm, false)?;
        let dir = vmd.join(GROUPS);
        read_json_opt(
            &self.ctx(vm, ""),
            &self.store.root,
            &dir.join(format!("{cycle}.json")),
        )
    }

    /// Every VM of the site that has points, each point with its group
    /// record.
    pub fn group_view(&self) -> Result<Vec<super::group::VmPoints>> {
        let mut all = Vec::new();
        for vm in self.vms() {
            let pf = self.read_points(&vm)?;
            let mut pts = Vec::new();
            for p in pf.points {
                let rec = self.group(&vm, p.cycle)?;
                pts.push((p, rec));
            }
            all.push((vm, pts));
        }
        Ok(all)
    }

    /// The group points of `group` at this site, oldest first.
    pub fn group_points(&self, group: &str) -> Result<Vec<super::group::GroupPoint>> {
        Ok(super::group::group_points(group, &self.group_view()?))
    }

    /// The recovery points of `vm`, oldest first, with the bytes of history
    /// each one costs.
    pub fn points(&self, vm: &str) -> Result<Vec<Point>> {
        let mut pf = self.read_points(vm)?;
        // Each disk's undo records are listed once (bytes by base cycle),
        // not once per point.
        let mut undo_bytes: HashMap<String, HashMap<u64, u64>> = HashMap::new();
        for pt in &mut pf.points {
            let mut bytes = 0;
            for d in &pt.disks {
                let by_base = undo_bytes.entry(d.clone()).or_insert_with(|| {
                    let mut sums = HashMap::new();
                    let Some(p) = parse_hex_id(d).and_then(|id| self.disk(vm, &id, false).ok())
                    else {
                        return sums;
                    };
                    for (b, _, n) in self.undo_records(&p) {
                        let len = std::fs::metadata(p.undo.join(n)).map_or(0, |md| md.len());
                        *sums.entry(b).or_insert(0) += len;
                    }
                    sums
                });
                bytes += by_base.get(&pt.cycle).copied().unwrap_or(0);
            }
            pt.bytes = bytes;
        }
        Ok(pf.points)
    }

    /// The newest point of `vm` (its `bytes` not counted: 0), or none.
    pub fn newest_point(&self, vm: &str) -> Result<Option<Point>> {
        self.newest_point_of(vm)
    }

    /// What the receiver's metrics scrape needs of `vm`'s points, without
    /// reading them while the files are unchanged.
    pub fn points_summary(&self, vm: &str) -> Result<PointsSummary> {
        self.points_summary_of(vm)
    }

    /// A reader presenting disk `disk_id` of `vm` as of recovery point
    /// `cycle` (replica + undo overlays; nothing is copied).
    pub fn read_point(&self, vm: &str, disk_id: &[u8; 16], cycle: u64) -> Result<PointReader> {
        let p = self.disk(vm, disk_id, false)?;
        let idh = hex(disk_id);
        let pf = self.read_points(vm)?;
        if !pf
            .points
            .iter()
            .any(|pt| pt.cycle == cycle && pt.disks.contains(&idh))
        {
            return Err(StoreError::NoSuchPoint {
                ctx: p.ctx.clone(),
                cycle,
                what: "it was never committed for this disk or was pruned; list the points with `vdrep points`".into(),
            });
        }
        let _g = self.store.lock(&p.dir);
        let mut st = self.state_or_unknown(&p)?;
        if st.initial_offset.is_none() && (st.applying.is_some() || st.cycle.unwrap_or(0) < cycle) {
            // A point is committed once its logs are durable: apply them
            // (and nothing newer) before reading it.
            self.drain_locked(&p, Some(cycle), &mut |_| {})?;
            st = self.state_or_unknown(&p)?;
        }
        let rc = st.cycle.unwrap_or(0);
        if st.applying.is_some() || st.initial_offset.is_some() || rc < cycle {
            return Err(StoreError::NotReady {
                ctx: p.ctx.clone(),
                what: format!(
                    "the replica is not at a stable cycle at or after {cycle}, and its durable logs do not reach it: restart the receiver (it recovers) and retry"
                ),
            });
        }
        let cycles: Vec<u64> = pf.points.iter().map(|p| p.cycle).collect();
        let recs = self.undo_records(&p);
        let links = History::new(&recs, &cycles).chain(cycle, rc).map_err(|at| {
            StoreError::NoSuchPoint {
                ctx: p.ctx.clone(),
                cycle,
                what: format!(
                    "the history has a gap at cycle {at} (the replica is at {rc}); the point cannot be rebuilt"
                ),
            }
        })?;
        // The records are indexed a chunk at a time; a chunk that keeps
        // `reader_chunk` records open (each supplies a byte no older one
        // of the chunk covers) is merged into one private record, so a
        // reader holds at most one file per chunk plus the last chunk's,
        // however far back the point is.
        let history_err = |e| hrl_err(&p.ctx, &self.store.root, "reading history", cycle, e);
        let chunk_max = self.store.reader_chunk.load(Ordering::Relaxed).max(2);
        let mut temps = TempFiles::default();
        let mut layers = ReaderBuilder::default();
        let mut chunk = ReaderBuilder::default();
        let mut chunk_paths = Vec::new();
        for (_, _, n) in links {
            let path = p.undo.join(&n);
            chunk.add(UndoLayer::open(&path).map_err(history_err)?);
            chunk_paths.push(path);
            if chunk.open_layers() >= chunk_max {
                let merged = self
                    .merge_for_reader(&p, &chunk_paths, &mut temps)
                    .map_err(history_err)?;
                layers.add_merged(merged, chunk_paths.len());
                chunk = ReaderBuilder::default();
                chunk_paths.clear();
            }
        }
        layers.append(chunk);
        drop(temps);
        let rpath = p.dir.join(&st.replica_file);
        let replica =
            open_nofollow(&rpath).map_err(|e| self.io(&p.ctx, "opening the replica", &rpath, e))?;
        let size = layers.first_disk_size().unwrap_or(st.size);
        let (reader, shared) = layers.finish(cycle, size, replica);
        self.store
            .readers
            .lock()
            .entry(p.dir.clone())
            .or_default()
            .push(Arc::downgrade(&shared));
        Ok(reader)
    }

    /// Merge `records` (consecutive, oldest first) into one private undo
    /// record for a point reader, level by level ([`history::merge_levels`]),
    /// and open it. The files are made in the disk's `undo/` under temp
    /// names (`.reader-….tmp`: never taken for history, removed by
    /// recovery after a crash) that `temps` deletes once the reader is
    /// built; its open descriptor keeps the record readable. Not synced:
    /// nothing survives the reader.
    fn merge_for_reader(
        &self,
        p: &DiskPaths,
        records: &[PathBuf],
        temps: &mut TempFiles,
    ) -> std::result::Result<UndoLayer, crate::hrl::HrlError> {
        let mut level = records.to_vec();
        for groups in history::merge_levels(level.len()) {
            let mut next = Vec::with_capacity(groups.len());
            for g in groups {
                let group = &level[g];
                if group.len() == 1 {
                    next.extend(group.iter().cloned());
                    continue;
                }
                let out = p.undo.join(format!(
                    ".reader-{}-{}.undo.tmp",
                    std::process::id(),
                    self.store.tmp_seq.fetch_add(1, Ordering::Relaxed)
                ));
                temps.0.push(out.clone());
                undo::merge_undo(group, &out, false)?;
                next.push(out);
            }
            level = next;
        }
        match level.as_slice() {
            [one] => UndoLayer::open(one),
            _ => Err(crate::hrl::HrlError::Mismatch(format!(
                "merging {} undo records for a point reader left {} records",
                records.len(),
                level.len()
            ))),
        }
    }

    /// Apply the retention policy `keep` to the points of `vm`: drop the
    /// oldest points, thin out older ones (merging the undo records across
    /// each dropped point), and delete every undo record no remaining point
    /// needs.
    ///
    /// Crash-safe: `points.json` is rewritten first; merged records are
    /// published (fsync, rename) before the records they replace are
    /// deleted, and a point's chain of records never jumps over another
    /// point, so a crash leaves at worst redundant records, which the next
    /// prune deletes.
    /// The index in `points` of the newest point every one of whose disks'
    /// replicas is at or past it (applied, not only durable).
    fn newest_applied(&self, vm: &str, points: &[Point]) -> Option<usize> {
        let mut rc = HashMap::new();
        for d in list_dir(&self.vm_dir(vm, false).ok()?.join("disks")) {
            let Some(id) = parse_hex_id(&d) else { continue };
            let Ok(p) = self.disk(vm, &id, false) else {
                continue;
            };
            if let Ok(Some(st)) = self.read_state(&p) {
                if let Some(c) = st.cycle.filter(|_| st.initial_offset.is_none()) {
                    // Mid-apply: only the base is certain.
                    rc.insert(d, c);
                }
            }
        }
        points.iter().rposition(|pt| {
            pt.disks
                .iter()
                .all(|d| rc.get(d).is_some_and(|&c| c >= pt.cycle))
        })
    }

    pub fn prune(&self, vm: &str, keep: &RetentionPolicy) -> Result<PruneReport> {
        let vmd = self.vm_dir(vm, false)?;
        let _g = self.store.lock(&vmd);
        let mut pf = self.read_points(vm)?;
        let mut report = PruneReport::default();
        let n = pf.points.len();
        if n == 0 {
            return Ok(report);
        }
        let pinned = self.store.pins(&self.name, vm);
        let now = now_ns();
        let mut keep_flags = retention_keep(&pf.points, keep, now, &pinned);
        // A point cut for a consistency group stays whole or goes whole:
        // the other members' policies are read at the same `now`.
        if list_dir(&vmd.join(GROUPS))
            .iter()
            .any(|n| n.ends_with(".json"))
        {
            let all = self.group_view()?;
            let others: Vec<Vec<bool>> = all
                .iter()
                .map(|(v, pts)| {
                    let p: Vec<Point> = pts.iter().map(|(p, _)| p.clone()).collect();
                    retention_keep(&p, keep, now, &self.store.pins(&self.name, v))
                })
                .collect();
            keep_flags = super::group::group_keep(vm, &keep_flags, &all, &others);
            if let Some(last) = keep_flags.last_mut() {
                *last = true;
            }
            for (f, p) in keep_flags.iter_mut().zip(&pf.points) {
                *f |= pinned.contains(&p.cycle);
            }
        }
        // Points may be committed on durable logs before they are applied:
        // always keep the newest point the replicas have reached, so that a
        // pending point whose logs then fail to apply leaves one to fall
        // back to.
        if let Some(i) = self.newest_applied(vm, &pf.points) {
            if let Some(f) = keep_flags.get_mut(i) {
                *f = true;
            }
        }
        let all = std::mem::take(&mut pf.points);
        for (p, k) in all.into_iter().zip(keep_flags) {
            if k {
                pf.points.push(p);
            } else {
                report.dropped_points.push(p.cycle);
            }
        }
        if !report.dropped_points.is_empty() {
            self.write_points(&self.ctx(vm, ""), &vmd, &mut pf)?;
        }
        let cycles: Vec<u64> = pf.points.iter().map(|p| p.cycle).collect();
        self.drop_definitions(&vmd, &cycles);
        let (Some(&oldest), Some(&newest)) = (cycles.first(), cycles.last()) else {
            return Ok(report);
        };
        for d in list_dir(&vmd.join("disks")) {
            let Some(id) = parse_hex_id(&d) else { continue };
            let p = self.disk(vm, &id, false)?;
            let _dg = self.store.lock(&p.dir);
            let Some(st) = self.read_state(&p)? else {
                continue;
            };
            let Some(rc) = st
                .cycle
                .filter(|_| st.initial_offset.is_none() && st.applying.is_none())
            else {
                continue;
            };
            if rc < oldest {
                continue;
            }
            // Merge across every boundary of the oldest point's chain that is
            // no longer a point (and lies below the newest point this replica
            // reached: a cycle above it may still be committed; points past
            // `rc`, committed on durable logs, are not applied yet).
            let newest_here = cycles
                .iter()
                .copied()
                .filter(|&c| c <= rc)
                .max()
                .unwrap_or(newest);
            let recs = self.undo_records(&p);
            let Ok(links) = History::new(&recs, &cycles).chain(oldest, rc) else {
                continue; // a gap: leave this disk's history alone
            };
            // Each run is merged level by level, up to `FAN_IN` records
            // into one ([`history::merge_levels`]). Every merged record
            // (the intermediate ones too) is published before anything is
            // deleted, and is a valid record of its own; the ones no chain
            // uses go below.
            for run in history::merge_runs(&links, &cycles, newest_here) {
                let mut level: Vec<history::Record> = links[run].to_vec();
                for groups in history::merge_levels(level.len()) {
                    let mut next = Vec::with_capacity(groups.len());
                    for g in groups {
                        let group = &level[g];
                        let (Some(older), Some(newer)) = (group.first(), group.last()) else {
                            continue;
                        };
                        if group.len() == 1 {
                            next.push(older.clone());
                            continue;
                        }
                        let name = undo::undo_name(older.0, newer.1);
                        let inputs: Vec<PathBuf> =
                            group.iter().map(|r| p.undo.join(&r.2)).collect();
                        let bytes =
                            undo::merge_undo(&inputs, &p.undo.join(&name), true).map_err(|e| {
                                hrl_err(&p.ctx, &self.store.root, "merging history", older.1, e)
                            })?;
                        self.store.step("undo-merged");
                        report.freed_bytes = report.freed_bytes.saturating_sub(bytes);
                        report.merged += group.len() as u64 - 1;
                        next.push((older.0, newer.1, name));
                    }
                    level = next;
                }
            }
            // Keep only what some point's chain uses.
            let recs = self.undo_records(&p);
            let needed: std::collections::HashSet<String> = History::new(&recs, &cycles)
                .needed(rc)
                .into_iter()
                .map(str::to_string)
                .collect();
            for (_, _, name) in recs {
                if !needed.contains(&name) {
                    let f = p.undo.join(&name);
                    report.freed_bytes += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                    let _ = std::fs::remove_file(f);
                }
            }
            let _ = sync_dir(&p.undo);
        }
        Ok(report)
    }
}

/// The bytes of an arriving log on their way to the verifier, copied into
/// the log's temp file as they pass. Keeps the first error of each side,
/// so that a failed receive or write is reported as such, not as a bad log.
struct Tee<'a, R> {
    src: R,
    file: &'a mut File,
    bytes: u64,
    read_err: Option<std::io::Error>,
    write_err: Option<std::io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = loop {
            match self.src.read(buf) {
                Ok(k) => break k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = std::io::Error::other(format!("receiving the log: {e}"));
                    self.read_err = Some(e);
                    return Err(why);
                }
            }
        };
        if let Err(e) = self.file.write_all(&buf[..k]) {
            let why = std::io::Error::other(format!("storing the log: {e}"));
            self.write_err = Some(e);
            return Err(why);
        }
        self.bytes += k as u64;
        Ok(k)
    }
}

/// Which of `points` (oldest first, not empty) a retention policy keeps,
/// as of `now` (ns since the Unix epoch); `pinned` cycles are always kept,
/// and so is the newest point. Shared by every [`ReplicaStore`](super::ReplicaStore)
/// implementation.
pub fn retention_keep(
    points: &[Point],
    keep: &RetentionPolicy,
    now: u64,
    pinned: &[u64],
) -> Vec<bool> {
    let n = points.len();
    if n == 0 {
        return Vec::new();
    }
    let mut keep_flags = vec![true; n];
    if let Some(k) = keep.keep_last {
        for f in keep_flags.iter_mut().take(n.saturating_sub(k.max(1))) {
            *f = false;
        }
    }
    if let Some(age) = keep.max_age {
        let limit = now.saturating_sub(age.as_nanos() as u64);
        for (f, p) in keep_flags.iter_mut().zip(points) {
            if p.time_unix_ns < limit {
                *f = false;
            }
        }
    }
    if let (Some(after), Some(every)) = (keep.thin_after, keep.thin_every) {
        let limit = now.saturating_sub(after.as_nanos() as u64);
        let every = (every.as_nanos() as u64).max(1);
        // Of the points older than `limit` keep one per interval: the
        // newest application-consistent one if the interval has one,
        // else the newest (none if a newer point of the same interval
        // is still young enough to be kept anyway). Points are oldest
        // first.
        let mut i = 0;
        while i < n && points[i].time_unix_ns < limit {
            let slot = points[i].time_unix_ns / every;
            let mut j = i;
            while j < n && points[j].time_unix_ns / every == slot {
                j += 1;
            }
            // Points i..j share the interval; i..old are thinnable.
            let old = (i..j)
                .find(|&k| points[k].time_unix_ns >= limit)
                .unwrap_or(j);
            let app = (i..old)
                .rev()
                .find(|&k| points[k].consistency == Consistency::App);
            let keep_one = app.or((old == j).then(|| j - 1));
            for (k, f) in keep_flags.iter_mut().enumerate().take(old).skip(i) {
                if Some(k) != keep_one {
                    *f = false;
                }
            }
            i = j;
        }
    }
    keep_flags[n - 1] = true;
    for (f, p) in keep_flags.iter_mut().zip(points) {
        if pinned.contains(&p.cycle) {
            *f = true;
        }
    }
    keep_flags
}

/// `len` bytes of `target` at `offset` mapped in up to `threads` parts
/// of whole blocks (split at 2 MiB boundaries where the length allows, so
/// large folios map whole), for [`crate::resync::digest_mapped`]; `None`
/// when the format cannot be mapped or a mapping fails (the caller reads
/// instead).
fn map_parts(
    target: &dyn ReplicaTarget,
    offset: u64,
    len: usize,
    bs: u64,
    threads: usize,
) -> Option<Vec<super::target::MappedRange>> {
    const ALIGN: u64 = 2 << 20;
    let len = len as u64;
    let threads = threads.max(1) as u64;
    let mut step = len.div_ceil(threads);
    step = if step >= ALIGN {
        step.div_ceil(ALIGN) * ALIGN
    } else {
        step.div_ceil(bs.max(1)) * bs.max(1)
    };
    let mut parts = Vec::new();
    let mut at = 0;
    while at < len {
        let n = step.min(len - at);
        parts.push(target.map(offset + at, n as usize)?.ok()?);
        at += n;
    }
    Some(parts)
}

fn unreachable_short(ctx: &Ctx, label: &Path) -> Result<()> {
    Err(StoreError::CorruptLog {
        ctx: ctx.clone(),
        cycle: 0,
        source: crate::hrl::HrlError::Corrupt {
            path: label.to_path_buf(),
            offset: 0,
            what: "the header does not parse".into(),
        },
    })
}

/// True if two sealed logs end with the same trailer (which carries the
/// xxh3-128 of everything before it).
fn same_trailer(a: &Path, b: &Path) -> std::io::Result<bool> {
    let tail = |p: &Path| -> std::io::Result<Vec<u8>> {
        let f = open_nofollow(p)?;
        let len = f.metadata()?.len();
        let n = (format::TRAILER_LEN as u64).min(len);
        let mut v = vec![0u8; n as usize];
        f.read_exact_at(&mut v, len - n)?;
        Ok(v)
    };
    Ok(tail(a)? == tail(b)?)
}
