//! The object-client seam (`vdrep::objstore`): one conformance suite run
//! against the in-memory bucket and a real Garage node (S3 client), the
//! conditional operations Garage 2.5 honours (measured, see
//! kernel-notes/s3.md), the errors of a bad endpoint, bad credentials and a
//! missing bucket, the failure-injecting wrapper, and a 3-node Garage
//! (replication factor 3) that keeps serving with one node killed.

mod garageutil;
mod skip;

use garageutil::Garage;
use std::sync::Arc;
use vdrep::objstore::envelope::{EncryptionKey, EnvelopeErrorKind};
use vdrep::objstore::fence::{FenceErrorKind, FenceView, Writer};
use vdrep::objstore::point::{points, ChunkedPoint, DiskManifest, PointErrorKind, VmWriter, CHUNK};
use vdrep::objstore::{
    conditional_create_honoured, get_all, Credentials, FailClient, GetIf, MemClient, ObjOp,
    ObjectClient, ObjectErrorKind, PutMode, S3Client, StoreUrl,
};
use vdrep::objstore::{BucketErrorKind, SealedBucket};
use vdrep::replica::PointRead;

fn s3(g: &Garage, node: usize, bucket: &str) -> S3Client {
    let creds = Credentials {
        access_key_id: g.key_id.clone(),
        secret_access_key: g.secret.clone(),
        region: Some(garageutil::REGION.into()),
    };
    let url = StoreUrl::parse(&format!("s3://{bucket}/p"))
        .unwrap()
        .unwrap();
    S3Client::new(&g.endpoint_of(node), &url, &creds).unwrap()
}

/// What every client must do the same way.
fn conformance(c: &dyn ObjectClient) {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let etag = c.put("p/a/1", &body, PutMode::Overwrite).unwrap();
    assert!(!etag.is_empty());
    assert_eq!(get_all(c, "p/a/1").unwrap(), body);
    assert_eq!(
        c.get("p/a/1", Some(1000..1010), GetIf::Always)
            .unwrap()
            .unwrap(),
        &body[1000..1010]
    );
    // A range past the end is clamped.
    let tail = c
        .get("p/a/1", Some(299_990..400_000), GetIf::Always)
        .unwrap()
        .unwrap();
    assert_eq!(tail, &body[299_990..]);
    let m = c.head("p/a/1").unwrap();
    assert_eq!(
        (m.size, m.etag.as_str()),
        (body.len() as u64, etag.as_str())
    );
    // Conditional gets.
    assert_eq!(c.get("p/a/1", None, GetIf::NoneMatch(&etag)).unwrap(), None);
    assert_eq!(
        c.get("p/a/1", None, GetIf::Match("\"0123\""))
            .unwrap_err()
            .kind(),
        ObjectErrorKind::PreconditionFailed
    );
    assert_eq!(
        c.get("p/a/1", Some(0..4), GetIf::Match(&etag))
            .unwrap()
            .unwrap(),
        &body[..4]
    );
    // Overwrite changes the etag.
    let etag2 = c.put("p/a/1", b"new", PutMode::Overwrite).unwrap();
    assert_ne!(etag, etag2);
    assert!(c
        .get("p/a/1", None, GetIf::NoneMatch(&etag))
        .unwrap()
        .is_some());
    // Missing objects.
    assert_eq!(
        c.head("p/none").unwrap_err().kind(),
        ObjectErrorKind::NotFound
    );
    assert_eq!(
        get_all(c, "p/none").unwrap_err().kind(),
        ObjectErrorKind::NotFound
    );
    c.delete("p/none").unwrap();
    // Listing: prefix, order, pagination past 1000 keys is the S3 client's
    // own test below.
    for k in ["p/b/2", "p/b/1", "p/bb", "p/c"] {
        c.put(k, k.as_bytes(), PutMode::Overwrite).unwrap();
    }
    let keys: Vec<String> = c.list("p/b/").unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, ["p/b/1", "p/b/2"]);
    let all = c.list("p/").unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all.iter().find(|m| m.key == "p/c").unwrap().size, 3);
    for m in all {
        c.delete(&m.key).unwrap();
    }
    assert!(c.list("p/").unwrap().is_empty());
}

