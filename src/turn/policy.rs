//! TURN allocation policy, pure: quotas per user and in total, and which client transport
//! addresses have a live allocation (so requests on a live allocation keep working after their
//! credential expired, up to the maximum allocation lifetime). Inputs carry `now` (unix ms).
//!
//! An Allocate that passed authentication *reserves* a slot under its transaction id; the
//! server's success response *confirms* it, an error response *releases* it, and the
//! allocation's close releases the live slot. Reservations whose response never came are
//! dropped after [`PENDING_TTL_MS`].

use std::collections::HashMap;
use std::net::SocketAddr;

/// How long a reservation waits for the server's response.
pub const PENDING_TTL_MS: i64 = 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RFC 8656 §6.2: 486 Allocation Quota Reached.
    UserQuota,
    /// RFC 8656 §6.2: 508 Insufficient Capacity.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub user: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
struct Pending {
    src: SocketAddr,
    user: String,
    at: i64,
}

pub struct Policy {
    user_quota: u32,
    total_quota: u32,
    max_lifetime_ms: i64,
    live: HashMap<SocketAddr, Live>,
    pending: HashMap<[u8; 12], Pending>,
    per_user: HashMap<String, u32>,
}

impl Policy {
    pub fn new(user_quota: u32, total_quota: u32, max_lifetime_ms: i64) -> Self {
        Self {
            user_quota,
            total_quota,
            max_lifetime_ms,
            live: HashMap::new(),
            pending: HashMap::new(),
            per_user: HashMap::new(),
        }
    }

    pub fn set_limits(&mut self, user_quota: u32, total_quota: u32, max_lifetime_ms: i64) {
        self.user_quota = user_quota;
        self.total_quota = total_quota;
        self.max_lifetime_ms = max_lifetime_ms;
    }

    /// Live allocations.
    pub fn active(&self) -> usize {
        self.live.len()
    }

    fn used(&self) -> usize {
        self.live.len() + self.pending.len()
    }

    fn bump(&mut self, user: &str, delta: i32) {
        let n = self.per_user.entry(user.to_owned()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.per_user.remove(user);
        }
    }

    /// An authenticated Allocate from `src` for `user`.
    pub fn reserve(
        &mut self,
        txid: [u8; 12],
        src: SocketAddr,
        user: &str,
        now: i64,
    ) -> Result<(), Refusal> {
        self.prune(now);
        if self.pending.contains_key(&txid) || self.live.contains_key(&src) {
            // A retransmission, or an Allocate on a live allocation (the server answers 437).
            return Ok(());
        }
        if self.per_user.get(user).copied().unwrap_or(0) >= self.user_quota {
            return Err(Refusal::UserQuota);
        }
        if self.used() >= self.total_quota as usize {
            return Err(Refusal::TotalQuota);
        }
        self.bump(user, 1);
        self.pending.insert(
            txid,
            Pending {
                src,
                user: user.to_owned(),
                at: now,
            },
        );
        Ok(())
    }

    /// The server answered the Allocate with success: the allocation is live.
    pub fn confirm(&mut self, txid: [u8; 12], now: i64) -> bool {
        let Some(p) = self.pending.remove(&txid) else {
            return false;
        };
        if let Some(old) = self.live.insert(
            p.src,
            Live {
                user: p.user,
                created_at: now,
            },
        ) {
            self.bump(&old.user, -1);
        }
        true
    }

    /// The server refused the Allocate.
    pub fn release(&mut self, txid: [u8; 12]) {
        if let Some(p) = self.pending.remove(&txid) {
            self.bump(&p.user, -1);
        }
    }

    /// The allocation of `src` is gone (deleted or expired).
    pub fn closed(&mut self, src: SocketAddr) -> Option<Live> {
        let live = self.live.remove(&src)?;
        self.bump(&live.user, -1);
        Some(live)
    }

    /// Whether `src` has a live allocation still inside the maximum lifetime.
    pub fn live_within_lifetime(&self, src: SocketAddr, now: i64) -> bool {
        self.live
            .get(&src)
            .is_some_and(|l| now - l.created_at < self.max_lifetime_ms)
    }

    pub fn is_pending(&self, txid: &[u8; 12]) -> bool {
        self.pending.contains_key(txid)
    }

    fn prune(&mut self, now: i64) {
        let stale: Vec<[u8; 12]> = self
            .pending
            .iter()
            .filter(|(_, p)| now - p.at > PENDING_TTL_MS)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.release(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn tx(n: u8) -> [u8; 12] {
        [n; 12]
    }

    #[test]
    fn per_user_quota_counts_pending_and_live() {
        let mut p = Policy::new(2, 100, 86_400_000);
        p.reserve(tx(1), addr(1), "alice", 0).unwrap();
        assert!(p.confirm(tx(1), 1));
        p.reserve(tx(2), addr(2), "alice", 2).unwrap();
        assert_eq!(
            p.reserve(tx(3), addr(3), "alice", 3),
            Err(Refusal::UserQuota)
        );
        assert_eq!(
            p.reserve(tx(4), addr(4), "bob", 4),
            Ok(()),
            "other users are not affected"
        );
        // A refused Allocate frees its slot; so does a closed allocation.
        p.release(tx(2));
        p.reserve(tx(5), addr(5), "alice", 5).unwrap();
        assert_eq!(
            p.reserve(tx(6), addr(6), "alice", 6),
            Err(Refusal::UserQuota)
        );
        assert!(p.closed(addr(1)).is_some());
        assert_eq!(p.reserve(tx(7), addr(7), "alice", 7), Ok(()));
    }

    #[test]
    fn total_quota() {
        let mut p = Policy::new(10, 2, 86_400_000);
        p.reserve(tx(1), addr(1), "a", 0).unwrap();
        p.reserve(tx(2), addr(2), "b", 0).unwrap();
        assert_eq!(p.reserve(tx(3), addr(3), "c", 0), Err(Refusal::TotalQuota));
    }

    #[test]
    fn retransmissions_and_existing_allocations_reserve_nothing_new() {
        let mut p = Policy::new(1, 10, 86_400_000);
        p.reserve(tx(1), addr(1), "a", 0).unwrap();
        p.reserve(tx(1), addr(1), "a", 10).unwrap();
        p.confirm(tx(1), 20);
        assert_eq!(
            p.reserve(tx(2), addr(1), "a", 30),
            Ok(()),
            "the server answers 437 itself"
        );
        assert!(!p.is_pending(&tx(2)));
        assert_eq!(p.active(), 1);
    }

    #[test]
    fn lost_responses_expire() {
        let mut p = Policy::new(1, 10, 86_400_000);
        p.reserve(tx(1), addr(1), "a", 0).unwrap();
        assert_eq!(
            p.reserve(tx(2), addr(2), "a", PENDING_TTL_MS),
            Err(Refusal::UserQuota)
        );
        assert_eq!(p.reserve(tx(2), addr(2), "a", PENDING_TTL_MS + 1), Ok(()));
    }

    #[test]
    fn lifetime_limit() {
        let mut p = Policy::new(1, 10, 1000);
        p.reserve(tx(1), addr(1), "a", 0).unwrap();
        p.confirm(tx(1), 100);
        assert!(p.live_within_lifetime(addr(1), 1099));
        assert!(!p.live_within_lifetime(addr(1), 1100));
        assert!(!p.live_within_lifetime(addr(2), 0));
    }
}
