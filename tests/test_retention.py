"""Retention (``[retention]``, operations.md "Retention") on real SQLite files with the real app:
old jobs are written straight into the file (``bench.olddata``), the sweep is run with its
clock moved forward (``RetentionSweep.sweep(now=...)``) so that nothing needs to wait days.
Finished and unfinished jobs, per-kind overrides, a job whose log needs several transactions,
open streams of expired jobs (4410), the file shrinking, the metrics, the query plans, and
migration 0005 on a database made by schema 0004 with rows in it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bench.olddata import fill_old_jobs
from server.deletion import (
    _DELETE_EVENTS_SQL,
    _DELETE_SOME_EVENTS_SQL,
    _JOB_SQL,
    _NEWEST_ID_SQL,
    Candidate,
)
from server.keys import STORE
from server.migrate import apply_migrations, bundled_migrations, vacuum_incremental
from server.retention import FINISHED_KIND_SQL, FINISHED_SQL, UNFINISHED_SQL
from server.tenancy import JobKey
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.streams import ws_until_closed
from tests.test_tenancy_schema import assert_searches, make_v3_database, plan

Client = TestClient[Any, Any]
WAIT = 10.0
HALF_DAY = timedelta(days=0.5)
LATER = timedelta(days=1)  # the sweeps below run this far in the future


def retention(**more: Any) -> dict[str, Any]:
    """make_config overrides: finished and unfinished jobs kept a day; ``video`` kept longer;
    ``short`` finished jobs an hour; the background sweep only at start."""
    kinds = {"video": {"finished_days": 5, "unfinished_days": 10}, "short": {"finished_days": 0.04}}
    return {
        "retention__finished_days": 1,
        "retention__unfinished_days": 1,
        "retention__interval_seconds": 3600,
        "retention__kinds": json.dumps(kinds),
        **more,
    }


def count(db: Path, query: str, *params: object) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute(query, params).fetchone()[0])


async def scrape(client: Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = await (await client.get("/metrics")).text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def sweep_later(client: Client) -> Any:
    store = client.app[STORE]
    assert store.retention is not None
    return await store.retention.sweep(now=datetime.now(UTC) + LATER)


async def ws_parked(client: Client, job_id: str) -> Any:
    ws = await client.ws_connect(f"/v1/jobs/{job_id}/stream")
    hello = json.loads((await asyncio.wait_for(ws.receive(), WAIT)).data)
    assert hello["type"] == "hello"
    while True:  # the replay, up to the end of the log
        frame = json.loads((await asyncio.wait_for(ws.receive(), WAIT)).data)
        if frame.get("seq") == hello["last_seq"]:
            return ws


async def test_sweep_deletes_what_expired_and_nothing_else(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """Thousands of jobs: expired finished and unfinished ones go (with the default cutoffs
    and a kind's shorter one), a kind kept longer stays, a long log goes in several small
    transactions; open streams of deleted jobs end with 4410, a kept job's stream goes on;
    the counters move by exactly what was deleted and jobs by status stays exact."""
    config = make_config(**retention(retention__batch_events=1000))
    db = config.storage.path
    expired = fill_old_jobs(db, jobs=2000, events_per_job=3, age=HALF_DAY, prefix="done")
    expired += fill_old_jobs(
        db, jobs=300, events_per_job=3, age=HALF_DAY, finished=False, prefix="stale"
    )
    expired += fill_old_jobs(
        db, jobs=200, events_per_job=2, age=timedelta(minutes=30), kind="short", prefix="short"
    )
    expired += fill_old_jobs(db, jobs=1, events_per_job=4500, age=HALF_DAY, prefix="long")
    kept = fill_old_jobs(db, jobs=300, events_per_job=3, age=HALF_DAY, kind="video", prefix="vdone")
    kept += fill_old_jobs(
        db, jobs=100, events_per_job=3, age=HALF_DAY, kind="video", finished=False, prefix="vrun"
    )
    client = await make_client(config)
    store = client.app[STORE]
    assert store.retention is not None
    await asyncio.wait_for(_first_sweep(store), WAIT)  # at start: nothing has expired yet
    assert store.retention.last is not None
    assert store.retention.last.jobs == 0
    before = await scrape(client)
    gone_ws = await ws_parked(client, "stale-0000007")
    # Read while the sweep runs, as a client does (the server waits a second for the
    # answer to its close, then drops the connection).
    gone_end = asyncio.create_task(ws_until_closed(gone_ws, WAIT))
    kept_ws = await ws_parked(client, "vrun-0000003")
    async with client.get(
        "/v1/jobs/stale-0000008/stream", headers={"Accept": "text/event-stream"}
    ) as sse:
        report = await sweep_later(client)
        sse_body = await asyncio.wait_for(sse.content.read(), WAIT)
    assert report.jobs == 2000 + 300 + 200 + 1
    assert report.events == expired
    assert report.transactions >= expired // 1000
    frames, code = await gone_end
    assert code == 4410
    assert frames[-1]["code"] == "job_deleted"
    assert b"event: error" in sse_body
    assert b"job_deleted" in sse_body
    await append(client, "vrun-0000003", {"type": "progress", "current": 1})
    live = json.loads((await asyncio.wait_for(kept_ws.receive(), WAIT)).data)
    assert live["seq"] == 4
    await kept_ws.close()
    assert count(db, "SELECT count(*) FROM jobs") == 400
    assert count(db, "SELECT count(*) FROM events") == kept + 1
    assert count(db, "SELECT count(*) FROM purging") == 0
    assert (await client.get("/v1/jobs/long-0000000")).status == 404
    after = await scrape(client)
    jobs_moved = after["jobfeed_jobs_deleted_total", frozenset({("reason", "retention")})]
    jobs_moved -= before.get(
        ("jobfeed_jobs_deleted_total", frozenset({("reason", "retention")})), 0
    )
    events_moved = after["jobfeed_events_deleted_total", frozenset({("reason", "retention")})]
    events_moved -= before.get(
        ("jobfeed_events_deleted_total", frozenset({("reason", "retention")})), 0
    )
    assert (jobs_moved, events_moved) == (report.jobs, report.events)
    assert after["jobfeed_retention_sweeps_total", frozenset()] == 2
    with contextlib.closing(sqlite3.connect(db)) as conn:
        by_status = dict(
            conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        )
        oldest = conn.execute("SELECT ts FROM events ORDER BY id LIMIT 1").fetchone()[0]
    for status in ("queued", "running", "completed", "failed", "cancelled"):
        assert after["jobfeed_jobs", frozenset({("status", status)})] == by_status.get(status, 0)
    horizon = datetime.fromisoformat(oldest.replace("Z", "+00:00")).timestamp()
    assert after["jobfeed_retention_horizon_seconds", frozenset()] == pytest.approx(horizon)


async def _first_sweep(store: Any) -> None:
    await store.retention.swept.wait()


async def test_api_deletions_and_status_counts(client: Client) -> None:
    """jobfeed_jobs{status} follows creates, status changes and deletions (kept by the
    writer, not counted per scrape), and DELETE moves the api counters by exactly its job
    and its events."""
    before = await scrape(client)
    await create_job(client, job_id="s1")
    await create_job(client, job_id="s2")
    await append(client, "s2", {"type": "progress", "current": 1}, {"type": "log", "message": "x"})
    await create_job(client, job_id="s3")
    await append(client, "s3", {"type": "completed"})
    assert (await client.delete("/v1/jobs/s2")).status == 204
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("jobfeed_jobs", status="queued") == 1
    assert moved("jobfeed_jobs", status="running") == 0
    assert moved("jobfeed_jobs", status="completed") == 1
    assert moved("jobfeed_jobs_deleted_total", reason="api") == 1
    assert moved("jobfeed_events_deleted_total", reason="api") == 3
    assert moved("jobfeed_jobs_deleted_total", reason="retention") == 0


async def test_the_file_shrinks(make_client: ClientFactory, make_config: ConfigFactory) -> None:
    """A new database has auto_vacuum = INCREMENTAL; after a sweep deletes most of it, the
    incremental vacuum steps give the pages back and the file is smaller."""
    config = make_config(**retention(retention__vacuum_pages=64))
    db = config.storage.path
    fill_old_jobs(db, jobs=1500, events_per_job=20, age=HALF_DAY, prefix="bulk")
    fill_old_jobs(db, jobs=10, events_per_job=3, age=HALF_DAY, kind="video", prefix="keep")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    size_before = db.stat().st_size
    client = await make_client(config)
    report = await sweep_later(client)
    assert report.jobs == 1500
    assert report.vacuum_pages > 0
    await client.close()  # the final checkpoint writes the shrunk database back
    size_after = db.stat().st_size
    assert size_after < size_before / 4, (size_before, size_after)
    assert count(db, "SELECT count(*) FROM events") == 30


def test_jobfeed_vacuum_converts_an_old_file(tmp_path: Path) -> None:
    """A file made without auto_vacuum (before this version) is rebuilt with it by
    ``vacuum_incremental`` (``jobfeed vacuum``), rows unchanged."""
    db = tmp_path / "old.db"
    fill_old_jobs(db, jobs=50, events_per_job=3, age=HALF_DAY)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")  # now an old-style file
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        rows_before = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    vacuum_incremental(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert conn.execute("SELECT * FROM events ORDER BY id").fetchall() == rows_before


async def test_migration_0005_on_a_0004_database(
    tmp_path: Path, make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A version-4 file with rows gets 0005 (its tables and indexes) with every row as it
    was; the server then serves it, and retention deletes its old finished job."""
    db = tmp_path / "v4.db"
    make_v3_database(db)
    v4 = bundled_migrations()[:4]
    assert apply_migrations(db, v4) == [v4[3].name]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        jobs_before = conn.execute("SELECT * FROM jobs ORDER BY job_no").fetchall()
        events_before = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    assert apply_migrations(db, bundled_migrations()[:5]) == ["0005_retention.sql"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT * FROM jobs ORDER BY job_no").fetchall() == jobs_before
        assert conn.execute("SELECT * FROM events ORDER BY id").fetchall() == events_before
        assert conn.execute("SELECT max_deleted_id FROM log_head").fetchall() == [(0,)]
        indexes = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert {"jobs_finished", "jobs_kind_finished", "jobs_unfinished"} <= indexes
    client = await make_client(make_config(storage__path=db, retention__finished_days=1))
    assert (await client.get("/v1/jobs/old-a")).status == 200
    store = client.app[STORE]
    await asyncio.wait_for(_first_sweep(store), WAIT)  # the sweep at start: it finished days ago
    assert (store.retention.last.jobs, store.retention.last.events) == (1, 3)  # old-done
    assert (await client.get("/v1/jobs/old-done")).status == 404
    assert (await client.get("/v1/jobs/old-b")).status == 200


@pytest.fixture
def analyzed(tmp_path: Path) -> sqlite3.Connection:
    """Finished and unfinished jobs of several kinds, analyzed: the planner's real choice."""
    db = tmp_path / "plans.db"
    for kind in ("a", "b", None):
        fill_old_jobs(db, jobs=300, events_per_job=3, age=HALF_DAY, kind=kind, prefix=f"f{kind}")
        fill_old_jobs(
            db,
            jobs=100,
            events_per_job=3,
            age=HALF_DAY,
            kind=kind,
            finished=False,
            prefix=f"u{kind}",
        )
    conn = sqlite3.connect(db)
    conn.execute("ANALYZE")
    return conn


def test_retention_queries_search_indexes(analyzed: sqlite3.Connection) -> None:
    """The sweep's searches and the deletion's statements each search an index (no scan of
    jobs or events, no sort outside an index): EXPLAIN QUERY PLAN."""
    cutoff = "2030-01-01T00:00:00.000000Z"
    key = ("default", "fa-0000001")
    statements: list[tuple[str, list[Any] | tuple[Any, ...]]] = [
        (FINISHED_SQL, [cutoff, "", 0, 1000]),
        (FINISHED_KIND_SQL, ["a", cutoff, "", 0, 1000]),
        (UNFINISHED_SQL, [0, 1000]),
        (_JOB_SQL, key),
        (_NEWEST_ID_SQL, key),
        (_DELETE_EVENTS_SQL, key),
        (_DELETE_SOME_EVENTS_SQL, (*key, 100)),
    ]
    for query, params in statements:
        assert_searches(plan(analyzed, query, params), query)


async def test_a_log_purged_in_pieces_is_hidden_and_its_id_free(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A job whose log is longer than one transaction loses its row first (404) and its
    events in later transactions: meanwhile a feed replay from SQLite shows none of them,
    and creating the same id again removes the rest first (its seq 1 is free)."""
    config = make_config(stream__feed_cache_events=0)  # the feed replays from SQLite
    client = await make_client(config)
    store = client.app[STORE]
    await create_job(client, job_id="longlog")
    await append(client, "longlog", *({"type": "log", "message": str(n)} for n in range(49)))
    await append(client, "longlog", {"type": "completed"})
    key = JobKey("default", "longlog")
    job_no = count(config.storage.path, "SELECT job_no FROM jobs WHERE job_id = 'longlog'")
    outcome = await store.deleter.delete_expired([Candidate(key, job_no, 51)], 10, lambda _: True)
    assert (outcome.jobs, outcome.events) == (1, 10)
    assert store.deleter.purging == {key}
    assert (await client.get("/v1/jobs/longlog")).status == 404
    await create_job(client, job_id="marker")
    seen: list[str] = []
    async with client.ws_connect("/v1/feed?after=0") as ws, asyncio.timeout(WAIT):
        while "marker" not in seen:
            frame = json.loads((await ws.receive()).data)
            if "seq" in frame:
                seen.append(frame["job_id"])
    assert seen == ["marker"]
    again = await create_job(client, job_id="longlog")
    assert again["last_seq"] == 1
    assert store.deleter.purging == set()
    assert count(config.storage.path, "SELECT count(*) FROM events WHERE job_id = 'longlog'") == 1
    assert count(config.storage.path, "SELECT count(*) FROM purging") == 0
