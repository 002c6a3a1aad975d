//! `.hrl` change logs through the library API: write, verify, read, apply,
//! and refusal of every damaged or mismatched input.

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use vdrep::hrl::format::{self, Encoding, RecordHeader, Trailer};
use vdrep::hrl::{
    apply, dump_bytes, read_state, state_path, verify, verify_bytes, ApplyOptions, HrlError,
    HrlHeader, HrlReader, HrlWriter,
};

/// Small deterministic PRNG (xorshift64*).
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
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn header(base_cycle: u64, base_size: u64, disk_size: u64) -> HrlHeader {
    HrlHeader {
        disk_id: *b"0123456789abcdef",
        disk_name: "vms/web01/disk0.raw".into(),
        cycle: base_cycle + 1,
        base_cycle,
        block_size: 512,
        base_size,
        disk_size,
        cut_unix_ns: 1_763_790_000_000_000_000 + base_cycle,
        app_consistent: false,
    }
}

/// Content of one run: random, zeros, or compressible.
fn run_data(rng: &mut Rng, len: usize) -> Vec<u8> {
    match rng.below(3) {
        0 => rng.bytes(len),
        1 => vec![0; len],
        _ => {
            let b = rng.next() as u8;
            (0..len).map(|i| b.wrapping_add((i / 64) as u8)).collect()
        }
    }
}

/// Random ascending, non-overlapping, block-aligned runs within `disk_size`
/// (the last may end at a short tail).
fn random_runs(rng: &mut Rng, disk_size: u64, block: u64, max_run: u64) -> Vec<(u64, Vec<u8>)> {
    let mut runs = Vec::new();
    let mut off = 0u64;
    loop {
        off += rng.below(8) * block;
        if off >= disk_size {
            break;
        }
        let len = ((1 + rng.below(max_run / block)) * block).min(disk_size - off);
        let data = run_data(rng, len as usize);
        runs.push((off, data));
        off += len;
    }
    runs
}

fn write_log(path: &Path, h: &HrlHeader, runs: &[(u64, Vec<u8>)]) -> vdrep::hrl::HrlSummary {
    let mut w = HrlWriter::create(path, h).unwrap();
    for (off, data) in runs {
        w.append(*off, data).unwrap();
    }
    w.finish().unwrap()
}

/// What the image must look like after applying `runs` onto `base`.
fn reference(base: &[u8], disk_size: u64, runs: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut img = base.to_vec();
    img.resize(disk_size as usize, 0);
    for (off, data) in runs {
        img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    img
}

fn snapshot(image: &Path) -> (Vec<u8>, Option<Vec<u8>>) {
    (
        std::fs::read(image).unwrap(),
        std::fs::read(state_path(image)).ok(),
    )
}

#[test]
fn round_trip_random_records() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let base_size = (1 + rng.below(6)) << 20;
        let disk_size = base_size + rng.below(3 << 20) - (1 << 20).min(base_size / 2) + 300;
        let base = rng.bytes(base_size as usize);
        let runs = random_runs(&mut rng, disk_size, 4096, 3 << 20);
        let h = HrlHeader {
            block_size: 4096,
            ..header(7, base_size, disk_size)
        };
        let log = dir.path().join("disk0.hrl");
        let s = write_log(&log, &h, &runs);
        let want_bytes: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
        assert_eq!(s.data_bytes, want_bytes);
        assert_eq!(s.file_bytes, std::fs::metadata(&log).unwrap().len());
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let (vh, vs) = verify(&log).unwrap();
        assert_eq!(vh, h);
        assert_eq!(vs.records, s.records);
        assert_eq!(vs.data_bytes, s.data_bytes);
        assert_eq!(vs.log_checksum, s.log_checksum);
        assert_eq!(vs.zero_records, s.zero_records);
        assert_eq!(vs.lz4_records, s.lz4_records);

        // Records stream back as written (split at 1 MiB).
        let mut r = HrlReader::open(&log).unwrap();
        let mut got = reference(&[], disk_size, &[]);
        let mut n = 0;
        while let Some(rec) = r.next_record().unwrap() {
            assert!(rec.length <= vdrep::hrl::MAX_RECORD_LEN);
            let at = rec.offset as usize..rec.offset as usize + rec.length as usize;
            match rec.data {
                Some(d) => got[at].copy_from_slice(d),
                None => assert_eq!(rec.encoding, Encoding::Zero),
            }
            n += 1;
        }
        assert_eq!(n, s.records);
        assert!(r.summary().is_some());
        assert_eq!(got, reference(&[], disk_size, &runs));

        // Apply onto the base (no state file yet): assumed base, warning.
        let image = dir.path().join("replica.img");
        std::fs::write(&image, &base).unwrap();
        let rep = apply(&log, &image, &ApplyOptions::default()).unwrap();
        assert!(rep.previous_cycle.is_none());
        assert!(rep.warnings.iter().any(|w| w.contains("assuming")));
        assert_eq!(
            std::fs::read(&image).unwrap(),
            reference(&base, disk_size, &runs)
        );
        let st = read_state(&image).unwrap().unwrap();
        assert_eq!((st.cycle, st.size, st.applying), (8, disk_size, None));
        assert_eq!(st.disk_id, "30313233343536373839616263646566");
    }
}

