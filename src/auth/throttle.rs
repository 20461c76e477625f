//! Login throttling, pure: failures per key (a username or a client IP) inside a sliding window.
//! Memory is bounded: past `max_keys` the oldest entries are dropped.

use std::collections::HashMap;

pub struct Throttle {
    max_failures: u32,
    window_ms: i64,
    max_keys: usize,
    failures: HashMap<String, Vec<i64>>,
}

impl Throttle {
    pub fn new(max_failures: u32, window_ms: i64, max_keys: usize) -> Self {
        Self {
            max_failures,
            window_ms,
            max_keys,
            failures: HashMap::new(),
        }
    }

    /// `Some(retry_after_ms)` when `key` is locked out at `now`.
    pub fn check(&mut self, key: &str, now: i64) -> Option<i64> {
        let window = self.window_ms;
        let list = self.failures.get_mut(key)?;
        list.retain(|t| now - t < window);
        if list.len() as u32 >= self.max_failures {
            let oldest = list.first().copied().unwrap_or(now);
            Some((oldest + window - now).max(1))
        } else {
            None
        }
    }

    pub fn record_failure(&mut self, key: &str, now: i64) {
        if self.failures.len() >= self.max_keys && !self.failures.contains_key(key) {
            let window = self.window_ms;
            self.failures
                .retain(|_, v| v.last().is_some_and(|t| now - t < window));
            if self.failures.len() >= self.max_keys {
                // Still full of live entries: forget the one whose last failure is oldest.
                if let Some(k) = self
                    .failures
                    .iter()
                    .min_by_key(|(_, v)| v.last().copied().unwrap_or(0))
                    .map(|(k, _)| k.clone())
                {
                    self.failures.remove(&k);
                }
            }
        }
        let list = self.failures.entry(key.to_owned()).or_default();
        list.push(now);
        let cap = self.max_failures as usize + 1;
        if list.len() > cap {
            let excess = list.len() - cap;
            list.drain(..excess);
        }
    }

    pub fn record_success(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_unlocks_after_window() {
        let mut t = Throttle::new(3, 1000, 100);
        for i in 0..3 {
            assert_eq!(t.check("bob", i), None);
            t.record_failure("bob", i);
        }
        assert_eq!(t.check("bob", 10), Some(990));
        assert_eq!(t.check("alice", 10), None);
        assert_eq!(
            t.check("bob", 1000),
            None,
            "the first failure left the window"
        );
    }

    #[test]
    fn success_clears() {
        let mut t = Throttle::new(1, 1000, 100);
        t.record_failure("bob", 0);
        assert!(t.check("bob", 1).is_some());
        t.record_success("bob");
        assert!(t.check("bob", 2).is_none());
    }

    #[test]
    fn bounded_keys() {
        let mut t = Throttle::new(1, 1_000_000, 10);
        for i in 0..1000 {
            t.record_failure(&format!("k{i}"), i);
        }
        assert!(t.failures.len() <= 10);
        assert!(t.check("k999", 1000).is_some());
    }
}
