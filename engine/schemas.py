"""The JSON Schemas that ship with the package (repo: schemas/, wheel: engine/schemas/)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGED = Path(__file__).parent / "schemas"
_SOURCE_TREE = Path(__file__).parent.parent / "schemas"


def schema_path(name: str) -> Path:
    """Where the schema called `name` (e.g. 'settings') lives in this installation."""
    for folder in (_PACKAGED, _SOURCE_TREE):
        candidate = folder / f"{name}.schema.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"schema {name!r} is not installed")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed JSON Schema called `name`."""
    data: dict[str, Any] = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return data
