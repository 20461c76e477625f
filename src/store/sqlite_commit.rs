//! The SQLite group committer: a thread that owns a connection to the database (rusqlite) and
//! its prepared statements, and writes every message insert and cursor move queued while the
//! previous transaction committed in one transaction, one fsync for the group.
//!
//! Why a thread of its own and not sqlx: sqlx runs each SQLite connection on a worker thread
//! and every statement is a round trip to it (a message cost six, each a futex wake and a
//! context switch; docs/benchmarks.md). Here a whole group runs where the connection lives, with
//! statements prepared once.
//!
//! A job that fails (a chat that does not exist, a constraint) rolls back alone and fails only
//! its own request; the rest of the group commits (see [`commit`] for how, cheaply).
//! A caller hears back only after the commit that holds its write (or the error that kept it
//! out). SQLite-only: the PostgreSQL store will batch its own way.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::cursors;
use super::sqlite::MESSAGE_COLUMNS;
use super::*;

/// Jobs in one transaction at most: bounds what one commit adds to its first job's latency
/// (a job takes ~20 µs here). 1,024 rather than 256: 500 senders in flight then fit in one
/// group and share its pages and its fsync (+15 % deliveries/s in chats of 2).
const MAX_GROUP: usize = 1024;

/// WAL pages between automatic checkpoints (4 KiB each).
const WAL_CHECKPOINT_PAGES: i64 = 10_000;

/// A write that waits for the next group commit, and where its result goes.
pub(super) enum Job {
    Insert(
        Vec<NewMessage>,
        oneshot::Sender<StoreResult<Vec<(MessageRecord, bool)>>>,
    ),
    Cursors(
        Vec<CursorUpdate>,
        oneshot::Sender<StoreResult<Vec<StatusChange>>>,
    ),
    /// Commit what was queued before, then stop (the store is closing).
    Stop(oneshot::Sender<()>),
}

/// What a job wrote.
enum Done {
    Inserted(Vec<(MessageRecord, bool)>),
    Moved(Vec<StatusChange>),
}

/// Opens the committer's connection to the database at `path` (migrated already) and starts
/// its thread, which takes jobs from `rx` until a `Stop` or until every sender is gone.
pub(super) fn start(path: &Path, rx: mpsc::Receiver<Job>) -> StoreResult<()> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(32);
    // A savepoint's journal (the pages it changed, kept to roll them back) stays in memory:
    // SQLite spills it to a temp file past 64 KiB, which cost as many writes as the WAL did.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoint (copy the WAL back into the database) every ~40 MB of WAL rather than SQLite's
    // 4 MB: a hot page (a chat's newest index leaf) is copied once for many groups that wrote
    // it, which took a fifth of this thread's time at 4 MB (docs/benchmarks.md). The WAL file
    // is cut back to 64 MB after a checkpoint.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    std::thread::Builder::new()
        .name("sqlite-commit".into())
        .spawn(move || run(conn, rx))?;
    Ok(())
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let stop = match group.iter().position(|j| matches!(j, Job::Stop(_))) {
            // Jobs queued behind a Stop are refused: their senders hear the channel close.
            Some(i) => group.drain(i..).next(),
            None => None,
        };
        if !group.is_empty() {
            metrics::histogram!("switchboard_store_group_commit_jobs").record(group.len() as f64);
            commit(&mut conn, std::mem::take(&mut group));
        }
        if let Some(Job::Stop(done)) = stop {
            let _ = done.send(());
            return;
        }
    }
}

