//! Persisted tracking state under `<folder>/.vdrep/`, reached only through
//! the folder's pre-mount descriptor (never through the mount itself).
//!
//! Layout:
//! - `mount.json`: `{clean, cut_seq, pid}`. `clean=false` is written (and
//!   fsynced) when a mount starts and `clean=true` only after a clean
//!   shutdown saved every bitmap; finding `false` at the next mount means the
//!   previous daemon died and no bitmap can be trusted. While the mount
//!   runs, `cut_seq` is a reservation: a cut that passes it writes the file
//!   with `cut_seq` 4096 cycles ahead, so after a crash the next cycle
//!   number skips the unused rest (numbers only ever grow); a clean
//!   shutdown saves the exact last number.
//! - `disks/<folder>/meta.slots`: identity, name, last sealed cycle and the
//!   disk's size, inode and mtime at the last clean shutdown, and its state,
//!   as JSON in one of two fixed slots ([`StateDir::write_meta`]): a save
//!   overwrites the older slot in place and `fdatasync`s it (every cycle
//!   saves it, and an atomic replace cost 4–5× the time and CPU here,
//!   `kernel-notes/replication-speed.md`, session 29); a torn save leaves
//!   the other slot, the save before. `meta.json` (the same JSON, replaced
//!   whole) is read when there is no slot file (a folder tracked by an
//!   older vdrep) and removed at the first save.
//! - `disks/<folder>/bitmap`: the unsealed cycle's dirty bitmap, saved at a
//!   clean shutdown (magic `VDREPBM1`, block size, bit count, xxh3-64, words).
//! - `disks/<folder>/<cycle>.hrl`: sealed change logs.
//! - `disks/<folder>/al`: the activity log, the durable set of the 4 MiB
//!   extents written since the disk's last finished cycle (see
//!   [`super::activity`]).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Whether a disk's tracked changes can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason")]
pub enum TrackState {
    Normal,
    /// The bitmap or logs cannot be trusted; only a resync makes a replica
    /// equal again. The string says why.
    ResyncRequired(String),
}

/// How much of a disk a required resync must compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResyncScope {
    /// Every block.
    #[default]
    Full,
    /// Only the extents of the disk's activity log (an unclean stop with
    /// the activity log on), plus the blocks of its sealed logs not shipped
    /// yet: a small resync, started at once.
    Extents,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountMeta {
    pub clean: bool,
    /// In memory: the last cycle number used. On disk: at least that, and
    /// at least every number a cut may use before the file is written
    /// again ([`MountMeta::reserved`]).
    pub cut_seq: u64,
    pub pid: u32,
    /// Cycle numbers up to this are durable in `mount.json` already, so a
    /// cut below it need not write the file (one write per
    /// `CYCLE_RESERVE` cuts instead of one per cut, which serialised every
    /// VM's cut behind an fsync). Not saved; a crash skips at most the
    /// unused rest of the reservation.
    #[serde(skip)]
    pub reserved: u64,
}

