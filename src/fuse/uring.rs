//! The FUSE-over-io_uring request transport (issue 12): the connection's
//! requests arrive in ring entries instead of `read(2)` on `/dev/fuse`.
//!
//! This module owns the rings, their entry buffers and the serving loops:
//! [`enable_state`] reads the kernel switch, [`register`] creates one ring
//! per serving thread and registers its entry (`FUSE_IO_URING_CMD_REGISTER`)
//! on queue `thread mod queues` (queues = possible CPUs; the kernel hands a
//! request to the queue of the submitting task's CPU), and [`Rings::serve`]
//! runs each ring on its thread: a request in the entry is decoded and run
//! by fuser's own [`fuser::Dispatcher`] (the same decoding and
//! `Filesystem` calls as the `/dev/fuse` loop), its reply is written into
//! the entry, and one `COMMIT_AND_FETCH` both answers it and waits for the
//! next one. FORGET and INTERRUPT still come through `/dev/fuse` (fuser's
//! reader threads stay).
//!
//! Several entries per ring ([`entries_per_ring`]), and the backing I/O of
//! an `O_DIRECT` READ (and WRITE as [`write_mode`] says) goes on the same
//! ring ([`submit_read`], [`submit_write`], called by the handlers in
//! `fs`): the thread sleeps
//! once in `io_uring_enter` for whichever completes first, a request or a
//! backing I/O, instead of once for the request and once in `pwrite`; the
//! completion makes the reply and commits the entry (the reply still goes
//! only after the backing I/O completed). Any other request first waits
//! for the thread's backing I/O in flight ([`drain`]): a handler may block
//! on the cut lock, which those writes hold shared until they completed.
//! A queue gets as many entries in all as the `/dev/fuse` transport has
//! threads (up to [`MAX_RINGS`] rings).
//!
//! The rings belong to the worker process: when it dies the kernel cancels
//! their commands and the requests they held are lost
//! (kernel-notes/fuse-uring.md), so a connection served this way cannot be
//! handed to a successor worker; the supervisor ends the mount instead.
//! Protocol facts: kernel-notes/fuse-uring.md.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;

/// The kernel switch (root may write it; read at each mount's INIT).
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: in/out header 128, op struct 128,
/// `fuse_uring_ent_in_out` 32.
const HDR_SZ: usize = 128 + 128 + 32;
const OP_OFF: usize = 128;
/// `fuse_uring_ent_in_out`: flags u64, commit_id u64, payload_sz u32.
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const PAGE: usize = 4096;

/// What the kernel switch says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnableState {
    On,
    Off,
    /// No such parameter: the kernel has no FUSE over io_uring.
    Missing,
}

/// Read [`ENABLE_PARAM`].
pub fn enable_state() -> EnableState {
    match std::fs::read_to_string(ENABLE_PARAM) {
        Ok(s) if s.trim().eq_ignore_ascii_case("y") || s.trim() == "1" => EnableState::On,
        Ok(_) => EnableState::Off,
        Err(_) => EnableState::Missing,
    }
}

/// Set [`ENABLE_PARAM`] (root only).
pub fn set_enabled(on: bool) -> io::Result<()> {
    std::fs::write(ENABLE_PARAM, if on { "Y" } else { "N" })
}

/// Why the rings could not be set up (the caller serves `/dev/fuse` instead).
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot create an io_uring ring: {0}")]
    Setup(#[source] io::Error),
    #[error("cannot allocate the ring entry buffers: {0}")]
    Buffers(#[source] io::Error),
    #[error("the kernel refused FUSE_IO_URING_CMD_REGISTER on queue {queue}: {source}")]
    Register {
        queue: u16,
        #[source]
        source: io::Error,
    },
}

/// The kinds of [`UringError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UringErrorKind {
    Setup,
    Buffers,
    Register,
}

impl UringError {
    pub fn kind(&self) -> UringErrorKind {
        match self {
            UringError::Setup(_) => UringErrorKind::Setup,
            UringError::Buffers(_) => UringErrorKind::Buffers,
            UringError::Register { .. } => UringErrorKind::Register,
        }
    }
}

