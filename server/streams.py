"""The open streams (WebSocket and SSE): admission under the stream caps, the connection each
one rides on, and how they all end at shutdown.

A stream is counted from the moment it is admitted, synchronously, before its handler's first
await: concurrent handshakes cannot overshoot ``stream.max_subscribers`` or
``stream.max_subscribers_per_job`` (checking a count before an await and adding to it after
would let every handshake in between through).

At shutdown every stream ends at once, not one after another: the hub wakes the parked
cursors, each stream's own task closes its socket (1001 / end of the SSE response), and all
of them share one grace period. A stream still open at its end has a peer that is not taking
what it was sent (a stuck reader, a close never answered): its connection is dropped, which
ends its handler at once. Nothing here awaits a socket, so no client can hold shutdown up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import structlog
from aiohttp import web

from .errors import Overloaded, ShuttingDown
from .limits import JobStreamSlots, JsonErrorRequestHandler
from .tenancy import JobKey

log = structlog.get_logger("jobfeed.stream")


class Droppable(Protocol):
    def drop(self) -> None:
        """Abort the connection at once, without a close handshake."""


async def wait_then_drop(
    members: Collection[Droppable],
    all_ended: asyncio.Event,
    grace: float,
    logger: structlog.stdlib.BoundLogger,
    dropped_event: str,
) -> None:
    """Shutdown's last step for a set of open connections: wait up to ``grace`` seconds for
    ``members`` to empty (their ``release`` sets ``all_ended``), then drop those still open,
    logging ``dropped_event`` with their count."""
    if members:
        try:
            async with asyncio.timeout(grace):
                await all_ended.wait()
        except TimeoutError:
            pass
    if members:
        logger.info(dropped_event, count=len(members), grace=grace)
        for member in list(members):
            member.drop()


class Position(Protocol):
    """A stream's cursor as the lag metric reads it (``follow.Cursor``, ``feed.FeedCursor``):
    the last seq (job) or id (feed) handed to its socket, and whether it is parked at the
    end of the log, where the publisher hands it each commit as it happens."""

    @property
    def after(self) -> int: ...

    @property
    def parked(self) -> bool: ...


@dataclass(slots=True)
class Lag:
    """Subscriber lag of one (transport, kind), sampled at a scrape: streams behind the log,
    events (ids, for a feed) committed but not yet handed to them, in all and at most."""

    behind: int = 0
    events: int = 0
    most: int = 0


class OpenStream:
    """One admitted stream: its job (None for a feed), its connection, its transport
    (``ws``/``sse``), its cursor once it has one, and whether shutdown dropped it."""

    __slots__ = ("cursor", "dropped", "key", "lost", "transport", "transport_name")

    def __init__(
        self, key: JobKey | None, transport: asyncio.Transport | None, transport_name: str = "sse"
    ) -> None:
        self.key = key
        self.transport_name = transport_name
        # Set by the handler once the stream follows the log; read only by the lag metric.
        self.cursor: Position | None = None
        # The asyncio transport itself: aiohttp's protocol forgets it once it starts closing,
        # and a closing transport with a backlog to a peer that never reads lingers forever.
        self.transport = transport
        self.dropped = False  # shutdown aborted the connection: the stream ended by SIGTERM
        self.lost = False  # the connection closed under the stream (see cancel_when_lost)

    @property
    def gone(self) -> str:
        """The outcome of a stream whose connection went away: dropped by shutdown, or left."""
        return "shutdown" if self.dropped else "client_gone"

    def end_lost(self) -> str:
        """After ``cancel_when_lost`` cancelled the stream's task: un-cancel it (an ending,
        not a cancellation from outside) and say how the stream ended."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return self.gone

    def drop(self) -> None:
        """Abort the connection: its peer did not take the stream's end in time."""
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()

    def cancel_when_lost(self, request: web.BaseRequest) -> Callable[[], None]:
        """Cancel the current task as soon as the connection closes (a stream that writes
        nothing while idle would otherwise notice only at its next write, keeping its slot
        until then); returns the function that undoes it. ``lost`` tells the task that the
        cancellation was this. Only on jobfeed's own connection handler (the served app);
        elsewhere the stream notices at its next write."""
        protocol = request.protocol
        if not isinstance(protocol, JsonErrorRequestHandler):
            return _nothing
        task = asyncio.current_task()
        assert task is not None

        def lost() -> None:
            self.lost = True
            task.cancel()

        protocol.on_lost = lost

        def unhook() -> None:
            protocol.on_lost = None

        return unhook


def _nothing() -> None:
    return None


class StreamRegistry:
    """Every open stream, counted against ``max_streams`` in all and ``per_job`` on a job."""

    def __init__(self, max_streams: int, per_job: int) -> None:
        self.max_streams = max_streams
        self._per_job = JobStreamSlots(per_job)
        self._open: set[OpenStream] = set()
        self._all_ended: asyncio.Event | None = None  # made at shutdown

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, request: web.BaseRequest, key: JobKey | None) -> OpenStream:
        """Count a new stream on job ``key`` (None: a feed, which counts only in all) or
        raise ``Overloaded`` (``ShuttingDown`` once shutdown has begun: it would miss the end
        of the others); no await in between."""
        if self._all_ended is not None:
            raise ShuttingDown()
        if len(self._open) >= self.max_streams:
            raise Overloaded(
                f"the server has {self.max_streams} open streams "
                "(stream.max_subscribers); resume later"
            )
        if key is not None and not self._per_job.acquire(key):
            raise Overloaded(
                f"job {key.job_id} has {self._per_job.per_job} open streams "
                "(stream.max_subscribers_per_job); resume later"
            )
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        stream = OpenStream(key, request.transport, "ws" if upgrade else "sse")
        self._open.add(stream)
        return stream

    def lag(
        self, job_head: Callable[[JobKey], int | None], feed_head: int
    ) -> dict[tuple[str, str], Lag]:
        """How far each open stream is behind the log, by (transport, kind), at this moment:
        the job's last committed seq (``job_head``; None when no channel holds it) or the
        last committed id (``feed_head``) minus the stream's position. A stream parked at
        the end of the log is at it. One pass over the open streams, at scrape time only:
        nothing on the append or delivery path moves for it."""
        found: dict[tuple[str, str], Lag] = {}
        for stream in self._open:
            cursor = stream.cursor
            if cursor is None:
                continue
            kind = "feed" if stream.key is None else "job"
            lag = found.setdefault((stream.transport_name, kind), Lag())
            if cursor.parked:
                continue
            head = feed_head if stream.key is None else job_head(stream.key)
            behind = 0 if head is None else head - cursor.after
            if behind > 0:
                lag.behind += 1
                lag.events += behind
                lag.most = max(lag.most, behind)
        return found

    def release(self, stream: OpenStream) -> None:
        if stream not in self._open:
            return
        self._open.remove(stream)
        if stream.key is not None:
            self._per_job.release(stream.key)
        if not self._open and self._all_ended is not None:
            self._all_ended.set()

    async def end_all(self, grace: float) -> None:
        """Shutdown (after the hub has woken every cursor): wait up to ``grace`` seconds for
        the streams to end themselves, then drop the connections of those still open."""
        self._all_ended = asyncio.Event()
        await wait_then_drop(self._open, self._all_ended, grace, log, "streams_dropped")
