//! Hand-built VHD fixtures and hostile input: arbitrary bytes and mutated
//! images into `Vhd::open`, `probe` and `check_image_bytes` never panic,
//! and the file and in-memory validators agree.

use proptest::prelude::*;
use vdrep::vhd::dynamic::{DynHeader, UNALLOCATED};
use vdrep::vhd::footer::{checksum, Footer, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED};
use vdrep::vhd::{check_image_bytes, probe, Vhd, VhdError, VhdKind};

const BS: usize = 4096;
const TOTAL: usize = 512 + BS; // bitmap + data
const LEN: usize = 2048 + 3 * TOTAL + 512;

/// A 32 KiB dynamic disk with 4 KiB blocks, built byte by byte:
/// footer copy at 0, header at 512, BAT at 1536 (8 entries, padded to
/// 2048), blocks 0, 3 and 5 at sectors 4, 13 and 22, footer at the end.
/// With `partial`, block 5's bitmap marks only sectors 0 and 2 present.
fn fixture(partial: bool) -> Vec<u8> {
    let mut b = vec![0u8; LEN];
    let footer = Footer::new(DISK_TYPE_DYNAMIC, 8 * BS as u64, 0, [9; 16]).encode();
    b[..512].copy_from_slice(&footer);
    b[LEN - 512..].copy_from_slice(&footer);
    b[512..1536].copy_from_slice(&DynHeader::new(8, BS as u32).encode());
    let bat = [
        4,
        UNALLOCATED,
        UNALLOCATED,
        13,
        UNALLOCATED,
        22,
        UNALLOCATED,
        UNALLOCATED,
    ];
    for (i, e) in bat.iter().enumerate() {
        b[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&e.to_be_bytes());
    }
    b[1568..2048].fill(0xff);
    for (k, (sector, fill)) in [(4usize, 0x11u8), (13, 0x33), (22, 0x55)]
        .iter()
        .enumerate()
    {
        let at = sector * 512;
        b[at..at + 512].fill(0xff);
        if partial && k == 2 {
            b[at..at + 512].fill(0);
            b[at] = 0b1010_0000;
        }
        b[at + 512..at + TOTAL].fill(*fill);
    }
    b
}

fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn hand_built_dynamic_fixture() {
    let dir = tempfile::tempdir().unwrap();
    for partial in [false, true] {
        let bytes = fixture(partial);
        assert_eq!(check_image_bytes(&bytes).unwrap(), VhdKind::Dynamic);
        let p = write_tmp(&dir, "fx.vhd", &bytes);
        let mut v = Vhd::open(&p, true).unwrap();
        assert_eq!(v.virtual_size(), 8 * BS as u64);
        assert_eq!(
            v.allocated_ranges(),
            vec![
                (0, BS as u64),
                (3 * BS as u64, BS as u64),
                (5 * BS as u64, BS as u64)
            ]
        );
        let mut d = vec![0u8; 8 * BS];
        v.read_at(&mut d, 0).unwrap();
        let mut want = vec![0u8; 8 * BS];
        want[..BS].fill(0x11);
        want[3 * BS..4 * BS].fill(0x33);
        if partial {
            // Only sectors 0 and 2 of block 5 are present.
            want[5 * BS..5 * BS + 512].fill(0x55);
            want[5 * BS + 1024..5 * BS + 1536].fill(0x55);
        } else {
            want[5 * BS..6 * BS].fill(0x55);
        }
        assert!(d == want, "partial={partial}");
        // Writing into sector 1 of block 5 keeps absent sectors zero and
        // marks the whole block present.
        v.write_at(&[0xaa; 10], 5 * BS as u64 + 512).unwrap();
        want[5 * BS + 512..5 * BS + 522].fill(0xaa);
        v.flush().unwrap();
        drop(v);
        let v = Vhd::open(&p, false).unwrap();
        v.read_at(&mut d, 0).unwrap();
        assert!(d == want, "after write, partial={partial}");
        let raw = std::fs::read(&p).unwrap();
        assert!(raw[22 * 512..23 * 512].iter().all(|&x| x == 0xff));
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn hand_built_fixed_fixture_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0x42u8; 8192];
    bytes.extend_from_slice(&Footer::new(DISK_TYPE_FIXED, 8192, 0, [1; 16]).encode());
    assert_eq!(check_image_bytes(&bytes).unwrap(), VhdKind::Fixed);
    let p = write_tmp(&dir, "f.vhd", &bytes);
    let v = Vhd::open(&p, false).unwrap();
    let mut d = vec![0u8; 8192];
    v.read_at(&mut d, 0).unwrap();
    assert!(d.iter().all(|&x| x == 0x42));
    // One byte appended: the footer is no longer at the end.
    bytes.push(0);
    let p = write_tmp(&dir, "g.vhd", &bytes);
    assert!(probe(&p).unwrap().is_none());
    assert!(matches!(
        Vhd::open(&p, false),
        Err(VhdError::Corrupt { .. })
    ));
    // Footer valid but size disagrees with the file.
    bytes.pop();
    bytes.drain(..512);
    let p = write_tmp(&dir, "h.vhd", &bytes);
    let e = Vhd::open(&p, false).unwrap_err();
    assert!(e.to_string().contains("h.vhd"), "{e}");
    assert!(matches!(e, VhdError::Corrupt { .. }));
    // Differencing disks are refused as unsupported.
    let mut diff = vec![0u8; 8192];
    diff.extend_from_slice(&Footer::new(4, 8192, 0, [1; 16]).encode());
    let p = write_tmp(&dir, "d.vhd", &diff);
    assert!(matches!(
        Vhd::open(&p, false),
        Err(VhdError::Unsupported { .. })
    ));
}

