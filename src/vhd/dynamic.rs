//! Dynamic VHDs: the "cxsparse" dynamic disk header, the block allocation
//! table (BAT) and block I/O.
//!
//! Layout vdrep writes (offsets in bytes):
//!
//! ```text
//! 0            footer copy (512)
//! 512          dynamic header (1024), table offset = 1536
//! 1536         BAT: max_table_entries big-endian u32 sector numbers,
//!              0xFFFFFFFF = unallocated, padded to 512 bytes
//! ...          room for the BAT to grow: vdrep puts its first block
//!              after it (a hole, never read)
//! next_free    data blocks: sector bitmap (padded to 512) + block data,
//!              placed so the block data is 4 KiB aligned
//! end - 512    footer, always right after the last block (or the BAT)
//! ```
//!
//! The trailing footer always sits at the end of the last block or, with
//! no block, of the BAT, and nothing follows it: QEMU puts a new block where
//! it computes that end to be and relies on the file reading as zeros
//! beyond it (it writes only the bitmap and the guest's data of a new
//! block). A new empty disk is therefore `footer copy + header + BAT +
//! footer`, like one `qemu-img create` makes. Blocks orphaned by a crash
//! (written, BAT not yet updated) are cut off when the image is next
//! opened writable.
//!
//! The parsers here ([`DynHeader::parse`], [`parse_bat`], [`check_layout`])
//! are sans-IO, never panic and bound every allocation by the caps below
//! and by the length of the input before allocating.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::footer::{be32, be64, checksum, Footer, FormatError, FOOTER_SIZE, MAX_PARSE_SIZE};
use super::VhdError;

/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// Dynamic header cookie.
pub const HEADER_COOKIE: [u8; 8] = *b"cxsparse";
/// Header version written and read (major 1).
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Block size of the disks vdrep creates (the spec's default).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest block size accepted (keeps one block in memory bounded).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest BAT accepted (64 MiB of memory).
pub const MAX_BAT_ENTRIES: u32 = 1 << 24;
/// BAT value of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;
/// Table offset vdrep writes (right after footer copy and header).
pub const TABLE_OFFSET: u64 = 1536;
/// vdrep reserves BAT room for growth to at least this size (sparse).
const MIN_BAT_ROOM_SIZE: u64 = 64 << 30;
/// Block data alignment for blocks vdrep allocates.
const DATA_ALIGN: u64 = 4096;

const CHECKSUM_FIELD: std::ops::Range<usize> = 36..40;

/// The dynamic disk header (spec "Dynamic Disk Header Format"). Parent
/// fields are only meaningful for differencing disks, which vdrep does not
/// open; they are written as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// Unused, 0xFFFFFFFFFFFFFFFF.
    pub data_offset: u64,
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    /// As stored (parse) or as computed by [`DynHeader::encode`].
    pub checksum: u32,
}

impl DynHeader {
    pub fn new(max_table_entries: u32, block_size: u32) -> DynHeader {
        DynHeader {
            data_offset: u64::MAX,
            table_offset: TABLE_OFFSET,
            header_version: HEADER_VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&HEADER_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        let sum = checksum(&b, CHECKSUM_FIELD);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parse and validate a header from the first 1024 bytes of `b`: cookie,
    /// checksum, version 1.x, block size a power of two in 512..=256 MiB,
    /// at most [`MAX_BAT_ENTRIES`] entries.
    pub fn parse(b: &[u8]) -> Result<DynHeader, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::new(
                0,
                format!("dynamic header needs {HEADER_SIZE} bytes, have {}", b.len()),
            ));
        }
        let b = &b[..HEADER_SIZE];
        if b[0..8] != HEADER_COOKIE {
            return Err(FormatError::new(0, "no \"cxsparse\" dynamic header cookie"));
        }
        let stored = be32(b, 36);
        let computed = checksum(b, CHECKSUM_FIELD);
        if stored != computed {
            return Err(FormatError::new(
                36,
                format!(
                    "dynamic header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                ),
            ));
        }
        let h = DynHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: stored,
        };
        if h.header_version >> 16 != 1 {
            return Err(FormatError::new(
                24,
                format!(
                    "unsupported dynamic header version {:#010x}",
                    h.header_version
                ),
            ));
        }
        if !h.block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&h.block_size) {
            return Err(FormatError::new(
                32,
                format!(
                    "block size {} is not a power of two in 512..={MAX_BLOCK_SIZE}",
                    h.block_size
                ),
            ));
        }
        if h.max_table_entries > MAX_BAT_ENTRIES {
            return Err(FormatError::new(
                28,
                format!(
                    "{} BAT entries is more than the {MAX_BAT_ENTRIES} supported",
                    h.max_table_entries
                ),
            ));
        }
        if h.table_offset > MAX_PARSE_SIZE {
            return Err(FormatError::new(
                16,
                format!("table offset {} is implausibly large", h.table_offset),
            ));
        }
        Ok(h)
    }

    /// Bytes of the sector bitmap in front of each block (one bit per
    /// sector, padded to a whole sector).
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// Bytes the BAT occupies on disk (padded to a whole sector).
    pub fn bat_bytes(&self) -> u64 {
        round_up(u64::from(self.max_table_entries) * 4, 512)
    }
}

