//! The receiver: the secondary site's server.
//!
//! Accepts QUIC connections (mutual TLS 1.3, pinned certificates), maps each
//! sender to its own namespace in the replica store by the **certificate's
//! name** (what the sender says in `Hello` is only logged), and serves the
//! wire protocol ([`crate::wire`]) one bidirectional stream per operation:
//! `OpenDisk`, an initial copy, one log, or a point commit. Logs are stored
//! durably before anything is applied ([`crate::replica`]); an `Ack` with
//! `applied` is sent only after the replica was written and fsynced.

pub mod control;
pub mod control_server;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::replica::{self, DiskRef, ReplicaStore, StoreError};
use crate::transport::TransportError;
use crate::transport::{self, keys::Identity, trust::TrustStore};
use crate::wire::{self, ErrorCode, Msg, WireError};

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
    /// The stream or the connection failed (peer gone, reset, bad frame).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer broke the log protocol (offsets, lengths, checksum, order).
    #[error("{0}")]
    Protocol(String),
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
    /// One connection or stream failed: the sender retries; nothing to do.
    Stream,
}

impl ReceiverError {
    pub fn kind(&self) -> ReceiverErrorKind {
        match self {
            ReceiverError::Transport(_) => ReceiverErrorKind::Config,
            ReceiverError::Store { .. } => ReceiverErrorKind::Store,
            ReceiverError::Start { .. } => ReceiverErrorKind::Resource,
            ReceiverError::Wire(_) | ReceiverError::Protocol(_) => ReceiverErrorKind::Stream,
        }
    }
}

#[derive(Debug, Clone)]
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

