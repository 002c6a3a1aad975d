//! Reference models for the simulated-network test: the primary's VM (its
//! disks, written by a seeded workload and cut into cycles, with the
//! sealed logs the sender keeps until they are applied) and the receiver's
//! durable store (replica images with their history, durable logs,
//! committed points), which executes the receiver session's actions.

use std::collections::{BTreeMap, BTreeSet};

use vdrep::wire::session::{DiskStatus, LogStored, OpId, ReceiverAction, StoreDone, StoreFailure};
use vdrep::wire::{DiskId, ErrorCode};

/// A seeded xorshift generator (deterministic on every platform).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

pub const BLOCK: usize = 512;

/// A log as the model's tracking writes it: `base u64 | cycle u64 | n u32 |
/// (offset u64, len u32, bytes)*`.
pub fn encode_log(base: u64, cycle: u64, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut o = Vec::new();
    o.extend_from_slice(&base.to_le_bytes());
    o.extend_from_slice(&cycle.to_le_bytes());
    o.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    for (off, data) in writes {
        o.extend_from_slice(&off.to_le_bytes());
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        o.extend_from_slice(data);
    }
    o
}

pub type Writes = Vec<(u64, Vec<u8>)>;

/// Parse a model log: `(base, cycle, writes)`.
pub fn decode_log(b: &[u8]) -> Option<(u64, u64, Writes)> {
    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
        let s = b.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    }
    let mut at = 0;
    let u64_at = |at: &mut usize| -> Option<u64> {
        Some(u64::from_le_bytes(take(b, at, 8)?.try_into().ok()?))
    };
    let base = u64_at(&mut at)?;
    let cycle = u64_at(&mut at)?;
    let n = u32::from_le_bytes(take(b, &mut at, 4)?.try_into().ok()?);
    let mut w = Vec::new();
    for _ in 0..n {
        let off = u64_at(&mut at)?;
        let len = u32::from_le_bytes(take(b, &mut at, 4)?.try_into().ok()?) as usize;
        w.push((off, take(b, &mut at, len)?.to_vec()));
    }
    (at == b.len()).then_some((base, cycle, w))
}

/// A sealed log the sender keeps until the receiver applied it.
#[derive(Clone)]
pub struct SealedLog {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub app: bool,
}

/// The primary: a VM with N disks, its tracking (dirty blocks, sealed
/// logs: durable across sender crashes) and the reference images of
/// every cut (the oracle).
pub struct Vm {
    pub ids: Vec<DiskId>,
    pub size: usize,
    pub disks: Vec<Vec<u8>>,
    pub dirty: Vec<BTreeSet<usize>>,
    /// Last cut (cycle numbers are shared by the VM's disks).
    pub cycle: u64,
    /// Per disk: the cycle its next log is based on.
    pub chain: Vec<u64>,
    pub pending: Vec<BTreeMap<u64, SealedLog>>,
    /// The images at each cut.
    pub snaps: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Newest point committed (as the sender saved it).
    pub last_point: u64,
}

impl Vm {
    pub fn new(rng: &mut Rng, n: usize, blocks: usize) -> Self {
        let ids = (0..n)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&rng.next().to_le_bytes());
                id[15] = i as u8;
                id
            })
            .collect();
        let size = blocks * BLOCK;
        Vm {
            ids,
            size,
            disks: vec![vec![0u8; size]; n],
            dirty: vec![BTreeSet::new(); n],
            cycle: 0,
            chain: vec![0; n],
            pending: vec![BTreeMap::new(); n],
            snaps: BTreeMap::new(),
            last_point: 0,
        }
    }

    /// The guest writes a few bytes somewhere.
    pub fn write(&mut self, rng: &mut Rng) {
        let d = rng.below(self.disks.len() as u64) as usize;
        let off = rng.below(self.size as u64) as usize;
        let len = (1 + rng.below(700) as usize).min(self.size - off);
        let fill = rng.next() as u8;
        let zero = rng.chance(150);
        for (i, b) in self.disks[d][off..off + len].iter_mut().enumerate() {
            *b = if zero { 0 } else { fill.wrapping_add(i as u8) };
        }
        for blk in off / BLOCK..=(off + len - 1) / BLOCK {
            self.dirty[d].insert(blk);
        }
    }

    /// Seal a cycle of every disk at one instant: one log per disk.
    pub fn cut(&mut self, app: bool) -> u64 {
        self.cycle += 1;
        let c = self.cycle;
        for d in 0..self.disks.len() {
            let writes: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.dirty[d])
                .into_iter()
                .map(|b| {
                    let off = b * BLOCK;
                    (off as u64, self.disks[d][off..off + BLOCK].to_vec())
                })
                .collect();
            let bytes = encode_log(self.chain[d], c, &writes);
            self.pending[d].insert(
                c,
                SealedLog {
                    base: self.chain[d],
                    bytes,
                    app,
                },
            );
            self.chain[d] = c;
        }
        self.snaps.insert(c, self.disks.clone());
        c
    }

    /// Seal a whole-disk copy cycle: every older log is superseded.
    pub fn cut_for_copy(&mut self) -> u64 {
        self.cycle += 1;
        let c = self.cycle;
        for d in 0..self.disks.len() {
            self.dirty[d].clear();
            self.pending[d].clear();
            self.chain[d] = c;
        }
        self.snaps.insert(c, self.disks.clone());
        c
    }
}

