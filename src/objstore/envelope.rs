//! The client-side encryption envelope of every object vdrep writes to an
//! object store: lz4 first (kept only when it shrinks the data), then
//! AES-256-GCM (`ring`) with a random 96-bit nonce. The associated data is
//! the header and the object's name, so an object moved or copied to
//! another name, or a header edited, fails to open: objects cannot be
//! swapped. The bucket operator sees sizes and names, never contents.
//!
//! # Format (version 1)
//!
//! ```text
//! 0   4  magic "VDRE"
//! 4   1  version (1)
//! 5   1  flags: bit 0 = the plaintext is an lz4 block; other bits 0
//! 6   2  reserved, 0
//! 8   8  key id: the first 8 bytes of HMAC-SHA256(key, "vdrep key id v1")
//! 16  8  plaintext length, little-endian (at most MAX_PLAIN)
//! 24 12  nonce
//! 36  …  ciphertext, then the 16-byte GCM tag
//! ```
//!
//! [`EncryptionKey::open`] checks in order: the header's shape (`NotEnvelope`,
//! `UnsupportedVersion`, `TooLarge`), the key id (`WrongKey`: the object
//! was sealed with another key), the tag (`Tampered`: a flipped byte, a
//! swapped name or a truncated body), then the lz4 block. Nothing of the
//! plaintext is returned unless every check passes. Every error names the
//! object.
//!
//! # Key files
//!
//! [`EncryptionKey::generate_file`] (`vdrep keys encryption-key --out
//! FILE`) writes 256 random bits as one line of 64 hex digits, mode 0600,
//! never over an existing file.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::Write;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"VDRE";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 36;
pub const TAG_LEN: usize = 16;
/// The largest plaintext an envelope may hold (1 GiB).
pub const MAX_PLAIN: u64 = 1 << 30;
const FLAG_LZ4: u8 = 1;

/// What kind of failure an [`EnvelopeError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeErrorKind {
    NotEnvelope,
    UnsupportedVersion,
    TooLarge,
    WrongKey,
    Tampered,
    KeyFile,
    Crypto,
}

/// A refused envelope, or an unusable key.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("object {object:?} is not a vdrep encrypted object ({why}); refused")]
    NotEnvelope { object: String, why: &'static str },
    #[error("object {object:?} has envelope version {version}, this vdrep reads version {VERSION}; upgrade vdrep")]
    UnsupportedVersion { object: String, version: u8 },
    #[error("object {object:?} claims {len} bytes of plaintext (at most {MAX_PLAIN}); refused")]
    TooLarge { object: String, len: u64 },
    #[error("object {object:?} was encrypted with another key (key id {found}, this key is {expected}); give the right --encryption-key")]
    WrongKey {
        object: String,
        found: String,
        expected: String,
    },
    #[error("object {object:?} failed authentication: it was altered, truncated or moved from another name; refused, nothing of it was used")]
    Tampered { object: String },
    #[error("encryption key file {path}: {what}")]
    KeyFile { path: String, what: String },
    #[error("encryption failed: {what}")]
    Crypto { what: &'static str },
}

impl EnvelopeError {
    pub fn kind(&self) -> EnvelopeErrorKind {
        match self {
            EnvelopeError::NotEnvelope { .. } => EnvelopeErrorKind::NotEnvelope,
            EnvelopeError::UnsupportedVersion { .. } => EnvelopeErrorKind::UnsupportedVersion,
            EnvelopeError::TooLarge { .. } => EnvelopeErrorKind::TooLarge,
            EnvelopeError::WrongKey { .. } => EnvelopeErrorKind::WrongKey,
            EnvelopeError::Tampered { .. } => EnvelopeErrorKind::Tampered,
            EnvelopeError::KeyFile { .. } => EnvelopeErrorKind::KeyFile,
            EnvelopeError::Crypto { .. } => EnvelopeErrorKind::Crypto,
        }
    }
}

/// A 256-bit data key.
pub struct EncryptionKey {
    key: LessSafeKey,
    id: [u8; 8],
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptionKey(id {})", crate::util::hex(&self.id))
    }
}

