"""``AsyncJob``: reports one job's progress, logs and events, and finishes it.

What it guarantees (at-least-once delivery with idempotency keys, so effectively once):
- Every event gets a key, ``{run}.{n}``: ``n`` counts the calls made on this reporter and
  ``run`` is random per reporter unless you pass ``run_key``. A retry after a lost answer is
  therefore never a duplicate. Re-running the same sequence of calls with the same
  ``run_key`` (a worker restarted from the top) skips what the first run stored; pass
  ``key=`` on a call to key it by your own checkpoint instead. (Progress updates merge by
  timing: a re-run may append one the first run had merged away, showing an older value
  until it reports past where the first run stopped; docs/python-client.md.)
- Events reach the server in the order they were reported: one request in flight at a time,
  each a batch of everything buffered (up to the server's batch limits), one per
  ``flush_interval``.
- Progress updates are coalesced (see ``outbox``); log lines, custom events, phase changes
  and terminal events are never dropped or reordered.
- Failures the protocol calls retryable (no answer, 408, 429, 5xx) are retried forever with
  exponential backoff and full jitter, at least ``Retry-After`` apart. Meanwhile events wait
  in a buffer of ``max_buffered``; when it is full, a call blocks until there is room
  (``when_full="block"``, the default) or raises ``BufferFull`` (``"raise"``). Nothing is
  ever dropped silently.
- A refusal that retrying cannot fix (422, 409 ``job_finished``, 404) stops the reporter; the
  next call, and leaving the block, raise ``ReporterError`` from it, with the unsent count.
- Leaving the block waits until everything is acknowledged, at most ``close_timeout``
  seconds (None: as long as it takes), else raises ``FlushTimeout``.

The transport is one method, ``_deliver``: the client's producer stream (``GET /v1/ingest``,
one WebSocket shared by the client's reporters, ``ingest.py``) when the server has one, HTTP
``POST .../events`` otherwise. Over the stream, a batch left unanswered by a dropped
connection is sent again as it was on the next one, as a lost HTTP answer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sized,
)
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote

from .backoff import Backoff
from .errors import (
    BufferFull,
    FlushTimeout,
    JobExists,
    ReporterError,
    Unavailable,
)
from .ingest import CredentialRenewed, IngestUnsupported
from .outbox import Outbox

if TYPE_CHECKING:
    from .client import AsyncClient

T = TypeVar("T")
LEVELS = frozenset({"debug", "info", "warning", "error"})
# The protocol's rules for names, checked here so that a typo fails at the call, not later
# as a refused batch that stops the reporter.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CUSTOM_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
RESERVED_TYPES = frozenset(
    {"created", "progress", "log", "completed", "failed", "cancelled"}
    | {"hello", "heartbeat", "ping", "pong", "error"}
)
# Under the server's defaults (limits.max_batch_events 1000, limits.max_body_bytes 1 MiB),
# with room for the envelope.
BATCH_EVENTS = 500
BATCH_BYTES = 512 * 1024
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True, slots=True)
class ReporterSettings:
    flush_interval: float = 0.25
    max_buffered: int = 10_000
    when_full: Literal["block", "raise"] = "block"
    close_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.flush_interval < 0:
            raise ValueError("flush_interval must be >= 0")
        if self.max_buffered < 1:
            raise ValueError("max_buffered must be >= 1")
        if self.when_full not in ("block", "raise"):
            raise ValueError('when_full must be "block" or "raise"')


@dataclass(slots=True)
class ReporterStats:
    """What the reporter did, for logs and tests."""

    requests: int = 0  # append requests that were acknowledged
    retries: int = 0  # attempts that failed and were retried
    events: int = 0  # events acknowledged (duplicates included)
    duplicates: int = 0  # events the server already had (a retry or a re-run)
    merged: int = 0  # progress updates folded into a later one before sending
    last_seq: int = 0  # the job's last seq after the latest acknowledged request


class AsyncJob:
    """A reporter for one job; see the module docstring for its guarantees."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str | None,
        *,
        kind: str | None,
        metadata: dict[str, Any] | None,
        run_key: str | None,
        settings: ReporterSettings,
    ) -> None:
        if job_id is not None and not JOB_ID_RE.match(job_id):
            raise ValueError(f"job_id {job_id!r} does not match {JOB_ID_RE.pattern}")
        self._client = client
        self.job_id = job_id or new_job_id()
        self.kind = kind
        self.metadata = metadata
        self.run_key = run_key or secrets.token_hex(6)
        self.settings = settings
        self.stats = ReporterStats()
        self.created: bool | None = None  # True: we created it; False: it existed
        self._outbox = Outbox()
        self._calls = 0
        self._phase: str | None = None
        self._current: int | None = None
        self._total: int | None = None
        self._finished = False  # a terminal event was reported
        # Why the flusher stopped: a refusal (ServerError), or a bug, raised to the caller.
        self._failure: Exception | None = None
        self._changed = asyncio.Event()  # something was added, or closing began
        self._room = asyncio.Event()  # an acknowledgement freed buffer room
        # The job exists, the buffer is empty and nothing is in flight. Unset until the job
        # was created, so that flush() also waits for the creation.
        self._drained = asyncio.Event()
        self._urgent = False  # a terminal event is waiting: skip the next pause
        self._flush_waiters = 0  # flush() calls waiting: no pauses until they return
        self._flusher: asyncio.Task[None] | None = None

    # -- the block -----------------------------------------------------------------

    async def __aenter__(self) -> AsyncJob:
        if self._flusher is not None:
            raise RuntimeError("a reporter is entered once")
        self._flusher = asyncio.get_running_loop().create_task(
            self._run(), name=f"jobfeed-reporter-{self.job_id}"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._finished and self._failure is None:
                if exc is None:
                    await self.complete()
                elif isinstance(exc, Exception):
                    await self.fail(str(exc) or type(exc).__name__, code=type(exc).__name__)
                else:  # KeyboardInterrupt, SystemExit, task cancellation
                    await self.cancel(f"interrupted ({type(exc).__name__})")
            await self.flush(self.settings.close_timeout)
        finally:
            await self._stop()

    # -- reporting -----------------------------------------------------------------

    async def progress(
        self,
        current: int | None = None,
        total: int | None = None,
        *,
        percent: float | None = None,
        fraction: float | None = None,
        phase: str | None = None,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        """Report progress as counts (``current`` of ``total``), as ``percent=`` (0-100) or as
        ``fraction=`` (0-1); never guessed from the number's size. ``phase`` and ``message``
        may come alone. Coalesced with other updates of the same phase until sent."""
        fields = self._progress_fields(current, total, percent, fraction, phase, message, data)
        # Every call takes its ordinal, merged or not, so that keys do not depend on timing:
        # a re-run with the same run_key gives call n the same key.
        own_key = key or self._next_key()
        phase_changes = phase is not None and phase != self._phase
        if key is None and self._outbox.can_merge(fields, phase_changes):
            self._check_open()
        else:
            await self._reserve()
            phase_changes = True  # its own item: with its own key, never merged into another
        self._outbox.add_progress(own_key, fields, phase_changes=phase_changes)
        self._remember_progress(fields)
        self._wake()

    async def log(
        self,
        message: str,
        *,
        level: str = "info",
        data: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        """A log line (``level`` one of debug, info, warning, error); never dropped."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {sorted(LEVELS)}, not {level!r}")
        await self._add({"type": "log", "message": message, "level": level, "data": data}, key)

    async def event(
        self,
        type: str,
        *,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        """A custom event (e.g. ``"artifact.uploaded"``): any type name matching
        ``^[a-z][a-z0-9_.-]{0,63}$`` that is not one of the protocol's own."""
        if not CUSTOM_TYPE_RE.match(type) or type in RESERVED_TYPES:
            raise ValueError(
                f"a custom event type matches {CUSTOM_TYPE_RE.pattern} and is not one of "
                f"{sorted(RESERVED_TYPES)}; got {type!r} (use progress(), log(), complete(), "
                "fail() or cancel() for the protocol's own)"
            )
        await self._add({"type": type, "message": message, "data": data}, key)

    async def complete(
        self,
        result: Any = None,
        *,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Finish the job as ``completed`` (leaving the block does this for you)."""
        await self._add({"type": "completed", "result": result, "message": message, "data": data})
        self._finished = True

    async def fail(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Finish the job as ``failed`` (an exception leaving the block does this)."""
        error = {"message": message, "code": code, "details": details}
        await self._add({"type": "failed", "error": _without_none(error), "data": data})
        self._finished = True

    async def cancel(
        self, reason: str | None = None, *, data: Mapping[str, Any] | None = None
    ) -> None:
        """Finish the job as ``cancelled``."""
        await self._add({"type": "cancelled", "reason": reason, "data": data})
        self._finished = True

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event reported so far is acknowledged. Raises ``FlushTimeout``
        after ``timeout`` seconds (events stay buffered), or the reporter's failure."""
        self._flush_waiters += 1
        self._wake()
        try:
            async with asyncio.timeout(timeout):
                while not self._drained.is_set() and self._failure is None:
                    if self._flusher is None or self._flusher.done():
                        raise ReporterError(
                            f"job {self.job_id}: the reporter is stopped with "
                            f"{len(self._outbox)} events unsent",
                            unsent=len(self._outbox),
                        )
                    await _first(self._drained.wait(), self._flusher_done())
        except TimeoutError:
            raise FlushTimeout(
                f"job {self.job_id}: {len(self._outbox)} events not acknowledged after "
                f"{timeout} s (the server is unreachable or refusing); none were dropped",
                unsent=len(self._outbox),
            ) from None
        finally:
            self._flush_waiters -= 1
        self._raise_failure()

    @property
    def unsent(self) -> int:
        """Events reported but not acknowledged yet."""
        return len(self._outbox)

    async def track(
        self,
        items: Iterable[T] | AsyncIterable[T],
        *,
        total: int | None = None,
        phase: str | None = None,
        min_interval: float = 0.1,
    ) -> AsyncIterator[T]:
        """Yield ``items`` (an iterable or an async iterable) and report ``current``/
        ``total`` as they are consumed (``total`` from ``len(items)`` when it has one): at
        most every ``min_interval`` seconds, and always the final count (see ``track``)."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        if total is not None or phase is not None:
            await self.progress(0, total, phase=phase)
        done = 0
        reported_at = time.monotonic()
        iterator = _aiter(items)
        async for item in iterator:
            yield item
            done += 1
            now = time.monotonic()
            if now - reported_at >= min_interval:
                await self.progress(done, total)
                reported_at = now
        await self.progress(done, total)

    # -- internals ---------------------------------------------------------------------

    def _progress_fields(
        self,
        current: int | None,
        total: int | None,
        percent: float | None,
        fraction: float | None,
        phase: str | None,
        message: str | None,
        data: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        given = [
            name
            for name, v in (
                ("counts", current if current is not None else total),
                ("percent", percent),
                ("fraction", fraction),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give progress as one of counts, percent= or fraction=, not {given}")
        for name, count in (("current", current), ("total", total)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
                raise TypeError(f"{name} must be an int, not {type(count).__name__}")
            if count is not None and count < 0:
                raise ValueError(f"{name} must be >= 0, not {count}")
        effective_current = current if current is not None else self._current
        effective_total = total if total is not None else self._total
        if (current is not None or total is not None) and (
            effective_current is not None
            and effective_total is not None
            and effective_current > effective_total
        ):
            raise ValueError(f"current {effective_current} exceeds total {effective_total}")
        if fraction is not None:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"fraction must be within 0..1, not {fraction}")
            percent = 100.0 * fraction
        if percent is not None and not 0.0 <= percent <= 100.0:
            raise ValueError(f"percent must be within 0..100, not {percent}")
        fields = _without_none(
            {
                "progress": None if percent is None else float(percent),
                "phase": phase,
                "message": message,
                "current": current,
                "total": total,
                "data": None if data is None else dict(data),
            }
        )
        if not fields:
            raise ValueError(
                "progress() needs counts, percent=, fraction=, phase=, message= or data="
            )
        return fields

    def _remember_progress(self, fields: dict[str, Any]) -> None:
        self._phase = fields.get("phase", self._phase)
        self._current = fields.get("current", self._current)
        self._total = fields.get("total", self._total)

    async def _add(self, fields: dict[str, Any], key: str | None = None) -> None:
        own_key = key or self._next_key()
        terminal = fields["type"] in ("completed", "failed", "cancelled")
        await self._reserve(terminal)
        body = _without_none(fields)
        body["key"] = own_key
        self._outbox.add(body)
        self._wake(urgent=terminal)

    def _next_key(self) -> str:
        self._calls += 1
        return f"{self.run_key}.{self._calls}"

    def _check_open(self) -> None:
        self._raise_failure()
        if self._finished:
            raise ReporterError(f"job {self.job_id} was already finished by this reporter", 0)
        if self._flusher is None:
            raise RuntimeError("use the reporter as `async with client.job(...) as job:`")

    async def _reserve(self, terminal: bool = False) -> None:
        """Return once the buffer has room for one more event (or raise, by policy). The
        terminal event always has room (one past ``max_buffered``): leaving the block, even
        on ``BufferFull``, can always finish the job."""
        self._check_open()
        while not terminal and len(self._outbox) >= self.settings.max_buffered:
            if self.settings.when_full == "raise":
                raise BufferFull(
                    f"job {self.job_id}: {len(self._outbox)} events are waiting for the "
                    "server (max_buffered); this one was not added",
                    unsent=len(self._outbox),
                )
            self._room.clear()
            await _first(self._room.wait(), self._flusher_done())
            self._check_open()

    def _wake(self, urgent: bool = False) -> None:
        if len(self._outbox):
            self._drained.clear()
        self._urgent = self._urgent or urgent
        self._changed.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise ReporterError(
                f"job {self.job_id}: cannot deliver events ({self._failure!r}); "
                f"{len(self._outbox)} events were not delivered",
                unsent=len(self._outbox),
            ) from self._failure

    async def _flusher_done(self) -> None:
        """Return when the flusher ends (refused, or stopped)."""
        if self._flusher is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._flusher)

    async def _stop(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    async def _run(self) -> None:
        """The flusher: create (or attach to) the job, then send batches in order."""
        try:
            await self._create()
            while True:
                if not self._outbox.waiting:
                    if not len(self._outbox):
                        self._drained.set()
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                batch = self._outbox.take_batch(BATCH_EVENTS, BATCH_BYTES)
                await self._deliver(batch)
                self._outbox.acknowledged()
                self._room.set()
                if not len(self._outbox):
                    self._drained.set()
                await self._pause()
        except Exception as exc:  # a refusal, or a bug: the caller hears of it, with the count
            self._failure = exc
            self._room.set()

    async def _pause(self) -> None:
        """Wait ``flush_interval`` between requests, so that what is reported meanwhile
        goes in one batch; cut short when waiting gains nothing: a flush or a terminal
        event is waiting, a whole batch is ready, or the buffer is full."""
        if not self._no_pause() and self.settings.flush_interval:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.flush_interval):
                    while not self._no_pause():
                        self._changed.clear()
                        await self._changed.wait()
        self._urgent = False

    def _no_pause(self) -> bool:
        return bool(
            self._urgent
            or self._flush_waiters
            or self._outbox.waiting >= BATCH_EVENTS
            or len(self._outbox) >= self.settings.max_buffered
        )

    async def _create(self) -> None:
        body = _without_none({"job_id": self.job_id, "kind": self.kind, "metadata": self.metadata})
        try:
            if await self._over_stream({"type": "create", **body}) is None:
                await self._retrying(
                    lambda: self._client.request("POST", "/v1/jobs", body=body, attempts=1)
                )
            self.created = True
        except JobExists:
            self.created = False

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """Send one batch until it is acknowledged; raise ``ServerError`` if refused."""
        answer = await self._over_stream({"type": "append", "job_id": self.job_id, "events": batch})
        if answer is None:
            path = f"/v1/jobs/{quote(self.job_id, safe='')}/events"
            body: Any = batch[0] if len(batch) == 1 else {"events": batch}
            answer = (
                await self._retrying(
                    lambda: self._client.request("POST", path, body=body, attempts=1)
                )
            )[1]
        acks = answer["events"]
        self.stats.requests += 1
        self.stats.events += len(acks)
        self.stats.duplicates += sum(1 for ack in acks if ack.get("duplicate"))
        self.stats.merged = self._outbox.merged
        self.stats.last_seq = answer["last_seq"]

    async def _over_stream(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """``frame`` sent on the client's producer stream until it is answered: its ``ack``;
        None when the client has none (``ingest=False``, or the server lacks it): use HTTP."""
        channel = self._client.ingest_channel()
        if channel is None:
            return None
        try:
            return await self._retrying(lambda: channel.request(frame))
        except IngestUnsupported:
            return None

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it gets an answer (retryable failures wait a backoff)."""
        backoff = Backoff(self._client.retry)
        while True:
            try:
                return await attempt()
            except CredentialRenewed:
                continue  # the stream ended for its token; a new one is held: at once
            except Unavailable as exc:
                # The batch stays in flight, frozen, and goes again as it was: its keys make
                # a copy the server did commit (answer lost) a duplicate, not a second event.
                self.stats.retries += 1
                await asyncio.sleep(backoff.next_delay(exc.retry_after))


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _first(*waits: Any) -> None:
    """Return when the first of ``waits`` (coroutines) returns; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def new_job_id() -> str:
    """A ULID (48 bits of milliseconds, 80 random bits, Crockford base32), like the ids the
    server makes, so client-made ids sort by creation time too."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
