//! Monitoring and alerts (issue 9, must-show 5), end to end: a mount and a
//! receiver on loopback, both driven by their configuration files with
//! `metrics_listen`. Both endpoints are scraped over HTTP and parsed by a
//! real OpenMetrics parser (Debian's python3-prometheus-client); the lag
//! and state series must be there with sane values (the store's size with
//! the time of the walk that measured it). Then the receiver is
//! stopped while a writer keeps writing through the mount: `rpo_alert`
//! drives the VM to Warning "RPO exceeded", the `notify_command` gets the
//! event on stdin, `vdrep events --json` lists it and a running
//! `vdrep events --follow --json` streams it. The receiver is restarted:
//! the alert clears (event and metric). A fence and unfence of the VM (the
//! primary's side of a planned failover) are events of the mount, a test
//! failover and its cleanup events of the receiver (`vdrep events
//! --store`, the receiver's `notify_command`). Needs root and /dev/fuse.

mod mountutil;
mod skip;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mountutil::*;

/// Debian's python with its prometheus_client (scripts/lib.sh installs it).
const PYTHON: &str = "/usr/bin/python3";

/// Parses OpenMetrics text on stdin strictly; prints one JSON array per
/// sample: [name, {labels}, value].
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        print(json.dumps([s.name, s.labels, s.value]))
"#;

/// Why the parser cannot run here, if it cannot.
fn parser_unavailable() -> Option<String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| {
        format!(
            "{PYTHON} cannot import prometheus_client (apt-get install python3-prometheus-client)"
        )
    })
}

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: serde_json::Map<String, serde_json::Value>,
    value: f64,
}

/// GET http://ADDR/metrics, checked by the parser; its samples.
fn scrape(addr: &str) -> Vec<Sample> {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let mut py = Command::new(PYTHON)
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape of {addr}: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Sample {
                name: v[0].as_str().unwrap().to_string(),
                labels: v[1].as_object().unwrap().clone(),
                value: v[2].as_f64().unwrap(),
            }
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(|x| x.as_str()) == Some(*v))
        })
        .map(|s| s.value)
}

fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| {
        let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        panic!("no sample {name}{labels:?} in {names:?}")
    })
}

/// A TCP port free a moment ago on 127.0.0.1.
fn tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A UDP port free a moment ago on 127.0.0.1 (QUIC).
fn udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// `vdrep --config FILE receive`, logging to `log`; killed by `stop`/drop.
struct Receiver(Option<Child>);

