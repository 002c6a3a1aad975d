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

/// A range of the disk that one undo layer supplies at a point: `end`
/// (exclusive; the start is the map key), the layer's index in
/// [`Overlay::layers`] and the entry of that layer holding the bytes.
#[derive(Debug, Clone, Copy)]
struct Seg {
    end: u64,
    layer: u32,
    entry: u32,
}

/// Which layer supplies each byte of a point: the oldest undo layer whose
/// record covers it, else the replica. Built once when the reader opens
/// and extended by each push, so a read looks its range up in one map
/// (O(log n) and no recursion, whatever the history's length: a reader
/// that walked the layers one by one overflowed a 2 MiB thread stack at
/// ~7,000 layers, a continuous VM's point of two hours back).
#[derive(Default)]
struct Overlay {
    /// The layers that supply at least one byte, oldest first. A layer
    /// every byte of which an older one covers is not kept (nor its open
    /// file): no later layer can change that.
    layers: Vec<Arc<UndoLayer>>,
    /// Disjoint ranges, by start.
    segs: std::collections::BTreeMap<u64, Seg>,
    /// Layers given, kept or not.
    given: usize,
}

impl Overlay {
    /// Add `layer` as the newest: it supplies only the bytes no older
    /// layer covers. Entries may come in any order and overlap; within a
    /// layer the first one that covers a byte supplies it (overlapping
    /// entries of one undo record hold the same pre-image).
    fn add(&mut self, layer: Arc<UndoLayer>) {
        self.given += 1;
        let idx = self.layers.len() as u32;
        let mut kept = false;
        for (i, e) in layer.entries.iter().enumerate() {
            let (mut pos, end) = (e.offset, e.offset.saturating_add(e.length));
            while pos < end {
                // A range covering `pos` already: skip past it.
                if let Some((_, s)) = self.segs.range(..=pos).next_back() {
                    if s.end > pos {
                        pos = s.end;
                        continue;
                    }
                }
                // A gap up to the next range (or the entry's end).
                let next = self
                    .segs
                    .range(pos..)
                    .next()
                    .map_or(end, |(&start, _)| start.min(end));
                self.segs.insert(
                    pos,
                    Seg {
                        end: next,
                        layer: idx,
                        entry: i as u32,
                    },
                );
                kept = true;
                pos = next;
            }
        }
        if kept {
            self.layers.push(layer);
        }
    }
}

/// The part of a [`PointReader`] the store keeps a handle on: its undo
/// layers, which an apply extends (under the write lock) before it writes
/// the replica.
pub(crate) struct ReaderShared {
    overlay: parking_lot::RwLock<Overlay>,
}

impl ReaderShared {
    /// Add the undo record of an apply about to run as the newest layer.
    /// Waits for reads in progress; later reads see the layer.
    pub(crate) fn push(&self, layer: Arc<UndoLayer>) {
        self.overlay.write().add(layer);
    }
}

/// Reads a disk as of a recovery point: the replica overlaid with the undo
/// records of every later cycle. Where several undo records cover a byte,
/// the oldest one (the first later log that wrote the byte) holds its
/// content at the point; bytes no later log wrote come from the replica.
/// Nothing is copied: opening costs one pass over the undo records'
/// record headers, and builds the map of which record supplies each byte
/// ([`Overlay`]).
///
/// Consistent while applies run: the store registers every reader of a
/// disk, and [`Site::apply`](super::Site::apply), once its undo record is
/// durable and before it writes the replica, appends that record as the
/// newest layer of every registered reader (older layers win, so the new
/// one only supplies bytes no older layer covers, whose content at the
/// point is the replica's before this apply). A read holds the overlay's
/// read lock across layers and replica, the push takes the write lock, so
/// a read sees either the replica before the apply, or the new layer.
/// Open descriptors keep undo records readable after prune deletes them:
/// one per record that supplies a byte.
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

/// Builds a [`PointReader`] one undo layer at a time, oldest first: a
/// layer that supplies no byte (older ones cover all of it) is closed at
/// once, so building holds open only the records the reader will keep.
#[derive(Default)]
pub(crate) struct ReaderBuilder {
    overlay: Overlay,
    first_disk_size: Option<u64>,
}

impl ReaderBuilder {
    /// Add `layer` as the newest so far.
    pub(crate) fn add(&mut self, layer: UndoLayer) {
        self.first_disk_size.get_or_insert(layer.header.disk_size);
        self.overlay.add(Arc::new(layer));
    }

    /// Layers kept so far (each an open file).
    pub(crate) fn open_layers(&self) -> usize {
        self.overlay.layers.len()
    }

    /// Add the layers `newer` kept, as newer than every layer so far.
    pub(crate) fn append(&mut self, newer: ReaderBuilder) {
        if self.first_disk_size.is_none() {
            self.first_disk_size = newer.first_disk_size;
        }
        let kept = newer.overlay.layers.len();
        for l in newer.overlay.layers {
            self.overlay.add(l);
        }
        self.overlay.given += newer.overlay.given - kept;
    }

