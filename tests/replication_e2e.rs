//! Replication between two processes on loopback: `vdrep mount --keys` +
//! `vdrep protect` at the primary, `vdrep receive` at the secondary, real
//! QUIC with mutual TLS. Needs root and /dev/fuse (CI has both).

mod mountutil;
mod skip;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mountutil::*;

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["ka", "kb", "vm", "store"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        vdrep_ok(&[
            "keys",
            "init",
            "--name",
            "site-a",
            "--out",
            root.join("ka").to_str().unwrap(),
        ]);
        vdrep_ok(&[
            "keys",
            "init",
            "--name",
            "site-b",
            "--out",
            root.join("kb").to_str().unwrap(),
        ]);
        Site { _tmp: tmp, root }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }
    fn s(&self, s: &str) -> String {
        self.p(s).to_str().unwrap().to_string()
    }
    fn mount(&self) -> Mounted {
        Mounted::new(&self.p("vm"), &["--keys", &self.s("ka")])
    }
    /// Replica file of the disk named `name` (file name of the replica).
    fn replica(&self, name: &str) -> PathBuf {
        let disks = self.p("store/sites/site-a/vms/vm1/disks");
        for d in std::fs::read_dir(&disks).unwrap().flatten() {
            let p = d.path().join(name);
            if p.exists() {
                mountutil::wait_applied(&d.path());
                return p;
            }
        }
        panic!("no replica {name} under {}", disks.display());
    }
    /// The points of vm1 (`points.json` and its journal), if it has any.
    fn points_or_none(&self) -> Option<serde_json::Value> {
        let pts = vdrep::replica::points_in(&self.p("store/sites/site-a/vms/vm1")).ok()?;
        (!pts.is_empty()).then(|| serde_json::json!({ "points": pts }))
    }
    fn points(&self) -> serde_json::Value {
        let pts = vdrep::replica::points_in(&self.p("store/sites/site-a/vms/vm1")).unwrap();
        serde_json::json!({ "points": pts })
    }
}

impl Receiver {
    fn start(site: &Site, addr: &str, store: &Path) -> Receiver {
        Receiver::start_env(site, addr, store, &[])
    }
    fn start_env(site: &Site, addr: &str, store: &Path, env: &[(&str, &str)]) -> Receiver {
        Receiver::spawn(
            addr,
            store,
            &site.p("kb"),
            &site.p("ka/site-a.crt"),
            &[],
            env,
        )
    }
}

fn protect(site: &Site, r: &Receiver, every: &str, disks: &[&str]) {
    protect_with(site, r, every, disks, &[]);
}

