//! The configuration file in a running mount: which of its `[[vm]]`s the
//! mount protects, and reloading it (SIGHUP, `vdrep reload`) by converging
//! the protections on the file without touching the mount: VMs added are
//! protected, VMs removed are unprotected (their disks stay mounted and
//! tracked), VMs whose settings changed (rate, schedule, trusted
//! certificates, ...) are protected again with the new settings. A file
//! with problems changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::{self, Checks, ConfigError, Every, VmCfg};
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
        every_secs: secs(vm.every, DEFAULT_EVERY_SECS),
        disks: vm.disks_rel.clone(),
        max_rate: vm.max_rate.unwrap_or(0),
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
    })
}

/// The specs of the configuration's VMs under `dir` (all or nothing).
pub fn specs_under(cfg: &config::Config, dir: &Path) -> Result<Vec<ProtectSpec>, ReloadError> {
    cfg.vms_under(dir).into_iter().map(protect_spec).collect()
}

/// The configuration a mount follows and the VMs it protects because of it.
pub struct Configured {
    /// The file (`--config`, or the default path).
    path: Option<PathBuf>,
    /// VMs protected from the file (not those of `vdrep protect`).
    managed: Mutex<BTreeSet<String>>,
}

impl Configured {
    pub fn new(path: Option<PathBuf>) -> Self {
        Configured {
            path,
            managed: Mutex::new(BTreeSet::new()),
        }
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
        Ok(self.converge(rep, &specs))
    }
}

/// Same protection settings.
fn same(a: &ProtectSpec, b: &ProtectSpec) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}
