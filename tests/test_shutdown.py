"""Graceful shutdown (protocol v1, "Durability and shutdown"): on SIGTERM the server stops
accepting, commits what it acknowledged, closes WebSockets with 1001, ends SSE responses, and
exits 0 within ``server.shutdown_timeout``.

Each SIGTERM test runs the same scenario against a real child process: a job is running, a
WebSocket and an SSE subscriber wait live at the end of its log, producers append to it and
to a second job, and SIGTERM arrives right after the N-th acknowledged append (so others are
in flight). The server is then started again on the same file to read back the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Launcher, ServerProcess, launching, read_log
from tests.streams import StuckSubscriber

pytestmark = pytest.mark.process

SHUTDOWN_TIMEOUT = 3.0  # server.shutdown_timeout for these runs
EXIT_MARGIN = 5.0  # process start-up of the interpreter aside, exit must fit in this margin
PRODUCERS = 4
SIGTERM_AFTER = 40  # acknowledged requests before SIGTERM; the others are mid-request
LIVE_JOB = "live"
OTHER_JOB = "busy"
SCENARIO_TIMEOUT = 60.0


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    """Real server children on ``tmp_path``; killed and reaped when the test ends."""
    with launching(tmp_path) as launcher:
        yield launcher


@dataclass
class Shutdown:
    """Everything the SIGTERM scenario observed."""

    server: ServerProcess
    returncode: int | None = None  # None: still running after shutdown_timeout + margin
    ws_close_code: int | None = None
    ws_frames: list[dict[str, Any]] = field(default_factory=list)
    sse_messages: list[dict[str, str]] = field(default_factory=list)
    sse_error: BaseException | None = None
    acks: dict[tuple[str, int], int] = field(default_factory=dict)  # (job, seq) -> id
    acked_requests: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    sigterm_sent: asyncio.Event = field(default_factory=asyncio.Event)
    sigterm_at: float = 0.0  # time.monotonic() when SIGTERM was sent
    logs_after_restart: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    """Server-Sent Events as ``{"event", "id"?, "data"}`` dicts; comments and blocks without
    data (``retry:``) are skipped; an unnamed record's ``event`` is the type in its data (an
    EventSource would dispatch it as "message").

    Iteration ends at a clean end of the body; a body cut off mid-chunk raises
    ``aiohttp.ClientPayloadError``."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if "data" in fields:
                fields.setdefault("event", json.loads(fields["data"])["type"])
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def event_seqs(payloads: list[dict[str, Any]]) -> list[int]:
    return [p["seq"] for p in payloads if "seq" in p]


async def produce(client: int, run: Shutdown) -> None:
    """Append to both jobs until the server refuses or is gone; record what was acked."""
    async with aiohttp.ClientSession(run.server.url) as session:
        for step in itertools.count():
            job_id = (LIVE_JOB, OTHER_JOB)[step % 2]
            events: list[dict[str, Any]] = [
                {"type": "progress", "progress": float(step % 100), "message": f"p{client}-{step}"}
            ]
            if step % 3 == 0:
                events.append({"type": "log", "message": "batched", "key": f"p{client}-{step}"})
            body: dict[str, Any] = events[0] if len(events) == 1 else {"events": events}
            try:
                async with session.post(f"/v1/jobs/{job_id}/events", json=body) as response:
                    if response.status != 201:
                        run.refused.append((response.status, await response.text()))
                        return
                    answer = await response.json()
            except aiohttp.ClientError:
                return
            for appended in answer["events"]:
                run.acks[(job_id, appended["seq"])] = appended["id"]
            run.acked_requests += 1
            if run.acked_requests == SIGTERM_AFTER:
                run.server.kill(signal.SIGTERM)  # the other producers are mid-request
                run.sigterm_at = time.monotonic()
                run.sigterm_sent.set()


async def read_websocket(ws: aiohttp.ClientWebSocketResponse, run: Shutdown) -> None:
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            run.ws_frames.append(message.json())
    run.ws_close_code = ws.close_code


