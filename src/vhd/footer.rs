//! Sans-IO encoding and parsing of the VHD hard disk footer (512 bytes,
//! big-endian), its checksum and the CHS geometry algorithm.
//!
//! Parsers work on byte slices, never panic and never allocate from a length
//! read out of the data. Offsets in [`FormatError`] are relative to the slice.

use std::ops::Range;

/// Size of the footer (and of its copy at offset 0 in dynamic disks).
pub const FOOTER_SIZE: usize = 512;
/// Footer cookie.
pub const COOKIE: [u8; 8] = *b"conectix";
/// "Features": bit 1 is reserved and must always be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// File format version written and read (major 1, minor 0).
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Disk type codes.
pub const DISK_TYPE_FIXED: u32 = 2;
pub const DISK_TYPE_DYNAMIC: u32 = 3;
pub const DISK_TYPE_DIFFERENCING: u32 = 4;
/// Creator application written by vdrep: `qem2`.
///
/// QEMU's vpc driver sizes some images by their CHS geometry (which the
/// spec's algorithm rounds down) instead of "current size", depending on
/// the creator application: QEMU >= 10.0 only for `vpc ` and `qemu`; older
/// QEMU for every creator except `win `, `qem2`, `d2v `, `CTXS`, `tap\0`.
/// Both use current size when the geometry is the maximum 65535/16/255.
/// `qem2` is what QEMU itself writes for images whose size is exactly
/// "current size" (`-o force_size=on`), so every QEMU version, Hyper-V and
/// Windows see the exact size. (A vdrep-specific code such as `vdrp` would
/// be mis-sized by QEMU < 10.)
pub const CREATOR_APP: [u8; 4] = *b"qem2";
/// Creator version written by vdrep (major << 16 | minor), vdrep 0.1.
pub const CREATOR_VERSION: u32 = 0x0000_0001;
/// Creator host OS written by vdrep: "Wi2k" (the value QEMU and Hyper-V use;
/// the spec defines no value for Linux).
pub const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// VHD time stamps count seconds from 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;
/// Largest number of sectors CHS geometry can describe (65535 * 16 * 255).
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest virtual size vdrep creates or resizes to: 2040 GiB, the limit of
/// the VHD format in Hyper-V and of dynamic disks in QEMU.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Largest current size accepted when parsing (sanity bound; keeps every
/// offset computation far from overflow).
pub const MAX_PARSE_SIZE: u64 = 1 << 50;

const CHECKSUM_FIELD: Range<usize> = 64..68;

/// A structural problem found by a parser, at `offset` within the slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub offset: u64,
    pub what: String,
}

impl FormatError {
    pub fn new(offset: u64, what: impl Into<String>) -> Self {
        FormatError {
            offset,
            what: what.into(),
        }
    }
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.what)
    }
}

