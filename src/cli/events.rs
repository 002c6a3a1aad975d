//! `vdrep events [DIR] [--follow] [--json]`: the state changes of a running
//! mount's VMs, from its control socket (long polls of
//! [`Request::Events`]).

use std::io::Write;
use std::path::PathBuf;

use super::fmt::control_err;
use crate::daemon::control::{self, ControlErrorKind, Request, MAX_EVENTS_WAIT_SECS};
use crate::events::Event;

/// `vdrep events`.
pub fn events(dir: Option<PathBuf>, follow: bool, json: bool) -> i32 {
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
    let mut after = 0;
    let mut first = true;
    loop {
        let wait_secs = if first { 0 } else { MAX_EVENTS_WAIT_SECS };
        let r = match control::call_ok(&dir, &Request::Events { after, wait_secs }) {
            Ok(r) => r,
            // The mount stopped while we followed it: the stream ends.
            Err(e) if !first && e.kind() != ControlErrorKind::Refused => {
                eprintln!("vdrep: the mount of {} stopped", dir.display());
                return 0;
            }
            Err(e) => return control_err(e),
        };
        let Some(s) = r.events else {
            eprintln!("vdrep: the daemon answered without events");
            return 1;
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
            eprintln!("vdrep: the mount of {} is stopping", dir.display());
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
