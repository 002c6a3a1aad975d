//! Site identity, trust and the QUIC transport between sender and receiver.
//!
//! Owns everything below the wire protocol ([`crate::wire`]):
//! - [`keys`]: site identities (`vdrep keys init`), certificate fingerprints.
//! - [`trust`]: pinned-certificate trust and the rustls verifiers.
//! - this module: QUIC endpoints over mutual TLS 1.3 ([`server`], [`client`],
//!   [`connect`], [`accept`]; one client endpoint shared by many
//!   connections: [`client_endpoint`], [`client_config`], [`connect_with`]),
//!   the peer's identity on a connection ([`peer_identity`]) and readable explanations of refusals
//!   ([`explain_connection_error`]), and how a driver ends a send stream
//!   ([`StreamEnd`]).
//! - [`rate`]: the token bucket behind `--max-rate`.
//! - [`window`]: the receiving end sizes a connection's flow-control
//!   window to the path's bandwidth-delay product.
//! - the `vdrep keys` commands live in `crate::cli::keys` (the CLI imports this module, never the reverse).
//!
//! # Security properties
//! TLS 1.3 only (ring provider), ALPN [`mux::ALPN_MUX`] (every session to
//! a receiver on one connection, preferred) or [`ALPN`] required on both
//! sides, client authentication mandatory, peers accepted only by pinned certificate (see
//! [`trust`]). Session resumption and tickets are disabled, so every
//! connection runs a full handshake against the *current* trust store (a
//! removed peer cannot come back with an old ticket), and there is no 0-RTT.
//! There is no plaintext mode.
//!
//! # When a peer is refused
//! TLS 1.3 lets the client finish its side of the handshake before the server
//! has checked the client's certificate, so on the client [`connect`] may
//! succeed and the refusal arrives as the connection being closed, surfacing
//! on the first stream operation (normally reading the answer to `Hello`).
//! Turn the `quinn::ConnectionError` found there into a sentence with
//! [`explain_connection_error`] (or [`crate::wire::WireError::explain`];
//! [`crate::wire::client_hello`] is the usual place it shows). On the server, [`accept`] returns
//! [`TransportError::Refused`], whose text is
//! `refused connection from ADDR: certificate FP (CN=NAME) is not trusted; add it with --trust`
//! (and logs it at WARN).
//!
//! # Throughput tuning
//! quinn's defaults are sized for the web. [`Tuning::default`] sets a
//! 4 MiB stream window, starts the connection window at 2 MiB for the
//! receiving end to size to the path ([`window`]; the receiver runs
//! [`window::run`] per connection), a 64 MiB send window, and asks the kernel for 32 MiB UDP socket buffers (best effort:
//! Linux caps them at `net.core.rmem_max`/`wmem_max` unless the process
//! may force them, as root may; smaller grants are logged at INFO with the
//! sysctls to raise). Keep-alive every 1 s and a
//! 30 s idle timeout make a dead peer visible as `ConnectionError::TimedOut`;
//! a receiver that restarted answers the next keep-alive with a stateless
//! reset (its reset key is derived from its identity, see
//! [`Identity::stateless_reset_key`]), so an idle sender learns of the
//! restart within a second and reconnects (measured: the sender noticed a
//! receiver restart 4–6 s late with a 5 s keep-alive and a random reset key).
//! All of it is adjustable through [`Tuning`] ([`server_tuned`],
//! [`client_tuned`]). Measured on this project's 2-core shared machine
//! (client and server in one process, one stream, 1 MiB `InitialChunk`s,
//! incompressible data): 160–235 MiB/s in a release build, 85–190 MiB/s in
//! the test profile; the CPU (AEAD + quinn per-packet work at a 1472-byte
//! path MTU) is the limit, not the windows.
//!
//! The client endpoint binds dual-stack `[::]:0` where possible, so one
//! endpoint reaches IPv4 and IPv6 receivers.

