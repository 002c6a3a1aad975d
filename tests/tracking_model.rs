//! Tracking against a reference model, without FUSE: the tracker's write
//! path is driven directly, cuts are taken, and the sealed logs are applied
//! to a copy of the disk as of its first cut. After each log the copy must
//! equal the model at that cut, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use vdrep::hrl::{self, ApplyOptions};
use vdrep::tracking::{TrackConfig, TrackedDisk, Tracker};

fn open_root(dir: &Path) -> OwnedFd {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .unwrap();
    f.into()
}

use std::os::unix::fs::OpenOptionsExt;

fn tracker(dir: &Path, bs: u32) -> Tracker {
    let cfg = TrackConfig {
        block_size: bs,
        ..TrackConfig::default()
    };
    Tracker::open(open_root(dir), dir, cfg).unwrap()
}

fn apply_all(logs: &[PathBuf], image: &Path) {
    for l in logs {
        hrl::apply(l, image, &ApplyOptions::default())
            .unwrap_or_else(|e| panic!("apply {}: {e}", l.display()));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, byte: u8 },
    Truncate(u64),
    Punch { off: u64, len: u64 },
    ZeroRange { off: u64, len: u64 },
    Cut,
}

const MAXSZ: u64 = 96 * 1024;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..MAXSZ, 1usize..20000, any::<u8>()).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        1 => (0..MAXSZ).prop_map(Op::Truncate),
        1 => (0..MAXSZ, 1..30000u64).prop_map(|(off, len)| Op::Punch { off, len }),
        1 => (0..MAXSZ, 1..30000u64).prop_map(|(off, len)| Op::ZeroRange { off, len }),
        2 => Just(Op::Cut),
    ]
}

fn model_apply(m: &mut Vec<u8>, op: &Op) {
    match *op {
        Op::Write { off, len, byte } => {
            let end = off as usize + len;
            if m.len() < end {
                m.resize(end, 0);
            }
            m[off as usize..end].fill(byte);
        }
        Op::Truncate(n) => m.resize(n as usize, 0),
        Op::Punch { off, len } | Op::ZeroRange { off, len } => {
            let s = (off as usize).min(m.len());
            let e = ((off + len) as usize).min(m.len());
            m[s..e].fill(0);
        }
        Op::Cut => {}
    }
}

fn run_model(ops: &[Op], bs: u32, initial: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("disk.img"), initial).unwrap();
    let base = dir.join("base.copy");
    std::fs::copy(dir.join("disk.img"), &base).unwrap();
    let t = tracker(dir, bs);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("disk.img"))
        .unwrap();
    let disk: Arc<TrackedDisk> = t.attach(Path::new("disk.img"), &file).unwrap().unwrap();
    let mut model = initial.to_vec();
    let mut snapshots: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for op in ops.iter().chain(std::iter::once(&Op::Cut)) {
        match *op {
            Op::Write { off, len, byte } => {
                let n = disk.write_at(&file, off, &vec![byte; len]).unwrap();
                assert_eq!(n, len);
            }
            Op::Truncate(n) => disk.set_len(&file, n).unwrap(),
            Op::Punch { off, len } => disk
                .fallocate(
                    &file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap(),
            Op::ZeroRange { off, len } => disk
                .fallocate(
                    &file,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap(),
            Op::Cut => {
                let r = t.cut().unwrap();
                assert_eq!(r.disks.len(), 1);
                let e = &r.disks[0];
                assert!(e.error.is_none(), "{e:?}");
                snapshots.push((e.log.clone().unwrap(), model.clone()));
            }
        }
        model_apply(&mut model, op);
    }
    // The live disk equals the model.
    assert_eq!(std::fs::read(dir.join("disk.img")).unwrap(), model);
    // Each log takes the copy from one cut to the next.
    for (log, want) in &snapshots {
        apply_all(std::slice::from_ref(log), &base);
        let got = std::fs::read(&base).unwrap();
        assert_eq!(got.len(), want.len(), "length after {}", log.display());
        if got != *want {
            let i = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "copy differs from the model at byte {i} after {}",
                log.display()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn logs_reproduce_every_cut(ops in proptest::collection::vec(op(), 0..40),
                                bs in prop_oneof![Just(512u32), Just(4096u32)],
                                init_len in 0usize..70000) {
        let initial: Vec<u8> = (0..init_len).map(|i| (i * 7 + 3) as u8).collect();
        run_model(&ops, bs, &initial);
    }
}

/// A write whose backing I/O completes later (the io_uring transport's
/// [`TrackedDisk::try_begin_write`]) holds off a cut until it is finished,
/// lands in the cycle the cut seals, and no write starts without waiting
/// once the cut waits for it.
#[test]
fn a_cut_waits_for_a_write_in_flight_and_seals_it_in_its_cycle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let t = tracker(dir, 4096);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("d.raw"))
        .unwrap();
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    // The copy as of the first cut.
    t.cut().unwrap();
    std::fs::copy(dir.join("d.raw"), dir.join("base")).unwrap();
    let w = disk
        .try_begin_write(4096, 4096)
        .unwrap()
        .expect("no cut is running: the write starts at once");
    // The backing write, in flight while the cut is asked for.
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 4096], 4096).unwrap();
    std::thread::scope(|s| {
        let cut = s.spawn(|| t.cut().unwrap());
        // Until the cut waits for the lock, writes may start (each one
        // marks its block whatever it wrote: block 0 stays zeros).
        let mut held_off = false;
        while !cut.is_finished() {
            match disk.try_begin_write(0, 4096).unwrap() {
                Some(w0) => drop(w0),
                None => {
                    held_off = true;
                    break;
                }
            }
            std::thread::yield_now();
        }
        assert!(
            held_off && !cut.is_finished(),
            "the cut sealed its cycle while a write it counts was in flight"
        );
        w.finish(4096);
        let r = cut.join().unwrap();
        let log = r.disks[0]
            .log
            .clone()
            .unwrap_or_else(|| panic!("no log: {:?}", r.disks[0].error));
        apply_all(&[log], &dir.join("base"));
    });
    assert!(
        std::fs::read(dir.join("base")).unwrap() == std::fs::read(dir.join("d.raw")).unwrap(),
        "the write in flight at the cut is missing from its cycle's log"
    );
}

