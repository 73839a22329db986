"""The feed's guarantee under fire, on a real server process (feed.md, "Cursor"): producers
append to many jobs while WebSocket and SSE feed subscribers, each with its own filter, join
at random ids, drop at random points and resume from their last position; each one's
events, joined up, equal the filter applied to the ground truth merged from the per-job logs.
Also on a real process: a stuck feed subscriber is closed 1013, and SIGTERM closes feeds.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.feedclient import (
    FeedLog,
    feed_url,
    ground_truth,
    read_feed_sse,
    read_feed_ws,
    selected,
)
from tests.procs import Launcher, launching
from tests.streams import StuckSubscriber
from tests.test_overload import EVENT_BYTES, admitted_connection, wait_for_records

pytestmark = pytest.mark.process

JOBS = 16
EVENTS = 1_200  # appended in total, in requests of 1-5 events
SUBSCRIBERS = 12
KINDS = ("build", "deploy", "scan", None)
TYPES = ("progress", "log", "notification", "stage_done")
STUCK_EVENTS = 80  # of EVENT_BYTES each: far more than a stuck socket can buffer


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


def random_filter(
    rng: random.Random, job_ids: list[str], kinds: dict[str, str | None]
) -> dict[str, Any]:
    choice = rng.randrange(6)
    if choice == 0:
        return {}
    if choice == 1:
        return {"job": rng.sample(job_ids, rng.randint(1, 3))}
    if choice == 2:
        return {"prefix": rng.choice(["a-", "b-", "a-1"])}
    if choice == 3:
        return {"kind": rng.sample(["build", "deploy", "scan"], rng.randint(1, 2))}
    if choice == 4:
        return {"type": rng.sample([*TYPES, "created", "completed"], rng.randint(1, 3))}
    return {"prefix": "b-", "type": ["log", "progress"], "kind": ["build", "scan"]}


async def produce(session: aiohttp.ClientSession, rng: random.Random, job_ids: list[str]) -> None:
    """Appends in random requests to random jobs; a few jobs complete on the way."""
    open_jobs = list(job_ids)
    sent = 0
    while sent < EVENTS and open_jobs:
        job_id = rng.choice(open_jobs)
        if sent > EVENTS // 2 and rng.random() < 0.01 and len(open_jobs) > JOBS // 2:
            body: dict[str, Any] = {"type": "completed"}
            open_jobs.remove(job_id)
            count = 1
        else:
            count = rng.randint(1, 5)
            events = [{"type": rng.choice(TYPES), "message": f"m{sent + i}"} for i in range(count)]
            body = events[0] if count == 1 else {"events": events}
        async with session.post(f"/v1/jobs/{job_id}/events", json=body) as response:
            assert response.status == 201, await response.text()
        sent += count


async def current_id(session: aiohttp.ClientSession) -> int:
    async with session.get("/v1/jobs?limit=1") as response:
        cursor: int = (await response.json())["cursor"]
    return cursor


async def subscribe(
    session: aiohttp.ClientSession,
    base: str,
    rng: random.Random,
    transport: str,
    filters: dict[str, Any],
    start: int,
    done: asyncio.Event,
    final: list[int],
) -> list[dict[str, Any]]:
    """Join at ``start``, drop after a random number of events, resume from the last
    position (event id or heartbeat), until the producers are done and the end is reached."""
    received: list[dict[str, Any]] = []
    position = start
    while True:
        drop_after = rng.randint(1, 80)

        def stop(log: FeedLog, drop_after: int = drop_after) -> bool:
            if done.is_set() and log.position >= final[0]:
                return True
            return len(log.events) >= drop_after

        if done.is_set() and position >= final[0]:
            return received
        if transport == "ws":
            log = await read_feed_ws(session, feed_url(base, position, **filters), stop=stop)
        else:
            # As a browser's EventSource resumes: Last-Event-ID, no after in the URL.
            log = await read_feed_sse(
                session, feed_url(base, None, **filters), last_event_id=position, stop=stop
            )
        assert log.hello is not None, log
        assert log.hello["after"] == position
        received.extend(log.events)
        position = log.position


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_feed_subscribers_are_exact_under_fire(jobfeed_process: Launcher, seed: int) -> None:
    """Every subscriber gets exactly the matching events after the id it joined at, in id
    order, once each, however its drops and resumes fall between replay and live."""
    rng = random.Random(seed)
    server = await jobfeed_process.start(stream__heartbeat_seconds=0.2)
    job_ids = [f"{'ab'[i % 2]}-{i}" for i in range(JOBS)]
    kinds = {job_id: KINDS[i % len(KINDS)] for i, job_id in enumerate(job_ids)}
    async with aiohttp.ClientSession(server.url) as session:
        for job_id in job_ids:
            body = {"job_id": job_id, **({"kind": kinds[job_id]} if kinds[job_id] else {})}
            async with session.post("/v1/jobs", json=body) as response:
                assert response.status == 201
        done = asyncio.Event()
        final = [0]
        producer = asyncio.create_task(produce(session, rng, job_ids))
        plans = []
        subscribers = []
        for index in range(SUBSCRIBERS):
            await asyncio.sleep(0)  # let the producer run between joins
            start = rng.randint(0, await current_id(session))
            filters = random_filter(rng, job_ids, kinds)
            transport = "ws" if index % 2 == 0 else "sse"
            plans.append((transport, filters, start))
            sub_rng = random.Random(rng.random())
            subscribers.append(
                asyncio.create_task(
                    subscribe(session, server.url, sub_rng, transport, filters, start, done, final)
                )
            )
        await producer
        final[0] = await current_id(session)
        done.set()
        async with asyncio.timeout(120):
            results = await asyncio.gather(*subscribers)
        truth = await ground_truth(session, server.url, job_ids)
    assert [event["id"] for event in truth] == sorted({event["id"] for event in truth})
    for (transport, filters, start), received in zip(plans, results, strict=True):
        expected = selected([e for e in truth if e["id"] > start], kinds, **filters)
        got_ids = [event["id"] for event in received]
        assert got_ids == [event["id"] for event in expected], (transport, filters, start)
        assert received == expected, (transport, filters, start)


async def test_a_stuck_feed_subscriber_is_closed_1013(jobfeed_process: Launcher) -> None:
    """A feed subscriber that stops reading is closed 1013 after stream.send_timeout, like a
    job stream's, and logged with its filters; a reader of the same feed gets everything."""
    server = await jobfeed_process.start(stream__send_timeout=0.5, log__access="false")
    path = "/v1/feed?after=0&prefix=stuck"
    padding = "x" * EVENT_BYTES
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "stuck-1"}) as response:
            assert response.status == 201
        stuck = [await StuckSubscriber.connect(server.host, server.port, path) for _ in range(3)]
        reader_ws = await session.ws_connect(path, max_msg_size=1 << 20)
        seqs: list[int] = []

        async def read_all() -> None:
            async for message in reader_ws:
                frame = json.loads(message.data)
                if "seq" in frame:
                    seqs.append(frame["seq"])
                if len(seqs) == STUCK_EVENTS + 1:
                    return

        reading = asyncio.create_task(read_all())
        for n in range(STUCK_EVENTS):
            event = {"type": "progress", "current": n, "data": {"pad": padding}}
            async with session.post("/v1/jobs/stuck-1/events", json=event) as response:
                assert response.status == 201, await response.text()
        cut_off = await asyncio.to_thread(
            wait_for_records, server, 3, 60, event="stream_closed", outcome="send_timeout"
        )
        assert cut_off == 3, server.describe()
        async with asyncio.timeout(60):
            await reading
        await reader_ws.close()
        for subscriber in stuck:
            await asyncio.to_thread(subscriber.drain)
    timed_out = [
        r
        for r in server.log.records
        if r.get("event") == "stream_closed" and r.get("outcome") == "send_timeout"
    ]
    assert {r["close_code"] for r in timed_out} == {1013}
    assert all(r["feed"] == {"prefix": "stuck"} for r in timed_out)
    assert seqs == list(range(1, STUCK_EVENTS + 2))


