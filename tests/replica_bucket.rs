//! The object-store replica store (`objstore::replica::BucketStore`): the
//! shared store suite (`tests/store_suite/`) over an in-memory bucket
//! (`MemClient`), over a real single-node Garage, and with object-level
//! crashes and faults (`FailClient`); then what only a shared bucket has:
//! fencing of a stale writer, a second store continuing from the bucket,
//! encryption at rest, retention that leaves only what the kept points
//! need.

mod garageutil;
mod skip;
mod store_suite;

use garageutil::Garage;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use store_suite::{
    check_after_crash, crash_fixture, initial, make_log, random_writes, read_current, read_point,
    ship, Harness, Rng, DISK, ID, SITE, VM,
};
use vdrep::objstore::envelope::EncryptionKey;
use vdrep::objstore::replica::BucketStore;
use vdrep::objstore::{
    Credentials, FailClient, MemClient, ObjOp, ObjectClient, S3Client, SealedBucket, StoreUrl,
};
use vdrep::replica::{Consistency, DiskRef, ReplicaStore, RetentionPolicy, StoreError};

static PREFIX: AtomicU64 = AtomicU64::new(0);

/// A [`BucketStore`] over `client` at a prefix of its own; every
/// [`Harness::open`] is a new store (a new process: no state but the
/// bucket).
struct BucketHarness {
    client: Arc<dyn ObjectClient>,
    bucket: String,
    prefix: String,
    spool: tempfile::TempDir,
}

fn key() -> EncryptionKey {
    EncryptionKey::from_bytes(&[0x5a; 32])
}

impl BucketHarness {
    fn new(client: Arc<dyn ObjectClient>, bucket: &str) -> BucketHarness {
        BucketHarness {
            client,
            bucket: bucket.to_string(),
            prefix: format!(
                "t{}-{}",
                std::process::id(),
                PREFIX.fetch_add(1, Ordering::Relaxed)
            ),
            spool: tempfile::tempdir().unwrap(),
        }
    }
    fn mem() -> BucketHarness {
        BucketHarness::new(Arc::new(MemClient::new()), "bkt")
    }
    fn url(&self) -> StoreUrl {
        StoreUrl::parse(&format!("s3://{}/{}", self.bucket, self.prefix))
            .unwrap()
            .unwrap()
    }
    /// A store over `client` (e.g. a failing wrapper of this one's).
    fn open_over(&self, client: Arc<dyn ObjectClient>) -> BucketStore {
        let b = SealedBucket::open(client, self.url(), key()).unwrap();
        BucketStore::open(Arc::new(b), self.spool.path()).unwrap()
    }
}

impl Harness for BucketHarness {
    fn open(&self) -> Arc<dyn ReplicaStore> {
        Arc::new(self.open_over(self.client.clone()))
    }
    fn replica_file(&self, _d: DiskRef<'_>) -> Option<std::path::PathBuf> {
        None
    }
    fn history_records(&self, _d: DiskRef<'_>) -> Option<usize> {
        None
    }
}

#[test]
fn chain_resend_out_of_order_and_identity() {
    store_suite::chain_resend_out_of_order_and_identity(&BucketHarness::mem());
}

#[test]
fn points_need_every_disk_and_age_retention() {
    store_suite::points_need_every_disk_and_age_retention(&BucketHarness::mem());
}

#[test]
fn block_hashes_match_the_replica_and_applies() {
    store_suite::block_hashes_match_the_replica_and_applies(&BucketHarness::mem());
}

#[test]
fn forget_deletes_one_vm_only() {
    store_suite::forget_deletes_one_vm_only(&BucketHarness::mem());
}

#[test]
fn a_full_copy_of_one_disk_drops_only_the_points_that_include_it() {
    store_suite::a_full_copy_of_one_disk_drops_only_the_points_that_include_it(
        &BucketHarness::mem(),
    );
}

#[test]
fn crash_between_operations() {
    store_suite::crash_between_operations(&|| Box::new(BucketHarness::mem()));
}

#[test]
fn random_crashes_converge() {
    for seed in 1..=12 {
        store_suite::random_crashes_converge(&BucketHarness::mem(), seed);
    }
}

