//! vdrep as a managed service, for real: the systemd units pass
//! `systemd-analyze verify`; `vdrep mount --foreground` and `vdrep
//! receive` speak the notify protocol to a `$NOTIFY_SOCKET` this test binds
//! (READY=1 only once the folder is mounted / the port is bound, STATUS=,
//! WATCHDOG=1, RELOADING=1 on SIGHUP, STOPPING=1); logs go to stderr as
//! JSON lines or to the chosen file, never into the VM folder; `vdrep
//! forget` deletes a replica through the running receiver and offline, asks
//! before it does, and refuses while a test failover exposes the VM. Needs
//! root and /dev/fuse (CI has both) and systemd-analyze.

mod mountutil;
mod skip;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mountutil::*;

/// A notify socket standing in for systemd.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next datagram within `timeout`, as text.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Wait for a datagram with line `line`; every datagram seen before it
    /// and the matching one.
    fn wait_for(&self, line: &str, timeout: Duration) -> (Vec<String>, String) {
        let t0 = Instant::now();
        let mut seen = Vec::new();
        while t0.elapsed() < timeout {
            if let Some(m) = self.next(Duration::from_millis(500)) {
                if m.lines().any(|l| l == line) {
                    return (seen, m);
                }
                seen.push(m);
            }
        }
        panic!("no {line} within {timeout:?}; got {seen:?}");
    }
}

/// The value of `STATUS=` in a datagram.
fn status_of(msg: &str) -> &str {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {msg:?}"))
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < timeout, "pid {} did not exit", child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copy the units with ExecStart= pointing at the built binary (verify
/// checks the executable exists) and an instance of the template.
fn units_for_verify(to: &Path) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let bin = vdrep_bin();
    let mut out = Vec::new();
    for (file, as_name) in [
        ("vdrep-receive.service", "vdrep-receive.service"),
        ("vdrep-mount@.service", "vdrep-mount@.service"),
        ("vdrep-mount@.service", "vdrep-mount@srv-vms.service"),
    ] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/vdrep "), "{file}");
        let p = to.join(as_name);
        std::fs::write(&p, text.replace("/usr/bin/vdrep", bin.to_str().unwrap())).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        skip::skip("SKIP: systemd-analyze is missing (Debian package systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    // --man=no: the man pages are checked on the installed package
    // (scripts/build-deb.sh), not here.
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units[1..])
        .arg(&units[0])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    assert!(err.trim().is_empty(), "warnings: {err}");

    // It does catch mistakes: a unit with an unknown directive fails.
    let bad = dir.path().join("vdrep-bad.service");
    let text = std::fs::read_to_string(&units[0]).unwrap();
    std::fs::write(&bad, text.replace("Type=notify", "Type=notfy")).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stderr).trim().is_empty(),
        "a bad Type= went unnoticed"
    );
}

#[test]
fn units_order_the_mount_before_the_hypervisors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let mount = std::fs::read_to_string(src.join("vdrep-mount@.service")).unwrap();
    let before = mount
        .lines()
        .find_map(|l| l.strip_prefix("Before="))
        .unwrap();
    for u in [
        "libvirtd.service",
        "virtqemud.service",
        "pve-guests.service",
    ] {
        assert!(before.split_whitespace().any(|b| b == u), "{u}: {before}");
    }
    for unit in [
        &mount,
        &std::fs::read_to_string(src.join("vdrep-receive.service")).unwrap(),
    ] {
        assert!(unit.contains("\nType=notify\n"));
        assert!(unit.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"));
        assert!(unit.contains("\nWatchdogSec="));
        // A private mount namespace would hide the FUSE mounts from the host.
        for opt in [
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "PrivateMounts=",
        ] {
            assert!(!unit.contains(&format!("\n{opt}")), "{opt}");
        }
    }
}

