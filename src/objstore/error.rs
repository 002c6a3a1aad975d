//! Errors of the object clients, with [`ObjectError::kind`] and
//! [`ObjectError::retryable`].

/// What kind of failure an [`ObjectError`] is (callers match on this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectErrorKind {
    /// The object does not exist.
    NotFound,
    /// A condition (`If-Match`, `If-None-Match`) was not met.
    PreconditionFailed,
    /// The endpoint cannot be reached (connection refused, DNS, timeout).
    Unreachable,
    /// The store refused the credentials or the access.
    Denied,
    /// The bucket does not exist.
    NoSuchBucket,
    /// Any other HTTP error status.
    Http,
    /// The store's answer cannot be understood.
    BadResponse,
    /// The endpoint, URL or credentials given are unusable.
    Config,
    /// A failure injected by [`FailClient`](super::FailClient) (tests).
    Injected,
}

/// A failed object-store operation. Messages name the operation and key.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{op} {key:?}: no such object")]
    NotFound { op: &'static str, key: String },
    #[error("{op} {key:?}: precondition failed (the object is not the expected version)")]
    PreconditionFailed { op: &'static str, key: String },
    #[error("{op} {key:?}: cannot reach the object store at {endpoint}: {why}; check --s3-endpoint and the network (retried)")]
    Unreachable {
        op: &'static str,
        key: String,
        endpoint: String,
        why: String,
    },
    #[error("{op} {key:?}: the object store denied access ({code}: {message}); check --s3-credentials (access key, secret, region) and the key's rights on the bucket")]
    Denied {
        op: &'static str,
        key: String,
        code: String,
        message: String,
    },
    #[error("bucket {bucket:?} does not exist at {endpoint}; create it, or fix the s3://BUCKET/PREFIX URL")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("{op} {key:?}: the object store answered HTTP {status} ({code}: {message})")]
    Http {
        op: &'static str,
        key: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{op} {key:?}: unexpected answer from the object store: {why}")]
    BadResponse {
        op: &'static str,
        key: String,
        why: String,
    },
    #[error("object store configuration: {what}")]
    Config { what: String },
    #[error("injected failure in {op} {key:?}")]
    Injected { op: &'static str, key: String },
}

impl ObjectError {
    pub fn kind(&self) -> ObjectErrorKind {
        match self {
            ObjectError::NotFound { .. } => ObjectErrorKind::NotFound,
            ObjectError::PreconditionFailed { .. } => ObjectErrorKind::PreconditionFailed,
            ObjectError::Unreachable { .. } => ObjectErrorKind::Unreachable,
            ObjectError::Denied { .. } => ObjectErrorKind::Denied,
            ObjectError::NoSuchBucket { .. } => ObjectErrorKind::NoSuchBucket,
            ObjectError::Http { .. } => ObjectErrorKind::Http,
            ObjectError::BadResponse { .. } => ObjectErrorKind::BadResponse,
            ObjectError::Config { .. } => ObjectErrorKind::Config,
            ObjectError::Injected { .. } => ObjectErrorKind::Injected,
        }
    }

    /// True if the same call can succeed later unchanged (unreachable
    /// endpoint, 5xx, 429, injected).
    pub fn retryable(&self) -> bool {
        match self {
            ObjectError::Unreachable { .. } | ObjectError::Injected { .. } => true,
            ObjectError::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
