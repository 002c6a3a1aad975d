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
//! [`control`] holds the daemon's control protocol and its client;
//! [`stop`] and [`spawn`] are the typed entry points other layers use to
//! stop a mount or start one in the background.

pub mod control;
pub mod reload;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use self::control::{Request, Response};
use crate::fs::FsOptions;
use crate::ipc::CallError;
use crate::tracking::{TrackConfig, Tracker};

#[derive(Debug, Clone)]
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
}

impl DaemonError {
    pub fn kind(&self) -> DaemonErrorKind {
        match self {
            DaemonError::Io { .. } => DaemonErrorKind::Io,
            DaemonError::Track(_) => DaemonErrorKind::Track,
            DaemonError::Control(_) => DaemonErrorKind::Control,
            DaemonError::StillRunning { .. } => DaemonErrorKind::StillRunning,
            DaemonError::Msg(_) | DaemonError::Spawn(_) => DaemonErrorKind::Start,
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
        return match serve(&dir, &opts, None) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vdrep: {e}");
                1
            }
        };
    }
    // Fork before any thread exists.
    let (rd, wr) = match nix::unistd::pipe() {
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
            let code = match serve(&dir, &opts, Some(wr)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
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

fn serve(dir: &Path, opts: &MountOptions, ready: Option<OwnedFd>) -> Result<(), DaemonError> {
    let mut ready = ready;
    let r = serve_inner(dir, opts, &mut ready);
    if let Err(e) = &r {
        notify(&mut ready, &format!("{e}\n"));
    }
    r
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

fn serve_inner(
    dir: &Path,
    opts: &MountOptions,
    ready: &mut Option<OwnedFd>,
) -> Result<(), DaemonError> {
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
    // Block termination signals in every thread; one thread waits for them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs.thread_block()
        .map_err(|e| DaemonError::Msg(format!("cannot block signals: {e}")))?;

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
    let session = crate::fs::mount(dir, tracker.clone(), &opts.fs).map_err(ioe(
        dir,
        "cannot mount the FUSE file system over the folder",
    ))?;

    // Control socket.
    let sock = control::socket_path(dir);
    let listener =
        crate::ipc::bind(&sock, dir).map_err(ioe(dir, "cannot bind the control socket"))?;
    let replicator =
        match crate::sender::Replicator::new(tracker.clone(), dir, opts.keys.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                return Err(DaemonError::Msg(format!(
                    "cannot start replication for {}: {e}",
                    dir.display()
                )))
            }
        };
    let configured = Arc::new(reload::Configured::new(opts.config.clone()));
    configured.set_schedules(opts.rate_schedules.clone());
    {
        let tracker = tracker.clone();
        let dir = dir.to_path_buf();
        let rep = replicator.clone();
        let configured = configured.clone();
        let keys = opts.keys.clone();
        crate::ipc::serve(
            listener,
            "vdrep-control",
            Some(&IN_FLIGHT),
            move |req: io::Result<Request>| match req {
                Err(e) => Response::err(format!("bad request: {e}")),
                Ok(req) => handle(&req, &tracker, (&rep, &configured), (&dir, keys.as_deref())),
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
            // Alive: the tracker's state can be read, and the folder answers
            // through the mount.
            move || {
                let _ = t2.status();
                std::fs::metadata(&d2).is_ok()
            },
        )
        .map_err(ioe(dir_static(), "cannot start the service monitor thread"))?;
    }
    let run = session.run();
    tracing::info!("FUSE session over {} ended", dir.display());
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

/// Certificates of this site (`keys`) and trusted by its VMs that expire
/// within 30 days (or are unreadable), for `vdrep status`.
fn cert_warnings(rep: &crate::sender::Replicator, keys: Option<&Path>) -> Vec<String> {
    use crate::transport::keys::{certs_in, expiry_warnings};
    let mut certs: Vec<PathBuf> = keys.and_then(|k| certs_in(k).ok()).unwrap_or_default();
    for v in rep.status() {
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

/// Control requests being answered; the daemon waits for them at exit so
/// that `vdrep umount` gets its answer.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Push the kernel's dirty pages for this mount down to the daemon so that
/// every write(2) that returned before the cut is in it.
fn flush_kernel_cache(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)
}

fn handle(
    req: &Request,
    tracker: &Tracker,
    (rep, configured): (&Arc<crate::sender::Replicator>, &reload::Configured),
    (dir, keys): (&Path, Option<&Path>),
) -> Response {
    match req {
        Request::Reload => match configured.reload(rep, dir) {
            Ok(lines) => Response {
                ok: true,
                reload: Some(lines),
                ..Default::default()
            },
            Err(e) => Response::err(e),
        },
        Request::Status => Response {
            ok: true,
            status: Some(tracker.status()),
            pid: Some(std::process::id()),
            replication: Some(rep.status()),
            rates: Some({
                let now = jiff::Zoned::now();
                rep.status()
                    .iter()
                    .filter_map(|v| Some((v.vm.clone(), configured.rate_now(rep, &v.vm, &now)?)))
                    .collect()
            }),
            warnings: cert_warnings(rep, keys),
            ..Default::default()
        },
        Request::Protect { spec } => match rep.protect(spec.clone()) {
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
        Request::Fence { vm, on } => {
            let Some(spec) = rep.spec(vm) else {
                return Response::err(format!(
                    "VM {vm} is not protected under {}",
                    dir.display()
                ));
            };
            let missing = tracker.fence(&spec.disks, *on);
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
                pid: Some(std::process::id()),
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
