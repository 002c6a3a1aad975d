//! Probe (not part of vdrep): a minimal pass-through FUSE server with one file
//! `disk` backed by a host file, served either by threads reading
//! `/dev/fuse` (what fuser does) or by FUSE-over-io_uring queues (one thread
//! and one ring per CPU queue). Same request handler in both modes, so fio
//! against `MNT/disk` compares the transports. `--fixed-shm` puts the ring
//! buffers in a memfd mapped at a fixed address and keeps per-entry states in
//! it, so a successor (`--takeover`) can answer the requests a killed worker
//! had fetched (see kernel-notes/fuse-uring.md).
//!
//! Usage: fuse-uring-probe MNT BACKING dev|uring [THREADS_OR_DEPTH]
//!        fuse-uring-probe --supervise MNT BACKING DEPTH   (uring, fixed shm,
//!            restarts the worker when it dies; SIGUSR1 to the supervisor
//!            kills the worker with SIGKILL)

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ACCESS: u32 = 34;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const FUSE_ASYNC_READ: u64 = 1 << 0;
const FUSE_BIG_WRITES: u64 = 1 << 5;
const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
const FUSE_MAX_PAGES: u64 = 1 << 22;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_OVER_IO_URING: u64 = 1 << 41;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

const MAX_WRITE: usize = 1 << 20;
const HDR_SZ: usize = 128 + 128 + 32; // struct fuse_uring_req_header
const FIXED_ADDR: usize = 0x7e00_0000_0000;

fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

struct Fs {
    backing: File,
    size: u64,
    requests: AtomicU64,
}

/// Size of the fixed per-op struct that precedes the payload on /dev/fuse.
fn op_struct_size(op: u32, body_len: usize) -> usize {
    let n = match op {
        FUSE_WRITE | FUSE_READ | FUSE_READDIR => 40,
        FUSE_INIT => 64,
        FUSE_LOOKUP | FUSE_STATFS | FUSE_DESTROY => 0,
        FUSE_GETATTR | FUSE_FSYNC => 16,
        FUSE_OPEN | FUSE_OPENDIR | FUSE_ACCESS => 8,
        FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH => 24,
        FUSE_SETATTR => 88,
        _ => body_len,
    };
    n.min(body_len)
}

fn attr(out: &mut [u8], ino: u64, size: u64) {
    // struct fuse_attr, 88 bytes
    out[..88].fill(0);
    wr64(out, 0, ino);
    wr64(out, 8, size);
    wr64(out, 16, size.div_ceil(512));
    let mode: u32 = if ino == 1 { 0o040755 } else { 0o100644 };
    wr32(out, 60, mode);
    wr32(out, 64, if ino == 1 { 2 } else { 1 });
    wr32(out, 80, 4096);
}

impl Fs {
    /// Handles one request. `payload[..in_len]` holds its input after the
    /// op struct; the reply is written at `payload[0..]`. Ok(None) = no reply.
    fn handle(
        &self,
        op: u32,
        nodeid: u64,
        op_in: &[u8],
        payload: &mut [u8],
        in_len: usize,
    ) -> Result<Option<usize>, i32> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match op {
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => Ok(None),
            FUSE_DESTROY => Ok(Some(0)),
            FUSE_LOOKUP => {
                let name = &payload[..in_len];
                let name = name.split(|&c| c == 0).next().unwrap_or(&[]);
                if nodeid != 1 || name != b"disk" {
                    return Err(libc::ENOENT);
                }
                payload[..128].fill(0);
                wr64(payload, 0, 2);
                wr64(payload, 16, 1);
                wr64(payload, 24, 1);
                attr(&mut payload[40..], 2, self.size);
                Ok(Some(128))
            }
            FUSE_GETATTR | FUSE_SETATTR => {
                payload[..104].fill(0);
                wr64(payload, 0, 1);
                attr(&mut payload[16..], nodeid, self.size);
                Ok(Some(104))
            }
            FUSE_OPEN | FUSE_OPENDIR => {
                payload[..16].fill(0);
                Ok(Some(16))
            }
            FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_FLUSH | FUSE_ACCESS => Ok(Some(0)),
            FUSE_FSYNC => {
                self.backing
                    .sync_data()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                Ok(Some(0))
            }
            FUSE_STATFS => {
                payload[..80].fill(0);
                wr64(payload, 0, self.size / 4096);
                wr32(payload, 40, 4096);
                wr32(payload, 44, 255);
                wr32(payload, 48, 4096);
                Ok(Some(80))
            }
            FUSE_READDIR => {
                let off = rd64(op_in, 8);
                let mut n = 0;
                let names: [(&[u8], u64, u32); 3] = [(b".", 1, 4), (b"..", 1, 4), (b"disk", 2, 8)];
                for (i, (name, ino, typ)) in names.iter().enumerate() {
                    if (i as u64) < off {
                        continue;
                    }
                    let rec = (24 + name.len()).div_ceil(8) * 8;
                    wr64(payload, n, *ino);
                    wr64(payload, n + 8, i as u64 + 1);
                    wr32(payload, n + 16, name.len() as u32);
                    wr32(payload, n + 20, *typ);
                    payload[n + 24..n + rec].fill(0);
                    payload[n + 24..n + 24 + name.len()].copy_from_slice(name);
                    n += rec;
                }
                Ok(Some(n))
            }
            FUSE_READ => {
                let off = rd64(op_in, 8);
                let size = rd32(op_in, 16) as usize;
                let buf = &mut payload[..size.min(MAX_WRITE)];
                let n = read_full(&self.backing, buf, off)?;
                Ok(Some(n))
            }
            FUSE_WRITE => {
                let off = rd64(op_in, 8);
                let size = (rd32(op_in, 16) as usize).min(in_len);
                self.backing
                    .write_all_at(&payload[..size], off)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                payload[..8].fill(0);
                wr32(payload, 0, size as u32);
                Ok(Some(8))
            }
            _ => Err(libc::ENOSYS),
        }
    }
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> Result<usize, i32> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    Ok(done)
}

