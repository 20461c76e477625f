//! The pure part of moving delivered/read cursors, shared by the backends: apply a batch of
//! moves to a chat's members (never backwards, a read moves delivered too), and say for which
//! senders the cumulative status of their messages moved, over which seq range. The backend then
//! writes each moved member once and looks up the highest message of each sender in its range.
//!
//! Why per chat and per batch rather than per move: a batch of delivery reports for a group of
//! 50 holds up to 49 moves of one chat; recomputing every sender's minimum after each move cost
//! O(members²) per move and a status lookup per move (docs/benchmarks.md, chats of 50).

use super::{CursorKind, CursorUpdate, Member, MessageStatus};

/// `updates` grouped by chat, chats in the order they first appear (a backend then runs one
/// pass per chat).
pub fn by_chat(updates: &[CursorUpdate]) -> Vec<(&str, Vec<&CursorUpdate>)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut chats: Vec<(&str, Vec<&CursorUpdate>)> = Vec::new();
    for u in updates {
        let i = *index.entry(&u.chat_id).or_insert_with(|| {
            chats.push((&u.chat_id, Vec::new()));
            chats.len() - 1
        });
        chats[i].1.push(u);
    }
    chats
}

/// Applies `updates` (all of one chat) to `members` as maxima. Returns the indexes of the
/// members whose cursors moved, each once. Updates for users who are not members are ignored.
pub fn apply(members: &mut [Member], updates: &[&CursorUpdate]) -> Vec<usize> {
    let mut moved = Vec::new();
    for u in updates {
        let Some(i) = members.iter().position(|m| m.user_id == u.user_id) else {
            continue;
        };
        let m = &mut members[i];
        let old = (m.delivered_seq, m.read_seq);
        m.delivered_seq = m.delivered_seq.max(u.seq);
        if u.kind == CursorKind::Read {
            m.read_seq = m.read_seq.max(u.seq);
        }
        if (m.delivered_seq, m.read_seq) != old && !moved.contains(&i) {
            moved.push(i);
        }
    }
    moved
}

/// A sender's messages in `(low, high]` reached `status` (the highest of them is the one to
/// report; the status holds for the sender's lower seqs too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMove {
    pub sender: usize,
    pub status: MessageStatus,
    pub low: i64,
    pub high: i64,
}

/// The status moves between `before` and `after` (the same members in the same order): for
/// each sender, the minimum over the others of the read cursor and of the effective delivered
/// cursor (read implies delivered). Read first; delivered only above the new read minimum.
pub fn status_moves(before: &[Member], after: &[Member]) -> Vec<StatusMove> {
    debug_assert_eq!(before.len(), after.len());
    let (b, a) = (Minima::of(before), Minima::of(after));
    let mut out = Vec::new();
    for sender in 0..after.len() {
        let (Some((old_read, old_delivered)), Some((new_read, new_delivered))) =
            (b.except(sender), a.except(sender))
        else {
            continue;
        };
        if new_read > old_read {
            out.push(StatusMove {
                sender,
                status: MessageStatus::Read,
                low: old_read,
                high: new_read,
            });
        }
        let low = old_delivered.max(new_read);
        if new_delivered > low {
            out.push(StatusMove {
                sender,
                status: MessageStatus::Delivered,
                low,
                high: new_delivered,
            });
        }
    }
    out
}

/// The two smallest values of a column with the index of the smallest: the minimum over
/// everyone but one member in O(1).
struct Min2 {
    first: (i64, usize),
    second: i64,
}

impl Min2 {
    fn of(values: impl Iterator<Item = i64>) -> Option<Self> {
        let mut out: Option<Self> = None;
        for (i, v) in values.enumerate() {
            out = Some(match out {
                None => Self {
                    first: (v, i),
                    second: i64::MAX,
                },
                Some(m) if v < m.first.0 => Self {
                    first: (v, i),
                    second: m.first.0,
                },
                Some(m) => Self {
                    second: m.second.min(v),
                    ..m
                },
            });
        }
        out
    }

    fn except(&self, i: usize) -> i64 {
        if self.first.1 == i {
            self.second
        } else {
            self.first.0
        }
    }
}

struct Minima {
    read: Option<Min2>,
    delivered: Option<Min2>,
    len: usize,
}

