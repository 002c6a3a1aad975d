//! The `.hrl` change-log format: one sealed cycle of one disk.
//!
//! CONTRACT STUB — the hrl helper replaces the bodies and documents the
//! on-disk layout here. The signatures below are what `tracking` and `cli`
//! call; keep them (add more freely).

use std::path::{Path, PathBuf};

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
    #[error("{0}")]
    Mismatch(String),
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
}

/// Streams records into a new log; the log becomes visible at its final path
/// only once complete, checksummed, sealed and fsynced.
pub struct HrlWriter {
    _private: (),
}

impl HrlWriter {
    /// Start a log that will be published at `final_path` by [`HrlWriter::finish`].
    pub fn create(final_path: &Path, header: &HrlHeader) -> Result<Self, HrlError> {
        let _ = (final_path, header);
        todo!("hrl helper")
    }
    /// Append one record: `data` is the content of the disk at `offset` as of
    /// the cut. Offsets are block-aligned; the last record of a disk may be short.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<(), HrlError> {
        let _ = (offset, data);
        todo!("hrl helper")
    }
    /// Seal, fsync, rename into place, fsync the directory.
    pub fn finish(self) -> Result<HrlSummary, HrlError> {
        todo!("hrl helper")
    }
}

pub mod cli {
    //! Temporary CLI stub until the hrl module lands.
    #[derive(clap::Subcommand, Debug)]
    pub enum HrlCmd {
        /// Print a log.
        Dump { file: std::path::PathBuf },
    }
    pub fn run(_cmd: HrlCmd) -> i32 {
        1
    }
}
