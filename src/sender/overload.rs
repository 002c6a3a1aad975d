//! Link overload: whether a VM's changes arrive faster than its link sends
//! them, measured from the VM's own counters over the last few seconds
//! ([`RateWindow`], 3 s). A VM that never catches up (changes waiting at every
//! look of the window) while its disks are written faster than its bytes
//! leave shows `Warning` with the typed reason
//! [`super::alert::Alert::LinkOverloaded`] and the two rates
//! ([`Rates`]), so that an operator reads "changes arrive faster than the
//! link sends them: 2.6 MB/s of churn, 1.2 MB/s sent" instead of a bare
//! "RPO exceeded". The rates are in `status --json` (`health.rates`) and
//! the metrics whether or not the VM is overloaded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The span the rates are measured over.
pub const WINDOW: Duration = Duration::from_secs(3);
/// The shortest span that gives rates (a VM protected a moment ago has none).
const MIN_SPAN: Duration = Duration::from_secs(2);
/// Looks closer together than this keep only the first (`status` may be
/// called often; the watcher calls it once a second).
const MIN_GAP: Duration = Duration::from_millis(400);
/// Churn counts as above the link's rate when it exceeds the rate sent by
/// this factor (the counters are sampled; a VM exactly at the link rate
/// keeps up).
const OVER: f64 = 1.1;

/// A VM's write and send rates over the last [`WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Bytes written to the VM's disks per second (rewrites included).
    pub churn_bps: f64,
    /// Bytes the VM's connections sent per second (UDP: what crossed the
    /// link; payload counters move only when a whole log is applied).
    pub sent_bps: f64,
    /// Bytes not yet at the receiver now.
    pub pending_bytes: u64,
    /// Changes were waiting now and at every look of the window but at
    /// most one (the sender never caught up).
    pub never_caught_up: bool,
    /// The fewest bytes pending at a look inside the window.
    pub min_pending_bytes: u64,
    /// Looks in the window.
    pub looks: usize,
    /// The span measured, seconds.
    pub span_secs: f64,
}

impl Rates {
    /// Whether the link is the bottleneck: the sender never caught up, and
    /// the disks are written faster than it sends.
    pub fn overloaded(&self) -> bool {
        self.never_caught_up && self.churn_bps > self.sent_bps * OVER
    }

    /// The reason shown to people, with the figures.
    pub fn describe(&self) -> String {
        format!(
            "changes arrive faster than the link sends them: {} of churn, {} sent, {} waiting",
            mb_per_sec(self.churn_bps),
            mb_per_sec(self.sent_bps),
            mb(self.pending_bytes as f64)
        )
    }
}

fn mb(bytes: f64) -> String {
    if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.0} kB", bytes / 1e3)
    }
}

fn mb_per_sec(bps: f64) -> String {
    format!("{}/s", mb(bps))
}

/// One look at a VM's counters.
#[derive(Debug, Clone, Copy)]
struct Look {
    at: Instant,
    written: u64,
    sent: u64,
    pending: u64,
}

/// The looks of the last [`WINDOW`] at one VM's counters.
#[derive(Debug, Default)]
pub struct RateWindow {
    looks: VecDeque<Look>,
}

