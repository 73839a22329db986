"""The built package ships its schema: a wheel holds ``server/migrations/*.sql``, and an
installed jobfeed migrates a database from any working directory (importlib.resources), with
no source checkout in reach.

A copy of the project's build inputs is built with pip in ``tmp_path`` (the checkout is left
untouched), installed with ``pip --target``, and run with ``python -S`` so that the venv's
editable install of this checkout is not on the path: only the wheel's ``server`` is
importable. A failing build fails the test with pip's output; it is never skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MIGRATIONS = sorted((REPO / "migrations").glob("*.sql"))
PIP_TIMEOUT = 300.0
RUN_TIMEOUT = 60.0
# Everything in the checkout that is not a build input (or is produced by one).
NOT_BUILD_INPUTS = shutil.ignore_patterns(
    ".git",
    ".venv",
    "*cache*",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "tests",
    "bench",
    "data",
    "*.db",
    "*.db-*",
)


def run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; fail the test with its output unless it exits 0."""
    result = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result.stdout


def can_build_without_isolation() -> bool:
    """The venv's setuptools can build a wheel by itself: from 70.1 it has bdist_wheel;
    before that it needs the ``wheel`` package. Otherwise pip builds in an isolated env
    (setuptools from the index, which needs the network)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        importlib.metadata.version("wheel")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBFEED_", "PYTHON"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by pip from a copy of the checkout's build inputs."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_BUILD_INPUTS)
    dist = work / "dist"
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist)]
    if can_build_without_isolation():
        args.append("--no-build-isolation")
    run([*args, str(source)], cwd=work, env=pip_env())
    (built,) = dist.glob("jobfeed-*.whl")
    return built


@pytest.fixture(scope="module")
def site_dir(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (without dependencies) into a directory of its own."""
    site = tmp_path_factory.mktemp("site")
    args = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target"]
    run([*args, str(site), str(wheel)], cwd=site.parent, env=pip_env())
    return site


def isolated_env(*paths: Path | str) -> dict[str, str]:
    """An environment whose PYTHONPATH is exactly ``paths`` (for ``python -S``)."""
    env = pip_env()
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    return env


def dependencies_dir() -> str:
    """The venv's site-packages: aiohttp, pydantic, ... (its .pth files are not processed
    under ``python -S``, so the editable install of this checkout stays out of reach)."""
    return sysconfig.get_paths()["purelib"]


def test_wheel_contains_every_migration(wheel: Path) -> None:
    """The wheel holds server/migrations/0001_initial.sql (and every migrations/*.sql),
    byte for byte as in the checkout."""
    assert MIGRATIONS, "the checkout has no migrations/*.sql"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "server/migrations/0001_initial.sql" in names, sorted(names)
        for migration in MIGRATIONS:
            shipped = archive.read(f"server/migrations/{migration.name}")
            assert shipped == migration.read_bytes(), migration.name


def test_checkout_is_not_importable_in_the_isolated_interpreter(tmp_path: Path) -> None:
    """Precondition of the next test: ``python -S`` with only the dependencies on the path
    cannot import this checkout's ``server``."""
    probe = "import importlib.util; print(importlib.util.find_spec('server'))"
    out = run(
        [sys.executable, "-S", "-c", probe], cwd=tmp_path, env=isolated_env(dependencies_dir())
    )
    assert out.strip() == "None"


def test_installed_wheel_migrates_from_another_directory(site_dir: Path, tmp_path: Path) -> None:
    """``python -m server migrate --config PATH`` from the installed wheel, run outside the
    checkout, exits 0 and creates the database with its tables and migration record."""
    env = isolated_env(site_dir, dependencies_dir())
    where = run(
        [sys.executable, "-S", "-c", "import server; print(server.__file__)"], cwd=tmp_path, env=env
    )
    assert Path(where.strip()).is_relative_to(site_dir), where

    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text('[storage]\npath = "data/jobfeed.db"\n', encoding="utf-8")
    run(
        [sys.executable, "-S", "-m", "server", "migrate", "--config", str(config)],
        cwd=tmp_path,
        env=env,
    )

    db = config.parent / "data" / "jobfeed.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        records = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert {"jobs", "events", "schema_migrations"} <= tables
    assert records == [(int(m.name[:4]), m.name) for m in MIGRATIONS]


def test_wheel_serves_the_browser_files(site_dir: Path, tmp_path: Path) -> None:
    """The installed wheel holds the browser module, the progress element and the dashboard
    (package data: server/static/client is a symlink to clients/js) and its handler reads
    them, byte for byte as in the checkout, outside any source tree."""
    from server.handlers.ui import CLIENT_FILES, UI_FILES

    wanted = [
        ("server.static.client", name, REPO / "clients" / "js" / name) for name in CLIENT_FILES
    ]
    wanted += [
        ("server.static.ui", name, REPO / "server" / "static" / "ui" / name) for name in UI_FILES
    ]
    probe = (
        "import sys, hashlib\n"
        "from server.handlers.ui import static_file\n"
        "for line in sys.stdin.read().split():\n"
        "    package, name = line.split('/')\n"
        "    found = static_file(package, name)\n"
        "    print(hashlib.sha256(found.body).hexdigest(), found.content_type)\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        cwd=tmp_path,
        env=isolated_env(site_dir, dependencies_dir()),
        input="\n".join(f"{package}/{name}" for package, name, _ in wanted),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    hashes = [line.split()[0] for line in result.stdout.splitlines()]
    assert hashes == [hashlib.sha256(path.read_bytes()).hexdigest() for _, _, path in wanted]
