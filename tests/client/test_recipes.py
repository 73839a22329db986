"""The recipes in docs/python-client.md, run as printed: each ```python block whose first line
is ``# recipe: NAME`` is written to ``tmp_path/NAME`` and exercised against a real server,
the frameworks in-process (FastAPI's TestClient, Celery's eager mode)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from jobfeed_client import Client
from tests.procs import ServerProcess

pytestmark = pytest.mark.process

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-client.md"
BLOCK = re.compile(r"```python\n# recipe: (?P<name>\S+)\n(?P<code>.*?)```", re.DOTALL)
RUN_TIMEOUT = 60.0


def recipes() -> dict[str, str]:
    return {
        m["name"]: f"# recipe: {m['name']}\n{m['code']}" for m in BLOCK.finditer(DOC.read_text())
    }


def test_the_doc_has_the_three_recipes() -> None:
    assert set(recipes()) == {"fastapi_app.py", "celery_tasks.py", "import_rows.py"}


def load(tmp_path: Path, name: str) -> ModuleType:
    path = tmp_path / name
    path.write_text(recipes()[name], encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"recipe_{uuid.uuid4().hex}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastapi_background_task_reports_through_the_client(
    shared_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST starts the build in BackgroundTasks; the TestClient returns after it ran."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("JOBFEED_URL", shared_server.url)
    recipe = load(tmp_path, "fastapi_app.py")
    job_id = f"fastapi-{uuid.uuid4().hex[:8]}"
    with TestClient(recipe.app) as http:
        answer = http.post(f"/builds/{job_id}", json=["a.c", "b.c", "c.c"])
    assert answer.status_code == 202
    assert answer.json() == {"job_id": job_id, "stream": f"/v1/jobs/{job_id}/stream"}
    with Client(shared_server.url) as client:
        snapshot = client.get_job(job_id)
        events = list(client.events(job_id))
    assert (snapshot.status, snapshot.kind, snapshot.phase) == ("completed", "build", "compile")
    assert (snapshot.current, snapshot.total) == (3, 3)
    assert [e.message for e in events if e.type == "log"] == [
        "compiled a.c",
        "compiled b.c",
        "compiled c.c",
    ]
    assert [e.data for e in events if e.type == "artifact.uploaded"] == [
        {"path": f"/artifacts/{job_id}.tar"}
    ]


def test_celery_task_reports_per_step(
    shared_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In eager mode the task runs in the test; a retry with the same task id (run_key)
    appends nothing twice."""
    monkeypatch.setenv("JOBFEED_URL", shared_server.url)
    recipe = load(tmp_path, "celery_tasks.py")
    recipe.app.conf.task_always_eager = True
    job_id = f"celery-{uuid.uuid4().hex[:8]}"
    paths = ["a.png", "b.png"]
    try:
        first = recipe.resize_images.apply(args=(job_id, paths), task_id="task-1")
        assert first.get() == 2
        again = recipe.resize_images.apply(args=(job_id, paths), task_id="task-1")
        assert again.get() == 2
    finally:
        recipe.jobfeed.close()
    with Client(shared_server.url) as client:
        snapshot = client.get_job(job_id)
        events = list(client.events(job_id))
    assert (snapshot.status, snapshot.current, snapshot.total) == ("completed", 2, 2)
    assert [e.message for e in events if e.type == "log"] == ["resized a.png", "resized b.png"]
    assert sum(e.type == "completed" for e in events) == 1


def test_script_with_track(shared_server: ServerProcess, tmp_path: Path) -> None:
    """The script reports 1,000 rows through ``track`` and finishes with its result."""
    (tmp_path / "import_rows.py").write_text(recipes()["import_rows.py"], encoding="utf-8")
    job_id = f"script-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "import_rows.py", job_id],
        cwd=tmp_path,
        env={**os.environ, "JOBFEED_URL": shared_server.url},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with Client(shared_server.url) as client:
        snapshot = client.get_job(job_id)
    assert snapshot.status == "completed"
    assert snapshot.result == {"rows": 1000, "sum": 500500}
    assert (snapshot.current, snapshot.total, snapshot.phase) == (1000, 1000, "import")


def test_the_readme_worker_reports_in_five_lines(shared_server: ServerProcess) -> None:
    """README.md's "From Python" example, run as printed (against this test's server)."""
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 7  # the import, a blank line, five lines
    exec(compile(code.replace("http://127.0.0.1:8080", shared_server.url), "README", "exec"), {})
    with Client(shared_server.url) as client:
        snapshot = client.get_job("build-43")
        logs = [e.message for e in client.events("build-43") if e.type == "log"]
    assert (snapshot.status, snapshot.phase, snapshot.current) == ("completed", "test", 3)
    assert logs == ["fetch done", "build done", "test done"]
