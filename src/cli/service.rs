//! What a packaged service needs of the command line: `vdrep completions
//! SHELL` (clap_complete), `vdrep man --out DIR` (clap_mangen, one page per
//! command) and the `--log-format` choice the daemons log with.

use std::path::Path;

use clap::CommandFactory;

use crate::service::LogFormat;

/// `--log-format`: how `mount` and `receive` log.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormatArg {
    /// One line of text per event.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// The log format: `--log-format`, else the configuration's
/// `[site] log_format`, else text.
pub fn log_format(flag: Option<LogFormatArg>, cfg: Option<&crate::config::Config>) -> LogFormat {
    match flag {
        Some(LogFormatArg::Text) => LogFormat::Text,
        Some(LogFormatArg::Json) => LogFormat::Json,
        None => cfg.and_then(|c| c.site.log_format).unwrap_or_default(),
    }
}

/// `vdrep completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    let mut cmd = super::Cli::command();
    clap_complete::generate(shell, &mut cmd, "vdrep", &mut std::io::stdout());
    0
}

/// `vdrep man --out DIR`: `vdrep.1` and one `vdrep-COMMAND.1` per command.
pub fn man(out: &Path) -> i32 {
    match write_man_pages(out) {
        Ok(n) => {
            println!("{n} man pages written to {}", out.display());
            0
        }
        Err(e) => {
            eprintln!("vdrep: man: {}: {e}", out.display());
            1
        }
    }
}

/// Write the man pages into `out` (created if missing); how many.
fn write_man_pages(out: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(out)?;
    let before = count_pages(out)?;
    clap_mangen::generate_to(super::Cli::command(), out)?;
    Ok(count_pages(out)?.saturating_sub(before))
}

fn count_pages(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        if e?.path().extension().is_some_and(|x| x == "1") {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_man_pages(dir.path()).unwrap();
        let top = std::fs::read_to_string(dir.path().join("vdrep.1")).unwrap();
        assert!(top.contains(".TH vdrep 1"), "{top}");
        for page in ["vdrep-mount.1", "vdrep-receive.1", "vdrep-keys-init.1"] {
            let p = dir.path().join(page);
            assert!(p.exists(), "{page} missing");
        }
        let mount = std::fs::read_to_string(dir.path().join("vdrep-mount.1")).unwrap();
        assert!(mount.contains("foreground"), "{mount}");
        assert!(
            !dir.path().join("vdrep-hash-bench.1").exists(),
            "hidden command"
        );
        assert!(n >= 20, "only {n} pages");
    }

    #[test]
    fn completions_know_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut super::super::Cli::command(), "vdrep", &mut buf);
            let s = String::from_utf8(buf).unwrap();
            for word in ["mount", "receive", "failover", "completions"] {
                assert!(s.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn log_format_flag_over_file() {
        assert_eq!(log_format(Some(LogFormatArg::Json), None), LogFormat::Json);
        assert_eq!(log_format(None, None), LogFormat::Text);
    }
}
