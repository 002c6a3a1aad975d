//! Checksum resync and online verify between real processes on loopback:
//! `vdrep mount --keys` + `vdrep protect` at the primary, `vdrep receive`
//! at the secondary, real QUIC. Needs root and /dev/fuse (CI has both).
//! Each test protects its own VM name (`vdrep resync NAME` looks the VM up
//! among all running mounts, and test binaries run in parallel).

mod mountutil;
mod skip;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mountutil::*;

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    vm: String,
}

impl Site {
    fn new(vm: &str) -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["ka", "kb", "vm", "store"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (n, d) in [("site-a", "ka"), ("site-b", "kb")] {
            vdrep_ok(&[
                "keys",
                "init",
                "--name",
                n,
                "--out",
                root.join(d).to_str().unwrap(),
            ]);
        }
        Site {
            _tmp: tmp,
            root,
            vm: vm.to_string(),
        }
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
    /// Mount with extra environment for the daemon (test hooks).
    fn mount_env(&self, env: &[(&str, &str)]) -> Mounted {
        setup();
        let o = Command::new(vdrep_bin())
            .args(["mount", &self.s("vm"), "--keys", &self.s("ka")])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Mounted {
            dir: self.p("vm"),
            mounted: true,
        }
    }
    fn replica(&self, name: &str) -> PathBuf {
        let disks = self.p(&format!("store/sites/site-a/vms/{}/disks", self.vm));
        for d in std::fs::read_dir(&disks).unwrap().flatten() {
            let p = d.path().join(name);
            if p.exists() {
                mountutil::wait_applied(&d.path());
                return p;
            }
        }
        panic!("no replica {name} under {}", disks.display());
    }
    fn point_cycles(&self) -> Vec<u64> {
        let v = serde_json::json!({
            "points": vdrep::replica::points_in(&self.p(&format!("store/sites/site-a/vms/{}", self.vm)))
                .unwrap()
        });
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["cycle"].as_u64().unwrap())
            .collect()
    }
    fn protect(&self, r: &Receiver, disks: &[&str], extra: &[&str]) {
        let mut args = vec![
            "protect".to_string(),
            self.vm.clone(),
            "--to".into(),
            r.addr.clone(),
            "--trust".into(),
            self.s("kb/site-b.crt"),
            "--every".into(),
            "1h".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        for d in disks {
            args.push(self.s(&format!("vm/{d}")));
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        vdrep_ok(&a);
    }
    fn sync_ok(&self) {
        let o = vdrep(&["sync", &self.s("vm"), "--timeout", "120"]);
        assert!(
            o.status.success(),
            "sync failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    fn verify(&self) -> (i32, serde_json::Value) {
        let o = vdrep(&["verify", &self.vm, "--json", "--timeout", "120"]);
        let code = o.status.code().unwrap_or(-1);
        let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
            panic!(
                "verify printed no JSON (exit {code}): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (code, v)
    }
    fn resync(&self) -> serde_json::Value {
        let o = vdrep(&["resync", &self.vm, "--json", "--timeout", "120"]);
        assert!(
            o.status.success(),
            "resync failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Receiver {
    fn start(site: &Site, addr: &str) -> Receiver {
        Receiver::spawn(
            addr,
            &site.p("store"),
            &site.p("kb"),
            &site.p("ka/site-a.crt"),
            &[],
            &[],
        )
    }
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

fn kill_daemon(m: &mut Mounted, site: &Site) {
    let pid = m.daemon_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vdrep_ok(&["umount", &site.s("vm")]);
    m.mounted = false;
}

/// Must-show 1: bytes flipped behind vdrep's back in random blocks of the
/// replica: `verify` reports exactly those ranges (exit 1), `resync`
/// repairs them shipping exactly those blocks, `verify` is then clean, the
/// replica equals the source and the recovery history is kept.
#[test]
fn verify_reports_and_resync_repairs_exactly_the_damaged_blocks() {
    require_fuse!();
    let site = Site::new("rs-flip");
    random_file(&site.p("vm/f.img"), 32 << 20, 21);
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0");
    site.protect(&r, &["f.img"], &[]);
    site.sync_ok();
    let (code, v) = site.verify();
    assert_eq!(code, 0, "fresh replica not clean: {v}");
    assert_eq!(v[0]["blocks_compared"], 8192, "{v}");
    // Damage: one byte flipped in each of 9 random blocks (two adjacent,
    // so one merged range), in the data region of the fixed VHD.
    let rep = site.replica("f.vhd");
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut blocks: Vec<u64> = (0..8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % 8191
        })
        .collect();
    blocks.push(blocks[0] + 1);
    blocks.sort_unstable();
    blocks.dedup();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&rep)
        .unwrap();
    for (i, b) in blocks.iter().enumerate() {
        let at = b * 4096 + (i as u64 * 577) % 4096;
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, at).unwrap();
        one[0] ^= 0x5a;
        f.write_all_at(&one, at).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let mut want: Vec<(u64, u64)> = Vec::new();
    for b in &blocks {
        match want.last_mut() {
            Some((o, l)) if *o + *l == b * 4096 => *l += 4096,
            _ => want.push((b * 4096, 4096)),
        }
    }
    let points_before = site.point_cycles();
    let (code, v) = site.verify();
    assert_eq!(code, 1, "verify must fail on a damaged replica: {v}");
    let got: Vec<(u64, u64)> = v[0]["differ"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "verify reported other ranges");
    // The resync ships exactly the damaged blocks.
    let rs = site.resync();
    assert_eq!(rs["blocks_compared"], 8192, "{rs}");
    assert_eq!(
        rs["blocks_sent"].as_u64(),
        Some(blocks.len() as u64),
        "{rs}"
    );
    let (code, v) = site.verify();
    assert_eq!(code, 0, "still differs after the resync: {v}");
    same(&site.p("vm/f.img"), "raw", &rep);
    // History kept: every earlier point is still there, plus the resync's.
    let points_after = site.point_cycles();
    for p in &points_before {
        assert!(points_after.contains(p), "point {p} lost: {points_after:?}");
    }
    assert!(points_after.len() > points_before.len());
    let st = m.status_once(|st| st["replication"][0]["state"] == "Normal");
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    m.umount();
}

/// Must-show 2: with the receiver down, a disk whose pending changes pass
/// the threshold goes bitmap-only (its logs are folded into the bitmap and
/// no more are written); when the receiver is back the changes go out as
/// one cycle, the earlier recovery points survive and the disk is Normal.
#[test]
fn threshold_switches_to_bitmap_only_and_keeps_history() {
    require_fuse!();
    let site = Site::new("rs-thresh");
    random_file(&site.p("vm/t.img"), 16 << 20, 5);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let mut r = Receiver::start(&site, "127.0.0.1:0");
    let addr = r.addr.clone();
    site.protect(&r, &["t.img"], &["--resync-threshold", "10%"]);
    // The first sync may be answered by the initial copy while its own cut
    // is still in flight; the second waits for a later one.
    site.sync_ok();
    site.sync_ok();
    let points_before = site.point_cycles();
    r.kill9();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/t.img"))
        .unwrap();
    // Pending bytes are log bytes + dirty bytes (as `bytes_pending` in
    // status): write incompressible data.
    random_file(&site.p("scratch"), 2 << 20, 99);
    let noise = std::fs::read(site.p("scratch")).unwrap();
    // 1 MiB (6%): below the threshold, a manual cut writes a log.
    f.write_all_at(&noise[..1 << 20], 2 << 20).unwrap();
    f.sync_all().unwrap();
    let logs = |site: &Site| -> usize {
        let mut n = Vec::new();
        for d in std::fs::read_dir(site.p("vm/.vdrep/disks"))
            .unwrap()
            .flatten()
        {
            n.extend(
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|e| e.path().display().to_string())
                    .filter(|e| e.ends_with(".hrl")),
            );
        }
        println!("logs: {n:?}");
        n.len()
    };
    // The second sync may have been answered by the cycle already in flight
    // (no write came between), leaving its own cut's log unshipped when the
    // receiver died (seen on a loaded host): count what the cut adds.
    // If such a log was submitted before the kill, the receiver may hold
    // it: the fold below keeps it (the cut's own logs are never kept).
    let before = logs(&site);
    let _ = vdrep(&["cut", &site.s("vm")]);
    assert_eq!(logs(&site), before + 1, "the first cut should write a log");
    assert_eq!(m.status_json()["disks"][0]["bitmap_only"], false);
    // 1 MiB more: log + dirty pass 10% of 16 MiB.
    f.write_all_at(&noise[1 << 20..], 9 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let o = vdrep(&["cut", &site.s("vm")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bitmap-only"), "{err}");
    let st = m.status_json();
    assert_eq!(st["disks"][0]["bitmap_only"], true, "{st}");
    assert!(
        logs(&site) <= before,
        "the cut's logs must be folded into the bitmap"
    );
    assert!(
        st["disks"][0]["dirty_bytes"].as_u64().unwrap() >= 2 << 20,
        "{st}"
    );
    // Logs stop growing.
    let _ = vdrep(&["cut", &site.s("vm")]);
    assert!(logs(&site) <= before);
    let _r = Receiver::start(&site, &addr);
    site.sync_ok();
    let st = m.status_once(|st| {
        st["disks"][0]["bitmap_only"] == false && st["replication"][0]["state"] == "Normal"
    });
    assert_eq!(st["disks"][0]["bitmap_only"], false, "{st}");
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    same(&site.p("vm/t.img"), "raw", &site.replica("t.vhd"));
    let points_after = site.point_cycles();
    for p in &points_before {
        assert!(points_after.contains(p), "point {p} lost: {points_after:?}");
    }
    assert!(points_after.len() > points_before.len());
    m.umount();
}

/// Must-show 3: the receiver is killed (-9) in the middle of a resync; the
/// resync resumes from its saved progress (it compares far fewer blocks
/// than the disk has) and the replica ends byte-identical.
#[test]
fn resync_interrupted_by_receiver_crash_resumes() {
    require_fuse!();
    let site = Site::new("rs-resume");
    random_file(&site.p("vm/k.img"), 256 << 20, 77);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    // 8 MiB batches paced at 100 ms: the whole compare takes ~3 s.
    let mut m = site.mount_env(&[
        ("VDREP_TEST_RESYNC_PACE_MS", "100"),
        ("VDREP_RETRY_SCALE", "0.005"),
    ]);
    let mut r = Receiver::start(&site, "127.0.0.1:0");
    let addr = r.addr.clone();
    site.protect(&r, &["k.img"], &[]);
    site.sync_ok();
    // Damage 20 blocks of the replica, spread over the disk.
    let rep = site.replica("k.vhd");
    let f = std::fs::OpenOptions::new().write(true).open(&rep).unwrap();
    for i in 0..20u64 {
        f.write_all_at(&[0xab; 16], i * (12 << 20) + 4096 * 3)
            .unwrap();
    }
    drop(f);
    let vm = site.vm.clone();
    let bg = std::thread::spawn(move || vdrep(&["resync", &vm, "--json", "--timeout", "120"]));
    // Wait until saved progress (every 2 s or 128 MiB, whichever comes
    // first: on a busy host the time saves first) is past 96 MiB.
    let mut saved = 0;
    for _ in 0..1500 {
        saved = saved_resync_progress(&site.p("vm/.vdrep/protect"));
        if saved >= 96 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        saved >= 96 << 20,
        "no resync progress past 96 MiB was saved (last {saved})"
    );
    r.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let _r = Receiver::start(&site, &addr);
    let o = bg.join().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let rs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let total = 65536u64;
    let compared = rs["blocks_compared"].as_u64().unwrap();
    println!("resumed resync: {compared} of {total} blocks compared: {rs}");
    assert!(
        rs["resumed_from"].as_u64().unwrap_or(0) >= saved,
        "not resumed from the saved {saved}: {rs}"
    );
    // Resumed at ≥ 96 MiB of 256: at most 160 MiB (62.5 %) compared.
    assert!(compared <= total * 7 / 10, "the resync started over: {rs}");
    assert_eq!(rs["blocks_sent"], 20, "{rs}");
    same(&site.p("vm/k.img"), "raw", &rep);
    let (code, v) = site.verify();
    assert_eq!(code, 0, "{v}");
    m.umount();
}

/// Must-show 3 for the sender: kill -9 of the mount daemon in the middle
/// of the compare. Writes made between the compare's cut and the kill are
/// only in the activity log (the dirty bitmap died with the
/// daemon); after the remount more is written. The automatic resync resumes
/// at the saved offset, re-compares the found blocks and the activity
/// log's extents (not the whole disk), and the replica ends byte-identical.
#[test]
fn resync_interrupted_by_mount_daemon_kill_resumes() {
    require_fuse!();
    let site = Site::new("rs-kill-mount");
    random_file(&site.p("vm/k.img"), 256 << 20, 78);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    // 8 MiB batches paced at 100 ms: the whole compare takes ~3 s.
    let mut m = site.mount_env(&[
        ("VDREP_TEST_RESYNC_PACE_MS", "100"),
        ("VDREP_RETRY_SCALE", "0.005"),
    ]);
    let r = Receiver::start(&site, "127.0.0.1:0");
    site.protect(&r, &["k.img"], &["--resync-window", "always"]);
    site.sync_ok();
    let rep = site.replica("k.vhd");
    // Damage 20 blocks of the replica, spread over the disk.
    let f = std::fs::OpenOptions::new().write(true).open(&rep).unwrap();
    for i in 0..20u64 {
        f.write_all_at(&[0xab; 16], i * (12 << 20) + 4096 * 3)
            .unwrap();
    }
    drop(f);
    let write_block = |off: u64, v: u8| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(site.p("vm/k.img"))
            .unwrap();
        f.write_all_at(&[v; 4096], off).unwrap();
        f.sync_all().unwrap();
    };
    let offset_of = |m: &Mounted| {
        m.status_json()["replication"][0]["resync"]["offset"]
            .as_u64()
            .unwrap_or(0)
    };
    let vm = site.vm.clone();
    let bg = std::thread::spawn(move || vdrep(&["resync", &vm, "--json", "--timeout", "120"]));
    // Between the cut and the kill: a block the compare already passed,
    // and one it has not reached yet.
    let mut reached = 0;
    for _ in 0..600 {
        reached = offset_of(&m);
        if reached >= 48 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reached >= 48 << 20, "the resync never got to 48 MiB");
    write_block(5 << 20, 0x51);
    write_block((230 << 20) + 8192, 0x52);
    // Kill as soon as the saved progress (every 2 s or 128 MiB, whichever
    // comes first: on a busy host the time saves first) is past 96 MiB.
    let mut saved = 0;
    for _ in 0..1500 {
        saved = saved_resync_progress(&site.p("vm/.vdrep/protect"));
        if saved >= 96 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        saved >= 96 << 20,
        "no resync progress past 96 MiB was saved (last {saved}, compare at {})",
        offset_of(&m)
    );
    kill_daemon(&mut m, &site);
    let _ = bg.join();
    // Remount (unclean stop: resync required) and write more at once.
    let mut m = site.mount();
    write_block((30 << 20) + 4096, 0x53);
    write_block(100 << 20, 0x54);
    site.sync_ok();
    let st = m.status_once(|st| {
        !st["replication"][0]["last_resync"].is_null() && st["replication"][0]["state"] == "Normal"
    });
    let rs = &st["replication"][0]["last_resync"];
    let total = 65536u64;
    let compared = rs["blocks_compared"].as_u64().unwrap_or(0);
    println!("resumed resync after kill -9 of the mount daemon: {compared} of {total} blocks compared: {rs}");
    assert_eq!(rs["mode"], "resync", "{st}");
    assert!(
        rs["resumed_from"].as_u64().unwrap_or(0) >= saved,
        "not resumed from the saved {saved}: {st}"
    );
    // Resumed at ≥ 96 MiB of 256: at most 160 MiB (62.5 %) plus the few
    // re-compared extents.
    assert!(compared < total * 7 / 10, "the resync started over: {st}");
    // 20 damaged blocks + the 2 written between the cut and the kill (the
    // one at 5 MiB is known from the activity log only: without it
    // the replica would keep the old block and `same` below fails) + the 2
    // written after the remount if they landed before the resumed cut
    // (else they ship as the next ordinary cycle).
    let sent = rs["blocks_sent"].as_u64().unwrap_or(0);
    assert!((22..=24).contains(&sent), "{sent} blocks sent: {st}");
    assert_eq!(st["disks"][0]["state"]["state"], "Normal", "{st}");
    same(&site.p("vm/k.img"), "raw", &rep);
    let (code, v) = site.verify();
    assert_eq!(code, 0, "{v}");
    // The activity log (which replaced the touched-region map) let the
    // resync resume: its extents were re-compared, no older map is left.
    let disks = site.p("vm/.vdrep/disks");
    for d in std::fs::read_dir(&disks).unwrap().flatten() {
        assert!(
            !d.path().join("touched").exists(),
            "{} left behind",
            d.path().display()
        );
        assert!(
            d.path().join("al").exists(),
            "no activity log in {}",
            d.path().display()
        );
    }
    m.umount();
}

/// Must-show 4: an unclean stop of the mount (kill -9 of the daemon) marks
/// the disk resync required; after the remount an automatic resync (window
/// `always`) compares by checksums (no full copy: little is sent), keeps the
/// history, and the replica is identical again.
#[test]
fn unclean_stop_is_healed_by_checksum_resync() {
    require_fuse!();
    let site = Site::new("rs-unclean");
    random_file(&site.p("vm/u.img"), 64 << 20, 3);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let r = Receiver::start(&site, "127.0.0.1:0");
    site.protect(&r, &["u.img"], &["--resync-window", "always"]);
    site.sync_ok();
    let points_before = site.point_cycles();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/u.img"))
        .unwrap();
    for i in 0..256u64 {
        f.write_all_at(&[0x77; 4096], (i * 97 % 16384) * 4096)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    kill_daemon(&mut m, &site);
    let mut m = site.mount();
    let st = m.status_json();
    assert_eq!(st["disks"][0]["state"]["state"], "ResyncRequired", "{st}");
    site.sync_ok();
    same(&site.p("vm/u.img"), "raw", &site.replica("u.vhd"));
    let st = m.status_once(|st| {
        !st["replication"][0]["last_resync"].is_null() && st["replication"][0]["state"] == "Normal"
    });
    let rep = &st["replication"][0];
    assert_eq!(st["disks"][0]["state"]["state"], "Normal", "{st}");
    assert_eq!(rep["state"], "Normal", "{st}");
    assert_eq!(rep["last_resync"]["mode"], "resync", "{st}");
    // The 256 writes touch all 16 extents. A cycle the sender cuts right
    // after `sync` (seen on a loaded host) can carry some of them in a
    // sealed log, shipped at the remount; their extents then leave the
    // activity log and are not compared. So: at most the whole disk is
    // compared, at most the 256 written blocks are sent, and the replica
    // equals the source (above) either way.
    let compared = rep["last_resync"]["blocks_compared"].as_u64().unwrap();
    let resent = rep["last_resync"]["blocks_sent"].as_u64().unwrap();
    assert!((1..=16384).contains(&compared), "{st}");
    assert!(resent <= 256, "{st}");
    assert_eq!(rep["last_resync"]["blocks_differ"], resent, "{st}");
    let sent = rep["bytes_sent"].as_u64().unwrap();
    assert!(sent < 8 << 20, "{sent} bytes sent: a full copy?");
    let points_after = site.point_cycles();
    for p in &points_before {
        assert!(points_after.contains(p), "point {p} lost: {points_after:?}");
    }
    m.umount();
}

/// The receiver distrusts a replica (as after an unplanned failover that
/// adopted it): `OpenDisk` says so, the sender resyncs by checksums (not a
/// full copy, not deltas), the flag is cleared by the resync's log, and the
/// history is kept.
#[test]
fn receiver_side_needs_resync_leads_to_checksum_resync() {
    require_fuse!();
    let site = Site::new("rs-recv");
    random_file(&site.p("vm/n.img"), 16 << 20, 8);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let mut r = Receiver::start(&site, "127.0.0.1:0");
    let addr = r.addr.clone();
    site.protect(&r, &["n.img"], &["--resync-window", "always"]);
    site.sync_ok();
    site.sync_ok();
    let points_before = site.point_cycles();
    // The last point's apply ends before the kill (`replica` waits for it).
    let rep = site.replica("n.vhd");
    r.kill9();
    // Damage one block and mark the replica untrusted, as the failover
    // code does, through the store API (the receiver is down: its lock is free).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rep)
        .unwrap()
        .write_all_at(&[0xee; 100], 5 * 4096)
        .unwrap();
    {
        let store = vdrep::replica::Store::open(&site.p("store")).unwrap();
        let s = store.site("site-a").unwrap();
        let id_hex = rep.parent().unwrap().file_name().unwrap().to_str().unwrap();
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16).unwrap();
        }
        s.set_needs_resync(&site.vm, &id, Some("adopted after an unplanned failover"))
            .unwrap();
        assert!(s.disk_state(&site.vm, &id).unwrap().needs_resync.is_some());
    }
    let _r = Receiver::start(&site, &addr);
    site.sync_ok();
    let st = m.status_once(|st| {
        !st["replication"][0]["last_resync"].is_null() && st["replication"][0]["state"] == "Normal"
    });
    let rs = &st["replication"][0]["last_resync"];
    assert_eq!(rs["mode"], "resync", "{st}");
    assert_eq!(rs["blocks_sent"], 1, "{st}");
    same(&site.p("vm/n.img"), "raw", &rep);
    let points_after = site.point_cycles();
    for p in &points_before {
        assert!(points_after.contains(p), "point {p} lost: {points_after:?}");
    }
    m.umount();
    drop(_r);
    let store = vdrep::replica::Store::open(&site.p("store")).unwrap();
    let s = store.site("site-a").unwrap();
    let id_hex = rep.parent().unwrap().file_name().unwrap().to_str().unwrap();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    assert_eq!(s.disk_state(&site.vm, &id).unwrap().needs_resync, None);
}

/// 4 MiB: the activity log's extent.
const EXTENT: u64 = 4 << 20;

/// The extents named by the activity log(s) under a raw (unmounted)
/// state folder: `.vdrep/disks/*/al` (magic, epoch, shift, then one bit
/// per extent).
fn logged_extents(vm: &Path) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for d in std::fs::read_dir(vm.join(".vdrep/disks"))
        .unwrap()
        .flatten()
    {
        let Ok(b) = std::fs::read(d.path().join("al")) else {
            continue;
        };
        assert_eq!(&b[..8], b"VDREPAL1", "{}", d.path().display());
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 22);
        for (i, byte) in b[24..].iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.insert(i as u64 * 8 + bit);
                }
            }
        }
    }
    out
}

