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
}

/// An unknown controller name.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?}: use bbr, cubic or newreno")]
pub struct UnknownCongestion(pub String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
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
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for c in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
            assert_eq!(c.to_string().parse::<Congestion>().ok(), Some(c));
        }
        assert!("vegas".parse::<Congestion>().is_err());
    }
}
