//! Undo records (pre-images) and the point-in-time overlay reader.
//!
//! An undo record is written in the `.hrl` format itself (checksums, LZ4,
//! ZERO records, sealed trailer, published by rename after fsync) with an
//! inverted meaning: for the log that took the disk from `base_cycle` to
//! `cycle`, the undo record `undo/<base_cycle>-<cycle>.undo` holds the
//! content *as of `base_cycle`* of every range that log wrote (clipped to
//! the size at `base_cycle`), plus the range cut off if the log shrank the
//! disk. Its header carries `cycle`/`base_cycle` of the log, `disk_size` =
//! the size at `base_cycle` (what undoing restores), `base_size` = the size
//! at `cycle`, and `cut_unix_ns` = the time of `base_cycle`'s cut.

use super::target::ReplicaTarget;
use crate::hrl::format::{self, Frame, ParseError};
use crate::hrl::{HrlError, HrlHeader, HrlReader, HrlWriter, SealedLog};
use crate::util::readahead::ReadAhead;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `<base>-<cycle>.undo`.
pub(crate) fn undo_name(base_cycle: u64, cycle: u64) -> String {
    format!("{base_cycle}-{cycle}.undo")
}

/// Parse `<base>-<cycle>.undo`.
pub(crate) fn parse_undo_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".undo")?;
    let (a, b) = stem.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Write the undo record for the log `log` (already verified) about to be
/// applied to `target` (at the log's base). `base_time_ns` is the cut time
/// of the base cycle.
pub(crate) fn prepare_undo(
    path: &Path,
    log: &File,
    log_label: &Path,
    target: &dyn ReplicaTarget,
    base_time_ns: u64,
) -> Result<SealedLog, HrlError> {
    let len = log.metadata().map_err(|e| HrlError::Io {
        path: log_label.to_path_buf(),
        source: e,
    })?;
    let mut lf = log;
    lf.seek(SeekFrom::Start(0)).map_err(|e| HrlError::Io {
        path: log_label.to_path_buf(),
        source: e,
    })?;
    let mut r = HrlReader::new(
        BufReader::with_capacity(256 << 10, lf),
        len.len(),
        log_label,
    )?;
    let h = r.header().clone();
    // The undo record's header: the log's, with the sizes swapped (it goes back).
    let uh = HrlHeader {
        base_size: h.disk_size,
        disk_size: h.base_size,
        cut_unix_ns: base_time_ns,
        app_consistent: false,
        ..h.clone()
    };
    let old = h.base_size;
    // Every range to keep, `(offset, len)` in log order: the ranges the log
    // writes (clipped to the size at the base), then what a shrinking log
    // cuts off, [disk_size, base_size). Known before the first read, so the
    // reads below are hinted a window ahead (the disk serves many at once).
    let mut ranges = Vec::new();
    while let Some(rec) = r.next_record()? {
        let start = rec.offset;
        let end = (rec.offset + u64::from(rec.length)).min(old);
        if start < end {
            ranges.push((start, end - start));
        }
    }
    let mut off = h.disk_size;
    while off < old {
        let n = (old - off).min(1 << 20);
        ranges.push((off, n));
        off += n;
    }
    let mut w = HrlWriter::create(path, &uh)?;
    let mut buf = Vec::new();
    let io = |e| HrlError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut ahead = ReadAhead::new();
    for (k, &(start, n)) in ranges.iter().enumerate() {
        target.read_ahead(&mut ahead, &ranges, k);
        buf.resize(n as usize, 0);
        target.read_at(&mut buf, start).map_err(io)?;
        w.append(start, &buf)?;
    }
    w.seal()
}

/// Opens a replica for [`PreimageHints`] (`None`: no hints).
type OpenReplica<'a> = Box<dyn FnOnce() -> Option<Box<dyn ReplicaTarget>> + 'a>;

