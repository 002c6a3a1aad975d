//! The replication conversation as sans-IO state machines, one per end.
//!
//! Owns the *order* of the messages of [`crate::wire`] ("The conversation"
//! in the parent module): hello, disk open and state, initial copy, one
//! stream per log, acknowledgements, point commits and the checksum (resync)
//! exchange. [`Sender`] is the primary's end, [`Receiver`] the secondary's.
//! Neither touches a socket, a clock, a file or a thread, and neither is
//! async: bytes and time go in, bytes and [actions](SenderAction) come out.
//! Neither keeps hash-ordered state (their maps are `BTreeMap`s): the same
//! inputs give the same outputs in the same order, so a seed of the
//! simulation replays exactly.
//! This is quinn-proto's model, and what lets `tests/session_sim.rs` run
//! both ends against a simulated network in one thread, and
//! `fuzz/fuzz_targets/session.rs` feed them arbitrary bytes.
//!
//! Inputs of both ends:
//! - [`Event`]s from the connection: bytes received on a stream, the peer
//!   finished or reset a stream, the connection was lost, or only the time
//!   moved on. Every input carries `now` (nanoseconds of any monotonic
//!   clock the driver chooses).
//! - Completions of actions the driver performed ([`Receiver::complete`],
//!   [`Sender::complete_read`]).
//! - On the sender, work: [`Sender::submit`] a log or an initial copy,
//!   [`Sender::start_compare`] a checksum compare.
//!
//! Outputs ([`Sender::poll`], [`Receiver::poll`]): [`Output`]s, either bytes
//! for a stream (a new stream id on the sender means "open a bidirectional
//! stream"), the end or reset of a stream, or an action: for the receiver's
//! store ([`ReceiverAction`]: stage a log, store it durably, apply it, commit
//! a point, digest blocks) and for the sender's tracking ([`SenderAction`]:
//! read a log or a disk, a log was applied so it may be deleted, a point
//! was committed).
//!
//! Invalid input (undecodable bytes, a message out of place, a log whose
//! offsets, length or checksum do not verify) is a typed [`SessionError`],
//! answered on the wire by an `Error` message; it never panics, and a log
//! that does not verify is discarded, never acknowledged.
//!
//! # Driving a session
//!
//! A driver is a thin loop that owns the sockets and the store; the quinn
//! drivers of `receiver/` and `sender/link.rs` run it like this:
//!
//! ```text
//! loop {
//!     // 1. Outputs first: they may open streams or ask for work.
//!     while let Some(o) = session.poll() {
//!         match o {
//!             Output::Send { stream, bytes } => streams.get_or_open(stream).write_all(&bytes),
//!             Output::Finish(stream)          => streams[stream].finish(),
//!             Output::Reset(stream)           => streams[stream].reset(0),
//!             Output::Close(error)            => { conn.close(..); return error }
//!             Output::Action(a)               => spawn_blocking(perform(a)), // store or tracking
//!         }
//!     }
//!     // 2. Then wait for whatever comes first, and feed it in.
//!     select! {
//!         (stream, bytes) = any_stream.read_chunk()  => session.handle(now(), Event::Data { stream, bytes: &bytes }),
//!         stream          = a stream ended           => session.handle(now(), Event::Finished(stream)),
//!         stream          = a stream was reset       => session.handle(now(), Event::Reset(stream)),
//!         _               = conn.closed()            => session.handle(now(), Event::ConnectionLost),
//!         (op, result)    = a performed action ended => session.complete(now(), op, result),
//!         _               = sleep_until(session.poll_timeout()) => session.handle(now(), Event::Tick),
//!     }
//! }
//! ```
//!
//! The driver maps its quinn streams to [`StreamId`]s: the sender names
//! the streams it opens; the receiver's driver gives every accepted stream
//! a fresh id. Store actions of one stream must be performed in the order
//! they are polled (the receiver's `StageLogData` follow their
//! `StageLog`); actions of different streams may run concurrently. A
//! receiver stream that waits for a completion does not decode further
//! bytes ([`Receiver::wants_data`] says when reading may pause). The store
//! must make `ApplyLog` conditional on the replica being at the log's base
//! cycle (a log of an older cycle is "already applied"): that, and the
//! receiver answering any log of a cycle it already applied with
//! `Ack { applied: true }` without touching the store, is how a resend after
//! a crash is applied at most once.

