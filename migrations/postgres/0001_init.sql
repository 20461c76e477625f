-- Switchboard schema, PostgreSQL flavour (the SQLite one is migrations/sqlite). Times are unix
-- milliseconds, as there. One migration: the SQLite history's two steps in their final shape.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    password_hash TEXT,               -- NULL for users of an external issuer
    external_sub  TEXT UNIQUE,        -- `iss|sub` of an external issuer
    created_at    BIGINT NOT NULL,
    last_seen_at  BIGINT
);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,     -- SHA-256 of the opaque token, never the token
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family_id   TEXT NOT NULL,        -- one login; reuse of a rotated token revokes the family
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens(expires_at);

CREATE TABLE chats (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    title      TEXT,
    direct_key TEXT UNIQUE,           -- "minUserId:maxUserId" for direct chats
    last_seq   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE chat_members (
    chat_id       TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    position      BIGINT NOT NULL,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    read_seq      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
);
CREATE INDEX chat_members_user ON chat_members(user_id);

CREATE TABLE messages (
    id             TEXT PRIMARY KEY,
    chat_id        TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    seq            BIGINT NOT NULL,
    sender_id      TEXT NOT NULL REFERENCES users(id),
    content        TEXT NOT NULL,
    client_msg_id  TEXT,
    created_at     BIGINT NOT NULL,
    pinned         BOOLEAN NOT NULL DEFAULT FALSE,
    fwd_message_id TEXT,
    fwd_chat_id    TEXT,
    fwd_sender_id  TEXT,
    -- JSON of a call event message ({callId, callType, outcome, durationMs}); NULL for text.
    call_meta      TEXT,
    UNIQUE (chat_id, seq)
);
CREATE UNIQUE INDEX messages_client_id ON messages(sender_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
CREATE INDEX messages_pinned ON messages(chat_id) WHERE pinned;
CREATE INDEX messages_sender_seq ON messages(chat_id, sender_id, seq);

-- Call records, and call events shown in chat history.
CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    chat_id     TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    caller_id   TEXT NOT NULL REFERENCES users(id),
    callee_id   TEXT NOT NULL REFERENCES users(id),
    call_type   TEXT NOT NULL CHECK (call_type IN ('audio', 'video')),
    started_at  BIGINT NOT NULL,
    answered_at BIGINT,
    ended_at    BIGINT NOT NULL,
    end_reason  TEXT NOT NULL
);
CREATE INDEX calls_chat ON calls(chat_id, started_at);