/// One's complement of the byte sum of `bytes`, skipping `skip` (the
/// checksum field itself), as the spec defines for footer and header.
pub fn checksum(bytes: &[u8], skip: Range<usize>) -> u32 {
    let mut sum: u32 = 0;
    for (i, b) in bytes.iter().enumerate() {
        if !skip.contains(&i) {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Cylinders / heads / sectors per track, as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The geometry the spec's algorithm (appendix "CHS calculation")
    /// assigns to a disk of `size` bytes (rounded down to whole sectors).
    /// Sizes beyond 65535*16*255 sectors get the maximum geometry.
    pub fn for_size(size: u64) -> Geometry {
        let total = (size / 512).min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024);
            if h < 4 {
                h = 4;
            }
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        let cylinders = cyl_times_heads / heads;
        Geometry {
            // All three fit by construction: cylinders <= 65535, heads <= 16,
            // spt <= 255.
            cylinders: u16::try_from(cylinders).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }

    /// Number of sectors the geometry describes.
    pub fn sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// Packed as in the footer: cylinders (u16 BE), heads, sectors.
    pub fn to_u32(self) -> u32 {
        (u32::from(self.cylinders) << 16)
            | (u32::from(self.heads) << 8)
            | u32::from(self.sectors_per_track)
    }

    pub fn from_u32(v: u32) -> Geometry {
        Geometry {
            cylinders: (v >> 16) as u16,
            heads: (v >> 8) as u8,
            sectors_per_track: v as u8,
        }
    }
}

/// The VHD footer (spec "Hard Disk Footer Format").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    /// Offset of the dynamic header; `u64::MAX` for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: u32,
    /// Checksum as stored (parse) or as computed by [`Footer::encode`].
    pub checksum: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

impl Footer {
    /// A footer as vdrep writes it for a new disk of `size` bytes.
    pub fn new(disk_type: u32, size: u64, timestamp: u32, unique_id: [u8; 16]) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            format_version: FILE_FORMAT_VERSION,
            data_offset: if disk_type == DISK_TYPE_FIXED {
                NO_DATA_OFFSET
            } else {
                FOOTER_SIZE as u64
            },
            timestamp,
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_host_os: CREATOR_HOST_OS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            checksum: 0,
            unique_id,
            saved_state: 0,
        }
    }

    /// Set a new current size (and its geometry), as a resize does.
    pub fn set_size(&mut self, size: u64) {
        self.current_size = size;
        self.geometry = Geometry::for_size(size);
    }

    /// The 512 bytes of the footer, with a freshly computed checksum.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(&COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..60].copy_from_slice(&self.geometry.to_u32().to_be_bytes());
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, CHECKSUM_FIELD);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// True when `b` starts with the footer cookie (a VHD footer, valid or
    /// not).
    pub fn has_cookie(b: &[u8]) -> bool {
        b.len() >= 8 && b[0..8] == COOKIE
    }

    /// Parse and validate a footer from the first 512 bytes of `b`: cookie,
    /// checksum, format version 1.x, a known disk type, a current size that
    /// is a whole number of sectors.
    pub fn parse(b: &[u8]) -> Result<Footer, FormatError> {
        if b.len() < FOOTER_SIZE {
            return Err(FormatError::new(
                0,
                format!("footer needs {FOOTER_SIZE} bytes, have {}", b.len()),
            ));
        }
        let b = &b[..FOOTER_SIZE];
        if !Self::has_cookie(b) {
            return Err(FormatError::new(0, "no \"conectix\" footer cookie"));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, CHECKSUM_FIELD);
        if stored != computed {
            return Err(FormatError::new(
                64,
                format!(
                    "footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                ),
            ));
        }
        let f = Footer {
            features: be32(b, 8),
            format_version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: be32(b, 32),
            creator_host_os: [b[36], b[37], b[38], b[39]],
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry::from_u32(be32(b, 56)),
            disk_type: be32(b, 60),
            checksum: stored,
            unique_id: {
                let mut u = [0u8; 16];
                u.copy_from_slice(&b[68..84]);
                u
            },
            saved_state: b[84],
        };
        if f.format_version >> 16 != 1 {
            return Err(FormatError::new(
                12,
                format!("unsupported file format version {:#010x}", f.format_version),
            ));
        }
        if !matches!(
            f.disk_type,
            DISK_TYPE_FIXED | DISK_TYPE_DYNAMIC | DISK_TYPE_DIFFERENCING
        ) {
            return Err(FormatError::new(
                60,
                format!("unknown disk type {}", f.disk_type),
            ));
        }
        if f.current_size % 512 != 0 || f.current_size > MAX_PARSE_SIZE {
            return Err(FormatError::new(
                48,
                format!(
                    "current size {} is not a whole number of sectors below 2^50",
                    f.current_size
                ),
            ));
        }
        Ok(f)
    }

    /// The virtual size QEMU's `vpc` driver (10.x) shows for this footer:
    /// cylinders * heads * sectors * 512 for creator applications `vpc ` and
    /// `qemu` (unless the geometry is the maximum), otherwise `current_size`.
    pub fn qemu_visible_size(&self) -> u64 {
        let uses_chs = matches!(&self.creator_app, b"vpc " | b"qemu");
        if uses_chs && self.geometry.sectors() != MAX_CHS_SECTORS {
            self.geometry.sectors() * 512
        } else {
            self.current_size
        }
    }
}

