"""Match facts against conditions with durable-rules: the only module that imports ``durable``.

``compile_condition`` turns a condition (in negation normal form, see ``ir.to_nnf``) into a
durable pattern selecting exactly what ``compile_to_sql`` selects: every atom is false on a
missing value. Facts (``fact_encoder``) and literals share one encoding: keys are ``f_`` +
the name with dots as ``__`` (``f_event__amount``); ``id`` is a fresh marker per assert, so
identical facts never collide. Missing, ``None`` and NaN (SQL NULL) are JSON ``null``, false
in every comparison; ``is null`` is ``{key: null}``. Values are strings that sort as SQLite
sorts them, by storage class first, whatever the field's kind: numbers (and bools as 0/1,
timestamps as epoch seconds, durations as seconds) are ``"1"`` + 19 hex digits (sortable
IEEE bits of the nearest double, then the exact remainder), so ints and floats compare as
in SQLite and durable's number reader (which fails on ``1e-05``) is never used; text is
``"2"`` + the hex of its UTF-8 bytes, in SQLite's BINARY order (durable ``strncmp``s
JSON-escaped text, so quotes, backslashes, control characters and ``"ab" < "ab "`` come out
wrong). A list is ``["~", code...]``, the sentinel keeping ``$iall`` true on an empty list
(text elements end at a NUL, as SQLite's ``json_each`` ends them).

durable-rules 2.0.28, by experiment: ``"x" in tags`` is ``{"$iany": {key: {"$i": x}}}``,
``"x" not in tags`` is ``{"$iall": {key: {"$neq": {"$i": x}}}}``. ``$nex``, like any rule
true for durable's own state object, fires forever. Refused at compile time: more than 15
``$and``/``$or`` per rule (error 113), more than 64 alpha nodes pending while matching
(error 303: 70 rules true for one fact fail in any ruleset), 512 children of one node (a
hang), more than 250 fields (error 302). A rule fires once per true path through an ``$or``
(results are de-duplicated). Rules hang below a tree of always-true tests (fan-out 8), so
up to 512 rules share one ruleset.

Measured (2 busy cores, CPython 3.11, 300,000 feature rows, 20 rules from ``playbooks/``,
1.9 matches per fact): 13,000-15,300 facts/s (encoding ~14 us a fact; durable ~12 us an
assert, ~15 us a firing), memory flat at 49 MB, no fact left stored.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, tzinfo
from typing import Any, Final

from durable import engine as _durable

from engine.conditions import ir
from engine.conditions.check import ConditionProblem, check_condition
from engine.conditions.ir import Condition, fields_used
from engine.conditions.sql import epoch_seconds
from engine.conditions.types import FieldType

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
MAX_FIELDS: Final = 250  # a fact holds 254 properties, with id and sid
FAN_OUT: Final = 8
FALSE: Final[Pattern] = {MARKER: "!"}  # markers are digits: never equal

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OPS: Final = {"!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
_PACK: Final = struct.Struct(">d").pack
_INVERT: Final = bytes(range(255, -1, -1))
_SIGN: Final = 1 << 63
_EXACT: Final = 1 << 53  # ints up to this size are exact doubles
_NO_REST: Final = "800"
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


def fact_key(name: str) -> str:
    """The fact key of a field: ``f_`` + name with dots as ``__`` (``event.amount``)."""
    if not _NAME.fullmatch(name):
        raise DurableCompileError(f"field name {name!r} cannot be a durable-rules fact key")
    return "f_" + name.replace(".", "__")


def encode_number(value: float | int) -> str | None:
    """The order-preserving code of a number (bools are 0/1); None for NaN (SQL NULL)."""
    rest = 0
    if isinstance(value, float):
        if value != value:
            return None
        raw = _PACK(value + 0.0)  # + 0.0 turns -0.0 into 0.0
    else:
        whole = int(value)
        if not -_SIGN <= whole < _SIGN:
            raise ValueError(f"{whole} does not fit in 64 bits (SQLite's integer range)")
        nearest = float(whole)
        raw = _PACK(nearest)
        if not -_EXACT <= whole <= _EXACT:
            rest = whole - int(nearest)  # |rest| <= 512: what rounding to a double lost
    # IEEE doubles sort as unsigned ints once negatives are inverted and positives get the
    # sign bit; ties between a rounded int and its double are broken by the remainder.
    head = raw.translate(_INVERT) if raw[0] >= 0x80 else bytes((raw[0] | 0x80,)) + raw[1:]
    return "1" + head.hex() + (_NO_REST if not rest else f"{rest + 2048:03x}")


def encode_text(value: str) -> str:
    """The order-preserving code of text: "2" + hex of its UTF-8 (cut after MAX_TEXT_BYTES + 1)."""
    return "2" + value.encode("utf-8", "surrogatepass")[: MAX_TEXT_BYTES + 1].hex()


def _encode_scalar(value: Any) -> str | None:
    """Encode text or a number of any field; TypeError for anything else."""
    if isinstance(value, str):
        return encode_text(value)
    if isinstance(value, int | float):
        return encode_number(value)
    raise TypeError(f"cannot hold {type(value).__name__} {value!r}")


def _encode_value(kind: str, value: Any) -> Any:
    """Encode one non-None value as SQLite compares it: by storage class, not field kind."""
    if kind != "string_list":
        return _encode_scalar(value)
    if not isinstance(value, list | tuple):
        raise TypeError(f"is a list, not {type(value).__name__} {value!r}")
    if _json_each_cuts_at_nul():
        value = [v.partition("\x00")[0] if isinstance(v, str) else v for v in value]
    codes = (_encode_scalar(v) for v in value if v is not None)
    return [LIST_SENTINEL, *(code for code in codes if code is not None)]


def fact_encoder(fields: Mapping[str, FieldType]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A function encoding rows as durable facts over ``fields`` (see the module docstring)."""
    plan = [(name, fact_key(name), ftype.kind) for name, ftype in fields.items()]

    def encode(row: Mapping[str, Any]) -> dict[str, Any]:
        fact: dict[str, Any] = {}
        for name, key, kind in plan:
            value = row.get(name)
            try:
                fact[key] = None if value is None else _encode_value(kind, value)
            except TypeError as exc:
                raise TypeError(f"field {name} {exc}") from None
        return fact

    return encode


