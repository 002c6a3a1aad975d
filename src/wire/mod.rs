//! The replication wire protocol: message types and a sans-IO framing codec.
//!
//! Owns the bytes that travel between sender and receiver on QUIC streams
//! (the transport, identities and trust are [`crate::transport`]'s). The
//! codec works on byte slices ([`encode`], [`decode`]) and is fuzzed
//! (`fuzz/fuzz_targets/wire_decode.rs`); [`read_msg`] / [`write_msg`] put it
//! on quinn streams.
//!
//! # Framing (protocol version 1, all integers little-endian)
//!
//! ```text
//! FRAME   = len:u32  type:u8  payload[len - 1]
//! ```
//! `len` counts the type byte and the payload: `1 ..= MAX_FRAME`. A decoder
//! rejects a larger `len` as soon as it has read the 4 length bytes, before
//! it buffers or allocates anything for the frame. A payload must be consumed
//! exactly by its message (trailing bytes are an error).
//!
//! Field encodings: `str` = `u16 n | n bytes of UTF-8` with a per-field cap;
//! `bytes` = `u32 n | n bytes`, `n <= MAX_DATA`; `bool` = `u8` 0 or 1 (other
//! values are errors); `id` = 16 raw bytes (a disk's random identity, as in
//! `.hrl` headers); `enc` = `u8` 0 RAW, 1 ZERO, 2 LZ4 (the `.hrl` codes).
//!
//! # Messages
//!
//! | type | message | payload |
//! |------|---------|---------|
//! | 0x01 | [`Hello`] | `version:u16 site:str(64) software:str(64)` |
//! | 0x02 | [`HelloOk`] | same fields, the receiver's, then `store_free:u64` |
//! | 0x03 | [`ErrorMsg`] | `code:u16 retryable:bool message:str(4096)` |
//! | 0x10 | [`OpenDisk`] | `vm:str disk_name:str disk_id:id block_size:u32 disk_size:u64 kind:u8` |
//! | 0x11 | [`DiskState`] | `disk_id:id replica_cycle:u64 replica_size:u64 copy_cycle:u64 resume_offset:u64 needs_resync:str(4096)` |
//! | 0x12 | [`InitialBegin`] | `disk_id:id cycle:u64 disk_size:u64 start_offset:u64` |
//! | 0x13 | [`InitialChunk`] | `disk_id:id offset:u64 length:u32 enc checksum:u64 data:bytes` |
//! | 0x14 | [`InitialEnd`] | `disk_id:id cycle:u64 disk_size:u64` |
//! | 0x20 | [`LogBegin`] | `disk_id:id disk_name:str cycle:u64 base_cycle:u64 block_size:u32 base_size:u64 disk_size:u64 cut_unix_ns:u64 total_len:u64 [1:u8]` (the trailing `1`, since protocol 8, only for a log sent behind its base: [`LogBegin::behind`]) |
//! | 0x21 | [`LogChunk`] | `disk_id:id cycle:u64 offset_in_log:u64 checksum:u64 data:bytes` |
//! | 0x22 | [`LogEnd`] | `disk_id:id cycle:u64 total_len:u64 log_checksum:u128` |
//! | 0x23 | [`Ack`] | `disk_id:id cycle:u64 durable:bool applied:bool` |
//! | 0x30 | [`PointCommit`] | `vm:str cycle:u64 app_consistent:bool n:u16 (disk_id:id cycle:u64)*n has_def:bool [definition:bytes] [1:u8 group:str origin:str m:u16 member:str*m]` (the group part only for a group point: a point without one ends after its definition, byte for byte a version-5 point) |
//! | 0x31 | [`PointAck`] | `vm:str cycle:u64` |
//! | 0x40 | [`BlockHashReq`] | `disk_id:id replica_cycle:u64 block_size:u32 n:u32 (offset:u64 blocks:u32)*n` |
//! | 0x41 | [`BlockHashes`] | `disk_id:id replica_cycle:u64 replica_size:u64 n:u32 (digest:u128)*n` |
//! | 0x42 | [`ResyncEnd`] | `disk_id:id replica_cycle:u64 cycle:u64 blocks_compared:u64 blocks_differ:u64` |
//!
//! `checksum` of a chunk is xxh3-64 over the chunk's fixed fields as encoded
//! (everything between the type byte and the checksum) followed by `data`.
//! [`encode`] computes it and [`decode`] verifies it, so a chunk mangled
//! anywhere between the two codecs (buffer reuse, reassembly) is caught even
//! though QUIC already protects the bytes on the wire. `log_checksum` is
//! xxh3-128 of all `total_len` bytes of the log, in order.
//!
//! # The conversation (one connection per sender, streams as below)
//!
//! 1. Control stream (the sender's first bidirectional stream): `Hello` →
//!    `HelloOk` or `Error` (e.g. unsupported version, code
//!    [`ErrorCode::Version`]). The receiver identifies the sender by its
//!    certificate ([`crate::transport::peer_identity`]), not by `site`.
//!    Since protocol version 7 the sender does not wait for the answer
//!    before step 2: its `OpenDisk`s go in the same flight (one round trip
//!    less before the first byte of data). QUIC does not order streams: the
//!    receiver holds an `OpenDisk` that arrives before the `Hello` (nothing
//!    reaches the store) until the `Hello` is accepted, and refuses it with
//!    the `Hello`'s error if the `Hello` is refused. The sender decides on
//!    the control stream's answer (a refused early `OpenDisk` waits for it):
//!    a version mismatch is reported as such. Any other request before the
//!    `Hello` is refused.
//! 2. Per disk: `OpenDisk` → `DiskState`. `replica_cycle` is the cycle the
//!    replica is consistent at (0: no complete replica); `copy_cycle` and
//!    `resume_offset` describe an unfinished initial copy (0 if none):
//!    all disk bytes below `resume_offset` of the copy of `copy_cycle` are
//!    durably stored.
//! 3. Initial copy (one disk at a time): `InitialBegin { cycle,
//!    start_offset }` where `start_offset` is the `resume_offset` if
//!    `cycle == copy_cycle`, else 0; then `InitialChunk`s in ascending
//!    offset order (holes and zero blocks as ZERO or skipped: a copy begins
//!    on a zero-filled image of `disk_size`); then `InitialEnd` → `Ack
//!    { durable, applied }`, after which the replica is at `cycle`.
//! 4. Delta: per sealed `.hrl`, on its own stream: `LogBegin` (the log's
//!    header fields and length), `LogChunk`s covering `0..total_len` in
//!    order, `LogEnd`. The receiver stores the log durably, answers `Ack
//!    { durable: true, applied: false }` if it wants to apply later, and
//!    `Ack { durable: true, applied: true }` once applied and fsynced. A log
//!    for a cycle already applied is answered with `applied: true` at once
//!    (resends after a crash are applied at most once). Since protocol
//!    version 8 the sender may send a disk's next log (its `base_cycle` is
//!    the running log's cycle) once all of the running log is sent,
//!    without waiting for its `Ack`, marked [`LogBegin::behind`]; at most
//!    one per disk. The mark tells the receiver that the base is in flight
//!    on this connection, not missing from the replica. The receiver leaves
//!    such a stream undecoded (nothing staged, flow control holds the rest)
//!    until its base is applied and acknowledged, then handles it as a log
//!    that just began; this holds too when it arrives before its base
//!    (QUIC does not order streams). If the base is refused or its stream
//!    reset, the log behind it is refused with `Error { Busy, retryable }`
//!    (before or after it arrives, never `ResyncRequired`) and both are
//!    sent again; if the connection is lost, nothing of it reached the
//!    store. Logs of a disk are so applied strictly in order, an `Ack`
//!    still means stored (and applied) durably, and a crash between the
//!    two leaves the replica at the last log applied with both logs
//!    resendable. A log without the mark whose base is not the replica's
//!    cycle is a diverged chain (`ResyncRequired`, as before). Any other
//!    transfer of a busy disk is refused with `Busy`.
//! 5. `PointCommit { vm, cycle, app_consistent, disks, definition }` once every disk of the VM has been
//!    acknowledged at its cycle, or (since protocol version 5) has sent
//!    all of its transfer of that cycle → `PointAck`: the recovery point
//!    exists. The receiver holds a `PointCommit` until every listed disk
//!    reached the cycle on this connection (its transfer applied and
//!    durable; only durable with a store that commits durable logs,
//!    `ReplicaStore::commits_durable_logs`), then records it durably, then answers; a sender that
//!    resets the stream withdraws it (a transfer of the cycle failed).
//!    Sending it with the last data saves the round trip after the last
//!    `Ack`.
//!    `definition` (since protocol version 4) is the VM's libvirt domain
//!    definition as of the cut (UTF-8 XML, at most [`MAX_DEFINITION`]
//!    bytes), stored with the point; absent for a VM protected by disks.
//! 6. Checksum resync and online verify (one stream per disk): the sender
//!    sends `BlockHashReq`s (runs of `block_size` blocks, at most
//!    [`MAX_HASHES`] blocks per request; several may be in flight) and the
//!    receiver answers each, in order, with `BlockHashes`: the xxh3-128
//!    digest of every requested block of its replica at `replica_cycle`
//!    (the newest point; a block past `replica_size` gets digest 0, the last
//!    block may be short). A request for another cycle than the replica's
//!    is answered with `Error { InvalidState }`. A resync ends with
//!    `ResyncEnd` (the whole disk was compared; the log of `cycle`, based on
//!    `replica_cycle`, carries every block that differed) → `Ack { durable:
//!    false, applied: false }`; that log is then sent as in 4. A verify
//!    just closes the stream. `DiskState.needs_resync` (non-empty: the
//!    reason) says the receiver no longer trusts the replica (adopted after
//!    a failover, a damaged or out-of-order log): it then refuses every log
//!    except the one announced by `ResyncEnd`.
//!
//! Any request may be answered by `Error { code, retryable, message }`.
//! A log the receiver refuses because the replica must be resynced first
//! (step 6) is answered with code [`ErrorCode::ResyncRequired`] (12, since
//! protocol version 3): the sender decides on the code, never on the text.
//!
//! # Names
//! Every path or name a peer sends passes [`safe_name`] (disk names:
//! relative paths) or [`safe_component`] (VM names: one component) before
//! it can reach a file system call; site names follow
//! [`crate::transport::keys::check_site_name`].