fn protect_with(site: &Site, r: &Receiver, every: &str, disks: &[&str], extra: &[&str]) {
    let mut args = vec![
        "protect".to_string(),
        "vm1".into(),
        "--to".into(),
        r.addr.clone(),
        "--trust".into(),
        site.s("kb/site-b.crt"),
        "--every".into(),
        every.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    for d in disks {
        args.push(site.s(&format!("vm/{d}")));
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    vdrep_ok(&a);
}

/// Sync every VM of the site's mount (test binaries run in parallel and
/// each protects a VM named vm1, so sync by folder, not by name).
/// Wait until the initial copy has sent `bytes` (the receiver lags by at
/// most the QUIC window, 64 MiB, and makes progress durable every 64 MiB).
fn wait_initial_sent(m: &Mounted, bytes: u64) {
    for _ in 0..600 {
        let st = m.status_json();
        if st["replication"][0]["initial_done"].as_u64().unwrap_or(0) >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the initial copy never reached {} MiB", bytes >> 20);
}

fn sync(site: &Site, timeout: u64) -> std::process::Output {
    vdrep(&["sync", &site.s("vm"), "--timeout", &timeout.to_string()])
}

fn sync_ok(site: &Site) {
    let o = sync(site, 120);
    assert!(
        o.status.success(),
        "sync failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn same(a: &Path, fa: &str, b: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            "vpc",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
}

fn random_file(p: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = vec![0u8; bytes];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = c.len();
        c.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    std::fs::write(p, v).unwrap();
}

/// qemu-io and a random writer (running during the initial copy) through
/// the mount; after `vdrep sync` both replicas equal their sources.
#[test]
fn sync_makes_replicas_equal_to_sources() {
    require_fuse!();
    let site = Site::new();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            &site.s("vm/disk.vhd"),
            "64M",
        ],
    );
    std::fs::File::create(site.p("vm/data.img"))
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x5a 1M 64k",
            &site.s("vm/disk.vhd"),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stop, path) = (stop.clone(), site.p("vm/data.img"));
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut x = 7u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                f.write_all_at(
                    &[(n % 250) as u8 + 1; 4096],
                    (x >> 20) % ((48 << 20) / 4096) * 4096,
                )
                .unwrap();
                n += 1;
            }
            n
        })
    };
    protect(&site, &r, "1h", &["disk.vhd", "data.img"]);
    sync_ok(&site);
    stop.store(true, Ordering::Relaxed);
    assert!(w.join().unwrap() > 0);
    run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x33 20M 1M",
            "-c",
            "write -z 1M 32k",
            &site.s("vm/disk.vhd"),
        ],
    );
    sync_ok(&site);
    let rv = site.replica("disk.vhd");
    same(&site.p("vm/disk.vhd"), "vpc", &rv);
    run(
        "cmp",
        &[site.s("vm/disk.vhd").as_str(), rv.to_str().unwrap()],
    );
    same(&site.p("vm/data.img"), "raw", &site.replica("data.vhd"));
    let st = m.status_once(|st| st["replication"][0]["state"] == "Normal");
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    // Every point holds both disks (one cut per point).
    for p in site.points()["points"].as_array().unwrap() {
        assert_eq!(p["disks"].as_array().unwrap().len(), 2, "{p}");
    }
    m.umount();
}

/// kill -9 of the receiver during the initial copy and during a delta:
/// the sender retries, the replica converges, nothing acknowledged is lost.
#[test]
fn receiver_killed_during_initial_copy_and_delta_converges() {
    require_fuse!();
    let site = Site::new();
    random_file(&site.p("vm/big.img"), 192 << 20, 42);
    // Fast retries for the test (the schedule is 1,2,4,8,10,30 min x scale).
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let mut r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    let addr = r.addr.clone();
    // 64 MiB/s: the kill lands mid-copy, after the receiver made the first
    // 64 MiB durable.
    protect_with(&site, &r, "1h", &["big.img"], &["--max-rate", "64M"]);
    // 140 MiB sent: at least 76 MiB received, 64 MiB durable.
    wait_initial_sent(&m, 140 << 20);
    r.kill9();
    r = Receiver::start(&site, &addr, &site.p("store"));
    sync_ok(&site);
    same(&site.p("vm/big.img"), "raw", &site.replica("big.vhd"));
    // Resumed, not restarted: far less than two full copies went out.
    let sent = m.status_json()["replication"][0]["bytes_sent"]
        .as_u64()
        .unwrap();
    println!(
        "initial copy of 192 MiB with a receiver crash: {} MiB sent",
        sent >> 20
    );
    assert!(
        sent < 300 << 20,
        "{} MiB sent: the copy restarted from zero",
        sent >> 20
    );
    // A delta in flight when the receiver dies.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/big.img"))
        .unwrap();
    for i in 0..2000u64 {
        f.write_all_at(&[(i % 200) as u8 + 3; 8192], (i * 7919 % 20000) * 8192)
            .unwrap();
    }
    drop(f);
    let vmdir = site.s("vm");
    let bg = std::thread::spawn(move || vdrep(&["sync", &vmdir, "--timeout", "120"]));
    std::thread::sleep(Duration::from_millis(150));
    r.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let _r = Receiver::start(&site, &addr, &site.p("store"));
    let o = bg.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sync_ok(&site);
    same(&site.p("vm/big.img"), "raw", &site.replica("big.vhd"));
    m.umount();
}