fn init_reply(op_in: &[u8], uring: bool, out: &mut [u8]) -> usize {
    let minor = rd32(op_in, 4).min(44);
    let ra = rd32(op_in, 8);
    let kflags = rd32(op_in, 12) as u64 | ((rd32(op_in, 16) as u64) << 32);
    let mut want = FUSE_ASYNC_READ | (1 << 15) /* FUSE_ASYNC_DIO */ | FUSE_BIG_WRITES | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES | FUSE_INIT_EXT;
    if uring {
        want |= FUSE_OVER_IO_URING;
    }
    let flags = want & kflags;
    eprintln!(
        "probe: INIT kernel 7.{} flags {:#x}; over_io_uring offered by kernel: {}",
        rd32(op_in, 4),
        kflags,
        kflags & FUSE_OVER_IO_URING != 0
    );
    out[..64].fill(0);
    wr32(out, 0, 7);
    wr32(out, 4, minor);
    wr32(out, 8, ra);
    wr32(out, 12, flags as u32);
    out[16..18].copy_from_slice(&64u16.to_le_bytes());
    out[18..20].copy_from_slice(&48u16.to_le_bytes());
    wr32(out, 20, MAX_WRITE as u32);
    wr32(out, 24, 1);
    out[28..30].copy_from_slice(&256u16.to_le_bytes());
    wr32(out, 32, (flags >> 32) as u32);
    64
}

/// Serves /dev/fuse requests (INIT, and everything before the ring is
/// ready; forgets and interrupts always come here).
fn dev_loop(fs: Arc<Fs>, fd: RawFd, uring: bool, on_init: Option<std::sync::mpsc::Sender<()>>) {
    let mut buf = vec![0u8; MAX_WRITE + 8192];
    loop {
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if e == libc::EINTR || e == libc::EAGAIN || e == libc::ENOENT {
                continue;
            }
            eprintln!("probe: /dev/fuse read ends: errno {e}");
            return;
        }
        let n = n as usize;
        let op = rd32(&buf, 4);
        let unique = rd64(&buf, 8);
        let nodeid = rd64(&buf, 16);
        let body = n - 40;
        let opsz = op_struct_size(op, body);
        let mut op_in = [0u8; 128];
        op_in[..opsz.min(128)].copy_from_slice(&buf[40..40 + opsz.min(128)]);
        let p0 = 40 + opsz;
        let res = if op == FUSE_INIT {
            Ok(Some(init_reply(&op_in, uring, &mut buf[p0..])))
        } else {
            fs.handle(op, nodeid, &op_in, &mut buf[p0..], body - opsz)
        };
        let (err, len) = match res {
            Ok(None) => continue,
            Ok(Some(len)) => (0i32, len),
            Err(e) => (-e, 0),
        };
        let h = p0 - 16;
        wr32(&mut buf, h, (16 + len) as u32);
        buf[h + 4..h + 8].copy_from_slice(&err.to_le_bytes());
        wr64(&mut buf, h + 8, unique);
        // SAFETY: the range is inside buf.
        let w = unsafe { libc::write(fd, buf[h..].as_ptr().cast(), 16 + len) };
        if w < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                eprintln!("probe: reply write failed: {e}");
            }
        }
        if op == FUSE_INIT {
            if let Some(tx) = &on_init {
                let _ = tx.send(());
            }
        }
    }
}

