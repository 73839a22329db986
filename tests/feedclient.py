"""Reading jobfeed's feed the way a client does (WebSocket and SSE), and the ground truth
to compare with: every job's log merged by event id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.streams import SseComment, SseParser

WAIT = 20.0  # bound on any one wait; a healthy server answers in milliseconds


@dataclass
class FeedLog:
    """What one feed subscription (one connection) received."""

    transport: str
    hello: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[int] = field(default_factory=list)  # their last_id
    errors: list[dict[str, Any]] = field(default_factory=list)
    position: int = 0  # what a client resumes from: the last event id or heartbeat last_id
    close_code: int | None = None
    status: int | None = None
    retry: int | None = None

    @property
    def ids(self) -> list[int]:
        return [event["id"] for event in self.events]

    def take(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if "seq" in payload:
            assert self.hello is not None, f"event before hello: {payload!r}"
            assert payload["id"] > self.position, f"id {payload['id']} after {self.position}"
            self.events.append(payload)
            self.position = payload["id"]
        elif kind == "hello":
            assert self.hello is None, f"a second hello: {payload!r}"
            self.hello = payload
            self.position = payload["after"]
        elif kind == "heartbeat":
            assert payload["last_id"] >= self.position, payload
            self.heartbeats.append(payload["last_id"])
            self.position = payload["last_id"]
        elif kind == "snapshot":
            self.snapshots.append(payload["job"])
        elif kind == "error":
            self.errors.append(payload)
        else:
            raise AssertionError(f"unexpected frame: {payload!r}")


def feed_url(base: str, after: int | None = None, **filters: Any) -> str:
    """``base``/v1/feed with ``after`` and filters (a list value repeats the parameter)."""
    params: list[tuple[str, str]] = []
    if after is not None:
        params.append(("after", str(after)))
    for name, value in filters.items():
        values = value if isinstance(value, list | tuple) else [value]
        params.extend((name, str(v)) for v in values)
    query = "&".join(f"{k}={v}" for k, v in params)
    return f"{base}/v1/feed" + (f"?{query}" if query else "")


Stop = Callable[["FeedLog"], bool]


async def read_feed_ws(
    session: aiohttp.ClientSession,
    url: str,
    *,
    until_id: int | None = None,
    count: int | None = None,
    stop: Stop | None = None,
) -> FeedLog:
    """Read a WebSocket feed until an event or heartbeat reaches ``until_id``, ``count``
    events arrived, ``stop`` says so, or the server closes."""
    log = FeedLog("ws", status=101)
    async with session.ws_connect(url) as ws:
        while not _done(log, until_id, count, stop):
            async with asyncio.timeout(WAIT):
                message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                log.close_code = ws.close_code
                return log
            assert message.type == aiohttp.WSMsgType.TEXT, message
            log.take(json.loads(message.data))
    return log


async def read_feed_sse(
    session: aiohttp.ClientSession,
    url: str,
    *,
    last_event_id: int | None = None,
    until_id: int | None = None,
    count: int | None = None,
    stop: Stop | None = None,
) -> FeedLog:
    """Read an SSE feed as ``EventSource`` would; the position is the last ``id:`` field."""
    log = FeedLog("sse")
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with session.get(url, headers=headers) as response:
        log.status = response.status
        if response.status != 200 or response.content_type != "text/event-stream":
            if response.content_type == "application/json":
                log.errors.append(await response.json())
            return log
        parser = SseParser()
        while not _done(log, until_id, count, stop):
            async with asyncio.timeout(WAIT):
                raw = await response.content.readline()
            if not raw:
                return log
            line = raw.decode().rstrip("\r\n")
            if line.startswith("retry:"):
                log.retry = int(line.partition(":")[2])
                continue
            item = parser.feed_line(line)
            if item is None or isinstance(item, SseComment):
                continue
            payload = item.json()
            if "seq" in payload:
                assert item.event is None, f"a named event record: {item!r}"
                assert item.id == str(payload["id"]), item
            elif payload["type"] == "heartbeat":
                assert item.event == "heartbeat"
                assert item.id == str(payload["last_id"]), item
            elif payload["type"] == "hello":
                assert item.event == "hello"
                assert item.id == str(payload["after"]), item
            else:
                assert item.event == payload["type"], item
            log.take(payload)
    return log


def _done(log: FeedLog, until_id: int | None, count: int | None, stop: Stop | None) -> bool:
    if log.hello is None:
        return False
    if count is not None and len(log.events) >= count:
        return True
    if stop is not None and stop(log):
        return True
    return until_id is not None and log.position >= until_id


async def job_log(session: aiohttp.ClientSession, base: str, job_id: str) -> list[dict[str, Any]]:
    async with session.get(
        f"{base}/v1/jobs/{job_id}/events", headers={"Accept": "application/x-ndjson"}
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.text()
    return [json.loads(line) for line in body.splitlines()]


async def ground_truth(
    session: aiohttp.ClientSession, base: str, job_ids: Iterable[str]
) -> list[dict[str, Any]]:
    """Every event of ``job_ids``, merged from the per-job logs by event id."""
    merged = [event for job_id in job_ids for event in await job_log(session, base, job_id)]
    merged.sort(key=lambda event: event["id"])
    return merged


def selected(
    events: list[dict[str, Any]],
    kinds_by_job: dict[str, str | None],
    *,
    job: list[str] | None = None,
    prefix: str | None = None,
    kind: list[str] | None = None,
    type: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The events a filter selects, by the spec's words (AND between filters, OR within)."""
    out = []
    for event in events:
        if job is not None and event["job_id"] not in job:
            continue
        if prefix is not None and not event["job_id"].startswith(prefix):
            continue
        if kind is not None and kinds_by_job[event["job_id"]] not in kind:
            continue
        if type is not None and event["type"] not in type:
            continue
        out.append(event)
    return out
