//! Sans-IO encoding and parsing of the `.hrl` structures (see the layout in
//! the [module documentation](super)).
//!
//! Every parser works on a byte slice, never panics and never allocates based
//! on a length it has not checked against the caps below; offsets in
//! [`ParseError::Bad`] are relative to the start of the slice.

use super::HrlHeader;
use xxhash_rust::xxh3::Xxh3;

/// First 8 bytes of every log. The `\r\n` catches text-mode mangling.
pub const MAGIC: [u8; 8] = *b"VDHRL\0\r\n";
/// Format version written by this code; the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the fixed part of the file header (before the disk name).
pub const HEADER_FIXED_LEN: usize = 80;
/// Header flag: the cut was taken while the guest was quiesced (an
/// application-consistency hook froze it); every other bit must be 0.
pub const HDR_FLAG_APP: u32 = 1;
/// Length of the header checksum that follows the disk name.
pub const HEADER_SUM_LEN: usize = 8;
/// Longest disk name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Tag opening a record.
pub const RECORD_TAG: [u8; 4] = *b"HREC";
/// Tag opening the trailer.
pub const TRAILER_TAG: [u8; 4] = *b"HEND";
/// Length of a record header (payload follows).
pub const RECORD_HEADER_LEN: usize = 32;
/// Length of the trailer including the seal magic; it ends the file.
pub const TRAILER_LEN: usize = 56;
/// Last 8 bytes of every sealed log.
pub const SEAL_MAGIC: [u8; 8] = *b"HRLSEAL\n";
/// Largest number of disk bytes one record covers, and the hard cap on its
/// stored payload.
pub const MAX_RECORD_LEN: u32 = 1 << 20;
/// Smallest accepted tracking block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted tracking block size.
pub const MAX_BLOCK_SIZE: u32 = 1 << 30;
/// Largest accepted disk size (keeps every offset a valid `off_t`).
pub const MAX_DISK_SIZE: u64 = 1 << 60;

/// How a record's payload stores its disk bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Payload is the bytes themselves (`stored_len == length`).
    Raw = 0,
    /// The range is all zeros; no payload (`stored_len == 0`).
    Zero = 1,
    /// Payload is one LZ4 block (`0 < stored_len < length`).
    Lz4 = 2,
}

impl Encoding {
    /// The on-disk code.
    pub fn code(self) -> u8 {
        self as u8
    }
    /// Decode an on-disk code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zero),
            2 => Some(Encoding::Lz4),
            _ => None,
        }
    }
    /// Lower-case name, as printed by `dump`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zero => "zero",
            Encoding::Lz4 => "lz4",
        }
    }
}

/// Why a slice did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The slice ends early: the structure needs `need` bytes in total.
    Short { need: usize },
    /// The bytes are wrong at `at` (relative to the slice start).
    Bad { at: usize, what: String },
}

fn bad(at: usize, what: impl Into<String>) -> ParseError {
    ParseError::Bad {
        at,
        what: what.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    if let Some(s) = b.get(at..at + 16) {
        a.copy_from_slice(s);
    }
    u128::from_le_bytes(a)
}

/// Check the header fields that do not depend on the bytes. On failure the
/// result names the byte offset of the offending field in the header.
pub fn validate_header(h: &HrlHeader) -> Result<(), (usize, String)> {
    if h.disk_name.is_empty() || h.disk_name.len() > MAX_NAME_LEN {
        return Err((
            12,
            format!(
                "disk name is {} bytes; it must be 1..={MAX_NAME_LEN}",
                h.disk_name.len()
            ),
        ));
    }
    if h.cycle <= h.base_cycle {
        return Err((
            32,
            format!(
                "cycle {} does not follow base cycle {}",
                h.cycle, h.base_cycle
            ),
        ));
    }
    if h.base_size > MAX_DISK_SIZE {
        return Err((48, format!("base size {} is too large", h.base_size)));
    }
    if h.disk_size > MAX_DISK_SIZE {
        return Err((56, format!("disk size {} is too large", h.disk_size)));
    }
    if !h.block_size.is_power_of_two()
        || h.block_size < MIN_BLOCK_SIZE
        || h.block_size > MAX_BLOCK_SIZE
    {
        return Err((
            72,
            format!(
                "block size {} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}",
                h.block_size
            ),
        ));
    }
    Ok(())
}

/// A header that cannot be written (a field out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct InvalidHeader {
    /// Byte offset of the offending field in the encoded header.
    pub at: usize,
    pub what: String,
}

