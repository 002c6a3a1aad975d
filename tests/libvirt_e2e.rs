//! Issue 10: VMs, not disk files. Two sites on loopback with one libvirtd
//! (tests/libvirtutil): a TCG domain booting the tiny test VM by direct
//! kernel boot, with a qcow2 disk (vda, the guest's file system) and a raw
//! one (vdb), is protected by name; a test failover defines and boots
//! `NAME-test` from an older point on an isolated network while the domain
//! runs again and replication goes on; an unplanned failover to that point
//! starts the domain at the replica site with its NIC on the mapped
//! network; a planned failover of the running domain starts it at the
//! other site with nothing lost, and back; and every refusal changes
//! nothing.
//!
//! Boot verification and recovery plans wait until a started copy is
//! ready: `verify --boot` by the guest agent's answer (a good point) or a
//! console marker (a damaged point fails), a two-group plan whose second
//! group starts only after the first group's domain answered `guest-ping`,
//! a group whose `wait_for` never succeeds stopping the plan, and the
//! receiver's scheduled check (`--verify-boot daily`) recording a point.
//!
//! A consistency group of two domains (part 9) shares every point, gets
//! both test copies from one group point, and fails over planned as a
//! group: both guests shut down cleanly at A, both started at B from the
//! final group point, and back.
//!
//! The domain's definition travels with every point: a disk added to the
//! domain is replicated from the next cut on (its own initial copy), and a
//! failover to a point before the change gets the definition of then.
//!
//! The guest's `write` mode prints `PREVIOUS TAG T` (the tag already on
//! its disk) before writing its own: that is how a console shows which
//! point's data a VM booted from. The first two points are stamped on the
//! host (an ext4 file system holding the tag, written into the qcow2
//! through the mount); the guest boots to the end only for the test copy
//! (its console is the proof), other cases check the disks on the host.

mod common;
mod libvirtutil;
mod mountutil;
mod skip;
mod stamputil;

use std::path::Path;
use std::time::Duration;

use libvirtutil::{define, domain_xml, Libvirt};
use mountutil::{require_fuse, vdrep, vdrep_ok, TwoSites};

const WEB1: &str = "vdrep-e2e-web1";
const PROD: &str = "vdrep-e2e-prod";
const DR: &str = "vdrep-e2e-dr";
const ISOLATED: &str = "vdrep-e2e-isolated";
const OUTSIDE: &str = "vdrep-e2e-outside";
const PLAIN: &str = "vdrep-e2e-plain";
/// The two domains of the consistency group (part 9).
const ERP: [&str; 2] = ["vdrep-e2e-erp-db", "vdrep-e2e-erp-app"];
const BOOT: Duration = Duration::from_secs(300);

fn libvirt_or_skip() -> Option<Libvirt> {
    match Libvirt::start() {
        Ok(l) => Some(l),
        Err(why) => {
            skip::skip(&format!("SKIP: libvirt: {why}"));
            None
        }
    }
}

/// Everything the test defines, removed before (a crashed run's) and after.
struct Cleanup<'a>(&'a Libvirt);
impl Cleanup<'_> {
    fn run(&self) {
        for d in [WEB1, &format!("{WEB1}-test"), OUTSIDE] {
            self.0.remove_domain(d);
        }
        for d in ERP {
            self.0.remove_domain(d);
            self.0.remove_domain(&format!("{d}-test"));
        }
        for n in [PROD, DR, ISOLATED] {
            self.0.remove_network(n);
        }
    }
}
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.run();
    }
}

fn cmdline(tag: &str) -> String {
    // No proof blocks (vdrep.mb=0): only the tag is checked here, and the
    // guest's awk writing them is most of a TCG boot's time.
    format!("console=ttyS0 panic=-1 vdrep.mode=write vdrep.tag={tag} vdrep.mb=0")
}

/// The recovery point `vdrep sync` reports for `vm`.
fn sync_point(dir: &str, vm: &str) -> u64 {
    let out = vdrep_ok(&["sync", dir, "--timeout", "300"]);
    out.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{vm}: recovery point "))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no recovery point of {vm} in {out:?}"))
}

/// Stamp `tag` on the domain's qcow2 disk from the host, as the guest's
/// `write` mode leaves it: an ext4 file system whose `vdrep-proof.tag`
/// holds the tag, written into the existing image (`convert -n`: the
/// tracked file is rewritten in place, not replaced).
fn stamp(os: &Path, tag: &str) {
    let t = tempfile::tempdir().unwrap();
    let stage = t.path().join("stage");
    std::fs::create_dir(&stage).unwrap();
    std::fs::write(stage.join("vdrep-proof.tag"), format!("{tag}\n")).unwrap();
    let raw = t.path().join("fs.raw");
    mountutil::run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            stage.to_str().unwrap(),
            raw.to_str().unwrap(),
            "64M",
        ],
    );
    mountutil::run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            os.to_str().unwrap(),
        ],
    );
}

