//! The `vdrep` command line: one binary, one subcommand per operation.
//!
//! Argument definitions (clap) and thin handlers only, one file per
//! command family; they call the typed functions of the domain modules and
//! print what they return. Nothing outside this folder uses it
//! (`scripts/check-layers.sh`).
//!
//! - [`mount`]: `mount`, `umount`, `cut`, `status`;
//! - [`events`]: `events [DIR | --store STORE] [--follow] [--json]`;
//! - [`replication`]: `receive`, `protect`, `unprotect`, `sync`;
//! - [`points`]: `points`, `resync`, `verify`, `hash-bench`;
//! - [`objstore`]: the `--store s3://…` flags and `points` of an object store;
//! - [`failover`]: `failover`, `reverse`, `plan`;
//! - [`domain`]: the libvirt parts: `protect --domain`, `failover --domain`;
//! - [`config`]: `config check`, `reload`, the configuration file mapped onto
//!   `mount` and `receive`;
//! - [`keys`]: `keys init`; [`hrl`]: `hrl dump|verify|apply`;
//! - [`service`]: `completions`, `man`, `--log-format`;
//! - [`forget`]: `forget` (delete a VM's replica and history);
//! - [`fmt`]: sizes, progress lines and bars, error exit codes.

pub mod config;
pub mod domain;
pub mod events;
pub mod failover;
pub mod fmt;
pub mod forget;
pub mod hrl;
pub mod keys;
pub mod mount;
pub mod objstore;
pub mod points;
pub mod replication;
pub mod service;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use self::failover::{FailoverArgs, PlanCmd};
use self::replication::{AppHookArgs, RetentionArgs};

