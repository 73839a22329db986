"""``GET /v1/feed``: the events of many jobs on one cursor, over WebSocket (Upgrade) or
Server-Sent Events (``Accept: text/event-stream``); thin loops over ``server.feed``.

Both transports admit a subscriber the same way (``start_feed``): under
``stream.max_subscribers`` (feed subscribers count with job streams), from ``after`` (absent:
from now), or from the position of a ``snapshots=1`` read. Every refusal is a
``ServiceError``: SSE answers it as HTTP (a retryable one as a 200 error record), the
WebSocket as an error frame and a close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from dataclasses import dataclass

import structlog
from aiohttp import WSMsgType, web

from ..errors import (
    BadRequest,
    InvalidParameter,
    Overloaded,
    ServiceError,
    ShuttingDown,
    WSClose,
)
from ..feed import ALL_EVENTS, FeedClosing, FeedCursor, FeedFilter, Grant, follow_feed
from ..frames import control_frame
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..limits import bound_send_buffer
from ..logs import bind_request
from .eventsource import SSE_HEADERS, retry_field
from .request import parse_int
from .ws import (
    _CLOSING_STUCK,
    _close_stuck,
    _push,
    _receive_until_closed,
    _refuse,
    _write_batch,
)

log = structlog.get_logger("jobfeed.stream")

# What a job id and an event type may be (protocol v1); a filter value that cannot match
# anything is a mistake worth a 400, not an empty feed.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_VALUE_MAX = 200  # longer than any job id (128), kind (128) or type (64)
_SNAPSHOT_CHUNK = 100  # snapshot frames written per send


async def feed(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await serve_feed_websocket(request)
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await serve_feed_sse(request)
    raise BadRequest("a feed needs a WebSocket upgrade or an 'Accept: text/event-stream' header")


def parse_filter(request: web.Request, grant: Grant = ALL_EVENTS) -> FeedFilter:
    """The feed's filters from the query string. ``grant`` is the credential's (auth.md):
    the one place where a per-event tenant and job-grant check plugs in."""
    limit = request.app[CONFIG].stream.feed_max_filter_values
    jobs = _values(request, "job", _JOB_ID, limit)
    kinds = _values(request, "kind", None, limit)
    types = _values(request, "type", _TYPE, limit)
    prefixes = request.query.getall("prefix", [])
    if len(prefixes) > 1:
        raise InvalidParameter("prefix may be given once")
    prefix = prefixes[0] if prefixes else None
    if prefix is not None and not _PREFIX.match(prefix):
        raise InvalidParameter(f"prefix {prefix[:40]!r} cannot begin any job id")
    return FeedFilter(jobs, prefix, kinds, types, grant)


def _values(
    request: web.Request, name: str, pattern: re.Pattern[str] | None, limit: int
) -> frozenset[str]:
    values = request.query.getall(name, [])
    if len(values) > limit:
        raise InvalidParameter(
            f"{name} is given {len(values)} times; at most {limit} (stream.feed_max_filter_values)"
        )
    for value in values:
        bad = not value or len(value) > _VALUE_MAX
        if bad or (pattern is not None and not pattern.match(value)):
            raise InvalidParameter(f"{name}={value[:40]!r} cannot match any {name}")
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class FeedStart:
    """Where an admitted feed subscriber starts: ``after``; the log's end (``last_id``) when
    it began; and, for ``snapshots=1``, the unfinished jobs' snapshots at ``last_id``."""

    after: int
    last_id: int
    snapshots: list[bytes]

    def hello(self) -> bytes:
        return control_frame({"type": "hello", "after": self.after, "last_id": self.last_id})


