//! The configuration file in a running mount: which of its `[[vm]]`s the
//! mount protects, and reloading it (SIGHUP, `vdrep reload`) by converging
//! the protections on the file without touching the mount: VMs added are
//! protected, VMs removed are unprotected (their disks stay mounted and
//! tracked), VMs whose settings changed (rate, schedule, trusted
//! certificates, ...) are protected again with the new settings. A file
//! with problems changes nothing.
//!
//! It also keeps the VMs' bandwidth schedules (`max_rate = [{ when, rate
//! }, ...]`): a ticker thread ([`spawn_rate_ticker`]) wakes at each
//! schedule boundary and re-rates the running VMs whose rate changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Zoned;
use parking_lot::{Condvar, Mutex};

use crate::config::{self, Checks, ConfigError, Every, VmCfg};
use crate::schedule::RateSchedule;
use crate::sender::app_hook::{self as ah, AppHookSpec};
use crate::sender::{ProtectSpec, Replicator};

/// `vdrep protect`'s default `--every` (5 minutes).
pub const DEFAULT_EVERY_SECS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or has problems (FILE:LINE: KEY lines).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate named by a VM cannot be resolved.
    #[error("{vm}: trust {}: {source}", path.display())]
    Trust {
        vm: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kinds of [`ReloadError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadErrorKind {
    /// The configuration file is unreadable or invalid.
    Config,
    /// A file the configuration names cannot be used.
    File,
}

impl ReloadError {
    pub fn kind(&self) -> ReloadErrorKind {
        match self {
            ReloadError::Config(_) => ReloadErrorKind::Config,
            ReloadError::Trust { .. } => ReloadErrorKind::File,
        }
    }
}

/// Seconds of an optional [`Every`], or `default`.
fn secs(e: Option<Every>, default: u64) -> u64 {
    e.map_or(default, Every::secs)
}

/// A `[[vm]]` as `vdrep protect` builds it from the same settings.
pub fn protect_spec(vm: &VmCfg) -> Result<ProtectSpec, ReloadError> {
    let mut trust = Vec::new();
    for t in &vm.trust {
        trust.push(
            std::fs::canonicalize(t).map_err(|source| ReloadError::Trust {
                vm: vm.name.clone(),
                path: t.clone(),
                source,
            })?,
        );
    }
    Ok(ProtectSpec {
        vm: vm.name.clone(),
        to: vm.to.clone(),
        trust,
        s3: vm.s3.clone(),
        every_secs: secs(vm.every, DEFAULT_EVERY_SECS),
        disks: vm.disks_rel.clone(),
        max_rate: vm.rate_schedule().rate_now(),
        link_max_rate: vm.link_max_rate.unwrap_or(0),
        resync_threshold_pct: vm
            .resync_threshold_pct
            .unwrap_or_else(crate::sender::default_threshold),
        resync_window: vm.resync_window.clone().unwrap_or_default(),
        app_hook: vm.app_hook.as_ref().map(|cmd| AppHookSpec {
            cmd: cmd.clone(),
            every_secs: secs(vm.app_every, ah::DEFAULT_EVERY_SECS),
            timeout_secs: vm
                .app_timeout
                .map_or(ah::DEFAULT_TIMEOUT_SECS, |d| d.as_secs().max(1)),
        }),
        rpo_alert_secs: vm.rpo_alert.map_or(0, |d| d.as_secs().max(1)),
        domain: vm.domain.clone(),
        group: vm.group.clone(),
        group_members: Vec::new(),
        retry: crate::sender::RetrySchedule::with(
            vm.retry_fast.as_deref(),
            vm.retry_fast_max_every.map(Every::secs),
            vm.retry_schedule.as_deref(),
        ),
    })
}

/// The specs of the configuration's VMs under `dir` (all or nothing).
pub fn specs_under(cfg: &config::Config, dir: &Path) -> Result<Vec<ProtectSpec>, ReloadError> {
    cfg.vms_under(dir).into_iter().map(protect_spec).collect()
}

/// The bandwidth schedules (those that depend on the time) of the
/// configuration's VMs under `dir`.
pub fn schedules_under(cfg: &config::Config, dir: &Path) -> BTreeMap<String, RateSchedule> {
    cfg.vms_under(dir)
        .into_iter()
        .map(|v| (v.name.clone(), v.rate_schedule()))
        .filter(|(_, s)| s.is_timed())
        .collect()
}

/// Longest sleep of the rate ticker: a clock step or a DST fold is
/// noticed within this time even without a boundary.
const MAX_TICK: Duration = Duration::from_secs(60);

/// What `vdrep status --json` shows of a VM's bandwidth limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateNow {
    /// Bytes/s in force (0: unlimited).
    pub max_rate: u64,
    /// The schedule's rules as `WHEN=RATE` (`*` for a rule without
    /// `when`), when the rate follows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// When the schedule may change the rate next (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_change_unix: Option<i64>,
}

/// The configuration a mount follows and the VMs it protects because of it.
pub struct Configured {
    /// The file (`--config`, or the default path).
    path: Option<PathBuf>,
    /// VMs protected from the file (not those of `vdrep protect`).
    managed: Mutex<BTreeSet<String>>,
    /// Bandwidth schedules of the file's VMs, by VM.
    schedules: Mutex<BTreeMap<String, RateSchedule>>,
    /// Wakes the rate ticker when `schedules` changes.
    changed: Condvar,
}

impl Configured {
    pub fn new(path: Option<PathBuf>) -> Self {
        Configured {
            path,
            managed: Mutex::new(BTreeSet::new()),
            schedules: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
        }
    }

    /// Follow these bandwidth schedules from now on.
    pub fn set_schedules(&self, s: BTreeMap<String, RateSchedule>) {
        *self.schedules.lock() = s;
        self.changed.notify_all();
    }

    /// Re-rate every protected VM whose schedule gives another rate at
    /// `t` than the one it runs with; one line per change.
    pub fn apply_rates(&self, rep: &Arc<Replicator>, t: jiff::civil::DateTime) -> Vec<String> {
        let schedules = self.schedules.lock().clone();
        let mut out = Vec::new();
        for (vm, sched) in schedules {
            let rate = sched.rate_at(t);
            let Some(spec) = rep.spec(&vm).filter(|s| s.max_rate != rate) else {
                continue;
            };
            let line = match rep.protect(ProtectSpec {
                max_rate: rate,
                ..spec
            }) {
                Ok(_) => format!("{vm}: max_rate now {} (schedule)", rate_text(rate)),
                Err(e) => format!("{vm}: warning: cannot apply the scheduled rate: {e}"),
            };
            tracing::info!("{line}");
            out.push(line);
        }
        out
    }

    /// The bandwidth limit of `vm` for `vdrep status` (`None`: not
    /// protected).
    pub fn rate_now(&self, rep: &Replicator, vm: &str, now: &Zoned) -> Option<RateNow> {
        let spec = rep.spec(vm)?;
        let sched = self.schedules.lock().get(vm).cloned();
        Some(RateNow {
            max_rate: spec.max_rate,
            next_change_unix: sched
                .as_ref()
                .and_then(|s| s.next_change(now))
                .map(|z| z.timestamp().as_second()),
            schedule: sched.map(|s| schedule_text(&s)),
        })
    }

    /// Sleep until the next boundary of any schedule (at most
    /// [`MAX_TICK`]), or until the schedules change.
    fn wait_boundary(&self) {
        let now = Zoned::now();
        let mut schedules = self.schedules.lock();
        let next = schedules
            .values()
            .filter_map(|s| s.next_change(&now))
            .min()
            .map(|z| {
                let ms = z.timestamp().as_millisecond() - now.timestamp().as_millisecond();
                // A little past the boundary, so that it is behind us.
                Duration::from_millis(ms.max(0) as u64 + 20)
            });
        let d = next.map_or(MAX_TICK, |d| d.min(MAX_TICK));
        self.changed.wait_for(&mut schedules, d);
    }

    /// Protect every VM of `specs` not already protected with the same
    /// spec, and unprotect the VMs protected from the file before that are
    /// not in `specs`; one line per change for the operator. A VM that
    /// cannot be protected (e.g. its receiver is down) is reported and the
    /// others go on.
    pub fn converge(&self, rep: &Arc<Replicator>, specs: &[ProtectSpec]) -> Vec<String> {
        let mut managed = self.managed.lock();
        let mut out = Vec::new();
        for vm in managed.iter() {
            if !specs.iter().any(|s| &s.vm == vm) && rep.spec(vm).is_some() {
                match rep.unprotect(vm) {
                    Ok(()) => out.push(format!(
                        "{vm}: no longer protected (removed from the configuration; its disks stay tracked)"
                    )),
                    Err(e) => out.push(format!("{vm}: warning: cannot unprotect: {e}")),
                }
            }
        }
        managed.clear();
        for spec in specs {
            managed.insert(spec.vm.clone());
            let old = rep.spec(&spec.vm);
            if old.as_ref().is_some_and(|s| same(s, spec)) {
                out.push(format!("{}: protected (unchanged)", spec.vm));
                continue;
            }
            match rep.protect(spec.clone()) {
                Ok(warnings) => {
                    out.push(if old.is_some() {
                        format!("{}: protected with the new settings", spec.vm)
                    } else {
                        format!(
                            "{}: protected ({} disk(s)); initial replication started",
                            spec.vm,
                            spec.disks.len()
                        )
                    });
                    out.extend(
                        warnings
                            .into_iter()
                            .map(|w| format!("{}: warning: {w}", spec.vm)),
                    );
                }
                Err(e) => out.push(format!("{}: warning: NOT protected: {e}", spec.vm)),
            }
        }
        for l in &out {
            tracing::info!("configuration: {l}");
        }
        out
    }

    /// Re-read the file and [`converge`](Self::converge) the VMs under
    /// `dir` on it; a file with problems changes nothing.
    pub fn reload(&self, rep: &Arc<Replicator>, dir: &Path) -> Result<Vec<String>, ReloadError> {
        let path = self
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
        let cfg = config::load(&path, Checks::Files)?;
        let specs = specs_under(&cfg, dir)?;
        let out = self.converge(rep, &specs);
        self.set_schedules(schedules_under(&cfg, dir));
        Ok(out)
    }
}

/// Start the thread that re-rates the VMs at their schedules' boundaries
/// (for the life of the process).
pub fn spawn_rate_ticker(cfg: Arc<Configured>, rep: Arc<Replicator>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vdrep-rates".into())
        .spawn(move || loop {
            cfg.apply_rates(&rep, Zoned::now().datetime());
            cfg.wait_boundary();
        })
        .map(|_| ())
}

/// `10.0 MB/s`, or `unlimited` for 0.
fn rate_text(r: u64) -> String {
    if r == 0 {
        "unlimited".into()
    } else {
        format!("{}/s", bytesize::ByteSize(r).display().si())
    }
}

/// A schedule as `WHEN = RATE | ...` (`*` for a rule without `when`).
fn schedule_text(s: &RateSchedule) -> String {
    s.rules
        .iter()
        .map(|r| {
            let when = r.when.as_ref().map_or("*".to_string(), |c| c.to_string());
            format!("{when} = {}", rate_text(r.rate))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Same protection settings.
fn same(a: &ProtectSpec, b: &ProtectSpec) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}
