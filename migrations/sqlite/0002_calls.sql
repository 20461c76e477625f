-- Call records, and call events shown in chat history.

CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    chat_id     TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    caller_id   TEXT NOT NULL REFERENCES users(id),
    callee_id   TEXT NOT NULL REFERENCES users(id),
    call_type   TEXT NOT NULL CHECK (call_type IN ('audio', 'video')),
    started_at  INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at    INTEGER NOT NULL,
    end_reason  TEXT NOT NULL
);
CREATE INDEX calls_chat ON calls(chat_id, started_at);

-- JSON of a call event message ({callId, callType, outcome, durationMs}); NULL for text.
ALTER TABLE messages ADD COLUMN call_meta TEXT;
