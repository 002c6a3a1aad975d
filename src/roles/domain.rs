//! A libvirt domain at the site a VM's disks go live: its definition
//! rewritten onto the live files (the same VM: same UUID and MACs), NICs
//! remapped by a network map, checked before anything changes, then
//! defined and started. Used by an unplanned failover (at the replica
//! site, [`crate::failover::domain`]) and by the site that takes over in a
//! planned failover ([`super::promote_local`], asked for with
//! [`DomainStart`]). Also the planned failover's stop of the domain at the
//! site it leaves ([`stop`]: ACPI shutdown, a timeout, then destroy).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{RoleError, RoleResult};
use crate::libvirt::{virsh, Definition, DiskFormat, DiskMove, NetTarget, NicPlan, Rewrite, Virsh};
use crate::replica::{LiveInfo, ReplicaFormat};
use crate::util::steps::Steps;

/// Start the VM's domain where its disks go live ([`super::AdminRequest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStart {
    /// The domain's name.
    pub name: String,
    /// A NIC on the network or bridge named by a key moves to the value's.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
}

/// The format a disk has in a copy: a raw source exposed as a fixed VHD
/// is `vpc`; otherwise the format the domain uses (raw if unnamed).
pub fn copy_format(declared: Option<&str>, replica: ReplicaFormat) -> RoleResult<DiskFormat> {
    if replica == ReplicaFormat::VhdOfRaw {
        return Ok(DiskFormat::Vpc);
    }
    match declared {
        None => Ok(DiskFormat::Raw),
        Some(f) => DiskFormat::parse(f).ok_or_else(|| {
            RoleError::Refused(format!(
                "disk format {f:?} is not one vdrep replicates (raw, qcow2, vpc, vhdx)"
            ))
        }),
    }
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Each replicated disk of `def` -> the file of the same name in `files`
/// (`name_of` maps a source file name to the name it has there).
pub fn disk_moves(
    def: &Definition,
    files: &[(String, PathBuf)],
    name_of: &dyn Fn(&str) -> (String, ReplicaFormat),
) -> RoleResult<HashMap<PathBuf, DiskMove>> {
    let mut m = HashMap::new();
    for d in def.replicated_disks() {
        let Some(src) = d.file.clone() else { continue };
        let (want, rf) = name_of(&file_name(&src));
        let found: Vec<&PathBuf> = files
            .iter()
            .filter(|(n, _)| *n == want)
            .map(|(_, p)| p)
            .collect();
        let file = match found.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(RoleError::Refused(format!(
                    "disk {} of domain {} ({}) has no replica in this recovery point: protect the domain again (`vdrep protect --domain {}`) so every disk replicates",
                    d.target,
                    def.name,
                    src.display(),
                    def.name
                )))
            }
            _ => {
                return Err(RoleError::Refused(format!(
                    "disk {} of domain {}: several replicated disks are named {want}",
                    d.target, def.name
                )))
            }
        };
        let format = copy_format(d.format.as_deref(), rf)?;
        m.insert(src, DiskMove { file, format });
    }
    Ok(m)
}

/// Where a network name leads here: a libvirt network, else a host bridge.
fn net_target(networks: &[String], name: &str) -> Option<NetTarget> {
    if networks.iter().any(|n| n == name) {
        Some(NetTarget::Network(name.to_string()))
    } else if virsh::host_bridge_exists(name) {
        Some(NetTarget::Bridge(name.to_string()))
    } else {
        None
    }
}

/// The NIC plan of `def` at this site under `map`: every NIC must land on
/// a network or bridge that exists here (refused, naming it, otherwise).
pub fn plan_nics<'a>(
    virsh: &Virsh,
    def: &Definition,
    map: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> RoleResult<NicPlan> {
    plan_nics_in(&virsh.networks(false)?, def, map)
}

/// [`plan_nics`] on a listing of this site's libvirt networks.
fn plan_nics_in<'a>(
    networks: &[String],
    def: &Definition,
    map: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> RoleResult<NicPlan> {
    let mut plan = HashMap::new();
    for (from, to) in map {
        let t = net_target(networks, to).ok_or_else(|| {
            RoleError::Refused(format!(
                "--network-map {from}={to}: there is no libvirt network or host bridge named {to:?} here (see `virsh net-list --all`)"
            ))
        })?;
        plan.insert(from.clone(), t);
    }
    for nic in &def.nics {
        let Some(src) = nic.source.as_deref() else {
            continue;
        };
        if !matches!(nic.kind.as_str(), "network" | "bridge") || plan.contains_key(src) {
            continue;
        }
        let here = match nic.kind.as_str() {
            "network" => networks.iter().any(|n| n == src),
            _ => virsh::host_bridge_exists(src),
        };
        if !here {
            return Err(RoleError::Refused(format!(
                "a NIC of {} is on the {} {src:?}, which does not exist here: map it with --network-map {src}=NETWORK",
                def.name, nic.kind
            )));
        }
    }
    Ok(NicPlan::Map(plan))
}

