//! FUSE request metrics: a count and a latency histogram per operation.
//!
//! The file system's handlers start an [`OpTimer`] with [`time`]; dropping
//! it records the request. The counters are a process-wide static of
//! atomics (one mount per daemon process), so the hot path takes no lock
//! and allocates nothing: one `Instant::now()` at each end, two atomic adds.
//! Data requests (write, fsync, fallocate) answered with an error are
//! counted too ([`failed`]): the VM saw an I/O error from vdrep. With the
//! io_uring transport, the backing writes submitted on a ring thread's
//! io_uring rather than written on the thread are counted ([`ring_write`]),
//! and so are the WRITEs written from their splice pipe ([`spliced_write`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, histogram, Histogram, Labels, Unit};

/// The FUSE operations that are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseOp {
    Lookup,
    Getattr,
    Setattr,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Create,
    Readdir,
    Unlink,
    Rename,
    Fallocate,
    Statfs,
}

impl FuseOp {
    /// Every operation, in label order.
    pub const ALL: [FuseOp; 15] = [
        FuseOp::Lookup,
        FuseOp::Getattr,
        FuseOp::Setattr,
        FuseOp::Open,
        FuseOp::Read,
        FuseOp::Write,
        FuseOp::Flush,
        FuseOp::Release,
        FuseOp::Fsync,
        FuseOp::Create,
        FuseOp::Readdir,
        FuseOp::Unlink,
        FuseOp::Rename,
        FuseOp::Fallocate,
        FuseOp::Statfs,
    ];

    /// The `op` label.
    pub fn name(self) -> &'static str {
        match self {
            FuseOp::Lookup => "lookup",
            FuseOp::Getattr => "getattr",
            FuseOp::Setattr => "setattr",
            FuseOp::Open => "open",
            FuseOp::Read => "read",
            FuseOp::Write => "write",
            FuseOp::Flush => "flush",
            FuseOp::Release => "release",
            FuseOp::Fsync => "fsync",
            FuseOp::Create => "create",
            FuseOp::Readdir => "readdir",
            FuseOp::Unlink => "unlink",
            FuseOp::Rename => "rename",
            FuseOp::Fallocate => "fallocate",
            FuseOp::Statfs => "statfs",
        }
    }
}

/// One histogram per [`FuseOp`], indexed by its discriminant.
static OPS: [Histogram; FuseOp::ALL.len()] = [const { Histogram::latency() }; FuseOp::ALL.len()];

/// Requests answered with an error, per [`FuseOp`] (by discriminant).
static FAILED: [AtomicU64; FuseOp::ALL.len()] = [const { AtomicU64::new(0) }; FuseOp::ALL.len()];

/// Count one request of `op` answered with an error; the total so far.
pub fn failed(op: FuseOp) -> u64 {
    FAILED
        .get(op as usize)
        .map(|c| c.fetch_add(1, Ordering::Relaxed) + 1)
        .unwrap_or(0)
}

/// `O_DIRECT` backing writes submitted on a FUSE ring thread's io_uring.
static RING_WRITES: AtomicU64 = AtomicU64::new(0);

/// Count one backing write submitted on a ring thread's io_uring (the
/// others are written synchronously on the serving thread).
pub fn ring_write() {
    RING_WRITES.fetch_add(1, Ordering::Relaxed);
}

/// WRITEs whose data went from the FUSE request's pipe to the backing
/// file with `splice(2)` (not copied through a request buffer).
static SPLICED_WRITES: AtomicU64 = AtomicU64::new(0);

/// Count one WRITE served from its splice pipe.
pub fn spliced_write() {
    SPLICED_WRITES.fetch_add(1, Ordering::Relaxed);
}

/// Records one request of `op` when dropped.
#[must_use = "the request is recorded when the timer is dropped"]
pub struct OpTimer {
    op: FuseOp,
    start: Instant,
}

/// Start timing a request of `op`.
#[inline]
pub fn time(op: FuseOp) -> OpTimer {
    OpTimer {
        op,
        start: Instant::now(),
    }
}

impl Drop for OpTimer {
    #[inline]
    fn drop(&mut self) {
        if let Some(h) = OPS.get(self.op as usize) {
            h.observe(self.start.elapsed());
        }
    }
}

/// Encode `vdrep_fuse_requests_total{op}`,
/// `vdrep_fuse_request_errors_total{op}`,
/// `vdrep_fuse_ring_writes_total`, `vdrep_fuse_spliced_writes_total` and
/// `vdrep_fuse_request_duration_seconds{op}`.
pub fn encode(enc: &mut DescriptorEncoder) -> fmt::Result {
    let snaps: Vec<(Labels, super::HistogramSnapshot)> = FuseOp::ALL
        .iter()
        .zip(OPS.iter())
        .map(|(op, h)| (vec![("op", op.name().to_string())], h.snapshot()))
        .collect();
    counter(
        enc,
        "vdrep_fuse_requests",
        "FUSE requests answered, by operation",
        None,
        snaps.iter().map(|(l, s)| (l.clone(), s.count)),
    )?;
    counter(
        enc,
        "vdrep_fuse_request_errors",
        "Data requests (write, fsync, fallocate) answered with an error: the application or VM saw an I/O error",
        None,
        FuseOp::ALL
            .iter()
            .zip(FAILED.iter())
            .filter(|(op, _)| matches!(op, FuseOp::Write | FuseOp::Fsync | FuseOp::Fallocate))
            .map(|(op, c)| (vec![("op", op.name().to_string())], c.load(Ordering::Relaxed))),
    )?;
    counter(
        enc,
        "vdrep_fuse_ring_writes",
        "O_DIRECT backing writes submitted on a FUSE ring thread's io_uring (transport uring); the other writes were written on the serving thread",
        None,
        [(Labels::new(), RING_WRITES.load(Ordering::Relaxed))],
    )?;
    counter(
        enc,
        "vdrep_fuse_spliced_writes",
        "WRITE requests whose data went from the kernel to the backing file through a pipe (splice), without a copy through the daemon's memory",
        None,
        [(Labels::new(), SPLICED_WRITES.load(Ordering::Relaxed))],
    )?;
    histogram(
        enc,
        "vdrep_fuse_request_duration",
        "Time to answer a FUSE request, by operation",
        Some(&Unit::Seconds),
        snaps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_timer_counts_its_operation() {
        let before = OPS[FuseOp::Statfs as usize].snapshot().count;
        drop(time(FuseOp::Statfs));
        assert_eq!(OPS[FuseOp::Statfs as usize].snapshot().count, before + 1);
        for (i, op) in FuseOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "ALL is in discriminant order");
        }
    }
}
