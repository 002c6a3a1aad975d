//! Checksum resync and online verify, on the sender's side.
//!
//! A resync seals every disk of the VM at one instant (the disks to resync
//! whole, the others as ordinary deltas), hashes the resync disks **as of
//! that cut** while the VM keeps writing ([`CycleJudge`]: one pass that
//! hashes the blocks where they lie in the page cache, through a mapping,
//! the bytes not copied), and compares the digest of
//! every block with the receiver's digest of the same block of its newest
//! point ([`crate::wire::BlockHashReq`] / [`crate::wire::BlockHashes`],
//! batches of [`BATCH_BYTES`], two requests in flight, the receiver hashing
//! on every core). Until a block is judged, the VM's writes to it save its
//! pre-image, so the blocks that differ are read as of the cut once the
//! receiver's digests are in. They go into an ordinary `.hrl` of that cycle
//! (base: the replica's cycle) in the disk's state folder, which is shipped
//! and applied like any log: with an undo record, so the receiver keeps its
//! history and the resync becomes a recovery point.
//!
//! Progress is saved every few seconds; a resync that stops resumes from
//! it (see [`crate::resync::Progress`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::Link;
use super::{now_ns, retry, SendError, Vm, VmState};
use crate::resync::{self, Progress, ResyncProgress, BATCH_BYTES};
use crate::tracking::{CutSelect, CycleJudge, SealedCycle, StreamError};
use crate::wire;
use crate::wire::session::{SenderAction, StreamId};

/// Digests of blocks as of the cut, grouped for one digest request. The
/// reader hashes the disk piece by piece ([`CycleJudge::digests`]) without
/// keeping the bytes: the blocks that differ are read again once judged.
struct Batch {
    /// `(first block, blocks)`.
    runs: Vec<(u64, u32)>,
    digests: Vec<u128>,
    /// Disk bytes covered, and the end offset of the last piece.
    bytes: u64,
    end: u64,
    bs: u64,
}

impl Batch {
    fn new(bs: u64) -> Batch {
        Batch {
            runs: Vec::new(),
            digests: Vec::new(),
            bytes: 0,
            end: 0,
            bs,
        }
    }

    /// Add the digests of the piece of `len` bytes at `off`.
    fn push(&mut self, off: u64, len: usize, digests: &[u128]) {
        let bs = self.bs.max(1);
        let first = off / bs;
        let n = digests.len() as u32;
        let merged = match self.runs.last_mut() {
            Some(last)
                if last.0 + u64::from(last.1) == first
                    && u64::from(last.1) + u64::from(n) <= wire::MAX_HASHES as u64 =>
            {
                last.1 += n;
                true
            }
            _ => false,
        };
        if !merged {
            self.runs.push((first, n));
        }
        self.digests.extend_from_slice(digests);
        self.bytes += len as u64;
        self.end = off + len as u64;
    }
    fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.1)).sum()
    }
    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES
            || self.runs.len() >= 4096
            || self.blocks() + (1 << 20) / self.bs.max(1) > wire::MAX_HASHES as u64
    }
    fn end(&self) -> u64 {
        self.end
    }
}

/// What a compare is for.
pub(super) enum Mode {
    /// Write the differing blocks into this log and announce it.
    Resync { log: Box<crate::hrl::HrlWriter> },
    /// Only report; blocks written since the previous cut are not judged
    /// (they are on their way as the next delta).
    Verify { skip: Vec<(u64, u64)> },
}

/// The outcome of one disk's compare.
pub(super) struct Compared {
    pub compared: u64,
    /// Runs `(first block, count)` that differ.
    pub differ: Vec<(u64, u64)>,
}

/// Where the resync progress of a disk is kept.
pub(super) fn progress_path(r: &super::Replicator, vm: &str, disk_id: &[u8; 16]) -> PathBuf {
    let id: String = disk_id.iter().map(|b| format!("{b:02x}")).collect();
    r.tracker
        .state_file(super::PROTECT_DIR)
        .join(format!("{vm}.resync-{id}.json"))
}

