//! Local IPC: one JSON-line request/response exchange over a Unix stream
//! socket, generic over the message types (serde).
//!
//! Owns the transport of the local control sockets only: where they live
//! ([`run_dir`], [`socket_in_run_dir`], [`mount_socket`]), binding one ([`bind`]), serving it
//! ([`serve`]) and calling it ([`call`]). The messages belong to the
//! programs that serve them: the mount daemon's in
//! [`crate::daemon::control`], the receiver's in
//! [`crate::receiver::control`]. Their clients turn [`IpcError`] into a
//! [`CallError`] naming the [`Server`] with the words its operator needs
//! (which command starts it, where its log is).
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

/// The local server a call went to: names it in messages and says how to
/// start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// The mount daemon of a tracked folder (canonical path).
    Mount { dir: String },
    /// The receiver serving a store (canonical path).
    Receiver { store: String },
}

impl Server {
    fn not_running(&self) -> String {
        match self {
            Server::Mount { dir } => format!("no vdrep mount is running for {dir}"),
            Server::Receiver { store } => format!("no receiver is running for the store {store}"),
        }
    }

    fn how_to_start(&self) -> String {
        match self {
            Server::Mount { dir } => format!("mount it with `vdrep mount {dir}`"),
            Server::Receiver { store } => {
                format!("start `vdrep receive --store {store} ...` first")
            }
        }
    }

    fn died(&self) -> &'static str {
        match self {
            Server::Mount { .. } => {
                "did the daemon die? see its log: the journal of vdrep-mount@, or /var/log/vdrep/"
            }
            Server::Receiver { .. } => "did the receiver die? see its log",
        }
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Mount { dir } => write!(f, "the vdrep daemon for {dir}"),
            Server::Receiver { store } => write!(f, "the receiver of {store}"),
        }
    }
}

/// A request to a local server ([`Server`]) that failed: it is not
/// running, the exchange failed, or it refused.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{} (no control socket at {sock}): {}", server.not_running(), server.how_to_start())]
    NotRunning { server: Server, sock: String },
    #[error("talking to {server}: {source}")]
    Io {
        server: Server,
        #[source]
        source: io::Error,
    },
    #[error("{server} sent an unreadable answer: {msg}")]
    Protocol { server: Server, msg: String },
    /// The server answered, refusing or failing the request (its reason).
    #[error("{reason}")]
    Refused { server: Server, reason: String },
}

/// The kinds of [`CallError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    /// No server serves the folder or store.
    NotRunning,
    /// The exchange with the server failed.
    Transport,
    /// The server refused or failed the request.
    Refused,
}

impl CallError {
    pub fn kind(&self) -> CallErrorKind {
        match self {
            CallError::NotRunning { .. } => CallErrorKind::NotRunning,
            CallError::Io { .. } | CallError::Protocol { .. } => CallErrorKind::Transport,
            CallError::Refused { .. } => CallErrorKind::Refused,
        }
    }

    /// The server the request went to.
    pub fn server(&self) -> &Server {
        match self {
            CallError::NotRunning { server, .. }
            | CallError::Io { server, .. }
            | CallError::Protocol { server, .. }
            | CallError::Refused { server, .. } => server,
        }
    }

