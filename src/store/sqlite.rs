//! SQLite backend: WAL journal, `synchronous = FULL` (a committed message survives power loss,
//! not only a process crash), one writer connection (SQLite serialises writers anyway; one
//! connection avoids busy-retry storms) and a small pool of readers.
//!
//! Group commit: messages and cursor moves, the writes of the hot path, go to one thread
//! ([`super::sqlite_commit`]) that takes every job queued while the previous transaction
//! committed and writes them in one transaction, so one fsync serves many messages and nothing
//! waits for a timer. Each job's caller hears back only after that commit; a job that fails
//! rolls back its own savepoint and fails alone. The other writes (users, chats, tokens, pins,
//! calls) use the sqlx writer connection; every write transaction takes the write lock when it
//! begins (`BEGIN IMMEDIATE`), so two writers wait for each other instead of failing.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::sqlite_commit::Job;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Jobs waiting for a group commit before callers wait to queue theirs.
const COMMIT_QUEUE: usize = 4096;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    jobs: mpsc::Sender<Job>,
}

pub(super) const MESSAGE_COLUMNS: &str =
    "id, chat_id, seq, sender_id, content, client_msg_id, created_at, \
     pinned, fwd_message_id, fwd_chat_id, fwd_sender_id, call_meta";
/// The same columns of `messages` aliased as `m`.
const MESSAGE_COLUMNS_M: &str = "m.id, m.chat_id, m.seq, m.sender_id, m.content, \
     m.client_msg_id, m.created_at, m.pinned, m.fwd_message_id, m.fwd_chat_id, m.fwd_sender_id, \
     m.call_meta";

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the embedded migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        make_private(path)?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let (jobs, rx) = mpsc::channel(COMMIT_QUEUE);
        super::sqlite_commit::start(path, rx)?;
        Ok(Self {
            writer,
            reader,
            jobs,
        })
    }

    /// Queues `job` for the next group commit; `rx` then gets its result.
    async fn submit<T>(&self, job: Job, rx: oneshot::Receiver<StoreResult<T>>) -> StoreResult<T> {
        let closed = || StoreError::Database(sqlx::Error::PoolClosed);
        self.jobs.send(job).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn members_in<'e, E>(exec: E, chat_id: &str) -> StoreResult<Vec<Member>>
    where
        E: sqlx::Executor<'e, Database = Sqlite>,
    {
        let rows = sqlx::query(
            "SELECT user_id, delivered_seq, read_seq FROM chat_members WHERE chat_id = ? \
             ORDER BY position",
        )
        .bind(chat_id)
        .fetch_all(exec)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Member {
                user_id: r.get(0),
                delivered_seq: r.get(1),
                read_seq: r.get(2),
            })
            .collect())
    }

    async fn chat_in<'e, E>(
        exec: E,
        chat_id: &str,
    ) -> StoreResult<Option<(String, Option<String>, i64, i64)>>
    where
        E: sqlx::Executor<'e, Database = Sqlite>,
    {
        let row = sqlx::query("SELECT kind, title, last_seq, created_at FROM chats WHERE id = ?")
            .bind(chat_id)
            .fetch_optional(exec)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
    }

    /// Members of every chat `user_id` is in, by chat, in one query.
    async fn members_of_chats_of<'e, E>(
        exec: E,
        user_id: &str,
    ) -> StoreResult<HashMap<String, Vec<Member>>>
    where
        E: sqlx::Executor<'e, Database = Sqlite>,
    {
        let rows = sqlx::query(
            "SELECT o.chat_id, o.user_id, o.delivered_seq, o.read_seq FROM chat_members me \
             JOIN chat_members o ON o.chat_id = me.chat_id WHERE me.user_id = ? \
             ORDER BY o.chat_id, o.position",
        )
        .bind(user_id)
        .fetch_all(exec)
        .await?;
        let mut out: HashMap<String, Vec<Member>> = HashMap::new();
        for r in &rows {
            out.entry(r.get(0)).or_default().push(Member {
                user_id: r.get(1),
                delivered_seq: r.get(2),
                read_seq: r.get(3),
            });
        }
        Ok(out)
    }

    async fn load_chat(&self, chat_id: &str) -> StoreResult<ChatRecord> {
        let (kind, title, last_seq, created_at) = Self::chat_in(&self.reader, chat_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let members = Self::members_in(&self.reader, chat_id).await?;
        Ok(make_chat(
            chat_id, &kind, title, last_seq, created_at, &members,
        ))
    }

    /// One message in the transaction: dedupe, take the next seq, insert.
    async fn insert_one(
        tx: &mut Transaction<'_, Sqlite>,
        msg: &NewMessage,
    ) -> StoreResult<(MessageRecord, bool)> {
        if let Some(cid) = &msg.client_msg_id {
            let existing = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ? AND client_msg_id = ?"
            ))
            .bind(&msg.sender_id)
            .bind(cid)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = existing {
                return Ok((message_from_row(&row), false));
            }
        }
        let seq: i64 = sqlx::query_scalar(
            "UPDATE chats SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
        )
        .bind(&msg.chat_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let fwd = msg.forwarded_from.as_ref();
        sqlx::query(
            "INSERT INTO messages (id, chat_id, seq, sender_id, content, client_msg_id, created_at, \
             pinned, fwd_message_id, fwd_chat_id, fwd_sender_id, call_meta) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
        )
        .bind(&msg.id)
        .bind(&msg.chat_id)
        .bind(seq)
        .bind(&msg.sender_id)
        .bind(&msg.content)
        .bind(&msg.client_msg_id)
        .bind(msg.created_at)
        .bind(fwd.map(|f| f.message_id.clone()))
        .bind(fwd.map(|f| f.chat_id.clone()))
        .bind(fwd.map(|f| f.sender_id.clone()))
        .bind(msg.call.as_ref().map(|c| serde_json::to_string(c).expect("plain struct serialises")))
        .execute(&mut **tx)
        .await?;
        Ok((
            MessageRecord {
                id: msg.id.clone(),
                chat_id: msg.chat_id.clone(),
                seq,
                sender_id: msg.sender_id.clone(),
                content: msg.content.clone(),
                client_msg_id: msg.client_msg_id.clone(),
                created_at: msg.created_at,
                pinned: false,
                forwarded_from: msg.forwarded_from.clone(),
                call: msg.call.clone(),
            },
            true,
        ))
    }
}