/// Encode a file header (fixed part, name, checksum).
pub fn encode_header(h: &HrlHeader) -> Result<Vec<u8>, InvalidHeader> {
    validate_header(h).map_err(|(at, what)| InvalidHeader { at, what })?;
    let name = h.disk_name.as_bytes();
    let mut b = Vec::with_capacity(HEADER_FIXED_LEN + name.len() + HEADER_SUM_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&(name.len() as u32).to_le_bytes());
    b.extend_from_slice(&h.disk_id);
    b.extend_from_slice(&h.cycle.to_le_bytes());
    b.extend_from_slice(&h.base_cycle.to_le_bytes());
    b.extend_from_slice(&h.base_size.to_le_bytes());
    b.extend_from_slice(&h.disk_size.to_le_bytes());
    b.extend_from_slice(&h.cut_unix_ns.to_le_bytes());
    b.extend_from_slice(&h.block_size.to_le_bytes());
    let flags = if h.app_consistent { HDR_FLAG_APP } else { 0 };
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(name);
    let sum = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    Ok(b)
}

/// Parse a file header at the start of `buf`. Returns the header and its
/// length in bytes. With too few bytes, returns [`ParseError::Short`] with
/// the length needed (call again with at least that many), unless the bytes
/// present are already wrong.
pub fn parse_header(buf: &[u8]) -> Result<(HrlHeader, usize), ParseError> {
    let m = buf.len().min(MAGIC.len());
    if buf[..m] != MAGIC[..m] {
        return Err(bad(0, "not a vdrep change log (.hrl): bad magic"));
    }
    if buf.len() >= 12 {
        let version = u32_at(buf, 8);
        if version != FORMAT_VERSION {
            return Err(bad(
                8,
                format!(
                    "format version {version} is not supported (this vdrep reads version {FORMAT_VERSION})"
                ),
            ));
        }
    }
    if buf.len() >= 16 {
        let name_len = u32_at(buf, 12) as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad(
                12,
                format!("disk name length {name_len} is not in 1..={MAX_NAME_LEN}"),
            ));
        }
    }
    if buf.len() < HEADER_FIXED_LEN {
        return Err(ParseError::Short {
            need: HEADER_FIXED_LEN,
        });
    }
    let name_len = u32_at(buf, 12) as usize;
    let total = HEADER_FIXED_LEN + name_len + HEADER_SUM_LEN;
    if buf.len() < total {
        return Err(ParseError::Short { need: total });
    }
    let body = &buf[..HEADER_FIXED_LEN + name_len];
    let want = u64_at(buf, HEADER_FIXED_LEN + name_len);
    if xxhash_rust::xxh3::xxh3_64(body) != want {
        return Err(bad(
            HEADER_FIXED_LEN + name_len,
            "header checksum mismatch (the header is damaged)",
        ));
    }
    let flags = u32_at(buf, 76);
    if flags & !HDR_FLAG_APP != 0 {
        return Err(bad(76, format!("unknown header flags {flags:#x}")));
    }
    let disk_name = match std::str::from_utf8(&buf[HEADER_FIXED_LEN..HEADER_FIXED_LEN + name_len]) {
        Ok(s) => s.to_owned(),
        Err(_) => return Err(bad(HEADER_FIXED_LEN, "disk name is not UTF-8")),
    };
    let mut disk_id = [0u8; 16];
    disk_id.copy_from_slice(&buf[16..32]);
    let h = HrlHeader {
        disk_id,
        disk_name,
        cycle: u64_at(buf, 32),
        base_cycle: u64_at(buf, 40),
        base_size: u64_at(buf, 48),
        disk_size: u64_at(buf, 56),
        cut_unix_ns: u64_at(buf, 64),
        app_consistent: flags & HDR_FLAG_APP != 0,
        block_size: u32_at(buf, 72),
    };
    validate_header(&h).map_err(|(at, what)| bad(at, what))?;
    Ok((h, total))
}

/// A record header (the payload follows it in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub encoding: Encoding,
    /// Disk offset of the first byte.
    pub offset: u64,
    /// Disk bytes covered (1..=[`MAX_RECORD_LEN`]).
    pub length: u32,
    /// Payload bytes following the header.
    pub stored_len: u32,
    /// xxh3-64 over header bytes 0..24 followed by the payload.
    pub checksum: u64,
}

