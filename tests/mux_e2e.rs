//! Every VM's session to one receiver on one QUIC connection
//! (`vdrep-mux/1`, `transport::mux`; issue 12, target 6): `vdrep mount` +
//! `vdrep protect` of several VMs and `vdrep receive` on loopback, and a
//! raw client sending malformed mux headers. Needs root and /dev/fuse.

mod mountutil;
mod skip;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use mountutil::*;

const VMS: usize = 8;

fn metrics_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The receiver's metric `name` (unlabelled), from its `/metrics`.
fn metric(addr: &str, name: &str) -> i64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {resp}"))
        .trim()
        .parse()
        .unwrap()
}

fn receiver(s: &TwoSites, addr: &str, maddr: &str) -> Receiver {
    Receiver::spawn(
        addr,
        &s.p("store"),
        &s.p("kb"),
        &s.p("ka/site-a.crt"),
        &["--metrics-listen", maddr],
        &[],
    )
}

fn sync_all(s: &TwoSites) {
    let o = vdrep(&["sync", &s.s("vm"), "--timeout", "180"]);
    assert!(
        o.status.success(),
        "sync failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn same(disk: &Path, replica: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            disk.to_str().unwrap(),
            replica.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{}: {out}", disk.display());
}

/// Write 64 random 4 KiB blocks of disk `i` through the mount.
fn churn(s: &TwoSites, i: usize, seed: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.p(&format!("vm/d{i}.img")))
        .unwrap();
    let mut x = seed | 1;
    for n in 0..64u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        f.write_all_at(&[(n as u8) ^ (seed as u8); 4096], (x >> 33) % 256 * 4096)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// 8 continuous VMs to one receiver: one connection carries all their
/// sessions and every replica equals its disk after a sync; a VM that is
/// unprotected ends its session alone (the others go on, on the same
/// connection); after a kill -9 of the receiver and its restart every
/// session resumes, again on one connection.
#[test]
fn vms_to_one_receiver_share_one_connection() {
    require_fuse!();
    let s = TwoSites::new();
    let maddr = metrics_addr();
    let mut r = receiver(&s, "127.0.0.1:0", &maddr);
    for i in 0..VMS {
        std::fs::write(s.p(&format!("vm/d{i}.img")), vec![i as u8 + 1; 1 << 20]).unwrap();
    }
    let mut m = s.mount();
    for i in 0..VMS {
        vdrep_ok(&[
            "protect",
            &format!("vm{i}"),
            "--to",
            &r.addr,
            "--trust",
            &s.s("kb/site-b.crt"),
            "--every",
            "continuous",
            &s.s(&format!("vm/d{i}.img")),
        ]);
    }
    for i in 0..VMS {
        churn(&s, i, 1 + i as u64);
    }
    sync_all(&s);
    for i in 0..VMS {
        same(
            &s.p(&format!("vm/d{i}.img")),
            &s.replica(&format!("vm{i}"), &format!("d{i}.vhd")),
        );
    }
    assert_eq!(
        metric(&maddr, "vdrep_receiver_connections_accepted_total"),
        1,
        "every VM's session should share one connection"
    );
    assert_eq!(metric(&maddr, "vdrep_receiver_connections"), 1);
    assert_eq!(metric(&maddr, "vdrep_receiver_mux_sessions"), VMS as i64);

    // One VM's session ends; the others go on.
    vdrep_ok(&["unprotect", "vm0", "--dir", &s.s("vm")]);
    wait_for("the receiver to drop vm0's session", || {
        metric(&maddr, "vdrep_receiver_mux_sessions") == VMS as i64 - 1
    });
    for i in 1..VMS {
        churn(&s, i, 100 + i as u64);
    }
    sync_all(&s);
    for i in 1..VMS {
        same(
            &s.p(&format!("vm/d{i}.img")),
            &s.replica(&format!("vm{i}"), &format!("d{i}.vhd")),
        );
    }
    assert_eq!(
        metric(&maddr, "vdrep_receiver_connections_accepted_total"),
        1,
        "ending one session must not end the connection"
    );

    // kill -9 of the receiver: every session resumes once it is back.
    let addr = r.addr.clone();
    r.kill9();
    for i in 1..VMS {
        churn(&s, i, 200 + i as u64);
    }
    std::thread::sleep(Duration::from_millis(500));
    let maddr = metrics_addr();
    let _r = receiver(&s, &addr, &maddr);
    sync_all(&s);
    for i in 1..VMS {
        same(
            &s.p(&format!("vm/d{i}.img")),
            &s.replica(&format!("vm{i}"), &format!("d{i}.vhd")),
        );
    }
    assert_eq!(
        metric(&maddr, "vdrep_receiver_connections_accepted_total"),
        1
    );
    assert_eq!(
        metric(&maddr, "vdrep_receiver_mux_sessions"),
        VMS as i64 - 1
    );
    m.umount();
}

/// A raw `vdrep-mux/1` client: streams whose header is malformed
/// (truncated, an unknown version or kind) are reset with the refusal
/// code and what follows the header is not applied; a well-formed stream
/// on the same connection is served.
#[test]
fn malformed_mux_headers_are_reset_and_not_applied() {
    setup();
    let s = TwoSites::new();
    let maddr = metrics_addr();
    let r = receiver(&s, "127.0.0.1:0", &maddr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use vdrep::transport::{self, mux};
        use vdrep::wire::{self, Msg};
        let id = transport::keys::Identity::from_dir(&s.p("ka"), None).unwrap();
        let trust = transport::trust::TrustStore::from_files(&[s.p("kb/site-b.crt")]).unwrap();
        let tuning = transport::Tuning::default();
        let ep = transport::client_endpoint(&tuning, None).unwrap();
        let (cc, _shares) = transport::mux_client_config(&id, &trust, &tuning).unwrap();
        let conn = transport::connect_with(&ep, cc, r.addr.parse().unwrap(), "vdrep")
            .await
            .unwrap();
        assert!(
            mux::negotiated(&conn),
            "the receiver should choose vdrep-mux/1"
        );
        let hello = |site: &str| {
            let mut b = Vec::new();
            wire::encode(
                &Msg::Hello(wire::Hello {
                    protocol_version: wire::PROTOCOL_VERSION,
                    site_name: site.into(),
                    software_version: "t".into(),
                }),
                &mut b,
            )
            .unwrap();
            b
        };
        let good = mux::StreamHeader { tag: 1 }.encode();
        let mut unknown_version = good;
        unknown_version[0] = 9;
        let mut unknown_kind = good;
        unknown_kind[1] = 7;
        let cases: [(&str, Vec<u8>); 4] = [
            ("empty", Vec::new()),
            ("truncated", good[..5].to_vec()),
            (
                "unknown version",
                [&unknown_version[..], &hello("x")].concat(),
            ),
            ("unknown kind", [&unknown_kind[..], &hello("x")].concat()),
        ];
        for (what, bytes) in cases {
            let (mut tx, mut rx) = conn.open_bi().await.unwrap();
            tx.write_all(&bytes).await.unwrap();
            tx.finish().unwrap();
            let got = tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(1 << 20))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer"));
            match got {
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                    assert_eq!(code, quinn::VarInt::from_u32(0x4d), "{what}")
                }
                other => panic!("{what}: the stream was not refused: {other:?}"),
            }
        }
        assert_eq!(
            metric(&maddr, "vdrep_receiver_mux_sessions"),
            0,
            "a malformed header started a session"
        );
        // The connection is still up, and a well-formed stream is served.
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        tx.write_all(&good).await.unwrap();
        tx.write_all(&hello("site-a")).await.unwrap();
        assert!(matches!(
            wire::read_msg(&mut rx).await.unwrap(),
            Some(Msg::HelloOk(_))
        ));
        assert_eq!(metric(&maddr, "vdrep_receiver_mux_sessions"), 1);
        assert_eq!(
            metric(&maddr, "vdrep_receiver_connections_accepted_total"),
            1
        );
    });
}

