//! The receiver: the secondary site's server.
//!
//! Accepts QUIC connections (mutual TLS 1.3, pinned certificates), maps each
//! sender to its own namespace in the replica store by the **certificate's
//! name** (what the sender says in `Hello` is ignored), and serves the
//! wire protocol ([`crate::wire`]) one bidirectional stream per operation:
//! `OpenDisk`, an initial copy, one log, a point commit, a checksum compare
//! or an administrative request. Logs are stored durably before anything
//! is applied ([`crate::replica`]); an `Ack` with `applied` is sent only
//! after the replica was written and fsynced.
//!
//! The conversation itself is [`wire::session::Receiver`]'s; this module is
//! its quinn driver (`handle_conn`): per connection, one reader and one
//! writer task per accepted stream feed the session and write what it
//! answers, and the session's store actions run on blocking threads
//! against the [`ReplicaStore`] (a log streams into `store_log` while it
//! arrives; an initial copy into `write_initial`).

pub mod boot_verify;
pub mod control;
pub mod control_server;
pub mod embedded;
mod events;
pub mod metrics;
pub mod store_size;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::replica::{self, DiskRef, ReplicaStore, StoreError};
use crate::transport::{self, keys::Identity, trust::TrustStore};
use crate::transport::{StreamEnd, TransportError};
use crate::wire::session::{
    DiskStatus, Event, LogStored, OpId, Output, Receiver, ReceiverAction, ReceiverConfig,
    StoreDone, StoreFailure, StreamId,
};
use crate::wire::{self, DiskId, ErrorCode, InitialBegin, OpenDisk};

/// What stopped the receiver, or one of its streams.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// The keys, the trusted certificates or the listening endpoint.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store could not be opened or recovered.
    #[error("the store {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    /// A part of the receiver (control socket, thread, runtime) could not start.
    #[error("cannot start the {what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What a caller can do about a [`ReceiverError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverErrorKind {
    /// Fix the configuration (keys, trust, listen address) and start again.
    Config,
    /// The store is unusable: see the message (permissions, damage).
    Store,
    /// The host refused a resource: retry, or check its limits.
    Resource,
}

impl ReceiverError {
    pub fn kind(&self) -> ReceiverErrorKind {
        match self {
            ReceiverError::Transport(_) => ReceiverErrorKind::Config,
            ReceiverError::Store { .. } => ReceiverErrorKind::Store,
            ReceiverError::Start { .. } => ReceiverErrorKind::Resource,
        }
    }
}

#[derive(Clone)]
pub struct ReceiveOptions {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub keys: PathBuf,
    pub trust: Vec<PathBuf>,
    /// Which recovery points to keep ([`ReplicaStore::prune`]).
    pub retention: replica::RetentionPolicy,
    /// How often the retention policy is applied (`None`: never).
    pub prune_every: Option<std::time::Duration>,
    /// The configuration file whose `[site] trust` SIGHUP re-reads (the
    /// new set of sender certificates is accepted from the next
    /// handshake); `None`: SIGHUP is not handled.
    pub reload_trust_from: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`metrics_listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// The command run on every event (`notify_command`).
    pub notify: Option<crate::events::notify::NotifySpec>,
    /// Another store the replication data path serves from (the object
    /// store of `--store s3://…`); `store` is then only the local cache
    /// folder (control socket state, failover views), holding no replica.
    pub remote: Option<Arc<dyn ReplicaStore>>,
    /// Scheduled boot verification of every domain's newest point
    /// (`verify_boot`); `None`: never.
    pub verify_boot: Option<boot_verify::BootVerify>,
    /// How the store makes a cycle durable (`store_sync`).
    pub store_sync: crate::util::durable::SyncMode,
}

/// Apply `keep` to every VM of `store` every `every`, on a thread named
/// `name`, until `stop` is set (looked at at least once a second, so a
/// stopped receiver's store is not pruned behind its successor's back).
pub(crate) fn spawn_retention(
    name: &str,
    store: Arc<dyn ReplicaStore>,
    keep: replica::RetentionPolicy,
    every: std::time::Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), ReceiverError> {
    use std::sync::atomic::Ordering::Relaxed;
    const LOOK: std::time::Duration = std::time::Duration::from_secs(1);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut next = std::time::Instant::now() + every;
            // A lasting failure (a VM fenced by a failover record in the
            // bucket, a denied key) fails the same way every pass: log a
            // line when it first appears, not every pass.
            let mut last_pass = std::collections::HashSet::new();
            while !stop.load(Relaxed) {
                let now = std::time::Instant::now();
                if now < next {
                    std::thread::sleep(LOOK.min(next - now));
                    continue;
                }
                next = now + every;
                for line in new_lines(&mut last_pass, prune_all(store.as_ref(), &keep)) {
                    tracing::info!("retention: {line}");
                }
            }
        })
        .map(drop)
        .map_err(|source| ReceiverError::Start {
            what: "retention thread",
            source,
        })
}

/// The lines of this pass of a periodic job that the previous pass
/// (`last`, replaced by this one) did not have: a lasting failure is
/// logged when it first appears, not on every pass.
fn new_lines(last: &mut std::collections::HashSet<String>, lines: Vec<String>) -> Vec<String> {
    let now: std::collections::HashSet<String> = lines.into_iter().collect();
    let fresh = now.difference(last).cloned().collect();
    *last = now;
    fresh
}

/// Apply `keep` to every VM of every site in `store`, except VMs failed
/// over here and not yet committed (`vdrep failover --commit`): until then
/// the failover may be cancelled and needs its history. Returns one line
/// per VM that lost points.
pub fn prune_all(store: &dyn ReplicaStore, keep: &replica::RetentionPolicy) -> Vec<String> {
    let mut out = Vec::new();
    for (name, vm) in store.vms() {
        match store.failed_over(&name, &vm) {
            Ok(Some(l)) if !l.committed => continue,
            Err(e) => {
                out.push(format!("{name}/{vm}: not pruned: {e}"));
                continue;
            }
            _ => {}
        }
        match store.prune(&name, &vm, keep) {
            Ok(r) if r.dropped_points.is_empty() => {}
            Ok(r) => out.push(format!(
                "{name}/{vm}: dropped {} point(s) ({:?}), freed {} bytes of history, {} record(s) merged",
                r.dropped_points.len(),
                r.dropped_points,
                r.freed_bytes,
                r.merged
            )),
            Err(e) => out.push(format!("{name}/{vm}: pruning failed: {e}")),
        }
    }
    out
}

/// How often the receiver looks for committed logs that no connection
/// applies ([`Drainer`]).
pub(crate) const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies the committed logs no connection is applying. A point is
/// committed once its logs are durable, and the connection asks for their
/// apply right after; one that ended in between (the sender unprotected
/// the VM, the link was cut for good) left them for the next `OpenDisk`,
/// read or failover, and the replica file behind its newest point.
///
/// Each [`Drainer::pass`] looks at every VM of the store not failed over
/// here: a disk of its newest point whose replica is not at that point is
/// noted; if the previous pass noted the same (disk, point), no connection
/// applied it in between, and the disk is brought to the point
/// (`ReplicaStore::drain`: in order, under the disk's lock, beside any
/// connection's own applies, which then find them applied). Nothing past
/// the newest point is applied, so a failover to it has nothing to roll
/// back.
#[derive(Default)]
pub struct Drainer {
    /// (site, vm, disk, point) not applied at the previous pass.
    noted: std::collections::HashSet<(String, String, String, u64)>,
}

impl Drainer {
    /// One pass; one line per disk whose logs could not be applied.
    pub fn pass(&mut self, store: &dyn ReplicaStore) -> Vec<String> {
        let mut out = Vec::new();
        let mut noted = std::collections::HashSet::new();
        for (site, vm) in store.vms() {
            if !matches!(store.failed_over(&site, &vm), Ok(None)) {
                continue;
            }
            let newest = match store.newest_point(&site, &vm) {
                Ok(p) => p,
                Err(e) => {
                    out.push(format!("{site}/{vm}: cannot list its points: {e}"));
                    continue;
                }
            };
            let Some(newest) = newest else { continue };
            for hex in &newest.disks {
                let Some(id) = replica::parse_hex_id(hex) else {
                    continue;
                };
                let d = disk(&site, &vm, &id);
                if store
                    .replica_state(d)
                    .is_ok_and(|st| st.applying.is_none() && st.cycle >= Some(newest.cycle))
                {
                    continue;
                }
                let key = (site.clone(), vm.clone(), hex.clone(), newest.cycle);
                if !self.noted.contains(&key) {
                    noted.insert(key);
                    continue;
                }
                if let Err(e) = store.drain(d, Some(newest.cycle)) {
                    out.push(format!(
                        "{site}/{vm}: disk {hex}: the logs of point {} are durable but cannot be applied yet: {e}",
                        newest.cycle
                    ));
                    noted.insert(key);
                }
            }
        }
        self.noted = noted;
        out
    }
}

