//! Forgetting a VM: its replica disks, their history (undo records, logs
//! not yet applied) and its recovery points leave the store for good
//! (`vdrep forget`). Refused while the VM runs here after a failover or a
//! test failover exposes one of its points.
//!
//! Crash-safe by one rename: the VM folder moves to `vms/.forget-<vm>-<n>`
//! (a name no VM can have, so nothing reads it any more) and is deleted
//! after; [`Store::recover`] deletes what a crash left of it.

use super::*;

/// Prefix of a VM folder being deleted.
const FORGET_PREFIX: &str = ".forget-";

/// What [`Site::forget`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForgetReport {
    /// Replica disks deleted.
    pub disks: usize,
    /// Recovery points deleted.
    pub points: usize,
    /// Bytes of files deleted (replicas, history, logs).
    pub bytes: u64,
}

/// Bytes of the regular files under `dir` (not following symlinks).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

impl Site<'_> {
    /// Delete `vm`'s replica and history. [`StoreError::InUse`] while the
    /// VM is live here (failed over, committed or not) or a point of it is
    /// exposed; [`StoreError::NotReady`] if the store holds no such VM.
    pub fn forget(&self, vm: &str) -> Result<ForgetReport> {
        validate_name("vm", vm)?;
        let ctx = self.ctx(vm, "");
        let vms = self.dir.join("vms");
        let known = std::fs::symlink_metadata(vms.join(vm)).is_ok_and(|m| m.is_dir());
        if !known {
            return Err(StoreError::NotReady {
                ctx,
                what: format!("the store holds no replica of {vm} from this site"),
            });
        }
        let vmd = self.vm_dir(vm, false)?;
        if let Some(l) = self.live(vm)? {
            return Err(StoreError::InUse {
                ctx,
                what: format!(
                    "{vm} failed over to this site{} and runs from {}; its replica is its disks now",
                    if l.committed { "" } else { " (not committed)" },
                    l.dir.display()
                ),
            });
        }
        let pinned = self.store.pins(&self.name, vm);
        if !pinned.is_empty() {
            return Err(StoreError::InUse {
                ctx,
                what: format!(
                    "a test failover exposes point(s) {pinned:?}: remove it first (`vdrep failover {vm} --cleanup`)"
                ),
            });
        }
        let points = self.points(vm).map(|p| p.len()).unwrap_or(0);
        let disk_dirs: Vec<PathBuf> = list_dir(&vmd.join("disks"))
            .iter()
            .filter(|n| parse_hex_id(n).is_some())
            .map(|n| vmd.join("disks").join(n))
            .collect();
        // No apply, initial copy or resync of these disks runs while the
        // folder moves away.
        let _held: Vec<_> = disk_dirs.iter().map(|d| self.store.lock(d)).collect();
        if disk_dirs
            .iter()
            .any(|d| !self.store.live_readers(d).is_empty())
        {
            return Err(StoreError::InUse {
                ctx,
                what: "a recovery point of it is being read (test failover view): remove it first (`vdrep failover NAME --cleanup`)".into(),
            });
        }
        let report = ForgetReport {
            disks: disk_dirs.len(),
            points,
            bytes: tree_bytes(&vmd),
        };
        let trash = vms.join(format!("{FORGET_PREFIX}{vm}-{}", hex(&random_id()[..4])));
        std::fs::rename(&vmd, &trash)
            .and_then(|()| sync_dir(&vms))
            .map_err(|e| self.io(&ctx, "moving the VM folder away", &vmd, e))?;
        crash_point("forget-moved");
        std::fs::remove_dir_all(&trash)
            .map_err(|e| self.io(&ctx, "deleting the forgotten VM folder", &trash, e))?;
        Ok(report)
    }

    /// Delete what a crash during [`Site::forget`] left; the names deleted.
    pub(super) fn clean_forgotten(&self) -> Vec<String> {
        let vms = self.dir.join("vms");
        let mut out = Vec::new();
        for n in list_dir(&vms) {
            if n.starts_with(FORGET_PREFIX) && std::fs::remove_dir_all(vms.join(&n)).is_ok() {
                out.push(format!("{}/{n}", self.name));
            }
        }
        out
    }
}