/// Recompute the checksums of both footers and the header in place.
fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    for at in [0, n.saturating_sub(512)] {
        if at + 512 <= n {
            let s = checksum(&b[at..at + 512], 64..68);
            b[at + 64..at + 68].copy_from_slice(&s.to_be_bytes());
        }
    }
    if n >= 1536 {
        let s = checksum(&b[512..1536], 36..40);
        b[512 + 36..512 + 40].copy_from_slice(&s.to_be_bytes());
    }
}

/// Open, probe and use whatever `bytes` is; never panic, and `open` agrees
/// with `check_image_bytes`.
fn exercise(dir: &tempfile::TempDir, bytes: &[u8]) -> Result<(), TestCaseError> {
    let p = write_tmp(dir, "g.vhd", bytes);
    let mem = check_image_bytes(bytes);
    let _ = probe(&p);
    let opened = Vhd::open(&p, true);
    prop_assert_eq!(
        opened.is_ok(),
        mem.is_ok(),
        "open {:?} vs bytes {:?}",
        opened.as_ref().err(),
        mem
    );
    if let Ok(mut v) = opened {
        let size = v.virtual_size();
        let n = size.min(64 * 1024);
        let mut buf = vec![0u8; n as usize];
        v.read_at(&mut buf, 0).unwrap();
        v.read_at(&mut buf, size - n).unwrap();
        let _ = v.allocated_ranges();
        // Writes may fail on a strange image but must not panic.
        let _ = v.write_at(&[0x5a; 5000], 0);
        let _ = v.write_at(&[0x5b; 700], size - 700.min(size));
        let _ = v.write_zeroes(0, size.min(9000));
        let _ = v.flush();
        drop(v);
        let _ = Vhd::open(&p, false);
    }
    std::fs::remove_file(&p).unwrap();
    Ok(())
}

/// Positions biased towards the metadata of the fixture.
fn position() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..2048,
        (LEN - 512)..LEN,
        1536usize..1568,
        0usize..LEN,
        Just(512 + 28),       // max table entries
        Just(512 + 32),       // block size
        Just(512 + 16),       // table offset
        Just(LEN - 512 + 48), // current size
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let dir = tempfile::tempdir().unwrap();
        exercise(&dir, &bytes)?;
    }

    #[test]
    fn mutated_images_never_panic(
        partial in any::<bool>(),
        muts in prop::collection::vec((position(), any::<u8>()), 1..6),
        fix in any::<bool>(),
        cut in prop::option::of(0usize..LEN),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = fixture(partial);
        for (at, v) in muts {
            b[at] = v;
        }
        if fix {
            fix_checksums(&mut b);
        }
        if let Some(c) = cut {
            b.truncate(c);
        }
        exercise(&dir, &b)?;
    }
}

/// A header claiming the largest BAT in a 16 KiB file is refused before
/// anything is allocated for it.
#[test]
fn huge_bat_claim_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = fixture(false);
    b[512 + 28..512 + 32].copy_from_slice(&(1u32 << 24).to_be_bytes());
    fix_checksums(&mut b);
    assert!(check_image_bytes(&b).is_err());
    let p = write_tmp(&dir, "big.vhd", &b);
    let e = Vhd::open(&p, false).unwrap_err();
    assert!(
        e.to_string().contains("runs past the end of the file"),
        "{e}"
    );
    // One more than the cap is refused by the header parser itself.
    b[512 + 28..512 + 32].copy_from_slice(&((1u32 << 24) + 1).to_be_bytes());
    fix_checksums(&mut b);
    let p = write_tmp(&dir, "bigger.vhd", &b);
    let e = Vhd::open(&p, false).unwrap_err();
    assert!(e.to_string().contains("BAT entries"), "{e}");
}

/// A damaged footer copy at offset 0 (QEMU reads that one first) is
/// rewritten from the trailing footer by a writable open.
#[test]
fn damaged_footer_copy_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = fixture(false);
    b[0..8].copy_from_slice(b"garbage!");
    assert_eq!(check_image_bytes(&b).unwrap(), VhdKind::Dynamic);
    let p = write_tmp(&dir, "c.vhd", &b);
    drop(Vhd::open(&p, false).unwrap());
    assert_eq!(&std::fs::read(&p).unwrap()[0..8], b"garbage!");
    drop(Vhd::open(&p, true).unwrap());
    let fixed = std::fs::read(&p).unwrap();
    assert_eq!(fixed[..512], fixed[fixed.len() - 512..]);
    assert_eq!(fixed.len(), b.len());
}
