//! Fuzz the encryption envelope's parser and opener
//! (`vdrep::objstore::envelope`): input = one byte of name length, the
//! object's name, then the object; opened with the fixed key the seeds
//! (examples/fuzz_seeds.rs) were sealed with. Any panic or oversized
//! allocation is a bug; an object that opens must hold exactly the length
//! its header claims and seal/open back to the same plaintext.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdrep::objstore::envelope::{EncryptionKey, Header};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize).min(rest.len());
    let name = String::from_utf8_lossy(&rest[..n]);
    let object = &rest[n..];
    let key = EncryptionKey::from_bytes(&[7u8; 32]);
    let header = Header::parse(&name, object);
    let Ok(plain) = key.open(&name, object) else {
        return;
    };
    let header = header.expect("an object that opens has a valid header");
    assert_eq!(plain.len() as u64, header.plain_len);
    let again = key.seal(&name, &plain).expect("seal");
    assert_eq!(key.open(&name, &again).expect("reopen"), plain);
});
