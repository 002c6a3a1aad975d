//! A cut locks only the disks it seals (`TrackedDisk::cut_lock`, taken in
//! id order), not the whole mount: these tests check what that must keep
//! and what it must give.
//!
//! - A cut of one disk goes through while another disk has a write in
//!   flight (a mount-wide lock would wait for it: the test would hang, and
//!   fails after a generous bound instead).
//! - A cut of several disks is still one instant across them: a writer that
//!   writes block `k` of one disk and, once that returned, block `k` of the
//!   other never finds the second write in a cut without the first (checked
//!   in both directions, since the locks are taken in id order).
//! - Cuts of overlapping sets of disks, selected in any order, with writes
//!   going on, never wait for each other in a circle, and every written
//!   block is in some cut or still in the live bitmap.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::bitmap::Bitmap;
use super::{CutSelect, TrackedDisk, Tracker};

const BS: u64 = 4096;
const BLOCKS: u64 = 2048;
/// Only a hang guard: every test here finishes in well under a second.
const HANG: Duration = Duration::from_secs(60);

struct Mount {
    _tmp: tempfile::TempDir,
    t: Arc<Tracker>,
    disks: Vec<(String, Arc<TrackedDisk>, Arc<File>)>,
}

fn mount(names: &[&str]) -> Mount {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    for n in names {
        File::create(dir.join(n))
            .and_then(|f| f.set_len(BLOCKS * BS))
            .expect("disk");
    }
    let t = Arc::new(super::stream_tests::tracker_at(dir));
    let disks = names
        .iter()
        .map(|n| {
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(n))
                    .expect("open"),
            );
            let d = t
                .attach(Path::new(n), &file)
                .expect("attach")
                .expect("tracked");
            (n.to_string(), d, file)
        })
        .collect();
    Mount {
        _tmp: tmp,
        t,
        disks,
    }
}

fn select(names: &[&str]) -> CutSelect {
    CutSelect {
        disks: Some(names.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// Seal `names` and finish every sealed cycle as shipped; the sealed
/// bitmap of each disk sealed.
fn cut(t: &Tracker, names: &[&str]) -> HashMap<String, Bitmap> {
    let sealed = t.seal(&select(names)).expect("seal");
    let mut out = HashMap::new();
    for sc in sealed.cycles {
        let words = sc.sealing.dirty.to_words();
        let bm = Bitmap::from_words(sc.sealing.dirty.len(), &words).expect("bitmap");
        out.insert(sc.header.disk_name.clone(), bm);
        t.finish(sc, true).expect("finish");
    }
    out
}

/// `f` on a thread; its result, or a failure naming `what` if it has not
/// returned within [`HANG`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} did not return: a lock waits where it must not"))
}

#[test]
fn a_cut_of_one_disk_does_not_wait_for_a_write_to_another() {
    let m = mount(&["a.img", "b.img"]);
    let (a, fa) = (m.disks[0].1.clone(), m.disks[0].2.clone());
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    // A write to a.img whose backing I/O does not finish until released.
    let writer = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        a.write_with(0, BS as usize, || {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
            fa.write_at(&[7u8; BS as usize], 0)
        })
    });
    started_rx.recv().expect("the write started");
    let t = m.t.clone();
    let sealed = within(
        "a cut of b.img while a.img has a write in flight",
        move || cut(&t, &["b.img"]),
    );
    assert!(sealed.contains_key("b.img"), "b.img was sealed");
    // The write to a.img is still in flight: it is in no cut yet, and a cut
    // of a.img (below) must count it.
    release_tx.send(()).expect("release");
    let n = writer.join().expect("writer").expect("write");
    assert_eq!(n as u64, BS);
    let sealed = cut(&m.t, &["a.img"]);
    assert!(sealed["a.img"].get(0), "the write is in a.img's next cut");
}