pub mod congestion;
pub mod keys;
pub mod mux;
pub mod rate;
pub mod trust;
pub mod window;

pub use keys::{init, Fingerprint, Identity};
pub use rate::RateLimiter;
pub use trust::{SharedTrust, TrustStore, TrustedPeer};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol identifier both sides require.
pub const ALPN: &[u8] = b"vdrep/1";

/// The crypto provider used everywhere: rustls's `ring` provider.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Errors setting up or using the transport. Each says what failed and what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An identity could not be generated (bad site name, no randomness).
    #[error("cannot create the identity: {0}")]
    KeyGen(String),
    /// A key or certificate file (or key directory) is missing or unusable.
    #[error("{}: {what}", path.display())]
    Identity { path: PathBuf, what: String },
    /// The TLS or QUIC configuration could not be built (a bug or an
    /// unusable key type).
    #[error("cannot configure TLS/QUIC: {0}")]
    Config(String),
    /// The UDP socket could not be set up.
    #[error("cannot use UDP address {addr}: {source}; check that the address is local and the port is free")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed before any packet was sent (bad address, endpoint
    /// stopping).
    #[error("cannot connect to {addr}: {what}")]
    Connect { addr: SocketAddr, what: String },
    /// The handshake or the connection failed; the text explains which side
    /// refused whom, or that the peer is unreachable. Decide on `source`
    /// (e.g. with [`handshake_failure`]), never on the text.
    #[error("{explained}")]
    Connection {
        #[source]
        source: quinn::ConnectionError,
        explained: String,
    },
    /// The server refused an incoming connection (the peer's certificate is
    /// not trusted, it sent none, or the handshake failed).
    #[error("refused connection from {addr}: {reason}")]
    Refused { addr: SocketAddr, reason: String },
}

/// Flow-control window of one stream: 4 MiB, a ceiling; the connection's
/// window, which the receiving end sizes to the path ([`window`]), is the
/// limit in practice. 4 MiB carries 1.5 x the BDP of a 1 Gbit/s, 20 ms
/// link (2.5 MB) and 2 x that of 100 Mbit/s at 150 ms (1.9 MB); 2 MiB
/// (before) capped one stream at 840 Mbit/s at 20 ms, below the RTT the
/// queue adds. Not much larger: quinn-proto closes a connection with
/// `INTERNAL_ERROR "too many gaps in stream buffer"` when a stream's
/// unread data is split into more than 1024 pieces after compaction. The
/// quinn-proto in Cargo.lock (0.11.19) merges contiguous data there (quinn
/// PR #2814; its test `ordered_lossless_stream_is_not_rejected`), so only
/// real gaps count; a sender overshooting a drop-tail queue at BBR's
/// startup gain (2.89) gets one packet in 2.89 through, one gap each: 1024
/// gaps span 4.1 MB of 1400-byte packets. quinn-proto 0.11.17 failed at
/// ~2.8 MB of unread contiguous data (quinn issue #2809; measured here with
/// 32 MiB windows: every connection on a 100 Mbit/s link died within a
/// second, `kernel-notes/wan.md`).
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// The stream window before the windows were sized to the path (with
/// `VDREP_WINDOW_TUNE=0`).
pub const FIXED_STREAM_RECEIVE_WINDOW: u32 = 2 << 20;

/// The connection window before the windows were sized to the path (with
/// `VDREP_WINDOW_TUNE=0`).
pub const FIXED_RECEIVE_WINDOW: u32 = 64 << 20;

