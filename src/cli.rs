//! The `vdrep` command line: one binary, one subcommand per operation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::control::{self, ControlError, Request};
use crate::daemon::{self, MountOptions};
use crate::fs::FsOptions;
use crate::tracking::{DiskState, TrackConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vdrep",
    version,
    about = "Virtual-disk replicator: track VM disk writes through a FUSE mount and seal them into change logs (.hrl)",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Make a site identity: KEYDIR/SITE.crt (hand it to peers) and
    /// KEYDIR/SITE.key (private, mode 0600).
    Init(crate::transport::cli::KeysInitArgs),
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount vdrep over DIR itself and track writes to the disk images in it.
    ///
    /// Returns once the mount is live; the daemon keeps running in the
    /// background (logs in DIR/.vdrep/daemon.log) until `vdrep umount DIR`.
    Mount {
        /// The folder holding the VM disks; it stays usable at the same path.
        dir: PathBuf,
        /// Stay in the foreground and log to stderr.
        #[arg(long)]
        foreground: bool,
        /// Tracking granularity in bytes (power of two, 512..1048576).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// File-name patterns of tracked disks (repeatable; replaces the default
        /// *.vhd *.vhdx *.img *.raw *.qcow2).
        #[arg(long = "pattern")]
        patterns: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Disable the kernel write-back cache (every write goes straight to vdrep).
        #[arg(long)]
        no_writeback_cache: bool,
        /// This site's identity folder (made by `vdrep keys init`), needed to
        /// replicate the disks with `vdrep protect`.
        #[arg(long)]
        keys: Option<PathBuf>,
    },
    /// Unmount DIR cleanly (saves the dirty bitmaps so tracking survives).
    Umount {
        dir: PathBuf,
        /// Detach now even if files are open; the daemon stops when they close.
        #[arg(long)]
        lazy: bool,
    },
    /// Seal the current cycle of every tracked disk under DIR at one instant
    /// and print the path of each sealed log, one per line.
    Cut {
        dir: PathBuf,
        /// Print the whole cut report as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Show tracked disks and protected VMs: state, last recovery point, lag
    /// (RPO), bytes pending, throughput, last error, next retry. Without DIR,
    /// every running mount.
    Status {
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Site identities for replication.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Run the receiver at the secondary site (foreground; logs to stderr).
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Replica store folder (one namespace per sending site).
        #[arg(long)]
        store: PathBuf,
        /// This site's identity folder (`vdrep keys init`).
        #[arg(long)]
        keys: PathBuf,
        /// Certificate of a sending site to accept (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Protect a VM: replicate its disks (files under a `vdrep mount`) to a
    /// receiver. Checks prerequisites and starts initial replication.
    Protect {
        /// VM name (one path component).
        name: String,
        /// Receiver address HOST:PORT.
        #[arg(long)]
        to: String,
        /// The receiver's certificate (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Replication interval: 30s, 5m, 15m, any N[s|m|h], or `continuous`.
        #[arg(long, default_value = "5m")]
        every: String,
        /// Bandwidth cap, bytes/s with optional K/M/G suffix (e.g. 50M).
        #[arg(long)]
        max_rate: Option<String>,
        /// Pending changes of a disk (in % of its size) above which it is
        /// tracked bitmap-only and its changes are shipped as one cycle.
        #[arg(long, default_value = "50%")]
        resync_threshold: String,
        /// When automatic resyncs run, local time: HH:MM-HH:MM (may wrap
        /// midnight), +weekends for all of Saturday and Sunday, or `always`.
        /// Default: 18:00-08:00+weekends.
        #[arg(long)]
        resync_window: Option<String>,
        #[command(flatten)]
        app: AppHookArgs,
        /// The VM's disk files (all under the same vdrep mount).
        #[arg(required = true)]
        disks: Vec<PathBuf>,
    },
    /// Stop protecting a VM (its replica stays at the receiver).
    Unprotect {
        name: String,
        /// The mounted folder holding the VM's disks (default: search all mounts).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Force a cut now and wait until the receiver durably applied it.
    /// TARGET is a VM name or a mounted folder (all its VMs).
    Sync {
        target: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List a VM's recovery points at the secondary site, newest first:
    /// time, id, history bytes, consistency, pinned (exposed).
    Points {
        /// VM name.
        name: String,
        /// The receiver's store folder (`vdrep receive --store`).
        #[arg(long)]
        store: PathBuf,
        /// The sending site (needed only if several sites replicate a VM of this name).
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fail a VM over. `--test` (replica site) exposes a recovery point's
    /// disks as bootable VHD files (copy-on-write: the replica and
    /// replication are untouched), `--cleanup` removes it; `--planned`
    /// (active site, both up), `--unplanned` (replica site, active site
    /// gone) and `--commit` change which site runs the VM.
    Failover(FailoverArgs),
    /// At the old primary, once it is back after an unplanned failover:
    /// stop its copy of the VM, take its disks into this site's store as
    /// the replica and have the now-active site replicate back (a checksum
    /// resync first overwrites whatever this site wrote that never shipped).
    Reverse {
        /// VM name.
        name: String,
        /// The VM's tracking folder here (mounted, with the VM protected).
        #[arg(long)]
        dir: PathBuf,
        /// This site's store (its receiver must be running).
        #[arg(long)]
        store: PathBuf,
        /// This site's receiver address as the active site reaches it.
        #[arg(long)]
        reverse_to: String,
    },
    /// Recovery plans: fail several VMs over in ordered groups.
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Resynchronize a VM's disks by checksums now: compare the digests of
    /// every block with the receiver's newest point and ship only the
    /// blocks that differ, as one recovery point (history is kept). Waits
    /// until it is complete, with a progress bar on a terminal.
    Resync {
        name: String,
        /// Only schedule it (it starts as soon as the VM's worker is free).
        #[arg(long)]
        background: bool,
        /// Give up waiting after this many seconds (the resync goes on).
        #[arg(long, default_value_t = 86400)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Online verify: ship pending changes, then compare the digests of the
    /// source (as of a fresh cut) with the receiver's newest point without
    /// shipping data. Prints the differing byte ranges; exit status 1 if
    /// any differ, 0 if the replica is identical.
    Verify {
        name: String,
        #[arg(long, default_value_t = 86400)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark: digest a file's 4 KiB blocks as a resync does, on 1 and
    /// on every core; prints GB/s (the file is read once into memory).
    #[command(hide = true)]
    HashBench {
        file: PathBuf,
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
    },
    /// Inspect, verify and apply change logs (.hrl).
    Hrl {
        #[command(subcommand)]
        cmd: crate::hrl::cli::HrlCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Run a recovery plan (groups of VMs in order, with pre/post scripts;
    /// format in `vdrep::roles::plan`): a test failover of every VM with
    /// --test, an unplanned failover (newest point) with --unplanned.
    Failover {
        /// The plan file.
        plan: PathBuf,
        /// The receiver's store at this (secondary) site.
        #[arg(long)]
        store: PathBuf,
        /// Test failover of every VM (copy-on-write; replication continues).
        #[arg(
            long,
            conflicts_with = "unplanned",
            required_unless_present = "unplanned"
        )]
        test: bool,
        /// Unplanned failover of every VM to its newest point.
        #[arg(long)]
        unplanned: bool,
        /// Remove the test failovers of a plan's VMs instead.
        #[arg(long, requires = "test")]
        cleanup: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `vdrep failover NAME --store DIR MODE ...`.
#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// VM name.
    pub name: String,
    /// The receiver's store folder (`vdrep receive --store`).
    #[arg(long)]
    pub store: PathBuf,
    /// The sending site (needed only if several sites replicate a VM of this name).
    #[arg(long)]
    pub site: Option<String>,
    #[command(flatten)]
    pub mode: FailoverMode,
    /// With --test or --unplanned: the point to use: `latest` (default), a
    /// point id from `vdrep points`, a UTC time (2024-05-01T12:00:00Z: the
    /// newest point at or before it), @UNIXSECS, or an age (-5m).
    #[arg(long)]
    pub point: Option<String>,
    /// With --planned: the VM's tracking folder at this (active) site
    /// (default: the running mount that protects NAME).
    #[arg(long, requires = "planned")]
    pub dir: Option<PathBuf>,
    /// With --planned: this site's receiver address as the other site
    /// reaches it (HOST:PORT); the VM replicates back to it.
    #[arg(long, requires = "planned")]
    pub reverse_to: Option<String>,
    /// With --planned: give up shipping the last cycle after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// With --test: mount the VHD files here instead of STORE/failover/SITE/NAME.
    #[arg(long, requires = "test")]
    pub at: Option<PathBuf>,
    /// With --test: also start QEMU on the exposed disks (KVM if usable, else TCG).
    #[arg(long, requires = "test")]
    pub boot: bool,
    /// With --boot: a kernel to boot directly (else the disks' boot loader).
    #[arg(long, requires = "boot")]
    pub kernel: Option<PathBuf>,
    /// With --boot and --kernel: its initrd.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// With --boot and --kernel: the kernel command line.
    #[arg(long, requires = "kernel")]
    pub append: Option<String>,
    /// With --boot: `kvm`, `tcg`, or `auto` (KVM if a probe boot under it
    /// works, else TCG; the answer is cached in the run folder).
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"], requires = "boot")]
    pub accel: String,
    /// With --boot: guest memory in MiB.
    #[arg(long, default_value_t = 512, requires = "boot")]
    pub memory: u32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `vdrep failover` does (exactly one).
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct FailoverMode {
    /// Test failover: expose a recovery point as VHD files (copy-on-write).
    #[arg(long)]
    pub test: bool,
    /// Remove the VM's test failover (stops a --boot test VM, unmounts,
    /// deletes the scratch overlay).
    #[arg(long)]
    pub cleanup: bool,
    /// Planned failover, run at the ACTIVE site while both sites are up:
    /// fence the VM's disks, ship the last cycle, verify every block, and
    /// make the other site active, replicating back here (zero loss).
    /// --store is this site's store (it takes the replica).
    #[arg(long)]
    pub planned: bool,
    /// Unplanned failover, run at the REPLICA site when the active site is
    /// gone: a recovery point (--point) becomes the VM's live disks here,
    /// mounted and tracked; not protected until `vdrep reverse`.
    #[arg(long)]
    pub unplanned: bool,
    /// Make a failover at this site final (its older points are dropped).
    #[arg(long)]
    pub commit: bool,
    /// Cancel an uncommitted unplanned failover at this site: stop the live
    /// disks' mount, discard every write made on them since the failover,
    /// and put the replica and all its recovery points back exactly as they
    /// were; replication from the original primary resumes.
    #[arg(long)]
    pub cancel: bool,
}

pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn control_err(e: ControlError) -> i32 {
    eprintln!("vdrep: {e}");
    match e {
        ControlError::NotRunning { .. } => 2,
        _ => 1,
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    run(cli.cmd)
}

pub fn run(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Mount {
            dir,
            foreground,
            block_size,
            patterns,
            threads,
            no_writeback_cache,
            keys,
        } => {
            let mut track = TrackConfig {
                block_size,
                ..TrackConfig::default()
            };
            if !patterns.is_empty() {
                track.patterns = patterns;
            }
            let fs = FsOptions {
                n_threads: threads.max(1),
                writeback_cache: !no_writeback_cache,
                ..FsOptions::default()
            };
            let keys = match keys.map(|k| std::fs::canonicalize(&k).map_err(|e| (k, e))) {
                None => None,
                Some(Ok(k)) => Some(k),
                Some(Err((k, e))) => {
                    eprintln!("vdrep: --keys {}: {e}", k.display());
                    return 2;
                }
            };
            daemon::mount(MountOptions {
                dir,
                foreground,
                track,
                fs,
                keys,
            })
        }
        Cmd::Umount { dir, lazy } => umount(dir, lazy),
        Cmd::Cut { dir, json } => match control::call(&dir, &Request::Cut) {
            Err(e) => control_err(e),
            Ok(r) if !r.ok => {
                eprintln!("vdrep: cut failed: {}", r.error.unwrap_or_default());
                1
            }
            Ok(r) => {
                let Some(cut) = r.cut else {
                    eprintln!("vdrep: the daemon answered without a cut report");
                    return 1;
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&cut).unwrap_or_default());
                }
                let mut failed = 0;
                for d in &cut.disks {
                    match (&d.log, &d.error) {
                        (Some(p), None) => {
                            if !json {
                                println!("{}", p.display());
                            }
                        }
                        (Some(p), Some(e)) => {
                            if !json {
                                println!("{}", p.display());
                            }
                            eprintln!("vdrep: {}: {e}", d.disk);
                        }
                        (None, e) => {
                            failed += 1;
                            eprintln!(
                                "vdrep: {}: no log for cycle {}: {}",
                                d.disk,
                                d.cycle,
                                e.as_deref().unwrap_or("unknown reason")
                            );
                        }
                    }
                }
                if failed > 0 {
                    3
                } else {
                    0
                }
            }
        },
        Cmd::Status { dir, json } => status(dir, json),
        Cmd::Keys {
            cmd: KeysCmd::Init(a),
        } => crate::transport::cli::run_keys_init(&a),
        Cmd::Receive {
            listen,
            store,
            keys,
            trust,
            retention,
        } => {
            init_cli_logging();
            let (retention, prune_every) = match retention.policy() {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("vdrep: receive: {e}");
                    return 2;
                }
            };
            match crate::receiver::run(&crate::receiver::ReceiveOptions {
                listen,
                store,
                keys,
                trust,
                retention,
                prune_every,
            }) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vdrep: receive: {e}");
                    1
                }
            }
        }
        Cmd::Protect {
            name,
            to,
            trust,
            every,
            max_rate,
            resync_threshold,
            resync_window,
            app,
            disks,
        } => protect(
            name,
            to,
            trust,
            (every, max_rate),
            (resync_threshold, resync_window.unwrap_or_default()),
            app,
            disks,
        ),
        Cmd::Unprotect { name, dir } => {
            let mounts = match dir {
                Some(d) => vec![d],
                None => control::running_mounts(),
            };
            for m in mounts {
                if let Ok(r) = control::call(&m, &Request::Unprotect { vm: name.clone() }) {
                    if r.ok {
                        println!("{name}: no longer protected (the replica stays at the receiver)");
                        return 0;
                    }
                }
            }
            eprintln!("vdrep: VM {name} is not protected by any running mount");
            2
        }
        Cmd::Sync { target, timeout } => sync(&target, timeout),
        Cmd::Points {
            name,
            store,
            site,
            json,
        } => crate::failover::cli::points(&name, &store, site, json),
        Cmd::Failover(a)
            if a.mode.planned || a.mode.unplanned || a.mode.commit || a.mode.cancel =>
        {
            crate::roles::cli::run_failover(a)
        }
        Cmd::Failover(a) => crate::failover::cli::failover(a),
        Cmd::Reverse {
            name,
            dir,
            store,
            reverse_to,
        } => crate::roles::cli::run_reverse(&name, &dir, &store, &reverse_to),
        Cmd::Plan {
            cmd:
                PlanCmd::Failover {
                    plan,
                    store,
                    test,
                    unplanned: _,
                    cleanup,
                    json,
                },
        } => {
            let mode = if cleanup {
                "--cleanup"
            } else if test {
                "--test"
            } else {
                "--unplanned"
            };
            let args = vec![
                mode.to_string(),
                "--store".to_string(),
                store.to_string_lossy().into_owned(),
            ];
            crate::roles::plan::cli(&plan, &args, mode.trim_start_matches('-'), json)
        }
        Cmd::Resync {
            name,
            background,
            timeout,
            json,
        } => resync(&name, background, timeout, json),
        Cmd::Verify {
            name,
            timeout,
            json,
        } => verify(&name, timeout, json),
        Cmd::Hrl { cmd } => crate::hrl::cli::run(cmd),
        Cmd::HashBench { file, block_size } => hash_bench(&file, block_size),
    }
}

fn umount(dir: PathBuf, lazy: bool) -> i32 {
    match control::call(&dir, &Request::Shutdown { lazy }) {
        Ok(r) if r.ok => {
            if let Some(pid) = r.pid {
                if !daemon::wait_pid_gone(pid, Duration::from_secs(120)) {
                    eprintln!(
                        "vdrep: {} is unmounted but the daemon (pid {pid}) is still saving state or serving open files",
                        dir.display()
                    );
                    return 1;
                }
            }
            0
        }
        Ok(r) => {
            eprintln!("vdrep: {}", r.error.unwrap_or_default());
            1
        }
        Err(ControlError::NotRunning { .. }) => {
            // A daemon that died leaves a dead mount behind: remove it.
            match daemon::unmount(&dir, lazy) {
                Ok(()) => {
                    eprintln!(
                        "vdrep: no daemon was running for {}; removed the stale mount (its disks will need a resync)",
                        dir.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!(
                        "vdrep: {} is not mounted by a running vdrep: {e}",
                        dir.display()
                    );
                    2
                }
            }
        }
        Err(e) => control_err(e),
    }
}

fn init_cli_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VDREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `30s`, `5m`, `15m`, `1h`, `90` (seconds) or `continuous` (0).
/// `vdrep protect`'s application-consistency hook.
#[derive(clap::Args, Debug, Clone)]
pub struct AppHookArgs {
    /// Application-consistent points: a command that quiesces the guest,
    /// run as `CMD freeze VM` just before a cut and `CMD thaw VM` right
    /// after (e.g. scripts/app-hook-virsh.sh, scripts/app-hook-qga.sh).
    /// Points cut while it held the guest frozen are marked `app`.
    #[arg(long, value_name = "CMD")]
    pub app_hook: Option<String>,
    /// Least time between application-consistent cuts (N[s|m|h], or
    /// `continuous` for every cut). Default 1h.
    #[arg(long, requires = "app_hook", value_name = "INTERVAL")]
    pub app_every: Option<String>,
    /// Time limit of one hook run; a freeze that takes longer is killed
    /// and the cut is crash-consistent. Default 30s.
    #[arg(long, requires = "app_hook", value_name = "INTERVAL")]
    pub app_timeout: Option<String>,
}

/// `vdrep receive`'s retention of recovery points (per VM): every point
/// for `--keep-all-for`, then one per `--then-one-per` (an
/// application-consistent one where the interval has one) up to
/// `--keep-for`; the newest point is always kept, and so are the points of
/// a failover that is not committed and points exposed by a test failover.
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Keep every point this long (N[s|m|h|d]).
    #[arg(long, default_value = "2h", value_name = "INTERVAL")]
    pub keep_all_for: String,
    /// Older points: keep one per this interval.
    #[arg(long, default_value = "1h", value_name = "INTERVAL")]
    pub then_one_per: String,
    /// Drop points older than this (`forever`: never).
    #[arg(long, default_value = "72h", value_name = "INTERVAL")]
    pub keep_for: String,
    /// Keep at most this many points per VM.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// How often to apply the policy (`never`: keep everything).
    #[arg(long, default_value = "1m", value_name = "INTERVAL")]
    pub prune_every: String,
}

impl RetentionArgs {
    /// The policy and how often to apply it.
    pub fn policy(
        &self,
    ) -> Result<(crate::replica::RetentionPolicy, Option<std::time::Duration>), String> {
        let d = |flag: &str, v: &str| -> Result<std::time::Duration, String> {
            parse_interval(v)
                .map(std::time::Duration::from_secs)
                .map_err(|e| format!("--{flag}: {e}"))
        };
        let max_age = if self.keep_for.eq_ignore_ascii_case("forever") {
            None
        } else {
            Some(d("keep-for", &self.keep_for)?)
        };
        let prune_every = if self.prune_every.eq_ignore_ascii_case("never") {
            None
        } else {
            Some(d("prune-every", &self.prune_every)?).filter(|x| !x.is_zero())
        };
        if self.keep_last == Some(0) {
            return Err("--keep-last 0: the newest point is always kept; give 1 or more".into());
        }
        Ok((
            crate::replica::RetentionPolicy {
                keep_last: self.keep_last,
                max_age,
                thin_after: Some(d("keep-all-for", &self.keep_all_for)?),
                thin_every: Some(d("then-one-per", &self.then_one_per)?),
            },
            prune_every,
        ))
    }
}

pub fn parse_interval(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("continuous") {
        return Ok(0);
    }
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not an interval (try 30s, 5m, 15m or continuous)"))?;
    if n == 0 {
        return Err("an interval of 0 is `continuous`".into());
    }
    Ok(n * mult)
}

/// `50M`, `1G`, `800K`, `12345` (bytes per second).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (try 50M for 50 MiB/s)"))?;
    if n <= 0.0 {
        return Err("the rate must be positive".into());
    }
    Ok((n * mult as f64) as u64)
}

/// `50%`, `50` or `0.5` (a fraction below 1) -> percent.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, pct) = match t.strip_suffix('%') {
        Some(n) => (n, true),
        None => (t, false),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (try 50%)"))?;
    let v = if !pct && v > 0.0 && v < 1.0 {
        v * 100.0
    } else {
        v
    };
    if !(v > 0.0 && v <= 1000.0) {
        return Err(format!("{s:?} must be above 0% (and at most 1000%)"));
    }
    Ok(v)
}

fn protect(
    name: String,
    to: String,
    trust: Vec<PathBuf>,
    (every, max_rate): (String, Option<String>),
    (threshold, window): (String, String),
    AppHookArgs {
        app_hook,
        app_every,
        app_timeout,
    }: AppHookArgs,
    disks: Vec<PathBuf>,
) -> i32 {
    let app_hook = match app_hook {
        None => None,
        Some(cmd) if cmd.trim().is_empty() => {
            eprintln!("vdrep: --app-hook: give a command (e.g. scripts/app-hook-virsh.sh)");
            return 2;
        }
        Some(cmd) => {
            use crate::sender::app_hook as ah;
            let every = app_every.as_deref().map(parse_interval).transpose();
            let timeout = app_timeout.as_deref().map(parse_interval).transpose();
            let every = match every {
                Ok(v) => v.unwrap_or(ah::DEFAULT_EVERY_SECS),
                Err(e) => {
                    eprintln!("vdrep: --app-every: {e}");
                    return 2;
                }
            };
            let timeout_secs = match timeout {
                Ok(Some(0)) => {
                    eprintln!("vdrep: --app-timeout: give a time limit such as 30s");
                    return 2;
                }
                Ok(v) => v.unwrap_or(ah::DEFAULT_TIMEOUT_SECS),
                Err(e) => {
                    eprintln!("vdrep: --app-timeout: {e}");
                    return 2;
                }
            };
            Some(ah::AppHookSpec {
                cmd,
                every_secs: every,
                timeout_secs,
            })
        }
    };
    let resync_threshold_pct = match parse_percent(&threshold) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vdrep: --resync-threshold: {e}");
            return 2;
        }
    };
    if !window.is_empty() {
        if let Err(e) = crate::resync::Window::parse(&window) {
            eprintln!("vdrep: --resync-window: {e}");
            return 2;
        }
    }
    let every_secs = match parse_interval(&every) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vdrep: --every: {e}");
            return 2;
        }
    };
    let max_rate = match max_rate.as_deref().map(parse_rate).transpose() {
        Ok(v) => v.unwrap_or(0),
        Err(e) => {
            eprintln!("vdrep: --max-rate: {e}");
            return 2;
        }
    };
    let mut mount: Option<PathBuf> = None;
    let mut rels = Vec::new();
    for d in &disks {
        let Some((m, rel)) = control::mount_of(d) else {
            eprintln!(
                "vdrep: {} is not under a running vdrep mount (mount its folder with `vdrep mount DIR --keys KEYDIR`)",
                d.display()
            );
            return 2;
        };
        if mount.as_ref().is_some_and(|x| x != &m) {
            eprintln!("vdrep: the disks of one VM must be under the same vdrep mount");
            return 2;
        }
        mount = Some(m);
        rels.push(rel.to_string_lossy().into_owned());
    }
    let Some(mount) = mount else {
        eprintln!("vdrep: name at least one disk");
        return 2;
    };
    let mut trust_abs = Vec::new();
    for t in &trust {
        match std::fs::canonicalize(t) {
            Ok(p) => trust_abs.push(p),
            Err(e) => {
                eprintln!("vdrep: --trust {}: {e}", t.display());
                return 2;
            }
        }
    }
    let spec = crate::sender::ProtectSpec {
        vm: name.clone(),
        to,
        trust: trust_abs,
        every_secs,
        disks: rels,
        max_rate,
        resync_threshold_pct,
        resync_window: window,
        app_hook,
    };
    match control::call(&mount, &Request::Protect { spec }) {
        Err(e) => control_err(e),
        Ok(r) if r.ok => {
            for w in &r.warnings {
                eprintln!("vdrep: warning: {w}");
            }
            println!(
                "{name}: protected ({} disk(s) under {}); initial replication started — watch it with `vdrep status {}`",
                disks.len(),
                mount.display(),
                mount.display()
            );
            0
        }
        Ok(r) => {
            eprintln!(
                "vdrep: cannot protect {name}: {}",
                r.error.unwrap_or_default()
            );
            1
        }
    }
}

