"""Fixtures for the Python client's tests: real ``jobfeed serve`` processes (tests/procs.py)
and a TCP proxy between the client and the server (``proxy.py``).

``shared_server`` is one server per module, for tests that only need a server to talk to
(hypothesis runs many examples against it); ``launcher`` starts servers a test may kill and
restart; ``proxy_to(server)`` puts a controllable network in front of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.client.proxy import Proxy
from tests.procs import Launcher, ServerProcess, launching


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with launching(tmp_path_factory.mktemp("jobfeed")) as launcher:
        yield asyncio.run(launcher.start())


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as started:
        yield started


@pytest.fixture
def proxy_to() -> Iterator[Callable[[ServerProcess], Proxy]]:
    proxies: list[Proxy] = []

    def start(server: ServerProcess) -> Proxy:
        proxy = Proxy(server.port).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
