"""The worker-lost watchdog (``server.watchdog``; operations.md, "The worker-lost watchdog"): a
job with a ``heartbeat_timeout`` that stays silent that long while unfinished is failed by the
server with ``worker_lost`` and ``"by": "server"``; the lost worker's later appends get 409.

Real servers on real SQLite files in ``tmp_path`` (an in-process app on a loopback socket, or a
``jobfeed serve`` child for the restart); timeouts of a second or less, and every wait is on
the event itself (a stream frame, a log line) with a generous timeout, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from server.config import ConfigError
from server.errors import JobFinished, StorageUnavailable
from server.keys import STORE
from server.migrate import apply_migrations, bundled_migrations
from server.models import LogIn
from server.snapshot import JobState, apply_event
from server.tenancy import JobKey
from server.watchdog import LOAD_WATCHED_SQL, Watchdog
from server.writer import AppendedEvent, Fence, FenceOutcome, Writer
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.procs import Launcher, get_snapshot, launching, read_log

Client = TestClient[Any, Any]
WAIT = 30.0  # seconds for what must happen (generous: the machine is shared)
FAST = {"watchdog__interval_seconds": 0.1}


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def next_event(ws: ClientWebSocketResponse) -> dict[str, Any]:
    """The next stored event on a job stream (control frames skipped)."""
    while True:
        message = await asyncio.wait_for(ws.receive(), WAIT)
        assert message.type == WSMsgType.TEXT, message
        frame: dict[str, Any] = orjson.loads(message.data)
        if "seq" in frame and frame.get("type") != "hello":
            return frame


async def fast_client(
    make_client: ClientFactory, make_config: ConfigFactory, **more: Any
) -> Client:
    return await make_client(make_config(**{**FAST, **more}))


def assert_worker_lost(event: dict[str, Any], seq: int) -> None:
    assert event["type"] == "failed", event
    assert event["seq"] == seq, event
    assert event["by"] == "server", event
    assert event["error"]["code"] == "worker_lost", event
    assert "heartbeat_timeout" in event["error"]["message"], event


# -- a lost worker ----------------------------------------------------------------------------


async def test_silent_worker_is_failed_and_fenced(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A job whose worker stops reporting is failed as worker_lost, by the server: a WebSocket
    subscriber gets the failed event (and the close after a terminal event), GET shows the
    failure, the event came no earlier than the timeout after the last one, the worker's late
    append gets 409 job_finished, and the metrics count it."""
    client = await fast_client(make_client, make_config)
    snapshot = await create_job(client, job_id="silent", heartbeat_timeout=0.5)
    assert snapshot["heartbeat_timeout"] == 0.5
    async with client.ws_connect("/v1/jobs/silent/stream?after=0") as ws:
        assert (await next_event(ws))["type"] == "created"
        await append(client, "silent", {"type": "progress", "progress": 10})
        progress = await next_event(ws)
        failed = await next_event(ws)
        assert_worker_lost(failed, seq=3)
        assert seconds_between(progress["ts"], failed["ts"]) >= 0.5
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), closing
    got = await (await client.get("/v1/jobs/silent")).json()
    assert got["status"] == "failed"
    assert got["error"] == failed["error"]
    assert got["last_seq"] == 3
    late = await client.post("/v1/jobs/silent/events", json={"type": "progress", "progress": 20})
    assert late.status == 409
    assert (await late.json())["error"]["code"] == "job_finished"
    metrics = await (await client.get("/metrics")).text()
    assert "jobfeed_jobs_lost_total 1" in metrics
    assert "jobfeed_watched_jobs 0" in metrics


