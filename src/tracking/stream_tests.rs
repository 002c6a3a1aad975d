//! The stream of a sealed cycle reads the disk outside the sealing's state
//! lock (`TrackedDisk::fill_as_of_cut`): a VM write that lands after the
//! stream chose the blocks to read and before it read them (so the read
//! returns the VM's new bytes) must still leave the stream as of the cut.
//! A hook runs exactly there, so the interleaving is forced, not hoped for.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::{CutSelect, CycleBuf, StreamError, TrackConfig, TrackedDisk, Tracker};

type Hook = Box<dyn FnMut(u64, u64)>;

thread_local! {
    static BEFORE_READ: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Called by the stream after it chose which of blocks `b..ce` to read
/// (under the lock) and before it reads them (the lock free).
pub(super) fn before_read(b: u64, ce: u64) {
    // Taken out while it runs: the hook's own writes do not stream.
    let hook = BEFORE_READ.with(|h| h.borrow_mut().take());
    if let Some(mut f) = hook {
        f(b, ce);
        BEFORE_READ.with(|h| *h.borrow_mut() = Some(f));
    }
}

struct Hooked;

impl Hooked {
    fn set(f: impl FnMut(u64, u64) + 'static) -> Hooked {
        BEFORE_READ.with(|h| *h.borrow_mut() = Some(Box::new(f)));
        Hooked
    }
}

impl Drop for Hooked {
    fn drop(&mut self) {
        BEFORE_READ.with(|h| *h.borrow_mut() = None);
    }
}

const BS: u64 = 4096;
const SIZE: u64 = 4 << 20;

fn block(b: u64, gen: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| (b as u8).wrapping_mul(13) ^ gen ^ (i as u8))
        .collect()
}

struct Setup {
    tmp: tempfile::TempDir,
    t: Tracker,
    disk: Arc<TrackedDisk>,
    file: Arc<File>,
    before: Vec<u8>,
}

/// A tracker of the folder `dir` (its root opened as the mount opens it).
pub(super) fn tracker_at(dir: &Path) -> Tracker {
    let root: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .expect("root")
        .into();
    Tracker::open(root, dir, TrackConfig::default()).expect("tracker")
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let before: Vec<u8> = (0..SIZE / BS).flat_map(|b| block(b, 1)).collect();
    std::fs::write(dir.join("v.img"), &before).expect("disk");
    let t = tracker_at(dir);
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("v.img"))
            .expect("open"),
    );
    let disk = t
        .attach(Path::new("v.img"), &file)
        .expect("attach")
        .expect("tracked");
    Setup {
        tmp,
        t,
        disk,
        file,
        before,
    }
}

/// A whole-disk cut, as the initial copy and the resync take.
fn seal_whole(s: &Setup) -> super::SealedCycle {
    let sealed =
        s.t.seal(&CutSelect {
            disks: Some(vec!["v.img".into()]),
            full_from: HashMap::from([("v.img".to_string(), 0)]),
            ..Default::default()
        })
        .expect("seal");
    sealed.cycles.into_iter().next().expect("one cycle")
}

/// The VM overwrites the first, a middle and the last block of every piece
/// right before the stream reads it, and a block of the piece after it.
fn overwrite_each_piece(disk: Arc<TrackedDisk>, file: Arc<File>) -> Hooked {
    Hooked::set(move |b, ce| {
        for blk in [b, (b + ce) / 2, ce - 1, ce + 3] {
            if blk < SIZE / BS {
                let n = disk
                    .write_at(&file, blk * BS, &block(blk, 2))
                    .expect("VM write");
                assert_eq!(n as u64, BS);
            }
        }
    })
}

struct Collect(Vec<u8>);

