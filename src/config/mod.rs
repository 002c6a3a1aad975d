//! The declarative configuration file (`/etc/vdrep/vdrep.toml`): its
//! schema, its parsing and its checks.
//!
//! This module owns the file's format and its validation only: it turns the
//! TOML text into a typed, checked [`Config`] (durations parsed with
//! `humantime`, sizes and rates with `bytesize`, disks matched to their
//! mount, key and certificate files read), or into [`ConfigError::Invalid`],
//! whose every [`Problem`] names FILE:LINE:KEY and what is allowed. It
//! knows nothing of the command line: `crate::cli` maps a [`Config`] onto
//! the options of `mount`, `protect` and `receive`.
//!
//! The schema is documented in `doc/CONFIG.md`, with a commented example in
//! `doc/vdrep.example.toml`.

mod raw;

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::schedule::{Calendar, RateRule, RateSchedule};

/// Where the configuration is read from unless `--config` names a file.
pub const DEFAULT_PATH: &str = "/etc/vdrep/vdrep.toml";

/// A checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub site: Site,
    pub mounts: Vec<MountCfg>,
    pub receiver: Option<ReceiverCfg>,
    pub vms: Vec<VmCfg>,
}

/// `[site]`: this site's identity and the peers it trusts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Site {
    /// The site name (the identity `KEYS/NAME.crt` + `NAME.key`); without
    /// it, the only identity in `keys`.
    pub name: Option<String>,
    /// Identity folder (`vdrep keys init --out`).
    pub keys: Option<PathBuf>,
    /// Certificates of the peer sites this site trusts (senders for the
    /// receiver; receivers for VMs that name no `trust` of their own).
    pub trust: Vec<PathBuf>,
    /// How the daemons log (`text` or `json`); `--log-format` overrides it.
    pub log_format: Option<crate::service::LogFormat>,
    /// Run on every state-change event with its JSON on stdin
    /// (`crate::events::notify`).
    pub notify_command: Option<String>,
    /// Time limit of one `notify_command` run.
    pub notify_timeout: Option<Duration>,
}

/// `[[mount]]`: a tracked folder.
#[derive(Debug, Clone, PartialEq)]
pub struct MountCfg {
    /// The folder (canonical when it exists).
    pub path: PathBuf,
    /// Tracking granularity in bytes.
    pub block_size: Option<u32>,
    /// File-name patterns of tracked disks (empty: the default ones).
    pub patterns: Vec<String>,
    /// Where the mount daemon serves its Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Keep an activity log per disk (default on).
    pub activity_log: Option<bool>,
    /// The activity log's budget of hot extents per disk
    /// (`activity_hot = "1GiB"`, in 4 MiB extents, rounded up).
    pub activity_hot: Option<u32>,
    /// Memory for the running cycles' whole-block writes, over the mount's
    /// disks (`keep_writes = "256MiB"`; `0`: none).
    pub keep_writes: Option<u64>,
    /// The supervisor's hung-worker watchdog (`watchdog = "30s"`);
    /// `Some(None)`: `off`.
    pub watchdog: Option<Option<Duration>>,
    /// How FUSE requests travel (`fuse_transport = "dev" | "uring"`).
    pub fuse_transport: Option<crate::fuse::FuseTransport>,
}

/// `[receiver]`: the secondary site's receiver and its retention.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiverCfg {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub keep_all_for: Option<Duration>,
    pub then_one_per: Option<Duration>,
    /// `Some(None)`: `forever`.
    pub keep_for: Option<Option<Duration>>,
    pub keep_last: Option<usize>,
    /// `Some(None)`: `never`.
    pub prune_every: Option<Option<Duration>>,
    /// Where the receiver serves its Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Scheduled boot verification of every domain's newest point
    /// (`verify_boot = "daily"`); `None`: never.
    pub verify_boot: Option<crate::replica::boot::BootSchedule>,
    /// Seconds a scheduled boot check's copy gets to become ready.
    pub verify_boot_timeout: Option<Duration>,
    /// Its readiness command (default: the guest agent answers).
    pub verify_boot_wait_for: Option<String>,
    /// How the store makes each cycle durable (`store_sync`).
    pub store_sync: Option<crate::util::durable::SyncMode>,
    /// With `store = "s3://bucket/prefix"`: the S3 endpoint, the
    /// credentials file, the encryption key file and the local cache folder.
    pub s3_endpoint: Option<String>,
    pub s3_credentials: Option<PathBuf>,
    pub encryption_key: Option<PathBuf>,
    pub cache: Option<PathBuf>,
}

/// How often a VM gets a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    Continuous,
    Interval(Duration),
}

impl Every {
    /// Seconds between cuts, 0 for continuous (the sender's convention).
    pub fn secs(self) -> u64 {
        match self {
            Every::Continuous => 0,
            Every::Interval(d) => d.as_secs().max(1),
        }
    }
}