/// Transport parameters and socket sizes.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Flow-control window of one stream (bytes).
    pub stream_receive_window: u32,
    /// Flow-control window of a whole connection (bytes); where
    /// `window_tune` is set, the one it starts with.
    pub receive_window: u32,
    /// Bytes the sender may have unacknowledged in flight on a connection.
    pub send_window: u64,
    /// Requested `SO_RCVBUF` / `SO_SNDBUF` (bytes, best effort; past
    /// `net.core.rmem_max`/`wmem_max` with `SO_RCVBUFFORCE` where the
    /// process may). The receiver's one socket takes every sender's
    /// datagrams: at 50 MB/s a 4 MiB buffer overflowed whenever its
    /// endpoint task waited ~80 ms for a thread (256 VMs, issue 12:
    /// ~800 drops/s, connections timed out).
    pub socket_buffer: usize,
    /// PING interval keeping the connection (and NAT bindings) alive.
    pub keep_alive: Duration,
    /// A connection with no packet from the peer for this long is dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional / unidirectional streams the peer may open.
    pub max_streams: u32,
    /// Largest UDP payload to use and accept (1200..=65527); path MTU
    /// discovery searches up to it. The default, 1472, fits Ethernet and is
    /// reached on loopback. Raising it is experimental: on loopback with
    /// quinn 0.11 a bound of 8972 or 65527 ended at 1200 (black-hole
    /// detection after early losses) and was slower. Receive buffers grow
    /// with it.
    pub max_udp_payload: u16,
    /// Congestion controller ([`congestion::Congestion`]).
    pub congestion: congestion::Congestion,
    /// Cap on the congestion window near a multiple of the path's
    /// bandwidth-delay product ([`congestion::WindowCap`]); `None`: the
    /// controller's own window.
    pub window_cap: Option<congestion::CapConfig>,
    /// How the receiving end of a replication connection sizes the
    /// connection's window to the path ([`window::run`]); `None`: the
    /// fixed `receive_window`.
    pub window_tune: Option<window::WindowConfig>,
}

impl Default for Tuning {
    fn default() -> Self {
        let tune = window::enabled_by_env();
        let stream_window = std::env::var("VDREP_STREAM_WINDOW")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&w| w >= 64 << 10);
        Tuning {
            stream_receive_window: stream_window.unwrap_or(if tune {
                STREAM_RECEIVE_WINDOW
            } else {
                FIXED_STREAM_RECEIVE_WINDOW
            }),
            receive_window: if tune {
                window::FLOOR as u32
            } else {
                FIXED_RECEIVE_WINDOW
            },
            send_window: 64 << 20,
            socket_buffer: 32 << 20,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_streams: 64,
            max_udp_payload: 1472,
            congestion: congestion::Congestion::from_env_or_default(),
            window_cap: congestion::CapConfig::from_env_or_default(),
            window_tune: tune.then(|| window::WindowConfig {
                gain: window::gain_from_env(),
                per_paused: u64::from(stream_window.unwrap_or(STREAM_RECEIVE_WINDOW)),
                ..window::WindowConfig::default()
            }),
        }
    }
}

impl Tuning {
    fn transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        self.transport_config_shared(None)
    }

    fn transport_config_shared(
        &self,
        shares: Option<congestion::Shares>,
    ) -> Result<quinn::TransportConfig, TransportError> {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window));
        t.receive_window(quinn::VarInt::from_u32(self.receive_window));
        t.send_window(self.send_window);
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .map_err(|e| TransportError::Config(format!("idle timeout: {e}")))?,
        ));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_streams));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(self.max_streams));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        t.mtu_discovery_config(Some(mtu));
        self.congestion
            .apply_shared(&mut t, self.window_cap, shares);
        Ok(t)
    }
}

fn tls_err(e: rustls::Error) -> TransportError {
    TransportError::Config(e.to_string())
}

fn server_crypto(
    id: &Identity,
    trust: SharedTrust,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TransportError> {
    let verifier = Arc::new(trust::PinnedClientVerifier::shared(trust));
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = mux::alpns();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TransportError::Config(e.to_string()))
}

