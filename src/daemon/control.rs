//! The mount daemon's control protocol: its requests and answers, and the
//! typed client the CLI and the role changes use to talk to a running
//! mount ([`call`], [`call_ok`]).
//!
//! One socket per mounted folder, at `<run dir>/<xxh3 of the folder's
//! canonical path>.sock` ([`crate::ipc::run_dir`]). The socket lives outside
//! the folder because a socket under the mount point would be hidden by the
//! mount itself. Transport: [`crate::ipc`] (one JSON request line, one JSON
//! response line).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ipc::{CallError, Server};
use crate::tracking::{CutReport, TrackerStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Flush the kernel cache, seal a cycle of every disk, write the logs.
    Cut,
    Status,
    /// The events after `after` (a sequence number; 0: every event still
    /// kept); with none yet, wait up to `wait_secs` (at most
    /// [`crate::events::MAX_WAIT_SECS`]) for one: `vdrep events --follow`
    /// polls.
    Events {
        #[serde(default)]
        after: u64,
        #[serde(default)]
        wait_secs: u64,
    },
    /// Unmount (lazily if `lazy`) and stop after saving state.
    Shutdown {
        lazy: bool,
    },
    /// Re-read the configuration file and converge the protections on it
    /// (refused, changing nothing, if the file has problems).
    Reload,
    /// Start protecting a VM (checks prerequisites first).
    Protect {
        spec: Box<crate::sender::ProtectSpec>,
    },
    Unprotect {
        vm: String,
    },
    /// Cut now and wait until the receiver committed its point (all VMs if `None`).
    Sync {
        vm: Option<String>,
        timeout_secs: u64,
    },
    /// Fence (`on`) or unfence a protected VM's disks for a planned
    /// failover; answers with what the failover needs ([`FenceReport`]).
    /// With `peek`, nothing changes: only the report (a planned failover
    /// asks the other site with it before it stops anything).
    Fence {
        vm: String,
        on: bool,
        #[serde(default)]
        peek: bool,
    },
    /// Resync a VM's disks by checksums now; wait unless `background`.
    Resync {
        vm: String,
        background: bool,
        timeout_secs: u64,
    },
    /// Compare a VM's disks with the receiver's newest point (no data sent).
    Verify {
        vm: String,
        timeout_secs: u64,
    },
    /// Planned failover of one VM of a folder holding several: move the
    /// fenced VM's disks (closed) out of the folder into `to` and stop
    /// tracking them; the other VMs keep running.
    Release {
        vm: String,
        /// The VM's disks (paths relative to the folder), all fenced.
        disks: Vec<String>,
        to: PathBuf,
    },
    /// Failback into a running mount: move each staged file into the
    /// folder as a tracked disk seeded at `cycle`.
    Take {
        disks: Vec<TakeDisk>,
    },
    /// A failover was committed: stop saving pre-images of these disks
    /// (paths relative to the folder) and delete their journals.
    DropPreimages {
        disks: Vec<String>,
    },
    /// Hand the mount over to a new worker process (the binary now at the
    /// same path): the worker saves its state cleanly and exits, and the
    /// supervisor starts the next one at once. VMs keep running.
    Restart,
}

/// The worker process serving a supervised mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerStatus {
    pub pid: u32,
    /// `vdrep --version` of the worker's binary.
    pub version: String,
    /// Workers the supervisor started before this one.
    pub restarts: u32,
    pub supervisor_pid: u32,
    /// The worker's executable file as `DEV:INODE` (a binary replaced at
    /// the same path shows a new one after `vdrep restart`).
    #[serde(default)]
    pub binary: String,
    /// How FUSE requests reach this worker (`uring` only while its rings
    /// serve; a fallback to `/dev/fuse` shows `dev`).
    #[serde(default)]
    pub transport: crate::fuse::FuseTransport,
}

