//! Hot facts of chats in memory, in front of any [`Store`]: a chat's record (kind, title,
//! members, next seq) and its members' delivery and read cursors, so the access check every
//! chat request makes, a message's statuses and call setup read no database.
//!
//! Kept exact, not "fresh enough": a chat is loaded on first use, and every write that changes
//! what is cached goes through this decorator, which applies it once the store has committed it
//! (seqs and cursors only ever grow, so changes are applied as maxima and their order does not
//! matter). A change that lands while the chat is being loaded is remembered and applied to
//! what the load read (applying one the load already saw changes nothing). Bounded: at most
//! [`CAPACITY`] chats; beyond, a loaded one is dropped to make room.
//!
//! One node only: with several nodes another node's writes do not pass here; PROTOCOL §8's
//! cluster must invalidate through the broker (issue 16).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::*;

/// Chats held at most.
const CAPACITY: usize = 100_000;

/// What is known of one chat.
#[derive(Clone)]
struct Facts {
    chat: ChatRecord,
    members: Vec<Member>,
}

/// A change to apply to a chat's facts.
#[derive(Clone)]
enum Change {
    Seq(i64),
    Cursor(CursorUpdate),
}

enum Slot {
    /// Being read from the store; the changes committed meanwhile.
    Loading(Vec<Change>),
    Ready(Facts),
}

impl Facts {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Seq(seq) => self.chat.last_seq = self.chat.last_seq.max(*seq),
            Change::Cursor(u) => {
                if let Some(m) = self.members.iter_mut().find(|m| m.user_id == u.user_id) {
                    // As the store moves them: never back, and a read is a delivery too.
                    m.delivered_seq = m.delivered_seq.max(u.seq);
                    if u.kind == CursorKind::Read {
                        m.read_seq = m.read_seq.max(u.seq);
                    }
                }
            }
        }
    }
}

/// A store with the hot facts of its chats in memory.
pub struct Cached<S: ?Sized> {
    inner: Arc<S>,
    chats: Mutex<HashMap<String, Slot>>,
}

