//! Deterministic simulation of a replication conversation (quinn's `Pair`,
//! FoundationDB / TigerBeetle style): a sender session and a receiver
//! session in one thread, a simulated network with seeded reordering,
//! fragmentation, stalls, disconnects and — on log streams, where the
//! protocol must catch them — lost, duplicated and damaged frames, and
//! crashes of either side with a restart from its durable state.
//!
//! The sender's side is a VM with N disks written by a seeded workload and
//! cut into cycles ([`model::Vm`]); the receiver's actions run against a
//! reference store ([`model::Store`]). Each schedule checks:
//! - no acknowledged log is lost (after every receiver crash and at the end);
//! - each log is applied at most once;
//! - a point is committed only when every disk of the VM reached it, and
//!   the replica of every disk at every committed point equals the VM's disk
//!   at that cut;
//! - a checksum compare (verify) of a replica matches the cut it claims;
//! - after the faults stop, everything converges (all logs applied, the
//!   newest cut committed);
//! - all of it also when the store fails an action whole now and then (a
//!   full disk, an I/O error: [`model::Store::refuse`]), an apply with the
//!   disk's next log already stored behind it too;
//! - all of it also when the next cycle is cut and submitted the moment the
//!   previous one is all sent, before its `Ack` (pipelined cycles), and
//!   a disk's next log is sent behind the one in flight (protocol 8,
//!   counted in `Stats::behind`; seed 3 found the flaw of the unmarked
//!   version tried in protocol 7).
//!
//! `VDREP_SIM_SCHEDULES=N` sets the number of schedules (default 20,000: seeds 3060 and 78149 found replica corruptions that 2,000 missed; 300,000 ran clean in 260 s),
//! `VDREP_SIM_FIRST=F` starts at seed F (to explore past the default range:
//! seed 191926 found a livelock that 0..191925 missed); besides these,
//! `VDREP_SIM_EXPLORE=N` seeds (default 5,000, none with `VDREP_SIM_FIRST`)
//! from a start taken from the clock are run, so that every run searches
//! new schedules (the start is printed, a failure names its seed),
//! `VDREP_SIM_SEED=S` runs one seed and prints its trace. A seed replays
//! exactly (checked every 500th): the sessions keep no hash-ordered state.

#[path = "session_sim/model.rs"]
mod model;

use std::collections::{BTreeSet, VecDeque};

use model::{block_digest, Rng, Store, Vm, BLOCK};
use vdrep::wire::session::{
    Event, Job, Output, ReadData, ReadId, ReadWhat, Receiver, ReceiverAction, ReceiverConfig,
    Sender, SenderAction, SenderConfig, SourceError, StreamId,
};
use vdrep::wire::{self, DiskKind, HashRun, InitialBegin, LogBegin, Msg, OpenDisk};

const STEP_NS: u64 = 1_000_000;
const CHAOS_STEPS: u64 = 700;
/// Steps after the faults stop within which everything must converge.
/// The slowest honest schedule: 6 pending cycles (the most `cut` allows)
/// of 3 disks of 16 blocks, ~8 KiB logs each, read 16 bytes at a time
/// (the smallest chunk) at 15 % of the steps is ~60,000 steps, plus a
/// copy of the 3 disks (~10,000). 20,000 was too few: seed 868,827
/// converged at step 25,665 with every point in order (a slow schedule,
/// not a livelock; a livelock never converges).
const CALM_STEPS: u64 = 150_000;
/// Chance (per mille) that the store fails an action it could fail in
/// the chaos phase ([`model::Store::refuse`]).
const STORE_FAIL_PER_MILLE: u64 = 50;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    ToReceiver,
    ToSender,
}

#[derive(Clone, Debug)]
enum Payload {
    Data(Vec<u8>),
    Fin,
    Reset,
}

#[derive(Clone, Debug)]
struct Packet {
    conn: u64,
    dir: Dir,
    stream: StreamId,
    payload: Payload,
}

/// What the schedule exercised (summed over all schedules and checked, so
/// that a harness that stops injecting faults fails).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Stats {
    points: u64,
    disconnects: u64,
    sender_crashes: u64,
    receiver_crashes: u64,
    mangled: u64,
    refused: u64,
    timeouts: u64,
    verifies: u64,
    recopies: u64,
    /// Initial copies resumed at the receiver's durable offset.
    resumes: u64,
    /// Cycles cut the moment the previous ones were all sent, before their
    /// `Ack` (the sender's pipelined cycles).
    pipelined: u64,
    /// Logs sent behind the disk's log in flight (protocol 8,
    /// `LogBegin::behind`).
    behind: u64,
    /// Points the store committed on durable logs before their apply
    /// (schedules with `Store::commit_stored`).
    before_apply: u64,
    /// Logs stored while the log they are based on was not applied yet
    /// (the receiver stores a disk's next log beside the previous one's
    /// apply).
    stored_ahead: u64,
    /// Store actions that failed (full, I/O error) in the chaos phase.
    store_failures: u64,
    /// Of those, applies that failed with the disk's next log already
    /// stored behind them.
    failed_before_next: u64,
}

