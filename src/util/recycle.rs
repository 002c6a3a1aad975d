//! Files reused instead of created and deleted.
//!
//! A store that writes a few files per replication cycle and deletes as
//! many (a temp file renamed over `state.json`, a log deleted once
//! applied) allocates and frees inodes at the cycle rate. On ext4 without
//! a journal that cost grows with the churn itself: the allocator skips
//! every inode freed in the last 60 s (360 s while its inode-table block
//! is dirty) and looks each one up on the way (`find_inode_bit` →
//! `recently_deleted`), so at 256 continuous VMs most of the receiver's
//! CPU went into `ext4_create` (session 32, kernel-notes/replication-speed.md).
//! Every file system pays something for a create and a delete.
//!
//! Two tools, both plain renames within one directory (no inode is
//! allocated or freed):
//! - [`replace`]: a file replaced whole (write the new content to a spare
//!   name, sync it, then swap it with the live name with
//!   `RENAME_EXCHANGE`): the old content stays under the spare name, to be
//!   overwritten next time. A reader that opened the old file just before
//!   a swap may read the next content in it before that is published:
//!   readers of such files check that the name still holds the file they
//!   read ([`read_published`]).
//! - [`take`] / [`give`]: a small pool of spare files in a directory
//!   (`.spare-0`, `.spare-1`, …). A file about to be deleted is given to
//!   the pool instead; a file about to be created is taken from it
//!   (renamed to the new name, then opened with `O_TRUNC`).
//!
//! Where the file system refuses the flags (`EINVAL`: not supported), both
//! fall back to what they replace: rename over, create, delete.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

/// Spare files a directory's pool holds at most.
pub const POOL: usize = 2;

fn rename_flags(from: &Path, to: &Path, flags: RenameFlags) -> io::Result<()> {
    renameat2(AT_FDCWD, from, AT_FDCWD, to, flags).map_err(io::Error::from)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// The spare name [`replace`] uses for `path` (`dir/.NAME.spare`).
pub fn spare_of(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.spare"))
}

/// Make `spare` (written and synced by the caller) the file at `path`:
/// swapped with it (`RENAME_EXCHANGE`: the old content stays at `spare`),
/// or renamed over it when there is no file at `path` yet or the file
/// system cannot swap. Atomic either way; the directory is the caller's
/// to sync.
pub fn replace(spare: &Path, path: &Path) -> io::Result<()> {
    match rename_flags(spare, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && spare.exists() => {
            std::fs::rename(spare, path)
        }
        Err(e) if unsupported(&e) => std::fs::rename(spare, path),
        Err(e) => Err(e),
    }
}

fn pool_name(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!(".spare-{i}"))
}

/// Is `name` one of a pool's spare names (for whoever lists the
/// directory)?
pub fn is_spare(name: &str) -> bool {
    name.strip_prefix(".spare-")
        .is_some_and(|n| n.parse::<usize>().is_ok())
}

/// Rename a spare file of `dir`'s pool to `to` (in `dir`); `true` if there
/// was one. The caller opens it with `O_TRUNC`. Two callers never get the
/// same spare (the rename is atomic: the loser sees `ENOENT`).
pub fn take(dir: &Path, to: &Path) -> bool {
    (0..POOL).any(|i| std::fs::rename(pool_name(dir, i), to).is_ok())
}

/// Keep `file` (in `dir`) as a spare of `dir`'s pool instead of deleting
/// it, emptied first (a spare holds no space); deleted when the pool is
/// full or the file system cannot rename without replacing. Errors are
/// ignored, as for a delete whose failure leaves only a stray file.
///
/// Only for a file nobody may still be reading through a descriptor: a
/// deleted file keeps its content for such a reader, a spare is rewritten
/// by its next user.
pub fn give(dir: &Path, file: &Path) {
    let emptied = nix::unistd::truncate(file, 0).is_ok();
    for i in (0..POOL).filter(|_| emptied) {
        match renameat2(
            AT_FDCWD,
            file,
            AT_FDCWD,
            &pool_name(dir, i),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return,
            Err(Errno::EEXIST) => continue,
            Err(_) => break,
        }
    }
    let _ = std::fs::remove_file(file);
}

/// Times [`read_published`] reads a file again before it gives up.
const READ_TRIES: usize = 8;