    /// Add `layer`, the merge of `records` consecutive undo records
    /// ([`merge_undo`]), as the newest so far.
    pub(crate) fn add_merged(&mut self, layer: UndoLayer, records: usize) {
        self.add(layer);
        self.overlay.given += records.saturating_sub(1);
    }

    /// The disk's size at the point: the oldest layer's `disk_size` (what
    /// undoing restores), `None` with no layer (the replica's own size).
    pub(crate) fn first_disk_size(&self) -> Option<u64> {
        self.first_disk_size
    }

    /// The reader of the point `cycle` (`size` bytes) over `replica`, and
    /// the handle through which applies push their undo layers.
    pub(crate) fn finish(
        self,
        cycle: u64,
        size: u64,
        replica: File,
    ) -> (PointReader, Arc<ReaderShared>) {
        let shared = Arc::new(ReaderShared {
            overlay: parking_lot::RwLock::new(self.overlay),
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
}

impl PointReader {
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
        self.shared.overlay.read().given
    }

    /// Number of undo records this reader keeps open: those that supply
    /// at least one byte of the point.
    pub fn open_layers(&self) -> usize {
        self.shared.overlay.read().layers.len()
    }

    /// Fill `buf` with the disk's bytes at `offset` as of the point; bytes
    /// past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let ov = self.shared.overlay.read();
        let buf = &mut buf[..avail];
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // The range covering `offset`, if any, then every one that starts
        // before `end`.
        let first = ov
            .segs
            .range(..=offset)
            .next_back()
            .filter(|(_, s)| s.end > offset)
            .map(|(&k, _)| k)
            .unwrap_or(offset);
        for (&start, seg) in ov.segs.range(first..end) {
            if start > pos {
                self.read_replica(
                    &mut buf[(pos - offset) as usize..(start - offset) as usize],
                    pos,
                )?;
                pos = start;
            }
            let stop = end.min(seg.end);
            self.copy_from(
                &ov,
                seg,
                &mut buf[(pos - offset) as usize..(stop - offset) as usize],
                pos,
            )?;
            pos = stop;
        }
        if pos < end {
            self.read_replica(&mut buf[(pos - offset) as usize..], pos)?;
        }
        Ok(())
    }

    fn read_replica(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        crate::util::read_at_zero_filled(&self.replica, buf, off)
    }

    /// Copy `buf.len()` bytes at disk offset `pos` (inside `seg`) from the
    /// record that supplies them.
    fn copy_from(&self, ov: &Overlay, seg: &Seg, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let (li, ei) = (seg.layer as usize, seg.entry as usize);
        let layer = ov.layers.get(li).ok_or_else(|| {
            io::Error::other(format!(
                "point overlay names layer {li} of {}",
                ov.layers.len()
            ))
        })?;
        let e = layer.entries[ei];
        let data = {
            let cache = self.cache.lock();
            match &*cache {
                Some((l, j, d)) if *l == li && *j == ei => Some(d.clone()),
                _ => None,
            }
        };
        let data = match data {
            Some(d) => d,
            None => {
                let mut d = Vec::new();
                layer.record(ei, &mut d)?;
                let d = Arc::new(d);
                *self.cache.lock() = Some((li, ei, d.clone()));
                d
            }
        };
        let from = (pos - e.offset) as usize;
        let src = data.get(from..from + buf.len()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: undo record at byte {} holds {} bytes, fewer than its header's {}",
                    layer.path.display(),
                    e.at,
                    data.len(),
                    e.length
                ),
            )
        })?;
        buf.copy_from_slice(src);
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
/// of the merged record. `durable`: fsync the record and its folder (a
/// record of the history); else only published (a point reader's private
/// merge, deleted once open).
pub(crate) fn merge_undo(records: &[PathBuf], out: &Path, durable: bool) -> Result<u64, HrlError> {
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
    if durable {
        Ok(w.finish()?.file_bytes)
    } else {
        Ok(w.seal()?.publish()?.file_bytes)
    }
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

    /// Write an undo layer of a `blocks`-block disk at `path` holding
    /// `runs` (first block, blocks; ascending, apart): block `b` of layer
    /// `gen` is `block(b, gen)`, or zeros when `(b + gen) % 5 == 0` (a ZERO
    /// record).
    fn write_layer(path: &Path, blocks: u64, gen: u8, runs: &[(u64, u64)]) {
        let h = HrlHeader {
            disk_id: [7; 16],
            disk_name: "d.img".into(),
            cycle: u64::from(gen) + 1,
            base_cycle: u64::from(gen),
            block_size: BS as u32,
            base_size: blocks * BS,
            disk_size: blocks * BS,
            cut_unix_ns: 1,
            app_consistent: false,
        };
        let mut w = HrlWriter::create(path, &h).unwrap();
        for &(f, n) in runs {
            let data: Vec<u8> = (f..f + n)
                .flat_map(|b| {
                    if (b + u64::from(gen)) % 5 == 0 {
                        vec![0; BS as usize]
                    } else {
                        block(b, gen)
                    }
                })
                .collect();
            w.append(f * BS, &data).unwrap();
        }
        w.seal().unwrap().publish().unwrap();
    }

    /// Runs from a set of blocks: ascending, merged where they touch.
    fn runs_of(blocks: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in blocks {
            match runs.last_mut() {
                Some((f, n)) if *f + *n == b => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A point read through the overlay equals the byte-by-byte model
        /// of its definition: the oldest layer that covers a byte supplies
        /// it, else the replica (zeros past the replica's end), zeros past
        /// the point's size; layers pushed after the reader opened (an
        /// apply's) supply only what no older layer covers. The reader
        /// keeps open exactly the layers that supply a byte.
        #[test]
        fn point_reads_equal_the_oldest_layer_model(
            layers in proptest::collection::vec(
                proptest::collection::btree_set(0u64..48, 0..10), 1..10),
            pushed in 0usize..4,
            size_blocks in 1u64..48,
            replica_blocks in 0u64..48,
            reads in proptest::collection::vec((0u64..50 * BS, 0usize..10 * BS as usize), 1..12),
        ) {
            const BLOCKS: u64 = 48;
            let d = tempfile::tempdir().unwrap();
            let rp = d.path().join("replica");
            let replica: Vec<u8> = (0..replica_blocks).flat_map(|b| block(b, 200)).collect();
            std::fs::write(&rp, &replica).unwrap();
            // The model, and which layers supply a byte.
            let size = (size_blocks * BS) as usize;
            let mut model: Vec<u8> = replica.clone();
            model.resize(size.max(model.len()), 0);
            model.truncate(size);
            let mut owner = vec![None; BLOCKS as usize];
            for (g, set) in layers.iter().enumerate() {
                for &b in set {
                    owner[b as usize].get_or_insert(g);
                }
            }
            for (b, o) in owner.iter().enumerate() {
                let (b, o) = (b as u64, o.map(|g| g as u8));
                let Some(g) = o else { continue };
                let at = (b * BS) as usize;
                if at >= size {
                    continue;
                }
                let content = if (b + u64::from(g)) % 5 == 0 { vec![0; BS as usize] } else { block(b, g) };
                model[at..at + BS as usize].copy_from_slice(&content);
            }
            let supplying = {
                let mut s: Vec<usize> = owner.iter().flatten().copied().collect();
                s.sort_unstable();
                s.dedup();
                s.len()
            };
            let given = layers.len() - pushed.min(layers.len() - 1);
            let mut builder = ReaderBuilder::default();
            let mut paths = Vec::new();
            for (g, set) in layers.iter().enumerate() {
                let p = d.path().join(undo_name(g as u64, g as u64 + 1));
                write_layer(&p, BLOCKS, g as u8, &runs_of(set));
                paths.push(p);
            }
            for p in &paths[..given] {
                builder.add(UndoLayer::open(p).unwrap());
            }
            let (reader, shared) = builder.finish(9, size as u64, File::open(&rp).unwrap());
            for p in &paths[given..] {
                shared.push(Arc::new(UndoLayer::open(p).unwrap()));
            }
            proptest::prop_assert_eq!(reader.layer_count(), layers.len());
            proptest::prop_assert_eq!(reader.open_layers(), supplying);
            for (off, len) in reads {
                let mut buf = vec![0xeeu8; len];
                reader.read_at(&mut buf, off).unwrap();
                let want: Vec<u8> = (0..len as u64)
                    .map(|i| model.get((off + i) as usize).copied().unwrap_or(0))
                    .collect();
                proptest::prop_assert!(buf == want, "read of {} bytes at {} differs from the model", len, off);
            }
        }
    }

    /// A point thousands of cycles back reads on a thread with a small
    /// stack (a reader that recursed once per layer overflowed a 2 MiB
    /// stack at ~7,000 layers and aborted the process), and building it
    /// keeps open only the layers that supply a byte: here the oldest,
    /// which covers block 0 that every later cycle rewrote.
    #[test]
    fn a_point_thousands_of_cycles_back_reads_in_a_small_stack() {
        const LAYERS: u64 = 5_000;
        let d = tempfile::tempdir().unwrap();
        let rp = d.path().join("replica");
        std::fs::write(&rp, (0..4).flat_map(|b| block(b, 200)).collect::<Vec<u8>>()).unwrap();
        let p = d.path().join("layer.undo");
        let mut builder = ReaderBuilder::default();
        for g in 0..LAYERS {
            // Block 0 in every layer; the oldest also holds block 2.
            let runs: &[(u64, u64)] = if g == 0 { &[(0, 1), (2, 1)] } else { &[(0, 1)] };
            write_layer(&p, 4, (g % 251) as u8 + 1, runs);
            builder.add(UndoLayer::open(&p).unwrap());
        }
        let (reader, _shared) = builder.finish(1, 4 * BS, File::open(&rp).unwrap());
        assert_eq!(
            (reader.layer_count(), reader.open_layers()),
            (LAYERS as usize, 1)
        );
        let got = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let mut buf = vec![0u8; 4 * BS as usize];
                reader.read_at(&mut buf, 0).map(|()| buf)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let mut want = block(0, 1);
        want.extend(block(1, 200));
        want.extend(block(2, 1));
        want.extend(block(3, 200));
        assert!(
            got == want,
            "the point's bytes are not the oldest layer's over the replica"
        );
    }
}