/// Per-entry state kept in the shared mapping for a successor:
/// 0 idle/registered, 1 fetched (request in buffers, not answered),
/// 2 committing (reply in buffers, commit submitted or about to be).
const ST_FETCHED: u64 = 1;
const ST_COMMITTING: u64 = 2;

struct Entry {
    hdr: *mut u8,
    payload: *mut u8,
    state: *mut u64, // [state, commit_id]
    iov: Box<[libc::iovec; 2]>,
}

fn sqe(fd: RawFd, op: u32, qid: u16, commit_id: u64, e: &Entry, user: u64) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    wr64(&mut cmd, 8, commit_id);
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    let ent = opcode::UringCmd80::new(types::Fd(fd), op)
        .cmd(cmd)
        .addr(Some(e.iov.as_ptr() as u64))
        .build()
        .user_data(user);
    // sqe->len (offset 24) = 2 iovecs; io-uring 0.7 has no setter for it.
    // SAFETY: Entry128 is repr(C), 128 bytes; we patch the `len` field.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(ent) };
    wr32(&mut raw, 24, 2);
    unsafe { std::mem::transmute(raw) }
}

fn pin(cpu: usize) {
    // SAFETY: plain cpu_set_t manipulation.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Serves one ring queue. With `region` the entry buffers live in a shared,
/// fixed mapping (entry i of queue q at a fixed slot) and `takeover` answers
/// what a dead predecessor left fetched.
fn queue_loop(
    fs: Arc<Fs>,
    fd: RawFd,
    qid: u16,
    depth: usize,
    region: Option<usize>,
    takeover: bool,
) {
    pin(qid as usize);
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        match IoUring::builder().build((depth * 2) as u32) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("probe: io_uring setup: {e}");
                return;
            }
        };
    let slot = HDR_SZ.div_ceil(4096) * 4096 + MAX_WRITE + 4096;
    let mut ents = Vec::with_capacity(depth);
    for i in 0..depth {
        let (hdr, payload, state) = match region {
            Some(base) => {
                let b = base + (qid as usize * depth + i) * slot;
                (
                    b as *mut u8,
                    (b + 4096) as *mut u8,
                    (b + 4096 + MAX_WRITE) as *mut u64,
                )
            }
            None => {
                let mut h = vec![0u8; 4096].into_boxed_slice();
                let mut p = vec![0u8; MAX_WRITE].into_boxed_slice();
                let s = Box::leak(Box::new([0u64; 2]));
                let r = (h.as_mut_ptr(), p.as_mut_ptr(), s.as_mut_ptr());
                std::mem::forget(h);
                std::mem::forget(p);
                r
            }
        };
        let iov = Box::new([
            libc::iovec {
                iov_base: hdr.cast(),
                iov_len: HDR_SZ,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: MAX_WRITE,
            },
        ]);
        ents.push(Entry {
            hdr,
            payload,
            state,
            iov,
        });
    }
    // Successor: answer what the predecessor fetched but did not answer.
    // Entries in state COMMITTING hold a finished reply: re-commit it (the
    // kernel says ENOENT if it had already taken it). If the kernel had
    // already put the next request in the buffers, that is a fetched one.
    let mut to_submit: Vec<squeue::Entry128> = Vec::new();
    let mut resubmitted = 0;
    if takeover {
        for (i, e) in ents.iter().enumerate() {
            // SAFETY: the entry's memory is mapped and ours.
            let (st, cid) = unsafe { (*e.state, *e.state.add(1)) };
            let hdr = unsafe { std::slice::from_raw_parts_mut(e.hdr, HDR_SZ) };
            let kernel_cid = rd64(hdr, 256 + 8);
            let fetched = st == ST_FETCHED || (st == ST_COMMITTING && kernel_cid != cid);
            if fetched {
                // Re-execute; a write is idempotent, a read is re-read.
                serve_entry(&fs, e);
                resubmitted += 1;
            } else if st != ST_COMMITTING {
                continue;
            }
            let cid = rd64(hdr, 256 + 8);
            unsafe {
                *e.state = ST_COMMITTING;
                *e.state.add(1) = cid;
            }
            // user_data high bit: a takeover commit; its entry is the old
            // kernel entry, so a fresh one is registered for slot i below.
            to_submit.push(sqe(
                fd,
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                qid,
                cid,
                e,
                (1 << 63) | i as u64,
            ));
        }
        eprintln!(
            "probe: queue {qid}: takeover re-served {resubmitted} fetched request(s), {} commit(s)",
            to_submit.len()
        );
    }
    // The old entries of a dead worker stay the kernel's (no command to
    // reuse them); register fresh kernel entries on the same buffers only
    // for slots that are not being re-committed.
    let recommit: std::collections::HashSet<u64> = to_submit
        .iter()
        .map(|s| s.get_user_data() & !(1 << 63))
        .collect();
    for (i, e) in ents.iter().enumerate() {
        if recommit.contains(&(i as u64)) {
            continue;
        }
        unsafe {
            *e.state = 0;
        }
        to_submit.push(sqe(fd, FUSE_IO_URING_CMD_REGISTER, qid, 0, e, i as u64));
    }
    for s in &to_submit {
        // SAFETY: the iovecs and buffers outlive the ring (leaked/ mapped).
        while unsafe { ring.submission().push(s) }.is_err() {
            let _ = ring.submit();
        }
    }
    loop {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            eprintln!("probe: queue {qid}: submit: {e}");
            return;
        }
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user, res) in cqes {
            let i = (user & !(1 << 63)) as usize;
            let e = &ents[i];
            if res < 0 {
                if user & (1 << 63) != 0 && res == -libc::ENOENT {
                    // a takeover re-commit the kernel had already taken:
                    // the slot gets a fresh registration
                    unsafe {
                        *e.state = 0;
                    }
                    let s = sqe(fd, FUSE_IO_URING_CMD_REGISTER, qid, 0, e, i as u64);
                    while unsafe { ring.submission().push(&s) }.is_err() {
                        let _ = ring.submit();
                    }
                    continue;
                }
                eprintln!("probe: queue {qid}: entry {i}: errno {}", -res);
                if res == -libc::ENOTCONN || res == -libc::ECONNABORTED || res == -libc::ECANCELED {
                    return;
                }
                continue;
            }
            let hdr = unsafe { std::slice::from_raw_parts_mut(e.hdr, HDR_SZ) };
            let cid = rd64(hdr, 256 + 8);
            unsafe {
                *e.state.add(1) = cid;
                *e.state = ST_FETCHED;
            }
            if hook_kill(fs.requests.load(Ordering::Relaxed)) {
                // SAFETY: test hook: die with a fetched request.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            serve_entry(&fs, e);
            unsafe {
                *e.state = ST_COMMITTING;
            }
            let s = sqe(
                fd,
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                qid,
                cid,
                e,
                i as u64,
            );
            while unsafe { ring.submission().push(&s) }.is_err() {
                let _ = ring.submit();
            }
        }
    }
}

