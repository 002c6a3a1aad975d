//! Recovery plans: VMs failed over in ordered groups, with optional
//! scripts before and after each group (`vdrep plan failover PLAN`).
//!
//! A plan is a TOML file (documented in `doc/CONFIG.md`, *Recovery plans*):
//!
//! ```toml
//! # groups run in file order
//! [[group]]
//! name = "database"
//! pre  = "/etc/vdrep/stop-app.sh"       # run with sh -c before the group
//! vms  = ["db1", "db2"]                 # failed over in this order
//! post = "/etc/vdrep/check-db.sh"
//!
//! [[group]]
//! name = "web"
//! vms  = ["web1", "web2"]
//!
//! [[group]]
//! name = "app"
//! domains = ["app1"]                    # libvirt domains: started, then waited for
//! wait_for = "/etc/vdrep/app-up.sh"     # ready when this succeeds (default: guest-ping)
//! ready_timeout = 300                   # seconds (default 300)
//! network_map = "br0=br-dr"             # --unplanned: NICs of its domains remapped
//! ```
//!
//! Unknown keys are refused; every problem names FILE:LINE: KEY.
//!
//! Groups run in file order. Scripts get `VDREP_PLAN_GROUP`,
//! `VDREP_PLAN_VMS` and `VDREP_PLAN_MODE` in their environment. A failing
//! `pre` script skips its group; a VM that fails does not stop the others
//! of its group, but the plan stops before the next group (later groups
//! usually depend on earlier ones). Every VM gets a line in the report.
//!
//! A group's `domains` are failed over as libvirt domains (the domain
//! started), after its `vms`; the group is done only when every one of
//! them is **ready**: its guest agent answers `guest-ping`, or the group's
//! `wait_for` command succeeds (retried until `ready_timeout`, counted
//! from the end of the group's failovers). A domain that is not ready in
//! time fails the group (a typed [`super::FailoverErrorKind::NotReady`],
//! naming the domain), so the next group never starts before the VMs it
//! depends on are up.
//!
//! What failing one VM over means is the caller's: [`run`] takes it as a
//! function (the command line passes `vdrep failover VM --test` etc., run
//! in this process).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

/// Why a plan file was refused: FILE:LINE: KEY: what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {key}: {msg}", file.display())]
pub struct PlanError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// Dotted key, e.g. `group[1].vms` (empty for a TOML syntax error).
    pub key: String,
    pub kind: PlanErrorKind,
    pub msg: String,
}

/// The kinds of [`PlanError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanErrorKind {
    /// Not TOML, an unknown key, a missing key or a value of the wrong
    /// type (also: the old INI format).
    Syntax,
    /// No group at all.
    Empty,
    /// A value out of its allowed range (empty or duplicate group name,
    /// no VMs, a VM name that is not one path component).
    Invalid,
}

impl PlanError {
    pub fn kind(&self) -> PlanErrorKind {
        self.kind
    }
}

/// The default of a group's `ready_timeout`, seconds.
pub const READY_TIMEOUT: u64 = 300;

/// One group of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub name: String,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub vms: Vec<String>,
    /// libvirt domains (each also the VM's name), failed over after `vms`
    /// and waited for until ready.
    pub domains: Vec<String>,
    /// Readiness command (`sh -c`, retried); `None`: the guest agent.
    pub wait_for: Option<String>,
    /// Seconds the group's domains get to become ready.
    pub ready_timeout: u64,
    /// The network map of its domains' unplanned failover (`FROM=TO,...`,
    /// as `failover --network-map`); `None`: the point's networks.
    pub network_map: Option<String>,
}

impl Group {
    /// Every VM of the group in failover order (`vms`, then `domains`).
    pub fn all_vms(&self) -> Vec<String> {
        self.vms.iter().chain(&self.domains).cloned().collect()
    }
}

/// The file as TOML gives it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    pre: Option<String>,
    post: Option<String>,
    #[serde(default)]
    vms: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    domains: Option<Spanned<Vec<Spanned<String>>>>,
    wait_for: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<u64>>,
    network_map: Option<Spanned<String>>,
}

