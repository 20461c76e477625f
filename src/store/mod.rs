//! Persistence behind the [`Store`] trait: users, refresh tokens, chats, messages and the
//! per-user delivered/read cursors. Backends: [`sqlite`] (default); [`open`] is the one place a
//! backend is chosen from `database.url`. `tests/store_conformance.rs` holds every backend to
//! the same behaviour. Must not import the hub, `client`, the transports or `app`.
//!
//! Invariants every backend keeps:
//! - a message's `seq` is per chat, starts at 1 and has no gaps: it is taken from `chats.last_seq`
//!   inside the same write transaction that inserts the message;
//! - a method returns only after its transaction committed (callers acknowledge after that);
//! - `(sender, client_msg_id)` is unique: a retry returns the stored message with `created: false`.

pub mod cached;
pub mod cursors;
pub mod migrate;
pub mod models;
pub mod postgres;
pub mod sqlite;
mod sqlite_commit;
pub mod timed;

use async_trait::async_trait;

pub use models::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(&'static str),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// One failure shared by every job of a group commit (a failed `COMMIT`).
    #[error("database error: {0}")]
    Shared(std::sync::Arc<rusqlite::Error>),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("file error: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Opens the store `url` names (`database.url`): empty for `switchboard.db` in `data_dir`,
/// `sqlite:PATH` or `sqlite://PATH`, or `postgres://…`. On SQLite (one node) chats' hot facts
/// are served from memory ([`cached`]); on PostgreSQL other nodes write too, so every read goes
/// to the database (the cache would need invalidating through the broker). Every operation
/// that reaches the database is timed into `switchboard_store_seconds`.
pub async fn open(url: &str, data_dir: &std::path::Path) -> StoreResult<std::sync::Arc<dyn Store>> {
    match Backend::of(url, data_dir) {
        Backend::Sqlite(path) => {
            let store = sqlite::SqliteStore::open(&path).await?;
            // Timed inside the cache: the histogram times what reaches the database.
            let timed = std::sync::Arc::new(timed::Timed(std::sync::Arc::new(store)));
            Ok(std::sync::Arc::new(cached::Cached::new(timed)))
        }
        Backend::Postgres(url) => {
            let store = postgres::PostgresStore::open(&url).await?;
            Ok(std::sync::Arc::new(timed::Timed(std::sync::Arc::new(
                store,
            ))))
        }
    }
}

/// The backend a `database.url` names, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Backend {
    pub fn of(url: &str, data_dir: &std::path::Path) -> Backend {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Backend::Postgres(url.to_owned());
        }
        match url
            .strip_prefix("sqlite://")
            .or(url.strip_prefix("sqlite:"))
        {
            Some(path) if !path.is_empty() => Backend::Sqlite(path.into()),
            _ => Backend::Sqlite(data_dir.join("switchboard.db")),
        }
    }
}

/// A message to insert (the store assigns `seq`).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub chat_id: String,
    pub sender_id: String,
    pub content: String,
    pub client_msg_id: Option<String>,
    pub forwarded_from: Option<ForwardedFromRecord>,
    pub call: Option<CallMeta>,
    pub created_at: i64,
}

/// Outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// Valid and now consumed; issue a new pair in the same family.
    Rotated { user_id: String, family_id: String },
    /// Already used: the whole family has been revoked.
    Reused,
    /// Unknown or expired.
    Invalid,
}

/// The refresh token that replaces a presented one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextRefreshToken {
    pub token_hash: String,
    pub expires_at: i64,
}

