//! The sender: protection of VMs at the primary site.
//!
//! Runs inside the mount daemon. A protected VM is a named set of tracked
//! disks replicated to one receiver. Its worker (one tokio task per VM):
//!
//! 1. connects over QUIC + mutual TLS and says `Hello`;
//! 2. opens every disk (`OpenDisk` → `DiskState`) and decides, from the
//!    replica's cycle and the sealed logs still on disk, whether the VM needs
//!    an **initial copy** (one whole-disk cycle of every disk sealed at one
//!    instant and streamed as of that instant, resumable from the receiver's
//!    `resume_offset`) or can continue with **delta** logs;
//! 3. ships sealed logs oldest first, deletes each only after the receiver
//!    acknowledged it applied and durable, and commits a recovery point
//!    (`PointCommit`) once every disk of the VM reached the same cycle;
//! 4. then cuts every interval (or continuously: as soon as the previous
//!    cycle is acknowledged) and repeats.
//!
//! The conversation itself (message order, acknowledgements, which point
//! to commit when) is [`crate::wire::session::Sender`]'s; `link.rs` is its
//! quinn driver. This module decides what to send (initial copy, deltas,
//! resync) and keeps the VM's state.
//!
//! Errors ([`SendError`], decided on its [`ErrorKind`]): recoverable ones
//! (network, receiver disk full, busy) put the VM in `Warning` and retry
//! on the VM's [`RetrySchedule`] (by default 1 s, 2 s, 5 s for continuous
//! and short-interval VMs, then 1, 2, 4, 8, 10 minutes, then every 30
//! minutes; scaled by `VDREP_RETRY_SCALE` so tests run in seconds);
//! unrecoverable ones (refused
//! certificate, invalid replica state, bad name) put it in `Critical` with
//! the reason and stop until the administrator protects it again.
//!
//! Sealed logs are tracking's: the sender only reads them through
//! [`crate::tracking::SealedLog`] and marks them shipped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use crate::tracking::{CutErrorKind, CutSelect, SealedCycle, SealedLog, TrackState, Tracker};
use crate::transport::{self, keys::Identity, trust::TrustStore};
use crate::util::now_ns;
use crate::wire;
use crate::wire::session::{Job as SessionJob, SenderAction, SenderConfig, SessionError};
use shaper::{LinkShare, Shaper};

pub mod alert;
pub mod app_hook;
pub(crate) mod compat;
mod direct;
pub use direct::{DirectFactory, DirectReceiver};
mod error;
pub mod flush;
mod group;
mod link;
pub mod metrics;
pub mod overload;
mod resync;
pub mod retry;
pub mod shaper;

use error::transport_err;
pub use error::{ErrorKind, SendError};
use link::Link;
pub use retry::RetrySchedule;

pub use crate::resync::ResyncProgress;

pub(crate) fn default_threshold() -> f64 {
    50.0
}

/// What `vdrep protect` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectSpec {
    pub vm: String,
    /// Receiver address, `HOST:PORT`; or an object store `s3://BUCKET/PREFIX`
    /// written directly ([`direct`], with `s3`).
    pub to: String,
    /// Certificates of the receiver(s) we trust (none for an object store).
    pub trust: Vec<PathBuf>,
    /// How to reach and open the object store of an `s3://` `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<crate::objstore::S3Target>,
    /// Seconds between cuts; 0 = continuous.
    pub every_secs: u64,
    /// Disk paths relative to the mounted folder.
    pub disks: Vec<String>,
    /// Bandwidth cap in bytes per second (0 = none).
    #[serde(default)]
    pub max_rate: u64,
    /// Cap in bytes per second shared by every VM of this mount that
    /// replicates to the same `to` (0 = none); deltas go before initial
    /// copies within it ([`shaper`]). The newest protect's value wins.
    #[serde(default)]
    pub link_max_rate: u64,
    /// Pending changes of a disk (sealed logs + dirty blocks) above this
    /// percentage of its size switch it to bitmap-only tracking.
    #[serde(default = "default_threshold")]
    pub resync_threshold_pct: f64,
    /// When automatic resyncs may run ([`crate::resync::Window::parse`];
    /// empty: the default, 18:00-08:00 and weekends).
    #[serde(default)]
    pub resync_window: String,
    /// Application-consistency hook (`--app-hook`); none: every point is
    /// crash-consistent.
    #[serde(default)]
    pub app_hook: Option<app_hook::AppHookSpec>,
    /// Lag above which the VM shows `Warning` "RPO exceeded", seconds
    /// (0: no alert; [`alert`]).
    #[serde(default)]
    pub rpo_alert_secs: u64,
    /// The libvirt domain whose disk files `disks` are (`protect
    /// --domain`): its definition (`virsh dumpxml --inactive`) is read at
    /// every cut and replicated with the point; a changed set of disk files
    /// is picked up at the next cut ([`domain_disks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The consistency group (`--group`): the VMs of this mount with the
    /// same group share every recovery point ([`group`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// With `group`: VMs that must all be protected here before the group
    /// is cut (a group protected back after its planned failover, one
    /// member at a time: no point of the first alone is a group point).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_members: Vec<String>,
    /// When to try again after a recoverable failure ([`retry`]).
    #[serde(default)]
    pub retry: RetrySchedule,
}

impl ProtectSpec {
    /// The automatic-resync window.
    pub fn window(&self) -> crate::resync::Window {
        if self.resync_window.is_empty() {
            return crate::resync::Window::default();
        }
        crate::resync::Window::parse(&self.resync_window).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    InitialReplication,
    Normal,
    Warning,
    Critical,
    /// A disk needs a resync; it waits for the resync window (or `vdrep resync`).
    ResyncRequired,
    /// A checksum resync is running.
    Resynchronizing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm: String,
    pub to: String,
    pub state: VmState,
    pub disks: Vec<String>,
    /// Cycle of the newest recovery point at the receiver.
    pub last_point: Option<u64>,
    /// Recovery points committed for this VM since the mount daemon
    /// started (one per cycle shipped: with `--every continuous`, how
    /// often the VM is cut).
    #[serde(default)]
    pub points_committed: u64,
    pub last_point_unix_ns: Option<u64>,
    /// Now minus the cut time of the newest point, seconds (the RPO).
    pub lag_secs: Option<f64>,
    /// Bytes not yet at the receiver (dirty blocks + sealed logs).
    pub bytes_pending: u64,
    /// Initial copy progress: bytes done / total.
    pub initial_done: u64,
    pub initial_total: u64,
    pub throughput_bps: f64,
    /// Payload bytes sent (log and copy data, after compression).
    pub bytes_sent: u64,
    /// UDP bytes this VM's connections really sent (QUIC headers, ACKs,
    /// retransmissions included): what crossed the network.
    #[serde(default)]
    pub wire_bytes_sent: u64,
    /// The destination's shared cap, bytes/s (`--link-max-rate`; 0: none).
    #[serde(default)]
    pub link_max_rate: u64,
    pub last_error: Option<String>,
    pub next_retry_unix: Option<u64>,
    /// While the VM waits to try again: the step of its retry schedule
    /// (0-based: 0, 1, 2 are the fast retries of a continuous VM) and the
    /// wait that step planned, seconds ([`retry::Backoff`]).
    #[serde(default)]
    pub retry_step: Option<u32>,
    #[serde(default)]
    pub retry_delay_secs: Option<f64>,
    /// Retries since protection started (each failed session that will be
    /// tried again).
    #[serde(default)]
    pub retries: u64,
    pub every_secs: u64,
    /// The resync or verify running now.
    #[serde(default)]
    pub resync: Option<ResyncProgress>,
    /// The last one that finished.
    #[serde(default)]
    pub last_resync: Option<ResyncProgress>,
    /// Disks waiting for a resync, with the reason.
    #[serde(default)]
    pub resync_pending: Vec<String>,
    /// Disks tracked bitmap-only (pending changes passed the threshold).
    #[serde(default)]
    pub bitmap_only: Vec<String>,
    /// When automatic resyncs run.
    #[serde(default)]
    pub resync_window: String,
    /// Cycle and cut time of the newest application-consistent point.
    #[serde(default)]
    pub last_app_point: Option<u64>,
    #[serde(default)]
    pub last_app_point_unix_ns: Option<u64>,
    /// The last app hook failure (the cut was taken crash-consistent);
    /// cleared by the next successful freeze.
    #[serde(default)]
    pub app_hook_error: Option<String>,
    /// How long the guest stayed frozen for the last app-consistent cut,
    /// milliseconds (freeze returned → thaw started).
    #[serde(default)]
    pub app_frozen_ms: Option<f64>,
    /// RPO alert and errors by kind ([`alert`]).
    #[serde(default)]
    pub health: alert::Health,
    /// The VM's consistency group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Why the group is not cut now (a member is in its initial copy, a
    /// resync, or not connected): no group point until it is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_waiting: Option<String>,
    /// The protocol version of the newest session with the receiver: this
    /// build's, or an older one when the receiver runs an older build
    /// ([`compat`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u16>,
}

/// What `vdrep verify` found on one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyDisk {
    pub disk: String,
    /// The receiver's point the source was compared with.
    pub replica_cycle: u64,
    pub blocks_compared: u64,
    /// Blocks written since that point (on their way; not judged).
    pub blocks_skipped: u64,
    /// Differing byte ranges `(offset, length)`, merged.
    pub differ: Vec<(u64, u64)>,
}

/// A request the VM's worker runs between cycles.
enum Job {
    /// Resync every disk now; answer when done (None: `--background`).
    Resync(Option<oneshot::Sender<Result<ResyncProgress, SendError>>>),
    Verify(oneshot::Sender<Result<Vec<VerifyDisk>, SendError>>),
}

/// Flush the mount, then run `seal` (a cut of the selected disks) on a
/// blocking thread; a disk it skipped fails the whole cut, retryably (a
/// cut must hold every disk of the VM at one instant).
async fn seal_vm(
    flush: Arc<flush::FlushGate>,
    tracker: Arc<Tracker>,
    seal: impl FnOnce(&Tracker) -> Result<crate::tracking::Sealed, crate::tracking::TrackError>
        + Send
        + 'static,
) -> Result<crate::tracking::Sealed, SendError> {
    let sealed = tokio::task::spawn_blocking(move || {
        flush.flush()?;
        seal(&tracker)
    })
    .await
    .map_err(|e| retry(format!("cut task failed: {e}")))?
    .map_err(|e| retry(e.to_string()))?;
    if let Some(e) = sealed.skipped.first() {
        return Err(retry(format!(
            "{}: {}",
            e.disk,
            e.error.clone().unwrap_or_default()
        )));
    }
    Ok(sealed)
}

fn retry(e: impl std::fmt::Display) -> SendError {
    SendError::retry(e)
}

