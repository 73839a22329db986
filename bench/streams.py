"""W5-W7, the connection-heavy workloads: replays, a reconnect storm, idle subscribers.

Like ``bench.workloads``, each starts its own server on a clean database and returns its
measured phases; W5 and W7 also run against ``bench.rawws`` (``target="raw"``).
"""

from __future__ import annotations

import time

from . import loadgen, server, subscribers
from .fleet import Workers
from .profiles import Profile
from .stats import Phase, latency_ms, samples
from .workloads import (
    GATHER_SLACK,
    Target,
    order_notes,
    run_async,
    split,
    status_notes,
    target_server,
)

# -- W5: replay --------------------------------------------------------------------------------


def replay_ws(
    process: server.ServerProcess, profile: Profile, name: str, job_id: str, count: int
) -> Phase:
    specs = [
        subscribers.SubscribeSpec(
            process.base_url,
            job_id,
            afters=tuple(0 for _ in share),
            connect_parallel=len(share),
            warmup=0.0,
            duration=profile.w5_replay_cap,
            time_limit=profile.w5_replay_cap + GATHER_SLACK,
        )
        for share in split(range(count), profile.generator_processes)
    ]
    with Workers("replay", subscribers.subscribe_catch_up, specs) as replays:
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
    seconds = (end_ns - go_ns) / 1e9
    metrics = {"events/s": sum(s["count"] for s in reports) / seconds}
    if count > 1:
        metrics["caught up within the cap"] = len(finished)
    notes = order_notes(reports, name)
    if len(finished) < count:
        notes.append(
            f"{name}: {count - len(finished)} of {count} had not caught up when the "
            f"{profile.w5_replay_cap:g} s cap ended the phase (rate over the capped window)"
        )
    return Phase(name, metrics, server_cpu, sum(r["cpu_s"] for r in results), notes)


def replay_http(
    process: server.ServerProcess,
    profile: Profile,
    name: str,
    path: str,
    accept: str,
    expect_last: int,
) -> Phase:
    spec = subscribers.StreamSpec(
        process.base_url + path, accept, expect_last, profile.w5_replay_cap + GATHER_SLACK
    )
    with Workers("reader", subscribers.read_http_stream, [spec]) as reader:
        reader.gather("ready", GATHER_SLACK)
        cpu0 = process.cpu_seconds()
        reader.send("go")
        (result,) = reader.gather("result", profile.w5_replay_cap + GATHER_SLACK)
        server_cpu = process.cpu_seconds() - cpu0
    notes = []
    if result["last_seq"] != expect_last or result["events"] != expect_last:
        notes.append(
            f"{name}: read {result['events']} events ending at seq {result['last_seq']}, "
            f"expected {expect_last}"
        )
    metrics = {"events/s": result["events"] / result["seconds"]}
    return Phase(name, metrics, server_cpu, result["cpu_s"], notes)


def w5_label(profile: Profile) -> str:
    """What W5's phase names start with; each adds ``: <reader>`` (``: 1 WS subscriber``)."""
    return f"W5 replay of {profile.w5_events:,} events"


def w5(profile: Profile, target: Target = "jobfeed") -> list[Phase]:
    label = w5_label(profile)
    with target_server(target) as process:
        run_async(loadgen.create_jobs(process.base_url, ["w5"]))
        started, cpu0 = time.perf_counter(), process.cpu_seconds()
        last_seq = run_async(
            loadgen.preload(process.base_url, "w5", profile.w5_events, batch=1000, parallel=4)
        )
        load_rate = profile.w5_events / (time.perf_counter() - started)
        loading = f"{label}: loading in batches of 1,000, 4 in flight"
        phases = [Phase(loading, {"events/s": load_rate}, process.cpu_seconds() - cpu0)]
        phases.append(replay_ws(process, profile, f"{label}: 1 WS subscriber", "w5", 1))
        if target == "jobfeed":
            stream = "/v1/jobs/w5/stream?after=0"
            phases.append(
                replay_http(
                    process,
                    profile,
                    f"{label}: 1 SSE subscriber",
                    stream,
                    "text/event-stream",
                    last_seq,
                )
            )
            export = "/v1/jobs/w5/events?after=0"
            phases.append(
                replay_http(
                    process,
                    profile,
                    f"{label}: NDJSON export",
                    export,
                    "application/x-ndjson",
                    last_seq,
                )
            )
        phases.append(
            replay_ws(
                process,
                profile,
                f"{label}: {profile.w5_replays} concurrent WS subscribers",
                "w5",
                profile.w5_replays,
            )
        )
    return phases


# -- W6: reconnect storm ---------------------------------------------------------------------


