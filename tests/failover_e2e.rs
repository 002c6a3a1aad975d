//! Planned failover, reverse replication and failback, and unplanned
//! failover with reverse resync, between two "sites" on loopback: each
//! site has a tracking folder, a receiver with its own store and its own
//! identity. Real processes, real FUSE mounts, real QUIC, `qemu-img
//! compare`. Needs root and /dev/fuse (CI has both).

mod mountutil;
mod skip;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mountutil::*;

/// Two sites: A (`a/vm1` tracked, `a/store`, keys `ka`) and B (`b/store`,
/// keys `kb`). Both stores are on the folders' file system (tempdir).
struct Sites {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Sites {
    /// `vdrep protect VM --every 1h DISK...` from site A to site B's receiver.
    fn protect_to(&self, rb: &Receiver, vm: &str, disks: &[&str]) {
        let trust = self.s("kb/site-b.crt");
        let mut args = vec!["protect", vm, "--to", &rb.addr, "--trust", &trust];
        args.extend(["--every", "1h"]);
        args.extend_from_slice(disks);
        vdrep_ok(&args);
    }
    fn new() -> Sites {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["ka", "kb", "a/vm1", "a/store", "b/store", "expect"] {
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
        Sites { _tmp: tmp, root }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }
    fn s(&self, s: &str) -> String {
        self.p(s).to_str().unwrap().to_string()
    }
    /// B's live folder for vm1 after a failover.
    fn b_live(&self) -> PathBuf {
        self.p("b/store/live/site-a/vm1")
    }
}

impl Receiver {
    /// The receiver of site `me` ("a" or "b"), trusting the other site.
    fn start(s: &Sites, me: &str) -> Receiver {
        let (keys, trust) = if me == "a" {
            ("ka", "kb/site-b.crt")
        } else {
            ("kb", "ka/site-a.crt")
        };
        Receiver::spawn(
            "127.0.0.1:0",
            &s.p(&format!("{me}/store")),
            &s.p(keys),
            &s.p(trust),
            &[],
            &[],
        )
    }
}

/// Unmount whatever vdrep mounts are left under the test root.
struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            if is_mountpoint(d) {
                let d = d.to_str().unwrap();
                if !vdrep(&["umount", d]).status.success() {
                    let _ = vdrep(&["umount", "--lazy", d]);
                }
            }
        }
    }
}

fn fill(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    // Data in every 4th MiB, the rest sparse.
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    for mb in (0..size >> 20).step_by(4) {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, mb << 20).unwrap();
    }
}

/// Write `n` distinct 4 KiB blocks of incompressible data (seeded by `v`)
/// at spread offsets.
fn write_blocks(path: &Path, n: u64, v: u8, salt: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    assert!(n < blocks / 8);
    let mut x = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt + 1);
    let mut buf = [0u8; 4096];
    for i in 0..n {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let b = (i * 7 + salt * 1031) % blocks;
        f.write_all_at(&buf, b * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("identical"),
        "{} vs {}: {out}",
        a.display(),
        b.display()
    );
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&vdrep_ok(&["status", "--json", dir.to_str().unwrap()])).unwrap()
}

fn bytes_sent(dir: &Path) -> u64 {
    status(dir)["replication"][0]["bytes_sent"]
        .as_u64()
        .unwrap_or(0)
}

/// A fixed VHD of `size` (qemu-img size syntax).
fn fixed_vhd(path: &str, size: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            path,
            size,
        ],
    );
}

fn sync(dir: &Path) {
    vdrep_ok(&["sync", dir.to_str().unwrap(), "--timeout", "180"]);
}

/// `vdrep failover vm1 --unplanned --point POINT` at site b; its output.
fn unplanned_to(s: &Sites, point: u64) -> String {
    vdrep_ok(&[
        "failover",
        "vm1",
        "--unplanned",
        "--point",
        &point.to_string(),
        "--store",
        &s.s("b/store"),
    ])
}