impl Receiver {
    fn start(config: &Path, log: &Path) -> Receiver {
        setup();
        let mut child = Command::new(vdrep_bin())
            .arg("--config")
            .arg(config)
            .arg("receive")
            // Walk the store for its size every 200 ms, not every minute.
            .env("VDREP_TEST_STORE_WALK_MIN_MS", "200")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.starts_with("listening on "),
            "the receiver did not start: {first:?}; log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        Receiver(Some(child))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll `f` every 200 ms until it gives `Some`, or panic with `what`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The VM `web` in `vdrep status --json`.
fn web_status(m: &Mounted) -> serde_json::Value {
    m.status_json()["replication"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "web")
        .cloned()
        .expect("web is protected")
}

/// JSON lines of `text` that are events of kind `event` for `web`.
fn events_of(text: &str, event: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == event && e["vm"] == "web")
        .collect()
}

/// Writes 4 KiB every 100 ms to a disk through the mount until stopped
/// (also when the test fails, so the mount can be unmounted).
struct Writer {
    going: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(f: std::fs::File) -> Writer {
        let going = Arc::new(AtomicBool::new(true));
        let on = going.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while on.load(Ordering::SeqCst) {
                f.write_all_at(&n.to_le_bytes().repeat(512), (n % 256) * 4096)
                    .unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Writer {
            going,
            thread: Some(thread),
        }
    }

    /// Stop and wait; a write that failed fails the test.
    fn stop(&mut self) {
        self.going.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            assert!(t.join().is_ok(), "a write through the mount failed");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.going.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every line `vdrep events --follow --json DIR` printed so far.
struct Follower {
    child: Child,
    lines: Arc<Mutex<String>>,
}

impl Follower {
    fn start(dir: &Path) -> Follower {
        let mut child = Command::new(vdrep_bin())
            .args(["events", "--follow", "--json"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(String::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        Follower { child, lines }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn metrics_parse_and_rpo_alert_fires_notifies_and_clears() {
    require_fuse!();
    if let Some(why) = parser_unavailable() {
        skip::skip(&format!("SKIP: {why}"));
        return;
    }
    setup();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let p = |s: &str| -> PathBuf { root.join(s) };
    for d in ["ka", "kb", "vm", "store"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    for (name, d) in [("site-a", "ka"), ("site-b", "kb")] {
        vdrep_ok(&[
            "keys",
            "init",
            "--name",
            name,
            "--out",
            p(d).to_str().unwrap(),
        ]);
    }
    let disk = p("vm/web.raw");
    let seed: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, seed).unwrap();
    let (port, mport_a, mport_b) = (udp_port(), tcp_port(), tcp_port());
    let (maddr_a, maddr_b) = (
        format!("127.0.0.1:{mport_a}"),
        format!("127.0.0.1:{mport_b}"),
    );

    // Each site's notify_command appends the event it reads to a file.
    let (notified, rnotified) = (p("notified.jsonl"), p("rnotified.jsonl"));
    let (notify, rnotify) = (p("notify.sh"), p("rnotify.sh"));
    for (script, file) in [(&notify, &notified), (&rnotify, &rnotified)] {
        std::fs::write(script, format!("#!/bin/sh\ncat >> '{}'\n", file.display())).unwrap();
    }
    let dr = p("dr.toml");
    std::fs::write(
        &dr,
        format!(
            "[site]\nname = \"site-b\"\nkeys = \"{}\"\ntrust = [\"{}\"]\nnotify_command = \"sh {}\"\n\n\
             [receiver]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{}\"\nmetrics_listen = \"{maddr_b}\"\n\
             verify_boot = \"daily\"\n",
            p("kb").display(),
            p("ka/site-a.crt").display(),
            rnotify.display(),
            p("store").display(),
        ),
    )
    .unwrap();
    let primary = p("primary.toml");
    std::fs::write(
        &primary,
        format!(
            "[site]\nname = \"site-a\"\nkeys = \"{ka}\"\ntrust = [\"{kb}/site-b.crt\"]\n\
             notify_command = \"sh {notify}\"\nnotify_timeout = \"5s\"\n\n\
             [[mount]]\npath = \"{vm}\"\nmetrics_listen = \"{maddr_a}\"\n\n\
             [[vm]]\nname = \"web\"\ndisks = [\"{vm}/web.raw\"]\nto = \"127.0.0.1:{port}\"\n\
             every = \"1s\"\nrpo_alert = \"3s\"\n",
            ka = p("ka").display(),
            kb = p("kb").display(),
            vm = p("vm").display(),
            notify = notify.display(),
        ),
    )
    .unwrap();
    vdrep_ok(&["--config", dr.to_str().unwrap(), "config", "check"]);
    vdrep_ok(&["--config", primary.to_str().unwrap(), "config", "check"]);

    let mut rcv = Receiver::start(&dr, &p("recv.log"));
    let vm = p("vm");
    // Retries in fractions of a second, so the restart is picked up fast.
    let mounted = Command::new(vdrep_bin())
        .arg("--config")
        .arg(&primary)
        .arg("mount")
        .arg(&vm)
        .env("VDREP_RETRY_SCALE", "0.01")
        .output()
        .unwrap();
    assert!(
        mounted.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    let m = Mounted {
        dir: vm.clone(),
        mounted: true,
    };
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&[0x5a; 64 << 10], 1 << 20).unwrap();
    f.sync_all().unwrap();
    vdrep_ok(&["sync", "web", "--timeout", "120"]);

    // Both endpoints parse; lag and state are there and sane.
    let a = scrape(&maddr_a);
    assert_eq!(
        must(&a, "vdrep_vm_state", &[("vm", "web"), ("state", "normal")]),
        1.0
    );
    assert_eq!(
        must(&a, "vdrep_vm_state", &[("vm", "web"), ("state", "warning")]),
        0.0
    );
    let lag = must(&a, "vdrep_vm_lag_seconds", &[("vm", "web")]);
    assert!((0.0..30.0).contains(&lag), "lag {lag}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = must(
        &a,
        "vdrep_vm_last_point_timestamp_seconds",
        &[("vm", "web")],
    );
    assert!(
        (now - 60.0..now + 1.0).contains(&last),
        "last point {last}, now {now}"
    );
    assert_eq!(
        must(&a, "vdrep_vm_rpo_alert_threshold_seconds", &[("vm", "web")]),
        3.0
    );
    assert_eq!(
        must(
            &a,
            "vdrep_vm_alert",
            &[("vm", "web"), ("alert", "rpo_exceeded")]
        ),
        0.0
    );
    assert_eq!(
        must(
            &a,
            "vdrep_vm_alert",
            &[("vm", "web"), ("alert", "link_overloaded")]
        ),
        0.0
    );
    assert!(must(&a, "vdrep_vm_sent_bytes_total", &[("vm", "web")]) > 0.0);
    // Every point committed counts: one more write and sync, one more point.
    let points = must(&a, "vdrep_vm_points_committed_total", &[("vm", "web")]);
    assert!(points >= 1.0, "points committed {points}");
    f.write_all_at(&[0xa5; 4096], 2 << 20).unwrap();
    f.sync_all().unwrap();
    vdrep_ok(&["sync", "web", "--timeout", "120"]);
    let a = scrape(&maddr_a);
    let more = must(&a, "vdrep_vm_points_committed_total", &[("vm", "web")]);
    assert!(more > points, "points committed {points} then {more}");
    // That 4 KiB block was logged from the copy the mount kept of the write
    // (cuts every second keep copies), not read back from the disk.
    let from_memory = must(&a, "vdrep_logged_blocks_total", &[("from", "memory")]);
    assert!(
        from_memory >= 1.0,
        "blocks logged from memory {from_memory}"
    );
    must(&a, "vdrep_logged_blocks_total", &[("from", "disk")]);
    must(&a, "vdrep_kept_writes_bytes", &[]);
    must(&a, "vdrep_vm_pending_bytes", &[("vm", "web")]);
    must(&a, "vdrep_vm_retries_total", &[("vm", "web")]);
    must(&a, "vdrep_disk_dirty_bytes", &[("disk", "web.raw")]);
    assert_eq!(
        must(&a, "vdrep_disk_size_bytes", &[("disk", "web.raw")]),
        (4 << 20) as f64
    );
    assert!(must(&a, "vdrep_fuse_requests_total", &[("op", "write")]) >= 1.0);
    let writes = must(
        &a,
        "vdrep_fuse_request_duration_seconds_count",
        &[("op", "write")],
    );
    assert_eq!(
        must(
            &a,
            "vdrep_fuse_request_duration_seconds_bucket",
            &[("op", "write"), ("le", "+Inf")]
        ),
        writes
    );
    // A boot check kept with a point (as `verify --boot` keeps it): the
    // newest one per VM is in the receiver's metrics. (`web` is no libvirt
    // domain, so the scheduled `verify_boot` leaves it alone.)
    let checks = p("store/verify/site-a/web");
    std::fs::create_dir_all(&checks).unwrap();
    for (cycle, at, ok, secs) in [
        (1, 1_000_000_000u64, true, 9.5),
        (2, 2_000_000_000, false, 12.5),
    ] {
        std::fs::write(
            checks.join(format!("{cycle}.json")),
            format!(
                "{{\"cycle\":{cycle},\"verified\":{ok},\"secs\":{secs},\"at_unix_ns\":{at},\"detail\":\"no answer\",\"ready\":\"guest agent (guest-ping)\"}}"
            ),
        )
        .unwrap();
    }
    let b = scrape(&maddr_b);
    let web_b = [("site", "site-a"), ("vm", "web")];
    assert_eq!(must(&b, "vdrep_receiver_boot_verified", &web_b), 0.0);
    assert_eq!(must(&b, "vdrep_receiver_boot_ready_seconds", &web_b), 12.5);
    assert_eq!(
        must(&b, "vdrep_receiver_boot_check_timestamp_seconds", &web_b),
        2.0
    );
    assert!(
        must(
            &b,
            "vdrep_receiver_points",
            &[("site", "site-a"), ("vm", "web")]
        ) >= 1.0
    );
    assert!(must(&b, "vdrep_receiver_connections", &[]) >= 1.0);
    assert!(must(&b, "vdrep_receiver_apply_duration_seconds_count", &[]) >= 1.0);
    // The store is walked in the background (every 200 ms here, see
    // `Receiver::start`), and the time the walk began is reported beside
    // the size: a walk begun now counts the copy and the write above.
    let copied = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let store_bytes = wait_for(30, "a walk of the store begun after the copy", || {
        let b = scrape(&maddr_b);
        let at = value(&b, "vdrep_receiver_store_measured_timestamp_seconds", &[])?;
        (at >= copied).then(|| must(&b, "vdrep_receiver_store_bytes", &[]))
    });
    assert!(store_bytes >= (64 << 10) as f64, "store {store_bytes}");
    let newest = must(
        &b,
        "vdrep_receiver_last_point_timestamp_seconds",
        &[("site", "site-a"), ("vm", "web")],
    );
    assert!(
        (newest - last).abs() < 5.0,
        "receiver {newest}, sender {last}"
    );
    // Points committed on durable logs not applied yet: counted, and the
    // newest point every replica holds. Once none is pending (the apply
    // after the commit is done), that is the newest point.
    let web = [("site", "site-a"), ("vm", "web")];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let b = scrape(&maddr_b);
        let pending = must(&b, "vdrep_receiver_points_pending_apply", &web);
        let newest = must(&b, "vdrep_receiver_last_point_timestamp_seconds", &web);
        let applied = value(
            &b,
            "vdrep_receiver_last_applied_point_timestamp_seconds",
            &web,
        );
        assert!(pending >= 0.0);
        assert!(applied.is_none_or(|a| a <= newest), "{applied:?} {newest}");
        if pending == 0.0 {
            assert_eq!(applied, Some(newest));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} point(s) still not applied after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The receiver stops; a writer keeps changing the disk.
    let follow = Follower::start(&vm);
    let mut writer = Writer::start(f);
    rcv.stop();
    let st = wait_for(60, "web to show Warning \"RPO exceeded\"", || {
        let s = web_status(&m);
        (s["state"] == "Warning" && s["health"]["alert"] == "rpo_exceeded").then_some(s)
    });
    assert_eq!(st["health"]["rpo_alert_secs"], 3, "{st}");
    let text = vdrep_ok(&["status", vm.to_str().unwrap()]);
    assert!(text.contains("RPO exceeded"), "{text}");
    let a = scrape(&maddr_a);
    assert_eq!(
        must(
            &a,
            "vdrep_vm_alert",
            &[("vm", "web"), ("alert", "rpo_exceeded")]
        ),
        1.0
    );
    assert_eq!(
        must(&a, "vdrep_vm_state", &[("vm", "web"), ("state", "warning")]),
        1.0
    );
    assert!(must(&a, "vdrep_vm_lag_seconds", &[("vm", "web")]) > 3.0);

    // The notify_command got the event on stdin; `vdrep events` lists it.
    let raised = wait_for(20, "notify_command to get alert_raised", || {
        let t = std::fs::read_to_string(&notified).unwrap_or_default();
        events_of(&t, "alert_raised").into_iter().next()
    });
    assert_eq!(raised["reason"], "RPO exceeded", "{raised}");
    assert_eq!(raised["alert"], "rpo_exceeded", "{raised}");
    assert!(raised["lag_secs"].as_f64().unwrap() > 3.0, "{raised}");
    assert_eq!(raised["threshold_secs"], 3.0, "{raised}");
    let listed = vdrep_ok(&["events", "--json", vm.to_str().unwrap()]);
    let seqs: Vec<u64> = events_of(&listed, "alert_raised")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.contains(&raised["seq"].as_u64().unwrap()), "{listed}");
    assert!(
        events_of(&listed, "state_changed")
            .iter()
            .any(|e| e["from"] == "Normal" && e["to"] == "Warning"),
        "{listed}"
    );
    assert!(
        !events_of(&listed, "point_committed").is_empty(),
        "{listed}"
    );
    assert!(
        !events_of(&listed, "protection_started").is_empty(),
        "{listed}"
    );
    let plain = vdrep_ok(&["events", vm.to_str().unwrap()]);
    assert!(
        plain.contains("alert_raised vm:web alert:rpo_exceeded reason:\"RPO exceeded\""),
        "{plain}"
    );
    wait_for(20, "events --follow to stream alert_raised", || {
        (!events_of(&follow.text(), "alert_raised").is_empty()).then_some(())
    });

    // The receiver is back: the alert clears, and says so.
    let _rcv = Receiver::start(&dr, &p("recv2.log"));
    wait_for(90, "web back to Normal without alert", || {
        let s = web_status(&m);
        (s["state"] == "Normal" && s["health"]["alert"].is_null()).then_some(())
    });
    // The metrics say so too (polled: on a loaded machine one late cut
    // may raise the alert again for a moment).
    let a = wait_for(30, "the metrics to show the alert cleared", || {
        let a = scrape(&maddr_a);
        let alert = value(
            &a,
            "vdrep_vm_alert",
            &[("vm", "web"), ("alert", "rpo_exceeded")],
        );
        let normal = value(&a, "vdrep_vm_state", &[("vm", "web"), ("state", "normal")]);
        let lag = value(&a, "vdrep_vm_lag_seconds", &[("vm", "web")]);
        (alert == Some(0.0) && normal == Some(1.0) && lag.is_some_and(|l| l < 3.0)).then_some(a)
    });
    assert!(
        a.iter().any(|s| s.name == "vdrep_vm_errors_total"
            && s.labels.get("kind").is_some()
            && s.value >= 1.0),
        "an error kind was counted"
    );
    let cleared = wait_for(20, "notify_command to get alert_cleared", || {
        let t = std::fs::read_to_string(&notified).unwrap_or_default();
        events_of(&t, "alert_cleared").into_iter().next()
    });
    assert!(
        cleared["seq"].as_u64() > raised["seq"].as_u64(),
        "{cleared}"
    );
    assert_eq!(cleared["reason"], "RPO exceeded");
    let listed = vdrep_ok(&["events", "--json", vm.to_str().unwrap()]);
    assert!(!events_of(&listed, "alert_cleared").is_empty(), "{listed}");
    wait_for(20, "events --follow to stream alert_cleared", || {
        (!events_of(&follow.text(), "alert_cleared").is_empty()).then_some(())
    });
    writer.stop();

    // The primary's failover steps are events too: fence and unfence (as a
    // planned failover, cancelled, takes them).
    for on in [true, false] {
        let r = vdrep::daemon::control::call_ok(
            &vm,
            &vdrep::daemon::control::Request::Fence {
                vm: "web".into(),
                on,
                peek: false,
            },
        );
        assert!(r.is_ok(), "fence {on}: {r:?}");
    }
    let listed = vdrep_ok(&["events", "--json", vm.to_str().unwrap()]);
    let steps: Vec<String> = events_of(&listed, "failover_step")
        .iter()
        .map(|e| format!("{} {}", e["step"].as_str().unwrap(), e["disks"]))
        .collect();
    assert_eq!(
        steps,
        ["fenced [\"web.raw\"]", "unfenced [\"web.raw\"]"],
        "{listed}"
    );

    // The receiver's failover steps: a test failover and its cleanup.
    let store = p("store");
    let store = store.to_str().unwrap();
    vdrep_ok(&["failover", "web", "--test", "--store", store]);
    vdrep_ok(&["failover", "web", "--cleanup", "--store", store]);
    let listed = vdrep_ok(&["events", "--store", store, "--json"]);
    let steps: Vec<String> = events_of(&listed, "failover_step")
        .iter()
        .map(|e| format!("{} {}", e["step"].as_str().unwrap(), e["site"]))
        .collect();
    assert_eq!(
        steps,
        ["test_started \"site-a\"", "test_cleaned_up \"site-a\""],
        "{listed}"
    );
    let got = wait_for(20, "the receiver's notify_command", || {
        let t = std::fs::read_to_string(&rnotified).unwrap_or_default();
        (events_of(&t, "failover_step").len() == 2).then_some(t)
    });
    assert!(got.contains("\"step\":\"test_cleaned_up\""), "{got}");
    drop(follow);
    drop(m);
}

/// Serve one HTTP request on `l` with `status`; the request as received.
fn serve_one(l: std::net::TcpListener, status: &'static str) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Head, then as many body bytes as Content-Length says.
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed early");
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        String::from_utf8_lossy(&req).into_owned()
    })
}

/// examples/notify-webhook.sh, as `notify_command` runs it: the event on
/// stdin is POSTed as JSON; a webhook that fails makes it fail.
#[test]
fn the_webhook_example_posts_the_event() {
    // The run folder is set once for the binary, before anything spawns.
    setup();
    if !have("curl") {
        skip::skip("SKIP: curl is absent (apt-get install curl)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/notify-webhook.sh");
    let event = r#"{"seq":3,"unix_ns":1,"vm":"web","event":"alert_raised","alert":"rpo_exceeded","reason":"RPO exceeded","lag_secs":4.2,"threshold_secs":3.0}"#;
    let post = |status: &'static str| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let server = serve_one(l, status);
        let mut sh = Command::new("sh")
            .arg(&script)
            .arg(&url)
            .env("VDREP_WEBHOOK_HEADER", "Authorization: Bearer t0k")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        writeln!(sh.stdin.take().unwrap(), "{event}").unwrap();
        let ok = sh.wait().unwrap().success();
        (ok, server.join().unwrap())
    };
    let (ok, req) = post("200 OK");
    assert!(ok, "the script failed against a 200 webhook");
    assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
    let lower = req.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/json\r\n"),
        "{req}"
    );
    assert!(req.contains("Authorization: Bearer t0k\r\n"), "{req}");
    let body = req.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body.trim_end(), event);
    let (ok, _) = post("500 Internal Server Error");
    assert!(
        !ok,
        "a failing webhook must fail the command (vdrep logs it)"
    );
}
