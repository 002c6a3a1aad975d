//! Writing a log: temp file, records, trailer, fsync, rename, fsync dir.

use super::format::{self, Encoding, RecordHeader, Trailer, MAX_RECORD_LEN};
use super::{HrlError, HrlHeader, HrlSummary};
use crate::util::hex;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// Streams records into a new log; the log becomes visible at its final path
/// only once complete, checksummed, sealed and fsynced.
///
/// Records must be appended in ascending disk order without overlap and lie
/// within the header's `disk_size`. After any error the writer is failed:
/// further calls return an error, and dropping it removes the temp file.
pub struct HrlWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    hasher: Xxh3,
    disk_size: u64,
    pos: u64,
    prev_end: u64,
    summary: HrlSummary,
    scratch: Vec<u8>,
    /// Records in a row that lz4 did not shrink: after [`LZ4_GIVE_UP`] of
    /// them only every [`LZ4_PROBE_EVERY`]th record is tried (random data,
    /// the usual payload of a busy VM's disk, costs lz4 a share of the
    /// sender's CPU for nothing), until one compresses again.
    incompressible: u32,
    failed: bool,
}

/// See [`HrlWriter`]'s `incompressible` (as the session's initial copy).
const LZ4_GIVE_UP: u32 = 8;
const LZ4_PROBE_EVERY: u64 = 16;

/// `.<name>.tmp` in the directory of `final_path`.
pub(crate) fn tmp_path_for(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.tmp"))
}