fn sync(target: &str, timeout: u64) -> i32 {
    let p = std::path::Path::new(target);
    let (mounts, vm) = if p.is_dir() {
        (vec![p.to_path_buf()], None)
    } else {
        // A VM name: find the mount protecting it.
        let found: Vec<PathBuf> = control::running_mounts()
            .into_iter()
            .filter(|m| {
                control::call(m, &Request::Status)
                    .ok()
                    .and_then(|r| r.replication)
                    .is_some_and(|v| v.iter().any(|s| s.vm == target))
            })
            .collect();
        if found.is_empty() {
            eprintln!("vdrep: no running mount protects a VM named {target}");
            return 2;
        }
        (found, Some(target.to_string()))
    };
    for m in mounts {
        let req = Request::Sync {
            vm: vm.clone(),
            timeout_secs: timeout,
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let (done, m, vm) = (done.clone(), m.clone(), vm.clone());
            std::thread::spawn(move || progress_bar(&m, vm.as_deref(), &done))
        });
        let res = control::call(&m, &req);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(b) = bar {
            let _ = b.join();
        }
        match res {
            Err(e) => return control_err(e),
            Ok(r) if !r.ok => {
                eprintln!("vdrep: sync failed: {}", r.error.unwrap_or_default());
                return 1;
            }
            Ok(r) => {
                for (vm, c) in r.synced.unwrap_or_default() {
                    println!("{vm}: recovery point {c} applied at the receiver");
                }
            }
        }
    }
    0
}

