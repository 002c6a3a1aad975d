//! The receiver's events: the failover steps its control server takes
//! (test failover started and cleaned up, promote, cancel, commit, adopt),
//! on the receiver's [`Bus`], for `vdrep events --store` and the
//! receiver's `notify_command`.

use std::time::Duration;

use super::control::{Request, Response};
use crate::events::MAX_WAIT_SECS;
use crate::events::{Bus, EventKind, FailoverStep};

/// The step `req` takes if it succeeds: (site as asked, VM, step).
pub(super) fn step_of(req: &Request) -> Option<(Option<String>, String, FailoverStep)> {
    let (site, vm, step) = match req {
        Request::FailoverTest { site, vm, .. } => (site.clone(), vm, FailoverStep::TestStarted),
        Request::FailoverCleanup { site, vm } => (site.clone(), vm, FailoverStep::TestCleanedUp),
        Request::Promote { site, vm, .. } => (site.clone(), vm, FailoverStep::Promoted),
        Request::CancelFailover { site, vm } => (site.clone(), vm, FailoverStep::Cancelled),
        Request::CommitFailover { site, vm } => (site.clone(), vm, FailoverStep::Committed),
        Request::Adopt(a) => (Some(a.site.clone()), &a.vm, FailoverStep::Adopted),
        Request::Forget { site, vm } => (site.clone(), vm, FailoverStep::Forgotten),
        Request::Ping
        | Request::Points { .. }
        | Request::GroupPoints { .. }
        | Request::FailoverList
        | Request::Events { .. } => return None,
    };
    Some((site, vm.clone(), step))
}

/// Emit `step` if `resp` says it was taken (the site the receiver
/// resolved, when it says).
pub(super) fn emit_step(
    bus: &Bus,
    step: Option<(Option<String>, String, FailoverStep)>,
    resp: &Response,
) {
    let Some((site, vm, step)) = step else { return };
    if !resp.ok {
        return;
    }
    bus.emit(
        Some(&vm),
        EventKind::FailoverStep {
            step,
            disks: Vec::new(),
            site: resp.site.clone().or(site),
        },
    );
}

/// The answer to [`Request::Events`].
pub(super) fn answer(bus: &Bus, after: u64, wait_secs: u64) -> Response {
    Response {
        events: Some(bus.since(after, Duration::from_secs(wait_secs.min(MAX_WAIT_SECS)))),
        ..Response::ok()
    }
}