#[test]
fn mem_client_conformance() {
    let c = MemClient::new();
    conformance(&c);
    assert!(conditional_create_honoured(&c, "probe").unwrap());
}

#[test]
fn garage_client_conformance_and_conditionals() {
    let Some(g) = Garage::start(1) else { return };
    let c = s3(&g, 0, &g.bucket);
    c.check().unwrap();
    conformance(&c);
    // Measured: Garage 2.5 ignores If-None-Match: * on PUT (it overwrites).
    // The store's fencing must not rely on it; if a later Garage honours it,
    // this fails and kernel-notes/s3.md must be updated.
    assert!(!conditional_create_honoured(&c, "p/probe").unwrap());
    // Listing pages (1000 keys per page).
    let n = 1010;
    for i in 0..n {
        c.put(&format!("p/many/{i:05}"), b"x", PutMode::Overwrite)
            .unwrap();
    }
    let listed = c.list("p/many/").unwrap();
    assert_eq!(listed.len(), n);
    assert_eq!(listed[n - 1].key, format!("p/many/{:05}", n - 1));
    // Keys with characters that need encoding survive a list.
    c.put("p/odd key+%/é", b"1", PutMode::Overwrite).unwrap();
    assert_eq!(c.list("p/odd").unwrap()[0].key, "p/odd key+%/é");
    assert_eq!(get_all(&c, "p/odd key+%/é").unwrap(), b"1");
}

#[test]
fn garage_bad_endpoint_credentials_and_bucket() {
    let Some(g) = Garage::start(1) else { return };
    let url = StoreUrl::parse("s3://vdrep-test/p").unwrap().unwrap();
    let good = Credentials {
        access_key_id: g.key_id.clone(),
        secret_access_key: g.secret.clone(),
        region: Some(garageutil::REGION.into()),
    };
    // Unreachable: a closed loopback port (retried, then Unreachable).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = S3Client::new(&format!("http://127.0.0.1:{port}"), &url, &good)
        .unwrap()
        .with_attempts(2);
    let e = c.check().unwrap_err();
    assert_eq!(e.kind(), ObjectErrorKind::Unreachable, "{e}");
    assert!(e.retryable());
    // Bad secret.
    let mut bad = good.clone();
    bad.secret_access_key = "0".repeat(64);
    let c = S3Client::new(&g.endpoint(), &url, &bad).unwrap();
    let e = c.check().unwrap_err();
    assert_eq!(e.kind(), ObjectErrorKind::Denied, "{e}");
    assert!(!e.retryable());
    assert_eq!(
        c.put("p/x", b"1", PutMode::Overwrite).unwrap_err().kind(),
        ObjectErrorKind::Denied
    );
    // Missing bucket.
    let c = s3(&g, 0, "no-such-bucket");
    let e = c.check().unwrap_err();
    assert_eq!(e.kind(), ObjectErrorKind::NoSuchBucket, "{e}");
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    assert!(!e.retryable());
    // Bad endpoint URLs are refused before any call.
    for ep in ["ftp://x", "not a url"] {
        let e = S3Client::new(ep, &url, &good).err().unwrap();
        assert_eq!(e.kind(), ObjectErrorKind::Config);
    }
    // Nothing was written by any of the failed clients.
    assert!(s3(&g, 0, &g.bucket).list("").unwrap().is_empty());
}