/// One entry's memory: the header page, then the payload (page-aligned, so
/// a WRITE's data can go to an `O_DIRECT` backing file as it is). The
/// request is handed to fuser contiguous: its header and op struct are
/// copied to just before the payload (inside the header page, after the
/// kernel's 288 bytes).
struct EntryMem {
    base: *mut u8,
    len: usize,
    payload: usize,
    iov: Box<[libc::iovec; 2]>,
}

// SAFETY: the mapping is owned by this value and used by one thread at a time.
unsafe impl Send for EntryMem {}

impl EntryMem {
    fn new(payload: usize) -> io::Result<EntryMem> {
        let payload = payload.div_ceil(PAGE) * PAGE;
        let len = PAGE + payload;
        // SAFETY: anonymous private mapping; MAP_POPULATE maps every page
        // now, so the kernel's copy into it never faults.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p.cast::<u8>();
        let iov = Box::new([
            libc::iovec {
                iov_base: p,
                iov_len: HDR_SZ,
            },
            libc::iovec {
                // SAFETY: inside the mapping.
                iov_base: unsafe { base.add(PAGE) }.cast(),
                iov_len: payload,
            },
        ]);
        Ok(EntryMem {
            base,
            len,
            payload,
            iov,
        })
    }

    fn hdr(&mut self) -> &mut [u8] {
        // SAFETY: the first page is mapped and ours.
        unsafe { std::slice::from_raw_parts_mut(self.base, PAGE) }
    }
}

impl Drop for EntryMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no reference outlives self.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn rd32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_ne_bytes(a)
}

fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_ne_bytes(a)
}

/// The SQE of a ring command on `dev` for entry `e` of queue `qid`.
fn cmd_sqe(dev: i32, op: u32, qid: u16, commit_id: u64, e: &EntryMem) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; ... }
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(dev), op)
        .cmd(cmd)
        .addr(Some(e.iov.as_ptr() as u64))
        .build();
    // sqe->len (byte 24) = 2 iovecs: io-uring 0.7 has no setter for it.
    // SAFETY: Entry128 is repr(C), 128 bytes, no padding invariants; only
    // the `len` field is changed.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// One serving thread's ring with its registered entries.
struct ThreadRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    qid: u16,
    ents: Vec<EntryMem>,
    /// Completions reaped during [`register`] (requests already there):
    /// (entry, result).
    first: Vec<(usize, i32)>,
}

/// Rings registered on a connection, not serving yet.
pub struct Rings {
    dev: OwnedFd,
    rings: Vec<ThreadRing>,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("threads", &self.rings.len())
            .finish_non_exhaustive()
    }
}

/// The kernel's queues: one per possible CPU.
pub fn queues() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    // "0-1", "0", "0-3,5"
    let mut max = 0usize;
    for part in s.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or("0");
        if let Ok(n) = last.parse::<usize>() {
            max = max.max(n);
        }
    }
    max + 1
}

/// Most rings (serving threads) of one mount, whatever the CPU count.
pub const MAX_RINGS: usize = 64;

/// FUSE entries per ring (serving thread) unless `VDREP_URING_ENTRIES`
/// says otherwise. With more than one, a thread serves its entries'
/// `O_DIRECT` reads (and writes as [`write_mode`] says) asynchronously on its
/// own ring, so one wake-up reaps several requests and backing completions:
/// 4 made direct 4 KiB reads at QD16 1.1× faster (−40 % CPU per request),
/// but with synchronous backing writes a thread blocked in `pwrite` holds
/// requests in its other entries and a queue has a quarter of the threads:
/// 4 psync `O_DIRECT` writers ran at 0.49× of 1 entry (every round), 1 MiB
/// direct writes at 0.59×. So 1 (one thread per entry) is the default
/// (kernel-notes/fuse-uring.md, "Session 10, follow-up").
pub const ENTRIES_PER_RING: usize = 1;

/// Most entries per ring.
const MAX_ENTRIES_PER_RING: usize = 64;

/// [`ENTRIES_PER_RING`], or `VDREP_URING_ENTRIES` (1..=64) when set.
pub fn entries_per_ring() -> usize {
    std::env::var("VDREP_URING_ENTRIES")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|n| n.clamp(1, MAX_ENTRIES_PER_RING))
        .unwrap_or(ENTRIES_PER_RING)
}

