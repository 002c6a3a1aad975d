//! The file as TOML gives it: every table with `deny_unknown_fields`, and
//! every value that is checked afterwards kept with its position
//! (`toml::Spanned`) so that a problem names its line.

use serde::Deserialize;
use toml::Spanned;

type S = Spanned<String>;

// The tables below are alike in shape (derive, deny_unknown_fields,
// optional spanned values): each mirrors one TOML table of doc/CONFIG.md.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub site: Option<Site>,
    #[serde(default)]
    pub mount: Vec<Mount>,
    pub receiver: Option<Receiver>,
    #[serde(default)]
    pub vm: Vec<Vm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: Option<S>,
    pub keys: Option<S>,
    pub trust: Option<Vec<S>>,
    pub log_format: Option<S>,
    pub notify_command: Option<S>,
    pub notify_timeout: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub path: S,
    pub block_size: Option<Spanned<i64>>,
    pub patterns: Option<Vec<String>>,
    pub metrics_listen: Option<S>,
    pub activity_log: Option<bool>,
    pub activity_hot: Option<S>,
    pub keep_writes: Option<S>,
    pub watchdog: Option<S>,
    pub fuse_transport: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receiver {
    pub listen: S,
    pub store: S,
    pub keep_all_for: Option<S>,
    pub then_one_per: Option<S>,
    pub keep_for: Option<S>,
    pub keep_last: Option<Spanned<i64>>,
    pub prune_every: Option<S>,
    pub metrics_listen: Option<S>,
    pub verify_boot: Option<S>,
    pub verify_boot_timeout: Option<S>,
    pub verify_boot_wait_for: Option<S>,
    pub store_sync: Option<S>,
    pub s3_endpoint: Option<S>,
    pub s3_credentials: Option<S>,
    pub encryption_key: Option<S>,
    pub cache: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: S,
    #[serde(default)]
    pub disks: Vec<S>,
    pub domain: Option<S>,
    pub group: Option<S>,
    pub to: S,
    pub trust: Option<Vec<S>>,
    pub s3_endpoint: Option<S>,
    pub s3_credentials: Option<S>,
    pub encryption_key: Option<S>,
    pub every: Option<S>,
    /// A rate, or a list of `{ when, rate }` rules (checked by hand so
    /// that each problem names its rule).
    pub max_rate: Option<Spanned<toml::Value>>,
    pub link_max_rate: Option<S>,
    pub resync_threshold: Option<S>,
    pub resync_window: Option<S>,
    pub app_hook: Option<S>,
    pub app_every: Option<S>,
    pub app_timeout: Option<S>,
    pub rpo_alert: Option<S>,
    pub retry_fast: Option<S>,
    pub retry_fast_max_every: Option<S>,
    pub retry_schedule: Option<S>,
}