/// The current time as a VHD time stamp (0 before 2000, saturating in 2136).
pub fn vhd_timestamp_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer::new(DISK_TYPE_DYNAMIC, 10 * 1024 * 1024 + 512, 12345, [7u8; 16])
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let b = f.encode();
        let mut g = Footer::parse(&b).unwrap();
        assert_eq!(g.checksum, be32(&b, 64));
        g.checksum = 0;
        assert_eq!(g, f);
        assert_eq!(g.encode(), b);
        assert_eq!(&b[28..32], b"qem2");
        assert_eq!(be64(&b, 16), 512);
        let fixed = Footer::new(DISK_TYPE_FIXED, 1 << 20, 0, [0; 16]);
        assert_eq!(be64(&fixed.encode(), 16), u64::MAX);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let b = sample().encode();
        for i in 0..FOOTER_SIZE {
            for delta in [1u8, 0x80, 0xff] {
                let mut c = b;
                c[i] ^= delta;
                assert!(
                    Footer::parse(&c).is_err(),
                    "byte {i} ^ {delta:#x} undetected"
                );
            }
        }
    }

    #[test]
    fn checksum_is_ones_complement_of_byte_sum() {
        let b = sample().encode();
        let sum: u32 = b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, v)| u32::from(*v))
            .sum();
        assert_eq!(be32(&b, 64), !sum);
    }

    #[test]
    fn geometry_known_values() {
        // Worked by hand from the spec's algorithm.
        let g = |c, h, s| Geometry {
            cylinders: c,
            heads: h,
            sectors_per_track: s,
        };
        // 20481 sectors: spt 17, cth 1204, heads 2 -> 4, cyl 301.
        assert_eq!(Geometry::for_size(10 * 1024 * 1024 + 512), g(301, 4, 17));
        // 20480 sectors: cth 1204 -> same.
        assert_eq!(Geometry::for_size(10 * 1024 * 1024), g(301, 4, 17));
        // 1 GiB = 2097152 sectors: 17 -> heads 121 > 16 -> 31: cth 67650
        // >= 16384 -> 63: cth 33288, cyl 2080.
        assert_eq!(Geometry::for_size(1 << 30), g(2080, 16, 63));
        // 127 GiB and beyond: 65535*16*63 <= sectors -> 255 spt.
        assert_eq!(Geometry::for_size(2040 << 30), g(65535, 16, 255));
        assert_eq!(Geometry::for_size(MAX_CHS_SECTORS * 512), g(65535, 16, 255));
        // 65535*16*63 sectors exactly: spt 255, cth 258777, cyl 16173.
        assert_eq!(Geometry::for_size(65535 * 16 * 63 * 512), g(16191, 16, 255));
        // One sector below: 63 spt, cth 1048559, cyl 65534.
        assert_eq!(
            Geometry::for_size((65535 * 16 * 63 - 1) * 512),
            g(65534, 16, 63)
        );
        // Tiny: 1 MiB = 2048 sectors: spt 17, cth 120, heads 4, cyl 30.
        assert_eq!(Geometry::for_size(1 << 20), g(30, 4, 17));
        // 100 MiB = 204800 sectors: 17 -> cth 12047, heads 12, 12047 < 12288
        // -> cyl 1003.
        assert_eq!(Geometry::for_size(100 << 20), g(1003, 12, 17));
        assert_eq!(Geometry::for_size(0), g(0, 4, 17));
        let x = g(2080, 16, 63);
        assert_eq!(Geometry::from_u32(x.to_u32()), x);
    }

    #[test]
    fn qemu_size_rule() {
        let mut f = Footer::new(DISK_TYPE_FIXED, 10 * 1024 * 1024 + 512, 0, [0; 16]);
        assert_eq!(f.qemu_visible_size(), 10 * 1024 * 1024 + 512);
        f.creator_app = *b"vpc ";
        assert_eq!(f.qemu_visible_size(), 301 * 4 * 17 * 512);
        f.creator_app = *b"qemu";
        assert_eq!(f.qemu_visible_size(), 301 * 4 * 17 * 512);
        f.geometry = Geometry::from_u32(0xffff_10ff);
        assert_eq!(f.qemu_visible_size(), 10 * 1024 * 1024 + 512);
    }

    #[test]
    fn short_and_garbage_inputs_are_errors() {
        assert!(Footer::parse(&[]).is_err());
        assert!(Footer::parse(&COOKIE).is_err());
        assert!(Footer::parse(&[0xffu8; 512]).is_err());
        let mut f = sample();
        f.disk_type = 9;
        assert!(Footer::parse(&f.encode()).is_err());
        let mut f = sample();
        f.current_size = 1000;
        assert!(Footer::parse(&f.encode()).is_err());
        let mut f = sample();
        f.format_version = 0x0002_0000;
        assert!(Footer::parse(&f.encode()).is_err());
    }
}
