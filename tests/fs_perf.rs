//! Quick fio comparison of the passthrough mount against the native folder.
//! Ignored by default: `cargo test --release --test fs_perf -- --ignored --nocapture`.
//! Prints `ratio = fuse / native` per job; needs root, /dev/fuse and fio.

use std::path::Path;
use std::process::Command;

use vdrep::fs::{mount_untracked, FsOptions};

struct Job {
    name: &'static str,
    args: &'static [&'static str],
    read: bool,
}

const JOBS: &[Job] = &[
    Job {
        name: "seq-write-1M",
        args: &[
            "--rw=write",
            "--bs=1M",
            "--size=768M",
            "--ioengine=psync",
            "--end_fsync=1",
        ],
        read: false,
    },
    Job {
        name: "rand-write-4k",
        args: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=256M",
            "--ioengine=psync",
            "--time_based",
            "--runtime=8",
            "--end_fsync=1",
        ],
        read: false,
    },
    Job {
        name: "rand-read-4k-direct-qd16",
        args: &[
            "--rw=randread",
            "--bs=4k",
            "--size=256M",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--time_based",
            "--runtime=8",
        ],
        read: true,
    },
    Job {
        name: "rand-write-4k-direct-qd16",
        args: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=256M",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--time_based",
            "--runtime=8",
        ],
        read: false,
    },
];

fn fio(dir: &Path, job: &Job) -> f64 {
    let out = Command::new("fio")
        .arg(format!("--name={}", job.name))
        .arg(format!("--directory={}", dir.display()))
        .arg("--filename=fio.dat")
        .arg("--output-format=json")
        .args(job.args)
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let side = if job.read { "read" } else { "write" };
    v["jobs"][0][side]["bw"].as_f64().unwrap_or(0.0) // KiB/s
}

#[test]
#[ignore]
fn fio_fuse_vs_native() {
    // SAFETY: trivial libc call.
    if !Path::new("/dev/fuse").exists() || unsafe { libc::geteuid() } != 0 {
        println!("SKIP: needs root and /dev/fuse");
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        println!("SKIP: fio not installed");
        return;
    }
    let native = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mounted = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mut opts = FsOptions::default();
    if std::env::var("NO_WB").is_ok() {
        opts.writeback_cache = false;
    }
    if let Ok(n) = std::env::var("THREADS") {
        opts.n_threads = n.parse().unwrap_or(4);
    }
    let sess = mount_untracked(mounted.path(), &opts)
        .expect("mount")
        .spawn()
        .expect("spawn");
    if let Ok(t) = std::env::var("BDI") {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let want = mounted.path().to_string_lossy().to_string();
        for l in mi.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f[4] == want {
                let b = format!("/sys/class/bdi/{}", f[2]);
                println!("bdi {b}: {:?}", std::fs::read_dir(&b).map(|d| d.count()));
                let _ = std::fs::write(format!("{b}/strict_limit"), "0");
                let _ = std::fs::write(format!("{b}/max_ratio"), &t);
                println!(
                    "strict_limit={:?} max_ratio={:?}",
                    std::fs::read_to_string(format!("{b}/strict_limit")),
                    std::fs::read_to_string(format!("{b}/max_ratio"))
                );
            }
        }
    }
    for job in JOBS {
        if std::env::var("FIO_JOB").is_ok_and(|j| !job.name.contains(&j)) {
            continue;
        }
        let n = fio(native.path(), job);
        let f = fio(mounted.path(), job);
        println!(
            "{:<28} native {:>9.1} MiB/s  fuse {:>9.1} MiB/s  ratio {:.2}",
            job.name,
            n / 1024.0,
            f / 1024.0,
            f / n.max(1.0)
        );
        let _ = std::fs::remove_file(native.path().join("fio.dat"));
        let _ = std::fs::remove_file(mounted.path().join("fio.dat"));
    }
    sess.umount_and_join().expect("unmount");
}

/// Keep a mount over `$VDREP_DIR` for `$VDREP_SECS` seconds (manual
/// experiments: run fio/perf against it from another shell).
#[test]
#[ignore]
fn hold_mount() {
    let Ok(dir) = std::env::var("VDREP_DIR") else {
        println!("SKIP: VDREP_DIR not set");
        return;
    };
    let secs: u64 = std::env::var("VDREP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut opts = FsOptions::default();
    if std::env::var("NO_WB").is_ok() {
        opts.writeback_cache = false;
    }
    if let Ok(n) = std::env::var("THREADS") {
        opts.n_threads = n.parse().unwrap_or(4);
    }
    let sess = mount_untracked(Path::new(&dir), &opts)
        .expect("mount")
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_secs(secs));
    sess.umount_and_join().expect("unmount");
}
