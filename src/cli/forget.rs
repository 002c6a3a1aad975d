//! `vdrep forget VM --store S [--site SITE] [--yes]`: delete a VM's replica
//! and its recovery points at the secondary site, through the running
//! receiver of the store if there is one, else on the store itself.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::fmt::{control_err, human};
use crate::failover::{test, FailoverError};
use crate::ipc::CallErrorKind;
use crate::receiver::control::{self, Request};
use crate::replica::{ForgetReport, ReplicaStore, StoreError};
use crate::testview::format_utc;

/// `vdrep forget`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ForgetArgs {
    /// VM name.
    pub name: String,
    /// The receiver's store folder (`vdrep receive --store`).
    #[arg(long)]
    pub store: PathBuf,
    /// The sending site (needed only if several sites replicate a VM of
    /// this name).
    #[arg(long)]
    pub site: Option<String>,
    /// Delete without asking (needed when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// `vdrep forget`: its exit code (0 deleted, 1 refused or failed, 2 bad
/// arguments or not confirmed).
pub fn forget(a: &ForgetArgs) -> i32 {
    if !a.store.is_dir() {
        eprintln!("vdrep: forget: {} is not a store folder", a.store.display());
        return 2;
    }
    // What would go, named to the operator before anything is deleted.
    let (site, points) = match test::points(&a.store, a.site.clone(), &a.name) {
        Ok(v) => v,
        Err(FailoverError::Control(e)) if e.kind() != CallErrorKind::Refused => {
            return control_err(e)
        }
        Err(e) => {
            eprintln!("vdrep: forget {}: {e}", a.name);
            return 1;
        }
    };
    let what = format!(
        "the replica of {site}/{} and its {} recovery point(s){}",
        a.name,
        points.len(),
        points
            .iter()
            .map(|p| p.point.time_unix_ns)
            .max()
            .map(|t| format!(" (newest {} UTC)", format_utc(t)))
            .unwrap_or_default()
    );
    if !a.yes {
        match confirm(&what, &a.name) {
            Confirm::Yes => {}
            Confirm::No => {
                eprintln!("vdrep: forget: not confirmed; nothing was deleted");
                return 2;
            }
            Confirm::NoTerminal => {
                eprintln!(
                    "vdrep: forget would delete {what} for good; give --yes to confirm (stdin is not a terminal)"
                );
                return 2;
            }
        }
    }
    let req = Request::Forget {
        site: Some(site.clone()),
        vm: a.name.clone(),
    };
    let report = match control::call_ok(&a.store, &req) {
        Ok(r) => r.forgot.unwrap_or_default(),
        Err(e) if e.kind() == CallErrorKind::NotRunning => {
            match offline(&a.store, &site, &a.name) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("vdrep: forget {}: {e}", a.name);
                    return 1;
                }
            }
        }
        Err(e) => return control_err(e),
    };
    println!(
        "{site}/{}: forgotten ({} disk(s), {} point(s), {} deleted)",
        a.name,
        report.disks,
        report.points,
        human(report.bytes)
    );
    0
}

/// The operator's answer.
enum Confirm {
    Yes,
    No,
    NoTerminal,
}

/// Ask on the terminal: the VM name must be typed back.
fn confirm(what: &str, name: &str) -> Confirm {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Confirm::NoTerminal;
    }
    eprint!("This deletes {what} for good.\nType the VM name ({name}) to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match stdin.lock().read_line(&mut line) {
        Ok(_) if line.trim() == name => Confirm::Yes,
        _ => Confirm::No,
    }
}

/// No receiver runs: open the store (taking its lock) and forget there.
fn offline(store: &Path, site: &str, vm: &str) -> Result<ForgetReport, StoreError> {
    let s = crate::replica::Store::open(store)?;
    s.forget(site, vm)
}
