//! The sender's error type and the kinds its decisions are made on.
//!
//! Every failure of a protected VM's replication, and of a request about it
//! (`protect`, `sync`, `resync`, `verify`), is a [`SendError`]. Its
//! [`ErrorKind`] is what callers match on: the worker retries with back-off,
//! starts over at once after marking a disk for resync, or stops in
//! `Critical`. The kind is decided where the failure is known in typed form
//! (a wire [`ErrorCode`], a TLS alert, a tracking
//! [`CutErrorKind`](crate::tracking::CutErrorKind)); the message is for
//! people only.

use std::net::SocketAddr;

use crate::transport::{self, HandshakeFailure};
use crate::wire;

/// What a [`SendError`] means for whoever handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Recoverable (network, receiver disk full or busy): retry after the
    /// back-off.
    Retry,
    /// A disk was just marked for a checksum resync: start a new session
    /// at once (it resyncs the disk).
    ResyncRequired,
    /// Unrecoverable (certificate refused, invalid replica state, a disk
    /// gone): the VM goes `Critical` until it is protected again.
    Fatal,
    /// The request is wrong (a bad name or option, an unknown disk, no
    /// identity): nothing was started.
    Invalid,
    /// The VM is not protected here, is `Critical`, or its replication
    /// stopped before answering.
    Unavailable,
    /// The wait for an answer timed out (the work may go on).
    TimedOut,
}

/// A failure of the sender, with its [`ErrorKind`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    kind: ErrorKind,
    message: String,
}

impl SendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SendError {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn retry(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Retry, message.to_string())
    }

    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// The same failure with `context` in front of its message.
    pub(crate) fn context(self, context: impl std::fmt::Display) -> Self {
        Self::new(self.kind, format!("{context}: {}", self.message))
    }
}

/// A connection failure: refused certificates are fatal, anything else
/// (timeouts, resets, other TLS failures) is retried.
pub(crate) fn conn_err(e: &quinn::ConnectionError, addr: SocketAddr) -> SendError {
    let msg = transport::explain_connection_error(e, addr);
    match transport::handshake_failure(e) {
        Some((_, HandshakeFailure::Trust)) => {
            SendError::fatal(format!("authentication failed: {msg}"))
        }
        _ => SendError::retry(msg),
    }
}

/// A failure to set up or open a connection.
pub(crate) fn transport_err(e: &transport::TransportError, addr: SocketAddr) -> SendError {
    match e {
        transport::TransportError::Connection { source, .. } => conn_err(source, addr),
        other => SendError::retry(other),
    }
}

/// A stream error: the connection's failure if it died, else a channel
/// error (retried) or a protocol error (fatal).
pub(crate) fn stream_err(e: &wire::WireError, addr: SocketAddr) -> SendError {
    match e.connection_error() {
        Some(c) => conn_err(c, addr),
        None if e.is_transport() => SendError::retry(e),
        None => SendError::fatal(e.to_string()),
    }
}

/// The receiver answered with an `Error` message: retried if it says so.
/// (Where a resync verdict changes what to do, the caller matches
/// [`ErrorCode::ResyncRequired`] first.)
pub(crate) fn msg_err(e: &wire::ErrorMsg) -> SendError {
    let m = format!("receiver: {} ({:?})", e.message, e.code);
    if e.retryable {
        SendError::retry(m)
    } else {
        SendError::fatal(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorCode;

    #[test]
    fn receiver_errors_follow_their_retryable_flag() {
        let m = |code, retryable| wire::ErrorMsg::new(code, retryable, "whatever the text says");
        assert_eq!(
            msg_err(&m(ErrorCode::NoSpace, true)).kind(),
            ErrorKind::Retry
        );
        assert_eq!(
            msg_err(&m(ErrorCode::InvalidName, false)).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            msg_err(&m(ErrorCode::ResyncRequired, true)).kind(),
            ErrorKind::Retry
        );
    }

    #[test]
    fn the_resync_code_round_trips_on_the_wire() {
        let c = ErrorCode::ResyncRequired;
        assert_eq!(ErrorCode::from_code(c.code()), c);
        assert_ne!(c.code(), ErrorCode::InvalidState.code());
    }

    #[test]
    fn refused_certificates_are_fatal_other_connection_failures_retried() {
        use rustls::AlertDescription as A;
        let addr: SocketAddr = "192.0.2.1:7700".parse().unwrap();
        let closed = |alert: A| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(u8::from(alert)),
                frame_type: None,
                reason: b"x".to_vec().into(),
            })
        };
        assert_eq!(
            conn_err(&closed(A::HandshakeFailure), addr).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            conn_err(&closed(A::BadCertificate), addr).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            conn_err(&closed(A::NoApplicationProtocol), addr).kind(),
            ErrorKind::Retry
        );
        assert_eq!(
            conn_err(&quinn::ConnectionError::TimedOut, addr).kind(),
            ErrorKind::Retry
        );
    }
}
