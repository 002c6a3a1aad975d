//! Direct protection to an object store, no receiver (`vdrep protect --to
//! s3://…`), end to end against a real single-node Garage: bad targets
//! refused before anything is written; a 2-disk VM replicating
//! continuously under a stamped writer, every point crash-consistent
//! across both disks when read back from the bucket with no local state;
//! the sender killed -9 mid-upload and restarted: every point seen before
//! is still there, no half point is visible, and the newest point equals
//! the source. Needs root, /dev/fuse and Garage (CI has all three).

mod garageutil;
mod mountutil;
mod skip;
mod stamputil;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use garageutil::Garage;
use mountutil::*;
use stamputil::*;
use vdrep::objstore::point::{points, ChunkedPoint, Manifest};
use vdrep::objstore::{ObjectClient, S3Client, SealedBucket, StoreUrl};
use vdrep::replica::PointRead;

/// Disk 1 is larger than disk 0 (the writer uses the first
/// [`DISK_BYTES`] of each), so a point's disks are told apart by size.
const SIZES: [u64; 2] = [DISK_BYTES, DISK_BYTES + (4 << 20)];

/// Every disk of point `p` of site-a/vm1, read from the bucket, in the
/// order of [`SIZES`].
fn read_point(b: &Arc<SealedBucket>, p: &Manifest) -> Vec<Vec<u8>> {
    assert_eq!(
        p.disks.len(),
        2,
        "point {}: one cut over both disks",
        p.cycle
    );
    SIZES
        .iter()
        .map(|&size| {
            let dm = p
                .disks
                .iter()
                .find(|d| d.size == size)
                .unwrap_or_else(|| panic!("point {}: no disk of {size} bytes", p.cycle));
            let mut id = [0u8; 16];
            for (i, x) in id.iter_mut().enumerate() {
                *x = u8::from_str_radix(&dm.disk_id[2 * i..2 * i + 2], 16).unwrap();
            }
            let r = ChunkedPoint::open(b.clone(), "site-a", "vm1", p.cycle, &id).unwrap();
            let mut got = vec![0u8; size as usize];
            r.read_at(&mut got, 0).unwrap();
            got
        })
        .collect()
}

/// Every point is crash-consistent across both disks (the first
/// [`DISK_BYTES`] of each, where the writer writes); the largest write
/// sequence number of each point, by cycle.
fn all_consistent(
    b: &Arc<SealedBucket>,
    pts: &[Manifest],
    history: &HashMap<(usize, u64), Vec<u64>>,
) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    for p in pts {
        let mut disks = read_point(b, p);
        for d in &mut disks {
            d.truncate(DISK_BYTES as usize);
        }
        let s = check_consistent(&format!("point {}", p.cycle), &disks, history);
        out.insert(p.cycle, s);
    }
    out
}

fn refused(args: &[&str], want: &[&str]) -> String {
    let o = vdrep(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} succeeded");
    for w in want {
        assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
    }
    err
}