/// The sender's host process: volatile per connection.
#[derive(Default)]
struct Host {
    ready: bool,
    /// Disks whose initial copy of this connection is applied.
    copying: Option<(u64, BTreeSet<usize>)>,
    /// The image of the copy cut (volatile: a crash takes a new cut).
    copy_image: Option<(u64, Vec<Vec<u8>>)>,
    /// The replica's cycle of each disk, as the sender knows it.
    replica: Vec<u64>,
    verify: Option<(StreamId, usize, u64)>,
    /// Per disk of a resumed copy: where it resumes, and the blocks below
    /// that changed since the interrupted copy's cut (read first).
    resume: Vec<(u64, BTreeSet<usize>)>,
}

struct World {
    rng: Rng,
    step: u64,
    now: u64,
    chaos: bool,
    vm: Vm,
    store: Store,
    conn: u64,
    up: bool,
    reconnect_at: u64,
    stall_until: u64,
    sender: Option<Sender>,
    receiver: Option<Receiver>,
    host: Host,
    /// The cut of each disk's unfinished copy, as the sender saves it
    /// (it survives a crash, as `copy_cycles` in the real sender).
    copy_cycle: Vec<u64>,
    /// Per disk, the cuts of the unfinished copy and of the resumed ones
    /// that continued it: the replica below the resume offset holds data of
    /// any of them. (The tracker gives a failed copy's changes back to the
    /// live bitmap, so a resumed copy carries what changed since the first.)
    copy_chain: Vec<Vec<u64>>,
    net: Vec<Packet>,
    store_q: VecDeque<(u64, ReceiverAction)>,
    reads: VecDeque<(u64, ReadId, ReadWhat, u64, usize)>,
    /// (disk, cycle) the receiver acknowledged as durable.
    acked: BTreeSet<(u8, u64)>,
    trace: VecDeque<String>,
    verbose: bool,
    stats: Stats,
    failure: Option<String>,
}

