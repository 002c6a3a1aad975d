//! `vdrep receive --store s3://…` end to end on loopback: a tracking mount
//! and `vdrep protect` at the primary, a receiver serving from a real
//! single-node Garage (every object sealed), the initial copy and deltas;
//! `vdrep points --store s3://…` and point reads from a process with no
//! receiver state; the receiver killed and a second one (another cache
//! folder, same address) continuing without a resync. Needs root, /dev/fuse
//! and Garage (CI has all three).

mod garageutil;
mod mountutil;
mod skip;

use garageutil::Garage;
use mountutil::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdrep::objstore::point::{points, ChunkedPoint};
use vdrep::objstore::{Credentials, S3Client, StoreUrl};
use vdrep::replica::PointRead;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = c.len();
        c.copy_from_slice(&x.to_le_bytes()[..k]);
    }
    v
}

/// Every disk of the newest point of vm1, read from the bucket (nothing
/// local), compared with the source files.
fn newest_point_equals_sources(g: &Garage, url: &StoreUrl, key: &Path, sources: &[&Path]) -> u64 {
    let b = g.sealed(url, key);
    let pts = points(&b, "site-a", "vm1").unwrap();
    let newest = pts.last().expect("a point in the bucket");
    assert_eq!(newest.disks.len(), sources.len(), "one cut over both disks");
    for src in sources {
        let want = std::fs::read(src).unwrap();
        let dm = newest
            .disks
            .iter()
            .find(|d| d.size == want.len() as u64)
            .unwrap_or_else(|| panic!("no disk of {} bytes in the point", want.len()));
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&dm.disk_id[2 * i..2 * i + 2], 16).unwrap();
        }
        let r = ChunkedPoint::open(b.clone(), "site-a", "vm1", newest.cycle, &id).unwrap();
        let mut got = vec![0u8; want.len()];
        r.read_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "{}: the point read from the bucket differs from the source",
            src.display()
        );
    }
    newest.cycle
}

