"""An append whose COMMIT fails at the WAL's fsync: the answer says the outcome is unknown,
and what the server serves after that answer is what the file holds after a crash.

When the fsync of the WAL fails, SQLite rolls the transaction back in memory, but its frames
(commit marker included) are already in the ``-wal`` file past the end SQLite uses; a crash
before the next write let recovery replay them, so an append answered 503 reappeared.

The invariant pinned here, for every event of an append answered 503 with an unknown outcome:
1. the answer says so: ``storage_unavailable`` with a detail of type ``outcome_unknown``,
   whose message says that a retry with the same key is safe;
2. the log that the live server serves after that answer is exactly the log a new server
   serves after SIGKILL and restart: an event never appears only after a crash;
3. after the restart, a retry with the same keys is answered from the log: as a duplicate
   with its stored seq if the event is in the log, as a new append otherwise.

The fault is real to the process: ``tests/failsync.c``, an LD_PRELOAD shim compiled here,
fails ``fsync``/``fdatasync`` with EIO on files ending in ``-wal`` while a trigger file
exists. The restart runs without the shim.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Launcher, fold_log, get_snapshot, launching, read_log

WAIT = 20.0
SHIM_SOURCE = Path(__file__).with_name("failsync.c")


@pytest.fixture
def failsync(tmp_path: Path) -> Path:
    """The shim, compiled for this machine (skips when there is no C compiler)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the LD_PRELOAD fsync shim")
    shared = tmp_path / "failsync.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-o", str(shared), str(SHIM_SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return shared


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


def keyed(key: str) -> dict[str, Any]:
    return {"type": "log", "message": f"event {key}", "key": key}


@pytest.mark.process
async def test_failed_fsync_answer_and_log_agree_across_a_crash(
    jobfeed_process: Launcher, failsync: Path
) -> None:
    """See the module docstring: answer, live log and the log after SIGKILL agree."""
    trigger = jobfeed_process.workdir / "FAIL-FSYNC"
    server = await jobfeed_process.start(
        {"LD_PRELOAD": str(failsync), "FAILSYNC_TRIGGER": str(trigger)},
        # Nothing but the appends touches the WAL: no timed checkpoint, no idle probe.
        storage__checkpoint_seconds=3600,
        storage__probe_seconds=3600,
    )
    refused = [keyed("b1"), keyed("b2")]
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "j"}) as response:
            assert response.status == 201, await response.text()
        async with session.post("/v1/jobs/j/events", json=keyed("a")) as response:
            assert response.status == 201, await response.text()

        trigger.touch()
        async with session.post("/v1/jobs/j/events", json={"events": refused}) as response:
            refusal = await response.json()
            assert response.status == 503, refusal
        live_log = await read_log(session, "j")
    server.kill(signal.SIGKILL)
    assert await server.wait_async(WAIT) == -signal.SIGKILL
    trigger.unlink()

    restarted = await jobfeed_process.start()
    async with aiohttp.ClientSession(restarted.url) as session:
        log_after_crash = await read_log(session, "j")
        # 2. What the live server served after its answer is what the file holds.
        assert log_after_crash == live_log, "the log after the crash differs from the live one"
        # 1. The answer said that the outcome is unknown and that a keyed retry is safe.
        error = refusal["error"]
        assert error["code"] == "storage_unavailable", refusal
        assert [d["type"] for d in error["details"]] == ["outcome_unknown"], refusal
        assert "same idempotency keys is safe" in error["message"], refusal
        # 3. A retry with the same keys is answered from the log as it is.
        # Keys are not part of the stored event; each refused event's message is unique.
        stored = {event.get("message"): event for event in log_after_crash}
        async with session.post("/v1/jobs/j/events", json={"events": refused}) as response:
            retry = await response.json()
            assert response.status in (200, 201), retry
        last_seq = log_after_crash[-1]["seq"]
        for event, answer in zip(refused, retry["events"], strict=True):
            if event["message"] in stored:
                assert answer.get("duplicate") is True, retry
                assert answer["seq"] == stored[event["message"]]["seq"], retry
            else:
                assert "duplicate" not in answer, retry
                last_seq += 1
                assert answer["seq"] == last_seq, retry
        final_log = await read_log(session, "j")
        assert [event["seq"] for event in final_log] == list(range(1, last_seq + 1))
        assert await get_snapshot(session, "j") == fold_log(final_log)