#[test]
fn a_cut_of_two_disks_is_one_instant_in_either_lock_order() {
    let m = mount(&["a.img", "b.img"]);
    let half = BLOCKS / 2;
    let done = Arc::new(AtomicBool::new(false));
    let cuts_done = Arc::new(AtomicU64::new(0));
    // Writer 0 writes a then b (blocks 0..half), writer 1 b then a (blocks
    // half..): whichever disk the cut locks first, one writer's second
    // write lands on the disk locked second. The writers keep pace with
    // the cuts (one cut per 64 blocks at least), so cuts fall between
    // their writes whatever the host's speed.
    let writers: Vec<_> = [(0usize, 1usize, 0u64), (1, 0, half)]
        .into_iter()
        .map(|(first, second, from)| {
            let d1 = (m.disks[first].1.clone(), m.disks[first].2.clone());
            let d2 = (m.disks[second].1.clone(), m.disks[second].2.clone());
            let cuts_done = cuts_done.clone();
            std::thread::spawn(move || {
                let data = [5u8; BS as usize];
                for i in 0..half {
                    while cuts_done.load(Ordering::SeqCst) < i / 64 {
                        std::thread::yield_now();
                    }
                    let blk = from + i;
                    d1.0.write_at(&d1.1, blk * BS, &data).expect("first write");
                    d2.0.write_at(&d2.1, blk * BS, &data).expect("second write");
                }
            })
        })
        .collect();
    let sealer = {
        let (t, done) = (m.t.clone(), done.clone());
        std::thread::spawn(move || {
            let mut cuts = Vec::new();
            loop {
                let last = done.load(Ordering::SeqCst);
                cuts.push(cut(&t, &["b.img", "a.img"]));
                cuts_done.fetch_add(1, Ordering::SeqCst);
                if last {
                    return cuts;
                }
            }
        })
    };
    within("the writers", move || {
        for w in writers {
            w.join().expect("writer");
        }
    });
    done.store(true, Ordering::SeqCst);
    let cuts = within("the sealer", move || sealer.join().expect("sealer"));
    assert!(cuts.len() >= 2, "{} cuts", cuts.len());
    let mut cum: [Vec<bool>; 2] = [vec![false; BLOCKS as usize], vec![false; BLOCKS as usize]];
    let mut interleaved = 0;
    for (i, c) in cuts.iter().enumerate() {
        for (k, name) in ["a.img", "b.img"].iter().enumerate() {
            let bm = c.get(*name).expect("both disks sealed in every cut");
            for blk in 0..BLOCKS {
                cum[k][blk as usize] |= bm.get(blk);
            }
        }
        // Writer 0 wrote a.img's block first: b.img's written blocks of its
        // range are a subset of a.img's, cut after cut; writer 1 the other
        // way round.
        for blk in 0..BLOCKS {
            let (first, second) = if blk < half { (0, 1) } else { (1, 0) };
            assert!(
                !cum[second][blk as usize] || cum[first][blk as usize],
                "cut {i}: block {blk} of the disk written second is in the cut without the first disk's write that returned before it"
            );
        }
        let n = (0..BLOCKS).filter(|&b| cum[0][b as usize]).count();
        if n > 0 && n < BLOCKS as usize {
            interleaved += 1;
        }
    }
    // Every write is in some cut (the last one came after the writers).
    assert!(
        cum.iter().all(|c| c.iter().all(|&x| x)),
        "a write is missing"
    );
    assert!(interleaved > 0, "no cut fell between the writes");
}

#[test]
fn cuts_of_overlapping_sets_in_any_order_never_deadlock_and_lose_nothing() {
    let names = ["a.img", "b.img", "c.img"];
    let m = mount(&names);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let ds: Vec<_> = m
                .disks
                .iter()
                .map(|(_, d, f)| (d.clone(), f.clone()))
                .collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let data = [w as u8; BS as usize];
                let mut written: Vec<Vec<u64>> = vec![Vec::new(); 3];
                let mut k = w as u64;
                while !stop.load(Ordering::SeqCst) {
                    let (i, blk) = ((k % 3) as usize, (k * 7919) % BLOCKS);
                    ds[i].0.write_at(&ds[i].1, blk * BS, &data).expect("write");
                    written[i].push(blk);
                    k += 1;
                }
                written
            })
        })
        .collect();
    // Overlapping selections, listed in different orders.
    let sets: [&[&str]; 4] = [
        &["a.img", "b.img"],
        &["c.img", "b.img"],
        &["c.img", "a.img", "b.img"],
        &["b.img"],
    ];
    let sealers: Vec<_> = sets
        .iter()
        .map(|set| {
            let t = m.t.clone();
            let set: Vec<&'static str> = set.to_vec();
            std::thread::spawn(move || {
                let mut seen: HashMap<String, Vec<Bitmap>> = HashMap::new();
                for _ in 0..100 {
                    for (n, bm) in cut(&t, &set) {
                        seen.entry(n).or_default().push(bm);
                    }
                }
                seen
            })
        })
        .collect();
    let seen = within("cuts of overlapping sets", move || {
        sealers
            .into_iter()
            .map(|s| s.join().expect("sealer"))
            .collect::<Vec<_>>()
    });
    stop.store(true, Ordering::SeqCst);
    let written = within("the writers", move || {
        writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .collect::<Vec<_>>()
    });
    let last = cut(&m.t, &names);
    for (i, name) in names.iter().enumerate() {
        let in_a_cut = |blk: u64| {
            last.get(*name).is_some_and(|b| b.get(blk))
                || seen
                    .iter()
                    .any(|s| s.get(*name).is_some_and(|v| v.iter().any(|b| b.get(blk))))
        };
        for w in &written {
            for &blk in &w[i] {
                assert!(
                    in_a_cut(blk),
                    "{name} block {blk} was written and is in no cut"
                );
            }
        }
    }
}

