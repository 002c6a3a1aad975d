//! Congestion control of replication connections: which of quinn's
//! controllers runs, chosen per link by [`Congestion`] (default:
//! [`Congestion::Bbr`], see `kernel-notes/wan.md` for the measurements that
//! chose it), and the cap on its window ([`WindowCap`], through
//! [`WrappedConfig`], which also carries lt-cubic's loss filter and BBR's
//! [`ProbeRttHold`]). The setting matters only to the side that sends bulk
//! data (the sender; and the receiver during reverse replication).

use std::str::FromStr;
use std::sync::Arc;

/// A congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR: paces at the measured bottleneck rate and does not treat random
    /// loss as congestion, so a lossy long link stays full.
    #[default]
    Bbr,
    /// CUBIC (quinn's default): loss-based; halves its window on every loss
    /// episode, which collapses throughput on links with random loss.
    Cubic,
    /// NewReno: loss-based, like CUBIC but slower to grow.
    NewReno,
    /// CUBIC that treats a loss as congestion only when the round trip
    /// shows a queue building (smoothed RTT above the minimum by more than
    /// [`QUEUE_SIGNAL`]'s share), or when quinn declares persistent
    /// congestion. Random loss on an empty queue is retransmitted without
    /// shrinking the window (the idea of TCP Veno and Westwood).
    LossTolerantCubic,
}

/// A loss counts as congestion if the smoothed RTT exceeds the minimum RTT
/// by more than this fraction of it (or by [`QUEUE_SIGNAL_MIN`]).
pub const QUEUE_SIGNAL: f64 = 0.125;
/// Floor of the queueing delay that counts as congestion (low-RTT links).
pub const QUEUE_SIGNAL_MIN: std::time::Duration = std::time::Duration::from_millis(2);

/// An unknown controller name.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?}: use bbr, cubic, newreno or lt-cubic")]
pub struct UnknownCongestion(pub String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            "lt-cubic" | "loss-tolerant-cubic" => Ok(Congestion::LossTolerantCubic),
            _ => Err(UnknownCongestion(s.to_string())),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::LossTolerantCubic => "lt-cubic",
        })
    }
}

impl Congestion {
    /// The controller named by `VDREP_CONGESTION` (for benchmarks and
    /// experiments), else the default. A bad name is logged and ignored.
    pub fn from_env_or_default() -> Congestion {
        match std::env::var("VDREP_CONGESTION") {
            Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e: UnknownCongestion| {
                tracing::warn!("VDREP_CONGESTION: {e}; using {}", Congestion::default());
                Congestion::default()
            }),
            _ => Congestion::default(),
        }
    }

    /// Install this controller in `t`, its window capped by `cap` (BBR and
    /// lt-cubic; CUBIC and NewReno stay quinn's own).
    pub fn apply(self, t: &mut quinn::TransportConfig, cap: Option<CapConfig>) {
        self.apply_shared(t, cap, None)
    }

    /// [`Congestion::apply`] for a connection that `shares` sessions
    /// share: its cap's floor is [`CAP_FLOOR`] per session.
    pub fn apply_shared(
        self,
        t: &mut quinn::TransportConfig,
        cap: Option<CapConfig>,
        shares: Option<Shares>,
    ) {
        match self {
            Congestion::Bbr => match cap {
                Some(cap) => t.congestion_controller_factory(Arc::new(
                    WrappedConfig::capped_bbr(cap).shared(shares),
                )),
                None => t.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                )),
            },
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::LossTolerantCubic => t.congestion_controller_factory(Arc::new(
                WrappedConfig::loss_tolerant_cubic(cap).shared(shares),
            )),
        };
    }
}

impl CapConfig {
    /// The cap named by the environment (for benchmarks and experiments),
    /// else the default (gain [`CAP_GAIN`], rate learned):
    /// `VDREP_CWND_CAP=GAIN` (`0` or `off`: no cap) and
    /// `VDREP_LINK_MBIT=RATE` (the link's rate instead of a learned one).
    /// Bad values are logged and ignored.
    pub fn from_env_or_default() -> Option<CapConfig> {
        let num = |name: &str| -> Option<f64> {
            let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Some(x),
                _ if v.eq_ignore_ascii_case("off") => Some(0.0),
                _ => {
                    tracing::warn!("{name}={v:?} is not a number; ignored");
                    None
                }
            }
        };
        let gain = num("VDREP_CWND_CAP").unwrap_or(CAP_GAIN);
        if gain == 0.0 {
            return None;
        }
        let rate = num("VDREP_LINK_MBIT")
            .filter(|&m| m > 0.0)
            .map(|m| (m * 1e6 / 8.0) as u64);
        let min_span = num("VDREP_CAP_MIN_SPAN_US").map_or(CAP_MIN_SPAN, |us| {
            std::time::Duration::from_secs_f64(us / 1e6)
        });
        Some(CapConfig {
            gain: gain.max(1.0),
            rate,
            robust: num("VDREP_CAP_ROBUST") != Some(0.0),
            min_span,
        })
    }
}

/// Factory of [`Wrapped`] controllers: CUBIC or BBR underneath, with the
/// loss filter of [`Congestion::LossTolerantCubic`] and/or a [`WindowCap`].
pub struct WrappedConfig {
    inner: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>,
    loss_tolerant: bool,
    cap: Option<CapConfig>,
    /// Keep BBR out of its spurious first ProbeRtt ([`ProbeRttHold`]).
    probe_rtt_hold: bool,
    /// The sessions sharing the connection (the cap's floor is per session).
    shares: Option<Shares>,
}

