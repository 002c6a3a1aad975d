//! Replica store: the store suite (`tests/store_suite/`: chains of logs
//! against a reference model, points and retention, digests, crashes
//! between operations, transient faults) run for the directory store, bare
//! and wrapped in a pass-through `FailStore`; then what only the directory
//! store has: path escapes, `qemu-img` on the replica, crash injection at
//! every step of an apply (child processes killed), random kill -9, a full
//! receiver disk (tmpfs), a crash mid-merge of history.

mod skip;
mod store_suite;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use store_suite::{
    check_after_crash, crash_fixture, info, initial, make_log, random_writes, reopen, Harness, Rng,
    BS, DISK, ID, SITE, VM,
};
use vdrep::receiver::control::PointInfo;
use vdrep::replica::{
    Consistency, DiskRef, FailStore, InitialData, ReplicaStore, RetentionPolicy, Store, StoreError,
    StoreOutcome,
};
use vdrep::util::durable::SyncMode;

/// The directory store rooted at `root`; `wrap` puts it in a pass-through
/// [`FailStore`] (no rules), which must change nothing; `sync` is how it
/// makes writes durable (`store_sync`: the shared `syncfs` must change
/// nothing either).
struct DirHarness {
    root: PathBuf,
    wrap: bool,
    sync: SyncMode,
    _dir: Option<tempfile::TempDir>,
}

impl DirHarness {
    fn new(wrap: bool) -> DirHarness {
        DirHarness::with_sync(wrap, SyncMode::File)
    }
    fn with_sync(wrap: bool, sync: SyncMode) -> DirHarness {
        let dir = tempfile::tempdir().unwrap();
        DirHarness {
            root: dir.path().join("store"),
            wrap,
            sync,
            _dir: Some(dir),
        }
    }
    fn at(root: &Path) -> DirHarness {
        DirHarness {
            root: root.to_path_buf(),
            wrap: false,
            sync: SyncMode::File,
            _dir: None,
        }
    }
    fn disk_dir(&self, d: DiskRef<'_>) -> PathBuf {
        let hex: String = d.disk_id.iter().map(|b| format!("{b:02x}")).collect();
        self.root
            .join("sites")
            .join(d.site)
            .join("vms")
            .join(d.vm)
            .join("disks")
            .join(hex)
    }
}

impl Harness for DirHarness {
    fn open(&self) -> Arc<dyn ReplicaStore> {
        let mut st = Store::open(&self.root).unwrap();
        st.set_sync(self.sync);
        let s: Arc<dyn ReplicaStore> = Arc::new(st);
        if self.wrap {
            Arc::new(FailStore::new(s, Vec::new(), 1))
        } else {
            s
        }
    }
    fn replica_file(&self, d: DiskRef<'_>) -> Option<PathBuf> {
        let dir = self.disk_dir(d);
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
        Some(dir.join(st["replica_file"].as_str()?))
    }
    fn history_records(&self, d: DiskRef<'_>) -> Option<usize> {
        Some(
            std::fs::read_dir(self.disk_dir(d).join("undo"))
                .ok()?
                .count(),
        )
    }
}

/// Bare, wrapped, and bare with every sync a shared `syncfs`
/// (`store_sync = "fs"`).
fn both() -> [DirHarness; 3] {
    [
        DirHarness::new(false),
        DirHarness::new(true),
        DirHarness::with_sync(false, SyncMode::Fs),
    ]
}

#[test]
fn chain_resend_out_of_order_and_identity() {
    for h in both() {
        let disk = store_suite::chain_resend_out_of_order_and_identity(&h);
        let logs = tempfile::tempdir().unwrap();
        qemu_compare(&disk, &h.replica_file(DISK).unwrap(), logs.path());
        let _held = h.open();
        // A second process cannot open the same store.
        assert!(matches!(
            Store::open(&h.root),
            Err(StoreError::Locked { .. })
        ));
    }
}

#[test]
fn points_need_every_disk_and_age_retention() {
    for h in both() {
        store_suite::points_need_every_disk_and_age_retention(&h);
    }
}

#[test]
fn block_hashes_match_the_replica_holes_and_applies() {
    for h in both() {
        store_suite::block_hashes_match_the_replica_and_applies(&h);
    }
}

#[test]
fn forget_deletes_one_vm_only() {
    for h in both() {
        store_suite::forget_deletes_one_vm_only(&h);
    }
}

/// Forget is refused while a point of the VM is pinned (test failover).
#[test]
fn forget_refuses_a_pinned_vm() {
    let h = DirHarness::new(false);
    let store = Store::open(&h.root).unwrap();
    let disk = vec![7u8; 64 << 10];
    initial(&store, &disk, 1);
    store.pin(SITE, VM, 1);
    assert!(matches!(
        ReplicaStore::forget(&store, SITE, VM),
        Err(StoreError::InUse { .. })
    ));
    assert!(h.disk_dir(DISK).exists(), "nothing deleted");
    store.unpin(SITE, VM, 1);
    ReplicaStore::forget(&store, SITE, VM).unwrap();
    assert!(!h.disk_dir(DISK).exists());
}

#[test]
fn crash_between_operations() {
    store_suite::crash_between_operations(&|| Box::new(DirHarness::new(false)));
}

#[test]
fn random_crashes_converge() {
    for seed in 1..=12 {
        store_suite::random_crashes_converge(&DirHarness::new(false), seed);
    }
}

#[test]
fn transient_faults_converge() {
    for seed in [1, 2, 3, 0xdead_beef] {
        store_suite::transient_faults_converge(&DirHarness::new(false), seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn every_point_reads_back(blocks in 4u64..24, steps in proptest::collection::vec(store_suite::step_strategy(), 1..10), keep in 1usize..6, thin in 1u64..4, wrap in any::<bool>()) {
        store_suite::every_point_reads_back(&DirHarness::new(wrap), blocks, &steps, keep, thin)?;
    }
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
    // Between operations: through the FailStore wrapper.
    "after-store-log",
    "before-apply",
    "after-apply",
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
    // As the receiver does: the store seen through the seam, wrapped to
    // crash between operations when VDREP_CRASH_AT names such a step.
    let mut st = Store::open(&root).unwrap();
    if let Some(m) = std::env::var("VDREP_TEST_STORE_SYNC")
        .ok()
        .and_then(|v| SyncMode::parse(&v))
    {
        st.set_sync(m);
    }
    let store = FailStore::from_env(Arc::new(st));
    store
        .store_log(DISK, &mut std::fs::File::open(&log).unwrap())
        .unwrap();
    println!("ACK-DURABLE");
    store.apply(DISK, cycle).unwrap();
    println!("ACK-APPLIED");
}

/// After a child died: reopen (and recover) the store at `root`, check it
/// ([`check_after_crash`]) and that no log or temporary file is left.
fn check_dir_after_crash(root: &Path, log: &Path, m1: &[u8], m2: &[u8], durable: bool, what: &str) {
    let h = DirHarness::at(root);
    let store = reopen(&h, what);
    check_after_crash(&h, store.as_ref(), log, m1, m2, durable, what);
    let incoming = h.disk_dir(DISK).join("incoming");
    let left: Vec<String> = std::fs::read_dir(incoming)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !vdrep::util::recycle::is_spare(n))
        .collect();
    assert!(left.is_empty(), "{what}: left in incoming/: {left:?}");
}

fn spawn_child(
    root: &Path,
    log: &Path,
    cycle: u64,
    crash_at: Option<&str>,
    sync: SyncMode,
) -> std::process::Child {
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
    .env("VDREP_TEST_STORE_SYNC", sync.as_str())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    match crash_at {
        Some(s) => c.env("VDREP_CRASH_AT", s),
        None => c.env_remove("VDREP_CRASH_AT"),
    };
    c.spawn().unwrap()
}

/// Child entry point: forget [`VM`] in the store at `$VDREP_TEST_FORGET`
/// (through the seam, as the receiver's data path sees it).
#[test]
fn child_forget() {
    let Ok(root) = std::env::var("VDREP_TEST_FORGET") else {
        return;
    };
    let store = FailStore::from_env(Arc::new(Store::open(Path::new(&root)).unwrap()));
    store.forget(SITE, VM).unwrap();
    println!("FORGOTTEN");
}

/// A crash in the middle of a forget (the VM folder moved away, not yet
/// deleted) leaves no VM half there: it is gone at once, and recovery
/// deletes the rest. A crash before it leaves the VM whole.
#[test]
fn crash_during_forget_is_finished_by_recovery() {
    for step in ["forget-moved", "before-forget"] {
        let h = DirHarness::new(false);
        let disk = vec![9u8; 128 << 10];
        initial(h.open().as_ref(), &disk, 1);
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_forget", "--nocapture", "--test-threads=1"])
            .env("VDREP_TEST_FORGET", &h.root)
            .env("VDREP_CRASH_AT", step)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{step}: the child did not crash");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("FORGOTTEN"));
        let vms = h.root.join("sites").join(SITE).join("vms");
        let left: Vec<String> = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let store = h.open();
        let r = store.recover().unwrap();
        if step == "forget-moved" {
            assert!(
                left.iter().any(|n| n.starts_with(".forget-vm1-")),
                "{left:?}"
            );
            assert!(!store.vms().contains(&(SITE.to_string(), VM.to_string())));
            assert!(
                r.actions
                    .iter()
                    .any(|a| a.contains("a forget was interrupted")),
                "{r:?}"
            );
            assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 0, "not cleaned");
        } else {
            assert_eq!(left, vec![VM.to_string()]);
            assert_eq!(store_suite::read_current(store.as_ref(), DISK), disk);
        }
    }
}

