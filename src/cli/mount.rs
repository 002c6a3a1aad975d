//! `vdrep mount`, `umount`, `cut` and `status`: the tracking mount.

use std::path::PathBuf;

use super::fmt::{control_err, human, resync_line};
use crate::config::Config;
use crate::daemon::control::{self, Request};
use crate::daemon::{self, DaemonError, MountOptions};
use crate::fs::FsOptions;
use crate::ipc::{CallError, CallErrorKind};
use crate::sender::alert::{alert_reason, Alert};
use crate::tracking::{ResyncScope, TrackConfig, TrackState};

/// `vdrep mount DIR ...`: the flags over the configuration's `[[mount]]`
/// entry for DIR and `[site] keys`; the file's VMs under DIR are protected
/// once the mount is live.
#[allow(clippy::too_many_arguments)]
pub fn mount(
    dir: PathBuf,
    (foreground, (log_format, log_file)): (bool, (crate::service::LogFormat, Option<PathBuf>)),
    block_size: Option<u32>,
    patterns: Vec<String>,
    threads: usize,
    no_writeback_cache: bool,
    (keys, metrics_listen): (Option<PathBuf>, Option<std::net::SocketAddr>),
    (fuse_transport, enable_uring): (Option<String>, bool),
    cfg: Option<&Config>,
) -> i32 {
    let canon = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let entry = cfg.and_then(|c| c.mount(&canon));
    let mut track = TrackConfig {
        block_size: block_size
            .or(entry.and_then(|m| m.block_size))
            .unwrap_or(DEFAULT_BLOCK_SIZE),
        activity_log: activity_log_env()
            .or(entry.and_then(|m| m.activity_log))
            .unwrap_or(true),
        activity_ahead: activity_ahead_env().unwrap_or(crate::tracking::DEFAULT_ACTIVITY_AHEAD),
        activity_hot: activity_hot_env()
            .or(entry.and_then(|m| m.activity_hot))
            .unwrap_or(crate::tracking::DEFAULT_ACTIVITY_HOT),
        keep_writes: keep_writes_env()
            .or(entry.and_then(|m| m.keep_writes))
            .unwrap_or(crate::tracking::kept::DEFAULT_KEEP_WRITES),
        ..TrackConfig::default()
    };
    let watchdog = match watchdog_env() {
        Err(code) => return code,
        Ok(env) => env
            .or(entry.and_then(|m| m.watchdog))
            .unwrap_or(Some(crate::fuse::supervisor::WATCHDOG_DEFAULT)),
    };
    if !patterns.is_empty() {
        track.patterns = patterns;
    } else if let Some(m) = entry.filter(|m| !m.patterns.is_empty()) {
        track.patterns = m.patterns.clone();
    }
    let fuse_transport = match fuse_transport_for(fuse_transport, entry, enable_uring) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let fs = FsOptions {
        n_threads: threads.max(1),
        writeback_cache: !no_writeback_cache,
        fuse_transport,
        max_write: fuse_max_write_env().unwrap_or_else(crate::fs::default_max_write),
        ..FsOptions::default()
    };
    let keys = keys.or(cfg.and_then(|c| c.site.keys.clone()));
    let keys = match keys.map(|k| std::fs::canonicalize(&k).map_err(|e| (k, e))) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err((k, e))) => {
            eprintln!("vdrep: --keys {}: {e}", k.display());
            return 2;
        }
    };
    let protect = match cfg.map(|c| super::config::specs_under(c, &canon)) {
        None => Vec::new(),
        Some(Ok(v)) => v,
        Some(Err(code)) => return code,
    };
    // The daemon does not keep the working folder: a relative --log-file
    // is taken from here.
    let log_file = log_file.map(|f| std::path::absolute(&f).unwrap_or(f));
    daemon::mount(MountOptions {
        dir,
        foreground,
        log_format,
        log_file,
        track,
        fs,
        keys,
        protect,
        rate_schedules: cfg
            .map(|c| crate::daemon::reload::schedules_under(c, &canon))
            .unwrap_or_default(),
        config: cfg.map(|c| std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone())),
        metrics_listen: metrics_listen.or(entry.and_then(|m| m.metrics_listen)),
        notify: super::config::notify_spec(cfg),
        watchdog,
    })
}

