//! Replica store: chains of logs against a reference model, resends,
//! refusals, path escapes, recovery points (property test, prune), crash
//! injection at every step of an apply (child processes killed), random
//! kill -9, and a full receiver disk (tmpfs).

mod skip;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use vdrep::hrl::{HrlHeader, HrlWriter};
use vdrep::replica::{
    ApplyOutcome, Consistency, DiskInfo, InitialData, RetentionPolicy, Store, StoreError,
    StoreOutcome,
};

const BS: u64 = 4096;
const ID: [u8; 16] = [0x42; 16];
const VM: &str = "vm1";
const SITE: &str = "siteA";

/// Tiny deterministic PRNG (xorshift64*).
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

/// Write a log taking `old` (at `base`) to `new` (at `cycle`), containing
/// the blocks in `dirty` (block indices) plus everything needed for size changes.
fn make_log(
    path: &Path,
    id: [u8; 16],
    base: u64,
    cycle: u64,
    old_size: u64,
    new: &[u8],
    dirty: &BTreeSet<u64>,
) {
    let h = HrlHeader {
        disk_id: id,
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

fn info(size: u64) -> DiskInfo {
    DiskInfo {
        disk_id: ID,
        name: "disk0.img".into(),
        size,
        block_size: BS as u32,
        cycle: 1,
    }
}

/// Initial copy of `data` as cycle `cycle`.
fn initial(store: &Store, data: &[u8], cycle: u64) {
    let site = store.site(SITE).unwrap();
    let mut i = info(data.len() as u64);
    i.cycle = cycle;
    let st = site.begin_initial(VM, &i).unwrap();
    assert_eq!(st.resume_offset, 0);
    for (i, c) in data.chunks(64 << 10).enumerate() {
        let off = (i * (64 << 10)) as u64;
        if c.iter().all(|&b| b == 0) {
            site.write_initial(VM, &ID, off, InitialData::Zeroes(c.len() as u64))
                .unwrap();
        } else {
            site.write_initial(VM, &ID, off, InitialData::Data(c))
                .unwrap();
        }
    }
    site.finish_initial(VM, &ID, cycle, 0).unwrap();
}

fn read_replica(store: &Store) -> Vec<u8> {
    let site = store.site(SITE).unwrap();
    let st = site.disk_state(VM, &ID).unwrap();
    let p = site.replica_path(VM, &ID).unwrap();
    let mut v = std::fs::read(p).unwrap();
    // VhdOfRaw: strip the footer.
    assert_eq!(v.len() as u64, st.size + 512, "replica = data + footer");
    assert_eq!(&v[st.size as usize..st.size as usize + 8], b"conectix");
    v.truncate(st.size as usize);
    v
}

/// `qemu-img` agrees: the replica is a VHD of exactly the model's size and
/// content. Skipped (with a message) when qemu-img is missing.
fn qemu_compare(model: &[u8], replica: &Path, tmp: &Path) {
    let raw = tmp.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let info = match Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(replica)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            skip::skip(&format!("SKIP qemu-img checks: {e}"));
            return;
        }
    };
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(model.len() as u64), "{v}");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(&raw)
        .arg(replica)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_writes(rng: &mut Rng, disk: &mut [u8], n: usize) -> BTreeSet<u64> {
    let blocks = disk.len() as u64 / BS;
    let mut dirty = BTreeSet::new();
    for _ in 0..n {
        let b = rng.below(blocks);
        let s = (b * BS) as usize;
        match rng.below(4) {
            0 => disk[s..s + BS as usize].fill(0),
            1 => disk[s..s + BS as usize].fill(rng.below(256) as u8),
            _ => rng.fill(&mut disk[s..s + BS as usize]),
        }
        dirty.insert(b);
    }
    dirty
}

