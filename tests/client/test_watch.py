"""Watchers (``client.watch``): every event once, in order, across server crashes, network
cuts and the retryable close codes; typed errors for the final ones.

The crash and cut tests run a real server process behind a proxy the test controls. The
close codes the server does not send today (4401, 4403, 4410) and the resume codes it sends
only under load or on faults (1011, 1013) come from a small scripted WebSocket peer.
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
    AsyncWatch,
    Client,
    Event,
    Forbidden,
    InvalidRequest,
    JobDeleted,
    JobNotFound,
    LogReset,
    RetryPolicy,
    Unauthorized,
)
from tests.client.proxy import Proxy
from tests.procs import Launcher, ServerProcess

pytestmark = pytest.mark.process

FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
WAIT = 60.0
TRANSPORTS = ["websocket", "sse"]


def new_id() -> str:
    return f"watch-{uuid.uuid4().hex[:12]}"


class Collector:
    """Runs a watch in a task, keeping what it yields; ``reached(seq)`` waits for a seq."""

    def __init__(self, watch: AsyncWatch) -> None:
        self.watch = watch
        self.events: list[Event] = []
        self._progress = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.watch:
            async with self._progress:
                self.events.append(event)
                self._progress.notify_all()

    async def reached(self, seq: int) -> None:
        async def condition() -> None:
            async with self._progress:
                await self._progress.wait_for(
                    lambda: bool(self.events) and self.events[-1].seq >= seq
                )

        await asyncio.wait_for(condition(), WAIT)

    async def finished(self) -> list[int]:
        await asyncio.wait_for(self.task, WAIT)
        return [event.seq for event in self.events]


async def append_steps(client: AsyncClient, job_id: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        await client.append(job_id, {"type": "log", "message": f"step {i}", "key": f"s{i}"})


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_event_once_then_the_end(shared_server: ServerProcess, transport: Any) -> None:
    """A watch from 0 gets the replay and the live events, in order, and ends after the
    terminal event, with the snapshot folded from them."""
    job_id = new_id()
    async with AsyncClient(shared_server.url) as client:
        await client.create_job(job_id, kind="w")
        await append_steps(client, job_id, 0, 3)
        collector = Collector(client.watch(job_id, transport=transport))
        await collector.reached(4)
        await append_steps(client, job_id, 3, 3)
        await client.append(job_id, {"type": "completed", "result": "ok"})
        assert await collector.finished() == list(range(1, 9))
        assert collector.watch.snapshot == await client.get_job(job_id)
        assert collector.watch.state == "done"


def test_sync_watch_is_the_same(shared_server: ServerProcess) -> None:
    """``Client.watch`` iterates the same events, from ``after``."""
    job_id = new_id()
    with Client(shared_server.url) as client:
        client.create_job(job_id)
        client.append(
            job_id, {"type": "log", "message": "x"}, {"type": "failed", "error": {"message": "no"}}
        )
        watch = client.watch(job_id, after=1)
        assert [e.type for e in watch] == ["log", "failed"]
        assert watch.snapshot is None  # started mid-log without a snapshot


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_final_refusals_are_typed(shared_server: ServerProcess, transport: Any) -> None:
    """An unknown job, an ``after`` past the end, another log's epoch: each raises its
    exception on both transports, without retrying."""
    job_id = new_id()
    async with AsyncClient(shared_server.url, retry=FAST_RETRY) as client:
        with pytest.raises(JobNotFound):
            [e async for e in client.watch("no-such-job", transport=transport)]
        await client.create_job(job_id)
        with pytest.raises(InvalidRequest):
            [e async for e in client.watch(job_id, after=5, transport=transport)]
        with pytest.raises(LogReset):
            [e async for e in client.watch(job_id, epoch="1-0", transport=transport)]


async def test_resumes_across_a_server_crash(
    launcher: Launcher, proxy_to: Callable[[ServerProcess], Proxy]
) -> None:
    """SIGKILL the server mid-stream, start it again on the same file (another port, behind
    the same address): the watcher resumes from its last seq with its epoch and sees every
    event once."""
    server = await launcher.start()
    proxy = proxy_to(server)
    job_id = new_id()
    async with AsyncClient(proxy.url, retry=FAST_RETRY) as watching:
        async with AsyncClient(server.url) as direct:
            await direct.create_job(job_id)
            await append_steps(direct, job_id, 0, 3)
            collector = Collector(watching.watch(job_id))
            await collector.reached(4)
            epoch = collector.watch.epoch
            server.kill(signal.SIGKILL)
            await server.wait_async(WAIT)
        restarted = await launcher.start()
        proxy.set(upstream_port=restarted.port)
        async with AsyncClient(restarted.url) as direct:
            await append_steps(direct, job_id, 3, 3)
            await direct.append(job_id, {"type": "completed"})
            assert await collector.finished() == list(range(1, 9))
    assert collector.watch.resumes >= 1
    assert collector.watch.epoch == epoch


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resumes_across_a_network_cut(
    shared_server: ServerProcess, proxy_to: Callable[[ServerProcess], Proxy], transport: Any
) -> None:
    """Cut the connection and refuse new ones while events keep coming: once the network is
    back, the watcher has every event once, in order."""
    proxy = proxy_to(shared_server)
    job_id = new_id()
    async with (
        AsyncClient(shared_server.url) as direct,
        AsyncClient(proxy.url, retry=FAST_RETRY) as watching,
    ):
        await direct.create_job(job_id)
        collector = Collector(watching.watch(job_id, transport=transport))
        await append_steps(direct, job_id, 0, 2)
        await collector.reached(3)
        with proxy.down():
            await append_steps(direct, job_id, 2, 5)
            await asyncio.to_thread(proxy.wait_for, lambda p: p.refused >= 2)
        await append_steps(direct, job_id, 7, 2)
        await direct.append(job_id, {"type": "cancelled", "reason": "enough"})
        assert await collector.finished() == list(range(1, 12))
        assert collector.watch.resumes >= 2


class ScriptedPeer:
    """A WebSocket peer speaking the stream protocol from a script: each connection takes the
    next step, sends hello and the events it names, then closes with the step's code."""

    def __init__(self, steps: list[tuple[list[int], int]], last_seq: int = 5) -> None:
        self.steps = steps
        self.last_seq = last_seq
        self.queries: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.queries.append(dict(request.query))
        seqs, code = self.steps.pop(0)
        after = int(request.query.get("after", "0"))
        hello = {
            "type": "hello",
            "job_id": "j",
            "status": "running",
            "after": after,
            "last_seq": self.last_seq,
            "epoch": "1-abc",
        }
        await ws.send_json(hello)
        for seq in seqs:
            event_type = "completed" if seq == self.last_seq else "log"
            await ws.send_json(
                {
                    "job_id": "j",
                    "seq": seq,
                    "id": seq,
                    "type": event_type,
                    "ts": "2026-11-28T00:00:00.000000Z",
                    "message": str(seq),
                }
            )
        if code >= 4000:
            await ws.send_json({"type": "error", "code": "x", "message": f"closing {code}"})
        await ws.close(code=code)
        return ws


