//! Real QUIC over 127.0.0.1: mutual-TLS trust, refusals on both sides, every
//! wire message through real streams, a 64 MiB transfer, oversized frames.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use vdrep::transport::{self, Identity, TransportError, TrustStore};

fn ids() -> (Identity, Identity) {
    (
        Identity::generate("site-a").unwrap(),
        Identity::generate("site-b").unwrap(),
    )
}

fn trusting(ids: &[&Identity]) -> TrustStore {
    let mut t = TrustStore::new();
    for id in ids {
        t.add(id.cert.clone());
    }
    t
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Server that accepts one connection, echoes one bidirectional stream and
/// reports the result of `accept`.
fn spawn_echo_server(
    ep: quinn::Endpoint,
) -> tokio::task::JoinHandle<Result<transport::PeerIdentity, TransportError>> {
    tokio::spawn(async move {
        let incoming = ep.accept().await.expect("endpoint closed");
        let (conn, peer) = transport::accept(incoming).await?;
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        // Let the client read before the connection goes away.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(peer)
    })
}

#[tokio::test]
async fn mutual_trust_handshake_and_peer_identity() {
    let (a, b) = ids();
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);

    let client = transport::client(&a, &trusting(&[&b])).unwrap();
    let conn = transport::connect(&client, addr, "site-b").await.unwrap();
    let srv = transport::peer_identity(&conn).unwrap();
    assert_eq!(srv.fingerprint, b.fingerprint);
    assert_eq!(srv.cn, "site-b");
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.finish().unwrap();
    assert_eq!(r.read_to_end(100).await.unwrap(), b"ping");
    conn.close(0u32.into(), b"done");

    let peer = task.await.unwrap().unwrap();
    assert_eq!(peer.fingerprint, a.fingerprint);
    assert_eq!(peer.cn, "site-a");
}

#[tokio::test]
async fn untrusted_client_is_refused_and_both_sides_know_why() {
    let (a, b) = ids();
    let stranger = Identity::generate("stranger").unwrap();
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);

    let client = transport::client(&stranger, &trusting(&[&b])).unwrap();
    // TLS 1.3: the client may finish its handshake before the server has
    // judged its certificate; the refusal then closes the connection.
    let err = match transport::connect(&client, addr, "site-b").await {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let _ = s.write_all(b"ping").await;
            let _ = s.finish();
            assert!(r.read_to_end(100).await.is_err());
            transport::explain_connection_error(&conn.closed().await, addr)
        }
    };
    println!("client sees: {err}");
    assert!(err.contains("refused our certificate"), "{err}");
    assert!(err.contains(&stranger.fingerprint.to_string()), "{err}");

    let srv = task.await.unwrap().unwrap_err().to_string();
    println!("server says: {srv}");
    assert!(
        srv.starts_with("refused connection from 127.0.0.1:"),
        "{srv}"
    );
    assert!(
        srv.contains(&format!(
            "certificate {} (CN=stranger) is not trusted; add it with --trust",
            stranger.fingerprint
        )),
        "{srv}"
    );
}