/// Everything that can refuse starting `def` here, checked before
/// anything changes: the domain must not run here, and every NIC must
/// land on a network that exists. The NIC plan. (The two listings run at
/// once: each is a virsh process and a connection.)
pub fn check_start<'a>(
    virsh: &Virsh,
    def: &Definition,
    map: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> RoleResult<NicPlan> {
    let (running, networks) = std::thread::scope(|sc| {
        let nets = sc.spawn(|| virsh.networks(false));
        (virsh.domains(true), nets.join())
    });
    if running?.contains(&def.name) {
        return Err(RoleError::Refused(format!(
            "domain {} is running at this site: it cannot be started here twice",
            def.name
        )));
    }
    let networks = networks.unwrap_or_else(|_| {
        Err(crate::libvirt::LibvirtError::Failed(
            "listing the libvirt networks panicked".into(),
        ))
    })?;
    plan_nics_in(&networks, def, map)
}

/// Define `def` on the live disks `live` (same UUID and MACs, NICs as
/// `nics` says) and start it; its name. `steps` notes `define` and `start`.
pub fn start_on_live(
    virsh: &Virsh,
    def: &Definition,
    live: &LiveInfo,
    nics: NicPlan,
    steps: &mut Steps,
) -> RoleResult<String> {
    let files: Vec<(String, PathBuf)> = live
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.path.clone()))
        .collect();
    let disks = disk_moves(def, &files, &|n| (n.to_string(), ReplicaFormat::Raw))?;
    let rw = Rewrite {
        name: None,
        new_identity: false,
        disks,
        nics,
        console_log: None,
        metadata: vec![],
    };
    virsh.define(&rw.apply(def)?)?;
    steps.done("define");
    virsh.start(&def.name)?;
    steps.done("start");
    Ok(def.name.clone())
}

/// How [`stop`] ended a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// It was not running.
    NotRunning,
    /// The guest shut down after the ACPI request, in this time.
    Clean(Duration),
    /// It did not within the timeout and was destroyed (powered off).
    Destroyed,
}

/// Stop domain `name` for a planned failover: an ACPI shutdown request
/// (libvirt's default: the guest agent if one answers, else the power
/// button), up to `timeout` for the guest to power off, then destroy.
pub fn stop(virsh: &Virsh, name: &str, timeout: Duration) -> RoleResult<Stopped> {
    if !virsh.domain_running(name)? {
        return Ok(Stopped::NotRunning);
    }
    let t0 = Instant::now();
    // A guest that stopped meanwhile makes the request fail: decided on
    // the listing below, not on the error.
    let asked = virsh.shutdown(name);
    while t0.elapsed() < timeout {
        if !virsh.domain_running(name)? {
            return Ok(Stopped::Clean(t0.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !virsh.domain_running(name)? {
        return Ok(Stopped::Clean(t0.elapsed()));
    }
    if let Err(e) = asked {
        tracing::warn!(domain = name, "the shutdown request failed: {e}");
    }
    virsh.destroy(name)?;
    Ok(Stopped::Destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::RoleErrorKind;

    #[test]
    fn a_raw_source_exposed_as_vhd_is_vpc_and_others_keep_their_format() {
        let f = |d: Option<&str>, r| copy_format(d, r).map_err(|e| e.kind());
        assert_eq!(f(Some("raw"), ReplicaFormat::VhdOfRaw), Ok(DiskFormat::Vpc));
        assert_eq!(f(None, ReplicaFormat::VhdOfRaw), Ok(DiskFormat::Vpc));
        assert_eq!(f(Some("qcow2"), ReplicaFormat::Raw), Ok(DiskFormat::Qcow2));
        assert_eq!(f(Some("vpc"), ReplicaFormat::Raw), Ok(DiskFormat::Vpc));
        assert_eq!(f(None, ReplicaFormat::Raw), Ok(DiskFormat::Raw));
        assert_eq!(
            f(Some("vmdk"), ReplicaFormat::Raw),
            Err(RoleErrorKind::Refused)
        );
    }

    #[test]
    fn disks_are_matched_by_file_name_and_a_missing_one_is_refused() {
        let xml = "<domain><name>w</name><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a/os.qcow2'/><target dev='vda'/></disk>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/a/data.img'/><target dev='vdb'/></disk>\
            </devices></domain>";
        let def = Definition::parse(xml).unwrap();
        let view = |n: &str| {
            let (f, name) = ReplicaFormat::for_source(n);
            (name, f)
        };
        let files = vec![
            ("os.qcow2".to_string(), PathBuf::from("/v/os.qcow2")),
            ("data.vhd".to_string(), PathBuf::from("/v/data.vhd")),
        ];
        let m = disk_moves(&def, &files, &view).unwrap();
        assert_eq!(m[Path::new("/a/os.qcow2")].file, Path::new("/v/os.qcow2"));
        assert_eq!(m[Path::new("/a/os.qcow2")].format, DiskFormat::Qcow2);
        assert_eq!(m[Path::new("/a/data.img")].file, Path::new("/v/data.vhd"));
        assert_eq!(m[Path::new("/a/data.img")].format, DiskFormat::Vpc);
        let e = disk_moves(&def, &files[..1], &view).unwrap_err();
        assert_eq!(e.kind(), RoleErrorKind::Refused);
        assert!(e.to_string().contains("vdb"), "{e}");
    }

    #[test]
    fn a_domain_start_request_without_a_map_decodes() {
        let d: DomainStart = serde_json::from_str(r#"{"name":"web1"}"#).unwrap();
        assert_eq!(d.name, "web1");
        assert!(d.network_map.is_empty());
    }
}
