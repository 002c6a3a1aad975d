//! Role changes between the two sites: planned and unplanned failover,
//! commit, reverse replication and failback.
//!
//! A VM is *active* at one site (its disks are live files under a tracking
//! `vdrep mount`, protected towards the other site) and *replicated* at the
//! other (a replica in the receiver's store). Changing roles never copies a
//! disk: files move by `rename` between the tracking folder and the store
//! ([`crate::replica::Site::adopt`], [`crate::replica::Site::promote`]), and
//! the tracking state of the new live folder is seeded
//! ([`crate::tracking::seed`]) with the cycle both sites hold, so the new
//! direction ships only changes.
//!
//! **Planned failover** (`vdrep failover VM --planned`, at the active site,
//! both sites up): fence the VM's disks (writes fail with `EROFS`), ship
//! the last cycle, compare digests of every block with the replica, stop
//! the mount, move the disks into the local store as the replica of the
//! other site, then ask the other site ([`AdminRequest::Promote`], over the
//! authenticated QUIC link) to make its replica live, mount it and protect
//! it back. Failback is the same command at the other site.
//!
//! **Unplanned failover** (`--unplanned`, at the replica site, the active
//! site gone): the chosen point becomes the live disks, tracked from that
//! moment, not protected. **Reverse** (`vdrep reverse VM`, at the old
//! active site once it is back): its disks enter its store marked
//! `needs_resync` (they may hold writes the replica never got), and the new
//! active site protects back; the sender resyncs by block checksums, which
//! overwrites whatever differs.
//!
//! This module holds the steps one site carries out itself (run inside the
//! receiver: [`promote_local`], [`adopt_local`], [`cancel_local`],
//! [`handle_admin`]) and the site-to-site request [`admin_call`]. The
//! operator's procedures that drive them (`vdrep failover --planned`, ...)
//! are [`crate::failover::role_change`].

pub mod domain;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::daemon::control::{self as mount_ctl};
use crate::daemon::DaemonError;
use crate::ipc::CallError;
use crate::libvirt::{Definition, LibvirtError, LibvirtErrorKind, Virsh};
use crate::replica::{self, LiveInfo, Store, StoreError};
use crate::sender::ProtectSpec;
use crate::tracking::seed::{seed, SeedDisk, SeedError};
use crate::util::steps::Steps;

/// A request from one site to the other ([`crate::wire::Msg::Admin`]). The
/// receiver answers for the namespace of the requesting site's
/// certificate only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Where is `vm` live at the receiver (nothing changes)? With
    /// `domain`, also check that the domain could be started there from
    /// the newest point's definition (refused, naming why, if not).
    Live {
        vm: String,
        #[serde(default)]
        domain: Option<domain::DomainStart>,
        /// Asked before the domain is stopped at the requesting site: its
        /// definition and network map are checked, not whether it runs
        /// here (both sites may be one host's libvirt; the request after
        /// the stop checks that).
        #[serde(default)]
        before_stop: bool,
    },
    /// Make the receiver's replica of `vm` (at `point`; newest if `None`)
    /// the VM's live disks there, mount them and, with `reverse_to`,
    /// protect them back to that receiver address.
    Promote {
        vm: String,
        point: Option<u64>,
        reverse_to: Option<String>,
        every_secs: u64,
        max_rate: u64,
        #[serde(default)]
        policy: ResyncPolicy,
        /// Define and start this domain on the live disks, from the
        /// promoted point's definition, and replicate its definition back.
        #[serde(default)]
        domain: Option<domain::DomainStart>,
        /// A member of a consistency group failed over with the others
        /// (`failover --group G --planned`): live in the group's one
        /// folder, and protected back in the group.
        #[serde(default)]
        group: Option<GroupBack>,
    },
    /// Protect the live `vm` back to the receiver at `to`.
    Reverse {
        vm: String,
        to: String,
        every_secs: u64,
        max_rate: u64,
        #[serde(default)]
        policy: ResyncPolicy,
    },
}

/// A consistency group a promoted VM belongs to: its members go live in
/// one folder (`STORE/live/SITE/group-NAME` unless they came from one
/// there), under one mount, and are protected back with `--group NAME`,
/// none cut before all `members` are protected there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupBack {
    pub name: String,
    pub members: Vec<String>,
}

