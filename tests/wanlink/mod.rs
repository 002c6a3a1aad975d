//! An emulated WAN link (this kernel has no `netem`): a UDP relay between a
//! QUIC sender and receiver that imposes, per direction, a one-way delay with
//! jitter, random loss, a rate cap with a drop-tail queue, and reordering.
//! Used in-process by tests (tests/wan_e2e.rs) and, as a program, by
//! `scripts/bench-wan.sh` through `examples/wan_relay.rs`.
//!
//! Each client address (a sender's socket) gets its own upstream socket, so
//! the receiver sees one peer per sender, as through a NAT.
//!
//! Link model, per direction and per packet of `n` bytes arriving at `t`:
//! 1. dropped with probability `loss` (independent, uniform);
//! 2. serialised at `rate`: it leaves the queue at
//!    `d = max(t, previous departure) + n*8/rate`; if `d - t` exceeds the
//!    queue's capacity in time (`queue`), it is dropped (drop-tail);
//! 3. delivered at `d + delay + U(-jitter, +jitter)` (never before `d`);
//!    with probability `reorder` it is held `reorder_extra` longer, so
//!    packets sent after it overtake it. Without jitter or reordering packets
//!    keep their order.
#![allow(dead_code)]

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct LinkParams {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    /// Bits per second; 0 = unlimited.
    pub rate_bps: u64,
    pub queue: Duration,
    pub reorder: f64,
    pub reorder_extra: Duration,
}

#[derive(Default)]
pub struct Counters {
    pub in_pkts: AtomicU64,
    pub in_bytes: AtomicU64,
    pub lost_pkts: AtomicU64,
    pub queue_drop_pkts: AtomicU64,
    pub reordered_pkts: AtomicU64,
    pub out_pkts: AtomicU64,
    pub out_bytes: AtomicU64,
}

impl Counters {
    pub fn json(&self, dir: &str, secs: f64) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{{\"dir\":\"{dir}\",\"secs\":{secs:.3},\"in_pkts\":{},\"in_bytes\":{},\"lost_pkts\":{},\"queue_drop_pkts\":{},\"reordered_pkts\":{},\"out_pkts\":{},\"out_bytes\":{}}}",
            g(&self.in_pkts),
            g(&self.in_bytes),
            g(&self.lost_pkts),
            g(&self.queue_drop_pkts),
            g(&self.reordered_pkts),
            g(&self.out_pkts),
            g(&self.out_bytes)
        )
    }
}

/// splitmix64: small, seedable, good enough for loss decisions.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A packet waiting for its delivery time.
struct Pending {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    /// Where to send it from (an upstream socket, or the listening socket).
    via: Arc<UdpSocket>,
    to: SocketAddr,
}
impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Min-heap on (at, seq).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

/// One direction of the link: admission (loss, queue, delay) and a delivery
/// thread that sends each packet at its time.
pub struct Link {
    p: LinkParams,
    state: Mutex<LinkState>,
    wake: Condvar,
    pub stats: Counters,
}
struct LinkState {
    rng: Rng,
    last_departure: Instant,
    seq: u64,
    heap: BinaryHeap<Pending>,
}

impl Link {
    fn new(p: LinkParams, seed: u64) -> Arc<Self> {
        Arc::new(Link {
            p,
            state: Mutex::new(LinkState {
                rng: Rng(seed),
                last_departure: Instant::now(),
                seq: 0,
                heap: BinaryHeap::new(),
            }),
            wake: Condvar::new(),
            stats: Counters::default(),
        })
    }

