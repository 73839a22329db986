"""``DELETE /v1/jobs/{id}`` through the real app on a real SQLite file and real sockets
(operations.md, "Deleting a job"): one transaction for the row, the log and the keys, 204 then
404; open streams end with ``job_deleted`` and 4410 (SSE: ``event: error``, end); appends
racing the deletion either land before it or get 404; the id can be created again, with a new
epoch, and the old epoch is ``log_reset``; nothing deleted is replayed from memory."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.errors import JobDeleted
from server.follow import Cursor, JobReader, follow
from server.keys import HUB, STORE
from server.tenancy import DEFAULT_TENANT, JobKey
from tests.conftest import (
    AUTH_TENANT,
    ClientFactory,
    ConfigFactory,
    append,
    bearer,
    create_job,
    token,
)
from tests.streams import SseEvent, read_sse, read_ws, sse_items, ws_until_closed

Client = TestClient[Any, Any]
AUTH_MODES = ("off", "on")
WAIT = 10.0
SSE = {"Accept": "text/event-stream"}


def db_rows(db: Path, job_id: str) -> tuple[int, int]:
    """(jobs rows, events rows) of ``job_id`` in the file, read by another connection."""
    conn = sqlite3.connect(db)
    try:
        jobs = conn.execute("SELECT count(*) FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        events = conn.execute("SELECT count(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()
        return int(jobs[0]), int(events[0])
    finally:
        conn.close()


async def test_delete_removes_job_log_and_keys(client: Client, make_config: ConfigFactory) -> None:
    """204; then the snapshot, the events and the stream answer 404 job_not_found, a second
    DELETE too, and the file holds no row of the job (its keys were in its events)."""
    db = make_config().storage.path
    await create_job(client, job_id="gone")
    await append(client, "gone", {"type": "progress", "current": 1, "key": "k1"})
    await create_job(client, job_id="kept")
    response = await client.delete("/v1/jobs/gone")
    assert response.status == 204, await response.text()
    for path in ("/v1/jobs/gone", "/v1/jobs/gone/events"):
        missing = await client.get(path)
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "job_not_found"
    again = await client.delete("/v1/jobs/gone")
    assert again.status == 404
    assert (await again.json())["error"]["code"] == "job_not_found"
    appended = await client.post(
        "/v1/jobs/gone/events", json={"type": "progress", "current": 2, "key": "k1"}
    )
    assert appended.status == 404
    assert db_rows(db, "gone") == (0, 0)
    assert db_rows(db, "kept") == (1, 1)
    assert (await client.get("/v1/jobs/kept")).status == 200


async def test_delete_needs_admin_scope(
    make_client: ClientFactory, make_config: ConfigFactory, auth_mode: str
) -> None:
    """With authentication on, jobs:write is not enough (403 forbidden); another tenant's
    job is not found; jobs:admin deletes."""
    if auth_mode == "off":
        return  # everyone holds every scope
    config = make_config()
    admin = await make_client(config)
    await create_job(admin, job_id="guarded")
    writer = token(scope="jobs:read jobs:write")
    refused = await admin.delete("/v1/jobs/guarded", headers=bearer(writer))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "forbidden"
    other = await admin.delete("/v1/jobs/guarded", headers=bearer(token(tenant="other")))
    assert other.status == 404
    assert (await admin.delete("/v1/jobs/guarded")).status == 204


async def _ws_hello(client: Client, path: str) -> Any:
    ws = await client.ws_connect(path)
    message = await asyncio.wait_for(ws.receive(), WAIT)
    assert json.loads(message.data)["type"] == "hello"
    return ws


async def test_open_streams_end_with_4410(client: Client) -> None:
    """Subscribers parked live (WebSocket and SSE) get job_deleted: an error frame and close
    4410; SSE an `event: error` record and the end of the response."""
    await create_job(client, job_id="watched")
    await append(client, "watched", {"type": "progress", "current": 1})
    ws = await _ws_hello(client, "/v1/jobs/watched/stream")
    async with client.get("/v1/jobs/watched/stream", headers=SSE) as response:
        items = sse_items(response)
        first = await asyncio.wait_for(anext(items), WAIT)
        assert isinstance(first, SseEvent)
        assert first.event == "hello"
        assert (await client.delete("/v1/jobs/watched")).status == 204
        rest = []
        async with asyncio.timeout(WAIT):
            async for item in items:  # ends when the server ends the response
                rest.append(item)
    frames, code = await ws_until_closed(ws, WAIT)
    assert code == 4410
    assert [f.get("code") for f in frames if f["type"] == "error"] == ["job_deleted"]
    events = [item for item in rest if isinstance(item, SseEvent)]
    assert [e.event for e in events if e.event] == ["error"]
    assert json.loads(events[-1].data)["code"] == "job_deleted"


async def test_stream_mid_replay_ends_with_4410(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A subscriber still replaying (one event per read, nothing cached) ends with 4410 too,
    having received a prefix of the log and nothing out of order."""
    config = make_config(stream__page_events=1, stream__cache_events_per_job=0)
    client = await make_client(config)
    await create_job(client, job_id="long")
    await append(client, "long", *({"type": "progress", "current": n} for n in range(300)))
    ws = await _ws_hello(client, "/v1/jobs/long/stream")
    first = json.loads((await asyncio.wait_for(ws.receive(), WAIT)).data)
    assert first["seq"] == 1
    assert (await client.delete("/v1/jobs/long")).status == 204
    frames, code = await ws_until_closed(ws, WAIT)
    assert code == 4410
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(2, 2 + len(seqs)))
    assert frames[-1]["type"] == "error"
    assert frames[-1]["code"] == "job_deleted"


