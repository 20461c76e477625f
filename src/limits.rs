//! Rate limits shared by the transports, pure: token buckets with the time passed in, and a
//! bounded map of them per key (a user). No tokio, no clock.

use std::collections::HashMap;

/// Most messages one `message:forward-multiple` may name.
pub const FORWARD_MAX: usize = 100;

/// A token bucket: `rate` tokens per second up to `burst`, spent one per unit of work.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_ms: f64,
    burst: f64,
    tokens: f64,
    last_ms: i64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: i64) -> Self {
        Self {
            rate_per_ms: rate_per_sec as f64 / 1000.0,
            burst: burst as f64,
            tokens: burst as f64,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let dt = (now_ms - self.last_ms).max(0) as f64;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + dt * self.rate_per_ms).min(self.burst);
    }

    /// Spends `n` tokens, or none: `Err(ms until n are available)` (never for `n > burst`, which
    /// can never pass: `Err(i64::MAX)`).
    pub fn take(&mut self, n: u32, now_ms: i64) -> Result<(), i64> {
        self.refill(now_ms);
        let n = n as f64;
        if n > self.burst {
            return Err(i64::MAX);
        }
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else if self.rate_per_ms > 0.0 {
            Err(((n - self.tokens) / self.rate_per_ms).ceil() as i64)
        } else {
            Err(i64::MAX)
        }
    }

    /// Whether the bucket is back to full at `now_ms` (then it need not be kept).
    pub fn is_full(&self, now_ms: i64) -> bool {
        let dt = (now_ms - self.last_ms).max(0) as f64;
        self.tokens + dt * self.rate_per_ms >= self.burst
    }
}

/// One bucket per key (a user id), created full on first use. Memory is bounded: full buckets
/// carry no information and are swept once the map passes `max_keys` (at most once a second,
/// so a full map is not rescanned per request); if it is still full, the new key is refused
/// (callers treat that as rate limited).
#[derive(Debug)]
pub struct KeyedBuckets {
    rate: u32,
    burst: u32,
    max_keys: usize,
    buckets: HashMap<String, TokenBucket>,
    last_sweep_ms: Option<i64>,
}

impl KeyedBuckets {
    pub fn new(rate: u32, burst: u32, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            max_keys,
            buckets: HashMap::new(),
            last_sweep_ms: None,
        }
    }

    /// Spends `n` of `key`'s tokens: `Err(retry_after_ms)` when they are not there.
    pub fn take(&mut self, key: &str, n: u32, now_ms: i64) -> Result<(), i64> {
        if self.rate == 0 {
            return Ok(());
        }
        if let Some(b) = self.buckets.get_mut(key) {
            return b.take(n, now_ms);
        }
        if self.buckets.len() >= self.max_keys {
            if self.last_sweep_ms.is_some_and(|t| now_ms - t < 1000) {
                return Err(1000);
            }
            self.last_sweep_ms = Some(now_ms);
            self.buckets.retain(|_, b| !b.is_full(now_ms));
            if self.buckets.len() >= self.max_keys {
                return Err(1000);
            }
        }
        let mut b = TokenBucket::new(self.rate, self.burst, now_ms);
        let r = b.take(n, now_ms);
        self.buckets.insert(key.to_owned(), b);
        r
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_spends_refills_and_caps() {
        let mut b = TokenBucket::new(10, 20, 0);
        assert_eq!(b.take(20, 0), Ok(()));
        assert_eq!(b.take(1, 0), Err(100), "one token takes 100 ms at 10/s");
        assert_eq!(b.take(1, 100), Ok(()));
        assert_eq!(b.take(5, 100), Err(500));
        assert!(!b.is_full(1000));
        assert!(b.is_full(100 + 2000));
        assert_eq!(
            b.take(21, 10_000),
            Err(i64::MAX),
            "more than the burst never passes"
        );
        assert_eq!(
            b.take(20, 10_000),
            Ok(()),
            "refilled to the burst, not beyond"
        );
        assert_eq!(b.take(1, 10_000), Err(100));
    }

    #[test]
    fn keys_are_independent_and_bounded() {
        let mut k = KeyedBuckets::new(1, 2, 3);
        assert_eq!(k.take("a", 2, 0), Ok(()));
        assert!(k.take("a", 1, 0).is_err());
        assert_eq!(k.take("b", 1, 0), Ok(()));
        assert_eq!(k.take("c", 1, 0), Ok(()));
        // Full of live buckets: a fourth key waits.
        assert!(k.take("d", 1, 0).is_err());
        assert_eq!(k.len(), 3);
        // Later the buckets refilled: they are swept and the new key fits.
        assert_eq!(k.take("d", 1, 10_000), Ok(()));
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn rate_zero_disables() {
        let mut k = KeyedBuckets::new(0, 0, 1);
        for _ in 0..1000 {
            assert_eq!(k.take("a", 100, 0), Ok(()));
        }
        assert!(k.is_empty());
    }
}
