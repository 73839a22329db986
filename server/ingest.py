"""The open producer streams (``GET /v1/ingest``): admission under ``ingest.max_connections``
and how they all end at shutdown.

At shutdown every producer stream stops reading at once; each answers what it has already
read (the writer commits it: the writer stops only after every handler has ended) and closes
with 1001. They share one grace period, as the subscribers' streams do (``server.streams``);
a connection still open after it is dropped, so that a producer that does not take its
answers cannot hold shutdown up.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from .errors import Overloaded, ShuttingDown
from .streams import wait_then_drop

log = structlog.get_logger("jobfeed.ingest")


class IngestSlot:
    """One admitted producer stream: its connection, and how to make it stop reading.

    The handler's task reads the socket; ``stop`` cancels it only while it is ``parked``
    (waiting for a frame or for room in its window), never while it hands a request to the
    writer, so a request is either read and submitted, or not read at all."""

    __slots__ = ("dropped", "parked", "reader", "stopped", "transport")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.reader = asyncio.current_task()
        self.parked = False
        self.stopped: str | None = None  # why reading stopped: "shutdown", "send_timeout", ...
        self.dropped = False

    def stop(self, reason: str) -> None:
        """Read no more requests; the ones read are still answered."""
        if self.stopped is not None:
            return
        self.stopped = reason
        if self.parked and self.reader is not None:
            self.reader.cancel()

    def drop(self) -> None:
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()


class IngestRegistry:
    """Every open producer stream, counted against ``max_connections``."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._open: set[IngestSlot] = set()
        self._all_ended: asyncio.Event | None = None  # made at shutdown

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, request: web.BaseRequest) -> IngestSlot:
        """Count a new producer stream or raise ``Overloaded`` (``ShuttingDown`` once
        shutdown has begun); no await in between."""
        if self._all_ended is not None:
            raise ShuttingDown()
        if len(self._open) >= self.max_connections:
            raise Overloaded(
                f"the server has {self.max_connections} open producer streams "
                "(ingest.max_connections); retry later or use HTTP"
            )
        slot = IngestSlot(request.transport)
        self._open.add(slot)
        return slot

    def release(self, slot: IngestSlot) -> None:
        if slot not in self._open:
            return
        self._open.remove(slot)
        if not self._open and self._all_ended is not None:
            self._all_ended.set()

    async def end_all(self, grace: float) -> None:
        """Shutdown: tell every stream to stop reading, wait up to ``grace`` seconds for them
        to answer what they read and close, then drop the connections of those still open."""
        self._all_ended = asyncio.Event()
        for slot in list(self._open):
            slot.stop("shutdown")
        await wait_then_drop(self._open, self._all_ended, grace, log, "ingest_dropped")
