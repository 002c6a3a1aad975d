//! Flow-control windows sized to the path: the receiving end of a
//! replication connection learns the link's bandwidth-delay product and
//! grows the connection's receive window to a multiple of it, instead of
//! granting every connection a large constant.
//!
//! quinn fixes a stream's receive window when the connection starts, but
//! lets the connection's window change at any time
//! (`Connection::set_receive_window`). So the stream window is a ceiling
//! ([`super::STREAM_RECEIVE_WINDOW`]) and the connection window, which
//! bounds the data of all streams together, is what [`WindowTuner`] sizes:
//!
//! `window = clamp(GAIN x fastest delivery rate seen x min RTT, FLOOR, CEILING)
//!           + stream window x streams the receiver stopped reading`
//!
//! the way Linux sizes a TCP receive buffer (twice what arrived in one
//! round trip). While the window is the limit the delivery rate is
//! `window / RTT`, so the window doubles every sample until the link (or
//! the sender's congestion window) is the limit; then it stays at
//! `GAIN x BDP`, which keeps a paced sender's data in flight below what a
//! bottleneck queue of one BDP holds. A stream the receiver pauses while
//! the store works on it holds up to one stream window of data: that much
//! is added per paused stream, so one busy disk does not stop the others of
//! the connection. The memory a connection can make the receiver hold is
//! the window: `GAIN x BDP` (2 MiB at least) plus a stream window per
//! paused stream. Measured: `kernel-notes/wan.md` (issue 14, round 5).
//!
//! `VDREP_WINDOW_TUNE=0` turns it off (the fixed windows of before: 2 MiB
//! per stream, 64 MiB per connection), for A/B runs; `VDREP_WINDOW_GAIN`
//! and `VDREP_STREAM_WINDOW` (bytes) change the gain and the stream window.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The window as a multiple of the learned bandwidth-delay product.
pub const GAIN: f64 = 2.0;
/// The smallest connection window (and the one a connection starts with).
pub const FLOOR: u64 = 2 << 20;
/// The largest window the learned part may reach.
pub const CEILING: u64 = 64 << 20;
/// How often the tuner samples the connection.
pub const EVERY: Duration = Duration::from_millis(100);

/// Whether the tuner runs (`VDREP_WINDOW_TUNE=0`: no, for A/B runs).
pub fn enabled_by_env() -> bool {
    !matches!(
        std::env::var("VDREP_WINDOW_TUNE").as_deref(),
        Ok("0") | Ok("off")
    )
}

/// [`GAIN`], or `VDREP_WINDOW_GAIN` (at least 1) for experiments.
pub fn gain_from_env() -> f64 {
    std::env::var("VDREP_WINDOW_GAIN")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|g| g.is_finite() && *g >= 1.0)
        .unwrap_or(GAIN)
}

/// The sizes one tuner works with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowConfig {
    pub gain: f64,
    pub floor: u64,
    pub ceiling: u64,
    /// Added per paused stream (the stream window).
    pub per_paused: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            gain: GAIN,
            floor: FLOOR,
            ceiling: CEILING,
            per_paused: u64::from(super::STREAM_RECEIVE_WINDOW),
        }
    }
}

/// Sizes a connection's receive window from what it delivers (sans-IO:
/// fed with the connection's counters, see [`run`]).
#[derive(Debug, Clone)]
pub struct WindowTuner {
    cfg: WindowConfig,
    /// Bytes received and when, at the previous sample.
    last: Option<(u64, Instant)>,
    /// Fastest delivery seen (bytes/s).
    max_rate: f64,
    /// The window last set.
    window: u64,
}

impl WindowTuner {
    pub fn new(cfg: WindowConfig) -> Self {
        WindowTuner {
            cfg,
            last: None,
            max_rate: 0.0,
            window: cfg.floor,
        }
    }

    /// The window now (bytes).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The fastest delivery rate seen (bytes/s).
    pub fn max_rate(&self) -> f64 {
        self.max_rate
    }

    /// One sample: `rx_bytes` received on the connection so far, the
    /// path's minimum RTT, the streams the receiver stopped reading. The
    /// new window when it changed.
    pub fn sample(
        &mut self,
        now: Instant,
        rx_bytes: u64,
        min_rtt: Duration,
        paused: usize,
    ) -> Option<u64> {
        if let Some((bytes, at)) = self.last {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let rate = rx_bytes.saturating_sub(bytes) as f64 / secs;
                self.max_rate = self.max_rate.max(rate);
            }
        }
        self.last = Some((rx_bytes, now));
        let learned = (self.cfg.gain * self.max_rate * min_rtt.as_secs_f64()) as u64;
        let w = learned.clamp(self.cfg.floor, self.cfg.ceiling.max(self.cfg.floor))
            + self.cfg.per_paused.saturating_mul(paused as u64);
        (w != self.window).then(|| {
            self.window = w;
            w
        })
    }
}

/// How many streams of a connection the receiver stopped reading (shared
/// between the connection's driver and its [`run`] task).
#[derive(Debug, Default, Clone)]
pub struct Paused(Arc<AtomicUsize>);

impl Paused {
    pub fn set(&self, n: usize) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// One session's share of the count, where many sessions share the
    /// connection (`vdrep-mux/1`): the total is the sum of the parts.
    pub fn part(&self) -> PausedPart {
        PausedPart {
            total: self.clone(),
            mine: 0,
        }
    }
}