#[test]
fn receive_from_a_bucket_and_take_over_without_resync() {
    require_fuse!();
    let Some(g) = Garage::start(1) else { return };
    let site = TwoSites::new();
    let creds = g.credentials_file(&site.root);
    let key = site.p("enc.key");
    vdrep_ok(&["keys", "encryption-key", "--out", key.to_str().unwrap()]);
    let url_s = format!("s3://{}/e2e", g.bucket);
    let url = StoreUrl::parse(&url_s).unwrap().unwrap();
    let a = site.p("vm/a.img");
    let bdisk = site.p("vm/b.img");
    std::fs::write(&a, random_bytes(24 << 20, 1)).unwrap();
    let mut b0 = vec![0u8; 12 << 20];
    b0[..3 << 20].copy_from_slice(&random_bytes(3 << 20, 2));
    std::fs::write(&bdisk, b0).unwrap();
    let mut m = Mounted::new(&site.p("vm"), &["--keys", &site.s("ka")]);
    let s3_flags = |cache: &str| -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            g.endpoint(),
            "--s3-credentials".into(),
            creds.to_str().unwrap().into(),
            "--encryption-key".into(),
            key.to_str().unwrap().into(),
            "--cache".into(),
            site.s(cache),
        ]
    };
    let spawn = |addr: &str, cache: &str| {
        let extra = s3_flags(cache);
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        Receiver::spawn(
            addr,
            Path::new(&url_s),
            &site.p("kb"),
            &site.p("ka/site-a.crt"),
            &extra,
            &[],
        )
    };
    let mut r1 = spawn("127.0.0.1:0", "cache1");
    vdrep_ok(&[
        "protect",
        "vm1",
        "--to",
        &r1.addr,
        "--trust",
        &site.s("kb/site-b.crt"),
        "--every",
        "1h",
        a.to_str().unwrap(),
        bdisk.to_str().unwrap(),
    ]);
    let sync = || vdrep_ok(&["sync", &site.s("vm"), "--timeout", "180"]);
    sync();
    let c1 = newest_point_equals_sources(&g, &url, &key, &[&a, &bdisk]);
    // A 1 % delta on each disk, through the mount.
    let write = |p: &Path, seed: u64, n: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        let len = f.metadata().unwrap().len();
        let mut x = seed | 1;
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let off = (x >> 20) % (len / 4096) * 4096;
            f.write_all_at(&random_bytes(4096, x), off).unwrap();
        }
    };
    write(&a, 3, 60);
    write(&bdisk, 4, 30);
    sync();
    let c2 = newest_point_equals_sources(&g, &url, &key, &[&a, &bdisk]);
    assert!(c2 > c1);
    let at_c2 = [std::fs::read(&a).unwrap(), std::fs::read(&bdisk).unwrap()];
    // `vdrep points --store s3://…` from another process.
    let mut args = vec!["points", "vm1", "--store", url_s.as_str(), "--json"];
    let flags = s3_flags("unused");
    args.extend(flags[..6].iter().map(|s| s.as_str()));
    let out = vdrep_ok(&args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cycles: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cycle"].as_u64().unwrap())
        .collect();
    assert!(cycles.contains(&c1) && cycles.contains(&c2), "{out}");
    // The receiver dies; another one (nothing local in common) takes its
    // address and the sender continues from the bucket: no new initial copy
    // (no chunk object is written), the next delta lands.
    let creds_t = Credentials::from_file(&creds).unwrap();
    let lister = S3Client::new(&g.endpoint(), &url, &creds_t).unwrap();
    let chunks = |c: &S3Client| -> Vec<String> {
        use vdrep::objstore::ObjectClient;
        c.list("e2e/")
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .filter(|k| k.contains("/chunks/"))
            .collect()
    };
    let before = chunks(&lister);
    assert!(!before.is_empty());
    let addr = r1.addr.clone();
    r1.kill9();
    let _r2 = spawn(&addr, "cache2");
    write(&a, 5, 60);
    sync();
    let c3 = newest_point_equals_sources(&g, &url, &key, &[&a, &bdisk]);
    assert!(c3 > c2);
    assert_eq!(
        chunks(&lister),
        before,
        "the second receiver re-copied disks"
    );
    let st = m.status_json();
    assert_eq!(st["replication"][0]["state"], "Normal", "{st}");
    // Failover straight from the bucket, from a folder with no state.
    let mut flags = s3_flags("dr");
    flags.extend(["--point".to_string(), c2.to_string()]);
    let t = std::time::Instant::now();
    test_failover_from_the_bucket(&url_s, &flags, &lister, &at_c2, &site.p("dr"));
    eprintln!("the failover from the bucket took {:?}", t.elapsed());
    let mut flags = s3_flags("dr2");
    flags.extend(["--point".to_string(), c2.to_string()]);
    let t = std::time::Instant::now();
    unplanned_from_the_bucket(&url_s, &flags, &lister, &at_c2, &site.p("dr2"));
    eprintln!(
        "the unplanned failover from the bucket took {:?}",
        t.elapsed()
    );
    m.umount();
}

/// Stops a bucket view left by a failed assertion.
struct ViewGuard(Vec<String>);

impl Drop for ViewGuard {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(|s| s.as_str()).collect();
        let _ = vdrep(&args);
    }
}