/// One replica in the model store.
#[derive(Default)]
pub struct Replica {
    pub size: usize,
    pub image: Vec<u8>,
    pub cycle: u64,
    /// The image at every cycle it reached.
    pub history: BTreeMap<u64, Vec<u8>>,
    /// An initial copy in progress: its cycle and image.
    pub copy: Option<(u64, Vec<u8>)>,
    /// The copy's progress: written below it (volatile, as the real
    /// store's), and durable (what a restart resumes from).
    pub copy_progress: u64,
    pub copy_durable: u64,
    /// Logs stored durably, not applied yet.
    pub logs: BTreeMap<u64, Vec<u8>>,
}

/// The receiver's store: durable state plus the volatile staging of logs.
#[derive(Default)]
pub struct Store {
    pub disks: BTreeMap<DiskId, Replica>,
    /// Staged logs by (connection, op): lost on a crash.
    pub staging: BTreeMap<(u64, OpId), (DiskId, Vec<u8>)>,
    /// Committed points: cycle → the disks listed.
    pub points: BTreeMap<u64, Vec<DiskId>>,
    pub applies: BTreeMap<(DiskId, u64), u32>,
    /// Invariant violations found while executing actions.
    pub violations: Vec<String>,
    /// The connection whose `BeginInitial` of the disk was handed over
    /// last (the receiver's copy fence, moved when the connection hands the
    /// action over: `Conn::start_initial`). An older connection's copy is
    /// superseded: its `BeginInitial` fails without touching the store, its
    /// writes are dropped, its `FinishInitial` fails (as the receiver's
    /// writer thread and begin do).
    pub copy_conn: BTreeMap<DiskId, u64>,
    /// As a store that commits a point once its logs are durable
    /// (`ReplicaStore::commits_durable_logs`, the directory store): a point
    /// may be committed on a chain of durable logs not applied yet.
    pub commit_stored: bool,
    /// Points committed while a disk had not applied them yet.
    pub before_apply: u64,
    /// Logs stored while the replica had not applied their base yet.
    pub stored_ahead: u64,
    /// Actions failed on purpose ([`Store::refuse`]).
    pub refused: u64,
    /// Of those, applies that failed with the disk's next log stored.
    pub refused_before_next: u64,
}

fn fail(code: ErrorCode, message: impl Into<String>) -> StoreFailure {
    StoreFailure {
        code,
        retryable: true,
        message: message.into(),
    }
}

impl Store {
    /// Disk `id` as of `cycle`: the image it reached then, or (with
    /// [`Store::commit_stored`]) its replica with the durable logs that
    /// chain from the replica's cycle to `cycle` replayed on a copy, as
    /// the real store checks them (every log in between, in order, based
    /// on the one before). `None` if neither.
    pub fn image_at(&self, id: &DiskId, cycle: u64) -> Option<Vec<u8>> {
        let r = self.disks.get(id)?;
        if let Some(img) = r.history.get(&cycle) {
            return Some(img.clone());
        }
        if !self.commit_stored || r.copy.is_some() || cycle <= r.cycle {
            return None;
        }
        let mut img = r.image.clone();
        let mut at = r.cycle;
        for (c, b) in r.logs.range(r.cycle + 1..=cycle) {
            let (base, lc, writes) = decode_log(b)?;
            if base != at || lc != *c {
                return None;
            }
            for (off, data) in writes {
                let off = off as usize;
                img.get_mut(off..off + data.len())?.copy_from_slice(&data);
            }
            at = *c;
        }
        (at == cycle).then_some(img)
    }

