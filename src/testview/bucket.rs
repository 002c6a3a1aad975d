//! Test failovers straight from a bucket (issue 11): a recovery point of an
//! `s3://` store exposed through the same FUSE view, on a machine with no
//! replica state, only a local cache folder (`ROOT`).
//!
//! No receiver runs there, so the view is served by a process of its own:
//! [`expose`] forks it (before any thread exists, like `vdrep mount`), and
//! returns once the view is mounted. Reads fetch only the chunks and log
//! segments they touch, opened (decrypted and authenticated) and kept in a
//! bounded LRU cache ([`ObjectCache`]); an object that does not open (a
//! tampered or foreign one) fails the read with `EIO` and is logged with its
//! name, never served. The process rewrites `status.json` (bytes fetched,
//! cache use, bytes the test VM wrote) every second and once more when it
//! stops. [`cleanup`] stops it (SIGTERM: it stops a `--boot` test VM and
//! unmounts), then deletes the scratch overlays and the cache.
//!
//! ```text
//! ROOT/failover/<site>/<vm>/                 the view (default place)
//! ROOT/failover/.scratch/<site>/<vm>/        overlays, view.json, view.pid,
//!                                            status.json, view.log, qemu.pid
//! ROOT/failover/.cache/<site>/<vm>/          the object cache
//! ```
//!
//! The view pins its point in the bucket ([`crate::objstore::pin`]) before
//! reading its manifest, renews the pin hourly and deletes it when it
//! stops, so a prune by the sender or a receiver meanwhile keeps the point
//! and every object it reads. The pinner id is in `SCRATCH/pin`, so
//! `--cleanup`/`--commit` release it if the process died.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::hydrate::{self, HydrateDisk, Hydration, HydrationStatus};
use super::{
    alive, detach, is_mountpoint, list, mount_at, read_state, select_point, stop_test_vm, PointSel,
    ViewError, ViewInfo, FAILOVER_DIR, SCRATCH,
};
use crate::objstore::cache::{CacheStats, ObjectCache};
use crate::objstore::replica::BucketStore;
use crate::objstore::SealedBucket;
use crate::objstore::{failedover, pin};
use crate::replica::ReplicaStore;

const CACHE: &str = ".cache";
const PID_FILE: &str = "view.pid";
/// The pinner id of the view's pin in the bucket.
const PIN_FILE: &str = "pin";
const HYDRATE: &str = ".hydrate";
/// Where `--commit` puts an unplanned failover's local disks.
const DISKS: &str = "disks";
/// Written by `--commit` before it stops the view process.
pub const COMMIT_FILE: &str = "commit.request";
/// The view process's counters, in the scratch folder.
pub const STATUS_FILE: &str = "status.json";
/// The view process's log, in the scratch folder.
pub const LOG_FILE: &str = "view.log";

/// What to expose.
#[derive(Debug, Clone)]
pub struct BucketView {
    /// The local cache folder (holds no replica state).
    pub root: PathBuf,
    pub site: Option<String>,
    pub vm: String,
    pub sel: PointSel,
    /// Mount here instead of `ROOT/failover/<site>/<vm>`.
    pub at: Option<PathBuf>,
    /// Bytes the object cache may hold.
    pub cache_bytes: u64,
    /// An unplanned failover: hydrate the disks in the background (at
    /// most this many bytes a second; `Some(0)`: no limit).
    pub hydrate: Option<u64>,
}

/// What a view from a bucket cost so far (`status.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BucketViewStatus {
    pub pid: u32,
    /// Object fetches and the cache (bytes fetched from the bucket).
    pub cache: CacheStats,
    /// Bytes the test VM wrote to the overlays.
    pub written_bytes: u64,
    /// The process stopped (the last write).
    pub stopped: bool,
    /// An unplanned failover's background copy to local disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydration: Option<HydrationStatus>,
    /// After `--commit`: the local disks (hydrated copies with the VM's
    /// writes folded in), or why the commit did not happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<Committed>,
}

/// How `--commit` of an unplanned failover went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Committed {
    /// The local disks (empty if it failed).
    pub disks: Vec<PathBuf>,
    /// Why nothing was committed.
    pub error: Option<String>,
}

/// Scratch folder of a view of `site/vm`.
pub fn scratch_dir(root: &Path, site: &str, vm: &str) -> PathBuf {
    root.join(FAILOVER_DIR).join(SCRATCH).join(site).join(vm)
}