async def test_appends_racing_a_delete(client: Client, make_config: ConfigFactory) -> None:
    """Producers append while the job is deleted: every append is 201 (then deleted with
    the job) or 404, no 201 follows a 404 of the same producer, and nothing of the job is
    left in the file: never a half state."""
    db = make_config().storage.path
    await create_job(client, job_id="race")
    outcomes: list[list[int]] = [[], [], []]
    deleted = asyncio.Event()

    async def produce(mine: list[int]) -> None:
        n = 0
        while True:
            n += 1
            response = await client.post(
                "/v1/jobs/race/events",
                json={"type": "progress", "current": n, "key": f"{id(mine)}-{n}"},
            )
            mine.append(response.status)
            if response.status == 404:
                return
            if n == 20:
                deleted.set()

    producers = [asyncio.create_task(produce(mine)) for mine in outcomes]
    await asyncio.wait_for(deleted.wait(), WAIT)
    assert (await client.delete("/v1/jobs/race")).status == 204
    await asyncio.wait_for(asyncio.gather(*producers), WAIT)
    for mine in outcomes:
        assert set(mine[:-1]) == {201}, mine
        assert mine[-1] == 404
    assert db_rows(db, "race") == (0, 0)


async def test_recreated_job_has_new_epoch(client: Client) -> None:
    """The id can be created again: seq starts at 1, ids go on past the old log, the epoch is
    new, and resuming the old log with its epoch is log_reset (4409, SSE 409)."""
    old = await create_job(client, job_id="again")
    await append(client, "again", {"type": "progress", "current": 1})
    assert (await client.delete("/v1/jobs/again")).status == 204
    new = await create_job(client, job_id="again")
    assert new["last_seq"] == 1
    assert new["epoch"] != old["epoch"]
    old_created_id = int(old["epoch"].split("-")[0])
    assert int(new["epoch"].split("-")[0]) > old_created_id + 1
    stale = f"/v1/jobs/again/stream?after=1&epoch={old['epoch']}"
    ws = await read_ws(client, stale)
    assert ws.close_code == 4409
    assert [e["code"] for e in ws.errors] == ["log_reset"]
    sse = await read_sse(client, stale)
    assert sse.status == 409
    fresh = await read_ws(client, "/v1/jobs/again/stream", drop_after=1)
    assert fresh.hello is not None
    assert fresh.hello["epoch"] == new["epoch"]


async def test_event_ids_not_reused_after_restart(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """Deleting the newest events and restarting does not hand their ids out again (a feed
    subscriber resuming past them would miss new events)."""
    config = make_config()
    first = await make_client(config)
    await create_job(first, job_id="a")
    await create_job(first, job_id="newest")
    appended = await append(first, "newest", {"type": "progress", "current": 1})
    newest_id = appended["events"][0]["id"]
    assert (await first.delete("/v1/jobs/newest")).status == 204
    await first.close()
    second = await make_client(config)
    result = await append(second, "a", {"type": "progress", "current": 1})
    assert result["events"][0]["id"] == newest_id + 1


async def test_feed_replay_forgets_deleted_job(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A feed replayed from 0 after the deletion holds none of the deleted job's events,
    whether it replays from the feed's cache or from SQLite."""
    for cache_events in (8192, 0):
        config = make_config(stream__feed_cache_events=cache_events)
        client = await make_client(config)
        suffix = str(cache_events)
        await create_job(client, job_id=f"keep{suffix}")
        await create_job(client, job_id=f"drop{suffix}")
        await append(client, f"drop{suffix}", {"type": "progress", "current": 1})
        await append(client, f"keep{suffix}", {"type": "completed"})
        assert (await client.delete(f"/v1/jobs/drop{suffix}")).status == 204
        ids: list[str] = []
        async with client.ws_connect("/v1/feed?after=0") as ws, asyncio.timeout(WAIT):
            while True:
                frame = json.loads((await ws.receive()).data)
                if "seq" in frame:
                    ids.append(frame["job_id"])
                    if frame["job_id"] == f"keep{suffix}" and frame["type"] == "completed":
                        break
        assert f"drop{suffix}" not in ids
        assert f"keep{suffix}" in ids
        await client.close()


async def test_subscriber_attaching_after_the_deletion_is_told(
    client: Client, auth_mode: str
) -> None:
    """A subscriber that read the job's head before the deletion and attaches to the hub
    after it (the await between hello and attach) ends with JobDeleted at once, instead of
    parking on a log that is gone (and, re-created, is another log)."""
    hub, store = client.app[HUB], client.app[STORE]
    key = JobKey(AUTH_TENANT if auth_mode == "on" else DEFAULT_TENANT, "racy")
    await create_job(client, job_id="racy")
    mark = hub.deletions
    head = await store.job_head(key)
    assert head is not None
    assert (await client.delete("/v1/jobs/racy")).status == 204
    await create_job(client, job_id="racy")  # and created again: another log
    reader = JobReader(
        store, hub, Cursor(key, 0), head, page_events=10, page_bytes=1 << 20, deletion_mark=mark
    )
    batches = follow(reader, idle_seconds=WAIT)
    with pytest.raises(JobDeleted):
        await asyncio.wait_for(anext(batches), WAIT)
