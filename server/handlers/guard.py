"""A stream's credential while the stream is open (auth.md, "Expiry during a stream" and
"Revocation").

A ``StreamGuard`` holds the principal a stream was opened with and one ``asyncio.Timeout``
set to that credential's expiry; the stream's loop runs inside it. When it fires, the stream
ends with ``ending``: ``token_expired`` (WebSocket 4401, SSE ``event: error``) by default, or
``forbidden`` (4403) when the revocation sweep ended it early by rescheduling the timeout to
now. A WebSocket's in-band ``{"type": "auth"}`` frame swaps the principal and moves the
timeout to the new expiry. One timer per stream and no task: idle streams stay cheap.

The sweep (``recheck_revocations``) runs once per ``auth.recheck_seconds`` for the whole
server: it re-reads ``not_before`` from the config file when the file changed, and ends every
open stream whose credential it now revokes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from ..auth import READ, Authenticator, Principal
from ..config import ConfigError, load_config
from ..errors import Forbidden, JobNotFound, ServiceError, TokenExpired, Unauthorized
from ..keys import AUTH, CONFIG, CONFIG_PATH, GUARDS

log = structlog.get_logger("jobfeed.auth")


class StreamGuard:
    __slots__ = ("__weakref__", "_authenticator", "_timeout", "ending", "job_id", "principal")

    def __init__(self, authenticator: Authenticator, principal: Principal, job_id: str) -> None:
        self._authenticator = authenticator
        self.principal = principal
        self.job_id = job_id
        self.ending: ServiceError | None = None
        self._timeout: asyncio.Timeout | None = None

    def watch(self) -> asyncio.Timeout:
        """The timeout to run the stream in: it fires when the credential expires."""
        self._timeout = asyncio.timeout_at(self._deadline())
        return self._timeout

    def fired(self) -> bool:
        return self._timeout is not None and self._timeout.expired()

    def end_error(self) -> ServiceError:
        return self.ending or TokenExpired()

    def end(self, error: ServiceError) -> None:
        """End the stream now with ``error`` (revocation)."""
        if self.ending is None:
            self.ending = error
        timeout = self._timeout
        if timeout is not None and not timeout.expired():
            timeout.reschedule(asyncio.get_running_loop().time())

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
        try:
            principal.job_key(self.job_id)
        except JobNotFound:
            raise Forbidden(f"the new credential does not grant job {self.job_id}") from None
        self.principal = principal
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self._deadline())
        return principal

    def _deadline(self) -> float | None:
        until = self._authenticator.valid_until(self.principal)
        if until is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + (until - time.time())


def guard_stream(request: web.Request, principal: Principal, job_id: str) -> StreamGuard | None:
    """A guard for a stream opened with ``principal``; None with authentication off."""
    authenticator = request.app[AUTH]
    if not authenticator.enabled:
        return None
    guard = StreamGuard(authenticator, principal, job_id)
    request.app[GUARDS].add(guard)
    return guard


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
    guards = app[GUARDS]
    ended = 0
    for guard in list(guards):
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
