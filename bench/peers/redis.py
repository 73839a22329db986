"""Redis Streams as a peer of jobfeed in W1-W5: Debian's ``redis-server``, started here on a
free loopback port from a fresh directory with its append-only file on, driven through
redis-py's asyncio connections with the hiredis reply parser (the lean client the issue asks
for; ``Client`` says why not through the ``Redis`` client's command layer).

A job's log is the stream ``job:<job_id>``. An event is one entry of two fields: ``e``, the
JSON a jobfeed producer posts (``data.t`` set just before the XADD is sent, for latency), and
``n``, the producer's counter (1, 2, ...). Readers check order by ``n``: Redis ids
(``<ms>-<n>``) only ever increase, so they would show a duplicate but never a hole.
Subscribers follow with ``XREAD BLOCK 0 COUNT 1000`` from the last id they have, one
connection each.

Redis lacks some of what jobfeed does, so each phase is measured with the nearest equivalent
and its notes say which: no job to create and no snapshot to keep (a bare XADD); no batch
append (a pipeline of XADDs, not a transaction); no push to subscribers (a blocking XREAD per
connection); no hello and no terminal event that closes streams (a replay reads until it has
the count it was told).

Each phase carries the name of the jobfeed phase it compares with and a ``ceiling`` label
starting ``"Redis Streams"``, so the report sets the two side by side. jobfeed's
``durability=full`` compares with ``appendfsync always``, ``normal`` with ``everysec``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio
from redis.typing import EncodableT

from .. import loadgen, server, subscribers
from ..fleet import Link, Workers
from ..ingest import w1i_name
from ..loadgen import READY_TIMEOUT, CpuWindow, bounded_gather
from ..profiles import Profile
from ..stats import Phase, latency_ms, samples
from ..streams import w5_label
from ..workloads import (
    ACK_QUANTILES,
    GATHER_SLACK,
    append_metrics,
    cpu_during,
    live_phase,
    order_notes,
    run_async,
    run_live,
    run_producers,
    split,
    w1_name,
    w1b_name,
    w2_name,
    w3_name,
    w4_name,
)

REDIS_SERVER = Path("/usr/bin/redis-server")
INSTALL_TIMEOUT = 900.0  # apt-get update and install, from a slow mirror
ALWAYS, EVERYSEC = "always", "everysec"  # appendfsync: jobfeed's "full" and "normal"
READ_COUNT = 1000  # entries per XREAD reply at most
PRELOAD_BATCH = 1000  # XADDs per pipeline when W5 loads its stream
CONNECT_PARALLEL = 100  # subscriber connections opened at once, as jobfeed's W3/W4 do


def label(fsync: str) -> str:
    """The ``ceiling`` label of a phase: the prefix the report and ``bench.targets`` match."""
    return f"Redis Streams, appendfsync {fsync}"


# -- the server --------------------------------------------------------------------------------


def ensure_redis_server() -> Path:
    """Debian's ``redis-server``, installed with apt-get when missing (a fresh CI machine).

    The package's postinst may start a system redis on 6379; nothing here talks to it: every
    phase starts its own server on a free port (``redis_server``).
    """
    if REDIS_SERVER.exists():
        return REDIS_SERVER
    if os.geteuid() != 0:
        raise server.ServerError(
            f"{REDIS_SERVER} is missing and installing it needs root: apt-get install redis-server"
        )
    install = ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
    failed = _apt(install)
    if failed:  # a fresh image has no package lists (or stale ones): fetch them and retry
        failed = _apt(["apt-get", "update"]) or _apt(install)
    if failed or not REDIS_SERVER.exists():
        raise server.ServerError(f"could not install redis-server: {failed or 'no binary'}")
    return REDIS_SERVER


def _apt(argv: list[str]) -> str:
    """Run an apt-get command unattended and bounded; the tail of its output if it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv)}: {exc}"
    if done.returncode == 0:
        return ""
    return f"{' '.join(argv)} exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}"