impl Minima {
    fn of(members: &[Member]) -> Self {
        Self {
            read: Min2::of(members.iter().map(|m| m.read_seq)),
            delivered: Min2::of(members.iter().map(|m| m.delivered_seq.max(m.read_seq))),
            len: members.len(),
        }
    }

    /// `(read, delivered)` minima over the members other than `i`; `None` when nobody else.
    fn except(&self, i: usize) -> Option<(i64, i64)> {
        if self.len < 2 {
            return None;
        }
        Some((
            self.read.as_ref()?.except(i),
            self.delivered.as_ref()?.except(i),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(u: &str, d: i64, r: i64) -> Member {
        Member {
            user_id: u.into(),
            delivered_seq: d,
            read_seq: r,
        }
    }

    fn up(u: &str, kind: CursorKind, seq: i64) -> CursorUpdate {
        CursorUpdate {
            chat_id: "c".into(),
            user_id: u.into(),
            kind,
            seq,
        }
    }

    /// The reference: the minimum over the others, computed the slow way.
    fn slow_min(members: &[Member], except: usize) -> Option<(i64, i64)> {
        members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != except)
            .map(|(_, m)| (m.read_seq, m.delivered_seq.max(m.read_seq)))
            .reduce(|a, b| (a.0.min(b.0), a.1.min(b.1)))
    }

    #[test]
    fn moves_are_maxima_and_each_moved_member_is_listed_once() {
        let mut ms = vec![m("a", 5, 2), m("b", 1, 1)];
        let ups = [
            up("b", CursorKind::Delivered, 4),
            up("b", CursorKind::Read, 3),
            up("a", CursorKind::Delivered, 3), // behind: no move
            up("x", CursorKind::Read, 9),      // not a member
            up("b", CursorKind::Delivered, 2), // behind
        ];
        let moved = apply(&mut ms, &ups.iter().collect::<Vec<_>>());
        assert_eq!(moved, vec![1]);
        assert_eq!(ms, vec![m("a", 5, 2), m("b", 4, 3)]);
    }

    #[test]
    fn minima_except_one_match_the_slow_way() {
        // Every member count up to 5, cursors from a small range so that ties occur.
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as i64 % 4
        };
        for n in 0..6 {
            for _ in 0..200 {
                let ms: Vec<Member> = (0..n)
                    .map(|i| {
                        let r = next();
                        m(&format!("u{i}"), r + next(), r)
                    })
                    .collect();
                let mins = Minima::of(&ms);
                for i in 0..n {
                    assert_eq!(mins.except(i), slow_min(&ms, i), "{ms:?} except {i}");
                }
            }
        }
    }

    #[test]
    fn a_batch_reports_the_highest_status_per_sender_once() {
        // a sent 1..=6 in a chat with b and c. b and c both read up to 4 and got up to 6.
        let before = vec![m("a", 6, 6), m("b", 2, 1), m("c", 3, 0)];
        let mut after = before.clone();
        let ups = [
            up("b", CursorKind::Read, 4),
            up("c", CursorKind::Delivered, 6),
            up("b", CursorKind::Delivered, 6),
            up("c", CursorKind::Read, 4),
        ];
        let moved = apply(&mut after, &ups.iter().collect::<Vec<_>>());
        assert_eq!(moved, vec![1, 2]);
        let moves = status_moves(&before, &after);
        let for_a: Vec<_> = moves.iter().filter(|s| s.sender == 0).collect();
        assert_eq!(
            for_a,
            vec![
                &StatusMove {
                    sender: 0,
                    status: MessageStatus::Read,
                    low: 0,
                    high: 4
                },
                &StatusMove {
                    sender: 0,
                    status: MessageStatus::Delivered,
                    low: 4,
                    high: 6
                },
            ]
        );
        // b's messages: the others are a (6, 6) and c: read 0 -> 4, delivered 3 -> 6.
        assert!(moves.contains(&StatusMove {
            sender: 1,
            status: MessageStatus::Read,
            low: 0,
            high: 4
        }));
        // Nothing moves when nothing changed, and a chat of one has no one to report to.
        assert!(status_moves(&after, &after).is_empty());
        assert!(status_moves(&[m("a", 0, 0)], &[m("a", 5, 5)]).is_empty());
    }
}