/// How many rings [`register`] makes for a depth of `per_queue` requests
/// per queue with `entries` entries per ring: enough rings for that depth
/// on every queue, at most [`MAX_RINGS`] in all (at least one per queue).
pub fn ring_count(per_queue: usize, entries: usize) -> usize {
    let nq = queues();
    (per_queue.max(1).div_ceil(entries.max(1)) * nq).min(MAX_RINGS.max(nq))
}

/// Create [`ring_count`] rings, each with [`entries_per_ring`] entries of
/// `payload` bytes registered on queue `i mod queues()` of the connection
/// behind `dev` (its `FUSE_INIT`, with `FUSE_OVER_IO_URING`, must be
/// answered). Once every queue has an entry the kernel sends every request
/// but FORGET and INTERRUPT to the rings: a request goes to the queue of
/// the CPU its task runs on, so one process's requests (a VM's QEMU on one
/// CPU, fio) can use only that queue's entries; hence `per_queue` is the
/// depth one CPU's submitters get served at once.
pub fn register(
    dev: BorrowedFd<'_>,
    per_queue: usize,
    payload: usize,
) -> Result<Rings, UringError> {
    let nq = queues();
    let dev = dev.try_clone_to_owned().map_err(UringError::Setup)?;
    let per_ring = entries_per_ring();
    let mut rings: Vec<ThreadRing> = Vec::new();
    'rings: for i in 0..ring_count(per_queue, per_ring) {
        let qid = (i % nq) as u16;
        // Room for every entry's command and one backing I/O per entry.
        let sq = (2 * per_ring).next_power_of_two() as u32;
        let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
            IoUring::builder().build(sq).map_err(UringError::Setup)?;
        let mut ents = Vec::new();
        for e in 0..per_ring {
            let ent = EntryMem::new(payload).map_err(UringError::Buffers)?;
            let sqe = cmd_sqe(dev.as_raw_fd(), CMD_REGISTER, qid, 0, &ent).user_data(e as u64);
            // SAFETY: the iovecs and buffers live as long as the ring (both
            // in the ThreadRing; the ring is dropped first, cancelling the
            // commands).
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| UringError::Setup(io::Error::from_raw_os_error(libc::EBUSY)))?;
            ents.push(ent);
        }
        ring.submit()
            .map_err(|source| UringError::Register { queue: qid, source })?;
        // A refused REGISTER completes at once; an accepted one completes
        // only with the first request (kept for the serving loop).
        let mut first = Vec::new();
        for c in ring.completion() {
            if c.result() < 0 {
                let e = UringError::Register {
                    queue: qid,
                    source: io::Error::from_raw_os_error(-c.result()),
                };
                if rings.len() >= nq {
                    // Every queue has an entry: the kernel sends to the
                    // rings already; serve with those.
                    tracing::warn!(
                        "FUSE over io_uring: {e}; serving with {} rings",
                        rings.len()
                    );
                    break 'rings;
                }
                return Err(e);
            }
            first.push((c.user_data() as usize, c.result()));
        }
        rings.push(ThreadRing {
            ring,
            qid,
            ents,
            first,
        });
    }
    Ok(Rings { dev, rings })
}

/// A reply made by fuser during [`fuser::Dispatcher::dispatch`] or by a
/// backing I/O's completion, kept until the request's bytes (which alias
/// the entry's payload) are released.
#[derive(Default)]
struct Captured(Mutex<Option<Vec<u8>>>);

impl fuser::ReplySink for Captured {
    fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let mut v = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in bufs {
            v.extend_from_slice(b);
        }
        *self.0.lock() = Some(v);
        Ok(())
    }
}

impl Rings {
    /// Number of serving threads (rings).
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// Whether there is no ring.
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }

    /// Serve every ring on a thread of its own until the connection ends;
    /// returns when all have.
    pub fn serve<FS: fuser::Filesystem>(self, d: fuser::Dispatcher<FS>) -> io::Result<()> {
        let Rings { dev, rings } = self;
        let dev = Arc::new(dev);
        let mut threads = Vec::new();
        for (i, r) in rings.into_iter().enumerate() {
            let d = d.clone();
            let dev = dev.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fuse-ring-{i}"))
                    .spawn(move || serve_ring(r, dev.as_raw_fd(), d))?,
            );
        }
        drop(d);
        let mut res = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => res = Err(e),
                Err(_) => res = Err(io::Error::other("a FUSE ring thread panicked")),
            }
        }
        res
    }
}

