"""The soak's verdict: the clients' records against the final database, read-only.

``Records`` is what the soak's clients wrote down while the server was being killed:
every acknowledged ``(job, key) -> seq`` and every subscriber's received events, one
``Chain`` per subscriber (its connections one after the other, each resumed from the last
seq it saw). ``check`` opens the database file with ``mode=ro`` after the last server has
stopped cleanly and returns one line per violation.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.models import TERMINAL_TYPES
from server.snapshot import JobState, apply_event


@dataclass
class Chain:
    """One subscriber's history: every event it received, across all its connections."""

    name: str
    job_id: str
    transport: str
    start_after: int
    events: list[bytes] = field(default_factory=list)  # each event's JSON as received
    connections: int = 0
    terminal: bool = False  # received the terminal event (the stream then ended)
    gave_up: bool = False  # a final refusal (4xxx, 404, ...): reported, not retried

    @property
    def last_seq(self) -> int:
        return self.start_after + len(self.events)


@dataclass
class Records:
    acks: dict[tuple[str, str], int] = field(default_factory=dict)  # (job, key) -> seq
    sent_types: dict[tuple[str, str], str] = field(default_factory=dict)  # (job, key) -> type
    terminal_acked: dict[str, str] = field(default_factory=dict)  # job -> terminal type
    chains: list[Chain] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # seen live by the clients

    def ack(self, job_id: str, key: str, seq: int) -> None:
        known = self.acks.setdefault((job_id, key), seq)
        if known != seq:
            self.violations.append(f"{job_id} key {key}: acknowledged at seq {known} and {seq}")


@dataclass
class StoredJob:
    status: str
    last_seq: int
    snapshot: dict[str, Any]
    events: list[tuple[int, int, str, str | None, str]]  # seq, id, type, key, body


def read_database(db: Path) -> dict[str, StoredJob]:
    uri = f"file:{db}?mode=ro"
    jobs: dict[str, StoredJob] = {}
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        for job_id, status, last_seq, snapshot in conn.execute(
            "SELECT job_id, status, last_seq, snapshot FROM jobs"
        ):
            jobs[job_id] = StoredJob(status, last_seq, json.loads(snapshot), [])
        rows = conn.execute("SELECT job_id, seq, id, type, key, body FROM events ORDER BY id")
        for job_id, seq, event_id, event_type, key, body in rows:
            if job_id not in jobs:
                jobs[job_id] = StoredJob("?", -1, {}, [])
            jobs[job_id].events.append((seq, event_id, event_type, key, body))
    return jobs


def _check_log(job_id: str, job: StoredJob, out: list[str]) -> None:
    seqs = [seq for seq, *_ in job.events]
    if seqs != list(range(1, len(seqs) + 1)):
        holes = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))[:5]
        out.append(f"{job_id}: seqs in id order are not 1..{len(seqs)} (missing {holes})")
        return
    if job.last_seq != len(seqs):
        out.append(f"{job_id}: jobs.last_seq {job.last_seq} but the log has {len(seqs)}")
    state: JobState | None = None
    for seq, event_id, event_type, _key, body in job.events:
        event = json.loads(body)
        head = (event.get("job_id"), event.get("seq"), event.get("id"), event.get("type"))
        if head != (job_id, seq, event_id, event_type):
            out.append(f"{job_id} seq {seq}: body {head} disagrees with its row")
        if (seq == 1) != (event_type == "created"):
            out.append(f"{job_id} seq {seq}: type {event_type!r}")
        if event_type in TERMINAL_TYPES and seq != len(seqs):
            out.append(f"{job_id}: terminal {event_type} at seq {seq} of {len(seqs)}")
        try:
            state = apply_event(state, event)
        except (ValueError, KeyError) as exc:
            out.append(f"{job_id} seq {seq}: cannot fold: {exc}")
            return
    if state is None or state.to_dict() != job.snapshot:
        out.append(f"{job_id}: stored snapshot {job.snapshot} != fold of its log")
    elif job.status != state.status:
        out.append(f"{job_id}: jobs.status {job.status} != snapshot status {state.status}")


def _check_chain(chain: Chain, job: StoredJob | None, out: list[str]) -> None:
    where = (
        f"subscriber {chain.name} ({chain.transport}, {chain.job_id}, after {chain.start_after})"
    )
    if job is None:
        out.append(f"{where}: job not in the database")
        return
    bodies = [body.encode() for *_, body in job.events]
    for index, raw in enumerate(chain.events):
        seq = chain.start_after + index + 1
        got = json.loads(raw).get("seq")
        if got != seq:
            out.append(f"{where}: event #{index + 1} has seq {got}, expected {seq} (hole/dup)")
            return
        if seq > len(bodies) or bodies[seq - 1] != raw:
            out.append(f"{where}: seq {seq} differs from the stored event")
            return
    if chain.terminal and chain.last_seq != len(bodies):
        out.append(f"{where}: stream ended at seq {chain.last_seq}, log ends at {len(bodies)}")


def check(db: Path, records: Records) -> list[str]:
    """Every violation the final database and the clients' records show together."""
    out = list(records.violations)
    jobs = read_database(db)
    for job_id, job in sorted(jobs.items()):
        _check_log(job_id, job, out)
    stored: dict[tuple[str, str], tuple[int, str]] = {}
    for job_id, job in jobs.items():
        for seq, _id, event_type, key, _body in job.events:
            if key is None:
                continue
            if (job_id, key) in stored:
                out.append(
                    f"{job_id} key {key}: stored twice (seq {stored[(job_id, key)][0]}, {seq})"
                )
            stored[(job_id, key)] = (seq, event_type)
    for (job_id, key), seq in sorted(records.acks.items()):
        found = stored.get((job_id, key))
        if found is None:
            out.append(f"{job_id} key {key}: acknowledged at seq {seq}, not in the log (lost)")
        elif found[0] != seq:
            out.append(f"{job_id} key {key}: acknowledged at seq {seq}, stored at {found[0]}")
        elif found[1] != (sent := records.sent_types.get((job_id, key))):
            out.append(f"{job_id} key {key}: sent {sent}, stored {found[1]}")
    for job_id, terminal in sorted(records.terminal_acked.items()):
        status = jobs[job_id].status if job_id in jobs else None
        if status != terminal:
            out.append(f"{job_id}: terminal {terminal} acknowledged, status is {status}")
    for chain in records.chains:
        _check_chain(chain, jobs.get(chain.job_id), out)
    return out
