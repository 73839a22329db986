"""Fault-injection soak: ``python -m bench.soak --seconds 120 --seed 1`` (not run in CI).

For ``--seconds``, producers append keyed events (single and batches) to several jobs and
subscribers (WebSocket and SSE) follow them, while a supervisor kills the ``jobfeed serve``
process at seeded random moments (SIGKILL or SIGTERM) and starts it again on the same
database file. Each new process listens on a new port; clients find it through the shared
``Address`` (also written to ``<workdir>/address``). Producers retry every request with the
same keys until a 2xx; subscribers resume from the last seq they saw after any drop.
``bench.soak_check`` then checks the clients' records against the final database and the
run prints one summary line; the exit status is 1 when there is any violation.

Everything is bounded in time, listens on 127.0.0.1 only, and every server process started
is killed on the way out (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .server import HOST, REPO, ServerError, _read_listening
from .soak_check import Chain, Records, check

SHUTDOWN_TIMEOUT = 3.0  # server.shutdown_timeout for the soak's servers
STOP_GRACE = SHUTDOWN_TIMEOUT + 10.0  # a SIGTERMed server must exit 0 within this
READY_TIMEOUT = 20.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
RETRY_GRACE = 25.0  # after --seconds: unacknowledged requests keep retrying this long
CATCH_UP_GRACE = 20.0  # after producers stop: subscribers must reach the end of each log
RETRYABLE = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
TERMINALS = ("completed", "failed", "cancelled")


class Address:
    """The current server's base URL, shared by every client and updated on each restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = ""

    def publish(self, url: str) -> None:
        self.url = url
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(url + "\n")
        tmp.replace(self.path)  # atomic: a reader sees the old or the new address


