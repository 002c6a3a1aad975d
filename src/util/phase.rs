//! Where a replication cycle's time goes: one `debug` event per phase of a
//! cycle (target `vdrep::cycle_time`, fields `phase`, `who`, `ms`), off
//! unless the log filter asks for it
//! (`VDREP_LOG=info,vdrep::cycle_time=debug`). `scripts/bench-replication.sh`
//! (`PHASES=1`) aggregates them with `benches/replication/phase-times.py`.

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