impl RecordHeader {
    fn fields(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&RECORD_TAG);
        b[4] = self.encoding.code();
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        b
    }

    /// The checksum these fields and `payload` must carry.
    pub fn compute_checksum(&self, payload: &[u8]) -> u64 {
        let mut h = Xxh3::new();
        h.update(&self.fields());
        h.update(payload);
        h.digest()
    }

    /// Build a header for `payload`, computing its checksum.
    pub fn new(encoding: Encoding, offset: u64, length: u32, payload: &[u8]) -> Self {
        let mut r = RecordHeader {
            encoding,
            offset,
            length,
            stored_len: payload.len() as u32,
            checksum: 0,
        };
        r.checksum = r.compute_checksum(payload);
        r
    }

    /// The 32 bytes written to the file.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..24].copy_from_slice(&self.fields());
        b[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Check `payload` against the checksum and, for LZ4, decode it into
    /// `out` (resized to `length`). For RAW, `out` is left alone (use the
    /// payload); for ZERO it is left alone too (no data).
    pub fn check_payload(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), ParseError> {
        if payload.len() != self.stored_len as usize {
            return Err(ParseError::Short {
                need: self.stored_len as usize,
            });
        }
        if self.compute_checksum(payload) != self.checksum {
            return Err(bad(
                0,
                "record checksum mismatch (header or payload damaged)",
            ));
        }
        if self.encoding == Encoding::Lz4 {
            // `length` was checked against MAX_RECORD_LEN by parse_frame.
            out.clear();
            out.resize(self.length as usize, 0);
            match lz4_flex::block::decompress_into(payload, out) {
                Ok(n) if n == self.length as usize => {}
                Ok(n) => {
                    return Err(bad(
                        0,
                        format!(
                            "lz4 payload decodes to {n} bytes, record says {}",
                            self.length
                        ),
                    ))
                }
                Err(e) => return Err(bad(0, format!("lz4 payload does not decode: {e}"))),
            }
        }
        Ok(())
    }
}

/// The trailer that seals a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub record_count: u64,
    pub data_bytes: u64,
    /// xxh3-128 of every byte of the file before the trailer.
    pub log_hash: u128,
}

impl Trailer {
    /// The [`TRAILER_LEN`] bytes that end the file.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..4].copy_from_slice(&TRAILER_TAG);
        b[8..16].copy_from_slice(&self.record_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[24..40].copy_from_slice(&self.log_hash.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..40]);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        b[48..56].copy_from_slice(&SEAL_MAGIC);
        b
    }
}

/// What follows the header or a record: another record or the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Record(RecordHeader),
    Trailer(Trailer),
}

impl Frame {
    /// Bytes of this frame before any payload.
    pub fn header_len(&self) -> usize {
        match self {
            Frame::Record(_) => RECORD_HEADER_LEN,
            Frame::Trailer(_) => TRAILER_LEN,
        }
    }
}

/// Parse the frame (record header or trailer) at the start of `buf`. Checks
/// every field that can be checked without the payload: tag, encoding,
/// reserved bytes, length caps, stored length consistent with the encoding;
/// for the trailer, its checksum and the seal magic.
pub fn parse_frame(buf: &[u8]) -> Result<Frame, ParseError> {
    if buf.len() < 4 {
        return Err(ParseError::Short {
            need: RECORD_HEADER_LEN,
        });
    }
    if buf[..4] == TRAILER_TAG {
        if buf.len() < TRAILER_LEN {
            return Err(ParseError::Short { need: TRAILER_LEN });
        }
        if u32_at(buf, 4) != 0 {
            return Err(bad(4, "trailer reserved bytes are not zero"));
        }
        let sum = u64_at(buf, 40);
        if xxhash_rust::xxh3::xxh3_64(&buf[..40]) != sum {
            return Err(bad(40, "trailer checksum mismatch (the seal is damaged)"));
        }
        if buf[48..56] != SEAL_MAGIC {
            return Err(bad(48, "seal magic missing: the log is not sealed"));
        }
        return Ok(Frame::Trailer(Trailer {
            record_count: u64_at(buf, 8),
            data_bytes: u64_at(buf, 16),
            log_hash: u128_at(buf, 24),
        }));
    }
    if buf[..4] != RECORD_TAG {
        return Err(bad(0, "expected a record or the trailer: bad tag"));
    }
    if buf.len() < RECORD_HEADER_LEN {
        return Err(ParseError::Short {
            need: RECORD_HEADER_LEN,
        });
    }
    let encoding = match Encoding::from_code(buf[4]) {
        Some(e) => e,
        None => return Err(bad(4, format!("unknown record encoding {}", buf[4]))),
    };
    if buf[5..8] != [0, 0, 0] {
        return Err(bad(5, "record reserved bytes are not zero"));
    }
    let offset = u64_at(buf, 8);
    let length = u32_at(buf, 16);
    let stored_len = u32_at(buf, 20);
    if length == 0 || length > MAX_RECORD_LEN {
        return Err(bad(
            16,
            format!("record length {length} is not in 1..={MAX_RECORD_LEN}"),
        ));
    }
    let ok = match encoding {
        Encoding::Raw => stored_len == length,
        Encoding::Zero => stored_len == 0,
        Encoding::Lz4 => stored_len > 0 && stored_len < length,
    };
    if !ok {
        return Err(bad(
            20,
            format!(
                "stored length {stored_len} is impossible for a {} record of {length} bytes",
                encoding.name()
            ),
        ));
    }
    Ok(Frame::Record(RecordHeader {
        encoding,
        offset,
        length,
        stored_len,
        checksum: u64_at(buf, 24),
    }))
}

