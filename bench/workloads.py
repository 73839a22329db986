"""Workloads W1-W4 (appends, live latency, fan-out) and what all workloads share; W5-W7 are
in ``bench.streams``. Each starts its own server on a clean database, drives it from
generator processes, and returns its measured phases.

``target`` is ``"jobfeed"`` or ``"raw"`` (``bench.rawws``, the fan-out ceiling): W3, W4, W5 and
W7 run unchanged against both, so each jobfeed figure has a raw aiohttp figure beside it.
Server CPU is read from /proc over the same window the generators measure their own.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import uvloop

from . import loadgen, server, subscribers
from .fleet import Worker, Workers, WorkerSpec
from .profiles import Profile
from .stats import Phase, latency_ms, samples

Target = Literal["jobfeed", "raw"]
T = TypeVar("T")

GATHER_SLACK = 60.0  # seconds a phase may overrun its nominal length before it is an error
ACK_QUANTILES = (50, 99)
LIVE_QUANTILES = (50, 99, 99.9, 100)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


def split(items: Sequence[T], parts: int) -> list[tuple[T, ...]]:
    """``items`` in ``parts`` contiguous shares (no empty share)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        shares.append(tuple(items[start:end]))
        start = end
    return shares


@contextlib.contextmanager
def target_server(
    target: Target, durability: str = "full", auth: bool = False
) -> Iterator[server.ServerProcess]:
    """``auth``: jobfeed with authentication on (``server.AUTH_SETTINGS``)."""
    if target == "jobfeed":
        settings = server.AUTH_SETTINGS if auth else {}
        with server.jobfeed(durability, **settings) as process:
            yield process
    else:
        with server.raw_ws() as process:
            yield process


def cpu_during(process: server.ServerProcess, warmup: float, duration: float) -> float:
    """Server CPU seconds over [now + warmup, now + warmup + duration] (sleeps through it)."""
    time.sleep(warmup)
    before = process.cpu_seconds()
    time.sleep(duration)
    return process.cpu_seconds() - before


def order_notes(reports: Sequence[dict[str, Any]], what: str) -> list[str]:
    holes = sum(r["holes"] for r in reports)
    duplicates = sum(r["duplicates"] for r in reports)
    if holes or duplicates:
        return [f"{what}: {holes} missing and {duplicates} duplicate seqs (must be 0)"]
    return []


def status_notes(statuses: Sequence[dict[int, int]], what: str) -> list[str]:
    refused: dict[int, int] = {}
    for counts in statuses:
        for status, count in counts.items():
            if status not in (200, 201):
                refused[status] = refused.get(status, 0) + count
    return [f"{what}: answers other than 201: {refused}"] if refused else []


def run_producers(
    process: server.ServerProcess, profile: Profile, worker: Worker, specs: Sequence[WorkerSpec]
) -> tuple[float, list[dict[str, Any]]]:
    """Closed-loop producers over the profile's window: the server's CPU and their results."""
    with Workers("producer", worker, specs) as producers:
        producers.gather("ready", GATHER_SLACK)
        producers.send("go")
        server_cpu = cpu_during(process, profile.warmup, profile.duration)
        results = producers.gather("result", GATHER_SLACK)
    return server_cpu, results


def append_metrics(results: Sequence[dict[str, Any]], profile: Profile) -> dict[str, float]:
    """Acknowledged events/s and ack latency p50/p99 of ``run_producers``' results."""
    latencies = samples(r["latencies"] for r in results)
    metrics = {"events/s": sum(r["events"] for r in results) / profile.duration}
    metrics.update(latency_ms(latencies, "ack", ACK_QUANTILES))
    return metrics


# -- W1, W1b, W2: closed-loop appends --------------------------------------------------------


def closed_loop_append(
    profile: Profile,
    name: str,
    *,
    batch: int,
    depth: int,
    durability: str = "full",
    target: Target = "jobfeed",
    auth: bool = False,
    scrape_seconds: float = 0.0,
) -> list[Phase]:
    """``scrape_seconds``: GET /metrics this often while the producers run (0: never)."""
    with target_server(target, durability, auth) as process:
        job_ids = [f"producer-{i:02d}" for i in range(profile.producers)]
        # With authentication on, one token per producer, granted its own job only.
        tokens = {j: server.bench_token(jobs=[j]) if auth else "" for j in job_ids}
        run_async(
            loadgen.create_jobs(process.base_url, job_ids, server.bench_token() if auth else "")
        )
        specs = [
            loadgen.AppendSpec(
                process.base_url,
                share,
                depth,
                batch,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + GATHER_SLACK,
                tokens=tuple(tokens[j] for j in share),
            )
            for share in split(job_ids, profile.generator_processes)
        ]
        with Scraper(process.base_url, scrape_seconds) as scraper:
            server_cpu, results = run_producers(process, profile, loadgen.append_closed_loop, specs)
    metrics = append_metrics(results, profile)
    notes = status_notes([r["statuses"] for r in results], name) + scraper.notes()
    return [Phase(name, metrics, server_cpu, sum(r["cpu_s"] for r in results), notes)]


