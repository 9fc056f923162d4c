"""Match facts against conditions with durable-rules; the only module that imports ``durable``.

A condition (``engine.conditions`` IR) compiles to a durable-rules pattern that selects
exactly the facts ``compile_to_sql`` selects (SQL three-valued logic: only TRUE selects).
The condition is put in negation normal form (``to_nnf``) and every atom is false on a
missing value, so ``not`` never has to be compiled.

Fact encoding (``fact_from_features``; conditions are encoded the same way):

- keys: ``f_`` + the field name with ``.`` -> ``__`` (``event.amount`` -> ``f_event__amount``);
  the key ``id`` is the per-assert unique marker, so identical facts never collide;
- missing and ``None`` (and NaN, which SQLite stores as NULL) -> JSON ``null``; every
  comparison with ``null`` is false in durable, ``is null`` is ``{key: null}``;
- numbers, timestamps (epoch seconds), durations (seconds) and bools (0/1, as in SQL) ->
  a 19-character order-preserving string: the IEEE bits of the nearest double made
  sortable, then the exact integer remainder, so ints and floats compare exactly as
  SQLite compares them (durable's JSON reader cannot read ``1e-05`` or ``1e+20``);
- text -> lowercase hex of its UTF-8 bytes: byte order is SQLite's BINARY order (durable
  compares strings with ``strncmp`` on JSON-escaped text, which misorders ``"``, ``\\``,
  control characters and prefixes followed by a space); over-long text is cut after
  ``MAX_TEXT_BYTES + 1`` bytes, which changes no comparison with a literal;
- string lists -> ``["~", hex, ...]``: the sentinel keeps ``$iall`` true on an empty list.

Syntax found by experiment (durable-rules 2.0.28): ``"x" in tags`` is
``{"$iany": {key: {"$i": hex}}}``, ``"x" not in tags`` is
``{"$iall": {key: {"$neq": {"$i": hex}}}}``; ``$nex`` never returns (assert/retract spin
forever), hence explicit nulls instead of dropped keys.

Limits of durable that the compiler enforces (``DurableCompileError``): at most 15 ``$and``/
``$or`` groups per rule (error 113), at most 64 alpha nodes pending at once while matching
(error 303: 70 rules all true for one fact already fail, however few rules a ruleset has),
fewer than 512 children per node (more hangs ``set_rulesets``), one firing per true path
through an ``$or`` (results are de-duplicated). Rules hang below a tree of always-true
tests on ``id`` (fan-out 8) so that up to 512 rules fit in one ruleset.

Throughput (2-core machine, CPython 3.11, 20 rules in one ruleset, about 3 matches per
fact): see ``THROUGHPUT``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, tzinfo
from typing import Any, Final

from durable import engine as _durable

from engine.conditions.check import ConditionProblem, check_condition
from engine.conditions.ir import (
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
    fields_used,
    to_nnf,
)
from engine.conditions.sql import epoch_seconds
from engine.conditions.types import FieldType

THROUGHPUT: Final = "about 30,000 facts/s (20 rules, 1 ruleset); see the report"

Pattern = dict[str, Any]
Rule = tuple[str, Condition | None]

MARKER: Final = "id"
LIST_SENTINEL: Final = "~"
MAX_TEXT_BYTES: Final = 8192
MAX_SHARD_SIZE: Final = 512  # FAN_OUT ** 3: two levels of grouping tests
MAX_GROUPS: Final = 15  # $and/$or per rule: 16 give error 113
MAX_PENDING: Final = 64  # durable's alpha-node stack
MAX_CHILDREN: Final = 400  # per node; 512 hang
MAX_PATHS: Final = 128  # firings of one rule for one fact
FAN_OUT: Final = 8
FALSE: Final[Pattern] = {MARKER: "!"}  # markers are digits: never equal

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OPS: Final = {"!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
_F64: Final = struct.Struct(">d")
_U64: Final = struct.Struct(">Q")
_SIGN: Final = 1 << 63
_MASK: Final = (1 << 64) - 1
_RESERVED: Final = (  # names durable gives a meaning, looked up by hash
    *("id", "sid", "m", "$i", "$s", "$l", "$r", "$forward", "$and", "$or", "$all", "$any"),
    *("$eq", "$neq", "$lt", "$lte", "$gt", "$gte", "$ex", "$nex", "$mt", "$imt", "$iall"),
    *("$iany", "$add", "$sub", "$mul", "$div", "$not"),
)


class DurableCompileError(ValueError):
    """A condition or rule set that does not fit the fields, or that durable cannot run."""

    def __init__(self, message: str, problems: Sequence[ConditionProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class DurableError(RuntimeError):
    """durable-rules failed while matching (an error code, or an exception in an action)."""


# ---------------------------------------------------------------------------------------------
# Encoding


def fact_key(name: str) -> str:
    """The fact key of a field: ``f_`` + name with dots as ``__`` (``event.amount``)."""
    if not _NAME.fullmatch(name):
        raise DurableCompileError(f"field name {name!r} cannot be a durable-rules fact key")
    return "f_" + name.replace(".", "__")


def encode_number(value: float | int) -> str | None:
    """The order-preserving text of a number (bools are 0/1); None for NaN (SQL NULL)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        nearest, rest = value + 0.0, 0  # + 0.0 turns -0.0 into 0.0
    else:
        whole = int(value)
        if not -_SIGN <= whole < _SIGN:
            raise ValueError(f"{whole} does not fit in 64 bits (SQLite's integer range)")
        nearest = float(whole)
        rest = whole - int(nearest)  # |rest| <= 512: the exact tail of a rounded int
    (bits,) = _U64.unpack(_F64.pack(nearest))
    bits = bits ^ _MASK if bits & _SIGN else bits | _SIGN
    return f"{bits:016x}{rest + 2048:03x}"


