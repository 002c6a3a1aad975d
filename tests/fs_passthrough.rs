//! Real FUSE mounts of the passthrough file system over a temporary folder.
//! Skipped (with `SKIP: reason`) when `/dev/fuse` is missing or not root.

mod skip;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use fuser::BackgroundSession;
use vdrep::fs::{mount_untracked, FsOptions};
use vdrep::fuse::fusectl::PinnedMount;

struct Mounted {
    dir: tempfile::TempDir,
    sess: Option<BackgroundSession>,
}

impl Mounted {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Unmount through the session handle; afterwards paths reach the
    /// backing folder directly.
    fn unmount(&mut self) {
        if let Some(s) = self.sess.take() {
            s.umount_and_join().expect("umount_and_join");
        }
        assert!(!is_mounted(self.path()), "still mounted after unmount");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.sess.take() {
            let _ = s.umount_and_join();
        }
    }
}

fn skip_reason() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is absent".into());
    }
    // SAFETY: trivial libc call.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    None
}

fn is_mounted(p: &Path) -> bool {
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = p.to_string_lossy().to_string();
    mi.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && f[4] == want && l.contains(" - fuse")
    })
}

/// Mount over a fresh temp dir after `prepare` has populated it.
fn mount_with(opts: FsOptions, prepare: impl FnOnce(&Path)) -> Option<Mounted> {
    if let Some(r) = skip_reason() {
        skip::skip(&format!("SKIP: {r}"));
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let sess = mount_untracked(dir.path(), &opts)
        .expect("mount")
        .spawn()
        .expect("spawn");
    assert!(
        is_mounted(dir.path()),
        "not mounted: {}",
        fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
    );
    Some(Mounted {
        dir,
        sess: Some(sess),
    })
}

fn mount(prepare: impl FnOnce(&Path)) -> Option<Mounted> {
    mount_with(FsOptions::default(), prepare)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn preexisting_files_visible_and_intact_after_unmount() {
    let data = pattern(100_000, 7);
    let d2 = data.clone();
    let Some(mut m) = mount(move |d| {
        fs::create_dir(d.join("vm1")).unwrap();
        fs::write(d.join("vm1/disk.img"), &d2).unwrap();
    }) else {
        return;
    };
    assert_eq!(fs::read(m.p("vm1/disk.img")).unwrap(), data);
    // Modify through the mount.
    let f = OpenOptions::new()
        .write(true)
        .open(m.p("vm1/disk.img"))
        .unwrap();
    f.write_all_at(b"HELLO", 4096).unwrap();
    drop(f);
    m.unmount();
    let mut expect = data;
    expect[4096..4101].copy_from_slice(b"HELLO");
    assert_eq!(fs::read(m.p("vm1/disk.img")).unwrap(), expect);
}

#[test]
fn create_write_read_pread_truncate() {
    let Some(mut m) = mount(|_| {}) else { return };
    let p = m.p("a.raw");
    let data = pattern(3 << 20, 1);
    {
        let mut f = File::create(&p).unwrap();
        f.write_all(&data).unwrap();
    }
    let mut f = File::open(&p).unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    let mut buf = [0u8; 1000];
    f.read_exact_at(&mut buf, 1_234_567).unwrap();
    assert_eq!(&buf[..], &data[1_234_567..1_235_567]);
    f.seek(SeekFrom::Start(10)).unwrap();
    let mut b10 = [0u8; 10];
    f.read_exact(&mut b10).unwrap();
    assert_eq!(&b10[..], &data[10..20]);
    drop(f);

    // Truncate down, then up (hole reads as zeros).
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(5000).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 5000);
    f.set_len(9000).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), 9000);
    let got = fs::read(&p).unwrap();
    assert_eq!(&got[..5000], &data[..5000]);
    assert!(got[5000..].iter().all(|&b| b == 0));
    // truncate(2) by path (no file handle).
    let c = cpath(&p);
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 100) }, 0);
    assert_eq!(fs::metadata(&p).unwrap().len(), 100);
    // O_TRUNC open.
    {
        let mut f = File::create(&p).unwrap();
        f.write_all(b"xyz").unwrap();
    }
    // O_APPEND.
    {
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"123").unwrap();
    }
    assert_eq!(fs::read(&p).unwrap(), b"xyz123");
    m.unmount();
    assert_eq!(fs::read(&p).unwrap(), b"xyz123");
}

