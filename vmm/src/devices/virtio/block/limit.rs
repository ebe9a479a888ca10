//! Disk I/O rate limits, as Firecracker's rate limiters and QEMU's throttling offer: a token
//! bucket for bytes and one for operations, each refilled at its rate up to a burst. A request
//! waits for its tokens on the queue thread, after the device lock is released, so a throttled
//! disk slows only its own guest's I/O, never the guest's register accesses or other disks.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One limit: `rate` per second, with up to `burst` available at once (at least one second's
/// worth of rate when given as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

impl Limit {
    /// Parses `RATE[/s][,BURST]` with K/M/G suffixes (binary units).
    pub fn parse(s: &str) -> Result<Limit, String> {
        let (rate, burst) = match s.split_once(',') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let rate = size(rate.trim().trim_end_matches("/s"))?;
        if rate == 0 {
            return Err(format!("{s:?}: a rate of 0 would stop the disk"));
        }
        let burst = burst.map(|b| size(b.trim())).transpose()?.unwrap_or(0);
        Ok(Limit { rate, burst })
    }
}

fn size(s: &str) -> Result<u64, String> {
    let t = s.to_ascii_uppercase();
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t.as_str(), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a number (e.g. 50M, 2000, 1G)"))
}

#[derive(Debug)]
struct Bucket {
    limit: Limit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: Limit) -> Bucket {
        Bucket {
            limit,
            tokens: limit.burst.max(limit.rate) as f64,
            last: Instant::now(),
        }
    }

    fn capacity(&self) -> f64 {
        self.limit.burst.max(self.limit.rate) as f64
    }

    /// Takes `n` tokens, going into debt if it must; returns how long to wait to pay it off.
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.limit.rate as f64;
        self.tokens = (self.tokens + refill).min(self.capacity());
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.limit.rate as f64)
        }
    }
}

/// The limits of one disk.
#[derive(Debug, Default)]
pub struct RateLimiter {
    bytes: Option<Mutex<Bucket>>,
    ops: Option<Mutex<Bucket>>,
}

impl RateLimiter {
    /// A limiter of bytes and/or operations per second.
    pub fn new(bytes: Option<Limit>, ops: Option<Limit>) -> RateLimiter {
        RateLimiter {
            bytes: bytes.map(|l| Mutex::new(Bucket::new(l))),
            ops: ops.map(|l| Mutex::new(Bucket::new(l))),
        }
    }

    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Waits until one operation of `len` bytes is allowed.
    pub fn wait(&self, len: u64) {
        let take = |b: &Option<Mutex<Bucket>>, n: u64| {
            b.as_ref().map_or(Duration::ZERO, |b| {
                b.lock().unwrap_or_else(|p| p.into_inner()).take(n)
            })
        };
        let wait = take(&self.ops, 1).max(take(&self.bytes, len));
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_with_units_and_bursts() {
        assert_eq!(
            Limit::parse("50M/s"),
            Ok(Limit {
                rate: 50 << 20,
                burst: 0
            })
        );
        assert_eq!(
            Limit::parse("1000,2000"),
            Ok(Limit {
                rate: 1000,
                burst: 2000
            })
        );
        assert_eq!(
            Limit::parse("4K/s,64K"),
            Ok(Limit {
                rate: 4096,
                burst: 65536
            })
        );
        assert!(Limit::parse("0").is_err());
        assert!(Limit::parse("fast").is_err());
    }

    #[test]
    fn operations_past_the_burst_wait_for_the_rate() {
        let l = RateLimiter::new(None, Some(Limit { rate: 20, burst: 5 }));
        let start = Instant::now();
        // 20 available at start (a second's worth), then 20/s: 30 take about half a second.
        for _ in 0..30 {
            l.wait(4096);
        }
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(400), "{t:?}");
        assert!(t < Duration::from_secs(3), "{t:?}");
        let bytes = RateLimiter::new(
            Some(Limit {
                rate: 1 << 20,
                burst: 0,
            }),
            None,
        );
        let start = Instant::now();
        bytes.wait(1 << 20); // the first second's worth
        bytes.wait(512 << 10);
        bytes.wait(1);
        assert!(
            start.elapsed() >= Duration::from_millis(450),
            "{:?}",
            start.elapsed()
        );
    }
}
