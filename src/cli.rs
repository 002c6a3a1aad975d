//! The `vdrep` command line: one binary, one subcommand per operation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::control::{self, ControlError, Request};
use crate::daemon::{self, MountOptions};
use crate::fs::FsOptions;
use crate::tracking::{DiskState, TrackConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vdrep",
    version,
    about = "Virtual-disk replicator: track VM disk writes through a FUSE mount and seal them into change logs (.hrl)",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount vdrep over DIR itself and track writes to the disk images in it.
    ///
    /// Returns once the mount is live; the daemon keeps running in the
    /// background (logs in DIR/.vdrep/daemon.log) until `vdrep umount DIR`.
    Mount {
        /// The folder holding the VM disks; it stays usable at the same path.
        dir: PathBuf,
        /// Stay in the foreground and log to stderr.
        #[arg(long)]
        foreground: bool,
        /// Tracking granularity in bytes (power of two, 512..1048576).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// File-name patterns of tracked disks (repeatable; replaces the default
        /// *.vhd *.vhdx *.img *.raw *.qcow2).
        #[arg(long = "pattern")]
        patterns: Vec<String>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Disable the kernel write-back cache (every write goes straight to vdrep).
        #[arg(long)]
        no_writeback_cache: bool,
    },
    /// Unmount DIR cleanly (saves the dirty bitmaps so tracking survives).
    Umount {
        dir: PathBuf,
        /// Detach now even if files are open; the daemon stops when they close.
        #[arg(long)]
        lazy: bool,
    },
    /// Seal the current cycle of every tracked disk under DIR at one instant
    /// and print the path of each sealed log, one per line.
    Cut {
        dir: PathBuf,
        /// Print the whole cut report as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Show the tracked disks under DIR: state, cycle, dirty blocks.
    Status {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Inspect, verify and apply change logs (.hrl).
    Hrl {
        #[command(subcommand)]
        cmd: crate::hrl::cli::HrlCmd,
    },
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn control_err(e: ControlError) -> i32 {
    eprintln!("vdrep: {e}");
    match e {
        ControlError::NotRunning { .. } => 2,
        _ => 1,
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    run(cli.cmd)
}

pub fn run(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Mount {
            dir,
            foreground,
            block_size,
            patterns,
            threads,
            no_writeback_cache,
        } => {
            let mut track = TrackConfig {
                block_size,
                ..TrackConfig::default()
            };
            if !patterns.is_empty() {
                track.patterns = patterns;
            }
            let fs = FsOptions {
                n_threads: threads.max(1),
                writeback_cache: !no_writeback_cache,
                ..FsOptions::default()
            };
            daemon::mount(MountOptions {
                dir,
                foreground,
                track,
                fs,
            })
        }
        Cmd::Umount { dir, lazy } => umount(dir, lazy),
        Cmd::Cut { dir, json } => match control::call(&dir, &Request::Cut) {
            Err(e) => control_err(e),
            Ok(r) if !r.ok => {
                eprintln!("vdrep: cut failed: {}", r.error.unwrap_or_default());
                1
            }
            Ok(r) => {
                let Some(cut) = r.cut else {
                    eprintln!("vdrep: the daemon answered without a cut report");
                    return 1;
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&cut).unwrap_or_default());
                }
                let mut failed = 0;
                for d in &cut.disks {
                    match (&d.log, &d.error) {
                        (Some(p), None) => {
                            if !json {
                                println!("{}", p.display());
                            }
                        }
                        (Some(p), Some(e)) => {
                            if !json {
                                println!("{}", p.display());
                            }
                            eprintln!("vdrep: {}: {e}", d.disk);
                        }
                        (None, e) => {
                            failed += 1;
                            eprintln!(
                                "vdrep: {}: no log for cycle {}: {}",
                                d.disk,
                                d.cycle,
                                e.as_deref().unwrap_or("unknown reason")
                            );
                        }
                    }
                }
                if failed > 0 {
                    3
                } else {
                    0
                }
            }
        },
        Cmd::Status { dir, json } => match control::call(&dir, &Request::Status) {
            Err(e) => control_err(e),
            Ok(r) => {
                let Some(st) = r.status else {
                    eprintln!("vdrep: {}", r.error.unwrap_or_default());
                    return 1;
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
                    return 0;
                }
                println!(
                    "{}  (daemon pid {}, last cut {}{})",
                    st.root.display(),
                    r.pid.unwrap_or(0),
                    st.cut_seq,
                    if st.previous_stop_clean {
                        ""
                    } else {
                        ", previous stop was NOT clean"
                    }
                );
                println!(
                    "{:<40} {:<16} {:>8} {:>12} {:>12}",
                    "DISK", "STATE", "CYCLE", "SIZE", "DIRTY"
                );
                for d in &st.disks {
                    let (state, why) = match &d.state {
                        DiskState::Normal => ("Normal", None),
                        DiskState::ResyncRequired(w) => ("ResyncRequired", Some(w)),
                    };
                    println!(
                        "{:<40} {:<16} {:>8} {:>12} {:>12}",
                        d.name,
                        state,
                        d.cycle,
                        human(d.size),
                        human(d.dirty_bytes)
                    );
                    if let Some(w) = why {
                        println!("    reason: {w}");
                    }
                }
                0
            }
        },
        Cmd::Hrl { cmd } => crate::hrl::cli::run(cmd),
    }
}

fn umount(dir: PathBuf, lazy: bool) -> i32 {
    match control::call(&dir, &Request::Shutdown { lazy }) {
        Ok(r) if r.ok => {
            if let Some(pid) = r.pid {
                if !daemon::wait_pid_gone(pid, Duration::from_secs(120)) {
                    eprintln!(
                        "vdrep: {} is unmounted but the daemon (pid {pid}) is still saving state or serving open files",
                        dir.display()
                    );
                    return 1;
                }
            }
            0
        }
        Ok(r) => {
            eprintln!("vdrep: {}", r.error.unwrap_or_default());
            1
        }
        Err(ControlError::NotRunning { .. }) => {
            // A daemon that died leaves a dead mount behind: remove it.
            match daemon::unmount(&dir, lazy) {
                Ok(()) => {
                    eprintln!(
                        "vdrep: no daemon was running for {}; removed the stale mount (its disks will need a resync)",
                        dir.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("vdrep: {} is not mounted by a running vdrep: {e}", dir.display());
                    2
                }
            }
        }
        Err(e) => control_err(e),
    }
}