/// Issue 15, must-show 4: kill -9 of the whole mount daemon **and** its
/// supervisor (the host-crash stand-in) while an `O_DIRECT` writer runs.
/// Model check on the raw state folder: every block the writer wrote (or
/// had in flight) since the last sealed cycle lies in an extent of the
/// activity log, and the log names nothing else but the extents written
/// before that cycle, which its budget keeps hot. The remount marks the disk for an
/// extents-only resync, which starts at once although the resync window is
/// closed, compares exactly the logged extents (printed against the disk
/// size), and the replica then equals the source.
#[test]
fn host_crash_resyncs_only_the_activity_log_extents_at_once() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    require_fuse!();
    let site = Site::new("al-crash");
    let size: u64 = 256 << 20;
    random_file(&site.p("vm/a.img"), size as usize, 15);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount_env(&[("VDREP_RETRY_SCALE", "0.005")]);
    let r = Receiver::start(&site, "127.0.0.1:0");
    // A window that is closed for the next hour: an automatic full resync
    // would wait for it.
    let hour: u32 = run("date", &["+%H"]).trim().parse().unwrap();
    let window = format!("{:02}:00-{:02}:00", (hour + 2) % 24, (hour + 3) % 24);
    site.protect(&r, &["a.img"], &["--resync-window", &window]);
    site.sync_ok();
    // Extents written before the next cut stay in the log after its cycle
    // is sealed: the log's budget (`activity_hot`, 1 GiB by default) keeps
    // them hot; a crash compares them too.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/a.img"))
        .unwrap();
    for e in [3u64, 9, 17] {
        f.write_all_at(&[0x33; 4096], e * EXTENT + 8192).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    site.sync_ok();
    let st = m.status_json();
    assert_eq!(st["disks"][0]["activity_extents"], 3, "{st}");
    // The writer: 4 KiB O_DIRECT writes at random blocks of four extents
    // (17 again: it must come back into the log).
    let targets = [17u64, 41, 50, 63];
    let attempted = Arc::new(Mutex::new(Vec::<u64>::new()));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (attempted, acked, stop) = (attempted.clone(), acked.clone(), stop.clone());
        let path = site.p("vm/a.img");
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .unwrap();
            // An aligned 4 KiB buffer for O_DIRECT.
            let mut raw = vec![0u8; 8192];
            let at = raw.as_ptr().align_offset(4096);
            let buf = &mut raw[at..at + 4096];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let e = targets[(x % 4) as usize];
                let off = e * EXTENT + ((x >> 8) % (EXTENT / 4096)) * 4096;
                buf.fill((n % 251) as u8 + 1);
                attempted.lock().unwrap().push(off);
                if f.write_all_at(buf, off).is_err() {
                    break; // the daemon is gone
                }
                acked.lock().unwrap().push(off);
                n += 1;
            }
        })
    };
    for _ in 0..500 {
        if acked.lock().unwrap().len() >= 400 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        acked.lock().unwrap().len() >= 400,
        "the writer did not get going"
    );
    // kill -9 of the supervisor and the worker, back to back.
    let st = m.status_json();
    let worker = st["worker"]["pid"].as_i64().expect("a worker pid") as i32;
    let supervisor = m.daemon_pid();
    for pid in [supervisor, worker] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    vdrep_ok(&["umount", &site.s("vm")]);
    m.mounted = false;
    // Model check on the raw state folder.
    let logged = logged_extents(&site.p("vm"));
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    println!(
        "killed after {} acknowledged O_DIRECT writes; activity log extents: {logged:?}",
        acked.len()
    );
    for off in &acked {
        assert!(
            logged.contains(&(off / EXTENT)),
            "block at {off} was written (acknowledged) but its extent {} is not in the activity log {logged:?}",
            off / EXTENT
        );
    }
    let mut tried: std::collections::BTreeSet<u64> = attempted.iter().map(|o| o / EXTENT).collect();
    tried.extend([3, 9, 17]); // kept hot by the budget
    assert!(
        logged.is_subset(&tried),
        "the log names extents neither written since the last cut nor kept hot: {logged:?} vs {tried:?}"
    );
    // Remount: an extents-only resync, started at once (window closed).
    let t0 = std::time::Instant::now();
    let mut m = site.mount_env(&[("VDREP_RETRY_SCALE", "0.005")]);
    let st = m.status_json();
    assert_eq!(st["previous_stop_clean"], false, "{st}");
    let d = &st["disks"][0];
    if d["state"]["state"] == "ResyncRequired" {
        assert_eq!(d["resync_scope"], "Extents", "{st}");
    }
    let mut done = serde_json::Value::Null;
    for _ in 0..1200 {
        let st = m.status_json();
        if st["disks"][0]["state"]["state"] == "Normal"
            && !st["replication"][0]["last_resync"].is_null()
        {
            done = st;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !done.is_null(),
        "no resync within 120 s of the remount (waiting for the window {window}?): {}",
        m.status_json()
    );
    let rs = &done["replication"][0]["last_resync"];
    let compared = rs["blocks_compared"].as_u64().unwrap() * 4096;
    println!(
        "remount after the host-crash stand-in: resync of {} extent(s) done {:.1} s after the remount (window {window} closed); compared {} MiB of a {} MiB disk ({:.1}%), {} block(s) differed",
        logged.len(),
        t0.elapsed().as_secs_f64(),
        compared >> 20,
        size >> 20,
        compared as f64 * 100.0 / size as f64,
        rs["blocks_sent"]
    );
    assert_eq!(
        compared,
        logged.len() as u64 * EXTENT,
        "not exactly the logged extents were compared (a full resync?): {done}"
    );
    same(&site.p("vm/a.img"), "raw", &site.replica("a.vhd"));
    m.umount();
}

