//! Test failover, as the operator runs it at the secondary site: list a
//! VM's recovery points, expose one as bootable VHD files (the running
//! receiver's views, [`crate::testview`]), boot a test VM on them, and
//! remove it all. Talks to the receiver over its control socket
//! ([`crate::receiver::control`]); `points` reads the store directly when
//! no receiver runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::FailoverError;
use crate::ipc::CallErrorKind;
use crate::receiver::control::{self, PointInfo, Request};
use crate::replica::ReplicaState;
use crate::testview::{PointSel, ViewInfo, QEMU_PID_FILE};

/// Read-only listing straight from the store (no receiver running): the
/// points (`points.json` and its journal) plus the sizes of the undo records.
fn points_offline(
    store: &Path,
    site: Option<String>,
    vm: &str,
) -> Result<(String, Vec<PointInfo>), FailoverError> {
    crate::replica::validate_name("vm", vm).map_err(|e| FailoverError::Store(e.to_string()))?;
    let sites = store.join("sites");
    let site = match site {
        Some(s) => s,
        None => {
            let mut found: Vec<String> = std::fs::read_dir(&sites)
                .map_err(|e| {
                    FailoverError::Store(format!(
                        "reading {}: {e} (is {} a vdrep store?)",
                        sites.display(),
                        store.display()
                    ))
                })?
                .flatten()
                .filter(|e| e.path().join("vms").join(vm).is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            match found.len() {
                1 => found.remove(0),
                0 => {
                    return Err(FailoverError::Store(format!(
                        "no VM named {vm:?} in the store {}",
                        store.display()
                    )))
                }
                _ => {
                    found.sort();
                    return Err(FailoverError::Store(format!(
                        "VM {vm:?} is replicated here from several sites ({}): say which with --site",
                        found.join(", ")
                    )));
                }
            }
        }
    };
    crate::replica::validate_name("site", &site)
        .map_err(|e| FailoverError::Store(e.to_string()))?;
    let vmd = sites.join(&site).join("vms").join(vm);
    let mut pts =
        crate::replica::points_in(&vmd).map_err(|e| FailoverError::Store(e.to_string()))?;
    for p in &mut pts {
        p.bytes = 0;
        for d in &p.disks {
            let Ok(rd) = std::fs::read_dir(vmd.join("disks").join(d).join("undo")) else {
                continue;
            };
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let base = n
                    .strip_suffix(".undo")
                    .and_then(|s| s.split_once('-'))
                    .and_then(|(b, _)| b.parse::<u64>().ok());
                if base == Some(p.cycle) {
                    p.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
    }
    // As `PointInfo::list`: every disk's replica (its `state.json`)
    // reached the point.
    let applied = crate::replica::applied_flags(&pts, |d| {
        let path = vmd.join("disks").join(d).join("state.json");
        let st = crate::util::recycle::read_published(
            &path,
            |p: &Path| std::fs::File::open(p),
            |b| serde_json::from_slice::<ReplicaState>(b),
        );
        st.ok()?.ok()?.cycle
    });
    let pts = pts
        .into_iter()
        .zip(applied)
        .map(|(point, applied)| PointInfo {
            pinned: false,
            definition: std::fs::read_to_string(
                vmd.join("definitions").join(format!("{}.xml", point.cycle)),
            )
            .ok(),
            applied,
            point,
        })
        .collect();
    Ok((site, pts))
}

/// The recovery points of `vm` (oldest first) and the site they belong to:
/// from the running receiver of `store`, or read from the store itself
/// when no receiver runs (then nothing is pinned).
pub fn points(
    store: &Path,
    site: Option<String>,
    vm: &str,
) -> Result<(String, Vec<PointInfo>), FailoverError> {
    let req = Request::Points {
        site: site.clone(),
        vm: vm.to_string(),
    };
    match control::call_ok(store, &req) {
        Ok(r) => Ok((r.site.unwrap_or_default(), r.points.unwrap_or_default())),
        Err(e) if e.kind() == CallErrorKind::NotRunning => points_offline(store, site, vm),
        Err(e) => Err(e.into()),
    }
}

/// Expose point `point` of `vm` as VHD files (at `at`, or the store's
/// default place).
pub fn expose(
    store: &Path,
    site: Option<String>,
    vm: &str,
    point: PointSel,
    at: Option<PathBuf>,
) -> Result<ViewInfo, FailoverError> {
    let req = Request::FailoverTest {
        site,
        vm: vm.to_string(),
        point,
        at,
    };
    control::call_ok(store, &req)?
        .view
        .ok_or_else(|| FailoverError::Answer("the receiver answered without the view".into()))
}

/// Remove the test failover of `vm`: the removed view (if the receiver
/// named it) and warnings.
pub fn cleanup(
    store: &Path,
    site: Option<String>,
    vm: &str,
) -> Result<(Option<ViewInfo>, Vec<String>), FailoverError> {
    let req = Request::FailoverCleanup {
        site,
        vm: vm.to_string(),
    };
    let r = control::call_ok(store, &req)?;
    Ok((r.view, r.warnings))
}

/// A boot sector that goes real mode -> protected mode -> long mode
/// (identity-mapped 2 MiB page) and then writes 1 to QEMU's
/// `isa-debug-exit` port (QEMU exits with status 3). Assembled from:
/// `cli; zero segs; A20 via 0x92; lgdt; CR0.PE; ljmp 08:pm32;`
/// `pm32: zero 0x1000..0x4000; PML4->PDPT->PD(0x83); CR3; CR4.PAE;`
/// `EFER.LME; CR0.PG; ljmp 18:lm64; lm64: out 0xf4,1; hlt` with a GDT
/// {null, code32, data, code64}; padded with zeros and 0x55 0xaa.
const KVM_PROBE_SECTOR: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xe4, 0x92, 0x0c, 0x02,
    0xe6, 0x92, 0x66, 0x0f, 0x01, 0x16, 0xb8, 0x7c, 0x0f, 0x20, 0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f,
    0x22, 0xc0, 0x66, 0xea, 0x2a, 0x7c, 0x00, 0x00, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8,
    0x8e, 0xc0, 0x8e, 0xd0, 0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x00, 0x00,
    0xf3, 0xab, 0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x20,
    0x00, 0x00, 0x03, 0x30, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00,
    0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xe0, 0x83, 0xc8, 0x20, 0x0f, 0x22,
    0xe0, 0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f,
    0x20, 0xc0, 0x0d, 0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0x91, 0x7c, 0x00, 0x00, 0x18,
    0x00, 0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0x1f, 0x00, 0x98, 0x7c, 0x00, 0x00,
];

/// Whether KVM really runs guest code here: `/dev/kvm` may open on hosts
/// where guests then hang (broken nested virtualisation: on this project's
/// CI hosts a boot sector runs fine under KVM, long mode too, yet a Linux
/// kernel hangs after decompression). So the probe boots what will be
/// booted when it can: with `--kernel`, that kernel without an initramfs
/// under `-accel kvm` must reach its "Kernel panic" (no root file system)
/// within 20 s; otherwise the long-mode boot sector above must exit
/// within 10 s. The answer is cached per host kernel, QEMU version and
/// guest kernel in the run folder.
fn kvm_works(scratch: &Path, kernel: Option<&Path>) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qv = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let guest = kernel
        .and_then(|k| {
            let m = std::fs::metadata(k).ok()?;
            let mtime = m
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(format!("{}|{}|{}", k.display(), m.len(), mtime.as_nanos()))
        })
        .unwrap_or_default();
    let key = xxhash_rust::xxh3::xxh3_64(format!("{release}|{qv}|{guest}").as_bytes());
    let cache = crate::ipc::run_dir().join(format!("kvm-probe-{key:016x}"));
    if let Ok(s) = std::fs::read_to_string(&cache) {
        return s.trim() == "kvm";
    }
    let ok = match kernel {
        Some(k) => probe_kernel(scratch, k),
        None => probe_sector(scratch),
    };
    let _ = std::fs::create_dir_all(crate::ipc::run_dir());
    let _ = std::fs::write(&cache, if ok { "kvm\n" } else { "tcg\n" });
    ok
}

/// Run `c` until it exits or `limit` passes (then kill it); the exit
/// status, or None on timeout or spawn failure.
fn run_limited(c: &mut Command, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t0 = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if t0.elapsed() < limit => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// `qemu-system-x86_64 -accel kvm` with no devices or display and `mem`
/// MiB of RAM: the base of both probes.
fn kvm_qemu(mem: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        mem,
    ]);
    c
}

