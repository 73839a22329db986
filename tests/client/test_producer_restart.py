"""A producer killed (SIGKILL) mid-job and started again with the same ``run_key`` leaves
the job's log with every step once, in order: no duplicate, no gap.

The producer is a real subprocess reporting through the sync client. The kill comes right
after it printed that a chosen step was acknowledged (not after a sleep), while it sends the
next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobfeed_client import Client
from tests.procs import ServerProcess

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
WAIT = 60.0


def start_producer(url: str, job_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.client.producer", url, job_id, "run-1", str(STEPS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("kill_after", [0, 7, 23])
def test_killed_producer_restarted_leaves_no_duplicate_and_no_gap(
    shared_server: ServerProcess, kill_after: int
) -> None:
    job_id = f"restart-{kill_after}-{os.urandom(4).hex()}"
    first = start_producer(shared_server.url, job_id)
    assert first.stdout is not None
    try:
        for line in first.stdout:
            if line.strip() == f"step {kill_after}":
                break
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(WAIT)
        first.stdout.close()
    assert first.returncode == -signal.SIGKILL

    second = start_producer(shared_server.url, job_id)
    out, _ = second.communicate(timeout=WAIT)
    assert second.returncode == 0, out

    with Client(shared_server.url) as client:
        events = list(client.events(job_id))
        snapshot = client.get_job(job_id)
    types = Counter(e.type for e in events)
    assert types["created"] == 1
    assert types["completed"] == 1
    assert events[-1].type == "completed"
    assert [e.message for e in events if e.type == "log"] == [f"step {i}" for i in range(STEPS)]
    assert [e.data for e in events if e.type == "step.done"] == [{"i": i} for i in range(STEPS)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert (snapshot.status, snapshot.current, snapshot.total) == ("completed", STEPS, STEPS)