/// `failover --test --store s3://…` exposes point c2 (whose sources are
/// `at_c2`) through the FUSE view in a process of its own, from the cache
/// folder `dr` (empty: no local state). A partial read fetches only the
/// chunk and log segments it touches; a tampered chunk fails its read with
/// EIO, named in the view's log, and is served once restored (a failure is
/// not cached); every byte equals the source at c2; `--cleanup` reports the
/// bytes fetched and removes the view and the cache.
fn test_failover_from_the_bucket(
    url: &str,
    flags: &[String],
    raw: &S3Client,
    at_c2: &[Vec<u8>; 2],
    dr: &Path,
) {
    use vdrep::objstore::{get_all, ObjectClient, PutMode};
    assert!(!dr.exists(), "the second site starts with nothing");
    let mut expose: Vec<&str> = vec!["failover", "vm1", "--test", "--store", url, "--json"];
    expose.extend(flags.iter().map(|s| s.as_str()));
    let args = expose.clone();
    let mut cleanup: Vec<String> = ["failover", "vm1", "--cleanup", "--store", url, "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cleanup.extend(flags[..8].iter().cloned());
    let guard = ViewGuard(cleanup.clone());
    let t0 = std::time::Instant::now();
    let out = vdrep_ok(&args);
    eprintln!(
        "failover --test --store s3:// exposed the view in {} ms (debug build)",
        t0.elapsed().as_millis()
    );
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let scratch = Path::new(view["scratch"].as_str().unwrap()).to_path_buf();
    // The view pinned its point in the bucket (a prune elsewhere keeps it).
    let cycle = view["cycle"].as_u64().unwrap();
    assert_eq!(pins(raw), [cycle], "one pin, of the exposed point");
    let file_of = |want: &[u8]| -> std::path::PathBuf {
        let d = view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["size"].as_u64() == Some(want.len() as u64 + 512))
            .unwrap_or_else(|| panic!("no exposed disk of {} bytes: {view}", want.len()));
        d["path"].as_str().unwrap().into()
    };
    let (fa, fb) = (file_of(&at_c2[0]), file_of(&at_c2[1]));
    let fetched = || -> u64 {
        // The view rewrites its status every second.
        std::thread::sleep(std::time::Duration::from_millis(1300));
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(scratch.join("status.json")).unwrap()).unwrap();
        st["cache"]["fetched_bytes"].as_u64().unwrap()
    };
    assert_eq!(fetched(), 0, "exposing fetches no disk data");
    // A partial read: 1 MiB inside chunk 2 of the 24 MiB disk.
    let f = std::fs::File::open(&fa).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 8 << 20).unwrap();
    assert!(buf == at_c2[0][8 << 20..9 << 20], "partial read differs");
    let partial = fetched();
    eprintln!(
        "a 1 MiB read of a {} MiB disk fetched {partial} bytes",
        at_c2[0].len() >> 20
    );
    assert!(
        partial > 0 && partial <= (4 << 20) + (1 << 20),
        "one 4 MiB chunk and the log segments of the read, not {partial} bytes"
    );
    // Tamper with every disk's chunk 0 (not read yet): refused, never served.
    let chunk0: Vec<String> = raw
        .list("e2e/")
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .filter(|k| k.contains("/chunks/00000000."))
        .collect();
    assert!(!chunk0.is_empty());
    let originals: Vec<Vec<u8>> = chunk0.iter().map(|k| get_all(raw, k).unwrap()).collect();
    for (k, o) in chunk0.iter().zip(&originals) {
        let mut t = o.clone();
        let n = t.len();
        t[n / 2] ^= 0x40;
        raw.put(k, &t, PutMode::Overwrite).unwrap();
    }
    let mut small = vec![0u8; 4096];
    let e = f.read_exact_at(&mut small, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = std::fs::read_to_string(scratch.join("view.log")).unwrap();
    assert!(
        chunk0.iter().any(|k| log.contains(k.as_str())),
        "the view's log names the tampered object: {log}"
    );
    for (k, o) in chunk0.iter().zip(&originals) {
        raw.put(k, o, PutMode::Overwrite).unwrap();
    }
    // Every byte of both disks, then the fixed VHD footer.
    for (file, want) in [(&fa, &at_c2[0]), (&fb, &at_c2[1])] {
        let got = std::fs::read(file).unwrap();
        assert!(got[..want.len()] == want[..], "{} differs", file.display());
        assert_eq!(&got[want.len()..want.len() + 8], b"conectix");
    }
    drop(f);
    let args: Vec<&str> = cleanup.iter().map(|s| s.as_str()).collect();
    let out = vdrep_ok(&args);
    std::mem::forget(guard);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let total = v["status"]["cache"]["fetched_bytes"].as_u64().unwrap();
    let disks = (at_c2[0].len() + at_c2[1].len()) as u64;
    eprintln!("reading both disks whole fetched {total} of {disks} bytes");
    assert!(total >= partial && total <= disks + (2 << 20), "{v}");
    assert!(v["status"]["stopped"].as_bool().unwrap(), "{v}");
    assert!(!scratch.exists(), "the scratch overlays are gone");
    assert!(
        !dr.join("failover/.cache/site-a/vm1").exists(),
        "the object cache is gone"
    );
    assert!(!fa.exists(), "the view is unmounted");
    assert_eq!(pins(raw), [0u64; 0], "--cleanup released the pin");
    // A view process killed -9 leaves its pin: --cleanup releases it.
    let view: serde_json::Value = serde_json::from_str(&vdrep_ok(&expose)).unwrap();
    let scratch = Path::new(view["scratch"].as_str().unwrap()).to_path_buf();
    assert_eq!(pins(raw), [cycle]);
    let pid = view_status(&scratch)["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(pins(raw), [cycle], "a killed view cannot release its pin");
    let args: Vec<&str> = cleanup.iter().map(|s| s.as_str()).collect();
    vdrep_ok(&args);
    assert_eq!(
        pins(raw),
        [0u64; 0],
        "--cleanup released the dead view's pin"
    );
}

/// The cycles of vm1's pins in the bucket (`objstore::pin` names).
fn pins(raw: &S3Client) -> Vec<u64> {
    use vdrep::objstore::ObjectClient;
    raw.list("e2e/sites/site-a/vms/vm1/pins/")
        .unwrap()
        .into_iter()
        .map(|m| {
            let leaf = m.key.rsplit('/').next().unwrap().to_string();
            u64::from_str_radix(&leaf[..16], 16).unwrap()
        })
        .collect()
}

/// The view process's `status.json` in `scratch` (rewritten every second).
fn view_status(scratch: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(scratch.join("status.json")).unwrap_or_default())
        .unwrap_or_default()
}

