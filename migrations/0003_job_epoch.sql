-- jobfeed schema, version 3: every snapshot carries its log's epoch (server/snapshot.py,
-- log_epoch): "{created event id}-{created ts in microseconds since 1970, lower-case hex}".
-- Snapshots stored before this version lack it; compute it from each job's seq-1 event.
-- ts is always "YYYY-MM-DDTHH:MM:SS.ffffffZ": whole seconds come from strftime on the first
-- 19 characters (strftime on the full string rounds to milliseconds and could carry into the
-- next second), the six fraction digits are added as they are.
UPDATE jobs
SET snapshot = json_set(
    snapshot,
    '$.epoch',
    (
        SELECT printf(
            '%d-%x',
            e.id,
            CAST(strftime('%s', substr(e.ts, 1, 19)) AS INTEGER) * 1000000
                + CAST(substr(e.ts, 21, 6) AS INTEGER)
        )
        FROM events AS e
        WHERE e.job_id = jobs.job_id AND e.seq = 1
    )
)
WHERE json_type(snapshot, '$.epoch') IS NULL OR json_type(snapshot, '$.epoch') = 'null';