/// Where an unplanned failover's hydrated copies of `site/vm` are made.
pub fn hydrate_dir(root: &Path, site: &str, vm: &str) -> PathBuf {
    root.join(FAILOVER_DIR).join(HYDRATE).join(site).join(vm)
}

/// Where `--commit` puts the local disks of `site/vm`.
pub fn disks_dir(root: &Path, site: &str, vm: &str) -> PathBuf {
    root.join(DISKS).join(site).join(vm)
}

fn cache_dir(root: &Path, site: &str, vm: &str) -> PathBuf {
    root.join(FAILOVER_DIR).join(CACHE).join(site).join(vm)
}

/// The counters of the view whose scratch folder is `scratch`.
pub fn read_status(scratch: &Path) -> Option<BucketViewStatus> {
    serde_json::from_slice(&std::fs::read(scratch.join(STATUS_FILE)).ok()?).ok()
}

fn write_status(scratch: &Path, st: &BucketViewStatus) {
    let tmp = scratch.join(".status.tmp");
    if let Ok(b) = serde_json::to_vec_pretty(st) {
        if std::fs::write(&tmp, b).is_ok() {
            let _ = std::fs::rename(&tmp, scratch.join(STATUS_FILE));
        }
    }
}

/// The registration of a running view process: `RUN/bucketview-<pid>`
/// holds its scratch folder, so `vdrep status` finds it.
fn reg_path(pid: u32) -> PathBuf {
    crate::ipc::run_dir().join(format!("bucketview-{pid}"))
}

/// A running failover from a bucket on this machine, as `vdrep status`
/// shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunningView {
    /// `test` or `unplanned`.
    pub mode: &'static str,
    pub view: ViewInfo,
    pub status: BucketViewStatus,
}

/// Every failover from a bucket whose view process runs on this machine
/// (registrations of dead processes are removed).
pub fn running() -> Vec<RunningView> {
    let dir = crate::ipc::run_dir();
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("bucketview-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let scratch = std::fs::read_to_string(e.path()).map(PathBuf::from);
        let Ok(scratch) = scratch else { continue };
        if live_pid(&scratch) != Some(pid) {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        let (Some(view), Some(status)) = (read_state(&scratch), read_status(&scratch)) else {
            continue;
        };
        let mode = if status.hydration.is_some() {
            "unplanned"
        } else {
            "test"
        };
        out.push(RunningView { mode, view, status });
    }
    out.sort_by(|a, b| (&a.view.site, &a.view.vm).cmp(&(&b.view.site, &b.view.vm)));
    out
}

/// The pid of the live view process of `scratch`, if any.
fn live_pid(scratch: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(scratch.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    (alive(pid) && cmd.windows(8).any(|w| w == b"failover")).then_some(pid)
}

/// Expose the point: fork the view process and wait until it mounted the
/// view (or failed). `open` opens the bucket (run in the view process).
/// Call it while the process is single-threaded.
pub fn expose(
    v: &BucketView,
    open: impl FnOnce() -> Result<Arc<SealedBucket>, ViewError>,
) -> Result<ViewInfo, ViewError> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ViewError::Io(format!("cannot create a pipe: {e}")))?;
    // SAFETY: the caller is single-threaded (documented); the child only
    // continues in Rust code of this process image.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(ViewError::Io(format!("fork failed: {e}"))),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            if let Some(json) = msg.strip_prefix("ok ") {
                return serde_json::from_str(json).map_err(|e| {
                    ViewError::Io(format!("the view process answered nonsense: {e}"))
                });
            }
            Err(match msg.split_once(' ') {
                Some(("notfound", m)) => ViewError::NotFound(m.into()),
                Some(("refused", m)) => ViewError::Refused(m.into()),
                Some(("badpoint", m)) => ViewError::BadPoint(m.into()),
                Some((_, m)) => ViewError::Io(m.into()),
                None => ViewError::Io(
                    "the view process exited before mounting the view (no message)".into(),
                ),
            })
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let _ = nix::unistd::setsid();
            std::process::exit(serve(v, open, wr));
        }
    }
}

/// Tell the waiting parent how it went.
fn notify(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let _ = File::from(fd).write_all(msg.as_bytes());
    }
}

fn refusal(e: &ViewError) -> String {
    let tag = match e.kind() {
        super::ViewErrorKind::NotFound => "notfound",
        super::ViewErrorKind::Refused => "refused",
        super::ViewErrorKind::BadPoint => "badpoint",
        _ => "error",
    };
    format!("{tag} {e}")
}

