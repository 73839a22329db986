"""The catch-up guarantee under fire (protocol v1, "Streaming: the catch-up guarantee").

One producer appends as fast as it can while subscribers, over WebSocket and SSE, join at
random points of the log with random offsets, drop mid-stream and resume from the last seq
they saw. Every subscriber must end up with exactly ``after + 1 .. last_seq`` — in order, no
hole, no duplicate across its reconnects — each event byte-identical to the stored log.

"Random" is seeded, and every "moment" is a point in the producer's progress (a seq it has
been acknowledged), never a sleep: a run is a reproducible interleaving pattern, not a timing.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory, ConfigFactory, create_job
from tests.streams import StreamLog, read_sse, read_ws, stored_log

# Every test that builds a config runs with authentication off and on (tests/conftest.py).
AUTH_MODES = ("off", "on")
JOB = "under-fire"
EVENTS = 3_000  # appended after `created`; then one terminal event
SUBSCRIBERS = 30
LAST_SEQ = EVENTS + 2  # created + EVENTS + the terminal event
DEADLINE = 45.0  # the whole scenario; a healthy run takes a few seconds


class Progress:
    """The last seq the producer has been acknowledged, and a way to wait for a seq."""

    def __init__(self) -> None:
        self.last_seq = 0
        self._changed = asyncio.Condition()

    async def advance(self, last_seq: int) -> None:
        async with self._changed:
            self.last_seq = last_seq
            self._changed.notify_all()

    async def reached(self, seq: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.last_seq >= seq)


def random_event(rng: random.Random, n: int) -> dict[str, Any]:
    kind = rng.choice(["progress", "progress", "log", "custom"])
    if kind == "progress":
        total = rng.randint(1, 10_000)
        return {
            "type": "progress",
            "current": rng.randint(0, total),
            "total": total,
            "phase": rng.choice(["fetch", "match", "score"]),
        }
    if kind == "log":
        return {"type": "log", "message": f"line {n} ✓", "level": rng.choice(["info", "debug"])}
    return {"type": "stage.done", "data": {"n": n, "name": "étape", "score": rng.random()}}


async def produce(client: TestClient[Any, Any], rng: random.Random, progress: Progress) -> None:
    """Append EVENTS events in random batches (1..20, some as single-event bodies), each
    as soon as the previous one is acknowledged; then the terminal event."""
    last_seq = 1
    await progress.advance(last_seq)
    while last_seq < EVENTS + 1:
        count = min(EVENTS + 1 - last_seq, rng.randint(1, 20))
        events = [random_event(rng, last_seq + i) for i in range(count)]
        single = count == 1 and rng.random() < 0.5
        body = events[0] if single else {"events": events}
        response = await client.post(f"/v1/jobs/{JOB}/events", json=body)
        assert response.status == 201, await response.text()
        answer = await response.json()
        assert answer["last_seq"] == last_seq + count
        last_seq = answer["last_seq"]
        await progress.advance(last_seq)
    response = await client.post(
        f"/v1/jobs/{JOB}/events", json={"type": "completed", "result": {"events": EVENTS}}
    )
    assert response.status == 201, await response.text()
    assert (await response.json())["last_seq"] == LAST_SEQ
    await progress.advance(LAST_SEQ)


@dataclass
class Subscriber:
    """One subscriber's plan (drawn from its own seeded Random) and what it saw."""

    name: str
    rng: random.Random
    first_after: int = -1
    after: int = -1
    events: list[str] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    live: int = 0  # connections that went on past their hello's last_seq
    done: bool = False

    def __repr__(self) -> str:
        return (
            f"{self.name}(first_after={self.first_after}, at={self.after}, "
            f"connections={self.connections}, done={self.done})"
        )


async def connect(
    client: TestClient[Any, Any], sub: Subscriber, drop_after: int | None
) -> StreamLog:
    """One connection from ``sub.after`` over a randomly chosen transport."""
    path = f"/v1/jobs/{JOB}/stream"
    transport = sub.rng.choice(["ws", "sse-after", "sse-last-event-id"])
    sub.connections.append(f"{transport}@{sub.after}")
    if transport == "ws":
        return await read_ws(client, f"{path}?after={sub.after}", drop_after=drop_after)
    if transport == "sse-after":
        return await read_sse(client, f"{path}?after={sub.after}", drop_after=drop_after)
    headers = {"Last-Event-ID": str(sub.after)}
    return await read_sse(client, path, headers=headers, drop_after=drop_after)


