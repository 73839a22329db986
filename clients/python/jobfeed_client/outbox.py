"""The reporter's buffer: events waiting for the server, in the order they were reported, with
progress updates coalesced. Pure (no I/O, no clock), so its rules are tested exhaustively.

The rules:
- Log lines, custom events, phase changes and terminal events are kept, in order, each with
  its own key; nothing is ever dropped.
- A progress update that does not change the phase is merged into the buffer's last item
  when that item is a progress update that was never sent: the latest value wins, and the
  merged update leaves the job's snapshot exactly where applying both one after the other
  would. Counts without a percentage are not merged into an update with a percentage, nor
  into one with counts unless the merge carries both ``current`` and a non-zero ``total``:
  whether the server derives the percentage otherwise depends on the job's stored counts,
  which the client may not know. (``progress(i, n)`` in a loop always merges.)
- An item that was handed out for sending is frozen: its key and body never change, so a
  retry after an unknown outcome is recognised by the server as a duplicate.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

_COUNT_FIELDS = ("current", "total")


@dataclass(slots=True)
class Pending:
    """One event waiting to be acknowledged; ``body`` is what will be sent, key included."""

    body: dict[str, Any]
    coalescable: bool
    sent: bool = False


def encoded_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")))


class Outbox:
    """Events not yet acknowledged: ``sending`` (handed out, frozen) then ``waiting``."""

    def __init__(self) -> None:
        self._items: deque[Pending] = deque()
        self._in_flight = 0  # the first _in_flight items were handed out by take_batch
        self.merged = 0  # progress updates folded into an earlier one, for stats and tests

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Items not handed out yet."""
        return len(self._items) - self._in_flight

    def can_merge(self, fields: dict[str, Any], phase_changes: bool) -> bool:
        """Would ``add_progress(fields)`` merge (and so need no room in the buffer)?"""
        if phase_changes or not self._items or self.waiting == 0:
            return False
        tail = self._items[-1]
        if not tail.coalescable or tail.sent:
            return False
        if "progress" in fields or not any(n in fields for n in _COUNT_FIELDS):
            return True
        # Counts without a percentage: the server derives the percentage from the counts
        # as it stores them (the job's own values filling in absent ones). Merging is only
        # safe where the merged update certainly gets it derived: otherwise the percentage
        # the older update set (or had derived) would have stayed, and the merge loses it.
        if "progress" in tail.body:
            return False
        if any(n in tail.body for n in _COUNT_FIELDS):
            merged = {**tail.body, **fields}
            return merged.get("current") is not None and bool(merged.get("total"))
        return True

    def add_progress(self, key: str, fields: dict[str, Any], phase_changes: bool) -> None:
        """A progress update: merged into the unsent progress update at the tail when the
        phase stays, else appended with ``key``. An update that changes the phase is its
        own item; later updates of the same phase may merge into it while it is unsent (it
        stays the phase change, with newer values)."""
        if self.can_merge(fields, phase_changes):
            tail = self._items[-1]
            tail.body = {**tail.body, **fields}
            self.merged += 1
            return
        body = {"type": "progress", **fields, "key": key}
        self._items.append(Pending(body, coalescable=True))

    def add(self, body: dict[str, Any]) -> None:
        """An event that is never merged or dropped (log, custom, terminal; ``key`` set)."""
        self._items.append(Pending(body, coalescable=False))

    def take_batch(self, max_events: int, max_bytes: int) -> list[dict[str, Any]]:
        """The next events to send, oldest first, frozen from now on. The batch never
        exceeds ``max_events`` or ``max_bytes`` (one event alone may, the server decides)."""
        if self._in_flight:
            raise RuntimeError("the previous batch is still in flight")
        batch: list[dict[str, Any]] = []
        size = 2
        for item in self._items:
            # Measured here, once per send, not per report: merges keep changing the body.
            item_size = encoded_size(item.body)
            if batch and (len(batch) >= max_events or size + item_size + 1 > max_bytes):
                break
            item.sent = True
            batch.append(item.body)
            size += item_size + 1
        self._in_flight = len(batch)
        return batch

    def acknowledged(self) -> None:
        """The batch in flight is committed: forget it."""
        for _ in range(self._in_flight):
            self._items.popleft()
        self._in_flight = 0

    def bodies(self) -> list[dict[str, Any]]:
        """Everything buffered, oldest first (for tests and error reports)."""
        return [item.body for item in self._items]
