//! The control server of a running receiver: answers the requests of
//! [`super::control`] by calling the test-failover views
//! ([`crate::testview`]), the role changes ([`crate::roles`]) and the store.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::control::{socket_path, PointInfo, Request, Response};
use crate::replica;
use crate::testview::{self, Views};

/// The control server of a running receiver.
pub struct Server {
    store: Arc<replica::Store>,
    views: Arc<Views>,
    roles: Arc<crate::roles::ReceiverCtx>,
    /// The receiver's events (failover steps).
    events: Arc<crate::events::Bus>,
}

/// Bind the control socket of `store` and serve it on a background thread.
/// Fails if another live receiver answers on it.
pub fn start(
    store: Arc<replica::Store>,
    views: Arc<Views>,
    roles: Arc<crate::roles::ReceiverCtx>,
    events: Arc<crate::events::Bus>,
) -> io::Result<PathBuf> {
    let root = store.root().to_path_buf();
    let sock = socket_path(&root);
    if crate::ipc::listening(&sock) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another receiver answers on {} for the store {}",
                sock.display(),
                root.display()
            ),
        ));
    }
    let listener = crate::ipc::bind(&sock, &root)?;
    let srv = Server {
        store,
        views,
        roles,
        events,
    };
    crate::ipc::serve(
        listener,
        "vdrep-recv-ctl",
        None,
        move |req: io::Result<Request>| match req {
            Err(e) => Response::err(format!("bad request: {e}")),
            Ok(req) => {
                let step = super::events::step_of(&req);
                let resp = srv.handle(req);
                super::events::emit_step(&srv.events, step, &resp);
                resp
            }
        },
    )?;
    Ok(sock)
}

impl Server {
    /// The site of `vm` for a role change (or forgetting it), or the
    /// answer that refuses it: no such site, or a test failover of `vm`
    /// runs.
    fn site_for_change(&self, site: Option<&str>, vm: &str) -> Result<String, Box<Response>> {
        let refuse = |e: String| Box::new(Response::err(e));
        let site =
            testview::resolve_site(&self.store, site, vm).map_err(|e| refuse(e.to_string()))?;
        if self
            .views
            .list()
            .iter()
            .any(|v| v.site == site && v.vm == vm)
        {
            return Err(refuse(format!(
                "{vm} has a test failover running: remove it first (`vdrep failover {vm} --cleanup`)"
            )));
        }
        Ok(site)
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Events { after, wait_secs } => {
                super::events::answer(&self.events, after, wait_secs)
            }
            Request::Ping => Response {
                pid: Some(std::process::id()),
                store: Some(self.store.root().to_path_buf()),
                ..Response::ok()
            },
            Request::Points { site, vm } => {
                let site = match testview::resolve_site(&self.store, site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(e) => return Response::err(e),
                };
                let pins = self.store.pins(&site, &vm);
                let pts = self
                    .store
                    .site(&site)
                    .and_then(|s| PointInfo::list(&s, &vm, &pins))
                    .map_err(|e| e.to_string());
                match pts {
                    Err(e) => Response::err(e),
                    Ok(pts) => Response {
                        points: Some(pts),
                        site: Some(site),
                        ..Response::ok()
                    },
                }
            }
            Request::GroupPoints { site, group } => {
                match crate::replica::group::site_group_points(&self.store, site.as_deref(), &group)
                {
                    Err(e) => Response::err(e),
                    Ok((site, pts)) => Response {
                        group_points: Some(pts),
                        site: Some(site),
                        ..Response::ok()
                    },
                }
            }
            Request::FailoverTest {
                site,
                vm,
                point,
                at,
            } => match self
                .views
                .expose(&self.store, site.as_deref(), &vm, point, at)
            {
                Ok(v) => Response {
                    site: Some(v.site.clone()),
                    view: Some(v),
                    ..Response::ok()
                },
                Err(e) => Response::err(e),
            },
            Request::FailoverCleanup { site, vm } => {
                match self.views.cleanup(&self.store, site.as_deref(), &vm) {
                    Ok((v, warnings)) => Response {
                        site: Some(v.site.clone()),
                        view: Some(v),
                        warnings,
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
            Request::FailoverList => Response {
                views: Some(self.views.list()),
                ..Response::ok()
            },
            Request::Adopt(a) => match crate::roles::adopt_local(&self.store, &a) {
                Ok(p) => Response {
                    site: Some(a.site),
                    point: Some(p),
                    ..Response::ok()
                },
                Err(e) => Response::err(e),
            },
            Request::Promote { site, vm, point } => {
                let site = match self.site_for_change(site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(refused) => return *refused,
                };
                match crate::roles::promote_local(
                    &self.roles,
                    &site,
                    &vm,
                    point,
                    None,
                    (None, None),
                ) {
                    Ok(a) => Response {
                        site: Some(site),
                        live: a.live,
                        warnings: a.warnings,
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
            Request::CancelFailover { site, vm } => {
                let site = match self.site_for_change(site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(refused) => return *refused,
                };
                match crate::roles::cancel_local(&self.roles, &site, &vm) {
                    Ok(r) => Response {
                        site: Some(site),
                        cancel: Some(r),
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
            Request::Forget { site, vm } => {
                let site = match self.site_for_change(site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(refused) => return *refused,
                };
                match replica::ReplicaStore::forget(self.store.as_ref(), &site, &vm) {
                    Ok(f) => {
                        tracing::info!("forgot {site}/{vm}: {f:?}");
                        Response {
                            site: Some(site),
                            forgot: Some(f),
                            ..Response::ok()
                        }
                    }
                    Err(e) => Response::err(e),
                }
            }
            Request::CommitFailover { site, vm } => {
                let site = match testview::resolve_site(&self.store, site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(e) => return Response::err(e),
                };
                match self.store.site(&site).and_then(|s| s.commit_failover(&vm)) {
                    Ok(l) => Response {
                        site: Some(site),
                        live: Some(l),
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
        }
    }
}
