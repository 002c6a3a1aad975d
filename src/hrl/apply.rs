//! Applying a log to a replica image.

use super::reader::HrlReader;
use super::writer::sync_parent_dir;
use super::{HrlError, HrlHeader, HrlSummary};
use crate::util::hex;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How to apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Write zeros for ZERO records instead of punching holes.
    pub write_zeros: bool,
}

/// What an apply did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub header: HrlHeader,
    pub summary: HrlSummary,
    /// The image's cycle before (from its state file; `None` when there was
    /// none and the image was assumed to be at `base_cycle`).
    pub previous_cycle: Option<u64>,
    /// True if this finished an apply of the same log that was interrupted.
    pub resumed: bool,
    /// Things the operator should know (e.g. the base was assumed).
    pub warnings: Vec<String>,
    /// Records written with data.
    pub data_records: u64,
    /// ZERO records (holes punched or zeros written).
    pub zero_records: u64,
    /// Disk bytes written or zeroed.
    pub bytes: u64,
}

/// The replica state kept next to an image in `IMAGE.vdrep-state`, rewritten
/// (atomically) after each successful apply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageState {
    /// The tracked disk's identity, 32 hex digits.
    pub disk_id: String,
    pub disk_name: String,
    /// The cut the image is at.
    pub cycle: u64,
    /// The image's size at `cycle`.
    pub size: u64,
    /// Set while a log leading to this cycle is being written into the image:
    /// the image is then between `cycle` and `applying`, and only that log
    /// (re-applied) can complete it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applying: Option<u64>,
}

/// `IMAGE.vdrep-state`.
pub fn state_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".vdrep-state");
    PathBuf::from(s)
}

/// Read the state sidecar of `image`, if there is one.
pub fn read_state(image: &Path) -> Result<Option<ImageState>, HrlError> {
    let path = state_path(image);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HrlError::io(&path, e)),
    };
    let st: ImageState = serde_json::from_slice(&bytes).map_err(|e| HrlError::State {
        path: path.clone(),
        what: format!("{e}"),
    })?;
    if st.disk_id.len() != 32 || !st.disk_id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(HrlError::State {
            path,
            what: format!("disk_id {:?} is not 32 hex digits", st.disk_id),
        });
    }
    Ok(Some(st))
}

fn write_state(image: &Path, st: &ImageState) -> Result<(), HrlError> {
    let path = state_path(image);
    let tmp = super::writer::tmp_path_for(&path);
    let mut json =
        serde_json::to_vec_pretty(st).map_err(|e| HrlError::io(&path, std::io::Error::other(e)))?;
    json.push(b'\n');
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        sync_parent_dir(&path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(HrlError::io(&path, e));
    }
    Ok(())
}

