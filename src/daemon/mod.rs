//! Mount lifecycle: open the folder, load tracking state, mount the FUSE file
//! system over the folder itself, serve the control socket, and on unmount
//! (`vdrep umount`, `umount DIR`, SIGTERM/SIGINT) save state cleanly.
//! SIGHUP (or `vdrep reload`) re-reads the configuration file and converges
//! the mount's protections on it ([`reload`]); it never unmounts.
//!
//! Without `--foreground` the daemon forks *before* any thread exists, the
//! parent waits on a pipe until the mount is live (or failed) and exits with
//! the child's verdict, so `vdrep mount DIR && use DIR` is race-free; the
//! child logs to the file `--log-file` names (default
//! `/var/log/vdrep/mount-ESCAPED.log`), never into the folder. In the
//! foreground (the systemd unit) it logs to stderr and tells the service
//! manager when it is ready, reloading or stopping ([`crate::service`]).
//!
//! The daemon is two processes: the supervisor ([`crate::fuse::supervisor`])
//! mounts and holds the FUSE connection, and the worker (the same `vdrep
//! mount` command, started by the supervisor) serves it: tracking, control
//! socket, replication. A crashed worker is replaced and the kernel resends
//! what it had not answered, so VMs see a stall, not an I/O error; the
//! tracking state of a crashed worker is not trusted (its disks are marked
//! resync required). `vdrep restart` ([`Request::Restart`]) replaces the
//! worker after a clean save, which keeps tracking exact.
//!
//! [`control`] holds the daemon's control protocol and its client;
//! `observe` its metrics endpoint, `notify_command` and failover events;
//! [`stop`] and [`spawn`] are the typed entry points other layers use to
//! stop a mount or start one in the background.

pub mod control;
mod observe;
pub mod reload;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::control::{Request, Response};
use crate::fs::FsOptions;
use crate::ipc::CallError;
use crate::tracking::{TrackConfig, Tracker};

/// Everything `vdrep mount` was asked for (the supervisor hands it to each
/// worker as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountOptions {
    pub dir: PathBuf,
    pub foreground: bool,
    pub track: TrackConfig,
    pub fs: FsOptions,
    /// Identity folder (`vdrep keys init`) for replication.
    pub keys: Option<PathBuf>,
    /// VMs to protect once the mount is live (from the configuration
    /// file), as `vdrep protect` would; one already protected with the
    /// same spec (resumed from the last run) is left running.
    pub protect: Vec<crate::sender::ProtectSpec>,
    /// Bandwidth schedules of the configuration's VMs (by VM; those whose
    /// rate depends on the time), followed by a ticker.
    pub rate_schedules: std::collections::BTreeMap<String, crate::schedule::RateSchedule>,
    /// The configuration file SIGHUP and `vdrep reload` re-read (`None`:
    /// the default path).
    pub config: Option<PathBuf>,
    /// Log events as text or JSON lines.
    pub log_format: crate::service::LogFormat,
    /// In the background, the log file (`None`:
    /// [`crate::service::default_mount_log`]).
    pub log_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The command run on every event (`notify_command`).
    pub notify: Option<crate::events::notify::NotifySpec>,
    /// The supervisor's hung-worker watchdog: no heartbeat from a live
    /// worker for this long and it is killed and replaced (`None`: off).
    #[serde(default = "default_watchdog")]
    pub watchdog: Option<std::time::Duration>,
}

fn default_watchdog() -> Option<std::time::Duration> {
    Some(crate::fuse::supervisor::WATCHDOG_DEFAULT)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Track(#[from] crate::tracking::TrackError),
    /// Asking the running daemon to stop failed or was refused.
    #[error(transparent)]
    Control(#[from] CallError),
    /// The daemon was told to stop but its process did not exit.
    #[error("{} is unmounted but its daemon (pid {pid}) did not exit", dir.display())]
    StillRunning { dir: PathBuf, pid: u32 },
    /// A background `vdrep mount` could not be started or failed.
    #[error("{0}")]
    Spawn(String),
    /// No worker answers for the folder but its supervisor (the holder of
    /// the FUSE connection) is alive: a worker is being restarted.
    #[error("{}: no worker answers, but its supervisor still holds the mount (a worker is restarting): try again in a few seconds; `vdrep status {}` shows when it serves again", dir.display(), dir.display())]
    SupervisorAlive { dir: PathBuf },
}

/// The kinds of [`DaemonError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonErrorKind {
    /// A local file system or system call failed.
    Io,
    /// Tracking state could not be loaded or saved.
    Track,
    /// Talking to a running daemon failed or it refused.
    Control,
    /// The daemon did not stop in time.
    StillRunning,
    /// Starting a daemon failed.
    Start,
    /// The mount's supervisor lives (a worker is restarting).
    SupervisorAlive,
}

impl DaemonError {
    pub fn kind(&self) -> DaemonErrorKind {
        match self {
            DaemonError::Io { .. } => DaemonErrorKind::Io,
            DaemonError::Track(_) => DaemonErrorKind::Track,
            DaemonError::Control(_) => DaemonErrorKind::Control,
            DaemonError::StillRunning { .. } => DaemonErrorKind::StillRunning,
            DaemonError::Msg(_) | DaemonError::Spawn(_) => DaemonErrorKind::Start,
            DaemonError::SupervisorAlive { .. } => DaemonErrorKind::SupervisorAlive,
        }
    }
}

fn ioe<'a>(dir: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        dir: dir.to_path_buf(),
        what,
        source,
    }
}

