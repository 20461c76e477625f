//! Attempt throttling, pure: attempts per key (a username or a client address) inside a
//! sliding window, with the time passed in. An attempt is recorded *before* the expensive check
//! it guards (the password hash), so parallel guesses cannot all slip through before the first
//! one is counted; a success or an attempt that never ran is taken back.
//!
//! Memory is bounded without rescanning: keys live in two generations of `generation` keys each.
//! When the current one fills up it becomes the previous one and the old previous one is dropped;
//! a key touched in the previous generation moves to the current one. So at most
//! `2 * generation` keys are held, every operation is O(1), and only keys that nobody touched
//! while `generation` other keys were created are forgotten early.

use std::collections::HashMap;
use std::net::IpAddr;

pub struct Throttle {
    max_attempts: u32,
    window_ms: i64,
    generation: usize,
    current: HashMap<String, Vec<i64>>,
    previous: HashMap<String, Vec<i64>>,
}

impl Throttle {
    pub fn new(max_attempts: u32, window_ms: i64, generation: usize) -> Self {
        Self {
            max_attempts,
            window_ms,
            generation: generation.max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// The attempts of `key` inside the window at `now`, moved into the current generation.
    fn live(&mut self, key: &str, now: i64) -> Option<&mut Vec<i64>> {
        if !self.current.contains_key(key) {
            let list = self.previous.remove(key)?;
            self.make_room();
            self.current.insert(key.to_owned(), list);
        }
        let window = self.window_ms;
        let list = self.current.get_mut(key)?;
        list.retain(|t| now - t < window);
        Some(list)
    }

    fn make_room(&mut self) {
        if self.current.len() >= self.generation {
            self.previous = std::mem::take(&mut self.current);
        }
    }

    /// `Some(retry_after_ms)` when `key` has used up its attempts at `now`.
    pub fn check(&mut self, key: &str, now: i64) -> Option<i64> {
        let (max, window) = (self.max_attempts, self.window_ms);
        let list = self.live(key, now)?;
        if list.len() as u32 >= max {
            let oldest = list.first().copied().unwrap_or(now);
            Some((oldest + window - now).max(1))
        } else {
            None
        }
    }

    /// Counts an attempt of `key` at `now`.
    pub fn record(&mut self, key: &str, now: i64) {
        if self.live(key, now).is_none() {
            self.make_room();
            self.current.insert(key.to_owned(), Vec::new());
        }
        let cap = self.max_attempts as usize + 1;
        if let Some(list) = self.current.get_mut(key) {
            list.push(now);
            if list.len() > cap {
                let excess = list.len() - cap;
                list.drain(..excess);
            }
        }
    }

    /// Takes back one attempt of `key` recorded at `at` (it succeeded, or never ran).
    pub fn undo(&mut self, key: &str, at: i64) {
        for map in [&mut self.current, &mut self.previous] {
            if let Some(list) = map.get_mut(key) {
                if let Some(pos) = list.iter().rposition(|t| *t == at) {
                    list.remove(pos);
                }
                if list.is_empty() {
                    map.remove(key);
                }
                return;
            }
        }
    }

    /// Forgets every attempt of `key` (a successful login clears its username).
    pub fn clear(&mut self, key: &str) {
        self.current.remove(key);
        self.previous.remove(key);
    }

    /// Keys held (both generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The throttle key of a client address: the address itself for IPv4, its /64 for IPv6 (one
/// subscriber usually holds a whole /64, so per-address keys would be free to multiply).
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_attempts_and_unlocks_after_window() {
        let mut t = Throttle::new(3, 1000, 100);
        for i in 0..3 {
            assert_eq!(t.check("bob", i), None);
            t.record("bob", i);
        }
        assert_eq!(t.check("bob", 10), Some(990));
        assert_eq!(t.check("alice", 10), None);
        assert_eq!(
            t.check("bob", 1000),
            None,
            "the first attempt left the window"
        );
    }

    #[test]
    fn clear_and_undo() {
        let mut t = Throttle::new(2, 1000, 100);
        t.record("bob", 0);
        t.record("bob", 5);
        assert!(t.check("bob", 6).is_some());
        t.undo("bob", 5);
        assert!(t.check("bob", 6).is_none(), "one attempt taken back");
        t.record("bob", 7);
        t.clear("bob");
        assert!(t.check("bob", 8).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn bounded_keys_without_forgetting_live_ones_touched_recently() {
        let mut t = Throttle::new(1, 1_000_000, 10);
        t.record("target", 0);
        for i in 0..1000 {
            t.record(&format!("k{i}"), i);
            if i % 5 == 0 {
                // Touched often enough: it survives every generation change.
                assert!(t.check("target", i).is_some(), "at {i}");
            }
            assert!(t.len() <= 20, "{} keys", t.len());
        }
        assert!(t.check("k999", 1000).is_some());
        assert!(t.check("k0", 1000).is_none(), "long untouched: forgotten");
    }

    #[test]
    fn ipv6_is_bucketed_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), "2001:db8:1:2::/64");
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key("203.0.113.7".parse().unwrap()), "203.0.113.7");
        assert_eq!(
            address_key("::ffff:203.0.113.7".parse().unwrap()),
            "203.0.113.7"
        );
    }
}
