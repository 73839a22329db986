"""Migration 0004 (tenants) on a database made by the schema before it, and the query plans
of every per-tenant statement the store and the writer run.

The old database is built by migrations 0001..0003 and filled as the old writer stored jobs:
several jobs, logs with idempotency keys, a finished job, epochs in the snapshots. After 0004
every row is still there, byte for byte, in tenant ``default``; the server serves it,
answers keyed retries as duplicates and keeps numbering events where the log left off.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.grants import JobGrants
from server.migrate import apply_migrations, bundled_migrations
from server.snapshot import JobState, apply_event
from server.store import HEAD_SQL, READ_AFTER_SQL, SNAPSHOT_SQL, list_jobs_sql
from server.writer import UPDATE_JOB_SQL, load_keys_sql, load_states_sql
from tests.conftest import ClientFactory, ConfigFactory

V3 = bundled_migrations()[:3]
OLD_JOBS = {"old-a": 5, "old-b": 3, "old-done": 2}  # job_id -> events after `created`


def make_v3_database(db: Path) -> None:
    """Schema version 3 holding jobs, logs (some keyed), and epochs, as the old writer
    stored them: snapshots folded from the logs by the server's own reducer."""
    assert apply_migrations(db, V3) == [m.name for m in V3]
    event_id = 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for job_no, (job_id, count) in enumerate(OLD_JOBS.items(), 1):
            state: JobState | None = None
            rows = []
            for seq in range(1, count + 2):
                event_id += 1
                ts = f"2026-11-2{job_no}T10:00:{seq:02d}.000001Z"
                event: dict[str, Any] = {"job_id": job_id, "seq": seq, "id": event_id, "ts": ts}
                key = None
                if seq == 1:
                    event["type"] = "created"
                elif job_id == "old-done" and seq == count + 1:
                    event["type"] = "completed"
                else:
                    event.update(type="log", message=f"line {seq}", level="info")
                    key = f"k-{seq}"
                state = apply_event(state, event)
                rows.append((event_id, job_id, seq, event["type"], ts, key, orjson.dumps(event)))
            conn.executemany(
                "INSERT INTO events (id, job_id, seq, type, ts, key, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*row[:6], row[6].decode()) for row in rows],
            )
            assert state is not None
            conn.execute(
                "INSERT INTO jobs (job_no, job_id, kind, status, last_seq, created_at,"
                " updated_at, finished_at, snapshot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_no,
                    job_id,
                    state.kind,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.finished_at,
                    state.to_json().decode(),
                ),
            )
    # 0003 gives the snapshots their epochs, as on a server that ran version 3.
    assert apply_migrations(db, V3) == []


def rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()


JOB_COLUMNS = (
    "job_no, job_id, kind, status, last_seq, created_at, updated_at, finished_at, snapshot"
)
EVENT_COLUMNS = "id, job_id, seq, type, ts, key, body"