/// `vdrep mount`: returns the process exit code.
pub fn mount(opts: MountOptions) -> i32 {
    let dir = match std::fs::canonicalize(&opts.dir) {
        Ok(d) if d.is_dir() => d,
        Ok(d) => {
            eprintln!("vdrep: {} is not a directory", d.display());
            return 2;
        }
        Err(e) => {
            eprintln!("vdrep: {}: {e}", opts.dir.display());
            return 2;
        }
    };
    if control::is_mounted(&dir) {
        eprintln!(
            "vdrep: {} is already mounted by vdrep (unmount it first with `vdrep umount {}`)",
            dir.display(),
            dir.display()
        );
        return 2;
    }
    if opts.foreground {
        crate::service::init_logging(opts.log_format, crate::service::LogTarget::Stderr);
        return supervise(&dir, &opts, None);
    }
    // Fork before any thread exists.
    // Close-on-exec: the workers the supervisor starts must not keep it.
    let (rd, wr) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vdrep: cannot create a pipe: {e}");
            return 1;
        }
    };
    // SAFETY: single-threaded at this point (no thread has been spawned).
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("vdrep: fork failed: {e}");
            1
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            match msg.strip_prefix("ok") {
                Some(rest) => {
                    print!("{}", rest.trim_start());
                    0
                }
                None if msg.is_empty() => {
                    eprintln!(
                        "vdrep: the mount daemon exited before mounting {} (see {})",
                        dir.display(),
                        log_path(&dir, &opts).display()
                    );
                    1
                }
                None => {
                    eprint!("vdrep: {msg}");
                    1
                }
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let _ = nix::unistd::setsid();
            std::process::exit(supervise(&dir, &opts, Some(wr)));
        }
    }
}

/// The background daemon's log file.
fn log_path(dir: &Path, opts: &MountOptions) -> PathBuf {
    opts.log_file
        .clone()
        .unwrap_or_else(|| crate::service::default_mount_log(dir))
}

/// Open (create, append) the background daemon's log file and its folder.
fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Tell the waiting parent how it went (first message wins).
fn notify(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let mut f = File::from(fd);
        let _ = f.write_all(msg.as_bytes());
    }
}

/// The supervisor: mount, then run workers until the mount is gone.
fn supervise(dir: &Path, opts: &MountOptions, ready: Option<OwnedFd>) -> i32 {
    let mut ready = ready;
    match supervise_inner(dir, opts, &mut ready) {
        Ok(code) => code,
        Err(e) if ready.is_some() => {
            tracing::error!("{e}");
            notify(&mut ready, &format!("{e}\n"));
            1
        }
        Err(e) => {
            eprintln!("vdrep: {e}");
            1
        }
    }
}

