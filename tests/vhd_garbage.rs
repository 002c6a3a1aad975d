//! Hostile input into the VHD footer parser (the part of the VHD format
//! vdrep reads): arbitrary and mutated bytes never panic, a damaged footer
//! is refused unless its checksum is recomputed, and every footer vdrep
//! writes parses back to itself.

use proptest::prelude::*;
use vdrep::vhd::footer::{
    checksum, Footer, Geometry, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, FOOTER_SIZE, MAX_VIRTUAL_SIZE,
};

/// Parse `bytes`; when it parses, re-encoding must give the same footer
/// (only the checksum may differ: `encode` zeroes the reserved bytes).
fn parse_round_trip(bytes: &[u8]) -> Result<Option<Footer>, TestCaseError> {
    let Ok(f) = Footer::parse(bytes) else {
        return Ok(None);
    };
    let _ = f.qemu_visible_size();
    let mut again = Footer::parse(&f.encode()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    again.checksum = f.checksum;
    prop_assert_eq!(&again, &f);
    Ok(Some(f))
}

fn fix_checksum(b: &mut [u8]) {
    let s = checksum(&b[..FOOTER_SIZE], 64..68);
    b[64..68].copy_from_slice(&s.to_be_bytes());
}

/// Fields a corruption is most likely to hurt: cookie, version, data offset,
/// sizes, geometry, disk type, checksum.
fn position() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..FOOTER_SIZE,
        0usize..16,
        40usize..68,
        Just(63),
        Just(55)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1100)) {
        parse_round_trip(&bytes)?;
    }

    #[test]
    fn written_footers_parse_back(
        sectors in 1u64..=(MAX_VIRTUAL_SIZE / 512),
        dynamic in any::<bool>(),
        time in any::<u32>(),
        id in any::<[u8; 16]>(),
    ) {
        let kind = if dynamic { DISK_TYPE_DYNAMIC } else { DISK_TYPE_FIXED };
        let f = Footer::new(kind, sectors * 512, time, id);
        let mut parsed = parse_round_trip(&f.encode())?
            .ok_or_else(|| TestCaseError::fail("a written footer does not parse"))?;
        parsed.checksum = f.checksum; // `new` leaves it to `encode`
        prop_assert_eq!(&parsed, &f);
        prop_assert_eq!(f.geometry, Geometry::for_size(sectors * 512));
        prop_assert_eq!(f.qemu_visible_size(), sectors * 512, "qem2 is sized exactly");
    }

    #[test]
    fn mutated_footers_never_panic(
        sectors in 1u64..(1 << 24),
        muts in prop::collection::vec((position(), any::<u8>()), 1..6),
        fix in any::<bool>(),
    ) {
        let good = Footer::new(DISK_TYPE_FIXED, sectors * 512, 0, [7; 16]);
        let mut b = good.encode().to_vec();
        for (at, v) in muts {
            b[at] = v;
        }
        if fix {
            fix_checksum(&mut b);
        }
        if let Some(f) = parse_round_trip(&b)? {
            prop_assert_eq!(f.current_size % 512, 0, "parse accepted a partial sector");
        }
    }
}

#[test]
fn refusals_name_the_field() {
    let mut b = Footer::new(DISK_TYPE_FIXED, 8192, 0, [1; 16]).encode();
    b[70] ^= 1; // inside the unique id: only the checksum notices
    assert_eq!(Footer::parse(&b).unwrap_err().offset, 64);
    fix_checksum(&mut b);
    assert!(Footer::parse(&b).is_ok());
    b[48..56].copy_from_slice(&8193u64.to_be_bytes()); // not whole sectors
    fix_checksum(&mut b);
    assert_eq!(Footer::parse(&b).unwrap_err().offset, 48);
    b[48..56].copy_from_slice(&8192u64.to_be_bytes());
    b[60..64].copy_from_slice(&9u32.to_be_bytes()); // unknown disk type
    fix_checksum(&mut b);
    assert_eq!(Footer::parse(&b).unwrap_err().offset, 60);
    assert!(Footer::parse(&b[..511]).is_err(), "too short");
    assert_eq!(Footer::parse(b"garbage!").unwrap_err().offset, 0);
}