/// How many sessions share one connection (`vdrep-mux/1`): the floor of
/// its [`WindowCap`] is [`CAP_FLOOR`] per session (at least one), the
/// floors their own connections had together. On a path whose min RTT is
/// below a millisecond (loopback, LAN) the cap is its floor, and a
/// connection moves at most floor / smoothed RTT: one 64 KiB floor for 256
/// VMs' sessions, with an ACK clock of 5–300 ms on 2 busy cores, is 0.2–13
/// MB/s for all of them (measured with it, `kernel-notes/replication-speed.md`,
/// session 14).
#[derive(Debug, Clone, Default)]
pub struct Shares(Arc<std::sync::atomic::AtomicU64>);

impl Shares {
    /// A session began on the connection.
    pub fn add(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A session on it ended.
    pub fn remove(&self) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| Some(n.saturating_sub(1)),
        );
    }

    /// Sessions on the connection now.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cap's floor for them.
    fn floor(shares: Option<&Shares>) -> u64 {
        CAP_FLOOR.saturating_mul(shares.map_or(1, |s| s.get().max(1)))
    }
}

impl std::fmt::Debug for WrappedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedConfig")
            .field("loss_tolerant", &self.loss_tolerant)
            .field("cap", &self.cap)
            .field("probe_rtt_hold", &self.probe_rtt_hold)
            .finish_non_exhaustive()
    }
}

impl WrappedConfig {
    /// CUBIC that ignores loss without a queue ([`Congestion::LossTolerantCubic`]).
    pub fn loss_tolerant_cubic(cap: Option<CapConfig>) -> Self {
        WrappedConfig {
            inner: Arc::new(quinn::congestion::CubicConfig::default()),
            loss_tolerant: true,
            cap,
            probe_rtt_hold: false,
            shares: None,
        }
    }

    /// Its cap's floor is per session of `shares` ([`Shares`]).
    pub fn shared(mut self, shares: Option<Shares>) -> Self {
        self.shares = shares;
        self
    }

    /// BBR with its window capped ([`Congestion::Bbr`] with a [`CapConfig`])
    /// and kept out of its spurious first ProbeRtt ([`ProbeRttHold`]; off
    /// with `VDREP_PROBE_RTT_HOLD=0`, for A/B runs).
    pub fn capped_bbr(cap: CapConfig) -> Self {
        let probe_rtt_hold =
            std::env::var("VDREP_PROBE_RTT_HOLD").map_or(true, |v| v.trim() != "0");
        WrappedConfig {
            inner: Arc::new(quinn::congestion::BbrConfig::default()),
            loss_tolerant: false,
            cap: Some(cap),
            probe_rtt_hold,
            shares: None,
        }
    }
}

impl quinn::congestion::ControllerFactory for WrappedConfig {
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        Box::new(Wrapped {
            inner: self.inner.clone().build(now, current_mtu),
            srtt: None,
            min_rtt: None,
            ignored_events: 0,
            loss_tolerant: self.loss_tolerant,
            cap: self.cap.map(WindowCap::new),
            hold: self.probe_rtt_hold.then(|| ProbeRttHold::new(now)),
            trace: CapTrace::new(now),
            shares: self.shares.clone(),
        })
    }
}

/// A controller that forwards everything to `inner`, except (when
/// `loss_tolerant`) the loss events that come without a queueing-delay
/// signal (see [`Congestion::LossTolerantCubic`]), and that (with a
/// [`ProbeRttHold`]) flags the end of every batch of acks app limited
/// until the hold ends; whose window is at most its [`WindowCap`]'s.
pub struct Wrapped {
    inner: Box<dyn quinn::congestion::Controller>,
    srtt: Option<std::time::Duration>,
    min_rtt: Option<std::time::Duration>,
    ignored_events: u64,
    loss_tolerant: bool,
    cap: Option<WindowCap>,
    hold: Option<ProbeRttHold>,
    trace: CapTrace,
    /// The sessions sharing the connection ([`Shares`]).
    shares: Option<Shares>,
}

/// A time-line of the controller for diagnosing a link
/// (`VDREP_LOG=info,vdrep::cwnd_cap=debug`): at every batch of acks in the
/// connection's first second, then every 100 ms, the inner controller's
/// window and pacing rate (BBR's bandwidth estimate x its gain), the RTTs
/// and the [`ProbeRttHold`]'s and [`WindowCap`]'s states.
#[derive(Debug, Clone)]
struct CapTrace {
    t0: std::time::Instant,
    next: std::time::Instant,
}

impl CapTrace {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(100);
    /// Every batch of acks is traced until then (the start-up ramp).
    const DETAILED: std::time::Duration = std::time::Duration::from_secs(1);

    fn new(now: std::time::Instant) -> Self {
        CapTrace { t0: now, next: now }
    }
}

impl Wrapped {
    fn trace(&mut self, now: std::time::Instant, in_flight: u64, app_limited: bool) {
        if now < self.trace.next
            || !tracing::enabled!(target: "vdrep::cwnd_cap", tracing::Level::DEBUG)
        {
            return;
        }
        if now.saturating_duration_since(self.trace.t0) >= CapTrace::DETAILED {
            self.trace.next = now + CapTrace::EVERY;
        }
        let m = self.inner.metrics();
        let ms = |d: Option<std::time::Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let cap = self.cap.as_ref();
        tracing::debug!(
            target: "vdrep::cwnd_cap",
            t_ms = now.saturating_duration_since(self.trace.t0).as_millis() as u64,
            min_rtt_ms = ms(self.min_rtt),
            srtt_ms = ms(self.srtt),
            inner_cwnd = self.inner.window(),
            inner_pacing_mbit = m.pacing_rate.unwrap_or(0) as f64 / 1e6,
            cwnd = quinn::congestion::Controller::window(self),
            in_flight,
            app_limited,
            probe_rtt_hold = self.hold.as_ref().map_or("none", |h| h.state.name()),
            cap_filled = cap.is_some_and(|c| c.filled),
            cap_rate_mbit = cap.map_or(0.0, |c| c.rate() as f64 * 8.0 / 1e6),
            cap_full_rate_mbit = cap.map_or(0.0, |c| c.full_rate as f64 * 8.0 / 1e6),
            cap_rounds_without_growth = cap.map_or(0, |c| c.rounds_without_growth),
            cap_samples = cap.map_or(0, |c| c.taken),
            cap_samples_app_limited = cap.map_or(0, |c| c.taken_app_limited),
            cap_samples_idle = cap.map_or(0, |c| c.idle_restarts),
            cap_bytes = cap.and_then(|c| c.cap(self.min_rtt?)).unwrap_or(0),
            "cwnd cap"
        );
    }