fn probe_sector(scratch: &Path) -> bool {
    let mut sector = KVM_PROBE_SECTOR.to_vec();
    sector.resize(512, 0);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    let img = scratch.join("kvm-probe.img");
    if std::fs::write(&img, &sector).is_err() {
        return false;
    }
    let st = run_limited(
        kvm_qemu("16")
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", img.display())),
        std::time::Duration::from_secs(10),
    );
    let _ = std::fs::remove_file(&img);
    st.is_some_and(|s| s.code() == Some(3))
}

fn probe_kernel(scratch: &Path, kernel: &Path) -> bool {
    let log = scratch.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    run_limited(
        kvm_qemu("128")
            .args(["-no-reboot", "-kernel"])
            .arg(kernel)
            .args(["-append", "console=ttyS0 panic=1 loglevel=1"])
            .arg("-serial")
            .arg(format!("file:{}", log.display())),
        std::time::Duration::from_secs(20),
    );
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    out.contains("Kernel panic")
}

/// How to run a test VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if a probe boot under it works here, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// A test VM on the exposed disks of a test failover.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory: u32,
    /// A kernel to boot directly (else the disks' boot loader).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: Option<String>,
}

/// Start QEMU (daemonized) on the exposed disks; returns (pid, serial log).
pub fn boot_vm(a: &BootOptions, view: &ViewInfo) -> Result<(u32, PathBuf), FailoverError> {
    let pidf = view.scratch.join(QEMU_PID_FILE);
    let log = view.scratch.join("serial.log");
    let mut c = Command::new("qemu-system-x86_64");
    let kvm = match a.accel {
        Accel::Kvm => true,
        Accel::Tcg => false,
        Accel::Auto => kvm_works(&view.scratch, a.kernel.as_deref()),
    };
    if kvm {
        // Falls back to TCG if KVM cannot start.
        c.args(["-accel", "kvm", "-accel", "tcg"]);
    } else {
        c.args(["-accel", "tcg", "-cpu", "max"]);
    }
    c.args([
        "-m",
        &a.memory.to_string(),
        "-display",
        "none",
        "-monitor",
        "none",
    ])
    .args(["-name", &format!("vdrep-test-{}", view.vm)])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-daemonize")
    .arg("-pidfile")
    .arg(&pidf);
    if let Some(k) = &a.kernel {
        c.arg("-kernel").arg(k);
        if let Some(i) = &a.initrd {
            c.arg("-initrd").arg(i);
        }
        if let Some(ap) = &a.append {
            c.arg("-append").arg(ap);
        }
    }
    for d in &view.disks {
        let p = d.path.display().to_string().replace(',', ",,");
        c.arg("-drive")
            .arg(format!("file={p},format=vpc,if=virtio,cache=writeback"));
    }
    let out = c.stdin(Stdio::null()).output().map_err(|e| {
        FailoverError::Boot(format!(
            "cannot run qemu-system-x86_64: {e} (apt-get install qemu-system-x86)"
        ))
    })?;
    if !out.status.success() {
        return Err(FailoverError::Boot(format!(
            "qemu-system-x86_64 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let pid = std::fs::read_to_string(&pidf)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            FailoverError::Boot(format!(
                "qemu started but wrote no pid to {}",
                pidf.display()
            ))
        })?;
    Ok((pid, log))
}
