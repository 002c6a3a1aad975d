//! Application-consistency hooks: the user's command that quiesces the
//! guest (`freeze`) just before a cut and resumes it (`thaw`) right after,
//! so the recovery point holds what the guest's applications flushed, not
//! only what had reached the disk (QEMU guest agent `guest-fsfreeze-freeze`
//! through `virsh domfsfreeze` or a QMP socket; see scripts/app-hook-*.sh).
//!
//! The hook runs as `sh -c 'CMD "$@"' vdrep-app-hook PHASE VM` with
//! `VDREP_VM` and `VDREP_HOOK_PHASE` in its environment, in its own process
//! group (killed whole on timeout). A point is marked app-consistent only if
//! `freeze` exited 0 within its time limit; `thaw` runs whenever `freeze`
//! was started (a failed or timed-out freeze may have frozen part of the
//! guest), also when the cut itself fails.

use serde::{Deserialize, Serialize};
use std::process::Command;
use std::time::Duration;

use crate::util::command;

/// `vdrep protect --app-hook CMD --app-every D --app-timeout D`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppHookSpec {
    /// Shell command; gets `freeze|thaw` and the VM name as arguments.
    pub cmd: String,
    /// Least time between application-consistent cuts, seconds (0 = every
    /// cut).
    pub every_secs: u64,
    /// Time limit of one hook run, seconds.
    pub timeout_secs: u64,
}

/// Default `--app-every`: one application-consistent point per hour.
pub const DEFAULT_EVERY_SECS: u64 = 3600;
/// Default `--app-timeout`: a guest agent freeze flushes the guest's
/// caches, which can take a while on a busy guest.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// Why a hook run failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("app hook `{cmd} {phase}` could not start: {source} (check the command and that /bin/sh exists)")]
    Spawn {
        cmd: String,
        phase: &'static str,
        source: std::io::Error,
    },
    #[error("app hook `{cmd} {phase}` exited with {status}{stderr}")]
    Failed {
        cmd: String,
        phase: &'static str,
        status: String,
        stderr: String,
    },
    #[error("app hook `{cmd} {phase}` did not finish within {secs} s and was killed (raise --app-timeout or fix the hook){stderr}")]
    Timeout {
        cmd: String,
        phase: &'static str,
        secs: u64,
        stderr: String,
    },
}

/// Run one phase of the hook; returns how long it took.
pub fn run(spec: &AppHookSpec, phase: &'static str, vm: &str) -> Result<Duration, HookError> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{} \"$@\"", spec.cmd))
        .arg("vdrep-app-hook")
        .arg(phase)
        .arg(vm)
        .env("VDREP_VM", vm)
        .env("VDREP_HOOK_PHASE", phase);
    let limits = command::Limits {
        timeout: Duration::from_secs(spec.timeout_secs.max(1)),
        stderr_bytes: 4096,
        stderr_wait: Duration::from_millis(500),
    };
    let command::Outcome {
        status,
        stderr,
        elapsed,
    } = command::run_bounded(cmd, None, limits).map_err(|source| HookError::Spawn {
        cmd: spec.cmd.clone(),
        phase,
        source,
    })?;
    match status {
        None => Err(HookError::Timeout {
            cmd: spec.cmd.clone(),
            phase,
            secs: spec.timeout_secs.max(1),
            stderr,
        }),
        Some(st) if st.success() => Ok(elapsed),
        Some(st) => Err(HookError::Failed {
            cmd: spec.cmd.clone(),
            phase,
            status: st.to_string(),
            stderr,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &str, timeout_secs: u64) -> AppHookSpec {
        AppHookSpec {
            cmd: cmd.into(),
            every_secs: 0,
            timeout_secs,
        }
    }

    #[test]
    fn passes_phase_and_vm() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let s = spec(
            &format!(
                "f() {{ echo \"$1 $2 $VDREP_VM $VDREP_HOOK_PHASE\" >> {}; }}; f",
                out.display()
            ),
            5,
        );
        run(&s, "freeze", "web01").unwrap();
        run(&s, "thaw", "web01").unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "freeze web01 web01 freeze\nthaw web01 web01 thaw\n"
        );
    }

    #[test]
    fn failure_and_timeout_are_reported() {
        let e = run(&spec("echo no agent >&2; exit 3", 5), "freeze", "vm").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("exit status: 3") && m.contains("no agent"),
            "{m}"
        );
        let e = run(&spec("sleep 30; true", 1), "freeze", "vm").unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
    }
}