/// Run a [`Drainer`] pass on `store` every `every`, on a thread named
/// `name` (a failure is logged when it first appears, not on every pass).
pub(crate) fn spawn_drainer(
    name: &str,
    store: Arc<dyn ReplicaStore>,
    every: std::time::Duration,
) -> Result<(), ReceiverError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut drainer = Drainer::default();
            let mut last_pass = std::collections::HashSet::new();
            loop {
                std::thread::sleep(every);
                for line in new_lines(&mut last_pass, drainer.pass(store.as_ref())) {
                    tracing::warn!("{line}");
                }
            }
        })
        .map(drop)
        .map_err(|source| ReceiverError::Start {
            what: "drainer thread",
            source,
        })
}

/// SIGHUP: trust the `[site] trust` certificates of the configuration at
/// `path` from the next handshake on; a file with problems changes nothing.
fn reload_trust(path: &std::path::Path, trust: &transport::SharedTrust) {
    let cfg = match crate::config::load(path, crate::config::Checks::Files) {
        Ok(c) => c,
        Err(e) => {
            for l in e.to_string().lines() {
                tracing::error!("reload refused, nothing changed: {l}");
            }
            return;
        }
    };
    match TrustStore::from_files(&cfg.site.trust) {
        Ok(t) => {
            tracing::info!(
                "reload: trusting {} sender certificate(s) from {}",
                t.len(),
                path.display()
            );
            trust.replace(t);
        }
        Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
    }
}

/// Run the receiver until killed. Prints `listening on ADDR` once ready.
pub fn run(opts: &ReceiveOptions) -> Result<(), ReceiverError> {
    // Before any thread exists, so that every thread inherits the mask.
    // SIGHUP (systemd's ExecReload) never kills the receiver: without a
    // configuration file to re-read it only says so.
    let hup = {
        let mut s = nix::sys::signal::SigSet::empty();
        s.add(nix::sys::signal::Signal::SIGHUP);
        let _ = s.thread_block();
        s
    };
    let id = Identity::from_dir(&opts.keys, None)?;
    let trust = transport::SharedTrust::new(TrustStore::from_files(&opts.trust)?);
    {
        let trust = trust.clone();
        let path = opts.reload_trust_from.clone();
        std::thread::Builder::new()
            .name("vdrep-reload".into())
            .spawn(move || {
                while hup.wait().is_ok() {
                    crate::service::reloading();
                    match &path {
                        Some(path) => reload_trust(path, &trust),
                        None => tracing::warn!(
                            "SIGHUP: nothing to reload (the trusted certificates come from --trust)"
                        ),
                    }
                    crate::service::ready("reloaded");
                }
            })
            .map_err(|source| ReceiverError::Start {
                what: "reload thread",
                source,
            })?;
    }
    let store_err = |source| ReceiverError::Store {
        path: opts.store.clone(),
        source,
    };
    let mut store = replica::Store::open(&opts.store).map_err(store_err)?;
    store.set_sync(opts.store_sync);
    tracing::info!("store sync: {}", opts.store_sync.as_str());
    let store = Arc::new(store);
    let r = store.recover().map_err(store_err)?;
    tracing::info!("store {} recovered: {r:?}", opts.store.display());
    // The replication data path sees the store through the seam (wrapped to
    // crash at a step between operations when a test asks for it).
    let data: Arc<dyn ReplicaStore> = match &opts.remote {
        Some(remote) => {
            let r = remote.recover().map_err(store_err)?;
            tracing::info!("remote store recovered: {r:?}");
            replica::FailStore::from_env(remote.clone())
        }
        None => replica::FailStore::from_env(store.clone()),
    };
    for note in crate::testview::Views::clean_stale(&store) {
        tracing::info!("{note}");
    }
    let views = Arc::new(crate::testview::Views::new());
    let roles = Arc::new(crate::roles::ReceiverCtx {
        store: store.clone(),
        keys: std::fs::canonicalize(&opts.keys).unwrap_or_else(|_| opts.keys.clone()),
        trust: opts
            .trust
            .iter()
            .map(|t| std::fs::canonicalize(t).unwrap_or_else(|_| t.clone()))
            .collect(),
    });
    let bus = Arc::new(crate::events::Bus::default());
    if let Some(spec) = &opts.notify {
        crate::events::notify::start(&bus, spec.clone()).map_err(|source| {
            ReceiverError::Start {
                what: "notify_command thread",
                source,
            }
        })?;
    }
    if let Some(v) = &opts.verify_boot {
        if opts.remote.is_some() {
            tracing::warn!(
                "verify_boot: not run for a store in a bucket (boot verification needs a local store)"
            );
        } else {
            let seen: Arc<dyn ReplicaStore> = store.clone();
            boot_verify::start(seen, opts.store.clone(), v.clone(), bus.clone()).map_err(
                |source| ReceiverError::Start {
                    what: "boot verification thread (verify_boot)",
                    source,
                },
            )?;
        }
    }
    control_server::start(store.clone(), views, roles.clone(), bus.clone()).map_err(|source| {
        ReceiverError::Start {
            what: "control socket",
            source,
        }
    })?;
    if let Some(addr) = opts.metrics_listen {
        metrics::serve(addr, data.clone(), &opts.store)?;
    }
    if data.commits_durable_logs() {
        spawn_drainer("vdrep-drain", data.clone(), DRAIN_EVERY)?;
    }
    if let Some(every) = opts.prune_every {
        let never = Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_retention(
            "vdrep-prune",
            data.clone(),
            opts.retention.clone(),
            every,
            never,
        )?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vdrep-recv")
        .enable_all()
        .build()
        .map_err(|source| ReceiverError::Start {
            what: "runtime",
            source,
        })?;
    rt.block_on(async {
        let ep = transport::server_shared(opts.listen, &id, &trust, &transport::Tuning::default())?;
        let local = ep.local_addr().map_err(|source| ReceiverError::Start {
            what: "endpoint",
            source,
        })?;
        println!(
            "listening on {local} as {} (certificate {})",
            id.name,
            id.fingerprint.to_hex()
        );
        tracing::info!(
            "receiver listening on {local}, store {}",
            opts.store.display()
        );
        let serving = format!(
            "listening on {local} as {}, store {}",
            id.name,
            opts.store.display()
        );
        crate::service::ready(&serving);
        let (handle, store) = (tokio::runtime::Handle::current(), data.clone());
        crate::service::spawn_monitor(
            std::time::Duration::from_secs(10),
            move || serving.clone(),
            // Alive: the runtime still runs tasks and the store answers.
            move || {
                let task = handle.spawn(async {});
                let ran = handle.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(5), task).await
                });
                let _ = store.free_bytes();
                matches!(ran, Ok(Ok(())))
            },
        )
        .map_err(|source| ReceiverError::Start {
            what: "service monitor thread",
            source,
        })?;
        serve(ep, data, id.name.clone(), Some(roles), Some(bus)).await;
        Ok(())
    })
}

/// Accept connections on `ep` until it closes, each served by its own
/// [`handle_conn`] task over `store`. `roles`: where site-to-site
/// administrative requests (planned failover, …) run; `None` refuses them
/// (the embedded receiver of direct protection). `bus`: where store
/// events (points a full copy dropped) go, if anywhere.
async fn serve(
    ep: quinn::Endpoint,
    store: Arc<dyn ReplicaStore>,
    me: String,
    roles: Option<Arc<crate::roles::ReceiverCtx>>,
    bus: Option<Arc<crate::events::Bus>>,
) {
    let fences = Arc::new(CopyFences::default());
    while let Some(inc) = ep.accept().await {
        let (store, me, roles, fences, bus) = (
            store.clone(),
            me.clone(),
            roles.clone(),
            fences.clone(),
            bus.clone(),
        );
        tokio::spawn(async move {
            if let Ok((conn, peer)) = transport::accept(inc).await {
                handle_conn(conn, peer, store, me, roles, fences, bus).await;
            }
        });
    }
}

