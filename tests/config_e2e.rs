//! The configuration file drives the daemons (issue 9, must-show 2): one
//! file per site, the primary's with a tracked folder and two protected
//! VMs, the secondary's with a receiver. `vdrep mount`, `vdrep receive`,
//! sync, points and a test failover run with no per-VM flag anywhere.
//! Real FUSE and QUIC on loopback; needs root and /dev/fuse.

mod mountutil;
mod skip;

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mountutil::*;

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["ka", "kb", "vm", "store"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let site = Site { _tmp: tmp, root };
        for (name, dir) in [("site-a", "ka"), ("site-b", "kb")] {
            vdrep_ok(&["keys", "init", "--name", name, "--out", &site.s(dir)]);
        }
        site
    }
    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }
    fn s(&self, s: &str) -> String {
        self.p(s).to_str().unwrap().to_string()
    }
    /// Write `text` as the file `name`; its path.
    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.p(name), text).unwrap();
        self.s(name)
    }
}

/// A port that was free a moment ago on 127.0.0.1 (UDP, as QUIC uses).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `vdrep --config FILE receive` (no other flag); killed on drop.
struct ConfigReceiver(std::process::Child);

impl ConfigReceiver {
    fn start(config: &str) -> (ConfigReceiver, String) {
        setup();
        let mut child = Command::new(vdrep_bin())
            .args(["--config", config, "receive"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vdrep receive");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"))
            .to_string();
        (ConfigReceiver(child), addr)
    }
}

impl Drop for ConfigReceiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn random(bytes: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; bytes];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = c.len();
        c.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    v
}

#[test]
fn config_files_drive_mount_protect_sync_points_and_test_failover() {
    require_fuse!();
    let site = Site::new();
    for (d, mib, seed) in [
        ("web.raw", 8, 1),
        ("db-os.raw", 4, 2),
        ("db-data.raw", 4, 3),
    ] {
        std::fs::write(site.p(&format!("vm/{d}")), random(mib << 20, seed)).unwrap();
    }
    let port = free_port();

    // The secondary site: its identity, the sender it trusts, its receiver.
    let dr = site.write(
        "dr.toml",
        &format!(
            "[site]\nname = \"site-b\"\nkeys = \"{kb}\"\ntrust = [\"{ka}/site-a.crt\"]\n\n\
             [receiver]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{store}\"\n\
             keep_all_for = \"2h\"\nkeep_for = \"forever\"\nprune_every = \"1min\"\n",
            kb = site.s("kb"),
            ka = site.s("ka"),
            store = site.s("store"),
        ),
    );
    vdrep_ok(&["--config", &dr, "config", "check"]);
    let (_rcv, addr) = ConfigReceiver::start(&dr);
    assert_eq!(addr, format!("127.0.0.1:{port}"));

    // The primary site: its identity, the receiver it trusts, the folder,
    // two VMs (one with two disks).
    let vm = site.s("vm");
    let primary = site.write(
        "primary.toml",
        &format!(
            "[site]\nname = \"site-a\"\nkeys = \"{ka}\"\ntrust = [\"{kb}/site-b.crt\"]\n\n\
             [[mount]]\npath = \"{vm}\"\n\n\
             [[vm]]\nname = \"web\"\ndisks = [\"{vm}/web.raw\"]\nto = \"{addr}\"\n\
             every = \"1h\"\nmax_rate = \"200MB/s\"\nrpo_alert = \"15min\"\n\n\
             [[vm]]\nname = \"db\"\ndisks = [\"{vm}/db-os.raw\", \"{vm}/db-data.raw\"]\n\
             to = \"{addr}\"\nevery = \"2h 30m\"\n",
            ka = site.s("ka"),
            kb = site.s("kb"),
        ),
    );
    let out = vdrep_ok(&["--config", &primary, "config", "check"]);
    assert!(
        out.contains("1 mount(s)") && out.contains("2 VM(s)"),
        "{out}"
    );

    // A bad file is refused with FILE:LINE: KEY and mounts nothing.
    let bad = site.write(
        "bad.toml",
        &std::fs::read_to_string(&primary)
            .unwrap()
            .replace("every = \"1h\"", "every = \"hourly\""),
    );
    let o = vdrep(&["--config", &bad, "mount", &vm]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = std::fs::read_to_string(&bad)
        .unwrap()
        .lines()
        .position(|l| l.contains("hourly"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{bad}:{line}: vm[web].every: ")),
        "{err}"
    );
    assert!(!is_mountpoint(&site.p("vm")));

    // `vdrep mount` with the file protects both VMs.
    let out = vdrep_ok(&["--config", &primary, "mount", &vm]);
    let mut m = Mounted {
        dir: site.p("vm"),
        mounted: true,
    };
    assert!(out.contains("web: protected"), "{out}");
    assert!(out.contains("db: protected"), "{out}");
    let st = m.status_json();
    let mut vms: Vec<(String, u64)> = st["replication"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["vm"].as_str().unwrap().to_string(),
                v["every_secs"].as_u64().unwrap(),
            )
        })
        .collect();
    vms.sort();
    assert_eq!(vms, vec![("db".into(), 9000), ("web".into(), 3600)]);

    // Writes through the mount, then a sync of the folder: both VMs get a
    // point with the writes.
    for (d, seed) in [("web.raw", 11), ("db-data.raw", 12)] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(site.p(&format!("vm/{d}")))
            .unwrap();
        f.write_all_at(&random(256 << 10, seed), 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let out = vdrep_ok(&["sync", &vm, "--timeout", "120"]);
    assert!(
        out.contains("web: recovery point") && out.contains("db: recovery point"),
        "{out}"
    );

    // Points at the receiver, and a test failover of each VM whose disks
    // equal the sources.
    for (name, disks) in [("web", vec!["web"]), ("db", vec!["db-os", "db-data"])] {
        let pts: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
            "points",
            name,
            "--store",
            &site.s("store"),
            "--json",
        ]))
        .unwrap();
        assert!(
            !pts["points"].as_array().unwrap().is_empty(),
            "{name}: {pts}"
        );
        let v: serde_json::Value = serde_json::from_str(&vdrep_ok(&[
            "failover",
            name,
            "--test",
            "--store",
            &site.s("store"),
            "--json",
        ]))
        .unwrap();
        let exposed: Vec<PathBuf> = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
            .collect();
        assert_eq!(exposed.len(), disks.len(), "{v}");
        for d in disks {
            let e = exposed
                .iter()
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(d))
                .unwrap_or_else(|| panic!("{d} not exposed: {exposed:?}"));
            same_disk(&site.p(&format!("vm/{d}.raw")), e);
        }
        vdrep_ok(&["failover", name, "--cleanup", "--store", &site.s("store")]);
    }
    m.umount();
}

/// The raw source equals the exposed fixed VHD.
fn same_disk(raw: &Path, vhd: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            raw.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
}
