//! `vdrep failover` (test, cleanup, planned, unplanned, commit, cancel),
//! `vdrep reverse` and `vdrep plan failover`: arguments and output. The
//! procedures are [`crate::failover`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::fmt::human;
use crate::failover::plan::{parse, run, Actions, Group, Phase, Step};
use crate::failover::ready::Readiness;
use crate::failover::test::{self, Accel, BootOptions};
use crate::failover::{role_change, FailoverError, FailoverErrorKind};
use crate::ipc::CallErrorKind;
use crate::libvirt::Virsh;
use crate::objstore::StoreUrl;
use crate::testview::bucket::{self, BucketView};
use crate::testview::{format_utc, PointSel, ViewInfo};

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Run a recovery plan: a test failover of every VM with --test, an
    /// unplanned failover (newest point) with --unplanned. The plan is a
    /// TOML file of groups run in order: `[[group]]` with `name = "NAME"`,
    /// `vms = ["A", "B"]` (failed over in this order), optional
    /// `pre = "CMD"` (a failing pre skips its group) and `post = "CMD"`
    /// (doc/CONFIG.md, Recovery plans); scripts get VDREP_PLAN_GROUP,
    /// VDREP_PLAN_VMS and VDREP_PLAN_MODE. A failed VM stops the plan
    /// before the next group. A group's `domains = ["D"]` are failed over
    /// as libvirt domains (`failover --domain D`), and the next group
    /// starts only when they are ready: the guest agent answers
    /// guest-ping, or the group's `wait_for = "CMD"` exits 0, within
    /// `ready_timeout` seconds (default 300); otherwise the plan stops with
    /// a not_ready step naming the domain.
    Failover {
        /// The plan file.
        plan: PathBuf,
        /// The receiver's store at this (secondary) site.
        #[arg(long)]
        store: PathBuf,
        /// Test failover of every VM (copy-on-write; replication continues).
        #[arg(
            long,
            conflicts_with = "unplanned",
            required_unless_present = "unplanned"
        )]
        test: bool,
        /// Unplanned failover of every VM to its newest point.
        #[arg(long)]
        unplanned: bool,
        /// Remove the test failovers of a plan's VMs instead.
        #[arg(long, requires = "test")]
        cleanup: bool,
        /// Print the report (one entry per VM and script) as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `vdrep failover NAME --store DIR MODE ...`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("domain_or_group").args(["domain", "group"])))]
pub struct FailoverArgs {
    /// VM name (default: the --domain's name).
    #[arg(required_unless_present_any = ["domain", "group"])]
    pub name: Option<String>,
    /// A consistency group: one group point (`vdrep points --group`) for
    /// every VM of the group. With --test (one view per VM), --cleanup and
    /// --unplanned (--point names a group point); --planned (at the active
    /// site: every member fenced, one final group point, all handed over
    /// and replicating back as the group); --commit and --cancel (every
    /// member).
    #[arg(long, value_name = "GROUP", conflicts_with_all = ["name", "domain", "boot", "at"])]
    pub group: Option<String>,
    /// A libvirt domain, failed over as a VM: --test defines and starts
    /// DOMAIN-test (new UUID and MACs) on the exposed point, every NIC on
    /// the isolated --test-network; --cleanup destroys and undefines it;
    /// --unplanned defines and starts DOMAIN on the live disks, NICs
    /// remapped by --network-map; --planned shuts DOMAIN down here (ACPI,
    /// --shutdown-timeout, then destroy) and the other site defines and
    /// starts it on its live disks from the final point's definition.
    #[arg(long, conflicts_with_all = ["boot", "commit"])]
    pub domain: Option<String>,
    /// With --domain: its definition (the XML of `virsh dumpxml`) instead of
    /// the definition of DOMAIN in this site's libvirt.
    #[arg(long, requires = "domain", value_name = "FILE")]
    pub definition: Option<PathBuf>,
    /// With --domain --test (or --group --test, for members whose point
    /// carries a domain definition): the isolated libvirt network of the test copy
    /// (created if missing: no forwarding, no addresses; removed by
    /// --cleanup if it created it and nothing else is attached).
    #[arg(long, default_value = crate::failover::domain::TEST_NETWORK)]
    pub test_network: String,
    /// With --domain --unplanned or --planned (or --group --planned, for
    /// members protected as domains): FROM=TO,... — a NIC on the
    /// network or bridge FROM goes to the libvirt network (or host bridge)
    /// TO at the site that starts the domain, e.g. br0=br-dr,default=dr-net.
    /// Every NIC must land on one that exists there.
    #[arg(long, requires = "domain_or_group", value_name = "MAP")]
    pub network_map: Option<String>,
    /// With --domain --planned (or --group --planned): seconds each guest
    /// gets to power off after the ACPI shutdown request before its domain
    /// is destroyed (a group's domains are shut down at once).
    #[arg(long, requires = "domain_or_group", default_value_t = 120)]
    pub shutdown_timeout: u64,
    /// The receiver's store folder (`vdrep receive --store`).
    #[arg(long)]
    pub store: PathBuf,
    /// The sending site (needed only if several sites replicate a VM of this name).
    #[arg(long)]
    pub site: Option<String>,
    #[command(flatten)]
    pub mode: FailoverMode,
    /// With --test or --unplanned: the point to use: `latest` (default), a
    /// point id from `vdrep points`, a UTC time (2024-05-01T12:00:00Z: the
    /// newest point at or before it), @UNIXSECS, or an age (-5m).
    #[arg(long)]
    pub point: Option<String>,
    /// With --planned: the VM's tracking folder at this (active) site
    /// (default: the running mount that protects NAME).
    #[arg(long, requires = "planned")]
    pub dir: Option<PathBuf>,
    /// With --planned: this site's receiver address as the other site
    /// reaches it (HOST:PORT); the VM replicates back to it.
    #[arg(long, requires = "planned")]
    pub reverse_to: Option<String>,
    /// With --planned: give up shipping the last cycle after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// With --test: mount the VHD files here instead of STORE/failover/SITE/NAME.
    #[arg(long, requires = "test")]
    pub at: Option<PathBuf>,
    /// With --test: also start QEMU on the exposed disks (KVM if usable, else TCG).
    #[arg(long, requires = "test")]
    pub boot: bool,
    /// With --boot: a kernel to boot directly (else the disks' boot loader).
    #[arg(long, requires = "boot")]
    pub kernel: Option<PathBuf>,
    /// With --boot and --kernel: its initrd.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// With --boot and --kernel: the kernel command line.
    #[arg(long, requires = "kernel")]
    pub append: Option<String>,
    /// With --boot: `kvm`, `tcg`, or `auto` (KVM if a probe boot under it
    /// works, else TCG; the answer is cached in the run folder).
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"], requires = "boot")]
    pub accel: String,
    /// With --boot: guest memory in MiB.
    #[arg(long, default_value_t = 512, requires = "boot")]
    pub memory: u32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub s3: super::objstore::S3Args,
    /// With an s3:// store: the local cache folder (the view, its scratch
    /// overlays and the object cache; no replica state). Default
    /// /var/cache/vdrep/BUCKET/PREFIX.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// With --test from an s3:// store: the most bytes of fetched chunks
    /// and log segments kept in the cache (least recently used go first).
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_size)]
    pub cache_size: u64,
    /// With --unplanned from an s3:// store: copy the disks to local files
    /// at most this fast (bytes a second, e.g. 100M; default: no limit).
    #[arg(long, value_name = "RATE", value_parser = parse_size, requires = "unplanned")]
    pub hydrate_rate: Option<u64>,
}

