"""``jobfeed tail | jobs | export`` (the client's CLI, run through the server's ``jobfeed``
command): exit codes, output, the one-line hint without the client, and ``tail`` in a real
terminal (tmux) across a server restart."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from jobfeed_client import Client
from tests.client.proxy import Proxy
from tests.procs import Launcher, ServerProcess

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 60.0
PANE_TIMEOUT = 60.0
PANE_POLL = 0.05  # a terminal has no event to wait on: read the pane this often until a deadline


def jobfeed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``jobfeed ARGS`` as a user runs it: the server's command, which hands these to the
    client."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def finished_jobs(shared_server: ServerProcess) -> dict[str, str]:
    """One job per terminal status, and their ids by status."""
    ids = {}
    with Client(shared_server.url) as client:
        for status, last in (
            ("completed", {"type": "completed", "result": {"artifact": "a.tar"}}),
            ("failed", {"type": "failed", "error": {"message": "disk full"}}),
            ("cancelled", {"type": "cancelled", "reason": "superseded"}),
        ):
            job_id = f"cli-{status}-{uuid.uuid4().hex[:8]}"
            client.create_job(job_id, kind="cli-test")
            client.append(
                job_id,
                {"type": "progress", "current": 1, "total": 2, "phase": "build"},
                {"type": "log", "message": f"working on {status}", "level": "warning"},
                last,
            )
            ids[status] = job_id
    return ids


@pytest.mark.parametrize("mode", [[], ["--json"], ["--sse"]])
def test_tail_exit_code_says_how_the_job_ended(
    shared_server: ServerProcess, finished_jobs: dict[str, str], mode: list[str]
) -> None:
    """0 completed, 1 failed, 2 cancelled, 3 not found; the URL from JOBFEED_URL."""
    env = {"JOBFEED_URL": shared_server.url}
    for status, code in (("completed", 0), ("failed", 1), ("cancelled", 2)):
        result = jobfeed("tail", finished_jobs[status], *mode, env=env)
        assert result.returncode == code, result
        assert f"working on {status}" in result.stdout
    missing = jobfeed("tail", "no-such-job", *mode, env=env)
    assert missing.returncode == 3
    assert missing.stderr.strip() == "jobfeed: job no-such-job not found"


def test_tail_json_prints_the_events_as_stored(
    shared_server: ServerProcess, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["failed"]
    result = jobfeed("tail", job_id, "--json", "--after", "1", "--url", shared_server.url)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["seq"], e["type"]) for e in lines] == [(2, "progress"), (3, "log"), (4, "failed")]


def test_export_writes_the_log_as_ndjson(
    shared_server: ServerProcess, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["completed"]
    result = jobfeed("export", job_id, "--url", shared_server.url)
    assert result.returncode == 0
    with Client(shared_server.url) as client:
        stored = [e.raw for e in client.events(job_id)]
    assert [json.loads(line) for line in result.stdout.splitlines()] == stored
    assert jobfeed("export", "no-such-job", "--url", shared_server.url).returncode == 3


def test_jobs_lists_a_table_or_json(
    shared_server: ServerProcess, finished_jobs: dict[str, str]
) -> None:
    table = jobfeed("jobs", "--kind", "cli-test", "--url", shared_server.url)
    assert table.returncode == 0
    for job_id in finished_jobs.values():
        assert job_id in table.stdout
    failed = jobfeed(
        "jobs", "--status", "failed", "--kind", "cli-test", "--json", "--url", shared_server.url
    )
    assert [json.loads(line)["job_id"] for line in failed.stdout.splitlines()] == [
        finished_jobs["failed"]
    ]


def test_usage_errors_exit_64_not_2() -> None:
    """2 means cancelled, so a usage error has its own status."""
    assert jobfeed("tail").returncode == 64


def test_without_the_client_the_command_says_how_to_install_it() -> None:
    """The server's ``jobfeed`` hands ``tail`` to the client; without it, one line."""
    code = (
        "import sys; sys.modules['jobfeed_client'] = None\n"
        "from server.__main__ import main\n"
        "sys.exit(main(['tail', 'build-42']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "pip install 'jobfeed-client[cli]'" in result.stderr


class Pane:
    """One tmux window on a private tmux server (its own socket), running a command."""

    def __init__(self, command: str, width: int = 110, height: int = 24) -> None:
        self.socket = f"jobfeed-test-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "tail", "-x", str(width), "-y", str(height), command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=True,
        ).stdout

    def text(self, escapes: bool = False) -> str:
        flags = ["-e"] if escapes else []
        return self._tmux("capture-pane", "-p", "-t", "tail", *flags)

    def wait_for(self, condition: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + PANE_TIMEOUT
        while True:
            screen = self.text()
            if condition(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"the pane never showed what was expected:\n{screen}")
            time.sleep(PANE_POLL)

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"],
            capture_output=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )


