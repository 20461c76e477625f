//! PostgreSQL backend (PROTOCOL §8): the store several nodes share. Its own migrations
//! (`migrations/postgres/`), the same behaviour as SQLite (`tests/store_conformance.rs`).
//!
//! Concurrency across nodes rests on PostgreSQL's row locks, not on one writer:
//! - a message takes its seq with `UPDATE chats SET last_seq = last_seq + 1 … RETURNING` in the
//!   transaction that inserts it: writers into one chat queue on that row, a rolled-back insert
//!   gives its seq back, so seqs stay gap-free and strictly increasing whichever node writes;
//! - a cursor batch locks the chat's member rows (`FOR UPDATE`, chats in id order so two
//!   batches cannot deadlock) before it reads them, so the status changes it reports are
//!   computed from what it moves and every change is reported once;
//! - a refresh token is rotated under its row lock, so two nodes cannot both rotate it;
//! - a direct chat is created with `ON CONFLICT (direct_key) DO NOTHING`: one wins, the other
//!   returns it.
//!
//! Durability: a method returns after `COMMIT` (with the server's default
//! `synchronous_commit = on`, after the WAL flush). Concurrent commits share WAL flushes inside
//! PostgreSQL (its own group commit); there is no batching thread as for SQLite.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per node: enough for the hot path's concurrent transactions; PostgreSQL's
/// default `max_connections` (100) then serves several nodes.
const POOL_SIZE: u32 = 16;

/// How long a call waits for a connection before it fails (PostgreSQL unreachable): callers
/// report an error instead of hanging; `/readyz` turns 503 through `ping`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const MESSAGE_COLUMNS: &str = "id, chat_id, seq, sender_id, content, client_msg_id, created_at, \
     pinned, fwd_message_id, fwd_chat_id, fwd_sender_id, call_meta";
const MESSAGE_COLUMNS_M: &str = "m.id, m.chat_id, m.seq, m.sender_id, m.content, \
     m.client_msg_id, m.created_at, m.pinned, m.fwd_message_id, m.fwd_chat_id, m.fwd_sender_id, \
     m.call_meta";