/// Restrict the calling thread to `cpu` (EINVAL when that CPU is offline
/// or outside the process's cpuset).
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// The connection is gone (unmounted or aborted): the ring's end.
fn connection_over(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV
    )
}

/// `user_data` of a backing I/O's SQE: this bit plus its slot in
/// [`Local::ops`]; an entry's command carries the entry's index.
const OP_BIT: u64 = 1 << 63;

/// What runs when a backing write completes: its result and the request's
/// data (still in the entry).
pub type WriteDone = Box<dyn FnOnce(io::Result<usize>, &[u8])>;
/// What runs when a backing read completes: its result (bytes read) and the
/// entry's payload the data was read into (as long as the request asked).
pub type ReadDone = Box<dyn FnOnce(io::Result<usize>, &mut [u8])>;

enum Done {
    Write(WriteDone),
    Read(ReadDone),
}

/// A backing I/O in flight for an entry.
struct Op {
    entry: usize,
    /// The request's data (write) or the payload's part read into (read).
    off_in_payload: usize,
    len: usize,
    done: Done,
}

/// One entry of the serving thread's ring.
struct Ent {
    mem: EntryMem,
    sink: Arc<Captured>,
    dyn_sink: Arc<dyn fuser::ReplySink>,
    /// Backing I/O of its request still in flight.
    waiting: usize,
    /// Its command is still registered (not ended by the connection's end).
    live: bool,
}

/// A ring thread's state, reachable from the request handlers it runs
/// ([`submit_write`], [`submit_read`], [`drain`]); never borrowed while a
/// handler or a completion runs.
struct Local {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    qid: u16,
    dev: i32,
    ents: Vec<Ent>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    in_flight: usize,
    /// Requests arrived (entry, CQE result), not served yet.
    ready: std::collections::VecDeque<(usize, i32)>,
    /// The entry whose request is being dispatched.
    current: Option<usize>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Local>> = const { std::cell::RefCell::new(None) };
}

impl Local {
    /// Queue `sqe`, submitting what is queued when the SQ is full.
    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        loop {
            // SAFETY: every SQE pushed refers to an entry's buffers or a
            // request's data in them, which live as long as the ring; a
            // backing I/O's descriptor is kept open by its completion.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn add_op(&mut self, op: Op) -> usize {
        self.in_flight += 1;
        self.ents[op.entry].waiting += 1;
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// The entry's request is answered: its reply into the entry, and one
    /// COMMIT_AND_FETCH that hands it to the kernel and waits for the next.
    fn commit(&mut self, idx: usize) -> io::Result<()> {
        let e = &mut self.ents[idx];
        let unique = rd64(e.mem.hdr(), 8);
        let reply = match e.sink.0.lock().take() {
            Some(r) if r.len() >= OUT_HEADER => r,
            _ => fail_reply(unique, libc::EIO),
        };
        let commit_id = rd64(e.mem.hdr(), ENT_COMMIT_ID);
        // The out header in the header area, every out-arg in the payload
        // with its length in ent_in_out.payload_sz.
        let body = reply.len().saturating_sub(OUT_HEADER).min(e.mem.payload);
        let hdr = e.mem.hdr();
        hdr[..OUT_HEADER].copy_from_slice(&reply[..OUT_HEADER]);
        hdr[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&(body as u32).to_ne_bytes());
        if body > 0 {
            // SAFETY: the payload holds `payload` bytes and no reference
            // into it is live (the request ended with its reply).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    reply[OUT_HEADER..].as_ptr(),
                    e.mem.base.add(PAGE),
                    body,
                )
            };
        }
        let sqe = cmd_sqe(self.dev, CMD_COMMIT_AND_FETCH, self.qid, commit_id, &e.mem)
            .user_data(idx as u64);
        self.push(&sqe)
    }
}

/// Take the thread's ring state for a moment (`None` off a ring thread or
/// while it is taken).
fn with_local<T>(f: impl FnOnce(&mut Local) -> T) -> Option<T> {
    LOCAL.with(|l| l.try_borrow_mut().ok()?.as_mut().map(f))
}