fn hook_kill(n: u64) -> bool {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(|| {
        std::env::var("PROBE_KILL_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    at != 0 && n == at
}

static RING_SERVED: AtomicU64 = AtomicU64::new(0);

/// Runs the request in an entry's buffers and writes the reply there.
fn serve_entry(fs: &Fs, e: &Entry) {
    RING_SERVED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: buffers are mapped for the process lifetime.
    let hdr = unsafe { std::slice::from_raw_parts_mut(e.hdr, HDR_SZ) };
    let payload = unsafe { std::slice::from_raw_parts_mut(e.payload, MAX_WRITE) };
    let op = rd32(hdr, 4);
    let unique = rd64(hdr, 8);
    let nodeid = rd64(hdr, 16);
    let in_len = rd32(hdr, 256 + 16) as usize;
    let mut op_in = [0u8; 128];
    op_in.copy_from_slice(&hdr[128..256]);
    let (err, len) = match fs.handle(op, nodeid, &op_in, payload, in_len) {
        Ok(Some(l)) => (0i32, l),
        Ok(None) => (0, 0),
        Err(e) => (-e, 0),
    };
    wr32(hdr, 0, (16 + len) as u32);
    hdr[4..8].copy_from_slice(&err.to_le_bytes());
    wr64(hdr, 8, unique);
    wr32(hdr, 256 + 16, len as u32);
}

fn mount(dir: &str) -> RawFd {
    let dev = CString::new("/dev/fuse").unwrap();
    // SAFETY: plain open.
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR) };
    assert!(
        fd >= 0,
        "open /dev/fuse: {}",
        std::io::Error::last_os_error()
    );
    let opts = CString::new(format!(
        "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other"
    ))
    .unwrap();
    let src = CString::new("probe").unwrap();
    let typ = CString::new("fuse.probe").unwrap();
    let tgt = CString::new(dir).unwrap();
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            typ.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    assert!(r == 0, "mount: {}", std::io::Error::last_os_error());
    fd
}

fn clone_dev(fd: RawFd) -> RawFd {
    let dev = CString::new("/dev/fuse").unwrap();
    // SAFETY: open + FUSE_DEV_IOC_CLONE (reads one u32 source fd).
    unsafe {
        let n = libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let src: u32 = fd as u32;
        assert!(
            n >= 0 && libc::ioctl(n, 0x8004_e500, &src) == 0,
            "clone: {}",
            std::io::Error::last_os_error()
        );
        n
    }
}

fn ncpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .rsplit('-')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
        })
        .map(|n| n + 1)
        .unwrap_or(1)
}

