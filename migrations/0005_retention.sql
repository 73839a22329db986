-- jobfeed schema, version 5: deleting jobs and retention (docs/operations.md, "Deleting jobs
-- and retention"; server/deletion.py, server/retention.py).
--
-- log_head: the highest event id a deletion has removed. The writer hands out the next id
-- after max(events.id, this): without it, deleting the newest events and restarting would
-- hand their ids out again, and a feed subscriber resuming past them would miss new events.
CREATE TABLE log_head (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    max_deleted_id INTEGER NOT NULL
) STRICT;

INSERT INTO log_head (id, max_deleted_id) VALUES (1, 0);

-- Jobs whose row is deleted but whose events are still being removed, a few thousand per
-- transaction (retention of a job with a long log). Their events are hidden from the feed
-- (the writer keeps this set in memory) and removed before the same id is created again.
CREATE TABLE purging (
    tenant TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (tenant, job_id)
) STRICT, WITHOUT ROWID;

-- The retention sweep's searches. Partial: a job has an entry only once it has finished
-- (one index insert per job, at its terminal event, never on other appends) ...
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_kind_finished ON jobs (kind, finished_at) WHERE finished_at IS NOT NULL;
-- ... or while it has not (inserted with the job, removed at its terminal event). Not on
-- updated_at: that changes with every append, and the index would be rewritten with it.
CREATE INDEX jobs_unfinished ON jobs (job_no) WHERE finished_at IS NULL;
