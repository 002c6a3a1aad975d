//! A VM's recovery points on disk: a snapshot, `points.json` (replaced
//! whole, by rename), and a journal, `points-<gen>.jsonl`, of the points
//! committed since (one JSON line each, appended).
//!
//! Committing a point used to rewrite the whole list: with a continuous VM
//! and the default retention (every point for 2 h) that is ~7,000 points,
//! 1.4 MB of JSON written and fsynced per cycle, per VM (measured 0.7 ms
//! per commit at 500 points, 2.3 ms at 3,000, growing linearly:
//! `kernel-notes/replication-speed.md`, session 16). Now a commit appends
//! one line; every [`JOURNAL_MAX`] commits, and whenever points are
//! dropped (retention, a full copy, a failover), the snapshot is rewritten.
//!
//! Which journal belongs to a snapshot: the snapshot's `gen`. A rewrite
//! takes a `gen` above the snapshot's and above every journal in the
//! folder, and deletes the older journals after the new snapshot is
//! durable; a crash in between leaves an older journal that no snapshot
//! names, which is ignored (and deleted by the next rewrite). So a
//! dropped point never comes back from a journal.
//!
//! A commit does not read the snapshot either: the store keeps, per VM
//! folder, what a commit needs (the `gen`, the journal's length, the
//! cycles present) with the identity of the two files it was read from
//! (inode, size, modification time), checked by one `stat` each per
//! commit; any other change to them (a failover moving folders, a forget)
//! makes the next commit read them again. The same summary answers the
//! receiver's drainer (the newest point) and its metrics scrape (a
//! [`PointsSummary`]) without waiting for the VM's lock and without
//! reading the points; a reader that finds it stale reads the files, and
//! caches what it read only if it got the VM's lock without waiting.
//!
//! A crash during an append leaves at most one incomplete last line (its
//! point was never acknowledged): it is ignored when read and cut off
//! before the next append. Any other line that does not parse is damage:
//! an error naming the file and line, never skipped.

use super::*;

/// Points appended to a journal before the snapshot is rewritten.
pub const JOURNAL_MAX: usize = 256;

/// `points-<gen>.jsonl`.
fn journal_name(gen: u64) -> String {
    format!("points-{gen}.jsonl")
}

/// The `gen` of a journal file name.
fn journal_gen(name: &str) -> Option<u64> {
    name.strip_prefix("points-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// Whether `name` is a points journal's (names a peer may not use).
pub(crate) fn is_journal_name(name: &str) -> bool {
    journal_gen(name).is_some()
}

/// The snapshot and the journal of the VM folder `vmd`, merged (sorted by
/// cycle; `journaled` counts the journal's points).
pub(super) fn load(ctx: &Ctx, root: &Path, vmd: &Path) -> Result<PointsFile> {
    let mut pf: PointsFile = read_json_opt(ctx, root, &vmd.join(POINTS))?.unwrap_or_default();
    let jp = vmd.join(journal_name(pf.gen));
    let bytes = match open_nofollow(&jp).and_then(|mut f| {
        let mut v = Vec::new();
        f.read_to_end(&mut v).map(|_| v)
    }) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pf),
        Err(e) => return Err(io_err(ctx, root, "reading the recovery points", &jp, e)),
    };
    let mut seen: std::collections::HashSet<u64> = pf.points.iter().map(|p| p.cycle).collect();
    // Only complete lines: a torn last line was never acknowledged.
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for (n, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let pt: Point = serde_json::from_slice(line).map_err(|e| StoreError::BadState {
            path: jp.clone(),
            what: format!(
                "line {} is not a recovery point ({e}): the journal is damaged; move it away to keep the points of the snapshot only",
                n + 1
            ),
        })?;
        pf.journaled += 1;
        if seen.insert(pt.cycle) {
            pf.points.push(pt);
        }
    }
    pf.points.sort_by_key(|p| p.cycle);
    Ok(pf)
}

/// The points of the VM folder `vm_dir` of a store, read without opening
/// the store (no lock: for read-only listings while a receiver may run).
pub fn points_in(vm_dir: &Path) -> std::result::Result<Vec<Point>, StoreError> {
    let root = vm_dir.parent().unwrap_or(vm_dir);
    Ok(load(&Ctx::default(), root, vm_dir)?.points)
}

