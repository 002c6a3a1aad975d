//! `vdrep hrl ...`: inspect, verify and apply change logs.

use crate::hrl::{apply, dump, verify, ApplyOptions, HrlError, HrlReader};
use std::io::Write;
use std::path::PathBuf;

/// Work with `.hrl` change logs (one sealed cycle of one disk).
#[derive(Debug, clap::Subcommand)]
pub enum HrlCmd {
    /// Print a log's header and one line per record (offset, length,
    /// encoding, stored bytes). A damaged log is printed up to the damage,
    /// then the command fails.
    Dump {
        /// The .hrl log to print.
        file: PathBuf,
        /// Print one JSON document {header, records, summary, error} instead.
        #[arg(long)]
        json: bool,
    },
    /// Apply a log to a replica image: the image must be the disk as of the
    /// log's base cycle (checked against IMAGE.vdrep-state, or the image size
    /// when there is no state file). The log is verified completely before
    /// the image is touched.
    Apply {
        /// The .hrl log to apply.
        file: PathBuf,
        /// The replica image (a regular file) to bring to the log's cycle.
        image: PathBuf,
    },
    /// Check a log completely (header, every record, whole-log checksum,
    /// seal) without applying it.
    Verify {
        /// The .hrl log to check.
        file: PathBuf,
    },
}

fn hint(e: &HrlError) -> &'static str {
    match e {
        HrlError::Corrupt { .. } => {
            "the log is damaged or incomplete and must not be applied; re-create or re-transfer it (if it cannot be recovered, resync the disk)"
        }
        HrlError::Mismatch(_) => {
            "the image is not the base of this log; apply the logs in order starting from the image's cycle, or resync the disk"
        }
        HrlError::AlreadyApplied { .. } => "nothing to do; apply the next log",
        HrlError::State { .. } => {
            "fix or remove the state file only if you know which cycle the image is at; otherwise resync the disk"
        }
        HrlError::Io { .. } => "check the path, permissions and free space, then retry",
        HrlError::InvalidInput { .. } => "check the arguments and retry",
    }
}

fn report_error(e: &HrlError) -> i32 {
    eprintln!("vdrep: {e}");
    eprintln!("vdrep: hint: {}", hint(e));
    if e.is_refusal() {
        2
    } else {
        1
    }
}

/// Run an `hrl` subcommand; returns the process exit code (0 ok, 2 the log
/// or image was refused, 1 other errors).
pub fn run(cmd: HrlCmd) -> i32 {
    match cmd {
        HrlCmd::Dump { file, json } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let res = dump(HrlReader::open(&file), json, &mut out);
            let flushed = out.flush();
            match (res, flushed) {
                (Err(e), _) => report_error(&e),
                (Ok(_), Err(e)) => report_error(&HrlError::io(std::path::Path::new("<stdout>"), e)),
                (Ok(_), Ok(())) => 0,
            }
        }
        HrlCmd::Verify { file } => match verify(&file) {
            Ok((h, s)) => {
                println!(
                    "{}: OK, sealed: disk {} cycle {} (from base cycle {}), {} records covering {} bytes, checksum {}",
                    file.display(),
                    h.disk_name,
                    h.cycle,
                    h.base_cycle,
                    s.records,
                    s.data_bytes,
                    s.log_checksum
                );
                0
            }
            Err(e) => report_error(&e),
        },
        HrlCmd::Apply { file, image } => match apply(&file, &image, &ApplyOptions::default()) {
            Ok(rep) => {
                for w in &rep.warnings {
                    eprintln!("vdrep: warning: {w}");
                }
                println!(
                    "{}: now at cycle {} ({} bytes): applied {} records from {} ({} with data, {} zero ranges, {} bytes)",
                    image.display(),
                    rep.header.cycle,
                    rep.header.disk_size,
                    rep.summary.records,
                    file.display(),
                    rep.data_records,
                    rep.zero_records,
                    rep.bytes
                );
                0
            }
            Err(e) => report_error(&e),
        },
    }
}
