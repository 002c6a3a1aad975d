//! The receiver's end of a replication conversation (see the parent module).
//!
//! Each stream the sender opens carries one operation, decided by its first
//! message: `Hello`, `OpenDisk`, an initial copy, one log, a point commit, a
//! checksum compare or an administrative request. The receiver answers on
//! the same stream and finishes it. A log is staged while it arrives,
//! verified (offsets, length, xxh3-128 of the whole log), then stored
//! durably, acknowledged `durable`, applied and acknowledged `applied`; a
//! log that does not verify is discarded and refused.

use std::collections::{BTreeMap, VecDeque};

use super::{
    error_frame, frame, hexid, Event, Hasher, Inbox, OpId, Output, SessionError, StoreFailure,
};
use super::{DiskId, StreamId};
use crate::wire::{
    self, Ack, BlockHashReq, BlockHashes, DiskCycle, ErrorCode, InitialBegin, LogBegin, Msg,
    OpenDisk, PointAck, ResyncEnd,
};

/// Who this receiver is (for `HelloOk`).
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub site_name: String,
    pub software_version: String,
    /// Free bytes in the store, reported in `HelloOk` (0: unknown).
    pub store_free: u64,
    /// The newest protocol version accepted: [`wire::PROTOCOL_VERSION`];
    /// lower only to answer as a receiver of an older build does (the
    /// compatibility tests: a newer sender must fall back to it).
    pub newest_version: u16,
    /// The store commits a point once every disk's log up to it is
    /// durable ([`ReplicaStore::commits_durable_logs`]): a held point is
    /// asked for as soon as its logs are stored, not when they are
    /// applied, so that `vdrep sync` and the lag do not wait for the apply.
    /// A disk's log is then also free to be followed by the next one once
    /// it is stored: the next log (sent behind it) is staged and stored
    /// while it is applied, and applied after it ([`RDisk::applying`]).
    ///
    /// [`ReplicaStore::commits_durable_logs`]: crate::replica::ReplicaStore::commits_durable_logs
    pub commit_stored: bool,
}

/// The store's view of one disk's replica (answers `LoadDisk`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskStatus {
    /// Cycle the replica is consistent at (0: none).
    pub replica_cycle: u64,
    pub replica_size: u64,
    /// Unfinished initial copy: its cycle and durable resume offset.
    pub copy_cycle: u64,
    pub resume_offset: u64,
    /// Some: the replica is not trusted (the reason); only a resync heals it.
    pub needs_resync: Option<String>,
}

/// Outcome of storing a log durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStored {
    /// Stored; apply it next.
    Stored,
    /// The replica is already at or past this cycle (a resend).
    AlreadyApplied,
}

/// A completed store action, handed to [`Receiver::complete`] with its op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreDone {
    DiskLoaded(Result<DiskStatus, StoreFailure>),
    /// The offset the initial copy resumes at (0: from the start).
    InitialBegun(Result<u64, StoreFailure>),
    InitialFinished(Result<(), StoreFailure>),
    LogStored(Result<LogStored, StoreFailure>),
    LogApplied(Result<(), StoreFailure>),
    /// `false`: not every listed disk reached the cycle.
    PointCommitted(Result<bool, StoreFailure>),
    /// The replica's size and one digest per requested block.
    Hashed(Result<(u64, Vec<u128>), StoreFailure>),
    ResyncPrepared(Result<(), StoreFailure>),
    AdminDone(Result<String, StoreFailure>),
}

/// What the receiver asks its driver (the store) to do, or reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// Look up the replica of a disk → [`StoreDone::DiskLoaded`].
    LoadDisk { op: OpId, open: OpenDisk },
    /// Start or resume an initial copy → [`StoreDone::InitialBegun`].
    BeginInitial {
        op: OpId,
        open: OpenDisk,
        begin: InitialBegin,
    },
    /// Disk bytes of the initial copy (already expanded); failures surface
    /// at `FinishInitial`.
    WriteInitial {
        vm: String,
        disk_id: DiskId,
        offset: u64,
        data: Vec<u8>,
    },
    /// The copy is complete: the replica is at `cycle` once this is durable
    /// → [`StoreDone::InitialFinished`].
    FinishInitial {
        op: OpId,
        vm: String,
        disk_id: DiskId,
        cycle: u64,
    },
    /// A log starts arriving: stage it (not yet durable, not visible).
    StageLog {
        op: OpId,
        vm: String,
        begin: LogBegin,
    },
    /// Bytes `offset..` of the staged log, in order.
    StageLogData {
        op: OpId,
        offset: u64,
        data: Vec<u8>,
    },
    /// The staged log verified: store it durably (fsync) →
    /// [`StoreDone::LogStored`].
    StoreLogDurably {
        op: OpId,
        vm: String,
        disk_id: DiskId,
        cycle: u64,
        log_checksum: u128,
    },
    /// Forget the staged log (it did not verify, or the stream died).
    DiscardLog { op: OpId },
    /// Apply the durable log of `cycle` to the replica, if the replica is at
    /// its base (else it is already applied, or out of order) →
    /// [`StoreDone::LogApplied`].
    ApplyLog {
        op: OpId,
        vm: String,
        disk_id: DiskId,
        cycle: u64,
    },
    /// Record a recovery point if every listed disk reached `cycle` →
    /// [`StoreDone::PointCommitted`].
    CommitPoint {
        op: OpId,
        vm: String,
        cycle: u64,
        app_consistent: bool,
        disks: Vec<DiskCycle>,
        /// The VM's domain definition as of the cut, stored with the point
        /// (before it is recorded).
        definition: Option<String>,
        /// The VM's consistency group, stored with the point (before it
        /// is recorded).
        group: Option<wire::PointGroup>,
    },
    /// Digest the requested blocks of the replica → [`StoreDone::Hashed`].
    HashBlocks {
        op: OpId,
        vm: String,
        req: BlockHashReq,
    },
    /// A resync compare ended: accept the log of `end.cycle` →
    /// [`StoreDone::ResyncPrepared`].
    PrepareResync {
        op: OpId,
        vm: String,
        end: ResyncEnd,
    },
    /// The replica can only be healed by a resync (a log out of order).
    MarkNeedsResync {
        vm: String,
        disk_id: DiskId,
        why: String,
    },
    /// A site-to-site administrative request (JSON) → [`StoreDone::AdminDone`].
    Admin { op: OpId, body: String },
    /// A stream was refused with this error (for the log).
    Refused {
        stream: StreamId,
        error: SessionError,
    },
}

