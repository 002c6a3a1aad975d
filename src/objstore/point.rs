//! Recovery points in a bucket, the first layer of the object-store replica
//! (`kernel-notes/s3.md`, "Object layout"): disk images as sealed chunks,
//! one manifest per point written last, fenced writers, and random access to
//! a point's disk ([`ChunkedPoint`], a [`PointRead`]) that fetches only the
//! chunks a read touches.
//!
//! ```text
//! sites/<site>/vms/<vm>/fence/…                                   objstore::fence
//! sites/<site>/vms/<vm>/chunks/<disk hex>/<index:08x>.v<cycle:016x>-g<gen:016x>
//! sites/<site>/vms/<vm>/points/<cycle:016x>-g<gen:016x>-<writer hex>
//! ```
//!
//! Names are unique per (cycle, generation), so no writer ever overwrites
//! another's object. A chunk that is all zeros is not stored. A point
//! exists once its manifest is listed *and* its writer owns its cycle
//! ([`FenceView::visible`]); everything written before the manifest is
//! invisible until then, so a crash never exposes a half point.
//! Per-cycle log objects and compaction come next (not built yet).

use super::bucket::{BucketError, SealedBucket};
use super::fence::{FenceError, FenceView, Writer, WriterId};
use super::layered::{IndexCache, Layered, Layers, LogRef};
use super::ObjectError;
use crate::replica::{Consistency, PointRead};
use crate::util::hex;
use std::sync::Arc;

/// Bytes per chunk of a disk image.
pub const CHUNK: u64 = 4 << 20;

/// One disk in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskManifest {
    /// 32 hex digits.
    pub disk_id: String,
    pub size: u64,
    /// Per chunk index: the object name (relative to the bucket prefix) of
    /// its version at this point's base, or `None` for zeros.
    pub chunks: Vec<Option<String>>,
    /// Size of the base the chunks hold (`size` when there are no logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_size: Option<u64>,
    /// The logs after the base up to this point, oldest first
    /// ([`super::layered`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRef>,
}

impl DiskManifest {
    /// What a reader of this disk reads.
    pub fn layers(&self) -> Layers {
        Layers {
            size: self.size,
            base_size: self.base_size.unwrap_or(self.size),
            chunks: self.chunks.clone(),
            logs: self.logs.clone(),
        }
    }
}

/// A recovery point of one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub cycle: u64,
    pub time_unix_ns: u64,
    pub consistency: Consistency,
    pub gen: u64,
    /// 32 hex digits.
    pub writer: String,
    pub disks: Vec<DiskManifest>,
}

/// What kind of failure a [`PointError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointErrorKind {
    Bucket,
    Fence,
    BadManifest,
    NoSuchPoint,
}

#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("manifest {name}: {why}")]
    BadManifest { name: String, why: String },
    #[error("{site}/{vm}: no recovery point at cycle {cycle} in the bucket")]
    NoSuchPoint {
        site: String,
        vm: String,
        cycle: u64,
    },
}

impl PointError {
    pub fn kind(&self) -> PointErrorKind {
        match self {
            PointError::Bucket(_) => PointErrorKind::Bucket,
            PointError::Fence(_) => PointErrorKind::Fence,
            PointError::BadManifest { .. } => PointErrorKind::BadManifest,
            PointError::NoSuchPoint { .. } => PointErrorKind::NoSuchPoint,
        }
    }
}

impl From<ObjectError> for PointError {
    fn from(e: ObjectError) -> Self {
        PointError::Bucket(BucketError::Object(e))
    }
}

fn vm_dir(site: &str, vm: &str) -> String {
    format!("sites/{site}/vms/{vm}")
}

/// The name of the manifest of `cycle` by `writer` (hex) of `gen`.
pub fn manifest_name(site: &str, vm: &str, cycle: u64, gen: u64, writer: &str) -> String {
    format!(
        "{}/points/{cycle:016x}-g{gen:016x}-{writer}",
        vm_dir(site, vm)
    )
}

