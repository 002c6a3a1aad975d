//! Errors of the replica store, with [`StoreError::retryable`].

use crate::hrl::HrlError;
use std::path::{Path, PathBuf};

/// Where an error happened: site / vm / disk, for messages (boxed to keep
/// errors small).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ctx(Box<[String; 3]>);

impl Ctx {
    /// `disk` is the disk's id (32 hex digits); empty parts are left out.
    pub fn new(site: &str, vm: &str, disk: &str) -> Ctx {
        Ctx(Box::new([
            site.to_string(),
            vm.to_string(),
            disk.to_string(),
        ]))
    }
    pub fn site(&self) -> &str {
        &self.0[0]
    }
    pub fn vm(&self) -> &str {
        &self.0[1]
    }
    pub fn disk(&self) -> &str {
        &self.0[2]
    }
}

impl std::fmt::Display for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "site {:?}", self.site())?;
        if !self.vm().is_empty() {
            write!(f, " vm {:?}", self.vm())?;
        }
        if !self.disk().is_empty() {
            write!(f, " disk {}", self.disk())?;
        }
        Ok(())
    }
}

/// Everything the store can refuse or fail with. Every message names the
/// site / vm / disk (and cycle where one applies) and says what to do.
///
/// [`StoreError::retryable`] tells the caller (the receiver server, which
/// passes it on to the sender) whether sending the same thing again later can
/// succeed: resource shortages are retryable, refusals are not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name sent by a peer is not a plain, safe file name.
    #[error("refused {kind} name {name:?}: {why}; names must be plain file names (1..=255 bytes, no '/', '\\', NUL, control characters, not '.' or '..', no leading dot)")]
    InvalidName {
        kind: &'static str,
        name: String,
        why: &'static str,
    },
    /// A path would leave the site's namespace (symlink or similar found in
    /// the store): nothing was written.
    #[error("{ctx}: {path} is not inside the site's namespace (a symlink or foreign file is in the way): refused; remove it from the store")]
    Escape { ctx: Ctx, path: PathBuf },
    /// The receiver's file system is full (ENOSPC / EDQUOT).
    #[error("{ctx}: receiver disk full while {doing} ({path}): free space in {store}; the sender retries, nothing was lost")]
    NoSpace {
        ctx: Ctx,
        doing: String,
        path: PathBuf,
        store: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The process reached its open-files limit (EMFILE) or the system
    /// its file table (ENFILE). Retryable: closing files (a test
    /// failover's view, a point read) frees them.
    #[error("{ctx}: out of open files while {doing} ({path}): {source}; raise the receiver's open-files limit (LimitNOFILE= in its systemd unit, `ulimit -n` when started by hand; each point read or exposed by a test failover keeps undo records open, about {} per disk for a point far back) or end test failovers; the sender retries", crate::replica::READER_CHUNK)]
    OpenFiles {
        ctx: Ctx,
        doing: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Any other I/O error. `retryable` for transient ones (ENOMEM, EIO,
    /// EAGAIN, EINTR, ETIMEDOUT).
    #[error("{ctx}: I/O error while {doing} ({path}): {source}{}", if *retryable { "; the sender retries" } else { "; check the receiver's store, then restart the receiver" })]
    Io {
        ctx: Ctx,
        doing: String,
        path: PathBuf,
        retryable: bool,
        #[source]
        source: std::io::Error,
    },
    /// A log does not chain onto the replica (and is not a resend).
    #[error("{ctx}: replica in an invalid state for log cycle {cycle} (base cycle {base_cycle}): the replica is at cycle {replica_cycle}{}; {what}", applying.map(|a| format!(" (applying {a})")).unwrap_or_default())]
    OutOfOrder {
        ctx: Ctx,
        cycle: u64,
        base_cycle: u64,
        replica_cycle: u64,
        applying: Option<u64>,
        what: String,
    },
    /// The replica cannot be trusted until a checksum resync heals it (set
    /// by an adoption after failover, a damaged or out-of-order log, or by
    /// hand): only the resync's own log is accepted.
    #[error("{ctx}: the replica needs a resync ({why}); only the log announced by a completed checksum compare is accepted")]
    NeedsResync { ctx: Ctx, why: String },
    /// The data is for another disk, or the disk's registration differs.
    #[error("{ctx}: identity mismatch: {what}")]
    IdentityMismatch { ctx: Ctx, what: String },
    /// The received log is damaged or not sealed.
    #[error("{ctx}: received log for cycle {cycle} is damaged: {source}; the sender must resend it (or resync the disk if its copy is damaged too)")]
    CorruptLog {
        ctx: Ctx,
        cycle: u64,
        #[source]
        source: HrlError,
    },
    /// The disk is not in a state for this operation (unknown, initial copy
    /// not finished, …).
    #[error("{ctx}: {what}")]
    NotReady { ctx: Ctx, what: String },
    /// The asked recovery point does not exist (never committed or pruned).
    #[error("{ctx}: no recovery point at cycle {cycle}: {what}")]
    NoSuchPoint { ctx: Ctx, cycle: u64, what: String },
    /// A state file of the store cannot be understood.
    #[error("{path}: unreadable store state: {what}; the disk needs a resync (move the file away and restart initial replication)")]
    BadState { path: PathBuf, what: String },
    /// Another process holds the store.
    #[error("{path}: the store is in use by another vdrep process (pid in the lock file); stop it or use another --store")]
    Locked { path: PathBuf },
    /// The VM is in use in a way the operation must not undo (it runs here
    /// after a failover, a test failover exposes it): refused, nothing
    /// changed.
    #[error("{ctx}: refused: {what}")]
    InUse { ctx: Ctx, what: String },
    /// The operation must wait for something else on the disk to end.
    #[error("{ctx}: busy: {what}")]
    Busy { ctx: Ctx, what: String },
    /// A newer writer (another receiver or sender, a newer generation)
    /// took over this VM in a shared store: this one is refused and
    /// acknowledges nothing more.
    #[error("{ctx}: fenced: {what}")]
    Fenced { ctx: Ctx, what: String },
    /// The object store behind the replica refused access, or lost the
    /// bucket, after the store was opened (credentials revoked or rotated,
    /// rights removed, bucket deleted). Someone can fix that without
    /// touching vdrep, so it is retryable; the failed call committed
    /// nothing (objects are written under new names, the point's manifest
    /// last).
    #[error("{ctx}: {doing}: the object store {} ({why}); restore the key's rights on the bucket (or the bucket itself), or give working --s3-credentials: retried with back-off, nothing is committed meanwhile", if *bucket_gone { "no longer has the bucket" } else { "denied access" })]
    Access {
        ctx: Ctx,
        doing: String,
        /// The bucket is gone (else: access denied).
        bucket_gone: bool,
        why: String,
    },
    /// A failure injected by [`FailStore`](super::FailStore) (tests only):
    /// retryable unless the wrapper crashed (then the store must be reopened).
    #[error("injected failure in {op}{}", if *crashed { " (the store crashed: reopen it)" } else { "" })]
    Injected { op: &'static str, crashed: bool },
}

impl StoreError {
    /// True if the same request can succeed later without anyone changing
    /// the data (disk full, out of memory, transient I/O error).
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::OpenFiles { .. } => true,
            StoreError::Io { retryable, .. } => *retryable,
            StoreError::Locked { .. } | StoreError::Busy { .. } => true,
            StoreError::Access { .. } => true,
            StoreError::NeedsResync { .. } => true,
            // Sent again, the log replaces the damaged copy (`store_log`).
            StoreError::CorruptLog { .. } => true,
            StoreError::Injected { crashed, .. } => !*crashed,
            _ => false,
        }
    }
}

/// Classify an I/O error. `store` is the store root (named in disk-full
/// messages).
pub(crate) fn io_err(
    ctx: &Ctx,
    store: &Path,
    doing: &str,
    path: &Path,
    source: std::io::Error,
) -> StoreError {
    let errno = source.raw_os_error();
    if matches!(errno, Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || source.kind() == std::io::ErrorKind::StorageFull
        || source.kind() == std::io::ErrorKind::QuotaExceeded
    {
        return StoreError::NoSpace {
            ctx: ctx.clone(),
            doing: doing.to_string(),
            path: path.to_path_buf(),
            store: store.to_path_buf(),
            source,
        };
    }
    if matches!(errno, Some(libc::EMFILE) | Some(libc::ENFILE)) {
        return StoreError::OpenFiles {
            ctx: ctx.clone(),
            doing: doing.to_string(),
            path: path.to_path_buf(),
            source,
        };
    }
    let retryable = matches!(
        errno,
        Some(libc::ENOMEM)
            | Some(libc::EIO)
            | Some(libc::EAGAIN)
            | Some(libc::EINTR)
            | Some(libc::ETIMEDOUT)
    ) || matches!(
        source.kind(),
        std::io::ErrorKind::OutOfMemory | std::io::ErrorKind::Interrupted
    );
    StoreError::Io {
        ctx: ctx.clone(),
        doing: doing.to_string(),
        path: path.to_path_buf(),
        retryable,
        source,
    }
}

/// Map an error of the hrl module: I/O errors are classified like any I/O
/// error; anything else means the log is bad.
pub(crate) fn hrl_err(ctx: &Ctx, store: &Path, doing: &str, cycle: u64, e: HrlError) -> StoreError {
    match e {
        HrlError::Io { path, source } => io_err(ctx, store, doing, &path, source),
        other => StoreError::CorruptLog {
            ctx: ctx.clone(),
            cycle,
            source: other,
        },
    }
}
