"""The feed (feed.md) through the real app on a real socket: the cursor, filters, heartbeats
with the scanned position, list-then-follow, snapshots, refusals."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.keys import HUB
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.feedclient import (
    WAIT,
    feed_url,
    ground_truth,
    read_feed_sse,
    read_feed_ws,
    selected,
)

KINDS = {"a-1": "build", "a-2": "deploy", "b-1": "build", "b-2": None}


@pytest.fixture
async def client(make_client: ClientFactory, make_config: ConfigFactory) -> TestClient[Any, Any]:
    """Heartbeats every 0.2 s: a reader waiting for the position to reach the log's end past
    the last matching event gets there by a heartbeat."""
    return await make_client(make_config(stream__heartbeat_seconds=0.2))


def base(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("")).rstrip("/")


async def make_jobs(client: TestClient[Any, Any]) -> None:
    for job_id, kind in KINDS.items():
        await create_job(client, job_id=job_id, **({"kind": kind} if kind else {}))


async def activity(client: TestClient[Any, Any], rounds: int) -> None:
    """Events of every type on every job, interleaved; a batch now and then."""
    for n in range(rounds):
        for job_id in KINDS:
            if n % 3 == 0:
                await append(
                    client,
                    job_id,
                    {"type": "progress", "current": n, "total": 100},
                    {"type": "notification", "message": f"n{n}"},
                )
            elif n % 3 == 1:
                await append(client, job_id, {"type": "log", "message": f"line {n}"})
            else:
                await append(client, job_id, {"type": "stage_done", "data": {"n": n}})


async def last_id(client: TestClient[Any, Any]) -> int:
    body = await (await client.get("/v1/jobs?limit=1")).json()
    cursor: int = body["cursor"]
    return cursor


async def test_replay_from_zero_is_the_merged_log(client: TestClient[Any, Any]) -> None:
    """after=0: every event of every job, in id order, each once, as stored."""
    await make_jobs(client)
    await activity(client, 6)
    end = await last_id(client)
    truth = await ground_truth(client.session, base(client), KINDS)
    ws = await read_feed_ws(client.session, feed_url(base(client), 0), until_id=end)
    sse = await read_feed_sse(client.session, feed_url(base(client), 0), until_id=end)
    assert ws.hello is not None
    epoch = ws.hello["epoch"]
    assert ws.hello == {"type": "hello", "after": 0, "last_id": end, "epoch": epoch}
    assert epoch.startswith("g0-")  # a database never restored: generation 0
    assert ws.events == truth
    assert sse.events == truth
    assert sse.retry is not None


async def test_without_after_the_feed_starts_from_now(client: TestClient[Any, Any]) -> None:
    """after absent: only events committed after the subscription began."""
    await make_jobs(client)
    await activity(client, 2)
    before = await last_id(client)
    async with client.session.ws_connect(feed_url(base(client))) as ws:
        async with asyncio.timeout(WAIT):
            hello = json.loads((await ws.receive()).data)
        assert hello == {
            "type": "hello",
            "after": before,
            "last_id": before,
            "epoch": hello["epoch"],
        }
        await append(client, "b-1", {"type": "log", "message": "now"})
        async with asyncio.timeout(WAIT):
            event = json.loads((await ws.receive()).data)
    assert event["id"] == before + 1
    assert event["message"] == "now"


FILTERS: list[dict[str, Any]] = [
    {"job": ["a-1"]},
    {"job": ["a-1", "b-2"]},
    {"prefix": "a-"},
    {"kind": ["build"]},
    {"kind": ["build", "deploy"], "type": ["log"]},
    {"type": ["notification", "stage_done"]},
    {"prefix": "b", "type": ["created", "progress"]},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: json.dumps(f))
async def test_filters_are_identical_in_replay_and_live(
    client: TestClient[Any, Any], filters: dict[str, Any]
) -> None:
    """A filtered subscriber following live sees exactly what a replay of the same range
    with the same filter returns, and both equal the filter applied to the merged log."""
    await make_jobs(client)
    await activity(client, 2)
    start = await last_id(client)
    url = feed_url(base(client), start, **filters)
    async with client.session.ws_connect(url) as ws:
        async with asyncio.timeout(WAIT):
            assert json.loads((await ws.receive()).data)["type"] == "hello"
        await activity(client, 5)
        end = await last_id(client)
        truth = await ground_truth(client.session, base(client), KINDS)
        expected = selected([e for e in truth if start < e["id"] <= end], KINDS, **filters)
        live: list[dict[str, Any]] = []
        while len(live) < len(expected):
            async with asyncio.timeout(WAIT):
                payload = json.loads((await ws.receive()).data)
            if payload["type"] != "heartbeat":
                live.append(payload)
    replay_ws = await read_feed_ws(client.session, url, until_id=end)
    replay_sse = await read_feed_sse(client.session, url, until_id=end)
    assert expected, "the filter should select something"
    assert live == expected
    assert replay_ws.events == expected
    assert replay_sse.events == expected


async def test_replay_through_sqlite_windows_matches_the_cache(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """With no feed cache and a scan window of 7 ids, a filtered replay reads SQLite in
    many small windows and still returns exactly the filter over the merged log."""
    client = await make_client(
        make_config(
            stream__feed_cache_events=0,
            stream__feed_scan_ids=7,
            stream__page_events=3,
            stream__heartbeat_seconds=0.2,
        )
    )
    await make_jobs(client)
    await activity(client, 9)
    end = await last_id(client)
    truth = await ground_truth(client.session, base(client), KINDS)
    for filters in FILTERS:
        log = await read_feed_ws(client.session, feed_url(base(client), 0, **filters), until_id=end)
        assert log.events == selected(truth, KINDS, **filters), filters


async def test_heartbeats_carry_the_scanned_position(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A sparse filter that nothing matches still moves: its heartbeat's last_id is the end
    of the log it scanned, over WebSocket and as the SSE record's id."""
    client = await make_client(make_config(stream__heartbeat_seconds=0.2))
    await make_jobs(client)
    await activity(client, 3)
    end = await last_id(client)
    url = feed_url(base(client), 0, job=["no-such-job"])
    ws = await read_feed_ws(client.session, url, until_id=end)
    sse = await read_feed_sse(client.session, url, until_id=end)
    assert ws.events == []
    assert sse.events == []
    assert ws.heartbeats[-1] == end
    assert sse.heartbeats[-1] == end
    # Live: appends that do not match move the position too.
    async with client.session.ws_connect(feed_url(base(client), end, job="no-such-job")) as ws2:
        async with asyncio.timeout(WAIT):
            await ws2.receive()  # hello
        await activity(client, 1)
        moved = await last_id(client)
        beat: dict[str, Any] = {}
        while beat.get("last_id") != moved:
            async with asyncio.timeout(WAIT):
                beat = json.loads((await ws2.receive()).data)
            assert beat["type"] == "heartbeat"