/// A disk announced on this connection.
#[derive(Debug)]
struct RDisk {
    open: OpenDisk,
    status: DiskStatus,
    /// The stream of the initial copy or log in progress.
    busy: Option<StreamId>,
    /// The cycle of the log in progress (`None`: an initial copy).
    busy_log: Option<u64>,
    /// A log the sender sent behind another one (protocol 8,
    /// [`LogBegin::behind`]) whose base is not applied here yet: behind the
    /// log in progress, or arrived before its base (QUIC does not order
    /// streams). Its stream waits, undecoded, and is handled again as if it
    /// had just begun whenever the disk is free (then it goes on once its
    /// base is applied, or stored with [`ReceiverConfig::commit_stored`],
    /// is refused `Busy` if its base failed here, or waits on): logs of a
    /// disk are applied strictly one after the other.
    next: Option<StreamId>,
    /// The newest log of this disk refused, failed or reset on this
    /// connection: a log sent behind it is refused `Busy` (send both
    /// again), never taken for a chain the replica lacks.
    failed: Option<u64>,
    /// The log a finished resync compare announced.
    resync_cycle: Option<u64>,
    /// The newest cycle this connection saw the replica reach (a log
    /// applied, or found already applied): what a held point waits for.
    reached: u64,
    /// The newest cycle whose log this connection stored durably: what a
    /// held point waits for with [`ReceiverConfig::commit_stored`].
    stored: u64,
    /// With [`ReceiverConfig::commit_stored`], a trusted replica: the log
    /// stored here whose apply is under way (its stream and cycle). The
    /// disk is not `busy` meanwhile: the log behind it is staged and
    /// stored beside the apply.
    applying: Option<(StreamId, u64)>,
    /// A log stored while [`RDisk::applying`]'s apply runs: its apply is
    /// asked once that one ends (logs of a disk are applied strictly one
    /// after the other), and refused `Busy` if that one failed.
    apply_next: Option<StreamId>,
}

/// What a stream waits for.
#[derive(Debug)]
enum Wait {
    Load(OpenDisk),
    InitialBegin(InitialBegin),
    InitialEnd {
        disk_id: DiskId,
        cycle: u64,
    },
    Stored(LogBegin),
    Applied(LogBegin),
    /// The point asked for (kept to hold it again, see
    /// [`Receiver::point_not_there`]) and [`Receiver::progress`] when it
    /// was asked.
    Point(wire::PointCommit, u64),
    Hashes {
        disk_id: DiskId,
        replica_cycle: u64,
        blocks: u64,
    },
    Resync(ResyncEnd),
    Admin,
}

#[derive(Debug)]
enum RState {
    /// Waiting for the first message.
    Start,
    /// Waiting for a store completion; bytes stay undecoded meanwhile.
    Await(OpId, Wait),
    Initial {
        disk_id: DiskId,
        cycle: u64,
        disk_size: u64,
        next: u64,
    },
    Log {
        op: OpId,
        begin: LogBegin,
        next: u64,
        hasher: Hasher,
    },
    /// A checksum compare: `BlockHashReq`s and a `ResyncEnd`.
    Compare,
    /// A `PointCommit` that arrived before every disk it lists reached its
    /// cycle here (the sender sends it with the last data of the cycle):
    /// committed once they are ([`Receiver::release_points`]), forgotten
    /// if the sender resets the stream (a transfer of the cycle failed).
    Held(wire::PointCommit),
    /// An `OpenDisk` that arrived before the connection's `Hello` was
    /// accepted (protocol 7: the sender opens its disks in the same flight
    /// as its `Hello`, and QUIC does not order streams): handled once the
    /// `Hello` is accepted, refused with the `Hello`'s error if it is not.
    /// Nothing reaches the store before.
    Early(OpenDisk),
    /// A `LogBegin` sent behind its base, which is not applied here yet
    /// ([`RDisk::next`]): nothing of it is staged, decoded or acknowledged
    /// until that log is applied (or stored, with
    /// [`ReceiverConfig::commit_stored`]).
    Behind(LogBegin),
    /// A log stored durably (acknowledged so) whose apply waits for the
    /// disk's apply under way ([`RDisk::apply_next`]).
    ApplyNext(LogBegin),
    /// Answered; whatever else arrives is ignored.
    Drain,
}

#[derive(Debug)]
struct RStream {
    inbox: Inbox,
    st: RState,
    peer_fin: bool,
}

/// The receiver's end of one connection.
// Its books look like `Sender`'s (maps by stream, disk, operation and an
// output queue): the two ends of one protocol, with different entries.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    hello: bool,
    /// The protocol version the connection speaks (the sender's, once its
    /// `Hello` is accepted).
    version: u16,
    /// The `Hello` was refused: nothing else is handled on this connection.
    refused: bool,
    closed: bool,
    streams: BTreeMap<StreamId, RStream>,
    disks: BTreeMap<DiskId, RDisk>,
    ops: BTreeMap<OpId, StreamId>,
    next_op: u64,
    /// Counts transfers that ended (a disk reached a cycle, or was freed):
    /// a point the store refused is asked again if one ended meanwhile.
    progress: u64,
    out: VecDeque<Output<ReceiverAction>>,
}

impl Receiver {
    pub fn new(cfg: ReceiverConfig) -> Self {
        Receiver {
            cfg,
            hello: false,
            version: 0,
            refused: false,
            closed: false,
            streams: BTreeMap::new(),
            disks: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 1,
            progress: 0,
            out: VecDeque::new(),
        }
    }

    /// The next output, if any.
    pub fn poll(&mut self) -> Option<Output<ReceiverAction>> {
        self.out.pop_front()
    }

    /// The receiver keeps no timers (the sender drives the conversation).
    pub fn poll_timeout(&self) -> Option<u64> {
        None
    }

    /// True once the connection is over.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// False while the stream waits for a store completion: the driver may
    /// stop reading it (flow control) until the completion is in.
    pub fn wants_data(&self, stream: StreamId) -> bool {
        !matches!(
            self.streams.get(&stream).map(|s| &s.st),
            Some(RState::Await(..) | RState::Behind(_) | RState::Early(_) | RState::ApplyNext(_))
        )
    }