#[test]
fn writer_encodings_and_splitting() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.hrl");
    let mut rng = Rng(42);
    let random = rng.bytes(3 << 20); // incompressible: raw
    let zeros = vec![0u8; (2 << 20) + 4096]; // zero records, no payload
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i / 256) as u8).collect(); // lz4
    let h = header(0, 0, 16 << 20);
    let runs = vec![(0, random), (4 << 20, zeros), (8 << 20, pattern)];
    let s = write_log(&log, &h, &runs);
    assert_eq!(s.records, 3 + 3 + 1);
    assert_eq!(s.zero_records, 3);
    assert_eq!(s.lz4_records, 1);
    assert!(s.stored_bytes < (3 << 20) + (1 << 20) * 7 / 8);
    let mut r = HrlReader::open(&log).unwrap();
    let mut encs = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        encs.push((rec.offset, rec.length, rec.encoding, rec.stored.len()));
    }
    assert_eq!(encs[0], (0, 1 << 20, Encoding::Raw, 1 << 20));
    assert_eq!(encs[2], (2 << 20, 1 << 20, Encoding::Raw, 1 << 20));
    assert_eq!(encs[3], (4 << 20, 1 << 20, Encoding::Zero, 0));
    assert_eq!(encs[5], ((6 << 20), 4096, Encoding::Zero, 0));
    assert_eq!(encs[6].2, Encoding::Lz4);
    assert!(encs[6].3 <= (1 << 20) * 7 / 8);
}

/// After 8 records in a row that lz4 did not shrink, the writer tries lz4
/// on every 16th record only (random data costs it CPU for nothing), and
/// as soon as one compresses, on every record again: compressible data
/// after a random stretch is compressed again within 16 records. The log
/// reads back the same either way.
#[test]
fn writer_stops_trying_lz4_on_random_data_and_resumes_when_it_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("c.hrl");
    let mut rng = Rng(7);
    // 65 random 4 KiB records, then 40 compressible ones (gaps between
    // runs keep each its own record).
    let mut runs = Vec::new();
    for i in 0..65u64 {
        runs.push((i * 8192, rng.bytes(4096)));
    }
    let pattern: Vec<u8> = (0..4096).map(|i| (i / 64) as u8).collect();
    for i in 65..105u64 {
        runs.push((i * 8192, pattern.clone()));
    }
    let h = header(0, 1 << 20, 1 << 20);
    let s = write_log(&log, &h, &runs);
    assert_eq!(s.records, 105);
    let mut r = HrlReader::open(&log).unwrap();
    let mut encs = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        encs.push(rec.encoding);
    }
    assert!(encs[..65].iter().all(|e| *e == Encoding::Raw));
    // Compressible from record 65 on: lz4 is not tried on it (not a probe),
    // the next probe is record 80, from which every one is compressed.
    let first = encs[65..]
        .iter()
        .position(|e| *e == Encoding::Lz4)
        .expect("compressible records are compressed again");
    assert_eq!(65 + first, 80, "lz4 tried again at record {}", 65 + first);
    assert!(encs[80..].iter().all(|e| *e == Encoding::Lz4));
    assert_eq!(s.lz4_records, 25);
    let base = vec![0u8; 1 << 20];
    let image = dir.path().join("img");
    std::fs::write(&image, &base).unwrap();
    apply(&log, &image, &ApplyOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(&image).unwrap(),
        reference(&base, 1 << 20, &runs)
    );
}

