-- jobfeed schema, version 2: a one-row table the writer rewrites to find out, while no append
-- arrives, whether the log can be written again after a storage fault (server/writer.py,
-- Writer._probe). probed_at and probes show when it last succeeded and how often it has run.
CREATE TABLE storage_probe (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at TEXT,
    probes    INTEGER NOT NULL DEFAULT 0,
    pad       BLOB  -- set to one event's worth of bytes and cleared within each probe
) STRICT;

INSERT INTO storage_probe (id, probes) VALUES (1, 0);
