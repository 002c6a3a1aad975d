//! Write tracking: per-disk dirty-block bitmaps, cycles, copy-before-write
//! and cuts.
//!
//! Every mutation of a tracked disk (write, truncate, fallocate) goes through
//! [`TrackedDisk`], which marks the touched blocks in the disk's bitmap for
//! the current cycle. [`Tracker::seal`] seals the current cycle of the
//! disks it is given (one VM's, a consistency group's, or every tracked
//! disk for [`Tracker::cut`]) at one instant: it takes each of those
//! disks' cut locks exclusively, in a fixed order (writes hold their disk's
//! shared for the whole copy-before-write + pwrite + mark sequence, so
//! every write is entirely before or entirely after the cut), swaps in
//! fresh bitmaps and releases them. The other disks of the mount are
//! written meanwhile: with 256 continuous VMs a mount-wide lock stalled
//! every VM's writes at every VM's cut (session 26). It then materialises each sealed cycle as
//! a `.hrl` log while the VM keeps writing: the first write after the cut to
//! a block that is dirty in the sealed cycle and not yet copied into the log
//! first saves the block's old content (copy-before-write), so the log holds
//! the disk exactly as of the cut. Only blocks that change during the short
//! materialisation window are ever copied twice; see
//! `kernel-notes/tracking-design.md` for why this beats logging every write.
//!
//! If a log cannot be written (disk full, I/O error) the sealed bits are
//! merged back into the live bitmap: the next log then starts from the same
//! base and nothing is lost. A daemon that dies without a clean shutdown
//! leaves `mount.json` marked unclean; the next mount marks every disk
//! "resync required" instead of trusting a stale bitmap.
//!
//! Sealed logs stay tracking's until shipped: [`Tracker::sealed_log`] hands
//! out a [`SealedLog`] (opened once, read in place, deleted by
//! [`SealedLog::mark_shipped`]); nobody else opens or deletes them. Why a
//! cut wrote no log is typed ([`CutEntry::kind`]); system calls go through
//! `crate::sys`, which also spells the `/proc/self/fd/N` paths.

pub mod activity;
pub mod bitmap;
pub mod kept;
pub mod preimage;
mod sealed_log;
pub mod seed;
pub mod state;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::hrl::{HrlHeader, HrlWriter};
use crate::sys;
use crate::util::{hex, now_ns, random_id, read_full_at};
use activity::ActivityLog;
use bitmap::Bitmap;
pub use sealed_log::SealedLog;
use state::{DiskMeta, MountMeta, StateDir};
pub use state::{ResyncScope, TrackState};

/// Name of the state folder kept at the root of a tracked folder. The FS
/// shows it but never tracks anything below it.
pub const STATE_DIR: &str = ".vdrep";

/// Largest run handed to the log writer at once.
const CHUNK_BYTES: u64 = 1 << 20;

/// Cycle numbers a cut makes durable in `mount.json` at once
/// ([`state::MountMeta::reserved`]).
const CYCLE_RESERVE: u64 = 4096;

/// How many of a disk's sealed logs a replication session may have sent
/// and not yet had acknowledged (the session sends a disk's next log
/// behind the one in flight, protocol 8; the receiver applies them in
/// order): after a restart, that many of the oldest pending logs may
/// already be applied at the receiver, so the 50% rule must not fold them
/// ([`Tracker::enforce_log_limit`]).
pub const LOGS_IN_FLIGHT_PER_DISK: usize = 2;

/// Copy-before-write memory cap per sealed cycle: past it the cycle is
/// abandoned (its bits go back to the live bitmap) rather than eat RAM.
const MAX_SAVED_BYTES: u64 = 512 << 20;

/// Options that decide what is tracked and how finely.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrackConfig {
    /// Glob patterns matched (case-insensitively) against file names, e.g. `*.vhd`.
    pub patterns: Vec<String>,
    /// Tracking granularity in bytes (power of two, 512..=1 MiB).
    pub block_size: u32,
    /// Keep an activity log per disk ([`activity`]): one extra `fdatasync`
    /// per write into a 4 MiB extent not written since the last cut, and an
    /// unclean stop then needs only a small resync. Off: an unclean stop
    /// needs a full resync (and so does a resync interrupted by one).
    #[serde(default = "default_true")]
    pub activity_log: bool,
    /// Extents recorded *ahead* of a sequential writer in the same
    /// `fdatasync`: a write that starts at the first byte of a cold extent
    /// whose predecessor is hot also records the next `activity_ahead`
    /// extents. A sequential writer then pays one sync per
    /// `1 + activity_ahead` extents instead of one per extent; an unclean
    /// stop compares at most that many extents more per writer.
    #[serde(default = "default_ahead")]
    pub activity_ahead: u32,
    /// Extents the activity log keeps hot after their writes are durably
    /// tracked (its budget, DRBD's `al-extents`): idle extents leave only
    /// above it, least recently written first. A writer returning to an
    /// extent still hot pays no sync; an unclean stop compares at most this
    /// many extents (× 4 MiB) more per disk. 0: every idle extent leaves at
    /// the next finished cycle (the behaviour before the budget).
    #[serde(default = "default_hot")]
    pub activity_hot: u32,
    /// Bytes of the running cycles' whole-block writes the mount keeps in
    /// memory for the cut's log writer ([`kept`]), over every disk; 0: none
    /// (every changed block is read back from the disk at the cut).
    #[serde(default = "default_keep_writes")]
    pub keep_writes: u64,
}

fn default_keep_writes() -> u64 {
    kept::DEFAULT_KEEP_WRITES
}

/// Default of [`TrackConfig::activity_hot`]: 256 extents, 1 GiB per disk
/// (`kernel-notes/activity-log.md`).
pub const DEFAULT_ACTIVITY_HOT: u32 = 256;

fn default_hot() -> u32 {
    DEFAULT_ACTIVITY_HOT
}

/// Default of [`TrackConfig::activity_ahead`]: 15 extents (a sync per
/// 64 MiB of a sequential writer; `kernel-notes/activity-log.md`).
pub const DEFAULT_ACTIVITY_AHEAD: u32 = 15;

fn default_ahead() -> u32 {
    DEFAULT_ACTIVITY_AHEAD
}

fn default_true() -> bool {
    true
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            patterns: ["*.vhd", "*.vhdx", "*.img", "*.raw", "*.qcow2"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            block_size: 4096,
            activity_log: true,
            activity_ahead: DEFAULT_ACTIVITY_AHEAD,
            activity_hot: DEFAULT_ACTIVITY_HOT,
            keep_writes: kept::DEFAULT_KEEP_WRITES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("tracking state in {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid tracking configuration: {0}")]
    Config(String),
    /// The request does not fit the disk's state (not tracked, not fenced,
    /// still open, the target exists): nothing changed.
    #[error("{0}")]
    Refused(String),
    /// A file operation on a disk or its state failed.
    #[error("{what}: {source}{note}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
        /// What it means or what to do (may be empty).
        note: String,
    },
}

/// What kind of failure a [`TrackError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackErrorKind {
    /// The caller asked for something that cannot be done as asked.
    Refused,
    /// The tracking state or a disk could not be read or written.
    Io,
}

impl TrackError {
    pub fn kind(&self) -> TrackErrorKind {
        match self {
            TrackError::Config(_) | TrackError::Refused(_) => TrackErrorKind::Refused,
            TrackError::State { .. } | TrackError::Io { .. } => TrackErrorKind::Io,
        }
    }

    fn io(what: impl Into<String>, source: io::Error) -> Self {
        TrackError::Io {
            what: what.into(),
            source,
            note: String::new(),
        }
    }
}

/// What one cut produced for one disk.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CutEntry {
    pub disk: String,
    pub cycle: u64,
    pub base_cycle: u64,
    /// Path of the sealed log as seen through the mount, if one was written.
    pub log: Option<PathBuf>,
    pub dirty_blocks: u64,
    pub log_bytes: u64,
    /// Why no log was written (for people).
    pub error: Option<String>,
    /// What kind of problem `error` is (for programs: decide on this,
    /// never on the text). `None` with `error` set only from an older daemon.
    #[serde(default)]
    pub kind: Option<CutErrorKind>,
}

