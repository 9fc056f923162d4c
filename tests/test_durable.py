"""Tests for engine.match.durable: every answer must equal compile_to_sql's answer in SQLite."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from contextlib import closing
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.catalog import field_catalog
from engine.clock import parse_as_of
from engine.conditions import (
    BOOL,
    DURATION,
    NUMBER,
    STRING,
    STRING_LIST,
    TIMESTAMP,
    And,
    Between,
    BoolTest,
    Compare,
    CompareOp,
    Condition,
    Contains,
    Field,
    FieldType,
    InList,
    IsNull,
    Literal,
    Not,
    Or,
    SqlField,
    compile_to_sql,
    enum,
    parse_condition,
)
from engine.conditions.sql import epoch_seconds
from engine.features import build_features, iter_features
from engine.match import (
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
from engine.settings import Settings
from engine.store import Store
from tests.conftest import SHANGHAI, load_small_dataset

TZ = ZoneInfo("Asia/Shanghai")
OPS: tuple[CompareOp, ...] = ("==", "!=", "<", "<=", ">", ">=")
STAGES = ("active", "sleeping", "流失", "😀 vip")
FIELDS: dict[str, FieldType] = {
    "n": NUMBER,
    "m": NUMBER,
    "s": STRING,
    "stage": enum(*STAGES),
    "flag": BOOL,
    "at": TIMESTAMP,
    "tags": STRING_LIST,
    "wait": DURATION,
    "event.amount": NUMBER,
}
Row = dict[str, Any]
Rules = Sequence[tuple[str, Condition | None]]


# ---------------------------------------------------------------------------------------------
# The reference: compile_to_sql over a table stored the way engine/features.py stores it


def sql_matches(rules: Rules, rows: Sequence[tuple[str, Row]]) -> list[tuple[str, str]]:
    """(fact, rule) pairs that compile_to_sql selects; tags as JSON text, bools as 0/1."""
    names = list(FIELDS)
    sql_fields = {name: SqlField(f'"{name}"', FIELDS[name]) for name in names}
    with closing(sqlite3.connect(":memory:")) as conn:
        columns = ", ".join(f'"{name}"' for name in names)
        conn.execute(f"CREATE TABLE facts (k, {columns})")
        marks = ", ".join("?" * (len(names) + 1))
        for key, row in rows:
            values = [_sql_value(FIELDS[name].kind, row.get(name)) for name in names]
            conn.execute(f"INSERT INTO facts VALUES ({marks})", [key, *values])
        found = set()
        for rule_id, cond in rules:
            where, params = ("1", []) if cond is None else compile_to_sql(cond, sql_fields, TZ)
            for (key,) in conn.execute(f"SELECT k FROM facts WHERE {where}", params):
                found.add((key, rule_id))
    order = {key: i for i, (key, _) in enumerate(rows)}
    ranks = {rule_id: i for i, (rule_id, _) in enumerate(rules)}
    return sorted(found, key=lambda pair: (order[pair[0]], ranks[pair[1]]))


def _sql_value(kind: str, value: Any) -> Any:
    if value is not None and kind == "string_list":
        return json.dumps(value, ensure_ascii=False)
    return int(value) if isinstance(value, bool) else value


def check_same(rules: Rules, rows: Sequence[tuple[str, Row]]) -> list[tuple[str, str]]:
    """Assert DurableMatcher selects exactly the SQL pairs, and return them."""
    expected = sql_matches(rules, rows)
    assert DurableMatcher("test", rules, FIELDS, TZ).match(rows) == expected
    return expected


def selected(condition: str | Condition, rows: Mapping[str, Row]) -> list[str]:
    """The keys of the rows one condition selects (durable and SQL agreeing)."""
    cond = parse_condition(condition) if isinstance(condition, str) else condition
    return [key for key, _ in check_same([("rule", cond)], list(rows.items()))]


# ---------------------------------------------------------------------------------------------
# Strategies: random facts and random conditions over FIELDS

TRICKY_TEXT = [
    *("", "a", "ab", "ab ", "ab!", 'a"b', "a\\b", "a\nb", "a\x00b", "a\x1fb", "~", " ", "0"),
    *("张三", "张三丰", "😀", "é", "e\u0301", "\x7f", "John", "John Smith", "null", *STAGES),
]
# Short strings over characters that JSON escapes or that sort around JSON's quote, so that
# prefixes and byte order come up often; plus any Unicode at all.
CLOSE_CHARS = ["a", "b", "A", " ", "!", '"', "#", "\\", "]", "\n", "\x00", "~", "张", "😀", "é"]
texts = st.one_of(
    st.sampled_from(TRICKY_TEXT),
    st.text(st.sampled_from(CLOSE_CHARS), max_size=3),
    st.text(max_size=6),
)
# SQLite's json_each cuts a list element at "\u0000": "a" in tags holds for ["a\x00b"].
tag_texts = st.text(st.sampled_from(["a", "\x00"]), max_size=3)
DATES = [date(2024, 1, 1), date(2024, 6, 1), datetime(2024, 6, 1, 12, 30)]
EPOCHS = [epoch_seconds(day, TZ) for day in DATES]
TRICKY_NUMBERS: list[int | float] = [
    *(0, -0.0, 1, 1.0, 1.5, -1, 0.1, 1e-05, 5e-324, 1e20, math.inf, -math.inf, *EPOCHS),
    *(2**53, 2**53 + 1, float(2**53), 2**63 - 1, -(2**63), 9.223372036854776e18, -1e19),
]
numbers = st.one_of(
    st.sampled_from(TRICKY_NUMBERS),
    st.integers(-5, 5),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)
literal_dates = st.one_of(st.sampled_from(DATES), st.dates(date(1990, 1, 1), date(2100, 1, 1)))


# SQLite compares values by storage class (numbers before text), whatever a field's kind:
# event properties read with json_extract can hold either. Lists can hold numbers too.
odd_values = st.one_of(texts, numbers, st.sampled_from([2, 0.5, -1, "1", "true"]))
list_items = st.one_of(texts, tag_texts, st.sampled_from([*STAGES, 1, 1.5, True, None]))


def values_for(ftype: FieldType) -> st.SearchStrategy[Any]:
    """Fact values a field of this type can hold: mostly its kind's, sometimes any other."""
    if ftype.kind == "string_list":
        return st.one_of(st.none(), st.lists(list_items, max_size=3))
    base: st.SearchStrategy[Any] = st.one_of(numbers, st.just(math.nan))
    if ftype.allowed is not None:
        base = st.sampled_from(ftype.allowed)
    elif ftype.kind == "string":
        base = texts
    elif ftype.kind == "bool":
        base = st.booleans()
    elif ftype.kind == "timestamp":
        base = st.one_of(st.sampled_from(EPOCHS), st.integers(0, 2**32))
    elif ftype.kind == "duration":
        base = st.one_of(st.sampled_from([0, 59, 60, 86400, 86401]), st.integers(-10, 10**7))
    return st.one_of(st.none(), base, base, base, odd_values)