/// Read-ahead hints for the pre-images that the apply of a log will save
/// ([`prepare_undo`] reads the replica at every range the log writes, cold
/// and scattered), given while the log is still arriving
/// (`Store::store_log`): the disk reads them during the transfer instead of
/// after it. A hint only: nothing read or written depends on it, and the
/// apply's own reads and hints are unchanged.
///
/// Given by the thread that stores the log: a hint costs ~7 µs (it
/// allocates its pages and submits the read before it returns), and the
/// storing slows by ~5–10 ms per 5,000 ranges while the apply gains
/// ~20–25 ms. Given by a thread of their own, the hints did worse (the two
/// cores are busy with the transfer; session 17, kernel-notes). The replica
/// is opened only once a log has [`Self::MIN_RANGES`] ranges: a short log's
/// apply hides its few reads in its own window, and the many short logs of
/// continuous replication pay nothing.
pub(crate) struct PreimageHints<'a> {
    /// Opens the replica (once, when the log proves long enough).
    open: Option<OpenReplica<'a>>,
    target: Option<Box<dyn ReplicaTarget>>,
    /// The disk's size at the log's base: pre-images end there.
    base_size: u64,
    /// Ranges noted so far, in log order.
    ranges: Vec<(u64, u64)>,
    ahead: ReadAhead,
    bytes: u64,
}

impl<'a> PreimageHints<'a> {
    /// Pre-image bytes hinted per log at most: a long log's apply may come
    /// much later (logs queue behind it), and pages read too early are
    /// evicted before use; the apply's own window hints the rest.
    pub(crate) const MAX_BYTES: u64 = 64 << 20;

    /// Ranges a log must have before the replica is opened and hinted.
    pub(crate) const MIN_RANGES: usize = 64;

    /// Hints for a log that starts from a disk of `base_size` bytes, on
    /// the replica `open` returns (`None`: no hints).
    pub(crate) fn new(
        base_size: u64,
        open: impl FnOnce() -> Option<Box<dyn ReplicaTarget>> + 'a,
    ) -> PreimageHints<'a> {
        PreimageHints {
            open: Some(Box::new(open)),
            target: None,
            base_size,
            ranges: Vec::new(),
            ahead: ReadAhead::new(),
            bytes: 0,
        }
    }

    /// A record writing `length` bytes at `offset` arrived.
    pub(crate) fn note(&mut self, offset: u64, length: u32) {
        let end = offset.saturating_add(u64::from(length)).min(self.base_size);
        if offset >= end || self.bytes >= Self::MAX_BYTES {
            return;
        }
        self.ranges.push((offset, end - offset));
        self.bytes += end - offset;
        if self.target.is_none() {
            if self.ranges.len() < Self::MIN_RANGES {
                return;
            }
            match self.open.take() {
                Some(open) => self.target = open(),
                None => return,
            }
        }
        if let Some(t) = &self.target {
            // The first call hints every range noted so far (a window's
            // worth), later ones the newest.
            let at = self.ranges.len() - 1;
            let first = at.saturating_sub(crate::util::readahead::WINDOW - 1);
            t.read_ahead(&mut self.ahead, &self.ranges, first);
        }
    }

    /// Hints given (the ranges not too long for one).
    #[cfg(test)]
    fn hints(&self) -> u64 {
        self.ahead.hints
    }
}

/// Restore the pre-images of an undo record into `target` and give it the
/// size of the undo's base (used to roll back a failed apply).
pub(crate) fn apply_undo(path: &Path, target: &mut dyn ReplicaTarget) -> Result<(), HrlError> {
    let r = HrlReader::open(path)?;
    let h = r.header().clone();
    r.finish()?; // verify first
    let io = |e| HrlError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut r = HrlReader::open(path)?;
    if target.len() < h.disk_size {
        target.set_len(h.disk_size).map_err(io)?;
    }
    while let Some(rec) = r.next_record()? {
        match rec.data {
            Some(d) => target.write_at(d, rec.offset).map_err(io)?,
            None => target
                .write_zeroes(rec.offset, u64::from(rec.length))
                .map_err(io)?,
        }
    }
    target.set_len(h.disk_size).map_err(io)?;
    target.flush().map_err(io)?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    length: u64,
    /// File offset of the record header.
    at: u64,
}

