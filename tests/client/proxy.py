"""A TCP proxy the test controls: the network between a client and the server.

It runs on its own event loop in a thread, so sync clients (which block the test's thread)
and async ones both go through it. The test can cut every open connection, refuse new ones,
swallow the server's answers (the request arrives, the answer never does), and point it at
a restarted server's new port. Every state change a test waits for is signalled through a
condition (``wait_for``), never found by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class Proxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.port = 0
        self.refusing = False  # accept and close at once (a server that is down)
        self.swallow_answers = False  # forward requests, drop the answers and the connection
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections closed at once while refusing
        self.swallowed = 0  # answers dropped while swallowing
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stalled: set[int] = set()  # id() of writers that no longer get data
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="test-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        server: asyncio.Server = self._call(self._listen())
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> int:
        """Abort every open connection (both sides see a reset); returns how many."""

        async def abort_all() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.transport.abort()
            return len(writers)

        return int(self._call(abort_all()))

    def stall(self) -> int:
        """Stop forwarding on every open connection, both ways, without closing it: a peer
        gone silent (a cable pulled, a NAT entry expired). New connections are not affected.
        Returns how many connections were stalled."""

        async def stall_all() -> int:
            stalled = {id(w) for w in self._writers}
            self._stalled |= stalled
            return len(stalled) // 2

        return int(self._call(stall_all()))

    def set(self, **state: Any) -> None:
        """Change ``refusing``, ``swallow_answers`` or ``upstream_port``."""
        with self._changed:
            for name, value in state.items():
                if name not in ("refusing", "swallow_answers", "upstream_port"):
                    raise AttributeError(name)
                setattr(self, name, value)

    def wait_for(self, condition: Callable[[Proxy], bool], timeout: float = 30.0) -> None:
        """Block until ``condition(self)`` holds (checked on every proxy state change)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"proxy condition not met within {timeout} s: {self!r}")
                self._changed.wait(remaining)

    def __repr__(self) -> str:
        return (
            f"Proxy(port={self.port}, upstream={self.upstream_port}, accepted={self.accepted}, "
            f"refused={self.refused}, swallowed={self.swallowed}, open={len(self._writers)})"
        )

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Refuse new connections and cut the open ones for the block's duration."""
        self.set(refusing=True)
        self.cut()
        try:
            yield
        finally:
            self.set(refusing=False)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _bump(self, counter: str) -> None:
        with self._changed:
            setattr(self, counter, getattr(self, counter) + 1)
            self._changed.notify_all()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, self.host, 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            self._bump("refused")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            self._bump("refused")
            return
        self._writers.update((writer, up_writer))
        self._bump("accepted")
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, answers=False),
                self._pipe(up_reader, writer, answers=True),
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if answers and self.swallow_answers:
                    self._bump("swallowed")
                    raise ConnectionResetError("answer swallowed")
                if id(writer) in self._stalled:
                    continue  # read and dropped: the other side hears nothing, ever
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