    /// Whether the path currently shows a queue: smoothed RTT above the
    /// minimum by more than the threshold. Without RTT samples, yes.
    fn queue_building(&self) -> bool {
        match (self.srtt, self.min_rtt) {
            (Some(s), Some(m)) => {
                let threshold = m.mul_f64(QUEUE_SIGNAL).max(QUEUE_SIGNAL_MIN);
                s > m + threshold
            }
            _ => true,
        }
    }
}

impl quinn::congestion::Controller for Wrapped {
    fn on_sent(&mut self, now: std::time::Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.srtt = Some(rtt.get());
        self.min_rtt = Some(rtt.min());
        let inner_window = self.inner.window();
        if let Some(cap) = &mut self.cap {
            let rtts = Rtts {
                min: rtt.min(),
                smoothed: rtt.get(),
            };
            let binding = cap.cap(rtts.min).is_some_and(|c| c < inner_window);
            cap.on_ack(now, sent, bytes, app_limited, binding, rtts);
        }
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        let inner_app_limited = match &mut self.hold {
            Some(h) => {
                let capped = self
                    .cap
                    .as_ref()
                    .zip(self.min_rtt)
                    .is_some_and(|(c, m)| c.cap(m).is_some());
                h.observe(now, capped);
                app_limited || h.holding()
            }
            None => app_limited,
        };
        self.inner
            .on_end_acks(now, in_flight, inner_app_limited, largest_packet_num_acked);
        self.trace(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if let Some(h) = &mut self.hold {
            h.on_congestion();
        }
        if !self.loss_tolerant || is_persistent_congestion || self.queue_building() {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
        } else {
            self.ignored_events += 1;
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        let w = self.inner.window();
        match self.cap.as_ref().and_then(|c| c.cap(self.min_rtt?)) {
            Some(cap) => w.min(cap.max(Shares::floor(self.shares.as_ref()))),
            None => w,
        }
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(Wrapped {
            inner: self.inner.clone_box(),
            srtt: self.srtt,
            min_rtt: self.min_rtt,
            ignored_events: self.ignored_events,
            loss_tolerant: self.loss_tolerant,
            cap: self.cap.clone(),
            hold: self.hold.clone(),
            trace: self.trace.clone(),
            shares: self.shares.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// BBR kept out of the ProbeRtt it enters on a new path's first data.
///
/// quinn-proto 0.11's BBR (a port of quiche's `bbr_sender.cc`) counts its
/// min RTT as expired when it never ran ProbeRtt
/// (`probe_rtt_last_started_at: None`), so the first batch of acks not
/// flagged app limited, i.e. the first data after the handshake, puts a
/// new connection into ProbeRtt: its window falls from 241,200 B to
/// 0.75 x its bandwidth estimate x min RTT, from a few handshake packets,
/// so to its floor of 4 packets (5,616 B), and its startup window stops
/// growing until 200 ms after in flight fell below that plus a round trip
/// (measured on the 100 Mbit/s, 50 ms link: ProbeRtt from 171 to 442 ms,
/// the window back at 250 kB then; `kernel-notes/wan.md`, s12-14b).
/// quiche counts the expiry from the min-RTT sample (10 s later). A new
/// path has no queue to drain: that ProbeRtt measures nothing.
///
/// BBR enters ProbeRtt only at the end of a batch of acks not flagged app
/// limited; while the hold lasts, [`Wrapped`] flags every batch's end app
/// limited (the acks themselves keep their flag, so BBR's bandwidth and
/// min-RTT samples are its own). That also defers BBR's own check for the
/// end of its startup (it runs on batches not app limited); the hold ends
/// when startup is over by the [`WindowCap`]'s measure (the cap applies:
/// the delivery rate stopped growing, or the link's rate is configured),
/// at the first loss or persistent congestion (BBR's own loss response
/// from then on), or [`HOLD_MAX`] after the connection began. BBR then
/// runs its ProbeRtt at the next batch, with a bandwidth estimate from
/// the data, and every 10 s after.
#[derive(Debug, Clone)]
pub struct ProbeRttHold {
    state: HoldState,
    began: std::time::Instant,
}

/// The longest a [`ProbeRttHold`] lasts: quiche's min-RTT lifetime.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a [`ProbeRttHold`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// BBR is kept out of ProbeRtt.
    Holding,
    /// Over: BBR sees quinn's flags.
    Off(HoldEnd),
}

/// Why a [`ProbeRttHold`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// A loss or persistent congestion was reported.
    Loss,
    /// The [`WindowCap`] applies (the startup is over by its measure).
    Capped,
    /// [`HOLD_MAX`] passed.
    Expired,
}

impl HoldState {
    fn name(self) -> &'static str {
        match self {
            HoldState::Holding => "holding",
            HoldState::Off(HoldEnd::Loss) => "off-loss",
            HoldState::Off(HoldEnd::Capped) => "off-capped",
            HoldState::Off(HoldEnd::Expired) => "off-expired",
        }
    }
}

impl ProbeRttHold {
    /// A hold for a connection that began at `now`.
    pub fn new(now: std::time::Instant) -> Self {
        ProbeRttHold {
            state: HoldState::Holding,
            began: now,
        }
    }

    /// Where the hold is.
    pub fn state(&self) -> HoldState {
        self.state
    }

    /// Whether BBR is still kept out of ProbeRtt.
    pub fn holding(&self) -> bool {
        self.state == HoldState::Holding
    }

    /// The end of a batch of acks at `now`, the window cap applying
    /// (`capped`) or not.
    pub fn observe(&mut self, now: std::time::Instant, capped: bool) {
        if !self.holding() {
            return;
        }
        if capped {
            self.state = HoldState::Off(HoldEnd::Capped);
        } else if now.saturating_duration_since(self.began) >= HOLD_MAX {
            self.state = HoldState::Off(HoldEnd::Expired);
        }
    }

    /// A loss or persistent congestion: the hold ends.
    pub fn on_congestion(&mut self) {
        if self.holding() {
            self.state = HoldState::Off(HoldEnd::Loss);
        }
    }
}

/// How a [`WindowCap`] sizes the window: `gain` × bottleneck rate ×
/// minimum RTT, the rate configured (`rate`, bytes/s) or learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapConfig {
    /// Multiple of the bandwidth-delay product the window may reach.
    pub gain: f64,
    /// The link's rate in bytes/s if known; `None`: learned from the
    /// acknowledgements.
    pub rate: Option<u64>,
    /// Learn the rate the robust way (the default; `false`, through
    /// `VDREP_CAP_ROBUST=0`, is the sampler of s5, kept for A/B runs):
    /// a sample spans at least the time its bytes took to be sent as well
    /// as to be acknowledged, and quinn's app-limited flag is overruled
    /// while the path shows a queue. See [`WindowCap`].
    pub robust: bool,
    /// The window never falls below what the rate delivers in this long
    /// ([`CAP_MIN_SPAN`]; `VDREP_CAP_MIN_SPAN_US`, `0` for the cap of
    /// before, for A/B runs).
    pub min_span: std::time::Duration,
}

/// The default [`CapConfig::gain`]: room for BBR's 1.25 probing phase and
/// a queue of half a round trip, not for the 2–2.9 × BDP it reaches alone.
pub const CAP_GAIN: f64 = 1.5;

/// The path's round-trip times at an acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct Rtts {
    /// The smallest seen.
    pub min: std::time::Duration,
    /// The smoothed one (above `min` when a queue builds).
    pub smoothed: std::time::Duration,
}

/// The smallest window the cap leaves, bytes. It was twice BBR's initial
/// window (2 x 200 packets, 480 kB), above 1.5 x BDP of every link slower
/// than 25 Mbit/s at 100 ms: on the 10 Mbit/s, 150 ms branch link (BDP
/// 187 kB) the cap never applied, BBR kept 480 kB in flight, the relay's
/// queue stood full (RTT 150 -> 370 ms, 1.8 k drops) and a quiet VM sharing
/// the link saw its RPO p99 double (measured, s6-14).
pub const CAP_FLOOR: u64 = 64 << 10;

/// The shortest time whose worth of the rate the cap leaves in flight.
/// On loopback or a LAN the minimum RTT (30-200 µs) is shorter than the
/// gaps in which a busy host hands over acknowledgements: `gain x rate x
/// min RTT` was below [`CAP_FLOOR`], and a 2 GiB initial copy on loopback
/// moved at 64 KiB per smoothed RTT, the window stuck at the floor
/// (`kernel-notes/replication-speed.md`, session 23: 5.7 s with the floor,
/// 4.7-5.0 s with 1-3 ms of the rate, 4.7 s without a cap). 2 ms of the
/// rate bounds the queue a LAN's bottleneck can see to 2 ms; a path of
/// 1.4 ms or more (every WAN) is capped by its BDP as before.
pub const CAP_MIN_SPAN: std::time::Duration = std::time::Duration::from_millis(2);

/// Rate samples the learned rate is the maximum of (one per round trip).
const RATE_SAMPLES: usize = 10;
/// Shortest interval of one rate sample.
const RATE_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(10);
/// Shortest rate sample of the robust sampler: a thread descheduled for
/// up to ~50 ms (then its acks handled at once) can inflate a sample of
/// one 50 ms RTT to 2-3 x the link rate; over 200 ms, by 1.25 x at most
/// (measured: samples of 165 Mbit/s on a 100 Mbit/s link with one-RTT
/// samples, s6-14).
const ROBUST_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(200);

/// A cap on a controller's window near `gain` × bottleneck rate × minimum
/// RTT. quinn paces at 1.25 × window / smoothed RTT whatever the
/// controller, so BBR's window of 2–2.9 × BDP sends bursts well above the
/// bottleneck rate into its queue (9–15 k drops per 95 MiB copy on the
/// emulated 100 Mbit/s, 50 ms link, `kernel-notes/wan.md`). With a learned
/// rate the cap starts once the delivery rate stopped growing (three
/// samples without 25 % growth, as BBR leaves its startup), so it never
/// slows the startup; the rate is the maximum of the last
/// [`RATE_SAMPLES`] samples of bytes acknowledged over one minimum RTT
/// (samples taken while the sender had nothing to send count only if
/// they raise it, and an idle gap starts a new sample).
///
/// Two measured failures shaped the sampler ([`CapConfig::robust`],
/// `kernel-notes/wan.md`, s6-14): in 2 of 10 copies on a loaded host the
/// cap never engaged, because (1) quinn flags a connection app limited
/// whenever a poll found nothing to send, which includes stream flow
/// control stopping the sender with the bottleneck queue full (138 of 151
/// samples flagged, with 11.6 k queue drops): a sample taken while the
/// path shows a queue (smoothed RTT above 1.25 x the minimum) measures the
/// bottleneck whatever the flag says; and (2) acknowledgements processed
/// in a burst after the sender's thread was descheduled made a 50 ms
/// sample read 195 Mbit/s on a 100 Mbit/s link, so the maximum kept
/// "growing": a sample now lasts at least as long as its bytes took to be
/// sent (the send times of the acknowledged packets), as BBR's delivery
/// rate takes the longer of the send and ack spans.
#[derive(Debug, Clone)]
pub struct WindowCap {
    cfg: CapConfig,
    interval_start: Option<std::time::Instant>,
    last_ack: Option<std::time::Instant>,
    interval_bytes: u64,
    interval_app_limited: bool,
    /// Bytes of the interval acknowledged while app limited (robust: the
    /// interval is app limited if most of its bytes were).
    interval_app_limited_bytes: u64,
    /// The interval's rate was held down by the sender itself: by the cap
    /// (a window below the controller's), or by stream flow control with
    /// a queue standing (an overruled app-limited flag). Such a sample
    /// says nothing of a slower path: it raises the rate, never displaces
    /// a higher sample (else the cap, at load where the RTT is inflated
    /// by scheduling, shrinks itself: measured, s6-14).
    interval_held: bool,
    /// Send times of the first and the latest packet acknowledged in the
    /// interval.
    interval_first_sent: Option<std::time::Instant>,
    interval_last_sent: Option<std::time::Instant>,
    samples: std::collections::VecDeque<u64>,
    full_rate: u64,
    rounds_without_growth: u32,
    filled: bool,
    /// Samples taken, of them app limited, and intervals an idle gap
    /// restarted (for the time-line).
    taken: u64,
    taken_app_limited: u64,
    idle_restarts: u64,
}

impl WindowCap {
    /// A cap with nothing learned yet.
    pub fn new(cfg: CapConfig) -> Self {
        WindowCap {
            cfg,
            interval_start: None,
            last_ack: None,
            interval_bytes: 0,
            interval_app_limited: false,
            interval_app_limited_bytes: 0,
            interval_held: false,
            interval_first_sent: None,
            interval_last_sent: None,
            samples: std::collections::VecDeque::with_capacity(RATE_SAMPLES),
            full_rate: 0,
            rounds_without_growth: 0,
            filled: false,
            taken: 0,
            taken_app_limited: 0,
            idle_restarts: 0,
        }
    }