#[test]
fn writer_refuses_bad_appends_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("b.hrl");
    let h = header(0, 0, 8192);
    // Out of order.
    let mut w = HrlWriter::create(&log, &h).unwrap();
    w.append(4096, &[1; 512]).unwrap();
    assert!(matches!(
        w.append(0, &[1; 512]),
        Err(HrlError::InvalidInput { .. })
    ));
    assert!(w.finish().is_err());
    // Past the disk size.
    let mut w = HrlWriter::create(&log, &h).unwrap();
    assert!(w.append(8000, &[1; 512]).is_err());
    assert!(w.append(u64::MAX - 10, &[1; 512]).is_err());
    drop(w);
    // Dropped without finish: nothing left, nothing published.
    let mut w = HrlWriter::create(&log, &h).unwrap();
    w.append(0, &[9; 1024]).unwrap();
    assert!(dir.path().join(".b.hrl.tmp").exists());
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Invalid header.
    let bad = HrlHeader {
        cycle: 0,
        ..header(0, 0, 8192)
    };
    assert!(matches!(
        HrlWriter::create(&log, &bad),
        Err(HrlError::InvalidInput { .. })
    ));
    // An empty log is valid.
    let s = HrlWriter::create(&log, &h).unwrap().finish().unwrap();
    assert_eq!(s.records, 0);
    assert_eq!(verify(&log).unwrap().1.records, 0);
}

/// A small log with raw, zero, lz4 and a short final record, and the image
/// state it applies to (cycle 1 -> 2, with a state file from 0 -> 1).
struct Small {
    _dir: tempfile::TempDir,
    log: PathBuf,
    bytes: Vec<u8>,
    image: PathBuf,
    bad: PathBuf,
}

fn small() -> Small {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let base = rng.bytes(6000);
    let image = dir.path().join("img");
    std::fs::write(&image, &base).unwrap();
    // 0 -> 1 establishes the state file.
    let log1 = dir.path().join("c1.hrl");
    write_log(&log1, &header(0, 6000, 7000), &[(512, rng.bytes(700))]);
    apply(&log1, &image, &ApplyOptions::default()).unwrap();
    let pattern: Vec<u8> = (0..1536).map(|i| (i / 100) as u8).collect();
    let runs = vec![
        (0, rng.bytes(100)),
        (512, vec![0; 1024]),
        (2048, pattern),
        (6656, rng.bytes(7000 - 6656)),
    ];
    let log = dir.path().join("c2.hrl");
    let s = write_log(&log, &header(1, 7000, 7000), &runs);
    assert_eq!((s.records, s.zero_records, s.lz4_records), (4, 1, 1));
    let bytes = std::fs::read(&log).unwrap();
    let bad = dir.path().join("bad.hrl");
    Small {
        _dir: dir,
        log,
        bytes,
        image,
        bad,
    }
}

#[test]
fn every_single_byte_corruption_is_refused() {
    let s = small();
    verify_bytes(&s.bytes).unwrap();
    let before = snapshot(&s.image);
    assert!(before.1.is_some());
    for pos in 0..s.bytes.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = s.bytes.clone();
            b[pos] ^= x;
            match verify_bytes(&b) {
                Err(HrlError::Corrupt { offset, .. }) => {
                    assert!(offset <= b.len() as u64, "pos {pos}: offset {offset}")
                }
                other => panic!("byte {pos} ^ {x:#x} not detected: {other:?}"),
            }
            std::fs::write(&s.bad, &b).unwrap();
            match apply(&s.bad, &s.image, &ApplyOptions::default()) {
                Err(HrlError::Corrupt { path, .. }) => assert_eq!(path, s.bad),
                other => panic!("apply of byte {pos} ^ {x:#x}: {other:?}"),
            }
            assert!(snapshot(&s.image) == before, "image changed (byte {pos})");
        }
    }
    // The intact log still applies.
    apply(&s.log, &s.image, &ApplyOptions::default()).unwrap();
}