/// What the quinn side of a connection hands its session.
enum Input {
    /// Chunks read from the stream in one go, in order.
    Data(StreamId, Vec<bytes::Bytes>),
    Finished(StreamId),
    Reset(StreamId),
}

/// What a stream's writer task does with its quinn send stream.
enum Write {
    Bytes(Vec<u8>),
    End(StreamEnd),
}

/// What the store actions of one connection need: the sender's namespace,
/// the store, and the transfers in progress.
struct Conn {
    site: String,
    store: Arc<dyn ReplicaStore>,
    roles: Option<Arc<crate::roles::ReceiverCtx>>,
    done: mpsc::UnboundedSender<(OpId, StoreDone)>,
    /// Initial copies in progress, by disk: their writer threads.
    initials: HashMap<DiskId, InitialWriter>,
    /// The receiver's fences of initial copies (shared by connections).
    fences: Arc<CopyFences>,
    /// Logs being staged, by the session's op: their `store_log` threads.
    logs: HashMap<OpId, LogStager>,
    /// What a checksum compare keeps between its requests, by disk.
    digests: HashMap<DiskId, Arc<Mutex<replica::DigestCache>>>,
    /// The receiver's events, if it has a bus.
    bus: Option<Arc<crate::events::Bus>>,
}

/// Which writer may write a disk's initial copy. A copy that begins
/// (resumed or not) fences off the writers of older copies of the disk,
/// of this connection or of one the receiver has not noticed is dead yet:
/// whatever they still hold queued is dropped, not written over the newer
/// copy (found by tests/session_sim.rs: a lagging write of the old cut
/// landed after a resumed copy had written the block).
#[derive(Default)]
struct CopyFences(Mutex<HashMap<(String, DiskId), Arc<CopyFence>>>);

/// The fence of one disk's initial copies.
#[derive(Default)]
struct CopyFence {
    /// The newest copy's generation; only its writer writes.
    gen: std::sync::atomic::AtomicU64,
    /// Held across each write: [`CopyFence::settle`] waits for one in flight.
    write: Mutex<()>,
}

impl CopyFences {
    /// A new generation of the copy of `disk_id` of `site` (never blocks):
    /// writers of older ones write nothing once the write in flight, if
    /// any, is done ([`CopyFence::settle`]).
    fn begin(&self, site: &str, disk_id: DiskId) -> (Arc<CopyFence>, u64) {
        let fence = self
            .0
            .lock()
            .entry((site.to_string(), disk_id))
            .or_default()
            .clone();
        let gen = fence.gen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        (fence, gen)
    }
}

impl CopyFence {
    /// Wait until no older writer is in the middle of a write (blocking).
    fn settle(&self) {
        drop(self.write.lock());
    }

    /// Is `gen` still the newest copy?
    fn current(&self, gen: u64) -> bool {
        self.gen.load(std::sync::atomic::Ordering::SeqCst) == gen
    }
}

/// Writes an initial copy: disk bytes by offset.
type InitialWriter = Pipe<(u64, Vec<u8>), Result<(), StoreError>>;
/// Stages a log: its bytes in order (an error discards it).
type LogStager = Pipe<std::io::Result<Vec<u8>>, Result<replica::StoreOutcome, StoreError>>;

/// Bytes flowing, in order, to a blocking thread of the store.
struct Pipe<T, R> {
    tx: mpsc::Sender<T>,
    thread: std::thread::JoinHandle<R>,
}

/// The connection's driver: checks the sender's site name, then runs one
/// session ([`run_session`]) on a `vdrep/1` connection, or every session
/// the sender opens on a `vdrep-mux/1` one ([`serve_mux`]), until the
/// connection is gone.
async fn handle_conn(
    conn: quinn::Connection,
    peer: transport::PeerIdentity,
    store: Arc<dyn ReplicaStore>,
    me: String,
    roles: Option<Arc<crate::roles::ReceiverCtx>>,
    fences: Arc<CopyFences>,
    bus: Option<Arc<crate::events::Bus>>,
) {
    let addr = conn.remote_address();
    let site = match transport::keys::check_site_name(&peer.cn) {
        Ok(s) => s.to_string(),
        Err(why) => {
            tracing::warn!(
                "refusing {addr}: certificate name {:?} is not a usable site name: {why}",
                peer.cn
            );
            conn.close(2u32.into(), b"certificate name is not a valid site name");
            return;
        }
    };
    let mux = transport::mux::negotiated(&conn);
    tracing::info!(%addr, %site, fingerprint = %peer.fingerprint.to_hex(), mux, "sender connected");
    let _active = crate::metrics::receiver::connection();
    // The connection's window follows the path's BDP, plus a stream window
    // per paused stream of any of its sessions (`transport::window`).
    let paused = transport::window::Paused::default();
    tokio::spawn(transport::window::run(
        conn.clone(),
        transport::Tuning::default().window_tune,
        paused.clone(),
    ));
    let ctx = SessionCtx {
        addr,
        site,
        store,
        me,
        roles,
        fences,
        bus,
    };
    if mux {
        serve_mux(conn, ctx, paused).await;
    } else {
        run_session(ctx, Streams::Own(conn), paused.part()).await;
    }
}

/// What every session of a connection shares.
#[derive(Clone)]
struct SessionCtx {
    addr: SocketAddr,
    site: String,
    store: Arc<dyn ReplicaStore>,
    me: String,
    roles: Option<Arc<crate::roles::ReceiverCtx>>,
    fences: Arc<CopyFences>,
    bus: Option<Arc<crate::events::Bus>>,
}

/// An accepted bidirectional stream.
type BiStream = (quinn::SendStream, quinn::RecvStream);

/// Where a session's streams come from, and how it ends.
enum Streams {
    /// `vdrep/1`: every stream of the connection; the session closes it.
    Own(quinn::Connection),
    /// `vdrep-mux/1`: the streams [`serve_mux`] hands this session (the
    /// channel closes when the session or the connection ends); the session
    /// ends alone, saying so to the sender ([`transport::mux::Control::End`]).
    Shared {
        conn: quinn::Connection,
        tag: u64,
        rx: mpsc::UnboundedReceiver<BiStream>,
    },
}

impl Streams {
    /// The next stream; `None`: the session's connection is gone (or, on a
    /// shared one, the sender ended the session).
    async fn next(&mut self, addr: SocketAddr) -> Option<BiStream> {
        match self {
            Streams::Own(conn) => match conn.accept_bi().await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::info!(%addr, "connection closed: {e}");
                    None
                }
            },
            Streams::Shared { rx, .. } => rx.recv().await,
        }
    }

    /// End the session on a protocol error.
    fn close(&self) {
        match self {
            Streams::Own(conn) => conn.close(1u32.into(), b"protocol error"),
            Streams::Shared { conn, tag, .. } => {
                let (conn, end) = (
                    conn.clone(),
                    transport::mux::Control::End {
                        tag: *tag,
                        code: 1,
                        reason: "protocol error".into(),
                    },
                );
                tokio::spawn(async move { transport::mux::send_control(&conn, &end).await });
            }
        }
    }
}

/// A header that does not decode, a stream of a session that ended: the
/// stream is reset and stopped with this code, nothing on it applied.
const MUX_REFUSED: u32 = 0x4d;

/// How long an accepted stream of a mux connection may take to send its
/// header.
const MUX_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What [`serve_mux`]'s helpers report.
enum MuxEvent {
    /// A stream of session `tag` (its header read).
    Stream(u64, BiStream),
    /// The sender ended session `tag`.
    End(u64, u32, String),
    /// Session `tag` ended on its own.
    Ended(u64),
}