/// 1-based line of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parse the text of the plan file `file`. Errors name FILE:LINE: KEY.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Group>, PlanError> {
    let err = |offset: usize, key: String, kind, msg: String| PlanError {
        file: file.to_path_buf(),
        line: line_of(text, offset),
        key,
        kind,
        msg,
    };
    let raw: RawPlan = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let old = text.lines().any(|l| l.trim_start().starts_with("[group "));
        let msg = if old {
            "plans are TOML now: write each group as [[group]] with name = \"NAME\", vms = [\"VM\", ...], and optional pre/post = \"CMD\"".to_string()
        } else {
            e.message().to_string()
        };
        err(at, String::new(), PlanErrorKind::Syntax, msg)
    })?;
    if raw.group.is_empty() {
        return Err(err(
            0,
            "group".into(),
            PlanErrorKind::Empty,
            "the plan has no [[group]]".into(),
        ));
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, g) in raw.group.into_iter().enumerate() {
        let name = g.name.get_ref().trim();
        let key = |k: &str| format!("group[{i}].{k}");
        if name.is_empty() {
            return Err(err(
                g.name.span().start,
                key("name"),
                PlanErrorKind::Invalid,
                "the group needs a name".into(),
            ));
        }
        if groups.iter().any(|x| x.name == name) {
            return Err(err(
                g.name.span().start,
                key("name"),
                PlanErrorKind::Invalid,
                format!("group {name:?} is defined twice"),
            ));
        }
        let empty = |l: &Option<Spanned<Vec<Spanned<String>>>>| {
            l.as_ref().is_none_or(|v| v.get_ref().is_empty())
        };
        if empty(&g.vms) && empty(&g.domains) {
            let at = g
                .vms
                .as_ref()
                .or(g.domains.as_ref())
                .map_or(g.name.span().start, |v| v.span().start);
            return Err(err(
                at,
                key(if g.vms.is_some() || g.domains.is_none() { "vms" } else { "domains" }),
                PlanErrorKind::Invalid,
                format!("group {name:?} lists no VMs: vms = [\"VM\", ...] or domains = [\"DOMAIN\", ...]"),
            ));
        }
        let mut lists: [Vec<String>; 2] = Default::default();
        for (list, field, out) in [(&g.vms, "vms", 0), (&g.domains, "domains", 1)] {
            for vm in list.iter().flat_map(|l| l.get_ref()) {
                crate::wire::safe_component(vm.get_ref()).map_err(|e| {
                    err(
                        vm.span().start,
                        key(field),
                        PlanErrorKind::Invalid,
                        format!("VM name {:?}: {e}", vm.get_ref()),
                    )
                })?;
                lists[out].push(vm.get_ref().clone());
            }
        }
        let [vms, domains] = lists;
        for (what, span) in [
            ("wait_for", g.wait_for.as_ref().map(Spanned::span)),
            ("ready_timeout", g.ready_timeout.as_ref().map(Spanned::span)),
            ("network_map", g.network_map.as_ref().map(Spanned::span)),
        ] {
            if let (Some(span), true) = (span, domains.is_empty()) {
                return Err(err(
                    span.start,
                    key(what),
                    PlanErrorKind::Invalid,
                    format!("group {name:?} has no domains: {what} applies to domains = [...]"),
                ));
            }
        }
        if let Some(m) = &g.network_map {
            super::domain::parse_network_map(m.get_ref()).map_err(|e| {
                err(
                    m.span().start,
                    key("network_map"),
                    PlanErrorKind::Invalid,
                    e.to_string().replace("--network-map: ", ""),
                )
            })?;
        }
        let wait_for = match g.wait_for {
            Some(w) if w.get_ref().trim().is_empty() => {
                return Err(err(
                    w.span().start,
                    key("wait_for"),
                    PlanErrorKind::Invalid,
                    "an empty command: leave wait_for out to wait for the guest agent".into(),
                ))
            }
            w => w.map(|w| w.into_inner()),
        };
        let ready_timeout = match g.ready_timeout {
            Some(t) if *t.get_ref() == 0 => {
                return Err(err(
                    t.span().start,
                    key("ready_timeout"),
                    PlanErrorKind::Invalid,
                    "0 s: give the domains seconds to boot (default 300)".into(),
                ))
            }
            t => t.map_or(READY_TIMEOUT, |t| t.into_inner()),
        };
        groups.push(Group {
            name: name.to_string(),
            pre: g.pre,
            post: g.post,
            vms,
            domains,
            wait_for,
            ready_timeout,
            network_map: g.network_map.map(Spanned::into_inner),
        });
    }
    Ok(groups)
}

/// What a [`Step`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The group's `pre` script.
    Pre,
    /// Failing one VM (or domain) over.
    Failover,
    /// Waiting until a domain is ready.
    Ready,
    /// The group's `post` script.
    Post,
}