fn hash_bench(file: &std::path::Path, bs: usize) -> i32 {
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vdrep: {}: {e}", file.display());
            return 1;
        }
    };
    let all = crate::resync::hash_threads();
    for threads in [1, all] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let d = crate::resync::digest_blocks(&data, bs.max(512), threads);
            std::hint::black_box(d);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "threads={threads} bytes={} secs={best:.4} gbps={:.2}",
            data.len(),
            data.len() as f64 / best / 1e9
        );
    }
    0
}

/// The running mount protecting VM `name`.
fn mount_of_vm(name: &str) -> Option<PathBuf> {
    control::running_mounts().into_iter().find(|m| {
        control::call(m, &Request::Status)
            .ok()
            .and_then(|r| r.replication)
            .is_some_and(|v| v.iter().any(|s| s.vm == name))
    })
}

fn resync(name: &str, background: bool, timeout: u64, json: bool) -> i32 {
    let Some(m) = mount_of_vm(name) else {
        eprintln!("vdrep: no running mount protects a VM named {name}");
        return 2;
    };
    let req = Request::Resync {
        vm: name.to_string(),
        background,
        timeout_secs: timeout,
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = (!background && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let (done, m, vm) = (done.clone(), m.clone(), name.to_string());
        std::thread::spawn(move || progress_bar(&m, Some(&vm), &done))
    });
    let res = control::call(&m, &req);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(b) = bar {
        let _ = b.join();
    }
    match res {
        Err(e) => control_err(e),
        Ok(r) if !r.ok => {
            eprintln!("vdrep: resync failed: {}", r.error.unwrap_or_default());
            1
        }
        Ok(r) => {
            match (r.resync, json) {
                (Some(p), true) => {
                    println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default())
                }
                (Some(p), false) => println!(
                    "{name}: resync complete: {} blocks compared, {} differed and were sent{}",
                    p.blocks_compared,
                    p.blocks_sent,
                    p.resumed_from
                        .map(|o| format!(" (resumed at {})", human(o)))
                        .unwrap_or_default()
                ),
                (None, _) => println!("{name}: resync scheduled; watch it with `vdrep status`"),
            }
            0
        }
    }
}