async def test_sigterm_closes_feeds_1001_and_ends_sse_feeds(jobfeed_process: Launcher) -> None:
    """On SIGTERM a WebSocket feed closes with 1001 and an SSE feed's response ends (the
    browser reconnects elsewhere); the process exits 0."""
    server = await jobfeed_process.start()
    async with aiohttp.ClientSession(server.url) as session:
        ws = await session.ws_connect("/v1/feed")
        async with asyncio.timeout(20):
            assert json.loads((await ws.receive()).data)["type"] == "hello"
        async with session.get("/v1/feed", headers={"Accept": "text/event-stream"}) as response:
            assert response.status == 200
            async with asyncio.timeout(20):
                while b"event: hello" not in await response.content.readline():
                    pass
                server.kill(signal.SIGTERM)
                message = await ws.receive()
                rest = await response.content.read()  # returns at the end of the response
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1001
        assert b'"seq"' not in rest  # the rest of hello, then the end
        assert await server.wait_async(30) == 0


async def test_the_connection_cap_answers_event_source_with_a_retryable_error(
    jobfeed_process: Launcher,
) -> None:
    """Past server.max_connections an EventSource-style request gets 200 text/event-stream
    with retry: and an `event: error` (overloaded), then the connection closes: a browser
    retries instead of giving up on a 503."""
    server = await jobfeed_process.start(server__max_connections=1)
    held = await admitted_connection(server)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    request = f"GET /v1/feed HTTP/1.1\r\nHost: {server.host}\r\nAccept: text/event-stream\r\n\r\n"
    writer.write(request.encode())
    async with asyncio.timeout(20):
        answer = await reader.read()  # until the server closes the connection
    writer.close()
    await held.close()
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    assert "Content-Type: text/event-stream" in head
    lines = body.splitlines()
    assert lines[0].startswith("retry: ")
    assert "event: error" in lines
    data = next(line for line in lines if line.startswith("data: "))
    assert json.loads(data[6:])["code"] == "overloaded"