    /// The failure of a [`call`] to `server`.
    pub fn of(server: Server, e: IpcError) -> Self {
        match e {
            IpcError::NotListening { sock } => CallError::NotRunning {
                server,
                sock: sock.display().to_string(),
            },
            IpcError::Io { source, .. } => CallError::Io { server, source },
            IpcError::Closed { .. } => {
                let msg = format!("connection closed without an answer ({})", server.died());
                CallError::Protocol { server, msg }
            }
            IpcError::Protocol { msg, .. } => CallError::Protocol { server, msg },
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

/// An answer that can say the request was refused (and why).
pub trait Answer {
    /// The refusal's reason (taken out of the answer), if it is one.
    fn refusal(&mut self) -> Option<String>;
}

/// For a response struct with `ok: bool` and `error: Option<String>`
/// fields (and `Default`): `Response::err(e)`, a refusal saying `e`, and its
/// [`Answer`] (a refusal without a reason says "failed"). The mount's and
/// the receiver's control answers share this shape.
macro_rules! ok_error_answer {
    ($resp:ty) => {
        impl $resp {
            /// A refusal saying `e`.
            pub fn err(e: impl ToString) -> Self {
                Self {
                    ok: false,
                    error: Some(e.to_string()),
                    ..Default::default()
                }
            }
        }

        impl $crate::ipc::Answer for $resp {
            fn refusal(&mut self) -> Option<String> {
                (!self.ok).then(|| self.error.take().unwrap_or_else(|| "failed".into()))
            }
        }
    };
}
pub(crate) use ok_error_answer;

/// [`call`] `server` on `sock`, with a refusing answer as
/// [`CallError::Refused`].
pub fn call_ok<Req: Serialize, Resp: DeserializeOwned + Answer>(
    server: Server,
    sock: &Path,
    req: &Req,
) -> Result<Resp, CallError> {
    match call::<Req, Resp>(sock, req) {
        Ok(mut r) => match r.refusal() {
            Some(reason) => Err(CallError::Refused { server, reason }),
            None => Ok(r),
        },
        Err(e) => Err(CallError::of(server, e)),
    }
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

    /// An answer that refuses odd numbers.
    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Even {
        n: u32,
        error: Option<String>,
    }

    impl Answer for Even {
        fn refusal(&mut self) -> Option<String> {
            self.error.take()
        }
    }

    #[test]
    fn call_ok_names_the_server_and_passes_refusals_on() {
        let dir = std::env::temp_dir().join(format!("vdrep-ipc-ok-{}", std::process::id()));
        let sock = dir.join("t.sock");
        let mount = Server::Mount { dir: "/vms".into() };
        let e = call_ok::<_, Even>(mount.clone(), &sock, &Echo { n: 1 }).unwrap_err();
        assert_eq!(e.kind(), CallErrorKind::NotRunning);
        assert_eq!(e.server(), &mount);
        let msg = e.to_string();
        assert!(msg.contains("no vdrep mount is running for /vms"), "{msg}");
        assert!(msg.contains("`vdrep mount /vms`"), "{msg}");
        let recv = Server::Receiver {
            store: "/st".into(),
        };
        let msg = call_ok::<_, Even>(recv.clone(), &sock, &Echo { n: 1 })
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`vdrep receive --store /st ...`"), "{msg}");

        let l = bind(&sock, &dir).unwrap();
        serve(l, "ipc-ok-test", None, |r: io::Result<Echo>| match r {
            Ok(e) if e.n % 2 == 0 => Even {
                n: e.n,
                error: None,
            },
            Ok(e) => Even {
                n: e.n,
                error: Some(format!("{} is odd", e.n)),
            },
            Err(_) => Even {
                n: 0,
                error: Some("unreadable".into()),
            },
        })
        .unwrap();
        let ok: Even = call_ok(recv.clone(), &sock, &Echo { n: 2 }).unwrap();
        assert_eq!(ok, Even { n: 2, error: None });
        let e = call_ok::<_, Even>(recv.clone(), &sock, &Echo { n: 3 }).unwrap_err();
        assert_eq!(e.kind(), CallErrorKind::Refused);
        assert_eq!(e.server(), &recv);
        assert_eq!(e.to_string(), "3 is odd");
        // An answer that does not decode is a transport failure.
        #[derive(serde::Deserialize, Debug)]
        struct Other {
            _m: String,
        }
        impl Answer for Other {
            fn refusal(&mut self) -> Option<String> {
                None
            }
        }
        let e = call_ok::<_, Other>(recv, &sock, &Echo { n: 2 });
        assert_eq!(e.unwrap_err().kind(), CallErrorKind::Transport);
        unbind(&sock);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