/// A `vdrep sync` caller: the cycle it needs and where to answer.
type SyncWaiter = (u64, oneshot::Sender<Result<u64, SendError>>);

struct Vm {
    spec: ProtectSpec,
    status: Mutex<VmStatus>,
    wake: Notify,
    /// `vdrep sync` callers: answered once a point at or after the cycle
    /// they asked for is committed.
    waiters: Mutex<Vec<SyncWaiter>>,
    /// A sync was requested: cut now.
    sync_requested: std::sync::atomic::AtomicBool,
    /// Cycle of an interrupted whole-disk copy per disk (for resuming).
    copy_cycle: Mutex<HashMap<String, u64>>,
    stop: std::sync::atomic::AtomicBool,
    /// `vdrep resync` / `vdrep verify` requests, oldest first; a job stays
    /// queued until it ran (a failed session leaves it for the next).
    jobs: Mutex<std::collections::VecDeque<Job>>,
    /// When the app hook last ran (`--app-every` counts from there).
    last_app_try: Mutex<Option<std::time::Instant>>,
    /// The live session's UDP counters (its connection's, or its share of
    /// a shared one) and the UDP bytes of the sessions before it.
    conn: Mutex<Option<link::WireBytes>>,
    udp_sent_before: std::sync::atomic::AtomicU64,
    /// The session `protect` checked the receiver with: the worker's first
    /// session runs on it.
    probed: Mutex<Option<link::Probed>>,
    /// Domain definitions by cut cycle not yet known committed (the newest
    /// one stays: it holds for the next cuts too); given to every session.
    definitions: Mutex<std::collections::BTreeMap<u64, String>>,
    /// The domain's disk files changed: the worker restarts with this spec
    /// (added disks get their initial copy, removed ones stop).
    respec: Mutex<Option<ProtectSpec>>,
    /// The looks at its write and send counters that give its rates.
    rates: Mutex<overload::RateWindow>,
    /// Connected, in the steady loop, no job running: its group may cut it.
    steady: std::sync::atomic::AtomicBool,
    /// Its group's coordinator sealed a cycle of it to ship.
    logs_ready: std::sync::atomic::AtomicBool,
    /// Cycles cut for its group not yet known committed, with the group
    /// their points name; given to every session.
    group_cycles: Mutex<group::GroupCycles>,
}

/// Clears [`Vm::steady`] when a session ends.
struct Steady<'a>(&'a Vm);

impl Drop for Steady<'_> {
    fn drop(&mut self) {
        self.0
            .steady
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Vm {
    /// The app hook if it is due at this cut (`--app-every` passed since
    /// the last try, failed or not: a broken hook must not stall every cut
    /// for its time limit); the try counts from now.
    fn app_hook_due(&self) -> Option<app_hook::AppHookSpec> {
        let h = self.spec.app_hook.as_ref()?;
        let mut last = self.last_app_try.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(h.every_secs)) {
            *last = Some(std::time::Instant::now());
            return Some(h.clone());
        }
        None
    }

    /// Record how the app hook of a cut went.
    fn note_app_cut(&self, app: &AppCut) {
        if !app.tried {
            return;
        }
        let mut s = self.status.lock();
        match &app.error {
            Some(e) => {
                tracing::warn!(vm = %self.spec.vm, "{e}; this cut is crash-consistent only");
                s.app_hook_error = Some(e.clone());
            }
            None => s.app_hook_error = None,
        }
        if app.frozen {
            s.app_frozen_ms = app.frozen_ms;
        }
    }

    /// UDP bytes sent by every connection of this VM so far.
    fn wire_bytes_sent(&self) -> u64 {
        self.udp_sent_before
            .load(std::sync::atomic::Ordering::Relaxed)
            + self
                .conn
                .lock()
                .as_ref()
                .map_or(0, link::WireBytes::udp_tx_bytes)
    }
}

/// Keeps [`Vm::conn`] for one session; on drop, folds the session's UDP
/// counters into the VM's total.
struct LiveConn<'a>(&'a Vm);

impl<'a> LiveConn<'a> {
    fn new(vm: &'a Vm, link: &Link) -> Self {
        *vm.conn.lock() = Some(link.wire_bytes());
        LiveConn(vm)
    }
}

impl Drop for LiveConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.conn.lock().take() {
            self.0
                .udp_sent_before
                .fetch_add(c.udp_tx_bytes(), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The shared connection to one receiver (`vdrep-mux/1`), or that it
/// speaks only `vdrep/1` (a connection per session), or why the last dial
/// failed and when.
#[derive(Default)]
enum PoolSlot {
    #[default]
    Empty,
    Mux(Arc<link::MuxConn>),
    Legacy,
    Failed(Instant, SendError),
}

/// A connection for a session: its own, or a shared one (`mux`).
struct Dialed {
    conn: quinn::Connection,
    mux: Option<Arc<link::MuxConn>>,
    endpoint: quinn::Endpoint,
}

/// All protected VMs of one mount.
pub struct Replicator {
    tracker: Arc<Tracker>,
    keys_dir: Option<PathBuf>,
    mount_dir: PathBuf,
    identity: Option<Arc<Identity>>,
    site: String,
    rt: tokio::runtime::Runtime,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Shared caps per destination (`--link-max-rate`), by `to`.
    links: Mutex<HashMap<String, Arc<LinkShare>>>,
    retry_scale: f64,
    /// The flush before a cut, shared by the VMs that cut together.
    flush: Arc<flush::FlushGate>,
    /// This daemon's identity (random): resync progress it saved can be
    /// resumed with its in-memory bitmap.
    instance: String,
    /// State-change events of the VMs ([`alert::watch`]).
    events: Arc<crate::events::Bus>,
    /// Embedded receivers of object stores written directly, by store
    /// ([`direct`]).
    #[allow(clippy::type_complexity)]
    direct: Mutex<HashMap<String, Arc<Mutex<Option<Arc<dyn direct::DirectReceiver>>>>>>,
    /// Starts the in-process receivers of [`direct`] (the daemon's).
    direct_factory: Option<Arc<direct::DirectFactory>>,
    /// The client endpoint every session shares ([`Replicator::client_endpoint`]).
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// The connection every session to a receiver shares, by receiver
    /// ([`Replicator::dial`]).
    pool: Mutex<HashMap<String, Arc<tokio::sync::Mutex<PoolSlot>>>>,
    /// The protocol version to speak to each receiver ([`compat`]).
    versions: compat::PeerVersions,
    /// The running consistency-group coordinators ([`group`]).
    groups: Mutex<group::Groups>,
    /// This mount's identity for its cycle numbers (random, kept in its
    /// state folder): a group point's `origin`.
    origin: String,
}

const PROTECT_DIR: &str = "protect";

/// Bytes of a sealed log per `LogChunk`.
const LOG_CHUNK: usize = 1 << 20;
/// How often a pipelined cycle that is all sent looks for new writes
/// (continuous VMs) while it waits for its acknowledgement.
const PIPELINE_POLL: Duration = Duration::from_millis(20);

impl Replicator {
    /// `keys`: the mount's identity folder (`vdrep mount --keys`).
    pub fn new(
        tracker: Arc<Tracker>,
        mount_dir: &Path,
        keys: Option<&Path>,
        direct_factory: Option<Arc<direct::DirectFactory>>,
    ) -> Result<Arc<Self>, SendError> {
        let identity = match keys {
            Some(k) => Some(Arc::new(
                Identity::from_dir(k, None).map_err(|e| SendError::invalid(e.to_string()))?,
            )),
            None => None,
        };
        let site = identity
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vdrep-send")
            .enable_all()
            .build()
            .map_err(|e| SendError::fatal(format!("cannot start the replication runtime: {e}")))?;
        let tracker_for_origin = tracker.clone();
        let retry_scale = std::env::var("VDREP_RETRY_SCALE")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(1.0);
        let r = Arc::new(Replicator {
            tracker,
            keys_dir: keys.map(Path::to_path_buf),
            mount_dir: mount_dir.to_path_buf(),
            identity,
            site,
            rt,
            vms: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            retry_scale,
            flush: Arc::new(flush::FlushGate::new(mount_dir)),
            instance: format!(
                "{:032x}",
                xxhash_rust::xxh3::xxh3_128(
                    &[
                        now_ns().to_le_bytes(),
                        u64::from(std::process::id()).to_le_bytes(),
                    ]
                    .concat()
                )
            ),
            events: Arc::default(),
            direct: Mutex::default(),
            direct_factory,
            endpoint: Mutex::new(None),
            pool: Mutex::default(),
            versions: compat::PeerVersions::default(),
            groups: Mutex::default(),
            origin: group::mount_origin(&tracker_for_origin),
        });
        r.rt.spawn(alert::watch(Arc::downgrade(&r)));
        // Resume every VM protected before.
        for spec in r.saved_specs() {
            r.start(spec);
        }
        Ok(r)
    }

    /// The VMs' state-change events.
    pub fn events(&self) -> &Arc<crate::events::Bus> {
        &self.events
    }

    /// The mount's identity folder.
    pub fn keys_dir(&self) -> Option<PathBuf> {
        self.keys_dir.clone()
    }

    /// The protection of `vm`, if protected here.
    pub fn spec(&self, vm: &str) -> Option<ProtectSpec> {
        self.vms.lock().get(vm).map(|v| v.spec.clone())
    }

    fn saved_specs(&self) -> Vec<ProtectSpec> {
        let dir = self.tracker.state_file(PROTECT_DIR);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let b = std::fs::read(e.path()).ok()?;
                serde_json::from_slice(&b).ok()
            })
            .collect()
    }