/// Writes during the materialisation of a cut land in the next cycle and
/// do not leak into the sealed one (copy-before-write), with a disk large
/// enough that materialisation takes a while.
#[test]
fn copy_before_write_keeps_sealed_cycle_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 64 << 20;
    std::fs::write(dir.join("big.raw"), vec![0u8; size]).unwrap();
    std::fs::copy(dir.join("big.raw"), dir.join("base")).unwrap();
    let t = Arc::new(tracker(dir, 4096));
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("big.raw"))
            .unwrap(),
    );
    let disk = t.attach(Path::new("big.raw"), &file).unwrap().unwrap();
    // Cycle 1: every block holds 0x11.
    for b in 0..(size / 4096) as u64 {
        disk.write_at(&file, b * 4096, &[0x11; 4096]).unwrap();
    }
    // The writer starts only once the cut instant has passed (the log's
    // temporary file exists), so every one of its writes belongs to cycle 2,
    // and it races with the materialisation of cycle 1.
    let stop = Arc::new(AtomicBool::new(false));
    let overwrites = Arc::new(AtomicU64::new(0));
    let state = dir.join(".vdrep/disks");
    let h = {
        let (disk, file, stop, n) = (disk.clone(), file.clone(), stop.clone(), overwrites.clone());
        std::thread::spawn(move || {
            let tmp_exists = || {
                std::fs::read_dir(&state).unwrap().flatten().any(|d| {
                    std::fs::read_dir(d.path())
                        .unwrap()
                        .flatten()
                        .any(|f| f.file_name().to_string_lossy().ends_with(".tmp"))
                })
            };
            while !tmp_exists() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::hint::spin_loop();
            }
            let mut b = 1u64;
            while !stop.load(Ordering::Relaxed) {
                disk.write_at(&file, (b % (size as u64 / 4096)) * 4096, &[0x22; 4096])
                    .unwrap();
                b = b
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407)
                    >> 1;
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let r1 = t.cut().unwrap();
    let during = overwrites.load(Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let r2 = t.cut().unwrap();
    assert!(
        during > 0,
        "the writer never overlapped the materialisation"
    );
    let base = dir.join("base");
    apply_all(&[r1.disks[0].log.clone().unwrap()], &base);
    let after1 = std::fs::read(&base).unwrap();
    if let Some(i) = after1.iter().position(|&x| x != 0x11) {
        panic!("cycle 1 holds a write made after its cut (byte {i}); {during} writes overlapped");
    }
    apply_all(&[r2.disks[0].log.clone().unwrap()], &base);
    assert!(std::fs::read(&base).unwrap() == std::fs::read(dir.join("big.raw")).unwrap());
}

/// Several writer threads on two disks (one VM) while cuts are taken every
/// few ms. Each block carries (writer, sequence number), so the state of a
/// copy tells exactly which writes it holds. Every cut must be one instant
/// across both disks: each writer's included writes form a prefix, and no
/// write that finished before another included write started is missing.
#[test]
fn concurrent_writers_cuts_are_one_instant_across_disks() {
    const BS: usize = 4096;
    const BLOCKS: u64 = 512; // per writer partition
    const WRITERS: usize = 3; // writers 0,1 -> disk a; writer 2 -> disk b
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk_size = BLOCKS * 2 * BS as u64;
    for n in ["a.img", "b.img"] {
        std::fs::write(dir.join(n), vec![0u8; disk_size as usize]).unwrap();
        std::fs::copy(dir.join(n), dir.join(format!("{n}.copy"))).unwrap();
    }
    let t = Arc::new(tracker(dir, BS as u32));
    let open = |n: &str| {
        Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(n))
                .unwrap(),
        )
    };
    let (fa, fb) = (open("a.img"), open("b.img"));
    let da = t.attach(Path::new("a.img"), &fa).unwrap().unwrap();
    let db = t.attach(Path::new("b.img"), &fb).unwrap().unwrap();
    let ticket = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    // (block index within the writer's partition, start ticket, end ticket)
    type Log = Vec<(u64, u64, u64)>;
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (disk, file) = if w < 2 {
            (da.clone(), fa.clone())
        } else {
            (db.clone(), fb.clone())
        };
        let (ticket, stop) = (ticket.clone(), stop.clone());
        handles.push(std::thread::spawn(move || -> Log {
            let mut log = Vec::new();
            let mut x = 0x9e3779b97f4a7c15u64 ^ w as u64;
            let part = (w % 2) as u64 * BLOCKS;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) && seq < 40_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let blk = x % BLOCKS;
                let mut buf = vec![0u8; BS];
                for c in buf.chunks_mut(24) {
                    let mut v = [0u8; 24];
                    v[..8].copy_from_slice(&(w as u64 + 1).to_le_bytes());
                    v[8..16].copy_from_slice(&(seq + 1).to_le_bytes());
                    v[16..24].copy_from_slice(&blk.to_le_bytes());
                    let n = c.len();
                    c.copy_from_slice(&v[..n]);
                }
                let s = ticket.fetch_add(1, Ordering::SeqCst);
                disk.write_at(&file, (part + blk) * BS as u64, &buf)
                    .unwrap();
                let e = ticket.fetch_add(1, Ordering::SeqCst);
                log.push((blk, s, e));
                seq += 1;
            }
            log
        }));
    }
    let mut cuts = Vec::new();
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = t.cut().unwrap();
        let logs: Vec<PathBuf> = r.disks.iter().map(|d| d.log.clone().unwrap()).collect();
        cuts.push(logs);
    }
    stop.store(true, Ordering::Relaxed);
    let wlogs: Vec<Log> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        wlogs.iter().all(|l| l.len() > 50),
        "writers made too little progress"
    );
    let copies = [dir.join("a.img.copy"), dir.join("b.img.copy")];
    let mut prev_k = [0usize; WRITERS];
    for (ci, logs) in cuts.iter().enumerate() {
        // disks are reported sorted by name: a.img, b.img
        for (l, c) in logs.iter().zip(copies.iter()) {
            apply_all(std::slice::from_ref(l), c);
        }
        let imgs = [
            std::fs::read(&copies[0]).unwrap(),
            std::fs::read(&copies[1]).unwrap(),
        ];
        let mut k = [0usize; WRITERS];
        for w in 0..WRITERS {
            let img = &imgs[if w < 2 { 0 } else { 1 }];
            let part = (w % 2) as u64 * BLOCKS;
            // Expected content from the prefix of w's writes that the copy holds.
            let mut maxseq = 0u64;
            let mut seen = vec![0u64; BLOCKS as usize];
            for b in 0..BLOCKS {
                let o = ((part + b) as usize) * BS;
                let blk = &img[o..o + BS];
                let who = u64::from_le_bytes(blk[..8].try_into().unwrap());
                let seq = u64::from_le_bytes(blk[8..16].try_into().unwrap());
                if who == 0 {
                    assert!(blk.iter().all(|&x| x == 0), "cut {ci}: block {b} torn");
                    continue;
                }
                assert_eq!(who, w as u64 + 1, "cut {ci}: block of another writer");
                for c in blk.chunks(24) {
                    assert_eq!(
                        c[..c.len().min(16)],
                        blk[..c.len().min(16)],
                        "cut {ci}: torn block"
                    );
                }
                seen[b as usize] = seq;
                maxseq = maxseq.max(seq);
            }
            k[w] = maxseq as usize;
            // The copy equals exactly the first k writes of w.
            let mut want = vec![0u64; BLOCKS as usize];
            for (i, (blk, _, _)) in wlogs[w][..k[w]].iter().enumerate() {
                want[*blk as usize] = i as u64 + 1;
            }
            assert_eq!(
                seen, want,
                "cut {ci}: writer {w} is not a prefix of its writes"
            );
            assert!(k[w] >= prev_k[w], "cut {ci}: writer {w} went back in time");
        }
        // One instant: an excluded write that ended before an included write
        // started is a violation.
        for t_ in 0..WRITERS {
            let Some(&(_, _, excl_end)) = wlogs[t_].get(k[t_]) else {
                continue;
            };
            for u in 0..WRITERS {
                if k[u] == 0 {
                    continue;
                }
                let (_, incl_start, _) = wlogs[u][k[u] - 1];
                assert!(
                    excl_end >= incl_start,
                    "cut {ci}: writer {t_}'s write #{} finished before writer {u}'s write #{} started, \
                     yet only the later one is in the cut",
                    k[t_] + 1,
                    k[u]
                );
            }
        }
        prev_k = k;
    }
    let _ = File::open(dir); // keep tmp alive to here
}