#[test]
fn corruption_without_state_file_leaves_no_state_file() {
    let s = small();
    std::fs::remove_file(state_path(&s.image)).unwrap();
    let before = snapshot(&s.image);
    assert!(before.1.is_none());
    for pos in (0..s.bytes.len()).step_by(7) {
        let mut b = s.bytes.clone();
        b[pos] = b[pos].wrapping_add(1);
        std::fs::write(&s.bad, &b).unwrap();
        assert!(apply(&s.bad, &s.image, &ApplyOptions::default()).is_err());
        assert!(snapshot(&s.image) == before, "image changed (byte {pos})");
    }
}

#[test]
fn every_truncation_is_refused() {
    let s = small();
    let before = snapshot(&s.image);
    for n in 0..s.bytes.len() {
        let b = &s.bytes[..n];
        match verify_bytes(b) {
            Err(HrlError::Corrupt { offset, what, .. }) => {
                assert!(
                    what.contains(&format!("truncated at offset {n}")),
                    "len {n}: {what}"
                );
                assert_eq!(offset, n as u64);
            }
            other => panic!("truncation to {n} not detected: {other:?}"),
        }
        std::fs::write(&s.bad, b).unwrap();
        let e = verify(&s.bad).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(matches!(
            apply(&s.bad, &s.image, &ApplyOptions::default()),
            Err(HrlError::Corrupt { .. })
        ));
        assert!(snapshot(&s.image) == before);
    }
    // Bytes after the seal are refused too.
    let mut b = s.bytes.clone();
    b.push(0);
    assert!(matches!(verify_bytes(&b), Err(HrlError::Corrupt { .. })));
}

#[test]
fn chain_applies_in_order_and_refuses_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let mut size = 64 * 1024u64;
    let base = rng.bytes(size as usize);
    let mut truth = base.clone();
    let mut logs = Vec::new();
    for c in 0..6u64 {
        let next = match c % 3 {
            0 => size + 3 * 512 + 100, // grow to an unaligned size
            1 => size - 2048,          // shrink
            _ => size,
        };
        let runs = random_runs(&mut rng, next, 512, 8192);
        let log = dir.path().join(format!("disk0.{:04}.hrl", c + 1));
        write_log(&log, &header(c, size, next), &runs);
        truth = reference(&truth, next, &runs);
        size = next;
        logs.push(log);
    }
    let image = dir.path().join("replica.img");
    std::fs::write(&image, &base).unwrap();

    // Out of order, before anything was applied: the size does not match.
    let snap = snapshot(&image);
    let e = apply(&logs[1], &image, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(e, HrlError::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("bytes"), "{e}");
    assert!(snapshot(&image) == snap);

    apply(&logs[0], &image, &ApplyOptions::default()).unwrap();
    // Already applied.
    let snap = snapshot(&image);
    let e = apply(&logs[0], &image, &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(e, HrlError::AlreadyApplied { cycle: 1, .. }),
        "{e}"
    );
    assert!(snapshot(&image) == snap);
    // Skipping one.
    let e = apply(&logs[2], &image, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(e, HrlError::Mismatch(_)));
    assert!(
        e.to_string().contains("base cycle 2") && e.to_string().contains("at cycle 1"),
        "{e}"
    );
    assert!(snapshot(&image) == snap);

    for (i, log) in logs.iter().enumerate().skip(1) {
        let opts = ApplyOptions {
            write_zeros: i % 2 == 0,
        };
        let rep = apply(log, &image, &opts).unwrap();
        assert_eq!(rep.previous_cycle, Some(i as u64));
        assert!(rep.warnings.is_empty());
    }
    assert_eq!(std::fs::read(&image).unwrap(), truth);
    // Going back is refused too.
    let snap = snapshot(&image);
    assert!(apply(&logs[3], &image, &ApplyOptions::default()).is_err());
    assert!(snapshot(&image) == snap);
}

