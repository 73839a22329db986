"""``GET /v1/frames.schema.json``: the stream frames' JSON Schema (server/frame_schema.py).

Every kind of frame a real server sends (hello, each event type, heartbeat, snapshot, pong,
error), over WebSocket and Server-Sent Events, for job streams and the feed, validates
against the document it serves; and the Python client's types (jobfeed_client.events) name
the same frames and fields, so that neither side can drift from the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import aiohttp
import jsonschema_rs
import orjson
from aiohttp.test_utils import TestClient

from jobfeed_client import events as sdk
from jobfeed_client.sse import SSEParser
from server.frame_schema import CONTROL_FRAMES, build_frames_schema
from tests.conftest import ClientFactory, ConfigFactory, append, create_job

Frames = list[dict[str, Any]]
WAIT = 30.0


def validator(document: dict[str, Any], name: str) -> Any:
    """A validator for one of the document's ``$defs`` (its refs resolved in the document)."""
    return jsonschema_rs.validator_for({"$ref": f"#/$defs/{name}", "$defs": document["$defs"]})


async def ws_frames(
    client: TestClient[Any, Any],
    path: str,
    until: Callable[[Frames], bool],
    send: list[str] | None = None,
) -> Frames:
    """The frames of a WebSocket stream until it closes or ``until`` holds; ``send``: text
    frames to send after the hello."""
    frames: Frames = []
    async with asyncio.timeout(WAIT):
        ws = await client.ws_connect(path)
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frames.append(orjson.loads(message.data))
            if len(frames) == 1:
                for text in send or []:
                    await ws.send_str(text)
            if until(frames):
                break
        await ws.close()
    return frames


async def sse_frames(
    client: TestClient[Any, Any], path: str, until: Callable[[Frames], bool]
) -> Frames:
    """The ``data:`` of a Server-Sent Events stream's records, until it ends or ``until``."""
    frames: Frames = []
    parser = SSEParser()
    async with (
        asyncio.timeout(WAIT),
        client.get(path, headers={"Accept": "text/event-stream"}) as response,
    ):
        async for chunk in response.content.iter_any():
            for record in parser.feed(chunk):
                frames.append(orjson.loads(record.data))
            if until(frames):
                break
    return frames


def has_type(name: str, count: int = 1) -> Callable[[Frames], bool]:
    return lambda frames: sum(frame.get("type") == name for frame in frames) >= count


