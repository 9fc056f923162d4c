"""Static checks of a parsed condition against the known fields and their types."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from .ir import (
    And,
    Atom,
    Between,
    BoolTest,
    Compare,
    Condition,
    Contains,
    InList,
    Literal,
    LiteralKind,
    Not,
    Or,
    Span,
    format_literal,
)
from .types import FieldKind, FieldType


@dataclass(frozen=True, slots=True)
class ConditionProblem:
    """One problem found in a condition, located by character offsets in its source text."""

    message: str
    start: int
    end: int
    hint: str | None = None


_FIELD_WORDS: Final[dict[FieldKind, str]] = {
    "number": "a number",
    "string": "text",
    "bool": "a yes/no field",
    "timestamp": "a date/time",
    "string_list": "a list of text",
    "duration": "a duration",
}
_LITERAL_WORDS: Final[dict[LiteralKind, str]] = {
    "number": "a number",
    "string": "text",
    "bool": "true/false",
    "date": "a date",
    "duration": "a duration",
}
_ACCEPTS: Final[dict[FieldKind, frozenset[LiteralKind]]] = {
    "number": frozenset({"number"}),
    "string": frozenset({"string"}),
    "bool": frozenset({"bool"}),
    "timestamp": frozenset({"date"}),
    "duration": frozenset({"duration", "number"}),
    "string_list": frozenset(),
}
_ORDERED: Final[frozenset[FieldKind]] = frozenset({"number", "timestamp", "duration"})
_NUMBER_TEXT: Final = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_DATE_TEXT: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:]+)?")
_MAX_LISTED: Final = 12


def check_condition(cond: Condition, fields: Mapping[str, FieldType]) -> list[ConditionProblem]:
    """Return every problem in ``cond`` (unknown fields, type and enum mismatches) by position."""
    problems = [p for atom in _atoms(cond) for p in _check_atom(atom, fields)]
    return sorted(problems, key=lambda p: (p.start, p.end))


def _atoms(cond: Condition) -> Iterator[Atom]:
    if isinstance(cond, And | Or):
        for item in cond.items:
            yield from _atoms(item)
    elif isinstance(cond, Not):
        yield from _atoms(cond.item)
    else:
        yield cond


def _problem(span: Span, message: str, hint: str | None = None) -> ConditionProblem:
    return ConditionProblem(message, span[0], span[1], hint)


def _check_atom(atom: Atom, fields: Mapping[str, FieldType]) -> Iterator[ConditionProblem]:
    name = atom.field.name
    ftype = fields.get(name)
    if ftype is None:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"did you mean '{close[0]}'?" if close else None
        yield _problem(atom.field.span, f"unknown field '{name}'", hint)
        return
    kind = ftype.kind
    if isinstance(atom, BoolTest) and kind != "bool":
        yield _problem(
            atom.field.span, f"{name} is {_FIELD_WORDS[kind]}, not a yes/no field", _test_hint(atom)
        )
    elif isinstance(atom, Compare | InList) and kind == "string_list":
        yield _problem(
            atom.span,
            f'{name} is a list; test one value with "..." in {name}',
            f'write e.g. "vip" in {name} or "vip" not in {name}',
        )
    elif isinstance(atom, Compare):
        yield from _check_value(name, ftype, atom.value)
        if kind == "bool" and atom.op not in ("==", "!="):
            message = f"{name} is a yes/no field; compare it only with == or !="
            yield _problem(atom.span, message)
        elif ftype.allowed is not None and atom.op not in ("==", "!="):
            # Enum values have no order: "sleeping" > "active" would compare spellings.
            yield _problem(
                atom.span,
                f"{name} has no order; compare it with == or !=",
                f"to match several values write {name} in [...]",
            )
    elif isinstance(atom, InList):
        for value in atom.values:
            yield from _check_value(name, ftype, value)
    elif isinstance(atom, Contains):
        yield from _check_contains(atom, ftype)
    elif isinstance(atom, Between):
        yield from _check_between(atom, ftype)


def _test_hint(atom: BoolTest) -> str:
    name = atom.field.name
    return f"compare it, e.g. {name} > 0, or test {name} is not null"


def _check_value(name: str, ftype: FieldType, lit: Literal) -> Iterator[ConditionProblem]:
    kind, shown = ftype.kind, format_literal(lit)
    if lit.kind not in _ACCEPTS[kind]:
        if lit.kind == "date":
            message = f"date(...) needs a date/time field, but {name} is {_FIELD_WORDS[kind]}"
        elif lit.kind == "duration":
            message = f"a duration needs a duration field, but {name} is {_FIELD_WORDS[kind]}"
        else:
            message = f"{name} is {_FIELD_WORDS[kind]}, but {shown} is {_LITERAL_WORDS[lit.kind]}"
        yield _problem(lit.span, message, _mismatch_hint(kind, lit))
    elif ftype.allowed is not None and lit.kind == "string":
        yield from _check_enum(name, ftype.allowed, lit)


def _check_enum(name: str, allowed: tuple[str, ...], lit: Literal) -> Iterator[ConditionProblem]:
    value = str(lit.value)
    if value in allowed:
        return
    listed = ", ".join(allowed[:_MAX_LISTED]) + (", ..." if len(allowed) > _MAX_LISTED else "")
    close = difflib.get_close_matches(value.lower(), allowed, n=1)
    hint = f"did you mean '{close[0]}'? allowed: {listed}" if close else f"allowed: {listed}"
    yield _problem(lit.span, f"{name} can never be '{value}'", hint)


def _mismatch_hint(kind: FieldKind, lit: Literal) -> str | None:
    value = lit.value
    if kind == "number" and lit.kind == "string" and _NUMBER_TEXT.fullmatch(str(value)):
        return f"remove the quotes: {value}"
    if kind == "string" and lit.kind in ("number", "bool", "duration"):
        return f'put text in quotes: "{lit.text or format_literal(lit)}"'
    if kind == "timestamp":
        if lit.kind == "string" and _DATE_TEXT.fullmatch(str(value)):
            return f'write date("{value}")'
        return 'write dates as date("YYYY-MM-DD")'
    if kind == "bool":
        return "compare it with true or false"
    if kind == "duration":
        return "write durations like 30d, 12h, 45m or 10s"
    return None


def _check_contains(atom: Contains, ftype: FieldType) -> Iterator[ConditionProblem]:
    name, kind, lit = atom.field.name, ftype.kind, atom.value
    if kind != "string_list":
        message = f"{name} is {_FIELD_WORDS[kind]}, not a list, so nothing can be 'in' it"
        hint = f"write {name} == {format_literal(lit)} or {name} in [...]"
        yield _problem(atom.field.span, message, hint)
    elif lit.kind != "string":
        message = f"{name} holds text, but {format_literal(lit)} is {_LITERAL_WORDS[lit.kind]}"
        hint = f'put it in quotes: "{lit.text or format_literal(lit)}"'
        yield _problem(lit.span, message, hint)
    elif ftype.allowed is not None:
        yield from _check_enum(name, ftype.allowed, lit)


def _check_between(atom: Between, ftype: FieldType) -> Iterator[ConditionProblem]:
    name, kind = atom.field.name, ftype.kind
    if kind not in _ORDERED:
        message = f"'between' needs a number, date/time or duration field; {name} is "
        yield _problem(atom.field.span, message + _FIELD_WORDS[kind])
        return
    yield from _check_value(name, ftype, atom.low)
    yield from _check_value(name, ftype, atom.high)