    /// Check prerequisites, persist the spec and start replicating. Returns
    /// warnings (e.g. the receiver may be short of space).
    pub fn protect(self: &Arc<Self>, spec: ProtectSpec) -> Result<Vec<String>, SendError> {
        crate::util::phase::step("protect_request", &spec.vm);
        wire::safe_component(&spec.vm).map_err(|e| SendError::invalid(format!("VM name: {e}")))?;
        if self.identity.is_none() {
            return Err(SendError::invalid(format!(
                "{} was mounted without an identity: remount with `vdrep mount {} --keys KEYDIR` (make one with `vdrep keys init`)",
                self.mount_dir.display(),
                self.mount_dir.display()
            )));
        }
        if spec.disks.is_empty() {
            return Err(SendError::invalid("name at least one disk to protect"));
        }
        let names = self.tracker.disk_names();
        for d in &spec.disks {
            if !names.contains(d) {
                return Err(SendError::invalid(format!(
                    "{d} is not a tracked disk under {} (tracked: {})",
                    self.mount_dir.display(),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }
        for (vm, other) in self.vms.lock().iter() {
            if vm != &spec.vm {
                if let Some(d) = other.spec.disks.iter().find(|d| spec.disks.contains(d)) {
                    return Err(SendError::invalid(format!(
                        "{d} is already protected as part of VM {vm}"
                    )));
                }
            }
        }
        let direct = direct::url_of(&spec)?.is_some();
        if let Some(g) = &spec.group {
            wire::safe_component(g).map_err(|e| SendError::invalid(format!("--group: {e}")))?;
            if direct {
                return Err(SendError::invalid(
                    "--group: an s3:// target keeps no consistency groups; replicate the group's VMs to a receiver",
                ));
            }
            let other = self.vms.lock().values().find_map(|v| {
                (v.spec.vm != spec.vm && v.spec.group == spec.group && v.spec.to != spec.to)
                    .then(|| (v.spec.vm.clone(), v.spec.to.clone()))
            });
            if let Some((vm, to)) = other {
                return Err(SendError::invalid(format!(
                    "--group {g}: VM {vm} of the group replicates to {to}: a group's VMs replicate to one receiver (its group points are made there)"
                )));
            }
        }
        if spec.trust.is_empty() && !direct {
            return Err(SendError::invalid(
                "name the receiver's certificate with --trust",
            ));
        }
        if !(spec.resync_threshold_pct > 0.0 && spec.resync_threshold_pct <= 1000.0) {
            return Err(SendError::invalid(format!(
                "--resync-threshold {}% is out of range (give a percentage of the disk size, e.g. 50%)",
                spec.resync_threshold_pct
            )));
        }
        if !spec.resync_window.is_empty() {
            crate::resync::Window::parse(&spec.resync_window)
                .map_err(|e| SendError::invalid(format!("--resync-window: {e}")))?;
        }
        // The object store opens (every check) before anything is written.
        self.direct(&spec)
            .map_err(|e| e.context(format!("object store {} is not usable", spec.to)))?;
        // Reachable and trusted: say Hello once (the worker goes on with
        // that session).
        let probe = self.rt.block_on(self.probe(&spec));
        let (hello, probed) = match probe {
            Ok(h) => h,
            Err(e) => return Err(e.context(format!("receiver {} is not usable", spec.to))),
        };
        let spec_name = spec.vm.clone();
        let need: u64 = spec
            .disks
            .iter()
            .filter_map(|d| self.tracker.disk_info(d))
            .map(|(_, size, _, _)| size)
            .sum();
        let mut warnings = Vec::new();
        if hello.store_free > 0 && hello.store_free < need {
            warnings.push(format!(
                "the receiver's store has {} MiB free, the disks are {} MiB: the initial copy may run out of space (it fits only if the disks are sparse enough)",
                hello.store_free >> 20,
                need >> 20
            ));
        }
        self.save_spec(&spec)?;
        self.start_with(spec, probed);
        for w in &warnings {
            tracing::warn!(vm = %spec_name, "{w}");
        }
        crate::util::phase::step("protect_done", &spec_name);
        Ok(warnings)
    }

    /// Persist a protection (restarts protect it again).
    fn save_spec(&self, spec: &ProtectSpec) -> Result<(), SendError> {
        let path = self.tracker.state_file(PROTECT_DIR);
        std::fs::create_dir_all(&path)
            .map_err(|e| SendError::fatal(format!("{}: {e}", path.display())))?;
        let b = serde_json::to_vec_pretty(spec).map_err(|e| SendError::fatal(e.to_string()))?;
        let f = path.join(format!("{}.json", spec.vm));
        let tmp = path.join(format!(".{}.json.tmp", spec.vm));
        std::fs::write(&tmp, b)
            .and_then(|_| std::fs::rename(&tmp, &f))
            .map_err(|e| SendError::fatal(format!("saving {}: {e}", f.display())))
    }

    /// The domain of `old` now has the disk files of `spec`: persist it and
    /// restart the VM's worker on them, handing over waiting `vdrep sync`s
    /// and the definitions not yet committed.
    fn respec(self: &Arc<Self>, old: &Arc<Vm>, spec: ProtectSpec) {
        if let Err(e) = self.save_spec(&spec) {
            tracing::error!(vm = %spec.vm, "{e}: the new disk set holds until the mount restarts");
        }
        for d in old.spec.disks.iter().filter(|d| !spec.disks.contains(d)) {
            // No longer shipped: its replica stays until retention drops
            // the points that hold it.
            self.tracker.set_log_limit(d, None);
            self.tracker.discard_logs(d, None);
        }
        let name = spec.vm.clone();
        self.start(spec);
        if let Some(new) = self.vms.lock().get(&name).cloned() {
            new.waiters.lock().extend(old.waiters.lock().drain(..));
            *new.definitions.lock() = std::mem::take(&mut *old.definitions.lock());
            *new.group_cycles.lock() = std::mem::take(&mut *old.group_cycles.lock());
            {
                let (o, mut n) = (old.status.lock(), new.status.lock());
                n.last_point = o.last_point;
                n.points_committed = o.points_committed;
            }
            new.wake.notify_one();
        }
    }

    /// Cut of each disk's interrupted whole-disk copy, kept across restarts:
    /// after a clean restart the saved bitmap holds every change since that
    /// cut, so the copy resumes from the receiver's offset.
    fn copy_cycles_path(&self, vm: &str) -> PathBuf {
        self.tracker
            .state_file(PROTECT_DIR)
            .join(format!("{vm}.copy.json"))
    }

    fn load_copy_cycles(&self, vm: &str) -> HashMap<String, u64> {
        if !self.tracker.previous_stop_clean() {
            return HashMap::new();
        }
        std::fs::read(self.copy_cycles_path(vm))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_copy_cycles(&self, vm: &Vm) {
        let path = self.copy_cycles_path(&vm.spec.vm);
        let tmp = path.with_extension("tmp");
        let b = serde_json::to_vec(&*vm.copy_cycle.lock()).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, b).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::warn!(vm = %vm.spec.vm, "cannot save copy progress {}: {e}", path.display());
        }
    }

    pub fn unprotect(&self, vm: &str) -> Result<(), SendError> {
        let Some(v) = self.vms.lock().remove(vm) else {
            return Err(not_protected(vm));
        };
        v.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        v.wake.notify_one();
        for d in &v.spec.disks {
            self.tracker.set_log_limit(d, None);
        }
        let _ = std::fs::remove_file(
            self.tracker
                .state_file(PROTECT_DIR)
                .join(format!("{vm}.json")),
        );
        Ok(())
    }

    fn start(self: &Arc<Self>, spec: ProtectSpec) {
        self.start_with(spec, None);
    }

    /// [`Self::start`], the worker's first session on `probed` if given.
    fn start_with(self: &Arc<Self>, spec: ProtectSpec, probed: Option<link::Probed>) {
        if let Some(old) = self.vms.lock().remove(&spec.vm) {
            old.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            old.wake.notify_one();
        }
        let spec_vm = spec.vm.clone();
        let spec_group = spec.group.clone();
        let vm = Arc::new(Vm {
            status: Mutex::new(VmStatus {
                vm: spec.vm.clone(),
                to: spec.to.clone(),
                state: VmState::InitialReplication,
                disks: spec.disks.clone(),
                last_point: None,
                points_committed: 0,
                last_point_unix_ns: None,
                lag_secs: None,
                bytes_pending: 0,
                initial_done: 0,
                initial_total: 0,
                throughput_bps: 0.0,
                bytes_sent: 0,
                wire_bytes_sent: 0,
                link_max_rate: 0,
                last_error: None,
                next_retry_unix: None,
                retry_step: None,
                retry_delay_secs: None,
                retries: 0,
                every_secs: spec.every_secs,
                resync: None,
                last_resync: None,
                resync_pending: Vec::new(),
                bitmap_only: Vec::new(),
                resync_window: spec.window().to_string(),
                last_app_point: None,
                last_app_point_unix_ns: None,
                app_hook_error: None,
                app_frozen_ms: None,
                health: alert::Health::default(),
                group: spec.group.clone(),
                group_waiting: None,
                protocol: None,
            }),
            spec,
            wake: Notify::new(),
            waiters: Mutex::new(Vec::new()),
            sync_requested: false.into(),
            copy_cycle: Mutex::new(self.load_copy_cycles(&spec_vm)),
            stop: false.into(),
            jobs: Mutex::new(Default::default()),
            last_app_try: Mutex::new(None),
            conn: Mutex::new(None),
            probed: Mutex::new(probed),
            udp_sent_before: std::sync::atomic::AtomicU64::new(0),
            definitions: Mutex::new(Default::default()),
            respec: Mutex::new(None),
            rates: Mutex::new(Default::default()),
            steady: false.into(),
            logs_ready: false.into(),
            group_cycles: Mutex::new(match &spec_group {
                Some(g) => group::sealed_group_cycles(&self.tracker, g, &spec_vm),
                None => Default::default(),
            }),
        });
        for d in &vm.spec.disks {
            let limit = self
                .tracker
                .disk_info(d)
                .map(|(_, size, ..)| (size as f64 * vm.spec.resync_threshold_pct / 100.0) as u64);
            self.tracker.set_log_limit(d, limit);
        }
        self.vms.lock().insert(vm.spec.vm.clone(), vm.clone());
        if let Some(g) = vm.spec.group.clone() {
            self.join_group(&g);
        }
        let me = self.clone();
        self.rt.spawn(async move { me.worker(vm).await });
    }

    pub fn status(&self) -> Vec<VmStatus> {
        let vms: Vec<Arc<Vm>> = self.vms.lock().values().cloned().collect();
        let tstat = self.tracker.status();
        let mut out: Vec<VmStatus> = vms
            .iter()
            .map(|v| {
                let mut s = v.status.lock().clone();
                s.wire_bytes_sent = v.wire_bytes_sent();
                s.link_max_rate = self.links.lock().get(&v.spec.to).map_or(0, |l| l.rate());
                let dirty: u64 = tstat
                    .disks
                    .iter()
                    .filter(|d| v.spec.disks.contains(&d.name))
                    .map(|d| d.dirty_bytes)
                    .sum();
                let logs: u64 = v
                    .spec
                    .disks
                    .iter()
                    .map(|d| self.tracker.pending_log_bytes(d))
                    .sum();
                s.bytes_pending = dirty + logs;
                s.bitmap_only = tstat
                    .disks
                    .iter()
                    .filter(|d| v.spec.disks.contains(&d.name) && d.bitmap_only)
                    .map(|d| d.name.clone())
                    .collect();
                if let Some(t) = s.last_point_unix_ns {
                    s.lag_secs = Some(now_ns().saturating_sub(t) as f64 / 1e9);
                }
                let written = tstat
                    .disks
                    .iter()
                    .filter(|d| v.spec.disks.contains(&d.name))
                    .map(|d| d.written_bytes)
                    .sum();
                s.health.rates = v.rates.lock().observe(
                    std::time::Instant::now(),
                    written,
                    s.wire_bytes_sent,
                    s.bytes_pending,
                );
                alert::apply(&mut s, v.spec.rpo_alert_secs);
                s
            })
            .collect();
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        out
    }

    /// Cut now and wait until the receiver has committed a point at least
    /// that new, durably (its logs stored; a store that commits durable
    /// logs applies them right after), or `timeout` passes, or the VM is
    /// Critical.
    pub fn sync(&self, vm: &str, timeout: Duration) -> Result<u64, SendError> {
        let v = self.vm(vm)?;
        if v.status.lock().state == VmState::Critical {
            return Err(SendError::unavailable(format!(
                "VM {vm} is Critical: {}",
                v.status.lock().last_error.clone().unwrap_or_default()
            )));
        }
        let (tx, rx) = oneshot::channel();
        // Any point sealed after this moment will do. Not `status()`: it
        // does not wait for a cut in progress, whose seal may already be
        // behind writes acknowledged before this call.
        let want = self.tracker.cut_seq_settled() + 1;
        v.waiters.lock().push((want, tx));
        v.sync_requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        v.wake.notify_one();
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(stopped(vm)),
                Err(_) => {
                    let s = v.status.lock().clone();
                    Err(SendError::new(
                        ErrorKind::TimedOut,
                        format!(
                            "timed out after {:?} waiting for {vm} to reach the receiver (state {:?}{})",
                            timeout,
                            s.state,
                            s.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                        ),
                    ))
                }
            }
        })
    }

