//! Presence and typing, pure: inputs carry `now` (unix ms), outputs are events; the shell asks
//! [`Presence::poll_timeout`] when to call [`Presence::handle_timeout`].
//!
//! Who is connected is the hub's registry; this machine only hears when a user's first
//! connection came up and their last went away. A user stays online for `grace_ms` after the
//! last one, so a page reload does not flicker offline/online. A `typing-start` not refreshed
//! within `typing_ms` ends by itself. No tokio, no clock.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Online {
        user_id: String,
    },
    /// `at` is the last-seen time: when the last connection went away.
    Offline {
        user_id: String,
        at: i64,
    },
    TypingStopped {
        user_id: String,
        chat_id: String,
    },
}

pub struct Presence {
    grace_ms: i64,
    typing_ms: i64,
    /// user → (deadline, when the last connection left)
    pending_offline: HashMap<String, (i64, i64)>,
    /// (user, chat) → deadline
    typing: HashMap<(String, String), i64>,
    /// Every deadline, for `poll_timeout`: (deadline, kind, key).
    timers: BTreeSet<(i64, u8, String, String)>,
}

const T_OFFLINE: u8 = 0;
const T_TYPING: u8 = 1;

impl Presence {
    pub fn new(grace_ms: i64, typing_ms: i64) -> Self {
        Self {
            grace_ms,
            typing_ms,
            pending_offline: HashMap::new(),
            typing: HashMap::new(),
            timers: BTreeSet::new(),
        }
    }

    /// Users inside their offline grace (gone, not yet shown offline).
    pub fn in_grace_count(&self) -> usize {
        self.pending_offline.len()
    }

    /// Whether `user_id` is gone but still inside the grace (so still shown online).
    pub fn in_grace(&self, user_id: &str) -> bool {
        self.pending_offline.contains_key(user_id)
    }

    /// The first connection of `user_id` came up.
    pub fn connected(&mut self, user_id: &str, _now: i64) -> Option<PresenceEvent> {
        if let Some((deadline, _)) = self.pending_offline.remove(user_id) {
            self.timers
                .remove(&(deadline, T_OFFLINE, user_id.to_owned(), String::new()));
            return None; // came back within the grace: nobody saw it leave
        }
        Some(PresenceEvent::Online {
            user_id: user_id.to_owned(),
        })
    }

    /// The last connection of `user_id` went away.
    pub fn disconnected(&mut self, user_id: &str, now: i64) -> Vec<PresenceEvent> {
        if self.grace_ms <= 0 {
            return self.go_offline(user_id, now);
        }
        let deadline = now + self.grace_ms;
        if let Some((old, _)) = self
            .pending_offline
            .insert(user_id.to_owned(), (deadline, now))
        {
            self.timers
                .remove(&(old, T_OFFLINE, user_id.to_owned(), String::new()));
        }
        self.timers
            .insert((deadline, T_OFFLINE, user_id.to_owned(), String::new()));
        Vec::new()
    }

    fn go_offline(&mut self, user_id: &str, at: i64) -> Vec<PresenceEvent> {
        let mut out = Vec::new();
        // Whoever goes offline stops typing everywhere.
        let chats: Vec<String> = self
            .typing
            .keys()
            .filter(|(u, _)| u == user_id)
            .map(|(_, c)| c.clone())
            .collect();
        for chat in chats {
            if self.typing_stop(user_id, &chat) {
                out.push(PresenceEvent::TypingStopped {
                    user_id: user_id.to_owned(),
                    chat_id: chat,
                });
            }
        }
        out.push(PresenceEvent::Offline {
            user_id: user_id.to_owned(),
            at,
        });
        out
    }

    /// `typing-start`: (re)arms the auto-stop deadline. Returns true when this starts typing.
    pub fn typing_start(&mut self, user_id: &str, chat_id: &str, now: i64) -> bool {
        let key = (user_id.to_owned(), chat_id.to_owned());
        let deadline = now + self.typing_ms;
        let previous = self.typing.insert(key, deadline);
        if let Some(old) = previous {
            self.timers
                .remove(&(old, T_TYPING, user_id.to_owned(), chat_id.to_owned()));
        }
        self.timers
            .insert((deadline, T_TYPING, user_id.to_owned(), chat_id.to_owned()));
        previous.is_none()
    }