/// The resync settings a protection carries over to the other direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncPolicy {
    pub threshold_pct: f64,
    pub window: String,
}

impl Default for ResyncPolicy {
    fn default() -> Self {
        ResyncPolicy {
            threshold_pct: crate::sender::default_threshold(),
            window: String::new(),
        }
    }
}

impl ResyncPolicy {
    pub fn of(spec: &ProtectSpec) -> Self {
        ResyncPolicy {
            threshold_pct: spec.resync_threshold_pct,
            window: spec.resync_window.clone(),
        }
    }
}

/// The answer to an [`AdminRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdminReply {
    /// The VM's live state at the answering site.
    pub live: Option<LiveInfo>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The domain started on the live disks ([`domain::DomainStart`]).
    #[serde(default)]
    pub domain: Option<String>,
}

/// Where adopted disks lived (kept in the store as `origin.json`), so a
/// failback puts them back under the same mount, same names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Origin {
    /// The tracking folder.
    pub dir: PathBuf,
    /// Its identity folder (`vdrep mount --keys`).
    pub keys: Option<PathBuf>,
    pub block_size: u32,
    /// disk id (hex) -> path relative to `dir`.
    pub names: HashMap<String, String>,
}

/// What the receiver process knows that role changes need.
#[derive(Clone)]
pub struct ReceiverCtx {
    pub store: std::sync::Arc<Store>,
    /// The receiver's identity folder (used to mount promoted disks).
    pub keys: PathBuf,
    /// Certificates the receiver trusts (the reverse direction trusts the
    /// same peers).
    pub trust: Vec<PathBuf>,
}

/// Why a role change failed. The message travels to the other site (as
/// the text of an `Error` answer) and to the operator.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The replica store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local mount daemon could not be reached or refused.
    #[error(transparent)]
    Mount(#[from] CallError),
    /// Starting or stopping a local mount daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Seeding the tracking state of live disks failed.
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// libvirt refused or failed (a domain started on the live disks).
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// Refused in the VM's current state; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The other site could not be reached, or answered with an error.
    #[error("{0}")]
    Peer(String),
    /// A step failed after earlier ones took effect; the message says
    /// where things are and how to go on.
    #[error("{0}")]
    Partial(String),
}

/// The kinds of [`RoleError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleErrorKind {
    /// The store, a file or the tracking state at this site failed.
    Local,
    /// A local mount daemon failed or refused.
    Mount,
    /// Refused; nothing changed.
    Refused,
    /// The other site failed or is unreachable.
    Peer,
    /// Partly done (see the message).
    Partial,
}

impl RoleError {
    pub fn kind(&self) -> RoleErrorKind {
        match self {
            RoleError::Store(_) | RoleError::Seed(_) | RoleError::Io(_) => RoleErrorKind::Local,
            RoleError::Mount(_) | RoleError::Daemon(_) => RoleErrorKind::Mount,
            RoleError::Libvirt(e) => match e.kind() {
                LibvirtErrorKind::NotFound
                | LibvirtErrorKind::Refused
                | LibvirtErrorKind::Invalid => RoleErrorKind::Refused,
                LibvirtErrorKind::Unavailable | LibvirtErrorKind::Failed => RoleErrorKind::Local,
            },
            RoleError::Refused(_) => RoleErrorKind::Refused,
            RoleError::Peer(_) => RoleErrorKind::Peer,
            RoleError::Partial(_) => RoleErrorKind::Partial,
        }
    }
}

/// Results of role changes.
pub type RoleResult<T> = Result<T, RoleError>;

fn peer(e: impl std::fmt::Display) -> RoleError {
    RoleError::Peer(e.to_string())
}