/// Kept copies of writes (`tracking::kept`) under racing writers: six
/// threads write the same few blocks at once (whole blocks, two-block
/// writes, half blocks and hole punches) while cuts are taken every
/// millisecond, so the cut's log writer takes most blocks from the copies
/// kept in memory. Whichever write the file keeps for a block, the logs must
/// carry that one: in each of 40 rounds, once the writers stop and a last
/// cut is taken, the copy built from every log equals the disk byte for
/// byte, and no block of any cut is torn. Kept copies decided by the order their writes *returned* in
/// (instead of refusing blocks two writes raced for) fail this.
#[test]
fn kept_copies_follow_the_file_when_writers_race_for_the_same_blocks() {
    const BS: usize = 4096;
    const BLOCKS: u64 = 8;
    const WRITERS: u64 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("r.img"), vec![0u8; BLOCKS as usize * BS]).unwrap();
    std::fs::copy(dir.join("r.img"), dir.join("r.img.copy")).unwrap();
    let t = Arc::new(tracker(dir, BS as u32));
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("r.img"))
            .unwrap(),
    );
    let disk = t.attach(Path::new("r.img"), &file).unwrap().unwrap();
    let copy = dir.join("r.img.copy");
    // Each round ends with the writers stopped and a last cut: a copy
    // that is stale at that moment (a race lost in the round's last
    // cycles) shows as a difference, whatever the rounds before did.
    for round in 0..40u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for w in 0..WRITERS {
            let (disk, file, stop) = (disk.clone(), file.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                let mut x = 0x2545f4914f6cdd1du64 ^ (w + 1) ^ (round << 32);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) && seq < 20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    seq += 1;
                    let blk = x % BLOCKS;
                    let mark = |len: usize| {
                        let mut buf = vec![0u8; len];
                        for c in buf.chunks_mut(16) {
                            let mut v = [0u8; 16];
                            v[..8].copy_from_slice(&(w + 1).to_le_bytes());
                            v[8..].copy_from_slice(&(round << 40 | seq).to_le_bytes());
                            let n = c.len();
                            c.copy_from_slice(&v[..n]);
                        }
                        buf
                    };
                    match (x >> 32) % 10 {
                        0 if blk + 1 < BLOCKS => {
                            disk.write_at(&file, blk * BS as u64, &mark(2 * BS))
                                .unwrap();
                        }
                        1 => {
                            disk.write_at(&file, blk * BS as u64 + BS as u64 / 2, &mark(BS / 2))
                                .unwrap();
                        }
                        2 => disk
                            .fallocate(
                                &file,
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                blk * BS as u64,
                                BS as u64,
                            )
                            .unwrap(),
                        _ => {
                            disk.write_at(&file, blk * BS as u64, &mark(BS)).unwrap();
                        }
                    }
                }
            }));
        }
        let mut logs = Vec::new();
        for _ in 0..15 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            let r = t.cut().unwrap();
            let e = &r.disks[0];
            assert!(e.error.is_none(), "{e:?}");
            logs.push(e.log.clone().unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
        let r = t.cut().unwrap();
        logs.push(r.disks[0].log.clone().unwrap());
        for (ci, l) in logs.iter().enumerate() {
            apply_all(std::slice::from_ref(l), &copy);
            let img = std::fs::read(&copy).unwrap();
            for (b, blk) in img.chunks(BS / 2).enumerate() {
                assert!(
                    blk.chunks(16).all(|c| c == &blk[..16]),
                    "round {round}, cut {ci}: half block {b} is torn"
                );
            }
            std::fs::remove_file(l).unwrap();
        }
        let want = std::fs::read(dir.join("r.img")).unwrap();
        let got = std::fs::read(&copy).unwrap();
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "round {round}: the copy built from the logs differs from the disk at block {} (byte {i})",
                i / BS
            );
        }
    }
    // The cuts did log blocks from the kept copies (this test process's
    // count): the rounds above checked them, not only blocks read back.
    let (from_memory, read_back) = vdrep::tracking::kept::counts();
    assert!(
        from_memory > 0,
        "no block came from a kept copy ({read_back} read back)"
    );
}

/// Initial replication: a whole-disk cycle is streamed as of its cut while a
/// writer keeps going; the stream is interrupted (a "network" failure) and
/// resumed from where it stopped with a new cut; after the next delta log
/// the copy equals the live disk. Through `stream` (buffered reads) and
/// through `stream_into`, the sender's initial copy, whose long runs are
/// read with `O_DIRECT` while the writer's buffered writes sit in the page
/// cache.
#[test]
fn initial_copy_streams_as_of_cut_and_resumes_after_interruption() {
    initial_copy_case(false);
}