class Scraper:
    """GET ``/metrics`` every ``interval`` seconds from a thread, as Prometheus would (its
    default is every 15 s); ``interval`` 0 does nothing."""

    def __init__(self, base_url: str, interval: float) -> None:
        self.url = f"{base_url}/metrics"
        self.interval = interval
        self.scrapes = self.failures = self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    self.bytes = len(response.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1

    def notes(self) -> list[str]:
        if self.interval <= 0:
            return []
        notes = [
            f"/metrics scraped {self.scrapes} times, every {self.interval:g} s "
            f"({self.bytes:,} bytes each)"
        ]
        if self.failures or not self.scrapes:
            notes.append(f"/metrics scrapes failed: {self.failures} (must be 0)")
        return notes


def w1_name(profile: Profile) -> str:
    return (
        f"W1 durable append: {profile.producers} producers x {profile.depth} in flight, "
        "1 event/request, full"
    )


def w1b_name(profile: Profile) -> str:
    return (
        f"W1b durable append: {profile.producers} producers x {profile.batch_depth} in flight, "
        f"{profile.batch} events/request, full"
    )


def w2_name(profile: Profile) -> str:
    return (
        f"W2 append: {profile.producers} producers x {profile.depth} in flight, "
        "1 event/request, normal"
    )


def w1(profile: Profile) -> list[Phase]:
    return closed_loop_append(
        profile, w1_name(profile), batch=1, depth=profile.depth, durability="full"
    )


def w1_auth_name(profile: Profile) -> str:
    return (
        f"W1auth durable append, authentication on: {profile.producers} producers x "
        f"{profile.depth} in flight, 1 token per producer, 1 event/request, full"
    )


def w1_auth(profile: Profile) -> list[Phase]:
    """W1 with authentication on: every request carries its producer's bearer token."""
    return closed_loop_append(
        profile, w1_auth_name(profile), batch=1, depth=profile.depth, durability="full", auth=True
    )


def w1_metrics_name(profile: Profile) -> str:
    return (
        f"W1metrics durable append, /metrics scraped every {METRICS_SCRAPE_SECONDS:g} s: "
        f"{profile.producers} producers x {profile.depth} in flight, 1 event/request, full"
    )


# 15 times Prometheus's default interval: the scrape's own cost shows, if it has one.
METRICS_SCRAPE_SECONDS = 1.0


def w1_metrics(profile: Profile) -> list[Phase]:
    """W1 with /metrics scraped while it runs. The counters are moved in every run (they
    are plain integers, with no switch); what this adds is the scrape itself."""
    return closed_loop_append(
        profile,
        w1_metrics_name(profile),
        batch=1,
        depth=profile.depth,
        durability="full",
        scrape_seconds=METRICS_SCRAPE_SECONDS,
    )


def w1b(profile: Profile) -> list[Phase]:
    return closed_loop_append(
        profile,
        w1b_name(profile),
        batch=profile.batch,
        depth=profile.batch_depth,
        durability="full",
    )


def w2(profile: Profile) -> list[Phase]:
    return closed_loop_append(
        profile, w2_name(profile), batch=1, depth=profile.depth, durability="normal"
    )


# -- W3 and W4: live subscribers with a producer ---------------------------------------------


def live_subscribers(
    process: server.ServerProcess, profile: Profile, job_id: str, count: int
) -> list[subscribers.SubscribeSpec]:
    return [
        subscribers.SubscribeSpec(
            process.base_url,
            job_id,
            afters=tuple(0 for _ in share),
            connect_parallel=100,
            warmup=profile.warmup,
            duration=profile.duration,
            time_limit=profile.warmup + profile.duration + 2 * GATHER_SLACK,
        )
        for share in split(range(count), profile.generator_processes)
    ]


def w3(profile: Profile, target: Target = "jobfeed") -> list[Phase]:
    """At the specified rate, then (full profile) at a tenth of it, below saturation here."""
    phases = live_latency(profile, target, profile.w3_rate, "W3 live latency")
    if profile.w3_light:
        light = profile.w3_rate // 10
        phases += live_latency(profile, target, light, "W3 live latency, light load")
    return phases


def w3_name(profile: Profile, rate: int, title: str) -> str:
    return f"{title}: {rate:,} events/s → {profile.w3_subscribers} WS"


@dataclass(frozen=True)
class LiveRun:
    """What a live-latency run (jobfeed's or a peer's) brought back."""

    server_cpu: float
    produced: dict[str, Any]
    results: list[dict[str, Any]]


def run_live(
    process: server.ServerProcess,
    profile: Profile,
    subscriber: tuple[Worker, Sequence[WorkerSpec]],
    producer: tuple[Worker, WorkerSpec],
) -> LiveRun:
    """Subscribers and one paced producer started together; the producer's window, then
    half a second for the last events to arrive, then the subscribers stop."""
    sub_worker, sub_specs = subscriber
    producer_worker, producer_spec = producer
    with (
        Workers("subscriber", sub_worker, sub_specs) as subs,
        Workers("producer", producer_worker, [producer_spec]) as producers,
    ):
        subs.gather("ready", GATHER_SLACK)
        producers.gather("ready", GATHER_SLACK)
        subs.send("go")
        producers.send("go")
        server_cpu = cpu_during(process, profile.warmup, profile.duration)
        (produced,) = producers.gather("result", GATHER_SLACK)
        time.sleep(0.5)  # the last events reach every subscriber
        subs.send("stop")
        results = subs.gather("result", GATHER_SLACK)
    return LiveRun(server_cpu, produced, results)


def live_phase(
    name: str, run: LiveRun, subscribers_count: int, notes: list[str], ceiling: str | None = None
) -> Phase:
    """The latency phase of a ``run_live``: quantiles, order and missing deliveries."""
    latencies = samples(r["latencies"] for r in run.results)
    reports = [s for r in run.results for s in r["subscribers"]]
    expected = run.produced["sent_events"] * subscribers_count
    received = sum(s["count"] for s in reports)
    metrics = {"producer events/s": run.produced["sent_rate"]}
    metrics.update(latency_ms(latencies, "latency", LIVE_QUANTILES))
    what = name if ceiling is None else f"{name} [{ceiling}]"
    notes = order_notes(reports, what) + notes
    if received < expected:
        notes.append(f"{what}: {expected - received} of {expected} deliveries never arrived")
    generator_cpu = sum(r["cpu_s"] for r in run.results) + run.produced["cpu_s"]
    return Phase(name, metrics, run.server_cpu, generator_cpu, notes, ceiling)


def w3_load(
    process: server.ServerProcess, profile: Profile, rate: int
) -> tuple[loadgen.PacedSpec, list[subscribers.SubscribeSpec]]:
    """W3's job (created here), its producer of ``rate`` single events a second, and its
    live subscribers: W3 and W3retention run the same load."""
    run_async(loadgen.create_jobs(process.base_url, ["w3"]))
    producer_spec = loadgen.PacedSpec(
        process.base_url,
        "w3",
        rate=rate,
        batch=1,
        max_in_flight=32,
        warmup=profile.warmup,
        duration=profile.duration,
        finish=False,
        time_limit=profile.warmup + profile.duration + GATHER_SLACK,
    )
    return producer_spec, live_subscribers(process, profile, "w3", profile.w3_subscribers)


def live_latency(profile: Profile, target: Target, rate: int, title: str) -> list[Phase]:
    name = w3_name(profile, rate, title)
    with target_server(target) as process:
        producer_spec, subscriber_specs = w3_load(process, profile, rate)
        run = run_live(
            process,
            profile,
            (subscribers.subscribe_window, subscriber_specs),
            (loadgen.append_paced, producer_spec),
        )
    notes = status_notes([run.produced["statuses"]], name)
    return [live_phase(name, run, profile.w3_subscribers, notes)]


def w4_name(profile: Profile) -> str:
    return (
        f"W4 fan-out: {profile.w4_subscribers:,} WS, producer batches of {profile.w4_batch} "
        "as fast as allowed"
    )


def w4(profile: Profile, target: Target = "jobfeed") -> list[Phase]:
    name = w4_name(profile)
    with target_server(target) as process:
        run_async(loadgen.create_jobs(process.base_url, ["w4"]))
        producer_spec = loadgen.AppendSpec(
            process.base_url,
            ("w4",),
            depth=1,
            batch=profile.w4_batch,
            warmup=profile.warmup,
            duration=profile.duration,
            time_limit=profile.warmup + profile.duration + GATHER_SLACK,
        )
        subscriber_specs = live_subscribers(process, profile, "w4", profile.w4_subscribers)
        with (
            Workers("subscriber", subscribers.subscribe_window, subscriber_specs) as subs,
            Workers("producer", loadgen.append_closed_loop, [producer_spec]) as producer,
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
    # How far behind the log's end the slowest subscriber was when the producer stopped.
    metrics["max lag at end, events"] = produced["last_seq"] - min(s["last"] for s in reports)
    metrics["server peak RSS MB"] = peak_rss / 2**20
    notes = order_notes(reports, name)
    notes += status_notes([produced["statuses"]], name)
    notes.append(f"{name} [{target}]: RSS before load {rss_before / 2**20:.0f} MB")
    return [
        Phase(
            name,
            metrics,
            server_cpu,
            sum(r["cpu_s"] for r in results) + produced["cpu_s"],
            notes,
        )
    ]