fn user_from_row(r: &SqliteRow) -> UserRecord {
    UserRecord {
        id: r.get("id"),
        username: r.get("username"),
        display_name: r.get("display_name"),
        password_hash: r.get("password_hash"),
        last_seen_at: r.get("last_seen_at"),
    }
}

fn message_from_row(r: &SqliteRow) -> MessageRecord {
    let fwd_id: Option<String> = r.get("fwd_message_id");
    let call_meta: Option<String> = r.get("call_meta");
    MessageRecord {
        id: r.get("id"),
        chat_id: r.get("chat_id"),
        seq: r.get("seq"),
        sender_id: r.get("sender_id"),
        content: r.get("content"),
        client_msg_id: r.get("client_msg_id"),
        created_at: r.get("created_at"),
        pinned: r.get::<i64, _>("pinned") != 0,
        forwarded_from: fwd_id.map(|message_id| ForwardedFromRecord {
            message_id,
            chat_id: r.get("fwd_chat_id"),
            sender_id: r.get("fwd_sender_id"),
        }),
        // Written by us from the same struct; an unreadable value is shown as a text message.
        call: call_meta.and_then(|j| serde_json::from_str(&j).ok()),
    }
}

const USER_COLUMNS: &str = "id, username, display_name, password_hash, last_seen_at";

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    /// Commits what was queued for the group committer and stops it, then closes both pools,
    /// waiting for in-flight queries.
    async fn close(&self) {
        let (done, stopped) = oneshot::channel();
        if self.jobs.send(Job::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<UserRecord> {
        let res = sqlx::query(
            "INSERT INTO users (id, username, display_name, password_hash, external_sub, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(&user.external_sub)
        .bind(user.created_at)
        .execute(&self.writer)
        .await;
        match res {
            Ok(_) => Ok(UserRecord {
                id: user.id,
                username: user.username,
                display_name: user.display_name,
                password_hash: user.password_hash,
                last_seen_at: None,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("username taken")),
            Err(e) => Err(e.into()),
        }
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = ?"
        ))
        .bind(username)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn user_by_external_sub(&self, sub: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE external_sub = ?"
        ))
        .bind(sub)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY username"
        ))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(user_from_row).collect())
    }

    async fn set_last_seen(&self, user_id: &str, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE users SET last_seen_at = ? WHERE id = ?")
            .bind(at)
            .bind(user_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn contacts_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query_scalar(
            "SELECT DISTINCT o.user_id FROM chat_members m JOIN chat_members o ON o.chat_id = m.chat_id \
             WHERE m.user_id = ? AND o.user_id != ?",
        )
        .bind(user_id)
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    async fn insert_refresh_token(
        &self,
        token_hash: &str,
        user_id: &str,
        family_id: &str,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // Housekeeping: expired tokens are useless even for reuse detection.
        sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(family_id)
        .bind(expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotate_refresh_token(
        &self,
        token_hash: &str,
        next: NextRefreshToken,
        now: i64,
    ) -> StoreResult<RefreshOutcome> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "SELECT user_id, family_id, expires_at, used_at FROM refresh_tokens WHERE token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(RefreshOutcome::Invalid);
        };
        let (user_id, family_id, expires_at, used_at): (String, String, i64, Option<i64>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if used_at.is_some() {
            sqlx::query("DELETE FROM refresh_tokens WHERE family_id = ?")
                .bind(&family_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused);
        }
        if expires_at < now {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")
            .bind(now)
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&next.token_hash)
        .bind(&user_id)
        .bind(&family_id)
        .bind(next.expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { user_id, family_id })
    }

    async fn create_chat(&self, chat: NewChat) -> StoreResult<(ChatRecord, bool)> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for uid in &chat.participant_ids {
            let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = ?")
                .bind(uid)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(StoreError::NotFound);
            }
        }
        let direct_key = (chat.kind == ChatKind::Direct).then(|| {
            let mut ids = chat.participant_ids.clone();
            ids.sort();
            ids.join(":")
        });
        if let Some(key) = &direct_key {
            let existing: Option<String> =
                sqlx::query_scalar("SELECT id FROM chats WHERE direct_key = ?")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(id) = existing {
                drop(tx);
                return Ok((self.load_chat(&id).await?, false));
            }
        }
        sqlx::query(
            "INSERT INTO chats (id, kind, title, direct_key, last_seq, created_at) VALUES (?, ?, ?, ?, 0, ?)",
        )
        .bind(&chat.id)
        .bind(chat.kind.as_str())
        .bind(&chat.title)
        .bind(&direct_key)
        .bind(chat.created_at)
        .execute(&mut *tx)
        .await?;
        for (pos, uid) in chat.participant_ids.iter().enumerate() {
            sqlx::query("INSERT INTO chat_members (chat_id, user_id, position) VALUES (?, ?, ?)")
                .bind(&chat.id)
                .bind(uid)
                .bind(pos as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((
            ChatRecord {
                id: chat.id,
                kind: chat.kind,
                title: chat.title,
                participant_ids: chat.participant_ids,
                created_at: chat.created_at,
                last_seq: 0,
            },
            true,
        ))
    }

    async fn chat(&self, chat_id: &str) -> StoreResult<ChatRecord> {
        self.load_chat(chat_id).await
    }

    async fn chats_of(&self, user_id: &str) -> StoreResult<Vec<ChatOverview>> {
        // One read transaction: the three queries see one snapshot (WAL), so a message
        // committed between them cannot skew the unread count.
        let mut tx = self.reader.begin().await?;
        // 1: the chats with the caller's read cursor and the last message (seqs have no gaps,
        // so it is the one at `last_seq`).
        let rows = sqlx::query(&format!(
            "SELECT c.id AS c_id, c.kind, c.title, c.last_seq, c.created_at AS c_created_at, \
             me.read_seq, {MESSAGE_COLUMNS_M} FROM chat_members me \
             JOIN chats c ON c.id = me.chat_id \
             LEFT JOIN messages m ON m.chat_id = c.id AND m.seq = c.last_seq \
             WHERE me.user_id = ? ORDER BY c.created_at"
        ))
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        // 2: every member of those chats.
        let mut members = Self::members_of_chats_of(&mut *tx, user_id).await?;
        // 3: the caller's own messages after their read cursor, per chat: unread is the rest.
        let own_after: HashMap<String, i64> = sqlx::query_as(
            "SELECT m.chat_id, COUNT(*) FROM chat_members me \
             JOIN messages m ON m.chat_id = me.chat_id AND m.sender_id = me.user_id \
             AND m.seq > me.read_seq WHERE me.user_id = ? GROUP BY m.chat_id",
        )
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        tx.commit().await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get("c_id");
            let kind: String = r.get("kind");
            let last_seq: i64 = r.get("last_seq");
            let read_seq: i64 = r.get("read_seq");
            let chat_members = members.remove(&id).unwrap_or_default();
            let chat = make_chat(
                &id,
                &kind,
                r.get("title"),
                last_seq,
                r.get("c_created_at"),
                &chat_members,
            );
            let last = r
                .get::<Option<String>, _>("id")
                .map(|_| message_from_row(&r));
            let unread_count =
                (last_seq - read_seq - own_after.get(&id).copied().unwrap_or(0)).max(0);
            out.push(ChatOverview {
                chat,
                last_message: last.map(|m| {
                    let status = status_of(m.seq, &m.sender_id, &chat_members);
                    (m, status)
                }),
                unread_count,
            });
        }
        // Most recently active first, as a chat list shows them.
        out.sort_by_key(|o| std::cmp::Reverse(o.last_message.as_ref().map(|(m, _)| m.created_at)));
        Ok(out)
    }

    async fn chats_with_members(
        &self,
        user_id: &str,
    ) -> StoreResult<Vec<(ChatRecord, Vec<Member>)>> {
        let mut tx = self.reader.begin().await?;
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.title, c.last_seq, c.created_at FROM chat_members me \
             JOIN chats c ON c.id = me.chat_id WHERE me.user_id = ? ORDER BY c.created_at",
        )
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut members = Self::members_of_chats_of(&mut *tx, user_id).await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                let kind: String = r.get(1);
                let m = members.remove(&id).unwrap_or_default();
                let chat = make_chat(&id, &kind, r.get(2), r.get(3), r.get(4), &m);
                (chat, m)
            })
            .collect())
    }

    async fn is_member(&self, chat_id: &str, user_id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM chat_members WHERE chat_id = ? AND user_id = ?")
                .bind(chat_id)
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(found.is_some())
    }

    async fn members(&self, chat_id: &str) -> StoreResult<Vec<Member>> {
        Self::members_in(&self.reader, chat_id).await
    }

    async fn insert_messages(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<(MessageRecord, bool)>> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Insert(msgs, reply), rx).await
    }

    async fn message(&self, id: &str) -> StoreResult<MessageRecord> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(message_from_row(&row))
    }

    async fn messages(&self, chat_id: &str, page: Page) -> StoreResult<(Vec<MessageRecord>, bool)> {
        // Fetch one more than asked to learn whether there is more in that direction.
        let (sql, bound, limit, descending) = match page {
            Page::Latest { limit } => (
                format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY seq DESC LIMIT ?"),
                None,
                limit,
                true,
            ),
            Page::Before { seq, limit } => (
                format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"),
                Some(seq),
                limit,
                true,
            ),
            Page::After { seq, limit } => (
                format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?"),
                Some(seq),
                limit,
                false,
            ),
        };
        let mut q = sqlx::query(&sql).bind(chat_id);
        if let Some(seq) = bound {
            q = q.bind(seq);
        }
        let rows = q.bind(limit + 1).fetch_all(&self.reader).await?;
        let has_more = rows.len() as i64 > limit;
        let mut msgs: Vec<MessageRecord> = rows
            .iter()
            .take(limit as usize)
            .map(message_from_row)
            .collect();
        if descending {
            msgs.reverse();
        }
        Ok((msgs, has_more))
    }

    async fn messages_after_many(
        &self,
        wants: &[(String, i64, i64)],
    ) -> StoreResult<Vec<Vec<MessageRecord>>> {
        let wants: Vec<&(String, i64, i64)> = wants.iter().filter(|w| w.2 > 0).collect();
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        // The wishes travel as one JSON parameter: one statement for any number of chats.
        let json = serde_json::to_string(
            &wants
                .iter()
                .map(|(c, after, n)| (c, after, after + n))
                .collect::<Vec<_>>(),
        )
        .expect("strings and integers serialise");
        let rows = sqlx::query(&format!(
            "WITH want(chat_id, after, upto) AS (SELECT json_extract(value, '$[0]'), \
             json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)) \
             SELECT {MESSAGE_COLUMNS_M} FROM want w JOIN messages m \
             ON m.chat_id = w.chat_id AND m.seq > w.after AND m.seq <= w.upto \
             ORDER BY m.chat_id, m.seq"
        ))
        .bind(json)
        .fetch_all(&self.reader)
        .await?;
        let mut by_chat: HashMap<String, Vec<MessageRecord>> = HashMap::new();
        for r in &rows {
            let m = message_from_row(r);
            by_chat.entry(m.chat_id.clone()).or_default().push(m);
        }
        Ok(wants
            .iter()
            .map(|(c, _, _)| by_chat.remove(c).unwrap_or_default())
            .collect())
    }

    async fn pinned(&self, chat_id: &str) -> StoreResult<Vec<MessageRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND pinned = 1 ORDER BY seq"
        ))
        .bind(chat_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    async fn set_pinned(&self, id: &str, pinned: bool) -> StoreResult<(MessageRecord, bool)> {
        let res = sqlx::query("UPDATE messages SET pinned = ? WHERE id = ? AND pinned != ?")
            .bind(pinned as i64)
            .bind(id)
            .bind(pinned as i64)
            .execute(&self.writer)
            .await?;
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok((message_from_row(&row), res.rows_affected() > 0))
    }

    async fn record_call(
        &self,
        call: CallRecord,
        message: NewMessage,
    ) -> StoreResult<MessageRecord> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO calls (id, chat_id, caller_id, callee_id, call_type, started_at, answered_at, \
             ended_at, end_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&call.id)
        .bind(&call.chat_id)
        .bind(&call.caller_id)
        .bind(&call.callee_id)
        .bind(&call.call_type)
        .bind(call.started_at)
        .bind(call.answered_at)
        .bind(call.ended_at)
        .bind(&call.end_reason)
        .execute(&mut *tx)
        .await?;
        let (record, _) = Self::insert_one(&mut tx, &message).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn advance_cursors(&self, updates: Vec<CursorUpdate>) -> StoreResult<Vec<StatusChange>> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Cursors(updates, reply), rx).await
    }
}

