//! [`ObjectCache`]: a size-bounded local cache of opened objects (chunks and
//! log segments) for lazy reads from a bucket, mountpoint-s3's local cache
//! is the model. An object enters only after its envelope opened (so it was
//! authentic), and is kept as a plain file named by a hash of its object
//! name; object names are unique and never rewritten (`kernel-notes/s3.md`),
//! so an entry never goes stale. Least recently used entries are deleted
//! once the cached bytes pass the limit. The index lives in memory: the
//! cache starts empty with each process (it is scratch, removed with the
//! test failover). A cached file that no longer matches the checksum taken
//! when it was written is dropped and fetched again.
//!
//! It also counts what the reads cost: bytes and objects fetched from the
//! bucket, hits, evictions ([`CacheStats`]).

use super::bucket::{BucketError, SealedBucket};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// What an [`ObjectCache`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Plaintext bytes of the objects fetched from the bucket.
    pub fetched_bytes: u64,
    /// Objects fetched from the bucket.
    pub fetched_objects: u64,
    /// Reads served from the local cache.
    pub hits: u64,
    /// Entries deleted to stay under the limit.
    pub evictions: u64,
    /// Bytes in the cache now.
    pub cached_bytes: u64,
    /// The limit.
    pub limit_bytes: u64,
}

struct Entry {
    size: u64,
    tick: u64,
    sum: u64,
}

#[derive(Default)]
struct Index {
    tick: u64,
    bytes: u64,
    entries: HashMap<String, Entry>,
    /// tick → name, oldest first.
    lru: BTreeMap<u64, String>,
}

impl Index {
    fn touch(&mut self, name: &str) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(name) {
            self.lru.remove(&e.tick);
            e.tick = t;
            self.lru.insert(t, name.to_string());
        }
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let e = self.entries.remove(name)?;
        self.lru.remove(&e.tick);
        self.bytes -= e.size;
        Some(e)
    }
}

/// Stripes of the per-name fetch lock (two readers missing the same object
/// fetch it once).
const STRIPES: usize = 16;

/// A bounded local cache of opened objects (see the module documentation).
pub struct ObjectCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    fetching: Vec<Mutex<()>>,
    fetched_bytes: AtomicU64,
    fetched_objects: AtomicU64,
    hits: AtomicU64,
    evictions: AtomicU64,
}

