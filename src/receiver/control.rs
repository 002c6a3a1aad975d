//! Local control socket between the `vdrep` CLI and a running receiver.
//!
//! The receiver owns its store exclusively (a `flock`), so every command at
//! the secondary site that needs the store (`vdrep points`, `vdrep
//! failover`) asks the running receiver over this socket. One Unix stream
//! socket per store, at `$VDREP_RUN_DIR/recv-<xxh3 of the store's canonical
//! path>.sock` (run dir as in [`crate::control::run_dir`]), mode 0600, with
//! a `.dir` file next to it naming the store. Protocol: one JSON request
//! line ([`Request`], tagged by `op`), one JSON response line
//! ([`Response`]).
//!
//! Adding a request: a variant in [`Request`], optional fields in
//! [`Response`] (all `#[serde(default)]`, so old clients keep parsing), and
//! a match arm in [`Server::handle`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::failover::{self, PointSel, ViewInfo, Views};
use crate::replica::{self, Point};

/// A request to the receiver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is a receiver serving this store? (Answers with its pid and store.)
    Ping,
    /// The recovery points of a VM (oldest first), with pins.
    Points { site: Option<String>, vm: String },
    /// Expose a point of a VM as VHD files (test failover).
    FailoverTest {
        site: Option<String>,
        vm: String,
        point: PointSel,
        /// Mount the view here instead of `STORE/failover/<site>/<vm>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<PathBuf>,
    },
    /// Remove a VM's test failover (stop its test VM, unmount, delete the
    /// scratch overlay, unpin the point).
    FailoverCleanup { site: Option<String>, vm: String },
    /// The running test failovers.
    FailoverList,
    /// Take live disks into the store as the replica of `site`'s VM
    /// (planned failover / reverse at the old primary; see [`crate::roles`]).
    Adopt(crate::roles::Adoption),
    /// Unplanned failover: make `point` (newest if `None`) of the VM its
    /// live disks here, mounted and tracked.
    Promote {
        site: Option<String>,
        vm: String,
        point: Option<u64>,
    },
    /// Make a failover final (drops the history from before it).
    CommitFailover { site: Option<String>, vm: String },
    /// Cancel an uncommitted failover: the replica and its points come
    /// back exactly as before it ([`crate::roles::cancel_local`]).
    CancelFailover { site: Option<String>, vm: String },
}

/// One recovery point as listed by `vdrep points`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointInfo {
    #[serde(flatten)]
    pub point: Point,
    /// Exposed by a test failover (prune keeps it).
    #[serde(default)]
    pub pinned: bool,
}

/// The receiver's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// The site a request about a VM resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<PointInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<ViewInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<Vec<ViewInfo>>,
    /// Where a failed-over VM is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<replica::LiveInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<Point>,
    /// What a cancelled failover restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<crate::roles::CancelReport>,
    /// Things the operator should know although the request succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Response {
    pub fn err(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
    fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecvControlError {
    #[error("no receiver is running for the store {store} (no control socket at {sock}): start `vdrep receive --store {store} ...` first")]
    NotRunning { store: String, sock: String },
    #[error("talking to the receiver of {store}: {source}")]
    Io {
        store: String,
        #[source]
        source: io::Error,
    },
    #[error("the receiver of {store} sent an unreadable answer: {msg}")]
    Protocol { store: String, msg: String },
}

/// Control socket of the receiver serving the store at `canonical_store`.
pub fn socket_path(canonical_store: &Path) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(canonical_store.as_os_str().as_encoded_bytes());
    crate::control::run_dir().join(format!("recv-{h:016x}.sock"))
}

/// Send one request to the receiver of `store` (any path naming it).
pub fn call(store: &Path, req: &Request) -> Result<Response, RecvControlError> {
    let canon = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let d = canon.display().to_string();
    let sock = socket_path(&canon);
    let s = UnixStream::connect(&sock).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            RecvControlError::NotRunning {
                store: d.clone(),
                sock: sock.display().to_string(),
            }
        }
        _ => RecvControlError::Io {
            store: d.clone(),
            source: e,
        },
    })?;
    let io_err = |e| RecvControlError::Io {
        store: d.clone(),
        source: e,
    };
    let mut line = serde_json::to_string(req).map_err(|e| RecvControlError::Protocol {
        store: d.clone(),
        msg: e.to_string(),
    })?;
    line.push('\n');
    (&s).write_all(line.as_bytes()).map_err(io_err)?;
    let mut r = BufReader::new(&s);
    let mut resp = String::new();
    r.read_line(&mut resp).map_err(io_err)?;
    if resp.is_empty() {
        return Err(RecvControlError::Protocol {
            store: d,
            msg: "connection closed without an answer (did the receiver die? see its log)".into(),
        });
    }
    serde_json::from_str(&resp).map_err(|e| RecvControlError::Protocol {
        store: d,
        msg: e.to_string(),
    })
}

