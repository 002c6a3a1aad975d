//! Small helpers every layer shares (a leaf: imports nothing of the crate):
//! wall-clock nanoseconds, lower-case hex, random 128-bit identities, full
//! positional reads, zeroing a range of a file, and
//! one bounded run of an administrator's shell command ([`command`]), and
//! a stopwatch of named steps ([`steps`]), the debug events of a
//! replication cycle's phases ([`phase`]), read-ahead hints for
//! scattered reads ([`readahead`]), read-only mappings for hashing a file
//! where it lies in the page cache ([`mapped`]), and fsync per file or a
//! shared `syncfs` (group commit, [`durable`]), files reused instead
//! of created and deleted ([`recycle`]), and the open-files limit raised
//! at start ([`limits`]).

use std::time::{SystemTime, UNIX_EPOCH};

pub mod command;
pub mod direct;
pub mod durable;
pub mod limits;
pub mod mapped;
pub mod phase;
pub mod readahead;
pub mod recycle;
pub mod steps;

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// This machine's host name (empty if unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Read from `file` at `offset` until `buf` is full or the file ends
/// (retrying interrupted reads); returns the bytes read.
pub fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// [`read_full_at`], zero-filling what lies past the end of the file.
pub fn read_at_zero_filled(
    file: &std::fs::File,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    let done = read_full_at(file, buf, offset)?;
    buf[done..].fill(0);
    Ok(())
}

/// Make `len` bytes of `file` at `offset` read as zeros: punch a hole
/// while `*punch` (cleared when the file system cannot), else write zeros.
pub fn zero_range(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    punch: &mut bool,
) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;
    if len == 0 {
        return Ok(());
    }
    if *punch {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // Callers' ranges end within a disk (<= 2^60 bytes): both fit an off_t.
        match fallocate(file, flags, offset as libc::off_t, len as libc::off_t) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP)
            | Err(nix::errno::Errno::ENOSYS)
            | Err(nix::errno::Errno::EINVAL) => *punch = false,
            Err(e) => return Err(e.into()),
        }
    }
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A random 128-bit identity (a disk's, a failover's) from the system's
/// random source; if that fails, one derived from the time and the process
/// id (uniqueness is what matters, not secrecy).
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).is_err() {
        let seed = u128::from(now_ns()) ^ (u128::from(std::process::id()) << 64);
        id = xxhash_rust::xxh3::xxh3_128(&seed.to_le_bytes()).to_le_bytes();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_ids() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_ne!(random_id(), random_id());
        assert!(now_ns() > 1_600_000_000_000_000_000);
    }
}
