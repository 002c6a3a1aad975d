//! The sender's end of a replication conversation (see the parent module).
//!
//! One session is one connection for one VM: `Hello` on the control
//! stream, `OpenDisk` for every disk, then [`SenderAction::Ready`] with the
//! replicas' states. The driver then [`Sender::submit`]s jobs (an initial
//! copy or a log per disk); the session runs one job per disk at a time on
//! its own stream, pulls the bytes with [`SenderAction::Read`], and reports
//! [`SenderAction::LogApplied`] (the log may be deleted) and
//! [`SenderAction::InitialApplied`]. Once every disk of the VM reached a
//! cycle, or sent all of its transfer of it, the session commits that
//! recovery point by itself ([`SenderAction::PointCommitted`]; the
//! receiver holds the commit until every disk is applied there, or only
//! durable with a store that commits durable logs): a point
//! is never committed for only some of the VM's disks. A request unanswered for `timeout_ns` closes the
//! session.

use std::collections::{BTreeMap, VecDeque};

use super::{frame, hexid, Event, Hasher, Inbox, Output, SessionError, StreamId};
use crate::hrl::Encoding;
use crate::wire::{
    self, BlockHashReq, DiskCycle, DiskId, DiskState, HashRun, InitialBegin, InitialChunk,
    InitialEnd, LogBegin, LogChunk, LogEnd, Msg, OpenDisk, PointCommit, ResyncEnd, MAX_DATA,
};

/// The VM this session replicates, and how.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub site_name: String,
    pub software_version: String,
    pub vm: String,
    /// Every disk of the VM (all share its recovery points).
    pub disks: Vec<OpenDisk>,
    /// The newest point known to be committed (0: none); a point that the
    /// replicas reached beyond it is committed again after a reconnect.
    pub last_point: u64,
    /// A request unanswered this long (ns) closes the session.
    pub timeout_ns: u64,
    /// Largest read asked of the driver (bytes, 1..=MAX_DATA).
    pub chunk_size: usize,
    /// Send a point's `PointCommit` as soon as every disk has sent all of
    /// its transfer of the cycle, a log or an initial copy (the receiver
    /// holds it until they are applied, or only durable with a store that
    /// commits durable logs, a copy finished and durable), not
    /// after their `Ack`s: one round trip less per point.
    /// `false` only to measure the difference.
    pub commit_ahead: bool,
    /// Send the `OpenDisk`s in the same flight as the `Hello` (protocol 7),
    /// not after its answer: one round trip less before the first byte.
    /// `false` only to measure the difference.
    pub open_with_hello: bool,
    /// Send a disk's next log behind the one in flight once that one is
    /// all sent, marked [`LogBegin::behind`] (protocol 8), not after its
    /// `Ack`: one round trip and an apply less between a disk's logs.
    /// `false` only to measure the difference.
    pub follow: bool,
    /// The protocol version this session speaks (its `Hello`): normally
    /// [`wire::PROTOCOL_VERSION`]; an older one (down to
    /// [`wire::MIN_PROTOCOL_VERSION`]) to a receiver that refused the
    /// newest. Below 8 no log is sent behind another (`follow` is off).
    pub protocol_version: u16,
}

/// A transfer for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// A sealed log; `app_consistent` as its header says.
    Log {
        begin: LogBegin,
        app_consistent: bool,
    },
    /// A whole-disk copy as of `begin.cycle`, from `begin.start_offset`.
    Initial(InitialBegin),
}

impl Job {
    pub fn disk_id(&self) -> DiskId {
        match self {
            Job::Log { begin, .. } => begin.disk_id,
            Job::Initial(b) => b.disk_id,
        }
    }
    pub fn cycle(&self) -> u64 {
        match self {
            Job::Log { begin, .. } => begin.cycle,
            Job::Initial(b) => b.cycle,
        }
    }
}

/// A read the session asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadId(pub u64);

/// What to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadWhat {
    /// Bytes of the sealed log of `cycle`, exactly at the offset asked.
    Log { disk_id: DiskId, cycle: u64 },
    /// Disk bytes as of the copy's cut: the next data at or after the
    /// offset asked (holes may be skipped: the replica starts zeroed).
    Initial { disk_id: DiskId, cycle: u64 },
}

/// Why the driver could not read what [`SenderAction::Read`] asked for
/// (the disk or log is gone or unreadable): the session fails that job.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// The driver's answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadData {
    /// Where `data` starts.
    pub offset: u64,
    /// At most the length asked.
    pub data: Vec<u8>,
    /// Nothing follows `data`.
    pub end: bool,
}

/// What the sender asks its driver to do, or reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderAction {
    /// Every disk answered `OpenDisk`: the replicas' states, in disk order.
    Ready { states: Vec<DiskState> },
    /// Read bytes to send → [`Sender::complete_read`]. `stream` is the
    /// job's stream (a driver may hold a read back while that stream's
    /// writes are queued).
    Read {
        id: ReadId,
        stream: StreamId,
        what: ReadWhat,
        offset: u64,
        max: usize,
    },
    /// The receiver stored the log durably (not applied yet).
    LogDurable { disk_id: DiskId, cycle: u64 },
    /// The log is applied at the receiver: it may be deleted here.
    LogApplied { disk_id: DiskId, cycle: u64 },
    /// The initial copy is applied: the replica is at `cycle`.
    InitialApplied { disk_id: DiskId, cycle: u64 },
    /// A job failed; `rest` are the disk's queued jobs, handed back.
    JobFailed {
        job: Job,
        error: SessionError,
        rest: Vec<Job>,
    },
    /// The recovery point of `cycle` exists at the receiver.
    PointCommitted { cycle: u64, app_consistent: bool },
    /// The receiver refused the point.
    PointFailed { cycle: u64, error: SessionError },
    /// Digests of a compare, for the runs of one request, in order.
    Hashes {
        stream: StreamId,
        disk_id: DiskId,
        replica_cycle: u64,
        replica_size: u64,
        runs: Vec<HashRun>,
        hashes: Vec<u128>,
    },
    /// The receiver accepted a `ResyncEnd`: send the log of `cycle` next.
    ResyncPrepared { disk_id: DiskId, cycle: u64 },
    /// A compare stream ended: every request was answered (`Ok`) or not.
    CompareDone {
        stream: StreamId,
        disk_id: DiskId,
        result: Result<(), SessionError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hello,
    Opening,
    Ready,
    Closed,
}