#[test]
fn chain_resend_out_of_order_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut rng = Rng(7);
    let mut disk = vec![0u8; 1 << 20];
    rng.fill(&mut disk[..300_000]);
    initial(&store, &disk, 1);
    assert_eq!(read_replica(&store), disk);
    let site = store.site(SITE).unwrap();
    let mut models = vec![(1u64, disk.clone())];
    for cycle in 2..=8u64 {
        let old = disk.len() as u64;
        let mut dirty = random_writes(&mut rng, &mut disk, 40);
        if cycle == 5 {
            disk.resize(3 << 19, 0); // grow
            dirty.insert(disk.len() as u64 / BS - 1);
            rng.fill(&mut disk[(3 << 19) - 4096..]);
        }
        if cycle == 7 {
            disk.truncate(900 * 1024); // shrink
        }
        let lp = logs.path().join(format!("{cycle}.hrl"));
        make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
        let out = site
            .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
            .unwrap();
        assert!(
            matches!(out, StoreOutcome::Stored { cycle: c, .. } if c == cycle),
            "{out:?}"
        );
        // Same log again before apply: already durable.
        let out = site
            .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
            .unwrap();
        assert_eq!(out, StoreOutcome::AlreadyStored { cycle });
        let out = site.apply(VM, &ID, cycle).unwrap();
        assert!(matches!(out, ApplyOutcome::Applied { cycle: c, .. } if c == cycle));
        assert_eq!(read_replica(&store), disk, "cycle {cycle}");
        site.commit_point(VM, cycle, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
        models.push((cycle, disk.clone()));
        // Resend of an applied log: acknowledged, nothing written.
        let out = site
            .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
            .unwrap();
        assert_eq!(
            out,
            StoreOutcome::AlreadyApplied {
                cycle,
                replica_cycle: cycle
            }
        );
        assert_eq!(
            site.apply(VM, &ID, cycle).unwrap(),
            ApplyOutcome::AlreadyApplied {
                cycle,
                replica_cycle: cycle
            }
        );
        assert_eq!(read_replica(&store), disk);
    }
    // Out of order: a log from base 10 to 11 while the replica is at 8.
    let lp = logs.path().join("gap.hrl");
    let mut d2 = disk.clone();
    let dirty = random_writes(&mut rng, &mut d2, 3);
    make_log(&lp, ID, 10, 11, disk.len() as u64, &d2, &dirty);
    site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap();
    let e = site.apply(VM, &ID, 11).unwrap_err();
    assert!(matches!(e, StoreError::OutOfOrder { .. }), "{e}");
    assert!(!e.retryable());
    assert!(
        e.to_string().contains("cycle 11") && e.to_string().contains("vm1"),
        "{e}"
    );
    // Diverged chain: base 6 < replica 8 < cycle 9.
    let lp = logs.path().join("div.hrl");
    make_log(&lp, ID, 6, 9, disk.len() as u64, &d2, &dirty);
    let e = site
        .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::OutOfOrder { .. }) && !e.retryable(),
        "{e}"
    );
    // Wrong identity: log of another disk.
    let lp = logs.path().join("other.hrl");
    make_log(&lp, [9; 16], 8, 9, disk.len() as u64, &d2, &dirty);
    let e = site
        .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::IdentityMismatch { .. }) && !e.retryable(),
        "{e}"
    );
    // Damaged log.
    make_log(&lp, ID, 8, 9, disk.len() as u64, &d2, &dirty);
    let mut bytes = std::fs::read(&lp).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    let e = site.store_log(VM, &ID, &bytes[..]).unwrap_err();
    assert!(matches!(e, StoreError::CorruptLog { .. }), "{e}");
    // Unknown disk.
    let e = site.apply(VM, &[1; 16], 2).unwrap_err();
    assert!(matches!(e, StoreError::NotReady { .. }), "{e}");
    assert_eq!(read_replica(&store), disk);
    // Renamed disk under the same id.
    let mut i = info(disk.len() as u64);
    i.name = "other.img".into();
    assert!(matches!(
        site.begin_initial(VM, &i),
        Err(StoreError::IdentityMismatch { .. })
    ));
    // Every point reads back.
    for (c, m) in &models[1..] {
        let r = site.read_point(VM, &ID, *c).unwrap();
        assert_eq!(r.len(), m.len() as u64);
        let mut buf = vec![0u8; m.len()];
        r.read_at(&mut buf, 0).unwrap();
        assert!(buf == *m, "point {c}");
    }
    qemu_compare(&disk, &site.replica_path(VM, &ID).unwrap(), logs.path());
    let pts = site.points(VM).unwrap();
    assert_eq!(pts.len(), 7);
    assert!(pts[..6].iter().all(|p| p.bytes > 0) && pts[6].bytes == 0);
    // A second process cannot open the same store.
    assert!(matches!(
        Store::open(&dir.path().join("store")),
        Err(StoreError::Locked { .. })
    ));
}

fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    fn walk(d: &Path, v: &mut Vec<(PathBuf, u64)>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                v.push((e.path(), if m.is_file() { m.len() } else { 0 }));
                if m.is_dir() {
                    walk(&e.path(), v);
                }
            }
        }
    }
    walk(dir, &mut v);
    v.sort();
    v
}

#[test]
fn path_escapes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    // A legitimate disk, so namespaces exist.
    let disk = vec![1u8; 64 << 10];
    initial(&store, &disk, 1);
    // Something outside the store to protect.
    std::fs::write(dir.path().join("victim"), b"keep").unwrap();
    let before = tree(dir.path());
    let bad = [
        "../x",
        "/etc/passwd",
        "/abs",
        "a/../../b",
        "..",
        ".",
        "",
        ".hidden",
        "a\0b",
        "a\\b",
        "..\\..\\x",
        "new\nline",
        "state.json",
        &"x".repeat(256),
    ];
    for b in bad {
        let e = store.site(b).err().expect(b);
        assert!(
            matches!(e, StoreError::InvalidName { .. }) && !e.retryable(),
            "{e}"
        );
        let site = store.site(SITE).unwrap();
        let e = site.begin_initial(b, &info(4096)).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "vm {b:?}: {e}");
        let mut i = info(4096);
        i.disk_id = [3; 16];
        i.name = b.to_string();
        let e = site.begin_initial(VM, &i).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidName { .. }),
            "disk {b:?}: {e}"
        );
        let e = site.apply(b, &ID, 2).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{e}");
        let e = site.store_log(b, &ID, &b"x"[..]).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{e}");
        assert!(site.points(b).is_err() && site.read_point(b, &ID, 1).is_err());
    }
    assert_eq!(before, tree(dir.path()), "nothing changed anywhere");
    // A symlink planted inside a namespace is not followed.
    let site = store.site(SITE).unwrap();
    std::os::unix::fs::symlink(dir.path(), root.join("sites/siteA/vms/evil")).unwrap();
    let before = tree(dir.path());
    let e = site.begin_initial("evil", &info(4096)).unwrap_err();
    assert!(matches!(e, StoreError::Escape { .. }), "{e}");
    assert_eq!(before, tree(dir.path()));
}