#[test]
fn initial_copy_read_past_the_page_cache_streams_as_of_cut_and_resumes() {
    initial_copy_case(true);
}

/// [`vdrep::tracking::CycleBuf`] over a sink: one reused buffer, each piece
/// passed on when the next one is asked for (as the sender's `PieceSink`).
struct ViaInto<'a> {
    buf: Vec<u8>,
    pending: Option<(u64, usize)>,
    sink: &'a mut vdrep::tracking::CycleSink<'a>,
}

impl ViaInto<'_> {
    fn flush(&mut self) -> Result<(), vdrep::tracking::StreamError> {
        if let Some((off, len)) = self.pending.take() {
            (self.sink)(off, &self.buf[..len])?;
        }
        Ok(())
    }
}

impl vdrep::tracking::CycleBuf for ViaInto<'_> {
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], vdrep::tracking::StreamError> {
        self.flush()?;
        // Garbage, not zeros: the tracker must write every byte it hands out.
        self.buf.clear();
        self.buf.resize(len, 0xA5);
        self.pending = Some((off, len));
        Ok(&mut self.buf[..len])
    }
}

fn stream_cycle(
    sc: &vdrep::tracking::SealedCycle,
    into: bool,
    sink: &mut vdrep::tracking::CycleSink<'_>,
) -> Result<(), vdrep::tracking::StreamError> {
    if !into {
        return sc.stream(0, sink);
    }
    let mut v = ViaInto {
        buf: Vec::new(),
        pending: None,
        sink,
    };
    sc.stream_into(0, &mut v)?;
    v.flush()
}

fn initial_copy_case(into: bool) {
    use std::collections::HashMap;
    use vdrep::tracking::CutSelect;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size: usize = 8 << 20;
    let init: Vec<u8> = (0..size).map(|i| (i / 4096 * 31 + i % 7) as u8).collect();
    std::fs::write(dir.join("v.img"), &init).unwrap();
    let t = Arc::new(tracker(dir, 4096));
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("v.img"))
            .unwrap(),
    );
    let disk = t.attach(Path::new("v.img"), &file).unwrap().unwrap();
    // A hole in the middle (read as zeros, not read at all by the stream).
    disk.fallocate(
        &file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5 << 20,
        1 << 20,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (disk, file, stop) = (disk.clone(), file.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 88172645463325252u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size as u64 - 10_000)) & !511;
                disk.write_at(&file, off, &[(n % 251) as u8 + 1; 3000])
                    .unwrap();
                n += 1;
                if n % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        })
    };
    let replica = dir.join("replica");
    let rf = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&replica)
        .unwrap();
    let write_sink = |off: u64, data: &[u8]| -> Result<(), vdrep::tracking::StreamError> {
        if data.iter().all(|&b| b == 0) {
            // zero range: extend/punch like a receiver would
            let end = off + data.len() as u64;
            if rf.metadata().unwrap().len() < end {
                rf.set_len(end).unwrap();
            }
            rf.write_all_at(data, off).unwrap();
        } else {
            rf.write_all_at(data, off).unwrap();
        }
        Ok(())
    };
    use std::os::unix::fs::FileExt;
    // First attempt dies at 3 MiB.
    let s1 = t
        .seal(&CutSelect {
            disks: Some(vec!["v.img".into()]),
            full_from: HashMap::from([("v.img".to_string(), 0)]),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s1.cycles.len(), 1);
    let sc1 = s1.cycles.into_iter().next().unwrap();
    assert_eq!(sc1.full_from, Some(0));
    let mut reached = 0u64;
    let r = stream_cycle(&sc1, into, &mut |off, data| {
        if off >= 3 << 20 {
            // The network went down.
            return Err(vdrep::tracking::StreamError::Stopped);
        }
        write_sink(off, data)?;
        reached = off + data.len() as u64;
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(reached, 3 << 20);
    t.finish(sc1, false).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    // Resume: everything from 3 MiB, plus whatever changed before it.
    let s2 = t
        .seal(&CutSelect {
            disks: Some(vec!["v.img".into()]),
            full_from: HashMap::from([("v.img".to_string(), reached)]),
            ..Default::default()
        })
        .unwrap();
    let sc2 = s2.cycles.into_iter().next().unwrap();
    let size2 = sc2.header.disk_size;
    stream_cycle(&sc2, into, &mut |off, data| write_sink(off, data)).unwrap();
    rf.set_len(size2).unwrap();
    t.finish(sc2, true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let c = t.cut().unwrap();
    assert_eq!(
        c.disks[0].base_cycle, s2.cycle,
        "the delta continues from the resumed copy"
    );
    apply_all(&[c.disks[0].log.clone().unwrap()], &replica);
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(dir.join("v.img")).unwrap(),
        "replica differs from the disk after initial copy + resume + delta"
    );
}

/// A cut whose cycle number cannot be saved (full or broken state folder)
/// fails cleanly: nothing is lost and the next cut, once the folder is
/// writable again, carries every change (before, the disk stayed "still
/// being written or shipped" until the daemon restarted).
#[test]
fn cut_that_cannot_save_its_cycle_gives_everything_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::copy(dir.join("d.raw"), dir.join("base")).unwrap();
    let t = tracker(dir, 4096);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("d.raw"))
        .unwrap();
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    disk.write_at(&file, 8192, &[0x33; 4096]).unwrap();
    // The atomic write of mount.json goes through this temporary name.
    let blocker = dir.join(".vdrep/.mount.json.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    assert!(
        t.cut().is_err(),
        "the cut must fail when mount.json cannot be written"
    );
    std::fs::remove_dir(&blocker).unwrap();
    disk.write_at(&file, 65536, &[0x44; 4096]).unwrap();
    let r = t.cut().unwrap();
    let log = r.disks[0]
        .log
        .clone()
        .unwrap_or_else(|| panic!("no log after the failed cut: {:?}", r.disks[0].error));
    apply_all(&[log], &dir.join("base"));
    assert!(std::fs::read(dir.join("base")).unwrap() == std::fs::read(dir.join("d.raw")).unwrap());
}

