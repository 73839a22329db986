"""The Server-Sent Events stream through the real app on a real socket (protocol v1,
"Server-Sent Events")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.streams import SseComment, SseEvent, SseItem, read_sse, sse_items, stored_log

# Every test that builds a config runs with authentication off and on (tests/conftest.py).
AUTH_MODES = ("off", "on")
WAIT = 10.0  # bound on any one wait; a healthy server answers in milliseconds
SSE = {"Accept": "text/event-stream"}


def stream_path(job_id: str, after: int | str | None = None) -> str:
    query = "" if after is None else f"?after={after}"
    return f"/v1/jobs/{job_id}/stream{query}"


async def next_item(items: AsyncIterator[SseItem]) -> SseItem:
    async with asyncio.timeout(WAIT):
        return await anext(items)


async def next_event(items: AsyncIterator[SseItem]) -> SseEvent:
    item = await next_item(items)
    assert isinstance(item, SseEvent), item
    return item


async def running_job(client: TestClient[Any, Any], job_id: str, events: int) -> int:
    """A job with ``events`` progress events after `created`; its last_seq."""
    await create_job(client, job_id=job_id)
    last_seq = 1
    for n in range(events):
        last_seq = (await append(client, job_id, {"type": "progress", "current": n}))["last_seq"]
    return last_seq


async def assert_error(response: ClientResponse, status: int, code: str) -> None:
    """The response is the spec's error shape, not a stream."""
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert isinstance(body["error"]["details"], list)


async def test_response_is_an_event_stream(client: TestClient[Any, Any]) -> None:
    """200 with Content-Type text/event-stream."""
    await running_job(client, "sse-type", 0)
    async with client.get(stream_path("sse-type"), headers=SSE) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"


async def test_hello_comes_first_without_id(client: TestClient[Any, Any]) -> None:
    """The first event is `event: hello` with no id (so it never moves Last-Event-ID)."""
    await running_job(client, "sse-hello", 2)
    epoch = (await (await client.get("/v1/jobs/sse-hello")).json())["epoch"]
    async with client.get(stream_path("sse-hello", 1), headers=SSE) as response:
        hello = await next_event(sse_items(response))
    assert hello.event == "hello"
    assert hello.id is None
    assert hello.json() == {
        "type": "hello",
        "job_id": "sse-hello",
        "status": "running",
        "after": 1,
        "last_seq": 3,
        "epoch": epoch,
    }


async def test_event_wire_format(client: TestClient[Any, Any]) -> None:
    """The stream opens with a `retry:` hint, then `event: hello`; each event is exactly
    `id: <seq>`, `data: <event JSON>`, blank: no `event:` line, so that a browser's
    EventSource.onmessage receives it whatever its type (feed.md)."""
    await running_job(client, "sse-wire", 1)
    await append(client, "sse-wire", {"type": "stage_completed", "message": "custom"})
    stored = await stored_log(client, "sse-wire")
    async with client.get(stream_path("sse-wire", 1), headers=SSE) as response:
        lines: list[str] = []
        async with asyncio.timeout(WAIT):
            while len(lines) < 11:
                lines.append((await response.content.readline()).decode())
    assert lines[0].startswith("retry: ")
    assert lines[1] == "\n"
    assert lines[2].startswith("event: hello\n")
    assert lines[3].startswith("data: ")
    assert lines[4] == "\n"
    assert lines[5:] == [
        "id: 2\n",
        f"data: {stored[1]}\n",
        "\n",
        "id: 3\n",
        f"data: {stored[2]}\n",
        "\n",
    ]


async def test_retry_hint_is_jittered(client: TestClient[Any, Any]) -> None:
    """Each stream's `retry:` lies in [sse_retry_ms, 2 x sse_retry_ms), and they differ, so
    that browsers dropped together do not come back together."""
    await running_job(client, "sse-retry", 0)
    hints = set()
    for _ in range(8):
        async with client.get(stream_path("sse-retry"), headers=SSE) as response:
            async with asyncio.timeout(WAIT):
                line = (await response.content.readline()).decode()
        assert line.startswith("retry: ")
        hints.add(int(line[7:]))
    assert all(2000 <= hint < 4000 for hint in hints), hints
    assert len(hints) > 1