    fn vm(&self, vm: &str) -> Result<Arc<Vm>, SendError> {
        self.vms
            .lock()
            .get(vm)
            .cloned()
            .ok_or_else(|| not_protected(vm))
    }

    /// `vdrep resync NAME`: resync every disk of the VM by checksums now
    /// (outside the window too). `wait`: return when it is complete (or
    /// `timeout` passes); else only queue it.
    pub fn resync_now(
        &self,
        vm: &str,
        wait: bool,
        timeout: Duration,
    ) -> Result<Option<ResyncProgress>, SendError> {
        let v = self.vm(vm)?;
        if v.status.lock().state == VmState::Critical {
            return Err(SendError::unavailable(format!(
                "VM {vm} is Critical: {}; protect it again first",
                v.status.lock().last_error.clone().unwrap_or_default()
            )));
        }
        if !wait {
            v.jobs.lock().push_back(Job::Resync(None));
            v.wake.notify_one();
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        v.jobs.lock().push_back(Job::Resync(Some(tx)));
        v.wake.notify_one();
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r.map(Some),
                Ok(Err(_)) => Err(stopped(vm)),
                Err(_) => Err(SendError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "timed out after {timeout:?}; the resync of {vm} goes on (see `vdrep status`)"
                    ),
                )),
            }
        })
    }

    /// `vdrep verify NAME`: ship everything, then compare every disk with
    /// the receiver's newest point by digests (no data shipped).
    pub fn verify(&self, vm: &str, timeout: Duration) -> Result<Vec<VerifyDisk>, SendError> {
        let v = self.vm(vm)?;
        let (tx, rx) = oneshot::channel();
        v.jobs.lock().push_back(Job::Verify(tx));
        v.wake.notify_one();
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(stopped(vm)),
                Err(_) => Err(SendError::new(
                    ErrorKind::TimedOut,
                    format!("timed out after {timeout:?} verifying {vm}"),
                )),
            }
        })
    }

    pub fn vm_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vms.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// A QUIC connection to the receiver of `spec` (mutual TLS) for one
    /// session: the one every session to that receiver shares
    /// (`vdrep-mux/1`, [`transport::mux`]), dialled by the first session
    /// that finds none open (the others wait for it), or, with a receiver
    /// that speaks only `vdrep/1` (or `VDREP_MUX=0`), the session's own.
    async fn dial(&self, spec: &ProtectSpec) -> Result<Dialed, SendError> {
        if !transport::mux::offered() {
            return self.dial_new(spec).await;
        }
        let key = format!("{} {:?}", spec.to, spec.trust);
        let shared = self.pool.lock().entry(key).or_default().clone();
        let asked = Instant::now();
        let mut slot = shared.lock().await;
        match &*slot {
            // The dial this session waited for failed: its error, not one
            // more dial (256 sessions waiting for a receiver that is down
            // would each wait out a handshake timeout in turn).
            PoolSlot::Failed(at, e) if *at >= asked => return Err(e.clone()),
            PoolSlot::Mux(m) if m.is_open() => {
                return Ok(Dialed {
                    conn: m.connection().clone(),
                    mux: Some(m.clone()),
                    endpoint: self.client_endpoint(&Self::dial_tuning())?,
                })
            }
            PoolSlot::Legacy => {
                // A connection per session: no need to wait for the others.
                drop(slot);
                let d = self.dial_new(spec).await?;
                if let Some(m) = &d.mux {
                    // The receiver was upgraded: share this one from now on.
                    *shared.lock().await = PoolSlot::Mux(m.clone());
                }
                return Ok(d);
            }
            _ => {}
        }
        let d = match self.dial_new(spec).await {
            Ok(d) => d,
            Err(e) => {
                *slot = PoolSlot::Failed(Instant::now(), e.clone());
                return Err(e);
            }
        };
        *slot = match &d.mux {
            Some(m) => PoolSlot::Mux(m.clone()),
            None => PoolSlot::Legacy,
        };
        Ok(d)
    }

    /// The tuning of the sender's connections: notice a dead receiver
    /// within seconds, not the default 30 s.
    fn dial_tuning() -> transport::Tuning {
        transport::Tuning {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            ..transport::Tuning::default()
        }
    }

    /// A new QUIC connection to the receiver of `spec`: shared
    /// ([`link::MuxConn`]) if it negotiated `vdrep-mux/1`.
    async fn dial_new(&self, spec: &ProtectSpec) -> Result<Dialed, SendError> {
        let id = self
            .identity
            .as_ref()
            .ok_or_else(|| SendError::fatal("no identity (mount with --keys)"))?;
        let direct = tokio::task::block_in_place(|| self.direct(spec))?;
        let (trust, addr) = match direct {
            // An object store: its embedded receiver, on loopback.
            Some(e) => {
                let mut trust = TrustStore::new();
                trust.add(e.cert());
                (trust, e.addr())
            }
            None => {
                let trust = TrustStore::from_files(&spec.trust)
                    .map_err(|e| SendError::fatal(e.to_string()))?;
                let addr: SocketAddr = tokio::net::lookup_host(&spec.to)
                    .await
                    .map_err(|e| retry(format!("cannot resolve {}: {e}", spec.to)))?
                    .next()
                    .ok_or_else(|| retry(format!("{} resolves to no address", spec.to)))?;
                (trust, addr)
            }
        };
        let tuning = Self::dial_tuning();
        let (cc, shares) =
            transport::mux_client_config(id, &trust, &tuning).map_err(|e| retry(e.to_string()))?;
        let ep = self.client_endpoint(&tuning)?;
        let conn = transport::connect_with(&ep, cc, addr, "vdrep")
            .await
            .map_err(|e| transport_err(&e, addr))?;
        let mux =
            transport::mux::negotiated(&conn).then(|| link::MuxConn::new(conn.clone(), shares));
        Ok(Dialed {
            conn,
            mux,
            endpoint: ep,
        })
    }

    /// The QUIC endpoint this daemon's sessions connect from: one for all
    /// of them (one UDP socket, one endpoint driver task), created at the
    /// first connection. Each connection has its own configuration (its
    /// VM's trust) and fails alone. Measured with 256 continuous VMs
    /// (`kernel-notes/replication-speed.md`, "Issue 12, session s6"): an
    /// endpoint per session meant 256 sockets and driver tasks on the
    /// runtime's 2 threads. `VDREP_ENDPOINT_PER_SESSION=1` brings that back
    /// (to measure).
    fn client_endpoint(&self, tuning: &transport::Tuning) -> Result<quinn::Endpoint, SendError> {
        let new = || transport::client_endpoint(tuning, None).map_err(|e| retry(e.to_string()));
        if std::env::var("VDREP_ENDPOINT_PER_SESSION").is_ok_and(|v| v == "1") {
            return new();
        }
        let mut shared = self.endpoint.lock();
        if let Some(ep) = shared.as_ref() {
            return Ok(ep.clone());
        }
        let ep = new()?;
        *shared = Some(ep.clone());
        Ok(ep)
    }

    /// The session of `spec`'s VM: every disk of it (none: a probe, which
    /// only says `Hello`).
    fn session_config(
        &self,
        spec: &ProtectSpec,
        with_disks: bool,
        last_point: u64,
    ) -> Result<SenderConfig, SendError> {
        let mut disks = Vec::new();
        for d in spec.disks.iter().filter(|_| with_disks) {
            let (id, size, bs, _) = self.disk_id(d)?;
            let kind = if d.to_ascii_lowercase().ends_with(".vhd") {
                wire::DiskKind::Vhd
            } else {
                wire::DiskKind::Raw
            };
            disks.push(wire::OpenDisk {
                vm: spec.vm.clone(),
                disk_name: d.clone(),
                disk_id: id,
                block_size: bs,
                disk_size: size,
                kind,
            });
        }
        Ok(SenderConfig {
            site_name: self.site.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            vm: spec.vm.clone(),
            disks,
            last_point,
            timeout_ns: link::ANSWER_TIMEOUT.as_nanos() as u64,
            chunk_size: LOG_CHUNK,
            // `VDREP_COMMIT_AHEAD=0`: commit after the last Ack (to measure).
            commit_ahead: std::env::var("VDREP_COMMIT_AHEAD").map_or(true, |v| v != "0"),
            // `VDREP_OPEN_WITH_HELLO=0`: open the disks after the Hello's
            // answer, as before protocol 7 (to measure).
            open_with_hello: std::env::var("VDREP_OPEN_WITH_HELLO").map_or(true, |v| v != "0"),
            // `VDREP_FOLLOW=0`: a disk's next log waits for the previous
            // one's Ack, as before protocol 8 (to measure).
            follow: std::env::var("VDREP_FOLLOW").map_or(true, |v| v != "0"),
            protocol_version: self.versions.speak(&spec.to, Instant::now()),
        })
    }

    /// Connect, say `Hello` and open the VM's disks (one flight): the
    /// receiver's answer, and the session if every disk answered too (the
    /// worker's first session runs on it: no second handshake, no second
    /// `OpenDisk`). A refused connection or `Hello` is the error; a disk the
    /// receiver refuses is not (the worker meets the refusal and reports
    /// it, as when the probe opened no disk). `VDREP_PROBE_REUSE=0`: say
    /// only `Hello` and close, as before (to measure).
    async fn probe(
        &self,
        spec: &ProtectSpec,
    ) -> Result<(wire::HelloOk, Option<link::Probed>), SendError> {
        let reuse = std::env::var("VDREP_PROBE_REUSE").map_or(true, |v| v != "0");
        loop {
            crate::util::phase::step("probe_dial", &spec.vm);
            let d = self.dial(spec).await?;
            crate::util::phase::step("probe_connected", &spec.vm);
            // The worker's first session would say the same (no point known).
            let cfg = self.session_config(spec, reuse, 0)?;
            let mut link = Link::new(d.conn, d.mux, d.endpoint, cfg, None, Arc::default());
            let ready = link.ready().await;
            crate::util::phase::step("probe_ready", &spec.vm);
            return match (link.peer().cloned(), ready) {
                (Some(hello), Ok(states)) if reuse => {
                    Ok((hello, Some(link::Probed { link, states })))
                }
                (Some(hello), _) => {
                    link.close(b"probe done");
                    Ok((hello, None))
                }
                // An older receiver: say `Hello` again in its version.
                (None, Err(e)) if self.older_protocol(spec, &e) => continue,
                (None, Err(e)) => Err(e),
                (None, Ok(_)) => Err(SendError::fatal("the receiver did not answer Hello")),
            };
        }
    }

    /// `e` is `spec`'s receiver refusing our protocol version (a receiver
    /// of an older build): note the older version it may speak
    /// ([`compat`]) and say so; true if there is one (try again at once).
    fn older_protocol(&self, spec: &ProtectSpec, e: &SendError) -> bool {
        let Some(refused) = e.refused_version() else {
            return false;
        };
        match self.versions.refused(&spec.to, refused, Instant::now()) {
            Some(older) => {
                tracing::warn!(
                    vm = %spec.vm,
                    "the receiver at {} refused protocol {refused} (it runs an older vdrep): \
                     replicating with protocol {older}, without what newer versions add \
                     (version 8: a disk's next log sent behind the one in flight); \
                     upgrade the receiver's site to get it back",
                    spec.to
                );
                true
            }
            None => false,
        }
    }
    async fn worker(self: Arc<Self>, vm: Arc<Vm>) {
        let mut backoff = retry::Backoff::default();
        let mut again = 0u32;
        loop {
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let r = self.session(&vm).await;
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let respec = vm.respec.lock().take();
            if let Some(spec) = respec {
                tracing::info!(vm = %vm.spec.vm, disks = ?spec.disks, "the domain's disk files changed: replicating the new set");
                self.respec(&vm, spec);
                return;
            }
            let Err(e) = r else { return };
            if self.older_protocol(&vm.spec, &e) {
                continue;
            }
            vm.status.lock().health.count_error(e.kind());
            match e.kind() {
                ErrorKind::ResyncRequired if again < 3 => {
                    again += 1;
                    tracing::info!(vm = %vm.spec.vm, "{e}; starting over at once");
                    vm.status.lock().last_error = Some(e.to_string());
                    continue;
                }
                // Still failing after three immediate tries: back off.
                ErrorKind::ResyncRequired => {}
                _ => again = 0,
            }
            match e.kind() {
                ErrorKind::ResyncRequired
                | ErrorKind::Retry
                | ErrorKind::TimedOut
                | ErrorKind::Unavailable => {
                    let progress = {
                        let s = vm.status.lock();
                        (s.last_point, s.initial_done)
                    };
                    let plan = backoff.failed(
                        &vm.spec.retry,
                        self.retry_scale,
                        vm.spec.every_secs,
                        progress,
                    );
                    // The first retry after progress goes at once when the
                    // receiver answered with a stateless reset: it is up.
                    let d = if e.peer_back() && plan.step == 0 {
                        Duration::ZERO
                    } else {
                        plan.delay
                    };
                    tracing::warn!(vm = %vm.spec.vm, "replication interrupted: {e}; retry in {d:?}");
                    {
                        let mut s = vm.status.lock();
                        s.state = if s.state == VmState::ResyncRequired {
                            s.state
                        } else {
                            VmState::Warning
                        };
                        s.last_error = Some(e.to_string());
                        s.retries += 1;
                        s.next_retry_unix =
                            Some((now_ns() + d.as_nanos() as u64).div_ceil(1_000_000_000));
                        s.retry_step = Some(plan.step);
                        s.retry_delay_secs = Some(d.as_secs_f64());
                    }
                    // A `sync` request retries at once. Meanwhile the 50%
                    // rule is watched (changes pile up while the link is down).
                    let until = Instant::now() + d;
                    loop {
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        let tick = (until - now).min(Duration::from_secs(1));
                        if tokio::time::timeout(tick, vm.wake.notified()).await.is_ok() {
                            break;
                        }
                        for disk in &vm.spec.disks {
                            self.tracker.enforce_log_limit(disk);
                        }
                    }
                    {
                        let mut s = vm.status.lock();
                        s.next_retry_unix = None;
                        s.retry_step = None;
                        s.retry_delay_secs = None;
                    }
                }
                ErrorKind::Fatal | ErrorKind::Invalid => {
                    tracing::error!(vm = %vm.spec.vm, "replication stopped (Critical): {e}");
                    {
                        let mut s = vm.status.lock();
                        s.state = VmState::Critical;
                        s.last_error = Some(e.to_string());
                    }
                    let why = SendError::unavailable(format!("VM {} is Critical: {e}", vm.spec.vm));
                    for (_, w) in vm.waiters.lock().drain(..) {
                        let _ = w.send(Err(why.clone()));
                    }
                    for j in vm.jobs.lock().drain(..) {
                        let why = why.clone();
                        match j {
                            Job::Resync(Some(tx)) => {
                                let _ = tx.send(Err(why));
                            }
                            Job::Verify(tx) => {
                                let _ = tx.send(Err(why));
                            }
                            Job::Resync(None) => {}
                        }
                    }
                    return;
                }
            }
        }
    }

    /// The shared cap of `spec.to`: created, or re-rated, by a spec that
    /// sets `link_max_rate`; `None` when no VM set one for that destination.
    fn link_share(&self, spec: &ProtectSpec) -> Option<Arc<LinkShare>> {
        let mut links = self.links.lock();
        if spec.link_max_rate > 0 {
            let l = links
                .entry(spec.to.clone())
                .or_insert_with(|| Arc::new(LinkShare::new(spec.link_max_rate)));
            if l.rate() != spec.link_max_rate {
                l.set_rate(spec.link_max_rate);
            }
        }
        links.get(&spec.to).cloned()
    }

    /// The disk named by a receiver's message about `id`: one of `vm`'s
    /// (else any tracked disk with that id).
    fn disk_of_id(&self, vm: &Vm, id: &[u8; 16]) -> Option<String> {
        self.tracker.disk_with_id(&vm.spec.disks, id)
    }

    fn disk_id(&self, name: &str) -> Result<([u8; 16], u64, u32, TrackState), SendError> {
        let (id, size, bs, st) = self.tracker.disk_info(name).ok_or_else(|| {
            SendError::fatal(format!(
                "disk {name} is no longer tracked (deleted or renamed?)"
            ))
        })?;
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(id.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
        }
        Ok((out, size, bs, st))
    }

    /// The replicas' states (as the session's `Ready` lists them, in the
    /// spec's disk order), by disk name.
    fn by_name(vm: &Vm, states: Vec<wire::DiskState>) -> HashMap<String, wire::DiskState> {
        vm.spec.disks.iter().cloned().zip(states).collect()
    }

    /// `OpenDisk` every disk of the VM again: where is each replica now?
    async fn open_disks(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
    ) -> Result<HashMap<String, wire::DiskState>, SendError> {
        // What the receiver holds is what it says now.
        for d in &vm.spec.disks {
            self.tracker.forget_delivered(d);
        }
        Ok(Self::by_name(vm, link.reopen().await?))
    }

    /// Do the disk's sealed logs (or its base) chain onto the replica's
    /// cycle? Also `(cycle, base cycle)` of each sealed log (None:
    /// unreadable).
    fn chain(&self, d: &str, ds: &wire::DiskState) -> (bool, Vec<(u64, Option<u64>)>) {
        let base = self.tracker.disk_base_cycle(d).unwrap_or(0);
        let logs: Vec<(u64, Option<u64>)> = self
            .tracker
            .pending_cycles(d)
            .into_iter()
            .map(|c| {
                let base = self
                    .tracker
                    .sealed_log(d, c)
                    .ok()
                    .and_then(|l| l.base_cycle());
                (c, base)
            })
            .collect();
        let continuous = ds.replica_cycle == base
            || logs
                .iter()
                .any(|(c, b)| *c > ds.replica_cycle && *b == Some(ds.replica_cycle))
            || logs.iter().any(|(c, _)| *c == ds.replica_cycle);
        (continuous, logs)
    }

    /// The block runs an extents-only resync of `d` compares (after an
    /// unclean stop with the activity log on), if that is all it needs:
    /// the receiver trusts the replica, the disk's logs chain onto it and no
    /// interrupted full resync is pending. `None`: a full resync.
    fn extents_only(&self, vm: &Vm, d: &str, ds: &wire::DiskState) -> Option<Vec<(u64, u64)>> {
        let (id, ..) = self.disk_id(d).ok()?;
        if !ds.needs_resync.is_empty()
            || resync::progress_path(self, &vm.spec.vm, &id).exists()
            || !self.chain(d, ds).0
        {
            return None;
        }
        self.tracker.resync_extents(d)
    }

    /// Which disks need a resync, and why (empty reasons: none).
    fn resync_reasons(
        &self,
        vm: &Vm,
        replica: &HashMap<String, wire::DiskState>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for d in &vm.spec.disks {
            let Some(ds) = replica.get(d) else { continue };
            let Ok((id, _, _, st)) = self.disk_id(d) else {
                continue;
            };
            let base = self.tracker.disk_base_cycle(d).unwrap_or(0);
            let (continuous, logs) = self.chain(d, ds);
            let why = if let TrackState::ResyncRequired(w) = st {
                Some(w)
            } else if !ds.needs_resync.is_empty() && !continuous {
                Some(format!("the receiver: {}", ds.needs_resync))
            } else if !ds.needs_resync.is_empty()
                && !logs.iter().any(|(_, b)| *b == Some(ds.replica_cycle))
            {
                // Nothing to offer but fresh changes: resync.
                Some(format!("the receiver: {}", ds.needs_resync))
            } else if resync::progress_path(self, &vm.spec.vm, &id).exists() {
                Some("a resync was interrupted".into())
            } else if !continuous {
                Some(format!(
                    "the changes since the replica's cycle {} are no longer all here (the sender is at cycle {base})",
                    ds.replica_cycle
                ))
            } else {
                None
            };
            if let Some(w) = why {
                out.push((d.clone(), w));
            }
        }
        out
    }

    /// One connected session: sync up, then cut and ship until an error.
    async fn session(&self, vm: &Arc<Vm>) -> Result<(), SendError> {
        let spec = &vm.spec;
        crate::util::phase::step("session_start", &spec.vm);
        // A new connection: the receiver says what it holds.
        for d in &spec.disks {
            self.tracker.forget_delivered(d);
        }
        let last_point = vm.status.lock().last_point.unwrap_or(0);
        let shaper = Arc::new(Shaper::new(spec.max_rate, self.link_share(spec)));
        // `protect`'s session, if it is still up (it said what this one
        // would: no point known).
        let probed = vm.probed.lock().take();
        let (mut link, states) = match probed.filter(|p| last_point == 0 && p.link.is_open()) {
            Some(link::Probed { mut link, states }) => {
                link.adopt(vm.clone(), shaper);
                (link, Some(states))
            }
            None => {
                // The session commits again a point the replicas all
                // reached but whose `PointAck` was lost (idempotent at the
                // receiver).
                let cfg = self.session_config(spec, true, last_point)?;
                let d = self.dial(spec).await?;
                let link = Link::new(d.conn, d.mux, d.endpoint, cfg, Some(vm.clone()), shaper);
                (link, None)
            }
        };
        let _live = LiveConn::new(vm, &link);
        let link = &mut link;
        let _steady = Steady(vm);
        for (c, x) in vm.definitions.lock().iter() {
            link.note_definition(*c, x.clone());
        }
        let states = match states {
            Some(s) => s,
            None => link.ready().await?,
        };
        crate::util::phase::step("session_ready", &spec.vm);
        vm.status.lock().protocol = link.peer().map(|h| h.protocol_version);
        let mut replica = Self::by_name(vm, states);
        // No complete replica (or a copy under way): initial copy of the
        // disks without one, and only of those. The disks with a replica
        // keep it (and its history): those whose logs chain onto it
        // continue by a log of the copy's cut; those that need a resync
        // are left out of that cut and resynced by checksums right after
        // it. (Copying them whole too, as before, threw their history
        // away for nothing.)
        let need_initial = replica.values().any(|ds| ds.replica_cycle == 0);
        let mut copied = false;
        if need_initial {
            vm.status.lock().state = VmState::InitialReplication;
            let have: HashMap<String, wire::DiskState> = replica
                .iter()
                .filter(|(_, ds)| ds.replica_cycle != 0)
                .map(|(d, ds)| (d.clone(), ds.clone()))
                .collect();
            let later: Vec<String> = self
                .resync_reasons(vm, &have)
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            let copies: Vec<&String> = spec
                .disks
                .iter()
                .filter(|d| !have.contains_key(*d))
                .collect();
            let what = format!(
                "initial copy of {copies:?} (no replica at the receiver); {} disk(s) keep their replica{}",
                have.len(),
                if later.is_empty() {
                    String::new()
                } else {
                    format!(", {later:?} resynced by checksums after the copy")
                }
            );
            if last_point > 0 {
                // The VM had points: those that include a copied disk end
                // (the receiver logs which).
                tracing::warn!(vm = %spec.vm, "{what}: the recovery points that include these disks are dropped at the receiver");
            } else {
                tracing::info!(vm = %spec.vm, "{what}");
            }
            self.initial_copy(vm, link, &replica, &later).await?;
            if later.is_empty() {
                copied = true;
            } else {
                replica = self.open_disks(vm, link).await?;
            }
        }
        if !copied {
            let mut resynced = false;
            let mut reasons = self.resync_reasons(vm, &replica);
            if !reasons.is_empty() {
                // Automatic resyncs wait for the window; `vdrep resync`
                // starts one at once.
                let window = spec.window();
                loop {
                    if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                        link.close(b"unprotected");
                        return Ok(());
                    }
                    // `vdrep resync` and `vdrep sync` (which cannot finish
                    // without it) start the resync outside the window too;
                    // so does a small one (only activity-log extents after
                    // an unclean stop): the window is for full resyncs.
                    // So does one right after an initial copy of another
                    // disk: until it ends the VM has no point over all its
                    // disks (it costs less than the copy just made).
                    let manual = vm.jobs.lock().iter().any(|j| matches!(j, Job::Resync(_)))
                        || !vm.waiters.lock().is_empty()
                        || need_initial;
                    let small = reasons.iter().all(|(d, _)| {
                        replica
                            .get(d)
                            .is_some_and(|ds| self.extents_only(vm, d, ds).is_some())
                    });
                    if manual || small || window.open_now() {
                        break;
                    }
                    {
                        let mut s = vm.status.lock();
                        s.state = VmState::ResyncRequired;
                        s.resync_pending =
                            reasons.iter().map(|(d, w)| format!("{d}: {w}")).collect();
                        s.last_error = Some(format!(
                            "resync required; it runs in the resync window ({window}) or now with `vdrep resync {}`",
                            spec.vm
                        ));
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(20), vm.wake.notified()).await;
                    replica = self.open_disks(vm, link).await?;
                    reasons = self.resync_reasons(vm, &replica);
                    if reasons.is_empty() {
                        break;
                    }
                }
                if !reasons.is_empty() {
                    {
                        let mut s = vm.status.lock();
                        s.resync_pending =
                            reasons.iter().map(|(d, w)| format!("{d}: {w}")).collect();
                    }
                    for (d, w) in &reasons {
                        tracing::info!(vm = %spec.vm, disk = %d, "checksum resync: {w}");
                    }
                    let rdisks: Vec<String> = reasons.into_iter().map(|(d, _)| d).collect();
                    self.resync(vm, link, &replica, &rdisks).await?;
                    resynced = true;
                    vm.status.lock().resync_pending.clear();
                    // A waiting `vdrep resync` is answered by this one.
                    self.answer_resync_jobs(vm);
                }
            }
            if !resynced {
                self.ship_pending(vm, link, &replica).await?;
            }
        }
        if !vm.waiters.lock().is_empty() {
            // A `vdrep sync` still waits: cut now rather than at the next
            // scheduled cycle.
            vm.sync_requested
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        {
            let mut s = vm.status.lock();
            s.state = VmState::Normal;
            s.last_error = None;
        }
        // Steady state: cut, ship, commit. `--every N` is a fixed schedule
        // (a cut every N seconds from the start of the previous one), not a
        // pause after each cycle, so the lag stays near N.
        let every = Duration::from_secs(spec.every_secs);
        let mut next_cut = Instant::now() + every;
        let mut last_cut: Option<Instant> = None;
        loop {
            // A cycle still in flight (pipelined): finish it unless the
            // next cut is due now.
            self.drive(vm, link, Until::NextCut).await?;
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                link.close(b"unprotected");
                return Ok(());
            }
            if vm.respec.lock().is_some() {
                link.close(b"the domain's disks changed");
                return Ok(());
            }
            vm.steady.store(false, std::sync::atomic::Ordering::SeqCst);
            if self.run_jobs(vm, link).await? {
                continue;
            }
            if let Some(g) = &spec.group {
                // A group member: its group's coordinator cuts it
                // ([`group`]); it ships what was sealed.
                vm.steady.store(true, std::sync::atomic::Ordering::SeqCst);
                if vm
                    .sync_requested
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    self.group_sync(g);
                }
                if vm
                    .logs_ready
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    self.ship_group_cut(vm, link).await?;
                    continue;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), vm.wake.notified()).await;
                continue;
            }
            let synced = vm
                .sync_requested
                .swap(false, std::sync::atomic::Ordering::SeqCst);
            if !synced && spec.every_secs > 0 {
                let now = Instant::now();
                if now < next_cut {
                    let _ = tokio::time::timeout(next_cut - now, vm.wake.notified()).await;
                    // Woken early by a sync or unprotect: look again.
                    continue;
                }
            } else if !synced {
                // Continuous: next cycle as soon as this one is acknowledged,
                // but don't spin on an idle disk.
                let dirty = self.tracker.dirty_blocks_of(&spec.disks);
                if dirty == 0 && vm.waiters.lock().is_empty() {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), vm.wake.notified()).await;
                    continue;
                }
            }
            let started = Instant::now();
            if let Some(prev) = last_cut.replace(started) {
                crate::util::phase::done("cycle_period", &spec.vm, prev);
            }
            self.cut_and_ship(vm, link, Until::NextCut).await?;
            if spec.every_secs > 0 {
                next_cut = (started + every).max(next_cut);
            }
        }
    }

    /// Answer every queued `vdrep resync` (a resync just finished).
    fn answer_resync_jobs(&self, vm: &Vm) {
        let done = vm.status.lock().last_resync.clone().unwrap_or_default();
        let mut jobs = vm.jobs.lock();
        let mut keep = std::collections::VecDeque::new();
        for j in jobs.drain(..) {
            match j {
                Job::Resync(Some(tx)) => {
                    let _ = tx.send(Ok(done.clone()));
                }
                Job::Resync(None) => {}
                other => keep.push_back(other),
            }
        }
        *jobs = keep;
    }

    /// Run the oldest queued job, if any (true if one ran).
    async fn run_jobs(&self, vm: &Arc<Vm>, link: &mut Link) -> Result<bool, SendError> {
        let kind = match vm.jobs.lock().front() {
            None => return Ok(false),
            Some(Job::Resync(_)) => 0,
            Some(Job::Verify(_)) => 1,
        };
        if kind == 0 {
            // Everything shipped first, then every disk compared.
            self.cut_and_ship(vm, link, Until::Applied).await?;
            let replica = self.open_disks(vm, link).await?;
            let disks = vm.spec.disks.clone();
            self.resync(vm, link, &replica, &disks).await?;
            vm.status.lock().state = VmState::Normal;
            self.answer_resync_jobs(vm);
        } else {
            let r = self.verify_now(vm, link).await;
            let job = vm.jobs.lock().pop_front();
            let r = match r {
                Ok(v) => Ok(v),
                Err(e) if e.kind() == ErrorKind::Fatal => Err(e),
                Err(e) => {
                    // Put it back for the next session.
                    if let Some(j) = job {
                        vm.jobs.lock().push_front(j);
                    }
                    return Err(e);
                }
            };
            if let Some(Job::Verify(tx)) = job {
                let _ = tx.send(r);
            }
        }
        Ok(true)
    }

    /// Ship everything, then compare every disk as of a fresh cut with the
    /// receiver's newest point, without shipping data.
    async fn verify_now(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
    ) -> Result<Vec<VerifyDisk>, SendError> {
        self.cut_and_ship(vm, link, Until::Applied).await?;
        let replica = self.open_disks(vm, link).await?;
        let spec = vm.spec.clone();
        let tracker = self.tracker.clone();
        let flush = self.flush.clone();
        let sel = CutSelect {
            disks: Some(spec.disks.clone()),
            full_from: spec.disks.iter().map(|d| (d.clone(), 0)).collect(),
            ..Default::default()
        };
        let sealed = tokio::task::spawn_blocking(move || {
            flush.flush()?;
            tracker.seal(&sel)
        })
        .await
        .map_err(|e| retry(format!("cut task failed: {e}")))?
        .map_err(|e| retry(e.to_string()))?;
        if let Some(e) = sealed.skipped.first() {
            return Err(SendError::fatal(format!(
                "cannot verify {}: {}",
                e.disk,
                e.error.clone().unwrap_or_default()
            )));
        }
        let mut out = Vec::new();
        let mut cycles = sealed.cycles;
        let mut err = None;
        while let Some(sc) = cycles.pop() {
            if err.is_some() {
                let _ = self.tracker.finish(sc, false);
                continue;
            }
            let name = sc.header.disk_name.clone();
            let bs = u64::from(sc.header.block_size);
            let size = sc.header.disk_size;
            let rc = replica.get(&name).map(|d| d.replica_cycle).unwrap_or(0);
            let skip = sc.changed_runs();
            let skipped: u64 = skip.iter().map(|r| r.1).sum();
            let (back, r) = self
                .compare(vm, link, sc, rc, resync::Mode::Verify { skip }, None, None)
                .await;
            if let Some(sc) = back {
                // Nothing shipped: the cut's changes stay for the next delta.
                let _ = self.tracker.finish(sc, false);
            }
            match r {
                Ok(c) => out.push(VerifyDisk {
                    disk: name,
                    replica_cycle: rc,
                    blocks_compared: c.compared,
                    blocks_skipped: skipped,
                    differ: crate::resync::byte_ranges(&c.differ, bs, size),
                }),
                Err(e) => err = Some(e),
            }
        }
        {
            let mut s = vm.status.lock();
            if let Some(r) = s.resync.take() {
                s.last_resync = Some(r);
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        out.sort_by(|a, b| a.disk.cmp(&b.disk));
        Ok(out)
    }

    /// Flush the kernel cache, seal the VM's disks at one instant, write
    /// their logs and ship them.
    /// It returns as `until` says ([`Self::drive`]).
    async fn cut_and_ship(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        until: Until,
    ) -> Result<(), SendError> {
        let tracker = self.tracker.clone();
        let flush = self.flush.clone();
        let parts = [group::CutPart {
            vm: vm.spec.vm.clone(),
            hook: vm.app_hook_due(),
            disks: vm.spec.disks.clone(),
        }];
        let asked = Instant::now();
        let (entries, apps) = tokio::task::spawn_blocking(move || {
            group::freeze_seal_thaw(&tracker, &flush, &parts, true, None)
        })
        .await
        .map_err(|e| retry(format!("cut task failed: {e}")))?
        .map_err(retry)?;
        crate::util::phase::done("cut", &vm.spec.vm, asked);
        for app in &apps {
            vm.note_app_cut(app);
        }
        if let Some(e) = entries.iter().find(|e| e.log.is_none()) {
            if e.kind == Some(CutErrorKind::ResyncRequired) {
                vm.status.lock().state = VmState::ResyncRequired;
                return Err(retry(format!(
                    "{}: {}",
                    e.disk,
                    e.error.clone().unwrap_or_default()
                )));
            }
        }
        if let Some(cycle) = entries.iter().find(|e| e.log.is_some()).map(|e| e.cycle) {
            self.note_domain(vm, link, cycle).await;
        }
        let replica: HashMap<String, wire::DiskState> = HashMap::new();
        self.ship_logs(vm, link, &replica, until).await?;
        // Committed: only the newest definition is still needed (a cycle
        // still in flight may need its own again after a reconnect).
        if link.is_idle() {
            let mut defs = vm.definitions.lock();
            if let Some(&newest) = defs.keys().next_back() {
                *defs = defs.split_off(&newest);
            }
        }
        Ok(())
    }

    /// A group member ships the cycle(s) its group's coordinator sealed.
    async fn ship_group_cut(&self, vm: &Arc<Vm>, link: &mut Link) -> Result<(), SendError> {
        let newest = vm.group_cycles.lock().keys().next_back().copied();
        if let Some(cycle) = newest {
            self.note_domain(vm, link, cycle).await;
        }
        self.ship_logs(vm, link, &HashMap::new(), Until::NextCut)
            .await?;
        if link.is_idle() {
            let done = vm.status.lock().last_point.unwrap_or(0);
            vm.group_cycles.lock().retain(|c, _| *c > done);
            self.tracker.prune_cut_notes(done);
            let mut defs = vm.definitions.lock();
            if let Some(&newest) = defs.keys().next_back() {
                *defs = defs.split_off(&newest);
            }
        }
        Ok(())
    }

    /// A domain-protected VM: read the domain's definition as of the cut
    /// of `cycle` (after the seal, so off the guest's freeze) for the
    /// cycle's point. If its disk files are no longer the protected ones,
    /// the point keeps the previous definition and the worker restarts on
    /// the new set after this cycle ([`Vm::respec`]).
    async fn note_domain(&self, vm: &Arc<Vm>, link: &mut Link, cycle: u64) {
        let Some(domain) = vm.spec.domain.clone() else {
            return;
        };
        let dir = self.mount_dir.clone();
        let now = tokio::task::spawn_blocking(move || domain_disks(&dir, &domain)).await;
        let (xml, disks) = match now {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.spec.vm, "point {cycle} has no domain definition: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(vm = %vm.spec.vm, "point {cycle} has no domain definition: {e}");
                return;
            }
        };
        let mut want = disks.clone();
        want.sort();
        let mut have = vm.spec.disks.clone();
        have.sort();
        if want == have {
            vm.definitions.lock().insert(cycle, xml.clone());
            link.note_definition(cycle, xml);
            return;
        }
        let tracked = self.tracker.disk_names();
        if let Some(d) = disks.iter().find(|d| !tracked.contains(d)) {
            tracing::warn!(vm = %vm.spec.vm, "domain {} has a new disk {d} that is not a tracked disk file (tracked: *.vhd *.vhdx *.img *.raw *.qcow2): the disks and definition stay as they were", vm.spec.domain.as_deref().unwrap_or_default());
            return;
        }
        *vm.respec.lock() = Some(ProtectSpec {
            disks,
            ..vm.spec.clone()
        });
    }

    /// [`Self::ship_logs`] without pipelining: return once all is applied
    /// and committed.
    async fn ship_pending(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        replica: &HashMap<String, wire::DiskState>,
    ) -> Result<(), SendError> {
        self.ship_logs(vm, link, replica, Until::Applied).await
    }

    /// Ship every sealed log of the VM's disks, oldest cycle first (the
    /// session runs one log per disk at a time, in order, and commits each
    /// cycle that every disk reached), and wait as `until` says
    /// ([`Self::drive`]). Logs
    /// already in flight on `link` are not submitted again. A damaged log
    /// stops the submitting: what was submitted before it still ships, then
    /// the disk is resynced.
    async fn ship_logs(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        replica: &HashMap<String, wire::DiskState>,
        until: Until,
    ) -> Result<(), SendError> {
        let spec = &vm.spec;
        let mut by_cycle: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for d in &spec.disks {
            let at = replica.get(d).map(|s| s.replica_cycle).unwrap_or(0);
            if at != 0 {
                // Already applied there: drop them.
                self.tracker.discard_logs(d, Some(at));
            }
            let (id, ..) = self.disk_id(d)?;
            for c in self.tracker.pending_cycles(d) {
                if (at == 0 || c > at) && !link.in_flight(&id, c) {
                    by_cycle.entry(c).or_default().push(d.clone());
                }
            }
        }
        let mut damaged = None;
        'cycles: for (cycle, disks) in by_cycle {
            // Each log is opened once: its header now, its bytes when sent.
            let logs = disks
                .iter()
                .map(|d| self.tracker.sealed_log(d, cycle))
                .collect::<Result<Vec<SealedLog>, _>>()
                .map_err(retry)?;
            // App-consistent iff every disk's log of the cut says so.
            let app = logs
                .iter()
                .all(|l| l.header().is_ok_and(|h| h.app_consistent));
            if let Some(g) = vm.group_cycles.lock().get(&cycle) {
                link.note_group(cycle, g.clone());
            }
            for log in logs {
                let (id, ..) = self.disk_id(log.disk())?;
                // The header says what the log is; the receiver verifies
                // every record and the seal before it applies anything.
                let begin = match log.header() {
                    Ok(h) => {
                        link.note_cut(cycle, h.cut_unix_ns);
                        let mut b = wire::LogBegin::from_header(h, log.len());
                        b.disk_id = id;
                        b
                    }
                    Err(e) => {
                        let why = format!("sealed log {} is damaged: {e}", log.shown().display());
                        self.tracker.require_resync(log.disk(), &why);
                        log.discard();
                        damaged = Some(SendError::new(
                            ErrorKind::ResyncRequired,
                            format!("{why}; the disk is resynced by checksums"),
                        ));
                        break 'cycles;
                    }
                };
                // From here the receiver may apply it even if this
                // session dies before the ack: the 50% rule keeps it.
                self.tracker.note_submitted(log.disk(), cycle);
                link.submit_log(begin, log, app)?;
            }
        }
        let until = if damaged.is_some() {
            Until::Applied
        } else {
            until
        };
        self.drive(vm, link, until).await?;
        damaged.map_or(Ok(()), Err)
    }

    /// Whether the steady-state loop would cut the next cycle at once: a
    /// `vdrep sync` asked for it, or (continuous) the disks have new
    /// changes; never while the VM stops, changes disks or has a job.
    fn cut_due_now(&self, vm: &Vm) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if vm.stop.load(SeqCst) || vm.respec.lock().is_some() || !vm.jobs.lock().is_empty() {
            return false;
        }
        if vm.spec.group.is_some() {
            // Its group's coordinator cut it: ship that behind these.
            return vm.logs_ready.load(SeqCst);
        }
        vm.sync_requested.load(SeqCst)
            || (vm.spec.every_secs == 0 && self.tracker.dirty_blocks_of(&vm.spec.disks) > 0)
    }

    /// Drive `link` until everything submitted is applied and its points
    /// committed ([`Until::Applied`]), or only durable and committed
    /// ([`Until::Committed`]). With [`Until::NextCut`], return as soon as
    /// every submitted byte is sent and the next cut is due
    /// ([`Self::cut_due_now`]): the caller
    /// cuts that cycle and submits its logs behind these, so its transfer
    /// starts at once (protocol 7: the session sends a disk's next log
    /// behind the one being applied) instead of a cut later (the receiver
    /// applies each disk's logs in order, one at a time, and the session
    /// commits points in cycle order: consistency and the durability order
    /// are those of one cycle at a time).
    async fn drive(&self, vm: &Arc<Vm>, link: &mut Link, until: Until) -> Result<(), SendError> {
        let pipeline = until == Until::NextCut;
        while !link.is_idle() {
            if until == Until::Committed && link.settled() {
                return Ok(());
            }
            let waiting = pipeline && link.all_sent();
            if waiting && self.cut_due_now(vm) {
                return Ok(());
            }
            let action = if waiting {
                // Look again when a sync arrives or writes may have.
                tokio::select! {
                    a = link.next() => a?,
                    () = vm.wake.notified() => continue,
                    () = tokio::time::sleep(PIPELINE_POLL) => continue,
                }
            } else {
                link.next().await?
            };
            match action {
                SenderAction::LogDurable { disk_id, cycle } => {
                    // At the receiver: no longer pending here (the log
                    // stays until applied, to be resent).
                    if let Some(d) = self.disk_of_id(vm, &disk_id) {
                        self.tracker.note_delivered(&d, cycle);
                        self.logs_again_if_delivered(&d);
                    }
                }
                SenderAction::LogApplied { disk_id, .. } => {
                    if let Some(d) = self.disk_of_id(vm, &disk_id) {
                        self.logs_again_if_delivered(&d);
                    }
                }
                SenderAction::JobFailed { job, error, .. } => {
                    return Err(self.job_failed(vm, link, &job, &error))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A bitmap-only disk whose backlog is all at the receiver (every
    /// sealed log left is durable there, or none is left) writes logs
    /// again.
    fn logs_again_if_delivered(&self, d: &str) {
        let delivered = self.tracker.delivered(d);
        if self.tracker.bitmap_only(d)
            && self
                .tracker
                .pending_cycles(d)
                .iter()
                .all(|c| *c <= delivered)
        {
            self.tracker.clear_bitmap_only(d);
        }
    }

    /// What a failed transfer means: a log the receiver refused because it
    /// no longer trusts the replica marks the disk for a checksum resync.
    fn job_failed(&self, vm: &Vm, link: &Link, job: &SessionJob, e: &SessionError) -> SendError {
        if let (
            SessionJob::Log { .. },
            SessionError::Peer {
                code: wire::ErrorCode::ResyncRequired,
                message,
                ..
            },
        ) = (job, e)
        {
            let why = format!("receiver: {message}");
            if let Some(d) = self.disk_of_id(vm, &job.disk_id()) {
                self.tracker.require_resync(&d, &why);
            }
            return SendError::new(ErrorKind::ResyncRequired, why);
        }
        link.error(e)
    }

    /// Whole-disk cycle of every disk of the VM, sealed at one instant and
    /// streamed disk after disk; resumes an interrupted copy of the same
    /// cycle range from the receiver's `resume_offset`. The session commits
    /// the point once the last disk is applied.
    ///
    /// Only the disks without a replica are copied whole: the disks that
    /// have one are cut with them and continue by a log of the same cycle,
    /// except `later` (disks with a replica that needs a checksum resync):
    /// they are left out of the cut, and neither shipped nor committed
    /// here; the caller resyncs them next (the point of the copy's cycle
    /// then never exists, the resync's cycle is the first point over
    /// every disk).
    async fn initial_copy(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        replica: &HashMap<String, wire::DiskState>,
        later: &[String],
    ) -> Result<(), SendError> {
        let spec = &vm.spec;
        let mut full_from = HashMap::new();
        {
            let cc = vm.copy_cycle.lock();
            for d in &spec.disks {
                let ds = replica.get(d).ok_or_else(|| {
                    SendError::fatal(format!("{d} was not opened at the receiver"))
                })?;
                if ds.replica_cycle != 0 {
                    continue;
                }
                let resume = match cc.get(d) {
                    Some(c) if *c == ds.copy_cycle && ds.copy_cycle != 0 => ds.resume_offset,
                    _ => 0,
                };
                full_from.insert(d.clone(), resume);
            }
        }
        let tracker = self.tracker.clone();
        let sel = CutSelect {
            disks: Some(
                spec.disks
                    .iter()
                    .filter(|d| !later.contains(d))
                    .cloned()
                    .collect(),
            ),
            full_from: full_from.clone(),
            ..Default::default()
        };
        let sealed = seal_vm(self.flush.clone(), tracker, move |t| t.seal_for_copy(&sel)).await?;
        crate::util::phase::step("copy_sealed", &spec.vm);
        let cycle = sealed.cycle;
        link.note_cut(cycle, sealed.cut_unix_ns);
        self.note_domain(vm, link, cycle).await;
        // Disks that keep their replica: a log of this cycle, shipped below.
        let (copies, logs): (Vec<SealedCycle>, Vec<SealedCycle>) = sealed
            .cycles
            .into_iter()
            .partition(|sc| full_from.contains_key(&sc.header.disk_name));
        let t = self.tracker.clone();
        let written = tokio::task::spawn_blocking(move || {
            logs.into_iter()
                .map(|sc| t.write_log(sc))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| retry(format!("writing logs failed: {e}")))?;
        if let Some(e) = written.iter().find(|e| e.log.is_none()) {
            return Err(retry(format!(
                "{}: {}",
                e.disk,
                e.error.clone().unwrap_or_default()
            )));
        }
        {
            let mut s = vm.status.lock();
            s.initial_total = copies.iter().map(|c| c.dirty_bytes()).sum();
            s.initial_done = 0;
        }
        let mut cycles = copies.into_iter();
        while let Some(sc) = cycles.next() {
            let name = sc.header.disk_name.clone();
            vm.copy_cycle.lock().insert(name.clone(), cycle);
            self.save_copy_cycles(vm);
            let (sc, r) = self.copy_disk(vm, link, sc).await;
            let ok = r.is_ok();
            let mut rest: Vec<SealedCycle> = sc.into_iter().collect();
            if !ok {
                rest.extend(cycles.by_ref());
            }
            let t = self.tracker.clone();
            // The copy's point, sent with its end, may be acknowledged
            // meanwhile: the session goes on while the tracker finishes.
            link.drive_while(tokio::task::spawn_blocking(move || {
                for sc in rest {
                    if let Err(e) = t.finish(sc, ok) {
                        tracing::error!("{e}");
                    }
                }
            }))
            .await
            .map_err(|e| retry(e.to_string()))?;
            r?;
            vm.copy_cycle.lock().remove(&name);
            self.save_copy_cycles(vm);
        }
        // Old logs are superseded by the copy.
        for d in spec.disks.iter().filter(|d| full_from.contains_key(*d)) {
            self.tracker.discard_logs(d, Some(cycle));
        }
        // The disks that keep their replica ship their logs (this cut's
        // among them) here, or in the resync of `later` that follows.
        if full_from.len() < spec.disks.len() && later.is_empty() {
            self.ship_pending(vm, link, replica).await?;
        }
        self.settle(vm, link).await
    }

    /// Copy one disk as of its cut (from `full_from`, and what changed
    /// below it since the interrupted copy); hands the sealed cycle back
    /// with the outcome (the caller finishes it either way).
    async fn copy_disk(
        &self,
        vm: &Vm,
        link: &mut Link,
        sc: SealedCycle,
    ) -> (Option<SealedCycle>, Result<(), SendError>) {
        let begin = wire::InitialBegin {
            disk_id: sc.header.disk_id,
            cycle: sc.header.cycle,
            disk_size: sc.header.disk_size,
            start_offset: sc.full_from.unwrap_or(0),
        };
        // The sealed cycle is read by a blocking thread (it takes locks and
        // preads); pieces come over a small channel so memory stays bounded.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let pool = Arc::new(link::BufPool::default());
        let to_sink = pool.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut out = link::PieceSink::new(tx, to_sink);
            let r = sc.stream_into(0, &mut out);
            out.end(&r, &sc.header.disk_name);
            sc
        });
        let mut r = link.submit_initial(begin.clone(), rx, pool);
        while r.is_ok() {
            match link.next().await {
                Ok(SenderAction::InitialApplied { disk_id, .. }) if disk_id == begin.disk_id => {
                    break
                }
                Ok(SenderAction::JobFailed { job, error, .. }) => {
                    r = Err(self.job_failed(vm, link, &job, &error))
                }
                Ok(_) => {}
                Err(e) => r = Err(e),
            }
        }
        // The reader stops once nothing reads its pieces.
        link.forget(begin.disk_id, begin.cycle);
        match link.drive_while(reader).await {
            Ok(sc) => (Some(sc), r),
            // The thread died with the cycle: nothing to finish.
            Err(e) => (None, Err(retry(format!("the disk reader failed: {e}")))),
        }
    }

    /// Wait until every job submitted ended and the points due are
    /// committed.
    async fn settle(&self, vm: &Vm, link: &mut Link) -> Result<(), SendError> {
        while !link.is_idle() {
            if let SenderAction::JobFailed { job, error, .. } = link.next().await? {
                return Err(self.job_failed(vm, link, &job, &error));
            }
        }
        Ok(())
    }
}

/// How long [`Replicator::drive`] drives a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Every job submitted ended (applied at the receiver) and the points
    /// due are committed.
    Applied,
    /// Every log submitted is durable at the receiver and the points due
    /// are committed (with a store that commits durable logs; else as
    /// [`Until::Applied`]): what a resync waits for, as `vdrep sync` does.
    Committed,
    /// As [`Until::Applied`], or sooner: once every byte is sent and the
    /// next cut is due (pipelined cycles).
    NextCut,
}

/// What the app hook did around one cut.
#[derive(Default)]
struct AppCut {
    tried: bool,
    frozen: bool,
    frozen_ms: Option<f64>,
    error: Option<String>,
}

/// Domain `domain`'s definition now (`virsh dumpxml --inactive`) and the
/// disk files of it that vdrep replicates (writable file disks), relative
/// to the mount `dir`; an error names a disk that is not a file under it.
pub fn domain_disks(
    dir: &Path,
    domain: &str,
) -> Result<(String, Vec<String>), crate::libvirt::LibvirtError> {
    let xml = crate::libvirt::Virsh::new().dumpxml(domain)?;
    let def = crate::libvirt::Definition::parse(&xml)?;
    let mut disks = Vec::new();
    for d in def
        .disks
        .iter()
        .filter(|d| !d.readonly && matches!(d.device.as_str(), "disk" | "lun"))
    {
        let rel = d
            .file
            .as_deref()
            .filter(|_| d.is_replicated())
            .and_then(|f| f.strip_prefix(dir).ok());
        match rel {
            Some(r) => disks.push(r.to_string_lossy().into_owned()),
            None => {
                return Err(crate::libvirt::LibvirtError::Refused(format!(
                    "disk {} of domain {domain} ({}) is not a file under {}: vdrep replicates disk files under its mount",
                    d.target,
                    d.source,
                    dir.display()
                )))
            }
        }
    }
    Ok((xml, disks))
}

fn not_protected(vm: &str) -> SendError {
    SendError::invalid(format!("VM {vm} is not protected here"))
}

fn stopped(vm: &str) -> SendError {
    SendError::unavailable(format!("replication of {vm} stopped"))
}