/// A sealed log is tracking's until shipped: handed out opened, with its
/// header, read in place, and gone once marked shipped; a damaged one still
/// comes out, saying why; a disk that needs a resync gets no log and the cut
/// says so by kind.
#[test]
fn sealed_logs_are_read_in_place_and_deleted_when_shipped() {
    use vdrep::tracking::CutErrorKind;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let t = tracker(dir, 4096);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("d.raw"))
        .unwrap();
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    disk.write_at(&file, 8192, &[0x55; 4096]).unwrap();
    let c1 = t.cut().unwrap();
    disk.write_at(&file, 4096, &[0x66; 100]).unwrap();
    let c2 = t.cut().unwrap();
    assert_eq!(t.pending_cycles("d.raw"), vec![c1.cycle, c2.cycle]);

    let log = t.sealed_log("d.raw", c1.cycle).unwrap();
    let shown = c1.disks[0].log.clone().unwrap();
    assert_eq!(log.shown(), shown.as_path());
    assert_eq!(log.len(), c1.disks[0].log_bytes);
    let h = log.header().unwrap();
    assert_eq!((h.cycle, h.base_cycle), (c1.cycle, c1.disks[0].base_cycle));
    // Positioned reads give the file's bytes, in any order.
    let whole = std::fs::read(&shown).unwrap();
    let mut tail = vec![0u8; 100];
    log.read_exact_at(&mut tail, log.len() - 100).unwrap();
    assert_eq!(tail[..], whole[whole.len() - 100..]);
    let mut all = vec![0u8; log.len() as usize];
    log.read_exact_at(&mut all, 0).unwrap();
    assert!(all == whole);
    log.mark_shipped();
    assert!(!shown.exists());
    assert_eq!(t.pending_cycles("d.raw"), vec![c2.cycle]);

    // A damaged header: the log is still handed out, with the reason.
    let shown2 = c2.disks[0].log.clone().unwrap();
    let mut bytes = std::fs::read(&shown2).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&shown2, &bytes).unwrap();
    let log2 = t.sealed_log("d.raw", c2.cycle).unwrap();
    assert!(log2.header().is_err());
    assert_eq!(log2.base_cycle(), None);
    log2.discard();
    assert!(t.pending_cycles("d.raw").is_empty());
    assert!(t.sealed_log("d.raw", c2.cycle).is_err());

    // A disk that needs a resync: no log, and the kind says why.
    t.require_resync("d.raw", "a test");
    disk.write_at(&file, 0, &[0x77; 10]).unwrap();
    let c3 = t.cut().unwrap();
    assert!(c3.disks[0].log.is_none());
    assert_eq!(c3.disks[0].kind, Some(CutErrorKind::ResyncRequired));
}

/// Cycle numbers are reserved in `mount.json` ahead of use (a cut does not
/// write it each time): after an unclean stop the next cut's number is
/// above every number used before; a clean stop keeps the numbering exact.
#[test]
fn cycle_numbers_only_grow_across_crashes_and_stay_exact_across_clean_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let saved = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(".vdrep/mount.json")).unwrap()).unwrap();
        v["cut_seq"].as_u64().unwrap()
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("d.raw"))
        .unwrap();
    let mut last = 0;
    {
        let t = tracker(dir, 4096);
        let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
        for i in 0..20u64 {
            disk.write_at(&file, i * 4096, &[0x55; 4096]).unwrap();
            let c = t.cut().unwrap().cycle;
            assert!(c > last, "cycle {c} after {last}");
            last = c;
        }
        // Durable ahead of what was used, so a crash cannot reuse one.
        assert!(saved() >= last, "mount.json {} < used {last}", saved());
        assert!(saved() > last, "no reservation: mount.json written per cut");
        // Dropped without a clean shutdown: a crash.
    }
    {
        let t = tracker(dir, 4096);
        t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
        let c = t.cut().unwrap().cycle;
        assert!(c > last, "after a crash: cycle {c}, but {last} was used");
        last = c;
        t.shutdown_clean().unwrap();
        assert_eq!(saved(), last, "a clean stop saves the exact number");
    }
    let t = tracker(dir, 4096);
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    disk.write_at(&file, 0, &[0x66; 4096]).unwrap();
    assert_eq!(t.cut().unwrap().cycle, last + 1);
}

/// The activity log file of the only disk tracked under `dir`.
fn activity_log_file(dir: &Path) -> PathBuf {
    let disks = dir.join(".vdrep/disks");
    std::fs::read_dir(&disks)
        .unwrap()
        .flatten()
        .map(|d| d.path().join("al"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no activity log under {}", disks.display()))
}

/// The extents named by the activity log file of the only disk under
/// `dir` (after the 24-byte header, one bit per extent), ascending.
fn named_extents(dir: &Path) -> Vec<u64> {
    std::fs::read(activity_log_file(dir)).unwrap()[24..]
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            (0..8)
                .filter(move |k| b & (1 << k) != 0)
                .map(move |k| i as u64 * 8 + k)
        })
        .collect()
}

