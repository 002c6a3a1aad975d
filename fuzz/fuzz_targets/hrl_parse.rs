//! Fuzz the `.hrl` parsers: `scripts/fuzz.sh [SECONDS]` runs every target on the
//! stable toolchain (kernel-notes/fuzzing.md). Any panic, overflow or
//! oversized allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::hrl::format::{parse_frame, parse_header, Frame, RecordHeader};

fuzz_target!(|data: &[u8]| {
    // Slice parsers directly.
    let _ = parse_header(data);
    if let Ok(Frame::Record(rec)) = parse_frame(data) {
        let payload = data.get(32..).unwrap_or(&[]);
        let mut out = Vec::new();
        // Skip the checksum so the decoder sees the fuzzed payload too.
        let forged = RecordHeader::new(rec.encoding, rec.offset, rec.length, payload);
        if payload.len() == rec.stored_len as usize {
            let _ = forged.check_payload(payload, &mut out);
        }
    }
    // The whole streaming reader, as verify and dump run it.
    let _ = vdrep::hrl::verify_bytes(data);
    let mut sink = std::io::sink();
    let _ = vdrep::hrl::dump_bytes(data, true, &mut sink);
});
