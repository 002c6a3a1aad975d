//! Where a replication cycle's time goes: one `debug` event per phase of a
//! cycle (target `vdrep::cycle_time`, fields `phase`, `who`, `ms`), off
//! unless the log filter asks for it
//! (`VDREP_LOG=info,vdrep::cycle_time=debug`). `scripts/bench-replication.sh`
//! (`PHASES=1`) aggregates them with `benches/replication/phase-times.py`.
//! Also the steps of a VM's start, from `protect` to its first point
//! ([`step`], target `vdrep::copy_time`).

use std::time::Instant;

/// Whether phase events are recorded (check before costly bookkeeping).
pub fn enabled() -> bool {
    tracing::enabled!(target: "vdrep::cycle_time", tracing::Level::DEBUG)
}

/// Phase `phase` of `who` (a VM or disk) took from `since` to now.
pub fn done(phase: &'static str, who: &str, since: Instant) {
    tracing::debug!(
        target: "vdrep::cycle_time",
        phase,
        who,
        ms = since.elapsed().as_secs_f64() * 1e3
    );
}

/// Phase `phase` of `who` took `ms` milliseconds.
pub fn took(phase: &'static str, who: &str, ms: f64) {
    tracing::debug!(target: "vdrep::cycle_time", phase, who, ms);
}

/// A step of protecting a VM, from the `protect` request to its first
/// point (target `vdrep::copy_time`, fields `step`, `who`), off unless the
/// log filter asks for it (`VDREP_LOG=info,vdrep::copy_time=debug`): the
/// log line's timestamp is the moment. `scripts/bench-wan.sh` puts the
/// steps of both ends on one time-line (`kernel-notes/wan.md`, round 8b).
pub fn step(step: &'static str, who: &str) {
    tracing::debug!(target: "vdrep::copy_time", step, who);
}