/// `[[vm]]`: a protected VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmCfg {
    pub name: String,
    /// The libvirt domain whose disk files are `disks` (`domain = "web1"`).
    pub domain: Option<String>,
    /// The consistency group (`group = "erp"`): the VMs of one group share
    /// every recovery point; they must be under the same `[[mount]]`.
    pub group: Option<String>,
    /// The disks, as written (absolute), or the domain's disk files.
    pub disks: Vec<PathBuf>,
    /// The `[[mount]]` folder holding them.
    pub mount: PathBuf,
    /// The disks relative to `mount`.
    pub disks_rel: Vec<String>,
    /// Receiver address `HOST:PORT`, or an object store `s3://BUCKET/PREFIX`
    /// written directly (then `s3` says how).
    pub to: String,
    /// Certificates of the receiver (default: `[site] trust`; none for an
    /// object store).
    pub trust: Vec<PathBuf>,
    /// `s3_endpoint`, `s3_credentials`, `encryption_key` of an `s3://` `to`.
    pub s3: Option<crate::objstore::S3Target>,
    pub every: Option<Every>,
    /// Bytes per second (`max_rate = "10MB/s"`).
    pub max_rate: Option<u64>,
    /// The bandwidth schedule (`max_rate = [{ when, rate }, ...]`); then
    /// `max_rate` is `None`.
    pub max_rate_schedule: Option<RateSchedule>,
    /// Cap shared by every VM of the mount to the same `to`, bytes/s.
    pub link_max_rate: Option<u64>,
    /// Percent of a disk's size.
    pub resync_threshold_pct: Option<f64>,
    pub resync_window: Option<String>,
    pub app_hook: Option<String>,
    pub app_every: Option<Every>,
    pub app_timeout: Option<Duration>,
    /// Lag above which the VM shows Warning "RPO exceeded".
    pub rpo_alert: Option<Duration>,
    /// First retry delays of a continuous or short-interval VM
    /// (`retry_fast = "1s, 2s, 5s"`; `none`: empty).
    pub retry_fast: Option<Vec<Duration>>,
    /// Intervals up to this retry fast first (`retry_fast_max_every = "5m"`).
    pub retry_fast_max_every: Option<Every>,
    /// The long retry schedule; its last step repeats
    /// (`retry_schedule = "1m, 2m, 4m, 8m, 10m, 30m"`).
    pub retry_schedule: Option<Vec<Duration>>,
}

/// What is wrong with one value of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not TOML, an unknown key, a missing key or a value of the wrong type.
    Schema,
    /// Not a duration.
    BadDuration,
    /// Not a size or rate.
    BadRate,
    /// Not an address (`HOST:PORT`, or `IP:PORT` to listen on).
    BadAddress,
    /// Any other value out of its allowed range.
    BadValue,
    /// A disk that is not under any `[[mount]]`.
    DiskOutsideMount,
    /// Two VMs (or mounts) of the same name.
    Duplicate,
    /// A key, certificate or folder that cannot be read.
    Unreadable,
}

/// One problem: FILE:LINE: KEY: what is wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {key}: {msg}", file.display())]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// Dotted key, e.g. `vm[web].max_rate`.
    pub key: String,
    pub kind: ProblemKind,
    pub msg: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

/// The kinds of [`ConfigError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file itself cannot be read (e.g. it does not exist).
    Unreadable,
    /// The file was read and has problems ([`ConfigError::problems`]).
    Invalid,
}

impl ConfigError {
    pub fn kind(&self) -> ConfigErrorKind {
        match self {
            ConfigError::Unreadable { .. } => ConfigErrorKind::Unreadable,
            ConfigError::Invalid { .. } => ConfigErrorKind::Invalid,
        }
    }

    /// The problems found (none for [`ConfigError::Unreadable`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems } => problems,
            ConfigError::Unreadable { .. } => &[],
        }
    }
}

/// What [`load`] checks beyond the file's own content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// Also read the key folder and certificate files it names.
    Files,
    /// The file's content only (an example or a file for another machine).
    ContentOnly,
}

/// Read and check the file at `path`.
pub fn load(path: &Path, checks: Checks) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, checks)
}

/// Check `text` (read from `path`, which only names it in problems).
pub fn parse(path: &Path, text: &str, checks: Checks) -> Result<Config, ConfigError> {
    let mut cx = Cx {
        file: path.to_path_buf(),
        text,
        problems: Vec::new(),
    };
    let raw: raw::File = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let (line, key) = match e.span() {
                Some(sp) => (
                    cx.line(sp.start),
                    text.get(sp.clone())
                        .map(|s| s.trim().trim_matches('"').to_string())
                        .filter(|s| !s.is_empty() && !s.contains('\n'))
                        .unwrap_or_else(|| "-".into()),
                ),
                None => (1, "-".into()),
            };
            cx.problems.push(Problem {
                file: cx.file.clone(),
                line,
                key,
                kind: ProblemKind::Schema,
                msg: e.message().trim().to_string(),
            });
            return Err(ConfigError::Invalid {
                problems: cx.problems,
            });
        }
    };
    let cfg = cx.check(raw, checks);
    if cx.problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid {
            problems: cx.problems,
        })
    }
}

/// Load the file for a command: `explicit` (`--config`) must exist; the
/// default path is used only if it exists (`Ok(None)` otherwise).
pub fn load_for_command(explicit: Option<&Path>) -> Result<Option<Config>, ConfigError> {
    match explicit {
        Some(p) => load(p, Checks::Files).map(Some),
        None => {
            let p = Path::new(DEFAULT_PATH);
            if p.exists() {
                load(p, Checks::Files).map(Some)
            } else {
                Ok(None)
            }
        }
    }
}

impl VmCfg {
    /// The VM's bandwidth limit as a schedule (a constant `max_rate` is a
    /// one-rule schedule; none: unlimited).
    pub fn rate_schedule(&self) -> RateSchedule {
        match (&self.max_rate_schedule, self.max_rate) {
            (Some(s), _) => s.clone(),
            (None, r) => RateSchedule::constant(r.unwrap_or(0)),
        }
    }
}

impl Config {
    /// The VMs whose disks are under the folder `dir` (canonical).
    pub fn vms_under(&self, dir: &Path) -> Vec<&VmCfg> {
        self.vms.iter().filter(|v| v.mount == dir).collect()
    }