@st.composite
def rows(draw: st.DrawFn) -> Row:
    """A fact: each field missing, None or a value."""
    return {name: draw(values_for(ftype)) for name, ftype in FIELDS.items() if draw(st.booleans())}


def literals_for(ftype: FieldType) -> st.SearchStrategy[Literal]:
    """Literals check_condition accepts for a field of this type."""
    if ftype.allowed is not None:
        return st.sampled_from(ftype.allowed).map(lambda v: Literal(v, "string"))
    if ftype.kind == "string_list":
        return st.one_of(texts, tag_texts).map(lambda v: Literal(v, "string"))
    if ftype.kind == "string":
        return texts.map(lambda v: Literal(v, "string"))
    if ftype.kind == "bool":
        return st.booleans().map(lambda v: Literal(v, "bool"))
    if ftype.kind == "timestamp":
        return literal_dates.map(lambda v: Literal(v, "date"))
    plain = numbers.map(lambda v: Literal(v, "number"))
    if ftype.kind == "duration":
        seconds = st.one_of(st.sampled_from([0, 60, 86400]), st.integers(0, 10**7))
        return st.one_of(seconds.map(lambda v: Literal(v, "duration")), plain)
    return plain


@st.composite
def atoms(draw: st.DrawFn) -> Condition:
    """Any atom check_condition accepts: compare, in, contains, between, is null, bool test."""
    name = draw(st.sampled_from(list(FIELDS)))
    ftype = FIELDS[name]
    field, kind, lit, negated = Field(name), ftype.kind, literals_for(ftype), draw(st.booleans())
    choices = ["null", *(["contains"] if kind == "string_list" else ["compare", "in"])]
    choices += ["between"] if kind in ("number", "timestamp", "duration") else []
    choices += ["test"] if kind == "bool" else []
    choice = draw(st.sampled_from(choices))
    if choice == "null":
        return IsNull(field, negated)
    if choice == "contains":
        return Contains(field, draw(lit), negated)
    if choice == "between":
        return Between(field, draw(lit), draw(lit), negated)
    if choice == "test":
        return BoolTest(field)
    if choice == "in":
        return InList(field, tuple(draw(st.lists(lit, max_size=4))), negated)
    ops = ("==", "!=") if kind == "bool" or ftype.allowed is not None else OPS
    return Compare(field, draw(st.sampled_from(ops)), draw(lit))


