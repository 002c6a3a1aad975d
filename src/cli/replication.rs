//! `vdrep receive`, `protect`, `unprotect` and `sync`: replication, and
//! the parsing of its intervals, rates and percentages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fmt::{control_err, with_progress};
use crate::daemon::control::{self, Request};

/// `vdrep receive`'s flags; each one given overrides the configuration's
/// `[receiver]` and `[site]`.
#[derive(Debug, Default)]
pub struct ReceiveFlags {
    pub listen: Option<std::net::SocketAddr>,
    pub store: Option<PathBuf>,
    pub keys: Option<PathBuf>,
    pub trust: Vec<PathBuf>,
    pub retention: RetentionArgs,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach an `s3://` store.
    pub s3: super::objstore::S3Args,
    /// The local cache folder of an `s3://` store.
    pub cache: Option<PathBuf>,
    /// `--verify-boot`: over `[receiver] verify_boot`.
    pub verify_boot: Option<crate::replica::boot::BootSchedule>,
    /// `--store-sync`: over `[receiver] store_sync`.
    pub store_sync: Option<crate::util::durable::SyncMode>,
}

/// `vdrep receive ...` (foreground; logs to stderr): the flags over the
/// configuration file's `[receiver]` (if any).
pub fn receive(
    flags: ReceiveFlags,
    cfg: Option<&crate::config::Config>,
    log_format: crate::service::LogFormat,
) -> i32 {
    crate::service::init_logging(log_format, crate::service::LogTarget::Stderr);
    let rcv = cfg.and_then(|c| c.receiver.as_ref());
    let site = cfg.map(|c| &c.site);
    let (retention, prune_every) = match flags.retention.policy(rcv) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vdrep: receive: {e}");
            return 2;
        }
    };
    let missing = |what: &str| {
        eprintln!(
            "vdrep: receive: give {what} (or set it in the configuration file, see `vdrep config check`)"
        );
        2
    };
    let Some(listen) = flags.listen.or(rcv.map(|r| r.listen)) else {
        return missing("--listen");
    };
    let Some(store) = flags.store.or(rcv.map(|r| r.store.clone())) else {
        return missing("--store");
    };
    let Some(keys) = flags.keys.or(site.and_then(|s| s.keys.clone())) else {
        return missing("--keys");
    };
    // Trust from the file is re-read on SIGHUP; trust from flags is fixed.
    let (trust, reload_trust_from) = if flags.trust.is_empty() {
        (
            site.map(|s| s.trust.clone()).unwrap_or_default(),
            cfg.map(|c| std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone())),
        )
    } else {
        (flags.trust, None)
    };
    if trust.is_empty() {
        return missing("--trust (a sending site's certificate)");
    }
    // The s3 settings: each flag over the file's `[receiver]`.
    let s3 = super::objstore::S3Args {
        s3_endpoint: flags
            .s3
            .s3_endpoint
            .or(rcv.and_then(|r| r.s3_endpoint.clone())),
        s3_credentials: flags
            .s3
            .s3_credentials
            .or(rcv.and_then(|r| r.s3_credentials.clone())),
        encryption_key: flags
            .s3
            .encryption_key
            .or(rcv.and_then(|r| r.encryption_key.clone())),
    };
    let cache = flags.cache.or(rcv.and_then(|r| r.cache.clone()));
    let (store, remote) = match super::objstore::open_remote_store(&store, &s3, cache) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vdrep: receive: {e}");
            return 1;
        }
    };
    match crate::receiver::run(&crate::receiver::ReceiveOptions {
        listen,
        store,
        remote,
        keys,
        trust,
        retention,
        prune_every,
        reload_trust_from,
        metrics_listen: flags.metrics_listen.or(rcv.and_then(|r| r.metrics_listen)),
        notify: super::config::notify_spec(cfg),
        verify_boot: flags
            .verify_boot
            .or(rcv.and_then(|r| r.verify_boot))
            .map(|every| crate::receiver::boot_verify::BootVerify {
                every,
                timeout: rcv
                    .and_then(|r| r.verify_boot_timeout)
                    .unwrap_or(crate::receiver::boot_verify::DEFAULT_TIMEOUT),
                wait_for: rcv.and_then(|r| r.verify_boot_wait_for.clone()),
            }),
        store_sync: flags
            .store_sync
            .or(rcv.and_then(|r| r.store_sync))
            .or_else(store_sync_from_env)
            .unwrap_or_default(),
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vdrep: receive: {e}");
            1
        }
    }
}

