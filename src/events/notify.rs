//! `notify_command`: run the administrator's command on every event, with
//! the event's JSON (one line) on its stdin, like drbd-reactor's umh or a
//! webhook relay (examples/notify-webhook.sh).
//!
//! Bounded so it can never hold replication back: events reach the
//! notifier through a queue of [`QUEUE`] events that [`super::Bus::emit`]
//! fills without waiting (a full queue drops the event and logs it); one
//! thread runs the commands one at a time, in order, each as
//! `sh -c CMD` in its own process group with `VDREP_EVENT` (the event
//! name), `VDREP_VM` and `VDREP_EVENT_SEQ` in its environment, killed
//! whole after the timeout. A failure is logged, never retried.

use std::process::Command;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use super::{Bus, Event};
use crate::util::command;

/// Events waiting for the command at most; more are dropped.
pub const QUEUE: usize = 64;

/// Default time limit of one run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The command and its limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NotifySpec {
    /// Shell command (`sh -c`).
    pub cmd: String,
    pub timeout: Duration,
}

/// How one run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify_command `{cmd}` could not start: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("notify_command `{cmd}` exited with {status}{stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("notify_command `{cmd}` did not finish within {secs:.1} s and was killed{stderr}")]
    Timeout {
        cmd: String,
        secs: f64,
        stderr: String,
    },
}

/// The kinds of [`NotifyError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyErrorKind {
    Spawn,
    Failed,
    Timeout,
}

impl NotifyError {
    pub fn kind(&self) -> NotifyErrorKind {
        match self {
            NotifyError::Spawn { .. } => NotifyErrorKind::Spawn,
            NotifyError::Failed { .. } => NotifyErrorKind::Failed,
            NotifyError::Timeout { .. } => NotifyErrorKind::Timeout,
        }
    }
}

/// Start the notifier thread for `bus`: every later event runs `spec`.
pub fn start(bus: &Arc<Bus>, spec: NotifySpec) -> std::io::Result<()> {
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("vdrep-notify".into())
        .spawn(move || drain(&rx, &spec))?;
    bus.set_sink(tx);
    Ok(())
}

fn drain(rx: &Receiver<Event>, spec: &NotifySpec) {
    while let Ok(ev) = rx.recv() {
        if let Err(e) = run(spec, &ev) {
            tracing::warn!("event {} ({}): {e}", ev.seq, ev.kind.name());
        }
    }
}

/// Run the command once for `ev`.
pub fn run(spec: &NotifySpec, ev: &Event) -> Result<(), NotifyError> {
    let mut line = serde_json::to_string(ev).unwrap_or_default();
    line.push('\n');
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&spec.cmd)
        .env("VDREP_EVENT", ev.kind.name())
        .env("VDREP_VM", ev.vm.as_deref().unwrap_or(""))
        .env("VDREP_EVENT_SEQ", ev.seq.to_string());
    let limits = command::Limits {
        timeout: spec.timeout,
        stderr_bytes: 2048,
        stderr_wait: Duration::from_millis(200),
    };
    let command::Outcome { status, stderr, .. } =
        command::run_bounded(cmd, Some(line.into_bytes()), limits).map_err(|source| {
            NotifyError::Spawn {
                cmd: spec.cmd.clone(),
                source,
            }
        })?;
    match status {
        Some(st) if st.success() => Ok(()),
        Some(st) => Err(NotifyError::Failed {
            cmd: spec.cmd.clone(),
            status: st.to_string(),
            stderr,
        }),
        None => Err(NotifyError::Timeout {
            cmd: spec.cmd.clone(),
            secs: spec.timeout.as_secs_f64(),
            stderr,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    fn ev() -> Event {
        Bus::default().emit(Some("vm1"), EventKind::ProtectionStopped)
    }

    #[test]
    fn the_command_reads_the_event_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let spec = NotifySpec {
            cmd: format!(
                "cat > {} && echo \"$VDREP_EVENT $VDREP_VM\" >> {}",
                out.display(),
                out.display()
            ),
            timeout: Duration::from_secs(5),
        };
        run(&spec, &ev()).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let mut lines = got.lines();
        let first: Event = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(first.vm.as_deref(), Some("vm1"));
        assert_eq!(lines.next(), Some("protection_stopped vm1"));
    }

    #[test]
    fn failures_and_timeouts_are_typed() {
        let fail = NotifySpec {
            cmd: "echo nope >&2; exit 3".into(),
            timeout: Duration::from_secs(5),
        };
        let e = run(&fail, &ev()).unwrap_err();
        assert_eq!(e.kind(), NotifyErrorKind::Failed);
        assert!(e.to_string().contains("nope"), "{e}");
        let slow = NotifySpec {
            cmd: "sleep 30".into(),
            timeout: Duration::from_millis(200),
        };
        let t = std::time::Instant::now();
        let e = run(&slow, &ev()).unwrap_err();
        assert_eq!(e.kind(), NotifyErrorKind::Timeout);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