/// The disk ids (hex) of the points of `vm`, by cycle.
fn point_disks(site: &Site) -> Vec<(u64, Vec<String>)> {
    let v = serde_json::json!({
        "points": vdrep::replica::points_in(&site.p(&format!("store/sites/site-a/vms/{}", site.vm)))
            .unwrap()
    });
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let d = p["disks"].as_array().unwrap();
            (
                p["cycle"].as_u64().unwrap(),
                d.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect()
}

/// A two-disk VM: the receiver lost the replica of one disk (its folder
/// removed) while the other one is untrusted (one block damaged, marked
/// for resync) and the mount daemon was killed (every disk needs a
/// resync at the sender). Only the lost disk is copied whole (`initial_total` is its
/// size, not both); the other keeps its replica and history (its undo
/// records from before are still there, which a whole copy deletes) and
/// is resynced by checksums (one block sent). Every point from before
/// included the lost disk, so none of them survives (they cannot rebuild
/// it); the first point after is over both disks. Before, both disks
/// were copied whole.
#[test]
fn a_lost_replica_is_copied_whole_and_the_other_disk_only_resynced() {
    require_fuse!();
    let site = Site::new("rs-lost");
    random_file(&site.p("vm/a.img"), 4 << 20, 21);
    random_file(&site.p("vm/b.img"), 4 << 20, 22);
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let mut r = Receiver::start(&site, "127.0.0.1:0");
    let addr = r.addr.clone();
    site.protect(&r, &["a.img", "b.img"], &["--resync-window", "always"]);
    site.sync_ok();
    for d in ["a.img", "b.img"] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(site.p(&format!("vm/{d}")))
            .unwrap()
            .write_all_at(&[7u8; 8192], 1 << 20)
            .unwrap();
    }
    site.sync_ok();
    let before = site.point_cycles();
    assert!(before.len() >= 2, "{before:?}");
    // The last point's applies end before the kill (`replica` waits).
    let (rep_a, rep_b) = (site.replica("a.vhd"), site.replica("b.vhd"));
    r.kill9();
    let (dir_a, dir_b) = (rep_a.parent().unwrap(), rep_b.parent().unwrap());
    let undo_b: Vec<_> = std::fs::read_dir(dir_b.join("undo"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(!undo_b.is_empty(), "b has no history to keep");
    std::fs::remove_dir_all(dir_a).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rep_b)
        .unwrap()
        .write_all_at(&[0xee; 100], 3 * 4096)
        .unwrap();
    {
        let store = vdrep::replica::Store::open(&site.p("store")).unwrap();
        let s = store.site("site-a").unwrap();
        let id_hex = dir_b.file_name().unwrap().to_str().unwrap();
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16).unwrap();
        }
        s.set_needs_resync(&site.vm, &id, Some("damaged by the test"))
            .unwrap();
    }
    // The mount daemon stops uncleanly too (a host crash): every disk is
    // `ResyncRequired` at the sender, which made the old code copy both
    // disks whole.
    kill_daemon(&mut m, &site);
    let mut m = site.mount();
    let _r = Receiver::start(&site, &addr);
    site.sync_ok();
    let st = m.status_once(|st| {
        !st["replication"][0]["last_resync"].is_null() && st["replication"][0]["state"] == "Normal"
    });
    let v = &st["replication"][0];
    assert_eq!(
        v["initial_total"],
        4 << 20,
        "only a.img is copied whole: {st}"
    );
    // The receiver says so: a `points_dropped` event naming a.img and the
    // points that included it (all of `before`: a.img was in every one).
    let ev = vdrep_ok(&["events", "--store", &site.s("store"), "--json"]);
    let dropped: Vec<serde_json::Value> = ev
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "points_dropped")
        .collect();
    assert_eq!(dropped.len(), 1, "{ev}");
    assert_eq!(dropped[0]["disk"], "a.img", "{ev}");
    assert_eq!(dropped[0]["vm"], site.vm.as_str(), "{ev}");
    let cycles: Vec<u64> = dropped[0]["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(cycles, before, "{ev}");
    assert_eq!(v["last_resync"]["mode"], "resync", "{st}");
    assert_eq!(v["last_resync"]["disk"], "b.img", "{st}");
    assert_eq!(v["last_resync"]["blocks_sent"], 1, "{st}");
    for n in &undo_b {
        assert!(
            dir_b.join("undo").join(n).exists(),
            "b.img's history record {n:?} is gone: it was copied whole"
        );
    }
    same(&site.p("vm/a.img"), "raw", &site.replica("a.vhd"));
    same(&site.p("vm/b.img"), "raw", &rep_b);
    let after = point_disks(&site);
    for c in &before {
        assert!(
            !after.iter().any(|(p, _)| p == c),
            "point {c} includes the lost disk and cannot be rebuilt, yet it is listed: {after:?}"
        );
    }
    let newest = after.last().expect("no point after the copy and resync");
    assert_eq!(newest.1.len(), 2, "{after:?}");
    m.umount();
}