@pytest.fixture
def pane_factory() -> Iterator[Callable[[str], Pane]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    panes: list[Pane] = []

    def make(command: str) -> Pane:
        pane = Pane(command)
        panes.append(pane)
        return pane

    yield make
    for pane in panes:
        pane.close()


async def test_tail_in_a_terminal_across_a_server_restart(
    launcher: Launcher,
    proxy_to: Callable[[ServerProcess], Proxy],
    pane_factory: Callable[[str], Pane],
) -> None:
    """In a real terminal: the bar shows percent, phase and message; log lines appear above
    it in their level's colour, each once, including across a server SIGKILL and restart;
    the command exits 0 when the job completes."""
    server = await launcher.start()
    proxy = proxy_to(server)
    job_id = f"tail-{uuid.uuid4().hex[:6]}"
    with Client(server.url) as client:
        client.create_job(job_id, kind="demo")
        client.append(
            job_id,
            {"type": "log", "message": "fetched 3 repos"},
            {
                "type": "progress",
                "current": 2,
                "total": 8,
                "phase": "build",
                "message": "compiling",
            },
        )
    command = (
        f"cd {REPO} && {sys.executable} -m server tail {job_id} --url {proxy.url}; "
        "echo EXIT=$?; sleep 600"
    )
    pane = pane_factory(command)
    pane.wait_for(lambda s: "fetched 3 repos" in s and "25%" in s and "compiling" in s)

    server.kill(signal.SIGKILL)
    await server.wait_async(RUN_TIMEOUT)
    during = pane.wait_for(lambda s: "reconnecting" in s)  # the bar says it is resuming
    print(f"\n--- jobfeed tail pane, server down ---\n{during}--- end ---")
    restarted = await launcher.start()
    proxy.set(upstream_port=restarted.port)
    with Client(restarted.url) as client:
        client.append(
            job_id,
            {"type": "log", "message": "disk nearly full", "level": "warning"},
            {"type": "log", "message": "test 7 flaked", "level": "error"},
            {"type": "progress", "current": 6, "total": 8, "phase": "test", "message": "40 tests"},
        )
        pane.wait_for(lambda s: "75%" in s and "40 tests" in s)
        client.append(job_id, {"type": "completed", "result": {"artifact": "build.tar"}})
    screen = pane.wait_for(lambda s: "EXIT=" in s)
    print(f"\n--- jobfeed tail pane ---\n{screen}--- end ---")
    assert "EXIT=0" in screen
    for line in ("fetched 3 repos", "disk nearly full", "test 7 flaked"):
        assert screen.count(line) == 1, screen
    assert "100%" in screen
    assert 'completed {"artifact": "build.tar"}' in screen
    colored = pane.text(escapes=True)
    warning = next(line for line in colored.splitlines() if "disk nearly full" in line)
    error = next(line for line in colored.splitlines() if "test 7 flaked" in line)
    assert "\x1b[33m" in warning  # yellow
    assert "\x1b[1m\x1b[31m" in error or "\x1b[1;31m" in error  # bold red


@pytest.mark.parametrize("mode", [[], ["--sse"]])
def test_tail_past_the_end_still_exits_by_status(
    shared_server: ServerProcess, finished_jobs: dict[str, str], mode: list[str]
) -> None:
    """``--after`` at the terminal event gets no event (SSE: 204, no hello): the exit status
    still says the job failed."""
    result = jobfeed(
        "tail", finished_jobs["failed"], "--after", "4", "--json", *mode, "--url", shared_server.url
    )
    assert result.returncode == 1
    assert result.stdout == ""


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LineReader:
    """A running ``jobfeed feed``: its stdout read line by line on a thread, so that the test
    waits for each line with a timeout."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "server", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As a terminal starts it: Ctrl-C is KeyboardInterrupt. A shell's background job
            # (a CI step run with `&`, `nohup`) inherits SIGINT ignored, which Python keeps.
            preexec_fn=_sigint_default,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.popen.stdout is not None
        self._reading = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self._reading.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def take(self, count: int) -> list[str]:
        return [self.lines.get(timeout=RUN_TIMEOUT) for _ in range(count)]

    def interrupt(self) -> tuple[int, str]:
        self.popen.send_signal(signal.SIGINT)
        code = self.popen.wait(RUN_TIMEOUT)
        assert self.popen.stderr is not None
        return code, self.popen.stderr.read()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(RUN_TIMEOUT)
        self._reading.join(RUN_TIMEOUT)  # the pipe's end: the process is gone
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def test_feed_prints_one_line_per_event_across_a_restart(
    launcher: Launcher, proxy_to: Callable[[ServerProcess], Proxy]
) -> None:
    """``jobfeed feed --prefix P --after C`` prints time, job, type and a summary for each
    matching event, live, each once, across a SIGKILL and restart of the server; Ctrl-C
    ends it with 130."""
    server = asyncio.run(launcher.start())
    proxy = proxy_to(server)
    prefix = f"clifeed-{uuid.uuid4().hex[:8]}-"
    with Client(server.url) as client:
        cursor = client._portal.call(client._async.request("GET", "/v1/jobs"))[1]["cursor"]
        client.create_job(f"{prefix}a", kind="etl")
        client.create_job("unrelated")
        client.append(f"{prefix}a", {"type": "progress", "current": 2, "total": 8, "phase": "load"})
    reader = LineReader("feed", "--url", proxy.url, "--prefix", prefix, "--after", str(cursor))
    try:
        first = reader.take(2)
        assert [line.split()[1:] for line in first] == [
            [f"{prefix}a", "created", "etl"],
            [f"{prefix}a", "progress", "25%", "load", "2/8"],
        ]
        server.kill(signal.SIGKILL)
        server.wait(RUN_TIMEOUT)
        restarted = asyncio.run(launcher.start())
        proxy.set(upstream_port=restarted.port)
        with Client(restarted.url) as client:
            client.append(
                f"{prefix}a",
                {"type": "log", "message": "rows\nloaded", "level": "warning"},
                {"type": "failed", "error": {"message": "disk full"}},
            )
        assert [line.split()[1:] for line in reader.take(2)] == [
            [f"{prefix}a", "log", "WARNING", "rows", "loaded"],
            [f"{prefix}a", "failed", "disk", "full"],
        ]
        code, stderr = reader.interrupt()
        assert code == 130, stderr
        assert reader.lines.empty()
    finally:
        reader.close()


def test_feed_json_and_refusals(shared_server: ServerProcess) -> None:
    """``--json`` prints events as stored; a filter the server refuses exits 4 with its
    message; a negative ``--after`` is a usage error (64)."""
    job_id = f"clifeed-{uuid.uuid4().hex[:8]}"
    with Client(shared_server.url) as client:
        client.create_job(job_id)
        client.append(job_id, {"type": "stage.done", "data": {"n": 1}})
    reader = LineReader(
        "feed", "--url", shared_server.url, "--job", job_id, "--after", "0", "--json"
    )
    try:
        events = [json.loads(line) for line in reader.take(2)]
        assert [(e["job_id"], e["seq"], e["type"]) for e in events] == [
            (job_id, 1, "created"),
            (job_id, 2, "stage.done"),
        ]
        assert reader.interrupt()[0] == 130
    finally:
        reader.close()
    refused = jobfeed("feed", "--url", shared_server.url, "--prefix", "bad prefix!")
    assert refused.returncode == 4
    assert "prefix" in refused.stderr
    assert jobfeed("feed", "--url", shared_server.url, "--after", "-1").returncode == 64
