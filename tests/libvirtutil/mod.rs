//! libvirt for tests. There is no systemd on these machines, so a test
//! starts the daemons itself (`virtlogd -d`, `libvirtd -d`) and stops them
//! when it is done.
//!
//! One daemon, the system one (`qemu:///system`), not a private instance:
//! libvirtd's socket folder can be moved, but the QEMU driver's state
//! folders (/run/libvirt/qemu, /var/lib/libvirt/qemu, /etc/libvirt/qemu)
//! cannot, so two instances on one machine would fight over them. Tests
//! that use libvirt therefore take an exclusive lock (any test binary, any
//! process) for their whole run, use names of their own (`vdrep-e2e-*`),
//! remove what a crashed earlier run left, and stop the daemons only if
//! they started them.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const LOCK: &str = "/tmp/vdrep-libvirt-tests.lock";

fn sbin(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running virsh {args:?}: {e}"))
}

/// `virsh ARGS`, which must succeed; its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let o = virsh(args);
    assert!(
        o.status.success(),
        "virsh {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn answers() -> bool {
    Command::new("virsh")
        .args(["-q", "-c", "qemu:///system", "version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn pid_of(pidfile: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .ok()
        .map(|()| pid)
}

/// Give /dev/kvm the group and mode Debian's udev rule gives it (`kvm`,
/// 0660) when no udev did (root:root 0600 here). Otherwise libvirt finds
/// KVM "not usable" for its QEMU user while its capability probe (run with
/// root's access) saw KVM, so it finds its cached capabilities outdated
/// on every lookup and probes QEMU again: each define and start cost
/// 60-85 s on a loaded host (kernel-notes/libvirt.md). The test domains
/// are TCG (`type='qemu'`) either way.
fn kvm_device_for_libvirt() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dev = Path::new("/dev/kvm");
    let Ok(m) = std::fs::metadata(dev) else {
        return;
    };
    if m.gid() != 0 || m.mode() & 0o777 != 0o600 {
        return;
    }
    let kvm = Command::new("getent").args(["group", "kvm"]).output();
    let Some(gid) = kvm.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse::<u32>().ok())
    }) else {
        return;
    };
    let _ = std::os::unix::fs::chown(dev, None, Some(gid));
    let _ = std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o660));
}

/// Make `/` a shared mount (recursively), as systemd does at boot, when it
/// is private (no systemd here). libvirt starts each QEMU in a mount
/// namespace of its own, a copy of the host's mounts made a slave of
/// them: with a private `/` no unmount reaches that copy, so a QEMU
/// started while a vdrep FUSE mount (a test view, another VM's live
/// folder) existed holds it, and that mount's daemon cannot end (its
/// unmount waits until the QEMU exits). Seen in part 9 of libvirt_e2e: a
/// group's failback hung on the folder the first member's QEMU held
/// (kernel-notes/libvirt.md).
fn shared_root_for_libvirt() {
    let shared = std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|mi| {
        mi.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&"/")
                && f.iter()
                    .skip(6)
                    .take_while(|x| **x != "-")
                    .any(|x| x.starts_with("shared:"))
        })
    });
    if !shared {
        let _ = Command::new("mount").args(["--make-rshared", "/"]).output();
    }
}

/// The libvirt daemons, held for one test.
pub struct Libvirt {
    _lock: nix::fcntl::Flock<File>,
    /// Pids of the daemons this test started (stopped on drop).
    started: Vec<i32>,
}