use crate::hrl::Encoding;

mod codec;
mod io;
mod names;
pub mod session;

pub use codec::{decode, encode, MsgType};
pub use io::{
    accept_hello, client_hello, expect, read_msg, write_msg, write_msg_buf, write_msg_limited,
};
pub use names::{safe_component, safe_name, MAX_COMPONENT, MAX_NAME};

/// Protocol version spoken by this build (in `Hello`).
/// 3: [`ErrorCode::ResyncRequired`] (a receiver's resync verdict by code).
/// 4: [`PointCommit::definition`] (an older receiver would refuse the
/// trailing bytes).
/// 5: a `PointCommit` may arrive before the transfers of its cycle are
/// applied (the sender sends it with their last bytes); the receiver holds
/// it until they are. An older receiver would refuse such a point.
/// 6: [`PointCommit::group`] (the consistency group of the point; absent
/// in a version-5 sender's message, which a version-6 receiver accepts).
/// 7: the sender opens its disks in the same flight as its `Hello` (the
/// conversation, steps 1 and 2). A version-6 receiver refuses the `Hello`
/// (code [`ErrorCode::Version`]; it would also refuse an early `OpenDisk`).
/// 8: the sender sends a disk's next log behind the one in flight, marked
/// [`LogBegin::behind`] (step 4). A version-8 receiver accepts a version-7
/// sender (answers `HelloOk` with 7; such a sender never sends a log
/// behind another; a `behind` mark on such a connection is a violation); a
/// version-7 receiver refuses a version-8 `Hello` with code
/// [`ErrorCode::Version`], and the sender says `Hello` again in version 7
/// (`crate::sender::compat`; doc/SEMANTICS.md).
pub const PROTOCOL_VERSION: u16 = 8;
/// Oldest protocol version a receiver of this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 7;