/// The view process: returns its exit code.
fn serve(
    v: &BucketView,
    open: impl FnOnce() -> Result<Arc<SealedBucket>, ViewError>,
    ready: OwnedFd,
) -> i32 {
    let mut ready = Some(ready);
    // Before any thread: every thread (FUSE, status) inherits the mask and
    // only the main thread takes the signal.
    let sigs = crate::service::termination_signals();
    let _ = sigs.thread_block();
    let t0 = Instant::now();
    let (active, cache, pinned) = match start(v, open) {
        Ok(a) => a,
        Err(e) => {
            notify(&mut ready, &refusal(&e));
            return 1;
        }
    };
    let scratch = active.info.scratch.clone();
    // From here on, stdout and stderr go to the log.
    if let Ok(log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(scratch.join(LOG_FILE))
    {
        let _ = nix::unistd::dup2_stdout(&log);
        let _ = nix::unistd::dup2_stderr(&log);
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(&null);
        }
        crate::service::init_logging(
            crate::service::LogFormat::Text,
            crate::service::LogTarget::File(log),
        );
    }
    let pid = std::process::id();
    let _ = std::fs::write(scratch.join(PID_FILE), pid.to_string());
    let _ = std::fs::create_dir_all(crate::ipc::run_dir());
    let _ = std::fs::write(reg_path(pid), scratch.as_os_str().as_encoded_bytes());
    let hyd = match v.hydrate {
        None => None,
        Some(rate) => {
            let disks = active
                .files
                .iter()
                .zip(&active.info.disks)
                .map(|(f, d)| HydrateDisk {
                    file: f.clone(),
                    disk_id: d.disk_id.clone(),
                })
                .collect();
            let dir = hydrate_dir(&v.root, &active.info.site, &active.info.vm);
            match hydrate::start(&dir, active.info.cycle, disks, Some(rate)) {
                Ok(h) => Some(h),
                Err(e) => {
                    let e = ViewError::Io(format!(
                        "starting the hydration into {}: {e}",
                        dir.display()
                    ));
                    notify(&mut ready, &refusal(&e));
                    return 1;
                }
            }
        }
    };
    let status = {
        let files = active.files.clone();
        let cache = cache.clone();
        let hyd = hyd.clone();
        move |stopped| BucketViewStatus {
            pid,
            cache: cache.stats(),
            written_bytes: files.iter().map(|f| f.overlay_bytes()).sum(),
            stopped,
            hydration: hyd.as_ref().map(|h| h.status()),
            committed: None,
        }
    };
    write_status(&scratch, &status(false));
    tracing::info!(
        "test failover of {}/{} from the bucket: point {} exposed at {} in {} ms",
        active.info.site,
        active.info.vm,
        active.info.cycle,
        active.info.mountpoint.display(),
        t0.elapsed().as_millis()
    );
    match serde_json::to_string(&active.info) {
        Ok(j) => notify(&mut ready, &format!("ok {j}")),
        Err(e) => notify(&mut ready, &format!("error {e}")),
    }
    {
        let scratch = scratch.clone();
        let status = status.clone();
        let _ = std::thread::Builder::new()
            .name("view-status".into())
            .spawn({
                let files = active.files.clone();
                move || loop {
                    std::thread::sleep(Duration::from_secs(1));
                    // An unplanned failover's overlays: what the VM wrote
                    // more than a second ago survives a crash even if it
                    // never flushed (a no-op for a test view).
                    for f in files.iter() {
                        if let Err(e) = f.persist() {
                            tracing::warn!("saving the VM's writes to {}: {e}", f.name);
                        }
                    }
                    write_status(&scratch, &status(false));
                }
            });
    }
    {
        let pinned = Arc::new(pinned);
        let renewer = pinned.clone();
        let _ = std::thread::Builder::new()
            .name("view-pin".into())
            .spawn(move || loop {
                std::thread::sleep(pin::PIN_RENEW);
                if let Err(e) = renewer.renew() {
                    tracing::warn!("{e} (retried in an hour; the pin holds until it expires)");
                }
            });
        let sig = sigs.wait();
        tracing::info!("stopping the view ({sig:?})");
        pinned.release();
        if v.hydrate.is_some() && !scratch.join(COMMIT_FILE).exists() {
            pinned.forget_failover();
        }
    }
    if let Some(h) = &hyd {
        h.stop();
    }
    let mut notes = Vec::new();
    stop_test_vm(&scratch, &active.info.mountpoint, &mut notes);
    let mut active = active;
    if let Some(sess) = active.session.take() {
        if let Err(e) = sess.umount_and_join() {
            tracing::warn!("unmounting the view failed ({e}): detaching it");
            let _ = detach(&active.info.mountpoint);
        }
    }
    for n in notes {
        tracing::info!("{n}");
    }
    let mut last = status(true);
    if let Some(h) = &hyd {
        if scratch.join(COMMIT_FILE).exists() {
            last.committed = Some(match commit(v, &active, h) {
                Ok(disks) => Committed { disks, error: None },
                Err(e) => Committed {
                    disks: Vec::new(),
                    error: Some(e.to_string()),
                },
            });
        }
    }
    tracing::info!(
        "view stopped: {} fetched from the bucket in {} objects, {} cache hits",
        last.cache.fetched_bytes,
        last.cache.fetched_objects,
        last.cache.hits
    );
    write_status(&scratch, &last);
    let _ = std::fs::remove_file(reg_path(pid));
    0
}

