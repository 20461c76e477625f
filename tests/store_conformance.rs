//! One behaviour for every [`Store`] backend: each check below runs on each backend, opened the
//! way the app opens it (`store::open` with a `database.url`): SQLite, and PostgreSQL on the
//! server scripts/test.sh starts. A new backend adds one line to `backends!` and must pass all
//! of it.
//!
//! What is checked is what callers rely on (store/mod.rs): gap-free per-chat seqs under
//! concurrent writers, idempotent `(sender, clientMsgId)`, cursors that never move back and the
//! status changes they report, direct chats that exist once, refresh-token rotation with reuse
//! detection, durability across a reopen, and a `close` after which calls fail instead of hang.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use switchboard::store::{
    self, CallMeta, CallRecord, ChatKind, CursorKind, CursorUpdate, ForwardedFromRecord,
    MessageStatus, NewChat, NewMessage, NewUser, NextRefreshToken, Page, RefreshOutcome, Store,
    StoreError,
};

/// Where a backend keeps its data, so a check can open it again.
struct Backend {
    url: String,
    data_dir: tempfile::TempDir,
    /// PostgreSQL: the server's admin URL and the database to create there on the first open.
    create: Option<(String, String)>,
    created: tokio::sync::OnceCell<()>,
}

impl Backend {
    fn sqlite() -> Backend {
        let data_dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}",
            data_dir.path().join("conformance.db").display()
        );
        Backend {
            url,
            data_dir,
            create: None,
            created: tokio::sync::OnceCell::new(),
        }
    }

    /// A fresh database of its own on the PostgreSQL server `SB_TEST_POSTGRES_URL`
    /// names (scripts/test.sh starts one). Without it the check fails: a skip must be visible,
    /// and scripts/test.sh excludes these checks by name, loudly, where it has no PostgreSQL.
    fn postgres() -> Backend {
        let admin = std::env::var("SB_TEST_POSTGRES_URL").expect(
            "SB_TEST_POSTGRES_URL is not set: run scripts/test.sh, or \
             `eval $(scripts/pg-temp.sh)` first",
        );
        let name = format!("sb_{}", uuid::Uuid::now_v7().simple());
        let (base, _) = admin.rsplit_once('/').expect("a URL with a database name");
        Backend {
            url: format!("{base}/{name}"),
            data_dir: tempfile::tempdir().unwrap(),
            create: Some((admin, name)),
            created: tokio::sync::OnceCell::new(),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        if let Some((admin, name)) = &self.create {
            self.created
                .get_or_init(|| async {
                    use sqlx::Connection;
                    let mut c = sqlx::PgConnection::connect(admin).await.unwrap();
                    sqlx::query(&format!("CREATE DATABASE {name}"))
                        .execute(&mut c)
                        .await
                        .unwrap();
                    c.close().await.unwrap();
                })
                .await;
        }
        store::open(&self.url, self.data_dir.path()).await.unwrap()
    }
}

/// Runs every check on every backend: `backend_name => constructor`.
macro_rules! backends {
    ($($backend:ident => $make:expr),* $(,)?) => {
        $(
            mod $backend {
                use super::*;
                checks!(
                    users_are_unique_by_name_and_found_by_id_name_and_sub,
                    a_chat_needs_existing_members_and_a_direct_chat_exists_once,
                    seqs_are_gap_free_under_concurrent_writers,
                    a_client_msg_id_is_stored_once_per_sender,
                    history_pages_in_every_direction,
                    cursors_never_move_back_and_report_status_changes,
                    the_chat_list_counts_unread_and_shows_the_latest_first,
                    pins_and_forwards_and_calls_are_stored,
                    refresh_tokens_rotate_and_a_reuse_revokes_the_family,
                    what_was_committed_survives_a_reopen,
                    after_close_calls_fail_and_do_not_hang,
                );
                fn backend() -> Backend {
                    $make
                }
            }
        )*
    };
}

macro_rules! checks {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                super::$check(backend()).await;
            }
        )*
    };
}

backends!(sqlite => Backend::sqlite(), postgres => Backend::postgres());

async fn user(s: &dyn Store, name: &str) -> String {
    s.create_user(NewUser {
        id: format!("u-{name}"),
        username: name.into(),
        display_name: name.to_uppercase(),
        password_hash: Some("hash".into()),
        external_sub: None,
        created_at: 1,
    })
    .await
    .unwrap()
    .id
}