    /// The `[[mount]]` entry of the folder `dir` (canonical).
    pub fn mount(&self, dir: &Path) -> Option<&MountCfg> {
        self.mounts.iter().find(|m| m.path == dir)
    }
}

/// A value that does not parse: its kind, what is wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct BadValue {
    kind: ProblemKind,
    msg: String,
}

impl BadValue {
    fn new(kind: ProblemKind, msg: impl Into<String>) -> Self {
        BadValue {
            kind,
            msg: msg.into(),
        }
    }

    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The same, also allowing `alt`.
    fn or(self, alt: &str) -> Self {
        BadValue::new(self.kind, format!("{}, or {alt}", self.msg))
    }
}

/// A duration: `30s`, `15min`, `2h 30m` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, BadValue> {
    let bad = |m: String| BadValue::new(ProblemKind::BadDuration, m);
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        bad(format!(
            "{s:?} is not a duration ({e}); write e.g. 30s, 15min, 2h 30m"
        ))
    })?;
    if d.is_zero() {
        return Err(bad(format!("{s:?}: give a duration above zero")));
    }
    Ok(d)
}

/// The hung-worker watchdog's limit: a duration (`30s`), or `off` (`None`).
pub fn parse_watchdog(s: &str) -> Result<Option<Duration>, BadValue> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_duration(s).map(Some).map_err(|e| e.or("`off`"))
}

/// The mount's memory for kept writes (`keep_writes`): a size (`256MiB`,
/// `1GiB`, `0`), at most 64 GiB.
pub fn parse_keep_writes(s: &str) -> Result<u64, BadValue> {
    let bad = |why: String| {
        BadValue::new(
            ProblemKind::BadValue,
            format!("{s:?} {why}; write a size such as 256MiB, 1GiB or 0 (off)"),
        )
    };
    let b: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| bad(format!("is not a size ({e})")))?;
    if b.as_u64() > 64 << 30 {
        return Err(bad("is above 64GiB".into()));
    }
    Ok(b.as_u64())
}

/// The activity log's budget: a size (`1GiB`, `512MiB`, `0`) turned into
/// 4 MiB extents, rounded up; at most 1 TiB (262,144 extents) per disk.
pub fn parse_activity_hot(s: &str) -> Result<u32, BadValue> {
    let bad = |why: String| {
        BadValue::new(
            ProblemKind::BadValue,
            format!("{s:?} {why}; write a size per disk such as 1GiB, 512MiB or 0"),
        )
    };
    let b: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| bad(format!("is not a size ({e})")))?;
    let extent = 1u64 << crate::tracking::activity::EXTENT_SHIFT;
    let n = b.as_u64().div_ceil(extent);
    match u32::try_from(n) {
        Ok(n) if n <= 1 << 18 => Ok(n),
        _ => Err(bad("is above 1TiB".into())),
    }
}

/// The receiver store's sync: `auto`, `fs` or `file`.
pub fn parse_store_sync(s: &str) -> Result<crate::util::durable::SyncMode, BadValue> {
    crate::util::durable::SyncMode::parse(s).ok_or_else(|| {
        BadValue::new(
            ProblemKind::BadValue,
            format!(
                "{s:?} is not a store sync mode: give \"auto\" (an fsync per file, shared syncfs when disks sync at the same time), \"fs\" (always one shared syncfs of the store's file system) or \"file\" (always an fsync per file)"
            ),
        )
    })
}

/// The FUSE transport: `dev` (`/dev/fuse`) or `uring` (FUSE over io_uring).
pub fn parse_fuse_transport(s: &str) -> Result<crate::fuse::FuseTransport, BadValue> {
    crate::fuse::FuseTransport::parse(s).ok_or_else(|| {
        BadValue::new(
            ProblemKind::BadValue,
            format!(
                "{s:?} is not a FUSE transport: give \"dev\" (/dev/fuse, survives a worker crash) or \"uring\" (FUSE over io_uring: a worker crash ends the mount)"
            ),
        )
    })
}

/// An address to listen on: `IP:PORT` (e.g. 127.0.0.1:9477).
pub fn parse_listen(s: &str) -> Result<SocketAddr, BadValue> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        BadValue::new(
            ProblemKind::BadAddress,
            format!("{s:?} is not IP:PORT to listen on (e.g. 127.0.0.1:9477 or [::]:9477)"),
        )
    })
}

/// A list of retry delays: durations separated by commas (`1s, 2s, 5s`);
/// `none` is the empty list where `none_ok`.
pub fn parse_retry_steps(s: &str, none_ok: bool) -> Result<Vec<Duration>, BadValue> {
    if none_ok && s.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let steps: Vec<&str> = s.split(',').map(str::trim).collect();
    if steps.iter().all(|x| x.is_empty()) {
        let none = if none_ok { " (or `none`)" } else { "" };
        return Err(BadValue::new(
            ProblemKind::BadDuration,
            format!("give the delays separated by commas, e.g. 1m, 2m, 30m{none}"),
        ));
    }
    steps.into_iter().map(parse_duration).collect()
}

/// `continuous` or a duration.
pub fn parse_every(s: &str) -> Result<Every, BadValue> {
    if s.trim().eq_ignore_ascii_case("continuous") {
        return Ok(Every::Continuous);
    }
    parse_duration(s)
        .map(Every::Interval)
        .map_err(|e| e.or("`continuous`"))
}

