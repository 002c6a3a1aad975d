//! Fuzz the wire codec: `decode` must never panic on any bytes, a decoded
//! message must re-encode to exactly the bytes it came from (canonical
//! encoding), and `safe_name` must never accept a name that escapes.
#![no_main]

use libfuzzer_sys::fuzz_target;
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
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(n) = safe_name(s) {
            assert!(!n.starts_with('/'));
            assert!(!n.contains('\\') && !n.contains('\0'));
            assert!(n.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        }
    }
});
