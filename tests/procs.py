"""A real ``jobfeed serve`` process for the tests that need one: crashes, signals, restarts.

``launching(tmp_path)`` (wrapped in a fixture by each module that needs it) hands out a
``Launcher``; ``await launcher.start()`` runs ``python -m server serve --config PATH`` on a
SQLite file in the test's ``tmp_path`` with port 0 and JSON logs, reads the child's stderr
in a thread until its ``listening`` line, checks that the line came from the process it
started (its pid is the child's pid; the port is taken from that line only), and waits for
``/readyz`` to answer 200. Starting again on the same file is a restart. Every process still
running when the test ends is killed (SIGKILL) and reaped by the finalizer.

``read_log`` and ``fold_log`` read a job's whole log back over HTTP and fold it through the
server's own reducer, for the checks that follow a crash or a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from server.snapshot import JobState, apply_event

START_TIMEOUT = 20.0  # seconds for a child to log "listening" and answer /readyz with 200
REAP_TIMEOUT = 10.0  # seconds for a SIGKILLed child to be reaped in the finalizer
_READY_POLL = 0.02  # /readyz has no event to wait on; poll it this often until the deadline


class ServerLog:
    """The child's stderr, line by line: every raw line, and the ones that parse as JSON
    objects. Fed by a reader thread; ``wait_for`` blocks on a condition, not a sleep."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.raw: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.ended = False

    def feed(self, stream: IO[bytes]) -> None:
        """Reader-thread body: collect lines until the child closes its stderr."""
        try:
            for chunk in iter(stream.readline, b""):
                line = chunk.decode("utf-8", errors="replace").rstrip("\r\n")
                record = _json_object(line)
                with self._changed:
                    self.raw.append(line)
                    if record is not None:
                        self.records.append(record)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def find(self, event: str) -> dict[str, Any] | None:
        with self._changed:
            return next((r for r in self.records if r.get("event") == event), None)

    def events(self) -> list[str]:
        with self._changed:
            return [str(r.get("event")) for r in self.records]

    def wait_for(self, event: str, timeout: float) -> dict[str, Any] | None:
        """The first record whose ``event`` is ``event``; None if stderr ended or timed out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((r for r in self.records if r.get("event") == event), None)
                remaining = deadline - time.monotonic()
                if found is not None or self.ended or remaining <= 0:
                    return found
                self._changed.wait(remaining)

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.raw)


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class ServerProcess:
    """One child ``jobfeed serve``; ``host``/``port``/``pid`` come from its ``listening`` line."""

    def __init__(self, popen: subprocess.Popen[bytes], db_path: Path) -> None:
        self.popen = popen
        self.db_path = db_path
        self.log = ServerLog()
        self.host = ""
        self.port = 0
        self.pid = 0
        assert popen.stderr is not None
        self._reader = threading.Thread(
            target=self.log.feed, args=(popen.stderr,), name=f"jobfeed-stderr-{popen.pid}"
        )
        self._reader.daemon = True
        self._reader.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines the process has written so far."""
        return list(self.log.records)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum``; a no-op once the child has been reaped (its pid may be reused)."""
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); raises TimeoutExpired."""
        return self.popen.wait(timeout)

    async def wait_async(self, timeout: float) -> int:
        """``wait`` without blocking the event loop (streams keep being read meanwhile)."""
        return await asyncio.to_thread(self.popen.wait, timeout)

    def reap(self) -> None:
        """Kill the child if it still runs, reap it, and drain its stderr."""
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(REAP_TIMEOUT)
        finally:
            self._reader.join(REAP_TIMEOUT)
            if self.popen.stderr is not None:
                self.popen.stderr.close()

    def describe(self) -> str:
        return f"jobfeed pid {self.popen.pid} (exit {self.popen.returncode}):\n{self.log.text()}"


class Launcher:
    """Starts ``jobfeed serve`` children for one test and remembers them for the finalizer."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.db_path = workdir / "jobfeed.db"
        self.started: list[ServerProcess] = []

    async def start(
        self, env: Mapping[str, str] | None = None, /, **settings: object
    ) -> ServerProcess:
        """Run a server on ``self.db_path`` and return it once it is listening and ready.

        ``settings`` are ``section__key=value`` overrides passed as ``JOBFEED_*`` variables,
        e.g. ``server__shutdown_timeout=3``; ``env`` (positional) adds other variables, such
        as ``LD_PRELOAD``.
        """
        process = self._spawn(settings, env or {})
        listening = await asyncio.to_thread(process.log.wait_for, "listening", START_TIMEOUT)
        if listening is None:
            process.reap()
            pytest.fail(f"the server never logged 'listening'\n{process.describe()}")
        # The answering process must be the one we started: the line carries the child's own
        # pid, and the port is read from that line, never guessed or probed.
        assert listening.get("pid") == process.popen.pid, process.describe()
        assert isinstance(listening.get("port"), int), listening
        assert listening["port"] > 0, listening
        process.pid = listening["pid"]
        process.host = str(listening["host"])
        process.port = listening["port"]
        await _wait_ready(process)
        return process

    def _spawn(self, settings: Mapping[str, object], extra_env: Mapping[str, str]) -> ServerProcess:
        config_path = self.workdir / "jobfeed-test.toml"
        config_path.write_text(
            f"[storage]\npath = {json.dumps(str(self.db_path))}\n", encoding="utf-8"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}
        env.update(
            JOBFEED_SERVER__HOST="127.0.0.1",
            JOBFEED_SERVER__PORT="0",
            JOBFEED_LOG__FORMAT="json",
        )
        env.update({f"JOBFEED_{name.upper()}": str(value) for name, value in settings.items()})
        env.update(extra_env)
        popen = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.workdir,
        )
        process = ServerProcess(popen, self.db_path)
        self.started.append(process)
        return process

    def reap_all(self) -> None:
        errors: list[BaseException] = []
        for process in self.started:
            try:
                process.reap()
            except Exception as exc:  # reap the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]


async def _wait_ready(process: ServerProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    async with aiohttp.ClientSession(process.url) as session:
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                break
            try:
                async with session.get("/readyz") as response:
                    if response.status == 200:
                        return
                    last = f"{response.status} {await response.text()}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(_READY_POLL)
    process.reap()
    pytest.fail(f"/readyz never answered 200 (last: {last})\n{process.describe()}")


@contextlib.contextmanager
def launching(workdir: Path) -> Iterator[Launcher]:
    """A ``Launcher`` whose children are all killed and reaped on exit; test modules wrap
    it in a fixture, so that no server outlives its test."""
    launcher = Launcher(workdir)
    try:
        yield launcher
    finally:
        launcher.reap_all()


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), for the tests that bound the server's memory."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def read_log(
    session: aiohttp.ClientSession, job_id: str, page: int = 100
) -> list[dict[str, Any]]:
    """A job's whole log, paged through ``next_after`` (``page`` events per request)."""
    events: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        async with session.get(
            f"/v1/jobs/{job_id}/events", params={"after": after, "limit": page}
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        events.extend(body["events"])
        after = body["next_after"]
    return events


async def get_snapshot(session: aiohttp.ClientSession, job_id: str) -> dict[str, Any]:
    async with session.get(f"/v1/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        snapshot: dict[str, Any] = await response.json()
    return snapshot


def fold_log(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The snapshot the log implies, by the server's own pure reducer."""
    state: JobState | None = None
    for event in events:
        state = apply_event(state, event)
    assert state is not None, "an empty log has no snapshot"
    return state.to_dict()