/// The FUSE transport: `--fuse-transport`, else `VDREP_FUSE_TRANSPORT`, else
/// the `[[mount]]` entry's `fuse_transport`, else `dev`. For `uring` the
/// kernel switch must be on (`--enable-uring` turns it on); a kernel
/// without it serves `/dev/fuse` (one line says so).
fn fuse_transport_for(
    flag: Option<String>,
    entry: Option<&crate::config::MountCfg>,
    enable: bool,
) -> Result<crate::fuse::FuseTransport, i32> {
    use crate::fuse::uring::{self, EnableState};
    use crate::fuse::FuseTransport;
    let env = std::env::var("VDREP_FUSE_TRANSPORT")
        .ok()
        .filter(|v| !v.is_empty());
    let (given, from) = match (flag, env) {
        (Some(f), _) => (Some(f), "--fuse-transport"),
        (None, Some(e)) => (Some(e), "VDREP_FUSE_TRANSPORT"),
        (None, None) => (None, ""),
    };
    let t = match given {
        Some(v) => match crate::config::parse_fuse_transport(&v) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("vdrep: {from}: {e}");
                return Err(2);
            }
        },
        None => entry.and_then(|m| m.fuse_transport).unwrap_or_default(),
    };
    if t != FuseTransport::Uring {
        return Ok(t);
    }
    match uring::enable_state() {
        EnableState::On => Ok(t),
        EnableState::Missing => {
            eprintln!(
                "vdrep: this kernel has no FUSE over io_uring ({} is missing; Linux 6.14 or later): serving through /dev/fuse",
                uring::ENABLE_PARAM
            );
            Ok(FuseTransport::Dev)
        }
        EnableState::Off if enable => match uring::set_enabled(true) {
            Ok(()) => {
                eprintln!("vdrep: set {} = Y", uring::ENABLE_PARAM);
                Ok(t)
            }
            Err(e) => {
                eprintln!(
                    "vdrep: cannot switch FUSE over io_uring on ({}: {e}; needs root)",
                    uring::ENABLE_PARAM
                );
                Err(2)
            }
        },
        EnableState::Off => {
            eprintln!(
                "vdrep: fuse_transport = uring, but FUSE over io_uring is off in the kernel ({} = N): run `echo Y > {}` as root, or mount with --enable-uring, or use --fuse-transport dev",
                uring::ENABLE_PARAM,
                uring::ENABLE_PARAM
            );
            Err(2)
        }
    }
}

/// `VDREP_ACTIVITY_LOG=on|off` (over the configuration's `activity_log`):
/// for benchmarks that run `vdrep mount DIR` as is.
fn activity_log_env() -> Option<bool> {
    match std::env::var("VDREP_ACTIVITY_LOG").ok()?.as_str() {
        "on" | "1" | "true" => Some(true),
        "off" | "0" | "false" => Some(false),
        other => {
            eprintln!("vdrep: ignoring VDREP_ACTIVITY_LOG={other:?} (give on or off)");
            None
        }
    }
}

/// `VDREP_WATCHDOG=30s|off` (over the configuration's `watchdog`); a
/// value that is neither refuses the mount (exit code 2).
fn watchdog_env() -> Result<Option<Option<std::time::Duration>>, i32> {
    let name = crate::fuse::supervisor::WATCHDOG_ENV;
    let Ok(v) = std::env::var(name) else {
        return Ok(None);
    };
    crate::config::parse_watchdog(&v).map(Some).map_err(|e| {
        eprintln!("vdrep: {name}={v:?}: {e}");
        2
    })
}

