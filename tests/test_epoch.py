"""The log's identity (``epoch``) through the real app on real sockets: sent in hello and in
the snapshot, stable across restarts, and checked when a subscriber resumes with it
(``?epoch=...&after=N``): another log, or a log behind ``after``, is ``log_reset``
(WebSocket close 4409, SSE 409). Also migration 0003, which backfills it into snapshots
stored before epochs existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.migrate import apply_migrations, bundled_migrations
from server.snapshot import JobState, apply_event, log_epoch
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.streams import StreamLog, read_sse, read_ws

Client = TestClient[Any, Any]
WAIT = 10.0
SSE = {"Accept": "text/event-stream"}


def path(job_id: str, *, after: int | None = None, epoch: str | None = None) -> str:
    query = [f"after={after}"] if after is not None else []
    if epoch is not None:
        query.append(f"epoch={epoch}")
    return f"/v1/jobs/{job_id}/stream" + (f"?{'&'.join(query)}" if query else "")


async def snapshot(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def job_with_log(client: Client, job_id: str, events: int, *, finish: bool = False) -> str:
    """A job with ``events`` progress events (and a completed event if ``finish``); its epoch."""
    await create_job(client, job_id=job_id)
    for n in range(events):
        await append(client, job_id, {"type": "progress", "current": n})
    if finish:
        await append(client, job_id, {"type": "completed"})
    epoch: str = (await snapshot(client, job_id))["epoch"]
    return epoch


async def ws_first_frame(client: Client, stream: str) -> dict[str, Any]:
    async with client.ws_connect(stream) as ws, asyncio.timeout(WAIT):
        message = await ws.receive()
    assert message.type == WSMsgType.TEXT, message
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def read_both(client: Client, stream: str) -> tuple[StreamLog, StreamLog]:
    async with asyncio.timeout(WAIT):
        return await read_ws(client, stream), await read_sse(client, stream)


def assert_log_reset(ws: StreamLog, sse: StreamLog) -> None:
    """WebSocket: an error frame log_reset, close 4409, no hello. SSE: 409 log_reset."""
    assert ws.hello is None
    assert [e["code"] for e in ws.errors] == ["log_reset"]
    assert ws.close_code == 4409
    assert ws.events == []
    assert sse.status == 409
    assert sse.hello is None
    assert [e["error"]["code"] for e in sse.errors] == ["log_reset"]
    assert sse.errors[0]["error"]["details"] == []


async def test_epoch_in_snapshot_and_hello(client: Client) -> None:
    """The snapshot carries epoch = "{created id}-{created ts µs, hex}"; both hellos carry
    the same value."""
    await create_job(client, job_id="first")
    epoch = await job_with_log(client, "ep", 2)
    created = json.loads((await read_ws(client, path("ep"), drop_after=1)).events[0])
    assert created["type"] == "created"
    assert created["id"] == 2
    assert epoch == log_epoch(created["id"], created["ts"])
    assert epoch.startswith("2-")
    assert (await ws_first_frame(client, path("ep")))["epoch"] == epoch
    sse = await read_sse(client, path("ep"), drop_after=1)
    assert sse.hello is not None
    assert sse.hello["epoch"] == epoch
    listed = await (await client.get("/v1/jobs")).json()
    assert {job["job_id"]: job["epoch"] for job in listed["jobs"]}["ep"] == epoch


async def test_epoch_is_stable_across_restart(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A restarted app on the same file reports the same epoch, and a subscriber resuming
    with it streams on as before."""
    config = make_config()
    first = await make_client(config)
    epoch = await job_with_log(first, "stable", 3)
    await first.close()
    second = await make_client(config)
    assert (await snapshot(second, "stable"))["epoch"] == epoch
    await append(second, "stable", {"type": "completed"})
    assert (await snapshot(second, "stable"))["epoch"] == epoch
    ws, sse = await read_both(second, path("stable", after=2, epoch=epoch))
    for log in (ws, sse):
        assert log.hello is not None
        assert log.hello["epoch"] == epoch
        assert log.seqs == [3, 4, 5]
        assert log.ended
    assert ws.close_code == 1000