/// Whether this build speaks protocol `version` (as a receiver: every
/// version from [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]).
pub fn speaks(version: u16) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}
/// Largest data payload of one chunk.
pub const MAX_DATA: usize = 16 << 20;
/// Largest value of a frame's length field (type byte + payload).
pub const MAX_FRAME: usize = MAX_DATA + 4096;
/// Bytes before the payload: length (4) + type (1).
pub const FRAME_HEADER_LEN: usize = 5;
/// Cap of `ErrorMsg::message`, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Cap of version strings, in bytes.
pub const MAX_SOFTWARE_VERSION: usize = 64;
/// Most disks in one `PointCommit`.
pub const MAX_POINT_DISKS: usize = 4096;
/// Largest domain definition in a `PointCommit` (libvirt XML is 3-10 KiB).
pub const MAX_DEFINITION: usize = 1 << 20;
/// Most VMs in one consistency group ([`PointGroup::members`]).
pub const MAX_GROUP_MEMBERS: usize = 256;
/// Largest administrative request or answer (JSON bytes).
pub const MAX_ADMIN: usize = 60_000;
/// Most blocks (digests) in one `BlockHashReq` / `BlockHashes`.
pub const MAX_HASHES: usize = 1 << 18;
/// Most runs in one `BlockHashReq`.
pub const MAX_HASH_RUNS: usize = 1 << 16;
/// Largest block size of a `BlockHashReq`.
pub const MAX_HASH_BLOCK: u32 = 1 << 20;