#[test]
fn fail_client_before_after_and_crash() {
    let c = FailClient::new(MemClient::new());
    c.fail_nth(ObjOp::Put, 1, false);
    c.fail_nth(ObjOp::Put, 2, true);
    let e = c.put("a", b"1", PutMode::Overwrite).unwrap_err();
    assert_eq!(e.kind(), ObjectErrorKind::Injected);
    assert!(c.inner().list("").unwrap().is_empty(), "failed before");
    c.put("b", b"2", PutMode::Overwrite).unwrap_err();
    assert_eq!(get_all(c.inner(), "b").unwrap(), b"2", "failed after");
    c.put("c", b"3", PutMode::Overwrite).unwrap();
    c.crash_at(ObjOp::Get, 1, false);
    get_all(&c, "c").unwrap_err();
    assert!(c.crashed());
    c.put("d", b"4", PutMode::Overwrite).unwrap_err();
    assert_eq!(c.inner().list("").unwrap().len(), 2);
    assert_eq!(c.calls(ObjOp::Put), 3);

    let r = FailClient::new(MemClient::new());
    r.random(7, 300);
    let ok = (0..1000)
        .filter(|i| r.put(&format!("k{i}"), b"x", PutMode::Overwrite).is_ok())
        .count();
    assert!((600..800).contains(&ok), "{ok}");
    assert_eq!(r.injected(), 1000 - ok as u64);
}

#[test]
fn garage_three_nodes_survive_one_lost() {
    let Some(mut g) = Garage::start(3) else {
        return;
    };
    let c0 = s3(&g, 0, &g.bucket);
    for i in 0..20 {
        c0.put(&format!("p/k{i}"), &[i as u8; 1000], PutMode::Overwrite)
            .unwrap();
    }
    g.kill_node(2);
    // Quorum 2 of 3: writes and reads go on through either live node.
    let c1 = s3(&g, 1, &g.bucket);
    for i in 20..40 {
        c0.put(&format!("p/k{i}"), &[i as u8; 1000], PutMode::Overwrite)
            .unwrap();
    }
    for i in 0..40 {
        assert_eq!(
            get_all(&c1, &format!("p/k{i}")).unwrap(),
            vec![i as u8; 1000]
        );
    }
    assert_eq!(c1.list("p/").unwrap().len(), 40);
    g.restart_node(2);
    let c2 = s3(&g, 2, &g.bucket);
    assert_eq!(get_all(&c2, "p/k39").unwrap(), vec![39u8; 1000]);
}

