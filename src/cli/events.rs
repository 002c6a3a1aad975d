//! `vdrep events [DIR | --store STORE] [--follow] [--json]`: the state
//! changes of a running mount's VMs, or the failover steps of a running
//! receiver, from its control socket (long polls of `Events` requests).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::fmt::control_err;
use crate::daemon::control;
use crate::events::{Event, Since};
use crate::ipc::CallErrorKind;
use crate::receiver::control::{self as recv};

/// Why asking for events failed.
enum FetchError {
    /// The daemon is gone or stopped answering (after it answered once:
    /// the stream ends).
    Gone,
    /// Refused or unreachable: the exit code (the error is printed).
    Failed(i32),
}

/// One answer to an `Events` request (the mount's or the receiver's): after
/// the first, a daemon that no longer answers ends the stream.
fn page(
    answer: Result<Option<Since>, crate::ipc::CallError>,
    first: bool,
) -> Result<Option<Since>, FetchError> {
    match answer {
        Ok(events) => Ok(events),
        Err(e) if !first && e.kind() != CallErrorKind::Refused => Err(FetchError::Gone),
        Err(e) => Err(FetchError::Failed(control_err(e))),
    }
}

/// `vdrep events`.
pub fn events(dir: Option<PathBuf>, store: Option<PathBuf>, follow: bool, json: bool) -> i32 {
    if let Some(store) = store {
        return stream(&store, follow, json, |after, wait_secs, first| {
            let r = recv::call_ok(&store, &recv::Request::Events { after, wait_secs });
            page(r.map(|r| r.events), first)
        });
    }
    let dir = match dir {
        Some(d) => d,
        None => {
            let mut m = control::running_mounts();
            match m.len() {
                0 => {
                    eprintln!("vdrep: no vdrep mount is running");
                    return 2;
                }
                1 => m.remove(0),
                _ => {
                    eprintln!(
                        "vdrep: several mounts are running; name one: {}",
                        m.iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    return 2;
                }
            }
        }
    };
    stream(&dir, follow, json, |after, wait_secs, first| {
        let r = control::call_ok(&dir, &control::Request::Events { after, wait_secs });
        page(r.map(|r| r.events), first)
    })
}

/// Print what `fetch(after, wait_secs, first)` gives: the kept events,
/// then (with `follow`) every new one until the daemon stops.
fn stream(
    what: &Path,
    follow: bool,
    json: bool,
    fetch: impl Fn(u64, u64, bool) -> Result<Option<Since>, FetchError>,
) -> i32 {
    let mut after = 0;
    let mut first = true;
    loop {
        let wait_secs = if first {
            0
        } else {
            crate::events::MAX_WAIT_SECS
        };
        let s = match fetch(after, wait_secs, first) {
            Ok(Some(s)) => s,
            Ok(None) => {
                eprintln!("vdrep: the daemon answered without events");
                return 1;
            }
            Err(FetchError::Gone) => {
                eprintln!("vdrep: the daemon of {} stopped", what.display());
                return 0;
            }
            Err(FetchError::Failed(code)) => return code,
        };
        if s.missed > 0 && !first {
            eprintln!(
                "vdrep: {} event(s) missed (the daemon keeps the newest {})",
                s.missed,
                crate::events::RING
            );
        }
        let mut out = std::io::stdout().lock();
        for ev in &s.events {
            if print(&mut out, ev, json).is_err() {
                // stdout closed (e.g. `| head`): done.
                return 0;
            }
            after = ev.seq;
        }
        let _ = out.flush();
        if !follow {
            return 0;
        }
        if s.closed {
            eprintln!("vdrep: the daemon of {} is stopping", what.display());
            return 0;
        }
        first = false;
    }
}

fn print(out: &mut impl Write, ev: &Event, json: bool) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_default())
    } else {
        writeln!(out, "{}", ev.line())
    }
}