/// True if every byte of `data` is zero.
pub fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> HrlHeader {
        HrlHeader {
            disk_id: [7; 16],
            disk_name: "vm/disk0.qcow2".into(),
            cycle: 5,
            base_cycle: 4,
            block_size: 4096,
            base_size: 1 << 20,
            disk_size: 2 << 20,
            cut_unix_ns: 1_700_000_000_000_000_000,
            app_consistent: false,
        }
    }

    #[test]
    fn header_round_trip_and_short() {
        let h = header();
        let b = encode_header(&h).unwrap();
        assert_eq!(
            b.len(),
            HEADER_FIXED_LEN + h.disk_name.len() + HEADER_SUM_LEN
        );
        assert_eq!(parse_header(&b).unwrap(), (h.clone(), b.len()));
        // with trailing bytes
        let mut more = b.clone();
        more.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_header(&more).unwrap().1, b.len());
        for n in 0..b.len() {
            match parse_header(&b[..n]) {
                Err(ParseError::Short { need }) => assert!(need > n),
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn app_flag_round_trips_and_unknown_flags_are_refused() {
        let mut h = header();
        h.app_consistent = true;
        let b = encode_header(&h).unwrap();
        assert_eq!(
            u32::from_le_bytes(b[76..80].try_into().unwrap()),
            HDR_FLAG_APP
        );
        assert!(parse_header(&b).unwrap().0.app_consistent);
        // Another bit, with a correct header checksum: still refused.
        let mut bad = b.clone();
        bad[76] = 0b11;
        let n = bad.len() - HEADER_SUM_LEN;
        let sum = xxhash_rust::xxh3::xxh3_64(&bad[..n]);
        bad[n..].copy_from_slice(&sum.to_le_bytes());
        match parse_header(&bad) {
            Err(ParseError::Bad { at: 76, what }) => assert!(what.contains("flags"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_rejects_bad_fields() {
        let mut h = header();
        h.cycle = h.base_cycle;
        assert!(encode_header(&h).is_err());
        let mut h = header();
        h.block_size = 3000;
        assert!(encode_header(&h).is_err());
        let mut h = header();
        h.disk_name.clear();
        assert!(encode_header(&h).is_err());
        let mut b = encode_header(&header()).unwrap();
        b[8] = 2; // version
        assert!(matches!(
            parse_header(&b),
            Err(ParseError::Bad { at: 8, .. })
        ));
        let mut b = encode_header(&header()).unwrap();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_header(&b),
            Err(ParseError::Bad { at: 12, .. })
        ));
    }

    #[test]
    fn frames() {
        let payload = b"hello world";
        let r = RecordHeader::new(Encoding::Raw, 4096, 11, payload);
        let enc = r.encode();
        assert_eq!(parse_frame(&enc).unwrap(), Frame::Record(r));
        let mut out = Vec::new();
        r.check_payload(payload, &mut out).unwrap();
        assert!(r.check_payload(b"hello worle", &mut out).is_err());
        let t = Trailer {
            record_count: 3,
            data_bytes: 99,
            log_hash: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
        };
        let te = t.encode();
        assert_eq!(parse_frame(&te).unwrap(), Frame::Trailer(t));
        assert_eq!(
            parse_frame(&te[..40]),
            Err(ParseError::Short { need: TRAILER_LEN })
        );
        // raw with a stored length different from the length
        let bad_raw = RecordHeader {
            stored_len: 10,
            ..r
        };
        assert!(parse_frame(&bad_raw.encode()).is_err());
        // zero-length and oversized records
        for length in [0, MAX_RECORD_LEN + 1] {
            let z = RecordHeader {
                encoding: Encoding::Zero,
                offset: 0,
                length,
                stored_len: 0,
                checksum: 0,
            };
            assert!(parse_frame(&z.encode()).is_err());
        }
    }

    #[test]
    fn lz4_garbage_with_valid_checksum_is_rejected() {
        let payload = [0xffu8; 40];
        let r = RecordHeader::new(Encoding::Lz4, 0, 4096, &payload);
        assert!(matches!(parse_frame(&r.encode()), Ok(Frame::Record(_))));
        let mut out = Vec::new();
        assert!(r.check_payload(&payload, &mut out).is_err());
        // a valid block that decodes to the wrong length
        let data = vec![0xabu8; 8192];
        let comp = lz4_flex::block::compress(&data);
        let r = RecordHeader::new(Encoding::Lz4, 0, 4096, &comp);
        assert!(r.check_payload(&comp, &mut out).is_err());
        let r = RecordHeader::new(Encoding::Lz4, 0, 8192, &comp);
        r.check_payload(&comp, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 10000]));
        let mut v = vec![0u8; 10000];
        v[9999] = 1;
        assert!(!is_all_zero(&v));
    }
}