/// The outcome for one VM, one domain's readiness, or one script.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub group: String,
    /// The VM (or domain), or `pre`/`post` for a script.
    pub what: String,
    pub phase: Phase,
    /// A libvirt domain (the group's `domains`).
    pub domain: bool,
    pub ok: bool,
    /// When the step began and ended, seconds since the plan started (the
    /// order of events: a group's first step begins after the previous
    /// group's last `ready` ended).
    pub started_at: f64,
    pub ended_at: f64,
    pub seconds: f64,
    /// What the step printed (the exposed disk paths for a VM), or why it failed.
    pub output: String,
    /// The kind of a failed readiness wait (`not_ready`; `refused` if the
    /// domain cannot be asked at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
}

impl Step {
    /// A step of `g` that began at `t` (plan time `t0`).
    fn new(g: &Group, what: &str, phase: Phase, t0: Instant, t: Instant) -> Step {
        Step {
            group: g.name.clone(),
            what: what.to_string(),
            phase,
            domain: g.domains.iter().any(|d| d == what),
            ok: false,
            started_at: (t - t0).as_secs_f64(),
            ended_at: 0.0,
            seconds: 0.0,
            output: String::new(),
            error_kind: None,
        }
    }

    /// It ended now, `ok`, with `output`.
    fn ended(mut self, t0: Instant, ok: bool, output: &str) -> Step {
        self.ended_at = t0.elapsed().as_secs_f64();
        self.seconds = self.ended_at - self.started_at;
        self.ok = ok;
        self.output = output.trim().to_string();
        self
    }
}

/// How a plan fails one VM over and waits for a domain: the caller's
/// ([`run`]).
pub trait Actions {
    /// Fail `vm` of group `g` over (as a libvirt domain if `domain`, with
    /// the group's `network_map`): whether it worked, and what it printed
    /// or why it failed.
    fn fail_over(&self, g: &Group, vm: &str, domain: bool) -> (bool, String);
    /// Whether started domains are waited for (not when removing test
    /// failovers).
    fn waits(&self) -> bool {
        true
    }
    /// Wait until the failed-over domain `domain` of group `g` is ready,
    /// for at most `left`; what answered (e.g. `guest-ping`), or why not.
    fn ready(
        &self,
        g: &Group,
        domain: &str,
        left: std::time::Duration,
    ) -> Result<String, super::FailoverError>;
}

