//! The kernel's cap on the size of one FUSE request: the global sysctl
//! `fs.fuse.max_pages_limit` (`/proc/sys/fs/fuse/max_pages_limit`, Linux
//! 6.12+, default 256 pages = 1 MiB).
//!
//! This module owns that knob. The kernel copies the sysctl into a new
//! connection when the file system is mounted (`fuse_conn_init`) and caps
//! the `max_pages` of the server's `FUSE_INIT` answer with the copy, so
//! [`with_limit`] raises it for the `mount(2)` of one connection only and
//! puts the old value back right after: the change is never left behind,
//! other FUSE mounts made meanwhile are the only ones that can see it.
//! Raise-mount-restore runs under an exclusive `flock` of the sysctl file,
//! so two vdrep mounts (processes or threads) do not restore each other's
//! value. A kernel without the sysctl (before 6.12: fixed at 256 pages) or
//! a process not allowed to write it mounts with the limit as it is (one
//! log line says so); the caller then asks for no more than that
//! ([`max_write_for`]), so request buffers stay sized to what the kernel
//! really sends. Measured in kernel-notes/writepath.md (session 12).

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The sysctl's file.
pub const SYSCTL: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// The kernel's limit where the sysctl does not exist (`FUSE_MAX_MAX_PAGES`
/// before 6.12) and its default since.
pub const KERNEL_DEFAULT_PAGES: u32 = 256;

/// The largest value the kernel accepts (`fuse_init_out.max_pages` is u16).
pub const MAX_PAGES: u32 = 65535;

/// The system's page size in bytes.
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u32
    } else {
        4096
    }
}

/// Pages needed for requests of `max_write` bytes, within the kernel's range.
pub fn pages_for(max_write: u32) -> u32 {
    max_write.div_ceil(page_size()).clamp(1, MAX_PAGES)
}

/// The `max_write` to answer `FUSE_INIT` with: `wanted`, but no more than
/// `pages` pages (the limit the connection got).
pub fn max_write_for(wanted: u32, pages: u32) -> u32 {
    wanted.min(pages.saturating_mul(page_size())).max(4096)
}

/// Mount with `fs.fuse.max_pages_limit` at least `want` pages: runs
/// `mount(limit)`, where `limit` is the limit the new connection gets
/// (`want`, or less when the kernel or the permissions refuse), and puts
/// the sysctl back to its old value afterwards.
pub fn with_limit<T>(want: u32, mount: impl FnOnce(u32) -> T) -> T {
    with_limit_at(Path::new(SYSCTL), want, mount)
}

/// [`with_limit`] on another file than [`SYSCTL`] (tests).
pub fn with_limit_at<T>(sysctl: &Path, want: u32, mount: impl FnOnce(u32) -> T) -> T {
    let want = want.clamp(1, MAX_PAGES);
    let mut f = match File::options().read(true).write(true).open(sysctl) {
        Ok(f) => f,
        Err(e) => {
            let now = read_limit(sysctl).unwrap_or(KERNEL_DEFAULT_PAGES);
            if now < want {
                tracing::info!(
                    "FUSE requests limited to {now} pages ({} KiB): cannot raise {} to {want} ({e}; a kernel before 6.12 has a fixed limit, else run the mount as root)",
                    now as u64 * page_size() as u64 / 1024,
                    sysctl.display()
                );
            }
            return mount(now.min(want));
        }
    };
    // Held until the end of this function: one raise-mount-restore at a time.
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        tracing::warn!(
            "cannot lock {} ({}): raising it anyway",
            sysctl.display(),
            io::Error::last_os_error()
        );
    }
    let old = match read_from(&mut f) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                "cannot read {} ({e}): FUSE requests limited to {KERNEL_DEFAULT_PAGES} pages",
                sysctl.display()
            );
            return mount(KERNEL_DEFAULT_PAGES.min(want));
        }
    };
    if old >= want {
        return mount(want);
    }
    if let Err(e) = write_to(&mut f, want) {
        tracing::info!(
            "FUSE requests limited to {old} pages: the kernel refused {want} in {} ({e})",
            sysctl.display()
        );
        return mount(old);
    }
    let _restore = Restore {
        f: &mut f,
        path: sysctl,
        old,
        set: want,
    };
    mount(want)
}

/// Puts the sysctl back (also when the mount panics), unless someone else
/// changed it meanwhile.
struct Restore<'a> {
    f: &'a mut File,
    path: &'a Path,
    old: u32,
    set: u32,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        match read_from(self.f) {
            Ok(now) if now != self.set => {
                tracing::warn!(
                    "{} changed to {now} during the mount (vdrep set {}): left as it is",
                    self.path.display(),
                    self.set
                );
                return;
            }
            _ => {}
        }
        if let Err(e) = write_to(self.f, self.old) {
            tracing::error!(
                "cannot put {} back to {} ({e}); it stays at {}: set it with `sysctl fs.fuse.max_pages_limit={}`",
                self.path.display(),
                self.old,
                self.set,
                self.old
            );
        }
    }
}

fn read_limit(path: &Path) -> io::Result<u32> {
    read_from(&mut File::open(path)?)
}

fn read_from(f: &mut File) -> io::Result<u32> {
    f.rewind()?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {s:?}")))
}

fn write_to(f: &mut File, v: u32) -> io::Result<()> {
    f.rewind()?;
    // A regular file (tests) is emptied first; procfs needs no truncation
    // (the write replaces the value) and may refuse it.
    let _ = f.set_len(0);
    f.write_all(format!("{v}\n").as_bytes())?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl_file(v: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("max_pages_limit");
        std::fs::write(&p, v).unwrap();
        (d, p)
    }

    #[test]
    fn raised_for_the_mount_and_put_back_after() {
        let (_d, p) = sysctl_file("256\n");
        let seen = with_limit_at(&p, 1024, |pages| {
            (
                pages,
                std::fs::read_to_string(&p).unwrap().trim().to_string(),
            )
        });
        assert_eq!(seen, (1024, "1024".to_string()));
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "256");
    }

    #[test]
    fn left_alone_when_already_high_enough() {
        let (_d, p) = sysctl_file("2048\n");
        assert_eq!(with_limit_at(&p, 1024, |pages| pages), 1024);
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "2048");
    }

    #[test]
    fn missing_sysctl_means_the_old_fixed_limit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("absent");
        assert_eq!(with_limit_at(&p, 1024, |pages| pages), KERNEL_DEFAULT_PAGES);
        assert!(!p.exists());
    }

    #[test]
    fn a_value_changed_by_someone_else_during_the_mount_is_kept() {
        let (_d, p) = sysctl_file("256\n");
        with_limit_at(&p, 1024, |_| std::fs::write(&p, "512\n").unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "512");
    }

    #[test]
    fn put_back_when_the_mount_panics() {
        let (_d, p) = sysctl_file("256\n");
        let r = std::panic::catch_unwind(|| with_limit_at(&p, 1024, |_| panic!("mount")));
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "256");
    }

    #[test]
    fn max_write_follows_the_limit() {
        let ps = page_size();
        assert_eq!(max_write_for(4 << 20, 256), (256 * ps).min(4 << 20));
        assert_eq!(max_write_for(1 << 20, 1024), 1 << 20);
        assert_eq!(pages_for(4 << 20), (4u32 << 20).div_ceil(ps));
    }
}
