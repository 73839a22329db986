"""The feed (``client.feed``): every matching event of many jobs once, in commit order,
across a server crash and a network cut, on both transports; filters; ``snapshots=True``
then live with nothing missed; the heartbeat's scanned position; typed refusals.

Every test runs a real server process (``tests/procs.py``); the crash and cut tests put the
proxy of ``tests/client/proxy.py`` between the feed and the server.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from jobfeed_client import (
    AsyncClient,
    AsyncFeed,
    Client,
    Event,
    FeedItem,
    InvalidRequest,
    ProtocolViolation,
    RetryPolicy,
    Snapshot,
)
from tests.client.proxy import Proxy
from tests.procs import Launcher, ServerProcess

pytestmark = pytest.mark.process

FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
WAIT = 60.0
TRANSPORTS = ["websocket", "sse"]


def new_prefix() -> str:
    return f"feed-{uuid.uuid4().hex[:10]}-"


class Collector:
    """Runs a feed in a task, keeping what it yields; ``holding(n)`` waits for n items."""

    def __init__(self, feed: AsyncFeed) -> None:
        self.feed = feed
        self.items: list[FeedItem] = []
        self._progress = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for item in self.feed:
            async with self._progress:
                self.items.append(item)
                self._progress.notify_all()

    async def until(self, predicate: Callable[[list[FeedItem]], bool]) -> None:
        async def condition() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: predicate(self.items))

        await asyncio.wait_for(condition(), WAIT)

    async def holding(self, count: int) -> list[FeedItem]:
        await self.until(lambda items: len(items) >= count)
        return self.items[:count]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    def event_ids(self) -> list[int]:
        return [item.id for item in self.items if isinstance(item, Event)]


async def cursor(client: AsyncClient) -> int:
    """The last event id committed (``GET /v1/jobs``'s ``cursor``)."""
    _, answer = await client.request("GET", "/v1/jobs", params={"limit": 1})
    return int(answer["cursor"])


async def append_logs(client: AsyncClient, job_id: str, count: int, tag: str) -> list[int]:
    """Append ``count`` log events one request each; their event ids."""
    ids = []
    for i in range(count):
        event = {"type": "log", "message": f"{tag} {i}", "key": f"{tag}-{i}"}
        [appended] = await client.append(job_id, event)
        ids.append(appended.id)
    return ids


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_matching_event_once_across_a_server_crash(
    launcher: Launcher, proxy_to: Callable[[ServerProcess], Proxy], transport: Any
) -> None:
    """SIGKILL the server mid-feed and start it again on the same file behind the same
    address: the feed resumes from its last id and has every matching event once, in order,
    and none of the other job's."""
    server = await launcher.start()
    proxy = proxy_to(server)
    prefix = new_prefix()
    mine, other = f"{prefix}a", f"other-{uuid.uuid4().hex[:8]}"
    async with AsyncClient(proxy.url, retry=FAST_RETRY) as watching:
        async with AsyncClient(server.url) as direct:
            start = await cursor(direct)
            await direct.create_job(mine)
            await direct.create_job(other)
            expected = await append_logs(direct, mine, 3, "before")
            await append_logs(direct, other, 2, "noise")
            collector = Collector(watching.feed(after=start, prefix=prefix, transport=transport))
            await collector.holding(4)
            server.kill(signal.SIGKILL)
            await server.wait_async(WAIT)
        restarted = await launcher.start()
        proxy.set(upstream_port=restarted.port)
        async with AsyncClient(restarted.url) as direct:
            await append_logs(direct, other, 2, "noise-after")
            expected += await append_logs(direct, mine, 3, "after")
        await collector.holding(7)
        await collector.stop()
    events = [item for item in collector.items if isinstance(item, Event)]
    assert {event.job_id for event in events} == {mine}
    assert [event.seq for event in events] == list(range(1, 8))
    assert collector.event_ids()[1:] == expected
    assert collector.feed.resumes >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_matching_event_once_across_a_network_cut(
    shared_server: ServerProcess, proxy_to: Callable[[ServerProcess], Proxy], transport: Any
) -> None:
    """Cut the connection and refuse new ones while events keep coming: once the network is
    back, the feed has every event once, in order."""
    proxy = proxy_to(shared_server)
    prefix = new_prefix()
    async with (
        AsyncClient(shared_server.url) as direct,
        AsyncClient(proxy.url, retry=FAST_RETRY) as watching,
    ):
        start = await cursor(direct)
        collector = Collector(watching.feed(after=start, prefix=prefix, transport=transport))
        await direct.create_job(f"{prefix}a")
        await direct.create_job(f"{prefix}b")
        await collector.holding(2)
        with proxy.down():
            await append_logs(direct, f"{prefix}a", 3, "down-a")
            await append_logs(direct, f"{prefix}b", 3, "down-b")
            await asyncio.to_thread(proxy.wait_for, lambda p: p.refused >= 2)
        await append_logs(direct, f"{prefix}a", 2, "up")
        await collector.holding(10)
        await collector.stop()
        ids = collector.event_ids()
        assert ids == sorted(set(ids))
        assert len(ids) == 10
        for job_id, seqs in (("a", [1, 2, 3, 4, 5, 6]), ("b", [1, 2, 3, 4])):
            got = [
                item.seq
                for item in collector.items
                if isinstance(item, Event) and item.job_id == f"{prefix}{job_id}"
            ]
            assert got == seqs
        assert collector.feed.resumes >= 2


async def test_filters_combine(shared_server: ServerProcess) -> None:
    """``job`` and ``type`` repeat (OR), ``kind`` and ``prefix`` narrow (AND): the feed from
    the whole log holds exactly the events that match, in id order."""
    prefix = new_prefix()
    async with AsyncClient(shared_server.url) as client:
        start = await cursor(client)
        for name, kind in (("a", "build"), ("b", "build"), ("c", "deploy")):
            await client.create_job(f"{prefix}{name}", kind=kind)
            await client.append(
                f"{prefix}{name}",
                {"type": "log", "message": "x"},
                {"type": "stage.done", "data": {"n": 1}},
                {"type": "completed"},
            )
        feed = client.feed(
            after=start,
            prefix=prefix,
            kind="build",
            job=[f"{prefix}a", f"{prefix}c"],
            type=["stage.done", "completed"],
        )
        collector = Collector(feed)
        got = await collector.holding(2)
        await collector.stop()
    assert [(e.job_id, e.type) for e in got if isinstance(e, Event)] == [
        (f"{prefix}a", "stage.done"),
        (f"{prefix}a", "completed"),
    ]
    assert len(collector.items) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_snapshots_then_live_with_nothing_missed(
    shared_server: ServerProcess, transport: Any
) -> None:
    """``snapshots=True`` while a producer keeps appending: a snapshot of every matching
    unfinished job comes first, then, for each job, exactly the events after its snapshot's
    ``last_seq``; a finished job has no snapshot."""
    prefix = new_prefix()
    names = [f"{prefix}{i}" for i in range(3)]
    async with AsyncClient(shared_server.url) as client:
        await client.create_job(f"{prefix}done")
        await client.append(f"{prefix}done", {"type": "completed"})
        for name in names:
            await client.create_job(name)
            await client.append(name, {"type": "progress", "progress": 1.0})

        async def produce() -> None:
            for step in range(10):
                for name in names:
                    await client.append(name, {"type": "progress", "progress": 2.0 + step})

        producing = asyncio.create_task(produce())
        collector = Collector(client.feed(prefix=prefix, snapshots=True, transport=transport))
        await producing
        for name in names:
            await client.append(name, {"type": "completed"})
        # 3 snapshots, then events up to each job's completed (seq 13): wait for those.
        async with collector._progress:
            await asyncio.wait_for(
                collector._progress.wait_for(
                    lambda: (
                        sum(isinstance(i, Event) and i.type == "completed" for i in collector.items)
                        == 3
                    )
                ),
                WAIT,
            )
        await collector.stop()
    snapshots = [i for i in collector.items[:3] if isinstance(i, Snapshot)]
    assert sorted(s.job_id for s in snapshots) == names
    assert not any(isinstance(i, Snapshot) for i in collector.items[3:])
    for snapshot in snapshots:
        seqs = [
            i.seq for i in collector.items if isinstance(i, Event) and i.job_id == snapshot.job_id
        ]
        assert seqs == list(range(snapshot.last_seq + 1, 14))
    ids = collector.event_ids()
    assert ids == sorted(ids)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_heartbeats_move_a_sparse_feed_past_what_was_scanned(
    launcher: Launcher, transport: Any
) -> None:
    """A filter that matches nothing still moves ``after`` to the heartbeat's ``last_id``,
    so that a resume does not scan those ids again."""
    server = await launcher.start(stream__heartbeat_seconds=0.2)
    async with AsyncClient(server.url) as client:
        start = await cursor(client)
        feed = client.feed(after=start, type="nothing.matches", transport=transport)
        collector = Collector(feed)
        await client.create_job("sparse")
        last = (await append_logs(client, "sparse", 3, "x"))[-1]

        async def scanned() -> None:
            # A heartbeat moves the position without yielding anything: nothing to wait on
            # but the attribute itself.
            while feed.after is None or feed.after < last:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(scanned(), WAIT)
        await collector.stop()
    assert feed.after == last
    assert collector.items == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refusals_are_typed(shared_server: ServerProcess, transport: Any) -> None:
    """``after`` past the end of the log and a prefix that cannot begin a job id are 4400
    (400 for SSE): ``InvalidRequest``, raised without retrying."""
    async with AsyncClient(shared_server.url, retry=FAST_RETRY) as client:
        end = await cursor(client)
        with pytest.raises(InvalidRequest):
            [i async for i in client.feed(after=end + 1000, transport=transport)]
        with pytest.raises(InvalidRequest):
            [i async for i in client.feed(prefix="bad prefix!", transport=transport)]


def test_sync_feed_is_the_same(shared_server: ServerProcess) -> None:
    """``Client.feed`` iterates the same items, from ``after``, with the same filters."""
    job_id = f"{new_prefix()}sync"
    with Client(shared_server.url) as client:
        client.create_job(job_id)
        appended = client.append(job_id, {"type": "log", "message": "x"}, {"type": "completed"})
        feed = client.feed(after=0, job=job_id)
        got: list[str] = []
        for item in feed:
            assert isinstance(item, Event)
            got.append(item.type)
            if item.terminal:
                break
        assert got == ["created", "log", "completed"]
        assert feed.after == appended[-1].id


class ScriptedFeed:
    """A WebSocket peer speaking the feed from a script: each connection takes the next step,
    sends hello and events with the ids it names, then closes with the step's code."""

    def __init__(self, steps: list[tuple[list[int], int]]) -> None:
        self.steps = steps
        self.queries: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.queries.append(dict(request.query))
        ids, code = self.steps.pop(0)
        after = int(request.query.get("after", "3"))
        await ws.send_json({"type": "hello", "after": after, "last_id": 20})
        for seq, event_id in enumerate(ids, start=1):
            await ws.send_json(
                {
                    "job_id": "j",
                    "seq": seq,
                    "id": event_id,
                    "type": "completed",
                    "ts": "2026-11-28T00:00:00.000000Z",
                }
            )
        await ws.close(code=code)
        return ws


async def run_scripted(aiohttp_server: Any, peer: ScriptedFeed) -> list[int]:
    app = web.Application()
    app.router.add_get("/v1/feed", peer.handle)
    server = await aiohttp_server(app)
    got: list[int] = []
    async with AsyncClient(str(server.make_url("")), retry=FAST_RETRY) as client:
        async for item in client.feed(kind="k"):
            assert isinstance(item, Event)
            got.append(item.id)
    return got


async def test_a_feed_resumes_after_a_normal_close_and_terminal_events(aiohttp_server: Any) -> None:
    """A feed never ends by itself: a terminal event does not end it, and neither does close
    1000; it resumes from the last id (the first hello's ``after`` when started from now)
    until a final close code."""
    peer = ScriptedFeed([([5], 1000), ([], 1001), ([9], 4400)])
    with pytest.raises(InvalidRequest):
        await run_scripted(aiohttp_server, peer)
    assert peer.queries == [{"kind": "k"}, {"kind": "k", "after": "5"}, {"kind": "k", "after": "5"}]


async def test_an_id_that_does_not_increase_is_not_papered_over(aiohttp_server: Any) -> None:
    """A repeated id is a protocol violation, raised rather than resumed."""
    with pytest.raises(ProtocolViolation):
        await run_scripted(aiohttp_server, ScriptedFeed([([5, 5], 1000)]))