def encode_text(value: str) -> str:
    """Hex of the UTF-8 bytes (cut after MAX_TEXT_BYTES + 1 bytes); hex order is byte order."""
    return value.encode("utf-8", "surrogatepass")[: MAX_TEXT_BYTES + 1].hex()


def _encode_value(name: str, ftype: FieldType, value: Any) -> Any:
    if value is None:
        return None
    kind = ftype.kind
    if kind == "string":
        if isinstance(value, str):
            return encode_text(value)
    elif kind == "string_list":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return [LIST_SENTINEL, *(encode_text(v) for v in value)]
    elif kind == "bool":
        if isinstance(value, int | float) and value in (0, 1):
            return encode_number(value)
    elif isinstance(value, int | float):
        return encode_number(value)
    raise TypeError(f"field {name} is {kind}, but the fact has {type(value).__name__} {value!r}")


def fact_from_features(row: Mapping[str, Any], fields: Mapping[str, FieldType]) -> dict[str, Any]:
    """Encode the ``fields`` of a features row as a durable fact (missing -> null)."""
    return {fact_key(n): _encode_value(n, t, row.get(n)) for n, t in fields.items()}


def _fnv1a(text: str) -> int:
    digest = 0x811C9DC5
    for byte in text.encode("utf-8"):
        digest = ((digest ^ byte) * 16777619) & 0xFFFFFFFF
    return digest


def _check_keys(names: Iterable[str]) -> None:
    """durable finds properties by a 32-bit hash of their name: refuse any clash."""
    seen = {_fnv1a(word): f"durable's reserved name {word!r}" for word in _RESERVED}
    for name in sorted(names):
        digest = _fnv1a(fact_key(name))
        if digest in seen:
            raise DurableCompileError(f"field {name} clashes with {seen[digest]} in durable-rules")
        seen[digest] = f"field {name}"


# ---------------------------------------------------------------------------------------------
# Conditions -> patterns


def compile_condition(cond: Condition, fields: Mapping[str, FieldType], tz: tzinfo) -> Pattern:
    """The durable pattern (``m``) selecting exactly what ``compile_to_sql(cond)`` selects."""
    problems = check_condition(cond, fields)
    if problems:
        raise DurableCompileError("; ".join(p.message for p in problems), problems)
    _check_keys(fields_used(cond))
    pattern = _Compiler(fields, tz).compile(to_nnf(cond))
    _check_shape(pattern)
    return pattern