/// `VDREP_STORE_SYNC` (`auto`, `fs` or `file`): for benchmark A/B runs
/// that start receivers without a configuration file; a bad value is
/// ignored with a warning.
fn store_sync_from_env() -> Option<crate::util::durable::SyncMode> {
    let v = std::env::var("VDREP_STORE_SYNC").ok()?;
    let m = crate::util::durable::SyncMode::parse(&v);
    if m.is_none() {
        tracing::warn!("VDREP_STORE_SYNC={v:?} is not auto, fs or file: ignored");
    }
    m
}

/// `vdrep unprotect NAME [--dir DIR]`.
pub fn unprotect(name: String, dir: Option<PathBuf>) -> i32 {
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

/// `vdrep protect`'s retry schedule after a recoverable failure
/// (`crate::sender::retry`).
#[derive(clap::Args, Debug, Clone)]
pub struct RetryArgs {
    /// First retry delays of a continuous or short-interval VM,
    /// comma-separated, or `none`. Default: 1s,2s,5s.
    #[arg(long, value_name = "DELAYS")]
    pub retry_fast: Option<String>,
    /// A VM whose --every is at most this (or `continuous`) gets the fast
    /// retries first. Default: 5m.
    #[arg(long, value_name = "INTERVAL")]
    pub retry_fast_max_every: Option<String>,
    /// Retry delays after the fast ones, comma-separated; the last one
    /// repeats. Default: 1m,2m,4m,8m,10m,30m.
    #[arg(long, value_name = "DELAYS")]
    pub retry_schedule: Option<String>,
}

impl RetryArgs {
    /// The schedule, or the flag and what is wrong with it.
    fn schedule(&self) -> Result<crate::sender::RetrySchedule, String> {
        use crate::config::{parse_every, parse_retry_steps};
        let steps = |flag: &str, v: &Option<String>, none_ok: bool| {
            v.as_deref()
                .map(|s| parse_retry_steps(s, none_ok))
                .transpose()
                .map_err(|e| format!("--{flag}: {e}"))
        };
        let fast = steps("retry-fast", &self.retry_fast, true)?;
        let long = steps("retry-schedule", &self.retry_schedule, false)?;
        let max_every = self
            .retry_fast_max_every
            .as_deref()
            .map(parse_every)
            .transpose()
            .map_err(|e| format!("--retry-fast-max-every: {e}"))?;
        Ok(crate::sender::RetrySchedule::with(
            fast.as_deref(),
            max_every.map(crate::config::Every::secs),
            long.as_deref(),
        ))
    }
}

/// `vdrep receive`'s retention of recovery points (per VM): every point
/// for `--keep-all-for`, then one per `--then-one-per` (an
/// application-consistent one where the interval has one) up to
/// `--keep-for`; the newest point is always kept, and so are the points of
/// a failover that is not committed and points exposed by a test failover.
/// A flag not given takes the configuration's value, else its default.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RetentionArgs {
    /// Keep every point this long (N[s|m|h|d]). Default 2h.
    #[arg(long, value_name = "INTERVAL")]
    pub keep_all_for: Option<String>,
    /// Older points: keep one per this interval. Default 1h.
    #[arg(long, value_name = "INTERVAL")]
    pub then_one_per: Option<String>,
    /// Drop points older than this (`forever`: never). Default 72h.
    #[arg(long, value_name = "INTERVAL")]
    pub keep_for: Option<String>,
    /// Keep at most this many points per VM.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// How often to apply the policy (`never`: keep everything). Default 1m.
    #[arg(long, value_name = "INTERVAL")]
    pub prune_every: Option<String>,
}

/// The flag `--FLAG V` if given (an interval, or `word` for `None`), else
/// the configuration's value, else `default`.
fn interval_or(
    flag: &str,
    v: Option<&str>,
    word: Option<&str>,
    cfg: Option<Option<Duration>>,
    default: Option<Duration>,
) -> Result<Option<Duration>, String> {
    match v {
        Some(v) if word.is_some_and(|w| v.eq_ignore_ascii_case(w)) => Ok(None),
        Some(v) => parse_interval(v)
            .map(|s| Some(Duration::from_secs(s)))
            .map_err(|e| format!("--{flag}: {e}")),
        None => Ok(cfg.unwrap_or(default)),
    }
}

