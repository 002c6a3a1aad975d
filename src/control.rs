//! Local control socket between the `vdrep` CLI and a running mount daemon.
//!
//! One Unix stream socket per mounted folder, at
//! `$VDREP_RUN_DIR/<xxh3 of the folder's canonical path>.sock` (default run
//! dir `/run/vdrep` for root, else `$XDG_RUNTIME_DIR/vdrep`, else
//! `/tmp/vdrep-<uid>`). The socket lives outside the folder because a socket
//! under the mount point would be hidden by the mount itself. Protocol: one
//! JSON request line, one JSON response line; the socket is mode 0600.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tracking::{CutReport, TrackerStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Flush the kernel cache, seal a cycle of every disk, write the logs.
    Cut,
    Status,
    /// Unmount (lazily if `lazy`) and stop after saving state.
    Shutdown {
        lazy: bool,
    },
    /// Start protecting a VM (checks prerequisites first).
    Protect {
        spec: crate::sender::ProtectSpec,
    },
    Unprotect {
        vm: String,
    },
    /// Cut now and wait until the receiver applied it (all VMs if `None`).
    Sync {
        vm: Option<String>,
        timeout_secs: u64,
    },
    /// Fence (`on`) or unfence a protected VM's disks for a planned
    /// failover; answers with what the failover needs ([`FenceReport`]).
    Fence {
        vm: String,
        on: bool,
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
    /// Disks moved out by [`Request::Release`]: (name, new path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Vec<(String, PathBuf)>>,
}

impl Response {
    pub fn err(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no vdrep mount is running for {dir} (no control socket at {sock}): mount it with `vdrep mount {dir}`")]
    NotRunning { dir: String, sock: String },
    #[error("talking to the vdrep daemon for {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("the vdrep daemon for {dir} sent an unreadable answer: {msg}")]
    Protocol { dir: String, msg: String },
}

/// Folder holding the control sockets.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VDREP_RUN_DIR") {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/vdrep");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("vdrep");
    }
    PathBuf::from(format!("/tmp/vdrep-{}", nix::unistd::geteuid()))
}

/// Control socket of the mount over `canonical_dir`.
pub fn socket_path(canonical_dir: &Path) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(canonical_dir.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{h:016x}.sock"))
}

/// Send one request to the daemon for `dir` (any path naming the folder).
pub fn call(dir: &Path, req: &Request) -> Result<Response, ControlError> {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let d = canon.display().to_string();
    let sock = socket_path(&canon);
    let mut s = UnixStream::connect(&sock).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotRunning {
            dir: d.clone(),
            sock: sock.display().to_string(),
        },
        _ => ControlError::Io {
            dir: d.clone(),
            source: e,
        },
    })?;
    let io_err = |e| ControlError::Io {
        dir: d.clone(),
        source: e,
    };
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol {
        dir: d.clone(),
        msg: e.to_string(),
    })?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io_err)?;
    let mut r = BufReader::new(s);
    let mut resp = String::new();
    r.read_line(&mut resp).map_err(|e| ControlError::Io {
        dir: d.clone(),
        source: e,
    })?;
    if resp.is_empty() {
        return Err(ControlError::Protocol {
            dir: d,
            msg: "connection closed without an answer (did the daemon die? see .vdrep/daemon.log)"
                .into(),
        });
    }
    serde_json::from_str(&resp).map_err(|e| ControlError::Protocol {
        dir: d,
        msg: e.to_string(),
    })
}

/// Canonical folders of every running mount (one per live control socket).
pub fn running_mounts() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "sock") {
            if let Ok(s) = std::fs::read_to_string(p.with_extension("dir")) {
                let dir = PathBuf::from(s.trim_end());
                if socket_path(&dir) == p && UnixStream::connect(&p).is_ok() {
                    out.push(dir);
                }
            }
        }
    }
    out.sort();
    out
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

/// Read one request line from a connection (bounded to 64 KiB).
pub fn read_request(s: &UnixStream) -> io::Result<Request> {
    let mut r = BufReader::new(std::io::Read::take(s, 64 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn write_response(mut s: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())
}
