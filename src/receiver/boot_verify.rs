//! Scheduled boot verification (`verify_boot` in `[receiver]`, "test
//! failover drills"): every VM of the store whose newest recovery point
//! carries a libvirt definition (protected with `--domain`) gets its newest
//! point booted once per period: the scheduler runs `vdrep verify --boot`
//! (this executable, as a child process: a test failover on the isolated
//! network, wait until ready, record the result with the point, clean up),
//! then logs the outcome and emits a `boot_verified` event. The results
//! are the point's boot checks ([`crate::replica::boot`]), which `points`
//! and the metrics show.
//!
//! Due is decided per VM from its newest boot check (manual ones count
//! too), so a restarted receiver does not verify again at once. VMs failed
//! over here (live) are skipped: their newest point is not what runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::events::{Bus, EventKind};
use crate::replica::boot::{last_boot_check, BootCheck, BootSchedule};
use crate::replica::ReplicaStore;

/// The schedule and how a scheduled check decides ready.
#[derive(Debug, Clone)]
pub struct BootVerify {
    pub every: BootSchedule,
    /// How long the test copy gets to become ready.
    pub timeout: Duration,
    /// `--wait-for CMD`; `None`: the guest agent.
    pub wait_for: Option<String>,
}

/// The default time a scheduled check's copy gets to become ready.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest sleep between looks at the store (new domains show up).
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// The VMs of `store` whose newest point carries a domain definition and
/// that are not failed over here: (site, vm).
pub fn domain_vms(store: &dyn ReplicaStore) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (site, vm) in store.vms() {
        if matches!(store.failed_over(&site, &vm), Ok(Some(_)) | Err(_)) {
            continue;
        }
        let Ok(points) = store.points(&site, &vm) else {
            continue;
        };
        let Some(newest) = points.iter().map(|p| p.cycle).max() else {
            continue;
        };
        if matches!(store.definition(&site, &vm, newest), Ok(Some(_))) {
            out.push((site, vm));
        }
    }
    out
}

/// The `vdrep verify --boot` command line that checks `vm` of `site`.
pub fn command(exe: &Path, dir: &Path, site: &str, vm: &str, v: &BootVerify) -> Command {
    let mut c = Command::new(exe);
    c.args(["verify", vm, "--boot", "--json", "--store"])
        .arg(dir)
        .args(["--site", site, "--point", "latest", "--boot-timeout"])
        .arg(v.timeout.as_secs().max(1).to_string());
    if let Some(w) = &v.wait_for {
        c.args(["--wait-for", w]);
    }
    c
}

/// Why a scheduled check could not run (nothing was recorded).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The `vdrep verify` process could not be started.
    #[error("cannot run {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    /// It ended without a result (refused, libvirt unusable, ...).
    #[error("vdrep verify --boot {vm} ({status}): {stderr}")]
    NoResult {
        vm: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The kinds of [`CheckError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckErrorKind {
    Spawn,
    NoResult,
}

impl CheckError {
    pub fn kind(&self) -> CheckErrorKind {
        match self {
            CheckError::Spawn { .. } => CheckErrorKind::Spawn,
            CheckError::NoResult { .. } => CheckErrorKind::NoResult,
        }
    }
}

/// Run the check of `vm` of `site` now: the recorded result.
fn check_one(
    exe: &Path,
    dir: &Path,
    site: &str,
    vm: &str,
    v: &BootVerify,
) -> Result<BootCheck, CheckError> {
    let o = command(exe, dir, site, vm, v)
        .output()
        .map_err(|source| CheckError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
    serde_json::from_slice::<BootCheck>(&o.stdout).map_err(|_| CheckError::NoResult {
        vm: vm.to_string(),
        status: o.status,
        stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
    })
}

/// Start the scheduler thread for the store in `dir` (read through
/// `store`), emitting a `boot_verified` event on `bus` per check.
pub fn start(
    store: Arc<dyn ReplicaStore>,
    dir: PathBuf,
    v: BootVerify,
    bus: Arc<Bus>,
) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    std::thread::Builder::new()
        .name("vdrep-boot-verify".into())
        .spawn(move || {
            // A check that could not run counts as an attempt: retried
            // after a period too, not at every look.
            let mut tried: HashMap<(String, String), u64> = HashMap::new();
            loop {
                let now = crate::util::now_ns();
                let mut sleep = LOOK_EVERY;
                for (site, vm) in domain_vms(store.as_ref()) {
                    let key = (site.clone(), vm.clone());
                    let last = last_boot_check(&dir, &site, &vm)
                        .map(|c| c.at_unix_ns)
                        .max(tried.get(&key).copied());
                    if let Err(wait) = v.every.due(last, now) {
                        sleep = sleep.min(wait);
                        continue;
                    }
                    tried.insert(key, now);
                    tracing::info!("verify_boot: booting the newest point of {site}/{vm}");
                    match check_one(&exe, &dir, &site, &vm, &v) {
                        Ok(c) => {
                            if c.verified {
                                tracing::info!(
                                    "verify_boot: {site}/{vm} point {} booted: ready after {:.1} s",
                                    c.cycle,
                                    c.secs
                                );
                            } else {
                                tracing::warn!(
                                    "verify_boot: {site}/{vm} point {} FAILED to boot: {}",
                                    c.cycle,
                                    c.detail
                                );
                            }
                            bus.emit(
                                Some(&vm),
                                EventKind::BootVerified {
                                    site: site.clone(),
                                    cycle: c.cycle,
                                    verified: c.verified,
                                    secs: c.secs,
                                    detail: c.detail,
                                },
                            );
                        }
                        // Not recorded: tried again at the next look.
                        Err(why) => tracing::warn!("verify_boot: {site}/{vm}: {why}"),
                    }
                }
                std::thread::sleep(sleep.max(Duration::from_secs(1)));
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheduled_check_is_the_verify_command() {
        let mut v = BootVerify {
            every: BootSchedule::parse("daily").unwrap(),
            timeout: Duration::from_secs(120),
            wait_for: None,
        };
        let args = |v: &BootVerify| -> Vec<String> {
            command(
                Path::new("/usr/bin/vdrep"),
                Path::new("/srv/vdrep"),
                "site-a",
                "web1",
                v,
            )
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
        };
        assert_eq!(
            args(&v).join(" "),
            "verify web1 --boot --json --store /srv/vdrep --site site-a --point latest --boot-timeout 120"
        );
        v.wait_for = Some("nc -z 10.0.9.5 80".into());
        let a = args(&v);
        assert_eq!(a[a.len() - 2..], ["--wait-for", "nc -z 10.0.9.5 80"]);
    }
}