async def test_worker_that_keeps_reporting_is_never_failed(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A worker appending more often than its timeout, for longer than timeout + interval,
    is never failed: it completes its job itself."""
    client = await fast_client(make_client, make_config)
    await create_job(client, job_id="busy", heartbeat_timeout=1.0)
    store = client.app[STORE]
    watchdog = store.watchdog
    assert watchdog is not None
    assert watchdog.watched == 1
    started = time.monotonic()
    sweeps_before = watchdog.fence_groups
    count = 0
    # Back to back: each append waits for the previous one's answer, a few ms here.
    while time.monotonic() - started < 2.0:
        count += 1
        await append(client, "busy", {"type": "progress", "current": count})
    await append(client, "busy", {"type": "completed"})
    got = await (await client.get("/v1/jobs/busy")).json()
    assert got["status"] == "completed", got
    assert watchdog.lost == 0
    assert watchdog.fence_groups == sweeps_before  # never even due
    assert watchdog.watched == 0


async def test_kind_default_from_config_and_validation(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A job of a kind in watchdog.kinds gets that timeout (and is failed by it); a job's own
    heartbeat_timeout wins; other kinds and no kind get null; a timeout that is not a
    positive number within bounds is 422 and creates nothing."""
    client = await fast_client(make_client, make_config, watchdog__kinds='{"video": 0.5}')
    assert (await create_job(client, job_id="v1", kind="video"))["heartbeat_timeout"] == 0.5
    own = await create_job(client, job_id="v2", kind="video", heartbeat_timeout=60)
    assert own["heartbeat_timeout"] == 60
    assert (await create_job(client, job_id="r1", kind="report"))["heartbeat_timeout"] is None
    assert (await create_job(client, job_id="n1"))["heartbeat_timeout"] is None
    for bad in (0, -1, 0.01, "5", True, 1e9, [1], {"s": 1}):
        response = await client.post("/v1/jobs", json={"job_id": "bad", "heartbeat_timeout": bad})
        assert response.status == 422, (bad, await response.text())
        body = await response.json()
        assert body["error"]["code"] == "validation_error"
        assert body["error"]["details"][0]["loc"][0] == "heartbeat_timeout"
    assert (await client.get("/v1/jobs/bad")).status == 404
    async with client.ws_connect("/v1/jobs/v1/stream?after=1") as ws:
        assert_worker_lost(await next_event(ws), seq=2)
    for job_id in ("v2", "r1", "n1"):
        assert (await (await client.get(f"/v1/jobs/{job_id}")).json())["status"] == "queued"


async def test_feed_subscribers_see_the_failure(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """The watchdog's event is an event like any other: the feed carries it too."""
    client = await fast_client(make_client, make_config)
    await create_job(client, job_id="fed", heartbeat_timeout=0.3)
    async with client.ws_connect("/v1/feed?after=0") as ws:
        while True:
            message = await asyncio.wait_for(ws.receive(), WAIT)
            frame = orjson.loads(message.data)
            if frame.get("type") == "failed":
                break
    assert_worker_lost(frame, seq=2)


# -- the race: the writer decides ------------------------------------------------------------


async def test_an_append_that_reaches_the_writer_first_wins(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """The watchdog's decision is a conditional op in the writer: a fence naming a last_seq
    the job has moved past (an append committed in an earlier group, or earlier in the same
    group) appends nothing; an append queued after a fence that held is refused 409. (The
    watchdog is off here: the fences are submitted by hand.)"""
    client = await make_client(make_config(watchdog__enabled="false"))
    writer = client.app[STORE].writer
    snapshot = await create_job(client, job_id="race", heartbeat_timeout=100)
    key, epoch = JobKey("default", "race"), snapshot["epoch"]
    stale = Fence(key, epoch, 1, "test")

    # An earlier group moved the job: the fence sees seq 2, not 1.
    await append(client, "race", {"type": "log", "message": "still here"})
    assert await failed_by(writer, [stale]) == [None]

    # The same group: an append queued before the fence is planned first, and wins.
    commits = writer.commits
    appended, fenced = await asyncio.gather(
        writer.append(key, [_log("first")]), failed_by(writer, [Fence(key, epoch, 2, "test")])
    )
    assert writer.commits == commits + 1  # one group
    assert appended.last_seq == 3
    assert fenced == [None]

    # A fence that holds, with an append queued after it in the same group: 409.
    fenced_first = asyncio.ensure_future(writer.fence([Fence(key, epoch, 3, "test")]))
    late = asyncio.ensure_future(writer.append(key, [_log("too late")]))
    outcome = (await fenced_first)[0]
    assert outcome.failed is not None
    assert outcome.failed.seq == 4
    assert outcome.state is not None
    assert outcome.state.status == "failed"
    with pytest.raises(JobFinished):
        await late
    log = await (await client.get("/v1/jobs/race/events")).json()
    assert [event["type"] for event in log["events"]] == ["created", "log", "log", "failed"]
    assert log["events"][-1]["by"] == "server"


async def failed_by(writer: Writer, fences: list[Fence]) -> list[AppendedEvent | None]:
    """What each fence appended (None: nothing)."""
    return [outcome.failed for outcome in await writer.fence(fences)]


def _log(message: str) -> LogIn:
    return LogIn(type="log", message=message)


async def test_a_deleted_or_recreated_job_is_not_fenced(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A fence names the log's epoch: another job under the same id (deleted and created
    again) is never failed by a fence meant for the old one, nor is a job that is gone."""
    client = await make_client(make_config(watchdog__enabled="false"))
    writer = client.app[STORE].writer
    await create_job(client, job_id="again", heartbeat_timeout=100)
    key = JobKey("default", "again")
    other_log, gone = await writer.fence(
        [Fence(key, "1-0", 1, "other log"), Fence(JobKey("default", "nope"), None, 1, "gone")]
    )
    assert other_log.failed is None
    assert other_log.state is not None
    assert other_log.state.status == "queued"
    assert gone == FenceOutcome(None, None)
    got = await (await client.get("/v1/jobs/again")).json()
    assert got["status"] == "queued"


async def test_a_deleted_job_is_no_longer_watched(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """Deleting a watched job takes it out of the schedule (and ``jobfeed_watched_jobs``)
    at once, not when its deadline comes."""
    client = await make_client(make_config(auth__mode="none"))
    watchdog = client.app[STORE].watchdog
    assert watchdog is not None
    await create_job(client, job_id="watched-then-deleted", heartbeat_timeout=3600)
    await create_job(client, job_id="watched-and-kept", heartbeat_timeout=3600)
    assert watchdog.watched == 2
    response = await client.delete("/v1/jobs/watched-then-deleted")
    assert response.status == 204, await response.text()
    assert watchdog.watched == 1
    assert watchdog.next_deadline(JobKey("default", "watched-then-deleted")) is None
    assert watchdog.next_deadline(JobKey("default", "watched-and-kept")) is not None


async def test_many_due_at_once_are_failed_in_bounded_transactions(
    make_client: ClientFactory, make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs falling silent together are failed batch_jobs per writer operation (one
    transaction each), all of them, and each only once."""
    client = await fast_client(make_client, make_config, watchdog__batch_jobs=7)
    writer: Writer = client.app[STORE].writer
    sizes: list[int] = []
    real_fence = writer.fence

    async def observed_fence(fences: list[Fence]) -> list[FenceOutcome]:
        sizes.append(len(fences))
        return await real_fence(fences)

    monkeypatch.setattr(writer, "fence", observed_fence)
    jobs = [f"many-{n}" for n in range(30)]
    await asyncio.gather(*(create_job(client, job_id=j, heartbeat_timeout=0.3) for j in jobs))
    for job_id in jobs:
        async with client.ws_connect(f"/v1/jobs/{job_id}/stream?after=1") as ws:
            assert_worker_lost(await next_event(ws), seq=2)
    assert sum(sizes) == len(jobs)
    assert max(sizes) <= 7
    for job_id in jobs:
        log = await (await client.get(f"/v1/jobs/{job_id}/events")).json()
        assert [event["type"] for event in log["events"]] == ["created", "failed"]


# -- restart ----------------------------------------------------------------------------------


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


@pytest.mark.process
async def test_restart_with_a_due_job(jobfeed_process: Launcher) -> None:
    """A job whose timeout passed while the server was down is loaded at start and failed
    after one timeout from the start (its worker gets that long to come back), with one log
    line saying which job, whose, and how long it was silent."""
    first = await jobfeed_process.start(watchdog__enabled="false")
    async with aiohttp.ClientSession(first.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "down", "heartbeat_timeout": 1}) as r:
            assert r.status == 201, await r.text()
        async with session.post("/v1/jobs", json={"job_id": "done", "heartbeat_timeout": 1}) as r:
            assert r.status == 201
        async with session.post("/v1/jobs/done/events", json={"type": "completed"}) as r:
            assert r.status == 201
    first.kill()
    await first.wait_async(WAIT)
    restarted_at = datetime.now(UTC)
    second = await jobfeed_process.start(watchdog__interval_seconds=0.1)
    loaded = second.log.find("watchdog_loaded")
    assert loaded is not None, second.describe()
    assert loaded["watched"] == 1, second.describe()
    line = await asyncio.to_thread(second.log.wait_for, "worker_lost", WAIT)
    assert line is not None, second.describe()
    assert line["job_id"] == "down"
    assert line["tenant"] == "default"
    assert line["heartbeat_timeout"] == 1
    assert line["silent_seconds"] >= 1
    async with aiohttp.ClientSession(second.url) as session:
        events = await read_log(session, "down")
        assert [event["type"] for event in events] == ["created", "failed"]
        assert_worker_lost(events[-1], seq=2)
        failed_at = datetime.fromisoformat(events[-1]["ts"])
        assert (failed_at - restarted_at).total_seconds() >= 1  # the grace from the start
        assert (await get_snapshot(session, "done"))["status"] == "completed"


# -- the schedule, without HTTP ---------------------------------------------------------------


class FakeWriter:
    """Records the fences a sweep submits and answers each with ``answer`` (the schedule's
    arithmetic, without the writer: "moved on, now in this state")."""

    def __init__(self) -> None:
        self.fences: list[Fence] = []
        self.answer: JobState | None = None

    async def fence(self, fences: list[Fence]) -> list[FenceOutcome]:
        self.fences.extend(fences)
        return [FenceOutcome(None, self.answer) for _ in fences]


def _state(job_id: str, seq: int, timeout: float | None, finished: bool = False) -> JobState:
    created = {"job_id": job_id, "seq": 1, "id": 1, "type": "created", "ts": "2026-11-28T00:00:00Z"}
    if timeout is not None:
        created["heartbeat_timeout"] = timeout
    state = apply_event(None, created)
    for n in range(2, seq + 1):
        event = {"job_id": job_id, "seq": n, "id": n, "ts": "2026-11-28T00:00:01Z"}
        event["type"] = "completed" if finished and n == seq else "log"
        state = apply_event(state, event)
    return state


async def test_an_event_pushes_the_deadline_back_without_touching_the_heap(
    make_config: ConfigFactory,
) -> None:
    """An event moves a job's deadline to its time plus the timeout (a dict update; the heap
    entry is moved only when it comes due); unwatched jobs are ignored; a finished job is
    dropped; a job that is due is handed to the writer with the seq it was last seen at."""
    now = [100.0]
    fake = FakeWriter()
    watchdog = Watchdog(fake, make_config().watchdog, clock=lambda: now[0])  # type: ignore[arg-type]
    a, b, c = JobKey("t", "a"), JobKey("t", "b"), JobKey("t", "c")
    watchdog.note_commit({a: _state("a", 1, 5.0), b: _state("b", 1, None)}, 100.0)
    assert watchdog.watched == 1
    watchdog.note_commit({a: _state("a", 2, 5.0)}, 103.0)
    assert len(watchdog._heap) == 1
    assert watchdog.next_deadline(a) == 108.0
    now[0] = 106.0
    assert await watchdog.sweep() == 0
    assert fake.fences == []  # due by its first entry, not by its last event
    watchdog.note_commit({c: _state("c", 2, 1.0, finished=True)}, 106.0)
    assert watchdog.watched == 1
    now[0] = 108.5
    fake.answer = _state("a", 2, 5.0)  # the writer says: still at seq 2 (a race, lost)
    await watchdog.sweep()
    assert [(f.key, f.last_seq) for f in fake.fences] == [(a, 2)]


async def test_a_fence_that_found_the_job_moved_resyncs_the_schedule(
    make_config: ConfigFactory,
) -> None:
    """When the writer answers a fence with a state the schedule never saw (a commit whose
    outcome was unknown, and that landed), the job is watched on from that state with a
    full timeout from now; a job the writer does not have (deleted) is dropped; a storage
    fault leaves it due at the next sweep."""
    now = [0.0]
    fake = FakeWriter()
    watchdog = Watchdog(fake, make_config().watchdog, clock=lambda: now[0])  # type: ignore[arg-type]
    a = JobKey("t", "a")
    watchdog.note_commit({a: _state("a", 1, 2.0)}, 0.0)
    now[0] = 3.0
    fake.answer = _state("a", 4, 2.0)
    await watchdog.sweep()
    assert watchdog.next_deadline(a) == 5.0
    now[0] = 5.5
    await watchdog.sweep()
    assert [f.last_seq for f in fake.fences] == [1, 4]

    async def storage_fault(fences: list[Fence]) -> list[FenceOutcome]:
        raise StorageUnavailable("disk full")

    real_fence = fake.fence
    fake.fence = storage_fault  # type: ignore[method-assign]
    now[0] = 8.0
    await watchdog.sweep()
    assert watchdog.watched == 1
    fake.fence = real_fence  # type: ignore[method-assign]
    fake.answer = None
    now[0] = 8.1
    await watchdog.sweep()
    assert [f.last_seq for f in fake.fences] == [1, 4, 4]
    assert watchdog.watched == 0


# -- migration 0006 ---------------------------------------------------------------------------

V4 = [m for m in bundled_migrations() if m.version <= 4]


def make_v4_database(db: Path) -> dict[str, dict[str, Any]]:
    """Schema version 4 with jobs (queued, running, finished) and their logs, as the version-4
    writer stored them; the snapshots, as stored."""
    assert apply_migrations(db, V4) == [m.name for m in V4]
    snapshots: dict[str, dict[str, Any]] = {}
    event_id = 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for job_no, (job_id, types) in enumerate(
            {"q": ["created"], "r": ["created", "log"], "f": ["created", "failed"]}.items(), 1
        ):
            state: JobState | None = None
            for seq, event_type in enumerate(types, 1):
                event_id += 1
                event: dict[str, Any] = {
                    "job_id": job_id,
                    "seq": seq,
                    "id": event_id,
                    "type": event_type,
                    "ts": f"2026-11-27T10:00:0{seq}.000001Z",
                }
                if event_type == "log":
                    event.update(message="m", level="info")
                if event_type == "failed":
                    event["error"] = {"message": "boom"}
                state = apply_event(state, event)
                conn.execute(
                    "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
                    " VALUES (?, 'default', ?, ?, ?, ?, NULL, ?)",
                    (event_id, job_id, seq, event_type, event["ts"], orjson.dumps(event).decode()),
                )
            assert state is not None
            snapshot = state.to_dict()
            del snapshot["heartbeat_timeout"]  # version 4 had no such field
            snapshots[job_id] = snapshot
            conn.execute(
                "INSERT INTO jobs (job_no, tenant, job_id, kind, status, last_seq, created_at,"
                " updated_at, finished_at, snapshot) VALUES (?, 'default', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_no,
                    job_id,
                    state.kind,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.finished_at,
                    orjson.dumps(snapshot).decode(),
                ),
            )
    return snapshots


def test_0006_on_a_version_4_database_with_rows(tmp_path: Path) -> None:
    """0006 adds the column (NULL for every old job: none is watched) and the field to every
    stored snapshot (null), changes nothing else, and the start-up load reads the partial
    index, not the table."""
    db = tmp_path / "v4.db"
    before = make_v4_database(db)
    events_before = _rows(db, "SELECT * FROM events ORDER BY id")
    applied = apply_migrations(db)
    assert "0006_watchdog.sql" in applied
    assert _rows(db, "SELECT * FROM events ORDER BY id") == events_before
    after = {
        job_id: orjson.loads(snapshot)
        for job_id, snapshot in _rows(db, "SELECT job_id, snapshot FROM jobs")
    }
    assert after == {job_id: {**snap, "heartbeat_timeout": None} for job_id, snap in before.items()}
    assert _rows(db, "SELECT DISTINCT heartbeat_timeout FROM jobs") == [(None,)]
    assert _rows(db, "PRAGMA integrity_check") == [("ok",)]
    plan = " ".join(str(row[-1]) for row in _rows(db, f"EXPLAIN QUERY PLAN {LOAD_WATCHED_SQL}"))
    assert "jobs_watched" in plan, plan


async def test_the_server_serves_a_migrated_version_4_database(
    make_client: ClientFactory, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """The app opening a version-4 file: old jobs read with heartbeat_timeout null and are
    not watched; new jobs are."""
    db = tmp_path / "v4.db"
    make_v4_database(db)
    client = await make_client(make_config(storage__path=db))
    assert (await (await client.get("/v1/jobs/r")).json())["heartbeat_timeout"] is None
    watchdog = client.app[STORE].watchdog
    assert watchdog is not None
    assert watchdog.watched == 0
    await append(client, "r", {"type": "log", "message": "after the upgrade"})
    await create_job(client, job_id="new", heartbeat_timeout=30)
    assert watchdog.watched == 1


def _rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()


def test_config_bounds(make_config: ConfigFactory) -> None:
    """A kind's timeout outside 0.1 s .. 30 days, a non-positive interval, and a batch larger
    than storage.max_batch_events stop start-up with one line naming the key."""
    for overrides, where in (
        ({"watchdog__kinds": '{"video": 0}'}, "watchdog.kinds"),
        ({"watchdog__kinds": '{"video": 1e9}'}, "watchdog.kinds"),
        ({"watchdog__interval_seconds": "0"}, "watchdog.interval_seconds"),
        ({"watchdog__batch_jobs": "3000"}, "watchdog.batch_jobs"),
    ):
        with pytest.raises(ConfigError, match=where):
            make_config(**overrides)
    assert make_config(watchdog__batch_jobs="2000").watchdog.batch_jobs == 2000


async def test_finished_jobs_do_not_pile_up_in_the_schedule(make_config: ConfigFactory) -> None:
    """Jobs that finish long before their timeout leave no entries behind for long: the
    heap is rebuilt from the live jobs once stale entries outnumber them."""
    fake = FakeWriter()
    watchdog = Watchdog(fake, make_config().watchdog, clock=lambda: 0.0)  # type: ignore[arg-type]
    for n in range(5000):
        key = JobKey("t", f"short-{n}")
        watchdog.note_commit({key: _state(key.job_id, 1, 3600.0)}, 0.0)
        watchdog.note_commit({key: _state(key.job_id, 2, 3600.0, finished=True)}, 0.0)
    still = JobKey("t", "long")
    watchdog.note_commit({still: _state("long", 1, 3600.0)}, 0.0)
    assert watchdog.watched == 1
    assert watchdog.heap_entries == 5001
    await watchdog.sweep()
    assert watchdog.heap_entries == 1
    assert watchdog.next_deadline(still) == 3600.0
