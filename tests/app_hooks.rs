//! The shipped application-consistency hooks (`scripts/app-hook-qga.sh`,
//! `scripts/app-hook-virsh.sh`) refuse a freeze that froze no file system,
//! so vdrep does not record a point with nothing quiesced as
//! app-consistent. The real guest agent path (a frozen ext4 in a TCG guest)
//! is `failover_test::app_points_with_a_real_guest_agent_hold_a_frozen_file_system`;
//! here the agent and `virsh` are stand-ins that answer with a chosen count,
//! because a guest whose agent freezes nothing costs a VM boot.

mod skip;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A guest agent on a unix socket: answers `guest-sync` with its id and
/// the freeze/thaw commands with `count` (the number of file systems).
const AGENT_PY: &str = r#"
import json, os, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb", buffering=0)
    for line in f:
        req = json.loads(line)
        if req["execute"] == "guest-sync":
            r = {"return": req["arguments"]["id"]}
        else:
            r = {"return": count}
        f.write(json.dumps(r).encode() + b"\n")
    c.close()
"#;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(sock: &Path, count: u32) -> Agent {
    use std::io::BufRead;
    let mut c = Command::new("python3")
        .args(["-c", AGENT_PY, sock.to_str().unwrap(), &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stand-in agent");
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Agent(c)
}

fn qga(sock: &Path, phase: &str) -> Output {
    Command::new(repo().join("scripts/app-hook-qga.sh"))
        .args([phase, "vm1"])
        .env("VDREP_QGA_SOCKET", sock)
        .output()
        .unwrap()
}

#[test]
fn qga_hook_refuses_a_freeze_that_froze_nothing() {
    if !have("python3") {
        skip::skip("SKIP: python3 is not installed (the hook needs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("two.sock");
    let _a = agent(&sock, 2);
    let o = qga(&sock, "freeze");
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("guest-fsfreeze-freeze: 2"));
    assert!(qga(&sock, "thaw").status.success());

    let sock = tmp.path().join("none.sock");
    let _a = agent(&sock, 0);
    let o = qga(&sock, "freeze");
    assert!(!o.status.success(), "a freeze of 0 file systems passed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("froze no file system"), "{err}");
    // Thawing nothing is fine (vdrep thaws whenever it started a freeze).
    assert!(qga(&sock, "thaw").status.success());
}

#[test]
fn virsh_hook_refuses_a_freeze_that_froze_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // virsh's own wording: "Froze %d filesystem(s)", "Thawed %d ...".
    let fake = bin.join("virsh");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \"$1\" in\n domfsfreeze) echo \"Froze $FROZE filesystem(s)\" ;;\n domfsthaw) echo \"Thawed $FROZE filesystem(s)\" ;;\n *) exit 9 ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |phase: &str, froze: &str| {
        Command::new(repo().join("scripts/app-hook-virsh.sh"))
            .args([phase, "web1"])
            .env("PATH", &path)
            .env("FROZE", froze)
            .output()
            .unwrap()
    };
    let o = run("freeze", "3");
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("Froze 3"));
    let o = run("freeze", "0");
    assert!(!o.status.success(), "a freeze of 0 file systems passed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("froze no file system") && err.contains("web1"),
        "{err}"
    );
    // "Froze 10" is not "Froze 0".
    assert!(run("freeze", "10").status.success());
    assert!(run("thaw", "0").status.success());
}
