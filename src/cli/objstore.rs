//! The object-store flags shared by the commands that take
//! `--store s3://bucket/prefix` ([`S3Args`]), opening the bucket they name,
//! and `vdrep points --store s3://…`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::objstore::replica::BucketStore;
use crate::objstore::{S3Target, SealedBucket, StoreUrl};
use crate::receiver::control::PointInfo;
use crate::replica::ReplicaStore;

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

/// The local cache folder of an `s3://` store by default:
/// `/var/cache/vdrep/BUCKET/PREFIX`.
pub fn default_cache(url: &StoreUrl) -> PathBuf {
    let mut p = PathBuf::from("/var/cache/vdrep").join(&url.bucket);
    if !url.prefix.is_empty() {
        p.push(&url.prefix);
    }
    p
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
    let cache = cache.unwrap_or_else(|| default_cache(&url));
    let st = crate::objstore::replica::BucketStore::open(Arc::new(bucket), &cache.join("spool"))
        .map_err(|e| e.to_string())?;
    Ok((cache.join("local"), Some(Arc::new(st))))
}

/// `vdrep points NAME --store s3://… [--site S] [--json]`.
pub fn points(vm: &str, url: &StoreUrl, site: Option<String>, a: &S3Args, json: bool) -> i32 {
    let run = || -> Result<(String, Vec<PointInfo>), String> {
        let b = open_bucket(url, a)?;
        let st = BucketStore::open(Arc::new(b), &default_cache(url).join("spool"))
            .map_err(|e| e.to_string())?;
        let site = match site {
            Some(s) => s,
            None => {
                let mut sites = st.sites_of(vm).map_err(|e| e.to_string())?;
                match sites.len() {
                    1 => sites.remove(0),
                    0 => return Err(format!("{url}: no points of VM {vm:?} from any site")),
                    _ => {
                        return Err(format!(
                            "{url}: several sites replicate {vm:?} ({}): give --site",
                            sites.join(", ")
                        ))
                    }
                }
            }
        };
        let mut out = Vec::new();
        for p in st.points(&site, vm).map_err(|e| e.to_string())? {
            out.push(PointInfo {
                pinned: false,
                // The bucket commits a point once its logs are applied.
                applied: true,
                definition: st
                    .definition(&site, vm, p.cycle)
                    .map_err(|e| e.to_string())?,
                point: p,
            });
        }
        Ok((site, out))
    };
    match run() {
        Ok((site, pts)) => super::points::print_points(
            &site,
            vm,
            pts,
            json,
            Some(&url.to_string()),
            &std::collections::HashMap::new(),
        ),
        Err(e) => {
            eprintln!("vdrep: points of {vm}: {e}");
            1
        }
    }
}