/// Where a ring thread does the backing `O_DIRECT` write of a WRITE request
/// (reads always go on the ring): `VDREP_URING_ASYNC_WRITES` = `1`
/// ([`WriteMode::Ring`]), `auto` ([`WriteMode::Adaptive`]), anything else
/// or unset [`WriteMode::Sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `pwrite` on the thread. The default: on ext4 an asynchronous direct
    /// write completes through a kernel worker (`iomap_dio_complete_work`
    /// on the file system's `dio` workqueue: one more wake-up per write)
    /// where a synchronous `pwrite` completes in the waiting thread;
    /// measured 2026-12-03 natively (4 writers at QD1: io_uring/libaio
    /// 15-24 k IOPS, psync 32-46 k) and through the ring (no io-wq punt at
    /// all on a fully written disk, and still no faster than synchronous
    /// writes). Only writes into holes (sparse images) go to io-wq.
    /// kernel-notes/fuse-uring.md, session 11.
    Sync,
    /// Every write on the thread's ring ([`submit_write`]).
    Ring,
    /// On the ring only while the thread has company ([`has_company`]),
    /// `pwrite` on the thread otherwise: a lone request keeps the
    /// synchronous write's latency, requests at depth overlap their writes.
    /// Opt-in: with 4 entries per ring it kept the gain at depth (4 KiB
    /// direct QD16 reads 1.85×, writes 1.48× of the defaults) but 4 psync
    /// direct writers ran at 0.59× (78 % of their writes had company)
    /// and 1 MiB writes at 0.8× (kernel-notes/fuse-uring.md, session 11
    /// follow-up).
    Adaptive,
}

/// The [`WriteMode`] of this process (`VDREP_URING_ASYNC_WRITES`, read once).
pub fn write_mode() -> WriteMode {
    static MODE: std::sync::OnceLock<WriteMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        match std::env::var("VDREP_URING_ASYNC_WRITES")
            .unwrap_or_default()
            .trim()
        {
            "1" => WriteMode::Ring,
            "auto" => WriteMode::Adaptive,
            _ => WriteMode::Sync,
        }
    })
}

/// Whether the backing write of the WRITE request being dispatched on this
/// ring thread goes on its ring ([`submit_write`]) rather than `pwrite`
/// here: never off a ring thread or with [`WriteMode::Sync`], always with
/// [`WriteMode::Ring`], and with [`WriteMode::Adaptive`] when
/// [`has_company`].
pub fn write_on_ring() -> bool {
    match write_mode() {
        WriteMode::Sync => false,
        WriteMode::Ring => async_io(),
        WriteMode::Adaptive => async_io() && has_company(),
    }
}

/// Whether this ring thread has other work than the request it is
/// dispatching, seen without a system call: a backing I/O of its own in
/// flight, a request already reaped and waiting to be served, or a
/// completion (a request or a backing I/O) posted in its CQ ring and not
/// reaped yet. Then a `pwrite` here would hold that work for the write's
/// whole latency, so the write goes on the ring and the thread goes on to
/// it; with nothing else to do (a lone request, queue depth 1) a `pwrite`
/// is the faster way to the reply (no completion through a kernel worker,
/// no second wake-up). A request that arrives during such a `pwrite` waits
/// for it, as with [`WriteMode::Sync`]. Off a ring thread: false.
pub fn has_company() -> bool {
    with_local(|l| l.in_flight > 0 || !l.ready.is_empty() || !l.ring.completion().is_empty())
        .unwrap_or(false)
}

/// Whether this thread is a ring thread dispatching a request: then its
/// O_DIRECT backing I/O can go through [`submit_write`] / [`submit_read`].
pub fn async_io() -> bool {
    with_local(|l| l.current.is_some()).unwrap_or(false)
}