#[test]
fn direct_to_a_bucket_consistent_points_and_sender_kill9() {
    require_fuse!();
    let Some(g) = Garage::start(1) else { return };
    let site = TwoSites::new();
    let creds = g.credentials_file(&site.root);
    let key = site.p("enc.key");
    vdrep_ok(&["keys", "encryption-key", "--out", key.to_str().unwrap()]);
    let url_s = format!("s3://{}/direct", g.bucket);
    let url = StoreUrl::parse(&url_s).unwrap().unwrap();
    let names = ["d0.img", "d1.img"];
    let paths: Vec<_> = names.iter().map(|n| site.p(&format!("vm/{n}"))).collect();
    for (p, size) in paths.iter().zip(SIZES) {
        std::fs::File::create(p).unwrap().set_len(size).unwrap();
    }
    std::env::set_var("VDREP_RETRY_SCALE", "0.005");
    let mut m = site.mount();
    let args_of = |to: &str, endpoint: &str, creds: &Path, key: &Path| -> Vec<String> {
        let mut a: Vec<String> = [
            "protect",
            "vm1",
            "--to",
            to,
            "--s3-endpoint",
            endpoint,
            "--s3-credentials",
            creds.to_str().unwrap(),
            "--encryption-key",
            key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(paths.iter().map(|p| p.to_str().unwrap().to_string()));
        a
    };
    let lister = S3Client::new(&g.endpoint(), &url, &g.credentials()).unwrap();
    let objects = || lister.list("").unwrap().len();

    // Must-show 8: bad targets are refused with a clear error, the
    // non-retryable ones as critical, and nothing is written.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let bad_creds = site.p("bad-creds.toml");
    std::fs::write(
        &bad_creds,
        format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\nregion = \"garage\"\n",
            g.key_id,
            "0".repeat(64)
        ),
    )
    .unwrap();
    let other_key = site.p("other.key");
    vdrep_ok(&[
        "keys",
        "encryption-key",
        "--out",
        other_key.to_str().unwrap(),
    ]);
    let run = |a: Vec<String>, want: &[&str]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, want)
    };
    let e = run(
        args_of(&url_s, &dead, &creds, &key),
        &["cannot reach the object store", "--s3-endpoint"],
    );
    assert!(!e.contains("critical"), "unreachable is retryable: {e}");
    run(
        args_of(&url_s, &g.endpoint(), &bad_creds, &key),
        &["denied access", "--s3-credentials", "critical"],
    );
    run(
        args_of("s3://no-such-bucket/x", &g.endpoint(), &creds, &key),
        &["does not exist", "critical"],
    );
    assert_eq!(objects(), 0, "a refused protect wrote to the bucket");
    assert!(m.status_json()["replication"]
        .as_array()
        .is_none_or(|v| v.is_empty()));

    // Must-show 2: continuous protection straight to the bucket.
    let mut a = args_of(&url_s, &g.endpoint(), &creds, &key);
    a.extend(["--every".into(), "continuous".into()]);
    vdrep_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Another encryption key for the same prefix: refused, critical (the
    // protection running stays as it is).
    run(
        args_of(&url_s, &g.endpoint(), &creds, &other_key),
        &["another key", "critical"],
    );
    vdrep_ok(&["sync", &site.s("vm"), "--timeout", "120"]);
    let b = g.sealed(&url, &key);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = stamp_writer(paths.clone(), stop.clone(), written.clone(), 0x5eed, None);
    let t0 = Instant::now();
    while (points(&b, "site-a", "vm1").unwrap().len() < 12 || written.load(Ordering::Relaxed) < 600)
        && t0.elapsed() < Duration::from_secs(150)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    // Must-show 3 (sender half): kill -9 of the daemon's worker (tracking
    // and replication) while the writer writes and the continuous cycles
    // upload; the supervisor starts a new worker, which resumes the saved
    // protection from the bucket (a new writer generation).
    let before = points(&b, "site-a", "vm1").unwrap();
    // The worker, not the supervisor: killing the supervisor ends the
    // mount (its worker dies with it, PR_SET_PDEATHSIG).
    let supervisor = m.daemon_pid();
    let pid = m.worker_pid().expect("a worker answers");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t1 = Instant::now();
    let cycles = |v: &[Manifest]| v.iter().map(|p| p.cycle).collect::<Vec<_>>();
    let gen0 = before.last().unwrap().gen;
    // Writes go on through the restart, until points of the new
    // generation come.
    while points(&b, "site-a", "vm1")
        .unwrap()
        .iter()
        .filter(|p| p.gen > gen0)
        .count()
        < 3
        && t1.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(m.daemon_pid(), supervisor, "the supervisor stays");
    assert!(m.worker_pid().is_some_and(|w| w != pid), "no new worker");
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().unwrap().all_ok();
    vdrep_ok(&["sync", &site.s("vm"), "--timeout", "180"]);
    let history = history(&log);
    // Nothing acknowledged lost, nothing half visible: every point seen
    // before the kill is still there, and every point, from either
    // generation, reads back crash-consistent, in write order.
    let pts = points(&b, "site-a", "vm1").unwrap();
    for c in cycles(&before) {
        assert!(cycles(&pts).contains(&c), "point {c} lost");
    }
    // Reading a point costs two disks from the bucket, and an idle host
    // makes hundreds of continuous points: check every point around the
    // kill (the last ones of the old writer, every one of the new) and an
    // even spread of the older ones, at most 8.
    let old: Vec<&Manifest> = pts.iter().filter(|p| p.gen <= gen0).collect();
    let (spread, near) = old.split_at(old.len().saturating_sub(4));
    let step = spread.len().div_ceil(8).max(1);
    let checked: Vec<Manifest> = spread
        .iter()
        .step_by(step)
        .chain(near)
        .copied()
        .chain(pts.iter().filter(|p| p.gen > gen0))
        .cloned()
        .collect();
    let seqs = all_consistent(&b, &checked, &history);
    let mut by_cycle: Vec<_> = seqs.iter().collect();
    by_cycle.sort();
    assert!(
        by_cycle.windows(2).all(|w| w[0].1 <= w[1].1),
        "points go back in time: {by_cycle:?}"
    );
    let newest = pts.last().unwrap();
    println!(
        "{} writes, {} points before the kill, {} in all ({} read back); generations {gen0} -> {}",
        log.len(),
        before.len(),
        pts.len(),
        checked.len(),
        newest.gen
    );
    assert!(before.len() >= 8, "only {} points", before.len());
    assert!(newest.gen > gen0, "no new writer generation");
    let got = read_point(&b, newest);
    for (p, g) in paths.iter().zip(&got) {
        assert!(
            &std::fs::read(p).unwrap() == g,
            "{}: the newest point differs from the source",
            p.display()
        );
    }
    let st = m.status_json();
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    access_revoked_while_running(&g, &m, &b, &paths);
    let flags: Vec<String> = args_of(&url_s, &g.endpoint(), &creds, &key)[4..10].to_vec();
    failed_over_stops_the_old_primary(&m, &url_s, &flags, &lister, &paths, &site.p("dr"));
    m.umount();
}