async def subscribe(client: TestClient[Any, Any], sub: Subscriber, progress: Progress) -> None:
    """Join when the producer passes a random seq, from a random offset; drop after a
    random number of events and resume from the last seq seen, a random number of times
    (each time once the producer has moved on by a random amount)."""
    rng = sub.rng
    await progress.reached(rng.randint(1, LAST_SEQ))
    sub.first_after = sub.after = rng.randint(0, progress.last_seq)
    drops = [rng.randint(1, 400) for _ in range(rng.choice([0, 1, 2, 3, 5]))]
    for drop_after in [*drops, None]:
        log = await connect(client, sub, drop_after)
        assert log.status in (101, 200), (sub, log.errors)
        assert log.errors == [], (sub, log.errors)
        assert log.hello is not None, sub
        assert log.hello["after"] == sub.after, (sub, log.hello)
        assert sub.after <= log.hello["last_seq"] <= LAST_SEQ, (sub, log.hello)
        sub.events.extend(log.events)
        sub.seqs.extend(log.seqs)
        if log.seqs and log.seqs[-1] > log.hello["last_seq"]:
            sub.live += 1
        if log.seqs:
            sub.after = log.seqs[-1]
        if log.ended:
            assert log.close_code == (1000 if log.transport == "ws" else None), sub
            sub.done = True
            return
        await progress.reached(min(sub.after + rng.randint(0, 300), LAST_SEQ))
    raise AssertionError(f"{sub}: the last connection did not end")


@pytest.mark.parametrize(
    ("seed", "overrides"),
    [
        pytest.param(1, {}, id="seed1"),
        pytest.param(2, {}, id="seed2"),
        pytest.param(3, {}, id="seed3"),
        pytest.param(4, {"stream__cache_events_per_job": 0}, id="seed4-no-cache"),
        pytest.param(5, {"stream__cache_events_per_job": 16}, id="seed5-tiny-cache"),
    ],
)
async def test_every_subscriber_sees_every_event_exactly_once(
    make_config: ConfigFactory,
    make_client: ClientFactory,
    seed: int,
    overrides: dict[str, Any],
) -> None:
    """Late joiners and reconnecting subscribers over WS and SSE, racing one fast producer,
    each see after+1 .. last_seq exactly once, in order, byte-identical to the stored log."""
    client = await make_client(make_config(**overrides))
    await create_job(client, job_id=JOB)
    progress = Progress()
    subscribers = [Subscriber(f"sub{n}", random.Random(f"{seed}-{n}")) for n in range(SUBSCRIBERS)]
    try:
        async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as group:
            group.create_task(produce(client, random.Random(seed), progress))
            for sub in subscribers:
                group.create_task(subscribe(client, sub, progress))
    except TimeoutError:
        stuck = [sub for sub in subscribers if not sub.done]
        raise AssertionError(
            f"not finished within {DEADLINE}s (producer at {progress.last_seq}): {stuck}"
        ) from None

    stored = await stored_log(client, JOB)
    assert [json.loads(line)["seq"] for line in stored] == list(range(1, LAST_SEQ + 1))
    for sub in subscribers:
        expected = list(range(sub.first_after + 1, LAST_SEQ + 1))
        assert sub.seqs == expected, f"{sub}: holes or duplicates"
        assert sub.events == stored[sub.first_after :], f"{sub}: not as stored"
    # The schedule was not degenerate: subscribers resumed, and streams went live mid-way.
    assert sum(len(sub.connections) > 1 for sub in subscribers) >= SUBSCRIBERS // 3
    assert sum(sub.live for sub in subscribers) >= SUBSCRIBERS // 3


async def test_ndjson_export_matches_the_events_pages(client: TestClient[Any, Any]) -> None:
    """The stored log the catch-up test compares against (NDJSON) is the same log the
    paged GET /events returns."""
    await create_job(client, job_id=JOB)
    rng = random.Random(0)
    for n in range(5):
        events = [random_event(rng, n * 10 + i) for i in range(7)]
        response = await client.post(f"/v1/jobs/{JOB}/events", json={"events": events})
        assert response.status == 201
    lines = await stored_log(client, JOB)
    pages: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        response = await client.get(f"/v1/jobs/{JOB}/events?after={after}&limit=8")
        body = await response.json()
        pages.extend(body["events"])
        after = body["next_after"]
    assert pages == [json.loads(line) for line in lines]