/// The replica file of `vm1`'s disk `name` in `store` for namespace `site`.
fn replica(store: &Path, site: &str, name: &str) -> PathBuf {
    let disks = store.join(format!("sites/{site}/vms/vm1/disks"));
    for d in std::fs::read_dir(&disks).unwrap().flatten() {
        let p = d.path().join(name);
        if p.exists() {
            mountutil::wait_applied(&d.path());
            return p;
        }
    }
    panic!("no replica {name} under {}", disks.display());
}

/// An inotify watch on a file: the kernel keeps its inode (and its page
/// cache) while the watch lives, without an open file.
struct InodePin(i32);

impl InodePin {
    fn new(path: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain syscalls on a descriptor this struct owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        InodePin(fd)
    }
}

impl Drop for InodePin {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn copy(from: &Path, to: &Path) {
    run(
        "cp",
        &[
            "--sparse=always",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
    );
}

/// Planned failover A→B, writes at B replicate back to A, planned failback
/// B→A, writes at A replicate to B again. At each step the active disks
/// equal what was written and the other site's replica equals them; the
/// round trip ships only the changed blocks.
#[test]
fn planned_failover_reverse_and_failback_ship_only_changes() {
    require_fuse!();
    let s = Sites::new();
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    let size: u64 = 64 << 20;
    fill(&s.p("a/vm1/disk0.img"), size, 1);
    fixed_vhd(&s.s("a/vm1/disk1.vhd"), "32M");
    let _c = Cleanup(vec![s.p("a/vm1"), s.b_live()]);
    let ra = Receiver::start(&s, "a");
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    s.protect_to(
        &rb,
        "vm1",
        &[&s.s("a/vm1/disk0.img"), &s.s("a/vm1/disk1.vhd")],
    );
    write_blocks(&s.p("a/vm1/disk0.img"), 100, 0x11, 1);
    run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x22 1M 256k",
            &s.s("a/vm1/disk1.vhd"),
        ],
    );
    sync(&s.p("a/vm1"));
    // Writes after the last sync: the planned failover must ship them.
    write_blocks(&s.p("a/vm1/disk0.img"), 50, 0x33, 2);
    copy(&s.p("a/vm1/disk0.img"), &s.p("expect/disk0.img"));
    copy(&s.p("a/vm1/disk1.vhd"), &s.p("expect/disk1.vhd"));

    // 1. Planned failover A -> B, run at A.
    let out = vdrep_ok(&[
        "failover",
        "vm1",
        "--planned",
        "--dir",
        &s.s("a/vm1"),
        "--store",
        &s.s("a/store"),
        "--reverse-to",
        &ra.addr,
    ]);
    println!("{out}");
    assert!(!is_mountpoint(&s.p("a/vm1")), "A's folder is still mounted");
    assert!(
        !s.p("a/vm1/disk0.img").exists(),
        "A's disk was not moved into A's store"
    );
    let live = s.b_live();
    assert!(is_mountpoint(&live), "B's live folder is not mounted");
    compare(
        &live.join("disk0.img"),
        "raw",
        &s.p("expect/disk0.img"),
        "raw",
    );
    compare(
        &live.join("disk1.vhd"),
        "vpc",
        &s.p("expect/disk1.vhd"),
        "vpc",
    );
    // A's store holds the same bytes as B's live disks.
    compare(
        &live.join("disk0.img"),
        "raw",
        &replica(&s.p("a/store"), "site-b", "disk0.vhd"),
        "vpc",
    );
    let st = status(&live);
    assert_eq!(st["replication"][0]["vm"], "vm1", "{st}");
    // Reverse replication starts from the shared point: no initial copy.
    sync(&live);
    let sent0 = bytes_sent(&live);
    assert!(
        sent0 < 1 << 20,
        "reverse replication sent {sent0} bytes with nothing changed"
    );

