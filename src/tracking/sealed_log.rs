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

/// Where the notes of sealed cycles live (relative to `.vdrep/`).
const CUT_NOTES: &str = "cuts";

/// Notes kept with sealed cycles: what the cutter must still know about a
/// cycle when it ships the cycle's logs after a restart (a consistency
/// group's record). One file per cycle, `.vdrep/cuts/CYCLE.note`, written
/// durably before the cycle's logs, so a sealed log on disk always has its
/// note; deleted once no disk has a sealed log of that cycle any more.
impl super::Tracker {
    /// Durably attach `note` to the sealed cycle `cycle`. Call it after
    /// [`super::Tracker::seal`] and before the cycle's logs are written.
    pub fn note_cut(&self, cycle: u64, note: &[u8]) -> Result<(), super::TrackError> {
        let dir = Path::new(super::STATE_DIR).join(CUT_NOTES);
        let name = Path::new(CUT_NOTES).join(note_name(cycle));
        self.state
            .mkdir(&dir)
            // The folder's own entry is durable too (a no-op once it is).
            .and_then(|()| self.state.fsync_dir(Path::new(super::STATE_DIR)))
            .and_then(|()| self.state.write_atomic(&name, note))
            .map_err(|e| {
                let shown = self.root_path.join(super::STATE_DIR).join(&name);
                super::TrackError::io(format!("writing {}", shown.display()), e)
            })
    }

    /// The notes of every cycle that still has a sealed log (or a note
    /// written since: a cycle being written), by cycle.
    pub fn cut_notes(&self) -> std::collections::BTreeMap<u64, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        for cycle in self.note_cycles() {
            match self
                .state
                .read(&Path::new(CUT_NOTES).join(note_name(cycle)))
            {
                Ok(Some(b)) => {
                    out.insert(cycle, b);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot read the note of sealed cycle {cycle}: {e}"),
            }
        }
        out
    }

    /// Delete the notes of cycles up to `upto` of which no disk has a
    /// sealed log any more (every log of a cycle is written before any is
    /// shipped, so for a cycle already shipped by one disk this is final).
    pub fn prune_cut_notes(&self, upto: u64) {
        let old: Vec<u64> = self
            .note_cycles()
            .into_iter()
            .filter(|c| *c <= upto)
            .collect();
        if old.is_empty() {
            return;
        }
        let pending: std::collections::BTreeSet<u64> = self
            .disk_names()
            .iter()
            .flat_map(|d| self.pending_cycles(d))
            .collect();
        for c in old.into_iter().filter(|c| !pending.contains(c)) {
            if let Err(e) = self.state.remove(&Path::new(CUT_NOTES).join(note_name(c))) {
                tracing::warn!("cannot delete the note of shipped cycle {c}: {e}");
            }
        }
    }

    /// Cycles that have a note, oldest first.
    fn note_cycles(&self) -> Vec<u64> {
        let dir = Path::new(super::STATE_DIR).join(CUT_NOTES);
        let Ok(d) = self
            .state
            .openat(&dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        else {
            return Vec::new();
        };
        let mut v: Vec<u64> = super::state::list_dir(d)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| n.strip_suffix(".note")?.parse().ok())
            .collect();
        v.sort();
        v
    }
}

fn note_name(cycle: u64) -> String {
    format!("{cycle:010}.note")
}
