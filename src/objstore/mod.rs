//! Object stores as replica targets (issue 11): the object-client seam
//! ([`ObjectClient`], mountpoint-s3's `ObjectClient` is the model), its
//! implementations, and the client-side encryption envelope.
//!
//! - [`ObjectClient`]: put, ranged get, head, list by prefix, delete, and
//!   the one conditional operation every engine under test honours (a GET
//!   with `If-Match` / `If-None-Match`). A create-only put (`If-None-Match:
//!   *`) is offered too, but Garage 2.5 ignores it (it overwrites), so
//!   nothing may rely on it: [`conditional_create_honoured`] probes an engine
//!   (`kernel-notes/s3.md` has the measurements).
//! - [`S3Client`] (`s3.rs`): any S3 API (Garage, Ceph RGW, AWS S3, MinIO)
//!   through `rusty-s3` (request signing) and `ureq` (blocking HTTP): the
//!   replica store is synchronous, so a blocking client needs no runtime.
//!   Retries with exponential back-off on 5xx, 429 and transport errors.
//! - [`MemClient`] (`mem.rs`): an in-memory bucket with the strong semantics
//!   (conditional create honoured), for unit tests.
//! - [`FailClient`] (`fail.rs`): wraps any client and fails chosen calls.
//! - [`envelope`]: lz4 then AES-256-GCM, the object's name bound as
//!   associated data; [`EncryptionKey`] files.
//! - [`SealedBucket`] (`bucket.rs`): one `s3://bucket/prefix` with every
//!   object sealed; opening checks endpoint, key, bucket and prefix.
//! - [`fence`]: writer fencing by generation with unique names only (no
//!   conditional put needed): claims, start markers, who owns a cycle.
//! - [`cache`]: the size-bounded local cache of opened objects that lazy
//!   reads (a test failover straight from the bucket) go through.
//! - [`failedover`]: the record of an unplanned failover from the bucket
//!   that stops the old primary's writers.
//! - [`pin`]: a point a failover uses, kept by every prune meanwhile.
//! - [`point`]: recovery points in a bucket: sealed chunks, manifests
//!   written last, fenced writers, chunk-by-chunk point reads.
//! - [`StoreUrl`], [`Credentials`] (`config.rs`): `s3://bucket/prefix`, the
//!   credentials file and the `AWS_*` environment variables.

mod bucket;
pub mod cache;
mod config;
pub mod envelope;
mod error;
mod fail;
pub mod failedover;
pub mod fence;
pub mod layered;
mod mem;
pub mod pin;
pub mod point;
pub mod replica;
mod s3;

pub use bucket::{BucketError, BucketErrorKind, SealedBucket, MARKER};
pub use config::{Credentials, OpenError, OpenErrorKind, S3Target, StoreUrl};
pub use envelope::{EncryptionKey, EnvelopeError, EnvelopeErrorKind};
pub use error::{ObjectError, ObjectErrorKind};
pub use fail::{FailClient, ObjOp};
pub use mem::MemClient;
pub use s3::S3Client;

use std::ops::Range;

/// What a head or a listing tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key (within the bucket; a client's prefix is not
    /// stripped).
    pub key: String,
    pub size: u64,
    /// The entity tag, quotes included, as the store sent it.
    pub etag: String,
}

/// How [`ObjectClient::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it.
    Overwrite,
    /// Only create (`If-None-Match: *`): an existing object fails with
    /// [`ObjectErrorKind::PreconditionFailed`] *on engines that honour it*
    /// (Garage 2.5 does not: see [`conditional_create_honoured`]).
    Create,
}

/// A condition on a GET (honoured by Garage 2.5, AWS S3, Ceph RGW, MinIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetIf<'a> {
    Always,
    /// Only if the object's entity tag is this one (`If-Match`): a 412 is
    /// [`ObjectErrorKind::PreconditionFailed`].
    Match(&'a str),
    /// Only if it changed (`If-None-Match`): unchanged is `Ok(None)`.
    NoneMatch(&'a str),
}

/// What [`ObjectClient::get`] answers: the bytes, or `None` for an
/// unchanged object under [`GetIf::NoneMatch`].
pub type GetResult = Result<Option<Vec<u8>>, ObjectError>;

/// The object-store operations the replica store needs. Keys are plain
/// strings ('/'-separated); every call is blocking and may be retried by the
/// implementation. A missing object is [`ObjectErrorKind::NotFound`] (get,
/// head) and not an error for delete.
pub trait ObjectClient: Send + Sync {
    /// Store `body` under `key`; returns the new entity tag.
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<String, ObjectError>;
    /// The object's bytes (or `range` of them, clamped to its size).
    /// `Ok(None)` only for [`GetIf::NoneMatch`] on an unchanged object.
    fn get(&self, key: &str, range: Option<Range<u64>>, cond: GetIf<'_>) -> GetResult;
    /// Size and entity tag.
    fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError>;
    /// Every object whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;
    /// Remove the object (absent is fine).
    fn delete(&self, key: &str) -> Result<(), ObjectError>;
}

/// A shared client is a client (so wrappers like [`FailClient`] can wrap
/// one that is also used elsewhere).
impl<T: ObjectClient + ?Sized> ObjectClient for std::sync::Arc<T> {
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<String, ObjectError> {
        (**self).put(key, body, mode)
    }
    fn get(&self, key: &str, range: Option<Range<u64>>, cond: GetIf<'_>) -> GetResult {
        (**self).get(key, range, cond)
    }
    fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        (**self).head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        (**self).list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        (**self).delete(key)
    }
}

/// Get a whole object unconditionally.
pub fn get_all(c: &dyn ObjectClient, key: &str) -> Result<Vec<u8>, ObjectError> {
    match c.get(key, None, GetIf::Always)? {
        Some(v) => Ok(v),
        None => Err(ObjectError::BadResponse {
            op: "get",
            key: key.to_string(),
            why: "an unconditional get returned no body".into(),
        }),
    }
}

/// Whether the engine behind `c` honours a create-only put: writes
/// `probe_key` twice with [`PutMode::Create`] and checks the second was
/// refused and the first kept. Deletes the probe object afterwards.
pub fn conditional_create_honoured(
    c: &dyn ObjectClient,
    probe_key: &str,
) -> Result<bool, ObjectError> {
    c.delete(probe_key)?;
    c.put(probe_key, b"first", PutMode::Create)?;
    let second = c.put(probe_key, b"second", PutMode::Create);
    let kept = get_all(c, probe_key)?;
    c.delete(probe_key)?;
    match second {
        Err(e) if e.kind() == ObjectErrorKind::PreconditionFailed => Ok(kept == b"first"),
        Err(e) => Err(e),
        Ok(_) => Ok(false),
    }
}