fn supervise_inner(
    dir: &Path,
    opts: &MountOptions,
    ready: &mut Option<OwnedFd>,
) -> Result<i32, DaemonError> {
    let root = open_root(dir).map_err(ioe(dir, "cannot open the folder"))?;
    if ready.is_some() {
        // Daemon: stdin from /dev/null, stdout, stderr and logs to the log file.
        let path = log_path(dir, opts);
        let log = open_log(&path).map_err(|source| DaemonError::Io {
            dir: path.clone(),
            what: "cannot open the log file (choose another with --log-file)",
            source,
        })?;
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(&null);
            let _ = nix::unistd::dup2_stdout(&log);
            let _ = nix::unistd::dup2_stderr(&log);
        }
        crate::service::init_logging(opts.log_format, crate::service::LogTarget::File(log));
    }
    // Signals are read by the supervisor (signalfd) and passed on.
    crate::service::termination_signals()
        .thread_block()
        .map_err(|e| DaemonError::Msg(format!("cannot block signals: {e}")))?;
    crate::fs::check_not_mounted(dir, &opts.fs.fsname).map_err(ioe(dir, "cannot mount"))?;
    // Held until this process is gone: `vdrep umount` aborts the FUSE
    // connection of a mount only while nobody holds it.
    let _alive = supervisor_lock(dir)
        .map_err(ioe(dir, "cannot lock the supervisor's lock file"))?
        .ok_or_else(|| {
            DaemonError::Msg(format!(
                "{}: another vdrep supervisor holds this folder",
                dir.display()
            ))
        })?;
    let spec = crate::fuse::MountSpec {
        fsname: opts.fs.fsname.clone(),
        allow_other: opts.fs.allow_other,
        threads: opts.fs.n_threads.max(1) + crate::fs::DIRECT_IO_WORKERS,
    };
    let conn = crate::fuse::Connection::mount(dir, &spec).map_err(ioe(
        dir,
        "cannot mount the FUSE file system over the folder",
    ))?;
    let journal = crate::fuse::memfd("vdrep-nodes", crate::fs::JOURNAL_BYTES)
        .map_err(ioe(dir, "cannot create the node journal"));
    let journal = match journal {
        Ok(j) => j,
        Err(e) => {
            let _ = unmount(dir, true);
            return Err(e);
        }
    };
    let held = crate::fuse::supervisor::Held {
        dir: dir.to_path_buf(),
        root,
        journal,
        conn,
    };
    let exe = std::env::current_exe().map_err(ioe(dir, "cannot find the vdrep binary"))?;
    // The same command line, for `ps`; the worker reads `options` instead.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let options = serde_json::to_value(opts)
        .map_err(|e| DaemonError::Msg(format!("cannot encode the mount options: {e}")))?;
    tracing::info!(
        "supervisor (pid {}) holds the FUSE connection of {}",
        std::process::id(),
        dir.display()
    );
    Ok(crate::fuse::supervisor::run(
        &held,
        &exe,
        &args,
        &options,
        ready.take(),
        opts.watchdog,
    ))
}

fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(io::Error::from)?;
    Ok(fd)
}

/// In a process a supervisor started as its worker: serve the connection
/// handed over and return the exit code; `None` in any other process.
///
/// Call first thing in `main`, single-threaded: a worker takes everything
/// from its supervisor and parses no command line or configuration file
/// (resolving a path under the mount before serving it would wait for
/// itself).
/// `direct`: starts the in-process receivers of direct protection to an
/// object store (the receiver's; handed in from above, the daemon sits
/// below the receiver).
pub fn worker_entry(direct: Arc<crate::sender::DirectFactory>) -> Option<i32> {
    let h = crate::fuse::supervisor::worker_handover()?;
    // stderr is the supervisor's: its log file, journald or a terminal.
    let h = match h {
        Ok(h) => h,
        Err(e) => {
            eprintln!("vdrep worker: cannot receive the supervisor's descriptors: {e}");
            return Some(1);
        }
    };
    let opts: MountOptions = match serde_json::from_value(h.start.options.clone()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vdrep worker: the supervisor's mount options are unreadable: {e}");
            return Some(1);
        }
    };
    crate::service::init_logging(opts.log_format, crate::service::LogTarget::Stderr);
    Some(worker(&opts, h, direct))
}

/// A worker: serve the connection its supervisor handed over.
fn worker(
    opts: &MountOptions,
    mut h: crate::fuse::supervisor::Handover,
    direct: Arc<crate::sender::DirectFactory>,
) -> i32 {
    // Die with the supervisor (a supervisor killed with -9 takes the whole
    // daemon with it, as a host crash would).
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::error!("worker: cannot follow the supervisor's death: {e}");
        return 1;
    }
    if nix::unistd::getppid().as_raw() as u32 != h.start.supervisor_pid {
        tracing::error!("worker: the supervisor is gone");
        return 1;
    }
    let dir = h.start.dir.clone();
    let mut ready = h.ready.take();
    match serve_worker(&dir, opts, h, &mut ready, direct) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            notify(&mut ready, &format!("{e}\n"));
            1
        }
    }
}

/// What the control handler needs to know about its worker.
struct WorkerCtx {
    link: crate::fuse::supervisor::SupervisorLink,
    status: control::WorkerStatus,
}