/// Which per-user cursor moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorKind {
    Delivered,
    Read,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip for readiness checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Waits for what is in flight to commit, then releases the backend's connections. Every
    /// call after it fails (it never hangs).
    async fn close(&self);

    // --- users
    async fn create_user(&self, user: NewUser) -> StoreResult<UserRecord>;
    async fn user_by_id(&self, id: &str) -> StoreResult<UserRecord>;
    async fn user_by_username(&self, username: &str) -> StoreResult<UserRecord>;
    async fn user_by_external_sub(&self, sub: &str) -> StoreResult<UserRecord>;
    async fn list_users(&self) -> StoreResult<Vec<UserRecord>>;
    async fn set_last_seen(&self, user_id: &str, at: i64) -> StoreResult<()>;
    /// Users sharing at least one chat with `user_id` (excluding itself).
    async fn contacts_of(&self, user_id: &str) -> StoreResult<Vec<String>>;

    // --- refresh tokens
    async fn insert_refresh_token(
        &self,
        token_hash: &str,
        user_id: &str,
        family_id: &str,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()>;
    /// Presents the refresh token `token_hash`. When it is valid, in one transaction: it is
    /// marked used and `next` is stored in its family for its user (so a reuse detected at any
    /// moment revokes the new token too). A used one revokes its whole family.
    async fn rotate_refresh_token(
        &self,
        token_hash: &str,
        next: NextRefreshToken,
        now: i64,
    ) -> StoreResult<RefreshOutcome>;

    // --- chats
    /// Creates a chat with the given participants (all must exist: `NotFound` otherwise).
    /// For `direct` chats, returns the existing one (`created == false`) when there is one.
    async fn create_chat(&self, chat: NewChat) -> StoreResult<(ChatRecord, bool)>;
    async fn chat(&self, chat_id: &str) -> StoreResult<ChatRecord>;
    /// The chats of `user_id` with the caller's unread count and last message. A fixed number
    /// of queries, however many chats.
    async fn chats_of(&self, user_id: &str) -> StoreResult<Vec<ChatOverview>>;
    /// Every chat of `user_id` with its members' cursors, in two queries.
    async fn chats_with_members(
        &self,
        user_id: &str,
    ) -> StoreResult<Vec<(ChatRecord, Vec<Member>)>>;
    async fn is_member(&self, chat_id: &str, user_id: &str) -> StoreResult<bool>;
    async fn members(&self, chat_id: &str) -> StoreResult<Vec<Member>>;

    // --- messages
    /// Inserts the messages in order, in one transaction, with consecutive seqs. A message whose
    /// `(sender, client_msg_id)` exists is not inserted; the stored one is returned with
    /// `created == false`.
    async fn insert_messages(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<(MessageRecord, bool)>>;
    async fn message(&self, id: &str) -> StoreResult<MessageRecord>;
    async fn messages(&self, chat_id: &str, page: Page) -> StoreResult<(Vec<MessageRecord>, bool)>;
    /// For each `(chat, after, count)`: the messages with `after < seq <= after + count`, in
    /// one query (seqs have no gaps, so that is the next `count` messages). Same order as asked.
    async fn messages_after_many(
        &self,
        wants: &[(String, i64, i64)],
    ) -> StoreResult<Vec<Vec<MessageRecord>>>;
    async fn pinned(&self, chat_id: &str) -> StoreResult<Vec<MessageRecord>>;
    /// Sets the pinned flag; returns the message and whether it changed.
    async fn set_pinned(&self, id: &str, pinned: bool) -> StoreResult<(MessageRecord, bool)>;

    // --- calls
    /// Records a finished call and its event message in the chat, in one transaction.
    async fn record_call(
        &self,
        call: CallRecord,
        message: NewMessage,
    ) -> StoreResult<MessageRecord>;

    // --- cursors
    /// Moves the cursors forward (never back). A `Read` cursor also moves `Delivered`.
    /// Returns, for every sender whose messages changed status, the highest such message and
    /// its new status.
    async fn advance_cursors(&self, updates: Vec<CursorUpdate>) -> StoreResult<Vec<StatusChange>>;
}

/// One cursor move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorUpdate {
    pub chat_id: String,
    pub user_id: String,
    pub kind: CursorKind,
    pub seq: i64,
}

/// A sender's message whose status changed (cumulative for lower seqs of that sender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub sender_id: String,
    pub chat_id: String,
    pub message_id: String,
    pub seq: i64,
    pub status: MessageStatus,
}

/// A page request on a chat's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Latest { limit: i64 },
    Before { seq: i64, limit: i64 },
    After { seq: i64, limit: i64 },
}