#[derive(Parser, Debug)]
#[command(
    name = "vdrep",
    version,
    about = "Virtual-disk replicator: track VM disk writes through a FUSE mount and seal them into change logs (.hrl)",
    propagate_version = true
)]
pub struct Cli {
    /// The configuration file (default /etc/vdrep/vdrep.toml, read by
    /// `mount` and `receive` if it exists; flags override it).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How `mount` and `receive` log, one event per line: text or JSON
    /// (default: the configuration's `[site] log_format`, else text).
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<service::LogFormatArg>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Check the configuration file: every problem is printed as
    /// FILE:LINE: KEY: what is wrong and what is allowed (exit status 2).
    Check {
        /// Check the file's content only; do not read the key folder,
        /// certificates and folders it names (e.g. a file for another machine).
        #[arg(long)]
        content_only: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Make a site identity: KEYDIR/SITE.crt (hand it to peers) and
    /// KEYDIR/SITE.key (private, mode 0600).
    Init(keys::KeysInitArgs),
    /// Replace this site's key pair; the old one moves to KEYDIR/retired/
    /// so peers can trust both until each has the new certificate.
    Rotate(keys::KeysRotateArgs),
    /// Make a new 256-bit key for encrypting replicas at rest (object
    /// stores): one line of 64 hex digits in FILE, mode 0600. Keep a copy
    /// off-site: without it no replica encrypted with it can be read.
    EncryptionKey(keys::EncryptionKeyArgs),
    /// Show this site's certificates and the peer certificates it trusts
    /// (from --dir/--trust, else the configuration's `[site] keys`,
    /// `[site] trust` and each VM's `trust`): name, fingerprint, expiry.
    /// A certificate that expires within 30 days is flagged, and the exit
    /// status is 1 while any is.
    Show(keys::KeysShowArgs),
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount vdrep over DIR itself and track writes to the disk images in it.
    ///
    /// Returns once the mount is live; the daemon keeps running in the
    /// background (logs in --log-file) until `vdrep umount DIR`. Under
    /// systemd, use the unit vdrep-mount@.service, which runs it with
    /// --foreground.
    /// With a configuration file, every `[[vm]]` whose disks are under DIR
    /// is protected as `vdrep protect` would with the same settings, and
    /// the `[[mount]]` entry and `[site] keys` give the defaults of the flags.
    Mount {
        /// The folder holding the VM disks; it stays usable at the same path.
        dir: PathBuf,
        /// Stay in the foreground and log to stderr; tell systemd when the
        /// mount is ready ($NOTIFY_SOCKET, Type=notify).
        #[arg(long)]
        foreground: bool,
        /// In the background, the daemon's log file (default
        /// /var/log/vdrep/mount-ESCAPED.log, ESCAPED as `systemd-escape
        /// --path DIR`).
        #[arg(long, value_name = "FILE", conflicts_with = "foreground")]
        log_file: Option<PathBuf>,
        /// Tracking granularity in bytes (power of two, 512..1048576).
        /// Default 4096.
        #[arg(long)]
        block_size: Option<u32>,
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
        /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics
        /// (e.g. 127.0.0.1:9477); overrides the `[[mount]]` entry's
        /// `metrics_listen`.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// How FUSE requests travel: `dev` (/dev/fuse; a worker crash is
        /// survived) or `uring` (FUSE over io_uring, faster; a worker crash
        /// ends the mount). Overrides `VDREP_FUSE_TRANSPORT` and the
        /// `[[mount]]` entry's `fuse_transport`; default `dev`.
        #[arg(long, value_name = "dev|uring")]
        fuse_transport: Option<String>,
        /// With `uring`: switch the kernel's FUSE-over-io_uring on
        /// (/sys/module/fuse/parameters/enable_uring = Y) if it is off.
        #[arg(long)]
        enable_uring: bool,
    },
    /// Print the state changes of the protected VMs of a running mount:
    /// protection started/stopped, state changes with their reason
    /// (Warning, Critical and back), recovery points committed, alerts
    /// raised and cleared (RPO exceeded), resyncs started and finished,
    /// failover steps (fence, release, failback, commit). With --store, the
    /// running receiver's instead (failover steps: test failover, promote,
    /// cancel, commit, adopt; boot checks, points dropped, logs that could
    /// not be applied). Without --follow, the recent events
    /// the daemon kept, then exit.
    Events {
        /// A mounted folder (default: the only running mount).
        dir: Option<PathBuf>,
        /// The store of a running `vdrep receive`: its events instead.
        #[arg(long, conflicts_with = "dir")]
        store: Option<PathBuf>,
        /// Keep printing new events as they happen, until the mount stops
        /// or the command is interrupted.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line (the same object `notify_command`
        /// reads on stdin) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration file in the mount daemon of DIR (every
    /// running mount without DIR), like SIGHUP: protect the VMs added,
    /// unprotect the VMs removed (their disks stay mounted and tracked),
    /// apply changed settings. A file with problems is refused and nothing
    /// changes. Never unmounts.
    Reload {
        /// The mounted folder (default: every running mount).
        dir: Option<PathBuf>,
    },
    /// Unmount DIR cleanly (saves the dirty bitmaps so tracking survives).
    Umount {
        /// The mounted folder.
        dir: PathBuf,
        /// Detach now even if files are open; the daemon stops when they close.
        #[arg(long)]
        lazy: bool,
    },
    /// Replace the worker process of the mount daemon of DIR with VMs
    /// running (a live upgrade: the binary now installed at the same path
    /// takes over). The worker saves its tracking state, a new one takes the
    /// FUSE connection over and the kernel resends what was not answered:
    /// guests see a short stall, no I/O error. Prints the new worker's version.
    Restart {
        /// The mounted folder.
        dir: PathBuf,
    },
    /// Seal the current cycle of every tracked disk under DIR at one instant
    /// and print the path of each sealed log, one per line.
    Cut {
        /// The mounted folder.
        dir: PathBuf,
        /// Print the whole cut report as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Show tracked disks and protected VMs: state, last recovery point, lag
    /// (RPO), bytes pending, throughput, last error, next retry. Without DIR,
    /// every running mount.
    Status {
        /// A mounted folder (default: every running mount).
        dir: Option<PathBuf>,
        /// Print the status as JSON (the fields of the text output and more:
        /// retries, wire bytes, resync progress) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Site identities for replication.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Run the receiver at the secondary site (foreground; logs to stderr).
    /// Without flags, the configuration file's `[receiver]` and `[site]`;
    /// each flag given overrides the file.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Replica store folder (one namespace per sending site), or an
        /// object store `s3://bucket/prefix` (with --s3-endpoint,
        /// --s3-credentials, --encryption-key).
        #[arg(long)]
        store: Option<PathBuf>,
        /// This site's identity folder (`vdrep keys init`).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Certificate of a sending site to accept (repeatable; replaces
        /// the file's `[site] trust`).
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        #[command(flatten)]
        retention: RetentionArgs,
        #[command(flatten)]
        s3: objstore::S3Args,
        /// With an s3:// store: the local cache folder (spooled logs,
        /// failover views; no replica state). Default
        /// /var/cache/vdrep/BUCKET/PREFIX.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics
        /// (e.g. 127.0.0.1:9478); overrides `[receiver] metrics_listen`.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Boot-verify the newest point of every libvirt domain VM once per
        /// SCHEDULE (daily, hourly, weekly or a duration of at least 1m):
        /// `vdrep verify --boot` run by the receiver; overrides `[receiver]
        /// verify_boot`.
        #[arg(long, value_name = "SCHEDULE", value_parser = parse_boot_schedule)]
        verify_boot: Option<crate::replica::boot::BootSchedule>,
        /// How the store makes each cycle durable: `auto` (default: what a
        /// recovery point waits for, the stored log and the points, an
        /// fsync per file; the apply, one shared syncfs of the store's
        /// file system for the disks that sync at the same time), `fs`
        /// (always the shared syncfs) or `file` (always an fsync per
        /// file); overrides `[receiver] store_sync`.
        #[arg(long, value_name = "MODE", value_parser = parse_store_sync)]
        store_sync: Option<crate::util::durable::SyncMode>,
    },
    /// Protect a VM: replicate its disks (files under a `vdrep mount`) to a
    /// receiver. Checks prerequisites and starts initial replication.
    Protect {
        /// VM name (one path component; default: the --domain's name).
        #[arg(required_unless_present = "domain")]
        name: Option<String>,
        /// A libvirt domain: protect every disk file of its definition (each
        /// must be under a running `vdrep mount`); warns when it has no
        /// guest agent channel.
        #[arg(long, conflicts_with = "disks")]
        domain: Option<String>,
        /// A consistency group: the VMs of this mount with the same group
        /// share every recovery point (one cut of all their disks, on the
        /// shortest --every of them); `vdrep points --group` and
        /// `vdrep failover --group` pick one point for all of them.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Receiver address HOST:PORT, or an object store
        /// `s3://BUCKET/PREFIX` written directly, with no receiver (with
        /// --s3-endpoint, --s3-credentials and --encryption-key).
        #[arg(long)]
        to: String,
        /// The receiver's certificate (repeatable; not for an s3:// target).
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        #[command(flatten)]
        s3: objstore::S3Args,
        /// Replication interval: 30s, 5m, 15m, any N[s|m|h], or `continuous`.
        #[arg(long, default_value = "5m")]
        every: String,
        /// Bandwidth cap, bytes/s with optional K/M/G suffix (e.g. 50M).
        #[arg(long)]
        max_rate: Option<String>,
        /// Cap shared by every VM of this mount that replicates to the same
        /// --to receiver, bytes/s with optional K/M/G suffix (e.g. 10M).
        /// Within it, change logs go before initial copies, so one VM's
        /// initial copy cannot starve the RPO of the others. The newest
        /// value given for a receiver applies to all its VMs.
        #[arg(long)]
        link_max_rate: Option<String>,
        /// Pending changes of a disk (in % of its size) above which it is
        /// tracked bitmap-only and its changes are shipped as one cycle.
        #[arg(long, default_value = "50%")]
        resync_threshold: String,
        /// When automatic resyncs run, local time, as a calendar:
        /// `mon..fri 22:00-06:00`, `sat,sun`, several joined with `;`, or
        /// `always` (doc/CONFIG.md, Schedules). Default: 18:00-08:00; sat,sun.
        #[arg(long)]
        resync_window: Option<String>,
        /// Alert when the lag (the age of the newest recovery point) passes
        /// this while changes wait: the VM shows Warning "RPO exceeded" and
        /// an event fires (`vdrep events`); it clears once the lag is back
        /// under. A duration such as 60s, 15min. Default: no alert.
        #[arg(long, value_name = "DURATION")]
        rpo_alert: Option<String>,
        #[command(flatten)]
        app: AppHookArgs,
        #[command(flatten)]
        retry: replication::RetryArgs,
        /// The VM's disk files (all under the same vdrep mount).
        #[arg(required_unless_present = "domain")]
        disks: Vec<PathBuf>,
    },
    /// Stop protecting a VM (its replica stays at the receiver).
    Unprotect {
        /// VM name.
        name: String,
        /// The mounted folder holding the VM's disks (default: search all mounts).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Force a cut now and wait until the receiver holds it durably as a
    /// recovery point (its logs stored; the receiver applies them right after).
    /// TARGET is a VM name or a mounted folder (all its VMs).
    Sync {
        /// A VM name, or a mounted folder (every VM protected from it).
        target: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List a VM's recovery points at the secondary site, newest first:
    /// time, id, history bytes, consistency, applied (or pending: its
    /// logs are durable and still being applied), pinned (exposed).
    Points {
        /// VM name.
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        name: Option<String>,
        /// List the group points of a consistency group instead: the
        /// points every VM of the group has at one instant, each with the
        /// VMs' point ids.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// The receiver's store folder (`vdrep receive --store`), or an
        /// object store `s3://BUCKET/PREFIX` (with --s3-endpoint,
        /// --s3-credentials and --encryption-key).
        #[arg(long)]
        store: PathBuf,
        /// The sending site (needed only if several sites replicate a VM of this name).
        #[arg(long)]
        site: Option<String>,
        /// Print the points as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s3: objstore::S3Args,
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
        /// VM name (protected from a running mount).
        name: String,
        /// Only schedule it (it starts as soon as the VM's worker is free).
        #[arg(long)]
        background: bool,
        /// Give up waiting after this many seconds (the resync goes on).
        #[arg(long, default_value_t = 86400)]
        timeout: u64,
        /// Print the result (blocks compared, differing, sent) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Online verify: ship pending changes, then compare the digests of the
    /// source (as of a fresh cut) with the receiver's newest point without
    /// shipping data. Prints the differing byte ranges; exit status 1 if
    /// any differ, 0 if the replica is identical.
    ///
    /// With --boot (at the replica site): boot verification of a libvirt
    /// domain's recovery point: a test failover of it on the isolated
    /// network, wait until it is ready (its guest agent answers
    /// guest-ping; or --marker on its serial console, or --wait-for CMD
    /// succeeds), keep the result with the point (`vdrep points` shows
    /// it), remove the test failover. The receiver runs it on a schedule
    /// with `verify_boot` in `[receiver]`.
    /// Exit status 1 if the point failed to boot.
    Verify {
        /// VM name (protected from a running mount); with --boot, the
        /// libvirt domain (and VM) name.
        name: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 86400)]
        timeout: u64,
        /// Print the differing ranges per disk as JSON.
        #[arg(long)]
        json: bool,
        /// Boot verification of a point (see above).
        #[arg(long, requires = "store")]
        boot: bool,
        /// With --boot: the receiver's store folder.
        #[arg(long)]
        store: Option<PathBuf>,
        /// With --boot: the point (`latest` by default; as for failover).
        #[arg(long, requires = "boot")]
        point: Option<String>,
        /// With --boot: the sending site (needed only if several sites
        /// replicate a VM of this name).
        #[arg(long, requires = "boot")]
        site: Option<String>,
        /// With --boot: ready when the guest prints this text on its serial
        /// console (default: when its guest agent answers guest-ping).
        #[arg(long, requires = "boot", conflicts_with = "wait_for")]
        marker: Option<String>,
        /// With --boot: ready when `sh -c CMD` exits 0 (retried;
        /// VDREP_READY_DOMAIN names the test copy), e.g. a probe of the
        /// application inside the isolated network.
        #[arg(long, requires = "boot", value_name = "CMD")]
        wait_for: Option<String>,
        /// With --boot: seconds the test copy gets to become ready.
        #[arg(long, requires = "boot", default_value_t = 300)]
        boot_timeout: u64,
    },
    /// Benchmark: digest a file's 4 KiB blocks as a resync does, on 1 and
    /// on every core; prints GB/s (the file is read once into memory).
    #[command(hide = true)]
    HashBench {
        /// The file to digest.
        file: PathBuf,
        /// Block size in bytes.
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
    },
    /// The configuration file (`--config FILE`, default /etc/vdrep/vdrep.toml).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Inspect, verify and apply change logs (.hrl).
    Hrl {
        #[command(subcommand)]
        cmd: hrl::HrlCmd,
    },
    /// At the secondary site: delete a VM's replica and all its recovery
    /// points. Asks for confirmation on a terminal; elsewhere needs --yes.
    /// Refused while the VM runs here after a failover, a failover is not
    /// committed, or a test failover exposes it.
    Forget(forget::ForgetArgs),
    /// Print the shell completion script for SHELL on stdout (e.g.
    /// `vdrep completions bash > /etc/bash_completion.d/vdrep`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vdrep.1 and one vdrep-COMMAND.1 per command).
    Man {
        /// The folder to write them into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// When this command started (a `timing` in `--json` counts from here).
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// When this command started (first asked: now).
pub fn started() -> std::time::Instant {
    *STARTED.get_or_init(std::time::Instant::now)
}

/// Parse the command line and run it; the process exit code.
pub fn main() -> i32 {
    started();
    // Before any thread or descriptor: reading an old point holds one
    // descriptor per cycle of its history.
    if let Err(e) = crate::util::limits::raise_open_files() {
        eprintln!(
            "vdrep: cannot raise the limit of open files ({e}): reading a recovery point far back may fail with \"Too many open files\"; raise it with `ulimit -n` or LimitNOFILE="
        );
    }
    if let Some(code) = crate::daemon::worker_entry(crate::receiver::embedded::factory()) {
        return code;
    }
    let cli = Cli::parse();
    run(cli.cmd, cli.config.as_deref(), cli.log_format)
}

/// Run one command (`config`: `--config FILE`, `log_format`:
/// `--log-format`); its exit code.
pub fn run(cmd: Cmd, config: Option<&Path>, log_format: Option<service::LogFormatArg>) -> i32 {
    match cmd {
        Cmd::Mount {
            dir,
            foreground,
            log_file,
            block_size,
            patterns,
            threads,
            no_writeback_cache,
            keys,
            metrics_listen,
            fuse_transport,
            enable_uring,
        } => {
            let cfg = match self::config::load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let log = (service::log_format(log_format, cfg.as_ref()), log_file);
            mount::mount(
                dir,
                (foreground, log),
                block_size,
                patterns,
                threads,
                no_writeback_cache,
                (keys, metrics_listen),
                (fuse_transport, enable_uring),
                cfg.as_ref(),
            )
        }
        Cmd::Umount { dir, lazy } => mount::umount(dir, lazy),
        Cmd::Reload { dir } => self::config::reload(dir),
        Cmd::Cut { dir, json } => mount::cut(dir, json),
        Cmd::Restart { dir } => mount::restart(dir),
        Cmd::Status { dir, json } => mount::status(dir, json),
        Cmd::Events {
            dir,
            store,
            follow,
            json,
        } => events::events(dir, store, follow, json),
        Cmd::Keys {
            cmd: KeysCmd::Init(a),
        } => keys::run_keys_init(&a),
        Cmd::Keys {
            cmd: KeysCmd::Rotate(a),
        } => keys::run_keys_rotate(&a),
        Cmd::Keys {
            cmd: KeysCmd::EncryptionKey(a),
        } => keys::run_encryption_key(&a),
        Cmd::Keys {
            cmd: KeysCmd::Show(a),
        } => match self::config::load(config) {
            Ok(cfg) => keys::run_keys_show(&a, cfg.as_ref()),
            Err(code) => code,
        },
        Cmd::Receive {
            listen,
            store,
            keys,
            trust,
            retention,
            s3,
            cache,
            metrics_listen,
            verify_boot,
            store_sync,
        } => {
            let cfg = match self::config::load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let flags = replication::ReceiveFlags {
                listen,
                store,
                keys,
                trust,
                retention,
                metrics_listen,
                s3,
                cache,
                verify_boot,
                store_sync,
            };
            let log_format = service::log_format(log_format, cfg.as_ref());
            replication::receive(flags, cfg.as_ref(), log_format)
        }
        Cmd::Protect {
            name,
            domain,
            group,
            to,
            trust,
            s3,
            every,
            max_rate,
            link_max_rate,
            resync_threshold,
            resync_window,
            rpo_alert,
            app,
            retry,
            disks,
        } => {
            let (disks, name) = match &domain {
                None => (disks, name.unwrap_or_default()),
                Some(d) => match domain::protect_disks(d) {
                    Ok((disks, warnings)) => {
                        for w in &warnings {
                            eprintln!("vdrep: warning: {w}");
                        }
                        (disks, name.unwrap_or_else(|| d.clone()))
                    }
                    Err(code) => return code,
                },
            };
            replication::protect(
                name,
                (to, trust, s3),
                (every, max_rate, link_max_rate),
                (
                    resync_threshold,
                    resync_window.unwrap_or_default(),
                    rpo_alert,
                ),
                app,
                retry,
                disks,
                (domain, group),
            )
        }
        Cmd::Unprotect { name, dir } => replication::unprotect(name, dir),
        Cmd::Sync { target, timeout } => replication::sync(&target, timeout),
        Cmd::Points {
            name,
            group: Some(group),
            store,
            site,
            json,
            ..
        } if name.is_none() => points::group_points(&group, &store, site, json),
        Cmd::Points {
            name,
            store,
            site,
            json,
            s3,
            ..
        } => match (objstore::s3_url(&store), name.unwrap_or_default()) {
            (Ok(Some(url)), name) => objstore::points(&name, &url, site, &s3, json),
            (Ok(None), name) => points::points(&name, &store, site, json),
            (Err(e), name) => {
                eprintln!("vdrep: points of {name}: {e}");
                2
            }
        },
        Cmd::Failover(a) => failover::failover(a),
        Cmd::Reverse {
            name,
            dir,
            store,
            reverse_to,
        } => failover::reverse(&name, &dir, &store, &reverse_to),
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
        } => failover::plan(&plan, &store, test, cleanup, json),
        Cmd::Resync {
            name,
            background,
            timeout,
            json,
        } => points::resync(&name, background, timeout, json),
        Cmd::Verify {
            name,
            timeout,
            json,
            boot,
            store,
            site,
            point,
            marker,
            wait_for,
            boot_timeout,
        } => match (boot, store) {
            (true, Some(store)) => domain::verify_boot(
                &name,
                &store,
                site,
                point.as_deref(),
                &domain::readiness(marker.as_deref(), wait_for.as_deref()),
                boot_timeout,
                json,
            ),
            _ => points::verify(&name, timeout, json),
        },
        Cmd::Config {
            cmd: ConfigCmd::Check { content_only },
        } => self::config::check(config, content_only),
        Cmd::Hrl { cmd } => hrl::run(cmd),
        Cmd::Forget(a) => forget::forget(&a),
        Cmd::Completions { shell } => service::completions(shell),
        Cmd::Man { out } => service::man(&out),
        Cmd::HashBench { file, block_size } => points::hash_bench(&file, block_size),
    }
}

/// `--verify-boot SCHEDULE`.
fn parse_store_sync(s: &str) -> Result<crate::util::durable::SyncMode, String> {
    crate::config::parse_store_sync(s).map_err(|e| e.to_string())
}

fn parse_boot_schedule(s: &str) -> Result<crate::replica::boot::BootSchedule, String> {
    crate::replica::boot::BootSchedule::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod help_tests;