fn serve_worker(
    dir: &Path,
    opts: &MountOptions,
    h: crate::fuse::supervisor::Handover,
    ready: &mut Option<OwnedFd>,
    direct: Arc<crate::sender::DirectFactory>,
) -> Result<(), DaemonError> {
    // Block termination signals in every thread; one thread waits for them.
    let sigs = crate::service::termination_signals();
    sigs.thread_block()
        .map_err(|e| DaemonError::Msg(format!("cannot block signals: {e}")))?;
    let crate::fuse::supervisor::Handover {
        start,
        root,
        journal,
        devs,
        ready: _,
        link,
    } = h;
    let tracker_root = root
        .try_clone()
        .map_err(ioe(dir, "cannot duplicate the folder descriptor"))?;
    let tracker = Arc::new(Tracker::open(tracker_root, dir, opts.track.clone())?);
    if !tracker.previous_stop_clean() {
        tracing::warn!(
            "the previous vdrep mount of {} did not stop cleanly: its disks are marked resync required",
            dir.display()
        );
    }
    let initialized = start.initialized;
    let handed = crate::fs::HandedOver {
        root,
        journal,
        devs,
        initialized,
    };
    // Before the first ring registers: from then on this worker's death
    // would leave requests on its rings, which no successor can serve.
    let announce = || {
        RINGS.store(true, std::sync::atomic::Ordering::SeqCst);
        link.tell(crate::fuse::supervisor::WorkerMsg::NoHandover);
    };
    let (session, restored) =
        crate::fs::serve_handed_over(handed, Some(tracker.clone()), &opts.fs, announce)
            .map_err(|e| DaemonError::Msg(format!("cannot serve {}: {e}", dir.display())))?;
    let ctx = Arc::new(WorkerCtx {
        status: control::WorkerStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            restarts: start.restarts,
            supervisor_pid: start.supervisor_pid,
            binary: std::fs::metadata("/proc/self/exe")
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    format!("{}:{}", m.dev(), m.ino())
                })
                .unwrap_or_default(),
            transport: if session.uring() {
                crate::fuse::FuseTransport::Uring
            } else {
                crate::fuse::FuseTransport::Dev
            },
        },
        link,
    });
    ctx.link
        .tell(crate::fuse::supervisor::WorkerMsg::Initialized);
    if initialized {
        tracing::info!(
            "worker #{} took over {}: {} inodes, {} open files, {} open folders restored, {} lost",
            ctx.status.restarts,
            dir.display(),
            restored.inodes,
            restored.files,
            restored.dirs,
            restored.lost
        );
        // What the previous worker read but did not answer comes again.
        if let Err(e) = crate::fuse::notify_resend(session.as_fd()) {
            tracing::error!(
                "FUSE_NOTIFY_RESEND failed ({e}; needs Linux 6.9): requests the previous worker had read stay unanswered"
            );
        }
    }

    // Control socket.
    let sock = control::socket_path(dir);
    let listener =
        crate::ipc::bind(&sock, dir).map_err(ioe(dir, "cannot bind the control socket"))?;
    let replicator = match crate::sender::Replicator::new(
        tracker.clone(),
        dir,
        opts.keys.as_deref(),
        Some(direct),
    ) {
        Ok(r) => r,
        Err(e) => {
            return Err(DaemonError::Msg(format!(
                "cannot start replication for {}: {e}",
                dir.display()
            )))
        }
    };
    observe::start(dir, opts, &replicator)?;
    let configured = Arc::new(reload::Configured::new(opts.config.clone()));
    configured.set_schedules(opts.rate_schedules.clone());
    {
        let tracker = tracker.clone();
        let dir = dir.to_path_buf();
        let rep = replicator.clone();
        let configured = configured.clone();
        let ctx = ctx.clone();
        let keys = opts.keys.clone();
        crate::ipc::serve(
            listener,
            "vdrep-control",
            Some(&IN_FLIGHT),
            move |req: io::Result<Request>| match req {
                Err(e) => Response::err(format!("bad request: {e}")),
                Ok(_) if HANDING_OVER.load(std::sync::atomic::Ordering::SeqCst) => {
                    Response::err("the worker is handing over to a new one; retry in a moment")
                }
                Ok(req) => {
                    let resp = handle(
                        &req,
                        &tracker,
                        (&rep, &configured, &ctx),
                        (&dir, keys.as_deref()),
                    );
                    observe::failover_event(&req, &resp, &rep);
                    resp
                }
            },
        )
        .map_err(ioe(dir_static(), "cannot start the control thread"))?;
    }
    {
        let dir = dir.to_path_buf();
        let rep = replicator.clone();
        let configured = configured.clone();
        std::thread::Builder::new()
            .name("vdrep-signals".into())
            .spawn(move || {
                while let Ok(sig) = sigs.wait() {
                    if sig == nix::sys::signal::Signal::SIGHUP {
                        tracing::info!("SIGHUP: reloading the configuration");
                        crate::service::reloading();
                        if let Err(e) = configured.reload(&rep, &dir) {
                            for l in e.to_string().lines() {
                                tracing::error!("reload refused, nothing changed: {l}");
                            }
                        }
                        crate::service::ready(&service_summary(&dir, &rep));
                        continue;
                    }
                    tracing::info!("{sig:?}: unmounting {}", dir.display());
                    crate::service::stopping(&format!("unmounting {}", dir.display()));
                    if let Err(e) = unmount(&dir, false) {
                        tracing::warn!("unmount: {e}; detaching lazily");
                        let _ = unmount(&dir, true);
                    }
                }
            })
            .map_err(ioe(dir_static(), "cannot start the signal thread"))?;
    }
    tracing::info!(
        "vdrep mounted over {} ({} disks tracked)",
        dir.display(),
        tracker.status().disks.len()
    );
    let report = configured.converge(&replicator, &opts.protect);
    reload::spawn_rate_ticker(configured.clone(), replicator.clone())
        .map_err(ioe(dir_static(), "cannot start the rate schedule thread"))?;
    let report: String = report.iter().map(|l| format!("{l}\n")).collect();
    notify(ready, &format!("ok\n{report}"));
    ctx.link.tell(crate::fuse::supervisor::WorkerMsg::Ready);
    crate::service::ready(&service_summary(dir, &replicator));
    {
        let (d1, r1, d2, t2) = (
            dir.to_path_buf(),
            replicator.clone(),
            dir.to_path_buf(),
            tracker.clone(),
        );
        crate::service::spawn_monitor(
            Duration::from_secs(2),
            move || service_summary(&d1, &r1),
            move || worker_alive(&t2, &d2),
        )
        .map_err(ioe(dir_static(), "cannot start the service monitor thread"))?;
        // The supervisor's hung-worker watchdog: the same check.
        let (d3, t3) = (dir.to_path_buf(), tracker.clone());
        ctx.link
            .spawn_heartbeat(move || worker_alive(&t3, &d3))
            .map_err(ioe(dir_static(), "cannot start the heartbeat thread"))?;
    }
    let run = session.run();
    tracing::info!("FUSE session over {} ended", dir.display());
    replicator.events().close();
    let saved = tracker.shutdown_clean();
    let t0 = std::time::Instant::now();
    while IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
        && t0.elapsed() < std::time::Duration::from_secs(5)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    crate::ipc::unbind(&sock);
    run.map_err(ioe(dir, "FUSE session failed"))?;
    saved?;
    tracing::info!("tracking state saved; clean stop");
    Ok(())
}