impl ObjectCache {
    /// A cache in `dir` (created, emptied) holding at most `limit` bytes.
    pub fn new(dir: &Path, limit: u64) -> std::io::Result<ObjectCache> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        Ok(ObjectCache {
            dir: dir.to_path_buf(),
            limit,
            index: Mutex::new(Index::default()),
            fetching: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            fetched_bytes: AtomicU64::new(0),
            fetched_objects: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    /// The folder of the cached files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            fetched_objects: self.fetched_objects.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            cached_bytes: self.index.lock().bytes,
            limit_bytes: self.limit,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{:032x}", xxh3_128(name.as_bytes())))
    }

    fn cached(&self, name: &str) -> Option<Vec<u8>> {
        let (size, sum) = {
            let ix = self.index.lock();
            let e = ix.entries.get(name)?;
            (e.size, e.sum)
        };
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(d) if d.len() as u64 == size && xxh3_64(&d) == sum => {
                self.index.lock().touch(name);
                Some(d)
            }
            other => {
                tracing::warn!(
                    "object cache: the cached copy of {name} ({}) is {}; fetching it again",
                    path.display(),
                    if other.is_ok() {
                        "damaged"
                    } else {
                        "unreadable"
                    }
                );
                self.index.lock().remove(name);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn store(&self, name: &str, data: &[u8]) {
        let size = data.len() as u64;
        if size > self.limit {
            return;
        }
        let path = self.path(name);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(
                "object cache: cannot keep {name} in {}: {e} (served uncached)",
                self.dir.display()
            );
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut ix = self.index.lock();
        ix.remove(name);
        ix.tick += 1;
        let tick = ix.tick;
        ix.entries.insert(
            name.to_string(),
            Entry {
                size,
                tick,
                sum: xxh3_64(data),
            },
        );
        ix.lru.insert(tick, name.to_string());
        ix.bytes += size;
        while ix.bytes > self.limit {
            let Some((_, old)) = ix.lru.pop_first() else {
                break;
            };
            if let Some(e) = ix.entries.remove(&old) {
                ix.bytes -= e.size;
            }
            let _ = std::fs::remove_file(self.path(&old));
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The opened object `name`: from the cache, else fetched from `bucket`
    /// (opened, so authenticated) and cached. The flag says it was fetched.
    pub fn get(
        &self,
        bucket: &SealedBucket,
        name: &str,
    ) -> Result<(Arc<Vec<u8>>, bool), BucketError> {
        let stripe = (xxh3_64(name.as_bytes()) % STRIPES as u64) as usize;
        let _g = self.fetching[stripe].lock();
        if let Some(d) = self.cached(name) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((Arc::new(d), false));
        }
        let data = bucket.get(name)?;
        self.fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.fetched_objects.fetch_add(1, Ordering::Relaxed);
        self.store(name, &data);
        Ok((Arc::new(data), true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::envelope::EncryptionKey;
    use crate::objstore::{MemClient, ObjectClient, PutMode, StoreUrl};

    fn bucket() -> (Arc<MemClient>, SealedBucket) {
        let mem = Arc::new(MemClient::new());
        let url = StoreUrl::parse("s3://bkt/p").unwrap().unwrap();
        let b = SealedBucket::open(mem.clone(), url, EncryptionKey::from_bytes(&[3; 32])).unwrap();
        (mem, b)
    }

    #[test]
    fn hits_evicts_least_recent_and_refetches_damaged() {
        let (_mem, b) = bucket();
        for i in 0..4u8 {
            b.put(&format!("o{i}"), &vec![i; 1000]).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let c = ObjectCache::new(&dir.path().join("c"), 2500).unwrap();
        let (d, f) = c.get(&b, "o0").unwrap();
        assert!(f && d.as_slice() == [0u8; 1000]);
        let (_, f) = c.get(&b, "o0").unwrap();
        assert!(!f, "second read is a hit");
        c.get(&b, "o1").unwrap();
        c.get(&b, "o0").unwrap(); // o0 is now newer than o1
        c.get(&b, "o2").unwrap(); // 3000 > 2500: o1 goes
        let s = c.stats();
        assert_eq!((s.fetched_objects, s.hits, s.evictions), (3, 2, 1), "{s:?}");
        assert_eq!(s.cached_bytes, 2000);
        assert!(!c.get(&b, "o0").unwrap().1, "o0 stayed");
        assert!(c.get(&b, "o1").unwrap().1, "o1 was evicted");
        // A damaged cached file is fetched again, never served.
        std::fs::write(c.path("o1"), vec![9u8; 1000]).unwrap();
        let (d, f) = c.get(&b, "o1").unwrap();
        assert!(f && d.as_slice() == [1u8; 1000]);
        // Bigger than the whole cache: served, not kept.
        b.put("big", &vec![7u8; 3000]).unwrap();
        assert!(c.get(&b, "big").unwrap().1 && c.get(&b, "big").unwrap().1);
        assert!(c.stats().cached_bytes <= 2500);
    }

    #[test]
    fn tampered_object_is_refused_with_its_name_and_not_cached() {
        let (mem, b) = bucket();
        b.put("chunk", &[5u8; 100]).unwrap();
        let key = b.url().key("chunk");
        let mut raw = crate::objstore::get_all(&*mem, &key).unwrap();
        let n = raw.len();
        raw[n - 20] ^= 1;
        mem.put(&key, &raw, PutMode::Overwrite).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = ObjectCache::new(dir.path(), 1 << 20).unwrap();
        let e = c.get(&b, "chunk").unwrap_err();
        assert!(e.to_string().contains(&key), "{e}");
        assert_eq!(c.stats().cached_bytes, 0);
        assert_eq!(c.stats().fetched_objects, 0);
    }
}
