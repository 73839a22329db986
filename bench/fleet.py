"""Load-generator processes and the messages between them and the coordinator.

Each generator is a spawned process running one worker coroutine on uvloop. It talks to the
coordinator over a pipe in ``(kind, payload)`` messages: it says ``ready`` when its
connections are up, waits for ``go`` (or another command), and ends with ``result``. A
worker that raises sends ``error`` with its traceback. Every wait on either side is bounded.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import resource
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

import uvloop

Message = tuple[str, dict[str, Any]]


class WorkerError(RuntimeError):
    """A generator process failed, died, or did not answer in time."""


class WorkerSpec(Protocol):
    @property
    def time_limit(self) -> float:
        """Seconds after which the worker is cancelled, whatever it is doing."""
        ...


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (thousands of sockets per process); return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Link:
    """A worker's end of the pipe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def send(self, kind: str, **payload: Any) -> None:
        self._conn.send((kind, payload))

    def pending(self) -> bool:
        return self._conn.poll()

    async def recv(self, timeout: float) -> Message:
        """The next command from the coordinator; waits on the pipe's fd, not a thread."""
        if not self._conn.poll():
            loop = asyncio.get_running_loop()
            readable = loop.create_future()

            def wake() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(self._conn.fileno(), wake)
            try:
                async with asyncio.timeout(timeout):
                    await readable
            finally:
                loop.remove_reader(self._conn.fileno())
                # The loop made the fd non-blocking; a large send() would then fail (EAGAIN).
                os.set_blocking(self._conn.fileno(), True)
        message: Message = self._conn.recv()
        return message

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        got, payload = await self.recv(timeout)
        if got != kind:
            raise WorkerError(f"expected {kind!r} from the coordinator, got {got!r}")
        return payload


Worker = Callable[[Link, Any], Coroutine[Any, Any, None]]


def _child(conn: Connection, worker: Worker, spec: WorkerSpec) -> None:
    raise_fd_limit()
    link = Link(conn)

    async def bounded() -> None:
        async with asyncio.timeout(spec.time_limit):
            await worker(link, spec)

    try:
        uvloop.run(bounded())
    except BaseException:
        conn.send(("error", {"traceback": traceback.format_exc()}))
    finally:
        conn.close()


class Workers:
    """One group of generator processes running the same worker, each with its own spec."""

    def __init__(self, name: str, worker: Worker, specs: Sequence[WorkerSpec]) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index, spec in enumerate(specs):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_child, args=(child, worker, spec), name=f"{name}-{index}", daemon=True
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On the way out of a failed run nobody will send the workers another command.
        self.close(10.0 if exc_type is None else 0.5)

    def __len__(self) -> int:
        return len(self._conns)

    def send(self, kind: str, **payload: Any) -> None:
        for conn in self._conns:
            conn.send((kind, payload))

    def send_each(self, kind: str, payloads: Sequence[dict[str, Any]]) -> None:
        for conn, payload in zip(self._conns, payloads, strict=True):
            conn.send((kind, payload))

    def gather(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        """One ``kind`` message from every process, in process order."""
        deadline = time.monotonic() + timeout
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < len(self._conns):
            waiting = [c for i, c in enumerate(self._conns) if i not in answers]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self.name}: {len(waiting)} process(es) sent no {kind!r}")
            for conn in multiprocessing.connection.wait(waiting, remaining):
                assert isinstance(conn, Connection)
                index = self._conns.index(conn)
                try:
                    got, payload = conn.recv()
                except EOFError:
                    raise WorkerError(f"{self.name}-{index} died before {kind!r}") from None
                if got == "error":
                    raise WorkerError(f"{self.name}-{index} failed:\n{payload['traceback']}")
                if got != kind:
                    raise WorkerError(f"{self.name}-{index} sent {got!r}, expected {kind!r}")
                answers[index] = payload
        return [answers[i] for i in range(len(self._conns))]

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self._conns:
            conn.close()
