//! Shared helpers for integration tests: the tiny test VM and the `vdrep` binary.
//!
//! Use from a test crate with `mod common;`. The VM is built once per test
//! process by `scripts/build-tiny-vm.sh` (cached in `<repo>/.vm`, or in
//! `$VDREP_VM_DIR`) and booted by `scripts/vm-run.sh`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Guest modes understood by the tiny VM's `/init`.
pub const MODE_WRITE: &str = "write";
pub const MODE_CHECK: &str = "check";
pub const MODE_STRESS: &str = "stress";

/// Path of the `vdrep` binary built by cargo for this test run.
pub fn vdrep_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdrep"))
}

/// Run `vdrep ARGS...`; stdout on success, else an error with stderr.
pub fn vdrep(args: &[&str]) -> Result<String, String> {
    let out = Command::new(vdrep_bin())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", vdrep_bin().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "vdrep {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Root of the repository (where `scripts/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Folder holding `vmlinuz` and `initramfs.cpio.gz`.
pub fn vm_dir() -> PathBuf {
    std::env::var_os("VDREP_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".vm"))
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// `None` if VM tests can run here, else the reason to skip them.
pub fn vm_skip_reason() -> Option<String> {
    if !in_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)".into());
    }
    None
}

/// Print `SKIP: ...` and return true if VM tests cannot run on this machine.
pub fn skip_without_vm(test: &str) -> bool {
    match vm_skip_reason() {
        Some(why) => {
            crate::skip::skip(&format!("SKIP: {test}: {why}"));
            true
        }
        None => false,
    }
}

/// Build the tiny VM once per test process (the script itself is cached too).
pub fn ensure_vm() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = vm_dir();
            let out = Command::new(repo_root().join("scripts/build-tiny-vm.sh"))
                .arg(&dir)
                .output()
                .map_err(|e| format!("cannot run build-tiny-vm.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "build-tiny-vm.sh failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(dir)
        })
        .clone()
}

/// Make a fixed-size VHD (`qemu-img create -f vpc -o subformat=fixed`).
pub fn make_vhd(path: &Path, size_mib: u64) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=fixed"])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Boot the tiny VM on `disk` and wait for its verdict.
///
/// `mode` is `write`, `check` or `stress`; `tag` is the proof-file tag (no
/// spaces; `-` for none); `format` is qemu's `format=` (`vpc`, `raw`);
/// `cache` is qemu's `cache=` (`none`, `writeback`). Returns the serial log
/// if the expected marker line appeared, otherwise an error with the log.
/// Boots are serialized within a test process (TCG is CPU-heavy).
pub fn vm_boot(
    disk: &Path,
    mode: &str,
    tag: &str,
    format: &str,
    cache: &str,
) -> Result<String, String> {
    vm_boot_with(disk, mode, tag, format, cache, &[])
}

/// [`vm_boot`] with extra `scripts/vm-run.sh` settings (`VM_STAMPS`, or
/// `VM_LOG` to watch the serial log while the guest runs).
pub fn vm_boot_with(
    disk: &Path,
    mode: &str,
    tag: &str,
    format: &str,
    cache: &str,
    env: &[(&str, &str)],
) -> Result<String, String> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let vm = ensure_vm()?;
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let log = tempfile::Builder::new()
        .prefix("vdrep-vm-")
        .suffix(".log")
        .tempfile()
        .map_err(|e| format!("tempfile: {e}"))?;
    let timeout = std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "240".into());
    let started = std::time::Instant::now();
    let out = Command::new(repo_root().join("scripts/vm-run.sh"))
        .arg(disk)
        .args([mode, tag, format, cache])
        .env("VM_DIR", &vm)
        .env("VM_LOG", log.path())
        .env("VM_QUIET", "1")
        .env("VM_TIMEOUT", &timeout)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("cannot run vm-run.sh: {e}"))?;
    let log_path = env
        .iter()
        .find(|(k, _)| *k == "VM_LOG")
        .map_or_else(|| log.path().to_path_buf(), |(_, v)| PathBuf::from(v));
    let serial = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "vm_boot {mode} {tag} on {} ({format}, cache={cache}): {} in {:.1}s",
        disk.display(),
        out.status,
        started.elapsed().as_secs_f64()
    );
    if out.status.success() {
        Ok(serial)
    } else {
        Err(format!(
            "vm-run.sh {mode} failed ({}):\n{stderr}\n--- serial log ---\n{serial}",
            out.status
        ))
    }
}

/// The value after a marker, e.g. `marker_value(log, "WROTE")` is the sha256
/// from `VDREP-GUEST: WROTE <sha256>`.
pub fn marker_value(serial: &str, marker: &str) -> Option<String> {
    let needle = format!("VDREP-GUEST: {marker} ");
    serial.lines().rev().find_map(|line| {
        line.find(&needle)
            .map(|i| line[i + needle.len()..].trim().to_string())
    })
}

/// `qemu-img compare -f FMT -F FMT a b`: Ok if the guest-visible contents match.
pub fn qemu_img_compare(a: &Path, b: &Path, format: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", format])
        .arg(a)
        .arg(b)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Is `dir` itself the mount point of a FUSE file system?
pub fn is_fuse_mountpoint(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // mountinfo: id parent maj:min root mountpoint opts ... - fstype source superopts
    info.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        let mountpoint = left.split(' ').nth(4).unwrap_or("");
        let mountpoint = mountpoint.replace("\\040", " ");
        Path::new(&mountpoint) == dir && right.starts_with("fuse")
    })
}

/// A `vdrep mount DIR` that is unmounted (`vdrep umount DIR`) when dropped.
pub struct VdrepMount {
    dir: PathBuf,
    mounted: bool,
}

impl VdrepMount {
    pub fn new(dir: &Path) -> Result<Self, String> {
        let dir = dir.to_path_buf();
        vdrep(&["mount", &dir.to_string_lossy()])?;
        if !is_fuse_mountpoint(&dir) {
            return Err(format!(
                "vdrep mount returned but {} is not a FUSE mount",
                dir.display()
            ));
        }
        Ok(VdrepMount { dir, mounted: true })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `vdrep cut DIR`: the sealed log paths, one per printed line.
    pub fn cut(&self) -> Result<Vec<PathBuf>, String> {
        let out = vdrep(&["cut", &self.dir.to_string_lossy()])?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let p = PathBuf::from(l);
                if p.is_absolute() {
                    p
                } else {
                    self.dir.join(p)
                }
            })
            .collect())
    }

    /// Unmount now and report errors (drop only best-effort unmounts).
    pub fn unmount(mut self) -> Result<(), String> {
        self.mounted = false;
        vdrep(&["umount", &self.dir.to_string_lossy()]).map(|_| ())
    }
}

impl Drop for VdrepMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if vdrep(&["umount", &self.dir.to_string_lossy()]).is_err() && is_fuse_mountpoint(&self.dir)
        {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status();
        }
    }
}
