"""The reporter's coalescing rules (``jobfeed_client.outbox``), under hypothesis, with the
server's own reducer (``server.snapshot``) as the oracle.

For any sequence of reporter calls, sent in batches taken at any points (a batch in flight
while more calls arrive included):
- log lines, custom events and terminal events all go out, once, in order, with their keys;
- phase changes all go out, in order;
- at every one of those events, and at the end, the job's snapshot is what it would have been
  had every progress update been sent on its own;
- an event handed out for sending never changes afterwards (a retry resends it byte for byte).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jobfeed_client.outbox import Outbox
from server.snapshot import JobState, apply_event, progress_in_context

BATCH_EVENTS = 4
BATCH_BYTES = 10_000


@st.composite
def calls(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Valid reporter calls: ("progress", fields, changes_phase) / ("event", body) /
    ("take",) / ("ack",). Counts respect current <= total against the running values."""
    result: list[tuple[Any, ...]] = []
    current: int | None = None
    total: int | None = None
    phase: str | None = None
    in_flight = False
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["progress"] * 4 + ["log", "custom", "take", "ack"]))
        if kind == "progress":
            fields: dict[str, Any] = {}
            if draw(st.booleans()):
                new_total = draw(st.integers(current or 0, 20))
                fields["total"] = total = new_total
            if draw(st.booleans()):
                fields["current"] = current = draw(
                    st.integers(0, total if total is not None else 20)
                )
            if not fields and draw(st.booleans()):
                fields["progress"] = draw(st.floats(0, 100))
            if draw(st.integers(0, 3)) == 0:
                fields["phase"] = draw(st.sampled_from(["fetch", "build", "test"]))
            if draw(st.booleans()):
                fields["message"] = draw(st.sampled_from(["a", "b", "c"]))
            if not fields:  # integers within 64 bits: the server refuses others (422)
                fields["data"] = {"n": draw(st.integers(-(2**63), 2**63 - 1))}
            changes = "phase" in fields and fields["phase"] != phase
            phase = fields.get("phase", phase)
            result.append(("progress", fields, changes))
        elif kind in ("log", "custom"):
            result.append(("event", {"type": "log" if kind == "log" else "step.done"}))
        elif kind == "take" and not in_flight:
            in_flight = True
            result.append(("take",))
        elif kind == "ack" and in_flight:
            in_flight = False
            result.append(("ack",))
    result.append(("event", {"type": "completed"}))
    return result


def run_outbox(script: list[tuple[Any, ...]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(what the calls would send one by one, what the outbox sent), in order."""
    outbox = Outbox()
    uncoalesced: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    in_flight: list[dict[str, Any]] = []
    frozen: list[dict[str, Any]] = []
    for n, call in enumerate(script):
        key = f"r.{n}"
        if call[0] == "progress":
            fields, changes = call[1], call[2]
            uncoalesced.append({"type": "progress", **fields, "key": key})
            outbox.add_progress(key, dict(fields), phase_changes=changes)
        elif call[0] == "event":
            body = {**call[1], "key": key}
            uncoalesced.append(body)
            outbox.add(dict(body))
        elif call[0] == "take":
            in_flight = outbox.take_batch(BATCH_EVENTS, BATCH_BYTES)
            frozen = copy.deepcopy(in_flight)
        elif call[0] == "ack":
            assert in_flight == frozen, "an event changed after it was handed out"
            sent.extend(in_flight)
            outbox.acknowledged()
            in_flight = []
    if in_flight:
        assert in_flight == frozen
        sent.extend(in_flight)
        outbox.acknowledged()
    while outbox.waiting:
        batch = outbox.take_batch(BATCH_EVENTS, BATCH_BYTES)
        assert 1 <= len(batch) <= BATCH_EVENTS
        sent.extend(batch)
        outbox.acknowledged()
    assert len(outbox) == 0
    return uncoalesced, sent


def server_states(bodies: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(type, snapshot fields) after each event, as the server would store and fold them."""
    ts = "2026-11-28T00:00:00.000000Z"
    created = {"job_id": "j", "seq": 1, "id": 1, "type": "created", "ts": ts}
    state: JobState = apply_event(None, created)
    states = []
    for seq, body in enumerate(bodies, start=2):
        fields = {k: v for k, v in body.items() if k not in ("type", "key")}
        if body["type"] == "progress":
            fields = progress_in_context(fields, state)
        event = {"job_id": "j", "seq": seq, "id": seq, "type": body["type"], "ts": ts, **fields}
        state = apply_event(state, event)
        view = state.to_dict()
        # The rate estimate is made from the samples the server gets: merged updates are
        # fewer samples, a different window (docs/protocol.md, "Rate and ETA").
        for moving in ("last_seq", "updated_at", "rate", "eta_seconds", "rate_window"):
            view.pop(moving)
        states.append((body["type"], view))
    return states


@settings(max_examples=400)
@given(calls())
def test_coalescing_keeps_every_other_event_and_the_snapshot(script: list[tuple[Any, ...]]) -> None:
    """Nothing but progress updates is merged, and merging never changes what a reader of the
    snapshot sees at any event that was kept."""
    uncoalesced, sent = run_outbox(script)
    assert [b for b in sent if b["type"] != "progress"] == [
        b for b in uncoalesced if b["type"] != "progress"
    ]
    keys = [b["key"] for b in sent]
    assert len(keys) == len(set(keys))

    def phases(bodies: list[dict[str, Any]]) -> list[str]:
        seen: list[str] = []
        for body in bodies:
            if "phase" in body and (not seen or seen[-1] != body["phase"]):
                seen.append(body["phase"])
        return seen

    assert phases(sent) == phases(uncoalesced)
    kept = [view for kind, view in server_states(sent) if kind != "progress"]
    expected = [view for kind, view in server_states(uncoalesced) if kind != "progress"]
    assert kept == expected


def test_progress_updates_between_flushes_become_one_event() -> None:
    """Within one flush interval the latest progress wins: many updates, one event."""
    outbox = Outbox()
    for i in range(1, 101):
        outbox.add_progress(f"k{i}", {"current": i, "total": 100}, phase_changes=False)
    assert outbox.bodies() == [{"type": "progress", "current": 100, "total": 100, "key": "k1"}]
    assert outbox.merged == 99


def test_nothing_merges_into_an_event_in_flight() -> None:
    """An update after a batch was handed out becomes a new event: the one in flight keeps
    its body, so its retry is recognised as a duplicate by its key."""
    outbox = Outbox()
    outbox.add_progress("k1", {"current": 1, "total": 3}, phase_changes=False)
    batch = outbox.take_batch(10, 10_000)
    outbox.add_progress("k2", {"current": 2}, phase_changes=False)
    assert batch == [{"type": "progress", "current": 1, "total": 3, "key": "k1"}]
    assert [b["key"] for b in outbox.bodies()] == ["k1", "k2"]