/// Every crash step, with an fsync per file and with the shared `syncfs`
/// (`store_sync = "fs"`).
#[test]
fn crash_at_every_apply_step() {
    for (i, (step, sync)) in STEPS
        .iter()
        .flat_map(|s| [(s, SyncMode::File), (s, SyncMode::Fs)])
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (m1, m2, log) =
            crash_fixture(&Store::open(&root).unwrap(), dir.path(), 100 + i as u64, 1);
        let child = spawn_child(&root, &log, 2, Some(step), sync);
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "step {step} sync {sync:?}: the child did not reach the crash point ({:?}, {stdout})",
            out.status
        );
        assert!(!stdout.contains("ACK-APPLIED"), "step {step} sync {sync:?}");
        let durable = stdout.contains("ACK-DURABLE");
        let expect_durable = !matches!(*step, "log-tmp-synced" | "log-renamed" | "after-store-log");
        assert_eq!(durable, expect_durable, "step {step} sync {sync:?}");
        check_dir_after_crash(&root, &log, &m1, &m2, durable, step);
    }
}

#[test]
fn kill_9_at_random_times() {
    let mut rng = Rng(4242);
    let mut seen = BTreeSet::new();
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let (m1, m2, log) = crash_fixture(&Store::open(&root).unwrap(), dir.path(), 500 + round, 8);
        // Odd rounds: every sync a shared syncfs.
        let sync = if round % 2 == 1 {
            SyncMode::Fs
        } else {
            SyncMode::File
        };
        let mut child = spawn_child(&root, &log, 2, None, sync);
        std::thread::sleep(std::time::Duration::from_millis(rng.below(400)));
        let _ = child.kill(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let durable = stdout.contains("ACK-DURABLE");
        seen.insert((durable, stdout.contains("ACK-APPLIED")));
        check_dir_after_crash(&root, &log, &m1, &m2, durable, &format!("round {round}"));
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

/// A store whose disk was copied at cycle 1 (1 MiB of seeded random data)
/// and whose point 2 is committed on log 2 (the first `changed` bytes
/// rewritten), stored and not applied yet (commit before apply).
struct CommittedBeforeApply {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Store,
    logs: tempfile::TempDir,
    /// Log 2, as the sender keeps it.
    log: PathBuf,
    at_1: Vec<u8>,
    at_2: Vec<u8>,
}

fn committed_before_apply(seed: u64, changed: usize) -> CommittedBeforeApply {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let logs = tempfile::tempdir().unwrap();
    let store = Store::open(&root).unwrap();
    let mut rng = Rng(seed);
    let mut disk = vec![0u8; 1 << 20];
    rng.fill(&mut disk);
    initial(&store, &disk, 1);
    let at_1 = disk.clone();
    let site = store.site(SITE).unwrap();
    site.commit_point(VM, 1, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    rng.fill(&mut disk[..changed]);
    let dirty: BTreeSet<u64> = (0..changed as u64 / BS).collect();
    let log = logs.path().join("2.hrl");
    make_log(&log, ID, 1, 2, disk.len() as u64, &disk, &dirty);
    site.store_log(VM, &ID, std::fs::File::open(&log).unwrap())
        .unwrap();
    assert!(store.commits_durable_logs());
    site.commit_point(VM, 2, &[ID], Consistency::Crash)
        .unwrap()
        .expect("committed on its durable log");
    drop(site);
    CommittedBeforeApply {
        _dir: dir,
        root,
        store,
        logs,
        log,
        at_1,
        at_2: disk,
    }
}

/// `vdrep points` says which points are committed on durable logs not
/// applied yet (commit before apply), as the running receiver lists them
/// (`PointInfo::list`) and as read from the store when none runs.
#[test]
fn points_list_which_are_applied_online_and_offline() {
    let c = committed_before_apply(7, 64 << 10);
    let (root, store) = (&c.root, &c.store);
    let site = store.site(SITE).unwrap();
    let online = |site: &vdrep::replica::Site<'_>| -> Vec<(u64, bool)> {
        PointInfo::list(site, VM, &[])
            .unwrap()
            .iter()
            .map(|p| (p.point.cycle, p.applied))
            .collect()
    };
    let offline = || -> Vec<(u64, bool)> {
        let (_, pts) = vdrep::failover::test::points(root, Some(SITE.into()), VM).unwrap();
        pts.iter().map(|p| (p.point.cycle, p.applied)).collect()
    };
    assert_eq!(online(&site), vec![(1, true), (2, false)]);
    assert_eq!(offline(), vec![(1, true), (2, false)]);
    site.apply(VM, &ID, 2).unwrap();
    assert_eq!(online(&site), vec![(1, true), (2, true)]);
    assert_eq!(offline(), vec![(1, true), (2, true)]);
    // A receiver that predates the field listed applied points only.
    let old: PointInfo = serde_json::from_value(serde_json::json!({
        "cycle": 3, "time_unix_ns": 1, "consistency": "crash", "disks": []
    }))
    .unwrap();
    assert!(old.applied);
}

/// A log damaged at rest in `incoming/` (a flipped bit, after it was
/// stored and its point committed): the apply refuses it (`CorruptLog`,
/// the replica untouched), and the sender's resend of the same log (same
/// trailer: same content hash) replaces the damaged copy instead of being
/// answered "already stored" (which left the point unappliable forever),
/// and the point applies.
#[test]
fn a_committed_log_damaged_at_rest_is_replaced_by_its_resend() {
    let c = committed_before_apply(11, 256 << 10);
    let (root, store, lp, logs, m1) = (&c.root, &c.store, &c.log, c.logs.path(), &c.at_1);
    let mut disk = c.at_2.clone();
    let mut rng = Rng(12);
    let site = store.site(SITE).unwrap();
    // Damage the stored copy in the middle of its records.
    let hex: String = ID.iter().map(|b| format!("{b:02x}")).collect();
    let stored = root
        .join("sites")
        .join(SITE)
        .join("vms")
        .join(VM)
        .join("disks")
        .join(&hex)
        .join("incoming")
        .join("2.hrl");
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();
    let e = site.apply(VM, &ID, 2).unwrap_err();
    assert!(
        matches!(e, StoreError::CorruptLog { .. }) && e.retryable(),
        "the sender must send it again: {e}"
    );
    assert_eq!(site.disk_state(VM, &ID).unwrap().cycle, Some(1));
    assert!(read_replica(store) == *m1, "replica untouched");
    // The resend replaces the damaged copy.
    let again = site
        .store_log(VM, &ID, std::fs::File::open(lp).unwrap())
        .unwrap();
    assert!(
        matches!(again, StoreOutcome::Stored { cycle: 2, .. }),
        "{again:?}"
    );
    site.apply(VM, &ID, 2).unwrap();
    assert!(read_replica(store) == disk, "the point applies");
    // An intact stored copy is still answered "already stored", and a
    // different log for a committed cycle is still refused.
    let lp3 = logs.join("3.hrl");
    rng.fill(&mut disk[..4096]);
    make_log(&lp3, ID, 2, 3, disk.len() as u64, &disk, &[0].into());
    site.store_log(VM, &ID, std::fs::File::open(&lp3).unwrap())
        .unwrap();
    site.commit_point(VM, 3, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    let dup = site
        .store_log(VM, &ID, std::fs::File::open(&lp3).unwrap())
        .unwrap();
    assert!(
        matches!(dup, StoreOutcome::AlreadyStored { cycle: 3 }),
        "{dup:?}"
    );
    let mut other = disk.clone();
    other[..4096].fill(9);
    let lp3b = logs.join("3b.hrl");
    make_log(&lp3b, ID, 2, 3, other.len() as u64, &other, &[0].into());
    let e = site
        .store_log(VM, &ID, std::fs::File::open(&lp3b).unwrap())
        .unwrap_err();
    assert!(matches!(e, StoreError::IdentityMismatch { .. }), "{e}");
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
    let h = vdrep::hrl::HrlHeader {
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
    let mut w = vdrep::hrl::HrlWriter::create(&lp, &h).unwrap();
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

/// The undo folder of [`ID`]'s replica.
fn undo_dir(site: &vdrep::replica::Site<'_>) -> PathBuf {
    site.replica_path(VM, &ID)
        .unwrap()
        .parent()
        .unwrap()
        .join("undo")
}

/// Point `cycle` of [`ID`] reads back whole as `model` (`what`: when).
fn assert_point(site: &vdrep::replica::Site<'_>, cycle: u64, model: &[u8], what: &str) {
    let r = site.read_point(VM, &ID, cycle).unwrap();
    let mut buf = vec![0u8; model.len()];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "point {cycle} {what}");
}

/// A disk of `bytes` random bytes (from `rng`) copied to `store` as
/// cycle 1 and committed as point 1; returns the disk.
fn first_point(store: &Store, rng: &mut Rng, bytes: usize) -> Vec<u8> {
    let mut disk = vec![0u8; bytes];
    rng.fill(&mut disk);
    initial(store, &disk, 1);
    store
        .site(SITE)
        .unwrap()
        .commit_point(VM, 1, &[ID], Consistency::Crash)
        .unwrap();
    disk
}

/// `writes` random block writes to `disk`, shipped to `site` as `cycle`
/// (stored, applied) and committed as a point.
fn write_cycle(
    site: &vdrep::replica::Site<'_>,
    dir: &Path,
    rng: &mut Rng,
    disk: &mut [u8],
    writes: usize,
    cycle: u64,
) {
    let old = disk.len() as u64;
    let dirty = random_writes(rng, disk, writes);
    let lp = dir.join(format!("{cycle}.hrl"));
    make_log(&lp, ID, cycle - 1, cycle, old, disk, &dirty);
    site.store_log(VM, &ID, std::fs::File::open(&lp).unwrap())
        .unwrap();
    site.apply(VM, &ID, cycle).unwrap();
    site.commit_point(VM, cycle, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
}

/// A point far back reads the same when its reader merges its undo
/// records a chunk at a time into private records (a reader of a point two
/// hours back on a continuous VM needs 7,000–14,400 records, one open file
/// each): every point byte for byte, the files it keeps open bounded by
/// the chunks, no merge left behind in `undo/`, and an apply while a
/// reader is open does not change what that reader reads.
#[test]
fn a_reader_far_back_merges_its_records_in_chunks() {
    const CHUNK: usize = 8;
    const CYCLES: u64 = 120;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    store.set_reader_chunk(CHUNK);
    let site = store.site(SITE).unwrap();
    let mut rng = Rng(9_001);
    // 1 MiB: 256 blocks, so most cycles' blocks are not rewritten later
    // and most records supply bytes of the oldest points.
    let mut disk = first_point(&store, &mut rng, 1 << 20);
    let mut models = vec![Vec::new(), disk.clone()];
    for cycle in 2..=CYCLES {
        write_cycle(&site, dir.path(), &mut rng, &mut disk, 3, cycle);
        models.push(disk.clone());
    }
    let undo = undo_dir(&site);
    let names = |d: &Path| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = names(&undo);
    let mut merged_somewhere = false;
    for c in [1u64, 2, 9, 10, 11, 30, 64, 100, 112, 113, 119, 120] {
        let r = site.read_point(VM, &ID, c).unwrap();
        let records = (CYCLES - c) as usize;
        assert_eq!(r.layer_count(), records, "point {c}: records in its chain");
        let bound = records / CHUNK + CHUNK - 1;
        assert!(
            r.open_layers() <= bound,
            "point {c}: {} records open, more than {bound}",
            r.open_layers()
        );
        merged_somewhere |= records >= CHUNK;
        let mut buf = vec![0u8; disk.len()];
        r.read_at(&mut buf, 0).unwrap();
        assert!(
            buf == models[c as usize],
            "point {c} read through merged chunks"
        );
    }
    assert!(merged_somewhere);
    assert_eq!(
        names(&undo),
        before,
        "a reader's merges left files in undo/"
    );
    // Open, then more cycles applied: the reader still reads its point.
    let r = site.read_point(VM, &ID, 1).unwrap();
    for cycle in CYCLES + 1..=CYCLES + 10 {
        write_cycle(&site, dir.path(), &mut rng, &mut disk, 3, cycle);
        models.push(disk.clone());
    }
    assert_eq!(r.layer_count(), (CYCLES + 9) as usize);
    let mut buf = vec![0u8; disk.len()];
    r.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == models[1],
        "point 1 after applies while its reader was open"
    );
    assert_point(
        &site,
        CYCLES + 10,
        &models[(CYCLES + 10) as usize],
        "newest",
    );
}

/// Under a low open-files limit a reader of a point far back still opens
/// when it merges its records in chunks; when it cannot (every record
/// kept open), the error is the open-files one: retryable, and telling
/// the admin to raise `LimitNOFILE`, not a generic I/O error.
#[test]
fn a_reader_under_a_low_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut rng = Rng(31_337);
    let first;
    {
        let store = Store::open(&root).unwrap();
        let mut disk = first_point(&store, &mut rng, 1 << 20);
        first = disk.clone();
        let site = store.site(SITE).unwrap();
        for cycle in 2..=150u64 {
            write_cycle(&site, dir.path(), &mut rng, &mut disk, 3, cycle);
        }
    }
    std::fs::write(dir.path().join("point1"), &first).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_low_nofile", "--nocapture"])
        .env("VDREP_TEST_NOFILE", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("chunked: read")
            && stdout.contains("whole: open files"),
        "child: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Child of [`a_reader_under_a_low_open_files_limit`]; does nothing
/// normally.
#[test]
fn child_low_nofile() {
    let Ok(dir) = std::env::var("VDREP_TEST_NOFILE") else {
        return;
    };
    let dir = Path::new(&dir);
    let want = std::fs::read(dir.join("point1")).unwrap();
    let store = Store::open(&dir.join("store")).unwrap();
    let site = store.site(SITE).unwrap();
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 64, hard).unwrap();
    // 149 records, most supplying bytes of point 1: in chunks of 8 the
    // reader keeps about 25 open.
    store.set_reader_chunk(8);
    let r = site.read_point(VM, &ID, 1).unwrap();
    let mut buf = vec![0u8; want.len()];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf == want, "point 1 under the low limit");
    println!("chunked: read, {} records open", r.open_layers());
    drop(r);
    store.set_reader_chunk(usize::MAX);
    match site.read_point(VM, &ID, 1) {
        Err(e @ StoreError::OpenFiles { .. }) => {
            assert!(e.retryable());
            assert!(e.to_string().contains("LimitNOFILE"), "{e}");
            println!("whole: open files: {e}");
        }
        Err(e) => panic!("not the open-files error: {e:?}"),
        Ok(r) => panic!("{} records open under a limit of 64", r.open_layers()),
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
            write_cycle(&site, dir.path(), &mut rng, &mut disk, 20, cycle);
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
    let undo = undo_dir(&site);
    let n_before = std::fs::read_dir(&undo).unwrap().count();
    assert_eq!(n_before, 6, "5 records + 1 merged one, redundant");
    let check = |site: &vdrep::replica::Site<'_>| {
        for c in [1u64, 6] {
            assert_point(site, c, &models[c as usize - 1], "");
        }
    };
    check(&site);
    // The run 1..6 is merged in one pass (history::merge_levels), and the
    // crash came after that record was published: the prune after
    // recovery finds the chain 1-6 whole and only deletes what it replaced.
    let rep = site.prune(VM, &thin_all()).unwrap();
    assert_eq!(rep.merged, 0);
    assert_eq!(
        std::fs::read_dir(&undo).unwrap().count(),
        1,
        "one merged record 1-6"
    );
    check(&site);
    assert!(read_replica(&store) == models[5]);
}

/// Thinning a long history merges runs longer than one merge takes
/// (`history::FAN_IN`), in levels, and the second prune merges the record
/// the first one made with the cycles that aged out since: every kept
/// point still reads back as the disk was at its cycle, and only the
/// records of the kept points' chains are left.
#[test]
fn thinning_a_long_history_merges_in_levels() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let site = store.site(SITE).unwrap();
    let mut rng = Rng(4242);
    // Cycle c is cut at 1.7e9 + c s (make_log): 100 s intervals hold
    // cycles 2-99, 100-199, 200-299; the initial copy's point (cut time 0)
    // has an interval of its own.
    let mut disk = first_point(&store, &mut rng, 256 << 10);
    let mut models = vec![Vec::new(), disk.clone()];
    let keep = RetentionPolicy {
        thin_after: Some(std::time::Duration::ZERO),
        thin_every: Some(std::time::Duration::from_secs(100)),
        ..Default::default()
    };
    let undo = undo_dir(&site);
    let mut cycle = 1u64;
    for (upto, kept, records) in [
        (150u64, vec![1u64, 99, 150], 2usize),
        (300, vec![1, 99, 199, 299, 300], 4),
    ] {
        while cycle < upto {
            cycle += 1;
            write_cycle(&site, dir.path(), &mut rng, &mut disk, 3, cycle);
            models.push(disk.clone());
            // From the cached summary (the drainer's question), updated by
            // each commit.
            let newest = site.newest_point(VM).unwrap().map(|p| p.cycle);
            assert_eq!(newest, Some(cycle));
        }
        let rep = site.prune(VM, &keep).unwrap();
        let points: Vec<u64> = site.points(VM).unwrap().iter().map(|p| p.cycle).collect();
        assert_eq!(points, kept);
        assert!(rep.merged > 0, "{rep:?}");
        let newest = site.newest_point(VM).unwrap().map(|p| p.cycle);
        assert_eq!(newest, Some(upto), "newest point after the prune");

        for &c in &kept {
            assert_point(
                &site,
                c,
                &models[c as usize],
                &format!("after pruning to {upto}"),
            );
        }
        assert_eq!(
            std::fs::read_dir(&undo).unwrap().count(),
            records,
            "one record between each two kept points"
        );
    }
}

/// A domain definition is stored with each point (issue 10), the shared
/// suite; and on the directory store unchanged text is a hard link to the
/// previous point's file (no growth per point), a changed one a file of
/// its own.
#[test]
fn definitions_are_kept_per_point_without_duplicates_and_pruned() {
    use std::os::unix::fs::MetadataExt;
    for h in both() {
        let defs = h
            .root
            .join("sites")
            .join(SITE)
            .join("vms")
            .join(VM)
            .join("definitions");
        let ino = |c: u64| {
            std::fs::metadata(defs.join(format!("{c}.xml")))
                .unwrap()
                .ino()
        };
        store_suite::definitions_follow_points(&h, &|_, _| {
            assert_eq!(
                ino(1),
                ino(2),
                "an unchanged definition is not stored again"
            );
            assert_ne!(ino(2), ino(3));
        });
    }
}

/// Issue (points refused "not every disk of VM reached cycle N" at 256
/// VMs): the session commits point N once it saw every disk reach N, and
/// the store looked at the disks while an apply of cycle N+1 was under way
/// (pipelined on the same connection, or of a connection that just ended):
/// it found the disk mid-apply and answered `None`, which the session
/// refuses (retryable, a session lost) when the apply's end reached it
/// first. The fix of session 10 made `commit_point` wait for the apply
/// (the disk's lock); since points are committed on durable logs (session
/// 19) it does not wait: the undo record of N → N+1, published before the
/// state says `applying`, keeps N readable. Deterministic: the apply is
/// paused with its state saying `applying`; the commit must record N
/// meanwhile, and N must read back after the apply.
#[test]
fn a_point_committed_while_the_next_cycle_is_applied_is_recorded_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let mut disk = vec![1u8; 16 * BS as usize];
    initial(store.as_ref(), &disk, 1);
    let old = disk.clone();
    disk[..BS as usize].fill(2);
    let logp = dir.path().join("2.hrl");
    make_log(
        &logp,
        ID,
        1,
        2,
        old.len() as u64,
        &disk,
        &BTreeSet::from([0]),
    );
    let out = ReplicaStore::store_log(
        store.as_ref(),
        DISK,
        &mut std::fs::File::open(&logp).unwrap(),
    )
    .unwrap();
    assert!(matches!(out, StoreOutcome::Stored { .. }), "{out:?}");
    let pause = store.pause_at("state-applying");
    let applier = {
        let store = store.clone();
        std::thread::spawn(move || ReplicaStore::apply(store.as_ref(), DISK, 2))
    };
    assert!(pause.wait_reached(std::time::Duration::from_secs(30)));
    let st = ReplicaStore::replica_state(store.as_ref(), DISK).unwrap();
    assert_eq!((st.cycle, st.applying), (Some(1), Some(2)), "mid-apply");
    let pt = ReplicaStore::commit_point(store.as_ref(), SITE, VM, 1, &[ID], Consistency::Crash);
    pause.release();
    applier.join().unwrap().unwrap();
    let pt = pt
        .unwrap()
        .expect("point 1 refused although the disk reached it");
    assert_eq!(pt.cycle, 1);
    let st = ReplicaStore::replica_state(store.as_ref(), DISK).unwrap();
    assert_eq!((st.cycle, st.applying), (Some(2), None));
    assert_eq!(store_suite::read_point(store.as_ref(), DISK, 1), old);
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), disk);
}