#[test]
fn garage_fencing_racing_writers() {
    let Some(g) = Garage::start(1) else { return };
    let c = std::sync::Arc::new(s3(&g, 0, &g.bucket));
    let old = Writer::claim(&*c, "p/site/vm/fence", [0xee; 16], || Ok(1)).unwrap();
    old.check(&*c).unwrap();
    // Four writers race for the next generation through the real engine.
    let handles: Vec<_> = (1..=4u8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || Writer::claim(&*c, "p/site/vm/fence", [i; 16], || Ok(10)))
        })
        .collect();
    let won: Vec<Writer> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().ok())
        .collect();
    assert!(!won.is_empty());
    assert_eq!(old.check(&*c).unwrap_err().kind(), FenceErrorKind::Fenced);
    assert_eq!(won.iter().filter(|w| w.check(&*c).is_ok()).count(), 1);
    let v = FenceView::load(&*c, "p/site/vm/fence").unwrap();
    for gen in 1..=v.max_gen() {
        let valid = v
            .claims
            .iter()
            .filter(|cl| cl.gen == gen && cl.start.is_some())
            .count();
        assert!(valid <= 1, "generation {gen}: {valid} valid claims");
    }
    // The old writer's cycles below the new start stay visible, later ones not.
    assert!(v.visible(1, &[0xee; 16], 9));
    assert!(!v.visible(1, &[0xee; 16], 10));
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn garage_objects_are_encrypted_at_rest() {
    let Some(g) = Garage::start(1) else { return };
    let client: Arc<dyn ObjectClient> = Arc::new(s3(&g, 0, &g.bucket));
    let url = StoreUrl::parse(&format!("s3://{}/site1", g.bucket))
        .unwrap()
        .unwrap();
    let key = || EncryptionKey::from_bytes(&[0x11; 32]);
    let b = SealedBucket::open(client.clone(), url.clone(), key()).unwrap();
    // Blocks stamped with a known pattern between incompressible bytes.
    let stamp = b"VDREP-SOURCE-STAMP-0123456789abcdef";
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..20 {
        let mut block = Vec::new();
        for _ in 0..64 {
            block.extend_from_slice(stamp);
            for _ in 0..16 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                block.extend_from_slice(&rng.to_le_bytes());
            }
        }
        b.put(&format!("vm/chunks/{i}"), &block).unwrap();
        assert_eq!(b.get(&format!("vm/chunks/{i}")).unwrap(), block);
    }
    // Control: the same stamp written raw is found by the scan.
    let control = b"VDREP-CONTROL-STAMP-not-encrypted!";
    client
        .put("control", &control.repeat(100), PutMode::Overwrite)
        .unwrap();
    assert!(!files_containing(&g.data_dir(0), control).is_empty());
    let leaked = files_containing(&g.data_dir(0), stamp);
    assert!(leaked.is_empty(), "plaintext in {leaked:?}");

    // A wrong key is refused at open, naming the marker object.
    let e = SealedBucket::open(
        client.clone(),
        url.clone(),
        EncryptionKey::from_bytes(&[0x22; 32]),
    )
    .err()
    .unwrap();
    assert_eq!(
        e.kind(),
        BucketErrorKind::Envelope(EnvelopeErrorKind::WrongKey)
    );
    assert!(e.to_string().contains("site1/vdrep-store"), "{e}");
    // A flipped byte anywhere in a stored object is refused with its name.
    let name = "site1/vm/chunks/3";
    let good = get_all(&*client, name).unwrap();
    for i in [0, 5, 12, 20, 30, 40, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        client.put(name, &bad, PutMode::Overwrite).unwrap();
        let e = b.get("vm/chunks/3").unwrap_err();
        assert!(matches!(e.kind(), BucketErrorKind::Envelope(_)), "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    client.put(name, &good, PutMode::Overwrite).unwrap();
    assert!(b.get("vm/chunks/3").is_ok());
    // The right key reopens and reads.
    let again = SealedBucket::open(client, url, key()).unwrap();
    assert_eq!(again.list("vm/chunks/").unwrap().len(), 20);
}

/// A disk image of `chunks` chunks plus a tail, mostly zeros with
/// `seed`-dependent data in some chunks.
fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = seed | 1;
    for (i, c) in v.chunks_mut(CHUNK as usize).enumerate() {
        if (i as u64 + seed) % 3 == 0 {
            continue; // an all-zero chunk
        }
        for b in c.iter_mut().step_by(97) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

/// Write `disks` as point `cycle`, storing only the chunks that differ from
/// `prev` (the previous point's images and manifests).
fn write_point(
    w: &VmWriter<'_>,
    cycle: u64,
    disks: &[([u8; 16], Vec<u8>)],
    prev: Option<&[DiskManifest]>,
    prev_images: Option<&[([u8; 16], Vec<u8>)]>,
) -> Result<Vec<DiskManifest>, vdrep::objstore::point::PointError> {
    let mut out = Vec::new();
    for (d, (id, img)) in disks.iter().enumerate() {
        let mut chunks = Vec::new();
        for (i, c) in img.chunks(CHUNK as usize).enumerate() {
            let same = prev_images.is_some_and(|p| p[d].1.chunks(CHUNK as usize).nth(i) == Some(c));
            if same {
                chunks.push(prev.unwrap()[d].chunks[i].clone());
            } else {
                chunks.push(w.put_chunk(id, i as u64, cycle, c)?);
            }
        }
        out.push(DiskManifest {
            disk_id: vdrep::util::hex(id),
            size: img.len() as u64,
            chunks,
            base_size: None,
            logs: Vec::new(),
        });
    }
    w.commit(
        cycle,
        cycle,
        vdrep::replica::Consistency::Crash,
        out.clone(),
    )?;
    Ok(out)
}

fn read_whole(p: &dyn PointRead) -> Vec<u8> {
    let mut v = vec![0u8; p.len() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        p.read_at(c, (i << 20) as u64).unwrap();
    }
    v
}

#[test]
fn garage_points_two_disks_crash_and_lazy_reads() {
    let Some(g) = Garage::start(1) else { return };
    let url = StoreUrl::parse(&format!("s3://{}/dr", g.bucket))
        .unwrap()
        .unwrap();
    let key = || EncryptionKey::from_bytes(&[0x33; 32]);
    let size = 3 * CHUNK as usize + 12345;
    let ids = [[1u8; 16], [2u8; 16]];
    let v1: Vec<([u8; 16], Vec<u8>)> = ids
        .iter()
        .map(|&id| (id, image(size, id[0] as u64)))
        .collect();
    let mut v2 = v1.clone();
    v2[0].1[CHUNK as usize + 5] ^= 0xff; // one chunk of disk 0 changes
    v2[1].1[size - 1] = 0x77; // the tail of disk 1 changes
    let b = SealedBucket::open(Arc::new(s3(&g, 0, &g.bucket)), url.clone(), key()).unwrap();
    let w = VmWriter::open(&b, "siteA", "vm1", [0xa1; 16]).unwrap();
    let m1 = write_point(&w, 1, &v1, None, None).unwrap();
    write_point(&w, 2, &v2, Some(&m1), Some(&v1)).unwrap();
    // Only the changed chunks were stored for point 2.
    let chunk_objects = b.list("sites/siteA/vms/vm1/chunks/").unwrap();
    let v1_chunks = m1.iter().flat_map(|d| &d.chunks).flatten().count();
    assert_eq!(chunk_objects.len(), v1_chunks + 2);

    // A writer that crashes at a random put of point 3 leaves no point 3.
    let v3: Vec<([u8; 16], Vec<u8>)> = ids
        .iter()
        .map(|&id| (id, image(size, id[0] as u64 + 7)))
        .collect();
    for crash_at in [1, 3, 5] {
        let fail = Arc::new(FailClient::new(s3(&g, 0, &g.bucket)));
        let bf = SealedBucket::open(fail.clone(), url.clone(), key()).unwrap();
        let wf = VmWriter::open(&bf, "siteA", "vm1", [0xb0 + crash_at as u8; 16]).unwrap();
        fail.crash_at(ObjOp::Put, fail.calls(ObjOp::Put) + crash_at, crash_at == 3);
        assert!(write_point(&wf, 3, &v3, None, None).is_err());
        let seen: Vec<u64> = points(&b, "siteA", "vm1")
            .unwrap()
            .iter()
            .map(|m| m.cycle)
            .collect();
        assert_eq!(seen, [1, 2], "crash at put {crash_at}");
    }
    // A second site with no local state reads both points exactly, lazily.
    let b2 =
        Arc::new(SealedBucket::open(Arc::new(s3(&g, 0, &g.bucket)), url.clone(), key()).unwrap());
    for (cycle, imgs) in [(1, &v1), (2, &v2)] {
        for (id, img) in imgs.iter() {
            let p = ChunkedPoint::open(b2.clone(), "siteA", "vm1", cycle, id).unwrap();
            assert_eq!(p.len(), img.len() as u64);
            let mut small = [0u8; 4096];
            p.read_at(&mut small, CHUNK + 4096).unwrap();
            assert_eq!(
                &small[..],
                &img[CHUNK as usize + 4096..CHUNK as usize + 8192]
            );
            assert!(
                p.fetched_bytes() <= CHUNK,
                "one chunk fetched for a small read"
            );
            assert_eq!(read_whole(&p), *img, "cycle {cycle}");
        }
    }
    let e = ChunkedPoint::open(b2.clone(), "siteA", "vm1", 3, &ids[0])
        .err()
        .unwrap();
    assert_eq!(e.kind(), PointErrorKind::NoSuchPoint);

    // `vdrep points --store s3://…` from a folder with no local state.
    let site2 = tempfile::tempdir().unwrap();
    let creds = g.credentials_file(site2.path());
    let keyfile = site2.path().join("key");
    std::fs::write(&keyfile, format!("{}\n", "33".repeat(32))).unwrap();
    let points_cli = |store: &str, key: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vdrep"))
            .current_dir(site2.path())
            .args(["points", "vm1", "--json", "--store", store, "--s3-endpoint"])
            .arg(g.endpoint())
            .arg("--s3-credentials")
            .arg(&creds)
            .arg("--encryption-key")
            .arg(key)
            .output()
            .unwrap()
    };
    let out = points_cli(&format!("s3://{}/dr", g.bucket), &keyfile);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["site"], "siteA");
    let cycles: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cycle"].as_u64().unwrap())
        .collect();
    assert_eq!(cycles, [2, 1]);
    // The same with the credentials from AWS_* environment variables.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vdrep"))
        .args(["points", "vm1", "--store", &format!("s3://{}/dr", g.bucket)])
        .arg("--s3-endpoint")
        .arg(g.endpoint())
        .arg("--encryption-key")
        .arg(&keyfile)
        .env("AWS_ACCESS_KEY_ID", &g.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret)
        .env("AWS_REGION", garageutil::REGION)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 3, "{table}");
    // A wrong key and a missing bucket: clear errors, exit 1, nothing written.
    let before = s3(&g, 0, &g.bucket).list("").unwrap().len();
    let wrong = site2.path().join("wrong");
    std::fs::write(&wrong, format!("{}\n", "44".repeat(32))).unwrap();
    let out = points_cli(&format!("s3://{}/dr", g.bucket), &wrong);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another key") && err.contains("critical"),
        "{err}"
    );
    let out = points_cli("s3://no-such-bucket/dr", &keyfile);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-bucket"), "{err}");
    assert_eq!(s3(&g, 0, &g.bucket).list("").unwrap().len(), before);
}

