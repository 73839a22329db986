"""``AsyncWatch``: follow one job's events, each once, in order, across drops and restarts.

One subscription is an *attempt*: connect with ``after`` (the last seq received) and, once a
hello has been seen, the log's ``epoch``; read frames until the stream ends. How it ends
decides what happens next (protocol-v1, "Close-code bands"):

- the terminal event arrived, or close 1000, or SSE 204: done, the iteration ends;
- 1001, 1006, 1011, 1013, a connection that drops or goes silent for
  ``stream_idle_timeout``, a refused connection, an HTTP 429/5xx, an SSE response that ends
  without the terminal event: resume after a backoff (exponential, full jitter, reset once
  a subscription is accepted), from the last seq, with the epoch;
- 4004, 4400, 4401, 4403, 4409, 4410 (and their HTTP twins for SSE): raise the matching
  ``ServerError`` (``JobNotFound``, ``InvalidRequest``, ``Unauthorized``, ``Forbidden``,
  ``LogReset``, ``JobDeleted``).

Each event is checked to be the next seq: a hole or a repeat is a ``ProtocolViolation``
rather than something to paper over. (A feed over many jobs, whose cursor is the event id
and may have holes, would reuse ``_ws_attempt``/``_sse_attempt`` and the ``_Resume``
outcomes with its own position check.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import aiohttp

from .backoff import Backoff, parse_retry_after
from .errors import ProtocolViolation, error_from_body, error_from_close
from .events import TERMINAL_TYPES, Event, Snapshot
from .sse import SSEParser

if TYPE_CHECKING:
    from .client import AsyncClient

Transport = Literal["websocket", "sse"]
RESUME_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRYABLE_ERROR_CODES = frozenset({"overloaded", "shutting_down"})
# The largest server frame: an event is at most limits.max_event_bytes (64 KiB by default);
# control frames are small. Generous, so that a server with a raised limit still works.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class _Resume(Exception):
    """An attempt ended in a way that calls for another one."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Done(Exception):
    """The stream ended for good (1000, or SSE 204)."""


