"""Server processes under test: start one from a clean directory, prove it is the process that
answers, read its CPU time and memory from ``/proc``, stop it with SIGTERM.

Two kinds are started the same way: jobfeed itself (``jobfeed serve``) and the raw aiohttp
fan-out server of ``bench.rawws`` (the ceiling). Both write a JSON ``listening`` line with
``port`` and ``pid`` to stderr; stderr goes to a file so that a chatty server never blocks on
a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from server.auth import mint_token

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

START_TIMEOUT = 20.0
# jobfeed exits within server.shutdown_timeout (10 s in config.toml) of SIGTERM.
STOP_TIMEOUT = 20.0


class ServerError(RuntimeError):
    """The server did not start, is not the process we started, or did not stop cleanly."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; fields after it start at "state" (field 3).
    fields = raw.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS now, VmHWM the peak), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ServerError(f"/proc/{pid}/status has no {field}")


def listening_pids(port: int) -> set[int]:
    """Pids that hold a LISTEN socket on 127.0.0.1:``port`` (via socket inodes in /proc)."""
    wanted = f"{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, state, inode = parts[1], parts[3], parts[9]
        if state == "0A" and local.endswith(":" + wanted) and local.startswith("0100007F"):
            inodes.add(f"socket:[{inode}]")
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pids.add(int(proc.name))
                        break
    return pids


@dataclass
class ServerProcess:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return memory_bytes(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        return memory_bytes(self.pid, "VmHWM")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM, wait for a clean exit; SIGKILL (and report it) past STOP_TIMEOUT."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
                self.exit_code = -9
                raise ServerError(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT} s") from None
        self.exit_code = self.popen.returncode
        if self.exit_code != 0:
            raise ServerError(f"{self.name} exited {self.exit_code}: {self.log_tail()}")
        return self.exit_code


def _read_listening(log_path: Path, popen: subprocess.Popen[bytes], name: str) -> dict[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in log_path.read_bytes().splitlines():
                if b'"listening"' not in line:
                    continue
                record = orjson.loads(line)
                if record.get("event") == "listening":
                    return {"port": int(record["port"]), "pid": int(record["pid"])}
        if popen.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"{name} exited {popen.returncode} before listening:\n{tail}")
        time.sleep(0.02)
    raise ServerError(f"{name} wrote no listening line within {START_TIMEOUT} s")


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


def _start(name: str, argv: list[str], env: Mapping[str, str], workdir: Path) -> ServerProcess:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            argv,
            cwd=workdir,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        listening = _read_listening(log_path, popen, name)
        server = ServerProcess(name, popen, listening["port"], workdir, log_path)
        if listening["pid"] != popen.pid:
            raise ServerError(f"{name} says pid {listening['pid']}, we started {popen.pid}")
        holders = listening_pids(server.port)
        if holders != {popen.pid}:
            raise ServerError(f"port {server.port} is held by {holders}, not {popen.pid}")
        for path in ("/healthz", "/readyz"):
            status = _get(server.base_url + path)
            if status != 200:
                raise ServerError(f"{name} answered {path} with {status}")
    except BaseException:
        popen.kill()
        popen.wait(5)
        raise
    return server


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop the server on the way out; a failure to stop cleanly is an error of the run."""
    try:
        yield server
    except BaseException:
        with contextlib.suppress(ServerError):
            server.stop()
        raise
    server.stop()


# Set by ``--flame``: the next jobfeed started is sampled by py-spy into this SVG.
flame_path: Path | None = None


@contextlib.contextmanager
def sampled(process: ServerProcess) -> Iterator[None]:
    """py-spy over the whole life of ``process`` when ``flame_path`` asks for it (once)."""
    global flame_path
    target, flame_path = flame_path, None
    if target is None:
        yield
        return
    argv = [str(BIN / "py-spy"), "record", "--pid", str(process.pid), "--nonblocking"]
    argv += ["--rate", "200", "--duration", "600", "--output", str(target)]
    if target.suffix == ".txt":
        argv += ["--format", "raw"]  # collapsed stacks, for flamegraph.pl or a script
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes the SVG on SIGINT
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = b"timed out"
        if spy.returncode not in (0, -signal.SIGINT) and not target.exists():
            sys.stderr.write(f"py-spy failed: {err.decode(errors='replace')[-500:]}\n")


# W1 / W7 with authentication on (bench.workloads.w1_auth, bench.streams.w7_auth).
BENCH_SECRET = "bench-secret-not-for-production-0123456789"
AUTH_SETTINGS = {"AUTH__MODE": "jwt", "AUTH__SECRETS": f'["{BENCH_SECRET}"]'}


def bench_token(tenant: str = "bench", scope: str = "jobs:read jobs:write", **claims: Any) -> str:
    """A token as a backend would issue it, for the bench's own tenant."""
    return mint_token(BENCH_SECRET, tenant=tenant, scope=scope, ttl_seconds=24 * 3600, **claims)


@contextlib.contextmanager
def jobfeed(durability: str = "full", **settings: str) -> Iterator[ServerProcess]:
    """jobfeed on a fresh database in a temporary directory; ``settings`` are extra
    ``SECTION__KEY`` overrides (e.g. ``STREAM__MAX_SUBSCRIBERS="20000"``)."""
    with jobfeed_prepared(None, durability, **settings) as process:
        yield process


@contextlib.contextmanager
def jobfeed_prepared(
    prepare: Callable[[Path], object] | None, durability: str = "full", **settings: str
) -> Iterator[ServerProcess]:
    """``jobfeed``, with ``prepare`` given the database's path to fill before the server
    starts (``bench.olddata``)."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-") as tmp:
        workdir = Path(tmp)
        if prepare is not None:
            prepare(workdir / "jobfeed.db")
        env = {
            "JOBFEED_SERVER__HOST": HOST,
            "JOBFEED_SERVER__PORT": "0",
            "JOBFEED_STORAGE__PATH": str(workdir / "jobfeed.db"),
            "JOBFEED_STORAGE__DURABILITY": durability,
            "JOBFEED_LOG__FORMAT": "json",
            "JOBFEED_LOG__ACCESS": "false",
            **{f"JOBFEED_{key.upper()}": value for key, value in settings.items()},
        }
        argv = [str(BIN / "jobfeed"), "serve", "--config", str(REPO / "config.toml")]
        with running(_start("jobfeed", argv, env, workdir)) as server, sampled(server):
            yield server


@contextlib.contextmanager
def raw_ws() -> Iterator[ServerProcess]:
    """The ceiling: ``bench.rawws``, same URLs and frames, no SQLite, no cursor."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-raw-") as tmp:
        argv = [sys.executable, "-m", "bench.rawws", "--port", "0"]
        env = {"PYTHONPATH": str(REPO)}
        with running(_start("rawws", argv, env, Path(tmp))) as server:
            yield server
