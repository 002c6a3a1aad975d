//! A network blip on a continuous VM: the receiver is killed (-9) and back
//! 2 s later while the VM writes. The VM's long schedule is set to 1 hour,
//! so only the fast retries (1 s, 2 s, 5 s) can bring it back: a point
//! committed again proves them, with no time measured. Nothing calls
//! `vdrep sync` while a retry is pending (a sync retries at once and would
//! hide the schedule). During a longer outage `status` (text and JSON) and
//! the metrics show each wait of the fast schedule in order (1 s, 2 s,
//! 5 s), the next retry time and the retry count; the outage
//! starts from the first step because the blip's committed point reset the
//! schedule. Needs root and /dev/fuse (CI has both).

mod mountutil;
mod skip;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mountutil::*;

/// Polls the mount's status until `done` says yes; `what` names the wait
/// in the failure. The deadline only stops a hung test: it is minutes
/// away from anything the fast schedule needs and an hour short of the
/// long one.
fn wait_status(
    m: &Mounted,
    what: &str,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = m.status_json();
        if done(&st["replication"][0]) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: never happened\n{st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

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
    // The default fast steps; a long schedule of one hour, so that a
    // point committed after the blip can only come from a fast retry.
    vdrep_ok(&[
        "protect",
        "vm1",
        "--to",
        &addr,
        "--trust",
        &s("kb/site-b.crt"),
        "--every",
        "continuous",
        "--retry-schedule",
        "1h",
        &s("vm/d.img"),
    ]);
    vdrep_ok(&["sync", &s("vm"), "--timeout", "60"]);
    let st = m.status_json();
    let retries_before = st["replication"][0]["retries"].as_u64().unwrap();

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
    // The sender notices (a failed session counts a retry), then the
    // receiver is back 2 s after the kill.
    wait_status(&m, "a retry counted after the kill", |v| {
        v["retries"].as_u64() > Some(retries_before)
    });
    let point_before = m.status_json()["replication"][0]["last_point"].as_u64();
    std::thread::sleep(Duration::from_secs(2));
    let mut rx2 = site.receiver(&addr);
    let st = wait_status(
        &m,
        "a point committed after the receiver came back (fast retries)",
        |v| v["last_point"].as_u64() > point_before,
    );
    let v = &st["replication"][0];
    assert!(
        v["retries"].as_u64().unwrap() > retries_before,
        "status does not count the retry: {st}"
    );

    // A longer outage: while the VM waits between tries, `status` (text
    // and JSON) and the metrics show each step of the schedule, in order,
    // from the first one (the blip's point reset it): 1 s, 2 s, 5 s (the
    // step after them is `src/sender/retry.rs`'s unit tests' business: one
    // more step here costs ~10 s of CI).
    rx2.kill9();
    let mut seen: Vec<(u64, f64, u64)> = Vec::new();
    let mut shown = None;
    while seen.len() < 3 {
        let st = wait_status(&m, "the next step of the retry schedule", |v| {
            v["retry_step"].as_u64() == Some(seen.len() as u64)
        });
        let v = &st["replication"][0];
        let (n, delay, next) = (
            v["retries"].as_u64().unwrap(),
            v["retry_delay_secs"].as_f64().unwrap(),
            v["next_retry_unix"].as_u64().unwrap(),
        );
        if seen.len() == 2 {
            // Shown while the VM waits (the step lasts 5 s).
            shown = Some((vdrep_ok(&["status", &s("vm")]), scrape(&maddr), n, next));
        }
        seen.push((n, delay, next));
    }
    let delays: Vec<f64> = seen.iter().map(|x| x.1).collect();
    assert_eq!(delays, [1.0, 2.0, 5.0], "waits of the schedule: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "each failed try counts one retry: {seen:?}"
    );
    let (text, metrics, n, next) = shown.unwrap();
    assert!(
        text.contains(&format!(
            "(step 3 of the schedule, a 5s wait; retries so far: {n})"
        )) && text.contains("next retry in"),
        "status text: {text}"
    );
    let line = format!("vdrep_vm_next_retry_timestamp_seconds{{vm=\"vm1\"}} {next}");
    assert!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");
    let line = format!("vdrep_vm_retries_total{{vm=\"vm1\"}} {n}");
    assert!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");

    // The receiver is back; the VM waits an hour unless asked: `sync`
    // retries at once and converges.
    let _rx3 = site.receiver(&addr);
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    vdrep_ok(&["sync", &s("vm"), "--timeout", "60"]);
    let st = m.status_json();
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    assert!(st["replication"][0]["retry_step"].is_null(), "{st}");
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