/// A `vdrep-mux/1` connection: hand each accepted stream to the session its
/// header names (started by its first stream), end a session when the
/// sender says so, and every session when the connection is gone.
async fn serve_mux(conn: quinn::Connection, ctx: SessionCtx, paused: transport::window::Paused) {
    use transport::mux;
    let addr = ctx.addr;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<MuxEvent>();
    let mut sessions: HashMap<u64, mpsc::UnboundedSender<BiStream>> = HashMap::new();
    // Tags of sessions that ended: a late stream of one is not a new session.
    let mut ended: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let refuse = |(mut tx, mut rx): BiStream| {
        let _ = tx.reset(MUX_REFUSED.into());
        let _ = rx.stop(MUX_REFUSED.into());
    };
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((tx, mut rx)) => {
                    let ev = ev_tx.clone();
                    tokio::spawn(async move {
                        let header = tokio::time::timeout(MUX_HEADER_TIMEOUT, mux::read_stream_header(&mut rx)).await;
                        match header {
                            Ok(Ok(h)) => {
                                let _ = ev.send(MuxEvent::Stream(h.tag, (tx, rx)));
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(%addr, "refusing a stream: {e}; the stream is reset, nothing on it is applied");
                                refuse((tx, rx));
                            }
                            Err(_) => {
                                tracing::warn!(%addr, "refusing a stream: no mux header within {MUX_HEADER_TIMEOUT:?}; the stream is reset");
                                refuse((tx, rx));
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::info!(%addr, sessions = sessions.len(), "connection closed: {e}");
                    break;
                }
            },
            accepted = conn.accept_uni() => match accepted {
                Ok(mut rx) => {
                    let ev = ev_tx.clone();
                    tokio::spawn(async move {
                        match mux::read_control(&mut rx).await {
                            Ok(mux::Control::End { tag, code, reason }) => {
                                let _ = ev.send(MuxEvent::End(tag, code, reason));
                            }
                            Err(e) => {
                                tracing::warn!(%addr, "refusing a control stream: {e}; ignored");
                                let _ = rx.stop(MUX_REFUSED.into());
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::info!(%addr, sessions = sessions.len(), "connection closed: {e}");
                    break;
                }
            },
            Some(ev) = ev_rx.recv() => match ev {
                MuxEvent::Stream(tag, s) => {
                    if ended.contains(&tag) {
                        tracing::debug!(%addr, tag, "a stream of an ended session: reset");
                        refuse(s);
                        continue;
                    }
                    let to = sessions.entry(tag).or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let (ctx, conn, ev, part) = (ctx.clone(), conn.clone(), ev_tx.clone(), paused.part());
                        tokio::spawn(async move {
                            let _live = crate::metrics::receiver::session();
                            run_session(ctx, Streams::Shared { conn, tag, rx }, part).await;
                            let _ = ev.send(MuxEvent::Ended(tag));
                        });
                        tx
                    });
                    if let Err(mpsc::error::SendError(s)) = to.send(s) {
                        refuse(s);
                    }
                }
                MuxEvent::End(tag, code, reason) => {
                    ended.insert(tag);
                    if sessions.remove(&tag).is_some() {
                        tracing::debug!(%addr, tag, code, "the sender ended a session: {reason}");
                    }
                }
                MuxEvent::Ended(tag) => {
                    ended.insert(tag);
                    sessions.remove(&tag);
                }
            },
        }
    }
    // Every session sees its streams end: `Event::ConnectionLost`.
}

/// One session's driver: runs [`wire::session::Receiver`] against quinn
/// (one reader and one writer task per stream) and the store (blocking
/// threads), until the session or its connection is gone.
async fn run_session(
    ctx: SessionCtx,
    mut streams: Streams,
    mut paused_n: transport::window::PausedPart,
) {
    let SessionCtx {
        addr: _,
        site,
        store,
        me,
        roles,
        fences,
        bus,
    } = ctx.clone();
    let s2 = store.clone();
    let store_free = tokio::task::spawn_blocking(move || s2.free_bytes())
        .await
        .unwrap_or(0);
    let mut session = Receiver::new(ReceiverConfig {
        site_name: me,
        software_version: env!("CARGO_PKG_VERSION").into(),
        store_free,
        newest_version: receiver_protocol(),
        commit_stored: store.commits_durable_logs(),
    });
    let (in_tx, mut in_rx) = mpsc::channel::<Input>(64);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut c = Conn {
        site,
        store,
        roles,
        done: done_tx,
        initials: HashMap::new(),
        fences,
        logs: HashMap::new(),
        digests: HashMap::new(),
        bus,
    };
    let mut writers: HashMap<StreamId, mpsc::UnboundedSender<Write>> = HashMap::new();
    // Readers may read on (true) or must pause while their stream waits
    // for the store (flow control holds the peer back meanwhile).
    let mut readers: HashMap<StreamId, watch::Sender<bool>> = HashMap::new();
    let mut paused: Vec<StreamId> = Vec::new();
    let mut next_stream = 0u64;
    let start = std::time::Instant::now();
    let now = || start.elapsed().as_nanos() as u64;
    loop {
        while let Some(o) = session.poll() {
            match o {
                Output::Send { stream, bytes } => send(&writers, stream, Write::Bytes(bytes)),
                Output::Finish(stream) => send(&writers, stream, Write::End(StreamEnd::Finish)),
                Output::Reset(stream) => send(&writers, stream, Write::End(StreamEnd::Reset)),
                Output::Close(e) => {
                    tracing::warn!(site = %c.site, "closing the session: {e}");
                    streams.close();
                    return;
                }
                Output::Action(a) => c.perform(a).await,
                // Only a sender's copy hands read buffers back.
                Output::Spent { .. } => {}
            }
        }
        if session.is_closed() {
            return;
        }
        tokio::select! {
            accepted = streams.next(ctx.addr) => match accepted {
                Some((tx, rx)) => {
                    let sid = StreamId(next_stream);
                    next_stream += 1;
                    let (wtx, wrx) = mpsc::unbounded_channel();
                    writers.insert(sid, wtx);
                    tokio::spawn(write_stream(tx, wrx));
                    let (go, may_read) = watch::channel(true);
                    readers.insert(sid, go);
                    tokio::spawn(read_stream(sid, rx, may_read, in_tx.clone()));
                }
                None => session.handle(now(), Event::ConnectionLost),
            },
            Some(input) = in_rx.recv() => match input {
                Input::Data(stream, chunks) => {
                    for bytes in &chunks {
                        session.handle(now(), Event::Data { stream, bytes });
                    }
                    if !session.wants_data(stream) {
                        if let Some(go) = readers.get(&stream) {
                            go.send_replace(false);
                            if !paused.contains(&stream) {
                                paused.push(stream);
                            }
                            paused_n.set(paused.len());
                        }
                    }
                }
                Input::Finished(stream) => {
                    readers.remove(&stream);
                    session.handle(now(), Event::Finished(stream))
                }
                Input::Reset(stream) => {
                    readers.remove(&stream);
                    writers.remove(&stream);
                    session.handle(now(), Event::Reset(stream))
                }
            },
            Some((op, done)) = done_rx.recv() => {
                session.complete(now(), op, done);
                paused.retain(|s| {
                    let resume = session.wants_data(*s);
                    if resume {
                        if let Some(go) = readers.get(s) {
                            go.send_replace(true);
                        }
                    }
                    !resume
                });
                paused_n.set(paused.len());
            }
        }
    }
}

/// Hand `w` to the writer of `stream` (gone: the peer dropped it).
/// The newest protocol version this receiver accepts: this build's
/// ([`crate::wire::PROTOCOL_VERSION`]), unless `VDREP_RECEIVER_PROTOCOL`
/// names an older one it also speaks: then it refuses newer senders as a
/// receiver of that older build does (a compatibility test switch, not a
/// setting: senders of this build fall back to it).
fn receiver_protocol() -> u16 {
    static NEWEST: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *NEWEST.get_or_init(|| {
        let newest = crate::wire::PROTOCOL_VERSION;
        match std::env::var("VDREP_RECEIVER_PROTOCOL") {
            Err(_) => newest,
            Ok(v) => match v.trim().parse::<u16>() {
                Ok(n) if crate::wire::speaks(n) => {
                    tracing::warn!("VDREP_RECEIVER_PROTOCOL={n}: accepting senders of protocol {n} and older only (a test switch)");
                    n
                }
                _ => {
                    tracing::warn!(
                        "VDREP_RECEIVER_PROTOCOL={v:?} is not a protocol version this build speaks ({}..={newest}): ignored",
                        crate::wire::MIN_PROTOCOL_VERSION
                    );
                    newest
                }
            },
        }
    })
}

fn send(writers: &HashMap<StreamId, mpsc::UnboundedSender<Write>>, stream: StreamId, w: Write) {
    if let Some(tx) = writers.get(&stream) {
        let _ = tx.send(w);
    }
}

/// Chunks a stream's reader takes from quinn at once at most.
const READ_CHUNKS: usize = 64;

/// Feed what arrives on a stream to the connection's driver, pausing while
/// `may_read` says so.
async fn read_stream(
    sid: StreamId,
    mut rx: quinn::RecvStream,
    mut may_read: watch::Receiver<bool>,
    to: mpsc::Sender<Input>,
) {
    loop {
        if may_read.wait_for(|go| *go).await.is_err() {
            return;
        }
        // Every chunk quinn holds in order, in one go: one per packet
        // (~1.2 KB), so a message and a wake-up per chunk were a large
        // part of the receiver's CPU per byte.
        let mut bufs: [bytes::Bytes; READ_CHUNKS] = std::array::from_fn(|_| bytes::Bytes::new());
        let input = match rx.read_chunks(&mut bufs).await {
            Ok(Some(n)) => Input::Data(sid, bufs[..n].iter_mut().map(std::mem::take).collect()),
            Ok(None) => Input::Finished(sid),
            Err(_) => Input::Reset(sid),
        };
        let last = !matches!(input, Input::Data(..));
        if to.send(input).await.is_err() || last {
            return;
        }
    }
}

/// Write what the session answers on a stream, in order. A session that
/// ends without ending the stream resets it (on a shared connection the
/// stream outlives the session: a finish would pass a cut answer as whole).
async fn write_stream(mut tx: quinn::SendStream, mut from: mpsc::UnboundedReceiver<Write>) {
    while let Some(w) = from.recv().await {
        match w {
            Write::Bytes(b) => {
                if tx.write_all(&b).await.is_err() {
                    return;
                }
            }
            Write::End(end) => {
                end.apply(&mut tx);
                return;
            }
        }
    }
    StreamEnd::Reset.apply(&mut tx);
}

fn code_of(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::InvalidName { .. } | StoreError::Escape { .. } => ErrorCode::InvalidName,
        StoreError::NoSpace { .. } => ErrorCode::NoSpace,
        StoreError::Io { .. } | StoreError::OpenFiles { .. } => ErrorCode::Io,
        StoreError::Access { .. } => ErrorCode::Io,
        StoreError::OutOfOrder { .. }
        | StoreError::IdentityMismatch { .. }
        | StoreError::InUse { .. } => ErrorCode::InvalidState,
        // A newer writer (or a failover) owns the VM now: this writer stops.
        // Not InvalidState, which the session reads as "this log cannot be
        // applied in order" and answers with a resync of the disk (seen in
        // CI: the old primary went ResyncRequired, not Critical, when the
        // failover record fenced it during an apply).
        StoreError::Fenced { .. } => ErrorCode::Refused,
        StoreError::BadState { .. } | StoreError::NeedsResync { .. } => ErrorCode::ResyncRequired,
        StoreError::CorruptLog { .. } => ErrorCode::Checksum,
        StoreError::Injected { .. } => ErrorCode::Io,
        StoreError::NotReady { .. } | StoreError::NoSuchPoint { .. } => ErrorCode::NotFound,
        StoreError::Locked { .. } | StoreError::Busy { .. } => ErrorCode::Busy,
    }
}

/// A store error, as the session answers it.
fn failure(e: StoreError) -> StoreFailure {
    tracing::warn!("{e}");
    StoreFailure {
        code: code_of(&e),
        retryable: e.retryable(),
        message: e.to_string(),
    }
}

/// The last path component of a disk name (the store keeps one component).
fn store_name(disk_name: &str) -> &str {
    disk_name.rsplit('/').next().unwrap_or(disk_name)
}

fn disk<'a>(site: &'a str, vm: &'a str, disk_id: &'a DiskId) -> DiskRef<'a> {
    DiskRef { site, vm, disk_id }
}

