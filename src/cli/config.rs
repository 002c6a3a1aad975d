//! `vdrep config check`, `vdrep reload`, and the mapping of a checked [`Config`] onto the
//! options of `mount` (its VMs' protections) and `receive`. The file's
//! schema and checks are [`crate::config`].

use std::path::{Path, PathBuf};

use super::fmt::control_err;
use crate::config::{self, Checks, Config, ConfigError};
use crate::daemon::control::{self, Request};
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
            for m in &c.mounts {
                if m.fuse_transport == Some(crate::fuse::FuseTransport::Uring) {
                    println!(
                        "note: {}: fuse_transport = \"uring\": no worker handover on this mount; a crash or a watchdog kill of its worker ends the mount (guests get I/O errors, disks need a resync after the remount), and `vdrep restart` is refused. Needs {} = Y (or `vdrep mount --enable-uring`).",
                        m.path.display(),
                        crate::fuse::uring::ENABLE_PARAM
                    );
                }
            }
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

/// The protections of the configuration's VMs under `dir` (canonical).
pub fn specs_under(cfg: &Config, dir: &Path) -> Result<Vec<ProtectSpec>, i32> {
    crate::daemon::reload::specs_under(cfg, dir).map_err(|e| {
        eprintln!("vdrep: {e}");
        2
    })
}

/// `vdrep reload [DIR]`: every running mount without DIR.
pub fn reload(dir: Option<PathBuf>) -> i32 {
    let mounts = match super::mount::mounts_or_all(dir) {
        Ok(m) => m,
        Err(code) => return code,
    };
    for m in mounts {
        match control::call(&m, &Request::Reload) {
            Err(e) => return control_err(e),
            Ok(r) if !r.ok => {
                for l in r.error.unwrap_or_default().lines() {
                    eprintln!("vdrep: {l}");
                }
                eprintln!("vdrep: {}: reload refused; nothing changed", m.display());
                return 2;
            }
            Ok(r) => {
                for l in r.reload.unwrap_or_default() {
                    println!("{}: {l}", m.display());
                }
            }
        }
    }
    0
}

/// The `[site] notify_command` of `cfg`, with its time limit.
pub fn notify_spec(cfg: Option<&Config>) -> Option<crate::events::notify::NotifySpec> {
    let site = &cfg?.site;
    Some(crate::events::notify::NotifySpec {
        cmd: site.notify_command.clone()?,
        timeout: site
            .notify_timeout
            .unwrap_or(crate::events::notify::DEFAULT_TIMEOUT),
    })
}
