"""``ResumingStream``: one subscription after another until the stream is done, the part that
``AsyncWatch`` (one job, cursor ``seq``) and ``AsyncFeed`` (many jobs, cursor event ``id``)
share.

One subscription is an *attempt*: connect with the position held so far, read frames until
the stream ends. How it ends decides what happens next (protocol-v1, "Close-code bands"):

- close 1000, or SSE 204: the subclass says (``_closed_normally``): a job stream is done, a
  feed, which never ends by itself, resumes;
- 1001, 1006, 1011, 1013, a connection that drops or goes silent for
  ``stream_idle_timeout``, a refused connection, an HTTP 429/5xx, an SSE ``event: error``
  with a retryable code, an SSE response that ends (``_sse_ended`` decides): resume after a
  backoff (exponential, full jitter, reset once a subscription is accepted, i.e. on hello);
- 4401, an SSE ``event: error`` ``token_expired`` (or an HTTP 401): with a token provider,
  get a new token and resume at once from the position held ("re-authenticate, then
  resume"); raise ``Unauthorized`` without one, or when the provider's new token is refused
  before a hello accepted it;
- with a token provider and ``refresh_in_band`` (the default), a WebSocket whose token is a
  JWT refreshes before its ``exp``: the provider's new token goes in an ``auth`` frame, and
  the stream goes on without a reconnection (``in_band_refreshes`` counts them); if that
  fails, the expiry and the resume above still apply;
- 4004, 4400, 4403, 4409, 4410 (and their HTTP twins for SSE): raise the matching
  ``ServerError`` (``JobNotFound``, ``InvalidRequest``, ``Forbidden``, ``LogReset``,
  ``JobDeleted``).

A subclass names the URL and query (``_url``, ``_params``), turns each frame into the item
to yield, or None for a control frame, after checking its place (``_accept``), and says
whether an item is the last (``_is_last``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import aiohttp

from .backoff import Backoff, parse_retry_after
from .credentials import refresh_delay, token_expiry
from .errors import ProtocolViolation, Unauthorized, error_from_body, error_from_close
from .sse import SSEParser

if TYPE_CHECKING:
    from .client import AsyncClient

Transport = Literal["websocket", "sse"]
Item = TypeVar("Item")
RESUME_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRYABLE_ERROR_CODES = frozenset({"overloaded", "shutting_down"})
# The largest server frame: an event is at most limits.max_event_bytes (64 KiB by default);
# control frames are small. Generous, so that a server with a raised limit still works.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class Resume(Exception):
    """An attempt ended in a way that calls for another one."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Done(Exception):
    """The stream ended for good."""


