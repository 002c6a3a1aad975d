//! Test failover views at the secondary site (run inside the receiver).
//!
//! This module owns the *views*: a recovery point of a VM exposed, inside
//! the running receiver, as a FUSE folder of bootable VHD files
//! (`STORE/failover/<site>/<vm>/<replica file>` by default), one per disk of
//! the point ([`view`]). Exposing costs no copy: reads come from a
//! [`PointReader`](crate::replica::PointReader) (the replica overlaid by the
//! undo records of later cycles), writes of the test VM go to a sparse
//! scratch overlay per disk (`STORE/failover/.scratch/<site>/<vm>/`), so the
//! replica and replication are untouched and the cost does not depend on
//! the disk size. The exposed point is pinned (prune keeps it), and applies
//! that run meanwhile push their undo layer into the view's readers first,
//! so the view keeps showing the point while the replica moves on.
//!
//! One test failover per VM at a time. [`Views::cleanup`] stops a test VM
//! started with `--boot` (its pid is in the scratch folder), unmounts the
//! view, deletes the scratch overlay and unpins the point.
//! [`Views::clean_stale`] (receiver start) does the same for views left by
//! a receiver that died: their FUSE mounts are dead (`ENOTCONN`) and are
//! detached lazily.
//!
//! [`bucket`]: the same view of a point in an `s3://` store, served by a
//! process of its own on a machine with no replica state (reads fetch only
//! the objects they touch, through a bounded local cache).

pub mod bucket;
pub mod hydrate;
pub mod view;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use serde::{Deserialize, Serialize};

use crate::replica::{self, Consistency, ReplicaFormat, ReplicaStore, Store};
use crate::util::now_ns;
use view::{ViewFile, ViewFs};

/// Folder of the store holding the views and their scratch data.
pub const FAILOVER_DIR: &str = "failover";
const SCRATCH: &str = ".scratch";
const STATE_FILE: &str = "view.json";
/// Pid of a test VM started with `--boot`, in the scratch folder.
pub const QEMU_PID_FILE: &str = "qemu.pid";
/// `fsname` of view mounts (to find stale ones).
pub const FSNAME: &str = "vdrep-failover";

/// Why a view could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A point argument that names no point.
    #[error("{0}")]
    BadPoint(String),
    /// The VM, its point or its test failover does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The VM's name matches several sites, or the place is taken (a view
    /// already runs, the folder is a mount point or not empty).
    #[error("{0}")]
    Refused(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] replica::StoreError),
    /// A file, folder or the FUSE mount failed.
    #[error("{0}")]
    Io(String),
}

/// The kinds of [`ViewError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewErrorKind {
    BadPoint,
    NotFound,
    Refused,
    Store,
    Io,
}

impl ViewError {
    pub fn kind(&self) -> ViewErrorKind {
        match self {
            ViewError::BadPoint(_) => ViewErrorKind::BadPoint,
            ViewError::NotFound(_) => ViewErrorKind::NotFound,
            ViewError::Refused(_) => ViewErrorKind::Refused,
            ViewError::Store(_) => ViewErrorKind::Store,
            ViewError::Io(_) => ViewErrorKind::Io,
        }
    }
}

/// Which recovery point to expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PointSel {
    /// The newest point.
    Latest,
    /// The point of this cycle (its id in `vdrep points`).
    Cycle { cycle: u64 },
    /// The newest point taken at or before this time.
    Time { unix_ns: u64 },
}

