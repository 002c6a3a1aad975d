//! Shared helpers for tests that use a real `vdrep mount` (root + /dev/fuse).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

pub fn vdrep_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdrep"))
}

/// Why FUSE tests cannot run here, if they cannot.
pub fn fuse_unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is absent".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (mounting over a folder needs root)".into());
    }
    None
}

macro_rules! require_fuse {
    () => {
        if let Some(why) = mountutil::fuse_unavailable() {
            crate::skip::skip(&format!("SKIP: {why}"));
            return;
        }
    };
}
pub(crate) use require_fuse;

static RUN_DIR: Once = Once::new();

/// All tests of a binary share one control-socket folder of their own.
pub fn setup() {
    RUN_DIR.call_once(|| {
        let d = std::env::temp_dir().join(format!("vdrep-test-run-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        // SAFETY: set once, before any test spawns the binary or uses the socket.
        unsafe { std::env::set_var("VDREP_RUN_DIR", &d) };
        // Background mounts log there too, not in /var/log/vdrep.
        // SAFETY: as above.
        unsafe { std::env::set_var("VDREP_LOG_DIR", &d) };
    });
}

pub fn vdrep(args: &[&str]) -> Output {
    setup();
    Command::new(vdrep_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running vdrep {args:?}: {e}"))
}

pub fn vdrep_ok(args: &[&str]) -> String {
    ok_output(args, vdrep(args))
}

/// `o`'s standard output; fails the test if `vdrep ARGS` did not succeed.
fn ok_output(args: &[&str], o: Output) -> String {
    assert!(
        o.status.success(),
        "vdrep {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A folder with vdrep mounted over it; unmounted (lazily if needed) on drop.
pub struct Mounted {
    pub dir: PathBuf,
    pub mounted: bool,
}

impl Mounted {
    pub fn new(dir: &Path, extra: &[&str]) -> Mounted {
        Mounted::with_env(dir, extra, &[])
    }

    /// [`Mounted::new`] with `env` added to the mount daemon's environment
    /// (test hooks), and so to its workers'.
    pub fn with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Mounted {
        let mut args = vec!["mount", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        setup();
        let o = Command::new(vdrep_bin())
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("running vdrep {args:?}: {e}"));
        ok_output(&args, o);
        Mounted {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    pub fn cut(&self) -> Vec<PathBuf> {
        vdrep_ok(&["cut", self.dir.to_str().unwrap()])
            .lines()
            .map(PathBuf::from)
            .collect()
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&vdrep_ok(&["status", "--json", self.dir.to_str().unwrap()])).unwrap()
    }

    /// `status --json` once `settled` holds for it (asked again for at
    /// most 30 s; the last one is returned either way, for the caller's
    /// assertion), for what settles after `vdrep sync` returned (it
    /// returns once the receiver committed its point, on durable logs): a
    /// state the sender's worker sets after its next steps (a retry, a
    /// resync's answer), or a cut the sender made right after.
    pub fn status_once(&self, settled: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let t0 = std::time::Instant::now();
        loop {
            let st = self.status_json();
            if settled(&st) || t0.elapsed() > std::time::Duration::from_secs(30) {
                return st;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn umount(&mut self) {
        vdrep_ok(&["umount", self.dir.to_str().unwrap()]);
        self.mounted = false;
    }

    /// The pid of the mount's worker (the process that serves the mount
    /// and replicates), from `status --json`; `None` while no worker
    /// answers. Killing it leaves the mount up: the supervisor starts
    /// another. (Killing [`Mounted::daemon_pid`], the supervisor, ends the
    /// mount.)
    pub fn worker_pid(&self) -> Option<i32> {
        let o = vdrep(&["status", "--json", self.dir.to_str()?]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        i32::try_from(v["worker"]["pid"].as_i64()?).ok()
    }

    /// The pid of the mount's supervisor, which holds the FUSE connection
    /// (`status`'s "daemon pid").
    pub fn daemon_pid(&self) -> i32 {
        let o = vdrep(&["status", self.dir.to_str().unwrap()]);
        let s = String::from_utf8_lossy(&o.stdout);
        let i = s.find("daemon pid ").unwrap() + "daemon pid ".len();
        s[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let d = self.dir.to_str().unwrap().to_string();
            let o = vdrep(&["umount", &d]);
            if !o.status.success() {
                let _ = vdrep(&["umount", "--lazy", &d]);
            }
        }
    }
}

pub fn is_mountpoint(dir: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
    m.lines().any(|l| l.split(' ').nth(4) == d.to_str())
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Apply logs in order to `image` with the CLI.
pub fn apply(logs: &[PathBuf], image: &Path) {
    for l in logs {
        vdrep_ok(&["hrl", "apply", l.to_str().unwrap(), image.to_str().unwrap()]);
    }
}

/// The log of `disk` (file name) among the paths a cut printed.
pub fn log_for(logs: &[PathBuf], disk: &str) -> PathBuf {
    logs.iter()
        .find(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().starts_with(&format!("{disk}-")))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no log for {disk} in {logs:?}"))
        .clone()
}

/// A `vdrep receive` child on loopback; killed (-9) when dropped.
pub struct Receiver {
    pub child: std::process::Child,
    /// The address it listens on (from its "listening on" banner).
    pub addr: String,
}

impl Receiver {
    /// `vdrep receive --listen ADDR --store STORE --keys KEYS --trust TRUST`
    /// plus `extra` arguments and `env`; returns once it listens.
    pub fn spawn(
        addr: &str,
        store: &Path,
        keys: &Path,
        trust: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Receiver {
        use std::io::BufRead;
        setup();
        let mut child = Command::new(vdrep_bin())
            .args(["receive", "--listen", addr, "--store"])
            .arg(store)
            .arg("--keys")
            .arg(keys)
            .arg("--trust")
            .arg(trust)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn vdrep receive");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("receiver stdout"))
            .read_line(&mut line)
            .expect("read the receiver's banner");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"))
            .to_string();
        Receiver { child, addr }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two sites on this machine: keys of site-a (`ka/`) and site-b (`kb/`),
/// the VM folder (`vm/`) and the receiver's store (`store/`) in a temp dir.
pub struct TwoSites {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl TwoSites {
    pub fn new() -> TwoSites {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["ka", "kb", "vm", "store"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let s = TwoSites { _tmp: tmp, root };
        vdrep_ok(&["keys", "init", "--name", "site-a", "--out", &s.s("ka")]);
        vdrep_ok(&["keys", "init", "--name", "site-b", "--out", &s.s("kb")]);
        s
    }
    pub fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    pub fn s(&self, rel: &str) -> String {
        self.p(rel).to_str().unwrap().to_string()
    }
    /// `vdrep receive` of site-b on `addr`, trusting site-a.
    pub fn receiver(&self, addr: &str) -> Receiver {
        Receiver::spawn(
            addr,
            &self.p("store"),
            &self.p("kb"),
            &self.p("ka/site-a.crt"),
            &[],
            &[],
        )
    }
    /// `vdrep mount vm/ --keys ka/`.
    pub fn mount(&self) -> Mounted {
        Mounted::new(&self.p("vm"), &["--keys", &self.s("ka")])
    }
    /// The replica file `file` of `vm` at site-b.
    pub fn replica(&self, vm: &str, file: &str) -> PathBuf {
        let disks = self.p(&format!("store/sites/site-a/vms/{vm}/disks"));
        let p = std::fs::read_dir(&disks)
            .unwrap()
            .flatten()
            .map(|d| d.path().join(file))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no replica {file} under {}", disks.display()));
        if let Some(d) = p.parent() {
            wait_applied(d);
        }
        p
    }
}

/// `/sys/module/fuse/parameters/enable_uring` as found before the first
/// of the tests that use it started, put back when the last of them (in
/// any test process: they hold a shared `flock` on a file under the temp
/// folder, which also records the value) is done, so that other tests on
/// this host do not see it changed and concurrent ones do not switch it off
/// under each other.
pub struct UringSwitch(std::fs::File);

pub const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

fn flock(f: &std::fs::File, op: i32) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: plain system call on an open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

impl UringSwitch {
    /// `None` (a skip) when the kernel has no FUSE over io_uring.
    pub fn take() -> Option<UringSwitch> {
        use std::io::{Read, Seek, Write};
        if let Err(e) = std::fs::metadata(URING_PARAM) {
            crate::skip::skip(&format!(
                "SKIP: this kernel has no FUSE over io_uring ({URING_PARAM}: {e})"
            ));
            return None;
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(std::env::temp_dir().join("vdrep-test-enable-uring"))
            .expect("the enable_uring record");
        assert!(flock(&f, libc::LOCK_EX), "flock the enable_uring record");
        let mut was = String::new();
        f.read_to_string(&mut was)
            .expect("read the enable_uring record");
        if was.trim().is_empty() {
            // Read under the lock: read before it, a value another test
            // had just set would be recorded as the host's.
            let now = std::fs::read_to_string(URING_PARAM)
                .map(|v| v.trim().to_string())
                .expect("read enable_uring");
            f.rewind().expect("rewind");
            f.write_all(now.as_bytes()).expect("record enable_uring");
        }
        assert!(flock(&f, libc::LOCK_SH), "flock the enable_uring record");
        Some(UringSwitch(f))
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        use std::io::{Read, Seek};
        // The last user (no other shared lock) puts the value back.
        if !flock(&self.0, libc::LOCK_EX | libc::LOCK_NB) {
            return;
        }
        let mut was = String::new();
        let _ = self.0.rewind();
        let _ = self.0.read_to_string(&mut was);
        let was = was.trim();
        let now = std::fs::read_to_string(URING_PARAM).unwrap_or_default();
        if !was.is_empty() && now.trim() != was {
            let _ = std::fs::write(URING_PARAM, was);
        }
        let _ = self.0.set_len(0);
    }
}

/// `vdrep mount` arguments for the io_uring transport.
pub const URING_ARGS: &[&str] = &["--fuse-transport", "uring", "--enable-uring"];

/// Assert the mount's worker serves through io_uring rings.
pub fn assert_uring(m: &Mounted) {
    assert_eq!(
        m.status_json()["worker"]["transport"],
        "uring",
        "the mount does not serve through io_uring rings"
    );
    assert_rings_pinned(m);
}

/// A kernel CPU list ("0-3,5") as CPU numbers.
fn cpu_list(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        v.extend(a..=b);
    }
    v
}

/// `Cpus_allowed_list` of `/proc/{path}/status`.
fn allowed_cpus(path: &str) -> Vec<usize> {
    let st = std::fs::read_to_string(format!("/proc/{path}/status")).unwrap();
    let line = st
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    cpu_list(line)
}

/// Ring thread `fuse-ring-i` serves queue `i mod CPUs` and runs only on
/// that CPU (when this process may use it; else it is left unpinned).
fn assert_rings_pinned(m: &Mounted) {
    let pid = m.worker_pid().expect("the worker answers");
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let queues = cpu_list(&possible).into_iter().max().unwrap() + 1;
    let usable = allowed_cpus("self");
    // The status says `uring` once the rings are registered; their threads
    // are spawned when the session starts serving, which a loaded host may
    // delay (CI saw 0 threads): wait for them (up to 10 s), then check.
    let ring_threads = || -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|t| {
                        let tid = t.file_name().into_string().ok()?;
                        let comm =
                            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
                        comm.trim()
                            .starts_with("fuse-ring-")
                            .then(|| (tid, comm.trim().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let t0 = std::time::Instant::now();
    while ring_threads().len() < queues && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut rings = 0;
    for (tid, comm) in ring_threads() {
        let Some(i) = comm.strip_prefix("fuse-ring-") else {
            continue;
        };
        rings += 1;
        let cpu = i.parse::<usize>().unwrap() % queues;
        if usable.contains(&cpu) {
            // A ring thread pins itself as its first step, but a thread just
            // spawned on a loaded host may not have run yet: wait for it
            // (up to 10 s), then check.
            let task = format!("{pid}/task/{tid}");
            let t0 = std::time::Instant::now();
            while allowed_cpus(&task) != vec![cpu]
                && t0.elapsed() < std::time::Duration::from_secs(10)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(
                allowed_cpus(&task),
                vec![cpu],
                "ring thread {comm} serves queue {cpu}: it must run on CPU {cpu} only"
            );
        }
    }
    assert!(
        rings >= queues,
        "worker {pid} runs {rings} ring threads for {queues} queues"
    );
}

/// A zeroed, 4 KiB-aligned buffer of `len` bytes for O_DIRECT I/O (a
/// slice through `Deref`), freed on drop.
pub struct DirectBuf {
    p: *mut u8,
    layout: std::alloc::Layout,
}

impl DirectBuf {
    pub fn new(len: usize) -> DirectBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "allocating {len} aligned bytes");
        DirectBuf { p, layout }
    }
}

impl std::ops::Deref for DirectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: allocated with this size; borrowed through self.
        unsafe { std::slice::from_raw_parts(self.p, self.layout.size()) }
    }
}

impl std::ops::DerefMut for DirectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: allocated with this size; exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.p, self.layout.size()) }
    }
}

impl Drop for DirectBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.p, self.layout) }
    }
}

/// Wait (at most 60 s) until the replica in the store's disk folder
/// `disk_dir` has applied every recovery point committed over it. The
/// receiver commits a point once its logs are durable and applies them
/// right after (`ReplicaStore::commits_durable_logs`), so a test that
/// reads the replica file itself right after `vdrep sync` waits for that.
pub fn wait_applied(disk_dir: &Path) {
    let Some(vm_dir) = disk_dir.parent().and_then(Path::parent) else {
        return;
    };
    let id = disk_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let t0 = std::time::Instant::now();
    loop {
        let newest = vdrep::replica::points_in(vm_dir)
            .ok()
            .and_then(|pts| {
                pts.iter()
                    .filter(|p| p.disks.contains(&id))
                    .map(|p| p.cycle)
                    .max()
            })
            .unwrap_or(0);
        let Some(st) = std::fs::read(disk_dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            return;
        };
        let cycle = st["cycle"].as_u64().unwrap_or(0);
        if cycle >= newest && st["applying"].is_null() {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{}: point {newest} is committed but the replica stays at {cycle} ({st})",
            disk_dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