/// A worker's liveness (systemd's watchdog and the supervisor's): the
/// tracker's state can be read, cuts are not stuck, and the folder answers
/// through the mount (a round trip through this worker's FUSE threads).
/// Blocks while either is stuck.
fn worker_alive(tracker: &Tracker, dir: &Path) -> bool {
    let _ = tracker.status();
    tracker.wait_for_cuts();
    std::fs::metadata(dir).is_ok()
}

/// Certificates of this site (`keys`) and trusted by its VMs that expire
/// within 30 days (or are unreadable), for `vdrep status`.
fn cert_warnings(
    rep: &crate::sender::Replicator,
    vms: &[crate::sender::VmStatus],
    keys: Option<&Path>,
) -> Vec<String> {
    use crate::transport::keys::{certs_in, expiry_warnings};
    let mut certs: Vec<PathBuf> = keys.and_then(|k| certs_in(k).ok()).unwrap_or_default();
    for v in vms {
        certs.extend(rep.spec(&v.vm).into_iter().flat_map(|s| s.trust));
    }
    certs.sort();
    certs.dedup();
    expiry_warnings(&certs, jiff::Timestamp::now())
}

/// The mount's one-line `STATUS=`: the folder, its disks and its VMs by state.
fn service_summary(dir: &Path, rep: &crate::sender::Replicator) -> String {
    let vms = rep.status();
    let mut by_state: std::collections::BTreeMap<String, usize> = Default::default();
    for v in &vms {
        *by_state.entry(format!("{:?}", v.state)).or_default() += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!(
        "mounted {}; {} VM(s) protected{}{}",
        dir.display(),
        vms.len(),
        if states.is_empty() { "" } else { ": " },
        states.join(", ")
    )
}

fn dir_static() -> &'static Path {
    Path::new("-")
}

/// umount2(dir) — lazily (MNT_DETACH) if asked.
pub fn unmount(dir: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    nix::mount::umount2(dir, flags).map_err(io::Error::from)
}