/// The control server of a running receiver.
pub struct Server {
    store: Arc<replica::Store>,
    views: Arc<Views>,
    roles: Arc<crate::roles::ReceiverCtx>,
}

/// Bind the control socket of `store` and serve it on a background thread.
/// Fails if another live receiver answers on it.
pub fn start(
    store: Arc<replica::Store>,
    views: Arc<Views>,
    roles: Arc<crate::roles::ReceiverCtx>,
) -> io::Result<PathBuf> {
    let root = store.root().to_path_buf();
    let sock = socket_path(&root);
    if let Some(p) = sock.parent() {
        std::fs::create_dir_all(p)?;
    }
    if UnixStream::connect(&sock).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another receiver answers on {} for the store {}",
                sock.display(),
                root.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let _ = std::fs::write(sock.with_extension("dir"), format!("{}\n", root.display()));
    let srv = Arc::new(Server {
        store,
        views,
        roles,
    });
    std::thread::Builder::new()
        .name("vdrep-recv-ctl".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let srv = srv.clone();
                let _ = std::thread::Builder::new()
                    .name("vdrep-recv-ctl-conn".into())
                    .spawn(move || {
                        let resp = match read_request(&conn) {
                            Err(e) => Response::err(format!("bad request: {e}")),
                            Ok(req) => srv.handle(req),
                        };
                        let _ = write_response(&conn, &resp);
                    });
            }
        })?;
    Ok(sock)
}

fn read_request(s: &UnixStream) -> io::Result<Request> {
    let mut r = BufReader::new(std::io::Read::take(s, 64 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_response(mut s: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())
}

impl Server {
    /// A role change of `vm` is refused while a test failover of it runs.
    fn refuse_if_test_failover(&self, site: &str, vm: &str) -> Option<Response> {
        self.views
            .list()
            .iter()
            .any(|v| v.site == site && v.vm == vm)
            .then(|| {
                Response::err(format!(
                    "{vm} has a test failover running: remove it first (`vdrep failover {vm} --cleanup`)"
                ))
            })
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response {
                pid: Some(std::process::id()),
                store: Some(self.store.root().to_path_buf()),
                ..Response::ok()
            },
            Request::Points { site, vm } => {
                let site = match failover::resolve_site(&self.store, site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(e) => return Response::err(e),
                };
                let pts = self
                    .store
                    .site(&site)
                    .and_then(|s| s.points(&vm))
                    .map_err(|e| e.to_string());
                match pts {
                    Err(e) => Response::err(e),
                    Ok(pts) => {
                        let pins = self.store.pins(&site, &vm);
                        Response {
                            points: Some(
                                pts.into_iter()
                                    .map(|p| PointInfo {
                                        pinned: pins.contains(&p.cycle),
                                        point: p,
                                    })
                                    .collect(),
                            ),
                            site: Some(site),
                            ..Response::ok()
                        }
                    }
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
                let site = match failover::resolve_site(&self.store, site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(e) => return Response::err(e),
                };
                if let Some(r) = self.refuse_if_test_failover(&site, &vm) {
                    return r;
                }
                match crate::roles::promote_local(&self.roles, &site, &vm, point, None) {
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
                let site = match failover::resolve_site(&self.store, site.as_deref(), &vm) {
                    Ok(s) => s,
                    Err(e) => return Response::err(e),
                };
                if let Some(r) = self.refuse_if_test_failover(&site, &vm) {
                    return r;
                }
                match crate::roles::cancel_local(&self.roles, &site, &vm) {
                    Ok(r) => Response {
                        site: Some(site),
                        cancel: Some(r),
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
            Request::CommitFailover { site, vm } => {
                let site = match failover::resolve_site(&self.store, site.as_deref(), &vm) {
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
