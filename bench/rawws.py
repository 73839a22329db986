"""The fan-out ceiling: a raw aiohttp server with jobfeed's URLs and frames, nothing else.

No SQLite, no validation, no cursor: a job's events are serialized once into a Python list;
an append sends each new frame to every live socket from the request's own task; a subscriber
first gets ``frames[after:]``, then joins the live set. It runs the same load generators as
jobfeed, so jobfeed's figures can be given as a ratio to what aiohttp alone does on this box.
Terminal events and error cases are not modelled: only what the benchmark's workloads use.

Run as ``python -m bench.rawws --port 0``; it writes jobfeed's JSON ``listening`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import uvloop
from aiohttp import WSMsgType, web

_PAGE = 500  # frames sent between yields to the loop during a replay, as jobfeed's page


@dataclass
class RawJob:
    job_id: str
    frames: list[bytes] = field(default_factory=list)
    live: set[web.WebSocketResponse] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


JOBS = web.AppKey("jobs", dict[str, RawJob])
_NEXT_ID = [1]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _frame(job: RawJob, event: dict[str, Any], ts: str) -> tuple[bytes, dict[str, Any]]:
    seq, event_id = len(job.frames) + 1, _NEXT_ID[0]
    _NEXT_ID[0] += 1
    stored = {"job_id": job.job_id, "seq": seq, "id": event_id, "ts": ts, **event}
    return orjson.dumps(stored), {"seq": seq, "id": event_id, "ts": ts}


async def create_job(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read() or b"{}")
    job = RawJob(body["job_id"])
    request.app[JOBS][job.job_id] = job
    frame, _ = _frame(job, {"type": "created"}, _now())
    job.frames.append(frame)
    return web.Response(
        body=orjson.dumps({"job_id": job.job_id, "last_seq": 1}),
        status=201,
        content_type="application/json",
    )


async def append_events(request: web.Request) -> web.Response:
    job = request.app[JOBS][request.match_info["job_id"]]
    body = orjson.loads(await request.read())
    events = body["events"] if "events" in body and "type" not in body else [body]
    ts = _now()
    async with job.lock:  # one append's frames reach every socket before the next one's
        answers, frames = [], []
        for event in events:
            frame, answer = _frame(job, event, ts)
            job.frames.append(frame)
            frames.append(frame)
            answers.append(answer)
        for ws in list(job.live):
            try:
                for frame in frames:
                    await ws.send_frame(frame, WSMsgType.TEXT)
            except ConnectionError:
                job.live.discard(ws)
    payload = {"job_id": job.job_id, "last_seq": len(job.frames), "events": answers}
    return web.Response(body=orjson.dumps(payload), status=201, content_type="application/json")


async def stream(request: web.Request) -> web.WebSocketResponse:
    job = request.app[JOBS][request.match_info["job_id"]]
    after = int(request.query.get("after", "0"))
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=65536, compress=False)
    await ws.prepare(request)
    hello = {
        "type": "hello",
        "job_id": job.job_id,
        "status": "running",
        "after": after,
        "last_seq": len(job.frames),
    }
    await ws.send_frame(orjson.dumps(hello), WSMsgType.TEXT)
    sent = after
    try:
        while sent < len(job.frames):
            for frame in job.frames[sent : sent + _PAGE]:
                await ws.send_frame(frame, WSMsgType.TEXT)
            sent = min(sent + _PAGE, len(job.frames))
            await asyncio.sleep(0)
        # No await between the last replayed frame and joining: appends after this point
        # send to this socket themselves, so nothing is missed or sent twice.
        job.live.add(ws)
        async for message in ws:
            if message.type == WSMsgType.TEXT and message.data == '{"type": "ping"}':
                await ws.send_str('{"type":"pong"}')
    except ConnectionError:
        pass
    finally:
        job.live.discard(ws)
    return ws


async def ok(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[JOBS] = {}
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_post("/v1/jobs/{job_id}/events", append_events)
    app.router.add_get("/v1/jobs/{job_id}/stream", stream)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    return app


async def serve(port: int) -> None:
    # Sockets still open at SIGTERM are cut after a second; the benchmark closes its own first.
    runner = web.AppRunner(
        create_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    for _host, bound, *_ in runner.addresses:
        line = {"event": "listening", "port": bound, "pid": os.getpid()}
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        sys.stderr.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rawws")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
