//! When a VM tries again after a recoverable failure (network, receiver
//! down, disk full, busy): its retry schedule.
//!
//! The long schedule is 1, 2, 4, 8, 10 minutes, then every 30 minutes (its
//! last step repeats). A continuous or short-interval VM (`--every` at most
//! 5 minutes) first retries after 1 s, 2 s and 5 s, so a blip (a receiver
//! restart, a dropped link) costs seconds of RPO; only a longer outage falls
//! back to the long schedule. All three are settings of the VM
//! (`retry_fast`, `retry_fast_max_every`, `retry_schedule` in the
//! configuration, `--retry-*` on `vdrep protect`), with these defaults.
//! [`Backoff`] walks one VM through the schedule during an outage: a
//! failure after progress (a point committed, or initial-copy bytes made
//! durable, since the previous failure) starts again from the first step.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default fast steps, seconds.
pub const DEFAULT_FAST_SECS: [f64; 3] = [1.0, 2.0, 5.0];
/// Intervals up to this get the fast steps first (seconds).
pub const DEFAULT_FAST_MAX_EVERY_SECS: u64 = 300;
/// The default long schedule, seconds (the last step repeats).
pub const DEFAULT_LONG_SECS: [f64; 6] = [60.0, 120.0, 240.0, 480.0, 600.0, 1800.0];

/// A VM's retry schedule (part of its [`super::ProtectSpec`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrySchedule {
    /// Delays of the first retries of a continuous or short-interval VM,
    /// seconds (empty: none).
    pub fast_secs: Vec<f64>,
    /// A VM whose interval is at most this many seconds (continuous: 0)
    /// gets the fast steps first.
    pub fast_max_every_secs: u64,
    /// Delays after the fast steps (or from the start for longer
    /// intervals), seconds; the last one repeats. Never empty.
    pub long_secs: Vec<f64>,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self {
            fast_secs: DEFAULT_FAST_SECS.to_vec(),
            fast_max_every_secs: DEFAULT_FAST_MAX_EVERY_SECS,
            long_secs: DEFAULT_LONG_SECS.to_vec(),
        }
    }
}

impl RetrySchedule {
    /// The defaults with what the administrator set (configuration or
    /// `vdrep protect --retry-*`).
    pub fn with(
        fast: Option<&[Duration]>,
        fast_max_every_secs: Option<u64>,
        long: Option<&[Duration]>,
    ) -> Self {
        let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
        let d = Self::default();
        Self {
            fast_secs: fast.map_or(d.fast_secs, secs),
            fast_max_every_secs: fast_max_every_secs.unwrap_or(d.fast_max_every_secs),
            long_secs: long.filter(|l| !l.is_empty()).map_or(d.long_secs, secs),
        }
    }

    /// Delay before retry number `n` (0-based) of a VM replicating every
    /// `every_secs` (0: continuous); `scale` shortens everything (tests,
    /// `VDREP_RETRY_SCALE`).
    pub fn delay(&self, n: u32, scale: f64, every_secs: u64) -> Duration {
        let n = n as usize;
        let fast: &[f64] = if every_secs <= self.fast_max_every_secs {
            &self.fast_secs
        } else {
            &[]
        };
        let long = if self.long_secs.is_empty() {
            &DEFAULT_LONG_SECS[..]
        } else {
            &self.long_secs[..]
        };
        let secs = match fast.get(n) {
            Some(s) => *s,
            None => long
                .get(n - fast.len())
                .or(long.last())
                .copied()
                .unwrap_or(DEFAULT_LONG_SECS[5]),
        };
        Duration::try_from_secs_f64((secs * scale).max(0.0)).unwrap_or(Duration::MAX)
    }

    /// The schedule as a person writes it: `1s, 2s, 5s, then 1m, 2m, …`.
    pub fn describe(&self, every_secs: u64) -> String {
        let list = |v: &[f64]| {
            v.iter()
                .map(|s| humantime::format_duration(Duration::from_secs_f64(*s)).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if every_secs <= self.fast_max_every_secs && !self.fast_secs.is_empty() {
            format!(
                "{}, then {} (last repeats)",
                list(&self.fast_secs),
                list(&self.long_secs)
            )
        } else {
            format!("{} (last repeats)", list(&self.long_secs))
        }
    }
}

/// What a VM has achieved at the receiver so far: its newest committed
/// point and the initial-copy bytes done. A failure with a different
/// mark than the previous one follows progress.
pub type Progress = (Option<u64>, u64);

/// One VM's position in its [`RetrySchedule`] during an outage: which step
/// the next failure waits for. The worker asks it after every failed
/// session; nothing else decides the wait.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Failures since the last progress.
    step: u32,
    /// The VM's progress at the previous failure (none: no failure yet).
    seen: Option<Progress>,
}

/// A planned retry: which step of the schedule it is (0-based) and how
/// long to wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    pub step: u32,
    pub delay: Duration,
}

