-- jobfeed schema, version 8: the database's generation (server/generation.py). A restore
-- (`jobfeed restore`) starts a new one, and every epoch includes it, so a client resuming a
-- log it read before the restore is told log_reset instead of being handed other events
-- under offsets it has seen. number 0 means "never restored": job epochs then stay exactly
-- what they were before this version (nothing here touches a snapshot). tag is random, made
-- once per file, so the feed's epoch ("g{number}-{tag}") also tells a wiped or replaced
-- database from this one.
CREATE TABLE generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    number     INTEGER NOT NULL,
    tag        TEXT    NOT NULL,
    started_at TEXT    NOT NULL
) STRICT;

INSERT INTO generation (id, number, tag, started_at)
VALUES (1, 0, lower(hex(randomblob(4))), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
