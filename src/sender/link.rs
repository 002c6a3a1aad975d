//! The sender's quinn driver: one [`wire::session::Sender`] run over one
//! connection (see "Driving a session" in [`crate::wire::session`]).
//!
//! A [`Link`] owns the connection, the session and its streams: a writer
//! task per stream (opened on the session's first bytes for it; shaped by
//! the VM's and the link's caps, [`Shaper`]) and a reader task feeding what
//! the receiver answers back in. The session's reads
//! ([`SenderAction::Read`]) are served here on blocking threads, from the
//! sealed log or the disk pieces handed in with the job, at most
//! [`STREAM_BUDGET`] bytes queued per stream. Logs the receiver applied are
//! marked shipped (tracking deletes them); committed points update the VM's
//! status and answer `vdrep sync` callers. Everything else the session
//! reports is handed to the caller by [`Link::next`], which also drives the
//! session while the caller waits.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::error::{conn_err, refuses_version, session_err};
use super::shaper::{Class, Shaper};
use super::{now_ns, SendError, Vm, VmState};
use crate::tracking::{CycleBuf, SealedLog, StreamError};
use crate::transport::mux::{self, Control, StreamHeader};
use crate::transport::StreamEnd;
use crate::wire::session::{
    Event, Job, Output, ReadData, ReadId, ReadWhat, Sender, SenderAction, SenderConfig,
    SessionError, SourceError, StreamId,
};
use crate::wire::{DiskId, DiskState, HelloOk, InitialBegin, LogBegin};

/// Bytes read ahead of what a stream has written (a read waits for room).
pub(super) const STREAM_BUDGET: usize = 8 << 20;

/// A piece of a disk as of its cut, from the thread that reads it.
pub(super) enum Piece {
    /// Disk bytes at this offset.
    Data(u64, Vec<u8>),
    /// Every piece was read.
    End,
    /// Reading failed.
    Failed(String),
}

/// Read buffers of one copy, handed back by the session once their bytes
/// are framed ([`Output::Spent`]) and read into again: a fresh 1 MiB
/// buffer cost a zeroing pass per piece, plus the kernel's zeroing of its
/// fresh pages (about 5 % of the sender's CPU in an initial copy,
/// profiled). One pool per copy job: a buffer's stale bytes never leave
/// the disk they were read from.
#[derive(Default)]
pub(super) struct BufPool(parking_lot::Mutex<Vec<Vec<u8>>>);

impl BufPool {
    /// Buffers kept: the pieces in flight between the reader and the
    /// session (the channel's 8, the one being read, the one framed).
    const KEEP: usize = 10;

    /// A buffer of `len` bytes. Its content is stale (what an earlier piece
    /// held, or zeros): the caller overwrites every byte.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().pop().unwrap_or_default();
        // Same length (every piece but the last): no byte written here.
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        let mut bufs = self.0.lock();
        if bufs.len() < Self::KEEP {
            bufs.push(b);
        }
    }
}

/// Hands the pieces of a sealed cycle ([`CycleBuf`]) over a channel, each
/// read straight into the buffer that travels.
pub(super) struct PieceSink {
    tx: mpsc::Sender<Piece>,
    /// The piece being read: passed on when the next one is asked for.
    cur: Option<(u64, Vec<u8>)>,
    pool: Arc<BufPool>,
}

impl PieceSink {
    /// Pieces read into buffers of `pool` (shared with the link, which
    /// returns them to it: [`Link::submit_initial`]).
    pub(super) fn new(tx: mpsc::Sender<Piece>, pool: Arc<BufPool>) -> Self {
        PieceSink {
            tx,
            cur: None,
            pool,
        }
    }

    /// Pass the last piece on, then `Piece::End` or the failure.
    pub(super) fn end(mut self, r: &Result<(), StreamError>, what: &str) {
        let r = match r {
            Ok(()) => self.flush().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let last = match r {
            Ok(()) => Piece::End,
            Err(e) => Piece::Failed(format!("reading {what} as of its cut: {e}")),
        };
        let _ = self.tx.blocking_send(last);
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        if let Some((off, b)) = self.cur.take() {
            self.tx
                .blocking_send(Piece::Data(off, b))
                .map_err(|_| StreamError::Stopped)?;
        }
        Ok(())
    }
}

impl CycleBuf for PieceSink {
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], StreamError> {
        self.flush()?;
        let (_, b) = self.cur.insert((off, self.pool.take(len)));
        Ok(b)
    }
}

/// Where the bytes of a job come from.
#[derive(Clone)]
enum Source {
    Log(Arc<SealedLog>),
    Copy(Arc<tokio::sync::Mutex<mpsc::Receiver<Piece>>>, Arc<BufPool>),
}

/// What the connection's tasks report to the driver.
enum Input {
    Data(StreamId, quinn::Chunk),
    Finished(StreamId),
    Reset(StreamId),
    Read {
        id: ReadId,
        result: Result<ReadData, SourceError>,
        permit: Option<OwnedSemaphorePermit>,
    },
    Lost(quinn::ConnectionError),
}

/// Moments of one log's transfer, for its phase events.
struct ShipMarks {
    who: String,
    first_read: Option<Instant>,
    durable: Option<Instant>,
}

/// What a stream's writer is asked to do.
enum Write {
    Bytes {
        bytes: Vec<u8>,
        /// Wait for the caps first: this class, these bytes.
        shape: Option<(Class, u64)>,
        /// Room in the stream's budget, given back once written.
        permit: Option<OwnedSemaphorePermit>,
    },
    End(StreamEnd),
}

struct Writer {
    tx: mpsc::UnboundedSender<Write>,
    budget: Arc<Semaphore>,
}

