"""The browser module's TypeScript declarations (clients/js/jobfeed.d.ts) against the frames'
JSON Schema the server publishes (server/frame_schema.py, GET /v1/frames.schema.json): every
object the schema defines has an interface of the same name declaring the same fields, so the
two cannot drift apart silently. (The fold is checked against the server's in Chromium, on
the vectors of tests/test_ui.py: tests/test_browser_client.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.frame_schema import build_frames_schema

DECLARATIONS = Path(__file__).resolve().parent.parent / "clients" / "js" / "jobfeed.d.ts"
_INTERFACE = re.compile(r"^export interface (\w+)(?: extends (\w+))? \{\n(.*?)^\}", re.M | re.S)
_INTERFACE_BASE = re.compile(r"^interface (\w+) \{\n(.*?)^\}", re.M | re.S)
_FIELD = re.compile(r"^  (\w+)\??:", re.M)


def declared_fields() -> dict[str, set[str]]:
    """Each interface's field names, inherited ones included (one level of ``extends``)."""
    text = DECLARATIONS.read_text(encoding="utf-8")
    bases = {name: set(_FIELD.findall(body)) for name, body in _INTERFACE_BASE.findall(text)}
    found: dict[str, set[str]] = {}
    for name, parent, body in _INTERFACE.findall(text):
        found[name] = set(_FIELD.findall(body)) | bases.get(parent, found.get(parent, set()))
    return found


def schema_objects() -> dict[str, set[str]]:
    definitions = build_frames_schema()["$defs"]
    return {
        name: set(schema["properties"])
        for name, schema in definitions.items()
        if schema.get("properties")
    }


@pytest.mark.parametrize("name", sorted(schema_objects()))
def test_each_schema_object_has_an_interface_with_its_fields(name: str) -> None:
    declared = declared_fields()
    assert name in declared, f"jobfeed.d.ts declares no interface {name}"
    assert declared[name] == schema_objects()[name], name
