-- The (chat_id, sender_id, seq) index served only the status lookup of a sender's newest
-- message in a range of seqs and the count of one's own unread messages; both read a short
-- range of (chat_id, seq) just as well. It cost every message a write to a leaf scattered
-- over all chats (group commit wrote one such page per chat per group).
DROP INDEX IF EXISTS messages_sender_seq;