/// `512M`, `2G`, `800K`, `12345` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    super::replication::parse_rate(s).map_err(|_| format!("{s:?} is not a size (try 2G or 512M)"))
}

/// What `vdrep failover` does (exactly one).
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct FailoverMode {
    /// Test failover: expose a recovery point as VHD files (copy-on-write).
    #[arg(long)]
    pub test: bool,
    /// Remove the VM's test failover (stops a --boot test VM, unmounts,
    /// deletes the scratch overlay).
    #[arg(long)]
    pub cleanup: bool,
    /// Planned failover, run at the ACTIVE site while both sites are up:
    /// fence the VM's disks, ship the last cycle, verify every block, and
    /// make the other site active, replicating back here (zero loss).
    /// --store is this site's store (it takes the replica).
    #[arg(long)]
    pub planned: bool,
    /// Unplanned failover, run at the REPLICA site when the active site is
    /// gone: a recovery point (--point) becomes the VM's live disks here,
    /// mounted and tracked; not protected until `vdrep reverse`.
    #[arg(long)]
    pub unplanned: bool,
    /// Make a failover at this site final (its older points are dropped).
    #[arg(long)]
    pub commit: bool,
    /// Cancel an uncommitted unplanned failover at this site: stop the live
    /// disks' mount, discard every write made on them since the failover,
    /// and put the replica and all its recovery points back exactly as they
    /// were; replication from the original primary resumes. With --domain,
    /// the domain started on the live disks is destroyed and undefined first.
    #[arg(long)]
    pub cancel: bool,
}

impl FailoverArgs {
    /// The VM's name: NAME, else the domain's.
    pub fn vm(&self) -> &str {
        self.name
            .as_deref()
            .or(self.domain.as_deref())
            .unwrap_or_default()
    }

    /// `vdrep failover VM --test --store STORE` with every other option at
    /// its default (a recovery plan's test failover of one VM).
    fn test_of(vm: &str, store: &Path) -> FailoverArgs {
        FailoverArgs {
            name: Some(vm.to_string()),
            group: None,
            domain: None,
            definition: None,
            test_network: crate::failover::domain::TEST_NETWORK.into(),
            network_map: None,
            shutdown_timeout: 120,
            store: store.to_path_buf(),
            site: None,
            mode: FailoverMode {
                test: true,
                cleanup: false,
                planned: false,
                unplanned: false,
                commit: false,
                cancel: false,
            },
            point: None,
            dir: None,
            reverse_to: None,
            timeout: 600,
            at: None,
            boot: false,
            kernel: None,
            initrd: None,
            append: None,
            accel: "auto".into(),
            memory: 512,
            json: false,
            s3: Default::default(),
            cache: None,
            cache_size: 2 << 30,
            hydrate_rate: None,
        }
    }
}