const USER_COLUMNS: &str = "id, username, display_name, password_hash, last_seen_at";

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…`) and runs the embedded migrations (they take an
    /// advisory lock: nodes starting together migrate once).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    async fn members_in<'e, E>(exec: E, chat_id: &str, lock: bool) -> StoreResult<Vec<Member>>
    where
        E: sqlx::Executor<'e, Database = Postgres>,
    {
        let sql = if lock {
            "SELECT user_id, delivered_seq, read_seq FROM chat_members WHERE chat_id = $1 \
             ORDER BY position FOR UPDATE"
        } else {
            "SELECT user_id, delivered_seq, read_seq FROM chat_members WHERE chat_id = $1 \
             ORDER BY position"
        };
        let rows = sqlx::query(sql).bind(chat_id).fetch_all(exec).await?;
        Ok(rows.iter().map(member_from_row).collect())
    }

    /// Members of every chat `user_id` is in, by chat, in one query.
    async fn members_of_chats_of<'e, E>(
        exec: E,
        user_id: &str,
    ) -> StoreResult<HashMap<String, Vec<Member>>>
    where
        E: sqlx::Executor<'e, Database = Postgres>,
    {
        let rows = sqlx::query(
            "SELECT o.chat_id, o.user_id, o.delivered_seq, o.read_seq FROM chat_members me \
             JOIN chat_members o ON o.chat_id = me.chat_id WHERE me.user_id = $1 \
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
        let mut tx = self.snapshot().await?;
        let row = sqlx::query("SELECT kind, title, last_seq, created_at FROM chats WHERE id = $1")
            .bind(chat_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let members = Self::members_in(&mut *tx, chat_id, false).await?;
        tx.commit().await?;
        let kind: String = row.get(0);
        Ok(make_chat(
            chat_id,
            &kind,
            row.get(1),
            row.get(2),
            row.get(3),
            &members,
        ))
    }

    /// A read-only transaction whose queries all see one snapshot.
    async fn snapshot(&self) -> StoreResult<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// One message in the transaction: dedupe, take the next seq, insert.
    async fn insert_one(
        tx: &mut Transaction<'_, Postgres>,
        msg: &NewMessage,
    ) -> StoreResult<(MessageRecord, bool)> {
        if let Some(cid) = &msg.client_msg_id {
            let existing = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = $1 AND client_msg_id = $2"
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
            "UPDATE chats SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
        )
        .bind(&msg.chat_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let fwd = msg.forwarded_from.as_ref();
        sqlx::query(
            "INSERT INTO messages (id, chat_id, seq, sender_id, content, client_msg_id, \
             created_at, pinned, fwd_message_id, fwd_chat_id, fwd_sender_id, call_meta) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, FALSE, $8, $9, $10, $11)",
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
        .bind(
            msg.call
                .as_ref()
                .map(|c| serde_json::to_string(c).expect("plain struct serialises")),
        )
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

    async fn try_insert_messages(
        &self,
        msgs: &[NewMessage],
    ) -> StoreResult<Vec<(MessageRecord, bool)>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            out.push(Self::insert_one(&mut tx, m).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Highest seq of `sender` in `(low, high]` of `chat_id`, with its message id.
    async fn highest_of_sender(
        tx: &mut Transaction<'_, Postgres>,
        chat_id: &str,
        sender: &str,
        low: i64,
        high: i64,
    ) -> StoreResult<Option<(String, i64)>> {
        let row = sqlx::query(
            "SELECT id, seq FROM messages WHERE chat_id = $1 AND sender_id = $2 AND seq > $3 \
             AND seq <= $4 ORDER BY seq DESC LIMIT 1",
        )
        .bind(chat_id)
        .bind(sender)
        .bind(low)
        .bind(high)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

fn member_from_row(r: &PgRow) -> Member {
    Member {
        user_id: r.get(0),
        delivered_seq: r.get(1),
        read_seq: r.get(2),
    }
}

fn user_from_row(r: &PgRow) -> UserRecord {
    UserRecord {
        id: r.get("id"),
        username: r.get("username"),
        display_name: r.get("display_name"),
        password_hash: r.get("password_hash"),
        last_seen_at: r.get("last_seen_at"),
    }
}

fn message_from_row(r: &PgRow) -> MessageRecord {
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
        pinned: r.get("pinned"),
        forwarded_from: fwd_id.map(|message_id| ForwardedFromRecord {
            message_id,
            chat_id: r.get("fwd_chat_id"),
            sender_id: r.get("fwd_sender_id"),
        }),
        // Written by us from the same struct; an unreadable value is shown as a text message.
        call: call_meta.and_then(|j| serde_json::from_str(&j).ok()),
    }
}

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<UserRecord> {
        let res = sqlx::query(
            "INSERT INTO users (id, username, display_name, password_hash, external_sub, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(&user.external_sub)
        .bind(user.created_at)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from);
        match res {
            Ok(_) => Ok(UserRecord {
                id: user.id,
                username: user.username,
                display_name: user.display_name,
                password_hash: user.password_hash,
                last_seen_at: None,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("username taken")),
            Err(e) => Err(e),
        }
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = $1"
        ))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn user_by_external_sub(&self, sub: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE external_sub = $1"
        ))
        .bind(sub)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(user_from_row(&row))
    }

    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        // COLLATE "C": the same byte order as SQLite's, whatever the database's locale.
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY username COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(user_from_row).collect())
    }

    async fn set_last_seen(&self, user_id: &str, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE users SET last_seen_at = $1 WHERE id = $2")
            .bind(at)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn contacts_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query_scalar(
            "SELECT DISTINCT o.user_id FROM chat_members m \
             JOIN chat_members o ON o.chat_id = m.chat_id \
             WHERE m.user_id = $1 AND o.user_id != $1",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        // Housekeeping: expired tokens are useless even for reuse detection. Rows another
        // transaction holds (a rotation on another node) are left for the next time: waiting
        // for them while holding others could deadlock with it.
        sqlx::query(
            "DELETE FROM refresh_tokens WHERE token_hash IN (SELECT token_hash FROM \
             refresh_tokens WHERE expires_at < $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
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
        let mut tx = self.pool.begin().await?;
        // The row lock makes a second rotation of the same token (another node, the same
        // moment) wait for this one and then see it used.
        let row = sqlx::query(
            "SELECT user_id, family_id, expires_at, used_at FROM refresh_tokens \
             WHERE token_hash = $1 FOR UPDATE",
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
            sqlx::query("DELETE FROM refresh_tokens WHERE family_id = $1")
                .bind(&family_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused);
        }
        if expires_at < now {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2")
            .bind(now)
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
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
        let mut tx = self.pool.begin().await?;
        let found: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = ANY($1)")
            .bind(&chat.participant_ids)
            .fetch_one(&mut *tx)
            .await?;
        let mut distinct = chat.participant_ids.clone();
        distinct.sort();
        distinct.dedup();
        if found != distinct.len() as i64 {
            return Err(StoreError::NotFound);
        }
        let direct_key = (chat.kind == ChatKind::Direct).then(|| distinct.join(":"));
        // A direct chat exists once: of two nodes creating it at the same moment, one inserts
        // and the other (waiting on the unique key) inserts nothing and returns that one.
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO chats (id, kind, title, direct_key, last_seq, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (direct_key) DO NOTHING RETURNING id",
        )
        .bind(&chat.id)
        .bind(chat.kind.as_str())
        .bind(&chat.title)
        .bind(&direct_key)
        .bind(chat.created_at)
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            drop(tx);
            let key = direct_key.expect("only a direct key can conflict");
            let id: String = sqlx::query_scalar("SELECT id FROM chats WHERE direct_key = $1")
                .bind(&key)
                .fetch_one(&self.pool)
                .await?;
            return Ok((self.load_chat(&id).await?, false));
        }
        for (pos, uid) in chat.participant_ids.iter().enumerate() {
            sqlx::query(
                "INSERT INTO chat_members (chat_id, user_id, position) VALUES ($1, $2, $3)",
            )
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
        // One snapshot: a message committed between the queries cannot skew the unread count.
        let mut tx = self.snapshot().await?;
        let rows = sqlx::query(&format!(
            "SELECT c.id AS c_id, c.kind, c.title, c.last_seq, c.created_at AS c_created_at, \
             me.read_seq, {MESSAGE_COLUMNS_M} FROM chat_members me \
             JOIN chats c ON c.id = me.chat_id \
             LEFT JOIN messages m ON m.chat_id = c.id AND m.seq = c.last_seq \
             WHERE me.user_id = $1 ORDER BY c.created_at"
        ))
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut members = Self::members_of_chats_of(&mut *tx, user_id).await?;
        let own_after: HashMap<String, i64> = sqlx::query_as(
            "SELECT m.chat_id, COUNT(*) FROM chat_members me \
             JOIN messages m ON m.chat_id = me.chat_id AND m.sender_id = me.user_id \
             AND m.seq > me.read_seq WHERE me.user_id = $1 GROUP BY m.chat_id",
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
        out.sort_by_key(|o| std::cmp::Reverse(o.last_message.as_ref().map(|(m, _)| m.created_at)));
        Ok(out)
    }

    async fn chats_with_members(
        &self,
        user_id: &str,
    ) -> StoreResult<Vec<(ChatRecord, Vec<Member>)>> {
        let mut tx = self.snapshot().await?;
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.title, c.last_seq, c.created_at FROM chat_members me \
             JOIN chats c ON c.id = me.chat_id WHERE me.user_id = $1 ORDER BY c.created_at",
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
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2")
                .bind(chat_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn members(&self, chat_id: &str) -> StoreResult<Vec<Member>> {
        Self::members_in(&self.pool, chat_id, false).await
    }

    async fn insert_messages(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<(MessageRecord, bool)>> {
        match self.try_insert_messages(&msgs).await {
            // The same clientMsgId sent through two nodes at once: the second waited on the
            // unique index and failed; once more, it finds the first's message.
            Err(e) if is_unique_violation(&e) => self.try_insert_messages(&msgs).await,
            other => other,
        }
    }

    async fn message(&self, id: &str) -> StoreResult<MessageRecord> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        Ok(message_from_row(&row))
    }

    async fn messages(&self, chat_id: &str, page: Page) -> StoreResult<(Vec<MessageRecord>, bool)> {
        // Fetch one more than asked to learn whether there is more in that direction. Three
        // statements rather than one with optional bounds: each keeps its own index range plan.
        let (bound, order, seq, limit) = match page {
            Page::Latest { limit } => ("", "DESC", None, limit),
            Page::Before { seq, limit } => ("AND seq < $3", "DESC", Some(seq), limit),
            Page::After { seq, limit } => ("AND seq > $3", "ASC", Some(seq), limit),
        };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 {bound} \
             ORDER BY seq {order} LIMIT $2"
        );
        let mut q = sqlx::query(&sql).bind(chat_id).bind(limit + 1);
        if let Some(seq) = seq {
            q = q.bind(seq);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let has_more = rows.len() as i64 > limit;
        let mut msgs: Vec<MessageRecord> = rows
            .iter()
            .take(limit as usize)
            .map(message_from_row)
            .collect();
        if order == "DESC" {
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
        // The wishes travel as three arrays: one statement for any number of chats.
        let chats: Vec<&str> = wants.iter().map(|w| w.0.as_str()).collect();
        let afters: Vec<i64> = wants.iter().map(|w| w.1).collect();
        let uptos: Vec<i64> = wants.iter().map(|w| w.1 + w.2).collect();
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS_M} FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) \
             AS w(chat_id, after, upto) JOIN messages m \
             ON m.chat_id = w.chat_id AND m.seq > w.after AND m.seq <= w.upto \
             ORDER BY m.chat_id, m.seq"
        ))
        .bind(&chats)
        .bind(&afters)
        .bind(&uptos)
        .fetch_all(&self.pool)
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
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = $1 AND pinned ORDER BY seq"
        ))
        .bind(chat_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    async fn set_pinned(&self, id: &str, pinned: bool) -> StoreResult<(MessageRecord, bool)> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query("UPDATE messages SET pinned = $1 WHERE id = $2 AND pinned != $1")
            .bind(pinned)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok((message_from_row(&row), res.rows_affected() > 0))
    }

    async fn record_call(
        &self,
        call: CallRecord,
        message: NewMessage,
    ) -> StoreResult<MessageRecord> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO calls (id, chat_id, caller_id, callee_id, call_type, started_at, \
             answered_at, ended_at, end_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        let mut chats = cursors::by_chat(&updates);
        // Locks are taken in chat id order: two batches never wait for each other in a cycle.
        chats.sort_by(|a, b| a.0.cmp(b.0));
        let mut tx = self.pool.begin().await?;
        let mut changes = Vec::new();
        for (chat_id, ups) in chats {
            let before = Self::members_in(&mut *tx, chat_id, true).await?;
            let mut after = before.clone();
            let moved = cursors::apply(&mut after, &ups);
            if moved.is_empty() {
                continue;
            }
            for i in moved {
                let m = &after[i];
                sqlx::query(
                    "UPDATE chat_members SET delivered_seq = $1, read_seq = $2 \
                     WHERE chat_id = $3 AND user_id = $4",
                )
                .bind(m.delivered_seq)
                .bind(m.read_seq)
                .bind(chat_id)
                .bind(&m.user_id)
                .execute(&mut *tx)
                .await?;
            }
            for mv in cursors::status_moves(&before, &after) {
                let sender = &after[mv.sender].user_id;
                if let Some((id, seq)) =
                    Self::highest_of_sender(&mut tx, chat_id, sender, mv.low, mv.high).await?
                {
                    changes.push(StatusChange {
                        sender_id: sender.clone(),
                        chat_id: chat_id.to_owned(),
                        message_id: id,
                        seq,
                        status: mv.status,
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(changes)
    }
}