fn verify(name: &str, timeout: u64, json: bool) -> i32 {
    let Some(m) = mount_of_vm(name) else {
        eprintln!("vdrep: no running mount protects a VM named {name}");
        return 2;
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let (done, m, vm) = (done.clone(), m.clone(), name.to_string());
        std::thread::spawn(move || progress_bar(&m, Some(&vm), &done))
    });
    let res = control::call(
        &m,
        &Request::Verify {
            vm: name.to_string(),
            timeout_secs: timeout,
        },
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(b) = bar {
        let _ = b.join();
    }
    let disks = match res {
        Err(e) => return control_err(e),
        Ok(r) if !r.ok => {
            eprintln!("vdrep: verify failed: {}", r.error.unwrap_or_default());
            return 2;
        }
        Ok(r) => r.verify.unwrap_or_default(),
    };
    let bad = disks.iter().any(|d| !d.differ.is_empty());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&disks).unwrap_or_default()
        );
    } else {
        for d in &disks {
            let bytes: u64 = d.differ.iter().map(|r| r.1).sum();
            println!(
                "{}: {} blocks compared with point {}: {}{}",
                d.disk,
                d.blocks_compared,
                d.replica_cycle,
                if d.differ.is_empty() {
                    "identical".to_string()
                } else {
                    format!("{} range(s), {} differ", d.differ.len(), human(bytes))
                },
                if d.blocks_skipped > 0 {
                    format!(
                        " ({} blocks written since are on their way, not judged)",
                        d.blocks_skipped
                    )
                } else {
                    String::new()
                }
            );
            for (off, len) in &d.differ {
                println!("  differs: offset {off} length {len}");
            }
        }
    }
    i32::from(bad)
}