/// One transaction for `jobs`; replies once the commit is durable.
///
/// Jobs almost never fail, so the group first runs without savepoints: a savepoint makes
/// SQLite copy every page a job touches into a journal, about as much I/O as the commit itself.
/// If a job fails, the transaction is rolled back and the group runs again with a savepoint per
/// job, so the failing one rolls back alone and fails only its own request. Callers hear only
/// the results of the run that committed. A failure of the transaction itself (`BEGIN`,
/// `COMMIT`, a rollback, SQLite abandoning the transaction on a full disk or an I/O error) is
/// not retried: every job of the group fails and none was acknowledged.
fn commit(conn: &mut Connection, jobs: Vec<Job>) {
    let run = match run_group(conn, &jobs, false) {
        Ok(Run::JobFailed) => run_group(conn, &jobs, true),
        other => other,
    };
    match run {
        Ok(Run::Committed(results)) => {
            for (job, result) in jobs.into_iter().zip(results) {
                job.reply(result);
            }
        }
        Ok(Run::JobFailed) => unreachable!("with savepoints a failing job fails alone"),
        Err(e) => {
            let e = std::sync::Arc::new(e);
            for job in jobs {
                job.reply(Err(StoreError::Shared(e.clone())));
            }
        }
    }
}

/// How a run of a group ended, short of a failure of its transaction.
enum Run {
    /// Committed; a result per job (with savepoints, some may be errors: rolled back alone).
    Committed(Vec<StoreResult<Done>>),
    /// Without savepoints a job failed: the group was rolled back, nothing is written.
    JobFailed,
}

/// Runs `jobs` in one IMMEDIATE transaction, each under a savepoint if `savepoints`.
fn run_group(conn: &mut Connection, jobs: &[Job], savepoints: bool) -> rusqlite::Result<Run> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        if !savepoints {
            match job.run(&tx) {
                Ok(done) => results.push(Ok(done)),
                Err(_) => {
                    // Checked: a connection left inside a transaction would fail every later
                    // group.
                    tx.rollback()?;
                    return Ok(Run::JobFailed);
                }
            }
            continue;
        }
        let sp = tx.savepoint()?;
        match job.run(&sp) {
            Ok(done) => {
                sp.commit()?;
                results.push(Ok(done));
            }
            Err(e) => {
                if sp.is_autocommit() {
                    // SQLite gave up the whole transaction (a full disk, an I/O error): the
                    // jobs before this one are gone too, and the ones after must not commit
                    // on their own. The group fails.
                    return Err(abandoned());
                }
                // Back to the savepoint and release it, checked (a failed rollback must not
                // let the job's partial writes commit with the others).
                sp.finish()?;
                results.push(Err(e));
            }
        }
    }
    tx.commit()?;
    Ok(Run::Committed(results))
}

/// The error of a group whose transaction SQLite rolled back by itself.
fn abandoned() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some("the transaction was rolled back by SQLite; nothing of the group was written".into()),
    )
}

impl Job {
    fn run(&self, c: &Connection) -> StoreResult<Done> {
        match self {
            Job::Insert(msgs, _) => msgs
                .iter()
                .map(|m| insert_one(c, m))
                .collect::<StoreResult<_>>()
                .map(Done::Inserted),
            Job::Cursors(updates, _) => advance(c, updates).map(Done::Moved),
            Job::Stop(_) => unreachable!("a stop is taken out of its group"),
        }
    }

