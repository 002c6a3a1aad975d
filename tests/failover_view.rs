//! Recovery points exposed while the replica moves on (in-process store):
//! point readers stay exact while applies (with grow, shrink and a prune)
//! run against the same disk; a point 100 cycles old reads back exactly,
//! directly and through the FUSE failover view (copy-on-write: writes to
//! the view never reach the replica). The view part needs root and
//! /dev/fuse (CI has both).

mod skip;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use vdrep::hrl::{HrlHeader, HrlWriter};
use vdrep::replica::{Consistency, DiskInfo, InitialData, RetentionPolicy, Store};
use vdrep::testview::{PointSel, Views};

const BS: u64 = 4096;
const ID: [u8; 16] = [0x17; 16];
const VM: &str = "vm1";
const SITE: &str = "siteA";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn make_log(path: &Path, base: u64, cycle: u64, old_size: u64, new: &[u8], dirty: &BTreeSet<u64>) {
    let h = HrlHeader {
        disk_id: ID,
        disk_name: "disk0.img".into(),
        cycle,
        base_cycle: base,
        block_size: BS as u32,
        base_size: old_size,
        disk_size: new.len() as u64,
        cut_unix_ns: 1_700_000_000_000_000_000 + cycle * 1_000_000_000,
        app_consistent: false,
    };
    let mut w = HrlWriter::create(path, &h).unwrap();
    for &b in dirty {
        let s = b * BS;
        if s >= new.len() as u64 {
            continue;
        }
        let e = (s + BS).min(new.len() as u64);
        w.append(s, &new[s as usize..e as usize]).unwrap();
    }
    w.finish().unwrap();
}

