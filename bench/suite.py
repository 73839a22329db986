"""The benchmark's workloads, each with the ceilings it is measured against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import backup, ceilings, feed, ingest, manyjobs, retention, streams, workloads
from .peers import nats, redis
from .profiles import Profile
from .stats import Phase
from .workloads import Target

Run = Callable[[Profile], list[Phase]]


@dataclass(frozen=True)
class Workload:
    """A workload: jobfeed's run, the machine's ceiling for it, and the peers that can do it.

    A ceiling's or a peer's phases carry the name of the jobfeed phase they compare with and
    a ``ceiling`` label (``"raw aiohttp"``, ``"NATS JetStream, sync always"``), so the report
    puts their figures beside jobfeed's as ratios from the same run.
    """

    key: str
    run: Run
    ceiling: Run | None = None
    peers: tuple[Run, ...] = ()


def _raw(workload: Callable[[Profile, Target], list[Phase]]) -> Run:
    """The workload against ``bench.rawws``: its phases become ceilings of jobfeed's."""

    def run(profile: Profile) -> list[Phase]:
        phases = workload(profile, "raw")
        for phase in phases:
            phase.ceiling = ceilings.RAW
        return phases

    return run


SUITE = (
    Workload("W1", workloads.w1, ceilings.w1_ceilings, peers=(nats.w1, redis.w1)),
    Workload("W1b", workloads.w1b, ceilings.w1b_ceilings, peers=(nats.w1b, redis.w1b)),
    Workload("W2", workloads.w2, ceilings.w2_ceilings, peers=(nats.w2, redis.w2)),
    Workload("W3", workloads.w3, _raw(workloads.w3), peers=(nats.w3, redis.w3)),
    Workload("W4", workloads.w4, _raw(workloads.w4), peers=(redis.w4,)),
    Workload("W5", streams.w5, _raw(streams.w5), peers=(nats.w5, redis.w5)),
    Workload("W6", streams.w6),
    Workload("W7", streams.w7, _raw(streams.w7)),
    Workload("W8", manyjobs.w8, _raw(manyjobs.w8)),
    Workload("W9", feed.w9),
    Workload("W10", feed.w10),
    # Authentication on, against W1 and W7 of the same run (bench.targets).
    Workload("W1auth", workloads.w1_auth),
    Workload("W7auth", streams.w7_auth),
    # /metrics scraped during W1, against W1 of the same run (bench.targets).
    Workload("W1metrics", workloads.w1_metrics),
    # W3 while retention purges 1,000,000 events, against W3 beside them (bench.retention).
    Workload("W3retention", retention.w3_retention),
    # Pipelined over the producer stream (GET /v1/ingest), beside the peers pipelining theirs.
    Workload("W1i", ingest.w1i, peers=(redis.w1i,)),
    Workload("W2i", ingest.w2i, peers=(nats.w2i,)),
    # W1 while `jobfeed backup` copies a 1M-event database, against W1 on it without (same run).
    Workload("W1backup", backup.w1_backup),
)