#[tokio::test]
async fn untrusted_server_is_refused_by_the_client() {
    let (a, b) = ids();
    let impostor = Identity::generate("site-b").unwrap(); // same name, other key
    let server = transport::server(localhost(), &impostor, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);

    let client = transport::client(&a, &trusting(&[&b])).unwrap();
    let err = transport::connect(&client, addr, "site-b")
        .await
        .unwrap_err()
        .to_string();
    println!("client sees: {err}");
    assert!(err.contains("is not trusted"), "{err}");
    assert!(err.contains(&impostor.fingerprint.to_string()), "{err}");
    assert!(err.contains("--trust"), "{err}");

    let srv = task.await.unwrap().unwrap_err().to_string();
    println!("server says: {srv}");
    assert!(srv.starts_with("refused connection from"), "{srv}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let (a, b) = ids();
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);

    let verifier = Arc::new(transport::trust::PinnedServerVerifier::new(trusting(&[&b])));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(transport::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![transport::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut client = quinn::Endpoint::client(localhost()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));

    let err = match client.connect(addr, "site-b").unwrap().await {
        Err(e) => transport::explain_connection_error(&e, addr),
        Ok(conn) => {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let _ = s.write_all(b"ping").await;
            let _ = s.finish();
            assert!(r.read_to_end(100).await.is_err());
            transport::explain_connection_error(&conn.closed().await, addr)
        }
    };
    println!("client sees: {err}");
    assert!(err.contains("refused"), "{err}");
    let srv = task.await.unwrap().unwrap_err().to_string();
    println!("server says: {srv}");
    assert!(srv.contains("presented no certificate"), "{srv}");
}

#[test]
fn keys_init_writes_private_key_0600_and_refuses_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let (crt, key) = transport::init("site-a", &out, false).unwrap();
    assert_eq!(crt, out.join("site-a.crt"));
    assert_eq!(key, out.join("site-a.key"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    let pem = std::fs::read_to_string(&crt).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));

    let id = Identity::load(&crt, &key).unwrap();
    assert_eq!(id.name, "site-a");
    let id2 = Identity::from_dir(&out, None).unwrap();
    assert_eq!(id2.fingerprint, id.fingerprint);

    // No overwrite without force; the old key is untouched.
    let before = std::fs::read(&key).unwrap();
    let e = transport::init("site-a", &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    // With force: a new identity.
    transport::init("site-a", &out, true).unwrap();
    assert_ne!(std::fs::read(&key).unwrap(), before);
    let id3 = Identity::from_dir(&out, Some("site-a")).unwrap();
    assert_ne!(id3.fingerprint, id.fingerprint);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A group-readable key is refused with the fix in the message.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = Identity::load(&crt, &key).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");

    // Bad names are refused before anything is written.
    assert!(transport::init("../evil", &out, false).is_err());
    assert!(transport::init("", &out, false).is_err());

    // A key that does not belong to the certificate is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (crt_b, _) = transport::init("site-b", &out, false).unwrap();
    let e = Identity::load(&crt_b, &key).unwrap_err().to_string();
    assert!(e.contains("cannot be used with certificate"), "{e}");
}

#[test]
fn keys_init_cli_prints_paths_and_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let args = vdrep::cli::keys::KeysInitArgs {
        name: "site-c".into(),
        out: dir.path().to_path_buf(),
        force: false,
    };
    assert_eq!(vdrep::cli::keys::run_keys_init(&args), 0);
    assert_eq!(vdrep::cli::keys::run_keys_init(&args), 1);
}

// ---------------------------------------------------------------------------
// The wire protocol over real streams.

use vdrep::hrl::Encoding;
use vdrep::wire::{self, Msg};

/// A connected (client, server) pair of QUIC connections with mutual trust.
/// For manual experiments: VDREP_TEST_MTU sets `Tuning::max_udp_payload`,
/// VDREP_TEST_BIND the client's local address.
async fn pair() -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::Endpoint,
    quinn::Connection,
) {
    let (a, b) = ids();
    let mut tuning = transport::Tuning::default();
    if let Ok(v) = std::env::var("VDREP_TEST_MTU") {
        tuning.max_udp_payload = v.parse().unwrap();
    }
    let server = transport::server_tuned(localhost(), &b, &trusting(&[&a]), &tuning).unwrap();
    let addr = server.local_addr().unwrap();
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        let inc = srv.accept().await.unwrap();
        transport::accept(inc).await.unwrap().0
    });
    let bind = std::env::var("VDREP_TEST_BIND")
        .ok()
        .map(|v| v.parse().unwrap());
    let client = transport::client_tuned(&a, &trusting(&[&b]), &tuning, bind).unwrap();
    let cconn = transport::connect(&client, addr, "site-b").await.unwrap();
    let sconn = accept.await.unwrap();
    (client, cconn, server, sconn)
}