mod receiver;
mod sender;

pub use receiver::{DiskStatus, LogStored, Receiver, ReceiverAction, ReceiverConfig, StoreDone};
pub use sender::{
    Job, ReadData, ReadId, ReadWhat, Sender, SenderAction, SenderConfig, SourceError,
};

use super::{decode, encode, DiskId, ErrorCode, Msg};

/// A stream of the connection, named by the session (sender) or the driver
/// (receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// A store operation the receiver waits for (see [`Receiver::complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u64);

/// Something that happened to the connection.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Bytes arrived on a stream (any split of the peer's writes).
    Data { stream: StreamId, bytes: &'a [u8] },
    /// The peer finished its side of the stream (no more bytes).
    Finished(StreamId),
    /// The peer reset the stream (or it was stopped): bytes may be missing.
    Reset(StreamId),
    /// The connection is gone; the session is over.
    ConnectionLost,
    /// Only the time moved on (see `poll_timeout`).
    Tick,
}

/// What a session wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<A> {
    /// Write these bytes on the stream (the sender opens it on first use).
    Send { stream: StreamId, bytes: Vec<u8> },
    /// Finish our side of the stream.
    Finish(StreamId),
    /// Abandon the stream (reset our side, stop reading).
    Reset(StreamId),
    /// Close the connection: the session is over, with this error.
    Close(SessionError),
    /// Do something outside the protocol (store, tracking), or take note.
    Action(A),
    /// A read buffer of the job of `disk_id` at `cycle` whose bytes are
    /// framed: the driver may read that job's next piece into it (no new
    /// allocation, no zeroing). Its content is stale; a driver with no use
    /// for it drops it.
    Spent {
        disk_id: DiskId,
        cycle: u64,
        buf: Vec<u8>,
    },
}

/// A store failure, as the receiver's driver reports it: what to answer
/// the peer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    pub code: ErrorCode,
    pub retryable: bool,
    pub message: String,
}

/// What went wrong in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Bytes that do not decode as a frame of the protocol.
    #[error("stream {}: undecodable bytes: {detail}", .stream.0)]
    Decode { stream: StreamId, detail: String },
    /// A message that does not belong at this point of the conversation.
    #[error("stream {}: expected {expected}, the peer sent {got}", .stream.0)]
    Unexpected {
        stream: StreamId,
        expected: &'static str,
        got: &'static str,
    },
    /// A message broke a rule of the conversation (unknown disk, wrong
    /// offset, mismatched identity).
    #[error("stream {}: {what}", .stream.0)]
    Violation { stream: StreamId, what: String },
    /// A log or initial copy whose bytes do not verify (gap, overlap,
    /// length or checksum): discarded, never acknowledged.
    #[error("stream {}: the transfer does not verify: {what}", .stream.0)]
    Corrupt { stream: StreamId, what: String },
    /// The peer answered with an `Error` message.
    #[error("the peer refused: {message} (error {code:?})")]
    Peer {
        code: ErrorCode,
        retryable: bool,
        message: String,
    },
    /// The receiver's store failed.
    #[error("the store failed: {message} (error {code:?})")]
    Store {
        code: ErrorCode,
        retryable: bool,
        message: String,
    },
    /// The peers speak different protocol versions.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}")]
    Version { ours: u16, theirs: u16 },
    /// The stream ended (or was reset) before the conversation on it did.
    #[error("stream {} ended early", .0.0)]
    Ended(StreamId),
    /// The connection is gone.
    #[error("the connection was lost")]
    ConnectionLost,
    /// The peer did not answer in time.
    #[error("no answer from the peer for {waited_ms} ms")]
    Timeout { waited_ms: u64 },
    /// The sender's own data could not be read (a damaged log, a disk
    /// read error): reported by the driver.
    #[error("reading the data to send failed: {0}")]
    Source(String),
    /// The driver used the session wrongly (a bug in the driver).
    #[error("session misuse: {0}")]
    Misuse(String),
}

