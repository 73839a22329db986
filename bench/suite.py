"""The benchmark's workloads, each with the ceilings it is measured against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ceilings, streams, workloads
from .profiles import Profile
from .stats import Phase
from .workloads import Target

Run = Callable[[Profile], list[Phase]]


@dataclass(frozen=True)
class Workload:
    key: str
    run: Run
    ceiling: Run | None = None


def _raw(workload: Callable[[Profile, Target], list[Phase]]) -> Run:
    """The workload against ``bench.rawws``: its phases become ceilings of jobfeed's."""

    def run(profile: Profile) -> list[Phase]:
        phases = workload(profile, "raw")
        for phase in phases:
            phase.ceiling = ceilings.RAW
        return phases

    return run


SUITE = (
    Workload("W1", workloads.w1, ceilings.w1_ceilings),
    Workload("W1b", workloads.w1b, ceilings.w1b_ceilings),
    Workload("W2", workloads.w2, ceilings.w2_ceilings),
    Workload("W3", workloads.w3, _raw(workloads.w3)),
    Workload("W4", workloads.w4, _raw(workloads.w4)),
    Workload("W5", streams.w5, _raw(streams.w5)),
    Workload("W6", streams.w6),
    Workload("W7", streams.w7, _raw(streams.w7)),
)