async def start_feed(
    request: web.Request, feed_filter: FeedFilter, raw_after: str | None
) -> FeedStart:
    """Admit a feed subscriber; raises ``ServiceError`` for any refusal.

    With a position (``after`` or ``Last-Event-ID``) the client has its state already, so
    ``snapshots=1`` only applies to a subscription without one (docs/protocol.md)."""
    app = request.app
    config = app[CONFIG].stream
    feed_channel = app[HUB].feed
    if feed_channel.closing:
        raise ShuttingDown()
    if len(app[STREAMS]) >= config.max_subscribers:
        raise Overloaded(
            f"the server has {config.max_subscribers} open streams "
            "(stream.max_subscribers); resume later"
        )
    snapshots = request.query.get("snapshots", "0")
    if snapshots not in ("0", "1"):
        raise InvalidParameter(f"snapshots must be 0 or 1, not {snapshots[:40]!r}")
    if raw_after is not None:
        after = parse_int("after", raw_after)
        last_id = feed_channel.high_water
        if after > last_id:
            raise InvalidParameter(f"after={after} is past the end of the log ({last_id})")
        return FeedStart(after, last_id, [])
    if snapshots == "1":
        maximum = config.feed_max_snapshots
        last_id, found = await app[STORE].feed_start(feed_filter, maximum)
        if len(found) > maximum:
            raise InvalidParameter(
                f"more than {maximum} unfinished jobs match (stream.feed_max_snapshots); "
                "narrow the filter"
            )
        return FeedStart(last_id, last_id, found)
    last_id = feed_channel.high_water
    return FeedStart(last_id, last_id, [])


def _snapshot_frames(snapshots: list[bytes]) -> list[bytes]:
    return [b'{"type":"snapshot","job":%s}' % snapshot for snapshot in snapshots]


# -- WebSocket ------------------------------------------------------------------------------

_CLOSE_CODES = {
    "shutdown": WSClose.GOING_AWAY,
    "send_timeout": WSClose.OVERLOADED,
    "error": WSClose.INTERNAL,
}


def _close_code_for(error: ServiceError) -> int:
    if isinstance(error, Overloaded):
        return WSClose.OVERLOADED
    if isinstance(error, ShuttingDown):
        return WSClose.GOING_AWAY
    return WSClose.BAD_REQUEST


async def serve_feed_websocket(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG].stream
    ws = web.WebSocketResponse(
        heartbeat=config.ping_seconds,
        max_msg_size=config.max_client_frame_bytes + 1,
        compress=False,
    )
    await ws.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    started = time.monotonic()
    cursor = FeedCursor(0)
    outcome = "client_gone"
    closed_with: int | None = None
    after = None
    feed_filter = FeedFilter()
    try:
        feed_filter = parse_filter(request)
        bind_request(feed=feed_filter.describe())
        start = await start_feed(request, feed_filter, request.query.get("after") or None)
        after = cursor.after = start.after
        request.app[STREAMS].add(ws)
        async with asyncio.timeout(config.send_timeout):
            await ws.send_frame(start.hello(), WSMsgType.TEXT)
            for frame in _snapshot_frames(start.snapshots):
                await ws.send_frame(frame, WSMsgType.TEXT)
        sender = asyncio.create_task(_send_feed(request, ws, cursor, feed_filter))
        try:
            await _receive_until_closed(ws, config.client_frames_per_second)
        finally:
            if not sender.done() and ws not in _CLOSING_STUCK:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                outcome = await sender
    except ServiceError as exc:
        outcome = "refused"
        closed_with = _close_code_for(exc)
        await _refuse(ws, closed_with, exc.code, exc.message)
    except TimeoutError:
        outcome = "send_timeout"
        await _close_stuck(request, ws)
    except ConnectionError:
        outcome = "client_gone"
    finally:
        request.app[STREAMS].discard(ws)
        log.info(
            "stream_closed",
            transport="ws",
            feed=feed_filter.describe(),
            after=after,
            sent=cursor.sent,
            last_id=cursor.after,
            outcome=outcome,
            close_code=closed_with or _CLOSE_CODES.get(outcome, ws.close_code),
            seconds=round(time.monotonic() - started, 3),
        )
    return ws


