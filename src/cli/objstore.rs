//! The object-store flags shared by the commands that take
//! `--store s3://bucket/prefix` ([`S3Args`]), opening the bucket they name,
//! and `vdrep points --store s3://…`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fmt::human;
use crate::objstore::{point, S3Target, SealedBucket, StoreUrl};
use crate::replica::Consistency;
use crate::testview::format_utc;

/// How to reach an `s3://` store.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The S3 endpoint of an `s3://` store (`http(s)://host[:port]`: Garage,
    /// Ceph RGW, MinIO, `https://s3.REGION.amazonaws.com`).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// TOML file with `access_key_id`, `secret_access_key` and optional
    /// `region` (default: the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    /// AWS_REGION environment variables).
    #[arg(long)]
    pub s3_credentials: Option<PathBuf>,
    /// The key every object is encrypted with (`vdrep keys encryption-key`).
    #[arg(long)]
    pub encryption_key: Option<PathBuf>,
}

/// `Some(url)` if `store` is an `s3://` URL; an error message if it is a
/// malformed one.
pub fn s3_url(store: &Path) -> Result<Option<StoreUrl>, String> {
    match store.to_str() {
        Some(s) => StoreUrl::parse(s).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// Open the bucket of `url` with `a` (every check of `SealedBucket::open`).
pub fn open_bucket(url: &StoreUrl, a: &S3Args) -> Result<SealedBucket, String> {
    a.target()?.open(url).map_err(|e| e.to_string())
}

impl S3Args {
    /// The flags as an [`S3Target`]; an error names the missing flag.
    pub fn target(&self) -> Result<S3Target, String> {
        let endpoint = self
            .s3_endpoint
            .clone()
            .ok_or("an s3:// store needs --s3-endpoint URL")?;
        let encryption_key = self
            .encryption_key
            .clone()
            .ok_or("an s3:// store needs --encryption-key FILE (make one with `vdrep keys encryption-key --out FILE`)")?;
        Ok(S3Target {
            endpoint,
            credentials: self.s3_credentials.clone(),
            encryption_key,
        })
    }
}

/// For `--store`: a folder stays a folder (`(store, None)`); an `s3://`
/// URL opens the bucket (every start-up check) and gives the object store
/// plus its local cache folder (`cache`, default
/// `/var/cache/vdrep/BUCKET/PREFIX`).
pub fn open_remote_store(
    store: &Path,
    a: &S3Args,
    cache: Option<PathBuf>,
) -> Result<(PathBuf, Option<Arc<dyn crate::replica::ReplicaStore>>), String> {
    let Some(url) = s3_url(store)? else {
        return Ok((store.to_path_buf(), None));
    };
    let bucket = open_bucket(&url, a)?;
    let cache = cache.unwrap_or_else(|| {
        let mut p = PathBuf::from("/var/cache/vdrep").join(&url.bucket);
        if !url.prefix.is_empty() {
            p.push(&url.prefix);
        }
        p
    });
    let st = crate::objstore::replica::BucketStore::open(Arc::new(bucket), &cache.join("spool"))
        .map_err(|e| e.to_string())?;
    Ok((cache.join("local"), Some(Arc::new(st))))
}

/// `vdrep points NAME --store s3://… [--site S] [--json]`.
pub fn points(vm: &str, url: &StoreUrl, site: Option<String>, a: &S3Args, json: bool) -> i32 {
    let run = || -> Result<(String, Vec<point::Manifest>), String> {
        let b = open_bucket(url, a)?;
        let site = match site {
            Some(s) => s,
            None => {
                let sites = point::sites_of(&b, vm).map_err(|e| e.to_string())?;
                match sites.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(format!("{url}: no points of VM {vm:?} from any site")),
                    _ => {
                        return Err(format!(
                            "{url}: several sites replicate {vm:?} ({}): give --site",
                            sites.join(", ")
                        ))
                    }
                }
            }
        };
        let pts = point::points(&b, &site, vm).map_err(|e| e.to_string())?;
        Ok((site, pts))
    };
    let (site, mut pts) = match run() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vdrep: points of {vm}: {e}");
            return 1;
        }
    };
    pts.sort_by_key(|p| std::cmp::Reverse(p.cycle));
    if json {
        let list: Vec<_> = pts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "cycle": p.cycle,
                    "time_unix_ns": p.time_unix_ns,
                    "consistency": p.consistency,
                    "disks": p.disks.iter().map(|d| &d.disk_id).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v =
            serde_json::json!({ "site": site, "vm": vm, "store": url.to_string(), "points": list });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    if pts.is_empty() {
        println!("{site}/{vm}: no recovery points yet");
        return 0;
    }
    println!(
        "{:<21} {:>10} {:>12} {:<12} DISKS",
        "TIME (UTC)", "ID", "SIZE", "CONSISTENCY"
    );
    for p in &pts {
        println!(
            "{:<21} {:>10} {:>12} {:<12} {}",
            format_utc(p.time_unix_ns),
            p.cycle,
            human(p.disks.iter().map(|d| d.size).sum()),
            match p.consistency {
                Consistency::Crash => "crash",
                Consistency::App => "app",
            },
            p.disks.len()
        );
    }
    0
}