/// A point's `bytes` are the undo records based on its cycle (those that
/// keep it reachable), over every disk; the newest point has none.
#[test]
fn point_bytes_are_the_undo_records_based_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut disk = vec![1u8; 64 * BS as usize];
    initial(&store, &disk, 1);
    ReplicaStore::commit_point(&store, SITE, VM, 1, &[ID], Consistency::Crash)
        .unwrap()
        .unwrap();
    let mut rng = Rng(11);
    for (cycle, writes) in [(2u64, 3usize), (3, 20)] {
        let old = disk.len() as u64;
        let dirty = random_writes(&mut rng, &mut disk, writes);
        let logp = dir.path().join(format!("{cycle}.hrl"));
        make_log(&logp, ID, cycle - 1, cycle, old, &disk, &dirty);
        store_suite::ship(&store, DISK, &logp, cycle);
        ReplicaStore::commit_point(&store, SITE, VM, cycle, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
    }
    // Undo record sizes by base cycle, from the files themselves.
    let mut by_base = std::collections::HashMap::<u64, u64>::new();
    for (p, len) in tree(&root) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".undo") {
            let base: u64 = stem.split_once('-').unwrap().0.parse().unwrap();
            *by_base.entry(base).or_default() += len;
        }
    }
    let pts = ReplicaStore::points(&store, SITE, VM).unwrap();
    let got: Vec<(u64, u64)> = pts.iter().map(|p| (p.cycle, p.bytes)).collect();
    assert_eq!(got, [(1, by_base[&1]), (2, by_base[&2]), (3, 0)]);
    assert!(by_base[&1] > 0 && by_base[&2] > by_base[&1], "{by_base:?}");
}