/// Must-show of issue 11's failover record: `failover --unplanned --store
/// s3://…` at another site while this one still replicates continuously
/// (a primary that comes back, or never went away): the sender stops,
/// `Critical`, saying where and when the VM went and from which point and
/// what to run; `--cleanup` of that failover (abandoned) removes the
/// record.
fn failed_over_stops_the_old_primary(
    m: &Mounted,
    url: &str,
    flags: &[String],
    raw: &S3Client,
    paths: &[std::path::PathBuf],
    dr: &Path,
) {
    let records = || {
        raw.list("direct/sites/site-a/vms/vm1/fence/failedover-")
            .unwrap()
            .len()
    };
    assert_eq!(records(), 0);
    let mut args: Vec<&str> = vec!["failover", "vm1", "--unplanned", "--store", url, "--json"];
    args.extend(flags.iter().map(String::as_str));
    let cache = dr.to_str().unwrap();
    args.extend(["--cache", cache, "--hydrate-rate", "1M"]);
    let mut cleanup: Vec<&str> = vec!["failover", "vm1", "--cleanup", "--store", url];
    cleanup.extend(flags.iter().map(String::as_str));
    cleanup.extend(["--cache", cache]);
    let view: serde_json::Value = serde_json::from_str(&vdrep_ok(&args)).unwrap();
    // A failed assertion below must not leave the failover's view process
    // and its FUSE mount running: clean up on unwind too.
    let mut guard = CleanupOnDrop(Some(cleanup.clone()));
    let cycle = view["cycle"].as_u64().unwrap();
    assert_eq!(records(), 1, "the failover wrote its record");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x3c; 4096], 16384).unwrap();
        let st = m.status_json();
        if st["replication"][0]["state"] == "Critical" {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the old primary goes on: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let err = st["replication"][0]["last_error"].as_str().unwrap_or("");
    println!("after the failover: {err}");
    for want in [
        "vm1 was failed over to ",
        &format!("from point {cycle}"),
        "--cleanup",
        "vdrep forget vm1",
    ] {
        assert!(err.contains(want), "{want:?} not in: {st}");
    }
    guard.0 = None;
    vdrep_ok(&cleanup);
    assert_eq!(
        records(),
        0,
        "--cleanup of the abandoned failover removed its record"
    );
}

/// Runs `vdrep` with its arguments when dropped (on a test's unwind).
struct CleanupOnDrop<'a>(Option<Vec<&'a str>>);