fn client_crypto(
    id: &Identity,
    trust: &TrustStore,
    alpns: Vec<Vec<u8>>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TransportError> {
    let verifier = Arc::new(trust::PinnedServerVerifier::new(trust.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = alpns;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_early_data = false;
    quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TransportError::Config(e.to_string()))
}

/// Bind a UDP socket with large buffers (best effort).
fn bind_socket(addr: SocketAddr, tuning: &Tuning) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock_err = |source| TransportError::Socket { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers on [::] too (best effort).
        let _ = sock.set_only_v6(false);
    }
    let _ = sock.set_recv_buffer_size(tuning.socket_buffer);
    let _ = sock.set_send_buffer_size(tuning.socket_buffer);
    // Past the sysctl caps where the process may (root: CAP_NET_ADMIN).
    // Linux reports twice the usable size.
    if sock.recv_buffer_size().unwrap_or(0) < tuning.socket_buffer {
        use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
        let _ = setsockopt(&sock, RcvBufForce, &tuning.socket_buffer);
    }
    if sock.send_buffer_size().unwrap_or(0) < tuning.socket_buffer {
        use nix::sys::socket::{setsockopt, sockopt::SndBufForce};
        let _ = setsockopt(&sock, SndBufForce, &tuning.socket_buffer);
    }
    let rcv = sock.recv_buffer_size().unwrap_or(0);
    let snd = sock.send_buffer_size().unwrap_or(0);
    tracing::debug!(%addr, rcvbuf = rcv, sndbuf = snd, "UDP socket buffers");
    // Linux reports twice the usable size; less than asked means the
    // sysctl caps were hit.
    if rcv < tuning.socket_buffer || snd < tuning.socket_buffer {
        tracing::info!(
            "UDP socket buffers on {addr} are {rcv}/{snd} bytes (asked {}): raise \
             net.core.rmem_max and net.core.wmem_max for full throughput on fast or long links",
            tuning.socket_buffer
        );
    }
    sock.bind(&addr.into()).map_err(sock_err)?;
    Ok(sock.into())
}

/// `stable`: a server's identity, whose derived keys sign stateless resets
/// and validate connection IDs the same way after a restart (see
/// [`Identity::stateless_reset_key`]); `None`: random keys.
fn endpoint_on(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tuning: &Tuning,
    stable: Option<&Identity>,
) -> Result<quinn::Endpoint, TransportError> {
    let sock = bind_socket(addr, tuning)?;
    let mut config = match stable {
        Some(id) => {
            let mut c = quinn::EndpointConfig::new(Arc::new(id.stateless_reset_key()));
            let cid_key = id.connection_id_key();
            c.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            c
        }
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(tuning.max_udp_payload.clamp(1200, 65_527))
        .map_err(|e| TransportError::Config(format!("max UDP payload: {e}")))?;
    quinn::Endpoint::new(config, server, sock, Arc::new(quinn::TokioRuntime))
        .map_err(|source| TransportError::Socket { addr, source })
}

/// A server's tuning: where it offers [`mux::ALPN_MUX`], a client may
/// open [`mux::MAX_STREAMS`] streams at once (every VM's of a site on one
/// connection), not `max_streams`; the connection window bounds their data
/// together.
fn server_tuning(tuning: &Tuning) -> Tuning {
    let mut t = tuning.clone();
    if mux::offered() {
        t.max_streams = t.max_streams.max(mux::MAX_STREAMS);
    }
    t
}

/// A server endpoint on `listen` presenting `id` and accepting clients whose
/// certificate is in `trust`. Must be called inside a tokio runtime.
pub fn server(
    listen: SocketAddr,
    id: &Identity,
    trust: &TrustStore,
) -> Result<quinn::Endpoint, TransportError> {
    server_tuned(listen, id, trust, &Tuning::default())
}

/// [`server`] with explicit tuning.
pub fn server_tuned(
    listen: SocketAddr,
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    server_shared(listen, id, &SharedTrust::new(trust.clone()), tuning)
}

/// [`server_tuned`] accepting the clients in `trust` at each handshake:
/// [`SharedTrust::replace`] changes whom it accepts while it runs.
pub fn server_shared(
    listen: SocketAddr,
    id: &Identity,
    trust: &SharedTrust,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = server_crypto(id, trust.clone())?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(server_tuning(tuning).transport_config()?));
    endpoint_on(listen, Some(sc), tuning, Some(id))
}

/// Replace a running server endpoint's identity and trust store (e.g. after
/// `--trust` files changed): new connections use them, established ones are
/// not touched.
pub fn reload_server(
    endpoint: &quinn::Endpoint,
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
) -> Result<(), TransportError> {
    let crypto = server_crypto(id, SharedTrust::new(trust.clone()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(server_tuning(tuning).transport_config()?));
    endpoint.set_server_config(Some(sc));
    Ok(())
}

/// A client endpoint (ephemeral port, dual-stack `[::]` where IPv6 is
/// available, else `0.0.0.0`) presenting `id` and accepting servers whose certificate is in `trust`.
/// Must be called inside a tokio runtime.
pub fn client(id: &Identity, trust: &TrustStore) -> Result<quinn::Endpoint, TransportError> {
    client_tuned(id, trust, &Tuning::default(), None)
}

/// [`client`] with explicit tuning and, optionally, a local address to bind.
pub fn client_tuned(
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
    bind: Option<SocketAddr>,
) -> Result<quinn::Endpoint, TransportError> {
    let cc = client_config(id, trust, tuning)?;
    let mut ep = client_endpoint(tuning, bind)?;
    ep.set_default_client_config(cc);
    Ok(ep)
}

/// A client endpoint with no default configuration: one UDP socket and one
/// endpoint driver that many connections share, each with its own
/// [`client_config`] ([`connect_with`]). quinn multiplexes the connections
/// on the socket by connection ID; a connection that fails (a stateless
/// reset, a timeout) ends alone. Binds `bind`, else dual-stack `[::]:0`
/// (or `0.0.0.0:0` where IPv6 is disabled). Must be called inside a tokio
/// runtime.
pub fn client_endpoint(
    tuning: &Tuning,
    bind: Option<SocketAddr>,
) -> Result<quinn::Endpoint, TransportError> {
    match bind {
        Some(addr) => endpoint_on(addr, None, tuning, None),
        // Dual-stack [::]:0 reaches IPv4 and IPv6 receivers; fall back to
        // 0.0.0.0:0 where IPv6 is disabled.
        None => endpoint_on(SocketAddr::from(([0u16; 8], 0)), None, tuning, None)
            .or_else(|_| endpoint_on(SocketAddr::from(([0, 0, 0, 0], 0)), None, tuning, None)),
    }
}

/// The configuration of one client connection: presenting `id`, accepting
/// a server whose certificate is in `trust`, with `tuning`'s transport
/// parameters. It offers [`ALPN`] only: one session per connection.
pub fn client_config(
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TransportError> {
    client_config_alpn(id, trust, tuning, vec![ALPN.to_vec()], None)
}

/// [`client_config`] offering [`mux::ALPN_MUX`] first (unless
/// `VDREP_MUX=0`), for a client that speaks it: check
/// [`mux::negotiated`] on the connection. Count its sessions in the
/// [`congestion::Shares`] returned: its window cap's floor is per session.
pub fn mux_client_config(
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
) -> Result<(quinn::ClientConfig, congestion::Shares), TransportError> {
    let shares = congestion::Shares::default();
    let cc = client_config_alpn(id, trust, tuning, mux::alpns(), Some(shares.clone()))?;
    Ok((cc, shares))
}

fn client_config_alpn(
    id: &Identity,
    trust: &TrustStore,
    tuning: &Tuning,
    alpns: Vec<Vec<u8>>,
    shares: Option<congestion::Shares>,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = client_crypto(id, trust, alpns)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(Arc::new(tuning.transport_config_shared(shares)?));
    Ok(cc)
}

/// The endpoint constructors under one name, for callers that prefer
/// `transport::Endpoint::server(..)`: they return plain `quinn::Endpoint`s.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint;

impl Endpoint {
    /// See [`server`].
    pub fn server(
        listen: SocketAddr,
        id: &Identity,
        trust: &TrustStore,
    ) -> Result<quinn::Endpoint, TransportError> {
        server(listen, id, trust)
    }

    /// See [`client`].
    pub fn client(id: &Identity, trust: &TrustStore) -> Result<quinn::Endpoint, TransportError> {
        client(id, trust)
    }

    /// See [`connect`].
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connection, TransportError> {
        connect(endpoint, addr, server_name).await
    }
}

/// Connect to a server. `server_name` is sent as SNI only: the server is
/// authenticated by its pinned certificate, not by name. See the module doc
/// on refusals that arrive after this returns.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    connect_on(endpoint, None, addr, server_name).await
}

/// [`connect`] with this connection's own configuration ([`client_config`])
/// instead of the endpoint's default: many connections, each with its own
/// trust, share one endpoint ([`client_endpoint`]).
pub async fn connect_with(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    connect_on(endpoint, Some(config), addr, server_name).await
}

async fn connect_on(
    endpoint: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    let sni = if server_name.is_empty() {
        "vdrep"
    } else {
        server_name
    };
    let connecting = match config {
        Some(c) => endpoint.connect_with(c, addr, sni),
        None => endpoint.connect(addr, sni),
    }
    .map_err(|e| TransportError::Connect {
        addr,
        what: e.to_string(),
    })?;
    connecting.await.map_err(|e| TransportError::Connection {
        explained: explain_connection_error(&e, addr),
        source: e,
    })
}

/// How a connection driver ends a send stream its session is done with
/// (the sender's and the receiver's drivers alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Finish it: the peer reads everything written, then the end.
    Finish,
    /// Reset it: the peer sees the stream fail (code 0).
    Reset,
}

impl StreamEnd {
    /// End `tx` this way; a stream the peer already stopped is left as is.
    pub fn apply(self, tx: &mut quinn::SendStream) {
        match self {
            StreamEnd::Finish => {
                let _ = tx.finish();
            }
            StreamEnd::Reset => {
                let _ = tx.reset(0u32.into());
            }
        }
    }
}

/// Complete the handshake of an incoming connection and return it with the
/// client's identity. A refusal is logged at WARN and returned as
/// [`TransportError::Refused`].
pub async fn accept(
    incoming: quinn::Incoming,
) -> Result<(quinn::Connection, PeerIdentity), TransportError> {
    let addr = incoming.remote_address();
    let refused = |reason: String| {
        tracing::warn!("refused connection from {addr}: {reason}");
        TransportError::Refused { addr, reason }
    };
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => return Err(refused(server_side_reason(&e))),
    };
    match peer_identity(&conn) {
        Some(p) => Ok((conn, p)),
        None => {
            conn.close(quinn::VarInt::from_u32(1), b"no client certificate");
            Err(refused("the peer presented no certificate".into()))
        }
    }
}