/// Serve an [`AdminRequest`] from `site` (the requester's namespace).
pub fn handle_admin(ctx: &ReceiverCtx, site: &str, req: AdminRequest) -> RoleResult<AdminReply> {
    let s = ctx.store.site(site).map_err(RoleError::from)?;
    match req {
        AdminRequest::Live {
            vm,
            domain,
            before_stop,
        } => {
            if let Some(d) = &domain {
                domain_for(&s, &vm, None, d, !before_stop)?;
            }
            Ok(AdminReply {
                live: s.live(&vm).ok().flatten(),
                ..AdminReply::default()
            })
        }
        AdminRequest::Promote {
            vm,
            point,
            reverse_to,
            every_secs,
            max_rate,
            policy,
            domain,
            group,
        } => {
            let reverse = reverse_to.map(|to| (to, every_secs, max_rate, policy));
            promote_local(
                ctx,
                site,
                &vm,
                point,
                reverse,
                (domain.as_ref(), group.as_ref()),
            )
        }
        AdminRequest::Reverse {
            vm,
            to,
            every_secs,
            max_rate,
            policy,
        } => {
            let Some(live) = s.live(&vm)? else {
                return Err(RoleError::Refused(format!(
                    "{vm} is not live at this site: there is nothing to replicate back"
                )));
            };
            let warnings = protect_live(
                ctx,
                &vm,
                &live,
                &to,
                (every_secs, max_rate, &policy),
                (None, None),
            )?;
            Ok(AdminReply {
                live: Some(live),
                warnings,
                domain: None,
            })
        }
    }
}

/// The definition and NIC plan to start domain `d` from point `point`
/// (newest if `None`) of `vm`: the point's replicated definition, else
/// the local libvirt's (a VM protected by its disk files); checked
/// (with `not_running`, not running here; every NIC lands on a network
/// here) before anything changes.
fn domain_for(
    s: &replica::Site<'_>,
    vm: &str,
    point: Option<u64>,
    d: &domain::DomainStart,
    not_running: bool,
) -> RoleResult<(Definition, crate::libvirt::NicPlan)> {
    let virsh = Virsh::new();
    let cycle = match point {
        Some(c) => Some(c),
        None => s.points(vm)?.iter().map(|p| p.cycle).max(),
    };
    let xml = match cycle {
        Some(c) => s.definition(vm, c)?,
        None => None,
    };
    let def = match xml {
        Some(x) => Definition::parse(&x)?,
        None => Definition::parse(&virsh.dumpxml(&d.name)?)?,
    };
    if def.name != d.name {
        return Err(RoleError::Refused(format!(
            "the definition replicated with {vm} is of domain {}, not {}: name that domain",
            def.name, d.name
        )));
    }
    let nics = if not_running {
        domain::check_start(&virsh, &def, &d.network_map)?
    } else {
        domain::plan_nics(&virsh, &def, &d.network_map)?
    };
    Ok((def, nics))
}

use mount_ctl::is_mounted;