conditions = st.recursive(
    atoms(),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
        inner.map(Not),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(conditions, st.none()), min_size=1, max_size=6),
    st.lists(rows(), min_size=1, max_size=8),
)
def test_durable_selects_exactly_what_sql_selects(
    conds: list[Condition | None], facts: list[Row]
) -> None:
    rules = [(f"rule{i}", cond) for i, cond in enumerate(conds)]
    check_same(rules, [(f"c{i}", row) for i, row in enumerate(facts)])


# ---------------------------------------------------------------------------------------------
# Operators, one by one

PRESENT = ["zero", "negzero", "one", "onef", "half", "two", "big", "bigf"]
NUMBER_ROWS: dict[str, Row] = {"missing": {}, "none": {"n": None}, "nan": {"n": math.nan}}
VALUES = (0, -0.0, 1, 1.0, 1.5, 2, 2**53 + 1, 2.0**53)
NUMBER_ROWS |= {key: {"n": value} for key, value in zip(PRESENT, VALUES, strict=True)}
NOT_ONE = ["zero", "negzero", "half", "two", "big", "bigf"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("n == 1", ["one", "onef"]),
        ("n != 1", NOT_ONE),
        ("not (n == 1)", NOT_ONE),
        ("n < 1", ["zero", "negzero"]),
        ("n <= 1", ["zero", "negzero", "one", "onef"]),
        ("n > 1.5", ["two", "big", "bigf"]),
        ("n >= 1.5", ["half", "two", "big", "bigf"]),
        ("n == 0", ["zero", "negzero"]),
        ("n between 1 and 2", ["one", "onef", "half", "two"]),
        ("n not between 1 and 2", ["zero", "negzero", "big", "bigf"]),
        ("n between 2 and 1", []),
        ("n not between 2 and 1", PRESENT),
        ("n in [0, 2, 2]", ["zero", "negzero", "two"]),
        ("n not in [0, 2]", ["one", "onef", "half", "big", "bigf"]),
        ("n in []", []),
        ("not (n in [])", PRESENT),
        ("n not in []", PRESENT),
        ("n is null", ["missing", "none", "nan"]),
        ("n is not null", PRESENT),
        ("not (n is null)", PRESENT),
        ("n == 9007199254740992", ["bigf"]),
        ("n > 9007199254740992.0", ["big"]),
        ("n > 1 or n is null", ["missing", "none", "nan", "half", "two", "big", "bigf"]),
        ("not (n > 1 or n < 1)", ["one", "onef"]),
    ],
)
def test_numbers_nulls_and_boundaries(condition: str, expected: list[str]) -> None:
    assert selected(condition, NUMBER_ROWS) == expected


TEXT_ROWS: dict[str, Row] = {"missing": {}, "none": {"s": None}}
TEXT_ROWS.update({f"t{i}": {"s": text} for i, text in enumerate(TRICKY_TEXT)})
PY_OPS = {"==": str.__eq__, "!=": str.__ne__, "<": str.__lt__}
PY_OPS.update({"<=": str.__le__, ">": str.__gt__, ">=": str.__ge__})


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("literal", ["John Smith", "ab", 'a"b', "a\nb", "张三", "😀", "", "~"])
def test_text_compares_in_sqlite_order(op: CompareOp, literal: str) -> None:
    cond = Compare(Field("s"), op, Literal(literal, "string"))
    check = PY_OPS[op]
    texts = {key: row["s"] for key, row in TEXT_ROWS.items() if row.get("s") is not None}
    expected = [key for key, text in texts.items() if check(text, literal)]
    assert selected(cond, TEXT_ROWS) == expected


