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
//! Errors ([`SendError`], decided on its [`ErrorKind`]): recoverable ones
//! (network, receiver disk full, busy) put the VM in `Warning` and retry
//! after 1, 2, 4, 8, 10 minutes, then every 30 minutes (scaled by
//! `VDREP_RETRY_SCALE` so tests run in seconds); unrecoverable ones (refused
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

use crate::hrl::Encoding;
use crate::tracking::{CutErrorKind, CutSelect, DiskState as TrackState, SealedLog, Tracker};
use crate::transport::{self, keys::Identity, trust::TrustStore};
use crate::util::now_ns;
use crate::wire::{self, Msg};
use shaper::{Class, LinkShare, Shaper};

pub mod alert;
pub mod app_hook;
mod error;
pub mod metrics;
mod resync;
pub mod shaper;

use error::{conn_err, msg_err, stream_err, transport_err};
pub use error::{ErrorKind, SendError};

pub use crate::resync::ResyncProgress;

pub(crate) fn default_threshold() -> f64 {
    50.0
}

/// What `vdrep protect` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectSpec {
    pub vm: String,
    /// Receiver address, `HOST:PORT`.
    pub to: String,
    /// Certificates of the receiver(s) we trust.
    pub trust: Vec<PathBuf>,
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

fn retry(e: impl std::fmt::Display) -> SendError {
    SendError::retry(e)
}

/// Schedules whose interval is at most this retry fast first (see [`backoff`]).
pub const FAST_RETRY_MAX_EVERY_SECS: u64 = 300;

/// Delay before retry number `n` (0-based) of a VM replicating every
/// `every_secs` (0: continuous). The long schedule is 1, 2, 4, 8, 10 min,
/// then every 30 min. A continuous or short-interval VM (every ≤ 5 min)
/// first retries after 1 s, 2 s and 5 s, so a blip (a receiver restart, a
/// dropped link) costs seconds of RPO, and only then falls back to the long
/// schedule. `scale` shortens everything (tests).
pub fn backoff(n: u32, scale: f64, every_secs: u64) -> Duration {
    const FAST: [f64; 3] = [1.0, 2.0, 5.0];
    const LONG_MINS: [f64; 5] = [1.0, 2.0, 4.0, 8.0, 10.0];
    let n = n as usize;
    let fast = if every_secs <= FAST_RETRY_MAX_EVERY_SECS {
        FAST.len()
    } else {
        0
    };
    let secs = if n < fast {
        FAST[n]
    } else {
        LONG_MINS.get(n - fast).copied().unwrap_or(30.0) * 60.0
    };
    Duration::from_secs_f64(secs * scale)
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
    /// The live connection (for its UDP counters) and the UDP bytes of the
    /// connections before it.
    conn: Mutex<Option<quinn::Connection>>,
    udp_sent_before: std::sync::atomic::AtomicU64,
}

impl Vm {
    /// UDP bytes sent by every connection of this VM so far.
    fn wire_bytes_sent(&self) -> u64 {
        self.udp_sent_before
            .load(std::sync::atomic::Ordering::Relaxed)
            + self
                .conn
                .lock()
                .as_ref()
                .map_or(0, |c| c.stats().udp_tx.bytes)
    }
}

/// Keeps [`Vm::conn`] for one session; on drop, folds the connection's UDP
/// counters into the VM's total.
struct LiveConn<'a>(&'a Vm);

impl<'a> LiveConn<'a> {
    fn new(vm: &'a Vm, conn: &quinn::Connection) -> Self {
        *vm.conn.lock() = Some(conn.clone());
        LiveConn(vm)
    }
}