/// Who is at the other end of an authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SHA-256 of the peer's certificate: the stable key to map a sender to
    /// its namespace.
    pub fingerprint: Fingerprint,
    /// The certificate's subject CN (the peer's site name), escaped.
    pub cn: String,
}

/// The identity of the peer of a connection (its end-entity certificate
/// was pinned by our trust store during the handshake).
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = certs.first()?;
    Some(PeerIdentity {
        fingerprint: Fingerprint::of_der(cert),
        cn: keys::subject_cn(cert).unwrap_or_default(),
    })
}

const CRYPTO_ERROR_BASE: u64 = 0x100;

fn tls_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let c = u64::from(code);
    if (CRYPTO_ERROR_BASE..CRYPTO_ERROR_BASE + 0x100).contains(&c) {
        Some((c - CRYPTO_ERROR_BASE) as u8)
    } else {
        None
    }
}

/// Which side ended a failed TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// This side (its verifier or its TLS stack).
    Us,
    /// The peer, with a TLS alert.
    Peer,
}

/// Why a TLS handshake failed, decided by the TLS alert it ended with
/// (never by the text that comes with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A certificate was refused: not pinned, its key not proven
    /// ([`trust`]'s verifiers fail with `handshake_failure`, which rustls
    /// sends for any verifier error), or none presented
    /// (`certificate_required`), or any certificate alert. Retrying cannot
    /// help until an operator changes the trust or the keys.
    Trust,
    /// The peer does not speak vdrep's ALPN (`no_application_protocol`).
    Protocol,
    /// Another TLS alert.
    Other,
}

