//! Local IPC: one JSON-line request/response exchange over a Unix stream
//! socket, generic over the message types (serde).
//!
//! Owns the transport of the local control sockets only: where they live
//! ([`run_dir`], [`socket_in_run_dir`], [`mount_socket`]), binding one ([`bind`]), serving it
//! ([`serve`]) and calling it ([`call`]). The messages belong to the
//! programs that serve them: the mount daemon's in
//! [`crate::daemon::control`], the receiver's in
//! [`crate::receiver::control`]. Each wraps [`IpcError`] into its own error
//! with the words its operator needs (which command starts the server).
//!
//! Protocol: the client writes one JSON request line; the server answers
//! with one JSON response line and the connection ends. Requests are
//! bounded to [`MAX_REQUEST`] bytes. Sockets are mode 0600, with a `.dir`
//! file next to each naming what it serves.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request line a server reads.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// What went wrong in a [`call`].
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// Nothing listens on the socket (no file, or a stale one).
    #[error("no server listens on {}", sock.display())]
    NotListening { sock: PathBuf },
    /// Connecting, writing or reading failed.
    #[error("{source}")]
    Io {
        sock: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server closed the connection without answering.
    #[error("connection closed without an answer")]
    Closed { sock: PathBuf },
    /// The request could not be encoded or the answer decoded.
    #[error("{msg}")]
    Protocol { sock: PathBuf, msg: String },
}

/// The kinds of [`IpcError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcErrorKind {
    NotListening,
    Io,
    Closed,
    Protocol,
}

impl IpcError {
    pub fn kind(&self) -> IpcErrorKind {
        match self {
            IpcError::NotListening { .. } => IpcErrorKind::NotListening,
            IpcError::Io { .. } => IpcErrorKind::Io,
            IpcError::Closed { .. } => IpcErrorKind::Closed,
            IpcError::Protocol { .. } => IpcErrorKind::Protocol,
        }
    }
}

/// Folder holding the control sockets: `$VDREP_RUN_DIR`, else `/run/vdrep`
/// for root, else `$XDG_RUNTIME_DIR/vdrep`, else `/tmp/vdrep-<uid>`.
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

/// `run_dir()/<prefix><xxh3 of canonical>.sock`: the socket of the server
/// of the folder `canonical` (a canonical path, so that every spelling of
/// it finds the same socket).
pub fn socket_in_run_dir(prefix: &str, canonical: &Path) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(canonical.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{prefix}{h:016x}.sock"))
}

/// The socket of the mount daemon over the folder `canonical_dir` (see
/// [`crate::daemon::control`]).
pub fn mount_socket(canonical_dir: &Path) -> PathBuf {
    socket_in_run_dir("", canonical_dir)
}

/// Does a server accept connections on `sock`?
pub fn listening(sock: &Path) -> bool {
    UnixStream::connect(sock).is_ok()
}

/// Send `req` to the server on `sock` and wait for its answer.
pub fn call<Req: Serialize, Resp: DeserializeOwned>(
    sock: &Path,
    req: &Req,
) -> Result<Resp, IpcError> {
    let io_err = |source| IpcError::Io {
        sock: sock.to_path_buf(),
        source,
    };
    let proto = |e: serde_json::Error| IpcError::Protocol {
        sock: sock.to_path_buf(),
        msg: e.to_string(),
    };
    let s = UnixStream::connect(sock).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => IpcError::NotListening {
            sock: sock.to_path_buf(),
        },
        _ => io_err(e),
    })?;
    let mut line = serde_json::to_string(req).map_err(proto)?;
    line.push('\n');
    (&s).write_all(line.as_bytes()).map_err(io_err)?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).map_err(io_err)?;
    if resp.is_empty() {
        return Err(IpcError::Closed {
            sock: sock.to_path_buf(),
        });
    }
    serde_json::from_str(&resp).map_err(proto)
}

/// Bind the socket `sock` for the server of `serves` (written to the
/// `.dir` file next to it): creates the run folder, replaces a stale
/// socket, sets mode 0600. Callers that must not replace a live server
/// check [`listening`] first.
pub fn bind(sock: &Path, serves: &Path) -> io::Result<UnixListener> {
    if let Some(p) = sock.parent() {
        std::fs::create_dir_all(p)?;
    }
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock)?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
    let _ = std::fs::write(
        sock.with_extension("dir"),
        format!("{}\n", serves.display()),
    );
    Ok(listener)
}

/// Remove a socket made by [`bind`] and its `.dir` file.
pub fn unbind(sock: &Path) {
    let _ = std::fs::remove_file(sock);
    let _ = std::fs::remove_file(sock.with_extension("dir"));
}

/// The folders named by the `.dir` files of the live sockets in
/// [`run_dir`] whose names start with `prefix` and that `socket_of` maps
/// back to the same socket (sorted).
pub fn live_servers(prefix: &str, socket_of: impl Fn(&Path) -> PathBuf) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let named = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix));
        if !named || p.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(p.with_extension("dir")) {
            let dir = PathBuf::from(s.trim_end());
            if socket_of(&dir) == p && listening(&p) {
                out.push(dir);
            }
        }
    }
    out.sort();
    out
}

/// Serve `listener` on a background thread named `name`: one thread per
/// connection reads a request, calls `handle` (with the decoding error if
/// the request was unreadable) and writes its answer. While a connection
/// is being served, `in_flight` (if given) counts it, so a server that
/// stops can wait until every answer is written.
pub fn serve<Req, Resp, H>(
    listener: UnixListener,
    name: &str,
    in_flight: Option<&'static AtomicUsize>,
    handle: H,
) -> io::Result<()>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(io::Result<Req>) -> Resp + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                let _ = std::thread::Builder::new()
                    .name(conn_name.clone())
                    .spawn(move || {
                        if let Some(n) = in_flight {
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        let resp = handle(read_request(&conn));
                        let _ = write_response(&conn, &resp);
                        if let Some(n) = in_flight {
                            n.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
            }
        })?;
    Ok(())
}

fn read_request<Req: DeserializeOwned>(s: &UnixStream) -> io::Result<Req> {
    let mut r = BufReader::new(std::io::Read::take(s, MAX_REQUEST));
    let mut line = String::new();
    r.read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_response<Resp: Serialize>(mut s: &UnixStream, resp: &Resp) -> io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Echo {
        n: u32,
    }

    #[test]
    fn call_serve_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("vdrep-ipc-{}", std::process::id()));
        let sock = dir.join("t.sock");
        assert_eq!(
            call::<_, Echo>(&sock, &Echo { n: 1 }).unwrap_err().kind(),
            IpcErrorKind::NotListening
        );
        let l = bind(&sock, &dir).unwrap();
        assert!(listening(&sock));
        serve(l, "ipc-test", None, |r: io::Result<Echo>| match r {
            Ok(e) => Echo { n: e.n + 1 },
            Err(_) => Echo { n: 0 },
        })
        .unwrap();
        let a: Echo = call(&sock, &Echo { n: 41 }).unwrap();
        assert_eq!(a, Echo { n: 42 });
        // An unreadable request reaches the handler as an error.
        let b: Echo = call(&sock, &"not an echo").unwrap();
        assert_eq!(b, Echo { n: 0 });
        // An answer of another type is a protocol error.
        let c = call::<_, Vec<u8>>(&sock, &Echo { n: 1 }).unwrap_err();
        assert_eq!(c.kind(), IpcErrorKind::Protocol);
        unbind(&sock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