def test_text_lists_enums_and_null_tests() -> None:
    rows: dict[str, Row] = {
        "missing": {},
        "none": {"s": None, "tags": None, "stage": None},
        "empty": {"tags": [], "s": "", "stage": "流失"},
        "vip": {"tags": ["vip"], "stage": "😀 vip"},
        "both": {"tags": ["kol", "vip", "vip"], "stage": "active"},
        "other": {"tags": ["VIP", "张三"], "s": "null"},
    }
    assert selected('"vip" in tags', rows) == ["vip", "both"]
    assert selected('"vip" not in tags', rows) == ["empty", "other"]
    assert selected('not ("vip" in tags)', rows) == ["empty", "other"]
    assert selected('"张三" in tags', rows) == ["other"]
    assert selected("tags is null", rows) == ["missing", "none"]
    assert selected("tags is not null", rows) == ["empty", "vip", "both", "other"]
    assert selected('stage in ["流失", "😀 vip"]', rows) == ["empty", "vip"]
    assert selected('stage != "active"', rows) == ["empty", "vip"]
    assert selected('s == ""', rows) == ["empty"]
    assert selected("s is null", rows) == ["missing", "none", "vip", "both"]
    # SQLite's json_each ends an element at "\u0000"; durable must see the same.
    cut = {"cut": {"tags": ["a\x00b"]}, "plain": {"tags": ["a"]}}
    assert selected('"a" in tags', cut) == ["cut", "plain"]
    assert selected('"a\\u0000b" in tags', cut) == []


def test_bools_are_0_and_1_and_other_values_compare_as_in_sqlite() -> None:
    rows: dict[str, Row] = {"yes": {"flag": True}, "no": {"flag": False}, "none": {}}
    rows |= {"1": {"flag": 1}, "2": {"flag": 2}, "text": {"flag": "true"}}
    assert selected("flag", rows) == ["yes", "1"]
    assert selected("not flag", rows) == ["no", "2", "text"]
    assert selected("flag == false", rows) == ["no"]
    assert selected("flag != true", rows) == ["no", "2", "text"]
    assert selected("flag in [false]", rows) == ["no"]
    assert selected("flag is null", rows) == ["none"]
    odd: dict[str, Row] = {"int": {"n": 5, "s": 5}, "text": {"n": "5", "s": "5"}}
    assert selected("n > 100", odd) == ["text"]  # text sorts after every number
    assert selected('s == "5"', odd) == ["text"]
    assert selected('s < "0"', odd) == ["int"]


def test_dates_and_durations() -> None:
    midnight = epoch_seconds(date(2024, 6, 1), TZ)
    rows: dict[str, Row] = {
        "before": {"at": midnight - 1, "wait": 86399},
        "at": {"at": midnight, "wait": 86400},
        "after": {"at": midnight + 1, "wait": 86401},
    }
    assert selected('at >= date("2024-06-01")', rows) == ["at", "after"]
    assert selected('at < date("2024-06-01T00:00:00")', rows) == ["before"]
    ends = 'at between date("2024-05-31T23:59:59") and date("2024-06-01")'
    assert selected(ends, rows) == ["before", "at"]
    assert selected('at == date("2024-06-01T00:00:01")', rows) == ["after"]
    assert selected("wait >= 1d", rows) == ["at", "after"]
    assert selected("wait == 86400", rows) == ["at"]
    assert selected("wait between 24h and 1441m", rows) == ["at", "after"]


def test_dotted_event_fields() -> None:
    rows: dict[str, Row] = {"big": {"event.amount": 2000}, "small": {"event.amount": 1999.99}}
    assert selected("event.amount >= 2000", rows | {"none": {}}) == ["big"]
    assert fact_key("event.amount") == "f_event__amount"
    pattern = compile_condition(parse_condition("event.amount >= 2000"), FIELDS, TZ)
    assert pattern == {"$gte": {"f_event__amount": encode_number(2000)}}
    clash = {"a.b": NUMBER, "a__b": NUMBER}
    with pytest.raises(DurableCompileError, match="clashes"):
        compile_rulesets("x", [("1", parse_condition("a.b > 1 and a__b > 1"))], clash, TZ)