#[test]
fn foreground_mount_is_ready_only_once_mounted_and_logs_json_to_stderr() {
    require_fuse!();
    setup();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vms");
    std::fs::create_dir(&dir).unwrap();
    std::fs::File::create(dir.join("d.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // JSON logs from the configuration file's `[site] log_format`.
    let cfg = tmp.path().join("vdrep.toml");
    std::fs::write(&cfg, "[site]\nlog_format = \"json\"\n").unwrap();
    let notify = NotifySocket::new();
    let mut child = Command::new(vdrep_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["mount", "--foreground"])
        .arg(&dir)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let (before, ready) = notify.wait_for("READY=1", Duration::from_secs(30));
    // Usable at the moment it says so: mounted, and its control socket answers.
    assert!(is_mountpoint(&dir), "READY=1 before the mount");
    let st = vdrep_ok(&["status", "--json", dir.to_str().unwrap()]);
    assert!(st.contains("d.img"), "{st}");
    assert!(before.is_empty(), "messages before READY=1: {before:?}");
    assert!(
        status_of(&ready).starts_with(&format!("mounted {}", dir.display())),
        "{ready}"
    );
    // The watchdog is pinged (at least twice per 400 ms interval).
    notify.wait_for("WATCHDOG=1", Duration::from_secs(2));

    // SIGHUP reloads the file and never unmounts: RELOADING=1, then READY=1 again.
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let (_, reloading) = notify.wait_for("RELOADING=1", Duration::from_secs(10));
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")));
    notify.wait_for("READY=1", Duration::from_secs(10));
    assert!(is_mountpoint(&dir), "SIGHUP unmounted");

    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let (_, stopping) = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(status_of(&stopping).starts_with("unmounting"), "{stopping}");
    assert!(wait_exit(&mut child, Duration::from_secs(60)).success());
    assert!(!is_mountpoint(&dir));

    // Logs: one JSON object per line on stderr, none in the folder.
    let lines = lines.join().unwrap();
    assert!(!lines.is_empty());
    let mut messages = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        messages.iter().any(|m| m.starts_with("vdrep mounted over")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("SIGHUP")),
        "{messages:?}"
    );
    assert!(!dir.join(".vdrep/daemon.log").exists());
}

#[test]
fn background_mount_logs_to_the_chosen_file_never_into_the_folder() {
    require_fuse!();
    setup();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vm disks");
    std::fs::create_dir(&dir).unwrap();
    // --log-file FILE.
    let log = tmp.path().join("logs/mount.log");
    let mut m = Mounted::new(&dir, &["--log-file", log.to_str().unwrap()]);
    m.umount();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("vdrep mounted over"), "{text}");
    assert!(text.contains("clean stop"), "{text}");
    assert!(!text.contains('\x1b'), "colours in a file: {text}");
    assert!(!dir.join(".vdrep/daemon.log").exists());

    // Default: $VDREP_LOG_DIR/mount-ESCAPED.log, named as systemd-escape does.
    let logs = tmp.path().join("default-logs");
    let o = Command::new(vdrep_bin())
        .args(["mount"])
        .arg(&dir)
        .env("VDREP_LOG_DIR", &logs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vdrep_ok(&["umount", dir.to_str().unwrap()]);
    let escaped = run("systemd-escape", &["--path", dir.to_str().unwrap()]);
    let default = logs.join(format!("mount-{}.log", escaped.trim()));
    let text =
        std::fs::read_to_string(&default).unwrap_or_else(|e| panic!("{}: {e}", default.display()));
    assert!(text.contains("vdrep mounted over"), "{text}");
    assert!(!dir.join(".vdrep/daemon.log").exists());
}

#[test]
fn receiver_is_ready_only_once_listening_and_survives_sighup() {
    use std::os::unix::fs::MetadataExt;
    setup();
    let site = TwoSites::new();
    let notify = NotifySocket::new();
    // stderr is "the journal": $JOURNAL_STREAM names its device and inode,
    // as systemd sets it.
    let journal = site.p("journal.txt");
    let stderr = std::fs::File::create(&journal).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = Command::new(vdrep_bin())
        .args(["receive", "--listen", "127.0.0.1:0", "--store"])
        .arg(site.p("store"))
        .arg("--keys")
        .arg(site.p("kb"))
        .arg("--trust")
        .arg(site.p("ka/site-a.crt"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let (before, ready) = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(before.is_empty(), "{before:?}");
    let status = status_of(&ready);
    let addr = status
        .strip_prefix("listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{status}"));
    // The port is bound at the moment READY=1 arrives.
    let bound = std::net::UdpSocket::bind(addr);
    assert_eq!(
        bound.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::AddrInUse),
        "{addr} is not bound at READY=1"
    );
    notify.wait_for("WATCHDOG=1", Duration::from_secs(2));
    // SIGHUP (ExecReload) with trust from flags: nothing to reload, and
    // the receiver keeps running.
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed it");
    let _ = child.kill();
    let _ = child.wait();
    // Journal lines: the sd-daemon priority prefix, no timestamp, no colour.
    let text = std::fs::read_to_string(&journal).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("receiver listening on")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("SIGHUP: nothing to reload")),
        "{text}"
    );
    for l in &lines {
        let p = l.get(..3).unwrap_or_default();
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&p),
            "no priority: {l}"
        );
        assert!(!l.contains('\x1b') && !l[3..].starts_with("20"), "{l}");
    }
}

