"""The docs tell the truth to a newcomer: the README's demo works as written (and again),
its sample output is what the server prints, links stay inside the repository, ``--help``
is plain text, and container examples do not publish an open API on every interface.

The demo runs the README's own ``sh`` blocks, in order, in one ``bash`` (as one terminal),
against a real ``jobfeed serve`` (tests/procs.py) with only ``localhost:8080`` replaced by its
address, then once more in a new ``bash`` on the same database: ids must not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.__main__ import main
from tests.procs import Launcher, launching

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
BLOCK_TIMEOUT = 30.0  # seconds for one block's output: generous for a busy machine
MARK = "__block_done__"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


def demo_blocks() -> list[tuple[str, list[str]]]:
    """The demo section's ``sh`` blocks, each with the plain output block that follows it."""
    text = README.read_text()
    section = text[text.index("## A 30-second demo") : text.index("## Configuration")]
    fences = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.DOTALL)
    blocks: list[tuple[str, list[str]]] = []
    for kind, body in fences:
        if kind == "sh":
            blocks.append((body, []))
        elif kind == "":
            assert blocks, "an output block before any command"
            blocks[-1] = (blocks[-1][0], body.splitlines())
        # Other kinds (js, console) illustrate; they are not run.
    return blocks


class Terminal:
    """One ``bash`` fed block by block, its stdout and stderr read line by line."""

    def __init__(self) -> None:
        # In a terminal the watcher's stdout is line-buffered: each line is one write. Unbuffered
        # (PYTHONUNBUFFERED), print writes the line and its newline apart, and curl's output
        # can land in between; a pipe without it is block-buffered and flushed per line.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        self.process = subprocess.Popen(
            ["bash"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group: the background watcher goes with it, whatever happens.
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def run(self, commands: str, expected_lines: int) -> list[str]:
        """Feed ``commands``; return their output once bash is done with them and at least
        ``expected_lines`` lines came (a background watcher prints after bash moves on)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{commands}\necho {MARK}\n")
        self.process.stdin.flush()
        out: list[str] = []
        done = False
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while not done or len(out) < expected_lines:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no more output after {out!r} from:\n{commands}")
            assert line is not None, f"bash ended; output so far {out!r}"
            if line.endswith(MARK):
                done = True
                if line != MARK:  # a partial line (curl prints no newline) before the mark
                    out.append(line[: -len(MARK)])
            else:
                out.append(line)
        return out

    def close(self) -> None:
        """End bash (killed if it does not exit) and release its pipes."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=BLOCK_TIMEOUT)
        # Whatever is left of the group (a watcher a failed block left running) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=BLOCK_TIMEOUT)
        self.reader.join(timeout=BLOCK_TIMEOUT)
        self.process.stdout.close()


def pattern(line: str, *, any_ids: bool) -> re.Pattern[str]:
    """A README output line as a regex: ``...`` is anything; the job id, timestamps and the
    epoch are whatever this run made; with ``any_ids``, so are server-wide event ids."""
    line = normalize(line, any_ids=any_ids)
    return re.compile(re.escape(line).replace(re.escape("..."), ".*"))


def normalize(line: str, *, any_ids: bool) -> str:
    line = re.sub(r"build-\d{6,}", "JOB", line)
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", "TS", line)
    line = re.sub(r'"epoch":"[^"]*"', '"epoch":"E"', line)
    if any_ids:
        line = re.sub(r'"id":\d+', '"id":N', line)
    return line


def assert_output(got: list[str], expected: list[str], *, any_ids: bool) -> None:
    """Every line printed matches one line of the README's sample, and none is missing;
    lines from the background watcher and from curl may interleave in any order."""
    assert len(got) == len(expected), (got, expected)
    remaining = [normalize(line, any_ids=any_ids) for line in got]
    for line in expected:
        wanted = pattern(line, any_ids=any_ids)
        match = next((g for g in remaining if wanted.fullmatch(g)), None)
        assert match is not None, f"README says {line!r}; printed:\n" + "\n".join(got)
        remaining.remove(match)


def run_demo(address: str, *, any_ids: bool) -> None:
    terminal = Terminal()
    try:
        for commands, expected in demo_blocks():
            commands = commands.replace("localhost:8080", address)
            assert_output(terminal.run(commands, len(expected)), expected, any_ids=any_ids)
    finally:
        terminal.close()


async def test_readme_demo_works_as_written_and_again(launcher: Launcher) -> None:
    """The demo's commands, copied as a newcomer would, print what the README shows, on a
    fresh database (ids included) and once more on the same one (no job_exists)."""
    server = await launcher.start()
    address = server.url.removeprefix("http://")
    # The server is another process: blocking this loop while bash runs holds nothing up.
    run_demo(address, any_ids=False)
    # The demo's job id counts seconds; a person never reruns it within the same second.
    await asyncio.sleep(1.0 - time.time() % 1.0)
    run_demo(address, any_ids=True)


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_links_stay_inside_the_repository(doc: Path) -> None:
    """Every relative link in README.md and docs/*.md names a file in this repository."""
    for target in MARKDOWN_LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (doc.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{doc.name} links outside: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``jobfeed --help`` shows no reStructuredText markup from a docstring."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "serve" in text
    assert "migrate" in text
    assert "``" not in text


def test_container_examples_publish_beyond_loopback_only_with_a_secret() -> None:
    """Every ``docker run`` example (continuation lines joined) either publishes the port on
    127.0.0.1 only, or turns authentication on with a secret: never an open read/write API
    on every interface."""
    examples = 0
    for path in [*DOCS, REPO / "Dockerfile"]:
        text = re.sub(r"\\\n\s*(?:#\s*)?", " ", path.read_text())
        for line in text.splitlines():
            if "docker run" not in line:
                continue
            for published in re.findall(r"(?:-p|--publish)[ =](\S+)", line):
                examples += 1
                if published.startswith("127.0.0.1:"):
                    continue
                assert "JOBFEED_AUTH__MODE=jwt" in line, f"{path.name}: {line.strip()}"
                assert "JOBFEED_AUTH__SECRETS=" in line, f"{path.name}: {line.strip()}"
    assert examples >= 2