async def read_sse(messages: AsyncIterator[dict[str, str]], run: Shutdown) -> None:
    try:
        async for message in messages:
            run.sse_messages.append(message)
    except aiohttp.ClientPayloadError as exc:
        run.sse_error = exc


async def sigterm_under_load(launcher: Launcher) -> Shutdown:
    """Run the scenario described in the module docstring and return what it saw."""
    server = await launcher.start(server__shutdown_timeout=SHUTDOWN_TIMEOUT)
    run = Shutdown(server)
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(server.url))
        for job_id in (LIVE_JOB, OTHER_JOB):
            async with session.post("/v1/jobs", json={"job_id": job_id}) as response:
                assert response.status == 201, await response.text()
        body = {"type": "progress", "progress": 1.0}
        async with session.post(f"/v1/jobs/{LIVE_JOB}/events", json=body) as response:
            assert response.status == 201, await response.text()

        # Both subscribers catch up to the end of the running job, then wait there live.
        ws = await stack.enter_async_context(session.ws_connect(f"/v1/jobs/{LIVE_JOB}/stream"))
        run.ws_frames = [await ws.receive_json() for _ in range(3)]
        assert [f["type"] for f in run.ws_frames] == ["hello", "created", "progress"]
        sse = await stack.enter_async_context(
            session.get(f"/v1/jobs/{LIVE_JOB}/stream", headers={"Accept": "text/event-stream"})
        )
        assert sse.status == 200, await sse.text()
        messages = sse_messages(sse)
        run.sse_messages = [await anext(messages) for _ in range(3)]
        assert [m["event"] for m in run.sse_messages] == ["hello", "created", "progress"]

        async with asyncio.timeout(SCENARIO_TIMEOUT):
            readers = asyncio.gather(read_websocket(ws, run), read_sse(messages, run))
            producers = asyncio.gather(*(produce(n, run) for n in range(PRODUCERS)))
            sigterm = asyncio.create_task(run.sigterm_sent.wait())
            either: list[asyncio.Future[Any]] = [sigterm, producers]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            sigterm.cancel()
            assert run.sigterm_sent.is_set(), f"producers stopped early: {run.refused[:3]}"
            # The exit deadline runs from the signal, whatever the clients are doing.
            deadline = run.sigterm_at + SHUTDOWN_TIMEOUT + EXIT_MARGIN
            try:
                run.returncode = await server.wait_async(deadline - time.monotonic())
            except subprocess.TimeoutExpired:
                server.kill(signal.SIGKILL)  # frees the clients below; returncode stays None
                await server.wait_async(10)
            await asyncio.gather(producers, readers)

    restarted = await launcher.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        for job_id in (LIVE_JOB, OTHER_JOB):
            run.logs_after_restart[job_id] = await read_log(session, job_id)
    return run


async def test_sigterm_closes_live_websocket_with_1001(jobfeed_process: Launcher) -> None:
    """A WebSocket waiting live on a running job is closed with 1001 (going away) on SIGTERM,
    after an in-order, hole-free run of events."""
    run = await sigterm_under_load(jobfeed_process)
    assert run.ws_close_code == 1001, (run.ws_close_code, run.ws_frames[-3:])
    seqs = event_seqs(run.ws_frames)
    assert seqs == list(range(1, len(seqs) + 1))


async def test_sigterm_ends_live_sse_response_cleanly(jobfeed_process: Launcher) -> None:
    """An SSE response waiting live on a running job ends on SIGTERM with a complete body
    (no truncated chunk), after an in-order, hole-free run of events."""
    run = await sigterm_under_load(jobfeed_process)
    assert run.sse_error is None, run.sse_error
    seqs = [int(m["id"]) for m in run.sse_messages if "id" in m]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_sigterm_exits_0_within_shutdown_timeout(jobfeed_process: Launcher) -> None:
    """With live streams open and appends in flight, SIGTERM ends the process with status 0
    within server.shutdown_timeout (plus a margin)."""
    run = await sigterm_under_load(jobfeed_process)
    assert run.returncode == 0, run.server.describe()


