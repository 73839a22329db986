"""A first end-to-end pass: create, append, read back (the detailed tests live per module)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import append, create_job


async def test_created_job_has_its_events_in_order(client: TestClient[Any, Any]) -> None:
    """A job's log starts with `created` (seq 1) and keeps appended events in order."""
    await create_job(client, job_id="smoke-1", kind="demo")
    await append(client, "smoke-1", {"type": "progress", "progress": 10})
    await append(
        client, "smoke-1", {"type": "log", "message": "a"}, {"type": "log", "message": "b"}
    )
    response = await client.get("/v1/jobs/smoke-1/events")
    body = await response.json()
    assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4]
    assert [e["type"] for e in body["events"]] == ["created", "progress", "log", "log"]
    assert body["next_after"] is None


async def test_websocket_replays_then_ends_after_terminal(client: TestClient[Any, Any]) -> None:
    """A late WebSocket subscriber gets hello, the whole log, and close 1000 at the end."""
    await create_job(client, job_id="smoke-2")
    await append(client, "smoke-2", {"type": "progress", "progress": 50})
    async with client.ws_connect("/v1/jobs/smoke-2/stream?after=0") as ws:
        hello = await ws.receive_json()
        assert hello["type"] == "hello"
        assert hello["last_seq"] == 2
        assert (await ws.receive_json())["seq"] == 1
        assert (await ws.receive_json())["seq"] == 2
        await append(client, "smoke-2", {"type": "completed"})
        assert (await ws.receive_json())["type"] == "completed"
        closing = await ws.receive()
        assert ws.close_code == 1000, closing