impl MountMeta {
    /// What `mount.json` must say now: `cut_seq` covers the reservation.
    pub fn durable(&self) -> MountMeta {
        MountMeta {
            cut_seq: self.cut_seq.max(self.reserved),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    pub id: String,
    pub name: String,
    pub folder: String,
    pub block_size: u32,
    /// Last cycle sealed into a log (the base of the next log).
    pub cycle: u64,
    /// Disk size at `cycle`.
    pub size: u64,
    pub state: TrackState,
    /// Identity of the backing file at the last clean shutdown.
    pub ino: u64,
    pub shutdown_size: u64,
    pub shutdown_mtime_ns: i64,
    /// The file was deleted, replaced or swapped: this identity is over.
    #[serde(default)]
    pub detached: bool,
    /// Pending changes passed the protection's threshold: no logs are
    /// written for this disk (its changes since `cycle` are all in the
    /// bitmap) until the sender ships them as one cycle.
    #[serde(default)]
    pub bitmap_only: bool,
    /// With `state` ResyncRequired: what the resync must compare.
    #[serde(default)]
    pub resync_scope: ResyncScope,
}

impl DiskMeta {
    /// A disk tracked from cycle `cycle` on with nothing pending: Normal,
    /// and its file as `md` describes it (size, inode, and the shutdown
    /// size and mtime a remount compares against).
    pub fn clean(
        id: String,
        name: String,
        folder: String,
        block_size: u32,
        cycle: u64,
        md: &std::fs::Metadata,
    ) -> DiskMeta {
        use std::os::unix::fs::MetadataExt;
        DiskMeta {
            id,
            name,
            folder,
            block_size,
            cycle,
            size: md.len(),
            state: TrackState::Normal,
            ino: md.ino(),
            shutdown_size: md.len(),
            shutdown_mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            detached: false,
            bitmap_only: false,
            resync_scope: Default::default(),
        }
    }

    /// The disk needs a resync of every block.
    pub fn require_full_resync(&mut self, why: impl Into<String>) {
        self.state = TrackState::ResyncRequired(why.into());
        self.resync_scope = ResyncScope::Full;
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Handle on the state folder.
pub struct StateDir {
    root: OwnedFd,
    /// How the state folder is seen by users (through the mount).
    pub display: PathBuf,
    /// Files being replaced by [`StateDir::write_atomic`] (all through one
    /// temp name each): a second writer of the same file waits.
    writing: parking_lot::Mutex<std::collections::HashSet<PathBuf>>,
    written: parking_lot::Condvar,
}

impl StateDir {
    /// Create `.vdrep/disks` under `root` if missing.
    pub fn open(root: OwnedFd, display_root: &Path) -> io::Result<Self> {
        let s = StateDir {
            root,
            display: display_root.join(super::STATE_DIR),
            writing: Default::default(),
            written: Default::default(),
        };
        s.mkdir(Path::new(super::STATE_DIR))?;
        s.mkdir(&Path::new(super::STATE_DIR).join("disks"))?;
        Ok(s)
    }

    pub fn root_fd(&self) -> &OwnedFd {
        &self.root
    }

    fn rel(p: &Path) -> PathBuf {
        Path::new(super::STATE_DIR).join(p)
    }

    pub fn mkdir(&self, rel_to_root: &Path) -> io::Result<()> {
        let c = cpath(rel_to_root)?;
        // SAFETY: valid dirfd and NUL-terminated path.
        let r = unsafe { libc::mkdirat(self.root.as_raw_fd(), c.as_ptr(), 0o700) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Open a file relative to the folder root.
    pub fn openat(&self, rel_to_root: &Path, flags: i32, mode: u32) -> io::Result<File> {
        let c = cpath(rel_to_root)?;
        // SAFETY: valid dirfd and NUL-terminated path; the fd is owned below.
        let fd = unsafe {
            libc::openat(
                self.root.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by openat and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Read a state file (path relative to `.vdrep/`); `None` if absent.
    pub fn read(&self, rel: &Path) -> io::Result<Option<Vec<u8>>> {
        match self.openat(&Self::rel(rel), libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
            Ok(mut f) => {
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
                Ok(Some(v))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Durably replace a state file: temp file, fsync, rename, fsync dir.
    /// Writers of the same file go one at a time (they share the temp
    /// name: two at once could rename a mix of both, or fail `ENOENT`);
    /// which content lands last is the callers' order.
    pub fn write_atomic(&self, rel: &Path, data: &[u8]) -> io::Result<()> {
        let full = Self::rel(rel);
        {
            let mut w = self.writing.lock();
            while w.contains(&full) {
                self.written.wait(&mut w);
            }
            w.insert(full.clone());
        }
        let r = self.replace(&full, data);
        self.writing.lock().remove(&full);
        self.written.notify_all();
        r
    }

    fn replace(&self, full: &Path, data: &[u8]) -> io::Result<()> {
        let parent = full.parent().unwrap_or(Path::new(super::STATE_DIR));
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.tmp"));
        {
            let mut f = self.openat(
                &tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                0o600,
            )?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        let (ct, cf) = (cpath(&tmp)?, cpath(full)?);
        let fd = self.root.as_raw_fd();
        // SAFETY: valid dirfd and NUL-terminated paths.
        if unsafe { libc::renameat(fd, ct.as_ptr(), fd, cf.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.fsync_dir(parent)
    }

    pub fn fsync_dir(&self, rel_to_root: &Path) -> io::Result<()> {
        let d = self.openat(rel_to_root, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        d.sync_all()
    }

    /// Remove a file given relative to the folder root (absent: fine).
    pub fn remove_at_root(&self, rel_to_root: &Path) -> io::Result<()> {
        let c = cpath(rel_to_root)?;
        // SAFETY: valid dirfd and NUL-terminated path.
        if unsafe { libc::unlinkat(self.root.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Remove a state file (path relative to `.vdrep/`; absent: fine).
    pub fn remove(&self, rel: &Path) -> io::Result<()> {
        self.remove_at_root(&Self::rel(rel))
    }

    /// Names of the per-disk state folders.
    pub fn disk_folders(&self) -> io::Result<Vec<String>> {
        let d = self.openat(
            &Self::rel(Path::new("disks")),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        list_dir(d).map(|v| v.into_iter().filter(|n| !n.starts_with('.')).collect())
    }

    pub fn read_json<T: for<'de> Deserialize<'de>>(&self, rel: &Path) -> io::Result<Option<T>> {
        match self.read(rel)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.display.join(rel).display()),
                )
            }),
        }
    }

    pub fn write_json<T: Serialize>(&self, rel: &Path, v: &T) -> io::Result<()> {
        let b = serde_json::to_vec_pretty(v).map_err(io::Error::other)?;
        self.write_atomic(rel, &b)
    }

    /// A disk's meta (see the module docs): the newest whole slot of
    /// `disks/<folder>/meta.slots`, else `meta.json`; `None` if neither
    /// exists. Both slots damaged (or a slot file with no slot written) is
    /// `InvalidData`.
    pub fn read_meta(&self, folder: &str) -> io::Result<Option<DiskMeta>> {
        let rel = Self::rel(&meta_slots_rel(folder));
        let f = match self.openat(&rel, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return self.read_json(&PathBuf::from(format!("disks/{folder}/meta.json")));
            }
            Err(e) => return Err(e),
        };
        let shown = || self.display.join(meta_slots_rel(folder));
        let newest = read_slots(&f)?
            .into_iter()
            .flatten()
            .max_by_key(|(seq, _)| *seq)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: neither slot holds a whole meta", shown().display()),
                )
            })?;
        serde_json::from_slice(&newest.1).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", shown().display()),
            )
        })
    }

    /// Save a disk's meta durably: into the slot of `meta.slots` that does
    /// not hold the newest whole save, then `fdatasync`. The first save
    /// creates the file (temp file, fsync, rename, folder fsync) and
    /// removes a `meta.json`. Saves of one disk go one at a time.
    pub fn write_meta(&self, m: &DiskMeta) -> io::Result<()> {
        let body = serde_json::to_vec(m).map_err(io::Error::other)?;
        if body.len() > SLOT_BYTES - SLOT_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the meta of disk {} is {} bytes, more than a slot holds ({})",
                    m.name,
                    body.len(),
                    SLOT_BYTES - SLOT_HEADER
                ),
            ));
        }
        let rel = meta_slots_rel(&m.folder);
        let full = Self::rel(&rel);
        {
            let mut w = self.writing.lock();
            while w.contains(&full) {
                self.written.wait(&mut w);
            }
            w.insert(full.clone());
        }
        let r = self.put_slot(&m.folder, &full, &body);
        self.writing.lock().remove(&full);
        self.written.notify_all();
        r
    }

    fn put_slot(&self, folder: &str, full: &Path, body: &[u8]) -> io::Result<()> {
        let f = match self.openat(full, libc::O_RDWR | libc::O_NOFOLLOW, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut first = encode_slot(1, body);
                first.resize(2 * SLOT_BYTES, 0);
                self.replace(full, &first)?;
                let _ = self.remove(&PathBuf::from(format!("disks/{folder}/meta.json")));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let slots = read_slots(&f)?;
        // Overwrite the slot without the newest whole save (a torn or
        // empty slot first); the new save is one newer than any.
        let newest = slots
            .iter()
            .flatten()
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0);
        let at = match (&slots[0], &slots[1]) {
            (None, _) => 0,
            (_, None) => 1,
            (Some((a, _)), Some((b, _))) => usize::from(a > b),
        };
        f.write_all_at(&encode_slot(newest + 1, body), (at * SLOT_BYTES) as u64)?;
        f.sync_data()
    }

    /// The `.hrl` path of `cycle` for a disk folder, relative to the root.
    pub fn log_rel(folder: &str, cycle: u64) -> PathBuf {
        Self::rel(&PathBuf::from(format!("disks/{folder}/{cycle:010}.hrl")))
    }
}

/// A disk's meta slot file, relative to `.vdrep/`.
fn meta_slots_rel(folder: &str) -> PathBuf {
    PathBuf::from(format!("disks/{folder}/meta.slots"))
}

/// Bytes per slot of a slot file (the file holds two).
const SLOT_BYTES: usize = 64 << 10;
/// A slot: magic, sequence number (u64), body length (u32), xxh3-64 of
/// the sequence number, length and body; then the body.
const SLOT_HEADER: usize = 28;
const SLOT_MAGIC: &[u8; 8] = b"VDREPMS1";

fn slot_sum(seq_len: &[u8], body: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(seq_len);
    h.update(body);
    h.digest()
}

fn encode_slot(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SLOT_HEADER + body.len());
    v.extend_from_slice(SLOT_MAGIC);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let sum = slot_sum(&v[8..20], body);
    v.extend_from_slice(&sum.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// A whole slot: its sequence number and body.
type Slot = (u64, Vec<u8>);

/// Both slots of a slot file (`None`: torn, damaged or never written).
fn read_slots(f: &File) -> io::Result<[Option<Slot>; 2]> {
    let mut out = [None, None];
    for (k, o) in out.iter_mut().enumerate() {
        let base = (k * SLOT_BYTES) as u64;
        let mut h = [0u8; SLOT_HEADER];
        if crate::util::read_full_at(f, &mut h, base)? < SLOT_HEADER || &h[..8] != SLOT_MAGIC {
            continue;
        }
        let (mut seq, mut len, mut sum) = ([0u8; 8], [0u8; 4], [0u8; 8]);
        seq.copy_from_slice(&h[8..16]);
        len.copy_from_slice(&h[16..20]);
        sum.copy_from_slice(&h[20..28]);
        let (seq, len, sum) = (
            u64::from_le_bytes(seq),
            u32::from_le_bytes(len) as usize,
            u64::from_le_bytes(sum),
        );
        if len > SLOT_BYTES - SLOT_HEADER {
            continue;
        }
        let mut body = vec![0u8; len];
        if crate::util::read_full_at(f, &mut body, base + SLOT_HEADER as u64)? < len {
            continue;
        }
        if slot_sum(&h[8..20], &body) == sum {
            *o = Some((seq, body));
        }
    }
    Ok(out)
}

/// List a directory's entry names (without `.` and `..`).
pub fn list_dir(dir: File) -> io::Result<Vec<String>> {
    let fd: OwnedFd = dir.into();
    let mut d = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io::Error::from)?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
    }
    Ok(out)
}

const BM_MAGIC: &[u8; 8] = b"VDREPBM1";

pub fn encode_bitmap(block_size: u32, nbits: u64, words: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(28 + words.len() * 8);
    v.extend_from_slice(BM_MAGIC);
    v.extend_from_slice(&block_size.to_le_bytes());
    v.extend_from_slice(&nbits.to_le_bytes());
    let mut body = Vec::with_capacity(words.len() * 8);
    for w in words {
        body.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(&bitmap_sum(&v[8..20], &body).to_le_bytes());
    v.extend_from_slice(&body);
    v
}

fn bitmap_sum(fields: &[u8], body: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(fields);
    h.update(body);
    h.digest()
}

/// Decode a saved bitmap; `None` if it is damaged or for another block size.
pub fn decode_bitmap(b: &[u8], block_size: u32) -> Option<(u64, Vec<u64>)> {
    if b.len() < 28 || &b[..8] != BM_MAGIC {
        return None;
    }
    let bs = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let nbits = u64::from_le_bytes(b[12..20].try_into().ok()?);
    let sum = u64::from_le_bytes(b[20..28].try_into().ok()?);
    let body = &b[28..];
    if bs != block_size || body.len() as u64 != nbits.div_ceil(64) * 8 {
        return None;
    }
    if bitmap_sum(&b[8..20], body) != sum {
        return None;
    }
    Some((
        nbits,
        body.chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_file_roundtrip_and_damage() {
        let words = vec![1u64, 0, u64::MAX];
        let enc = encode_bitmap(4096, 150, &words);
        assert_eq!(decode_bitmap(&enc, 4096), Some((150, words)));
        assert_eq!(decode_bitmap(&enc, 512), None);
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            if let Some((n, w)) = decode_bitmap(&bad, 4096) {
                panic!("corruption at byte {i} not detected: {n} {w:?}");
            }
        }
        assert_eq!(decode_bitmap(&enc[..enc.len() - 1], 4096), None);
    }

    fn state_dir(dir: &Path) -> StateDir {
        let root: OwnedFd = File::open(dir).expect("folder").into();
        StateDir::open(root, dir).expect("state dir")
    }

    fn meta(cycle: u64) -> DiskMeta {
        DiskMeta {
            id: "00".repeat(16),
            name: "v.img".into(),
            folder: "v.img-00".into(),
            block_size: 4096,
            cycle,
            size: 1 << 20,
            state: TrackState::Normal,
            ino: 7,
            shutdown_size: 0,
            shutdown_mtime_ns: 0,
            detached: false,
            bitmap_only: false,
            resync_scope: ResyncScope::Full,
        }
    }

    /// Saves alternate between the two slots; the newest whole one is
    /// read. A torn newest slot (any byte of it damaged, or cut short)
    /// gives the save before; the next save overwrites the torn slot, so
    /// the whole one is never the one written over.
    #[test]
    fn meta_slots_give_the_newest_whole_save_and_survive_a_torn_one() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let st = state_dir(tmp.path());
        st.mkdir(&Path::new(".vdrep/disks").join("v.img-00"))
            .expect("folder");
        assert!(st.read_meta("v.img-00").expect("read").is_none());
        for c in 1..=5 {
            st.write_meta(&meta(c)).expect("save");
            assert_eq!(
                st.read_meta("v.img-00").expect("read").map(|m| m.cycle),
                Some(c)
            );
        }
        let path = tmp.path().join(".vdrep/disks/v.img-00/meta.slots");
        let whole = std::fs::read(&path).expect("slots");
        // Save 5 is in slot 0 (saves 1, 3, 5), save 4 in slot 1.
        let len = encode_slot(5, &serde_json::to_vec(&meta(5)).expect("json")).len();
        for i in (0..len).step_by(7) {
            let mut torn = whole.clone();
            torn[i] ^= 0x10;
            std::fs::write(&path, &torn).expect("write");
            assert_eq!(
                st.read_meta("v.img-00").expect("read").map(|m| m.cycle),
                Some(4),
                "byte {i} damaged"
            );
        }
        // A save after a torn one goes into the torn slot.
        let mut torn = whole.clone();
        torn[SLOT_HEADER + 3] ^= 0x01;
        std::fs::write(&path, &torn).expect("write");
        st.write_meta(&meta(6)).expect("save");
        assert_eq!(
            st.read_meta("v.img-00").expect("read").map(|m| m.cycle),
            Some(6)
        );
        let f = File::open(&path).expect("open");
        let slots = read_slots(&f).expect("slots");
        assert_eq!(
            slots
                .iter()
                .map(|s| s.as_ref().map(|(q, _)| *q))
                .collect::<Vec<_>>(),
            vec![Some(5), Some(4)],
            "the torn slot 0 was written (sequence 5: one above the newest whole save)"
        );
        // Both damaged: a clear error, not a default.
        let mut both = std::fs::read(&path).expect("slots");
        both[SLOT_HEADER + 1] ^= 0x01;
        both[SLOT_BYTES + SLOT_HEADER + 1] ^= 0x01;
        std::fs::write(&path, &both).expect("write");
        let e = st.read_meta("v.img-00").expect_err("both slots damaged");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// A folder tracked by an older vdrep has `meta.json`: it is read, and
    /// the first save moves the meta into the slot file and removes it.
    #[test]
    fn a_legacy_meta_json_is_read_and_replaced_at_the_first_save() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let st = state_dir(tmp.path());
        st.mkdir(&Path::new(".vdrep/disks").join("v.img-00"))
            .expect("folder");
        st.write_json(Path::new("disks/v.img-00/meta.json"), &meta(9))
            .expect("legacy");
        assert_eq!(
            st.read_meta("v.img-00").expect("read").map(|m| m.cycle),
            Some(9)
        );
        st.write_meta(&meta(10)).expect("save");
        assert!(!tmp.path().join(".vdrep/disks/v.img-00/meta.json").exists());
        assert_eq!(
            st.read_meta("v.img-00").expect("read").map(|m| m.cycle),
            Some(10)
        );
    }
}