/// `DIR/d.raw`, 16 MiB (sparse), opened read-write.
fn disk_16m(dir: &Path) -> File {
    File::create(dir.join("d.raw"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("d.raw"))
        .unwrap()
}

/// Crash (drop without a clean stop) after writes into two extents, do
/// `damage` to the state, reopen: the disk's resync scope and reason.
fn after_crash(damage: impl Fn(&Path)) -> (vdrep::tracking::ResyncScope, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let file = disk_16m(dir);
    {
        let t = tracker(dir, 4096);
        let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
        disk.write_at(&file, 4096, &[1; 4096]).unwrap();
        disk.write_at(&file, (9 << 20) + 4096, &[2; 4096]).unwrap();
    }
    damage(dir);
    let t = tracker(dir, 4096);
    t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    let st = t.status();
    let d = &st.disks[0];
    let vdrep::tracking::TrackState::ResyncRequired(why) = &d.state else {
        panic!("a disk after a crash is {:?}", d.state)
    };
    (d.resync_scope, why.clone())
}

/// Issue 15's fallbacks: after a crash, an intact activity log gives an
/// extents-only resync; a missing or damaged one a full resync that says
/// why.
#[test]
fn crash_without_a_usable_activity_log_needs_a_full_resync_and_says_why() {
    use vdrep::tracking::ResyncScope;
    let (scope, why) = after_crash(|_| {});
    assert_eq!(scope, ResyncScope::Extents, "{why}");
    assert!(why.contains("names 2 extent(s)"), "{why}");

    let (scope, why) = after_crash(|dir| std::fs::remove_file(activity_log_file(dir)).unwrap());
    assert_eq!(scope, ResyncScope::Full, "{why}");
    assert!(
        why.contains("stopped uncleanly") && why.contains("activity log is missing or damaged"),
        "{why}"
    );

    let (scope, why) = after_crash(|dir| {
        let p = activity_log_file(dir);
        let mut b = std::fs::read(&p).unwrap();
        b[0] ^= 0xff; // the magic
        std::fs::write(&p, b).unwrap();
    });
    assert_eq!(scope, ResyncScope::Full, "{why}");
    assert!(why.contains("activity log is missing or damaged"), "{why}");
}

/// A write whose extent cannot be recorded in the activity log is refused
/// (the guest gets the error) and reaches neither the disk nor the
/// tracking; writes into recorded extents go on. The log's file is made
/// immutable (`chattr +i`, so its `pwrite` fails with EPERM) while open.
#[test]
fn a_write_the_activity_log_cannot_record_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let file = disk_16m(dir);
    std::fs::write(dir.join("base"), vec![0u8; 16 << 20]).unwrap();
    let t = tracker(dir, 4096);
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    disk.write_at(&file, 0, &[1; 4096]).unwrap();
    let al = activity_log_file(dir);
    let chattr = |flag: &str| {
        let o = std::process::Command::new("chattr")
            .args([flag, al.to_str().unwrap()])
            .output()
            .expect("run chattr");
        assert!(o.status.success(), "chattr {flag}: {o:?}");
    };
    chattr("+i");
    let refused = disk.write_at(&file, 8 << 20, &[2; 4096]);
    let hot = disk.write_at(&file, 8192, &[3; 4096]);
    chattr("-i");
    let e = refused.expect_err("a write into a cold extent with a failing log was accepted");
    // No OS error code: the FUSE layer answers EIO (fuser's Errno::from).
    assert_eq!(e.raw_os_error(), None, "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("activity log failed"), "{e}");
    hot.expect("a write into a recorded extent");
    let mut b = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 8 << 20).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the refused write reached the disk"
    );
    // Tracking holds exactly the accepted writes.
    let r = t.cut().unwrap();
    assert_eq!(r.disks[0].dirty_blocks, 2, "{:?}", r.disks[0]);
    apply_all(&[r.disks[0].log.clone().unwrap()], &dir.join("base"));
    assert!(std::fs::read(dir.join("base")).unwrap() == std::fs::read(dir.join("d.raw")).unwrap());
    // Once the log can be written again, so can the disk.
    disk.write_at(&file, 8 << 20, &[2; 4096]).unwrap();
}

/// Recording ahead (issue 15, the write-path lever): a sequential writer
/// entering a cold extent at its first byte from a hot one records the next
/// `activity_ahead` extents in the same sync; a write elsewhere in a cold
/// extent records only its own. Durability stays whole: after a crash the
/// log names every extent written (and the ones recorded ahead).
#[test]
fn a_sequential_writer_records_extents_ahead() {
    let syncs_and_named = |ahead: u32, offsets: &[u64]| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        File::create(dir.join("d.raw"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("d.raw"))
            .unwrap();
        let cfg = TrackConfig {
            block_size: 4096,
            activity_ahead: ahead,
            ..TrackConfig::default()
        };
        let syncs = {
            let t = Tracker::open(open_root(dir), dir, cfg.clone()).unwrap();
            let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
            for &o in offsets {
                disk.write_at(&file, o, &[7; 1 << 20]).unwrap();
            }
            t.status().disks[0].activity_syncs.unwrap()
            // dropped without a clean stop: a crash
        };
        (syncs, named_extents(dir))
    };
    let mib = 1u64 << 20;
    let sweep: Vec<u64> = (0..64).map(|i| i * mib).collect();
    // 16 extents of 4 MiB, one sync each without recording ahead ...
    let (syncs, named) = syncs_and_named(0, &sweep);
    assert_eq!((syncs, named.len()), (16, 16));
    // ... 1 + 4 with 3 ahead (0; 1-4; 5-8; 9-12; 13-15, the end of the disk).
    let (syncs, named) = syncs_and_named(3, &sweep);
    assert_eq!(syncs, 5);
    assert_eq!(named, (0..16).collect::<Vec<u64>>());
    // Two extents written sequentially: the log also names the 3 ahead.
    let (syncs, named) = syncs_and_named(3, &sweep[..8]);
    assert_eq!((syncs, named), (2, vec![0, 1, 2, 3, 4]));
    // Writes not at an extent's first byte record only their own extent.
    let scattered = [mib, 5 * mib, 9 * mib + 4096, 33 * mib];
    let (syncs, named) = syncs_and_named(3, &scattered);
    assert_eq!((syncs, named), (4, vec![0, 1, 2, 8]));
}

/// The activity log's budget (`activity_hot`): extents whose writes are
/// durably tracked stay hot up to the budget, and above it the least
/// recently written leave first, so a writer that comes back to an extent
/// still hot pays no sync. With budget 0 every extent leaves at the next
/// finished cycle. Whatever the budget, the file names every extent
/// written since the last finished cycle.
#[test]
fn the_activity_log_keeps_recent_extents_up_to_its_budget() {
    let mib = 1u64 << 20;
    // (extent written, then a cut) ... ; the log's extents after each cut.
    let run = |hot: u32| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = disk_16m(dir);
        let cfg = TrackConfig {
            block_size: 4096,
            activity_ahead: 0,
            activity_hot: hot,
            ..TrackConfig::default()
        };
        let t = Tracker::open(open_root(dir), dir, cfg).unwrap();
        let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
        let mut after = Vec::new();
        for e in [0u64, 1, 2, 1, 3] {
            disk.write_at(&file, e * 4 * mib + 8192, &[e as u8 + 1; 4096])
                .unwrap();
            t.cut().unwrap();
            after.push(named_extents(dir));
        }
        // Not cut: a crash now must find extent 0 in the log.
        disk.write_at(&file, 4096, &[9; 4096]).unwrap();
        let crash = named_extents(dir);
        (t.status().disks[0].activity_syncs.unwrap(), after, crash)
    };
    let (syncs, after, crash) = run(2);
    assert_eq!(
        after,
        vec![
            vec![0],
            vec![0, 1],
            vec![1, 2], // 0 is the least recently written
            vec![1, 2], // 1 was hot: no sync
            vec![1, 3], // 2 is older than 1 (written again)
        ]
    );
    assert_eq!(syncs, 5, "0, 1, 2, 3 and 0 again; not 1 again");
    assert_eq!(crash, vec![0, 1, 3]);
    let (syncs, after, crash) = run(0);
    assert_eq!(after, vec![Vec::<u64>::new(); 5], "budget 0: all leave");
    assert_eq!(syncs, 6, "every write entered a cold extent");
    assert_eq!(crash, vec![0]);
}