/// One step of the property test: writes (block, kind) then optional resize.
#[derive(Debug, Clone)]
struct Step {
    writes: Vec<(u64, u8)>,
    resize: Option<u64>,
    /// Commit the point as application-consistent.
    app: bool,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec((0u64..24, any::<u8>()), 0..12),
        proptest::option::weighted(0.2, 4u64..24),
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(writes, resize, app)| Step {
            writes,
            resize,
            app,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn every_point_reads_back(blocks in 4u64..24, steps in proptest::collection::vec(step_strategy(), 1..10), keep in 1usize..6, thin in 1u64..4) {
        let dir = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let mut disk = vec![0u8; (blocks * BS) as usize];
        for (i, b) in disk.iter_mut().enumerate() { *b = (i / 512) as u8 | 1; }
        initial(&store, &disk, 10);
        let site = store.site(SITE).unwrap();
        site.commit_point(VM, 10, &[ID], Consistency::Crash).unwrap().unwrap();
        let mut models = vec![(10u64, disk.clone())];
        let mut rng = Rng(99);
        for (k, s) in steps.iter().enumerate() {
            let cycle = 11 + k as u64;
            let old = disk.len() as u64;
            let mut dirty = BTreeSet::new();
            if let Some(nb) = s.resize { disk.resize((nb * BS) as usize, 0); }
            let nblocks = disk.len() as u64 / BS;
            for &(b, kind) in &s.writes {
                let b = b % nblocks;
                let r = (b * BS) as usize..((b + 1) * BS) as usize;
                match kind % 3 { 0 => disk[r].fill(0), 1 => disk[r].fill(kind), _ => rng.fill(&mut disk[r]) }
                dirty.insert(b);
            }
            let lp = logs.path().join(format!("{cycle}.hrl"));
            make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
            site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap()).unwrap();
            site.apply(VM, &ID, cycle).unwrap();
            let c = if s.app { Consistency::App } else { Consistency::Crash };
            site.commit_point(VM, cycle, &[ID], c).unwrap().unwrap();
            models.push((cycle, disk.clone()));
        }
        let check = |models: &[(u64, Vec<u8>)]| {
            for (c, m) in models {
                let r = site.read_point(VM, &ID, *c).unwrap();
                prop_assert_eq!(r.len(), m.len() as u64);
                let mut buf = vec![0xeeu8; m.len() + 100];
                r.read_at(&mut buf, 0).unwrap();
                prop_assert!(buf[..m.len()] == m[..], "point {}", c);
                prop_assert!(buf[m.len()..].iter().all(|&b| b == 0));
                // unaligned small reads
                let mut small = [0u8; 777];
                let off = (m.len() / 3) as u64;
                r.read_at(&mut small, off).unwrap();
                let end = (off as usize + 777).min(m.len());
                prop_assert!(small[..end - off as usize] == m[off as usize..end]);
            }
            Ok(())
        };
        check(&models)?;
        prop_assert_eq!(read_replica(&store), disk.clone());
        let undo = site.replica_path(VM, &ID).unwrap().parent().unwrap().join("undo");
        // Thin out: of all points (older than 0 s), keep the newest of each
        // `thin`-second interval; undo records are merged across the others.
        let thin_policy = RetentionPolicy {
            thin_after: Some(std::time::Duration::ZERO),
            thin_every: Some(std::time::Duration::from_secs(thin)),
            ..Default::default()
        };
        let before = site.points(VM).unwrap();
        let rep = site.prune(VM, &thin_policy).unwrap();
        let models: Vec<(u64, Vec<u8>)> = models
            .into_iter()
            .filter(|(c, _)| !rep.dropped_points.contains(c))
            .collect();
        // One point per interval: the newest app-consistent one if the
        // interval has one, else the newest (plus the newest point overall).
        let kept: Vec<u64> = site.points(VM).unwrap().iter().map(|p| p.cycle).collect();
        let slot = |p: &vdrep::replica::Point| p.time_unix_ns / (thin * 1_000_000_000);
        let newest = before.last().unwrap().cycle;
        for s in before.iter().map(slot).collect::<BTreeSet<_>>() {
            let group: Vec<_> = before.iter().filter(|p| slot(p) == s).collect();
            let want = group
                .iter()
                .rev()
                .find(|p| p.consistency == Consistency::App)
                .or(group.last())
                .unwrap()
                .cycle;
            let k: Vec<u64> = group.iter().map(|p| p.cycle).filter(|c| kept.contains(c)).collect();
            prop_assert!(k.contains(&want), "interval {}: kept {:?}, want {}", s, k, want);
            prop_assert!(k.len() == 1 || k.len() == 2 && k.contains(&newest), "interval {}: kept {:?}", s, k);
        }
        // Every dropped point above the oldest kept one was merged over.
        let oldest_kept = kept[0];
        prop_assert_eq!(rep.merged as usize, rep.dropped_points.iter().filter(|&&c| c > oldest_kept).count());
        check(&models)?;
        prop_assert_eq!(std::fs::read_dir(&undo).unwrap().count(), models.len() - 1);
        let rep = site.prune(VM, &RetentionPolicy { keep_last: Some(keep), ..Default::default() }).unwrap();
        let kept = models.len().min(keep);
        prop_assert_eq!(rep.dropped_points.len(), models.len() - kept);
        let (gone, left) = models.split_at(models.len() - kept);
        for (c, _) in gone {
            let gone_ok = matches!(site.read_point(VM, &ID, *c), Err(StoreError::NoSuchPoint { .. }));
            prop_assert!(gone_ok, "point {} should be gone", c);
        }
        check(left)?;
        prop_assert_eq!(site.points(VM).unwrap().len(), kept);
        // Only the undo records the kept points need remain.
        prop_assert_eq!(std::fs::read_dir(&undo).unwrap().count(), kept - 1);
        prop_assert_eq!(read_replica(&store), disk);
    }
}

