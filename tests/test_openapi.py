"""The OpenAPI document: it is valid OpenAPI 3.1, and the real server keeps it (schemathesis).

The schemathesis run drives a real jobfeed app on a loopback socket (served from a thread
with its own event loop, since schemathesis's client is synchronous), with a bounded number
of examples per operation and a fixed seed. Every response must be documented: no 5xx, a
documented status code, content type and body schema. The stream endpoint is excluded:
WebSocket and SSE are outside OpenAPI's request/response model.

The checks are schemathesis's ``--checks all`` but one (``EXCLUDED_CHECKS`` says why), plus
one of ours (JSON bodies end with a newline).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config._checks import NegativeDataRejectionConfig
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.definitions import OPENAPI_31

from server.app import create_app
from server.config import Config, load_config
from server.limits import ConnectionCappedRunner
from server.openapi import build_openapi

MAX_EXAMPLES = 25
# `--checks all`: every check schemathesis registers (the CLI's "all" is this registry), less
# the ones excluded here, each with its reason.
load_all_checks()
EXCLUDED_CHECKS = {
    # JSON Schema cannot say `current <= total` (nor keys unique within a batch): a body that
    # fits the schema may still be refused with 422, as docs/protocol.md says.
    positive_data_acceptance,
}
ALL_CHECKS = [
    check
    for check in CHECKS.get_all()
    if not isinstance(check, type) and check not in EXCLUDED_CHECKS
]


def json_body_ends_with_newline(ctx: Any, response: Any, case: Any) -> bool | None:
    """Ours, run with them: every JSON body ends with one newline (curl prints whole lines)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.startswith("application/json") and case.method.upper() != "HEAD":
        assert response.content.endswith(b"\n"), response.content[-80:]
        assert not response.content.endswith(b"\n\n"), response.content[-80:]
    return None


def test_document_is_valid_openapi_31(config: Config) -> None:
    document = build_openapi(config)
    assert document["openapi"] == "3.1.0"
    jsonschema_rs.validator_for(OPENAPI_31).validate(document)
    # And schemathesis, which checks $refs as it loads, accepts every operation.
    schema = schemathesis.openapi.from_dict(document)
    labels = {_ok(result).label for result in schema.get_all_operations()}
    assert "POST /v1/jobs/{job_id}/events" in labels
    assert "POST /v1/tickets" in labels
    assert "DELETE /v1/jobs/{job_id}" in labels
    assert "GET /v1/ingest" in labels
    assert len(labels) == 14


def _ok(result: Any) -> Any:
    """An operation the schema loaded (``Ok``); an ``Err`` fails the test with its error."""
    return result.ok()


def test_limits_come_from_config(make_config: Any) -> None:
    document = build_openapi(make_config(limits__max_batch_events=7, limits__page_size_max=33))
    batch = document["components"]["schemas"]["AppendBody"]["oneOf"][1]
    assert batch["properties"]["events"]["maxItems"] == 7
    assert batch["properties"]["events"]["minItems"] == 1
    params = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"]
    limit = next(p for p in params if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 33}


def test_event_models_are_disjoint(config: Config) -> None:
    """``oneOf`` holds: a valid event matches exactly one model (reserved words excluded
    from the custom type)."""
    schemas = build_openapi(config)["components"]["schemas"]
    document = {"components": {"schemas": schemas}, **schemas["EventIn"]}
    validator = jsonschema_rs.validator_for(document)
    assert validator.is_valid({"type": "progress", "message": "x"})
    assert validator.is_valid({"type": "stage_done", "message": "x"})
    assert validator.is_valid({"type": "failed", "error": {"message": "boom"}})
    assert not validator.is_valid({"type": "created"})
    assert not validator.is_valid({"type": "progress"})
    assert not validator.is_valid({"type": "progress", "phase": None})
    assert not validator.is_valid({"type": "progress", "current": -1})


async def test_served_at_v1_openapi_json(client: TestClient[Any, Any], config: Config) -> None:
    response = await client.get("/v1/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == build_openapi(config)


class _Server:
    """A jobfeed app on 127.0.0.1 in a thread with its own event loop, served as ``jobfeed
    serve`` serves it (its connection handler answers HTTP parser errors, such as a request
    line over 8 KiB, in the protocol's error shape)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.runner: ConnectionCappedRunner | None = None
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self.runner = ConnectionCappedRunner(
            create_app(self.config),
            max_connections=self.config.server.max_connections,
            header_timeout=self.config.server.header_timeout,
            access_log=None,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Config]]:
    path: Path = tmp_path_factory.mktemp("openapi") / "jobfeed.db"
    environ = {"JOBFEED_STORAGE__PATH": str(path), "JOBFEED_LOG__ACCESS": "false"}
    config = load_config(None, environ=environ)
    server = _Server(config)
    base_url = server.start()
    try:
        yield base_url, config
    finally:
        server.stop()


def _cases() -> list[Any]:
    """(operation, generation mode, job id): each operation with schema-valid data, and with
    invalid data when it takes any input; operations on one job also with valid data against
    a job that exists (generated ids mostly do not: 404)."""
    document = build_openapi(load_config(None, environ={}))
    params = []
    for path, item in document["paths"].items():
        if path.endswith("/stream"):
            continue
        for method, operation in item.items():
            if method == "parameters":
                continue
            label = f"{method.upper()} {path}"
            params.append(pytest.param(label, GenerationMode.POSITIVE, None))
            if "{job_id}" in path:
                job_id = f"known-{len(params)}"
                params.append(pytest.param(label, GenerationMode.POSITIVE, job_id))
            if "{job_id}" in path or "parameters" in operation or "requestBody" in operation:
                params.append(pytest.param(label, GenerationMode.NEGATIVE, None))
    return params


@pytest.mark.parametrize(("label", "mode", "job_id"), _cases())
def test_server_conforms_to_its_document(
    live_server: tuple[str, Config], label: str, mode: GenerationMode, job_id: str | None
) -> None:
    base_url, config = live_server
    schema = schemathesis.openapi.from_dict(build_openapi(config))
    # Size is checked before field rules (docs/protocol.md): an event that breaks a field
    # rule AND is over limits.max_event_bytes is refused 413, which is a rejection too.
    rejections = NegativeDataRejectionConfig._DEFAULT_EXPECTED_STATUSES
    schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
        expected_statuses=[*rejections, "413"]
    )
    operation = next(op for op in map(_ok, schema.get_all_operations()) if op.label == label)
    path_parameters = None
    if job_id is not None:
        response = requests.post(f"{base_url}/v1/jobs", json={"job_id": job_id}, timeout=10)
        assert response.status_code == 201, response.text
        path_parameters = {"job_id": job_id}
    sent = 0

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(
            base_url=base_url, checks=[*ALL_CHECKS, json_body_ends_with_newline], timeout=10
        )

    run()
    assert sent > 0


def test_every_query_parameter_allows_an_empty_value(config: Config) -> None:
    """Each query parameter is optional and says that an empty value counts as absent, which
    the server does (tests/test_api_jobs.py); schemathesis then holds the server to it."""
    document = build_openapi(config)
    seen = 0
    for item in document["paths"].values():
        operations = [op for method, op in item.items() if method != "parameters"]
        for operation in operations:
            for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
                if parameter["in"] == "query":
                    seen += 1
                    assert parameter["required"] is False, parameter
                    assert parameter["allowEmptyValue"] is True, parameter
    assert seen == 17