/// `--commit` of an unplanned failover, once the view is unmounted (no
/// more writes): fold each file's overlay into its hydrated copy and move
/// the copies to `ROOT/disks/SITE/VM/`. Refused before the hydration is
/// complete (the VM's writes stay in the scratch overlays).
fn commit(
    v: &BucketView,
    active: &super::Active,
    h: &Hydration,
) -> Result<Vec<PathBuf>, ViewError> {
    if !h.is_complete() {
        let st = h.status();
        return Err(ViewError::Refused(format!(
            "the hydration is not complete ({} % of {} bytes): nothing committed",
            st.percent, st.total_bytes
        )));
    }
    let dest = disks_dir(&v.root, &active.info.site, &active.info.vm);
    std::fs::create_dir_all(&dest)
        .map_err(|e| ViewError::Io(format!("creating {}: {e}", dest.display())))?;
    let mut out = Vec::new();
    for f in active.files.iter() {
        let src = h.local_path(f);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .map_err(|e| {
                ViewError::Io(format!("opening the hydrated copy {}: {e}", src.display()))
            })?;
        let n = f.fold_overlay_into(&file).map_err(|e| {
            ViewError::Io(format!(
                "folding the VM's writes into {}: {e}",
                src.display()
            ))
        })?;
        let to = dest.join(&f.name);
        std::fs::rename(&src, &to).map_err(|e| {
            ViewError::Io(format!("moving {} to {}: {e}", src.display(), to.display()))
        })?;
        let _ = std::fs::remove_file(src.with_file_name(format!("{}.progress", f.name)));
        tracing::info!(
            "committed {}: {n} bytes the VM wrote folded in",
            to.display()
        );
        out.push(to);
    }
    let _ = std::fs::File::open(&dest).and_then(|d| d.sync_all());
    Ok(out)
}