/// Why a cut wrote no log for a disk (or wrote one but could not record it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum CutErrorKind {
    /// The disk needs a checksum resync: its bitmap cannot be trusted.
    ResyncRequired,
    /// The disk is tracked bitmap-only: its changes ship as one cycle.
    BitmapOnly,
    /// The previous cycle of the disk is still being written or shipped.
    Busy,
    /// The disk, or its log, could not be read or written; the changes
    /// stay for the next cut.
    Io,
    /// The log was written but the disk's new base could not be saved.
    StateNotSaved,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CutReport {
    pub cycle: u64,
    pub cut_unix_ns: u64,
    pub disks: Vec<CutEntry>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub id: String,
    pub state: TrackState,
    pub cycle: u64,
    pub size: u64,
    pub block_size: u32,
    pub dirty_blocks: u64,
    pub dirty_bytes: u64,
    /// No logs are written for this disk until its changes are shipped as
    /// one cycle (pending changes passed the protection's threshold).
    #[serde(default)]
    pub bitmap_only: bool,
    /// With a ResyncRequired state: whole disk, or the activity log's
    /// extents only.
    #[serde(default)]
    pub resync_scope: ResyncScope,
    /// Extents (4 MiB) in the disk's activity log (`None`: no activity log).
    #[serde(default)]
    pub activity_extents: Option<u64>,
    /// `fdatasync`s the activity log made for writes into cold extents
    /// since this daemon attached the disk (the write path's extra cost).
    #[serde(default)]
    pub activity_syncs: Option<u64>,
    /// Bytes written to the disk through the mount since this daemon
    /// attached it (rewrites included): the churn the sender measures its
    /// link against (`sender::overload`).
    #[serde(default)]
    pub written_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrackerStatus {
    pub root: PathBuf,
    pub cut_seq: u64,
    pub previous_stop_clean: bool,
    pub disks: Vec<DiskStatus>,
    /// Bytes of kept write copies held now ([`kept`]), and the budget.
    #[serde(default)]
    pub kept_bytes: u64,
    #[serde(default)]
    pub kept_limit: u64,
}

/// Shared between the tracker and its disks.
struct Shared {
    block_size: u64,
    /// [`TrackConfig::activity_ahead`].
    activity_ahead: u64,
    /// [`TrackConfig::activity_hot`].
    activity_hot: u64,
    /// [`TrackConfig::keep_writes`], shared by every disk.
    keep_budget: Arc<kept::Budget>,
}

/// A write through [`TrackedDisk::try_begin_write`] whose backing I/O is in
/// flight: it holds its disk's cut lock shared, so no cut seals the cycle
/// before the write is on the disk and marked. Its blocks are marked when it is
/// finished or dropped, whatever the outcome (an over-approximation is
/// always safe).
pub struct InFlightWrite {
    disk: Arc<TrackedDisk>,
    first: u64,
    last: u64,
    /// Its blocks lose their kept copies when it ends ([`kept`]: this
    /// write's bytes are not kept).
    kept: Option<kept::Ticket>,
    _cut: CutShare,
}

/// A share of a disk's cut lock that a write in flight owns.
type CutShare = parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>;

/// `disks` in the order every cut and freeze takes their cut locks (by
/// id), so two of them over overlapping sets never wait in a circle.
fn in_lock_order(mut disks: Vec<Arc<TrackedDisk>>) -> Vec<Arc<TrackedDisk>> {
    disks.sort_by_key(|d| (d.id, Arc::as_ptr(d) as usize));
    disks
}

/// A disk's cut lock held exclusively (a freeze for a handover).
type CutHeld = parking_lot::ArcRwLockWriteGuard<parking_lot::RawRwLock, ()>;

impl InFlightWrite {
    /// The backing write completed having written `written` bytes: mark the
    /// blocks, count the bytes, release the cut lock.
    pub fn finish(self, written: usize) {
        self.disk
            .written
            .fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for InFlightWrite {
    fn drop(&mut self) {
        if let Some(t) = self.kept.take() {
            self.disk.kept.end(t, None, self.disk.bs());
        }
        self.disk.mark(self.first, self.last);
    }
}

/// All tracked disks under one mounted folder.
pub struct Tracker {
    shared: Arc<Shared>,
    config: TrackConfig,
    state: Arc<StateDir>,
    /// Test hook: called by [`Tracker::save_disk`] once it copied the meta
    /// it is about to write.
    #[cfg(test)]
    meta_copied: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    root_path: PathBuf,
    disks: Mutex<HashMap<String, Arc<TrackedDisk>>>,
    /// Metas found on disk but whose file is not attached yet.
    known: Mutex<HashMap<String, DiskMeta>>,
    /// Serialises cuts and shutdown.
    cut_serial: Mutex<MountMeta>,
    /// `Some` while tracking is frozen for a handover
    /// ([`Tracker::freeze_clean`]): the cut locks of the disks attached
    /// since, held exclusively. Taken under the `disks` lock.
    frozen: Mutex<Option<Vec<CutHeld>>>,
    /// `cut_serial`'s `cut_seq`, for readers that must not wait for a cut
    /// ([`Tracker::status`]: a cut holds `cut_serial` across I/O, and
    /// with 256 continuous VMs one always waits for it; issue 12).
    /// Written under `cut_serial`.
    cut_seq_seen: std::sync::atomic::AtomicU64,
    previous_stop_clean: bool,
    /// (dev, ino) of disks moved out of the folder by [`Tracker::release`]:
    /// the FS refuses to change them (a cached dentry could still reach them).
    released: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// Disks just taken in by [`Tracker::take`]: their seeded state is
    /// trusted whatever the previous stop was.
    taken: Mutex<std::collections::HashSet<String>>,
    /// (dev, ino) of disks taken in by [`Tracker::take`] and not opened
    /// since: the kernel may still cache pages of the same file from
    /// before it left the folder (a failback brings back the same inode,
    /// changed in the store), so its next open must drop them
    /// ([`Tracker::drop_cached_pages`]).
    stale_pages: Mutex<std::collections::HashSet<(u64, u64)>>,
}

/// Where a disk's activity log lives (relative to the folder root).
fn activity_rel(folder: &str) -> PathBuf {
    Path::new(STATE_DIR)
        .join("disks")
        .join(folder)
        .join(activity::FILE)
}

fn state_cpath(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn io_state(path: &Path, source: io::Error) -> TrackError {
    TrackError::State {
        path: path.to_path_buf(),
        source,
    }
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Case-insensitive glob match of `*` and `?` against a file name.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let n: Vec<char> = name.to_lowercase().chars().collect();
    let (mut pi, mut ni, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The state folder (under `.vdrep/disks/`) of disk `rel` with identity `id`.
pub fn folder_name(rel: &str, id: &[u8; 16]) -> String {
    let base: String = rel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = base.trim_start_matches('.');
    let base: String = base.chars().take(80).collect();
    format!("{base}-{}", &hex(id)[..8])
}

/// Reopen an fd's file read-only through /proc (never through the mount).
fn reopen_ro(file: &File) -> io::Result<File> {
    sys::reopen(file.as_raw_fd(), libc::O_RDONLY)
}

impl Tracker {
    /// Load (or create) the tracking state of the folder whose pre-mount
    /// descriptor is `root`, and attach every disk image found below it.
    /// `root_path` is how users see the folder (the mount point).
    pub fn open(root: OwnedFd, root_path: &Path, config: TrackConfig) -> Result<Self, TrackError> {
        let bs = config.block_size;
        if !bs.is_power_of_two() || !(512..=(1 << 20)).contains(&bs) {
            return Err(TrackError::Config(format!(
                "block size {bs} must be a power of two between 512 and 1048576"
            )));
        }
        let state_path = root_path.join(STATE_DIR);
        let state = StateDir::open(root, root_path).map_err(|e| io_state(&state_path, e))?;
        let mm: Option<MountMeta> = state
            .read_json(Path::new("mount.json"))
            .map_err(|e| io_state(&state_path, e))?;
        let previous_stop_clean = mm.as_ref().is_none_or(|m| m.clean);
        let cut_seq = mm.as_ref().map_or(0, |m| m.cut_seq);
        let mut known = HashMap::new();
        for folder in state.disk_folders().map_err(|e| io_state(&state_path, e))? {
            let rel = PathBuf::from(format!("disks/{folder}/meta"));
            match state.read_meta(&folder) {
                Ok(Some(m)) if m.detached => {}
                Ok(Some(mut m)) => {
                    if !previous_stop_clean && m.state == TrackState::Normal {
                        let pid = mm.as_ref().map_or(0, |m| m.pid);
                        let logged = if config.activity_log {
                            Self::logged_extents(&state, &m.folder)
                        } else {
                            None
                        };
                        match logged {
                            Some(ext) => {
                                m.state = TrackState::ResyncRequired(format!(
                                    "the tracking daemon (pid {pid}) stopped uncleanly; its activity log names {} extent(s) ({} MiB): only those are compared",
                                    ext.len(),
                                    (ext.len() as u64) << (activity::EXTENT_SHIFT - 20)
                                ));
                                m.resync_scope = ResyncScope::Extents;
                            }
                            None if config.activity_log => m.require_full_resync(format!(
                                "the tracking daemon (pid {pid}) stopped uncleanly and the disk's activity log is missing or damaged: the whole disk is compared"
                            )),
                            None => m.require_full_resync(format!(
                                "the tracking daemon (pid {pid}) stopped uncleanly; its bitmap may be stale"
                            )),
                        }
                    }
                    known.insert(m.name.clone(), m);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("ignoring damaged disk state {}: {e}", rel.display()),
            }
        }
        // Mark the mount unclean before anything can change.
        let meta = MountMeta {
            clean: false,
            cut_seq,
            pid: std::process::id(),
            reserved: cut_seq,
        };
        state
            .write_json(Path::new("mount.json"), &meta)
            .map_err(|e| io_state(&state_path, e))?;
        let t = Tracker {
            shared: Arc::new(Shared {
                block_size: u64::from(bs),
                activity_ahead: u64::from(config.activity_ahead),
                activity_hot: u64::from(config.activity_hot),
                keep_budget: kept::Budget::new(config.keep_writes),
            }),
            config,
            state: Arc::new(state),
            #[cfg(test)]
            meta_copied: Mutex::new(None),
            root_path: root_path.to_path_buf(),
            disks: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            cut_seq_seen: std::sync::atomic::AtomicU64::new(meta.cut_seq),
            cut_serial: Mutex::new(meta),
            frozen: Mutex::new(None),
            previous_stop_clean,
            released: Mutex::new(Default::default()),
            stale_pages: Mutex::new(Default::default()),
            taken: Mutex::new(Default::default()),
        };
        // Persist the resync-required marks right away.
        for m in t.known.lock().values() {
            if m.state != TrackState::Normal {
                let _ = t.state.write_meta(m);
            }
        }
        t.scan().map_err(|e| io_state(root_path, e))?;
        Ok(t)
    }

    /// Was the previous mount of this folder stopped cleanly?
    pub fn previous_stop_clean(&self) -> bool {
        self.previous_stop_clean
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    fn is_disk_name(&self, rel: &Path) -> bool {
        if rel.components().next().map(|c| c.as_os_str()) == Some(STATE_DIR.as_ref()) {
            return false;
        }
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        self.config.patterns.iter().any(|p| glob_match(p, name))
    }

    /// Attach every disk image below the root (depth-limited walk).
    fn scan(&self) -> io::Result<()> {
        let mut stack = vec![(PathBuf::new(), 0u32)];
        while let Some((dir, depth)) = stack.pop() {
            let open_path = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir.clone()
            };
            let d = match self.state.openat(
                &open_path,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            ) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("cannot scan {}: {e}", dir.display());
                    continue;
                }
            };
            for name in state::list_dir(d)? {
                if depth == 0 && name == STATE_DIR {
                    continue;
                }
                let rel = dir.join(&name);
                let Ok(f) = self.state.openat(&rel, libc::O_PATH | libc::O_NOFOLLOW, 0) else {
                    continue;
                };
                let Ok(md) = f.metadata() else { continue };
                if md.is_dir() && depth < 8 {
                    stack.push((rel, depth + 1));
                } else if md.is_file() && self.is_disk_name(&rel) {
                    match self
                        .state
                        .openat(&rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                    {
                        Ok(f) => {
                            if let Err(e) = self.attach(&rel, &f) {
                                tracing::warn!("cannot track {}: {e}", rel.display());
                            }
                        }
                        Err(e) => tracing::warn!("cannot open {}: {e}", rel.display()),
                    }
                }
            }
        }
        Ok(())
    }

    /// The disk tracked at `rel` (path relative to the mount root, no leading
    /// `/`), attaching it on first use; `None` if `rel` is not a disk image.
    /// Call before any write, truncate or fallocate reaches a regular file.
    /// `file` is any open descriptor of the backing file.
    pub fn attach(&self, rel: &Path, file: &File) -> io::Result<Option<Arc<TrackedDisk>>> {
        if !self.is_disk_name(rel) {
            return Ok(None);
        }
        let key = rel.to_string_lossy().into_owned();
        let md = file.metadata()?;
        if !md.is_file() {
            return Ok(None);
        }
        let mut disks = self.disks.lock();
        if let Some(d) = disks.get(&key) {
            if d.ino == md.ino() && d.dev == md.dev() {
                return Ok(Some(d.clone()));
            }
            // Another file now lives at this path: the old disk is gone.
            if let Some(old) = disks.remove(&key) {
                self.save_detached(&old, "replaced by another file");
            }
        }
        let bs = self.shared.block_size;
        let reader = reopen_ro(file)?;
        let size = md.len();
        let known = self.known.lock().remove(&key);
        // Not `cut_serial`: a cut holds it and then takes `disks`, which
        // this holds (that order the other way round deadlocked an open
        // against a cut). A cut under way seals no disk attached now.
        let cut_seq = self.cut_seq_seen.load(SeqCst);
        let (meta, bitmap, trusted) = match known {
            Some(mut m) if m.block_size as u64 == bs => {
                let mut bm = None;
                let taken = self.taken.lock().remove(&key);
                // The saved bitmap is loaded whenever the previous stop was
                // clean and the file unchanged, also for a disk that needs
                // a resync: an interrupted resync resumes with it.
                if self.previous_stop_clean || taken {
                    let unchanged = m.ino == md.ino()
                        && m.shutdown_size == size
                        && m.shutdown_mtime_ns == md.mtime() * 1_000_000_000 + md.mtime_nsec();
                    if !unchanged {
                        m.require_full_resync("the disk changed while vdrep was not mounted");
                    } else {
                        let raw = self
                            .state
                            .read(&PathBuf::from(format!("disks/{}/bitmap", m.folder)))?;
                        match raw.and_then(|b| state::decode_bitmap(&b, m.block_size)) {
                            Some((nbits, words)) => bm = Bitmap::from_words(nbits, &words),
                            None => m.require_full_resync(
                                "the saved dirty bitmap is missing or damaged",
                            ),
                        }
                    }
                }
                let trusted = bm.is_some();
                (m, bm, trusted)
            }
            other => {
                if let Some(m) = other {
                    tracing::warn!(
                        "{key}: tracked before with block size {}, now {bs}; starting a new identity",
                        m.block_size
                    );
                }
                let id = random_id();
                let m = DiskMeta {
                    id: hex(&id),
                    name: key.clone(),
                    folder: folder_name(&key, &id),
                    block_size: bs as u32,
                    cycle: cut_seq,
                    size,
                    state: TrackState::Normal,
                    ino: md.ino(),
                    shutdown_size: 0,
                    shutdown_mtime_ns: 0,
                    detached: false,
                    bitmap_only: false,
                    resync_scope: ResyncScope::Full,
                };
                (m, None, true)
            }
        };
        self.state
            .mkdir(&Path::new(STATE_DIR).join("disks").join(&meta.folder))?;
        let nblocks = size.div_ceil(bs);
        let mut bitmap = bitmap.unwrap_or_default();
        bitmap.grow(nblocks);
        let id = unhex16(&meta.id).unwrap_or_else(random_id);
        let mut meta = meta;
        let al = self.open_activity(&mut meta, &key, &bitmap)?;
        let disk = Arc::new(TrackedDisk {
            shared: self.shared.clone(),
            cut_lock: Arc::new(RwLock::new(())),
            id,
            ino: md.ino(),
            dev: md.dev(),
            reader,
            dirty: RwLock::new(bitmap),
            sealing: Mutex::new(None),
            meta: Mutex::new(meta.clone()),
            full_copy_pending: false.into(),
            fenced: false.into(),
            bitmap_trusted: trusted.into(),
            log_limit: Mutex::new(None),
            // Logs sealed by an earlier process (a restart, a crash handover)
            // went out oldest first, so only the oldest
            // `LOGS_IN_FLIGHT_PER_DISK` can have reached the receiver
            // unacknowledged: the 50% rule keeps them, as this process's own
            // sessions mark theirs (`note_submitted`).
            submitted: {
                let logs = self.log_files_in(&meta.folder);
                let n = logs.len().min(LOGS_IN_FLIGHT_PER_DISK);
                logs.get(n.wrapping_sub(1)).map_or(0, |(c, _)| *c).into()
            },
            delivered: 0.into(),
            al,
            preimage: Mutex::new(self.open_preimage(&meta.folder, &key)),
            written: 0.into(),
            map_guard: RwLock::new(()),
            meta_save: Mutex::new(()),
            kept: kept::Kept::new(self.shared.keep_budget.clone()),
            last_seal_ns: 0.into(),
        });
        self.save_disk(&disk)?;
        tracing::info!(disk = %key, state = ?meta.state, cycle = meta.cycle, "tracking disk");
        if let Some(held) = self.frozen.lock().as_mut() {
            // Tracking is frozen for a handover: no change to this disk
            // either (the next worker gets the request again).
            held.push(disk.cut_lock.write_arc());
        }
        disks.insert(key, disk.clone());
        Ok(Some(disk))
    }

    /// The extents named by the activity log of the disk in state folder
    /// `folder`; `None` if it has none (or an unreadable one).
    fn logged_extents(state: &StateDir, folder: &str) -> Option<Vec<u64>> {
        let f = state
            .openat(&activity_rel(folder), libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .ok()?;
        ActivityLog::read_extents(&f).ok().flatten()
    }

    /// Open (or create) the activity log of a disk being attached, before
    /// any write of this daemon reaches it; the extents of a `loaded`
    /// bitmap (saved by a clean stop, or seeded) are recorded in it, so a
    /// later crash still finds them. With the activity log off, an old log
    /// is deleted and a disk waiting for an extents-only resync falls back
    /// to a full one (this daemon's writes would not be in the log).
    fn open_activity(
        &self,
        meta: &mut DiskMeta,
        key: &str,
        loaded: &Bitmap,
    ) -> io::Result<Option<ActivityLog>> {
        let rel = activity_rel(&meta.folder);
        // The resync-only map of earlier versions: the activity log does its job.
        let _ = self.state.remove_at_root(&rel.with_file_name("touched"));
        let scope_full = |meta: &mut DiskMeta, why: &str| {
            if meta.resync_scope == ResyncScope::Extents {
                if let TrackState::ResyncRequired(w) = &meta.state {
                    let w = format!("{w}; {why}: the whole disk is compared");
                    meta.require_full_resync(w);
                }
            }
        };
        if !self.config.activity_log {
            if let Err(e) = self.state.remove_at_root(&rel) {
                tracing::warn!(disk = %key, "cannot delete the activity log {}: {e}", rel.display());
            }
            scope_full(meta, "the activity log is off");
            return Ok(None);
        }
        let loaded_log = match self.state.openat(&rel, libc::O_RDWR | libc::O_NOFOLLOW, 0) {
            Ok(f) => ActivityLog::load(f).unwrap_or_else(|e| {
                tracing::warn!(disk = %key, "cannot read the activity log: {e}");
                None
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(disk = %key, "cannot open the activity log: {e}");
                None
            }
        };
        let al = match loaded_log {
            Some(al) => al,
            None => {
                // Missing or damaged: it cannot vouch for anything.
                scope_full(meta, "its activity log is missing or damaged");
                let tmp = rel.with_file_name(".al.tmp");
                let f = self.state.openat(
                    &tmp,
                    libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                    0o600,
                )?;
                let al = ActivityLog::create(f)?;
                let (ct, cf) = (state_cpath(&tmp)?, state_cpath(&rel)?);
                let fd = self.state.root_fd().as_raw_fd();
                sys::renameat(fd, &ct, fd, &cf)?;
                self.state
                    .fsync_dir(rel.parent().unwrap_or(Path::new(STATE_DIR)))?;
                al
            }
        };
        let bs = self.shared.block_size;
        let mut ext: Vec<u64> = loaded
            .runs(u64::MAX)
            .into_iter()
            .flat_map(|(s, n)| {
                let (f, l) = activity::extents_of(s * bs, (s + n) * bs - 1);
                f..=l
            })
            .collect();
        ext.dedup();
        al.record_extents(ext)?;
        Ok(Some(al))
    }

    /// Mark `d` detached (`why` in the log) and save its meta.
    fn save_detached(&self, d: &TrackedDisk, why: &str) {
        let _one = d.meta_save.lock();
        let m = d.detach(why);
        if let Err(e) = self.save_meta(&m) {
            tracing::warn!(disk = %m.name, "cannot record that the disk is gone: {e}");
        }
    }

    /// Save `d`'s meta as it is now. Saves of one disk go one at a time
    /// and each copies the meta once it is its turn, so the last save
    /// written is never older than the last change made (two callers that
    /// changed the meta in turn and saved at once could otherwise land the
    /// older copy last: a required resync missing from `meta.json`, lost if
    /// the daemon then dies; a clean stop or handover saves every meta from
    /// memory again).
    fn save_disk(&self, d: &TrackedDisk) -> io::Result<()> {
        let _one = d.meta_save.lock();
        let m = d.meta.lock().clone();
        #[cfg(test)]
        if let Some(hook) = self.meta_copied.lock().clone() {
            hook();
        }
        self.save_meta(&m)
    }

    /// Save `m` as its disk's meta ([`StateDir::write_meta`]): only for a
    /// disk that is not attached ([`Tracker::save_disk`] otherwise).
    fn save_meta(&self, m: &DiskMeta) -> io::Result<()> {
        self.state.write_meta(m)
    }

    /// A file (or directory) at `from` was renamed to `to` (relative paths).
    pub fn on_rename(&self, from: &Path, to: &Path) {
        let from_s = from.to_string_lossy().into_owned();
        let to_s = to.to_string_lossy().into_owned();
        let mut disks = self.disks.lock();
        // Whatever was at `to` has been replaced.
        if let Some(old) = disks.remove(&to_s) {
            self.save_detached(&old, "replaced by a rename");
        }
        for k in keys_at_or_below(&disks, &from_s) {
            if let Some(d) = disks.remove(&k) {
                let new_key = format!("{to_s}{}", &k[from_s.len()..]);
                if self.is_disk_name(Path::new(&new_key)) {
                    d.meta.lock().name = new_key.clone();
                    if let Err(e) = self.save_disk(&d) {
                        tracing::warn!("{new_key}: cannot record rename: {e}");
                    }
                    disks.insert(new_key, d);
                } else {
                    self.save_detached(&d, "renamed to a name that is not tracked");
                }
            }
        }
    }

    /// `a` and `b` were swapped (RENAME_EXCHANGE). Neither path holds the
    /// same disk any more: both (and any disks below them) are detached and
    /// start a new identity when next opened, which forces a full copy
    /// instead of applying logs to the wrong replica.
    pub fn on_exchange(&self, a: &Path, b: &Path) {
        let mut disks = self.disks.lock();
        for p in [a, b] {
            let ps = p.to_string_lossy().into_owned();
            for k in keys_at_or_below(&disks, &ps) {
                if let Some(d) = disks.remove(&k) {
                    self.save_detached(&d, "swapped with another file (RENAME_EXCHANGE)");
                }
            }
        }
    }

    /// The file at `rel` was unlinked.
    pub fn on_unlink(&self, rel: &Path) {
        let key = rel.to_string_lossy().into_owned();
        if let Some(d) = self.disks.lock().remove(&key) {
            self.save_detached(&d, "deleted");
        }
    }

    /// Seal the current cycle of every tracked disk at one instant and write
    /// one `.hrl` per disk. Disks needing a resync get no log (the entry says
    /// why). Call after flushing the kernel's write-back cache (the daemon
    /// does `syncfs` on the mount first).
    pub fn cut(&self) -> Result<CutReport, TrackError> {
        for name in self.disk_names() {
            self.enforce_log_limit(&name);
        }
        let sealed = self.seal(&CutSelect {
            skip_bitmap_only: true,
            ..CutSelect::default()
        })?;
        let mut entries = sealed.skipped;
        for sc in sealed.cycles {
            entries.push(self.write_log(sc));
        }
        entries.sort_by(|a, b| a.disk.cmp(&b.disk));
        Ok(CutReport {
            cycle: sealed.cycle,
            cut_unix_ns: sealed.cut_unix_ns,
            disks: entries,
        })
    }

    /// Seal the selected disks at one instant (their cut locks are held
    /// only to swap bitmaps; the mount's other disks are written
    /// meanwhile). Each returned [`SealedCycle`] must be handed back to
    /// [`Tracker::finish`] (or [`Tracker::write_log`]) once streamed.
    pub fn seal(&self, select: &CutSelect) -> Result<Sealed, TrackError> {
        let asked = std::time::Instant::now();
        let who = select
            .disks
            .as_ref()
            .and_then(|d| d.first())
            .map_or("mount", String::as_str);
        let chosen = |name: &String| {
            select
                .disks
                .as_ref()
                .is_none_or(|sel| sel.iter().any(|s| s == name))
        };
        // The disks to seal, in the order every cut takes their locks (by
        // id), so two cuts of overlapping sets never wait for each other in
        // a circle. A disk attached after this is not in this cut.
        let sealed_disks = in_lock_order(
            self.disks
                .lock()
                .iter()
                .filter(|(name, _)| chosen(name))
                .map(|(_, d)| d.clone())
                .collect(),
        );
        // The instant: no change to these disks is in flight, and none
        // starts until every one of them is sealed. Taken before
        // `cut_serial`, which other cuts hold only for their swap.
        let instant: Vec<_> = sealed_disks.iter().map(|d| d.cut_lock.write()).collect();
        crate::util::phase::done("cut_lock_wait", who, asked);
        hold_cut_for_test();
        let locked = std::time::Instant::now();
        let mut mm = self.cut_serial.lock();
        crate::util::phase::done("seal_wait", who, locked);
        let held = std::time::Instant::now();
        let cycle = mm.cut_seq + 1;
        let cut_ns = now_ns();
        let mut cycles = Vec::new();
        let mut skipped = Vec::new();
        {
            let disks = self.disks.lock();
            let mut names: Vec<&String> = disks.keys().filter(|n| chosen(n)).collect();
            names.sort();
            for name in names {
                if !sealed_disks.iter().any(|d| Arc::ptr_eq(d, &disks[name])) {
                    continue;
                }
                let d = &disks[name];
                let meta = d.meta.lock().clone();
                let skip = |kind: CutErrorKind, why: String| CutEntry {
                    disk: name.clone(),
                    cycle,
                    base_cycle: meta.cycle,
                    log: None,
                    dirty_blocks: d.dirty.read().count(),
                    log_bytes: 0,
                    error: Some(why),
                    kind: Some(kind),
                };
                let resync = select.resync.iter().any(|r| r == name);
                if let TrackState::ResyncRequired(why) = &meta.state {
                    if !resync {
                        skipped.push(skip(
                            CutErrorKind::ResyncRequired,
                            format!("resync required: {why}"),
                        ));
                        continue;
                    }
                }
                if meta.bitmap_only && select.skip_bitmap_only {
                    skipped.push(skip(
                        CutErrorKind::BitmapOnly,
                        "bitmap-only: pending changes passed the threshold; they will be shipped as one cycle when the receiver is reachable".into(),
                    ));
                    continue;
                }
                if d.sealing.lock().is_some() {
                    skipped.push(skip(
                        CutErrorKind::Busy,
                        "the previous cycle of this disk is still being written or shipped".into(),
                    ));
                    continue;
                }
                let size = match d.reader.metadata() {
                    Ok(m) => m.len(),
                    Err(e) => {
                        skipped.push(skip(CutErrorKind::Io, format!("cannot stat the disk: {e}")));
                        continue;
                    }
                };
                let bs = self.shared.block_size;
                let nblocks = size.div_ceil(bs);
                let sealed = std::mem::replace(&mut *d.dirty.write(), Bitmap::new(nblocks));
                // The running cycle's copies go with its bits; the next
                // cycle keeps copies if this disk is cut often.
                let now = kept::mono_ns();
                let before = d.last_seal_ns.swap(now, SeqCst);
                let keep_next = self.shared.keep_budget.limit() > 0
                    && before > 0
                    && now - before <= kept::KEEP_IF_CUT_WITHIN.as_nanos() as u64;
                let copies = d.kept.take(keep_next);
                let captured = Bitmap::new(nblocks);
                let copies = (!copies.is_empty()).then(|| {
                    let mut copies = copies;
                    let beyond: Vec<u64> = copies.blocks().filter(|&b| b >= nblocks).collect();
                    for b in beyond {
                        copies.remove(b);
                    }
                    for b in copies.blocks() {
                        captured.set_range(b, b);
                    }
                    copies
                });
                let full_from = select.full_from.get(name).copied();
                // What really changed, to give back if the cycle fails (the
                // artificial whole-disk range is the caller's to resume).
                let mut real_changes = None;
                if let Some(from) = full_from {
                    real_changes = Bitmap::from_words(sealed.len(), &sealed.to_words());
                    if from / bs < nblocks {
                        sealed.set_range(from / bs, nblocks - 1);
                    }
                }
                if let Some(extra) = select.extra.get(name) {
                    if real_changes.is_none() {
                        real_changes = Bitmap::from_words(sealed.len(), &sealed.to_words());
                    }
                    for &(first, n) in extra {
                        if n > 0 && first < nblocks {
                            sealed.set_range(first, (first + n - 1).min(nblocks - 1));
                        }
                    }
                }
                let s = Arc::new(Sealing {
                    dirty: sealed,
                    real_changes,
                    size,
                    state: Mutex::new(SealState {
                        captured,
                        kept: copies,
                        ..SealState::default()
                    }),
                });
                *d.sealing.lock() = Some(s.clone());
                cycles.push(SealedCycle {
                    header: HrlHeader {
                        disk_id: d.id,
                        disk_name: name.clone(),
                        cycle,
                        base_cycle: meta.cycle,
                        block_size: bs as u32,
                        base_size: meta.size,
                        disk_size: size,
                        cut_unix_ns: cut_ns,
                        app_consistent: false,
                    },
                    folder: meta.folder.clone(),
                    full_from,
                    resync,
                    disk: d.clone(),
                    sealing: s,
                });
            }
        }
        drop(instant);
        if cycle > mm.reserved {
            // Make this cycle number and the next CYCLE_RESERVE - 1 durable
            // at once.
            let mut saved = mm.durable();
            saved.cut_seq = cycle + CYCLE_RESERVE - 1;
            if let Err(e) = self.state.write_json(Path::new("mount.json"), &saved) {
                // The cycle number is not durable, so no log may use it:
                // undo the cut (every sealed bit back into its live
                // bitmap), or the disks would stay "still being written"
                // until a restart.
                drop(mm);
                for sc in cycles {
                    let _ = self.finish(sc, false);
                }
                return Err(io_state(&self.root_path.join(STATE_DIR), e));
            }
            mm.reserved = saved.cut_seq;
        }
        mm.cut_seq = cycle;
        self.cut_seq_seen.store(cycle, SeqCst);
        crate::util::phase::done("seal_hold", who, held);
        Ok(Sealed {
            cycle,
            cut_unix_ns: cut_ns,
            cycles,
            skipped,
        })
    }

    /// Record the outcome of a sealed cycle. On success the disk's base moves
    /// to this cycle; on failure every sealed bit goes back into the live
    /// bitmap so the next cycle (same base) still carries all changes.
    pub fn finish(&self, sc: SealedCycle, ok: bool) -> Result<(), TrackError> {
        let d = &sc.disk;
        if !ok {
            *d.sealing.lock() = None;
        }
        if ok {
            // The live bitmap started empty at this cut: it holds every
            // write since.
            d.bitmap_trusted
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let was_resync = d
            .full_copy_pending
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if !ok && was_resync {
            d.meta
                .lock()
                .require_full_resync("an earlier full copy did not finish");
            let _ = self.save_disk(d);
        }
        if !ok {
            let give_back = sc
                .sealing
                .real_changes
                .as_ref()
                .unwrap_or(&sc.sealing.dirty);
            d.dirty.write().merge_from(give_back);
            return Ok(());
        }
        {
            let mut m = d.meta.lock();
            m.cycle = sc.header.cycle;
            m.size = sc.header.disk_size;
            if sc.resync {
                if let TrackState::ResyncRequired(why) = &m.state {
                    tracing::info!(disk = %m.name, "resync done ({why} no longer applies)");
                }
                m.state = TrackState::Normal;
                m.resync_scope = ResyncScope::Full;
            }
        }
        let saved = self
            .save_disk(d)
            .map_err(|e| io_state(&self.root_path.join(STATE_DIR), e));
        // Only now may the disk be sealed again: a cut before would take
        // the previous cycle as its base, and its own meta could be saved
        // before this one (older over newer).
        *d.sealing.lock() = None;
        // The cycle's blocks are durable (its log, or the replica): the
        // extents written only before its cut leave the activity log. Not
        // before the state says the resync is over: an extents-only resync
        // must find its extents again after a crash.
        if saved.is_ok() {
            let changed = sc
                .sealing
                .real_changes
                .as_ref()
                .unwrap_or(&sc.sealing.dirty);
            d.prune_activity(changed);
        }
        saved
    }

    /// Write a sealed cycle as a `.hrl` in the disk's state folder.
    pub fn write_log(&self, sc: SealedCycle) -> CutEntry {
        let started = std::time::Instant::now();
        let rel = StateDir::log_rel(&sc.folder, sc.header.cycle);
        let shown = self.root_path.join(&rel);
        let real = self.private(&rel);
        let dirty_blocks = sc.dirty_blocks();
        let mut entry = CutEntry {
            disk: sc.header.disk_name.clone(),
            cycle: sc.header.cycle,
            base_cycle: sc.header.base_cycle,
            log: None,
            dirty_blocks,
            log_bytes: 0,
            error: None,
            kind: None,
        };
        let failed = |doing: &'static str| {
            let path = shown.clone();
            move |source: crate::hrl::HrlError| {
                StreamError::sink(LogWriteError {
                    doing,
                    path,
                    source,
                })
            }
        };
        let result = (|| -> Result<u64, StreamError> {
            let mut w = HrlWriter::create(&real, &sc.header).map_err(failed("cannot create"))?;
            sc.stream(0, &mut |off, data| {
                w.append(off, data).map_err(failed("writing"))
            })?;
            let sum = w.finish().map_err(failed("sealing"))?;
            Ok(sum.file_bytes)
        })();
        match result {
            Ok(bytes) => {
                crate::util::phase::done("write_log", &entry.disk, started);
                entry.log = Some(shown);
                entry.log_bytes = bytes;
                if let Err(e) = self.finish(sc, true) {
                    entry.error = Some(format!("log written but state not saved: {e}"));
                    entry.kind = Some(CutErrorKind::StateNotSaved);
                }
            }
            Err(e) => {
                tracing::error!(disk = %entry.disk, "cut {}: {e}; changes kept for the next cut", entry.cycle);
                entry.error = Some(format!("{e}; changes kept for the next cut"));
                entry.kind = Some(CutErrorKind::Io);
                let _ = self.finish(sc, false);
            }
        }
        entry
    }

    /// Sealed logs of `disk` still in its state folder, oldest first:
    /// `(cycle, path relative to the folder root)`.
    fn log_files(&self, disk: &str) -> Vec<(u64, PathBuf)> {
        let folder = match self.disks.lock().get(disk) {
            Some(d) => d.meta.lock().folder.clone(),
            None => return Vec::new(),
        };
        self.log_files_in(&folder)
    }

    /// Sealed logs in state folder `folder`, oldest first (see
    /// [`Tracker::log_files`]).
    fn log_files_in(&self, folder: &str) -> Vec<(u64, PathBuf)> {
        let dir = Path::new(STATE_DIR).join("disks").join(folder);
        let Ok(d) = self
            .state
            .openat(&dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        else {
            return Vec::new();
        };
        let mut v: Vec<(u64, PathBuf)> = state::list_dir(d)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| {
                let c = n.strip_suffix(".hrl")?.parse::<u64>().ok()?;
                Some((c, dir.join(n)))
            })
            .collect();
        v.sort();
        v
    }

    /// Cycles of the sealed logs of `disk` not shipped yet, oldest first.
    pub fn pending_cycles(&self, disk: &str) -> Vec<u64> {
        self.log_files(disk).into_iter().map(|(c, _)| c).collect()
    }

    /// The sealed log of `disk` for `cycle`, opened once (see
    /// [`SealedLog`]). A log whose header is damaged is still returned:
    /// [`SealedLog::header`] says why.
    pub fn sealed_log(&self, disk: &str, cycle: u64) -> Result<SealedLog, TrackError> {
        let folder = self
            .disks
            .lock()
            .get(disk)
            .map(|d| d.meta.lock().folder.clone())
            .ok_or_else(|| TrackError::Refused(format!("{disk} is not tracked")))?;
        let rel = StateDir::log_rel(&folder, cycle);
        let shown = self.root_path.join(&rel);
        SealedLog::open(&self.state, disk, cycle, rel, shown.clone())
            .map_err(|e| TrackError::io(format!("opening {}", shown.display()), e))
    }

    /// Delete the sealed logs of `disk` up to `upto` (all if `None`): the
    /// receiver has them already, or a whole-disk copy or resync replaces
    /// them.
    pub fn discard_logs(&self, disk: &str, upto: Option<u64>) {
        for (c, rel) in self.log_files(disk) {
            if upto.is_none_or(|u| c <= u) {
                if let Err(e) = self.state.remove_at_root(&rel) {
                    tracing::warn!(disk = %disk, "cannot delete the superseded log {}: {e}", self.root_path.join(&rel).display());
                }
            }
        }
    }

    /// A path below the folder as the daemon itself must open it (through
    /// the pre-mount descriptor, never through the mount).
    fn private(&self, rel_to_root: &Path) -> PathBuf {
        sys::proc_fd_path(self.state.root_fd().as_raw_fd(), rel_to_root)
    }

    /// A file in the state folder, as the daemon opens it (not through the mount).
    pub fn state_file(&self, name: &str) -> PathBuf {
        self.private(&Path::new(STATE_DIR).join(name))
    }

    /// The cycle the disk's next log will start from.
    pub fn disk_base_cycle(&self, name: &str) -> Option<u64> {
        Some(self.disks.lock().get(name)?.meta.lock().cycle)
    }

    /// Like [`Tracker::seal`], for whole-disk copies: a disk that needs a
    /// resync is sealed too when its copy starts at offset 0 (a full copy is
    /// a resync), and returns to Normal once that copy is finished.
    pub fn seal_for_copy(&self, select: &CutSelect) -> Result<Sealed, TrackError> {
        {
            let disks = self.disks.lock();
            for (name, from) in &select.full_from {
                if *from == 0 {
                    if let Some(d) = disks.get(name) {
                        let mut m = d.meta.lock();
                        if let TrackState::ResyncRequired(why) = &m.state {
                            tracing::info!(disk = %name, "full copy replaces the resync ({why})");
                            m.state = TrackState::Normal;
                            m.resync_scope = ResyncScope::Full;
                            d.full_copy_pending
                                .store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        self.seal(select)
    }

    /// Create the log of a sealed cycle with another header than the
    /// cycle's own (a resync's log: its base is the replica's cycle); the
    /// caller writes its records. It becomes a pending log like any other.
    pub fn create_log(
        &self,
        sc: &SealedCycle,
        header: &HrlHeader,
    ) -> Result<HrlWriter, crate::hrl::HrlError> {
        HrlWriter::create(
            &self.private(&StateDir::log_rel(&sc.folder, sc.header.cycle)),
            header,
        )
    }

    /// Delete the log of a sealed cycle (it could not be announced).
    pub fn discard_log(&self, sc: &SealedCycle) {
        let rel = StateDir::log_rel(&sc.folder, sc.header.cycle);
        if let Err(e) = self.state.remove_at_root(&rel) {
            tracing::warn!(disk = %sc.header.disk_name, "cannot delete {}: {e}", self.root_path.join(&rel).display());
        }
    }

    /// Epoch of the activity log of `name` ([`activity`]); `None` without
    /// one. While it stays the same, the log holds every extent written
    /// since the cut of any cycle of the disk that was sealed (and not yet
    /// finished) when it was read: what a resync interrupted by a crash
    /// needs to resume.
    pub fn activity_epoch(&self, name: &str) -> Option<u64> {
        let d = self.disks.lock().get(name).cloned()?;
        let e = d.al.as_ref().map(|a| a.epoch());
        e
    }

    /// Block runs `(first, count)` of the extents in the activity log of
    /// `name` (empty without one).
    pub fn activity_runs(&self, name: &str) -> Vec<(u64, u64)> {
        let Some(d) = self.disks.lock().get(name).cloned() else {
            return Vec::new();
        };
        let r =
            d.al.as_ref()
                .map(|a| a.block_runs(self.shared.block_size))
                .unwrap_or_default();
        r
    }

    /// For a disk that needs an extents-only resync
    /// ([`ResyncScope::Extents`]): the block runs to compare, namely its
    /// activity log's extents and the blocks of its sealed logs not shipped
    /// yet (the resync replaces them). `None`: the disk needs a full resync
    /// (or none), or a sealed log cannot be read (its blocks are unknown).
    pub fn resync_extents(&self, name: &str) -> Option<Vec<(u64, u64)>> {
        let d = self.disks.lock().get(name).cloned()?;
        {
            let m = d.meta.lock();
            if !matches!(m.state, TrackState::ResyncRequired(_))
                || m.resync_scope != ResyncScope::Extents
            {
                return None;
            }
        }
        let mut runs = d.al.as_ref()?.block_runs(self.shared.block_size);
        for (_, rel) in self.log_files(name) {
            let shown = self.root_path.join(&rel);
            let read = (|| -> Result<Vec<(u64, u64)>, crate::hrl::HrlError> {
                let mut r = crate::hrl::HrlReader::open(&self.private(&rel))?;
                let mut v = Vec::new();
                while let Some(rec) = r.next_record()? {
                    if rec.length > 0 {
                        let (f, l) = d.span(rec.offset, u64::from(rec.length));
                        v.push((f, l - f + 1));
                    }
                }
                Ok(v)
            })();
            match read {
                Ok(v) => runs.extend(v),
                Err(e) => {
                    tracing::warn!(disk = %name, "sealed log {} is damaged ({e}): the whole disk is compared", shown.display());
                    return None;
                }
            }
        }
        runs.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (f, n) in runs {
            match out.last_mut() {
                Some((s, c)) if f <= *s + *c => *c = (*c).max(f + n - *s),
                _ => out.push((f, n)),
            }
        }
        Some(out)
    }

    /// Does the disk's live bitmap hold every write since its last cut?
    /// (False after an unclean stop or a lost bitmap.)
    pub fn bitmap_trusted(&self, name: &str) -> bool {
        self.disks
            .lock()
            .get(name)
            .is_some_and(|d| d.bitmap_trusted.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Mark a disk "resync required" (a damaged log, a diverged chain).
    pub fn require_resync(&self, name: &str, why: &str) {
        let Some(d) = self.disks.lock().get(name).cloned() else {
            return;
        };
        d.meta.lock().require_full_resync(why);
        tracing::warn!(disk = %name, "resync required: {why}");
        if let Err(e) = self.save_disk(&d) {
            tracing::error!(disk = %name, "cannot save that the disk needs a resync: {e}");
        }
    }

    /// Pending changes of a disk above `limit` bytes (sealed logs + dirty
    /// blocks) switch it to bitmap-only (None: no limit).
    pub fn set_log_limit(&self, name: &str, limit: Option<u64>) {
        if let Some(d) = self.disks.lock().get(name) {
            *d.log_limit.lock() = limit;
        }
    }

    /// Is the disk bitmap-only?
    pub fn bitmap_only(&self, name: &str) -> bool {
        self.disks
            .lock()
            .get(name)
            .is_some_and(|d| d.meta.lock().bitmap_only)
    }

    /// Bytes of sealed logs of the disk the receiver does not hold yet
    /// (logs it stored durably, [`Tracker::note_delivered`], are not
    /// counted, though kept until applied).
    pub fn pending_log_bytes(&self, name: &str) -> u64 {
        let delivered = self.delivered(name);
        self.log_files(name)
            .iter()
            .filter(|(c, _)| *c > delivered)
            .filter_map(|(_, rel)| std::fs::metadata(self.private(rel)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// A session submitted the disk's log of `cycle` to a receiver: from
    /// now on the receiver may hold it (applied, its acknowledgement lost
    /// with the connection), so [`Tracker::enforce_log_limit`] keeps it.
    /// The mark is in memory; a disk attached with logs left by an earlier
    /// process starts marked at its oldest [`LOGS_IN_FLIGHT_PER_DISK`]
    /// (all that process can have had in flight).
    pub fn note_submitted(&self, name: &str, cycle: u64) {
        if let Some(d) = self.disks.lock().get(name) {
            d.submitted
                .fetch_max(cycle, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The receiver holds the disk's logs up to `cycle` durably (its point
    /// may be committed; the apply is still to come): they are kept until
    /// applied, so that they can be sent again, but no longer count as
    /// pending ([`Tracker::pending_log_bytes`]). In memory, for this
    /// connection: [`Tracker::forget_delivered`] when a session opens the
    /// disk again (the receiver then says where its replica is).
    pub fn note_delivered(&self, name: &str, cycle: u64) {
        if let Some(d) = self.disks.lock().get(name) {
            d.delivered
                .fetch_max(cycle, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Forget what [`Tracker::note_delivered`] recorded for the disk.
    pub fn forget_delivered(&self, name: &str) {
        if let Some(d) = self.disks.lock().get(name) {
            d.delivered.store(0, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The newest cycle whose log the receiver holds durably, as far as
    /// [`Tracker::note_delivered`] heard (0: none).
    pub fn delivered(&self, name: &str) -> u64 {
        self.disks
            .lock()
            .get(name)
            .map_or(0, |d| d.delivered.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The 50% rule: if the disk's pending changes passed its limit, fold
    /// its sealed logs back into the bitmap (their blocks become dirty
    /// again and the disk's base goes back to the cycle before the first
    /// folded log), delete them and mark the disk bitmap-only: no more logs
    /// for it until the sender ships everything as one cycle. Returns what
    /// was done.
    ///
    /// Logs a session already submitted ([`Tracker::note_submitted`]) are
    /// kept and the fold starts after them: the receiver may have applied
    /// them without the sender hearing of it (a receiver killed after the
    /// apply, before the ack). Folding those too put the sender's base
    /// behind the replica and cost a checksum resync of the whole disk
    /// after every such blip (`kernel-notes/replication-speed.md`, s9).
    pub fn enforce_log_limit(&self, name: &str) -> Option<String> {
        let d = self.disks.lock().get(name).cloned()?;
        let limit = (*d.log_limit.lock())?;
        if d.meta.lock().bitmap_only {
            return None;
        }
        let pending =
            self.pending_log_bytes(name) + d.dirty.read().count() * self.shared.block_size;
        if pending <= limit {
            return None;
        }
        // No cut may run meanwhile (it would seal or write logs).
        let _serial = self.cut_serial.lock();
        if d.sealing.lock().is_some() {
            return None; // a cycle is being written or shipped: next time
        }
        let sent = d.submitted.load(std::sync::atomic::Ordering::SeqCst);
        let (kept, logs): (Vec<_>, Vec<_>) = self
            .log_files(name)
            .into_iter()
            .partition(|(c, _)| *c <= sent);
        // The base after the fold: the newest kept log's cycle (and the
        // disk's size at it), else the base of the first folded log.
        let mut base: Option<(u64, u64)> = None;
        let mut folded: Vec<(u64, u64)> = Vec::new();
        let mut damaged = None;
        if let Some((_, rel)) = kept.last() {
            match crate::hrl::HrlReader::open(&self.private(rel)) {
                Ok(r) => base = Some((r.header().cycle, r.header().disk_size)),
                Err(e) => damaged = Some((rel, e.to_string())),
            }
        }
        for (_, rel) in logs.iter().filter(|_| damaged.is_none()) {
            let why = 'read: {
                let mut r = match crate::hrl::HrlReader::open(&self.private(rel)) {
                    Ok(r) => r,
                    Err(e) => break 'read Some(e.to_string()),
                };
                if base.is_none() {
                    base = Some((r.header().base_cycle, r.header().base_size));
                }
                loop {
                    match r.next_record() {
                        Ok(Some(rec)) => {
                            if rec.length > 0 {
                                let (f, l) = d.span(rec.offset, u64::from(rec.length));
                                d.mark(f, l);
                                folded.push((f, l));
                            }
                        }
                        Ok(None) => break 'read None,
                        Err(e) => break 'read Some(e.to_string()),
                    }
                }
            };
            if let Some(e) = why {
                damaged = Some((rel, e));
                break;
            }
        }
        if let Some((rel, e)) = damaged {
            // Its blocks cannot be recovered: only a resync helps.
            drop(_serial);
            let shown = self.root_path.join(rel);
            self.require_resync(
                name,
                &format!("sealed log {} is damaged: {e}", shown.display()),
            );
            return Some("a pending log is damaged: resync required".into());
        }
        // The logs' blocks are only in the live bitmap from now on: their
        // extents go back into the activity log before the logs are deleted.
        if let Some(al) = &d.al {
            let bs = self.shared.block_size;
            let ext = folded.iter().flat_map(|&(f, l)| {
                let (a, b) = activity::extents_of(f * bs, l * bs + bs - 1);
                a..=b
            });
            if let Err(e) = al.record_extents(ext) {
                tracing::error!(disk = %name, "cannot record the folded logs in the activity log: {e}; they are kept");
                return None;
            }
        }
        {
            let mut m = d.meta.lock();
            if let Some((c, size)) = base {
                m.cycle = c;
                m.size = size;
            }
            m.bitmap_only = true;
        }
        if let Err(e) = self.save_disk(&d) {
            tracing::error!(disk = %name, "cannot save the bitmap-only state: {e}");
        }
        for (_, rel) in &logs {
            let _ = self.state.remove_at_root(rel);
        }
        let what = format!(
            "{} MiB pending passed the limit of {} MiB: bitmap-only now ({} log(s) folded into the bitmap, {} already sent kept); the changes will be shipped as one cycle",
            pending >> 20,
            limit >> 20,
            logs.len(),
            kept.len()
        );
        tracing::warn!(disk = %name, "{what}");
        Some(what)
    }

    /// The disk's changes were shipped: back to writing logs.
    pub fn clear_bitmap_only(&self, name: &str) {
        let Some(d) = self.disks.lock().get(name).cloned() else {
            return;
        };
        {
            let mut m = d.meta.lock();
            if !m.bitmap_only {
                return;
            }
            m.bitmap_only = false;
        }
        tracing::info!(disk = %name, "changes shipped: back to Normal (logs again)");
        let _ = self.save_disk(&d);
    }

    /// Names of the tracked disks.
    /// Fence (`on`) or unfence the named disks: while fenced, every write,
    /// truncate or fallocate of them fails with `EROFS`, so nothing can
    /// change after the last cycle of a planned failover. Returns the names
    /// that are not tracked disks.
    pub fn fence(&self, names: &[String], on: bool) -> Vec<String> {
        let disks = self.disks.lock();
        let mut missing = Vec::new();
        for n in names {
            match disks.get(n) {
                Some(d) => d.fenced.store(on, std::sync::atomic::Ordering::SeqCst),
                None => missing.push(n.clone()),
            }
        }
        missing
    }

    /// Was the file `file` moved out of the folder by [`Tracker::release`]?
    pub fn is_released(&self, file: &File) -> bool {
        file.metadata()
            .is_ok_and(|m| self.released.lock().contains(&(m.dev(), m.ino())))
    }

    /// Whether an open of `file` must drop the kernel's cached pages of it
    /// (no `FOPEN_KEEP_CACHE`): true once after [`Tracker::take`] brought
    /// the file back into the folder, changed behind the kernel.
    pub fn drop_cached_pages(&self, file: &File) -> bool {
        let mut stale = self.stale_pages.lock();
        if stale.is_empty() {
            return false;
        }
        file.metadata()
            .is_ok_and(|m| stale.remove(&(m.dev(), m.ino())))
    }

    /// Move the named disks (one VM's, fenced, closed) out of the folder
    /// into the folder `to` (same file system; created if missing) and stop
    /// tracking them; the other disks of the folder are untouched. Returns
    /// (name, new path) per disk. Nothing moves unless every disk can.
    pub fn release(
        &self,
        names: &[String],
        to: &Path,
    ) -> Result<Vec<(String, PathBuf)>, TrackError> {
        let mut disks = self.disks.lock();
        let mut plan = Vec::new();
        for n in names {
            let d = disks.get(n).ok_or_else(|| {
                TrackError::Refused(format!(
                    "{n} is not a tracked disk of {}",
                    self.root_path.display()
                ))
            })?;
            if !d.is_fenced() {
                return Err(TrackError::Refused(format!(
                    "{n} is not fenced: fence its VM first"
                )));
            }
            // The map holds one reference; an open handle holds another.
            if Arc::strong_count(d) > 1 {
                return Err(TrackError::Refused(format!(
                    "{n} is still open (is the VM running?): shut the VM down, then retry"
                )));
            }
            let file = Path::new(n)
                .file_name()
                .ok_or_else(|| TrackError::Refused(format!("{n}: no file name")))?;
            let dst = to.join(file);
            if dst.exists() || plan.iter().any(|(_, p)| p == &dst) {
                return Err(TrackError::Refused(format!(
                    "{} already exists: move it away (vdrep never overwrites a disk)",
                    dst.display()
                )));
            }
            plan.push((n.clone(), dst));
        }
        std::fs::create_dir_all(to)
            .map_err(|e| TrackError::io(format!("creating {}", to.display()), e))?;
        let mut done = Vec::new();
        for (n, dst) in plan {
            let (Ok(cs), Ok(cd)) = (state_cpath(Path::new(&n)), state_cpath(&dst)) else {
                return Err(TrackError::Refused(format!("{n}: path with a NUL byte")));
            };
            if let Err(e) =
                sys::renameat(self.state.root_fd().as_raw_fd(), &cs, libc::AT_FDCWD, &cd)
            {
                let hint = if e.raw_os_error() == Some(libc::EXDEV) {
                    " (the store must be on the folder's file system)"
                } else {
                    ""
                };
                return Err(TrackError::Io {
                    what: format!("moving {n} to {}", dst.display()),
                    source: e,
                    note: format!("{hint}; moved so far: {done:?}"),
                });
            }
            if let Some(d) = disks.remove(&n) {
                self.released.lock().insert((d.dev, d.ino));
                self.save_detached(&d, "moved out of the folder (failover)");
            }
            done.push((n, dst));
        }
        let _ = self.state.fsync_dir(Path::new("."));
        if let Some(p) = to.to_str() {
            let _ = File::open(p).and_then(|f| f.sync_all());
        }
        Ok(done)
    }

    /// Move the file `from` (same file system) into the folder as the disk
    /// `rel` with identity `id`, tracked from `cycle` (the cycle the other
    /// site's replica holds): the next log chains on it, so only changes
    /// travel. Refuses to overwrite anything.
    pub fn take(&self, from: &Path, rel: &str, id: [u8; 16], cycle: u64) -> Result<(), TrackError> {
        let relp = Path::new(rel);
        if !self.is_disk_name(relp) || relp.is_absolute() || rel.split('/').any(|c| c == "..") {
            return Err(TrackError::Refused(format!(
                "{rel} is not a disk name this mount tracks"
            )));
        }
        if self.disks.lock().contains_key(rel)
            || self
                .state
                .openat(relp, libc::O_PATH | libc::O_NOFOLLOW, 0)
                .is_ok()
        {
            return Err(TrackError::Refused(format!(
                "{} already exists: move it away (vdrep never overwrites a disk)",
                self.root_path.join(rel).display()
            )));
        }
        let bs = self.shared.block_size;
        let folder = folder_name(rel, &id);
        let sdir = Path::new(STATE_DIR).join("disks").join(&folder);
        let serr =
            |e: io::Error| TrackError::io(self.root_path.join(&sdir).display().to_string(), e);
        self.state.mkdir(&sdir).map_err(serr)?;
        if let Ok(d) = self
            .state
            .openat(&sdir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        {
            for n in state::list_dir(d).unwrap_or_default() {
                if n.ends_with(".hrl") || n == "bitmap" || n == preimage::FILE {
                    let _ = self
                        .state
                        .remove(&PathBuf::from(format!("disks/{folder}/{n}")));
                }
            }
        }
        let (Ok(cs), Ok(cd)) = (state_cpath(from), state_cpath(relp)) else {
            return Err(TrackError::Refused(format!("{rel}: path with a NUL byte")));
        };
        sys::renameat(libc::AT_FDCWD, &cs, self.state.root_fd().as_raw_fd(), &cd).map_err(|e| {
            TrackError::io(
                format!(
                    "moving {} into {}",
                    from.display(),
                    self.root_path.join(rel).display()
                ),
                e,
            )
        })?;
        let _ = self.state.fsync_dir(
            relp.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        );
        let f = self
            .state
            .openat(relp, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .map_err(|e| TrackError::io(rel, e))?;
        let md = f.metadata().map_err(|e| TrackError::io(rel, e))?;
        let nbits = md.len().div_ceil(bs);
        self.state
            .write_atomic(
                &PathBuf::from(format!("disks/{folder}/bitmap")),
                &state::encode_bitmap(bs as u32, nbits, &vec![0u64; nbits.div_ceil(64) as usize]),
            )
            .map_err(serr)?;
        let m = DiskMeta::clean(hex(&id), rel.to_string(), folder, bs as u32, cycle, &md);
        self.save_meta(&m).map_err(serr)?;
        {
            let mut mm = self.cut_serial.lock();
            if mm.cut_seq < cycle {
                mm.cut_seq = cycle;
                self.cut_seq_seen.store(cycle, SeqCst);
                self.state
                    .write_json(Path::new("mount.json"), &mm.durable())
                    .map_err(serr)?;
            }
        }
        self.released.lock().remove(&(md.dev(), md.ino()));
        self.stale_pages.lock().insert((md.dev(), md.ino()));
        self.known.lock().insert(rel.to_string(), m);
        self.taken.lock().insert(rel.to_string());
        self.attach(relp, &f)
            .map_err(|e| TrackError::io(format!("tracking {rel}"), e))?;
        tracing::info!(disk = %rel, cycle, "disk taken into the folder (failover)");
        Ok(())
    }

    /// The armed pre-image journal of the disk in state folder `folder`.
    fn open_preimage(&self, folder: &str, name: &str) -> Option<preimage::Journal> {
        let rel = Path::new(STATE_DIR)
            .join("disks")
            .join(folder)
            .join(preimage::FILE);
        let f = match self.state.openat(&rel, libc::O_RDWR | libc::O_NOFOLLOW, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::error!(disk = %name, "cannot open the pre-image journal: {e}; a cancel of the failover will be refused");
                return None;
            }
        };
        match preimage::Journal::open(f, self.shared.block_size) {
            Ok(j) => {
                tracing::info!(disk = %name, saved_bytes = j.bytes, "pre-image journal armed (the failover can be cancelled)");
                Some(j)
            }
            Err(e) => {
                tracing::error!(disk = %name, "damaged pre-image journal: {e}; a cancel of the failover will be refused");
                None
            }
        }
    }

    /// Stop saving pre-images of the named disks and delete their journals
    /// (the failover was committed). Returns the names not tracked.
    pub fn drop_preimages(&self, names: &[String]) -> Vec<String> {
        let disks = self.disks.lock();
        let mut missing = Vec::new();
        for n in names {
            match disks.get(n) {
                Some(d) => {
                    *d.preimage.lock() = None;
                    let folder = d.meta.lock().folder.clone();
                    let _ = self
                        .state
                        .remove(&PathBuf::from(format!("disks/{folder}/{}", preimage::FILE)));
                }
                None => missing.push(n.clone()),
            }
        }
        missing
    }

    /// The tracking block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.shared.block_size as u32
    }

    pub fn disk_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.disks.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// The tracked disk whose id is `id`: one of `prefer` (a VM's own
    /// disks, looked up by name) if it is there, else the first by name of
    /// all. No `stat`, no lock of any meta: a sender asks this for every
    /// acknowledgement, and with 256 VMs a scan of every disk's
    /// [`disk_info`](Self::disk_info) (a `statx` each) was a fifth of the
    /// mount daemon's CPU (kernel-notes/replication-speed.md, session 28).
    pub fn disk_with_id(&self, prefer: &[String], id: &[u8; 16]) -> Option<String> {
        let disks = self.disks.lock();
        let is = |d: &Arc<TrackedDisk>| d.id == *id;
        if let Some(n) = prefer.iter().find(|n| disks.get(*n).is_some_and(is)) {
            return Some(n.clone());
        }
        disks
            .iter()
            .filter(|(_, d)| is(d))
            .map(|(n, _)| n)
            .min()
            .cloned()
    }

    /// Identity of a tracked disk (id, size, block size, state).
    pub fn disk_info(&self, name: &str) -> Option<(String, u64, u32, TrackState)> {
        let disks = self.disks.lock();
        let d = disks.get(name)?;
        let m = d.meta.lock();
        let size = d.reader.metadata().map(|x| x.len()).unwrap_or(m.size);
        Some((m.id.clone(), size, m.block_size, m.state.clone()))
    }

    /// Blocks written since the last cut on these disks (what a
    /// continuous sender asks before every cycle: no stat, no cut lock).
    pub fn dirty_blocks_of(&self, names: &[String]) -> u64 {
        let disks = self.disks.lock();
        names
            .iter()
            .filter_map(|n| disks.get(n))
            .map(|d| d.dirty.read().count())
            .sum()
    }

    /// The newest cut's cycle, waiting for a cut in progress: every write
    /// acknowledged before this call is in a cycle above the value returned
    /// (`vdrep sync`'s "a point sealed after this moment"). [`Tracker::status`]
    /// does not wait and may still show the cycle before a cut whose seal
    /// already happened.
    pub fn cut_seq_settled(&self) -> u64 {
        self.cut_serial.lock().cut_seq
    }

    /// Returns once no cut (or shutdown) holds the cut serialisation: a
    /// liveness check's proof that cuts are not stuck ([`Tracker::status`]
    /// no longer waits for them).
    pub fn wait_for_cuts(&self) {
        drop(self.cut_serial.lock());
    }

    /// Never waits for a cut in progress (which holds the cut lock across
    /// I/O): `vdrep status` answers while replication is busy or stuck.
    pub fn status(&self) -> TrackerStatus {
        let cut_seq = self.cut_seq_seen.load(SeqCst);
        let disks = self.disks.lock();
        let mut out: Vec<DiskStatus> = disks
            .iter()
            .map(|(name, d)| {
                let m = d.meta.lock().clone();
                let dirty = d.dirty.read().count();
                DiskStatus {
                    name: name.clone(),
                    id: m.id,
                    state: m.state,
                    cycle: m.cycle,
                    size: d.reader.metadata().map(|m| m.len()).unwrap_or(0),
                    block_size: m.block_size,
                    dirty_blocks: dirty,
                    dirty_bytes: dirty * self.shared.block_size,
                    bitmap_only: m.bitmap_only,
                    resync_scope: m.resync_scope,
                    activity_extents: d.al.as_ref().map(|a| a.extents().len() as u64),
                    activity_syncs: d.al.as_ref().map(|a| a.syncs()),
                    written_bytes: d.written.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        TrackerStatus {
            root: self.root_path.clone(),
            cut_seq,
            previous_stop_clean: self.previous_stop_clean,
            disks: out,
            kept_bytes: self.shared.keep_budget.used(),
            kept_limit: self.shared.keep_budget.limit(),
        }
    }

    /// Save every bitmap and mark the mount clean. Call once no request can
    /// reach the file system any more (after the FUSE session ended).
    pub fn shutdown_clean(&self) -> Result<(), TrackError> {
        let mut mm = self.cut_serial.lock();
        self.save_clean(&mut mm)
    }

    /// Stop every change to tracked disks (writes, truncates, fallocates
    /// wait), then save the state exactly as [`shutdown_clean`](Self::shutdown_clean)
    /// does, for a worker handover: the waiting
    /// changes are never applied by this process, the next worker applies
    /// them when the kernel resends them, and tracks them on top of the
    /// saved bitmaps. Changes stay stopped while the guard lives; the
    /// handing-over process exits holding it.
    pub fn freeze_clean(&self) -> Result<Frozen<'_>, TrackError> {
        // From here a disk attached is frozen as it is attached; the ones
        // already here are frozen below, in the order cuts lock them.
        let disks = in_lock_order({
            let map = self.disks.lock();
            *self.frozen.lock() = Some(Vec::new());
            map.values().cloned().collect()
        });
        let mut frozen = Frozen {
            tracker: self,
            _cut: disks.iter().map(|d| d.cut_lock.write_arc()).collect(),
            serial: None,
        };
        let mut mm = self.cut_serial.lock();
        // On an error `frozen` drops: changes resume.
        self.save_clean(&mut mm)?;
        frozen.serial = Some(mm);
        Ok(frozen)
    }

    fn save_clean(&self, mm: &mut MountMeta) -> Result<(), TrackError> {
        let spath = self.root_path.join(STATE_DIR);
        let disks = self.disks.lock();
        for d in disks.values() {
            let _one = d.meta_save.lock();
            let mut m = d.meta.lock().clone();
            if let Ok(md) = d.reader.metadata() {
                m.ino = md.ino();
                m.shutdown_size = md.len();
                m.shutdown_mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            }
            // Bits of a cycle still being written or shipped are not yet
            // anywhere safe: save them with the live ones.
            let mut bm = Bitmap::from_words(d.dirty.read().len(), &d.dirty.read().to_words())
                .unwrap_or_default();
            if let Some(s) = d.sealing.lock().as_ref() {
                bm.merge_from(s.real_changes.as_ref().unwrap_or(&s.dirty));
            }
            let enc = state::encode_bitmap(m.block_size, bm.len(), &bm.to_words());
            self.state
                .write_atomic(&PathBuf::from(format!("disks/{}/bitmap", m.folder)), &enc)
                .map_err(|e| io_state(&spath, e))?;
            self.save_meta(&m).map_err(|e| io_state(&spath, e))?;
        }
        // A clean stop saves the exact cycle number (no gap after a
        // clean restart or handover); a cut after it reserves again.
        mm.clean = true;
        mm.reserved = mm.cut_seq;
        self.state
            .write_json(Path::new("mount.json"), mm)
            .map_err(|e| io_state(&spath, e))?;
        Ok(())
    }
}

/// Tracking stopped for a handover ([`Tracker::freeze_clean`]).
#[must_use = "changes resume when the guard is dropped"]
pub struct Frozen<'a> {
    tracker: &'a Tracker,
    /// Every disk's cut lock, held exclusively (disks attached meanwhile
    /// are in [`Tracker::frozen`]).
    _cut: Vec<CutHeld>,
    serial: Option<parking_lot::MutexGuard<'a, MountMeta>>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.serial = None;
        *self.tracker.frozen.lock() = None;
    }
}

/// Writing a sealed cycle's log failed.
#[derive(Debug, thiserror::Error)]
#[error("{doing} {}: {source}", path.display())]
struct LogWriteError {
    doing: &'static str,
    path: PathBuf,
    #[source]
    source: crate::hrl::HrlError,
}

/// Why a sealed cycle could not be streamed to the end.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the disk as of the cut failed.
    #[error("reading the disk at block {block}: {source}")]
    Read {
        block: u64,
        #[source]
        source: io::Error,
    },
    /// The content as of the cut could not be kept (a copy-before-write
    /// read failed, or too much changed while the cycle was read); the
    /// text says which.
    #[error("{0}")]
    Abandoned(String),
    /// The consumer stopped taking data (its side of a channel closed).
    #[error("the network side stopped")]
    Stopped,
    /// The consumer failed (writing a log, a network error).
    #[error(transparent)]
    Sink(Box<dyn std::error::Error + Send + Sync>),
}

impl StreamError {
    /// The consumer's own error.
    pub fn sink(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StreamError::Sink(Box::new(e))
    }
}

/// Receives a sealed cycle's content: `(disk offset, bytes as of the cut)`.
pub type CycleSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), StreamError> + 'a;

/// Destination of [`SealedCycle::stream_into`]: hands out the memory the
/// next piece of the cycle is read into (no intermediate buffer, no
/// zero-fill: the tracker writes every byte of the slice it gets).
pub trait CycleBuf {
    /// Room for the `len` bytes of the cycle at disk offset `off` (pieces
    /// come in ascending order, at most 1 MiB each). Its content on entry
    /// does not matter; it holds those bytes once the next call (or the
    /// end of the stream) comes.
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], StreamError>;
}

/// [`CycleBuf`] over a [`CycleSink`]: one reused buffer, each piece passed
/// on when the next one is asked for.
struct SinkBuf<'s, 'a> {
    sink: &'s mut CycleSink<'a>,
    buf: Vec<u8>,
    pending: Option<(u64, usize)>,
}

impl SinkBuf<'_, '_> {
    fn flush(&mut self) -> Result<(), StreamError> {
        if let Some((off, len)) = self.pending.take() {
            (self.sink)(off, &self.buf[..len])?;
        }
        Ok(())
    }
}

impl CycleBuf for SinkBuf<'_, '_> {
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], StreamError> {
        self.flush()?;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.pending = Some((off, len));
        Ok(&mut self.buf[..len])
    }
}

/// Which disks a cut seals, and which are sealed whole (initial copy).
#[derive(Debug, Clone, Default)]
pub struct CutSelect {
    /// Only these disks (all if `None`).
    pub disks: Option<Vec<String>>,
    /// Disk name -> offset: every block from that offset to the end is part
    /// of the sealed cycle (initial replication, or its resumption: blocks
    /// before the offset reached the replica earlier, and their later
    /// changes are in the live bitmap, which is sealed too).
    pub full_from: HashMap<String, u64>,
    /// Disks sealed although they need a resync (this cycle is the
    /// resync); they return to Normal when it finishes well.
    pub resync: Vec<String>,
    /// Disk name -> block runs `(first, count)` added to the sealed cycle
    /// (a resumed resync re-reads the blocks it found different).
    pub extra: HashMap<String, Vec<(u64, u64)>>,
    /// Leave out bitmap-only disks (manual cuts: no logs for them).
    pub skip_bitmap_only: bool,
}

/// The outcome of [`Tracker::seal`].
pub struct Sealed {
    pub cycle: u64,
    pub cut_unix_ns: u64,
    pub cycles: Vec<SealedCycle>,
    /// Disks that were selected but not sealed, with the reason.
    pub skipped: Vec<CutEntry>,
}

/// One disk's sealed cycle: readable as of the cut while the VM writes on.
pub struct SealedCycle {
    pub header: HrlHeader,
    /// Set when the cycle covers every block from this offset on.
    pub full_from: Option<u64>,
    /// A resync's cycle: the disk returns to Normal when it finishes well.
    pub resync: bool,
    folder: String,
    disk: Arc<TrackedDisk>,
    sealing: Arc<Sealing>,
}

impl SealedCycle {
    pub fn dirty_blocks(&self) -> u64 {
        self.sealing.dirty.count()
    }

    /// Bytes of disk the cycle covers.
    pub fn dirty_bytes(&self) -> u64 {
        let bs = u64::from(self.header.block_size);
        let nblocks = self.sealing.size.div_ceil(bs);
        self.sealing
            .dirty
            .runs(nblocks)
            .iter()
            .map(|&(s, n)| ((s + n) * bs).min(self.sealing.size) - s * bs)
            .sum()
    }

    /// Blocks written between the disk's previous cut and this one (for a
    /// whole-disk cycle, the real changes within it).
    pub fn changed_since_base(&self, block: u64) -> bool {
        match &self.sealing.real_changes {
            Some(r) => r.get(block),
            None => self.sealing.dirty.get(block),
        }
    }

    /// Runs `(first block, count)` written between the disk's previous cut
    /// and this one.
    pub fn changed_runs(&self) -> Vec<(u64, u64)> {
        let nblocks = self
            .sealing
            .size
            .div_ceil(u64::from(self.header.block_size));
        match &self.sealing.real_changes {
            Some(r) => r.runs(nblocks),
            None => self.sealing.dirty.runs(nblocks),
        }
    }

    /// Blocks of the cycle (what [`SealedCycle::stream`] from 0 yields).
    pub fn blocks(&self) -> u64 {
        self.sealing.dirty.count()
    }

    /// Feed `sink` with the content as of the cut of every block of the
    /// cycle at or after `from`, in ascending order, in runs of at most
    /// 1 MiB. Ranges that were holes at the cut are passed as zeros without
    /// reading them.
    pub fn stream(&self, from: u64, sink: &mut CycleSink<'_>) -> Result<(), StreamError> {
        let mut out = SinkBuf {
            sink,
            buf: Vec::new(),
            pending: None,
        };
        self.disk
            .stream_sealed(&self.sealing, from, &mut out, false)?;
        out.flush()
    }

    /// [`SealedCycle::stream`] straight into the caller's memory, for a
    /// copy of the whole disk (the initial copy): long runs are read past
    /// the page cache ([`crate::util::direct`]: a whole disk read once
    /// gains nothing from the cache and costs ~8x the CPU through it).
    pub fn stream_into(&self, from: u64, out: &mut dyn CycleBuf) -> Result<(), StreamError> {
        self.disk.stream_sealed(&self.sealing, from, out, true)
    }

    /// A handle for comparing the cycle block by block ([`CycleJudge`]).
    pub fn judge(&self) -> CycleJudge {
        CycleJudge {
            disk: self.disk.clone(),
            sealing: self.sealing.clone(),
        }
    }
}

/// Bytes the hash pass of [`CycleJudge::digests`] judges at once (one
/// state-lock pass before and after hashing them from the mapping): small
/// enough that a writer's copy-before-write waits little for that lock,
/// large enough that the lock and the populate call are paid rarely.
pub const DIGEST_PIECE: u64 = 256 << 10;

/// Receives the hash pass of [`CycleJudge::digests`]: `(offset, bytes,
/// one digest per block)`.
pub type DigestSink<'a> = dyn FnMut(u64, usize, &[u128]) -> Result<(), StreamError> + 'a;

/// A sealed cycle compared block by block against a replica (the checksum
/// resync and `vdrep verify`): [`digests`](Self::digests) hashes the
/// blocks as of the cut without passing them on, so the VM's writes to
/// them still save their pre-images; once the replica's digests are in,
/// [`take`](Self::take) reads the blocks that differ (for the resync log)
/// and [`release`](Self::release) lets go of the judged ones. So the
/// compare never copies the disk into batch buffers: only the blocks that
/// differ are read twice. Cloned freely (the reader and the network side
/// each hold one); the [`SealedCycle`] stays with its owner, who finishes
/// it as usual.
#[derive(Clone)]
pub struct CycleJudge {
    disk: Arc<TrackedDisk>,
    sealing: Arc<Sealing>,
}

impl CycleJudge {
    /// Hash every block of the cycle at or after `from` as of the cut, in
    /// ascending order, [`DIGEST_PIECE`] bytes at a time: `out(offset,
    /// bytes, digests)` gets one `digest` per block of the piece (the last
    /// block of the disk may be short). Holes and blocks already passed on
    /// read as zeros, as in [`SealedCycle::stream`]. Nothing is captured:
    /// the blocks stay readable as of the cut for [`take`](Self::take).
    pub fn digests(
        &self,
        from: u64,
        digest: &dyn Fn(&[u8]) -> u128,
        out: &mut DigestSink<'_>,
    ) -> Result<(), StreamError> {
        let bs = self.disk.bs().max(1) as usize;
        let mut scratch = vec![0u8; bs];
        let mut digests: Vec<u128> = Vec::with_capacity(DIGEST_PIECE as usize / bs + 1);
        let mut win = crate::util::mapped::Window::default();
        // No read-ahead hints inside long runs: the kernel's read-ahead of
        // the mapping builds large folios, `WILLNEED` 4 KiB ones.
        self.disk.walk_sealed(
            &self.sealing,
            from,
            DIGEST_PIECE,
            false,
            &mut |b, ce, off, len| {
                self.disk.digest_as_of_cut(
                    &self.sealing,
                    b,
                    ce,
                    len,
                    digest,
                    &mut win,
                    &mut scratch,
                    &mut digests,
                )?;
                out(off, len, &digests)
            },
        )
    }

    /// The content as of the cut of blocks `first..first + n` (clipped to
    /// the disk's size at the cut) into `buf` (resized to fit), passed on
    /// for good: their pre-images are dropped and writers stop saving them.
    /// Returns the bytes filled.
    pub fn take(&self, first: u64, n: u64, buf: &mut Vec<u8>) -> Result<usize, StreamError> {
        let bs = self.disk.bs();
        let size = self.sealing.size;
        let off = first.saturating_mul(bs);
        if n == 0 || off >= size {
            return Ok(0);
        }
        let end = first.saturating_add(n);
        let len = (end.saturating_mul(bs).min(size) - off) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        self.disk
            .fill_as_of_cut(&self.sealing, first, end, len, &mut buf[..len], true, None)?;
        Ok(len)
    }

    /// Blocks `first..first + n` are judged: drop their saved pre-images
    /// and let the VM's writes to them go on without saving any.
    pub fn release(&self, first: u64, n: u64) {
        if n == 0 {
            return;
        }
        let last = first.saturating_add(n - 1);
        let mut st = self.sealing.state.lock();
        if (st.saved.len() as u64) > n {
            // Fewer blocks judged than pre-images kept: look each one up.
            for b in first..=last {
                if let Some(v) = st.saved.remove(&b) {
                    st.saved_bytes = st.saved_bytes.saturating_sub(v.len() as u64);
                }
            }
        } else if !st.saved.is_empty() {
            let mut freed = 0u64;
            st.saved.retain(|b, v| {
                let keep = *b < first || *b > last;
                if !keep {
                    freed += v.len() as u64;
                }
                keep
            });
            st.saved_bytes = st.saved_bytes.saturating_sub(freed);
        }
        if let Some(k) = st.kept.as_mut() {
            k.remove_range(first, last);
        }
        st.captured.set_range(first, last);
    }
}

#[derive(Default)]
struct SealState {
    /// Blocks whose as-of-cut content is already accounted for (saved below
    /// or already read into the log).
    captured: Bitmap,
    /// Pre-images saved by writers, consumed by the materialiser.
    saved: HashMap<u64, Vec<u8>>,
    saved_bytes: u64,
    /// The running cycle's copies of its last whole-block writes, moved in
    /// at the cut ([`kept`]): their blocks are captured from the start, so
    /// neither the materialiser nor a copy-before-write reads them back.
    kept: Option<kept::Copies>,
    /// A copy-before-write read failed: this cycle cannot be materialised.
    failed: Option<String>,
}

impl SealState {
    /// A captured block's content as of the cut: its saved pre-image or
    /// its kept copy (neither: passed on already, zeros).
    fn as_of_cut(&self, block: u64) -> Option<&[u8]> {
        match self.saved.get(&block) {
            Some(v) => Some(v),
            None => self.kept.as_ref().and_then(|k| k.get(block)),
        }
    }

    /// The cycle is abandoned: let its memory go.
    fn abandon(&mut self, why: String) {
        self.failed = Some(why);
        self.saved.clear();
        self.saved_bytes = 0;
        self.kept = None;
    }
}

/// A sealed cycle being written into its log.
struct Sealing {
    dirty: Bitmap,
    /// For whole-disk cycles: the bits that were really dirty at the cut.
    real_changes: Option<Bitmap>,
    /// Disk size at the cut.
    size: u64,
    state: Mutex<SealState>,
}

/// One tracked disk. Every mutation of the backing file goes through here.
pub struct TrackedDisk {
    shared: Arc<Shared>,
    /// Held shared by every change to this disk (write, truncate,
    /// fallocate) until its blocks are marked, exclusively by a cut of it
    /// ([`Tracker::seal`]), an activity-log prune and a handover's freeze
    /// ([`Tracker::freeze_clean`]). The only lock a write takes: there is
    /// no mount-wide one. In an `Arc` so a write whose backing I/O
    /// completes later can own its share.
    cut_lock: Arc<RwLock<()>>,
    id: [u8; 16],
    ino: u64,
    dev: u64,
    /// Private buffered read-only descriptor (copy-before-write, logs).
    reader: File,
    dirty: RwLock<Bitmap>,
    sealing: Mutex<Option<Arc<Sealing>>>,
    meta: Mutex<DiskMeta>,
    /// A full copy is replacing a resync: back to ResyncRequired if it fails.
    full_copy_pending: std::sync::atomic::AtomicBool,
    /// Fenced for a planned failover: every change fails with `EROFS`.
    fenced: std::sync::atomic::AtomicBool,
    /// The live bitmap holds every write since the disk's last cut (false
    /// after an unclean stop or a lost bitmap, until the next cut).
    bitmap_trusted: std::sync::atomic::AtomicBool,
    /// Pending changes (sealed logs + dirty bytes) above which the disk
    /// goes bitmap-only (set by the protection).
    log_limit: Mutex<Option<u64>>,
    /// The newest cycle whose log a session submitted to a receiver
    /// ([`Tracker::note_submitted`]); the 50% rule keeps the logs up to it.
    submitted: std::sync::atomic::AtomicU64,
    /// The newest cycle whose log the receiver stored durably on the
    /// current connection ([`Tracker::note_delivered`]).
    delivered: std::sync::atomic::AtomicU64,
    /// The disk's activity log ([`activity`]; `None` when it is off).
    al: Option<ActivityLog>,
    /// Armed by a promotion (see [`preimage`]): blocks are saved before
    /// their first change, so that the failover can be cancelled.
    preimage: Mutex<Option<preimage::Journal>>,
    /// Bytes written through [`TrackedDisk::write_at`] since attached.
    written: std::sync::atomic::AtomicU64,
    /// Held shared while a hash pass reads a mapping of the backing file
    /// ([`CycleJudge::digests`]), exclusively while the file shrinks (a
    /// mapped page past the file's end would be a `SIGBUS`).
    map_guard: RwLock<()>,
    /// Held across a save of `meta` ([`Tracker::save_disk`]): one at a
    /// time, the newest copy last. Taken before `meta`, never under it.
    meta_save: Mutex<()>,
    /// Copies of the running cycle's whole-block writes ([`kept`]).
    kept: kept::Kept,
    /// When this disk was last sealed (monotonic ns, [`Tracker::seal`]):
    /// whether its next cycle keeps copies.
    last_seal_ns: std::sync::atomic::AtomicU64,
}

impl TrackedDisk {
    fn bs(&self) -> u64 {
        self.shared.block_size
    }

    /// Blocks `first..=last` covering `[offset, offset+len)`; `len > 0`.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let bs = self.bs();
        (offset / bs, (offset + len - 1) / bs)
    }

    fn detach(&self, why: &str) -> DiskMeta {
        let mut m = self.meta.lock();
        tracing::info!(disk = %m.name, "no longer tracked: {why}");
        m.detached = true;
        m.clone()
    }

    /// Save the pre-failover content of blocks about to change for the
    /// first time since a promotion (see [`preimage`]); an error fails the
    /// change (it could not be undone by a cancel).
    fn save_preimages(&self, first: u64, last: u64) -> io::Result<()> {
        let mut j = self.preimage.lock();
        let Some(j) = j.as_mut() else { return Ok(()) };
        j.save(&self.reader, first, last).map_err(|e| {
            tracing::error!(disk = %self.meta.lock().name, "cannot save pre-images for a failover cancel: {e}; the write fails");
            io::Error::from_raw_os_error(libc::EIO)
        })
    }

    /// Save the as-of-cut content of sealed blocks about to change.
    fn preserve(&self, first: u64, last: u64) {
        let s = self.sealing.lock().clone();
        let Some(s) = s else { return };
        let bs = self.bs();
        let nblocks = s.size.div_ceil(bs);
        if first >= nblocks {
            return;
        }
        let last = last.min(nblocks - 1);
        let mut st = s.state.lock();
        if st.failed.is_some() {
            return;
        }
        let mut b = first;
        while b <= last {
            if !s.dirty.get(b) || st.captured.get(b) {
                b += 1;
                continue;
            }
            let mut e = b;
            while e < last && s.dirty.get(e + 1) && !st.captured.get(e + 1) {
                e += 1;
            }
            let mut buf = vec![0u8; ((e - b + 1) * bs) as usize];
            if let Err(err) = read_full_at(&self.reader, &mut buf, b * bs) {
                st.abandon(format!("copy-before-write read failed: {err}"));
                return;
            }
            st.captured.set_range(b, e);
            st.saved_bytes += buf.len() as u64;
            for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                st.saved.insert(b + i as u64, chunk.to_vec());
            }
            if st.saved_bytes > MAX_SAVED_BYTES {
                st.abandon(format!(
                    "more than {} MiB changed while the cycle was being read; it will be retried",
                    MAX_SAVED_BYTES >> 20
                ));
                return;
            }
            b = e + 1;
        }
    }

    fn mark(&self, first: u64, last: u64) {
        {
            let bm = self.dirty.read();
            if last < bm.len() {
                bm.set_range(first, last);
                return;
            }
        }
        let mut bm = self.dirty.write();
        bm.grow(last + 1);
        bm.set_range(first, last);
    }

    /// Make the extents of blocks `first..=last` durable in the activity
    /// log before the change is made (the caller holds the cut lock shared
    /// until it marked the blocks). An error refuses the change.
    fn log_activity(&self, first: u64, last: u64) -> io::Result<()> {
        let Some(al) = &self.al else { return Ok(()) };
        let bs = self.bs();
        let (lo, hi) = (first * bs, last * bs + bs - 1);
        if al.covers(lo, hi) {
            return Ok(());
        }
        // A sequential writer entering a cold extent at its first byte from
        // a hot predecessor: record the extents ahead of it in this sync.
        let (f, mut l) = activity::extents_of(lo, hi);
        let ahead = self.shared.activity_ahead;
        if ahead > 0 && f > 0 && lo == f << activity::EXTENT_SHIFT && al.is_hot(f - 1) {
            let blocks = self.dirty.read().len();
            let last_extent = (blocks.max(1) * bs - 1) >> activity::EXTENT_SHIFT;
            l = l.max((l + ahead).min(last_extent));
        }
        al.record_extents(f..=l).map_err(|e| {
            let name = self.meta.lock().name.clone();
            tracing::error!(disk = %name,
                "cannot record a write in the activity log: {e}; the write is refused");
            io::Error::new(
                e.kind(),
                format!("{name}: recording the write in the activity log failed: {e}"),
            )
        })
    }

    /// Let the activity log's extents go that hold no write since the last
    /// finished cycle's cut (none of their blocks is dirty in the live
    /// bitmap nor in a cycle still being sealed), the least recently
    /// written first, as many as the log holds above its budget
    /// ([`TrackConfig::activity_hot`]). `finished`: the blocks the cycle
    /// that just finished changed; their extents count as used now (a
    /// write into a hot extent does not stop to say so). A failure only
    /// leaves extents in the log (an over-approximation).
    fn prune_activity(&self, finished: &Bitmap) {
        let Some(al) = &self.al else { return };
        let per = ((1u64 << activity::EXTENT_SHIFT) / self.bs()).max(1);
        let busy = |e: u64| {
            let (f, l) = (e * per, e * per + per - 1);
            if self.dirty.read().any_in(f, l) {
                return true;
            }
            self.sealing
                .lock()
                .as_ref()
                .is_some_and(|s| s.real_changes.as_ref().unwrap_or(&s.dirty).any_in(f, l))
        };
        // Nothing to let go (checked without the cut lock: a write can only
        // make more extents busy; `prune` checks again under it).
        let used = |e: u64| busy(e) || finished.any_in(e * per, e * per + per - 1);
        let mut victims = al.victims(used, self.shared.activity_hot);
        victims.retain(|&e| !busy(e));
        if victims.is_empty() {
            return;
        }
        victims.sort_unstable();
        let name = || self.meta.lock().name.clone();
        if let Err(e) = al.advance_epoch() {
            tracing::warn!(disk = %name(), "cannot prune the activity log: {e}");
            return;
        }
        let _instant = self.cut_lock.write();
        if let Err(e) = al.prune(|e| busy(e) || victims.binary_search(&e).is_err()) {
            tracing::warn!(disk = %name(), "cannot write the pruned activity log: {e}");
        }
    }

    /// Is the disk fenced (see [`Tracker::fence`])?
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check_fence(&self) -> io::Result<()> {
        if self.is_fenced() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Write `data` at `offset` through `file` (the FS's open handle, which
    /// may be O_DIRECT) and record it. Returns bytes written.
    pub fn write_at(&self, file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            self.check_fence()?;
            return file.write_at(data, offset);
        }
        self.change(offset, data.len(), Some(data), || {
            file.write_at(data, offset)
        })
    }

    /// [`TrackedDisk::write_at`] of `len > 0` bytes at `offset` whose
    /// backing write `io` makes (a `splice(2)` from the FUSE request's pipe,
    /// say): the same fence, activity log, pre-images, copy-before-write and
    /// cut lock around `io`, and the blocks marked whatever its outcome.
    pub fn write_with(
        &self,
        offset: u64,
        len: usize,
        io: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.change(offset, len, None, io)
    }

    /// A write of `len` bytes at `offset` made by `io`; `data`: its bytes,
    /// when the caller has them (their whole blocks may be kept, [`kept`]).
    fn change(
        &self,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
        io: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.check_fence()?;
        let _cut = self.cut_lock.read();
        let (first, last) = self.span(offset, len.max(1) as u64);
        self.log_activity(first, last)?;
        self.save_preimages(first, last)?;
        self.preserve(first, last);
        let ticket = self.kept.begin(first, last);
        let r = io();
        if let Some(t) = ticket {
            let whole = match (&r, data) {
                (Ok(n), Some(d)) if *n == d.len() => Some((offset, d)),
                _ => None,
            };
            self.kept.end(t, whole, self.bs());
        }
        // Marked whatever the outcome: an over-approximation is always safe.
        self.mark(first, last);
        if let Ok(n) = &r {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Start a write of `len > 0` bytes at `offset` whose backing I/O the
    /// caller submits asynchronously (the io_uring transport): the same steps
    /// as [`TrackedDisk::write_at`] before its `pwrite` (fence, activity log,
    /// pre-images, copy-before-write), with the cut lock's share taken and
    /// kept in the returned [`InFlightWrite`] until the caller
    /// [`finishes`](InFlightWrite::finish) it after the I/O completed: a cut
    /// waits for every write it counts, as with `write_at`.
    ///
    /// `Ok(None)`: the cut lock is not free at once (a cut holds or waits for
    /// it). The caller may already hold shares of its own (other writes in
    /// flight), so it must not wait here: it completes those first, then
    /// writes with [`TrackedDisk::write_at`].
    pub fn try_begin_write(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<InFlightWrite>> {
        self.check_fence()?;
        let Some(cut) = self.cut_lock.try_read_arc() else {
            return Ok(None);
        };
        let (first, last) = self.span(offset, len.max(1) as u64);
        self.log_activity(first, last)?;
        self.save_preimages(first, last)?;
        self.preserve(first, last);
        Ok(Some(InFlightWrite {
            disk: self.clone(),
            first,
            last,
            kept: self.kept.begin(first, last),
            _cut: cut,
        }))
    }

    /// Truncate or extend to `len`.
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.check_fence()?;
        let _cut = self.cut_lock.read();
        let old = file.metadata()?.len();
        if len < old {
            let (first, last) = self.span(len, old - len);
            self.log_activity(first, last)?;
            self.save_preimages(first, last)?;
            self.preserve(first, last);
            let ticket = self.kept.begin(first, last);
            let r = self.shrinking(|| file.set_len(len));
            if let Some(t) = ticket {
                self.kept.end(t, None, self.bs());
            }
            self.mark(first, last);
            r
        } else {
            // Growth reads as zeros; applying a log sets the length first.
            file.set_len(len)
        }
    }

    /// fallocate(2) with `mode` (incl. PUNCH_HOLE / ZERO_RANGE).
    pub fn fallocate(&self, file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.check_fence()?;
        let _cut = self.cut_lock.read();
        let size = file.metadata()?.len();
        let shifts = mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
        let changes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let range = if shifts {
            // Everything from `offset` to the (old or new) end moves.
            let end = size.max(size.saturating_add(len));
            (end > offset).then(|| self.span(offset, end - offset))
        } else if changes && offset < size && len > 0 {
            Some(self.span(offset, len.min(size - offset)))
        } else {
            None
        };
        if let Some((f, l)) = range {
            self.log_activity(f, l)?;
            self.save_preimages(f, l)?;
            self.preserve(f, l);
        }
        let ticket = range.and_then(|(f, l)| self.kept.begin(f, l));
        let res = if mode & libc::FALLOC_FL_COLLAPSE_RANGE != 0 {
            self.shrinking(|| sys::fallocate(file.as_raw_fd(), mode, offset, len))
        } else {
            sys::fallocate(file.as_raw_fd(), mode, offset, len)
        };
        if let Some(t) = ticket {
            self.kept.end(t, None, self.bs());
        }
        if let Some((f, l)) = range {
            self.mark(f, l);
        }
        res
    }

    /// Run `f`, which may shrink the backing file, while no hash pass reads
    /// a mapping of it (see `map_guard`).
    fn shrinking<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = self.map_guard.write();
        f()
    }

    /// Is `[off, off+len)` entirely a hole of the backing file right now?
    fn is_hole(&self, off: u64, len: u64) -> bool {
        match sys::lseek(self.reader.as_raw_fd(), off as i64, libc::SEEK_DATA) {
            Ok(r) => r as u64 >= off + len,
            // ENXIO: no data at or after `off`.
            Err(e) => e.raw_os_error() == Some(libc::ENXIO),
        }
    }

    /// Walk the blocks of the sealed cycle at or after `from`, in ascending
    /// order, in pieces of at most `piece` bytes (never across a run of the
    /// cycle), with read-ahead hints a window ahead (`hint_long`: also
    /// within long runs; not when they are read past the page cache):
    /// `visit(first block, end block, offset, bytes)`.
    fn walk_sealed(
        &self,
        s: &Sealing,
        from: u64,
        piece: u64,
        hint_long: bool,
        visit: &mut dyn FnMut(u64, u64, u64, usize) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let bs = self.bs();
        let nblocks = s.size.div_ceil(bs);
        let per_piece = (piece / bs).max(1);
        let first_block = from / bs;
        // The runs to read, and their bytes: hinted a window ahead of the
        // reads below so the disk serves many of them at once (a hint only:
        // what each read returns, and the copy-before-write order under the
        // state lock, are unchanged).
        let runs: Vec<(u64, u64)> = s
            .dirty
            .runs(nblocks)
            .into_iter()
            .filter_map(|(start, count)| {
                let b = start.max(first_block);
                (b < start + count).then_some((b, start + count))
            })
            .collect();
        let mut bytes: Vec<(u64, u64)> = runs
            .iter()
            .map(|&(b, end)| (b * bs, (end * bs).min(s.size) - b * bs))
            .collect();
        {
            // Runs whose every block is captured already (kept copies,
            // [`kept`]) are not read: no hint for them.
            let st = s.state.lock();
            if st.kept.is_some() {
                for (k, &(b, end)) in runs.iter().enumerate() {
                    if (b..end).all(|i| st.captured.get(i)) {
                        bytes[k].1 = 0;
                    }
                }
            }
        }
        let mut ahead = crate::util::readahead::ReadAhead::new();
        for (k, &(start, end)) in runs.iter().enumerate() {
            ahead.before(self.reader.as_raw_fd(), &bytes, k);
            let mut b = start;
            while b < end {
                let ce = (b + per_piece).min(end);
                let off = b * bs;
                let len = ((ce * bs).min(s.size) - off) as usize;
                if hint_long {
                    ahead.within(self.reader.as_raw_fd(), bytes[k], off);
                }
                visit(b, ce, off, len)?;
                b = ce;
            }
        }
        Ok(())
    }

    /// Put the content as of the cut of blocks `b..ce` (`len` bytes from
    /// block `b`; the last block may be short) into `buf`. `consume`: the
    /// blocks are passed on for good (their saved pre-images dropped, the
    /// blocks marked captured, so writers no longer save them); otherwise
    /// they stay as they are (a later writer still saves the pre-image: the
    /// hash pass of a compare). `direct`: reads of
    /// [`MIN_DIRECT`](crate::util::direct::MIN_DIRECT) bytes or more go past
    /// the page cache.
    ///
    /// The file is read **outside** the sealing's state lock, so the VM's
    /// writes (whose copy-before-write takes that lock) never wait for a
    /// device read of the stream (up to 1 MiB: ~0.6 ms direct here). That is
    /// safe because a writer saves the pre-image of a block and marks it
    /// captured, under the lock, *before* its backing write: so once the
    /// read is done, every block still uncaptured under the lock was not
    /// written since the cut while it was read, and the bytes read are its
    /// content as of the cut; blocks captured meanwhile take their saved
    /// pre-image (or zeros: passed on by an earlier stream) instead, as if
    /// everything had been decided at that one lock.
    #[allow(clippy::too_many_arguments)]
    fn fill_as_of_cut(
        &self,
        s: &Sealing,
        b: u64,
        ce: u64,
        len: usize,
        buf: &mut [u8],
        consume: bool,
        mut direct: Option<&mut crate::util::direct::DirectReader>,
    ) -> Result<(), StreamError> {
        let bs = self.bs();
        let span = |i: u64, j: u64| {
            let o = ((i - b) * bs) as usize;
            (o, (((j - b) * bs) as usize).min(len))
        };
        // 1. Which blocks the file must give (not captured yet).
        let reads = Self::uncaptured(s, b, ce)?;
        #[cfg(test)]
        stream_tests::before_read(b, ce);
        // 2. Read them, the lock free.
        for &(i, j) in &reads {
            let (o, oe) = span(i, j);
            if self.is_hole(i * bs, (j - i) * bs) {
                buf[o..oe].fill(0);
                continue;
            }
            let n = match direct.as_deref_mut() {
                Some(d) if oe - o >= crate::util::direct::MIN_DIRECT => {
                    d.read_at(&mut buf[o..oe], i * bs)
                }
                _ => read_full_at(&self.reader, &mut buf[o..oe], i * bs),
            }
            .map_err(|source| StreamError::Read { block: i, source })?;
            // Past the file's end (shrunk since): zeros.
            buf[o + n..oe].fill(0);
        }
        // 3. Under the lock: what writers captured meanwhile, and what was
        //    captured before (step 1 did not read it).
        let mut from_copies = 0u64;
        let mut st = s.state.lock();
        if let Some(f) = &st.failed {
            return Err(StreamError::Abandoned(f.clone()));
        }
        for i in b..ce {
            if !st.captured.get(i) {
                // Unwritten since the cut (else captured): read in step 2.
                continue;
            }
            let (o, oe1) = span(i, i + 1);
            if consume {
                let saved = st.saved.remove(&i);
                if let Some(v) = &saved {
                    st.saved_bytes -= v.len() as u64;
                    put_pre_image(Some(v), &mut buf[o..oe1]);
                } else {
                    let kept = st.kept.as_mut().and_then(|k| k.remove(i));
                    from_copies += u64::from(kept.is_some());
                    put_pre_image(kept.as_deref(), &mut buf[o..oe1]);
                }
            } else {
                // Kept for the judgment (no copy of the map's entry).
                put_pre_image(st.as_of_cut(i), &mut buf[o..oe1]);
            }
        }
        if consume && b < ce {
            st.captured.set_range(b, ce - 1);
        }
        drop(st);
        if consume {
            kept::note_from_copies(from_copies);
            kept::note_read_back(reads.iter().map(|&(i, j)| j - i).sum());
        }
        Ok(())
    }

    /// Runs `(first, end)` of blocks `b..ce` not captured yet (under the
    /// sealing's state lock): the file gives their content as of the cut
    /// unless a writer captures them before the caller looks again.
    fn uncaptured(s: &Sealing, b: u64, ce: u64) -> Result<Vec<(u64, u64)>, StreamError> {
        let st = s.state.lock();
        if let Some(f) = &st.failed {
            return Err(StreamError::Abandoned(f.clone()));
        }
        let mut reads = Vec::new();
        let mut i = b;
        while i < ce {
            if st.captured.get(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < ce && !st.captured.get(j) {
                j += 1;
            }
            reads.push((i, j));
            i = j;
        }
        Ok(reads)
    }

    /// The digests (`digest` of each block) of blocks `b..ce` (`len` bytes
    /// from block `b`; the last block may be short) as of the cut, into
    /// `out`, without copying the file's bytes: the blocks are hashed where
    /// they lie in the page cache, through `win` (a mapping kept from piece
    /// to piece; [`crate::util::mapped`]). The same three steps as
    /// [`fill_as_of_cut`](Self::fill_as_of_cut) (which see for why it is
    /// as of the cut): choose the uncaptured blocks under the lock, hash
    /// them with the lock free, then replace the digest of every block
    /// captured by then with that of its saved pre-image (or zeros).
    /// `scratch`: at least one block, for the blocks hashed from a copy
    /// (grown to the run when the file cannot be mapped).
    #[allow(clippy::too_many_arguments)]
    fn digest_as_of_cut(
        &self,
        s: &Sealing,
        b: u64,
        ce: u64,
        len: usize,
        digest: &dyn Fn(&[u8]) -> u128,
        win: &mut crate::util::mapped::Window,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u128>,
    ) -> Result<(), StreamError> {
        let bs = self.bs();
        let ubs = bs as usize;
        // Length of block `i` (the last one may be short).
        let blen = |i: u64| (len - ((i - b) as usize) * ubs).min(ubs);
        out.clear();
        out.resize((ce - b) as usize, 0);
        // 1. Which blocks the file must give.
        let reads = Self::uncaptured(s, b, ce)?;
        #[cfg(test)]
        stream_tests::before_read(b, ce);
        // 2. Hash them, the lock free; the file cannot shrink meanwhile.
        {
            let _g = self.map_guard.read();
            let file_len = match self.reader.metadata() {
                Ok(m) => m.len(),
                Err(source) => return Err(StreamError::Read { block: b, source }),
            };
            for &(i, j) in &reads {
                let off = i * bs;
                let n: usize = (i..j).map(blen).sum();
                if self.is_hole(off, n as u64) {
                    for k in i..j {
                        scratch[..blen(k)].fill(0);
                        out[(k - b) as usize] = digest(&scratch[..blen(k)]);
                    }
                    continue;
                }
                // What the file holds of the run (shrunk since the cut: the
                // rest reads as zeros).
                let have = (file_len.saturating_sub(off) as usize).min(n);
                let whole = have / ubs * ubs;
                let mut hashed = false;
                if let Ok(Some(m)) = win.get(&self.reader, file_len, off, whole) {
                    if crate::util::mapped::populate(m).is_ok() {
                        for (k, blk) in m.chunks(ubs).enumerate() {
                            out[(i - b) as usize + k] = digest(blk);
                        }
                        hashed = true;
                    }
                }
                if !hashed && whole > 0 {
                    // Not mappable (a file system without mmap), or a page
                    // gone (shrunk from outside the mount): read instead.
                    win.clear();
                    if scratch.len() < whole {
                        scratch.resize(whole, 0);
                    }
                    let got = read_full_at(&self.reader, &mut scratch[..whole], off)
                        .map_err(|source| StreamError::Read { block: i, source })?;
                    scratch[got..whole].fill(0);
                    for (k, blk) in scratch[..whole].chunks(ubs).enumerate() {
                        out[(i - b) as usize + k] = digest(blk);
                    }
                }
                // The block the file's end cuts, and those past it.
                for k in i + (whole / ubs) as u64..j {
                    let at = k * bs;
                    let l = blen(k);
                    let got = if at < file_len {
                        let want = ((file_len - at) as usize).min(l);
                        read_full_at(&self.reader, &mut scratch[..want], at)
                            .map_err(|source| StreamError::Read { block: k, source })?
                    } else {
                        0
                    };
                    scratch[got..l].fill(0);
                    out[(k - b) as usize] = digest(&scratch[..l]);
                }
            }
        }
        // 3. Under the lock: blocks captured meanwhile, or before (step 1
        //    left them out), take their saved pre-image, or zeros.
        let st = s.state.lock();
        if let Some(f) = &st.failed {
            return Err(StreamError::Abandoned(f.clone()));
        }
        for i in b..ce {
            if !st.captured.get(i) {
                continue;
            }
            let l = blen(i);
            put_pre_image(st.as_of_cut(i), &mut scratch[..l]);
            out[(i - b) as usize] = digest(&scratch[..l]);
        }
        Ok(())
    }

    /// Pass the sealed cycle on, as of the cut, piece by piece; `direct`:
    /// long runs are read past the page cache.
    fn stream_sealed(
        &self,
        s: &Sealing,
        from: u64,
        out: &mut dyn CycleBuf,
        direct: bool,
    ) -> Result<(), StreamError> {
        let mut reader = direct
            .then(|| crate::util::direct::DirectReader::open(&self.reader))
            .flatten();
        let hint_long = !reader.as_ref().is_some_and(|r| r.is_direct());
        self.walk_sealed(s, from, CHUNK_BYTES, hint_long, &mut |b, ce, off, len| {
            let buf = out.room(off, len)?;
            self.fill_as_of_cut(s, b, ce, len, buf, true, reader.as_mut())
        })
    }

    pub fn name(&self) -> String {
        self.meta.lock().name.clone()
    }
}

/// A captured block's content as of the cut into `dst` (its length): the
/// saved pre-image, zero-padded; no pre-image means the block was already
/// passed on by an earlier stream (zeros).
fn put_pre_image(saved: Option<&[u8]>, dst: &mut [u8]) {
    let saved = saved.unwrap_or_default();
    let n = saved.len().min(dst.len());
    dst[..n].copy_from_slice(&saved[..n]);
    dst[n..].fill(0);
}

/// The disks (by name) at `path` or below it (a renamed or swapped folder).
fn keys_at_or_below<V>(disks: &HashMap<String, V>, path: &str) -> Vec<String> {
    let below = format!("{path}/");
    disks
        .keys()
        .filter(|k| *k == path || k.starts_with(&below))
        .cloned()
        .collect()
}

/// Test hook (issue 15, a worker killed mid-cut): with
/// `VDREP_TEST_HOLD_CUT=DIR` (a folder outside the mount), a seal that
/// finds `DIR/hold` writes this process's id to `DIR/held` and waits,
/// holding the cut locks of the disks it seals (their writes wait too),
/// until `hold` is removed,
/// so a test can kill the worker at that exact moment.
fn hold_cut_for_test() {
    hold_for_test("hold", "held", "");
}

/// The test hook of [`hold_cut_for_test`] at another moment: with
/// `VDREP_TEST_HOLD_CUT=DIR`, finding `DIR/HOLD` writes this process's id
/// and `what` (`PID WHAT`) to `DIR/HELD` and waits until `HOLD` is
/// removed. Without the variable (every real run) it does nothing.
pub fn hold_for_test(hold: &str, held: &str, what: &str) {
    let Some(dir) = std::env::var_os("VDREP_TEST_HOLD_CUT") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    if !dir.join(hold).exists() {
        return;
    }
    let text = format!("{} {what}", std::process::id());
    if let Err(e) = std::fs::write(dir.join(held), text.trim_end()) {
        tracing::warn!("test hook: cannot write {}: {e}", dir.join(held).display());
        return;
    }
    while dir.join(hold).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod cut_lock_tests;
#[cfg(test)]
mod meta_save_tests;

#[cfg(test)]
mod stream_tests;

#[cfg(test)]
mod tests {
    use super::{glob_match, keys_at_or_below};
    use std::collections::HashMap;

    #[test]
    fn a_renamed_folder_takes_the_disks_below_it_and_no_others() {
        let disks: HashMap<String, ()> = ["d", "d/a.img", "d/e/b.img", "dd/c.img", "x.img"]
            .into_iter()
            .map(|k| (k.to_string(), ()))
            .collect();
        let mut under = keys_at_or_below(&disks, "d");
        under.sort();
        assert_eq!(under, ["d", "d/a.img", "d/e/b.img"]);
        assert_eq!(keys_at_or_below(&disks, "x.img"), ["x.img"]);
        assert!(keys_at_or_below(&disks, "d/a").is_empty());
    }

    /// A receiver's message names a disk by id: the VM's own disk of that
    /// id, else (a disk left the VM's spec) the first tracked disk of it by
    /// name; an id nobody has is no disk.
    #[test]
    fn a_disk_is_found_by_its_id_among_the_vms_disks_first() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let t = super::stream_tests::tracker_at(dir);
        let mut ids = HashMap::new();
        for n in ["a.img", "b.img", "c.img"] {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(n))
                .expect("disk");
            f.set_len(1 << 20).expect("size");
            let d = t
                .attach(std::path::Path::new(n), &f)
                .expect("attach")
                .expect("tracked");
            ids.insert(n, d.id);
        }
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for n in ["a.img", "b.img", "c.img"] {
            assert_eq!(t.disk_with_id(&names(&[n]), &ids[n]).as_deref(), Some(n));
            assert_eq!(t.disk_with_id(&[], &ids[n]).as_deref(), Some(n));
            // Not among the VM's disks: still found among all.
            assert_eq!(
                t.disk_with_id(&names(&["a.img", "zz.img"]), &ids[n])
                    .as_deref(),
                Some(n)
            );
            let (hex, ..) = t.disk_info(n).expect("info");
            assert_eq!(hex, crate::util::hex(&ids[n]), "the id the sender sends");
        }
        assert_eq!(t.disk_with_id(&names(&["a.img"]), &[7u8; 16]), None);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.vhd", "disk.vhd"));
        assert!(glob_match("*.vhd", "DISK.VHD"));
        assert!(!glob_match("*.vhd", "disk.vhdx"));
        assert!(glob_match("*.vhd*", "disk.vhdx"));
        assert!(glob_match("d?sk.*", "disk.img"));
        assert!(!glob_match("*.img", "img"));
        assert!(glob_match("*", ""));
    }
}