async fn group(s: &dyn Store, id: &str, members: &[&str]) -> String {
    s.create_chat(NewChat {
        id: id.into(),
        kind: ChatKind::Group,
        title: Some(id.into()),
        participant_ids: members.iter().map(|m| m.to_string()).collect(),
        created_at: 10,
    })
    .await
    .unwrap()
    .0
    .id
}

fn msg(chat: &str, sender: &str, content: &str, cid: Option<&str>, at: i64) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        chat_id: chat.into(),
        sender_id: sender.into(),
        content: content.into(),
        client_msg_id: cid.map(Into::into),
        forwarded_from: None,
        call: None,
        created_at: at,
    }
}

async fn send(s: &dyn Store, chat: &str, sender: &str, content: &str) -> i64 {
    let mut out = s
        .insert_messages(vec![msg(chat, sender, content, None, 100)])
        .await
        .unwrap();
    out.pop().unwrap().0.seq
}

async fn users_are_unique_by_name_and_found_by_id_name_and_sub(b: Backend) {
    let s = b.open().await;
    s.ping().await.unwrap();
    let a = user(&*s, "alice").await;
    let again = s
        .create_user(NewUser {
            id: "u-other".into(),
            username: "alice".into(),
            display_name: "x".into(),
            password_hash: None,
            external_sub: None,
            created_at: 2,
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    s.create_user(NewUser {
        id: "u-ext".into(),
        username: "ext".into(),
        display_name: "Ext".into(),
        password_hash: None,
        external_sub: Some("idp|42".into()),
        created_at: 3,
    })
    .await
    .unwrap();
    assert_eq!(s.user_by_id(&a).await.unwrap().username, "alice");
    assert_eq!(s.user_by_username("alice").await.unwrap().id, a);
    assert_eq!(s.user_by_external_sub("idp|42").await.unwrap().id, "u-ext");
    assert!(matches!(
        s.user_by_id("nobody").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.user_by_username("nobody").await,
        Err(StoreError::NotFound)
    ));
    let all: Vec<String> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(all.len(), 2);
    assert!(all.contains(&a) && all.contains(&"u-ext".to_owned()));
    assert_eq!(s.user_by_id(&a).await.unwrap().last_seen_at, None);
    s.set_last_seen(&a, 1234).await.unwrap();
    assert_eq!(s.user_by_id(&a).await.unwrap().last_seen_at, Some(1234));
}

async fn a_chat_needs_existing_members_and_a_direct_chat_exists_once(b: Backend) {
    let s = b.open().await;
    let (a, bb, c) = (
        user(&*s, "a").await,
        user(&*s, "b").await,
        user(&*s, "c").await,
    );
    let missing = s
        .create_chat(NewChat {
            id: "x".into(),
            kind: ChatKind::Group,
            title: None,
            participant_ids: vec![a.clone(), "ghost".into()],
            created_at: 0,
        })
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)));
    assert!(
        matches!(s.chat("x").await, Err(StoreError::NotFound)),
        "nothing half-made"
    );
    let direct = |id: &str, who: [&String; 2]| NewChat {
        id: id.into(),
        kind: ChatKind::Direct,
        title: None,
        participant_ids: who.iter().map(|u| u.to_string()).collect(),
        created_at: 5,
    };
    let (d1, created) = s.create_chat(direct("d1", [&a, &bb])).await.unwrap();
    assert!(created);
    assert_eq!(d1.participant_ids, [a.clone(), bb.clone()], "creator first");
    assert_eq!(
        (d1.kind, d1.last_seq, d1.created_at),
        (ChatKind::Direct, 0, 5)
    );
    // The same pair either way round is the same chat.
    let (d2, created) = s.create_chat(direct("d2", [&bb, &a])).await.unwrap();
    assert!(!created);
    assert_eq!(d2.id, "d1");
    let g = group(&*s, "g", &[&c, &a, &bb].map(|u| u.as_str())).await;
    let members: Vec<String> = s
        .members(&g)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    assert_eq!(
        members,
        [c.clone(), a.clone(), bb.clone()],
        "in the order added"
    );
    assert!(s.is_member(&g, &a).await.unwrap());
    assert!(!s.is_member("d1", &c).await.unwrap());
    assert!(s.members("nope").await.unwrap().is_empty());
    let mut contacts = s.contacts_of(&a).await.unwrap();
    contacts.sort();
    assert_eq!(contacts, [bb.clone(), c.clone()]);
    let mine = s.chats_with_members(&c).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].0.id.as_str(), mine[0].1.len()), ("g", 3));
}

