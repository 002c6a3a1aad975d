//! `wan_relay`: an emulated WAN link for vdrep's benchmarks and tests (this
//! kernel has no `netem`). A UDP relay on loopback between a QUIC sender and
//! receiver that imposes, per direction: a one-way delay with jitter, random
//! loss, a rate cap with a drop-tail queue, and reordering.
//!
//! ```text
//! cargo run --release --example wan_relay -- --listen 127.0.0.1:0 \
//!     --upstream 127.0.0.1:7700 --rate-mbit 100 --delay-ms 25 --loss 0.005
//! ```
//! Prints `listening on ADDR` on stdout once bound, then runs until killed
//! (SIGTERM/SIGINT) or `--duration-secs`; every `--stats-every-secs` and at
//! exit it prints one JSON line of counters per direction on stderr (and to
//! `--stats-file` if given).
//!
//! The link model is in `tests/wanlink/mod.rs` (shared with the tests).
//!
//! Options that take `A[,B]` set the forward (client → upstream) value A and
//! the reverse value B (default: B = A).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/wanlink/mod.rs"]
mod wanlink;
use wanlink::{LinkParams, Relay};

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    fwd: LinkParams,
    rev: LinkParams,
    seed: u64,
    duration: Option<Duration>,
    stats_every: Duration,
    stats_file: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: wan_relay --listen ADDR --upstream ADDR [--rate-mbit A[,B]] [--delay-ms A[,B]] \
         [--jitter-ms A[,B]] [--loss A[,B]] [--queue-ms A[,B]] [--reorder A[,B]] [--reorder-ms A[,B]] \
         [--seed N] [--duration-secs S] [--stats-every-secs S] [--stats-file PATH]\n\
         A = client->upstream, B = upstream->client (default B = A). loss/reorder are fractions (0.005 = 0.5 %).\n\
         queue-ms defaults to 1.5 x the path's round trip (2 x delay), at least 20 ms."
    );
    std::process::exit(2)
}

fn pair(v: &str) -> Result<(f64, f64), String> {
    let mut it = v.split(',');
    let a: f64 = it
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .map_err(|_| format!("not a number: {v:?}"))?;
    let b: f64 = match it.next() {
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("not a number: {v:?}"))?,
        None => a,
    };
    if it.next().is_some() || a < 0.0 || b < 0.0 || !a.is_finite() || !b.is_finite() {
        return Err(format!("expected A or A,B with A, B >= 0: {v:?}"));
    }
    Ok((a, b))
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let (mut rate, mut delay, mut jitter, mut loss) =
        ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0));
    let (mut queue, mut reorder, mut reorder_ms) = (None, (0.0, 0.0), (10.0, 10.0));
    let mut seed = 1u64;
    let mut duration = None;
    let mut stats_every = Duration::from_secs(0);
    let mut stats_file = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            usage();
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(v.parse().map_err(|_| format!("bad --listen {v:?}"))?),
            "--upstream" => {
                upstream = Some(v.parse().map_err(|_| format!("bad --upstream {v:?}"))?)
            }
            "--rate-mbit" => rate = pair(&v)?,
            "--delay-ms" => delay = pair(&v)?,
            "--jitter-ms" => jitter = pair(&v)?,
            "--loss" => loss = pair(&v)?,
            "--queue-ms" => queue = Some(pair(&v)?),
            "--reorder" => reorder = pair(&v)?,
            "--reorder-ms" => reorder_ms = pair(&v)?,
            "--seed" => seed = v.parse().map_err(|_| format!("bad --seed {v:?}"))?,
            "--duration-secs" => {
                duration = Some(Duration::from_secs_f64(pair(&v)?.0));
            }
            "--stats-every-secs" => stats_every = Duration::from_secs_f64(pair(&v)?.0),
            "--stats-file" => stats_file = Some(v),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if loss.0 > 1.0 || loss.1 > 1.0 || reorder.0 > 1.0 || reorder.1 > 1.0 {
        return Err("--loss and --reorder are fractions in 0..=1".into());
    }
    let rtt_ms = delay.0 + delay.1;
    let queue = queue.unwrap_or_else(|| {
        let q = (1.5 * rtt_ms).max(20.0);
        (q, q)
    });
    let ms = |x: f64| Duration::from_secs_f64(x / 1000.0);
    let mk = |i: usize| {
        let pick = |p: (f64, f64)| if i == 0 { p.0 } else { p.1 };
        LinkParams {
            delay: ms(pick(delay)),
            jitter: ms(pick(jitter)),
            loss: pick(loss),
            rate_bps: (pick(rate) * 1e6) as u64,
            queue: ms(pick(queue)),
            reorder: pick(reorder),
            reorder_extra: ms(pick(reorder_ms)),
        }
    };
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        fwd: mk(0),
        rev: mk(1),
        seed,
        duration,
        stats_every,
        stats_file,
    })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wan_relay: {e}");
            usage();
        }
    };
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        if let Err(e) = unsafe { signal(sig, SigHandler::Handler(on_signal)) } {
            eprintln!("wan_relay: cannot install a {sig} handler: {e}");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let relay = match Relay::start_with_stop(
        args.listen,
        args.upstream,
        args.fwd,
        args.rev,
        args.seed,
        stop.clone(),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wan_relay: cannot bind {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    println!("listening on {}", relay.addr);
    eprintln!(
        "wan_relay: {} -> {} fwd {:?} rev {:?} seed {}",
        relay.addr, args.upstream, args.fwd, args.rev, args.seed
    );
    let started = Instant::now();
    let mut last_stats = Instant::now();
    while !STOP.load(Ordering::Relaxed) && args.duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(50));
        if !args.stats_every.is_zero() && last_stats.elapsed() >= args.stats_every {
            last_stats = Instant::now();
            report(&relay, started, args.stats_file.as_deref());
        }
    }
    report(&relay, started, args.stats_file.as_deref());
    relay.stop();
}

fn report(relay: &Relay, started: Instant, file: Option<&str>) {
    let lines = relay.stats_json(started.elapsed().as_secs_f64());
    eprint!("{lines}");
    if let Some(f) = file {
        let _ = std::fs::write(f, &lines);
    }
}