    // 2. Writes at B replicate back to A: only those blocks.
    write_blocks(&live.join("disk0.img"), 64, 0x44, 3);
    sync(&live);
    let sent1 = bytes_sent(&live) - sent0;
    println!("reverse: 64 changed blocks (256 KiB) -> {sent1} bytes sent");
    assert!(
        (256 << 10..320 << 10).contains(&sent1),
        "{sent1} bytes sent for 256 KiB of incompressible changes"
    );
    compare(
        &live.join("disk0.img"),
        "raw",
        &replica(&s.p("a/store"), "site-b", "disk0.vhd"),
        "vpc",
    );
    copy(&live.join("disk0.img"), &s.p("expect/disk0.img"));

    // 3. Planned failback B -> A, run at B.
    let out = vdrep_ok(&[
        "failover",
        "vm1",
        "--planned",
        "--dir",
        live.to_str().unwrap(),
        "--store",
        &s.s("b/store"),
        "--reverse-to",
        &rb.addr,
    ]);
    println!("{out}");
    assert!(!is_mountpoint(&live));
    assert!(
        is_mountpoint(&s.p("a/vm1")),
        "A's folder was not mounted again"
    );
    compare(
        &s.p("a/vm1/disk0.img"),
        "raw",
        &s.p("expect/disk0.img"),
        "raw",
    );
    compare(
        &s.p("a/vm1/disk1.vhd"),
        "vpc",
        &s.p("expect/disk1.vhd"),
        "vpc",
    );
    compare(
        &s.p("a/vm1/disk0.img"),
        "raw",
        &replica(&s.p("b/store"), "site-a", "disk0.vhd"),
        "vpc",
    );

    // 4. A is primary again and ships only changes.
    sync(&s.p("a/vm1"));
    let a0 = bytes_sent(&s.p("a/vm1"));
    write_blocks(&s.p("a/vm1/disk0.img"), 32, 0x55, 4);
    sync(&s.p("a/vm1"));
    let a1 = bytes_sent(&s.p("a/vm1")) - a0;
    println!("after failback: 32 changed blocks (128 KiB) -> {a1} bytes sent (initial {a0})");
    assert!(a0 < 1 << 20, "A re-sent {a0} bytes after the failback");
    assert!(
        (128 << 10..192 << 10).contains(&a1),
        "{a1} bytes for 128 KiB of incompressible changes"
    );
    compare(
        &s.p("a/vm1/disk0.img"),
        "raw",
        &replica(&s.p("b/store"), "site-a", "disk0.vhd"),
        "vpc",
    );
    drop(ra);
    drop(rb);
}

