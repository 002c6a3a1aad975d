//! Resuming a known path's rate on a new connection, in the spirit of
//! Careful Resume (draft-ietf-tsvwg-careful-resume): owns the sending
//! process's memory of each destination's path ([`Saved`], kept in
//! [`Memory`], one per process: [`memory`]) and the one-RTT jump a new
//! connection to that destination makes ([`Jump`]), which
//! [`super::congestion::Wrapped`] applies to its window.
//!
//! A connection that learnt its path (the [`super::congestion::WindowCap`]'s
//! rate, or the configured one, and the minimum RTT) leaves them here under
//! its [`Destination`] (receiver address and pinned identity). The next
//! connection to it, once its first RTT sample is within
//! [`RTT_RANGE`] of the saved minimum RTT, opens its window to
//! [`JUMP_SHARE`] × saved rate × that RTT for one RTT (quinn paces the
//! window over the smoothed RTT, so it is sent at about that share of the
//! rate), then the controller's own window rules again. A loss in the jump
//! ends it at once. A memory older than [`MAX_AGE`] is forgotten.
//!
//! In memory only: a mount's worker reconnects after a blip or a
//! receiver restart within one process. `VDREP_RESUME=0` turns it off
//! (a measurement switch).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a saved path is trusted.
pub const MAX_AGE: Duration = Duration::from_secs(3600);
/// The first RTT sample must lie within `[saved / RTT_RANGE, saved x RTT_RANGE]`.
pub const RTT_RANGE: f64 = 2.0;
/// The share of the saved bandwidth-delay product the jump opens.
pub const JUMP_SHARE: f64 = 0.5;
/// Smallest interval between two saves of one connection's path.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Where a connection goes: the receiver's address and the fingerprints of
/// the identities it is trusted as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination(pub String);

/// A path as a connection measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// Bottleneck rate, bytes/s.
    pub rate: u64,
    /// Minimum RTT.
    pub min_rtt: Duration,
    /// When it was measured.
    pub at: Instant,
}

/// The saved paths of this process, by destination.
#[derive(Debug, Default)]
pub struct Memory {
    paths: Mutex<HashMap<Destination, Saved>>,
}

impl Memory {
    /// Remember `saved` for `to` (a zero rate or RTT is not a measurement).
    pub fn remember(&self, to: &Destination, saved: Saved) {
        if saved.rate == 0 || saved.min_rtt.is_zero() {
            return;
        }
        if let Ok(mut m) = self.paths.lock() {
            m.insert(to.clone(), saved);
        }
    }

    /// The path saved for `to`, if younger than [`MAX_AGE`] at `now`
    /// (an older one is forgotten).
    pub fn recall(&self, to: &Destination, now: Instant) -> Option<Saved> {
        let mut m = self.paths.lock().ok()?;
        match m.get(to) {
            Some(s) if now.saturating_duration_since(s.at) <= MAX_AGE => Some(*s),
            Some(_) => {
                m.remove(to);
                None
            }
            None => None,
        }
    }
}

/// The memory of this process.
pub fn memory() -> &'static Memory {
    static MEMORY: OnceLock<Memory> = OnceLock::new();
    MEMORY.get_or_init(Memory::default)
}

/// Whether resuming is on (`VDREP_RESUME=0` turns it off, to measure).
pub fn enabled_by_env() -> bool {
    std::env::var("VDREP_RESUME").map_or(true, |v| v.trim() != "0")
}

/// A new connection's jump to a saved path's rate.
#[derive(Debug, Clone, PartialEq)]
pub enum Jump {
    /// No RTT sample yet.
    Waiting(Saved),
    /// The window is at least `window` bytes until `until`.
    Jumping { until: Instant, window: u64 },
    /// Over (or never started): the controller's own window.
    Done,
}

impl Jump {
    /// The jump for a connection to a path saved as `saved` (none: no jump).
    pub fn new(saved: Option<Saved>) -> Self {
        saved.map_or(Jump::Done, Jump::Waiting)
    }

