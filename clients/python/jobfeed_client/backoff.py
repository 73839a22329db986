"""How long to wait before the next attempt: exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential cap) spreads a crowd of clients
that lost the same server over the whole window, so a restart does not bring them all back in
the same millisecond (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015). A
server's ``Retry-After`` is a floor: the jittered delay is added on top of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``base`` seconds for the first retry's window, doubling per failure up to ``cap``."""

    base: float = 0.25
    cap: float = 10.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("RetryPolicy needs 0 < base <= cap")


@dataclass(slots=True)
class Backoff:
    """The failures in a row so far; ``reset()`` on success."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt, counting one more failure."""
        window = min(self.policy.cap, self.policy.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return (retry_after or 0.0) + self.rng.uniform(0.0, window)

    def reset(self) -> None:
        self.failures = 0


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (jobfeed sends whole seconds; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
