"""``python -m bench.append_path``: the server's CPU per appended event, without HTTP.

The bench's producers' bodies go through what an append does after the request is read:
``parse_json``, ``parse_append_body`` and ``Writer.append`` on a real SQLite file (durability
normal, so that the disk does not pace it), from concurrent producers in one process. It
prints CPU seconds (the process's, SQLite threads included) per event, best of three runs.
A third shape is the producer stream's (W1i): each producer keeps a window of single-event
requests in flight (``Writer.submit_append``), each frame parsed and each answer built as
``handlers/ingest.py`` does, without the socket.

Unlike the workloads' server CPU, this barely moves with the machine's load: a run does a
fixed amount of work and the best of three is taken, so two commits can be compared on a
busy machine (``git archive`` one into a directory, ``PYTHONPATH=<dir>``, as
docs/performance.md does). It says nothing about HTTP, which W1 and W1b measure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import structlog
import uvloop

from server.__main__ import _tune_gc
from server.appends import ack_frame, append_ack, parse_append
from server.config import load_config
from server.handlers.request import parse_json
from server.hub import Hub
from server.models import parse_append_body
from server.store import Store
from server.tenancy import JobKey

from .loadgen import progress_event


async def cpu_per_event(batch: int, requests: int, producers: int, window: int = 1) -> float:
    """µs of process CPU per event for ``requests`` appends of ``batch`` events; with a
    ``window``, each producer pipelines that many single-event frames as W1i does."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-path-") as tmp:
        config = load_config(
            None,
            environ={
                "JOBFEED_STORAGE__PATH": str(Path(tmp) / "jobfeed.db"),
                "JOBFEED_STORAGE__DURABILITY": "normal",
                "JOBFEED_STORAGE__MAX_PENDING_APPENDS": str(max(10_000, producers * window)),
            },
        )
        store = Store(config, Hub(config.stream.cache_events_per_job, config.stream.cache_bytes))
        await store.open()
        try:
            keys = [JobKey("default", f"producer-{i:02d}") for i in range(producers)]
            for key in keys:
                await store.writer.create_job(key, "bench", None)
            event = progress_event(3)
            raw = orjson.dumps(event if batch == 1 else {"events": [event] * batch})

            async def produce(key: JobKey) -> None:
                for _ in range(requests // producers):
                    events, errors = parse_append_body(parse_json(raw), batch)
                    assert not errors, errors
                    await store.writer.append(key, events)

            frame = orjson.dumps({"type": "append", "ref": 0, "job_id": "x", "event": event})

            async def pipeline(key: JobKey) -> None:
                room = asyncio.Semaphore(window)
                in_flight: asyncio.Queue[tuple[int, asyncio.Future[Any]]] = asyncio.Queue()

                async def answer() -> None:
                    for _ in range(requests // producers):
                        ref, future = await in_flight.get()
                        ack_frame(ref, append_ack(await future))
                        room.release()

                answering = asyncio.create_task(answer())
                for ref in range(requests // producers):
                    message = orjson.loads(frame)
                    events = parse_append(key.job_id, message["event"], config.limits)
                    await room.acquire()
                    in_flight.put_nowait((ref, store.writer.submit_append(key, events)))
                await answering

            started = time.process_time()
            work = pipeline if window > 1 else produce
            await asyncio.gather(*(work(key) for key in keys))
            cpu = time.process_time() - started
        finally:
            await store.close()
    return cpu / (requests // producers * producers * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.append_path", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per shape; the best is kept")
    args = parser.parse_args()
    # The writer logs each group at debug level: not part of what is measured.
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    _tune_gc()  # as ``jobfeed serve`` does once it listens: the collector's cost is the server's
    for batch, requests, producers, window in (
        (1, 4_000, 32, 1),
        (100, 400, 8, 1),
        (1, 64_000, 32, 1_000),
    ):
        best = min(
            uvloop.run(cpu_per_event(batch, requests, producers, window)) for _ in range(args.runs)
        )
        shape = f"{window} in flight" if window > 1 else f"{batch} event(s) per request"
        print(f"{shape}, {producers} producers: {best:.1f} us CPU per event")


if __name__ == "__main__":
    main()