/// A disk's identity (random, 16 bytes; the `.hrl` header's `disk_id`).
pub type DiskId = [u8; 16];

/// What went wrong decoding, encoding or moving a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes: the peer is not speaking vdrep protocol {PROTOCOL_VERSION} or is broken")]
    FrameTooLarge { len: u64, max: usize },
    #[error("empty frame (length 0): the peer is broken")]
    EmptyFrame,
    #[error("unknown message type {0:#04x}: the peer speaks a newer protocol; upgrade this side")]
    UnknownType(u8),
    #[error("message type {0:#04x} is reserved and not supported by this version")]
    Reserved(u8),
    /// A field is missing, out of range or inconsistent.
    #[error("malformed {msg}: {what}")]
    Malformed { msg: &'static str, what: String },
    /// A name or path is refused by [`safe_name`] / [`safe_component`].
    #[error("refused name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    /// A chunk's checksum does not match its content.
    #[error("{msg}: checksum mismatch: the data was corrupted between sender and receiver (a bug); the transfer must be retried")]
    Checksum { msg: &'static str },
    /// Reading from a stream failed (connection lost, stream reset).
    #[error("reading a message failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing to a stream failed.
    #[error("writing a message failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer answered with an `Error` message.
    #[error("the peer refused: {message} (error {code:?}{})", if *retryable { ", will retry" } else { "" })]
    Peer {
        code: ErrorCode,
        message: String,
        retryable: bool,
    },
    /// The peer sent a message that does not belong here.
    #[error("protocol error: expected {expected}, the peer sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// The stream ended where a message was expected.
    #[error("the peer closed the stream where {expected} was expected")]
    Ended { expected: &'static str },
    /// The peers speak different protocol versions.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}; upgrade the older side")]
    Version { ours: u16, theirs: u16 },
    /// The stream ended in the middle of a frame.
    #[error("the stream ended in the middle of a message ({got} of {need} bytes)")]
    Truncated { got: usize, need: usize },
}

impl WireError {
    /// The connection error underneath a stream error, if any (explain it
    /// with [`crate::transport::explain_connection_error`]).
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            WireError::Read(quinn::ReadError::ConnectionLost(e)) => Some(e),
            WireError::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }

    /// One sentence for an operator: connection failures are explained with
    /// [`crate::transport::explain_connection_error`] (who refused whom,
    /// timeouts), anything else is this error's text.
    pub fn explain(&self, peer: std::net::SocketAddr) -> String {
        match self.connection_error() {
            Some(e) => crate::transport::explain_connection_error(e, peer),
            None => self.to_string(),
        }
    }

    /// True for errors of the channel (worth retrying on a new connection),
    /// false for errors in what the peer said.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            WireError::Read(_) | WireError::Write(_) | WireError::Truncated { .. }
        )
    }
}

