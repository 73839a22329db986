"""Job grants: the ``jobs`` claim of a credential, a list of selectors narrowing it to some
jobs of its tenant. A selector is an exact ``job_id`` or a prefix ending in ``*``
(``"build-*"``; ``"*"`` alone is every job). No grants at all means every job of the tenant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_EXACT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]{0,127}\*$")
MAX_SELECTORS = 100  # a credential's list, and a ticket request's


class BadSelector(ValueError):
    """A ``jobs`` entry that is neither a job id nor a ``prefix*``."""


@dataclass(frozen=True, slots=True)
class JobGrants:
    """Exact ids and prefixes; ``covers`` is a set lookup plus one ``startswith`` per prefix."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, selectors: Iterable[object]) -> JobGrants:
        exact: set[str] = set()
        prefixes: list[str] = []
        for count, selector in enumerate(selectors, 1):
            if count > MAX_SELECTORS:
                raise BadSelector(f"at most {MAX_SELECTORS} job selectors")
            if not isinstance(selector, str):
                raise BadSelector("a job selector is a string")
            if _EXACT_RE.match(selector):
                exact.add(selector)
            elif _PREFIX_RE.match(selector):
                prefixes.append(selector[:-1])
            else:
                raise BadSelector(f"{selector[:40]!r} is neither a job id nor a 'prefix*'")
        return cls(frozenset(exact), tuple(sorted(set(prefixes))))

    def covers(self, job_id: str) -> bool:
        return job_id in self.exact or any(job_id.startswith(p) for p in self.prefixes)

    def covers_all_of(self, other: JobGrants) -> bool:
        """True when every job ``other`` grants is granted here (used to narrow tickets)."""
        return all(self.covers(job_id) for job_id in other.exact) and all(
            any(prefix.startswith(mine) for mine in self.prefixes) for prefix in other.prefixes
        )

    def selectors(self) -> list[str]:
        return sorted(self.exact) + [f"{prefix}*" for prefix in self.prefixes]

    def sql_filter(self, column: str) -> tuple[str, list[str | int]]:
        """A WHERE clause (and its parameters) keeping the rows whose ``column`` is covered."""
        parts: list[str] = []
        params: list[str | int] = []
        if self.exact:
            parts.append(f"{column} IN ({','.join('?' * len(self.exact))})")
            params.extend(sorted(self.exact))
        for prefix in self.prefixes:
            # substr, not LIKE or GLOB: no wildcard characters in the prefix to escape.
            parts.append(f"substr({column}, 1, ?) = ?")
            params.extend([len(prefix), prefix])
        if not parts:
            return "0 = 1", []
        return f"({' OR '.join(parts)})", params
