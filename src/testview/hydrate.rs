//! Background hydration of an unplanned failover straight from a bucket
//! (issue 11): while the VM runs on the lazy view, one thread per view copies
//! every disk of the point, 4 MiB at a time in order, from the bucket to a
//! local file, then switches the view's file to read its base from that local
//! copy ([`ViewFile::switch_base`]): same bytes, same FUSE file, so the VM
//! notices nothing; from then on no read goes to the bucket.
//!
//! ```text
//! DIR/<file>.part        the copy being made (sparse: zero steps not written)
//! DIR/<file>.progress    JSON: point, disk, bytes copied and synced
//! DIR/<file>             the finished copy: the disk, then for a raw source
//!                        kept as a fixed VHD its 512-byte footer
//! ```
//!
//! Crash-safe and restartable: a step is written, the `.part` file is
//! fdatasync'ed, and only then the progress file is replaced (written to a
//! temporary, renamed), so the bytes below `done` are always on disk. A
//! restart (the same `failover --unplanned` from the same cache folder)
//! resumes at `done` if the progress names the same point and disk, else
//! starts over. A finished copy is renamed into place after its fsync.
//! A failed bucket read is retried (1 s doubling to 30 s) and shown in the
//! status until it succeeds; nothing unread is ever written as data.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::view::ViewFile;
use crate::replica::PointRead;

/// Bytes copied per step (one bucket chunk).
pub const STEP: u64 = 4 << 20;

/// What a hydration did so far (in the view's `status.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HydrationStatus {
    /// Where the local copies go.
    pub dir: PathBuf,
    /// Bytes of every disk of the point.
    pub total_bytes: u64,
    /// Bytes copied and synced so far (resumed bytes included).
    pub hydrated_bytes: u64,
    /// `hydrated_bytes` in % of `total_bytes`.
    pub percent: f64,
    /// Bytes a previous run had already copied (a restart resumed there).
    pub resumed_bytes: u64,
    /// Every disk is copied and the view reads only local copies.
    pub complete: bool,
    /// The last bucket read that failed (retried), if the copy is stuck.
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Progress {
    cycle: u64,
    disk: String,
    len: u64,
    done: u64,
}