// ---------------------------------------------------------------------
// Crash tests: the apply runs in a child process (this test binary re-run
// with VDREP_TEST_CHILD set) that dies at an injected step or is killed.

const STEPS: &[&str] = &[
    "log-tmp-synced",
    "log-renamed",
    "undo-written",
    "state-applying",
    "replica-half",
    "replica-synced",
    "state-applied",
    "log-removed",
];

/// Child entry point: store the log and apply it, printing what was
/// acknowledged. Does nothing in a normal test run.
#[test]
fn child_store_and_apply() {
    let Ok(spec) = std::env::var("VDREP_TEST_CHILD") else {
        return;
    };
    let mut it = spec.split('|');
    let root = PathBuf::from(it.next().unwrap());
    let log = PathBuf::from(it.next().unwrap());
    let cycle: u64 = it.next().unwrap().parse().unwrap();
    let store = Store::open(&root).unwrap();
    let site = store.site(SITE).unwrap();
    site.store_log(VM, &ID, std::fs::File::open(&log).unwrap())
        .unwrap();
    println!("ACK-DURABLE");
    site.apply(VM, &ID, cycle).unwrap();
    println!("ACK-APPLIED");
}

fn spawn_child(root: &Path, log: &Path, cycle: u64, crash_at: Option<&str>) -> std::process::Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_store_and_apply",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        "VDREP_TEST_CHILD",
        format!("{}|{}|{cycle}", root.display(), log.display()),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    match crash_at {
        Some(s) => c.env("VDREP_CRASH_AT", s),
        None => c.env_remove("VDREP_CRASH_AT"),
    };
    c.spawn().unwrap()
}

/// Set up a store at cycle 1 (point committed) and a log to cycle 2.
/// Returns (models at 1 and 2, log path).
fn crash_fixture(root: &Path, logdir: &Path, seed: u64, mb: usize) -> (Vec<u8>, Vec<u8>, PathBuf) {
    let mut rng = Rng(seed);
    let mut disk = vec![0u8; mb << 20];
    rng.fill(&mut disk[..(mb << 20) / 2]);
    {
        let store = Store::open(root).unwrap();
        initial(&store, &disk, 1);
        store
            .site(SITE)
            .unwrap()
            .commit_point(VM, 1, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
    }
    let m1 = disk.clone();
    let old = disk.len() as u64;
    let n = disk.len() / BS as usize / 3;
    let mut dirty = random_writes(&mut rng, &mut disk, n);
    disk.resize(disk.len() + (64 << 10), 0); // and grow
    rng.fill(&mut disk[(mb << 20) + 4096..(mb << 20) + 8192]);
    dirty.insert((mb as u64) << 20 >> 12 | 1);
    let log = logdir.join("2.hrl");
    make_log(&log, ID, 1, 2, old, &disk, &dirty);
    (m1, disk, log)
}

/// After a crash: recover, then the replica is exactly one of the models,
/// acknowledged durability holds, history is intact, and the log converges.
fn check_after_crash(
    root: &Path,
    log: &Path,
    m1: &[u8],
    m2: &[u8],
    acked_durable: bool,
    what: &str,
) {
    let store = Store::open(root).unwrap();
    let rep = store.recover().unwrap();
    assert!(rep.errors.is_empty(), "{what}: {:?}", rep.errors);
    let site = store.site(SITE).unwrap();
    let st = site.disk_state(VM, &ID).unwrap();
    assert_eq!(st.applying, None, "{what}");
    let now = read_replica(&store);
    match st.cycle {
        Some(1) => {
            assert!(
                now == m1,
                "{what}: state says cycle 1 but the replica differs"
            );
            assert!(
                !acked_durable,
                "{what}: a log acknowledged durable was lost"
            );
        }
        Some(2) => assert!(
            now == m2,
            "{what}: state says cycle 2 but the replica differs"
        ),
        other => panic!("{what}: cycle {other:?}"),
    }
    // The sender resends (it got no final ack) and applies: converges.
    site.store_log(VM, &ID, std::fs::File::open(log).unwrap())
        .unwrap();
    site.apply(VM, &ID, 2).unwrap();
    assert!(read_replica(&store) == m2, "{what}: after resend");
    // History: point 1 still readable.
    site.commit_point(VM, 2, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    let r = site.read_point(VM, &ID, 1).unwrap();
    let mut buf = vec![0u8; m1.len()];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf == m1, "{what}: point 1 after recovery");
    // Nothing left over.
    let ddir = site
        .replica_path(VM, &ID)
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert_eq!(
        std::fs::read_dir(ddir.join("incoming")).unwrap().count(),
        0,
        "{what}"
    );
    assert_eq!(
        std::fs::read_dir(ddir.join("undo")).unwrap().count(),
        1,
        "{what}"
    );
}

#[test]
fn crash_at_every_apply_step() {
    for (i, step) in STEPS.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (m1, m2, log) = crash_fixture(&root, dir.path(), 100 + i as u64, 1);
        let child = spawn_child(&root, &log, 2, Some(step));
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "step {step}: the child did not reach the crash point ({:?}, {stdout})",
            out.status
        );
        assert!(!stdout.contains("ACK-APPLIED"), "step {step}");
        let durable = stdout.contains("ACK-DURABLE");
        let expect_durable = !matches!(*step, "log-tmp-synced" | "log-renamed");
        assert_eq!(durable, expect_durable, "step {step}");
        check_after_crash(&root, &log, &m1, &m2, durable, step);
    }
}