#[test]
fn a_cut_holds_every_disk_it_seals_until_the_last_write_in_flight_is_done() {
    let m = mount(&["a.img", "b.img"]);
    // The disk the cut locks first (lower id) and the other.
    let (mut i1, mut i2) = (0, 1);
    if m.disks[1].1.id < m.disks[0].1.id {
        (i1, i2) = (1, 0);
    }
    let first = (m.disks[i1].1.clone(), m.disks[i1].2.clone());
    let second = (m.disks[i2].1.clone(), m.disks[i2].2.clone());
    // A write to the second disk, in flight until released.
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let held = {
        let (d, f) = second.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            d.write_with(3 * BS, BS as usize, || {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                f.write_at(&[1u8; BS as usize], 3 * BS)
            })
        })
    };
    started_rx.recv().expect("the write started");
    let names: Vec<&'static str> = vec!["a.img", "b.img"];
    let sealer = {
        let t = m.t.clone();
        std::thread::spawn(move || cut(&t, &names))
    };
    // The cut has the first disk and waits for the second one's write.
    let lock = first.0.cut_lock.clone();
    within("the cut taking the first disk's lock", move || {
        while !lock.is_locked_exclusive() {
            std::thread::yield_now();
        }
    });
    // A write to the first disk now starts after the cut began: it must
    // wait for it, whatever the second disk is doing.
    let late = {
        let (d, f) = first.clone();
        std::thread::spawn(move || d.write_at(&f, 5 * BS, &[2u8; BS as usize]))
    };
    release_tx.send(()).expect("release");
    held.join().expect("held write").expect("write");
    let sealed = within("the cut", move || sealer.join().expect("sealer"));
    late.join().expect("late write").expect("write");
    let (n1, n2) = (&m.disks[i1].0, &m.disks[i2].0);
    assert!(sealed[n2].get(3), "the write in flight at the cut is in it");
    assert!(
        !sealed[n1].get(5),
        "a write that started after the cut locked its disk is in the cut"
    );
    let next = cut(&m.t, &["a.img", "b.img"]);
    assert!(next[n1].get(5), "the late write is in the next cut");
}

#[test]
fn a_freeze_stops_every_disk_and_attaching_one_until_it_ends() {
    let m = mount(&["a.img", "b.img"]);
    let dir = m._tmp.path().to_path_buf();
    File::create(dir.join("c.img"))
        .and_then(|f| f.set_len(BLOCKS * BS))
        .expect("disk");
    let (a, b) = (m.disks[0].1.clone(), m.disks[1].1.clone());
    let free = |d: &Arc<TrackedDisk>| {
        // A write's first step, without waiting: `None` while its disk's
        // cut lock is held exclusively.
        d.try_begin_write(0, BS as usize).expect("begin").is_some()
    };
    assert!(free(&a) && free(&b));
    let frozen = m.t.freeze_clean().expect("freeze");
    assert!(
        !free(&a) && !free(&b),
        "a disk takes writes during the freeze"
    );
    // A disk opened during the freeze is attached only after it (or, in
    // the moment before the freeze holds the cut serial, attached frozen).
    let attaching = {
        let t = m.t.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("c.img"))
                .expect("open");
            t.attach(Path::new("c.img"), &f)
                .expect("attach")
                .expect("tracked")
        })
    };
    drop(frozen);
    let c = within("attaching after the freeze", move || {
        attaching.join().expect("attach thread")
    });
    assert!(
        free(&a) && free(&b) && free(&c),
        "changes resume when the freeze ends"
    );
    let sealed = cut(&m.t, &["a.img", "b.img", "c.img"]);
    assert_eq!(sealed.len(), 3, "every disk is cut again");
}

#[test]
fn disks_attached_while_cuts_run_never_deadlock() {
    // An attach holds the disk table and used to take the cut serial; a
    // cut holds the cut serial and takes the disk table.
    let m = mount(&["a.img"]);
    let dir = m._tmp.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let sealer = {
        let (t, stop) = (m.t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let sealed = t.seal(&CutSelect::default()).expect("seal of every disk");
                for sc in sealed.cycles {
                    t.finish(sc, true).expect("finish");
                }
                n += 1;
            }
            n
        })
    };
    let t = m.t.clone();
    within("attaching 64 disks while cuts run", move || {
        for i in 0..64 {
            let p = dir.join(format!("n{i}.img"));
            File::create(&p)
                .and_then(|f| f.set_len(16 * BS))
                .expect("disk");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .expect("open");
            t.attach(Path::new(&format!("n{i}.img")), &f)
                .expect("attach")
                .expect("tracked");
        }
    });
    stop.store(true, Ordering::SeqCst);
    let cuts = within("the sealer", move || sealer.join().expect("sealer"));
    assert!(cuts > 0);
}