fn one_of_each() -> Vec<Msg> {
    let id = [7u8; 16];
    vec![
        Msg::Hello(wire::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            site_name: "site-a".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        }),
        Msg::HelloOk(wire::HelloOk {
            protocol_version: wire::PROTOCOL_VERSION,
            site_name: "site-b".into(),
            software_version: "0.1.0".into(),
            store_free: 123 << 30,
        }),
        Msg::Error(wire::ErrorMsg::new(
            wire::ErrorCode::NoSpace,
            true,
            "store full: 0 bytes free",
        )),
        Msg::OpenDisk(wire::OpenDisk {
            vm: "vm1".into(),
            disk_name: "vm1/disk0.img".into(),
            disk_id: id,
            block_size: 4096,
            disk_size: 1 << 30,
            kind: wire::DiskKind::Raw,
        }),
        Msg::DiskState(wire::DiskState {
            disk_id: id,
            replica_cycle: 0,
            replica_size: 0,
            copy_cycle: 3,
            resume_offset: 1 << 20,
            needs_resync: String::new(),
        }),
        Msg::InitialBegin(wire::InitialBegin {
            disk_id: id,
            cycle: 3,
            disk_size: 1 << 30,
            start_offset: 1 << 20,
        }),
        Msg::InitialChunk(wire::InitialChunk::from_block(id, 1 << 20, &[1u8; 65536])),
        Msg::InitialChunk(wire::InitialChunk::from_block(id, 2 << 20, &[0u8; 65536])),
        Msg::InitialEnd(wire::InitialEnd {
            disk_id: id,
            cycle: 3,
            disk_size: 1 << 30,
        }),
        Msg::LogBegin(wire::LogBegin {
            disk_id: id,
            disk_name: "vm1/disk0.img".into(),
            cycle: 4,
            base_cycle: 3,
            block_size: 4096,
            base_size: 1 << 30,
            disk_size: 1 << 30,
            cut_unix_ns: 1_700_000_000_000_000_000,
            total_len: 1000,
            behind: false,
        }),
        Msg::LogChunk(wire::LogChunk {
            disk_id: id,
            cycle: 4,
            offset_in_log: 0,
            data: vec![9; 1000],
        }),
        Msg::LogEnd(wire::LogEnd {
            disk_id: id,
            cycle: 4,
            total_len: 1000,
            log_checksum: xxhash_rust::xxh3::xxh3_128(&[9; 1000]),
        }),
        Msg::Ack(wire::Ack {
            disk_id: id,
            cycle: 4,
            durable: true,
            applied: true,
        }),
        Msg::PointCommit(wire::PointCommit {
            vm: "vm1".into(),
            cycle: 4,
            app_consistent: true,
            disks: vec![wire::DiskCycle {
                disk_id: id,
                cycle: 4,
            }],
            definition: Some("<domain><name>vm1</name></domain>".into()),
            group: None,
        }),
        Msg::PointAck(wire::PointAck {
            vm: "vm1".into(),
            cycle: 4,
        }),
    ]
}

#[tokio::test]
async fn every_message_round_trips_through_real_streams() {
    let (_ce, client, _se, server) = pair().await;
    let echo = tokio::spawn(async move {
        let (mut s, mut r) = server.accept_bi().await.unwrap();
        let mut n = 0;
        while let Some(m) = wire::read_msg(&mut r).await.unwrap() {
            wire::write_msg(&mut s, &m).await.unwrap();
            n += 1;
        }
        s.finish().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), server.closed()).await;
        n
    });
    let msgs = one_of_each();
    let (mut s, mut r) = client.open_bi().await.unwrap();
    for m in &msgs {
        wire::write_msg(&mut s, m).await.unwrap();
    }
    s.finish().unwrap();
    let mut back = Vec::new();
    while let Some(m) = wire::read_msg(&mut r).await.unwrap() {
        back.push(m);
    }
    assert_eq!(back, msgs);
    client.close(0u32.into(), b"done");
    assert_eq!(echo.await.unwrap(), msgs.len());
}

#[tokio::test]
async fn oversized_and_truncated_frames_over_a_stream() {
    let (_ce, client, _se, server) = pair().await;
    let reader = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let mut r = server.accept_uni().await.unwrap();
            results.push(wire::read_msg(&mut r).await);
        }
        results
    });
    // A frame announcing 4 GiB: refused from its 4 length bytes.
    let mut s = client.open_uni().await.unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    s.write_all(&[0x13; 64]).await.unwrap();
    s.finish().unwrap();
    // A frame cut short by the end of the stream.
    let mut s = client.open_uni().await.unwrap();
    s.write_all(&100u32.to_le_bytes()).await.unwrap();
    s.write_all(&[0x23; 10]).await.unwrap();
    s.finish().unwrap();

    let results = reader.await.unwrap();
    assert!(
        matches!(results[0], Err(wire::WireError::FrameTooLarge { len, .. }) if len == u32::MAX as u64),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(
            results[1],
            Err(wire::WireError::Truncated { got: 14, need: 104 })
        ),
        "{:?}",
        results[1]
    );
}

