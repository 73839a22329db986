"""``AsyncClient``: one object per server, holding the connection pool, the credential and the
retry policy; it makes reporters (``job``), watchers (``watch``, ``feed``) and one-shot calls.

One-shot calls (``create_job``, ``get_job``, ``jobs``, ``events``, ``export``, ``append``)
retry what the protocol calls safe to retry (a dropped connection, 408, 429, 5xx; waiting at
least ``Retry-After``) up to ``attempts`` times, then raise ``Unavailable``. A refusal that
retrying cannot change (404, 409, 422, ...) is raised at once as its ``ServerError``.

Must be used from one event loop: make it inside the loop that uses it (a FastAPI lifespan,
``asyncio.run``'s coroutine). The sync twin, ``Client``, runs this same code on a private
loop in a background thread.

Credentials: a static ``token``, or a ``token_provider`` (``credentials.py``) asked for a
fresh token whenever the server says the one held is no longer good: an HTTP 401 is retried
once with the new token, and a stream that ends for its credential (close 4401, SSE
``token_expired``) resumes with it from where it was.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from .backoff import Backoff, RetryPolicy, parse_retry_after
from .credentials import Credentials, TokenProvider
from .errors import JobfeedError, ServerError, Unavailable, error_from_body
from .events import Event, Snapshot
from .feed import AsyncFeed
from .ingest import IngestChannel
from .reporter import AsyncJob, ReporterSettings
from .resuming import Transport
from .watch import AsyncWatch

DEFAULT_URL = "http://127.0.0.1:8080"
# Worth another attempt: the request may not have been processed, or the server asked us to
# come back (503 overloaded / storage_unavailable / shutting_down, 429 rate_limited), or a
# proxy in front lost the upstream (502, 504). Appends carry idempotency keys, so a retry
# after an unknown outcome never duplicates an event.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRY_EXCEPTIONS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Appended:
    """One acknowledged event of an append: where it is in the log, and whether the server
    already had it (its key was known, so nothing was written)."""

    seq: int
    id: int
    ts: str
    duplicate: bool


class AsyncClient:
    """A jobfeed server, from asyncio code.

    ``url`` and ``token`` default to ``$JOBFEED_URL`` (else ``http://127.0.0.1:8080``) and
    ``$JOBFEED_TOKEN`` (the latter only without a ``token_provider``). ``token_provider``
    is a callable, sync or async, that returns a fresh token (a ``str``): called before the
    first request when no ``token`` is given, and again whenever the server refuses the
    token held (401, close 4401, SSE ``token_expired``). A sync one runs in a worker thread,
    so it may block. With a provider, a WebSocket also renews its token in-band shortly
    before the token's ``exp`` (``refresh_in_band=False``: only on expiry). ``timeout``
    bounds connecting and each read of a one-shot call; ``stream_idle_timeout`` is how long
    a stream may stay silent (the server sends heartbeats every 15 s by default) before the
    watcher treats it as lost and resumes. Reporters (``job``) send over the producer stream
    (``GET /v1/ingest``: one WebSocket for the client, requests pipelined) when the server
    has one, and over HTTP otherwise; ``ingest=False``: always HTTP.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        timeout: float = 10.0,
        attempts: int = 5,
        retry: RetryPolicy | None = None,
        stream_idle_timeout: float = 60.0,
        refresh_in_band: bool = True,
        flush_interval: float = 0.25,
        max_buffered: int = 10_000,
        when_full: Literal["block", "raise"] = "block",
        close_timeout: float | None = None,
        ingest: bool = True,
    ) -> None:
        self.url = (url or os.environ.get("JOBFEED_URL") or DEFAULT_URL).rstrip("/")
        if token is None and token_provider is None:
            token = os.environ.get("JOBFEED_TOKEN") or None
        self.credentials = Credentials(token, token_provider)
        self.timeout = timeout
        self.attempts = attempts
        self.retry = retry or RetryPolicy()
        self.stream_idle_timeout = stream_idle_timeout
        self.refresh_in_band = refresh_in_band
        self.reporter_settings = ReporterSettings(
            flush_interval=flush_interval,
            max_buffered=max_buffered,
            when_full=when_full,
            close_timeout=close_timeout,
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.ingest = ingest
        self._ingest: IngestChannel | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        channel, self._ingest = self._ingest, None
        if channel is not None:
            await channel.aclose()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def forget_session(self) -> None:
        """Drop the connection pool without closing it: in a forked child it belongs to the
        parent's event loop (its sockets are the parent's too)."""
        self._session = None
        self._ingest = None

    def ingest_channel(self) -> IngestChannel | None:
        """The producer stream the reporters share (``ingest.py``); None when this client
        was made with ``ingest=False`` or the server has no producer stream."""
        if not self.ingest:
            return None
        if self._ingest is None:
            self._ingest = IngestChannel(self)
        return None if self._ingest.supported is False else self._ingest

    def session(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use inside the running loop."""
        if self._closed:
            raise JobfeedError("the client is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_read=self.timeout
                ),
            )
        return self._session

    async def headers(self) -> tuple[str | None, dict[str, str]]:
        """The token to send (asking the provider for a first one) and the headers every
        request and stream carries: the credential, when there is one."""
        token = await self.credentials.current()
        return token, ({"Authorization": f"Bearer {token}"} if token else {})

    # -- reporters and watchers ----------------------------------------------------------

    def job(
        self,
        job_id: str | None = None,
        *,
        kind: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        run_key: str | None = None,
    ) -> AsyncJob:
        """A reporter for one job, used as ``async with client.job("build-42") as job:``.

        Entering creates the job (or attaches to it if it exists); leaving appends
        ``completed``, or ``failed`` if the block raised. See ``AsyncJob``.
        """
        return AsyncJob(
            self,
            job_id,
            kind=kind,
            metadata=dict(metadata) if metadata is not None else None,
            run_key=run_key,
            settings=self.reporter_settings,
        )

    def watch(
        self,
        job_id: str,
        *,
        after: int = 0,
        epoch: str | None = None,
        snapshot: Snapshot | None = None,
        transport: Transport = "websocket",
    ) -> AsyncWatch:
        """The job's events with ``seq > after``, each once, in order, across reconnects; ends
        after the terminal event. ``snapshot`` (from ``get_job``) starts from its
        ``last_seq`` and ``epoch`` and keeps ``AsyncWatch.snapshot`` current."""
        return AsyncWatch(
            self, job_id, after=after, epoch=epoch, snapshot=snapshot, transport=transport
        )

    def feed(
        self,
        *,
        after: int | None = None,
        job: str | Iterable[str] | None = None,
        prefix: str | None = None,
        kind: str | Iterable[str] | None = None,
        type: str | Iterable[str] | None = None,
        snapshots: bool = False,
        epoch: str | None = None,
        transport: Transport = "websocket",
    ) -> AsyncFeed:
        """The events of every job that matches the filters (AND between them; several
        values of ``job``, ``kind`` or ``type`` are OR), in commit order, each once, across
        reconnects; never ends by itself. ``after`` is an event id (``0``: the whole log,
        ``None``: from now; the ``cursor`` of ``GET /v1/jobs`` continues a listing).
        ``snapshots=True`` first yields a ``Snapshot`` of every matching unfinished job.
        ``epoch`` (an earlier feed's ``epoch``) goes with ``after``: a log that is not that
        one any more (a restored database) raises ``LogReset``. See ``AsyncFeed``."""
        return AsyncFeed(
            self,
            after=after,
            job=job,
            prefix=prefix,
            kind=kind,
            type=type,
            snapshots=snapshots,
            epoch=epoch,
            transport=transport,
        )

    # -- one-shot calls ----------------------------------------------------------------

    async def create_job(
        self,
        job_id: str | None = None,
        *,
        kind: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        heartbeat_timeout: float | None = None,
    ) -> Snapshot:
        """``POST /v1/jobs``; raises ``JobExists`` if ``job_id`` is taken (which includes a
        retry after the answer to this very creation was lost: ``job()`` attaches instead).
        With ``heartbeat_timeout`` (seconds) the server fails the job as ``worker_lost`` if
        it gets no event for that long before the job finishes."""
        body = _without_none(
            {
                "job_id": job_id,
                "kind": kind,
                "metadata": metadata,
                "heartbeat_timeout": heartbeat_timeout,
            }
        )
        _, answer = await self.request("POST", "/v1/jobs", body=body)
        return Snapshot.from_dict(answer)

    async def get_job(self, job_id: str) -> Snapshot:
        _, answer = await self.request("GET", f"/v1/jobs/{_quoted(job_id)}")
        return Snapshot.from_dict(answer)

    async def delete_job(self, job_id: str) -> None:
        """``DELETE /v1/jobs/{id}`` (scope ``jobs:admin``): the job, its log and its keys.
        Raises ``JobNotFound`` if there is no such job, which includes a retry after the
        answer to this very deletion was lost. Watchers of the job end with ``JobDeleted``."""
        await self.request("DELETE", f"/v1/jobs/{_quoted(job_id)}")

    async def jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Snapshot]:
        """Jobs newest first, following ``next_cursor`` until ``limit`` jobs or the end."""
        cursor: str | None = None
        yielded = 0
        while True:
            params = _without_none(
                {"status": status, "kind": kind, "cursor": cursor, "limit": page_size}
            )
            _, answer = await self.request("GET", "/v1/jobs", params=params)
            for raw in answer["jobs"]:
                if limit is not None and yielded >= limit:
                    return
                yielded += 1
                yield Snapshot.from_dict(raw)
            cursor = answer.get("next_cursor")
            if cursor is None:
                return

    async def events(self, job_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """The job's stored events after ``after``, page by page (``GET .../events``)."""
        next_after: int | None = after
        while next_after is not None:
            _, answer = await self.request(
                "GET", f"/v1/jobs/{_quoted(job_id)}/events", params={"after": next_after}
            )
            for raw in answer["events"]:
                yield Event.from_dict(raw)
            next_after = answer.get("next_after")

    async def export(self, job_id: str, *, after: int = 0) -> AsyncIterator[bytes]:
        """The job's log as NDJSON, one event per line (``\\n`` included), as the server
        sends it. A connection lost midway is resumed after the last whole line's seq, so
        no line is yielded twice or skipped."""
        url = f"{self.url}/v1/jobs/{_quoted(job_id)}/events"
        backoff = Backoff(self.retry)
        failures = 0
        renewal = self.credentials.renewal()
        while True:
            error: BaseException | None = None
            token, headers = await self.headers()
            headers["Accept"] = "application/x-ndjson"
            try:
                async with self.session().get(
                    url, params={"after": str(after)}, headers=headers
                ) as response:
                    if response.status == 401 and await renewal.renew(token):
                        await response.read()
                        continue
                    if response.status >= 400:
                        retry_after = await _refusal(response)
                    else:
                        renewal.accepted()
                        pending = b""
                        async for chunk in response.content.iter_any():
                            pending += chunk
                            *lines, pending = pending.split(b"\n")
                            for line in lines:
                                after = json.loads(line)["seq"]
                                backoff.reset()
                                failures = 0
                                yield line + b"\n"
                        if pending:  # the server ends every line; be lenient all the same
                            yield pending
                        return
            except _RETRY_EXCEPTIONS as exc:
                retry_after, error = None, exc
            failures += 1
            if failures >= self.attempts:
                raise Unavailable(
                    f"GET {url}: no answer after {failures} attempts", retry_after=retry_after
                ) from error
            await asyncio.sleep(backoff.next_delay(retry_after))

    async def append(self, job_id: str, *events: Mapping[str, Any]) -> list[Appended]:
        """Append events in one atomic request, as given (give each a ``key`` if you may
        retry). Most code wants ``job()``, which keys, batches and retries for you."""
        body: Any = dict(events[0]) if len(events) == 1 else {"events": [dict(e) for e in events]}
        _, answer = await self.request("POST", f"/v1/jobs/{_quoted(job_id)}/events", body=body)
        return [
            Appended(e["seq"], e["id"], e["ts"], bool(e.get("duplicate"))) for e in answer["events"]
        ]

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        attempts: int | None = None,
    ) -> tuple[int, Any]:
        """One JSON request with retries: ``(status, parsed body)`` for a 2xx; a
        ``ServerError`` for a final refusal; ``Unavailable`` after ``attempts`` tries
        (``self.attempts`` by default; 0 retries forever)."""
        attempts = self.attempts if attempts is None else attempts
        data = None if body is None else _encode(body)
        query = {k: str(v) for k, v in (params or {}).items()}
        backoff = Backoff(self.retry)
        renewal = self.credentials.renewal()
        attempt = 0
        while True:
            attempt += 1
            error: BaseException | None = None
            token, headers = await self.headers()
            if data is not None:
                headers["Content-Type"] = "application/json"
            try:
                async with self.session().request(
                    method, self.url + path, data=data, params=query, headers=headers
                ) as response:
                    if response.status == 401 and await renewal.renew(token):
                        # A new credential: the same request again at once, not counted as
                        # an attempt (appends carry keys: a repeat is never a duplicate).
                        await response.read()
                        attempt -= 1
                        continue
                    if response.status < 400:
                        raw = await response.read()
                        return response.status, json.loads(raw) if raw else None
                    retry_after = await _refusal(response)
            except _RETRY_EXCEPTIONS as exc:
                retry_after, error = None, exc
            if attempts and attempt >= attempts:
                raise Unavailable(
                    f"{method} {self.url}{path}: no answer after {attempt} attempts",
                    retry_after=retry_after,
                ) from error
            await asyncio.sleep(backoff.next_delay(retry_after))


async def _refusal(response: aiohttp.ClientResponse) -> float | None:
    """For a retryable error status, the server's ``Retry-After`` (or None); raise the
    ``ServerError`` for any other."""
    raw = await response.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if response.status not in RETRY_STATUSES:
        raise error_from_body(response.status, parsed)
    return parse_retry_after(response.headers.get("Retry-After"))


def _encode(body: Any) -> bytes:
    # allow_nan=False: NaN and Infinity are not JSON, and the server refuses them with 400.
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _quoted(job_id: str) -> str:
    return quote(job_id, safe="")


__all__ = ["Appended", "AsyncClient", "ServerError"]