async def test_matching_epoch_streams_normally(client: Client) -> None:
    """With the right epoch and after <= last_seq, both transports replay from after; after
    equal to last_seq of a finished job is hello then close 1000 (WebSocket), 204 (SSE)."""
    epoch = await job_with_log(client, "ok", 3, finish=True)
    ws, sse = await read_both(client, path("ok", after=1, epoch=epoch))
    for log in (ws, sse):
        assert log.hello is not None
        assert log.hello["after"] == 1
        assert log.seqs == [2, 3, 4, 5]
        assert log.errors == []
    ws, sse = await read_both(client, path("ok", after=5, epoch=epoch))
    assert ws.seqs == sse.seqs == []
    assert ws.close_code == 1000
    assert sse.status == 204


async def test_wrong_epoch_is_log_reset(client: Client) -> None:
    """An epoch that is not the job's (re-created job, other database) is refused whatever
    after is, even 0: close 4409 / 409 log_reset."""
    epoch = await job_with_log(client, "wrong", 2)
    created_id, _, micros = epoch.partition("-")
    other = f"{created_id}-{int(micros, 16) + 1:x}"
    for after in (0, 2):
        assert_log_reset(*await read_both(client, path("wrong", after=after, epoch=other)))
    assert_log_reset(*await read_both(client, path("wrong", epoch="garbage")))


async def test_matching_epoch_past_the_end_is_log_reset(client: Client) -> None:
    """The right epoch with after > last_seq (a log restored from an older backup) is
    log_reset, while the same after without epoch stays invalid_parameter (4400 / 400)."""
    epoch = await job_with_log(client, "behind", 2)
    assert_log_reset(*await read_both(client, path("behind", after=4, epoch=epoch)))
    ws, sse = await read_both(client, path("behind", after=4))
    assert [e["code"] for e in ws.errors] == ["invalid_parameter"]
    assert ws.close_code == 4400
    assert sse.status == 400
    assert sse.errors[0]["error"]["code"] == "invalid_parameter"


async def test_empty_epoch_counts_as_absent(client: Client) -> None:
    """``?epoch=`` is as if no epoch were sent."""
    await job_with_log(client, "empty", 1)
    ws, sse = await read_both(client, "/v1/jobs/empty/stream?after=3&epoch=")
    assert ws.close_code == 4400
    assert sse.status == 400


EVENTS_REPRESENTATIONS = ("application/json", "application/x-ndjson")


async def read_events(client: Client, job_id: str, query: str, accept: str) -> Any:
    return await client.get(f"/v1/jobs/{job_id}/events?{query}", headers={"Accept": accept})


async def test_events_page_and_export_check_the_epoch(client: Client) -> None:
    """``?epoch=`` on the events page and the NDJSON export is checked as on the streams:
    another epoch, or the right one with after past last_seq, is 409 log_reset; the right
    one reads on; without epoch, after past last_seq stays 400 invalid_parameter."""
    epoch = await job_with_log(client, "pages", 2)
    created_id, _, micros = epoch.partition("-")
    other = f"{created_id}-{int(micros, 16) + 1:x}"
    for accept in EVENTS_REPRESENTATIONS:
        for query in (f"epoch={other}", f"after=3&epoch={other}", f"after=4&epoch={epoch}"):
            response = await read_events(client, "pages", query, accept)
            assert response.status == 409, (accept, query, await response.text())
            body = await response.json()
            assert body["error"]["code"] == "log_reset"
        response = await read_events(client, "pages", f"after=1&epoch={epoch}", accept)
        assert response.status == 200, await response.text()
        response = await read_events(client, "pages", "after=4", accept)
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_parameter"


