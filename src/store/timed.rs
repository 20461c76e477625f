//! A [`Store`] decorator that records how long each operation takes, in the
//! `switchboard_store_seconds{op}` histogram (summary), whatever the backend. Reads the clock
//! (a monotonic one, for durations).
#![allow(clippy::disallowed_methods)]

use async_trait::async_trait;

use super::*;

/// Times the operations of a store.
pub struct Timed<S: ?Sized>(pub std::sync::Arc<S>);

macro_rules! timed {
    ($op:literal, $call:expr) => {{
        let started = tokio::time::Instant::now();
        let result = $call.await;
        metrics::histogram!("switchboard_store_seconds", "op" => $op).record(started.elapsed().as_secs_f64());
        result
    }};
}

#[async_trait]
impl<S: Store + ?Sized> Store for Timed<S> {
    async fn ping(&self) -> StoreResult<()> {
        timed!("ping", self.0.ping())
    }
    async fn close(&self) {
        self.0.close().await
    }
    async fn create_user(&self, user: NewUser) -> StoreResult<UserRecord> {
        timed!("create_user", self.0.create_user(user))
    }
    async fn user_by_id(&self, id: &str) -> StoreResult<UserRecord> {
        timed!("user_by_id", self.0.user_by_id(id))
    }
    async fn user_by_username(&self, username: &str) -> StoreResult<UserRecord> {
        timed!("user_by_username", self.0.user_by_username(username))
    }
    async fn user_by_external_sub(&self, sub: &str) -> StoreResult<UserRecord> {
        timed!("user_by_external_sub", self.0.user_by_external_sub(sub))
    }
    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        timed!("list_users", self.0.list_users())
    }
    async fn set_last_seen(&self, user_id: &str, at: i64) -> StoreResult<()> {
        timed!("set_last_seen", self.0.set_last_seen(user_id, at))
    }
    async fn contacts_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        timed!("contacts_of", self.0.contacts_of(user_id))
    }
    async fn insert_refresh_token(
        &self,
        token_hash: &str,
        user_id: &str,
        family_id: &str,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        timed!(
            "insert_refresh_token",
            self.0
                .insert_refresh_token(token_hash, user_id, family_id, expires_at, now)
        )
    }
    async fn rotate_refresh_token(
        &self,
        token_hash: &str,
        next: NextRefreshToken,
        now: i64,
    ) -> StoreResult<RefreshOutcome> {
        timed!(
            "rotate_refresh_token",
            self.0.rotate_refresh_token(token_hash, next, now)
        )
    }
    async fn create_chat(&self, chat: NewChat) -> StoreResult<(ChatRecord, bool)> {
        timed!("create_chat", self.0.create_chat(chat))
    }
    async fn chat(&self, chat_id: &str) -> StoreResult<ChatRecord> {
        timed!("chat", self.0.chat(chat_id))
    }
    async fn chats_of(&self, user_id: &str) -> StoreResult<Vec<ChatOverview>> {
        timed!("chats_of", self.0.chats_of(user_id))
    }
    async fn chats_with_members(
        &self,
        user_id: &str,
    ) -> StoreResult<Vec<(ChatRecord, Vec<Member>)>> {
        timed!("chats_with_members", self.0.chats_with_members(user_id))
    }
    async fn is_member(&self, chat_id: &str, user_id: &str) -> StoreResult<bool> {
        timed!("is_member", self.0.is_member(chat_id, user_id))
    }
    async fn members(&self, chat_id: &str) -> StoreResult<Vec<Member>> {
        timed!("members", self.0.members(chat_id))
    }
    async fn insert_messages(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<(MessageRecord, bool)>> {
        timed!("insert_messages", self.0.insert_messages(msgs))
    }
    async fn message(&self, id: &str) -> StoreResult<MessageRecord> {
        timed!("message", self.0.message(id))
    }
    async fn messages(&self, chat_id: &str, page: Page) -> StoreResult<(Vec<MessageRecord>, bool)> {
        timed!("messages", self.0.messages(chat_id, page))
    }
    async fn messages_after_many(
        &self,
        wants: &[(String, i64, i64)],
    ) -> StoreResult<Vec<Vec<MessageRecord>>> {
        timed!("messages_after_many", self.0.messages_after_many(wants))
    }
    async fn pinned(&self, chat_id: &str) -> StoreResult<Vec<MessageRecord>> {
        timed!("pinned", self.0.pinned(chat_id))
    }
    async fn set_pinned(&self, id: &str, pinned: bool) -> StoreResult<(MessageRecord, bool)> {
        timed!("set_pinned", self.0.set_pinned(id, pinned))
    }
    async fn record_call(
        &self,
        call: CallRecord,
        message: NewMessage,
    ) -> StoreResult<MessageRecord> {
        timed!("record_call", self.0.record_call(call, message))
    }
    async fn advance_cursors(&self, updates: Vec<CursorUpdate>) -> StoreResult<Vec<StatusChange>> {
        timed!("advance_cursors", self.0.advance_cursors(updates))
    }
}