impl World {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.below(3) as usize;
        let blocks = 4 + rng.below(12) as usize;
        let vm = Vm::new(&mut rng, n, blocks);
        World {
            rng,
            step: 0,
            now: 0,
            chaos: true,
            vm,
            // Every other schedule: a store that commits a point once its
            // logs are durable (the directory store), else once applied.
            store: Store {
                commit_stored: seed % 2 == 0,
                ..Store::default()
            },
            conn: 0,
            up: false,
            reconnect_at: 0,
            stall_until: 0,
            sender: None,
            receiver: None,
            host: Host::default(),
            copy_cycle: vec![0; n],
            copy_chain: vec![Vec::new(); n],
            net: Vec::new(),
            store_q: VecDeque::new(),
            reads: VecDeque::new(),
            acked: BTreeSet::new(),
            trace: VecDeque::new(),
            verbose,
            stats: Stats::default(),
            failure: None,
        }
    }

    fn note(&mut self, s: String) {
        if self.verbose {
            eprintln!("[{}] {s}", self.step);
        }
        self.trace.push_back(format!("[{}] {s}", self.step));
        if self.trace.len() > 60 {
            self.trace.pop_front();
        }
    }

    fn violate(&mut self, s: String) {
        if self.failure.is_none() {
            self.failure = Some(s);
        }
    }

    fn open_disks(&self) -> Vec<OpenDisk> {
        self.vm
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| OpenDisk {
                vm: "vm1".into(),
                disk_name: format!("d{i}.img"),
                disk_id: *id,
                block_size: BLOCK as u32,
                disk_size: self.vm.size as u64,
                kind: DiskKind::Raw,
            })
            .collect()
    }

    fn connect(&mut self) {
        self.conn += 1;
        self.up = true;
        self.host = Host {
            replica: vec![0; self.vm.ids.len()],
            ..Host::default()
        };
        let chunk = 16 + self.rng.below(200) as usize;
        let cfg = SenderConfig {
            site_name: "primary".into(),
            software_version: "sim".into(),
            vm: "vm1".into(),
            disks: self.open_disks(),
            last_point: self.vm.last_point,
            timeout_ns: 150 * STEP_NS,
            chunk_size: chunk,
            // Both ways of committing: ahead of the Acks, and after them.
            commit_ahead: match env_u64("VDREP_SIM_AHEAD") {
                Some(v) => v != 0,
                None => self.rng.below(4) != 0,
            },
            open_with_hello: true,
            follow: true,
            protocol_version: vdrep::wire::PROTOCOL_VERSION,
        };
        self.receiver = Some(Receiver::new(ReceiverConfig {
            site_name: "secondary".into(),
            software_version: "sim".into(),
            store_free: 0,
            newest_version: vdrep::wire::PROTOCOL_VERSION,
            commit_stored: self.store.commit_stored,
        }));
        self.sender = Some(Sender::new(cfg, self.now));
        self.note(format!("connect #{}", self.conn));
        self.drain();
    }

    /// The connection is gone (either side noticed, or a crash).
    fn disconnect(&mut self, why: &str) {
        if !self.up {
            return;
        }
        self.up = false;
        self.note(format!("disconnect #{}: {why}", self.conn));
        if let Some(mut r) = self.receiver.take() {
            r.handle(self.now, Event::ConnectionLost);
            while let Some(o) = r.poll() {
                if let Output::Action(a) = o {
                    self.store_q.push_back((self.conn, a));
                }
            }
        }
        if let Some(mut s) = self.sender.take() {
            s.handle(self.now, Event::ConnectionLost);
        }
        self.net.clear();
        self.reads.clear();
        self.host.ready = false;
        self.host.copying = None;
        self.reconnect_at = self.step + 1 + self.rng.below(60);
    }

    /// Move every output of both sessions to the network or the queues.
    fn drain(&mut self) {
        loop {
            let mut moved = false;
            if let Some(o) = self.sender.as_mut().and_then(Sender::poll) {
                moved = true;
                self.sender_output(o);
            }
            if let Some(o) = self.receiver.as_mut().and_then(Receiver::poll) {
                moved = true;
                self.receiver_output(o);
            }
            if !moved {
                return;
            }
        }
    }

    fn push(&mut self, dir: Dir, stream: StreamId, payload: Payload) {
        self.net.push(Packet {
            conn: self.conn,
            dir,
            stream,
            payload,
        });
    }

    fn receiver_output(&mut self, o: Output<ReceiverAction>) {
        match o {
            Output::Send { stream, bytes } => {
                if let Ok(Some((Msg::Ack(a), _))) = wire::decode(&bytes) {
                    if a.durable {
                        self.acked.insert((a.disk_id[15], a.cycle));
                    }
                }
                self.push(Dir::ToSender, stream, Payload::Data(bytes));
            }
            Output::Finish(s) => self.push(Dir::ToSender, s, Payload::Fin),
            Output::Reset(s) => self.push(Dir::ToSender, s, Payload::Reset),
            Output::Close(e) => self.disconnect(&format!("receiver closed: {e}")),
            Output::Action(ReceiverAction::Refused { stream, error }) => {
                self.stats.refused += 1;
                self.note(format!("receiver refused stream {}: {error}", stream.0));
            }
            Output::Action(a) => {
                if let ReceiverAction::BeginInitial { begin, .. } = &a {
                    // The receiver's copy fence moves when the connection
                    // hands the action over, not when the store runs it.
                    self.store.copy_conn.insert(begin.disk_id, self.conn);
                }
                self.store_q.push_back((self.conn, a))
            }
            // Only a sender's copy hands read buffers back.
            Output::Spent { .. } => {}
        }
    }

    fn sender_output(&mut self, o: Output<SenderAction>) {
        match o {
            Output::Send { stream, bytes } => {
                if let Ok(Some((Msg::LogBegin(b), _))) = wire::decode(&bytes) {
                    self.stats.behind += u64::from(b.behind);
                }
                self.push(Dir::ToReceiver, stream, Payload::Data(bytes))
            }
            Output::Finish(s) => self.push(Dir::ToReceiver, s, Payload::Fin),
            Output::Reset(s) => self.push(Dir::ToReceiver, s, Payload::Reset),
            Output::Close(e) => {
                if matches!(e, vdrep::wire::session::SessionError::Timeout { .. }) {
                    self.stats.timeouts += 1;
                }
                self.disconnect(&format!("sender closed: {e}"));
            }
            Output::Action(a) => self.sender_action(a),
            // The simulated reader makes a new buffer per read.
            Output::Spent { .. } => {}
        }
    }

    fn disk_index(&self, id: &[u8; 16]) -> usize {
        self.vm
            .ids
            .iter()
            .position(|x| x == id)
            .unwrap_or(usize::MAX)
    }

    fn sender_action(&mut self, a: SenderAction) {
        match a {
            SenderAction::Ready { states } => {
                self.host.ready = true;
                for st in &states {
                    let d = self.disk_index(&st.disk_id);
                    self.host.replica[d] = st.replica_cycle;
                }
                self.note(format!(
                    "ready: replicas at {:?}",
                    states.iter().map(|s| s.replica_cycle).collect::<Vec<_>>()
                ));
                self.plan(&states);
            }
            SenderAction::Read {
                id,
                what,
                offset,
                max,
                ..
            } => self.reads.push_back((self.conn, id, what, offset, max)),
            SenderAction::LogDurable { .. } => {}
            SenderAction::LogApplied { disk_id, cycle } => {
                let d = self.disk_index(&disk_id);
                self.vm.pending[d].remove(&cycle);
                self.host.replica[d] = self.host.replica[d].max(cycle);
            }
            SenderAction::InitialApplied { disk_id, cycle } => {
                let d = self.disk_index(&disk_id);
                self.host.replica[d] = cycle;
                if self.copy_cycle.get(d) == Some(&cycle) {
                    self.copy_cycle[d] = 0;
                    self.copy_chain[d].clear();
                }
                if let Some((c, done)) = &mut self.host.copying {
                    if *c == cycle {
                        done.insert(d);
                        if done.len() == self.vm.ids.len() {
                            self.host.copying = None;
                            self.host.copy_image = None;
                        }
                    }
                }
            }
            SenderAction::JobFailed { job, error, .. } => {
                self.note(format!("job of cycle {} failed: {error}", job.cycle()));
                self.disconnect("a job failed");
            }
            SenderAction::PointCommitted { cycle, .. } => {
                self.stats.points += 1;
                self.vm.last_point = self.vm.last_point.max(cycle);
                self.note(format!("point {cycle} committed"));
            }
            SenderAction::PointFailed { cycle, error } => {
                self.note(format!("point {cycle} failed: {error}"));
                self.disconnect("a point failed");
            }
            SenderAction::Hashes {
                disk_id,
                replica_cycle,
                runs,
                hashes,
                stream,
                ..
            } => {
                let d = self.disk_index(&disk_id);
                let Some(snap) = self.vm.snaps.get(&replica_cycle) else {
                    self.violate(format!("verify answered for unknown cycle {replica_cycle}"));
                    return;
                };
                let img = snap[d].clone();
                let img = &img;
                let mut i = 0;
                for r in &runs {
                    for b in 0..r.blocks as usize {
                        let want = block_digest(img, r.offset as usize + b * BLOCK, BLOCK);
                        if hashes.get(i) != Some(&want) {
                            let msg = format!(
                                "verify: disk {d} block {} of the replica at cycle {replica_cycle} differs from the cut",
                                r.offset as usize / BLOCK + b
                            );
                            self.violate(msg);
                        }
                        i += 1;
                    }
                }
                self.stats.verifies += 1;
                if let Some(s) = self.sender.as_mut() {
                    let _ = s.finish_compare(stream, None);
                }
            }
            SenderAction::ResyncPrepared { .. } => {}
            SenderAction::CompareDone { result, .. } => {
                self.host.verify = None;
                if let Err(e) = result {
                    self.note(format!("verify ended: {e}"));
                }
            }
        }
    }

    /// After `Ready`: copy every disk, or ship the pending logs.
    fn plan(&mut self, states: &[wire::DiskState]) {
        let mut copy = false;
        for (d, st) in states.iter().enumerate() {
            let r = st.replica_cycle;
            if r == 0 {
                copy = true;
                continue;
            }
            let base = self.vm.pending[d]
                .range(r + 1..)
                .next()
                .map(|(_, l)| l.base)
                .unwrap_or(self.vm.chain[d]);
            if base != r {
                // The changes since the replica's cycle are not all here
                // (a copy of another disk superseded them): copy again.
                copy = true;
            }
        }
        if copy {
            self.stats.recopies += 1;
            let c = self.vm.cut_for_copy();
            self.host.copy_image = Some((c, self.vm.disks.clone()));
            self.host.copying = Some((c, BTreeSet::new()));
            self.host.resume.clear();
            for (d, id) in self.vm.ids.clone().iter().enumerate() {
                // As the real sender: an unfinished copy of the cut the
                // sender saved resumes at the receiver's offset, with what
                // changed below it since that cut read first.
                let st = &states[d];
                let old = self.copy_cycle[d];
                let start = if old != 0 && st.copy_cycle == old {
                    st.resume_offset
                } else {
                    0
                };
                if start == 0 {
                    self.copy_chain[d].clear();
                }
                let now = &self.vm.disks[d];
                let changed: BTreeSet<usize> = (0..(start as usize).div_ceil(BLOCK))
                    .filter(|b| {
                        let r = b * BLOCK..(b + 1) * BLOCK;
                        self.copy_chain[d].iter().any(|x| {
                            self.vm
                                .snaps
                                .get(x)
                                .is_none_or(|snap| snap[d][r.clone()] != now[r.clone()])
                        })
                    })
                    .collect();
                if start > 0 {
                    self.stats.resumes += 1;
                }
                self.copy_chain[d].push(c);
                self.note(format!(
                    "initial copy of disk {d} at cycle {c} from {start} ({} changed below)",
                    changed.len()
                ));
                self.host.resume.push((start, changed));
                self.copy_cycle[d] = c;
                self.submit(Job::Initial(InitialBegin {
                    disk_id: *id,
                    cycle: c,
                    disk_size: self.vm.size as u64,
                    start_offset: start,
                }));
            }
            return;
        }
        for (d, st) in states.iter().enumerate() {
            let r = st.replica_cycle;
            let stale: Vec<u64> = self.vm.pending[d].range(..=r).map(|(c, _)| *c).collect();
            for c in stale {
                self.vm.pending[d].remove(&c);
            }
            let cycles: Vec<u64> = self.vm.pending[d].keys().copied().collect();
            for c in cycles {
                self.submit_log(d, c);
            }
        }
    }

    fn submit(&mut self, job: Job) {
        if let Some(s) = self.sender.as_mut() {
            if let Err(e) = s.submit(job) {
                self.violate(format!("submit refused: {e}"));
            }
        }
    }

    fn submit_log(&mut self, d: usize, c: u64) {
        let Some(l) = self.vm.pending[d].get(&c) else {
            return;
        };
        let job = Job::Log {
            begin: LogBegin {
                disk_id: self.vm.ids[d],
                disk_name: format!("d{d}.img"),
                cycle: c,
                base_cycle: l.base,
                block_size: BLOCK as u32,
                base_size: self.vm.size as u64,
                disk_size: self.vm.size as u64,
                cut_unix_ns: c,
                total_len: l.bytes.len() as u64,
                behind: false,
            },
            app_consistent: l.app,
        };
        self.submit(job);
    }

    fn answer_read(&mut self) {
        let Some((conn, id, what, offset, max)) = self.reads.pop_front() else {
            return;
        };
        if conn != self.conn || !self.up {
            return;
        }
        let res = match what {
            ReadWhat::Log { disk_id, cycle } => {
                let d = self.disk_index(&disk_id);
                match self.vm.pending.get(d).and_then(|p| p.get(&cycle)) {
                    Some(l) => {
                        let s = (offset as usize).min(l.bytes.len());
                        let e = (s + max).min(l.bytes.len());
                        Ok(ReadData {
                            offset,
                            data: l.bytes[s..e].to_vec(),
                            end: e == l.bytes.len(),
                        })
                    }
                    None => Err(SourceError(format!("no sealed log {cycle}"))),
                }
            }
            ReadWhat::Initial { disk_id, cycle } => {
                let d = self.disk_index(&disk_id);
                match &self.host.copy_image {
                    Some((c, img)) if *c == cycle => {
                        let img = &img[d];
                        // Below a resumed copy's start: only the blocks
                        // that changed since the interrupted copy's cut.
                        let (start, changed) = self
                            .host
                            .resume
                            .get(d)
                            .map_or((0, None), |(s, ch)| (*s as usize, Some(ch)));
                        let mut s = offset as usize;
                        if s < start {
                            let next = changed
                                .and_then(|ch| ch.range(s / BLOCK..).next())
                                .map(|b| (b * BLOCK).max(s))
                                .filter(|at| *at < start);
                            if let Some(at) = next {
                                let e = (at + max).min((at / BLOCK + 1) * BLOCK).min(start);
                                let res = Ok(ReadData {
                                    offset: at as u64,
                                    data: img[at..e].to_vec(),
                                    end: false,
                                });
                                if let Some(snd) = self.sender.as_mut() {
                                    snd.complete_read(self.now, id, res);
                                }
                                self.drain();
                                return;
                            }
                            s = start;
                        }
                        // Skip all-zero blocks now and then (holes).
                        if self.rng.chance(500) {
                            while s < img.len() && img[s] == 0 {
                                s += 1;
                            }
                        }
                        let e = (s + max).min(img.len());
                        Ok(ReadData {
                            offset: s as u64,
                            data: img[s..e].to_vec(),
                            end: e == img.len(),
                        })
                    }
                    _ => Err(SourceError(format!("no copy image of cycle {cycle}"))),
                }
            }
        };
        if let Some(s) = self.sender.as_mut() {
            s.complete_read(self.now, id, res);
        }
        self.drain();
    }

    /// Perform one store action: in order within a connection, except
    /// that an apply may be passed by the connection's later actions (the
    /// receiver runs each in a task of its own, and an apply is long: the
    /// next log of the disk is stored meanwhile); a dead connection's
    /// actions may lag behind the new one's (its tasks are still running
    /// at the receiver).
    fn run_store(&mut self) {
        if self.store_q.is_empty() {
            return;
        }
        let pick = self.store_q[self.rng.below(self.store_q.len() as u64) as usize].0;
        let Some(mut i) = self.store_q.iter().position(|(c, _)| *c == pick) else {
            return;
        };
        if matches!(self.store_q[i].1, ReceiverAction::ApplyLog { .. }) && self.rng.chance(850) {
            // Any later action, another apply too: the receiver's tasks
            // finish in any order, so the session must not ask for a
            // disk's next apply before the previous one is done.
            let later = self
                .store_q
                .iter()
                .enumerate()
                .skip(i + 1)
                .find(|(_, (c, _))| *c == pick);
            if let Some((j, _)) = later {
                i = j;
            }
        }
        let Some((conn, a)) = self.store_q.remove(i) else {
            return;
        };
        let current_begin = matches!(&a, ReceiverAction::BeginInitial { begin, .. }
            if self.store.copy_conn.get(&begin.disk_id) == Some(&conn));
        if let (true, ReceiverAction::BeginInitial { begin, .. }) = (current_begin, &a) {
            // As the receiver's copy fence: writes other connections still
            // have queued for this disk are dropped, not written over it.
            self.store_q.retain(|(c, q)| {
                *c == conn
                    || !matches!(q, ReceiverAction::WriteInitial { disk_id, .. }
                        if *disk_id == begin.disk_id)
            });
        }
        // Now and then the store fails an action whole (a full disk, an
        // I/O error): the session must neither lose nor reorder anything
        // (a log stored behind a failed apply must not be applied).
        // An apply with the disk's next log stored behind it is the case
        // the session must order with care: fail it more often.
        let per_mille = match &a {
            ReceiverAction::ApplyLog { disk_id, cycle, .. }
                if self.store.next_stored(disk_id, *cycle) =>
            {
                STORE_FAIL_PER_MILLE * 6
            }
            _ => STORE_FAIL_PER_MILLE,
        };
        let injected = if self.chaos && self.rng.chance(per_mille) {
            self.store.refuse(conn, &a)
        } else {
            None
        };
        if let Some((_, done)) = &injected {
            self.note(format!("the store failed an action of #{conn}: {done:?}"));
        }
        let done = match injected {
            Some(d) => Some(d),
            None => self.store.perform(conn, a),
        };
        if let Some(v) = self.store.violations.first() {
            let v = v.clone();
            self.violate(v);
        }
        if let Some((op, d)) = done {
            if conn == self.conn && self.up {
                if let Some(r) = self.receiver.as_mut() {
                    r.complete(self.now, op, d);
                }
            }
        }
        self.check_points();
        self.drain();
    }

    /// Every committed point: all the VM's disks reached it, and equal the
    /// cut.
    fn check_points(&mut self) {
        let mut bad = None;
        for c in self.store.points.keys() {
            let Some(snap) = self.vm.snaps.get(c) else {
                bad = Some(format!("point {c} committed, but no such cut"));
                break;
            };
            for (d, id) in self.vm.ids.iter().enumerate() {
                match self.store.image_at(id, *c).as_ref() {
                    None => {
                        bad = Some(format!(
                            "point {c} committed, but disk {d} never reached it"
                        ));
                    }
                    Some(img) if *img != snap[d] => {
                        bad = Some(format!(
                            "point {c}: the replica of disk {d} differs from the cut"
                        ));
                    }
                    _ => {}
                }
            }
        }
        if let Some(b) = bad {
            self.violate(b);
        }
    }

    /// Every acknowledged log is applied or still durable at the receiver.
    fn check_acked(&mut self, when: &str) {
        for (d, c) in self.acked.clone() {
            let id = self.vm.ids[d as usize];
            let kept = self
                .store
                .disks
                .get(&id)
                .is_some_and(|r| r.history.contains_key(&c) || r.logs.contains_key(&c));
            if !kept {
                self.violate(format!(
                    "{when}: log {c} of disk {d} was acknowledged and is lost"
                ));
            }
        }
    }

    /// Deliver one packet (the oldest of its stream: QUIC keeps order
    /// within a stream, not across streams).
    fn deliver(&mut self) {
        if self.net.is_empty() || self.step < self.stall_until {
            return;
        }
        let pick = self.rng.below(self.net.len() as u64) as usize;
        let (dir, stream) = (self.net[pick].dir, self.net[pick].stream);
        let Some(i) = self
            .net
            .iter()
            .position(|p| p.dir == dir && p.stream == stream)
        else {
            return;
        };
        let mut p = self.net.remove(i);
        if p.conn != self.conn || !self.up {
            return;
        }
        // Faults QUIC would never cause, on log streams only (there the
        // protocol must catch them; an initial copy has no end checksum).
        if self.chaos && dir == Dir::ToReceiver {
            if let Payload::Data(b) = &mut p.payload {
                if b.get(4) == Some(&0x21) && self.rng.chance(25) {
                    self.stats.mangled += 1;
                    match self.rng.below(3) {
                        0 => {
                            self.note(format!("lost a log chunk on stream {}", stream.0));
                            return;
                        }
                        1 => {
                            self.note(format!("duplicated a log chunk on stream {}", stream.0));
                            self.net.insert(i, p.clone());
                        }
                        _ => {
                            // Past the frame header when the chunk has more.
                            let at = match b.len() {
                                0 => return,
                                n if n > 5 => 5 + self.rng.below(n as u64 - 5) as usize,
                                n => n - 1,
                            };
                            b[at] ^= 1 << self.rng.below(8);
                            self.note(format!(
                                "flipped a bit of a log chunk on stream {}",
                                stream.0
                            ));
                        }
                    }
                }
            }
        }
        // Split data at random: the session must reassemble frames.
        if let Payload::Data(b) = &mut p.payload {
            if b.len() > 1 && self.rng.chance(300) {
                let cut = 1 + self.rng.below(b.len() as u64 - 1) as usize;
                let rest = b.split_off(cut);
                self.net.insert(
                    i,
                    Packet {
                        payload: Payload::Data(rest),
                        ..p.clone()
                    },
                );
            }
        }
        let ev = match &p.payload {
            Payload::Data(b) => Event::Data {
                stream,
                bytes: b.as_slice(),
            },
            Payload::Fin => Event::Finished(stream),
            Payload::Reset => Event::Reset(stream),
        };
        match dir {
            Dir::ToReceiver => {
                if let Some(r) = self.receiver.as_mut() {
                    r.handle(self.now, ev);
                }
            }
            Dir::ToSender => {
                if let Some(s) = self.sender.as_mut() {
                    s.handle(self.now, ev);
                }
            }
        }
        self.drain();
    }

    fn crash_sender(&mut self) {
        self.stats.sender_crashes += 1;
        self.note("sender crashed".into());
        self.disconnect("sender crash");
        self.host = Host::default();
    }

    fn crash_receiver(&mut self) {
        self.stats.receiver_crashes += 1;
        self.note("receiver crashed".into());
        self.disconnect("receiver crash");
        self.store_q.clear();
        self.store.crash_and_recover();
        self.check_acked("after a receiver crash");
    }

    fn cut(&mut self) {
        let pending = self.vm.pending.iter().map(|p| p.len()).max().unwrap_or(0);
        if !self.host.ready || self.host.copying.is_some() || pending > 5 {
            return;
        }
        let app = self.rng.chance(300);
        let c = self.vm.cut(app);
        self.note(format!("cut {c}"));
        for d in 0..self.vm.ids.len() {
            self.submit_log(d, c);
        }
        self.drain();
    }

    fn start_verify(&mut self) {
        if !self.host.ready || self.host.copying.is_some() || self.host.verify.is_some() {
            return;
        }
        let d = self.rng.below(self.vm.ids.len() as u64) as usize;
        let r = self.host.replica[d];
        if r == 0 {
            return;
        }
        let Some(s) = self.sender.as_mut() else {
            return;
        };
        let Ok(stream) = s.start_compare(self.vm.ids[d], r) else {
            return;
        };
        let blocks = (self.vm.size / BLOCK) as u32;
        let runs = vec![HashRun { offset: 0, blocks }];
        if s.request_hashes(stream, BLOCK as u32, runs).is_ok() {
            self.host.verify = Some((stream, d, r));
        }
        self.drain();
    }

    fn tick(&mut self) {
        self.step += 1;
        self.now += STEP_NS;
        if let Some(s) = self.sender.as_mut() {
            s.handle(self.now, Event::Tick);
        }
        self.drain();
    }

    /// One step of the schedule.
    fn step_once(&mut self) {
        self.tick();
        if !self.up && self.step >= self.reconnect_at {
            self.connect();
        }
        // As the sender does when a sync or new writes arrive mid-cycle:
        // cut the next cycle as soon as the previous one is all sent.
        if self.chaos && self.sender.as_ref().is_some_and(Sender::all_sent) && self.rng.chance(400)
        {
            let before = self.vm.cycle;
            self.vm.write(&mut self.rng);
            self.cut();
            if self.vm.cycle != before {
                self.stats.pipelined += 1;
            }
        }
        let r = self.rng.below(1000);
        match r {
            0..=449 => self.deliver(),
            450..=649 => self.run_store(),
            650..=799 => self.answer_read(),
            800..=899 => {
                if self.chaos {
                    self.vm.write(&mut self.rng);
                }
            }
            900..=944 => {
                if self.chaos {
                    self.cut();
                }
            }
            945..=954 => {
                if self.chaos {
                    self.start_verify();
                }
            }
            _ => {
                if !self.chaos {
                    return;
                }
                match self.rng.below(1000) {
                    0..=24 if self.up => {
                        self.stats.disconnects += 1;
                        self.disconnect("network lost");
                    }
                    25..=39 => self.crash_sender(),
                    40..=54 => self.crash_receiver(),
                    55..=84 => self.stall_until = self.step + self.rng.below(250),
                    _ => {}
                }
            }
        }
    }

    fn converged(&self) -> bool {
        self.up
            && self.host.ready
            && self.host.copying.is_none()
            && self.vm.pending.iter().all(|p| p.is_empty())
            && self.vm.last_point == self.vm.cycle
            && self.store.points.contains_key(&self.vm.cycle)
    }
}

