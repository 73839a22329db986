"""A stream's credential while the stream is open (auth.md, "Expiry during a stream" and
"Revocation").

A ``StreamGuard`` holds the principal a stream was opened with; the stream's loop runs inside
it (``async with guard``). When the credential expires, or the revocation sweep revokes it, the
guard cancels that loop, which leaves the ``async with`` as ``TimeoutError`` with ``fired()``
true; ``end_error()`` then says why: ``token_expired`` (WebSocket 4401, SSE ``event: error``)
or ``forbidden`` (4403). A WebSocket's in-band ``{"type": "auth"}`` frame swaps the principal
and moves its deadline.

Memory, not CPU, is what idle streams cost (docs/performance.md, W7), so a guard is a slotted
object and nothing else: no task, no timer of its own. Every open guard sits in one bucket of
the app's ``GuardClock`` by its deadline rounded up to a whole second, and one loop timer per
bucket expires them; streams opened with the same token share their bucket. The clock's
buckets are also the list the revocation sweep walks. A stream thus ends within a second
after its credential's expiry.

The sweep (``recheck_revocations``) runs once per ``auth.recheck_seconds`` for the whole
server: it re-reads ``not_before`` from the config file when the file changed, and ends every
open stream whose credential it now revokes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import structlog
from aiohttp import web

from ..auth import READ, Authenticator, Principal
from ..config import ConfigError, load_config
from ..errors import Forbidden, JobNotFound, ServiceError, TokenExpired, Unauthorized
from ..keys import AUTH, CONFIG, CONFIG_PATH, GUARDS

log = structlog.get_logger("jobfeed.auth")

_NEVER = -1  # the bucket of a credential without exp (none today: exp is required)


class GuardClock:
    """Open guards by deadline (whole seconds of Unix time), one loop timer per second that
    has any."""

    def __init__(self) -> None:
        self._buckets: dict[int, set[StreamGuard]] = {}

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def __iter__(self) -> Iterator[StreamGuard]:
        for bucket in list(self._buckets.values()):
            yield from list(bucket)

    def add(self, guard: StreamGuard, until: float | None) -> int:
        second = _NEVER if until is None else math.ceil(until)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            if second != _NEVER:
                loop = asyncio.get_running_loop()
                loop.call_at(loop.time() + max(0.0, second - time.time()), self._expire, second)
        bucket.add(guard)
        return second

    def discard(self, guard: StreamGuard, second: int) -> None:
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(guard)
            if not bucket and second == _NEVER:
                del self._buckets[second]

    def _expire(self, second: int) -> None:
        for guard in self._buckets.pop(second, ()):
            guard.end(TokenExpired())


class StreamGuard:
    __slots__ = (
        "_authenticator",
        "_clock",
        "_fired",
        "_second",
        "_task",
        "ending",
        "job_id",
        "principal",
    )

    def __init__(
        self,
        authenticator: Authenticator,
        clock: GuardClock,
        principal: Principal,
        job_id: str | None,
    ) -> None:
        self._authenticator = authenticator
        self._clock = clock
        self.principal = principal
        self.job_id = job_id
        self.ending: ServiceError | None = None
        self._task: asyncio.Task[object] | None = None
        self._second: int | None = None
        self._fired = False

    async def __aenter__(self) -> StreamGuard:
        self._task = asyncio.current_task()
        self._schedule()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._unschedule()
        self._task = None
        if self._fired and exc_type is asyncio.CancelledError:
            # Our own cancellation (end): undo it and say it as asyncio.timeout would.
            task = asyncio.current_task()
            if task is not None and task.uncancel() == 0:
                raise TimeoutError from None

    def fired(self) -> bool:
        return self._fired

    def end_error(self) -> ServiceError:
        return self.ending or TokenExpired()

    def end(self, error: ServiceError) -> None:
        """End the stream now with ``error`` (expiry, revocation)."""
        if self._fired or self._task is None:
            return
        self.ending = error
        self._fired = True
        self._unschedule()
        self._task.cancel()

    def refresh(self, credential: object) -> Principal:
        """Take a new token or ticket for this stream (the WebSocket ``auth`` frame): the
        same tenant, still granted this job and ``jobs:read``; raises ``ServiceError``."""
        if not isinstance(credential, str) or not credential:
            raise Unauthorized("missing", 'the auth frame needs a "token" string')
        principal = self._authenticator.verify(credential)
        if principal.tenant != self.principal.tenant:
            raise Forbidden("the new credential is for another tenant than this stream")
        if not principal.allows(READ):
            raise Forbidden(f"the new credential lacks the scope {READ}")
        if self.job_id is None:
            # A feed: its grant (tenant and job grants) was fixed when it opened.
            if principal.grants != self.principal.grants:
                raise Forbidden("a feed keeps the job grants it was opened with; reconnect")
        else:
            try:
                principal.job_key(self.job_id)
            except JobNotFound:
                raise Forbidden(f"the new credential does not grant job {self.job_id}") from None
        self.principal = principal
        if self._second is not None:
            self._unschedule()
            self._schedule()
        return principal

    def _schedule(self) -> None:
        until = self._authenticator.valid_until(self.principal)
        self._second = self._clock.add(self, until)

    def _unschedule(self) -> None:
        if self._second is not None:
            self._clock.discard(self, self._second)
            self._second = None


def guard_stream(
    request: web.Request, principal: Principal, job_id: str | None
) -> StreamGuard | None:
    """A guard for a stream opened with ``principal`` (on ``job_id``; None: the feed); None
    with authentication off."""
    authenticator = request.app[AUTH]
    if not authenticator.enabled:
        return None
    return StreamGuard(authenticator, request.app[GUARDS], principal, job_id)


async def recheck_revocations(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the revocation sweep, while authentication is on."""
    task = None
    if app[AUTH].enabled:
        task = asyncio.create_task(_sweep_loop(app), name="revocation-sweep")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()


async def _sweep_loop(app: web.Application) -> None:
    authenticator = app[AUTH]
    path: Path | None = app.get(CONFIG_PATH)
    seen = _mtime(path)
    while True:
        await asyncio.sleep(app[CONFIG].auth.recheck_seconds)
        mtime = _mtime(path)
        if path is not None and mtime != seen:
            seen = mtime
            try:
                authenticator.set_revocations(load_config(path).auth)
                log.info("revocations_reloaded", path=str(path))
            except ConfigError as exc:
                log.warning("revocations_not_reloaded", path=str(path), error=str(exc))
        sweep(app)


def sweep(app: web.Application) -> int:
    """End every open stream whose credential is now revoked; how many."""
    authenticator = app[AUTH]
    ended = 0
    for guard in app[GUARDS]:
        if guard.ending is None and authenticator.revoked(guard.principal):
            guard.end(
                Forbidden(
                    "the credential of this stream was revoked (issued before auth.not_before)"
                )
            )
            ended += 1
    return ended


def _mtime(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