async def test_list_then_follow_with_cursor(client: TestClient[Any, Any]) -> None:
    """GET /v1/jobs carries "cursor"; a feed from it continues exactly from the list."""
    await make_jobs(client)
    await activity(client, 2)
    listed = await (await client.get("/v1/jobs")).json()
    cursor = listed["cursor"]
    assert max(job["last_seq"] for job in listed["jobs"]) > 0
    await activity(client, 2)
    end = await last_id(client)
    truth = await ground_truth(client.session, base(client), KINDS)
    log = await read_feed_ws(client.session, feed_url(base(client), cursor), until_id=end)
    assert log.events == [e for e in truth if e["id"] > cursor]
    # The list's snapshots are exactly the log up to the cursor.
    for job in listed["jobs"]:
        seqs = [e["seq"] for e in truth if e["job_id"] == job["job_id"] and e["id"] <= cursor]
        assert job["last_seq"] == max(seqs)


async def test_snapshots_are_consistent_with_hello(client: TestClient[Any, Any]) -> None:
    """snapshots=1: after hello, one snapshot per unfinished matching job, each the log up
    to hello.last_id; then the events after it."""
    await make_jobs(client)
    await activity(client, 2)
    await append(client, "a-2", {"type": "completed"})
    url = feed_url(base(client), snapshots=1, prefix="a")
    async with client.session.ws_connect(url) as ws:
        async with asyncio.timeout(WAIT):
            hello = json.loads((await ws.receive()).data)
            snapshot = json.loads((await ws.receive()).data)
        await append(client, "a-1", {"type": "log", "message": "after the snapshot"})
        async with asyncio.timeout(WAIT):
            event = json.loads((await ws.receive()).data)
    assert hello["after"] == hello["last_id"]
    assert snapshot["type"] == "snapshot"
    assert snapshot["job"]["job_id"] == "a-1"  # a-2 is finished, b-* do not match
    truth = await ground_truth(client.session, base(client), ["a-1"])
    upto = [e for e in truth if e["id"] <= hello["last_id"]]
    assert snapshot["job"]["last_seq"] == upto[-1]["seq"]
    assert event["id"] > hello["last_id"]
    assert event["message"] == "after the snapshot"


