"""The Python client's feed and the log's epoch: it keeps the epoch of the feed's hello,
resumes with it, and a feed resumed with an epoch from before a restore raises ``LogReset``
instead of handing out other events under ids it has seen (as a job watch does)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from typing import Any

import pytest
from aiohttp import web

from jobfeed_client import AsyncClient, AsyncFeed, Event, LogReset, RetryPolicy
from server.backup import backup, restore
from tests.procs import Launcher

pytestmark = pytest.mark.process

FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
WAIT = 60.0


def generation_suffix(launcher: Launcher) -> str:
    with contextlib.closing(sqlite3.connect(launcher.db_path)) as conn:
        number, tag = conn.execute("SELECT number, tag FROM generation").fetchone()
    return f"-g{number}-{tag}"


async def drain(feed: AsyncFeed, ids: list[int] | None = None) -> None:
    """Iterate until the feed raises (a feed never ends by itself)."""
    async for item in feed:
        assert isinstance(item, Event)
        if ids is not None:
            ids.append(item.id)


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_feed_from_before_a_restore_is_log_reset(
    launcher: Launcher, transport: Any
) -> None:
    """Read the feed (its epoch is the hello's), back up, append more, restore: a feed
    resumed with the old epoch raises LogReset, past the restored end or within it."""
    server = await launcher.start()
    async with AsyncClient(server.url, retry=FAST_RETRY) as client:
        await client.create_job("e-1")
        backup(launcher.db_path, launcher.workdir / "backup.db")
        await client.append("e-1", {"type": "log", "message": "after the backup"})
        feed = client.feed(after=0, transport=transport)
        seen: list[int] = []
        async with asyncio.timeout(WAIT):
            async for item in feed:
                assert isinstance(item, Event)
                seen.append(item.id)
                if len(seen) == 2:
                    break
    assert feed.epoch is not None
    assert feed.epoch.startswith("g0-")
    server.kill(signal.SIGTERM)
    assert await server.wait_async(WAIT) == 0
    restore(launcher.db_path, launcher.workdir / "backup.db")
    server = await launcher.start()
    async with AsyncClient(server.url, retry=FAST_RETRY) as client:
        for after in (2, 1):
            resumed = client.feed(after=after, epoch=feed.epoch, transport=transport)
            with pytest.raises(LogReset):
                await asyncio.wait_for(drain(resumed), WAIT)
        # A job watch folds its snapshot from the log; its epoch is the hello's (generation 1).
        watch = client.watch("e-1", transport=transport)
        async with asyncio.timeout(WAIT):
            async for _ in watch:
                break
        stored = await client.get_job("e-1")
        assert stored.epoch is not None
        assert stored.epoch.endswith(generation_suffix(launcher))
        assert watch.snapshot is not None
        assert watch.snapshot.epoch == stored.epoch


async def test_a_feed_resumes_with_the_epoch_of_its_hello(aiohttp_server: Any) -> None:
    """A reconnect sends ``epoch`` with ``after``; a hello with another epoch (a server that
    did not check it) raises LogReset rather than going on."""
    queries: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        queries.append(dict(request.query))
        epoch = "g0-aaaaaaaa" if len(queries) == 1 else "g1-bbbbbbbb"
        after = int(request.query["after"])
        await ws.send_json({"type": "hello", "after": after, "last_id": 5, "epoch": epoch})
        await ws.send_json(
            {"job_id": "j", "seq": 1, "id": 5, "type": "log", "ts": "2026-11-28T00:00:00.000000Z"}
        )
        await ws.close(code=1001)
        return ws

    app = web.Application()
    app.router.add_get("/v1/feed", handle)
    server = await aiohttp_server(app)
    got: list[int] = []
    async with AsyncClient(str(server.make_url("")), retry=FAST_RETRY) as client:
        feed = client.feed(after=4)
        with pytest.raises(LogReset):
            await asyncio.wait_for(drain(feed, got), WAIT)
    assert got == [5]
    assert queries == [{"after": "4"}, {"after": "5", "epoch": "g0-aaaaaaaa"}]
