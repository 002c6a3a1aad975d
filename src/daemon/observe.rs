//! What the mount daemon shows of itself beyond its control answers: the
//! metrics endpoint (`metrics_listen`), the `notify_command` runner, and
//! the events of the failover steps its control requests take.

use std::path::Path;
use std::sync::Arc;

use super::control::{Request, Response};
use super::{ioe, DaemonError, MountOptions};

/// The `notify_command` runner and the metrics endpoint, if configured.
pub(super) fn start(
    dir: &Path,
    opts: &MountOptions,
    rep: &Arc<crate::sender::Replicator>,
) -> Result<(), DaemonError> {
    if let Some(spec) = &opts.notify {
        crate::events::notify::start(rep.events(), spec.clone())
            .map_err(ioe(dir, "cannot start the notify_command thread"))?;
    }
    if let Some(addr) = opts.metrics_listen {
        let mut registry = crate::metrics::Registry::default();
        crate::sender::metrics::register(&mut registry, rep.clone());
        let srv = crate::metrics::serve(addr, registry, "vdrep-metrics").map_err(|e| {
            DaemonError::Msg(format!(
                "cannot serve metrics on {addr} (metrics_listen): {e}"
            ))
        })?;
        tracing::info!("metrics on http://{}/metrics", srv.addr);
    }
    Ok(())
}

/// The event of a failover step a request took here (the primary's side
/// of a planned failover, a failback, a commit), if it succeeded.
pub(super) fn failover_event(req: &Request, resp: &Response, rep: &crate::sender::Replicator) {
    use crate::events::{EventKind, FailoverStep};
    if !resp.ok {
        return;
    }
    let (vm, step, disks) = match req {
        Request::Fence { peek: true, .. } => return,
        Request::Fence { vm, on, .. } => (
            Some(vm.as_str()),
            if *on {
                FailoverStep::Fenced
            } else {
                FailoverStep::Unfenced
            },
            resp.fence
                .as_ref()
                .map(|f| f.spec.disks.clone())
                .unwrap_or_default(),
        ),
        Request::Release { vm, disks, .. } => {
            (Some(vm.as_str()), FailoverStep::Released, disks.clone())
        }
        Request::Take { disks } => (
            None,
            FailoverStep::Taken,
            disks.iter().map(|d| d.name.clone()).collect(),
        ),
        Request::DropPreimages { disks } => (None, FailoverStep::Committed, disks.clone()),
        _ => return,
    };
    rep.events().emit(
        vm,
        EventKind::FailoverStep {
            step,
            disks,
            site: None,
        },
    );
}
