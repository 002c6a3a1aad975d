//! Failover of a libvirt domain: the VM, not only its disks.
//!
//! - a **test failover** defines `NAME-test` (new UUID, new MAC addresses)
//!   on the exposed point's files, every NIC on an isolated libvirt network
//!   (created if missing: a bridge with no forwarding and no addresses), and
//!   starts it; cleanup destroys and undefines it (and the network, if this
//!   made it and nothing else is attached) before the view goes;
//! - an **unplanned failover** defines the domain itself (same UUID and
//!   MACs) on the live disks, NICs remapped by a network map, and starts it;
//! - a **planned failover** stops the running domain here (ACPI shutdown,
//!   a timeout, then destroy), runs the planned failover of its disks
//!   ([`role_change::planned`]), and the other site defines and starts it
//!   on its live disks from the final point's definition
//!   ([`crate::roles::domain`]); failback is the same at the other site.
//!
//! The definition is, by default, the one replicated with the chosen
//! recovery point (the configuration the VM had at that cut); a file or the
//! local libvirt's definition of the domain override it, and the local one
//! is the fallback for a point that has none. Every check that can refuse
//! runs before anything changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ready::{self, Readiness};
use super::test as testfo;
use super::{role_change, FailoverError};
use crate::libvirt::{Definition, LibvirtError, NetTarget, NicPlan, Rewrite, Virsh};
use crate::replica::{LiveInfo, ReplicaFormat};
use crate::roles::domain::{self as rd, disk_moves, file_name};
use crate::testview::{PointSel, ViewInfo};
use crate::util::steps::Steps;

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

