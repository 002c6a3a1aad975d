//! Skipping a check whose prerequisite is missing here. With
//! `VDREP_STRICT=1` (set by `.ci/run`, where every prerequisite is installed)
//! a skip is a failure: a check that silently does not run proves nothing.
#![allow(dead_code)]

/// Print `msg` (a "SKIP: …" line) and return, or panic under `VDREP_STRICT=1`.
pub fn skip(msg: &str) {
    if std::env::var("VDREP_STRICT").as_deref() == Ok("1") {
        panic!("{msg}\nVDREP_STRICT=1: this check may not be skipped here; install the prerequisite (bash .ci/run)");
    }
    println!("{msg}");
    // nextest captures a passing test's output: scripts/test.sh names a file
    // here so its summary can list every skip all the same.
    if let Ok(path) = std::env::var("VDREP_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{msg}");
        }
    }
}