    /// `bytes` of a packet sent at `sent` acknowledged at `now`, while the
    /// cap held the window below the controller's (`binding`); the path's
    /// RTTs then.
    pub fn on_ack(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        bytes: u64,
        app_limited: bool,
        binding: bool,
        rtt: Rtts,
    ) {
        if self.cfg.rate.is_some() {
            return;
        }
        // A gap in the acks longer than this starts a new sample (the
        // sender was idle). Robust: the sample's own length, since on a
        // loaded host acks stop for more than one RTT while a thread is
        // descheduled (measured: up to 49 restarts in 40 samples).
        let (gap, span) = match self.cfg.robust {
            true => {
                let span = rtt.min.max(ROBUST_INTERVAL_MIN);
                (span, span)
            }
            false => {
                let gap = rtt.min.max(RATE_INTERVAL_MIN);
                (gap, gap)
            }
        };
        let idle = self
            .last_ack
            .is_some_and(|last| now.saturating_duration_since(last) > gap);
        self.last_ack = Some(now);
        let start = match self.interval_start {
            Some(start) if !idle => start,
            _ => {
                self.idle_restarts += u64::from(idle);
                self.restart(now, sent);
                return;
            }
        };
        self.interval_bytes += bytes;
        self.interval_last_sent = self.interval_last_sent.max(Some(sent));
        let queue = rtt.smoothed > rtt.min + rtt.min / 4;
        let overruled = app_limited && self.cfg.robust && queue;
        if app_limited && !overruled {
            self.interval_app_limited = true;
            self.interval_app_limited_bytes += bytes;
        }
        self.interval_held |= self.cfg.robust && (overruled || binding);
        let len = now.saturating_duration_since(start);
        if len < span {
            return;
        }
        let sending = match (self.interval_first_sent, self.interval_last_sent) {
            (Some(a), Some(b)) if self.cfg.robust => b.saturating_duration_since(a),
            _ => std::time::Duration::ZERO,
        };
        let len = len.max(sending);
        let rate = (self.interval_bytes as u128 * 1_000_000_000 / len.as_nanos().max(1)) as u64;
        // One app-limited moment taints a one-RTT sample of s5; a robust
        // sample (200 ms or more) is app limited if most of it was
        // (measured: 14-29 of 40 samples tainted, the cap engaged after
        // 2-8 s).
        let app_limited = match self.cfg.robust {
            true => self.interval_app_limited_bytes * 2 > self.interval_bytes,
            false => self.interval_app_limited,
        };
        self.sample(rate, app_limited, self.interval_held);
        self.restart(now, sent);
    }

