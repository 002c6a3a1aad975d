//! Boot checks of recovery points (`vdrep verify --boot`, and the
//! receiver's scheduled `verify_boot`): one JSON file per checked point in
//! `DIR/verify/<site>/<vm>/<cycle>.json`, beside the sites (not inside a
//! VM's replica folder: a check is about a point, not part of it), shown
//! by `points`, the receiver's metrics and its scheduler, and
//! [`BootSchedule`], when the next check of a VM is due.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The result of booting a recovery point.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BootCheck {
    pub cycle: u64,
    /// The copy became ready (see `ready`).
    pub verified: bool,
    /// Seconds from the start of the test failover to ready (or to the
    /// failure).
    pub secs: f64,
    /// When the check ran (ns since the epoch).
    pub at_unix_ns: u64,
    /// Why it failed and the console's last lines (empty if verified).
    pub detail: String,
    /// What ready meant: `guest agent (guest-ping)`, `wait_for `CMD``, or
    /// `console marker "TEXT"` (empty in checks of older versions).
    #[serde(default)]
    pub ready: String,
}

/// Where the boot checks of `vm` of `site` are kept.
pub fn boot_check_dir(store: &Path, site: &str, vm: &str) -> PathBuf {
    store.join("verify").join(site).join(vm)
}

/// The boot checks kept for `vm` of `site`, by cycle (none if never run).
pub fn boot_checks(store: &Path, site: &str, vm: &str) -> HashMap<u64, BootCheck> {
    let Ok(rd) = std::fs::read_dir(boot_check_dir(store, site, vm)) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<BootCheck>(&b).ok())
        .map(|c| (c.cycle, c))
        .collect()
}

/// The newest check (by the time it ran) of `vm` of `site`.
pub fn last_boot_check(store: &Path, site: &str, vm: &str) -> Option<BootCheck> {
    boot_checks(store, site, vm)
        .into_values()
        .max_by_key(|c| c.at_unix_ns)
}

/// Keep `check` (atomically: a temporary file renamed over the old one).
pub fn save_boot_check(
    store: &Path,
    site: &str,
    vm: &str,
    check: &BootCheck,
) -> std::io::Result<()> {
    let dir = boot_check_dir(store, site, vm);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.json.tmp", check.cycle));
    let json = serde_json::to_vec_pretty(check).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", check.cycle)))
}

/// How often a VM's newest point is boot-verified (`verify_boot` in
/// `[receiver]`): `daily`, `hourly`, `weekly`, or a duration (`6h`,
/// `30m`, at least a minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSchedule {
    pub every: Duration,
}

/// Why a `verify_boot` schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a boot verification schedule: use daily, hourly, weekly or a duration of at least 1m (e.g. 12h)")]
pub struct BootScheduleError(pub String);

/// The kinds of [`BootScheduleError`] (one: not a schedule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootScheduleErrorKind {
    Invalid,
}

impl BootScheduleError {
    pub fn kind(&self) -> BootScheduleErrorKind {
        BootScheduleErrorKind::Invalid
    }
}

impl BootSchedule {
    pub fn parse(s: &str) -> Result<BootSchedule, BootScheduleError> {
        let t = s.trim().to_ascii_lowercase();
        let every = match t.as_str() {
            "hourly" => Duration::from_secs(3600),
            "daily" => Duration::from_secs(86_400),
            "weekly" => Duration::from_secs(7 * 86_400),
            _ => humantime::parse_duration(&t).map_err(|_| BootScheduleError(s.to_string()))?,
        };
        if every < Duration::from_secs(60) {
            return Err(BootScheduleError(s.to_string()));
        }
        Ok(BootSchedule { every })
    }

    /// Whether a VM whose last check ran at `last_ns` (None: never) is due
    /// at `now_ns`, and if not, in how long.
    pub fn due(&self, last_ns: Option<u64>, now_ns: u64) -> Result<(), Duration> {
        let Some(last) = last_ns else {
            return Ok(());
        };
        let next = last.saturating_add(self.every.as_nanos().min(u64::MAX as u128) as u64);
        if now_ns >= next {
            Ok(())
        } else {
            Err(Duration::from_nanos(next - now_ns))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_say_when_a_vm_is_due() {
        let d = BootSchedule::parse("daily").unwrap();
        assert_eq!(d.every, Duration::from_secs(86_400));
        assert_eq!(
            BootSchedule::parse(" Hourly ").unwrap().every.as_secs(),
            3600
        );
        assert_eq!(BootSchedule::parse("12h").unwrap().every.as_secs(), 43_200);
        for bad in ["", "nightly", "10s", "0m", "-1h"] {
            assert!(BootSchedule::parse(bad).is_err(), "{bad:?}");
        }
        let h = 3_600_000_000_000u64;
        // Never checked: due at once.
        assert_eq!(d.due(None, 5), Ok(()));
        // Checked 23 h ago: due in 1 h; 24 h ago: due.
        let now = 100 * h;
        assert_eq!(
            d.due(Some(now - 23 * h), now),
            Err(Duration::from_secs(3600))
        );
        assert_eq!(d.due(Some(now - 24 * h), now), Ok(()));
        // A check stamped in the future (clock step) waits, never underflows.
        assert!(d.due(Some(now + h), now).is_err());
    }

    #[test]
    fn checks_are_kept_per_point_and_the_newest_is_found() {
        let t = tempfile::tempdir().unwrap();
        assert!(last_boot_check(t.path(), "a", "web1").is_none());
        for (cycle, at, ok) in [(3, 10, true), (5, 30, false), (4, 20, true)] {
            let c = BootCheck {
                cycle,
                verified: ok,
                secs: 1.0,
                at_unix_ns: at,
                detail: String::new(),
                ready: "guest agent (guest-ping)".into(),
            };
            save_boot_check(t.path(), "a", "web1", &c).unwrap();
        }
        assert_eq!(boot_checks(t.path(), "a", "web1").len(), 3);
        let last = last_boot_check(t.path(), "a", "web1").unwrap();
        assert_eq!((last.cycle, last.verified), (5, false));
        // An old check without `ready` still reads.
        std::fs::write(
            boot_check_dir(t.path(), "a", "web1").join("1.json"),
            r#"{"cycle":1,"verified":true,"secs":2.0,"at_unix_ns":1,"detail":""}"#,
        )
        .unwrap();
        assert_eq!(boot_checks(t.path(), "a", "web1").len(), 4);
    }
}