impl Backoff {
    /// A session failed with the VM at `progress`: the wait before the next
    /// try. Progress since the previous failure (a committed point, a
    /// longer durable initial copy) restarts the schedule at its first
    /// step, so every outage starts with the fast retries.
    pub fn failed(
        &mut self,
        schedule: &RetrySchedule,
        scale: f64,
        every_secs: u64,
        progress: Progress,
    ) -> Planned {
        if self.seen.is_some_and(|p| p != progress) {
            self.step = 0;
        }
        self.seen = Some(progress);
        let step = self.step;
        self.step = self.step.saturating_add(1);
        Planned {
            step,
            delay: schedule.delay(step, scale, every_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &RetrySchedule, n: u32, every: u64) -> f64 {
        s.delay(n, 1.0, every).as_secs_f64()
    }

    #[test]
    fn continuous_and_short_intervals_retry_fast_first_then_the_long_schedule() {
        let s = RetrySchedule::default();
        for every in [0, 30, 300] {
            let got: Vec<f64> = (0..10).map(|n| secs(&s, n, every)).collect();
            assert_eq!(
                got,
                [1.0, 2.0, 5.0, 60.0, 120.0, 240.0, 480.0, 600.0, 1800.0, 1800.0],
                "every {every}s"
            );
        }
    }

    #[test]
    fn long_intervals_keep_the_long_schedule() {
        let s = RetrySchedule::default();
        let got: Vec<f64> = (0..7).map(|n| secs(&s, n, 900)).collect();
        assert_eq!(got, [60.0, 120.0, 240.0, 480.0, 600.0, 1800.0, 1800.0]);
        assert_eq!(s.delay(0, 0.01, 900), Duration::from_secs_f64(0.6));
    }

    #[test]
    fn a_configured_schedule_and_threshold_are_followed() {
        let s = RetrySchedule {
            fast_secs: vec![0.5, 3.0],
            fast_max_every_secs: 900,
            long_secs: vec![30.0, 90.0],
        };
        let got: Vec<f64> = (0..6).map(|n| secs(&s, n, 900)).collect();
        assert_eq!(got, [0.5, 3.0, 30.0, 90.0, 90.0, 90.0]);
        // Above the threshold: the long schedule only.
        let got: Vec<f64> = (0..3).map(|n| secs(&s, n, 901)).collect();
        assert_eq!(got, [30.0, 90.0, 90.0]);
        // No fast steps at all.
        let none = RetrySchedule {
            fast_secs: vec![],
            ..RetrySchedule::default()
        };
        assert_eq!(secs(&none, 0, 0), 60.0);
        assert_eq!(
            s.describe(0),
            "500ms, 3s, then 30s, 1m 30s (last repeats)",
            "status shows it"
        );
    }

    #[test]
    fn a_spec_saved_before_the_setting_gets_the_defaults() {
        #[derive(Deserialize)]
        struct Old {
            #[serde(default)]
            retry: RetrySchedule,
        }
        let o: Old = serde_json::from_str("{}").unwrap();
        assert_eq!(o.retry, RetrySchedule::default());
    }

    #[test]
    fn backoff_walks_the_schedule_and_restarts_after_a_committed_point() {
        let s = RetrySchedule {
            long_secs: vec![3600.0],
            ..RetrySchedule::default()
        };
        let mut b = Backoff::default();
        let walk = |b: &mut Backoff, p: Progress, n: usize| -> Vec<(u32, f64)> {
            (0..n)
                .map(|_| b.failed(&s, 1.0, 0, p))
                .map(|x| (x.step, x.delay.as_secs_f64()))
                .collect()
        };
        // An outage with no progress: the fast steps, then the long one.
        assert_eq!(
            walk(&mut b, (Some(7), 0), 5),
            [(0, 1.0), (1, 2.0), (2, 5.0), (3, 3600.0), (4, 3600.0)]
        );
        // A point was committed since: the next outage starts fast again.
        assert_eq!(walk(&mut b, (Some(8), 0), 2), [(0, 1.0), (1, 2.0)]);
        // Initial-copy bytes made durable count as progress too.
        let mut b = Backoff::default();
        assert_eq!(walk(&mut b, (None, 0), 2), [(0, 1.0), (1, 2.0)]);
        assert_eq!(walk(&mut b, (None, 4096), 1), [(0, 1.0)]);
        // A long interval: the long schedule from the first failure.
        let mut b = Backoff::default();
        assert_eq!(
            b.failed(&s, 1.0, 900, (None, 0)).delay,
            Duration::from_secs(3600)
        );
    }
}
