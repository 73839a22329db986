"""Old jobs written straight into a database file with SQL, before a server opens it: what a
retention sweep finds (bench W3retention, tests/test_retention.py). Orders of magnitude faster
than appending them through the API, and the rows are what the writer would have stored:
events' bodies as the writer serializes them, snapshots folded by ``server.snapshot``.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from server.migrate import apply_migrations
from server.snapshot import apply_event


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def fill_old_jobs(
    db_path: Path,
    *,
    jobs: int,
    events_per_job: int,
    age: timedelta,
    finished: bool = True,
    kind: str | None = None,
    prefix: str = "old",
    tenant: str = "default",
) -> int:
    """Add ``jobs`` jobs of ``events_per_job`` events each (created, progress..., and
    ``completed`` when ``finished``), their last event ``age`` ago, to the database at
    ``db_path`` (created and migrated if need be); ids follow the newest one there. Returns
    the number of events written."""
    apply_migrations(db_path)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a fixture: rebuilt if the machine dies
        row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        next_id = int(row[0]) + 1
        end = datetime.now(UTC) - age
        # Every event one microsecond after the previous: ts grows with id, as the writer's.
        moment = end - timedelta(microseconds=jobs * events_per_job)
        conn.execute("BEGIN")
        for number in range(jobs):
            job_id = f"{prefix}-{number:07d}"
            rows: list[tuple[Any, ...]] = []
            state = None
            for seq in range(1, events_per_job + 1):
                ts = _iso(moment)
                moment += timedelta(microseconds=1)
                event: dict[str, Any] = {"job_id": job_id, "seq": seq, "id": next_id}
                if seq == 1:
                    event |= {"type": "created", "ts": ts}
                    if kind is not None:
                        event["kind"] = kind
                elif seq == events_per_job and finished:
                    event |= {"type": "completed", "ts": ts}
                else:
                    event |= {"type": "progress", "ts": ts, "current": seq, "total": events_per_job}
                if seq == 1 or seq == events_per_job:
                    state = apply_event(state, event)
                body = orjson.dumps(event).decode()
                rows.append((next_id, tenant, job_id, seq, event["type"], ts, None, body))
                next_id += 1
            conn.executemany(
                "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            assert state is not None
            conn.execute(
                "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at,"
                " updated_at, finished_at, snapshot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    job_id,
                    kind,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.finished_at,
                    state.to_json().decode(),
                ),
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return jobs * events_per_job