async fn seqs_are_gap_free_under_concurrent_writers(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let chats = [
        group(&*s, "c1", &[a.as_str(), bb.as_str()]).await,
        group(&*s, "c2", &[a.as_str(), bb.as_str()]).await,
    ];
    let mut tasks = Vec::new();
    for w in 0..20 {
        let (s, chat) = (s.clone(), chats[w % 2].clone());
        let sender = if w % 3 == 0 { bb.clone() } else { a.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let content = format!("w{w}-{i}");
                let mut out = s
                    .insert_messages(vec![msg(&chat, &sender, &content, Some(&content), 100)])
                    .await
                    .unwrap();
                let (m, created) = out.pop().unwrap();
                assert!(created);
                assert_eq!(m.content, content, "each writer gets its own message");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A batch takes consecutive seqs, in order.
    let batch = s
        .insert_messages(vec![
            msg(&chats[0], &a, "b1", None, 100),
            msg(&chats[0], &a, "b2", None, 100),
        ])
        .await
        .unwrap();
    assert_eq!((batch[0].0.seq, batch[1].0.seq), (101, 102));
    for (chat, n) in [(&chats[0], 102), (&chats[1], 100)] {
        let (all, more) = s
            .messages(chat, Page::After { seq: 0, limit: 500 })
            .await
            .unwrap();
        assert!(!more);
        let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{chat}: 1.. without gaps"
        );
        assert_eq!(s.chat(chat).await.unwrap().last_seq, n);
    }
    let bad = s
        .insert_messages(vec![msg("no-such-chat", &a, "x", None, 1)])
        .await;
    assert!(matches!(bad, Err(StoreError::NotFound)), "{bad:?}");
}

async fn a_client_msg_id_is_stored_once_per_sender(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let c1 = group(&*s, "c1", &[a.as_str(), bb.as_str()]).await;
    let c2 = group(&*s, "c2", &[a.as_str(), bb.as_str()]).await;
    let first = s
        .insert_messages(vec![msg(&c1, &a, "hello", Some("k1"), 100)])
        .await
        .unwrap();
    assert!(first[0].1);
    // A retry (even with other content, or aimed at another chat) returns the stored one.
    for (chat, content) in [(&c1, "hello"), (&c1, "changed"), (&c2, "hello")] {
        let again = s
            .insert_messages(vec![msg(chat, &a, content, Some("k1"), 200)])
            .await
            .unwrap();
        assert!(!again[0].1, "not inserted again");
        assert_eq!(again[0].0, first[0].0, "the stored message");
    }
    // The same id from another sender is another message.
    let other = s
        .insert_messages(vec![msg(&c1, &bb, "hi", Some("k1"), 300)])
        .await
        .unwrap();
    assert!(other[0].1);
    assert_eq!(other[0].0.seq, 2);
    assert_eq!(s.chat(&c2).await.unwrap().last_seq, 0);
    let stored = s.message(&first[0].0.id).await.unwrap();
    assert_eq!(stored.client_msg_id.as_deref(), Some("k1"));
    assert!(matches!(s.message("nope").await, Err(StoreError::NotFound)));
}

async fn history_pages_in_every_direction(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let c = group(&*s, "c", &[a.as_str(), bb.as_str()]).await;
    for i in 1..=7 {
        send(&*s, &c, &a, &format!("m{i}")).await;
    }
    let seqs = |v: &[store::MessageRecord]| v.iter().map(|m| m.seq).collect::<Vec<_>>();
    let (m, more) = s.messages(&c, Page::Latest { limit: 3 }).await.unwrap();
    assert_eq!((seqs(&m), more), (vec![5, 6, 7], true), "latest, ascending");
    let (m, more) = s
        .messages(&c, Page::Before { seq: 5, limit: 3 })
        .await
        .unwrap();
    assert_eq!((seqs(&m), more), (vec![2, 3, 4], true));
    let (m, more) = s
        .messages(&c, Page::Before { seq: 3, limit: 3 })
        .await
        .unwrap();
    assert_eq!((seqs(&m), more), (vec![1, 2], false));
    let (m, more) = s
        .messages(&c, Page::After { seq: 4, limit: 3 })
        .await
        .unwrap();
    assert_eq!((seqs(&m), more), (vec![5, 6, 7], false));
    let (m, more) = s.messages(&c, Page::Latest { limit: 50 }).await.unwrap();
    assert_eq!((m.len(), more), (7, false));
    let c2 = group(&*s, "c2", &[a.as_str(), bb.as_str()]).await;
    send(&*s, &c2, &bb, "other").await;
    let many = s
        .messages_after_many(&[(c2.clone(), 0, 5), (c.clone(), 5, 1)])
        .await
        .unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(
        (seqs(&many[0]), seqs(&many[1])),
        (vec![1], vec![6]),
        "in the order asked"
    );
    assert_eq!(many[0][0].content, "other");
}

async fn cursors_never_move_back_and_report_status_changes(b: Backend) {
    let s = b.open().await;
    let (a, bb, c) = (
        user(&*s, "a").await,
        user(&*s, "b").await,
        user(&*s, "c").await,
    );
    let g = group(&*s, "g", &[&a, &bb, &c].map(|u| u.as_str())).await;
    for i in 1..=4 {
        send(&*s, &g, &a, &format!("a{i}")).await;
    }
    let cursor = |user: &str, kind, seq| CursorUpdate {
        chat_id: g.clone(),
        user_id: user.to_owned(),
        kind,
        seq,
    };
    // Only b has it: not yet delivered (c has not).
    let ch = s
        .advance_cursors(vec![cursor(&bb, CursorKind::Delivered, 4)])
        .await
        .unwrap();
    assert!(ch.is_empty(), "{ch:?}");
    let ch = s
        .advance_cursors(vec![cursor(&c, CursorKind::Delivered, 3)])
        .await
        .unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(
        (ch[0].sender_id.as_str(), ch[0].seq, ch[0].status),
        (a.as_str(), 3, MessageStatus::Delivered)
    );
    // Backwards changes nothing.
    let ch = s
        .advance_cursors(vec![cursor(&c, CursorKind::Delivered, 1)])
        .await
        .unwrap();
    assert!(ch.is_empty(), "{ch:?}");
    // Read implies delivered.
    s.advance_cursors(vec![cursor(&bb, CursorKind::Read, 4)])
        .await
        .unwrap();
    let ch = s
        .advance_cursors(vec![cursor(&c, CursorKind::Read, 4)])
        .await
        .unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!((ch[0].seq, ch[0].status), (4, MessageStatus::Read));
    let members = s.members(&g).await.unwrap();
    let cm = members.iter().find(|m| m.user_id == c).unwrap();
    assert_eq!((cm.delivered_seq.max(cm.read_seq), cm.read_seq), (4, 4));
    assert_eq!(store::status_of(4, &a, &members), MessageStatus::Read);
    // Several updates in one call: each sender hears of its highest changed message.
    send(&*s, &g, &bb, "b5").await;
    send(&*s, &g, &c, "c6").await;
    let ch = s
        .advance_cursors(vec![
            cursor(&a, CursorKind::Read, 6),
            cursor(&c, CursorKind::Read, 6),
            cursor(&bb, CursorKind::Read, 6),
        ])
        .await
        .unwrap();
    let mut got: Vec<(String, i64, MessageStatus)> = ch
        .into_iter()
        .map(|c| (c.sender_id, c.seq, c.status))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (bb.clone(), 5, MessageStatus::Read),
            (c.clone(), 6, MessageStatus::Read)
        ]
    );
}