#[test]
fn punch_hole_and_seek_data_hole() {
    let Some(mut m) = mount(|_| {}) else { return };
    let p = m.p("sparse.img");
    let mb = 1 << 20;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(&pattern(4 * mb, 3), 0).unwrap();
    f.sync_all().unwrap();
    let blocks_before = forced_blocks(&p);
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            mb as i64,
            2 * mb as i64,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    f.sync_all().unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 4 * mb as u64);
    let blocks_after = forced_blocks(&p);
    assert!(
        blocks_after + 2 * (mb as u64) / 512 <= blocks_before,
        "st_blocks did not shrink: {blocks_before} -> {blocks_after}"
    );
    let mut buf = vec![1u8; 2 * mb];
    f.read_exact_at(&mut buf, mb as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // SEEK_DATA / SEEK_HOLE.
    // SAFETY: valid fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, mb as i64);
    // SAFETY: valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), mb as i64, libc::SEEK_DATA) };
    assert_eq!(data, 3 * mb as i64);
    // ZERO_RANGE and plain allocation beyond EOF with KEEP_SIZE.
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE,
            3 * mb as i64,
            4096,
        )
    };
    assert_eq!(r, 0, "zero range: {}", std::io::Error::last_os_error());
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            4 * mb as i64,
            mb as i64,
        )
    };
    assert_eq!(r, 0);
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 5 * mb as i64) };
    assert_eq!(r, 0);
    assert_eq!(fs::metadata(&p).unwrap().len(), 5 * mb as u64);
    drop(f);
    m.unmount();
    let got = fs::read(&p).unwrap();
    let orig = pattern(4 * mb, 3);
    assert_eq!(got.len(), 5 * mb);
    assert_eq!(&got[..mb], &orig[..mb]);
    assert!(got[mb..3 * mb].iter().all(|&b| b == 0));
    assert!(got[3 * mb..3 * mb + 4096].iter().all(|&b| b == 0));
    assert_eq!(&got[3 * mb + 4096..4 * mb], &orig[3 * mb + 4096..]);
}

