"""The database's generation (server.generation, migration 0008): a database never restored
keeps every job epoch byte for byte across the upgrade, and clients holding them resume as
before; the feed's hello carries the generation as its epoch, checked on ``?epoch=`` like a
job stream's. (Restores, which start a new generation, are tested in test_backup.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.generation import Generation, base_epoch
from server.migrate import apply_migrations, bundled_migrations
from server.snapshot import log_epoch
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.test_tenancy_schema import OLD_JOBS, make_v3_database

Client = TestClient[Any, Any]
WAIT = 10.0


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


async def ws_opening(client: Client, path: str) -> tuple[dict[str, Any], int | None]:
    """The first frame and, if it is an error, the close code that follows (else None)."""
    async with client.ws_connect(path) as ws, asyncio.timeout(WAIT):
        message = await ws.receive()
        assert message.type == WSMsgType.TEXT, message
        first: dict[str, Any] = json.loads(message.data)
        if first.get("type") != "error":
            return first, None
        await ws.receive()
        return first, ws.close_code


def test_job_epochs_in_generations() -> None:
    """Generation 0 adds nothing to a job's epoch; a later one adds ``-g{n}-{tag}``, which
    ``base_epoch`` takes off again (a second restore replaces, not appends)."""
    base = log_epoch(42, "2026-11-28T10:00:00.000001Z")
    assert Generation(0, "abcd0123").job_epoch(base) == base
    first = Generation(1, "abcd0123").job_epoch(base)
    assert first == f"{base}-g1-abcd0123"
    assert base_epoch(first) == base
    assert Generation(2, "ffff0000").job_epoch(first) == f"{base}-g2-ffff0000"
    assert Generation(1, "abcd0123").feed_epoch == "g1-abcd0123"


async def test_a_database_never_restored_keeps_its_epochs_byte_for_byte(
    make_config: ConfigFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    """Schema 0004 with rows, upgraded: every snapshot (epoch included) is the same bytes,
    the generation is 0, and a client resuming with an epoch it got before the upgrade
    streams normally instead of being reset."""
    db = tmp_path / "v4.db"
    make_v3_database(db)
    apply_migrations(db, bundled_migrations()[:4])
    before = rows(db, "SELECT job_id, snapshot FROM jobs ORDER BY job_no")
    assert apply_migrations(db)[-1] == "0008_generation.sql"
    assert rows(db, "SELECT job_id, snapshot FROM jobs ORDER BY job_no") == before
    assert rows(db, "SELECT number FROM generation") == [(0,)]

    client = await make_client(make_config(storage__path=db))
    old_epochs = {job_id: json.loads(snapshot)["epoch"] for job_id, snapshot in before}
    for job_id, epoch in old_epochs.items():
        body = await (await client.get(f"/v1/jobs/{job_id}")).json()
        assert body["epoch"] == epoch
    after = OLD_JOBS["old-a"]  # old-a's log: created + its events
    hello, code = await ws_opening(
        client, f"/v1/jobs/old-a/stream?after={after}&epoch={old_epochs['old-a']}"
    )
    assert code is None, hello
    assert (hello["type"], hello["epoch"]) == ("hello", old_epochs["old-a"])


async def test_the_feed_hello_carries_the_generation_and_checks_it(client: Client) -> None:
    """The feed's hello has ``epoch`` (g0-... on a database never restored); resuming with
    it streams; with another one, or past the end in the same one, it is log_reset (4409,
    SSE 409); without one, past the end stays a bad parameter (4400)."""
    await create_job(client, job_id="f-1")
    await append(client, "f-1", {"type": "log", "message": "one"})
    hello, code = await ws_opening(client, "/v1/feed?after=0")
    assert code is None
    epoch = hello["epoch"]
    assert epoch.startswith("g0-")
    assert len(epoch) == len("g0-") + 8
    resumed, code = await ws_opening(client, f"/v1/feed?after=1&epoch={epoch}")
    assert (resumed["type"], code) == ("hello", None)
    for path in ("/v1/feed?after=1&epoch=g0-00000000", f"/v1/feed?after=99&epoch={epoch}"):
        refused, code = await ws_opening(client, path)
        assert (refused["code"], code) == ("log_reset", 4409), path
        response = await client.get(path, headers={"Accept": "text/event-stream"})
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "log_reset"
    refused, code = await ws_opening(client, "/v1/feed?after=99")
    assert (refused["code"], code) == ("invalid_parameter", 4400)
