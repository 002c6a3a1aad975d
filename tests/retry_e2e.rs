//! A network blip on a continuous VM: the receiver is killed (-9) and back
//! 2 s later while the VM writes. The sender's fast retries (1 s, 2 s, 5 s
//! before the 1-minute schedule) commit a point again without waiting for the
//! long schedule, and `status` counts the retries; during a longer outage
//! `status` (text and JSON) and the metrics show the next retry time and
//! the retry count. This binary never sets
//! `VDREP_RETRY_SCALE`: the real schedule is under test. Needs root and
//! /dev/fuse (CI has both).

mod mountutil;
mod skip;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mountutil::*;

#[test]
fn receiver_blip_is_retried_within_seconds_not_minutes() {
    require_fuse!();
    assert!(
        std::env::var_os("VDREP_RETRY_SCALE").is_none(),
        "this test needs the real retry schedule"
    );
    let site = TwoSites::new();
    let root = site.root.as_path();
    let s = |p: &str| site.s(p);
    std::fs::File::create(root.join("vm/d.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut rx = site.receiver("127.0.0.1:0");
    let addr = rx.addr.clone();
    let maddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut m = Mounted::new(
        &site.p("vm"),
        &["--keys", &site.s("ka"), "--metrics-listen", &maddr],
    );
    vdrep_ok(&[
        "protect",
        "vm1",
        "--to",
        &addr,
        "--trust",
        &s("kb/site-b.crt"),
        "--every",
        "continuous",
        &s("vm/d.img"),
    ]);
    vdrep_ok(&["sync", &s("vm"), "--timeout", "60"]);
    let retries_before = m.status_json()["replication"][0]["retries"]
        .as_u64()
        .unwrap();

    // Under load: a writer keeps writing through the mount.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), root.join("vm/d.img"));
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                f.write_all_at(&[(n % 251) as u8; 4096], (n * 7919 % 4096) * 4096)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    rx.kill9();
    std::thread::sleep(Duration::from_secs(2));
    let mut rx2 = site.receiver(&addr);
    // The long schedule's first retry is 1 minute after the failure; the
    // fast schedule retries within seconds. A sync that must finish within
    // 45 s tells them apart on a busy host.
    let o = vdrep(&["sync", &s("vm"), "--timeout", "45"]);
    let st = m.status_json();
    assert!(
        o.status.success(),
        "no point committed within 45 s of the receiver's return (waiting for the long retry schedule?): {}{}\n{st}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v = &st["replication"][0];
    assert!(
        v["retries"].as_u64().unwrap() > retries_before,
        "status does not count the retry: {st}"
    );

    // A longer outage: while the VM waits between tries, `status` (text
    // and JSON) and the metrics say when it tries next and how often it
    // tried; the waits follow the fast schedule (1 s, 2 s, 5 s).
    rx2.kill9();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        let st = m.status_json();
        let v = &st["replication"][0];
        if let (Some(next), Some(n)) = (v["next_retry_unix"].as_u64(), v["retries"].as_u64()) {
            if seen.last().is_none_or(|(_, k, _)| *k != n) {
                let text = vdrep_ok(&["status", &s("vm")]);
                let metrics = scrape(&maddr);
                seen.push((next, n, (text, metrics)));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.len() >= 2,
        "status never showed two waits for a retry while the receiver was down: {seen:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (next, n, (text, metrics)) in &seen {
        assert!(
            *next <= now + 6,
            "retry {n} planned at {next}, now {now}: not the fast schedule"
        );
        assert!(
            text.contains(&format!("(retries so far: {n})")) && text.contains("next retry in"),
            "status text: {text}"
        );
        let line = format!("vdrep_vm_next_retry_timestamp_seconds{{vm=\"vm1\"}} {next}");
        assert!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");
        assert!(
            metrics.contains("vdrep_vm_retries_total{vm=\"vm1\"}"),
            "{metrics}"
        );
    }
    let _rx3 = site.receiver(&addr);
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    vdrep_ok(&["sync", &s("vm"), "--timeout", "60"]);
    let st = m.status_json();
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    // The replica (a fixed VHD: the disk's bytes, then a footer) holds
    // every write the VM made.
    let src = std::fs::read(root.join("vm/d.img")).unwrap();
    let replica = site.replica("vm1", "d.vhd");
    let rep = std::fs::read(replica).unwrap();
    assert!(
        rep.len() >= src.len() && rep[..src.len()] == src[..],
        "replica differs"
    );
    m.umount();
}

/// The mount's metrics, as text.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}
