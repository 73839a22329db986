"""The producer stream against a real ``jobfeed serve`` process: SIGKILL mid-stream loses no
acknowledged event; SIGTERM answers every request it read, then closes 1001; a producer that
never reads its answers cannot grow the server's memory without bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Launcher, ServerProcess, launching, read_log, rss_bytes
from tests.test_memory import stuck_websocket

pytestmark = pytest.mark.process

MiB = 1 << 20
WAIT = 60.0  # bound on a whole scenario on a busy machine
PRODUCERS = 3
WINDOW = 300  # requests each producer keeps in flight
STOP_AFTER = 600  # answers seen (all producers) before the signal


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as started:
        yield started


@dataclass
class Run:
    server: ServerProcess
    signum: int
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> the event's ack
    refused: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    answered: int = 0
    signalled: asyncio.Event = field(default_factory=asyncio.Event)


def frame(ref: int, job_id: str, key: str) -> dict[str, Any]:
    event = {"type": "log", "message": key, "key": key}
    return {"type": "append", "ref": ref, "job_id": job_id, "event": event}


async def pipeline(producer: int, run: Run) -> None:
    """Keep ``WINDOW`` appends in flight on one producer stream until the server ends it;
    record each answer by the key it acknowledges."""
    job_id = f"job-{producer}"
    sent: dict[int, str] = {}
    async with (
        aiohttp.ClientSession(run.server.url) as session,
        session.ws_connect("/v1/ingest") as ws,
    ):
        ref = 0

        async def send_more() -> None:
            nonlocal ref
            with contextlib.suppress(ConnectionError):
                while len(sent) < WINDOW and not ws.closed:
                    ref += 1
                    sent[ref] = f"p{producer}-{ref}"
                    await ws.send_json(frame(ref, job_id, sent[ref]))

        await send_more()
        async for message in ws:
            answer = json.loads(message.data)
            key = sent.pop(answer["ref"])
            run.answered += 1
            if answer["type"] == "ack":
                run.acked[key] = {**answer["events"][0], "job_id": job_id}
            else:
                run.refused.append(answer)
            if run.answered >= STOP_AFTER and not run.signalled.is_set():
                run.server.kill(run.signum)  # the other requests are in flight
                run.signalled.set()
            if not run.signalled.is_set():
                await send_more()
        run.close_codes.append(ws.close_code)


async def pipelines_until(launcher: Launcher, signum: int) -> tuple[Run, dict[str, list[Any]]]:
    """Producers pipeline into their own jobs until ``signum`` ends the server; then the
    server is started again on the same file, and the jobs' logs are read back."""
    server = await launcher.start(server__shutdown_timeout=4)
    async with aiohttp.ClientSession(server.url) as session:
        for producer in range(PRODUCERS):
            async with session.post("/v1/jobs", json={"job_id": f"job-{producer}"}) as r:
                assert r.status == 201, await r.text()
    run = Run(server, signum)
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(
            *(pipeline(n, run) for n in range(PRODUCERS)), return_exceptions=True
        )
        await server.wait_async(WAIT)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert run.signalled.is_set(), (errors, run.refused[:3])
    restarted = await launcher.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        logs = {f"job-{n}": await read_log(session, f"job-{n}", 500) for n in range(PRODUCERS)}
    return run, logs


def stored_by_key(logs: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    return {e["message"]: e for log in logs.values() for e in log if e["type"] == "log"}


async def test_sigkill_mid_stream_loses_no_acknowledged_event(launcher: Launcher) -> None:
    """kill -9 with ~900 appends in flight: every acknowledged event is in the log after a
    restart, at the seq and id it was acknowledged with."""
    run, logs = await pipelines_until(launcher, signal.SIGKILL)
    stored = stored_by_key(logs)
    assert len(run.acked) >= STOP_AFTER - len(run.refused)
    lost = [key for key in run.acked if key not in stored]
    assert lost == [], f"{len(lost)} acknowledged events lost, e.g. {lost[:5]}"
    for key, ack in run.acked.items():
        assert (stored[key]["seq"], stored[key]["id"]) == (ack["seq"], ack["id"]), key
    for log in logs.values():
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1))


async def test_sigterm_answers_every_request_read_then_closes_1001(launcher: Launcher) -> None:
    """SIGTERM with ~900 appends in flight: each producer gets 1001 after its answers, and
    every event in the log was acknowledged (a request read is committed and answered; one
    not read is neither), and every acknowledged one is in the log."""
    run, logs = await pipelines_until(launcher, signal.SIGTERM)
    assert run.close_codes == [1001] * PRODUCERS, run.close_codes
    assert run.server.popen.returncode == 0
    stored = stored_by_key(logs)
    assert set(stored) == set(run.acked), (
        f"stored, not answered: {sorted(set(stored) - set(run.acked))[:5]}; "
        f"answered, not stored: {sorted(set(run.acked) - set(stored))[:5]}"
    )
    closed = [r for r in run.server.lines if r.get("event") == "ingest_closed"]
    assert {r["outcome"] for r in closed} == {"shutdown"}, closed
    assert sum(r["requests"] for r in closed) >= run.answered - len(run.refused)


def masked_text_frame(payload: bytes) -> bytes:
    """A client's WebSocket text frame (a zero mask key: the payload goes as it is)."""
    assert 125 < len(payload) < 65536
    return struct.pack("!BBH", 0x81, 0x80 | 126, len(payload)) + b"\0\0\0\0" + payload


async def test_a_producer_that_never_reads_cannot_grow_the_server(launcher: Launcher) -> None:
    """A producer that writes appends as fast as the socket takes them and never reads an
    answer: the server stops reading it once ingest.max_in_flight requests are unanswered,
    grows by a bounded amount while it writes, and cuts it off after stream.send_timeout
    (1013, logged send_timeout)."""
    server = await launcher.start(stream__send_timeout=3, log__access="false")
    async with (
        aiohttp.ClientSession(server.url) as session,
        session.post("/v1/jobs", json={"job_id": "mem"}) as response,
    ):
        assert response.status == 201
    event = {"type": "log", "message": "m" * 300}
    data = masked_text_frame(
        json.dumps({"type": "append", "ref": 1, "job_id": "mem", "event": event}).encode()
    )
    chunk = data * 64
    baseline = rss_bytes(server.pid)
    sock = stuck_websocket(server.port, "/v1/ingest")
    sock.setblocking(False)
    peak, written = 0, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0  # writing for a while, inside the send timeout
    try:
        while loop.time() < deadline:
            try:
                # Whole frames only: a partial send goes on where it stopped.
                written += sock.send(chunk[written % len(chunk) :])
            except BlockingIOError:
                # Not a synchronisation sleep: the pace of the RSS sampling while TCP pushes back.
                await asyncio.sleep(0.02)
            peak = max(peak, rss_bytes(server.pid) - baseline)
        closed = await asyncio.to_thread(server.log.wait_for, "ingest_closed", WAIT)
        peak = max(peak, rss_bytes(server.pid) - baseline)
    finally:
        sock.close()
    assert closed is not None, server.describe()
    assert closed["outcome"] == "send_timeout", closed
    # ~11 MiB here with the window; 240 MiB without it (ingest.max_in_flight = 10**9).
    assert peak < 40 * MiB, f"the server grew by {peak / MiB:.0f} MiB ({written} bytes sent)"
