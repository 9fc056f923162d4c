"""Spotting conditions that can never be true (`total_spend > 500 and total_spend < 100`).

Conservative: `contradiction` names a field only when every way the condition could hold
needs that field to meet constraints nothing can meet at once; anything it cannot decide
(mixed types, huge expansions) counts as satisfiable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from engine.conditions.ir import (
    And,
    Atom,
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
    to_nnf,
)

MAX_BRANCHES = 256


def contradiction(cond: Condition) -> str | None:
    """The field whose constraints contradict in every branch, or None if it can hold."""
    branches = _dnf(to_nnf(cond))
    if branches is None:
        return None
    culprit = None
    for atoms in branches:
        bad = _conflicting_field(atoms)
        if bad is None:
            return None
        culprit = culprit or bad
    return culprit


def _dnf(cond: Condition) -> list[list[Atom]] | None:
    """Disjunctive normal form of an NNF condition, or None when it grows too large."""
    if isinstance(cond, Or):
        out: list[list[Atom]] = []
        for item in cond.items:
            part = _dnf(item)
            if part is None:
                return None
            out.extend(part)
            if len(out) > MAX_BRANCHES:
                return None
        return out
    if isinstance(cond, And):
        product: list[list[Atom]] = [[]]
        for item in cond.items:
            part = _dnf(item)
            if part is None or len(product) * len(part) > MAX_BRANCHES:
                return None
            product = [left + right for left in product for right in part]
        return product
    if isinstance(cond, Not):  # to_nnf leaves no Not; be safe anyway
        return None
    return [[cond]]


@dataclass
class _Range:
    null: bool = False
    not_null: bool = False
    other: bool = False  # any comparison, which is false on null
    allowed: set[Any] | None = None
    excluded: set[Any] = field(default_factory=set)
    low: tuple[Any, bool] | None = None  # (value, inclusive)
    high: tuple[Any, bool] | None = None
    has: set[Any] = field(default_factory=set)
    lacks: set[Any] = field(default_factory=set)

    def allow(self, values: set[Any]) -> None:
        self.allowed = values if self.allowed is None else self.allowed & values

    def bound_low(self, value: Any, inclusive: bool) -> None:
        if self.low is None or value > self.low[0] or (value == self.low[0] and not inclusive):
            self.low = (value, inclusive)

    def bound_high(self, value: Any, inclusive: bool) -> None:
        if self.high is None or value < self.high[0] or (value == self.high[0] and not inclusive):
            self.high = (value, inclusive)

    def empty(self) -> bool:
        if self.null and (self.not_null or self.other):
            return True
        if self.has & self.lacks:
            return True
        if self.allowed is not None:
            return not any(self._inside(v) and v not in self.excluded for v in self.allowed)
        if self.low and self.high:
            (lo, lo_in), (hi, hi_in) = self.low, self.high
            if lo > hi or (lo == hi and not (lo_in and hi_in)):
                return True
            return lo == hi and lo in self.excluded
        return False

    def _inside(self, value: Any) -> bool:
        if self.low and (value < self.low[0] or (value == self.low[0] and not self.low[1])):
            return False
        return not (
            self.high and (value > self.high[0] or (value == self.high[0] and not self.high[1]))
        )


def _key(lit: Literal) -> Any:
    value = lit.value
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return value


def _conflicting_field(atoms: list[Atom]) -> str | None:
    ranges: dict[str, _Range] = {}
    for atom in atoms:
        r = ranges.setdefault(atom.field.name, _Range())
        try:
            _apply(r, atom)
        except TypeError:  # values of mixed types: not ours to judge
            r.allowed, r.low, r.high = None, None, None
    for name, r in ranges.items():
        try:
            if r.empty():
                return name
        except TypeError:
            continue
    return None


def _apply(r: _Range, atom: Atom) -> None:
    if isinstance(atom, IsNull):
        if atom.negated:
            r.not_null = True
        else:
            r.null = True
        return
    r.other = True
    if isinstance(atom, BoolTest):
        r.allow({True})
    elif isinstance(atom, Compare):
        value = _key(atom.value)
        if atom.op == "==":
            r.allow({value})
        elif atom.op == "!=":
            r.excluded.add(value)
        elif atom.op in (">", ">="):
            r.bound_low(value, atom.op == ">=")
        else:
            r.bound_high(value, atom.op == "<=")
    elif isinstance(atom, InList):
        values = {_key(v) for v in atom.values}
        if atom.negated:
            r.excluded |= values
        else:
            r.allow(values)
    elif isinstance(atom, Between) and not atom.negated:
        r.bound_low(_key(atom.low), True)
        r.bound_high(_key(atom.high), True)
    elif isinstance(atom, Contains):
        (r.lacks if atom.negated else r.has).add(_key(atom.value))