/// The paused streams of one session of a connection ([`Paused::part`]);
/// dropped, its streams no longer count.
#[derive(Debug)]
pub struct PausedPart {
    total: Paused,
    mine: usize,
}

impl PausedPart {
    /// This session has `n` paused streams now.
    pub fn set(&mut self, n: usize) {
        if n > self.mine {
            self.total.0.fetch_add(n - self.mine, Ordering::Relaxed);
        } else {
            self.total.0.fetch_sub(self.mine - n, Ordering::Relaxed);
        }
        self.mine = n;
    }
}

impl Drop for PausedPart {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Tune `conn`'s receive window every [`EVERY`] until it closes (when
/// `tune`), logging the link's time-line at DEBUG on `vdrep::link_stats`
/// when that is enabled. Returns at once if neither is wanted.
pub async fn run(conn: quinn::Connection, tune: Option<WindowConfig>, paused: Paused) {
    let trace = tracing::enabled!(target: "vdrep::link_stats", tracing::Level::DEBUG);
    if tune.is_none() && !trace {
        return;
    }
    let mut tuner = tune.map(WindowTuner::new);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(EVERY);
    while conn.close_reason().is_none() {
        tick.tick().await;
        let s = conn.stats();
        let now = Instant::now();
        let window = match &mut tuner {
            Some(t) => {
                if let Some(w) = t.sample(now, s.udp_rx.bytes, s.path.min_rtt, paused.get()) {
                    let w = quinn::VarInt::from_u64(w).unwrap_or(quinn::VarInt::MAX);
                    conn.set_receive_window(w);
                }
                t.window()
            }
            None => 0,
        };
        if trace {
            tracing::debug!(
                target: "vdrep::link_stats",
                side = "receiver",
                t_ms = t0.elapsed().as_millis() as u64,
                rtt_ms = s.path.rtt.as_secs_f64() * 1e3,
                min_rtt_ms = s.path.min_rtt.as_secs_f64() * 1e3,
                window,
                max_rate_mbit = tuner.as_ref().map_or(0.0, |t| t.max_rate() * 8.0 / 1e6),
                paused = paused.get(),
                udp_rx_bytes = s.udp_rx.bytes,
                max_data_sent = s.frame_tx.max_data,
                max_stream_data_sent = s.frame_tx.max_stream_data,
                data_blocked_rx = s.frame_rx.data_blocked,
                stream_data_blocked_rx = s.frame_rx.stream_data_blocked,
                "link"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_paused_count_is_the_sum_of_the_sessions_parts() {
        let total = Paused::default();
        let mut a = total.part();
        let mut b = total.part();
        a.set(3);
        b.set(2);
        assert_eq!(total.get(), 5);
        a.set(1);
        assert_eq!(total.get(), 3);
        drop(b);
        assert_eq!(total.get(), 1, "a session that ends takes its streams out");
        a.set(0);
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn the_window_grows_to_twice_the_bdp_and_stays() {
        // 1 Gbit/s (125 MB/s), 20 ms: BDP 2.5 MB.
        let cfg = WindowConfig::default();
        let mut t = WindowTuner::new(cfg);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(20);
        let mut rx = 0u64;
        assert_eq!(t.sample(t0, rx, rtt, 0), None, "starts at the floor");
        assert_eq!(t.window(), FLOOR);
        // Window-limited: one window per RTT arrives; the window doubles.
        let mut at = t0;
        for _ in 0..4 {
            let rate = (t.window() as f64 / rtt.as_secs_f64()).min(125e6);
            at += EVERY;
            rx += (rate * EVERY.as_secs_f64()) as u64;
            t.sample(at, rx, rtt, 0);
        }
        let w = t.window();
        assert!((4_900_000..=5_100_000).contains(&w), "2 x BDP, got {w}");
        // A slower period (another VM shares the link) does not shrink it.
        at += EVERY;
        rx += 1_000_000;
        assert_eq!(t.sample(at, rx, rtt, 0), None);
    }

    #[test]
    fn slow_or_short_links_keep_the_floor_and_the_ceiling_bounds() {
        let mut t = WindowTuner::new(WindowConfig::default());
        let t0 = Instant::now();
        // 100 Mbit/s at 50 ms: BDP 625 kB, 2 x BDP below the floor.
        t.sample(t0, 0, Duration::from_millis(50), 0);
        t.sample(t0 + EVERY, 1_250_000, Duration::from_millis(50), 0);
        assert_eq!(t.window(), FLOOR);
        // 10 Gbit/s at 300 ms: far above the ceiling.
        t.sample(
            t0 + 2 * EVERY,
            1_250_000 + 125_000_000,
            Duration::from_millis(300),
            0,
        );
        assert_eq!(t.window(), CEILING);
    }

    #[test]
    fn each_paused_stream_adds_a_stream_window_and_gives_it_back() {
        let cfg = WindowConfig::default();
        let mut t = WindowTuner::new(cfg);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(50);
        t.sample(t0, 0, rtt, 0);
        assert_eq!(
            t.sample(t0 + EVERY, 0, rtt, 2),
            Some(FLOOR + 2 * cfg.per_paused)
        );
        assert_eq!(t.sample(t0 + 2 * EVERY, 0, rtt, 0), Some(FLOOR));
        assert!(cfg.per_paused >= 2 * MIB);
    }
}