def server_args(workdir: Path, port: int, fsync: str) -> list[str]:
    """The whole configuration, on the command line: loopback only, the append-only file
    fsynced ``always`` or ``everysec``, no RDB snapshots, one I/O thread (the default,
    stated), logging into ``workdir``."""
    return [
        "--bind",
        server.HOST,
        "--port",
        str(port),
        "--dir",
        str(workdir),
        "--appendonly",
        "yes",
        "--appendfsync",
        fsync,
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
        "--logfile",
        str(workdir / "redis.log"),
        "--io-threads",
        "1",
    ]


@contextlib.contextmanager
def redis_server(fsync: str) -> Iterator[server.ServerProcess]:
    """A fresh ``redis-server`` in a temporary directory; SIGTERM (then SIGKILL) on exit."""
    binary = ensure_redis_server()
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-redis-") as tmp:
        process = _start(binary, Path(tmp), fsync)
        with server.running(process):
            yield process


def _free_port() -> int:
    """A loopback port nothing listens on now (redis-server's ``--port 0`` means no TCP)."""
    with socket.socket() as sock:
        sock.bind((server.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _start(binary: Path, workdir: Path, fsync: str) -> server.ServerProcess:
    port = _free_port()
    log_path = workdir / "redis.log"
    argv = [str(binary), *server_args(workdir, port, fsync)]
    # What redis-server says before --logfile takes over lands in the same file.
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    # pid, port, cpu_seconds() and stop() (SIGTERM, SIGKILL past STOP_TIMEOUT) as for jobfeed
    process = server.ServerProcess("redis-server", popen, port, workdir, log_path)
    try:
        _await_ping(process)
        holders = server.listening_pids(port)
        if holders != {popen.pid}:
            raise server.ServerError(f"port {port} is held by {holders}, not {popen.pid}")
    except BaseException:
        popen.kill()
        popen.wait(5)
        raise
    return process


def _await_ping(process: server.ServerProcess) -> None:
    """Poll PING until it answers (the append-only file is open by then), the process exits,
    or START_TIMEOUT passes."""
    deadline = time.monotonic() + server.START_TIMEOUT
    client = redis.Redis(
        host=server.HOST, port=process.port, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    try:
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return
            if process.popen.poll() is not None:
                raise server.ServerError(
                    f"redis-server exited {process.popen.returncode} before answering PING:\n"
                    f"{process.log_tail(20)}"
                )
            if time.monotonic() > deadline:
                raise server.ServerError(
                    f"redis-server did not answer PING within "
                    f"{server.START_TIMEOUT} s:\n{process.log_tail(20)}"
                )
            time.sleep(0.02)
    finally:
        client.close()


# -- the client ----------------------------------------------------------------------------------


def client_description() -> str:
    """redis-py's version and the reply parser its asyncio connections use (hiredis's when
    the ``hiredis`` package is installed, else a pure-Python one)."""
    parser = type(redis.asyncio.Connection()._parser).__name__
    lean = "hiredis" if "Hiredis" in parser else "NOT hiredis"
    return f"redis-py {redis.__version__} asyncio connections, {lean} reply parser ({parser})"


class Client:
    """One connection of its own, through redis-py's asyncio connection layer: the hiredis
    parser without the ``Redis`` client's command layer (pool checkout, retry wrapper, a
    reply callback building a dict per stream entry), which here cost 2.5x the CPU per XADD
    (46-58 vs 20 us) and 2x per XREAD (38 vs 18 us), on the two cores the server shares with
    the generators. jobfeed's generators spend ~30 us per HTTP request with aiohttp.

    RESP2 (no HELLO handshake). No reply timeout (redis-py's default 5 s would cut a blocking
    XREAD): the worker's ``time_limit`` bounds every wait.
    """

    def __init__(self, port: int) -> None:
        self.connection = redis.asyncio.Connection(
            host=server.HOST, port=port, protocol=2, socket_timeout=None
        )

    async def open(self) -> None:
        await self.call("PING")  # connects

    async def close(self) -> None:
        await self.connection.disconnect()

    async def call(self, *command: EncodableT) -> Any:
        """One command and its reply; an error reply raises ``redis.ResponseError``."""
        await self.connection.send_command(*command)
        return await self.connection.read_response()

    async def pipeline(self, commands: Sequence[tuple[EncodableT, ...]]) -> None:
        """Commands in one write, then their replies in order (not a transaction)."""
        await self.connection.send_packed_command(self.connection.pack_commands(commands))
        for _ in commands:
            await self.connection.read_response()


def xadd(key: str, n: int) -> tuple[EncodableT, ...]:
    """Event ``n``'s XADD: field ``e`` a jobfeed producer's event (its ``data.t`` now), field
    ``n`` the counter. Readers find them at these places in the entry's field list."""
    return ("XADD", key, "*", "e", loadgen.append_body(1, n), "n", n)


async def xadd_events(client: Client, key: str, first: int, count: int) -> None:
    """Events ``first`` .. ``first + count - 1``: one XADD, or a pipeline of them (Redis has
    no batch append)."""
    await client.pipeline([xadd(key, n) for n in range(first, first + count)])


class Reader(Client, subscribers.SeqCheck):
    """A reader: its connection, its place in a stream, and the order check on ``n``."""

    def __init__(self, port: int) -> None:
        Client.__init__(self, port)
        subscribers.SeqCheck.__init__(self, 0)
        self.last_id: bytes = b"0-0"

    async def xread(self, key: str, *block: str) -> list[list[Any]]:
        """The next entries after ``last_id``, ``[id, [b"e", event, b"n", n]]`` each (RESP2);
        with ``BLOCK`` it waits for one, else it is empty when there is none."""
        reply = await self.call("XREAD", *block, "COUNT", READ_COUNT, "STREAMS", key, self.last_id)
        if not reply:
            return []
        got: list[list[Any]] = reply[0][1]
        return got

    def take(self, got: Sequence[list[Any]]) -> None:
        for _id, (_e, _event, _n, raw) in got:
            self.see(int(raw))
        if got:
            self.last_id = got[-1][0]


# -- producer workers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendSpec:
    """Closed loop, as ``bench.loadgen.AppendSpec``: ``depth`` XADDs (or pipelines of
    ``batch``) in flight per stream, each on its own connection, each answered before the
    slot sends the next."""

    port: int
    keys: tuple[str, ...]
    depth: int
    batch: int
    warmup: float
    duration: float
    time_limit: float


async def append_closed_loop(link: Link, spec: AppendSpec) -> None:
    slots = [(key, Client(spec.port)) for key in spec.keys for _ in range(spec.depth)]
    try:
        await asyncio.gather(*(client.open() for _, client in slots))
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
        w1 = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, w1)
        latencies = array("q")
        counters = dict.fromkeys(spec.keys, 1)  # each stream's next n
        events = last_seq = 0

        async def slot(key: str, client: Client) -> None:
            nonlocal events, last_seq
            while (t0 := time.perf_counter_ns()) < w1:
                first = counters[key]
                counters[key] += spec.batch
                await xadd_events(client, key, first, spec.batch)
                t1 = time.perf_counter_ns()
                last_seq = max(last_seq, first + spec.batch - 1)
                if t0 >= w0 and t1 <= w1:
                    latencies.append(t1 - t0)
                    events += spec.batch

        await asyncio.gather(*(slot(key, client) for key, client in slots))
        link.send(
            "result",
            events=events,
            last_seq=last_seq,  # the highest n acknowledged (one stream: its end)
            latencies=latencies.tobytes(),
            cpu_s=await cpu.result(),
        )
    finally:
        await asyncio.gather(*(client.close() for _, client in slots))


@dataclass(frozen=True)
class PacedSpec:
    """Open loop: ``rate`` events/s to one stream, scheduled by the clock."""

    port: int
    key: str
    rate: float
    warmup: float
    duration: float
    time_limit: float


async def append_paced(link: Link, spec: PacedSpec) -> None:
    """One connection, so that ``n`` is the stream's order: the events that fall due while
    an XADD is unanswered go out together in one pipeline. (jobfeed's producer keeps up to
    32 requests in flight instead, and its seqs are given by the server.)"""
    client = Client(spec.port)
    try:
        await client.open()
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        start = time.perf_counter_ns()
        w0 = start + int(spec.warmup * 1e9)
        end = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, end)
        sent = 0
        while (now := time.perf_counter_ns()) < end:
            due = int((now - start) / 1e9 * spec.rate) - sent
            if due > 0:
                await xadd_events(client, spec.key, sent + 1, due)
                sent += due
            else:
                await asyncio.sleep(0.001)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        link.send(
            "result",
            sent_events=sent,
            sent_rate=sent / elapsed,
            last_seq=sent,
            cpu_s=await cpu.result(),
        )
    finally:
        await client.close()


async def preload(port: int, key: str, events: int) -> None:
    """``events`` entries in pipelines of PRELOAD_BATCH, one at a time on one connection, so
    that ``n`` runs 1..events in the stream's order (4 pipelines in flight would interleave)."""
    client = Client(port)
    try:
        for first in range(1, events + 1, PRELOAD_BATCH):
            await xadd_events(client, key, first, min(PRELOAD_BATCH, events + 1 - first))
    finally:
        await client.close()


# -- subscriber workers --------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowSpec:
    port: int
    key: str
    subscribers: int
    connect_parallel: int
    warmup: float
    duration: float
    time_limit: float


BLOCK = ("BLOCK", "0")  # XREAD waits, without a limit, until there is an entry to return


async def follow(reader: Reader, key: str, recording: subscribers.Recording) -> None:
    """XREAD BLOCK from the reader's place until cancelled; the receipt time is taken as each
    reply arrives, each entry's latency by its send time (as jobfeed's subscribers do)."""
    loads, time_ns = orjson.loads, time.time_ns
    while True:
        got = await reader.xread(key, *BLOCK)
        now = time_ns()
        reader.take(got)
        for _id, (_e, event, _n, _raw) in got:
            recording.count(now, loads(event)["data"]["t"])


async def follow_window(link: Link, spec: FollowSpec) -> None:
    """Live subscribers, as ``bench.subscribers.subscribe_window``: connect, then on ``go``
    record deliveries and latencies over [go + warmup, go + warmup + duration]; stop on
    ``stop``; report."""
    readers = [Reader(spec.port) for _ in range(spec.subscribers)]
    try:
        await bounded_gather([reader.open for reader in readers], spec.connect_parallel)
        recording = subscribers.Recording()
        tasks = [asyncio.create_task(follow(r, spec.key, recording)) for r in readers]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        cpu = recording.open(spec.warmup, spec.duration)
        await link.expect("stop", spec.time_limit)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:  # a reader that died early would otherwise pass for a slow one
            raise failed[0]
        link.send(
            "result",
            deliveries=recording.deliveries,
            latencies=recording.latencies.tobytes(),
            subscribers=[reader.report() for reader in readers],
            cpu_s=await cpu.result(),
        )
    finally:
        await asyncio.gather(*(reader.close() for reader in readers), return_exceptions=True)


@dataclass(frozen=True)
class ReplaySpec:
    port: int
    key: str
    readers: int
    events: int  # each reader reads until it has this many: the whole stream
    cap: float
    time_limit: float


async def read_through(reader: Reader, spec: ReplaySpec) -> None:
    """Page through the stream from its start with XREAD COUNT 1000, parsing each event as
    a consumer would (and as jobfeed's replaying subscribers parse each frame)."""
    loads = orjson.loads
    try:
        await reader.open()
        while reader.count < spec.events:
            got = await reader.xread(spec.key)
            if not got:
                return  # the stream ended short: the report shows the missing events
            reader.take(got)
            for _id, (_e, event, _n, _raw) in got:
                loads(event)
        reader.caught_up_ns = time.time_ns()
    finally:
        await reader.close()


async def replay(link: Link, spec: ReplaySpec) -> None:
    """Replays, as ``bench.subscribers.subscribe_catch_up``: on ``go`` every reader connects
    and reads the stream; the clock runs from ``go`` (connecting included) to the last page,
    or stops at ``spec.cap`` with each reader wherever it got to."""
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    go_ns, cpu0 = time.time_ns(), time.process_time()
    readers = [Reader(spec.port) for _ in range(spec.readers)]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(spec.cap):
            await asyncio.gather(*(read_through(reader, spec) for reader in readers))
    link.send(
        "result",
        go_ns=go_ns,
        end_ns=time.time_ns(),
        subscribers=[reader.report() for reader in readers],
        cpu_s=time.process_time() - cpu0,
    )


# -- the peer runs: W1, W1b, W2 --------------------------------------------------------------


def _note(name: str, fsync: str, text: str) -> str:
    return f"{name} [{label(fsync)}]: {text}"


def closed_loop(profile: Profile, name: str, fsync: str, *, batch: int, depth: int) -> Phase:
    with redis_server(fsync) as process:
        keys = [f"job:producer-{i:02d}" for i in range(profile.producers)]
        specs = [
            AppendSpec(
                process.port,
                share,
                depth,
                batch,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + GATHER_SLACK,
            )
            for share in split(keys, profile.generator_processes)
        ]
        server_cpu, results = run_producers(process, profile, append_closed_loop, specs)
    metrics = append_metrics(results, profile)
    each = (
        "one XADD per event"
        if batch == 1
        else f"a pipeline of {batch} XADDs per request (not a transaction: no batch append)"
    )
    caveat = (
        f"{each} to stream job:<producer>, each in flight on its own connection; no job to "
        f"create and no snapshot to update; {client_description()}"
    )
    # The table says so where the nearest equivalent is not what jobfeed does (a batch).
    ceiling = label(fsync) if batch == 1 else f"{label(fsync)}, pipelines of {batch} XADDs"
    return Phase(
        name,
        metrics,
        server_cpu,
        sum(r["cpu_s"] for r in results),
        [_note(name, fsync, caveat)],
        ceiling,
    )


def w1(profile: Profile) -> list[Phase]:
    return [closed_loop(profile, w1_name(profile), ALWAYS, batch=1, depth=profile.depth)]


def w1b(profile: Profile) -> list[Phase]:
    return [
        closed_loop(
            profile, w1b_name(profile), ALWAYS, batch=profile.batch, depth=profile.batch_depth
        )
    ]


def w2(profile: Profile) -> list[Phase]:
    return [closed_loop(profile, w2_name(profile), EVERYSEC, batch=1, depth=profile.depth)]


# -- W3 and W4: live subscribers with a producer --------------------------------------------


SUBSCRIBER_CAVEAT = (
    "each subscriber is a connection looping XREAD BLOCK 0 COUNT 1000 from its last id "
    "(no server push, hello or terminal close)"
)


def follow_specs(
    process: server.ServerProcess, profile: Profile, key: str, count: int
) -> list[FollowSpec]:
    return [
        FollowSpec(
            process.port,
            key,
            len(share),
            CONNECT_PARALLEL,
            profile.warmup,
            profile.duration,
            time_limit=profile.warmup + profile.duration + 2 * GATHER_SLACK,
        )
        for share in split(range(count), profile.generator_processes)
    ]


def w3(profile: Profile) -> list[Phase]:
    """As ``bench.workloads.w3``: at the specified rate, then (full profile) at a tenth."""
    phases = [live_latency(profile, profile.w3_rate, "W3 live latency")]
    if profile.w3_light:
        light = profile.w3_rate // 10
        phases.append(live_latency(profile, light, "W3 live latency, light load"))
    return phases


def live_latency(profile: Profile, rate: int, title: str) -> Phase:
    name = w3_name(profile, rate, title)
    with redis_server(ALWAYS) as process:
        producer_spec = PacedSpec(
            process.port,
            "job:w3",
            rate,
            profile.warmup,
            profile.duration,
            time_limit=profile.warmup + profile.duration + GATHER_SLACK,
        )
        subscriber_specs = follow_specs(process, profile, "job:w3", profile.w3_subscribers)
        run = run_live(
            process, profile, (follow_window, subscriber_specs), (append_paced, producer_spec)
        )
    caveat = (
        f"{SUBSCRIBER_CAVEAT}; the producer is one connection sending the events that fall "
        f"due while an XADD is unanswered as one pipeline; {client_description()}"
    )
    notes = [_note(name, ALWAYS, caveat)]
    return live_phase(name, run, profile.w3_subscribers, notes, label(ALWAYS))


def w4(profile: Profile) -> list[Phase]:
    """As ``bench.workloads.w4``: one producer of pipelines of ``w4_batch`` XADDs, closed
    loop, while every subscriber follows the stream."""
    name = w4_name(profile)
    with redis_server(ALWAYS) as process:
        producer_spec = AppendSpec(
            process.port,
            ("job:w4",),
            depth=1,
            batch=profile.w4_batch,
            warmup=profile.warmup,
            duration=profile.duration,
            time_limit=profile.warmup + profile.duration + GATHER_SLACK,
        )
        subscriber_specs = follow_specs(process, profile, "job:w4", profile.w4_subscribers)
        with (
            Workers("redis-subscriber", follow_window, subscriber_specs) as subs,
            Workers("redis-producer", append_closed_loop, [producer_spec]) as producer,
        ):
            subs.gather("ready", GATHER_SLACK)
            producer.gather("ready", GATHER_SLACK)
            rss_before = process.rss_bytes()
            subs.send("go")
            producer.send("go")
            server_cpu = cpu_during(process, profile.warmup, profile.duration)
            (produced,) = producer.gather("result", GATHER_SLACK)
            subs.send("stop")
            peak_rss = process.peak_rss_bytes()
            results = subs.gather("result", GATHER_SLACK)
    latencies = samples(r["latencies"] for r in results)
    reports = [s for r in results for s in r["subscribers"]]
    metrics = {
        "deliveries/s": sum(r["deliveries"] for r in results) / profile.duration,
        "appended events/s": produced["events"] / profile.duration,
    }
    metrics.update(latency_ms(latencies, "latency", ACK_QUANTILES))
    metrics["max lag at end, events"] = produced["last_seq"] - min(s["last"] for s in reports)
    metrics["server peak RSS MB"] = peak_rss / 2**20
    what = f"{name} [{label(ALWAYS)}]"
    notes = order_notes(reports, what)
    notes.append(f"{what}: RSS before load {rss_before / 2**20:.0f} MB")
    if not latencies:  # XADD does not wait for readers: they can fall behind without bound
        notes.append(
            f"{what}: no event sent in the window reached a subscriber before the producer "
            f"stopped (the slowest was {metrics['max lag at end, events']:,.0f} events behind)"
        )
    caveat = (
        f"{SUBSCRIBER_CAVEAT}; the producer sends pipelines of {profile.w4_batch} XADDs "
        f"(not transactions); {client_description()}"
    )
    notes.append(_note(name, ALWAYS, caveat))
    generator_cpu = sum(r["cpu_s"] for r in results) + produced["cpu_s"]
    return [Phase(name, metrics, server_cpu, generator_cpu, notes, label(ALWAYS))]


# -- W5: replay --------------------------------------------------------------------------------


def replay_phase(process: server.ServerProcess, profile: Profile, name: str, count: int) -> Phase:
    """As ``bench.streams.replay_ws``: ``count`` readers of the whole stream at once."""
    specs = [
        ReplaySpec(
            process.port,
            "job:w5",
            len(share),
            profile.w5_events,
            profile.w5_replay_cap,
            time_limit=profile.w5_replay_cap + GATHER_SLACK,
        )
        for share in split(range(count), profile.generator_processes)
    ]
    with Workers("redis-replay", replay, specs) as replays:
        replays.gather("ready", GATHER_SLACK)
        cpu0 = process.cpu_seconds()
        replays.send("go")
        results = replays.gather("result", profile.w5_replay_cap + GATHER_SLACK)
        server_cpu = process.cpu_seconds() - cpu0
    return _replay_figures(profile, name, count, results, server_cpu)


def _replay_figures(
    profile: Profile, name: str, count: int, results: list[dict[str, Any]], server_cpu: float
) -> Phase:
    reports = [s for r in results for s in r["subscribers"]]
    go_ns = min(r["go_ns"] for r in results)
    finished = [s for s in reports if s["caught_up_ns"]]
    if len(finished) == count:
        end_ns = max(s["caught_up_ns"] for s in finished)
    else:  # the cap cut the replays short: the rate over the capped window
        end_ns = max(r["end_ns"] for r in results)
    metrics = {"events/s": sum(s["count"] for s in reports) / ((end_ns - go_ns) / 1e9)}
    if count > 1:
        metrics["caught up within the cap"] = len(finished)
    what = f"{name} [{label(ALWAYS)}]"
    notes = order_notes(reports, what)
    if len(finished) < count:
        notes.append(
            f"{what}: {count - len(finished)} of {count} had not caught up when the "
            f"{profile.w5_replay_cap:g} s cap ended the phase (rate over the capped window)"
        )
    caveat = (
        "each reader is a connection paging with XREAD COUNT 1000 from 0 (no hello, no "
        f"snapshot, no WebSocket); {client_description()}"
    )
    notes.append(_note(name, ALWAYS, caveat))
    generator_cpu = sum(r["cpu_s"] for r in results)
    return Phase(name, metrics, server_cpu, generator_cpu, notes, label(ALWAYS))


def w5(profile: Profile) -> list[Phase]:
    """As ``bench.streams.w5`` for what Redis can do: one reader, then concurrent readers
    (jobfeed's SSE and NDJSON readers have no Redis counterpart beyond the same XREAD)."""
    title = w5_label(profile)
    with redis_server(ALWAYS) as process:
        started = time.perf_counter()
        run_async(preload(process.port, "job:w5", profile.w5_events))
        load_rate = profile.w5_events / (time.perf_counter() - started)
        one = replay_phase(process, profile, f"{title}: 1 WS subscriber", 1)
        concurrent = f"{title}: {profile.w5_replays} concurrent WS subscribers"
        many = replay_phase(process, profile, concurrent, profile.w5_replays)
    one.notes.append(
        _note(
            one.name,
            ALWAYS,
            f"loaded in pipelines of {PRELOAD_BATCH:,} XADDs, one at a time on one "
            f"connection (so the counter is the stream's order): {load_rate:,.0f} events/s",
        )
    )
    return [one, many]


# -- W1i: single XADDs pipelined on one connection per producer -------------------------------


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class PipelinedXadds(asyncio.Protocol):
    """One producer's connection: ``window`` XADDs in flight, each reply sending the next in
    the same step, and all the XADDs one read produced in one write. A raw RESP client (the
    replies of XADD are bulk strings or errors, parsed by hand) for the same reason as
    ``bench.ingest``'s producers: a generator lean enough that the server sets the figure."""

    def __init__(self, key: str, window: int) -> None:
        self.key = key.encode()
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.sent_at: collections.deque[int] = collections.deque()
        self.n = 0
        self.w0 = self.w1 = 0
        self.latencies = array("q")
        self.events = 0
        self.errors = 0
        self.tail = b""
        self.drained = asyncio.Event()
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.drained.set()

    def command(self) -> bytes:
        self.n += 1
        n = b"%d" % self.n
        return _resp(b"XADD", self.key, b"*", b"e", loadgen.append_body(1, self.n), b"n", n)

    def start(self, w0: int, w1: int) -> None:
        self.w0, self.w1 = w0, w1
        now = time.perf_counter_ns()
        commands = [self.command() for _ in range(self.window)]
        self.sent_at.extend([now] * len(commands))
        assert self.transport is not None
        self.transport.writelines(commands)

    def data_received(self, data: bytes) -> None:
        data = self.tail + data if self.tail else data
        pos, size, out = 0, len(data), []
        while pos < size:
            end = data.find(b"\r\n", pos)
            if end < 0:
                break
            if data[pos] == 0x24:  # "$": a bulk string, the new entry's id
                length = int(data[pos + 1 : end])
                if size < end + 2 + length + 2:
                    break
                pos, ok = end + 2 + length + 2, True
            else:  # "-": an error
                pos, ok = end + 2, False
            t1 = time.perf_counter_ns()
            t0 = self.sent_at.popleft()
            if not ok:
                self.errors += 1
            elif self.w0 <= t1 <= self.w1:  # acked in the window (bench.ingest says why)
                self.latencies.append(t1 - t0)
                self.events += 1
            if t1 < self.w1:
                out.append(self.command())
                self.sent_at.append(time.perf_counter_ns())
            elif not self.sent_at:
                self.drained.set()
        self.tail = data[pos:]
        if out and self.transport is not None:
            self.transport.writelines(out)


@dataclass(frozen=True)
class PipelinedSpec:
    port: int
    keys: tuple[str, ...]
    window: int
    warmup: float
    duration: float
    time_limit: float


async def append_pipelined(link: Link, spec: PipelinedSpec) -> None:
    loop = asyncio.get_running_loop()
    producers = []
    for key in spec.keys:
        _, producer = await loop.create_connection(
            lambda key=key: PipelinedXadds(key, spec.window),  # type: ignore[misc]
            server.HOST,
            spec.port,
        )
        producers.append(producer)
    try:
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
        w1 = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, w1)
        for producer in producers:
            producer.start(w0, w1)
        await asyncio.sleep(max(0.0, (w1 - time.perf_counter_ns()) / 1e9))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await asyncio.gather(*(p.drained.wait() for p in producers if p.sent_at))
        latencies = array("q")
        for producer in producers:
            latencies.extend(producer.latencies)
        link.send(
            "result",
            events=sum(p.events for p in producers),
            errors=sum(p.errors for p in producers),
            latencies=latencies.tobytes(),
            cpu_s=await cpu.result(),
        )
    finally:
        for producer in producers:
            if producer.transport is not None:
                producer.transport.abort()


def w1i(profile: Profile) -> list[Phase]:
    """``bench.ingest.w1i`` against Redis Streams (appendfsync always): each producer keeps
    ``ingest_window`` single XADDs in flight on its own connection."""
    name = w1i_name(profile)
    peer = label(ALWAYS)
    with redis_server(ALWAYS) as process:
        keys = [f"job:producer-{i:02d}" for i in range(profile.producers)]
        specs = [
            PipelinedSpec(
                process.port,
                share,
                profile.ingest_window,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + 10.0 + GATHER_SLACK,
            )
            for share in split(keys, profile.generator_processes)
        ]
        server_cpu, results = run_producers(process, profile, append_pipelined, specs)
    metrics = append_metrics(results, profile)
    notes = [f"{name} [{peer}]: single XADDs pipelined, {profile.ingest_window} in flight each"]
    errors = sum(r["errors"] for r in results)
    if errors:
        notes.append(f"{name} [{peer}]: {errors} error replies (must be 0)")
    return [Phase(name, metrics, server_cpu, sum(r["cpu_s"] for r in results), notes, ceiling=peer)]
