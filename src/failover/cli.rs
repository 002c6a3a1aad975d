//! `vdrep points` and `vdrep failover` (client side: they ask the running
//! receiver over its control socket, [`crate::receiver::control`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{human, FailoverArgs};
use crate::receiver::control::{self, PointInfo, RecvControlError, Request};
use crate::replica::{Consistency, Point};

use super::{format_utc, PointSel, ViewInfo, QEMU_PID_FILE};

fn recv_err(e: RecvControlError) -> i32 {
    eprintln!("vdrep: {e}");
    match e {
        RecvControlError::NotRunning { .. } => 2,
        _ => 1,
    }
}

/// Read-only listing straight from the store (no receiver running):
/// `points.json` plus the sizes of the undo records.
fn points_offline(
    store: &Path,
    site: Option<String>,
    vm: &str,
) -> Result<(String, Vec<Point>), String> {
    crate::replica::validate_name("vm", vm).map_err(|e| e.to_string())?;
    let sites = store.join("sites");
    let site = match site {
        Some(s) => s,
        None => {
            let mut found: Vec<String> = std::fs::read_dir(&sites)
                .map_err(|e| {
                    format!(
                        "reading {}: {e} (is {} a vdrep store?)",
                        sites.display(),
                        store.display()
                    )
                })?
                .flatten()
                .filter(|e| e.path().join("vms").join(vm).is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            match found.len() {
                1 => found.remove(0),
                0 => {
                    return Err(format!(
                        "no VM named {vm:?} in the store {}",
                        store.display()
                    ))
                }
                _ => {
                    found.sort();
                    return Err(format!(
                        "VM {vm:?} is replicated here from several sites ({}): say which with --site",
                        found.join(", ")
                    ));
                }
            }
        }
    };
    crate::replica::validate_name("site", &site).map_err(|e| e.to_string())?;
    let vmd = sites.join(&site).join("vms").join(vm);
    #[derive(serde::Deserialize)]
    struct Pf {
        points: Vec<Point>,
    }
    let path = vmd.join("points.json");
    let mut pts = match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice::<Pf>(&b)
                .map_err(|e| format!("{}: unreadable: {e}", path.display()))?
                .points
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
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
    Ok((site, pts))
}

/// `vdrep points NAME --store DIR [--site S] [--json]`.
pub fn points(vm: &str, store: &Path, site: Option<String>, json: bool) -> i32 {
    let req = Request::Points {
        site: site.clone(),
        vm: vm.to_string(),
    };
    let (site, mut pts) = match control::call(store, &req) {
        Ok(r) if r.ok => (r.site.unwrap_or_default(), r.points.unwrap_or_default()),
        Ok(r) => {
            eprintln!("vdrep: points of {vm}: {}", r.error.unwrap_or_default());
            return 1;
        }
        Err(RecvControlError::NotRunning { .. }) => match points_offline(store, site, vm) {
            Ok((s, p)) => (
                s,
                p.into_iter()
                    .map(|point| PointInfo {
                        point,
                        pinned: false,
                    })
                    .collect(),
            ),
            Err(e) => {
                eprintln!("vdrep: points of {vm}: {e}");
                return 1;
            }
        },
        Err(e) => return recv_err(e),
    };
    pts.sort_by_key(|p| std::cmp::Reverse(p.point.cycle));
    if json {
        let v = serde_json::json!({ "site": site, "vm": vm, "points": pts });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    if pts.is_empty() {
        println!("{site}/{vm}: no recovery points yet");
        return 0;
    }
    println!(
        "{:<21} {:>10} {:>12} {:<12} {:<6} DISKS",
        "TIME (UTC)", "ID", "CHANGED", "CONSISTENCY", "PINNED"
    );
    for p in &pts {
        println!(
            "{:<21} {:>10} {:>12} {:<12} {:<6} {}",
            format_utc(p.point.time_unix_ns),
            p.point.cycle,
            if p.point.bytes == 0 {
                "-".to_string()
            } else {
                human(p.point.bytes)
            },
            match p.point.consistency {
                Consistency::Crash => "crash",
                Consistency::App => "app",
            },
            if p.pinned { "yes" } else { "" },
            p.point.disks.len()
        );
    }
    0
}

/// `vdrep failover NAME --store DIR (--test [--point P] [--boot] | --cleanup)`.
pub fn failover(a: FailoverArgs) -> i32 {
    if a.mode.cleanup {
        let req = Request::FailoverCleanup {
            site: a.site.clone(),
            vm: a.name.clone(),
        };
        return match control::call(&a.store, &req) {
            Err(e) => recv_err(e),
            Ok(r) if !r.ok => {
                eprintln!(
                    "vdrep: failover cleanup of {}: {}",
                    a.name,
                    r.error.unwrap_or_default()
                );
                1
            }
            Ok(r) => {
                for w in &r.warnings {
                    eprintln!("vdrep: {w}");
                }
                if let Some(v) = r.view {
                    println!(
                        "{}: test failover of point {} removed ({} written by the test VM discarded)",
                        a.name,
                        v.cycle,
                        human(v.written_bytes)
                    );
                }
                0
            }
        };
    }
    let sel = match a.point.as_deref().map(PointSel::parse).transpose() {
        Ok(s) => s.unwrap_or(PointSel::Latest),
        Err(e) => {
            eprintln!("vdrep: --point: {e}");
            return 2;
        }
    };
    let at = match &a.at {
        Some(p) if p.is_relative() => match std::env::current_dir() {
            Ok(d) => Some(d.join(p)),
            Err(e) => {
                eprintln!("vdrep: --at {}: {e}", p.display());
                return 2;
            }
        },
        other => other.clone(),
    };
    let req = Request::FailoverTest {
        site: a.site.clone(),
        vm: a.name.clone(),
        point: sel,
        at,
    };
    let view = match control::call(&a.store, &req) {
        Err(e) => return recv_err(e),
        Ok(r) if !r.ok => {
            eprintln!(
                "vdrep: test failover of {}: {}",
                a.name,
                r.error.unwrap_or_default()
            );
            return 1;
        }
        Ok(r) => match r.view {
            Some(v) => v,
            None => {
                eprintln!("vdrep: the receiver answered without the view");
                return 1;
            }
        },
    };
    let mut boot = None;
    if a.boot {
        match boot_vm(&a, &view) {
            Ok(b) => boot = Some(b),
            Err(e) => {
                eprintln!(
                    "vdrep: the disks are exposed but the test VM did not start: {e}; remove the test failover with `vdrep failover {} --cleanup --store {}`",
                    a.name,
                    a.store.display()
                );
                return 1;
            }
        }
    }
    if a.json {
        let mut v = serde_json::to_value(&view).unwrap_or_default();
        if let (Some(o), Some((pid, log))) = (v.as_object_mut(), &boot) {
            o.insert("qemu_pid".into(), (*pid).into());
            o.insert("serial_log".into(), log.display().to_string().into());
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    eprintln!(
        "{}: test failover of point {} ({} UTC); the VM's writes go to a scratch overlay",
        a.name,
        view.cycle,
        format_utc(view.time_unix_ns)
    );
    for d in &view.disks {
        println!("{}", d.path.display());
    }
    if let Some((pid, log)) = boot {
        println!("qemu pid {pid}, serial console log {}", log.display());
    }
    eprintln!(
        "remove it with: vdrep failover {} --cleanup --store {}",
        a.name,
        a.store.display()
    );
    0
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
    let cache = crate::control::run_dir().join(format!("kvm-probe-{key:016x}"));
    if let Ok(s) = std::fs::read_to_string(&cache) {
        return s.trim() == "kvm";
    }
    let ok = match kernel {
        Some(k) => probe_kernel(scratch, k),
        None => probe_sector(scratch),
    };
    let _ = std::fs::create_dir_all(crate::control::run_dir());
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

/// Start QEMU (daemonized) on the exposed disks; returns (pid, serial log).
fn boot_vm(a: &FailoverArgs, view: &ViewInfo) -> Result<(u32, PathBuf), String> {
    let pidf = view.scratch.join(QEMU_PID_FILE);
    let log = view.scratch.join("serial.log");
    let mut c = Command::new("qemu-system-x86_64");
    let kvm = match a.accel.as_str() {
        "kvm" => true,
        "tcg" => false,
        _ => kvm_works(&view.scratch, a.kernel.as_deref()),
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
        format!("cannot run qemu-system-x86_64: {e} (apt-get install qemu-system-x86)")
    })?;
    if !out.status.success() {
        return Err(format!(
            "qemu-system-x86_64 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let pid = std::fs::read_to_string(&pidf)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("qemu started but wrote no pid to {}", pidf.display()))?;
    Ok((pid, log))
}