/// Close the pipe of the store's thread `what` and wait for its result.
fn finish<T, R>(pipe: Option<Pipe<T, Result<R, StoreError>>>, what: &str) -> Result<R, StoreError> {
    let bad = |why: &str| StoreError::BadState {
        path: PathBuf::from(format!("<{what}>")),
        what: why.into(),
    };
    let Some(Pipe { tx, thread }) = pipe else {
        return Err(bad("nothing was staged for this transfer"));
    };
    drop(tx);
    thread
        .join()
        .unwrap_or_else(|_| Err(bad("the store thread panicked")))
}

impl Conn {
    /// Run `f` on a blocking thread; its result completes `op`.
    fn spawn(
        &self,
        op: OpId,
        f: impl FnOnce(&dyn ReplicaStore, &str) -> StoreDone + Send + 'static,
    ) {
        let (store, site, done) = (self.store.clone(), self.site.clone(), self.done.clone());
        let asked = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            crate::util::phase::done("recv_pool_wait", &site, asked);
            let _ = done.send((op, f(store.as_ref(), &site)));
        });
    }

    /// Perform one action of the session.
    async fn perform(&mut self, a: ReceiverAction) {
        match a {
            ReceiverAction::LoadDisk { op, open } => self.spawn(op, move |store, site| {
                StoreDone::DiskLoaded(load_disk(store, site, &open))
            }),
            ReceiverAction::BeginInitial { op, open, begin } => {
                let (fence, gen) = self.start_initial(begin.disk_id, &open.vm);
                let bus = self.bus.clone();
                self.spawn(op, move |store, site| {
                    // No older writer of the disk writes after this.
                    fence.settle();
                    if !fence.current(gen) {
                        // A newer copy of the disk began (on another
                        // connection) before this one reached the store:
                        // this begin must not reset that copy's state.
                        return StoreDone::InitialBegun(Err(failure(superseded_copy())));
                    }
                    let r = begin_initial(store, site, &open, &begin, bus.as_deref());
                    crate::util::phase::step("recv_copy_begun", &open.vm);
                    StoreDone::InitialBegun(r.map_err(failure))
                })
            }
            ReceiverAction::WriteInitial {
                disk_id,
                offset,
                data,
                ..
            } => {
                if let Some(p) = self.initials.get(&disk_id) {
                    // A write error ends the thread; FinishInitial reports it.
                    let _ = p.tx.send((offset, data)).await;
                }
            }
            ReceiverAction::FinishInitial {
                op,
                vm,
                disk_id,
                cycle,
            } => {
                let writer = self.initials.remove(&disk_id);
                crate::util::phase::step("recv_copy_end", &vm);
                self.spawn(op, move |store, site| {
                    let r = finish(writer, "write_initial").and_then(|()| {
                        let d = disk(site, &vm, &disk_id);
                        store.finish_initial(d, cycle, crate::util::now_ns())
                    });
                    crate::util::phase::step("recv_copy_durable", &vm);
                    StoreDone::InitialFinished(r.map_err(failure))
                })
            }
            ReceiverAction::StageLog { op, vm, begin } => {
                let (tx, rx) = mpsc::channel(4);
                let (store, site) = (self.store.clone(), self.site.clone());
                let thread = std::thread::spawn(move || {
                    let mut r = ChanReader {
                        rx,
                        cur: Vec::new(),
                        pos: 0,
                        first: crate::util::phase::enabled()
                            .then(|| (std::time::Instant::now(), vm.clone())),
                    };
                    let t = std::time::Instant::now();
                    let stored = store.store_log(disk(&site, &vm, &begin.disk_id), &mut r);
                    crate::util::phase::done("recv_store_log", &vm, t);
                    stored
                });
                self.logs.insert(op, Pipe { tx, thread });
            }
            ReceiverAction::StageLogData { op, data, .. } => {
                if let Some(p) = self.logs.get(&op) {
                    // Closed: the store has what it needs (a resend).
                    let t = std::time::Instant::now();
                    let _ = p.tx.send(Ok(data)).await;
                    // The session's driver waited for the store's thread.
                    if t.elapsed() > std::time::Duration::from_millis(1) {
                        crate::util::phase::done("recv_stage_stall", &self.site, t);
                    }
                }
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                let staged = self.logs.remove(&op);
                self.spawn(op, move |_, _| {
                    StoreDone::LogStored(match finish(staged, "store_log") {
                        Ok(replica::StoreOutcome::AlreadyApplied { .. }) => {
                            Ok(LogStored::AlreadyApplied)
                        }
                        Ok(_) => Ok(LogStored::Stored),
                        Err(e) => Err(failure(e)),
                    })
                })
            }
            ReceiverAction::DiscardLog { op } => {
                if let Some(p) = self.logs.remove(&op) {
                    // The store reads an error and drops what it staged.
                    let discarded = std::io::Error::other("the log was discarded");
                    let _ = p.tx.send(Err(discarded)).await;
                }
            }
            ReceiverAction::ApplyLog {
                op,
                vm,
                disk_id,
                cycle,
            } => {
                self.digests.remove(&disk_id);
                let bus = self.bus.clone();
                self.spawn(op, move |store, site| {
                    let t = std::time::Instant::now();
                    let r = crate::metrics::receiver::time_apply(|| {
                        store.apply(disk(site, &vm, &disk_id), cycle)
                    });
                    crate::util::phase::done("recv_apply", &vm, t);
                    report_apply(bus.as_deref(), disk(site, &vm, &disk_id), cycle, &r);
                    StoreDone::LogApplied(r.map(|_| ()).map_err(failure))
                })
            }
            ReceiverAction::CommitPoint {
                op,
                vm,
                cycle,
                app_consistent,
                disks,
                definition,
                group,
            } => self.spawn(op, move |store, site| {
                let ids: Vec<DiskId> = disks.iter().map(|d| d.disk_id).collect();
                let consistency = if app_consistent {
                    replica::Consistency::App
                } else {
                    replica::Consistency::Crash
                };
                // The definition is durable before the point exists.
                if let Some(x) = &definition {
                    if let Err(e) = store.save_definition(site, &vm, cycle, x) {
                        return StoreDone::PointCommitted(Err(failure(e)));
                    }
                }
                // So is its consistency group.
                if let Some(g) = group {
                    let rec = replica::GroupRecord {
                        name: g.name,
                        origin: g.origin,
                        members: g.members,
                    };
                    if let Err(e) = store.save_group(site, &vm, cycle, &rec) {
                        return StoreDone::PointCommitted(Err(failure(e)));
                    }
                }
                let t = std::time::Instant::now();
                let r = store.commit_point(site, &vm, cycle, &ids, consistency);
                crate::util::phase::done("recv_commit_point", &vm, t);
                if matches!(r, Ok(Some(_))) {
                    crate::util::phase::step("recv_point_committed", &vm);
                }
                StoreDone::PointCommitted(r.map(|p| p.is_some()).map_err(failure))
            }),
            ReceiverAction::HashBlocks { op, vm, req } => {
                let cache = self.digests.entry(req.disk_id).or_default().clone();
                self.spawn(op, move |store, site| {
                    let runs: Vec<(u64, u32)> =
                        req.runs.iter().map(|x| (x.offset, x.blocks)).collect();
                    let r = store.block_hashes(
                        disk(site, &vm, &req.disk_id),
                        req.replica_cycle,
                        req.block_size,
                        &runs,
                        &mut cache.lock(),
                    );
                    StoreDone::Hashed(r.map_err(failure))
                })
            }
            ReceiverAction::PrepareResync { op, vm, end } => {
                self.digests.remove(&end.disk_id);
                tracing::info!(
                    site = %self.site, %vm,
                    "resync compare done: {} of {} blocks differ; their log is cycle {}",
                    end.blocks_differ, end.blocks_compared, end.cycle
                );
                self.spawn(op, move |store, site| {
                    let d = disk(site, &vm, &end.disk_id);
                    let r = store.resync_prepared(d, end.replica_cycle, end.cycle);
                    StoreDone::ResyncPrepared(r.map_err(failure))
                })
            }
            ReceiverAction::MarkNeedsResync { vm, disk_id, why } => {
                // Before the refusal goes out: the sender resyncs at once.
                let d = disk(&self.site, &vm, &disk_id);
                match tokio::task::block_in_place(|| self.store.set_needs_resync(d, Some(&why))) {
                    Ok(()) => tracing::warn!(
                        site = %self.site, %vm,
                        "{why}; the replica is marked for resync"
                    ),
                    Err(e) => tracing::error!("cannot mark the replica for resync: {e}"),
                }
            }
            ReceiverAction::Admin { op, body } => {
                let roles = self.roles.clone();
                self.spawn(op, move |_, site| {
                    StoreDone::AdminDone(admin(roles.as_deref(), site, &body))
                })
            }
            ReceiverAction::Refused { stream, error } => {
                tracing::warn!(site = %self.site, stream = stream.0, "refused: {error}");
            }
        }
    }

    /// A writer thread for the initial copy of `disk_id` (replacing one a
    /// dead stream left behind); older writers of the disk are fenced off
    /// before the store begins the copy.
    fn start_initial(&mut self, disk_id: DiskId, vm: &str) -> (Arc<CopyFence>, u64) {
        let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(4);
        let (store, site, vm) = (self.store.clone(), self.site.clone(), vm.to_string());
        let (fence, gen) = self.fences.begin(&site, disk_id);
        let mine = fence.clone();
        let thread = std::thread::spawn(move || {
            write_initial_copy(&mut rx, &mine, gen, store.as_ref(), &site, &vm, disk_id)
        });
        self.initials.insert(disk_id, Pipe { tx, thread });
        (fence, gen)
    }
}