#[test]
fn wrong_base_size_and_wrong_disk_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img");
    std::fs::write(&image, vec![5u8; 4096]).unwrap();
    let log = dir.path().join("x.hrl");
    write_log(&log, &header(3, 8192, 8192), &[(0, vec![1; 512])]);
    let e = apply(&log, &image, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(e, HrlError::Mismatch(_)));
    assert!(e.to_string().contains("4096") && e.to_string().contains("8192"));
    assert_eq!(std::fs::read(&image).unwrap(), vec![5u8; 4096]);
    assert!(!state_path(&image).exists());

    // A state file for another disk.
    let ok = dir.path().join("y.hrl");
    write_log(&ok, &header(3, 4096, 4096), &[(0, vec![1; 512])]);
    apply(&ok, &image, &ApplyOptions::default()).unwrap();
    let other = HrlHeader {
        disk_id: [0xee; 16],
        ..header(4, 4096, 4096)
    };
    let log2 = dir.path().join("z.hrl");
    write_log(&log2, &other, &[(512, vec![2; 512])]);
    let snap = snapshot(&image);
    let e = apply(&log2, &image, &ApplyOptions::default()).unwrap_err();
    assert!(matches!(e, HrlError::Mismatch(_)));
    assert!(e.to_string().contains("eeee"), "{e}");
    assert!(snapshot(&image) == snap);

    // The image was changed outside vdrep (size differs from the state).
    let next = dir.path().join("n.hrl");
    write_log(&next, &header(4, 4096, 4096), &[(0, vec![3; 512])]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(5000)
        .unwrap();
    let snap = snapshot(&image);
    assert!(matches!(
        apply(&next, &image, &ApplyOptions::default()),
        Err(HrlError::Mismatch(_))
    ));
    assert!(snapshot(&image) == snap);

    // An unreadable state file is refused, not overwritten.
    std::fs::write(state_path(&image), b"{not json").unwrap();
    let snap = snapshot(&image);
    assert!(matches!(
        apply(&next, &image, &ApplyOptions::default()),
        Err(HrlError::State { .. })
    ));
    assert!(snapshot(&image) == snap);
}

#[test]
fn interrupted_apply_is_completed_by_reapplying_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let base = rng.bytes(32768);
    let image = dir.path().join("img");
    std::fs::write(&image, &base).unwrap();
    let runs = random_runs(&mut rng, 40000, 512, 4096);
    let log = dir.path().join("l.hrl");
    write_log(&log, &header(0, 32768, 40000), &runs);
    // Simulate a crash half way: state says "applying", image half written.
    let mut half = reference(&base, 40000, &runs[..runs.len() / 2]);
    half.truncate(36000);
    std::fs::write(&image, &half).unwrap();
    let st = vdrep::hrl::ImageState {
        disk_id: "30313233343536373839616263646566".into(),
        disk_name: "vms/web01/disk0.raw".into(),
        cycle: 0,
        size: 32768,
        applying: Some(1),
    };
    std::fs::write(state_path(&image), serde_json::to_vec(&st).unwrap()).unwrap();
    // Another log is refused while the image is half way.
    let other = dir.path().join("o.hrl");
    write_log(&other, &header(1, 40000, 40000), &[]);
    assert!(matches!(
        apply(&other, &image, &ApplyOptions::default()),
        Err(HrlError::Mismatch(_))
    ));
    let rep = apply(&log, &image, &ApplyOptions::default()).unwrap();
    assert!(rep.resumed);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        reference(&base, 40000, &runs)
    );
    assert_eq!(read_state(&image).unwrap().unwrap().applying, None);
}

/// Build a log by hand with valid checksums, to test the rules the
/// checksums do not cover.
fn hand_log(
    h: &HrlHeader,
    recs: &[(Encoding, u64, u32, Vec<u8>)],
    fix: impl Fn(&mut Trailer),
) -> Vec<u8> {
    let mut b = format::encode_header(h).unwrap();
    let (mut n, mut bytes) = (0, 0);
    for (enc, off, len, payload) in recs {
        b.extend_from_slice(&RecordHeader::new(*enc, *off, *len, payload).encode());
        b.extend_from_slice(payload);
        n += 1;
        bytes += u64::from(*len);
    }
    let mut t = Trailer {
        record_count: n,
        data_bytes: bytes,
        log_hash: xxhash_rust::xxh3::xxh3_128(&b),
    };
    fix(&mut t);
    b.extend_from_slice(&t.encode());
    b
}

