//! The replica store test suite, written against the store seam
//! ([`ReplicaStore`]) so that every implementation runs the same tests: a
//! [`Harness`] opens the implementation under test (again after a crash,
//! from its durable state). `tests/replica_store.rs` runs it for the
//! directory store, bare and wrapped in a pass-through `FailStore`; the
//! crash and fault tests wrap whatever the harness opens in a `FailStore`.
//!
//! Suites: the consistency model of a chain of logs (resends, refusals,
//! every point), recovery points over several disks with age retention,
//! the point/thinning/prune property, block digests for resync, crashes
//! between the operations of a delta (each step, and seeded schedules),
//! and seeded transient faults.
#![allow(dead_code)]

use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdrep::hrl::{HrlHeader, HrlWriter};
use vdrep::replica::{
    ApplyOutcome, Consistency, DiskInfo, DiskRef, FailStore, Fault, InitialData, Op, Point,
    ReplicaStore, RetentionPolicy, Rule, StoreError, StoreOutcome, Trigger, When,
};

pub const BS: u64 = 4096;
pub const ID: [u8; 16] = [0x42; 16];
pub const VM: &str = "vm1";
pub const SITE: &str = "siteA";
/// The disk most tests use.
pub const DISK: DiskRef<'static> = DiskRef {
    site: SITE,
    vm: VM,
    disk_id: &ID,
};

