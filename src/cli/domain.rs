//! The libvirt parts of the command line: `protect --domain` (the disks
//! of a domain, checked) and `failover --domain` (`--test`, `--cleanup`,
//! `--unplanned`): arguments to [`crate::failover::domain`], results printed.

use std::path::PathBuf;

use super::failover::{FailoverArgs, Out};
use super::fmt::human;
use crate::daemon::control;
use crate::failover::domain::{self as fd, DefinitionFrom};
use crate::failover::ready::Readiness;
use crate::failover::{role_change, FailoverError, FailoverErrorKind};
use crate::libvirt::Virsh;
use crate::testview::{format_utc, PointSel};
use crate::util::steps::Steps;

/// The exit code of a failed domain failover: 2 for a refusal or a bad
/// argument (nothing changed), 1 otherwise.
fn fail(what: &str, e: &FailoverError) -> i32 {
    failed(Out::default(), what, e).show()
}

/// [`fail`] into `out` (a recovery plan keeps it per VM).
fn failed(out: Out, what: &str, e: &FailoverError) -> Out {
    let code = match e.kind() {
        FailoverErrorKind::Refused | FailoverErrorKind::Invalid | FailoverErrorKind::NotRunning => {
            2
        }
        _ => 1,
    };
    out.fail(code, format!("vdrep: {what}: {e}"))
}

/// The disk files of domain `domain` that `vdrep protect` replicates, and
/// warnings; refused (exit code 2 after the message) for a domain that does
/// not exist or a disk that is not a file under a running `vdrep mount`
/// ([`fd::protect_disks`]).
pub fn protect_disks(domain: &str) -> Result<(Vec<PathBuf>, Vec<String>), i32> {
    fd::protect_disks(&Virsh::new(), domain, &|f| control::mount_of(f).is_some())
        .map_err(|e| fail(&format!("cannot protect domain {domain}"), &e))
}

/// `timing` of a domain failover's `--json`: each step from the command's
/// start to `virsh start` returning (the first step includes the start of
/// the process and the parsing of the command line).
fn timing(steps: &Steps) -> serde_json::Value {
    serde_json::to_value(steps).unwrap_or_default()
}

fn definition_from(a: &FailoverArgs, domain: &str) -> DefinitionFrom {
    match &a.definition {
        Some(f) => DefinitionFrom::File(f.clone()),
        None => DefinitionFrom::Point(domain.to_string()),
    }
}

/// `failover --domain D --test [--point P] [--at DIR]`.
pub fn test(a: &FailoverArgs, domain: &str) -> i32 {
    test_out(a, domain).show()
}

/// [`test`], its output kept.
pub(super) fn test_out(a: &FailoverArgs, domain: &str) -> Out {
    let mut out = Out::default();
    let point = match a.point.as_deref().map(PointSel::parse).transpose() {
        Ok(s) => s.unwrap_or(PointSel::Latest),
        Err(e) => return out.fail(2, format!("vdrep: --point: {e}")),
    };
    let at = match &a.at {
        Some(p) if p.is_relative() => std::env::current_dir().ok().map(|d| d.join(p)),
        other => other.clone(),
    };
    let from = definition_from(a, domain);
    let o = fd::TestOptions {
        store: &a.store,
        site: a.site.clone(),
        vm: a.vm(),
        point,
        at,
        definition: &from,
        network: &a.test_network,
    };
    let mut steps = Steps::since(super::started());
    let (view, t) = match fd::test_failover(&Virsh::new(), &o, &mut steps) {
        Ok(v) => v,
        Err(e) => return failed(out, &format!("test failover of domain {domain}"), &e),
    };
    if a.json {
        let mut v = serde_json::to_value(&view).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "domain".into(),
                serde_json::to_value(&t).unwrap_or_default(),
            );
            o.insert("timing".into(), timing(&steps));
        }
        out.line(serde_json::to_string_pretty(&v).unwrap_or_default());
        return out;
    }
    out.err(format!(
        "{}: test failover of point {} ({} UTC): domain {} started on the isolated network {}{}; its writes go to a scratch overlay",
        a.vm(),
        view.cycle,
        format_utc(view.time_unix_ns),
        t.domain,
        t.network,
        if t.network_created { " (created)" } else { "" }
    ));
    for d in &view.disks {
        out.line(d.path.display().to_string());
    }
    out.line(format!(
        "domain {}, serial console log {}",
        t.domain,
        t.console_log.display()
    ));
    out.err(format!(
        "remove it with: vdrep failover {} --cleanup --domain {domain} --store {}",
        a.vm(),
        a.store.display()
    ));
    out
}

/// `failover --domain D --cleanup`: the test copy, then the view.
pub fn cleanup(a: &FailoverArgs, domain: &str) -> i32 {
    cleanup_out(a, domain).show()
}