async def _send_feed(
    request: web.Request, ws: web.WebSocketResponse, cursor: FeedCursor, feed_filter: FeedFilter
) -> str:
    """Run the feed cursor until the stream is closed; return how it ended."""
    config = request.app[CONFIG].stream
    batches = follow_feed(
        request.app[STORE],
        request.app[HUB].feed,
        cursor,
        feed_filter,
        page_events=config.page_events,
        scan_ids=config.feed_scan_ids,
        idle_seconds=config.heartbeat_seconds,
        push=functools.partial(_push, request, ws),
    )
    try:
        async for batch in batches:
            async with asyncio.timeout(config.send_timeout):
                if batch is None:
                    heartbeat = control_frame({"type": "heartbeat", "last_id": cursor.after})
                    await ws.send_frame(heartbeat, WSMsgType.TEXT)
                    continue
                await _write_batch(request, ws, batch)
        raise AssertionError("the feed ended by itself")  # follow_feed never returns
    except FeedClosing:
        await ws.close(code=WSClose.GOING_AWAY, message=b"server shutting down")
        return "shutdown"
    except TimeoutError:
        await _close_stuck(request, ws)
        return "send_timeout"
    except ConnectionError:
        return "client_gone"
    except Exception:
        log.exception("stream_failed", feed=feed_filter.describe(), last_id=cursor.after)
        with contextlib.suppress(Exception):
            await ws.close(code=WSClose.INTERNAL, message=b"internal error")
        return "error"


# -- Server-Sent Events ---------------------------------------------------------------------


async def serve_feed_sse(request: web.Request) -> web.StreamResponse:
    """SSE: ``retry:``, ``event: hello`` (its ``id:`` is ``after``, so that a browser that
    started "from now" resumes from there), snapshots, then unnamed event records whose
    ``id:`` is the event id, and ``event: heartbeat`` records whose ``id:`` is the scanned
    position. A feed never ends by itself; shutdown ends the response (the browser retries).
    """
    config = request.app[CONFIG].stream
    feed_filter = parse_filter(request)
    bind_request(feed=feed_filter.describe())
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or None
    start = await start_feed(request, feed_filter, raw_after)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    request.app[STREAMS].add(response)
    cursor = FeedCursor(start.after)
    started = time.monotonic()
    outcome = "client_gone"
    try:
        async with asyncio.timeout(config.send_timeout):
            await response.write(
                retry_field(config.sse_retry_ms)
                + b"event: hello\nid: %d\ndata: %s\n\n" % (start.after, start.hello())
            )
        snapshots = _snapshot_frames(start.snapshots)
        for index in range(0, len(snapshots), _SNAPSHOT_CHUNK):
            chunk = snapshots[index : index + _SNAPSHOT_CHUNK]
            async with asyncio.timeout(config.send_timeout):
                await response.write(b"".join(b"event: snapshot\ndata: %s\n\n" % s for s in chunk))
        batches = follow_feed(
            request.app[STORE],
            request.app[HUB].feed,
            cursor,
            feed_filter,
            page_events=config.page_events,
            scan_ids=config.feed_scan_ids,
            idle_seconds=config.heartbeat_seconds,
        )
        async for batch in batches:
            if batch is None:
                beat = control_frame({"type": "heartbeat", "last_id": cursor.after})
                payload = b"event: heartbeat\nid: %d\ndata: %s\n\n" % (cursor.after, beat)
            else:
                payload = b"".join(frame.feed_sse for frame in batch)
            async with asyncio.timeout(config.send_timeout):
                await response.write(payload)
    except FeedClosing:
        outcome = "shutdown"
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    except TimeoutError:
        outcome = "send_timeout"
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        outcome = "client_gone"
    finally:
        request.app[STREAMS].discard(response)
        log.info(
            "stream_closed",
            transport="sse",
            feed=feed_filter.describe(),
            after=start.after,
            sent=cursor.sent,
            last_id=cursor.after,
            outcome=outcome,
            seconds=round(time.monotonic() - started, 3),
        )
    return response