impl EncryptionKey {
    /// The key of 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> EncryptionKey {
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            b"vdrep key id v1",
        );
        let mut id = [0u8; 8];
        id.copy_from_slice(&mac.as_ref()[..8]);
        let unbound = match UnboundKey::new(&AES_256_GCM, bytes) {
            Ok(k) => k,
            Err(_) => unreachable!("AES-256-GCM takes a 32-byte key"),
        };
        EncryptionKey {
            key: LessSafeKey::new(unbound),
            id,
        }
    }

    /// The key's id (in every envelope it seals; not secret).
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// Read a key file (64 hex digits, surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<EncryptionKey, EnvelopeError> {
        let err = |what: String| EnvelopeError::KeyFile {
            path: path.display().to_string(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(
                "not a vdrep encryption key (64 hex digits; make one with `vdrep keys encryption-key --out FILE`)".into(),
            ));
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| err("bad hex digit".into()))?;
        }
        Ok(EncryptionKey::from_bytes(&bytes))
    }

    /// Make a new random key file at `path` (mode 0600, created exclusively).
    pub fn generate_file(path: &Path) -> Result<EncryptionKey, EnvelopeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |what: String| EnvelopeError::KeyFile {
            path: path.display().to_string(),
            what,
        };
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| err("no randomness from the system".into()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(format!("cannot create (it must not exist yet): {e}")))?;
        writeln!(f, "{}", crate::util::hex(&bytes))
            .and_then(|_| f.sync_all())
            .map_err(|e| err(format!("cannot write: {e}")))?;
        Ok(EncryptionKey::from_bytes(&bytes))
    }

    /// Seal `plain` as the object `name` (a fresh random nonce).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| EnvelopeError::Crypto {
                what: "no randomness from the system",
            })?;
        self.seal_with_nonce(name, plain, nonce)
    }

    /// [`seal`](Self::seal) with a given nonce: only for deterministic test
    /// data (fuzz seeds); a nonce must never be used twice with one key.
    #[doc(hidden)]
    pub fn seal_with_nonce(
        &self,
        name: &str,
        plain: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Vec<u8>, EnvelopeError> {
        if plain.len() as u64 > MAX_PLAIN {
            return Err(EnvelopeError::TooLarge {
                object: name.to_string(),
                len: plain.len() as u64,
            });
        }
        let compressed = lz4_flex::block::compress(plain);
        let (flags, body) = if compressed.len() < plain.len() {
            (FLAG_LZ4, compressed.as_slice())
        } else {
            (0, plain)
        };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, flags, 0, 0]);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
        out.extend_from_slice(&nonce);
        let aad = aad(&out, name);
        let mut sealed = body.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut sealed,
            )
            .map_err(|_| EnvelopeError::Crypto {
                what: "AES-256-GCM seal",
            })?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Open the object `name` (see the module documentation for the
    /// checks); the plaintext.
    pub fn open(&self, name: &str, object: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let h = Header::parse(name, object)?;
        if h.key_id != self.id {
            return Err(EnvelopeError::WrongKey {
                object: name.to_string(),
                found: crate::util::hex(&h.key_id),
                expected: crate::util::hex(&self.id),
            });
        }
        let tampered = || EnvelopeError::Tampered {
            object: name.to_string(),
        };
        let aad = aad(&object[..HEADER_LEN], name);
        let mut body = object[HEADER_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(h.nonce),
                Aad::from(&aad),
                &mut body,
            )
            .map_err(|_| tampered())?;
        if h.flags & FLAG_LZ4 == 0 {
            if plain.len() as u64 != h.plain_len {
                return Err(tampered());
            }
            return Ok(plain.to_vec());
        }
        let mut out = vec![0u8; h.plain_len as usize];
        match lz4_flex::block::decompress_into(plain, &mut out) {
            Ok(n) if n == out.len() => Ok(out),
            // Authenticated but undecodable: sealed by a broken writer.
            _ => Err(tampered()),
        }
    }
}

