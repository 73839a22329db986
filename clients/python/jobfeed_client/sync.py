"""The sync twins: ``Client``, ``Job``, ``Watch`` and ``Feed``, with the async classes' names and
behaviour, for threads, scripts and Celery workers.

They run the async implementation on a private event loop in a daemon thread (the
"portal"), so retries, coalescing and resumption exist once and behave the same in both
worlds; a reporter's flushes go on in that thread while the caller works. The portal starts
on first use and again in a forked child (a Celery prefork worker that inherited a client
made at import time gets its own loop, not its parent's dead one).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sized
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar

from .backoff import RetryPolicy
from .client import Appended, AsyncClient
from .credentials import TokenProvider
from .events import Event, Snapshot
from .feed import AsyncFeed, FeedItem
from .reporter import AsyncJob, ReporterStats
from .resuming import Transport
from .watch import AsyncWatch

T = TypeVar("T")


class _Portal:
    """An event loop on a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self, on_new_process: Callable[[], None] | None = None) -> None:
        self._on_new_process = on_new_process
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                if self._pid and self._pid != os.getpid() and self._on_new_process:
                    # A forked child: the parent's loop thread does not exist here, and
                    # what was bound to that loop (the connection pool) must not be used.
                    self._on_new_process()
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(loop, ready), name="jobfeed-client", daemon=True
                )
                thread.start()
                ready.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop())
        return future.result()

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and thread is not None and self._pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


class Client:
    """``AsyncClient``'s sync twin: the same arguments, methods and errors."""

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
        self._portal = _Portal(on_new_process=self._forget_parents_pool)
        self._async = AsyncClient(
            url,
            token=token,
            token_provider=token_provider,
            timeout=timeout,
            attempts=attempts,
            retry=retry,
            stream_idle_timeout=stream_idle_timeout,
            refresh_in_band=refresh_in_band,
            flush_interval=flush_interval,
            max_buffered=max_buffered,
            when_full=when_full,
            close_timeout=close_timeout,
            ingest=ingest,
        )
        self.url = self._async.url

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._async.aclose())
        self._portal.stop()

    def _forget_parents_pool(self) -> None:
        self._async.forget_session()

    def job(
        self,
        job_id: str | None = None,
        *,
        kind: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        run_key: str | None = None,
    ) -> Job:
        """A reporter: ``with client.job("build-42", kind="build") as job:``."""
        return Job(
            self._portal, self._async.job(job_id, kind=kind, metadata=metadata, run_key=run_key)
        )

    def watch(
        self,
        job_id: str,
        *,
        after: int = 0,
        epoch: str | None = None,
        snapshot: Snapshot | None = None,
        transport: Transport = "websocket",
    ) -> Watch:
        """``for event in client.watch("build-42"):`` (see ``AsyncClient.watch``)."""
        return Watch(
            self._portal,
            self._async.watch(
                job_id, after=after, epoch=epoch, snapshot=snapshot, transport=transport
            ),
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
    ) -> Feed:
        """``for item in client.feed(prefix="build-"):`` (see ``AsyncClient.feed``)."""
        return Feed(
            self._portal,
            self._async.feed(
                after=after,
                job=job,
                prefix=prefix,
                kind=kind,
                type=type,
                snapshots=snapshots,
                epoch=epoch,
                transport=transport,
            ),
        )

    def create_job(
        self,
        job_id: str | None = None,
        *,
        kind: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        heartbeat_timeout: float | None = None,
    ) -> Snapshot:
        return self._portal.call(
            self._async.create_job(
                job_id, kind=kind, metadata=metadata, heartbeat_timeout=heartbeat_timeout
            )
        )

    def get_job(self, job_id: str) -> Snapshot:
        return self._portal.call(self._async.get_job(job_id))

    def delete_job(self, job_id: str) -> None:
        """``DELETE /v1/jobs/{id}`` (``jobs:admin``); ``JobNotFound`` if there is none."""
        self._portal.call(self._async.delete_job(job_id))

    def jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[Snapshot]:
        return self._iterate(
            self._async.jobs(status=status, kind=kind, limit=limit, page_size=page_size)
        )

    def events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        return self._iterate(self._async.events(job_id, after=after))

    def export(self, job_id: str, *, after: int = 0) -> Iterator[bytes]:
        return self._iterate(self._async.export(job_id, after=after))

    def append(self, job_id: str, *events: Mapping[str, Any]) -> list[Appended]:
        return self._portal.call(self._async.append(job_id, *events))

    def _iterate(self, agen: Any) -> Iterator[Any]:
        return _iterate(self._portal, agen)


