"""Validation against OpenAI's published JSON Schemas (kept in shared/openai-spec)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "shared" / "openai-spec" / "openai-schemas.json",
    Path(__file__).resolve().parents[1] / "data" / "openai-schemas.json",
)


@cache
def _document() -> dict[str, Any]:
    for path in _CANDIDATES:
        if path.exists():
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
    raise FileNotFoundError("openai-schemas.json not found")


def validate(instance: Any, definition: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches `$defs/<definition>`."""
    doc = _document()
    schema = {"$ref": f"#/$defs/{definition}", "$defs": doc["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(instance)
