//! Streaming reading, verification and dumping of logs.

use super::format::{self, Encoding, Frame, ParseError, RecordHeader, MAX_RECORD_LEN};
use super::{HrlError, HrlHeader, HrlSummary};
use crate::util::hex;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// One record as read from a log.
#[derive(Debug)]
pub struct Record<'a> {
    /// Byte offset of the record header in the log file.
    pub file_offset: u64,
    /// Disk offset of the first byte.
    pub offset: u64,
    /// Disk bytes covered.
    pub length: u32,
    pub encoding: Encoding,
    /// The payload as stored (empty for ZERO, compressed for LZ4).
    pub stored: &'a [u8],
    /// The disk bytes; `None` for a ZERO record (the range is all zeros).
    pub data: Option<&'a [u8]>,
}

/// Streams the records of a log, checking everything as it goes: header,
/// each record's checksum, order and bounds, and at the end the whole-log
/// checksum, the counts and the seal.
///
/// Records are yielded before the seal has been checked: a consumer that
/// must not act on an unsealed log verifies it first ([`verify`]) or waits
/// until [`HrlReader::next_record`] returns `Ok(None)`.
pub struct HrlReader<R> {
    inner: R,
    path: PathBuf,
    file_len: u64,
    pos: u64,
    header: HrlHeader,
    hasher: Xxh3,
    payload: Vec<u8>,
    decoded: Vec<u8>,
    prev_end: u64,
    summary: HrlSummary,
    sealed: bool,
    failed: bool,
    /// The log's length is not known: it arrives as a stream
    /// ([`HrlReader::streaming`]).
    streaming: bool,
}

impl HrlReader<BufReader<File>> {
    /// Open the log at `path` and read its header.
    pub fn open(path: &Path) -> Result<Self, HrlError> {
        let file = File::open(path).map_err(|e| HrlError::io(path, e))?;
        let len = file.metadata().map_err(|e| HrlError::io(path, e))?.len();
        HrlReader::new(BufReader::with_capacity(256 << 10, file), len, path)
    }
}

impl<'b> HrlReader<&'b [u8]> {
    /// Read a log held in memory; `label` names it in errors.
    pub fn from_bytes(bytes: &'b [u8], label: &Path) -> Result<Self, HrlError> {
        HrlReader::new(bytes, bytes.len() as u64, label)
    }
}

/// The length a streamed log is read with until its seal: larger than any
/// log, so that only the stream's end (a truncation) or the seal stops it.
const STREAM_LEN: u64 = u64::MAX;

fn truncated(path: &Path, file_len: u64, need: u64, what: &str) -> HrlError {
    HrlError::corrupt(
        path,
        file_len,
        format!("log is truncated at offset {file_len}: {what} needs {need} more bytes"),
    )
}

impl<R: Read> HrlReader<R> {
    /// Read the header from `inner`, which yields a log of `file_len` bytes
    /// (errors name `path`).
    pub fn new(mut inner: R, file_len: u64, path: &Path) -> Result<Self, HrlError> {
        let path = path.to_path_buf();
        let mut hasher = Xxh3::new();
        let mut buf = Vec::new();
        let mut want = format::HEADER_FIXED_LEN;
        let header = loop {
            let have = buf.len();
            // `want` is bounded by the header parser (name <= 4096 bytes).
            let upto = (want as u64).min(file_len) as usize;
            if upto > have {
                buf.resize(upto, 0);
                read_exact(&mut inner, &mut buf[have..], &path, have as u64, file_len)?;
            }
            match format::parse_header(&buf) {
                Ok((h, len)) => {
                    hasher.update(&buf[..len]);
                    break h;
                }
                Err(ParseError::Bad { at, what }) => {
                    return Err(HrlError::corrupt(&path, at as u64, what))
                }
                Err(ParseError::Short { need }) => {
                    if need as u64 > file_len {
                        return Err(if file_len == 0 {
                            HrlError::corrupt(
                                &path,
                                0,
                                "log is truncated at offset 0: the file is empty",
                            )
                        } else {
                            truncated(&path, file_len, need as u64 - file_len, "the header")
                        });
                    }
                    if need <= buf.len() {
                        // Cannot happen with a correct parser; never loop.
                        return Err(HrlError::corrupt(&path, 0, "header does not parse"));
                    }
                    want = need;
                }
            }
        };
        let pos = buf.len() as u64;
        Ok(HrlReader {
            inner,
            file_len,
            pos,
            header,
            hasher,
            payload: Vec::new(),
            decoded: Vec::new(),
            prev_end: 0,
            summary: HrlSummary {
                path: path.clone(),
                file_bytes: file_len,
                ..HrlSummary::default()
            },
            path,
            sealed: false,
            failed: false,
            streaming: false,
        })
    }