impl RateWindow {
    /// Record a look at `now`: bytes written to the VM's disks so far,
    /// UDP bytes sent so far, bytes pending now; the rates over the
    /// window, once it spans [`MIN_SPAN`]. A counter that went back (a
    /// restarted worker or a re-attached disk) starts the window anew.
    pub fn observe(
        &mut self,
        now: Instant,
        written: u64,
        sent: u64,
        pending: u64,
    ) -> Option<Rates> {
        let look = Look {
            at: now,
            written,
            sent,
            pending,
        };
        if let Some(last) = self.looks.back() {
            if written < last.written || sent < last.sent {
                self.looks.clear();
            }
        }
        match self.looks.back() {
            Some(last) if now.saturating_duration_since(last.at) < MIN_GAP => {}
            _ => self.looks.push_back(look),
        }
        while self.looks.len() > 2
            && self
                .looks
                .get(1)
                .is_some_and(|l| now.saturating_duration_since(l.at) >= WINDOW)
        {
            self.looks.pop_front();
        }
        let first = self.looks.front()?;
        let span = now.saturating_duration_since(first.at);
        if span < MIN_SPAN {
            return None;
        }
        let secs = span.as_secs_f64();
        // The first look may be older than the window (it anchors the
        // rates); the backlog counts inside the window only.
        let inside = || {
            self.looks
                .iter()
                .filter(|l| now.saturating_duration_since(l.at) < WINDOW)
        };
        let min_pending = inside()
            .map(|l| l.pending)
            .min()
            .unwrap_or(pending)
            .min(pending);
        // One empty look is forgiven: while a cut seals a log, its blocks
        // are neither dirty nor in a sealed log yet (measured: a hot VM
        // read 0 pending bytes once in a window of 6-7 MB backlogs).
        let empty = inside().filter(|l| l.pending == 0).count();
        Some(Rates {
            churn_bps: written.saturating_sub(first.written) as f64 / secs,
            sent_bps: sent.saturating_sub(first.sent) as f64 / secs,
            pending_bytes: pending,
            never_caught_up: pending > 0 && empty <= 1,
            min_pending_bytes: min_pending,
            looks: self.looks.len(),
            span_secs: secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(window: &mut RateWindow, t0: Instant, looks: &[(u64, u64, u64)]) -> Option<Rates> {
        let mut r = None;
        for (i, &(w, s, p)) in looks.iter().enumerate() {
            r = window.observe(t0 + Duration::from_secs(i as u64), w, s, p);
        }
        r
    }

    #[test]
    fn churn_above_what_is_sent_with_a_standing_backlog_is_overload() {
        let t0 = Instant::now();
        // 2.6 MB/s written, 1.2 MB/s sent, changes waiting throughout.
        let looks: Vec<_> = (0..8u64)
            .map(|i| (i * 2_600_000, i * 1_200_000, 5_000_000 + i * 100_000))
            .collect();
        let r = run(&mut RateWindow::default(), t0, &looks).expect("rates after 3 s");
        assert!(r.overloaded(), "{r:?}");
        assert!((r.churn_bps - 2.6e6).abs() < 1e3, "{r:?}");
        assert!((r.sent_bps - 1.2e6).abs() < 1e3, "{r:?}");
        assert_eq!(
            r.describe(),
            "changes arrive faster than the link sends them: 2.6 MB/s of churn, 1.2 MB/s sent, 5.7 MB waiting"
        );
    }

    #[test]
    fn a_sender_that_catches_up_or_keeps_pace_is_not_overloaded() {
        let t0 = Instant::now();
        // Hot rewrites of a few blocks: lots of churn, but the backlog
        // empties between cuts.
        let looks: Vec<_> = (0..8u64)
            .map(|i| {
                (
                    i * 50_000_000,
                    i * 100_000,
                    if i % 3 == 1 { 40_960 } else { 0 },
                )
            })
            .collect();
        let r = run(&mut RateWindow::default(), t0, &looks).expect("rates");
        assert!(!r.overloaded(), "{r:?}");
        // A backlog that never empties, but sent as fast as it is written.
        let looks: Vec<_> = (0..8u64)
            .map(|i| (i * 1_000_000, i * 1_000_000, 2_000_000))
            .collect();
        let r = run(&mut RateWindow::default(), t0, &looks).expect("rates");
        assert!(!r.overloaded(), "{r:?}");
        // Too short a window: no verdict.
        assert_eq!(run(&mut RateWindow::default(), t0, &looks[..2]), None);
    }

    #[test]
    fn a_counter_going_back_restarts_the_window() {
        let t0 = Instant::now();
        let mut w = RateWindow::default();
        let looks: Vec<_> = (0..6u64).map(|i| (i * 9_000_000, 0, 1)).collect();
        assert!(run(&mut w, t0, &looks).is_some());
        let r = w.observe(t0 + Duration::from_secs(6), 10, 0, 1);
        assert_eq!(
            r, None,
            "a restarted counter must not give a negative or huge rate"
        );
    }
}