    /// An RTT sample `rtt` at `now`: the first one starts the jump if it
    /// lies within [`RTT_RANGE`] of the saved minimum; one RTT later the
    /// jump ends.
    pub fn on_rtt(&mut self, now: Instant, rtt: Duration) {
        match *self {
            Jump::Waiting(s) => {
                let lo = s.min_rtt.div_f64(RTT_RANGE);
                let hi = s.min_rtt.mul_f64(RTT_RANGE);
                *self = if rtt >= lo && rtt <= hi && !rtt.is_zero() {
                    let window = (s.rate as f64 * rtt.as_secs_f64() * JUMP_SHARE) as u64;
                    Jump::Jumping {
                        until: now + rtt,
                        window,
                    }
                } else {
                    Jump::Done
                };
            }
            Jump::Jumping { until, .. } if now >= until => *self = Jump::Done,
            _ => {}
        }
    }

    /// A loss: the jump (or the wait for it) ends at once.
    pub fn on_loss(&mut self) {
        *self = Jump::Done;
    }

    /// The window the jump holds open, if it is on.
    pub fn window(&self) -> Option<u64> {
        match self {
            Jump::Jumping { window, .. } => Some(*window),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(at: Instant) -> Saved {
        Saved {
            rate: 12_500_000, // 100 Mbit/s
            min_rtt: Duration::from_millis(50),
            at,
        }
    }

    #[test]
    fn the_window_opens_only_after_an_rtt_sample_in_range_for_one_rtt() {
        let t = Instant::now();
        let mut j = Jump::new(Some(saved(t)));
        assert_eq!(j.window(), None, "no window before an RTT sample");
        j.on_rtt(t, Duration::from_millis(60));
        // Half of 12.5 MB/s x 60 ms.
        assert_eq!(j.window(), Some(375_000));
        j.on_rtt(t + Duration::from_millis(59), Duration::from_millis(60));
        assert_eq!(j.window(), Some(375_000), "still within one RTT");
        j.on_rtt(t + Duration::from_millis(60), Duration::from_millis(60));
        assert_eq!(j, Jump::Done, "over after one RTT");
        // A later sample never reopens it.
        j.on_rtt(t + Duration::from_millis(70), Duration::from_millis(50));
        assert_eq!(j.window(), None);
    }

    #[test]
    fn an_rtt_out_of_range_means_no_jump() {
        let t = Instant::now();
        for ms in [24, 101, 500] {
            let mut j = Jump::new(Some(saved(t)));
            j.on_rtt(t, Duration::from_millis(ms));
            assert_eq!(j, Jump::Done, "rtt {ms} ms vs saved 50 ms");
        }
        for ms in [25, 100] {
            let mut j = Jump::new(Some(saved(t)));
            j.on_rtt(t, Duration::from_millis(ms));
            assert!(j.window().is_some(), "rtt {ms} ms is in range");
        }
        let mut j = Jump::new(None);
        j.on_rtt(t, Duration::from_millis(50));
        assert_eq!(j, Jump::Done, "nothing saved: no jump");
    }

    #[test]
    fn a_loss_ends_the_jump_at_once() {
        let t = Instant::now();
        let mut j = Jump::new(Some(saved(t)));
        j.on_rtt(t, Duration::from_millis(50));
        assert!(j.window().is_some());
        j.on_loss();
        assert_eq!(j.window(), None);
        // A loss before the first sample: no jump either.
        let mut j = Jump::new(Some(saved(t)));
        j.on_loss();
        j.on_rtt(t, Duration::from_millis(50));
        assert_eq!(j.window(), None);
    }

    #[test]
    fn the_memory_is_per_destination_and_expires() {
        let m = Memory::default();
        let a = Destination("10.0.0.1:4433/aa".into());
        let b = Destination("10.0.0.1:4433/bb".into());
        let t = Instant::now();
        m.remember(&a, saved(t));
        assert_eq!(m.recall(&a, t), Some(saved(t)));
        assert_eq!(
            m.recall(&b, t),
            None,
            "another identity at the same address"
        );
        assert_eq!(m.recall(&a, t + MAX_AGE), Some(saved(t)));
        assert_eq!(m.recall(&a, t + MAX_AGE + Duration::from_secs(1)), None);
        assert_eq!(m.recall(&a, t), None, "an expired path is forgotten");
        m.remember(
            &a,
            Saved {
                rate: 0,
                ..saved(t)
            },
        );
        assert_eq!(m.recall(&a, t), None, "a zero rate is not saved");
    }
}