#[test]
fn transient_faults_converge() {
    for seed in [1, 2, 3, 0xdead_beef] {
        store_suite::transient_faults_converge(&BucketHarness::mem(), seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn every_point_reads_back(blocks in 4u64..24, steps in proptest::collection::vec(store_suite::step_strategy(), 1..10), keep in 1usize..6, thin in 1u64..4) {
        store_suite::every_point_reads_back(&BucketHarness::mem(), blocks, &steps, keep, thin)?;
    }
}

/// One delta as the receiver runs it; `acked` is raised once the log was
/// acknowledged durable.
fn deliver(
    store: &dyn ReplicaStore,
    log: &std::path::Path,
    acked: &mut bool,
) -> Result<(), StoreError> {
    store.store_log(DISK, &mut std::fs::File::open(log).unwrap())?;
    *acked = true;
    store.apply(DISK, 2)?;
    store.commit_point(SITE, VM, 2, &[ID], Consistency::Crash)?;
    Ok(())
}

/// A crash (every later object call fails) at each object put or delete
/// of a delta, before and after the bucket did it: the reopened store is
/// at cycle 1 or 2 exactly, a log acknowledged durable is never lost,
/// point 1 still reads back, and the resent log converges.
#[test]
fn object_crash_at_every_call_of_a_delta() {
    let logs = tempfile::tempdir().unwrap();
    let mut cases = 0;
    for op in [ObjOp::Put, ObjOp::List, ObjOp::Get] {
        for after in [false, true] {
            for nth in 1.. {
                let h = BucketHarness::mem();
                let (m1, m2, log) = crash_fixture(h.open().as_ref(), logs.path(), 7, 9);
                let fail = Arc::new(FailClient::new(h.client.clone()));
                let store = h.open_over(fail.clone());
                let base = fail.calls(op);
                fail.crash_at(op, base + nth, after);
                let mut acked = false;
                let r = deliver(&store, &log, &mut acked);
                drop(store);
                if r.is_ok() && !fail.crashed() {
                    break; // past the delta's last call of this kind
                }
                cases += 1;
                let what = format!("crash at {op:?} #{nth} (after: {after})");
                let store = store_suite::reopen(&h, &what);
                check_after_crash(&h, store.as_ref(), &log, &m1, &m2, acked, &what);
            }
        }
    }
    assert!(
        cases > 10,
        "only {cases} crash cases: the delta made too few calls"
    );
}

/// Seeded transient object-store failures (before and after the bucket
/// did the call) on every call of a run of deltas: retrying each step
/// converges and every point reads back.
#[test]
fn object_faults_converge() {
    for seed in [3u64, 17, 99] {
        let logs = tempfile::tempdir().unwrap();
        let h = BucketHarness::mem();
        let mut rng = Rng(seed);
        let mut disk = vec![0u8; 9 << 20];
        rng.fill(&mut disk[..5 << 20]);
        initial(h.open().as_ref(), &disk, 1);
        let fail = Arc::new(FailClient::new(h.client.clone()));
        fail.random(seed, 100);
        let store = h.open_over(fail.clone());
        let retry = |what: &str, f: &mut dyn FnMut() -> Result<(), StoreError>| {
            for _ in 0..100 {
                match f() {
                    Ok(()) => return,
                    Err(e) if e.retryable() => {}
                    Err(e) => panic!("seed {seed}: {what}: {e}"),
                }
            }
            panic!("seed {seed}: {what}: never succeeded");
        };
        let mut models = vec![(1u64, disk.clone())];
        retry("point 1", &mut || {
            store
                .commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
                .map(|_| ())
        });
        for cycle in 2..=6u64 {
            let old = disk.len() as u64;
            let dirty = random_writes(&mut rng, &mut disk, 30);
            let lp = logs.path().join(format!("{cycle}.hrl"));
            make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
            retry("store", &mut || {
                store
                    .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
                    .map(|_| ())
            });
            retry("apply", &mut || store.apply(DISK, cycle).map(|_| ()));
            retry("commit", &mut || {
                store
                    .commit_point(SITE, VM, cycle, &[ID], Consistency::Crash)
                    .map(|p| assert_eq!(p.map(|p| p.cycle), Some(cycle)))
            });
            models.push((cycle, disk.clone()));
        }
        assert!(fail.injected() > 5, "seed {seed}: too few faults");
        let clean = h.open();
        for (c, m) in &models {
            assert!(
                read_point(clean.as_ref(), DISK, *c) == *m,
                "seed {seed}: point {c}"
            );
        }
    }
}

/// Two writers of one VM: the newer takes over from the bucket (no
/// resync: it sees the replica at the older one's cycle) and the older is
/// refused with `Fenced` from then on, acknowledging nothing.
#[test]
fn a_stale_writer_is_fenced_and_the_new_one_continues() {
    let logs = tempfile::tempdir().unwrap();
    let h = BucketHarness::mem();
    let a = h.open();
    let mut rng = Rng(4);
    let mut disk = vec![0u8; 1 << 20];
    rng.fill(&mut disk);
    initial(a.as_ref(), &disk, 1);
    let old = disk.clone();
    let dirty = random_writes(&mut rng, &mut disk, 20);
    let l2 = logs.path().join("2.hrl");
    make_log(&l2, ID, 1, 2, old.len() as u64, &disk, &dirty);
    ship(a.as_ref(), DISK, &l2, 2);
    a.commit_point(SITE, VM, 2, &[ID], Consistency::Crash)
        .unwrap();
    // Another receiver takes the VM over.
    let b = h.open();
    assert_eq!(b.replica_state(DISK).unwrap().cycle, Some(2));
    let d3 = disk.clone();
    let dirty = random_writes(&mut rng, &mut disk, 20);
    let l3 = logs.path().join("3.hrl");
    make_log(&l3, ID, 2, 3, d3.len() as u64, &disk, &dirty);
    ship(b.as_ref(), DISK, &l3, 3);
    // The stale one is refused, whatever it tries.
    let e = a
        .store_log(DISK, &mut std::fs::File::open(&l3).unwrap())
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Fenced { .. }) && !e.retryable(),
        "{e}"
    );
    let e = a
        .commit_point(SITE, VM, 2, &[ID], Consistency::Crash)
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
    assert_eq!(
        read_current(b.as_ref(), DISK),
        disk,
        "the new writer continued"
    );
    assert_eq!(read_point(b.as_ref(), DISK, 2), d3);
}