/// The `compared_to` of the resync progress saved in `dir` (the mount's
/// `.vdrep/protect`); 0 while none is saved (or one is being replaced).
fn saved_resync_progress(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".resync-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| v["compared_to"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The replica's applied cycle, from its `state.json` (read directly: a
/// test's view of what the store applied, not of what it committed).
fn applied_cycle(disk_dir: &Path) -> u64 {
    let b = std::fs::read(disk_dir.join("state.json")).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&b).unwrap();
    st["cycle"].as_u64().unwrap_or(0)
}

/// The site's receiver, each apply of which first waits `ms` milliseconds
/// (`VDREP_STALL_AT=before-apply`: a slow replica disk).
fn receiver_with_slow_applies(site: &Site, ms: &str) -> Receiver {
    Receiver::spawn(
        "127.0.0.1:0",
        &site.p("store"),
        &site.p("kb"),
        &site.p("ka/site-a.crt"),
        &[],
        &[("VDREP_STALL_AT", "before-apply"), ("VDREP_STALL_MS", ms)],
    )
}

/// Every apply at the receiver waits 10 s (`VDREP_STALL_AT=before-apply`,
/// a slow replica disk): a recovery point is committed once its logs are
/// durable, so neither a resync, nor a `sync`, nor the sender's status
/// waits for the apply. The resync returns with its point committed and
/// its log not applied yet (it used to wait for the apply), and right
/// after either, the status counts nothing pending (the log is at the
/// receiver; the sender keeps it until applied, to resend it). Then the
/// applies finish and the replica is verified equal to the source.
#[test]
fn a_slow_apply_holds_neither_resync_nor_sync_nor_the_status() {
    require_fuse!();
    let site = Site::new("rs-slow-apply");
    random_file(&site.p("vm/s.img"), 16 << 20, 31);
    let mut m = site.mount();
    let r = receiver_with_slow_applies(&site, "10000");
    site.protect(&r, &["s.img"], &[]);
    // The initial copy is finished without an apply.
    site.sync_ok();
    let rep = site.replica("s.vhd");
    let disk_dir = rep.parent().unwrap().to_path_buf();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&rep)
        .unwrap();
    for b in [7u64, 300, 3001] {
        f.write_all_at(&[0xa5; 64], b * 4096 + 100).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let before = site.point_cycles();
    let rs = site.resync();
    assert_eq!(rs["blocks_sent"], 3, "{rs}");
    let after = site.point_cycles();
    let newest = *after.iter().max().unwrap();
    assert!(
        newest > *before.iter().max().unwrap(),
        "no point for the resync: {before:?} -> {after:?}"
    );
    let at = applied_cycle(&disk_dir);
    assert!(
        at < newest,
        "the resync returned only after its log was applied (replica at {at}, point {newest})"
    );
    let st = m.status_json();
    let rep_st = &st["replication"][0];
    assert_eq!(rep_st["last_resync"]["mode"], "resync", "{st}");
    assert_eq!(rep_st["bytes_pending"], 0, "{st}");
    // New writes through the mount, then a sync: right after it, nothing
    // is pending though the apply of its log is still to come.
    let src = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/s.img"))
        .unwrap();
    src.write_all_at(&vec![0x3c; 1 << 20], 4 << 20).unwrap();
    src.sync_all().unwrap();
    drop(src);
    site.sync_ok();
    let newest = *site.point_cycles().iter().max().unwrap();
    let at = applied_cycle(&disk_dir);
    assert!(
        at < newest,
        "the sync's log was applied already ({at}, {newest}): the check below proves nothing"
    );
    let st = m.status_json();
    let rep_st = &st["replication"][0];
    assert_eq!(rep_st["bytes_pending"], 0, "{st}");
    assert_eq!(rep_st["state"], "Normal", "{st}");
    assert!(rep_st["bitmap_only"].as_array().unwrap().is_empty(), "{st}");
    // The applies finish; the replica is the source.
    let (code, v) = site.verify();
    assert_eq!(code, 0, "differs after the applies: {v}");
    same(&site.p("vm/s.img"), "raw", &site.replica("s.vhd"));
    m.umount();
}

