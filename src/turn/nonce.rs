//! The gate's nonce schedule, pure: time is milliseconds on a monotonic clock, passed in. Must
//! not import tokio, sockets or the `turn` crate's server.
//!
//! Why it exists: the `turn` crate stores every nonce it issues in a map that it prunes only when
//! an expired nonce is presented to it again, and it issues one for every request that carries
//! no credentials. A million unauthenticated Allocate requests grew the process by 125 MB, for
//! good (docs/benchmarks.md). So the gate answers those challenges itself (401, and 438 for a
//! nonce it does not accept) and hands every client the same *house nonce*, which the crate
//! issued: the gate asks the crate for one with a synthetic request (a [`Probe`]), and rotates it
//! well inside the crate's one-hour nonce lifetime. Retiring an old house nonce means presenting
//! it to the crate after it expired there: the crate forgets it and answers 438 with a new one,
//! which becomes the next house nonce. The crate's map so holds two or three entries whatever
//! the load, and no request with a nonce the crate does not know ever reaches it.
//!
//! A shared nonce gives clients what the crate's own nonces give: those are not bound to a
//! client address either, and are accepted from anyone for an hour.

use std::collections::VecDeque;

/// The `turn` crate's nonce lifetime (turn 0.17 `server::request::NONCE_LIFETIME`).
pub const CRATE_LIFETIME_MS: i64 = 60 * 60_000;
/// A house nonce is handed to clients for this long after the crate issued it...
pub const ROTATE_MS: i64 = 30 * 60_000;
/// ...accepted from clients for this long (inside the crate's lifetime, with a margin)...
pub const ACCEPT_MS: i64 = 55 * 60_000;
/// ...and retired this long after it was issued. The crate's clock started before ours did
/// (it stores its instant, then sends the answer we read), so past this it has expired there.
pub const RETIRE_MS: i64 = CRATE_LIFETIME_MS + 5 * 60_000;
/// A probe the crate has not answered within this is sent again.
pub const PROBE_RETRY_MS: i64 = 1_000;

/// A synthetic request for the crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Without MESSAGE-INTEGRITY: the crate answers 401 with a new nonce.
    Fresh,
    /// Carrying this nonce, expired in the crate: it forgets it and answers 438 with a new one.
    Retire(String),
}

/// The house nonces the crate issued, oldest first, and the probe in flight.
#[derive(Debug, Default)]
pub struct HouseNonces {
    issued: VecDeque<(String, i64)>,
    in_flight: Option<(Probe, i64)>,
}

impl HouseNonces {
    pub fn new() -> Self {
        Self::default()
    }

    /// The nonce to hand to clients; `None` until the crate issued the first one.
    pub fn current(&self) -> Option<&str> {
        self.issued.back().map(|(n, _)| n.as_str())
    }

    /// Whether a client's request may carry `nonce` (else 438 with [`Self::current`]).
    pub fn accepts(&self, nonce: &str, now: i64) -> bool {
        self.issued
            .iter()
            .any(|(n, at)| n == nonce && now - at < ACCEPT_MS)
    }

    /// The probe to send now, if one is due.
    pub fn poll_probe(&mut self, now: i64) -> Option<Probe> {
        if matches!(&self.in_flight, Some((_, sent)) if now - sent < PROBE_RETRY_MS) {
            return None;
        }
        let due = self
            .issued
            .back()
            .is_none_or(|(_, at)| now - at >= ROTATE_MS);
        if !due {
            return None;
        }
        let probe = match self.issued.front() {
            Some((oldest, at)) if self.issued.len() > 1 && now - at >= RETIRE_MS => {
                Probe::Retire(oldest.clone())
            }
            _ => Probe::Fresh,
        };
        self.in_flight = Some((probe.clone(), now));
        Some(probe)
    }

    /// The crate answered the probe in flight; `nonce` is the NONCE its answer carried.
    pub fn answered(&mut self, nonce: Option<String>, now: i64) {
        let Some((probe, _)) = self.in_flight.take() else {
            return; // a late answer to a probe already answered
        };
        if let Probe::Retire(old) = probe {
            // Gone from the crate's map (it answers 438 for a nonce it does not know, too). An
            // answer without a nonce would leave one entry there: not worth a retry loop.
            self.issued.retain(|(n, _)| *n != old);
        }
        if let Some(n) = nonce {
            self.issued.push_back((n, now));
        }
    }