    /// `typing-stop` (or a sent message): returns true when the user was typing.
    pub fn typing_stop(&mut self, user_id: &str, chat_id: &str) -> bool {
        let key = (user_id.to_owned(), chat_id.to_owned());
        match self.typing.remove(&key) {
            Some(deadline) => {
                self.timers.remove(&(deadline, T_TYPING, key.0, key.1));
                true
            }
            None => false,
        }
    }

    /// When the shell must call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.timers.first().map(|t| t.0)
    }

    /// Fires every deadline at or before `now`.
    pub fn handle_timeout(&mut self, now: i64) -> Vec<PresenceEvent> {
        let mut out = Vec::new();
        while let Some(first) = self.timers.first().cloned() {
            if first.0 > now {
                break;
            }
            self.timers.remove(&first);
            let (_, kind, user, chat) = first;
            if kind == T_OFFLINE {
                if let Some((_, left_at)) = self.pending_offline.remove(&user) {
                    out.extend(self.go_offline(&user, left_at));
                }
            } else if self.typing.remove(&(user.clone(), chat.clone())).is_some() {
                out.push(PresenceEvent::TypingStopped {
                    user_id: user,
                    chat_id: chat,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(u: &str) -> PresenceEvent {
        PresenceEvent::Online { user_id: u.into() }
    }

    #[test]
    fn online_at_the_first_connection_offline_after_the_grace() {
        let mut p = Presence::new(5000, 6000);
        assert_eq!(p.connected("a", 0), Some(online("a")));
        assert!(p.disconnected("a", 30).is_empty());
        assert!(p.in_grace("a"), "still online during the grace");
        assert_eq!(p.poll_timeout(), Some(5030));
        assert!(p.handle_timeout(5029).is_empty());
        assert_eq!(
            p.handle_timeout(5030),
            vec![PresenceEvent::Offline {
                user_id: "a".into(),
                at: 30
            }]
        );
        assert!(!p.in_grace("a"));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn reconnect_within_grace_is_silent() {
        let mut p = Presence::new(5000, 6000);
        p.connected("a", 0);
        p.disconnected("a", 100);
        assert_eq!(p.connected("a", 4000), None);
        assert_eq!(p.poll_timeout(), None);
        assert!(p.handle_timeout(100_000).is_empty());
        assert_eq!(p.in_grace_count(), 0);
    }

    #[test]
    fn zero_grace_is_immediate() {
        let mut p = Presence::new(0, 6000);
        p.connected("a", 0);
        assert_eq!(
            p.disconnected("a", 7),
            vec![PresenceEvent::Offline {
                user_id: "a".into(),
                at: 7
            }]
        );
    }

    #[test]
    fn typing_expires_unless_refreshed() {
        let mut p = Presence::new(5000, 6000);
        assert!(p.typing_start("a", "c", 0));
        assert!(
            !p.typing_start("a", "c", 4000),
            "a refresh is not a new start"
        );
        assert_eq!(p.poll_timeout(), Some(10_000));
        assert!(p.handle_timeout(9_999).is_empty());
        assert_eq!(
            p.handle_timeout(10_000),
            vec![PresenceEvent::TypingStopped {
                user_id: "a".into(),
                chat_id: "c".into()
            }]
        );
        assert!(!p.typing_stop("a", "c"));
    }

    #[test]
    fn going_offline_stops_typing() {
        let mut p = Presence::new(0, 6000);
        p.connected("a", 0);
        p.typing_start("a", "c", 0);
        let ev = p.disconnected("a", 5);
        assert_eq!(
            ev,
            vec![
                PresenceEvent::TypingStopped {
                    user_id: "a".into(),
                    chat_id: "c".into()
                },
                PresenceEvent::Offline {
                    user_id: "a".into(),
                    at: 5
                },
            ]
        );
        assert_eq!(p.poll_timeout(), None);
    }
}
