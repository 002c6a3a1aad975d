//! Failover of a libvirt domain: the VM, not only its disks.
//!
//! - a **test failover** defines `NAME-test` (new UUID, new MAC addresses)
//!   on the exposed point's files, every NIC on an isolated libvirt network
//!   (created if missing: a bridge with no forwarding and no addresses), and
//!   starts it; cleanup destroys and undefines it (and the network, if this
//!   made it and nothing else is attached) before the view goes;
//! - an **unplanned failover** defines the domain itself (same UUID and
//!   MACs) on the live disks, NICs remapped by a network map, and starts it.
//!
//! The definition is, by default, the one replicated with the chosen
//! recovery point (the configuration the VM had at that cut); a file or the
//! local libvirt's definition of the domain override it, and the local one
//! is the fallback for a point that has none. Every check that can refuse
//! runs before anything changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::test as testfo;
use super::{role_change, FailoverError};
use crate::libvirt::{virsh, Definition, DiskFormat, DiskMove, NetTarget, NicPlan, Rewrite, Virsh};
use crate::replica::{LiveInfo, ReplicaFormat};
use crate::testview::{PointSel, ViewInfo};

type Result<T> = std::result::Result<T, FailoverError>;

/// The default isolated network of test failovers.
pub const TEST_NETWORK: &str = "vdrep-isolated";

/// Where a failover reads the domain's definition.
#[derive(Debug, Clone)]
pub enum DefinitionFrom {
    /// The definition replicated with the chosen point; for a point without
    /// one, the local libvirt's definition of this domain.
    Point(String),
    /// The local libvirt's definition of this domain.
    Libvirt(String),
    /// A definition file (the XML of `virsh dumpxml`).
    File(PathBuf),
}

/// Read the definition for a failover of `vm` to point `sel`; with
/// [`DefinitionFrom::Point`] the point is resolved here, and the returned
/// selection names it by cycle so that the failover uses that very point.
pub fn load_for(
    virsh: &Virsh,
    from: &DefinitionFrom,
    store: &Path,
    site: Option<String>,
    vm: &str,
    sel: PointSel,
) -> Result<(Definition, PointSel)> {
    let DefinitionFrom::Point(domain) = from else {
        return Ok((load(virsh, from)?, sel));
    };
    let (_, mut pts) = testfo::points(store, site, vm)?;
    pts.sort_by_key(|p| p.point.cycle);
    let pick = match sel {
        PointSel::Latest => pts.last(),
        PointSel::Cycle { cycle } => pts.iter().find(|p| p.point.cycle == cycle),
        PointSel::Time { unix_ns } => pts.iter().rev().find(|p| p.point.time_unix_ns <= unix_ns),
    };
    match pick {
        Some(p) => {
            let cycle = PointSel::Cycle {
                cycle: p.point.cycle,
            };
            match &p.definition {
                Some(x) => Ok((Definition::parse(x)?, cycle)),
                None => Ok((
                    load(virsh, &DefinitionFrom::Libvirt(domain.clone()))?,
                    cycle,
                )),
            }
        }
        // No such point: the failover itself says so.
        None => Ok((load(virsh, &DefinitionFrom::Libvirt(domain.clone()))?, sel)),
    }
}

/// Read the definition.
pub fn load(virsh: &Virsh, from: &DefinitionFrom) -> Result<Definition> {
    let xml = match from {
        DefinitionFrom::Point(d) | DefinitionFrom::Libvirt(d) => virsh.dumpxml(d)?,
        DefinitionFrom::File(p) => std::fs::read_to_string(p).map_err(|e| {
            FailoverError::Invalid(format!("reading the definition {}: {e}", p.display()))
        })?,
    };
    Ok(Definition::parse(&xml)?)
}

/// The name of the test copy of domain `domain`.
pub fn test_name(domain: &str) -> String {
    format!("{domain}-test")
}