/// Every object in the bucket is sealed: no block of a stamped source is
/// found in plaintext; a store with another key is refused; a flipped byte
/// in a chunk is refused naming the object.
#[test]
fn the_bucket_holds_no_plaintext_and_refuses_tampering() {
    let logs = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemClient::new());
    let h = BucketHarness::new(mem.clone(), "bkt");
    let store = h.open();
    let stamp = |i: usize| -> [u8; 32] {
        let mut s = *b"vdrep-plaintext-stamp-0000000000";
        s[22..].copy_from_slice(format!("{:010}", i).as_bytes());
        s
    };
    let mut disk = vec![0u8; 2 << 20];
    for (i, b) in disk.chunks_mut(4096).enumerate() {
        for c in b.chunks_mut(32) {
            c.copy_from_slice(&stamp(i));
        }
    }
    initial(store.as_ref(), &disk, 1);
    let old = disk.clone();
    let mut dirty = BTreeSet::new();
    for b in [3u64, 100, 200] {
        for c in disk[(b * 4096) as usize..][..4096].chunks_mut(32) {
            c.copy_from_slice(&stamp(1000 + b as usize));
        }
        dirty.insert(b);
    }
    let l2 = logs.path().join("2.hrl");
    make_log(&l2, ID, 1, 2, old.len() as u64, &disk, &dirty);
    ship(store.as_ref(), DISK, &l2, 2);
    store
        .commit_point(SITE, VM, 2, &[ID], Consistency::Crash)
        .unwrap();
    let objects = mem.snapshot();
    assert!(objects.len() > 5);
    for (k, body) in &objects {
        for i in [0usize, 3, 511, 1003, 1100] {
            let s = stamp(i);
            assert!(
                !body.windows(32).any(|w| w == s),
                "plaintext stamp {i} found in {k}"
            );
        }
    }
    // Another key: refused before anything is written.
    let before = mem.snapshot();
    let other = SealedBucket::open(mem.clone(), h.url(), EncryptionKey::from_bytes(&[1; 32]));
    assert!(other.is_err());
    assert_eq!(mem.snapshot(), before);
    // A flipped byte in a chunk: the read fails naming the object.
    let (k, mut body) = objects
        .iter()
        .find(|(k, _)| k.contains("/chunks/"))
        .cloned()
        .unwrap();
    let n = body.len();
    body[n / 2] ^= 1;
    mem.overwrite_raw(&k, body);
    let fresh = h.open();
    let r = fresh.read_point(DISK, 2).unwrap();
    let mut buf = vec![0u8; disk.len()];
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains(&k), "{e}");
}