class _Compiler:
    def __init__(self, fields: Mapping[str, FieldType], tz: tzinfo) -> None:
        self.fields = fields
        self.tz = tz

    def compile(self, cond: Condition) -> Pattern:
        if isinstance(cond, And | Or):
            op = "$and" if isinstance(cond, And) else "$or"
            return _join(op, [self.compile(item) for item in cond.items])
        if isinstance(cond, Not):
            raise AssertionError("conditions are compiled in negation normal form")
        name = cond.field.name
        key = fact_key(name)
        if isinstance(cond, Compare):
            code = self.code(cond.value)
            return {key: code} if cond.op == "==" else {_OPS[cond.op]: {key: code}}
        if isinstance(cond, InList):
            codes = [self.code(value) for value in cond.values]
            if cond.negated:
                if not codes:
                    return _not_null(key, self.fields[name])
                return _join("$and", [{"$neq": {key: code}} for code in codes])
            return _join("$or", [{key: code} for code in codes]) if codes else FALSE
        if isinstance(cond, Contains):
            code = self.code(cond.value)
            if cond.negated:
                return {"$iall": {key: {"$neq": {"$i": code}}}}
            return {"$iany": {key: {"$i": code}}}
        if isinstance(cond, Between):
            low, high = self.code(cond.low), self.code(cond.high)
            if cond.negated:
                return _join("$or", [{"$lt": {key: low}}, {"$gt": {key: high}}])
            return _join("$and", [{"$gte": {key: low}}, {"$lte": {key: high}}])
        if isinstance(cond, IsNull):
            return _not_null(key, self.fields[name]) if cond.negated else {key: None}
        assert isinstance(cond, BoolTest)
        return {key: encode_number(1)}

    def code(self, lit: Literal) -> str:
        """The encoded value of a literal, exactly as facts encode the same value."""
        value = lit.value
        if lit.kind == "string":
            text = str(value)
            if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
                raise DurableCompileError(f"text longer than {MAX_TEXT_BYTES} bytes")
            return encode_text(text)
        if lit.kind == "bool":
            value = 1 if value else 0
        elif isinstance(value, date):
            value = epoch_seconds(value, self.tz)
        if isinstance(value, str):
            raise DurableCompileError(f"{lit.kind} literal {value!r} is text")
        code = encode_number(value)
        if code is None:
            raise DurableCompileError("NaN is not a value a condition can compare with")
        return code


def _not_null(key: str, ftype: FieldType) -> Pattern:
    if ftype.kind == "string_list":  # a list is never != null in durable; the sentinel is there
        return {"$iany": {key: {"$i": LIST_SENTINEL}}}
    return {"$neq": {key: None}}


def _join(op: str, items: list[Pattern]) -> Pattern:
    """``$and``/``$or`` of items, flattened, without duplicates, folding FALSE."""
    flat: list[Pattern] = []
    seen: set[str] = set()
    for item in items:
        for part in item.get(op, [item]):
            text = json.dumps(part, sort_keys=True)
            if text not in seen:
                seen.add(text)
                flat.append(part)
    if FALSE in flat:
        if op == "$and":
            return FALSE
        flat.remove(FALSE)
    if not flat:
        return FALSE
    return flat[0] if len(flat) == 1 else {op: flat}


@dataclass(frozen=True, slots=True)
class _Shape:
    """How a pattern loads durable's alpha network (see ``_shape``)."""

    entries: int  # entry nodes that can be true at once (pushed together by the parent)
    children: int  # entry nodes in all
    pending: int  # most extra nodes left on the stack along one path inside the pattern
    paths: int  # true paths to the end at once: the rule fires once per path
    fan_out: int  # most children of one node inside the pattern
    groups: int  # $and/$or objects


def _is_equality(pattern: Pattern) -> bool:
    return len(pattern) == 1 and not next(iter(pattern)).startswith("$")