impl Libvirt {
    /// Take the lock and make sure the daemons run; the reason if libvirt
    /// cannot run here.
    pub fn start() -> Result<Libvirt, String> {
        let (Some(libvirtd), Some(virtlogd)) = (sbin("libvirtd"), sbin("virtlogd")) else {
            return Err(
                "libvirtd/virtlogd not installed (scripts/lib.sh vdrep_install_prereqs installs libvirt)".into(),
            );
        };
        if sbin("virsh").is_none() {
            return Err("virsh not installed (apt-get install libvirt-clients)".into());
        }
        if !nix::unistd::geteuid().is_root() {
            return Err("not root (the system libvirtd needs root)".into());
        }
        kvm_device_for_libvirt();
        shared_root_for_libvirt();
        let file = File::create(LOCK).map_err(|e| format!("{LOCK}: {e}"))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking {LOCK}: {e}"))?;
        let mut lv = Libvirt {
            _lock: lock,
            started: Vec::new(),
        };
        if answers() {
            return Ok(lv);
        }
        for (bin, pidfile) in [
            (&virtlogd, "/run/virtlogd.pid"),
            (&libvirtd, "/run/libvirtd.pid"),
        ] {
            if pid_of(pidfile).is_some() {
                continue;
            }
            let o = Command::new(bin)
                .arg("-d")
                .output()
                .map_err(|e| format!("{}: {e}", bin.display()))?;
            if !o.status.success() {
                return Err(format!(
                    "{} -d failed: {}",
                    bin.display(),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            let t0 = Instant::now();
            loop {
                if let Some(pid) = pid_of(pidfile) {
                    lv.started.push(pid);
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    return Err(format!("{} -d wrote no {pidfile}", bin.display()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let t0 = Instant::now();
        while !answers() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err("libvirtd started but does not answer".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(lv)
    }

    /// Destroy and undefine domain `name` if it exists.
    pub fn remove_domain(&self, name: &str) {
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name]);
    }

    /// Stop and undefine network `name` if it exists.
    pub fn remove_network(&self, name: &str) {
        let _ = virsh(&["net-destroy", name]);
        let _ = virsh(&["net-undefine", name]);
    }

    /// Define and start an isolated network `name` (no forwarding).
    pub fn isolated_network(&self, name: &str) {
        self.remove_network(name);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("net.xml");
        std::fs::write(
            &f,
            format!("<network><name>{name}</name><bridge stp='off' delay='0'/></network>"),
        )
        .unwrap();
        virsh_ok(&["net-define", f.to_str().unwrap()]);
        virsh_ok(&["net-start", name]);
    }

    pub fn domain_exists(&self, name: &str) -> bool {
        virsh_ok(&["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == name)
    }

    pub fn network_exists(&self, name: &str) -> bool {
        virsh_ok(&["net-list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == name)
    }

    pub fn running(&self, name: &str) -> bool {
        virsh_ok(&["list", "--name"])
            .lines()
            .any(|l| l.trim() == name)
    }

    /// Wait until domain `name` stops (the guest powered off).
    pub fn wait_stopped(&self, name: &str, timeout: Duration) {
        let t0 = Instant::now();
        while self.running(name) {
            assert!(
                t0.elapsed() < timeout,
                "domain {name} still runs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The networks (or bridges) of domain `name`'s NICs and their MACs.
    pub fn nics(&self, name: &str) -> Vec<(String, String)> {
        virsh_ok(&["domiflist", name, "--inactive"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5).then(|| (f[2].to_string(), f[4].to_string()))
            })
            .collect()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // libvirtd first (it talks to virtlogd), newest first.
        for pid in self.started.iter().rev() {
            let p = nix::unistd::Pid::from_raw(*pid);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
            let t0 = Instant::now();
            while nix::sys::signal::kill(p, None).is_ok() && t0.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A TCG domain that boots the tiny test VM's kernel and initramfs
/// directly, console on a serial log file, with `disks` (file, format,
/// target dev), one NIC on `network` and the guest agent channel; a fixed
/// `uuid`, so defining it again changes it in place. ACPI, so
/// the guest's `poweroff -f` ends the domain.
pub fn domain_xml(
    (name, uuid): (&str, &str),
    vm_dir: &Path,
    cmdline: &str,
    disks: &[(&Path, &str, &str)],
    network: &str,
    console: &Path,
) -> String {
    let mut d = String::new();
    for (file, fmt, dev) in disks {
        d.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{}'/><target dev='{dev}' bus='virtio'/></disk>\n",
            file.display()
        ));
    }
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>
  <cmdline>{cmdline}</cmdline></os><features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>{d}<interface type='network'><source network='{network}'/><model type='virtio'/></interface>
    <serial type='file'><source path='{c}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/></devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>",
        k = vm_dir.join("vmlinuz").display(),
        i = vm_dir.join("initramfs.cpio.gz").display(),
        c = console.display(),
    )
}

/// Define a domain from `xml`.
pub fn define(xml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    virsh_ok(&["define", f.to_str().unwrap()]);
}