impl PointSel {
    /// `latest`, a point id (cycle number), or a time: `@UNIXSECS`,
    /// `YYYY-MM-DDTHH:MM[:SS][Z]` or `YYYY-MM-DD HH:MM[:SS]` (UTC), or an
    /// age `-90s`, `-5m`, `-2h`, `-1d`.
    pub fn parse(s: &str) -> Result<PointSel, ViewError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("latest") {
            return Ok(PointSel::Latest);
        }
        if let Ok(c) = s.parse::<u64>() {
            return Ok(PointSel::Cycle { cycle: c });
        }
        if let Some(secs) = s.strip_prefix('@') {
            let v: f64 = secs
                .parse()
                .map_err(|_| ViewError::BadPoint(format!("{s:?}: expected @UNIX-SECONDS")))?;
            return Ok(PointSel::Time {
                unix_ns: (v * 1e9) as u64,
            });
        }
        if let Some(age) = s.strip_prefix('-') {
            let (num, mult) = match age.chars().last() {
                Some('s') => (&age[..age.len() - 1], 1),
                Some('m') => (&age[..age.len() - 1], 60),
                Some('h') => (&age[..age.len() - 1], 3600),
                Some('d') => (&age[..age.len() - 1], 86400),
                _ => (age, 1),
            };
            let n: u64 = num.parse().map_err(|_| {
                ViewError::BadPoint(format!("{s:?}: expected an age like -90s, -5m, -2h"))
            })?;
            let now = now_ns();
            return Ok(PointSel::Time {
                unix_ns: now.saturating_sub(n * mult * 1_000_000_000),
            });
        }
        parse_utc(s)
            .map(|unix_ns| PointSel::Time { unix_ns })
            .ok_or_else(|| {
                ViewError::BadPoint(format!(
                    "{s:?} is not a point: use `latest`, a point id from `vdrep points`, a UTC time (2024-05-01T12:00:00Z), @UNIXSECS or an age (-5m)"
                ))
            })
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_utc(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let da: u32 = d.next()?.parse().ok()?;
    let mut t = time.split(':');
    let h: u64 = t.next()?.parse().ok()?;
    let mi: u64 = t.next()?.parse().ok()?;
    let se: f64 = t.next().map_or(Some(0.0), |x| x.parse().ok())?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se >= 61.0 {
        return None;
    }
    let days = days_from_civil(y, mo, da);
    let secs = u64::try_from(days).ok()? * 86400 + h * 3600 + mi * 60;
    Some(secs * 1_000_000_000 + (se * 1e9) as u64)
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a time in ns since the epoch.
pub fn format_utc(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // civil_from_days
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One exposed disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewDisk {
    /// Disk id (hex).
    pub disk_id: String,
    /// The VHD file a VM boots from (`format=vpc`).
    pub path: PathBuf,
    /// Length of that file.
    pub size: u64,
}

/// A test failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewInfo {
    pub site: String,
    pub vm: String,
    pub cycle: u64,
    pub time_unix_ns: u64,
    pub consistency: Consistency,
    /// The folder holding the VHD files.
    pub mountpoint: PathBuf,
    /// Scratch folder (overlays; a `--boot` test VM's pid and serial log).
    pub scratch: PathBuf,
    pub disks: Vec<ViewDisk>,
    /// Bytes the test VM wrote (filled in by cleanup and list).
    #[serde(default)]
    pub written_bytes: u64,
}

struct Active {
    info: ViewInfo,
    session: Option<BackgroundSession>,
    /// Overlay byte counters of the files (shared with the FS).
    files: std::sync::Arc<Vec<std::sync::Arc<ViewFile>>>,
}

/// The test failovers of one receiver.
#[derive(Default)]
pub struct Views {
    active: parking_lot::Mutex<HashMap<(String, String), Active>>,
    /// Serialises expose/cleanup.
    op: parking_lot::Mutex<()>,
}

/// The site holding `vm`: `site` if given, else the only site that has it.
pub fn resolve_site(store: &Store, site: Option<&str>, vm: &str) -> Result<String, ViewError> {
    if let Some(s) = site {
        return Ok(s.to_string());
    }
    let sites = store.root().join("sites");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&sites)
        .map_err(|e| ViewError::Io(format!("reading {}: {e}", sites.display())))?
        .flatten()
    {
        if e.path().join("vms").join(vm).is_dir() {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    match found.len() {
        0 => Err(ViewError::NotFound(format!(
            "no VM named {vm:?} in the store {}: check the name with `vdrep points` or the sender's `vdrep status`",
            store.root().display()
        ))),
        1 => Ok(found.remove(0)),
        _ => Err(ViewError::Refused(format!(
            "VM {vm:?} is replicated here from several sites ({}): say which with --site",
            found.join(", ")
        ))),
    }
}

/// The point `sel` names among `points` (oldest first).
pub fn select_point(
    points: &[replica::Point],
    sel: PointSel,
    vm: &str,
) -> Result<replica::Point, ViewError> {
    let pt = match sel {
        PointSel::Latest => points.last(),
        PointSel::Cycle { cycle } => points.iter().find(|p| p.cycle == cycle),
        PointSel::Time { unix_ns } => points.iter().rev().find(|p| p.time_unix_ns <= unix_ns),
    };
    pt.cloned().ok_or_else(|| {
        ViewError::NotFound(match sel {
            _ if points.is_empty() => format!(
                "{vm} has no recovery point yet: wait for its initial replication to finish"
            ),
            PointSel::Time { unix_ns } => format!(
                "{vm} has no recovery point at or before {} UTC (the oldest is {} UTC): list them with `vdrep points {vm}`",
                format_utc(unix_ns),
                format_utc(points.first().map_or(0, |p| p.time_unix_ns))
            ),
            _ => format!("{vm} has no recovery point {sel:?}: list them with `vdrep points {vm}`"),
        })
    })
}

fn parse_hex16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(canon) = p.canonicalize() else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|mi| {
            mi.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

fn detach(p: &Path) -> std::io::Result<()> {
    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}

/// A process that exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, r)| !r.starts_with('Z') && !r.starts_with('X'))
        })
        .unwrap_or(false)
}

/// Stop the test VM whose pid is in `scratch/qemu.pid`, if it still runs
/// and uses this view (its command line names `mountpoint`).
fn stop_test_vm(scratch: &Path, mountpoint: &Path, warnings: &mut Vec<String>) {
    let Ok(s) = std::fs::read_to_string(scratch.join(QEMU_PID_FILE)) else {
        return;
    };
    let Ok(pid) = s.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let want = mountpoint.as_os_str().as_encoded_bytes();
    if want.is_empty() || !cmdline.windows(want.len()).any(|w| w == want) {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    let t0 = std::time::Instant::now();
    while alive(pid) && t0.elapsed() < std::time::Duration::from_secs(5) {
        // Reap it if it is our child (it is not, normally: the CLI started it).
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    warnings.push(format!("stopped the test VM (pid {pid})"));
}

impl Views {
    pub fn new() -> Views {
        Views::default()
    }

    fn failover_dir(store: &Store) -> PathBuf {
        store.root().join(FAILOVER_DIR)
    }

    fn scratch_dir(store: &Store, site: &str, vm: &str) -> PathBuf {
        Self::failover_dir(store).join(SCRATCH).join(site).join(vm)
    }

    /// Expose point `sel` of `vm` (test failover). Returns in well under a
    /// second whatever the disk sizes.
    pub fn expose(
        &self,
        store: &Store,
        site: Option<&str>,
        vm: &str,
        sel: PointSel,
        at: Option<PathBuf>,
    ) -> Result<ViewInfo, ViewError> {
        let _op = self.op.lock();
        replica::validate_name("vm", vm).map_err(|e| ViewError::NotFound(e.to_string()))?;
        let site = resolve_site(store, site, vm)?;
        let key = (site.clone(), vm.to_string());
        if let Some(a) = self.active.lock().get(&key) {
            return Err(ViewError::Refused(format!(
                "a test failover of {vm} is already running (point {}, files in {}): remove it with `vdrep failover {vm} --cleanup --store {}` first",
                a.info.cycle,
                a.info.mountpoint.display(),
                store.root().display()
            )));
        }
        let points = store.site(&site)?.points(vm)?;
        let pt = select_point(&points, sel, vm)?;
        store.pin(&site, vm, pt.cycle);
        match self.mount_view(store, &site, vm, &pt, at) {
            Ok(a) => {
                let info = a.info.clone();
                self.active.lock().insert(key, a);
                Ok(info)
            }
            Err(e) => {
                store.unpin(&site, vm, pt.cycle);
                Err(e)
            }
        }
    }

    fn mount_view(
        &self,
        store: &Store,
        site: &str,
        vm: &str,
        pt: &replica::Point,
        at: Option<PathBuf>,
    ) -> Result<Active, ViewError> {
        let mountpoint = match at {
            Some(p) => p,
            None => Self::failover_dir(store).join(site).join(vm),
        };
        mount_at(
            store,
            site,
            vm,
            pt,
            &Self::scratch_dir(store, site, vm),
            mountpoint,
            false,
        )
    }

    /// Remove the test failover of `vm`. Returns what it was and notes.
    pub fn cleanup(
        &self,
        store: &Store,
        site: Option<&str>,
        vm: &str,
    ) -> Result<(ViewInfo, Vec<String>), ViewError> {
        let _op = self.op.lock();
        let site = resolve_site(store, site, vm)?;
        let key = (site.clone(), vm.to_string());
        let mut warnings = Vec::new();
        let Some(mut a) = self.active.lock().remove(&key) else {
            // A view left by an earlier receiver?
            let scratch = Self::scratch_dir(store, &site, vm);
            if let Some(info) = read_state(&scratch) {
                clean_one(store, &info, &mut warnings);
                return Ok((info, warnings));
            }
            return Err(ViewError::NotFound(format!(
                "no test failover of {vm} is running"
            )));
        };
        a.info.written_bytes = a.files.iter().map(|f| f.overlay_bytes()).sum();
        stop_test_vm(&a.info.scratch, &a.info.mountpoint, &mut warnings);
        if let Some(sess) = a.session.take() {
            if let Err(e) = sess.umount_and_join() {
                warnings.push(format!(
                    "unmounting {} failed ({e}): detached it lazily; it disappears when the last user closes it",
                    a.info.mountpoint.display()
                ));
                let _ = detach(&a.info.mountpoint);
            }
        }
        drop(a.files);
        let _ = std::fs::remove_dir_all(&a.info.scratch);
        if a.info.mountpoint.starts_with(Self::failover_dir(store)) {
            let _ = std::fs::remove_dir(&a.info.mountpoint);
        }
        store.unpin(&site, vm, a.info.cycle);
        tracing::info!("test failover of {site}/{vm} removed");
        Ok((a.info, warnings))
    }

    /// The running test failovers.
    pub fn list(&self) -> Vec<ViewInfo> {
        let g = self.active.lock();
        let mut v: Vec<ViewInfo> = g
            .values()
            .map(|a| {
                let mut i = a.info.clone();
                i.written_bytes = a.files.iter().map(|f| f.overlay_bytes()).sum();
                i
            })
            .collect();
        v.sort_by(|a, b| (&a.site, &a.vm).cmp(&(&b.site, &b.vm)));
        v
    }

    /// At receiver start (before any view exists in this process): remove
    /// what views of an earlier receiver left: dead FUSE mounts (detached
    /// lazily), test VMs, scratch overlays. Returns one line per action.
    pub fn clean_stale(store: &Store) -> Vec<String> {
        let mut out = Vec::new();
        let base = Self::failover_dir(store).join(SCRATCH);
        for site in list(&base) {
            for vm in list(&base.join(&site)) {
                let scratch = base.join(&site).join(&vm);
                match read_state(&scratch) {
                    Some(info) => {
                        clean_one(store, &info, &mut out);
                        out.push(format!(
                            "removed the stale test failover of {site}/{vm} (point {}, {})",
                            info.cycle,
                            info.mountpoint.display()
                        ));
                    }
                    None => {
                        let _ = std::fs::remove_dir_all(&scratch);
                    }
                }
            }
        }
        // Any other mount of ours under STORE/failover is dead too.
        let fo = Self::failover_dir(store);
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                let f: Vec<&str> = l.split(' ').collect();
                let Some(sep) = f.iter().position(|x| *x == "-") else {
                    continue;
                };
                let mp = PathBuf::from(f.get(4).unwrap_or(&"").replace("\\040", " "));
                if f.get(sep + 2) == Some(&FSNAME) && mp.starts_with(&fo) {
                    let _ = detach(&mp);
                    let _ = std::fs::remove_dir(&mp);
                    out.push(format!("detached the stale view mount {}", mp.display()));
                }
            }
        }
        out
    }
}

/// Mount point `pt` of `site/vm` read from `store` at `mountpoint` (an
/// empty folder, created if missing), the overlays in `scratch` (emptied);
/// the view's state file is written before the mount. Any store: the
/// directory store's replica and undo records, or a bucket's chunks and
/// logs (fetched as reads touch them).
/// `durable`: the overlays and their block maps (`<file>.overlay`,
/// `<file>.overlay.map`) are kept across a crash and reused by the next
/// mount of the same point (an unplanned failover: they hold the VM's
/// writes); else the scratch folder starts empty.
fn mount_at(
    store: &dyn ReplicaStore,
    site: &str,
    vm: &str,
    pt: &replica::Point,
    scratch: &Path,
    mountpoint: PathBuf,
    durable: bool,
) -> Result<Active, ViewError> {
    let scratch = scratch.to_path_buf();
    let kept = durable && read_state(&scratch).is_some_and(|i| i.cycle == pt.cycle && i.vm == vm);
    if durable && !kept && read_state(&scratch).is_some() {
        return Err(ViewError::Refused(format!(
            "{}: the VM's writes of an unplanned failover of another point are kept there: fail over to that point again, or remove them with --cleanup",
            scratch.display()
        )));
    }
    if !kept {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    std::fs::create_dir_all(&scratch).map_err(|e| {
        ViewError::Io(format!(
            "creating the scratch folder {}: {e}",
            scratch.display()
        ))
    })?;
    let fail = |e: ViewError| {
        if !kept {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        e
    };
    if is_mountpoint(&mountpoint) {
        return Err(fail(ViewError::Refused(format!(
            "{} is already a mount point: unmount it or choose another --at",
            mountpoint.display()
        ))));
    }
    std::fs::create_dir_all(&mountpoint).map_err(|e| {
        fail(ViewError::Io(format!(
            "creating the view folder {}: {e}",
            mountpoint.display()
        )))
    })?;
    if std::fs::read_dir(&mountpoint).map_or(true, |mut d| d.next().is_some()) {
        return Err(fail(ViewError::Refused(format!(
            "{} is not an empty folder: the view is mounted there; empty it or choose another --at",
            mountpoint.display()
        ))));
    }
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| fail(ViewError::Io(format!("{}: {e}", mountpoint.display()))))?;
    let mut files = Vec::new();
    let mut disks = Vec::new();
    for idh in &pt.disks {
        let id = parse_hex16(idh);
        let d = replica::DiskRef {
            site,
            vm,
            disk_id: &id,
        };
        let st = store.replica_state(d).map_err(|e| fail(e.into()))?;
        let reader = store.read_point(d, pt.cycle).map_err(|e| fail(e.into()))?;
        let footer = match st.format {
            ReplicaFormat::VhdOfRaw => Some(replica::vhd_fixed_footer(
                reader.len(),
                st.vhd_time,
                parse_hex16(&st.vhd_id),
            )),
            ReplicaFormat::Raw => None,
        };
        let ovp = scratch.join(format!("{}.overlay", st.replica_file));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(kept)
                .create_new(!kept)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .map_err(|e| {
                    fail(ViewError::Io(format!(
                        "opening the overlay {}: {e}",
                        p.display()
                    )))
                })
        };
        let ov = open(&ovp)?;
        let name = st.replica_file.clone();
        let f = if durable {
            let map = open(&ovp.with_extension("overlay.map"))?;
            ViewFile::durable(name, reader, footer, ov, map)
        } else {
            ViewFile::new(name, reader, footer, ov)
        }
        .map_err(|e| {
            fail(ViewError::Io(format!(
                "setting up the overlay {}: {e}",
                ovp.display()
            )))
        })?;
        disks.push(ViewDisk {
            disk_id: idh.clone(),
            path: mountpoint.join(&st.replica_file),
            size: f.len(),
        });
        files.push(std::sync::Arc::new(f));
    }
    let files = std::sync::Arc::new(files);
    let info = ViewInfo {
        site: site.to_string(),
        vm: vm.to_string(),
        cycle: pt.cycle,
        time_unix_ns: pt.time_unix_ns,
        consistency: pt.consistency,
        mountpoint: mountpoint.clone(),
        scratch: scratch.clone(),
        disks,
        written_bytes: 0,
    };
    // Record the view before mounting: a receiver killed from here on
    // leaves enough behind for clean_stale.
    let json = serde_json::to_vec_pretty(&info).map_err(|e| fail(ViewError::Io(e.to_string())))?;
    std::fs::write(scratch.join(STATE_FILE), json)
        .map_err(|e| fail(ViewError::Io(format!("writing {}: {e}", scratch.display()))))?;
    let fs = ViewFs::new(files.clone(), pt.time_unix_ns);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(FSNAME.to_string()),
        MountOption::Subtype("vdrep".to_string()),
        MountOption::DefaultPermissions,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(4);
    cfg.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &cfg)
        .and_then(|s| s.spawn())
        .map_err(|e| {
            fail(ViewError::Io(format!(
                "mounting the failover view at {}: {e} (is /dev/fuse available and are we root?)",
                mountpoint.display()
            )))
        })?;
    tracing::info!(
        "test failover of {site}/{vm}: point {} exposed at {}",
        pt.cycle,
        mountpoint.display()
    );
    Ok(Active {
        info,
        session: Some(session),
        files,
    })
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn read_state(scratch: &Path) -> Option<ViewInfo> {
    let b = std::fs::read(scratch.join(STATE_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Remove a view no live session serves (stale mount, scratch, test VM).
fn clean_one(store: &Store, info: &ViewInfo, notes: &mut Vec<String>) {
    stop_test_vm(&info.scratch, &info.mountpoint, notes);
    if (is_mountpoint(&info.mountpoint) || std::fs::metadata(&info.mountpoint).is_err())
        && detach(&info.mountpoint).is_ok()
    {
        notes.push(format!(
            "detached the dead view mount {}",
            info.mountpoint.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&info.scratch);
    if info.mountpoint.starts_with(store.root().join(FAILOVER_DIR)) {
        let _ = std::fs::remove_dir(&info.mountpoint);
    }
}
