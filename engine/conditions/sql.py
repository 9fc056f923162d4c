"""Compile a condition to a parameterised SQLite expression with SQL three-valued semantics.

Field expressions are trusted SQL supplied by the engine; every value from the condition is
bound as a ``?`` parameter, in the order the placeholders appear in the SQL text. A row is
selected only when the whole expression is true; a comparison with a missing (NULL) value is
unknown. Membership tests on a missing list and ``in []`` are unknown too (never plainly
false), so ``not`` behaves exactly like the complementary test (see ``ir.to_nnf``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Final

from .check import ConditionProblem, check_condition
from .ir import (
    And,
    Between,
    BoolTest,
    Compare,
    Condition,
    Contains,
    InList,
    IsNull,
    Literal,
    Not,
    Or,
)
from .types import FieldType

_SQL_OPS: Final = {"==": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True, slots=True)
class SqlField:
    """How a field is read in SQL: a trusted SQL expression and the field's type."""

    expr: str
    type: FieldType


class SqlCompileError(ValueError):
    """The condition does not fit the fields it is compiled against."""

    def __init__(self, problems: list[ConditionProblem]) -> None:
        super().__init__("; ".join(problem.message for problem in problems))
        self.problems = problems


def compile_to_sql(
    cond: Condition, fields: Mapping[str, SqlField], tz: tzinfo
) -> tuple[str, list[object]]:
    """Compile ``cond`` to ``(sql, params)``; dates are read as wall-clock times in ``tz``.

    Raises SqlCompileError when ``check_condition`` finds problems. ``tz`` should be a
    ``zoneinfo.ZoneInfo`` or ``datetime.timezone``.
    """
    problems = check_condition(cond, {name: field.type for name, field in fields.items()})
    if problems:
        raise SqlCompileError(problems)
    params: list[object] = []
    return _Compiler(fields, tz, params).compile(cond), params


def epoch_seconds(value: date, tz: tzinfo) -> int:
    """Return the epoch seconds of a date (at midnight) or naive datetime read in ``tz``."""
    moment = value if isinstance(value, datetime) else datetime(value.year, value.month, value.day)
    return int(moment.replace(tzinfo=tz).timestamp())


def _reads_list(cond: Condition) -> bool:
    """Whether evaluating ``cond`` scans a list (``contains``)."""
    if isinstance(cond, And | Or):
        return any(_reads_list(item) for item in cond.items)
    if isinstance(cond, Not):
        return _reads_list(cond.item)
    return isinstance(cond, Contains)


# A string JSON writes as it is (no quote, backslash or control character to escape).
_VERBATIM = re.compile(r'[^"\\\x00-\x1f]+')


class _Compiler:
    def __init__(self, fields: Mapping[str, SqlField], tz: tzinfo, params: list[object]) -> None:
        self.fields = fields
        self.tz = tz
        self.params = params

    def compile(self, cond: Condition) -> str:
        if isinstance(cond, And | Or):
            joiner = " AND " if isinstance(cond, And) else " OR "
            # SQLite evaluates AND / OR left to right and stops once the answer is known;
            # list membership (a json_each scan per row) goes after plain column tests.
            # Both connectives are commutative in three-valued logic: the result is the same.
            items = sorted(cond.items, key=_reads_list)
            return "(" + joiner.join(self.compile(item) for item in items) + ")"
        if isinstance(cond, Not):
            return f"(NOT {self.compile(cond.item)})"
        expr = self.fields[cond.field.name].expr
        if isinstance(cond, Compare):
            return f"({expr} {_SQL_OPS[cond.op]} {self.bind(cond.value)})"
        if isinstance(cond, InList):
            if not cond.values:
                return f"(CASE WHEN {expr} IS NULL THEN NULL ELSE {int(cond.negated)} END)"
            marks = ", ".join(self.bind(value) for value in cond.values)
            return f"({expr} {'NOT IN' if cond.negated else 'IN'} ({marks}))"
        if isinstance(cond, Contains):
            exists = "NOT EXISTS" if cond.negated else "EXISTS"
            value = cond.value.value
            quick = ""
            if isinstance(value, str) and _VERBATIM.fullmatch(value):
                # A JSON text without a backslash holds every string as written: one that
                # does not contain `value` at all cannot hold it as an element, and that is
                # told by a byte search, without parsing the list.
                self.params.append(value)
                quick = (
                    f"WHEN instr({expr}, ?) = 0 AND instr({expr}, '\\') = 0 "
                    f"THEN {int(cond.negated)} "
                )
            found = (
                f"{exists} (SELECT 1 FROM json_each({expr}) WHERE value = {self.bind(cond.value)})"
            )
            return f"(CASE WHEN {expr} IS NULL THEN NULL {quick}ELSE {found} END)"
        if isinstance(cond, Between):
            word = "NOT BETWEEN" if cond.negated else "BETWEEN"
            return f"({expr} {word} {self.bind(cond.low)} AND {self.bind(cond.high)})"
        if isinstance(cond, IsNull):
            return f"({expr} IS {'NOT NULL' if cond.negated else 'NULL'})"
        assert isinstance(cond, BoolTest)
        return f"({expr} = 1)"

    def bind(self, lit: Literal) -> str:
        """Append the SQL value of ``lit`` to the parameters and return its placeholder."""
        value = lit.value
        if lit.kind == "bool":
            self.params.append(1 if value else 0)
        elif isinstance(value, date):
            self.params.append(epoch_seconds(value, self.tz))
        else:
            self.params.append(value)
        return "?"