/// kill -9 of the sender (the mount daemon) during the initial copy: after a
/// remount the protection resumes by itself and the replica converges.
#[test]
fn sender_killed_during_initial_copy_converges() {
    require_fuse!();
    let site = Site::new();
    random_file(&site.p("vm/s.img"), 128 << 20, 7);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let _r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    protect(&site, &_r, "1h", &["s.img"]);
    std::thread::sleep(Duration::from_millis(300));
    let pid = m.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vdrep_ok(&["umount", &site.s("vm")]);
    m.mounted = false;
    let mut m = site.mount();
    // The disk needs a resync (unclean stop); protection resumed from its
    // saved spec and a full copy replaces the resync.
    sync_ok(&site);
    same(&site.p("vm/s.img"), "raw", &site.replica("s.vhd"));
    let st = m.status_json();
    assert_eq!(st["disks"][0]["state"]["state"], "Normal", "{st}");
    m.umount();
}

/// An untrusted sender is refused with a clear reason; a trusted sender that
/// names paths outside its namespace gets an error and writes nothing there.
#[test]
fn untrusted_peer_and_path_escapes_are_refused() {
    require_fuse!();
    let site = Site::new();
    let r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    // Untrusted: a third identity.
    std::fs::create_dir_all(site.p("kc")).unwrap();
    vdrep_ok(&["keys", "init", "--name", "site-c", "--out", &site.s("kc")]);
    std::fs::File::create(site.p("vm/u.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut m = Mounted::new(&site.p("vm"), &["--keys", &site.s("kc")]);
    let o = vdrep(&[
        "protect",
        "vmx",
        "--to",
        &r.addr,
        "--trust",
        &site.s("kb/site-b.crt"),
        &site.s("vm/u.img"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not trusted") && err.contains("site-c"),
        "{err}"
    );
    m.umount();
    // Path escapes from a trusted peer, straight on the wire.
    let before = list_tree(&site.root);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use vdrep::transport;
        use vdrep::wire::{self, Msg};
        let id = transport::keys::Identity::from_dir(&site.p("ka"), None).unwrap();
        let trust = transport::trust::TrustStore::from_files(&[site.p("kb/site-b.crt")]).unwrap();
        let ep = transport::client(&id, &trust).unwrap();
        let conn = transport::connect(&ep, r.addr.parse().unwrap(), "vdrep")
            .await
            .unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        wire::write_msg(
            &mut tx,
            &Msg::Hello(wire::Hello {
                protocol_version: wire::PROTOCOL_VERSION,
                site_name: "mallory".into(),
                software_version: "t".into(),
            }),
        )
        .await
        .unwrap();
        assert!(matches!(
            wire::read_msg(&mut rx).await.unwrap(),
            Some(Msg::HelloOk(_))
        ));
        for (vm, disk) in [
            ("../x", "d.img"),
            ("/abs", "d.img"),
            ("vm1", "../../x.img"),
            ("vm1", "/etc/passwd"),
            ("..", "d.img"),
            ("vm1", "a/../../b.img"),
        ] {
            let (mut tx, mut rx) = conn.open_bi().await.unwrap();
            // The encoder refuses these names itself; send raw frames too.
            let msg = Msg::OpenDisk(wire::OpenDisk {
                vm: vm.into(),
                disk_name: disk.into(),
                disk_id: [9; 16],
                block_size: 4096,
                disk_size: 1 << 20,
                kind: wire::DiskKind::Raw,
            });
            let mut buf = Vec::new();
            if wire::encode(&msg, &mut buf).is_err() {
                buf = raw_open_disk(vm, disk);
            }
            tx.write_all(&buf).await.unwrap();
            match wire::read_msg(&mut rx).await {
                Ok(Some(Msg::Error(e))) => assert!(!e.retryable, "{vm}/{disk}: {e:?}"),
                Ok(None) | Err(_) => {} // stream reset: refused at decode
                Ok(Some(other)) => panic!("{vm}/{disk} was accepted: {other:?}"),
            }
        }
        conn.close(0u32.into(), b"done");
    });
    let after = list_tree(&site.root);
    let new: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(
        new.iter().all(|p| p.contains("store/sites/site-a")),
        "files created outside the namespace: {new:?}"
    );
}

/// `protect` checks the receiver (handshake, `Hello`, the disks opened)
/// and the VM's worker runs its copy on that same connection: a receiver
/// the sender does not trust and a receiver that does not trust the sender
/// are still refused before `protect` returns, as typed errors (fatal
/// authentication failures), with nothing protected; a trusted receiver
/// accepts one connection in all, and the replica equals the source.
#[test]
fn protect_copies_over_its_checked_connection_and_still_refuses_bad_keys() {
    require_fuse!();
    let site = Site::new();
    std::fs::create_dir_all(site.p("kc")).unwrap();
    vdrep_ok(&["keys", "init", "--name", "site-c", "--out", &site.s("kc")]);
    let maddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let r = Receiver::spawn(
        "127.0.0.1:0",
        &site.p("store"),
        &site.p("kb"),
        &site.p("ka/site-a.crt"),
        &["--metrics-listen", &maddr],
        &[],
    );
    // A receiver that trusts only site-c.
    std::fs::create_dir_all(site.p("store2")).unwrap();
    let r2 = Receiver::spawn(
        "127.0.0.1:0",
        &site.p("store2"),
        &site.p("kb"),
        &site.p("kc/site-c.crt"),
        &[],
        &[],
    );
    random_file(&site.p("vm/d.img"), 3 << 20, 11);
    let mut m = site.mount();
    let refused = |to: &str, trust: &str, why: &str| {
        let o = vdrep(&[
            "protect",
            "vm1",
            "--to",
            to,
            "--trust",
            trust,
            &site.s("vm/d.img"),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("cannot protect vm1")
                && err.contains("is not usable")
                && err.contains("authentication failed")
                && err.contains(why),
            "{err}"
        );
    };
    // The sender does not trust the receiver's certificate (it names
    // site-c's), then the receiver does not trust the sender's.
    refused(
        &r.addr,
        &site.s("kc/site-c.crt"),
        "add its certificate with --trust",
    );
    refused(
        &r2.addr,
        &site.s("kb/site-b.crt"),
        "refused our certificate",
    );
    let st = m.status_json();
    assert!(
        st["replication"].as_array().is_none_or(|v| v.is_empty()),
        "a refused protect left a VM behind: {st}"
    );
    assert!(!site.p("store/sites").exists() || site.points_or_none().is_none());

    protect(&site, &r, "1h", &["d.img"]);
    sync_ok(&site);
    same(&site.p("vm/d.img"), "raw", &site.replica("d.vhd"));
    let metrics = scrape(&maddr);
    let accepted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vdrep_receiver_connections_accepted_total "))
        .unwrap_or_else(|| panic!("no connection counter in {metrics}"));
    assert_eq!(
        accepted.trim(),
        "1",
        "protect's check and the worker's copy should share one connection"
    );
    m.umount();
}

/// The receiver's metrics, as text.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

/// OpenDisk frame built by hand (bypassing the encoder's name checks).
fn raw_open_disk(vm: &str, disk: &str) -> Vec<u8> {
    let mut p = vec![0x10u8];
    for s in [vm, disk] {
        p.extend_from_slice(&(s.len() as u16).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
        if s == vm {
            continue;
        }
    }
    // vm, disk_name, then id, block_size, disk_size, kind
    let mut q = vec![0x10u8];
    q.extend_from_slice(&(vm.len() as u16).to_le_bytes());
    q.extend_from_slice(vm.as_bytes());
    q.extend_from_slice(&(disk.len() as u16).to_le_bytes());
    q.extend_from_slice(disk.as_bytes());
    q.extend_from_slice(&[9u8; 16]);
    q.extend_from_slice(&4096u32.to_le_bytes());
    q.extend_from_slice(&(1u64 << 20).to_le_bytes());
    q.push(2);
    let _ = p;
    let mut f = (q.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&q);
    f
}

fn list_tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.to_string_lossy().into_owned());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The receiver's store fills up: a recoverable error (Warning, retried),
/// then success once space is freed, and a replica equal to the source.
#[test]
fn receiver_disk_full_is_retried_until_space_is_freed() {
    require_fuse!();
    let site = Site::new();
    let store = site.p("small");
    std::fs::create_dir_all(&store).unwrap();
    if !Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=24m",
            "tmpfs",
            store.to_str().unwrap(),
        ])
        .status()
        .unwrap()
        .success()
    {
        skip::skip("SKIP: cannot mount a tmpfs");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Unmount(store.clone());
    random_file(&site.p("vm/f.img"), 40 << 20, 3);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0", &store);
    // Enabling protection warns that the store looks too small.
    let o = vdrep(&[
        "protect",
        "vm1",
        "--to",
        &r.addr,
        "--trust",
        &site.s("kb/site-b.crt"),
        "--every",
        "1h",
        &site.s("vm/f.img"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(
        warn.contains("may run out of space"),
        "no space warning: {warn}"
    );
    let o = sync(&site, 4);
    assert!(
        !o.status.success(),
        "a 40 MiB replica fit in a 24 MiB store?"
    );
    // `sync` may give up (4 s) before the copy reaches the store's limit on
    // a loaded host: wait for the failed cycle to show.
    let t0 = std::time::Instant::now();
    let rep = loop {
        let st = m.status_json();
        let rep = st["replication"][0].clone();
        if rep["state"] == "Warning" || t0.elapsed() > std::time::Duration::from_secs(90) {
            break rep;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(rep["state"], "Warning", "{rep}");
    let e = rep["last_error"].as_str().unwrap_or("").to_lowercase();
    assert!(e.contains("space") || e.contains("full"), "{rep}");
    run(
        "mount",
        &["-o", "remount,size=256m", store.to_str().unwrap()],
    );
    sync_ok(&site);
    let disk = std::fs::read_dir(store.join("sites/site-a/vms/vm1/disks"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    mountutil::wait_applied(&disk);
    same(&site.p("vm/f.img"), "raw", &disk.join("f.vhd"));
    m.umount();
}

/// An outage of the receiver: writes keep being tracked, replication resumes
/// when it returns, without a resync (the recovery history is kept).
#[test]
fn outage_resumes_without_resync() {
    require_fuse!();
    let site = Site::new();
    random_file(&site.p("vm/o.img"), 16 << 20, 11);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let mut r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    let addr = r.addr.clone();
    protect(&site, &r, "1h", &["o.img"]);
    sync_ok(&site);
    let points_before = site.points()["points"].as_array().unwrap().len();
    r.kill9();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/o.img"))
        .unwrap();
    for i in 0..300u64 {
        f.write_all_at(&[0xee; 4096], (i * 13 % 4096) * 4096)
            .unwrap();
    }
    drop(f);
    let o = sync(&site, 3);
    assert!(!o.status.success(), "sync succeeded with the receiver down");
    // The sender notices the dead receiver (QUIC idle timeout) and retries.
    let mut st = m.status_json();
    for _ in 0..100 {
        if st["replication"][0]["state"] == "Warning" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        st = m.status_json();
    }
    assert_eq!(st["replication"][0]["state"], "Warning", "{st}");
    assert!(st["replication"][0]["bytes_pending"].as_u64().unwrap() > 0);
    let _r = Receiver::start(&site, &addr, &site.p("store"));
    sync_ok(&site);
    same(&site.p("vm/o.img"), "raw", &site.replica("o.vhd"));
    let points_after = site.points()["points"].as_array().unwrap().len();
    assert!(
        points_after > points_before,
        "history lost: {points_before} -> {points_after} points (a full re-copy drops it)"
    );
    m.umount();
}

/// kill -9 of the sender while a delta is being shipped: nothing the
/// receiver acknowledged is lost (its history is intact), and after a
/// remount the replica converges again.
#[test]
fn sender_killed_during_delta_converges() {
    require_fuse!();
    let site = Site::new();
    random_file(&site.p("vm/d.img"), 64 << 20, 5);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let _r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    protect_with(&site, &_r, "1h", &["d.img"], &["--max-rate", "32M"]);
    sync_ok(&site);
    let acked = site.points()["points"].as_array().unwrap().len();
    random_file(&site.p("scratch"), 48 << 20, 9);
    let data = std::fs::read(site.p("scratch")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/d.img"))
        .unwrap()
        .write_all_at(&data, 8 << 20)
        .unwrap();
    let vmdir = site.s("vm");
    let bg = std::thread::spawn(move || vdrep(&["sync", &vmdir, "--timeout", "60"]));
    std::thread::sleep(Duration::from_millis(700));
    let pid = m.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let o = bg.join().unwrap();
    assert!(!o.status.success(), "sync cannot succeed: the sender died");
    std::thread::sleep(Duration::from_millis(300));
    vdrep_ok(&["umount", &site.s("vm")]);
    m.mounted = false;
    // The receiver kept every point it acknowledged.
    assert!(site.points()["points"].as_array().unwrap().len() >= acked);
    let mut m = site.mount();
    sync_ok(&site);
    same(&site.p("vm/d.img"), "raw", &site.replica("d.vhd"));
    m.umount();
}

/// A clean unmount in the middle of the initial copy: after the remount the
/// copy resumes from the receiver's durable offset instead of starting over.
#[test]
fn clean_restart_during_initial_copy_resumes() {
    require_fuse!();
    let site = Site::new();
    random_file(&site.p("vm/c.img"), 192 << 20, 13);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let _r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    protect_with(&site, &_r, "1h", &["c.img"], &["--max-rate", "48M"]);
    wait_initial_sent(&m, 140 << 20);
    m.umount();
    let mut m = site.mount();
    sync_ok(&site);
    same(&site.p("vm/c.img"), "raw", &site.replica("c.vhd"));
    let sent = m.status_json()["replication"][0]["bytes_sent"]
        .as_u64()
        .unwrap();
    println!(
        "after the restart: {} MiB sent for a 192 MiB disk",
        sent >> 20
    );
    assert!(
        sent < 170 << 20,
        "{} MiB sent after the restart: the copy started over",
        sent >> 20
    );
    m.umount();
}

/// The receiver dies after it applied (and acknowledged) every log of a
/// cycle but before it recorded the recovery point (`VDREP_CRASH_AT=
/// point-before-commit`). The restarted receiver has the replica at that
/// cycle and no point for it; the sender must commit the point again when
/// it reconnects, so the waiting `vdrep sync` returns (with `--every 1h`
/// nothing else would cut for an hour) and the point is listed.
#[test]
fn receiver_dying_between_ack_and_point_commit_loses_no_point() {
    require_fuse!();
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let site = Site::new();
    std::fs::File::create(site.p("vm/data.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    let addr = r.addr.clone();
    protect(&site, &r, "1h", &["data.img"]);
    sync_ok(&site);
    let mut r = rearm_receiver(&site, r, &addr, "point-before-commit");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/data.img"))
        .unwrap();
    write_64_blocks(&f, 1);
    drop(f);
    // The receiver aborts at the point commit.
    let _r = sync_through_a_receiver_abort(&site, &mut r, &addr, "the point commit");
    let pts = vdrep_ok(&["points", "vm1", "--store", &site.s("store"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&pts).unwrap();
    // The cycle whose commit was lost is a point: no gap in the history.
    let mut cycles: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cycle"].as_u64().unwrap())
        .collect();
    cycles.sort();
    assert!(cycles.len() >= 2, "{pts}");
    assert!(
        cycles.windows(2).all(|w| w[1] == w[0] + 1),
        "a point is missing: {cycles:?}"
    );
    m.umount();
}

/// The receiver dies in the middle of applying a log (its state says
/// "applying"). The reconnecting sender must not take the disk for one
/// without a replica: a full copy would end the VM's history. Before the
/// fix the receiver answered cycle 0 for a disk mid-apply, the sender
/// copied it whole and every earlier point was dropped (seen in
/// libvirt_e2e after a quick reconnect).
#[test]
fn receiver_dying_in_the_middle_of_an_apply_keeps_the_history() {
    require_fuse!();
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let site = Site::new();
    std::fs::File::create(site.p("vm/data.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    let addr = r.addr.clone();
    protect(&site, &r, "1h", &["data.img"]);
    sync_ok(&site);
    let write = |round: u8| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(site.p("vm/data.img"))
            .unwrap();
        write_64_blocks(&f, round);
    };
    write(1);
    sync_ok(&site);
    let before = points_of(&site);
    assert!(before.len() >= 2, "{before:?}");
    let mut r = rearm_receiver(&site, r, &addr, "replica-half");
    write(101);
    let _r = sync_through_a_receiver_abort(&site, &mut r, &addr, "the middle of the apply");
    let after = points_of(&site);
    for c in &before {
        assert!(
            after.contains(c),
            "point {c} was dropped by the reconnect: {before:?} -> {after:?}"
        );
    }
    m.umount();
}

/// The receiver applies a log and dies before its acknowledgement
/// (`VDREP_CRASH_AT=after-apply`); while it is down the disk's pending
/// changes pass the resync threshold (the 50% rule folds logs into the
/// bitmap). The log the receiver may already hold is kept, so when it is
/// back the disk continues from the replica's cycle: no checksum resync.
/// Before, that log was folded too, the sender's base fell one cycle
/// behind the replica and every such blip ended in a resync of the disk.
#[test]
fn changes_past_the_threshold_after_an_unacknowledged_apply_need_no_resync() {
    threshold_after_an_unacknowledged_apply(false);
}

/// The same with the mount's daemon restarted between the unacknowledged
/// apply and the fold: the new worker cannot know which logs the old one
/// submitted, so it must keep the oldest (the only one that can be in
/// flight), not fold it.
#[test]
fn a_restart_between_an_unacknowledged_apply_and_the_fold_needs_no_resync() {
    threshold_after_an_unacknowledged_apply(true);
}

fn threshold_after_an_unacknowledged_apply(restart: bool) {
    require_fuse!();
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let site = Site::new();
    random_file(&site.p("vm/data.img"), 16 << 20, 21);
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0", &site.p("store"));
    let addr = r.addr.clone();
    protect_with(
        &site,
        &r,
        "1h",
        &["data.img"],
        &["--resync-threshold", "10%"],
    );
    sync_ok(&site);
    let mut r = rearm_receiver(&site, r, &addr, "after-apply");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/data.img"))
        .unwrap();
    write_64_blocks(&f, 7);
    let vmdir = site.s("vm");
    let bg = std::thread::spawn(move || vdrep(&["sync", &vmdir, "--timeout", "90"]));
    let t0 = std::time::Instant::now();
    while r.child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the receiver never applied the log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Applied there, not acknowledged.
    if restart {
        // The sync in flight loses its daemon: only the later one counts.
        vdrep_ok(&["restart", &site.s("vm")]);
    }
    // 2 MiB more (incompressible): the pending changes pass 10% of 16 MiB
    // and the cut folds the logs.
    random_file(&site.p("scratch"), 2 << 20, 22);
    let noise = std::fs::read(site.p("scratch")).unwrap();
    f.write_all_at(&noise, 6 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let o = vdrep(&["cut", &site.s("vm")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bitmap-only"), "{err}");
    let _next = Receiver::start(&site, &addr, &site.p("store"));
    // After a restart the sync started before it may have lost its daemon:
    // only the sync below counts then.
    if !restart {
        let o = bg.join().unwrap();
        assert!(
            o.status.success(),
            "sync: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    sync_ok(&site);
    same(&site.p("vm/data.img"), "raw", &site.replica("data.vhd"));
    let st = m.status_once(|st| st["replication"][0]["state"] == "Normal");
    let vm = &st["replication"][0];
    assert_eq!(vm["state"], "Normal", "{st}");
    assert!(
        vm["last_resync"].is_null(),
        "the blip cost a checksum resync: {st}"
    );
    m.umount();
}

/// Kill receiver `r` (-9) and start it again at the same address and
/// store, armed to abort at `VDREP_CRASH_AT` step `at`.
fn rearm_receiver(site: &Site, r: Receiver, addr: &str, at: &str) -> Receiver {
    let mut r = r;
    // The last `sync` returned once its point was committed on durable
    // logs; let their apply end first, or the restarted receiver's
    // recovery would apply them and meet the crash step itself.
    let _ = site.replica("data.vhd");
    r.kill9();
    Receiver::start_env(site, addr, &site.p("store"), &[("VDREP_CRASH_AT", at)])
}

/// Write 64 blocks of 4 KiB, one every 64 KiB, each filled with
/// `first + i`, into `f`.
fn write_64_blocks(f: &std::fs::File, first: u8) {
    for i in 0..64u64 {
        f.write_all_at(&[first.wrapping_add(i as u8); 4096], i * 65536)
            .unwrap();
    }
}

/// `vdrep sync` while receiver `r` (started with a `VDREP_CRASH_AT` step
/// named by `step`) aborts; a new receiver on `addr` takes over and the
/// sync must succeed with the replica equal to the source. Returns the new
/// receiver.
fn sync_through_a_receiver_abort(
    site: &Site,
    r: &mut Receiver,
    addr: &str,
    step: &str,
) -> Receiver {
    let vmdir = site.s("vm");
    let bg = std::thread::spawn(move || vdrep(&["sync", &vmdir, "--timeout", "90"]));
    let t0 = std::time::Instant::now();
    while r.child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the receiver never reached {step}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let next = Receiver::start(site, addr, &site.p("store"));
    let o = bg.join().unwrap();
    assert!(
        o.status.success(),
        "sync: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    same(&site.p("vm/data.img"), "raw", &site.replica("data.vhd"));
    next
}

fn points_of(site: &Site) -> Vec<u64> {
    let pts = vdrep_ok(&["points", "vm1", "--store", &site.s("store"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&pts).unwrap();
    let mut c: Vec<u64> = v["points"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["cycle"].as_u64()).collect())
        .unwrap_or_default();
    c.sort();
    c
}

/// A receiver of an older build (protocol 7: `VDREP_RECEIVER_PROTOCOL=7`
/// makes this build's receiver refuse newer senders as that build did): the
/// sender falls back to 7 at once, for `protect`'s check and for the
/// continuous worker, sends no log behind another (the receiver would
/// refuse it), says which protocol it speaks in its status, and the
/// replica converges.
#[test]
fn a_sender_replicates_to_an_older_receiver_in_its_protocol() {
    require_fuse!();
    let site = Site::new();
    let r = Receiver::spawn(
        "127.0.0.1:0",
        &site.p("store"),
        &site.p("kb"),
        &site.p("ka/site-a.crt"),
        &[],
        &[("VDREP_RECEIVER_PROTOCOL", "7")],
    );
    random_file(&site.p("vm/d.img"), 8 << 20, 21);
    let mut m = site.mount();
    protect(&site, &r, "continuous", &["d.img"]);
    sync_ok(&site);
    // Continuous churn: a disk's logs queue one behind another.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/d.img"))
        .unwrap();
    let mut x = 5u64;
    for n in 0..3000u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        f.write_all_at(&[(n % 251) as u8; 4096], (x >> 20) % 2048 * 4096)
            .unwrap();
        if n % 300 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    f.sync_all().unwrap();
    drop(f);
    sync_ok(&site);
    same(&site.p("vm/d.img"), "raw", &site.replica("d.vhd"));
    let st = m.status_once(|st| st["replication"][0]["state"] == "Normal");
    let vm = &st["replication"][0];
    assert_eq!(vm["protocol"], 7, "{st}");
    assert_eq!(vm["state"], "Normal", "{st}");
    assert_eq!(vm["retries"], 0, "the fallback is not a retry: {st}");
    m.umount();
}
