"""How big and how long: the full benchmark (< 15 min with the peers, on 2 cores) and
``--quick`` (a smoke check, ~1.5 min).

The full profile holds the workload sizes the benchmark is specified with; ``--quick`` keeps
every code path but shrinks counts and windows, so its figures are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    warmup: float  # seconds of load before a measured window opens
    duration: float  # seconds in a measured window
    generator_processes: int = 2
    # W1 / W1b / W2: closed-loop producers, one job each
    producers: int = 32
    depth: int = 4  # requests in flight per producer (single events)
    batch_depth: int = 2  # requests in flight per producer (batches): 32*2*100 < max_pending
    batch: int = 100
    # W1i / W2i: requests in flight per producer on the producer stream (GET /v1/ingest)
    ingest_window: int = 1_000
    # W3: paced producer, live subscribers
    w3_rate: int = 1_000
    w3_subscribers: int = 100
    w3_light: bool = True  # also at a tenth of the rate, where the machine is not saturated
    # W4: one job, many subscribers, producer as fast as the server allows
    w4_subscribers: int = 1_000
    w4_batch: int = 100
    # W5: replay
    w5_events: int = 100_000
    w5_replays: int = 100
    w5_replay_cap: float = 5.0  # seconds the concurrent replays may take (10M frames do not fit)
    # W6: reconnect storm
    w6_subscribers: int = 1_000
    w6_events: int = 10_000
    w6_rate: int = 50  # events/s the producer keeps appending (x subscribers = live fan-out)
    w6_step: int = 2  # resume offsets: last_seq - step * i, one per subscriber
    w6_cap: float = 30.0
    # W7: idle subscribers
    w7_subscribers: int = 10_000
    w7_processes: int = 4
    # W8: many jobs, one producer and one subscriber each
    w8_jobs: int = 1_000
    w8_rate: float = 2.0  # events/s per job
    # W9: feed fan-out, many jobs, WebSocket feed subscribers with ten filters
    w9_subscribers: int = 1_000
    w9_jobs: int = 1_000
    # W10: feed replay over SSE, no filter and a 1 % filter
    w10_events: int = 1_000_000
    # ceilings
    sqlite_seconds: float = 3.0


FULL = Profile(name="full", runs=3, warmup=1.0, duration=4.0)

QUICK = Profile(
    name="quick",
    runs=1,
    warmup=0.3,
    duration=1.0,
    w3_light=False,
    w4_subscribers=200,
    w5_events=20_000,
    w5_replays=20,
    w5_replay_cap=3.0,
    w6_subscribers=200,
    w6_events=2_000,
    w6_cap=10.0,
    w7_subscribers=1_000,
    w7_processes=2,
    w8_jobs=200,
    w9_subscribers=200,
    w9_jobs=200,
    w10_events=100_000,
    sqlite_seconds=1.0,
)
