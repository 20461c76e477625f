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

/// What verification compares per table: a key expression and integer expressions to sum.
const FINGERPRINTS: &[(&str, &str, &[&str])] = &[
    (
        "users",
        "id",
        &[
            "created_at",
            "COALESCE(last_seen_at, 0)",
            "LENGTH(COALESCE(password_hash, ''))",
        ],
    ),
    (
        "refresh_tokens",
        "token_hash",
        &["expires_at", "COALESCE(used_at, 0)"],
    ),
    ("chats", "id", &["last_seq", "created_at"]),
    (
        "chat_members",
        "chat_id || ':' || user_id",
        &["position", "delivered_seq", "read_seq"],
    ),
    (
        "messages",
        "id",
        &[
            "seq",
            "created_at",
            "LENGTH(content)",
            "CASE WHEN pinned THEN 1 ELSE 0 END",
        ],
    ),
    (
        "calls",
        "id",
        &["started_at", "ended_at", "COALESCE(answered_at, 0)"],
    ),
];

/// A table's row count, its sums, and a SHA-256 of its keys in byte order.
type Fingerprint = (i64, Vec<i64>, Vec<u8>);

fn fingerprint_sql(table: &str, key: &str, sums: &[&str], collate: &str) -> (String, String) {
    let select = sums
        .iter()
        .map(|e| format!("CAST(COALESCE(SUM({e}), 0) AS BIGINT)"))
        .collect::<Vec<_>>()
        .join(", ");
    (
        format!("SELECT COUNT(*), {select} FROM {table}"),
        format!("SELECT {key} FROM {table} ORDER BY ({key}){collate}"),
    )
}

fn digest(keys: &[String]) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for k in keys {
        hash.update(k.as_bytes());
        hash.update([0]);
    }
    hash.finalize().to_vec()
}

async fn fingerprint_sqlite(
    c: &mut SqliteConnection,
    (table, key, sums): (&str, &str, &[&str]),
) -> StoreResult<Fingerprint> {
    let (totals_sql, keys_sql) = fingerprint_sql(table, key, sums, "");
    let row = sqlx::query(&totals_sql).fetch_one(&mut *c).await?;
    let totals = (0..=sums.len())
        .map(|i| row.try_get::<i64, _>(i))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<String> = sqlx::query_scalar(&keys_sql).fetch_all(&mut *c).await?;
    Ok((totals[0], totals[1..].to_vec(), digest(&keys)))
}

async fn fingerprint_postgres(
    c: &mut sqlx::PgConnection,
    (table, key, sums): (&str, &str, &[&str]),
) -> StoreResult<Fingerprint> {
    let (totals_sql, keys_sql) = fingerprint_sql(table, key, sums, " COLLATE \"C\"");
    let row = sqlx::query(&totals_sql).fetch_one(&mut *c).await?;
    let totals = (0..=sums.len())
        .map(|i| row.try_get::<i64, _>(i))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<String> = sqlx::query_scalar(&keys_sql).fetch_all(&mut *c).await?;
    Ok((totals[0], totals[1..].to_vec(), digest(&keys)))
}

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
    // Verify before committing, by reading both sides back (not by trusting what was sent):
    // per table the row count, sums of its numbers and a hash of its keys in one order; and
    // seqs the store can go on from (a chat's last_seq is its highest message).
    for (table, key, sums) in FINGERPRINTS {
        let source = fingerprint_sqlite(&mut lite, (table, key, sums)).await?;
        let target = fingerprint_postgres(&mut tx, (table, key, sums)).await?;
        if source != target {
            return Err(StoreError::Conflict(
                "the copy differs from the source (counts, sums or keys); nothing was committed",
            ));
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