/// The supervisor's lock of the folder `dir` (canonical): an exclusive
/// `flock` on `run_dir()/<hash of dir>.lock` that its process holds for
/// its whole life (close-on-exec: workers do not inherit it). `Ok(None)`:
/// another process holds it.
fn supervisor_lock(dir: &Path) -> io::Result<Option<nix::fcntl::Flock<File>>> {
    let path = control::socket_path(dir).with_extension("lock");
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::from(e)),
    }
}

/// What [`remove_dead_mount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadMountRemoved {
    /// The FUSE connection (its number under `/sys/fs/fuse/connections`)
    /// was aborted: requests that waited on it failed with `ENOTCONN`.
    pub aborted: Option<u64>,
}

/// How long an unmount after an abort retries while the processes whose
/// files were open on the mount get their errors and close them.
const DEAD_UNMOUNT_RETRY: Duration = Duration::from_secs(3);

/// Remove the mount over `dir` whose daemon is gone (no control socket
/// answers). Unless its supervisor still lives ([`DaemonError::SupervisorAlive`]),
/// first abort its FUSE connection through fusectl, so that no process
/// stays blocked on a request nobody will answer (a `close` in
/// `fuse_flush`, a read), then unmount it (`lazy`: detach if files stay
/// open). Never looks up `dir` through the dead mount.
pub fn remove_dead_mount(dir: &Path, lazy: bool) -> Result<DeadMountRemoved, DaemonError> {
    let dir = crate::fuse::fusectl::resolve_mount_point(dir);
    let _nobody = supervisor_lock(&dir)
        .map_err(ioe(&dir, "cannot check the supervisor's lock file"))?
        .ok_or_else(|| DaemonError::SupervisorAlive { dir: dir.clone() })?;
    let mut done = DeadMountRemoved { aborted: None };
    let pinned = crate::fuse::fusectl::PinnedMount::at(&dir)
        .map_err(ioe(&dir, "cannot find the mount's FUSE connection"))?;
    if let Some(m) = &pinned {
        let n = m.entry().connection();
        match m.abort() {
            Ok(true) => done.aborted = Some(n),
            Ok(false) => {}
            // The unmount below may still work; say why waiters may stay.
            Err(e) => tracing::warn!(
                "{}: cannot abort FUSE connection {n} through {}: {e}; processes waiting on it may hang",
                dir.display(),
                crate::fuse::fusectl::CONNECTIONS
            ),
        }
    }
    // The pin keeps the mount busy: let go before unmounting.
    drop(pinned);
    let start = Instant::now();
    loop {
        match unmount(&dir, false) {
            Ok(()) => return Ok(done),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < DEAD_UNMOUNT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) if lazy => {
                return unmount(&dir, true)
                    .map(|()| done)
                    .map_err(ioe(&dir, "cannot detach the dead mount"));
            }
            Err(e) => return Err(ioe(
                &dir,
                "cannot unmount the dead mount (files are still open on it; --lazy detaches it)",
            )(e)),
        }
    }
}

/// Control requests being answered; the daemon waits for them at exit so
/// that `vdrep umount` gets its answer.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// This worker serves FUSE over io_uring (its own rings): no handover.
static RINGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once a worker started handing over: control requests are refused.
static HANDING_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Longest wait of a handing-over worker for control answers in flight.
const HANDOVER_GRACE: Duration = Duration::from_millis(300);

/// Push the kernel's dirty pages for this mount down to the daemon so that
/// every write(2) that returned before the cut is in it.
fn flush_kernel_cache(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)
}

/// Hand over to a new worker: stop and save tracking, tell the
/// supervisor, answer, exit. Requests this worker has not answered are
/// resent to the next one.
fn restart(tracker: &Tracker, ctx: &WorkerCtx, dir: &Path) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    if RINGS.load(SeqCst) {
        return Response::err(format!(
            "{} serves FUSE over io_uring, whose rings die with the worker: it cannot be handed to a new worker. Unmount and mount it again (or mount it with --fuse-transport dev to allow restarts)",
            dir.display()
        ));
    }
    if HANDING_OVER.swap(true, SeqCst) {
        return Response::err("a restart is already under way");
    }
    let frozen = match tracker.freeze_clean() {
        Ok(f) => f,
        Err(e) => {
            HANDING_OVER.store(false, SeqCst);
            return Response::err(format!(
                "cannot save the tracking state of {} for the handover: {e}",
                dir.display()
            ));
        }
    };
    tracing::info!(
        "restart: tracking saved; handing {} over to a new worker",
        dir.display()
    );
    ctx.link.tell(crate::fuse::supervisor::WorkerMsg::Handover);
    // Changes to tracked disks stay stopped until this process is gone.
    std::mem::forget(frozen);
    let spawned = std::thread::Builder::new()
        .name("vdrep-handover".into())
        .spawn(|| {
            // Wait for the answers being written (this request's too; new
            // requests are refused). One blocked on the frozen tracker
            // would never finish: its client sees the connection close.
            let t0 = std::time::Instant::now();
            while IN_FLIGHT.load(SeqCst) > 0 && t0.elapsed() < HANDOVER_GRACE {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::process::exit(0);
        });
    if spawned.is_err() {
        std::process::exit(0);
    }
    Response {
        ok: true,
        pid: Some(ctx.status.supervisor_pid),
        worker: Some(ctx.status.clone()),
        ..Default::default()
    }
}