def _shape(pattern: Pattern) -> _Shape:
    """Measure a pattern as durable builds it: an ``$and`` is a chain (each item below the
    previous item's end), an ``$or`` puts every branch below the parent and joins them in one
    forward node. Equality tests on one key exclude each other, so only one can be true."""
    if "$and" in pattern:
        parts = [_shape(item) for item in pattern["$and"]]
        paths = math.prod(p.paths for p in parts)
        pending = sum(p.pending for p in parts) + sum(p.entries - 1 for p in parts[1:])
        fan_out = max([p.fan_out for p in parts] + [p.children for p in parts[1:]])
        groups = 1 + sum(p.groups for p in parts)
        return _Shape(parts[0].entries, parts[0].children, pending, paths, fan_out, groups)
    if "$or" in pattern:
        keys = {next(iter(item)) for item in pattern["$or"] if _is_equality(item)}
        parts = [_shape(item) for item in pattern["$or"] if not _is_equality(item)]
        return _Shape(
            entries=len(keys) + sum(p.entries for p in parts),
            children=len(pattern["$or"]),
            pending=max([0] + [p.pending for p in parts]),
            paths=len(keys) + sum(p.paths for p in parts),
            fan_out=max([0] + [p.fan_out for p in parts]),
            groups=1 + sum(p.groups for p in parts),
        )
    return _Shape(1, 1, 0, 1, 0, 0)


def _check_shape(pattern: Pattern) -> None:
    """Refuse a pattern that durable would reject, overflow on or hang on, in any shard."""
    shape = _shape(pattern)
    groups = shape.groups + (0 if "$and" in pattern else 1)  # below the grouping tests
    # The grouping tests leave at most FAN_OUT - 1 siblings pending on each of 3 levels.
    budget = MAX_PENDING - 3 * (FAN_OUT - 1) - 1
    if groups > MAX_GROUPS:
        raise DurableCompileError(
            f"condition too complex for durable-rules: it needs {groups} and/or groups "
            f"(limit {MAX_GROUPS}); split it into several rules"
        )
    if max(shape.fan_out, shape.children) > MAX_CHILDREN:
        raise DurableCompileError(
            f"condition too wide for durable-rules: {max(shape.fan_out, shape.children)} "
            f"alternatives at one point (limit {MAX_CHILDREN}); shorten the list"
        )
    if shape.entries + shape.pending > budget:
        raise DurableCompileError(
            f"condition too wide for durable-rules: up to {shape.entries + shape.pending} "
            f"tests can be true at once (limit {budget}); split the 'or'"
        )
    if shape.paths > MAX_PATHS:
        raise DurableCompileError(
            f"condition has {shape.paths} ways to be true at once; durable-rules fires once "
            f"per way (limit {MAX_PATHS}); simplify the nested 'or's"
        )


# ---------------------------------------------------------------------------------------------
# Rulesets