fn initial(store: &Store, data: &[u8], cycle: u64) {
    let site = store.site(SITE).unwrap();
    let info = DiskInfo {
        disk_id: ID,
        name: "disk0.img".into(),
        size: data.len() as u64,
        block_size: BS as u32,
        cycle,
    };
    site.begin_initial(VM, &info).unwrap();
    for (i, c) in data.chunks(1 << 20).enumerate() {
        site.write_initial(VM, &ID, (i << 20) as u64, InitialData::Data(c))
            .unwrap();
    }
    site.finish_initial(VM, &ID, cycle, 1_700_000_000_000_000_000)
        .unwrap();
    site.commit_point(VM, cycle, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
}

/// Change `disk` (random blocks, some in runs; optionally resized), ship
/// the change as log `cycle`, apply it and commit the point.
fn step(
    store: &Store,
    tmp: &Path,
    rng: &mut Rng,
    disk: &mut Vec<u8>,
    cycle: u64,
    writes: usize,
    resize: Option<u64>,
) {
    let old_size = disk.len() as u64;
    if let Some(n) = resize {
        disk.resize(n as usize, 0);
    }
    let blocks = disk.len() as u64 / BS;
    let mut dirty = BTreeSet::new();
    for _ in 0..writes {
        let b = rng.below(blocks);
        let run = 1 + rng.below(4);
        for k in b..(b + run).min(blocks) {
            rng.fill(&mut disk[(k * BS) as usize..((k + 1) * BS) as usize]);
            dirty.insert(k);
        }
    }
    // A grown tail is part of the log (as the sender would ship it).
    for k in old_size / BS..blocks {
        dirty.insert(k);
    }
    let log = tmp.join(format!("{cycle}.hrl"));
    make_log(&log, cycle - 1, cycle, old_size, disk, &dirty);
    let site = store.site(SITE).unwrap();
    site.store_log(VM, &ID, std::fs::File::open(&log).unwrap())
        .unwrap();
    site.apply(VM, &ID, cycle).unwrap();
    site.commit_point(VM, cycle, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    std::fs::remove_file(log).unwrap();
}

fn check_read(r: &vdrep::replica::PointReader, model: &[u8], off: u64, len: usize) {
    let mut buf = vec![0xeeu8; len];
    r.read_at(&mut buf, off).unwrap();
    let start = (off as usize).min(model.len());
    let end = (off as usize + len).min(model.len());
    let avail = end - start;
    assert!(
        buf[..avail] == model[start..end],
        "point {} differs from its content at [{off}, +{len})",
        r.cycle()
    );
    assert!(
        buf[avail..].iter().all(|&b| b == 0),
        "past the end reads zeros"
    );
}

/// Applies (with a grow, a shrink and a prune) race against reads of two
/// exposed points: an old one (undo layers) and the newest one at the
/// time it was opened (no layer: the replica itself). Every read equals
/// the point's content.
#[test]
fn applies_racing_reads_of_exposed_points() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut rng = Rng(0x5eed_1234);
    let mut disk = vec![0u8; 8 << 20];
    rng.fill(&mut disk);
    initial(&store, &disk, 1);
    let mut models = vec![Vec::new(), disk.clone()];
    for c in 2..=6 {
        step(&store, &logs, &mut rng, &mut disk, c, 40, None);
        models.push(disk.clone());
    }
    let site = store.site(SITE).unwrap();
    let old = site.read_point(VM, &ID, 3).unwrap();
    let newest = site.read_point(VM, &ID, 6).unwrap();
    store.pin(SITE, VM, 3);
    store.pin(SITE, VM, 6);
    assert_eq!(old.len(), models[3].len() as u64);
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        let applier = s.spawn(|| {
            let mut rng = Rng(77);
            let mut disk = disk.clone();
            for c in 7..=46 {
                let resize = match c {
                    20 => Some(disk.len() as u64 + (1 << 20)),
                    30 => Some(disk.len() as u64 - (3 << 20)),
                    _ => None,
                };
                step(&store, &logs, &mut rng, &mut disk, c, 60, resize);
                if c == 25 {
                    // Drop every point but the last two, except the pinned ones.
                    let keep = RetentionPolicy {
                        keep_last: Some(2),
                        ..Default::default()
                    };
                    let rep = store.site(SITE).unwrap().prune(VM, &keep).unwrap();
                    assert!(!rep.dropped_points.is_empty());
                    assert!(!rep.dropped_points.contains(&3) && !rep.dropped_points.contains(&6));
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        for t in 0..2u64 {
            let (old, newest, models, done, reads) = (&old, &newest, &models, &done, &reads);
            s.spawn(move || {
                let mut rng = Rng(1000 + t);
                while !done.load(Ordering::SeqCst) {
                    for (r, m) in [(old, &models[3]), (newest, &models[6])] {
                        let len = 1 + rng.below(1 << 20) as usize;
                        let off = rng.below(m.len() as u64 + 8192);
                        check_read(r, m, off, len);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        applier.join().unwrap();
    });
    assert!(
        reads.load(Ordering::Relaxed) > 20,
        "reads overlapped the applies"
    );
    assert!(old.layer_count() > 3 && newest.layer_count() >= 40);
    // Whole disks, after the dust settled, and freshly opened readers agree.
    check_read(&old, &models[3], 0, models[3].len());
    check_read(&newest, &models[6], 0, models[6].len());
    let pts: Vec<u64> = site.points(VM).unwrap().iter().map(|p| p.cycle).collect();
    assert!(
        pts.contains(&3) && pts.contains(&6),
        "pinned points survive prune: {pts:?}"
    );
    let again = site.read_point(VM, &ID, 3).unwrap();
    check_read(&again, &models[3], 0, models[3].len());
}

fn fuse_usable() -> bool {
    Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root()
}

/// A point 100 cycles old: read directly, then through the failover view
/// (VHD footer included, qemu-img reads it, writes stay in the overlay).
#[test]
fn point_100_cycles_old_reads_correctly_directly_and_through_the_view() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut rng = Rng(0xfeed);
    let mut disk = vec![0u8; 6 << 20];
    rng.fill(&mut disk[..2 << 20]);
    initial(&store, &disk, 1);
    let mut models = vec![Vec::new(), disk.clone()];
    for c in 2..=110 {
        step(&store, &logs, &mut rng, &mut disk, c, 8, None);
        models.push(disk.clone());
    }
    let site = store.site(SITE).unwrap();
    let t0 = Instant::now();
    let r = site.read_point(VM, &ID, 10).unwrap();
    println!(
        "opened point 10 (100 cycles old, {} undo layers) in {:?}",
        r.layer_count(),
        t0.elapsed()
    );
    assert_eq!(r.layer_count(), 100);
    check_read(&r, &models[10], 0, models[10].len());
    for _ in 0..200 {
        let off = rng.below(6 << 20);
        check_read(&r, &models[10], off, 1 + rng.below(300_000) as usize);
    }
    drop(r);
    if !fuse_usable() {
        skip::skip("SKIP view part: needs root and /dev/fuse");
        return;
    }
    let replica = site.replica_path(VM, &ID).unwrap();
    let before = std::fs::read(&replica).unwrap();
    let views = Views::new();
    let at = tmp.path().join("view");
    let t0 = Instant::now();
    let info = views
        .expose(
            &store,
            None,
            VM,
            PointSel::Cycle { cycle: 10 },
            Some(at.clone()),
        )
        .unwrap();
    println!("exposed point 10 in {:?}", t0.elapsed());
    assert_eq!(info.disks.len(), 1);
    let f = &info.disks[0].path;
    assert_eq!(f, &at.canonicalize().unwrap().join("disk0.vhd"));
    let bytes = std::fs::read(f).unwrap();
    assert_eq!(bytes.len(), (6 << 20) + 512);
    assert!(bytes[..6 << 20] == models[10][..], "view data = point 10");
    assert_eq!(
        &bytes[6 << 20..(6 << 20) + 8],
        b"conectix",
        "fixed VHD footer"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(f)
        .output();
    if let Ok(o) = out {
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "qemu-img info: {s}");
        assert!(s.contains(&format!("\"virtual-size\": {}", 6 << 20)), "{s}");
    }
    // A second test failover of the same VM is refused.
    let again = views.expose(
        &store,
        None,
        VM,
        PointSel::Latest,
        Some(tmp.path().join("v2")),
    );
    assert!(again.unwrap_err().to_string().contains("already running"));
    // Writes (partial blocks included) go to the overlay.
    let vf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f)
        .unwrap();
    vf.write_all_at(&[0xab; 10_000], 4096 * 3 + 100).unwrap();
    vf.write_all_at(&[0xcd; 1 << 20], 1 << 20).unwrap();
    let mut model = models[10].clone();
    model[4096 * 3 + 100..4096 * 3 + 100 + 10_000].fill(0xab);
    model[1 << 20..2 << 20].fill(0xcd);
    drop(vf);
    let bytes = std::fs::read(f).unwrap();
    assert!(
        bytes[..6 << 20] == model[..],
        "view = point 10 + the test writes"
    );
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        before,
        "replica untouched"
    );
    let (gone, _) = views.cleanup(&store, None, VM).unwrap();
    assert!(gone.written_bytes >= (1 << 20) + 10_000);
    assert!(!info.scratch.exists(), "scratch overlay deleted");
    assert!(
        std::fs::read_dir(&at).map_or(true, |mut d| d.next().is_none()),
        "unmounted"
    );
    assert!(store.pins(SITE, VM).is_empty(), "unpinned");
    // Exposing the point again shows the point, not the discarded writes.
    let info = views
        .expose(
            &store,
            None,
            VM,
            PointSel::Cycle { cycle: 10 },
            Some(at.clone()),
        )
        .unwrap();
    let bytes = std::fs::read(&info.disks[0].path).unwrap();
    assert!(bytes[..6 << 20] == models[10][..]);
    views.cleanup(&store, None, VM).unwrap();
}
