//! Boots the tiny test VM on plain VHDs (no vdrep in the path): the baseline
//! that the same runs over a `vdrep mount` are compared with.
mod common;
mod skip;

use common::*;
use std::path::Path;

/// Write, check; with `thorough`, also check a `cp` copy and that a wrong
/// tag fails (the checks of the copy are the same whatever the cache mode).
fn write_then_check(dir: &Path, cache: &str, thorough: bool) {
    let disk = dir.join(format!("disk-{cache}.vhd"));
    make_vhd(&disk, 64).expect("make vhd");
    let tag = format!("plain-{cache}");

    let wrote = vm_boot(&disk, MODE_WRITE, &tag, "vpc", cache).unwrap_or_else(|e| panic!("{e}"));
    let hash = marker_value(&wrote, "WROTE").expect("WROTE marker");
    assert_eq!(hash.len(), 64, "sha256 in {wrote}");

    let checked = vm_boot(&disk, MODE_CHECK, &tag, "vpc", cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_value(&checked, "CHECK OK").as_deref(),
        Some(hash.as_str())
    );

    if !thorough {
        return;
    }
    // A plain copy of the image carries the file system and the proof file.
    let copy = dir.join(format!("copy-{cache}.vhd"));
    std::fs::copy(&disk, &copy).expect("copy vhd");
    let checked = vm_boot(&copy, MODE_CHECK, &tag, "vpc", cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_value(&checked, "CHECK OK").as_deref(),
        Some(hash.as_str())
    );

    // The check must really check: a wrong tag fails.
    let wrong = vm_boot(&copy, MODE_CHECK, "some-other-tag", "vpc", cache);
    let err = wrong.expect_err("check with the wrong tag must fail");
    assert!(err.contains("CHECK FAIL"), "{err}");
}

#[test]
fn vm_plain_vhd_cache_none() {
    if skip_without_vm("vm_plain_vhd_cache_none") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_then_check(dir.path(), "none", true);
}

/// The same baseline with the guest's page cache in writeback mode. It tests
/// the tiny VM and QEMU only (no vdrep in the path; `vm_mount`'s writeback
/// case is the one over vdrep), so CI, where every TCG boot is on the
/// critical path, leaves it out: `cargo test --test vm_guest -- --ignored`
/// when a writeback run over the mount fails and the guest is suspect.
#[test]
#[ignore = "baseline of the guest alone (no vdrep); run when vm_mount's writeback case fails"]
fn vm_plain_vhd_cache_writeback() {
    if skip_without_vm("vm_plain_vhd_cache_writeback") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_then_check(dir.path(), "writeback", false);
}

#[test]
fn vdrep_binary_is_built() {
    assert!(vdrep_bin().exists(), "{}", vdrep_bin().display());
}

#[test]
fn fuse_mountpoint_detection() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(!is_fuse_mountpoint(dir.path()));
    assert!(!is_fuse_mountpoint(Path::new("/")));

    // Positive case with bindfs, when it and /dev/fuse are available.
    let src = tempfile::tempdir().expect("tempdir");
    let mounted = std::process::Command::new("bindfs")
        .arg(src.path())
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        skip::skip("SKIP: fuse_mountpoint_detection positive case: bindfs mount failed");
        return;
    }
    let seen = is_fuse_mountpoint(dir.path());
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir.path())
        .status();
    assert!(
        seen,
        "bindfs mount at {} not detected",
        dir.path().display()
    );
}
