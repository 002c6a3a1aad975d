//! Bandwidth limit (`--max-rate`): an async token bucket.
//!
//! Tokens are bytes. The bucket fills at `bytes_per_sec` and holds at most
//! 250 ms worth (at least 64 KiB), so after an idle period a sender may burst
//! that much and no more (and a sender delayed by a busy machine may catch
//! up that much). It starts empty. [`RateLimiter::take`] may drive
//! the bucket negative (a request larger than the bucket is never refused):
//! the caller then sleeps until the debt is repaid, so over any interval the
//! bytes granted are `rate × interval + burst`, whatever the request sizes
//! and however many tasks share one limiter.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

/// A shared token bucket. `RateLimiter::new(0)` is unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<Bucket>,
}

fn capacity_of(rate: f64) -> f64 {
    (rate / 4.0).max(65_536.0)
}

impl RateLimiter {
    /// A limiter granting `bytes_per_sec` on average; 0 means no limit.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec as f64;
        RateLimiter {
            bucket: Mutex::new(Bucket {
                rate,
                capacity: capacity_of(rate),
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// The configured rate in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.bucket.lock().rate as u64
    }

    /// Change the rate (0: unlimited) from now on; debts and credit carry over.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut b = self.bucket.lock();
        b.rate = bytes_per_sec as f64;
        b.capacity = capacity_of(b.rate);
        b.tokens = b.tokens.min(b.capacity);
    }

    /// Reserve `n` bytes and return how long the caller must wait before
    /// sending them (zero if it may send now).
    pub fn reserve(&self, n: u64) -> Duration {
        let mut b = self.bucket.lock();
        if b.rate <= 0.0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * b.rate).min(b.capacity);
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / b.rate)
        }
    }

    /// Take `n` bytes only from credit already accrued (never into debt
    /// beyond what a full bucket allows): `Ok` if taken, else how long until
    /// enough credit (`min(n, capacity)`) will have accrued. Lower-priority
    /// traffic uses this so it never makes a [`RateLimiter::reserve`]
    /// caller wait for bytes granted ahead of time.
    pub fn take_from_credit(&self, n: u64) -> Result<(), Duration> {
        let mut b = self.bucket.lock();
        if b.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * b.rate).min(b.capacity);
        let need = (n as f64).min(b.capacity);
        if b.tokens >= need {
            b.tokens -= n as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - b.tokens) / b.rate))
        }
    }

    /// Wait until `n` bytes may be sent.
    pub async fn take(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve(u64::MAX), Duration::ZERO);
    }

    #[tokio::test]
    async fn rate_is_accurate_within_10_percent() {
        // 8 MB/s for ~1 s in 64 KiB requests, shared by two tasks.
        let rate = 8_000_000u64;
        let r = std::sync::Arc::new(RateLimiter::new(rate));
        let start = Instant::now();
        let deadline = start + Duration::from_millis(1000);
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    r.take(65_536).await;
                    sent += 65_536;
                }
                sent
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let measured = total as f64 / secs;
        let err = (measured - rate as f64).abs() / rate as f64;
        println!("rate limiter: asked {rate} B/s, measured {measured:.0} B/s ({:.1}% off) over {secs:.3} s", err * 100.0);
        assert!(
            err < 0.10,
            "measured {measured} B/s for a limit of {rate} B/s"
        );
    }
}
