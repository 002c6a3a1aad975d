//! Seeding the tracking state of a folder that is **not mounted**, so that
//! the next `vdrep mount` of it starts from a known replication base
//! instead of a new identity.
//!
//! A failover turns a replica into live disks (and live disks into a
//! replica): both sides then hold the same bytes as of one cycle. Seeding
//! records, for each disk file, the identity it had at the other site, that
//! cycle as the last sealed one, an empty dirty bitmap and the file's
//! current size, inode and mtime, and marks the folder cleanly stopped. The
//! mount then attaches the disk in state Normal and the next log chains on
//! the replica at the other site: only changes travel.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::state::{self, DiskMeta, MountMeta, StateDir};
use super::{folder_name, hex, STATE_DIR};

/// One disk to seed.
#[derive(Debug, Clone)]
pub struct SeedDisk {
    /// Path of the disk file relative to the folder (as the mount names it).
    pub name: String,
    /// The disk's identity (as in its logs at the other site).
    pub id: [u8; 16],
    /// The cycle both sites hold.
    pub cycle: u64,
    /// Tracking block size (must match the mount's `--block-size`).
    pub block_size: u32,
}

/// Errors of [`seed`].
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{dir}: is mounted by a running vdrep daemon; unmount it (`vdrep umount {dir}`) before seeding its tracking state")]
    Mounted { dir: PathBuf },
    #[error("{path}: {what}")]
    Io { path: PathBuf, what: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> SeedError {
    SeedError::Io {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

/// Seed `dir`'s tracking state for `disks` (see the module docs). Any
/// earlier identity of the same file names is detached. `dir` must not be
/// mounted by vdrep.
pub fn seed(dir: &Path, disks: &[SeedDisk]) -> Result<(), SeedError> {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if crate::ipc::listening(&crate::ipc::mount_socket(&canon)) {
        return Err(SeedError::Mounted {
            dir: dir.to_path_buf(),
        });
    }
    let root: OwnedFd = std::fs::File::open(dir)
        .map_err(|e| io(dir, format!("cannot open the folder: {e}")))?
        .into();
    let st = StateDir::open(root, dir).map_err(|e| io(&dir.join(STATE_DIR), e))?;
    let spath = dir.join(STATE_DIR);
    let mm: Option<MountMeta> = st
        .read_json(Path::new("mount.json"))
        .map_err(|e| io(&spath, e))?;
    // Detach earlier identities of these names.
    for folder in st.disk_folders().map_err(|e| io(&spath, e))? {
        if let Ok(Some(mut m)) = st.read_meta(&folder) {
            if !m.detached && disks.iter().any(|d| d.name == m.name) {
                m.detached = true;
                st.write_meta(&m).map_err(|e| io(&spath, e))?;
            }
        }
    }
    let mut cut_seq = mm.as_ref().map_or(0, |m| m.cut_seq);
    for d in disks {
        let file = dir.join(&d.name);
        let md = std::fs::symlink_metadata(&file)
            .map_err(|e| io(&file, format!("cannot stat the disk to seed: {e}")))?;
        if !md.is_file() {
            return Err(io(&file, "is not a regular file"));
        }
        let bs = u64::from(d.block_size);
        if !d.block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&d.block_size) {
            return Err(io(&file, format!("bad block size {}", d.block_size)));
        }
        let folder = folder_name(&d.name, &d.id);
        st.mkdir(&Path::new(STATE_DIR).join("disks").join(&folder))
            .map_err(|e| io(&spath, e))?;
        // Leftover logs of an earlier life of this identity do not chain.
        if let Ok(f) = st.openat(
            &Path::new(STATE_DIR).join("disks").join(&folder),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        ) {
            for n in state::list_dir(f).unwrap_or_default() {
                if n.ends_with(".hrl") || n == "bitmap" {
                    let _ = st.remove(&PathBuf::from(format!("disks/{folder}/{n}")));
                }
            }
        }
        let nbits = md.len().div_ceil(bs);
        let words = vec![0u64; nbits.div_ceil(64) as usize];
        st.write_atomic(
            &PathBuf::from(format!("disks/{folder}/bitmap")),
            &state::encode_bitmap(d.block_size, nbits, &words),
        )
        .map_err(|e| io(&spath, e))?;
        let m = DiskMeta::clean(
            hex(&d.id),
            d.name.clone(),
            folder.clone(),
            d.block_size,
            d.cycle,
            &md,
        );
        st.write_meta(&m).map_err(|e| io(&spath, e))?;
        cut_seq = cut_seq.max(d.cycle);
    }
    let meta = MountMeta {
        clean: true,
        cut_seq,
        pid: 0,
        reserved: 0,
    };
    st.write_json(Path::new("mount.json"), &meta)
        .map_err(|e| io(&spath, e))?;
    Ok(())
}