#[tokio::test]
async fn refusal_surfaces_through_client_hello() {
    let (a, b) = ids();
    let stranger = Identity::generate("stranger").unwrap();
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);
    let client = transport::client(&stranger, &trusting(&[&b])).unwrap();
    let conn = match transport::connect(&client, addr, "site-b").await {
        Ok(c) => c,
        Err(e) => {
            // The refusal arrived during the handshake already.
            assert!(e.to_string().contains("refused our certificate"), "{e}");
            let _ = task.await;
            return;
        }
    };
    let e = match wire::client_hello(&conn, "stranger").await {
        Ok(_) => panic!("an untrusted client got HelloOk"),
        Err(e) => e,
    };
    assert!(e.connection_error().is_some(), "{e:?}");
    let explained = e.explain(addr);
    println!("client_hello: {explained}");
    assert!(explained.contains("refused our certificate"), "{explained}");
    let _ = task.await;
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64_mib_of_initial_chunks() {
    const CHUNK: usize = 1 << 20;
    // VDREP_TEST_MIB scales the transfer for manual throughput checks.
    let mib: usize = std::env::var("VDREP_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let total: usize = mib << 20;
    let (_ce, client, _se, server) = pair().await;
    let id = [3u8; 16];
    let data = noise(CHUNK, 42);
    let receiver = tokio::spawn(async move {
        let (mut s, mut r) = server.accept_bi().await.unwrap();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut bytes = 0u64;
        let mut next = 0u64;
        let mut out = Vec::new();
        loop {
            match wire::read_msg(&mut r).await.unwrap() {
                Some(Msg::InitialBegin(b)) => assert_eq!(b.start_offset, 0),
                Some(Msg::InitialChunk(c)) => {
                    assert_eq!(c.offset, next);
                    c.decode_into(&mut out).unwrap();
                    hasher.update(&out);
                    next += c.length as u64;
                    bytes += out.len() as u64;
                }
                Some(Msg::InitialEnd(e)) => {
                    assert_eq!(e.disk_size, bytes);
                    wire::write_msg(
                        &mut s,
                        &Msg::Ack(wire::Ack {
                            disk_id: e.disk_id,
                            cycle: e.cycle,
                            durable: true,
                            applied: true,
                        }),
                    )
                    .await
                    .unwrap();
                    s.finish().unwrap();
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), server.closed()).await;
        hasher.digest()
    });

    let start = std::time::Instant::now();
    let (mut s, mut r) = client.open_bi().await.unwrap();
    let mut buf = Vec::new();
    let mut expect = xxhash_rust::xxh3::Xxh3::new();
    wire::write_msg(
        &mut s,
        &Msg::InitialBegin(wire::InitialBegin {
            disk_id: id,
            cycle: 1,
            disk_size: total as u64,
            start_offset: 0,
        }),
    )
    .await
    .unwrap();
    for i in 0..total / CHUNK {
        let chunk = wire::InitialChunk {
            disk_id: id,
            offset: (i * CHUNK) as u64,
            length: CHUNK as u32,
            encoding: Encoding::Raw,
            data: data.clone(),
        };
        expect.update(&data);
        wire::write_msg_buf(&mut s, &Msg::InitialChunk(chunk), &mut buf)
            .await
            .unwrap();
    }
    wire::write_msg(
        &mut s,
        &Msg::InitialEnd(wire::InitialEnd {
            disk_id: id,
            cycle: 1,
            disk_size: total as u64,
        }),
    )
    .await
    .unwrap();
    s.finish().unwrap();
    let ack = wire::read_msg(&mut r).await.unwrap().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(matches!(ack, Msg::Ack(wire::Ack { applied: true, .. })));
    let stats = client.stats();
    println!(
        "{mib} MiB of 1 MiB InitialChunks over QUIC/127.0.0.1: {secs:.2} s, {:.0} MiB/s \
         ({} UDP datagrams sent, mtu {}, {} lost packets, rtt {:?})",
        mib as f64 / secs,
        stats.udp_tx.datagrams,
        stats.path.current_mtu,
        stats.path.lost_packets,
        client.rtt()
    );
    client.close(0u32.into(), b"done");
    assert_eq!(receiver.await.unwrap(), expect.digest());
}

/// A UDP relay between a client and a server that can be told to drop
/// everything (a cable pulled out).
async fn relay(server: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let client_addr = Arc::new(tokio::sync::Mutex::new(None::<SocketAddr>));
    {
        let (front, back, cut, client_addr) = (
            front.clone(),
            back.clone(),
            cut.clone(),
            client_addr.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client_addr.lock().await = Some(from);
                if !cut.load(Ordering::SeqCst) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
    }
    {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client_addr.lock().await;
                if let (false, Some(to)) = (cut.load(Ordering::SeqCst), to) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    (addr, cut)
}

#[tokio::test]
async fn dead_peer_is_noticed_by_the_idle_timeout() {
    let (a, b) = ids();
    let tuning = transport::Tuning {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    let server = transport::server_tuned(localhost(), &b, &trusting(&[&a]), &tuning).unwrap();
    let (via, cut) = relay(server.local_addr().unwrap()).await;
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        let inc = srv.accept().await.unwrap();
        transport::accept(inc).await.unwrap().0
    });
    let client = transport::client_tuned(&a, &trusting(&[&b]), &tuning, None).unwrap();
    let conn = transport::connect(&client, via, "site-b").await.unwrap();
    let sconn = accept.await.unwrap();

    // Idle but alive: keep-alives hold the connection open past the timeout.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(conn.close_reason().is_none());
    assert!(sconn.close_reason().is_none());

    // Pull the cable: both sides notice within the idle timeout.
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let t = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("client noticed the dead peer");
    assert!(matches!(e, quinn::ConnectionError::TimedOut), "{e:?}");
    let e2 = tokio::time::timeout(Duration::from_secs(5), sconn.closed())
        .await
        .expect("server noticed the dead peer");
    assert!(matches!(e2, quinn::ConnectionError::TimedOut), "{e2:?}");
    let msg = transport::explain_connection_error(&e, via);
    println!("after {:?}: {msg}", t.elapsed());
    assert!(msg.contains("timed out"), "{msg}");
}

#[tokio::test]
async fn default_client_reaches_ipv6_and_ipv4_servers() {
    let (a, b) = ids();
    let Ok(server6) = transport::server("[::1]:0".parse().unwrap(), &b, &trusting(&[&a])) else {
        println!("no IPv6 loopback here: skipped");
        return;
    };
    let addr6 = server6.local_addr().unwrap();
    let task = spawn_echo_server(server6);
    let client = transport::client(&a, &trusting(&[&b])).unwrap();
    let conn = transport::connect(&client, addr6, "site-b").await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(b"v6").await.unwrap();
    s.finish().unwrap();
    assert_eq!(r.read_to_end(10).await.unwrap(), b"v6");
    conn.close(0u32.into(), b"done");
    assert_eq!(task.await.unwrap().unwrap().cn, "site-a");
}

#[tokio::test]
async fn hello_exchange_and_version_mismatch() {
    let (_ce, client, _se, server) = pair().await;
    let srv = tokio::spawn(async move {
        let first = wire::accept_hello(&server, "site-b")
            .await
            .map(|(_, _, h)| h);
        let second = wire::accept_hello(&server, "site-b")
            .await
            .map(|(_, _, h)| h);
        let _ = tokio::time::timeout(Duration::from_secs(5), server.closed()).await;
        (first, second)
    });
    let (_s, _r, ok) = wire::client_hello(&client, "site-a").await.unwrap();
    assert_eq!(ok.site_name, "site-b");
    assert_eq!(ok.protocol_version, wire::PROTOCOL_VERSION);

    // A sender from the future.
    let (mut s, mut r) = client.open_bi().await.unwrap();
    let hello = Msg::Hello(wire::Hello {
        protocol_version: 99,
        site_name: "site-a".into(),
        software_version: "9.9".into(),
    });
    wire::write_msg(&mut s, &hello).await.unwrap();
    let e = wire::expect(&mut r, "HelloOk", |m| match m {
        Msg::HelloOk(h) => Ok(h),
        m => Err(m),
    })
    .await
    .unwrap_err();
    println!("sender sees: {e}");
    assert!(
        matches!(&e, wire::WireError::Peer { code: wire::ErrorCode::Version, retryable: false, message } if message.contains(&format!("version {}, this sender 99", wire::PROTOCOL_VERSION))),
        "{e:?}"
    );
    client.close(0u32.into(), b"done");
    let (first, second) = srv.await.unwrap();
    assert_eq!(first.unwrap().site_name, "site-a");
    assert!(matches!(
        second,
        Err(wire::WireError::Version {
            ours: wire::PROTOCOL_VERSION,
            theirs: 99
        })
    ));
}

/// Presents a given certificate but signs with another key: an impostor
/// who copied a trusted peer's .crt but has not its private key.
#[derive(Debug)]
struct StolenCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for StolenCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn trusted_certificate_without_its_key_is_refused() {
    let (a, b) = ids();
    let impostor = Identity::generate("site-a").unwrap();
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);

    // a's certificate, impostor's key.
    let provider = transport::provider();
    let key = provider
        .key_provider
        .load_private_key(impostor.key())
        .unwrap();
    let stolen = rustls::sign::CertifiedKey::new(vec![a.cert.clone()], key);
    let verifier = Arc::new(transport::trust::PinnedServerVerifier::new(trusting(&[&b])));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StolenCert(Arc::new(stolen))));
    cfg.alpn_protocols = vec![transport::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut client = quinn::Endpoint::client(localhost()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));

    let outcome = match client.connect(addr, "site-b").unwrap().await {
        Err(e) => transport::explain_connection_error(&e, addr),
        Ok(conn) => {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let _ = s.write_all(b"ping").await;
            let _ = s.finish();
            assert!(
                r.read_to_end(100).await.is_err(),
                "the impostor got an answer"
            );
            transport::explain_connection_error(&conn.closed().await, addr)
        }
    };
    println!("impostor sees: {outcome}");
    assert!(outcome.contains("refused"), "{outcome}");
    let srv = task.await.unwrap().unwrap_err().to_string();
    println!("server says: {srv}");
    assert!(srv.starts_with("refused connection from"), "{srv}");
    assert!(
        srv.contains("did not prove it holds its private key"),
        "{srv}"
    );
    assert!(srv.contains(&a.fingerprint.to_string()), "{srv}");
}

