//! Prometheus/OpenMetrics exposition: the building blocks every daemon's
//! `metrics_listen` endpoint is made of.
//!
//! This module owns the mechanics only, never what a number means:
//! - [`Histogram`]: a lock-free latency histogram (atomics, no allocation
//!   on the observing path) for hot paths such as FUSE requests;
//! - [`fuse`]: the per-operation request counters and latency histograms
//!   of the FUSE file system (a process-wide static: one mount per daemon);
//! - [`receiver`]: the receiver's own hot-path counters (connections,
//!   apply latency);
//! - [`Collect`] and the sample helpers ([`gauge`], [`counter`],
//!   [`histogram`]): collectors that read a snapshot at scrape time, so a
//!   VM that is unprotected simply stops being exposed;
//! - [`serve`]: a small HTTP/1.1 server answering `GET /metrics` with the
//!   OpenMetrics text of a `prometheus_client` registry (`http`).
//!
//! The collectors themselves live with the state they read
//! (`sender::metrics` for VMs and disks, `receiver::metrics` for the
//! store), so this module imports nothing of the crate.

pub mod fuse;
mod http;
pub mod receiver;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::{Registry, Unit};

pub use http::{serve, MetricsServer};

/// Labels of one sample: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// The most buckets a [`Histogram`] has (bounds + the `+Inf` bucket).
const MAX_BUCKETS: usize = 24;

/// Upper bounds, in nanoseconds, of the latency buckets: 10 µs to 10 s.
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram made of atomics: [`Histogram::observe`] takes no
/// lock and allocates nothing (one bucket increment and one sum add).
#[derive(Debug)]
pub struct Histogram {
    bounds_ns: &'static [u64],
    /// Per-bucket counts (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

/// What a [`Histogram`] held at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Seconds.
    pub sum: f64,
    pub count: u64,
    /// `(upper bound in seconds, count in that bucket)`, not cumulative,
    /// ending with `(+Inf, n)`.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// A histogram over `bounds_ns` (ascending, fewer than 24).
    pub const fn new(bounds_ns: &'static [u64]) -> Self {
        assert!(bounds_ns.len() < MAX_BUCKETS);
        Histogram {
            bounds_ns,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// A histogram over [`LATENCY_BOUNDS_NS`].
    pub const fn latency() -> Self {
        Self::new(&LATENCY_BOUNDS_NS)
    }

    /// Count one observation of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        let i = self
            .bounds_ns
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(self.bounds_ns.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    #[inline]
    pub fn observe(&self, d: Duration) {
        self.observe_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The counts now; `count` is the sum of the buckets read, so the
    /// `+Inf` bucket and `_count` always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.bounds_ns.len() + 1);
        let mut count = 0;
        for (i, b) in self
            .buckets
            .iter()
            .take(self.bounds_ns.len() + 1)
            .enumerate()
        {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let le = self
                .bounds_ns
                .get(i)
                .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
            buckets.push((le, n));
        }
        HistogramSnapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

/// A collector written as a closure over the scrape's encoder.
pub struct Collect<F>(pub F);

impl<F> fmt::Debug for Collect<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Collect")
    }
}

impl<F> Collector for Collect<F>
where
    F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut encoder)
    }
}

/// Register a closure collector (see [`Collect`]).
pub fn register<F>(registry: &mut Registry, f: F)
where
    F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
{
    registry.register_collector(Box::new(Collect(f)));
}

/// One gauge family: a descriptor and one sample per label set.
pub fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// One counter family (`name` without `_total`: the encoder adds it).
// Shaped as `gauge`: prometheus_client encodes gauges and counters through
// different traits, so one generic function cannot serve both.
pub fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, V, f64>(&v, None)?;
    }
    Ok(())
}

/// One histogram family.
pub fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, HistogramSnapshot)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    for (labels, h) in samples {
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

/// The OpenMetrics text of `registry` (with the closing `# EOF`).
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_sum_and_count_agree() {
        static H: Histogram = Histogram::new(&[1_000, 1_000_000]);
        H.observe_ns(500);
        H.observe_ns(1_000);
        H.observe_ns(2_000);
        H.observe(Duration::from_secs(2));
        let s = H.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(1e-6, 2), (1e-3, 1), (f64::INFINITY, 1)]);
        assert!((s.sum - (2.0 + 3.5e-6)).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn render_encodes_collected_families() {
        let mut r = Registry::default();
        register(&mut r, |enc| {
            gauge(
                enc,
                "vdrep_test_lag",
                "lag",
                Some(&Unit::Seconds),
                [(vec![("vm", "a".to_string())], 1.5f64)],
            )?;
            counter(
                enc,
                "vdrep_test_sent",
                "sent",
                None,
                [(Labels::new(), 7u64)],
            )
        });
        let text = render(&r).unwrap();
        assert!(
            text.contains("vdrep_test_lag_seconds{vm=\"a\"} 1.5"),
            "{text}"
        );
        assert!(text.contains("vdrep_test_sent_total 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
