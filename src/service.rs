//! Running as a managed service (a leaf: imports nothing of the crate):
//! the systemd notify protocol and the daemons' logging.
//!
//! - Notify: `READY=1` once a daemon serves, `STATUS=` lines when what it
//!   does changes, `RELOADING=1`/`STOPPING=1`, and `WATCHDOG=1` pings while
//!   a liveness check passes (only when the unit sets `WatchdogSec=`). They
//!   go to `$NOTIFY_SOCKET` through the `sd-notify` crate; without it (a
//!   plain shell) each is a no-op.
//! - Logging: one event per line on stderr (or a file the user chose), as
//!   text or JSON (`--log-format`, `[site] log_format`). Under journald
//!   (`$JOURNAL_STREAM`) text lines carry the `<N>` priority prefix of
//!   sd-daemon(3) instead of a timestamp and colours, so `journalctl -p err`
//!   works.

use std::fs::File;
use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;

/// How the daemons write log events: one per line either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO vdrep::daemon: message key=value`.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

/// A `log_format` that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a log format; write `text` or `json`")]
pub struct BadLogFormat(pub String);

impl BadLogFormat {
    /// Its kind (there is one).
    pub fn kind(&self) -> BadLogFormatKind {
        BadLogFormatKind::Unknown
    }
}

/// The kinds of [`BadLogFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLogFormatKind {
    /// Neither `text` nor `json`.
    Unknown,
}

impl std::str::FromStr for LogFormat {
    type Err = BadLogFormat;
    fn from_str(s: &str) -> Result<Self, BadLogFormat> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(BadLogFormat(s.to_string())),
        }
    }
}

/// Where a daemon writes its log.
#[derive(Debug)]
pub enum LogTarget {
    /// Standard error (a terminal, or journald under systemd).
    Stderr,
    /// A file opened for appending (`vdrep mount` in the background).
    File(File),
}

/// Install the process's log subscriber (level from `$VDREP_LOG`, default
/// `info`). A second call keeps the first one.
pub fn init_logging(format: LogFormat, target: LogTarget) {
    use tracing_subscriber::fmt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal = matches!(target, LogTarget::Stderr) && under_journald();
    let ansi = matches!(target, LogTarget::Stderr) && !journal && io::stderr().is_terminal();
    let writer = match target {
        LogTarget::Stderr => fmt::writer::BoxMakeWriter::new(io::stderr),
        LogTarget::File(f) => fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(f)),
    };
    let b = fmt().with_env_filter(filter).with_writer(writer);
    let _ = match (format, journal) {
        (LogFormat::Json, _) => b.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => b
            .with_ansi(false)
            .event_format(Priority(fmt::format().without_time().with_ansi(false)))
            .try_init(),
        (LogFormat::Text, false) => b.with_ansi(ansi).try_init(),
    };
}

/// Whether stderr is the journal (systemd sets `$JOURNAL_STREAM` to the
/// device and inode of the stream it connected; compare them).
fn under_journald() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// sd-daemon(3)'s `<N>` prefix (the syslog priority) before each event.
struct Priority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Priority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a tracing level.
fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// Where `vdrep mount` (in the background) logs without `--log-file`:
/// `$VDREP_LOG_DIR` (default `/var/log/vdrep`)`/mount-ESCAPED.log`, with the
/// folder escaped as `systemd-escape --path` does.
pub fn default_mount_log(dir: &std::path::Path) -> PathBuf {
    let base = std::env::var_os("VDREP_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/log/vdrep"));
    base.join(format!("mount-{}.log", escape_path(dir)))
}

/// `systemd-escape --path`: the unit instance name of a folder (the
/// `vdrep-mount@INSTANCE.service` of the folder).
pub fn escape_path(p: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let s = p.as_os_str().as_bytes();
    let mut parts = s.split(|&b| b == b'/').filter(|c| !c.is_empty()).peekable();
    if parts.peek().is_none() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric()
                || b == b':'
                || b == b'_'
                || (b == b'.' && (i, j) != (0, 0));
            if plain {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

/// Send states to the service manager (nothing outside systemd). A failure
/// to send is logged, never fatal: the service manager's own timeout then
/// tells the administrator.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// The daemon serves: `READY=1` with what it does as `STATUS=`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the daemon does now (`STATUS=`, shown by `systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload starts (`RELOADING=1`); [`ready`] ends it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    if let Ok(t) = NotifyState::monotonic_usec_now() {
        states.push(t);
    }
    send(&states);
}

/// The daemon stops (`STOPPING=1`).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Whether a service manager listens (`$NOTIFY_SOCKET` is set).
pub fn supervised() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The watchdog interval the unit asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// One `WATCHDOG=1` ping.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// When supervised, a thread that every `tick` sends `summary()` as
/// `STATUS=` if it changed, and pings the watchdog (if the unit set one,
/// at least twice per interval) while `alive()` returns true: a daemon
/// whose check hangs or fails stops pinging and systemd restarts it.
pub fn spawn_monitor(
    tick: Duration,
    summary: impl Fn() -> String + Send + 'static,
    alive: impl Fn() -> bool + Send + 'static,
) -> io::Result<()> {
    if !supervised() {
        return Ok(());
    }
    let watchdog = watchdog_interval();
    let tick = watchdog.map_or(tick, |w| tick.min(w / 2));
    std::thread::Builder::new()
        .name("vdrep-service".into())
        .spawn(move || {
            let mut last = String::new();
            loop {
                std::thread::sleep(tick);
                if watchdog.is_some() {
                    if alive() {
                        watchdog_ping();
                    } else {
                        tracing::error!("liveness check failed: not pinging the watchdog");
                    }
                }
                let now = summary();
                if now != last {
                    status(&now);
                    last = now;
                }
            }
        })
        .map(|_| ())
}

/// SIGTERM, SIGINT and SIGHUP: what stops a vdrep daemon (blocked in every
/// thread, taken by the main thread with `wait`).
pub fn termination_signals() -> nix::sys::signal::SigSet {
    let mut sigs = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn escape_path_matches_systemd_escape() {
        // Expected values from `systemd-escape --path`.
        assert_eq!(escape_path(Path::new("/")), "-");
        assert_eq!(
            escape_path(Path::new("/var/lib/libvirt/images")),
            "var-lib-libvirt-images"
        );
        assert_eq!(escape_path(Path::new("/srv/vm disks/")), "srv-vm\\x20disks");
        assert_eq!(escape_path(Path::new("/a-b/.c/d.e")), "a\\x2db-.c-d.e");
        assert_eq!(escape_path(Path::new("/.vm")), "\\x2evm");
    }

    #[test]
    fn escape_path_agrees_with_the_installed_systemd_escape() {
        let out = std::process::Command::new("systemd-escape")
            .args(["--path", "/srv/VMs/a-b/x y/.hidden/ü"])
            .output()
            .expect("systemd-escape (Debian package systemd, a prerequisite)");
        let want = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(escape_path(Path::new("/srv/VMs/a-b/x y/.hidden/ü")), want);
    }

    #[test]
    fn log_format_parses_text_and_json_only() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!(" JSON ".parse::<LogFormat>(), Ok(LogFormat::Json));
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert_eq!(e.kind(), BadLogFormatKind::Unknown);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(tracing::Level::ERROR), 3);
        assert_eq!(syslog_priority(tracing::Level::WARN), 4);
        assert_eq!(syslog_priority(tracing::Level::INFO), 6);
        assert_eq!(syslog_priority(tracing::Level::DEBUG), 7);
    }
}
