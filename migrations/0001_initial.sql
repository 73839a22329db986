-- jobfeed schema, version 1: the jobs' snapshots and the append-only event log.

-- One row per job: its snapshot, updated in the same transaction as the events it reflects.
-- job_no orders jobs by creation (newest first in listings, and the listing cursor).
CREATE TABLE jobs (
    job_no      INTEGER PRIMARY KEY,
    job_id      TEXT    NOT NULL UNIQUE,
    kind        TEXT,
    status      TEXT    NOT NULL,
    last_seq    INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    finished_at TEXT,
    snapshot    TEXT    NOT NULL  -- the protocol's snapshot JSON, served as stored
) STRICT;

CREATE INDEX jobs_by_status ON jobs (status, job_no);
CREATE INDEX jobs_by_kind ON jobs (kind, job_no);

-- The log. id is the server-wide position; (job_id, seq) the job's own, contiguous from 1.
-- body is the event's JSON exactly as sent to every client: serialized once, at append.
CREATE TABLE events (
    id     INTEGER PRIMARY KEY,
    job_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    type   TEXT    NOT NULL,
    ts     TEXT    NOT NULL,
    key    TEXT,
    body   TEXT    NOT NULL,
    UNIQUE (job_id, seq)
) STRICT;

-- Idempotency keys are unique within a job.
CREATE UNIQUE INDEX events_by_key ON events (job_id, key) WHERE key IS NOT NULL;
