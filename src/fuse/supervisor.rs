//! The supervisor: the small process that holds a mount's FUSE connection
//! and runs the worker that serves it.
//!
//! The supervisor mounts (see [`super::Connection`]) and then only holds
//! descriptors: the backing folder opened before the overmount, the node
//! journal (a memfd, see `crate::fs`), the device descriptor and its clones.
//! It starts the worker (`vdrep mount ...` again, the same arguments, with
//! [`WORKER_ENV`] naming its end of a `SOCK_SEQPACKET` socket pair), hands
//! it every held descriptor with `SCM_RIGHTS`, forwards SIGTERM, SIGINT and
//! SIGHUP to it, and when the worker exits:
//! - the connection is gone (unmounted): the supervisor exits too;
//! - the worker announced a handover (`vdrep restart`): a new worker starts
//!   at once, from the binary now at the same path;
//! - the worker crashed: a new worker starts after a back-off (50 ms,
//!   doubling to 5 s, reset once a worker ran 10 s);
//! - the first worker failed before the mount went live: the supervisor
//!   detaches the mount and exits 1;
//! - the worker hung: once live, a worker reports [`WorkerMsg::Alive`]
//!   every second, each after a liveness check that goes through the
//!   mount (so a worker whose FUSE threads are stuck, or that is stopped,
//!   reports nothing). After the watchdog limit (the `[[mount]]`
//!   setting `watchdog`, [`WATCHDOG_ENV`] over it, default 30 s) without a
//!   report (counted from `Ready`) the supervisor kills it (SIGKILL) and
//!   treats it as a crash;
//! - the worker served FUSE over io_uring ([`WorkerMsg::NoHandover`]):
//!   its rings died with it, so no successor is started; the supervisor
//!   exits, which aborts the connection.
//!
//! The supervisor never reads the device, so requests wait in the kernel
//! while no worker runs; the next worker asks for the unanswered ones again
//! (`FUSE_NOTIFY_RESEND`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde::{Deserialize, Serialize};

use super::{recv_fds, send_fds, Connection};

/// Environment variable that makes `vdrep mount` a worker: the number of
/// its inherited socket descriptor.
pub const WORKER_ENV: &str = "VDREP_SUPERVISOR_FD";

/// Environment variable with the hung-worker watchdog's timeout over the
/// configuration's `watchdog`: a duration (`20s`) or `off`. Read by `vdrep
/// mount` (`crate::config::parse_watchdog`). Default [`WATCHDOG_DEFAULT`].
pub const WATCHDOG_ENV: &str = "VDREP_WATCHDOG";

/// The watchdog's default timeout.
pub const WATCHDOG_DEFAULT: Duration = Duration::from_secs(30);

/// How often a live worker reports [`WorkerMsg::Alive`].
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the supervisor tells a new worker (the message's JSON payload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStart {
    /// Workers started before this one (crashes and handovers).
    pub restarts: u32,
    /// The connection's `FUSE_INIT` was answered by an earlier worker.
    pub initialized: bool,
    pub supervisor_pid: u32,
    /// The mounted folder (canonical). The worker must not resolve it
    /// itself: that would be a request to the mount it is about to serve.
    pub dir: PathBuf,
    /// Device descriptors in the message (after the root and the journal).
    pub devs: usize,
    /// The last descriptor is the pipe of the waiting `vdrep mount`.
    pub ready_pipe: bool,
    /// What the worker serves with (the daemon's mount options): a worker
    /// parses no command line or configuration file.
    pub options: serde_json::Value,
}

/// Messages a worker sends its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMsg {
    /// `FUSE_INIT` is answered (the connection is initialised).
    Initialized,
    /// The mount is live and announced.
    Ready,
    /// The worker saved its state cleanly and exits for a successor.
    Handover,
    /// The worker's liveness check passed (sent every [`HEARTBEAT`]).
    Alive,
    /// The worker serves FUSE over io_uring with rings of its own
    /// ([`super::uring`]): when it dies the requests they held are lost, so
    /// no successor is started; the supervisor exits and the connection
    /// ends (whole-daemon semantics).
    NoHandover,
}