/// How to react to a [`SessionError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The channel failed: retry on a new connection.
    Transport,
    /// Data failed verification in transit: retry the transfer.
    Corrupt,
    /// The peer is broken or incompatible: do not retry blindly.
    Protocol,
    /// The peer refused; `retryable` says whether later may work.
    Refused { retryable: bool },
    /// The receiver's store failed; `retryable` as for `Refused`.
    Store { retryable: bool },
    /// Our own data could not be read.
    Source,
    /// A bug in the driver.
    Misuse,
}

impl SessionError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Decode { .. }
            | SessionError::Unexpected { .. }
            | SessionError::Violation { .. }
            | SessionError::Version { .. } => ErrorKind::Protocol,
            SessionError::Corrupt { .. } => ErrorKind::Corrupt,
            SessionError::Peer { retryable, .. } => ErrorKind::Refused {
                retryable: *retryable,
            },
            SessionError::Store { retryable, .. } => ErrorKind::Store {
                retryable: *retryable,
            },
            SessionError::Ended(_)
            | SessionError::ConnectionLost
            | SessionError::Timeout { .. } => ErrorKind::Transport,
            SessionError::Source(_) => ErrorKind::Source,
            SessionError::Misuse(_) => ErrorKind::Misuse,
        }
    }

    /// The error code and retry flag to answer the peer with.
    fn wire_code(&self) -> (ErrorCode, bool) {
        match self {
            SessionError::Corrupt { .. } => (ErrorCode::Checksum, true),
            SessionError::Version { .. } => (ErrorCode::Version, false),
            SessionError::Peer {
                code, retryable, ..
            }
            | SessionError::Store {
                code, retryable, ..
            } => (*code, *retryable),
            SessionError::Ended(_)
            | SessionError::ConnectionLost
            | SessionError::Timeout { .. } => (ErrorCode::Protocol, true),
            SessionError::Source(_) | SessionError::Misuse(_) => (ErrorCode::Internal, true),
            SessionError::Decode { .. }
            | SessionError::Unexpected { .. }
            | SessionError::Violation { .. } => (ErrorCode::Protocol, false),
        }
    }

    fn from_store(f: StoreFailure) -> Self {
        SessionError::Store {
            code: f.code,
            retryable: f.retryable,
            message: f.message,
        }
    }

    fn from_peer(e: super::ErrorMsg) -> Self {
        SessionError::Peer {
            code: e.code,
            retryable: e.retryable,
            message: e.message,
        }
    }
}

/// The bytes received on one stream and not yet decoded.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl Inbox {
    fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` if more bytes are needed.
    fn next(&mut self, stream: StreamId) -> Result<Option<Msg>, SessionError> {
        match decode(&self.buf[self.pos..]) {
            Ok(Some((msg, used))) => {
                self.pos += used;
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(SessionError::Decode {
                stream,
                detail: e.to_string(),
            }),
        }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn clear(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
    }
}

/// The running xxh3-128 of a log being sent or received (boxed: the
/// hasher state is large and lives in a stream's state).
#[derive(Default)]
struct Hasher(Box<super::LogHasher>);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hasher({:#x})", self.0.digest128())
    }
}

/// Encode `msg` as one frame (a message the session built itself; an
/// error here means the driver handed in invalid fields).
fn frame(msg: &Msg) -> Result<Vec<u8>, SessionError> {
    let mut out = Vec::new();
    encode(msg, &mut out).map_err(|e| SessionError::Misuse(format!("{}: {e}", msg.name())))?;
    Ok(out)
}

/// The `Error` frame answering a failure. Always encodable: the text is
/// sanitised by [`super::ErrorMsg::new`].
fn error_frame(e: &SessionError) -> Vec<u8> {
    let (code, retryable) = e.wire_code();
    // The frame carries the code itself: the text does not repeat it (the
    // sender prints it once, beside the text).
    let text = match e {
        SessionError::Store { message, .. } => format!("the store failed: {message}"),
        other => other.to_string(),
    };
    let msg = Msg::Error(super::ErrorMsg::new(code, retryable, text));
    frame(&msg).unwrap_or_default()
}

/// Lower-case hex of a disk id, for messages.
fn hexid(id: &DiskId) -> String {
    crate::util::hex(id)
}

#[cfg(test)]
mod tests;