impl CycleBuf for Collect {
    fn room(&mut self, off: u64, len: usize) -> Result<&mut [u8], StreamError> {
        let end = off as usize + len;
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        // Garbage: the stream must write every byte it hands out.
        self.0[off as usize..end].fill(0xA5);
        Ok(&mut self.0[off as usize..end])
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(BS as usize)
        .zip(b.chunks(BS as usize))
        .position(|(x, y)| x != y)
        .map(|p| p as u64)
}

fn digest(d: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(d)
}

/// `(block, digest)` of every block of the judged cycle.
fn all_digests(judge: &super::CycleJudge) -> Vec<(u64, u128)> {
    let mut digests = Vec::new();
    judge
        .digests(0, &digest, &mut |off, _len, ds| {
            digests.extend(
                ds.iter()
                    .enumerate()
                    .map(|(i, d)| (off / BS + i as u64, *d)),
            );
            Ok(())
        })
        .expect("digests");
    digests
}

fn assert_as_of_the_cut(digests: &[(u64, u128)], before: &[u8]) {
    assert_eq!(digests.len() as u64, SIZE / BS);
    for (b, d) in digests {
        let want = digest(&before[(b * BS) as usize..((b + 1) * BS) as usize]);
        assert_eq!(*d, want, "digest of block {b} is not as of the cut");
    }
}

#[test]
fn a_write_just_before_the_read_leaves_the_initial_copy_as_of_the_cut() {
    let s = setup();
    let sc = seal_whole(&s);
    let mut out = Collect(Vec::new());
    {
        let _h = overwrite_each_piece(s.disk.clone(), s.file.clone());
        sc.stream_into(0, &mut out).expect("stream");
    }
    assert_eq!(out.0.len() as u64, SIZE);
    assert_eq!(
        first_difference(&out.0, &s.before),
        None,
        "block differs from the disk as of the cut"
    );
    // And the VM's writes are on the disk.
    let now = std::fs::read(s.tmp.path().join("v.img")).expect("read");
    assert_eq!(now[..BS as usize], block(0, 2)[..]);
    s.t.finish(sc, true).expect("finish");
}

#[test]
fn a_write_just_before_the_read_leaves_a_log_stream_as_of_the_cut() {
    let s = setup();
    let sc = seal_whole(&s);
    let mut got = vec![0xA5u8; SIZE as usize];
    {
        let _h = overwrite_each_piece(s.disk.clone(), s.file.clone());
        sc.stream(0, &mut |off, data| {
            got[off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .expect("stream");
    }
    assert_eq!(
        first_difference(&got, &s.before),
        None,
        "block differs from the disk as of the cut"
    );
    s.t.finish(sc, true).expect("finish");
}

#[test]
fn a_write_just_before_the_read_leaves_the_compare_as_of_the_cut() {
    let s = setup();
    let sc = seal_whole(&s);
    let judge = sc.judge();
    let digests;
    {
        let _h = overwrite_each_piece(s.disk.clone(), s.file.clone());
        digests = all_digests(&judge);
    }
    assert_as_of_the_cut(&digests, &s.before);
    // The blocks the VM overwrote are taken as of the cut too.
    let mut buf = Vec::new();
    let n = judge.take(0, SIZE / BS, &mut buf).expect("take");
    assert_eq!(n as u64, SIZE);
    assert_eq!(first_difference(&buf[..n], &s.before), None);
    s.t.finish(sc, true).expect("finish");
}

/// The VM shrinks its disk to the middle of a block of the piece being
/// hashed, right after the hash pass chose the blocks to read (and after it
/// mapped the file for an earlier piece): the pass reads no page past the
/// new end (that would be a `SIGBUS`, killing the test), and every digest is
/// still of the disk as of the cut (the blocks cut off are saved first).
#[test]
fn a_shrink_just_before_the_read_leaves_the_compare_as_of_the_cut() {
    let s = setup();
    let sc = seal_whole(&s);
    let judge = sc.judge();
    let digests;
    let shrink_in = SIZE / BS / 2; // the piece holding this block
    let new_len = (shrink_in + 10) * BS + 100;
    {
        let (disk, file) = (s.disk.clone(), s.file.clone());
        let _h = Hooked::set(move |b, ce| {
            if (b..ce).contains(&shrink_in) {
                disk.set_len(&file, new_len).expect("VM shrink");
            }
        });
        digests = all_digests(&judge);
    }
    assert_eq!(
        std::fs::metadata(s.tmp.path().join("v.img"))
            .expect("stat")
            .len(),
        new_len,
        "the shrink happened"
    );
    assert_as_of_the_cut(&digests, &s.before);
    s.t.finish(sc, true).expect("finish");
}