/// A disk's next log is stored while the previous one is applied: the
/// apply holds the disk's lock for its whole length, the store of a new
/// log does not wait for it (the receiver stores log N+1 beside the apply
/// of N, and commits N+1's point on the durable chain). Deterministic: the
/// apply of 2 is paused with its state saying `applying`; log 3 must be
/// stored and point 3 committed meanwhile (a store that waited would
/// never return: the pause is released only after it did, or after 60 s,
/// which fails the test); then 2 and 3 apply in order and read back.
#[test]
fn a_log_is_stored_while_the_previous_one_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let mut disk = vec![1u8; 16 * BS as usize];
    initial(store.as_ref(), &disk, 1);
    let size = disk.len() as u64;
    let mut images = vec![disk.clone()];
    for c in 2..=3u64 {
        disk[(c as usize) * BS as usize..][..BS as usize].fill(c as u8);
        make_log(
            &dir.path().join(format!("{c}.hrl")),
            ID,
            c - 1,
            c,
            size,
            &disk,
            &BTreeSet::from([c]),
        );
        images.push(disk.clone());
    }
    let store_log = |c: u64| {
        ReplicaStore::store_log(
            store.as_ref(),
            DISK,
            &mut std::fs::File::open(dir.path().join(format!("{c}.hrl"))).unwrap(),
        )
    };
    assert!(matches!(store_log(2).unwrap(), StoreOutcome::Stored { .. }));
    let pause = store.pause_at("state-applying");
    let applier = {
        let store = store.clone();
        std::thread::spawn(move || ReplicaStore::apply(store.as_ref(), DISK, 2))
    };
    assert!(pause.wait_reached(std::time::Duration::from_secs(30)));
    let (tx, rx) = std::sync::mpsc::channel();
    let storer = {
        let store = store.clone();
        let logp = dir.path().join("3.hrl");
        std::thread::spawn(move || {
            let r = ReplicaStore::store_log(
                store.as_ref(),
                DISK,
                &mut std::fs::File::open(logp).unwrap(),
            );
            let _ = tx.send(r);
        })
    };
    let stored = rx.recv_timeout(std::time::Duration::from_secs(60));
    let pt = ReplicaStore::commit_point(store.as_ref(), SITE, VM, 3, &[ID], Consistency::Crash);
    pause.release();
    storer.join().unwrap();
    applier.join().unwrap().unwrap();
    let stored = stored.expect("storing log 3 waited for the apply of log 2");
    assert!(
        matches!(stored, Ok(StoreOutcome::Stored { cycle: 3, .. })),
        "{stored:?}"
    );
    assert_eq!(
        pt.unwrap().map(|p| p.cycle),
        Some(3),
        "point 3 on the durable chain"
    );
    let st = ReplicaStore::replica_state(store.as_ref(), DISK).unwrap();
    assert_eq!(st.cycle, Some(2), "2 applied, 3 not yet");
    assert_eq!(
        ReplicaStore::apply(store.as_ref(), DISK, 3)
            .map(|_| ())
            .ok(),
        Some(())
    );
    assert_eq!(store_suite::read_point(store.as_ref(), DISK, 3), images[2]);
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), images[2]);
}