#[derive(Debug)]
enum SKind {
    Control,
    Open(DiskId),
    Job {
        job: Job,
        /// Bytes sent so far (log: offset in the log; copy: disk offset).
        sent: u64,
        hasher: Hasher,
        read: Option<ReadId>,
        /// Everything is sent; waiting for the `Ack`.
        done: bool,
        /// The receiver stored it durably (`Ack{durable}`); its apply is
        /// awaited.
        durable: bool,
        /// Copy: chunks sent, and how many of the last ones did not
        /// compress (after a run of them, lz4 is tried on every 16th only:
        /// it costs a tenth of a core on random data).
        chunks: u64,
        incompressible: u32,
    },
    Point(u64, bool),
    Compare {
        disk_id: DiskId,
        replica_cycle: u64,
        asked: VecDeque<Vec<HashRun>>,
        /// The `ResyncEnd` sent, waiting for its `Ack`.
        end: Option<u64>,
        finished: bool,
    },
}

#[derive(Debug)]
struct SStream {
    inbox: Inbox,
    kind: SKind,
    /// Since when an answer is awaited (None: nothing awaited).
    waiting: Option<u64>,
}

/// The sender's end of one connection.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    phase: Phase,
    now: u64,
    next_stream: u64,
    next_read: u64,
    streams: BTreeMap<StreamId, SStream>,
    reads: BTreeMap<ReadId, StreamId>,
    states: BTreeMap<DiskId, DiskState>,
    queues: BTreeMap<DiskId, VecDeque<Job>>,
    /// The job of each disk the receiver works on.
    active: BTreeMap<DiskId, StreamId>,
    /// A log sent behind the disk's active log once that one is all sent
    /// (protocol 8): based on its cycle, it waits at the receiver until the
    /// active log is applied, instead of here for its `Ack`.
    behind: BTreeMap<DiskId, StreamId>,
    /// Cycles each disk reached at the receiver (value: app-consistent).
    reached: BTreeMap<DiskId, BTreeMap<u64, bool>>,
    last_point: u64,
    point_busy: bool,
    /// Domain definitions by the cycle of the cut they were read at
    /// ([`Sender::note_definition`]); a point carries the newest one at or
    /// before its cycle.
    definitions: BTreeMap<u64, String>,
    /// The consistency group of each cycle cut for one
    /// ([`Sender::note_group`]).
    groups: BTreeMap<u64, wire::PointGroup>,
    /// The receiver's `HelloOk`, once it answered.
    peer: Option<wire::HelloOk>,
    /// An `OpenDisk` sent with the `Hello` failed before the `Hello` was
    /// answered: the session closes with it once the `Hello` is accepted.
    early_failure: Option<SessionError>,
    out: VecDeque<Output<SenderAction>>,
}

impl Sender {
    /// The protocol version this session's `Hello` says.
    pub fn protocol_version(&self) -> u16 {
        self.cfg.protocol_version
    }

    /// A session on a fresh connection: it says `Hello` at once.
    pub fn new(cfg: SenderConfig, now: u64) -> Self {
        let mut s = Sender {
            last_point: cfg.last_point,
            cfg,
            phase: Phase::Hello,
            now,
            next_stream: 0,
            next_read: 1,
            streams: BTreeMap::new(),
            reads: BTreeMap::new(),
            states: BTreeMap::new(),
            queues: BTreeMap::new(),
            active: BTreeMap::new(),
            behind: BTreeMap::new(),
            reached: BTreeMap::new(),
            point_busy: false,
            definitions: BTreeMap::new(),
            groups: BTreeMap::new(),
            peer: None,
            early_failure: None,
            out: VecDeque::new(),
        };
        if !wire::speaks(s.cfg.protocol_version) {
            let e = SessionError::Misuse(format!(
                "this build speaks protocol {} to {}, not {}",
                wire::MIN_PROTOCOL_VERSION,
                wire::PROTOCOL_VERSION,
                s.cfg.protocol_version
            ));
            s.close(e);
            return s;
        }
        // Protocol 8 added logs sent behind one another.
        if s.cfg.protocol_version < 8 {
            s.cfg.follow = false;
        }
        let hello = Msg::Hello(wire::Hello {
            protocol_version: s.cfg.protocol_version,
            site_name: s.cfg.site_name.clone(),
            software_version: s.cfg.software_version.clone(),
        });
        let sid = s.open(SKind::Control);
        // Protocol 7: the disks are opened in the same flight as the
        // `Hello`, not after its answer (one round trip less before the
        // first byte of data); the receiver holds them until it accepted
        // the `Hello`, and refuses them with it.
        let r = s.send(sid, &hello).and_then(|()| {
            s.wait(sid);
            if s.cfg.open_with_hello {
                s.open_disks()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            s.close(e);
        }
        s
    }

    /// The next output, if any.
    pub fn poll(&mut self) -> Option<Output<SenderAction>> {
        self.out.pop_front()
    }

    /// When [`Event::Tick`] must be fed at the latest (a request's
    /// deadline), if anything is awaited.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.phase == Phase::Closed {
            return None;
        }
        self.streams
            .values()
            .filter_map(|s| s.waiting)
            .min()
            .map(|t| t.saturating_add(self.cfg.timeout_ns))
    }