    /// A new interval from the ack at `now` of a packet sent at `sent`.
    fn restart(&mut self, now: std::time::Instant, sent: std::time::Instant) {
        self.interval_start = Some(now);
        self.interval_first_sent = Some(sent);
        self.interval_last_sent = Some(sent);
        self.interval_bytes = 0;
        self.interval_app_limited = false;
        self.interval_app_limited_bytes = 0;
        self.interval_held = false;
    }

    fn sample(&mut self, rate: u64, app_limited: bool, held: bool) {
        self.taken += 1;
        self.taken_app_limited += u64::from(app_limited);
        if app_limited && rate <= self.rate() {
            return;
        }
        if !held || rate > self.rate() {
            if self.samples.len() == RATE_SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(rate);
        }
        if app_limited || self.filled {
            return;
        }
        let max = self.rate();
        if max >= self.full_rate + self.full_rate / 4 {
            self.full_rate = max;
            self.rounds_without_growth = 0;
        } else {
            self.rounds_without_growth += 1;
            self.filled = self.rounds_without_growth >= 3;
        }
    }

    /// The learned rate, bytes/s (0 before the first sample).
    pub fn rate(&self) -> u64 {
        self.samples.iter().copied().max().unwrap_or(0)
    }

    /// The window cap for a path of minimum RTT `min_rtt`, if one applies
    /// yet: `gain` x rate x `min_rtt`, and at least the rate's worth of
    /// [`CapConfig::min_span`].
    pub fn cap(&self, min_rtt: std::time::Duration) -> Option<u64> {
        let rate = match self.cfg.rate {
            Some(r) => r,
            None if self.filled => self.rate(),
            None => return None,
        };
        let span = (min_rtt.as_secs_f64() * self.cfg.gain).max(self.cfg.min_span.as_secs_f64());
        Some((rate as f64 * span) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::congestion::Controller;
    use std::time::{Duration, Instant};

    const RTT: Duration = Duration::from_millis(50);

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for c in [
            Congestion::Bbr,
            Congestion::Cubic,
            Congestion::NewReno,
            Congestion::LossTolerantCubic,
        ] {
            assert_eq!(c.to_string().parse::<Congestion>().ok(), Some(c));
        }
        assert!("vegas".parse::<Congestion>().is_err());
    }

    const NO_QUEUE: Rtts = Rtts {
        min: RTT,
        smoothed: RTT,
    };

    fn learned(robust: bool) -> WindowCap {
        WindowCap::new(CapConfig {
            gain: 1.5,
            rate: None,
            robust,
            min_span: CAP_MIN_SPAN,
        })
    }

    /// Acks of `per_ms` bytes every millisecond for `ms` ms from `*t`
    /// (each packet sent one RTT before its ack).
    fn feed(cap: &mut WindowCap, t: &mut Instant, ms: u64, per_ms: u64, app_limited: bool) {
        for _ in 0..ms {
            *t += Duration::from_millis(1);
            cap.on_ack(*t, *t - RTT, per_ms, app_limited, false, NO_QUEUE);
        }
    }

    #[test]
    fn learned_cap_starts_when_the_rate_stops_growing_and_ignores_idle_and_app_limited() {
        let mut cap = learned(true);
        let mut t = Instant::now();
        // Startup: the rate doubles every round trip; no cap yet.
        for per_ms in [1_000, 2_000, 4_000, 8_000] {
            feed(&mut cap, &mut t, 50, per_ms, false);
            assert_eq!(cap.cap(RTT), None, "capped during startup");
        }
        // 100 Mbit/s = 12,500 bytes per ms, steady: capped at 1.5 x BDP.
        feed(&mut cap, &mut t, 1000, 12_500, false);
        let bdp = 12_500_000.0 * RTT.as_secs_f64();
        let w = cap.cap(RTT).expect("a cap once the rate stopped growing") as f64;
        assert!((w / bdp - 1.5).abs() < 0.05, "cap {w} for a BDP of {bdp}");
        // An idle second and a trickle the sender could not fill (app
        // limited) leave the learned rate alone.
        t += Duration::from_secs(1);
        feed(&mut cap, &mut t, 500, 500, true);
        let after = cap.cap(RTT).unwrap_or(0) as f64;
        assert!(
            (after / w - 1.0).abs() < 0.01,
            "cap moved from {w} to {after}"
        );
    }

    /// The first of the two failures that left the cap off in 2 of 10
    /// copies: quinn flags "app limited" when stream flow control stops
    /// the sender, with the bottleneck's queue full. With the queue
    /// showing in the RTT, the samples count and the cap engages; the s5
    /// sampler never engaged.
    #[test]
    fn a_full_queue_overrules_quinns_app_limited_flag() {
        let queue = Rtts {
            min: RTT,
            smoothed: RTT * 2,
        };
        for robust in [true, false] {
            let mut cap = learned(robust);
            let mut t = Instant::now();
            for _ in 0..1200 {
                t += Duration::from_millis(1);
                cap.on_ack(t, t - RTT * 2, 12_500, true, false, queue);
            }
            assert_eq!(cap.cap(RTT).is_some(), robust, "robust {robust}: {cap:?}");
        }
    }

    /// A moment with nothing to send (one ack in 50 flagged app limited,
    /// no queue) does not taint a robust sample: the cap still engages.
    #[test]
    fn a_moment_app_limited_does_not_taint_a_sample() {
        for robust in [true, false] {
            let mut cap = learned(robust);
            let mut t = Instant::now();
            for i in 0..2000u64 {
                t += Duration::from_millis(1);
                cap.on_ack(t, t - RTT, 12_500, i % 50 == 0, false, NO_QUEUE);
            }
            assert_eq!(cap.cap(RTT).is_some(), robust, "robust {robust}: {cap:?}");
        }
    }

    /// The second: acks processed in a burst (the sender's thread
    /// descheduled 40 ms, then every ack of those 40 ms handled at one
    /// instant) made the next 50 ms sample read up to twice the link rate.
    /// A sample lasts at least as long as its packets took to be sent, so
    /// the learned rate stays near the link's.
    #[test]
    fn bursts_of_acks_do_not_inflate_the_learned_rate() {
        let link = 12_500u64; // bytes per ms: 100 Mbit/s
        for robust in [true, false] {
            let mut cap = learned(robust);
            let t0 = Instant::now();
            for sent_ms in 1..=3000u64 {
                // A packet per ms; its ack one RTT later, except that
                // every 200 ms the acks of 40 ms wait for the thread.
                let due = sent_ms + 50;
                let now = if (45..85).contains(&(due % 200)) {
                    due - due % 200 + 85
                } else {
                    due
                };
                let at = |ms: u64| t0 + Duration::from_millis(ms);
                cap.on_ack(at(now), at(sent_ms), link, false, false, NO_QUEUE);
            }
            let ratio = cap.rate() as f64 / (link * 1000) as f64;
            if robust {
                assert!(ratio < 1.1, "learned {ratio:.2} x the link rate");
            } else {
                assert!(
                    ratio > 1.3,
                    "the s5 sampler is not fooled any more ({ratio:.2}): the test is stale"
                );
            }
        }
    }

    /// The cap must not shrink itself: at load, scheduling inflates the
    /// RTT, so a window of 1.5 x rate x min RTT delivers less than the
    /// rate; those samples (taken while the cap binds) never displace the
    /// higher ones.
    #[test]
    fn samples_held_down_by_the_cap_do_not_lower_it() {
        let mut cap = learned(true);
        let mut t = Instant::now();
        feed(&mut cap, &mut t, 1000, 12_500, false);
        let before = cap.rate();
        assert!(cap.cap(RTT).is_some());
        for _ in 0..2000 {
            t += Duration::from_millis(1);
            cap.on_ack(t, t - RTT, 6_000, false, true, NO_QUEUE);
        }
        assert_eq!(cap.rate(), before);
        // Without the cap binding, a slower path does lower it.
        feed(&mut cap, &mut t, 3000, 6_000, false);
        assert!(cap.rate() < before * 6 / 10, "{} vs {before}", cap.rate());
    }

    /// quinn's BBR as far as the hold sees it: startup from a 240 kB
    /// window growing by `grow` per batch of acks; at the first batch not
    /// flagged app limited, ProbeRtt (a 4-packet window, no growth) that
    /// ends at the first batch 200 ms after in flight fell below its
    /// window plus a packet; `full_bw_at` batches not app limited end its
    /// startup (recorded in `left_startup`).
    #[derive(Debug, Clone)]
    struct FakeBbr {
        cwnd: u64,
        grow: u64,
        probed: bool,
        probe_rtt: bool,
        exit_at: Option<Instant>,
        not_app_limited: u32,
        full_bw_at: u32,
        left_startup: bool,
    }

    const INIT: u64 = 240_000;
    const PROBE_CWND: u64 = 5_616;
    const MTU: u64 = 1_404;

    impl FakeBbr {
        fn new(grow: u64, full_bw_at: u32) -> Self {
            FakeBbr {
                cwnd: INIT,
                grow,
                probed: false,
                probe_rtt: false,
                exit_at: None,
                not_app_limited: 0,
                full_bw_at,
                left_startup: false,
            }
        }
    }

    impl quinn::congestion::Controller for FakeBbr {
        fn on_sent(&mut self, _: Instant, _: u64, _: u64) {}
        fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, _: Option<u64>) {
            if !app_limited {
                self.not_app_limited += 1;
                self.left_startup |= self.not_app_limited >= self.full_bw_at;
                if !self.probed {
                    self.probed = true;
                    self.probe_rtt = true;
                }
            }
            if self.probe_rtt {
                match self.exit_at {
                    None if in_flight < PROBE_CWND + MTU => {
                        self.exit_at = Some(now + Duration::from_millis(200))
                    }
                    Some(at) if now >= at => self.probe_rtt = false,
                    _ => {}
                }
                return;
            }
            self.cwnd += self.grow;
        }
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            if self.probe_rtt {
                PROBE_CWND
            } else {
                self.cwnd
            }
        }
        fn metrics(&self) -> quinn::congestion::ControllerMetrics {
            let mut m = quinn::congestion::ControllerMetrics::default();
            m.congestion_window = self.window();
            m
        }
        fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            INIT
        }
        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
            self
        }
    }

    #[test]
    fn a_shared_connection_has_a_cap_floor_per_session() {
        assert_eq!(Shares::floor(None), CAP_FLOOR);
        let s = Shares::default();
        assert_eq!(Shares::floor(Some(&s)), CAP_FLOOR, "at least one session's");
        for _ in 0..256 {
            s.add();
        }
        assert_eq!(Shares::floor(Some(&s)), 256 * CAP_FLOOR);
        s.remove();
        assert_eq!(Shares::floor(Some(&s)), 255 * CAP_FLOOR);
    }

    fn wrapped(inner: FakeBbr, hold: bool, cap: Option<CapConfig>, now: Instant) -> Wrapped {
        Wrapped {
            inner: Box::new(inner),
            srtt: Some(RTT),
            min_rtt: Some(RTT),
            ignored_events: 0,
            loss_tolerant: false,
            cap: cap.map(WindowCap::new),
            hold: hold.then(|| ProbeRttHold::new(now)),
            trace: CapTrace::new(now),
            shares: None,
        }
    }

    /// The handshake's batch (app limited), then a batch every 5 ms with
    /// the window full; a loss reported before batch `loss_at`. The
    /// windows after each batch.
    fn drive(w: &mut Wrapped, t: &mut Instant, batches: u32, loss_at: Option<u32>) -> Vec<u64> {
        let mut seen = Vec::new();
        w.on_end_acks(*t, 1_200, true, Some(1));
        seen.push(w.window());
        for i in 0..batches {
            *t += Duration::from_millis(5);
            if loss_at == Some(i) {
                w.on_congestion_event(*t, *t - RTT, false, 1_200);
            }
            let in_flight = w.window();
            w.on_end_acks(*t, in_flight, false, Some(2 + u64::from(i)));
            seen.push(w.window());
        }
        seen
    }

    fn fake(w: Wrapped) -> FakeBbr {
        match w.inner.into_any().downcast::<FakeBbr>() {
            Ok(b) => *b,
            Err(_) => panic!("not the fake"),
        }
    }

    fn hold_state(w: &Wrapped) -> Option<HoldState> {
        w.hold.as_ref().map(|h| h.state())
    }

    /// Without the hold, the first data after the handshake puts BBR in
    /// ProbeRtt (the bug, as the fake models quinn's BBR): its window
    /// falls to 4 packets and stops growing. With it, BBR stays in its
    /// startup, the window never falls below the initial window and grows
    /// from the first data; BBR's own startup check waits too.
    #[test]
    fn the_hold_keeps_bbr_out_of_probe_rtt_on_a_new_path() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut bare = wrapped(FakeBbr::new(10_000, 50), false, None, t0);
        let seen = drive(&mut bare, &mut t, 100, None);
        assert_eq!(
            seen.iter().min(),
            Some(&PROBE_CWND),
            "the fake must collapse"
        );

        let mut t = t0;
        let mut w = wrapped(FakeBbr::new(10_000, 50), true, None, t0);
        let seen = drive(&mut w, &mut t, 100, None);
        assert!(
            seen.windows(2).all(|p| p[1] > p[0]) && seen[0] > INIT,
            "window fell or stalled: {seen:?}"
        );
        assert_eq!(hold_state(&w), Some(HoldState::Holding));
        let b = fake(w);
        assert!(!b.probed && !b.left_startup, "{b:?}");
    }

    /// Once the window cap applies (the startup is over by its measure),
    /// the hold ends and the window is BBR's: its ProbeRtt, then its own
    /// startup check.
    #[test]
    fn the_hold_ends_when_the_cap_applies_and_bbr_takes_over() {
        let t0 = Instant::now();
        let mut t = t0;
        // A configured rate: the cap applies from the first RTT sample.
        let cap = CapConfig {
            gain: 1.5,
            rate: Some(12_500_000),
            robust: true,
            min_span: CAP_MIN_SPAN,
        };
        let mut w = wrapped(FakeBbr::new(10_000, 5), true, Some(cap), t0);
        let seen = drive(&mut w, &mut t, 10, None);
        assert_eq!(hold_state(&w), Some(HoldState::Off(HoldEnd::Capped)));
        assert_eq!(seen[1], PROBE_CWND, "{seen:?}");
        assert!(fake(w).left_startup);
    }

    /// A loss ends the hold for good: from that batch on BBR sees quinn's
    /// flags (and runs its ProbeRtt, and its loss response).
    #[test]
    fn a_loss_ends_the_hold() {
        for loss_at in [0, 10] {
            let t0 = Instant::now();
            let mut t = t0;
            let mut w = wrapped(FakeBbr::new(10_000, 1000), true, None, t0);
            let seen = drive(&mut w, &mut t, 20, Some(loss_at));
            let (before, after) = seen.split_at(loss_at as usize + 1);
            assert!(
                before.iter().all(|&x| x >= INIT),
                "loss at {loss_at}: {seen:?}"
            );
            assert_eq!(after[0], PROBE_CWND, "loss at {loss_at}: {seen:?}");
            assert_eq!(hold_state(&w), Some(HoldState::Off(HoldEnd::Loss)));
            // Later batches do not restart it.
            w.on_end_acks(t + Duration::from_millis(5), 0, false, Some(99));
            assert_eq!(hold_state(&w), Some(HoldState::Off(HoldEnd::Loss)));
        }
    }

    /// Without a loss or a cap, the hold ends [`HOLD_MAX`] after the
    /// connection began (BBR's min RTT would be that old in quiche).
    #[test]
    fn the_hold_expires() {
        let t0 = Instant::now();
        let mut h = ProbeRttHold::new(t0);
        h.observe(t0 + HOLD_MAX - Duration::from_millis(1), false);
        assert!(h.holding());
        h.observe(t0 + HOLD_MAX, false);
        assert_eq!(h.state(), HoldState::Off(HoldEnd::Expired));
        h.on_congestion();
        assert_eq!(h.state(), HoldState::Off(HoldEnd::Expired));
    }

    #[test]
    fn configured_rate_caps_from_the_first_rtt_sample() {
        let cap = WindowCap::new(CapConfig {
            gain: 2.0,
            rate: Some(125_000_000 / 8),
            robust: true,
            min_span: CAP_MIN_SPAN,
        });
        assert_eq!(cap.cap(Duration::from_millis(20)), Some(625_000));
    }

    #[test]
    fn a_sub_millisecond_path_keeps_the_min_span_of_its_rate_in_flight() {
        // Loopback at 500 MB/s, min RTT 30 us: 1.5 x BDP is 22.5 kB, below
        // the floor; the cap leaves 2 ms of the rate (1 MB) instead.
        let rate = 500_000_000;
        let cfg = |min_span| CapConfig {
            gain: 1.5,
            rate: Some(rate),
            robust: true,
            min_span,
        };
        let lo = Duration::from_micros(30);
        assert_eq!(WindowCap::new(cfg(CAP_MIN_SPAN)).cap(lo), Some(1_000_000));
        assert_eq!(WindowCap::new(cfg(Duration::ZERO)).cap(lo), Some(22_500));
        // A WAN path is capped by its BDP as before: 1.5 x 500 MB/s x 20 ms.
        let wan = Duration::from_millis(20);
        assert_eq!(WindowCap::new(cfg(CAP_MIN_SPAN)).cap(wan), Some(15_000_000));
        // Through the controller: the window at loopback is 1 MB, not the
        // 64 KiB floor.
        let t0 = Instant::now();
        let big = || {
            let mut b = FakeBbr::new(0, 5);
            b.cwnd = 100_000_000;
            b
        };
        let mut w = wrapped(big(), false, Some(cfg(CAP_MIN_SPAN)), t0);
        w.min_rtt = Some(lo);
        assert_eq!(w.window(), 1_000_000);
        let mut old = wrapped(big(), false, Some(cfg(Duration::ZERO)), t0);
        old.min_rtt = Some(lo);
        assert_eq!(old.window(), CAP_FLOOR);
    }
}
