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
    m.umount();
}