/// `st_blocks` fetched from the file system, bypassing the attribute cache
/// (which, with the writeback cache, may predate the last flush).
fn forced_blocks(p: &Path) -> u64 {
    let c = cpath(p);
    // SAFETY: zeroed statx is a valid out-buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BLOCKS,
            &mut stx,
        )
    };
    assert_eq!(r, 0);
    stx.stx_blocks
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_variants() {
    let Some(mut m) = mount(|_| {}) else { return };
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::rename(m.p("a"), m.p("d/a2")).unwrap();
    assert!(!m.p("a").exists());
    assert_eq!(fs::read(m.p("d/a2")).unwrap(), b"A");
    // Over an existing file.
    fs::rename(m.p("d/a2"), m.p("b")).unwrap();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"A");
    // NOREPLACE.
    fs::write(m.p("c"), b"C").unwrap();
    let e = renameat2(&m.p("c"), &m.p("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    renameat2(&m.p("c"), &m.p("c2"), libc::RENAME_NOREPLACE).unwrap();
    // EXCHANGE.
    renameat2(&m.p("b"), &m.p("c2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"C");
    assert_eq!(fs::read(m.p("c2")).unwrap(), b"A");
    // Directory rename keeps contents reachable.
    fs::write(m.p("d/x"), b"X").unwrap();
    fs::rename(m.p("d"), m.p("e")).unwrap();
    assert_eq!(fs::read(m.p("e/x")).unwrap(), b"X");
    m.unmount();
    assert_eq!(fs::read(m.p("b")).unwrap(), b"C");
    assert_eq!(fs::read(m.p("c2")).unwrap(), b"A");
    assert_eq!(fs::read(m.p("e/x")).unwrap(), b"X");
    assert!(!m.p("d").exists() && !m.p("c").exists());
}

#[test]
fn unlink_open_file_still_readable() {
    let Some(mut m) = mount(|_| {}) else { return };
    let p = m.p("gone");
    fs::write(&p, b"still here").unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all_at(b"S", 0).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"S");
    drop(f);
    m.unmount();
    assert!(!p.exists());
}

#[test]
fn big_directory_readdir_mkdir_rmdir() {
    let n = 1500;
    let Some(mut m) = mount(move |d| {
        fs::create_dir(d.join("pre")).unwrap();
        for i in 0..n / 2 {
            fs::write(d.join(format!("pre/f{i:05}")), b"").unwrap();
        }
    }) else {
        return;
    };
    for i in n / 2..n {
        File::create(m.p(&format!("pre/f{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(m.p("pre"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), n, "each entry exactly once");
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n);
    // `.` and `..` via a raw readdir.
    let c = cpath(&m.p("pre"));
    let mut dots = 0;
    // SAFETY: valid C string; DIR* used and closed here.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let nm = std::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_bytes();
            if nm == b"." || nm == b".." {
                dots += 1;
            }
        }
        libc::closedir(d);
    }
    assert_eq!(dots, 2);
    // Delete while iterating: every surviving name is still seen once.
    let mut it = fs::read_dir(m.p("pre")).unwrap();
    let first = it.next().unwrap().unwrap().file_name();
    for i in 0..100 {
        let _ = fs::remove_file(m.p(&format!("pre/f{i:05}")));
    }
    let rest: Vec<_> = it.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(rest.len() + 1, n);
    let _ = first;
    fs::create_dir(m.p("sub")).unwrap();
    fs::create_dir(m.p("sub/deeper")).unwrap();
    assert!(fs::remove_dir(m.p("sub")).is_err());
    fs::remove_dir(m.p("sub/deeper")).unwrap();
    fs::remove_dir(m.p("sub")).unwrap();
    m.unmount();
    assert_eq!(fs::read_dir(m.p("pre")).unwrap().count(), n - 100);
    assert!(!m.p("sub").exists());
}

#[test]
fn symlink_hardlink_chmod_chown_utimens_statfs_xattr() {
    let Some(mut m) = mount(|_| {}) else { return };
    fs::write(m.p("t"), b"target").unwrap();
    std::os::unix::fs::symlink("t", m.p("l")).unwrap();
    assert_eq!(fs::read_link(m.p("l")).unwrap(), Path::new("t"));
    assert_eq!(fs::read(m.p("l")).unwrap(), b"target");
    assert!(fs::symlink_metadata(m.p("l"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Hard link shares the inode.
    fs::hard_link(m.p("t"), m.p("h")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("t")).unwrap(),
        fs::metadata(m.p("h")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);
    fs::write(m.p("h"), b"via link").unwrap();
    assert_eq!(fs::read(m.p("t")).unwrap(), b"via link");
    // chmod / chown.
    fs::set_permissions(m.p("t"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.p("t")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(m.p("t"), Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(m.p("t")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    std::os::unix::fs::lchown(m.p("l"), Some(42), Some(43)).unwrap();
    let md = fs::symlink_metadata(m.p("l")).unwrap();
    assert_eq!((md.uid(), md.gid()), (42, 43));
    // utimens: explicit times, then UTIME_NOW.
    let c = cpath(&m.p("t"));
    let ts = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 7,
        },
    ];
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(m.p("t")).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000, 5));
    assert_eq!((md.mtime(), md.mtime_nsec()), (2_000_000, 7));
    let now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), now.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(m.p("t")).unwrap();
    assert_eq!(md.atime(), 1_000_000);
    assert!(md.mtime() > 1_600_000_000);
    // statfs matches the backing file system.
    // SAFETY: zeroed statvfs is a valid out-buffer.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let cm = cpath(m.path());
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::statvfs(cm.as_ptr(), &mut sv) }, 0);
    let mut sb: libc::statvfs = unsafe { std::mem::zeroed() };
    let cp = cpath(m.path().parent().unwrap());
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::statvfs(cp.as_ptr(), &mut sb) }, 0);
    assert_eq!(sv.f_blocks, sb.f_blocks);
    assert_eq!(sv.f_bsize, sb.f_bsize);
    // xattrs (user.*).
    let name = CString::new("user.vdrep.test").unwrap();
    let val = b"value-123";
    // SAFETY: valid pointers.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 64];
    // SAFETY: valid pointers.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], val);
    // SAFETY: size query.
    let n0 = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n0 as usize, val.len());
    // SAFETY: ERANGE on a small buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 2) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    let mut lbuf = [0u8; 256];
    // SAFETY: valid pointers.
    let ln = unsafe { libc::listxattr(c.as_ptr(), lbuf.as_mut_ptr().cast(), lbuf.len()) };
    assert!(ln > 0);
    assert!(lbuf[..ln as usize]
        .split(|&b| b == 0)
        .any(|s| s == b"user.vdrep.test"));
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), name.as_ptr()) }, 0);
    // SAFETY: valid pointers.
    let r = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64) };
    assert_eq!(r, -1);
    // Put one back to check it persists on the backing file.
    // SAFETY: valid pointers.
    unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
    m.unmount();
    assert_eq!(fs::read_link(m.p("l")).unwrap(), Path::new("t"));
    let md = fs::metadata(m.p("t")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid(), md.nlink()), (1234, 5678, 2));
    assert_eq!(md.atime(), 1_000_000);
    let mut buf = [0u8; 64];
    // SAFETY: valid pointers.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n.max(0) as usize], val);
}

