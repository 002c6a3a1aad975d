//! Write tracking: per-disk dirty-block bitmaps, cycles and cuts.
//!
//! CONTRACT STUB (the tracking owner replaces the bodies; the FS calls only
//! what is declared here). Until then writes pass straight through.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Name of the state folder kept at the root of a tracked folder. The FS
/// shows it but never tracks anything below it.
pub const STATE_DIR: &str = ".vdrep";

/// Options that decide what is tracked and how finely.
#[derive(Debug, Clone)]
pub struct TrackConfig {
    /// Glob-like suffix patterns, e.g. `*.vhd`.
    pub patterns: Vec<String>,
    /// Tracking granularity in bytes (power of two).
    pub block_size: u32,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            patterns: ["*.vhd", "*.vhdx", "*.img", "*.raw", "*.qcow2"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            block_size: 4096,
        }
    }
}

/// All tracked disks under one mounted folder.
pub struct Tracker {
    _config: TrackConfig,
}

impl Tracker {
    /// The disk tracked at `rel` (path relative to the mount root, no leading
    /// `/`), attaching it on first use; `None` if `rel` is not a disk image.
    /// Call before any write, truncate or fallocate reaches a regular file.
    /// `file` is any open descriptor of the backing file.
    pub fn attach(&self, rel: &Path, file: &File) -> io::Result<Option<Arc<TrackedDisk>>> {
        let _ = (rel, file);
        Ok(None)
    }
    /// A file (or directory) at `from` was renamed to `to` (relative paths).
    pub fn on_rename(&self, from: &Path, to: &Path) {
        let _ = (from, to);
    }
    /// The file at `rel` was unlinked.
    pub fn on_unlink(&self, rel: &Path) {
        let _ = rel;
    }
}

/// One tracked disk. Every mutation of the backing file goes through here.
pub struct TrackedDisk {
    _p: (),
}

impl TrackedDisk {
    /// Write `data` at `offset` through `file` (the FS's open handle, which
    /// may be O_DIRECT) and record it. Returns bytes written.
    pub fn write_at(&self, file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
        file.write_at(data, offset)
    }
    /// Truncate or extend to `len`.
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }
    /// fallocate(2) with `mode` (incl. PUNCH_HOLE / ZERO_RANGE).
    pub fn fallocate(&self, file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let _ = (file, mode, offset, len);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}