/// After N cycles with retention of K points the bucket holds only what
/// the K points need (older logs are folded into new chunk versions,
/// everything unreferenced is deleted), and every kept point reads back.
#[test]
fn retention_leaves_only_what_the_kept_points_need() {
    let logs = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemClient::new());
    let h = BucketHarness::new(mem.clone(), "bkt");
    let store = h.open();
    let mut rng = Rng(21);
    let mut disk = vec![0u8; 6 << 20];
    rng.fill(&mut disk);
    initial(store.as_ref(), &disk, 1);
    store
        .commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
        .unwrap();
    let mut models = vec![disk.clone()];
    for cycle in 2..=10u64 {
        let old = disk.len() as u64;
        let dirty = random_writes(&mut rng, &mut disk, 8);
        let lp = logs.path().join(format!("{cycle}.hrl"));
        make_log(&lp, ID, cycle - 1, cycle, old, &disk, &dirty);
        ship(store.as_ref(), DISK, &lp, cycle);
        store
            .commit_point(SITE, VM, cycle, &[ID], Consistency::Crash)
            .unwrap();
        models.push(disk.clone());
    }
    let keep = RetentionPolicy {
        keep_last: Some(3),
        ..Default::default()
    };
    let rep = store.prune(SITE, VM, &keep).unwrap();
    assert_eq!(rep.dropped_points, (1..=7).collect::<Vec<u64>>());
    assert!(rep.freed_bytes > 0);
    let pts: Vec<u64> = store
        .points(SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(pts, [8, 9, 10]);
    for c in 8..=10u64 {
        assert!(
            read_point(store.as_ref(), DISK, c) == models[c as usize - 1],
            "point {c}"
        );
    }
    // Only logs after the oldest kept point remain; the chunks are at most
    // the folded base (two 4 MiB chunks) plus the original ones still
    // referenced by a kept manifest (none: all were committed before the
    // fold, so at most the pre-fold base).
    let keys: Vec<String> = mem.snapshot().into_iter().map(|(k, _)| k).collect();
    let done: Vec<&String> = keys.iter().filter(|k| k.ends_with(".done")).collect();
    let logs_kept: BTreeSet<u64> = done
        .iter()
        .map(|k| {
            let leaf = k.rsplit('/').next().unwrap();
            u64::from_str_radix(&leaf[..16], 16).unwrap()
        })
        .collect();
    assert_eq!(logs_kept, [9, 10].into_iter().collect(), "{done:?}");
    let chunks = keys.iter().filter(|k| k.contains("/chunks/")).count();
    let heads = keys.iter().filter(|k| k.contains("/head/")).count();
    assert!(chunks <= 4, "chunks: {chunks}");
    assert_eq!(heads, 1);
    // A later prune with nothing to drop changes nothing readable.
    let rep = store.prune(SITE, VM, &keep).unwrap();
    assert!(rep.dropped_points.is_empty());
    let fresh = h.open();
    for c in 8..=10u64 {
        assert!(
            read_point(fresh.as_ref(), DISK, c) == models[c as usize - 1],
            "point {c}"
        );
    }
    // Logs of points committed after the fold point at the new base.
    let lp = logs.path().join("11.hrl");
    let old = disk.len() as u64;
    let dirty = random_writes(&mut rng, &mut disk, 8);
    make_log(&lp, ID, 10, 11, old, &disk, &dirty);
    ship(fresh.as_ref(), DISK, &lp, 11);
    assert!(read_current(fresh.as_ref(), DISK) == disk);
}