/// What a commit needs to know of a VM's points (see the module doc).
#[derive(Debug, Clone)]
pub(super) struct PointsMeta {
    gen: u64,
    journaled: usize,
    /// The cycles present, and what a metrics scrape needs of the points.
    summary: PointsSummary,
    /// The point of the highest cycle.
    newest: Option<Point>,
    /// `(inode, size, mtime ns)` of the snapshot and of the journal when
    /// this was current (`None`: no such file).
    snapshot_id: Option<(u64, u64, i64)>,
    journal_id: Option<(u64, u64, i64)>,
    /// This process made the journal's entry in the folder durable.
    journal_dir_synced: bool,
}

fn file_id(path: &Path) -> Option<(u64, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
    ))
}

impl PointsMeta {
    fn of(pf: &PointsFile, vmd: &Path) -> PointsMeta {
        PointsMeta {
            gen: pf.gen,
            journaled: pf.journaled,
            summary: PointsSummary::from_points(&pf.points),
            newest: pf.points.iter().max_by_key(|p| p.cycle).cloned(),
            snapshot_id: file_id(&vmd.join(POINTS)),
            journal_id: file_id(&vmd.join(journal_name(pf.gen))),
            journal_dir_synced: false,
        }
    }

    fn current(&self, vmd: &Path) -> bool {
        file_id(&vmd.join(POINTS)) == self.snapshot_id
            && file_id(&vmd.join(journal_name(self.gen))) == self.journal_id
    }
}