async fn the_chat_list_counts_unread_and_shows_the_latest_first(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let quiet = group(&*s, "quiet", &[a.as_str(), bb.as_str()]).await;
    let busy = group(&*s, "busy", &[a.as_str(), bb.as_str()]).await;
    let empty = group(&*s, "empty", &[a.as_str(), bb.as_str()]).await;
    s.insert_messages(vec![msg(&quiet, &bb, "old", None, 100)])
        .await
        .unwrap();
    for (i, at) in [200, 300, 400].into_iter().enumerate() {
        let sender = if i == 1 { &a } else { &bb };
        s.insert_messages(vec![msg(&busy, sender, &format!("n{i}"), None, at)])
            .await
            .unwrap();
    }
    let list = s.chats_of(&a).await.unwrap();
    let ids: Vec<&str> = list.iter().map(|o| o.chat.id.as_str()).collect();
    assert_eq!(ids, [busy.as_str(), quiet.as_str(), empty.as_str()]);
    // Unread: the others' messages after a's read cursor (a's own do not count).
    let unread: Vec<i64> = list.iter().map(|o| o.unread_count).collect();
    assert_eq!(unread, [2, 1, 0]);
    let (last, status) = list[0].last_message.clone().unwrap();
    assert_eq!((last.content.as_str(), last.seq), ("n2", 3));
    assert_eq!(status, MessageStatus::Sent);
    assert!(list[2].last_message.is_none());
    s.advance_cursors(vec![CursorUpdate {
        chat_id: busy.clone(),
        user_id: a.clone(),
        kind: CursorKind::Read,
        seq: 3,
    }])
    .await
    .unwrap();
    assert_eq!(s.chats_of(&a).await.unwrap()[0].unread_count, 0);
    let b_view = s.chats_of(&bb).await.unwrap();
    assert_eq!(
        b_view[0].last_message.as_ref().unwrap().1,
        MessageStatus::Read,
        "b's last message as b sees it"
    );
}

