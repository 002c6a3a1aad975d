//! [`MemClient`]: an in-memory bucket behind the [`ObjectClient`] seam, with
//! the strongest semantics (conditional create honoured, entity tags that
//! change with every put), for unit tests and the store suite without an
//! engine.

use super::{GetIf, GetResult, ObjectClient, ObjectError, ObjectMeta, PutMode};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ops::Range;

/// An in-memory bucket.
#[derive(Default)]
pub struct MemClient {
    objects: Mutex<BTreeMap<String, (Vec<u8>, String)>>,
    puts: Mutex<u64>,
}

impl MemClient {
    pub fn new() -> MemClient {
        MemClient::default()
    }

    /// Every key and body (for tests that scan the bucket).
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let objects = self.objects.lock();
        objects
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    /// Replace an object's bytes behind the client's back (tamper tests).
    pub fn overwrite_raw(&self, key: &str, body: Vec<u8>) {
        let mut objects = self.objects.lock();
        let etag = objects.get(key).map(|o| o.1.clone()).unwrap_or_default();
        objects.insert(key.to_string(), (body, etag));
    }
}

impl ObjectClient for MemClient {
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<String, ObjectError> {
        let mut objects = self.objects.lock();
        if mode == PutMode::Create && objects.contains_key(key) {
            return Err(ObjectError::PreconditionFailed {
                op: "put",
                key: key.to_string(),
            });
        }
        let mut n = self.puts.lock();
        *n += 1;
        let etag = format!("\"{:016x}-{}\"", xxhash_rust::xxh3::xxh3_64(body), *n);
        objects.insert(key.to_string(), (body.to_vec(), etag.clone()));
        Ok(etag)
    }

    fn get(&self, key: &str, range: Option<Range<u64>>, cond: GetIf<'_>) -> GetResult {
        let objects = self.objects.lock();
        let (body, etag) = objects.get(key).ok_or_else(|| ObjectError::NotFound {
            op: "get",
            key: key.to_string(),
        })?;
        match cond {
            GetIf::Match(e) if e != etag => {
                return Err(ObjectError::PreconditionFailed {
                    op: "get",
                    key: key.to_string(),
                })
            }
            GetIf::NoneMatch(e) if e == etag => return Ok(None),
            _ => {}
        }
        let len = body.len() as u64;
        let r = range.unwrap_or(0..len);
        let (s, e) = (r.start.min(len) as usize, r.end.min(len) as usize);
        Ok(Some(body[s..e.max(s)].to_vec()))
    }

    fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        let objects = self.objects.lock();
        let (body, etag) = objects.get(key).ok_or_else(|| ObjectError::NotFound {
            op: "head",
            key: key.to_string(),
        })?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: body.len() as u64,
            etag: etag.clone(),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let objects = self.objects.lock();
        Ok(objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, e))| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                etag: e.clone(),
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.objects.lock().remove(key);
        Ok(())
    }
}