/// The shared definitions suite; in a bucket every definition is sealed
/// (no plaintext XML in any object) and `forget` leaves none behind.
#[test]
fn definitions_are_kept_per_point_encrypted_and_pruned() {
    let mem = Arc::new(MemClient::new());
    let h = BucketHarness::new(mem.clone(), "bkt");
    store_suite::definitions_follow_points(&h, &|_, _| {
        for (k, v) in mem.snapshot() {
            assert!(
                !v.windows(12).any(|w| w == b"<name>web1</"),
                "plaintext definition in {k}"
            );
        }
        assert!(mem
            .snapshot()
            .iter()
            .any(|(k, _)| k.contains("/definitions/")));
    });
    let left: Vec<String> = mem
        .snapshot()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("/definitions/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn garage_harness(g: &Garage) -> BucketHarness {
    let creds = Credentials {
        access_key_id: g.key_id.clone(),
        secret_access_key: g.secret.clone(),
        region: Some(garageutil::REGION.into()),
    };
    let url = StoreUrl::parse(&format!("s3://{}/x", g.bucket))
        .unwrap()
        .unwrap();
    let c = S3Client::new(&g.endpoint(), &url, &creds).unwrap();
    BucketHarness::new(Arc::new(c), &g.bucket)
}

/// The store suite against a real single-node Garage (each case in a
/// prefix of its own).
#[test]
fn garage_store_suite() {
    let Some(g) = Garage::start(1) else { return };
    store_suite::chain_resend_out_of_order_and_identity(&garage_harness(&g));
    store_suite::points_need_every_disk_and_age_retention(&garage_harness(&g));
    store_suite::block_hashes_match_the_replica_and_applies(&garage_harness(&g));
    store_suite::forget_deletes_one_vm_only(&garage_harness(&g));
    store_suite::definitions_follow_points(&garage_harness(&g), &|_, _| {});
    store_suite::crash_between_operations(&|| Box::new(garage_harness(&g)));
    store_suite::random_crashes_converge(&garage_harness(&g), 5);
    store_suite::transient_faults_converge(&garage_harness(&g), 3);
    let steps: Vec<store_suite::Step> = {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        proptest::collection::vec(store_suite::step_strategy(), 6..8)
            .new_tree(&mut runner)
            .unwrap()
            .current()
    };
    store_suite::every_point_reads_back(&garage_harness(&g), 16, &steps, 3, 2).unwrap();
}

/// Timing (not a test: `cargo test --release --test replica_bucket --
/// --ignored bench --nocapture`): the initial copy and a 1 % delta of a
/// 256 MiB disk into the directory store and into a single-node Garage,
/// through the store seam, in the same run; medians of 3.
#[test]
#[ignore]
fn bench_initial_and_delta_dir_vs_garage() {
    let Some(g) = Garage::start(1) else { return };
    const SIZE: usize = 256 << 20;
    let mut rng = Rng(77);
    let mut disk = vec![0u8; SIZE];
    // Half data (incompressible), half zeros, in 1 MiB stripes.
    for (i, c) in disk.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 0 {
            rng.fill(c);
        }
    }
    let logs = tempfile::tempdir().unwrap();
    let mut next = disk.clone();
    let dirty = random_writes(&mut rng, &mut next, SIZE / 4096 / 100);
    let lp = logs.path().join("2.hrl");
    make_log(&lp, ID, 1, 2, SIZE as u64, &next, &dirty);
    let run = |store: &dyn ReplicaStore| -> (f64, f64) {
        let t = std::time::Instant::now();
        initial(store, &disk, 1);
        store
            .commit_point(SITE, VM, 1, &[ID], Consistency::Crash)
            .unwrap();
        let init = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        ship(store, DISK, &lp, 2);
        store
            .commit_point(SITE, VM, 2, &[ID], Consistency::Crash)
            .unwrap();
        (init, t.elapsed().as_secs_f64())
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (mut di, mut dd, mut gi, mut gd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let s = vdrep::replica::Store::open(&dir.path().join("s")).unwrap();
        let (i, d) = run(&s);
        di.push(i);
        dd.push(d);
        let h = garage_harness(&g);
        let s = h.open();
        let (i, d) = run(s.as_ref());
        gi.push(i);
        gd.push(d);
    }
    let (di, dd, gi, gd) = (median(di), median(dd), median(gi), median(gd));
    println!(
        "256 MiB initial copy: dir {di:.2} s, garage {gi:.2} s ({:.2}x); 1 % delta (store+apply+point): dir {dd:.3} s, garage {gd:.3} s ({:.2}x)",
        gi / di,
        gd / dd
    );
}
