"""Crash durability (protocol v1, "Durability and shutdown"): an acknowledged append survives
``kill -9``, and after a restart every job's log is contiguous and its snapshot matches it.

The server is a real child process on a real SQLite file; it is killed while appends from
several clients are in flight (right after the N-th acknowledgement, not after a sleep), then
started again on the same file.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Launcher, ServerProcess, fold_log, get_snapshot, launching, read_log

pytestmark = pytest.mark.process

JOBS = ("crash-a", "crash-b", "crash-c")
CLIENTS = 8
KILL_AFTER = 120  # acknowledged requests before the kill; the other clients are mid-request
LOAD_TIMEOUT = 60.0


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    """Real server children on ``tmp_path``; killed and reaped when the test ends."""
    with launching(tmp_path) as launcher:
        yield launcher


@dataclass(frozen=True)
class Ack:
    """What a 2xx told one producer about one event it sent."""

    job_id: str
    seq: int
    id: int
    ts: str
    sent: dict[str, Any]


@dataclass
class Load:
    """What the producers saw, shared between them (one event loop, no locks needed)."""

    server: ServerProcess
    acks: dict[tuple[str, int], Ack] = field(default_factory=dict)
    acked_requests: int = 0
    double_acks: list[tuple[Ack, Ack]] = field(default_factory=list)
    unexpected: list[tuple[int, str]] = field(default_factory=list)
    killed: bool = False
    interrupted: int = 0  # requests cut off by the kill after they were sent


def events_for(client: int, step: int) -> list[dict[str, Any]]:
    """A varied request: single events and batches, some carrying idempotency keys."""
    tag = f"c{client}-{step}"
    match step % 4:
        case 0:
            return [{"type": "progress", "progress": float(step % 100), "message": tag}]
        case 1:
            return [
                {"type": "log", "message": f"{tag} line {n}", "key": f"{tag}-{n}"} for n in range(3)
            ]
        case 2:
            return [{"type": "progress", "current": step, "total": step + 1, "key": tag}]
        case _:
            return [
                {"type": "stage_completed", "message": tag, "data": {"client": client}},
                {"type": "progress", "phase": f"phase-{client}", "current": 1, "total": 4},
            ]


async def produce(client: int, load: Load) -> None:
    """Append until the server is gone; record every acknowledged event."""
    async with aiohttp.ClientSession(load.server.url) as session:
        for step in itertools.count():
            job_id = JOBS[(client + step) % len(JOBS)]
            events = events_for(client, step)
            body: dict[str, Any] = events[0] if len(events) == 1 else {"events": events}
            try:
                async with session.post(f"/v1/jobs/{job_id}/events", json=body) as response:
                    status = response.status
                    payload = await response.json() if status in (200, 201) else None
                    text = "" if payload is not None else await response.text()
            except aiohttp.ClientConnectorError:
                return  # the server is gone; this request never reached it
            except aiohttp.ClientError:
                load.interrupted += 1  # cut off mid-request: it may or may not be committed
                return
            if payload is None:
                load.unexpected.append((status, text))
                continue
            record_acks(load, job_id, events, payload)
            load.acked_requests += 1
            if load.acked_requests == KILL_AFTER:
                load.server.kill(signal.SIGKILL)  # the other clients' requests are in flight
                load.killed = True


def record_acks(load: Load, job_id: str, sent: list[dict[str, Any]], body: dict[str, Any]) -> None:
    assert body["job_id"] == job_id
    assert len(body["events"]) == len(sent)
    for event, answer in zip(sent, body["events"], strict=True):
        ack = Ack(job_id, answer["seq"], answer["id"], answer["ts"], event)
        assert not answer.get("duplicate"), answer
        earlier = load.acks.setdefault((job_id, ack.seq), ack)
        if earlier is not ack:
            load.double_acks.append((earlier, ack))


async def crash_under_load(jobfeed_process: Launcher) -> Load:
    """Create the jobs, run the producers until the server is killed; return what they saw."""
    server = await jobfeed_process.start()
    async with aiohttp.ClientSession(server.url) as session:
        for job_id in JOBS:
            async with session.post("/v1/jobs", json={"job_id": job_id, "kind": "crash"}) as r:
                assert r.status == 201, await r.text()
    load = Load(server)
    async with asyncio.timeout(LOAD_TIMEOUT):
        await asyncio.gather(*(produce(n, load) for n in range(CLIENTS)))
    assert load.killed, f"only {load.acked_requests} requests were acknowledged"
    assert load.interrupted > 0, "no append was in flight when the server was killed"
    assert await server.wait_async(10) == -signal.SIGKILL
    assert load.unexpected == [], load.unexpected[:3]
    assert load.double_acks == [], load.double_acks[:3]
    return load


async def test_kill_9_under_load_loses_no_acknowledged_event(
    jobfeed_process: Launcher,
) -> None:
    """After kill -9 mid-load and a restart, every acknowledged event is stored at the seq
    it was acknowledged with, with the same id, ts and fields."""
    load = await crash_under_load(jobfeed_process)
    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        logs = {job_id: await read_log(session, job_id, page=37) for job_id in JOBS}
    missing, changed = [], []
    for (job_id, seq), ack in sorted(load.acks.items()):
        log = logs[job_id]
        if seq > len(log):
            missing.append((job_id, seq))
            continue
        stored = log[seq - 1]
        expected = {"seq": seq, "id": ack.id, "ts": ack.ts, "job_id": job_id}
        expected.update({k: v for k, v in ack.sent.items() if k != "key"})
        if {k: stored.get(k) for k in expected} != expected:
            changed.append((expected, stored))
    assert missing == [], f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert changed == [], changed[:3]
    assert len(load.acks) >= KILL_AFTER


async def test_kill_9_leaves_every_log_contiguous_from_1(jobfeed_process: Launcher) -> None:
    """After kill -9 mid-load and a restart, each job's seqs are 1..last_seq without a hole
    or a repeat, ids strictly increase along the log, and the page's last_seq agrees."""
    await crash_under_load(jobfeed_process)
    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        for job_id in JOBS:
            log = await read_log(session, job_id, page=37)
            snapshot = await get_snapshot(session, job_id)
            assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), job_id
            ids = [e["id"] for e in log]
            assert ids == sorted(set(ids)), job_id
            assert log[0]["type"] == "created"
            assert snapshot["last_seq"] == len(log), job_id