/// Unplanned failover to an older point while the old primary holds writes
/// that were never shipped; after `vdrep reverse` the old primary's disks
/// (now the replica) equal the new active disks.
#[test]
fn unplanned_failover_to_older_point_then_reverse_overwrites_unshipped_writes() {
    require_fuse!();
    let s = Sites::new();
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    let size: u64 = 32 << 20;
    fill(&s.p("a/vm1/disk0.img"), size, 7);
    let _c = Cleanup(vec![s.p("a/vm1"), s.b_live()]);
    let ra = Receiver::start(&s, "a");
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    s.protect_to(&rb, "vm1", &[&s.s("a/vm1/disk0.img")]);
    sync(&s.p("a/vm1"));
    write_blocks(&s.p("a/vm1/disk0.img"), 40, 0x61, 1);
    sync(&s.p("a/vm1"));
    // The point we fail over to.
    let pts: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
        "points",
        "vm1",
        "--store",
        &s.s("b/store"),
        "--json",
    ]))
    .unwrap();
    let arr = pts
        .as_array()
        .or_else(|| pts["points"].as_array())
        .unwrap()
        .clone();
    assert!(arr.len() >= 2, "{pts}");
    let older = arr
        .iter()
        .map(|p| p["cycle"].as_u64().unwrap())
        .max()
        .unwrap();
    copy(&s.p("a/vm1/disk0.img"), &s.p("expect/disk0.img"));
    write_blocks(&s.p("a/vm1/disk0.img"), 30, 0x62, 2);
    sync(&s.p("a/vm1"));
    // Never shipped: the primary "dies" with these.
    write_blocks(&s.p("a/vm1/disk0.img"), 25, 0x63, 3);

    let out = unplanned_to(&s, older);
    println!("{out}");
    let live = s.b_live();
    assert!(is_mountpoint(&live));
    compare(
        &live.join("disk0.img"),
        "raw",
        &s.p("expect/disk0.img"),
        "raw",
    );
    // The new active site writes.
    write_blocks(&live.join("disk0.img"), 20, 0x64, 4);

    // The old primary is back: reverse.
    let out = vdrep_ok(&[
        "reverse",
        "vm1",
        "--dir",
        &s.s("a/vm1"),
        "--store",
        &s.s("a/store"),
        "--reverse-to",
        &ra.addr,
    ]);
    println!("{out}");
    sync(&live);
    compare(
        &live.join("disk0.img"),
        "raw",
        &replica(&s.p("a/store"), "site-b", "disk0.vhd"),
        "vpc",
    );
    let sent = bytes_sent(&live);
    println!("reverse resync after an unplanned failover: {sent} bytes sent");
    // 30 + 25 + 20 blocks differ (fewer if two writes hit one block).
    assert!(
        (50 * 4096..80 * 4096 + (64 << 10)).contains(&sent),
        "{sent} bytes: the reverse resync did not ship just the differing blocks"
    );
    // Commit makes it final.
    vdrep_ok(&["failover", "vm1", "--commit", "--store", &s.s("b/store")]);
}