impl Drop for CleanupOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(args) = &self.0 {
            let _ = vdrep(args);
        }
    }
}

/// Errors while running, each while the VM replicates continuously: the
/// key loses its rights on the bucket (`garage bucket deny`), then the
/// bucket disappears (its name unaliased). Each time the VM goes `Warning`
/// (retried with back-off, never `Critical`), its last error says what
/// happened and what to do; once fixed
/// (`bucket allow`, the alias back), protection resumes by itself and the
/// newest point equals the source.
fn access_revoked_while_running(
    g: &Garage,
    m: &Mounted,
    b: &Arc<SealedBucket>,
    paths: &[std::path::PathBuf],
) {
    let bucket = g.bucket.as_str();
    let rights = ["--read", "--write", "--owner", bucket, "--key", "vdrep"];
    let cmd = |verb: &[&str], rest: &[&str]| -> Vec<String> {
        verb.iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let cases = [
        (
            "access revoked",
            vec![cmd(&["bucket", "deny"], &rights)],
            vec![cmd(&["bucket", "allow"], &rights)],
            "denied access",
        ),
        (
            "bucket gone",
            vec![
                cmd(&["bucket", "alias", bucket, "vdrep-hidden"], &[]),
                cmd(&["bucket", "unalias", bucket], &[]),
            ],
            vec![cmd(&["bucket", "alias", "vdrep-hidden", bucket], &[])],
            "no longer has the bucket",
        ),
    ];
    let run = |cmds: &[Vec<String>]| {
        for c in cmds {
            g.cli(0, &c.iter().map(String::as_str).collect::<Vec<_>>());
        }
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .unwrap();
    for (what, break_it, fix_it, want) in cases {
        let n_before = points(b, "site-a", "vm1").unwrap().len();
        run(&break_it);
        let t0 = Instant::now();
        let st = loop {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0xa5; 4096], 8192).unwrap();
            let st = m.status_json();
            let vm = &st["replication"][0];
            assert_ne!(
                vm["state"], "Critical",
                "{what}: retried, not critical: {st}"
            );
            if vm["state"] == "Warning"
                && vm["last_error"].as_str().is_some_and(|e| e.contains(want))
            {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what}: no Warning: {st}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let err = st["replication"][0]["last_error"].as_str().unwrap();
        println!("{what}: {err}");
        assert!(
            err.contains("retried") && err.contains("nothing is committed"),
            "{err}"
        );
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            m.status_json()["replication"][0]["state"],
            "Warning",
            "{what}: still retrying"
        );
        run(&fix_it);
        vdrep_ok(&["sync", &m.dir.to_string_lossy(), "--timeout", "180"]);
        let st = m.status_json();
        assert_eq!(st["replication"][0]["state"], "Normal", "{what}: {st}");
        let pts = points(b, "site-a", "vm1").unwrap();
        assert!(pts.len() > n_before, "{what}: no new point once fixed");
        let got = read_point(b, pts.last().unwrap());
        for (p, g) in paths.iter().zip(&got) {
            assert!(
                &std::fs::read(p).unwrap() == g,
                "{what}: {}: the newest point after the outage differs from the source",
                p.display()
            );
        }
    }
}

