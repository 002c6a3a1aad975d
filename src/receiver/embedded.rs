//! A receiver inside the sender's process, for direct protection to an
//! object store (`vdrep protect --to s3://…`, no receiver host).
//!
//! [`Embedded::start`] serves the same connection driver as `vdrep receive`
//! ([`super::handle_conn`]: the same session, store actions, copy fences
//! and error answers) on a loopback port that only this process's site
//! may use: a fresh certificate made in memory on each start, trusting
//! only the sender's own. Its store is the object store
//! ([`crate::objstore::replica::BucketStore`]), recovered first; retention
//! runs here as it does in `vdrep receive`. So lifecycle, points, retention,
//! resync and verify go through the code a receiver on a bucket runs, and
//! the sender holds the bucket's writer fence: a second process writing the
//! same VM claims a newer generation, and this one's next write is refused
//! (`StoreError::Fenced`, not retryable: the VM goes Critical).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use super::{serve, ReceiverError};
use crate::replica::{self, ReplicaStore};
use crate::transport::{self, keys::Identity, trust::TrustStore};

/// A running embedded receiver: where to connect, whom to trust.
pub struct Embedded {
    /// The loopback address it listens on.
    pub addr: SocketAddr,
    /// Its certificate (the only one the sender needs to trust).
    pub cert: CertificateDer<'static>,
    endpoint: quinn::Endpoint,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Embedded {
    /// Recover `store`, then serve it on `127.0.0.1` to `sender` only.
    /// It keeps no state of its own: no folder, and site-to-site
    /// administrative requests are refused (a directory store would have
    /// to live outside the mount: the daemon's private paths go through
    /// its pre-mount descriptor, which a directory store's canonical paths
    /// leave, so its files would be open through the daemon's own mount,
    /// and a killed worker then hangs in `fuse_flush` at exit). `spool` (the
    /// store's local folder) names it in errors. Must be called inside a
    /// tokio runtime, on a thread that may block (the recovery reads the
    /// bucket).
    pub fn start(
        store: Arc<dyn ReplicaStore>,
        spool: &Path,
        sender: &Identity,
        retention: Option<(replica::RetentionPolicy, std::time::Duration)>,
    ) -> Result<Embedded, ReceiverError> {
        let r = store.recover().map_err(|source| ReceiverError::Store {
            path: spool.to_path_buf(),
            source,
        })?;
        tracing::info!("embedded receiver: object store recovered: {r:?}");
        let id = Identity::generate("vdrep-direct")?;
        let mut trust = TrustStore::new();
        trust.add(sender.cert.clone());
        let ep = transport::server_tuned(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &id,
            &trust,
            &transport::Tuning::default(),
        )?;
        let addr = ep.local_addr().map_err(|source| ReceiverError::Start {
            what: "embedded receiver endpoint",
            source,
        })?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some((keep, every)) = retention {
            super::spawn_retention(
                "vdrep-direct-prune",
                store.clone(),
                keep,
                every,
                stop.clone(),
            )?;
        }
        tokio::spawn(serve(ep.clone(), store, id.name.clone(), None, None));
        tracing::info!("embedded receiver for the object store on {addr}");
        Ok(Embedded {
            addr,
            cert: id.cert.clone(),
            endpoint: ep,
            stop,
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.endpoint
            .close(0u32.into(), b"embedded receiver stopped");
    }
}

impl crate::sender::DirectReceiver for Embedded {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }
}

/// The [`crate::sender::DirectFactory`] the mount daemon hands its
/// replicator: an [`Embedded`] receiver per object store.
pub fn factory() -> Arc<crate::sender::DirectFactory> {
    Arc::new(|store, spool, sender, retention| {
        let e = Embedded::start(store, spool, sender, Some(retention))?;
        Ok(Box::new(e) as Box<dyn crate::sender::DirectReceiver>)
    })
}