#[test]
fn fsync_direct_io_and_mmap() {
    let Some(mut m) = mount(|_| {}) else { return };
    // fsync / fdatasync.
    let mut f = File::create(m.p("s")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    drop(f);
    // O_DIRECT aligned write + read back.
    let p = m.p("direct.raw");
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: non-zero size layout; freed below.
    let ptr = unsafe { std::alloc::alloc(layout) };
    // SAFETY: ptr valid for layout.size() bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, layout.size()) };
    buf.copy_from_slice(&pattern(1 << 20, 9));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    f.write_all_at(buf, 8192).unwrap();
    buf.fill(0);
    f.read_exact_at(buf, 8192).unwrap();
    assert_eq!(&buf[..], &pattern(1 << 20, 9)[..]);
    // Unaligned request on an O_DIRECT fd through FUSE (kernel direct_io).
    let mut small = [0u8; 100];
    let r = f.read_at(&mut small, 8192 + 7);
    if let Ok(n) = r {
        assert_eq!(&small[..n], &pattern(1 << 20, 9)[7..7 + n]);
    }
    drop(f);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    // mmap write + msync.
    let mp = m.p("mapped.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&mp)
        .unwrap();
    f.set_len(65536).unwrap();
    // SAFETY: mapping a 64 KiB shared file region, unmapped below.
    unsafe {
        let a = libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(a, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(a as *mut u8, 65536);
        s[100..105].copy_from_slice(b"MMAP!");
        s[65000] = 0xAB;
        assert_eq!(libc::msync(a, 65536, libc::MS_SYNC), 0);
        libc::munmap(a, 65536);
    }
    drop(f);
    // The mapping's last file reference is dropped asynchronously (delayed
    // fput, writeback of the mapped pages); under load an immediate
    // unmount can still see the file busy (EBUSY, seen once in a full run
    // with two builds in parallel). Flush and give the kernel a moment.
    if let Ok(d) = fs::File::open(m.path()) {
        let _ = nix::unistd::syncfs(&d);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    m.unmount();
    assert_eq!(fs::read(m.p("s")).unwrap(), b"synced");
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 8192 + (1 << 20));
    assert!(got[..8192].iter().all(|&b| b == 0));
    assert_eq!(&got[8192..], &pattern(1 << 20, 9)[..]);
    let got = fs::read(&mp).unwrap();
    assert_eq!(&got[100..105], b"MMAP!");
    assert_eq!(got[65000], 0xAB);
}

#[test]
fn new_nodes_get_caller_owner_and_umask() {
    let Some(mut m) = mount(|d| {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }) else {
        return;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        skip::skip("SKIP (part): setpriv missing");
        return;
    }
    let script = format!(
        "umask 027 && echo hi > {0}/u.txt && mkdir {0}/udir && ln -s u.txt {0}/ulink && mkfifo {0}/ufifo",
        m.path().display()
    );
    let st = Command::new("setpriv")
        .args([
            "--reuid=4321",
            "--regid=8765",
            "--clear-groups",
            "sh",
            "-c",
            &script,
        ])
        .status()
        .unwrap();
    assert!(st.success());
    for (name, mode) in [
        ("u.txt", Some(0o640)),
        ("udir", Some(0o750)),
        ("ufifo", Some(0o640)),
        ("ulink", None),
    ] {
        let md = fs::symlink_metadata(m.p(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (4321, 8765), "{name}");
        if let Some(mode) = mode {
            assert_eq!(md.mode() & 0o7777, mode, "{name}");
        }
    }
    // default_permissions: another user cannot write a 0640 file.
    let st = Command::new("setpriv")
        .args([
            "--reuid=1111",
            "--regid=1111",
            "--clear-groups",
            "sh",
            "-c",
            &format!("echo x >> {}/u.txt", m.path().display()),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success());
    // Writing or truncating a set-user-ID file as its (non-root) owner
    // drops the bit, as on a native file system.
    for (name, cmd) in [
        ("suid-w", "echo more >> {}"),
        ("suid-t", "truncate -s 1 {}"),
    ] {
        let p = m.p(name);
        fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&p, Some(4321), Some(8765)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
        let st = Command::new("setpriv")
            .args(["--reuid=4321", "--regid=8765", "--clear-groups", "sh", "-c"])
            .arg(cmd.replace("{}", &p.display().to_string()))
            .status()
            .unwrap();
        assert!(st.success(), "{name}");
        let mode = fs::metadata(&p).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{name}: set-user-ID bit kept");
    }
    m.unmount();
    let md = fs::metadata(m.p("u.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (4321, 8765));
    assert_eq!(fs::read(m.p("u.txt")).unwrap(), b"hi\n");
}

#[test]
fn umount_command_works() {
    let Some(mut m) = mount(|d| fs::write(d.join("keep"), b"k").unwrap()) else {
        return;
    };
    fs::write(m.p("new"), b"n").unwrap();
    // Mounting again over the same folder is refused (no self-stacking).
    assert!(mount_untracked(m.path(), &FsOptions::default()).is_err());
    let st = Command::new("umount").arg(m.path()).status().unwrap();
    assert!(st.success());
    if let Some(s) = m.sess.take() {
        s.join().expect("session ends cleanly after umount");
    }
    assert!(!is_mounted(m.path()));
    assert_eq!(fs::read(m.p("keep")).unwrap(), b"k");
    assert_eq!(fs::read(m.p("new")).unwrap(), b"n");
}

#[test]
fn works_without_writeback_cache() {
    let opts = FsOptions {
        writeback_cache: false,
        n_threads: 2,
        ..FsOptions::default()
    };
    let Some(mut m) = mount_with(opts, |_| {}) else {
        return;
    };
    let data = pattern(2 << 20, 5);
    fs::write(m.p("w"), &data).unwrap();
    {
        let mut f = OpenOptions::new().append(true).open(m.p("w")).unwrap();
        f.write_all(b"tail").unwrap();
    }
    let got = fs::read(m.p("w")).unwrap();
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(&got[data.len()..], b"tail");
    m.unmount();
    assert_eq!(fs::read(m.p("w")).unwrap().len(), data.len() + 4);
}

/// Descriptors of this process that point below `dir` (the FS's inode and
/// handle fds; the test opens none of its own while counting).
fn fds_under(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter(|t| t.starts_with(dir))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn forget_closes_inode_fds() {
    let Some(mut m) = mount(|d| {
        for i in 0..300 {
            fs::write(d.join(format!("f{i}")), b"x").unwrap();
        }
    }) else {
        return;
    };
    for i in 0..300 {
        fs::metadata(m.p(&format!("f{i}"))).unwrap();
    }
    let held = fds_under(m.path());
    assert!(held >= 300, "one O_PATH fd per looked-up inode, got {held}");
    // Make the kernel drop its dentries/inodes: it sends FORGET for each.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    let mut left = held;
    for _ in 0..50 {
        left = fds_under(m.path());
        if left < 10 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(left < 10, "fds not closed after forget: {held} -> {left}");
    // Still fully usable afterwards.
    assert_eq!(fs::read(m.p("f7")).unwrap(), b"x");
    m.unmount();
    assert_eq!(fds_under(m.path()), 0, "all fds closed after unmount");
}

#[test]
fn state_dir_files_are_never_cached() {
    let mut backing: Option<File> = None;
    let Some(mut m) = mount(|d| {
        fs::create_dir(d.join(".vdrep")).unwrap();
        fs::write(d.join(".vdrep/state"), b"one").unwrap();
        backing = Some(
            OpenOptions::new()
                .write(true)
                .open(d.join(".vdrep/state"))
                .unwrap(),
        );
    }) else {
        return;
    };
    let backing = backing.unwrap();
    assert!(fs::read_dir(m.path())
        .unwrap()
        .any(|e| e.unwrap().file_name() == ".vdrep"));
    assert_eq!(fs::read(m.p(".vdrep/state")).unwrap(), b"one");
    // The daemon rewrites its state through its own descriptor.
    backing.write_all_at(b"two", 0).unwrap();
    assert_eq!(fs::read(m.p(".vdrep/state")).unwrap(), b"two");
    drop(backing);
    m.unmount();
}

#[test]
fn concurrent_direct_and_buffered_writers() {
    let Some(mut m) = mount(|_| {}) else { return };
    let p = m.p("shared.raw");
    let region = 1usize << 20;
    let n = 8;
    File::create(&p)
        .unwrap()
        .set_len((region * n) as u64)
        .unwrap();
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut oo = OpenOptions::new();
                oo.read(true).write(true);
                if t % 2 == 0 {
                    oo.custom_flags(libc::O_DIRECT);
                }
                let f = oo.open(&p).unwrap();
                let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
                // SAFETY: non-zero layout, freed below.
                let ptr = unsafe { std::alloc::alloc(layout) };
                // SAFETY: valid for 4096 bytes.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
                let data = pattern(region, t as u8);
                let base = (t * region) as u64;
                // Write the region's 4 KiB blocks in a scrambled order.
                let blocks = region / 4096;
                for i in 0..blocks {
                    let b = (i * 97) % blocks;
                    buf.copy_from_slice(&data[b * 4096..(b + 1) * 4096]);
                    f.write_all_at(buf, base + (b * 4096) as u64).unwrap();
                }
                for b in 0..blocks {
                    f.read_exact_at(buf, base + (b * 4096) as u64).unwrap();
                    assert_eq!(&buf[..], &data[b * 4096..(b + 1) * 4096], "thread {t}");
                }
                f.sync_all().unwrap();
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(ptr, layout) };
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.unmount();
    let got = fs::read(&p).unwrap();
    for t in 0..n {
        assert_eq!(
            &got[t * region..(t + 1) * region],
            &pattern(region, t as u8)[..],
            "region {t}"
        );
    }
}

/// `vdrep umount` of a dead mount aborts its FUSE connection by number.
/// The number is the super block's device number, which the kernel hands
/// to the next mount once the super block is gone: a pin (an `O_PATH`
/// descriptor of the root) must keep it, so that a mount detached by
/// someone else meanwhile cannot pass its number to a healthy mount whose
/// connection the abort would kill.
#[test]
fn a_pinned_mount_keeps_its_connection_number_and_only_it_is_aborted() {
    let Some(mut a) = mount(|_| {}) else { return };
    fs::write(a.p("f"), b"a").unwrap();
    let pin = PinnedMount::at(a.path())
        .expect("pin")
        .expect("a FUSE mount is pinned");
    assert!(PinnedMount::at(Path::new("/")).expect("pin /").is_none());
    // Someone else detaches the mount; the pin keeps its super block.
    let st = Command::new("umount")
        .arg("-l")
        .arg(a.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(a.path()));
    let Some(mut b) = mount(|_| {}) else { return };
    let pb = PinnedMount::at(b.path()).expect("pin").expect("pinned");
    assert_ne!(
        pb.entry().connection(),
        pin.entry().connection(),
        "a new mount got the pinned mount's connection number"
    );
    drop(pb);
    assert!(pin.abort().expect("abort"), "the connection was gone");
    // A's session ends (the pin keeps its super block, so nothing but the
    // abort can end it: ENODEV, or ECONNABORTED when FUSE_ABORT_ERROR was
    // negotiated); B still serves.
    let sa = a.sess.take().unwrap();
    let t0 = std::time::Instant::now();
    while !sa.guard.is_finished() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the abort did not reach the pinned mount's session"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if let Err(e) = sa.join() {
        assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    }
    fs::write(b.p("g"), b"b").unwrap();
    assert_eq!(fs::read(b.p("g")).unwrap(), b"b");
    drop(pin);
    b.unmount();
}

/// A plain unmount can end the session's `read(2)` of `/dev/fuse` with
/// `ECONNABORTED` instead of `ENODEV`: the kernel (fs/fuse/dev.c,
/// `fuse_dev_do_read`) answers so when it had already dequeued a request
/// (here the asynchronous `RELEASE` of a file closed just before) and the
/// unmount's `fuse_abort_conn` ran before it could queue it for the reply.
/// No fusectl abort is involved; the session must still end cleanly (CI saw
/// `umount_and_join` fail with `ECONNABORTED` after `forget_closes_inode_fds`).
#[test]
fn an_unmount_racing_a_close_ends_the_session_cleanly() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let rounds: usize = std::env::var("VDREP_UNMOUNT_RACE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for round in 0..rounds {
        let Some(mut m) = mount(|d| {
            for i in 0..4 {
                fs::write(d.join(format!("f{i}")), b"x").unwrap();
            }
        }) else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let hammers: Vec<_> = (0..2)
            .map(|t| {
                let stop = stop.clone();
                let dir = m.path().to_path_buf();
                std::thread::spawn(move || {
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        // Each close sends an asynchronous RELEASE.
                        let _ = File::open(dir.join(format!("f{}", i % 4)));
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(2 + (round % 5) as u64));
        let sess = m.sess.take().unwrap();
        // Detach (files are open right now); the super block, and with it
        // the connection, goes when the last of them is closed.
        let st = Command::new("umount")
            .arg("-l")
            .arg(m.path())
            .status()
            .unwrap();
        assert!(st.success());
        let t0 = std::time::Instant::now();
        while !sess.guard.is_finished() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "round {round}: the session did not end after the unmount"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        for h in hammers {
            h.join().unwrap();
        }
        if let Err(e) = sess.join() {
            panic!("round {round}: the session ended with an error after a plain unmount: {e}");
        }
    }
}