/// Read the file at `path` whole (opened by `open`) as it is published,
/// and parse it with `parse`. A file kept by [`replace`] is rewritten in
/// place once it is the spare, so a reader that opened it just before a
/// swap could read the *next* content before it is published (or a torn
/// one): the read counts only if `path` still names the file that was
/// read, and it is made again otherwise, or while the bytes do not parse
/// (a torn read). Then what was read was published, as with a file
/// replaced by a new one. After [`READ_TRIES`] reads the last parse error
/// is returned, or an error if the file kept moving.
pub fn read_published<T, E>(
    path: &Path,
    mut open: impl FnMut(&Path) -> io::Result<std::fs::File>,
    mut parse: impl FnMut(&[u8]) -> Result<T, E>,
) -> io::Result<Result<T, E>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut last_err = None;
    for _ in 0..READ_TRIES {
        let mut f = open(path)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        let read = f.metadata()?;
        match std::fs::symlink_metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (read.dev(), read.ino()) => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        match parse(&bytes) {
            Ok(v) => return Ok(Ok(v)),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Ok(Err(e)),
        None => Err(io::Error::other(format!(
            "{} was replaced {READ_TRIES} times while it was read",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_and_keeps_the_inode() {
        let d = tempfile::tempdir().unwrap();
        let live = d.path().join("state.json");
        let spare = spare_of(&live);
        assert_eq!(spare, d.path().join(".state.json.spare"));
        // First save: nothing to swap with.
        std::fs::write(&spare, b"one").unwrap();
        replace(&spare, &live).unwrap();
        assert_eq!(std::fs::read(&live).unwrap(), b"one");
        assert!(!spare.exists());
        // Later saves: the old content moves to the spare name.
        use std::os::unix::fs::MetadataExt;
        let ino_one = std::fs::metadata(&live).unwrap().ino();
        std::fs::write(&spare, b"two").unwrap();
        let ino_two = std::fs::metadata(&spare).unwrap().ino();
        replace(&spare, &live).unwrap();
        assert_eq!(std::fs::read(&live).unwrap(), b"two");
        assert_eq!(std::fs::read(&spare).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&live).unwrap().ino(), ino_two);
        assert_eq!(std::fs::metadata(&spare).unwrap().ino(), ino_one);
        // The third save reuses the first inode: none allocated.
        std::fs::write(&spare, b"three").unwrap();
        replace(&spare, &live).unwrap();
        assert_eq!(std::fs::metadata(&live).unwrap().ino(), ino_one);
        assert_eq!(std::fs::read(&live).unwrap(), b"three");
    }

    #[test]
    fn replace_without_a_spare_fails_and_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let live = d.path().join("f");
        std::fs::write(&live, b"old").unwrap();
        let e = replace(&spare_of(&live), &live).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(std::fs::read(&live).unwrap(), b"old");
    }

    #[test]
    fn the_pool_keeps_at_most_pool_files_and_hands_each_out_once() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut inos = Vec::new();
        for i in 0..POOL + 1 {
            let f = d.path().join(format!("{i}.hrl"));
            std::fs::write(&f, b"applied").unwrap();
            inos.push(std::fs::metadata(&f).unwrap().ino());
            give(d.path(), &f);
            assert!(!f.exists());
        }
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".spare-0", ".spare-1"]);
        assert!(names.iter().all(|n| is_spare(n)));
        let mut got = Vec::new();
        for i in 0..POOL {
            let t = d.path().join(format!("new{i}.tmp"));
            assert!(take(d.path(), &t));
            got.push(std::fs::metadata(&t).unwrap().ino());
        }
        assert!(!take(d.path(), &d.path().join("none.tmp")));
        got.sort();
        let mut kept = inos[..POOL].to_vec();
        kept.sort();
        assert_eq!(got, kept);
        assert!(!is_spare("12.hrl") && !is_spare(".spare-x") && !is_spare(".state.json.spare"));
    }

    #[test]
    fn read_published_never_returns_a_spare_or_an_older_state() {
        // A writer saving through `replace` as fast as it can, readers
        // checking they never see a value below one they saw: the swap
        // leaves the previous file as the spare, rewritten with the next
        // value before it is published.
        let d = tempfile::tempdir().unwrap();
        let live = d.path().join("state.json");
        let spare = spare_of(&live);
        let save = |v: u64| {
            std::fs::write(&spare, format!("{v:0>600}")).unwrap();
            replace(&spare, &live).unwrap();
        };
        save(0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (live, stop) = (live.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut last = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let got = read_published(
                            &live,
                            |p| std::fs::File::open(p),
                            |b| {
                                std::str::from_utf8(b)
                                    .ok()
                                    .filter(|s| s.len() == 600)
                                    .and_then(|s| s.parse::<u64>().ok())
                                    .ok_or(())
                            },
                        );
                        if let Ok(Ok(v)) = got {
                            assert!(v >= last, "read {v} after {last}");
                            last = v;
                        }
                    }
                })
            })
            .collect();
        for v in 1..3000 {
            save(v);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let end = read_published(
            &live,
            |p| std::fs::File::open(p),
            |b| std::str::from_utf8(b).map(|s| s.parse::<u64>()),
        );
        assert_eq!(end.unwrap().unwrap().unwrap(), 2999);
    }
}