/// The TLS failure behind a connection error, if it is one.
pub fn handshake_failure(e: &quinn::ConnectionError) -> Option<(RefusedBy, HandshakeFailure)> {
    use rustls::AlertDescription as A;
    let (by, alert) = match e {
        quinn::ConnectionError::TransportError(te) => (RefusedBy::Us, tls_alert(te.code)?),
        quinn::ConnectionError::ConnectionClosed(cc) => {
            (RefusedBy::Peer, tls_alert(cc.error_code)?)
        }
        _ => return None,
    };
    let kind = match A::from(alert) {
        A::HandshakeFailure
        | A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnknownCA
        | A::AccessDenied
        | A::CertificateRequired => HandshakeFailure::Trust,
        A::NoApplicationProtocol => HandshakeFailure::Protocol,
        _ => HandshakeFailure::Other,
    };
    Some((by, kind))
}

fn alert_name(a: u8) -> String {
    format!("{:?}", rustls::AlertDescription::from(a))
}

/// The rustls text of a refusal without rustls's generic prefixes.
fn clean_reason(r: &str) -> &str {
    let r = r.strip_prefix("other error: ").unwrap_or(r);
    r.strip_prefix("invalid peer certificate: ").unwrap_or(r)
}

/// The text that came with a TLS failure (the QUIC close reason).
fn tls_reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(te) => clean_reason(&te.reason).to_string(),
        quinn::ConnectionError::ConnectionClosed(cc) => {
            clean_reason(&String::from_utf8_lossy(&cc.reason)).to_string()
        }
        other => other.to_string(),
    }
}