/// The lag of `vm` from `vdrep status --json` (seconds; none before its
/// first point).
fn lag(dir: &str, vm: &str) -> Option<f64> {
    let st: serde_json::Value = serde_json::from_str(&vdrep_ok(&["status", "--json", dir])).ok()?;
    st["replication"]
        .as_array()?
        .iter()
        .find(|v| v["vm"] == vm)?["lag_secs"]
        .as_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Benchmark, not run by CI (`cargo test --release --test objstore_direct
/// -- --ignored bench --nocapture`): direct protection to a single-node
/// Garage against protection through a `vdrep receive --store s3://…` on
/// the same Garage, same run, same mount, alternating, medians of 3: the
/// initial copy of a 64 MiB disk (random data) and the lag (RPO) p99
/// sampled every 200 ms over 20 s of continuous replication under 4 KiB
/// random writes at ~8 MB/s.
#[test]
#[ignore]
fn bench_direct_vs_receiver() {
    require_fuse!();
    let Some(g) = Garage::start(1) else { return };
    let site = TwoSites::new();
    let creds = g.credentials_file(&site.root);
    let key = site.p("enc.key");
    vdrep_ok(&["keys", "encryption-key", "--out", key.to_str().unwrap()]);
    const SIZE: usize = 64 << 20;
    const ROUNDS: usize = 3;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |b: &mut [u8]| {
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = c.len();
            c.copy_from_slice(&x.to_le_bytes()[..n]);
        }
    };
    let mut data = vec![0u8; SIZE];
    for r in 0..ROUNDS {
        for m in ["direct", "recv"] {
            rnd(&mut data);
            std::fs::write(site.p(&format!("vm/{m}{r}.img")), &data).unwrap();
        }
    }
    let mut mnt = site.mount();
    let recv_url = format!("s3://{}/recv", g.bucket);
    let s3 = |cache: &str| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--s3-endpoint".into(),
            g.endpoint(),
            "--s3-credentials".into(),
            creds.to_str().unwrap().into(),
            "--encryption-key".into(),
            key.to_str().unwrap().into(),
        ];
        if !cache.is_empty() {
            v.extend(["--cache".into(), site.s(cache)]);
        }
        v
    };
    let extra = s3("cache");
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let rcv = Receiver::spawn(
        "127.0.0.1:0",
        Path::new(&recv_url),
        &site.p("kb"),
        &site.p("ka/site-a.crt"),
        &extra,
        &[],
    );
    let dir = site.s("vm");
    let (mut init, mut p99) = (
        HashMap::<&str, Vec<f64>>::new(),
        HashMap::<&str, Vec<f64>>::new(),
    );
    for r in 0..ROUNDS {
        for m in ["direct", "recv"] {
            let vm = format!("{m}{r}");
            let disk = site.s(&format!("vm/{vm}.img"));
            let mut a: Vec<String> = vec!["protect".into(), vm.clone(), "--to".into()];
            if m == "direct" {
                a.push(format!("s3://{}/direct", g.bucket));
                a.extend(s3(""));
            } else {
                a.extend([rcv.addr.clone(), "--trust".into(), site.s("kb/site-b.crt")]);
            }
            a.extend(["--every".into(), "continuous".into(), disk.clone()]);
            let t0 = Instant::now();
            vdrep_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
            vdrep_ok(&["sync", &vm, "--timeout", "600"]);
            init.entry(m).or_default().push(t0.elapsed().as_secs_f64());
            // Continuous under ~8 MB/s of 4 KiB random writes.
            let stop = Arc::new(AtomicBool::new(false));
            let w = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
                    let mut x = 7u64;
                    let blk = [0x5au8; 4096];
                    let t = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let off = (x >> 16) % (SIZE as u64 / 4096) * 4096;
                        f.write_all_at(&blk, off).unwrap();
                        n += 1;
                        // 2,000 writes a second.
                        let due = Duration::from_micros(n * 500);
                        if let Some(d) = due.checked_sub(t.elapsed()) {
                            std::thread::sleep(d);
                        }
                    }
                })
            };
            let mut lags = Vec::new();
            let t1 = Instant::now();
            while t1.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(l) = lag(&dir, &vm) {
                    lags.push(l);
                }
            }
            stop.store(true, Ordering::Relaxed);
            w.join().unwrap();
            vdrep_ok(&["unprotect", &vm]);
            let n = lags.len();
            let p = median(&mut lags.clone());
            lags.sort_by(f64::total_cmp);
            let q = lags[(n * 99 / 100).min(n - 1)];
            println!(
                "round {r} {m}: initial {:.2} s, lag p50 {p:.2} s p99 {q:.2} s ({n} samples)",
                init[m][r]
            );
            p99.entry(m).or_default().push(q);
        }
    }
    for m in ["direct", "recv"] {
        println!(
            "{m}: initial copy of 64 MiB median {:.2} s; continuous lag p99 median {:.2} s",
            median(init.get_mut(m).unwrap()),
            median(p99.get_mut(m).unwrap())
        );
    }
    drop(rcv);
    mnt.umount();
}
