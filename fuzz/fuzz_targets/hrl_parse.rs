//! Fuzz the `.hrl` parsers: `scripts/fuzz.sh [SECONDS]` runs every target on the
//! stable toolchain (kernel-notes/fuzzing.md). Any panic, overflow or
//! oversized allocation is a bug.
//!
//! Every header, record and trailer carries a checksum that random mutations
//! almost never keep valid, so the input is also fed again with its checksums
//! recomputed ([`reseal`]): that lets the fuzzer reach the record decoders,
//! the trailer and the whole-log checks behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::hrl::format::{
    parse_frame, parse_header, Frame, RecordHeader, HEADER_FIXED_LEN, HEADER_SUM_LEN,
    RECORD_HEADER_LEN, RECORD_TAG, TRAILER_LEN, TRAILER_TAG,
};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// `data` with the header checksum, each record checksum and the trailer's
/// log hash and checksum recomputed, as far as its frames can be walked.
fn reseal(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() < 16 {
        return b;
    }
    let body = HEADER_FIXED_LEN.saturating_add(u32_at(&b, 12));
    let Some(mut at) = body
        .checked_add(HEADER_SUM_LEN)
        .filter(|&end| end <= b.len())
    else {
        return b;
    };
    let sum = xxh3_64(&b[..body]);
    b[body..at].copy_from_slice(&sum.to_le_bytes());
    while at + 4 <= b.len() {
        if b[at..at + 4] == RECORD_TAG && at + RECORD_HEADER_LEN <= b.len() {
            let end = at + RECORD_HEADER_LEN + u32_at(&b, at + 20);
            if end > b.len() {
                break;
            }
            let mut h = Xxh3::new();
            h.update(&b[at..at + 24]);
            h.update(&b[at + RECORD_HEADER_LEN..end]);
            let sum = h.digest();
            b[at + 24..at + 32].copy_from_slice(&sum.to_le_bytes());
            at = end;
        } else if b[at..at + 4] == TRAILER_TAG && at + TRAILER_LEN <= b.len() {
            let log_hash = xxh3_128(&b[..at]);
            b[at + 24..at + 40].copy_from_slice(&log_hash.to_le_bytes());
            let sum = xxh3_64(&b[at..at + 40]);
            b[at + 40..at + 48].copy_from_slice(&sum.to_le_bytes());
            break;
        } else {
            break;
        }
    }
    b
}

/// A log arriving in pieces of at most `piece` bytes, as from a stream.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The whole streaming reader, as `vdrep hrl verify` and `dump` run it,
/// and the receiver's check of a log of unknown length as it streams in
/// (`HrlReader::streaming`): both must accept exactly the same logs.
fn read_whole(data: &[u8]) {
    let whole = vdrep::hrl::verify_bytes(data).is_ok();
    let mut sink = std::io::sink();
    let _ = vdrep::hrl::dump_bytes(data, true, &mut sink);
    // The piece size varies with the input so that frame boundaries fall
    // inside reads at different places.
    let piece = 1 + data.first().map_or(0, |&b| b as usize % 13);
    let streamed =
        vdrep::hrl::HrlReader::streaming(Pieces { data, piece }, std::path::Path::new("<stream>"))
            .and_then(vdrep::hrl::HrlReader::finish)
            .is_ok();
    assert_eq!(
        whole,
        streamed,
        "the streaming check and verify_bytes disagree on a {}-byte log",
        data.len()
    );
}

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
    read_whole(data);
    let sealed = reseal(data);
    if sealed != data {
        read_whole(&sealed);
    }
});