/// Submit the backing write of the request being dispatched on this ring
/// thread: `data` (which must be the request's data, in the entry's
/// payload) to `fd` at `offset`, on the thread's own ring. The reply is
/// left to `done`, which runs on this thread once the write completed;
/// the entry is answered after it. `Err(done)` (not a ring thread, or
/// `data` is not in the entry): nothing was submitted. A write ext4
/// cannot start without blocking (into a hole of a sparse image) is done
/// by an io-wq worker: measured cheaper than refusing it (`RWF_NOWAIT`)
/// and writing it on this thread, which meanwhile holds the requests of
/// its other entries (kernel-notes/fuse-uring.md, session 11).
pub fn submit_write(fd: i32, data: &[u8], offset: u64, done: WriteDone) -> Result<(), WriteDone> {
    let r = with_local(|l| {
        let idx = l.current?;
        let (base, cap) = (
            l.ents[idx].mem.base as usize + PAGE,
            l.ents[idx].mem.payload,
        );
        let p = data.as_ptr() as usize;
        if data.is_empty() || p < base || p + data.len() > base + cap {
            return None;
        }
        Some((idx, p - base))
    })
    .flatten();
    let Some((idx, off)) = r else {
        return Err(done);
    };
    let sqe = opcode::Write::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
        .offset(offset)
        .build();
    let op = Op {
        entry: idx,
        off_in_payload: off,
        len: data.len(),
        done: Done::Write(done),
    };
    match submit_op(op, sqe.into()) {
        Ok(()) => Ok(()),
        Err(Done::Write(w)) => Err(w),
        // submit_op hands back the `done` it was given.
        Err(Done::Read(_)) => Ok(()),
    }
}

/// Submit the backing read of the request being dispatched on this ring
/// thread: `len` bytes of `fd` at `offset` into the entry's payload (page
/// aligned: fit for `O_DIRECT`). `done` runs on this thread once the read
/// completed and makes the reply. `Err(done)`: nothing was submitted.
pub fn submit_read(fd: i32, len: usize, offset: u64, done: ReadDone) -> Result<(), ReadDone> {
    let r = with_local(|l| {
        let idx = l.current?;
        if len == 0 || len > l.ents[idx].mem.payload {
            return None;
        }
        // SAFETY: inside the entry's mapping.
        Some((idx, unsafe { l.ents[idx].mem.base.add(PAGE) }))
    })
    .flatten();
    let Some((idx, buf)) = r else {
        return Err(done);
    };
    let sqe = opcode::Read::new(types::Fd(fd), buf, len as u32)
        .offset(offset)
        .build();
    let op = Op {
        entry: idx,
        off_in_payload: 0,
        len,
        done: Done::Read(done),
    };
    match submit_op(op, sqe.into()) {
        Ok(()) => Ok(()),
        Err(Done::Read(r)) => Err(r),
        // submit_op hands back the `done` it was given.
        Err(Done::Write(_)) => Ok(()),
    }
}

/// Queue `op` with its SQE on this thread's ring; `Err` hands its `done`
/// back when nothing was queued.
fn submit_op(op: Op, sqe: squeue::Entry128) -> Result<(), Done> {
    let mut op = Some(op);
    let r = with_local(|l| -> Result<(), Done> {
        let Some(o) = op.take() else { return Ok(()) };
        let slot = l.add_op(o);
        let sqe = sqe.user_data(OP_BIT | slot as u64);
        match l.push(&sqe) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(
                    "FUSE ring on queue {}: cannot queue a backing I/O ({e}); served synchronously",
                    l.qid
                );
                l.free_ops.push(slot);
                l.in_flight -= 1;
                match l.ops[slot].take() {
                    Some(o) => {
                        l.ents[o.entry].waiting -= 1;
                        Err(o.done)
                    }
                    None => Ok(()),
                }
            }
        }
    });
    match (r, op) {
        (Some(r), _) => r,
        (None, Some(o)) => Err(o.done),
        (None, None) => Ok(()),
    }
}

/// On a ring thread: wait until every backing I/O this thread submitted has
/// completed and its request is answered. A handler calls this before it
/// blocks on something a cut may hold (the cut lock): the writes in flight
/// hold it shared, and only this thread completes them. Elsewhere: nothing.
pub fn drain() {
    loop {
        let r = with_local(|l| {
            if l.in_flight == 0 {
                return Ok(false);
            }
            wait(l).map(|()| true)
        });
        match r {
            Some(Ok(true)) => {
                if let Err(e) = reap() {
                    tracing::error!("FUSE ring: completing backing I/O: {e}");
                    return;
                }
            }
            Some(Ok(false)) | None => return,
            Some(Err(e)) => {
                tracing::error!("FUSE ring: waiting for backing I/O: {e}");
                return;
            }
        }
    }
}

