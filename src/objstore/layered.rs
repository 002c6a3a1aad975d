//! A disk as of one cycle, read from a bucket: a base image in sealed
//! chunks overlaid by the per-cycle log objects after it
//! (`kernel-notes/s3.md`, "Object layout"). Reads fetch only the chunks and
//! log segments they touch ([`Layered`], a [`PointRead`]).
//!
//! A stored log is its `.hrl` bytes cut into [`SEGMENT`]-byte sealed
//! segments plus one sealed index object ([`LogIndex`], `….done`), written
//! last: the log is durable once the index is listed. The index holds the
//! header fields and, per record, where its frame lies in the log, so a
//! read fetches only the segments holding the records it needs (each frame
//! is checked against its checksum again when read).
//!
//! Semantics of the overlay (as an apply would write it): start from the
//! base (zeros at and past its size), then per log, oldest first, drop
//! everything at and past the log's disk size (a shrink) and write its
//! records.

use super::bucket::{BucketError, SealedBucket};
use super::cache::ObjectCache;
use crate::hrl::format::{self, Frame, RECORD_HEADER_LEN};
use crate::replica::PointRead;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of a log per segment object.
pub const SEGMENT: u64 = 4 << 20;

/// One record of a stored log: (disk offset, disk length, offset of its
/// frame in the log, frame length (header + payload), all zeros).
pub type RecordRef = (u64, u32, u64, u32, bool);

/// The index of one stored log (the `.done` object).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogIndex {
    pub version: u32,
    pub cycle: u64,
    pub base_cycle: u64,
    pub base_size: u64,
    pub disk_size: u64,
    pub cut_unix_ns: u64,
    pub app_consistent: bool,
    pub file_bytes: u64,
    pub data_bytes: u64,
    /// The log's trailer checksum (tells a resend from another log).
    pub checksum: String,
    /// Names (relative to the bucket prefix) of the segments, in order.
    pub segments: Vec<String>,
    /// Sorted by disk offset, non-overlapping.
    pub records: Vec<RecordRef>,
}

/// A log in a disk's chain (in a manifest or a disk head).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogRef {
    pub cycle: u64,
    /// The index object's name (relative to the bucket prefix).
    pub index: String,
    /// Bytes of the log.
    pub bytes: u64,
    /// The disk size after this log.
    pub disk_size: u64,
    /// When its cut was taken (ns since the Unix epoch).
    pub cut_unix_ns: u64,
}

/// Log indexes already fetched, by object name (names are unique and
/// never rewritten, so entries never go stale).
#[derive(Default)]
pub struct IndexCache {
    map: Mutex<HashMap<String, Arc<LogIndex>>>,
}

impl IndexCache {
    /// The index object `name`, fetched once.
    pub fn get(&self, bucket: &SealedBucket, name: &str) -> Result<Arc<LogIndex>, BucketError> {
        if let Some(i) = self.map.lock().get(name) {
            return Ok(i.clone());
        }
        let body = bucket.get(name)?;
        let idx: LogIndex = serde_json::from_slice(&body).map_err(|e| {
            BucketError::Object(super::ObjectError::BadResponse {
                op: "get",
                key: bucket.url().key(name),
                why: format!("log index does not parse: {e}"),
            })
        })?;
        let idx = Arc::new(idx);
        let mut m = self.map.lock();
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(name.to_string(), idx.clone());
        Ok(idx)
    }

    /// Forget `name` (its object was deleted).
    pub fn remove(&self, name: &str) {
        self.map.lock().remove(name);
    }
}

/// What a [`Layered`] reads: a base and the logs after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Size after the last log (the disk's size at the cycle).
    pub size: u64,
    /// Size of the base image.
    pub base_size: u64,
    /// Per chunk of [`super::point::CHUNK`] bytes: its object, or zeros.
    pub chunks: Vec<Option<String>>,
    /// Oldest first.
    pub logs: Vec<LogRef>,
}

/// Objects kept in memory by one reader (chunks and log segments).
const CACHED_OBJECTS: usize = 8;

/// Random access to a disk as of one cycle, fetching objects on demand.
pub struct Layered {
    bucket: Arc<SealedBucket>,
    layers: Layers,
    indexes: Arc<IndexCache>,
    loaded: Mutex<Option<Vec<Arc<LogIndex>>>>,
    cache: Mutex<Vec<(String, Arc<Vec<u8>>)>>,
    /// The local cache the objects come through, if any.
    objects: Option<Arc<ObjectCache>>,
    fetched: AtomicU64,
}

fn io(e: BucketError) -> std::io::Error {
    std::io::Error::other(e)
}

impl Layered {
    pub fn new(bucket: Arc<SealedBucket>, layers: Layers, indexes: Arc<IndexCache>) -> Layered {
        Layered {
            bucket,
            layers,
            indexes,
            loaded: Mutex::new(None),
            cache: Mutex::new(Vec::new()),
            objects: None,
            fetched: AtomicU64::new(0),
        }
    }

    /// Fetch through `cache` (a bounded local cache shared by readers).
    pub fn with_cache(mut self, cache: Option<Arc<ObjectCache>>) -> Layered {
        self.objects = cache;
        self
    }