@pytest.mark.parametrize(
    "query",
    [
        "after=-1",
        "after=x",
        "after=999",
        "job=-bad",
        "type=Bad",
        "prefix=a&prefix=b",
        "snapshots=2",
    ],
)
async def test_bad_parameters_are_refused(client: TestClient[Any, Any], query: str) -> None:
    """Bad after (not an integer >= 0, past last_id) or filter: 400 over SSE, 4400 over WS."""
    await make_jobs(client)
    url = f"{base(client)}/v1/feed?{query}"
    sse = await read_feed_sse(client.session, url)
    assert sse.status == 400
    assert sse.errors[0]["error"]["code"] == "invalid_parameter"
    ws = await read_feed_ws(client.session, url)
    assert ws.close_code == 4400
    assert ws.errors[0]["code"] == "invalid_parameter"


async def test_feed_subscribers_count_toward_max_subscribers(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Past stream.max_subscribers: WS closes 1013; an EventSource request gets 200 with
    retry and an `event: error` record, then the end (so a browser retries)."""
    client = await make_client(make_config(stream__max_subscribers=1))
    await make_jobs(client)
    async with client.session.ws_connect(feed_url(base(client))) as first:
        async with asyncio.timeout(WAIT):
            await first.receive()
        ws = await read_feed_ws(client.session, feed_url(base(client)))
        assert ws.close_code == 1013
        async with client.session.get(
            feed_url(base(client)), headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            body = await response.text()
        job = await client.get("/v1/jobs/a-1/stream", headers={"Accept": "text/event-stream"})
        assert job.status == 200
        job_body = await job.text()
    for text in (body, job_body):
        lines = text.splitlines()
        assert lines[0].startswith("retry: ")
        assert "event: error" in lines
        data = next(line for line in lines if line.startswith("data: "))
        assert json.loads(data[6:])["code"] == "overloaded"


async def test_a_feed_needs_websocket_or_event_stream(client: TestClient[Any, Any]) -> None:
    """Neither an upgrade nor Accept: text/event-stream: 400 bad_request."""
    response = await client.get("/v1/feed")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_request"


async def test_shared_filters_share_one_group(client: TestClient[Any, Any]) -> None:
    """Subscribers with the same filter (in any parameter order) share one filter group."""
    await make_jobs(client)
    feed = client.app[HUB].feed
    urls = [
        feed_url(base(client), kind=["build", "deploy"], type="log"),
        feed_url(base(client), type="log", kind=["deploy", "build"]),
        feed_url(base(client), prefix="a"),
    ]
    sockets = []
    try:
        for url in urls:
            ws = await client.session.ws_connect(url)
            async with asyncio.timeout(WAIT):
                await ws.receive()
            sockets.append(ws)
        assert feed.subscribers == 3
        assert feed.groups == 2
    finally:
        for ws in sockets:
            await ws.close()