/// [`cleanup`], its output kept.
pub(super) fn cleanup_out(a: &FailoverArgs, domain: &str) -> Out {
    let mut out = Out::default();
    let removed = match fd::cleanup_test_copy(&Virsh::new(), domain) {
        Ok(r) => r,
        Err(e) => return failed(out, &format!("cleanup of the test copy of {domain}"), &e),
    };
    if let Some(n) = removed {
        out.line(format!(
            "{}: test domain {n} destroyed and undefined",
            a.vm()
        ));
    }
    match crate::failover::test::cleanup(&a.store, a.site.clone(), a.vm()) {
        Ok((view, warnings)) => {
            for w in &warnings {
                out.err(format!("vdrep: {w}"));
            }
            if let Some(v) = view {
                out.line(format!(
                    "{}: test failover of point {} removed ({} written by the test VM discarded)",
                    a.vm(),
                    v.cycle,
                    human(v.written_bytes)
                ));
            }
            out
        }
        Err(e) => failed(out, &format!("failover cleanup of {}", a.vm()), &e),
    }
}

/// `failover --domain D --unplanned [--point P] [--network-map MAP]`.
pub fn unplanned(a: &FailoverArgs, domain: &str) -> i32 {
    unplanned_out(a, domain).show()
}

/// [`unplanned`], its output kept.
pub(super) fn unplanned_out(a: &FailoverArgs, domain: &str) -> Out {
    let mut out = Out::default();
    let vm = a.vm();
    let map = match a
        .network_map
        .as_deref()
        .map(fd::parse_network_map)
        .transpose()
    {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return failed(out, "--network-map", &e),
    };
    let point =
        match role_change::resolve_point(&a.store, a.site.as_deref(), vm, a.point.as_deref()) {
            Ok(p) => p,
            Err(e) => return out.fail(2, format!("vdrep: --point: {e}")),
        };
    let from = definition_from(a, domain);
    let o = fd::UnplannedOptions {
        store: &a.store,
        site: a.site.as_deref(),
        vm,
        point,
        definition: &from,
        network_map: &map,
    };
    let mut steps = Steps::since(super::started());
    match fd::unplanned(&Virsh::new(), &o, &mut steps) {
        Ok((live, name)) => {
            if a.json {
                let mut v = serde_json::to_value(&live).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("domain".into(), name.into());
                    o.insert("timing".into(), timing(&steps));
                }
                out.line(serde_json::to_string_pretty(&v).unwrap_or_default());
                return out;
            }
            out.line(format!(
                "{vm}: unplanned failover to point {}: domain {name} started on the live disks in {}",
                live.cycle,
                live.dir.display()
            ));
            for d in &live.disks {
                out.line(d.path.display().to_string());
            }
            out.err(format!(
                "vdrep: when the old primary is back run `vdrep reverse {vm}` there; `vdrep failover {vm} --commit` makes this final"
            ));
            out
        }
        Err(e) => failed(out, &format!("unplanned failover of domain {domain}"), &e),
    }
}

/// How `verify --boot` or a plan decides a domain is ready: `--marker`
/// (a console marker), else `--wait-for` (a command), else the guest agent.
pub fn readiness(marker: Option<&str>, wait_for: Option<&str>) -> Readiness {
    match (marker, wait_for) {
        (Some(m), _) => Readiness::Marker(m.to_string()),
        (None, Some(c)) => Readiness::Command(c.to_string()),
        (None, None) => Readiness::Agent,
    }
}

/// `vdrep verify --boot DOMAIN --store S [--site SITE] [--point P]
/// [--marker M | --wait-for CMD]`.
pub fn verify_boot(
    domain: &str,
    store: &std::path::Path,
    site: Option<String>,
    point: Option<&str>,
    how: &Readiness,
    timeout: u64,
    json: bool,
) -> i32 {
    let point = match point.map(PointSel::parse).transpose() {
        Ok(s) => s.unwrap_or(PointSel::Latest),
        Err(e) => {
            eprintln!("vdrep: --point: {e}");
            return 2;
        }
    };
    let from = DefinitionFrom::Point(domain.to_string());
    let o = fd::TestOptions {
        store,
        site,
        vm: domain,
        point,
        at: None,
        definition: &from,
        network: fd::TEST_NETWORK,
    };
    let t = std::time::Duration::from_secs(timeout);
    match fd::verify_boot(&Virsh::new(), &o, how, t) {
        Ok(c) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
            } else if c.verified {
                println!(
                    "{domain}: point {} booted: ready ({how}) after {:.1} s",
                    c.cycle, c.secs
                );
            } else {
                println!("{domain}: point {} FAILED to boot: {}", c.cycle, c.detail);
            }
            i32::from(!c.verified)
        }
        Err(e) => fail(&format!("boot verification of {domain}"), &e),
    }
}