/// The store suite's full-copy case, then what only the directory store
/// can show: a disk whose replica folder is gone from the store is copied
/// whole again, and the points over it go with a `ReplicaLost` reason.
#[test]
fn a_full_copy_of_one_disk_drops_only_the_points_that_include_it() {
    for h in both() {
        store_suite::a_full_copy_of_one_disk_drops_only_the_points_that_include_it(&h);
        let store = h.open();
        let (a, b) = store_suite::FULL_COPY_DISKS;
        std::fs::remove_dir_all(h.disk_dir(DiskRef {
            disk_id: &b,
            ..DISK
        }))
        .unwrap();
        let i = vdrep::replica::DiskInfo {
            disk_id: b,
            name: "b.img".into(),
            size: 8 * BS,
            block_size: BS as u32,
            cycle: 4,
        };
        let st = store.begin_initial(SITE, VM, &i).unwrap();
        let d = st
            .dropped
            .expect("the points over the lost replica were kept");
        assert_eq!(
            (d.cycles.clone(), d.why),
            (vec![3], vdrep::replica::DropReason::ReplicaLost)
        );
        let left: Vec<u64> = store
            .points(SITE, VM)
            .unwrap()
            .iter()
            .map(|p| p.cycle)
            .collect();
        assert_eq!(left, vec![1]);
        let da = DiskRef {
            disk_id: &a,
            ..DISK
        };
        assert_eq!(
            store_suite::read_point(store.as_ref(), da, 1),
            vec![3u8; 8 * BS as usize]
        );
    }
}

/// Feeds `bytes` a few at a time (the receiver's log arrives in pieces),
/// then fails with a receive error at `fail_at` if given.
struct Pieces<'a> {
    bytes: &'a [u8],
    pos: usize,
    step: usize,
    fail_at: Option<usize>,
}

impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.fail_at.is_some_and(|f| self.pos >= f) {
            return Err(std::io::Error::other("the connection was lost"));
        }
        let end = (self.pos + self.step).min(self.bytes.len());
        let end = self.fail_at.map_or(end, |f| end.min(f));
        let n = (end - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn pieces(bytes: &[u8], fail_at: Option<usize>) -> Pieces<'_> {
    Pieces {
        bytes,
        pos: 0,
        step: 7,
        fail_at,
    }
}

fn incoming_files(h: &DirHarness) -> Vec<String> {
    std::fs::read_dir(h.disk_dir(DISK).join("incoming"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A replica at cycle 1 and the bytes of a good log of cycle 2 for it.
fn disk_and_log_2(h: &DirHarness) -> (Arc<dyn ReplicaStore>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let store = h.open();
    let mut rng = Rng(0x5eed_0013);
    let mut disk = vec![0u8; 256 << 10];
    rng.fill(&mut disk);
    initial(store.as_ref(), &disk, 1);
    let mut d2 = disk.clone();
    let dirty = random_writes(&mut rng, &mut d2, 12);
    let logs = tempfile::tempdir().unwrap();
    let lp = logs.path().join("2.hrl");
    make_log(&lp, ID, 1, 2, disk.len() as u64, &d2, &dirty);
    let bytes = std::fs::read(&lp).unwrap();
    (store, disk, d2, bytes)
}

/// The log is checked as it streams into `incoming/` (no read-back): a
/// damaged, truncated or overlong log, fed in small pieces, is refused,
/// leaves nothing in `incoming/` and cannot be applied; a receive error is
/// reported as one (not as a bad log); the good log in the same pieces is
/// stored and applies.
#[test]
fn a_bad_log_is_refused_while_it_streams_in_and_never_applied() {
    let h = DirHarness::new(false);
    let (store, disk, d2, good) = disk_and_log_2(&h);
    let n = good.len();
    let flipped = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x10;
        b
    };
    let mut longer = good.clone();
    longer.push(0);
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("cut in the header".into(), good[..40].to_vec()),
        ("cut in the first record".into(), good[..n / 4].to_vec()),
        ("cut in the middle".into(), good[..n / 2].to_vec()),
        ("cut in the trailer".into(), good[..n - 9].to_vec()),
        ("one byte short".into(), good[..n - 1].to_vec()),
        ("a payload byte flipped".into(), flipped(n / 2)),
        ("a trailer byte flipped".into(), flipped(n - 5)),
        ("a byte after the seal".into(), longer),
    ];
    for (what, bytes) in &bad {
        let e = store.store_log(DISK, &mut pieces(bytes, None)).unwrap_err();
        assert!(matches!(e, StoreError::CorruptLog { .. }), "{what}: {e}");
        assert_eq!(incoming_files(&h), Vec::<String>::new(), "{what}");
        let e = store.apply(DISK, 2).unwrap_err();
        assert!(matches!(e, StoreError::NotReady { .. }), "{what}: {e}");
        assert_eq!(store.replica_state(DISK).unwrap().cycle, Some(1), "{what}");
    }
    // The connection breaks mid-log: an I/O error, not a bad log.
    let e = store
        .store_log(DISK, &mut pieces(&good, Some(n / 2)))
        .unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert!(e.to_string().contains("connection was lost"), "{e}");
    assert_eq!(incoming_files(&h), Vec::<String>::new());
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), disk);
    // The good log, in the same pieces.
    let out = store.store_log(DISK, &mut pieces(&good, None)).unwrap();
    assert!(
        matches!(out, StoreOutcome::Stored { cycle: 2, bytes, .. } if bytes == n as u64),
        "{out:?}"
    );
    assert_eq!(incoming_files(&h), vec!["2.hrl".to_string()]);
    store.apply(DISK, 2).unwrap();
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), d2);
    assert_eq!(store_suite::read_point(store.as_ref(), DISK, 1), disk);
}

/// Apply reads only the header of a stored log before the undo record's
/// pass, which checks every record and the seal before the replica is
/// touched: a log damaged in `incoming/` after it was stored is refused,
/// with no undo record, the state and the replica unchanged.
#[test]
fn apply_rejects_a_log_damaged_after_it_was_stored() {
    let h = DirHarness::new(false);
    let (store, disk, _, good) = disk_and_log_2(&h);
    let n = good.len();
    // A payload byte, then the trailer's whole-log checksum: the records
    // before the damage pass their own checks.
    for at in [n / 2, n - 5] {
        store.store_log(DISK, &mut &good[..]).unwrap();
        let lp = h.disk_dir(DISK).join("incoming").join("2.hrl");
        let mut b = std::fs::read(&lp).unwrap();
        b[at] ^= 0x10;
        std::fs::write(&lp, &b).unwrap();
        let e = store.apply(DISK, 2).unwrap_err();
        assert!(matches!(e, StoreError::CorruptLog { .. }), "at {at}: {e}");
        let st = store.replica_state(DISK).unwrap();
        assert_eq!((st.cycle, st.applying), (Some(1), None), "at {at}");
        assert_eq!(h.history_records(DISK), Some(0), "at {at}");
        assert_eq!(
            store_suite::read_current(store.as_ref(), DISK),
            disk,
            "at {at}"
        );
        std::fs::remove_file(&lp).unwrap();
    }
}