/// A read just completed: the chunk it yields is shaped and counted.
struct Carry {
    stream: StreamId,
    class: Class,
    /// Disk or log bytes read.
    raw: u64,
    permit: Option<OwnedSemaphorePermit>,
}

/// An initial copy's progress (for the status and the log).
struct CopyStats {
    t0: Instant,
    last_log: Instant,
    /// Payload bytes sent, disk bytes covered.
    sent: u64,
    done: u64,
}

/// The session timeout ([`SenderConfig::timeout_ns`]): a request the
/// receiver has not answered for this long (a log's apply included) ends
/// the session.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The session `protect` opened to check the receiver (handshake, `Hello`
/// and every disk's `OpenDisk` answered, in one flight since protocol 7):
/// the VM's worker starts on it instead of connecting and opening the disks
/// again, two round trips less before the first byte of its initial copy.
pub(super) struct Probed {
    pub(super) link: Link,
    /// The replicas' states, as [`Link::ready`] returned them.
    pub(super) states: Vec<DiskState>,
}

/// A connection every session to one receiver shares (`vdrep-mux/1`,
/// [`crate::transport::mux`]): each [`Link`] on it is a session with its
/// own tag and streams.
pub(super) struct MuxConn {
    conn: quinn::Connection,
    next_tag: AtomicU64,
    /// The sessions on it, by tag: where an end the receiver sends goes.
    sessions: Arc<parking_lot::Mutex<HashMap<u64, mpsc::UnboundedSender<Input>>>>,
    /// Bytes the sessions wrote on their streams (to share the
    /// connection's UDP bytes among the VMs).
    written: Arc<AtomicU64>,
    /// The sessions on it, for its congestion window's floor.
    shares: crate::transport::congestion::Shares,
}

impl MuxConn {
    /// Share `conn` (it negotiated `vdrep-mux/1`): listen for the
    /// receiver's session ends.
    pub(super) fn new(
        conn: quinn::Connection,
        shares: crate::transport::congestion::Shares,
    ) -> Arc<Self> {
        let sessions: Arc<parking_lot::Mutex<HashMap<u64, mpsc::UnboundedSender<Input>>>> =
            Arc::default();
        let (c, to) = (conn.clone(), sessions.clone());
        tokio::spawn(async move {
            let addr = c.remote_address();
            while let Ok(mut rx) = c.accept_uni().await {
                // Each control stream is read on its own (as the receiver
                // reads the sender's): one whose bytes are late (a lost
                // packet) does not hold back the ends behind it.
                let to = to.clone();
                tokio::spawn(async move {
                    match mux::read_control(&mut rx).await {
                        Ok(Control::End { tag, code, reason }) => {
                            if let Some(tx) = to.lock().remove(&tag) {
                                // As the connection's close ended it before.
                                let _ = tx.send(Input::Lost(
                                    quinn::ConnectionError::ApplicationClosed(
                                        quinn::ApplicationClose {
                                            error_code: code.into(),
                                            reason: reason.into_bytes().into(),
                                        },
                                    ),
                                ));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%addr, "ignoring a control stream of the receiver: {e}");
                        }
                    }
                });
            }
        });
        if tracing::enabled!(target: "vdrep::link_stats", tracing::Level::DEBUG) {
            tokio::spawn(trace_stats(conn.clone()));
        }
        Arc::new(MuxConn {
            conn,
            next_tag: AtomicU64::new(0),
            sessions,
            written: Arc::default(),
            shares,
        })
    }

    /// Neither side closed it.
    pub(super) fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The connection.
    pub(super) fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// The UDP bytes a VM's session sent: its connection's, or on a shared
/// one its share of them (by the bytes it wrote on its streams).
pub(super) enum WireBytes {
    Conn(quinn::Connection),
    Share {
        mine: Arc<AtomicU64>,
        all: Arc<AtomicU64>,
        conn: quinn::Connection,
    },
}

impl WireBytes {
    pub(super) fn udp_tx_bytes(&self) -> u64 {
        match self {
            WireBytes::Conn(c) => c.stats().udp_tx.bytes,
            WireBytes::Share { mine, all, conn } => {
                let (mine, all) = (mine.load(Ordering::Relaxed), all.load(Ordering::Relaxed));
                if all == 0 {
                    return 0;
                }
                let udp = conn.stats().udp_tx.bytes;
                (u128::from(mine) * u128::from(udp) / u128::from(all)) as u64
            }
        }
    }
}

/// This session's part of a shared connection.
struct Part {
    mux: Arc<MuxConn>,
    tag: u64,
    /// Bytes this session wrote on its streams.
    written: Arc<AtomicU64>,
    /// The session was ended (by either side).
    ended: bool,
}

/// One session over one connection (its own, or a shared one: `part`).
pub(super) struct Link {
    conn: quinn::Connection,
    part: Option<Part>,
    _endpoint: quinn::Endpoint,
    addr: SocketAddr,
    session: Sender,
    t0: Instant,
    /// The VM whose status is kept (none: a probe).
    vm: Option<Arc<Vm>>,
    shaper: Arc<Shaper>,
    writers: HashMap<StreamId, Writer>,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    sources: HashMap<(DiskId, u64), (Source, Instant)>,
    reads: HashMap<ReadId, (Class, StreamId)>,
    /// When each read was asked for (with phase events on: `ship_read_turn`).
    read_asked: HashMap<ReadId, Instant>,
    carry: Option<Carry>,
    /// Applied logs still read by a finishing read: marked shipped after.
    ship_later: Vec<Arc<SealedLog>>,
    /// Cut time of each cycle submitted (for the points' status).
    cut_ns: HashMap<u64, u64>,
    /// When the newest log of each cycle was applied (`util::phase`).
    applied_at: HashMap<u64, Instant>,
    /// A log's first read and durable ack (`util::phase`, when enabled).
    marks: HashMap<(DiskId, u64), ShipMarks>,
    copy: Option<CopyStats>,
    notes: VecDeque<SenderAction>,
    lost: Option<quinn::ConnectionError>,
    closed: Option<SessionError>,
    /// A point the receiver refused.
    failed: Option<SendError>,
}

impl Link {
    /// Run a session on `conn` (it says `Hello` at once), or, with `mux`,
    /// on a new tag of that shared connection; [`Link::ready`] waits for
    /// the replicas' states.
    pub(super) fn new(
        conn: quinn::Connection,
        mux: Option<Arc<MuxConn>>,
        endpoint: quinn::Endpoint,
        cfg: SenderConfig,
        vm: Option<Arc<Vm>>,
        shaper: Arc<Shaper>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let watch = conn.clone();
        let lost = tx.clone();
        tokio::spawn(async move {
            let e = watch.closed().await;
            let _ = lost.send(Input::Lost(e));
        });
        let part = mux.map(|mux| {
            let tag = mux.next_tag.fetch_add(1, Ordering::Relaxed);
            mux.sessions.lock().insert(tag, tx.clone());
            mux.shares.add();
            Part {
                mux,
                tag,
                written: Arc::default(),
                ended: false,
            }
        });
        if part.is_none() && tracing::enabled!(target: "vdrep::link_stats", tracing::Level::DEBUG) {
            tokio::spawn(trace_stats(conn.clone()));
        }
        Link {
            addr: conn.remote_address(),
            conn,
            part,
            _endpoint: endpoint,
            session: Sender::new(cfg, 0),
            t0: Instant::now(),
            vm,
            shaper,
            writers: HashMap::new(),
            tx,
            rx,
            sources: HashMap::new(),
            reads: HashMap::new(),
            read_asked: HashMap::new(),
            carry: None,
            ship_later: Vec::new(),
            cut_ns: HashMap::new(),
            applied_at: HashMap::new(),
            marks: HashMap::new(),
            copy: None,
            notes: VecDeque::new(),
            lost: None,
            closed: None,
            failed: None,
        }
    }