/// The implementation under test.
pub trait Harness {
    /// Open the store (after a crash: from its durable state). At most one
    /// opened store is alive at a time.
    fn open(&self) -> Arc<dyn ReplicaStore>;
    /// The replica file of a disk, for implementations that keep one
    /// (implementation-specific checks are skipped otherwise).
    fn replica_file(&self, d: DiskRef<'_>) -> Option<PathBuf>;
    /// How many history records (undo records) the store keeps for the
    /// disk, if it can tell.
    fn history_records(&self, d: DiskRef<'_>) -> Option<usize>;
}

/// Tiny deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a log taking `old` (at `base`) to `new` (at `cycle`), containing
/// the blocks in `dirty` (block indices) plus everything needed for size changes.
pub fn make_log(
    path: &Path,
    id: [u8; 16],
    base: u64,
    cycle: u64,
    old_size: u64,
    new: &[u8],
    dirty: &BTreeSet<u64>,
) {
    let cut = 1_700_000_000_000_000_000 + cycle * 1_000_000_000;
    make_log_at(path, id, base, cycle, old_size, new, dirty, cut)
}

/// [`make_log`] with the cut at `cut_unix_ns`.
#[allow(clippy::too_many_arguments)]
pub fn make_log_at(
    path: &Path,
    id: [u8; 16],
    base: u64,
    cycle: u64,
    old_size: u64,
    new: &[u8],
    dirty: &BTreeSet<u64>,
    cut_unix_ns: u64,
) {
    let h = HrlHeader {
        disk_id: id,
        disk_name: "disk0.img".into(),
        cycle,
        base_cycle: base,
        block_size: BS as u32,
        base_size: old_size,
        disk_size: new.len() as u64,
        cut_unix_ns,
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

pub fn info(size: u64) -> DiskInfo {
    DiskInfo {
        disk_id: ID,
        name: "disk0.img".into(),
        size,
        block_size: BS as u32,
        cycle: 1,
    }
}

/// Initial copy of `data` as cycle `cycle`.
pub fn initial(store: &dyn ReplicaStore, data: &[u8], cycle: u64) {
    initial_of(store, DISK, data, cycle)
}

/// Initial copy of disk `d` (of [`info`]'s name) as `data` at `cycle`.
pub fn initial_of(store: &dyn ReplicaStore, d: DiskRef<'_>, data: &[u8], cycle: u64) {
    let mut i = info(data.len() as u64);
    i.cycle = cycle;
    i.disk_id = *d.disk_id;
    let st = store.begin_initial(d.site, d.vm, &i).unwrap();
    assert_eq!(st.resume_offset, 0);
    for (i, c) in data.chunks(64 << 10).enumerate() {
        let off = (i * (64 << 10)) as u64;
        store.write_initial(d, off, data_of(c)).unwrap();
    }
    store.finish_initial(d, cycle, 0).unwrap();
}

fn data_of(c: &[u8]) -> InitialData<'_> {
    if c.iter().all(|&b| b == 0) {
        InitialData::Zeroes(c.len() as u64)
    } else {
        InitialData::Data(c)
    }
}

/// Forget: one VM's replica, history and points go (a failure injected
/// before the call leaves it whole); another VM of the site stays byte for
/// byte; forgetting it again is `NotReady`; it stays gone after a reopen
/// and can start over with a fresh initial copy.
pub fn forget_deletes_one_vm_only(h: &dyn Harness) {
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let mut disk = vec![0u8; 256 << 10];
    rng.fill(&mut disk[..100_000]);
    let other = DiskRef {
        site: SITE,
        vm: "vm2",
        disk_id: &[0x43; 16],
    };
    {
        let store = h.open();
        initial(store.as_ref(), &disk, 1);
        let mut next = disk.clone();
        let dirty = random_writes(&mut rng, &mut next, 10);
        let p = log_path(logs.path(), 2);
        make_log(&p, ID, 1, 2, disk.len() as u64, &next, &dirty);
        ship(store.as_ref(), DISK, &p, 2);
        assert_eq!(read_current(store.as_ref(), DISK), next);
        initial_of(store.as_ref(), other, &disk, 1);
        assert_eq!(read_current(store.as_ref(), other), disk);
        let points = store.points(SITE, VM).unwrap().len();
        assert!(points >= 1);

        let failing = FailStore::new(
            store.clone(),
            vec![Rule {
                op: Op::Forget,
                when: When::Before,
                trigger: Trigger::Nth(1),
                fault: Fault::Error,
            }],
            1,
        );
        assert!(matches!(
            failing.forget(SITE, VM),
            Err(StoreError::Injected { .. })
        ));
        assert_eq!(store.points(SITE, VM).unwrap().len(), points, "untouched");
        let r = failing.forget(SITE, VM).unwrap();
        assert_eq!((r.disks, r.points), (1, points));
        assert!(r.bytes >= disk.len() as u64, "{r:?}");

        let vms = store.vms();
        assert!(
            !vms.contains(&(SITE.to_string(), VM.to_string())),
            "{vms:?}"
        );
        assert!(
            vms.contains(&(SITE.to_string(), "vm2".to_string())),
            "{vms:?}"
        );
        assert!(matches!(
            store.replica_state(DISK),
            Err(StoreError::NotReady { .. })
        ));
        assert!(store.points(SITE, VM).map_or(true, |p| p.is_empty()));
        assert!(matches!(
            store.forget(SITE, VM),
            Err(StoreError::NotReady { .. })
        ));
        assert_eq!(read_current(store.as_ref(), other), disk);
    }
    let store = h.open();
    store.recover().unwrap();
    assert!(!store.vms().contains(&(SITE.to_string(), VM.to_string())));
    assert_eq!(read_current(store.as_ref(), other), disk);
    initial(store.as_ref(), &disk, 5);
    assert_eq!(read_current(store.as_ref(), DISK), disk);
    assert_eq!(store.points(SITE, VM).unwrap().len(), 1, "a fresh history");
}

/// A domain definition is stored with each point (issue 10): read back by
/// a fresh store (another process), unchanged by a resent save, dropped
/// with a pruned point, gone after `forget`. `after_saves` runs once the
/// three points exist, for what only one implementation can check (how
/// the text is stored), given the two texts (points 1–2, point 3).
pub fn definitions_follow_points(h: &dyn Harness, after_saves: &dyn Fn(&str, &str)) {
    let store = h.open();
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let mut disk = vec![0u8; 64 << 10];
    rng.fill(&mut disk);
    initial(store.as_ref(), &disk, 1);
    let a = "<domain><name>web1</name><devices><disk/></devices></domain>";
    let b = "<domain><name>web1</name><devices><disk/><disk/></devices></domain>";
    for (cycle, def) in [(1u64, a), (2, a), (3, b)] {
        if cycle > 1 {
            let old = disk.len() as u64;
            let dirty = random_writes(&mut rng, &mut disk, 3);
            let lp = logs.path().join(format!("{cycle}.hrl"));
            make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
            ship(store.as_ref(), DISK, &lp, cycle);
        }
        store.save_definition(SITE, VM, cycle, def).unwrap();
        store
            .commit_point(SITE, VM, cycle, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
    }
    // Read back by a fresh store (the first one closed: a new process).
    drop(store);
    let store = h.open();
    assert_eq!(store.definition(SITE, VM, 1).unwrap().as_deref(), Some(a));
    assert_eq!(store.definition(SITE, VM, 2).unwrap().as_deref(), Some(a));
    assert_eq!(store.definition(SITE, VM, 3).unwrap().as_deref(), Some(b));
    assert_eq!(store.definition(SITE, VM, 4).unwrap(), None);
    after_saves(a, b);
    // Saving again (a resent commit) changes nothing.
    store.save_definition(SITE, VM, 3, b).unwrap();
    assert_eq!(store.definition(SITE, VM, 3).unwrap().as_deref(), Some(b));
    let rep = store
        .prune(
            SITE,
            VM,
            &RetentionPolicy {
                keep_last: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(rep.dropped_points, vec![1, 2]);
    assert_eq!(store.definition(SITE, VM, 1).unwrap(), None);
    assert_eq!(store.definition(SITE, VM, 2).unwrap(), None);
    assert_eq!(store.definition(SITE, VM, 3).unwrap().as_deref(), Some(b));
    store.forget(SITE, VM).unwrap();
    // Nothing readable: none, or the VM is unknown here.
    let gone = store.definition(SITE, VM, 3);
    assert!(
        matches!(gone, Ok(None) | Err(StoreError::NotReady { .. })),
        "{gone:?}"
    );
}

pub fn random_writes(rng: &mut Rng, disk: &mut [u8], n: usize) -> BTreeSet<u64> {
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

/// Store and apply the log at `path` (of `cycle`).
pub fn ship(store: &dyn ReplicaStore, d: DiskRef<'_>, path: &Path, cycle: u64) {
    store
        .store_log(d, &mut std::fs::File::open(path).unwrap())
        .unwrap();
    store.apply(d, cycle).unwrap();
}

/// The cycles of the visible points of [`VM`], oldest first.
pub fn point_cycles(store: &dyn ReplicaStore) -> Vec<u64> {
    store
        .points(SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect()
}

/// The whole disk as of point `cycle`.
pub fn read_point(store: &dyn ReplicaStore, d: DiskRef<'_>, cycle: u64) -> Vec<u8> {
    let r = store.read_point(d, cycle).unwrap();
    let mut buf = vec![0u8; r.len() as usize];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

/// The replica's current content (a point is committed at its cycle).
pub fn read_current(store: &dyn ReplicaStore, d: DiskRef<'_>) -> Vec<u8> {
    let st = store.replica_state(d).unwrap();
    let c = st.cycle.unwrap();
    store
        .commit_point(d.site, d.vm, c, &[*d.disk_id], Consistency::Crash)
        .unwrap()
        .unwrap();
    read_point(store, d, c)
}

fn log_path(dir: &Path, cycle: u64) -> PathBuf {
    dir.join(format!("{cycle}.hrl"))
}

/// A chain of logs against a reference model: grow, shrink, resends before
/// and after apply, refusals (gap, diverged chain, another disk, damage,
/// unknown disk, renamed disk), and every point reads back. Returns the
/// final model (for implementation-specific checks).
pub fn chain_resend_out_of_order_and_identity(h: &dyn Harness) -> Vec<u8> {
    let logs = tempfile::tempdir().unwrap();
    let store = h.open();
    let store = store.as_ref();
    let mut rng = Rng(7);
    let mut disk = vec![0u8; 1 << 20];
    rng.fill(&mut disk[..300_000]);
    initial(store, &disk, 1);
    assert_eq!(read_current(store, DISK), disk);
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
        let lp = log_path(logs.path(), cycle);
        make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
        let resend = || {
            store
                .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
                .unwrap()
        };
        let out = resend();
        assert!(
            matches!(out, StoreOutcome::Stored { cycle: c, .. } if c == cycle),
            "{out:?}"
        );
        // Same log again before apply: already durable.
        assert_eq!(resend(), StoreOutcome::AlreadyStored { cycle });
        let out = store.apply(DISK, cycle).unwrap();
        assert!(matches!(out, ApplyOutcome::Applied { cycle: c, .. } if c == cycle));
        assert_eq!(read_current(store, DISK), disk, "cycle {cycle}");
        models.push((cycle, disk.clone()));
        // Resend of an applied log: acknowledged, nothing written.
        let already = (cycle, cycle);
        assert_eq!(
            resend(),
            StoreOutcome::AlreadyApplied {
                cycle: already.0,
                replica_cycle: already.1
            }
        );
        assert_eq!(
            store.apply(DISK, cycle).unwrap(),
            ApplyOutcome::AlreadyApplied {
                cycle: already.0,
                replica_cycle: already.1
            }
        );
        assert_eq!(read_point(store, DISK, cycle), disk);
    }
    // Out of order: a log from base 10 to 11 while the replica is at 8.
    let lp = logs.path().join("gap.hrl");
    let mut d2 = disk.clone();
    let dirty = random_writes(&mut rng, &mut d2, 3);
    make_log(&lp, ID, 10, 11, disk.len() as u64, &d2, &dirty);
    store
        .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
        .unwrap();
    let e = store.apply(DISK, 11).unwrap_err();
    assert!(matches!(e, StoreError::OutOfOrder { .. }), "{e}");
    assert!(!e.retryable());
    assert!(
        e.to_string().contains("cycle 11") && e.to_string().contains("vm1"),
        "{e}"
    );
    // Diverged chain: base 6 < replica 8 < cycle 9.
    let lp = logs.path().join("div.hrl");
    make_log(&lp, ID, 6, 9, disk.len() as u64, &d2, &dirty);
    let e = store
        .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::OutOfOrder { .. }) && !e.retryable(),
        "{e}"
    );
    // Wrong identity: log of another disk.
    let lp = logs.path().join("other.hrl");
    make_log(&lp, [9; 16], 8, 9, disk.len() as u64, &d2, &dirty);
    let e = store
        .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
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
    let e = store.store_log(DISK, &mut &bytes[..]).unwrap_err();
    assert!(matches!(e, StoreError::CorruptLog { .. }), "{e}");
    // Unknown disk.
    let other = DiskRef {
        disk_id: &[1; 16],
        ..DISK
    };
    let e = store.apply(other, 2).unwrap_err();
    assert!(matches!(e, StoreError::NotReady { .. }), "{e}");
    assert_eq!(read_point(store, DISK, 8), disk);
    // Renamed disk under the same id.
    let mut i = info(disk.len() as u64);
    i.name = "other.img".into();
    assert!(matches!(
        store.begin_initial(SITE, VM, &i),
        Err(StoreError::IdentityMismatch { .. })
    ));
    // Every point reads back.
    for (c, m) in &models {
        let r = store.read_point(DISK, *c).unwrap();
        assert_eq!(r.len(), m.len() as u64);
        assert!(read_point(store, DISK, *c) == *m, "point {c}");
    }
    let pts = store.points(SITE, VM).unwrap();
    assert_eq!(pts.len(), 8);
    assert!(pts[..7].iter().all(|p| p.bytes > 0) && pts[7].bytes == 0);
    disk
}

/// Points need every disk of the VM; a point committed late (after both
/// disks moved on) is rebuilt from history; age retention drops old points.
pub fn points_need_every_disk_and_age_retention(h: &dyn Harness) {
    let logs = tempfile::tempdir().unwrap();
    let store = h.open();
    let store = store.as_ref();
    let a = [0xa; 16];
    let b = [0xb; 16];
    let da = DiskRef {
        disk_id: &a,
        ..DISK
    };
    let db = DiskRef {
        disk_id: &b,
        ..DISK
    };
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
        let r = DiskRef {
            disk_id: &id,
            ..DISK
        };
        store.begin_initial(SITE, VM, &i).unwrap();
        store.write_initial(r, 0, InitialData::Data(d)).unwrap();
        store.finish_initial(r, 1, 1).unwrap();
    }
    if let (Some(fa), Some(fb)) = (h.replica_file(da), h.replica_file(db)) {
        assert!(fa.ends_with("a.vhd") && fb.ends_with("b.vhd"));
        assert_eq!(
            std::fs::read(fb).unwrap(),
            disks[1],
            "byte for byte, no footer"
        );
    }
    store
        .commit_point(SITE, VM, 1, &[a, b], Consistency::App)
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
        ship(store, da, &la, cycle);
        // b has not reached the cycle: no point yet.
        let commit = || {
            store
                .commit_point(SITE, VM, cycle, &[a, b], Consistency::Crash)
                .unwrap()
        };
        assert_eq!(commit(), None);
        ship(store, db, &lb, cycle);
        models.push(disks.clone());
        if cycle == 3 {
            // Committed late, after both moved on: still consistent via history.
            let lb4 = log_for(b, &mut disks[1], &mut rng, 4);
            ship(store, db, &lb4, 4);
        }
        assert_eq!(commit().map(|p| p.cycle), Some(cycle));
    }
    let pts = store.points(SITE, VM).unwrap();
    assert_eq!(pts.iter().map(|p| p.cycle).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(pts[0].consistency, Consistency::App);
    // The newest point alone (what the receiver's drainer asks of every
    // VM on every pass) is the last of the list.
    let newest = store
        .newest_point(SITE, VM)
        .unwrap()
        .expect("a newest point");
    let last = &pts[2];
    assert_eq!(
        (
            newest.cycle,
            newest.time_unix_ns,
            &newest.disks,
            newest.consistency
        ),
        (last.cycle, last.time_unix_ns, &last.disks, last.consistency)
    );
    for (k, m) in models.iter().enumerate() {
        let c = k as u64 + 1;
        for (d, want) in [(da, &m[0]), (db, &m[1])] {
            assert!(
                read_point(store, d, c) == *want,
                "disk {} point {c}",
                d.disk_id[0]
            );
        }
    }
    // Age retention: the logs' cut times are in 2023, so a day's age keeps
    // only the newest point; a century keeps all.
    let age = |secs: u64| RetentionPolicy {
        keep_last: None,
        max_age: Some(std::time::Duration::from_secs(secs)),
        ..Default::default()
    };
    let prune = |keep: &RetentionPolicy| store.prune(SITE, VM, keep).unwrap();
    assert!(prune(&age(100 * 365 * 86400)).dropped_points.is_empty());
    let rep = prune(&age(86400));
    assert_eq!(rep.dropped_points, [1, 2]);
    assert!(rep.freed_bytes > 0);
    assert!(store.read_point(da, 1).is_err());
    assert!(
        read_point(store, db, 3) == models[2][1],
        "b at point 3 after prune (b is at cycle 4)"
    );
}

/// One step of the property test: writes (block, kind) then optional resize.
#[derive(Debug, Clone)]
pub struct Step {
    writes: Vec<(u64, u8)>,
    resize: Option<u64>,
    /// Commit the point as application-consistent.
    app: bool,
}

pub fn step_strategy() -> impl Strategy<Value = Step> {
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

/// Every point reads back exactly (whole and unaligned reads), through
/// thinning (one point per interval, app-consistent preferred, undo
/// records merged) and count retention (only the needed history stays).
pub fn every_point_reads_back(
    h: &dyn Harness,
    blocks: u64,
    steps: &[Step],
    keep: usize,
    thin: u64,
) -> Result<(), TestCaseError> {
    let logs = tempfile::tempdir().unwrap();
    let store = h.open();
    let store = store.as_ref();
    let mut disk = vec![0u8; (blocks * BS) as usize];
    for (i, b) in disk.iter_mut().enumerate() {
        *b = (i / 512) as u8 | 1;
    }
    initial(store, &disk, 10);
    store
        .commit_point(SITE, VM, 10, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    let mut models = vec![(10u64, disk.clone())];
    let mut rng = Rng(99);
    for (k, s) in steps.iter().enumerate() {
        let cycle = 11 + k as u64;
        let old = disk.len() as u64;
        let mut dirty = BTreeSet::new();
        if let Some(nb) = s.resize {
            disk.resize((nb * BS) as usize, 0);
        }
        let nblocks = disk.len() as u64 / BS;
        for &(b, kind) in &s.writes {
            let b = b % nblocks;
            let r = (b * BS) as usize..((b + 1) * BS) as usize;
            match kind % 3 {
                0 => disk[r].fill(0),
                1 => disk[r].fill(kind),
                _ => rng.fill(&mut disk[r]),
            }
            dirty.insert(b);
        }
        let lp = log_path(logs.path(), cycle);
        make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
        ship(store, DISK, &lp, cycle);
        let c = if s.app {
            Consistency::App
        } else {
            Consistency::Crash
        };
        store
            .commit_point(SITE, VM, cycle, &[ID], c)
            .unwrap()
            .unwrap();
        models.push((cycle, disk.clone()));
    }
    let check = |models: &[(u64, Vec<u8>)]| {
        for (c, m) in models {
            let r = store.read_point(DISK, *c).unwrap();
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
    // Thin out: of all points (older than 0 s), keep the newest of each
    // `thin`-second interval; undo records are merged across the others.
    let thin_policy = RetentionPolicy {
        thin_after: Some(std::time::Duration::ZERO),
        thin_every: Some(std::time::Duration::from_secs(thin)),
        ..Default::default()
    };
    let before = store.points(SITE, VM).unwrap();
    let rep = store.prune(SITE, VM, &thin_policy).unwrap();
    let models: Vec<(u64, Vec<u8>)> = models
        .into_iter()
        .filter(|(c, _)| !rep.dropped_points.contains(c))
        .collect();
    // One point per interval: the newest app-consistent one if the
    // interval has one, else the newest (plus the newest point overall).
    let kept: Vec<u64> = store
        .points(SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    let slot = |p: &Point| p.time_unix_ns / (thin * 1_000_000_000);
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
        let k: Vec<u64> = group
            .iter()
            .map(|p| p.cycle)
            .filter(|c| kept.contains(c))
            .collect();
        prop_assert!(
            k.contains(&want),
            "interval {}: kept {:?}, want {}",
            s,
            k,
            want
        );
        prop_assert!(
            k.len() == 1 || k.len() == 2 && k.contains(&newest),
            "interval {}: kept {:?}",
            s,
            k
        );
    }
    // Every dropped point above the oldest kept one was merged over.
    let oldest_kept = kept[0];
    prop_assert_eq!(
        rep.merged as usize,
        rep.dropped_points
            .iter()
            .filter(|&&c| c > oldest_kept)
            .count()
    );
    check(&models)?;
    if let Some(n) = h.history_records(DISK) {
        prop_assert_eq!(n, models.len() - 1);
    }
    let rep = store
        .prune(
            SITE,
            VM,
            &RetentionPolicy {
                keep_last: Some(keep),
                ..Default::default()
            },
        )
        .unwrap();
    let kept = models.len().min(keep);
    prop_assert_eq!(rep.dropped_points.len(), models.len() - kept);
    let (gone, left) = models.split_at(models.len() - kept);
    for (c, _) in gone {
        let gone_ok = matches!(
            store.read_point(DISK, *c),
            Err(StoreError::NoSuchPoint { .. })
        );
        prop_assert!(gone_ok, "point {} should be gone", c);
    }
    check(left)?;
    prop_assert_eq!(store.points(SITE, VM).unwrap().len(), kept);
    // Only the history records the kept points need remain.
    if let Some(n) = h.history_records(DISK) {
        prop_assert_eq!(n, kept - 1);
    }
    prop_assert!(read_current(store, DISK) == disk);
    Ok(())
}

/// Digests of a replica with a large zero range and blocks past its end
/// (`MISSING`); the per-compare [`vdrep::replica::DigestCache`] sees an
/// apply (the old cycle is refused, the new one hashes the new bytes).
pub fn block_hashes_match_the_replica_and_applies(h: &dyn Harness) {
    use vdrep::resync::{block_digest, MISSING};
    let logs = tempfile::tempdir().unwrap();
    let store = h.open();
    let store = store.as_ref();
    let mut rng = Rng(11);
    let size = 24usize << 20;
    let mut disk = vec![0u8; size];
    rng.fill(&mut disk[..3 << 20]);
    rng.fill(&mut disk[20 << 20..(20 << 20) + 4096]);
    initial(store, &disk, 1);
    if let Some(f) = h.replica_file(DISK) {
        // The zero-range path means something only if 8..16 MiB is a hole.
        let f = std::fs::File::open(f).unwrap();
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
        let (sz, got) = store
            .block_hashes(DISK, 1, BS as u32, &runs, &mut cache)
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
    let lp = log_path(logs.path(), 2);
    make_log(&lp, ID, 1, 2, size as u64, &disk, &dirty);
    ship(store, DISK, &lp, 2);
    assert!(store
        .block_hashes(DISK, 1, BS as u32, &runs, &mut cache)
        .is_err());
    let (_, got) = store
        .block_hashes(DISK, 2, BS as u32, &runs, &mut cache)
        .unwrap();
    assert!(got == want(&disk), "the cache missed the apply");
}

/// A store at cycle 1 (point committed) and a log to cycle 2 that grows
/// the disk. Returns (models at 1 and 2, log path).
pub fn crash_fixture(
    store: &dyn ReplicaStore,
    logdir: &Path,
    seed: u64,
    mb: usize,
) -> (Vec<u8>, Vec<u8>, PathBuf) {
    let mut rng = Rng(seed);
    let mut disk = vec![0u8; mb << 20];
    rng.fill(&mut disk[..(mb << 20) / 2]);
    initial(store, &disk, 1);
    store
        .commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    let m1 = disk.clone();
    let old = disk.len() as u64;
    let n = disk.len() / BS as usize / 3;
    let mut dirty = random_writes(&mut rng, &mut disk, n);
    disk.resize(disk.len() + (64 << 10), 0); // and grow
    rng.fill(&mut disk[(mb << 20) + 4096..(mb << 20) + 8192]);
    dirty.insert((mb as u64) << 20 >> 12 | 1);
    let log = log_path(logdir, 2);
    make_log(&log, ID, 1, 2, old, &disk, &dirty);
    (m1, disk, log)
}

/// After a crash, with the store reopened and recovered: the replica is
/// exactly one of the models, acknowledged durability holds, history is
/// intact, and the resent log converges. `history_records` (if the
/// implementation can tell) is 1: the record of point 1.
pub fn check_after_crash(
    h: &dyn Harness,
    store: &dyn ReplicaStore,
    log: &Path,
    m1: &[u8],
    m2: &[u8],
    acked_durable: bool,
    what: &str,
) {
    let st = store.replica_state(DISK).unwrap();
    assert_eq!(st.applying, None, "{what}");
    let now = read_current(store, DISK);
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
    ship(store, DISK, log, 2);
    assert!(read_current(store, DISK) == m2, "{what}: after resend");
    assert!(read_point(store, DISK, 1) == m1, "{what}: point 1");
    if let Some(n) = h.history_records(DISK) {
        assert_eq!(n, 1, "{what}: history records");
    }
}

/// Open and recover (no errors) the store the harness holds.
pub fn reopen(h: &dyn Harness, what: &str) -> Arc<dyn ReplicaStore> {
    let store = h.open();
    let rep = store.recover().unwrap();
    assert!(rep.errors.is_empty(), "{what}: {:?}", rep.errors);
    store
}

/// Crash (in process: the wrapper drops the store) before and after each
/// operation of a delta — store the log, apply it, commit the point — and
/// check the reopened store ([`check_after_crash`]). `fresh` gives a new
/// empty harness per case.
pub fn crash_between_operations(fresh: &dyn Fn() -> Box<dyn Harness>) {
    let logs = tempfile::tempdir().unwrap();
    for (i, op) in [Op::StoreLog, Op::Apply, Op::CommitPoint]
        .into_iter()
        .enumerate()
    {
        for when in [When::Before, When::After] {
            let what = format!("{when:?} {}", op.name());
            let h = fresh();
            let (m1, m2, log) = crash_fixture(h.open().as_ref(), logs.path(), 100 + i as u64, 1);
            let rule = Rule {
                op,
                when,
                trigger: Trigger::Nth(1),
                fault: Fault::Crash,
            };
            let fs = FailStore::new(h.open(), vec![rule], 0);
            // What the receiver does for one delta, until the crash.
            let mut durable = 1;
            let r = deliver(&fs, &log, 2, &mut durable);
            assert!(
                matches!(r, Err(StoreError::Injected { crashed: true, .. })),
                "{what}: {r:?}"
            );
            assert!(fs.crashed(), "{what}");
            assert!(
                matches!(
                    fs.points(SITE, VM),
                    Err(StoreError::Injected { crashed: true, .. })
                ),
                "{what}: a crashed store answers nothing"
            );
            drop(fs);
            let store = reopen(h.as_ref(), &what);
            let acked = durable == 2;
            check_after_crash(h.as_ref(), store.as_ref(), &log, &m1, &m2, acked, &what);
        }
    }
}

/// Seeded transient failures (before and after the operation, so some
/// outcomes are lost) on every operation of a run of deltas; the sender's
/// retries converge to the reference model at every point, and a cycle
/// once applied is only ever acknowledged as a resend.
pub fn transient_faults_converge(h: &dyn Harness, seed: u64) {
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed | 1);
    let mut disk = vec![0u8; 512 << 10];
    rng.fill(&mut disk[..200 << 10]);
    initial(h.open().as_ref(), &disk, 1);
    let rules = [Op::StoreLog, Op::Apply, Op::CommitPoint, Op::ReplicaState]
        .into_iter()
        .flat_map(|op| {
            [When::Before, When::After].map(|when| Rule {
                op,
                when,
                trigger: Trigger::PerMillion(250_000),
                fault: Fault::Error,
            })
        })
        .collect();
    let fs = FailStore::new(h.open(), rules, seed);
    let retry = |what: &str, f: &mut dyn FnMut() -> Result<(), StoreError>| {
        for _ in 0..200 {
            match f() {
                Ok(()) => return,
                Err(e @ StoreError::Injected { .. }) => assert!(e.retryable()),
                Err(e) => panic!("seed {seed}: {what}: {e}"),
            }
        }
        panic!("seed {seed}: {what}: never succeeded");
    };
    let mut models = vec![(1u64, disk.clone())];
    retry("point 1", &mut || {
        fs.commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
            .map(|p| assert!(p.is_some()))
    });
    for cycle in 2..=7u64 {
        let old = disk.len() as u64;
        let dirty = random_writes(&mut rng, &mut disk, 20);
        let lp = log_path(logs.path(), cycle);
        make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
        retry("store", &mut || {
            fs.store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
                .map(|_| ())
        });
        retry("apply", &mut || fs.apply(DISK, cycle).map(|_| ()));
        // Once applied, the same cycle is a resend, never applied again.
        retry("apply again", &mut || {
            fs.apply(DISK, cycle).map(|o| {
                assert!(
                    matches!(o, ApplyOutcome::AlreadyApplied { .. }),
                    "seed {seed}: cycle {cycle} applied twice: {o:?}"
                )
            })
        });
        retry("commit", &mut || {
            fs.commit_point(SITE, VM, cycle, &[ID], Consistency::Crash)
                .map(|p| assert_eq!(p.map(|p| p.cycle), Some(cycle)))
        });
        models.push((cycle, disk.clone()));
    }
    assert!(
        fs.injected().len() > 5,
        "seed {seed}: too few faults injected to mean anything: {:?}",
        fs.injected()
    );
    drop(fs);
    let store = reopen(h, "after faults");
    assert_eq!(
        store.replica_state(DISK).unwrap().cycle,
        Some(7),
        "seed {seed}"
    );
    for (c, m) in &models {
        assert!(
            read_point(store.as_ref(), DISK, *c) == *m,
            "seed {seed}: point {c}"
        );
    }
}

/// One delta as the receiver runs it: store the log (then it may be
/// acknowledged durable: `durable` is raised), apply it, commit the point.
fn deliver(
    store: &dyn ReplicaStore,
    log: &Path,
    cycle: u64,
    durable: &mut u64,
) -> Result<(), StoreError> {
    store.store_log(DISK, &mut std::fs::File::open(log).unwrap())?;
    *durable = (*durable).max(cycle);
    store.apply(DISK, cycle)?;
    let p = store.commit_point(SITE, VM, cycle, &[ID], Consistency::Crash)?;
    assert_eq!(p.map(|p| p.cycle), Some(cycle), "all disks reached {cycle}");
    Ok(())
}

/// Seeded crashes anywhere between the operations of a run of deltas: after
/// each crash the store is reopened and recovered, no log acknowledged
/// durable is lost, the replica is exactly the model of its cycle, and the
/// sender (resending from the first cycle not committed) converges; every
/// point reads back at the end.
pub fn random_crashes_converge(h: &dyn Harness, seed: u64) {
    const LAST: u64 = 8;
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed | 1);
    let mut disk = vec![0u8; 256 << 10];
    rng.fill(&mut disk[..100 << 10]);
    {
        let store = h.open();
        initial(store.as_ref(), &disk, 1);
        store
            .commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
    }
    let mut models = vec![disk.clone()];
    for cycle in 2..=LAST {
        let old = disk.len() as u64;
        let dirty = random_writes(&mut rng, &mut disk, 12);
        make_log(
            &log_path(logs.path(), cycle),
            ID,
            cycle - 1,
            cycle,
            old,
            &disk,
            &dirty,
        );
        models.push(disk.clone());
    }
    let model = |c: u64| &models[c as usize - 1];
    let rules: Vec<Rule> = [Op::StoreLog, Op::Apply, Op::CommitPoint]
        .into_iter()
        .flat_map(|op| {
            [When::Before, When::After].map(|when| Rule {
                op,
                when,
                trigger: Trigger::PerMillion(150_000),
                fault: Fault::Crash,
            })
        })
        .collect();
    let mut durable = 1u64;
    let mut crashes = 0u64;
    let mut next = 2u64;
    let mut seeds = Rng(seed ^ 0x5eed_5eed);
    let mut fs = FailStore::new(h.open(), rules.clone(), seeds.next());
    for _ in 0..500 {
        if next > LAST {
            break;
        }
        match deliver(&fs, &log_path(logs.path(), next), next, &mut durable) {
            Ok(()) => {
                assert!(
                    read_point(&fs, DISK, next) == *model(next),
                    "seed {seed}: point {next}"
                );
                next += 1;
            }
            Err(StoreError::Injected { crashed: true, .. }) => {
                crashes += 1;
                drop(fs);
                let what = format!("seed {seed}, crash {crashes} delivering {next}");
                let store = reopen(h, &what);
                let at = store.replica_state(DISK).unwrap().cycle.unwrap_or(0);
                assert!(
                    at >= durable,
                    "{what}: log {durable} was acknowledged durable, replica at {at}"
                );
                assert!(at <= next, "{what}: replica at {at}");
                assert!(
                    read_current(store.as_ref(), DISK) == *model(at),
                    "{what}: replica at {at} differs from its model"
                );
                drop(store);
                fs = FailStore::new(h.open(), rules.clone(), seeds.next());
            }
            Err(e) => panic!("seed {seed}: cycle {next}: {e}"),
        }
    }
    assert_eq!(next, LAST + 1, "seed {seed}: did not converge");
    drop(fs);
    let store = reopen(h, "the end");
    for c in 1..=LAST {
        assert!(
            read_point(store.as_ref(), DISK, c) == *model(c),
            "seed {seed}: point {c}"
        );
    }
    if let Some(n) = h.history_records(DISK) {
        assert_eq!(
            n as u64,
            LAST - 1,
            "seed {seed}: one history record per later point"
        );
    }
    assert!(
        crashes > 0,
        "seed {seed}: no crash injected: the test proved nothing"
    );
    println!("seed {seed}: converged through {crashes} crash(es)");
}

/// The two disks of [`a_full_copy_of_one_disk_drops_only_the_points_that_include_it`].
pub const FULL_COPY_DISKS: ([u8; 16], [u8; 16]) = ([0xa; 16], [0xb; 16]);

/// Disk `id` (`name`) of [`VM`], copied whole as `data` at `cycle`;
/// returns what `begin_initial` reported.
fn copy_whole(
    store: &dyn ReplicaStore,
    id: [u8; 16],
    name: &str,
    data: &[u8],
    cycle: u64,
) -> vdrep::replica::InitialState {
    let i = DiskInfo {
        disk_id: id,
        name: name.into(),
        size: data.len() as u64,
        block_size: BS as u32,
        cycle,
    };
    let d = DiskRef {
        disk_id: &id,
        ..DISK
    };
    let st = store.begin_initial(SITE, VM, &i).unwrap();
    store.write_initial(d, 0, InitialData::Data(data)).unwrap();
    store.finish_initial(d, cycle, cycle).unwrap();
    st
}

/// A full copy of one disk (b, copied whole again) ends only the points
/// that include that disk (its history cannot lead back through the
/// copy), with a typed warning saying which and why; the VM's point from
/// before b was added stays and reads back as it was. Leaves a point 3
/// over both disks and point 1 over disk a alone.
pub fn a_full_copy_of_one_disk_drops_only_the_points_that_include_it(h: &dyn Harness) {
    let logs = tempfile::tempdir().unwrap();
    let store = h.open();
    let store = store.as_ref();
    let (a, b) = FULL_COPY_DISKS;
    let da = DiskRef {
        disk_id: &a,
        ..DISK
    };
    let db = DiskRef {
        disk_id: &b,
        ..DISK
    };
    let data_a = vec![3u8; 8 * BS as usize];
    assert_eq!(copy_whole(store, a, "a.img", &data_a, 1).dropped, None);
    let p1 = store
        .commit_point(SITE, VM, 1, &[a], Consistency::Crash)
        .unwrap()
        .unwrap();
    assert_eq!(p1.disks.len(), 1);
    // Disk b is added to the VM (its first copy ends nothing), then a
    // point over both.
    let data_b = vec![4u8; 8 * BS as usize];
    let st = copy_whole(store, b, "b.img", &data_b, 1);
    assert_eq!(st.dropped, None, "a new disk ends no point");
    let mut next_a = data_a.clone();
    next_a[..BS as usize].fill(5);
    let la = logs.path().join("a2.hrl");
    make_log(
        &la,
        a,
        1,
        2,
        data_a.len() as u64,
        &next_a,
        &BTreeSet::from([0]),
    );
    ship(store, da, &la, 2);
    let lb = logs.path().join("b2.hrl");
    make_log(&lb, b, 1, 2, data_b.len() as u64, &data_b, &BTreeSet::new());
    ship(store, db, &lb, 2);
    store
        .commit_point(SITE, VM, 2, &[a, b], Consistency::Crash)
        .unwrap()
        .unwrap();
    // b is copied whole again.
    let st = copy_whole(store, b, "b.img", &data_b, 3);
    let d = st.dropped.expect("the points over b were dropped silently");
    assert_eq!(d.cycles, vec![2]);
    assert_eq!(
        d.why,
        vdrep::replica::DropReason::ReCopy { replica_cycle: 2 }
    );
    assert!(d.to_string().contains("[2]"), "{d}");
    assert_eq!(
        point_cycles(store),
        vec![1],
        "point 1 (disk a alone) must stay"
    );
    assert_eq!(read_point(store, da, 1), data_a);
    // Both go on: a point over both disks after the copy.
    let la = logs.path().join("a3.hrl");
    make_log(&la, a, 2, 3, data_a.len() as u64, &next_a, &BTreeSet::new());
    ship(store, da, &la, 3);
    store
        .commit_point(SITE, VM, 3, &[a, b], Consistency::Crash)
        .unwrap()
        .unwrap();
    assert_eq!(point_cycles(store), vec![1, 3]);
    assert_eq!(read_point(store, da, 1), data_a);
    assert_eq!(read_point(store, db, 3), data_b);
}
