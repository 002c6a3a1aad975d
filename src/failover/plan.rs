//! Recovery plans: VMs failed over in ordered groups, with optional
//! scripts before and after each group (`vdrep plan failover PLAN`).
//!
//! A plan is a small text file:
//!
//! ```text
//! # comments and blank lines are ignored
//! [group database]
//! pre  = /etc/vdrep/stop-app.sh        # run with sh -c before the group
//! vms  = db1 db2                        # failed over in this order
//! post = /etc/vdrep/check-db.sh
//!
//! [group web]
//! vms = web1 web2
//! ```
//!
//! Groups run in file order. Scripts get `VDREP_PLAN_GROUP`,
//! `VDREP_PLAN_VMS` and `VDREP_PLAN_MODE` in their environment. A failing
//! `pre` script skips its group; a VM that fails does not stop the others
//! of its group, but the plan stops before the next group (later groups
//! usually depend on earlier ones). Every VM gets a line in the report.
//!
//! What failing one VM over means is the caller's: [`run`] takes it as a
//! function (the command line passes `vdrep failover VM --test` etc., run
//! in this process).

use std::process::Command;
use std::time::Instant;

/// Why a plan file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A line does not parse.
    #[error("line {line}: {msg}")]
    Syntax { line: usize, msg: String },
    /// No group at all.
    #[error("the plan has no `[group NAME]`")]
    Empty,
    /// A group without VMs.
    #[error("group {group:?} lists no VMs (`vms = ...`)")]
    NoVms { group: String },
}

/// One group of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub name: String,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub vms: Vec<String>,
}

/// Parse a plan file's text. Errors name the line.
pub fn parse(text: &str) -> Result<Vec<Group>, PlanError> {
    let syntax = |line: usize, msg: String| PlanError::Syntax { line, msg };
    let mut groups: Vec<Group> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = match raw.find(" #").or_else(|| raw.starts_with('#').then_some(0)) {
            Some(k) => &raw[..k],
            None => raw,
        }
        .trim();
        if line.is_empty() {
            continue;
        }
        if let Some(h) = line.strip_prefix('[') {
            let h = h
                .strip_suffix(']')
                .ok_or_else(|| syntax(n, "a section header ends with ']'".into()))?;
            let name = h
                .trim()
                .strip_prefix("group")
                .map(str::trim)
                .ok_or_else(|| syntax(n, "sections are `[group NAME]`".into()))?;
            if name.is_empty() {
                return Err(syntax(n, "the group needs a name".into()));
            }
            if groups.iter().any(|g| g.name == name) {
                return Err(syntax(n, format!("group {name:?} is defined twice")));
            }
            groups.push(Group {
                name: name.to_string(),
                ..Group::default()
            });
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| syntax(n, "expected `key = value`".into()))?;
        let g = groups
            .last_mut()
            .ok_or_else(|| syntax(n, format!("`{}` before any `[group NAME]`", k.trim())))?;
        let v = v.trim();
        match k.trim() {
            "pre" => g.pre = Some(v.to_string()),
            "post" => g.post = Some(v.to_string()),
            "vms" => {
                for vm in v.split_whitespace() {
                    crate::wire::safe_component(vm)
                        .map_err(|e| syntax(n, format!("VM name {vm:?}: {e}")))?;
                    g.vms.push(vm.to_string());
                }
            }
            other => {
                return Err(syntax(
                    n,
                    format!("unknown key {other:?} (pre, post and vms are known)"),
                ))
            }
        }
    }
    if groups.is_empty() {
        return Err(PlanError::Empty);
    }
    for g in &groups {
        if g.vms.is_empty() {
            return Err(PlanError::NoVms {
                group: g.name.clone(),
            });
        }
    }
    Ok(groups)
}

/// The outcome for one VM (or one script).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub group: String,
    /// The VM, or `pre`/`post` for a script.
    pub what: String,
    pub ok: bool,
    pub seconds: f64,
    /// What the step printed (the exposed disk paths for a VM), or why it failed.
    pub output: String,
}

/// Run `groups`, failing each VM over with `fail_over` (whether it worked,
/// and what it printed or why it failed). `mode` is for the scripts'
/// environment; `log` sees every step as it ends.
pub fn run(
    groups: &[Group],
    mode: &str,
    fail_over: &dyn Fn(&str) -> (bool, String),
    log: &dyn Fn(&Step),
) -> Vec<Step> {
    let mut steps = Vec::new();
    for g in groups {
        let env = [
            ("VDREP_PLAN_GROUP", g.name.clone()),
            ("VDREP_PLAN_VMS", g.vms.join(" ")),
            ("VDREP_PLAN_MODE", mode.to_string()),
        ];
        let script = |what: &str, cmd: &str| -> Step {
            let t = Instant::now();
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
            Step {
                group: g.name.clone(),
                what: what.into(),
                ok,
                seconds: t.elapsed().as_secs_f64(),
                output: output.trim().to_string(),
            }
        };
        if let Some(pre) = &g.pre {
            let s = script("pre", pre);
            log(&s);
            let ok = s.ok;
            steps.push(s);
            if !ok {
                return steps;
            }
        }
        let mut all_ok = true;
        for vm in &g.vms {
            let t = Instant::now();
            let (ok, output) = fail_over(vm);
            all_ok &= ok;
            let s = Step {
                group: g.name.clone(),
                what: vm.clone(),
                ok,
                seconds: t.elapsed().as_secs_f64(),
                output: output.trim().to_string(),
            };
            log(&s);
            steps.push(s);
        }
        if let Some(post) = &g.post {
            let s = script("post", post);
            log(&s);
            all_ok &= s.ok;
            steps.push(s);
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

    #[test]
    fn parses_groups_and_rejects_bad_plans() {
        let g = parse(
            "# plan\n[group db]\npre = echo hi # note\nvms = db1 db2\n\n[group web]\nvms = w1\npost=true\n",
        )
        .unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "db");
        assert_eq!(g[0].pre.as_deref(), Some("echo hi"));
        assert_eq!(g[0].vms, vec!["db1", "db2"]);
        assert_eq!(g[1].post.as_deref(), Some("true"));
        for bad in [
            "",
            "vms = a",
            "[group]\nvms = a",
            "[group a]\n",
            "[group a]\nvms = ../x",
            "[group a]\nvms = a\n[group a]\nvms = b",
            "[group a]\nfoo = 1\nvms = a",
            "[group a\nvms = a",
            "[grp a]\nvms = a",
            "[group a]\nvms a",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