/// What one failover command printed and its exit code: the command line
/// shows it, and a recovery plan keeps it per VM.
#[derive(Debug, Default)]
pub(super) struct Out {
    pub(super) code: i32,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Out {
    pub(super) fn line(&mut self, s: impl AsRef<str>) {
        self.stdout.push_str(s.as_ref());
        self.stdout.push('\n');
    }
    pub(super) fn err(&mut self, s: impl AsRef<str>) {
        self.stderr.push_str(s.as_ref());
        self.stderr.push('\n');
    }
    pub(super) fn fail(mut self, code: i32, s: impl AsRef<str>) -> Out {
        self.err(s);
        self.code = code;
        self
    }
    /// Print it; the exit code.
    pub(super) fn show(self) -> i32 {
        print!("{}", self.stdout);
        eprint!("{}", self.stderr);
        self.code
    }
}

/// The exit code and message of a failed receiver request: 2 if no
/// receiver runs; `what: reason` if it refused.
fn recv_fail(out: Out, what: &str, e: FailoverError) -> Out {
    match e {
        FailoverError::Control(r) if r.kind() == CallErrorKind::Refused => {
            out.fail(1, format!("vdrep: {what}: {r}"))
        }
        FailoverError::Control(r) if r.kind() == CallErrorKind::NotRunning => {
            out.fail(2, format!("vdrep: {r}"))
        }
        e => out.fail(1, format!("vdrep: {e}")),
    }
}

/// `vdrep failover NAME --store DIR MODE ...`.
pub fn failover(a: FailoverArgs) -> i32 {
    let m = &a.mode;
    if let Some(g) = a.group.clone() {
        return group_failover(&a, &g).show();
    }
    match super::objstore::s3_url(&a.store) {
        Err(e) => {
            eprintln!("vdrep: --store: {e}");
            return 2;
        }
        Ok(Some(url)) => return bucket_failover(&a, &url).show(),
        Ok(None) => {}
    }
    if let Some(d) = a.domain.clone() {
        if m.test {
            return super::domain::test(&a, &d);
        }
        if m.cleanup {
            return super::domain::cleanup(&a, &d);
        }
        if m.unplanned {
            return super::domain::unplanned(&a, &d);
        }
    }
    if m.planned {
        return planned(&a);
    }
    if m.cancel {
        return cancel(&a);
    }
    if m.commit {
        return commit(&a);
    }
    if m.unplanned {
        return unplanned(
            &a.store,
            a.site.as_deref(),
            a.vm(),
            a.point.as_deref(),
            a.json,
        )
        .show();
    }
    if m.cleanup {
        return cleanup(&a.store, a.site.clone(), a.vm()).show();
    }
    test_failover(&a).show()
}

/// `--group GROUP` with --test, --cleanup or --unplanned: one group
/// point for every VM of the group.
fn group_failover(a: &FailoverArgs, group: &str) -> Out {
    use crate::failover::group as fg;
    let mut out = Out::default();
    let m = &a.mode;
    if !matches!(super::objstore::s3_url(&a.store), Ok(None)) {
        return out.fail(
            2,
            "vdrep: failover --group works at a receiver's store folder, not an s3:// store (doc/CONSISTENCY-GROUPS.md)",
        );
    }
    if m.planned {
        return group_planned(a, group, out);
    }
    if m.commit || m.cancel {
        return group_commit_or_cancel(a, group, out);
    }
    let sel = match a.point.as_deref().map(PointSel::parse).transpose() {
        Ok(s) => s.unwrap_or(PointSel::Latest),
        Err(e) => return out.fail(2, format!("vdrep: --point: {e}")),
    };
    if m.cleanup {
        let done = match fg::cleanup(&a.store, a.site.clone(), group, &Virsh::new()) {
            Ok(d) => d,
            Err(e) => return recv_fail(out, &format!("cleanup of group {group}"), e),
        };
        for (vm, r) in done {
            match r {
                Ok(Some(v)) => {
                    out.line(format!("{vm}: test failover of point {} removed", v.cycle))
                }
                Ok(None) => {}
                Err(e) => out.err(format!("{vm}: {e}")),
            }
        }
        return out;
    }
    // (group point, JSON of each VM's view or live disks, a line per VM)
    let (gp, shown, lines) = if m.test {
        let lv = (&Virsh::new(), a.test_network.as_str());
        match fg::test(&a.store, a.site.clone(), group, sel, lv) {
            Ok((gp, views)) => {
                let lines = views
                    .iter()
                    .map(|t| {
                        let v = &t.view;
                        let paths: Vec<String> = v
                            .disks
                            .iter()
                            .map(|d| d.path.display().to_string())
                            .collect();
                        match &t.domain {
                            Some((_, d)) => format!(
                                "{}: {} (domain {} started on network {})",
                                v.vm,
                                paths.join(" "),
                                d.domain,
                                d.network
                            ),
                            None => format!("{}: {}", v.vm, paths.join(" ")),
                        }
                    })
                    .collect::<Vec<_>>();
                (gp, serde_json::to_value(&views).unwrap_or_default(), lines)
            }
            Err(e) => return recv_fail(out, &format!("test failover of group {group}"), e),
        }
    } else {
        match fg::unplanned(&a.store, a.site.clone(), group, sel) {
            Ok((gp, live)) => {
                let lines = gp
                    .members
                    .iter()
                    .zip(&live)
                    .map(|(m, l)| {
                        format!(
                            "{}: live (tracked, not yet protected) in {}",
                            m.vm,
                            l.dir.display()
                        )
                    })
                    .collect::<Vec<_>>();
                (gp, serde_json::to_value(&live).unwrap_or_default(), lines)
            }
            Err(e) => return recv_fail(out, &format!("unplanned failover of group {group}"), e),
        }
    };
    if a.json {
        let v = serde_json::json!({ "group": group, "point": gp, "vms": shown });
        out.line(serde_json::to_string_pretty(&v).unwrap_or_default());
        return out;
    }
    out.err(format!(
        "group {group}: {} failover of group point {} ({} UTC) for {} VM(s)",
        if m.test { "test" } else { "unplanned" },
        gp.cycle,
        format_utc(gp.time_unix_ns),
        gp.members.len()
    ));
    for l in lines {
        out.line(l);
    }
    if m.test {
        out.err(format!(
            "remove it with: vdrep failover --group {group} --cleanup --store {}",
            a.store.display()
        ));
    }
    out
}

/// `--group GROUP --planned --reverse-to ADDR [--dir DIR]`.
fn group_planned(a: &FailoverArgs, group: &str, mut out: Out) -> Out {
    let Some(reverse_to) = a.reverse_to.as_deref() else {
        return out.fail(2, "vdrep: --planned needs --reverse-to HOST:PORT (this site's receiver, for replicating back)");
    };
    let network_map = match a
        .network_map
        .as_deref()
        .map(crate::failover::domain::parse_network_map)
        .transpose()
    {
        Ok(m) => m.unwrap_or_default().into_iter().collect(),
        Err(e) => return out.fail(2, format!("vdrep: --network-map: {e}")),
    };
    let virsh = crate::libvirt::Virsh::new();
    let o = crate::failover::group::PlannedGroup {
        group,
        dir: a.dir.as_deref(),
        store: &a.store,
        reverse_to,
        timeout: Duration::from_secs(a.timeout),
        domains: crate::failover::group::GroupDomains {
            virsh: &virsh,
            network_map,
            shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        },
    };
    match crate::failover::group::planned(&o, &say) {
        Ok(r) => {
            for w in r.vms.iter().flat_map(|v| &v.warnings) {
                out.err(format!("vdrep: warning: {w}"));
            }
            if a.json {
                out.line(serde_json::to_string_pretty(&r).unwrap_or_default());
                return out;
            }
            out.line(format!(
                "group {group}: planned failover done: nothing lost (group point {}, every member verified); {} VM(s) live at {}, replicating back to this site as group {group}",
                r.cycle,
                r.vms.len(),
                r.vms.first().map_or("", |v| v.peer.as_str())
            ));
            for v in &r.vms {
                out.line(format!("{}: live in {}", v.vm, v.live_dir.display()));
                if let Some(d) = &v.domain {
                    out.line(format!("{}: domain {d} started at {}", v.vm, v.peer));
                }
            }
            out
        }
        Err(e) => out.fail(1, format!("vdrep: planned failover of group {group}: {e}")),
    }
}

/// `--group GROUP --commit` or `--cancel`: every member.
fn group_commit_or_cancel(a: &FailoverArgs, group: &str, mut out: Out) -> Out {
    use crate::failover::group as fg;
    let lines = if a.mode.commit {
        fg::commit(&a.store, a.site.clone(), group, &say).map(|done| {
            done.iter()
                .map(|(vm, l)| {
                    format!(
                        "{vm}: failover committed; live at {} from point {}",
                        l.dir.display(),
                        l.cycle
                    )
                })
                .collect::<Vec<_>>()
        })
    } else {
        fg::cancel(&a.store, a.site.clone(), group).map(|done| {
            done.iter()
                .map(|(vm, r)| {
                    format!(
                        "{vm}: failover cancelled: {} undone, {} stopped; the replica is back at point {}",
                        human(r.undone_bytes),
                        r.dir.display(),
                        r.points.last().map_or(r.cycle, |p| p.cycle)
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let what = if a.mode.commit { "commit" } else { "cancel" };
    match lines {
        Ok(lines) => {
            for l in lines {
                out.line(l);
            }
            out
        }
        Err(e) => recv_fail(out, &format!("{what} of group {group}"), e),
    }
}

/// `--cleanup`.
fn cleanup(store: &Path, site: Option<String>, vm: &str) -> Out {
    let mut out = Out::default();
    match test::cleanup(store, site, vm) {
        Err(e) => recv_fail(out, &format!("failover cleanup of {vm}"), e),
        Ok((view, warnings)) => {
            for w in &warnings {
                out.err(format!("vdrep: {w}"));
            }
            if let Some(v) = view {
                out.line(format!(
                    "{vm}: test failover of point {} removed ({} written by the test VM discarded)",
                    v.cycle,
                    human(v.written_bytes)
                ));
            }
            out
        }
    }
}

/// `--point` and `--at` of a test failover.
fn point_and_place(a: &FailoverArgs) -> Result<(PointSel, Option<PathBuf>), String> {
    let sel = match a.point.as_deref().map(PointSel::parse).transpose() {
        Ok(s) => s.unwrap_or(PointSel::Latest),
        Err(e) => return Err(format!("vdrep: --point: {e}")),
    };
    let at = match &a.at {
        Some(p) if p.is_relative() => match std::env::current_dir() {
            Ok(d) => Some(d.join(p)),
            Err(e) => return Err(format!("vdrep: --at {}: {e}", p.display())),
        },
        other => other.clone(),
    };
    Ok((sel, at))
}

/// `--test [--point P] [--at DIR] [--boot ...]`.
fn test_failover(a: &FailoverArgs) -> Out {
    let out = Out::default();
    let (sel, at) = match point_and_place(a) {
        Ok(v) => v,
        Err(e) => return out.fail(2, e),
    };
    let view = match test::expose(&a.store, a.site.clone(), a.vm(), sel, at) {
        Ok(v) => v,
        Err(e) => return recv_fail(out, &format!("test failover of {}", a.vm()), e),
    };
    let cleanup = format!(
        "vdrep failover {} --cleanup --store {}",
        a.vm(),
        a.store.display()
    );
    exposed(a, out, &view, &cleanup)
}

/// Boot the exposed point if asked, and print what was exposed.
fn exposed(a: &FailoverArgs, mut out: Out, view: &ViewInfo, cleanup: &str) -> Out {
    let mut boot = None;
    if a.boot {
        let opts = BootOptions {
            accel: match a.accel.as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                _ => Accel::Auto,
            },
            memory: a.memory,
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            append: a.append.clone(),
        };
        match test::boot_vm(&opts, view) {
            Ok(b) => boot = Some(b),
            Err(e) => {
                return out.fail(1, format!(
                    "vdrep: the disks are exposed but the test VM did not start: {e}; remove the test failover with `{cleanup}`"
                ))
            }
        }
    }
    if a.json {
        let mut v = serde_json::to_value(view).unwrap_or_default();
        if let (Some(o), Some((pid, log))) = (v.as_object_mut(), &boot) {
            o.insert("qemu_pid".into(), (*pid).into());
            o.insert("serial_log".into(), log.display().to_string().into());
        }
        out.line(serde_json::to_string_pretty(&v).unwrap_or_default());
        return out;
    }
    out.err(format!(
        "{}: test failover of point {} ({} UTC); the VM's writes go to a scratch overlay",
        a.vm(),
        view.cycle,
        format_utc(view.time_unix_ns)
    ));
    for d in &view.disks {
        out.line(d.path.display().to_string());
    }
    if let Some((pid, log)) = boot {
        out.line(format!(
            "qemu pid {pid}, serial console log {}",
            log.display()
        ));
    }
    out.err(format!("remove it with: {cleanup}"));
    out
}

/// `--test` and `--cleanup` with `--store s3://…`: the view is served on
/// this machine from the bucket (crate::testview::bucket).
fn bucket_failover(a: &FailoverArgs, url: &StoreUrl) -> Out {
    let out = Out::default();
    let m = &a.mode;
    if a.domain.is_some() || !(m.test || m.cleanup || m.unplanned || m.commit) {
        return out.fail(
            2,
            format!(
                "vdrep: from an s3:// store, `failover --test`, `--unplanned`, `--commit` and `--cleanup` work (without --domain); for the rest, run it at a receiver's store folder ({url})"
            ),
        );
    }
    let root = a
        .cache
        .clone()
        .unwrap_or_else(|| super::objstore::default_cache(url));
    // The view process and a later --cleanup must agree on it.
    let root = match std::path::absolute(&root) {
        Ok(r) => r,
        Err(e) => return out.fail(2, format!("vdrep: --cache {}: {e}", root.display())),
    };
    let vm = a.vm();
    if m.cleanup || m.commit {
        let orphan = bucket::orphan_pin(&root, a.site.as_deref(), vm);
        let mut out = if m.cleanup {
            bucket_cleanup(a, out, &root)
        } else {
            bucket_commit(a, out, &root)
        };
        if let Some((site, pinner)) = orphan {
            // The view process died: release the pin it left, and on
            // --cleanup (an abandoned unplanned failover) its failover
            // record, which would hold the old primary off.
            let r = super::objstore::open_bucket(url, &a.s3)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    crate::objstore::pin::release(&b, &site, vm, &pinner)
                        .and_then(|_| match m.cleanup {
                            true => {
                                crate::objstore::failedover::remove(&b, &site, vm, Some(&pinner))
                            }
                            false => Ok(0),
                        })
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = r {
                out.err(format!(
                    "vdrep: the pin (or failover record) of {vm} in {url} was not released ({e}); a pin expires within {} h by itself, a failover record goes with `vdrep failover {vm} --cleanup` or `vdrep forget`",
                    crate::objstore::pin::PIN_TTL.as_secs() / 3600
                ));
            }
        }
        return out;
    }
    let (sel, at) = match point_and_place(a) {
        Ok(v) => v,
        Err(e) => return out.fail(2, e),
    };
    let v = BucketView {
        root: root.clone(),
        site: a.site.clone(),
        vm: vm.to_string(),
        sel,
        at,
        cache_bytes: a.cache_size,
        hydrate: m.unplanned.then_some(a.hydrate_rate.unwrap_or(0)),
    };
    let t0 = std::time::Instant::now();
    let view = match bucket::expose(&v, || {
        super::objstore::open_bucket(url, &a.s3)
            .map(std::sync::Arc::new)
            .map_err(crate::testview::ViewError::Io)
    }) {
        Ok(v) => v,
        Err(e) => return out.fail(1, format!("vdrep: test failover of {vm} from {url}: {e}")),
    };
    tracing::debug!("exposed in {:?}", t0.elapsed());
    let cleanup = format!(
        "vdrep failover {vm} --cleanup --store {url} --cache {}",
        root.display()
    );
    let mut out = exposed(a, out, &view, &cleanup);
    if !a.json {
        out.err(format!(
            "reads fetch from the bucket as they go: bytes fetched in {}",
            view.scratch.join(bucket::STATUS_FILE).display()
        ));
        if m.unplanned {
            out.err(format!(
                "the disks are copied to {} in the background (progress: `hydration` in {}); once complete, stop the VM and run `vdrep failover {vm} --commit --store {url} --cache {}` for local disks",
                bucket::hydrate_dir(&root, &view.site, vm).display(),
                view.scratch.join(bucket::STATUS_FILE).display(),
                root.display()
            ));
        }
    }
    out
}

/// `--commit --store s3://…` of an unplanned failover: once the hydration
/// is complete, stop the view (the VM must be stopped) and keep the local
/// disks with the VM's writes folded in.
fn bucket_commit(a: &FailoverArgs, out: Out, root: &Path) -> Out {
    let vm = a.vm();
    let st = match bucket::find(root, a.site.as_deref(), vm) {
        Ok((_, scratch)) => bucket::read_status(&scratch),
        Err(e) => return out.fail(1, format!("vdrep: commit of {vm}: {e}")),
    };
    match st.as_ref().and_then(|s| s.hydration.as_ref()) {
        None => {
            return out.fail(
                1,
                format!("vdrep: commit of {vm}: no unplanned failover from a bucket runs from {} (a test failover is removed with --cleanup)", root.display()),
            )
        }
        Some(h) if !h.complete => {
            return out.fail(
                1,
                format!(
                    "vdrep: commit of {vm}: refused: the disks are {} % hydrated ({} of {} bytes){}; wait until it is complete, nothing changed",
                    h.percent,
                    h.hydrated_bytes,
                    h.total_bytes,
                    h.error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
                ),
            )
        }
        Some(_) => {}
    }
    match bucket::stop(root, a.site.as_deref(), vm, true) {
        Err(e) => out.fail(1, format!("vdrep: commit of {vm}: {e}")),
        Ok((_, st, _)) => match st.committed {
            Some(bucket::Committed { disks, error: None }) => {
                let mut out = out;
                if a.json {
                    out.line(serde_json::to_string_pretty(&serde_json::json!({ "disks": disks })).unwrap_or_default());
                    return out;
                }
                out.err(format!("{vm}: unplanned failover committed: its local disks (start the VM on them):"));
                for d in disks {
                    out.line(d.display().to_string());
                }
                out
            }
            Some(bucket::Committed { error: Some(e), .. }) => out.fail(1, format!("vdrep: commit of {vm}: {e}")),
            None => out.fail(1, format!("vdrep: commit of {vm}: the view process stopped without committing (see its view.log)")),
        },
    }
}

/// `--cleanup --store s3://…`.
fn bucket_cleanup(a: &FailoverArgs, mut out: Out, root: &Path) -> Out {
    let vm = a.vm();
    let (view, st, notes) = match bucket::cleanup(root, a.site.as_deref(), vm) {
        Ok(v) => v,
        Err(e) => return out.fail(1, format!("vdrep: failover cleanup of {vm}: {e}")),
    };
    for n in &notes {
        out.err(format!("vdrep: {n}"));
    }
    if a.json {
        let v = serde_json::json!({ "view": view, "status": st });
        out.line(serde_json::to_string_pretty(&v).unwrap_or_default());
        return out;
    }
    let disks: u64 = view.disks.iter().map(|d| d.size).sum();
    out.line(format!(
        "{vm}: test failover of point {} removed ({} written by the test VM discarded); {} fetched from the bucket in {} objects ({:.1} % of the disks' {}), {} cache hits; cache removed",
        view.cycle,
        human(view.written_bytes),
        human(st.cache.fetched_bytes),
        st.cache.fetched_objects,
        st.cache.fetched_bytes as f64 * 100.0 / disks.max(1) as f64,
        human(disks),
        st.cache.hits
    ));
    out
}

fn say(s: &str) {
    eprintln!("vdrep: {s}");
}

/// `--planned`.
fn planned(a: &FailoverArgs) -> i32 {
    let vm = a.vm();
    let Some(reverse_to) = a.reverse_to.as_deref() else {
        eprintln!("vdrep: --planned needs --reverse-to HOST:PORT (this site's receiver, for replicating back)");
        return 2;
    };
    let domain = match &a.domain {
        None => None,
        Some(d) => match a
            .network_map
            .as_deref()
            .map(crate::failover::domain::parse_network_map)
            .transpose()
        {
            Ok(m) => Some(crate::roles::domain::DomainStart {
                name: d.clone(),
                network_map: m.unwrap_or_default().into_iter().collect(),
            }),
            Err(e) => {
                eprintln!("vdrep: --network-map: {e}");
                return 2;
            }
        },
    };
    let o = role_change::Planned {
        vm,
        dir: a.dir.as_deref(),
        store: &a.store,
        reverse_to,
        timeout: Duration::from_secs(a.timeout),
        domain,
        group: None,
    };
    let done = match &o.domain {
        None => role_change::planned(&o, &say).map(|r| (r, None)),
        Some(_) => crate::failover::domain::planned(
            &crate::libvirt::Virsh::new(),
            &o,
            Duration::from_secs(a.shutdown_timeout),
            &say,
        )
        .map(|p| (p.report, Some(p.stopped))),
    };
    match done {
        Ok((r, stopped)) => {
            for w in &r.warnings {
                eprintln!("vdrep: warning: {w}");
            }
            if a.json {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                if let (Some(o), Some(st)) = (v.as_object_mut(), stopped) {
                    o.insert(
                        "stopped".into(),
                        serde_json::to_value(st).unwrap_or_default(),
                    );
                }
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "{vm}: planned failover done: nothing lost (recovery point {}, {} blocks verified equal); now live at {} in {}, replicating back to this site",
                    r.cycle,
                    r.verified_blocks,
                    r.peer,
                    r.live_dir.display()
                );
                if let Some(d) = &r.domain {
                    println!("{vm}: domain {d} started at {}", r.peer);
                }
                for d in &r.live_disks {
                    println!("{}", d.display());
                }
            }
            0
        }
        Err(e) => {
            eprintln!("vdrep: planned failover of {vm} failed: {e}");
            match e.kind() {
                FailoverErrorKind::Refused | FailoverErrorKind::Invalid => 2,
                _ => 1,
            }
        }
    }
}

/// `--cancel`.
fn cancel(a: &FailoverArgs) -> i32 {
    let vm = a.vm();
    if let Some(d) = &a.domain {
        let virsh = crate::libvirt::Virsh::new();
        match crate::failover::domain::remove_failed_over(&virsh, d, &a.store.join("live")) {
            Ok(true) => println!("{vm}: domain {d} destroyed and undefined"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("vdrep: cancel of the failover of {vm}: {e}");
                return 1;
            }
        }
    }
    match role_change::cancel(&a.store, a.site.as_deref(), vm) {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "{vm}: failover cancelled: {} written on the failed-over disks undone, {} stopped; the replica is back at its newest point {} with its {} recovery point(s) as before; replication from the original primary resumes (re-protect it there if it went Critical)",
                    human(r.undone_bytes),
                    r.dir.display(),
                    r.points.last().map_or(r.cycle, |p| p.cycle),
                    r.points.len()
                );
            }
            0
        }
        Err(e) => {
            eprintln!("vdrep: cancel of the failover of {vm}: {e}");
            1
        }
    }
}

/// `--commit`.
fn commit(a: &FailoverArgs) -> i32 {
    let vm = a.vm();
    match role_change::commit(&a.store, a.site.as_deref(), vm, &say) {
        Ok(l) => {
            println!(
                "{vm}: failover committed; live at {} from point {}; the history before it was dropped",
                l.dir.display(),
                l.cycle
            );
            0
        }
        Err(e) => {
            eprintln!("vdrep: commit of {vm}: {e}");
            1
        }
    }
}

/// `--unplanned [--point P]`.
fn unplanned(store: &Path, site: Option<&str>, vm: &str, point: Option<&str>, json: bool) -> Out {
    let mut out = Out::default();
    let point = match role_change::resolve_point(store, site, vm, point) {
        Ok(p) => p,
        Err(e) => return out.fail(2, format!("vdrep: --point: {e}")),
    };
    match role_change::unplanned(store, site, vm, point) {
        Ok(l) => {
            if json {
                out.line(serde_json::to_string_pretty(&l).unwrap_or_default());
            } else {
                out.line(format!(
                    "{vm}: unplanned failover to point {}: live (tracked, not yet protected) in {}",
                    l.cycle,
                    l.dir.display()
                ));
                for d in &l.disks {
                    out.line(d.path.display().to_string());
                }
                out.err(format!(
                    "vdrep: start the VM on these disks; when the old primary is back run `vdrep reverse {vm}` there; `vdrep failover {vm} --commit` makes this final"
                ));
            }
            out
        }
        Err(e) => out.fail(1, format!("vdrep: unplanned failover of {vm} failed: {e}")),
    }
}

/// `vdrep reverse NAME --dir DIR --store STORE --reverse-to ADDR`.
pub fn reverse(vm: &str, dir: &Path, store: &Path, reverse_to: &str) -> i32 {
    let o = role_change::Reverse {
        vm,
        dir,
        store,
        reverse_to,
    };
    match role_change::reverse(&o, &say) {
        Ok((peer, live)) => {
            println!(
                "{vm}: reverse replication started: {peer} (live in {}) replicates back to this site; the first cycle is a checksum resync",
                live.dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("vdrep: reverse of {vm} failed: {e}");
            1
        }
    }
}

/// How `vdrep plan failover` fails a VM over (as `vdrep failover VM` with
/// the same mode would, in this process; a domain as `--domain VM`) and
/// waits for a domain (its guest agent, or the group's `wait_for`).
struct PlanActions<'a> {
    store: &'a Path,
    test: bool,
    cleanup: bool,
}

impl Actions for PlanActions<'_> {
    fn fail_over(&self, g: &Group, vm: &str, domain: bool) -> (bool, String) {
        let store = self.store;
        let out = if domain {
            let mut a = FailoverArgs::test_of(vm, store);
            a.domain = Some(vm.to_string());
            a.network_map = g.network_map.clone();
            a.mode.test = self.test && !self.cleanup;
            a.mode.cleanup = self.cleanup;
            a.mode.unplanned = !self.test;
            if self.cleanup {
                super::domain::cleanup_out(&a, vm)
            } else if self.test {
                super::domain::test_out(&a, vm)
            } else {
                super::domain::unplanned_out(&a, vm)
            }
        } else if self.cleanup {
            self::cleanup(store, None, vm)
        } else if self.test {
            test_failover(&FailoverArgs::test_of(vm, store))
        } else {
            unplanned(store, None, vm, None, false)
        };
        if out.code == 0 {
            (true, out.stdout)
        } else {
            (false, out.stderr)
        }
    }

    fn waits(&self) -> bool {
        !self.cleanup
    }

    fn ready(&self, g: &Group, domain: &str, left: Duration) -> Result<String, FailoverError> {
        let name = if self.test {
            crate::failover::domain::test_name(domain)
        } else {
            domain.to_string()
        };
        let how = match &g.wait_for {
            Some(c) => Readiness::Command(c.clone()),
            None => Readiness::Agent,
        };
        crate::failover::ready::wait(&crate::libvirt::Virsh::new(), &name, &how, None, left)
    }
}

/// Per group of a plan's report: when it started, when its domains were
/// all ready, and each domain's ready time (seconds since the plan began).
fn plan_groups(groups: &[Group], steps: &[Step]) -> serde_json::Value {
    let mut out = Vec::new();
    for g in groups {
        let mine: Vec<&Step> = steps.iter().filter(|s| s.group == g.name).collect();
        let Some(first) = mine.first() else { continue };
        let ready: Vec<&&Step> = mine.iter().filter(|s| s.phase == Phase::Ready).collect();
        let all_ready =
            !g.domains.is_empty() && ready.len() == g.domains.len() && ready.iter().all(|s| s.ok);
        let vms: Vec<serde_json::Value> = g
            .domains
            .iter()
            .map(|d| {
                let fo = mine
                    .iter()
                    .find(|s| s.phase == Phase::Failover && &s.what == d);
                let r = ready.iter().find(|s| &s.what == d);
                serde_json::json!({
                    "vm": d,
                    "started_at": fo.map(|s| s.ended_at),
                    "ready": r.is_some_and(|s| s.ok),
                    "ready_at": r.filter(|s| s.ok).map(|s| s.ended_at),
                    "ready_seconds": r.filter(|s| s.ok).map(|s| s.seconds),
                    "error_kind": r.and_then(|s| s.error_kind),
                })
            })
            .collect();
        out.push(serde_json::json!({
            "group": g.name,
            "started_at": first.started_at,
            "ready_at": if all_ready {
                ready.iter().map(|s| s.ended_at).reduce(f64::max)
            } else {
                None
            },
            "domains": vms,
        }));
    }
    serde_json::Value::Array(out)
}

/// `vdrep plan failover PLAN --store S (--test [--cleanup] | --unplanned)`:
/// run and report; exit status 0 only if every group ran and every step
/// succeeded. Each VM is failed over as `vdrep failover VM` with the same
/// mode would, in this process; its step keeps what that prints on stdout
/// (or on stderr if it failed). A group's domains are waited for until
/// ready before the next group starts.
pub fn plan(plan: &Path, store: &Path, test: bool, cleanup: bool, json: bool) -> i32 {
    let mode = if cleanup {
        "cleanup"
    } else if test {
        "test"
    } else {
        "unplanned"
    };
    let act = PlanActions {
        store,
        test,
        cleanup,
    };
    let text = match std::fs::read_to_string(plan) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vdrep: cannot read the plan {}: {e}", plan.display());
            return 2;
        }
    };
    let groups = match parse(plan, &text) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vdrep: {e}");
            return 2;
        }
    };
    let total: usize = groups.iter().map(|g| g.all_vms().len()).sum();
    let steps = run(&groups, mode, &act, &|s| {
        if !json {
            eprintln!(
                "[{}] {}{} {} ({:.1}s){}",
                s.group,
                s.what,
                if s.phase == Phase::Ready {
                    " ready"
                } else {
                    ""
                },
                if s.ok { "ok" } else { "FAILED" },
                s.seconds,
                if s.ok {
                    String::new()
                } else {
                    format!(": {}", s.output)
                }
            );
        }
    });
    let vms_ok = steps
        .iter()
        .filter(|s| s.ok && s.phase == Phase::Failover)
        .count();
    let all = vms_ok == total && steps.iter().all(|s| s.ok);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": all,
                "steps": steps,
                "groups": plan_groups(&groups, &steps),
            }))
            .unwrap_or_default()
        );
    } else {
        println!(
            "plan {}: {vms_ok}/{total} VMs failed over ({mode})",
            plan.display()
        );
        for s in steps.iter().filter(|s| s.ok && s.phase == Phase::Failover) {
            for l in s.output.lines() {
                println!("{}: {l}", s.what);
            }
        }
        for s in steps.iter().filter(|s| s.phase == Phase::Ready) {
            if s.ok {
                println!("{}: ready: {}", s.what, s.output);
            } else {
                println!("{}: NOT READY: {}", s.what, s.output);
            }
        }
        let skipped: Vec<&str> = groups
            .iter()
            .filter(|g| !steps.iter().any(|s| s.group == g.name))
            .map(|g| g.name.as_str())
            .collect();
        if !skipped.is_empty() {
            println!("not run (an earlier group failed): {}", skipped.join(", "));
        }
    }
    if all {
        0
    } else {
        1
    }
}