def compile_rulesets(
    name: str,
    rules: Sequence[Rule],
    fields: Mapping[str, FieldType],
    tz: tzinfo,
    shard_size: int = 400,
) -> dict[str, dict[str, Any]]:
    """Plain-data rulesets for ``rules`` (``f"{name}_{i}"`` when sharded); rule ``r{i}`` runs
    action ``f"{name}#{i}"``, ``pri`` is ``i``; a rule without condition matches every fact."""
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must be between 1 and {MAX_SHARD_SIZE}")
    patterns = [None if c is None else compile_condition(c, fields, tz) for _, c in rules]
    _check_keys({n for _, c in rules if c is not None for n in fields_used(c)})
    count = -(-len(patterns) // shard_size) or 1
    bounds = [len(patterns) * k // count for k in range(count + 1)]
    rulesets: dict[str, dict[str, Any]] = {}
    for shard in range(count):
        members = range(bounds[shard], bounds[shard + 1])
        levels = 0 if len(members) <= FAN_OUT else 1 if len(members) <= FAN_OUT**2 else 2
        rulesets[f"{name}_{shard}" if count > 1 else name] = {
            f"r{index}": {
                "all": [{"m": _place(patterns[index], index - members.start, levels, index)}],
                "pri": index,
                "run": f"{name}#{index}",
            }
            for index in members
        }
    return rulesets


def _place(pattern: Pattern | None, slot: int, levels: int, index: int) -> Pattern:
    """Hang a rule below grouping tests and a test of its own, all true for every fact.

    At most FAN_OUT children per node keeps durable's matching stack small (see
    ``_check_shape``). The tests are ``id < ":..."``: true for the digit markers of facts,
    false for durable's own state object (id ``sid-0``), which it matches against the rules
    after every action; a rule true for that object would fire forever.
    """
    digits = [(slot // FAN_OUT**power) % FAN_OUT for power in range(levels, 0, -1)]
    tags = ["g" + ".".join(map(str, digits[: depth + 1])) for depth in range(levels)]
    tests: list[Pattern] = [{"$lt": {MARKER: f":{tag}"}} for tag in [*tags, f"r{index}"]]
    if pattern is not None:
        tests.extend(pattern.get("$and", [pattern]))
    return tests[0] if len(tests) == 1 else {"$and": tests}


# ---------------------------------------------------------------------------------------------
# Matching


class _Host(_durable.Host):  # type: ignore[misc]
    """One process-wide Host; actions come from a registry, and no polling threads start."""

    def __init__(self) -> None:
        self.actions: dict[str, Callable[[Any], None]] = {}
        super().__init__()

    def get_action(self, action_name: str) -> Callable[[Any], None]:
        """The recorder registered for ``action_name``."""
        return self.actions[action_name]

    def _run(self) -> None:
        """Start no dispatch/timer threads: they race the caller's thread into the C core,
        and nothing here needs them (actions run inside ``assert_fact``)."""


_LOCK: Final = threading.Lock()
_SERIAL: Final = itertools.count()
_MARKS: Final = itertools.count()
_HOST: list[_Host] = []
# durable times actions with datetime.utcfromtimestamp, deprecated in Python 3.12; only
# differences of its values are used, so time.time is equivalent and warns of nothing.
_durable._unix_now = time.time


def _host() -> _Host:
    if not _HOST:
        _HOST.append(_Host())
    return _HOST[0]


class DurableMatcher:
    """Rules registered once on the process-wide durable Host, matched fact by fact."""

    def __init__(
        self,
        name: str,
        rules: Sequence[Rule],
        fields: Mapping[str, FieldType],
        tz: tzinfo,
        shard_size: int = 400,
    ) -> None:
        """Compile ``rules`` and register them under fresh, unique ruleset names."""
        ids = [rule_id for rule_id, _ in rules]
        if len(set(ids)) != len(ids):
            raise ValueError("rule ids must be unique")
        self.rule_ids = ids
        used = {n for _, c in rules if c is not None for n in fields_used(c)}
        self._fields = {n: fields[n] for n in sorted(used) if n in fields}
        self.name = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}-{next(_SERIAL)}"
        rulesets = compile_rulesets(self.name, rules, fields, tz, shard_size)
        self.rulesets = list(rulesets)
        self._hits: list[int] = []
        with _LOCK:
            host = _host()
            for index in range(len(rules)):
                host.actions[f"{self.name}#{index}"] = self._recorder(index)
            try:
                host.set_rulesets(copy.deepcopy(rulesets))
            except Exception as exc:
                raise DurableError(f"durable-rules refused the rules: {exc}") from exc

    def _recorder(self, index: int) -> Callable[[Any], None]:
        hits = self._hits

        def record(_closure: Any) -> None:
            hits.append(index)

        return record

    def encode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The fact asserted for ``row``: the fields the rules use, plus a fresh marker."""
        fact = fact_from_features(row, self._fields)
        fact[MARKER] = str(next(_MARKS))
        return fact

    def match(self, facts: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
        """``(fact_key, rule_id)`` for every rule each fact satisfies, in input and rule order."""
        found: list[tuple[str, str]] = []
        hits, ids = self._hits, self.rule_ids
        with _LOCK:
            host = _host()
            for key, row in facts:
                fact = self.encode(row)
                hits.clear()
                for ruleset in self.rulesets:
                    _assert_and_retract(host, ruleset, fact)
                found.extend((key, ids[index]) for index in sorted(set(hits)))
        return found


def _assert_and_retract(host: _Host, ruleset: str, fact: dict[str, Any]) -> None:
    """Assert ``fact`` (its actions record matches), retract it, surface swallowed errors."""
    try:
        host.assert_fact(ruleset, fact)
    except _durable.MessageNotHandledException:
        return  # matched nothing, so nothing was stored
    except Exception as exc:
        raise DurableError(f"durable-rules failed on a fact: {exc}") from exc
    try:
        host.retract_fact(ruleset, fact)
    except Exception as exc:
        raise DurableError(f"durable-rules could not retract a fact: {exc}") from exc
    state = host.get_state(ruleset)
    if "exception" in state:
        message = state.pop("exception")
        host.update_state(ruleset, state)
        raise DurableError(f"an action failed inside durable-rules: {message}")