/// `VDREP_ACTIVITY_AHEAD=N`: extents the activity log records ahead of a
/// sequential writer (0: none), for the write-path benchmark's with/without.
fn activity_ahead_env() -> Option<u32> {
    let v = std::env::var("VDREP_ACTIVITY_AHEAD")
        .ok()
        .filter(|v| !v.is_empty())?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => {
            eprintln!("vdrep: ignoring VDREP_ACTIVITY_AHEAD={v:?} (give a number of extents)");
            None
        }
    }
}

/// `VDREP_ACTIVITY_HOT=SIZE` (over the configuration's `activity_hot`):
/// the activity log's budget, for the write-path benchmark's with/without.
fn activity_hot_env() -> Option<u32> {
    let v = std::env::var("VDREP_ACTIVITY_HOT")
        .ok()
        .filter(|v| !v.is_empty())?;
    match crate::config::parse_activity_hot(&v) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("vdrep: ignoring VDREP_ACTIVITY_HOT={v:?}: {e}");
            None
        }
    }
}

/// `VDREP_KEEP_WRITES=SIZE` (over the configuration's `keep_writes`): the
/// mount's memory for kept writes, for the benchmarks' with/without.
fn keep_writes_env() -> Option<u64> {
    let v = std::env::var("VDREP_KEEP_WRITES")
        .ok()
        .filter(|v| !v.is_empty())?;
    match crate::config::parse_keep_writes(&v) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("vdrep: ignoring VDREP_KEEP_WRITES={v:?}: {e}");
            None
        }
    }
}

/// `VDREP_FUSE_MAX_WRITE`: the largest FUSE WRITE request in bytes, 4096
/// to 1048576 (default [`crate::fs::default_max_write`]: 1 MiB, or 512 KiB
/// where 1 MiB WRITEs could not be spliced; more than 1 MiB
/// would need the kernel's global `fs.fuse.max_pages_limit` raised, which
/// measured slower: kernel-notes/writepath.md).
fn fuse_max_write_env() -> Option<u32> {
    let v = std::env::var("VDREP_FUSE_MAX_WRITE")
        .ok()
        .filter(|v| !v.is_empty())?;
    match v.trim().parse::<u32>() {
        Ok(n) if (4096..=(1 << 20)).contains(&n) => Some(n),
        _ => {
            eprintln!(
                "vdrep: ignoring VDREP_FUSE_MAX_WRITE={v:?}: give bytes from 4096 to 1048576"
            );
            None
        }
    }
}

/// `vdrep mount`'s default `--block-size`.
const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// `vdrep umount DIR [--lazy]`.
pub fn umount(dir: PathBuf, lazy: bool) -> i32 {
    match daemon::stop(&dir, lazy) {
        Ok(()) => 0,
        Err(DaemonError::StillRunning { pid, .. }) => {
            eprintln!(
                "vdrep: {} is unmounted but the daemon (pid {pid}) is still saving state or serving open files",
                dir.display()
            );
            1
        }
        Err(DaemonError::Control(e @ CallError::Refused { .. })) => {
            eprintln!("vdrep: {e}");
            1
        }
        Err(DaemonError::Control(e)) if e.kind() == CallErrorKind::NotRunning => {
            // A daemon that died leaves a dead mount behind: remove it.
            match daemon::remove_dead_mount(&dir, lazy) {
                Ok(done) => {
                    let aborted = done.aborted.map_or(String::new(), |n| {
                        format!("aborted its FUSE connection ({n}: waiting I/O failed) and ")
                    });
                    eprintln!(
                        "vdrep: no daemon was running for {}; {aborted}removed the stale mount (its disks will need a resync)",
                        dir.display()
                    );
                    0
                }
                Err(e @ DaemonError::SupervisorAlive { .. }) => {
                    eprintln!("vdrep: {e}");
                    1
                }
                Err(e) => {
                    eprintln!(
                        "vdrep: {} is not mounted by a running vdrep: {e}",
                        dir.display()
                    );
                    2
                }
            }
        }
        Err(DaemonError::Control(e)) => control_err(e),
        Err(e) => {
            eprintln!("vdrep: {e}");
            1
        }
    }
}