async def test_real_frames_validate(make_config: ConfigFactory, make_client: ClientFactory) -> None:
    """Every kind of frame, from both transports and both kinds of stream, validates against
    the served document's ``JobStreamFrame`` or ``FeedFrame``, as exactly one of its kinds."""
    client = await make_client(make_config(stream__heartbeat_seconds=0.2))
    response = await client.get("/v1/frames.schema.json")
    assert response.status == 200
    document = await response.json()
    jsonschema_rs.meta.validate(document)
    job_frames, feed_frames = (
        validator(document, "JobStreamFrame"),
        validator(document, "FeedFrame"),
    )

    await create_job(client, job_id="fs-a", kind="build", metadata={"repo": "x"})
    await append(
        client,
        "fs-a",
        {"type": "progress", "current": 1, "total": 4, "phase": "fetch", "data": {"n": 1}},
        {"type": "log", "message": "fetched", "level": "warning"},
        {"type": "stage.done", "message": "m", "data": {"stage": 1}},
        {"type": "failed", "error": {"message": "disk full", "code": "ENOSPC", "details": [1]}},
    )
    await create_job(client, job_id="fs-b")
    await append(client, "fs-b", {"type": "cancelled", "reason": "superseded"})
    await create_job(client, job_id="fs-c")
    await append(client, "fs-c", {"type": "completed", "result": {"a": 1}, "message": "ok"})
    await create_job(client, job_id="fs-idle")
    await append(client, "fs-idle", {"type": "progress", "progress": 5.0})

    on_job_streams: Frames = []
    on_feeds: Frames = []
    for job_id in ("fs-a", "fs-b", "fs-c"):
        on_job_streams += await ws_frames(
            client, f"/v1/jobs/{job_id}/stream?after=0", lambda f: False
        )
        on_job_streams += await sse_frames(
            client, f"/v1/jobs/{job_id}/stream?after=0", lambda f: False
        )
    # An idle job stream: a heartbeat; a ping gets a pong, anything else an error frame.
    on_job_streams += await ws_frames(
        client,
        "/v1/jobs/fs-idle/stream?after=2",
        lambda f: has_type("heartbeat")(f) and has_type("pong")(f) and has_type("error")(f),
        send=['{"type": "ping"}', "nonsense"],
    )
    on_job_streams += await ws_frames(client, "/v1/jobs/no-such/stream", lambda f: False)
    # The feed: the whole log, then a heartbeat; snapshots=1 (fs-idle is unfinished).
    for read in (ws_frames, sse_frames):
        on_feeds += await read(client, "/v1/feed?after=0&prefix=fs-", has_type("heartbeat"))
        on_feeds += await read(client, "/v1/feed?snapshots=1", has_type("snapshot"))
    on_feeds += await ws_frames(client, "/v1/feed?after=999999", lambda f: False)

    for frames, check in ((on_job_streams, job_frames), (on_feeds, feed_frames)):
        for frame in frames:
            errors = [error.message for error in check.iter_errors(frame)]
            assert not errors, (frame, errors)
    seen = {frame["type"] for frame in on_job_streams} | {frame["type"] for frame in on_feeds}
    event_types = {"created", "progress", "log", "stage.done", "failed", "cancelled", "completed"}
    assert seen == event_types | {"hello", "heartbeat", "pong", "error", "snapshot"}
    assert {frame["type"] for frame in on_feeds} >= {"hello", "heartbeat", "snapshot", "error"}
    # Not vacuous: a frame with a field the server does not send is refused.
    assert not job_frames.is_valid({**on_job_streams[0], "extra": 1})
    assert not feed_frames.is_valid({"type": "heartbeat", "last_seq": 3})


def _properties(name: str) -> set[str]:
    return set(build_frames_schema()["$defs"][name]["properties"])


def test_the_clients_types_name_the_same_frames_and_fields() -> None:
    """jobfeed_client.events: ``Event``'s fields are every stored event's, ``Snapshot``'s the
    snapshot's, each control frame's TypedDict the frame's fields, and ``CONTROL_FRAME_TYPES``
    the frames' types."""
    defs = build_frames_schema()["$defs"]
    event_names = [ref["$ref"].rsplit("/", 1)[1] for ref in defs["Event"]["oneOf"]]
    stored_fields = set().union(*(_properties(name) for name in event_names))
    client_event = {f.name for f in dataclasses.fields(sdk.Event)} - {"raw"}
    assert client_event == stored_fields
    assert {f.name for f in dataclasses.fields(sdk.Snapshot)} == _properties("Snapshot")
    for model in CONTROL_FRAMES:
        typed = getattr(sdk, model.__name__)
        assert set(typing.get_type_hints(typed)) == _properties(model.__name__), model
    control_types = {defs[m.__name__]["properties"]["type"]["const"] for m in CONTROL_FRAMES}
    assert control_types == sdk.CONTROL_FRAME_TYPES


def test_the_snapshot_is_the_one_the_server_serves() -> None:
    """The frames' ``Snapshot`` has the fields of ``JobState.to_dict`` and of the OpenAPI
    document's ``Snapshot``."""
    from server.config import load_config
    from server.openapi import build_openapi
    from server.snapshot import JobState

    state = JobState("j", None, "queued", 1, "t", "t")
    openapi = build_openapi(load_config(None, environ={}))
    assert _properties("Snapshot") == set(state.to_dict())
    assert _properties("Snapshot") == set(
        openapi["components"]["schemas"]["Snapshot"]["properties"]
    )