    /// Plaintext bytes fetched from the bucket so far (chunks, segments,
    /// not the indexes).
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The layers read.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    fn object(&self, name: &str) -> std::io::Result<Arc<Vec<u8>>> {
        if let Some((_, d)) = self.cache.lock().iter().find(|(n, _)| n == name) {
            return Ok(d.clone());
        }
        let data = match &self.objects {
            Some(c) => {
                let (data, fetched) = c.get(&self.bucket, name).map_err(io)?;
                if fetched {
                    self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                data
            }
            None => {
                let data = Arc::new(self.bucket.get(name).map_err(io)?);
                self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                data
            }
        };
        let mut c = self.cache.lock();
        if c.len() >= CACHED_OBJECTS {
            c.remove(0);
        }
        c.push((name.to_string(), data.clone()));
        Ok(data)
    }

    fn indexes(&self) -> std::io::Result<Vec<Arc<LogIndex>>> {
        let mut l = self.loaded.lock();
        if let Some(v) = &*l {
            return Ok(v.clone());
        }
        let mut v = Vec::with_capacity(self.layers.logs.len());
        for r in &self.layers.logs {
            v.push(self.indexes.get(&self.bucket, &r.index).map_err(io)?);
        }
        *l = Some(v.clone());
        Ok(v)
    }

    /// The bytes `[at, at + len)` of a stored log.
    fn log_bytes(&self, idx: &LogIndex, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let mut pos = at;
        while out.len() < len {
            let seg = (pos / SEGMENT) as usize;
            let within = (pos % SEGMENT) as usize;
            let name = idx.segments.get(seg).ok_or_else(|| {
                std::io::Error::other(format!(
                    "log of cycle {}: a record lies past its last segment (index damaged)",
                    idx.cycle
                ))
            })?;
            let data = self.object(name)?;
            let n = (len - out.len()).min(data.len().saturating_sub(within));
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "log of cycle {}: segment {name} is shorter than its index says",
                    idx.cycle
                )));
            }
            out.extend_from_slice(&data[within..within + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    /// The disk bytes of one record.
    fn record(&self, idx: &LogIndex, r: &RecordRef) -> std::io::Result<Vec<u8>> {
        let (_, length, at, frame_len, zero) = *r;
        if zero {
            return Ok(vec![0; length as usize]);
        }
        let frame = self.log_bytes(idx, at, frame_len as usize)?;
        let bad = |what: String| {
            std::io::Error::other(format!(
                "log of cycle {}: the record at log offset {at} is damaged: {what}",
                idx.cycle
            ))
        };
        let h = match format::parse_frame(&frame) {
            Ok(Frame::Record(h)) => h,
            Ok(Frame::Trailer(_)) => return Err(bad("a trailer where a record was".into())),
            Err(e) => return Err(bad(format!("{e:?}"))),
        };
        let payload = frame.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let mut out = Vec::new();
        h.check_payload(payload, &mut out)
            .map_err(|e| bad(format!("{e:?}")))?;
        Ok(match h.encoding {
            format::Encoding::Lz4 => out,
            format::Encoding::Raw => payload.to_vec(),
            format::Encoding::Zero => vec![0; h.length as usize],
        })
    }
}

/// Copy the part of `src` (disk bytes from `src_off`) that falls into
/// `buf` (disk bytes from `off`), not at or past `limit`.
fn overlay(buf: &mut [u8], off: u64, src: &[u8], src_off: u64, limit: u64) {
    let start = off.max(src_off);
    let end = (off + buf.len() as u64)
        .min(src_off + src.len() as u64)
        .min(limit);
    if start >= end {
        return;
    }
    let n = (end - start) as usize;
    let b = (start - off) as usize;
    let s = (start - src_off) as usize;
    buf[b..b + n].copy_from_slice(&src[s..s + n]);
}

impl PointRead for Layered {
    fn len(&self) -> u64 {
        self.layers.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use super::point::CHUNK;
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let base_end = end.min(self.layers.base_size);
        let mut pos = offset;
        while pos < base_end {
            let index = pos / CHUNK;
            let next = ((index + 1) * CHUNK).min(base_end);
            if let Some(Some(name)) = self.layers.chunks.get(index as usize) {
                let data = self.object(name)?;
                overlay(buf, offset, &data, index * CHUNK, base_end);
            }
            pos = next;
        }
        if self.layers.logs.is_empty() {
            return Ok(());
        }
        for idx in self.indexes()? {
            // A shrink drops what lay past the new end.
            if idx.disk_size < end {
                let from = idx.disk_size.max(offset);
                buf[(from - offset) as usize..].fill(0);
            }
            let first = idx
                .records
                .partition_point(|r| r.0 + u64::from(r.1) <= offset);
            for r in &idx.records[first..] {
                if r.0 >= end {
                    break;
                }
                let data = self.record(&idx, r)?;
                overlay(buf, offset, &data, r.0, idx.disk_size);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::overlay;

    #[test]
    fn overlay_clips() {
        let mut buf = [0u8; 8];
        overlay(&mut buf, 10, &[1, 2, 3, 4], 8, 100);
        assert_eq!(buf, [3, 4, 0, 0, 0, 0, 0, 0]);
        overlay(&mut buf, 10, &[9; 4], 15, 17);
        assert_eq!(buf, [3, 4, 0, 0, 0, 9, 9, 0]);
        overlay(&mut buf, 10, &[7; 4], 0, 100);
        assert_eq!(buf, [3, 4, 0, 0, 0, 9, 9, 0]);
    }
}
