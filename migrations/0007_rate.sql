-- jobfeed schema, version 7: every snapshot carries started_at, rate, eta_seconds and
-- rate_window (server/snapshot.py, "Rate and ETA"; docs/protocol.md). Snapshots stored before
-- this version lack them. started_at is the ts of the job's first event after created (its
-- seq-2 event; null if it has none). The estimate starts empty: rate and eta_seconds null,
-- and a null rate_window makes a running job's next event the first sample of a new window
-- (the fold treats a missing window so; one more sample, a second apart, gives a rate again).
-- Finished jobs hold no estimate in any case.
UPDATE jobs
SET snapshot = json_set(
    snapshot,
    '$.started_at',
    (
        SELECT e.ts
        FROM events AS e
        WHERE e.tenant = jobs.tenant AND e.job_id = jobs.job_id AND e.seq = 2
    ),
    '$.rate', NULL,
    '$.eta_seconds', NULL,
    '$.rate_window', NULL
)
WHERE json_type(snapshot, '$.rate_window') IS NULL;
