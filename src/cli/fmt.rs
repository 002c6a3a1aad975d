//! Presentation shared by the commands: human sizes, resync progress lines,
//! the live progress bar, and the exit codes of daemon errors.

use std::path::Path;
use std::time::Duration;

use crate::daemon::control::{self, Request};
use crate::ipc::{CallError, CallErrorKind};

/// `n` bytes for people: `512 B`, `1.5 MiB`.
pub fn human(n: u64) -> String {
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

/// Print a mount daemon's or receiver's error; its exit code (2: it is not
/// running).
pub fn control_err(e: CallError) -> i32 {
    eprintln!("vdrep: {e}");
    match e.kind() {
        CallErrorKind::NotRunning => 2,
        _ => 1,
    }
}

/// Run `wait` with the live progress bar of `dir`'s VMs (only `vm` if
/// given) on stderr when `show` and stderr is a terminal.
pub fn with_progress<T>(dir: &Path, vm: Option<&str>, show: bool, wait: impl FnOnce() -> T) -> T {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = (show && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let (done, m, vm) = (done.clone(), dir.to_path_buf(), vm.map(str::to_string));
        std::thread::spawn(move || progress_bar(&m, vm.as_deref(), &done))
    });
    let res = wait();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(b) = bar {
        let _ = b.join();
    }
    res
}

/// `resync [=====     ] 42% 1234/5678 blocks, 3 differ, 350 MiB/s, ETA 4s`
pub fn resync_line(p: &crate::sender::ResyncProgress) -> String {
    let f = p.blocks_compared as f64 / p.blocks_total.max(1) as f64;
    let w = 20;
    let fill = ((f * w as f64) as usize).min(w);
    format!(
        "{} {} [{}{}] {:>3.0}% {}/{} blocks, {} differ, {} sent, {}/s, ETA {}",
        p.mode,
        p.disk,
        "=".repeat(fill),
        " ".repeat(w - fill),
        f * 100.0,
        p.blocks_compared,
        p.blocks_total,
        p.blocks_differ,
        p.blocks_sent,
        human(p.rate_bps as u64),
        p.eta_secs.map_or("?".into(), |e| format!("{e:.0}s"))
    )
}

/// While a sync waits: one line on stderr with the state of each VM and,
/// during an initial copy, a bar with bytes, rate and ETA.
fn progress_bar(dir: &Path, vm: Option<&str>, done: &std::sync::atomic::AtomicBool) {
    use std::io::Write;
    let t0 = std::time::Instant::now();
    let mut drew = false;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        if t0.elapsed() < Duration::from_millis(500) {
            continue;
        }
        let Ok(r) = control::call(dir, &Request::Status) else {
            continue;
        };
        let mut line = String::new();
        for v in r.replication.unwrap_or_default() {
            if vm.is_some_and(|n| n != v.vm) {
                continue;
            }
            if let Some(p) = &v.resync {
                line += &format!("{} {}  ", v.vm, resync_line(p));
            } else if v.state == crate::sender::VmState::InitialReplication && v.initial_total > 0 {
                let f = v.initial_done as f64 / v.initial_total as f64;
                let w = 24;
                let fill = ((f * w as f64) as usize).min(w);
                let rate = v.initial_done as f64 / t0.elapsed().as_secs_f64().max(0.1);
                let eta = v.initial_total.saturating_sub(v.initial_done) as f64 / rate.max(1.0);
                line += &format!(
                    "{} initial [{}{}] {:>3.0}% {}/{} {}/s ETA {:.0}s  ",
                    v.vm,
                    "=".repeat(fill),
                    " ".repeat(w - fill),
                    f * 100.0,
                    human(v.initial_done),
                    human(v.initial_total),
                    human(rate as u64),
                    eta
                );
            } else {
                line += &format!(
                    "{} {:?} pending {}{}  ",
                    v.vm,
                    v.state,
                    human(v.bytes_pending),
                    v.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                );
            }
        }
        let width = 120;
        let line: String = line.chars().take(width).collect();
        eprint!("\r{line:<width$}");
        let _ = std::io::stderr().flush();
        drew = true;
    }
    if drew {
        eprint!("\r{:<120}\r", "");
    }
}