#[test]
fn kill_9_at_random_times() {
    let mut rng = Rng(4242);
    let mut seen = BTreeSet::new();
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (m1, m2, log) = crash_fixture(&root, dir.path(), 500 + round, 8);
        let mut child = spawn_child(&root, &log, 2, None);
        std::thread::sleep(std::time::Duration::from_millis(rng.below(400)));
        let _ = child.kill(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let durable = stdout.contains("ACK-DURABLE");
        seen.insert((durable, stdout.contains("ACK-APPLIED")));
        check_after_crash(&root, &log, &m1, &m2, durable, &format!("round {round}"));
    }
    println!("outcomes seen (durable, applied): {seen:?}");
}

#[test]
fn initial_copy_resumes_after_crash() {
    // Child: copy 160 MiB (mostly zero ranges, some data) and crash at the
    // first durable progress mark.
    if let Ok(root) = std::env::var("VDREP_TEST_INITIAL_CHILD") {
        let store = Store::open(Path::new(&root)).unwrap();
        let site = store.site(SITE).unwrap();
        site.begin_initial(VM, &info(160 << 20)).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..160u64 {
            let d = if i % 16 == 0 {
                InitialData::Data(&chunk)
            } else {
                InitialData::Zeroes(1 << 20)
            };
            site.write_initial(VM, &ID, i << 20, d).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "initial_copy_resumes_after_crash", "--nocapture"])
        .env("VDREP_TEST_INITIAL_CHILD", &root)
        .env("VDREP_CRASH_AT", "initial-progress")
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "child should have crashed");
    let store = Store::open(&root).unwrap();
    store.recover().unwrap();
    let site = store.site(SITE).unwrap();
    let st = site.begin_initial(VM, &info(160 << 20)).unwrap();
    assert_eq!(st.resume_offset, 64 << 20, "resumes at the durable mark");
    let e = site.finish_initial(VM, &ID, 2, 0).unwrap_err();
    assert!(matches!(e, StoreError::IdentityMismatch { .. }), "{e}");
    let chunk = vec![0x5au8; 1 << 20];
    for i in (st.resume_offset >> 20)..160 {
        if i % 16 == 0 {
            site.write_initial(VM, &ID, i << 20, InitialData::Data(&chunk))
                .unwrap();
        } // gaps are zeroed by the store
    }
    site.finish_initial(VM, &ID, 1, 0).unwrap();
    let r = read_replica(&store);
    for (i, c) in r.chunks(1 << 20).enumerate() {
        let want = if i % 16 == 0 { 0x5a } else { 0 };
        assert!(c.iter().all(|&b| b == want), "MiB {i}");
    }
    drop(store);
    // A copy of another cut (or size) does not resume: it restarts at 0.
    let dir2 = tempfile::tempdir().unwrap();
    let store = Store::open(dir2.path()).unwrap();
    let site = store.site(SITE).unwrap();
    site.begin_initial(VM, &info(128 << 20)).unwrap();
    site.write_initial(VM, &ID, 0, InitialData::Zeroes(80 << 20))
        .unwrap();
    assert_eq!(
        site.begin_initial(VM, &info(128 << 20))
            .unwrap()
            .resume_offset,
        80 << 20
    );
    let mut other_cut = info(128 << 20);
    other_cut.cycle = 2;
    assert_eq!(site.begin_initial(VM, &other_cut).unwrap().resume_offset, 0);
    assert_eq!(site.begin_initial(VM, &other_cut).unwrap().resume_offset, 0);
    site.write_initial(VM, &ID, 0, InitialData::Zeroes(80 << 20))
        .unwrap();
    assert_eq!(
        site.begin_initial(VM, &info(96 << 20))
            .unwrap()
            .resume_offset,
        0,
        "other size"
    );
}

// ---------------------------------------------------------------------
// Disk full.

struct Tmpfs(PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Fill the file system holding `dir` until only about `leave` bytes remain.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0xffu8; 64 << 10];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    drop(f);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(n.saturating_sub(leave)).unwrap();
    p
}