async fn pins_and_forwards_and_calls_are_stored(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let c = group(&*s, "c", &[a.as_str(), bb.as_str()]).await;
    send(&*s, &c, &a, "one").await;
    let m = s
        .insert_messages(vec![msg(&c, &a, "two", None, 100)])
        .await
        .unwrap()
        .remove(0)
        .0;
    let (pinned, changed) = s.set_pinned(&m.id, true).await.unwrap();
    assert!(changed && pinned.pinned);
    let (_, changed) = s.set_pinned(&m.id, true).await.unwrap();
    assert!(!changed, "already pinned");
    assert_eq!(s.pinned(&c).await.unwrap().len(), 1);
    s.set_pinned(&m.id, false).await.unwrap();
    assert!(s.pinned(&c).await.unwrap().is_empty());
    assert!(matches!(
        s.set_pinned("nope", true).await,
        Err(StoreError::NotFound)
    ));
    let origin = ForwardedFromRecord {
        message_id: m.id.clone(),
        chat_id: c.clone(),
        sender_id: a.clone(),
    };
    let fwd = s
        .insert_messages(vec![NewMessage {
            forwarded_from: Some(origin.clone()),
            ..msg(&c, &bb, "two", None, 150)
        }])
        .await
        .unwrap()
        .remove(0)
        .0;
    assert_eq!(
        s.message(&fwd.id).await.unwrap().forwarded_from,
        Some(origin)
    );
    let meta = CallMeta {
        call_id: "call-1".into(),
        call_type: "video".into(),
        outcome: "ended".into(),
        duration_ms: 5000,
    };
    let rec = s
        .record_call(
            CallRecord {
                id: "call-1".into(),
                chat_id: c.clone(),
                caller_id: a.clone(),
                callee_id: bb.clone(),
                call_type: "video".into(),
                started_at: 1000,
                answered_at: Some(2000),
                ended_at: 7000,
                end_reason: "ended".into(),
            },
            NewMessage {
                call: Some(meta.clone()),
                ..msg(&c, &a, "Video call, 0:05", None, 7000)
            },
        )
        .await
        .unwrap();
    assert_eq!(rec.seq, 4, "a call's message takes the next seq");
    assert_eq!(s.message(&rec.id).await.unwrap().call, Some(meta));
}

async fn refresh_tokens_rotate_and_a_reuse_revokes_the_family(b: Backend) {
    let s = b.open().await;
    let a = user(&*s, "a").await;
    s.insert_refresh_token("t1", &a, "fam", 10_000, 0)
        .await
        .unwrap();
    let next = |h: &str| NextRefreshToken {
        token_hash: h.into(),
        expires_at: 10_000,
    };
    assert_eq!(
        s.rotate_refresh_token("t1", next("t2"), 10).await.unwrap(),
        RefreshOutcome::Rotated {
            user_id: a.clone(),
            family_id: "fam".into()
        }
    );
    // t1 again: theft. The whole family goes, t2 included.
    assert_eq!(
        s.rotate_refresh_token("t1", next("t3"), 20).await.unwrap(),
        RefreshOutcome::Reused
    );
    assert_eq!(
        s.rotate_refresh_token("t2", next("t4"), 30).await.unwrap(),
        RefreshOutcome::Invalid
    );
    assert_eq!(
        s.rotate_refresh_token("unknown", next("t5"), 30)
            .await
            .unwrap(),
        RefreshOutcome::Invalid
    );
    s.insert_refresh_token("old", &a, "fam2", 100, 50)
        .await
        .unwrap();
    assert_eq!(
        s.rotate_refresh_token("old", next("t6"), 101)
            .await
            .unwrap(),
        RefreshOutcome::Invalid,
        "expired"
    );
}