@dataclass
class Counters:
    sigkill: int = 0
    sigterm: int = 0
    reconnects: int = 0
    retries: int = 0


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    address: Address
    records: Records = field(default_factory=Records)
    counters: Counters = field(default_factory=Counters)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    created: dict[str, asyncio.Event] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)  # job -> last_seq once writes stop
    server: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.workdir / "jobfeed.db"

    def violation(self, text: str) -> None:
        self.records.violations.append(text)

    # --- the server process -------------------------------------------------------------

    async def start_server(self) -> None:
        n = len(self.started)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}
        env.update(
            JOBFEED_SERVER__HOST=HOST,
            JOBFEED_SERVER__PORT="0",
            JOBFEED_SERVER__SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
            JOBFEED_STORAGE__PATH=str(self.db),
            JOBFEED_STORAGE__DURABILITY=self.args.durability,
            JOBFEED_LOG__FORMAT="json",
            JOBFEED_LOG__ACCESS="false",
        )
        log_path = self.workdir / f"server-{n:03d}.log"
        popen = _spawn(env, log_path)
        self.started.append(popen)
        listening = await asyncio.to_thread(_read_listening, log_path, popen, f"server-{n}")
        if listening["pid"] != popen.pid:
            raise ServerError(f"listening line has pid {listening['pid']}, started {popen.pid}")
        url = f"http://{HOST}:{listening['port']}"
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:
            while True:
                with contextlib.suppress(*RETRYABLE):
                    async with http.get(url + "/readyz") as response:
                        if response.status == 200:
                            break
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"server-{n} never became ready (exit {popen.poll()})")
                await asyncio.sleep(0.02)
        self.server = popen
        self.address.publish(url)

    async def kill_server(self, signum: int) -> None:
        popen = self.server
        assert popen is not None
        popen.send_signal(signum)
        try:
            code = await asyncio.to_thread(popen.wait, STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.violation(f"pid {popen.pid} still running {STOP_GRACE} s after {signum!r}")
            popen.kill()
            code = await asyncio.to_thread(popen.wait, 10)
        if signum == signal.SIGTERM and code != 0:
            self.violation(f"pid {popen.pid} exited {code} after SIGTERM")
        self.server = None

    async def supervise(self, until: float, rng: random.Random) -> None:
        """Kill the server at random moments until ``until``; start it again each time."""
        while True:
            pause = rng.uniform(self.args.min_up, self.args.max_up)
            if time.monotonic() + pause >= until:
                break
            await asyncio.sleep(pause)
            signum = signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM
            await self.kill_server(signum)
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # clients meet connection refused
            await self.start_server()
            if signum == signal.SIGKILL:
                self.counters.sigkill += 1
            else:
                self.counters.sigterm += 1

    def reap_all(self) -> None:
        for popen in self.started:
            if popen.poll() is None:
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)

    # --- producers ----------------------------------------------------------------------

    async def post(
        self, http: aiohttp.ClientSession, path: str, body: dict[str, Any], until: float
    ) -> tuple[int, Any] | None:
        """POST until a 2xx or a final answer; None if ``until`` passed first."""
        while time.monotonic() < until:
            try:
                async with http.post(self.address.url + path, json=body) as response:
                    status = response.status
                    answer = await response.json(content_type=None)
                if status not in (429, 503):  # both say "try again later"
                    return status, answer
            except RETRYABLE:
                pass
            self.counters.retries += 1
            await asyncio.sleep(random.uniform(0.05, 0.25))
        return None

    async def get_json(self, http: aiohttp.ClientSession, path: str) -> Any:
        """GET until a 200 (retrying through kills), at most READY_TIMEOUT; None after."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(*RETRYABLE):
                async with http.get(self.address.url + path, timeout=REQUEST_TIMEOUT) as response:
                    if response.status == 200:
                        return await response.json()
            await asyncio.sleep(random.uniform(0.05, 0.25))
        return None

    async def create_job(self, job_id: str, until: float) -> None:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:
            result = await self.post(http, "/v1/jobs", {"job_id": job_id, "kind": "soak"}, until)
        if result is None:
            self.violation(f"{job_id}: never created")
            return
        status, answer = result
        # 409 job_exists: an earlier attempt was committed but its answer was lost.
        if status not in (201, 409) or (status == 409 and answer["error"]["code"] != "job_exists"):
            self.violation(f"{job_id}: create answered {status} {answer}")
            return
        self.created[job_id].set()

    async def append(
        self,
        http: aiohttp.ClientSession,
        job_id: str,
        events: list[dict[str, Any]],
        until: float,
    ) -> bool:
        for event in events:
            self.records.sent_types[(job_id, event["key"])] = event["type"]
        body = events[0] if len(events) == 1 else {"events": events}
        result = await self.post(http, f"/v1/jobs/{job_id}/events", body, until)
        if result is None:
            return False
        status, answer = result
        if status not in (200, 201):
            self.violation(f"{job_id}: append {[e['key'] for e in events]} got {status} {answer}")
            return False
        answered = answer["events"]
        if len(answered) != len(events):
            self.violation(f"{job_id}: {len(events)} events sent, {len(answered)} answered")
            return False
        duplicates = {bool(a.get("duplicate")) for a in answered}
        if len(duplicates) != 1 or (status == 200) != (duplicates == {True}):
            self.violation(f"{job_id}: a batch was half a duplicate: {status} {answer}")
        for event, entry in zip(events, answered, strict=True):
            self.records.ack(job_id, event["key"], entry["seq"])
        return True

    async def produce(self, job_id: str, name: str, stop: float, rng: random.Random) -> None:
        await self.created[job_id].wait()
        n = 0
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:
            while time.monotonic() < stop:
                count = 1 if rng.random() < 0.6 else rng.randint(2, 25)
                events = []
                for _ in range(count):
                    n += 1
                    events.append(_event(rng, f"{name}-{n}"))
                await self.append(http, job_id, events, stop + RETRY_GRACE)
                await asyncio.sleep(rng.uniform(0.0, 0.03))

    async def drive_job(self, index: int, job_id: str, stop: float, rng: random.Random) -> None:
        """Create the job, run its producers until ``stop`` (earlier for a job that finishes),
        then, for a finishing job, append its terminal event once they have all returned."""
        span = self.args.seconds
        await asyncio.sleep(rng.uniform(0.0, span * 0.2))
        await self.create_job(job_id, stop + RETRY_GRACE)
        finishes = index % 2 == 1
        job_stop = time.monotonic() + rng.uniform(span * 0.3, span * 0.7) if finishes else stop
        seeds = [rng.random() for _ in range(self.args.producers)]
        await asyncio.gather(
            *(
                self.produce(job_id, f"p{i}", min(job_stop, stop), random.Random(seed))
                for i, seed in enumerate(seeds)
            )
        )
        if not finishes:
            return
        terminal = rng.choice(TERMINALS)
        event: dict[str, Any] = {"type": terminal, "key": "terminal"}
        if terminal == "completed":
            event["result"] = {"index": index}
        elif terminal == "failed":
            event["error"] = {"message": "soak failure", "code": "soak"}
        else:
            event["reason"] = "soak"
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:
            if await self.append(http, job_id, [event], stop + RETRY_GRACE):
                self.records.terminal_acked[job_id] = terminal

    # --- subscribers --------------------------------------------------------------------

    async def subscribe(self, chain: Chain, rng: random.Random, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.created[chain.job_id].wait()
        async with aiohttp.ClientSession() as http:
            if rng.random() < 0.5:  # start somewhere inside the log, not at its beginning
                result = await self.get_json(http, f"/v1/jobs/{chain.job_id}")
                if result is not None:
                    chain.start_after = rng.randint(0, result["last_seq"])
            while not (chain.terminal or chain.gave_up):
                if chain.connections:
                    self.counters.reconnects += 1
                chain.connections += 1
                try:
                    if chain.transport == "ws":
                        await self.read_ws(http, chain)
                    else:
                        await self.read_sse(http, chain, use_header=rng.random() < 0.5)
                except RETRYABLE:
                    pass
                if not (chain.terminal or chain.gave_up):
                    await asyncio.sleep(rng.uniform(0.05, 0.3))

    def received(self, chain: Chain, raw: bytes) -> None:
        event = json.loads(raw)
        chain.events.append(raw)
        if event["type"] in TERMINALS:
            chain.terminal = True

    def hello(self, chain: Chain, frame: dict[str, Any]) -> None:
        if frame.get("after") != chain.last_seq or frame.get("job_id") != chain.job_id:
            self.violation(f"{chain.name}: hello {frame} for after={chain.last_seq}")

    async def read_ws(self, http: aiohttp.ClientSession, chain: Chain) -> None:
        url = f"{self.address.url}/v1/jobs/{chain.job_id}/stream?after={chain.last_seq}"
        async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=2.0)) as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                kind = frame.get("type")
                if "seq" in frame:
                    self.received(chain, msg.data.encode())
                elif kind == "error":
                    self.violation(f"{chain.name}: error frame {frame}")
                elif kind == "hello":
                    self.hello(chain, frame)
            code = ws.close_code
        # 1001/1006/1011/1013 (or none): resume. 1000 before the terminal event, or 4xxx: final.
        if not chain.terminal and (code == 1000 or (code is not None and code >= 4000)):
            self.violation(f"{chain.name}: closed {code} before the terminal event")
            chain.gave_up = True

    async def read_sse(self, http: aiohttp.ClientSession, chain: Chain, use_header: bool) -> None:
        url = f"{self.address.url}/v1/jobs/{chain.job_id}/stream"
        headers = {"Accept": "text/event-stream"}
        if use_header:
            headers["Last-Event-ID"] = str(chain.last_seq)
            url += "?after=0"  # Last-Event-ID takes precedence
        else:
            url += f"?after={chain.last_seq}"
        async with http.get(url, headers=headers) as response:
            if response.status in (429, 503):
                return  # resumed after the backoff
            if response.status != 200:
                self.violation(f"{chain.name}: SSE answered {response.status}")
                chain.gave_up = True
                return
            event_type = event_id = None
            data: bytes | None = None
            while True:
                line = await response.content.readline()
                if not line:
                    break  # ended: by shutdown (resume) or after the terminal event
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event: "):
                    event_type = line[7:].decode()
                elif line.startswith(b"id: "):
                    event_id = line[4:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
                elif line == b"" and data is not None:
                    if event_type == "hello":
                        self.hello(chain, json.loads(data))
                    elif event_type == "error":
                        return  # a retryable refusal as EventSource gets it: resume later
                    else:
                        seq = json.loads(data).get("seq")
                        if event_id != str(seq):
                            self.violation(f"{chain.name}: SSE id {event_id} for seq {seq}")
                        self.received(chain, data)
                    event_type = event_id = data = None

    async def watch(self, task: asyncio.Task[None], chain: Chain, hard_stop: float) -> None:
        """Stop a subscriber once it has the whole log (``targets``) or at ``hard_stop``."""
        while not task.done():
            target = self.targets.get(chain.job_id)
            if target is not None and chain.last_seq >= target:
                break
            if time.monotonic() > hard_stop:
                self.violation(
                    f"{chain.name} ({chain.transport}, {chain.job_id}): stuck at seq "
                    f"{chain.last_seq} of {target} {CATCH_UP_GRACE} s after writes stopped"
                )
                break
            await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def final_targets(self, job_ids: list[str]) -> None:
        async with aiohttp.ClientSession() as http:
            for job_id in job_ids:
                snapshot = await self.get_json(http, f"/v1/jobs/{job_id}")
                if snapshot is not None:
                    self.targets[job_id] = snapshot["last_seq"]

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        rng = random.Random(args.seed)
        job_ids = [f"soak-{args.seed}-{j}" for j in range(args.jobs)]
        self.created = {job_id: asyncio.Event() for job_id in job_ids}
        await self.start_server()
        begin = time.monotonic()
        stop = begin + args.seconds
        drivers = [
            asyncio.create_task(self.drive_job(j, job_id, stop, random.Random(rng.random())))
            for j, job_id in enumerate(job_ids)
        ]
        watchers = []
        for s in range(args.subscribers):
            transport = "ws" if s % 2 == 0 else "sse"
            chain = Chain(f"s{s}", job_ids[s % len(job_ids)], transport, 0)
            self.records.chains.append(chain)
            sub_rng = random.Random(rng.random())
            delay = sub_rng.uniform(0.0, args.seconds * 0.6)
            task = asyncio.create_task(self.subscribe(chain, sub_rng, delay))
            hard_stop = stop + RETRY_GRACE + CATCH_UP_GRACE
            watchers.append(asyncio.create_task(self.watch(task, chain, hard_stop)))
        supervisor = asyncio.create_task(self.supervise(stop, random.Random(rng.random())))
        try:
            try:
                await supervisor
            except ServerError as exc:  # a restart failed: nothing more to soak
                self.violation(f"restart failed: {exc}")
                return
            await asyncio.gather(*drivers)
            await self.final_targets(job_ids)
            await asyncio.gather(*watchers)
        finally:
            for task in [supervisor, *drivers, *watchers]:
                task.cancel()
            await asyncio.gather(supervisor, *drivers, *watchers, return_exceptions=True)
        if self.server is not None:
            await self.kill_server(signal.SIGTERM)  # clean stop: the WAL is checkpointed
        for path in sorted(self.workdir.glob("server-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                        self.violation(f"{path.name}: {line[:300]}")


def _spawn(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``jobfeed serve`` in its own session (Ctrl-C reaches only us; we kill it ourselves),
    stderr to a file so that a chatty server never blocks on a full pipe."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--config", str(REPO / "config.toml")],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )


def _event(rng: random.Random, key: str) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.5:
        return {
            "type": "progress",
            "key": key,
            "progress": round(rng.uniform(0, 100), 2),
            "phase": rng.choice(["fetch", "build", "test"]),
            "message": f"step {key}",
        }
    if roll < 0.8:
        return {"type": "log", "key": key, "message": f"line {key} \u00e9\u2713", "level": "info"}
    return {"type": "stage_completed", "key": key, "data": {"stage": key, "n": rng.randint(0, 9)}}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--producers", type=int, default=3, help="per job")
    parser.add_argument("--subscribers", type=int, default=16)
    parser.add_argument("--min-up", type=float, default=0.3, help="least seconds between kills")
    parser.add_argument("--max-up", type=float, default=5.0, help="most seconds between kills")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    workdir = Path(tempfile.mkdtemp(prefix="jobfeed-soak-"))
    soak = Soak(args, workdir, Address(workdir / "address"))
    violations: list[str] = []
    try:
        asyncio.run(soak.run())
        try:
            violations = check(soak.db, soak.records)
        except Exception as exc:  # e.g. the database cannot be read at all
            violations = [*soak.records.violations, f"check failed: {exc!r}"]
    except KeyboardInterrupt:
        print(f"soak: interrupted; work directory kept: {workdir}", file=sys.stderr)
        return 130
    finally:
        soak.reap_all()
    c = soak.counters
    kills = c.sigkill + c.sigterm
    for line in violations[:30]:
        print(f"violation: {line}", file=sys.stderr)
    print(
        f"soak: events acknowledged {len(soak.records.acks)}, kills survived {kills} "
        f"(SIGKILL {c.sigkill}, SIGTERM {c.sigterm}), reconnects {c.reconnects}, "
        f"violations {len(violations)}"
    )
    received = sum(len(chain.events) for chain in soak.records.chains)
    print(
        f"soak: seed {args.seed}, {args.seconds:g} s, {len(soak.started)} server processes, "
        f"{c.retries} producer retries, {received} events received by "
        f"{len(soak.records.chains)} subscribers",
        file=sys.stderr,
    )
    if violations or args.keep:
        print(f"soak: work directory kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