#[test]
fn disk_full_is_retryable_and_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m"),
    ) {
        skip::skip(&format!(
            "SKIP disk_full_is_retryable_and_harmless: cannot mount a tmpfs ({e}); run as root"
        ));
        return;
    }
    let _m = Tmpfs(mnt.clone());
    let logs = tempfile::tempdir().unwrap();
    let root = mnt.join("store");
    let store = Store::open(&root).unwrap();
    let mut rng = Rng(1);
    // 4 MiB disk, first 1 MiB data, rest holes.
    let mut disk = vec![0u8; 4 << 20];
    rng.fill(&mut disk[..1 << 20]);
    initial(&store, &disk, 1);
    let site = store.site(SITE).unwrap();
    let m1 = disk.clone();
    // Log 2 fills 2.5 MiB of holes with random data.
    rng.fill(&mut disk[(1 << 20)..(7 << 19)]);
    let dirty: BTreeSet<u64> = ((1 << 20) / BS..(7 << 19) / BS).collect();
    let lp = logs.path().join("2.hrl");
    make_log(&lp, ID, 1, 2, disk.len() as u64, &disk, &dirty);
    let m2 = disk.clone();

    // 1. No room for the log itself.
    let filler = fill(&mnt, 1 << 20);
    let e = site
        .store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::NoSpace { .. }) && e.retryable(),
        "{e}"
    );
    assert!(e.to_string().contains("free space in"), "{e}");
    std::fs::remove_file(&filler).unwrap();
    let ddir = site
        .replica_path(VM, &ID)
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert_eq!(
        std::fs::read_dir(ddir.join("incoming")).unwrap().count(),
        0,
        "no temp left"
    );
    assert!(matches!(
        site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
            .unwrap(),
        StoreOutcome::Stored { .. }
    ));

    // 2. Room for the undo record but not for the new data in the replica.
    let filler = fill(&mnt, 1 << 20);
    let e = site.apply(VM, &ID, 2).unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert!(
        e.to_string().contains("applying cycle 2 to the replica"),
        "the failure must come from writing the replica (rollback path): {e}"
    );
    let st = site.disk_state(VM, &ID).unwrap();
    assert_eq!((st.cycle, st.applying), (Some(1), None), "rolled back");
    assert!(read_replica(&store) == m1, "replica intact at cycle 1");
    drop(store);
    // Still intact after a restart + recovery with the disk still full.
    let store = Store::open(&root).unwrap();
    let rep = store.recover().unwrap();
    let site = store.site(SITE).unwrap();
    assert!(
        !rep.errors.is_empty(),
        "recovery tried the pending log: {rep:?}"
    );
    assert!(read_replica(&store) == m1);
    assert_eq!(site.disk_state(VM, &ID).unwrap().cycle, Some(1));

    // 3. Space freed: the same log applies.
    std::fs::remove_file(&filler).unwrap();
    site.apply(VM, &ID, 2).unwrap();
    assert!(read_replica(&store) == m2);
    site.commit_point(VM, 2, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();

    // 4. Undo record does not fit: log 3 overwrites the data (pre-images
    // are real data) — refused before the replica is touched.
    rng.fill(&mut disk[..(3 << 19)]);
    let dirty: BTreeSet<u64> = (0..(3 << 19) / BS).collect();
    let lp3 = logs.path().join("3.hrl");
    make_log(&lp3, ID, 2, 3, disk.len() as u64, &disk, &dirty);
    site.store_log(VM, &ID, std::fs::File::open(&lp3).unwrap())
        .unwrap();
    let filler = fill(&mnt, 512 << 10);
    let e = site.apply(VM, &ID, 3).unwrap_err();
    assert!(
        matches!(e, StoreError::NoSpace { .. }) && e.retryable(),
        "{e}"
    );
    assert!(read_replica(&store) == m2, "replica intact at cycle 2");
    assert_eq!(site.disk_state(VM, &ID).unwrap().cycle, Some(2));
    std::fs::remove_file(&filler).unwrap();
    site.apply(VM, &ID, 3).unwrap();
    assert!(read_replica(&store) == disk);
}

