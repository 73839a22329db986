"""The writer's cache of job states, bounded in count and in measured bytes.

Each append folds its events into the job's state (``server.snapshot``), so the writer keeps
recent states in memory instead of reading and parsing the snapshot from SQLite every time.
A count alone does not bound that memory: a job's metadata, result and error are arbitrary
JSON, and parsed JSON costs far more than its text (64 KB of ``[{}, {}, ...]`` is ~1.5 MB of
Python dicts; 600 such jobs took a gigabyte). So a cached state keeps those three values as
the serialized bytes they have in the snapshot (``JobState.compact``): the fold never reads
them, only copies them into the next snapshot, and ``JobState.to_json`` embeds them as they
are. What is left is a flat object whose size is measured, not estimated
(``JobState.measured_bytes``: ``sys.getsizeof`` of the state and of each value it holds).

(Not named ``jobcache.py``: ``tests/test_install.py`` builds the wheel from the checkout
without files matching ``*cache*``.)
"""

from __future__ import annotations

from collections import OrderedDict

from .snapshot import JobState
from .tenancy import JobKey

# The cache's own cost per entry, on top of the state: the OrderedDict's hash-table slot and
# linked-list node (~100 bytes on CPython 3.11) and the JobKey tuple (~56), rounded up.
ENTRY_OVERHEAD = 192


class JobCache:
    """Job states by job (``JobKey``: tenant and job id), least recently used first; at
    most ``max_jobs`` of them and ``max_bytes`` in all (least recently used evicted first;
    0 bytes caches nothing)."""

    __slots__ = ("_entries", "bytes", "max_bytes", "max_jobs")

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.bytes = 0  # measured size of every cached state, plus ENTRY_OVERHEAD each
        self._entries: OrderedDict[JobKey, tuple[JobState, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: JobKey) -> JobState | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def discard(self, key: JobKey) -> None:
        """Forget one job's state (the job was deleted)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        """Forget every state (after a commit whose outcome is unknown: reload from disk)."""
        self._entries.clear()
        self.bytes = 0

    def put(self, key: JobKey, state: JobState) -> None:
        """Cache ``state`` (compacted) as the most recently used; evict to fit the bounds."""
        compact = state.compact()
        size = compact.measured_bytes() + ENTRY_OVERHEAD
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.bytes -= previous[1]
        self._entries[key] = (compact, size)
        self.bytes += size
        while self._entries and (len(self._entries) > self.max_jobs or self.bytes > self.max_bytes):
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