/// Apply the log at `log` to `image`.
///
/// 1. Verifies the whole log (nothing is touched if it is not intact and sealed).
/// 2. Checks the image is the log's base: with a state file, same disk id and
///    state cycle == `base_cycle` and unchanged size; without one, image
///    length == `base_size` (the image is then *assumed* to be the disk as of
///    `base_cycle`, and the report carries a warning).
/// 3. Marks the state "applying", sets the image length to `disk_size`, writes
///    the records (ZERO records punch holes, or write zeros), fsyncs the image
///    and writes the new state.
///
/// Any refusal (steps 1–2) leaves the image and its state file unchanged. An
/// error during step 3 leaves the state marked "applying": re-applying the
/// same log completes the image.
pub fn apply(log: &Path, image: &Path, opts: &ApplyOptions) -> Result<ApplyReport, HrlError> {
    // Pass 1: verify, through the same open file pass 2 reads.
    let log_file = File::open(log).map_err(|e| HrlError::io(log, e))?;
    let log_len = log_file.metadata().map_err(|e| HrlError::io(log, e))?.len();
    let r = HrlReader::new(BufReader::with_capacity(256 << 10, &log_file), log_len, log)?;
    let header = r.header().clone();
    let summary = r.finish()?;

    // Base check.
    let mut warnings = Vec::new();
    let state = read_state(image)?;
    let img = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| HrlError::io(image, e))?;
    let meta = img.metadata().map_err(|e| HrlError::io(image, e))?;
    if !meta.is_file() {
        return Err(HrlError::InvalidInput {
            path: image.to_path_buf(),
            what: "the image is not a regular file".into(),
        });
    }
    let img_len = meta.len();
    let id = hex(&header.disk_id);
    let mut resumed = false;
    let previous_cycle = state.as_ref().map(|s| s.cycle);
    match &state {
        Some(st) => {
            if !st.disk_id.eq_ignore_ascii_case(&id) {
                return Err(HrlError::Mismatch(format!(
                    "{}: log {} is for disk {} ({}) but the image is a replica of disk {} ({}): wrong image",
                    image.display(),
                    log.display(),
                    id,
                    header.disk_name,
                    st.disk_id,
                    st.disk_name
                )));
            }
            if let Some(target) = st.applying {
                if target == header.cycle && st.cycle == header.base_cycle {
                    resumed = true;
                    warnings.push(format!(
                        "{}: completing an interrupted apply of cycle {} onto cycle {}",
                        image.display(),
                        target,
                        st.cycle
                    ));
                } else {
                    return Err(HrlError::Mismatch(format!(
                        "{}: an apply of cycle {target} onto cycle {} was interrupted; re-apply that log (cycle {target}, base cycle {}) before log {} (cycle {}, base cycle {})",
                        image.display(),
                        st.cycle,
                        st.cycle,
                        log.display(),
                        header.cycle,
                        header.base_cycle
                    )));
                }
            } else if st.cycle == header.cycle {
                return Err(HrlError::AlreadyApplied {
                    log: log.to_path_buf(),
                    image: image.to_path_buf(),
                    cycle: header.cycle,
                });
            } else if st.cycle != header.base_cycle {
                return Err(HrlError::Mismatch(format!(
                    "log {} is for base cycle {} but {} is at cycle {}: apply the logs in order",
                    log.display(),
                    header.base_cycle,
                    image.display(),
                    st.cycle
                )));
            } else if img_len != st.size {
                return Err(HrlError::Mismatch(format!(
                    "{}: image is {} bytes but its state file says {} bytes at cycle {}: it was changed outside vdrep; resync it",
                    image.display(),
                    img_len,
                    st.size,
                    st.cycle
                )));
            }
            if st.disk_name != header.disk_name {
                warnings.push(format!(
                    "{}: disk name changed from {:?} to {:?}",
                    image.display(),
                    st.disk_name,
                    header.disk_name
                ));
            }
        }
        None => {
            if img_len != header.base_size {
                return Err(HrlError::Mismatch(format!(
                    "{}: image is {} bytes but log {} starts from a disk of {} bytes (base cycle {}): wrong image or wrong log",
                    image.display(),
                    img_len,
                    log.display(),
                    header.base_size,
                    header.base_cycle
                )));
            }
            warnings.push(format!(
                "{}: no state file; assuming the image is disk {} as of cycle {}",
                image.display(),
                header.disk_name,
                header.base_cycle
            ));
        }
    }

    // Pass 2.
    write_state(
        image,
        &ImageState {
            disk_id: id.clone(),
            disk_name: header.disk_name.clone(),
            cycle: header.base_cycle,
            size: header.base_size,
            applying: Some(header.cycle),
        },
    )?;
    let io = |e| HrlError::io(image, e);
    img.set_len(header.disk_size).map_err(io)?;
    (&log_file)
        .seek(SeekFrom::Start(0))
        .map_err(|e| HrlError::io(log, e))?;
    let mut r = HrlReader::new(BufReader::with_capacity(256 << 10, &log_file), log_len, log)?;
    let mut report = ApplyReport {
        header: header.clone(),
        summary: summary.clone(),
        previous_cycle,
        resumed,
        warnings,
        data_records: 0,
        zero_records: 0,
        bytes: 0,
    };
    let mut punch = !opts.write_zeros;
    while let Some(rec) = r.next_record()? {
        match rec.data {
            Some(data) => {
                img.write_all_at(data, rec.offset).map_err(io)?;
                report.data_records += 1;
            }
            None => {
                crate::util::zero_range(&img, rec.offset, u64::from(rec.length), &mut punch)
                    .map_err(io)?;
                report.zero_records += 1;
            }
        }
        report.bytes += u64::from(rec.length);
    }
    let again = r.finish()?;
    if again.log_checksum != summary.log_checksum {
        return Err(HrlError::corrupt(
            log,
            0,
            "the log changed while being applied; re-apply it once it is stable",
        ));
    }
    img.sync_all().map_err(io)?;
    drop(img);
    write_state(
        image,
        &ImageState {
            disk_id: id,
            disk_name: header.disk_name.clone(),
            cycle: header.cycle,
            size: header.disk_size,
            applying: None,
        },
    )?;
    Ok(report)
}
