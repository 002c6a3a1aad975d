//! The configuration file drives the daemons (issue 9, must-show 2): one
//! file per site, the primary's with a tracked folder and two protected
//! VMs, the secondary's with a receiver. `vdrep mount`, `vdrep receive`,
//! sync, points and a test failover run with no per-VM flag anywhere.
//! Real FUSE and QUIC on loopback; needs root and /dev/fuse.

mod mountutil;
mod skip;

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
        let site = Site { _tmp: tmp, root };
        for (name, dir) in [("site-a", "ka"), ("site-b", "kb")] {
            vdrep_ok(&["keys", "init", "--name", name, "--out", &site.s(dir)]);
        }
        site
    }
    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }
    fn s(&self, s: &str) -> String {
        self.p(s).to_str().unwrap().to_string()
    }
    /// Write `text` as the file `name`; its path.
    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.p(name), text).unwrap();
        self.s(name)
    }
}

/// A port that was free a moment ago on 127.0.0.1 (UDP, as QUIC uses).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `vdrep --config FILE receive` (no other flag); killed on drop.
struct ConfigReceiver(std::process::Child);

impl ConfigReceiver {
    fn start(config: &str) -> (ConfigReceiver, String) {
        setup();
        let mut child = Command::new(vdrep_bin())
            .args(["--config", config, "receive"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vdrep receive");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"))
            .to_string();
        (ConfigReceiver(child), addr)
    }
}

impl Drop for ConfigReceiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn random(bytes: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; bytes];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = c.len();
        c.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    v
}

#[test]
fn config_files_drive_mount_protect_sync_points_and_test_failover() {
    require_fuse!();
    let site = Site::new();
    for (d, mib, seed) in [
        ("web.raw", 8, 1),
        ("db-os.raw", 4, 2),
        ("db-data.raw", 4, 3),
    ] {
        std::fs::write(site.p(&format!("vm/{d}")), random(mib << 20, seed)).unwrap();
    }
    let port = free_port();

    // The secondary site: its identity, the sender it trusts, its receiver.
    let dr = site.write(
        "dr.toml",
        &format!(
            "[site]\nname = \"site-b\"\nkeys = \"{kb}\"\ntrust = [\"{ka}/site-a.crt\"]\n\n\
             [receiver]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{store}\"\n\
             keep_all_for = \"2h\"\nkeep_for = \"forever\"\nprune_every = \"1min\"\n",
            kb = site.s("kb"),
            ka = site.s("ka"),
            store = site.s("store"),
        ),
    );
    vdrep_ok(&["--config", &dr, "config", "check"]);
    let (_rcv, addr) = ConfigReceiver::start(&dr);
    assert_eq!(addr, format!("127.0.0.1:{port}"));

    // The primary site: its identity, the receiver it trusts, the folder,
    // two VMs (one with two disks).
    let vm = site.s("vm");
    let primary = site.write(
        "primary.toml",
        &format!(
            "[site]\nname = \"site-a\"\nkeys = \"{ka}\"\ntrust = [\"{kb}/site-b.crt\"]\n\n\
             [[mount]]\npath = \"{vm}\"\n\n\
             [[vm]]\nname = \"web\"\ndisks = [\"{vm}/web.raw\"]\nto = \"{addr}\"\n\
             every = \"1h\"\nmax_rate = \"200MB/s\"\nrpo_alert = \"15min\"\n\n\
             [[vm]]\nname = \"db\"\ndisks = [\"{vm}/db-os.raw\", \"{vm}/db-data.raw\"]\n\
             to = \"{addr}\"\nevery = \"2h 30m\"\n",
            ka = site.s("ka"),
            kb = site.s("kb"),
        ),
    );
    let out = vdrep_ok(&["--config", &primary, "config", "check"]);
    assert!(
        out.contains("1 mount(s)") && out.contains("2 VM(s)"),
        "{out}"
    );

    // A bad file is refused with FILE:LINE: KEY and mounts nothing.
    let bad = site.write(
        "bad.toml",
        &std::fs::read_to_string(&primary)
            .unwrap()
            .replace("every = \"1h\"", "every = \"hourly\""),
    );
    let o = vdrep(&["--config", &bad, "mount", &vm]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = std::fs::read_to_string(&bad)
        .unwrap()
        .lines()
        .position(|l| l.contains("hourly"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{bad}:{line}: vm[web].every: ")),
        "{err}"
    );
    assert!(!is_mountpoint(&site.p("vm")));

    // `vdrep mount` with the file protects both VMs.
    let out = vdrep_ok(&["--config", &primary, "mount", &vm]);
    let mut m = Mounted {
        dir: site.p("vm"),
        mounted: true,
    };
    assert!(out.contains("web: protected"), "{out}");
    assert!(out.contains("db: protected"), "{out}");
    let st = m.status_json();
    let mut vms: Vec<(String, u64)> = st["replication"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["vm"].as_str().unwrap().to_string(),
                v["every_secs"].as_u64().unwrap(),
            )
        })
        .collect();
    vms.sort();
    assert_eq!(vms, vec![("db".into(), 9000), ("web".into(), 3600)]);

    // Writes through the mount, then a sync of the folder: both VMs get a
    // point with the writes.
    for (d, seed) in [("web.raw", 11), ("db-data.raw", 12)] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(site.p(&format!("vm/{d}")))
            .unwrap();
        f.write_all_at(&random(256 << 10, seed), 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let out = vdrep_ok(&["sync", &vm, "--timeout", "120"]);
    assert!(
        out.contains("web: recovery point") && out.contains("db: recovery point"),
        "{out}"
    );

    // Points at the receiver, and a test failover of each VM whose disks
    // equal the sources.
    for (name, disks) in [("web", vec!["web"]), ("db", vec!["db-os", "db-data"])] {
        let pts: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
            "points",
            name,
            "--store",
            &site.s("store"),
            "--json",
        ]))
        .unwrap();
        assert!(
            !pts["points"].as_array().unwrap().is_empty(),
            "{name}: {pts}"
        );
        let v: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
            "failover",
            name,
            "--test",
            "--store",
            &site.s("store"),
            "--json",
        ]))
        .unwrap();
        let exposed: Vec<PathBuf> = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
            .collect();
        assert_eq!(exposed.len(), disks.len(), "{v}");
        for d in disks {
            let e = exposed
                .iter()
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(d))
                .unwrap_or_else(|| panic!("{d} not exposed: {exposed:?}"));
            same_disk(&site.p(&format!("vm/{d}.raw")), e);
        }
        vdrep_ok(&["failover", name, "--cleanup", "--store", &site.s("store")]);
    }
    m.umount();
}