def test_rules_without_condition_identical_facts_and_or_branches() -> None:
    rules = [("all", None), ("either", parse_condition('n == 1 or s == "John"')), ("no", None)]
    rows = [("a", {"n": 1, "s": "John"}), ("a2", {"n": 1, "s": "John"}), ("b", {})]
    expected = check_same(rules, rows)
    assert [rule for key, rule in expected if key == "a"] == ["all", "either", "no"]
    assert [rule for key, rule in expected if key == "b"] == ["all", "no"]
    matcher = DurableMatcher("t", rules, FIELDS, TZ)
    assert matcher.match(rows) == expected
    assert matcher.match(rows + rows) == expected + expected  # identical facts, twice
    assert matcher.stored_facts() == 0


def test_sharding_keeps_answers() -> None:
    rules = [(f"n{i}", parse_condition(f"n == {i}")) for i in range(900)]
    rulesets = compile_rulesets("big", rules, FIELDS, TZ)
    assert list(rulesets) == ["big_0", "big_1", "big_2"]
    assert [len(r) for r in rulesets.values()] == [300, 300, 300]
    assert json.loads(json.dumps(rulesets)) == rulesets
    assert [r["pri"] for rs in rulesets.values() for r in rs.values()] == list(range(900))
    rows = [(str(v), {"n": v}) for v in (0, 299, 300, 899, 900)]
    assert check_same(rules, rows) == [(str(v), f"n{v}") for v in (0, 299, 300, 899)]
    assert len(DurableMatcher("big", rules, FIELDS, TZ).rulesets) == 3
    assert list(compile_rulesets("one", rules[:2], FIELDS, TZ)) == ["one"]
    assert compile_rulesets("none", [], FIELDS, TZ) == {}
    assert DurableMatcher("none", [], FIELDS, TZ).match(rows) == []


# ---------------------------------------------------------------------------------------------
# Encoders, errors, limits


@given(numbers, st.one_of(numbers, st.integers()))
def test_number_codes_sort_like_the_numbers(a: float, b: float) -> None:
    if isinstance(b, int) and not -(2**63) <= b < 2**63:
        with pytest.raises(ValueError, match="64 bits"):
            encode_number(b)
        return
    code_a, code_b = encode_number(a), encode_number(b)
    assert code_a is not None and code_b is not None and len(code_a) == len(code_b) == 20
    assert (code_a < code_b, code_a == code_b) == (a < b, a == b)
    assert code_a < encode_text("") <= encode_text(str(b))  # numbers before text, as in SQLite


@given(texts, texts)
def test_text_codes_sort_like_the_text(a: str, b: str) -> None:
    assert (encode_text(a) < encode_text(b), encode_text(a) == encode_text(b)) == (a < b, a == b)


def test_fact_encoding_and_refusals() -> None:
    fact = fact_from_features({"n": 1.0, "tags": [], "flag": True, "s": None}, FIELDS)
    assert fact["f_n"] == encode_number(1) == fact["f_flag"]
    assert fact["f_tags"] == ["~"] and fact["f_s"] is None and fact["f_at"] is None
    assert encode_number(math.nan) is None and encode_number(-0.0) == encode_number(0)
    assert fact_from_features({"n": "5", "tags": ["a", 1, None]}, FIELDS)["f_tags"] == [
        *("~", encode_text("a"), encode_number(1))
    ]
    with pytest.raises(TypeError, match="field n cannot hold dict"):
        fact_from_features({"n": {"a": 1}}, FIELDS)
    with pytest.raises(TypeError, match="field tags is a list"):
        fact_from_features({"tags": "vip"}, FIELDS)
    with pytest.raises(DurableCompileError, match="unknown field") as info:
        compile_condition(parse_condition("nope > 1"), FIELDS, TZ)
    assert info.value.problems
    with pytest.raises(DurableCompileError, match="NaN"):
        compile_condition(Compare(Field("n"), "<", Literal(math.nan, "number")), FIELDS, TZ)
    with pytest.raises(ValueError, match="unique"):
        DurableMatcher("t", [("a", None), ("a", None)], FIELDS, TZ)
    with pytest.raises(ValueError, match="shard_size"):
        compile_rulesets("t", [], FIELDS, TZ, shard_size=513)
    many = [(str(i), parse_condition(f"a{i} > 0")) for i in range(251)]
    with pytest.raises(DurableCompileError, match="251 fields"):
        compile_rulesets("t", many, {f"a{i}": NUMBER for i in range(251)}, TZ)