/// Commit `n` points after the initial copy at cycle 1 (cycles 2..=n+1),
/// one 4 KiB block changed per cycle.
fn commit_points(store: &Store, dir: &Path, disk: &mut [u8], first: u64, n: u64) {
    for c in first..first + n {
        let old = disk.to_vec();
        let b = c % (disk.len() as u64 / BS);
        disk[(b * BS) as usize] = c as u8;
        let logp = dir.join("p.hrl");
        make_log(
            &logp,
            ID,
            c - 1,
            c,
            old.len() as u64,
            disk,
            &BTreeSet::from([b]),
        );
        ReplicaStore::store_log(store, DISK, &mut std::fs::File::open(&logp).unwrap()).unwrap();
        ReplicaStore::apply(store, DISK, c).unwrap();
        let pt = ReplicaStore::commit_point(store, SITE, VM, c, &[ID], Consistency::Crash)
            .unwrap()
            .unwrap();
        assert_eq!(pt.cycle, c);
    }
}

fn vm_dir(root: &Path) -> PathBuf {
    root.join("sites").join(SITE).join("vms").join(VM)
}

fn journals(vmd: &Path) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = std::fs::read_dir(vmd)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("points-") && n.ends_with(".jsonl"))
        .map(|n| {
            let lines = std::fs::read(vmd.join(&n))
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            (n, lines)
        })
        .collect();
    v.sort();
    v
}

/// A point is one line appended to the journal, not a rewrite of every
/// point; the snapshot is rewritten every `POINTS_JOURNAL_MAX` points, and
/// every point reads back, in order, through the store and offline.
#[test]
fn points_are_journaled_and_compacted() {
    let max = vdrep::replica::POINTS_JOURNAL_MAX as u64;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut disk = vec![1u8; 64 * BS as usize];
    initial(&store, &disk, 1);
    let vmd = vm_dir(&root);
    commit_points(&store, dir.path(), &mut disk, 2, 3);
    // Three points: no snapshot rewrite, three lines.
    assert!(!vmd.join("points.json").exists());
    assert_eq!(journals(&vmd), vec![("points-0.jsonl".to_string(), 3)]);
    commit_points(&store, dir.path(), &mut disk, 5, 2 * max);
    let n = 3 + 2 * max;
    let cycles: Vec<u64> = ReplicaStore::points(&store, SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(cycles, (2..2 + n).collect::<Vec<_>>());
    let offline: Vec<u64> = vdrep::replica::points_in(&vmd)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(offline, cycles);
    // One journal, the snapshot's, never longer than the bound.
    let j = journals(&vmd);
    assert_eq!(j.len(), 1, "{j:?}");
    assert!(j[0].1 <= max as usize, "{j:?}");
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vmd.join("points.json")).unwrap()).unwrap();
    assert_eq!(j[0].0, format!("points-{}.jsonl", snap["gen"]));
    assert_eq!(
        snap["points"].as_array().unwrap().len() + j[0].1,
        n as usize
    );
    // A reopened store reads the same.
    drop(store);
    let store = Store::open(&root).unwrap();
    let again: Vec<u64> = ReplicaStore::points(&store, SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(again, cycles);
}

/// A crash during an append leaves an incomplete last line: it was never
/// acknowledged, so it is not a point, and the next append cuts it off. A
/// damaged complete line is an error, never skipped.
#[test]
fn a_torn_last_point_line_is_ignored_and_a_damaged_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut disk = vec![1u8; 16 * BS as usize];
    initial(&store, &disk, 1);
    commit_points(&store, dir.path(), &mut disk, 2, 2);
    let jp = vm_dir(&root).join("points-0.jsonl");
    let good = std::fs::read(&jp).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&jp).unwrap();
    f.write_all(b"{\"cycle\":4,\"time_unix_ns\":1").unwrap();
    drop(f);
    let cycles = |s: &Store| -> Vec<u64> {
        ReplicaStore::points(s, SITE, VM)
            .unwrap()
            .iter()
            .map(|p| p.cycle)
            .collect()
    };
    assert_eq!(cycles(&store), vec![2, 3]);
    commit_points(&store, dir.path(), &mut disk, 4, 1);
    assert_eq!(cycles(&store), vec![2, 3, 4]);
    let now = std::fs::read(&jp).unwrap();
    assert!(now.starts_with(&good) && now.ends_with(b"\n"));
    assert_eq!(
        now.iter().filter(|&&b| b == b'\n').count(),
        3,
        "the torn line was not cut off"
    );
    // Damage inside a complete line.
    let mut bad = now.clone();
    bad[good.len() / 2] = b'#';
    std::fs::write(&jp, &bad).unwrap();
    let err = ReplicaStore::points(&store, SITE, VM).unwrap_err();
    assert!(matches!(err, StoreError::BadState { .. }), "{err:?}");
    assert!(err.to_string().contains("line 1"), "{err}");
}

/// A snapshot rewrite (here: retention dropping points) starts a new
/// journal; the old one, if a crash left it behind, is not read again, so
/// a dropped point never comes back.
#[test]
fn a_journal_left_by_a_crash_does_not_bring_dropped_points_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let mut disk = vec![1u8; 16 * BS as usize];
    initial(&store, &disk, 1);
    commit_points(&store, dir.path(), &mut disk, 2, 6);
    let vmd = vm_dir(&root);
    let old = std::fs::read(vmd.join("points-0.jsonl")).unwrap();
    let keep = RetentionPolicy {
        keep_last: Some(2),
        ..RetentionPolicy::default()
    };
    let r = ReplicaStore::prune(&store, SITE, VM, &keep).unwrap();
    assert_eq!(r.dropped_points, vec![2, 3, 4, 5]);
    assert!(journals(&vmd).is_empty(), "{:?}", journals(&vmd));
    // The crash: the old journal is still there.
    std::fs::write(vmd.join("points-0.jsonl"), &old).unwrap();
    let cycles: Vec<u64> = ReplicaStore::points(&store, SITE, VM)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(cycles, vec![6, 7]);
    // New points go to the new snapshot's journal; the stale one goes at
    // the next rewrite.
    commit_points(&store, dir.path(), &mut disk, 8, 1);
    let cycles: Vec<u64> = vdrep::replica::points_in(&vmd)
        .unwrap()
        .iter()
        .map(|p| p.cycle)
        .collect();
    assert_eq!(cycles, vec![6, 7, 8]);
    let r = ReplicaStore::prune(&store, SITE, VM, &keep).unwrap();
    assert_eq!(r.dropped_points, vec![6]);
    assert!(journals(&vmd).is_empty(), "{:?}", journals(&vmd));
}

