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
use crate::wire::session::{ErrorKind as SessionKind, SessionError};

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
    /// The receiver answered with a stateless reset: it is up again (it
    /// restarted, or forgot the connection), so a retry may go at once.
    peer_back: bool,
    /// The receiver refused the protocol version our `Hello` said (this
    /// one): it runs an older build ([`super::compat`]).
    refused_version: Option<u16>,
}

impl SendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SendError {
            kind,
            message: message.into(),
            peer_back: false,
            refused_version: None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The session ended with the receiver's stateless reset: the
    /// receiver answers again (see [`conn_err`]).
    pub fn peer_back(&self) -> bool {
        self.peer_back
    }

    /// The receiver refused our `Hello`'s protocol version (this one).
    pub fn refused_version(&self) -> Option<u16> {
        self.refused_version
    }

    /// The same failure, noted as a refusal of protocol `version`.
    pub(crate) fn with_refused_version(self, version: u16) -> Self {
        Self {
            refused_version: Some(version),
            ..self
        }
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
        Self {
            message: format!("{context}: {}", self.message),
            ..self
        }
    }
}

/// A connection failure: refused certificates are fatal, anything else
/// (timeouts, resets, other TLS failures) is retried. A stateless reset
/// comes from a receiver that is up (a restarted one answers the old
/// connection so): [`SendError::peer_back`].
pub(crate) fn conn_err(e: &quinn::ConnectionError, addr: SocketAddr) -> SendError {
    let msg = transport::explain_connection_error(e, addr);
    match transport::handshake_failure(e) {
        Some((_, HandshakeFailure::Trust)) => {
            SendError::fatal(format!("authentication failed: {msg}"))
        }
        _ => SendError {
            peer_back: matches!(e, quinn::ConnectionError::Reset),
            ..SendError::retry(msg)
        },
    }
}

/// A failure to set up or open a connection.
pub(crate) fn transport_err(e: &transport::TransportError, addr: SocketAddr) -> SendError {
    match e {
        transport::TransportError::Connection { source, .. } => conn_err(source, addr),
        other => SendError::retry(other),
    }
}

/// The receiver refused our `Hello`'s protocol version (its code, not
/// its text, says so).
pub(crate) fn refuses_version(e: &SessionError) -> bool {
    matches!(
        e,
        SessionError::Peer {
            code: crate::wire::ErrorCode::Version,
            ..
        }
    )
}

/// A failure of the replication session ([`SessionError`], decided on its
/// kind): the receiver's refusals follow their retryable flag (where a
/// resync verdict changes what to do, the caller matches
/// [`ErrorCode::ResyncRequired`](crate::wire::ErrorCode::ResyncRequired) first);
/// a broken or incompatible peer is fatal; a lost channel, data damaged in
/// transit or our own data unreadable is retried.
pub(crate) fn session_err(e: &SessionError) -> SendError {
    match e.kind() {
        SessionKind::Refused { retryable } | SessionKind::Store { retryable } => {
            let m = match e {
                SessionError::Peer { code, message, .. }
                | SessionError::Store { code, message, .. } => {
                    format!("receiver: {message} ({code:?})")
                }
                other => other.to_string(),
            };
            if retryable {
                SendError::retry(m)
            } else {
                SendError::fatal(m)
            }
        }
        SessionKind::Protocol => SendError::fatal(e.to_string()),
        SessionKind::Transport
        | SessionKind::Corrupt
        | SessionKind::Source
        | SessionKind::Misuse => SendError::retry(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorCode;

    #[test]
    fn only_a_stateless_reset_says_the_receiver_is_back() {
        let addr: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let reset = conn_err(&quinn::ConnectionError::Reset, addr);
        assert_eq!(reset.kind(), ErrorKind::Retry);
        assert!(reset.peer_back());
        assert!(reset.context("recovery point 4").peer_back());
        assert!(!conn_err(&quinn::ConnectionError::TimedOut, addr).peer_back());
        assert!(!SendError::retry("x").peer_back());
    }

    #[test]
    fn receiver_errors_follow_their_retryable_flag() {
        let m = |code, retryable| SessionError::Peer {
            code,
            retryable,
            message: "whatever the text says".into(),
        };
        assert_eq!(
            session_err(&m(ErrorCode::NoSpace, true)).kind(),
            ErrorKind::Retry
        );
        assert_eq!(
            session_err(&m(ErrorCode::InvalidName, false)).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            session_err(&m(ErrorCode::ResyncRequired, true)).kind(),
            ErrorKind::Retry
        );
        let store = SessionError::Store {
            code: ErrorCode::Internal,
            retryable: false,
            message: "x".into(),
        };
        assert_eq!(session_err(&store).kind(), ErrorKind::Fatal);
    }

    #[test]
    fn broken_peers_are_fatal_lost_channels_and_unreadable_data_retried() {
        let sid = crate::wire::session::StreamId(3);
        let fatal = [
            SessionError::Version { ours: 1, theirs: 2 },
            SessionError::Unexpected {
                stream: sid,
                expected: "Ack",
                got: "HelloOk",
            },
        ];
        for e in fatal {
            assert_eq!(session_err(&e).kind(), ErrorKind::Fatal, "{e}");
        }
        let retried = [
            SessionError::ConnectionLost,
            SessionError::Ended(sid),
            SessionError::Timeout { waited_ms: 1 },
            SessionError::Source("disk read".into()),
        ];
        for e in retried {
            assert_eq!(session_err(&e).kind(), ErrorKind::Retry, "{e}");
        }
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