/// Writes a consistent copy of the database at `src` to `dest` (`VACUUM INTO`), safe while the
/// server runs: readers never block the WAL writer, and the copy is a single compact file.
pub async fn backup(src: &Path, dest: &Path) -> StoreResult<()> {
    if dest.exists() {
        return Err(StoreError::Conflict("the backup file already exists"));
    }
    // Created empty and private first (VACUUM INTO accepts an empty file), so the copy is never
    // readable by others, not even for a moment.
    make_private(dest)?;
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(src)
        .read_only(true)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query("VACUUM INTO ?")
        .bind(dest.to_string_lossy().into_owned())
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// Creates `path` empty with mode 0600 if it is missing (SQLite takes an empty file as an empty
/// database, and gives its `-wal` and `-shm` files the database file's mode), and takes group
/// and other access away from it and its companions if they have any: chats are private.
fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            if let Ok(meta) = std::fs::metadata(file) {
                if meta.permissions().mode() & 0o077 != 0 {
                    // A file someone else owns cannot be changed by us: say so, and go on.
                    match std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)) {
                        Ok(()) => {
                            tracing::info!(file = %file.display(), "made the database file private (0600)")
                        }
                        Err(e) => tracing::warn!(
                            file = %file.display(),
                            error = %e,
                            "the database file is readable by others and cannot be made private"
                        ),
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    async fn store() -> (tempfile::TempDir, Arc<SqliteStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        (dir, Arc::new(s))
    }

    async fn user(s: &SqliteStore, name: &str) -> String {
        s.create_user(NewUser {
            id: format!("u-{name}"),
            username: name.into(),
            display_name: name.into(),
            password_hash: None,
            external_sub: None,
            created_at: 0,
        })
        .await
        .unwrap()
        .id
    }

    fn msg(chat: &str, sender: &str, content: String, cid: Option<String>) -> NewMessage {
        NewMessage {
            id: uuid::Uuid::now_v7().to_string(),
            chat_id: chat.into(),
            sender_id: sender.into(),
            content,
            client_msg_id: cid,
            forwarded_from: None,
            call: None,
            created_at: 0,
        }
    }

    /// Many concurrent writers share group commits: every message lands once, with gap-free
    /// seqs per chat, and each caller gets back its own message. A job that fails inside a
    /// group (a chat that does not exist) fails alone; the others commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_failing_mid_way_rolls_back_alone_and_cursors_never_go_back() {
        let (_dir, s) = store().await;
        let (a, b) = (user(&s, "a").await, user(&s, "b").await);
        let (chat, _) = s
            .create_chat(NewChat {
                id: "c".into(),
                kind: ChatKind::Group,
                title: None,
                participant_ids: vec![a.clone(), b.clone()],
                created_at: 0,
            })
            .await
            .unwrap();
        // Good jobs around a job whose second statement fails (a duplicate message id): the
        // failing job leaves nothing behind (not its first message, not a seq), the others
        // commit in the same groups.
        let mut tasks = Vec::new();
        for w in 0..20 {
            let (s, chat, a) = (s.clone(), chat.id.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                if w == 7 {
                    let mut first = msg(&chat, &a, "doomed 1".into(), None);
                    first.id = "dup".into();
                    let mut second = msg(&chat, &a, "doomed 2".into(), None);
                    second.id = "dup".into();
                    assert!(s.insert_messages(vec![first, second]).await.is_err());
                    return 0;
                }
                s.insert_messages(vec![msg(&chat, &a, format!("ok {w}"), None)])
                    .await
                    .unwrap()
                    .len()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        assert_eq!(ok, 19);
        let (all, _) = s
            .messages(&chat.id, Page::After { seq: 0, limit: 100 })
            .await
            .unwrap();
        let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=19).collect::<Vec<i64>>());
        assert!(all.iter().all(|m| !m.content.starts_with("doomed")));
        // Cursor moves from many tasks in any order: each cursor ends at the highest asked,
        // never lower, and read implies delivered.
        let ask = |k: i64| ((k * 7) % 19 + 1, k % 3 == 0);
        let mut tasks = Vec::new();
        for k in 0..40i64 {
            let (s, chat, b) = (s.clone(), chat.id.clone(), b.clone());
            let (seq, read) = ask(k);
            tasks.push(tokio::spawn(async move {
                let kind = if read {
                    CursorKind::Read
                } else {
                    CursorKind::Delivered
                };
                s.advance_cursors(vec![CursorUpdate {
                    chat_id: chat,
                    user_id: b,
                    kind,
                    seq,
                }])
                .await
                .unwrap()
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.extend(t.await.unwrap());
        }
        let members = s.members(&chat.id).await.unwrap();
        let me = members.iter().find(|m| m.user_id == b).unwrap();
        let max_read = (0..40).map(ask).filter(|a| a.1).map(|a| a.0).max().unwrap();
        assert_eq!(me.delivered_seq, 19);
        assert_eq!(me.read_seq, max_read);
        // Each status step was reported once.
        for status in [MessageStatus::Delivered, MessageStatus::Read] {
            let mut seqs: Vec<i64> = statuses
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.seq)
                .collect();
            let n = seqs.len();
            seqs.sort();
            seqs.dedup();
            assert_eq!(seqs.len(), n, "{status:?} reported twice");
        }
        assert!(statuses
            .iter()
            .any(|c| c.status == MessageStatus::Read && c.seq == max_read));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_keeps_seqs_gap_free_and_isolates_a_failing_job() {
        let (_dir, s) = store().await;
        let (a, b) = (user(&s, "a").await, user(&s, "b").await);
        let mut chats = Vec::new();
        for i in 0..4 {
            let (chat, _) = s
                .create_chat(NewChat {
                    id: format!("c{i}"),
                    kind: ChatKind::Group,
                    title: None,
                    participant_ids: vec![a.clone(), b.clone()],
                    created_at: 0,
                })
                .await
                .unwrap();
            chats.push(chat.id);
        }
        let mut tasks = Vec::new();
        for w in 0..40 {
            let (s, chat, a) = (s.clone(), chats[w % 4].clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..25 {
                    let content = format!("w{w} m{i}");
                    let cid = Some(format!("w{w}-{i}"));
                    if i == 10 {
                        // A job bound to fail, in the middle of everyone else's groups.
                        let bad =
                            s.insert_messages(vec![msg("no-such-chat", &a, "x".into(), None)]);
                        assert!(matches!(bad.await, Err(StoreError::NotFound)));
                    }
                    let mut out = s
                        .insert_messages(vec![msg(&chat, &a, content.clone(), cid)])
                        .await
                        .unwrap();
                    let (record, created) = out.pop().unwrap();
                    assert!(created);
                    assert_eq!(record.content, content, "each caller gets its own message");
                    got.push(record);
                }
                got
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap().len();
        }
        assert_eq!(total, 1000);
        for chat in &chats {
            let (all, _) = s
                .messages(
                    chat,
                    Page::After {
                        seq: 0,
                        limit: 1000,
                    },
                )
                .await
                .unwrap();
            let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=250).collect::<Vec<i64>>(), "{chat}: gap-free");
        }
        // A retry of an acknowledged message is answered from the store, not inserted again.
        let mut again = s
            .insert_messages(vec![msg(
                &chats[0],
                &a,
                "w0 m0".into(),
                Some("w0-0".into()),
            )])
            .await
            .unwrap();
        assert!(!again.pop().unwrap().1);
        // Cursor moves share the same commits and report status changes.
        let changes = s
            .advance_cursors(vec![CursorUpdate {
                chat_id: chats[0].clone(),
                user_id: b.clone(),
                kind: CursorKind::Read,
                seq: 250,
            }])
            .await
            .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].seq, changes[0].status),
            (250, MessageStatus::Read)
        );
    }
}