/// Error codes of [`ErrorMsg`]. Unknown codes from newer peers are kept as
/// `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer sent something this side cannot parse or did not expect.
    Protocol,
    /// Unsupported protocol version.
    Version,
    /// The peer is authenticated but not allowed to do this.
    Unauthorized,
    /// A name or path was refused (see [`safe_name`]).
    InvalidName,
    /// The receiver's store is full (recoverable: retry later).
    NoSpace,
    /// An I/O error at the receiver.
    Io,
    /// The disk, VM or cycle is unknown.
    NotFound,
    /// The replica is not in a state this request applies to (e.g. a log
    /// whose base is not the replica's cycle): resync needed.
    InvalidState,
    /// Busy (another transfer of the same disk is running): retry later.
    Busy,
    /// Data failed a checksum.
    Checksum,
    /// A bug at the peer.
    Internal,
    /// The replica can no longer be trusted (a damaged or out-of-order log,
    /// an adoption after failover, unreadable state): the disk must be
    /// compared by checksums ([`BlockHashReq`]) before logs apply again.
    /// New in protocol version 3 (earlier receivers said
    /// [`ErrorCode::InvalidState`]).
    ResyncRequired,
    /// A request refused as it stands (e.g. a planned failover the other
    /// site cannot take: its domain's network is missing there); nothing
    /// changed. Earlier receivers said [`ErrorCode::InvalidState`].
    Refused,
    Other(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::Version => 2,
            ErrorCode::Unauthorized => 3,
            ErrorCode::InvalidName => 4,
            ErrorCode::NoSpace => 5,
            ErrorCode::Io => 6,
            ErrorCode::NotFound => 7,
            ErrorCode::InvalidState => 8,
            ErrorCode::Busy => 9,
            ErrorCode::Checksum => 10,
            ErrorCode::Internal => 11,
            ErrorCode::ResyncRequired => 12,
            ErrorCode::Refused => 13,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(c: u16) -> Self {
        match c {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Version,
            3 => ErrorCode::Unauthorized,
            4 => ErrorCode::InvalidName,
            5 => ErrorCode::NoSpace,
            6 => ErrorCode::Io,
            7 => ErrorCode::NotFound,
            8 => ErrorCode::InvalidState,
            9 => ErrorCode::Busy,
            10 => ErrorCode::Checksum,
            11 => ErrorCode::Internal,
            12 => ErrorCode::ResyncRequired,
            13 => ErrorCode::Refused,
            c => ErrorCode::Other(c),
        }
    }
}

/// What kind of image the source disk is (decides the replica's format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A VHD file: replicated byte for byte.
    Vhd,
    /// A raw image (`.img`, `.raw`): the replica becomes a VHD.
    Raw,
}

impl DiskKind {
    pub fn code(self) -> u8 {
        match self {
            DiskKind::Vhd => 1,
            DiskKind::Raw => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(DiskKind::Vhd),
            2 => Some(DiskKind::Raw),
            _ => None,
        }
    }
}

/// First message of the sender on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub site_name: String,
    pub software_version: String,
}

/// The receiver's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    pub protocol_version: u16,
    pub site_name: String,
    pub software_version: String,
    /// Bytes free in the receiver's store (0 if unknown), so that enabling
    /// protection can warn before an initial copy runs out of space.
    pub store_free: u64,
}

/// A refusal or failure, answering any request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
    /// True if the same request may succeed later (e.g. disk full).
    pub retryable: bool,
}

/// Start (or resume) replicating one disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDisk {
    /// VM name: one path component ([`safe_component`]).
    pub vm: String,
    /// Disk path relative to the mounted folder ([`safe_name`]).
    pub disk_name: String,
    pub disk_id: DiskId,
    /// Tracking granularity (power of two, 512..=1 GiB).
    pub block_size: u32,
    pub disk_size: u64,
    pub kind: DiskKind,
}

/// The receiver's view of a disk's replica (answers [`OpenDisk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    pub disk_id: DiskId,
    /// Cycle the replica is consistent at; 0 = no complete replica yet.
    pub replica_cycle: u64,
    /// Size of the replica's disk at `replica_cycle`.
    pub replica_size: u64,
    /// Cycle of an unfinished initial copy, 0 if none.
    pub copy_cycle: u64,
    /// Disk bytes of that copy durably stored (resume point).
    pub resume_offset: u64,
    /// Non-empty: the receiver does not trust the replica (the reason); the
    /// sender must resync it by checksums before any delta.
    pub needs_resync: String,
}

/// A run of `blocks` blocks starting at disk offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRun {
    /// A multiple of the request's block size.
    pub offset: u64,
    /// 1..=MAX_HASHES.
    pub blocks: u32,
}