/// The version of a manifest: (0, 0) as first written, (generation,
/// sequence) of the writer that rewrote it (compaction: `.c<gen>-<seq>`).
pub type ManifestVersion = (u64, u64);

/// (cycle, gen, writer, version) of a manifest's name (the part after
/// `points/`): `<cycle>-g<gen>-<writer>[.c<gen>-<seq>]`.
pub fn parse_manifest_name(leaf: &str) -> Option<(u64, u64, WriterId, ManifestVersion)> {
    let cycle = u64::from_str_radix(leaf.get(..16)?, 16).ok()?;
    let rest = leaf.get(16..)?.strip_prefix("-g")?;
    let gen = u64::from_str_radix(rest.get(..16)?, 16).ok()?;
    let rest = rest.get(16..)?.strip_prefix('-')?;
    let w = rest.get(..32)?;
    let mut writer = [0u8; 16];
    for (i, b) in writer.iter_mut().enumerate() {
        *b = u8::from_str_radix(w.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let version = match rest.get(32..)? {
        "" => (0, 0),
        v => {
            let v = v.strip_prefix(".c")?;
            let (g, s) = v.split_once('-')?;
            if g.len() != 16 || s.len() != 16 {
                return None;
            }
            (
                u64::from_str_radix(g, 16).ok()?,
                u64::from_str_radix(s, 16).ok()?,
            )
        }
    };
    Some((cycle, gen, writer, version))
}

/// A manifest's name in a new version (see [`parse_manifest_name`]).
pub fn manifest_version_name(name: &str, version: ManifestVersion) -> String {
    let base = name.split_once(".c").map_or(name, |(b, _)| b);
    format!("{base}.c{:016x}-{:016x}", version.0, version.1)
}

/// One visible point in a listing: its cycle, the name of its newest
/// manifest version, and every version's name.
#[derive(Debug, Clone)]
pub struct Listed {
    pub cycle: u64,
    pub newest: String,
    pub all: Vec<String>,
}

/// The visible points of `vm` by name only (list of the fence and of the
/// manifests; nothing is fetched), oldest first.
pub fn list_points(b: &SealedBucket, site: &str, vm: &str) -> Result<Vec<Listed>, PointError> {
    let dir = vm_dir(site, vm);
    let view = FenceView::load(b.client(), &b.url().key(&format!("{dir}/fence")))?;
    let prefix = format!("{dir}/points/");
    let mut found: Vec<(u64, ManifestVersion, String)> = Vec::new();
    for name in b.list(&prefix)? {
        let Some((cycle, gen, writer, version)) =
            name.strip_prefix(&prefix).and_then(parse_manifest_name)
        else {
            continue;
        };
        if view.visible(gen, &writer, cycle) {
            found.push((cycle, version, name));
        }
    }
    found.sort();
    let mut out: Vec<Listed> = Vec::new();
    for (cycle, _, name) in found {
        match out.last_mut() {
            Some(l) if l.cycle == cycle => {
                l.newest = name.clone();
                l.all.push(name);
            }
            _ => out.push(Listed {
                cycle,
                newest: name.clone(),
                all: vec![name],
            }),
        }
    }
    Ok(out)
}

/// Parse a manifest fetched as `name` and check it is the one its name
/// says.
pub fn parse_manifest(name: &str, body: &[u8]) -> Result<Manifest, PointError> {
    let bad = |why: String| PointError::BadManifest {
        name: name.to_string(),
        why,
    };
    let leaf = name.rsplit('/').next().unwrap_or(name);
    let (cycle, gen, writer, _) =
        parse_manifest_name(leaf).ok_or_else(|| bad("not a manifest name".into()))?;
    let m: Manifest = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if (m.cycle, m.gen, m.writer.as_str()) != (cycle, gen, hex(&writer).as_str()) {
        return Err(bad("its content does not match its name".into()));
    }
    Ok(m)
}

/// The sites that have points of `vm` in the bucket.
pub fn sites_of(b: &SealedBucket, vm: &str) -> Result<Vec<String>, PointError> {
    let mut sites: Vec<String> = b
        .list("sites/")?
        .iter()
        .filter_map(|k| {
            let rest = k.strip_prefix("sites/")?;
            let (site, tail) = rest.split_once('/')?;
            tail.starts_with(&format!("vms/{vm}/points/"))
                .then(|| site.to_string())
        })
        .collect();
    sites.dedup();
    Ok(sites)
}

/// The visible points of `vm`, oldest first (one per cycle: its newest
/// manifest version).
pub fn points(b: &SealedBucket, site: &str, vm: &str) -> Result<Vec<Manifest>, PointError> {
    let mut out = Vec::new();
    for l in list_points(b, site, vm)? {
        out.push(parse_manifest(&l.newest, &b.get(&l.newest)?)?);
    }
    Ok(out)
}

/// The cycle of the newest visible point of `vm` (0: none), for a
/// claimer's start; an object-store failure keeps its kind (retryable or
/// not).
pub fn newest_visible_cycle(b: &SealedBucket, site: &str, vm: &str) -> Result<u64, ObjectError> {
    match list_points(b, site, vm) {
        Ok(l) => Ok(l.last().map_or(0, |l| l.cycle)),
        Err(PointError::Bucket(BucketError::Object(o))) => Err(o),
        Err(other) => Err(ObjectError::BadResponse {
            op: "list",
            key: b.url().key(&format!("{}/points/", vm_dir(site, vm))),
            why: other.to_string(),
        }),
    }
}

/// A fenced writer of one VM's points.
pub struct VmWriter<'a> {
    bucket: &'a SealedBucket,
    site: String,
    vm: String,
    fence: Writer,
}

impl<'a> VmWriter<'a> {
    /// Claim the next generation of `vm`; it owns cycles above the newest
    /// visible point.
    pub fn open(
        bucket: &'a SealedBucket,
        site: &str,
        vm: &str,
        writer: WriterId,
    ) -> Result<VmWriter<'a>, PointError> {
        let dir = vm_dir(site, vm);
        let fence_dir = bucket.url().key(&format!("{dir}/fence"));
        let fence = Writer::claim(bucket.client(), &fence_dir, writer, || {
            Ok(newest_visible_cycle(bucket, site, vm)? + 1)
        })?;
        Ok(VmWriter {
            bucket,
            site: site.to_string(),
            vm: vm.to_string(),
            fence,
        })
    }

    /// The generation held.
    pub fn gen(&self) -> u64 {
        self.fence.gen
    }

    /// The first cycle this writer owns.
    pub fn start(&self) -> u64 {
        self.fence.start
    }

    /// Store chunk `index` of a disk as of `cycle`; its object name, or
    /// `None` for an all-zero chunk (nothing stored).
    pub fn put_chunk(
        &self,
        disk_id: &[u8; 16],
        index: u64,
        cycle: u64,
        data: &[u8],
    ) -> Result<Option<String>, PointError> {
        if data.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let name = format!(
            "{}/chunks/{}/{index:08x}.v{cycle:016x}-g{:016x}",
            vm_dir(&self.site, &self.vm),
            hex(disk_id),
            self.fence.gen
        );
        self.bucket.put(&name, data)?;
        Ok(Some(name))
    }

    /// Make the point of `cycle` over `disks` visible: the manifest is put
    /// last, then the fence is checked (a fenced writer must not
    /// acknowledge the point).
    pub fn commit(
        &self,
        cycle: u64,
        time_unix_ns: u64,
        consistency: Consistency,
        disks: Vec<DiskManifest>,
    ) -> Result<Manifest, PointError> {
        let m = Manifest {
            version: 1,
            cycle,
            time_unix_ns,
            consistency,
            gen: self.fence.gen,
            writer: hex(&self.fence.writer),
            disks,
        };
        let name = manifest_name(&self.site, &self.vm, cycle, self.fence.gen, &m.writer);
        let body = serde_json::to_vec(&m).map_err(|e| PointError::BadManifest {
            name: name.clone(),
            why: e.to_string(),
        })?;
        self.bucket.put(&name, &body)?;
        self.fence.check(self.bucket.client())?;
        Ok(m)
    }
}