    /// A probe's session now works for `vm`: its status is kept, its
    /// streams are shaped by `shaper` (the probe's own streams carried only
    /// `Hello` and `OpenDisk`s, never shaped).
    pub(super) fn adopt(&mut self, vm: Arc<Vm>, shaper: Arc<Shaper>) {
        self.vm = Some(vm);
        self.shaper = shaper;
    }

    /// The UDP bytes this session sends (the VM's).
    pub(super) fn wire_bytes(&self) -> WireBytes {
        match &self.part {
            None => WireBytes::Conn(self.conn.clone()),
            Some(p) => WireBytes::Share {
                mine: p.written.clone(),
                all: p.mux.written.clone(),
                conn: self.conn.clone(),
            },
        }
    }

    /// Neither the connection nor the session has ended (as far as this
    /// side knows).
    pub(super) fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
            && self.lost.is_none()
            && self.closed.is_none()
            && !self.session.is_closed()
            && !self.part.as_ref().is_some_and(|p| p.ended)
    }

    /// End the session: close its connection, or on a shared one tell the
    /// receiver this session is over (its streams are reset) and leave the
    /// connection to the others.
    fn end(&mut self, code: u32, reason: &[u8]) {
        let Some(p) = &mut self.part else {
            self.conn.close(code.into(), reason);
            return;
        };
        if p.ended {
            return;
        }
        p.ended = true;
        p.mux.sessions.lock().remove(&p.tag);
        p.mux.shares.remove();
        // The writers reset their streams.
        self.writers.clear();
        let end = Control::End {
            tag: p.tag,
            code,
            reason: String::from_utf8_lossy(reason).into_owned(),
        };
        let conn = self.conn.clone();
        // (Outside a runtime, a daemon shutting down: the connection ends.)
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { mux::send_control(&conn, &end).await });
        }
        // What the connection's close reported before.
        let _ = self
            .tx
            .send(Input::Lost(quinn::ConnectionError::LocallyClosed));
    }

    /// Wait for every disk's state (in the order of the config's disks).
    pub(super) async fn ready(&mut self) -> Result<Vec<DiskState>, SendError> {
        loop {
            if let SenderAction::Ready { states } = self.next().await? {
                return Ok(states);
            }
        }
    }

    /// Open every disk again: their states now.
    pub(super) async fn reopen(&mut self) -> Result<Vec<DiskState>, SendError> {
        self.session.reopen().map_err(|e| self.error(&e))?;
        self.ready().await
    }

    /// The receiver's `HelloOk`.
    pub(super) fn peer(&self) -> Option<&HelloOk> {
        self.session.peer()
    }

    /// Nothing submitted is running or being committed.
    pub(super) fn is_idle(&self) -> bool {
        self.session.is_idle()
    }

    /// Every byte submitted is sent; only acknowledgements are awaited
    /// ([`crate::wire::session::Sender::all_sent`]).
    pub(super) fn all_sent(&self) -> bool {
        self.session.all_sent()
    }

    /// Every log submitted is durable at the receiver and every point of
    /// their cycles committed; only applies are outstanding
    /// ([`crate::wire::session::Sender::settled`]), and the driver has
    /// taken every note (a `LogDurable` it must count).
    pub(super) fn settled(&mut self) -> bool {
        self.flush();
        self.notes.is_empty() && self.session.settled()
    }

    /// The log of `disk_id` at `cycle` is submitted and not yet applied.
    pub(super) fn in_flight(&self, disk_id: &DiskId, cycle: u64) -> bool {
        self.sources.contains_key(&(*disk_id, cycle))
    }

    /// Remember when `cycle` was cut (the time its point stands for).
    pub(super) fn note_cut(&mut self, cycle: u64, cut_ns: u64) {
        self.cut_ns.insert(cycle, cut_ns);
    }

    /// The VM's domain definition as of the cut of `cycle`: its point
    /// carries it to the receiver.
    pub(super) fn note_definition(&mut self, cycle: u64, xml: String) {
        self.session.note_definition(cycle, xml);
    }

    /// The cut of `cycle` was its consistency group's: its point says so.
    pub(super) fn note_group(&mut self, cycle: u64, group: crate::wire::PointGroup) {
        self.session.note_group(cycle, group);
    }

    /// Ship a sealed log (its `LogBegin` as `begin`); it is marked shipped
    /// once the receiver applied it.
    pub(super) fn submit_log(
        &mut self,
        begin: LogBegin,
        log: SealedLog,
        app_consistent: bool,
    ) -> Result<(), SendError> {
        self.sources.insert(
            (begin.disk_id, begin.cycle),
            (Source::Log(Arc::new(log)), Instant::now()),
        );
        let r = self.session.submit(Job::Log {
            begin,
            app_consistent,
        });
        r.map_err(|e| self.error(&e))
    }

    /// Copy a disk as of its cut, from the pieces read into `pieces`
    /// (by a [`PieceSink`] whose buffers come from `pool`, where the
    /// session's spent buffers go back).
    pub(super) fn submit_initial(
        &mut self,
        begin: InitialBegin,
        pieces: mpsc::Receiver<Piece>,
        pool: Arc<BufPool>,
    ) -> Result<(), SendError> {
        let src = Source::Copy(Arc::new(tokio::sync::Mutex::new(pieces)), pool);
        self.sources
            .insert((begin.disk_id, begin.cycle), (src, Instant::now()));
        let now = Instant::now();
        self.copy = Some(CopyStats {
            t0: now,
            last_log: now,
            sent: 0,
            done: 0,
        });
        let r = self.session.submit(Job::Initial(begin));
        r.map_err(|e| self.error(&e))
    }

    /// Drop what a job reads from (its reader stops).
    pub(super) fn forget(&mut self, disk_id: DiskId, cycle: u64) {
        self.sources.remove(&(disk_id, cycle));
    }

    pub(super) fn start_compare(
        &mut self,
        disk_id: DiskId,
        replica_cycle: u64,
    ) -> Result<StreamId, SendError> {
        let r = self.session.start_compare(disk_id, replica_cycle);
        r.map_err(|e| self.error(&e))
    }

    pub(super) fn request_hashes(
        &mut self,
        stream: StreamId,
        block_size: u32,
        runs: Vec<crate::wire::HashRun>,
    ) -> Result<(), SendError> {
        let r = self.session.request_hashes(stream, block_size, runs);
        r.map_err(|e| self.error(&e))
    }

    pub(super) fn finish_compare(
        &mut self,
        stream: StreamId,
        end: Option<crate::wire::ResyncEnd>,
    ) -> Result<(), SendError> {
        let r = self.session.finish_compare(stream, end);
        r.map_err(|e| self.error(&e))
    }

    /// End the session now (its connection, unless shared), saying why.
    pub(super) fn close(&mut self, reason: &[u8]) {
        self.end(0, reason);
    }

    /// What a failure of the session means for the sender: the
    /// connection's own error once it is known to be lost.
    pub(super) fn error(&self, e: &SessionError) -> SendError {
        match (e.kind(), &self.lost) {
            (crate::wire::session::ErrorKind::Transport, Some(c)) => conn_err(c, self.addr),
            _ if refuses_version(e) => {
                session_err(e).with_refused_version(self.session.protocol_version())
            }
            _ => session_err(e),
        }
    }

    /// Drive the session until it reports something for the caller: a
    /// disk's state, a job's end, a point committed, digests, a compare's
    /// end. Err: the session is over, or a point was refused.
    pub(super) async fn next(&mut self) -> Result<SenderAction, SendError> {
        loop {
            self.flush();
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if let Some(n) = self.notes.pop_front() {
                return Ok(n);
            }
            if let Some(e) = &self.closed {
                return Err(self.error(e));
            }
            self.take_input().await;
        }
    }

    /// Wait for the next input (or the session's timer) and hand it to
    /// the session. Cancel-safe: nothing is taken until it is handled.
    async fn take_input(&mut self) {
        let deadline = self
            .session
            .poll_timeout()
            .and_then(|t| self.t0.checked_add(Duration::from_nanos(t)));
        let input = tokio::select! {
            i = self.rx.recv() => i,
            () = sleep_until(deadline) => None,
        };
        let now = self.now();
        match input {
            Some(i) => self.input(now, i),
            None => self.session.handle(now, Event::Tick),
        }
    }

    /// Run `work` (the driver's own step, e.g. a blocking task's handle)
    /// while the session goes on: what arrives meanwhile is handled as
    /// [`Link::next`] would (a committed point updates the status and
    /// answers `sync` at once) and its notes wait for the next
    /// [`Link::next`]. Measured: after an initial copy the tracker's
    /// finish took 10–357 ms on a loaded host, during which the copy's
    /// `PointAck`, already arrived, waited unread.
    pub(super) async fn drive_while<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            self.flush();
            if self.failed.is_some() || self.closed.is_some() {
                return work.await;
            }
            tokio::select! {
                out = &mut work => return out,
                () = self.take_input() => {}
            }
        }
    }

    /// [`crate::util::phase::step`] of the VM (a probe has none).
    fn step(&self, step: &'static str) {
        if let Some(vm) = &self.vm {
            crate::util::phase::step(step, &vm.spec.vm);
        }
    }

    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn input(&mut self, now: u64, i: Input) {
        match i {
            Input::Data(stream, chunk) => self.session.handle(
                now,
                Event::Data {
                    stream,
                    bytes: &chunk.bytes,
                },
            ),
            Input::Finished(stream) => self.session.handle(now, Event::Finished(stream)),
            Input::Reset(stream) => {
                self.writers.remove(&stream);
                self.session.handle(now, Event::Reset(stream))
            }
            Input::Lost(e) => {
                self.lost.get_or_insert(e);
                self.session.handle(now, Event::ConnectionLost)
            }
            Input::Read { id, result, permit } => {
                if let Some(t) = self.read_asked.remove(&id) {
                    crate::util::phase::done("ship_read_turn", "link", t);
                }
                if let (Some((class, stream)), Ok(d)) = (self.reads.remove(&id), &result) {
                    if class == Class::Bulk && d.end {
                        self.step("copy_read_end");
                    }
                    self.carry = Some(Carry {
                        stream,
                        class,
                        raw: d.data.len() as u64,
                        permit,
                    });
                }
                self.session.complete_read(now, id, result);
                self.ship_later = std::mem::take(&mut self.ship_later)
                    .into_iter()
                    .filter_map(|l| Arc::try_unwrap(l).map(SealedLog::mark_shipped).err())
                    .collect();
            }
        }
    }

    /// Perform every output of the session.
    fn flush(&mut self) {
        while let Some(o) = self.session.poll() {
            match o {
                Output::Send { stream, bytes } => {
                    let (shape, permit) = match self.carry.take() {
                        Some(c) if c.stream == stream && c.raw > 0 => {
                            (Some(self.count(&c, bytes.len() as u64)), c.permit)
                        }
                        other => {
                            self.carry = other;
                            (None, None)
                        }
                    };
                    let w = self.writer(stream);
                    let _ = w.tx.send(Write::Bytes {
                        bytes,
                        shape,
                        permit,
                    });
                }
                Output::Finish(stream) => self.to_writer(stream, Write::End(StreamEnd::Finish)),
                Output::Reset(stream) => {
                    self.to_writer(stream, Write::End(StreamEnd::Reset));
                    self.writers.remove(&stream);
                }
                Output::Close(e) => {
                    if self.lost.is_none() {
                        tracing::warn!(addr = %self.addr, "closing the session: {e}");
                        self.end(1, b"protocol error");
                    }
                    self.closed = Some(e);
                }
                Output::Action(a) => self.action(a),
                Output::Spent {
                    disk_id,
                    cycle,
                    buf,
                } => {
                    if let Some((Source::Copy(_, pool), _)) = self.sources.get(&(disk_id, cycle)) {
                        pool.give(buf);
                    }
                }
            }
        }
        self.carry = None;
    }

    /// The caps to wait for before a chunk's frame of `frame` bytes, and
    /// its progress: a log's bytes as read; a copy's payload (at least 64
    /// bytes, so runs of zeros are not free).
    fn count(&mut self, c: &Carry, frame: u64) -> (Class, u64) {
        match c.class {
            Class::Delta => (Class::Delta, c.raw),
            Class::Bulk => {
                if let (Some(vm), Some(p)) = (&self.vm, self.copy.as_mut()) {
                    if p.sent == 0 {
                        crate::util::phase::step("copy_first_chunk", &vm.spec.vm);
                    }
                    p.sent += frame;
                    p.done += c.raw;
                    let mut s = vm.status.lock();
                    s.initial_done += c.raw;
                    s.bytes_sent += frame;
                    s.throughput_bps = p.sent as f64 / p.t0.elapsed().as_secs_f64().max(1e-6);
                    if p.last_log.elapsed() >= Duration::from_secs(5) {
                        p.last_log = Instant::now();
                        // ETA from disk bytes covered (zeros and lz4 make
                        // the wire rate a poor guide).
                        let rate = p.done as f64 / p.t0.elapsed().as_secs_f64().max(1e-6);
                        let eta = if rate > 0.0 {
                            format!(
                                "{:.0}s",
                                s.initial_total.saturating_sub(s.initial_done) as f64 / rate
                            )
                        } else {
                            "?".into()
                        };
                        tracing::info!(
                            vm = %vm.spec.vm,
                            "initial copy: {} of {} MiB ({:.0}%), {:.1} MiB/s on the wire, ETA {eta}",
                            s.initial_done >> 20,
                            s.initial_total >> 20,
                            100.0 * s.initial_done as f64 / s.initial_total.max(1) as f64,
                            s.throughput_bps / 1048576.0
                        );
                    }
                }
                (Class::Bulk, frame.max(64))
            }
        }
    }

    fn writer(&mut self, stream: StreamId) -> &Writer {
        self.writers.entry(stream).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let mux = self.part.as_ref().map(|p| MuxStream {
                header: StreamHeader { tag: p.tag },
                written: p.written.clone(),
                all: p.mux.written.clone(),
            });
            tokio::spawn(write_stream(
                self.conn.clone(),
                mux,
                stream,
                rx,
                self.shaper.clone(),
                self.tx.clone(),
            ));
            Writer {
                tx,
                budget: Arc::new(Semaphore::new(STREAM_BUDGET)),
            }
        })
    }

    fn to_writer(&self, stream: StreamId, w: Write) {
        if let Some(wr) = self.writers.get(&stream) {
            let _ = wr.tx.send(w);
        }
    }

    fn action(&mut self, a: SenderAction) {
        match a {
            SenderAction::Read {
                id,
                stream,
                what,
                offset,
                max,
            } => self.read(id, stream, what, offset, max),
            SenderAction::LogDurable { disk_id, cycle } => {
                if let Some(t) = self.marks.get_mut(&(disk_id, cycle)) {
                    if let Some(first) = t.first_read {
                        crate::util::phase::done("ship_send_store", &t.who, first);
                    }
                    t.durable = Some(Instant::now());
                }
                // Sent: the log is durable at the receiver (the point may
                // be committed before it is applied there).
                if let (Some((Source::Log(log), since)), Some(vm)) =
                    (self.sources.get(&(disk_id, cycle)), &self.vm)
                {
                    let len = log.len();
                    let mut s = vm.status.lock();
                    s.bytes_sent += len;
                    s.throughput_bps = len as f64 / since.elapsed().as_secs_f64().max(1e-6);
                }
                // The driver counts it delivered (no longer pending).
                self.notes
                    .push_back(SenderAction::LogDurable { disk_id, cycle });
            }
            SenderAction::LogApplied { disk_id, cycle } => {
                if let Some((Source::Log(log), since)) = self.sources.remove(&(disk_id, cycle)) {
                    crate::util::phase::done("ship", log.disk(), since);
                    if let Some(at) = self.marks.remove(&(disk_id, cycle)).and_then(|t| t.durable) {
                        crate::util::phase::done("ship_apply", log.disk(), at);
                    }
                    self.applied_at.insert(cycle, Instant::now());
                    if let Err(log) = Arc::try_unwrap(log).map(SealedLog::mark_shipped) {
                        self.ship_later.push(log);
                    }
                }
                self.notes
                    .push_back(SenderAction::LogApplied { disk_id, cycle });
            }
            SenderAction::InitialApplied { disk_id, cycle } => {
                self.step("copy_acked");
                self.sources.remove(&(disk_id, cycle));
                self.copy = None;
                self.notes
                    .push_back(SenderAction::InitialApplied { disk_id, cycle });
            }
            SenderAction::JobFailed { job, error, rest } => {
                self.marks.clear();
                self.sources.remove(&(job.disk_id(), job.cycle()));
                for j in &rest {
                    self.sources.remove(&(j.disk_id(), j.cycle()));
                }
                self.notes
                    .push_back(SenderAction::JobFailed { job, error, rest });
            }
            SenderAction::PointCommitted {
                cycle,
                app_consistent,
            } => {
                self.committed(cycle, app_consistent);
                // Also a note: a caller may wait for the session to idle.
                self.notes.push_back(SenderAction::PointCommitted {
                    cycle,
                    app_consistent,
                });
            }
            SenderAction::PointFailed { cycle, error } => {
                let e = self
                    .error(&error)
                    .context(format!("recovery point {cycle}"));
                self.failed.get_or_insert(e);
            }
            other => self.notes.push_back(other),
        }
    }

    /// The receiver committed the point of `cycle`: the status says so and
    /// `vdrep sync` callers waiting for it are answered.
    fn committed(&mut self, cycle: u64, app_consistent: bool) {
        let Some(vm) = &self.vm else { return };
        if let Some(at) = self.applied_at.get(&cycle) {
            crate::util::phase::done("commit", &vm.spec.vm, *at);
        }
        self.applied_at.retain(|c, _| *c > cycle);
        if let Some(cut) = self.cut_ns.get(&cycle) {
            let age = now_ns().saturating_sub(*cut) as f64 / 1e6;
            crate::util::phase::took("point_age", &vm.spec.vm, age);
        }
        {
            let mut s = vm.status.lock();
            // A point committed over this session: an interruption that
            // made the VM `Warning` is over (before, it stayed `Warning`
            // until the session had shipped all it had pending, after the
            // `vdrep sync` it answered here had returned).
            if s.state == VmState::Warning {
                s.state = VmState::Normal;
                s.last_error = None;
            }
            s.last_point = Some(cycle);
            s.points_committed += 1;
            s.last_point_unix_ns = Some(self.cut_ns.get(&cycle).copied().unwrap_or_else(now_ns));
            if app_consistent {
                s.last_app_point = Some(cycle);
                s.last_app_point_unix_ns = s.last_point_unix_ns;
            }
        }
        self.cut_ns.retain(|c, _| *c > cycle);
        let mut w = vm.waiters.lock();
        let mut keep = Vec::new();
        for (want, tx) in w.drain(..) {
            if cycle >= want {
                let _ = tx.send(Ok(cycle));
            } else {
                keep.push((want, tx));
            }
        }
        *w = keep;
        tracing::info!(vm = %vm.spec.vm, cycle, "recovery point committed at the receiver");
        crate::util::phase::step("point_acked", &vm.spec.vm);
    }

    /// Serve a read of the session on a blocking thread, once the stream
    /// has room for it.
    fn read(&mut self, id: ReadId, stream: StreamId, what: ReadWhat, offset: u64, max: usize) {
        let (key, class) = match what {
            ReadWhat::Log { disk_id, cycle } => ((disk_id, cycle), Class::Delta),
            ReadWhat::Initial { disk_id, cycle } => ((disk_id, cycle), Class::Bulk),
        };
        self.reads.insert(id, (class, stream));
        if crate::util::phase::enabled() {
            self.read_asked.insert(id, Instant::now());
        }
        if let (Some((Source::Log(log), since)), true) =
            (self.sources.get(&key), crate::util::phase::enabled())
        {
            let t = self.marks.entry(key).or_insert_with(|| ShipMarks {
                who: log.disk().to_string(),
                first_read: None,
                durable: None,
            });
            if t.first_read.is_none() {
                crate::util::phase::done("ship_queue", &t.who, *since);
                t.first_read = Some(Instant::now());
            }
        }
        let budget = self.writers.get(&stream).map(|w| w.budget.clone());
        let src = self.sources.get(&key).map(|(s, _)| s.clone());
        let to = self.tx.clone();
        tokio::spawn(async move {
            let want = max.min(STREAM_BUDGET) as u32;
            let permit = match budget {
                Some(b) => b.acquire_many_owned(want).await.ok(),
                None => None,
            };
            let result = match src {
                Some(Source::Log(log)) => read_log(log, offset, max).await,
                Some(Source::Copy(pieces, _)) => next_piece(&pieces, offset).await,
                None => Err(SourceError(format!(
                    "nothing to read for cycle {} of disk {}",
                    key.1,
                    crate::util::hex(&key.0)
                ))),
            };
            let _ = to.send(Input::Read { id, result, permit });
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The tasks of the connection (or of the session) end with it.
        self.end(0, b"session over");
    }
}

/// A time-line of the connection for diagnosing a link
/// (`VDREP_LOG=info,vdrep::link_stats=debug`): every 100 ms the path's
/// RTT, congestion window, losses, the UDP bytes sent so far and the
/// flow-control frames (blocked by a stream's or the connection's window).
async fn trace_stats(conn: quinn::Connection) {
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while conn.close_reason().is_none() {
        tick.tick().await;
        let s = conn.stats();
        tracing::debug!(
            target: "vdrep::link_stats",
            t_ms = t0.elapsed().as_millis() as u64,
            side = "sender",
            rtt_ms = s.path.rtt.as_secs_f64() * 1e3,
            min_rtt_ms = s.path.min_rtt.as_secs_f64() * 1e3,
            cwnd = s.path.cwnd,
            congestion_events = s.path.congestion_events,
            lost_packets = s.path.lost_packets,
            udp_tx_bytes = s.udp_tx.bytes,
            udp_rx_bytes = s.udp_rx.bytes,
            // Flow control: how often this side was blocked by the peer's
            // stream / connection windows, and the credit it was given.
            stream_data_blocked = s.frame_tx.stream_data_blocked,
            data_blocked = s.frame_tx.data_blocked,
            max_stream_data_rx = s.frame_rx.max_stream_data,
            max_data_rx = s.frame_rx.max_data,
            "link"
        );
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// `max` bytes of a sealed log at `offset` (the log is let go before the
/// answer is sent, so that it can be marked shipped then).
async fn read_log(log: Arc<SealedLog>, offset: u64, max: usize) -> Result<ReadData, SourceError> {
    let r = tokio::task::spawn_blocking(move || {
        let mut data = vec![0u8; max];
        let r = log.read_exact_at(&mut data, offset).map(|()| ReadData {
            offset,
            end: offset + max as u64 >= log.len(),
            data,
        });
        r.map_err(|e| SourceError(format!("reading {}: {e}", log.shown().display())))
    })
    .await;
    r.unwrap_or_else(|e| Err(SourceError(format!("the log reader failed: {e}"))))
}

/// The next piece of a copy (at or after `offset`).
async fn next_piece(
    pieces: &tokio::sync::Mutex<mpsc::Receiver<Piece>>,
    offset: u64,
) -> Result<ReadData, SourceError> {
    match pieces.lock().await.recv().await {
        Some(Piece::Data(offset, data)) => Ok(ReadData {
            offset,
            data,
            end: false,
        }),
        Some(Piece::End) => Ok(ReadData {
            offset,
            data: Vec::new(),
            end: true,
        }),
        Some(Piece::Failed(e)) => Err(SourceError(e)),
        None => Err(SourceError("the disk reader stopped".into())),
    }
}

/// What a stream of a session on a shared connection starts with, and
/// where its bytes are counted.
struct MuxStream {
    header: StreamHeader,
    written: Arc<AtomicU64>,
    all: Arc<AtomicU64>,
}

/// Open the stream (on a shared connection: write its session's header
/// first), start its reader, and write what the session sends, in order,
/// within the caps. A session that ends without ending the stream resets
/// it.
async fn write_stream(
    conn: quinn::Connection,
    mux: Option<MuxStream>,
    sid: StreamId,
    mut from: mpsc::UnboundedReceiver<Write>,
    shaper: Arc<Shaper>,
    to: mpsc::UnboundedSender<Input>,
) {
    let (mut tx, rx) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            let _ = to.send(Input::Lost(e));
            return;
        }
    };
    if let Some(m) = &mux {
        if tx.write_all(&m.header.encode()).await.is_err() {
            let _ = to.send(Input::Reset(sid));
            return;
        }
    }
    tokio::spawn(read_stream(sid, rx, to));
    while let Some(w) = from.recv().await {
        match w {
            Write::Bytes {
                bytes,
                shape,
                permit,
            } => {
                let n = bytes.len() as u64;
                let t = Instant::now();
                // Stopped by the receiver: its answer says why.
                if !shaped_write(&mut tx, bytes, shape, &shaper).await {
                    return;
                }
                // quinn held the write back (its send buffer full, or a cap).
                if t.elapsed() > Duration::from_millis(1) {
                    crate::util::phase::done("ship_write_block", "link", t);
                }
                if let Some(m) = &mux {
                    m.written.fetch_add(n, Ordering::Relaxed);
                    m.all.fetch_add(n, Ordering::Relaxed);
                }
                drop(permit);
            }
            Write::End(end) => {
                end.apply(&mut tx);
                return;
            }
        }
    }
    StreamEnd::Reset.apply(&mut tx);
}

/// Write `bytes` once the caps allow (`shape`). A bulk chunk (1 MiB) goes
/// out in slices of [`BULK_SLICE`], each waiting for the link's accrued
/// credit: taken whole, a chunk put the link's bucket ~0.75 MiB into debt,
/// which every delta behind it waited out (0.7 s at 10 Mbit/s), and sat in
/// the bottleneck queue ahead of the other VMs' deltas (`SECTIONS=fleet`
/// of `scripts/bench-wan.sh`). False: the stream was stopped.
///
/// The frame's memory itself goes to quinn (`write_chunk`: slices of one
/// buffer, no copy); quinn keeps it until the peer acknowledged it.
async fn shaped_write(
    tx: &mut quinn::SendStream,
    bytes: Vec<u8>,
    shape: Option<(Class, u64)>,
    shaper: &Shaper,
) -> bool {
    let slice = bulk_slice();
    let bytes = bytes::Bytes::from(bytes);
    match shape {
        Some((Class::Bulk, n)) if slice > 0 && bytes.len() > slice => {
            let len = bytes.len();
            let mut at = 0;
            while at < len {
                let end = (at + slice).min(len);
                // The shaped count in proportion (a copy counts at least 64
                // bytes per chunk: `Link::count`).
                let share = (n * (end - at) as u64).div_ceil(len as u64);
                shaper.take(Class::Bulk, share).await;
                if tx.write_chunk(bytes.slice(at..end)).await.is_err() {
                    return false;
                }
                at = end;
            }
            true
        }
        _ => {
            if let Some((class, n)) = shape {
                shaper.take(class, n).await;
            }
            tx.write_chunk(bytes).await.is_ok()
        }
    }
}

/// The slice a bulk chunk is shaped and written in: 64 KiB, or
/// `VDREP_BULK_SLICE` bytes (`0`: the whole chunk, as before; for A/B runs).
fn bulk_slice() -> usize {
    static SLICE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SLICE.get_or_init(|| {
        std::env::var("VDREP_BULK_SLICE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(BULK_SLICE)
    })
}

/// See [`shaped_write`].
const BULK_SLICE: usize = 64 << 10;

/// Feed what the receiver sends on a stream to the driver.
async fn read_stream(sid: StreamId, mut rx: quinn::RecvStream, to: mpsc::UnboundedSender<Input>) {
    loop {
        let input = match rx.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => Input::Data(sid, chunk),
            Ok(None) => Input::Finished(sid),
            Err(quinn::ReadError::ConnectionLost(e)) => Input::Lost(e),
            Err(_) => Input::Reset(sid),
        };
        let last = !matches!(input, Input::Data(..));
        if to.send(input).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{self, Identity, TrustStore};

    #[test]
    fn pieces_are_read_into_recycled_buffers_of_the_right_length() {
        let pool = Arc::new(BufPool::default());
        let (tx, mut rx) = mpsc::channel(16);
        let mut sink = PieceSink::new(tx, pool.clone());
        // A spent buffer, stale bytes and all, is read into again: the
        // piece holds what the reader wrote, never the stale bytes.
        let stale = vec![0xAAu8; 4096];
        let at = stale.as_ptr() as usize;
        pool.give(stale);
        let b = sink.room(0, 4096).expect("room");
        assert_eq!(b.as_ptr() as usize, at);
        b.copy_from_slice(&[1u8; 4096]);
        // A shorter last piece, from a fresh buffer.
        let b = sink.room(4096, 100).expect("room");
        assert_eq!(b.len(), 100);
        b.fill(2);
        sink.end(&Ok(()), "disk");
        let mut got = Vec::new();
        while let Ok(p) = rx.try_recv() {
            got.push(match p {
                Piece::Data(off, d) => (off, d),
                Piece::End => break,
                Piece::Failed(e) => panic!("{e}"),
            });
        }
        assert_eq!(got, vec![(0, vec![1u8; 4096]), (4096, vec![2u8; 100])]);
        // The pool keeps at most KEEP buffers.
        for _ in 0..BufPool::KEEP + 5 {
            pool.give(vec![0; 8]);
        }
        assert_eq!(pool.0.lock().len(), BufPool::KEEP);
    }

    fn trusting(id: &Identity) -> TrustStore {
        let mut t = TrustStore::new();
        t.add(id.cert.clone());
        t
    }

    #[tokio::test]
    async fn a_stalled_control_stream_does_not_hold_back_the_next_sessions_end() {
        let (snd, rcv) = (
            Identity::generate("site-a").expect("identity"),
            Identity::generate("site-b").expect("identity"),
        );
        let server = transport::server("127.0.0.1:0".parse().expect("addr"), &rcv, &trusting(&snd))
            .expect("server");
        let addr = server.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.expect("an incoming connection");
            let (conn, _) = transport::accept(incoming).await.expect("accept");
            (server, conn)
        });
        let client = transport::client(&snd, &trusting(&rcv)).expect("client");
        let conn = transport::connect(&client, addr, "site-b")
            .await
            .expect("connect");
        let (_server, peer) = accept.await.expect("accept task");
        let mux = MuxConn::new(conn, crate::transport::congestion::Shares::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        mux.sessions.lock().insert(5, tx);
        let end = Control::End {
            tag: 5,
            code: 3,
            reason: "replica store full".into(),
        }
        .encode();
        // The receiver's first control stream stops after 3 bytes (its
        // next packet is late); the second ends session 5.
        let mut stalled = peer.open_uni().await.expect("uni");
        stalled.write_all(&end[..3]).await.expect("write");
        let mut whole = peer.open_uni().await.expect("uni");
        whole.write_all(&end).await.expect("write");
        whole.finish().expect("finish");
        // A bound for liveness, not a speed: without the fix the end
        // never arrives.
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
        match got {
            Ok(Some(Input::Lost(quinn::ConnectionError::ApplicationClosed(c)))) => {
                assert_eq!(c.error_code, 3u32.into());
                assert_eq!(&c.reason[..], b"replica store full");
            }
            Ok(Some(_)) => panic!("session 5 got something else than its end"),
            Ok(None) => panic!("session 5's channel closed without its end"),
            Err(_) => panic!("session 5's end was held back by the stalled control stream"),
        }
        drop(stalled);
    }
}
