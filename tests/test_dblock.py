"""One jobfeed process per database file: a second ``serve`` or a ``migrate`` on a file that a
running server uses is refused with one line and exit 1, and the running server goes on
unharmed; the lock dies with its process (SIGKILL leaves no stale lock).

Two real processes: a ``jobfeed serve`` child (tests/procs.py) and the CLI run beside it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.procs import Launcher, launching, read_log
from tests.test_integrity import one_line
from tests.test_migrate import run_cli

WAIT = 20.0


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


def config_of(launcher: Launcher) -> Path:
    """The config file the launcher wrote for its children (the same database file)."""
    return launcher.workdir / "jobfeed-test.toml"


@pytest.mark.process
async def test_second_server_on_the_same_file_refuses_to_start(
    jobfeed_process: Launcher,
) -> None:
    """A second ``jobfeed serve`` on the file a running server uses exits 1 with one line
    naming the file and the first server's pid; the first one still appends and is ready."""
    first = await jobfeed_process.start()
    result = run_cli("serve", "--config", str(config_of(jobfeed_process)), cwd=first.db_path.parent)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("jobfeed: cannot start:"), line
    assert str(first.db_path) in line, line
    assert "in use by another jobfeed process" in line, line
    assert f"pid {first.pid}" in line, line
    async with aiohttp.ClientSession(first.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "j"}) as response:
            assert response.status == 201, await response.text()
        async with session.post("/v1/jobs/j/events", json={"type": "log", "message": "m"}) as r:
            assert r.status == 201, await r.text()
        async with session.get("/readyz") as response:
            assert response.status == 200, await response.text()
        assert [event["seq"] for event in await read_log(session, "j")] == [1, 2]


@pytest.mark.process
async def test_migrate_refuses_while_a_server_runs(jobfeed_process: Launcher) -> None:
    """``jobfeed migrate`` on the file of a running server exits 1 with one line: migrating
    under a server that already holds the schema in its statements is never safe."""
    first = await jobfeed_process.start()
    result = run_cli(
        "migrate", "--config", str(config_of(jobfeed_process)), cwd=first.db_path.parent
    )
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "in use by another jobfeed process" in line, line


@pytest.mark.process
async def test_the_lock_dies_with_its_process(jobfeed_process: Launcher) -> None:
    """After SIGKILL the lock is gone with the process: a new server starts on the same file
    at once (the lock file stays; only the kernel's lock on it counts), and so does migrate
    after a clean stop."""
    first = await jobfeed_process.start()
    first.kill(signal.SIGKILL)
    assert await first.wait_async(WAIT) == -signal.SIGKILL
    assert (jobfeed_process.db_path.parent / "jobfeed.db.lock").exists()
    second = await jobfeed_process.start()
    assert second.pid != first.pid
    second.kill(signal.SIGTERM)
    assert await second.wait_async(WAIT) == 0
    result = run_cli(
        "migrate", "--config", str(config_of(jobfeed_process)), cwd=second.db_path.parent
    )
    assert result.returncode == 0, result.stderr