@functools.cache
def _json_each_cuts_at_nul() -> bool:
    """Whether SQLite's json_each ends a list element at an escaped NUL (3.40 does), as
    ``"x" in tags`` in SQL then sees ``"x"`` in ``["x\\u0000y"]``."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        (value,) = conn.execute("SELECT value FROM json_each(?)", ['["x\\u0000y"]']).fetchone()
    return bool(value == "x")


def fact_from_features(row: Mapping[str, Any], fields: Mapping[str, FieldType]) -> dict[str, Any]:
    """Encode the ``fields`` of a features row as a durable fact (missing -> null)."""
    return fact_encoder(fields)(row)


def _fnv1a(text: str) -> int:
    digest = 0x811C9DC5
    for byte in text.encode("utf-8"):
        digest = ((digest ^ byte) * 16777619) & 0xFFFFFFFF
    return digest


def _check_keys(names: Collection[str]) -> None:
    """Refuse more fields than a durable fact holds, and any clash of the 32-bit hashes by
    which durable finds a property (or an operator) from its name."""
    if len(names) > MAX_FIELDS:
        raise DurableCompileError(f"rules use {len(names)} fields; durable holds {MAX_FIELDS}")
    seen = {_fnv1a(word): f"durable's reserved name {word!r}" for word in _RESERVED}
    for name in sorted(names):
        digest = _fnv1a(fact_key(name))
        if digest in seen:
            raise DurableCompileError(f"field {name} clashes with {seen[digest]} in durable-rules")
        seen[digest] = f"field {name}"


def compile_condition(cond: Condition, fields: Mapping[str, FieldType], tz: tzinfo) -> Pattern:
    """The durable pattern (``m``) selecting exactly what ``compile_to_sql(cond)`` selects."""
    problems = check_condition(cond, fields)
    if problems:
        raise DurableCompileError("; ".join(p.message for p in problems), problems)
    _check_keys(fields_used(cond))
    pattern = _Compiler(fields, tz).compile(ir.to_nnf(_explicit_bool_tests(cond)))
    _check_shape(pattern)
    return pattern


def _explicit_bool_tests(cond: Condition) -> Condition:
    """``flag`` -> ``flag == true`` (SQL ``= 1``): ``not flag`` becomes ``!= 1``, not ``== 0``."""
    if isinstance(cond, ir.BoolTest):
        return ir.Compare(cond.field, "==", ir.Literal(True, "bool"), span=cond.span)
    if isinstance(cond, ir.Not):
        return ir.Not(_explicit_bool_tests(cond.item), span=cond.span)
    if isinstance(cond, ir.And | ir.Or):
        return type(cond)(tuple(_explicit_bool_tests(i) for i in cond.items), span=cond.span)
    return cond


class _Compiler:
    def __init__(self, fields: Mapping[str, FieldType], tz: tzinfo) -> None:
        self.fields = fields
        self.tz = tz

    def compile(self, cond: Condition) -> Pattern:
        if isinstance(cond, ir.And | ir.Or):
            op = "$and" if isinstance(cond, ir.And) else "$or"
            return _join(op, [self.compile(item) for item in cond.items])
        if isinstance(cond, ir.Not):
            raise AssertionError("conditions are compiled in negation normal form")
        name = cond.field.name
        key = fact_key(name)
        if isinstance(cond, ir.Compare):
            code = self.code(cond.value)
            return {key: code} if cond.op == "==" else {_OPS[cond.op]: {key: code}}
        if isinstance(cond, ir.InList):
            codes = [self.code(value) for value in cond.values]
            if cond.negated:
                if not codes:
                    return _not_null(key, self.fields[name])
                return _join("$and", [{"$neq": {key: code}} for code in codes])
            return _join("$or", [{key: code} for code in codes]) if codes else FALSE
        if isinstance(cond, ir.Contains):
            code = self.code(cond.value)
            if cond.negated:
                return {"$iall": {key: {"$neq": {"$i": code}}}}
            return {"$iany": {key: {"$i": code}}}
        if isinstance(cond, ir.Between):
            low, high = self.code(cond.low), self.code(cond.high)
            if cond.negated:
                return _join("$or", [{"$lt": {key: low}}, {"$gt": {key: high}}])
            return _join("$and", [{"$gte": {key: low}}, {"$lte": {key: high}}])
        if isinstance(cond, ir.IsNull):
            return _not_null(key, self.fields[name]) if cond.negated else {key: None}
        assert isinstance(cond, ir.BoolTest)
        return {key: encode_number(1)}

    def code(self, lit: ir.Literal) -> str:
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
    width = max(shape.fan_out, shape.children)
    pending, paths = shape.entries + shape.pending, shape.paths
    for refused, why in [
        (groups > MAX_GROUPS, f"needs {groups} and/or groups (limit {MAX_GROUPS})"),
        (width > MAX_CHILDREN, f"has {width} alternatives at one point (limit {MAX_CHILDREN})"),
        (pending > budget, f"has up to {pending} tests true at once (limit {budget})"),
        (
            paths > MAX_PATHS,
            f"is true along {paths} paths at once, each a firing (max {MAX_PATHS})",
        ),
    ]:
        if refused:
            raise DurableCompileError(f"condition too complex for durable-rules: it {why}")


def compile_rulesets(
    name: str,
    rules: Sequence[Rule],
    fields: Mapping[str, FieldType],
    tz: tzinfo,
    shard_size: int = 400,
) -> dict[str, dict[str, Any]]:
    """Plain-data durable rulesets for ``rules``: ``name``, or ``f"{name}_{i}"`` when sharded.

    Rule ``r{i}`` runs action ``f"{name}#{i}"`` with ``pri`` ``i``; a rule without condition
    matches every fact; shards are balanced and hold at most ``shard_size`` rules each.
    """
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"shard_size must be between 1 and {MAX_SHARD_SIZE}")
    patterns = [None if c is None else compile_condition(c, fields, tz) for _, c in rules]
    _check_keys({n for _, c in rules if c is not None for n in fields_used(c)})
    count = -(-len(patterns) // shard_size)
    bounds = [len(patterns) * k // max(count, 1) for k in range(count + 1)]
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


_LOCK: Final = threading.RLock()
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
        self._encode = fact_encoder({n: fields[n] for n in sorted(used) if n in fields})
        self.name = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}-{next(_SERIAL)}"
        rulesets = compile_rulesets(self.name, rules, fields, tz, shard_size)
        self.rulesets = list(rulesets)
        self._hits: list[int] = []
        self._failures: list[str] = []
        with _LOCK:
            host = _host()
            for index in range(len(rules)):
                host.actions[f"{self.name}#{index}"] = self._recorder(index)
            try:
                host.set_rulesets(copy.deepcopy(rulesets))
            except Exception as exc:
                raise DurableError(f"durable-rules refused the rules: {exc}") from exc

    def _recorder(self, index: int) -> Callable[[Any], None]:
        def record(_closure: Any) -> None:
            try:
                self._hits.append(index)
            except BaseException as exc:  # durable would only note it in the state
                self._failures.append(f"{type(exc).__name__}: {exc}")

        return record

    def encode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The fact asserted for ``row``: the fields the rules use, plus a fresh marker."""
        fact = self._encode(row)
        fact[MARKER] = str(next(_MARKS))
        return fact

    def stored_facts(self) -> int:
        """How many facts durable still holds for this matcher (0 after every ``match``)."""
        with _LOCK:
            return sum(len(_host().get_facts(ruleset)) for ruleset in self.rulesets)

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
                if self._failures:
                    failures = "; ".join(self._failures)
                    self._failures.clear()
                    raise DurableError(f"an action failed inside durable-rules: {failures}")
                found.extend((key, ids[index]) for index in sorted(set(hits)))
        return found


def _assert_and_retract(host: _Host, ruleset: str, fact: dict[str, Any]) -> None:
    """Assert ``fact`` (its actions record matches), retract it; durable's errors raise."""
    try:
        host.assert_fact(ruleset, fact)
    except _durable.MessageNotHandledException:
        return  # matched nothing, so nothing was stored
    except Exception as exc:
        with contextlib.suppress(Exception):
            host.retract_fact(ruleset, fact)
        raise DurableError(f"durable-rules failed on a fact: {exc}") from exc
    try:
        host.retract_fact(ruleset, fact)
    except Exception as exc:
        raise DurableError(f"durable-rules could not retract a fact: {exc}") from exc
    # An exception in an action would only be noted in the ruleset's state; the matcher's
    # actions catch their own (see DurableMatcher._recorder), so no state is read here.