#[test]
fn garage_three_nodes_points_go_on_through_a_node_loss() {
    let Some(mut g) = Garage::start(3) else {
        return;
    };
    let url = StoreUrl::parse(&format!("s3://{}/dr", g.bucket))
        .unwrap()
        .unwrap();
    let b = SealedBucket::open(
        Arc::new(s3(&g, 0, &g.bucket)),
        url.clone(),
        EncryptionKey::from_bytes(&[0x55; 32]),
    )
    .unwrap();
    let w = VmWriter::open(&b, "siteA", "vm1", [0xc1; 16]).unwrap();
    let ids = [[1u8; 16], [2u8; 16]];
    let size = CHUNK as usize + 5000;
    let mut cur: Vec<([u8; 16], Vec<u8>)> = ids
        .iter()
        .map(|&id| (id, image(size, id[0] as u64)))
        .collect();
    let mut history = Vec::new();
    let mut prev: Option<Vec<DiskManifest>> = None;
    let mut prev_img: Option<Vec<([u8; 16], Vec<u8>)>> = None;
    for cycle in 1..=8u64 {
        if cycle == 4 {
            g.kill_node(2); // mid-run: quorum 2 of 3 stays
        }
        if cycle == 7 {
            g.restart_node(2);
        }
        let d = (cycle % 2) as usize;
        let at = (cycle as usize * 7919) % size;
        cur[d].1[at] = cur[d].1[at].wrapping_add(1);
        let m = write_point(&w, cycle, &cur, prev.as_deref(), prev_img.as_deref()).unwrap();
        history.push(cur.clone());
        prev = Some(m);
        prev_img = Some(cur.clone());
    }
    // Every point, read through another node, is exact.
    let b1 = Arc::new(
        SealedBucket::open(
            Arc::new(s3(&g, 1, &g.bucket)),
            url,
            EncryptionKey::from_bytes(&[0x55; 32]),
        )
        .unwrap(),
    );
    let seen: Vec<u64> = points(&b1, "siteA", "vm1")
        .unwrap()
        .iter()
        .map(|m| m.cycle)
        .collect();
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    for (i, imgs) in history.iter().enumerate() {
        for (id, img) in imgs {
            let p = ChunkedPoint::open(b1.clone(), "siteA", "vm1", i as u64 + 1, id).unwrap();
            assert_eq!(read_whole(&p), *img, "cycle {}", i + 1);
        }
    }
}
