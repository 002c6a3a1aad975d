//! `vdrep config check`, and the mapping of a checked [`Config`] onto the
//! options of `mount` (its VMs' protections) and `receive`. The file's
//! schema and checks are [`crate::config`].

use std::path::Path;

use crate::config::{self, Checks, Config, ConfigError, Every, VmCfg};
use crate::sender::app_hook::{self as ah, AppHookSpec};
use crate::sender::ProtectSpec;

/// `vdrep config check [--config FILE] [--content-only]`.
pub fn check(path: Option<&Path>, content_only: bool) -> i32 {
    let path = path.unwrap_or(Path::new(config::DEFAULT_PATH));
    let checks = if content_only {
        Checks::ContentOnly
    } else {
        Checks::Files
    };
    match config::load(path, checks) {
        Ok(c) => {
            println!(
                "{}: OK ({} mount(s), {}, {} VM(s){})",
                path.display(),
                c.mounts.len(),
                if c.receiver.is_some() {
                    "a receiver"
                } else {
                    "no receiver"
                },
                c.vms.len(),
                if content_only {
                    "; key and certificate files not read"
                } else {
                    ""
                }
            );
            0
        }
        Err(e) => report(&e),
    }
}

/// Print a configuration error (one line per problem); the exit code.
fn report(e: &ConfigError) -> i32 {
    for line in e.to_string().lines() {
        eprintln!("vdrep: {line}");
    }
    2
}

/// The configuration for a command: `--config FILE`, else the default
/// file if it exists. `Err(exit code)` once the problems are printed.
pub fn load(explicit: Option<&Path>) -> Result<Option<Config>, i32> {
    config::load_for_command(explicit).map_err(|e| report(&e))
}

/// Seconds of an optional [`Every`], or `default`.
fn secs(e: Option<Every>, default: u64) -> u64 {
    e.map_or(default, Every::secs)
}

/// A `[[vm]]` as `vdrep protect` would build it from the same flags.
pub fn protect_spec(vm: &VmCfg) -> Result<ProtectSpec, String> {
    let mut trust = Vec::new();
    for t in &vm.trust {
        trust.push(
            std::fs::canonicalize(t)
                .map_err(|e| format!("{}: trust {}: {e}", vm.name, t.display()))?,
        );
    }
    Ok(ProtectSpec {
        vm: vm.name.clone(),
        to: vm.to.clone(),
        trust,
        every_secs: secs(vm.every, super::replication::DEFAULT_EVERY_SECS),
        disks: vm.disks_rel.clone(),
        max_rate: vm.max_rate.unwrap_or(0),
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
    })
}
