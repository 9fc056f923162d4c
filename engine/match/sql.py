"""Matching in SQL: a rule's condition compiled from the IR into a WHERE over a facts table.

State rules run over the features table; event rules over a table of event facts (one row
per event: the customer's features as of right after it, plus `event.*` columns).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import tzinfo

from engine.catalog import FieldInfo, source_fields
from engine.conditions import compile_to_sql
from engine.conditions.ir import Condition
from engine.conditions.sql import SqlField


def fact_fields(catalog: Mapping[str, FieldInfo], event: str | None = None) -> dict[str, SqlField]:
    """How each field a condition may use is read from a facts table aliased `f`."""
    fields = {name: SqlField(f'f."{name}"', info.type) for name, info in catalog.items()}
    if event is not None:
        for name, field in source_fields(event).items():
            fields[f"event.{name}"] = SqlField(f'f."event.{name}"', field.type)
    return fields


def condition_sql(
    condition: Condition | None, fields: Mapping[str, SqlField], tz: tzinfo
) -> tuple[str, list[object]]:
    """The WHERE clause (and its bound values) for a condition; no condition is TRUE."""
    if condition is None:
        return "1", []
    return compile_to_sql(condition, fields, tz)


def match_sql(
    conn: sqlite3.Connection,
    table: str,
    key: str,
    condition: Condition | None,
    fields: Mapping[str, SqlField],
    tz: tzinfo,
) -> list[str]:
    """The `key` column of every row of `table` (schema-qualified, e.g. 'temp."facts"')
    that satisfies `condition`."""
    where, values = condition_sql(condition, fields, tz)
    cursor = conn.execute(f'SELECT f."{key}" FROM {table} f WHERE {where}', values)
    return [row[0] for row in cursor]
