"""The client's credential: a static token, or a token provider asked for a fresh one.

One ``Credentials`` per client holds the token every request and stream sends. A refusal
that a new token can fix (HTTP 401, close 4401, SSE ``token_expired``) calls ``renew`` with
the token that was refused: if another request or stream already replaced it, the newer
token is used without asking again; otherwise the provider is called once, under a lock, so
that a reporter and watchers refused at the same moment share one new token.

Each request or stream keeps a ``Renewal``: after the provider was asked on its behalf, a
second refusal before anything was accepted (a response, a hello) means the provider's
token is no good either, and the refusal is raised instead of asking in a loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
from collections.abc import Awaitable, Callable

TokenProvider = Callable[[], str | Awaitable[str]]


class Credentials:
    def __init__(self, token: str | None, provider: TokenProvider | None) -> None:
        self._token = token or None
        self._provider = provider
        # Made in the loop that first needs it (the sync client's loop may be replaced in a
        # forked child; a lock is bound to one loop).
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.renewals = 0  # times the provider was called

    @property
    def renewable(self) -> bool:
        return self._provider is not None

    async def current(self) -> str | None:
        """The token to send (the provider's first one if none is held yet)."""
        if self._token is None and self._provider is not None:
            await self.renew(None)
        return self._token

    async def renew(self, refused: str | None) -> bool:
        """Replace the ``refused`` token; True if the provider was called for it, False if
        it had already been replaced (the newer one is then ``current``)."""
        async with self._lock_here():
            if self._token != refused:
                return False
            self._token = await self._ask()
            self.renewals += 1
            return True

    def renewal(self) -> Renewal:
        return Renewal(self)

    async def _ask(self) -> str:
        provider = self._provider
        assert provider is not None
        if inspect.iscoroutinefunction(provider) or inspect.iscoroutinefunction(
            getattr(provider, "__call__", None)  # noqa: B004 - an object with async __call__
        ):
            token: object = await provider()  # type: ignore[misc]
        else:
            # A sync provider may block (run a command, ask a service): not on the loop.
            token = await asyncio.to_thread(provider)
            if inspect.isawaitable(token):
                token = await token
        if not isinstance(token, str) or not token:
            raise TypeError(f"the token provider must return a non-empty str, not {token!r}")
        return token

    def _lock_here(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock


class Renewal:
    """One request's or one stream's right to a new token: the provider is asked at most
    once between two accepted attempts."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._asked = False

    async def renew(self, refused: str | None) -> bool:
        """After ``refused`` was refused: True if there is a new token to try; False if not
        (no provider, or the provider's own token was refused too): raise the refusal."""
        if not self._credentials.renewable or self._asked:
            return False
        self._asked = await self._credentials.renew(refused)
        return True

    def accepted(self) -> None:
        """The server accepted the credential (a response, a stream's hello)."""
        self._asked = False


def token_expiry(token: str | None) -> float | None:
    """A JWT's ``exp`` (Unix seconds), read without verifying it (the server verifies); None
    for anything else (a ticket, a token without ``exp``)."""
    parts = (token or "").split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_delay(expires_at: float, now: float) -> float:
    """How long from ``now`` until a stream refreshes a token that expires at
    ``expires_at``: a third of what is left before it, at most 30 s before (a 15-minute token
    is renewed 30 s ahead, a 3-second one a second ahead)."""
    left = expires_at - now
    return max(0.0, left - min(30.0, left / 3))