/// Run `groups`, failing each VM over and waiting for each domain with
/// `act`. `mode` is for the scripts' environment; `log` sees every step
/// as it ends.
pub fn run(groups: &[Group], mode: &str, act: &dyn Actions, log: &dyn Fn(&Step)) -> Vec<Step> {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let push = |s: Step, steps: &mut Vec<Step>| -> bool {
        log(&s);
        let ok = s.ok;
        steps.push(s);
        ok
    };
    for g in groups {
        let env = [
            ("VDREP_PLAN_GROUP", g.name.clone()),
            ("VDREP_PLAN_VMS", g.all_vms().join(" ")),
            ("VDREP_PLAN_MODE", mode.to_string()),
        ];
        let script = |phase: Phase, cmd: &str| -> Step {
            let what = if phase == Phase::Pre { "pre" } else { "post" };
            let s = Step::new(g, what, phase, t0, Instant::now());
            let out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output();
            let (ok, output) = match out {
                Ok(o) => (
                    o.status.success(),
                    format!(
                        "{}{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr),
                        if o.status.success() {
                            String::new()
                        } else {
                            format!("({cmd}: {})", o.status)
                        }
                    ),
                ),
                Err(e) => (false, format!("cannot run {cmd}: {e}")),
            };
            s.ended(t0, ok, &output)
        };
        if let Some(pre) = &g.pre {
            if !push(script(Phase::Pre, pre), &mut steps) {
                return steps;
            }
        }
        let mut all_ok = true;
        let mut started = Vec::new();
        for vm in g.all_vms() {
            let domain = g.domains.contains(&vm);
            let s = Step::new(g, &vm, Phase::Failover, t0, Instant::now());
            let (ok, output) = act.fail_over(g, &vm, domain);
            all_ok &= push(s.ended(t0, ok, &output), &mut steps);
            if ok && domain && act.waits() {
                started.push(vm);
            }
        }
        // The group's domains, each until ready (one deadline for all);
        // not if a failover of the group failed: the plan stops anyway.
        let deadline = Instant::now() + std::time::Duration::from_secs(g.ready_timeout);
        let wait = if all_ok { &started[..] } else { &[] };
        for d in wait {
            let s = Step::new(g, d, Phase::Ready, t0, Instant::now());
            let left = deadline.saturating_duration_since(Instant::now());
            let s = match act.ready(g, d, left) {
                Ok(how) => s.ended(t0, true, &how),
                Err(e) => {
                    let mut s = s.ended(t0, false, &e.to_string());
                    s.error_kind = Some(e.kind().as_str());
                    s
                }
            };
            all_ok &= push(s, &mut steps);
        }
        if let Some(post) = &g.post {
            all_ok &= push(script(Phase::Post, post), &mut steps);
        }
        if !all_ok {
            break;
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Group>, PlanError> {
        parse(Path::new("/etc/vdrep/dr.plan"), text)
    }

    #[test]
    fn parses_groups_and_rejects_bad_plans() {
        let g = p(
            "# plan\n[[group]]\nname = \"db\"\npre = \"echo hi\" # note\nvms = [\"db1\", \"db2\"]\n\n[[group]]\nname = \"web\"\nvms = [\"w1\"]\npost=\"true\"\n",
        )
        .unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "db");
        assert_eq!(g[0].pre.as_deref(), Some("echo hi"));
        assert_eq!(g[0].vms, vec!["db1", "db2"]);
        assert_eq!(g[1].post.as_deref(), Some("true"));
        use PlanErrorKind as K;
        let g = "[[group]]\nname = \"a\"\n";
        for (bad, kind, line, key) in [
            ("", K::Empty, 1, "group"),
            ("vms = [\"a\"]", K::Syntax, 1, ""),
            ("[[group]]\nvms = [\"a\"]", K::Syntax, 1, ""),
            (g, K::Invalid, 2, "group[0].vms"),
            (
                "[[group]]\nname = \" \"\nvms = [\"a\"]",
                K::Invalid,
                2,
                "group[0].name",
            ),
            (&format!("{g}vms = []"), K::Invalid, 3, "group[0].vms"),
            (
                &format!("{g}vms = [\"a\",\n \"../x\"]"),
                K::Invalid,
                4,
                "group[0].vms",
            ),
            (
                &format!("{g}vms = [\"a\"]\n{g}vms = [\"b\"]"),
                K::Invalid,
                5,
                "group[1].name",
            ),
            (&format!("{g}foo = 1\nvms = [\"a\"]"), K::Syntax, 3, ""),
            (&format!("{g}vms = \"a b\""), K::Syntax, 3, ""),
            ("[group a]\nvms = a", K::Syntax, 1, ""),
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(
                (e.kind(), e.line, e.key.as_str()),
                (kind, line, key),
                "{bad:?}: {e}"
            );
            assert_eq!(e.file, Path::new("/etc/vdrep/dr.plan"));
        }
        let old = p("[group a]\nvms = a").unwrap_err();
        assert!(old.msg.contains("[[group]]"), "{old}");
    }

    #[test]
    fn domains_wait_for_and_ready_timeout_parse_and_bad_values_name_their_key() {
        let g = p("[[group]]\nname = \"db\"\ndomains = [\"db1\"]\nwait_for = \"nc -z db1 5432\"\nready_timeout = 60\n\n[[group]]\nname = \"web\"\nvms = [\"w0\"]\ndomains = [\"w1\"]\n")
            .unwrap();
        assert_eq!(g[0].domains, vec!["db1"]);
        assert!(g[0].vms.is_empty());
        assert_eq!(g[0].wait_for.as_deref(), Some("nc -z db1 5432"));
        assert_eq!(g[0].ready_timeout, 60);
        assert_eq!(g[1].ready_timeout, READY_TIMEOUT);
        assert_eq!(g[1].all_vms(), vec!["w0", "w1"]);
        assert_eq!(g[0].network_map, None);
        let m = p("[[group]]\nname = \"db\"\ndomains = [\"db1\"]\nnetwork_map = \"br0=br-dr, default=dr-net\"\n")
            .unwrap();
        assert_eq!(
            m[0].network_map.as_deref(),
            Some("br0=br-dr, default=dr-net")
        );
        use PlanErrorKind as K;
        let h = "[[group]]\nname = \"a\"\n";
        for (bad, kind, line, key) in [
            (
                format!("{h}domains = []"),
                K::Invalid,
                3,
                "group[0].domains",
            ),
            (
                format!("{h}vms = []\ndomains = []"),
                K::Invalid,
                3,
                "group[0].vms",
            ),
            (
                format!("{h}domains = [\"../x\"]"),
                K::Invalid,
                3,
                "group[0].domains",
            ),
            (
                format!("{h}vms = [\"a\"]\nwait_for = \"true\""),
                K::Invalid,
                4,
                "group[0].wait_for",
            ),
            (
                format!("{h}domains = [\"a\"]\nwait_for = \" \""),
                K::Invalid,
                4,
                "group[0].wait_for",
            ),
            (
                format!("{h}domains = [\"a\"]\nready_timeout = 0"),
                K::Invalid,
                4,
                "group[0].ready_timeout",
            ),
            (
                format!("{h}domains = [\"a\"]\nready_timeout = \"5m\""),
                K::Syntax,
                4,
                "",
            ),
            (
                format!("{h}vms = [\"a\"]\nnetwork_map = \"br0=dr\""),
                K::Invalid,
                4,
                "group[0].network_map",
            ),
            (
                format!("{h}domains = [\"a\"]\nnetwork_map = \"br0\""),
                K::Invalid,
                4,
                "group[0].network_map",
            ),
            (
                format!("{h}domains = [\"a\"]\nnetwork_map = \"br0=\""),
                K::Invalid,
                4,
                "group[0].network_map",
            ),
        ] {
            let e = p(&bad).unwrap_err();
            assert_eq!(
                (e.kind(), e.line, e.key.as_str()),
                (kind, line, key),
                "{bad:?}: {e}"
            );
        }
    }

    /// Records every call; a domain in `never` never becomes ready.
    struct Fake {
        events: std::sync::Mutex<Vec<String>>,
        never: &'static str,
    }

    impl Actions for Fake {
        fn fail_over(&self, g: &Group, vm: &str, domain: bool) -> (bool, String) {
            let what = if domain { "start" } else { "failover" };
            let what = match (&g.network_map, domain) {
                (Some(m), true) => format!("{what} [{m}]"),
                _ => what.to_string(),
            };
            self.events.lock().unwrap().push(format!("{what} {vm}"));
            (true, String::new())
        }
        fn ready(
            &self,
            g: &Group,
            domain: &str,
            left: std::time::Duration,
        ) -> Result<String, super::super::FailoverError> {
            assert!(left <= std::time::Duration::from_secs(g.ready_timeout));
            self.events.lock().unwrap().push(format!("ready? {domain}"));
            if domain == self.never {
                return Err(super::super::FailoverError::NotReady {
                    domain: domain.into(),
                    secs: left.as_secs_f64(),
                    why: "wait_for `false` did not succeed".into(),
                });
            }
            Ok("guest agent (guest-ping) answered".into())
        }
    }

    #[test]
    fn a_group_starts_only_after_the_previous_groups_domains_are_ready() {
        let g = p("[[group]]\nname = \"db\"\ndomains = [\"db1\", \"db2\"]\n[[group]]\nname = \"app\"\nvms = [\"v\"]\ndomains = [\"app1\"]\nnetwork_map = \"br0=dr\"\n[[group]]\nname = \"web\"\ndomains = [\"web1\"]\n")
            .unwrap();
        let fake = Fake {
            events: Default::default(),
            never: "app1",
        };
        let steps = run(&g, "test", &fake, &|_| {});
        assert_eq!(
            *fake.events.lock().unwrap(),
            vec![
                "start db1",
                "start db2",
                "ready? db1",
                "ready? db2",
                "failover v",
                "start [br0=dr] app1",
                "ready? app1"
            ],
            "web must not start: app1 never got ready"
        );
        let r = steps
            .iter()
            .find(|s| s.phase == Phase::Ready && s.what == "app1")
            .unwrap();
        assert!(!r.ok && r.domain);
        assert_eq!(r.error_kind, Some("not_ready"));
        assert!(
            r.output.contains("app1") && r.output.contains("wait_for"),
            "{}",
            r.output
        );
        // The report's times follow the order of events.
        let ready_db = steps
            .iter()
            .filter(|s| s.group == "db")
            .map(|s| s.ended_at)
            .fold(0.0, f64::max);
        let app_first = steps.iter().find(|s| s.group == "app").unwrap().started_at;
        assert!(app_first >= ready_db);
        assert!(!steps.iter().any(|s| s.group == "web"));
    }
}
