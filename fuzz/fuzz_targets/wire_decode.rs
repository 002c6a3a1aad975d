//! Fuzz the wire codec: `decode` must never panic on any bytes, a decoded
//! message must re-encode to exactly the bytes it came from (canonical
//! encoding), and `safe_name` must never accept a name that escapes. The
//! `vdrep-mux/1` headers (`transport::mux`: a session's stream header, a
//! session's end) likewise: no panic, and what decodes re-encodes exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::transport::mux::{Control, StreamHeader, STREAM_HEADER_LEN};
use vdrep::wire::{decode, encode, safe_name};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match decode(&data[at..]) {
            Ok(Some((msg, used))) => {
                assert!(used > 0 && at + used <= data.len());
                let mut again = Vec::new();
                encode(&msg, &mut again).expect("a decoded message re-encodes");
                assert_eq!(&again[..], &data[at..at + used]);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let head = &data[..data.len().min(STREAM_HEADER_LEN)];
    if let Ok(h) = StreamHeader::decode(head) {
        assert_eq!(&h.encode()[..], head, "a stream header re-encodes");
    }
    if let Ok(c) = Control::decode(data) {
        assert_eq!(c.encode(), data, "a control message re-encodes");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(n) = safe_name(s) {
            assert!(!n.starts_with('/'));
            assert!(!n.contains('\\') && !n.contains('\0'));
            assert!(n.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        }
    }
});