struct Session {
    site: String,
    /// For site-to-site administration (failover, reverse).
    roles: Arc<crate::roles::ReceiverCtx>,
    hello: AtomicBool,
    /// disk id -> (vm, OpenDisk) announced on this connection.
    disks: Mutex<HashMap<[u8; 16], (String, wire::OpenDisk)>>,
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
    let hup = opts.reload_trust_from.as_ref().map(|_| {
        let mut s = nix::sys::signal::SigSet::empty();
        s.add(nix::sys::signal::Signal::SIGHUP);
        let _ = s.thread_block();
        s
    });
    let id = Identity::from_dir(&opts.keys, None)?;
    let trust = transport::SharedTrust::new(TrustStore::from_files(&opts.trust)?);
    if let (Some(sigs), Some(path)) = (hup, opts.reload_trust_from.clone()) {
        let trust = trust.clone();
        std::thread::Builder::new()
            .name("vdrep-reload".into())
            .spawn(move || {
                while sigs.wait().is_ok() {
                    reload_trust(&path, &trust);
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
    let store = Arc::new(replica::Store::open(&opts.store).map_err(store_err)?);
    let r = store.recover().map_err(store_err)?;
    tracing::info!("store {} recovered: {r:?}", opts.store.display());
    // The replication data path sees the store through the seam (wrapped to
    // crash at a step between operations when a test asks for it).
    let data: Arc<dyn ReplicaStore> = replica::FailStore::from_env(store.clone());
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
    control_server::start(store.clone(), views, roles.clone()).map_err(|source| {
        ReceiverError::Start {
            what: "control socket",
            source,
        }
    })?;
    if let Some(every) = opts.prune_every {
        let store = data.clone();
        let keep = opts.retention.clone();
        std::thread::Builder::new()
            .name("vdrep-prune".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                for line in prune_all(store.as_ref(), &keep) {
                    tracing::info!("retention: {line}");
                }
            })
            .map_err(|source| ReceiverError::Start {
                what: "retention thread",
                source,
            })?;
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
        while let Some(inc) = ep.accept().await {
            let store = data.clone();
            let me = id.name.clone();
            let roles = roles.clone();
            tokio::spawn(async move {
                if let Ok((conn, peer)) = transport::accept(inc).await {
                    handle_conn(conn, peer, store, me, roles).await;
                }
            });
        }
        Ok(())
    })
}

async fn handle_conn(
    conn: quinn::Connection,
    peer: transport::PeerIdentity,
    store: Arc<dyn ReplicaStore>,
    me: String,
    roles: Arc<crate::roles::ReceiverCtx>,
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
    tracing::info!(%addr, %site, fingerprint = %peer.fingerprint.to_hex(), "sender connected");
    let sess = Arc::new(Session {
        site,
        roles,
        hello: AtomicBool::new(false),
        disks: Mutex::new(HashMap::new()),
    });
    loop {
        match conn.accept_bi().await {
            Ok((tx, rx)) => {
                let (sess, store, me) = (sess.clone(), store.clone(), me.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle_stream(&sess, store.as_ref(), &me, tx, rx).await {
                        tracing::warn!(site = %sess.site, "stream ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::info!(%addr, "connection closed: {e}");
                return;
            }
        }
    }
}

fn code_of(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::InvalidName { .. } | StoreError::Escape { .. } => ErrorCode::InvalidName,
        StoreError::NoSpace { .. } => ErrorCode::NoSpace,
        StoreError::Io { .. } => ErrorCode::Io,
        StoreError::OutOfOrder { .. } | StoreError::IdentityMismatch { .. } => {
            ErrorCode::InvalidState
        }
        StoreError::BadState { .. } | StoreError::NeedsResync { .. } => ErrorCode::ResyncRequired,
        StoreError::CorruptLog { .. } => ErrorCode::Checksum,
        StoreError::Injected { .. } => ErrorCode::Io,
        StoreError::NotReady { .. } | StoreError::NoSuchPoint { .. } => ErrorCode::NotFound,
        StoreError::Locked { .. } | StoreError::Busy { .. } => ErrorCode::Busy,
    }
}

fn store_err(e: StoreError) -> Msg {
    tracing::warn!("{e}");
    Msg::Error(wire::ErrorMsg {
        code: code_of(&e),
        retryable: e.retryable(),
        message: e.to_string(),
    })
}

fn proto_err(code: ErrorCode, message: impl Into<String>, retryable: bool) -> Msg {
    Msg::Error(wire::ErrorMsg {
        code,
        message: message.into(),
        retryable,
    })
}

/// The last path component of a disk name (the store keeps one component).
fn store_name(disk_name: &str) -> &str {
    disk_name.rsplit('/').next().unwrap_or(disk_name)
}

impl Session {
    /// Disk `disk_id` of `vm` in this sender's namespace.
    fn disk<'a>(&'a self, vm: &'a str, disk_id: &'a [u8; 16]) -> DiskRef<'a> {
        DiskRef {
            site: &self.site,
            vm,
            disk_id,
        }
    }
}

fn disk_of(sess: &Session, id: &[u8; 16]) -> Option<(String, wire::OpenDisk)> {
    sess.disks.lock().get(id).cloned()
}

async fn handle_stream(
    sess: &Session,
    store: &dyn ReplicaStore,
    me: &str,
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
) -> Result<(), ReceiverError> {
    let Some(first) = wire::read_msg(&mut rx).await? else {
        return Ok(());
    };
    if !matches!(first, Msg::Hello(_)) && !sess.hello.load(Ordering::SeqCst) {
        let m = proto_err(ErrorCode::Protocol, "say Hello first", false);
        return wire::write_msg(&mut tx, &m)
            .await
            .map_err(ReceiverError::from);
    }
    let reply = match first {
        Msg::Hello(h) => {
            if h.protocol_version != wire::PROTOCOL_VERSION {
                proto_err(
                    ErrorCode::Version,
                    format!(
                        "protocol version {} is not supported (this receiver speaks {}): run the same vdrep version on both sites",
                        h.protocol_version,
                        wire::PROTOCOL_VERSION
                    ),
                    false,
                )
            } else {
                if h.site_name != sess.site {
                    tracing::info!(site = %sess.site, "sender calls itself {:?}; its certificate says {:?}", h.site_name, sess.site);
                }
                sess.hello.store(true, Ordering::SeqCst);
                Msg::HelloOk(wire::HelloOk {
                    protocol_version: wire::PROTOCOL_VERSION,
                    site_name: me.to_string(),
                    software_version: env!("CARGO_PKG_VERSION").into(),
                    store_free: store.free_bytes(),
                })
            }
        }
        Msg::OpenDisk(o) => open_disk(sess, store, o),
        Msg::InitialBegin(b) => initial(sess, store, b, &mut rx).await,
        Msg::LogBegin(l) => {
            return log(sess, store, l, &mut tx, &mut rx).await;
        }
        Msg::PointCommit(p) => point(sess, store, p),
        Msg::Admin(body) => admin(sess, &body),
        Msg::BlockHashReq(_) | Msg::ResyncEnd(_) => {
            return digests(sess, store, first, &mut tx, &mut rx).await;
        }
        other => proto_err(
            ErrorCode::Protocol,
            format!("unexpected {} to start a stream", other.name()),
            false,
        ),
    };
    wire::write_msg(&mut tx, &reply)
        .await
        .map_err(ReceiverError::from)?;
    let _ = tx.finish();
    Ok(())
}

/// A site-to-site administrative request ([`crate::roles`]), for the
/// requester's own namespace only.
fn admin(sess: &Session, body: &str) -> Msg {
    let req: crate::roles::AdminRequest = match serde_json::from_str(body) {
        Ok(r) => r,
        Err(e) => {
            return proto_err(
                ErrorCode::Protocol,
                format!("unreadable administrative request: {e}"),
                false,
            )
        }
    };
    tracing::info!(site = %sess.site, "administrative request: {req:?}");
    let r =
        tokio::task::block_in_place(|| crate::roles::handle_admin(&sess.roles, &sess.site, req));
    match r
        .map_err(|e| e.to_string())
        .and_then(|a| serde_json::to_string(&a).map_err(|e| e.to_string()))
    {
        Ok(j) => Msg::AdminOk(j),
        Err(e) => {
            tracing::warn!(site = %sess.site, "administrative request failed: {e}");
            proto_err(ErrorCode::InvalidState, e, false)
        }
    }
}

fn open_disk(sess: &Session, store: &dyn ReplicaStore, o: wire::OpenDisk) -> Msg {
    if let Err(e) = wire::safe_component(&o.vm).and_then(|_| wire::safe_name(&o.disk_name)) {
        return proto_err(ErrorCode::InvalidName, e.to_string(), false);
    }
    let r = tokio::task::block_in_place(|| {
        if let Some(live) = store.failed_over(&sess.site, &o.vm).ok().flatten() {
            return Err(StoreError::NotReady {
                ctx: replica::Ctx::new(&sess.site, &o.vm, &o.disk_name),
                what: format!(
                    "this VM failed over to this site (live at {} since cycle {}): replication towards here is over; once the old primary is back run `vdrep reverse {}` there",
                    live.dir.display(),
                    live.cycle,
                    o.vm
                ),
            });
        }
        match store.replica_state(sess.disk(&o.vm, &o.disk_id)) {
            Ok(st) => Ok(Some(st)),
            Err(StoreError::NotReady { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    });
    let st = match r {
        Ok(s) => s,
        Err(e) => return store_err(e),
    };
    sess.disks
        .lock()
        .insert(o.disk_id, (o.vm.clone(), o.clone()));
    let (replica_cycle, replica_size, copy_cycle, resume_offset) = match &st {
        Some(s) if s.applying.is_none() => (
            s.cycle.unwrap_or(0),
            s.size,
            s.initial_cycle.unwrap_or(0),
            s.initial_offset.unwrap_or(0),
        ),
        Some(s) => (0, s.size, 0, 0),
        None => (0, 0, 0, 0),
    };
    let needs_resync = st
        .as_ref()
        .and_then(|s| s.needs_resync.clone())
        .map(|w| wire::ErrorMsg::new(ErrorCode::InvalidState, false, w).message)
        .unwrap_or_default();
    Msg::DiskState(wire::DiskState {
        disk_id: o.disk_id,
        replica_cycle,
        replica_size,
        copy_cycle,
        resume_offset,
        needs_resync,
    })
}

/// A checksum compare (resync or verify) of one disk: answer every
/// `BlockHashReq` with the replica's digests, in order, and record a
/// `ResyncEnd`. The stream ends when the sender finishes it.
async fn digests(
    sess: &Session,
    store: &dyn ReplicaStore,
    first: Msg,
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
) -> Result<(), ReceiverError> {
    let mut next = Some(first);
    let mut buf = Vec::new();
    let mut cache = replica::DigestCache::default();
    loop {
        let m = match next.take() {
            Some(m) => m,
            None => match wire::read_msg(rx).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    let _ = tx.finish();
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        };
        let reply = match m {
            Msg::BlockHashReq(r) => match disk_of(sess, &r.disk_id) {
                None => proto_err(
                    ErrorCode::Protocol,
                    "BlockHashReq for a disk not opened with OpenDisk",
                    false,
                ),
                Some((vm, _)) => {
                    let runs: Vec<(u64, u32)> =
                        r.runs.iter().map(|x| (x.offset, x.blocks)).collect();
                    let res = tokio::task::block_in_place(|| {
                        store.block_hashes(
                            sess.disk(&vm, &r.disk_id),
                            r.replica_cycle,
                            r.block_size,
                            &runs,
                            &mut cache,
                        )
                    });
                    match res {
                        Ok((replica_size, hashes)) => Msg::BlockHashes(wire::BlockHashes {
                            disk_id: r.disk_id,
                            replica_cycle: r.replica_cycle,
                            replica_size,
                            hashes,
                        }),
                        Err(e) => store_err(e),
                    }
                }
            },
            Msg::ResyncEnd(e) => match disk_of(sess, &e.disk_id) {
                None => proto_err(
                    ErrorCode::Protocol,
                    "ResyncEnd for a disk not opened with OpenDisk",
                    false,
                ),
                Some((vm, _)) => {
                    tracing::info!(
                        site = %sess.site, %vm,
                        "resync compare done: {} of {} blocks differ; their log is cycle {}",
                        e.blocks_differ, e.blocks_compared, e.cycle
                    );
                    let res = tokio::task::block_in_place(|| {
                        store.resync_prepared(sess.disk(&vm, &e.disk_id), e.replica_cycle, e.cycle)
                    });
                    match res {
                        Ok(()) => Msg::Ack(wire::Ack {
                            disk_id: e.disk_id,
                            cycle: e.cycle,
                            durable: false,
                            applied: false,
                        }),
                        Err(e) => store_err(e),
                    }
                }
            },
            other => proto_err(
                ErrorCode::Protocol,
                format!("unexpected {} inside a checksum compare", other.name()),
                false,
            ),
        };
        let stop = matches!(reply, Msg::Error(_));
        wire::write_msg_buf(tx, &reply, &mut buf)
            .await
            .map_err(ReceiverError::from)?;
        if stop {
            let _ = tx.finish();
            return Ok(());
        }
    }
}

/// A log that cannot be applied in order (the chains diverged, a log was
/// lost or damaged): the replica can only be healed by a checksum resync.
/// Mark it so, and tell the sender (retryable: it resyncs right away).
fn needs_resync_after(
    sess: &Session,
    store: &dyn ReplicaStore,
    vm: &str,
    id: &[u8; 16],
    e: StoreError,
) -> Msg {
    if !matches!(e, StoreError::OutOfOrder { .. }) {
        return store_err(e);
    }
    let why = format!("a log could not be applied in order: {e}");
    let r = tokio::task::block_in_place(|| store.set_needs_resync(sess.disk(vm, id), Some(&why)));
    if let Err(e2) = r {
        tracing::error!("cannot mark the replica for resync: {e2}");
        return store_err(e);
    }
    tracing::warn!(site = %sess.site, %vm, "{why}; the replica is marked for resync");
    Msg::Error(wire::ErrorMsg::new(
        ErrorCode::ResyncRequired,
        true,
        format!("the replica needs a resync: {why}"),
    ))
}

async fn initial(
    sess: &Session,
    store: &dyn ReplicaStore,
    b: wire::InitialBegin,
    rx: &mut quinn::RecvStream,
) -> Msg {
    let Some((vm, od)) = disk_of(sess, &b.disk_id) else {
        return proto_err(
            ErrorCode::Protocol,
            "InitialBegin for a disk not opened with OpenDisk",
            false,
        );
    };
    let r = tokio::task::block_in_place(|| {
        // A resumed copy continues the store's interrupted copy (its cut is
        // the one the store knows); blocks below the offset that changed
        // since then are part of this stream.
        let info_cycle = if b.start_offset > 0 {
            store
                .replica_state(sess.disk(&vm, &b.disk_id))
                .ok()
                .and_then(|s| s.initial_cycle)
                .unwrap_or(b.cycle)
        } else {
            b.cycle
        };
        store.begin_initial(
            &sess.site,
            &vm,
            &replica::DiskInfo {
                disk_id: b.disk_id,
                name: store_name(&od.disk_name).to_string(),
                size: b.disk_size,
                block_size: od.block_size,
                cycle: info_cycle,
            },
        )
    });
    let mut resume = match r {
        Ok(s) => s.resume_offset,
        Err(e) => return store_err(e),
    };
    if b.start_offset > 0 && resume == b.start_offset {
        // Continue the interrupted copy as part of this newer cut.
        let r = tokio::task::block_in_place(|| {
            store.rebase_initial(sess.disk(&vm, &b.disk_id), b.cycle)
        });
        match r {
            Ok(off) => resume = off,
            Err(e) => return store_err(e),
        }
    }
    if resume != b.start_offset {
        return proto_err(
            ErrorCode::InvalidState,
            format!(
                "the initial copy can resume at {resume}, not {}; it restarts from the beginning",
                b.start_offset
            ),
            true,
        );
    }
    let mut lz = Vec::new();
    loop {
        let m = match wire::read_msg(rx).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return proto_err(
                    ErrorCode::Protocol,
                    "stream ended inside an initial copy",
                    true,
                )
            }
            Err(e) => return proto_err(ErrorCode::Protocol, e.to_string(), true),
        };
        match m {
            Msg::InitialChunk(c) if c.disk_id == b.disk_id => {
                let r = tokio::task::block_in_place(|| {
                    let d = sess.disk(&vm, &c.disk_id);
                    match c.encoding {
                        crate::hrl::Encoding::Zero => store.write_initial(
                            d,
                            c.offset,
                            replica::InitialData::Zeroes(u64::from(c.length)),
                        ),
                        crate::hrl::Encoding::Raw => {
                            store.write_initial(d, c.offset, replica::InitialData::Data(&c.data))
                        }
                        crate::hrl::Encoding::Lz4 => {
                            lz.resize(c.length as usize, 0);
                            match lz4_flex::block::decompress_into(&c.data, &mut lz) {
                                Ok(n) if n == c.length as usize => {}
                                _ => {
                                    return Err(StoreError::BadState {
                                        path: PathBuf::from(format!("{vm}/{}", od.disk_name)),
                                        what: format!(
                                            "the lz4 chunk at offset {} does not decompress to its length",
                                            c.offset
                                        ),
                                    })
                                }
                            }
                            store.write_initial(d, c.offset, replica::InitialData::Data(&lz))
                        }
                    }
                });
                if let Err(e) = r {
                    return store_err(e);
                }
            }
            Msg::InitialEnd(e) if e.disk_id == b.disk_id => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                let r = tokio::task::block_in_place(|| {
                    store.finish_initial(sess.disk(&vm, &e.disk_id), e.cycle, now)
                });
                return match r {
                    Ok(()) => Msg::Ack(wire::Ack {
                        disk_id: e.disk_id,
                        cycle: e.cycle,
                        durable: true,
                        applied: true,
                    }),
                    Err(e) => store_err(e),
                };
            }
            other => {
                return proto_err(
                    ErrorCode::Protocol,
                    format!("unexpected {} inside an initial copy", other.name()),
                    false,
                )
            }
        }
    }
}

/// Feeds `store_log` (blocking) from the network side.
struct ChanReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(v) => {
                    self.cur = v;
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

async fn log(
    sess: &Session,
    store: &dyn ReplicaStore,
    l: wire::LogBegin,
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
) -> Result<(), ReceiverError> {
    let Some((vm, _od)) = disk_of(sess, &l.disk_id) else {
        let m = proto_err(
            ErrorCode::Protocol,
            "LogBegin for a disk not opened with OpenDisk",
            false,
        );
        return wire::write_msg(tx, &m).await.map_err(ReceiverError::from);
    };
    let (ctx, crx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let site_name = sess.site.clone();
    let vm2 = vm.clone();
    let id = l.disk_id;
    // The store reads the log from the channel on a blocking thread.
    let outcome = std::thread::scope(|scope| {
        let h = scope.spawn(move || {
            let d = DiskRef {
                site: &site_name,
                vm: &vm2,
                disk_id: &id,
            };
            store.store_log(
                d,
                &mut ChanReader {
                    rx: crx,
                    cur: Vec::new(),
                    pos: 0,
                },
            )
        });
        let net = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let mut expect = 0u64;
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                let mut ctx = Some(ctx);
                loop {
                    match wire::read_msg(rx).await {
                        Ok(Some(Msg::LogChunk(c)))
                            if c.disk_id == l.disk_id && c.cycle == l.cycle =>
                        {
                            if c.offset_in_log != expect {
                                return Err(ReceiverError::Protocol(format!(
                                    "log chunk at {} where {expect} was expected",
                                    c.offset_in_log
                                )));
                            }
                            expect += c.data.len() as u64;
                            hasher.update(&c.data);
                            if let Some(s) = &ctx {
                                if s.send(c.data).await.is_err() {
                                    // The store has what it needs (a resend).
                                    ctx = None;
                                }
                            }
                        }
                        Ok(Some(Msg::LogEnd(e))) if e.disk_id == l.disk_id => {
                            if e.total_len != expect || e.total_len != l.total_len {
                                return Err(ReceiverError::Protocol(format!(
                                    "log of {} bytes announced, {expect} received",
                                    l.total_len
                                )));
                            }
                            if e.log_checksum != hasher.digest128() {
                                return Err(ReceiverError::Protocol(
                                    "log checksum mismatch: the log was damaged in transit".into(),
                                ));
                            }
                            return Ok(());
                        }
                        Ok(Some(other)) => {
                            return Err(ReceiverError::Protocol(format!(
                                "unexpected {} inside a log",
                                other.name()
                            )))
                        }
                        Ok(None) => {
                            return Err(ReceiverError::Protocol("stream ended inside a log".into()))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        });
        let stored = h.join().unwrap_or_else(|_| {
            Err(StoreError::BadState {
                path: PathBuf::from("<store_log>"),
                what: "the store thread panicked".into(),
            })
        });
        (net, stored)
    });
    let (net, stored) = outcome;
    if let Err(e) = net {
        let m = proto_err(ErrorCode::Protocol, e.to_string(), true);
        return wire::write_msg(tx, &m).await.map_err(ReceiverError::from);
    }
    let applied_now = match stored {
        Err(e) => {
            let m = needs_resync_after(sess, store, &vm, &l.disk_id, e);
            return wire::write_msg(tx, &m).await.map_err(ReceiverError::from);
        }
        Ok(replica::StoreOutcome::AlreadyApplied { .. }) => true,
        Ok(_) => false,
    };
    if !applied_now {
        wire::write_msg(tx, &durable_ack(&l, false))
            .await
            .map_err(ReceiverError::from)?;
        let r = tokio::task::block_in_place(|| store.apply(sess.disk(&vm, &l.disk_id), l.cycle));
        if let Err(e) = r {
            let m = needs_resync_after(sess, store, &vm, &l.disk_id, e);
            return wire::write_msg(tx, &m).await.map_err(ReceiverError::from);
        }
    }
    wire::write_msg(tx, &durable_ack(&l, true))
        .await
        .map_err(ReceiverError::from)?;
    let _ = tx.finish();
    Ok(())
}

/// The log is durable here; `applied` once it is also in the replica.
fn durable_ack(l: &wire::LogBegin, applied: bool) -> Msg {
    Msg::Ack(wire::Ack {
        disk_id: l.disk_id,
        cycle: l.cycle,
        durable: true,
        applied,
    })
}

fn point(sess: &Session, store: &dyn ReplicaStore, p: wire::PointCommit) -> Msg {
    let ids: Vec<[u8; 16]> = p.disks.iter().map(|d| d.disk_id).collect();
    let r = tokio::task::block_in_place(|| {
        store.commit_point(
            &sess.site,
            &p.vm,
            p.cycle,
            &ids,
            if p.app_consistent {
                replica::Consistency::App
            } else {
                replica::Consistency::Crash
            },
        )
    });
    match r {
        Ok(Some(_)) => Msg::PointAck(wire::PointAck {
            vm: p.vm,
            cycle: p.cycle,
        }),
        Ok(None) => proto_err(
            ErrorCode::InvalidState,
            format!("not every disk of {} reached cycle {}", p.vm, p.cycle),
            true,
        ),
        Err(e) => store_err(e),
    }
}