async fn what_was_committed_survives_a_reopen(b: Backend) {
    let s = b.open().await;
    let (a, bb) = (user(&*s, "a").await, user(&*s, "b").await);
    let c = group(&*s, "c", &[a.as_str(), bb.as_str()]).await;
    for i in 0..5 {
        send(&*s, &c, &a, &format!("m{i}")).await;
    }
    s.close().await;
    drop(s);
    let s = b.open().await;
    let (m, _) = s.messages(&c, Page::Latest { limit: 10 }).await.unwrap();
    assert_eq!(m.len(), 5);
    assert_eq!(s.chat(&c).await.unwrap().last_seq, 5);
    assert_eq!(send(&*s, &c, &bb, "after").await, 6, "seqs go on");
}

async fn within<T>(
    f: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), f).await
}

async fn after_close_calls_fail_and_do_not_hang(b: Backend) {
    let s = b.open().await;
    let a = user(&*s, "a").await;
    let c = group(&*s, "c", &[a.as_str()]).await;
    s.close().await;
    assert!(within(s.ping()).await.expect("ping returns").is_err());
    assert!(within(s.user_by_id(&a))
        .await
        .expect("a read returns")
        .is_err());
    let write = s.insert_messages(vec![msg(&c, &a, "late", None, 1)]);
    assert!(within(write).await.expect("a write returns").is_err());
}