impl<S: Store + ?Sized> Cached<S> {
    pub fn new(inner: Arc<S>) -> Self {
        Self {
            inner,
            chats: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.chats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for one more chat: drops a loaded one when full (never one being loaded).
    fn make_room(chats: &mut HashMap<String, Slot>) {
        if chats.len() < CAPACITY {
            return;
        }
        let victim = chats
            .iter()
            .find(|(_, s)| matches!(s, Slot::Ready(_)))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            chats.remove(&k);
        }
    }

    /// The facts of `chat_id`, loading them on first use; `None` when there is no such chat.
    async fn facts(&self, chat_id: &str) -> StoreResult<Option<Facts>> {
        {
            let mut chats = self.lock();
            match chats.get(chat_id) {
                Some(Slot::Ready(f)) => return Ok(Some(f.clone())),
                Some(Slot::Loading(_)) => {}
                None => {
                    Self::make_room(&mut chats);
                    chats.insert(chat_id.to_owned(), Slot::Loading(Vec::new()));
                }
            }
        }
        let loaded = async {
            let chat = match self.inner.chat(chat_id).await {
                Ok(c) => c,
                Err(StoreError::NotFound) => return Ok(None),
                Err(e) => return Err(e),
            };
            let members = self.inner.members(chat_id).await?;
            Ok(Some(Facts { chat, members }))
        }
        .await;
        let mut chats = self.lock();
        match loaded {
            Ok(Some(mut facts)) => match chats.remove(chat_id) {
                Some(Slot::Loading(changes)) => {
                    for c in &changes {
                        facts.apply(c);
                    }
                    chats.insert(chat_id.to_owned(), Slot::Ready(facts.clone()));
                    Ok(Some(facts))
                }
                // Another load finished first: its facts (with every change since) win.
                Some(Slot::Ready(f)) => {
                    chats.insert(chat_id.to_owned(), Slot::Ready(f.clone()));
                    Ok(Some(f))
                }
                // Dropped for room meanwhile: answer from this load without keeping it.
                None => Ok(Some(facts)),
            },
            other => {
                if let Some(Slot::Loading(_)) = chats.get(chat_id) {
                    chats.remove(chat_id);
                }
                other
            }
        }
    }

    /// Applies committed changes to the chats held (or being loaded).
    fn changed(&self, changes: impl IntoIterator<Item = (String, Change)>) {
        let mut chats = self.lock();
        for (chat_id, change) in changes {
            match chats.get_mut(&chat_id) {
                Some(Slot::Ready(f)) => f.apply(&change),
                Some(Slot::Loading(pending)) => pending.push(change),
                None => {}
            }
        }
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for Cached<S> {
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn create_user(&self, user: NewUser) -> StoreResult<UserRecord> {
        self.inner.create_user(user).await
    }
    async fn user_by_id(&self, id: &str) -> StoreResult<UserRecord> {
        self.inner.user_by_id(id).await
    }
    async fn user_by_username(&self, username: &str) -> StoreResult<UserRecord> {
        self.inner.user_by_username(username).await
    }
    async fn user_by_external_sub(&self, sub: &str) -> StoreResult<UserRecord> {
        self.inner.user_by_external_sub(sub).await
    }
    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        self.inner.list_users().await
    }
    async fn set_last_seen(&self, user_id: &str, at: i64) -> StoreResult<()> {
        self.inner.set_last_seen(user_id, at).await
    }
    async fn contacts_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        self.inner.contacts_of(user_id).await
    }
    async fn insert_refresh_token(
        &self,
        token_hash: &str,
        user_id: &str,
        family_id: &str,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        self.inner
            .insert_refresh_token(token_hash, user_id, family_id, expires_at, now)
            .await
    }
    async fn rotate_refresh_token(
        &self,
        token_hash: &str,
        next: NextRefreshToken,
        now: i64,
    ) -> StoreResult<RefreshOutcome> {
        self.inner.rotate_refresh_token(token_hash, next, now).await
    }
    async fn create_chat(&self, chat: NewChat) -> StoreResult<(ChatRecord, bool)> {
        let (record, created) = self.inner.create_chat(chat).await?;
        if created {
            // A new chat: its facts are known without asking (every cursor at 0).
            let members = record
                .participant_ids
                .iter()
                .map(|u| Member {
                    user_id: u.clone(),
                    delivered_seq: 0,
                    read_seq: 0,
                })
                .collect();
            let mut chats = self.lock();
            Self::make_room(&mut chats);
            chats.insert(
                record.id.clone(),
                Slot::Ready(Facts {
                    chat: record.clone(),
                    members,
                }),
            );
        }
        Ok((record, created))
    }
    async fn chat(&self, chat_id: &str) -> StoreResult<ChatRecord> {
        self.facts(chat_id)
            .await?
            .map(|f| f.chat)
            .ok_or(StoreError::NotFound)
    }
    async fn chats_of(&self, user_id: &str) -> StoreResult<Vec<ChatOverview>> {
        self.inner.chats_of(user_id).await
    }
    async fn chats_with_members(
        &self,
        user_id: &str,
    ) -> StoreResult<Vec<(ChatRecord, Vec<Member>)>> {
        self.inner.chats_with_members(user_id).await
    }
    async fn is_member(&self, chat_id: &str, user_id: &str) -> StoreResult<bool> {
        Ok(self
            .facts(chat_id)
            .await?
            .is_some_and(|f| f.members.iter().any(|m| m.user_id == user_id)))
    }
    async fn members(&self, chat_id: &str) -> StoreResult<Vec<Member>> {
        Ok(self
            .facts(chat_id)
            .await?
            .map(|f| f.members)
            .unwrap_or_default())
    }
    async fn insert_messages(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<(MessageRecord, bool)>> {
        let out = self.inner.insert_messages(msgs).await?;
        self.changed(
            out.iter()
                .map(|(m, _)| (m.chat_id.clone(), Change::Seq(m.seq))),
        );
        Ok(out)
    }
    async fn message(&self, id: &str) -> StoreResult<MessageRecord> {
        self.inner.message(id).await
    }
    async fn messages(&self, chat_id: &str, page: Page) -> StoreResult<(Vec<MessageRecord>, bool)> {
        self.inner.messages(chat_id, page).await
    }
    async fn messages_after_many(
        &self,
        wants: &[(String, i64, i64)],
    ) -> StoreResult<Vec<Vec<MessageRecord>>> {
        self.inner.messages_after_many(wants).await
    }
    async fn pinned(&self, chat_id: &str) -> StoreResult<Vec<MessageRecord>> {
        self.inner.pinned(chat_id).await
    }
    async fn set_pinned(&self, id: &str, pinned: bool) -> StoreResult<(MessageRecord, bool)> {
        self.inner.set_pinned(id, pinned).await
    }
    async fn record_call(
        &self,
        call: CallRecord,
        message: NewMessage,
    ) -> StoreResult<MessageRecord> {
        let m = self.inner.record_call(call, message).await?;
        self.changed([(m.chat_id.clone(), Change::Seq(m.seq))]);
        Ok(m)
    }
    async fn advance_cursors(&self, updates: Vec<CursorUpdate>) -> StoreResult<Vec<StatusChange>> {
        let out = self.inner.advance_cursors(updates.clone()).await?;
        self.changed(
            updates
                .into_iter()
                .map(|u| (u.chat_id.clone(), Change::Cursor(u))),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(u: &str, d: i64, r: i64) -> Member {
        Member {
            user_id: u.into(),
            delivered_seq: d,
            read_seq: r,
        }
    }

    #[test]
    fn changes_apply_as_maxima_in_any_order() {
        let base = Facts {
            chat: ChatRecord {
                id: "c".into(),
                kind: ChatKind::Group,
                title: None,
                participant_ids: vec!["a".into(), "b".into()],
                created_at: 0,
                last_seq: 3,
            },
            members: vec![member("a", 0, 0), member("b", 2, 1)],
        };
        let cursor = |seq, kind| {
            Change::Cursor(CursorUpdate {
                chat_id: "c".into(),
                user_id: "b".into(),
                kind,
                seq,
            })
        };
        let changes = [
            Change::Seq(5),
            cursor(4, CursorKind::Delivered),
            cursor(3, CursorKind::Read),
            Change::Seq(4),
            cursor(1, CursorKind::Read),
        ];
        let mut forward = base.clone();
        changes.iter().for_each(|c| forward.apply(c));
        let mut backward = base.clone();
        changes.iter().rev().for_each(|c| backward.apply(c));
        for f in [&forward, &backward] {
            assert_eq!(f.chat.last_seq, 5);
            assert_eq!(f.members[1], member("b", 4, 3));
            assert_eq!(f.members[0], member("a", 0, 0));
        }
        // Applying a change the load already saw changes nothing.
        let mut again = forward.clone();
        changes.iter().for_each(|c| again.apply(c));
        assert_eq!(again.members, forward.members);
    }
}
