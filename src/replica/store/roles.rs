//! Role changes of a VM's replica in the store: **promote** (the replica
//! leaves the store and becomes the VM's live disks, after a failover) and
//! **adopt** (live disks enter the store as the replica of the other site,
//! for reverse replication and failback).
//!
//! Both move files by `rename` (same file system), never copy: a failover
//! costs the undo records rolled back, not the disk size. A promoted VM has
//! `live.json` in its folder; while it is there (and while a promotion is
//! being made) the store refuses logs, applies, copies and points for the
//! VM ([`Site::check_replicating`]): it is no longer a replica here.

use super::*;

/// File in the VM folder while the VM is live at this site.
const LIVE: &str = "live.json";
/// File in the VM folder describing where adopted disks came from.
const ORIGIN: &str = "origin.json";
/// Until a failover is committed: the VM's points as before it (VM folder)
/// and each disk's state as before it (disk folder), for a cancel.
const KEEP: &str = "pre-failover.json";
/// Until commit: per disk, the undo records of the points a promotion
/// rolled back over, and the redo records that replay them.
const PARKED: &str = "parked-undo";
const REDO: &str = "redo";

/// One live disk of a promoted VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveDisk {
    /// 32 hex digits.
    pub disk_id: String,
    /// File name of the disk (as at the source).
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub block_size: u32,
}

/// A VM whose replica was promoted to live disks at this site.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveInfo {
    /// Folder holding the live disks.
    pub dir: PathBuf,
    /// The recovery point the live disks started from.
    pub cycle: u64,
    pub time_unix_ns: u64,
    pub disks: Vec<LiveDisk>,
    /// Set by `vdrep failover --commit`: the history before it is gone.
    #[serde(default)]
    pub committed: bool,
}

/// A live disk entering the store (see [`Site::adopt`]).
#[derive(Debug, Clone)]
pub struct AdoptDisk {
    pub disk_id: [u8; 16],
    /// The source file name (one component).
    pub name: String,
    /// Where the file is now; it is moved into the store.
    pub path: PathBuf,
    pub block_size: u32,
}

impl LiveInfo {
    /// Why replication of `vm` into this store is refused while it is live
    /// here: retryable ([`StoreError::Busy`]) until the failover is
    /// committed, since a cancel makes the store a replica again and the
    /// sender then goes on by itself; once committed, not retryable.
    pub fn replication_refused(&self, ctx: Ctx, vm: &str) -> StoreError {
        if self.committed {
            StoreError::NotReady {
                ctx,
                what: format!(
                    "this VM failed over to this site (live at {} since cycle {}, committed): replication towards here is over; once the old primary is back run `vdrep reverse {vm}` there",
                    self.dir.display(),
                    self.cycle
                ),
            }
        } else {
            StoreError::Busy {
                ctx,
                what: format!(
                    "this VM is failed over to this site (live at {} since cycle {}): replication towards here is paused; it goes on by itself after `vdrep failover {vm} --cancel` here, and after `--commit` it is over (then run `vdrep reverse {vm}` on the old primary)",
                    self.dir.display(),
                    self.cycle
                ),
            }
        }
    }
}