async def test_kill_9_leaves_snapshots_equal_to_their_logs(jobfeed_process: Launcher) -> None:
    """After kill -9 mid-load and a restart, each stored snapshot equals the fold of
    ``server.snapshot.apply_event`` over the job's log (last_seq, status, progress, ...)."""
    await crash_under_load(jobfeed_process)
    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        for job_id in JOBS:
            log = await read_log(session, job_id)
            snapshot = await get_snapshot(session, job_id)
            folded = fold_log(log)
            assert (snapshot["last_seq"], snapshot["status"], snapshot["progress"]) == (
                folded["last_seq"],
                folded["status"],
                folded["progress"],
            ), job_id
            assert snapshot == folded, job_id


async def test_appends_continue_after_kill_9(jobfeed_process: Launcher) -> None:
    """After kill -9 mid-load and a restart, a new append gets the next seq of its job and
    an id past every id already in the log."""
    load = await crash_under_load(jobfeed_process)
    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        logs = {job_id: await read_log(session, job_id) for job_id in JOBS}
        highest_id = max(e["id"] for log in logs.values() for e in log)
        assert highest_id >= max(ack.id for ack in load.acks.values())
        for job_id in JOBS:
            body = {"type": "progress", "progress": 99.0, "message": "after restart"}
            async with session.post(f"/v1/jobs/{job_id}/events", json=body) as response:
                assert response.status == 201, await response.text()
                answer = await response.json()
            (appended,) = answer["events"]
            assert appended["seq"] == len(logs[job_id]) + 1, job_id
            assert appended["id"] > highest_id, job_id
            assert answer["last_seq"] == appended["seq"]
            highest_id = appended["id"]
            snapshot = await get_snapshot(session, job_id)
            assert snapshot["last_seq"] == appended["seq"]
            assert snapshot["progress"] == 99.0


async def test_keyed_batch_retried_after_kill_9_is_a_duplicate(
    jobfeed_process: Launcher,
) -> None:
    """A keyed batch acknowledged before kill -9 and retried after the restart answers 200
    with the stored seqs, ids and ts, each marked duplicate, and appends no copy."""
    server = await jobfeed_process.start()
    batch = {
        "events": [
            {"type": "log", "message": "step 1", "key": "retry-1"},
            {"type": "progress", "progress": 50.0, "key": "retry-2"},
            {"type": "log", "message": "step 2", "key": "retry-3"},
        ]
    }
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "retried"}) as response:
            assert response.status == 201, await response.text()
        async with session.post("/v1/jobs/retried/events", json=batch) as response:
            assert response.status == 201, await response.text()
            first = await response.json()
    server.kill(signal.SIGKILL)
    assert await server.wait_async(10) == -signal.SIGKILL

    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        async with session.post("/v1/jobs/retried/events", json=batch) as response:
            assert response.status == 200, await response.text()
            retried = await response.json()
        log = await read_log(session, "retried")
    assert retried["events"] == [{**event, "duplicate": True} for event in first["events"]]
    assert retried["last_seq"] == first["last_seq"] == 4
    assert [e["seq"] for e in log] == [1, 2, 3, 4]
