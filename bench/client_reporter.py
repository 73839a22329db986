"""``python -m bench.client_reporter [URL]``: what the Python client's reporter costs.

Against a running server (``make run``, or URL / $JOBFEED_URL): ``track()`` over 100,000
items (sync and async) and 20,000 ``log()`` calls (sync and async), each into a new job.
Throwaway figures for docs/python-client.md; not part of ``make bench``.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from jobfeed_client import AsyncClient, Client, track

ITEMS = 100_000
LINES = 20_000


def _line(what: str, count: int, seconds: float, requests: int) -> None:
    print(
        f"{what:<12} {count:>7} in {seconds:5.2f} s: {count / seconds:>9.0f}/s, "
        f"{seconds / count * 1e6:6.1f} us each, {requests} requests"
    )


def _sync(url: str | None) -> None:
    with Client(url) as client:
        started = time.perf_counter()
        with client.job(f"bench-track-{uuid.uuid4().hex[:8]}") as job:
            for _ in track(range(ITEMS), job=job):
                pass
        _line("sync track", ITEMS, time.perf_counter() - started, job.stats.requests)
        started = time.perf_counter()
        with client.job(f"bench-log-{uuid.uuid4().hex[:8]}") as job:
            for i in range(LINES):
                job.log(f"line {i}")
        _line("sync log", LINES, time.perf_counter() - started, job.stats.requests)


async def _async(url: str | None) -> None:
    async with AsyncClient(url) as client:
        started = time.perf_counter()
        async with client.job(f"bench-track-{uuid.uuid4().hex[:8]}") as job:
            async for _ in job.track(range(ITEMS)):
                pass
        _line("async track", ITEMS, time.perf_counter() - started, job.stats.requests)
        started = time.perf_counter()
        async with client.job(f"bench-log-{uuid.uuid4().hex[:8]}") as job:
            for i in range(LINES):
                await job.log(f"line {i}")
        _line("async log", LINES, time.perf_counter() - started, job.stats.requests)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else None
    _sync(url)
    asyncio.run(_async(url))


if __name__ == "__main__":
    main()