fn status(dir: Option<PathBuf>, json: bool) -> i32 {
    let mounts = match dir {
        Some(d) => vec![d],
        None => control::running_mounts(),
    };
    if mounts.is_empty() {
        eprintln!("vdrep: no vdrep mount is running");
        return 2;
    }
    let mut all = Vec::new();
    for m in &mounts {
        match control::call(m, &Request::Status) {
            Err(e) => return control_err(e),
            Ok(r) => all.push(r),
        }
    }
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(&r.status).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("pid".into(), r.pid.into());
                    o.insert(
                        "replication".into(),
                        serde_json::to_value(&r.replication).unwrap_or_default(),
                    );
                }
                v
            })
            .collect();
        let out = if v.len() == 1 {
            v.into_iter().next().unwrap_or_default()
        } else {
            serde_json::Value::Array(v)
        };
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return 0;
    }
    for r in all {
        let Some(st) = r.status else { continue };
        println!(
            "{}  (daemon pid {}, last cut {}{})",
            st.root.display(),
            r.pid.unwrap_or(0),
            st.cut_seq,
            if st.previous_stop_clean {
                ""
            } else {
                ", previous stop was NOT clean"
            }
        );
        println!(
            "{:<40} {:<16} {:>8} {:>12} {:>12}",
            "DISK", "STATE", "CYCLE", "SIZE", "DIRTY"
        );
        for d in &st.disks {
            let (state, why) = match &d.state {
                DiskState::Normal => ("Normal", None),
                DiskState::ResyncRequired(w) => ("ResyncRequired", Some(w)),
            };
            println!(
                "{:<40} {:<16} {:>8} {:>12} {:>12}",
                d.name,
                state,
                d.cycle,
                human(d.size),
                human(d.dirty_bytes)
            );
            if let Some(w) = why {
                println!("    reason: {w}");
            }
        }
        for v in r.replication.unwrap_or_default() {
            println!(
                "VM {} -> {}  {:?}  every {}  point {}  lag {}  pending {}  rate {}/s{}",
                v.vm,
                v.to,
                v.state,
                if v.every_secs == 0 {
                    "continuous".to_string()
                } else {
                    format!("{}s", v.every_secs)
                },
                v.last_point.map_or("-".into(), |c| c.to_string()),
                v.lag_secs.map_or("-".into(), |l| format!("{l:.1}s")),
                human(v.bytes_pending),
                human(v.throughput_bps as u64),
                if v.state == crate::sender::VmState::InitialReplication && v.initial_total > 0 {
                    format!(
                        "  initial {:.0}% ({} of {})",
                        100.0 * v.initial_done as f64 / v.initial_total as f64,
                        human(v.initial_done),
                        human(v.initial_total)
                    )
                } else {
                    String::new()
                }
            );
            if let Some(p) = &v.resync {
                println!("    {}", resync_line(p));
            } else if let Some(p) = &v.last_resync {
                println!(
                    "    last {}: {} of {} blocks compared, {} differed, {} sent",
                    p.mode, p.blocks_compared, p.blocks_total, p.blocks_differ, p.blocks_sent
                );
            }
            for w in &v.resync_pending {
                println!("    resync required: {w} (window {})", v.resync_window);
            }
            if let Some(c) = v.last_app_point {
                let age = v.last_app_point_unix_ns.map_or(String::new(), |t| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    format!(", {:.0}s ago", now.saturating_sub(t) as f64 / 1e9)
                });
                let held = v
                    .app_frozen_ms
                    .map_or(String::new(), |ms| format!(", guest frozen {ms:.0} ms"));
                println!("    last app-consistent point {c}{age}{held}");
            }
            if let Some(e) = &v.app_hook_error {
                println!("    app hook failed (points are crash-consistent until it works): {e}");
            }
            for d in &v.bitmap_only {
                println!("    {d}: bitmap-only (pending changes passed the threshold; shipped as one cycle when the receiver is reachable)");
            }
            if let Some(e) = v.last_error {
                println!("    last error: {e}");
            }
            if let Some(t) = v.next_retry_unix {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                println!("    next retry in {}s", t.saturating_sub(now));
            }
        }
    }
    0
}