/// PostgreSQL is shared by several nodes: each node has its own store (its own pool). These
/// checks open two stores on one database, as two nodes do.
mod postgres_nodes {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_writing_one_chat_get_gap_free_seqs_and_the_same_history() {
        let b = Backend::postgres();
        let (n1, n2) = (b.open().await, b.open().await);
        let (a, bb) = (user(&*n1, "a").await, user(&*n2, "b").await);
        let chat = group(&*n1, "g", &[a.as_str(), bb.as_str()]).await;
        let mut tasks = Vec::new();
        for w in 0..16 {
            let (s, chat) = (
                if w % 2 == 0 { n1.clone() } else { n2.clone() },
                chat.clone(),
            );
            let sender = if w % 3 == 0 { bb.clone() } else { a.clone() };
            tasks.push(tokio::spawn(async move {
                for i in 0..10 {
                    let cid = format!("w{w}-{i}");
                    s.insert_messages(vec![msg(&chat, &sender, &cid, Some(&cid), 100)])
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // A retry of a stored message through both nodes: the stored one.
        let stored = n2
            .insert_messages(vec![msg(&chat, &a, "again", Some("w1-1"), 100)])
            .await
            .unwrap()
            .remove(0);
        assert!(!stored.1);
        let h1 = n1
            .messages(&chat, Page::After { seq: 0, limit: 500 })
            .await
            .unwrap()
            .0;
        let h2 = n2
            .messages(&chat, Page::After { seq: 0, limit: 500 })
            .await
            .unwrap()
            .0;
        assert_eq!(
            h1.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=160).collect::<Vec<i64>>(),
            "gap-free, strictly increasing"
        );
        assert_eq!(h1, h2, "both nodes read the same history");
        assert_eq!(n2.chat(&chat).await.unwrap().last_seq, 160);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_client_msg_id_sent_through_two_nodes_at_once_is_stored_once() {
        let b = Backend::postgres();
        let (n1, n2) = (b.open().await, b.open().await);
        let (a, bb) = (user(&*n1, "a").await, user(&*n1, "b").await);
        let chat = group(&*n1, "g", &[a.as_str(), bb.as_str()]).await;
        for i in 0..30 {
            let cid = format!("race-{i}");
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let send = |s: Arc<dyn Store>| {
                let (chat, a, cid, barrier) =
                    (chat.clone(), a.clone(), cid.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.insert_messages(vec![msg(&chat, &a, &cid, Some(&cid), 100)])
                        .await
                        .unwrap()
                        .remove(0)
                })
            };
            let (t1, t2) = (send(n1.clone()), send(n2.clone()));
            let (r1, r2) = (t1.await.unwrap(), t2.await.unwrap());
            assert_eq!(r1.0.id, r2.0.id, "{cid}: one message");
            assert!(r1.1 ^ r2.1, "{cid}: created exactly once");
        }
        let all = n2
            .messages(&chat, Page::After { seq: 0, limit: 100 })
            .await
            .unwrap()
            .0;
        assert_eq!(
            all.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=30).collect::<Vec<i64>>(),
            "no seq lost to a losing racer"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cursors_moved_through_two_nodes_end_at_the_maxima_and_report_once() {
        let b = Backend::postgres();
        let (n1, n2) = (b.open().await, b.open().await);
        let (a, bb) = (user(&*n1, "a").await, user(&*n1, "b").await);
        let chat = group(&*n1, "g", &[a.as_str(), bb.as_str()]).await;
        for i in 0..30 {
            send(&*n1, &chat, &a, &format!("m{i}")).await;
        }
        let mut tasks = Vec::new();
        for k in 0..40i64 {
            let s = if k % 2 == 0 { n1.clone() } else { n2.clone() };
            let (chat, bb) = (chat.clone(), bb.clone());
            tasks.push(tokio::spawn(async move {
                s.advance_cursors(vec![CursorUpdate {
                    chat_id: chat,
                    user_id: bb,
                    kind: if k % 4 == 0 {
                        CursorKind::Read
                    } else {
                        CursorKind::Delivered
                    },
                    seq: (k * 7) % 30 + 1,
                }])
                .await
                .unwrap()
            }));
        }
        let mut reported = Vec::new();
        for t in tasks {
            reported.extend(t.await.unwrap());
        }
        let m = n2.members(&chat).await.unwrap();
        let b_cursor = m.iter().find(|m| m.user_id == bb).unwrap();
        // Reads asked: k = 0, 4, ..., 36 -> seq (7k % 30) + 1; the highest read is 29.
        let max_read = (0..40i64)
            .filter(|k| k % 4 == 0)
            .map(|k| (k * 7) % 30 + 1)
            .max()
            .unwrap();
        let max_any = (0..40i64).map(|k| (k * 7) % 30 + 1).max().unwrap();
        assert_eq!(
            (b_cursor.read_seq, b_cursor.delivered_seq),
            (max_read, max_any)
        );
        // No status is reported twice for one seq, whichever node moved the cursor, and the
        // highest read is reported.
        for status in [MessageStatus::Delivered, MessageStatus::Read] {
            let mut seqs: Vec<i64> = reported
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.seq)
                .collect();
            let n = seqs.len();
            seqs.sort();
            seqs.dedup();
            assert_eq!(seqs.len(), n, "{status:?} reported twice for one seq");
        }
        let top_read = reported
            .iter()
            .filter(|c| c.status == MessageStatus::Read)
            .map(|c| c.seq)
            .max();
        assert_eq!(top_read, Some(max_read));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_direct_chat_created_through_two_nodes_at_once_exists_once() {
        let b = Backend::postgres();
        let (n1, n2) = (b.open().await, b.open().await);
        let (a, bb) = (user(&*n1, "a").await, user(&*n1, "b").await);
        let make = |s: Arc<dyn Store>, id: &'static str, who: [String; 2]| {
            tokio::spawn(async move {
                s.create_chat(NewChat {
                    id: id.into(),
                    kind: ChatKind::Direct,
                    title: None,
                    participant_ids: who.to_vec(),
                    created_at: 1,
                })
                .await
                .unwrap()
            })
        };
        let t1 = make(n1.clone(), "d1", [a.clone(), bb.clone()]);
        let t2 = make(n2.clone(), "d2", [bb.clone(), a.clone()]);
        let ((c1, new1), (c2, new2)) = (t1.await.unwrap(), t2.await.unwrap());
        assert_eq!(c1.id, c2.id);
        assert!(new1 ^ new2, "exactly one of them created it");
        assert_eq!(n2.chats_with_members(&a).await.unwrap().len(), 1);
    }
}
