"""Matching customer facts against rule conditions (durable-rules adapter in ``durable``)."""

from .durable import (
    DurableCompileError,
    DurableError,
    DurableMatcher,
    compile_condition,
    compile_rulesets,
    encode_number,
    encode_text,
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
    "fact_from_features",
    "fact_key",
]