/// A rate in bytes per second: `10MB/s`, `50MiB/s`, `100Mbit/s`, `800KB`,
/// `12345` (bytesize units: kB/MB/GB are powers of 1000, KiB/MiB/GiB of
/// 1024; `bit` counts bits).
pub fn parse_rate(s: &str) -> Result<u64, BadValue> {
    let bad = |why: String| {
        BadValue::new(
            ProblemKind::BadRate,
            format!("{s:?} is not a rate ({why}); write e.g. 10MB/s, 50MiB/s or 100Mbit/s"),
        )
    };
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t)
        .trim();
    let lower = t.to_ascii_lowercase();
    let (num, bits) = match lower.strip_suffix("bit") {
        Some(n) => (format!("{}B", &t[..n.len()]), true),
        None => (t.to_string(), false),
    };
    let b: bytesize::ByteSize = num.parse().map_err(bad)?;
    let v = if bits { b.as_u64() / 8 } else { b.as_u64() };
    if v == 0 {
        return Err(bad("it must be above zero".into()));
    }
    Ok(v)
}

/// `50%` -> 50.0 (above 0, at most 1000).
fn parse_percent(s: &str) -> Result<f64, BadValue> {
    let bad = |m: String| BadValue::new(ProblemKind::BadValue, m);
    let v: f64 = s
        .trim()
        .strip_suffix('%')
        .unwrap_or(s.trim())
        .trim()
        .parse()
        .map_err(|_| bad(format!("{s:?} is not a percentage; write e.g. 50%")))?;
    if !(v > 0.0 && v <= 1000.0) {
        return Err(bad(format!(
            "{s:?}: give a percentage above 0% and at most 1000%"
        )));
    }
    Ok(v)
}