fn handle(
    req: &Request,
    tracker: &Tracker,
    (rep, configured, ctx): (
        &Arc<crate::sender::Replicator>,
        &reload::Configured,
        &WorkerCtx,
    ),
    (dir, keys): (&Path, Option<&Path>),
) -> Response {
    match req {
        Request::Restart => restart(tracker, ctx, dir),
        Request::Reload => match configured.reload(rep, dir) {
            Ok(lines) => Response {
                ok: true,
                reload: Some(lines),
                ..Default::default()
            },
            Err(e) => Response::err(e),
        },
        Request::Events { after, wait_secs } => Response {
            ok: true,
            events: Some(rep.events().since(
                *after,
                Duration::from_secs((*wait_secs).min(crate::events::MAX_WAIT_SECS)),
            )),
            ..Default::default()
        },
        Request::Status => {
            // One look at the VMs (each costs a listing of every VM's
            // logs: 256 with 256 VMs).
            let vms = rep.status();
            let now = jiff::Zoned::now();
            Response {
                ok: true,
                status: Some(tracker.status()),
                pid: Some(ctx.status.supervisor_pid),
                worker: Some(ctx.status.clone()),
                rates: Some(
                    vms.iter()
                        .filter_map(|v| {
                            Some((v.vm.clone(), configured.rate_now(rep, &v.vm, &now)?))
                        })
                        .collect(),
                ),
                warnings: cert_warnings(rep, &vms, keys),
                replication: Some(vms),
                ..Default::default()
            }
        }
        Request::Protect { spec } => match rep.protect((**spec).clone()) {
            Ok(warnings) => Response {
                ok: true,
                warnings,
                ..Default::default()
            },
            Err(e) => Response::err(e),
        },
        Request::Unprotect { vm } => match rep.unprotect(vm) {
            Ok(()) => Response {
                ok: true,
                ..Default::default()
            },
            Err(e) => Response::err(e),
        },
        Request::Sync { vm, timeout_secs } => {
            let vms = match vm {
                Some(v) => vec![v.clone()],
                None => rep.vm_names(),
            };
            if vms.is_empty() {
                return Response::err(format!("no VM is protected under {}", dir.display()));
            }
            let t = std::time::Duration::from_secs(*timeout_secs);
            let mut synced = Vec::new();
            for v in vms {
                match rep.sync(&v, t) {
                    Ok(c) => synced.push((v, c)),
                    Err(e) => return Response::err(e),
                }
            }
            Response {
                ok: true,
                synced: Some(synced),
                ..Default::default()
            }
        }
        Request::Resync {
            vm,
            background,
            timeout_secs,
        } => match rep.resync_now(
            vm,
            !*background,
            std::time::Duration::from_secs(*timeout_secs),
        ) {
            Ok(r) => Response {
                ok: true,
                resync: r,
                ..Default::default()
            },
            Err(e) => Response::err(e),
        },
        Request::Verify { vm, timeout_secs } => {
            match rep.verify(vm, std::time::Duration::from_secs(*timeout_secs)) {
                Ok(v) => Response {
                    ok: true,
                    verify: Some(v),
                    ..Default::default()
                },
                Err(e) => Response::err(e),
            }
        }
        Request::Cut => {
            if let Err(e) = flush_kernel_cache(dir) {
                return Response::err(format!(
                    "cannot flush the kernel cache of {} before the cut: {e}",
                    dir.display()
                ));
            }
            match tracker.cut() {
                Ok(c) => Response {
                    ok: true,
                    cut: Some(c),
                    ..Default::default()
                },
                Err(e) => Response::err(e),
            }
        }
        Request::Fence { vm, on, peek } => {
            let Some(spec) = rep.spec(vm) else {
                return Response::err(format!(
                    "VM {vm} is not protected under {}",
                    dir.display()
                ));
            };
            let missing = if *peek {
                Vec::new()
            } else {
                tracker.fence(&spec.disks, *on)
            };
            if !missing.is_empty() && *on {
                tracker.fence(&spec.disks, false);
                return Response::err(format!(
                    "cannot fence {vm}: disk(s) {} are not tracked under {}",
                    missing.join(", "),
                    dir.display()
                ));
            }
            let disks = spec
                .disks
                .iter()
                .filter_map(|d| {
                    let (id, _, _, _) = tracker.disk_info(d)?;
                    Some((d.clone(), id, tracker.disk_base_cycle(d).unwrap_or(0)))
                })
                .collect();
            Response {
                ok: true,
                fence: Some(control::FenceReport {
                    keys: rep.keys_dir(),
                    block_size: tracker.block_size(),
                    mount_disks: tracker.disk_names(),
                    disks,
                    spec,
                }),
                ..Default::default()
            }
        }
        Request::Release { vm, disks, to } => {
            if rep.spec(vm).is_some() {
                return Response::err(format!(
                    "{vm} is still protected: unprotect it before moving its disks out"
                ));
            }
            if let Err(e) = flush_kernel_cache(dir) {
                return Response::err(format!(
                    "cannot flush the kernel cache of {}: {e}",
                    dir.display()
                ));
            }
            match tracker.release(disks, to) {
                Ok(v) => Response {
                    ok: true,
                    released: Some(v),
                    ..Default::default()
                },
                Err(e) => Response::err(e),
            }
        }
        Request::Take { disks } => {
            for d in disks {
                let Some(id) = crate::replica::parse_hex_id(&d.id) else {
                    return Response::err(format!("{}: bad disk id {}", d.name, d.id));
                };
                if let Err(e) = tracker.take(&d.from, &d.name, id, d.cycle) {
                    return Response::err(e);
                }
            }
            Response {
                ok: true,
                ..Default::default()
            }
        }
        Request::DropPreimages { disks } => {
            let missing = tracker.drop_preimages(disks);
            if missing.is_empty() {
                Response {
                    ok: true,
                    ..Default::default()
                }
            } else {
                Response::err(format!(
                    "disk(s) {} are not tracked under {}",
                    missing.join(", "),
                    dir.display()
                ))
            }
        }
        Request::Shutdown { lazy } => match unmount(dir, *lazy) {
            Ok(()) => Response {
                ok: true,
                // The supervisor exits after the worker saved its state.
                pid: Some(ctx.status.supervisor_pid),
                ..Default::default()
            },
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Response::err(format!(
                "{} is busy (a VM, shell or program still uses it); stop it, or use `vdrep umount --lazy`",
                dir.display()
            )),
            Err(e) => Response::err(format!("unmounting {}: {e}", dir.display())),
        },
    }
}

