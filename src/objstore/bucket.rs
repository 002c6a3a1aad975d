//! [`SealedBucket`]: the encrypted view of one `s3://bucket/prefix` that the
//! object-store replica code writes through. Every object is sealed with the
//! envelope under its full key (so it cannot be moved), and opening checks
//! the store before anything is written: the endpoint answers, the key is
//! accepted, the bucket exists, and the prefix is vdrep's with this
//! encryption key (`<prefix>/vdrep-store`, sealed) or empty.

use super::envelope::{EncryptionKey, EnvelopeError, EnvelopeErrorKind};
use super::{get_all, ObjectClient, ObjectError, ObjectErrorKind, PutMode, StoreUrl};
use std::sync::Arc;

/// The marker object of a prefix vdrep owns.
pub const MARKER: &str = "vdrep-store";
const MARKER_BODY: &[u8] = b"vdrep object store, format 1\n";

/// What kind of failure a [`BucketError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketErrorKind {
    /// The object store failed or refused (see [`ObjectErrorKind`]).
    Object(ObjectErrorKind),
    /// An object did not open (see [`EnvelopeErrorKind`]).
    Envelope(EnvelopeErrorKind),
    /// The prefix holds objects but no vdrep marker.
    ForeignPrefix,
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(
        "{url}: the prefix holds {count} objects that are not a vdrep store; use an empty prefix"
    )]
    ForeignPrefix { url: String, count: usize },
}

impl BucketError {
    pub fn kind(&self) -> BucketErrorKind {
        match self {
            BucketError::Object(e) => BucketErrorKind::Object(e.kind()),
            BucketError::Envelope(e) => BucketErrorKind::Envelope(e.kind()),
            BucketError::ForeignPrefix { .. } => BucketErrorKind::ForeignPrefix,
        }
    }

    /// True if trying again later can succeed without anyone changing the
    /// configuration (unreachable endpoint, 5xx); the rest is Critical.
    pub fn retryable(&self) -> bool {
        matches!(self, BucketError::Object(e) if e.retryable())
    }
}

/// One prefix of one bucket, every object sealed with one key.
pub struct SealedBucket {
    client: Arc<dyn ObjectClient>,
    key: EncryptionKey,
    url: StoreUrl,
}

impl SealedBucket {
    /// Check the store and the prefix (see the module documentation); an
    /// empty prefix gets the marker. Nothing else is written, and nothing
    /// at all on failure.
    pub fn open(
        client: Arc<dyn ObjectClient>,
        url: StoreUrl,
        key: EncryptionKey,
    ) -> Result<SealedBucket, BucketError> {
        let b = SealedBucket { client, key, url };
        let marker = b.url.key(MARKER);
        match get_all(&*b.client, &marker) {
            Ok(sealed) => {
                b.key.open(&marker, &sealed)?;
            }
            Err(e) if e.kind() == ObjectErrorKind::NotFound => {
                let count = b.client.list(&b.prefix_slash())?.len();
                if count > 0 {
                    return Err(BucketError::ForeignPrefix {
                        url: b.url.to_string(),
                        count,
                    });
                }
                let sealed = b.key.seal(&marker, MARKER_BODY)?;
                b.client.put(&marker, &sealed, PutMode::Create)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(b)
    }

    fn prefix_slash(&self) -> String {
        if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        }
    }

    /// The store's URL.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// The raw client (listing, deleting: names are not secret).
    pub fn client(&self) -> &dyn ObjectClient {
        &*self.client
    }

    /// Seal and store `plain` as `name` (relative to the prefix).
    pub fn put(&self, name: &str, plain: &[u8]) -> Result<(), BucketError> {
        let key = self.url.key(name);
        let sealed = self.key.seal(&key, plain)?;
        self.client.put(&key, &sealed, PutMode::Overwrite)?;
        Ok(())
    }

    /// Fetch and open `name`; refused (typed, naming the object) if it was
    /// sealed with another key, altered, or moved from another name.
    pub fn get(&self, name: &str) -> Result<Vec<u8>, BucketError> {
        let key = self.url.key(name);
        let sealed = get_all(&*self.client, &key)?;
        Ok(self.key.open(&key, &sealed)?)
    }

    /// The names (relative to the prefix) under `dir` (relative), sorted.
    pub fn list(&self, dir: &str) -> Result<Vec<String>, BucketError> {
        let prefix = self.prefix_slash();
        Ok(self
            .client
            .list(&format!("{prefix}{dir}"))?
            .into_iter()
            .filter_map(|m| m.key.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Delete `name` (relative).
    pub fn delete(&self, name: &str) -> Result<(), BucketError> {
        Ok(self.client.delete(&self.url.key(name))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::MemClient;

    fn url() -> StoreUrl {
        StoreUrl::parse("s3://bkt/a/b").unwrap().unwrap()
    }

    #[test]
    fn marker_key_and_foreign_prefixes() {
        let mem = Arc::new(MemClient::new());
        let b =
            SealedBucket::open(mem.clone(), url(), EncryptionKey::from_bytes(&[1; 32])).unwrap();
        b.put("x/1", b"hello").unwrap();
        assert_eq!(b.get("x/1").unwrap(), b"hello");
        assert_eq!(b.list("x/").unwrap(), ["x/1"]);
        // Reopen with the same key: fine; another key: refused, nothing written.
        SealedBucket::open(mem.clone(), url(), EncryptionKey::from_bytes(&[1; 32])).unwrap();
        let before = mem.snapshot();
        let e = SealedBucket::open(mem.clone(), url(), EncryptionKey::from_bytes(&[2; 32]))
            .err()
            .unwrap();
        assert_eq!(
            e.kind(),
            BucketErrorKind::Envelope(EnvelopeErrorKind::WrongKey)
        );
        assert!(!e.retryable());
        assert_eq!(mem.snapshot(), before);
        // A prefix holding other things: refused.
        mem.put("c/other", b"1", PutMode::Overwrite).unwrap();
        let u = StoreUrl::parse("s3://bkt/c").unwrap().unwrap();
        let e = SealedBucket::open(mem.clone(), u, EncryptionKey::from_bytes(&[1; 32]))
            .err()
            .unwrap();
        assert_eq!(e.kind(), BucketErrorKind::ForeignPrefix);
        // A swapped object is refused with its name.
        let sealed = mem
            .snapshot()
            .into_iter()
            .find(|(k, _)| k == "a/b/x/1")
            .unwrap()
            .1;
        mem.put("a/b/x/2", &sealed, PutMode::Overwrite).unwrap();
        let e = b.get("x/2").unwrap_err();
        assert_eq!(
            e.kind(),
            BucketErrorKind::Envelope(EnvelopeErrorKind::Tampered)
        );
        assert!(e.to_string().contains("a/b/x/2"));
    }
}
