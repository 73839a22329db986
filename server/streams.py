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
from collections.abc import Callable

import structlog
from aiohttp import web

from .errors import Overloaded, ShuttingDown
from .limits import JobStreamSlots, JsonErrorRequestHandler
from .tenancy import JobKey

log = structlog.get_logger("jobfeed.stream")


class OpenStream:
    """One admitted stream: its job (None for a feed), its connection, and whether shutdown
    dropped it."""

    __slots__ = ("dropped", "key", "lost", "transport")

    def __init__(self, key: JobKey | None, transport: asyncio.Transport | None) -> None:
        self.key = key
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
        stream = OpenStream(key, request.transport)
        self._open.add(stream)
        return stream

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
        if self._open:
            try:
                async with asyncio.timeout(grace):
                    await self._all_ended.wait()
            except TimeoutError:
                pass
        if self._open:
            log.info("streams_dropped", count=len(self._open), grace=grace)
            for stream in list(self._open):
                stream.drop()