/// `vdrep forget` with stdin not a terminal (as in a script).
fn forget(args: &[&str]) -> std::process::Output {
    Command::new(vdrep_bin())
        .arg("forget")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `vdrep forget` on a terminal (`script` gives it a pty) answering `answer`.
fn forget_on_tty(args: &[&str], answer: &str) -> std::process::Output {
    use std::io::Write;
    let mut cmd = format!("{} forget", vdrep_bin().display());
    for a in args {
        cmd.push(' ');
        cmd.push_str(a);
    }
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Answer once the question is on the terminal (the pty echoes input).
    std::thread::sleep(Duration::from_millis(1500));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn forget_deletes_a_replica_after_confirmation_and_never_an_exposed_one() {
    require_fuse!();
    setup();
    let site = TwoSites::new();
    let s = |p: &str| site.s(p);
    for vm in ["vm1", "vm2"] {
        std::fs::File::create(site.p(&format!("vm/{vm}.img")))
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
    }
    let mut rx = site.receiver("127.0.0.1:0");
    let mut m = site.mount();
    for vm in ["vm1", "vm2"] {
        vdrep_ok(&[
            "protect",
            vm,
            "--to",
            &rx.addr,
            "--trust",
            &s("kb/site-b.crt"),
            "--every",
            "1h",
            &s(&format!("vm/{vm}.img")),
        ]);
    }
    vdrep_ok(&["sync", &s("vm"), "--timeout", "60"]);
    vdrep_ok(&["unprotect", "vm1"]);
    let vm1 = site.p("store/sites/site-a/vms/vm1");
    assert!(vm1.is_dir());

    // Not a terminal and no --yes: refused, nothing deleted.
    let o = forget(&["vm1", "--store", &s("store")]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--yes") && err.contains("site-a/vm1"), "{err}");
    assert!(vm1.is_dir());

    // A test failover exposes it: refused, nothing deleted.
    vdrep_ok(&["failover", "vm1", "--test", "--store", &s("store")]);
    let o = forget(&["vm1", "--store", &s("store"), "--yes"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("test failover"), "{err}");
    assert!(vm1.is_dir());
    vdrep_ok(&["failover", "vm1", "--cleanup", "--store", &s("store")]);

    // On a terminal it asks: a wrong answer deletes nothing, the VM's
    // name confirms (through the running receiver).
    let o = forget_on_tty(&["vm1", "--store", &s("store")], "yes\n");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(vm1.is_dir());
    let o = forget_on_tty(&["vm1", "--store", &s("store")], "vm1\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Type the VM name (vm1) to confirm"), "{out}");
    assert!(out.contains("site-a/vm1: forgotten (1 disk(s)"), "{out}");
    assert!(!vm1.exists());
    let o = vdrep(&["points", "vm1", "--store", &s("store")]);
    assert!(!o.status.success(), "vm1 still has points");
    // vm2 is untouched and still replicating.
    assert!(vdrep_ok(&["points", "vm2", "--store", &s("store")]).contains("crash"));

    // Offline (no receiver): the store is opened directly.
    m.umount();
    rx.kill9();
    let o = forget(&["vm2", "--store", &s("store"), "--yes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!site.p("store/sites/site-a/vms/vm2").exists());
    let o = forget(&["vm2", "--store", &s("store"), "--yes"]);
    assert!(!o.status.success(), "forgot an unknown VM");
}