/// One disk of one point, read chunk by chunk (and log record by log
/// record, [`Layered`]).
pub struct ChunkedPoint {
    inner: Layered,
}

impl ChunkedPoint {
    /// Disk `disk_id` of the visible point `cycle` of `vm`.
    pub fn open(
        bucket: Arc<SealedBucket>,
        site: &str,
        vm: &str,
        cycle: u64,
        disk_id: &[u8; 16],
    ) -> Result<ChunkedPoint, PointError> {
        let id = hex(disk_id);
        let disk = points(&bucket, site, vm)?
            .into_iter()
            .find(|m| m.cycle == cycle)
            .and_then(|m| m.disks.into_iter().find(|d| d.disk_id == id))
            .ok_or_else(|| PointError::NoSuchPoint {
                site: site.to_string(),
                vm: vm.to_string(),
                cycle,
            })?;
        let layers = disk.layers();
        Ok(ChunkedPoint {
            inner: Layered::new(bucket, layers, Arc::new(IndexCache::default())),
        })
    }

    /// Plaintext bytes of chunks and log segments fetched so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.inner.fetched_bytes()
    }
}

impl PointRead for ChunkedPoint {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::envelope::EncryptionKey;
    use crate::objstore::{MemClient, StoreUrl};

    #[test]
    fn manifest_names() {
        let leaf = format!("{:016x}-g{:016x}-{}", 7, 2, hex(&[3; 16]));
        assert_eq!(parse_manifest_name(&leaf), Some((7, 2, [3; 16], (0, 0))));
        assert_eq!(parse_manifest_name(&leaf[1..]), None);
        assert_eq!(parse_manifest_name(&format!("{leaf}0")), None);
        let v = manifest_version_name(&leaf, (4, 9));
        assert_eq!(parse_manifest_name(&v), Some((7, 2, [3; 16], (4, 9))));
        assert_eq!(
            manifest_version_name(&v, (5, 1)),
            manifest_version_name(&leaf, (5, 1))
        );
    }

