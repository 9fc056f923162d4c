"""Typed internal representation (IR) of parsed conditions, plus NNF and canonical text.

Every node is a frozen, slotted dataclass carrying ``span``: the ``(start, end)`` character
offsets of the node in the source text. Spans never take part in equality, so two conditions
compare equal when they mean the same thing, wherever they were written.
"""

from __future__ import annotations

import dataclasses as dc
import typing as t
from datetime import date, datetime
from decimal import Decimal

Span = tuple[int, int]
LiteralKind = t.Literal["number", "string", "bool", "date", "duration"]
CompareOp = t.Literal["==", "!=", "<", "<=", ">", ">="]
LiteralValue = int | float | str | date  # bool is an int; datetime is a date

NO_SPAN: t.Final[Span] = (0, 0)


@dc.dataclass(frozen=True, slots=True)
class Field:
    """A reference to a field, possibly dotted (``event.amount``)."""

    name: str
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Literal:
    """A literal value.

    ``value`` is an int/float (number), str (string), bool, ``datetime.date`` or
    ``datetime.datetime`` (date) or an int number of seconds (duration). ``text`` is the
    literal as written; for dates it is the ISO text inside ``date(...)``.
    """

    value: LiteralValue
    kind: LiteralKind
    text: str = dc.field(default="", compare=False)
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Compare:
    """``field <op> value``; a value-on-the-left comparison is normalised to this form."""

    field: Field
    op: CompareOp
    value: Literal
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class InList:
    """``field in [values]`` or, when negated, ``field not in [values]``."""

    field: Field
    values: tuple[Literal, ...]
    negated: bool = False
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Contains:
    """``value in list_field`` or, when negated, ``value not in list_field``."""

    field: Field
    value: Literal
    negated: bool = False
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Between:
    """``field between low and high`` (inclusive at both ends), optionally negated."""

    field: Field
    low: Literal
    high: Literal
    negated: bool = False
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class IsNull:
    """``field is null`` or, when negated, ``field is not null``."""

    field: Field
    negated: bool = False
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class BoolTest:
    """A bare field name used as a yes/no test (``is_friend``)."""

    field: Field
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class And:
    """All of ``items`` hold."""

    items: tuple[Condition, ...]
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Or:
    """At least one of ``items`` holds."""

    items: tuple[Condition, ...]
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


@dc.dataclass(frozen=True, slots=True)
class Not:
    """``item`` does not hold."""

    item: Condition
    span: Span = dc.field(default=NO_SPAN, compare=False, kw_only=True)


Atom = Compare | InList | Contains | Between | IsNull | BoolTest
Condition = Atom | And | Or | Not

COMPLEMENT: t.Final[dict[CompareOp, CompareOp]] = {
    "==": "!=",
    "!=": "==",
    "<": ">=",
    "<=": ">",
    ">": "<=",
    ">=": "<",
}


def fields_used(cond: Condition) -> set[str]:
    """Return the names of all fields referenced by ``cond``."""
    if isinstance(cond, And | Or):
        names: set[str] = set()
        for item in cond.items:
            names |= fields_used(item)
        return names
    if isinstance(cond, Not):
        return fields_used(cond.item)
    return {cond.field.name}


def to_nnf(cond: Condition) -> Condition:
    """Push every ``not`` down to the atoms (negation normal form); the result has no Not.

    ``not`` over and/or uses De Morgan's laws; ``not`` over an atom becomes the complementary
    atom (``==`` <-> ``!=``, ``<`` <-> ``>=``, ``<=`` <-> ``>``, negated in/contains/between/
    is-null, and ``not flag`` -> ``flag == false``). De Morgan's laws hold in SQL's
    three-valued (Kleene) logic, and every atom and its complement are both unknown (NULL)
    when the field's value is missing, so the rewrite preserves SQL three-valued semantics:
    the result selects exactly the rows the original does. (The SQL compiler keeps that
    promise by making membership and empty-list tests unknown, never plainly false, on a
    missing value.)
    """
    return _nnf(cond, negate=False)


def _nnf(cond: Condition, negate: bool) -> Condition:
    if isinstance(cond, Not):
        return _nnf(cond.item, not negate)
    if isinstance(cond, And | Or):
        conj = isinstance(cond, And) != negate
        items: list[Condition] = []
        for item in cond.items:
            new = _nnf(item, negate)
            same = isinstance(new, And) if conj else isinstance(new, Or)
            items.extend(new.items if same and isinstance(new, And | Or) else (new,))
        return And(tuple(items), span=cond.span) if conj else Or(tuple(items), span=cond.span)
    return negate_atom(cond) if negate else cond


def negate_atom(atom: Atom) -> Atom:
    """Return the atom that holds exactly when ``atom`` is false (both unknown on NULL)."""
    if isinstance(atom, Compare):
        return dc.replace(atom, op=COMPLEMENT[atom.op])
    if isinstance(atom, BoolTest):
        false = Literal(False, "bool", "false", span=atom.span)
        return Compare(atom.field, "==", false, span=atom.span)
    return dc.replace(atom, negated=not atom.negated)


# ---------------------------------------------------------------------------------------------
# Canonical text


_DURATION_UNITS: t.Final = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_ESCAPES: t.Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def format_condition(cond: Condition) -> str:
    """Render ``cond`` as canonical condition text that parses back to an equal condition."""
    if isinstance(cond, And | Or):
        joiner = " and " if isinstance(cond, And) else " or "
        return joiner.join(_group(item) for item in cond.items)
    if isinstance(cond, Not):
        item = cond.item
        text = format_condition(item)
        return f"not {text}" if isinstance(item, Not | BoolTest) else f"not ({text})"
    return _format_atom(cond)


def _group(cond: Condition) -> str:
    text = format_condition(cond)
    return f"({text})" if isinstance(cond, And | Or) else text


def _format_atom(atom: Atom) -> str:
    name = atom.field.name
    if isinstance(atom, Compare):
        return f"{name} {atom.op} {format_literal(atom.value)}"
    if isinstance(atom, InList):
        values = ", ".join(format_literal(v) for v in atom.values)
        return f"{name} {'not in' if atom.negated else 'in'} [{values}]"
    if isinstance(atom, Contains):
        return f"{format_literal(atom.value)} {'not in' if atom.negated else 'in'} {name}"
    if isinstance(atom, Between):
        word = "not between" if atom.negated else "between"
        return f"{name} {word} {format_literal(atom.low)} and {format_literal(atom.high)}"
    if isinstance(atom, IsNull):
        return f"{name} is not null" if atom.negated else f"{name} is null"
    return name


def format_literal(lit: Literal) -> str:
    """Render a literal in canonical source form (double-quoted strings, ``date("...")``)."""
    value = lit.value
    if lit.kind == "bool":
        return "true" if value else "false"
    if lit.kind == "string":
        return _quote(str(value))
    if isinstance(value, datetime):
        return f'date("{value.replace(tzinfo=None).isoformat(timespec="seconds")}")'
    if isinstance(value, date):
        return f'date("{value.isoformat()}")'
    if lit.kind == "duration" and isinstance(value, int):
        unit, size = next((u, s) for u, s in _DURATION_UNITS if value % s == 0)
        return f"{value // size}{unit}"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            text = format(Decimal(text), "f")
        return text if "." in text else text + ".0"
    return str(value)


def _quote(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ch in "\x7f\u2028\u2029":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
