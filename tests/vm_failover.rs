//! Issue 4, must-show 1: a real VM end to end. The tiny guest boots under
//! QEMU (TCG) from a disk on the primary's `vdrep mount`, writes a proof
//! file and powers off; replication ships it to the secondary; a **test
//! failover** exposes the newest point as a VHD and the guest boots from it
//! and finds the file; then a **planned failover** makes the secondary
//! active and the guest boots from its live disk (through the secondary's
//! tracking mount) and finds the file again. Three boots (~20-40 s each).

mod common;
mod skip;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Receiver {
    child: Child,
    addr: String,
}

impl Receiver {
    fn start(root: &Path, store: &str, keys: &str, trust: &str) -> Receiver {
        let mut child = Command::new(vdrep_bin())
            .args(["receive", "--listen", "127.0.0.1:0", "--store"])
            .arg(root.join(store))
            .arg("--keys")
            .arg(root.join(keys))
            .arg("--trust")
            .arg(root.join(trust))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read receiver banner");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"))
            .to_string();
        Receiver { child, addr }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Unmount(Vec<PathBuf>);
impl Drop for Unmount {
    fn drop(&mut self) {
        for d in &self.0 {
            if is_fuse_mountpoint(d) {
                let s = d.to_string_lossy();
                if vdrep(&["umount", &s]).is_err() {
                    let _ = vdrep(&["umount", "--lazy", &s]);
                }
            }
        }
    }
}

fn ok(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn vm_boots_from_test_failover_and_after_planned_failover() {
    if skip_without_vm("vm_boots_from_test_failover_and_after_planned_failover") {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip::skip(
            "SKIP: vm_boots_from_test_failover_and_after_planned_failover: /dev/fuse is absent",
        );
        return;
    }
    std::env::set_var("VDREP_RETRY_SCALE", "0.002");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    for d in ["ka", "kb", "a/vm1", "a/store", "b/store"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let s = |p: &str| root.join(p).to_string_lossy().into_owned();
    ok(vdrep(&[
        "keys",
        "init",
        "--name",
        "site-a",
        "--out",
        &s("ka"),
    ]));
    ok(vdrep(&[
        "keys",
        "init",
        "--name",
        "site-b",
        "--out",
        &s("kb"),
    ]));
    let disk = root.join("a/vm1/disk.vhd");
    make_vhd(&disk, 64).expect("make vhd");
    let live = root.join("b/store/live/site-a/vm1");
    let _u = Unmount(vec![root.join("a/vm1"), live.clone()]);
    let ra = Receiver::start(root, "a/store", "ka", "kb/site-b.crt");
    let rb = Receiver::start(root, "b/store", "kb", "ka/site-a.crt");
    ok(vdrep(&["mount", &s("a/vm1"), "--keys", &s("ka")]));
    ok(vdrep(&[
        "protect",
        "vm1",
        "--to",
        &rb.addr,
        "--trust",
        &s("kb/site-b.crt"),
        "--every",
        "1h",
        &s("a/vm1/disk.vhd"),
    ]));
    ok(vdrep(&["sync", &s("a/vm1"), "--timeout", "300"]));

    // 1. The guest writes its proof file on the primary and powers off.
    let wrote =
        vm_boot(&disk, MODE_WRITE, "failover", "vpc", "none").unwrap_or_else(|e| panic!("{e}"));
    let hash = marker_value(&wrote, "WROTE").expect("WROTE marker");
    ok(vdrep(&["sync", &s("a/vm1"), "--timeout", "300"]));

    // 2. Test failover at the secondary: boot the exposed point.
    let out = ok(vdrep(&[
        "failover",
        "vm1",
        "--test",
        "--store",
        &s("b/store"),
    ]));
    let exposed = out
        .lines()
        .map(str::trim)
        .filter_map(|l| l.split_whitespace().find(|w| w.ends_with(".vhd")))
        .map(PathBuf::from)
        .find(|p| p.is_absolute())
        .unwrap_or_else(|| panic!("no exposed VHD path in: {out}"));
    let checked =
        vm_boot(&exposed, MODE_CHECK, "failover", "vpc", "none").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_value(&checked, "CHECK OK").as_deref(),
        Some(hash.as_str()),
        "test failover boot: {checked}"
    );
    ok(vdrep(&[
        "failover",
        "vm1",
        "--cleanup",
        "--store",
        &s("b/store"),
    ]));

    // 3. Planned failover (run at the primary); boot the live disk at B.
    ok(vdrep(&[
        "failover",
        "vm1",
        "--planned",
        "--dir",
        &s("a/vm1"),
        "--store",
        &s("a/store"),
        "--reverse-to",
        &ra.addr,
    ]));
    let live_disk = live.join("disk.vhd");
    assert!(
        is_fuse_mountpoint(&live),
        "B's live folder is not a vdrep mount"
    );
    let checked = vm_boot(&live_disk, MODE_CHECK, "failover", "vpc", "none")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_value(&checked, "CHECK OK").as_deref(),
        Some(hash.as_str()),
        "boot after planned failover: {checked}"
    );
    // The boot changed nothing that was not replicated back.
    ok(vdrep(&[
        "sync",
        &live.to_string_lossy(),
        "--timeout",
        "300",
    ]));
}
