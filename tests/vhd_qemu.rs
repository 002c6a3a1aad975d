//! Fixed VHD replicas written by `vdrep::replica::FixedVhd` (footer from
//! `vdrep::vhd::footer`) checked with the real `qemu-img` / `qemu-io`, and
//! fixed VHDs made by QEMU read back. Every test prints `SKIP:` and passes
//! when `qemu-img` is not installed.

mod skip;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vdrep::replica::{FixedVhd, ReplicaTarget};
use vdrep::vhd::footer::{Footer, Geometry, MAX_VIRTUAL_SIZE};

const MIB: u64 = 1 << 20;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        skip::skip("SKIP: qemu-img / qemu-io not installed");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img info -f vpc --output=json`: (format, virtual size).
fn qemu_info(path: &Path) -> (String, u64) {
    let (ok, out) = run("qemu-img", &["info", "-f", "vpc", "--output=json", p(path)]);
    assert!(ok, "qemu-img info failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["format"].as_str().unwrap().to_string(),
        v["virtual-size"].as_u64().unwrap(),
    )
}

/// `qemu-img check`: clean, or not implemented for vpc (QEMU 10.0 says
/// "This image format does not support checks").
fn qemu_check(path: &Path) {
    let (ok, out) = run("qemu-img", &["check", "-f", "vpc", p(path)]);
    assert!(
        ok || out.contains("does not support checks"),
        "qemu-img check: {out}"
    );
    assert!(!out.contains("corrupt") && !out.contains("leak"), "{out}");
}

fn qemu_compare(vhd: &Path, raw: &Path) {
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", p(vhd), p(raw)],
    );
    assert!(
        ok && out.contains("Images are identical"),
        "qemu-img compare {vhd:?} {raw:?}: {out}"
    );
}

/// Our own full read of the VHD equals the raw file.
fn self_compare(v: &FixedVhd, raw: &Path) {
    let f = std::fs::File::open(raw).unwrap();
    let size = v.len();
    let chunk = 4 * MIB;
    let mut a = vec![0u8; chunk as usize];
    let mut b = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        v.read_at(&mut a[..n], off).unwrap();
        f.read_exact_at(&mut b[..n], off).unwrap();
        assert!(
            a[..n] == b[..n],
            "content differs in {off}..{}",
            off + n as u64
        );
        off += n as u64;
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The trailing footer of the VHD at `path`.
fn footer_of(path: &Path) -> Footer {
    let bytes = std::fs::read(path).unwrap();
    Footer::parse(&bytes[bytes.len() - 512..]).unwrap()
}

/// Open an existing fixed VHD as a replica of `size` bytes.
fn open(path: &Path, size: u64) -> FixedVhd {
    FixedVhd::open(path, size, [3; 16], 1000, false).unwrap()
}

/// Create a fixed VHD replica and a raw twin of `size`, apply the same
/// writes to both.
fn build(dir: &Path, size: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let vp = dir.join(format!("fixed-{size}.vhd"));
    let rp = dir.join(format!("fixed-{size}.raw"));
    let raw = std::fs::File::create(&rp).unwrap();
    raw.set_len(size).unwrap();
    let mut v = FixedVhd::open(&vp, size, [3; 16], 1000, true).unwrap();
    let mut writes: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(4096, 1)),
        (1000, pattern(777, 2)),           // unaligned, inside a sector run
        (2 * MIB - 7, pattern(20_000, 3)), // spans a 2 MiB boundary
        (size / 2 - 300, pattern(64 * 1024, 4)), // middle
        (size - 4096, pattern(4096, 5)),   // last sector(s)
        (size - 1, vec![0xee]),            // very last byte
    ];
    if size > 8 * MIB {
        writes.push((5 * MIB, pattern(3 * MIB as usize, 6)));
    }
    for (off, data) in &writes {
        if off + data.len() as u64 > size {
            continue;
        }
        v.write_at(data, *off).unwrap();
        raw.write_all_at(data, *off).unwrap();
    }
    if size > 8 * MIB {
        v.write_zeroes(5 * MIB + 100, 4096).unwrap();
        raw.write_all_at(&[0u8; 4096], 5 * MIB + 100).unwrap();
    }
    v.flush().unwrap();
    drop(v);
    (vp, rp)
}

#[test]
fn our_vhds_are_what_qemu_sees() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes = [MIB, 7 * MIB, 10 * MIB + 512, 33 * MIB + 3 * 512];
    for size in sizes {
        let (vp, rp) = build(dir.path(), size);
        let (format, vsize) = qemu_info(&vp);
        assert_eq!(format, "vpc");
        assert_eq!(vsize, size, "{size}: qemu sees {vsize}");
        qemu_check(&vp);
        qemu_compare(&vp, &rp);
        self_compare(&open(&vp, size), &rp);
        let f = footer_of(&vp);
        assert_eq!((f.current_size, f.qemu_visible_size()), (size, size));
    }
    println!("checked {} images against qemu-img", sizes.len());
}

#[test]
fn one_gib_sparse() {
    use std::os::unix::fs::MetadataExt;
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 30;
    let (vp, rp) = build(dir.path(), size);
    assert_eq!(qemu_info(&vp), ("vpc".to_string(), size));
    qemu_compare(&vp, &rp);
    let on_disk = std::fs::metadata(&vp).unwrap().blocks() * 512;
    assert!(
        on_disk < 32 * MIB,
        "the replica stays sparse: {on_disk} bytes"
    );
    self_compare(&open(&vp, size), &rp);
}

/// Fixed VHDs created and written by QEMU read back correctly.
#[test]
fn qemu_made_vhds_read_back() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 10 MiB + 512 with force_size: QEMU writes `qem2` and the exact size.
    for (size, force) in [("10M", false), ("10486272", true)] {
        let vp = dir.path().join(format!("q-{size}-{force}.vhd"));
        let rp = dir.path().join(format!("q-{size}-{force}.raw"));
        let opts = format!(
            "subformat=fixed{}",
            if force { ",force_size=on" } else { "" }
        );
        let (ok, out) = run(
            "qemu-img",
            &["create", "-q", "-f", "vpc", "-o", &opts, p(&vp), size],
        );
        assert!(ok, "{out}");
        let (ok, out) = run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                "write -P 0x5a 1M 64k",
                "-c",
                "write -P 0xa5 4092k 8k",
                p(&vp),
            ],
        );
        assert!(ok, "{out}");
        let (ok, out) = run(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", p(&vp), p(&rp)],
        );
        assert!(ok, "{out}");
        let (_, qsize) = qemu_info(&vp);
        let f = footer_of(&vp);
        assert_eq!(f.qemu_visible_size(), qsize, "{size}");
        assert_eq!(f.disk_type, vdrep::vhd::footer::DISK_TYPE_FIXED);
        let v = open(&vp, f.current_size);
        let mut b = vec![0u8; 64 * 1024 + 2];
        v.read_at(&mut b, MIB - 1).unwrap();
        assert_eq!(b[0], 0);
        assert!(b[1..=64 * 1024].iter().all(|&x| x == 0x5a));
        assert_eq!(b[64 * 1024 + 1], 0);
        if f.current_size == qsize {
            self_compare(&v, &rp);
        }
    }
}

/// Mixed writers: QEMU writes into a VHD vdrep made, vdrep writes into it
/// again, QEMU and vdrep agree with a raw twin throughout.
#[test]
fn qemu_and_vdrep_write_the_same_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 20 * MIB + 512;
    let (vp, rp) = build(dir.path(), size);
    for (img, fmt) in [(&vp, "vpc"), (&rp, "raw")] {
        let (ok, out) = run(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 0x5a 1M 64k",
                "-c",
                "write -P 0x77 12M 2M",
                "-c",
                "write -z 5M 512k",
                p(img),
            ],
        );
        assert!(ok, "{out}");
    }
    qemu_compare(&vp, &rp);
    let mut v = open(&vp, size);
    self_compare(&v, &rp);
    let raw = std::fs::OpenOptions::new().write(true).open(&rp).unwrap();
    for (off, seed) in [(12 * MIB + 5, 9u8), (18 * MIB, 10), (3 * MIB + 512, 11)] {
        let data = pattern(300_000, seed);
        v.write_at(&data, off).unwrap();
        raw.write_all_at(&data, off).unwrap();
    }
    v.flush().unwrap();
    drop(v);
    qemu_compare(&vp, &rp);
    assert_eq!(qemu_info(&vp).1, size);
}

/// Resizing keeps QEMU's view right.
#[test]
fn resize_is_what_qemu_sees() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (vp, rp) = build(dir.path(), 10 * MIB + 512);
    let raw = std::fs::OpenOptions::new().write(true).open(&rp).unwrap();
    let mut v = open(&vp, 10 * MIB + 512);
    for new in [30 * MIB + 1024, 3 * MIB + 512, 9 * MIB] {
        v.set_len(new).unwrap();
        raw.set_len(new).unwrap();
        let data = pattern(10_000, new as u8);
        v.write_at(&data, new - 10_000 - 512).unwrap();
        raw.write_all_at(&data, new - 10_000 - 512).unwrap();
        v.flush().unwrap();
        assert_eq!(qemu_info(&vp).1, new);
        qemu_compare(&vp, &rp);
    }
}

/// The creator application decides whether QEMU sizes an image by its
/// geometry: `Footer::qemu_visible_size` predicts it, and vdrep's `qem2`
/// gets the exact size.
#[test]
fn creator_app_decides_qemu_size() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * MIB + 512; // CHS 301/4/17 = 10,479,616 bytes
    let vp = dir.path().join("c.vhd");
    drop(FixedVhd::open(&vp, size, [3; 16], 1000, true).unwrap());
    assert_eq!(qemu_info(&vp).1, size);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vp)
        .unwrap();
    let mut raw = [0u8; 512];
    f.read_exact_at(&mut raw, size).unwrap();
    assert_eq!(&raw[28..32], b"qem2");
    let mut differ = 0;
    for app in [*b"vpc ", *b"qemu", *b"win ", *b"qem2", *b"vdrp", *b"d2v "] {
        let mut footer = Footer::parse(&raw).unwrap();
        footer.creator_app = app;
        f.write_all_at(&footer.encode(), size).unwrap();
        let qemu = qemu_info(&vp).1;
        let parsed = footer_of(&vp);
        assert_eq!(parsed.current_size, size);
        assert_eq!(
            parsed.qemu_visible_size(),
            qemu,
            "creator {:?}",
            String::from_utf8_lossy(&app)
        );
        if qemu != size {
            differ += 1;
        }
    }
    assert_eq!(differ, 2, "vpc and qemu creators are sized by CHS");
}

/// Our geometry algorithm agrees with QEMU's implementation of the spec's
/// algorithm: for images `qemu-img create` sizes by CHS (size rounded up
/// to a CHS product), the geometry of that size is the one QEMU stored.
#[test]
fn geometry_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        "1M", "10M", "100M", "1000M", "1G", "40G", "126G", "130G", "2000G",
    ];
    for size in sizes {
        let vp = dir.path().join(format!("g-{size}.vhd"));
        let (ok, out) = run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=dynamic",
                p(&vp),
                size,
            ],
        );
        assert!(ok, "{out}");
        let f = footer_of(&vp);
        assert_eq!(&f.creator_app, b"qemu");
        assert_eq!(Geometry::for_size(f.current_size), f.geometry, "{size}");
        assert_eq!(f.current_size, qemu_info(&vp).1, "{size}");
    }
}

/// The largest size (2040 GiB) works and QEMU accepts it.
#[test]
fn max_size_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vp = dir.path().join("max.vhd");
    let mut v = FixedVhd::open(&vp, MAX_VIRTUAL_SIZE, [3; 16], 1000, true).unwrap();
    v.write_at(&[0x21; 4096], MAX_VIRTUAL_SIZE - 4096).unwrap();
    v.flush().unwrap();
    drop(v);
    assert_eq!(qemu_info(&vp).1, MAX_VIRTUAL_SIZE);
    let off = (MAX_VIRTUAL_SIZE - 4096).to_string();
    let (ok, out) = run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            &format!("read -P 0x21 {off} 4096"),
            p(&vp),
        ],
    );
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
}