/// One undo record, indexed for random reads (payloads are checked when read).
pub(crate) struct UndoLayer {
    file: File,
    path: PathBuf,
    pub header: HrlHeader,
    entries: Vec<Entry>,
}

fn corrupt(path: &Path, at: u64, what: impl Into<String>) -> HrlError {
    HrlError::Corrupt {
        path: path.to_path_buf(),
        offset: at,
        what: what.into(),
    }
}

impl UndoLayer {
    /// Index the undo record at `path`: reads the header and every record
    /// header (skipping payloads), and checks the trailer.
    pub fn open(path: &Path) -> Result<UndoLayer, HrlError> {
        let io = |e| HrlError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head =
            vec![0u8; (format::HEADER_FIXED_LEN + format::MAX_NAME_LEN + 8).min(len as usize)];
        file.read_exact_at(&mut head, 0).map_err(io)?;
        let (header, hlen) = format::parse_header(&head).map_err(|e| match e {
            ParseError::Short { .. } => corrupt(path, 0, "truncated header"),
            ParseError::Bad { at, what } => corrupt(path, at as u64, what),
        })?;
        let mut entries = Vec::new();
        let mut pos = hlen as u64;
        let mut rd = BufReader::with_capacity(64 << 10, &file);
        rd.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut fb = [0u8; format::TRAILER_LEN];
        loop {
            if pos > len {
                return Err(corrupt(path, len, "not sealed (truncated record)"));
            }
            let want = format::RECORD_HEADER_LEN.min((len - pos) as usize);
            if want < 4 {
                return Err(corrupt(path, pos, "not sealed (truncated)"));
            }
            rd.read_exact(&mut fb[..want]).map_err(io)?;
            let mut n = want;
            let frame = loop {
                match format::parse_frame(&fb[..n]) {
                    Ok(f) => break f,
                    Err(ParseError::Short { need }) if need > n && pos + need as u64 <= len => {
                        rd.read_exact(&mut fb[n..need]).map_err(io)?;
                        n = need;
                    }
                    Err(ParseError::Short { .. }) => {
                        return Err(corrupt(path, pos, "not sealed (truncated)"))
                    }
                    Err(ParseError::Bad { at, what }) => {
                        return Err(corrupt(path, pos + at as u64, what))
                    }
                }
            };
            match frame {
                Frame::Record(rh) => {
                    entries.push(Entry {
                        offset: rh.offset,
                        length: u64::from(rh.length),
                        at: pos,
                    });
                    pos += format::RECORD_HEADER_LEN as u64 + u64::from(rh.stored_len);
                    rd.seek_relative(i64::from(rh.stored_len)).map_err(io)?;
                }
                Frame::Trailer(t) => {
                    if pos + format::TRAILER_LEN as u64 != len
                        || t.record_count != entries.len() as u64
                    {
                        return Err(corrupt(path, pos, "trailer does not match the records"));
                    }
                    break;
                }
            }
        }
        Ok(UndoLayer {
            file,
            path: path.to_path_buf(),
            header,
            entries,
        })
    }

    /// Decode entry `i` into `out` (the disk bytes it covers).
    fn record(&self, i: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let e = self.entries[i];
        let mut hb = [0u8; format::RECORD_HEADER_LEN];
        self.file.read_exact_at(&mut hb, e.at)?;
        let bad = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: damaged undo record at byte {}: {what}",
                    self.path.display(),
                    e.at
                ),
            )
        };
        let rh = match format::parse_frame(&hb) {
            Ok(Frame::Record(rh)) => rh,
            Ok(Frame::Trailer(_)) => return Err(bad("record expected".into())),
            Err(e) => return Err(bad(format!("{e:?}"))),
        };
        let mut payload = vec![0u8; rh.stored_len as usize];
        self.file
            .read_exact_at(&mut payload, e.at + format::RECORD_HEADER_LEN as u64)?;
        let mut decoded = Vec::new();
        rh.check_payload(&payload, &mut decoded)
            .map_err(|e| bad(format!("{e:?}")))?;
        match rh.encoding {
            format::Encoding::Raw => *out = payload,
            format::Encoding::Lz4 => *out = decoded,
            format::Encoding::Zero => {
                out.clear();
                out.resize(rh.length as usize, 0);
            }
        }
        Ok(())
    }
}

