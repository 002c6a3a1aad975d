//! Every subcommand and every argument of `vdrep` explains itself in
//! `--help` (an argument without a help line is a defect an admin meets at
//! 3 a.m.), and no help text points at Rust module paths.

use clap::CommandFactory;

fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        if a.get_help().is_none() && a.get_long_help().is_none() {
            missing.push(format!("{path} {id}: no help"));
        }
    }
    let about = cmd.get_about().map(|s| s.to_string()).unwrap_or_default();
    if about.contains("vdrep::") || about.contains("crate::") {
        missing.push(format!("{path}: help names a Rust module: {about}"));
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let p = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() {
            missing.push(format!("{p}: no description"));
        }
        walk(sub, &p, missing);
    }
}

#[test]
fn every_subcommand_and_argument_has_help() {
    let mut missing = Vec::new();
    walk(&super::Cli::command(), "vdrep", &mut missing);
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