/// A test failover's running domain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestDomain {
    /// The copy's name (`NAME-test`).
    pub domain: String,
    /// Its serial console log.
    pub console_log: PathBuf,
    /// The isolated network its NICs are on.
    pub network: String,
    /// The network was created for it.
    pub network_created: bool,
}

/// The format a disk has in the copy: a raw source exposed as a fixed
/// VHD is `vpc`; otherwise the format the domain uses (raw if unnamed).
fn copy_format(declared: Option<&str>, replica: ReplicaFormat) -> Result<DiskFormat> {
    if replica == ReplicaFormat::VhdOfRaw {
        return Ok(DiskFormat::Vpc);
    }
    match declared {
        None => Ok(DiskFormat::Raw),
        Some(f) => DiskFormat::parse(f).ok_or_else(|| {
            FailoverError::Refused(format!(
                "disk format {f:?} is not one vdrep replicates (raw, qcow2, vpc, vhdx)"
            ))
        }),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Each replicated disk of `def` -> the file of the same name in `files`
/// (`name_of` maps a source file name to the name it has there).
fn disk_moves(
    def: &Definition,
    files: &[(String, PathBuf)],
    name_of: &dyn Fn(&str) -> (String, ReplicaFormat),
) -> Result<HashMap<PathBuf, DiskMove>> {
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
                return Err(FailoverError::Refused(format!(
                    "disk {} of domain {} ({}) has no replica in this recovery point: protect the domain again (`vdrep protect --domain {}`) so every disk replicates",
                    d.target,
                    def.name,
                    src.display(),
                    def.name
                )))
            }
            _ => {
                return Err(FailoverError::Refused(format!(
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

/// Refuse if a test copy of `domain` is defined here.
pub fn check_no_test_copy(virsh: &Virsh, domain: &str) -> Result<()> {
    let t = test_name(domain);
    if virsh.domain_exists(&t)? {
        return Err(FailoverError::Refused(format!(
            "a test failover of {domain} is running here (domain {t}): remove it first with `vdrep failover ... --cleanup --domain {domain}`"
        )));
    }
    Ok(())
}

/// What a domain test failover needs besides the point.
#[derive(Debug, Clone)]
pub struct TestOptions<'a> {
    pub store: &'a Path,
    pub site: Option<String>,
    /// The VM's name in the store.
    pub vm: &'a str,
    pub point: PointSel,
    pub at: Option<PathBuf>,
    pub definition: &'a DefinitionFrom,
    /// The isolated network's name.
    pub network: &'a str,
}

/// Test failover of a domain: expose the point, define `NAME-test` on it
/// with every NIC on the isolated network, start it. Anything that fails
/// after the expose is undone (the view and the copy are removed).
pub fn test_failover(virsh: &Virsh, o: &TestOptions<'_>) -> Result<(ViewInfo, TestDomain)> {
    let (def, point) = load_for(virsh, o.definition, o.store, o.site.clone(), o.vm, o.point)?;
    check_no_test_copy(virsh, &def.name)?;
    let view = testfo::expose(o.store, o.site.clone(), o.vm, point, o.at.clone())?;
    match start_test_copy(virsh, &def, &view, o.network) {
        Ok(t) => Ok((view, t)),
        Err(e) => {
            let note = match testfo::cleanup(o.store, Some(view.site.clone()), o.vm) {
                Ok(_) => "the exposed point was removed again".to_string(),
                Err(c) => format!(
                    "removing the exposed point failed too ({c}): run `vdrep failover {} --cleanup`",
                    o.vm
                ),
            };
            Err(e.noted(note))
        }
    }
}

fn start_test_copy(
    virsh: &Virsh,
    def: &Definition,
    view: &ViewInfo,
    network: &str,
) -> Result<TestDomain> {
    let files: Vec<(String, PathBuf)> = view
        .disks
        .iter()
        .map(|d| (file_name(&d.path), d.path.clone()))
        .collect();
    let disks = disk_moves(def, &files, &|n| {
        let (f, name) = ReplicaFormat::for_source(n);
        (name, f)
    })?;
    let name = test_name(&def.name);
    let console_log = view.scratch.join("console.log");
    let network_created = virsh.ensure_isolated_network(network)?;
    let rw = Rewrite {
        name: Some(name.clone()),
        new_identity: true,
        disks,
        nics: NicPlan::All(NetTarget::Network(network.to_string())),
        console_log: Some(console_log.clone()),
        metadata: vec![
            ("vm".into(), view.vm.clone()),
            ("site".into(), view.site.clone()),
            ("cycle".into(), view.cycle.to_string()),
            ("network".into(), network.to_string()),
            (
                "network-created".into(),
                if network_created { "yes" } else { "no" }.into(),
            ),
        ],
    };
    let undo_network = |e: FailoverError| -> FailoverError {
        if network_created {
            let _ = virsh.remove_network(network);
        }
        e
    };
    let xml = rw.apply(def).map_err(|e| undo_network(e.into()))?;
    virsh.define(&xml).map_err(|e| undo_network(e.into()))?;
    if let Err(e) = virsh.start(&name) {
        let _ = virsh.undefine(&name);
        return Err(undo_network(e.into()));
    }
    Ok(TestDomain {
        domain: name,
        console_log,
        network: network.to_string(),
        network_created,
    })
}

/// Remove the test copy of `domain` (before its view goes): destroy and
/// undefine it; remove its network if vdrep created it and nothing else is
/// attached. The copy's name, if there was one. Refused for a domain of
/// that name vdrep did not define.
pub fn cleanup_test_copy(virsh: &Virsh, domain: &str) -> Result<Option<String>> {
    let t = test_name(domain);
    if !virsh.domain_exists(&t)? {
        return Ok(None);
    }
    let def = Definition::parse(&virsh.dumpxml(&t)?)?;
    if def.vdrep_metadata("vm").is_none() {
        return Err(FailoverError::Refused(format!(
            "domain {t} was not defined by a vdrep test failover: not removing it"
        )));
    }
    virsh.undefine(&t)?;
    if let (Some(net), Some("yes")) = (
        def.vdrep_metadata("network"),
        def.vdrep_metadata("network-created").as_deref(),
    ) {
        if virsh.networks(false)?.contains(&net) && virsh.network_ports(&net)? == 0 {
            virsh.remove_network(&net)?;
        }
    }
    Ok(Some(t))
}

/// A network map: `br0=br-dr,default=dr-net` (a NIC on the network or
/// bridge named on the left goes to the one on the right).
pub fn parse_network_map(s: &str) -> Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((from, to)) = part.split_once('=') else {
            return Err(FailoverError::Invalid(format!(
                "--network-map: {part:?} is not FROM=TO (e.g. br0=br-dr,default=dr-net)"
            )));
        };
        let (from, to) = (from.trim(), to.trim());
        if from.is_empty() || to.is_empty() {
            return Err(FailoverError::Invalid(format!(
                "--network-map: {part:?} names no network on one side"
            )));
        }
        m.insert(from.to_string(), to.to_string());
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
pub fn plan_nics(
    virsh: &Virsh,
    def: &Definition,
    map: &HashMap<String, String>,
) -> Result<NicPlan> {
    let networks = virsh.networks(false)?;
    let mut plan = HashMap::new();
    for (from, to) in map {
        let t = net_target(&networks, to).ok_or_else(|| {
            FailoverError::Refused(format!(
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
            return Err(FailoverError::Refused(format!(
                "a NIC of {} is on the {} {src:?}, which does not exist here: map it with --network-map {src}=NETWORK",
                def.name, nic.kind
            )));
        }
    }
    Ok(NicPlan::Map(plan))
}

/// What an unplanned domain failover needs besides the point.
#[derive(Debug, Clone)]
pub struct UnplannedOptions<'a> {
    pub store: &'a Path,
    pub site: Option<&'a str>,
    pub vm: &'a str,
    pub point: Option<u64>,
    pub definition: &'a DefinitionFrom,
    pub network_map: &'a HashMap<String, String>,
}

/// Unplanned failover of a domain: promote the point to live disks, then
/// define the domain on them (its own UUID and MACs, NICs mapped) and
/// start it. The definition and the network map are checked first.
pub fn unplanned(virsh: &Virsh, o: &UnplannedOptions<'_>) -> Result<(LiveInfo, String)> {
    let sel = o
        .point
        .map_or(PointSel::Latest, |cycle| PointSel::Cycle { cycle });
    let (def, sel) = load_for(
        virsh,
        o.definition,
        o.store,
        o.site.map(str::to_string),
        o.vm,
        sel,
    )?;
    let point = match sel {
        PointSel::Cycle { cycle } => Some(cycle),
        _ => o.point,
    };
    if virsh.domain_running(&def.name)? {
        return Err(FailoverError::Refused(format!(
            "domain {} is running at this site: it cannot be started here twice",
            def.name
        )));
    }
    let nics = plan_nics(virsh, &def, o.network_map)?;
    let live = role_change::unplanned(o.store, o.site, o.vm, point)?;
    let started = (|| -> Result<String> {
        let files: Vec<(String, PathBuf)> = live
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.path.clone()))
            .collect();
        let disks = disk_moves(&def, &files, &|n| (n.to_string(), ReplicaFormat::Raw))?;
        let rw = Rewrite {
            name: None,
            new_identity: false,
            disks,
            nics,
            console_log: None,
            metadata: vec![],
        };
        virsh.define(&rw.apply(&def)?)?;
        virsh.start(&def.name)?;
        Ok(def.name.clone())
    })();
    match started {
        Ok(n) => Ok((live, n)),
        Err(e) => Err(e.noted(format!(
            "the disks are live in {} (the failover itself is done): define and start the domain on them by hand, or cancel with `vdrep failover {} --cancel`",
            live.dir.display(),
            o.vm
        ))),
    }
}

/// Before cancelling an unplanned failover: stop and undefine domain
/// `domain` if it runs on the live disks under `live_root` (the store's
/// live folder); refused for a domain whose disks are elsewhere (it is not
/// the failed-over copy). True if a domain was removed.
pub fn remove_failed_over(virsh: &Virsh, domain: &str, live_root: &Path) -> Result<bool> {
    if !virsh.domain_exists(domain)? {
        return Ok(false);
    }
    let def = Definition::parse(&virsh.dumpxml(domain)?)?;
    let root = live_root
        .canonicalize()
        .unwrap_or_else(|_| live_root.to_path_buf());
    let on_live = def
        .replicated_disks()
        .filter_map(|d| d.file.as_deref())
        .any(|f| f.starts_with(&root));
    if !on_live {
        return Err(FailoverError::Refused(format!(
            "domain {domain} does not run on this site's live disks (under {}): not touching it",
            root.display()
        )));
    }
    virsh.undefine(domain)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::FailoverErrorKind;

    #[test]
    fn network_maps_parse_and_bad_ones_are_invalid() {
        let m = parse_network_map(" br0=br-dr, default=dr-net ,").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["br0"], "br-dr");
        assert_eq!(m["default"], "dr-net");
        assert!(parse_network_map("").unwrap().is_empty());
        for bad in ["br0", "br0=", "=x", "a=b,c"] {
            let e = parse_network_map(bad).unwrap_err();
            assert_eq!(e.kind(), FailoverErrorKind::Invalid, "{bad:?}");
        }
    }

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
            Err(FailoverErrorKind::Refused)
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
        assert_eq!(e.kind(), FailoverErrorKind::Refused);
        assert!(e.to_string().contains("vdb"), "{e}");
    }
}