/// Poll the view's status until `done` holds (60 s at most); the status.
fn wait_status(
    scratch: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let st = view_status(scratch);
        if done(&st) {
            return st;
        }
        assert!(t0.elapsed().as_secs() < 60, "{what}: {st}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `failover --unplanned --store s3://…` of point c2 (sources `at_c2`)
/// from the empty cache folder `dr`: the view serves reads lazily while a
/// background copy (throttled to 8 MiB/s here) hydrates both disks. The
/// view process is killed -9 in the middle of the copy; the same command
/// resumes it (`resumed_bytes` > 0), and the hydrated files equal the
/// point byte for byte (the disk, then the fixed VHD footer); a block the
/// VM wrote and flushed before the crash is still there. Once
/// complete, reads fetch nothing more from the bucket (the view switched
/// to the local copies). A write through the view (the VM's) is folded
/// into the local disk by `--commit`, which is refused before the copy
/// is complete.
fn unplanned_from_the_bucket(
    url: &str,
    flags: &[String],
    raw: &S3Client,
    at_c2: &[Vec<u8>; 2],
    dr: &Path,
) {
    assert!(!dr.exists(), "the second site starts with nothing");
    let mut args: Vec<&str> = vec!["failover", "vm1", "--unplanned", "--store", url, "--json"];
    args.extend(flags.iter().map(|s| s.as_str()));
    args.extend(["--hydrate-rate", "8M"]);
    let mut commit: Vec<&str> = vec!["failover", "vm1", "--commit", "--store", url, "--json"];
    commit.extend(flags[..8].iter().map(|s| s.as_str()));
    let mut cleanup: Vec<String> = ["failover", "vm1", "--cleanup", "--store", url]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cleanup.extend(flags[..8].iter().cloned());
    let guard = ViewGuard(cleanup);
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("unplanned: {what} after {:?}", t0.elapsed());
    let view: serde_json::Value = serde_json::from_str(&vdrep_ok(&args)).unwrap();
    let scratch = Path::new(view["scratch"].as_str().unwrap()).to_path_buf();
    let path_of = |want: &[u8]| -> std::path::PathBuf {
        view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["size"].as_u64() == Some(want.len() as u64 + 512))
            .map(|d| d["path"].as_str().unwrap().into())
            .unwrap()
    };
    let fa = path_of(&at_c2[0]);
    // Reads are served while the copy runs.
    let f = std::fs::File::open(&fa).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 16 << 20).unwrap();
    assert!(buf == at_c2[0][16 << 20..17 << 20]);
    drop(f);
    let total = (at_c2[0].len() + at_c2[1].len()) as u64;
    let st = wait_status(&scratch, "hydration under way", |st| {
        st["hydration"]["hydrated_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(st["hydration"]["total_bytes"].as_u64(), Some(total), "{st}");
    // `vdrep status` shows the failover and its progress (text and JSON).
    let sj: serde_json::Value = serde_json::from_str(&vdrep_ok(&["status", "--json"])).unwrap();
    let bf = &sj["bucket_failovers"][0];
    assert_eq!(bf["mode"], "unplanned", "{sj}");
    assert_eq!(bf["view"]["vm"], "vm1", "{sj}");
    assert_eq!(
        bf["status"]["hydration"]["total_bytes"].as_u64(),
        Some(total),
        "{sj}"
    );
    let text = vdrep_ok(&["status"]);
    assert!(
        text.contains("failover unplanned of site-a/vm1 from the bucket")
            && text.contains("hydrat"),
        "{text}"
    );
    let o = vdrep(&commit);
    assert!(!o.status.success(), "--commit before the copy is complete");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("hydrated"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The VM writes a block and flushes it; then the view process
    // crashes in the middle of the copy, and the same command runs again.
    let early = vec![0xc3u8; 4096];
    {
        let w = std::fs::OpenOptions::new().write(true).open(&fa).unwrap();
        w.write_all_at(&early, 2 << 20).unwrap();
        w.sync_all().unwrap();
    }
    let pid = st["pid"].as_i64().unwrap() as i32;
    let done_before = view_status(&scratch)["hydration"]["hydrated_bytes"]
        .as_u64()
        .unwrap();
    assert!(done_before < total, "the copy finished before the kill");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    phase("killed");
    let view2: serde_json::Value = serde_json::from_str(&vdrep_ok(&args)).unwrap();
    assert_eq!(view2["cycle"], view["cycle"]);
    // The restarted view renewed the same pin (one pinner per view).
    let cycle = view["cycle"].as_u64().unwrap();
    assert_eq!(pins(raw), [cycle]);
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&fa)
        .unwrap()
        .read_exact_at(&mut got, 2 << 20)
        .unwrap();
    assert!(
        got == early,
        "the VM's flushed write did not survive the crash"
    );
    let st = wait_status(&scratch, "hydration complete", |st| {
        st["hydration"]["complete"].as_bool() == Some(true)
    });
    phase("hydrated");
    let resumed = st["hydration"]["resumed_bytes"].as_u64().unwrap();
    eprintln!("hydration resumed at {resumed} of {total} bytes after a kill -9");
    assert!(resumed > 0 && resumed < total, "{st}");
    assert_eq!(
        st["hydration"]["hydrated_bytes"].as_u64(),
        Some(total),
        "{st}"
    );
    let hdir = dr.join("failover/.hydrate/site-a/vm1");
    for want in at_c2 {
        let name = path_of(want).file_name().unwrap().to_owned();
        let got = std::fs::read(hdir.join(&name)).unwrap();
        assert_eq!(got.len(), want.len() + 512);
        assert!(
            got[..want.len()] == want[..],
            "hydrated {name:?} differs from the point"
        );
        assert_eq!(&got[want.len()..want.len() + 8], b"conectix");
    }
    // Switched: reading both disks whole now fetches nothing.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let before = view_status(&scratch)["cache"]["fetched_bytes"]
        .as_u64()
        .unwrap();
    for want in at_c2 {
        let mut want = want.clone();
        if want.len() == at_c2[0].len() {
            want[2 << 20..(2 << 20) + 4096].copy_from_slice(&early);
        }
        let got = std::fs::read(path_of(&want)).unwrap();
        assert!(got[..want.len()] == want[..]);
    }
    // The VM writes a block, then stops; --commit keeps it in the local disk.
    let stamp = vec![0x5au8; 4096];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fa)
        .unwrap()
        .write_all_at(&stamp, 1 << 20)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let after = view_status(&scratch)["cache"]["fetched_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        before, after,
        "reads after the hydration went to the bucket"
    );
    phase("switched");
    let out: serde_json::Value = serde_json::from_str(&vdrep_ok(&commit)).unwrap();
    phase("committed");
    assert_eq!(pins(raw), [0u64; 0], "--commit released the pin");
    std::mem::forget(guard);
    let disks: Vec<std::path::PathBuf> = out["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().into())
        .collect();
    assert_eq!(disks.len(), 2, "{out}");
    let name_a = fa.file_name().unwrap();
    for d in &disks {
        let got = std::fs::read(d).unwrap();
        let mut want = at_c2
            .iter()
            .find(|w| w.len() + 512 == got.len())
            .unwrap()
            .clone();
        if d.file_name() == Some(name_a) {
            want[1 << 20..(1 << 20) + 4096].copy_from_slice(&stamp);
            want[2 << 20..(2 << 20) + 4096].copy_from_slice(&early);
        }
        assert!(got[..want.len()] == want[..], "{} differs", d.display());
    }
    assert!(
        !scratch.exists() && !fa.exists(),
        "the view is gone after --commit"
    );
}