    #[test]
    fn only_committed_points_of_the_owner_are_visible() {
        let mem = Arc::new(MemClient::new());
        let url = StoreUrl::parse("s3://bkt/p").unwrap().unwrap();
        let b = SealedBucket::open(mem, url, EncryptionKey::from_bytes(&[5; 32])).unwrap();
        let w = VmWriter::open(&b, "s", "vm", [1; 16]).unwrap();
        let id = [9u8; 16];
        let c0 = w.put_chunk(&id, 0, 1, &[7u8; 100]).unwrap();
        assert_eq!(w.put_chunk(&id, 1, 1, &[0u8; 100]).unwrap(), None);
        // Chunks without a manifest: no point.
        assert!(points(&b, "s", "vm").unwrap().is_empty());
        let disk = DiskManifest {
            disk_id: hex(&id),
            size: CHUNK + 100,
            chunks: vec![c0, None],
            base_size: None,
            logs: Vec::new(),
        };
        w.commit(1, 0, Consistency::Crash, vec![disk.clone()])
            .unwrap();
        assert_eq!(points(&b, "s", "vm").unwrap().len(), 1);
        // A new writer fences the old one: its later manifest is invisible
        // and its commit refused.
        let w2 = VmWriter::open(&b, "s", "vm", [2; 16]).unwrap();
        assert_eq!(w2.start(), 2);
        let e = w
            .commit(2, 0, Consistency::Crash, vec![disk.clone()])
            .unwrap_err();
        assert_eq!(e.kind(), PointErrorKind::Fence);
        assert_eq!(points(&b, "s", "vm").unwrap().len(), 1);
        w2.commit(2, 0, Consistency::App, vec![disk]).unwrap();
        let cycles: Vec<u64> = points(&b, "s", "vm")
            .unwrap()
            .iter()
            .map(|m| m.cycle)
            .collect();
        assert_eq!(cycles, [1, 2]);
    }
}