#[tokio::test]
async fn trust_reload_admits_a_new_peer_and_alpn_is_required() {
    let (a, b) = ids();
    let server = transport::server(localhost(), &b, &TrustStore::new()).unwrap();
    let addr = server.local_addr().unwrap();
    transport::reload_server(&server, &b, &trusting(&[&a]), &transport::Tuning::default()).unwrap();
    let task = spawn_echo_server(server);
    let client = transport::client(&a, &trusting(&[&b])).unwrap();
    let conn = transport::connect(&client, addr, "site-b").await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(b"hi").await.unwrap();
    s.finish().unwrap();
    assert_eq!(r.read_to_end(10).await.unwrap(), b"hi");
    conn.close(0u32.into(), b"done");
    assert_eq!(task.await.unwrap().unwrap().fingerprint, a.fingerprint);

    // A client speaking another ALPN is refused during the handshake.
    let server = transport::server(localhost(), &b, &trusting(&[&a])).unwrap();
    let addr = server.local_addr().unwrap();
    let task = spawn_echo_server(server);
    let verifier = Arc::new(transport::trust::PinnedServerVerifier::new(trusting(&[&b])));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(transport::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![a.cert.clone()], a.key())
        .unwrap();
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut other = quinn::Endpoint::client(localhost()).unwrap();
    other.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let e = other.connect(addr, "site-b").unwrap().await.unwrap_err();
    let msg = transport::explain_connection_error(&e, addr);
    println!("h3 client sees: {msg}");
    assert!(msg.contains("does not speak the vdrep protocol"), "{msg}");
    let srv = task.await.unwrap().unwrap_err().to_string();
    println!("server says: {srv}");
    assert!(srv.starts_with("refused connection from"), "{srv}");
}

