//! `vdrep points`, `resync`, `verify` (and the hidden `hash-bench`):
//! looking at recovery points and comparing the source with the replica.

use std::collections::HashMap;
use std::path::Path;

use super::fmt::{control_err, human, with_progress};
use crate::daemon::control::{self, Request};
use crate::failover::{test, FailoverError};
use crate::ipc::CallErrorKind;
use crate::receiver::control::PointInfo;
use crate::replica::Consistency;
use crate::testview::format_utc;

/// `vdrep resync NAME`.
pub fn resync(name: &str, background: bool, timeout: u64, json: bool) -> i32 {
    let Some(m) = control::mount_of_vm(name) else {
        eprintln!("vdrep: no running mount protects a VM named {name}");
        return 2;
    };
    let req = Request::Resync {
        vm: name.to_string(),
        background,
        timeout_secs: timeout,
    };
    let res = with_progress(&m, Some(name), !background, || control::call(&m, &req));
    match res {
        Err(e) => control_err(e),
        Ok(r) if !r.ok => {
            eprintln!("vdrep: resync failed: {}", r.error.unwrap_or_default());
            1
        }
        Ok(r) => {
            match (r.resync, json) {
                (Some(p), true) => {
                    println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default())
                }
                (Some(p), false) => println!(
                    "{name}: resync complete: {} blocks compared, {} differed and were sent{}",
                    p.blocks_compared,
                    p.blocks_sent,
                    p.resumed_from
                        .map(|o| format!(" (resumed at {})", human(o)))
                        .unwrap_or_default()
                ),
                (None, _) => println!("{name}: resync scheduled; watch it with `vdrep status`"),
            }
            0
        }
    }
}

/// `vdrep verify NAME`.
pub fn verify(name: &str, timeout: u64, json: bool) -> i32 {
    let Some(m) = control::mount_of_vm(name) else {
        eprintln!("vdrep: no running mount protects a VM named {name}");
        return 2;
    };
    let req = Request::Verify {
        vm: name.to_string(),
        timeout_secs: timeout,
    };
    let res = with_progress(&m, Some(name), true, || control::call(&m, &req));
    let disks = match res {
        Err(e) => return control_err(e),
        Ok(r) if !r.ok => {
            eprintln!("vdrep: verify failed: {}", r.error.unwrap_or_default());
            return 2;
        }
        Ok(r) => r.verify.unwrap_or_default(),
    };
    let bad = disks.iter().any(|d| !d.differ.is_empty());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&disks).unwrap_or_default()
        );
    } else {
        for d in &disks {
            let bytes: u64 = d.differ.iter().map(|r| r.1).sum();
            println!(
                "{}: {} blocks compared with point {}: {}{}",
                d.disk,
                d.blocks_compared,
                d.replica_cycle,
                if d.differ.is_empty() {
                    "identical".to_string()
                } else {
                    format!("{} range(s), {} differ", d.differ.len(), human(bytes))
                },
                if d.blocks_skipped > 0 {
                    format!(
                        " ({} blocks written since are on their way, not judged)",
                        d.blocks_skipped
                    )
                } else {
                    String::new()
                }
            );
            for (off, len) in &d.differ {
                println!("  differs: offset {off} length {len}");
            }
        }
    }
    i32::from(bad)
}

/// `vdrep hash-bench FILE` (hidden).
pub fn hash_bench(file: &std::path::Path, bs: usize) -> i32 {
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vdrep: {}: {e}", file.display());
            return 1;
        }
    };
    let all = crate::resync::hash_threads();
    for threads in [1, all] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let d = crate::resync::digest_blocks(&data, bs.max(512), threads);
            std::hint::black_box(d);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "threads={threads} bytes={} secs={best:.4} gbps={:.2}",
            data.len(),
            data.len() as f64 / best / 1e9
        );
    }
    0
}