/// Promote `vm` of namespace `site` to live disks here: the folder they
/// lived in before (a failback) or `STORE/live/<site>/<vm>`; seed and mount
/// it; with `reverse`, protect it back.
pub fn promote_local(
    ctx: &ReceiverCtx,
    site: &str,
    vm: &str,
    point: Option<u64>,
    reverse: Option<(String, u64, u64, ResyncPolicy)>,
    (start, group): (Option<&domain::DomainStart>, Option<&GroupBack>),
) -> RoleResult<AdminReply> {
    let s = ctx.store.site(site).map_err(RoleError::from)?;
    // Read and check before anything changes (the point's definition
    // goes with the point).
    let dom = start
        .map(|d| domain_for(&s, vm, point, d, true))
        .transpose()?;
    let origin: Option<Origin> = s
        .origin(vm)
        .map_err(RoleError::from)?
        .and_then(|v| serde_json::from_value(v).ok());
    if let Some(g) = group {
        crate::wire::safe_component(&g.name)
            .map_err(|e| RoleError::Refused(format!("group name: {e}")))?;
    }
    let live_here = ctx.store.root().join("live").join(s.name());
    let dest = match (&origin, group) {
        (Some(o), _) => o.dir.clone(),
        // A group's members share one folder (one mount cuts them all).
        (None, Some(g)) => live_here.join(format!("group-{}", g.name)),
        (None, None) => live_here.join(vm),
    };
    // Failback into a folder that stays mounted for other VMs (or a
    // group's folder that has its first members): the disks are staged
    // next to the store, then the mount takes them in.
    let into_mount = is_mounted(&dest) && s.live(vm).map_err(RoleError::from)?.is_none();
    if into_mount && origin.is_none() && group.is_none() {
        return Err(RoleError::Refused(format!(
            "{} is mounted by vdrep already (the VM is active there?): unmount it first",
            dest.display()
        )));
    }
    let mut names = HashMap::new();
    if let Some(o) = &origin {
        for (id, rel) in &o.names {
            crate::wire::safe_name(rel).map_err(|e| {
                RoleError::Refused(format!(
                    "origin.json of {vm} names a disk path that is not allowed: {e}"
                ))
            })?;
            names.insert(id.clone(), rel.clone());
        }
    }
    let live = if into_mount {
        let staging = ctx.store.root().join(".staging").join(s.name()).join(vm);
        let staged = s
            .promote(vm, point, &staging, &names)
            .map_err(RoleError::from)?;
        let disks = staged
            .disks
            .iter()
            .map(|d| {
                Ok(mount_ctl::TakeDisk {
                    from: d.path.clone(),
                    name: rel_name(&staging, &d.path).ok_or_else(|| {
                        RoleError::Partial(format!("{} is not staged", d.path.display()))
                    })?,
                    id: d.disk_id.clone(),
                    cycle: staged.cycle,
                })
            })
            .collect::<RoleResult<Vec<_>>>()?;
        let r = mount_ctl::call(&dest, &mount_ctl::Request::Take { disks })?;
        if !r.ok {
            return Err(RoleError::Partial(format!(
                "the mount of {} did not take {vm}'s disks back: {} (they are in {}; the VM is live here from point {})",
                dest.display(),
                r.error.unwrap_or_default(),
                staging.display(),
                staged.cycle
            )));
        }
        let _ = std::fs::remove_dir(&staging);
        s.relocate_live(vm, &dest).map_err(RoleError::from)?
    } else {
        s.promote(vm, point, &dest, &names)
            .map_err(RoleError::from)?
    };
    let block_size = live
        .disks
        .first()
        .map(|d| d.block_size)
        .unwrap_or(crate::tracking::TrackConfig::default().block_size);
    if !is_mounted(&dest) {
        let disks: Vec<SeedDisk> = live
            .disks
            .iter()
            .filter_map(|d| {
                Some(SeedDisk {
                    name: rel_name(&live.dir, &d.path)?,
                    id: replica::parse_hex_id(&d.disk_id)?,
                    cycle: live.cycle,
                    block_size: d.block_size,
                })
            })
            .collect();
        seed(&dest, &disks).map_err(RoleError::from)?;
        if reverse.is_none() {
            // An unplanned failover can be cancelled until its commit:
            // the mount saves what the VM overwrites.
            arm_preimages(&dest, &disks)?;
        }
        let keys = origin
            .as_ref()
            .and_then(|o| o.keys.clone())
            .unwrap_or_else(|| ctx.keys.clone());
        crate::daemon::spawn(&dest, &keys, block_size)?;
    }
    let mut warnings = Vec::new();
    // The domain starts before the protection back, so that every point
    // of that direction carries its definition; a domain that fails to
    // start leaves the disks live and replicating (a warning says what to
    // do).
    let mut started = None;
    if let Some((def, nics)) = dom {
        match domain::start_on_live(&Virsh::new(), &def, &live, nics, &mut Steps::start()) {
            Ok(n) => started = Some(n),
            Err(e) => warnings.push(format!(
                "{vm} is live in {} from point {}, but its domain {} was not started: {e}; define and start it by hand (`virsh define`, `virsh start {}`)",
                live.dir.display(),
                live.cycle,
                def.name,
                def.name
            )),
        }
    }
    if let Some((to, every, rate, policy)) = reverse {
        let w = protect_live(
            ctx,
            vm,
            &live,
            &to,
            (every, rate, &policy),
            (started.clone(), group),
        )?;
        warnings.extend(w);
    }
    Ok(AdminReply {
        live: Some(live),
        warnings,
        domain: started,
    })
}

/// The pre-image journal of a seeded disk of the live folder `dir`.
fn preimage_path(dir: &Path, name: &str, id: &[u8; 16]) -> PathBuf {
    dir.join(crate::tracking::STATE_DIR)
        .join("disks")
        .join(crate::tracking::folder_name(name, id))
        .join(crate::tracking::preimage::FILE)
}