async def test_events_replay_then_live_as_stored(client: TestClient[Any, Any]) -> None:
    """Events after `after` arrive in order, their data byte-identical to the stored log,
    then live ones as they are committed."""
    await running_job(client, "sse-live", 3)
    async with client.get(stream_path("sse-live", 1), headers=SSE) as response:
        items = sse_items(response)
        await next_event(items)
        replay = [await next_event(items) for _ in range(3)]
        await append(client, "sse-live", {"type": "log", "message": "ünïcode ✓"})
        live = await next_event(items)
    stored = await stored_log(client, "sse-live")
    received = [*replay, live]
    assert [event.id for event in received] == ["2", "3", "4", "5"]
    assert [event.event for event in received] == [None] * 4
    assert [event.data for event in received] == stored[1:]


async def test_last_event_id_wins_over_after(client: TestClient[Any, Any]) -> None:
    """With both present, the Last-Event-ID header is the offset, not ?after=."""
    await running_job(client, "sse-resume", 4)
    headers = {**SSE, "Last-Event-ID": "3"}
    async with client.get(stream_path("sse-resume", 0), headers=headers) as response:
        items = sse_items(response)
        hello = await next_event(items)
        first = await next_event(items)
    assert hello.json()["after"] == 3
    assert first.id == "4"


async def test_ends_after_the_terminal_event(client: TestClient[Any, Any]) -> None:
    """The terminal event is the last one; then the response ends."""
    await running_job(client, "sse-done", 1)
    await append(client, "sse-done", {"type": "completed", "result": [1, 2]})
    log = await read_sse(client, stream_path("sse-done", 0))
    assert log.status == 200
    assert log.seqs == [1, 2, 3]
    assert json.loads(log.events[-1])["type"] == "completed"
    assert log.ended


@pytest.mark.parametrize("past", [0, 1, 50])
async def test_reconnect_at_or_past_the_terminal_event_is_204(
    client: TestClient[Any, Any], past: int
) -> None:
    """A finished job with Last-Event-ID (or after) at or past its terminal event: 204 No
    Content, which tells EventSource to stop reconnecting (feed.md)."""
    await create_job(client, job_id="sse-end")
    last_seq = (await append(client, "sse-end", {"type": "cancelled"}))["last_seq"]
    headers = {**SSE, "Last-Event-ID": str(last_seq + past)}
    async with client.get(stream_path("sse-end"), headers=headers) as response:
        assert response.status == 204
        assert await response.read() == b""
    async with client.get(stream_path("sse-end", last_seq + past), headers=SSE) as response:
        assert response.status == 204


async def test_past_the_end_of_a_running_job_is_still_400(client: TestClient[Any, Any]) -> None:
    """Only a finished job turns "past the end" into 204; a running one refuses it."""
    last_seq = await running_job(client, "sse-past", 1)
    async with client.get(stream_path("sse-past", last_seq + 1), headers=SSE) as response:
        await assert_error(response, 400, "invalid_parameter")


async def test_unknown_job_is_404_before_streaming(client: TestClient[Any, Any]) -> None:
    """No such job: 404 job_not_found in the error shape, no event stream."""
    async with client.get(stream_path("no-such-job"), headers=SSE) as response:
        await assert_error(response, 404, "job_not_found")


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "5"])
async def test_bad_after_is_400(client: TestClient[Any, Any], after: str) -> None:
    """after not an integer >= 0, or past the log's end (last_seq is 2): 400."""
    await running_job(client, "sse-bad", 1)
    async with client.get(stream_path("sse-bad", after), headers=SSE) as response:
        await assert_error(response, 400, "invalid_parameter")


async def test_bad_last_event_id_is_400(client: TestClient[Any, Any]) -> None:
    """A Last-Event-ID that is not a seq is refused like a bad ?after=."""
    await running_job(client, "sse-bad-id", 1)
    headers = {**SSE, "Last-Event-ID": "nope"}
    async with client.get(stream_path("sse-bad-id"), headers=headers) as response:
        await assert_error(response, 400, "invalid_parameter")


async def test_heartbeat_comments_while_idle(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Nothing to send for stream.heartbeat_seconds: a `: heartbeat` comment."""
    client = await make_client(make_config(stream__heartbeat_seconds=0.2))
    last_seq = await running_job(client, "sse-beat", 1)
    async with client.get(stream_path("sse-beat", last_seq), headers=SSE) as response:
        items = sse_items(response)
        assert (await next_event(items)).event == "hello"
        assert await next_item(items) == SseComment("heartbeat")
        await append(client, "sse-beat", {"type": "log", "message": "after a beat"})
        event = await next_item(items)
        while isinstance(event, SseComment):  # more beats may come before the append lands
            event = await next_item(items)
    assert event.id == str(last_seq + 1)