    /// A crash and restart: staging is gone; durable logs whose base is
    /// the replica's cycle are applied (as the real store's recovery).
    pub fn crash_and_recover(&mut self) {
        self.staging.clear();
        for r in self.disks.values_mut() {
            r.copy_progress = r.copy_durable;
        }
        let ids: Vec<DiskId> = self.disks.keys().copied().collect();
        for id in ids {
            while let Some(c) = self.next_recoverable(&id) {
                if let Err(e) = self.apply(id, c) {
                    self.violations.push(format!("recovery: {}", e.message));
                    break;
                }
            }
        }
    }

    /// A durable log based on the replica's cycle, if any.
    fn next_recoverable(&self, id: &DiskId) -> Option<u64> {
        let r = self.disks.get(id)?;
        r.logs.iter().find_map(|(c, b)| match decode_log(b) {
            Some((base, _, _)) if base == r.cycle && *c > r.cycle => Some(*c),
            _ => None,
        })
    }

    fn apply(&mut self, id: DiskId, cycle: u64) -> Result<(), StoreFailure> {
        let r = self
            .disks
            .get_mut(&id)
            .ok_or_else(|| fail(ErrorCode::NotFound, "unknown disk"))?;
        if cycle <= r.cycle {
            r.logs.remove(&cycle);
            return Ok(());
        }
        let bytes = r
            .logs
            .get(&cycle)
            .ok_or_else(|| fail(ErrorCode::NotFound, format!("no durable log {cycle}")))?;
        let (base, c, writes) = decode_log(bytes)
            .ok_or_else(|| fail(ErrorCode::Checksum, format!("log {cycle} is unreadable")))?;
        if c != cycle || base != r.cycle {
            return Err(StoreFailure {
                code: ErrorCode::InvalidState,
                retryable: false,
                message: format!("log {cycle} based on {base}, replica at {}", r.cycle),
            });
        }
        for (off, data) in writes {
            let off = off as usize;
            if off + data.len() > r.image.len() {
                return Err(fail(ErrorCode::Checksum, "a write past the disk"));
            }
            r.image[off..off + data.len()].copy_from_slice(&data);
        }
        r.cycle = cycle;
        r.history.insert(cycle, r.image.clone());
        r.logs.remove(&cycle);
        let n = self.applies.entry((id, cycle)).or_default();
        *n += 1;
        if *n > 1 {
            self.violations
                .push(format!("log {cycle} of disk {} applied {n} times", id[15]));
        }
        Ok(())
    }

    /// Is a log of the disk newer than `cycle` stored (durable)?
    pub fn next_stored(&self, id: &DiskId, cycle: u64) -> bool {
        self.disks
            .get(id)
            .is_some_and(|r| r.logs.range(cycle + 1..).next().is_some())
    }

    /// Fail action `a` as a store that refuses it whole (a full disk, an
    /// I/O error): retryable, and nothing it would change is changed (as
    /// the real store: a failed apply is rolled back from its undo record,
    /// a failed store leaves no log behind). `None` for an action that has
    /// no completion or cannot fail this way.
    pub fn refuse(&mut self, conn: u64, a: &ReceiverAction) -> Option<(OpId, StoreDone)> {
        let full = || fail(ErrorCode::NoSpace, "injected: the store is full");
        let io = || fail(ErrorCode::Io, "injected: an I/O error");
        let done = match a {
            ReceiverAction::ApplyLog {
                op, disk_id, cycle, ..
            } => {
                if self.next_stored(disk_id, *cycle) {
                    self.refused_before_next += 1;
                }
                (*op, StoreDone::LogApplied(Err(full())))
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                self.staging.remove(&(conn, *op));
                (*op, StoreDone::LogStored(Err(full())))
            }
            ReceiverAction::CommitPoint { op, .. } => (*op, StoreDone::PointCommitted(Err(io()))),
            ReceiverAction::HashBlocks { op, .. } => (*op, StoreDone::Hashed(Err(io()))),
            ReceiverAction::BeginInitial { op, .. } => (*op, StoreDone::InitialBegun(Err(full()))),
            _ => return None,
        };
        self.refused += 1;
        Some(done)
    }