/// The content of block `b` at generation `gen` (unique per pair: a reader
/// that logs the wrong block, or a block at the wrong moment, shows).
fn gen_block(b: u64, gen: u8) -> Vec<u8> {
    let mut v = vec![(b as u8) ^ gen.wrapping_mul(0x5b); 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8] = gen;
    v
}

/// A tracked 4 KiB-block disk `d.raw` of `nblocks` blocks at generation 0
/// ([`gen_block`]), and the model of its content.
struct GenDisk {
    img: PathBuf,
    model: Vec<u8>,
    t: Tracker,
    file: File,
    disk: Arc<TrackedDisk>,
}

fn gen_disk(dir: &Path, nblocks: u64) -> GenDisk {
    let img = dir.join("d.raw");
    let model: Vec<u8> = (0..nblocks).flat_map(|b| gen_block(b, 0)).collect();
    std::fs::write(&img, &model).unwrap();
    let t = tracker(dir, 4096);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let disk = t.attach(Path::new("d.raw"), &file).unwrap().unwrap();
    GenDisk {
        img,
        model,
        t,
        file,
        disk,
    }
}

/// A sealed cycle of many scattered dirty blocks (single blocks and short
/// runs) is read cold, with read-ahead hints a window ahead of the reader,
/// while blocks inside that window (hinted, not read yet), blocks already
/// read and clean blocks are overwritten (O_DIRECT where the file system
/// has it, as a VM writes). The stream must hold exactly the dirty blocks,
/// each as of the cut, and the next cycle's log must take a copy as of the
/// cut to the disk as it is now (no stale cached block leaks into it).
#[test]
fn scattered_dirty_blocks_stream_as_of_the_cut_while_overwritten_ahead_of_the_reader() {
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;
    const BS: u64 = 4096;
    const NBLOCKS: u64 = 8192; // 32 MiB
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let GenDisk {
        img,
        mut model,
        t,
        file,
        disk,
    } = gen_disk(dir, NBLOCKS);
    // The VM's handle: O_DIRECT when the file system allows it.
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img)
        .ok();
    let mut aligned = vec![0u8; 2 * BS as usize];
    let at = aligned.as_ptr().align_offset(BS as usize);
    let write = |b: u64, gen: u8, aligned: &mut Vec<u8>| {
        let data = gen_block(b, gen);
        match &direct {
            Some(d) => {
                let buf = &mut aligned[at..at + BS as usize];
                buf.copy_from_slice(&data);
                disk.write_at(d, b * BS, buf).unwrap()
            }
            None => disk.write_at(&file, b * BS, &data).unwrap(),
        }
    };
    // Cycle 1: ~1,500 scattered blocks, every 5th pick a run of 2-4.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut dirty = std::collections::BTreeSet::new();
    for i in 0..1200u64 {
        let b = next() % (NBLOCKS - 4);
        let run = if i % 5 == 0 { 2 + next() % 3 } else { 1 };
        for x in b..b + run {
            dirty.insert(x);
        }
    }
    for &b in &dirty {
        write(b, 1, &mut aligned);
        let o = (b * BS) as usize;
        model[o..o + BS as usize].copy_from_slice(&gen_block(b, 1));
    }
    // Cold: the reads below go to the disk, hinted ahead.
    file.sync_all().unwrap();
    // SAFETY: plain syscall on an open descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let at_cut = model.clone();
    let mut sealed = t.seal(&vdrep::tracking::CutSelect::default()).unwrap();
    assert_eq!(sealed.cycles.len(), 1);
    let sc = sealed.cycles.pop().unwrap();
    let order: Vec<u64> = dirty.iter().copied().collect();
    let mut got: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let (mut ahead_overwritten, mut gen) = (0u64, 2u8);
    sc.stream(0, &mut |off, data| {
        assert_eq!(off % BS, 0);
        for (i, blk) in data.chunks(BS as usize).enumerate() {
            let b = off / BS + i as u64;
            assert!(
                got.insert(b, blk.to_vec()).is_none(),
                "block {b} streamed twice"
            );
        }
        // Overwrite (after the cut) dirty blocks 3 and 40 places ahead of
        // the reader (inside the hinted window, not read yet), the block
        // just read, and a clean block.
        let last = (off + data.len() as u64) / BS - 1;
        let p = order.partition_point(|&b| b <= last);
        gen = if gen == 250 { 2 } else { gen + 1 };
        for q in [p + 3, p + 40] {
            if let Some(&b) = order.get(q) {
                write(b, gen, &mut aligned);
                let o = (b * BS) as usize;
                model[o..o + BS as usize].copy_from_slice(&gen_block(b, gen));
                ahead_overwritten += 1;
            }
        }
        let clean = (last * 7919 + 1) % NBLOCKS;
        for b in [last, clean] {
            write(b, gen, &mut aligned);
            let o = (b * BS) as usize;
            model[o..o + BS as usize].copy_from_slice(&gen_block(b, gen));
        }
        Ok(())
    })
    .unwrap();
    t.finish(sc, true).unwrap();
    assert!(
        ahead_overwritten > 1000,
        "only {ahead_overwritten} overwrites ahead of the reader"
    );
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        order,
        "the stream must hold exactly the dirty blocks"
    );
    for (b, data) in &got {
        let o = (*b * BS) as usize;
        assert!(
            data[..] == at_cut[o..o + BS as usize],
            "block {b}: streamed generation {} (first 8 bytes {:?}), not its content at the cut",
            data[8],
            &data[..8]
        );
    }
    // The next cycle: a copy as of the cut becomes the disk as it is now.
    let base = dir.join("base");
    std::fs::write(&base, &at_cut).unwrap();
    let r2 = t.cut().unwrap();
    apply_all(&[r2.disks[0].log.clone().unwrap()], &base);
    let now = std::fs::read(&img).unwrap();
    assert!(
        now == model,
        "the disk differs from the model of its writes"
    );
    let copy = std::fs::read(&base).unwrap();
    if let Some(i) = copy.iter().zip(&now).position(|(a, b)| a != b) {
        panic!("block {} differs after the next cycle's log", i as u64 / BS);
    }
}

