-- jobfeed schema, version 6: the worker-lost watchdog (docs/operations.md, "The worker-lost
-- watchdog"). A job's heartbeat_timeout, in seconds (NULL: not watched), is kept in a column
-- as well as in its snapshot, so that the server can load the unfinished watched jobs at
-- start without reading every snapshot. Rows stored before this version are not watched.
ALTER TABLE jobs ADD COLUMN heartbeat_timeout REAL;

-- The snapshot has a fixed shape: snapshots stored before this version get the new field as
-- null (they are served as stored).
UPDATE jobs SET snapshot = json_set(snapshot, '$.heartbeat_timeout', json('null'))
WHERE json_type(snapshot, '$.heartbeat_timeout') IS NULL;

-- What the watchdog loads at start: only unfinished jobs with a timeout, however many
-- finished or unwatched jobs the file holds. Partial, so an unwatched job's row never has an
-- entry to maintain.
CREATE INDEX jobs_watched ON jobs (tenant, job_id)
WHERE heartbeat_timeout IS NOT NULL AND status IN ('queued', 'running');