    /// Execute one action of connection `conn`; the completion, if any.
    pub fn perform(&mut self, conn: u64, a: ReceiverAction) -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, open } => {
                let st = match self.disks.get(&open.disk_id) {
                    // As the store: a replica a copy is overwriting is at
                    // no cycle (`ReplicaState::replacing`).
                    Some(r) => DiskStatus {
                        replica_cycle: if r.copy.is_some() { 0 } else { r.cycle },
                        replica_size: r.size as u64,
                        copy_cycle: r.copy.as_ref().map_or(0, |(c, _)| *c),
                        resume_offset: r.copy.as_ref().map_or(0, |_| r.copy_durable),
                        ..Default::default()
                    },
                    None => DiskStatus::default(),
                };
                Some((op, StoreDone::DiskLoaded(Ok(st))))
            }
            ReceiverAction::BeginInitial { op, open, begin } => {
                // As the store and its driver (receiver::begin_initial): a
                // copy of the same size resumes at its durable offset if
                // the sender resumes (start_offset > 0, then it continues as
                // the newer cut when the offsets agree) or restarts the same
                // cycle; anything else starts over on a zeroed image.
                if self
                    .copy_conn
                    .get(&open.disk_id)
                    .is_some_and(|&c| c != conn)
                {
                    let e = fail(ErrorCode::InvalidState, "superseded by a newer copy");
                    return Some((op, StoreDone::InitialBegun(Err(e))));
                }
                let r = self.disks.entry(open.disk_id).or_default();
                let size = begin.disk_size as usize;
                let resumes = matches!(&r.copy, Some((c, img))
                    if img.len() == size && (begin.start_offset > 0 || *c == begin.cycle));
                if resumes {
                    let resume = r.copy_durable;
                    r.copy_progress = resume;
                    if begin.start_offset > 0 && resume == begin.start_offset {
                        if let Some((c, _)) = r.copy.as_mut() {
                            *c = begin.cycle;
                        }
                    }
                    return Some((op, StoreDone::InitialBegun(Ok(resume))));
                }
                r.copy = Some((begin.cycle, vec![0u8; size]));
                r.copy_progress = 0;
                r.copy_durable = 0;
                // As the store (`Site::begin_initial`): the points that
                // include the disk cannot be rebuilt once the copy starts.
                let id = open.disk_id;
                self.points.retain(|_, disks| !disks.contains(&id));
                Some((op, StoreDone::InitialBegun(Ok(0))))
            }
            ReceiverAction::WriteInitial {
                disk_id,
                offset,
                data,
                ..
            } => {
                if self.copy_conn.get(&disk_id).is_some_and(|&c| c != conn) {
                    return None;
                }
                if let Some(r) = self.disks.get_mut(&disk_id) {
                    if let Some((_, img)) = r.copy.as_mut() {
                        // As the store: a gap above the progress is zeroed
                        // (a skipped hole), the progress only grows, and is
                        // made durable every few blocks.
                        let (off, end) = (offset as usize, offset as usize + data.len());
                        let p = (r.copy_progress as usize).min(img.len());
                        if off > p {
                            if let Some(gap) = img.get_mut(p..off) {
                                gap.fill(0);
                            }
                        }
                        if let Some(dst) = img.get_mut(off..end) {
                            dst.copy_from_slice(&data);
                        }
                        r.copy_progress = r.copy_progress.max(end as u64);
                        if r.copy_progress - r.copy_durable >= 2 * BLOCK as u64 {
                            r.copy_durable = r.copy_progress;
                        }
                    }
                }
                None
            }
            ReceiverAction::FinishInitial {
                op, disk_id, cycle, ..
            } => {
                if self.copy_conn.get(&disk_id).is_some_and(|&c| c != conn) {
                    let e = fail(ErrorCode::InvalidState, "superseded by a newer copy");
                    return Some((op, StoreDone::InitialFinished(Err(e))));
                }
                let res = match self.disks.get_mut(&disk_id) {
                    Some(r) if r.copy.as_ref().is_some_and(|(c, _)| *c == cycle) => {
                        let (_, mut img) = r.copy.take().unwrap_or_default();
                        // As the store: the tail past the progress (holes)
                        // is zeroed.
                        if let Some(tail) = img.get_mut(r.copy_progress as usize..) {
                            tail.fill(0);
                        }
                        r.copy_progress = 0;
                        r.copy_durable = 0;
                        r.size = img.len();
                        r.image = img;
                        r.cycle = cycle;
                        r.history.insert(cycle, r.image.clone());
                        Ok(())
                    }
                    _ => Err(fail(ErrorCode::InvalidState, "no such copy")),
                };
                Some((op, StoreDone::InitialFinished(res)))
            }
            ReceiverAction::StageLog { op, begin, .. } => {
                self.staging.insert((conn, op), (begin.disk_id, Vec::new()));
                None
            }
            ReceiverAction::StageLogData { op, offset, data } => {
                if let Some((_, b)) = self.staging.get_mut(&(conn, op)) {
                    if b.len() as u64 == offset {
                        b.extend_from_slice(&data);
                    } else {
                        self.violations.push("staged log data out of order".into());
                    }
                }
                None
            }
            ReceiverAction::StoreLogDurably {
                op,
                disk_id,
                cycle,
                log_checksum,
                ..
            } => {
                let res = match self.staging.remove(&(conn, op)) {
                    Some((id, b)) if id == disk_id => {
                        if log_hash(&b) != log_checksum {
                            self.violations.push(format!(
                                "log {cycle} handed to the store with a wrong checksum"
                            ));
                        }
                        match self.disks.get_mut(&disk_id) {
                            Some(r) => {
                                if decode_log(&b).is_some_and(|(base, _, _)| base > r.cycle) {
                                    self.stored_ahead += 1;
                                }
                                r.logs.insert(cycle, b);
                                Ok(LogStored::Stored)
                            }
                            None => Err(fail(ErrorCode::NotFound, "unknown disk")),
                        }
                    }
                    _ => Err(fail(ErrorCode::Internal, "nothing staged")),
                };
                Some((op, StoreDone::LogStored(res)))
            }
            ReceiverAction::DiscardLog { op } => {
                self.staging.remove(&(conn, op));
                None
            }
            ReceiverAction::ApplyLog {
                op, disk_id, cycle, ..
            } => Some((op, StoreDone::LogApplied(self.apply(disk_id, cycle)))),
            ReceiverAction::CommitPoint {
                op, cycle, disks, ..
            } => {
                // As the store (`replica::Site::commit_point`): a disk
                // whose initial copy is under way is at no cycle (a point
                // sent with a copy's last bytes waits for its
                // `FinishInitial`).
                let all = disks.iter().all(|d| {
                    d.cycle == cycle
                        && self.disks.get(&d.disk_id).is_some_and(|r| r.copy.is_none())
                        && self.image_at(&d.disk_id, cycle).is_some()
                });
                if all {
                    if disks.iter().any(|d| {
                        self.disks
                            .get(&d.disk_id)
                            .is_some_and(|r| !r.history.contains_key(&cycle))
                    }) {
                        self.before_apply += 1;
                    }
                    self.points
                        .insert(cycle, disks.iter().map(|d| d.disk_id).collect());
                }
                Some((op, StoreDone::PointCommitted(Ok(all))))
            }
            ReceiverAction::HashBlocks { op, req, .. } => {
                let res = match self.disks.get(&req.disk_id) {
                    Some(r) if r.cycle == req.replica_cycle => {
                        let bs = req.block_size as usize;
                        let mut out = Vec::new();
                        for run in &req.runs {
                            for b in 0..run.blocks as usize {
                                let off = run.offset as usize + b * bs;
                                out.push(block_digest(&r.image, off, bs));
                            }
                        }
                        Ok((r.size as u64, out))
                    }
                    _ => Err(fail(
                        ErrorCode::InvalidState,
                        "the replica is at another cycle",
                    )),
                };
                Some((op, StoreDone::Hashed(res)))
            }
            ReceiverAction::PrepareResync { op, .. } => {
                Some((op, StoreDone::ResyncPrepared(Ok(()))))
            }
            ReceiverAction::MarkNeedsResync { why, .. } => {
                self.violations.push(format!(
                    "the replica was marked for resync without cause: {why}"
                ));
                None
            }
            ReceiverAction::Admin { op, .. } => Some((
                op,
                StoreDone::AdminDone(Err(fail(ErrorCode::NotFound, "no administration here"))),
            )),
            ReceiverAction::Refused { .. } => None,
        }
    }
}

/// Digest of one block of `img` (0 past its end), as the real store.
pub fn block_digest(img: &[u8], off: usize, bs: usize) -> u128 {
    if off >= img.len() {
        return 0;
    }
    vdrep::resync::block_digest(&img[off..(off + bs).min(img.len())])
}

/// xxh3-128 of a whole log, computed like the sender does.
pub fn log_hash(b: &[u8]) -> u128 {
    let mut h = vdrep::wire::LogHasher::new();
    h.update(b);
    h.digest128()
}
