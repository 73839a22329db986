-- jobfeed schema, version 4: tenants. Every job belongs to one tenant and job_id is unique
-- within its tenant (docs/security.md). Rows stored before this version are tenant 'default'.
--
-- SQLite cannot change a table's UNIQUE constraints in place: jobs and events are rebuilt
-- (new table, copy, drop, rename), inside this migration's one transaction. job_no and id
-- are copied as they are, so listing cursors, event ids and every snapshot stay valid.
-- Indexes lead with tenant, so each per-tenant query searches one tenant's rows as the old
-- ones searched the whole table (tests/test_tenancy_schema.py checks the query plans).

CREATE TABLE jobs_v4 (
    job_no      INTEGER PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    job_id      TEXT    NOT NULL,
    kind        TEXT,
    status      TEXT    NOT NULL,
    last_seq    INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    finished_at TEXT,
    snapshot    TEXT    NOT NULL,
    UNIQUE (tenant, job_id)
) STRICT;

INSERT INTO jobs_v4
    (job_no, tenant, job_id, kind, status, last_seq, created_at, updated_at, finished_at, snapshot)
SELECT job_no, 'default', job_id, kind, status, last_seq, created_at, updated_at, finished_at,
    snapshot
FROM jobs;

DROP TABLE jobs;
ALTER TABLE jobs_v4 RENAME TO jobs;

-- Listing newest first: all of a tenant's jobs, or one status, or one kind.
CREATE INDEX jobs_by_tenant ON jobs (tenant, job_no);
CREATE INDEX jobs_by_status ON jobs (tenant, status, job_no);
CREATE INDEX jobs_by_kind ON jobs (tenant, kind, job_no);

CREATE TABLE events_v4 (
    id     INTEGER PRIMARY KEY,
    tenant TEXT    NOT NULL,
    job_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    type   TEXT    NOT NULL,
    ts     TEXT    NOT NULL,
    key    TEXT,
    body   TEXT    NOT NULL,
    UNIQUE (tenant, job_id, seq)
) STRICT;

INSERT INTO events_v4 (id, tenant, job_id, seq, type, ts, key, body)
SELECT id, 'default', job_id, seq, type, ts, key, body
FROM events;

DROP TABLE events;
ALTER TABLE events_v4 RENAME TO events;

-- Idempotency keys are unique within a job of a tenant.
CREATE UNIQUE INDEX events_by_key ON events (tenant, job_id, key) WHERE key IS NOT NULL;
