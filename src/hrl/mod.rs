//! The `.hrl` change-log format: one sealed cycle of one disk.
//!
//! A log carries the content, as of cut `cycle`, of every block of one disk
//! that changed since cut `base_cycle`. Applying it to an image that is the
//! disk as of `base_cycle` makes the image the disk as of `cycle`.
//!
//! # Layout (format version 1, all integers little-endian)
//!
//! ```text
//! FILE    = HEADER RECORD* TRAILER
//!
//! HEADER (80 + n + 8 bytes)
//!   0   8  magic            "VDHRL\0\r\n"
//!   8   4  format version   u32 = 1
//!  12   4  n                u32, length of disk_name, 1..=4096
//!  16  16  disk_id          random identity of the tracked disk
//!  32   8  cycle            u64, the cut this log leads to
//!  40   8  base_cycle       u64, the cut it starts from (< cycle)
//!  48   8  base_size        u64, disk size at base_cycle (<= 2^60)
//!  56   8  disk_size        u64, disk size at cycle (<= 2^60)
//!  64   8  cut_unix_ns      u64, time of the cut
//!  72   4  block_size       u32, power of two in 512..=2^30
//!  76   4  flags            u32: bit 0 = app-consistent cut, others 0
//!  80   n  disk_name        UTF-8, path relative to the mounted folder
//!  80+n 8  header checksum  xxh3-64 of bytes 0..80+n
//!
//! RECORD (32 bytes + stored_len bytes of payload)
//!   0   4  tag              "HREC"
//!   4   1  encoding         0 = RAW, 1 = ZERO, 2 = LZ4
//!   5   3  reserved         zero
//!   8   8  offset           u64, disk offset of the first byte
//!  16   4  length           u32, disk bytes covered, 1..=1 MiB
//!  20   4  stored_len       u32: RAW = length, ZERO = 0, LZ4 = 1..length-1
//!  24   8  checksum         xxh3-64 of record bytes 0..24 then the payload
//!  32   -  payload          RAW: the bytes; LZ4: one lz4 block; ZERO: none
//!
//! TRAILER (56 bytes, ends the file)
//!   0   4  tag              "HEND"
//!   4   4  reserved         zero
//!   8   8  record_count     u64
//!  16   8  data_bytes       u64, sum of the records' `length`
//!  24  16  log checksum     xxh3-128 of every byte of the file before the trailer
//!  40   8  trailer checksum xxh3-64 of trailer bytes 0..40
//!  48   8  seal magic       "HRLSEAL\n"
//! ```
//!
//! Rules a valid log obeys (checked by [`verify`] and on every read):
//! records are in ascending disk order and do not overlap
//! (`offset >= previous offset + previous length`); every record lies within
//! `disk_size`; nothing follows the seal. A log without a valid trailer and
//! seal is not sealed and is never applied.
//!
//! The writer ([`HrlWriter`]) splits runs into records of at most 1 MiB,
//! stores all-zero ranges as ZERO records and uses LZ4 only when it saves at
//! least 1/8 of the bytes. It writes to `.<name>.tmp` next to the final path
//! and publishes the log by rename after fsync, so a log visible under its
//! final name is always complete.
//!
//! Reading is streaming ([`HrlReader`]): memory is bounded by the 1 MiB record
//! cap. The structure parsers in [`format`](mod@format) work on byte slices (sans-IO) and
//! are fuzzed (`fuzz/fuzz_targets/hrl_parse.rs`).
//!
//! [`apply()`] verifies the whole log before touching the image, checks that the
//! image is the log's base (via the `IMAGE.vdrep-state` sidecar, or the image
//! size when there is none), then writes the records, fsyncs and records the
//! new cycle in the sidecar.

use std::path::PathBuf;

mod apply;
pub mod format;
mod reader;
mod writer;

pub use apply::{apply, read_state, state_path, ApplyOptions, ApplyReport, ImageState};
pub use format::{Encoding, MAX_RECORD_LEN};
pub use reader::{dump, dump_bytes, verify, verify_bytes, HrlReader, Record};
pub use writer::{HrlWriter, SealedLog};

/// Errors reading, writing or applying a log. Every variant names the file
/// (and the byte offset where it applies) so the operator can find it.
#[derive(Debug, thiserror::Error)]
pub enum HrlError {
    #[error("{path}: I/O error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt log at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// The image is not the base this log applies to (wrong disk, wrong
    /// cycle, wrong size).
    #[error("{0}")]
    Mismatch(String),
    /// The image is already at the cycle this log leads to.
    #[error(
        "{image}: log {log} (cycle {cycle}) is already applied: the image is at cycle {cycle}"
    )]
    AlreadyApplied {
        log: PathBuf,
        image: PathBuf,
        cycle: u64,
    },
    /// The image's state sidecar cannot be understood.
    #[error("{path}: unreadable replica state file: {what}")]
    State { path: PathBuf, what: String },
    /// The caller passed something the format cannot hold (bad header field,
    /// records out of order or beyond the disk size, writer already failed).
    #[error("{path}: {what}")]
    InvalidInput { path: PathBuf, what: String },
}

impl HrlError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        HrlError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn corrupt(path: &std::path::Path, offset: u64, what: impl Into<String>) -> Self {
        HrlError::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        }
    }
    /// True for refusals caused by the data (corrupt log, base mismatch,
    /// already applied, unreadable state), as opposed to I/O or usage errors.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HrlError::Corrupt { .. }
                | HrlError::Mismatch(_)
                | HrlError::AlreadyApplied { .. }
                | HrlError::State { .. }
        )
    }
}

/// Log header. `cycle` is the cut this log leads to, `base_cycle` the cut it
/// starts from (the image it applies to must be the disk as of `base_cycle`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HrlHeader {
    /// Stable identity of the tracked disk (random, made when tracking starts).
    pub disk_id: [u8; 16],
    /// Disk path relative to the mounted folder, for humans and checks.
    pub disk_name: String,
    pub cycle: u64,
    pub base_cycle: u64,
    /// Tracking granularity in bytes (power of two, >= 512).
    pub block_size: u32,
    /// Disk size at `base_cycle`.
    pub base_size: u64,
    /// Disk size at `cycle`; apply sets the image to this length first.
    pub disk_size: u64,
    /// Wall-clock time of the cut, nanoseconds since the Unix epoch.
    pub cut_unix_ns: u64,
    /// The cut was taken while the guest was quiesced (header flag bit 0,
    /// [`format::HDR_FLAG_APP`]): an application-consistent point.
    #[serde(default)]
    pub app_consistent: bool,
}

/// What a finished log contains.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HrlSummary {
    pub path: PathBuf,
    pub records: u64,
    /// Bytes of disk covered by records.
    pub data_bytes: u64,
    /// Bytes of the log file.
    pub file_bytes: u64,
    /// Records stored as ZERO (no payload).
    pub zero_records: u64,
    /// Records stored as LZ4.
    pub lz4_records: u64,
    /// Payload bytes stored (after compression).
    pub stored_bytes: u64,
    /// The whole-log xxh3-128 recorded in the trailer, as 32 hex digits.
    pub log_checksum: String,
}