def w6(profile: Profile) -> list[Phase]:
    count = profile.w6_subscribers
    name = (
        f"W6 reconnect storm: {count:,} WS on a {profile.w6_events:,}-event job, "
        f"resuming from distinct offsets, producer {profile.w6_rate} events/s"
    )
    with server.jobfeed() as process:
        run_async(loadgen.create_jobs(process.base_url, ["w6"]))
        loaded = run_async(
            loadgen.preload(process.base_url, "w6", profile.w6_events, batch=1000, parallel=4)
        )
        # Distinct resume offsets reaching back step * count events (2,000 in the full
        # profile): the nearer half within the hub's cache of recent frames (1,024 per job),
        # the rest read back from SQLite.
        resume = [max(0, loaded - profile.w6_step * i) for i in range(count)]
        producer_spec = loadgen.PacedSpec(
            process.base_url,
            "w6",
            rate=profile.w6_rate,
            batch=5,
            max_in_flight=8,
            warmup=0.0,
            duration=None,
            finish=True,
            time_limit=3 * profile.w6_cap + GATHER_SLACK,
        )
        shares = split(range(count), profile.generator_processes)
        subscriber_specs = [
            subscribers.SubscribeSpec(
                process.base_url,
                "w6",
                afters=tuple(loaded for _ in share),
                connect_parallel=len(share),
                warmup=0.0,
                duration=profile.w6_cap,
                time_limit=3 * profile.w6_cap + GATHER_SLACK,
                resume_afters=tuple(resume[i] for i in share),
            )
            for share in shares
        ]
        with (
            Workers("producer", loadgen.append_paced, [producer_spec]) as producer,
            Workers("subscriber", subscribers.subscribe_storm, subscriber_specs) as subs,
        ):
            producer.gather("ready", GATHER_SLACK)
            producer.send("go")
            subs.gather("ready", GATHER_SLACK)
            time.sleep(1.0)  # live events flow to every subscriber before the drop
            cpu0 = process.cpu_seconds()
            subs.send("drop", drop_ns=time.time_ns())
            live = subs.gather("live", profile.w6_cap + GATHER_SLACK)
            server_cpu = process.cpu_seconds() - cpu0
            producer.send("stop")
            (produced,) = producer.gather("result", GATHER_SLACK)
            results = subs.gather("result", profile.w6_cap + GATHER_SLACK)
    catch_up = sorted(ns for r in live for ns in r["catch_up_ns"])
    reports = [s for r in results for s in r["subscribers"]]
    final = produced["last_seq"]
    wrong = [
        s
        for s in reports
        if s["holes"]
        or s["duplicates"]
        or s["last"] != final
        or s["count"] != final - s["after"]
        or s["close_code"] != 1000
    ]
    never = sum(1 for ns in catch_up if ns < 0)
    metrics = {
        "all live s": max(catch_up) / 1e9 if not never else float("nan"),
        "catch-up p50 s": catch_up[len(catch_up) // 2] / 1e9,
        "events received after resuming": sum(s["count"] for s in reports),
        "subscribers with a wrong sequence": len(wrong),
    }
    notes = status_notes([produced["statuses"]], name)
    if never:
        notes.append(f"{name}: {never} subscribers not caught up within {profile.w6_cap} s")
    for s in wrong[:3]:
        notes.append(f"{name}: wrong sequence, expected {s['after'] + 1}..{final}: {s}")
    return [
        Phase(name, metrics, server_cpu, sum(r["cpu_s"] for r in live), notes),
    ]


# -- W7: idle subscribers --------------------------------------------------------------------


def w7(profile: Profile, target: Target = "jobfeed", auth: bool = False) -> list[Phase]:
    count = profile.w7_subscribers
    label = f"W7auth {count:,} idle WS, authentication on" if auth else f"W7 {count:,} idle WS"
    # With authentication on, every subscriber sends the same read token (a page's backend
    # would hand each browser a ticket; a service shares its token).
    token = server.bench_token(scope="jobs:read") if auth else ""
    writer = server.bench_token() if auth else ""
    with target_server(target, auth=auth) as process:
        run_async(loadgen.create_jobs(process.base_url, ["w7"], writer))
        specs = [
            subscribers.SubscribeSpec(
                process.base_url,
                "w7",
                afters=tuple(1 for _ in share),
                connect_parallel=50,
                warmup=0.0,
                duration=30.0,
                time_limit=120.0 + GATHER_SLACK,
                authorization=token,
            )
            for share in split(range(count), profile.w7_processes)
        ]
        time.sleep(0.2)
        rss_before = process.rss_bytes()
        cpu0 = process.cpu_seconds()
        with Workers("idle", subscribers.subscribe_idle, specs) as idle:
            ready = idle.gather("ready", 120.0)
            connect_cpu = process.cpu_seconds() - cpu0
            time.sleep(0.5)  # let the allocator settle before reading RSS
            rss_after = process.rss_bytes()
            cpu1 = process.cpu_seconds()
            idle.send("go")
            run_async(loadgen.append_one(process.base_url, "w7", writer))
            results = idle.gather("result", 30.0 + GATHER_SLACK)
            event_cpu = process.cpu_seconds() - cpu1
            idle.send("stop")
    latencies = samples(r["latencies"] for r in results)
    missing = sum(r["missing"] for r in results)
    connect = Phase(
        f"{label}: connect",
        {
            "connect all s": max(r["connect_s"] for r in ready),
            "server RSS KB/connection": (rss_after - rss_before) / count / 1024,
        },
        connect_cpu,
        sum(r["cpu_s"] for r in ready),
    )
    one_event = Phase(
        f"{label}: one event to all",
        latency_ms(latencies, "receipt", (50, 100)),
        event_cpu,
        sum(r["cpu_s"] for r in results),
        [f"{label}: {missing} subscribers never received the event"] if missing else [],
    )
    return [connect, one_event]


def w7_auth(profile: Profile) -> list[Phase]:
    """W7 with authentication on: each idle subscriber opened with a bearer token."""
    return w7(profile, auth=True)