/// `vdrep points NAME --store DIR [--site S] [--json]`.
pub fn points(vm: &str, store: &Path, site: Option<String>, json: bool) -> i32 {
    let (site, pts) = match test::points(store, site, vm) {
        Ok(v) => v,
        Err(FailoverError::Control(e)) if e.kind() != CallErrorKind::Refused => {
            return control_err(e)
        }
        Err(e) => {
            eprintln!("vdrep: points of {vm}: {e}");
            return 1;
        }
    };
    let boots = crate::failover::domain::boot_checks(store, &site, vm);
    print_points(&site, vm, pts, json, None, &boots)
}

/// `vdrep points --group GROUP --store DIR [--site S] [--json]`.
pub fn group_points(group: &str, store: &Path, site: Option<String>, json: bool) -> i32 {
    let (site, mut pts) = match crate::failover::group::points(store, site, group) {
        Ok(v) => v,
        Err(FailoverError::Control(e)) if e.kind() != CallErrorKind::Refused => {
            return control_err(e)
        }
        Err(e) => {
            eprintln!("vdrep: points of group {group}: {e}");
            return 1;
        }
    };
    pts.sort_by_key(|p| std::cmp::Reverse(p.cycle));
    if json {
        let v = serde_json::json!({ "site": site, "group": group, "points": pts });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    if pts.is_empty() {
        println!(
            "group {group}: no group points yet (one exists once every VM of the group committed the same cut; `vdrep status` at the sending site says why not)"
        );
        return 0;
    }
    println!(
        "{:<21} {:>10} {:<12} VMS (POINT ID)",
        "TIME (UTC)", "ID", "CONSISTENCY"
    );
    for p in &pts {
        let vms: Vec<String> = p
            .members
            .iter()
            .map(|m| format!("{} ({})", m.vm, m.point))
            .collect();
        println!(
            "{:<21} {:>10} {:<12} {}",
            format_utc(p.time_unix_ns),
            p.cycle,
            match p.consistency {
                Consistency::Crash => "crash",
                Consistency::App => "app",
            },
            vms.join(", ")
        );
    }
    0
}

/// Print the points of `site/vm` (newest first), as a table or as JSON
/// (with `"store"` if given), with each point's boot check (`verify --boot`).
pub fn print_points(
    site: &str,
    vm: &str,
    mut pts: Vec<PointInfo>,
    json: bool,
    store: Option<&str>,
    boots: &HashMap<u64, crate::failover::domain::BootCheck>,
) -> i32 {
    pts.sort_by_key(|p| std::cmp::Reverse(p.point.cycle));
    if json {
        let mut list = serde_json::to_value(&pts).unwrap_or_default();
        if let Some(a) = list.as_array_mut() {
            for (v, p) in a.iter_mut().zip(&pts) {
                if let (Some(o), Some(b)) = (v.as_object_mut(), boots.get(&p.point.cycle)) {
                    o.insert("boot".into(), serde_json::to_value(b).unwrap_or_default());
                }
            }
        }
        let mut v = serde_json::json!({ "site": site, "vm": vm, "points": list });
        if let (Some(o), Some(st)) = (v.as_object_mut(), store) {
            o.insert("store".into(), st.into());
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    if pts.is_empty() {
        println!("{site}/{vm}: no recovery points yet");
        return 0;
    }
    println!(
        "{:<21} {:>10} {:>12} {:<12} {:<8} {:<6} {:<5} {:<6} DISKS",
        "TIME (UTC)", "ID", "CHANGED", "CONSISTENCY", "APPLIED", "PINNED", "DEF", "BOOT"
    );
    for p in &pts {
        println!(
            "{:<21} {:>10} {:>12} {:<12} {:<8} {:<6} {:<5} {:<6} {}",
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
            if p.applied { "yes" } else { "pending" },
            if p.pinned { "yes" } else { "" },
            if p.definition.is_some() { "yes" } else { "" },
            match boots.get(&p.point.cycle) {
                Some(b) if b.verified => "ok",
                Some(_) => "FAILED",
                None => "",
            },
            p.point.disks.len()
        );
    }
    if pts.iter().any(|p| !p.applied) {
        println!(
            "APPLIED pending: the point's logs are durable here and are being applied to the replicas; a failover to it applies them first."
        );
    }
    0
}