type CachedRecord = (usize, usize, Arc<Vec<u8>>);

/// The part of a [`PointReader`] the store keeps a handle on: its undo
/// layers, which an apply extends (under the write lock) before it writes
/// the replica.
pub(crate) struct ReaderShared {
    /// Oldest first: layer 0 is the undo of the log right after the point.
    layers: parking_lot::RwLock<Vec<Arc<UndoLayer>>>,
}

impl ReaderShared {
    /// Add the undo record of an apply about to run as the newest layer.
    /// Waits for reads in progress; later reads see the layer.
    pub(crate) fn push(&self, layer: Arc<UndoLayer>) {
        self.layers.write().push(layer);
    }
}

/// Reads a disk as of a recovery point: the replica overlaid with the undo
/// records of every later cycle. Where several undo records cover a byte,
/// the oldest one (the first later log that wrote the byte) holds its
/// content at the point; bytes no later log wrote come from the replica.
/// Nothing is copied: opening costs one pass over the undo records'
/// record headers.
///
/// Consistent while applies run: the store registers every reader of a
/// disk, and [`Site::apply`](super::Site::apply), once its undo record is
/// durable and before it writes the replica, appends that record as the
/// newest layer of every registered reader (older layers win, so the new
/// one only supplies bytes no older layer covers, whose content at the
/// point is the replica's before this apply). A read holds the layers'
/// read lock across layers and replica, the push takes the write lock, so
/// a read sees either the replica before the apply, or the new layer.
/// Open descriptors keep undo records readable after prune deletes them.
pub struct PointReader {
    shared: Arc<ReaderShared>,
    /// The replica file, read-only (its data starts at offset 0 for every
    /// [`ReplicaFormat`](super::ReplicaFormat)).
    replica: File,
    size: u64,
    cycle: u64,
    /// The last decoded record: (layer, entry, bytes).
    cache: parking_lot::Mutex<Option<CachedRecord>>,
}

impl PointReader {
    pub(crate) fn new(
        cycle: u64,
        size: u64,
        layers: Vec<UndoLayer>,
        replica: File,
    ) -> (PointReader, Arc<ReaderShared>) {
        let shared = Arc::new(ReaderShared {
            layers: parking_lot::RwLock::new(layers.into_iter().map(Arc::new).collect()),
        });
        (
            PointReader {
                shared: shared.clone(),
                replica,
                size,
                cycle,
                cache: parking_lot::Mutex::new(None),
            },
            shared,
        )
    }

    /// Size of the disk at the point.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True for an empty disk.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The point's cycle.
    pub fn cycle(&self) -> u64 {
        self.cycle
    }

    /// Number of undo layers over the replica (grows while applies run).
    pub fn layer_count(&self) -> usize {
        self.shared.layers.read().len()
    }