/// Open the bucket, pick the point, mount the view.
fn start(
    v: &BucketView,
    open: impl FnOnce() -> Result<Arc<SealedBucket>, ViewError>,
) -> Result<(super::Active, Arc<ObjectCache>, Pinned), ViewError> {
    crate::replica::validate_name("vm", &v.vm).map_err(|e| ViewError::NotFound(e.to_string()))?;
    let bucket = open()?;
    let url = bucket.url().to_string();
    let store = BucketStore::open(bucket.clone(), &v.root.join(FAILOVER_DIR).join(".spool"))?;
    let site = match &v.site {
        Some(s) => s.clone(),
        None => {
            let mut sites = store.sites_of(&v.vm)?;
            match sites.len() {
                1 => sites.remove(0),
                0 => {
                    return Err(ViewError::NotFound(format!(
                        "{url}: no VM named {:?} in the bucket: check the name with `vdrep points --store {url}`",
                        v.vm
                    )))
                }
                _ => {
                    return Err(ViewError::Refused(format!(
                        "{url}: several sites replicate {:?} ({}): say which with --site",
                        v.vm,
                        sites.join(", ")
                    )))
                }
            }
        }
    };
    let scratch = scratch_dir(&v.root, &site, &v.vm);
    if let Some(pid) = live_pid(&scratch) {
        let cycle = read_state(&scratch).map_or(0, |i| i.cycle);
        return Err(ViewError::Refused(format!(
            "a test failover of {} from this cache folder is already running (point {cycle}, pid {pid}): remove it with `vdrep failover {} --cleanup --store {url}` first",
            v.vm, v.vm
        )));
    }
    // A view process killed before (kill -9, a crash) left its mount:
    // detach it so the view can be mounted again.
    if let Some(info) = read_state(&scratch) {
        if is_mountpoint(&info.mountpoint) || std::fs::metadata(&info.mountpoint).is_err() {
            let _ = detach(&info.mountpoint);
        }
    }
    let points = store.points(&site, &v.vm)?;
    let pt = select_point(&points, v.sel, &v.vm)?;
    // Pin the point before its manifest is read (a prune elsewhere keeps
    // it and every object it names), then check it is still there. A
    // restart of the same view renews its pin (same pinner).
    let pinned = Pinned {
        bucket: bucket.clone(),
        site: site.clone(),
        vm: v.vm.clone(),
        cycle: pt.cycle,
        pinner: pinner_of(&scratch).unwrap_or_else(|| crate::util::hex(&crate::util::random_id())),
        purpose: if v.hydrate.is_some() {
            "unplanned failover"
        } else {
            "test failover"
        },
    };
    pinned.renew()?;
    let fail_unpin = |e: ViewError| {
        pinned.release();
        e
    };
    let again = store
        .points(&site, &v.vm)
        .map_err(|e| fail_unpin(e.into()))?;
    if !again.iter().any(|p| p.cycle == pt.cycle) {
        return Err(fail_unpin(ViewError::BadPoint(format!(
            "point {} of {} was pruned while it was being opened: choose another with `vdrep points --store {url}`",
            pt.cycle, v.vm
        ))));
    }
    if v.hydrate.is_some() {
        // Before the VM can run here: the old primary's writers stop at
        // their next fence check (objstore::failedover).
        let rec = failedover::FailoverRecord {
            vm: v.vm.clone(),
            host: Some(crate::util::hostname())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "the failover host".into()),
            cycle: pt.cycle,
            point_time_unix_ns: pt.time_unix_ns,
            time_unix_ns: crate::util::now_ns(),
        };
        failedover::write(&bucket, &site, &rec, &pinned.pinner)
            .map_err(|e| {
                ViewError::Io(format!(
                    "recording the failover of {} in the bucket (so the old primary stops writing it): {e}",
                    v.vm
                ))
            })
            .map_err(fail_unpin)?;
    }
    let cdir = cache_dir(&v.root, &site, &v.vm);
    let cache = Arc::new(
        ObjectCache::new(&cdir, v.cache_bytes)
            .map_err(|e| {
                ViewError::Io(format!("creating the object cache {}: {e}", cdir.display()))
            })
            .map_err(fail_unpin)?,
    );
    let store = store.with_object_cache(cache.clone());
    let mountpoint =
        v.at.clone()
            .unwrap_or_else(|| v.root.join(FAILOVER_DIR).join(&site).join(&v.vm));
    let active = mount_at(
        &store,
        &site,
        &v.vm,
        &pt,
        &scratch,
        mountpoint,
        v.hydrate.is_some(),
    )
    .inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&cdir);
    })
    .map_err(fail_unpin)?;
    if let Err(e) = std::fs::write(scratch.join(PIN_FILE), &pinned.pinner) {
        tracing::warn!(
            "writing {}: {e} (a --cleanup after a crash of this process cannot release the pin; it expires by itself)",
            scratch.join(PIN_FILE).display()
        );
    }
    Ok((active, cache, pinned))
}

/// The pin a view holds on its point in the bucket ([`crate::objstore::pin`]).
struct Pinned {
    bucket: Arc<SealedBucket>,
    site: String,
    vm: String,
    cycle: u64,
    pinner: String,
    purpose: &'static str,
}

impl Pinned {
    /// Write the pin anew (expiry [`pin::PIN_TTL`] from now), the older
    /// one deleted after.
    fn renew(&self) -> Result<(), ViewError> {
        pin::put(
            &self.bucket,
            &self.site,
            &self.vm,
            self.cycle,
            &self.pinner,
            self.purpose,
        )
        .map(drop)
        .map_err(|e| {
            ViewError::Io(format!(
                "pinning point {} of {} in the bucket (so no prune removes it while it is used): {e}",
                self.cycle, self.vm
            ))
        })
    }

    /// Delete the failover record of this view (an unplanned failover
    /// abandoned by `--cleanup`: the old primary may write the VM again).
    fn forget_failover(&self) {
        if let Err(e) = failedover::remove(&self.bucket, &self.site, &self.vm, Some(&self.pinner)) {
            tracing::warn!(
                "deleting the failover record of {}: {e}; `vdrep failover {} --cleanup` again removes it",
                self.vm,
                self.vm
            );
        }
    }