/// Arm the pre-image journals of freshly seeded live disks.
fn arm_preimages(dir: &Path, disks: &[SeedDisk]) -> RoleResult<()> {
    for d in disks {
        let file = dir.join(&d.name);
        let size = std::fs::metadata(&file)
            .map_err(|e| RoleError::Io(format!("{}: {e}", file.display())))?
            .len();
        let j = preimage_path(dir, &d.name, &d.id);
        crate::tracking::preimage::arm(&j, d.block_size, size).map_err(|e| {
            RoleError::Io(format!(
                "cannot create the pre-image journal {} (needed to cancel the failover): {e}",
                j.display()
            ))
        })?;
    }
    Ok(())
}

/// What a cancelled failover restored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelReport {
    /// The live folder that was stopped.
    pub dir: PathBuf,
    /// The point the failover had started from.
    pub cycle: u64,
    /// Bytes of the failed-over VM's writes undone (pre-images restored).
    pub undone_bytes: u64,
    /// The VM's recovery points, as before the failover.
    pub points: Vec<replica::Point>,
}

/// Cancel the uncommitted (unplanned) failover of `vm` of namespace `site`
/// at this site: stop the live disks' mount, write back the pre-images of
/// everything the VM changed since the promotion, and give the disks back
/// to the store as the replica with its history exactly as before
/// ([`crate::replica::Site::cancel_failover`]).
pub fn cancel_local(ctx: &ReceiverCtx, site: &str, vm: &str) -> RoleResult<CancelReport> {
    let s = ctx.store.site(site).map_err(RoleError::from)?;
    let Some(live) = s.live(vm)? else {
        return Err(RoleError::Refused(format!(
            "{vm} is not failed over to this site: there is nothing to cancel"
        )));
    };
    if live.committed {
        return Err(RoleError::Refused(format!(
            "the failover of {vm} was committed (`--commit`): the recovery points from before it are gone, so it cannot be cancelled. To make the original primary active again, fail back with a planned failover: `vdrep reverse {vm}` at the old primary if it is not replicating from here yet, then `vdrep failover {vm} --planned --store STORE --reverse-to ADDR` here"
        )));
    }
    if is_mounted(&live.dir) {
        let st = mount_ctl::call(&live.dir, &mount_ctl::Request::Status)?;
        if st
            .replication
            .unwrap_or_default()
            .iter()
            .any(|r| r.vm == vm)
        {
            return Err(RoleError::Refused(format!(
                "{vm} is replicating from here back to the other site (a planned failover, or `vdrep reverse` ran): the other site holds its disks as the replica of this one, so cancelling here would lose them. Make the other site active again with a planned failover back: `vdrep failover {vm} --planned --store STORE --reverse-to ADDR` here (zero loss, ships only changes)"
            )));
        }
    }
    // Every disk must have its journal before anything changes.
    let mut journals = Vec::new();
    for d in &live.disks {
        let (Some(rel), Some(id)) = (
            rel_name(&live.dir, &d.path),
            replica::parse_hex_id(&d.disk_id),
        ) else {
            return Err(RoleError::Refused(format!(
                "{} is not below the live folder {}: cannot find its pre-image journal; nothing was changed",
                d.path.display(),
                live.dir.display()
            )));
        };
        let j = preimage_path(&live.dir, &rel, &id);
        if !j.exists() {
            return Err(RoleError::Refused(format!(
                "{}: no pre-image journal ({}): the writes made on it since the failover cannot be undone, so the cancel is refused (nothing was changed); commit the failover or fail back instead",
                d.path.display(),
                j.display()
            )));
        }
        journals.push((j, d.path.clone(), rel, id));
    }
    if is_mounted(&live.dir) {
        crate::daemon::stop(&live.dir, false).map_err(|e| {
            RoleError::Partial(format!(
                "{e}
(stop the VM running on {}'s disks, then run the cancel again)",
                vm
            ))
        })?;
    }
    let mut undone = 0;
    for (j, disk, _, _) in &journals {
        if !disk.exists() {
            continue; // moved back by an interrupted cancel
        }
        let r = crate::tracking::preimage::restore(j, disk).map_err(|e| {
            RoleError::Partial(format!(
                "undoing the writes on {} from {}: {e} (the disk stays live; fix the cause and run the cancel again)",
                disk.display(),
                j.display()
            ))
        })?;
        undone += r.bytes;
    }
    let points = s.cancel_failover(vm).map_err(RoleError::from)?;
    // The live folder's tracking state of these disks is over.
    for (j, _, _, _) in &journals {
        if let Some(folder) = j.parent() {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
    let default_dir = ctx.store.root().join("live").join(s.name()).join(vm);
    if live.dir == default_dir {
        let _ = std::fs::remove_dir_all(live.dir.join(crate::tracking::STATE_DIR));
        let _ = std::fs::remove_dir(&live.dir);
    }
    Ok(CancelReport {
        dir: live.dir,
        cycle: live.cycle,
        undone_bytes: undone,
        points,
    })
}

/// After a commit: the live disks' pre-image journals are not needed any
/// more (returns warnings).
pub fn drop_preimages(live: &LiveInfo) -> Vec<String> {
    let names: Vec<String> = live
        .disks
        .iter()
        .filter_map(|d| rel_name(&live.dir, &d.path))
        .collect();
    if is_mounted(&live.dir) {
        return match mount_ctl::call(
            &live.dir,
            &mount_ctl::Request::DropPreimages { disks: names },
        ) {
            Ok(r) if r.ok => Vec::new(),
            Ok(r) => vec![format!(
                "{}: could not stop saving pre-images: {}",
                live.dir.display(),
                r.error.unwrap_or_default()
            )],
            Err(e) => vec![format!("{e}")],
        };
    }
    for d in &live.disks {
        if let (Some(rel), Some(id)) = (
            rel_name(&live.dir, &d.path),
            replica::parse_hex_id(&d.disk_id),
        ) {
            let _ = std::fs::remove_file(preimage_path(&live.dir, &rel, &id));
        }
    }
    Vec::new()
}

fn rel_name(dir: &Path, p: &Path) -> Option<String> {
    p.strip_prefix(dir)
        .ok()
        .and_then(|r| r.to_str())
        .map(str::to_string)
}

/// Protect the live disks of `vm` towards the receiver at `to`.
fn protect_live(
    ctx: &ReceiverCtx,
    vm: &str,
    live: &LiveInfo,
    to: &str,
    (every_secs, max_rate, policy): (u64, u64, &ResyncPolicy),
    (domain, group): (Option<String>, Option<&GroupBack>),
) -> RoleResult<Vec<String>> {
    let disks: Vec<String> = live
        .disks
        .iter()
        .filter_map(|d| rel_name(&live.dir, &d.path))
        .collect();
    let spec = ProtectSpec {
        vm: vm.to_string(),
        to: to.to_string(),
        trust: ctx.trust.clone(),
        s3: None,
        every_secs,
        disks,
        max_rate,
        // The reverse direction has no shared cap of its own (yet).
        link_max_rate: 0,
        resync_threshold_pct: policy.threshold_pct,
        resync_window: policy.window.clone(),
        // The primary's quiesce command need not work at this site.
        app_hook: None,
        rpo_alert_secs: 0,
        // The domain a planned failover started on these disks: its
        // definition goes with every point of this direction, so a
        // failback starts it from the final point's definition too.
        domain,
        // A group failed over together (planned) stays a group; other
        // reverse replication is per VM (doc/CONSISTENCY-GROUPS.md).
        group: group.map(|g| g.name.clone()),
        group_members: group.map(|g| g.members.clone()).unwrap_or_default(),
        retry: Default::default(),
    };
    let r = mount_ctl::call(
        &live.dir,
        &mount_ctl::Request::Protect {
            spec: Box::new(spec),
        },
    )?;
    if !r.ok {
        return Err(RoleError::Partial(format!(
            "protecting {vm} back to {to}: {}",
            r.error.unwrap_or_default()
        )));
    }
    Ok(r.warnings)
}

/// Disks that were live under `origin.dir`, to be taken into a store as
/// the replica of `vm` for the namespace `site` (the other site's
/// certificate name).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adoption {
    pub site: String,
    pub vm: String,
    /// The cycle both sites hold.
    pub cycle: u64,
    pub cut_unix_ns: u64,
    pub origin: Origin,
    /// (path relative to `origin.dir`, disk id)
    pub disks: Vec<(String, [u8; 16])>,
    /// Set when the disks may differ from the other site's (see
    /// [`crate::replica::ReplicaState`]`::needs_resync`).
    pub needs_resync: Option<String>,
    /// Where the files are now if not under `origin.dir` (moved out of a
    /// running mount that keeps serving other VMs): `staged/<file name>`.
    #[serde(default)]
    pub staged: Option<PathBuf>,
}

/// Carry out an [`Adoption`] in `store` (the receiver's).
pub fn adopt_local(store: &Store, a: &Adoption) -> RoleResult<replica::Point> {
    let s = store.site(&a.site).map_err(RoleError::from)?;
    let adopt: Vec<replica::AdoptDisk> = a
        .disks
        .iter()
        .map(|(rel, id)| replica::AdoptDisk {
            disk_id: *id,
            name: rel.rsplit('/').next().unwrap_or(rel).to_string(),
            path: match &a.staged {
                Some(st) => st.join(rel.rsplit('/').next().unwrap_or(rel)),
                None => a.origin.dir.join(rel),
            },
            block_size: a.origin.block_size,
        })
        .collect();
    let ov = serde_json::to_value(&a.origin).map_err(|e| RoleError::Io(e.to_string()))?;
    s.adopt(
        &a.vm,
        a.cycle,
        a.cut_unix_ns,
        &adopt,
        &ov,
        a.needs_resync.as_deref(),
    )
    .map_err(RoleError::from)
}

/// Send one [`AdminRequest`] to the receiver at `to` with this site's
/// identity; returns the receiver's certificate name and its answer.
pub fn admin_call(
    keys: &Path,
    to: &str,
    trust: &[PathBuf],
    req: &AdminRequest,
) -> RoleResult<(String, AdminReply)> {
    let id = crate::transport::keys::Identity::from_dir(keys, None).map_err(peer)?;
    let trust = crate::transport::trust::TrustStore::from_files(trust).map_err(peer)?;
    let body = serde_json::to_string(req).map_err(peer)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| peer(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async move {
        use crate::wire::{self, Msg};
        let addr: std::net::SocketAddr = tokio::net::lookup_host(to)
            .await
            .map_err(|e| peer(format!("cannot resolve {to}: {e}")))?
            .next()
            .ok_or_else(|| peer(format!("{to} resolves to no address")))?;
        let ep = crate::transport::client(&id, &trust).map_err(peer)?;
        let conn = tokio::time::timeout(
            Duration::from_secs(20),
            crate::transport::connect(&ep, addr, "vdrep"),
        )
        .await
        .map_err(|_| peer(format!("{to}: no answer within 20 s")))?
        .map_err(peer)?;
        let peer_id = crate::transport::peer_identity(&conn)
            .ok_or_else(|| peer(format!("{to}: the peer presented no certificate")))?;
        let roundtrip = |m: Msg| {
            let conn = conn.clone();
            async move {
                let (mut tx, mut rx) = conn.open_bi().await.map_err(peer)?;
                wire::write_msg(&mut tx, &m).await.map_err(peer)?;
                let _ = tx.finish();
                wire::read_msg(&mut rx).await.map_err(peer)
            }
        };
        let hello = Msg::Hello(wire::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            site_name: id.name.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        });
        match roundtrip(hello).await? {
            Some(Msg::HelloOk(_)) => {}
            Some(Msg::Error(e)) => return Err(peer(format!("{to}: {}", e.message))),
            other => return Err(peer(format!("{to}: unexpected answer to Hello: {other:?}"))),
        }
        // Promotion mounts and may wait for a first contact: be patient.
        let ans = tokio::time::timeout(Duration::from_secs(600), roundtrip(Msg::Admin(body)))
            .await
            .map_err(|_| peer(format!("{to}: no answer to the request within 600 s")))??;
        conn.close(0u32.into(), b"done");
        match ans {
            Some(Msg::AdminOk(j)) => {
                let reply: AdminReply = serde_json::from_str(&j)
                    .map_err(|e| peer(format!("{to}: unreadable answer: {e}")))?;
                Ok((peer_id.cn, reply))
            }
            // Refused there, nothing changed there: the same kind as here.
            Some(Msg::Error(e)) if e.code == wire::ErrorCode::Refused => Err(RoleError::Refused(
                format!("{} ({to}) refused: {}", peer_id.cn, e.message),
            )),
            Some(Msg::Error(e)) => Err(peer(format!("{to} ({}): {}", peer_id.cn, e.message))),
            other => Err(peer(format!("{to}: unexpected answer: {other:?}"))),
        }
    })
}