/// Ask for the digests of some blocks of the replica at `replica_cycle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashReq {
    pub disk_id: DiskId,
    /// The replica's cycle the sender compares against.
    pub replica_cycle: u64,
    /// Power of two, 512..=MAX_HASH_BLOCK.
    pub block_size: u32,
    /// Ascending, non-overlapping; at most MAX_HASHES blocks in total.
    pub runs: Vec<HashRun>,
}

impl BlockHashReq {
    /// Blocks requested in total.
    pub fn total_blocks(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.blocks)).sum()
    }
}

/// The digests answering a [`BlockHashReq`], in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    pub disk_id: DiskId,
    pub replica_cycle: u64,
    /// The replica's size (blocks at or past it have digest 0).
    pub replica_size: u64,
    pub hashes: Vec<u128>,
}

/// The whole disk was compared; the log of `cycle` heals the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncEnd {
    pub disk_id: DiskId,
    pub replica_cycle: u64,
    pub cycle: u64,
    pub blocks_compared: u64,
    pub blocks_differ: u64,
}

/// Start an initial copy of a disk as of cut `cycle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialBegin {
    pub disk_id: DiskId,
    pub cycle: u64,
    pub disk_size: u64,
    /// First offset that will be sent (a resume point, or 0).
    pub start_offset: u64,
}

/// One run of disk bytes of an initial copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialChunk {
    pub disk_id: DiskId,
    /// Disk offset of the first byte.
    pub offset: u64,
    /// Disk bytes covered (1..=MAX_DATA).
    pub length: u32,
    /// RAW: `data` is the bytes (`data.len() == length`); ZERO: `data` is
    /// empty; LZ4: `data` is one lz4 block that decompresses to `length`.
    pub encoding: Encoding,
    pub data: Vec<u8>,
}

/// End of an initial copy; answered by [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialEnd {
    pub disk_id: DiskId,
    pub cycle: u64,
    pub disk_size: u64,
}

/// Start of one sealed `.hrl` log: its header fields and byte length.
#[derive(Debug, Clone, PartialEq, Eq)]
// Mirrors the `.hrl` header's fields on purpose: the wire format is versioned
// apart from the file format (`LogBegin::from_header` converts).
pub struct LogBegin {
    pub disk_id: DiskId,
    pub disk_name: String,
    pub cycle: u64,
    pub base_cycle: u64,
    pub block_size: u32,
    pub base_size: u64,
    pub disk_size: u64,
    pub cut_unix_ns: u64,
    /// Length of the log file in bytes.
    pub total_len: u64,
    /// Sent behind the log of `base_cycle` while that one was still in
    /// flight on this connection (protocol 8): its base may be arriving,
    /// or may have been refused, not missing from the replica. Encoded as
    /// a trailing flag only when set (a log without it is byte for byte a
    /// version-7 `LogBegin`).
    pub behind: bool,
}

/// A piece of the log file: bytes `offset_in_log .. + data.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub disk_id: DiskId,
    pub cycle: u64,
    pub offset_in_log: u64,
    pub data: Vec<u8>,
}

/// End of a log; answered by [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEnd {
    pub disk_id: DiskId,
    pub cycle: u64,
    pub total_len: u64,
    /// xxh3-128 of the whole log.
    pub log_checksum: u128,
}

/// The receiver's acknowledgement of a log or an initial copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub disk_id: DiskId,
    pub cycle: u64,
    /// Stored durably (fsynced) at the receiver.
    pub durable: bool,
    /// Applied to the replica, which is fsynced at `cycle`.
    pub applied: bool,
}

/// One disk's cycle in a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCycle {
    pub disk_id: DiskId,
    pub cycle: u64,
}

/// Declare a recovery point of a VM: every listed disk is at its cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointCommit {
    pub vm: String,
    /// The cut (shared by the VM's disks) naming the point.
    pub cycle: u64,
    /// The guest was quiesced for the cut (an application-consistency
    /// hook froze it): an application-consistent point.
    pub app_consistent: bool,
    /// Distinct disks, 1..=MAX_POINT_DISKS.
    pub disks: Vec<DiskCycle>,
    /// The VM's libvirt domain definition as of the cut (XML, at most
    /// [`MAX_DEFINITION`] bytes); `None` for a VM protected by its disks.
    pub definition: Option<String>,
    /// The consistency group the VM belongs to (since protocol version 6;
    /// `None`: no group). The receiver keeps it with the point: a group
    /// point is a cycle every member has a point at, each saying the same
    /// group ([`crate::replica::group`]).
    pub group: Option<Box<PointGroup>>,
}

