"""The producer stream (``GET /v1/ingest``): one WebSocket per client, shared by its reporters.

Each request (``append`` or ``create``) goes out at once with its own ``ref``, without
waiting for the ones before it; the server answers each after its commit, in order. A
reporter keeps one batch of its job in flight, so the requests pipelined on the socket are
those of the client's different jobs.

When the connection drops, every request still unanswered fails with ``Unavailable``, and
its reporter sends it again, as it was, on a new connection (its events' keys make a copy
the server did commit a duplicate, not a second event). A server without the route (an
older one: the upgrade is answered 404) makes ``request`` raise ``IngestUnsupported``, once
and for good: the reporters then use HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from .errors import JobfeedError, ServerError, Unavailable, error_from_body, error_from_close

if TYPE_CHECKING:
    from .client import AsyncClient

PATH = "/v1/ingest"
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a create's ack carries a snapshot (~1.2 MiB at most)
# Answered by the server for a request it may take later: the reporter waits and resends.
_RETRYABLE_CODES = frozenset({"overloaded", "storage_unavailable", "shutting_down", "rate_limited"})
# The HTTP status of each per-request error code, for the exception classes keyed by it.
_STATUS_BY_CODE = {
    "invalid_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "job_not_found": 404,
    "job_exists": 409,
    "job_finished": 409,
    "event_too_large": 413,
    "validation_error": 422,
}
_HANDSHAKE_RETRY = frozenset({408, 425, 429, 500, 502, 503, 504})
_FINAL_CLOSE = 4000  # close codes from here on are final (protocol-v1's bands)


class IngestUnsupported(JobfeedError):
    """The server has no producer stream: use HTTP."""


class CredentialRenewed(Unavailable):
    """The stream ended for its token (4401) and a newer one is held now: send the request
    again at once (not a failed attempt: the server did nothing wrong)."""


@dataclass(slots=True)
class _Connection:
    ws: aiohttp.ClientWebSocketResponse
    token: str | None
    # Requests sent on this connection and not answered yet, by ref.
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)


class IngestChannel:
    """The client's producer stream; ``request`` sends one request and returns its ``ack``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._refs = itertools.count(1)
        self._connection: _Connection | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._lock: asyncio.Lock | None = None
        self.supported: bool | None = None  # None: not asked yet
        self.connects = 0  # connections opened, for tests and stats
        # The provider is asked at most once between two answers the server accepted, so
        # that a provider whose tokens are refused too ends in Unauthorized, not a loop.
        self._renewal = client.credentials.renewal()

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send ``frame`` (``{"type": "append" | "create", ...}``) and return its ``ack``
        frame. Raises the request's ``ServerError``, ``Unavailable`` when it may be sent
        again (a dropped connection, a retryable refusal), ``IngestUnsupported``."""
        connection = await self._connected()
        ref = next(self._refs)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        connection.pending[ref] = future
        try:
            try:
                await connection.ws.send_str(_encode({**frame, "ref": ref}))
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise Unavailable(f"{PATH}: the connection was lost ({exc!r})") from exc
            return await future
        finally:
            connection.pending.pop(ref, None)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.ws.close()
        for reader in list(self._readers):
            reader.cancel()
        for reader in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _connected(self) -> _Connection:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.ws.closed:
                return connection
            if self.supported is False:
                raise IngestUnsupported(f"{self._client.url} has no {PATH}")
            connection = await self._connect()
            self._connection = connection
            reader = asyncio.get_running_loop().create_task(self._read(connection))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            return connection

    async def _connect(self) -> _Connection:
        client = self._client
        token, headers = await client.headers()
        try:
            ws = await client.session().ws_connect(
                client.url + PATH,
                headers=headers,
                # Protocol pings: a server that went silent is noticed, its requests resent.
                heartbeat=client.stream_idle_timeout / 2,
                max_msg_size=MAX_ANSWER_BYTES,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in _HANDSHAKE_RETRY:
                raise Unavailable(f"{PATH}: handshake answered {exc.status}") from exc
            # No such route (an older server: 404), or a proxy that does not pass
            # WebSockets: this server is reached over HTTP.
            self.supported = False
            raise IngestUnsupported(f"{client.url}{PATH}: answered {exc.status}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{PATH}: cannot connect ({exc!r})") from exc
        self.supported = True
        self.connects += 1
        return _Connection(ws, token)

    async def _read(self, connection: _Connection) -> None:
        """Settle each request with its answer; when the connection ends, fail those left."""
        ws = connection.ws
        refusal: dict[str, Any] | None = None  # the error frame sent before a final close
        failure: Exception | None = None
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                answer = json.loads(message.data)
                ref = answer.get("ref")
                if answer.get("type") == "error" and ref is None:
                    refusal = answer  # the connection's own (before 4401 / 4403 / 1013)
                    continue
                future = connection.pending.pop(ref, None)
                if future is None or future.done():
                    continue
                if answer.get("type") == "ack":
                    self._renewal.accepted()
                    future.set_result(answer)
                else:
                    future.set_exception(_request_error(answer))
        except Exception as exc:  # a broken answer: the connection is no good
            failure = Unavailable(f"{PATH}: {exc!r}")
            await ws.close()
        finally:
            if self._connection is connection:
                self._connection = None
            code = ws.close_code or 1006
            if failure is None:
                failure = await self._close_failure(connection, code, refusal)
            for future in connection.pending.values():
                if not future.done():
                    future.set_exception(failure)
            connection.pending.clear()

    async def _close_failure(
        self, connection: _Connection, code: int, refusal: dict[str, Any] | None
    ) -> Exception:
        """What the requests left unanswered by a close with ``code`` fail with."""
        if code == 4401 and await self._renewed(connection.token):
            return CredentialRenewed(f"{PATH}: the credential was renewed; send again")
        if code >= _FINAL_CLOSE:
            return error_from_close(code, refusal)
        return Unavailable(f"{PATH}: the connection closed ({code}) before the answer")

    async def _renewed(self, refused: str | None) -> bool:
        """After a 4401: is there a newer token to try? Another connection or an HTTP call
        may have renewed it already; else the provider is asked (once, see ``_renewal``)."""
        credentials = self._client.credentials
        if not credentials.renewable:
            return False
        return await credentials.current() != refused or await self._renewal.renew(refused)


def _request_error(answer: dict[str, Any]) -> Exception:
    code = str(answer.get("code") or "")
    message = str(answer.get("message") or code)
    if code in _RETRYABLE_CODES or code == "internal_error":
        return Unavailable(f"{PATH}: {code}: {message}")
    status = _STATUS_BY_CODE.get(code, 400)
    error: ServerError = error_from_body(status, {"error": answer})
    return error


def _encode(frame: dict[str, Any]) -> str:
    # allow_nan=False: NaN and Infinity are not JSON, and the server refuses them.
    return json.dumps(frame, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