/// The body of an initial copy's writer thread ([`Conn::start_initial`]):
/// writes the copy's bytes until the stream ends, then says whether the
/// copy may be finished. Superseded by a newer copy of the disk (checked
/// before each write and at the end: `FinishInitial` joins this thread
/// before it finishes the copy, and a newer copy moves the fence before its
/// `begin_initial` reaches the store), it writes nothing more and fails:
/// its bytes may be missing and the store's progress is the newer copy's,
/// so finishing it would zero the bytes past the durable progress as holes
/// (found by tests/session_sim.rs seed 3060).
fn write_initial_copy(
    rx: &mut mpsc::Receiver<(u64, Vec<u8>)>,
    fence: &CopyFence,
    gen: u64,
    store: &dyn ReplicaStore,
    site: &str,
    vm: &str,
    disk_id: DiskId,
) -> Result<(), StoreError> {
    while let Some((offset, data)) = rx.blocking_recv() {
        // Held across the write: a newer copy's `settle` waits for it.
        let writing = fence.write.lock();
        if !fence.current(gen) {
            break;
        }
        let d = disk(site, vm, &disk_id);
        let what = if crate::hrl::format::is_all_zero(&data) {
            replica::InitialData::Zeroes(data.len() as u64)
        } else {
            replica::InitialData::Data(&data)
        };
        store.write_initial(d, offset, what)?;
        drop(writing);
    }
    if !fence.current(gen) {
        tracing::info!(
            disk = %crate::util::hex(&disk_id),
            "initial copy superseded by a newer copy of the disk on another connection"
        );
        return Err(superseded_copy());
    }
    Ok(())
}

/// An initial copy a newer copy of the same disk superseded.
fn superseded_copy() -> StoreError {
    StoreError::BadState {
        path: PathBuf::from("<initial copy>"),
        what: "a newer copy of this disk began on another connection before this one ended; \
               this one is not begun or finished (the sender copies again from the \
               replica's saved progress)"
            .into(),
    }
}

/// Look up the replica of a disk a sender opens (refused if its names are
/// unsafe, or if the VM failed over to this site).
fn load_disk(
    store: &dyn ReplicaStore,
    site: &str,
    o: &OpenDisk,
) -> Result<DiskStatus, StoreFailure> {
    if let Err(e) = wire::safe_component(&o.vm).and_then(|_| wire::safe_name(&o.disk_name)) {
        return Err(StoreFailure {
            code: ErrorCode::InvalidName,
            retryable: false,
            message: e.to_string(),
        });
    }
    if let Some(live) = store.failed_over(site, &o.vm).ok().flatten() {
        return Err(failure(live.replication_refused(
            replica::Ctx::new(site, &o.vm, &o.disk_name),
            &o.vm,
        )));
    }
    if store.commits_durable_logs() {
        // Points may be committed on durable logs not applied yet (a
        // connection that ended before its applies ran): apply them, so
        // the cycle told to the sender (and compared by a verify or a
        // resync) includes every committed point. A log that cannot be
        // applied stays; the answer then gives the cycle reached, and the
        // sender ships from there.
        if let Err(e) = store.drain(disk(site, &o.vm, &o.disk_id), None) {
            if !matches!(e, StoreError::NotReady { .. }) {
                tracing::warn!(site, vm = %o.vm, disk = %o.disk_name, "applying the durable logs before answering OpenDisk: {e}");
            }
        }
    }
    let mut st = match store.replica_state(disk(site, &o.vm, &o.disk_id)) {
        Ok(st) => st,
        Err(StoreError::NotReady { .. }) => return Ok(DiskStatus::default()),
        Err(e) => return Err(failure(e)),
    };
    if let Some(a) = st.applying {
        // An apply is under way (a store thread of a connection that just
        // ended still runs it) or was interrupted. Answering cycle 0 would
        // read as "no replica" to the sender, which then copies the disk
        // whole, and a full copy ends the VM's history: every recovery
        // point was dropped (libvirt_e2e, a reconnect right after a
        // `ResyncRequired` cut). Finish it first: `apply` waits for the
        // running one (the disk's lock) or rolls the interrupted one forward.
        store
            .apply(disk(site, &o.vm, &o.disk_id), a)
            .map_err(failure)?;
        st = store
            .replica_state(disk(site, &o.vm, &o.disk_id))
            .map_err(failure)?;
        if let Some(a) = st.applying {
            return Err(failure(StoreError::NotReady {
                ctx: replica::Ctx::new(site, &o.vm, &o.disk_name),
                what: format!(
                    "the apply of cycle {a} is still being finished: open the disk again"
                ),
            }));
        }
    }
    Ok(match st.applying {
        None => DiskStatus {
            replica_cycle: st.cycle.unwrap_or(0),
            replica_size: st.size,
            copy_cycle: st.initial_cycle.unwrap_or(0),
            resume_offset: st.initial_offset.unwrap_or(0),
            needs_resync: st.needs_resync,
        },
        Some(_) => DiskStatus {
            replica_size: st.size,
            needs_resync: st.needs_resync,
            ..DiskStatus::default()
        },
    })
}