/// Wait until process `pid` is gone (bounded).
pub fn wait_pid_gone(pid: u32, timeout: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Stop the mount at `dir` cleanly: unmount (lazily if `lazy`) and wait up
/// to two minutes for its daemon to save state and exit.
pub fn stop(dir: &Path, lazy: bool) -> Result<(), DaemonError> {
    let r = control::call_ok(dir, &Request::Shutdown { lazy })?;
    if let Some(pid) = r.pid {
        if !wait_pid_gone(pid, Duration::from_secs(120)) {
            return Err(DaemonError::StillRunning {
                dir: dir.to_path_buf(),
                pid,
            });
        }
    }
    Ok(())
}

/// Start a mount daemon over `dir` in the background and return once the
/// mount is live: `vdrep mount DIR --keys KEYS --block-size N`.
///
/// This is a new process, not [`mount`] in this one, because the daemon
/// forks and a process that already runs threads (the receiver) must not
/// fork into code that allocates or spawns threads.
pub fn spawn(dir: &Path, keys: &Path, block_size: u32) -> Result<(), DaemonError> {
    let exe = std::env::current_exe()
        .map_err(|e| DaemonError::Spawn(format!("cannot find the vdrep binary: {e}")))?;
    let out = std::process::Command::new(exe)
        .arg("mount")
        .arg(dir)
        .arg("--keys")
        .arg(keys)
        .arg("--block-size")
        .arg(block_size.to_string())
        // Its readiness is not this process's (a unit's main process).
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| DaemonError::Spawn(format!("cannot run vdrep mount: {e}")))?;
    if !out.status.success() {
        return Err(DaemonError::Spawn(format!(
            "vdrep mount {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