/// Progress is saved every 2 s or this many bytes of compare, whichever
/// comes first.
const SAVE_EVERY: u64 = 128 << 20;

/// Test hook: `VDREP_TEST_RESYNC_PACE_MS` slows every compared batch down
/// (so tests can interrupt a resync half-way).
fn test_pace_ms() -> Option<u64> {
    static PACE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *PACE.get_or_init(|| {
        std::env::var("VDREP_TEST_RESYNC_PACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

fn in_runs(runs: &[(u64, u64)], b: u64) -> bool {
    let i = runs.partition_point(|r| r.0 + r.1 <= b);
    runs.get(i).is_some_and(|r| r.0 <= b)
}

impl super::Replicator {
    /// Resync `rdisks` of the VM by checksums (see the module docs) and
    /// ship the result as one cycle of every disk of the VM.
    pub(super) async fn resync(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        replica: &HashMap<String, wire::DiskState>,
        rdisks: &[String],
    ) -> Result<(), SendError> {
        let spec = vm.spec.clone();
        let t_start = Instant::now();
        vm.status.lock().state = VmState::Resynchronizing;
        // 1. Logs of the resync disks are superseded; the others ship first.
        // A disk that stopped uncleanly with its activity log compares only
        // the log's extents and the blocks of those logs (read first).
        let mut partial: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        for d in rdisks {
            if let Some(runs) = replica.get(d).and_then(|ds| self.extents_only(vm, d, ds)) {
                partial.insert(d.clone(), runs);
            }
            self.tracker.discard_logs(d, None);
        }
        self.ship_pending(vm, link, replica).await?;
        // 2. Where each resync disk stands (resume?).
        let mut full_from = HashMap::new();
        let mut extra = HashMap::new();
        let mut prior: HashMap<String, Progress> = HashMap::new();
        for d in rdisks {
            let (id, _, bs, _) = self.disk_id(d)?;
            let ds = replica
                .get(d)
                .ok_or_else(|| SendError::fatal(format!("{d} was not opened at the receiver")))?;
            let path = progress_path(self, &spec.vm, &id);
            if let Some(runs) = partial.get(d) {
                // Small: never resumed, compared again whole if interrupted
                // (the extents stay in the activity log until it is done).
                let _ = std::fs::remove_file(&path);
                let blocks: u64 = runs.iter().map(|r| r.1).sum();
                tracing::info!(vm = %spec.vm, disk = %d,
                    "extents-only resync: {} MiB of the activity log's extents and unshipped logs",
                    (blocks * u64::from(bs)) >> 20);
                extra.insert(d.clone(), runs.clone());
                continue;
            }
            let touch = self.tracker.activity_epoch(d);
            // Every write since the cut the progress was made at is known:
            // this daemon's bitmap, a bitmap saved by a clean stop, or the
            // activity log (kill -9 of the daemon) if no extent left it since.
            let by_map = |p: &Progress| p.touch_epoch.is_some() && p.touch_epoch == touch;
            let p = Progress::load(&path).filter(|p| {
                p.disk_id == hexid(&id)
                    && p.block_size == bs
                    && p.replica_cycle == ds.replica_cycle
                    && (p.daemon == self.instance || self.tracker.bitmap_trusted(d) || by_map(p))
            });
            match p {
                Some(p) => {
                    let mut more = p.differ.clone();
                    let touched = if by_map(&p) {
                        self.tracker.activity_runs(d)
                    } else {
                        Vec::new()
                    };
                    let tblocks: u64 = touched.iter().map(|r| r.1).sum();
                    more.extend(touched);
                    more.sort_unstable();
                    tracing::info!(vm = %spec.vm, disk = %d,
                        "resuming the resync at {} MiB ({} block(s) found different so far, {} block(s) of regions written since re-compared)",
                        p.compared_to >> 20, p.differ_blocks(), tblocks);
                    full_from.insert(d.clone(), p.compared_to);
                    extra.insert(d.clone(), more);
                    prior.insert(d.clone(), p);
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                    full_from.insert(d.clone(), 0);
                }
            }
        }
        // 3. One cut of every disk of the VM.
        let tracker = self.tracker.clone();
        let flush = self.flush.clone();
        let sel = CutSelect {
            disks: Some(spec.disks.clone()),
            full_from,
            resync: rdisks.to_vec(),
            extra,
            skip_bitmap_only: false,
        };
        let sealed = super::seal_vm(flush, tracker, move |t| t.seal(&sel)).await?;
        let cycle = sealed.cycle;
        let (mut rcycles, ocycles): (Vec<SealedCycle>, Vec<SealedCycle>) = sealed
            .cycles
            .into_iter()
            .partition(|sc| rdisks.contains(&sc.header.disk_name));
        // 4. The other disks: ordinary logs of this cut.
        let t = self.tracker.clone();
        tokio::task::spawn_blocking(move || {
            for sc in ocycles {
                let e = t.write_log(sc);
                if let Some(err) = e.error {
                    tracing::warn!(disk = %e.disk, "{err}");
                }
            }
        })
        .await
        .map_err(|e| retry(format!("log task failed: {e}")))?;
        // 5. The resync disks, one after the other.
        let t_compare = Instant::now();
        let prepare_secs = (t_compare - t_start).as_secs_f64();
        let mut result = Ok(());
        while let Some(sc) = rcycles.pop() {
            if result.is_err() {
                let _ = self.tracker.finish(sc, false);
                continue;
            }
            let name = sc.header.disk_name.clone();
            let ds = replica[&name].clone();
            let resumable = !partial.contains_key(&name);
            let r = self
                .resync_one(vm, link, sc, &ds, prior.remove(&name), resumable)
                .await;
            result = r;
        }
        result?;
        let compare_secs = t_compare.elapsed().as_secs_f64();
        // 6. Ship the cycle and commit its point: the resync is done once
        // the point is (its logs durable there; applied next, by the
        // steady loop, as after a `vdrep sync`).
        let t_ship = Instant::now();
        self.ship_logs(vm, link, &HashMap::new(), super::Until::Committed)
            .await?;
        tracing::info!(vm = %spec.vm, cycle,
            "resync timing: prepare (ship pending, cut) {prepare_secs:.3}s, compare {compare_secs:.3}s, ship+store+commit {:.3}s",
            t_ship.elapsed().as_secs_f64());
        let mut s = vm.status.lock();
        if let Some(r) = s.resync.take() {
            s.last_resync = Some(r);
        }
        tracing::info!(vm = %spec.vm, cycle, "resync complete");
        Ok(())
    }

    /// Compare one sealed whole-disk cycle, write its log, announce it.
    async fn resync_one(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        sc: SealedCycle,
        ds: &wire::DiskState,
        prior: Option<Progress>,
        resumable: bool,
    ) -> Result<(), SendError> {
        let name = sc.header.disk_name.clone();
        let id = sc.header.disk_id;
        let cycle = sc.header.cycle;
        let mut header = sc.header.clone();
        header.base_cycle = ds.replica_cycle;
        header.base_size = ds.replica_size;
        let log = match self.tracker.create_log(&sc, &header) {
            Ok(w) => w,
            Err(e) => {
                let _ = self.tracker.finish(sc, false);
                return Err(retry(format!(
                    "cannot create the resync log of {name}: {e}"
                )));
            }
        };
        let ppath = progress_path(self, &vm.spec.vm, &id);
        let (sc, r) = self
            .compare(
                vm,
                link,
                sc,
                ds.replica_cycle,
                Mode::Resync { log: Box::new(log) },
                prior,
                resumable.then(|| ppath.clone()),
            )
            .await;
        let Some(sc) = sc else {
            return Err(r.err().unwrap_or_else(|| retry("the disk reader failed")));
        };
        match r {
            Ok(c) => {
                let differ: u64 = c.differ.iter().map(|r| r.1).sum();
                tracing::info!(vm = %vm.spec.vm, disk = %name,
                    "resync compare: {} of {} blocks differ", differ, c.compared);
                let t = self.tracker.clone();
                tokio::task::spawn_blocking(move || t.finish(sc, true))
                    .await
                    .map_err(|e| retry(e.to_string()))?
                    .map_err(|e| retry(e.to_string()))?;
                let _ = std::fs::remove_file(&ppath);
                let _ = cycle;
                Ok(())
            }
            Err(e) => {
                let t = self.tracker.clone();
                let _ = tokio::task::spawn_blocking(move || t.finish(sc, false)).await;
                Err(e)
            }
        }
    }

    /// Stream `sc` from the start (its sealed blocks), compare each block
    /// with the receiver's digest, and do what `mode` says with the ones
    /// that differ. Hands the sealed cycle back (the caller finishes it).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn compare(
        &self,
        vm: &Arc<Vm>,
        link: &mut Link,
        sc: SealedCycle,
        replica_cycle: u64,
        mode: Mode,
        prior: Option<Progress>,
        progress_file: Option<PathBuf>,
    ) -> (Option<SealedCycle>, Result<Compared, SendError>) {
        let id = sc.header.disk_id;
        let name = sc.header.disk_name.clone();
        let bs = u64::from(sc.header.block_size);
        let cycle = sc.header.cycle;
        let total = sc.blocks();
        let is_resync = matches!(mode, Mode::Resync { .. });
        {
            let mut s = vm.status.lock();
            s.resync = Some(ResyncProgress {
                mode: if is_resync { "resync" } else { "verify" }.into(),
                disk: name.clone(),
                blocks_total: total,
                resumed_from: prior.as_ref().map(|p| p.compared_to),
                started_unix: now_ns() / 1_000_000_000,
                ..Default::default()
            });
        }
        let stream = match link.start_compare(id, replica_cycle) {
            Ok(s) => s,
            Err(e) => return (Some(sc), Err(e)),
        };
        // Reader: digests of the cycle as of its cut, in batches.
        let (btx, brx) = tokio::sync::mpsc::channel::<Batch>(2);
        let judge = sc.judge();
        let reader = {
            let judge = judge.clone();
            tokio::task::spawn_blocking(move || {
                let mut cur = Batch::new(bs);
                let r = judge.digests(0, &resync::block_digest, &mut |off, len, d| {
                    if cur.full() {
                        let b = std::mem::replace(&mut cur, Batch::new(bs));
                        btx.blocking_send(b).map_err(|_| StreamError::Stopped)?;
                    }
                    cur.push(off, len, d);
                    Ok(())
                });
                r.and_then(|()| {
                    if cur.runs.is_empty() {
                        return Ok(());
                    }
                    btx.blocking_send(cur).map_err(|_| StreamError::Stopped)
                })
            })
        };
        let mut cmp = Comparing {
            vm,
            link,
            stream,
            name: &name,
            id,
            bs,
            total,
            replica_cycle,
            mode,
            prior,
            progress_file,
            judge,
            take_buf: Vec::new(),
            batches: brx,
        };
        let net = cmp.run(self).await;
        let Comparing {
            mode,
            batches,
            link,
            ..
        } = cmp;
        drop(batches);
        let read = match reader.await {
            Ok(x) => x,
            Err(e) => return (Some(sc), Err(retry(format!("the disk reader failed: {e}")))),
        };
        let compared = match net {
            Ok(c) => c,
            Err(e) => return (Some(sc), Err(e)),
        };
        if let Err(e) = read {
            return (
                Some(sc),
                Err(retry(format!("reading {name} as of its cut: {e}"))),
            );
        }
        let differ_blocks: u64 = compared.differ.iter().map(|r| r.1).sum();
        let end = match mode {
            Mode::Resync { log } => {
                if let Err(e) = tokio::task::block_in_place(|| log.finish()) {
                    return (
                        Some(sc),
                        Err(retry(format!("sealing the resync log of {name}: {e}"))),
                    );
                }
                Some(wire::ResyncEnd {
                    disk_id: id,
                    replica_cycle,
                    cycle,
                    blocks_compared: compared.compared,
                    blocks_differ: differ_blocks,
                })
            }
            Mode::Verify { .. } => None,
        };
        if let Err(e) = finish_compare(link, stream, end).await {
            if is_resync {
                self.tracker.discard_log(&sc);
            }
            return (Some(sc), Err(e));
        }
        {
            let mut s = vm.status.lock();
            if let Some(p) = s.resync.as_mut() {
                p.blocks_compared = compared.compared;
                p.blocks_differ = differ_blocks;
                if is_resync {
                    p.blocks_sent = differ_blocks;
                }
                p.eta_secs = Some(0.0);
            }
        }
        (Some(sc), Ok(compared))
    }
}

/// End the compare on `stream` (with the `ResyncEnd` of a resync, which the
/// receiver acknowledges) and wait until it is over.
async fn finish_compare(
    link: &mut Link,
    stream: StreamId,
    end: Option<wire::ResyncEnd>,
) -> Result<(), SendError> {
    link.finish_compare(stream, end)?;
    loop {
        if let SenderAction::CompareDone {
            stream: s, result, ..
        } = link.next().await?
        {
            if s == stream {
                return result.map_err(|e| link.error(&e));
            }
        }
    }
}

/// One disk's compare under way: batches of digests as of the cut go out
/// as digest requests (two in flight), and each answer is judged.
struct Comparing<'a> {
    vm: &'a Arc<Vm>,
    link: &'a mut Link,
    stream: StreamId,
    name: &'a str,
    id: wire::DiskId,
    bs: u64,
    total: u64,
    replica_cycle: u64,
    mode: Mode,
    prior: Option<Progress>,
    progress_file: Option<PathBuf>,
    /// The cycle being judged (the reader hashes through a clone).
    judge: CycleJudge,
    /// The bytes of the differing blocks on their way into the log.
    take_buf: Vec<u8>,
    batches: tokio::sync::mpsc::Receiver<Batch>,
}

impl Comparing<'_> {
    async fn run(&mut self, r: &super::Replicator) -> Result<Compared, SendError> {
        let bs = self.bs;
        let mut prior_rest: Vec<(u64, u64)> = self
            .prior
            .as_ref()
            .map(|p| p.differ.clone())
            .unwrap_or_default();
        let prior_to = self.prior.as_ref().map(|p| p.compared_to).unwrap_or(0);
        let is_resync = matches!(self.mode, Mode::Resync { .. });
        // The map vouches for this progress only if it was started before
        // the first cut of this resync (by this compare, or by the one
        // whose progress is resumed).
        let touch_epoch = match (is_resync, r.tracker.activity_epoch(self.name), &self.prior) {
            (false, _, _) => None,
            (true, cur, None) => cur,
            (true, cur, Some(p)) => cur.filter(|c| p.touch_epoch == Some(*c)),
        };
        let t0 = Instant::now();
        let mut last_save = Instant::now();
        let mut saved_at = 0u64;
        let mut compared = 0u64;
        let mut digest_bytes = 0u64;
        let mut differ: Vec<u64> = Vec::new();
        let mut asked: VecDeque<Batch> = VecDeque::new();
        let mut read_all = false;
        loop {
            while asked.len() < 2 && !read_all {
                let Some(b) = self.batches.recv().await else {
                    read_all = true;
                    break;
                };
                let runs = b
                    .runs
                    .iter()
                    .map(|r| wire::HashRun {
                        offset: r.0 * bs,
                        blocks: r.1,
                    })
                    .collect();
                self.link.request_hashes(self.stream, bs as u32, runs)?;
                asked.push_back(b);
            }
            let Some(mut b) = asked.pop_front() else {
                break;
            };
            let theirs = self.hashes().await?;
            let ours = std::mem::take(&mut b.digests);
            digest_bytes += theirs.len() as u64 * 16;
            // The blocks that differ, in runs `(first, count)`.
            let mut found: Vec<(u64, u64)> = Vec::new();
            let mut k = 0usize;
            for &(first, n) in &b.runs {
                for j in 0..u64::from(n) {
                    let blk = first + j;
                    let same = ours.get(k).is_some_and(|o| *o == theirs[k])
                        && theirs[k] != resync::MISSING;
                    k += 1;
                    if same {
                        continue;
                    }
                    if let Mode::Verify { skip } = &self.mode {
                        if in_runs(skip, blk) {
                            continue;
                        }
                    }
                    differ.push(blk);
                    match found.last_mut() {
                        Some(r) if r.0 + r.1 == blk => r.1 += 1,
                        _ => found.push((blk, 1)),
                    }
                }
            }
            if let Mode::Resync { log } = &mut self.mode {
                // Read the differing blocks as of the cut (their pre-images
                // if the VM changed them since) into the resync log.
                let (judge, name, buf) = (&self.judge, self.name, &mut self.take_buf);
                tokio::task::block_in_place(|| -> Result<(), SendError> {
                    for &(first, n) in &found {
                        let len = judge
                            .take(first, n, buf)
                            .map_err(|e| retry(format!("reading {name} as of its cut: {e}")))?;
                        for (j, block) in buf[..len].chunks(bs as usize).enumerate() {
                            log.append((first + j as u64) * bs, block).map_err(|e| {
                                retry(format!("writing the resync log of {name}: {e}"))
                            })?;
                        }
                    }
                    Ok(())
                })?;
            }
            // Judged: the VM's writes to these blocks no longer save them.
            for &(first, n) in &b.runs {
                self.judge.release(first, u64::from(n));
            }
            compared += b.blocks();
            let offset = b.end();
            let secs = t0.elapsed().as_secs_f64().max(1e-6);
            {
                let mut s = self.vm.status.lock();
                if let Some(p) = s.resync.as_mut() {
                    p.blocks_compared = compared;
                    p.blocks_differ = differ.len() as u64;
                    p.digest_bytes = digest_bytes;
                    p.offset = offset;
                    p.rate_bps = (compared * bs) as f64 / secs;
                    let left = self.total.saturating_sub(compared) * bs;
                    p.eta_secs = (p.rate_bps > 0.0).then(|| left as f64 / p.rate_bps);
                }
            }
            if let Some(ms) = test_pace_ms() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if let Some(pf) = &self.progress_file {
                if last_save.elapsed() >= Duration::from_secs(2) || offset >= saved_at + SAVE_EVERY
                {
                    last_save = Instant::now();
                    saved_at = offset;
                    prior_rest.retain(|r| r.0 + r.1 > offset / bs);
                    let mut all: Vec<u64> = differ.clone();
                    for r in &prior_rest {
                        all.extend((r.0..r.0 + r.1).filter(|b| *b >= offset.div_ceil(bs)));
                    }
                    all.sort_unstable();
                    let p = Progress {
                        disk: self.name.to_string(),
                        disk_id: hexid(&self.id),
                        block_size: bs as u32,
                        replica_cycle: self.replica_cycle,
                        compared_to: offset.max(prior_to),
                        differ: resync::runs_of(all),
                        daemon: r.instance.clone(),
                        touch_epoch,
                    };
                    if let Err(e) = tokio::task::block_in_place(|| p.save(pf)) {
                        tracing::warn!("cannot save resync progress {}: {e}", pf.display());
                    }
                }
            }
        }
        Ok(Compared {
            compared,
            differ: resync::runs_of(differ),
        })
    }

    /// The receiver's digests of the oldest request (the session checked
    /// that they are as many as the blocks asked for).
    async fn hashes(&mut self) -> Result<Vec<u128>, SendError> {
        loop {
            match self.link.next().await? {
                SenderAction::Hashes { stream, hashes, .. } if stream == self.stream => {
                    return Ok(hashes)
                }
                SenderAction::CompareDone {
                    stream,
                    result: Err(e),
                    ..
                } if stream == self.stream => return Err(self.link.error(&e)),
                _ => {}
            }
        }
    }
}

pub(super) fn hexid(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