/// Run one schedule: `Err(why)` if an invariant broke.
fn run(seed: u64, verbose: bool) -> (Result<(), String>, Stats, Vec<String>) {
    let mut w = World::new(seed, verbose);
    // Faults happen only in the chaos phase; some schedules are calmer.
    let chaos = CHAOS_STEPS / 2 + w.rng.below(CHAOS_STEPS);
    while w.step < chaos && w.failure.is_none() {
        w.step_once();
    }
    w.chaos = false;
    w.stall_until = 0;
    // The last changes: one more cut once the sender is ready.
    let mut final_cut = false;
    let end = w.step + CALM_STEPS;
    while w.step < end && w.failure.is_none() {
        if !final_cut && w.host.ready && w.host.copying.is_none() {
            w.vm.write(&mut w.rng);
            w.cut();
            final_cut = true;
        }
        if final_cut && w.converged() {
            break;
        }
        w.step_once();
    }
    if w.failure.is_none() && !(final_cut && w.converged()) {
        w.failure = Some(format!(
            "did not converge after the faults stopped: up {}, ready {}, copying {}, pending {:?}, last point {}, last cut {}",
            w.up,
            w.host.ready,
            w.host.copying.is_some(),
            w.vm.pending.iter().map(|p| p.keys().copied().collect::<Vec<_>>()).collect::<Vec<_>>(),
            w.vm.last_point,
            w.vm.cycle
        ));
    }
    w.check_points();
    w.check_acked("at the end");
    if w.failure.is_none() && w.store.commit_stored {
        // What a restart (or a failover's drain) makes of the points
        // committed on durable logs: every one applied, equal to its cut.
        w.store.crash_and_recover();
        let unapplied: Vec<u64> = w
            .store
            .points
            .keys()
            .copied()
            .filter(|c| {
                w.vm.ids
                    .iter()
                    .any(|id| w.store.disks.get(id).is_none_or(|r| r.cycle < *c))
            })
            .collect();
        if !unapplied.is_empty() {
            w.failure = Some(format!(
                "points {unapplied:?} committed on durable logs are not applied after recovery"
            ));
        }
        w.check_points();
        if let Some(v) = w.store.violations.first() {
            w.failure.get_or_insert_with(|| v.clone());
        }
    }
    w.stats.before_apply = w.store.before_apply;
    w.stats.stored_ahead = w.store.stored_ahead;
    w.stats.store_failures = w.store.refused;
    w.stats.failed_before_next = w.store.refused_before_next;
    let trace = w.trace.iter().cloned().collect();
    (w.failure.map_or(Ok(()), Err), w.stats, trace)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn simulated_schedules_keep_the_invariants() {
    if let Some(seed) = env_u64("VDREP_SIM_SEED") {
        let (r, stats, _) = run(seed, true);
        eprintln!("seed {seed}: {stats:?}");
        if let Err(e) = r {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let n = env_u64("VDREP_SIM_SCHEDULES").unwrap_or(20_000);
    let first = env_u64("VDREP_SIM_FIRST");
    // Besides the fixed range, every run explores seeds no run tried
    // before (from the clock, printed; a failure names its seed and
    // replays): CI then searches further each time, reproducibly.
    let explore = match (first, env_u64("VDREP_SIM_EXPLORE")) {
        (Some(_), None) => 0,
        (_, e) => e.unwrap_or(5_000),
    };
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64 % (1 << 40))
        + (1 << 32);
    let first = first.unwrap_or(0);
    eprintln!(
        "seeds {first}..{} and {from}..{}",
        first + n,
        from + explore
    );
    let t0 = std::time::Instant::now();
    let mut total = Stats::default();
    for seed in (first..first + n).chain(from..from + explore) {
        let out = std::panic::catch_unwind(|| run(seed, false));
        let (r, s, trace) = match out {
            Ok(x) => x,
            Err(_) => panic!(
                "seed {seed} panicked; reproduce with VDREP_SIM_SEED={seed} cargo test --test session_sim"
            ),
        };
        if let Err(e) = r {
            panic!(
                "seed {seed}: {e}\nlast events:\n{}\nreproduce with VDREP_SIM_SEED={seed} cargo test --test session_sim",
                trace.join("\n")
            );
        }
        if seed % 500 == 0 {
            // A seed must replay exactly, or a failure cannot be reproduced
            // (the sessions' maps once iterated in a random order: CI's
            // seed 7798 passed when run alone).
            let (_, s2, trace2) = run(seed, false);
            assert!(
                s2 == s && trace2 == trace,
                "seed {seed} did not replay the same schedule: {s:?} then {s2:?}"
            );
        }
        total.points += s.points;
        total.disconnects += s.disconnects;
        total.sender_crashes += s.sender_crashes;
        total.receiver_crashes += s.receiver_crashes;
        total.mangled += s.mangled;
        total.refused += s.refused;
        total.timeouts += s.timeouts;
        total.verifies += s.verifies;
        total.recopies += s.recopies;
        total.resumes += s.resumes;
        total.pipelined += s.pipelined;
        total.behind += s.behind;
        total.before_apply += s.before_apply;
        total.stored_ahead += s.stored_ahead;
        total.store_failures += s.store_failures;
        total.failed_before_next += s.failed_before_next;
    }
    let n = n + explore;
    eprintln!("{n} schedules in {:.1?}: {total:?}", t0.elapsed());
    if n >= 200 {
        // The harness must actually exercise what it claims to.
        assert!(total.points > n, "too few points: {total:?}");
        assert!(total.disconnects > 0 && total.sender_crashes > 0 && total.receiver_crashes > 0);
        assert!(total.mangled > 0 && total.refused > 0 && total.timeouts > 0);
        assert!(total.verifies > 0 && total.recopies > n);
        assert!(total.resumes > 0, "no copy resumed: {total:?}");
        assert!(total.pipelined > n / 2, "too few pipelined cuts: {total:?}");
        assert!(
            total.behind > n / 4,
            "too few logs sent behind another: {total:?}"
        );
        assert!(
            total.before_apply > n / 4,
            "too few points committed before their logs were applied: {total:?}"
        );
        assert!(
            total.store_failures > n / 4 && total.failed_before_next > n / 400,
            "too few store actions failed: {total:?}"
        );
        assert!(
            total.stored_ahead > n / 4,
            "too few logs stored beside the apply of their base: {total:?}"
        );
    }
}