#[test]
fn semantic_rules_are_enforced_despite_valid_checksums() {
    let h = header(0, 0, 4096);
    let r = |off: u64, len: u32| (Encoding::Raw, off, len, vec![1u8; len as usize]);
    let good = hand_log(&h, &[r(0, 512), r(512, 512)], |_| {});
    verify_bytes(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("overlap", hand_log(&h, &[r(0, 1024), r(512, 512)], |_| {})),
        (
            "descending",
            hand_log(&h, &[r(1024, 512), r(0, 512)], |_| {}),
        ),
        ("past disk size", hand_log(&h, &[r(3800, 512)], |_| {})),
        (
            "offset overflow",
            hand_log(&h, &[r(u64::MAX - 100, 512)], |_| {}),
        ),
        (
            "record count",
            hand_log(&h, &[r(0, 512)], |t| t.record_count = 2),
        ),
        (
            "data bytes",
            hand_log(&h, &[r(0, 512)], |t| t.data_bytes = 1),
        ),
        ("log hash", hand_log(&h, &[r(0, 512)], |t| t.log_hash ^= 1)),
        (
            "lz4 garbage",
            hand_log(&h, &[(Encoding::Lz4, 0, 512, vec![0xf0; 20])], |_| {}),
        ),
        (
            "lz4 not smaller",
            hand_log(&h, &[(Encoding::Lz4, 0, 16, vec![0; 16])], |_| {}),
        ),
        (
            "zero with payload",
            hand_log(&h, &[(Encoding::Zero, 0, 512, vec![0; 4])], |_| {}),
        ),
    ];
    for (name, b) in cases {
        match verify_bytes(&b) {
            Err(HrlError::Corrupt { .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
        let mut out = Vec::new();
        assert!(dump_bytes(&b, false, &mut out).is_err(), "{name}");
    }
}

#[test]
fn dump_human_and_json() {
    let s = small();
    let mut out = Vec::new();
    let sum = dump_bytes(&s.bytes, false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("vms/web01/disk0.raw"));
    assert!(text.contains(" zero ") && text.contains(" lz4 ") && text.contains(" raw "));
    assert_eq!(text.lines().filter(|l| l.contains(" raw ")).count(), 2);
    assert!(text.contains("sealed: 4 records"));

    let mut out = Vec::new();
    dump_bytes(&s.bytes, true, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["header"]["cycle"], 2);
    assert_eq!(v["header"]["disk_id"], "30313233343536373839616263646566");
    assert_eq!(v["records"].as_array().unwrap().len(), 4);
    assert_eq!(v["records"][1]["encoding"], "zero");
    assert_eq!(v["records"][1]["stored_bytes"], 0);
    assert_eq!(v["summary"]["records"], 4);
    assert_eq!(v["summary"]["log_checksum"], sum.log_checksum.as_str());
    assert!(v["error"].is_null());

    // Damage the last record's payload: the first records are printed,
    // then the error.
    let mut b = s.bytes.clone();
    let at = b.len() - format::TRAILER_LEN - 5;
    b[at] ^= 1;
    let mut out = Vec::new();
    assert!(dump_bytes(&b, false, &mut out).is_err());
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains(" lz4 ") && text.contains("NOT VALID"),
        "{text}"
    );
    let mut out = Vec::new();
    assert!(dump_bytes(&b, true, &mut out).is_err());
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 3);
    assert!(v["summary"].is_null());
    assert!(v["error"].as_str().unwrap().contains("checksum"));
}

#[test]
fn cli_exit_codes() {
    use vdrep::cli::hrl::{run, HrlCmd};
    let s = small();
    assert_eq!(
        run(HrlCmd::Verify {
            file: s.log.clone()
        }),
        0
    );
    assert_eq!(
        run(HrlCmd::Dump {
            file: s.log.clone(),
            json: true
        }),
        0
    );
    let mut b = s.bytes.clone();
    b[100] ^= 4;
    std::fs::write(&s.bad, &b).unwrap();
    assert_eq!(
        run(HrlCmd::Verify {
            file: s.bad.clone()
        }),
        2
    );
    assert_eq!(
        run(HrlCmd::Dump {
            file: s.bad.clone(),
            json: false
        }),
        2
    );
    assert_eq!(
        run(HrlCmd::Apply {
            file: s.bad.clone(),
            image: s.image.clone()
        }),
        2
    );
    let missing = s.log.with_file_name("missing.hrl");
    assert_eq!(run(HrlCmd::Verify { file: missing }), 1);
    assert_eq!(
        run(HrlCmd::Apply {
            file: s.log.clone(),
            image: s.image.clone()
        }),
        0
    );
    // Already applied: a refusal.
    assert_eq!(
        run(HrlCmd::Apply {
            file: s.log.clone(),
            image: s.image.clone()
        }),
        2
    );
}

fn small_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| small().bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
        let mut b = bytes;
        if magic {
            // Get past the magic check most of the time.
            let n = b.len().min(8);
            b[..n].copy_from_slice(&format::MAGIC[..n]);
        }
        prop_assert!(verify_bytes(&b).is_err());
        let mut out = Vec::new();
        let _ = dump_bytes(&b, false, &mut out);
        let _ = dump_bytes(&b, true, &mut out);
        let _ = format::parse_header(&b);
        let _ = format::parse_frame(&b);
    }

    #[test]
    fn mutated_logs_never_panic_and_are_refused(
        muts in proptest::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 1..6)
    ) {
        let orig = small_bytes();
        let mut b = orig.to_vec();
        for (kind, at, v) in muts {
            let at = if b.is_empty() { 0 } else { at % b.len() };
            match kind {
                0 if !b.is_empty() => b[at] = v,
                1 => b.insert(at, v),
                2 if !b.is_empty() => { b.remove(at); }
                _ => b.truncate(at),
            }
        }
        let res = verify_bytes(&b);
        if b != orig {
            prop_assert!(res.is_err());
        }
        // The receiver's streaming check (unknown length, 5-byte pieces)
        // refuses exactly what the whole-file check refuses.
        let streamed = HrlReader::streaming(Pieces(&b[..]), Path::new("<stream>"))
            .and_then(HrlReader::finish);
        prop_assert_eq!(streamed.is_ok(), res.is_ok());
        let mut out = Vec::new();
        let _ = dump_bytes(&b, false, &mut out);
        let _ = dump_bytes(&b, true, &mut out);
    }
}

