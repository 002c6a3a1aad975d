//! One bounded run of an administrator's shell command (`notify_command`,
//! the application-consistency hook): spawned in its own process group,
//! its input written and its stderr read on their own threads (a command
//! that neither reads its input nor closes stderr must not hold the caller
//! past the limit), killed whole when the time limit passes.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time the command may run before its process group is killed.
    pub timeout: Duration,
    /// Bytes of stderr kept for the error message.
    pub stderr_bytes: u64,
    /// How long to wait for stderr after the command ended (a daemon the
    /// command left behind may hold the pipe open).
    pub stderr_wait: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit status; `None` if it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// The first [`Limits::stderr_bytes`] of stderr, trimmed, as `": TEXT"`,
    /// or empty: ready to append to an error message.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Run `cmd` (its program, arguments and environment set by the caller)
/// with `input` on stdin (stdin is empty if `None`), stdout discarded.
/// The error is the spawn's.
pub fn run_bounded(
    mut cmd: Command,
    input: Option<Vec<u8>>,
    limits: Limits,
) -> std::io::Result<Outcome> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(err) = child.stderr.take() {
        let cap = limits.stderr_bytes;
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.take(cap).read_to_end(&mut b);
            let _ = tx.send(b);
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t0.elapsed() < limits.timeout => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
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
        }
    };
    let elapsed = t0.elapsed();
    let err = rx.recv_timeout(limits.stderr_wait).unwrap_or_default();
    let err = String::from_utf8_lossy(&err).trim().to_string();
    let stderr = if err.is_empty() {
        String::new()
    } else {
        format!(": {err}")
    };
    Ok(Outcome {
        status,
        stderr,
        elapsed,
    })
}