/// A recovery plan runs its groups in order with their scripts, reports per
/// VM, and stops before the next group when a VM of a group fails.
#[test]
fn recovery_plan_runs_groups_in_order_and_stops_after_a_failed_group() {
    require_fuse!();
    let s = Sites::new();
    fill(&s.p("a/vm1/disk0.img"), 16 << 20, 3);
    let _c = Cleanup(vec![s.p("a/vm1")]);
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    s.protect_to(&rb, "vm1", &[&s.s("a/vm1/disk0.img")]);
    sync(&s.p("a/vm1"));
    let trace = s.p("trace");
    let plan = s.p("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "# test plan\n[[group]]\nname = \"first\"\npre = \"echo pre-$VDREP_PLAN_GROUP-$VDREP_PLAN_MODE >> {t}\"\nvms = [\"vm1\"]\npost = \"echo post-$VDREP_PLAN_VMS >> {t}\"\n\n[[group]]\nname = \"second\"\nvms = [\"ghost\"]\n\n[[group]]\nname = \"third\"\npre = \"echo third >> {t}\"\nvms = [\"vm1\"]\n",
            t = trace.display()
        ),
    )
    .unwrap();
    let o = vdrep(&[
        "plan",
        "failover",
        plan.to_str().unwrap(),
        "--test",
        "--store",
        &s.s("b/store"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{out}{err}");
    assert!(
        !o.status.success(),
        "a plan with a failed VM must exit non-zero"
    );
    assert_eq!(
        std::fs::read_to_string(&trace).unwrap(),
        "pre-first-test\npost-vm1\n",
        "scripts ran out of order or the third group ran"
    );
    assert!(out.contains("1/3 VMs"), "{out}");
    assert!(out.contains("not run") && out.contains("third"), "{out}");
    assert!(err.contains("ghost FAILED"), "{err}");
    // vm1's test failover is up: its disk is exposed.
    let exposed = out
        .lines()
        .find_map(|l| l.strip_prefix("vm1: "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no exposed path for vm1 in {out}"));
    run(
        "qemu-img",
        &["info", "-f", "vpc", exposed.to_str().unwrap()],
    );
    vdrep_ok(&["failover", "vm1", "--cleanup", "--store", &s.s("b/store")]);
    assert!(!exposed.exists());
}

fn sha256(p: &Path) -> String {
    run("sha256sum", &[p.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn points_json(store: &Path) -> serde_json::Value {
    serde_json::from_str(&vdrep_ok(&[
        "points",
        "vm1",
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]))
    .unwrap()
}

fn point_cycles(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .or_else(|| v["points"].as_array())
        .unwrap()
        .iter()
        .map(|p| p["cycle"].as_u64().unwrap())
        .collect()
}

/// Unplanned failover to an older point, writes (and a resize) on the
/// promoted disks, cancel: the replica's bytes and its recovery points are
/// exactly as before the failover, nothing is pinned, and replication from
/// the original primary resumes and reaches the replica. A second failover
/// that is committed can no longer be cancelled, and says what to do.
#[test]
fn unplanned_failover_cancel_restores_replica_and_points_then_primary_resumes() {
    require_fuse!();
    let s = Sites::new();
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    fill(&s.p("a/vm1/disk0.img"), 32 << 20, 11);
    fixed_vhd(&s.s("a/vm1/disk1.vhd"), "16M");
    let _c = Cleanup(vec![s.p("a/vm1"), s.b_live()]);
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    s.protect_to(
        &rb,
        "vm1",
        &[&s.s("a/vm1/disk0.img"), &s.s("a/vm1/disk1.vhd")],
    );
    sync(&s.p("a/vm1"));
    for (i, v) in [0x71u8, 0x72, 0x73].into_iter().enumerate() {
        write_blocks(&s.p("a/vm1/disk0.img"), 40, v, i as u64 + 1);
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                &format!("write -P {v} {}k 64k", 512 * i),
                &s.s("a/vm1/disk1.vhd"),
            ],
        );
        sync(&s.p("a/vm1"));
    }
    // The primary site goes away.
    vdrep_ok(&["umount", &s.s("a/vm1")]);
    let store = s.p("b/store");
    let r0 = replica(&store, "site-a", "disk0.vhd");
    let r1 = replica(&store, "site-a", "disk1.vhd");
    let before = (sha256(&r0), sha256(&r1), points_json(&store));
    let mut cycles = point_cycles(&before.2);
    cycles.sort();
    println!(
        "before: disk0 replica {} disk1 replica {} points {cycles:?}",
        before.0, before.1
    );
    assert!(cycles.len() >= 4, "{}", before.2);
    let older = cycles[cycles.len() - 3];

    // Unplanned failover to a point two cycles old (rolls back over two).
    let out = unplanned_to(&s, older);
    println!("{out}");
    let live = s.b_live();
    assert!(is_mountpoint(&live));
    // The failed-over VM writes, and grows a disk.
    write_blocks(&live.join("disk0.img"), 60, 0x7a, 9);
    run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x7b 4M 1M",
            live.join("disk1.vhd").to_str().unwrap(),
        ],
    );
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(live.join("disk0.img"))
            .unwrap();
        f.set_len((32 << 20) + (1 << 20)).unwrap();
        f.write_all_at(&[0x7c; 4096], 32 << 20).unwrap();
        f.sync_all().unwrap();
    }

    // Cancel.
    let out = vdrep_ok(&["failover", "vm1", "--cancel", "--store", &s.s("b/store")]);
    println!("{out}");
    assert!(out.contains("cancelled"), "{out}");
    assert!(!is_mountpoint(&live), "the live folder is still mounted");
    assert!(!live.exists(), "the live folder was left behind");
    let after = (sha256(&r0), sha256(&r1), points_json(&store));
    println!(
        "after cancel: disk0 replica {} disk1 replica {} points {:?}",
        after.0,
        after.1,
        point_cycles(&after.2)
    );
    assert_eq!(after.0, before.0, "disk0's replica changed");
    assert_eq!(after.1, before.1, "disk1's replica changed");
    assert_eq!(after.2, before.2, "the recovery points changed");
    assert!(
        !after.2.to_string().contains("\"pinned\":true"),
        "a point stayed pinned: {}",
        after.2
    );
    // Every point is still readable as before: expose the oldest one.
    vdrep_ok(&[
        "failover",
        "vm1",
        "--test",
        "--point",
        &cycles[0].to_string(), // the oldest
        "--store",
        &s.s("b/store"),
    ]);
    vdrep_ok(&["failover", "vm1", "--cleanup", "--store", &s.s("b/store")]);

    // The original primary comes back and replicates again.
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    write_blocks(&s.p("a/vm1/disk0.img"), 30, 0x7d, 12);
    sync(&s.p("a/vm1"));
    compare(&s.p("a/vm1/disk0.img"), "raw", &r0, "vpc");
    compare(&s.p("a/vm1/disk1.vhd"), "vpc", &r1, "vpc");
    let n = point_cycles(&points_json(&store)).len();
    assert_eq!(n, cycles.len() + 1, "the resumed cycle made no new point");
    println!("primary resumed: {n} points, replica equals the primary");

    // A committed failover cannot be cancelled.
    vdrep_ok(&["umount", &s.s("a/vm1")]);
    vdrep_ok(&["failover", "vm1", "--unplanned", "--store", &s.s("b/store")]);
    vdrep_ok(&["failover", "vm1", "--commit", "--store", &s.s("b/store")]);
    let o = vdrep(&["failover", "vm1", "--cancel", "--store", &s.s("b/store")]);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success(), "a cancel after commit succeeded");
    assert!(
        err.contains("committed") && err.contains("--planned"),
        "unclear refusal: {err}"
    );
    assert!(
        is_mountpoint(&live),
        "the refused cancel stopped the live disks"
    );
    drop(rb);
}

/// The replica file of `vm`'s disk `name` in `store` for namespace `site`.
fn replica_of(store: &Path, site: &str, vm: &str, name: &str) -> PathBuf {
    let disks = store.join(format!("sites/{site}/vms/{vm}/disks"));
    for d in std::fs::read_dir(&disks).unwrap().flatten() {
        let p = d.path().join(name);
        if p.exists() {
            mountutil::wait_applied(&d.path());
            return p;
        }
    }
    panic!("no replica {name} under {}", disks.display());
}

/// Writes 4 KiB blocks to `path` until told to stop; returns (writes that
/// succeeded, errors).
fn busy_writer(
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let blocks = f.metadata().unwrap().len() / 4096;
        let (mut ok, mut errs) = (0u64, Vec::new());
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let buf = [(i % 251) as u8 + 1; 4096];
            match f
                .write_all_at(&buf, ((i * 131) % blocks) * 4096)
                .and_then(|()| if i % 8 == 7 { f.sync_data() } else { Ok(()) })
            {
                Ok(()) => ok += 1,
                Err(e) => errs.push(format!("write {i}: {e}")),
            }
            i += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        f.sync_all().unwrap();
        (ok, errs)
    })
}

