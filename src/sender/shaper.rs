//! Bandwidth policy of one VM's replication session: its own cap
//! (`--max-rate`) and its share of the link to its receiver
//! (`--link-max-rate`: one cap for every VM of this mount that replicates
//! to the same `--to`), where deltas go first.
//!
//! A [`LinkShare`] is one token bucket per destination. Traffic has a
//! [`Class`]: [`Class::Delta`] (change logs, what the RPO of continuous VMs
//! depends on) and [`Class::Bulk`] (initial copies). A bulk request waits
//! while any delta request is waiting for tokens, and takes only credit
//! that has already accrued (it never borrows ahead, which would make the
//! next delta wait for bytes granted to bulk), so a VM's huge initial copy
//! cannot starve the RPO of the others: deltas take what they need and bulk
//! gets the rest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::transport::RateLimiter;

/// What a transfer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Change logs and resync logs: the RPO of continuous VMs.
    Delta,
    /// Initial copies: yields to deltas.
    Bulk,
}

/// The shared cap of one destination and its waiting deltas.
#[derive(Debug)]
pub struct LinkShare {
    limiter: RateLimiter,
    deltas_waiting: AtomicUsize,
}

/// How long a bulk request sleeps between looks at the waiting deltas.
const BULK_YIELD: Duration = Duration::from_millis(2);

impl LinkShare {
    pub fn new(bytes_per_sec: u64) -> Self {
        LinkShare {
            limiter: RateLimiter::new(bytes_per_sec),
            deltas_waiting: AtomicUsize::new(0),
        }
    }

    /// The cap in bytes per second (0: none).
    pub fn rate(&self) -> u64 {
        self.limiter.rate()
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.limiter.set_rate(bytes_per_sec)
    }

    /// Wait until `n` bytes of `class` may be sent on this link.
    pub async fn take(&self, class: Class, n: u64) {
        match class {
            Class::Delta => {
                self.deltas_waiting.fetch_add(1, Ordering::SeqCst);
                let _done = Waiting(&self.deltas_waiting);
                self.limiter.take(n).await;
            }
            Class::Bulk => loop {
                // Bulk never borrows ahead (that debt would delay the next
                // delta): it takes accrued credit, and none while a delta waits.
                if self.deltas_waiting.load(Ordering::SeqCst) == 0 {
                    match self.limiter.take_from_credit(n) {
                        Ok(()) => return,
                        Err(wait) => tokio::time::sleep(wait.min(BULK_YIELD * 5)).await,
                    }
                } else {
                    tokio::time::sleep(BULK_YIELD).await;
                }
            },
        }
    }
}

/// Decrements the waiting count when a delta's wait ends (or is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One session's caps: the VM's own and its link's.
#[derive(Debug, Default)]
pub struct Shaper {
    vm: Option<RateLimiter>,
    link: Option<Arc<LinkShare>>,
}

impl Shaper {
    /// `vm_rate`: the VM's cap (0: none); `link`: its destination's share.
    pub fn new(vm_rate: u64, link: Option<Arc<LinkShare>>) -> Self {
        Shaper {
            vm: (vm_rate > 0).then(|| RateLimiter::new(vm_rate)),
            link,
        }
    }

    /// Wait until `n` bytes of `class` may be sent.
    pub async fn take(&self, class: Class, n: u64) {
        if let Some(l) = &self.vm {
            l.take(n).await;
        }
        if let Some(l) = &self.link {
            l.take(class, n).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A bulk sender saturating a 2 MB/s link and a delta sender asking
    /// for 64 KiB every 100 ms (0.64 MB/s): the delta gets all it asks
    /// for, bulk the rest, and the link's total stays at its cap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deltas_get_their_share_before_bulk() {
        let link = Arc::new(LinkShare::new(2_000_000));
        let bulk = Shaper::new(0, Some(link.clone()));
        let delta = Shaper::new(0, Some(link.clone()));
        let start = Instant::now();
        let end = start + Duration::from_millis(1500);
        let b = tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < end {
                bulk.take(Class::Bulk, 256 << 10).await;
                sent += 256 << 10;
            }
            sent
        });
        let d = tokio::spawn(async move {
            let (mut sent, mut max_wait) = (0u64, Duration::ZERO);
            while Instant::now() < end {
                let t = Instant::now();
                delta.take(Class::Delta, 64 << 10).await;
                max_wait = max_wait.max(t.elapsed());
                sent += 64 << 10;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (sent, max_wait)
        });
        let bulk_sent = b.await.unwrap();
        let (delta_sent, max_wait) = d.await.unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "bulk {bulk_sent} B, delta {delta_sent} B in {secs:.2} s, longest delta wait {max_wait:?}"
        );
        // The delta asked for ~15 x 64 KiB and got nearly all of them
        // (measured: 15, longest wait 34 ms; sharing the bucket first-come
        // first-served instead, it waited ~160 ms behind the bulk debt each
        // time and got 9).
        assert!(
            delta_sent >= 12 * (64 << 10),
            "delta starved: {delta_sent} B"
        );
        // Bulk used the rest: total within the cap (+ one burst + chunk).
        let total = (bulk_sent + delta_sent) as f64;
        assert!(
            total <= 2_000_000.0 * secs + 1_000_000.0,
            "cap exceeded: {total} B"
        );
        assert!(bulk_sent > 0);
    }

    #[tokio::test]
    async fn no_link_cap_never_waits() {
        let s = Shaper::new(0, Some(Arc::new(LinkShare::new(0))));
        let t = Instant::now();
        for _ in 0..100 {
            s.take(Class::Bulk, 1 << 30).await;
            s.take(Class::Delta, 1 << 30).await;
        }
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