/// Apply failures already reported, by (site, vm, disk): the cycle. One
/// `apply_failed` event per disk and failing cycle, not one per retry of
/// the sender (a pager behind `notify_command` hears it once); forgotten
/// when an apply of the disk succeeds. Process-wide, as the receiver's
/// metrics: one receiver per process.
static APPLY_FAILED: std::sync::LazyLock<Mutex<HashMap<ApplyKey, u64>>> =
    std::sync::LazyLock::new(Default::default);

/// A replica: site, VM, disk.
type ApplyKey = (String, String, DiskId);

/// Note the outcome of an apply: an `apply_failed` event the first time a
/// cycle of the disk fails.
fn report_apply(
    bus: Option<&crate::events::Bus>,
    d: DiskRef<'_>,
    cycle: u64,
    r: &Result<replica::ApplyOutcome, StoreError>,
) {
    let key = (d.site.to_string(), d.vm.to_string(), *d.disk_id);
    let e = match r {
        Ok(_) => {
            APPLY_FAILED.lock().remove(&key);
            return;
        }
        Err(e) => e,
    };
    if APPLY_FAILED.lock().insert(key, cycle) == Some(cycle) {
        return;
    }
    if let Some(bus) = bus {
        bus.emit(
            Some(d.vm),
            crate::events::EventKind::ApplyFailed {
                site: d.site.to_string(),
                disk: crate::util::hex(d.disk_id),
                cycle,
                error: e.to_string(),
                retryable: e.retryable(),
            },
        );
    }
}

/// Start or resume an initial copy; the offset it resumes at.
fn begin_initial(
    store: &dyn ReplicaStore,
    site: &str,
    o: &OpenDisk,
    b: &InitialBegin,
    bus: Option<&crate::events::Bus>,
) -> Result<u64, StoreError> {
    let d = disk(site, &o.vm, &b.disk_id);
    // A resumed copy continues the store's interrupted copy (its cut is the
    // one the store knows); blocks below the offset that changed since then
    // are part of this stream.
    let info_cycle = if b.start_offset > 0 {
        store
            .replica_state(d)
            .ok()
            .and_then(|s| s.initial_cycle)
            .unwrap_or(b.cycle)
    } else {
        b.cycle
    };
    let info = replica::DiskInfo {
        disk_id: b.disk_id,
        name: store_name(&o.disk_name).to_string(),
        size: b.disk_size,
        block_size: o.block_size,
        cycle: info_cycle,
    };
    let begun = store.begin_initial(site, &o.vm, &info)?;
    if let Some(d) = &begun.dropped {
        tracing::warn!(%site, vm = %o.vm, disk = %d.disk, "{d}");
        crate::metrics::receiver::points_dropped(d.cycles.len() as u64);
        if let Some(bus) = bus {
            bus.emit(
                Some(&o.vm),
                crate::events::EventKind::PointsDropped {
                    site: site.to_string(),
                    disk: d.disk.clone(),
                    cycles: d.cycles.clone(),
                    reason: d.why.to_string(),
                },
            );
        }
    }
    let resume = begun.resume_offset;
    if b.start_offset > 0 && resume == b.start_offset {
        // Continue the interrupted copy as part of this newer cut.
        return store.rebase_initial(d, b.cycle);
    }
    Ok(resume)
}

/// A site-to-site administrative request ([`crate::roles`]), for the
/// requester's own namespace only: the JSON answer.
fn admin(
    roles: Option<&crate::roles::ReceiverCtx>,
    site: &str,
    body: &str,
) -> Result<String, StoreFailure> {
    let refuse = |code, message: String| StoreFailure {
        code,
        retryable: false,
        message,
    };
    let req: crate::roles::AdminRequest = serde_json::from_str(body).map_err(|e| {
        refuse(
            ErrorCode::Protocol,
            format!("unreadable administrative request: {e}"),
        )
    })?;
    tracing::info!(%site, "administrative request: {req:?}");
    let Some(roles) = roles else {
        return Err(refuse(
            ErrorCode::Unauthorized,
            "administrative requests (planned failover, failback) are not served for direct protection to an object store: fail over from the bucket with `vdrep failover --store s3://…`".into(),
        ));
    };
    // A refusal keeps its kind: the requester reports it as its own.
    crate::roles::handle_admin(roles, site, req)
        .map_err(|e| {
            let code = match e.kind() {
                crate::roles::RoleErrorKind::Refused => ErrorCode::Refused,
                _ => ErrorCode::InvalidState,
            };
            (code, e.to_string())
        })
        .and_then(|a| serde_json::to_string(&a).map_err(|e| (ErrorCode::Internal, e.to_string())))
        .map_err(|(code, e)| {
            tracing::warn!(%site, "administrative request failed: {e}");
            refuse(code, e)
        })
}