    /// Delete the pin (logged if it fails: it expires by itself).
    fn release(&self) {
        if let Err(e) = pin::release(&self.bucket, &self.site, &self.vm, &self.pinner) {
            tracing::warn!(
                "releasing the pin of point {} of {}: {e}; it expires within {} h by itself",
                self.cycle,
                self.vm,
                pin::PIN_TTL.as_secs() / 3600
            );
        }
    }
}

/// The pinner id a view of this scratch folder used, if any.
fn pinner_of(scratch: &Path) -> Option<String> {
    let s = std::fs::read_to_string(scratch.join(PIN_FILE)).ok()?;
    let s = s.trim();
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_string())
}

/// A pin the view of `vm` served from `root` left behind: (site, pinner)
/// if the view recorded one and its process is gone (a running view
/// releases its pin itself when it stops). Read it before [`stop`], which
/// removes the scratch folder; release it with [`pin::release`].
pub fn orphan_pin(root: &Path, site: Option<&str>, vm: &str) -> Option<(String, String)> {
    let (site, scratch) = find(root, site, vm).ok()?;
    if live_pid(&scratch).is_some() {
        return None;
    }
    Some((site, pinner_of(&scratch)?))
}

/// The site and scratch folder of the bucket view of `vm` served from
/// `root` (`site` if given, else the only one).
pub fn find(root: &Path, site: Option<&str>, vm: &str) -> Result<(String, PathBuf), ViewError> {
    let base = root.join(FAILOVER_DIR).join(SCRATCH);
    let sites: Vec<String> = match site {
        Some(s) => vec![s.to_string()],
        None => list(&base)
            .into_iter()
            .filter(|s| base.join(s).join(vm).join(super::STATE_FILE).exists())
            .collect(),
    };
    let site = match sites.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(ViewError::NotFound(format!(
                "no failover of {vm} from the cache folder {}",
                root.display()
            )))
        }
        _ => {
            return Err(ViewError::Refused(format!(
                "failovers of {vm} from several sites ({}): say which with --site",
                sites.join(", ")
            )))
        }
    };
    let scratch = scratch_dir(root, &site, vm);
    Ok((site, scratch))
}

/// Remove the test failover of `vm` served from `root`: stop its process
/// (which stops a `--boot` test VM and unmounts), delete the overlays and
/// the object cache. Returns the view, its last counters and notes.
pub fn cleanup(
    root: &Path,
    site: Option<&str>,
    vm: &str,
) -> Result<(ViewInfo, BucketViewStatus, Vec<String>), ViewError> {
    stop(root, site, vm, false)
}

/// [`cleanup`]; with `commit`, the view process of an unplanned failover
/// first folds the VM's writes into the hydrated copies and moves them to
/// [`disks_dir`] (its last counters say how that went).
pub fn stop(
    root: &Path,
    site: Option<&str>,
    vm: &str,
    commit: bool,
) -> Result<(ViewInfo, BucketViewStatus, Vec<String>), ViewError> {
    let (site, scratch) = find(root, site, vm)?;
    let info = read_state(&scratch).ok_or_else(|| {
        ViewError::NotFound(format!(
            "no test failover of {site}/{vm} from the cache folder {}",
            root.display()
        ))
    })?;
    if commit {
        std::fs::write(scratch.join(COMMIT_FILE), b"commit\n").map_err(|e| {
            ViewError::Io(format!(
                "writing {}: {e}",
                scratch.join(COMMIT_FILE).display()
            ))
        })?;
    }
    let mut notes = Vec::new();
    if let Some(pid) = live_pid(&scratch) {
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(if commit { 600 } else { 15 }) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            notes.push(format!(
                "the view process (pid {pid}) did not stop: killed it"
            ));
        }
    } else {
        notes.push("the view process was gone: cleaning up what it left".into());
    }
    let status = read_status(&scratch).unwrap_or_default();
    stop_test_vm(&scratch, &info.mountpoint, &mut notes);
    if is_mountpoint(&info.mountpoint) && detach(&info.mountpoint).is_ok() {
        notes.push(format!(
            "detached the view mount {}",
            info.mountpoint.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(cache_dir(root, &site, vm));
    if info.mountpoint.starts_with(root.join(FAILOVER_DIR)) {
        let _ = std::fs::remove_dir(&info.mountpoint);
    }
    let mut info = info;
    info.written_bytes = status.written_bytes;
    Ok((info, status, notes))
}
