//! The CPU priority (nice value) of the replication threads: the async
//! workers and blocking pool of the sender's and the receiver's runtimes
//! (`replication_nice`). Owns only the setting of one thread's nice value;
//! which threads get it is the runtimes' builders' choice.

/// Nice values Linux accepts.
pub const RANGE: std::ops::RangeInclusive<i32> = -20..=19;

/// A nice value outside [`RANGE`].
#[derive(Debug, thiserror::Error)]
#[error("replication_nice {0} is outside -20..=19: give a nice value (negative: before other work on the host)")]
pub struct BadNice(pub i64);

/// `n` as a nice value.
pub fn check(n: i64) -> Result<i32, BadNice> {
    i32::try_from(n)
        .ok()
        .filter(|n| RANGE.contains(n))
        .ok_or(BadNice(n))
}

/// Set the calling thread's nice value (Linux: per thread). A failure
/// (a negative value without CAP_SYS_NICE: EACCES/EPERM) is logged once per
/// process and the thread keeps its priority: the setting is a speed
/// lever, never a reason to stop replicating.
pub fn set_current_thread(nice: i32) {
    // SAFETY: gettid and setpriority take and return plain integers.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        let e = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::warn!(
                "cannot set the replication threads' nice value to {nice} ({e}); they keep the default priority (a negative value needs root or CAP_SYS_NICE)"
            )
        });
    }
}

/// A runtime builder's `on_thread_start` hook: sets each new thread's
/// nice value to `nice`, or does nothing for `None`.
pub fn setter(nice: Option<i32>) -> impl Fn() + Send + Sync + 'static {
    move || {
        if let Some(n) = nice {
            set_current_thread(n);
        }
    }
}

/// This thread's nice value (for tests and logs).
pub fn current_thread() -> std::io::Result<i32> {
    // SAFETY: as above; errno is cleared first because -1 is a valid value.
    unsafe {
        *libc::__errno_location() = 0;
        let tid = libc::gettid();
        let v = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        let e = std::io::Error::last_os_error();
        if v == -1 && e.raw_os_error() != Some(0) {
            return Err(e);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_linux_range_only() {
        assert_eq!(check(-20).unwrap(), -20);
        assert_eq!(check(19).unwrap(), 19);
        assert!(check(-21).is_err());
        assert!(check(20).is_err());
        assert!(check(i64::MAX).is_err());
    }

    #[test]
    fn sets_only_the_calling_thread() {
        let before = current_thread().unwrap();
        let target = (before + 3).min(19);
        let seen = std::thread::spawn(move || {
            set_current_thread(target);
            current_thread().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, target);
        assert_eq!(current_thread().unwrap(), before);
    }
}
