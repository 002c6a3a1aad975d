//! Congestion control of replication connections: which of quinn's
//! controllers runs, chosen per link by [`Congestion`] (default:
//! [`Congestion::Bbr`], see `kernel-notes/wan.md` for the measurements that
//! chose it). The setting matters only to the side that sends bulk data (the
//! sender; and the receiver during reverse replication).

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

    /// Install this controller in `t`.
    pub fn apply(self, t: &mut quinn::TransportConfig) {
        match self {
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::LossTolerantCubic => {
                t.congestion_controller_factory(Arc::new(LossTolerantConfig::default()))
            }
        };
    }
}

/// Factory of [`LossTolerant`] over CUBIC.
#[derive(Debug, Default)]
pub struct LossTolerantConfig {
    cubic: Arc<quinn::congestion::CubicConfig>,
}

impl quinn::congestion::ControllerFactory for LossTolerantConfig {
    fn build(
        self: Arc<Self>,
        now: std::time::Instant,
        current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        Box::new(LossTolerant {
            inner: self.cubic.clone().build(now, current_mtu),
            srtt: None,
            min_rtt: None,
            ignored_events: 0,
        })
    }
}

/// A controller that forwards everything to `inner` except the loss events
/// that come without a queueing-delay signal (see
/// [`Congestion::LossTolerantCubic`]).
pub struct LossTolerant {
    inner: Box<dyn quinn::congestion::Controller>,
    srtt: Option<std::time::Duration>,
    min_rtt: Option<std::time::Duration>,
    ignored_events: u64,
}

impl LossTolerant {
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

impl quinn::congestion::Controller for LossTolerant {
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
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: std::time::Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: std::time::Instant,
        sent: std::time::Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if is_persistent_congestion || self.queue_building() {
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
        self.inner.window()
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(LossTolerant {
            inner: self.inner.clone_box(),
            srtt: self.srtt,
            min_rtt: self.min_rtt,
            ignored_events: self.ignored_events,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
