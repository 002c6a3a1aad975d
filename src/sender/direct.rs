//! Direct protection to an object store (`vdrep protect --to s3://…`, like
//! Hyper-V → Azure: no receiver host).
//!
//! The VM's worker runs exactly as towards a receiver: its session talks to
//! an [embedded receiver](crate::receiver::embedded) in this process, on
//! loopback, whose store is the bucket
//! ([`BucketStore`](crate::objstore::replica::BucketStore)). One embedded
//! receiver serves every VM of this mount that goes to the same store
//! (URL and endpoint); it starts on the first `protect` (or the first
//! session after a restart) and holds the bucket's writer fence for them.
//! Opening checks the endpoint, credentials, bucket and prefix before
//! anything is written; what cannot be retried (denied, no such bucket, a
//! prefix of another key) is [`ErrorKind::Fatal`](super::ErrorKind): the VM
//! goes Critical, and `protect` is refused with the reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ProtectSpec, Replicator, SendError};
use crate::objstore::{replica::BucketStore, StoreUrl};
use crate::replica::{ReplicaStore, RetentionPolicy};
use crate::transport::keys::Identity;

/// A receiver serving one object store inside this process, on loopback:
/// where the VM's session connects and the certificate to trust. Dropped:
/// it stops.
pub trait DirectReceiver: Send + Sync {
    /// Its loopback address.
    fn addr(&self) -> std::net::SocketAddr;
    /// Its certificate (the only one the session trusts).
    fn cert(&self) -> rustls::pki_types::CertificateDer<'static>;
}

/// Starts a [`DirectReceiver`] over a recovered-on-start store, trusting
/// only `sender`, keeping `retention` (applied every `Duration`); `spool`
/// is the store's local folder, for error messages. The mount daemon hands
/// one to the [`Replicator`] (the sender never names the receiver); it is
/// called on a thread that may block, inside the replication runtime.
pub type DirectFactory = dyn Fn(
        Arc<dyn ReplicaStore>,
        &std::path::Path,
        &Identity,
        (RetentionPolicy, Duration),
    ) -> Result<Box<dyn DirectReceiver>, Box<dyn std::error::Error + Send + Sync>>
    + Send
    + Sync;

/// How often the embedded receiver applies [`retention`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The points kept in a bucket written directly: `vdrep receive`'s
/// defaults (every point for 2 h, then one per hour, for 72 h).
fn retention() -> RetentionPolicy {
    let h = |n: u64| Some(Duration::from_secs(n * 3600));
    RetentionPolicy {
        keep_last: None,
        max_age: h(72),
        thin_after: h(2),
        thin_every: h(1),
    }
}

/// The object store `spec` names, if its `to` is an `s3://` URL.
pub(super) fn url_of(spec: &ProtectSpec) -> Result<Option<StoreUrl>, SendError> {
    StoreUrl::parse(&spec.to).map_err(|e| SendError::invalid(format!("--to: {e}")))
}

/// A failure to open the store: retried if it may heal by itself, else
/// Critical.
fn open_err(e: impl std::fmt::Display, retryable: bool) -> SendError {
    if retryable {
        SendError::retry(e)
    } else {
        SendError::fatal(e.to_string())
    }
}

impl Replicator {
    /// The embedded receiver of `spec`'s object store, started on first
    /// use (blocking: it opens and recovers the bucket); `None` if `spec`
    /// replicates to a receiver.
    pub(super) fn direct(
        &self,
        spec: &ProtectSpec,
    ) -> Result<Option<Arc<dyn DirectReceiver>>, SendError> {
        let Some(url) = url_of(spec)? else {
            return Ok(None);
        };
        let target = spec.s3.as_ref().ok_or_else(|| {
            SendError::invalid(format!(
                "--to {url} needs --s3-endpoint URL and --encryption-key FILE (and --s3-credentials FILE, or the AWS_* variables)"
            ))
        })?;
        let key = format!("{url} {target:?}");
        // The map's lock is held only to find the store's slot; the slot's
        // lock serialises the openers of that one store (two embedded
        // receivers of one store would fence each other), never the others
        // nor the map, and is taken on a thread that may block.
        let slot = self.direct.lock().entry(key).or_default().clone();
        let mut slot = slot.lock();
        if let Some(e) = slot.as_ref() {
            return Ok(Some(e.clone()));
        }
        let id = self
            .identity
            .as_ref()
            .ok_or_else(|| SendError::fatal("no identity (mount with --keys)"))?;
        let bucket = target.open(&url).map_err(|e| open_err(&e, e.retryable()))?;
        let spool = self.direct_cache(&url).join("spool");
        let store = BucketStore::open(Arc::new(bucket), &spool)
            .map_err(|e| open_err(format!("{url}: {e}"), e.retryable()))?;
        let start = self.direct_factory.as_ref().ok_or_else(|| {
            SendError::fatal(format!(
                "{url}: this process cannot replicate to an object store directly (no in-process receiver)"
            ))
        })?;
        let _rt = self.rt.enter();
        let e: Arc<dyn DirectReceiver> =
            start(Arc::new(store), &spool, id, (retention(), PRUNE_EVERY))
                .map_err(|e| SendError::fatal(format!("{url}: {e}")))?
                .into();
        *slot = Some(e.clone());
        Ok(Some(e))
    }

    /// The local folder of a directly written store (logs being uploaded;
    /// no replica state).
    fn direct_cache(&self, url: &StoreUrl) -> PathBuf {
        let mut p = self.tracker.state_file("direct").join(&url.bucket);
        if !url.prefix.is_empty() {
            p.push(&url.prefix);
        }
        p
    }
}