/// `HOST:PORT` with a port in 1..=65535 and a non-empty host.
fn check_host_port(s: &str) -> Result<(), BadValue> {
    let bad = || {
        BadValue::new(
            ProblemKind::BadAddress,
            format!("{s:?} is not HOST:PORT (e.g. dr.example.com:7700 or 10.0.0.2:7700)"),
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(())
}

/// Lexical normalisation of an absolute path (`.` and `..` removed).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Canonical if it exists, else normalised.
fn resolve(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| normalize(p))
}

/// The checking context: the file, its text and the problems found.
struct Cx<'a> {
    file: PathBuf,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn problem<T>(&mut self, at: &Spanned<T>, key: &str, kind: ProblemKind, msg: String) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line: self.line(at.span().start),
            key: key.to_string(),
            kind,
            msg,
        });
    }

    /// Parse a spanned value with `f`; a failure is a problem of `kind`.
    fn value<T, U>(
        &mut self,
        v: &Option<Spanned<T>>,
        key: &str,
        f: impl FnOnce(&T) -> Result<U, BadValue>,
    ) -> Option<U> {
        let v = v.as_ref()?;
        match f(v.get_ref()) {
            Ok(x) => Some(x),
            Err(e) => {
                self.problem(v, key, e.kind, e.msg);
                None
            }
        }
    }

    /// `max_rate`: a rate (constant), or a list of `{ when, rate }` rules
    /// (a schedule: the first rule whose `when` matches; a rule without
    /// `when` matches always and must be last).
    fn max_rate(
        &mut self,
        v: &Spanned<toml::Value>,
        key: &str,
    ) -> (Option<u64>, Option<RateSchedule>) {
        const SHAPE: &str = "give a rate (\"10MB/s\") or a list of rules such as [{ when = \"mon..fri 08:00-18:00\", rate = \"10MB/s\" }, { rate = \"100MB/s\" }]";
        let items = match v.get_ref() {
            toml::Value::String(s) => {
                return match parse_rate(s) {
                    Ok(r) => (Some(r), None),
                    Err(e) => {
                        self.problem(v, key, e.kind, e.msg);
                        (None, None)
                    }
                };
            }
            toml::Value::Array(items) if !items.is_empty() => items,
            _ => {
                self.problem(v, key, ProblemKind::Schema, SHAPE.into());
                return (None, None);
            }
        };
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let rk = format!("{key}[{i}]");
            let mut bad = |me: &mut Self, sub: &str, kind, msg: String| {
                ok = false;
                me.problem(v, &format!("{rk}{sub}"), kind, msg);
            };
            let Some(t) = item.as_table() else {
                bad(self, "", ProblemKind::Schema, SHAPE.into());
                continue;
            };
            for unknown in t.keys().filter(|k| *k != "when" && *k != "rate") {
                bad(
                    self,
                    &format!(".{unknown}"),
                    ProblemKind::Schema,
                    "unknown key; a rule has `when` (optional) and `rate`".into(),
                );
            }
            if rules.last().is_some_and(|r: &RateRule| r.when.is_none()) {
                bad(
                    self,
                    "",
                    ProblemKind::BadValue,
                    "never used: the rule before it has no `when` and always matches".into(),
                );
            }
            let rate = match t.get("rate") {
                Some(toml::Value::String(s)) => match parse_rate(s) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        bad(self, ".rate", e.kind, e.msg);
                        None
                    }
                },
                _ => {
                    bad(
                        self,
                        ".rate",
                        ProblemKind::Schema,
                        "give the rule's rate, e.g. rate = \"10MB/s\"".into(),
                    );
                    None
                }
            };
            let when = match t.get("when") {
                None => None,
                Some(toml::Value::String(s)) => match Calendar::parse(s) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        bad(self, ".when", ProblemKind::BadValue, e.to_string());
                        None
                    }
                },
                Some(_) => {
                    bad(
                        self,
                        ".when",
                        ProblemKind::Schema,
                        "give a schedule string, e.g. when = \"mon..fri 08:00-18:00\"".into(),
                    );
                    None
                }
            };
            if let Some(rate) = rate {
                rules.push(RateRule { when, rate });
            }
        }
        if !ok {
            return (None, None);
        }
        (None, Some(RateSchedule { rules }))
    }

    /// An absolute path.
    fn path(&mut self, v: &Spanned<String>, key: &str) -> Option<PathBuf> {
        let p = PathBuf::from(v.get_ref());
        if !p.is_absolute() {
            self.problem(
                v,
                key,
                ProblemKind::BadValue,
                format!("{:?}: give an absolute path", v.get_ref()),
            );
            return None;
        }
        Some(p)
    }

    /// An absolute path to a readable certificate (with `Checks::Files`).
    fn cert(&mut self, v: &Spanned<String>, key: &str, checks: Checks) -> Option<PathBuf> {
        let p = self.path(v, key)?;
        if checks == Checks::Files {
            if let Err(e) = crate::transport::keys::load_cert(&p) {
                self.problem(
                    v,
                    key,
                    ProblemKind::Unreadable,
                    format!("{e}; give a PEM certificate (`vdrep keys init` makes SITE.crt)"),
                );
                return None;
            }
        }
        Some(p)
    }

    fn certs(
        &mut self,
        v: &Option<Vec<Spanned<String>>>,
        key: &str,
        checks: Checks,
    ) -> Vec<PathBuf> {
        v.iter()
            .flatten()
            .filter_map(|c| self.cert(c, key, checks))
            .collect()
    }

    fn check(&mut self, raw: raw::File, checks: Checks) -> Config {
        let site = self.site(raw.site.as_ref(), checks);
        let mounts = self.mounts(&raw.mount, checks);
        let receiver = raw.receiver.as_ref().and_then(|r| self.receiver(r, checks));
        let site_trust_named = raw
            .site
            .as_ref()
            .and_then(|s| s.trust.as_ref())
            .is_some_and(|t| !t.is_empty());
        let mut vms: Vec<VmCfg> = Vec::new();
        for (i, v) in raw.vm.iter().enumerate() {
            let Some(vm) = self.vm(i, v, (&site, site_trust_named), &mounts, checks) else {
                continue;
            };
            if let Some(why) = group_clash(&vm, &vms) {
                let at = v.group.as_ref().unwrap_or(&v.name);
                self.problem(
                    at,
                    &format!("vm[{}].group", vm.name),
                    ProblemKind::BadValue,
                    why,
                );
                continue;
            }
            if vms.iter().any(|x| x.name == vm.name) {
                self.problem(
                    &v.name,
                    &format!("vm[{}].name", vm.name),
                    ProblemKind::Duplicate,
                    format!(
                        "a VM named {:?} is already defined; VM names must be unique",
                        vm.name
                    ),
                );
                continue;
            }
            vms.push(vm);
        }
        Config {
            path: self.file.clone(),
            site,
            mounts,
            receiver,
            vms,
        }
    }

    fn site(&mut self, raw: Option<&raw::Site>, checks: Checks) -> Site {
        let Some(raw) = raw else {
            return Site::default();
        };
        let name = self.value(&raw.name, "site.name", |n: &String| {
            crate::transport::keys::check_site_name(n)
                .map(str::to_string)
                .map_err(|e| BadValue::new(ProblemKind::BadValue, e.to_string()))
        });
        let keys = raw.keys.as_ref().and_then(|k| self.path(k, "site.keys"));
        if let (Some(k), Some(at), Checks::Files) = (&keys, &raw.keys, checks) {
            if let Err(e) = crate::transport::keys::Identity::from_dir(k, name.as_deref()) {
                self.problem(
                    at,
                    "site.keys",
                    ProblemKind::Unreadable,
                    format!("{e}; give the folder `vdrep keys init` wrote"),
                );
            }
        }
        let trust = self.certs(&raw.trust, "site.trust", checks);
        let log_format = self.value(&raw.log_format, "site.log_format", |f: &String| {
            f.parse().map_err(|e: crate::service::BadLogFormat| {
                BadValue::new(ProblemKind::BadValue, e.to_string())
            })
        });
        let notify_command = self.value(&raw.notify_command, "site.notify_command", |s: &String| {
            if s.trim().is_empty() {
                Err(BadValue::new(
                    ProblemKind::BadValue,
                    "give a shell command (e.g. /usr/share/vdrep/notify-webhook.sh URL), or leave the key out",
                ))
            } else {
                Ok(s.clone())
            }
        });
        let notify_timeout =
            self.value(&raw.notify_timeout, "site.notify_timeout", |s: &String| {
                parse_duration(s)
            });
        Site {
            name,
            keys,
            trust,
            log_format,
            notify_command,
            notify_timeout,
        }
    }

    fn mounts(&mut self, raw: &[raw::Mount], checks: Checks) -> Vec<MountCfg> {
        let mut out: Vec<MountCfg> = Vec::new();
        for m in raw {
            let Some(p) = self.path(&m.path, "mount.path") else {
                continue;
            };
            let path = resolve(&p);
            if checks == Checks::Files && !path.is_dir() {
                self.problem(
                    &m.path,
                    "mount.path",
                    ProblemKind::Unreadable,
                    format!("{} is not a folder", p.display()),
                );
            }
            if out.iter().any(|x| x.path == path) {
                self.problem(
                    &m.path,
                    "mount.path",
                    ProblemKind::Duplicate,
                    format!("{} is listed twice", p.display()),
                );
                continue;
            }
            let block_size =
                self.value(
                    &m.block_size,
                    "mount.block_size",
                    |b: &i64| match u32::try_from(*b) {
                        Ok(b) if b.is_power_of_two() && (512..=1 << 20).contains(&b) => Ok(b),
                        _ => Err(BadValue::new(
                            ProblemKind::BadValue,
                            format!("{b}: give a power of two from 512 to 1048576"),
                        )),
                    },
                );
            let metrics_listen =
                self.value(&m.metrics_listen, "mount.metrics_listen", |s: &String| {
                    parse_listen(s)
                });
            let watchdog = self.value(&m.watchdog, "mount.watchdog", |s: &String| {
                parse_watchdog(s)
            });
            let activity_hot = self.value(&m.activity_hot, "mount.activity_hot", |s: &String| {
                parse_activity_hot(s)
            });
            let keep_writes = self.value(&m.keep_writes, "mount.keep_writes", |s: &String| {
                parse_keep_writes(s)
            });
            let fuse_transport =
                self.value(&m.fuse_transport, "mount.fuse_transport", |s: &String| {
                    parse_fuse_transport(s)
                });
            out.push(MountCfg {
                path,
                block_size,
                patterns: m.patterns.clone().unwrap_or_default(),
                metrics_listen,
                activity_log: m.activity_log,
                activity_hot,
                keep_writes,
                watchdog,
                fuse_transport,
            });
        }
        out
    }

    fn receiver(&mut self, r: &raw::Receiver, checks: Checks) -> Option<ReceiverCfg> {
        let listen = self.value(&Some(r.listen.clone()), "receiver.listen", |s: &String| {
            s.parse::<SocketAddr>().map_err(|_| {
                BadValue::new(
                    ProblemKind::BadAddress,
                    format!("{s:?} is not IP:PORT to listen on (e.g. 0.0.0.0:7700 or [::]:7700)"),
                )
            })
        });
        let is_s3 = r.store.get_ref().starts_with("s3://");
        let store = if is_s3 {
            Some(PathBuf::from(r.store.get_ref()))
        } else {
            self.path(&r.store, "receiver.store")
        };
        let opt_path = |me: &mut Self, v: &Option<Spanned<String>>, key: &str| {
            v.as_ref().and_then(|v| me.path(v, key))
        };
        let s3_credentials = opt_path(self, &r.s3_credentials, "receiver.s3_credentials");
        let encryption_key = opt_path(self, &r.encryption_key, "receiver.encryption_key");
        let cache = opt_path(self, &r.cache, "receiver.cache");
        let s3_endpoint = r.s3_endpoint.as_ref().map(|v| v.get_ref().clone());
        if is_s3 && (s3_endpoint.is_none() || encryption_key.is_none()) {
            self.problem(
                &r.store,
                "receiver.store",
                ProblemKind::BadValue,
                "an s3:// store needs s3_endpoint and encryption_key in [receiver]".into(),
            );
        }
        if let (Some(s), Checks::Files, false) = (&store, checks, is_s3) {
            if !s.is_dir() {
                self.problem(
                    &r.store,
                    "receiver.store",
                    ProblemKind::Unreadable,
                    format!("{} is not a folder (create it first)", s.display()),
                );
            }
        }
        let keep_all_for = self.value(&r.keep_all_for, "receiver.keep_all_for", |s: &String| {
            parse_duration(s)
        });
        let then_one_per = self.value(&r.then_one_per, "receiver.then_one_per", |s: &String| {
            parse_duration(s)
        });
        let keep_for = self.value(&r.keep_for, "receiver.keep_for", |s: &String| {
            if s.trim().eq_ignore_ascii_case("forever") {
                Ok(None)
            } else {
                parse_duration(s).map(Some).map_err(|e| e.or("`forever`"))
            }
        });
        let prune_every = self.value(&r.prune_every, "receiver.prune_every", |s: &String| {
            if s.trim().eq_ignore_ascii_case("never") {
                Ok(None)
            } else {
                parse_duration(s).map(Some).map_err(|e| e.or("`never`"))
            }
        });
        let keep_last = self.value(&r.keep_last, "receiver.keep_last", |n: &i64| {
            usize::try_from(*n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                BadValue::new(
                    ProblemKind::BadValue,
                    format!("{n}: give 1 or more (the newest point is always kept)"),
                )
            })
        });
        let metrics_listen = self.value(
            &r.metrics_listen,
            "receiver.metrics_listen",
            |s: &String| parse_listen(s),
        );
        let verify_boot = self
            .value(&r.verify_boot, "receiver.verify_boot", |s: &String| {
                if s.trim().eq_ignore_ascii_case("never") {
                    Ok(None)
                } else {
                    crate::replica::boot::BootSchedule::parse(s)
                        .map(Some)
                        .map_err(|e| BadValue::new(ProblemKind::BadValue, e.to_string()))
                }
            })
            .flatten();
        let verify_boot_timeout = self.value(
            &r.verify_boot_timeout,
            "receiver.verify_boot_timeout",
            |s: &String| parse_duration(s),
        );
        let verify_boot_wait_for = self.value(
            &r.verify_boot_wait_for,
            "receiver.verify_boot_wait_for",
            |s: &String| {
                if s.trim().is_empty() {
                    Err(BadValue::new(
                        ProblemKind::BadValue,
                        "an empty command: leave it out to wait for the guest agent",
                    ))
                } else {
                    Ok(s.clone())
                }
            },
        );
        let store_sync = self.value(&r.store_sync, "receiver.store_sync", |s: &String| {
            parse_store_sync(s)
        });
        Some(ReceiverCfg {
            listen: listen?,
            store: store?,
            keep_all_for,
            then_one_per,
            keep_for,
            keep_last,
            prune_every,
            metrics_listen,
            verify_boot,
            verify_boot_timeout,
            verify_boot_wait_for,
            store_sync,
            s3_endpoint,
            s3_credentials,
            encryption_key,
            cache,
        })
    }

    /// The disk files of libvirt domain `dom` (read through libvirt), each
    /// spanning the `domain` value; a disk that is not a file, or a
    /// domain libvirt does not know, is a problem.
    fn domain_disks(&mut self, dom: &Spanned<String>, key: &str) -> Vec<Spanned<String>> {
        let virsh = crate::libvirt::Virsh::new();
        let def = match virsh
            .dumpxml(dom.get_ref())
            .and_then(|x| crate::libvirt::Definition::parse(&x))
        {
            Ok(d) => d,
            Err(e) => {
                self.problem(dom, key, ProblemKind::BadValue, e.to_string());
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for d in &def.disks {
            if matches!(d.device.as_str(), "cdrom" | "floppy") || d.readonly {
                continue;
            }
            match d.file.as_ref().filter(|_| d.is_replicated()) {
                Some(f) => out.push(Spanned::new(
                    dom.span(),
                    f.to_string_lossy().into_owned(),
                )),
                None => self.problem(
                    dom,
                    key,
                    ProblemKind::DiskOutsideMount,
                    format!(
                        "disk {} of domain {} is a {} disk ({}), not a file under a [[mount]]: vdrep replicates disk files",
                        d.target,
                        def.name,
                        d.kind,
                        d.source
                    ),
                ),
            }
        }
        out
    }

    /// The object store of an `s3://` `to`: its endpoint and key are
    /// required, and are a problem on a receiver address.
    fn vm_s3(
        &mut self,
        v: &raw::Vm,
        is_s3: bool,
        k: &dyn Fn(&str) -> String,
    ) -> Option<crate::objstore::S3Target> {
        let credentials = v
            .s3_credentials
            .as_ref()
            .and_then(|c| self.path(c, &k("s3_credentials")));
        let encryption_key = v
            .encryption_key
            .as_ref()
            .and_then(|c| self.path(c, &k("encryption_key")));
        if !is_s3 {
            let given = [&v.s3_endpoint, &v.s3_credentials, &v.encryption_key];
            if let Some(at) = given.into_iter().flatten().next() {
                self.problem(
                    at,
                    &k("to"),
                    ProblemKind::BadValue,
                    "s3_endpoint, s3_credentials and encryption_key are for `to = \"s3://BUCKET/PREFIX\"` only".into(),
                );
            }
            return None;
        }
        match (&v.s3_endpoint, encryption_key) {
            (Some(endpoint), Some(encryption_key)) => Some(crate::objstore::S3Target {
                endpoint: endpoint.get_ref().clone(),
                credentials,
                encryption_key,
            }),
            _ => {
                self.problem(
                    &v.to,
                    &k("to"),
                    ProblemKind::BadValue,
                    "an s3:// target needs s3_endpoint and encryption_key (and s3_credentials, or the AWS_* variables)".into(),
                );
                None
            }
        }
    }

    fn vm(
        &mut self,
        i: usize,
        v: &raw::Vm,
        (site, site_trust_named): (&Site, bool),
        mounts: &[MountCfg],
        checks: Checks,
    ) -> Option<VmCfg> {
        let name_ok = crate::transport::keys::check_site_name(v.name.get_ref()).is_ok();
        let k = |f: &str| {
            if name_ok {
                format!("vm[{}].{f}", v.name.get_ref())
            } else {
                format!("vm[{}].{f}", i + 1)
            }
        };
        if !name_ok {
            self.problem(
                &v.name,
                &k("name"),
                ProblemKind::BadValue,
                format!(
                    "{:?}: give one path component of letters, digits, `-`, `_` or `.`",
                    v.name.get_ref()
                ),
            );
        }
        let mut disks = Vec::new();
        let mut rels = Vec::new();
        let mut mount: Option<PathBuf> = None;
        let domain_disks = match &v.domain {
            Some(dom) if !v.disks.is_empty() => {
                self.problem(
                    dom,
                    &k("domain"),
                    ProblemKind::BadValue,
                    "give the disks or the domain (its disk files), not both".into(),
                );
                Vec::new()
            }
            Some(dom) if checks == Checks::Files => self.domain_disks(dom, &k("domain")),
            _ => Vec::new(),
        };
        if v.disks.is_empty() && v.domain.is_none() {
            self.problem(
                &v.name,
                &k("disks"),
                ProblemKind::BadValue,
                "name at least one disk (or a libvirt domain = \"NAME\")".into(),
            );
        }
        for d in v.disks.iter().chain(&domain_disks) {
            let Some(p) = self.path(d, &k("disks")) else {
                continue;
            };
            let r = resolve(&p);
            let Some(m) = mounts
                .iter()
                .find(|m| r.starts_with(&m.path) && r != m.path)
            else {
                let allowed = mounts
                    .iter()
                    .map(|m| m.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                self.problem(
                    d,
                    &k("disks"),
                    ProblemKind::DiskOutsideMount,
                    format!(
                        "{} is under no [[mount]] (mounts: {}); add its folder as a [[mount]]",
                        p.display(),
                        if allowed.is_empty() { "none" } else { &allowed }
                    ),
                );
                continue;
            };
            if mount.as_ref().is_some_and(|x| x != &m.path) {
                self.problem(
                    d,
                    &k("disks"),
                    ProblemKind::BadValue,
                    "the disks of one VM must be under the same [[mount]]".into(),
                );
                continue;
            }
            mount = Some(m.path.clone());
            rels.push(
                r.strip_prefix(&m.path)
                    .unwrap_or(&r)
                    .to_string_lossy()
                    .into_owned(),
            );
            disks.push(p);
        }
        let is_s3 = v.to.get_ref().starts_with("s3://");
        let group = v.group.as_ref().filter(|g| {
            let why = if is_s3 {
                Some("an s3:// target keeps no consistency groups: replicate the group's VMs to a receiver".to_string())
            } else {
                crate::wire::safe_component(g.get_ref())
                    .err()
                    .map(|e| format!("{:?}: {e}", g.get_ref()))
            };
            if let Some(why) = &why {
                self.problem(g, &k("group"), ProblemKind::BadValue, why.clone());
            }
            why.is_none()
        });
        let to = self.value(&Some(v.to.clone()), &k("to"), |s: &String| {
            if is_s3 {
                crate::objstore::StoreUrl::parse(s)
                    .map(|_| s.clone())
                    .map_err(|e| BadValue::new(ProblemKind::BadValue, e.to_string()))
            } else {
                check_host_port(s).map(|()| s.clone())
            }
        });
        let s3 = self.vm_s3(v, is_s3, &k);
        let mut trust = self.certs(&v.trust, &k("trust"), checks);
        if v.trust.is_none() && !is_s3 {
            trust = site.trust.clone();
        }
        // Named but unreadable certificates are reported where they are.
        let named = match &v.trust {
            Some(t) => !t.is_empty(),
            None => site_trust_named,
        };
        if !named && !is_s3 {
            self.problem(
                &v.to,
                &k("trust"),
                ProblemKind::BadValue,
                "no certificate to trust for the receiver: set trust = [...] here or in [site]"
                    .into(),
            );
        }
        let every = self.value(&v.every, &k("every"), |s: &String| parse_every(s));
        let (max_rate, max_rate_schedule) = match &v.max_rate {
            Some(r) => self.max_rate(r, &k("max_rate")),
            None => (None, None),
        };
        let link_max_rate = self.value(&v.link_max_rate, &k("link_max_rate"), |s: &String| {
            parse_rate(s)
        });
        let resync_threshold_pct =
            self.value(&v.resync_threshold, &k("resync_threshold"), |s: &String| {
                parse_percent(s)
            });
        let resync_window = self.value(&v.resync_window, &k("resync_window"), |s: &String| {
            Calendar::parse(s)
                .map(|_| s.clone())
                .map_err(|e| BadValue::new(ProblemKind::BadValue, e.to_string()))
        });
        let app_hook = self.value(&v.app_hook, &k("app_hook"), |s: &String| {
            if s.trim().is_empty() {
                Err(BadValue::new(
                    ProblemKind::BadValue,
                    "give a command (e.g. /usr/share/vdrep/app-hook-virsh.sh)",
                ))
            } else {
                Ok(s.clone())
            }
        });
        let app_every = self.value(&v.app_every, &k("app_every"), |s: &String| parse_every(s));
        let app_timeout = self.value(&v.app_timeout, &k("app_timeout"), |s: &String| {
            parse_duration(s)
        });
        if app_hook.is_none() {
            for (f, at) in [("app_every", &v.app_every), ("app_timeout", &v.app_timeout)] {
                if let Some(at) = at {
                    self.problem(
                        at,
                        &k(f),
                        ProblemKind::BadValue,
                        "only with app_hook (set app_hook = \"CMD\")".into(),
                    );
                }
            }
        }
        let rpo_alert = self.value(&v.rpo_alert, &k("rpo_alert"), |s: &String| {
            parse_duration(s)
        });
        let retry_fast = self.value(&v.retry_fast, &k("retry_fast"), |s: &String| {
            parse_retry_steps(s, true)
        });
        let retry_fast_max_every = self.value(
            &v.retry_fast_max_every,
            &k("retry_fast_max_every"),
            |s: &String| parse_every(s),
        );
        let retry_schedule = self.value(&v.retry_schedule, &k("retry_schedule"), |s: &String| {
            parse_retry_steps(s, false)
        });
        if trust.is_empty() && !is_s3 {
            return None;
        }
        Some(VmCfg {
            name: v.name.get_ref().clone(),
            domain: v.domain.as_ref().map(|d| d.get_ref().clone()),
            group: group.map(|g| g.get_ref().clone()),
            disks,
            mount: mount?,
            disks_rel: rels,
            to: to?,
            trust,
            s3,
            every,
            max_rate,
            max_rate_schedule,
            link_max_rate,
            resync_threshold_pct,
            resync_window,
            app_hook,
            app_every,
            app_timeout,
            rpo_alert,
            retry_fast,
            retry_fast_max_every,
            retry_schedule,
        })
        .filter(|_| name_ok)
    }
}

/// Why `vm` cannot join its group with the VMs before it (`None`: it can):
/// one group's VMs replicate to one receiver (its group points are made
/// there) from one mount (it cuts them all at one instant).
fn group_clash(vm: &VmCfg, before: &[VmCfg]) -> Option<String> {
    let g = vm.group.as_ref()?;
    before
        .iter()
        .filter(|x| x.group == vm.group)
        .find_map(|other| {
            if other.to != vm.to {
                Some(format!(
                    "VM {} of group {g} replicates to {}, not to {} like VM {}: one group's VMs replicate to one receiver (its group points are made there)",
                    vm.name, vm.to, other.to, other.name
                ))
            } else if other.mount != vm.mount {
                Some(format!(
                    "VM {} of group {g} is under {}, not under {} like VM {}: one group's VMs must be under one [[mount]] (it cuts them all at one instant)",
                    vm.name,
                    vm.mount.display(),
                    other.mount.display(),
                    other.name
                ))
            } else {
                None
            }
        })
}

#[cfg(test)]
mod tests;
