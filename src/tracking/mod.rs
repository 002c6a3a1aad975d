//! Write tracking: per-disk dirty-block bitmaps, cycles, copy-before-write
//! and cuts.
//!
//! Every mutation of a tracked disk (write, truncate, fallocate) goes through
//! [`TrackedDisk`], which marks the touched blocks in the disk's bitmap for
//! the current cycle. [`Tracker::cut`] seals the current cycle of **every**
//! tracked disk at one instant: it takes the cut lock exclusively (writes
//! hold it shared for the whole copy-before-write + pwrite + mark sequence,
//! so every write is entirely before or entirely after the cut), swaps in
//! fresh bitmaps and releases it. It then materialises each sealed cycle as
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

pub mod bitmap;
pub mod state;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::hrl::{HrlHeader, HrlWriter};
use bitmap::Bitmap;
pub use state::DiskState;
use state::{DiskMeta, MountMeta, StateDir};

/// Name of the state folder kept at the root of a tracked folder. The FS
/// shows it but never tracks anything below it.
pub const STATE_DIR: &str = ".vdrep";

/// Largest run handed to the log writer at once.
const CHUNK_BYTES: u64 = 1 << 20;

/// Options that decide what is tracked and how finely.
#[derive(Debug, Clone)]
pub struct TrackConfig {
    /// Glob patterns matched (case-insensitively) against file names, e.g. `*.vhd`.
    pub patterns: Vec<String>,
    /// Tracking granularity in bytes (power of two, 512..=1 MiB).
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
    /// Why no log was written.
    pub error: Option<String>,
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
    pub state: DiskState,
    pub cycle: u64,
    pub size: u64,
    pub block_size: u32,
    pub dirty_blocks: u64,
    pub dirty_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrackerStatus {
    pub root: PathBuf,
    pub cut_seq: u64,
    pub previous_stop_clean: bool,
    pub disks: Vec<DiskStatus>,
}

/// Shared between the tracker and its disks.
struct Shared {
    /// Held shared by every mutation, exclusively by the cut instant.
    cut_lock: RwLock<()>,
    block_size: u64,
}

/// All tracked disks under one mounted folder.
pub struct Tracker {
    shared: Arc<Shared>,
    config: TrackConfig,
    state: StateDir,
    root_path: PathBuf,
    disks: Mutex<HashMap<String, Arc<TrackedDisk>>>,
    /// Metas found on disk but whose file is not attached yet.
    known: Mutex<HashMap<String, DiskMeta>>,
    /// Serialises cuts and shutdown.
    cut_serial: Mutex<MountMeta>,
    previous_stop_clean: bool,
}

fn io_state(path: &Path, source: io::Error) -> TrackError {
    TrackError::State {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: buffer is valid for 16 bytes.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 16 {
        // Fall back to a time/pid derived value; uniqueness is what matters.
        let seed = now_ns() ^ (u64::from(std::process::id()) << 32);
        let h = xxhash_rust::xxh3::xxh3_128(&seed.to_le_bytes());
        id = h.to_le_bytes();
    }
    id
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

fn folder_name(rel: &str, id: &[u8; 16]) -> String {
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
    std::fs::OpenOptions::new()
        .read(true)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
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
        for folder in state
            .disk_folders()
            .map_err(|e| io_state(&state_path, e))?
        {
            let rel = PathBuf::from(format!("disks/{folder}/meta.json"));
            match state.read_json::<DiskMeta>(&rel) {
                Ok(Some(mut m)) => {
                    if !previous_stop_clean && m.state == DiskState::Normal {
                        m.state = DiskState::ResyncRequired(format!(
                            "the tracking daemon (pid {}) stopped uncleanly; its bitmap may be stale",
                            mm.as_ref().map_or(0, |m| m.pid)
                        ));
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
        };
        state
            .write_json(Path::new("mount.json"), &meta)
            .map_err(|e| io_state(&state_path, e))?;
        let t = Tracker {
            shared: Arc::new(Shared {
                cut_lock: RwLock::new(()),
                block_size: u64::from(bs),
            }),
            config,
            state,
            root_path: root_path.to_path_buf(),
            disks: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            cut_serial: Mutex::new(meta),
            previous_stop_clean,
        };
        // Persist the resync-required marks right away.
        for m in t.known.lock().values() {
            if m.state != DiskState::Normal {
                let _ = t
                    .state
                    .write_json(&PathBuf::from(format!("disks/{}/meta.json", m.folder)), m);
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
                    match self.state.openat(&rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
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
            disks.remove(&key);
        }
        let bs = self.shared.block_size;
        let reader = reopen_ro(file)?;
        let size = md.len();
        let known = self.known.lock().remove(&key);
        let cut_seq = self.cut_serial.lock().cut_seq;
        let (meta, bitmap) = match known {
            Some(mut m) if m.block_size as u64 == bs => {
                let mut bm = None;
                if m.state == DiskState::Normal {
                    let unchanged = m.ino == md.ino()
                        && m.shutdown_size == size
                        && m.shutdown_mtime_ns == md.mtime() * 1_000_000_000 + md.mtime_nsec();
                    if !unchanged {
                        m.state = DiskState::ResyncRequired(
                            "the disk changed while vdrep was not mounted".into(),
                        );
                    } else {
                        let raw = self
                            .state
                            .read(&PathBuf::from(format!("disks/{}/bitmap", m.folder)))?;
                        match raw.and_then(|b| state::decode_bitmap(&b, m.block_size)) {
                            Some((nbits, words)) => bm = Bitmap::from_words(nbits, &words),
                            None => {
                                m.state = DiskState::ResyncRequired(
                                    "the saved dirty bitmap is missing or damaged".into(),
                                )
                            }
                        }
                    }
                }
                (m, bm)
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
                    state: DiskState::Normal,
                    ino: md.ino(),
                    shutdown_size: 0,
                    shutdown_mtime_ns: 0,
                };
                (m, None)
            }
        };
        self.state
            .mkdir(&Path::new(STATE_DIR).join("disks").join(&meta.folder))?;
        let nblocks = size.div_ceil(bs);
        let mut bitmap = bitmap.unwrap_or_default();
        bitmap.grow(nblocks);
        let id = unhex16(&meta.id).unwrap_or_else(random_id);
        let disk = Arc::new(TrackedDisk {
            shared: self.shared.clone(),
            id,
            ino: md.ino(),
            dev: md.dev(),
            reader,
            dirty: RwLock::new(bitmap),
            sealing: Mutex::new(None),
            meta: Mutex::new(meta.clone()),
        });
        self.save_meta(&meta)?;
        tracing::info!(disk = %key, state = ?meta.state, cycle = meta.cycle, "tracking disk");
        disks.insert(key, disk.clone());
        Ok(Some(disk))
    }

    fn save_meta(&self, m: &DiskMeta) -> io::Result<()> {
        self.state
            .write_json(&PathBuf::from(format!("disks/{}/meta.json", m.folder)), m)
    }

    /// A file (or directory) at `from` was renamed to `to` (relative paths).
    pub fn on_rename(&self, from: &Path, to: &Path) {
        let from_s = from.to_string_lossy().into_owned();
        let to_s = to.to_string_lossy().into_owned();
        let mut disks = self.disks.lock();
        // Whatever was at `to` has been replaced.
        if let Some(old) = disks.remove(&to_s) {
            old.detach("replaced by a rename");
        }
        let moved: Vec<String> = disks
            .keys()
            .filter(|k| *k == &from_s || k.starts_with(&format!("{from_s}/")))
            .cloned()
            .collect();
        for k in moved {
            if let Some(d) = disks.remove(&k) {
                let new_key = format!("{to_s}{}", &k[from_s.len()..]);
                if self.is_disk_name(Path::new(&new_key)) {
                    let m = {
                        let mut m = d.meta.lock();
                        m.name = new_key.clone();
                        m.clone()
                    };
                    if let Err(e) = self.save_meta(&m) {
                        tracing::warn!("{new_key}: cannot record rename: {e}");
                    }
                    disks.insert(new_key, d);
                } else {
                    d.detach("renamed to a name that is not tracked");
                }
            }
        }
    }

    /// The file at `rel` was unlinked.
    pub fn on_unlink(&self, rel: &Path) {
        let key = rel.to_string_lossy().into_owned();
        if let Some(d) = self.disks.lock().remove(&key) {
            d.detach("deleted");
        }
    }

    /// Seal the current cycle of every tracked disk at one instant and write
    /// one `.hrl` per disk. Disks needing a resync get no log (the entry says
    /// why). Call after flushing the kernel's write-back cache (the daemon
    /// does `syncfs` on the mount first).
    pub fn cut(&self) -> Result<CutReport, TrackError> {
        let mut mm = self.cut_serial.lock();
        let cycle = mm.cut_seq + 1;
        let cut_ns = now_ns();
        let mut work = Vec::new();
        let mut entries = Vec::new();
        {
            let _instant = self.shared.cut_lock.write();
            let disks = self.disks.lock();
            let mut names: Vec<&String> = disks.keys().collect();
            names.sort();
            for name in names {
                let d = &disks[name];
                let meta = d.meta.lock().clone();
                if let DiskState::ResyncRequired(why) = &meta.state {
                    entries.push(CutEntry {
                        disk: name.clone(),
                        cycle,
                        base_cycle: meta.cycle,
                        log: None,
                        dirty_blocks: d.dirty.read().count(),
                        log_bytes: 0,
                        error: Some(format!("resync required: {why}")),
                    });
                    continue;
                }
                let size = match d.reader.metadata() {
                    Ok(m) => m.len(),
                    Err(e) => {
                        entries.push(CutEntry {
                            disk: name.clone(),
                            cycle,
                            base_cycle: meta.cycle,
                            log: None,
                            dirty_blocks: 0,
                            log_bytes: 0,
                            error: Some(format!("cannot stat the disk: {e}")),
                        });
                        continue;
                    }
                };
                let bs = self.shared.block_size;
                let sealed = std::mem::replace(
                    &mut *d.dirty.write(),
                    Bitmap::new(size.div_ceil(bs)),
                );
                let s = Arc::new(Sealing {
                    dirty: sealed,
                    size,
                    state: Mutex::new(SealState::default()),
                });
                *d.sealing.lock() = Some(s.clone());
                work.push((name.clone(), d.clone(), s, meta));
            }
        }
        for (name, d, s, meta) in work {
            let header = HrlHeader {
                disk_id: d.id,
                disk_name: name.clone(),
                cycle,
                base_cycle: meta.cycle,
                block_size: self.shared.block_size as u32,
                base_size: meta.size,
                disk_size: s.size,
                cut_unix_ns: cut_ns,
            };
            let rel = StateDir::log_rel(&meta.folder, cycle);
            let dirty_blocks = s.dirty.count();
            let result = d.materialize(&self.state, &rel, &header, &s);
            *d.sealing.lock() = None;
            match result {
                Ok(bytes) => {
                    let m = {
                        let mut m = d.meta.lock();
                        m.cycle = cycle;
                        m.size = s.size;
                        m.clone()
                    };
                    let saved = self.save_meta(&m);
                    entries.push(CutEntry {
                        disk: name,
                        cycle,
                        base_cycle: meta.cycle,
                        log: Some(self.root_path.join(&rel)),
                        dirty_blocks,
                        log_bytes: bytes,
                        error: saved.err().map(|e| format!("log written but state not saved: {e}")),
                    });
                }
                Err(e) => {
                    // Keep every change for the next cut: same base, union of bits.
                    d.dirty.write().merge_from(&s.dirty);
                    tracing::error!(disk = %name, "cut {cycle}: {e}; changes kept for the next cut");
                    entries.push(CutEntry {
                        disk: name,
                        cycle,
                        base_cycle: meta.cycle,
                        log: None,
                        dirty_blocks,
                        log_bytes: 0,
                        error: Some(format!("{e}; changes kept for the next cut")),
                    });
                }
            }
        }
        mm.cut_seq = cycle;
        self.state
            .write_json(Path::new("mount.json"), &*mm)
            .map_err(|e| io_state(&self.root_path.join(STATE_DIR), e))?;
        Ok(CutReport {
            cycle,
            cut_unix_ns: cut_ns,
            disks: entries,
        })
    }

    pub fn status(&self) -> TrackerStatus {
        let cut_seq = self.cut_serial.lock().cut_seq;
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
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        TrackerStatus {
            root: self.root_path.clone(),
            cut_seq,
            previous_stop_clean: self.previous_stop_clean,
            disks: out,
        }
    }

    /// Save every bitmap and mark the mount clean. Call once no request can
    /// reach the file system any more (after the FUSE session ended).
    pub fn shutdown_clean(&self) -> Result<(), TrackError> {
        let mut mm = self.cut_serial.lock();
        let spath = self.root_path.join(STATE_DIR);
        let disks = self.disks.lock();
        for d in disks.values() {
            let mut m = d.meta.lock().clone();
            if let Ok(md) = d.reader.metadata() {
                m.ino = md.ino();
                m.shutdown_size = md.len();
                m.shutdown_mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            }
            let bm = d.dirty.read();
            let enc = state::encode_bitmap(m.block_size, bm.len(), &bm.to_words());
            self.state
                .write_atomic(&PathBuf::from(format!("disks/{}/bitmap", m.folder)), &enc)
                .map_err(|e| io_state(&spath, e))?;
            self.save_meta(&m).map_err(|e| io_state(&spath, e))?;
        }
        mm.clean = true;
        self.state
            .write_json(Path::new("mount.json"), &*mm)
            .map_err(|e| io_state(&spath, e))?;
        Ok(())
    }
}

#[derive(Default)]
struct SealState {
    /// Blocks whose as-of-cut content is already accounted for (saved below
    /// or already read into the log).
    captured: HashMap<u64, ()>,
    /// Pre-images saved by writers, consumed by the materialiser.
    saved: HashMap<u64, Vec<u8>>,
    /// A copy-before-write read failed: this cycle cannot be materialised.
    failed: Option<String>,
}

/// A sealed cycle being written into its log.
struct Sealing {
    dirty: Bitmap,
    /// Disk size at the cut.
    size: u64,
    state: Mutex<SealState>,
}

/// One tracked disk. Every mutation of the backing file goes through here.
pub struct TrackedDisk {
    shared: Arc<Shared>,
    id: [u8; 16],
    ino: u64,
    dev: u64,
    /// Private buffered read-only descriptor (copy-before-write, logs).
    reader: File,
    dirty: RwLock<Bitmap>,
    sealing: Mutex<Option<Arc<Sealing>>>,
    meta: Mutex<DiskMeta>,
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
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

    fn detach(&self, why: &str) {
        tracing::info!(disk = %self.meta.lock().name, "no longer tracked: {why}");
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
            if !s.dirty.get(b) || st.captured.contains_key(&b) {
                b += 1;
                continue;
            }
            let mut e = b;
            while e < last && s.dirty.get(e + 1) && !st.captured.contains_key(&(e + 1)) {
                e += 1;
            }
            let mut buf = vec![0u8; ((e - b + 1) * bs) as usize];
            if let Err(err) = read_full_at(&self.reader, &mut buf, b * bs) {
                st.failed = Some(format!("copy-before-write read failed: {err}"));
                return;
            }
            for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                let blk = b + i as u64;
                st.captured.insert(blk, ());
                st.saved.insert(blk, chunk.to_vec());
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

    /// Write `data` at `offset` through `file` (the FS's open handle, which
    /// may be O_DIRECT) and record it. Returns bytes written.
    pub fn write_at(&self, file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return file.write_at(data, offset);
        }
        let _cut = self.shared.cut_lock.read();
        let (first, last) = self.span(offset, data.len() as u64);
        self.preserve(first, last);
        let r = file.write_at(data, offset);
        // Marked whatever the outcome: an over-approximation is always safe.
        self.mark(first, last);
        r
    }

    /// Truncate or extend to `len`.
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        let _cut = self.shared.cut_lock.read();
        let old = file.metadata()?.len();
        if len < old {
            let (first, last) = self.span(len, old - len);
            self.preserve(first, last);
            let r = file.set_len(len);
            self.mark(first, last);
            r
        } else {
            // Growth reads as zeros; applying a log sets the length first.
            file.set_len(len)
        }
    }

    /// fallocate(2) with `mode` (incl. PUNCH_HOLE / ZERO_RANGE).
    pub fn fallocate(&self, file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let _cut = self.shared.cut_lock.read();
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
            self.preserve(f, l);
        }
        // SAFETY: valid fd; kernel validates the arguments.
        let r = unsafe {
            libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t)
        };
        let res = if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        if let Some((f, l)) = range {
            self.mark(f, l);
        }
        res
    }

    /// Stream the sealed cycle into a log at `rel`; returns the log size.
    fn materialize(
        &self,
        state: &StateDir,
        rel: &Path,
        header: &HrlHeader,
        s: &Sealing,
    ) -> Result<u64, String> {
        let bs = self.bs();
        let final_path = state.display.parent().unwrap_or(Path::new("/")).join(rel);
        // The writer needs a real path; reach it through /proc and the root fd.
        let real = PathBuf::from(format!(
            "/proc/self/fd/{}/{}",
            state.root_fd().as_raw_fd(),
            rel.display()
        ));
        let mut w = HrlWriter::create(&real, header)
            .map_err(|e| format!("cannot create {}: {e}", final_path.display()))?;
        let nblocks = s.size.div_ceil(bs);
        let per_chunk = (CHUNK_BYTES / bs).max(1);
        for (start, count) in s.dirty.runs(nblocks) {
            let end = start + count;
            let mut b = start;
            while b < end {
                let ce = (b + per_chunk).min(end);
                let mut buf = vec![0u8; ((ce - b) * bs) as usize];
                {
                    let mut st = s.state.lock();
                    if let Some(f) = &st.failed {
                        return Err(f.clone());
                    }
                    let mut i = b;
                    while i < ce {
                        let o = ((i - b) * bs) as usize;
                        if let Some(saved) = st.saved.remove(&i) {
                            buf[o..o + saved.len()].copy_from_slice(&saved);
                            i += 1;
                            continue;
                        }
                        if st.captured.contains_key(&i) {
                            i += 1;
                            continue;
                        }
                        let mut j = i;
                        while j + 1 < ce
                            && !st.captured.contains_key(&(j + 1))
                            && !st.saved.contains_key(&(j + 1))
                        {
                            j += 1;
                        }
                        let oe = ((j + 1 - b) * bs) as usize;
                        read_full_at(&self.reader, &mut buf[o..oe], i * bs)
                            .map_err(|e| format!("reading the disk at block {i}: {e}"))?;
                        for k in i..=j {
                            st.captured.insert(k, ());
                        }
                        i = j + 1;
                    }
                }
                let off = b * bs;
                let len = (ce * bs).min(s.size) - off;
                w.append(off, &buf[..len as usize])
                    .map_err(|e| format!("writing {}: {e}", final_path.display()))?;
                b = ce;
            }
        }
        let sum = w
            .finish()
            .map_err(|e| format!("sealing {}: {e}", final_path.display()))?;
        Ok(sum.file_bytes)
    }

    pub fn name(&self) -> String {
        self.meta.lock().name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

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
