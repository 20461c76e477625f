//! Allocation quotas and bandwidth caps, pure.
//!
//! [`QuotaBook`] counts live allocations per user and in total. It is shared by the engines of
//! every worker (behind one mutex, taken only when an allocation is created or deleted), so the
//! quotas hold for the server as a whole; an entry exists only while it counts something.
//! [`ByteBucket`] is a token bucket of bytes used per allocation and per worker.

use std::collections::HashMap;
use std::time::Instant;

/// Why an allocation was refused (RFC 8656 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 486 Allocation Quota Reached.
    UserQuota,
    /// 508 Insufficient Capacity.
    TotalQuota,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UserQuota => "user_quota",
            Refusal::TotalQuota => "total_quota",
        }
    }
}

#[derive(Debug)]
pub struct QuotaBook {
    user_quota: u32,
    total_quota: u32,
    per_user: HashMap<String, u32>,
    total: u32,
}

impl QuotaBook {
    pub fn new(user_quota: u32, total_quota: u32) -> Self {
        Self {
            user_quota,
            total_quota,
            per_user: HashMap::new(),
            total: 0,
        }
    }

    /// New limits (reload); allocations over them stay until they end.
    pub fn set_limits(&mut self, user_quota: u32, total_quota: u32) {
        self.user_quota = user_quota;
        self.total_quota = total_quota;
    }

    /// Counts one more allocation of `user`, or says why not.
    pub fn reserve(&mut self, user: &str) -> Result<(), Refusal> {
        if self.total >= self.total_quota {
            return Err(Refusal::TotalQuota);
        }
        let n = self.per_user.get(user).copied().unwrap_or(0);
        if n >= self.user_quota {
            return Err(Refusal::UserQuota);
        }
        *self.per_user.entry(user.to_owned()).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// One allocation of `user` ended.
    pub fn release(&mut self, user: &str) {
        if let Some(n) = self.per_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(user);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn of(&self, user: &str) -> u32 {
        self.per_user.get(user).copied().unwrap_or(0)
    }
}

/// A token bucket of bytes: `rate` bytes per second, bursts of one second's worth (at least
/// one largest datagram, so every packet can pass at some point). Rate 0 means unlimited.
#[derive(Debug, Clone)]
pub struct ByteBucket {
    rate: u64,
    capacity: u64,
    tokens: u64,
    last: Option<Instant>,
}

/// The burst every capped bucket allows at least: one largest UDP datagram.
const MIN_BURST: u64 = 65_535;

impl ByteBucket {
    /// A bucket of `bits_per_sec` (0: unlimited; a cap below 8 bit/s is 1 byte/s), full.
    pub fn new(bits_per_sec: u64) -> Self {
        let rate = if bits_per_sec == 0 {
            0
        } else {
            (bits_per_sec / 8).max(1)
        };
        let capacity = rate.max(MIN_BURST);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: None,
        }
    }

    /// Takes `n` bytes at `now`; `false` means over the cap (the packet is dropped).
    pub fn take(&mut self, n: usize, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        if let Some(last) = self.last {
            let micros = now.saturating_duration_since(last).as_micros() as u64;
            if micros > 0 {
                let refill = self.rate.saturating_mul(micros) / 1_000_000;
                // Only move `last` when something was added, so tiny steps accumulate.
                if refill > 0 {
                    self.tokens = (self.tokens + refill).min(self.capacity);
                    self.last = Some(now);
                }
            }
        } else {
            self.last = Some(now);
        }
        let n = n as u64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn quotas_per_user_and_total() {
        let mut q = QuotaBook::new(2, 3);
        assert_eq!(q.reserve("a"), Ok(()));
        assert_eq!(q.reserve("a"), Ok(()));
        assert_eq!(q.reserve("a"), Err(Refusal::UserQuota));
        assert_eq!(q.reserve("b"), Ok(()));
        assert_eq!(q.reserve("c"), Err(Refusal::TotalQuota));
        q.release("a");
        assert_eq!(q.reserve("c"), Ok(()));
        q.release("a");
        q.release("b");
        q.release("c");
        q.release("nobody");
        assert_eq!(q.total(), 0);
        assert!(q.per_user.is_empty(), "no entry outlives what it counts");
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // an epoch for the test
    fn bucket_caps_bytes_per_second() {
        let t0 = Instant::now();
        let mut b = ByteBucket::new(8_000_000); // 1 MB/s
        assert!(b.take(600_000, t0));
        assert!(b.take(400_000, t0));
        assert!(!b.take(1, t0));
        assert!(b.take(100_000, t0 + Duration::from_millis(100)));
        assert!(!b.take(100_000, t0 + Duration::from_millis(100)));
        assert!(
            b.take(1_000_000, t0 + Duration::from_secs(5)),
            "refilled to one second"
        );
        assert!(!b.take(1, t0 + Duration::from_secs(5)));
        // A small cap still lets a largest datagram through (the burst is at least that).
        let mut small = ByteBucket::new(8_000);
        assert!(small.take(65_535, t0));
        assert!(!small.take(1000, t0));
        assert!(small.take(1000, t0 + Duration::from_secs(1)));
        let mut tiny = ByteBucket::new(1);
        assert!(
            tiny.take(65_535, t0),
            "below 8 bit/s is still a cap, not unlimited"
        );
        assert!(!tiny.take(1, t0));
        let mut off = ByteBucket::new(0);
        assert!(off.take(usize::MAX, t0));
    }
}
