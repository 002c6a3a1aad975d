//! The fresh-machine path: `scripts/check-prereqs.sh` reports every
//! prerequisite with its version or MISSING, and `scripts/demo.sh` stops with
//! a non-zero exit and a clear reason, never "demo: OK", when a prerequisite
//! it needs (QEMU) is absent.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A folder of symlinks to every program on the current PATH (and in
/// /usr/sbin, /sbin, which the scripts also search) except those `hide`
/// rejects: a PATH on which those programs are absent.
fn path_without(dir: &Path, hide: impl Fn(&str) -> bool) -> String {
    let farm = dir.join("bin");
    std::fs::create_dir_all(&farm).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if hide(&name) || farm.join(&name).symlink_metadata().is_ok() {
                continue;
            }
            symlink(e.path(), farm.join(&name)).unwrap();
        }
    }
    farm.to_string_lossy().into_owned()
}

fn hidden_in_sbin(name: &str) -> bool {
    ["/sbin", "/usr/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

#[test]
fn check_prereqs_lists_every_prerequisite_with_a_version() {
    let out = Command::new(repo().join("scripts/check-prereqs.sh"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "prerequisites missing on this machine (run bash .ci/run as root):\n{stdout}{stderr}"
    );
    for name in [
        "qemu-system-x86_64",
        "qemu-img",
        "fio",
        "fusermount3",
        "cargo",
        "/dev/fuse",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{stdout}"));
        assert!(!line.contains("MISSING"), "{line}");
    }
}

#[test]
fn check_prereqs_fails_and_names_the_package_of_a_missing_tool() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!hidden_in_sbin("fio"));
    let path = path_without(tmp.path(), |n| n == "fio");
    let out = Command::new("bash")
        .arg(repo().join("scripts/check-prereqs.sh"))
        .env("PATH", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("fio "))
        .unwrap();
    assert!(
        line.contains("MISSING") && line.contains("install: fio"),
        "{line}"
    );
}

/// Too little free disk space is reported before the build and the tests
/// start (a full disk otherwise surfaces as ENOSPC in a random test much
/// later): the check names the folder, the free and the needed GiB, and what
/// to do, and exits 1.
#[test]
fn check_prereqs_fails_when_the_disk_is_too_full() {
    let out = Command::new(repo().join("scripts/check-prereqs.sh"))
        .env("VDREP_MIN_FREE_GIB", "1000000")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let repo_dir = repo().display().to_string();
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&repo_dir))
        .unwrap_or_else(|| panic!("no disk-space line for {repo_dir}:\n{stdout}"));
    assert!(line.contains("GiB free: LOW (need 1000000 GiB)"), "{line}");
    assert!(stderr.contains("free some"), "{stderr}");
}

/// QEMU is absent from PATH: the demo must stop at its prerequisites step
/// with a non-zero exit and name the package, whether or not it is allowed to
/// install (as root it runs apt-get, which finds QEMU installed, and must
/// still notice that the command is not there).
#[test]
fn demo_fails_loudly_without_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!hidden_in_sbin("qemu-system-x86_64"));
    let path = path_without(tmp.path(), |n| n.starts_with("qemu-system"));
    for no_install in ["1", "0"] {
        let demo_dir = tmp.path().join(format!("demo-{no_install}"));
        let out = Command::new("bash")
            .arg(repo().join("scripts/demo.sh"))
            .env("PATH", &path)
            .env("NO_INSTALL", no_install)
            .env("NO_BUILD", "1")
            .env("VDREP", env!("CARGO_BIN_EXE_vdrep"))
            .env("DEMO_DIR", &demo_dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "demo succeeded without QEMU:\n{stdout}\n{stderr}"
        );
        assert!(!stdout.contains("demo: OK"), "{stdout}");
        assert!(
            stderr.contains("demo: FAILED at step 1"),
            "{stdout}\n{stderr}"
        );
        assert!(stderr.contains("qemu-system-x86"), "{stderr}");
        assert!(
            !demo_dir.join("site-a").exists(),
            "the demo went past its prerequisites step"
        );
    }
}