impl Site<'_> {
    /// The cached summary of `vmd`'s points if the files did not change
    /// since, else read again.
    fn points_meta(&self, ctx: &Ctx, vmd: &Path) -> Result<PointsMeta> {
        if let Some(m) = self.store.points_meta.lock().get(vmd) {
            if m.current(vmd) {
                return Ok(m.clone());
            }
        }
        let pf = load(ctx, &self.store.root, vmd)?;
        let m = PointsMeta::of(&pf, vmd);
        self.store
            .points_meta
            .lock()
            .insert(vmd.to_path_buf(), m.clone());
        Ok(m)
    }

    /// Whether `vmd` has a point at `cycle` (its record if so); the VM's
    /// lock must be held.
    pub(super) fn find_point(&self, ctx: &Ctx, vmd: &Path, cycle: u64) -> Result<Option<Point>> {
        if !self.points_meta(ctx, vmd)?.summary.contains(cycle) {
            return Ok(None);
        }
        let pf = load(ctx, &self.store.root, vmd)?;
        Ok(pf.points.into_iter().find(|p| p.cycle == cycle))
    }

    /// The point of `vm` with the highest cycle: from the cached summary
    /// while the files are unchanged (one `stat` each), else read from
    /// them. The receiver's drainer asks it of every VM every 10 s; read
    /// whole, a continuous VM's 2 h of points are ~1.7 MB of JSON. Takes
    /// no VM lock (the drainer must not wait behind a failover): it only
    /// reads the summary, which commits write under the VM's lock with
    /// the identity of the files it describes.
    pub(super) fn newest_point_of(&self, vm: &str) -> Result<Option<Point>> {
        self.meta_unlocked(vm, |m| m.newest.clone())
    }

    /// [`PointsSummary`] of `vm`'s points, like
    /// [`newest_point_of`](Self::newest_point_of): what the receiver's
    /// metrics scrape asks of every VM.
    pub(super) fn points_summary_of(&self, vm: &str) -> Result<PointsSummary> {
        self.meta_unlocked(vm, |m| m.summary.clone())
    }

    /// The cached summary of `vm`'s points if the files did not change
    /// since, else read from them. Never waits for the VM's lock: read
    /// under it if it is free (and cached, as a commit does), else (a
    /// commit or a failover holds it) read without it and not cached.
    /// `take` gets what it needs from the summary (the drainer only the
    /// newest point: the whole summary is ~16 bytes per point).
    fn meta_unlocked<T>(&self, vm: &str, take: impl Fn(&PointsMeta) -> T) -> Result<T> {
        let vmd = self.vm_dir(vm, false)?;
        if let Some(m) = self.store.points_meta.lock().get(&vmd) {
            if m.current(&vmd) {
                return Ok(take(m));
            }
        }
        let ctx = self.ctx(vm, "");
        if let Some(_g) = self.store.try_lock(&vmd) {
            return Ok(take(&self.points_meta(&ctx, &vmd)?));
        }
        let pf = load(&ctx, &self.store.root, &vmd)?;
        Ok(take(&PointsMeta::of(&pf, &vmd)))
    }

    pub(super) fn read_points(&self, vm: &str) -> Result<PointsFile> {
        let vmd = self.vm_dir(vm, false)?;
        load(&self.ctx(vm, ""), &self.store.root, &vmd)
    }

    /// Replace `vmd`'s points by `pf` (a new snapshot with a new `gen`;
    /// the older journals are deleted once it is durable). The VM's lock
    /// must be held.
    pub(super) fn write_points(&self, ctx: &Ctx, vmd: &Path, pf: &mut PointsFile) -> Result<()> {
        let journals: Vec<(u64, String)> = list_dir(vmd)
            .into_iter()
            .filter_map(|n| journal_gen(&n).map(|g| (g, n)))
            .collect();
        let newest = journals.iter().map(|(g, _)| *g).max().unwrap_or(0);
        pf.gen = pf.gen.max(newest) + 1;
        pf.journaled = 0;
        self.store.points_meta.lock().remove(vmd);
        self.write_json_on(&self.store.sync.commit, ctx, vmd, POINTS, &*pf)?;
        for (g, n) in journals {
            if g < pf.gen {
                let _ = std::fs::remove_file(vmd.join(n));
            }
        }
        self.store
            .points_meta
            .lock()
            .insert(vmd.to_path_buf(), PointsMeta::of(pf, vmd));
        Ok(())
    }

    /// Add `pt` (a cycle not yet among the points) to `vmd`'s points
    /// durably, under the VM's lock: one line appended to the journal, or
    /// a new snapshot when the journal is full.
    pub(super) fn add_point(&self, ctx: &Ctx, vmd: &Path, pt: Point) -> Result<()> {
        let mut meta = self.points_meta(ctx, vmd)?;
        if meta.journaled >= JOURNAL_MAX {
            let mut pf = load(ctx, &self.store.root, vmd)?;
            pf.points.push(pt);
            pf.points.sort_by_key(|p| p.cycle);
            return self.write_points(ctx, vmd, &mut pf);
        }
        let jp = vmd.join(journal_name(meta.gen));
        let mut line = serde_json::to_vec(&pt).map_err(|e| StoreError::BadState {
            path: jp.clone(),
            what: e.to_string(),
        })?;
        line.push(b'\n');
        // Forget the summary until the append is durable: a failure leaves
        // the file in a state the next commit reads again.
        self.store.points_meta.lock().remove(vmd);
        let res = (|| -> std::io::Result<()> {
            let f = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&jp)?;
            // Cut off a torn last line (a crash during an earlier append,
            // never acknowledged) so this line starts a line of its own.
            let len = f.metadata()?.len();
            if len > 0 {
                let mut last = [0u8; 1];
                f.read_exact_at(&mut last, len - 1)?;
                if last[0] != b'\n' {
                    let mut all = vec![0u8; len as usize];
                    f.read_exact_at(&mut all, 0)?;
                    let keep = all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    f.set_len(keep as u64)?;
                }
            }
            (&f).write_all(&line)?;
            self.store.sync.commit.sync_data(&f)?;
            // The journal's entry in the folder, once per journal (and
            // again after the summary was read anew).
            if !meta.journal_dir_synced {
                self.store.sync.commit.sync_dir(vmd)?;
            }
            Ok(())
        })();
        res.map_err(|e| self.io(ctx, "recording a recovery point", &jp, e))?;
        meta.journaled += 1;
        meta.summary.insert(&pt);
        if meta.newest.as_ref().is_none_or(|n| n.cycle < pt.cycle) {
            meta.newest = Some(pt);
        }
        meta.journal_id = file_id(&jp);
        meta.journal_dir_synced = true;
        self.store
            .points_meta
            .lock()
            .insert(vmd.to_path_buf(), meta);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_names_round_trip() {
        assert_eq!(journal_gen(&journal_name(7)), Some(7));
        assert_eq!(journal_gen("points-x.jsonl"), None);
        assert_eq!(journal_gen("points.json"), None);
        assert!(is_journal_name("points-0.jsonl"));
        assert!(!is_journal_name("points-0.jsonl.tmp"));
    }
}