fn aad(header: &[u8], name: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + name.len());
    a.extend_from_slice(header);
    a.extend_from_slice(name.as_bytes());
    a
}

/// The parsed header of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub key_id: [u8; 8],
    pub plain_len: u64,
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// Parse and check the header of the object `name` (the body is not
    /// authenticated here).
    pub fn parse(name: &str, object: &[u8]) -> Result<Header, EnvelopeError> {
        let not = |why| EnvelopeError::NotEnvelope {
            object: name.to_string(),
            why,
        };
        if object.len() < 5 || &object[..4] != MAGIC {
            return Err(not("no VDRE magic"));
        }
        if object[4] != VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                object: name.to_string(),
                version: object[4],
            });
        }
        if object.len() < HEADER_LEN + TAG_LEN {
            return Err(not("shorter than a header and a tag"));
        }
        let flags = object[5];
        if flags & !FLAG_LZ4 != 0 || object[6] != 0 || object[7] != 0 {
            return Err(not("unknown flags"));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&object[8..16]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&object[16..24]);
        let plain_len = u64::from_le_bytes(len);
        if plain_len > MAX_PLAIN {
            return Err(EnvelopeError::TooLarge {
                object: name.to_string(),
                len: plain_len,
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&object[24..HEADER_LEN]);
        Ok(Header {
            flags,
            key_id,
            plain_len,
            nonce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> EncryptionKey {
        EncryptionKey::from_bytes(&[b; 32])
    }

    #[test]
    fn round_trip_compressed_and_not() {
        let k = key(1);
        let zeros = vec![0u8; 100_000];
        let sealed = k.seal("a/b", &zeros).unwrap();
        assert!(sealed.len() < 2000, "lz4 before encryption");
        assert_eq!(k.open("a/b", &sealed).unwrap(), zeros);
        let mut random = vec![0u8; 5000];
        SystemRandom::new().fill(&mut random).unwrap();
        let sealed = k.seal("x", &random).unwrap();
        assert_eq!(sealed.len(), HEADER_LEN + random.len() + TAG_LEN);
        assert_eq!(k.open("x", &sealed).unwrap(), random);
        assert_eq!(k.open("e", &k.seal("e", b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn refusals_name_the_object() {
        let k = key(1);
        let sealed = k.seal("obj/1", b"hello hello hello hello").unwrap();
        let e = key(2).open("obj/1", &sealed).unwrap_err();
        assert_eq!(e.kind(), EnvelopeErrorKind::WrongKey);
        assert!(e.to_string().contains("obj/1"));
        // Swapped name.
        assert_eq!(
            k.open("obj/2", &sealed).unwrap_err().kind(),
            EnvelopeErrorKind::Tampered
        );
        // Every byte flipped, one at a time: never accepted.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            let e = k.open("obj/1", &t).unwrap_err();
            assert!(e.to_string().contains("obj/1"), "{e}");
        }
        // Truncated.
        for n in 0..sealed.len() {
            assert!(k.open("obj/1", &sealed[..n]).is_err());
        }
        let mut v2 = sealed.clone();
        v2[4] = 2;
        assert_eq!(
            k.open("obj/1", &v2).unwrap_err().kind(),
            EnvelopeErrorKind::UnsupportedVersion
        );
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = EncryptionKey::generate_file(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(EncryptionKey::from_file(&p).unwrap().id(), k.id());
        assert_eq!(
            EncryptionKey::generate_file(&p).unwrap_err().kind(),
            EnvelopeErrorKind::KeyFile
        );
        std::fs::write(&p, "zz").unwrap();
        assert_eq!(
            EncryptionKey::from_file(&p).unwrap_err().kind(),
            EnvelopeErrorKind::KeyFile
        );
    }
}