/// The shared counters of a running hydration.
#[derive(Default)]
pub struct Hydration {
    dir: PathBuf,
    total: AtomicU64,
    done: AtomicU64,
    resumed: AtomicU64,
    complete: AtomicBool,
    error: parking_lot::Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Hydration {
    /// The counters now.
    pub fn status(&self) -> HydrationStatus {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        HydrationStatus {
            dir: self.dir.clone(),
            total_bytes: total,
            hydrated_bytes: done,
            percent: if total == 0 {
                100.0
            } else {
                (done as f64 * 1000.0 / total as f64).floor() / 10.0
            },
            resumed_bytes: self.resumed.load(Ordering::Relaxed),
            complete: self.complete.load(Ordering::Acquire),
            error: self.error.lock().clone(),
        }
    }

    /// Ask the thread to stop after its current step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// True once every disk is copied and switched.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// The local copy of `file`.
    pub fn local_path(&self, file: &ViewFile) -> PathBuf {
        self.dir.join(&file.name)
    }
}

/// A finished local copy as a point's source.
struct LocalRead {
    file: File,
    len: u64,
}

impl PointRead for LocalRead {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        crate::util::read_at_zero_filled(&self.file, &mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// One disk of the view: its file, its id, the point's cycle.
pub struct HydrateDisk {
    pub file: Arc<ViewFile>,
    pub disk_id: String,
}

/// Start hydrating `disks` (point `cycle`) into `dir` on a thread, at most
/// `rate` bytes a second if given.
pub fn start(
    dir: &Path,
    cycle: u64,
    disks: Vec<HydrateDisk>,
    rate: Option<u64>,
) -> io::Result<Arc<Hydration>> {
    std::fs::create_dir_all(dir)?;
    let h = Arc::new(Hydration {
        dir: dir.to_path_buf(),
        ..Default::default()
    });
    h.total.store(
        disks.iter().map(|d| d.file.base().len()).sum(),
        Ordering::Relaxed,
    );
    let hh = h.clone();
    std::thread::Builder::new()
        .name("hydrate".into())
        .spawn(move || {
            for d in &disks {
                if !run_disk(&hh, cycle, d, rate) {
                    return;
                }
            }
            hh.complete.store(true, Ordering::Release);
            tracing::info!(
                "hydration complete: every disk of point {cycle} is local in {}; the view no longer reads the bucket",
                hh.dir.display()
            );
        })?;
    Ok(h)
}

fn read_progress(p: &Path) -> Option<Progress> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn write_progress(p: &Path, pr: &Progress) -> io::Result<()> {
    let tmp = p.with_extension("progress.tmp");
    std::fs::write(&tmp, serde_json::to_vec(pr).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, p)
}

/// Copy one disk (retrying bucket reads); false if asked to stop.
fn run_disk(h: &Hydration, cycle: u64, d: &HydrateDisk, rate: Option<u64>) -> bool {
    let mut wait = Duration::from_secs(1);
    loop {
        // Only this thread changes the counters: a failed attempt's share
        // is taken back (the next one counts from the progress file).
        let (done0, resumed0) = (
            h.done.load(Ordering::Relaxed),
            h.resumed.load(Ordering::Relaxed),
        );
        match copy_disk(h, cycle, d, rate) {
            Ok(done) => {
                *h.error.lock() = None;
                return done;
            }
            Err(e) => {
                h.done.store(done0, Ordering::Relaxed);
                h.resumed.store(resumed0, Ordering::Relaxed);
                let msg = format!(
                    "hydrating {} from the bucket: {e}; retrying in {} s",
                    d.file.name,
                    wait.as_secs()
                );
                tracing::warn!("{msg}");
                *h.error.lock() = Some(msg);
                let t0 = Instant::now();
                while t0.elapsed() < wait {
                    if h.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Copy (or resume) one disk; `Ok(false)` if asked to stop.
fn copy_disk(h: &Hydration, cycle: u64, d: &HydrateDisk, rate: Option<u64>) -> io::Result<bool> {
    let fin = h.dir.join(&d.file.name);
    let part = h.dir.join(format!("{}.part", d.file.name));
    let prog = h.dir.join(format!("{}.progress", d.file.name));
    let src = d.file.base();
    let len = src.len();
    let mut pr = Progress {
        cycle,
        disk: d.disk_id.clone(),
        len,
        done: 0,
    };
    let saved = read_progress(&prog);
    let same = |s: &Progress| s.cycle == cycle && s.disk == d.disk_id && s.len == len;
    if let Some(s) = saved.as_ref().filter(|s| same(s) && s.done >= len) {
        if let Ok(f) = File::open(&fin) {
            h.done.fetch_add(s.done.min(len), Ordering::Relaxed);
            h.resumed.fetch_add(s.done.min(len), Ordering::Relaxed);
            d.file.switch_base(Arc::new(LocalRead { file: f, len }));
            return Ok(true);
        }
    }
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)?;
    match saved.filter(same) {
        Some(s) => {
            // A crash after the last step but before the rename resumes
            // at the end; otherwise at a step boundary.
            pr.done = if s.done >= len {
                len
            } else {
                s.done / STEP * STEP
            };
            h.resumed.fetch_add(pr.done, Ordering::Relaxed);
            tracing::info!(
                "hydration of {}: resuming at {} of {len} bytes",
                d.file.name,
                pr.done
            );
        }
        None => out.set_len(0)?,
    }
    out.set_len(len)?;
    h.done.fetch_add(pr.done, Ordering::Relaxed);
    let mut buf = vec![0u8; STEP as usize];
    let t0 = Instant::now();
    let start = pr.done;
    while pr.done < len {
        if h.stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let n = (len - pr.done).min(STEP) as usize;
        src.read_at(&mut buf[..n], pr.done)?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], pr.done)?;
        }
        out.sync_data()?;
        pr.done += n as u64;
        write_progress(&prog, &pr)?;
        h.done.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(r) = rate.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64((pr.done - start) as f64 / r as f64);
            if let Some(w) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(w);
            }
        }
    }
    if let Some(f) = d.file.footer() {
        out.write_all_at(f, len)?;
    }
    out.sync_all()?;
    std::fs::rename(&part, &fin)?;
    File::open(&h.dir)?.sync_all()?;
    d.file.switch_base(Arc::new(LocalRead { file: out, len }));
    tracing::info!(
        "hydration of {}: {len} bytes local in {}; reads switched to it",
        d.file.name,
        fin.display()
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl PointRead for Mem {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.fill(0);
            let o = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - o);
            buf[..n].copy_from_slice(&self.0[o..o + n]);
            Ok(())
        }
    }