fn open_fs(backing: &str) -> Arc<Fs> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .expect("backing file");
    let size = f.metadata().expect("stat backing").len();
    Arc::new(Fs {
        backing: f,
        size,
        requests: AtomicU64::new(0),
    })
}

fn map_region(memfd: RawFd, len: usize) -> usize {
    // SAFETY: MAP_FIXED_NOREPLACE at a fixed address of a memfd we own.
    let p = unsafe {
        libc::mmap(
            FIXED_ADDR as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
            memfd,
            0,
        )
    };
    assert!(
        p as usize == FIXED_ADDR,
        "mmap fixed: {}",
        std::io::Error::last_os_error()
    );
    p as usize
}

fn region_len(depth: usize) -> usize {
    let slot = HDR_SZ.div_ceil(4096) * 4096 + MAX_WRITE + 4096;
    ncpus() * depth * slot
}

/// Worker of `--supervise`: fds 3 (/dev/fuse) and 4 (memfd) inherited.
fn worker(backing: &str, depth: usize, takeover: bool) {
    let fs = open_fs(backing);
    let fd: RawFd = 3;
    let region = map_region(4, region_len(depth));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let fs = fs.clone();
        let tx = if takeover { None } else { Some(tx) };
        std::thread::spawn(move || dev_loop(fs, fd, true, tx));
    }
    if !takeover {
        let _ = rx.recv();
    }
    let mut hs = Vec::new();
    for q in 0..ncpus() {
        let fs = fs.clone();
        hs.push(std::thread::spawn(move || {
            queue_loop(fs, fd, q as u16, depth, Some(region), takeover)
        }));
    }
    for h in hs {
        let _ = h.join();
    }
}

fn supervise(mnt: &str, backing: &str, depth: usize) {
    let fd = mount(mnt);
    let name = CString::new("probe-rings").unwrap();
    // SAFETY: memfd_create with a valid name.
    let memfd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(memfd >= 0);
    // SAFETY: sizing our memfd.
    assert!(unsafe { libc::ftruncate(memfd, region_len(depth) as i64) } == 0);
    let exe = std::env::current_exe().expect("exe");
    let mut first = true;
    loop {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--worker").arg(backing).arg(depth.to_string());
        if !first {
            cmd.arg("--takeover");
        }
        let (f, m) = (fd, memfd);
        // SAFETY: dup2 in the child before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::dup2(f, 3) < 0 || libc::dup2(m, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn worker");
        std::fs::write("/tmp/probe-worker.pid", child.id().to_string()).ok();
        let st = child.wait().expect("wait");
        eprintln!("probe: worker exited: {st}");
        if st.success() {
            return;
        }
        first = false;
        if std::path::Path::new("/tmp/probe-stop").exists() {
            return;
        }
    }
}

// ---- SQPOLL rings owned by the supervisor (raw, shared across workers) ----

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RingParams {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: [u32; 10], // head tail ring_mask ring_entries flags dropped array resv1 user_addr(u64)
    cq_off: [u32; 10], // head tail ring_mask ring_entries overflow cqes flags resv1 user_addr(u64)
}
const SETUP_SQPOLL: u32 = 1 << 1;
const SETUP_SQE128: u32 = 1 << 10;

/// A ring created by the supervisor; any process holding its fd and the
/// params can map it and use it. Submissions are done by the supervisor's
/// SQPOLL kernel thread, so they survive the death of a worker.
struct RawRing {
    fd: RawFd,
    p: RingParams,
    sq: *mut u8,
    sqes: *mut u8,
}

