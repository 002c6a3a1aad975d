//! Aborting the FUSE connection of a mount whose server is gone, through the
//! fuse control file system (`/sys/fs/fuse/connections/N/abort`), and
//! finding a mount without looking it up through itself.
//!
//! A connection lives while any process holds one of its `/dev/fuse`
//! descriptors. If the server is dead but a descriptor survives (a process
//! stuck exiting with a file open on its own mount, a descriptor leaked to
//! another process), every request waits for an answer that never comes:
//! a `close` then hangs in `fuse_flush` in `D` state, and a lazy unmount
//! only hides the mount. Aborting the connection ends every waiting and
//! future request with `ENOTCONN` (kernel-notes/fuse-connection.md).
//!
//! Nothing here sends a request to the mount's server: a `stat` of a dead
//! mount's root can wait for the dead server too. The mount is found in
//! `/proc/self/mountinfo`, its connection by its device number.
//!
//! A connection's number is its super block's anonymous device number,
//! which the kernel gives to the next new mount as soon as the old super
//! block is gone. Between reading mountinfo and writing `abort`, the dead
//! mount may be unmounted by someone else and its number handed to another
//! FUSE mount, whose healthy connection the abort would then kill. So
//! [`PinnedMount`] holds an `O_PATH` descriptor of the mount's root while
//! it aborts: that keeps the super block, and so the number, alive, and the
//! number is read from the pinned root itself (`statx` with
//! `AT_STATX_DONT_SYNC`, answered from the inode cache without a request).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where the fuse control file system is mounted.
pub const CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// A mount as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// `fuse`, `fuse.vdrep`, `ext4`, ...
    pub fstype: String,
}

impl MountEntry {
    /// A FUSE mount?
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }

    /// The connection's name under [`CONNECTIONS`]: the kernel's `dev_t`
    /// of the mount's device (`major << 20 | minor`).
    pub fn connection(&self) -> u64 {
        (u64::from(self.major) << 20) | u64::from(self.minor)
    }
}

/// mountinfo's escaping of a path (space, tab, newline, backslash).
fn escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// The top mount whose mount point is exactly `dir` (a resolved path),
/// from mountinfo text `mi`.
fn find(mi: &str, dir: &Path) -> Option<MountEntry> {
    let want = escape(dir);
    mi.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) != Some(&want.as_str()) {
            return None;
        }
        let (major, minor) = f.get(2)?.split_once(':')?;
        let sep = f.iter().position(|x| *x == "-")?;
        Some(MountEntry {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            fstype: f.get(sep + 1)?.to_string(),
        })
    })
}

/// The top mount at exactly `dir` (a resolved path), if any.
pub fn mount_at(dir: &Path) -> io::Result<Option<MountEntry>> {
    Ok(find(&std::fs::read_to_string("/proc/self/mountinfo")?, dir))
}

/// `dir` resolved without a lookup through a mount at `dir` itself: the
/// resolved parent joined with the name when that is a mount point, else
/// the fully resolved path (or `dir` as given if it does not resolve).
pub fn resolve_mount_point(dir: &Path) -> PathBuf {
    let lexical = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(name)) => {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            std::fs::canonicalize(p).ok().map(|p| p.join(name))
        }
        _ => None,
    };
    if let Some(l) = lexical {
        if matches!(mount_at(&l), Ok(Some(_))) {
            return l;
        }
    }
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// A FUSE mount held by an `O_PATH` descriptor of its root: while this
/// lives, its connection number cannot pass to another mount. Drop it
/// before unmounting (the descriptor keeps the mount busy).
#[derive(Debug)]
pub struct PinnedMount {
    _root: std::os::fd::OwnedFd,
    entry: MountEntry,
}

impl PinnedMount {
    /// The top FUSE mount at exactly `dir` (a resolved path), pinned;
    /// `Ok(None)` when the top mount there is not FUSE (or there is none),
    /// or changed while it was being pinned.
    pub fn at(dir: &Path) -> io::Result<Option<PinnedMount>> {
        use nix::fcntl::OFlag;
        // O_PATH: the path walk ends on the mount's root without an open or
        // a lookup sent to its server.
        let root = match nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(io::Error::from(e)),
        };
        let (major, minor) = cached_dev(&root)?;
        Ok(mount_at(dir)?
            .filter(|m| m.is_fuse() && m.major == major && m.minor == minor)
            .map(|entry| PinnedMount { _root: root, entry }))
    }

    /// The mount as mountinfo lists it.
    pub fn entry(&self) -> &MountEntry {
        &self.entry
    }

    /// Abort its connection ([`abort`]).
    pub fn abort(&self) -> io::Result<bool> {
        abort(&self.entry)
    }
}

/// The device number of the inode behind `fd`, from the inode cache
/// (`AT_STATX_DONT_SYNC`: FUSE answers without asking its server).
fn cached_dev(fd: &std::os::fd::OwnedFd) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    // SAFETY: statx writes into `stx`, a plain C struct we own; the path
    // is an empty C string with AT_EMPTY_PATH, so `fd` itself is examined.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC | libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stx.stx_dev_major, stx.stx_dev_minor))
}

/// Mount the fuse control file system at [`CONNECTIONS`] unless it is.
fn ensure_fusectl() -> io::Result<()> {
    if mount_at(Path::new(CONNECTIONS))?.is_some_and(|m| m.fstype == "fusectl") {
        return Ok(());
    }
    nix::mount::mount(
        Some("fusectl"),
        CONNECTIONS,
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Abort the connection of the FUSE mount `m`: every request waiting for
/// an answer, and every later one, fails with `ENOTCONN`. `Ok(false)`: the
/// kernel has no such connection (already gone). Callers hold a
/// [`PinnedMount`] of `m` (its number may otherwise name another mount).
fn abort(m: &MountEntry) -> io::Result<bool> {
    ensure_fusectl()?;
    let path = Path::new(CONNECTIONS)
        .join(m.connection().to_string())
        .join("abort");
    match std::fs::OpenOptions::new().write(true).open(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(mut f) => f.write_all(b"1").map(|()| true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /sys/fs/fuse/connections rw,relatime shared:12 - fusectl fusectl rw
97 22 0:52 / /srv/my\\040vms rw,nosuid,nodev shared:50 - fuse.vdrep vdrep rw,user_id=0
98 97 0:53 / /srv/my\\040vms rw,nosuid,nodev shared:51 - fuse.vdrep vdrep rw,user_id=0
";

    #[test]
    fn finds_the_top_mount_and_its_connection() {
        let m = find(MI, Path::new("/srv/my vms")).unwrap();
        assert_eq!(
            m,
            MountEntry {
                major: 0,
                minor: 53,
                fstype: "fuse.vdrep".into()
            }
        );
        assert!(m.is_fuse());
        assert_eq!(m.connection(), 53);
        assert_eq!(
            MountEntry {
                major: 1,
                minor: 2,
                fstype: "ext4".into()
            }
            .connection(),
            (1 << 20) | 2
        );
        assert!(!find(MI, Path::new("/")).unwrap().is_fuse());
        assert_eq!(find(MI, Path::new("/srv")), None);
        assert_eq!(find(MI, Path::new(CONNECTIONS)).unwrap().fstype, "fusectl");
    }
}