/// A peer that offers only `vdrep/1` (`VDREP_MUX=0`: as a build before
/// `vdrep-mux/1`), on either side: the other falls back to a connection
/// per session, and the replicas converge.
#[test]
fn a_peer_without_mux_gets_a_connection_per_session() {
    require_fuse!();
    for old_receiver in [true, false] {
        let s = TwoSites::new();
        let maddr = metrics_addr();
        let off: &[(&str, &str)] = &[("VDREP_MUX", "0")];
        let r = Receiver::spawn(
            "127.0.0.1:0",
            &s.p("store"),
            &s.p("kb"),
            &s.p("ka/site-a.crt"),
            &["--metrics-listen", &maddr],
            if old_receiver { off } else { &[] },
        );
        let mut m = Mounted::with_env(
            &s.p("vm"),
            &["--keys", &s.s("ka")],
            if old_receiver { &[] } else { off },
        );
        for i in 0..2 {
            std::fs::write(s.p(&format!("vm/d{i}.img")), vec![i as u8 + 7; 1 << 20]).unwrap();
            vdrep_ok(&[
                "protect",
                &format!("vm{i}"),
                "--to",
                &r.addr,
                "--trust",
                &s.s("kb/site-b.crt"),
                "--every",
                "continuous",
                &s.s(&format!("vm/d{i}.img")),
            ]);
            churn(&s, i, 7 + i as u64);
        }
        sync_all(&s);
        for i in 0..2 {
            same(
                &s.p(&format!("vm/d{i}.img")),
                &s.replica(&format!("vm{i}"), &format!("d{i}.vhd")),
            );
        }
        assert_eq!(
            metric(&maddr, "vdrep_receiver_connections"),
            2,
            "old receiver: {old_receiver}"
        );
        assert_eq!(metric(&maddr, "vdrep_receiver_mux_sessions"), 0);
        m.umount();
    }
}