impl WorkerMsg {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            WorkerMsg::Initialized => b"initialized",
            WorkerMsg::Ready => b"ready",
            WorkerMsg::Handover => b"handover",
            WorkerMsg::Alive => b"alive",
            WorkerMsg::NoHandover => b"no-handover",
        }
    }
    fn parse(b: &[u8]) -> Option<WorkerMsg> {
        [
            WorkerMsg::Initialized,
            WorkerMsg::Ready,
            WorkerMsg::Handover,
            WorkerMsg::Alive,
            WorkerMsg::NoHandover,
        ]
        .into_iter()
        .find(|m| m.as_bytes() == b)
    }
}

/// Everything a worker receives from its supervisor.
#[derive(Debug)]
pub struct Handover {
    pub start: WorkerStart,
    /// The backing folder, opened before the mount.
    pub root: OwnedFd,
    /// The node journal's memfd.
    pub journal: OwnedFd,
    /// The device descriptor, then its clones.
    pub devs: Vec<OwnedFd>,
    /// The waiting `vdrep mount`'s pipe (first worker only).
    pub ready: Option<OwnedFd>,
    /// The worker's end of the socket to the supervisor.
    pub link: SupervisorLink,
}

/// A worker's socket to its supervisor.
#[derive(Debug)]
pub struct SupervisorLink(OwnedFd);

impl SupervisorLink {
    /// Tell the supervisor `msg` (errors are logged: the supervisor may
    /// already be gone).
    pub fn tell(&self, msg: WorkerMsg) {
        if let Err(e) = send_fds(self.0.as_fd(), msg.as_bytes(), &[]) {
            tracing::warn!("cannot tell the supervisor {msg:?}: {e}");
        }
    }

    /// Report [`WorkerMsg::Alive`] every [`HEARTBEAT`] while `alive()`
    /// holds, from a thread of its own (`alive` may block: then no report
    /// goes out, which is what the supervisor's watchdog looks for).
    pub fn spawn_heartbeat(&self, alive: impl Fn() -> bool + Send + 'static) -> io::Result<()> {
        let link = SupervisorLink(self.0.try_clone()?);
        std::thread::Builder::new()
            .name("vdrep-heartbeat".into())
            .spawn(move || loop {
                std::thread::sleep(HEARTBEAT);
                if alive() {
                    if let Err(e) = send_fds(link.0.as_fd(), WorkerMsg::Alive.as_bytes(), &[]) {
                        tracing::debug!("heartbeat: the supervisor is gone ({e})");
                        return;
                    }
                } else {
                    tracing::error!("liveness check failed: no heartbeat to the supervisor");
                }
            })
            .map(|_| ())
    }
}

/// In a worker (`WORKER_ENV` set): receive the supervisor's descriptors.
/// `None` in a process that is not a worker.
pub fn worker_handover() -> Option<io::Result<Handover>> {
    let raw: RawFd = std::env::var(WORKER_ENV).ok()?.parse().ok()?;
    // Programs the worker runs (app hooks) are not workers. Called while
    // the worker is still single-threaded.
    std::env::remove_var(WORKER_ENV);
    Some(receive(raw))
}

fn receive(raw: RawFd) -> io::Result<Handover> {
    // SAFETY: the supervisor left this descriptor open for us; we own it.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    let (payload, fds) = recv_fds(sock.as_fd(), MAX_START)?;
    let start: WorkerStart = serde_json::from_slice(&payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let want = 2 + start.devs + usize::from(start.ready_pipe);
    if fds.len() != want || start.devs == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the supervisor sent {} descriptors, expected {want}",
                fds.len()
            ),
        ));
    }
    let mut it = fds.into_iter();
    let (Some(root), Some(journal)) = (it.next(), it.next()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let devs: Vec<OwnedFd> = it.by_ref().take(start.devs).collect();
    let ready = it.next();
    Ok(Handover {
        start,
        root,
        journal,
        devs,
        ready,
        link: SupervisorLink(sock),
    })
}