/// The directory store commits a point once every disk's log up to it is
/// durable, before the applies (`ReplicaStore::commits_durable_logs`):
/// only over an unbroken chain from the replica's cycle; nothing is applied
/// by the commit; a committed log is never replaced by a different one;
/// reading the point applies what it needs and nothing newer; retention
/// keeps the newest applied point beside pending ones; `drain` stops at a
/// gap; a restart applies what was committed.
#[test]
fn points_are_committed_on_durable_logs_and_applied_when_read() {
    for h in both() {
        let logs = tempfile::tempdir().unwrap();
        let store = h.open();
        let s = store.as_ref();
        assert!(s.commits_durable_logs());
        let mut rng = Rng(11);
        let mut disk = vec![0u8; 256 << 10];
        rng.fill(&mut disk);
        let size = disk.len() as u64;
        initial(s, &disk, 1);
        assert_eq!(store_suite::read_current(s, DISK), disk, "point 1");
        let mut images = std::collections::BTreeMap::new();
        images.insert(1u64, disk.clone());
        let log = |c: u64| logs.path().join(format!("{c}.hrl"));
        for c in 2..=4 {
            let dirty = random_writes(&mut rng, &mut disk, 20);
            make_log(&log(c), ID, c - 1, c, size, &disk, &dirty);
            s.store_log(DISK, &mut std::fs::File::open(log(c)).unwrap())
                .unwrap();
            images.insert(c, disk.clone());
        }
        let commit = |c: u64| {
            s.commit_point(SITE, VM, c, &[ID], Consistency::Crash)
                .unwrap()
        };
        let pt = commit(3).expect("committed on the durable logs 2 and 3");
        assert_eq!(
            pt.time_unix_ns,
            1_700_000_000_000_000_000 + 3 * 1_000_000_000,
            "the cut time of log 3"
        );
        assert_eq!(
            s.replica_state(DISK).unwrap().cycle,
            Some(1),
            "the commit applies nothing"
        );
        // A point of a disk with no log for it is not committed.
        assert!(s
            .commit_point(SITE, VM, 3, &[ID, [0x77; 16]], Consistency::Crash)
            .is_err_or_none());
        // A different log for cycle 3 is refused: a point includes it.
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = images[&2].clone();
        let dirty = random_writes(&mut rng, &mut other, 5);
        let op = other_dir.path().join("3.hrl");
        make_log(&op, ID, 2, 3, size, &other, &dirty);
        assert!(
            matches!(
                s.store_log(DISK, &mut std::fs::File::open(&op).unwrap()),
                Err(StoreError::IdentityMismatch { .. })
            ),
            "a committed log was replaced"
        );
        // The same log again is fine (a resend).
        s.store_log(DISK, &mut std::fs::File::open(log(3)).unwrap())
            .unwrap();
        // Retention keeping one point keeps the newest applied one too.
        let keep1 = RetentionPolicy {
            keep_last: Some(1),
            max_age: None,
            thin_after: None,
            thin_every: None,
        };
        s.prune(SITE, VM, &keep1).unwrap();
        assert_eq!(store_suite::point_cycles(s), vec![1, 3]);
        // Reading point 3 applies 2 and 3, and not 4.
        assert_eq!(store_suite::read_point(s, DISK, 3), images[&3]);
        assert_eq!(s.replica_state(DISK).unwrap().cycle, Some(3));
        assert_eq!(store_suite::read_point(s, DISK, 1), images[&1]);
        // A gap: log 6 (based on 5, which never came) commits nothing, and
        // a drain stops before it.
        let dirty = random_writes(&mut rng, &mut disk, 3);
        make_log(&log(6), ID, 5, 6, size, &disk, &dirty);
        s.store_log(DISK, &mut std::fs::File::open(log(6)).unwrap())
            .unwrap();
        assert!(commit(6).is_none(), "committed across a gap");
        assert_eq!(s.drain(DISK, None).unwrap(), 4);
        assert_eq!(store_suite::read_current(s, DISK), images[&4]);
        // A restart applies the logs of a committed point (and log 6,
        // which now chains on).
        let mut d5 = images[&4].clone();
        let dirty = random_writes(&mut rng, &mut d5, 10);
        make_log(&log(5), ID, 4, 5, size, &d5, &dirty);
        s.store_log(DISK, &mut std::fs::File::open(log(5)).unwrap())
            .unwrap();
        assert!(commit(5).is_some());
        drop(store);
        let store = reopen(&h, "after a commit on a durable log");
        let s = store.as_ref();
        assert_eq!(s.replica_state(DISK).unwrap().cycle, Some(6));
        assert_eq!(store_suite::read_point(s, DISK, 5), d5);
    }
}

trait ErrOrNone {
    fn is_err_or_none(&self) -> bool;
}

impl<T, E> ErrOrNone for Result<Option<T>, E> {
    fn is_err_or_none(&self) -> bool {
        !matches!(self, Ok(Some(_)))
    }
}

/// A failover to a point committed on durable logs applies them first (up
/// to the point, nothing newer: a later log is dropped as before), so the
/// promoted disk holds the point's bytes; a cancel brings the replica back
/// at that point, ready for the sender's logs again.
#[test]
fn a_failover_applies_the_durable_logs_of_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let store = Store::open(&root).unwrap();
    let mut rng = Rng(12);
    let mut disk = vec![0u8; 128 << 10];
    rng.fill(&mut disk);
    let size = disk.len() as u64;
    initial(&store, &disk, 1);
    let mut images = vec![disk.clone(), disk.clone()];
    for c in 2..=3u64 {
        let dirty = random_writes(&mut rng, &mut disk, 15);
        let p = logs.join(format!("{c}.hrl"));
        make_log(&p, ID, c - 1, c, size, &disk, &dirty);
        store
            .store_log(DISK, &mut std::fs::File::open(&p).unwrap())
            .unwrap();
        images.push(disk.clone());
    }
    store
        .commit_point(SITE, VM, 2, &[ID], Consistency::Crash)
        .unwrap()
        .expect("committed on the durable log 2");
    assert_eq!(store.replica_state(DISK).unwrap().cycle, Some(1));
    let site = store.site(SITE).unwrap();
    let dest = dir.path().join("live");
    let live = site
        .promote(VM, Some(2), &dest, &std::collections::HashMap::new())
        .unwrap();
    assert_eq!(live.cycle, 2);
    assert_eq!(
        std::fs::read(&live.disks[0].path).unwrap(),
        images[2],
        "the promoted disk is point 2"
    );
    assert!(
        !root
            .join("sites")
            .join(SITE)
            .join("vms")
            .join(VM)
            .join("disks")
            .join(ID.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .join("incoming")
            .join("3.hrl")
            .exists(),
        "log 3 (past the point) is dropped"
    );
    site.cancel_failover(VM).unwrap();
    assert_eq!(store.replica_state(DISK).unwrap().cycle, Some(2));
    assert_eq!(store_suite::read_point(&store, DISK, 2), images[2]);
}

/// A steady run of cycles reuses its files instead of creating and
/// deleting them (`util::recycle`): `state.json` alternates between two
/// inodes (itself and its spare), every stored log after the first comes
/// from the pool of applied logs' files, and nothing is left behind but
/// the spares. The replica and every point still read as the model.
#[test]
fn cycles_reuse_the_state_and_log_files() {
    use std::os::unix::fs::MetadataExt;
    let h = DirHarness::new(false);
    let store = h.open();
    let logs = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_0032);
    let mut disk = vec![0u8; 64 * BS as usize];
    rng.fill(&mut disk);
    initial(store.as_ref(), &disk, 1);
    let dd = h.disk_dir(DISK);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (mut state_inos, mut log_inos) = (BTreeSet::new(), BTreeSet::new());
    let mut images = Vec::new();
    for c in 2..=12u64 {
        let before = disk.clone();
        let dirty = random_writes(&mut rng, &mut disk, 5);
        let lp = logs.path().join(format!("{c}.hrl"));
        make_log(&lp, ID, c - 1, c, before.len() as u64, &disk, &dirty);
        let out = store
            .store_log(DISK, &mut std::fs::File::open(&lp).unwrap())
            .unwrap();
        assert!(matches!(out, StoreOutcome::Stored { .. }), "{out:?}");
        if c > 2 {
            log_inos.insert(ino(&dd.join("incoming").join(format!("{c}.hrl"))));
        }
        store.apply(DISK, c).unwrap();
        let pt = store
            .commit_point(SITE, VM, c, &[ID], Consistency::Crash)
            .unwrap();
        assert_eq!(pt.map(|p| p.cycle), Some(c));
        images.push((c, disk.clone()));
        if c > 3 {
            state_inos.insert(ino(&dd.join("state.json")));
            state_inos.insert(ino(&dd.join(".state.json.spare")));
        }
    }
    assert_eq!(
        state_inos.len(),
        2,
        "state.json must swap with its spare, not take a new inode per save"
    );
    assert!(
        log_inos.len() <= vdrep::util::recycle::POOL,
        "stored logs must reuse the applied logs' files: {} inodes for 10 logs",
        log_inos.len()
    );
    let mut names: Vec<String> = std::fs::read_dir(dd.join("incoming"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        !names.is_empty() && names.iter().all(|n| vdrep::util::recycle::is_spare(n)),
        "incoming/ holds only spares after every log applied: {names:?}"
    );
    let top: Vec<String> = std::fs::read_dir(&dd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!top.iter().any(|n| n.ends_with(".tmp")), "{top:?}");
    assert!(top.iter().any(|n| n == ".state.json.spare"), "{top:?}");
    // Reopened (recovery runs): the spares are not logs nor temp files.
    drop(store);
    let store = h.open();
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), disk);
    for (c, img) in &images {
        assert_eq!(
            &store_suite::read_point(store.as_ref(), DISK, *c),
            img,
            "point {c}"
        );
    }
}

