//! Pre-image journal of a promoted disk, so that an uncommitted failover
//! can be **cancelled**: the disks go back to being the replica exactly as
//! they were, whatever the failed-over VM wrote meanwhile.
//!
//! A promotion arms the journal (`.vdrep/disks/<folder>/preimage`, written
//! by [`arm`] next to the seeded tracking state). While it exists, the
//! tracker saves the content of every block of the original size the first
//! time it changes (write, truncate, punch/zero/collapse/insert), makes the
//! saved copy durable (`fdatasync`), and only then lets the change reach
//! the disk. A block is saved once; later writes to it cost nothing. A
//! cancel ([`restore`]) writes the saved blocks back and cuts the file to
//! its original size; a commit deletes the journal.
//!
//! Format: a 32-byte header (`VDPREIMG`, version, block size, original
//! size), then records `offset u64, len u32, 0 u32, xxh3-64(data, seed =
//! offset) u64, data`. A torn or damaged tail ends the journal: its change
//! never reached the disk (the record is durable before the write).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"VDPREIMG";
const VERSION: u32 = 1;
const HEADER: u64 = 32;
const REC: u64 = 24;
/// Largest record payload.
const MAX_REC: u64 = 1 << 20;

/// File name of the journal in a disk's state folder.
pub const FILE: &str = "preimage";

fn header(block_size: u32, orig_size: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&block_size.to_le_bytes());
    h[16..24].copy_from_slice(&orig_size.to_le_bytes());
    h
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// (block size, original size) from a journal header.
fn parse_header(h: &[u8]) -> io::Result<(u32, u64)> {
    if h.len() < HEADER as usize || &h[..8] != MAGIC {
        return Err(bad("not a vdrep pre-image journal"));
    }
    let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if v != VERSION {
        return Err(bad(format!(
            "pre-image journal version {v} is not supported"
        )));
    }
    let bs = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&h[16..24]);
    Ok((bs, u64::from_le_bytes(o)))
}