/// The descriptors a supervisor holds for its mount.
#[derive(Debug)]
pub struct Held {
    /// The mounted folder's path.
    pub dir: PathBuf,
    /// The backing folder, opened before the mount.
    pub root: OwnedFd,
    /// The node journal's memfd.
    pub journal: OwnedFd,
    pub conn: Connection,
}

/// Largest [`WorkerStart`] message (a configuration with many VMs).
const MAX_START: usize = 1 << 20;

/// Shortest and longest wait before restarting a crashed worker.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long resets the back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// Run the supervisor until the mount is gone; returns the exit code.
/// `exe` and `args` start a worker (the arguments only show in `ps`), which
/// gets `options`; `ready` goes to the first one. `watchdog`: the limit
/// without a heartbeat from a live worker (`None`: no watchdog).
/// Call with SIGTERM, SIGINT and SIGHUP blocked and no other thread.
pub fn run(
    held: &Held,
    exe: &Path,
    args: &[std::ffi::OsString],
    options: &serde_json::Value,
    ready: Option<OwnedFd>,
    watchdog: Option<Duration>,
) -> i32 {
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    let sigfd = match nix::sys::signalfd::SignalFd::with_flags(
        &sigs,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("supervisor: cannot watch signals: {e}");
            return 1;
        }
    };
    let mut ready = ready;
    let mut restarts = 0u32;
    let mut initialized = false;
    let mut ever_ready = false;
    let mut backoff = BACKOFF_MIN;
    // Tests that kill workers many times in a row cap the back-off
    // (VDREP_TEST_RESTART_BACKOFF_MAX_MS) so they take seconds, not minutes.
    let backoff_max = std::env::var("VDREP_TEST_RESTART_BACKOFF_MAX_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms).clamp(BACKOFF_MIN, BACKOFF_MAX))
        .unwrap_or(BACKOFF_MAX);
    loop {
        let started = Instant::now();
        let start = WorkerStart {
            restarts,
            initialized,
            supervisor_pid: std::process::id(),
            dir: held.dir.clone(),
            devs: held.conn.devs.len(),
            ready_pipe: ready.is_some(),
            options: options.clone(),
        };
        let run = match run_worker(held, exe, args, &sigfd, &mut ready, &start, watchdog) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("supervisor: cannot start a worker: {e}");
                WorkerRun::default()
            }
        };
        initialized |= run.initialized;
        ever_ready |= run.ready;
        if !super::connection_alive(held.conn.devs[0].as_fd()) {
            tracing::info!(
                "supervisor: the mount of {} is gone; exiting",
                held.dir.display()
            );
            return run.code.unwrap_or(1);
        }
        if !ever_ready {
            tracing::error!(
                "supervisor: the first worker failed before the mount went live; detaching {}",
                held.dir.display()
            );
            let _ = nix::mount::umount2(&held.dir, nix::mount::MntFlags::MNT_DETACH);
            return 1;
        }
        if run.no_handover {
            // Its rings died with it; the requests they held are lost and a
            // successor would leave them hanging. Closing every descriptor
            // aborts the connection: waiting requests fail, the mount stays
            // (dead) until `vdrep umount`, and the remount marks the disks
            // resync required (the tracking state is unclean).
            tracing::error!(
                "supervisor: the worker of {} died ({}); it served FUSE over io_uring, which cannot be handed over: ending the mount (run `vdrep umount {}`, then mount again; its disks will need a resync)",
                held.dir.display(),
                run.how,
                held.dir.display()
            );
            return 1;
        }
        restarts += 1;
        if run.handover {
            tracing::info!("supervisor: handover; starting worker #{restarts}");
            backoff = BACKOFF_MIN;
            continue;
        }
        if started.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(
            "supervisor: the worker died ({}); restarting it in {} ms (restart #{restarts})",
            run.how,
            backoff.as_millis()
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// What one worker's run told the supervisor.
#[derive(Debug, Default)]
struct WorkerRun {
    initialized: bool,
    ready: bool,
    handover: bool,
    /// The watchdog killed it (no heartbeat in time).
    hung: bool,
    /// It served FUSE over io_uring ([`WorkerMsg::NoHandover`]).
    no_handover: bool,
    /// Exit code, if it exited (not killed).
    code: Option<i32>,
    how: String,
}

fn run_worker(
    held: &Held,
    exe: &Path,
    args: &[std::ffi::OsString],
    sigfd: &nix::sys::signalfd::SignalFd,
    ready: &mut Option<OwnedFd>,
    start: &WorkerStart,
    watchdog: Option<Duration>,
) -> io::Result<WorkerRun> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    // The worker inherits its end across exec (we run single-threaded, so
    // no other child can catch it).
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(io::Error::from)?;
    let mut child = std::process::Command::new(exe)
        .args(args)
        .env(WORKER_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()?;
    drop(theirs);
    let mut fds: Vec<RawFd> = vec![held.root.as_raw_fd(), held.journal.as_raw_fd()];
    fds.extend(held.conn.devs.iter().map(|d| d.as_raw_fd()));
    fds.extend(ready.as_ref().map(|r| r.as_raw_fd()));
    let payload = serde_json::to_vec(start).map_err(io::Error::other)?;
    let mut run = WorkerRun::default();
    if let Err(e) = send_fds(ours.as_fd(), &payload, &fds) {
        tracing::error!("supervisor: cannot hand the descriptors over: {e}");
        let _ = child.kill();
    } else {
        // The worker owns the waiting parent's pipe now.
        *ready = None;
        watch(ours.as_fd(), sigfd, child.id(), watchdog, &mut run);
    }
    let status = child.wait()?;
    run.code = status.code();
    run.how = if run.hung {
        format!("hung, killed by the watchdog: {status}")
    } else {
        status.to_string()
    };
    Ok(run)
}

/// Read the worker's messages and forward signals until its socket closes;
/// kill the worker if, once it is live (`Ready`), no heartbeat comes for
/// `watchdog`.
fn watch(
    sock: BorrowedFd<'_>,
    sigfd: &nix::sys::signalfd::SignalFd,
    pid: u32,
    watchdog: Option<Duration>,
    run: &mut WorkerRun,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut last_alive: Option<Instant> = None;
    loop {
        if let (Some(limit), Some(t)) = (watchdog, last_alive) {
            if !run.hung && t.elapsed() >= limit {
                tracing::error!(
                    "supervisor: worker {pid} sent no heartbeat for {:.1} s (limit {} s): it hangs; killing it",
                    t.elapsed().as_secs_f64(),
                    limit.as_secs_f64()
                );
                run.hung = true;
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let mut fds = [
            PollFd::new(sock, PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        // Wake at least every 250 ms to check the heartbeat.
        let timeout = match watchdog {
            Some(_) => PollTimeout::from(250u16),
            None => PollTimeout::NONE,
        };
        if let Err(e) = poll(&mut fds, timeout) {
            if e == nix::errno::Errno::EINTR {
                continue;
            }
            tracing::error!("supervisor: poll: {e}");
            return;
        }
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        let sock_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if sig_ready {
            if let Ok(Some(si)) = sigfd.read_signal() {
                if let Ok(sig) = Signal::try_from(si.ssi_signo as i32) {
                    tracing::info!("supervisor: {sig:?}: passing it to the worker");
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
                }
            }
        }
        if sock_ready {
            match recv_fds(sock, 64) {
                Ok((m, _)) if m.is_empty() => return,
                Ok((m, _)) => match WorkerMsg::parse(&m) {
                    Some(WorkerMsg::Initialized) => run.initialized = true,
                    Some(WorkerMsg::Ready) => {
                        run.ready = true;
                        // Live now: its first heartbeat is due within the limit.
                        last_alive = Some(Instant::now());
                    }
                    Some(WorkerMsg::Handover) => run.handover = true,
                    Some(WorkerMsg::Alive) => last_alive = Some(Instant::now()),
                    Some(WorkerMsg::NoHandover) => run.no_handover = true,
                    None => tracing::warn!("supervisor: unknown worker message"),
                },
                Err(e) => {
                    tracing::warn!("supervisor: reading the worker socket: {e}");
                    return;
                }
            }
        }
    }
}