/// A VM's consistency group as its `PointCommit` states it: the cut of a
/// point of cycle N holds every disk of every member at one instant when
/// every member has a point N with the same `origin` (the cycle numbers of
/// one mount, which cuts them all in one seal).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PointGroup {
    /// The group's name (one path component).
    pub name: String,
    /// The cycle numbering the members share: the mount's identity
    /// (random, kept in its state folder); cycles of another mount are
    /// other instants.
    pub origin: String,
    /// Every VM of the group (sorted, 1..=[`MAX_GROUP_MEMBERS`]).
    pub members: Vec<String>,
}

/// The recovery point is recorded durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointAck {
    pub vm: String,
    pub cycle: u64,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    HelloOk(HelloOk),
    Error(ErrorMsg),
    OpenDisk(OpenDisk),
    DiskState(DiskState),
    InitialBegin(InitialBegin),
    InitialChunk(InitialChunk),
    InitialEnd(InitialEnd),
    LogBegin(LogBegin),
    LogChunk(LogChunk),
    LogEnd(LogEnd),
    Ack(Ack),
    PointCommit(PointCommit),
    PointAck(PointAck),
    /// Site-to-site administration (failover, reverse replication): a JSON
    /// request of [`crate::roles::AdminRequest`], at most [`MAX_ADMIN`] bytes.
    Admin(String),
    /// The JSON answer to [`Msg::Admin`].
    AdminOk(String),
    BlockHashReq(BlockHashReq),
    BlockHashes(BlockHashes),
    ResyncEnd(ResyncEnd),
}

impl Msg {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        self.msg_type().name()
    }

    /// Its type code on the wire.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Msg::Hello(_) => MsgType::Hello,
            Msg::HelloOk(_) => MsgType::HelloOk,
            Msg::Error(_) => MsgType::Error,
            Msg::OpenDisk(_) => MsgType::OpenDisk,
            Msg::DiskState(_) => MsgType::DiskState,
            Msg::InitialBegin(_) => MsgType::InitialBegin,
            Msg::InitialChunk(_) => MsgType::InitialChunk,
            Msg::InitialEnd(_) => MsgType::InitialEnd,
            Msg::LogBegin(_) => MsgType::LogBegin,
            Msg::LogChunk(_) => MsgType::LogChunk,
            Msg::LogEnd(_) => MsgType::LogEnd,
            Msg::Ack(_) => MsgType::Ack,
            Msg::PointCommit(_) => MsgType::PointCommit,
            Msg::PointAck(_) => MsgType::PointAck,
            Msg::Admin(_) => MsgType::Admin,
            Msg::AdminOk(_) => MsgType::AdminOk,
            Msg::BlockHashReq(_) => MsgType::BlockHashReq,
            Msg::BlockHashes(_) => MsgType::BlockHashes,
            Msg::ResyncEnd(_) => MsgType::ResyncEnd,
        }
    }
}

impl ErrorMsg {
    /// An error message; the text is cut to [`MAX_ERROR_MESSAGE`] bytes and
    /// control characters other than newline and tab become `?` (the peer
    /// prints it on a terminal).
    pub fn new(code: ErrorCode, retryable: bool, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let message = message
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' && c != '\t' {
                    '?'
                } else {
                    c
                }
            })
            .collect();
        ErrorMsg {
            code,
            message,
            retryable,
        }
    }
}

impl InitialChunk {
    /// The chunk carrying `data` (disk bytes at `offset`): ZERO if it is
    /// all zeros; with `try_lz4`, LZ4 if that saves at least 1/8 of the
    /// bytes; RAW otherwise (the bytes moved, not copied). `data` must be
    /// 1..=MAX_DATA bytes (checked by [`encode`]). The sender's copy builds
    /// every chunk here.
    pub fn new(disk_id: DiskId, offset: u64, data: Vec<u8>, try_lz4: bool) -> Self {
        let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let (encoding, data) = if crate::hrl::format::is_all_zero(&data) {
            (Encoding::Zero, Vec::new())
        } else {
            match try_lz4.then(|| lz4_if_smaller(&data)).flatten() {
                Some(c) => (Encoding::Lz4, c),
                None => (Encoding::Raw, data),
            }
        };
        InitialChunk {
            disk_id,
            offset,
            length,
            encoding,
            data,
        }
    }