/// The disk files of domain `domain` that `vdrep protect --domain`
/// replicates, and warnings (read-only media skipped, no guest agent
/// channel). Refused, naming the disk and what to do, for a domain that
/// does not exist ([`crate::libvirt::LibvirtErrorKind::NotFound`]), a disk
/// that is not a file, or a file not under a running `vdrep mount`
/// (`tracked` says whether one is).
pub fn protect_disks(
    virsh: &Virsh,
    domain: &str,
    tracked: &dyn Fn(&Path) -> bool,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let def = Definition::parse(&virsh.dumpxml(domain)?)?;
    let mut warnings = Vec::new();
    let mut disks = Vec::new();
    for d in &def.disks {
        if matches!(d.device.as_str(), "cdrom" | "floppy") || d.readonly {
            warnings.push(format!(
                "{} {} ({}) of domain {domain} is read-only media: not replicated",
                d.device, d.target, d.source
            ));
            continue;
        }
        let Some(file) = d.file.as_ref().filter(|_| d.is_replicated()) else {
            return Err(FailoverError::Refused(format!(
                "disk {} is a {} disk ({}), not a file: vdrep replicates disk files under a `vdrep mount`; copy it into a file in the mounted folder (qemu-img convert) and point the domain at that file",
                d.target, d.kind, d.source
            )));
        };
        if !tracked(file) {
            return Err(FailoverError::Refused(format!(
                "disk {} ({}) is not under a running vdrep mount: mount its folder with `vdrep mount DIR --keys KEYDIR`, or move the file into a mounted folder",
                d.target,
                file.display()
            )));
        }
        disks.push(file.clone());
    }
    if disks.is_empty() {
        return Err(FailoverError::Refused("it has no disk file".into()));
    }
    if !def.agent_channel {
        warnings.push(format!(
            "domain {domain} has no guest agent channel ({}): application-consistent points are impossible; add one (<channel type='unix'><target type='virtio' name='{}'/></channel>) and install qemu-guest-agent in the guest",
            crate::libvirt::definition::AGENT_CHANNEL,
            crate::libvirt::definition::AGENT_CHANNEL
        ));
    }
    Ok((disks, warnings))
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

/// Refuse if a test copy of `domain` is defined here.
pub fn check_no_test_copy(virsh: &Virsh, domain: &str) -> Result<()> {
    no_test_copy_in(&virsh.domains(false)?, domain)
}

/// [`check_no_test_copy`] on a listing of the defined domains.
fn no_test_copy_in(defined: &[String], domain: &str) -> Result<()> {
    let t = test_name(domain);
    if defined.contains(&t) {
        return Err(FailoverError::Refused(format!(
            "a test failover of {domain} is running here (domain {t}): remove it first with `vdrep failover ... --cleanup --domain {domain}`"
        )));
    }
    Ok(())
}

/// The result of work done on a scoped thread (a panic there is an error).
fn joined<T>(r: std::thread::Result<std::result::Result<T, LibvirtError>>) -> Result<T> {
    r.unwrap_or_else(|_| Err(LibvirtError::Failed("a libvirt call panicked".into())))
        .map_err(FailoverError::from)
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
/// after the expose is undone (the view, the copy and a network made for
/// it are removed). The isolated network is made ready on a thread of its
/// own while the point is exposed and the copy defined (libvirt defines a
/// domain whose network is not there yet; only the start needs it).
/// `steps` notes where the time went (definition, checks, expose, define,
/// network: the wait for the network beyond the define, start).
pub fn test_failover(
    virsh: &Virsh,
    o: &TestOptions<'_>,
    steps: &mut Steps,
) -> Result<(ViewInfo, TestDomain)> {
    let (def, point) = load_for(virsh, o.definition, o.store, o.site.clone(), o.vm, o.point)?;
    steps.done("definition");
    // Both listings at once: no copy may exist; whether the network does
    // is what the copy's metadata says about removing it at cleanup.
    let (domains, networks) = std::thread::scope(|sc| {
        let nets = sc.spawn(|| virsh.networks(false));
        (virsh.domains(false), nets.join())
    });
    no_test_copy_in(&domains?, &def.name)?;
    let network_exists = joined(networks)?.iter().any(|n| n == o.network);
    steps.done("checks");
    let (network, copy) = std::thread::scope(|sc| {
        let net = sc.spawn(|| virsh.ensure_isolated_network(o.network, network_exists));
        let copy = testfo::expose(o.store, o.site.clone(), o.vm, point, o.at.clone()).map(|view| {
            steps.done("expose");
            let defined = define_test_copy(virsh, &def, &view, o.network, !network_exists);
            steps.done("define");
            (view, defined)
        });
        (joined(net.join()), copy)
    });
    steps.done("network");
    let network_created = *network.as_ref().unwrap_or(&false);
    let undo_network = |e: FailoverError| -> FailoverError {
        if network_created {
            let _ = virsh.remove_network(o.network);
        }
        e
    };
    let (view, defined) = copy.map_err(undo_network)?;
    let started = network.and_then(|created| {
        let t = defined?;
        virsh.start(&t.domain)?;
        steps.done("start");
        Ok(TestDomain {
            network_created: created,
            ..t
        })
    });
    match started {
        Ok(t) => Ok((view, t)),
        Err(e) => {
            let _ = virsh.undefine(&test_name(&def.name));
            let e = undo_network(e);
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

/// Define the test copy of `def` on the exposed `view`, every NIC on
/// `network` (`network_created`: this test failover makes that network,
/// so its cleanup removes it).
fn define_test_copy(
    virsh: &Virsh,
    def: &Definition,
    view: &ViewInfo,
    network: &str,
    network_created: bool,
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
    virsh.define(&rw.apply(def)?)?;
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
/// `steps` notes where the time went (definition, checks, promote,
/// define, start).
pub fn unplanned(
    virsh: &Virsh,
    o: &UnplannedOptions<'_>,
    steps: &mut Steps,
) -> Result<(LiveInfo, String)> {
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
    steps.done("definition");
    let point = match sel {
        PointSel::Cycle { cycle } => Some(cycle),
        _ => o.point,
    };
    let nics = rd::check_start(virsh, &def, o.network_map)?;
    steps.done("checks");
    let live = role_change::unplanned(o.store, o.site, o.vm, point)?;
    steps.done("promote");
    let started = rd::start_on_live(virsh, &def, &live, nics, steps);
    match started {
        Ok(n) => Ok((live, n)),
        Err(e) => Err(FailoverError::from(e).noted(format!(
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

/// What a domain's planned failover did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedDomain {
    /// How the domain was stopped here.
    pub stopped: rd::Stopped,
    #[serde(flatten)]
    pub report: role_change::PlannedReport,
}

/// Planned failover of domain `o.domain` (which must be set): ask the
/// other site first ([`role_change::preflight`]: a refusal there changes
/// nothing, the domain keeps running), stop it
/// here (an ACPI shutdown, up to `shutdown_timeout`, then destroy), then
/// the planned failover of its disks, at whose end the other site starts
/// it. If the failover is abandoned while the VM is still active here
/// (its mount still protects it), the domain is started here again.
pub fn planned(
    virsh: &Virsh,
    o: &role_change::Planned<'_>,
    shutdown_timeout: std::time::Duration,
    say: &dyn Fn(&str),
) -> Result<PlannedDomain> {
    let Some(d) = &o.domain else {
        return Err(FailoverError::Invalid(
            "a domain's planned failover needs the domain's name".into(),
        ));
    };
    if !virsh.domain_exists(&d.name)? {
        return Err(FailoverError::Refused(format!(
            "no libvirt domain named {:?} here (see `virsh list --all`): nothing to fail over",
            d.name
        )));
    }
    // The other site checks the definition and the map before anything
    // stops here: its refusal leaves the domain running.
    role_change::preflight(o)?;
    let was_running = virsh.domain_running(&d.name)?;
    let stopped = rd::stop(virsh, &d.name, shutdown_timeout)?;
    say_stopped(&d.name, stopped, shutdown_timeout, say);
    match role_change::planned(o, say) {
        Ok(report) => Ok(PlannedDomain { stopped, report }),
        Err(e) => {
            let active_here = crate::daemon::control::mount_of_vm(o.vm).is_some();
            if !(was_running && active_here) {
                return Err(e);
            }
            let note = match virsh.start(&d.name) {
                Ok(()) => format!("(domain {} was started here again)", d.name),
                Err(s) => format!(
                    "(starting domain {} here again failed too: {s}; `virsh start {}`)",
                    d.name, d.name
                ),
            };
            Err(e.noted(note))
        }
    }
}

fn say_stopped(name: &str, stopped: rd::Stopped, timeout: Duration, say: &dyn Fn(&str)) {
    match stopped {
        rd::Stopped::NotRunning => say(&format!("domain {name} was not running")),
        rd::Stopped::Clean(t) => say(&format!(
            "domain {name} shut down cleanly in {:.1} s",
            t.as_secs_f64()
        )),
        rd::Stopped::Destroyed => say(&format!(
            "domain {name} did not shut down within {} s: destroyed (powered off)",
            timeout.as_secs()
        )),
    }
}

/// A domain a group's planned failover stopped at this site.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoppedDomain {
    /// The VM (as vdrep names it) the domain is.
    pub vm: String,
    pub domain: String,
    pub stopped: rd::Stopped,
}

/// Stop the domains `doms` (VM, domain name) at once for a group's
/// planned failover: each gets an ACPI shutdown request and up to
/// `timeout` to power off ([`rd::stop`]), all in parallel, so the group
/// waits for its slowest guest, not for the sum. Refused, stopping
/// nothing, if one is not defined here. If one cannot be stopped, those
/// already stopped are started again and the error says so.
pub fn stop_all(
    virsh: &Virsh,
    doms: &[(String, String)],
    timeout: Duration,
    say: &dyn Fn(&str),
) -> Result<Vec<StoppedDomain>> {
    let defined = virsh.domains(false)?;
    if let Some((vm, d)) = doms.iter().find(|(_, d)| !defined.contains(d)) {
        return Err(FailoverError::Refused(format!(
            "{vm} is protected as libvirt domain {d:?}, which is not defined here (see `virsh list --all`): define it again, or unprotect {vm}"
        )));
    }
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = doms
            .iter()
            .map(|(_, d)| sc.spawn(move || rd::stop(virsh, d, timeout)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::roles::RoleError::Partial(
                        "stopping a domain panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut stopped = Vec::new();
    let mut failed = None;
    for ((vm, d), r) in doms.iter().zip(results) {
        match r {
            Ok(s) => {
                say_stopped(d, s, timeout, say);
                stopped.push(StoppedDomain {
                    vm: vm.clone(),
                    domain: d.clone(),
                    stopped: s,
                });
            }
            Err(e) => failed = failed.or(Some(FailoverError::from(e))),
        }
    }
    match failed {
        None => Ok(stopped),
        Some(e) => {
            let vms: Vec<String> = stopped.iter().map(|s| s.vm.clone()).collect();
            Err(e.noted_if(restart(virsh, &stopped, &vms)))
        }
    }
}

/// Start again the domains of `stopped` that ran before [`stop_all`] and
/// belong to one of `vms` (the members a group's failover left active
/// here); a note saying what was done, for the error that caused it.
pub fn restart(virsh: &Virsh, stopped: &[StoppedDomain], vms: &[String]) -> String {
    let mut started = Vec::new();
    let mut failed = Vec::new();
    for s in stopped
        .iter()
        .filter(|s| s.stopped != rd::Stopped::NotRunning && vms.contains(&s.vm))
    {
        match virsh.start(&s.domain) {
            Ok(()) => started.push(s.domain.as_str()),
            Err(e) => failed.push(format!("{} ({e}; `virsh start {}`)", s.domain, s.domain)),
        }
    }
    match (started.is_empty(), failed.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("(domains started here again: {})", started.join(", ")),
        _ => format!(
            "(domains started here again: {}; starting failed for: {})",
            if started.is_empty() {
                "none".to_string()
            } else {
                started.join(", ")
            },
            failed.join(", ")
        ),
    }
}

pub use crate::replica::boot::{boot_checks, BootCheck};

/// Boot verification of a point: a test failover of it on the isolated
/// network, then wait (up to `timeout`) until the copy is ready by `how`
/// (its guest agent, a command, a console marker: [`ready::wait`]); the
/// result is kept with the point (verified, or failed with the reason and
/// the console's tail) and the test failover removed again. A point whose
/// copy cannot even start is recorded as failed too. Refused, recording
/// nothing, while a test failover of the domain runs here.
pub fn verify_boot(
    virsh: &Virsh,
    o: &TestOptions<'_>,
    how: &Readiness,
    timeout: std::time::Duration,
) -> Result<BootCheck> {
    let t0 = std::time::Instant::now();
    let (site, pts) = testfo::points(o.store, o.site.clone(), o.vm)?;
    let (def, point) = load_for(
        virsh,
        o.definition,
        o.store,
        Some(site.clone()),
        o.vm,
        o.point,
    )?;
    let PointSel::Cycle { cycle } = point else {
        return Err(FailoverError::Invalid(format!(
            "{} has no such recovery point ({} kept): see `vdrep points {}`",
            o.vm,
            pts.len(),
            o.vm
        )));
    };
    check_no_test_copy(virsh, &def.name)?;
    let run = TestOptions {
        site: Some(site.clone()),
        point,
        ..o.clone()
    };
    let (verified, detail) = match test_failover(virsh, &run, &mut Steps::start()) {
        Err(e) => (false, format!("the test copy did not start: {e}")),
        Ok((view, t)) => {
            let left = timeout.saturating_sub(t0.elapsed());
            let waited = ready::wait(virsh, &t.domain, how, Some(&t.console_log), left);
            // Removed whatever the wait found.
            cleanup_test_copy(virsh, &def.name)?;
            testfo::cleanup(o.store, Some(view.site.clone()), o.vm)?;
            match waited {
                Ok(_) => (true, String::new()),
                Err(FailoverError::NotReady { why, .. }) => (false, why),
                Err(e) => return Err(e),
            }
        }
    };
    let check = BootCheck {
        cycle,
        verified,
        secs: t0.elapsed().as_secs_f64(),
        at_unix_ns: crate::util::now_ns(),
        detail,
        ready: how.to_string(),
    };
    crate::replica::boot::save_boot_check(o.store, &site, o.vm, &check).map_err(|e| {
        FailoverError::Store(format!(
            "keeping the boot check of point {cycle} in {}: {e}",
            crate::replica::boot::boot_check_dir(o.store, &site, o.vm).display()
        ))
    })?;
    Ok(check)
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
}
