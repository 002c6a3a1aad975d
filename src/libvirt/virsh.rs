//! The libvirt daemon through the `virsh` client: one process per call,
//! connected to `VDREP_LIBVIRT_URI` (default `qemu:///system`). Decisions
//! (does a domain exist, is it running) are made on listings, never on the
//! text of an error.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::LibvirtError;

/// The connection URI used when `VDREP_LIBVIRT_URI` is not set.
pub const DEFAULT_URI: &str = "qemu:///system";

/// A connection to one libvirt daemon.
#[derive(Debug, Clone)]
pub struct Virsh {
    pub uri: String,
}

impl Default for Virsh {
    fn default() -> Self {
        Virsh::new()
    }
}

impl Virsh {
    /// The daemon of `VDREP_LIBVIRT_URI`, else `qemu:///system`.
    pub fn new() -> Virsh {
        Virsh {
            uri: std::env::var("VDREP_LIBVIRT_URI").unwrap_or_else(|_| DEFAULT_URI.into()),
        }
    }

    /// `virsh -c URI ARGS...` with `stdin` fed in; its standard output.
    fn run_in(&self, args: &[&str], stdin: Option<&str>) -> Result<String, LibvirtError> {
        let mut c = Command::new("virsh");
        c.arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| {
            LibvirtError::Unavailable(format!("cannot run virsh: {e} (install libvirt-clients)"))
        })?;
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(data.as_bytes())
                .map_err(|e| LibvirtError::Failed(format!("feeding virsh: {e}")))?;
        }
        let o = child
            .wait_with_output()
            .map_err(|e| LibvirtError::Failed(format!("waiting for virsh: {e}")))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            Err(LibvirtError::Failed(format!(
                "virsh {}: {}",
                args.first().copied().unwrap_or(""),
                err.trim().trim_start_matches("error: ")
            )))
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, LibvirtError> {
        self.run_in(args, None)
    }

    /// Whether the daemon answers; the reason if not.
    pub fn check(&self) -> Result<(), LibvirtError> {
        self.run(&["version"]).map(|_| ()).map_err(|e| match e {
            LibvirtError::Failed(m) => LibvirtError::Unavailable(format!(
                "{m} (is libvirtd running? connection {})",
                self.uri
            )),
            e => e,
        })
    }

    fn names(out: &str) -> Vec<String> {
        out.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The names a listing prints. Only if it fails is the daemon asked
    /// whether it answers at all ([`Self::check`]: then the error is
    /// [`LibvirtError::Unavailable`]): one virsh process per listing, not
    /// two (each costs 30-100 ms on a busy host, and a failover lists
    /// several times before its domain starts).
    fn list(&self, args: &[&str]) -> Result<Vec<String>, LibvirtError> {
        match self.run(args) {
            Ok(out) => Ok(Self::names(&out)),
            Err(e) => {
                self.check()?;
                Err(e)
            }
        }
    }

    /// Names of the domains: all defined ones, or only the running ones.
    pub fn domains(&self, running_only: bool) -> Result<Vec<String>, LibvirtError> {
        self.list(if running_only {
            &["list", "--name"]
        } else {
            &["list", "--all", "--name"]
        })
    }

    /// Whether a domain `name` is defined (running or not).
    pub fn domain_exists(&self, name: &str) -> Result<bool, LibvirtError> {
        Ok(self.domains(false)?.iter().any(|d| d == name))
    }

    /// Whether domain `name` runs.
    pub fn domain_running(&self, name: &str) -> Result<bool, LibvirtError> {
        Ok(self.domains(true)?.iter().any(|d| d == name))
    }

    /// The persistent definition of domain `name` (`dumpxml --inactive`).
    pub fn dumpxml(&self, name: &str) -> Result<String, LibvirtError> {
        if !self.domain_exists(name)? {
            return Err(LibvirtError::NoDomain(format!(
                "no libvirt domain named {name:?} (connection {}; see `virsh list --all`)",
                self.uri
            )));
        }
        self.run(&["dumpxml", "--inactive", name])
    }

    /// Define (or redefine) a domain from `xml`.
    pub fn define(&self, xml: &str) -> Result<(), LibvirtError> {
        self.run_in(&["define", "/dev/stdin"], Some(xml))
            .map(|_| ())
    }

    pub fn start(&self, name: &str) -> Result<(), LibvirtError> {
        self.run(&["start", name]).map(|_| ())
    }

    /// Whether domain `name`'s guest agent answers `guest-ping` (through
    /// `virsh qemu-agent-command`, waiting at most `secs` seconds). Any
    /// failure is "no answer": a guest still booting, no agent channel, a
    /// stopped domain; the caller decides with [`Self::domain_running`].
    pub fn agent_ping(&self, name: &str, secs: u32) -> bool {
        self.run(&[
            "qemu-agent-command",
            name,
            r#"{"execute":"guest-ping"}"#,
            "--timeout",
            &secs.max(1).to_string(),
        ])
        .is_ok()
    }

    /// Ask domain `name` to shut down (libvirt's default mode: the guest
    /// agent if it answers, else ACPI); returns at once.
    pub fn shutdown(&self, name: &str) -> Result<(), LibvirtError> {
        self.run(&["shutdown", name]).map(|_| ())
    }

    /// Stop domain `name` at once (power off), if it runs.
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        if self.domain_running(name)? {
            self.run(&["destroy", name])?;
        }
        Ok(())
    }

    /// Remove the definition of domain `name` (stopped first), if defined.
    pub fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        if !self.domain_exists(name)? {
            return Ok(());
        }
        self.destroy(name)?;
        self.run(&["undefine", name]).map(|_| ())
    }

    /// Names of the networks (all, or the active ones).
    pub fn networks(&self, active_only: bool) -> Result<Vec<String>, LibvirtError> {
        self.list(if active_only {
            &["net-list", "--name"]
        } else {
            &["net-list", "--all", "--name"]
        })
    }

    /// Whether network `name` forwards traffic out of the host.
    pub fn network_forwards(&self, name: &str) -> Result<bool, LibvirtError> {
        let xml = self.run(&["net-dumpxml", name])?;
        super::definition::has_element(&xml, "forward")
    }

    /// Make sure an isolated network `name` (a bridge with no forwarding and
    /// no addresses) exists and is active; `exists`: a listing just made
    /// showed it defined (the caller lists it beside other checks). True
    /// if it was created here; refused if a network of that name forwards
    /// traffic.
    pub fn ensure_isolated_network(&self, name: &str, exists: bool) -> Result<bool, LibvirtError> {
        let created = if exists {
            if self.network_forwards(name)? {
                return Err(LibvirtError::Refused(format!(
                    "the libvirt network {name:?} forwards traffic: a test failover needs an isolated one; name another with --test-network"
                )));
            }
            false
        } else {
            let xml = format!(
                "<network><name>{}</name><bridge stp='off' delay='0'/></network>",
                quick_xml::escape::escape(name)
            );
            self.run_in(&["net-define", "/dev/stdin"], Some(&xml))?;
            true
        };
        // A network defined just now is inactive: no need to list again.
        if created || !self.networks(true)?.iter().any(|n| n == name) {
            self.run(&["net-start", name])?;
        }
        Ok(created)
    }

    /// How many NICs are attached to network `name`.
    pub fn network_ports(&self, name: &str) -> Result<usize, LibvirtError> {
        Ok(Self::names(&self.run(&["net-port-list", name, "--uuid"])?).len())
    }

    /// Stop and remove network `name`, if it exists.
    pub fn remove_network(&self, name: &str) -> Result<(), LibvirtError> {
        if self.networks(true)?.iter().any(|n| n == name) {
            self.run(&["net-destroy", name])?;
        }
        if self.networks(false)?.iter().any(|n| n == name) {
            self.run(&["net-undefine", name])?;
        }
        Ok(())
    }
}

/// Whether `bridge` is a bridge device of this host.
pub fn host_bridge_exists(bridge: &str) -> bool {
    !bridge.contains('/')
        && Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .is_dir()
}