    fn reply(self, result: StoreResult<Done>) {
        // A caller that went away (its connection closed) no longer needs the answer; what
        // it asked for is committed all the same.
        match self {
            Job::Insert(_, reply) => {
                let _ = reply.send(result.map(|d| match d {
                    Done::Inserted(v) => v,
                    Done::Moved(_) => unreachable!("an insert job inserts"),
                }));
            }
            Job::Cursors(_, reply) => {
                let _ = reply.send(result.map(|d| match d {
                    Done::Moved(v) => v,
                    Done::Inserted(_) => unreachable!("a cursor job moves cursors"),
                }));
            }
            Job::Stop(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    let fwd_id: Option<String> = r.get("fwd_message_id")?;
    let call_meta: Option<String> = r.get("call_meta")?;
    Ok(MessageRecord {
        id: r.get("id")?,
        chat_id: r.get("chat_id")?,
        seq: r.get("seq")?,
        sender_id: r.get("sender_id")?,
        content: r.get("content")?,
        client_msg_id: r.get("client_msg_id")?,
        created_at: r.get("created_at")?,
        pinned: r.get::<_, i64>("pinned")? != 0,
        forwarded_from: match fwd_id {
            Some(message_id) => Some(ForwardedFromRecord {
                message_id,
                chat_id: r.get("fwd_chat_id")?,
                sender_id: r.get("fwd_sender_id")?,
            }),
            None => None,
        },
        // Written by us from the same struct; an unreadable value is shown as a text message.
        call: call_meta.and_then(|j| serde_json::from_str(&j).ok()),
    })
}

/// One message: dedupe on `(sender, clientMsgId)`, take the chat's next seq, insert.
fn insert_one(c: &Connection, msg: &NewMessage) -> StoreResult<(MessageRecord, bool)> {
    if let Some(cid) = &msg.client_msg_id {
        let existing = c
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2"
            ))?
            .query_row(params![msg.sender_id, cid], message_from_row)
            .optional()?;
        if let Some(m) = existing {
            return Ok((m, false));
        }
    }
    let seq: i64 = c
        .prepare_cached(
            "UPDATE chats SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
        )?
        .query_row([&msg.chat_id], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NotFound)?;
    let fwd = msg.forwarded_from.as_ref();
    let call = msg
        .call
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("plain struct serialises"));
    c.prepare_cached(
        "INSERT INTO messages (id, chat_id, seq, sender_id, content, client_msg_id, created_at, \
         pinned, fwd_message_id, fwd_chat_id, fwd_sender_id, call_meta) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        msg.id,
        msg.chat_id,
        seq,
        msg.sender_id,
        msg.content,
        msg.client_msg_id,
        msg.created_at,
        fwd.map(|f| &f.message_id),
        fwd.map(|f| &f.chat_id),
        fwd.map(|f| &f.sender_id),
        call,
    ])?;
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

fn members(c: &Connection, chat_id: &str) -> StoreResult<Vec<Member>> {
    let mut st = c.prepare_cached(
        "SELECT user_id, delivered_seq, read_seq FROM chat_members WHERE chat_id = ?1 \
         ORDER BY position",
    )?;
    let rows = st.query_map([chat_id], |r| {
        Ok(Member {
            user_id: r.get(0)?,
            delivered_seq: r.get(1)?,
            read_seq: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Highest seq of `sender` in `(low, high]`, with its message id.
fn highest_of_sender(
    c: &Connection,
    chat_id: &str,
    sender: &str,
    low: i64,
    high: i64,
) -> StoreResult<Option<(String, i64)>> {
    Ok(c.prepare_cached(
        "SELECT id, seq FROM messages WHERE chat_id = ?1 AND sender_id = ?2 AND seq > ?3 \
         AND seq <= ?4 ORDER BY seq DESC LIMIT 1",
    )?
    .query_row(params![chat_id, sender, low, high], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()?)
}

/// Moves cursors forward (never back; a read moves delivered too) and says, per sender, the
/// highest message whose status changed. One pass per chat of the batch: each moved member is
/// written once and each sender's status looked up once (`store::cursors`).
fn advance(c: &Connection, updates: &[CursorUpdate]) -> StoreResult<Vec<StatusChange>> {
    let mut changes = Vec::new();
    for (chat_id, ups) in cursors::by_chat(updates) {
        let before = members(c, chat_id)?;
        let mut after = before.clone();
        let moved = cursors::apply(&mut after, &ups);
        if moved.is_empty() {
            continue;
        }
        let mut update = c.prepare_cached(
            "UPDATE chat_members SET delivered_seq = ?1, read_seq = ?2 \
             WHERE chat_id = ?3 AND user_id = ?4",
        )?;
        for i in moved {
            let m = &after[i];
            update.execute(params![m.delivered_seq, m.read_seq, chat_id, m.user_id])?;
        }
        for mv in cursors::status_moves(&before, &after) {
            let sender = &after[mv.sender].user_id;
            if let Some((id, seq)) = highest_of_sender(c, chat_id, sender, mv.low, mv.high)? {
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
    Ok(changes)
}