impl Site<'_> {
    /// Refuse replication into `vm` (logs, applies, copies, points) while
    /// it is failed over to this site ([`LiveInfo::replication_refused`]),
    /// or while a failover to this site is being made: `promote` writes the
    /// VM's pre-failover record before it takes any disk's lock, so a
    /// writer that checks this under a disk's lock either finishes before
    /// the promotion rolls that disk back or sees the record. A VM this
    /// store does not know yet is not refused.
    pub(super) fn check_replicating(&self, vm: &str) -> Result<()> {
        let Ok(vmd) = self.vm_dir(vm, false) else {
            return Ok(());
        };
        let vctx = self.ctx(vm, "");
        if let Some(live) = read_json_opt::<LiveInfo>(&vctx, &self.store.root, &vmd.join(LIVE))? {
            return Err(live.replication_refused(vctx, vm));
        }
        if vmd.join(KEEP).exists() {
            return Err(StoreError::Busy {
                ctx: vctx,
                what: format!(
                    "a failover of this VM to this site is under way (or was interrupted: run the same `vdrep failover {vm} --unplanned` again to finish it, then cancel or commit it)"
                ),
            });
        }
        Ok(())
    }

    /// The live state of `vm` if it was promoted here.
    pub fn live(&self, vm: &str) -> Result<Option<LiveInfo>> {
        let vmd = self.vm_dir(vm, false)?;
        read_json_opt(&self.ctx(vm, ""), &self.store.root, &vmd.join(LIVE))
    }

    /// `vm`'s folder, its context, its lock (held until the guard drops)
    /// and its live state: the opening of every change to a live VM.
    /// `NotReady` saying `not_live` if the VM is not live at this site.
    fn lock_live(
        &self,
        vm: &str,
        not_live: &str,
    ) -> Result<(PathBuf, Ctx, RuntimeGuard, LiveInfo)> {
        let vmd = self.vm_dir(vm, false)?;
        let vctx = self.ctx(vm, "");
        let vg = self.store.lock(&vmd);
        match read_json_opt::<LiveInfo>(&vctx, &self.store.root, &vmd.join(LIVE))? {
            Some(live) => Ok((vmd, vctx, vg, live)),
            None => Err(StoreError::NotReady {
                ctx: vctx,
                what: not_live.into(),
            }),
        }
    }

    /// Rename `from` to `to`; `doing` names the step in an error, and
    /// `same_fs` is the hint when they are on different file systems.
    fn rename_same_fs(
        &self,
        ctx: &Ctx,
        (from, to): (&Path, &Path),
        doing: &str,
        same_fs: &str,
    ) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| {
            let doing = if e.raw_os_error() == Some(libc::EXDEV) {
                format!("{doing} ({same_fs})")
            } else {
                doing.to_string()
            };
            self.io(ctx, &doing, to, e)
        })
    }

    /// Where adopted disks of `vm` came from (opaque to the store).
    pub fn origin(&self, vm: &str) -> Result<Option<serde_json::Value>> {
        let vmd = self.vm_dir(vm, false)?;
        read_json_opt(&self.ctx(vm, ""), &self.store.root, &vmd.join(ORIGIN))
    }

    /// The VM names with a folder in this namespace.
    pub fn vms(&self) -> Vec<String> {
        let mut v = list_dir(&self.dir.join("vms"));
        v.retain(|n| validate_name("vm", n).is_ok());
        v.sort();
        v
    }

    /// Disk ids (hex) of `vm` known to the store.
    fn disk_ids(&self, vm: &str) -> Result<Vec<[u8; 16]>> {
        let vmd = self.vm_dir(vm, false)?;
        let mut v: Vec<[u8; 16]> = list_dir(&vmd.join("disks"))
            .iter()
            .filter_map(|n| parse_hex_id(n))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Make `vm`'s replica, as of recovery point `point` (newest if
    /// `None`), the VM's live disks in `dest` (created if missing; on the
    /// store's file system). Newer points are dropped: the replica is rolled
    /// back through their undo records, newest first, crash-safely (each
    /// step marks `applying`, so recovery finishes an interrupted one).
    /// Raw sources get their raw file back (the VHD footer is cut off).
    /// Idempotent: a promotion interrupted by a crash completes when called
    /// again with the same `dest`. `names` maps a disk id (hex) to its path
    /// relative to `dest` (default: the source file name).
    pub fn promote(
        &self,
        vm: &str,
        point: Option<u64>,
        dest: &Path,
        names: &HashMap<String, String>,
    ) -> Result<LiveInfo> {
        let vmd = self.vm_dir(vm, false)?;
        let vctx = self.ctx(vm, "");
        let _vg = self.store.lock(&vmd);
        if let Some(live) = read_json_opt::<LiveInfo>(&vctx, &self.store.root, &vmd.join(LIVE))? {
            if live.dir != dest || point.is_some_and(|p| p != live.cycle) {
                return Err(StoreError::NotReady {
                    ctx: vctx,
                    what: format!(
                        "the VM is already live at {} (from cycle {}); fail it back or commit first",
                        live.dir.display(),
                        live.cycle
                    ),
                });
            }
            self.move_out(vm, &live)?;
            return Ok(live);
        }
        let mut pf = self.read_points(vm)?;
        let pt = match point {
            None => pf.points.last().cloned(),
            Some(c) => pf.points.iter().find(|p| p.cycle == c).cloned(),
        }
        .ok_or_else(|| StoreError::NoSuchPoint {
            ctx: vctx.clone(),
            cycle: point.unwrap_or(0),
            what: "no such recovery point; list them with `vdrep points`".into(),
        })?;
        // What a cancel restores (kept until commit). Written before any
        // disk is locked: from here on the store refuses replication into
        // the VM (`check_replicating`).
        if !vmd.join(KEEP).exists() {
            // The point may have been committed on durable logs not yet
            // applied: apply them (up to the point, nothing newer) while
            // replication is still allowed, so that KEEP, and a cancel,
            // restore the replica with them. A disk whose logs cannot be
            // applied fails the promotion here, before anything changed.
            for id in self.disk_ids(vm)? {
                if !pt.disks.contains(&hex(&id)) {
                    continue;
                }
                let p = self.disk(vm, &id, false)?;
                let _g = self.store.lock(&p.dir);
                let rc = self.drain_locked(&p, Some(pt.cycle), &mut |_| {})?;
                if rc < pt.cycle {
                    return Err(StoreError::NotReady {
                        ctx: p.ctx.clone(),
                        what: format!(
                            "point {} was committed, but this disk's logs reach only cycle {rc}: fail over to an older point (`vdrep points`)",
                            pt.cycle
                        ),
                    });
                }
            }
            self.write_json(&vctx, &vmd, KEEP, &pf)?;
        }
        let mut disks = Vec::new();
        for id in self.disk_ids(vm)? {
            if !pt.disks.contains(&hex(&id)) {
                continue;
            }
            let p = self.disk(vm, &id, false)?;
            let _g = self.store.lock(&p.dir);
            let mut st = self.state_or_unknown(&p)?;
            if st.initial_offset.is_some() || st.applying.is_some() {
                return Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: "the replica is between cycles: restart the receiver (it recovers) and retry".into(),
                });
            }
            // Logs not applied yet (the point's own were applied above)
            // belong to the discarded future (no point includes them: the
            // sender ships them again after a cancel).
            for (_, n) in self.incoming_logs(&p) {
                let _ = std::fs::remove_file(p.incoming.join(n));
            }
            if !p.dir.join(KEEP).exists() {
                self.write_json(&p.ctx, &p.dir, KEEP, &st)?;
            }
            self.roll_back_to(&p, &mut st, pt.cycle)?;
            let path = dest.join(names.get(&st.disk_id).unwrap_or(&st.name));
            disks.push(LiveDisk {
                disk_id: st.disk_id.clone(),
                name: st.name.clone(),
                path,
                size: st.size,
                block_size: st.block_size,
            });
        }
        if disks.is_empty() {
            return Err(StoreError::NotReady {
                ctx: vctx,
                what: "the VM has no replicated disks".into(),
            });
        }
        pf.points.retain(|p| p.cycle <= pt.cycle);
        self.write_points(&vctx, &vmd, &mut pf)?;
        std::fs::create_dir_all(dest)
            .map_err(|e| self.io(&vctx, "creating the live folder", dest, e))?;
        let live = LiveInfo {
            dir: dest.to_path_buf(),
            cycle: pt.cycle,
            time_unix_ns: pt.time_unix_ns,
            disks,
            committed: false,
        };
        // Intent first: a crash below is finished by calling again.
        self.write_json(&vctx, &vmd, LIVE, &live)?;
        crash_point("promote-intent");
        self.move_out(vm, &live)?;
        Ok(live)
    }

    /// The live disks of `vm` were moved from the folder promotion put
    /// them in to `dir` (same relative paths): record it.
    pub fn relocate_live(&self, vm: &str, dir: &Path) -> Result<LiveInfo> {
        let (vmd, vctx, _vg, mut live) = self.lock_live(vm, "the VM is not live at this site")?;
        for d in &mut live.disks {
            if let Ok(rel) = d.path.strip_prefix(&live.dir) {
                d.path = dir.join(rel);
            }
        }
        live.dir = dir.to_path_buf();
        self.write_json(&vctx, &vmd, LIVE, &live)?;
        Ok(live)
    }

    /// Roll `p`'s replica back to `cycle` through its undo records.
    fn roll_back_to(&self, p: &DiskPaths, st: &mut ReplicaState, cycle: u64) -> Result<()> {
        let mut recs = self.undo_records(p);
        recs.sort_by_key(|r| std::cmp::Reverse(r.1));
        let mut target: Option<Box<dyn ReplicaTarget>> = None;
        for (b, c, n) in recs {
            let rc = st.cycle.unwrap_or(0);
            if c <= cycle || c != rc {
                continue;
            }
            if target.is_none() {
                target = Some(self.open_replica(p, st, false)?);
            }
            let Some(t) = target.as_mut() else { break };
            // "Between b and c" (as during an apply): recovery without the
            // log rolls back with this very record.
            st.cycle = Some(b);
            st.applying = Some(c);
            self.write_state(p, st)?;
            let undop = p.undo.join(&n);
            // Keep the way forward again (for a cancel): the content as of
            // `c` of what the undo record is about to overwrite.
            let redop = p.dir.join(REDO).join(format!("{b}-{c}.redo"));
            if !redop.exists() {
                self.write_redo(p, &undop, t.as_ref(), &redop, c)?;
            }
            undo::apply_undo(&undop, t.as_mut())
                .map_err(|e| hrl_err(&p.ctx, &self.store.root, "rolling back to a point", c, e))?;
            let h = UndoLayer::open(&undop)
                .map_err(|e| hrl_err(&p.ctx, &self.store.root, "rolling back", c, e))?;
            st.size = h.header.disk_size;
            st.cycle_time_ns = h.header.cut_unix_ns;
            st.applying = None;
            self.write_state(p, st)?;
            let parked = p.dir.join(PARKED);
            std::fs::create_dir_all(&parked)
                .and_then(|()| std::fs::rename(&undop, parked.join(&n)))
                .map_err(|e| self.io(&p.ctx, "parking an undo record", &undop, e))?;
            crash_point("rollback-step");
            // The target's cached size follows the state.
            target = None;
        }
        if st.cycle != Some(cycle) {
            return Err(StoreError::NoSuchPoint {
                ctx: p.ctx.clone(),
                cycle,
                what: format!(
                    "the history of this disk does not reach back to it (the replica is at {:?})",
                    st.cycle
                ),
            });
        }
        Ok(())
    }

    /// Move the replicas named in `live` to their live paths (skipping the
    /// ones already moved).
    fn move_out(&self, vm: &str, live: &LiveInfo) -> Result<()> {
        for d in &live.disks {
            let Some(id) = parse_hex_id(&d.disk_id) else {
                continue;
            };
            let p = self.disk(vm, &id, false)?;
            let st = self.state_or_unknown(&p)?;
            let src = p.dir.join(&st.replica_file);
            if !src.exists() && d.path.exists() {
                continue; // moved before a crash
            }
            if d.path.exists() {
                return Err(StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: format!(
                        "{} already exists: move it away before the failover (vdrep never overwrites a disk)",
                        d.path.display()
                    ),
                });
            }
            if let Some(parent) = d.path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| self.io(&p.ctx, "creating the live folder", parent, e))?;
            }
            if st.format == ReplicaFormat::VhdOfRaw {
                // The raw disk is the VHD minus its footer.
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&src)
                    .and_then(|f| f.set_len(st.size).and_then(|()| f.sync_all()))
                    .map_err(|e| self.io(&p.ctx, "cutting the VHD footer", &src, e));
                f?;
            }
            self.rename_same_fs(
                &p.ctx,
                (&src, &d.path),
                "moving the replica to the live folder",
                "the live folder must be on the store's file system",
            )?;
            if let Some(parent) = d.path.parent() {
                let _ = sync_dir(parent);
            }
            let _ = sync_dir(&p.dir);
        }
        Ok(())
    }

    /// Write the redo record of undo record `undop` (log `base -> cycle`)
    /// from `t` (the replica at `cycle`): every range the undo restores and
    /// whatever lies past the base's size, as of `cycle`.
    fn write_redo(
        &self,
        p: &DiskPaths,
        undop: &Path,
        t: &dyn ReplicaTarget,
        redop: &Path,
        cycle: u64,
    ) -> Result<()> {
        let herr = |e| hrl_err(&p.ctx, &self.store.root, "saving a redo record", cycle, e);
        let io = |e| self.io(&p.ctx, "saving a redo record", redop, e);
        if let Some(d) = redop.parent() {
            std::fs::create_dir_all(d).map_err(io)?;
        }
        let mut r = HrlReader::open(undop).map_err(herr)?;
        let h = r.header().clone();
        let now = t.len();
        let rh = HrlHeader {
            base_size: h.disk_size,
            disk_size: now,
            app_consistent: false,
            ..h.clone()
        };
        let mut w = crate::hrl::HrlWriter::create(redop, &rh).map_err(herr)?;
        let mut buf = Vec::new();
        let mut end = 0u64;
        while let Some(rec) = r.next_record().map_err(herr)? {
            let a = rec.offset.max(end);
            let b = (rec.offset + u64::from(rec.length)).min(now);
            if a >= b {
                continue;
            }
            buf.resize((b - a) as usize, 0);
            t.read_at(&mut buf, a).map_err(io)?;
            w.append(a, &buf).map_err(herr)?;
            end = b;
        }
        // Growth of the log: cut off by the undo, put back by the redo.
        let mut off = h.disk_size.max(end);
        while off < now {
            let n = (now - off).min(1 << 20);
            buf.resize(n as usize, 0);
            t.read_at(&mut buf, off).map_err(io)?;
            w.append(off, &buf).map_err(herr)?;
            off += n;
        }
        w.finish().map_err(herr)?;
        Ok(())
    }

    /// Cancel the uncommitted failover of `vm`: its live disks (whose
    /// writes since the promotion the caller has already undone, see
    /// [`crate::tracking::preimage`]) move back into the store and replay
    /// the points the promotion rolled back over, so that the replica, its
    /// state and its recovery points are exactly as before the failover;
    /// `live.json` goes and the store accepts the VM's logs again.
    /// Idempotent: an interrupted cancel finishes when called again.
    pub fn cancel_failover(&self, vm: &str) -> Result<Vec<Point>> {
        let (vmd, vctx, _vg, live) = self.lock_live(
            vm,
            "the VM is not failed over to this site: there is nothing to cancel",
        )?;
        if live.committed {
            return Err(StoreError::NotReady {
                ctx: vctx,
                what: "the failover was committed (the history from before it is gone): it cannot be cancelled; make the other site active again with a planned failover back".into(),
            });
        }
        let Some(mut pf) = read_json_opt::<PointsFile>(&vctx, &self.store.root, &vmd.join(KEEP))?
        else {
            return Err(StoreError::NotReady {
                ctx: vctx,
                what: "no record of the recovery points from before the failover (promoted by an older vdrep?): it cannot be cancelled".into(),
            });
        };
        for d in &live.disks {
            let Some(id) = parse_hex_id(&d.disk_id) else {
                continue;
            };
            let p = self.disk(vm, &id, false)?;
            let _g = self.store.lock(&p.dir);
            let keep: ReplicaState = read_json_opt(&p.ctx, &self.store.root, &p.dir.join(KEEP))?
                .ok_or_else(|| StoreError::NotReady {
                    ctx: p.ctx.clone(),
                    what: "no record of this disk's state from before the failover: it cannot be cancelled".into(),
                })?;
            let mut st = self.state_or_unknown(&p)?;
            let dst = p.dir.join(&st.replica_file);
            if d.path.exists() {
                if dst.exists() {
                    return Err(StoreError::NotReady {
                        ctx: p.ctx.clone(),
                        what: format!(
                            "both {} and the replica {} exist: move the one that is not the live disk away",
                            d.path.display(),
                            dst.display()
                        ),
                    });
                }
                std::fs::rename(&d.path, &dst).map_err(|e| {
                    self.io(&p.ctx, "moving the live disk back into the store", &dst, e)
                })?;
                let _ = sync_dir(&p.dir);
                if let Some(parent) = d.path.parent() {
                    let _ = sync_dir(parent);
                }
            }
            crash_point("cancel-moved");
            {
                // A raw source gets its VHD footer back (sets the size).
                let mut t = self.open_replica(&p, &st, false)?;
                t.set_len(st.size)
                    .and_then(|()| t.flush())
                    .map_err(|e| self.io(&p.ctx, "restoring the replica's footer", &dst, e))?;
            }
            // Replay the points rolled back over, oldest first.
            let mut redos: Vec<(u64, u64, String)> = list_dir(&p.dir.join(REDO))
                .into_iter()
                .filter_map(|n| {
                    let (b, c) = n.strip_suffix(".redo")?.split_once('-')?;
                    Some((b.parse().ok()?, c.parse().ok()?, n))
                })
                .collect();
            redos.sort_by_key(|r| r.1);
            for (b, c, n) in redos {
                let redop = p.dir.join(REDO).join(&n);
                if st.cycle != Some(b) {
                    if st.cycle >= Some(c) {
                        let _ = std::fs::remove_file(&redop);
                        continue;
                    }
                    return Err(StoreError::NotReady {
                        ctx: p.ctx.clone(),
                        what: format!(
                            "the replica is at {:?}, the next redo record starts at {b}: cannot replay the points after the failover point",
                            st.cycle
                        ),
                    });
                }
                let mut t = self.open_replica(&p, &st, false)?;
                undo::apply_undo(&redop, t.as_mut())
                    .map_err(|e| hrl_err(&p.ctx, &self.store.root, "replaying a point", c, e))?;
                drop(t);
                let h = HrlReader::open(&redop)
                    .map_err(|e| hrl_err(&p.ctx, &self.store.root, "replaying a point", c, e))?
                    .header()
                    .clone();
                st.size = h.disk_size;
                st.cycle = Some(c);
                self.write_state(&p, &st)?;
                let _ = std::fs::remove_file(&redop);
                crash_point("cancel-redo-step");
            }
            for n in list_dir(&p.dir.join(PARKED)) {
                let from = p.dir.join(PARKED).join(&n);
                std::fs::create_dir_all(&p.undo)
                    .and_then(|()| std::fs::rename(&from, p.undo.join(&n)))
                    .map_err(|e| self.io(&p.ctx, "restoring an undo record", &from, e))?;
            }
            self.write_state(&p, &keep)?;
            let _ = std::fs::remove_dir(p.dir.join(PARKED));
            let _ = std::fs::remove_dir(p.dir.join(REDO));
            let _ = std::fs::remove_file(p.dir.join(KEEP));
            let _ = sync_dir(&p.dir);
        }
        self.write_points(&vctx, &vmd, &mut pf)?;
        std::fs::remove_file(vmd.join(LIVE))
            .map_err(|e| self.io(&vctx, "removing live.json", &vmd.join(LIVE), e))?;
        let _ = std::fs::remove_file(vmd.join(KEEP));
        let _ = sync_dir(&vmd);
        Ok(pf.points)
    }

    /// Forget what a cancel would need (commit, adopt).
    fn drop_failover_keep(&self, vmd: &Path, p: &DiskPaths) {
        let _ = std::fs::remove_dir_all(p.dir.join(PARKED));
        let _ = std::fs::remove_dir_all(p.dir.join(REDO));
        let _ = std::fs::remove_file(p.dir.join(KEEP));
        let _ = std::fs::remove_file(vmd.join(KEEP));
    }

    /// Make the failover of `vm` final: the history from before it is
    /// deleted (it describes disks that no longer exist here).
    pub fn commit_failover(&self, vm: &str) -> Result<LiveInfo> {
        let (vmd, vctx, _vg, mut live) = self.lock_live(
            vm,
            "the VM is not failed over to this site: nothing to commit",
        )?;
        for id in self.disk_ids(vm)? {
            let p = self.disk(vm, &id, false)?;
            for (_, _, n) in self.undo_records(&p) {
                let _ = std::fs::remove_file(p.undo.join(n));
            }
            self.drop_failover_keep(&vmd, &p);
        }
        let mut pf = self.read_points(vm)?;
        pf.points.retain(|p| p.cycle == live.cycle);
        self.write_points(&vctx, &vmd, &mut pf)?;
        live.committed = true;
        self.write_json(&vctx, &vmd, LIVE, &live)?;
        Ok(live)
    }

    /// Take live disks into the store as `vm`'s replica at `cycle` (cut at
    /// `cut_unix_ns`): each file is moved (renamed) into its disk folder;
    /// a raw source gets a VHD footer. Earlier state, logs and history of
    /// the VM are dropped, `live.json` is removed, and one recovery point
    /// at `cycle` is recorded. `needs_resync` marks replicas whose content
    /// is not known to equal the other site's (an old primary after an
    /// unplanned failover): the sender then resyncs them by checksums.
    /// `origin` is kept as is (where the disks came from, for failback).
    pub fn adopt(
        &self,
        vm: &str,
        cycle: u64,
        cut_unix_ns: u64,
        disks: &[AdoptDisk],
        origin: &serde_json::Value,
        needs_resync: Option<&str>,
    ) -> Result<Point> {
        let vmd = self.vm_dir(vm, true)?;
        let vctx = self.ctx(vm, "");
        let _vg = self.store.lock(&vmd);
        self.write_json(&vctx, &vmd, ORIGIN, origin)?;
        // Forget what this VM was here before.
        for id in self.disk_ids(vm)? {
            if disks.iter().any(|d| d.disk_id == id) {
                continue;
            }
            let p = self.disk(vm, &id, false)?;
            let _ = std::fs::remove_dir_all(&p.dir);
        }
        let mut ids = Vec::new();
        for d in disks {
            validate_name("disk", &d.name)?;
            let (format, replica_file) = ReplicaFormat::for_source(&d.name);
            validate_name("replica file", &replica_file)?;
            let p = self.disk(vm, &d.disk_id, true)?;
            let mut rt = self.store.lock(&p.dir);
            rt.initial = None;
            let old = self.read_state(&p)?;
            for f in list_dir(&p.undo) {
                let _ = std::fs::remove_file(p.undo.join(f));
            }
            for f in list_dir(&p.incoming) {
                let _ = std::fs::remove_file(p.incoming.join(f));
            }
            self.drop_failover_keep(&vmd, &p);
            let dst = p.dir.join(&replica_file);
            let moved_before = !d.path.exists() && dst.exists();
            if !moved_before {
                let md = std::fs::symlink_metadata(&d.path)
                    .map_err(|e| self.io(&p.ctx, "reading the disk to adopt", &d.path, e))?;
                if !md.is_file() {
                    return Err(StoreError::NotReady {
                        ctx: p.ctx.clone(),
                        what: format!("{} is not a regular file", d.path.display()),
                    });
                }
                if let Some(o) = &old {
                    if o.replica_file != replica_file {
                        let _ = std::fs::remove_file(p.dir.join(&o.replica_file));
                    }
                }
                self.rename_same_fs(
                    &p.ctx,
                    (&d.path, &dst),
                    "moving the disk into the store",
                    "the store must be on the disk folder's file system",
                )?;
                let _ = sync_dir(&p.dir);
                if let Some(parent) = d.path.parent() {
                    let _ = sync_dir(parent);
                }
            }
            crash_point("adopt-moved");
            let size = match format {
                ReplicaFormat::Raw => std::fs::metadata(&dst).map(|m| m.len()),
                ReplicaFormat::VhdOfRaw => raw_len_of(&dst, moved_before),
            }
            .map_err(|e| self.io(&p.ctx, "reading the adopted disk's size", &dst, e))?;
            let st = ReplicaState {
                cycle: Some(cycle),
                cycle_time_ns: cut_unix_ns,
                needs_resync: needs_resync.map(str::to_string),
                ..ReplicaState::replacing(
                    old.as_ref(),
                    &d.disk_id,
                    &d.name,
                    &replica_file,
                    format,
                    size,
                    d.block_size,
                )
            };
            // Give a raw source its footer (sets the size, fsyncs).
            let mut t = self.open_replica(&p, &st, false)?;
            t.set_len(size)
                .and_then(|()| t.flush())
                .map_err(|e| self.io(&p.ctx, "finishing the adopted replica", &dst, e))?;
            self.write_state(&p, &st)?;
            ids.push(d.disk_id);
        }
        let _ = std::fs::remove_file(vmd.join(LIVE));
        let mut hexes: Vec<String> = ids.iter().map(|d| hex(d)).collect();
        hexes.sort();
        let pt = Point {
            cycle,
            time_unix_ns: cut_unix_ns,
            bytes: 0,
            consistency: Consistency::Crash,
            disks: hexes,
        };
        let mut pf = PointsFile {
            points: vec![pt.clone()],
            ..PointsFile::default()
        };
        self.write_points(&vctx, &vmd, &mut pf)?;
        let _ = sync_dir(&vmd);
        Ok(pt)
    }
}

/// Length of the raw disk in `path`: the file's length, minus a VHD
/// footer if one was already appended (`maybe_footer`: a retry after a
/// crash between the move and the state update).
fn raw_len_of(path: &Path, maybe_footer: bool) -> std::io::Result<u64> {
    let f = open_nofollow(path)?;
    let len = f.metadata()?.len();
    if maybe_footer && len >= VHD_FOOTER_LEN {
        let mut cookie = [0u8; 8];
        f.read_exact_at(&mut cookie, len - VHD_FOOTER_LEN)?;
        if &cookie == b"conectix" {
            return Ok(len - VHD_FOOTER_LEN);
        }
    }
    Ok(len)
}