/// Two VMs protected from ONE tracking folder; planned failover of vm1 and
/// failback: vm2's writes are accepted throughout and keep replicating,
/// vm1's disk round-trips byte-identically and only changes travel.
#[test]
fn planned_failover_of_one_vm_in_a_shared_folder_leaves_the_other_running() {
    require_fuse!();
    let s = Sites::new();
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    let dir = s.p("a/vm1"); // the shared folder (think /var/lib/libvirt/images)
    fill(&dir.join("disk0.img"), 32 << 20, 21);
    fill(&dir.join("other.img"), 16 << 20, 22);
    let _c = Cleanup(vec![dir.clone(), s.b_live()]);
    let ra = Receiver::start(&s, "a");
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    for (vm, disk) in [("vm1", "disk0.img"), ("vm2", "other.img")] {
        s.protect_to(&rb, vm, &[dir.join(disk).to_str().unwrap()]);
    }
    sync(&dir);
    write_blocks(&dir.join("disk0.img"), 40, 0x81, 1);
    sync(&dir);
    // Not shipped yet: the planned failover must ship it.
    write_blocks(&dir.join("disk0.img"), 30, 0x82, 2);
    copy(&dir.join("disk0.img"), &s.p("expect/disk0.img"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = busy_writer(dir.join("other.img"), stop.clone());
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The kernel keeps vm1's disk's inode, and the pages it cached, over
    // the round trip (as a QEMU's or another program's reference would):
    // an inotify watch holds the inode without opening it. The failback
    // brings the same file back, changed at B: reads through the mount
    // must see B's writes, not the pages cached before the failover.
    let _ = std::fs::read(dir.join("disk0.img")).unwrap();
    let pin = InodePin::new(&dir.join("disk0.img"));

    // 1. Planned failover of vm1 only.
    let out = vdrep_ok(&[
        "failover",
        "vm1",
        "--planned",
        "--dir",
        &s.s("a/vm1"),
        "--store",
        &s.s("a/store"),
        "--reverse-to",
        &ra.addr,
    ]);
    println!("{out}");
    assert!(is_mountpoint(&dir), "the shared folder was unmounted");
    // The kernel may show a cached entry for up to its 1 s TTL (writes to
    // it already fail: the mount refuses to change a released disk).
    let t0 = std::time::Instant::now();
    while dir.join("disk0.img").exists() && t0.elapsed().as_secs() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!dir.join("disk0.img").exists(), "vm1's disk is still at A");
    assert!(dir.join("other.img").exists());
    let live = s.b_live();
    compare(
        &live.join("disk0.img"),
        "raw",
        &s.p("expect/disk0.img"),
        "raw",
    );
    // vm2 keeps replicating from the shared folder.
    sync(&dir);
    let st = status(&dir);
    let vms: Vec<&str> = st["replication"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    assert_eq!(vms, ["vm2"], "{st}");

    // 2. vm1 runs at B and replicates back to A.
    write_blocks(&live.join("disk0.img"), 25, 0x83, 3);
    sync(&live);
    copy(&live.join("disk0.img"), &s.p("expect/disk0.img"));

    // 3. Planned failback, run at B, into the folder vm2 still runs from.
    let out = vdrep_ok(&[
        "failover",
        "vm1",
        "--planned",
        "--dir",
        live.to_str().unwrap(),
        "--store",
        &s.s("b/store"),
        "--reverse-to",
        &rb.addr,
    ]);
    println!("{out}");
    assert!(!is_mountpoint(&live));
    assert!(
        std::fs::read(dir.join("disk0.img")).unwrap()
            == std::fs::read(s.p("expect/disk0.img")).unwrap(),
        "a buffered read through A's mount after the failback differs from the disk at B: stale cached pages"
    );
    drop(pin);
    compare(
        &dir.join("disk0.img"),
        "raw",
        &s.p("expect/disk0.img"),
        "raw",
    );
    compare(
        &dir.join("disk0.img"),
        "raw",
        &replica_of(&s.p("b/store"), "site-a", "vm1", "disk0.vhd"),
        "vpc",
    );

    // 4. vm1 is primary at A again and ships only its changes.
    sync(&dir);
    let sent = |d: &Path, vm: &str| -> u64 {
        status(d)["replication"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == vm)
            .and_then(|v| v["bytes_sent"].as_u64())
            .unwrap_or(0)
    };
    let a0 = sent(&dir, "vm1");
    write_blocks(&dir.join("disk0.img"), 16, 0x84, 4);
    sync(&dir);
    let a1 = sent(&dir, "vm1") - a0;
    println!("vm1 after failback: 16 changed blocks (64 KiB) -> {a1} bytes sent (before: {a0})");
    assert!(
        a0 < 1 << 20,
        "A re-sent {a0} bytes of vm1 after the failback"
    );
    assert!((64 << 10..128 << 10).contains(&a1), "{a1} bytes for 64 KiB");
    compare(
        &dir.join("disk0.img"),
        "raw",
        &replica_of(&s.p("b/store"), "site-a", "vm1", "disk0.vhd"),
        "vpc",
    );

    // vm2 never noticed.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, errs) = w.join().unwrap();
    println!(
        "vm2: {ok} writes accepted during the round trip, {} failed",
        errs.len()
    );
    assert!(errs.is_empty(), "vm2's writes failed: {errs:?}");
    assert!(ok > 50, "vm2 wrote only {ok} times");
    sync(&dir);
    compare(
        &dir.join("other.img"),
        "raw",
        &replica_of(&s.p("b/store"), "site-a", "vm2", "other.vhd"),
        "vpc",
    );
    drop(ra);
    drop(rb);
}

/// The old primary keeps running and shipping while an unplanned failover
/// to an older point is active at the replica site: the store refuses its
/// logs, applies and points with a retryable error (the VM is Warning with
/// that reason, not Critical, and no disk needs a resync), the failed-over
/// disks are untouched, and after `--cancel` the primary goes on by itself:
/// the replica equals the primary again. (Before: the first apply hit the
/// rolled-back replica and marked the disk ResyncRequired, the next session
/// made the VM Critical for good.)
#[test]
fn primary_running_through_an_unplanned_failover_resumes_after_cancel() {
    require_fuse!();
    let s = Sites::new();
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    fill(&s.p("a/vm1/disk0.img"), 32 << 20, 11);
    let _c = Cleanup(vec![s.p("a/vm1"), s.b_live()]);
    let rb = Receiver::start(&s, "b");
    vdrep_ok(&["mount", &s.s("a/vm1"), "--keys", &s.s("ka")]);
    s.protect_to(&rb, "vm1", &[&s.s("a/vm1/disk0.img")]);
    sync(&s.p("a/vm1"));
    for i in 0..4u64 {
        write_blocks(&s.p("a/vm1/disk0.img"), 40, 0x70 + i as u8, i + 1);
        sync(&s.p("a/vm1"));
    }
    let store = s.p("b/store");
    let mut cycles = point_cycles(&points_json(&store));
    cycles.sort();
    let older = cycles[cycles.len() - 3];
    unplanned_to(&s, older);
    let live = s.b_live().join("disk0.img");
    let live_before = sha256(&live);
    // The primary keeps writing and asking for points.
    for i in 0..4u64 {
        write_blocks(&s.p("a/vm1/disk0.img"), 20, 0x90 + i as u8, 20 + i);
        let o = vdrep(&["sync", &s.s("a/vm1"), "--timeout", "2"]);
        assert!(!o.status.success(), "a point was made during the failover");
    }
    let st = status(&s.p("a/vm1"));
    let v = &st["replication"][0];
    assert_eq!(v["state"], "Warning", "{st}");
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("failed over to this site") && e.contains("--cancel")),
        "{st}"
    );
    assert_eq!(st["disks"][0]["state"]["state"], "Normal", "{st}");
    assert_eq!(sha256(&live), live_before, "the live disk changed");
    assert_eq!(
        point_cycles(&points_json(&store)).iter().max(),
        Some(&older),
        "a point was committed during the failover"
    );
    vdrep_ok(&["failover", "vm1", "--cancel", "--store", &s.s("b/store")]);
    write_blocks(&s.p("a/vm1/disk0.img"), 10, 0xa0, 40);
    sync(&s.p("a/vm1"));
    let st = status(&s.p("a/vm1"));
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    assert_eq!(st["disks"][0]["state"]["state"], "Normal", "{st}");
    let r0 = replica(&store, "site-a", "disk0.vhd");
    compare(&s.p("a/vm1/disk0.img"), "raw", &r0, "vpc");
    vdrep_ok(&["umount", &s.s("a/vm1")]);
    drop(rb);
}