#[test]
fn points_need_every_disk_and_age_retention() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let site = store.site(SITE).unwrap();
    let a = [0xa; 16];
    let b = [0xb; 16];
    let mut rng = Rng(5);
    let mut disks = vec![vec![0u8; 256 << 10], vec![0u8; 128 << 10]];
    // The second disk is a VHD source: replicated byte for byte.
    for ((id, name), d) in [(a, "a.raw"), (b, "b.vhd")]
        .into_iter()
        .zip(disks.iter_mut())
    {
        rng.fill(d);
        let i = DiskInfo {
            disk_id: id,
            name: name.into(),
            size: d.len() as u64,
            block_size: BS as u32,
            cycle: 1,
        };
        site.begin_initial(VM, &i).unwrap();
        site.write_initial(VM, &id, 0, InitialData::Data(d))
            .unwrap();
        site.finish_initial(VM, &id, 1, 1).unwrap();
    }
    assert!(site.replica_path(VM, &a).unwrap().ends_with("a.vhd"));
    assert!(site.replica_path(VM, &b).unwrap().ends_with("b.vhd"));
    assert_eq!(
        std::fs::read(site.replica_path(VM, &b).unwrap()).unwrap(),
        disks[1],
        "byte for byte, no footer"
    );
    site.commit_point(VM, 1, &[a, b], Consistency::App)
        .unwrap()
        .unwrap();
    let mut models = vec![disks.clone()];
    let log_for = |id: [u8; 16], d: &mut Vec<u8>, rng: &mut Rng, cycle: u64| {
        let dirty = random_writes(rng, d, 5);
        let lp = logs.path().join(format!("{}-{cycle}.hrl", id[0]));
        make_log(&lp, id, cycle - 1, cycle, d.len() as u64, d, &dirty);
        lp
    };
    for cycle in 2..=3u64 {
        let la = log_for(a, &mut disks[0], &mut rng, cycle);
        let lb = log_for(b, &mut disks[1], &mut rng, cycle);
        site.store_log(VM, &a, std::fs::File::open(&la).unwrap())
            .unwrap();
        site.apply(VM, &a, cycle).unwrap();
        // b has not reached the cycle: no point yet.
        assert_eq!(
            site.commit_point(VM, cycle, &[a, b], Consistency::Crash)
                .unwrap(),
            None
        );
        site.store_log(VM, &b, std::fs::File::open(&lb).unwrap())
            .unwrap();
        site.apply(VM, &b, cycle).unwrap();
        models.push(disks.clone());
        if cycle == 3 {
            // Committed late, after both moved on: still consistent via history.
            let lb4 = log_for(b, &mut disks[1], &mut rng, 4);
            site.store_log(VM, &b, std::fs::File::open(&lb4).unwrap())
                .unwrap();
            site.apply(VM, &b, 4).unwrap();
        }
        let pt = site
            .commit_point(VM, cycle, &[a, b], Consistency::Crash)
            .unwrap()
            .unwrap();
        assert_eq!(pt.cycle, cycle);
    }
    let pts = site.points(VM).unwrap();
    assert_eq!(pts.iter().map(|p| p.cycle).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(pts[0].consistency, Consistency::App);
    for (k, m) in models.iter().enumerate() {
        let c = k as u64 + 1;
        for (id, want) in [(a, &m[0]), (b, &m[1])] {
            let r = site.read_point(VM, &id, c).unwrap();
            let mut buf = vec![0u8; want.len()];
            r.read_at(&mut buf, 0).unwrap();
            assert!(buf == *want, "disk {} point {c}", id[0]);
        }
    }
    // Age retention: the logs' cut times are in 2023, so a day's age keeps
    // only the newest point; a century keeps all.
    let keep_all = RetentionPolicy {
        keep_last: None,
        max_age: Some(std::time::Duration::from_secs(100 * 365 * 86400)),
        ..Default::default()
    };
    assert!(site.prune(VM, &keep_all).unwrap().dropped_points.is_empty());
    let day = RetentionPolicy {
        keep_last: None,
        max_age: Some(std::time::Duration::from_secs(86400)),
        ..Default::default()
    };
    let rep = site.prune(VM, &day).unwrap();
    assert_eq!(rep.dropped_points, [1, 2]);
    assert!(rep.freed_bytes > 0);
    assert!(site.read_point(VM, &a, 1).is_err());
    let r = site.read_point(VM, &b, 3).unwrap();
    let mut buf = vec![0u8; models[2][1].len()];
    r.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == models[2][1],
        "b at point 3 after prune (b is at cycle 4)"
    );
}

#[test]
fn store_is_send_and_sync() {
    fn f<T: Send + Sync>() {}
    f::<Store>();
}

/// Figures (not a timed test): `cargo test --test replica_store -- --ignored --nocapture perf`.
#[test]
#[ignore]
fn perf_store_apply_read_point() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let size = 1u64 << 30;
    let site = store.site(SITE).unwrap();
    let t = Instant::now();
    site.begin_initial(VM, &info(size)).unwrap();
    let mut rng = Rng(3);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..(size >> 20) {
        rng.fill(&mut chunk);
        site.write_initial(VM, &ID, i << 20, InitialData::Data(&chunk))
            .unwrap();
    }
    site.finish_initial(VM, &ID, 1, 0).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!("initial 1 GiB: {secs:.2} s, {:.0} MiB/s", 1024.0 / secs);
    site.commit_point(VM, 1, &[ID], Consistency::Crash).unwrap();
    // 1% of the 4 KiB blocks, random.
    let blocks = size / BS;
    let mut dirty = BTreeSet::new();
    while dirty.len() < (blocks / 100) as usize {
        dirty.insert(rng.below(blocks));
    }
    let lp = dir.path().join("2.hrl");
    let h = HrlHeader {
        disk_id: ID,
        disk_name: "disk0.img".into(),
        cycle: 2,
        base_cycle: 1,
        block_size: BS as u32,
        base_size: size,
        disk_size: size,
        cut_unix_ns: 0,
        app_consistent: false,
    };
    let mut w = HrlWriter::create(&lp, &h).unwrap();
    let mut blk = vec![0u8; BS as usize];
    for &b in &dirty {
        rng.fill(&mut blk);
        w.append(b * BS, &blk).unwrap();
    }
    let sum = w.finish().unwrap();
    let t = Instant::now();
    site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap();
    let t_store = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = site.apply(VM, &ID, 2).unwrap();
    let t_apply = t.elapsed().as_secs_f64();
    println!(
        "delta 1% of 4 KiB blocks ({} blocks, log {} MiB): store_log {t_store:.3} s, apply {t_apply:.3} s, {out:?}",
        dirty.len(),
        sum.file_bytes >> 20
    );
    site.commit_point(VM, 2, &[ID], Consistency::Crash).unwrap();
    let t = Instant::now();
    let r = site.read_point(VM, &ID, 1).unwrap();
    let t_open = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..(size >> 20) {
        r.read_at(&mut buf, i << 20).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "read_point(1): open {:.1} ms, full read {secs:.2} s ({:.0} MiB/s)",
        t_open * 1000.0,
        1024.0 / secs
    );
}

/// Child entry point for the prune crash test. Does nothing normally.
#[test]
fn child_prune() {
    let Ok(root) = std::env::var("VDREP_TEST_PRUNE") else {
        return;
    };
    let store = Store::open(Path::new(&root)).unwrap();
    store.site(SITE).unwrap().prune(VM, &thin_all()).unwrap();
}