    /// When [`Self::poll_probe`] has something to do next.
    pub fn poll_timeout(&self) -> i64 {
        match (&self.in_flight, self.issued.back()) {
            (Some((_, sent)), _) => sent + PROBE_RETRY_MS,
            (None, Some((_, at))) => at + ROTATE_MS,
            (None, None) => i64::MIN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nonce_comes_from_a_fresh_probe_and_is_retried_until_answered() {
        let mut h = HouseNonces::new();
        assert_eq!(h.current(), None);
        assert!(h.poll_timeout() <= 0);
        assert_eq!(h.poll_probe(0), Some(Probe::Fresh));
        assert_eq!(h.poll_probe(999), None, "in flight");
        assert_eq!(h.poll_timeout(), 1_000);
        assert_eq!(
            h.poll_probe(1_000),
            Some(Probe::Fresh),
            "unanswered: sent again"
        );
        h.answered(Some("n1".into()), 1_010);
        assert_eq!(h.current(), Some("n1"));
        assert!(h.accepts("n1", 1_010));
        assert!(!h.accepts("n2", 1_010));
        assert_eq!(h.poll_probe(1_020), None);
        assert_eq!(h.poll_timeout(), 1_010 + ROTATE_MS);
    }

    #[test]
    fn rotation_keeps_two_nonces_and_retires_the_expired_one() {
        let mut h = HouseNonces::new();
        h.poll_probe(0);
        h.answered(Some("n1".into()), 0);
        // Half an hour on: a second nonce, the first still accepted.
        assert_eq!(h.poll_probe(ROTATE_MS - 1), None);
        assert_eq!(h.poll_probe(ROTATE_MS), Some(Probe::Fresh));
        h.answered(Some("n2".into()), ROTATE_MS);
        assert_eq!(h.current(), Some("n2"));
        assert!(h.accepts("n1", ROTATE_MS));
        assert!(h.accepts("n1", ACCEPT_MS - 1));
        assert!(
            !h.accepts("n1", ACCEPT_MS),
            "no longer accepted before the crate expires it"
        );
        // The next rotation retires n1 (65 min old), whose 438 brings n3.
        let t = 2 * ROTATE_MS;
        assert!(t < RETIRE_MS, "n1 is not old enough at the second rotation");
        assert_eq!(h.poll_probe(t), Some(Probe::Fresh));
        h.answered(Some("n3".into()), t);
        let t = RETIRE_MS.max(3 * ROTATE_MS);
        assert_eq!(h.poll_probe(t), Some(Probe::Retire("n1".into())));
        h.answered(Some("n4".into()), t);
        assert_eq!(h.current(), Some("n4"));
        assert!(!h.accepts("n1", t));
        assert_eq!(h.issued.len(), 3, "n2, n3, n4");
        // From here on every rotation retires one and adds one: the crate's map stays bounded.
        let mut t = t;
        for i in 5..50 {
            t += ROTATE_MS;
            let p = h.poll_probe(t).expect("due");
            assert!(matches!(p, Probe::Retire(_)), "rotation {i}: {p:?}");
            h.answered(Some(format!("n{i}")), t);
            assert!(h.issued.len() <= 3);
            assert!(h.accepts(&format!("n{i}"), t));
        }
    }

    #[test]
    fn a_retire_answered_without_a_nonce_drops_the_old_one_and_asks_afresh() {
        let mut h = HouseNonces::new();
        h.poll_probe(0);
        h.answered(Some("n1".into()), 0);
        h.poll_probe(ROTATE_MS);
        h.answered(Some("n2".into()), ROTATE_MS);
        h.poll_probe(2 * ROTATE_MS);
        h.answered(Some("n3".into()), 2 * ROTATE_MS);
        let t = 3 * ROTATE_MS;
        assert_eq!(h.poll_probe(t), Some(Probe::Retire("n1".into())));
        h.answered(None, t);
        assert_eq!(h.current(), Some("n3"));
        assert_eq!(
            h.poll_probe(t + 1),
            Some(Probe::Fresh),
            "still due, nothing to retire"
        );
        // A late second answer to the same probe changes nothing.
        h.answered(Some("late".into()), t + 2);
        h.answered(Some("later".into()), t + 3);
        assert_eq!(h.current(), Some("late"));
    }
}