/// fsync the directory holding `path`, so a rename into it is durable.
pub(crate) fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl HrlWriter {
    /// Start a log that will be published at `final_path` by [`HrlWriter::finish`].
    pub fn create(final_path: &Path, header: &HrlHeader) -> Result<Self, HrlError> {
        if final_path.file_name().is_none() {
            return Err(HrlError::InvalidInput {
                path: final_path.to_path_buf(),
                what: "the log path has no file name".into(),
            });
        }
        let head = format::encode_header(header).map_err(|what| HrlError::InvalidInput {
            path: final_path.to_path_buf(),
            what: format!("cannot write this header: {what}"),
        })?;
        let tmp_path = tmp_path_for(final_path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|e| HrlError::io(&tmp_path, e))?;
        let mut w = HrlWriter {
            final_path: final_path.to_path_buf(),
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: Xxh3::new(),
            disk_size: header.disk_size,
            pos: 0,
            prev_end: 0,
            summary: HrlSummary {
                path: final_path.to_path_buf(),
                ..HrlSummary::default()
            },
            scratch: Vec::new(),
            incompressible: 0,
            failed: false,
        };
        w.write_hashed(&head)?;
        Ok(w)
    }

    fn write_hashed(&mut self, bytes: &[u8]) -> Result<(), HrlError> {
        let Some(out) = self.out.as_mut() else {
            return Err(self.failed_error());
        };
        if let Err(e) = out.write_all(bytes) {
            self.failed = true;
            return Err(HrlError::io(&self.tmp_path, e));
        }
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn failed_error(&self) -> HrlError {
        HrlError::InvalidInput {
            path: self.tmp_path.clone(),
            what: "an earlier error stopped this log; start a new one".into(),
        }
    }

    /// Append one record: `data` is the content of the disk at `offset` as of
    /// the cut. Offsets are block-aligned; the last record of a disk may be short.
    ///
    /// Runs of any length are accepted and split into records of at most
    /// [`MAX_RECORD_LEN`] bytes. Appends must come in ascending disk order
    /// without overlapping and stay within `disk_size`; an empty `data` is a
    /// no-op.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<(), HrlError> {
        if self.failed || self.out.is_none() {
            return Err(self.failed_error());
        }
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64);
        let what = match end {
            _ if offset < self.prev_end => Some(format!(
                "record at offset {offset} overlaps or precedes the previous one ending at {}: append in ascending order",
                self.prev_end
            )),
            Some(end) if end <= self.disk_size => None,
            _ => Some(format!(
                "record at offset {offset} of {} bytes runs past the disk size {}",
                data.len(),
                self.disk_size
            )),
        };
        if let Some(what) = what {
            self.failed = true;
            return Err(HrlError::InvalidInput {
                path: self.final_path.clone(),
                what,
            });
        }
        let mut off = offset;
        for chunk in data.chunks(MAX_RECORD_LEN as usize) {
            self.append_record(off, chunk)?;
            off += chunk.len() as u64;
        }
        self.prev_end = off;
        Ok(())
    }

    fn append_record(&mut self, offset: u64, chunk: &[u8]) -> Result<(), HrlError> {
        let length = chunk.len() as u32;
        let mut scratch = std::mem::take(&mut self.scratch);
        let try_lz4 =
            self.incompressible < LZ4_GIVE_UP || self.summary.records % LZ4_PROBE_EVERY == 0;
        let (encoding, payload): (Encoding, &[u8]) = if format::is_all_zero(chunk) {
            (Encoding::Zero, &[])
        } else if !try_lz4 {
            (Encoding::Raw, chunk)
        } else {
            scratch.clear();
            scratch.resize(lz4_flex::block::get_maximum_output_size(chunk.len()), 0);
            match lz4_flex::block::compress_into(chunk, &mut scratch) {
                Ok(n) if n > 0 && n <= chunk.len() - chunk.len() / 8 && n < chunk.len() => {
                    self.incompressible = 0;
                    (Encoding::Lz4, &scratch[..n])
                }
                _ => {
                    self.incompressible = self.incompressible.saturating_add(1);
                    (Encoding::Raw, chunk)
                }
            }
        };
        let rec = RecordHeader::new(encoding, offset, length, payload);
        let res = self
            .write_hashed(&rec.encode())
            .and_then(|()| self.write_hashed(payload));
        self.scratch = scratch;
        res?;
        self.summary.records += 1;
        self.summary.data_bytes += u64::from(length);
        self.summary.stored_bytes += u64::from(rec.stored_len);
        match encoding {
            Encoding::Zero => self.summary.zero_records += 1,
            Encoding::Lz4 => self.summary.lz4_records += 1,
            Encoding::Raw => {}
        }
        Ok(())
    }

    /// Seal, fsync, rename into place, fsync the directory.
    pub fn finish(self) -> Result<HrlSummary, HrlError> {
        let sealed = self.seal()?;
        sealed
            .file()
            .sync_all()
            .map_err(|e| HrlError::io(&sealed.tmp_path, e))?;
        let final_path = sealed.final_path.clone();
        let summary = sealed.publish()?;
        sync_parent_dir(&final_path).map_err(|e| HrlError::io(&final_path, e))?;
        Ok(summary)
    }

    /// Seal (trailer written, buffers flushed into the temp file) without
    /// making it durable or publishing it: the caller syncs
    /// [`SealedLog::file`] (with other files, in one pass), then
    /// [`SealedLog::publish`]es it and syncs the directory.
    pub fn seal(mut self) -> Result<SealedLog, HrlError> {
        if self.failed || self.out.is_none() {
            return Err(self.failed_error());
        }
        let log_hash = self.hasher.digest128();
        let trailer = Trailer {
            record_count: self.summary.records,
            data_bytes: self.summary.data_bytes,
            log_hash,
        };
        self.write_hashed(&trailer.encode())?;
        let Some(out) = self.out.take() else {
            return Err(self.failed_error());
        };
        let file = match out.into_inner() {
            Ok(f) => f,
            Err(e) => {
                self.failed = true;
                return Err(HrlError::io(&self.tmp_path, e.into_error()));
            }
        };
        let mut summary = std::mem::take(&mut self.summary);
        summary.file_bytes = self.pos;
        summary.log_checksum = hex(&log_hash.to_le_bytes());
        // The temp file is the sealed log's now (it removes it if dropped
        // unpublished).
        let tmp_path = std::mem::take(&mut self.tmp_path);
        Ok(SealedLog {
            file,
            tmp_path,
            final_path: self.final_path.clone(),
            summary,
        })
    }
}

/// A sealed log still in its temp file ([`HrlWriter::seal`]); dropped
/// unpublished, the temp file is removed.
#[derive(Debug)]
pub struct SealedLog {
    file: File,
    tmp_path: PathBuf,
    final_path: PathBuf,
    summary: HrlSummary,
}

impl SealedLog {
    /// The temp file, to sync before [`publish`](Self::publish).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Rename into place (the directory is not synced: the caller's).
    pub fn publish(mut self) -> Result<HrlSummary, HrlError> {
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| HrlError::io(&self.final_path, e))?;
        self.tmp_path = PathBuf::new();
        Ok(std::mem::take(&mut self.summary))
    }
}

impl Drop for SealedLog {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

impl Drop for HrlWriter {
    fn drop(&mut self) {
        drop(self.out.take());
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}