WIDE: dict[str, FieldType] = {f"a{i}": NUMBER for i in range(50)}


def any_positive(count: int) -> str:
    return " or ".join(f"a{i} > 0" for i in range(count))


@pytest.mark.parametrize(
    "condition",
    [
        " and ".join(f"a{i} in [1, 2]" for i in range(15)),  # 16 and/or groups
        "a0 in [" + ", ".join(map(str, range(401))) + "]",  # 401 children of one node
        any_positive(43),  # 43 tests true at once
        " and ".join(f"(a{i} > 0 or a{i + 10} > 0)" for i in range(8)),  # 256 firings
    ],
)
def test_what_durable_cannot_run_is_refused(condition: str) -> None:
    with pytest.raises(DurableCompileError, match="too complex for durable-rules"):
        compile_condition(parse_condition(condition), WIDE, TZ)


def test_the_largest_accepted_shapes_run() -> None:
    """512 rules in one ruleset, all true for one fact: 508 with 42 tests true at once
    (durable's stack holds 64), one each with 15 groups, 400 values, 128 firings."""
    rules = [(f"or{i}", parse_condition(any_positive(42))) for i in range(508)]
    for text in [
        " and ".join(f"a{i} in [1, 2]" for i in range(14)),
        "a0 in [" + ", ".join(map(str, range(1, 401))) + "]",
        "a0 not in [" + ", ".join(map(str, range(2, 402))) + "]",
        " and ".join(f"(a{i} > 0 or a{i + 10} > 0)" for i in range(7)),
    ]:
        rules.append((text, parse_condition(text)))
    matcher = DurableMatcher("wide", rules, WIDE, TZ, shard_size=512)
    assert len(matcher.rulesets) == 1
    everything = {name: 1 for name in WIDE}
    found = matcher.match([("x", everything), ("y", {})])
    assert found == [("x", rule_id) for rule_id, _ in rules]


def test_an_exception_inside_durable_surfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    matcher = DurableMatcher("t", [("all", None)], FIELDS, TZ)

    def explode(self: list[int], item: int) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(matcher, "_hits", type("Hits", (list,), {"append": explode})())
    with pytest.raises(DurableError, match="kaboom"):
        matcher.match([("x", {})])
    monkeypatch.undo()
    assert matcher.match([("x", {})]) == [("x", "all")]  # the error was cleared
    assert matcher.stored_facts() == 0


def test_no_polling_threads_and_no_leaks() -> None:
    before = threading.active_count()
    rules = [("one", parse_condition("n == 1")), ("s", parse_condition("s is not null"))]
    matcher = DurableMatcher("t", rules, FIELDS, TZ)
    facts = [(str(i), {"n": i % 2, "s": None if i % 3 else "x"}) for i in range(20_000)]
    assert len(matcher.match(facts)) == 10_000 + 6_667
    assert matcher.stored_facts() == 0
    assert threading.active_count() == before


def test_playbook_conditions_on_real_features(store: Store, tmp_path: Path) -> None:
    """The playbooks' state conditions over the hand-computed features: durable == SQL."""
    load_small_dataset(store, tmp_path)
    table = build_features(store, Settings(), parse_as_of("2024-06-01", SHANGHAI))
    catalog = {name: info.type for name, info in field_catalog(Settings()).items()}
    whens = [
        rule["when"]
        for path in sorted(Path("playbooks").glob("*.yaml"))
        for rule in yaml.safe_load(path.read_text("utf-8"))["rules"]
        if "when" in rule and "event." not in rule["when"]
    ]
    rules = [(f"{i}: {text}", parse_condition(text)) for i, text in enumerate(whens)]
    assert len(rules) > 20
    sql_fields = {name: SqlField(f'"{name}"', ftype) for name, ftype in catalog.items()}
    expected = set()
    for rule_id, cond in rules:
        where, params = compile_to_sql(cond, sql_fields, SHANGHAI)
        query = f'SELECT customer_id FROM temp."{table.table}" WHERE {where}'
        expected |= {(key, rule_id) for (key,) in store.conn.execute(query, params)}
    facts = [(row["customer_id"], row) for row in iter_features(store, table)]
    found = DurableMatcher("playbooks", rules, catalog, SHANGHAI).match(facts)
    assert expected and sorted(found) == sorted(expected)