async def watch_peer(aiohttp_server: Any, peer: ScriptedPeer) -> tuple[list[int], AsyncWatch]:
    app = web.Application()
    app.router.add_get("/v1/jobs/j/stream", peer.handle)
    server = await aiohttp_server(app)
    async with AsyncClient(str(server.make_url("")), retry=FAST_RETRY) as client:
        watch = client.watch("j")
        seqs: list[int] = []
        try:
            async for event in watch:
                seqs.append(event.seq)
        finally:
            watch_seqs = seqs
    return watch_seqs, watch


@pytest.mark.parametrize("code", [1001, 1011, 1013])
async def test_retryable_close_codes_resume_from_the_last_seq(
    aiohttp_server: Any, code: int
) -> None:
    """1001, 1011 and 1013 are "resume later": the next subscription asks for ``after`` =
    the last seq received and the epoch from hello."""
    peer = ScriptedPeer([([1, 2], code), ([], code), ([3, 4, 5], 1000)])
    seqs, watch = await watch_peer(aiohttp_server, peer)
    assert seqs == [1, 2, 3, 4, 5]
    assert peer.queries == [
        {"after": "0"},
        {"after": "2", "epoch": "1-abc"},
        {"after": "2", "epoch": "1-abc"},
    ]
    assert watch.resumes == 2


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (4004, JobNotFound),
        (4400, InvalidRequest),
        (4401, Unauthorized),
        (4403, Forbidden),
        (4409, LogReset),
        (4410, JobDeleted),
    ],
)
async def test_final_close_codes_raise_typed_errors(
    aiohttp_server: Any, code: int, error: type[Exception]
) -> None:
    """The final band stops the watcher with its exception, after the events it got."""
    peer = ScriptedPeer([([1], code)])
    with pytest.raises(error):
        await watch_peer(aiohttp_server, peer)
    assert len(peer.queries) == 1


async def test_a_hole_in_seq_is_not_papered_over(aiohttp_server: Any) -> None:
    """A stream that skips a seq is a protocol violation, raised rather than resumed."""
    from jobfeed_client import ProtocolViolation

    peer = ScriptedPeer([([1, 3], 1000)])
    with pytest.raises(ProtocolViolation):
        await watch_peer(aiohttp_server, peer)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resumes_when_the_connection_goes_silent(
    shared_server: ServerProcess, proxy_to: Callable[[ServerProcess], Proxy], transport: Any
) -> None:
    """A connection that stays open but carries nothing (no close, no reset) is noticed
    within ``stream_idle_timeout`` (WebSocket pings; SSE read timeout) and resumed."""
    proxy = proxy_to(shared_server)
    job_id = new_id()
    async with (
        AsyncClient(shared_server.url) as direct,
        AsyncClient(proxy.url, retry=FAST_RETRY, stream_idle_timeout=1.0) as watching,
    ):
        await direct.create_job(job_id)
        collector = Collector(watching.watch(job_id, transport=transport))
        await collector.reached(1)
        assert proxy.stall() == 1
        await append_steps(direct, job_id, 0, 3)
        # Not the terminal event yet: the server would then close the stream, and the
        # proxy would pass that on; these must arrive over a new connection.
        await collector.reached(4)
        await direct.append(job_id, {"type": "completed"})
        assert await collector.finished() == list(range(1, 6))
        assert collector.watch.resumes >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_delete_job_ends_its_watch_with_job_deleted(
    shared_server: ServerProcess, transport: Any
) -> None:
    """``delete_job`` removes the job (then ``JobNotFound``), and a watch following it live
    raises ``JobDeleted`` (4410 / SSE ``event: error``) instead of resuming."""
    job_id = new_id()
    async with AsyncClient(shared_server.url) as client:
        await client.create_job(job_id)
        await append_steps(client, job_id, 0, 2)
        collector = Collector(client.watch(job_id, transport=transport))
        await collector.reached(3)
        await client.delete_job(job_id)
        with pytest.raises(JobDeleted):
            await collector.finished()
        with pytest.raises(JobNotFound):
            await client.get_job(job_id)
        with pytest.raises(JobNotFound):
            await client.delete_job(job_id)