/// Keep the newest point of each 1000 s: the test's points (1 s apart)
/// collapse into one, except point 1 (time 0).
fn thin_all() -> RetentionPolicy {
    RetentionPolicy {
        thin_after: Some(std::time::Duration::ZERO),
        thin_every: Some(std::time::Duration::from_secs(1000)),
        ..Default::default()
    }
}

#[test]
fn crash_while_merging_history() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut rng = Rng(77);
    let mut disk = vec![0u8; 256 << 10];
    rng.fill(&mut disk);
    let mut models = vec![disk.clone()];
    {
        let store = Store::open(&root).unwrap();
        initial(&store, &disk, 1);
        let site = store.site(SITE).unwrap();
        site.commit_point(VM, 1, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
        for cycle in 2..=6u64 {
            let old = disk.len() as u64;
            let dirty = random_writes(&mut rng, &mut disk, 20);
            let lp = dir.path().join(format!("{cycle}.hrl"));
            make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
            site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
                .unwrap();
            site.apply(VM, &ID, cycle).unwrap();
            site.commit_point(VM, cycle, &[ID], Consistency::Crash)
                .unwrap()
                .unwrap();
            models.push(disk.clone());
        }
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_prune", "--nocapture"])
        .env("VDREP_TEST_PRUNE", &root)
        .env("VDREP_CRASH_AT", "undo-merged")
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "crashed mid-merge"
    );
    let store = Store::open(&root).unwrap();
    store.recover().unwrap();
    let site = store.site(SITE).unwrap();
    let kept: Vec<u64> = site.points(VM).unwrap().iter().map(|p| p.cycle).collect();
    assert_eq!(kept, [1, 6]);
    let undo = site
        .replica_path(VM, &ID)
        .unwrap()
        .parent()
        .unwrap()
        .join("undo");
    let n_before = std::fs::read_dir(&undo).unwrap().count();
    assert_eq!(n_before, 6, "5 records + 1 merged one, redundant");
    let check = |site: &vdrep::replica::Site<'_>| {
        for c in [1u64, 6] {
            let m = &models[c as usize - 1];
            let r = site.read_point(VM, &ID, c).unwrap();
            let mut buf = vec![0u8; m.len()];
            r.read_at(&mut buf, 0).unwrap();
            assert!(buf == *m, "point {c}");
        }
    };
    check(&site);
    let rep = site.prune(VM, &thin_all()).unwrap();
    assert_eq!(rep.merged, 3);
    assert_eq!(
        std::fs::read_dir(&undo).unwrap().count(),
        1,
        "one merged record 1-6"
    );
    check(&site);
    assert!(read_replica(&store) == models[5]);
}

/// Digests for a checksum resync (`Site::block_hashes`): equal to hashing
/// the replica's bytes, whole 8 MiB pieces that are holes of the replica
/// file (skipped via `SEEK_DATA`) included, blocks past the end `MISSING`;
/// the per-compare `DigestCache` sees an apply (the old cycle is refused,
/// the new one hashes the new bytes).
#[test]
fn block_hashes_match_the_replica_holes_and_applies() {
    use vdrep::resync::{block_digest, MISSING};
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut rng = Rng(11);
    let size = 24usize << 20;
    let mut disk = vec![0u8; size];
    rng.fill(&mut disk[..3 << 20]);
    rng.fill(&mut disk[20 << 20..(20 << 20) + 4096]);
    initial(&store, &disk, 1);
    let site = store.site(SITE).unwrap();
    // The test means something only if 8..16 MiB is a hole of the file.
    {
        let f = std::fs::File::open(site.replica_path(VM, &ID).unwrap()).unwrap();
        let d = nix::unistd::lseek(&f, 8 << 20, nix::unistd::Whence::SeekData);
        assert!(
            d.is_ok_and(|d| d >= 16 << 20),
            "the zeros were not stored as a hole: {d:?}"
        );
    }
    let want = |d: &[u8]| -> Vec<u128> {
        let mut v: Vec<u128> = d.chunks(BS as usize).map(block_digest).collect();
        v.extend([MISSING; 3]);
        v
    };
    let nb = (size as u64 / BS) as u32;
    let runs = vec![(0u64, nb + 3)];
    let mut cache = vdrep::replica::DigestCache::default();
    for _ in 0..2 {
        let (sz, got) = site
            .block_hashes(VM, &ID, 1, BS as u32, &runs, &mut cache)
            .unwrap();
        assert_eq!(sz, size as u64);
        assert!(
            got == want(&disk),
            "digests differ from the replica's bytes"
        );
    }
    // Cycle 2 writes a block inside the former hole.
    rng.fill(&mut disk[(10 << 20) + 8192..(10 << 20) + 12288]);
    let dirty: BTreeSet<u64> = [((10 << 20) + 8192) / BS].into_iter().collect();
    let lp = logs.path().join("2.hrl");
    make_log(&lp, ID, 1, 2, size as u64, &disk, &dirty);
    site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap();
    site.apply(VM, &ID, 2).unwrap();
    assert!(site
        .block_hashes(VM, &ID, 1, BS as u32, &runs, &mut cache)
        .is_err());
    let (_, got) = site
        .block_hashes(VM, &ID, 2, BS as u32, &runs, &mut cache)
        .unwrap();
    assert!(got == want(&disk), "the cache missed the apply");
}