/// The compare of a checksum resync ([`vdrep::tracking::CycleJudge`]): a
/// whole-disk cycle is hashed as of its cut without being passed on, judged
/// some pieces behind the hash pass (as the receiver's digests come back),
/// and only the blocks that differ from a damaged replica are taken, while
/// the VM overwrites blocks ahead of the hash pass, blocks hashed but not
/// judged yet, blocks already judged, and punches a hole. Every digest must
/// be the block's digest at the cut, every taken block its content at the
/// cut, and the next cycle's log must take the repaired replica to the
/// disk as it is now. Several seeds move the overwrites around.
#[test]
fn a_judged_compare_hashes_and_takes_blocks_as_of_the_cut_while_the_vm_writes() {
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use vdrep::resync::block_digest;
    use vdrep::tracking::CutSelect;
    const BS: u64 = 4096;
    const NBLOCKS: u64 = 6144; // 24 MiB
    for seed in [0x9e37_79b9_7f4a_7c15u64, 7, 0xdead_beef] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let GenDisk {
            img,
            mut model,
            t,
            file,
            disk,
        } = gen_disk(dir, NBLOCKS);
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // The replica: the disk with ~1 % of its blocks damaged.
        let mut replica = model.clone();
        let mut damaged = std::collections::BTreeSet::new();
        for _ in 0..NBLOCKS / 100 {
            let b = next() % NBLOCKS;
            replica[(b * BS) as usize + 100] ^= 0x5a;
            damaged.insert(b);
        }
        let at_cut = model.clone();
        let mut sealed = t
            .seal(&CutSelect {
                disks: Some(vec!["d.raw".into()]),
                full_from: HashMap::from([("d.raw".to_string(), 0)]),
                ..Default::default()
            })
            .unwrap();
        let sc = sealed.cycles.pop().unwrap();
        let judge = sc.judge();
        let write = |b: u64, gen: u8, model: &mut Vec<u8>| {
            disk.write_at(&file, b * BS, &gen_block(b, gen)).unwrap();
            let o = (b * BS) as usize;
            model[o..o + BS as usize].copy_from_slice(&gen_block(b, gen));
        };
        // Pieces hashed, waiting for their judgment (the receiver's digests).
        let mut unjudged: VecDeque<(u64, Vec<u128>)> = VecDeque::new();
        let mut taken: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut buf = Vec::new();
        let (mut hashed_to, mut judged_to, mut gen) = (0u64, 0u64, 1u8);
        let (mut into_unjudged, mut into_judged, mut ahead) = (0u64, 0u64, 0u64);
        let mut into_damaged = 0u64;
        let judge_one = |first: u64,
                         digests: Vec<u128>,
                         taken: &mut BTreeMap<u64, Vec<u8>>,
                         buf: &mut Vec<u8>| {
            for (i, d) in digests.iter().enumerate() {
                let b = first + i as u64;
                let o = (b * BS) as usize;
                assert_eq!(
                    *d,
                    block_digest(&at_cut[o..o + BS as usize]),
                    "seed {seed:#x}: block {b} hashed other than its content at the cut"
                );
                if *d != block_digest(&replica[o..o + BS as usize]) {
                    let n = judge.take(b, 1, buf).unwrap();
                    assert_eq!(n, BS as usize);
                    taken.insert(b, buf[..n].to_vec());
                }
            }
            judge.release(first, digests.len() as u64);
        };
        judge
            .digests(0, &block_digest, &mut |off, len, d| {
                assert_eq!(off, hashed_to * BS, "pieces come in order, without gaps");
                assert_eq!(d.len() as u64, (len as u64).div_ceil(BS));
                unjudged.push_back((off / BS, d.to_vec()));
                hashed_to = off / BS + d.len() as u64;
                // The receiver answers about three pieces behind.
                while unjudged.len() > 3 {
                    let (first, d) = unjudged.pop_front().unwrap();
                    judged_to = first + d.len() as u64;
                    judge_one(first, d, &mut taken, &mut buf);
                }
                gen = if gen == 250 { 1 } else { gen + 1 };
                let r = next();
                // Hashed, not judged yet: a damaged block (one the judgment
                // will take) when the window has one.
                if hashed_to > judged_to {
                    let hit: Vec<u64> = damaged.range(judged_to..hashed_to).copied().collect();
                    let b = match hit.len() {
                        0 => judged_to + r % (hashed_to - judged_to),
                        n => hit[(r % n as u64) as usize],
                    };
                    write(b, gen, &mut model);
                    into_unjudged += 1;
                    into_damaged += u64::from(!hit.is_empty());
                }
                // Judged already.
                if judged_to > 0 {
                    write((r >> 20) % judged_to, gen, &mut model);
                    into_judged += 1;
                }
                // Ahead of the hash pass.
                if hashed_to + 2 < NBLOCKS {
                    write(
                        hashed_to + (r >> 40) % (NBLOCKS - hashed_to),
                        gen,
                        &mut model,
                    );
                    ahead += 1;
                }
                if hashed_to == 64 * 2 {
                    // A hole punched across hashed and unhashed blocks.
                    let (o, l) = (60 * BS, 16 * BS);
                    disk.fallocate(
                        &file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        o,
                        l,
                    )
                    .unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                }
                Ok(())
            })
            .unwrap();
        while let Some((first, d)) = unjudged.pop_front() {
            judge_one(first, d, &mut taken, &mut buf);
        }
        assert_eq!(hashed_to, NBLOCKS, "seed {seed:#x}: every block hashed");
        assert!(into_unjudged > 20 && into_judged > 20 && ahead > 20);
        assert!(
            into_damaged > 10,
            "seed {seed:#x}: only {into_damaged} damaged blocks overwritten between hash and judgment"
        );
        // The taken blocks repair the replica to the disk at the cut.
        for (b, data) in &taken {
            let o = (*b * BS) as usize;
            assert!(
                data[..] == at_cut[o..o + BS as usize],
                "seed {seed:#x}: block {b} taken other than its content at the cut"
            );
            replica[o..o + BS as usize].copy_from_slice(data);
        }
        assert!(
            replica == at_cut,
            "seed {seed:#x}: the replica is not the disk at the cut"
        );
        t.finish(sc, true).unwrap();
        // The next cycle takes it to the disk as it is now.
        let base = dir.join("base");
        std::fs::write(&base, &replica).unwrap();
        let r2 = t.cut().unwrap();
        apply_all(&[r2.disks[0].log.clone().unwrap()], &base);
        assert!(
            std::fs::read(&img).unwrap() == model,
            "seed {seed:#x}: the disk differs from the model of its writes"
        );
        assert!(
            std::fs::read(&base).unwrap() == model,
            "seed {seed:#x}: the next cycle's log does not take the repaired replica to the disk"
        );
    }
}