/// Feeds `store_log` (blocking) from the network side; an error item
/// makes the store discard the log.
struct ChanReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    /// Until the first bytes arrive: since when the store waits, and for
    /// which VM (phase `recv_first_chunk`).
    first: Option<(std::time::Instant, String)>,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(v) => {
                    if let Some((t, vm)) = self.first.take() {
                        crate::util::phase::done("recv_first_chunk", &vm, t);
                    }
                    self.cur = v?;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hrl::{HrlHeader, HrlWriter};
    use crate::replica::{FailStore, Op};
    use std::time::Duration;

    const ID: DiskId = [0x5a; 16];
    const BS: u64 = 4096;

    /// tests/session_sim.rs seed 3060, against the real store: a copy's
    /// bytes are all written, then a newer copy of the disk begins on
    /// another connection (the store drops the older one's unsynced
    /// progress), then the older copy's `FinishInitial` runs. It must fail:
    /// finishing it would zero everything past the durable progress (here
    /// the whole disk) and call that replica cycle 2.
    #[test]
    fn a_copy_superseded_by_a_newer_one_is_not_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ReplicaStore> =
            Arc::new(replica::Store::open(&dir.path().join("store")).unwrap());
        let info = replica::DiskInfo {
            disk_id: ID,
            name: "data.img".into(),
            size: 16 * BS,
            block_size: BS as u32,
            cycle: 2,
        };
        let fences = CopyFences::default();
        let (fence, gen) = fences.begin("site", ID);
        store.begin_initial("site", "vm", &info).unwrap();
        let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(4);
        let (st, f) = (store.clone(), fence.clone());
        let thread = std::thread::spawn(move || {
            write_initial_copy(&mut rx, &f, gen, st.as_ref(), "site", "vm", ID)
        });
        for b in 0..16u64 {
            tx.blocking_send((b * BS, vec![7u8; BS as usize])).unwrap();
        }
        // Every write received (the last may be in flight: `settle` below).
        while tx.capacity() < tx.max_capacity() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The newer copy (same cycle: a resume) on another connection.
        let (newer, _) = fences.begin("site", ID);
        newer.settle();
        store.begin_initial("site", "vm", &info).unwrap();
        // The older connection's FinishInitial, as `Conn::perform` runs it.
        let finished = finish(Some(Pipe { tx, thread }), "write_initial")
            .and_then(|()| store.finish_initial(disk("site", "vm", &ID), 2, 0));
        assert!(
            finished.is_err(),
            "a superseded copy was finished: the replica would be zeros past the durable progress"
        );
        let st = store.replica_state(disk("site", "vm", &ID)).unwrap();
        assert_eq!(
            st.cycle, None,
            "no replica at cycle 2 from the superseded copy"
        );
        assert!(st.initial_offset.is_some(), "the copy stays resumable");
    }

    /// A store with one disk at cycle 1 and the durable log of cycle 2.
    fn disk_at_1_with_log_2(dir: &std::path::Path) -> Arc<replica::Store> {
        let store = Arc::new(replica::Store::open(&dir.join("store")).unwrap());
        let d = disk("site", "vm", &ID);
        let info = replica::DiskInfo {
            disk_id: ID,
            name: "data.img".into(),
            size: 16 * BS,
            block_size: BS as u32,
            cycle: 1,
        };
        store.begin_initial("site", "vm", &info).unwrap();
        store
            .write_initial(d, 0, replica::InitialData::Data(&[1u8; 16 * 4096]))
            .unwrap();
        store.finish_initial(d, 1, 0).unwrap();
        let h = HrlHeader {
            disk_id: ID,
            disk_name: "data.img".into(),
            cycle: 2,
            base_cycle: 1,
            block_size: BS as u32,
            base_size: 16 * BS,
            disk_size: 16 * BS,
            cut_unix_ns: 1,
            app_consistent: false,
        };
        let logp = dir.join("2.hrl");
        let mut w = HrlWriter::create(&logp, &h).unwrap();
        for b in 0..4u64 {
            w.append(b * 2 * BS, &[2u8; 4096]).unwrap();
        }
        w.finish().unwrap();
        let out = store
            .store_log(d, &mut std::fs::File::open(&logp).unwrap())
            .unwrap();
        assert!(
            matches!(out, replica::StoreOutcome::Stored { .. }),
            "{out:?}"
        );
        store
    }

    /// One `apply_failed` event per disk and failing cycle: not per retry,
    /// again for a new cycle, and again for the same cycle once an apply
    /// of the disk succeeded in between.
    #[test]
    fn an_apply_failure_is_an_event_once_per_disk_and_cycle() {
        let bus = crate::events::Bus::default();
        let id = [0x5a; 16];
        let d = disk("site-ev", "vm-ev", &id);
        let failed = || -> Result<replica::ApplyOutcome, StoreError> {
            Err(StoreError::Busy {
                ctx: replica::Ctx::default(),
                what: "injected".into(),
            })
        };
        let ok = || -> Result<replica::ApplyOutcome, StoreError> {
            Ok(replica::ApplyOutcome::AlreadyApplied {
                cycle: 1,
                replica_cycle: 1,
            })
        };
        let cycles = |bus: &crate::events::Bus| -> Vec<u64> {
            bus.since(0, Duration::ZERO)
                .events
                .iter()
                .filter_map(|e| match &e.kind {
                    crate::events::EventKind::ApplyFailed { cycle, disk, .. } => {
                        assert_eq!(disk, &crate::util::hex(&id));
                        Some(*cycle)
                    }
                    _ => None,
                })
                .collect()
        };
        report_apply(Some(&bus), d, 2, &failed());
        report_apply(Some(&bus), d, 2, &failed());
        assert_eq!(cycles(&bus), vec![2], "once per retry of the same cycle");
        report_apply(Some(&bus), d, 3, &failed());
        assert_eq!(cycles(&bus), vec![2, 3]);
        report_apply(Some(&bus), d, 3, &ok());
        report_apply(Some(&bus), d, 3, &failed());
        assert_eq!(cycles(&bus), vec![2, 3, 3], "again after a success");
    }

    /// A point committed on a durable log whose connection ended before
    /// asking for its apply: the drainer applies it once two passes in a
    /// row found it unapplied (no connection applied it in between), and
    /// nothing past the newest point; a pass with nothing to do changes
    /// nothing.
    #[test]
    fn the_drainer_applies_committed_logs_no_connection_applies() {
        let dir = tempfile::tempdir().unwrap();
        let store = disk_at_1_with_log_2(dir.path());
        let d = disk("site", "vm", &ID);
        let mut drainer = Drainer::default();
        for _ in 0..2 {
            assert!(drainer.pass(store.as_ref()).is_empty());
        }
        assert_eq!(
            store.replica_state(d).unwrap().cycle,
            Some(1),
            "log 2 is in no point: not applied"
        );
        let pt = store
            .commit_point("site", "vm", 2, &[ID], replica::Consistency::Crash)
            .unwrap();
        assert_eq!(pt.map(|p| p.cycle), Some(2), "committed on the durable log");
        // `vdrep points` shows which points are still being applied
        // (tests/replica_store.rs checks the offline reading too).
        let applied = |store: &replica::Store| -> Vec<(u64, bool)> {
            let site = store.site("site").unwrap();
            control::PointInfo::list(&site, "vm", &[])
                .unwrap()
                .iter()
                .map(|p| (p.point.cycle, p.applied))
                .collect()
        };
        assert_eq!(applied(&store), vec![(2, false)]);
        assert!(drainer.pass(store.as_ref()).is_empty());
        assert_eq!(
            store.replica_state(d).unwrap().cycle,
            Some(1),
            "a connection may still apply it: left for one pass"
        );
        assert!(drainer.pass(store.as_ref()).is_empty());
        let st = store.replica_state(d).unwrap();
        assert_eq!(
            (st.cycle, st.applying),
            (Some(2), None),
            "applied by the drainer"
        );
        assert_eq!(applied(&store), vec![(2, true)]);
        let mut buf = vec![0u8; 16 * BS as usize];
        store
            .read_point(d, 2)
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf[..4096], &[2u8; 4096][..]);
        assert_eq!(&buf[4096..8192], &[1u8; 4096][..]);
        assert!(drainer.pass(store.as_ref()).is_empty());
        assert_eq!(store.replica_state(d).unwrap().cycle, Some(2));
    }

    /// c8bde70: a disk opened while a store thread (of a connection that
    /// just ended) is in the middle of applying it must be answered with
    /// the cycle that apply reaches, never with 0 ("no replica": the
    /// sender then copies the disk whole and the VM's points are
    /// dropped). Deterministic: the apply is paused with its state saying
    /// `applying`, and released only once the opening either answered
    /// (the old code answered 0 at once) or asked the store to finish the
    /// apply (the fix: `apply` waits for the disk's lock).
    #[test]
    fn a_disk_opened_during_an_apply_of_a_dead_connection_reports_the_applied_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = disk_at_1_with_log_2(dir.path());
        let fs = Arc::new(FailStore::new(store.clone(), Vec::new(), 0));
        let pause = store.pause_at("state-applying");
        // The dead connection's store thread.
        let applier = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.apply(disk("site", "vm", &ID), 2))
        };
        assert!(
            pause.wait_reached(Duration::from_secs(30)),
            "apply never paused"
        );
        let st = store.replica_state(disk("site", "vm", &ID)).unwrap();
        assert_eq!((st.cycle, st.applying), (Some(1), Some(2)));
        // The new connection's `OpenDisk`.
        let opener = {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let o = OpenDisk {
                    vm: "vm".into(),
                    disk_name: "data.img".into(),
                    disk_id: ID,
                    block_size: BS as u32,
                    disk_size: 16 * BS,
                    kind: wire::DiskKind::Raw,
                };
                load_disk(fs.as_ref(), "site", &o)
            })
        };
        let t0 = std::time::Instant::now();
        // The opening reaches the store (its drain, or an apply, waits
        // for the paused one's lock) or answers.
        while !opener.is_finished() && fs.calls(Op::Apply) < 2 && fs.calls(Op::Drain) < 1 {
            assert!(t0.elapsed() < Duration::from_secs(30), "the opening hangs");
            std::thread::sleep(Duration::from_millis(2));
        }
        pause.release();
        let applied = applier.join().unwrap().unwrap();
        assert!(
            matches!(applied, replica::ApplyOutcome::Applied { cycle: 2, .. }),
            "{applied:?}"
        );
        let status = opener.join().unwrap().unwrap();
        assert_eq!(
            status.replica_cycle, 2,
            "the disk was reported without a replica while it was being applied: {status:?}"
        );
        assert_eq!(status.copy_cycle, 0);
    }
}