/// Yields a slice at most 5 bytes per read (a log arriving in pieces).
struct Pieces<'a>(&'a [u8]);
impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.0.len()).min(5);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A good log streamed in pieces passes with the same summary as the
/// whole-file check; every truncation of it and one byte more are refused.
#[test]
fn a_streamed_log_is_checked_like_the_whole_file() {
    let orig = small_bytes();
    let (_, whole) = verify_bytes(orig).unwrap();
    let r = HrlReader::streaming(Pieces(orig), Path::new("<stream>")).unwrap();
    let s = r.finish().unwrap();
    assert_eq!(
        (s.records, s.data_bytes, s.file_bytes, &s.log_checksum),
        (
            whole.records,
            whole.data_bytes,
            whole.file_bytes,
            &whole.log_checksum
        )
    );
    for cut in 0..orig.len() {
        let e = HrlReader::streaming(Pieces(&orig[..cut]), Path::new("<stream>"))
            .and_then(HrlReader::finish)
            .unwrap_err();
        assert!(matches!(e, HrlError::Corrupt { .. }), "cut at {cut}: {e}");
    }
    let mut longer = orig.to_vec();
    longer.push(0);
    let e = HrlReader::streaming(Pieces(&longer), Path::new("<stream>"))
        .and_then(HrlReader::finish)
        .unwrap_err();
    assert!(e.to_string().contains("after the seal"), "{e}");
}