async def test_recreated_job_in_a_new_database_has_another_epoch(
    make_client: ClientFactory, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """The same job_id created first in a fresh database file (created id 1, seq 1 both
    times) has a different epoch; a subscriber of the old log resuming against the new one
    is told log_reset even though its after is within the new log."""
    old = await make_client(make_config(storage__path=tmp_path / "old.db"))
    old_epoch = await job_with_log(old, "same", 3)
    await old.close()
    new = await make_client(make_config(storage__path=tmp_path / "new.db"))
    new_epoch = await job_with_log(new, "same", 3, finish=True)
    assert old_epoch.split("-")[0] == new_epoch.split("-")[0] == "1"
    assert new_epoch != old_epoch
    assert_log_reset(*await read_both(new, path("same", after=2, epoch=old_epoch)))
    ws, _ = await read_both(new, path("same", after=2, epoch=new_epoch))
    assert ws.seqs == [3, 4, 5]


# -- migration 0003 ---------------------------------------------------------------------------

OLD_JOBS = [
    # (job_id, created id, created ts, events after created)
    ("old-a", 1, "2026-11-23T10:00:00.000000Z", 2),
    ("old-b", 4, "2026-11-23T23:59:59.999999Z", 0),
    ("old-c", 5, "2024-02-29T12:34:56.000001Z", 1),
]


def make_pre_epoch_database(db: Path) -> None:
    """A database at schema version 2 holding jobs as the writer stored them before epochs:
    snapshots without the field."""
    apply_migrations(db, bundled_migrations()[:2])
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for job_id, created_id, ts, more in OLD_JOBS:
            events = [{"job_id": job_id, "seq": 1, "id": created_id, "type": "created", "ts": ts}]
            for n in range(more):
                events.append(
                    {
                        "job_id": job_id,
                        "seq": 2 + n,
                        "id": created_id + 1 + n,
                        "type": "log",
                        "ts": ts,
                        "message": "m",
                        "level": "info",
                    }
                )
            state: JobState | None = None
            for event in events:
                state = apply_event(state, event)
                conn.execute(
                    "INSERT INTO events (id, job_id, seq, type, ts, key, body)"
                    " VALUES (?, ?, ?, ?, ?, NULL, ?)",
                    (
                        event["id"],
                        job_id,
                        event["seq"],
                        event["type"],
                        ts,
                        orjson.dumps(event).decode(),
                    ),
                )
            assert state is not None
            stored = state.to_dict()
            del stored["epoch"]
            conn.execute(
                "INSERT INTO jobs (job_id, kind, status, last_seq, created_at, updated_at,"
                " finished_at, snapshot) VALUES (?, NULL, ?, ?, ?, ?, NULL, ?)",
                (job_id, state.status, state.last_seq, ts, ts, orjson.dumps(stored).decode()),
            )


def stored_snapshots(db: Path) -> dict[str, dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT job_id, snapshot FROM jobs").fetchall()
    return {job_id: json.loads(raw) for job_id, raw in rows}


def test_migration_backfills_epoch_from_the_created_event(tmp_path: Path) -> None:
    """0003 sets each stored snapshot's epoch to exactly what log_epoch gives for its seq-1
    event (ts with a .999999 fraction included) and changes nothing else."""
    db = tmp_path / "old.db"
    make_pre_epoch_database(db)
    before = stored_snapshots(db)
    assert all("epoch" not in snap for snap in before.values())
    assert JobState.from_json(orjson.dumps(before["old-a"])).epoch is None
    assert apply_migrations(db, bundled_migrations()[:3]) == ["0003_job_epoch.sql"]
    after = stored_snapshots(db)
    for job_id, created_id, ts, _ in OLD_JOBS:
        assert after[job_id].pop("epoch") == log_epoch(created_id, ts), job_id
        assert after[job_id] == before[job_id]
    assert log_epoch(4, "2026-11-23T23:59:59.999999Z").endswith(f"{1795478399 * 10**6 + 999999:x}")


async def test_app_on_a_migrated_database_serves_the_backfilled_epoch(
    make_client: ClientFactory, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """The app opening a pre-epoch file migrates it; snapshot, hello and resume-by-epoch use
    the backfilled epoch, which appends keep, and the snapshot is still the log's fold."""
    db = tmp_path / "upgrade.db"
    make_pre_epoch_database(db)
    client = await make_client(make_config(storage__path=db))
    epoch = log_epoch(1, OLD_JOBS[0][2])
    assert (await snapshot(client, "old-a"))["epoch"] == epoch
    await append(client, "old-a", {"type": "completed"})
    assert (await snapshot(client, "old-a"))["epoch"] == epoch
    ws, sse = await read_both(client, path("old-a", after=2, epoch=epoch))
    for log in (ws, sse):
        assert log.hello is not None
        assert log.hello["epoch"] == epoch
        assert log.seqs == [3, 4]
    state: JobState | None = None
    full = await read_ws(client, path("old-a"))
    for raw in full.events:
        state = apply_event(state, json.loads(raw))
    assert state is not None
    assert state.to_dict() == await snapshot(client, "old-a")