    /// Fill `buf` with the disk's bytes at `offset` as of the point; bytes
    /// past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let layers = self.shared.layers.read();
        self.fill(&layers, &mut buf[..avail], offset, 0)
    }

    fn read_replica(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        crate::util::read_at_zero_filled(&self.replica, buf, off)
    }

    fn fill(
        &self,
        layers: &[Arc<UndoLayer>],
        buf: &mut [u8],
        off: u64,
        idx: usize,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(layer) = layers.get(idx) else {
            return self.read_replica(buf, off);
        };
        let end = off + buf.len() as u64;
        let mut i = layer
            .entries
            .partition_point(|e| e.offset + e.length <= off);
        let mut pos = off;
        while pos < end {
            let e = match layer.entries.get(i) {
                Some(e) if e.offset < end => *e,
                _ => {
                    return self.fill(layers, &mut buf[(pos - off) as usize..], pos, idx + 1);
                }
            };
            if e.offset > pos {
                self.fill(
                    layers,
                    &mut buf[(pos - off) as usize..(e.offset - off) as usize],
                    pos,
                    idx + 1,
                )?;
                pos = e.offset;
            }
            let stop = end.min(e.offset + e.length);
            let data = {
                let cache = self.cache.lock();
                match &*cache {
                    Some((l, j, d)) if *l == idx && *j == i => Some(d.clone()),
                    _ => None,
                }
            };
            let data = match data {
                Some(d) => d,
                None => {
                    let mut d = Vec::new();
                    layer.record(i, &mut d)?;
                    let d = Arc::new(d);
                    *self.cache.lock() = Some((idx, i, d.clone()));
                    d
                }
            };
            let from = (pos - e.offset) as usize;
            let to = (stop - e.offset) as usize;
            buf[(pos - off) as usize..(stop - off) as usize].copy_from_slice(&data[from..to]);
            pos = stop;
            i += 1;
        }
        Ok(())
    }
}

/// One record read from a log, owned.
struct Piece {
    offset: u64,
    /// `None`: zeros.
    data: Option<Vec<u8>>,
    length: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
    /// Drop the bytes before `at`.
    fn cut_front(&mut self, at: u64) {
        if at <= self.offset {
            return;
        }
        let k = (at - self.offset).min(self.length);
        if let Some(d) = &mut self.data {
            d.drain(..k as usize);
        }
        self.offset += k;
        self.length -= k;
    }
}

fn next_piece<R: Read>(r: &mut HrlReader<R>) -> Result<Option<Piece>, HrlError> {
    Ok(r.next_record()?.map(|rec| Piece {
        offset: rec.offset,
        data: rec.data.map(|d| d.to_vec()),
        length: u64::from(rec.length),
    }))
}

fn emit(w: &mut HrlWriter, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), HrlError> {
    match data {
        Some(d) => w.append(offset, d),
        None => {
            let z = vec![0u8; len as usize];
            w.append(offset, &z)
        }
    }
}