/// The tag on a qcow2 disk `stamp` (or the guest's `write` mode) left.
fn tag_of(qcow2: &Path) -> String {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("fs.raw");
    mountutil::run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let o = std::process::Command::new("debugfs")
        .args(["-R", "cat /vdrep-proof.tag", raw.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `points --json` of `vm` in site-b's store: (cycle, disk count,
/// definition), newest first.
fn points_full(s: &TwoSites, vm: &str) -> Vec<(u64, usize, Option<String>)> {
    points_in(&s.p("store"), vm)
}

/// `points --json` of `vm` in `store`.
fn points_in(store: &Path, vm: &str) -> Vec<(u64, usize, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
        "points",
        vm,
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    v["points"]
        .as_array()
        .unwrap_or_else(|| panic!("points --json: {v}"))
        .iter()
        .map(|p| {
            (
                p["cycle"].as_u64().unwrap_or(0),
                p["disks"].as_array().map_or(0, Vec::len),
                p["definition"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn text(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

fn guest_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.split_once("VDREP-GUEST: ").map(|(_, m)| m.trim()))
        .collect()
}

fn points(s: &TwoSites, vm: &str) -> Vec<u64> {
    points_full(s, vm).into_iter().map(|(c, _, _)| c).collect()
}

const STAMP_AT: u64 = 1 << 20;

/// Write `tag` into the raw disk `file` (the guest never touches it) from
/// the host, through the mount, durably: an acknowledged write.
fn host_stamp(file: &Path, tag: &str) {
    host_stamp_at(file, tag, STAMP_AT);
}

/// [`host_stamp`] at byte `at`.
fn host_stamp_at(file: &Path, tag: &str, at: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, tag.as_bytes(), at).unwrap();
    f.sync_all().unwrap();
}

fn has_stamp(file: &Path, tag: &str) -> bool {
    has_stamp_at(file, tag, STAMP_AT)
}

fn has_stamp_at(file: &Path, tag: &str, at: u64) -> bool {
    let f = std::fs::File::open(file).unwrap();
    let mut b = vec![0u8; tag.len()];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    b == tag.as_bytes()
}

/// Whether the 4 KiB block at `at` of `file`, read with O_DIRECT (past
/// the page cache), holds `tag`.
fn direct_has(file: &Path, tag: &str, at: u64) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .unwrap();
    let mut a = stamputil::Aligned::new();
    f.read_exact_at(a.buf(), at).unwrap();
    a.buf().windows(tag.len()).any(|w| w == tag.as_bytes())
}

/// Wait until the idle guest of domain `name` says IDLE on `console`
/// (its acpid is up then: a shutdown request stops it cleanly).
fn wait_idle(lv: &Libvirt, name: &str, console: &Path) {
    let t0 = std::time::Instant::now();
    while !text(console).contains("VDREP-GUEST: IDLE") {
        assert!(lv.running(name), "{name} stopped: {}", text(console));
        assert!(t0.elapsed() < BOOT, "{name}: no IDLE: {}", text(console));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The tiny VM idling with acpid and without its agent (a shutdown
/// request is the ACPI power button, which it obeys).
const IDLE_NO_AGENT: &str = "console=ttyS0 panic=-1 vdrep.mode=idle vdrep.agent=0";

/// The disk files of domain `name`'s persistent definition.
fn disk_files(name: &str) -> Vec<String> {
    libvirtutil::virsh_ok(&["domblklist", name, "--inactive"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// `vdrep failover --planned --domain WEB1` run at the site whose tracking
/// folder is `dir`, giving the guest `shutdown` seconds to power off.
fn planned_run(
    dir: &Path,
    store: &Path,
    reverse_to: &str,
    map: &str,
    shutdown: u64,
) -> std::process::Output {
    vdrep(&[
        "failover",
        "--planned",
        "--domain",
        WEB1,
        "--dir",
        dir.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--reverse-to",
        reverse_to,
        "--network-map",
        map,
        "--shutdown-timeout",
        &shutdown.to_string(),
    ])
}

/// [`planned_run`], which must succeed; its stdout and stderr.
fn planned(
    dir: &Path,
    store: &Path,
    reverse_to: &str,
    map: &str,
    shutdown: u64,
) -> (String, String) {
    let o = planned_run(dir, store, reverse_to, map, shutdown);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "planned failover: {out}{err}");
    (out, err)
}

/// Run `args`, which must fail with exit code 2 and a message containing
/// every one of `words`.
fn refused(args: &[&str], words: &[&str]) -> String {
    let o = vdrep(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "vdrep {args:?}: {err}");
    for w in words {
        assert!(err.contains(w), "vdrep {args:?}: {w:?} not in {err:?}");
    }
    err
}

#[test]
fn a_domain_is_protected_by_name_and_failed_over_as_a_vm() {
    require_fuse!();
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let Some(lv) = libvirt_or_skip() else { return };
    step("libvirtd answers");
    let vm_dir = match common::ensure_vm() {
        Ok(d) => d,
        Err(e) => {
            skip::skip(&format!("SKIP: the tiny VM: {e}"));
            return;
        }
    };
    step("tiny VM ready");
    let c = Cleanup(&lv);
    c.run();
    lv.isolated_network(PROD);
    lv.isolated_network(DR);
    step("leftovers removed, networks up");

    let s = TwoSites::new();
    let rb = s.receiver("127.0.0.1:0");
    let _m = s.mount();
    // Dropped before the mount (declared after it): a panicking run
    // destroys its domains first, else unmounting a folder a running QEMU
    // holds hangs the teardown.
    let _domains_first = Cleanup(&lv);
    step("keys, receiver, mount");
    let os = s.p("vm/os.qcow2");
    let data = s.p("vm/data.img");
    mountutil::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", os.to_str().unwrap(), "64M"],
    );
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let extra = s.p("vm/extra.img");
    let console = s.p("web1-console.log");
    let xml_for = |cmd: &str, with_extra: bool| {
        let mut disks = vec![
            (os.as_path(), "qcow2", "vda"),
            (data.as_path(), "raw", "vdb"),
        ];
        if with_extra {
            disks.push((extra.as_path(), "raw", "vdc"));
        }
        domain_xml(
            (WEB1, "6d1c3e0a-2f47-4b7e-9a51-0c9e8e2b7a01"),
            &vm_dir,
            cmd,
            &disks,
            PROD,
            &console,
        )
    };
    let xml = |tag: &str, with_extra: bool| xml_for(&cmdline(tag), with_extra);
    let boot = |tag: &str| {
        define(&xml(tag, true));
        libvirtutil::virsh_ok(&["start", WEB1]);
    };

    // Refusals before anything is protected (must-show 7).
    refused(
        &[
            "protect",
            "--domain",
            "vdrep-e2e-nosuch",
            "--to",
            &rb.addr,
            "--trust",
            &s.s("kb/site-b.crt"),
        ],
        &["vdrep-e2e-nosuch", "no libvirt domain"],
    );
    step("refused: no such domain");
    std::fs::create_dir_all(s.p("elsewhere")).unwrap();
    let outside = s.p("elsewhere/x.img");
    std::fs::File::create(&outside)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    define(&domain_xml(
        (OUTSIDE, "6d1c3e0a-2f47-4b7e-9a51-0c9e8e2b7a02"),
        &vm_dir,
        &cmdline("x"),
        &[(&os, "qcow2", "vda"), (&outside, "raw", "vdb")],
        PROD,
        &s.p("outside-console.log"),
    ));
    refused(
        &[
            "protect",
            "--domain",
            OUTSIDE,
            "--to",
            &rb.addr,
            "--trust",
            &s.s("kb/site-b.crt"),
        ],
        &[
            "vdb",
            outside.to_str().unwrap(),
            "not under a running vdrep mount",
            "vdrep mount",
        ],
    );
    let st = vdrep_ok(&["status", "--json", &s.s("vm")]);
    assert!(
        !st.contains(OUTSIDE),
        "a refused domain got protected: {st}"
    );

    step("refusals before protect");

    // 1. web1 (stopped) holds p1; protected by name (both disks).
    define(&xml("p1", false));
    stamp(&os, "p1");
    let trust_b = s.s("kb/site-b.crt");
    // `protect WHAT... --to B --every 1h`.
    let protect = |what: &[&str]| {
        let to = ["--to", &rb.addr, "--trust", &trust_b, "--every", "1h"];
        vdrep(&[&["protect"], what, &to[..]].concat())
    };
    let o = protect(&["--domain", WEB1]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "protect --domain: {out}{err}");
    assert!(out.contains("2 disk(s)"), "{out}");
    assert!(
        !err.contains("guest agent"),
        "it has the agent channel: {err}"
    );
    step("protect --domain");
    let p1 = sync_point(&s.s("vm"), WEB1);
    step("p1");
    stamp(&os, "p2");
    step("p2 stamped");
    let p2 = sync_point(&s.s("vm"), WEB1);
    assert!(p2 > p1);
    let pts = points(&s, WEB1);
    assert!(
        pts.contains(&p1) && pts.contains(&p2),
        "p1 {p1}, p2 {p2}, points {pts:?}\npoints --json: {}\nstatus --json: {}",
        vdrep(&["points", WEB1, "--store", &s.s("store"), "--json"])
            .stdout
            .escape_ascii(),
        vdrep(&["status", "--json", &s.s("vm")])
            .stdout
            .escape_ascii()
    );
    step("protected, p1 and p2");

    // 5. A disk added to the domain: the cut that sees the change is a
    //    point of the old disks (with the old definition); the next one has
    //    the new disk (its own initial copy) and the new definition.
    {
        let f = std::fs::File::create(&extra).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"EXTRA-DISK-MARK", 4096).unwrap();
    }
    define(&xml("p3", true));
    let pa = sync_point(&s.s("vm"), WEB1);
    let pb = sync_point(&s.s("vm"), WEB1);
    assert!(pb > pa && pa > p2, "{p2} {pa} {pb}");
    let full = points_full(&s, WEB1);
    // Must-show 1: the definition is in points --json for every point.
    for (c, _, d) in &full {
        let d = d
            .as_deref()
            .unwrap_or_else(|| panic!("point {c} has no definition: {full:?}"));
        assert!(d.contains(&format!("<name>{WEB1}</name>")), "{d}");
    }
    let of = |c: u64| {
        full.iter()
            .find(|p| p.0 == c)
            .cloned()
            .unwrap_or_else(|| panic!("no point {c} in {full:?}"))
    };
    let extra_s = extra.to_str().unwrap();
    for c in [p1, p2, pa] {
        let (_, n, d) = of(c);
        assert_eq!(n, 2, "point {c} is of the two old disks");
        assert!(!d.unwrap_or_default().contains(extra_s), "point {c}");
    }
    let newest = full.first().map(|p| p.0).unwrap_or(0);
    for c in [pb, newest] {
        let (_, n, d) = of(c);
        assert_eq!(n, 3, "point {c} has the added disk");
        assert!(d.unwrap_or_default().contains(extra_s), "point {c}");
    }
    step("added disk replicated");

    // 2. Test failover of p1 while web1 runs again and replicates (a host
    //    write through the mount becomes point p3 while the test copy is
    //    up); web1 is then stopped, so the test VM's boot has the CPU.
    boot("p3");
    step("web1 started");
    let store = s.s("store");
    let p1s = p1.to_string();
    let out = vdrep_ok(&[
        "failover",
        "--test",
        "--domain",
        WEB1,
        "--point",
        &p1s,
        "--store",
        &store,
        "--test-network",
        ISOLATED,
    ]);
    let test = format!("{WEB1}-test");
    step("test failover started");
    let log = out
        .lines()
        .find_map(|l| {
            l.split_once("serial console log ")
                .map(|(_, p)| p.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no console log in {out:?}"));
    assert!(lv.domain_exists(&test));
    let nics = lv.nics(&test);
    let orig = lv.nics(WEB1);
    assert_eq!(nics.len(), 1, "{nics:?}");
    assert_eq!(nics[0].0, ISOLATED, "the test copy's NIC: {nics:?}");
    assert_ne!(nics[0].1, orig[0].1, "the test copy needs a new MAC");
    // The definition of point p1 (two disks), not web1's of now (three).
    let tx = libvirtutil::virsh_ok(&["dumpxml", "--inactive", &test]);
    assert_eq!(tx.matches("<disk ").count(), 2, "{tx}");
    assert!(!tx.contains("extra.img"), "{tx}");
    // --test while one runs is refused, nothing changes.
    refused(
        &[
            "failover",
            "--test",
            "--domain",
            WEB1,
            "--store",
            &store,
            "--test-network",
            ISOLATED,
        ],
        &["test failover of", "is running"],
    );
    step("second --test refused");
    host_stamp(&data, "P3-DURING-TEST");
    let p3 = sync_point(&s.s("vm"), WEB1);
    assert!(p3 > p2, "replication went on during the test failover");
    assert!(lv.running(WEB1), "web1 kept running");
    assert!(lv.domain_exists(&test), "the test copy is up meanwhile");
    // Must-show 1 while the domain runs: the point cut then carries the
    // definition too.
    let running_def = points_full(&s, WEB1)
        .into_iter()
        .find(|p| p.0 == p3)
        .and_then(|p| p.2)
        .unwrap_or_default();
    assert!(
        running_def.contains(&format!("<name>{WEB1}</name>")),
        "point {p3}, cut while {WEB1} ran, has no definition"
    );
    libvirtutil::virsh_ok(&["destroy", WEB1]);
    step("p3 synced while the test copy runs");
    lv.wait_stopped(&test, BOOT);
    step("test VM stopped");
    let tl = text(Path::new(&log));
    let g = guest_lines(&tl);
    assert!(
        g.contains(&"PREVIOUS TAG p1"),
        "the test VM must see point {p1}'s data: {tl}"
    );
    let view = s.p("store/failover/site-a").join(WEB1);
    vdrep_ok(&["failover", "--cleanup", "--domain", WEB1, "--store", &store]);
    assert!(!lv.domain_exists(&test), "cleanup left the test domain");
    assert!(
        !lv.network_exists(ISOLATED),
        "cleanup left the isolated network"
    );
    assert!(
        !mountutil::is_mountpoint(&view),
        "cleanup left the view mounted"
    );
    step("cleanup done");

    // 3. Unplanned failover to p1 at the replica site, NIC mapped to DR.
    //    A map naming a missing network is refused first, changing nothing.
    let pts_before = points(&s, WEB1);
    refused(
        &[
            "failover",
            "--unplanned",
            "--domain",
            WEB1,
            "--point",
            &p1s,
            "--store",
            &store,
            "--network-map",
            &format!("{PROD}=vdrep-e2e-nosuchnet"),
        ],
        &["vdrep-e2e-nosuchnet", "no libvirt network"],
    );
    step("map refusal");
    assert!(
        !s.p("store/live").join("site-a").join(WEB1).exists(),
        "a refused failover promoted"
    );
    assert_eq!(
        points(&s, WEB1),
        pts_before,
        "a refused failover changed the points"
    );
    // The live disks' mount, stopped by the cancel below (or on a panic).
    let mut live = mountutil::Mounted {
        dir: s.p("store/live/site-a").join(WEB1),
        mounted: true,
    };
    let out = vdrep_ok(&[
        "failover",
        "--unplanned",
        "--domain",
        WEB1,
        "--point",
        &p1s,
        "--store",
        &store,
        "--network-map",
        &format!("{PROD}={DR}"),
    ]);
    assert!(out.contains(&format!("domain {WEB1} started")), "{out}");
    step("unplanned failover started");
    let nics = lv.nics(WEB1);
    assert_eq!(nics[0].0, DR, "the failed-over NIC: {nics:?}");
    let fx = libvirtutil::virsh_ok(&["dumpxml", "--inactive", WEB1]);
    assert_eq!(fx.matches("<disk ").count(), 2, "p1's definition: {fx}");
    // The same VM as at p1: the MAC of p1's definition (each `virsh
    // define` of the test's XML, which names none, drew a new one).
    let p1_def = of(p1).2.unwrap_or_default();
    let p1_mac = p1_def
        .split_once("<mac address='")
        .and_then(|(_, r)| r.split_once('\''))
        .map(|(m, _)| m.to_string())
        .unwrap_or_else(|| panic!("no MAC in p1's definition: {p1_def}"));
    assert_eq!(nics[0].1, p1_mac, "the same VM keeps its MAC");
    // It runs on the live disks, which hold p1's data (read on the host:
    // the test copy's boot above already showed a guest reading a
    // point's data through a rewritten definition).
    assert!(lv.running(WEB1), "the failed-over domain runs");
    libvirtutil::virsh_ok(&["destroy", WEB1]);
    let files = disk_files(WEB1);
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        assert!(Path::new(f).starts_with(&live.dir), "{f}: not a live disk");
    }
    assert!(
        fx.contains("type='qcow2'"),
        "the qcow2 disk stays qcow2: {fx}"
    );
    assert_eq!(tag_of(&live.dir.join("os.qcow2")), "p1", "p1's data");
    // Cancel behaves as today (with --domain it also undefines the copy).
    vdrep_ok(&["failover", "--cancel", "--domain", WEB1, "--store", &store]);
    live.mounted = false;
    assert!(!lv.domain_exists(WEB1));
    assert!(
        !mountutil::is_mountpoint(&live.dir),
        "cancel left the live disks mounted"
    );
    let pts = points(&s, WEB1);
    assert!(pts.contains(&p3), "cancel brings every point back: {pts:?}");
    step("unplanned failover and cancel");

    // 4. Planned failover of the running domain A -> B, then back. At A
    //    the guest idles without its agent (vdrep.agent=0), so libvirt's
    //    shutdown is the ACPI power button, which the guest's acpid turns
    //    into a clean power-off (idle mode never stops on its own: a clean
    //    stop is the button's work); at B the guest is still booting, so
    //    that stop is the timeout, then destroy. The stamps are host
    //    writes through the mount while the domain runs, made after the
    //    last sync: only the planned failover's last cycle ships them.
    std::fs::create_dir_all(s.p("store-a")).unwrap();
    let ra = mountutil::Receiver::spawn(
        "127.0.0.1:0",
        &s.p("store-a"),
        &s.p("ka"),
        &s.p("kb/site-b.crt"),
        &[],
        &[],
    );
    define(&xml_for(IDLE_NO_AGENT, true));
    libvirtutil::virsh_ok(&["start", WEB1]);
    wait_idle(&lv, WEB1, &console);
    step("idle guest up at A");
    // A refusal at the other site (a map naming a network missing there)
    // comes before anything changes here: typed (exit 2), the domain
    // still running, the same boot (same domain id, one BOOTED line),
    // the disks not fenced (the stamp below is a write through the mount).
    let domid = libvirtutil::virsh_ok(&["domid", WEB1]);
    let o = planned_run(
        &s.p("vm"),
        &s.p("store-a"),
        &ra.addr,
        &format!("{PROD}=vdrep-e2e-nosuchnet"),
        60,
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "refused at the other site: {err}");
    assert!(
        err.contains("refused") && err.contains("vdrep-e2e-nosuchnet"),
        "{err}"
    );
    assert!(lv.running(WEB1), "a refusal there stopped the domain here");
    assert_eq!(libvirtutil::virsh_ok(&["domid", WEB1]), domid, "rebooted");
    assert_eq!(text(&console).matches("VDREP-GUEST: BOOTED").count(), 1);
    step("refused by the other site, domain untouched");
    host_stamp(&data, "PLANNED-AT-A");
    let b_live = s.p("store/live/site-a").join(WEB1);
    let mut b_mount = mountutil::Mounted {
        dir: b_live.clone(),
        mounted: true,
    };
    let (out, err) = planned(
        &s.p("vm"),
        &s.p("store-a"),
        &ra.addr,
        &format!("{PROD}={DR}"),
        60,
    );
    assert!(
        err.contains("shut down cleanly") && !err.contains("destroyed"),
        "the power button must stop the guest cleanly: {err}"
    );
    assert!(out.contains(&format!("domain {WEB1} started")), "{out}");
    assert!(lv.running(WEB1), "the domain runs at B");
    let files = disk_files(WEB1);
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        assert!(
            Path::new(f).starts_with(&b_live),
            "{f} is not B's live disk"
        );
    }
    assert_eq!(lv.nics(WEB1)[0].0, DR, "the NIC is mapped at B");
    assert!(
        has_stamp(&b_live.join("data.img"), "PLANNED-AT-A"),
        "a write acknowledged at A before the planned failover is lost"
    );
    assert!(
        !mountutil::is_mountpoint(&s.p("vm")),
        "A still mounts the disks"
    );
    // The reverse direction's points carry the domain's definition at B.
    let back = sync_point(b_live.to_str().unwrap(), WEB1);
    let at_a = points_in(&s.p("store-a"), WEB1);
    let def_b = at_a
        .iter()
        .find(|p| p.0 == back)
        .and_then(|p| p.2.clone())
        .unwrap_or_default();
    assert!(
        def_b.contains(b_live.to_str().unwrap()),
        "point {back} back at A has no definition of the domain at B: {at_a:?}"
    );
    step("planned failover A -> B");

    // Failback B -> A, the same way, from the final point's definition.
    host_stamp(&b_live.join("data.img"), "PLANNED-AT-B");
    let (out, _) = planned(&b_live, &s.p("store"), &rb.addr, &format!("{DR}={PROD}"), 2);
    b_mount.mounted = false;
    assert!(out.contains(&format!("domain {WEB1} started")), "{out}");
    assert!(lv.running(WEB1), "the domain runs at A again");
    for f in disk_files(WEB1) {
        assert!(Path::new(&f).starts_with(s.p("vm")), "{f} is not A's disk");
    }
    assert_eq!(lv.nics(WEB1)[0].0, PROD, "the NIC is mapped back at A");
    assert!(
        has_stamp(&data, "PLANNED-AT-B"),
        "the failback lost a write"
    );
    step("planned failback B -> A");

    // 6. verify --boot: a good point is verified (ready: the copy's guest
    //    agent answers guest-ping; the domain's definition now runs the
    //    guest idle with its agent, so the points from here on boot to an
    //    agent that answers); a point whose replica was damaged behind
    //    vdrep's back (the qcow2 header zeroed in B's store) is marked
    //    failed, and `points` shows both. A plain VM (a file of the same
    //    folder) joins for the recovery plans of 7.
    define(&xml_for("console=ttyS0 panic=-1 vdrep.mode=idle", true));
    let plain = s.p("vm/plain.img");
    std::fs::File::create(&plain)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let o = protect(&[PLAIN, plain.to_str().unwrap()]);
    assert!(o.status.success(), "protect {PLAIN}: {o:?}");
    let good = sync_point(&s.s("vm"), WEB1);
    let verify = |point: u64, marker: Option<&str>| {
        let p = point.to_string();
        let mut args = vec![
            "verify",
            WEB1,
            "--boot",
            "--store",
            &store,
            "--point",
            &p,
            "--boot-timeout",
            "300",
        ];
        if let Some(m) = marker {
            args.extend(["--marker", m]);
        }
        vdrep(&args)
    };
    let o = verify(good, None);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "verify --boot of {good}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("booted") && out.contains("guest-ping"),
        "{out}"
    );
    assert!(!lv.domain_exists(&test), "verify left the test copy");
    step("verify --boot: good point, agent ready");

    // 7. Recovery plans that wait for readiness. Group "db" names the
    //    domain: its test copy is started and the plan waits until its
    //    guest agent answers; only then does group "app" start, whose pre
    //    script asks that agent itself (so it fails, and the plan with it,
    //    if "app" started before the agent was up: a TCG boot takes
    //    15-60 s) and records that it ran.
    let events = s.p("plan-events");
    let plan = s.p("ready.plan");
    // (Scripts run in every mode: the cleanup of the plan skips the ping.)
    let pre = format!(
        "test \"$VDREP_PLAN_MODE\" = cleanup || {{ virsh -q -c qemu:///system qemu-agent-command {test} '{{\"execute\":\"guest-ping\"}}' --timeout 5 && echo app-started-after-agent-answered >> {}; }}",
        events.display()
    );
    std::fs::write(
        &plan,
        format!(
            "[[group]]\nname = \"db\"\ndomains = [\"{WEB1}\"]\nready_timeout = 300\n\n[[group]]\nname = \"app\"\npre = \"{}\"\nvms = [\"{PLAIN}\"]\n",
            pre.replace('\\', "\\\\").replace('"', "\\\"")
        ),
    )
    .unwrap();
    let plan_run = |plan: &Path, extra: &[&str]| {
        let mut args = vec![
            "plan",
            "failover",
            plan.to_str().unwrap(),
            "--test",
            "--store",
            &store,
        ];
        args.extend(extra);
        vdrep(&args)
    };
    let o = plan_run(&plan, &["--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "the plan failed: {out}{err}");
    assert_eq!(
        text(&events),
        "app-started-after-agent-answered\n",
        "group app ran before db's agent answered (or not at all): {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = v["groups"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(g.len(), 2, "{v}");
    assert_eq!(g[0]["domains"][0]["vm"], WEB1, "{v}");
    assert_eq!(g[0]["domains"][0]["ready"], true, "{v}");
    let ready_at = g[0]["ready_at"].as_f64().unwrap_or_else(|| panic!("{v}"));
    assert!(
        g[1]["started_at"].as_f64().unwrap_or(0.0) >= ready_at,
        "app started before db was ready: {v}"
    );
    let kinds: Vec<(String, String)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["phase"].as_str().unwrap_or("").to_string(),
                s["what"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let k = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        kinds,
        vec![
            k("failover", WEB1),
            k("ready", WEB1),
            k("pre", "pre"),
            k("failover", PLAIN)
        ],
        "{v}"
    );
    assert!(lv.running(&test), "the plan's test copy runs");
    let o = plan_run(&plan, &["--cleanup"]);
    assert!(o.status.success(), "plan cleanup: {o:?}");
    assert!(!lv.domain_exists(&test), "plan cleanup left the test copy");
    step("plan: app started only after db's agent answered");
    // A group whose wait_for never succeeds: a typed not_ready naming the
    // domain, and the next group is not started.
    let plan2 = s.p("notready.plan");
    let events2 = s.p("plan-events-2");
    std::fs::write(
        &plan2,
        format!(
            "[[group]]\nname = \"db\"\ndomains = [\"{WEB1}\"]\nwait_for = \"false\"\nready_timeout = 2\n\n[[group]]\nname = \"app\"\npre = \"echo app >> {}\"\nvms = [\"{PLAIN}\"]\n",
            events2.display()
        ),
    )
    .unwrap();
    let o = plan_run(&plan2, &["--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = v["steps"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["phase"] == "ready"))
        .cloned()
        .unwrap_or_else(|| panic!("no ready step: {v}"));
    assert_eq!(r["ok"], false, "{v}");
    assert_eq!(r["error_kind"], "not_ready", "{v}");
    let why = r["output"].as_str().unwrap_or_default();
    assert!(
        why.contains(&test) && why.contains("wait_for `false`"),
        "the error names the domain and what failed: {why}"
    );
    assert!(
        !events2.exists(),
        "group app started after db was not ready"
    );
    assert!(
        !v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["group"] == "app"),
        "{v}"
    );
    // (Its plan's cleanup would fail on the plain VM that never failed over.)
    vdrep_ok(&["failover", "--cleanup", "--domain", WEB1, "--store", &store]);
    assert!(!lv.domain_exists(&test), "cleanup left the test copy");
    step("plan: wait_for failed, next group not started");
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.replica(WEB1, "os.qcow2"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    let bad = sync_point(&s.s("vm"), WEB1);
    let o = verify(bad, Some("VDREP-GUEST: BOOTED"));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify --boot of the damaged {bad}: {out}"
    );
    assert!(out.contains("FAILED"), "{out}");
    assert!(!lv.domain_exists(&test), "verify left the test copy");
    let v: serde_json::Value =
        serde_json::from_str(&vdrep_ok(&["points", WEB1, "--store", &store, "--json"])).unwrap();
    let boot_of = |c: u64| {
        v["points"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["cycle"].as_u64() == Some(c)))
            .map(|p| p["boot"].clone())
            .unwrap_or_default()
    };
    assert_eq!(boot_of(good)["verified"], true, "{v}");
    assert_eq!(boot_of(bad)["verified"], false, "{v}");
    assert!(
        boot_of(bad)["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("did not start"),
        "the failure says why: {v}"
    );
    let table = vdrep_ok(&["points", WEB1, "--store", &store]);
    assert!(
        table.contains("FAILED") && table.contains(" ok "),
        "{table}"
    );
    step("verify --boot: good and damaged");

    // 8. The receiver's scheduled boot verification (`--verify-boot daily`,
    //    as `verify_boot = "daily"` in [receiver]): a domain VM never
    //    checked is due at once (WEB1's checks are removed here to make it
    //    one). Its newest point is the damaged one, so the scheduled check
    //    fails fast (the copy does not start: no boot), is kept with the
    //    point (`points`) and emitted as a `boot_verified` event.
    let newest = points(&s, WEB1)[0];
    assert_eq!(newest, bad, "no point after the damaged one");
    std::fs::remove_dir_all(s.p("store/verify/site-a").join(WEB1)).unwrap();
    drop(rb);
    let _rb = mountutil::Receiver::spawn(
        "127.0.0.1:0",
        &s.p("store"),
        &s.p("kb"),
        &s.p("ka/site-a.crt"),
        &["--verify-boot", "daily"],
        &[],
    );
    let t_sched = std::time::Instant::now();
    let check = loop {
        let v: serde_json::Value =
            serde_json::from_str(&vdrep_ok(&["points", WEB1, "--store", &store, "--json"]))
                .unwrap();
        let b = v["points"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["cycle"].as_u64() == Some(bad)))
            .map(|p| p["boot"].clone())
            .unwrap_or_default();
        if !b.is_null() {
            break b;
        }
        assert!(
            t_sched.elapsed() < Duration::from_secs(120),
            "the scheduled check did not run: {v}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(check["verified"], false, "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("did not start"),
        "{check}"
    );
    // (The event follows the record: the receiver emits it once the
    // check's process has ended.)
    let boot_ev = loop {
        let ev = vdrep_ok(&["events", "--store", &store, "--json"]);
        if let Some(l) = ev.lines().find(|l| l.contains("\"boot_verified\"")) {
            break l.to_string();
        }
        assert!(
            t_sched.elapsed() < Duration::from_secs(150),
            "no boot_verified event: {ev}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let e: serde_json::Value = serde_json::from_str(&boot_ev).unwrap();
    assert_eq!(e["vm"], WEB1, "{e}");
    assert_eq!(e["cycle"].as_u64(), Some(bad), "{e}");
    assert_eq!(e["verified"], false, "{e}");
    assert!(
        !lv.domain_exists(&test),
        "the scheduled check left the test copy"
    );
    lv.remove_domain(WEB1);
    step("scheduled boot verification");

    // 9. A consistency group of two domains: one host-side stamped writer
    //    through the mount stands in for both guests (no boot), writing to
    //    either domain's disk in one global order; every group point holds
    //    one prefix of that order across both domains' disks. `failover
    //    --group --test` defines and starts both `*-test` copies on the
    //    isolated network; `--cleanup` removes both. Then the planned
    //    failover of the group: both idle guests shut down cleanly at A (at
    //    once), one final group point, both domains defined and running at
    //    B on one live folder with their NICs mapped, host stamps written
    //    at A after the last sync there (nothing lost); failback the same
    //    way. (Its own receiver: the one above checks boots on a
    //    schedule. The host stamps lie past the stamped writer's region,
    //    and the idle guests never write their disks.)
    std::fs::create_dir_all(s.p("store-g")).unwrap();
    let rg = mountutil::Receiver::spawn(
        "127.0.0.1:0",
        &s.p("store-g"),
        &s.p("kb"),
        &s.p("ka/site-a.crt"),
        &[],
        &[],
    );
    // The group's own folder (no other VM there): A's mount ends when the
    // group leaves, and the failback mounts it afresh. (Failing back into
    // a folder that stayed mounted serves the kernel's stale cached pages
    // of a disk taken back: kernel-notes/libvirt.md.)
    std::fs::create_dir_all(s.p("vmg")).unwrap();
    let mut g_a = mountutil::Mounted::new(&s.p("vmg"), &["--keys", &s.s("ka")]);
    let _erp_first = Cleanup(&lv);
    let gdisks = [s.p("vmg/d0.img"), s.p("vmg/d1.img")];
    for (i, (name, uuid)) in ERP
        .iter()
        .zip([
            "6d1c3e0a-2f47-4b7e-9a51-0c9e8e2b7a03",
            "6d1c3e0a-2f47-4b7e-9a51-0c9e8e2b7a04",
        ])
        .enumerate()
    {
        std::fs::File::create(&gdisks[i])
            .and_then(|f| f.set_len(stamputil::DISK_BYTES + (1 << 20)))
            .unwrap();
        define(&domain_xml(
            (name, uuid),
            &vm_dir,
            IDLE_NO_AGENT,
            &[(&gdisks[i], "raw", "vda")],
            PROD,
            &s.p(&format!("{name}-console.log")),
        ));
        vdrep_ok(&[
            "protect",
            "--domain",
            name,
            "--group",
            "erp",
            "--to",
            &rg.addr,
            "--trust",
            &trust_b,
            "--every",
            "continuous",
        ]);
    }
    let gstore = s.s("store-g");
    let group_points = || -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
            "points", "--group", "erp", "--store", &gstore, "--json",
        ]))
        .unwrap();
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["cycle"].as_u64().unwrap())
            .collect()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = stamputil::stamp_writer(
        gdisks.to_vec(),
        stop.clone(),
        written.clone(),
        0x3c6e_f372_fe94_f82b,
        None,
    );
    let t_group = std::time::Instant::now();
    while (group_points().len() < 4 || written.load(std::sync::atomic::Ordering::Relaxed) < 500)
        && t_group.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.join().unwrap().all_ok();
    // (Not `sync DIR`: other VMs of the folder replicate to the receiver
    // part 8 replaced.)
    for d in ERP {
        vdrep_ok(&["sync", d, "--timeout", "120"]);
    }
    let history = stamputil::history(&log);
    let gps = group_points();
    assert!(gps.len() >= 4, "only {} group points", gps.len());
    step("group of two domains: stamped writes, group points");
    // The group's test failover starts both test copies, isolated.
    let mid = gps[gps.len() / 2];
    let out = vdrep_ok(&[
        "failover",
        "--group",
        "erp",
        "--test",
        "--point",
        &mid.to_string(),
        "--test-network",
        ISOLATED,
        "--store",
        &gstore,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for d in ERP {
        let t = format!("{d}-test");
        assert!(lv.running(&t), "{t} is not running: {v}");
        let nics = lv.nics(&t);
        assert!(
            !nics.is_empty() && nics.iter().all(|(net, _)| net == ISOLATED),
            "{t}'s NICs: {nics:?}"
        );
        assert!(lv.domain_exists(d), "{d} is still defined");
    }
    step("group test failover: both test copies started");
    vdrep_ok(&[
        "failover",
        "--group",
        "erp",
        "--cleanup",
        "--store",
        &gstore,
    ]);
    for d in ERP {
        assert!(!lv.domain_exists(&format!("{d}-test")), "{d}-test left");
    }
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&gstore),
        "a view of the group is still mounted"
    );
    step("group test failover cleaned up");
    // Every group point, both domains' disks (read from the store, its
    // receiver stopped).
    let g_addr = rg.addr.clone();
    drop(rg);
    {
        let store = vdrep::replica::Store::open(&s.p("store-g")).unwrap();
        let st = store.site("site-a").unwrap();
        let mut seqs = Vec::new();
        for g in st.group_points("erp").unwrap() {
            let mut disks = vec![Vec::new(); 2];
            for mb in &g.members {
                let pts = st.points(&mb.vm).unwrap();
                let p = pts.iter().find(|p| p.cycle == mb.point).unwrap();
                stamputil::read_point_disks(&st, &mb.vm, p, &mut disks);
            }
            seqs.push(stamputil::check_consistent(
                &format!("group point {} of the two domains", g.cycle),
                &disks,
                &history,
            ));
        }
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
        assert!(seqs.len() >= gps.len(), "{seqs:?} {gps:?}");
        assert_eq!(
            seqs.last().copied(),
            Some(log.len() as u64),
            "the newest group point holds every write"
        );
    }
    step("every group point consistent across both domains");
    // Its receiver back at the address the members replicate to.
    let rg = mountutil::Receiver::spawn(
        &g_addr,
        &s.p("store-g"),
        &s.p("kb"),
        &s.p("ka/site-a.crt"),
        &[],
        &[],
    );

    // Planned failover of the group of running domains, A -> B.
    let gconsole = |d: &str| s.p(&format!("{d}-console.log"));
    for d in ERP {
        libvirtutil::virsh_ok(&["start", d]);
    }
    for d in ERP {
        wait_idle(&lv, d, &gconsole(d));
    }
    step("both group domains idle at A");
    for (i, f) in gdisks.iter().enumerate() {
        host_stamp_at(f, &format!("GROUP-AT-A-{i}"), stamputil::DISK_BYTES);
    }
    let group_planned = |dir: &Path, store: &Path, to: &str, map: &str, shutdown: &str| {
        let o = vdrep(&[
            "failover",
            "--group",
            "erp",
            "--planned",
            "--dir",
            dir.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--reverse-to",
            to,
            "--network-map",
            map,
            "--shutdown-timeout",
            shutdown,
            "--json",
        ]);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        );
        assert!(o.status.success(), "planned failover of erp: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v, err)
    };
    let (v, err) = group_planned(
        &s.p("vmg"),
        &s.p("store-a"),
        &ra.addr,
        &format!("{PROD}={DR}"),
        "60",
    );
    for d in ERP {
        assert!(
            err.contains(&format!("domain {d} shut down cleanly")),
            "{d} must stop cleanly at A: {err}"
        );
    }
    let vms = v["vms"].as_array().unwrap_or_else(|| panic!("{v}"));
    g_a.mounted = false;
    assert!(
        !mountutil::is_mountpoint(&s.p("vmg")),
        "A still mounts the group's folder"
    );
    assert_eq!(vms.len(), 2, "{v}");
    let g_live = std::path::PathBuf::from(vms[0]["live_dir"].as_str().unwrap());
    let mut g_mount = mountutil::Mounted {
        dir: g_live.clone(),
        mounted: true,
    };
    for (i, d) in ERP.iter().enumerate() {
        let m = vms
            .iter()
            .find(|m| m["domain"] == *d)
            .unwrap_or_else(|| panic!("{d} was not started at B: {v}"));
        assert_eq!(m["cycle"], v["cycle"], "one final group point: {v}");
        assert!(lv.running(d), "{d} runs at B");
        let files = disk_files(d);
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(Path::new(&files[0]).starts_with(&g_live), "{files:?}");
        assert_eq!(lv.nics(d)[0].0, DR, "{d}'s NIC is mapped at B");
        assert!(
            has_stamp_at(
                Path::new(&files[0]),
                &format!("GROUP-AT-A-{i}"),
                stamputil::DISK_BYTES
            ),
            "{d}: a write acknowledged at A before the planned failover is lost"
        );
    }
    step("group planned failover A -> B");
    // Failback B -> A. The guests at B may still be booting: 2 s, then
    // destroyed (the clean path was shown above).
    for d in ERP {
        let f = disk_files(d).remove(0);
        host_stamp_at(
            Path::new(&f),
            &format!("GROUP-AT-B-{d}"),
            stamputil::DISK_BYTES + 64,
        );
    }
    let (v, _) = group_planned(
        &g_live,
        &s.p("store-g"),
        &rg.addr,
        &format!("{DR}={PROD}"),
        "2",
    );
    g_mount.mounted = false;
    g_a.mounted = true;
    for (i, d) in ERP.iter().enumerate() {
        assert!(
            v["vms"]
                .as_array()
                .is_some_and(|a| a.iter().any(|m| m["domain"] == *d)),
            "{d} was not started at A: {v}"
        );
        assert!(lv.running(d), "{d} runs at A again");
        let files = disk_files(d);
        assert!(
            files.len() == 1
                && Path::new(&files[0]).starts_with(s.p("vmg"))
                && Path::new(&files[0]).file_name() == gdisks[i].file_name(),
            "{d} is not on its disk at A: {files:?}"
        );
        assert_eq!(lv.nics(d)[0].0, PROD, "{d}'s NIC is mapped back at A");
        let tag = format!("GROUP-AT-B-{d}");
        assert!(
            has_stamp_at(&gdisks[i], &tag, stamputil::DISK_BYTES + 64),
            "{d}: the failback lost a write (read through the page cache; with O_DIRECT the block {} it)",
            if direct_has(&gdisks[i], &tag, stamputil::DISK_BYTES) { "HAS" } else { "lacks" }
        );
    }
    step("group planned failback B -> A");
    for d in ERP {
        vdrep_ok(&["unprotect", d]);
        lv.remove_domain(d);
    }
    drop(ra);
    drop(c);
}
