//! Waiting until a started domain is ready: what a recovery plan waits for
//! before its next group ([`super::plan`]) and what a boot verification
//! waits for ([`super::domain::verify_boot`]).
//!
//! Ready means, by [`Readiness`]: the guest agent answers `guest-ping`
//! (`virsh qemu-agent-command`), or a command succeeds (`sh -c`, retried;
//! `VDREP_READY_DOMAIN` names the domain), or a marker shows up on the
//! serial console. A domain that stops first, or is not ready before the
//! timeout, is a [`FailoverError::NotReady`] naming it and saying what to
//! check.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::FailoverError;
use crate::libvirt::Virsh;

/// What makes a domain ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Its guest agent answers `guest-ping`.
    Agent,
    /// `sh -c CMD` exits 0.
    Command(String),
    /// The text shows up on its serial console.
    Marker(String),
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Agent => write!(f, "guest agent (guest-ping)"),
            Readiness::Command(c) => write!(f, "wait_for `{c}`"),
            Readiness::Marker(m) => write!(f, "console marker {m:?}"),
        }
    }
}

/// How often a check is repeated.
const POLL: Duration = Duration::from_millis(500);

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn console_text(console: Option<&Path>) -> String {
    console
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Run `sh -c cmd` for domain `domain`, killed at `deadline`: whether it
/// exited 0, and its status and output's tail for the error.
fn run_once(cmd: &str, domain: &str, deadline: Instant) -> (bool, String) {
    // Its own process group: a timeout kills what it started too (a
    // child left behind would hold the output pipes open).
    let child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .process_group(0)
        .env("VDREP_READY_DOMAIN", domain)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run it: {e}")),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return (false, format!("waiting for it: {e}")),
        }
    };
    let mut out = String::new();
    for r in [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn Read>),
        child.stderr.take().map(|o| Box::new(o) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut b = Vec::new();
        let _ = r.take(64 << 10).read_to_end(&mut b);
        out.push_str(&String::from_utf8_lossy(&b));
    }
    match status {
        Some(s) if s.success() => (true, String::new()),
        Some(s) => (false, format!("{s}; output: {}", tail(out.trim(), 3))),
        None => (false, "still running at the timeout (killed)".into()),
    }
}

/// Wait (at most `timeout`) until the running domain `domain` is ready by
/// `how`. `console` is its serial console log (for a marker, and for the
/// tail an error shows). What answered, e.g. `guest agent (guest-ping)
/// answered after 12.3 s`.
pub fn wait(
    virsh: &Virsh,
    domain: &str,
    how: &Readiness,
    console: Option<&Path>,
    timeout: Duration,
) -> Result<String, FailoverError> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut last = String::new();
    loop {
        let ready = match how {
            Readiness::Agent => virsh.agent_ping(domain, 2),
            Readiness::Marker(m) => console_text(console).contains(m.as_str()),
            Readiness::Command(c) => {
                let (ok, why) = run_once(c, domain, deadline);
                last = why;
                ok
            }
        };
        if ready {
            return Ok(format!(
                "{how} answered after {:.1} s",
                t0.elapsed().as_secs_f64()
            ));
        }
        let stopped = !virsh.domain_running(domain)?;
        if !stopped && Instant::now() < deadline {
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
            continue;
        }
        // A marker may have come with the stop.
        if let Readiness::Marker(m) = how {
            if console_text(console).contains(m.as_str()) {
                return Ok(format!(
                    "{how} answered after {:.1} s",
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
        let mut why = if stopped {
            format!("it stopped before {how} answered (see its serial console)")
        } else {
            match how {
                Readiness::Agent => format!(
                    "its guest agent did not answer guest-ping: check that qemu-guest-agent runs in the guest and that the domain has the {} channel (`virsh dumpxml {domain}`), or give a wait_for command",
                    crate::libvirt::definition::AGENT_CHANNEL
                ),
                Readiness::Command(c) => format!(
                    "wait_for `{c}` did not succeed (last run: {last}): check what it tests, or raise the timeout"
                ),
                Readiness::Marker(m) => format!(
                    "no {m:?} on its serial console: check that the guest boots and prints it, or raise the timeout"
                ),
            }
        };
        let console = console_text(console);
        if !console.is_empty() {
            why.push_str(&format!("; console tail:\n{}", tail(&console, 15)));
        }
        return Err(FailoverError::NotReady {
            domain: domain.to_string(),
            secs: t0.elapsed().as_secs_f64(),
            why,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_ready_on_exit_0_and_a_slow_one_is_killed_at_the_deadline() {
        let far = Instant::now() + Duration::from_secs(30);
        assert!(run_once("test \"$VDREP_READY_DOMAIN\" = d1", "d1", far).0);
        let (ok, why) = run_once("echo nope; exit 3", "d1", far);
        assert!(!ok);
        assert!(why.contains("3") && why.contains("nope"), "{why}");
        let t = Instant::now();
        let (ok, why) = run_once(
            "sleep 20",
            "d1",
            Instant::now() + Duration::from_millis(300),
        );
        assert!(!ok && why.contains("killed"), "{why}");
        assert!(t.elapsed() < Duration::from_secs(10), "not killed");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