impl RawRing {
    fn create(entries: u32, idle_ms: u32) -> RawRing {
        let mut p = RingParams {
            flags: SETUP_SQPOLL | SETUP_SQE128,
            sq_thread_idle: idle_ms,
            ..Default::default()
        };
        // SAFETY: io_uring_setup with a valid params struct.
        let fd =
            unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, &mut p as *mut RingParams) }
                as RawFd;
        assert!(
            fd >= 0,
            "io_uring_setup: {}",
            std::io::Error::last_os_error()
        );
        Self::map(fd, p)
    }
    fn map(fd: RawFd, p: RingParams) -> RawRing {
        let sq_len = p.sq_off[6] as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off[5] as usize + p.cq_entries as usize * 16;
        assert!(p.features & 1 != 0, "needs IORING_FEAT_SINGLE_MMAP");
        let len = sq_len.max(cq_len);
        // SAFETY: mapping the ring's own regions.
        let sq = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        let sqes = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                p.sq_entries as usize * 128,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0x1000_0000,
            )
        };
        assert!(
            sq != libc::MAP_FAILED && sqes != libc::MAP_FAILED,
            "mmap ring fd {fd}: {}",
            std::io::Error::last_os_error()
        );
        RawRing {
            fd,
            p,
            sq: sq.cast(),
            sqes: sqes.cast(),
        }
    }
    fn a32(&self, off: u32) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: offsets come from the kernel, inside the mapping.
        unsafe { &*(self.sq.add(off as usize) as *const std::sync::atomic::AtomicU32) }
    }
    /// Pushes SQEs and wakes the SQPOLL thread if it sleeps.
    fn push(&self, entries: &[squeue::Entry128]) {
        use std::sync::atomic::Ordering::*;
        let mask = self.a32(self.p.sq_off[2]).load(Relaxed);
        let mut tail = self.a32(self.p.sq_off[1]).load(Relaxed);
        for e in entries {
            while tail.wrapping_sub(self.a32(self.p.sq_off[0]).load(Acquire)) >= self.p.sq_entries {
                self.enter(0, 0, 2);
            }
            let idx = tail & mask;
            // SAFETY: idx < sq_entries; the SQE is 128 bytes.
            unsafe {
                let raw: [u8; 128] = std::mem::transmute_copy(e);
                std::ptr::copy_nonoverlapping(raw.as_ptr(), self.sqes.add(idx as usize * 128), 128);
                *(self.sq.add(self.p.sq_off[6] as usize + idx as usize * 4) as *mut u32) = idx;
            }
            tail = tail.wrapping_add(1);
        }
        self.a32(self.p.sq_off[1]).store(tail, Release);
        std::sync::atomic::fence(SeqCst);
        if self.a32(self.p.sq_off[4]).load(Relaxed) & 1 != 0 {
            self.enter(0, 0, 2);
        }
    }
    fn enter(&self, to_submit: u32, min_complete: u32, flags: u32) -> i64 {
        // SAFETY: io_uring_enter on our ring fd.
        unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd,
                to_submit,
                min_complete,
                flags,
                0usize,
                0usize,
            )
        }
    }
    /// Waits for at least one CQE; returns (user_data, res) of all, and
    /// calls `mark` on each before the head moves past it.
    fn reap(&self, wait: bool, mut mark: impl FnMut(u64, i32)) -> Vec<(u64, i32)> {
        use std::sync::atomic::Ordering::*;
        let head_a = self.a32(self.p.cq_off[0]);
        let tail_a = self.a32(self.p.cq_off[1]);
        let mask = self.a32(self.p.cq_off[2]).load(Relaxed);
        let mut out = Vec::new();
        loop {
            let head = head_a.load(Relaxed);
            let tail = tail_a.load(Acquire);
            if head != tail {
                let mut h = head;
                while h != tail {
                    // SAFETY: CQE slot inside the mapping: u64 user_data, i32 res, u32 flags.
                    let c = unsafe {
                        self.sq
                            .add(self.p.cq_off[5] as usize + (h & mask) as usize * 16)
                    };
                    let (ud, res) = unsafe {
                        (
                            std::ptr::read(c as *const u64),
                            std::ptr::read(c.add(8) as *const i32),
                        )
                    };
                    mark(ud, res);
                    out.push((ud, res));
                    h = h.wrapping_add(1);
                }
                head_a.store(tail, Release);
                return out;
            }
            if !wait {
                return out;
            }
            self.enter(0, 1, 1);
        }
    }
}

fn sq_params_slot(region: usize, q: usize) -> *mut RingParams {
    (region + q * 4096) as *mut RingParams
}

