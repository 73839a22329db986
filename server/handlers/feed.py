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
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import structlog
from aiohttp import web

from ..auth import PRINCIPAL, READ, TenantGrant, require
from ..errors import BadRequest, InvalidParameter, LogReset, ServiceError, WSClose
from ..feed import (
    ALL_EVENTS,
    FeedClosing,
    FeedCursor,
    FeedFilter,
    FeedPushFn,
    Grant,
    follow_feed,
)
from ..frames import WRITE_PART_BYTES, Frame, control_frame, parts_of
from ..keys import AUTH, CONFIG, HUB, METRICS, STORE, STREAMS
from ..limits import bound_send_buffer
from ..logs import bind_request
from ..streams import OpenStream
from .eventsource import SSE_HEADERS, retry_field
from .guard import StreamGuard, guard_stream
from .request import parse_int
from .sse import end_for_credential, end_response
from .subscription import close_code_for
from .ws import (
    ABNORMAL_CLOSE,
    StreamEnd,
    TaskSender,
    close_socket,
    drop_backlog,
    open_socket,
    push_frames,
    refuse,
    run_stream,
    send_batches,
    send_control_frames,
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


def credential_grant(request: web.Request) -> Grant:
    """The request's credential as the feed's grant (auth.md, feed.md "Authorization"):
    only its tenant's events, of the jobs its grants cover; every event with authentication
    off (everything is tenant ``default``). 403 without ``jobs:read``."""
    principal = require(request, READ)
    if not request.app[AUTH].enabled:
        return ALL_EVENTS
    return TenantGrant(principal)


def parse_filter(request: web.Request, grant: Grant = ALL_EVENTS) -> FeedFilter:
    """The feed's filters from the query string. ``grant`` is the credential's (auth.md):
    the one place where a per-event tenant and job-grant check plugs in."""
    limit = request.app[CONFIG].stream.feed_max_filter_values
    jobs = _values(request, "job", _JOB_ID, limit)
    kinds = _values(request, "kind", None, limit)
    types = _values(request, "type", _TYPE, limit)
    prefixes = [value for value in request.query.getall("prefix", []) if value]
    if len(prefixes) > 1:
        raise InvalidParameter("prefix may be given once")
    prefix = prefixes[0] if prefixes else None
    if prefix is not None and not _PREFIX.match(prefix):
        raise InvalidParameter(f"prefix {prefix[:40]!r} cannot begin any job id")
    return FeedFilter(jobs, prefix, kinds, types, grant)


def _values(
    request: web.Request, name: str, pattern: re.Pattern[str] | None, limit: int
) -> frozenset[str]:
    # An empty value counts as absent, as for every query parameter (docs/protocol.md).
    values = [value for value in request.query.getall(name, []) if value]
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
    it began; for ``snapshots=1``, the unfinished jobs' snapshots at ``last_id``; and the
    log's identity (``epoch``: the database's generation, ``server.generation``)."""

    after: int
    last_id: int
    snapshots: list[bytes]
    epoch: str

    def hello(self) -> bytes:
        return control_frame(
            {"type": "hello", "after": self.after, "last_id": self.last_id, "epoch": self.epoch}
        )


async def start_feed(
    request: web.Request, feed_filter: FeedFilter, raw_after: str | None
) -> FeedStart:
    """Where an admitted feed subscriber starts; raises ``ServiceError`` for any refusal.

    With a position (``after`` or ``Last-Event-ID``) the client has its state already, so
    ``snapshots=1`` only applies to a subscription without one (docs/protocol.md)."""
    app = request.app
    config = app[CONFIG].stream
    feed_channel = app[HUB].feed
    snapshots = request.query.get("snapshots") or "0"
    if snapshots not in ("0", "1"):
        raise InvalidParameter(f"snapshots must be 0 or 1, not {snapshots[:40]!r}")
    epoch = app[STORE].generation.feed_epoch
    if raw_after is not None:
        after = parse_int("after", raw_after)
        last_id = feed_channel.high_water
        check_feed_offset(after, last_id, epoch, request.query.get("epoch") or None)
        return FeedStart(after, last_id, [], epoch)
    if snapshots == "1":
        maximum = config.feed_max_snapshots
        last_id, found = await app[STORE].feed_start(feed_filter, maximum)
        if len(found) > maximum:
            raise InvalidParameter(
                f"more than {maximum} unfinished jobs match (stream.feed_max_snapshots); "
                "narrow the filter"
            )
        return FeedStart(last_id, last_id, found, epoch)
    last_id = feed_channel.high_water
    return FeedStart(last_id, last_id, [], epoch)


def check_feed_offset(after: int, last_id: int, epoch: str, client_epoch: str | None) -> None:
    """Refuse a resume point that is not in the log as it is now (as ``check_offset`` does
    for a job): with the ``epoch`` of an earlier hello, another epoch means another log (a
    restored, wiped or replaced database), and ``after`` past the end in the same epoch means
    the log lost events the client had: both ``LogReset``. Without one, ``after`` past the
    end is a bad parameter."""
    if client_epoch is not None:
        if client_epoch != epoch:
            raise LogReset(
                f"the log is epoch {epoch}, not {client_epoch}: the database was restored "
                "or replaced; start again from after=0 (or from now)"
            )
        if after > last_id:
            raise LogReset(
                f"after={after} is past the end of the log ({last_id}) in the same epoch: "
                "the log lost events you had; start again from after=0"
            )
    if after > last_id:
        raise InvalidParameter(f"after={after} is past the end of the log ({last_id})")


def _follow(
    request: web.Request,
    cursor: FeedCursor,
    feed_filter: FeedFilter,
    push: FeedPushFn | None = None,
) -> AsyncGenerator[list[Frame] | None, None]:
    """The feed cursor with the stream settings (``push``: a WebSocket's direct send)."""
    config = request.app[CONFIG].stream
    return follow_feed(
        request.app[STORE],
        request.app[HUB].feed,
        cursor,
        feed_filter,
        page_events=config.page_events,
        page_bytes=config.page_bytes,
        scan_ids=config.feed_scan_ids,
        idle_seconds=config.heartbeat_seconds,
        push=push,
    )


def _snapshot_frames(snapshots: list[bytes]) -> list[bytes]:
    return [b'{"type":"snapshot","job":%s}' % snapshot for snapshot in snapshots]


# -- WebSocket ------------------------------------------------------------------------------


async def serve_feed_websocket(request: web.Request) -> web.WebSocketResponse:
    """Hello, the snapshots (``snapshots=1``), then the feed's events and heartbeats; the
    stream's ending is a job stream's (``server.handlers.ws``), without the terminal 1000."""
    config = request.app[CONFIG].stream
    ws = await open_socket(request)
    transport = request.transport
    streams = request.app[STREAMS]
    started = time.monotonic()
    metrics = request.app[METRICS]
    metrics.stream_opened("ws", "feed")
    cursor = FeedCursor(0)
    end = StreamEnd()
    after = None
    feed_filter = FeedFilter()
    stream = None
    try:
        feed_filter = parse_filter(request, credential_grant(request))
        bind_request(feed=feed_filter.describe())
        # Counted before the first await, so concurrent handshakes cannot overshoot the cap.
        stream = streams.admit(request, None)
        start = await start_feed(request, feed_filter, request.query.get("after") or None)
        after = cursor.after = start.after
        stream.cursor = cursor  # for the lag metric
        opening = [start.hello(), *_snapshot_frames(start.snapshots)]
        for index in range(0, len(opening), _SNAPSHOT_CHUNK):
            async with asyncio.timeout(config.send_timeout):
                await send_control_frames(request, ws, opening[index : index + _SNAPSHOT_CHUNK])
        batches = _follow(request, cursor, feed_filter, functools.partial(push_frames, request, ws))

        def heartbeat() -> bytes:
            return control_frame({"type": "heartbeat", "last_id": cursor.after})

        sender = TaskSender(send_batches(request, ws, batches, heartbeat, end), end)
        guard = guard_stream(request, request[PRINCIPAL], None)
        await run_stream(request, ws, stream, end, sender, guard)
    except ServiceError as exc:
        end.outcome, end.close_code = "refused", close_code_for(exc)
        metrics.refused(exc.code)
        await refuse(request, ws, end.close_code, exc.code, exc.message)
    except TimeoutError:  # the hello or the snapshots were not taken
        end.outcome, end.close_code = "send_timeout", WSClose.OVERLOADED
        await close_socket(request, ws, WSClose.OVERLOADED, b"send timeout")
    except ConnectionError:
        end.outcome, end.close_code = "client_gone", ws.close_code or ABNORMAL_CLOSE
    except Exception:
        log.exception("stream_failed", last_id=cursor.after)
        end.outcome, end.close_code = "error", WSClose.INTERNAL
        await close_socket(request, ws, WSClose.INTERNAL, b"internal error")
    finally:
        if stream is not None:
            streams.release(stream)
        drop_backlog(transport)
        metrics.stream_closed("ws", "feed", end.outcome or "client_gone")
        log.info(
            "stream_closed",
            transport="ws",
            feed=feed_filter.describe(),
            after=after,
            sent=cursor.sent,
            last_id=cursor.after,
            outcome=end.outcome or "client_gone",
            close_code=end.close_code,
            seconds=round(time.monotonic() - started, 3),
        )
    return ws


# -- Server-Sent Events ---------------------------------------------------------------------


async def serve_feed_sse(request: web.Request) -> web.StreamResponse:
    """SSE: ``retry:``, ``event: hello`` (its ``id:`` is ``after``, so that a browser that
    started "from now" resumes from there), snapshots, then unnamed event records whose
    ``id:`` is the event id, and ``event: heartbeat`` records whose ``id:`` is the scanned
    position. A feed never ends by itself; shutdown ends the response (the browser retries).
    """
    feed_filter = parse_filter(request, credential_grant(request))
    bind_request(feed=feed_filter.describe())
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or None
    streams = request.app[STREAMS]
    stream = streams.admit(request, None)  # before the first await: the cap holds
    try:
        start = await start_feed(request, feed_filter, raw_after)
        guard = guard_stream(request, request[PRINCIPAL], None)
        return await _feed_sse(request, stream, feed_filter, start, guard)
    finally:
        streams.release(stream)


async def _feed_sse(
    request: web.Request,
    stream: OpenStream,
    feed_filter: FeedFilter,
    start: FeedStart,
    guard: StreamGuard | None,
) -> web.StreamResponse:
    config = request.app[CONFIG].stream
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    # From here on every ending is the end of the body or a dropped connection.
    bound_send_buffer(request, config.send_buffer_bytes)
    cursor = FeedCursor(start.after)
    stream.cursor = cursor  # for the lag metric
    started = time.monotonic()
    outcome = "client_gone"
    metrics = request.app[METRICS]
    metrics.stream_opened("sse", "feed")
    unhook = stream.cancel_when_lost(request)  # an idle feed notices a closed client at once
    # Within the credential's lifetime (with authentication on); then `event: error`.
    lifetime = guard if guard is not None else contextlib.nullcontext()
    try:
        try:
            async with lifetime:
                await _send_feed_sse(request, response, cursor, feed_filter, start)
        except FeedClosing:
            outcome = "shutdown"
            await end_response(request, response, config.send_timeout)
        except TimeoutError:
            if guard is not None and guard.fired():
                outcome = await end_for_credential(request, response, guard)
            else:
                outcome = "send_timeout"  # the peer stopped reading: drop it; resumes by id
                if request.transport is not None:
                    request.transport.abort()
        except ConnectionError:
            outcome = stream.gone
        except Exception:
            log.exception("stream_failed", last_id=cursor.after)
            outcome = "error"
            if request.transport is not None:
                request.transport.abort()  # no terminating chunk: the client sees a cut
    except asyncio.CancelledError:
        if not stream.lost:
            raise
        outcome = stream.end_lost()  # the connection closed under an idle stream
    finally:
        unhook()
        metrics.stream_closed("sse", "feed", outcome)
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


async def _send_feed_sse(
    request: web.Request,
    response: web.StreamResponse,
    cursor: FeedCursor,
    feed_filter: FeedFilter,
    start: FeedStart,
) -> None:
    """Hello, the snapshots, then the feed's events and heartbeats, until the feed ends."""
    config = request.app[CONFIG].stream
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
    batches = _follow(request, cursor, feed_filter)
    async for batch in batches:
        async with asyncio.timeout(config.send_timeout):
            if batch is None:
                beat = control_frame({"type": "heartbeat", "last_id": cursor.after})
                await response.write(
                    b"event: heartbeat\nid: %d\ndata: %s\n\n" % (cursor.after, beat)
                )
                continue
            for part in parts_of(batch, WRITE_PART_BYTES):
                await response.write(b"".join(frame.feed_sse for frame in part))