    /// True once the session is over (closed or lost).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// True once every disk answered `OpenDisk`.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The receiver's `HelloOk` (its name, version and free space), once
    /// it answered.
    pub fn peer(&self) -> Option<&wire::HelloOk> {
        self.peer.as_ref()
    }

    /// Nothing queued, running or being committed: every job submitted
    /// ended and every point due is committed (or failed).
    pub fn is_idle(&self) -> bool {
        self.jobs_pending() == 0 && !self.point_busy
    }

    /// Work is submitted and every byte of it is sent: no job is queued
    /// and every running one is a log whose end is sent, waiting only for
    /// its `Ack` (or a point for its `PointAck`). A driver may cut the next
    /// cycle now and submit its logs: they run, in order, behind these.
    pub fn all_sent(&self) -> bool {
        !self.is_idle()
            && self.queues.values().all(VecDeque::is_empty)
            && self
                .active
                .values()
                .chain(self.behind.values())
                .all(|sid| self.sent_log(*sid).is_some())
    }

    /// Every job submitted is a log the receiver stored durably (or has
    /// ended) and every point of their cycles is committed: only the
    /// applies and their acks are outstanding. With a store that commits
    /// durable logs this is what a `sync` or a resync waits for; with one
    /// that does not, a point is acknowledged only once applied, so this is
    /// [`Self::is_idle`].
    pub fn settled(&self) -> bool {
        self.queues.values().all(VecDeque::is_empty)
            && !self.point_busy
            && self.active.values().chain(self.behind.values()).all(|sid| {
                match self.streams.get(sid).map(|s| &s.kind) {
                    Some(SKind::Job {
                        job: job @ Job::Log { .. },
                        durable: true,
                        ..
                    }) => job.cycle() <= self.last_point,
                    _ => false,
                }
            })
    }

    /// Jobs queued or running.
    pub fn jobs_pending(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum::<usize>()
            + self.active.len()
            + self.behind.len()
    }

    /// The newest point committed (by this session or before it).
    pub fn last_point(&self) -> u64 {
        self.last_point
    }

    /// The VM's domain definition as of the cut of `cycle`: the point of
    /// `cycle` (and of later cycles, until another is noted) carries it in
    /// its `PointCommit`. Note it before the cycle's jobs are submitted.
    pub fn note_definition(&mut self, cycle: u64, xml: String) {
        self.definitions.insert(cycle, xml);
    }

    /// The cut of `cycle` was a consistency group's (every disk of every
    /// member sealed at one instant): the point of `cycle` says so in its
    /// `PointCommit`. Note it before the cycle's jobs are submitted.
    pub fn note_group(&mut self, cycle: u64, group: wire::PointGroup) {
        self.groups.insert(cycle, group);
    }

    /// Queue a transfer; jobs of one disk run in order, one at a time.
    pub fn submit(&mut self, job: Job) -> Result<(), SessionError> {
        let id = job.disk_id();
        if !self.cfg.disks.iter().any(|d| d.disk_id == id) {
            return Err(SessionError::Misuse(format!(
                "a job for disk {}, which is not one of the VM's",
                hexid(&id)
            )));
        }
        if self.phase == Phase::Closed {
            return Err(SessionError::ConnectionLost);
        }
        self.queues.entry(id).or_default().push_back(job);
        self.start_jobs();
        Ok(())
    }

