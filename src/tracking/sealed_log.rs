//! Sealed change logs waiting to be shipped: [`SealedLog`].
//!
//! Tracking writes each cut's `.hrl` into the disk's state folder and owns
//! it until it is shipped. [`super::Tracker::sealed_log`] hands out one
//! [`SealedLog`] per file, opened once through the folder's pre-mount
//! descriptor (never through the mount) with its header parsed; the sender
//! reads it in chunks straight into its own buffer and calls
//! [`SealedLog::mark_shipped`] once the receiver applied it, which deletes
//! it. Nobody else opens, maps or deletes sealed logs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::StateDir;
use crate::hrl::{HrlError, HrlHeader, HrlReader};

/// One sealed `.hrl` of a disk, open for reading.
pub struct SealedLog {
    disk: String,
    cycle: u64,
    file: File,
    len: u64,
    /// The parsed header, or why it cannot be parsed (a damaged log).
    header: Result<HrlHeader, HrlError>,
    /// Path relative to the folder root (`.vdrep/disks/F/C.hrl`).
    rel: PathBuf,
    /// How users see it (through the mount), for messages.
    shown: PathBuf,
    state: Arc<StateDir>,
}

impl SealedLog {
    /// Open the log at `rel` (relative to the folder root) once and read
    /// its header.
    pub(super) fn open(
        state: &Arc<StateDir>,
        disk: &str,
        cycle: u64,
        rel: PathBuf,
        shown: PathBuf,
    ) -> io::Result<SealedLog> {
        let file = state.openat(&rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
        let len = file.metadata()?.len();
        let header = HrlReader::new(&file, len, &shown).map(|r| r.header().clone());
        Ok(SealedLog {
            disk: disk.to_string(),
            cycle,
            file,
            len,
            header,
            rel,
            shown,
            state: state.clone(),
        })
    }

    /// The disk the log belongs to.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// The cycle the log leads to.
    pub fn cycle(&self) -> u64 {
        self.cycle
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its header, or why it cannot be read (the log is damaged).
    pub fn header(&self) -> Result<&HrlHeader, &HrlError> {
        self.header.as_ref()
    }

    /// The cycle the log applies to (None if the header is damaged).
    pub fn base_cycle(&self) -> Option<u64> {
        self.header.as_ref().ok().map(|h| h.base_cycle)
    }

    /// The path users see (for messages only: never open it, it is inside
    /// the mount).
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// Fill `buf` with the log's bytes at `offset` (positioned read: no
    /// seek, no copy beyond the caller's buffer).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// The receiver applied this log durably: tracking deletes it.
    pub fn mark_shipped(self) {
        self.delete("shipped");
    }

    /// The log is no longer needed (the receiver has its cycle already, a
    /// whole-disk copy or a resync replaces it, or it is damaged): tracking
    /// deletes it.
    pub fn discard(self) {
        self.delete("discarded");
    }

    fn delete(self, why: &str) {
        if let Err(e) = self.state.remove_at_root(&self.rel) {
            tracing::warn!(disk = %self.disk, "cannot delete the {why} log {}: {e}", self.shown.display());
        }
    }
}