/// A log damaged at rest at the receiver after it was stored (its point
/// committed, its apply not run yet: every apply waits 3 s here): the
/// apply refuses it (`CorruptLog`, retryable), the sender sends it again,
/// the resend replaces the damaged copy (same trailer, the copy no longer
/// verifies), and the point applies: the replica ends equal to the source,
/// with no resync and no intervention. Before, the resend was answered
/// "already stored" and the error was fatal at the sender.
#[test]
fn a_log_damaged_at_rest_before_its_apply_is_sent_again_and_applied() {
    require_fuse!();
    let site = Site::new("rs-damaged-at-rest");
    random_file(&site.p("vm/d.img"), 16 << 20, 41);
    let mut m = site.mount_env(&[("VDREP_RETRY_SCALE", "0.005")]);
    let r = receiver_with_slow_applies(&site, "3000");
    site.protect(&r, &["d.img"], &[]);
    site.sync_ok();
    let disk_dir = site.replica("d.vhd").parent().unwrap().to_path_buf();
    let src = std::fs::OpenOptions::new()
        .write(true)
        .open(site.p("vm/d.img"))
        .unwrap();
    let mut rng = 99u64;
    let data: Vec<u8> = (0..(2 << 20))
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    src.write_all_at(&data, 5 << 20).unwrap();
    src.sync_all().unwrap();
    drop(src);
    site.sync_ok();
    let newest = *site.point_cycles().iter().max().unwrap();
    // The sync returned at the commit; its log waits for its apply.
    let log = disk_dir.join("incoming").join(format!("{newest}.hrl"));
    let mut bytes = std::fs::read(&log).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (applied already? replica at {})",
            log.display(),
            applied_cycle(&disk_dir)
        )
    });
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    assert!(
        applied_cycle(&disk_dir) < newest,
        "applied before the damage: the test proves nothing"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while applied_cycle(&disk_dir) < newest {
        assert!(
            std::time::Instant::now() < deadline,
            "point {newest} not applied 120 s after its log was damaged (replica at {}); status: {}",
            applied_cycle(&disk_dir),
            m.status_json()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = m.status_json();
    assert_ne!(
        st["replication"][0]["state"], "Critical",
        "the sender gave up: {st}"
    );
    // The receiver said so once (an event for the pager), not per retry.
    let ev = vdrep_ok(&["events", "--store", &site.s("store"), "--json"]);
    let failed: Vec<serde_json::Value> = ev
        .lines()
        .filter(|l| l.contains("\"apply_failed\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(failed.len(), 1, "{ev}");
    assert_eq!(failed[0]["cycle"].as_u64(), Some(newest), "{ev}");
    assert_eq!(failed[0]["retryable"], true, "{ev}");
    assert_eq!(failed[0]["vm"], "rs-damaged-at-rest", "{ev}");
    let (code, v) = site.verify();
    assert_eq!(code, 0, "differs after the resend: {v}");
    same(&site.p("vm/d.img"), "raw", &site.replica("d.vhd"));
    m.umount();
}
