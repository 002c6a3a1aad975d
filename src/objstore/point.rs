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
use super::ObjectError;
use crate::replica::{Consistency, PointRead};
use crate::util::hex;
use parking_lot::Mutex;
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
    /// its version at this point, or `None` for zeros.
    pub chunks: Vec<Option<String>>,
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

/// (cycle, gen, writer) of a manifest's name (the part after `points/`).
fn parse_manifest_name(leaf: &str) -> Option<(u64, u64, WriterId)> {
    let cycle = u64::from_str_radix(leaf.get(..16)?, 16).ok()?;
    let rest = leaf.get(16..)?.strip_prefix("-g")?;
    let gen = u64::from_str_radix(rest.get(..16)?, 16).ok()?;
    let w = rest.get(16..)?.strip_prefix('-')?;
    if w.len() != 32 {
        return None;
    }
    let mut writer = [0u8; 16];
    for (i, b) in writer.iter_mut().enumerate() {
        *b = u8::from_str_radix(w.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((cycle, gen, writer))
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

/// The visible points of `vm`, oldest first (one per cycle).
pub fn points(b: &SealedBucket, site: &str, vm: &str) -> Result<Vec<Manifest>, PointError> {
    let dir = vm_dir(site, vm);
    let view = FenceView::load(b.client(), &b.url().key(&format!("{dir}/fence")))?;
    let mut out: Vec<Manifest> = Vec::new();
    let prefix = format!("{dir}/points/");
    for name in b.list(&prefix)? {
        let Some((cycle, gen, writer)) = name.strip_prefix(&prefix).and_then(parse_manifest_name)
        else {
            continue;
        };
        if !view.visible(gen, &writer, cycle) {
            continue;
        }
        let bad = |why: String| PointError::BadManifest {
            name: name.clone(),
            why,
        };
        let m: Manifest = serde_json::from_slice(&b.get(&name)?).map_err(|e| bad(e.to_string()))?;
        if (m.cycle, m.gen, m.writer.as_str()) != (cycle, gen, hex(&writer).as_str()) {
            return Err(bad("its content does not match its name".into()));
        }
        out.push(m);
    }
    out.sort_by_key(|m| m.cycle);
    out.dedup_by_key(|m| m.cycle);
    Ok(out)
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
            let p = points(bucket, site, vm).map_err(|e| match e {
                PointError::Bucket(BucketError::Object(o)) => o,
                other => ObjectError::BadResponse {
                    op: "list",
                    key: fence_dir.clone(),
                    why: other.to_string(),
                },
            })?;
            Ok(p.last().map_or(0, |m| m.cycle) + 1)
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
        let name = format!(
            "{}/points/{cycle:016x}-g{:016x}-{}",
            vm_dir(&self.site, &self.vm),
            self.fence.gen,
            m.writer
        );
        let body = serde_json::to_vec(&m).map_err(|e| PointError::BadManifest {
            name: name.clone(),
            why: e.to_string(),
        })?;
        self.bucket.put(&name, &body)?;
        self.fence.check(self.bucket.client())?;
        Ok(m)
    }
}

/// One disk of one point, read chunk by chunk (the last chunk read is
/// cached).
pub struct ChunkedPoint {
    bucket: Arc<SealedBucket>,
    disk: DiskManifest,
    cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    fetched: std::sync::atomic::AtomicU64,
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
        Ok(ChunkedPoint {
            bucket,
            disk,
            cache: Mutex::new(None),
            fetched: 0.into(),
        })
    }

    /// Sealed chunk bytes fetched so far (plaintext length of the chunks).
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn chunk(&self, index: u64) -> std::io::Result<Option<Arc<Vec<u8>>>> {
        let Some(Some(name)) = self.disk.chunks.get(index as usize) else {
            return Ok(None);
        };
        if let Some((i, data)) = &*self.cache.lock() {
            if *i == index {
                return Ok(Some(data.clone()));
            }
        }
        let data = Arc::new(self.bucket.get(name).map_err(std::io::Error::other)?);
        self.fetched
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        *self.cache.lock() = Some((index, data.clone()));
        Ok(Some(data))
    }
}

impl PointRead for ChunkedPoint {
    fn len(&self) -> u64 {
        self.disk.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (index, within) = (pos / CHUNK, (pos % CHUNK) as usize);
            let n = (buf.len() - done).min(CHUNK as usize - within);
            if pos < self.disk.size {
                if let Some(data) = self.chunk(index)? {
                    let avail = data.len().saturating_sub(within).min(n);
                    buf[done..done + avail].copy_from_slice(&data[within..within + avail]);
                }
            }
            done += n;
        }
        Ok(())
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
        assert_eq!(parse_manifest_name(&leaf), Some((7, 2, [3; 16])));
        assert_eq!(parse_manifest_name(&leaf[1..]), None);
        assert_eq!(parse_manifest_name(&format!("{leaf}0")), None);
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