class AsyncWatch:
    """Iterate with ``async for event in watch``. While it runs, ``after`` is the last seq
    received, ``epoch`` the log's identity, ``snapshot`` the job's state folded from the
    events (None if it started mid-log without a ``snapshot``), ``resumes`` how many times
    it reconnected, ``state`` one of ``connecting``, ``live``, ``waiting``, ``done``."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        *,
        after: int = 0,
        epoch: str | None = None,
        snapshot: Snapshot | None = None,
        transport: Transport = "websocket",
    ) -> None:
        if transport not in ("websocket", "sse"):
            raise ValueError('transport must be "websocket" or "sse"')
        if snapshot is not None:
            after, epoch = snapshot.last_seq, snapshot.epoch
        if after < 0:
            raise ValueError("after must be >= 0")
        self._client = client
        self.job_id = job_id
        self.after = after
        self.epoch = epoch
        self.snapshot = snapshot
        self.transport: Transport = transport
        self.resumes = 0
        self.state = "connecting"
        self.hello: dict[str, Any] | None = None
        self.backoff = Backoff(client.retry)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncGenerator[Event]:
        while True:
            self.state = "connecting"
            attempt = self._ws_attempt() if self.transport == "websocket" else self._sse_attempt()
            try:
                async for frame in attempt:
                    event = self._accept(frame)
                    if event is None:
                        continue
                    yield event
                    if event.terminal:
                        self.state = "done"
                        return
            except _Done:
                self.state = "done"
                return
            except _Resume as resume:
                self.state = "waiting"
                self.resumes += 1
                await asyncio.sleep(self.backoff.next_delay(resume.retry_after))
            finally:
                await attempt.aclose()

    def _accept(self, frame: dict[str, Any]) -> Event | None:
        """The event to hand out for ``frame``, after checking its place; None for control
        frames (hello records the epoch and resets the backoff)."""
        if "seq" not in frame:
            if frame.get("type") == "hello":
                epoch = frame.get("epoch")
                if self.epoch is not None and epoch is not None and epoch != self.epoch:
                    raise error_from_close(
                        4409,
                        {
                            "code": "log_reset",
                            "message": (
                                f"job {self.job_id}'s log is epoch {epoch}, not {self.epoch}"
                            ),
                        },
                    )
                self.epoch = epoch or self.epoch
                self.hello = frame
                self.state = "live"
                self.backoff.reset()  # a subscription was accepted: the next drop starts over
            return None
        seq = frame["seq"]
        if not isinstance(seq, int) or seq != self.after + 1:
            raise ProtocolViolation(
                f"job {self.job_id}: expected seq {self.after + 1}, got {seq!r}"
            )
        event = Event.from_dict(frame)
        if self.snapshot is not None or (event.type == "created" and self.after == 0):
            self.snapshot = Snapshot.apply(self.snapshot, event)
        self.after = seq
        return event

    def _params(self) -> dict[str, str]:
        params = {"after": str(self.after)}
        if self.epoch:
            params["epoch"] = self.epoch
        return params

    def _url(self) -> str:
        return f"{self._client.url}/v1/jobs/{quote(self.job_id, safe='')}/stream"

    async def _ws_attempt(self) -> AsyncGenerator[dict[str, Any]]:
        """One WebSocket subscription's frames; ends by raising ``_Done``/``_Resume`` or a
        ``ServerError``."""
        client = self._client
        try:
            ws = await client.session().ws_connect(
                self._url(),
                params=self._params(),
                headers=client.headers(),
                # Protocol pings: a connection that went silent (a dead peer, a cut cable)
                # is noticed within this long, and resumed.
                heartbeat=client.stream_idle_timeout / 2,
                max_msg_size=MAX_FRAME_BYTES,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in _RETRY_STATUSES:
                raise _Resume(f"handshake {exc.status}", _retry_after(exc.headers)) from exc
            raise error_from_body(exc.status, None) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _Resume(f"connect: {exc!r}") from exc
        error_frame: dict[str, Any] | None = None
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = _parse_frame(message.data)
                if frame.get("type") == "error" and "seq" not in frame:
                    error_frame = frame
                    continue
                yield frame
        finally:
            await ws.close()
        code = ws.close_code or 1006
        if code == 1000:
            raise _Done()
        if code in RESUME_CLOSE_CODES or code < 1000:
            raise _Resume(f"closed {code}")
        raise error_from_close(code, error_frame)

    async def _sse_attempt(self) -> AsyncGenerator[dict[str, Any]]:
        """One Server-Sent Events response's hello and events; same outcomes as the
        WebSocket's."""
        client = self._client
        headers = {**client.headers(), "Accept": "text/event-stream"}
        timeout = aiohttp.ClientTimeout(
            total=None, connect=client.timeout, sock_read=client.stream_idle_timeout
        )
        try:
            async with client.session().get(
                self._url(), params=self._params(), headers=headers, timeout=timeout
            ) as response:
                if response.status == 204:
                    raise _Done()  # at or past the terminal event: nothing more will come
                if response.status >= 400:
                    raw = await response.read()
                    if response.status in _RETRY_STATUSES:
                        raise _Resume(f"HTTP {response.status}", _retry_after(response.headers))
                    raise error_from_body(response.status, _json_or_none(raw))
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    for record in parser.feed(chunk):
                        if record.event == "error":
                            frame = _parse_frame(record.data)
                            code = str(frame.get("code") or "")
                            if code in _RETRYABLE_ERROR_CODES:
                                raise _Resume(f"SSE error {code}", parser.retry_seconds)
                            raise error_from_body(0, {"error": frame})
                        if record.event == "heartbeat" or not record.data:
                            continue
                        yield _parse_frame(record.data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _Resume(f"SSE: {exc!r}") from exc
        if self._finished_before_after():
            raise _Done()  # subscribed at the terminal event: hello, then the end
        # Ended without the terminal event (shutdown, a proxy's timeout): resume.
        raise _Resume("SSE response ended")

    def _finished_before_after(self) -> bool:
        """The latest hello said the job is finished and we already hold its whole log."""
        hello = self.hello
        return (
            hello is not None
            and hello.get("status") in TERMINAL_TYPES
            and self.after >= int(hello.get("last_seq") or 0)
        )


def _parse_frame(data: Any) -> dict[str, Any]:
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