/// The raw source equals the exposed fixed VHD.
fn same_disk(raw: &Path, vhd: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            raw.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
}

/// The primary's file: the folder and one `[[vm]]` per (name, disk, extra
/// settings), trusting the receiver's certificate (and `extra_trust`).
fn primary_toml(site: &Site, addr: &str, vms: &[(&str, &str, &str)]) -> String {
    let vm = site.s("vm");
    let mut t = format!(
        "[site]\nname = \"site-a\"\nkeys = \"{}\"\ntrust = [\"{}/site-b.crt\"]\n\n[[mount]]\npath = \"{vm}\"\n",
        site.s("ka"),
        site.s("kb")
    );
    for (name, disk, extra) in vms {
        t += &format!(
            "\n[[vm]]\nname = \"{name}\"\ndisks = [\"{vm}/{disk}\"]\nto = \"{addr}\"\n{extra}\n"
        );
    }
    t
}

/// The mount's protected VMs: name -> every_secs.
fn protected(m: &Mounted) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = m.status_json()["replication"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["vm"].as_str().unwrap().to_string(),
                v["every_secs"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Wait (up to 60 s) until the mount protects exactly `want`.
fn wait_protected(m: &Mounted, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(n, e)| (n.to_string(), *e)).collect();
    for _ in 0..600 {
        if protected(m) == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("protected: {:?}, want {want:?}", protected(m));
}

/// Reload without downtime (issue 9, must-show 3): VMs added, changed and
/// removed by editing the file + SIGHUP (and `vdrep reload`), a bad file
/// refused with nothing changed, a new sender certificate trusted by the
/// running receiver after SIGHUP, while a writer keeps writing O_DIRECT
/// through the mount to another VM's disk and never sees an error.
#[test]
fn sighup_reload_converges_while_a_writer_keeps_writing() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    require_fuse!();
    let site = Site::new();
    for (d, seed) in [("a.raw", 21), ("b.raw", 22)] {
        std::fs::write(site.p(&format!("vm/{d}")), random(4 << 20, seed)).unwrap();
    }
    let port = free_port();
    let dr = site.write(
        "dr.toml",
        &format!(
            "[site]\nkeys = \"{}\"\ntrust = [\"{}/site-a.crt\"]\n\n[receiver]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{}\"\n",
            site.s("kb"),
            site.s("ka"),
            site.s("store")
        ),
    );
    let (rcv, addr) = ConfigReceiver::start(&dr);
    let vm = site.s("vm");
    let file = site.s("primary.toml");
    let write_cfg = |vms: &[(&str, &str, &str)]| {
        std::fs::write(&file, primary_toml(&site, &addr, vms)).unwrap();
    };
    write_cfg(&[("a", "a.raw", "every = \"1h\"")]);
    vdrep_ok(&["--config", &file, "mount", &vm]);
    let m = Mounted {
        dir: site.p("vm"),
        mounted: true,
    };
    wait_protected(&m, &[("a", 3600)]);
    let pid = nix::unistd::Pid::from_raw(m.daemon_pid());
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();

    // The writer: O_DIRECT 64 KiB writes to a.raw through the mount.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        let path = site.p("vm/a.raw");
        std::thread::spawn(move || -> Result<(), String> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .map_err(|e| format!("open O_DIRECT: {e}"))?;
            let layout = std::alloc::Layout::from_size_align(64 << 10, 4096).unwrap();
            // SAFETY: non-zero size; freed below with the same layout.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            // SAFETY: `ptr` points to `layout.size()` initialised bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, layout.size()) };
            let mut r = Ok(());
            let mut i: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                buf[..8].copy_from_slice(&i.to_le_bytes());
                let off = (i % 64) * (64 << 10);
                if let Err(e) = f.write_all_at(buf, off) {
                    r = Err(format!("write {i} at {off}: {e}"));
                    break;
                }
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
            // SAFETY: allocated above with `layout`.
            unsafe { std::alloc::dealloc(ptr, layout) };
            r
        })
    };
    let wait_writes = |n: u64| {
        let target = written.load(Ordering::SeqCst) + n;
        for _ in 0..600 {
            if written.load(Ordering::SeqCst) >= target {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!(
            "the writer is stuck at {} writes",
            written.load(Ordering::SeqCst)
        );
    };
    wait_writes(10);

    // 1. Add a VM.
    write_cfg(&[
        ("a", "a.raw", "every = \"1h\""),
        ("b", "b.raw", "every = \"1h\"\nmax_rate = \"100MB/s\""),
    ]);
    hup();
    wait_protected(&m, &[("a", 3600), ("b", 3600)]);
    wait_writes(10);

    // 2. Change b's schedule and rate (SIGHUP), then its rate alone
    //    (`vdrep reload`), then trust one more certificate for its receiver.
    write_cfg(&[
        ("a", "a.raw", "every = \"1h\""),
        ("b", "b.raw", "every = \"15min\"\nmax_rate = \"50MB/s\""),
    ]);
    hup();
    wait_protected(&m, &[("a", 3600), ("b", 900)]);
    write_cfg(&[
        ("a", "a.raw", "every = \"1h\""),
        ("b", "b.raw", "every = \"15min\"\nmax_rate = \"100Mbit/s\""),
    ]);
    let out = vdrep_ok(&["--config", &file, "reload", &vm]);
    assert!(out.contains("b: protected with the new settings"), "{out}");
    assert!(out.contains("a: protected (unchanged)"), "{out}");
    std::fs::create_dir_all(site.p("kc")).unwrap();
    vdrep_ok(&["keys", "init", "--name", "site-c", "--out", &site.s("kc")]);
    write_cfg(&[
        ("a", "a.raw", "every = \"1h\""),
        (
            "b",
            "b.raw",
            &format!(
                "every = \"15min\"\nmax_rate = \"100Mbit/s\"\ntrust = [\"{}/site-b.crt\", \"{}/site-c.crt\"]",
                site.s("kb"),
                site.s("kc")
            ),
        ),
    ]);
    let out = vdrep_ok(&["reload", &vm]);
    assert!(out.contains("b: protected with the new settings"), "{out}");
    wait_writes(10);

    // 3. A bad file is refused and nothing changes.
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        good.replace("every = \"15min\"", "every = \"often\""),
    )
    .unwrap();
    let o = vdrep(&["reload", &vm]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{file}:")) && err.contains("vm[b].every"),
        "{err}"
    );
    hup();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(protected(&m), vec![("a".into(), 3600), ("b".into(), 900)]);
    std::fs::write(&file, &good).unwrap();

    // 4. Remove a VM: it is unprotected, its disk stays mounted and tracked.
    write_cfg(&[("a", "a.raw", "every = \"1h\"")]);
    hup();
    wait_protected(&m, &[("a", 3600)]);
    let disks: Vec<String> = m.status_json()["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert!(disks.contains(&"b.raw".to_string()), "{disks:?}");
    wait_writes(10);

    // 5. The receiver trusts a new sender certificate without a restart:
    //    site-c (a second folder) is refused, then accepted once its
    //    certificate is added to the receiver's file and SIGHUP re-reads it.
    std::fs::create_dir_all(site.p("vm2")).unwrap();
    std::fs::write(site.p("vm2/c.raw"), random(1 << 20, 23)).unwrap();
    let vm2 = site.s("vm2");
    let file_c = site.write(
        "primary-c.toml",
        &format!(
            "[site]\nkeys = \"{}\"\ntrust = [\"{}/site-b.crt\"]\n\n[[mount]]\npath = \"{vm2}\"\n\n             [[vm]]\nname = \"c\"\ndisks = [\"{vm2}/c.raw\"]\nto = \"{addr}\"\nevery = \"1h\"\n",
            site.s("kc"),
            site.s("kb")
        ),
    );
    let out = vdrep_ok(&["--config", &file_c, "mount", &vm2]);
    let m2 = Mounted {
        dir: site.p("vm2"),
        mounted: true,
    };
    assert!(out.contains("c: warning: NOT protected"), "{out}");
    assert_eq!(protected(&m2), vec![]);
    std::fs::write(
        &dr,
        std::fs::read_to_string(&dr).unwrap().replace(
            &format!("trust = [\"{}/site-a.crt\"]", site.s("ka")),
            &format!(
                "trust = [\"{}/site-a.crt\", \"{}/site-c.crt\"]",
                site.s("ka"),
                site.s("kc")
            ),
        ),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rcv.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let mut accepted = String::new();
    for _ in 0..50 {
        accepted = vdrep_ok(&["--config", &file_c, "reload", &vm2]);
        if accepted.contains("c: protected (1 disk(s))") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(accepted.contains("c: protected (1 disk(s))"), "{accepted}");
    vdrep_ok(&["sync", &vm2, "--timeout", "120"]);
    drop(m2);

    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap().unwrap();
    assert!(is_mountpoint(&site.p("vm")));
    vdrep_ok(&["sync", &vm, "--timeout", "120"]);
    drop(m);
    drop(rcv);
}

/// `vdrep config check`: the shipped example passes (its content; the key
/// files it names are not on this machine), and a bad file fails with one
/// FILE:LINE: KEY line per problem and exit status 2.
#[test]
fn config_check_accepts_the_example_and_names_file_line_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/vdrep.example.toml");
    let out = vdrep_ok(&["--config", example, "config", "check", "--content-only"]);
    assert!(out.contains("2 VM(s)"), "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("every = \"5min\"", "every = \"5 parsecs\"")
        .replace("name = \"db\"", "name = \"web\"")
        .replace(
            "keep_for = \"3days\"",
            "keep_for = \"3days\"\nkeep_al = \"1h\"",
        );
    std::fs::write(&bad, &text).unwrap();
    let o = vdrep(&["config", "check", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = text
        .lines()
        .position(|l| l.starts_with("keep_al ="))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{}:{line}: keep_al: unknown field", bad.display())),
        "{err}"
    );
    // Fix the schema error: the value problems are all reported at once.
    let text = text.replace("\nkeep_al = \"1h\"", "");
    std::fs::write(&bad, &text).unwrap();
    let o = vdrep(&[
        "--config",
        bad.to_str().unwrap(),
        "config",
        "check",
        "--content-only",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let at = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let d = bad.display();
    assert!(
        err.contains(&format!("{d}:{}: vm[web].every: ", at("5 parsecs"))),
        "{err}"
    );
    let second = text.match_indices("name = \"web\"").nth(1).unwrap().0;
    let dup_line = text[..second].lines().count() + 1;
    assert!(
        err.contains(&format!("{d}:{dup_line}: vm[web].name: ")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");
}

/// A bandwidth schedule (`max_rate = [{ when, rate }, ...]`) changes the
/// rate of a running VM at its boundaries, with no reload: a window that
/// opens a few seconds from now (local time) and closes a few seconds
/// later, seen in `vdrep status --json`.
#[test]
fn a_rate_schedule_rerates_the_vm_at_its_boundaries() {
    require_fuse!();
    let site = Site::new();
    std::fs::write(site.p("vm/a.raw"), random(1 << 20, 31)).unwrap();
    let port = free_port();
    let dr = site.write(
        "dr.toml",
        &format!(
            "[site]\nkeys = \"{}\"\ntrust = [\"{}/site-a.crt\"]\n\n[receiver]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{}\"\n",
            site.s("kb"),
            site.s("ka"),
            site.s("store")
        ),
    );
    let (rcv, addr) = ConfigReceiver::start(&dr);
    // The window: from 8 s to 16 s from now (whole seconds), local
    // wall-clock time.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::system());
    let at = |s: i64| now.checked_add(jiff::SignedDuration::from_secs(s)).unwrap();
    let (open, close) = (at(8), at(16));
    let hms = |z: &jiff::Zoned| z.strftime("%H:%M:%S").to_string();
    let rules = format!(
        "every = \"1h\"\nmax_rate = [\n  {{ when = \"{}-{}\", rate = \"1MB/s\" }},\n  {{ rate = \"5MB/s\" }},\n]",
        hms(&open),
        hms(&close)
    );
    let file = site.write(
        "primary.toml",
        &primary_toml(&site, &addr, &[("a", "a.raw", &rules)]),
    );
    vdrep_ok(&["--config", &file, "mount", &site.s("vm")]);
    let m = Mounted {
        dir: site.p("vm"),
        mounted: true,
    };
    wait_protected(&m, &[("a", 3600)]);
    let rate = || -> (u64, Option<i64>) {
        let st = m.status_json();
        let v = &st["replication"][0];
        (
            v["max_rate"].as_u64().unwrap(),
            v["next_change_unix"].as_i64(),
        )
    };
    let (r0, next) = rate();
    assert_eq!(r0, 5_000_000, "before the window");
    // Fresh (ten-year) certificates: no expiry warning in the status.
    assert_eq!(m.status_json()["warnings"], serde_json::json!([]));
    assert_eq!(next, Some(open.timestamp().as_second()));
    // The canonical text drops ":00" seconds (1 run in 60 opens on a
    // whole minute).
    let canonical = |z: &jiff::Zoned| {
        if z.second() == 0 {
            z.strftime("%H:%M").to_string()
        } else {
            hms(z)
        }
    };
    let schedule = m.status_json()["replication"][0]["schedule"].clone();
    assert!(
        schedule.as_str().unwrap().starts_with(&canonical(&open)),
        "{schedule}"
    );
    // Wait for the rate to change; note when it did.
    let wait_rate = |want: u64| -> jiff::Timestamp {
        for _ in 0..300 {
            if rate().0 == want {
                return jiff::Timestamp::now();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("max_rate stays {:?}, want {want}", rate());
    };
    let t1 = wait_rate(1_000_000);
    assert!(t1 >= open.timestamp(), "re-rated before the window opened");
    assert!(t1 < close.timestamp(), "re-rated only after the window");
    assert_eq!(rate().1, Some(close.timestamp().as_second()));
    let t2 = wait_rate(5_000_000);
    assert!(t2 >= close.timestamp());
    assert!(
        (t2 - close.timestamp()).get_seconds() < 3,
        "re-rated {} after the boundary",
        t2 - close.timestamp()
    );
    drop(m);
    drop(rcv);
}
