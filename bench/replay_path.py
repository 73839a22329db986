"""``python -m bench.replay_path``: a reconnect storm's per-subscriber CPU, without HTTP.

Two shapes, each run three times, best taken (a fixed amount of work: it barely moves with
the machine's load, so two commits can be compared on a busy machine with ``git archive``
and ``PYTHONPATH``, as docs/performance.md does):

- ``cursor``: W6's cursors. A job of 10,000 events, another cursor keeping its channel; 1,000
  ``JobReader`` resume at distinct offsets (``last_seq - 2 i``) one after another, as the
  handler opens them (the hub's marks taken before the head), and read to the end of the log.
  CPU per subscriber, SQLite thread included.
- ``write``: their pages on the wire. The same frames in pages of 500 (parts of
  ``WRITE_PART_BYTES``) and in pushes of 5 frames, written to a loopback socket that another
  process reads, as a gathered write of header and JSON per frame (``writelines``) and as one
  joined buffer (``write``). CPU per frame (pages) and per push, uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import uvloop

from server.config import load_config
from server.follow import Cursor, JobReader
from server.frames import WRITE_PART_BYTES, Frame, parts_of, within_bytes
from server.hub import Hub
from server.models import ProgressIn
from server.store import Store
from server.tenancy import JobKey

EVENTS = 10_000
SUBSCRIBERS = 1_000
STEP = 2  # W6's distance between resume offsets
PAGE_EVENTS = 500


async def cursor_storm() -> float:
    """CPU seconds per subscriber of one storm (the best of three)."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-replay-") as tmp:
        config = load_config(None, environ={"JOBFEED_STORAGE__PATH": str(Path(tmp) / "db")})
        hub = Hub(config.stream.cache_events_per_job, config.stream.cache_bytes)
        store = Store(config, hub)
        await store.open()
        key = JobKey("default", "w6")
        await store.writer.create_job(key, None, None)
        for start in range(0, EVENTS - 1, 1000):
            events = [ProgressIn(type="progress", message=f"step {n}") for n in range(1000)]
            await store.writer.append(key, list(events[: EVENTS - 1 - start]))
        head = await store.job_head(key)
        assert head is not None
        keeper = JobReader(
            store, hub, Cursor(key, head.last_seq), head, page_events=1, page_bytes=1
        )
        await keeper.open()
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for i in range(SUBSCRIBERS):
                marks: dict[str, Any] = {"deletion_mark": hub.deletions}
                if hasattr(hub, "channels_opened"):
                    marks["channel_mark"] = hub.channels_opened
                now = await store.job_head(key)
                assert now is not None
                reader = JobReader(
                    store,
                    hub,
                    Cursor(key, now.last_seq - STEP * i),
                    now,
                    page_events=PAGE_EVENTS,
                    page_bytes=config.stream.page_bytes,
                    **marks,
                )
                await reader.open()
                while await reader.next_batch():
                    pass
                reader.close()
            best = min(best, (time.process_time() - started) / SUBSCRIBERS)
        keeper.close()
        await store.close()
        return best


def _sink(ports: multiprocessing.Queue[int]) -> None:
    async def serve() -> None:
        async def discard(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            while await reader.read(1 << 20):
                pass

        server = await asyncio.start_server(discard, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.sleep(3600)

    uvloop.run(serve())


class _Flow(asyncio.Protocol):
    """Pauses at the transport's high-water mark, as aiohttp's flow control does."""

    def __init__(self) -> None:
        self.resumed: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resumed is not None:
            self.resumed.set_result(None)
            self.resumed = None


def _parts(frames: list[Frame]) -> list[bytes]:
    parts: list[bytes] = []
    for frame in frames:
        parts.append(frame.ws_header)
        parts.append(frame.json)
    return parts


async def write_shapes(port: int, frames: list[Frame]) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    shapes: dict[str, Callable[[asyncio.Transport, list[Frame]], None]] = {
        "writelines": lambda transport, batch: transport.writelines(_parts(batch)),
        "joined": lambda transport, batch: transport.write(b"".join(_parts(batch))),
    }
    best: dict[str, float] = {}
    for _ in range(3):
        for name, write in shapes.items():
            for kind in ("page", "push"):
                transport, flow = await loop.create_connection(_Flow, "127.0.0.1", port)
                count, started = 0, time.process_time()
                for round_ in range(40):
                    after = (round_ * 7) % 2000
                    if kind == "push":
                        batches = [frames[n : n + 5] for n in range(after, after + 5000, 5)]
                    else:
                        batches = []
                        while after < len(frames):
                            page = within_bytes(frames[after : after + PAGE_EVENTS], 1 << 20)
                            batches.extend(parts_of(page, WRITE_PART_BYTES))
                            after = page[-1].seq
                    for batch in batches:
                        write(transport, batch)
                        count += len(batch) if kind == "page" else 1
                        if flow.resumed is not None:
                            await flow.resumed
                per = (time.process_time() - started) / count
                label = f"{name} {kind}"
                best[label] = min(best.get(label, float("inf")), per)
                transport.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_path")
    parser.add_argument("--shape", choices=["cursor", "write", "both"], default="both")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.shape in ("cursor", "both"):
        per = uvloop.run(cursor_storm())
        print(f"cursor: {per * 1e6:.1f} us CPU per resuming subscriber (1,000 on 10,000 events)")
    if args.shape in ("write", "both"):
        frames = [
            Frame("w6", seq, seq, "progress", "2026-11-28T14:00:00.000000Z", b"x" * 180)
            for seq in range(1, 4097)
        ]
        ports: multiprocessing.Queue[int] = multiprocessing.Queue()
        sink = multiprocessing.Process(target=_sink, args=(ports,), daemon=True)
        sink.start()
        try:
            best = uvloop.run(write_shapes(ports.get(timeout=30), frames))
        finally:
            sink.terminate()
        for label, per in best.items():
            unit = "frame" if label.endswith("page") else "push of 5 frames"
            print(f"write, {label}: {per * 1e9:.0f} ns CPU per {unit}")


if __name__ == "__main__":
    main()