/// One disk for [`Request::Take`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeDisk {
    /// Where the file is now (same file system as the folder).
    pub from: PathBuf,
    /// Its path relative to the folder.
    pub name: String,
    /// Identity (hex).
    pub id: String,
    /// The cycle the other site's replica holds.
    pub cycle: u64,
}

/// A fenced VM: its protection, this mount's identity and disks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceReport {
    pub spec: crate::sender::ProtectSpec,
    /// The mount's identity folder (`vdrep mount --keys`).
    pub keys: Option<PathBuf>,
    /// The mount's tracking block size.
    pub block_size: u32,
    /// Every disk tracked under the mount (not only the VM's).
    pub mount_disks: Vec<String>,
    /// The VM's disks: (name, id hex, last sealed cycle).
    pub disks: Vec<(String, String, u64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TrackerStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Vec<crate::sender::VmStatus>>,
    /// Things the operator should know although the request succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// VM -> recovery point reached by a sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced: Option<Vec<(String, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceReport>,
    /// What a finished resync did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<crate::sender::ResyncProgress>,
    /// What a verify found, per disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Vec<crate::sender::VerifyDisk>>,
    /// Bandwidth limit in force per protected VM (with its schedule), for
    /// [`Request::Status`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rates: Option<std::collections::BTreeMap<String, super::reload::RateNow>>,
    /// What a [`Request::Reload`] changed, one line per VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Vec<String>>,
    /// Disks moved out by [`Request::Release`]: (name, new path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Vec<(String, PathBuf)>>,
    /// The worker process (status, restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerStatus>,
    /// The answer to [`Request::Events`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<crate::events::Since>,
}

crate::ipc::ok_error_answer!(Response);

/// Control socket of the mount over `canonical_dir`.
pub fn socket_path(canonical_dir: &Path) -> PathBuf {
    crate::ipc::mount_socket(canonical_dir)
}

/// Send one request to the daemon for `dir` (any path naming the folder).
pub fn call(dir: &Path, req: &Request) -> Result<Response, CallError> {
    let canon = crate::fuse::fusectl::resolve_mount_point(dir);
    let server = Server::Mount {
        dir: canon.display().to_string(),
    };
    crate::ipc::call(&socket_path(&canon), req).map_err(|e| CallError::of(server, e))
}

/// [`call`], with an answer that is not `ok` as [`CallError::Refused`]
/// (its reason, or `failed`).
pub fn call_ok(dir: &Path, req: &Request) -> Result<Response, CallError> {
    let canon = crate::fuse::fusectl::resolve_mount_point(dir);
    let server = Server::Mount {
        dir: canon.display().to_string(),
    };
    crate::ipc::call_ok(server, &socket_path(&canon), req)
}

/// Is `dir` mounted by a running vdrep daemon (does it answer)?
pub fn is_mounted(dir: &Path) -> bool {
    call(dir, &Request::Status).is_ok()
}

/// Canonical folders of every running mount (one per live control socket).
pub fn running_mounts() -> Vec<PathBuf> {
    crate::ipc::live_servers("", socket_path)
}

/// The running mount that contains `path` (a file or folder under it).
pub fn mount_of(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let canon = std::fs::canonicalize(path).ok()?;
    let mut cur = canon.as_path();
    loop {
        if socket_path(cur).exists() {
            let rel = canon.strip_prefix(cur).ok()?.to_path_buf();
            return Some((cur.to_path_buf(), rel));
        }
        cur = cur.parent()?;
    }
}

/// The running mount protecting VM `vm` (the first, in folder order).
pub fn mount_of_vm(vm: &str) -> Option<PathBuf> {
    running_mounts().into_iter().find(|m| protects(m, vm))
}

/// Does the running mount at `dir` protect VM `vm`?
pub fn protects(dir: &Path, vm: &str) -> bool {
    call(dir, &Request::Status)
        .ok()
        .and_then(|r| r.replication)
        .is_some_and(|v| v.iter().any(|s| s.vm == vm))
}