/// A receiver that restarts (same identity, same address) answers the
/// packets of a connection it lost with a stateless reset the client
/// accepts: the client sees `Reset` right away, not `TimedOut` after the
/// idle timeout (30 s here).
#[tokio::test]
async fn restarted_server_resets_its_old_connections() {
    let (a, b) = ids();
    let tuning = transport::Tuning {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    // The first server runs in a runtime of its own, so that it can die
    // like a killed process: dropped with its connections, nothing sent.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (ta, tb, tn) = (trusting(&[&a]), b.clone(), tuning.clone());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let server = transport::server_tuned(localhost(), &tb, &ta, &tn).unwrap();
        addr_tx.send(server.local_addr().unwrap()).unwrap();
        let inc = server.accept().await.unwrap();
        let conn = transport::accept(inc).await.unwrap().0;
        std::future::pending::<()>().await;
        drop((conn, server));
    });
    let addr = addr_rx.recv().unwrap();
    let client = transport::client_tuned(&a, &trusting(&[&b]), &tuning, None).unwrap();
    let conn = transport::connect(&client, addr, "site-b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(conn.close_reason().is_none());
    // kill -9: the runtime and the endpoint's socket vanish.
    rt.shutdown_background();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and the server restarts on the same address with the same identity.
    let again = transport::server_tuned(addr, &b, &trusting(&[&a]), &tuning).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the client never learnt that the server restarted");
    assert!(matches!(e, quinn::ConnectionError::Reset), "{e:?}");
    drop(again);
}