/// Create the (empty) journal of a disk of `orig_size` bytes at `path`
/// (the disk's state folder must exist). Replaces an older journal.
pub fn arm(path: &Path, block_size: u32, orig_size: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let f = File::create(&tmp)?;
        f.write_all_at(&header(block_size, orig_size), 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// One valid record: (file offset of its payload, disk offset, length).
type RecPos = (u64, u64, u32);

/// Read the records of `f` (already checked header); stops at the first
/// torn or damaged one. Returns the records and where the valid part ends.
fn scan(f: &File) -> io::Result<(Vec<RecPos>, u64)> {
    let len = f.metadata()?.len();
    let mut at = HEADER;
    let mut v = Vec::new();
    let mut buf = Vec::new();
    while at + REC <= len {
        let mut h = [0u8; REC as usize];
        f.read_exact_at(&mut h, at)?;
        let mut o = [0u8; 8];
        o.copy_from_slice(&h[..8]);
        let off = u64::from_le_bytes(o);
        let n = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        o.copy_from_slice(&h[16..24]);
        let sum = u64::from_le_bytes(o);
        if n == 0 || u64::from(n) > MAX_REC || at + REC + u64::from(n) > len {
            break;
        }
        buf.resize(n as usize, 0);
        f.read_exact_at(&mut buf, at + REC)?;
        if xxhash_rust::xxh3::xxh3_64_with_seed(&buf, off) != sum {
            break;
        }
        v.push((at + REC, off, n));
        at += REC + u64::from(n);
    }
    Ok((v, at))
}

/// The armed journal of a tracked disk.
pub struct Journal {
    file: File,
    block_size: u64,
    orig_size: u64,
    /// Blocks (of the original size) already saved.
    saved: Vec<u64>,
    end: u64,
    /// Bytes of pre-images saved.
    pub bytes: u64,
}

impl Journal {
    /// Open the journal `file` (read-write) of a disk tracked with
    /// `block_size`; a torn tail is cut off.
    pub fn open(file: File, block_size: u64) -> io::Result<Journal> {
        let mut h = [0u8; HEADER as usize];
        (&file).read_exact(&mut h)?;
        let (bs, orig_size) = parse_header(&h)?;
        if u64::from(bs) != block_size {
            return Err(bad(format!(
                "pre-image journal block size {bs} differs from the mount's {block_size}"
            )));
        }
        let (recs, end) = scan(&file)?;
        if end < file.metadata()?.len() {
            file.set_len(end)?;
            file.sync_data()?;
        }
        let nblocks = orig_size.div_ceil(block_size);
        let mut j = Journal {
            file,
            block_size,
            orig_size,
            saved: vec![0; nblocks.div_ceil(64) as usize],
            end,
            bytes: 0,
        };
        for (_, off, n) in recs {
            let first = off / block_size;
            let last = (off + u64::from(n)).div_ceil(block_size);
            for b in first..last.min(nblocks) {
                j.set(b);
            }
            j.bytes += u64::from(n);
        }
        Ok(j)
    }

    fn get(&self, b: u64) -> bool {
        self.saved
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn set(&mut self, b: u64) {
        if let Some(w) = self.saved.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }

    fn clear(&mut self, b: u64) {
        if let Some(w) = self.saved.get_mut((b / 64) as usize) {
            *w &= !(1 << (b % 64));
        }
    }

    /// Save the current content (read through `reader`) of the blocks
    /// `first..=last` not saved yet, durably. Blocks past the original
    /// size need nothing (a cancel cuts them off).
    pub fn save(&mut self, reader: &File, first: u64, last: u64) -> io::Result<()> {
        let nblocks = self.orig_size.div_ceil(self.block_size);
        if first >= nblocks {
            return Ok(());
        }
        let last = last.min(nblocks - 1);
        let bs = self.block_size;
        let mut marked: Vec<(u64, u64)> = Vec::new();
        let mut b = first;
        while b <= last {
            if self.get(b) {
                b += 1;
                continue;
            }
            let mut e = b;
            while e < last && !self.get(e + 1) && (e + 2 - b) * bs <= MAX_REC {
                e += 1;
            }
            let off = b * bs;
            let n = ((e + 1) * bs).min(self.orig_size) - off;
            let mut buf = vec![0u8; n as usize];
            let got = super::read_full_at(reader, &mut buf, off)?;
            buf[got..].fill(0);
            let mut rec = Vec::with_capacity(REC as usize + buf.len());
            rec.extend_from_slice(&off.to_le_bytes());
            rec.extend_from_slice(&(n as u32).to_le_bytes());
            rec.extend_from_slice(&0u32.to_le_bytes());
            rec.extend_from_slice(&xxhash_rust::xxh3::xxh3_64_with_seed(&buf, off).to_le_bytes());
            rec.extend_from_slice(&buf);
            self.file.write_all_at(&rec, self.end)?;
            self.end += rec.len() as u64;
            self.bytes += n;
            for x in b..=e {
                self.set(x);
            }
            marked.push((b, e));
            b = e + 1;
        }
        if !marked.is_empty() {
            if let Err(err) = self.file.sync_data() {
                // Not durable: forget what this call saved, so that the
                // next change saves it again.
                for (b, e) in marked {
                    for x in b..=e {
                        self.clear(x);
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }
}

/// What [`restore`] did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    /// Bytes of pre-images written back.
    pub bytes: u64,
    /// The size the disk was cut (or grown) back to.
    pub size: u64,
}

/// Write the pre-images of the journal at `journal` back into the disk
/// file `disk` and give it its original size (the disk must not be in use).
pub fn restore(journal: &Path, disk: &Path) -> io::Result<Restored> {
    let j = File::open(journal)?;
    let mut h = [0u8; HEADER as usize];
    (&j).read_exact(&mut h)?;
    let (_, orig_size) = parse_header(&h)?;
    let (recs, _) = scan(&j)?;
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    if f.metadata()?.len() < orig_size {
        f.set_len(orig_size)?;
    }
    let mut buf = Vec::new();
    let mut bytes = 0;
    for (at, off, n) in recs {
        buf.resize(n as usize, 0);
        j.read_exact_at(&mut buf, at)?;
        f.write_all_at(&buf, off)?;
        bytes += u64::from(n);
    }
    f.set_len(orig_size)?;
    f.sync_all()?;
    Ok(Restored {
        bytes,
        size: orig_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal at `jp` (4 KiB blocks), opened as the mount opens it.
    fn reopen(jp: &Path) -> Journal {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(jp)
            .unwrap();
        Journal::open(f, 4096).unwrap()
    }

    #[test]
    fn saves_once_and_restores_exactly() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("d.img");
        let jp = d.path().join(FILE);
        let orig: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&disk, &orig).unwrap();
        arm(&jp, 4096, orig.len() as u64).unwrap();
        let reader = File::open(&disk).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut j = reopen(&jp);
        j.save(&reader, 1, 2).unwrap();
        w.write_all_at(&[0xAA; 8192], 4096).unwrap();
        j.save(&reader, 2, 2).unwrap(); // already saved: the new data stays out
        w.write_all_at(&[0xBB; 100], 9000).unwrap();
        j.save(&reader, 9, 20).unwrap(); // partial last block, then growth
        w.set_len(100_000).unwrap();
        w.write_all_at(&[0xCC; 10], 90_000).unwrap();
        assert_eq!(j.bytes, 8192 + (40_000 - 9 * 4096));
        drop(j);
        // Reopening rebuilds the saved set.
        let mut j = reopen(&jp);
        j.save(&reader, 1, 1).unwrap();
        assert_eq!(j.bytes, 8192 + (40_000 - 9 * 4096));
        drop(j);
        // A torn tail is ignored.
        let jf = std::fs::OpenOptions::new().append(true).open(&jp).unwrap();
        std::io::Write::write_all(&mut &jf, &[1, 2, 3, 4, 5]).unwrap();
        let r = restore(&jp, &disk).unwrap();
        assert_eq!(r.size, 40_000);
        assert_eq!(std::fs::read(&disk).unwrap(), orig);
    }
}