/// `state.json` is read without the disk's lock (point commits, stores,
/// status) while applies swap it with its spare: a reader that opened it
/// just before a swap may find it rewritten under it by the next save.
/// Readers racing a run of applies must never see a damaged state.
#[test]
fn state_reads_racing_applies_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let mut rng = Rng(0x5eed_0033);
    let mut disk = vec![0u8; 16 * BS as usize];
    rng.fill(&mut disk);
    initial(store.as_ref(), &disk, 1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut reads, mut last) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let st = ReplicaStore::replica_state(store.as_ref(), DISK)
                        .unwrap_or_else(|e| panic!("state read failed after {reads} reads: {e}"));
                    let c = st.cycle.unwrap_or(0);
                    assert!(c >= last, "the state went back from {last} to {c}: {st:?}");
                    last = c;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let logs = tempfile::tempdir().unwrap();
    for c in 2..=150u64 {
        let before = disk.clone();
        let dirty = random_writes(&mut rng, &mut disk, 2);
        let lp = logs.path().join("next.hrl");
        make_log(&lp, ID, c - 1, c, before.len() as u64, &disk, &dirty);
        ReplicaStore::store_log(store.as_ref(), DISK, &mut std::fs::File::open(&lp).unwrap())
            .unwrap();
        ReplicaStore::apply(store.as_ref(), DISK, c).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    assert_eq!(store_suite::read_current(store.as_ref(), DISK), disk);
}

/// One step of [`the_points_summary_says_what_the_points_say`]; the masks
/// are over the two disks `ID` (bit 0) and `ID_B` (bit 1).
#[derive(Debug, Clone)]
enum SumStep {
    /// The next cycle: a log (stored, durable) for each disk of `logs`,
    /// cut at `time` s (out of cycle order); the disks of `apply` apply
    /// their logs up to it (the others keep theirs pending: commit before
    /// apply); a point over the disks of `point` among them.
    Cycle {
        logs: u8,
        apply: u8,
        point: u8,
        time: u64,
        app: bool,
    },
    /// Apply every pending log of a disk.
    Drain(usize),
    /// Keep the newest `n` points.
    KeepLast(usize),
    /// Of all points, one per `s` seconds (undo records merged).
    Thin(u64),
    /// Close the store and open it again (nothing cached).
    Reopen,
}

fn sum_step() -> impl Strategy<Value = SumStep> {
    prop_oneof![
        6 => (1u8..4, 0u8..4, 0u8..4, 0u64..40, any::<bool>()).prop_map(
            |(logs, apply, point, time, app)| SumStep::Cycle { logs, apply, point, time, app }
        ),
        2 => (0usize..2).prop_map(SumStep::Drain),
        1 => (1usize..8).prop_map(SumStep::KeepLast),
        1 => (2u64..10).prop_map(SumStep::Thin),
        1 => Just(SumStep::Reopen),
    ]
}

const ID_B: [u8; 16] = [0x43; 16];

/// What the metrics scrape computed before the points summary, from every
/// point: (points, newest cut, pending apply, newest applied cut).
fn scrape_by_points(store: &dyn ReplicaStore) -> (usize, Option<u64>, usize, Option<u64>) {
    let p = store.points(SITE, VM).unwrap();
    let flags = vdrep::replica::applied_flags(&p, |hex| scrape_replica_cycle(store, hex));
    let applied: Vec<&vdrep::replica::Point> = p
        .iter()
        .zip(flags)
        .filter_map(|(p, a)| a.then_some(p))
        .collect();
    (
        p.len(),
        p.iter().map(|p| p.time_unix_ns).max(),
        p.len() - applied.len(),
        applied.iter().map(|p| p.time_unix_ns).max(),
    )
}

fn scrape_replica_cycle(store: &dyn ReplicaStore, hex: &str) -> Option<u64> {
    let id = [ID, ID_B]
        .into_iter()
        .find(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>() == hex)?;
    let d = DiskRef {
        site: SITE,
        vm: VM,
        disk_id: &id,
    };
    store.replica_state(d).ok()?.cycle
}

fn scrape_by_summary(
    s: &vdrep::replica::PointsSummary,
    store: &dyn ReplicaStore,
) -> (usize, Option<u64>, usize, Option<u64>) {
    let a = s.applied(|hex| scrape_replica_cycle(store, hex));
    (s.len(), s.newest_time_ns(), a.pending, a.newest_time_ns)
}

/// The directory store's points summary (cached per VM, kept by each
/// commit, rebuilt by each rewrite of the points) says what every point
/// says, as the metrics scrape read it before: after commits over
/// changing sets of disks, points committed before their logs are applied
/// and applied later, count retention, thinning merges, and a reopened
/// store (read anew); so does the trait's default, built from `points()`.
/// The newest point, read from the same cache, is the last point.
fn points_summary_says_what_the_points_say(
    steps: &[SumStep],
    wrap: bool,
) -> Result<(), TestCaseError> {
    let h = DirHarness::new(wrap);
    let logs = tempfile::tempdir().unwrap();
    let mut store = h.open();
    let mut rng = Rng(5);
    let ids = [ID, ID_B];
    let mut disks = [vec![0u8; 4 * BS as usize], vec![0u8; 4 * BS as usize]];
    // The last cycle each disk has a durable log (or its copy) of.
    let mut last = [1u64, 1];
    for (d, id) in ids.iter().enumerate() {
        rng.fill(&mut disks[d]);
        store_suite::initial_of(
            store.as_ref(),
            DiskRef {
                site: SITE,
                vm: VM,
                disk_id: id,
            },
            &disks[d],
            1,
        );
    }
    store
        .commit_point(SITE, VM, 1, &ids, Consistency::Crash)
        .unwrap()
        .unwrap();
    let check = |store: &dyn ReplicaStore, what: &str| -> Result<(), TestCaseError> {
        let want = scrape_by_points(store);
        let fast = store.points_summary(SITE, VM).unwrap();
        prop_assert_eq!(scrape_by_summary(&fast, store), want, "{}", what);
        let points = store.points(SITE, VM).unwrap();
        let default = vdrep::replica::PointsSummary::from_points(&points);
        prop_assert_eq!(
            scrape_by_summary(&default, store),
            want,
            "{} (default)",
            what
        );
        let newest = points.last().cloned().map(|mut p| {
            p.bytes = 0;
            p
        });
        prop_assert_eq!(store.newest_point(SITE, VM).unwrap(), newest, "{}", what);
        Ok(())
    };
    check(store.as_ref(), "after the initial copy")?;
    let mut cycle = 1;
    for (k, step) in steps.iter().enumerate() {
        let what = format!("step {k}: {step:?}");
        match *step {
            SumStep::Cycle {
                logs: lm,
                apply,
                point,
                time,
                app,
            } => {
                cycle += 1;
                for d in (0..2).filter(|d| lm & (1 << d) != 0) {
                    let dirty = random_writes(&mut rng, &mut disks[d], 2);
                    let lp = logs.path().join(format!("{d}-{cycle}.hrl"));
                    let size = disks[d].len() as u64;
                    let cut = 1_700_000_000_000_000_000 + time * 1_000_000_000;
                    store_suite::make_log_at(
                        &lp, ids[d], last[d], cycle, size, &disks[d], &dirty, cut,
                    );
                    let dr = DiskRef {
                        site: SITE,
                        vm: VM,
                        disk_id: &ids[d],
                    };
                    store
                        .store_log(dr, &mut std::fs::File::open(&lp).unwrap())
                        .unwrap();
                    last[d] = cycle;
                    if apply & (1 << d) != 0 {
                        store.drain(dr, Some(cycle)).unwrap();
                    }
                }
                let over = if point & lm == 0 { lm } else { point & lm };
                let over: Vec<[u8; 16]> = (0..2)
                    .filter(|d| over & (1 << d) != 0)
                    .map(|d| ids[d])
                    .collect();
                let c = if app {
                    Consistency::App
                } else {
                    Consistency::Crash
                };
                let pt = store.commit_point(SITE, VM, cycle, &over, c).unwrap();
                prop_assert!(pt.is_some(), "{}: not committed", what);
            }
            SumStep::Drain(d) => {
                store
                    .drain(
                        DiskRef {
                            site: SITE,
                            vm: VM,
                            disk_id: &ids[d],
                        },
                        None,
                    )
                    .unwrap();
            }
            SumStep::KeepLast(n) => {
                let keep = RetentionPolicy {
                    keep_last: Some(n),
                    ..Default::default()
                };
                store.prune(SITE, VM, &keep).unwrap();
            }
            SumStep::Thin(s) => {
                let keep = RetentionPolicy {
                    thin_after: Some(std::time::Duration::ZERO),
                    thin_every: Some(std::time::Duration::from_secs(s)),
                    ..Default::default()
                };
                store.prune(SITE, VM, &keep).unwrap();
            }
            SumStep::Reopen => {
                drop(store);
                store = h.open();
            }
        }
        check(store.as_ref(), &what)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
    #[test]
    fn the_points_summary_says_what_the_points_say(steps in proptest::collection::vec(sum_step(), 1..24), wrap in any::<bool>()) {
        points_summary_says_what_the_points_say(&steps, wrap)?;
    }
}