    /// Read a log of unknown length as it arrives from `inner` (the
    /// receiver checks a log while it streams in, instead of reading it
    /// back): the same checks as [`HrlReader::new`], the stream's end
    /// anywhere before the seal is a truncation, and after the seal the
    /// stream must end (a byte more is an error).
    pub fn streaming(inner: R, label: &Path) -> Result<Self, HrlError> {
        let mut r = HrlReader::new(inner, STREAM_LEN, label)?;
        r.streaming = true;
        Ok(r)
    }

    /// The log's header.
    pub fn header(&self) -> &HrlHeader {
        &self.header
    }

    /// The path errors name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The summary once the seal has been read and checked.
    pub fn summary(&self) -> Option<&HrlSummary> {
        self.sealed.then_some(&self.summary)
    }

    fn fail(&mut self, e: HrlError) -> HrlError {
        self.failed = true;
        e
    }

    /// The next record, or `Ok(None)` once the trailer and seal have been
    /// checked (the log is then known to be complete and intact).
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, HrlError> {
        if self.sealed {
            return Ok(None);
        }
        if self.failed {
            return Err(HrlError::corrupt(
                &self.path,
                self.pos,
                "reading stopped at an earlier error",
            ));
        }
        match self.read_frame() {
            Ok(Some(rec)) => {
                let data = match rec.encoding {
                    Encoding::Zero => None,
                    Encoding::Raw => Some(&self.payload[..]),
                    Encoding::Lz4 => Some(&self.decoded[..]),
                };
                Ok(Some(Record {
                    file_offset: self.pos - u64::from(rec.stored_len) - 32,
                    offset: rec.offset,
                    length: rec.length,
                    encoding: rec.encoding,
                    stored: &self.payload[..],
                    data,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Read one frame; for a record, leaves the payload (and LZ4 output) in
    /// the buffers.
    fn read_frame(&mut self) -> Result<Option<RecordHeader>, HrlError> {
        let at = self.pos;
        let remaining = self.file_len - self.pos;
        let mut head = [0u8; format::TRAILER_LEN];
        let first = (format::RECORD_HEADER_LEN as u64).min(remaining) as usize;
        read_exact(
            &mut self.inner,
            &mut head[..first],
            &self.path,
            at,
            self.file_len,
        )?;
        let frame = match format::parse_frame(&head[..first]) {
            Ok(f) => f,
            Err(ParseError::Short { need }) if need as u64 <= remaining => {
                read_exact(
                    &mut self.inner,
                    &mut head[first..need],
                    &self.path,
                    at + first as u64,
                    self.file_len,
                )?;
                match format::parse_frame(&head[..need]) {
                    Ok(f) => f,
                    Err(e) => return Err(self.parse_err(at, e, "the trailer")),
                }
            }
            Err(e) => return Err(self.parse_err(at, e, "a record header or the trailer")),
        };
        let hlen = frame.header_len();
        match frame {
            Frame::Trailer(t) => {
                self.pos = at + hlen as u64;
                let log_hash = self.hasher.digest128();
                if t.log_hash != log_hash {
                    return Err(HrlError::corrupt(
                        &self.path,
                        at + 24,
                        "whole-log checksum mismatch: the log was altered after it was written",
                    ));
                }
                if t.record_count != self.summary.records {
                    return Err(HrlError::corrupt(
                        &self.path,
                        at + 8,
                        format!(
                            "trailer says {} records, the log holds {}",
                            t.record_count, self.summary.records
                        ),
                    ));
                }
                if t.data_bytes != self.summary.data_bytes {
                    return Err(HrlError::corrupt(
                        &self.path,
                        at + 16,
                        format!(
                            "trailer says {} data bytes, the records cover {}",
                            t.data_bytes, self.summary.data_bytes
                        ),
                    ));
                }
                if self.streaming {
                    self.end_of_stream()?;
                    self.file_len = self.pos;
                    self.summary.file_bytes = self.pos;
                }
                if self.pos != self.file_len {
                    return Err(HrlError::corrupt(
                        &self.path,
                        self.pos,
                        format!(
                            "{} unexpected bytes after the seal",
                            self.file_len - self.pos
                        ),
                    ));
                }
                self.summary.log_checksum = hex(&log_hash.to_le_bytes());
                self.sealed = true;
                Ok(None)
            }
            Frame::Record(rec) => {
                self.hasher.update(&head[..hlen]);
                let end = rec.offset.checked_add(u64::from(rec.length));
                if rec.offset < self.prev_end {
                    return Err(HrlError::corrupt(
                        &self.path,
                        at + 8,
                        format!(
                            "record at disk offset {} overlaps or precedes the previous record ending at {}",
                            rec.offset, self.prev_end
                        ),
                    ));
                }
                let end = match end {
                    Some(e) if e <= self.header.disk_size => e,
                    _ => {
                        return Err(HrlError::corrupt(
                            &self.path,
                            at + 8,
                            format!(
                                "record at disk offset {} of {} bytes runs past the disk size {}",
                                rec.offset, rec.length, self.header.disk_size
                            ),
                        ))
                    }
                };
                let stored = u64::from(rec.stored_len);
                let after_head = at + hlen as u64;
                if stored > self.file_len - after_head {
                    return Err(truncated(
                        &self.path,
                        self.file_len,
                        stored - (self.file_len - after_head),
                        "a record payload",
                    ));
                }
                // stored <= MAX_RECORD_LEN (parse_frame) and fits in the file.
                debug_assert!(rec.stored_len <= MAX_RECORD_LEN);
                self.payload.clear();
                self.payload.resize(rec.stored_len as usize, 0);
                read_exact(
                    &mut self.inner,
                    &mut self.payload,
                    &self.path,
                    after_head,
                    self.file_len,
                )?;
                self.hasher.update(&self.payload);
                if let Err(e) = rec.check_payload(&self.payload, &mut self.decoded) {
                    return Err(self.parse_err(at, e, "a record payload"));
                }
                self.pos = after_head + stored;
                self.prev_end = end;
                self.summary.records += 1;
                self.summary.data_bytes += u64::from(rec.length);
                self.summary.stored_bytes += stored;
                match rec.encoding {
                    Encoding::Zero => self.summary.zero_records += 1,
                    Encoding::Lz4 => self.summary.lz4_records += 1,
                    Encoding::Raw => {}
                }
                Ok(Some(rec))
            }
        }
    }

    fn parse_err(&self, at: u64, e: ParseError, what: &str) -> HrlError {
        match e {
            ParseError::Bad { at: rel, what } => {
                HrlError::corrupt(&self.path, at + rel as u64, what)
            }
            ParseError::Short { need } => truncated(
                &self.path,
                self.file_len,
                (at + need as u64).saturating_sub(self.file_len),
                what,
            ),
        }
    }

    /// After the seal of a streamed log: the stream must end there.
    fn end_of_stream(&mut self) -> Result<(), HrlError> {
        let mut one = [0u8; 1];
        loop {
            return match self.inner.read(&mut one) {
                Ok(0) => Ok(()),
                Ok(_) => Err(HrlError::corrupt(
                    &self.path,
                    self.pos,
                    "unexpected bytes after the seal",
                )),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(HrlError::io(&self.path, e)),
            };
        }
    }

    /// Read to the end, checking everything; returns the summary.
    pub fn finish(mut self) -> Result<HrlSummary, HrlError> {
        while self.next_record()?.is_some() {}
        Ok(self.summary)
    }
}

fn read_exact<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    path: &Path,
    at: u64,
    file_len: u64,
) -> Result<(), HrlError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof && file_len == STREAM_LEN {
            HrlError::corrupt(
                path,
                at,
                format!("log is truncated at offset {at}: the stream ended before the seal"),
            )
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HrlError::corrupt(
                path,
                at,
                format!(
                    "log is truncated at offset {at}: the file shrank while being read (it was {file_len} bytes)"
                ),
            )
        } else {
            HrlError::io(path, e)
        }
    })
}

/// Check a whole log: header, every record (checksum, encoding, order,
/// bounds), the whole-log checksum and the seal. Streams the file; memory is
/// bounded by the record size cap.
pub fn verify(path: &Path) -> Result<(HrlHeader, HrlSummary), HrlError> {
    let r = HrlReader::open(path)?;
    let header = r.header().clone();
    Ok((header, r.finish()?))
}

/// [`verify`] for a log held in memory (for fuzzing and tests).
pub fn verify_bytes(bytes: &[u8]) -> Result<(HrlHeader, HrlSummary), HrlError> {
    let r = HrlReader::from_bytes(bytes, Path::new("<memory>"))?;
    let header = r.header().clone();
    Ok((header, r.finish()?))
}

#[derive(serde::Serialize)]
struct JsonHeader<'a> {
    format_version: u32,
    disk_id: String,
    disk_name: &'a str,
    cycle: u64,
    base_cycle: u64,
    block_size: u32,
    base_size: u64,
    disk_size: u64,
    cut_unix_ns: u64,
}

#[derive(serde::Serialize)]
struct JsonRecord {
    file_offset: u64,
    offset: u64,
    length: u32,
    encoding: Encoding,
    stored_bytes: u64,
}

fn out_err(e: std::io::Error) -> HrlError {
    HrlError::io(Path::new("<stdout>"), e)
}

fn json_err(e: serde_json::Error) -> HrlError {
    HrlError::io(Path::new("<stdout>"), std::io::Error::other(e))
}

/// Print a log's header and one line per record to `out`, human-readably or
/// (with `json`) as one JSON document `{header, records, summary, error}`.
/// On a damaged log, prints what it could read and returns the error (the
/// JSON document is still complete, with `summary: null` and the `error`).
pub fn dump<R: Read>(
    reader: Result<HrlReader<R>, HrlError>,
    json: bool,
    out: &mut dyn Write,
) -> Result<HrlSummary, HrlError> {
    let mut r = reader?;
    let h = r.header().clone();
    if json {
        // The header's fields one by one, as `wire::LogBegin::from_header`
        // copies them: each output format names its fields itself.
        let jh = JsonHeader {
            format_version: format::FORMAT_VERSION,
            disk_id: hex(&h.disk_id),
            disk_name: &h.disk_name,
            cycle: h.cycle,
            base_cycle: h.base_cycle,
            block_size: h.block_size,
            base_size: h.base_size,
            disk_size: h.disk_size,
            cut_unix_ns: h.cut_unix_ns,
        };
        out.write_all(b"{\"header\":").map_err(out_err)?;
        serde_json::to_writer(&mut *out, &jh).map_err(json_err)?;
        out.write_all(b",\"records\":[").map_err(out_err)?;
    } else {
        writeln!(
            out,
            "log {}\n  format      version {}\n  disk        {} (id {})\n  cycle       {} (from base cycle {})\n  disk size   {} bytes (base {} bytes)\n  block size  {} bytes\n  cut at      {} ns since the Unix epoch",
            r.path().display(),
            format::FORMAT_VERSION,
            h.disk_name,
            hex(&h.disk_id),
            h.cycle,
            h.base_cycle,
            h.disk_size,
            h.base_size,
            h.block_size,
            h.cut_unix_ns
        )
        .map_err(out_err)?;
        writeln!(
            out,
            "{:>20} {:>10} {:>8} {:>10}",
            "offset", "length", "encoding", "stored"
        )
        .map_err(out_err)?;
    }
    let mut first = true;
    let result = loop {
        match r.next_record() {
            Ok(Some(rec)) => {
                if json {
                    if !first {
                        out.write_all(b",").map_err(out_err)?;
                    }
                    let jr = JsonRecord {
                        file_offset: rec.file_offset,
                        offset: rec.offset,
                        length: rec.length,
                        encoding: rec.encoding,
                        stored_bytes: rec.stored.len() as u64,
                    };
                    serde_json::to_writer(&mut *out, &jr).map_err(json_err)?;
                } else {
                    writeln!(
                        out,
                        "{:>20} {:>10} {:>8} {:>10}",
                        rec.offset,
                        rec.length,
                        rec.encoding.name(),
                        rec.stored.len()
                    )
                    .map_err(out_err)?;
                }
                first = false;
            }
            Ok(None) => break Ok(r.summary.clone()),
            Err(e) => break Err(e),
        }
    };
    if json {
        out.write_all(b"],\"summary\":").map_err(out_err)?;
        match &result {
            Ok(s) => serde_json::to_writer(&mut *out, s).map_err(json_err)?,
            Err(_) => out.write_all(b"null").map_err(out_err)?,
        }
        out.write_all(b",\"error\":").map_err(out_err)?;
        let err = result.as_ref().err().map(|e| e.to_string());
        serde_json::to_writer(&mut *out, &err).map_err(json_err)?;
        out.write_all(b"}\n").map_err(out_err)?;
    } else {
        match &result {
            Ok(s) => writeln!(
                out,
                "sealed: {} records covering {} bytes ({} zero, {} lz4), {} payload bytes, {} file bytes, checksum {}",
                s.records,
                s.data_bytes,
                s.zero_records,
                s.lz4_records,
                s.stored_bytes,
                s.file_bytes,
                s.log_checksum
            )
            .map_err(out_err)?,
            Err(_) => writeln!(out, "NOT VALID: stopped after {} records", r.summary.records)
                .map_err(out_err)?,
        }
    }
    result
}

/// [`dump`] for a log held in memory (for fuzzing and tests).
pub fn dump_bytes(bytes: &[u8], json: bool, out: &mut dyn Write) -> Result<HrlSummary, HrlError> {
    dump(
        HrlReader::from_bytes(bytes, Path::new("<memory>")),
        json,
        out,
    )
}