impl RetentionArgs {
    /// The policy and how often to apply it: these flags over `cfg`'s.
    pub fn policy(
        &self,
        cfg: Option<&crate::config::ReceiverCfg>,
    ) -> Result<(crate::replica::RetentionPolicy, Option<Duration>), String> {
        let h = |n: u64| Some(Duration::from_secs(n * 3600));
        let max_age = interval_or(
            "keep-for",
            self.keep_for.as_deref(),
            Some("forever"),
            cfg.and_then(|c| c.keep_for),
            h(72),
        )?;
        let prune_every = interval_or(
            "prune-every",
            self.prune_every.as_deref(),
            Some("never"),
            cfg.and_then(|c| c.prune_every),
            Some(Duration::from_secs(60)),
        )?
        .filter(|x| !x.is_zero());
        let thin_after = interval_or(
            "keep-all-for",
            self.keep_all_for.as_deref(),
            None,
            cfg.and_then(|c| c.keep_all_for).map(Some),
            h(2),
        )?;
        let thin_every = interval_or(
            "then-one-per",
            self.then_one_per.as_deref(),
            None,
            cfg.and_then(|c| c.then_one_per).map(Some),
            h(1),
        )?;
        if self.keep_last == Some(0) {
            return Err("--keep-last 0: the newest point is always kept; give 1 or more".into());
        }
        Ok((
            crate::replica::RetentionPolicy {
                keep_last: self.keep_last.or(cfg.and_then(|c| c.keep_last)),
                max_age,
                thin_after,
                thin_every,
            },
            prune_every,
        ))
    }
}

/// `30s`, `5m`, `15m`, `1h`, `90` (seconds) or `continuous` (0).
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

/// `vdrep protect NAME ...`.
#[allow(clippy::too_many_arguments)]
pub fn protect(
    name: String,
    (to, trust, s3): (String, Vec<PathBuf>, super::objstore::S3Args),
    (every, max_rate, link_max_rate): (String, Option<String>, Option<String>),
    (threshold, window, rpo_alert): (String, String, Option<String>),
    AppHookArgs {
        app_hook,
        app_every,
        app_timeout,
    }: AppHookArgs,
    retry: RetryArgs,
    disks: Vec<PathBuf>,
    (domain, group): (Option<String>, Option<String>),
) -> i32 {
    let retry = match retry.schedule() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vdrep: {e}");
            return 2;
        }
    };
    let s3 = match protect_target(&to, &trust, &s3) {
        Ok(s3) => s3,
        Err(e) => {
            eprintln!("vdrep: {e}");
            return 2;
        }
    };
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
    let rpo_alert_secs = match rpo_alert.as_deref().map(crate::config::parse_duration) {
        None => 0,
        Some(Ok(d)) => d.as_secs().max(1),
        Some(Err(e)) => {
            eprintln!("vdrep: --rpo-alert: {e}");
            return 2;
        }
    };
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
    let link_max_rate = match link_max_rate.as_deref().map(parse_rate).transpose() {
        Ok(v) => v.unwrap_or(0),
        Err(e) => {
            eprintln!("vdrep: --link-max-rate: {e}");
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
        s3,
        every_secs,
        disks: rels,
        max_rate,
        link_max_rate,
        resync_threshold_pct,
        resync_window: window,
        app_hook,
        rpo_alert_secs,
        domain,
        group,
        group_members: Vec::new(),
        retry,
    };
    match control::call(
        &mount,
        &Request::Protect {
            spec: Box::new(spec),
        },
    ) {
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

/// `--to` with `--trust` (a receiver) or the object-store flags (an
/// `s3://` target, files made absolute for the daemon).
fn protect_target(
    to: &str,
    trust: &[PathBuf],
    s3: &super::objstore::S3Args,
) -> Result<Option<crate::objstore::S3Target>, String> {
    let given =
        s3.s3_endpoint.is_some() || s3.s3_credentials.is_some() || s3.encryption_key.is_some();
    if super::objstore::s3_url(Path::new(to))?.is_none() {
        if given {
            return Err("--s3-endpoint, --s3-credentials and --encryption-key are for --to s3://BUCKET/PREFIX".into());
        }
        if trust.is_empty() {
            return Err("name the receiver's certificate with --trust".into());
        }
        return Ok(None);
    }
    if !trust.is_empty() {
        return Err(format!(
            "--to {to} is an object store: --trust is for a receiver"
        ));
    }
    let mut t = s3.target()?;
    let abs = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    t.encryption_key = abs(&t.encryption_key)?;
    t.credentials = t.credentials.as_deref().map(abs).transpose()?;
    Ok(Some(t))
}

/// `vdrep sync TARGET`.
pub fn sync(target: &str, timeout: u64) -> i32 {
    let p = std::path::Path::new(target);
    let (mounts, vm) = if p.is_dir() {
        (vec![p.to_path_buf()], None)
    } else {
        // A VM name: find the mount protecting it.
        let found: Vec<PathBuf> = control::running_mounts()
            .into_iter()
            .filter(|m| control::protects(m, target))
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
        let res = with_progress(&m, vm.as_deref(), true, || control::call(&m, &req));
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
