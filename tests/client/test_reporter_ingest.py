"""The reporter over the producer stream (``GET /v1/ingest``, ``jobfeed_client/ingest.py``):
it is used when the server has it (one WebSocket for all of a client's jobs, no HTTP append),
and a server without it is reached over HTTP. Lost answers and a restarted server are covered
for both transports by test_reporter.py and test_producer_restart.py."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from jobfeed_client import AsyncClient, RetryPolicy
from server.app import create_app
from server.handlers import ingest as ingest_handler
from tests.conftest import ConfigFactory
from tests.procs import Launcher

FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
WAIT = 60.0


def new_id() -> str:
    return f"ing-{uuid.uuid4().hex[:12]}"


async def report(client: AsyncClient, job_id: str, lines: int) -> None:
    async with client.job(job_id, kind="k") as job:
        for n in range(lines):
            await job.log(f"line {n}")
        await job.progress(1, 2)


async def logged(client: AsyncClient, job_id: str) -> list[tuple[str, Any]]:
    return [(e.type, e.message) async for e in client.events(job_id)]


def expected(lines: int) -> list[tuple[str, Any]]:
    return [
        ("created", None),
        *[("log", f"line {n}") for n in range(lines)],
        ("progress", None),
        ("completed", None),
    ]


@pytest.mark.process
async def test_reporters_share_one_producer_stream(launcher: Launcher) -> None:
    """Five reporters of one client, running together, send their creates and batches on
    one producer stream: the server sees no HTTP append or create, and every log is whole
    and in order."""
    server = await launcher.start()
    jobs = [new_id() for _ in range(5)]
    async with asyncio.timeout(WAIT):
        async with AsyncClient(server.url, retry=FAST_RETRY, flush_interval=0.01) as client:
            await asyncio.gather(*(report(client, job_id, 20) for job_id in jobs))
            channel = client.ingest_channel()
            assert channel is not None
            assert channel.connects == 1
            for job_id in jobs:
                assert await logged(client, job_id) == expected(20)
        closed = await asyncio.to_thread(server.log.wait_for, "ingest_closed", WAIT)
    assert closed is not None
    assert closed["requests"] >= 2 * len(jobs)  # a create and at least one batch each
    posts = [
        r["path"] for r in server.lines if r.get("event") == "request" and r.get("method") == "POST"
    ]
    assert posts == []


async def test_a_server_without_the_producer_stream_is_reached_over_http(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server answers the upgrade 404: the reporter falls back to HTTP for good and
    delivers everything."""

    async def no_such_route(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    monkeypatch.setattr(ingest_handler, "ingest", no_such_route)
    async with TestServer(create_app(make_config())) as server:
        url = str(server.make_url("")).rstrip("/")
        job_id = new_id()
        async with asyncio.timeout(WAIT):
            async with AsyncClient(url, retry=FAST_RETRY, flush_interval=0) as client:
                await report(client, job_id, 3)
                assert client.ingest_channel() is None  # known unsupported: HTTP from now on
                assert await logged(client, job_id) == expected(3)