class ResumingStream(Generic[Item]):
    """The attempt loop. ``state`` is one of ``connecting``, ``live``, ``waiting``, ``done``;
    ``resumes`` counts reconnections; ``hello`` is the latest hello frame."""

    def __init__(self, client: AsyncClient, transport: Transport) -> None:
        if transport not in ("websocket", "sse"):
            raise ValueError('transport must be "websocket" or "sse"')
        self._client = client
        self.transport: Transport = transport
        self.resumes = 0
        self.state = "connecting"
        self.hello: dict[str, Any] | None = None
        self.backoff = Backoff(client.retry)
        self._renewal = client.credentials.renewal()
        self._token: str | None = None  # the token the latest attempt sent
        self.in_band_refreshes = 0  # tokens a WebSocket took without reconnecting

    # -- what a subclass says ------------------------------------------------------------

    def _url(self) -> str:
        raise NotImplementedError

    def _params(self) -> Sequence[tuple[str, str]]:
        raise NotImplementedError

    def _accept(self, frame: dict[str, Any]) -> Item | None:
        raise NotImplementedError

    def _is_last(self, item: Item) -> bool:
        return False

    def _sse_headers(self) -> dict[str, str]:
        """Headers an SSE attempt adds (the feed's ``Last-Event-ID``, as a browser sends)."""
        return {}

    def _closed_normally(self) -> Exception:
        """What close 1000 (or SSE 204) means: ``Done()`` or a ``Resume``."""
        return Done()

    def _sse_ended(self) -> Exception:
        """What the end of an SSE response means."""
        return Resume("SSE response ended")

    def _accepted(self, hello: dict[str, Any]) -> None:
        """A hello arrived: the subscription was accepted; the next drop starts over."""
        self.hello = hello
        self.state = "live"
        self.backoff.reset()
        self._renewal.accepted()

    # -- the loop --------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._items()

    async def _items(self) -> AsyncGenerator[Item]:
        while True:
            self.state = "connecting"
            attempt = self._ws_attempt() if self.transport == "websocket" else self._sse_attempt()
            try:
                async for frame in attempt:
                    item = self._accept(frame)
                    if item is None:
                        continue
                    yield item
                    if self._is_last(item):
                        self.state = "done"
                        return
            except Done:
                self.state = "done"
                return
            except Resume as resume:
                self.state = "waiting"
                self.resumes += 1
                await asyncio.sleep(self.backoff.next_delay(resume.retry_after))
            except Unauthorized:
                if not await self._renewal.renew(self._token):
                    raise
                # A new credential: resume at once from the position held (no backoff: the
                # server did nothing wrong, and the stream's position is exact).
                self.resumes += 1
            finally:
                await attempt.aclose()

    async def _ws_attempt(self) -> AsyncGenerator[dict[str, Any]]:
        """One WebSocket subscription's frames; ends by raising ``Done``/``Resume`` or a
        ``ServerError``."""
        client = self._client
        self._token, headers = await client.headers()
        try:
            ws = await client.session().ws_connect(
                self._url(),
                params=self._params(),
                headers=headers,
                # Protocol pings: a connection that went silent (a dead peer, a cut cable)
                # is noticed within this long, and resumed.
                heartbeat=client.stream_idle_timeout / 2,
                max_msg_size=MAX_FRAME_BYTES,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in _RETRY_STATUSES:
                raise Resume(f"handshake {exc.status}", _retry_after(exc.headers)) from exc
            raise error_from_body(exc.status, None) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Resume(f"connect: {exc!r}") from exc
        error_frame: dict[str, Any] | None = None
        refresher = None
        if client.refresh_in_band and client.credentials.renewable:
            refresher = asyncio.create_task(self._refresh_in_band(ws))
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = parse_frame(message.data)
                if frame.get("type") == "error" and "seq" not in frame:
                    error_frame = frame
                    continue
                yield frame
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            await ws.close()
        code = ws.close_code or 1006
        if code == 1000:
            raise self._closed_normally()
        if code in RESUME_CLOSE_CODES or code < 1000:
            raise Resume(f"closed {code}")
        raise error_from_close(code, error_frame)

    async def _refresh_in_band(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Before the token of this connection expires, send the provider's next one in an
        ``auth`` frame (only the handler task reads; this one only sends, which aiohttp
        allows). Gives up quietly, leaving the expiry to end the stream and the resume to
        renew it, when the token has no readable ``exp``, the provider fails or hands back a
        token that expires no later, or the send fails."""
        credentials = self._client.credentials
        token = self._token
        try:
            while (expires_at := token_expiry(token)) is not None:
                await asyncio.sleep(refresh_delay(expires_at, time.time()))
                await credentials.renew(token)
                fresh = await credentials.current()
                fresh_expiry = token_expiry(fresh)
                if fresh is None or fresh_expiry is None or fresh_expiry <= expires_at:
                    return
                await ws.send_json({"type": "auth", "token": fresh})
                self._token = token = fresh
                self.in_band_refreshes += 1
        except Exception:  # the expiry path asks the provider again, and raises its error
            return

    async def _sse_attempt(self) -> AsyncGenerator[dict[str, Any]]:
        """One Server-Sent Events response's records as frames (hello, events, and the
        feed's heartbeats and snapshots); same outcomes as the WebSocket's."""
        client = self._client
        self._token, headers = await client.headers()
        headers.update(self._sse_headers())
        headers["Accept"] = "text/event-stream"
        timeout = aiohttp.ClientTimeout(
            total=None, connect=client.timeout, sock_read=client.stream_idle_timeout
        )
        try:
            async with client.session().get(
                self._url(), params=self._params(), headers=headers, timeout=timeout
            ) as response:
                if response.status == 204:
                    raise self._closed_normally()  # a job stream at or past its terminal event
                if response.status >= 400:
                    raw = await response.read()
                    if response.status in _RETRY_STATUSES:
                        raise Resume(f"HTTP {response.status}", _retry_after(response.headers))
                    raise error_from_body(response.status, _json_or_none(raw))
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    for record in parser.feed(chunk):
                        if record.event == "error":
                            frame = parse_frame(record.data)
                            code = str(frame.get("code") or "")
                            if code in _RETRYABLE_ERROR_CODES:
                                raise Resume(f"SSE error {code}", parser.retry_seconds)
                            raise error_from_body(0, {"error": frame})
                        if record.data:
                            yield parse_frame(record.data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Resume(f"SSE: {exc!r}") from exc
        raise self._sse_ended()


def parse_frame(data: Any) -> dict[str, Any]:
    try:
        frame = json.loads(data)
    except ValueError as exc:
        raise ProtocolViolation(f"a stream frame is not JSON: {str(data)[:200]!r}") from exc
    if not isinstance(frame, dict):
        raise ProtocolViolation(f"a stream frame is not a JSON object: {str(data)[:200]!r}")
    return frame


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _retry_after(headers: Any) -> float | None:
    return parse_retry_after(headers.get("Retry-After")) if headers else None