/// Merge consecutive undo records `records` (a→b, b→c, …, y→z, oldest
/// first) into one (a→z) published at `out`: at each byte the oldest
/// pre-image wins (it is the content at a; a newer record's bytes that no
/// older one covers are the content at its base, equal to the content at
/// a since no log in between wrote them), clipped to the size at a.
/// Streams every input (one piece of each in memory); nothing is
/// published unless every input is intact to its seal. Returns the bytes
/// of the merged record.
pub(crate) fn merge_undo(records: &[PathBuf], out: &Path) -> Result<u64, HrlError> {
    if records.is_empty() {
        return Err(HrlError::InvalidInput {
            path: out.to_path_buf(),
            what: "no undo record to merge".into(),
        });
    }
    let mut readers = Vec::with_capacity(records.len());
    for p in records {
        readers.push(HrlReader::open(p)?);
    }
    for (i, pair) in readers.windows(2).enumerate() {
        let (ha, hb) = (pair[0].header(), pair[1].header());
        if ha.cycle != hb.base_cycle || ha.disk_id != hb.disk_id {
            return Err(HrlError::Mismatch(format!(
                "{} and {} are not consecutive undo records of one disk",
                records[i].display(),
                records[i + 1].display()
            )));
        }
    }
    let ha = readers[0].header().clone();
    let hz = readers[readers.len() - 1].header().clone();
    let limit = ha.disk_size;
    let mh = HrlHeader {
        disk_id: ha.disk_id,
        disk_name: ha.disk_name.clone(),
        cycle: hz.cycle,
        base_cycle: ha.base_cycle,
        block_size: ha.block_size,
        base_size: hz.base_size,
        disk_size: ha.disk_size,
        cut_unix_ns: ha.cut_unix_ns,
        app_consistent: false,
    };
    let mut w = HrlWriter::create(out, &mh)?;
    let mut cur = Vec::with_capacity(readers.len());
    for r in &mut readers {
        cur.push(next_piece(r)?);
    }
    // Everything below `pos` is written.
    let mut pos = 0u64;
    loop {
        // Cut what is below `pos` off every input's piece; a piece at or
        // past the limit is skipped (its input is still read to its seal).
        let mut start = u64::MAX;
        for (c, r) in cur.iter_mut().zip(readers.iter_mut()) {
            while let Some(p) = c {
                p.cut_front(pos);
                if p.length == 0 || p.offset >= limit {
                    *c = next_piece(r)?;
                    continue;
                }
                start = start.min(p.offset);
                break;
            }
        }
        if start == u64::MAX {
            break; // every input read to its seal
        }
        // The oldest input with a piece at `start` wins, up to the end of
        // its piece, the next piece of an older input, or the limit.
        let stuck = || HrlError::InvalidInput {
            path: out.to_path_buf(),
            what: format!("undo merge made no progress at offset {start}"),
        };
        // `start` is some piece's offset: never publish a partial merge.
        let win = cur
            .iter()
            .position(|c| c.as_ref().is_some_and(|p| p.offset == start))
            .ok_or_else(stuck)?;
        let older = cur[..win]
            .iter()
            .flatten()
            .map(|p| p.offset)
            .min()
            .unwrap_or(u64::MAX);
        let p = cur[win].as_ref().ok_or_else(stuck)?;
        let stop = p.end().min(older).min(limit);
        if stop <= start {
            return Err(stuck());
        }
        let n = stop - start;
        emit(&mut w, start, p.data.as_ref().map(|d| &d[..n as usize]), n)?;
        pos = stop;
    }
    Ok(w.finish()?.file_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::target::RawFile;

    const BS: u64 = 4096;

    #[test]
    fn preimage_hints_start_at_a_long_log_and_stop_at_the_base_size_and_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 30).unwrap();
        let opened = std::cell::Cell::new(0);
        let open = || {
            opened.set(opened.get() + 1);
            Some(Box::new(RawFile::open(&path, false).unwrap()) as Box<dyn ReplicaTarget>)
        };
        let min = PreimageHints::MIN_RANGES as u64;
        let base = 1000 * BS;
        let mut h = PreimageHints::new(base, open);
        // A short log: the replica is not even opened.
        for i in 0..min - 1 {
            h.note(i * 2 * BS, BS as u32);
        }
        assert_eq!((h.hints(), opened.get()), (0, 0));
        // Long enough: every range so far is hinted at once, then each new one.
        h.note((min - 1) * 2 * BS, BS as u32);
        assert_eq!((h.hints(), opened.get()), (min, 1));
        h.note(300 * BS, 2 * BS as u32);
        assert_eq!(h.hints(), min + 1);
        // Past the base size (a log that grows the disk): nothing to save.
        h.note(base, BS as u32);
        // Straddling it: the part below.
        h.note(base - BS, 2 * BS as u32);
        assert_eq!(h.hints(), min + 2);
        assert_eq!(h.ranges.last(), Some(&(base - BS, BS)));
        assert_eq!(opened.get(), 1, "opened once");
        // The cap: once MAX_BYTES are hinted, no more.
        let mut h = PreimageHints::new(1 << 30, open);
        let per = 128 << 10;
        let n = PreimageHints::MAX_BYTES / per;
        for i in 0..n + 10 {
            h.note(i * 2 * per, per as u32);
        }
        assert_eq!(h.hints(), n);
        // No replica to open: no hints, nothing fails.
        let mut h = PreimageHints::new(1 << 30, || None);
        for i in 0..2 * min {
            h.note(i * 2 * BS, BS as u32);
        }
        assert_eq!(h.hints(), 0);
    }

    /// Block `b`'s content at generation `gen` (unique per pair).
    fn block(b: u64, gen: u8) -> Vec<u8> {
        let mut v = vec![(b as u8) ^ gen.wrapping_mul(0x5b); BS as usize];
        v[..8].copy_from_slice(&b.to_le_bytes());
        v[8] = gen;
        v
    }

    /// The undo record of a log of many scattered ranges (single blocks,
    /// short runs, one run longer than the read-ahead hints cover) that
    /// also shrinks the disk holds exactly the replica's old bytes of
    /// those ranges and of the cut-off tail, read a window ahead; undoing
    /// the applied log gives the replica back byte for byte.
    #[test]
    fn undo_of_scattered_ranges_holds_exactly_their_old_bytes() {
        const OLD_BLOCKS: u64 = 4096; // 16 MiB
        const NEW_BLOCKS: u64 = 3840; // the log cuts the last 1 MiB off
        let d = tempfile::tempdir().unwrap();
        let rp = d.path().join("replica");
        let orig: Vec<u8> = (0..OLD_BLOCKS).flat_map(|b| block(b, 0)).collect();
        std::fs::write(&rp, &orig).unwrap();
        let mut target = RawFile::open(&rp, false).unwrap();
        // The log's ranges (first block, blocks), ascending, not touching.
        let mut ranges = Vec::new();
        let mut b = 3;
        let mut i = 0u64;
        while b < NEW_BLOCKS - 200 {
            let n = match i % 7 {
                0 => 3,
                3 => 2,
                _ => 1,
            };
            ranges.push((b, n));
            b += n + 1 + (i * 37) % 5;
            i += 1;
            if i == 400 {
                ranges.push((b, 160)); // 640 KiB: no hint, kernel read-ahead
                b += 161;
            }
        }
        let h = HrlHeader {
            disk_id: [7; 16],
            disk_name: "d.img".into(),
            cycle: 2,
            base_cycle: 1,
            block_size: BS as u32,
            base_size: OLD_BLOCKS * BS,
            disk_size: NEW_BLOCKS * BS,
            cut_unix_ns: 2,
            app_consistent: false,
        };
        let logp = d.path().join("2.hrl");
        let mut w = HrlWriter::create(&logp, &h).unwrap();
        for &(f, n) in &ranges {
            let data: Vec<u8> = (f..f + n).flat_map(|x| block(x, 1)).collect();
            w.append(f * BS, &data).unwrap();
        }
        w.finish().unwrap();
        let undop = d.path().join(undo_name(1, 2));
        let log = File::open(&logp).unwrap();
        prepare_undo(&undop, &log, &logp, &target, 1)
            .unwrap()
            .publish()
            .unwrap();
        // Exactly the old bytes of the log's ranges and of the cut-off tail.
        let mut want: Vec<u64> = ranges.iter().flat_map(|&(f, n)| f..f + n).collect();
        want.extend(NEW_BLOCKS..OLD_BLOCKS);
        let mut got = Vec::new();
        let mut r = HrlReader::open(&undop).unwrap();
        assert_eq!(r.header().disk_size, OLD_BLOCKS * BS);
        while let Some(rec) = r.next_record().unwrap() {
            assert_eq!(rec.offset % BS, 0);
            let data = rec.data.map(<[u8]>::to_vec);
            let data = data.unwrap_or_else(|| vec![0; rec.length as usize]);
            for (k, chunk) in data.chunks(BS as usize).enumerate() {
                let blk = rec.offset / BS + k as u64;
                let o = (blk * BS) as usize;
                assert!(
                    chunk == &orig[o..o + BS as usize],
                    "undo block {blk} is not the replica's old content (holds block {:?} gen {})",
                    &chunk[..8],
                    chunk[8]
                );
                got.push(blk);
            }
        }
        assert_eq!(
            got, want,
            "the undo record covers other blocks than the log's"
        );
        // Apply the log, then undo it: the replica is back, byte for byte.
        let mut lr = HrlReader::open(&logp).unwrap();
        target.set_len(NEW_BLOCKS * BS).unwrap();
        while let Some(rec) = lr.next_record().unwrap() {
            target.write_at(rec.data.unwrap(), rec.offset).unwrap();
        }
        assert!(std::fs::read(&rp).unwrap() != orig);
        apply_undo(&undop, &mut target).unwrap();
        assert!(
            std::fs::read(&rp).unwrap() == orig,
            "undo did not restore the replica"
        );
    }
}
