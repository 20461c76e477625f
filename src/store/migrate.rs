//! `switchboard migrate-store --from sqlite://… --to postgres://…` (PROTOCOL §8): copies a
//! single node's SQLite database into an empty PostgreSQL database, then checks that every
//! table holds as many rows on both sides and that every chat's `last_seq` is its highest seq.
//!
//! Run it on a stopped node. While it copies it holds SQLite's write lock, so a server that was
//! left running cannot write anything the copy would miss: its writes wait, then fail.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Connection, Postgres, QueryBuilder, Row, SqliteConnection};

use super::{StoreError, StoreResult};

/// Rows per INSERT statement.
const BATCH: usize = 500;

/// The tables in the order their foreign keys need, each with its columns (the same names and
/// meanings in both schemas) and a column to order the copy by.
const TABLES: &[(&str, &[&str], &str)] = &[
    (
        "users",
        &[
            "id",
            "username",
            "display_name",
            "password_hash",
            "external_sub",
            "created_at",
            "last_seen_at",
        ],
        "rowid",
    ),
    (
        "refresh_tokens",
        &[
            "token_hash",
            "user_id",
            "family_id",
            "expires_at",
            "used_at",
            "created_at",
        ],
        "rowid",
    ),
    (
        "chats",
        &[
            "id",
            "kind",
            "title",
            "direct_key",
            "last_seq",
            "created_at",
        ],
        "rowid",
    ),
    (
        "chat_members",
        &[
            "chat_id",
            "user_id",
            "position",
            "delivered_seq",
            "read_seq",
        ],
        "rowid",
    ),
    (
        "messages",
        &[
            "id",
            "chat_id",
            "seq",
            "sender_id",
            "content",
            "client_msg_id",
            "created_at",
            "pinned",
            "fwd_message_id",
            "fwd_chat_id",
            "fwd_sender_id",
            "call_meta",
        ],
        "rowid",
    ),
    (
        "calls",
        &[
            "id",
            "chat_id",
            "caller_id",
            "callee_id",
            "call_type",
            "started_at",
            "answered_at",
            "ended_at",
            "end_reason",
        ],
        "rowid",
    ),
];

/// What was copied: rows per table, in copy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<(&'static str, i64)>,
}

/// A column's value as read from SQLite, typed for PostgreSQL.
enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
}

fn read(row: &SqliteRow, table: &str, column: &str) -> StoreResult<Value> {
    Ok(match (table, column) {
        ("messages", "pinned") => Value::Bool(row.try_get::<i64, _>(column)? != 0),
        (_, c) if c.ends_with("_at") || c.ends_with("_seq") || c == "seq" || c == "position" => {
            Value::Int(row.try_get(column)?)
        }
        _ => Value::Text(row.try_get(column)?),
    })
}

/// Copies the SQLite database at `from` into the PostgreSQL database `to`, which must hold no
/// users yet (its schema is created if missing), in one PostgreSQL transaction, then verifies.
pub async fn sqlite_to_postgres(from: &Path, to: &str) -> StoreResult<Report> {
    if !from.exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", from.display()),
        )));
    }
    // The target's schema, by the store's own migrations.
    super::postgres::PostgresStore::open(to).await?;
    let mut pg = sqlx::PgConnection::connect(to).await?;
    let existing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&mut pg)
        .await?;
    if existing > 0 {
        return Err(StoreError::Conflict(
            "the PostgreSQL database already holds users; migrate into an empty one",
        ));
    }
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(from)
        .busy_timeout(Duration::from_secs(10));
    let mut lite = SqliteConnection::connect_with(&options).await?;
    // Holds the write lock for the whole copy (and its checks).
    sqlx::query("BEGIN IMMEDIATE").execute(&mut lite).await?;
    let mut tx = pg.begin().await?;
    let mut report = Report { tables: Vec::new() };
    for (table, columns, order) in TABLES {
        let sql = format!(
            "SELECT {} FROM {table} ORDER BY {order}",
            columns.join(", ")
        );
        let mut rows = sqlx::query(&sql).fetch(&mut lite);
        let mut batch: Vec<Vec<Value>> = Vec::with_capacity(BATCH);
        let mut copied = 0i64;
        loop {
            let row = rows.try_next().await?;
            if let Some(row) = &row {
                batch.push(
                    columns
                        .iter()
                        .map(|c| read(row, table, c))
                        .collect::<StoreResult<_>>()?,
                );
            }
            if batch.len() == BATCH || (row.is_none() && !batch.is_empty()) {
                copied += batch.len() as i64;
                insert(&mut tx, table, columns, std::mem::take(&mut batch)).await?;
            }
            if row.is_none() {
                break;
            }
        }
        drop(rows);
        report.tables.push((table, copied));
    }
    // Verify before committing: the same count in every table, and seqs the store can go on
    // from (a chat's last_seq is its highest message).
    for (table, copied) in &report.tables {
        let source: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut lite)
            .await?;
        let target: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await?;
        if source != *copied || target != *copied {
            return Err(StoreError::Conflict("row counts differ after the copy"));
        }
    }
    let behind: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM chats c WHERE c.last_seq < \
         COALESCE((SELECT MAX(seq) FROM messages m WHERE m.chat_id = c.id), 0)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if behind > 0 {
        return Err(StoreError::Conflict(
            "a chat's last_seq is below its highest message",
        ));
    }
    tx.commit().await?;
    sqlx::query("ROLLBACK").execute(&mut lite).await?;
    Ok(report)
}

async fn insert(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
) -> StoreResult<()> {
    let mut q: QueryBuilder<Postgres> =
        QueryBuilder::new(format!("INSERT INTO {table} ({}) ", columns.join(", ")));
    q.push_values(rows, |mut b, row| {
        for v in row {
            match v {
                Value::Text(t) => b.push_bind(t),
                Value::Int(i) => b.push_bind(i),
                Value::Bool(x) => b.push_bind(x),
            };
        }
    });
    q.build().execute(&mut **tx).await?;
    Ok(())
}