    /// [`InitialChunk::new`] of a copy of `data`, lz4 tried.
    pub fn from_block(disk_id: DiskId, offset: u64, data: &[u8]) -> Self {
        Self::new(disk_id, offset, data.to_vec(), true)
    }

    /// The disk bytes this chunk stands for, written to `out` (cleared
    /// first). Checks that LZ4 data expands to exactly `length` bytes.
    pub fn decode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        expand(self.encoding, self.length, &self.data, out)
    }

    /// The disk bytes this chunk stands for, with the checks of
    /// [`decode_into`](Self::decode_into); RAW data is moved, not copied
    /// (the receiver of an initial copy copied every byte once more here).
    pub fn into_data(self) -> Result<Vec<u8>, WireError> {
        match self.encoding {
            Encoding::Raw if self.data.len() == self.length as usize => Ok(self.data),
            _ => {
                let mut out = Vec::new();
                self.decode_into(&mut out)?;
                Ok(out)
            }
        }
    }
}

/// Choose the encoding of a run of disk bytes (as [`InitialChunk::new`]
/// with lz4 tried): the encoding and its payload.
pub fn compress(data: &[u8]) -> (Encoding, Vec<u8>) {
    let c = InitialChunk::new([0; 16], 0, data.to_vec(), true);
    (c.encoding, c.data)
}

/// `data` as one lz4 block, if that saves at least 1/8 of its bytes.
fn lz4_if_smaller(data: &[u8]) -> Option<Vec<u8>> {
    let c = lz4_flex::block::compress(data);
    (!c.is_empty() && c.len() <= data.len() - data.len() / 8 && c.len() < data.len()).then_some(c)
}

/// Expand a stored run back to its `length` disk bytes into `out`.
pub fn expand(
    encoding: Encoding,
    length: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let len = length as usize;
    if len > MAX_DATA {
        return Err(WireError::Malformed {
            msg: "chunk",
            what: format!("length {len} exceeds {MAX_DATA}"),
        });
    }
    out.clear();
    match encoding {
        Encoding::Raw => {
            if data.len() != len {
                return Err(WireError::Malformed {
                    msg: "chunk",
                    what: format!("RAW data of {} bytes for length {len}", data.len()),
                });
            }
            out.extend_from_slice(data);
        }
        Encoding::Zero => out.resize(len, 0),
        Encoding::Lz4 => {
            out.resize(len, 0);
            match lz4_flex::block::decompress_into(data, out) {
                Ok(n) if n == len => {}
                Ok(n) => {
                    return Err(WireError::Malformed {
                        msg: "chunk",
                        what: format!("LZ4 data expands to {n} bytes, not {len}"),
                    })
                }
                Err(e) => {
                    return Err(WireError::Malformed {
                        msg: "chunk",
                        what: format!("bad LZ4 data: {e}"),
                    })
                }
            }
        }
    }
    Ok(())
}

impl LogBegin {
    /// The start message of a log with this header and file length.
    pub fn from_header(h: &crate::hrl::HrlHeader, total_len: u64) -> Self {
        LogBegin {
            disk_id: h.disk_id,
            disk_name: h.disk_name.clone(),
            cycle: h.cycle,
            base_cycle: h.base_cycle,
            block_size: h.block_size,
            base_size: h.base_size,
            disk_size: h.disk_size,
            cut_unix_ns: h.cut_unix_ns,
            total_len,
            behind: false,
        }
    }
}

/// Streaming xxh3-128 over a log's bytes, for [`LogEnd::log_checksum`].
pub struct LogHasher(xxhash_rust::xxh3::Xxh3);

impl Default for LogHasher {
    fn default() -> Self {
        LogHasher(xxhash_rust::xxh3::Xxh3::new())
    }
}

impl LogHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn digest128(&self) -> u128 {
        self.0.digest128()
    }
}