def test_0004_moves_every_row_into_tenant_default(tmp_path: Path) -> None:
    """Every job and event row survives 0004 unchanged (job_no and id too: cursors and event
    ids stay valid), each in tenant `default`; epochs are kept; the migration is recorded."""
    db = tmp_path / "v3.db"
    make_v3_database(db)
    jobs_before = rows(db, f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY job_no")
    events_before = rows(db, f"SELECT {EVENT_COLUMNS} FROM events ORDER BY id")
    assert len(events_before) == sum(OLD_JOBS.values()) + len(OLD_JOBS)
    assert all(orjson.loads(row[-1]).get("epoch") for row in jobs_before)

    assert apply_migrations(db, bundled_migrations()[:4]) == ["0004_tenants.sql"]

    assert rows(db, f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY job_no") == jobs_before
    assert rows(db, f"SELECT {EVENT_COLUMNS} FROM events ORDER BY id") == events_before
    assert rows(db, "SELECT DISTINCT tenant FROM jobs") == [("default",)]
    assert rows(db, "SELECT DISTINCT tenant FROM events") == [("default",)]
    assert rows(db, "SELECT count(*) FROM storage_probe") == [(1,)]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db, "SELECT version FROM schema_migrations ORDER BY version") == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


def test_job_ids_and_keys_are_unique_per_tenant(tmp_path: Path) -> None:
    """After 0004 another tenant may hold the same job_id, seq and idempotency key; the same
    tenant may not."""
    db = tmp_path / "v3.db"
    make_v3_database(db)
    apply_migrations(db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO jobs (tenant, job_id, status, last_seq, created_at, updated_at,"
            " snapshot) VALUES ('acme', 'old-a', 'queued', 1, 't', 't', '{}')"
        )
        conn.execute(
            "INSERT INTO events (tenant, job_id, seq, type, ts, key, body)"
            " VALUES ('acme', 'old-a', 2, 'log', 't', 'k-2', '{}')"
        )
    duplicates = [
        "INSERT INTO jobs (tenant, job_id, status, last_seq, created_at, updated_at, snapshot)"
        " VALUES ('default', 'old-a', 'queued', 1, 't', 't', '{}')",
        "INSERT INTO events (tenant, job_id, seq, type, ts, body)"
        " VALUES ('default', 'old-a', 2, 'log', 't', '{}')",
        "INSERT INTO events (tenant, job_id, seq, type, ts, key, body)"
        " VALUES ('default', 'old-a', 99, 'log', 't', 'k-2', '{}')",
    ]
    for statement in duplicates:
        with (
            contextlib.closing(sqlite3.connect(db)) as conn,
            pytest.raises(sqlite3.IntegrityError, match="UNIQUE"),
        ):
            conn.execute(statement)


async def test_the_server_serves_a_migrated_database(
    make_config: ConfigFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    """The app opening a version-3 file migrates it: the old jobs list and read as before,
    a keyed retry of an old event is a duplicate, a new event continues the ids and seqs,
    and the finished job stays closed."""
    db = tmp_path / "v3.db"
    make_v3_database(db)
    old_snapshot = orjson.loads(rows(db, "SELECT snapshot FROM jobs WHERE job_id = 'old-a'")[0][0])
    client = await make_client(make_config(storage__path=db))
    listed = await (await client.get("/v1/jobs")).json()
    assert [job["job_id"] for job in listed["jobs"]] == ["old-done", "old-b", "old-a"]
    # Later migrations only add fields to the fixed shape: 0006's heartbeat_timeout.
    served = await (await client.get("/v1/jobs/old-a")).json()
    assert served == {**old_snapshot, "heartbeat_timeout": None}
    page = await (await client.get("/v1/jobs/old-a/events")).json()
    assert [event["seq"] for event in page["events"]] == [1, 2, 3, 4, 5, 6]
    retry = await client.post(
        "/v1/jobs/old-a/events", json={"type": "log", "message": "line 3", "key": "k-3"}
    )
    assert retry.status == 200
    assert (await retry.json())["events"][0] == {
        "seq": 3,
        "id": 3,
        "ts": "2026-11-21T10:00:03.000001Z",
        "duplicate": True,
    }
    fresh = await client.post("/v1/jobs/old-a/events", json={"type": "log", "message": "new"})
    assert fresh.status == 201
    appended = (await fresh.json())["events"][0]
    assert (appended["seq"], appended["id"]) == (7, sum(OLD_JOBS.values()) + len(OLD_JOBS) + 1)
    closed = await client.post("/v1/jobs/old-done/events", json={"type": "log", "message": "x"})
    assert closed.status == 409


# -- query plans -------------------------------------------------------------------------


def plan(conn: sqlite3.Connection, query: str, params: list[Any] | tuple[Any, ...]) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", params).fetchall()]


def assert_searches(steps: list[str], query: str) -> None:
    """Every step that touches jobs or events searches an index on its leading columns;
    nothing scans them (nor skip-scans an index, ``ANY(tenant)``: once per tenant), and no
    sort is done outside an index."""
    touching = [s for s in steps if " jobs" in s or " events" in s or " j " in s or " e " in s]
    assert touching, (query, steps)
    for step in touching:
        assert step.startswith("SEARCH"), (query, steps)
        assert "INDEX" in step or "PRIMARY KEY" in step, (query, steps)
        assert "ANY(" not in step, (query, steps)
    assert not any("TEMP B-TREE" in step for step in steps), (query, steps)


@pytest.fixture
def big_database(tmp_path: Path) -> sqlite3.Connection:
    """Two tenants with many jobs and events, analyzed, so the planner's choice is the one a
    real database gets."""
    db = tmp_path / "plans.db"
    apply_migrations(db)
    conn = sqlite3.connect(db)
    with conn:
        for tenant in ("default", "acme"):
            conn.executemany(
                "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at,"
                " updated_at, snapshot) VALUES (?, ?, ?, ?, 20, 't', 't', '{}')",
                [
                    (tenant, f"job-{n}", f"kind-{n % 7}", ("running", "completed")[n % 2])
                    for n in range(500)
                ],
            )
            conn.executemany(
                "INSERT INTO events (tenant, job_id, seq, type, ts, key, body)"
                " VALUES (?, ?, ?, 'log', 't', ?, '{}')",
                [
                    (tenant, f"job-{n}", seq, f"k{seq}" if seq % 2 else None)
                    for n in range(500)
                    for seq in range(1, 21)
                ],
            )
        conn.execute("ANALYZE")
    return conn


def test_every_per_tenant_query_searches_an_index(big_database: sqlite3.Connection) -> None:
    """The store's reads, the listing in each of its shapes, and the writer's lookups and
    updates: each searches an index leading with tenant (EXPLAIN QUERY PLAN)."""
    conn = big_database
    key = ("acme", "job-7")
    statements: list[tuple[str, list[Any] | tuple[Any, ...]]] = [
        (SNAPSHOT_SQL, key),
        (HEAD_SQL, key),
        (READ_AFTER_SQL, (*key, 5, 100)),
        (load_states_sql(2), ["acme", "job-1", "acme", "job-2"]),
        (load_keys_sql(2), ["acme", "job-1", "k1", "acme", "job-2", "k3"]),
        (UPDATE_JOB_SQL, ["running", 2, "t", None, "{}", *key]),
    ]
    grants = JobGrants.parse(["job-1", "job-2*"])
    for status, kind, before, narrowed in [
        (None, None, None, None),
        (None, None, 300, None),
        ("running", None, None, None),
        ("running", None, 300, None),
        (None, "kind-3", None, None),
        (None, "kind-3", 300, None),
        (None, None, None, grants),
    ]:
        statements.append(list_jobs_sql("acme", status, kind, 50, before, narrowed))
    for query, params in statements:
        assert_searches(plan(conn, query, params), query)


def test_the_plan_check_catches_a_scan(big_database: sqlite3.Connection) -> None:
    """The check above is not vacuous: a lookup by job_id alone (the pre-tenant query) scans
    jobs, and the check refuses it."""
    query = "SELECT snapshot FROM jobs WHERE job_id = ?"
    with pytest.raises(AssertionError):
        assert_searches(plan(big_database, query, ["job-7"]), query)
