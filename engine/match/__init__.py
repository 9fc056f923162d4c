"""Matching facts against rule conditions; ``durable`` (the durable-rules adapter) loads lazily.

``from engine.match import DurableMatcher`` imports durable-rules on first use only, so
``engine.match.sql`` works where the durable-rules C extension does not import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .durable import (
        DurableCompileError,
        DurableError,
        DurableMatcher,
        compile_condition,
        compile_rulesets,
        encode_number,
        encode_text,
        fact_encoder,
        fact_from_features,
        fact_key,
    )

__all__ = [
    "DurableCompileError",
    "DurableError",
    "DurableMatcher",
    "compile_condition",
    "compile_rulesets",
    "encode_number",
    "encode_text",
    "fact_encoder",
    "fact_from_features",
    "fact_key",
]


def __getattr__(name: str) -> Any:
    """Load a public name of ``engine.match.durable`` on first access."""
    if name in __all__:
        return getattr(importlib.import_module(".durable", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