/// `--supervise-sq`: the supervisor owns the rings (SQPOLL) and the buffers.
fn supervise_sq(mnt: &str, backing: &str, depth: usize) {
    let fd = mount(mnt);
    let name = CString::new("probe-rings").unwrap();
    // SAFETY: memfd for the shared buffers (+ one page per queue of params).
    let memfd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    let len = region_len(depth) + 4096 * ncpus();
    assert!(unsafe { libc::ftruncate(memfd, len as i64) } == 0);
    let region = map_region(memfd, len);
    let idle: u32 = std::env::var("PROBE_SQ_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut ring_fds = Vec::new();
    for q in 0..ncpus() {
        let r = RawRing::create((depth * 2) as u32, idle);
        // SAFETY: the params page is inside the region.
        unsafe { *sq_params_slot(region + region_len(depth), q) = r.p };
        ring_fds.push(r.fd);
    }
    let exe = std::env::current_exe().expect("exe");
    let mut first = true;
    loop {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--worker-sq").arg(backing).arg(depth.to_string());
        if !first {
            cmd.arg("--takeover");
        }
        let (f, m, rf) = (fd, memfd, ring_fds.clone());
        // SAFETY: dup2 in the child before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::dup2(f, 3) < 0 || libc::dup2(m, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (q, r) in rf.iter().enumerate() {
                    if libc::dup2(*r, 5 + q as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // dup2(x, x) keeps FD_CLOEXEC (io_uring fds are CLOEXEC)
                for t in 3..5 + rf.len() as i32 {
                    libc::fcntl(t, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn worker");
        std::fs::write("/tmp/probe-worker.pid", child.id().to_string()).ok();
        let st = child.wait().expect("wait");
        eprintln!("probe: worker exited: {st}");
        if st.success() || std::path::Path::new("/tmp/probe-stop").exists() {
            return;
        }
        first = false;
    }
}

fn worker_sq(backing: &str, depth: usize, takeover: bool) {
    let fs = open_fs(backing);
    let fd: RawFd = 3;
    let len = region_len(depth) + 4096 * ncpus();
    let region = map_region(4, len);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let fs = fs.clone();
        let tx = if takeover { None } else { Some(tx) };
        std::thread::spawn(move || dev_loop(fs, fd, true, tx));
    }
    if !takeover {
        let _ = rx.recv();
    }
    let mut hs = Vec::new();
    for q in 0..ncpus() {
        let fs = fs.clone();
        // SAFETY: params written by the supervisor.
        let p = unsafe { *sq_params_slot(region + region_len(depth), q) };
        hs.push(std::thread::spawn(move || {
            let ring = RawRing::map(5 + q as RawFd, p);
            sq_queue_loop(&fs, &ring, fd, q as u16, depth, region, takeover)
        }));
    }
    for h in hs {
        let _ = h.join();
    }
}

fn sq_queue_loop(
    fs: &Fs,
    ring: &RawRing,
    fd: RawFd,
    qid: u16,
    depth: usize,
    region: usize,
    takeover: bool,
) {
    pin(qid as usize);
    let slot = HDR_SZ.div_ceil(4096) * 4096 + MAX_WRITE + 4096;
    let mut ents = Vec::with_capacity(depth);
    for i in 0..depth {
        let b = region + (qid as usize * depth + i) * slot;
        let (hdr, payload, state) = (
            b as *mut u8,
            (b + 4096) as *mut u8,
            (b + 4096 + MAX_WRITE) as *mut u64,
        );
        // The iovecs must be readable by the supervisor's SQPOLL thread:
        // they live in the shared region too (after the state words).
        let iov_at = (b + 4096 + MAX_WRITE + 64) as *mut libc::iovec;
        unsafe {
            *iov_at = libc::iovec {
                iov_base: hdr.cast(),
                iov_len: HDR_SZ,
            };
            *iov_at.add(1) = libc::iovec {
                iov_base: payload.cast(),
                iov_len: MAX_WRITE,
            };
        }
        let iov = Box::new([
            libc::iovec {
                iov_base: hdr.cast(),
                iov_len: HDR_SZ,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: MAX_WRITE,
            },
        ]);
        ents.push((
            Entry {
                hdr,
                payload,
                state,
                iov,
            },
            iov_at as u64,
        ));
    }
    let mk = |op: u32, cid: u64, i: usize, user: u64| -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        wr64(&mut cmd, 8, cid);
        cmd[16..18].copy_from_slice(&qid.to_le_bytes());
        let e = opcode::UringCmd80::new(types::Fd(fd), op)
            .cmd(cmd)
            .addr(Some(ents[i].1))
            .build()
            .user_data(user);
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
        wr32(&mut raw, 24, 2);
        unsafe { std::mem::transmute(raw) }
    };
    // A CQE with res >= 0 (also of a takeover re-commit, high bit set) means
    // a new request is in the entry's buffers: mark it fetched before the
    // CQ head moves past it.
    let mark = |ud: u64, res: i32| {
        if res >= 0 {
            let e = &ents[(ud & !(1 << 63)) as usize].0;
            let hdr = unsafe { std::slice::from_raw_parts(e.hdr, HDR_SZ) };
            unsafe {
                *e.state.add(1) = rd64(hdr, 256 + 8);
                *e.state = ST_FETCHED;
            }
        }
    };
    let mut sqes = Vec::new();
    if takeover {
        // CQEs the predecessor never reaped: mark their entries fetched.
        let _ = ring.reap(false, mark);
        let (mut served, mut recommits) = (0, 0);
        for i in 0..depth {
            let e = &ents[i].0;
            let (st, cid) = unsafe { (*e.state, *e.state.add(1)) };
            if st == ST_FETCHED {
                serve_entry(fs, e);
                served += 1;
            } else if st != ST_COMMITTING {
                continue;
            }
            recommits += 1;
            unsafe {
                *e.state = ST_COMMITTING;
            }
            sqes.push(mk(
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                cid,
                i,
                (1 << 63) | i as u64,
            ));
        }
        eprintln!(
            "probe: queue {qid}: sq takeover re-served {served} fetched, {recommits} commit(s)"
        );
    } else {
        for i in 0..depth {
            sqes.push(mk(FUSE_IO_URING_CMD_REGISTER, 0, i, i as u64));
        }
    }
    ring.push(&sqes);
    loop {
        let cqes = ring.reap(true, mark);
        sqes.clear();
        for (ud, res) in cqes {
            if ud & (1 << 63) != 0 && res == -libc::ENOENT {
                continue; // takeover re-commit the kernel had already taken
            }
            let i = (ud & !(1 << 63)) as usize;
            if res < 0 {
                eprintln!("probe: queue {qid}: entry {i}: errno {}", -res);
                if res == -libc::ENOTCONN || res == -libc::ECONNABORTED {
                    return;
                }
                continue;
            }
            let e = &ents[i].0;
            if hook_kill(fs.requests.load(Ordering::Relaxed)) {
                unsafe { libc::raise(libc::SIGKILL) };
            }
            serve_entry(fs, e);
            let cid = unsafe { *e.state.add(1) };
            unsafe {
                *e.state = ST_COMMITTING;
            }
            sqes.push(mk(FUSE_IO_URING_CMD_COMMIT_AND_FETCH, cid, i, i as u64));
        }
        ring.push(&sqes);
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("--worker") {
        return worker(
            &a[2],
            a[3].parse().unwrap_or(16),
            a.get(4).map(String::as_str) == Some("--takeover"),
        );
    }
    if a.get(1).map(String::as_str) == Some("--worker-sq") {
        return worker_sq(
            &a[2],
            a[3].parse().unwrap_or(16),
            a.get(4).map(String::as_str) == Some("--takeover"),
        );
    }
    if a.get(1).map(String::as_str) == Some("--supervise-sq") {
        return supervise_sq(
            &a[2],
            &a[3],
            a.get(4).and_then(|v| v.parse().ok()).unwrap_or(16),
        );
    }
    if a.get(1).map(String::as_str) == Some("--supervise") {
        return supervise(
            &a[2],
            &a[3],
            a.get(4).and_then(|v| v.parse().ok()).unwrap_or(16),
        );
    }
    if a.len() < 4 {
        eprintln!("usage: fuse-uring-probe MNT BACKING dev|uring [N]");
        std::process::exit(2);
    }
    let (mnt, backing, mode) = (&a[1], &a[2], a[3].as_str());
    let n: usize = a
        .get(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or(if mode == "dev" { 4 } else { 16 });
    let fs = open_fs(backing);
    let fd = mount(mnt);
    let uring = mode == "uring";
    let (tx, rx) = std::sync::mpsc::channel();
    let mut hs = Vec::new();
    let threads = if uring { 1 } else { n };
    for t in 0..threads {
        let fs = fs.clone();
        // Each thread its own clone of the connection (as fuser's clone_fd).
        let tfd = if t == 0 { fd } else { clone_dev(fd) };
        let tx = if t == 0 { Some(tx.clone()) } else { None };
        hs.push(std::thread::spawn(move || dev_loop(fs, tfd, uring, tx)));
    }
    if uring {
        let _ = rx.recv();
        for q in 0..ncpus() {
            let fs = fs.clone();
            hs.push(std::thread::spawn(move || {
                queue_loop(fs, fd, q as u16, n, None, false)
            }));
        }
    }
    for h in hs {
        let _ = h.join();
    }
    eprintln!(
        "probe: served {} requests, {} through the ring",
        fs.requests.load(Ordering::Relaxed),
        RING_SERVED.load(Ordering::Relaxed)
    );
    let _ = unsafe { File::from_raw_fd(fd) }.as_raw_fd();
}