def _iterate(portal: _Portal, agen: Any) -> Iterator[Any]:
    """An async iterator's items, one portal call each; closed when the caller stops."""
    try:
        while True:
            try:
                yield portal.call(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        portal.call(agen.aclose())


class Job:
    """``AsyncJob``'s sync twin (same methods, without ``await``)."""

    def __init__(self, portal: _Portal, job: AsyncJob) -> None:
        self._portal = portal
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.job_id

    @property
    def stats(self) -> ReporterStats:
        return self._job.stats

    @property
    def unsent(self) -> int:
        return self._job.unsent

    @property
    def created(self) -> bool | None:
        return self._job.created

    def __enter__(self) -> Job:
        self._portal.call(self._job.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._portal.call(self._job.__aexit__(exc_type, exc, tb))

    def progress(
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
        self._portal.call(
            self._job.progress(
                current,
                total,
                percent=percent,
                fraction=fraction,
                phase=phase,
                message=message,
                data=data,
                key=key,
            )
        )

    def log(
        self,
        message: str,
        *,
        level: str = "info",
        data: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        self._portal.call(self._job.log(message, level=level, data=data, key=key))

    def event(
        self,
        type: str,
        *,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        self._portal.call(self._job.event(type, message=message, data=data, key=key))

    def complete(
        self,
        result: Any = None,
        *,
        message: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._portal.call(self._job.complete(result, message=message, data=data))

    def fail(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._portal.call(self._job.fail(message, code=code, details=details, data=data))

    def cancel(self, reason: str | None = None, *, data: Mapping[str, Any] | None = None) -> None:
        self._portal.call(self._job.cancel(reason, data=data))

    def flush(self, timeout: float | None = None) -> None:
        self._portal.call(self._job.flush(timeout))

    def track(
        self,
        items: Iterable[T],
        *,
        total: int | None = None,
        phase: str | None = None,
        min_interval: float = 0.1,
    ) -> Iterator[T]:
        return track(items, job=self, total=total, phase=phase, min_interval=min_interval)


class Watch:
    """``AsyncWatch``'s sync twin: ``for event in watch``; the same attributes."""

    def __init__(self, portal: _Portal, watch: AsyncWatch) -> None:
        self._portal = portal
        self._watch = watch

    def __iter__(self) -> Iterator[Event]:
        return _iterate(self._portal, self._watch.__aiter__())

    @property
    def job_id(self) -> str:
        return self._watch.job_id

    @property
    def after(self) -> int:
        return self._watch.after

    @property
    def epoch(self) -> str | None:
        return self._watch.epoch

    @property
    def snapshot(self) -> Snapshot | None:
        return self._watch.snapshot

    @property
    def resumes(self) -> int:
        return self._watch.resumes

    @property
    def in_band_refreshes(self) -> int:
        return self._watch.in_band_refreshes

    @property
    def state(self) -> str:
        return self._watch.state


class Feed:
    """``AsyncFeed``'s sync twin: ``for item in feed``; the same attributes."""

    def __init__(self, portal: _Portal, feed: AsyncFeed) -> None:
        self._portal = portal
        self._feed = feed

    def __iter__(self) -> Iterator[FeedItem]:
        return _iterate(self._portal, self._feed.__aiter__())

    @property
    def after(self) -> int | None:
        return self._feed.after

    @property
    def resumes(self) -> int:
        return self._feed.resumes

    @property
    def in_band_refreshes(self) -> int:
        return self._feed.in_band_refreshes

    @property
    def state(self) -> str:
        return self._feed.state


def track(
    items: Iterable[T],
    *,
    job: Job,
    total: int | None = None,
    phase: str | None = None,
    min_interval: float = 0.1,
) -> Iterator[T]:
    """Yield ``items`` and report ``current``/``total`` to ``job`` as they are consumed, the
    tqdm habit: ``for path in track(paths, job=job): ...``. ``total`` defaults to
    ``len(items)`` when it has one. Like tqdm's ``mininterval``, it reports at most every
    ``min_interval`` seconds, and always the final count (updates in between would be
    coalesced by the reporter anyway; skipping them saves a thread hop per item). If the
    loop stops early, the last count reported may be up to ``min_interval`` old."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    if total is not None or phase is not None:
        job.progress(0, total, phase=phase)
    done = 0
    reported_at = time.monotonic()
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - reported_at >= min_interval:
            job.progress(done, total)
            reported_at = now
    job.progress(done, total)
