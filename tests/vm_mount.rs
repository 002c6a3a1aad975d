//! The tiny test VM runs with its disk (a fixed VHD) on a `vdrep mount`ed
//! folder, once with `cache=none` (O_DIRECT through the mount) and once with
//! `cache=writeback`; the logs of the cut that follows, applied to a copy
//! taken at the first cut (right after mounting, before the VM ran), make a
//! replica that `qemu-img compare` finds identical to the disk and that boots
//! in check mode with the proof file intact.
//!
//! Two boots per cache mode, four in all (TCG boots cost ~15-30 s each;
//! `vm_boot` prints each boot's time, excluding the wait for the other
//! test's boot):
//! 1. `write` on `DIR/disk.vhd` through the mount;
//! 2. `check` on the replica, copied into the same mount and booted with the
//!    same cache mode, so the check also reads through the mount. The disk
//!    itself is read back through the mount by `qemu-img compare` (and a
//!    byte compare), so a check boot of the disk would prove nothing more
//!    than the identical replica's does, at the price of one more boot.
mod common;
mod skip;

use common::*;
use std::path::{Path, PathBuf};

fn skip(test: &str) -> bool {
    if skip_without_vm(test) {
        return true;
    }
    if !Path::new("/dev/fuse").exists() {
        skip::skip(&format!("SKIP: {test}: /dev/fuse is absent"));
        return true;
    }
    false
}

/// The log of `disk` (file name) among the paths a cut printed; logs live in
/// `<state>/<disk>-<id>/`.
fn log_for(logs: &[PathBuf], disk: &str) -> Option<PathBuf> {
    logs.iter()
        .find(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{disk}-")))
        })
        .cloned()
}

fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

fn vm_on_mount(cache: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vms");
    std::fs::create_dir(&dir).expect("mkdir");
    let disk = dir.join("disk.vhd");
    make_vhd(&disk, 64).expect("make vhd");
    let tag = format!("mount-{cache}");

    let m = VdrepMount::new(&dir).unwrap_or_else(|e| panic!("{e}"));
    // First cut right after mounting; the copy taken now is the replica's base.
    let first = m.cut().unwrap_or_else(|e| panic!("first cut: {e}"));
    let base = tmp.path().join("base.vhd");
    std::fs::copy(&disk, &base).expect("copy at first cut");
    eprintln!("first cut: {first:?}");

    let wrote = vm_boot(&disk, MODE_WRITE, &tag, "vpc", cache).unwrap_or_else(|e| panic!("{e}"));
    let hash = marker_value(&wrote, "WROTE").expect("WROTE marker");
    assert_eq!(hash.len(), 64, "sha256 in {wrote}");

    let second = m.cut().unwrap_or_else(|e| panic!("second cut: {e}"));
    let log = log_for(&second, "disk.vhd").unwrap_or_else(|| {
        panic!("the cut after the VM wrote has no log for disk.vhd: {second:?}")
    });

    // The copy at the first cut is not the disk (so the comparisons below can
    // fail); the copy plus the log is.
    assert!(
        qemu_img_compare(&base, &disk, "vpc").is_err(),
        "the VM's writes did not reach the disk"
    );
    let replica = tmp.path().join("replica.vhd");
    std::fs::copy(&base, &replica).expect("copy base");
    vdrep(&[
        "hrl",
        "apply",
        &log.to_string_lossy(),
        &replica.to_string_lossy(),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    qemu_img_compare(&replica, &disk, "vpc").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        files_equal(&replica, &disk),
        "replica and disk differ byte-wise"
    );

    // Boot the replica in check mode through the mount, same cache mode.
    let on_mount = dir.join("replica.vhd");
    std::fs::copy(&replica, &on_mount).expect("copy replica into the mount");
    let checked =
        vm_boot(&on_mount, MODE_CHECK, &tag, "vpc", cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_value(&checked, "CHECK OK").as_deref(),
        Some(hash.as_str()),
        "{checked}"
    );

    // The check boot mounts read-only: nothing changed on the disk since the
    // cut, and the backing files hold the same bytes after unmounting.
    if let Err(e) = m.unmount() {
        panic!("vdrep umount failed: {e}");
    }
    assert!(files_equal(&replica, &disk), "disk changed after the cut");
}

#[test]
fn vm_on_mount_cache_none() {
    if skip("vm_on_mount_cache_none") {
        return;
    }
    vm_on_mount("none");
}

#[test]
fn vm_on_mount_cache_writeback() {
    if skip("vm_on_mount_cache_writeback") {
        return;
    }
    vm_on_mount("writeback");
}
