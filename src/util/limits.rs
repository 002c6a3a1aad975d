//! The process's limit of open files, raised once at start.
//!
//! A recovery point is read through one open undo record per cycle of its
//! chain ([`crate::replica`]'s `PointReader`): a continuous VM's point 2 h
//! back holds ~7,200 of them. With the usual soft limit of 1,024 a point
//! ~1,000 cycles back failed with "Too many open files"
//! (`examples/history_scale.rs` under `ulimit -n 1024`, session 33). Like
//! Go's runtime, vdrep raises the soft limit to the hard one; the systemd
//! units set both to 65,536. vdrep waits on descriptors with `poll` and
//! `epoll`, never `select`, so descriptors above 1,024 are safe.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raise the soft limit of open files to the hard limit. Returns the
/// limits in force afterwards `(soft, hard)`, or the error of reading or
/// setting them (the limits are then unchanged).
pub fn raise_open_files() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(1024).min(soft);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let (s, h) = raise_open_files().unwrap();
        assert_eq!((s, h), (hard, hard));
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    }
}
