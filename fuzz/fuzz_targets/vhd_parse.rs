//! Fuzz the VHD parsers: `cargo +nightly fuzz run vhd_parse` (from the
//! repository root). Any panic, overflow or oversized allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::vhd::dynamic::{check_layout, parse_bat, DynHeader, HEADER_SIZE};
use vdrep::vhd::footer::{Footer, FOOTER_SIZE};

fuzz_target!(|data: &[u8]| {
    // The slice parsers on their own, at the start of the input.
    let footer = Footer::parse(data);
    let header = DynHeader::parse(data);
    if let Ok(h) = &header {
        let bat = parse_bat(data.get(HEADER_SIZE..).unwrap_or(&[]), h.max_table_entries);
        if let (Ok(f), Ok(bat)) = (&footer, &bat) {
            let _ = check_layout(f, h, bat, data.len() as u64, true);
            let _ = check_layout(f, h, bat, data.len() as u64, false);
        }
    }
    let _ = parse_bat(
        data,
        u32::from_le_bytes([
            data.first().copied().unwrap_or(0),
            data.get(1).copied().unwrap_or(0),
            data.get(2).copied().unwrap_or(0),
            0,
        ]),
    );
    if let Ok(f) = &footer {
        let _ = f.qemu_visible_size();
        let _ = f.encode();
    }
    // A whole image, as `Vhd::open` validates a file.
    let _ = vdrep::vhd::check_image_bytes(data);
    if data.len() >= FOOTER_SIZE {
        let _ = Footer::parse(&data[data.len() - FOOTER_SIZE..]);
    }
});