    /// Feed an event of the connection.
    pub fn handle(&mut self, _now: u64, ev: Event<'_>) {
        if self.closed {
            return;
        }
        match ev {
            Event::Data { stream, bytes } => {
                let s = self.streams.entry(stream).or_insert_with(|| RStream {
                    inbox: Inbox::default(),
                    st: RState::Start,
                    peer_fin: false,
                });
                if s.peer_fin || matches!(s.st, RState::Drain) {
                    return;
                }
                s.inbox.push(bytes);
                self.pump(stream);
            }
            Event::Finished(stream) => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.peer_fin = true;
                    self.pump(stream);
                    self.forget_if_done(stream);
                }
            }
            Event::Reset(stream) => self.drop_stream(stream),
            Event::ConnectionLost => {
                let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                for id in ids {
                    self.drop_stream(id);
                }
                self.closed = true;
            }
            Event::Tick => {}
        }
    }

    /// Feed the completion of a store action. Completions of streams that
    /// are gone are ignored.
    pub fn complete(&mut self, _now: u64, op: OpId, done: StoreDone) {
        let Some(sid) = self.ops.remove(&op) else {
            return;
        };
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        let st = std::mem::replace(&mut s.st, RState::Drain);
        let RState::Await(want, wait) = st else {
            s.st = st;
            return;
        };
        if want != op {
            s.st = RState::Await(want, wait);
            return;
        }
        if let Err(e) = self.completed(sid, wait, done) {
            self.fail(sid, e);
        }
        self.pump(sid);
        self.forget_if_done(sid);
    }

    fn op(&mut self, sid: StreamId) -> OpId {
        let op = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(op, sid);
        op
    }

    fn act(&mut self, a: ReceiverAction) {
        self.out.push_back(Output::Action(a));
    }

    /// Ask the driver for `action` (made with its op) and wait on `sid`
    /// for its completion (`wait`).
    fn ask(
        &mut self,
        sid: StreamId,
        action: impl FnOnce(OpId) -> ReceiverAction,
        wait: Wait,
    ) -> Result<(), SessionError> {
        let op = self.op(sid);
        self.act(action(op));
        self.set(sid, RState::Await(op, wait));
        Ok(())
    }

    fn send(&mut self, sid: StreamId, msg: &Msg) -> Result<(), SessionError> {
        let bytes = frame(msg)?;
        self.out.push_back(Output::Send { stream: sid, bytes });
        Ok(())
    }

    fn set(&mut self, sid: StreamId, st: RState) {
        if let Some(s) = self.streams.get_mut(&sid) {
            s.st = st;
        }
    }

    /// Forget a stream both sides are done with.
    fn forget_if_done(&mut self, sid: StreamId) {
        if self
            .streams
            .get(&sid)
            .is_some_and(|s| s.peer_fin && matches!(s.st, RState::Drain))
        {
            self.streams.remove(&sid);
        }
    }

    /// Send the last answer of a stream and finish it.
    fn answer(&mut self, sid: StreamId, msg: &Msg) -> Result<(), SessionError> {
        self.send(sid, msg)?;
        self.out.push_back(Output::Finish(sid));
        self.set(sid, RState::Drain);
        self.release(sid, true);
        Ok(())
    }

    /// The disk whose transfer `sid` carried is free again (a point held
    /// behind that transfer is asked for again: [`Self::point_not_there`]).
    /// The log waiting behind it ([`RDisk::next`]) is handled again as if
    /// it had just begun: it goes on if its base is applied now, is
    /// refused if its base failed (not `ok`: noted in [`RDisk::failed`]),
    /// else waits on.
    fn release(&mut self, sid: StreamId, ok: bool) {
        let mut freed = false;
        let mut behind = Vec::new();
        let mut apply_next = Vec::new();
        for d in self.disks.values_mut() {
            if d.next == Some(sid) {
                d.next = None;
            }
            if d.apply_next == Some(sid) {
                d.apply_next = None;
            }
            if d.busy == Some(sid) {
                d.busy = None;
                freed = true;
                if let Some(c) = d.busy_log.take().filter(|_| !ok) {
                    d.failed = Some(d.failed.map_or(c, |f| f.max(c)));
                }
            }
            if let Some((_, c)) = d.applying.filter(|(a, _)| *a == sid) {
                d.applying = None;
                freed = true;
                if !ok {
                    d.failed = Some(d.failed.map_or(c, |f| f.max(c)));
                }
                apply_next.extend(d.apply_next.take().map(|n| (n, ok)));
            }
            if d.busy.is_none() {
                behind.extend(d.next.take());
            }
        }
        for (n, ok) in apply_next {
            self.apply_after(n, ok);
        }
        self.resume_behind(behind);
        if freed {
            self.progress += 1;
            self.release_points();
        }
    }

    /// The log on `n` waited for the disk's previous apply
    /// ([`RDisk::apply_next`]), which ended (`ok`) or failed: ask for its
    /// apply now, or refuse it (`Busy`: it is durable here, and the sender
    /// sends both again).
    fn apply_after(&mut self, n: StreamId, ok: bool) {
        let st = self
            .streams
            .get_mut(&n)
            .map(|s| std::mem::replace(&mut s.st, RState::Drain));
        let Some(RState::ApplyNext(b)) = st else {
            if let Some(st) = st {
                self.set(n, st);
            }
            return;
        };
        if ok {
            self.start_apply(n, b);
        } else {
            self.fail(n, stored_behind_failed(&b));
        }
        self.pump(n);
        self.forget_if_done(n);
    }

    /// Ask for the apply of the stored log `b` of stream `sid`; with
    /// [`ReceiverConfig::commit_stored`] it is the disk's apply under way
    /// ([`RDisk::applying`]).
    fn start_apply(&mut self, sid: StreamId, b: LogBegin) {
        if let Some(d) = self.disks.get_mut(&b.disk_id) {
            if d.busy != Some(sid) {
                d.applying = Some((sid, b.cycle));
            }
        }
        let vm = self.vm_of(&b.disk_id);
        let (disk_id, cycle) = (b.disk_id, b.cycle);
        let apply = |op| ReceiverAction::ApplyLog {
            op,
            vm,
            disk_id,
            cycle,
        };
        // `ask` only queues the action and sets the state: it cannot fail.
        let _ = self.ask(sid, apply, Wait::Applied(b));
    }

    /// Handle again, as if they had just begun, the logs that waited behind
    /// a transfer that ended ([`RDisk::next`]).
    fn resume_behind(&mut self, behind: Vec<StreamId>) {
        for n in behind {
            let st = self
                .streams
                .get_mut(&n)
                .map(|s| std::mem::replace(&mut s.st, RState::Start));
            let Some(RState::Behind(l)) = st else {
                continue;
            };
            let (disk_id, cycle) = (l.disk_id, l.cycle);
            if let Err(e) = self.log_begin(n, l) {
                self.log_failed_here(&disk_id, cycle);
                self.fail(n, e);
            }
            self.pump(n);
            self.forget_if_done(n);
        }
    }

    /// Log `cycle` of the disk was refused, failed or reset here
    /// ([`RDisk::failed`]).
    fn log_failed_here(&mut self, disk_id: &DiskId, cycle: u64) {
        if let Some(d) = self.disks.get_mut(disk_id) {
            d.failed = Some(d.failed.map_or(cycle, |c| c.max(cycle)));
        }
    }

    /// Refuse the stream: discard what it staged, answer `Error`, finish.
    fn fail(&mut self, sid: StreamId, e: SessionError) {
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        let st = std::mem::replace(&mut s.st, RState::Drain);
        s.inbox.clear();
        if let RState::Log { op, .. } = st {
            self.act(ReceiverAction::DiscardLog { op });
        }
        self.out.push_back(Output::Send {
            stream: sid,
            bytes: error_frame(&e),
        });
        self.out.push_back(Output::Finish(sid));
        self.act(ReceiverAction::Refused {
            stream: sid,
            error: e,
        });
        self.release(sid, false);
    }

    /// The stream is gone (reset, connection lost): discard its staging.
    fn drop_stream(&mut self, sid: StreamId) {
        if let Some(s) = self.streams.remove(&sid) {
            if let RState::Log { op, .. } = s.st {
                self.act(ReceiverAction::DiscardLog { op });
            }
        }
        self.ops.retain(|_, s| *s != sid);
        self.release(sid, false);
    }

    /// Decode and handle what the stream holds, as far as it can go.
    fn pump(&mut self, sid: StreamId) {
        loop {
            let Some(s) = self.streams.get_mut(&sid) else {
                return;
            };
            match s.st {
                RState::Await(..)
                | RState::Drain
                | RState::Held(_)
                | RState::Early(_)
                | RState::Behind(_)
                | RState::ApplyNext(_) => return,
                _ => {}
            }
            let msg = match s.inbox.next(sid) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if s.peer_fin {
                        self.peer_finished(sid);
                    }
                    return;
                }
                Err(e) => {
                    self.fail(sid, e);
                    return;
                }
            };
            if let Err(e) = self.on_msg(sid, msg) {
                self.fail(sid, e);
                return;
            }
        }
    }

    /// The peer finished the stream and every whole message was handled.
    fn peer_finished(&mut self, sid: StreamId) {
        let Some(s) = self.streams.get(&sid) else {
            return;
        };
        let partial = !s.inbox.is_empty();
        match s.st {
            RState::Start | RState::Compare if !partial => {
                self.out.push_back(Output::Finish(sid));
                self.set(sid, RState::Drain);
            }
            RState::Await(..)
            | RState::Drain
            | RState::Held(_)
            | RState::Early(_)
            | RState::Behind(_)
            | RState::ApplyNext(_) => {}
            _ => self.fail(sid, SessionError::Ended(sid)),
        }
    }

    fn opened(&self, sid: StreamId, id: &DiskId, what: &str) -> Result<&RDisk, SessionError> {
        self.disks.get(id).ok_or_else(|| SessionError::Violation {
            stream: sid,
            what: format!("{what} for disk {} not opened with OpenDisk", hexid(id)),
        })
    }

    fn on_msg(&mut self, sid: StreamId, msg: Msg) -> Result<(), SessionError> {
        let st = self
            .streams
            .get_mut(&sid)
            .map(|s| std::mem::replace(&mut s.st, RState::Drain));
        match st {
            Some(RState::Start) => self.first(sid, msg),
            Some(RState::Initial {
                disk_id,
                cycle,
                disk_size,
                next,
            }) => self.initial_msg(sid, msg, disk_id, cycle, disk_size, next),
            Some(RState::Log {
                op,
                begin,
                next,
                hasher,
            }) => self.log_msg(sid, msg, op, begin, next, hasher),
            Some(RState::Compare) => self.compare_msg(sid, msg),
            Some(other) => {
                self.set(sid, other);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The first message of a stream decides what the stream is.
    fn first(&mut self, sid: StreamId, msg: Msg) -> Result<(), SessionError> {
        if !self.hello {
            match msg {
                Msg::Hello(_) => {}
                // Pipelined with the `Hello` (which may be refused): wait.
                Msg::OpenDisk(o) if !self.refused => {
                    self.set(sid, RState::Early(o));
                    return Ok(());
                }
                other => {
                    return Err(SessionError::Unexpected {
                        stream: sid,
                        expected: "Hello",
                        got: other.name(),
                    })
                }
            }
        }
        match msg {
            Msg::Hello(h) => {
                if !wire::speaks(h.protocol_version) || h.protocol_version > self.cfg.newest_version
                {
                    let e = SessionError::Version {
                        ours: self.cfg.newest_version,
                        theirs: h.protocol_version,
                    };
                    self.refuse_early(&e);
                    return Err(e);
                }
                self.hello = true;
                self.version = h.protocol_version;
                // The connection speaks the sender's version (a version-7
                // sender never sends a log behind another).
                let ok = Msg::HelloOk(wire::HelloOk {
                    protocol_version: h.protocol_version,
                    site_name: self.cfg.site_name.clone(),
                    software_version: self.cfg.software_version.clone(),
                    store_free: self.cfg.store_free,
                });
                // The control stream stays open for the connection.
                self.send(sid, &ok)?;
                self.set(sid, RState::Drain);
                self.handle_early();
                Ok(())
            }
            Msg::OpenDisk(o) => {
                let open = o.clone();
                self.ask(
                    sid,
                    |op| ReceiverAction::LoadDisk { op, open },
                    Wait::Load(o),
                )
            }
            Msg::InitialBegin(b) => {
                let d = self.opened(sid, &b.disk_id, "InitialBegin")?;
                if let Some(other) = d.busy {
                    return Err(busy(b.disk_id, other));
                }
                if b.disk_size != d.open.disk_size {
                    return Err(SessionError::Violation {
                        stream: sid,
                        what: format!(
                            "initial copy of {} bytes for a disk opened with {}",
                            b.disk_size, d.open.disk_size
                        ),
                    });
                }
                let open = d.open.clone();
                self.busy(b.disk_id, sid);
                let begin = b.clone();
                self.ask(
                    sid,
                    |op| ReceiverAction::BeginInitial { op, open, begin },
                    Wait::InitialBegin(b),
                )
            }
            Msg::LogBegin(l) => {
                let (disk_id, cycle) = (l.disk_id, l.cycle);
                let r = self.log_begin(sid, l);
                if r.is_err() {
                    // Refused before it began: a log behind it waits for
                    // nothing.
                    self.log_failed_here(&disk_id, cycle);
                }
                r
            }
            Msg::PointCommit(p) => {
                if !self.point_ready(&p) {
                    self.set(sid, RState::Held(p));
                    return Ok(());
                }
                self.commit_point(sid, p);
                Ok(())
            }
            Msg::BlockHashReq(_) | Msg::ResyncEnd(_) => self.compare_msg(sid, msg),
            Msg::Admin(body) => self.ask(sid, |op| ReceiverAction::Admin { op, body }, Wait::Admin),
            other => Err(SessionError::Unexpected {
                stream: sid,
                expected: "a request",
                got: other.name(),
            }),
        }
    }

    /// The `Hello` was accepted: handle the `OpenDisk`s that came before it.
    fn handle_early(&mut self) {
        for sid in self.early_streams() {
            let st = self
                .streams
                .get_mut(&sid)
                .map(|s| std::mem::replace(&mut s.st, RState::Start));
            if let Some(RState::Early(o)) = st {
                if let Err(e) = self.first(sid, Msg::OpenDisk(o)) {
                    self.fail(sid, e);
                }
                self.pump(sid);
            }
        }
    }

    /// The `Hello` was refused (`e`): the `OpenDisk`s sent with it are
    /// refused with the same error, never handed to the store; so is any
    /// that arrives later.
    fn refuse_early(&mut self, e: &SessionError) {
        self.refused = true;
        for sid in self.early_streams() {
            self.fail(sid, e.clone());
        }
    }

    /// The streams holding an `OpenDisk` sent before the `Hello`, in
    /// stream order.
    fn early_streams(&self) -> Vec<StreamId> {
        let mut early: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.st, RState::Early(_)))
            .map(|(sid, _)| *sid)
            .collect();
        early.sort_unstable();
        early
    }

    /// Every disk `p` lists reached its cycle on this connection (or, if
    /// one is not known here, the store decides).
    fn point_ready(&self, p: &wire::PointCommit) -> bool {
        p.disks.iter().all(|dc| {
            self.disks.get(&dc.disk_id).is_none_or(|d| {
                let stored = if self.cfg.commit_stored { d.stored } else { 0 };
                d.status.replica_cycle.max(d.reached).max(stored) >= dc.cycle
            })
        })
    }

    /// Ask the store to record the point (it checks the disks again).
    fn commit_point(&mut self, sid: StreamId, p: wire::PointCommit) {
        let wait = Wait::Point(p.clone(), self.progress);
        let commit = |op| ReceiverAction::CommitPoint {
            op,
            vm: p.vm,
            cycle: p.cycle,
            app_consistent: p.app_consistent,
            disks: p.disks,
            definition: p.definition,
            group: p.group.map(|g| *g),
        };
        // `ask` only queues the action and sets the state: it cannot fail.
        let _ = self.ask(sid, commit, wait);
    }

    /// The store did not record `p`: some disk is not settled at its cycle.
    /// While a later log of one of its disks is being stored or applied on
    /// this connection (pipelined cycles: the next cycle's log overtakes
    /// this point's commit, and the store will not record a point at a
    /// cycle whose replica is mid-apply), hold it: the end of that transfer
    /// releases it ([`Self::reached`], [`Self::release`]) and the store then
    /// finds the cycle in the disk's history. If a transfer ended since the
    /// point was asked for (`asked_at`: store completions arrive in any
    /// order, so the end of the apply the store saw under way may have come
    /// in first), ask again. Otherwise refuse it (retryable).
    fn point_not_there(
        &mut self,
        sid: StreamId,
        p: wire::PointCommit,
        asked_at: u64,
    ) -> Result<(), SessionError> {
        let in_flight = p.disks.iter().any(|dc| {
            self.disks.get(&dc.disk_id).is_some_and(|d| {
                d.busy.is_some_and(|b| b != sid) || d.applying.is_some_and(|(a, _)| a != sid)
            })
        });
        if in_flight {
            self.set(sid, RState::Held(p));
            return Ok(());
        }
        if asked_at != self.progress && self.point_ready(&p) {
            self.commit_point(sid, p);
            return Ok(());
        }
        Err(SessionError::Store {
            code: ErrorCode::InvalidState,
            retryable: true,
            message: format!("not every disk of {} reached cycle {}", p.vm, p.cycle),
        })
    }

    /// Commit the held points whose disks are all there now.
    fn release_points(&mut self) {
        let ready: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(&s.st, RState::Held(p) if self.point_ready(p)))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in ready {
            let st = self
                .streams
                .get_mut(&sid)
                .map(|s| std::mem::replace(&mut s.st, RState::Drain));
            if let Some(RState::Held(p)) = st {
                self.commit_point(sid, p);
            }
        }
    }

    /// The replica of `disk_id` is at `cycle` or past it.
    fn reached(&mut self, disk_id: &DiskId, cycle: u64) {
        if let Some(d) = self.disks.get_mut(disk_id) {
            d.reached = d.reached.max(cycle);
        }
        self.progress += 1;
        self.release_points();
    }

    fn busy(&mut self, id: DiskId, sid: StreamId) {
        if let Some(d) = self.disks.get_mut(&id) {
            d.busy = Some(sid);
            d.busy_log = None;
        }
    }

    fn log_begin(&mut self, sid: StreamId, l: LogBegin) -> Result<(), SessionError> {
        if l.behind && self.version < 8 {
            // A version-7 receiver could not read the mark: a sender that
            // said 7 must not send it.
            return Err(SessionError::Violation {
                stream: sid,
                what: format!(
                    "log {} is marked as sent behind its base, which protocol {} does not have",
                    l.cycle, self.version
                ),
            });
        }
        let d = self.opened(sid, &l.disk_id, "LogBegin")?;
        // The newest cycle known applied here (a log found already applied
        // moves `reached`, not the status).
        let applied = d.status.replica_cycle.max(d.reached);
        // With a store that commits durable logs, a trusted replica's
        // next log goes on once its base is stored here (the base's apply
        // may still run: this one is applied after it).
        // One such log at a time ([`RDisk::apply_next`]), and never behind
        // a base whose apply failed here.
        let base_stored = self.cfg.commit_stored
            && d.status.needs_resync.is_none()
            && d.busy.is_none()
            && d.apply_next.is_none()
            && d.failed.is_none_or(|f| f < l.base_cycle)
            && l.base_cycle > applied
            && l.base_cycle == d.stored;
        if l.behind && l.base_cycle > applied && !base_stored {
            // Protocol 8: sent behind its base, which is not applied here
            // yet. Not a chain the replica lacks: the base is in progress,
            // still arriving (QUIC does not order streams), or failed on
            // this connection. It waits (one per disk) for the base, or is
            // refused `Busy`: never `ResyncRequired`.
            let base_running = d.busy.map(|_| d.busy_log == Some(l.base_cycle));
            let base_failed = d.failed.is_some_and(|f| f >= l.base_cycle);
            let wait = d.next.is_none()
                && match base_running {
                    Some(running) => running,
                    None => !base_failed,
                };
            if wait {
                if let Some(d) = self.disks.get_mut(&l.disk_id) {
                    d.next = Some(sid);
                }
                self.set(sid, RState::Behind(l));
                return Ok(());
            }
            let why = if base_running.is_none() && base_failed {
                "which failed here"
            } else {
                "which is not applied here yet"
            };
            return Err(SessionError::Store {
                code: ErrorCode::Busy,
                retryable: true,
                message: format!(
                    "log {} of disk {} was sent behind log {}, {why}; send it again later",
                    l.cycle,
                    hexid(&l.disk_id),
                    l.base_cycle
                ),
            });
        }
        if let Some(other) = d.busy {
            return Err(busy(l.disk_id, other));
        }
        // 0: the store did not report a consistent cycle (no replica yet,
        // or an interrupted apply it rolls forward): the store decides.
        let at = d.status.replica_cycle;
        let at = match (l.behind, base_stored) {
            (true, true) => l.base_cycle,
            (true, false) => applied,
            (false, _) => at,
        };
        if at != 0 && l.cycle <= at {
            // A resend of a log already applied: applied at most once.
            self.reached(&l.disk_id, l.cycle);
            let ack = Msg::Ack(Ack {
                disk_id: l.disk_id,
                cycle: l.cycle,
                durable: true,
                applied: true,
            });
            return self.answer(sid, &ack);
        }
        let vm = d.open.vm.clone();
        if let Some(why) = &d.status.needs_resync {
            if d.resync_cycle != Some(l.cycle) {
                return Err(needs_resync(why));
            }
        }
        if at != 0 && l.base_cycle != at {
            let why = format!(
                "log {} is based on cycle {}, the replica is at {at}",
                l.cycle, l.base_cycle
            );
            self.act(ReceiverAction::MarkNeedsResync {
                vm,
                disk_id: l.disk_id,
                why: why.clone(),
            });
            if let Some(d) = self.disks.get_mut(&l.disk_id) {
                d.status.needs_resync = Some(why.clone());
                d.resync_cycle = None;
            }
            return Err(needs_resync(&why));
        }
        self.busy(l.disk_id, sid);
        if let Some(d) = self.disks.get_mut(&l.disk_id) {
            d.busy_log = Some(l.cycle);
        }
        let op = self.op(sid);
        self.act(ReceiverAction::StageLog {
            op,
            vm,
            begin: l.clone(),
        });
        self.set(
            sid,
            RState::Log {
                op,
                begin: l,
                next: 0,
                hasher: Hasher::default(),
            },
        );
        Ok(())
    }

    fn log_msg(
        &mut self,
        sid: StreamId,
        msg: Msg,
        op: OpId,
        begin: LogBegin,
        next: u64,
        mut hasher: Hasher,
    ) -> Result<(), SessionError> {
        let r = self.log_step(sid, msg, op, &begin, next, &mut hasher);
        match r {
            Ok(Some(next)) => {
                self.set(
                    sid,
                    RState::Log {
                        op,
                        begin,
                        next,
                        hasher,
                    },
                );
                Ok(())
            }
            Ok(None) => {
                self.set(sid, RState::Await(op, Wait::Stored(begin)));
                Ok(())
            }
            Err(e) => {
                // Never acknowledged: the staged bytes are dropped.
                self.act(ReceiverAction::DiscardLog { op });
                Err(e)
            }
        }
    }

    /// One message inside a log: `Some(next offset)` while chunks arrive,
    /// `None` once the log verified and was handed to the store.
    fn log_step(
        &mut self,
        sid: StreamId,
        msg: Msg,
        op: OpId,
        begin: &LogBegin,
        next: u64,
        hasher: &mut Hasher,
    ) -> Result<Option<u64>, SessionError> {
        let corrupt = |what: String| SessionError::Corrupt { stream: sid, what };
        match msg {
            Msg::LogChunk(c) => {
                if c.disk_id != begin.disk_id || c.cycle != begin.cycle {
                    return Err(corrupt(format!(
                        "a chunk of log {} of disk {} inside log {} of disk {}",
                        c.cycle,
                        hexid(&c.disk_id),
                        begin.cycle,
                        hexid(&begin.disk_id)
                    )));
                }
                let end = c.offset_in_log.saturating_add(c.data.len() as u64);
                if c.offset_in_log != next || end > begin.total_len {
                    return Err(corrupt(format!(
                        "chunk {}..{end} where {next} was expected (log of {} bytes)",
                        c.offset_in_log, begin.total_len
                    )));
                }
                hasher.0.update(&c.data);
                self.act(ReceiverAction::StageLogData {
                    op,
                    offset: c.offset_in_log,
                    data: c.data,
                });
                Ok(Some(end))
            }
            Msg::LogEnd(e) => {
                if e.disk_id != begin.disk_id || e.cycle != begin.cycle {
                    return Err(corrupt("the end of another log".into()));
                }
                if e.total_len != begin.total_len || next != begin.total_len {
                    return Err(corrupt(format!(
                        "log of {} bytes announced, {next} received, {} at the end",
                        begin.total_len, e.total_len
                    )));
                }
                if e.log_checksum != hasher.0.digest128() {
                    return Err(corrupt("log checksum mismatch".into()));
                }
                let vm = self.vm_of(&begin.disk_id);
                self.act(ReceiverAction::StoreLogDurably {
                    op,
                    vm,
                    disk_id: begin.disk_id,
                    cycle: begin.cycle,
                    log_checksum: e.log_checksum,
                });
                self.ops.insert(op, sid);
                Ok(None)
            }
            other => Err(SessionError::Unexpected {
                stream: sid,
                expected: "LogChunk or LogEnd",
                got: other.name(),
            }),
        }
    }

    fn initial_msg(
        &mut self,
        sid: StreamId,
        msg: Msg,
        disk_id: DiskId,
        cycle: u64,
        disk_size: u64,
        next: u64,
    ) -> Result<(), SessionError> {
        match msg {
            Msg::InitialChunk(c) if c.disk_id == disk_id => {
                let end = c.offset.saturating_add(u64::from(c.length));
                if c.offset < next || end > disk_size {
                    return Err(SessionError::Corrupt {
                        stream: sid,
                        what: format!(
                            "initial chunk {}..{end} (next offset {next}, disk of {disk_size} bytes)",
                            c.offset
                        ),
                    });
                }
                let offset = c.offset;
                let data = c.into_data().map_err(|e| SessionError::Corrupt {
                    stream: sid,
                    what: e.to_string(),
                })?;
                let vm = self.vm_of(&disk_id);
                self.act(ReceiverAction::WriteInitial {
                    vm,
                    disk_id,
                    offset,
                    data,
                });
                self.set(
                    sid,
                    RState::Initial {
                        disk_id,
                        cycle,
                        disk_size,
                        next: end,
                    },
                );
                Ok(())
            }
            Msg::InitialEnd(e) if e.disk_id == disk_id => {
                if e.cycle != cycle || e.disk_size != disk_size {
                    return Err(SessionError::Violation {
                        stream: sid,
                        what: format!(
                            "InitialEnd of cycle {} ({} bytes) ends the copy of cycle {cycle} ({disk_size} bytes)",
                            e.cycle, e.disk_size
                        ),
                    });
                }
                let vm = self.vm_of(&disk_id);
                let finish = |op| ReceiverAction::FinishInitial {
                    op,
                    vm,
                    disk_id,
                    cycle,
                };
                self.ask(sid, finish, Wait::InitialEnd { disk_id, cycle })
            }
            other => Err(SessionError::Unexpected {
                stream: sid,
                expected: "InitialChunk or InitialEnd of the disk",
                got: other.name(),
            }),
        }
    }

    fn compare_msg(&mut self, sid: StreamId, msg: Msg) -> Result<(), SessionError> {
        match msg {
            Msg::BlockHashReq(r) => {
                let vm = self
                    .opened(sid, &r.disk_id, "BlockHashReq")?
                    .open
                    .vm
                    .clone();
                let wait = Wait::Hashes {
                    disk_id: r.disk_id,
                    replica_cycle: r.replica_cycle,
                    blocks: r.total_blocks(),
                };
                self.ask(
                    sid,
                    |op| ReceiverAction::HashBlocks { op, vm, req: r },
                    wait,
                )
            }
            Msg::ResyncEnd(e) => {
                let vm = self.opened(sid, &e.disk_id, "ResyncEnd")?.open.vm.clone();
                let end = e.clone();
                self.ask(
                    sid,
                    |op| ReceiverAction::PrepareResync { op, vm, end },
                    Wait::Resync(e),
                )
            }
            other => Err(SessionError::Unexpected {
                stream: sid,
                expected: "BlockHashReq or ResyncEnd",
                got: other.name(),
            }),
        }
    }

    fn vm_of(&self, id: &DiskId) -> String {
        self.disks
            .get(id)
            .map(|d| d.open.vm.clone())
            .unwrap_or_default()
    }

    /// Storing or applying log `b` failed. `InvalidState` means the log
    /// cannot be applied in order (the chains diverged, a log was lost or
    /// damaged): only a checksum resync heals the replica, so it is marked
    /// and the sender told to resync (retryable: it does so right away).
    fn log_failed(&mut self, b: &LogBegin, f: StoreFailure) -> SessionError {
        if f.code != ErrorCode::InvalidState {
            return SessionError::from_store(f);
        }
        let why = format!("a log could not be applied in order: {}", f.message);
        let vm = self.vm_of(&b.disk_id);
        self.act(ReceiverAction::MarkNeedsResync {
            vm,
            disk_id: b.disk_id,
            why: why.clone(),
        });
        if let Some(d) = self.disks.get_mut(&b.disk_id) {
            d.status.needs_resync = Some(why.clone());
            d.resync_cycle = None;
        }
        needs_resync(&why)
    }

    /// A store action of stream `sid` completed.
    fn completed(
        &mut self,
        sid: StreamId,
        wait: Wait,
        done: StoreDone,
    ) -> Result<(), SessionError> {
        let store = SessionError::from_store;
        let mismatch = || SessionError::Misuse("a completion of another kind of action".into());
        match (wait, done) {
            (Wait::Load(o), StoreDone::DiskLoaded(r)) => {
                let st = r.map_err(store)?;
                let reply = Msg::DiskState(wire::DiskState {
                    disk_id: o.disk_id,
                    replica_cycle: st.replica_cycle,
                    replica_size: st.replica_size,
                    copy_cycle: st.copy_cycle,
                    resume_offset: st.resume_offset,
                    needs_resync: st
                        .needs_resync
                        .as_deref()
                        .map(|w| wire::ErrorMsg::new(ErrorCode::InvalidState, false, w).message)
                        .unwrap_or_default(),
                });
                let (busy, busy_log, next, failed, applying, apply_next) = self
                    .disks
                    .get(&o.disk_id)
                    .map_or((None, None, None, None, None, None), |d| {
                        (
                            d.busy,
                            d.busy_log,
                            d.next,
                            d.failed,
                            d.applying,
                            d.apply_next,
                        )
                    });
                self.disks.insert(
                    o.disk_id,
                    RDisk {
                        open: o,
                        status: st,
                        busy,
                        busy_log,
                        next,
                        failed,
                        resync_cycle: None,
                        reached: 0,
                        stored: 0,
                        applying,
                        apply_next,
                    },
                );
                self.answer(sid, &reply)
            }
            (Wait::InitialBegin(b), StoreDone::InitialBegun(r)) => {
                let resume = r.map_err(store)?;
                if resume != b.start_offset {
                    // The sender's idea of the durable offset is stale
                    // (it was read before a lagging write of an older
                    // connection moved it, or the copy was reset). Ending
                    // the stream makes it open the disk again, and the
                    // `DiskState` it gets then carries `resume`.
                    return Err(SessionError::Store {
                        code: ErrorCode::InvalidState,
                        retryable: true,
                        message: format!(
                            "the initial copy can resume at {resume}, not {}; the sender opens the disk again to learn where",
                            b.start_offset
                        ),
                    });
                }
                // A resumed copy begins with what changed below
                // `start_offset` since the interrupted copy (ascending),
                // then continues from it: chunks are checked for order
                // from 0, not from `start_offset`.
                self.set(
                    sid,
                    RState::Initial {
                        disk_id: b.disk_id,
                        cycle: b.cycle,
                        disk_size: b.disk_size,
                        next: 0,
                    },
                );
                Ok(())
            }
            (Wait::InitialEnd { disk_id, cycle }, StoreDone::InitialFinished(r)) => {
                r.map_err(store)?;
                if let Some(d) = self.disks.get_mut(&disk_id) {
                    d.status.replica_cycle = cycle;
                    d.status.replica_size = d.open.disk_size;
                    d.status.needs_resync = None;
                    d.status.copy_cycle = 0;
                    d.status.resume_offset = 0;
                }
                self.reached(&disk_id, cycle);
                self.answer(sid, &ack(disk_id, cycle, true, true))
            }
            (Wait::Stored(b), StoreDone::LogStored(r)) => {
                match r.map_err(|f| self.log_failed(&b, f))? {
                    LogStored::AlreadyApplied => {
                        self.reached(&b.disk_id, b.cycle);
                        self.answer(sid, &ack(b.disk_id, b.cycle, true, true))
                    }
                    LogStored::Stored => {
                        self.send(sid, &ack(b.disk_id, b.cycle, true, false))?;
                        if !self.cfg.commit_stored {
                            self.start_apply(sid, b);
                            return Ok(());
                        }
                        let mut overlap = false;
                        let mut after = false;
                        if let Some(d) = self.disks.get_mut(&b.disk_id) {
                            d.stored = d.stored.max(b.cycle);
                            if d.status.needs_resync.is_none() && d.busy == Some(sid) {
                                // Free for the next log while this one is
                                // applied.
                                d.busy = None;
                                d.busy_log = None;
                                overlap = true;
                                if d.applying.is_some() {
                                    d.apply_next = Some(sid);
                                    after = true;
                                }
                            }
                        }
                        let disk_id = b.disk_id;
                        // A point held for this log may go now (the apply
                        // runs beside its commit), and the log behind it
                        // may begin.
                        self.progress += 1;
                        self.release_points();
                        // Its base's apply failed here while it was stored
                        // (the sender resets it too): never applied out of
                        // order; durable, it is sent again with its base.
                        let base_failed = self.disks.get(&disk_id).is_some_and(|d| {
                            b.base_cycle > d.status.replica_cycle.max(d.reached)
                                && d.failed.is_some_and(|f| f >= b.base_cycle)
                        });
                        if base_failed {
                            return Err(stored_behind_failed(&b));
                        }
                        if after {
                            self.set(sid, RState::ApplyNext(b));
                        } else {
                            self.start_apply(sid, b);
                        }
                        if overlap {
                            let next = self.disks.get_mut(&disk_id).and_then(|d| d.next.take());
                            self.resume_behind(next.into_iter().collect());
                        }
                        Ok(())
                    }
                }
            }
            (Wait::Applied(b), StoreDone::LogApplied(r)) => {
                r.map_err(|f| self.log_failed(&b, f))?;
                if let Some(d) = self.disks.get_mut(&b.disk_id) {
                    d.status.replica_cycle = d.status.replica_cycle.max(b.cycle);
                    d.status.replica_size = b.disk_size;
                    if d.resync_cycle == Some(b.cycle) {
                        d.status.needs_resync = None;
                        d.resync_cycle = None;
                    }
                }
                self.reached(&b.disk_id, b.cycle);
                self.answer(sid, &ack(b.disk_id, b.cycle, true, true))
            }
            (Wait::Point(p, asked_at), StoreDone::PointCommitted(r)) => {
                if r.map_err(store)? {
                    let (vm, cycle) = (p.vm, p.cycle);
                    self.answer(sid, &Msg::PointAck(PointAck { vm, cycle }))
                } else {
                    self.point_not_there(sid, p, asked_at)
                }
            }
            (
                Wait::Hashes {
                    disk_id,
                    replica_cycle,
                    blocks,
                },
                StoreDone::Hashed(r),
            ) => {
                let (replica_size, hashes) = r.map_err(store)?;
                if hashes.len() as u64 != blocks {
                    return Err(SessionError::Misuse(format!(
                        "{} digests for {blocks} blocks",
                        hashes.len()
                    )));
                }
                self.send(
                    sid,
                    &Msg::BlockHashes(BlockHashes {
                        disk_id,
                        replica_cycle,
                        replica_size,
                        hashes,
                    }),
                )?;
                self.set(sid, RState::Compare);
                Ok(())
            }
            (Wait::Resync(e), StoreDone::ResyncPrepared(r)) => {
                r.map_err(store)?;
                if let Some(d) = self.disks.get_mut(&e.disk_id) {
                    d.resync_cycle = Some(e.cycle);
                }
                self.send(sid, &ack(e.disk_id, e.cycle, false, false))?;
                self.set(sid, RState::Compare);
                Ok(())
            }
            (Wait::Admin, StoreDone::AdminDone(r)) => {
                let body = r.map_err(store)?;
                self.answer(sid, &Msg::AdminOk(body))
            }
            _ => Err(mismatch()),
        }
    }
}

fn ack(disk_id: DiskId, cycle: u64, durable: bool, applied: bool) -> Msg {
    Msg::Ack(Ack {
        disk_id,
        cycle,
        durable,
        applied,
    })
}

/// The refusal of a log the replica cannot take until a resync heals it.
fn needs_resync(why: &str) -> SessionError {
    SessionError::Store {
        code: ErrorCode::ResyncRequired,
        retryable: true,
        message: format!("the replica needs a resync: {why}"),
    }
}

/// A log stored here behind one whose apply failed: refused `Busy`
/// (retryable), never applied out of order.
fn stored_behind_failed(b: &LogBegin) -> SessionError {
    SessionError::Store {
        code: ErrorCode::Busy,
        retryable: true,
        message: format!(
            "log {} of disk {} is stored, but the log before it was not applied here; send both again",
            b.cycle,
            hexid(&b.disk_id)
        ),
    }
}

fn busy(id: DiskId, other: StreamId) -> SessionError {
    SessionError::Store {
        code: ErrorCode::Busy,
        retryable: true,
        message: format!(
            "disk {} is busy with another transfer (stream {})",
            hexid(&id),
            other.0
        ),
    }
}