/// `vdrep restart DIR`: hand the mount to a new worker and wait for it.
pub fn restart(dir: PathBuf) -> i32 {
    let old = match control::call(&dir, &Request::Status) {
        Err(e) => return control_err(e),
        Ok(r) => r.worker,
    };
    let Some(old) = old else {
        eprintln!(
            "vdrep: the daemon of {} has no supervisor (started by an older vdrep): unmount and mount it again",
            dir.display()
        );
        return 1;
    };
    match control::call_ok(&dir, &Request::Restart) {
        Err(e @ CallError::Refused { .. }) => {
            eprintln!("vdrep: restart refused: {e}");
            return 1;
        }
        Err(e) => return control_err(e),
        Ok(_) => {}
    }
    let t0 = std::time::Instant::now();
    while t0.elapsed() < RESTART_TIMEOUT {
        if let Ok(Some(w)) = control::call(&dir, &Request::Status).map(|r| r.worker) {
            if w.pid != old.pid {
                println!(
                    "{}: worker pid {} (vdrep {}) replaced by pid {} (vdrep {}), restart #{}",
                    dir.display(),
                    old.pid,
                    old.version,
                    w.pid,
                    w.version,
                    w.restarts
                );
                return 0;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!(
        "vdrep: no new worker answered for {} within {} s (see the mount's log)",
        dir.display(),
        RESTART_TIMEOUT.as_secs()
    );
    1
}

/// How long `vdrep restart` waits for the new worker.
const RESTART_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `vdrep cut DIR [--json]`.
pub fn cut(dir: PathBuf, json: bool) -> i32 {
    match control::call(&dir, &Request::Cut) {
        Err(e) => control_err(e),
        Ok(r) if !r.ok => {
            eprintln!("vdrep: cut failed: {}", r.error.unwrap_or_default());
            1
        }
        Ok(r) => {
            let Some(cut) = r.cut else {
                eprintln!("vdrep: the daemon answered without a cut report");
                return 1;
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&cut).unwrap_or_default());
            }
            let mut failed = 0;
            for d in &cut.disks {
                match (&d.log, &d.error) {
                    (Some(p), None) => {
                        if !json {
                            println!("{}", p.display());
                        }
                    }
                    (Some(p), Some(e)) => {
                        if !json {
                            println!("{}", p.display());
                        }
                        eprintln!("vdrep: {}: {e}", d.disk);
                    }
                    (None, e) => {
                        failed += 1;
                        eprintln!(
                            "vdrep: {}: no log for cycle {}: {}",
                            d.disk,
                            d.cycle,
                            e.as_deref().unwrap_or("unknown reason")
                        );
                    }
                }
            }
            if failed > 0 {
                3
            } else {
                0
            }
        }
    }
}

/// `DIR`, or every running mount without it; `Err(2)` (said on stderr)
/// if none runs.
pub(super) fn mounts_or_all(dir: Option<PathBuf>) -> Result<Vec<PathBuf>, i32> {
    let mounts = match dir {
        Some(d) => vec![d],
        None => control::running_mounts(),
    };
    if mounts.is_empty() {
        eprintln!("vdrep: no vdrep mount is running");
        return Err(2);
    }
    Ok(mounts)
}

/// The failovers from a bucket running here, one line each (text status).
fn bucket_failover_lines(views: &[crate::testview::bucket::RunningView]) {
    for r in views {
        let v = &r.view;
        let c = &r.status.cache;
        let mut line = format!(
            "failover {} of {}/{} from the bucket: point {} at {}, {} fetched",
            r.mode,
            v.site,
            v.vm,
            v.cycle,
            v.mountpoint.display(),
            human(c.fetched_bytes)
        );
        if let Some(h) = &r.status.hydration {
            line.push_str(&if h.complete {
                format!(
                    ", hydrated: {} local in {}",
                    human(h.total_bytes),
                    h.dir.display()
                )
            } else {
                format!(
                    ", hydrating {:.1} % ({} of {})",
                    h.percent,
                    human(h.hydrated_bytes),
                    human(h.total_bytes)
                )
            });
        }
        println!("{line}");
        if let Some(e) = r.status.hydration.as_ref().and_then(|h| h.error.as_ref()) {
            println!("    last error: {e}");
        }
    }
}

/// `vdrep status [DIR] [--json]`.
pub fn status(dir: Option<PathBuf>, json: bool) -> i32 {
    // Failovers straight from a bucket run without a mount (DR site).
    let views = if dir.is_none() {
        crate::testview::bucket::running()
    } else {
        Vec::new()
    };
    if dir.is_none() && !views.is_empty() && control::running_mounts().is_empty() {
        if json {
            let v = serde_json::json!({ "bucket_failovers": views });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            bucket_failover_lines(&views);
        }
        return 0;
    }
    let mounts = match mounts_or_all(dir) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut all = Vec::new();
    for m in &mounts {
        match control::call(m, &Request::Status) {
            Err(e) => return control_err(e),
            Ok(r) => all.push(r),
        }
    }
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(&r.status).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("pid".into(), r.pid.into());
                    let mut repl = serde_json::to_value(&r.replication).unwrap_or_default();
                    // Each VM's bandwidth limit in force (and its schedule).
                    for vm in repl.as_array_mut().into_iter().flatten() {
                        let rate = vm
                            .get("vm")
                            .and_then(|n| n.as_str())
                            .and_then(|n| r.rates.as_ref()?.get(n))
                            .and_then(|x| serde_json::to_value(x).ok());
                        if let (Some(o), Some(serde_json::Value::Object(rate))) =
                            (vm.as_object_mut(), rate)
                        {
                            o.extend(rate);
                        }
                    }
                    o.insert("replication".into(), repl);
                    o.insert(
                        "worker".into(),
                        serde_json::to_value(&r.worker).unwrap_or_default(),
                    );
                    o.insert(
                        "warnings".into(),
                        serde_json::to_value(&r.warnings).unwrap_or_default(),
                    );
                    if !views.is_empty() {
                        o.insert(
                            "bucket_failovers".into(),
                            serde_json::to_value(&views).unwrap_or_default(),
                        );
                    }
                }
                v
            })
            .collect();
        let out = if v.len() == 1 {
            v.into_iter().next().unwrap_or_default()
        } else {
            serde_json::Value::Array(v)
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return 0;
    }
    bucket_failover_lines(&views);
    for r in all {
        for w in &r.warnings {
            println!("warning: {w}");
        }
        let Some(st) = r.status else { continue };
        println!(
            "{}  (daemon pid {}, last cut {}{})",
            st.root.display(),
            r.pid.unwrap_or(0),
            st.cut_seq,
            if st.previous_stop_clean {
                ""
            } else {
                ", previous stop was NOT clean"
            }
        );
        if let Some(w) = &r.worker {
            println!(
                "worker pid {}, vdrep {}, {} restart(s){}",
                w.pid,
                w.version,
                w.restarts,
                if w.transport == crate::fuse::FuseTransport::Uring {
                    ", FUSE over io_uring (no worker handover)"
                } else {
                    ""
                }
            );
        }
        println!(
            "{:<40} {:<16} {:>8} {:>12} {:>12}",
            "DISK", "STATE", "CYCLE", "SIZE", "DIRTY"
        );
        for d in &st.disks {
            let (state, why) = match &d.state {
                TrackState::Normal => ("Normal", None),
                TrackState::ResyncRequired(w) if d.resync_scope == ResyncScope::Extents => {
                    ("PartialResync", Some(w))
                }
                TrackState::ResyncRequired(w) => ("ResyncRequired", Some(w)),
            };
            println!(
                "{:<40} {:<16} {:>8} {:>12} {:>12}",
                d.name,
                state,
                d.cycle,
                human(d.size),
                human(d.dirty_bytes)
            );
            if let Some(w) = why {
                println!("    reason: {w}");
            }
        }
        for v in r.replication.unwrap_or_default() {
            println!(
                "VM {} -> {}  {:?}  every {}  point {}  lag {}  pending {}  rate {}/s{}",
                v.vm,
                v.to,
                v.state,
                if v.every_secs == 0 {
                    "continuous".to_string()
                } else {
                    format!("{}s", v.every_secs)
                },
                v.last_point.map_or("-".into(), |c| c.to_string()),
                v.lag_secs.map_or("-".into(), |l| format!("{l:.1}s")),
                human(v.bytes_pending),
                human(v.throughput_bps as u64),
                if v.state == crate::sender::VmState::InitialReplication && v.initial_total > 0 {
                    format!(
                        "  initial {:.0}% ({} of {})",
                        100.0 * v.initial_done as f64 / v.initial_total as f64,
                        human(v.initial_done),
                        human(v.initial_total)
                    )
                } else {
                    String::new()
                }
            );
            if let Some(p) = &v.resync {
                println!("    {}", resync_line(p));
            } else if let Some(p) = &v.last_resync {
                println!(
                    "    last {}: {} of {} blocks compared, {} differed, {} sent",
                    p.mode, p.blocks_compared, p.blocks_total, p.blocks_differ, p.blocks_sent
                );
            }
            for w in &v.resync_pending {
                println!("    resync required: {w} (window {})", v.resync_window);
            }
            if let Some(g) = &v.group {
                match &v.group_waiting {
                    Some(w) => println!("    group {g}: {w}"),
                    None => println!("    group {g}: every point is a group point"),
                }
            }
            if let Some(c) = v.last_app_point {
                let age = v.last_app_point_unix_ns.map_or(String::new(), |t| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    format!(", {:.0}s ago", now.saturating_sub(t) as f64 / 1e9)
                });
                let held = v
                    .app_frozen_ms
                    .map_or(String::new(), |ms| format!(", guest frozen {ms:.0} ms"));
                println!("    last app-consistent point {c}{age}{held}");
            }
            if let Some(e) = &v.app_hook_error {
                println!("    app hook failed (points are crash-consistent until it works): {e}");
            }
            for d in &v.bitmap_only {
                println!("    {d}: bitmap-only (pending changes passed the threshold; shipped as one cycle when the receiver is reachable)");
            }
            match (v.health.alert, v.health.rpo_alert_secs) {
                (Some(a @ Alert::RpoExceeded), Some(t)) => {
                    println!("    {a}: lag above rpo_alert {t}s with changes waiting")
                }
                (Some(a), _) => println!("    {}", alert_reason(&v, a)),
                (None, _) => {}
            }
            if let Some(e) = v.last_error {
                println!("    last error: {e}");
            }
            if let Some(t) = v.next_retry_unix {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let step = match (v.retry_step, v.retry_delay_secs) {
                    (Some(n), Some(d)) => format!(
                        "step {} of the schedule, a {} wait; ",
                        n + 1,
                        humantime::format_duration(std::time::Duration::from_millis(
                            (d * 1000.0) as u64
                        ))
                    ),
                    _ => String::new(),
                };
                println!(
                    "    next retry in {}s ({step}retries so far: {})",
                    t.saturating_sub(now),
                    v.retries
                );
            } else if v.retries > 0 {
                println!("    retries so far: {}", v.retries);
            }
        }
    }
    0
}
