//! Fuzz the VHD footer parser (the part of the VHD format vdrep keeps):
//! `scripts/fuzz.sh [SECONDS]` runs every target on the stable toolchain
//! (kernel-notes/fuzzing.md). Any
//! panic, overflow or oversized allocation is a bug, and so is a footer that
//! does not survive `encode` → `parse` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::vhd::footer::{Footer, FOOTER_SIZE};

fn check(bytes: &[u8]) {
    let Ok(f) = Footer::parse(bytes) else {
        return;
    };
    let _ = f.qemu_visible_size();
    let _ = f.geometry.sectors();
    // Re-encoding drops the reserved bytes, so only the checksum may change.
    let mut again = Footer::parse(&f.encode()).expect("an encoded footer parses");
    again.checksum = f.checksum;
    assert_eq!(again, f, "footer changed through encode/parse");
}

fuzz_target!(|data: &[u8]| {
    // The footer copy at offset 0 (dynamic disks) and the trailing footer.
    check(data);
    if data.len() >= FOOTER_SIZE {
        check(&data[data.len() - FOOTER_SIZE..]);
    }
});