async def test_sigterm_keeps_every_acknowledged_event(jobfeed_process: Launcher) -> None:
    """Every append acknowledged before or during the SIGTERM drain is in the log after a
    restart, at its acknowledged seq with its acknowledged id; logs stay contiguous."""
    run = await sigterm_under_load(jobfeed_process)
    stored = {
        (job_id, event["seq"]): event["id"]
        for job_id, log in run.logs_after_restart.items()
        for event in log
    }
    lost = {key: event_id for key, event_id in run.acks.items() if stored.get(key) != event_id}
    assert lost == {}, f"{len(lost)} acknowledged events lost or changed"
    assert len(run.acks) >= SIGTERM_AFTER
    for log in run.logs_after_restart.values():
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1))


async def test_sigterm_logs_shutting_down_then_stopped(jobfeed_process: Launcher) -> None:
    """After SIGTERM the server's log has a "shutting_down" line and, later, a "stopped"
    line."""
    run = await sigterm_under_load(jobfeed_process)
    assert run.server.log.wait_for("stopped", timeout=5) is not None, run.server.describe()
    events = run.server.log.events()
    assert "shutting_down" in events, events[-10:]
    assert "stopped" in events, events[-10:]
    assert events.index("shutting_down") < events.index("stopped")


async def test_sigint_exits_0(jobfeed_process: Launcher) -> None:
    """SIGINT (Ctrl-C) shuts the server down like SIGTERM: exit status 0 and a "stopped"
    line, within server.shutdown_timeout (plus a margin)."""
    server = await jobfeed_process.start(server__shutdown_timeout=SHUTDOWN_TIMEOUT)
    server.kill(signal.SIGINT)
    assert await server.wait_async(SHUTDOWN_TIMEOUT + EXIT_MARGIN) == 0, server.describe()
    assert server.log.wait_for("stopped", timeout=5) is not None, server.describe()


STUCK_EVENT = "x" * 60_000  # events large enough that a few fill every buffer on the way
STUCK_APPENDS = 40  # 2.4 MB: far more than a stuck socket's buffers hold