impl Drop for LiveConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.conn.lock().take() {
            self.0
                .udp_sent_before
                .fetch_add(c.stats().udp_tx.bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
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
    /// This daemon's identity (random): resync progress it saved can be
    /// resumed with its in-memory bitmap.
    instance: String,
    /// State-change events of the VMs ([`alert::watch`]).
    events: Arc<crate::events::Bus>,
}

const PROTECT_DIR: &str = "protect";

/// Bytes of a sealed log per `LogChunk`.
const LOG_CHUNK: usize = 1 << 20;

impl Replicator {
    /// `keys`: the mount's identity folder (`vdrep mount --keys`).
    pub fn new(
        tracker: Arc<Tracker>,
        mount_dir: &Path,
        keys: Option<&Path>,
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
        if spec.trust.is_empty() {
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
        // Reachable and trusted: say Hello once.
        let probe = self.rt.block_on(async {
            let (conn, _, hello) = self.connect_hello(&spec).await?;
            conn.close(0u32.into(), b"probe done");
            Ok::<wire::HelloOk, SendError>(hello)
        });
        let hello = match probe {
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
        let path = self.tracker.state_file(PROTECT_DIR);
        std::fs::create_dir_all(&path)
            .map_err(|e| SendError::fatal(format!("{}: {e}", path.display())))?;
        let b = serde_json::to_vec_pretty(&spec).map_err(|e| SendError::fatal(e.to_string()))?;
        let f = path.join(format!("{}.json", spec.vm));
        let tmp = path.join(format!(".{}.json.tmp", spec.vm));
        std::fs::write(&tmp, b)
            .and_then(|_| std::fs::rename(&tmp, &f))
            .map_err(|e| SendError::fatal(format!("saving {}: {e}", f.display())))?;
        self.start(spec);
        for w in &warnings {
            tracing::warn!(vm = %spec_name, "{w}");
        }
        Ok(warnings)
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
        if let Some(old) = self.vms.lock().remove(&spec.vm) {
            old.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            old.wake.notify_one();
        }
        let spec_vm = spec.vm.clone();
        let vm = Arc::new(Vm {
            status: Mutex::new(VmStatus {
                vm: spec.vm.clone(),
                to: spec.to.clone(),
                state: VmState::InitialReplication,
                disks: spec.disks.clone(),
                last_point: None,
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
            udp_sent_before: std::sync::atomic::AtomicU64::new(0),
        });
        for d in &vm.spec.disks {
            let limit = self
                .tracker
                .disk_info(d)
                .map(|(_, size, ..)| (size as f64 * vm.spec.resync_threshold_pct / 100.0) as u64);
            self.tracker.set_log_limit(d, limit);
        }
        self.vms.lock().insert(vm.spec.vm.clone(), vm.clone());
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
                alert::apply(&mut s, v.spec.rpo_alert_secs);
                s
            })
            .collect();
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        out
    }

    /// Cut now and wait until the receiver has durably applied a point at
    /// least that new (or `timeout` passes, or the VM is Critical).
    pub fn sync(&self, vm: &str, timeout: Duration) -> Result<u64, SendError> {
        let v = self.vm(vm)?;
        if v.status.lock().state == VmState::Critical {
            return Err(SendError::unavailable(format!(
                "VM {vm} is Critical: {}",
                v.status.lock().last_error.clone().unwrap_or_default()
            )));
        }
        let (tx, rx) = oneshot::channel();
        // Any point sealed after this moment will do.
        let want = self.tracker.status().cut_seq + 1;
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

    async fn connect(
        &self,
        spec: &ProtectSpec,
    ) -> Result<(quinn::Connection, quinn::Endpoint), SendError> {
        self.connect_hello(spec).await.map(|(c, e, _)| (c, e))
    }

    async fn connect_hello(
        &self,
        spec: &ProtectSpec,
    ) -> Result<(quinn::Connection, quinn::Endpoint, wire::HelloOk), SendError> {
        let id = self
            .identity
            .as_ref()
            .ok_or_else(|| SendError::fatal("no identity (mount with --keys)"))?;
        let trust =
            TrustStore::from_files(&spec.trust).map_err(|e| SendError::fatal(e.to_string()))?;
        let addr: SocketAddr = tokio::net::lookup_host(&spec.to)
            .await
            .map_err(|e| retry(format!("cannot resolve {}: {e}", spec.to)))?
            .next()
            .ok_or_else(|| retry(format!("{} resolves to no address", spec.to)))?;
        // Notice a dead receiver within seconds, not the default 30 s.
        let tuning = transport::Tuning {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            ..transport::Tuning::default()
        };
        let ep =
            transport::client_tuned(id, &trust, &tuning, None).map_err(|e| retry(e.to_string()))?;
        let conn = transport::connect(&ep, addr, "vdrep")
            .await
            .map_err(|e| transport_err(&e, addr))?;
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| conn_err(&e, addr))?;
        let hello = Msg::Hello(wire::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            site_name: self.site.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        });
        wire::write_msg(&mut tx, &hello)
            .await
            .map_err(|e| stream_err(&e, addr))?;
        match wire::read_msg(&mut rx)
            .await
            .map_err(|e| stream_err(&e, addr))?
        {
            Some(Msg::HelloOk(h)) => Ok((conn, ep, h)),
            Some(Msg::Error(e)) => Err(msg_err(&e)),
            other => Err(SendError::fatal(format!(
                "unexpected answer to Hello: {other:?}"
            ))),
        }
    }

    async fn worker(self: Arc<Self>, vm: Arc<Vm>) {
        let mut failures = 0u32;
        let mut again = 0u32;
        loop {
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let r = self.session(&vm).await;
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Err(e) = r else { return };
            vm.status.lock().health.count_error(e.kind());
            // A session that reached steady state (Normal) ends an outage:
            // the next failure starts the schedule from its first step.
            if vm.status.lock().state == VmState::Normal {
                failures = 0;
            }
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
                    let d = backoff(failures, self.retry_scale, vm.spec.every_secs);
                    failures += 1;
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
                    vm.status.lock().next_retry_unix = None;
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

    /// The tracked disk with this identity.
    fn disk_of_id(&self, id: &[u8; 16]) -> Option<String> {
        self.tracker
            .disk_names()
            .into_iter()
            .find(|n| self.disk_id(n).is_ok_and(|(i, ..)| &i == id))
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

    /// `OpenDisk` every disk of the VM: where is each replica?
    async fn open_disks(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
    ) -> Result<HashMap<String, wire::DiskState>, SendError> {
        let spec = &vm.spec;
        let addr = conn.remote_address();
        let mut replica: HashMap<String, wire::DiskState> = HashMap::new();
        for d in &spec.disks {
            let (id, size, bs, _) = self.disk_id(d)?;
            let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| conn_err(&e, addr))?;
            let kind = if d.to_ascii_lowercase().ends_with(".vhd") {
                wire::DiskKind::Vhd
            } else {
                wire::DiskKind::Raw
            };
            wire::write_msg(
                &mut tx,
                &Msg::OpenDisk(wire::OpenDisk {
                    vm: spec.vm.clone(),
                    disk_name: d.clone(),
                    disk_id: id,
                    block_size: bs,
                    disk_size: size,
                    kind,
                }),
            )
            .await
            .map_err(|e| stream_err(&e, addr))?;
            let ds = match wire::read_msg(&mut rx)
                .await
                .map_err(|e| stream_err(&e, addr))?
            {
                Some(Msg::DiskState(s)) => s,
                Some(Msg::Error(e)) => return Err(msg_err(&e)),
                other => {
                    return Err(SendError::fatal(format!(
                        "unexpected answer to OpenDisk: {other:?}"
                    )))
                }
            };
            replica.insert(d.clone(), ds);
        }
        Ok(replica)
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
            // (cycle, base cycle) of each sealed log; None: unreadable.
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
        let (conn, _ep) = self.connect(spec).await?;
        let _live = LiveConn::new(vm, &conn);
        let limiter = Shaper::new(spec.max_rate, self.link_share(spec));
        let mut replica = self.open_disks(vm, &conn).await?;
        // No complete replica (or a copy under way): initial copy.
        let need_initial = replica.values().any(|ds| ds.replica_cycle == 0);
        if need_initial {
            vm.status.lock().state = VmState::InitialReplication;
            self.initial_copy(vm, &conn, &replica, &limiter).await?;
        } else {
            let mut resynced = false;
            let mut reasons = self.resync_reasons(vm, &replica);
            if !reasons.is_empty() {
                // Automatic resyncs wait for the window; `vdrep resync`
                // starts one at once.
                let window = spec.window();
                loop {
                    if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                        conn.close(0u32.into(), b"unprotected");
                        return Ok(());
                    }
                    // `vdrep resync` and `vdrep sync` (which cannot finish
                    // without it) start the resync outside the window too.
                    let manual = vm.jobs.lock().iter().any(|j| matches!(j, Job::Resync(_)))
                        || !vm.waiters.lock().is_empty();
                    if manual || window.open_now() {
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
                    replica = self.open_disks(vm, &conn).await?;
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
                    self.resync(vm, &conn, &replica, &rdisks, &limiter).await?;
                    resynced = true;
                    vm.status.lock().resync_pending.clear();
                    // A waiting `vdrep resync` is answered by this one.
                    self.answer_resync_jobs(vm);
                }
            }
            if !resynced {
                self.recommit_replica_point(vm, &conn, &replica).await?;
                self.ship_pending(vm, &conn, &replica, &limiter).await?;
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
        loop {
            if vm.stop.load(std::sync::atomic::Ordering::SeqCst) {
                conn.close(0u32.into(), b"unprotected");
                return Ok(());
            }
            if self.run_jobs(vm, &conn, &limiter).await? {
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
                let dirty: u64 = self
                    .tracker
                    .status()
                    .disks
                    .iter()
                    .filter(|d| spec.disks.contains(&d.name))
                    .map(|d| d.dirty_blocks)
                    .sum();
                if dirty == 0 && vm.waiters.lock().is_empty() {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), vm.wake.notified()).await;
                    continue;
                }
            }
            let started = Instant::now();
            self.cut_and_ship(vm, &conn, &limiter).await?;
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
    async fn run_jobs(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        limiter: &Shaper,
    ) -> Result<bool, SendError> {
        let kind = match vm.jobs.lock().front() {
            None => return Ok(false),
            Some(Job::Resync(_)) => 0,
            Some(Job::Verify(_)) => 1,
        };
        if kind == 0 {
            // Everything shipped first, then every disk compared.
            self.cut_and_ship(vm, conn, limiter).await?;
            let replica = self.open_disks(vm, conn).await?;
            let disks = vm.spec.disks.clone();
            self.resync(vm, conn, &replica, &disks, limiter).await?;
            vm.status.lock().state = VmState::Normal;
            self.answer_resync_jobs(vm);
        } else {
            let r = self.verify_now(vm, conn, limiter).await;
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
        conn: &quinn::Connection,
        limiter: &Shaper,
    ) -> Result<Vec<VerifyDisk>, SendError> {
        self.cut_and_ship(vm, conn, limiter).await?;
        let replica = self.open_disks(vm, conn).await?;
        let spec = vm.spec.clone();
        let tracker = self.tracker.clone();
        let dir = self.mount_dir.clone();
        let sel = CutSelect {
            disks: Some(spec.disks.clone()),
            full_from: spec.disks.iter().map(|d| (d.clone(), 0)).collect(),
            ..Default::default()
        };
        let sealed = tokio::task::spawn_blocking(move || {
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = nix::unistd::syncfs(&d);
            }
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
                .compare(vm, conn, sc, rc, resync::Mode::Verify { skip }, None, None)
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
    async fn cut_and_ship(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        limiter: &Shaper,
    ) -> Result<(), SendError> {
        let spec = vm.spec.clone();
        let tracker = self.tracker.clone();
        let dir = self.mount_dir.clone();
        // Due when `every` passed since the last attempt (failed or not:
        // a broken hook must not stall every cut for its time limit).
        let mut hook = None;
        if let Some(h) = &spec.app_hook {
            let mut last = vm.last_app_try.lock();
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(h.every_secs)) {
                *last = Some(std::time::Instant::now());
                hook = Some(h.clone());
            }
        }
        let (entries, app) = tokio::task::spawn_blocking(
            move || -> Result<(Vec<crate::tracking::CutEntry>, AppCut), crate::tracking::TrackError> {
                // Quiesce the guest first: what it flushes must reach the
                // mount (syncfs) before the cut.
                let mut app = AppCut::default();
                if let Some(h) = &hook {
                    app.tried = true;
                    match app_hook::run(h, "freeze", &spec.vm) {
                        Ok(_) => app.frozen = true,
                        Err(e) => app.error = Some(e.to_string()),
                    }
                }
                let frozen_at = std::time::Instant::now();
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = nix::unistd::syncfs(&d);
                }
                // Bitmap-only disks are sealed too: this cycle ships all
                // their changes at once.
                for d in &spec.disks {
                    tracker.enforce_log_limit(d);
                }
                let sealed = tracker.seal(&CutSelect {
                    disks: Some(spec.disks.clone()),
                    ..Default::default()
                });
                // Thaw whenever freeze was started, also when it failed
                // (part of the guest may be frozen) or the cut failed.
                if let Some(h) = &hook {
                    app.frozen_ms = Some(frozen_at.elapsed().as_secs_f64() * 1e3);
                    if let Err(e) = app_hook::run(h, "thaw", &spec.vm) {
                        tracing::error!(vm = %spec.vm, "{e}: the guest may still be frozen");
                        app.error.get_or_insert(e.to_string());
                    }
                }
                let sealed = sealed?;
                let mut out = sealed.skipped;
                for mut sc in sealed.cycles {
                    sc.header.app_consistent = app.frozen;
                    out.push(tracker.write_log(sc));
                }
                Ok((out, app))
            },
        )
        .await
        .map_err(|e| retry(format!("cut task failed: {e}")))?
        .map_err(retry)?;
        if app.tried {
            let mut s = vm.status.lock();
            match &app.error {
                Some(e) => {
                    tracing::warn!(vm = %vm.spec.vm, "{e}; this cut is crash-consistent only");
                    s.app_hook_error = Some(e.clone());
                }
                None => s.app_hook_error = None,
            }
            if app.frozen {
                s.app_frozen_ms = app.frozen_ms;
            }
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
        let replica: HashMap<String, wire::DiskState> = HashMap::new();
        self.ship_pending(vm, conn, &replica, limiter).await
    }

    /// Every disk of the VM reached cycle C at the receiver but the point
    /// may be missing: the connection (or the receiver) died between the
    /// last log's Ack and the PointAck. Commit it again (idempotent at the
    /// receiver); marked crash-consistent, as the log that said otherwise
    /// is gone. Answers a `vdrep sync` waiting for that cycle.
    async fn recommit_replica_point(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        replica: &HashMap<String, wire::DiskState>,
    ) -> Result<(), SendError> {
        let spec = &vm.spec;
        let Some(c) = spec
            .disks
            .first()
            .and_then(|d| replica.get(d))
            .map(|s| s.replica_cycle)
        else {
            return Ok(());
        };
        let same = spec
            .disks
            .iter()
            .all(|d| replica.get(d).is_some_and(|s| s.replica_cycle == c));
        if c == 0 || !same || vm.status.lock().last_point.is_some_and(|p| p >= c) {
            return Ok(());
        }
        let disks = spec
            .disks
            .iter()
            .filter_map(|d| replica.get(d))
            .map(|s| wire::DiskCycle {
                disk_id: s.disk_id,
                cycle: c,
            })
            .collect();
        self.commit_point(vm, conn, c, disks, None, false).await
    }

    /// Ship every sealed log of the VM's disks, oldest cycle first, and
    /// commit each cycle that every disk reached.
    async fn ship_pending(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        replica: &HashMap<String, wire::DiskState>,
        limiter: &Shaper,
    ) -> Result<(), SendError> {
        let spec = &vm.spec;
        let mut by_cycle: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        for d in &spec.disks {
            let at = replica.get(d).map(|s| s.replica_cycle).unwrap_or(0);
            if at != 0 {
                // Already applied there: drop them.
                self.tracker.discard_logs(d, Some(at));
            }
            for c in self.tracker.pending_cycles(d) {
                if at == 0 || c > at {
                    by_cycle.entry(c).or_default().push(d.clone());
                }
            }
        }
        for (cycle, disks) in by_cycle {
            // Each log is opened once: its header now, its bytes when sent.
            let logs = disks
                .iter()
                .map(|d| self.tracker.sealed_log(d, cycle))
                .collect::<Result<Vec<SealedLog>, _>>()
                .map_err(retry)?;
            let cut_ns = logs
                .iter()
                .filter_map(|l| l.header().ok())
                .map(|h| h.cut_unix_ns)
                .next();
            // App-consistent iff every disk's log of the cut says so.
            let app = logs
                .iter()
                .all(|l| l.header().is_ok_and(|h| h.app_consistent));
            let mut acked = Vec::new();
            for log in logs {
                let (id, ..) = self.disk_id(log.disk())?;
                self.send_log(vm, conn, id, log, limiter).await?;
                acked.push(wire::DiskCycle { disk_id: id, cycle });
            }
            for d in &disks {
                // Its changes are at the receiver: logs again.
                if self.tracker.bitmap_only(d) && self.tracker.pending_cycles(d).is_empty() {
                    self.tracker.clear_bitmap_only(d);
                }
            }
            if acked.len() == spec.disks.len() {
                self.commit_point(vm, conn, cycle, acked, cut_ns, app)
                    .await?;
            }
        }
        Ok(())
    }

    async fn commit_point(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        cycle: u64,
        disks: Vec<wire::DiskCycle>,
        cut_ns: Option<u64>,
        app_consistent: bool,
    ) -> Result<(), SendError> {
        let addr = conn.remote_address();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| conn_err(&e, addr))?;
        wire::write_msg(
            &mut tx,
            &Msg::PointCommit(wire::PointCommit {
                vm: vm.spec.vm.clone(),
                cycle,
                app_consistent,
                disks,
            }),
        )
        .await
        .map_err(|e| stream_err(&e, addr))?;
        match wire::read_msg(&mut rx)
            .await
            .map_err(|e| stream_err(&e, addr))?
        {
            Some(Msg::PointAck(a)) if a.cycle == cycle => {}
            Some(Msg::Error(e)) => return Err(msg_err(&e)),
            other => {
                return Err(SendError::fatal(format!(
                    "unexpected answer to PointCommit: {other:?}"
                )))
            }
        }
        {
            let mut s = vm.status.lock();
            s.last_point = Some(cycle);
            s.last_point_unix_ns = cut_ns.or(Some(now_ns()));
            if app_consistent {
                s.last_app_point = Some(cycle);
                s.last_app_point_unix_ns = s.last_point_unix_ns;
            }
        }
        let mut w = vm.waiters.lock();
        let mut keep = Vec::new();
        for (want, tx) in w.drain(..) {
            if cycle >= want {
                let _ = tx.send(Ok(cycle));
            } else {
                keep.push((want, tx));
            }
        }
        *w = keep;
        tracing::info!(vm = %vm.spec.vm, cycle, "recovery point committed at the receiver");
        Ok(())
    }

    /// Ship one sealed log; it is marked shipped (tracking deletes it) once
    /// the receiver applied it.
    async fn send_log(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        id: [u8; 16],
        log: SealedLog,
        limiter: &Shaper,
    ) -> Result<(), SendError> {
        let addr = conn.remote_address();
        let shown = log.shown().to_path_buf();
        // The header says what the log is; the receiver verifies every
        // record and the seal before it applies anything, so a second full
        // read here would only double the I/O.
        let header = match log.header() {
            Ok(h) => h.clone(),
            Err(e) => {
                let why = format!("sealed log {} is damaged: {e}", shown.display());
                if let Some(d) = self.disk_of_id(&id) {
                    self.tracker.require_resync(&d, &why);
                }
                log.discard();
                return Err(SendError::new(
                    ErrorKind::ResyncRequired,
                    format!("{why}; the disk is resynced by checksums"),
                ));
            }
        };
        let total_len = log.len();
        let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| conn_err(&e, addr))?;
        let t0 = Instant::now();
        let mut begin = wire::LogBegin::from_header(&header, total_len);
        begin.disk_id = id;
        wire::write_msg(&mut tx, &Msg::LogBegin(begin))
            .await
            .map_err(|e| stream_err(&e, addr))?;
        let mut buf = Vec::new();
        let mut hasher = wire::LogHasher::new();
        let mut off = 0u64;
        // One buffer: read into, moved into the message, taken back.
        let mut chunk: Vec<u8> = Vec::with_capacity(LOG_CHUNK);
        while off < total_len {
            let want = ((total_len - off) as usize).min(LOG_CHUNK);
            chunk.resize(want, 0);
            tokio::task::block_in_place(|| log.read_exact_at(&mut chunk, off))
                .map_err(|e| retry(format!("reading {}: {e}", shown.display())))?;
            hasher.update(&chunk);
            limiter.take(Class::Delta, want as u64).await;
            let msg = Msg::LogChunk(wire::LogChunk {
                disk_id: id,
                cycle: header.cycle,
                offset_in_log: off,
                data: std::mem::take(&mut chunk),
            });
            let sent = wire::write_msg_buf(&mut tx, &msg, &mut buf).await;
            if let Msg::LogChunk(c) = msg {
                chunk = c.data;
            }
            sent.map_err(|e| stream_err(&e, addr))?;
            off += want as u64;
        }
        wire::write_msg(
            &mut tx,
            &Msg::LogEnd(wire::LogEnd {
                disk_id: id,
                cycle: header.cycle,
                total_len,
                log_checksum: hasher.digest128(),
            }),
        )
        .await
        .map_err(|e| stream_err(&e, addr))?;
        loop {
            match wire::read_msg(&mut rx)
                .await
                .map_err(|e| stream_err(&e, addr))?
            {
                Some(Msg::Ack(a)) if a.applied && a.cycle == header.cycle => break,
                Some(Msg::Ack(_)) => continue,
                Some(Msg::Error(e)) if e.code == wire::ErrorCode::ResyncRequired => {
                    // The receiver no longer trusts the replica: this log
                    // cannot help; compare by checksums instead.
                    if let Some(d) = self.disk_of_id(&id) {
                        self.tracker
                            .require_resync(&d, &format!("receiver: {}", e.message));
                    }
                    return Err(SendError::new(
                        ErrorKind::ResyncRequired,
                        format!("receiver: {}", e.message),
                    ));
                }
                Some(Msg::Error(e)) => return Err(msg_err(&e)),
                other => {
                    return Err(SendError::fatal(format!(
                        "unexpected answer to a log: {other:?}"
                    )))
                }
            }
        }
        log.mark_shipped();
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        let mut s = vm.status.lock();
        s.bytes_sent += total_len;
        s.throughput_bps = total_len as f64 / secs;
        Ok(())
    }

    /// Whole-disk cycle of every disk of the VM, sealed at one instant and
    /// streamed disk after disk; resumes an interrupted copy of the same
    /// cycle range from the receiver's `resume_offset`.
    async fn initial_copy(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        replica: &HashMap<String, wire::DiskState>,
        limiter: &Shaper,
    ) -> Result<(), SendError> {
        let spec = &vm.spec;
        let mut full_from = HashMap::new();
        {
            let cc = vm.copy_cycle.lock();
            for d in &spec.disks {
                let ds = &replica[d];
                let resume = match cc.get(d) {
                    Some(c) if *c == ds.copy_cycle && ds.copy_cycle != 0 => ds.resume_offset,
                    _ => 0,
                };
                full_from.insert(d.clone(), resume);
            }
        }
        let tracker = self.tracker.clone();
        let sel = CutSelect {
            disks: Some(spec.disks.clone()),
            full_from: full_from.clone(),
            ..Default::default()
        };
        let dir = self.mount_dir.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = nix::unistd::syncfs(&d);
            }
            tracker.seal_for_copy(&sel)
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
        let cycle = sealed.cycle;
        let cut_ns = sealed.cut_unix_ns;
        {
            let mut s = vm.status.lock();
            s.initial_total = sealed.cycles.iter().map(|c| c.dirty_bytes()).sum();
            s.initial_done = 0;
        }
        let mut cycles: Vec<_> = sealed.cycles.into_iter().map(Some).collect();
        let mut done = Vec::new();
        for i in 0..cycles.len() {
            let Some(sc) = cycles[i].take() else { continue };
            let name = sc.header.disk_name.clone();
            let start = sc.full_from.unwrap_or(0);
            vm.copy_cycle.lock().insert(name.clone(), cycle);
            self.save_copy_cycles(vm);
            let id = sc.header.disk_id;
            let (back, r) = self.stream_initial(vm, conn, sc, start, limiter).await;
            let t = self.tracker.clone();
            let ok = r.is_ok();
            let mut rest: Vec<_> = back.into_iter().collect();
            if !ok {
                rest.extend(cycles.iter_mut().filter_map(|c| c.take()));
            }
            tokio::task::spawn_blocking(move || {
                for sc in rest {
                    if let Err(e) = t.finish(sc, ok) {
                        tracing::error!("{e}");
                    }
                }
            })
            .await
            .map_err(|e| retry(e.to_string()))?;
            r?;
            vm.copy_cycle.lock().remove(&name);
            self.save_copy_cycles(vm);
            done.push(wire::DiskCycle { disk_id: id, cycle });
        }
        // Old logs are superseded by the copy.
        for d in &spec.disks {
            self.tracker.discard_logs(d, Some(cycle));
        }
        self.commit_point(vm, conn, cycle, done, Some(cut_ns), false)
            .await
    }

    /// Stream one whole-disk cycle; hands the sealed cycle back with the
    /// outcome (the caller finishes it either way).
    async fn stream_initial(
        &self,
        vm: &Arc<Vm>,
        conn: &quinn::Connection,
        sc: crate::tracking::SealedCycle,
        start: u64,
        limiter: &Shaper,
    ) -> (Option<crate::tracking::SealedCycle>, Result<(), SendError>) {
        let addr = conn.remote_address();
        let id = sc.header.disk_id;
        let (cycle, disk_size, name) = (
            sc.header.cycle,
            sc.header.disk_size,
            sc.header.disk_name.clone(),
        );
        let (mut tx, mut rx) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return (Some(sc), Err(conn_err(&e, addr))),
        };
        if let Err(e) = wire::write_msg(
            &mut tx,
            &Msg::InitialBegin(wire::InitialBegin {
                disk_id: id,
                cycle,
                disk_size,
                start_offset: start,
            }),
        )
        .await
        {
            return (Some(sc), Err(stream_err(&e, addr)));
        }
        // The sealed cycle is read by a blocking thread (it takes locks and
        // preads); chunks come over a small channel so memory stays bounded.
        // Blocks below `start` are in the cycle only if they changed since
        // the interrupted copy.
        let (ctx, mut crx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(8);
        let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader = tokio::task::spawn_blocking(move || {
            let mut out = ChunkFiller {
                tx: ctx,
                pool: pool_rx,
                cur: None,
            };
            let r = sc.stream_into(0, &mut out).and_then(|()| out.flush());
            (sc, r)
        });
        let net = async {
            let mut buf = Vec::new();
            let t0 = Instant::now();
            let mut last_log = Instant::now();
            let mut sent = 0u64;
            let mut disk_done = 0u64;
            let mut incompressible = 0u32;
            let mut chunk_no = 0u64;
            while let Some((off, data)) = crx.recv().await {
                let len = data.len() as u64;
                // After a run of incompressible chunks, try lz4 only on
                // every 16th (it costs ~9% of a core on random data).
                let try_lz4 = incompressible < 8 || chunk_no % 16 == 0;
                chunk_no += 1;
                // `spare`: the read buffer when the payload is not it.
                let (encoding, payload, spare) = if data.iter().all(|&b| b == 0) {
                    (Encoding::Zero, Vec::new(), Some(data))
                } else if try_lz4 {
                    let c = lz4_flex::block::compress(&data);
                    if c.len() <= data.len() - data.len() / 8 {
                        incompressible = 0;
                        (Encoding::Lz4, c, Some(data))
                    } else {
                        incompressible += 1;
                        (Encoding::Raw, data, None)
                    }
                } else {
                    (Encoding::Raw, data, None)
                };
                limiter
                    .take(Class::Bulk, payload.len().max(64) as u64)
                    .await;
                let plen = payload.len() as u64;
                let msg = Msg::InitialChunk(wire::InitialChunk {
                    disk_id: id,
                    offset: off,
                    length: len as u32,
                    encoding,
                    data: payload,
                });
                let written = wire::write_msg_buf(&mut tx, &msg, &mut buf).await;
                // The read buffer goes back to the reader (it may be gone).
                let back = match msg {
                    Msg::InitialChunk(c) if c.encoding == Encoding::Raw => Some(c.data),
                    _ => spare,
                };
                if let Some(b) = back {
                    let _ = pool_tx.send(b);
                }
                written.map_err(|e| stream_err(&e, addr))?;
                sent += plen;
                disk_done += len;
                let mut s = vm.status.lock();
                s.initial_done += len;
                s.bytes_sent += plen;
                s.throughput_bps = sent as f64 / t0.elapsed().as_secs_f64().max(1e-6);
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    // ETA from disk bytes covered (zeros and lz4 make the
                    // wire rate a poor guide).
                    let disk_rate = disk_done as f64 / t0.elapsed().as_secs_f64().max(1e-6);
                    let eta = if disk_rate > 0.0 {
                        format!(
                            "{:.0}s",
                            s.initial_total.saturating_sub(s.initial_done) as f64 / disk_rate
                        )
                    } else {
                        "?".into()
                    };
                    tracing::info!(
                        vm = %vm.spec.vm,
                        "initial copy: {} of {} MiB ({:.0}%), {:.1} MiB/s on the wire, ETA {eta}",
                        s.initial_done >> 20,
                        s.initial_total >> 20,
                        100.0 * s.initial_done as f64 / s.initial_total.max(1) as f64,
                        s.throughput_bps / 1048576.0
                    );
                }
            }
            Ok::<(), SendError>(())
        }
        .await;
        drop(crx);
        let (sc, read) = match reader.await {
            Ok(x) => x,
            Err(e) => return (None, Err(retry(format!("the disk reader failed: {e}")))),
        };
        if let Err(e) = net {
            return (Some(sc), Err(why_stopped(&mut rx, e).await));
        }
        if let Err(e) = read {
            return (
                Some(sc),
                Err(retry(format!("reading {name} as of its cut: {e}"))),
            );
        }
        let end = async {
            wire::write_msg(
                &mut tx,
                &Msg::InitialEnd(wire::InitialEnd {
                    disk_id: id,
                    cycle,
                    disk_size,
                }),
            )
            .await
            .map_err(|e| stream_err(&e, addr))?;
            loop {
                match wire::read_msg(&mut rx)
                    .await
                    .map_err(|e| stream_err(&e, addr))?
                {
                    Some(Msg::Ack(a)) if a.applied => return Ok(()),
                    Some(Msg::Ack(_)) => continue,
                    Some(Msg::Error(e)) => return Err(msg_err(&e)),
                    other => {
                        return Err(SendError::fatal(format!(
                            "unexpected answer to an initial copy: {other:?}"
                        )))
                    }
                }
            }
        }
        .await;
        (Some(sc), end)
    }
}

/// Hands a sealed cycle's pieces to the network side without copying them:
/// each piece is read straight into a buffer that travels over the channel
/// and comes back through `pool` once sent.
struct ChunkFiller {
    tx: tokio::sync::mpsc::Sender<(u64, Vec<u8>)>,
    pool: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The piece being read: passed on when the next one is asked for.
    cur: Option<(u64, Vec<u8>)>,
}

impl ChunkFiller {
    fn flush(&mut self) -> Result<(), crate::tracking::StreamError> {
        if let Some(piece) = self.cur.take() {
            self.tx
                .blocking_send(piece)
                .map_err(|_| crate::tracking::StreamError::Stopped)?;
        }
        Ok(())
    }
}

impl crate::tracking::CycleBuf for ChunkFiller {
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], crate::tracking::StreamError> {
        self.flush()?;
        // A returned buffer is only zero-filled where it grows.
        let mut b = self.pool.try_recv().unwrap_or_default();
        b.resize(len, 0);
        let (_, b) = self.cur.insert((off, b));
        Ok(b)
    }
}

/// What the app hook did around one cut.
#[derive(Default)]
struct AppCut {
    tried: bool,
    frozen: bool,
    frozen_ms: Option<f64>,
    error: Option<String>,
}

/// A write failed (often because the receiver answered with an error and
/// stopped the stream): prefer the receiver's own explanation if it sent one.
async fn why_stopped(rx: &mut quinn::RecvStream, fallback: SendError) -> SendError {
    match tokio::time::timeout(Duration::from_secs(2), wire::read_msg(rx)).await {
        Ok(Ok(Some(Msg::Error(e)))) => msg_err(&e),
        _ => fallback,
    }
}

fn not_protected(vm: &str) -> SendError {
    SendError::invalid(format!("VM {vm} is not protected here"))
}

fn stopped(vm: &str) -> SendError {
    SendError::unavailable(format!("replication of {vm} stopped"))
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    fn secs(n: u32, every: u64) -> f64 {
        backoff(n, 1.0, every).as_secs_f64()
    }

    #[test]
    fn continuous_and_short_intervals_retry_fast_first_then_the_long_schedule() {
        for every in [0, 30, 300] {
            let got: Vec<f64> = (0..10).map(|n| secs(n, every)).collect();
            assert_eq!(
                got,
                [1.0, 2.0, 5.0, 60.0, 120.0, 240.0, 480.0, 600.0, 1800.0, 1800.0],
                "every {every}s"
            );
        }
    }

    #[test]
    fn long_intervals_keep_the_long_schedule() {
        let got: Vec<f64> = (0..7).map(|n| secs(n, 900)).collect();
        assert_eq!(got, [60.0, 120.0, 240.0, 480.0, 600.0, 1800.0, 1800.0]);
        assert_eq!(backoff(0, 0.01, 900), Duration::from_secs_f64(0.6));
    }
}