    fn data(n: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..n)
            .map(|i| {
                if (i >> 20) % 3 == 1 {
                    return 0; // some all-zero steps stay holes
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn view(dir: &Path, d: &[u8]) -> Arc<ViewFile> {
        let ov = tempfile::tempfile_in(dir).unwrap();
        Arc::new(
            ViewFile::new(
                "d.vhd".into(),
                Box::new(Mem(d.to_vec())),
                Some([7u8; 512]),
                ov,
            )
            .unwrap(),
        )
    }

    fn run(dir: &Path, f: &Arc<ViewFile>, cycle: u64) -> HydrationStatus {
        let disks = vec![HydrateDisk {
            file: f.clone(),
            disk_id: "ab".into(),
        }];
        let h = start(dir, cycle, disks, None).unwrap();
        let t0 = Instant::now();
        while !h.is_complete() {
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", h.status());
            std::thread::sleep(Duration::from_millis(5));
        }
        h.status()
    }

    #[test]
    fn resumes_only_the_same_point_and_switches_to_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("h");
        std::fs::create_dir_all(&dir).unwrap();
        let d = data((10 << 20) + 123);
        let len = d.len() as u64;
        // A crash after 1.5 steps were synced: bytes past the step
        // boundary are garbage in the .part file.
        let mut part = d.clone();
        part[(STEP as usize)..].fill(0xee);
        std::fs::write(dir.join("d.vhd.part"), &part).unwrap();
        let pr = |cycle| Progress {
            cycle,
            disk: "ab".into(),
            len,
            done: STEP + STEP / 2,
        };
        write_progress(&dir.join("d.vhd.progress"), &pr(5)).unwrap();
        let f = view(tmp.path(), &d);
        let st = run(&dir, &f, 5);
        assert_eq!(
            (st.resumed_bytes, st.hydrated_bytes, st.percent),
            (STEP, len, 100.0)
        );
        let got = std::fs::read(dir.join("d.vhd")).unwrap();
        assert_eq!(got.len() as u64, len + 512);
        assert!(got[..d.len()] == d[..], "the copy differs from the point");
        assert_eq!(&got[d.len()..], &[7u8; 512]);
        // The view now reads the local copy: same bytes.
        let mut buf = vec![0u8; d.len() + 512];
        assert_eq!(f.read(&mut buf, 0).unwrap(), buf.len());
        assert!(buf == got);
        // Progress of another point: never reused, copied from scratch.
        std::fs::remove_file(dir.join("d.vhd")).unwrap();
        std::fs::write(dir.join("d.vhd.part"), &part).unwrap();
        write_progress(&dir.join("d.vhd.progress"), &pr(4)).unwrap();
        let st = run(&dir, &view(tmp.path(), &d), 5);
        assert_eq!(st.resumed_bytes, 0);
        assert!(std::fs::read(dir.join("d.vhd")).unwrap()[..d.len()] == d[..]);
        // A finished copy is taken as it is.
        let st = run(&dir, &view(tmp.path(), &d), 5);
        assert_eq!(st.resumed_bytes, len);
    }

    #[test]
    fn a_durable_overlay_keeps_what_was_persisted() {
        let tmp = tempfile::tempdir().unwrap();
        let d = data(1 << 20);
        let (ovp, mapp) = (tmp.path().join("ov"), tmp.path().join("ov.map"));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .unwrap()
        };
        let mk = || {
            ViewFile::durable(
                "d".into(),
                Box::new(Mem(d.clone())),
                None,
                open(&ovp),
                open(&mapp),
            )
            .unwrap()
        };
        let f = mk();
        f.write(&[1; 4096], 8192).unwrap();
        f.persist().unwrap();
        // Written after the last persist: not kept (a crash loses it).
        f.write(&[2; 4096], 65536).unwrap();
        drop(f);
        let g = mk();
        assert_eq!(g.overlay_bytes(), 4096);
        let mut buf = vec![0u8; 4096];
        g.read(&mut buf, 8192).unwrap();
        assert_eq!(buf, vec![1; 4096]);
        g.read(&mut buf, 65536).unwrap();
        assert!(buf[..] == d[65536..65536 + 4096]);
    }

    #[test]
    fn commit_folds_the_overlay_into_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("h");
        let d = data(3 << 20);
        let f = view(tmp.path(), &d);
        f.write(&[0x42; 100], 4000).unwrap();
        run(&dir, &f, 1);
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("d.vhd"))
            .unwrap();
        assert_eq!(f.fold_overlay_into(&dst).unwrap(), 2 * 4096);
        let got = std::fs::read(dir.join("d.vhd")).unwrap();
        let mut want = d.clone();
        want[4000..4100].fill(0x42);
        assert!(got[..d.len()] == want[..]);
    }
}