async def test_sigterm_with_stuck_subscribers_exits_0_in_time_and_keeps_acks(
    jobfeed_process: Launcher,
) -> None:
    """SIGTERM with stuck WebSocket and SSE subscribers (their buffers full, never read; one
    of them mid-replay) and a live reader: the process exits 0 within
    server.shutdown_timeout (plus a margin), the database is closed (store_closed), and
    every acknowledged append is in it afterwards."""
    server = await jobfeed_process.start(
        server__shutdown_timeout=SHUTDOWN_TIMEOUT,
        stream__send_timeout=600,  # no send timeout rescues the shutdown
        stream__send_buffer_bytes=4096,
        log__access="false",
    )
    acked: dict[int, int] = {}
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "stuck"}) as response:
            assert response.status == 201
        path = "/v1/jobs/stuck/stream"
        stuck = [
            await StuckSubscriber.connect(server.host, server.port, path, transport)
            for transport in ("ws", "ws", "sse", "sse")
        ]
        live = await session.ws_connect(path, max_msg_size=1 << 20)
        for n in range(STUCK_APPENDS):
            event = {"type": "log", "message": STUCK_EVENT, "key": f"k{n}"}
            async with session.post("/v1/jobs/stuck/events", json=event) as response:
                assert response.status == 201, await response.text()
                appended = (await response.json())["events"][0]
                acked[appended["seq"]] = appended["id"]
        # One more that joins now: it is stuck in the middle of its replay at SIGTERM.
        stuck.append(await StuckSubscriber.connect(server.host, server.port, path))
        server.kill(signal.SIGTERM)
        sigterm_at = time.monotonic()
        try:
            returncode: int | None = await server.wait_async(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
        except subprocess.TimeoutExpired:
            returncode = None
            server.kill(signal.SIGKILL)
            await server.wait_async(10)
        exited_after = time.monotonic() - sigterm_at
        await live.close()
    await asyncio.gather(*(asyncio.to_thread(s.read_rest) for s in stuck))

    assert returncode == 0, f"exit {returncode} after {exited_after:.1f} s\n{server.describe()}"
    assert server.log.wait_for("store_closed", timeout=5) is not None, server.describe()
    closed = [r for r in server.lines if r.get("event") == "stream_closed"]
    assert sorted(r["transport"] for r in closed) == ["sse", "sse", "ws", "ws", "ws", "ws"], closed
    assert {r["outcome"] for r in closed} == {"shutdown"}, closed

    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        stored = {event["seq"]: event["id"] for event in await read_log(session, "stuck")}
    assert len(acked) == STUCK_APPENDS
    assert {seq: stored.get(seq) for seq in acked} == acked


async def test_websocket_stream_outcomes_are_logged(jobfeed_process: Launcher) -> None:
    """Each WebSocket stream's stream_closed line says how it ended: done / 1000 after the
    terminal event, client_gone when the client closed, send_timeout / 1013 for a client
    that stopped reading, shutdown / 1001 for a live stream at SIGTERM."""
    server = await jobfeed_process.start(
        server__shutdown_timeout=SHUTDOWN_TIMEOUT,
        stream__send_timeout=0.5,
        stream__send_buffer_bytes=4096,
        log__access="false",
    )
    async with aiohttp.ClientSession(server.url) as session:
        for job_id in ("done", "gone", "stuck", "live"):
            async with session.post("/v1/jobs", json={"job_id": job_id}) as response:
                assert response.status == 201
        async with session.post("/v1/jobs/done/events", json={"type": "completed"}) as response:
            assert response.status == 201
        async with session.ws_connect("/v1/jobs/done/stream") as ws:
            async for _ in ws:
                pass
            assert ws.close_code == 1000
        async with session.ws_connect("/v1/jobs/gone/stream") as ws:
            assert (await ws.receive_json())["type"] == "hello"
        stuck = await StuckSubscriber.connect(server.host, server.port, "/v1/jobs/stuck/stream")
        for _ in range(STUCK_APPENDS):
            event = {"type": "log", "message": STUCK_EVENT}
            async with session.post("/v1/jobs/stuck/events", json=event) as response:
                assert response.status == 201
        live = await session.ws_connect("/v1/jobs/live/stream")
        assert (await live.receive_json())["type"] == "hello"
        cut_off = await asyncio.to_thread(_wait_for_stream_closed, server, 3, 30.0)
        assert cut_off >= 3, server.describe()
        server.kill(signal.SIGTERM)
        async for _ in live:
            pass
        assert live.close_code == 1001
        assert await server.wait_async(SHUTDOWN_TIMEOUT + EXIT_MARGIN) == 0
    await asyncio.to_thread(stuck.read_rest)

    outcomes = {
        r["job_id"]: (r["outcome"], r.get("close_code"))
        for r in server.lines
        if r.get("event") == "stream_closed"
    }
    assert outcomes == {
        "done": ("done", 1000),
        "gone": ("client_gone", 1000),
        "stuck": ("send_timeout", 1013),
        "live": ("shutdown", 1001),
    }, outcomes


def _wait_for_stream_closed(server: ServerProcess, count: int, timeout: float) -> int:
    """Block until ``count`` stream_closed lines are logged (or the timeout); how many are."""
    condition = server.log._changed
    deadline = time.monotonic() + timeout
    with condition:
        while True:
            found = sum(1 for r in server.log.records if r.get("event") == "stream_closed")
            remaining = deadline - time.monotonic()
            if found >= count or remaining <= 0 or server.log.ended:
                return found
            condition.wait(remaining)