    /// Open every disk again (the driver wants the replicas' states as of
    /// now): a new [`SenderAction::Ready`] follows. Jobs submitted meanwhile
    /// wait for it.
    pub fn reopen(&mut self) -> Result<(), SessionError> {
        if self.phase != Phase::Ready {
            return Err(SessionError::Misuse(
                "reopen before the session is ready".into(),
            ));
        }
        if let Err(e) = self.open_disks() {
            self.close(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// Start a checksum compare of a disk against its replica at
    /// `replica_cycle`; then [`Sender::request_hashes`] and
    /// [`Sender::finish_compare`].
    pub fn start_compare(
        &mut self,
        disk_id: DiskId,
        replica_cycle: u64,
    ) -> Result<StreamId, SessionError> {
        if self.phase != Phase::Ready {
            return Err(SessionError::Misuse(
                "compare before the session is ready".into(),
            ));
        }
        self.states.get(&disk_id).ok_or_else(|| {
            SessionError::Misuse(format!("compare of unknown disk {}", hexid(&disk_id)))
        })?;
        Ok(self.open(SKind::Compare {
            disk_id,
            replica_cycle,
            asked: VecDeque::new(),
            end: None,
            finished: false,
        }))
    }

    /// Ask for the digests of `runs` of `block_size` blocks.
    pub fn request_hashes(
        &mut self,
        stream: StreamId,
        block_size: u32,
        runs: Vec<HashRun>,
    ) -> Result<(), SessionError> {
        let Some(SStream {
            kind:
                SKind::Compare {
                    disk_id,
                    replica_cycle,
                    finished: false,
                    ..
                },
            ..
        }) = self.streams.get(&stream)
        else {
            return Err(SessionError::Misuse("not an open compare stream".into()));
        };
        let req = Msg::BlockHashReq(BlockHashReq {
            disk_id: *disk_id,
            replica_cycle: *replica_cycle,
            block_size,
            runs: runs.clone(),
        });
        self.send(stream, &req)?;
        if let Some(s) = self.streams.get_mut(&stream) {
            if let SKind::Compare { asked, .. } = &mut s.kind {
                asked.push_back(runs);
            }
            s.waiting.get_or_insert(self.now);
        }
        Ok(())
    }

    /// End a compare: with a `ResyncEnd` (the receiver then accepts the log
    /// of `end.cycle`), or without (a verify).
    pub fn finish_compare(
        &mut self,
        stream: StreamId,
        end: Option<ResyncEnd>,
    ) -> Result<(), SessionError> {
        let Some(SStream {
            kind: SKind::Compare {
                finished: false, ..
            },
            ..
        }) = self.streams.get(&stream)
        else {
            return Err(SessionError::Misuse("not an open compare stream".into()));
        };
        if let Some(e) = &end {
            self.send(stream, &Msg::ResyncEnd(e.clone()))?;
        }
        self.out.push_back(Output::Finish(stream));
        if let Some(s) = self.streams.get_mut(&stream) {
            if let SKind::Compare {
                end: e, finished, ..
            } = &mut s.kind
            {
                *e = end.as_ref().map(|x| x.cycle);
                *finished = true;
            }
            s.waiting.get_or_insert(self.now);
        }
        Ok(())
    }

    /// Feed an event of the connection.
    pub fn handle(&mut self, now: u64, ev: Event<'_>) {
        self.now = self.now.max(now);
        if self.phase == Phase::Closed {
            return;
        }
        match ev {
            Event::Data { stream, bytes } => {
                let Some(s) = self.streams.get_mut(&stream) else {
                    if stream.0 < self.next_stream {
                        // A stream we are done with (answered, or given
                        // up on): what is still in flight does not matter.
                        return;
                    }
                    // The receiver never opens streams.
                    self.close(SessionError::Violation {
                        stream,
                        what: "the receiver sent on a stream the sender did not open".into(),
                    });
                    return;
                };
                s.inbox.push(bytes);
                self.pump(stream);
            }
            Event::Finished(stream) => self.peer_finished(stream),
            Event::Reset(stream) => self.stream_failed(stream, SessionError::Ended(stream)),
            Event::ConnectionLost => self.close(SessionError::ConnectionLost),
            Event::Tick => {}
        }
        if let Some(t) = self.poll_timeout() {
            if self.now >= t {
                self.close(SessionError::Timeout {
                    waited_ms: self.cfg.timeout_ns / 1_000_000,
                });
            }
        }
    }

    /// Feed the driver's answer to [`SenderAction::Read`]. Answers to reads
    /// of streams that are gone are ignored.
    pub fn complete_read(&mut self, now: u64, id: ReadId, result: Result<ReadData, SourceError>) {
        self.now = self.now.max(now);
        let Some(sid) = self.reads.remove(&id) else {
            return;
        };
        if self.phase == Phase::Closed {
            return;
        }
        if let Err(e) = self.read_done(sid, id, result) {
            self.stream_failed(sid, e);
        }
    }

    fn open(&mut self, kind: SKind) -> StreamId {
        let sid = StreamId(self.next_stream);
        self.next_stream += 1;
        self.streams.insert(
            sid,
            SStream {
                inbox: Inbox::default(),
                kind,
                waiting: None,
            },
        );
        sid
    }

    fn send(&mut self, sid: StreamId, msg: &Msg) -> Result<(), SessionError> {
        let bytes = frame(msg)?;
        self.out.push_back(Output::Send { stream: sid, bytes });
        Ok(())
    }

    fn act(&mut self, a: SenderAction) {
        self.out.push_back(Output::Action(a));
    }

    fn wait(&mut self, sid: StreamId) {
        let now = self.now;
        if let Some(s) = self.streams.get_mut(&sid) {
            s.waiting = Some(now);
        }
    }

    /// End the session: every running job is handed back as failed.
    fn close(&mut self, e: SessionError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for sid in ids {
            self.stream_failed(sid, e.clone());
        }
        self.reads.clear();
        self.out.push_back(Output::Close(e));
    }

    fn pump(&mut self, sid: StreamId) {
        loop {
            let Some(s) = self.streams.get_mut(&sid) else {
                return;
            };
            match s.inbox.next(sid) {
                Ok(Some(m)) => {
                    if let Err(e) = self.on_msg(sid, m) {
                        self.stream_failed(sid, e);
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.stream_failed(sid, e);
                    return;
                }
            }
        }
    }

    fn peer_finished(&mut self, sid: StreamId) {
        let Some(s) = self.streams.get(&sid) else {
            return;
        };
        match &s.kind {
            SKind::Compare {
                disk_id,
                asked,
                end: None,
                finished: true,
                ..
            } if asked.is_empty() && s.inbox.is_empty() => {
                let disk_id = *disk_id;
                self.streams.remove(&sid);
                self.act(SenderAction::CompareDone {
                    stream: sid,
                    disk_id,
                    result: Ok(()),
                });
            }
            _ => self.stream_failed(sid, SessionError::Ended(sid)),
        }
    }

    /// A stream failed: report what it carried and forget it. The control
    /// and open streams carry the session: their failure closes it.
    fn stream_failed(&mut self, sid: StreamId, e: SessionError) {
        let Some(s) = self.streams.remove(&sid) else {
            return;
        };
        if let Some(r) = match &s.kind {
            SKind::Job { read, .. } => *read,
            _ => None,
        } {
            self.reads.remove(&r);
        }
        if self.phase != Phase::Closed && !matches!(e, SessionError::Peer { .. }) {
            self.out.push_back(Output::Reset(sid));
        }
        match s.kind {
            // Before the `Hello` is answered, the control stream's answer
            // says why (a receiver of another version refuses an `OpenDisk`
            // sent with the `Hello` as "expected Hello", and its `Error
            // { Version }` may arrive after that): it decides, or the
            // timeout does.
            SKind::Open(_)
                if self.phase == Phase::Hello
                    && self
                        .streams
                        .values()
                        .any(|x| matches!(x.kind, SKind::Control)) =>
            {
                self.early_failure.get_or_insert(e);
            }
            SKind::Control | SKind::Open(_) => self.close(e),
            SKind::Job { job, .. } => {
                let id = job.disk_id();
                let mut rest = Vec::new();
                if self.active.get(&id) == Some(&sid) {
                    self.active.remove(&id);
                    // The log behind it was based on it: the receiver
                    // refuses it too; it goes back with the queue.
                    if let Some(b) = self.behind.remove(&id) {
                        if let Some(SStream {
                            kind: SKind::Job { job, read, .. },
                            ..
                        }) = self.streams.remove(&b)
                        {
                            if let Some(r) = read {
                                self.reads.remove(&r);
                            }
                            if self.phase != Phase::Closed {
                                self.out.push_back(Output::Reset(b));
                            }
                            rest.push(job);
                        }
                    }
                } else if self.behind.get(&id) == Some(&sid) {
                    self.behind.remove(&id);
                }
                self.withdraw_point(job.cycle());
                rest.extend(self.queues.remove(&id).unwrap_or_default());
                self.act(SenderAction::JobFailed {
                    job,
                    error: e,
                    rest,
                });
            }
            SKind::Point(cycle, _) => {
                self.point_busy = false;
                self.act(SenderAction::PointFailed { cycle, error: e });
            }
            SKind::Compare { disk_id, .. } => self.act(SenderAction::CompareDone {
                stream: sid,
                disk_id,
                result: Err(e),
            }),
        }
    }

    fn on_msg(&mut self, sid: StreamId, msg: Msg) -> Result<(), SessionError> {
        if let Msg::Error(e) = msg {
            return Err(SessionError::from_peer(e));
        }
        let unexpected = |expected, got: &Msg| SessionError::Unexpected {
            stream: sid,
            expected,
            got: got.name(),
        };
        let Some(s) = self.streams.get_mut(&sid) else {
            return Ok(());
        };
        match (&mut s.kind, msg) {
            (SKind::Control, Msg::HelloOk(h)) if self.phase == Phase::Hello => {
                if h.protocol_version != self.cfg.protocol_version {
                    return Err(SessionError::Version {
                        ours: self.cfg.protocol_version,
                        theirs: h.protocol_version,
                    });
                }
                s.waiting = None;
                self.peer = Some(h);
                if let Some(e) = self.early_failure.take() {
                    // An `OpenDisk` sent with the `Hello` was refused.
                    return Err(e);
                }
                self.phase = Phase::Opening;
                if !self.cfg.open_with_hello {
                    return self.open_disks();
                }
                self.maybe_ready();
                Ok(())
            }
            (SKind::Open(id), Msg::DiskState(st)) if st.disk_id == *id => {
                self.streams.remove(&sid);
                self.states.insert(st.disk_id, st);
                self.maybe_ready();
                Ok(())
            }
            (
                SKind::Job {
                    job, done, durable, ..
                },
                Msg::Ack(a),
            ) if a.disk_id == job.disk_id() && a.cycle == job.cycle() => {
                if !a.durable || (!*done && !a.applied) {
                    return Err(SessionError::Violation {
                        stream: sid,
                        what: "an Ack that is not durable, or not applied before the end".into(),
                    });
                }
                if !*done {
                    // Applied before we finished: a resend of a log the
                    // replica already has. Stop sending it.
                    self.out.push_back(Output::Reset(sid));
                }
                if !a.applied {
                    s.waiting = Some(self.now);
                    *durable = true;
                    if matches!(job, Job::Log { .. }) {
                        self.act(SenderAction::LogDurable {
                            disk_id: a.disk_id,
                            cycle: a.cycle,
                        });
                    }
                    return Ok(());
                }
                let app = matches!(
                    job,
                    Job::Log {
                        app_consistent: true,
                        ..
                    }
                );
                let initial = matches!(job, Job::Initial(_));
                self.streams.remove(&sid);
                if self.active.get(&a.disk_id) == Some(&sid) {
                    self.active.remove(&a.disk_id);
                    // The log behind it is the one the receiver works on now.
                    if let Some(b) = self.behind.remove(&a.disk_id) {
                        self.active.insert(a.disk_id, b);
                    }
                } else if self.behind.get(&a.disk_id) == Some(&sid) {
                    self.behind.remove(&a.disk_id);
                }
                self.act(if initial {
                    SenderAction::InitialApplied {
                        disk_id: a.disk_id,
                        cycle: a.cycle,
                    }
                } else {
                    SenderAction::LogApplied {
                        disk_id: a.disk_id,
                        cycle: a.cycle,
                    }
                });
                self.reached
                    .entry(a.disk_id)
                    .or_default()
                    .insert(a.cycle, app);
                self.start_jobs();
                self.try_commit();
                Ok(())
            }
            (SKind::Point(cycle, app), Msg::PointAck(p)) if p.cycle == *cycle => {
                let (cycle, app) = (*cycle, *app);
                self.streams.remove(&sid);
                self.point_busy = false;
                self.last_point = self.last_point.max(cycle);
                for r in self.reached.values_mut() {
                    r.retain(|c, _| *c >= cycle);
                }
                self.act(SenderAction::PointCommitted {
                    cycle,
                    app_consistent: app,
                });
                self.try_commit();
                Ok(())
            }
            (
                SKind::Compare {
                    disk_id,
                    replica_cycle,
                    asked,
                    ..
                },
                Msg::BlockHashes(h),
            ) if h.disk_id == *disk_id && h.replica_cycle == *replica_cycle => {
                let Some(runs) = asked.pop_front() else {
                    return Err(SessionError::Violation {
                        stream: sid,
                        what: "digests nobody asked for".into(),
                    });
                };
                let blocks: u64 = runs.iter().map(|r| u64::from(r.blocks)).sum();
                if h.hashes.len() as u64 != blocks {
                    return Err(SessionError::Violation {
                        stream: sid,
                        what: format!("{} digests for {blocks} blocks", h.hashes.len()),
                    });
                }
                s.waiting = (!asked.is_empty()).then_some(self.now);
                self.act(SenderAction::Hashes {
                    stream: sid,
                    disk_id: h.disk_id,
                    replica_cycle: h.replica_cycle,
                    replica_size: h.replica_size,
                    runs,
                    hashes: h.hashes,
                });
                Ok(())
            }
            (
                SKind::Compare {
                    disk_id,
                    asked,
                    end: Some(cycle),
                    ..
                },
                Msg::Ack(a),
            ) if asked.is_empty() && a.disk_id == *disk_id && a.cycle == *cycle => {
                let (disk_id, cycle) = (*disk_id, *cycle);
                self.streams.remove(&sid);
                self.act(SenderAction::ResyncPrepared { disk_id, cycle });
                self.act(SenderAction::CompareDone {
                    stream: sid,
                    disk_id,
                    result: Ok(()),
                });
                Ok(())
            }
            (SKind::Control, m) => Err(unexpected("HelloOk", &m)),
            (SKind::Open(_), m) => Err(unexpected("DiskState", &m)),
            (SKind::Job { .. }, m) => Err(unexpected("Ack of the transfer", &m)),
            (SKind::Point(..), m) => Err(unexpected("PointAck", &m)),
            (SKind::Compare { .. }, m) => Err(unexpected("BlockHashes or Ack", &m)),
        }
    }

    /// `OpenDisk` every disk; [`SenderAction::Ready`] once all answered
    /// (at once for a session without disks: a probe).
    fn open_disks(&mut self) -> Result<(), SessionError> {
        if self.phase != Phase::Hello {
            self.phase = Phase::Opening;
        }
        self.states.clear();
        for d in self.cfg.disks.clone() {
            let o = self.open(SKind::Open(d.disk_id));
            self.send(o, &Msg::OpenDisk(d))?;
            self.out.push_back(Output::Finish(o));
            self.wait(o);
        }
        self.maybe_ready();
        Ok(())
    }

    /// Ready once the `Hello` is answered and every disk is open.
    fn maybe_ready(&mut self) {
        if self.phase == Phase::Opening && self.states.len() == self.cfg.disks.len() {
            self.ready();
        }
    }

    fn ready(&mut self) {
        self.phase = Phase::Ready;
        let states: Vec<DiskState> = self
            .cfg
            .disks
            .iter()
            .filter_map(|d| self.states.get(&d.disk_id).cloned())
            .collect();
        for st in &states {
            // A replica the receiver no longer trusts, or that a copy is
            // overwriting, is no point's base.
            if st.replica_cycle > 0 && st.needs_resync.is_empty() && st.copy_cycle == 0 {
                self.reached
                    .entry(st.disk_id)
                    .or_default()
                    .insert(st.replica_cycle, false);
            }
        }
        self.act(SenderAction::Ready { states });
        self.start_jobs();
        self.try_commit();
    }

    /// Start the next job of every idle disk, and a log behind every
    /// active log that is all sent (if the next job is a log based on it).
    fn start_jobs(&mut self) {
        if self.phase != Phase::Ready {
            return;
        }
        let ids: Vec<DiskId> = self.cfg.disks.iter().map(|d| d.disk_id).collect();
        for id in ids {
            if !self.active.contains_key(&id) {
                if let Some(job) = self.queues.get_mut(&id).and_then(VecDeque::pop_front) {
                    self.start_job(job, false);
                }
            }
            if !self.cfg.follow || self.behind.contains_key(&id) {
                continue;
            }
            let Some(head) = self.active.get(&id).and_then(|sid| self.sent_log(*sid)) else {
                continue;
            };
            let head = head.cycle();
            let Some(q) = self.queues.get_mut(&id) else {
                continue;
            };
            if !matches!(q.front(), Some(Job::Log { begin, .. }) if begin.base_cycle == head) {
                continue;
            }
            let Some(job) = q.pop_front() else {
                continue;
            };
            self.start_job(job, true);
        }
    }

    /// Open the stream of `job`, say its first message and start reading.
    fn start_job(&mut self, job: Job, behind: bool) {
        let id = job.disk_id();
        if let Job::Initial(b) = &job {
            self.copy_supersedes(id, b.cycle);
        }
        // A resumed copy is read from 0 too: below `start_offset` the
        // driver returns only what changed since the interrupted copy.
        // The mark is the message's, not the job's: a log handed back and
        // sent again later may run first.
        let first = match &job {
            Job::Log { begin, .. } => Msg::LogBegin(LogBegin {
                behind,
                ..begin.clone()
            }),
            Job::Initial(b) => Msg::InitialBegin(b.clone()),
        };
        let sid = self.open(SKind::Job {
            job,
            sent: 0,
            hasher: Hasher::default(),
            read: None,
            done: false,
            durable: false,
            chunks: 0,
            incompressible: 0,
        });
        if behind {
            self.behind.insert(id, sid);
        } else {
            self.active.insert(id, sid);
        }
        if let Err(e) = self.send(sid, &first) {
            self.stream_failed(sid, e);
            return;
        }
        self.read_next(sid);
    }

    /// Ask the driver for the next bytes of the job on `sid`, or end it.
    fn read_next(&mut self, sid: StreamId) {
        let Some(SStream {
            kind: SKind::Job {
                job, sent, read, ..
            },
            ..
        }) = self.streams.get_mut(&sid)
        else {
            return;
        };
        let (what, total) = match job {
            Job::Log { begin, .. } => (
                ReadWhat::Log {
                    disk_id: begin.disk_id,
                    cycle: begin.cycle,
                },
                begin.total_len,
            ),
            Job::Initial(b) => (
                ReadWhat::Initial {
                    disk_id: b.disk_id,
                    cycle: b.cycle,
                },
                b.disk_size,
            ),
        };
        let offset = *sent;
        if offset >= total {
            self.end_job(sid);
            return;
        }
        let id = ReadId(self.next_read);
        self.next_read += 1;
        *read = Some(id);
        self.reads.insert(id, sid);
        let max = (total - offset).min(self.cfg.chunk_size.clamp(1, MAX_DATA) as u64) as usize;
        self.act(SenderAction::Read {
            id,
            stream: sid,
            what,
            offset,
            max,
        });
    }

    fn read_done(
        &mut self,
        sid: StreamId,
        id: ReadId,
        result: Result<ReadData, SourceError>,
    ) -> Result<(), SessionError> {
        let data = result.map_err(|e| SessionError::Source(e.0))?;
        let Some(SStream {
            kind:
                SKind::Job {
                    job,
                    sent,
                    hasher,
                    read,
                    chunks,
                    incompressible,
                    ..
                },
            ..
        }) = self.streams.get_mut(&sid)
        else {
            return Ok(());
        };
        if *read != Some(id) {
            return Ok(());
        }
        *read = None;
        let mut job_cycle = 0;
        let misuse = |what: String| Err(SessionError::Misuse(what));
        let msg = match job {
            Job::Log { begin, .. } => {
                let end = data.offset.saturating_add(data.data.len() as u64);
                if data.offset != *sent || end > begin.total_len {
                    return misuse(format!(
                        "read {}..{end} of a log of {} bytes where {} was asked",
                        data.offset, begin.total_len, sent
                    ));
                }
                if data.data.is_empty() {
                    if data.end && end < begin.total_len {
                        return Err(SessionError::Source(format!(
                            "the log of cycle {} ends at {end}, not at {}",
                            begin.cycle, begin.total_len
                        )));
                    }
                    return misuse("an empty read".into());
                }
                hasher.0.update(&data.data);
                *sent = end;
                Some(Msg::LogChunk(LogChunk {
                    disk_id: begin.disk_id,
                    cycle: begin.cycle,
                    offset_in_log: data.offset,
                    data: data.data,
                }))
            }
            Job::Initial(b) => {
                job_cycle = b.cycle;
                let end = data.offset.saturating_add(data.data.len() as u64);
                if data.offset < *sent || end > b.disk_size || data.data.len() > MAX_DATA {
                    return misuse(format!(
                        "read {}..{end} of a disk of {} bytes where {} was asked",
                        data.offset, b.disk_size, sent
                    ));
                }
                *sent = if data.end { b.disk_size } else { end };
                let disk_id = b.disk_id;
                (!data.data.is_empty()).then(|| {
                    let try_lz4 = *incompressible < 8 || *chunks % 16 == 0;
                    *chunks += 1;
                    let c = InitialChunk::new(disk_id, data.offset, data.data, try_lz4);
                    match c.encoding {
                        Encoding::Raw if try_lz4 => *incompressible += 1,
                        Encoding::Lz4 => *incompressible = 0,
                        _ => {}
                    }
                    Msg::InitialChunk(c)
                })
            }
        };
        if let Some(m) = msg {
            self.send(sid, &m)?;
            // The read buffer itself travelled as the RAW chunk's data: it
            // is free again once framed.
            if let Msg::InitialChunk(c) = m {
                if c.encoding == Encoding::Raw {
                    self.out.push_back(Output::Spent {
                        disk_id: c.disk_id,
                        cycle: job_cycle,
                        buf: c.data,
                    });
                }
            }
        }
        self.read_next(sid);
        Ok(())
    }

    /// Everything of the job is sent: its end message, then wait.
    fn end_job(&mut self, sid: StreamId) {
        let Some(SStream {
            kind: SKind::Job {
                job, hasher, done, ..
            },
            ..
        }) = self.streams.get_mut(&sid)
        else {
            return;
        };
        *done = true;
        let end = match job {
            Job::Log { begin, .. } => Msg::LogEnd(LogEnd {
                disk_id: begin.disk_id,
                cycle: begin.cycle,
                total_len: begin.total_len,
                log_checksum: hasher.0.digest128(),
            }),
            Job::Initial(b) => Msg::InitialEnd(InitialEnd {
                disk_id: b.disk_id,
                cycle: b.cycle,
                disk_size: b.disk_size,
            }),
        };
        match self.send(sid, &end) {
            Ok(()) => {
                self.out.push_back(Output::Finish(sid));
                self.wait(sid);
                self.try_commit();
                self.start_jobs();
            }
            Err(e) => self.stream_failed(sid, e),
        }
    }

    /// The running log of a disk if all of it is sent (its end message
    /// too) and only its `Ack` is awaited: the next log may follow it
    /// (never a copy: the receiver refuses a log behind a copy).
    fn sent_log(&self, sid: StreamId) -> Option<&Job> {
        self.sent_job(sid).filter(|j| matches!(j, Job::Log { .. }))
    }

    /// The running job (log, or initial copy, also a resumed one) on `sid`
    /// if all of it is sent (its `LogEnd` or `InitialEnd` too) and only
    /// its `Ack` is awaited.
    fn sent_job(&self, sid: StreamId) -> Option<&Job> {
        match &self.streams.get(&sid)?.kind {
            SKind::Job {
                job, done: true, ..
            } => Some(job),
            _ => None,
        }
    }

    /// The disk's running jobs (active and behind) that are all sent: a
    /// point of their cycle may go ahead of their `Ack`s. A copy's point
    /// too: the receiver holds it until the copy is finished and durable
    /// there (`FinishInitial` done), and a copy that fails withdraws it
    /// ([`Self::withdraw_point`]); its resumed copy commits it later.
    fn sent_jobs(&self, disk_id: &DiskId) -> impl Iterator<Item = &Job> {
        let a = self.active.get(disk_id).and_then(|s| self.sent_job(*s));
        let b = self.behind.get(disk_id).and_then(|s| self.sent_job(*s));
        a.into_iter().chain(b)
    }

    /// Withdraw a point sent ahead of its data whose cycle's transfer of a
    /// disk failed: its stream is reset (the receiver forgets the point
    /// it held), and it is committed again once the cycle is there.
    fn withdraw_point(&mut self, failed_cycle: u64) {
        self.withdraw_points(|c| c >= failed_cycle);
    }

    /// The copy of `disk_id` at `cycle` starts: the receiver's store drops
    /// every point that includes the disk when a copy begins (its replica
    /// is overwritten in place), so no earlier cycle can be a point any
    /// more. The disk's earlier reached cycles are forgotten, and a point
    /// of one still being committed is withdrawn: the receiver would hold
    /// it behind the whole copy, and the session time out on it, or
    /// refuse it, and the session fail, and the copy start over on the next
    /// connection and meet the same point again (seed 7798 of the
    /// simulation: 113 connections without a point).
    fn copy_supersedes(&mut self, disk_id: DiskId, cycle: u64) {
        if let Some(r) = self.reached.get_mut(&disk_id) {
            *r = r.split_off(&cycle);
        }
        self.withdraw_points(|c| c < cycle);
    }

    /// Reset the stream of every point being committed whose cycle
    /// `doomed` picks.
    fn withdraw_points(&mut self, doomed: impl Fn(u64) -> bool) {
        let sids: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.kind, SKind::Point(c, _) if doomed(c)))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in sids {
            self.streams.remove(&sid);
            self.point_busy = false;
            if self.phase != Phase::Closed {
                self.out.push_back(Output::Reset(sid));
            }
        }
    }

    /// Commit the oldest cycle past the last point that every disk reached
    /// or has sent completely: the receiver commits it once every disk's
    /// transfer of that cycle is applied there (and durable), and only
    /// then acknowledges it.
    fn try_commit(&mut self) {
        if self.phase != Phase::Ready || self.point_busy {
            return;
        }
        let Some(first) = self.cfg.disks.first().map(|d| d.disk_id) else {
            return;
        };
        // Candidates: the cycles the first disk reached, or whose transfer
        // it has sent completely (the receiver holds a point until every
        // disk is there: the commit travels with the last data instead of
        // a round trip after the last `Ack`).
        let mut cands: Vec<u64> = self
            .reached
            .get(&first)
            .map(|r| r.range(self.last_point + 1..).map(|(c, _)| *c).collect())
            .unwrap_or_default();
        if self.cfg.commit_ahead {
            let sent = self.sent_jobs(&first).map(Job::cycle);
            cands.extend(sent.filter(|c| *c > self.last_point));
        }
        cands.sort_unstable();
        let pick = cands.into_iter().find_map(|c| {
            let mut app = true;
            for d in &self.cfg.disks {
                match self.reached.get(&d.disk_id).and_then(|r| r.get(&c)) {
                    Some(a) => app &= *a,
                    None => match self.sent_jobs(&d.disk_id).find(|j| j.cycle() == c) {
                        Some(job) if self.cfg.commit_ahead => {
                            app &= matches!(
                                job,
                                Job::Log {
                                    app_consistent: true,
                                    ..
                                }
                            )
                        }
                        _ => return None,
                    },
                }
            }
            Some((c, app))
        });
        let Some((cycle, app)) = pick else {
            return;
        };
        let disks = self
            .cfg
            .disks
            .iter()
            .map(|d| DiskCycle {
                disk_id: d.disk_id,
                cycle,
            })
            .collect();
        // The definition in force at this cut; older ones are not needed
        // any more (points commit in cycle order).
        let definition = self
            .definitions
            .range(..=cycle)
            .next_back()
            .map(|(c, x)| (*c, x.clone()));
        if let Some((c, _)) = definition {
            self.definitions = self.definitions.split_off(&c);
        }
        let msg = Msg::PointCommit(PointCommit {
            vm: self.cfg.vm.clone(),
            cycle,
            app_consistent: app,
            disks,
            definition: definition.map(|(_, x)| x),
            group: self.groups.get(&cycle).cloned().map(Box::new),
        });
        // Points commit in cycle order: older groups are not needed.
        self.groups = self.groups.split_off(&cycle);
        let sid = self.open(SKind::Point(cycle, app));
        self.point_busy = true;
        match self.send(sid, &msg) {
            Ok(()) => {
                self.out.push_back(Output::Finish(sid));
                self.wait(sid);
            }
            Err(e) => self.stream_failed(sid, e),
        }
    }
}
