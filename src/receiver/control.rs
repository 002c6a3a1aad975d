//! The receiver's control protocol: its requests and answers, and the
//! typed client that the CLI and the failover procedures use to talk to a
//! running receiver ([`call`], [`call_ok`]). The server is
//! [`super::control_server`].
//!
//! The receiver owns its store exclusively (a `flock`), so every command at
//! the secondary site that needs the store (`vdrep points`, `vdrep
//! failover`) asks the running receiver over this socket. One Unix stream
//! socket per store, at `$VDREP_RUN_DIR/recv-<xxh3 of the store's canonical
//! path>.sock` (run dir as in [`crate::ipc::run_dir`]), mode 0600, with
//! a `.dir` file next to it naming the store. Transport: [`crate::ipc`],
//! one JSON request line ([`Request`], tagged by `op`), one JSON response
//! line ([`Response`]).
//!
//! Adding a request: a variant in [`Request`], optional fields in
//! [`Response`] (all `#[serde(default)]`, so old clients keep parsing), and
//! a match arm in the server's `handle` ([`super::control_server`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ipc::{CallError, Server};
use crate::replica::{self, Point};
use crate::testview::{PointSel, ViewInfo};

/// A request to the receiver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is a receiver serving this store? (Answers with its pid and store.)
    Ping,
    /// The recovery points of a VM (oldest first), with pins.
    Points { site: Option<String>, vm: String },
    /// The group points of a consistency group (oldest first).
    GroupPoints { site: Option<String>, group: String },
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
    /// Delete a VM's replica and history (`vdrep forget`).
    Forget { site: Option<String>, vm: String },
    /// The receiver's events after `after` (0: all kept); with none yet,
    /// wait up to `wait_secs` (at most
    /// [`crate::events::MAX_WAIT_SECS`]) for one.
    Events {
        #[serde(default)]
        after: u64,
        #[serde(default)]
        wait_secs: u64,
    },
}

/// One recovery point as listed by `vdrep points`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointInfo {
    #[serde(flatten)]
    pub point: Point,
    /// Exposed by a test failover (prune keeps it).
    #[serde(default)]
    pub pinned: bool,
    /// The VM's libvirt domain definition as of the point (XML), if it
    /// was protected as a domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Every disk of the point holds it in its replica. `false`: the point
    /// is committed on logs durable here that are still being applied (a
    /// failover to it applies them first; see SEMANTICS.md, commit before
    /// apply). A receiver that predates the field only listed applied
    /// points.
    #[serde(default = "applied_by_default")]
    pub applied: bool,
}

fn applied_by_default() -> bool {
    true
}

impl PointInfo {
    /// The points of `vm` at `site` (oldest first), pinned as `pins` say,
    /// each with its domain definition.
    pub fn list(
        site: &replica::Site<'_>,
        vm: &str,
        pins: &[u64],
    ) -> Result<Vec<PointInfo>, replica::StoreError> {
        let mut out = Vec::new();
        let points = site.points(vm)?;
        let applied = replica::applied_flags(&points, |hex| {
            let id = replica::parse_hex_id(hex)?;
            site.disk_state(vm, &id).ok()?.cycle
        });
        for (p, applied) in points.into_iter().zip(applied) {
            out.push(PointInfo {
                pinned: pins.contains(&p.cycle),
                definition: site.definition(vm, p.cycle)?,
                applied,
                point: p,
            });
        }
        Ok(out)
    }
}

/// The receiver's answer.
// Opens like `daemon::control::Response`: both are `ipc` answers (`ok`,
// `error`, see `ipc::ok_error_answer!`); the fields after differ.
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
    /// The answer to [`Request::GroupPoints`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_points: Option<Vec<replica::GroupPoint>>,
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
    /// What a forget deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgot: Option<replica::ForgetReport>,
    /// Things the operator should know although the request succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The answer to [`Request::Events`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<crate::events::Since>,
}

crate::ipc::ok_error_answer!(Response);

impl Response {
    pub(super) fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
}

/// Control socket of the receiver serving the store at `canonical_store`.
pub fn socket_path(canonical_store: &Path) -> PathBuf {
    crate::ipc::socket_in_run_dir("recv-", canonical_store)
}

fn server(store: &Path) -> (PathBuf, Server) {
    let canon = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let server = Server::Receiver {
        store: canon.display().to_string(),
    };
    (socket_path(&canon), server)
}

/// Send one request to the receiver of `store` (any path naming it).
pub fn call(store: &Path, req: &Request) -> Result<Response, CallError> {
    let (sock, server) = server(store);
    crate::ipc::call(&sock, req).map_err(|e| CallError::of(server, e))
}

/// [`call`], with an answer that is not `ok` as [`CallError::Refused`]
/// (its reason, or `failed`).
pub fn call_ok(store: &Path, req: &Request) -> Result<Response, CallError> {
    let (sock, server) = server(store);
    crate::ipc::call_ok(server, &sock, req)
}
