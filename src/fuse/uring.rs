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
//! next one (one `io_uring_enter` per request). FORGET and INTERRUPT still
//! come through `/dev/fuse` (fuser's reader threads stay).
//!
//! One entry per thread: vdrep's handlers block on the backing file, so a
//! thread serves one request at a time and the depth the kernel can use on
//! a queue is that queue's thread count; every queue gets as many threads
//! as the `/dev/fuse` transport has in all (up to [`MAX_RINGS`] rings).
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

/// One serving thread's ring with its registered entry.
struct ThreadRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    qid: u16,
    ent: EntryMem,
    /// A completion reaped during [`register`] (a request already there).
    first: Option<i32>,
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

/// How many rings [`register`] makes for `per_queue` threads per queue:
/// `per_queue` on every queue, at most [`MAX_RINGS`] in all (at least one
/// per queue).
pub fn ring_count(per_queue: usize) -> usize {
    let nq = queues();
    (per_queue.max(1) * nq).min(MAX_RINGS.max(nq))
}

/// Create [`ring_count`]`(per_queue)` rings, each with one entry of
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
    let mut rings = Vec::new();
    for i in 0..ring_count(per_queue) {
        let qid = (i % nq) as u16;
        let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
            IoUring::builder().build(4).map_err(UringError::Setup)?;
        let ent = EntryMem::new(payload).map_err(UringError::Buffers)?;
        let sqe = cmd_sqe(dev.as_raw_fd(), CMD_REGISTER, qid, 0, &ent);
        // SAFETY: the iovecs and buffers live as long as the ring (both in
        // the ThreadRing; the ring is dropped first, cancelling the command).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| UringError::Setup(io::Error::from_raw_os_error(libc::EBUSY)))?;
        ring.submit()
            .map_err(|source| UringError::Register { queue: qid, source })?;
        // A refused REGISTER completes at once; an accepted one completes
        // only with the first request (kept for the serving loop).
        let mut first = None;
        if let Some(c) = ring.completion().next() {
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
                    break;
                }
                return Err(e);
            }
            first = Some(c.result());
        }
        rings.push(ThreadRing {
            ring,
            qid,
            ent,
            first,
        });
    }
    Ok(Rings { dev, rings })
}

/// A reply made by fuser during [`fuser::Dispatcher::dispatch`], kept until
/// the request's bytes (which alias the entry's payload) are released.
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

fn serve_ring<FS: fuser::Filesystem>(
    mut r: ThreadRing,
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
    let sink = Arc::new(Captured::default());
    let dyn_sink: Arc<dyn fuser::ReplySink> = sink.clone();
    loop {
        let res = match r.first.take() {
            Some(res) => res,
            None => {
                match r.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("FUSE ring on queue {}: io_uring_enter: {e}", r.qid);
                        return Err(e);
                    }
                }
                let Some(c) = r.ring.completion().next() else {
                    continue;
                };
                c.result()
            }
        };
        if res < 0 {
            if connection_over(-res) {
                return Ok(());
            }
            let e = io::Error::from_raw_os_error(-res);
            tracing::error!(
                "FUSE ring on queue {}: the entry failed ({e}); this thread stops serving",
                r.qid
            );
            return Err(e);
        }
        let commit_id = rd64(r.ent.hdr(), ENT_COMMIT_ID);
        let reply = serve_entry(&mut r.ent, &d, &dyn_sink, &sink);
        // The reply: the out header in the header area, every out-arg in
        // the payload with its length in ent_in_out.payload_sz.
        let body = reply.len().saturating_sub(OUT_HEADER).min(r.ent.payload);
        let hdr = r.ent.hdr();
        hdr[..OUT_HEADER].copy_from_slice(&reply[..OUT_HEADER]);
        hdr[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&(body as u32).to_ne_bytes());
        if body > 0 {
            // SAFETY: the payload holds `r.ent.payload` bytes and no
            // reference into it is live (the request's ended with dispatch).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    reply[OUT_HEADER..].as_ptr(),
                    r.ent.base.add(PAGE),
                    body,
                )
            };
        }
        let sqe = cmd_sqe(dev, CMD_COMMIT_AND_FETCH, r.qid, commit_id, &r.ent);
        // SAFETY: the entry's buffers live as long as the ring.
        if unsafe { r.ring.submission().push(&sqe) }.is_err() {
            return Err(io::Error::other("FUSE ring: submission queue full"));
        }
    }
}

/// Run the request in `e` through fuser; the reply's bytes (out header
/// first). A request fuser could not decode, or one answered by nothing, is
/// answered `EIO` so the entry goes on.
fn serve_entry<FS: fuser::Filesystem>(
    e: &mut EntryMem,
    d: &fuser::Dispatcher<FS>,
    dyn_sink: &Arc<dyn fuser::ReplySink>,
    sink: &Captured,
) -> Vec<u8> {
    let cap = e.payload;
    let base = e.base;
    let hdr = e.hdr();
    let unique = rd64(hdr, 8);
    let len = rd32(hdr, 0) as usize;
    let payload_sz = rd32(hdr, ENT_PAYLOAD_SZ) as usize;
    let op_sz = len.wrapping_sub(IN_HEADER).wrapping_sub(payload_sz);
    let fail = |errno: i32| {
        let mut v = vec![0u8; OUT_HEADER];
        v[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
        v[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        v[8..16].copy_from_slice(&unique.to_ne_bytes());
        v
    };
    if len < IN_HEADER || op_sz > 128 || payload_sz > cap {
        tracing::error!(
            "FUSE ring: a request of {len} bytes with {payload_sz} bytes of payload cannot be decoded: answered EIO"
        );
        return fail(libc::EIO);
    }
    // Contiguous request: in header and op struct just before the payload.
    let start = PAGE - IN_HEADER - op_sz;
    hdr.copy_within(0..IN_HEADER, start);
    hdr.copy_within(OP_OFF..OP_OFF + op_sz, start + IN_HEADER);
    // SAFETY: [start, PAGE + payload_sz) is inside the mapping; nothing
    // else refers to it until dispatch returns.
    let req =
        unsafe { std::slice::from_raw_parts(base.add(start), IN_HEADER + op_sz + payload_sz) };
    *sink.0.lock() = None;
    match d.dispatch(req, dyn_sink.clone()) {
        fuser::Dispatched::Served | fuser::Dispatched::Destroy => {}
        fuser::Dispatched::Invalid => {
            tracing::error!("FUSE ring: fuser could not decode a request: answered EIO");
        }
    }
    match sink.0.lock().take() {
        Some(r) if r.len() >= OUT_HEADER => r,
        _ => fail(libc::EIO),
    }
}
