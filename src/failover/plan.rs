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

/// One group of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub name: String,
    pub pre: Option<String>,
    pub post: Option<String>,
    pub vms: Vec<String>,
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
    vms: Spanned<Vec<Spanned<String>>>,
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
        if g.vms.get_ref().is_empty() {
            return Err(err(
                g.vms.span().start,
                key("vms"),
                PlanErrorKind::Invalid,
                format!("group {name:?} lists no VMs: vms = [\"VM\", ...]"),
            ));
        }
        let mut vms = Vec::new();
        for vm in g.vms.get_ref() {
            crate::wire::safe_component(vm.get_ref()).map_err(|e| {
                err(
                    vm.span().start,
                    key("vms"),
                    PlanErrorKind::Invalid,
                    format!("VM name {:?}: {e}", vm.get_ref()),
                )
            })?;
            vms.push(vm.get_ref().clone());
        }
        groups.push(Group {
            name: name.to_string(),
            pre: g.pre,
            post: g.post,
            vms,
        });
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
            (g, K::Syntax, 1, ""),
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
}