fn server_side_reason(e: &quinn::ConnectionError) -> String {
    let no_cert = |e: &quinn::ConnectionError| {
        matches!(e, quinn::ConnectionError::TransportError(te)
            if tls_alert(te.code) == Some(u8::from(rustls::AlertDescription::CertificateRequired)))
    };
    match handshake_failure(e) {
        Some((RefusedBy::Us, _)) if no_cert(e) => {
            "the peer presented no certificate (client authentication is mandatory)".into()
        }
        Some((RefusedBy::Us, HandshakeFailure::Trust)) => {
            format!("{}; add it with --trust", tls_reason(e))
        }
        Some((RefusedBy::Us, _)) => format!("TLS handshake failed: {}", tls_reason(e)),
        Some((RefusedBy::Peer, HandshakeFailure::Trust)) => format!(
            "the peer refused our certificate ({}); give its operator our \
             .crt file so they can add it with --trust",
            tls_reason(e)
        ),
        Some((RefusedBy::Peer, _)) => {
            format!("the peer aborted the TLS handshake: {}", tls_reason(e))
        }
        None => format!("handshake failed: {e}"),
    }
}

/// One sentence saying why a connection to/from `peer` failed or ended,
/// naming which side refused whom and what to do.
pub fn explain_connection_error(e: &quinn::ConnectionError, peer: SocketAddr) -> String {
    use quinn::ConnectionError as E;
    match (handshake_failure(e), e) {
        // We refused the peer (our verifier failed) or our TLS stack failed.
        (Some((RefusedBy::Us, HandshakeFailure::Trust)), _) => format!(
            "refused {peer}: its {}; \
             if this is the right peer, add its certificate with --trust",
            tls_reason(e)
        ),
        (Some((RefusedBy::Us, _)), _) => {
            format!("TLS handshake with {peer} failed: {}", tls_reason(e))
        }
        // The peer closed the connection with a TLS alert: it refused us.
        (Some((RefusedBy::Peer, failure)), E::ConnectionClosed(cc)) => {
            let alert = tls_alert(cc.error_code).map(alert_name).unwrap_or_default();
            let reason = tls_reason(e);
            match failure {
                HandshakeFailure::Trust => format!(
                    "{peer} refused our certificate ({reason}); give its operator our \
                     .crt file so they can add it with --trust"
                ),
                HandshakeFailure::Protocol => format!(
                    "{peer} does not speak the vdrep protocol (TLS alert {alert}: {reason})"
                ),
                HandshakeFailure::Other => {
                    format!("{peer} refused the TLS handshake (alert {alert}): {reason}")
                }
            }
        }
        (_, E::TimedOut) => format!(
            "no answer from {peer} (timed out): the peer is down, or UDP between the sites is blocked"
        ),
        (_, E::ConnectionClosed(cc)) => format!(
            "{peer} closed the connection: {} (code {})",
            String::from_utf8_lossy(&cc.reason),
            cc.error_code
        ),
        (_, E::ApplicationClosed(ac)) => format!(
            "{peer} closed the connection: {} (code {})",
            String::from_utf8_lossy(&ac.reason),
            ac.error_code
        ),
        (_, E::Reset) => format!("{peer} reset the connection (it restarted or forgot it)"),
        (_, E::LocallyClosed) => format!("the connection to {peer} was closed locally"),
        (_, other) => format!("connection with {peer} failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription as A;

    fn by_peer(alert: A, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(u8::from(alert)),
            frame_type: None,
            reason: reason.as_bytes().to_vec().into(),
        })
    }

    #[test]
    fn handshake_failures_are_classified_by_alert_not_by_text() {
        // (Refusals by this side, `ConnectionError::TransportError`, cannot
        // be built outside quinn-proto; tests/net_quic.rs covers them.)
        use HandshakeFailure::*;
        // What the pinned verifiers send, whatever the text says.
        assert_eq!(
            handshake_failure(&by_peer(A::HandshakeFailure, "anything")),
            Some((RefusedBy::Peer, Trust))
        );
        assert_eq!(
            handshake_failure(&by_peer(A::CertificateRequired, "")),
            Some((RefusedBy::Peer, Trust))
        );
        // A text about certificates does not make an ALPN refusal one.
        assert_eq!(
            handshake_failure(&by_peer(
                A::NoApplicationProtocol,
                "certificate is not trusted"
            )),
            Some((RefusedBy::Peer, Protocol))
        );
        assert_eq!(
            handshake_failure(&by_peer(A::InternalError, "")),
            Some((RefusedBy::Peer, Other))
        );
        assert_eq!(handshake_failure(&quinn::ConnectionError::TimedOut), None);
        assert_eq!(handshake_failure(&quinn::ConnectionError::Reset), None);
    }

    #[test]
    fn explanations_follow_the_alert() {
        let peer: SocketAddr = "192.0.2.1:7700".parse().unwrap();
        let e = explain_connection_error(&by_peer(A::HandshakeFailure, "other error: x"), peer);
        assert!(e.contains("refused our certificate (x)"), "{e}");
        let e = explain_connection_error(&by_peer(A::NoApplicationProtocol, ""), peer);
        assert!(e.contains("does not speak the vdrep protocol"), "{e}");
        let e = server_side_reason(&by_peer(A::BadCertificate, "other error: x"));
        assert!(e.contains("the peer refused our certificate (x)"), "{e}");
        let e = server_side_reason(&by_peer(A::InternalError, "y"));
        assert_eq!(e, "the peer aborted the TLS handshake: y");
    }
}