/// Submit what is queued and wait for at least one completion.
fn wait(l: &mut Local) -> io::Result<()> {
    loop {
        match l.ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                if !l.ring.completion().is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Take every completion: requests go to `ready`, backing I/O completions
/// run their `done` (outside the borrow) and answer their entry when it
/// has nothing more in flight (not the entry being dispatched: its
/// dispatch answers it).
fn reap() -> io::Result<()> {
    let cqes: Vec<(u64, i32)> = with_local(|l| {
        let v: Vec<(u64, i32)> = l
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        v
    })
    .unwrap_or_default();
    for (ud, res) in cqes {
        if ud & OP_BIT == 0 {
            with_local(|l| l.ready.push_back((ud as usize, res)));
            continue;
        }
        let slot = (ud & !OP_BIT) as usize;
        let taken = with_local(|l| {
            let o = l.ops.get_mut(slot)?.take()?;
            l.free_ops.push(slot);
            let base = l.ents[o.entry].mem.base;
            Some((o, base))
        })
        .flatten();
        let Some((o, base)) = taken else { continue };
        let r = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        };
        // SAFETY: the request's data / the read's buffer, inside the
        // entry's payload, which nothing else refers to until the entry is
        // committed (after this).
        let buf =
            unsafe { std::slice::from_raw_parts_mut(base.add(PAGE + o.off_in_payload), o.len) };
        match o.done {
            Done::Write(f) => f(r, buf),
            Done::Read(f) => f(r, buf),
        }
        let commit = with_local(|l| {
            l.in_flight -= 1;
            let e = &mut l.ents[o.entry];
            e.waiting -= 1;
            if e.waiting == 0 && l.current != Some(o.entry) {
                l.commit(o.entry)
            } else {
                Ok(())
            }
        });
        if let Some(Err(e)) = commit {
            return Err(e);
        }
    }
    Ok(())
}

fn fail_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut v = vec![0u8; OUT_HEADER];
    v[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    v[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    v[8..16].copy_from_slice(&unique.to_ne_bytes());
    v
}

/// FUSE opcodes whose handlers may submit their backing I/O to the ring
/// (every other request first waits for the thread's I/O in flight).
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;

fn serve_ring<FS: fuser::Filesystem>(
    r: ThreadRing,
    dev: i32,
    d: fuser::Dispatcher<FS>,
) -> io::Result<()> {
    // Run on the CPU whose queue this ring serves: the kernel queues a
    // request on the submitting task's CPU, so the wake-up of this thread
    // and, after COMMIT_AND_FETCH, of the waiting task stay on that CPU
    // (no cross-CPU wake-up per request; kernel-notes/writepath.md).
    if let Err(e) = pin_to_cpu(usize::from(r.qid)) {
        tracing::debug!(
            "FUSE ring on queue {}: not pinned to CPU {} ({e}); it runs on any CPU",
            r.qid,
            r.qid
        );
    }
    let ThreadRing {
        ring,
        qid,
        ents,
        first,
    } = r;
    let ents = ents
        .into_iter()
        .map(|mem| {
            let sink = Arc::new(Captured::default());
            let dyn_sink: Arc<dyn fuser::ReplySink> = sink.clone();
            Ent {
                mem,
                sink,
                dyn_sink,
                waiting: 0,
                live: true,
            }
        })
        .collect();
    LOCAL.with(|l| {
        *l.borrow_mut() = Some(Local {
            ring,
            qid,
            dev,
            ents,
            ops: Vec::new(),
            free_ops: Vec::new(),
            in_flight: 0,
            ready: first.into_iter().collect(),
            current: None,
        })
    });
    let res = serve_loop(&d);
    // Wait for the backing I/O still in flight (its buffers and the write's
    // cut-lock share), then drop the ring (cancelling its commands).
    drain();
    LOCAL.with(|l| l.borrow_mut().take());
    res
}

fn serve_loop<FS: fuser::Filesystem>(d: &fuser::Dispatcher<FS>) -> io::Result<()> {
    loop {
        while let Some((idx, res)) = with_local(|l| l.ready.pop_front()).flatten() {
            if res < 0 {
                let qid = with_local(|l| {
                    if let Some(e) = l.ents.get_mut(idx) {
                        e.live = false;
                    }
                    l.qid
                })
                .unwrap_or(0);
                if connection_over(-res) {
                    continue;
                }
                let e = io::Error::from_raw_os_error(-res);
                tracing::error!(
                    "FUSE ring on queue {qid}: the entry failed ({e}); this thread stops serving"
                );
                return Err(e);
            }
            serve_request(idx, d)?;
        }
        let done =
            with_local(|l| l.in_flight == 0 && l.ents.iter().all(|e| !e.live)).unwrap_or(true);
        if done {
            return Ok(());
        }
        if let Some(Err(e)) = with_local(wait) {
            let qid = with_local(|l| l.qid).unwrap_or(0);
            tracing::error!("FUSE ring on queue {qid}: io_uring_enter: {e}");
            return Err(e);
        }
        reap()?;
    }
}

/// Serve the request in entry `idx`: dispatch it (with the thread's state
/// free for the handler), then answer it unless its backing I/O is in
/// flight (its completion answers it).
fn serve_request<FS: fuser::Filesystem>(idx: usize, d: &fuser::Dispatcher<FS>) -> io::Result<()> {
    let opcode = with_local(|l| rd32(l.ents[idx].mem.hdr(), 4)).unwrap_or(0);
    if opcode != FUSE_READ && opcode != FUSE_WRITE {
        // Its handler may block on the cut lock, which this thread's
        // writes in flight hold shared.
        drain();
    }
    let Some((mem, sink, dyn_sink)) = with_local(|l| {
        l.current = Some(idx);
        let e = &l.ents[idx];
        (
            EntryRef {
                base: e.mem.base,
                payload: e.mem.payload,
            },
            e.sink.clone(),
            e.dyn_sink.clone(),
        )
    }) else {
        return Err(io::Error::other("FUSE ring: the thread's state is gone"));
    };
    serve_entry(&mem, d, &dyn_sink, &sink);
    with_local(|l| {
        l.current = None;
        if l.ents[idx].waiting > 0 {
            return Ok(());
        }
        // Not decodable, or nothing answered it: commit answers EIO.
        l.commit(idx)
    })
    .unwrap_or_else(|| Err(io::Error::other("FUSE ring: the thread's state is gone")))
}

/// An entry's mapping, for [`serve_entry`] without the thread's state.
struct EntryRef {
    base: *mut u8,
    payload: usize,
}

/// Run the request in the entry through fuser, its reply (if made during
/// the dispatch) going to the entry's sink; returns the request's `unique`
/// (the caller answers `EIO` when nothing answered it, so the entry goes
/// on).
fn serve_entry<FS: fuser::Filesystem>(
    e: &EntryRef,
    d: &fuser::Dispatcher<FS>,
    dyn_sink: &Arc<dyn fuser::ReplySink>,
    sink: &Captured,
) -> u64 {
    let cap = e.payload;
    let base = e.base;
    // SAFETY: the first page is mapped and belongs to this entry; nothing
    // else refers to it while its request is dispatched.
    let hdr = unsafe { std::slice::from_raw_parts_mut(base, PAGE) };
    let unique = rd64(hdr, 8);
    let len = rd32(hdr, 0) as usize;
    let payload_sz = rd32(hdr, ENT_PAYLOAD_SZ) as usize;
    let op_sz = len.wrapping_sub(IN_HEADER).wrapping_sub(payload_sz);
    *sink.0.lock() = None;
    if len < IN_HEADER || op_sz > 128 || payload_sz > cap {
        tracing::error!(
            "FUSE ring: a request of {len} bytes with {payload_sz} bytes of payload cannot be decoded: answered EIO"
        );
        return unique;
    }
    // Contiguous request: in header and op struct just before the payload.
    let start = PAGE - IN_HEADER - op_sz;
    hdr.copy_within(0..IN_HEADER, start);
    hdr.copy_within(OP_OFF..OP_OFF + op_sz, start + IN_HEADER);
    // SAFETY: [start, PAGE + payload_sz) is inside the mapping; nothing
    // writes to it until the entry is committed.
    let req =
        unsafe { std::slice::from_raw_parts(base.add(start), IN_HEADER + op_sz + payload_sz) };
    match d.dispatch(req, dyn_sink.clone()) {
        fuser::Dispatched::Served | fuser::Dispatched::Destroy => {}
        fuser::Dispatched::Invalid => {
            tracing::error!("FUSE ring: fuser could not decode a request: answered EIO");
        }
    }
    unique
}