    fn admit(&self, data: &[u8], via: &Arc<UdpSocket>, to: SocketAddr) {
        let now = Instant::now();
        let n = data.len() as u64;
        self.stats.in_pkts.fetch_add(1, Ordering::Relaxed);
        self.stats.in_bytes.fetch_add(n, Ordering::Relaxed);
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if self.p.loss > 0.0 && st.rng.unit() < self.p.loss {
            self.stats.lost_pkts.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let departure = match (n * 8 * 1_000_000_000).checked_div(self.p.rate_bps) {
            None => now, // no rate cap
            Some(ser_ns) => {
                let d = st.last_departure.max(now) + Duration::from_nanos(ser_ns);
                if d.duration_since(now) > self.p.queue {
                    self.stats.queue_drop_pkts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                st.last_departure = d;
                d
            }
        };
        let mut at = departure + self.p.delay;
        if !self.p.jitter.is_zero() {
            let j = self.p.jitter.as_nanos() as f64 * (2.0 * st.rng.unit() - 1.0);
            at = if j >= 0.0 {
                at + Duration::from_nanos(j as u64)
            } else {
                at.checked_sub(Duration::from_nanos((-j) as u64))
                    .unwrap_or(at)
                    .max(departure)
            };
        }
        if self.p.reorder > 0.0 && st.rng.unit() < self.p.reorder {
            at += self.p.reorder_extra;
            self.stats.reordered_pkts.fetch_add(1, Ordering::Relaxed);
        }
        st.seq += 1;
        let seq = st.seq;
        st.heap.push(Pending {
            at,
            seq,
            data: data.to_vec(),
            via: via.clone(),
            to,
        });
        drop(st);
        self.wake.notify_one();
    }

    /// Delivery loop: sleep until the earliest packet is due, send it.
    fn deliver(&self, stop: &AtomicBool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match st.heap.peek().map(|p| p.at) {
                Some(at) if at <= now => {
                    if let Some(p) = st.heap.pop() {
                        drop(st);
                        if p.via.send_to(&p.data, p.to).is_ok() {
                            self.stats.out_pkts.fetch_add(1, Ordering::Relaxed);
                            self.stats
                                .out_bytes
                                .fetch_add(p.data.len() as u64, Ordering::Relaxed);
                        }
                        st = match self.state.lock() {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                }
                Some(at) => {
                    st = match self.wake.wait_timeout(st, at - now) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
                None => {
                    st = match self.wake.wait_timeout(st, Duration::from_millis(50)) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
            }
        }
    }
}

impl LinkParams {
    /// A link of `rate_mbit` (0: unlimited) with `rtt_ms` of round trip
    /// (half each way), `loss` in each direction, and a drop-tail queue of
    /// 1.5 round trips (at least 20 ms).
    pub fn symmetric(rate_mbit: f64, rtt_ms: f64, loss: f64) -> LinkParams {
        let ms = |x: f64| Duration::from_secs_f64(x / 1000.0);
        LinkParams {
            delay: ms(rtt_ms / 2.0),
            jitter: Duration::ZERO,
            loss,
            rate_bps: (rate_mbit * 1e6) as u64,
            queue: ms((1.5 * rtt_ms).max(20.0)),
            reorder: 0.0,
            reorder_extra: ms(10.0),
        }
    }
}

/// A running relay: `addr` is where senders connect; it forwards to the
/// upstream address given to [`Relay::start`].
pub struct Relay {
    pub addr: SocketAddr,
    pub fwd: Arc<Link>,
    pub rev: Arc<Link>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Bind `listen` and relay to `upstream` through a forward link `fwd`
    /// (client → upstream) and a reverse link `rev`.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        fwd: LinkParams,
        rev: LinkParams,
        seed: u64,
    ) -> std::io::Result<Relay> {
        Self::start_with_stop(
            listen,
            upstream,
            fwd,
            rev,
            seed,
            Arc::new(AtomicBool::new(false)),
        )
    }

    /// As [`Relay::start`], stopping when `stop` becomes true.
    pub fn start_with_stop(
        listen: SocketAddr,
        upstream: SocketAddr,
        fwd: LinkParams,
        rev: LinkParams,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(listen)?);
        deep_buffers(&front);
        let tick = Some(Duration::from_millis(50));
        front.set_read_timeout(tick)?;
        let addr = front.local_addr()?;
        let fwd_link = Link::new(fwd, seed);
        let rev_link = Link::new(rev, seed ^ 0x5555_5555_5555_5555);
        let mut threads = Vec::new();
        for link in [fwd_link.clone(), rev_link.clone()] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || link.deliver(&stop)));
        }
        let (f, r, st) = (fwd_link.clone(), rev_link.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            // Client address -> its upstream socket.
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut readers = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                let (n, from) = match front.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(_) => continue, // timeout tick (or a transient error): check stop
                };
                let up = match clients.get(&from) {
                    Some(u) => u.clone(),
                    None => {
                        let Ok(u) = UdpSocket::bind("127.0.0.1:0") else {
                            continue;
                        };
                        deep_buffers(&u);
                        let u = Arc::new(u);
                        let _ = u.set_read_timeout(tick);
                        let (u2, front2, rev2, st2) =
                            (u.clone(), front.clone(), r.clone(), st.clone());
                        readers.push(std::thread::spawn(move || {
                            let mut b = vec![0u8; 65536];
                            while !st2.load(Ordering::Relaxed) {
                                if let Ok((m, _)) = u2.recv_from(&mut b) {
                                    rev2.admit(&b[..m], &front2, from);
                                }
                            }
                        }));
                        clients.insert(from, u.clone());
                        u
                    }
                };
                f.admit(&buf[..n], &up, upstream);
            }
            for t in readers {
                let _ = t.join();
            }
        }));
        Ok(Relay {
            addr,
            fwd: fwd_link,
            rev: rev_link,
            stop,
            threads,
        })
    }

    /// One JSON line of counters per direction.
    pub fn stats_json(&self, secs: f64) -> String {
        format!(
            "{}\n{}\n",
            self.fwd.stats.json("fwd", secs),
            self.rev.stats.json("rev", secs)
        )
    }

    /// Stop and join every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.fwd.wake.notify_all();
        self.rev.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Socket buffers of the relay: 32 MiB each way (`SO_RCVBUFFORCE` as root,
/// else as much as `net.core.rmem_max` allows). With the default 208 KiB a
/// relay that the scheduler leaves off the CPU for a few milliseconds
/// (a loaded shared host) drops the sender's packets in the kernel before
/// it reads them: losses no link has, which the congestion controller
/// then answers (measured: at load 15, 64 k of 135 k packets lost with 0 %
/// loss configured, `RcvbufErrors` in `/proc/net/snmp`). A router keeps
/// the queue the relay models (drop-tail, `LinkParams::queue`), not this one.
fn deep_buffers(sock: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    const SIZE: usize = 32 << 20;
    if setsockopt(sock, sockopt::RcvBufForce, &SIZE).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &SIZE);
    }
    if setsockopt(sock, sockopt::SndBufForce, &SIZE).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &SIZE);
    }
}