/// `resync [=====     ] 42% 1234/5678 blocks, 3 differ, 350 MiB/s, ETA 4s`
fn resync_line(p: &crate::sender::ResyncProgress) -> String {
    let f = p.blocks_compared as f64 / p.blocks_total.max(1) as f64;
    let w = 20;
    let fill = ((f * w as f64) as usize).min(w);
    format!(
        "{} {} [{}{}] {:>3.0}% {}/{} blocks, {} differ, {} sent, {}/s, ETA {}",
        p.mode,
        p.disk,
        "=".repeat(fill),
        " ".repeat(w - fill),
        f * 100.0,
        p.blocks_compared,
        p.blocks_total,
        p.blocks_differ,
        p.blocks_sent,
        human(p.rate_bps as u64),
        p.eta_secs.map_or("?".into(), |e| format!("{e:.0}s"))
    )
}

/// While a sync waits: one line on stderr with the state of each VM and,
/// during an initial copy, a bar with bytes, rate and ETA.
fn progress_bar(dir: &std::path::Path, vm: Option<&str>, done: &std::sync::atomic::AtomicBool) {
    use std::io::Write;
    let t0 = std::time::Instant::now();
    let mut drew = false;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        if t0.elapsed() < Duration::from_millis(500) {
            continue;
        }
        let Ok(r) = control::call(dir, &Request::Status) else {
            continue;
        };
        let mut line = String::new();
        for v in r.replication.unwrap_or_default() {
            if vm.is_some_and(|n| n != v.vm) {
                continue;
            }
            if let Some(p) = &v.resync {
                line += &format!("{} {}  ", v.vm, resync_line(p));
            } else if v.state == crate::sender::VmState::InitialReplication && v.initial_total > 0 {
                let f = v.initial_done as f64 / v.initial_total as f64;
                let w = 24;
                let fill = ((f * w as f64) as usize).min(w);
                let rate = v.initial_done as f64 / t0.elapsed().as_secs_f64().max(0.1);
                let eta = v.initial_total.saturating_sub(v.initial_done) as f64 / rate.max(1.0);
                line += &format!(
                    "{} initial [{}{}] {:>3.0}% {}/{} {}/s ETA {:.0}s  ",
                    v.vm,
                    "=".repeat(fill),
                    " ".repeat(w - fill),
                    f * 100.0,
                    human(v.initial_done),
                    human(v.initial_total),
                    human(rate as u64),
                    eta
                );
            } else {
                line += &format!(
                    "{} {:?} pending {}{}  ",
                    v.vm,
                    v.state,
                    human(v.bytes_pending),
                    v.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                );
            }
        }
        let width = 120;
        let line: String = line.chars().take(width).collect();
        eprint!("\r{line:<width$}");
        let _ = std::io::stderr().flush();
        drew = true;
    }
    if drew {
        eprint!("\r{:<120}\r", "");
    }
}