fn bitmap_size(block_size: u32) -> u64 {
    round_up(u64::from(block_size) / 512 / 8, 512).max(512)
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Decode `entries` big-endian BAT entries from `b`. Checks the length
/// before allocating.
pub fn parse_bat(b: &[u8], entries: u32) -> Result<Vec<u32>, FormatError> {
    if entries > MAX_BAT_ENTRIES {
        return Err(FormatError::new(
            0,
            format!("{entries} BAT entries is too many"),
        ));
    }
    let need = entries as usize * 4;
    if b.len() < need {
        return Err(FormatError::new(
            b.len() as u64,
            format!(
                "BAT of {entries} entries needs {need} bytes, have {}",
                b.len()
            ),
        ));
    }
    Ok(b[..need]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Check that header, BAT and blocks fit together in a file of `file_len`
/// bytes: header and BAT inside the file, the BAT covers the disk's current
/// size, every allocated block lies inside the file (before the trailing
/// footer when there is one), overlaps no metadata and no other block.
/// Returns the offset where the next block may go.
pub fn check_layout(
    footer: &Footer,
    header: &DynHeader,
    bat: &[u32],
    file_len: u64,
    trailing_footer: bool,
) -> Result<u64, FormatError> {
    let bs = u64::from(header.block_size);
    let needed = footer.current_size.div_ceil(bs);
    if u64::from(header.max_table_entries) < needed {
        return Err(FormatError::new(
            footer.data_offset.saturating_add(28),
            format!(
                "BAT has {} entries but the disk of {} bytes needs {needed}",
                header.max_table_entries, footer.current_size
            ),
        ));
    }
    if bat.len() != header.max_table_entries as usize {
        return Err(FormatError::new(
            header.table_offset,
            "BAT length does not match the header",
        ));
    }
    let limit = if trailing_footer {
        file_len.saturating_sub(FOOTER_SIZE as u64)
    } else {
        file_len
    };
    let hdr = (
        footer.data_offset,
        footer.data_offset.saturating_add(HEADER_SIZE as u64),
    );
    let table = (
        header.table_offset,
        header.table_offset.saturating_add(header.bat_bytes()),
    );
    for (name, (s, e)) in [("dynamic header", hdr), ("BAT", table)] {
        if s < FOOTER_SIZE as u64 || e > limit {
            return Err(FormatError::new(
                s,
                format!("{name} at {s}..{e} is outside the file's data area 512..{limit}"),
            ));
        }
    }
    if hdr.0 < table.1 && table.0 < hdr.1 {
        return Err(FormatError::new(table.0, "BAT overlaps the dynamic header"));
    }
    let total = header.bitmap_size() + bs;
    let mut starts: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let s = u64::from(e) * 512;
        let end = s + total;
        if s < FOOTER_SIZE as u64
            || end > limit
            || (s < hdr.1 && hdr.0 < end)
            || (s < table.1 && table.0 < end)
        {
            return Err(FormatError::new(
                table.0 + i as u64 * 4,
                format!(
                    "BAT entry {i} points at bytes {s}..{end}, which overlap metadata or lie beyond the data area (ends at {limit})"
                ),
            ));
        }
        starts.push((s, i));
    }
    starts.sort_unstable();
    let mut next_free = hdr.1.max(table.1);
    for w in starts.windows(2) {
        if w[0].0 + total > w[1].0 {
            return Err(FormatError::new(
                table.0 + w[1].1 as u64 * 4,
                format!("BAT entries {} and {} overlap", w[0].1, w[1].1),
            ));
        }
    }
    if let Some(&(s, _)) = starts.last() {
        next_free = next_free.max(s + total);
    }
    Ok(next_free)
}

const STATE_UNKNOWN: u8 = 0;
const STATE_FULL: u8 = 1;
const STATE_PARTIAL: u8 = 2;

/// An open dynamic VHD's in-memory state.
pub(crate) struct Dynamic {
    pub(crate) header: DynHeader,
    header_offset: u64,
    bat: Vec<u32>,
    /// BAT entries changed in memory and not yet written: `[lo, hi)`.
    dirty: Option<(usize, usize)>,
    /// Where the next block goes; the trailing footer belongs here.
    next_free: u64,
    file_len: u64,
    bitmap_size: u64,
    block_size: u64,
    /// Per block: is its sector bitmap all ones (unknown / full / partial)?
    bitmap_state: Vec<AtomicU8>,
    /// Footer copy and header must be rewritten (resize).
    meta_dirty: bool,
    /// The first block vdrep allocates goes at or after this offset, so
    /// the BAT can grow in place.
    room_end: u64,
    /// Some block is (or was, since open) allocated.
    has_blocks: bool,
}

/// End of the room vdrep leaves for the BAT to grow: enough entries for
/// 16x the disk's size, at least 64 GiB, at most 2040 GiB.
fn bat_room_end(table_offset: u64, size: u64, block_size: u32) -> u64 {
    let room_size = size
        .saturating_mul(16)
        .clamp(MIN_BAT_ROOM_SIZE, super::footer::MAX_VIRTUAL_SIZE);
    let entries = room_size
        .div_ceil(u64::from(block_size))
        .min(u64::from(MAX_BAT_ENTRIES));
    table_offset.saturating_add(round_up(entries * 4, 512))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VhdError + '_ {
    move |e| VhdError::io(path, e)
}

fn corrupt(path: &Path, base: u64, e: FormatError) -> VhdError {
    VhdError::corrupt(path, base.saturating_add(e.offset), e.what)
}

impl Dynamic {
    /// Write the metadata of a new, empty dynamic disk to `file` (empty).
    pub(crate) fn create(file: &File, path: &Path, footer: &Footer) -> Result<Dynamic, VhdError> {
        let bs = u64::from(DEFAULT_BLOCK_SIZE);
        let entries = footer.current_size.div_ceil(bs);
        let entries =
            u32::try_from(entries).map_err(|_| VhdError::invalid(path, "disk too large"))?;
        let header = DynHeader::new(entries, DEFAULT_BLOCK_SIZE);
        let bat_end = TABLE_OFFSET + header.bat_bytes();
        let next_free = bat_end;
        let mut head = Vec::with_capacity(bat_end as usize);
        head.extend_from_slice(&footer.encode());
        head.extend_from_slice(&header.encode());
        head.resize(bat_end as usize, 0xff);
        file.write_all_at(&head, 0).map_err(io_err(path))?;
        file.write_all_at(&footer.encode(), next_free)
            .map_err(io_err(path))?;
        Ok(Dynamic {
            header_offset: FOOTER_SIZE as u64,
            room_end: bat_room_end(TABLE_OFFSET, footer.current_size, DEFAULT_BLOCK_SIZE),
            has_blocks: false,
            bat: vec![UNALLOCATED; entries as usize],
            bitmap_state: (0..entries).map(|_| AtomicU8::new(STATE_FULL)).collect(),
            dirty: None,
            next_free,
            file_len: next_free + FOOTER_SIZE as u64,
            bitmap_size: header.bitmap_size(),
            block_size: bs,
            header,
            meta_dirty: false,
        })
    }

    /// Read and validate header and BAT of an existing disk.
    pub(crate) fn open(
        file: &File,
        path: &Path,
        footer: &Footer,
        file_len: u64,
        trailing_footer: bool,
    ) -> Result<Dynamic, VhdError> {
        let off = footer.data_offset;
        if off
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > file_len)
        {
            return Err(VhdError::corrupt(
                path,
                48,
                format!("footer's data offset {off} leaves no room for a dynamic header in a file of {file_len} bytes"),
            ));
        }
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, off).map_err(io_err(path))?;
        let header = DynHeader::parse(&hb).map_err(|e| corrupt(path, off, e))?;
        // Bound the BAT by the file before allocating for it.
        let bat_len = u64::from(header.max_table_entries) * 4;
        if header.table_offset.saturating_add(bat_len) > file_len {
            return Err(VhdError::corrupt(
                path,
                off + 16,
                format!(
                    "BAT of {} entries at {} runs past the end of the file ({file_len} bytes)",
                    header.max_table_entries, header.table_offset
                ),
            ));
        }
        let mut raw = vec![0u8; bat_len as usize];
        file.read_exact_at(&mut raw, header.table_offset)
            .map_err(io_err(path))?;
        let bat = parse_bat(&raw, header.max_table_entries)
            .map_err(|e| corrupt(path, header.table_offset, e))?;
        let next_free = check_layout(footer, &header, &bat, file_len, trailing_footer)
            .map_err(|e| corrupt(path, 0, e))?;
        Ok(Dynamic {
            header_offset: off,
            room_end: bat_room_end(header.table_offset, footer.current_size, header.block_size),
            has_blocks: bat.iter().any(|&e| e != UNALLOCATED),
            bitmap_state: bat.iter().map(|_| AtomicU8::new(STATE_UNKNOWN)).collect(),
            bat,
            dirty: None,
            next_free,
            file_len,
            bitmap_size: header.bitmap_size(),
            block_size: u64::from(header.block_size),
            header,
            meta_dirty: !trailing_footer,
        })
    }

    /// Virtual ranges `(offset, len)` of allocated blocks, merged, clipped to
    /// `size`.
    pub(crate) fn allocated_ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let blocks = size.div_ceil(self.block_size) as usize;
        for (i, &e) in self.bat.iter().take(blocks).enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let s = i as u64 * self.block_size;
            let len = self.block_size.min(size - s);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += len,
                _ => out.push((s, len)),
            }
        }
        out
    }

    fn block_data(&self, entry: u32) -> u64 {
        u64::from(entry) * 512 + self.bitmap_size
    }

    fn read_bitmap(&self, file: &File, path: &Path, entry: u32) -> Result<Vec<u8>, VhdError> {
        let mut bm = vec![0u8; self.bitmap_size as usize];
        file.read_exact_at(&mut bm, u64::from(entry) * 512)
            .map_err(io_err(path))?;
        Ok(bm)
    }

    /// Is every sector of block `idx` marked present in its bitmap?
    fn is_full(&self, file: &File, path: &Path, idx: usize, entry: u32) -> Result<bool, VhdError> {
        match self.bitmap_state[idx].load(Ordering::Relaxed) {
            STATE_FULL => return Ok(true),
            STATE_PARTIAL => return Ok(false),
            _ => {}
        }
        let bm = self.read_bitmap(file, path, entry)?;
        let sectors = (self.block_size / 512) as usize;
        let full = bm[..sectors / 8].iter().all(|&b| b == 0xff)
            && (0..sectors % 8).all(|k| bit(&bm, sectors / 8 * 8 + k));
        self.bitmap_state[idx].store(
            if full { STATE_FULL } else { STATE_PARTIAL },
            Ordering::Relaxed,
        );
        Ok(full)
    }

    pub(crate) fn read(
        &self,
        file: &File,
        path: &Path,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), VhdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = (pos / self.block_size) as usize;
            let within = pos % self.block_size;
            let n = (self.block_size - within).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            match self.bat.get(idx) {
                Some(&e) if e != UNALLOCATED => self.read_block(file, path, idx, e, within, out)?,
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn read_block(
        &self,
        file: &File,
        path: &Path,
        idx: usize,
        entry: u32,
        within: u64,
        out: &mut [u8],
    ) -> Result<(), VhdError> {
        let data = self.block_data(entry);
        if self.is_full(file, path, idx, entry)? {
            return file.read_exact_at(out, data + within).map_err(io_err(path));
        }
        // Sectors whose bitmap bit is clear read as zeros (spec: the bit
        // says whether the sector holds data).
        let bm = self.read_bitmap(file, path, entry)?;
        let present = |i: usize| bit(&bm, ((within + i as u64) / 512) as usize);
        let mut i = 0usize;
        while i < out.len() {
            let p = present(i);
            let first_end = (512 - (within + i as u64) % 512) as usize;
            let mut j = (i + first_end).min(out.len());
            while j < out.len() && present(j) == p {
                j = (j + 512).min(out.len());
            }
            if p {
                file.read_exact_at(&mut out[i..j], data + within + i as u64)
                    .map_err(io_err(path))?;
            } else {
                out[i..j].fill(0);
            }
            i = j;
        }
        Ok(())
    }

    /// Make block `idx`'s bitmap all ones, first writing zeros into the
    /// sectors that were not present so the block reads the same after.
    fn make_full(&self, file: &File, path: &Path, idx: usize, entry: u32) -> Result<(), VhdError> {
        if self.is_full(file, path, idx, entry)? {
            return Ok(());
        }
        let chunk = self.block_size.min(1 << 20);
        let mut buf = vec![0u8; chunk as usize];
        let mut k = 0;
        while k < self.block_size {
            self.read_block(file, path, idx, entry, k, &mut buf)?;
            file.write_all_at(&buf, self.block_data(entry) + k)
                .map_err(io_err(path))?;
            k += chunk;
        }
        file.sync_data().map_err(io_err(path))?;
        file.write_all_at(
            &vec![0xffu8; self.bitmap_size as usize],
            u64::from(entry) * 512,
        )
        .map_err(io_err(path))?;
        self.bitmap_state[idx].store(STATE_FULL, Ordering::Relaxed);
        Ok(())
    }

    /// Write `data` at virtual `offset` (caller checked bounds). `zero`
    /// means "write zeros" and `data` is ignored (it may be shorter).
    pub(crate) fn write(
        &mut self,
        file: &File,
        path: &Path,
        footer: &Footer,
        data: &[u8],
        offset: u64,
    ) -> Result<(), VhdError> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = (pos / self.block_size) as usize;
            let within = pos % self.block_size;
            let n = (self.block_size - within).min((data.len() - done) as u64) as usize;
            let piece = &data[done..done + n];
            match self.bat.get(idx).copied() {
                None => {
                    return Err(VhdError::invalid(
                        path,
                        format!("block {idx} is beyond the BAT"),
                    ));
                }
                Some(UNALLOCATED) => {
                    if piece.iter().any(|&b| b != 0) {
                        self.allocate(file, path, footer, idx, within, piece)?;
                    }
                }
                Some(e) => {
                    self.make_full(file, path, idx, e)?;
                    file.write_all_at(piece, self.block_data(e) + within)
                        .map_err(io_err(path))?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Zero `len` bytes at `offset`: unallocated blocks stay unallocated.
    pub(crate) fn write_zeroes(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), VhdError> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = (pos / self.block_size) as usize;
            let within = pos % self.block_size;
            let n = (self.block_size - within).min(end - pos);
            if let Some(&e) = self.bat.get(idx) {
                if e != UNALLOCATED {
                    self.make_full(file, path, idx, e)?;
                    write_zeros_at(file, path, self.block_data(e) + within, n)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn allocate(
        &mut self,
        file: &File,
        path: &Path,
        footer: &Footer,
        idx: usize,
        within: u64,
        piece: &[u8],
    ) -> Result<(), VhdError> {
        let total = self.bitmap_size + self.block_size;
        let mut pos = self.next_free;
        if !self.has_blocks {
            pos = pos.max(self.room_end);
        }
        if self.block_size >= DATA_ALIGN {
            pos = round_up(pos + self.bitmap_size, DATA_ALIGN) - self.bitmap_size;
        }
        let sector = u32::try_from(pos / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                VhdError::invalid(
                    path,
                    format!("no room for block {idx}: offset {pos} is beyond what a BAT entry can address"),
                )
            })?;
        // Bitmap: every sector present (as QEMU writes it).
        file.write_all_at(&vec![0xffu8; self.bitmap_size as usize], pos)
            .map_err(io_err(path))?;
        // Bytes of the new block that lie below the current end of file may
        // hold stale data (old footer, blocks orphaned by a crash): zero
        // them. Beyond the end of file the block is a hole that reads as
        // zeros once the footer after it extends the file.
        let data = pos + self.bitmap_size;
        let stale_end = self.file_len.min(pos + total);
        if stale_end > data {
            write_zeros_at(file, path, data, stale_end - data)?;
        }
        file.write_all_at(piece, data + within)
            .map_err(io_err(path))?;
        file.write_all_at(&footer.encode(), pos + total)
            .map_err(io_err(path))?;
        self.next_free = pos + total;
        self.file_len = self.file_len.max(self.next_free + FOOTER_SIZE as u64);
        self.bat[idx] = sector;
        self.has_blocks = true;
        self.bitmap_state[idx].store(STATE_FULL, Ordering::Relaxed);
        self.mark_dirty(idx, idx + 1);
        Ok(())
    }

    fn mark_dirty(&mut self, lo: usize, hi: usize) {
        self.dirty = Some(match self.dirty {
            None => (lo, hi),
            Some((a, b)) => (a.min(lo), b.max(hi)),
        });
    }

    /// Make everything durable: data first, then BAT entries, then (after
    /// another sync when the header changes) header and footers.
    pub(crate) fn flush(
        &mut self,
        file: &File,
        path: &Path,
        footer: &Footer,
    ) -> Result<(), VhdError> {
        let tail_ok = self.file_len == self.next_free + FOOTER_SIZE as u64;
        file.sync_data().map_err(io_err(path))?;
        if self.dirty.is_none() && !self.meta_dirty && tail_ok {
            return Ok(());
        }
        if let Some((lo, hi)) = self.dirty {
            // Whole sectors of the BAT covering the dirty entries.
            let lo = lo / 128 * 128;
            let hi = (hi.div_ceil(128) * 128).min(self.bat.len());
            let mut b = Vec::with_capacity((hi - lo) * 4);
            for e in &self.bat[lo..hi] {
                b.extend_from_slice(&e.to_be_bytes());
            }
            if hi == self.bat.len() {
                // Padding of the last BAT sector: unallocated, as created.
                b.resize(round_up(b.len() as u64, 512) as usize, 0xff);
            }
            file.write_all_at(&b, self.header.table_offset + lo as u64 * 4)
                .map_err(io_err(path))?;
        }
        if self.meta_dirty {
            // The BAT the new header describes must be on disk first.
            file.sync_data().map_err(io_err(path))?;
            file.write_all_at(&self.header.encode(), self.header_offset)
                .map_err(io_err(path))?;
            file.write_all_at(&footer.encode(), 0)
                .map_err(io_err(path))?;
        }
        file.write_all_at(&footer.encode(), self.next_free)
            .map_err(io_err(path))?;
        let want_len = self.next_free + FOOTER_SIZE as u64;
        if self.file_len != want_len {
            file.set_len(want_len).map_err(io_err(path))?;
            self.file_len = want_len;
            file.sync_all().map_err(io_err(path))?;
        } else {
            file.sync_data().map_err(io_err(path))?;
        }
        self.dirty = None;
        self.meta_dirty = false;
        Ok(())
    }

    /// Have the next flush rewrite header and footer copy (repair).
    pub(crate) fn mark_meta_dirty(&mut self) {
        self.meta_dirty = true;
    }

    pub(crate) fn needs_flush(&self) -> bool {
        self.dirty.is_some()
            || self.meta_dirty
            || self.file_len != self.next_free + FOOTER_SIZE as u64
    }

    /// Change the disk's size to `new_size` (footer already updated by the
    /// caller afterwards). Grows the BAT into free room after it, or fails.
    pub(crate) fn resize(
        &mut self,
        file: &File,
        path: &Path,
        old_size: u64,
        new_size: u64,
    ) -> Result<(), VhdError> {
        let bs = self.block_size;
        let needed = new_size.div_ceil(bs);
        let needed_u32 = u32::try_from(needed)
            .ok()
            .filter(|&n| n <= MAX_BAT_ENTRIES)
            .ok_or_else(|| VhdError::invalid(path, "new size needs too many BAT entries"))?;
        if new_size < old_size {
            // Zero the tail of a partial last block so a later grow reads
            // zeros there.
            if new_size % bs != 0 {
                let block_end = (new_size / bs + 1) * bs;
                self.write_zeroes(file, path, new_size, block_end.min(old_size) - new_size)?;
            }
            let old_len = self.bat.len();
            for e in &mut self.bat[needed as usize..] {
                *e = UNALLOCATED;
            }
            if needed as usize != old_len {
                self.mark_dirty(needed as usize, old_len);
            }
            // Write the cut entries as unallocated, then shrink the table.
            self.flush_bat_only(file, path)?;
            self.bat.truncate(needed as usize);
            self.bitmap_state.truncate(needed as usize);
            self.header.max_table_entries = needed_u32;
        } else if needed > self.bat.len() as u64 {
            let first_block = self
                .bat
                .iter()
                .filter(|&&e| e != UNALLOCATED)
                .map(|&e| u64::from(e) * 512)
                .min()
                .unwrap_or(u64::MAX);
            // Nor may the BAT run into a dynamic header placed after it.
            let limit = if self.header_offset > self.header.table_offset {
                first_block.min(self.header_offset)
            } else {
                first_block
            };
            let room = (limit.saturating_sub(self.header.table_offset) / 4)
                .min(u64::from(MAX_BAT_ENTRIES));
            if needed > room {
                return Err(VhdError::invalid(
                    path,
                    format!(
                        "cannot grow to {new_size} bytes: the BAT needs {needed} entries but there is room for {room} before the first data block; \
                         create a new VHD of the new size and copy the data (e.g. qemu-img convert)"
                    ),
                ));
            }
            let old_len = self.bat.len();
            self.bat.resize(needed as usize, UNALLOCATED);
            self.bitmap_state
                .extend((old_len..needed as usize).map(|_| AtomicU8::new(STATE_FULL)));
            self.mark_dirty(old_len, needed as usize);
            self.header.max_table_entries = needed_u32;
            let bat_end = self.header.table_offset + self.header.bat_bytes();
            self.next_free = self.next_free.max(bat_end);
        }
        self.meta_dirty = true;
        Ok(())
    }

    fn flush_bat_only(&mut self, file: &File, path: &Path) -> Result<(), VhdError> {
        if let Some((lo, hi)) = self.dirty.take() {
            file.sync_data().map_err(io_err(path))?;
            let mut b = Vec::with_capacity((hi - lo) * 4);
            for e in &self.bat[lo..hi] {
                b.extend_from_slice(&e.to_be_bytes());
            }
            file.write_all_at(&b, self.header.table_offset + lo as u64 * 4)
                .map_err(io_err(path))?;
            file.sync_data().map_err(io_err(path))?;
        }
        Ok(())
    }
}

/// Write `len` zero bytes at `offset`, 1 MiB at a time.
fn write_zeros_at(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), VhdError> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut k = 0;
    while k < len {
        let m = (len - k).min(zeros.len() as u64);
        file.write_all_at(&zeros[..m as usize], offset + k)
            .map_err(io_err(path))?;
        k += m;
    }
    Ok(())
}

/// Bit `i` of a sector bitmap (most significant bit of byte 0 is sector 0).
fn bit(bm: &[u8], i: usize) -> bool {
    bm.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::super::footer::{Footer, DISK_TYPE_DYNAMIC};
    use super::*;

    #[test]
    fn header_round_trip_and_corruption() {
        let h = DynHeader::new(6, DEFAULT_BLOCK_SIZE);
        let b = h.encode();
        let mut p = DynHeader::parse(&b).unwrap();
        p.checksum = 0;
        assert_eq!(p, h);
        assert_eq!(&b[0..8], b"cxsparse");
        assert_eq!(be64(&b, 16), 1536);
        assert_eq!(be32(&b, 32), 2 << 20);
        for i in 0..HEADER_SIZE {
            let mut c = b;
            c[i] ^= 0x01;
            assert!(DynHeader::parse(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn header_rejects_bad_fields() {
        for bs in [0u32, 511, 3 << 20, 1 << 31, 768] {
            assert!(
                DynHeader::parse(&DynHeader::new(1, bs).encode()).is_err(),
                "{bs}"
            );
        }
        assert!(DynHeader::parse(&DynHeader::new(MAX_BAT_ENTRIES + 1, 512).encode()).is_err());
        assert!(DynHeader::parse(&[0u8; 100]).is_err());
        assert_eq!(DynHeader::new(1, 512).bitmap_size(), 512);
        assert_eq!(DynHeader::new(1, 2 << 20).bitmap_size(), 512);
        assert_eq!(DynHeader::new(1, 16 << 20).bitmap_size(), 4096);
    }

    #[test]
    fn bat_parse() {
        let raw = [0xff, 0xff, 0xff, 0xff, 0, 0, 0x10, 0x07, 0, 0, 0, 9];
        assert_eq!(parse_bat(&raw, 3).unwrap(), vec![UNALLOCATED, 0x1007, 9]);
        assert_eq!(parse_bat(&raw, 0).unwrap(), Vec::<u32>::new());
        assert!(parse_bat(&raw, 4).is_err());
        assert!(parse_bat(&raw, u32::MAX).is_err());
    }

    /// A hand-built 6 MiB dynamic image: footer copy, header at 512, BAT at
    /// 1536 (3 entries), one block (bitmap 512 + 2 MiB) at 2048, footer.
    fn fixture_parts() -> (Footer, DynHeader, u64) {
        let f = Footer::new(DISK_TYPE_DYNAMIC, 6 << 20, 0, [1; 16]);
        let h = DynHeader::new(3, DEFAULT_BLOCK_SIZE);
        (f, h, 2048 + 512 + (2 << 20) + 512)
    }

    #[test]
    fn layout_checks() {
        let (f, h, len) = fixture_parts();
        let ok = [UNALLOCATED, 4, UNALLOCATED];
        assert_eq!(check_layout(&f, &h, &ok, len, true).unwrap(), len - 512);
        // Block overlapping the BAT / the header / footer copy.
        for bad in [3u32, 1, 0] {
            assert!(check_layout(&f, &h, &[bad, UNALLOCATED, UNALLOCATED], len, true).is_err());
        }
        // Block running into the trailing footer.
        assert!(check_layout(&f, &h, &[5, UNALLOCATED, UNALLOCATED], len, true).is_err());
        // Two entries sharing a block.
        assert!(check_layout(&f, &h, &[4, 4, UNALLOCATED], len * 2, true).is_err());
        // BAT too small for the disk.
        let small = DynHeader::new(2, DEFAULT_BLOCK_SIZE);
        assert!(check_layout(&f, &small, &[4, UNALLOCATED], len, true).is_err());
        // Truncated file.
        assert!(check_layout(&f, &h, &ok, len - 1024, true).is_err());
        assert!(check_layout(&f, &h, &ok, 1000, false).is_err());
    }

    #[test]
    fn bitmap_bit_order() {
        let bm = [0x80u8, 0x01];
        assert!(bit(&bm, 0));
        assert!(!bit(&bm, 1));
        assert!(bit(&bm, 15));
        assert!(!bit(&bm, 16));
    }
}
