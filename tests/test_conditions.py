"""Tests for engine.conditions: parsing, spans, errors, checks, SQL, NNF and round-trips."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.conditions import (
    BOOL,
    DURATION,
    MAX_LENGTH,
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
    ConditionProblem,
    ConditionSyntaxError,
    Contains,
    Field,
    FieldType,
    InList,
    IsNull,
    Literal,
    Not,
    Or,
    SqlCompileError,
    SqlField,
    check_condition,
    compile_to_sql,
    enum,
    fields_used,
    format_condition,
    parse_condition,
    to_nnf,
)
from engine.conditions.sql import epoch_seconds

TZ = ZoneInfo("Asia/Shanghai")
OPS: tuple[CompareOp, ...] = ("==", "!=", "<", "<=", ">", ">=")


def num(value: float) -> Literal:
    return Literal(value, "number")


def text(value: str) -> Literal:
    return Literal(value, "string")


def boolean(value: bool) -> Literal:
    return Literal(value, "bool")


def f(name: str) -> Field:
    return Field(name)


# ---------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('lifecycle == "sleeping"', Compare(f("lifecycle"), "==", text("sleeping"))),
        ("total_spend > 500", Compare(f("total_spend"), ">", num(500))),
        ("total_spend != -2.5", Compare(f("total_spend"), "!=", num(-2.5))),
        ("x <= 0", Compare(f("x"), "<=", num(0))),
        ("x >= 1", Compare(f("x"), ">=", num(1))),
        ("x < 1", Compare(f("x"), "<", num(1))),
        ("500 < total_spend", Compare(f("total_spend"), ">", num(500))),
        ("500 >= total_spend", Compare(f("total_spend"), "<=", num(500))),
        ('"L" == aipl_stage', Compare(f("aipl_stage"), "==", text("L"))),
        ("event.amount >= 300", Compare(f("event.amount"), ">=", num(300))),
        ("is_friend", BoolTest(f("is_friend"))),
        ("is_friend == TRUE", Compare(f("is_friend"), "==", boolean(True))),
        ("is_friend != false", Compare(f("is_friend"), "!=", boolean(False))),
        ("cooldown_left < 30d", Compare(f("cooldown_left"), "<", Literal(2592000, "duration"))),
        ("c == 12h", Compare(f("c"), "==", Literal(43200, "duration"))),
        ("c == 45m", Compare(f("c"), "==", Literal(2700, "duration"))),
        ("c == 10s", Compare(f("c"), "==", Literal(10, "duration"))),
        ("c == 2w", Compare(f("c"), "==", Literal(1209600, "duration"))),
        (
            'last_order_at >= date("2024-11-11")',
            Compare(f("last_order_at"), ">=", Literal(date(2024, 11, 11), "date")),
        ),
        (
            "t < DATE('2024-11-11T10:30')",
            Compare(f("t"), "<", Literal(datetime(2024, 11, 11, 10, 30), "date")),
        ),
        (
            'date("2024-11-11T10:30:05") < t',
            Compare(f("t"), ">", Literal(datetime(2024, 11, 11, 10, 30, 5), "date")),
        ),
        ("date == 1", Compare(f("date"), "==", num(1))),
        (
            "category in [\"skincare\", '彩妆']",
            InList(f("category"), (text("skincare"), text("彩妆"))),
        ),
        ("x not in [1, 2]", InList(f("x"), (num(1), num(2)), negated=True)),
        ("x in []", InList(f("x"), ())),
        ("x IN [true]", InList(f("x"), (boolean(True),))),
        ('"vip" in tags', Contains(f("tags"), text("vip"))),
        ('"vip" not in tags', Contains(f("tags"), text("vip"), negated=True)),
        ("amount between 100 and 200", Between(f("amount"), num(100), num(200))),
        (
            "amount NOT BETWEEN 1.5 AND 2",
            Between(f("amount"), num(1.5), num(2), negated=True),
        ),
        ("phone is null", IsNull(f("phone"))),
        ("phone Is Not Null", IsNull(f("phone"), negated=True)),
        ("not in_group", Not(BoolTest(f("in_group")))),
        ('s == "a\\"b\\\'c\\\\d\\ne\\tf\\u00e9"', Compare(f("s"), "==", text("a\"b'c\\d\ne\tfé"))),
        ("s == '它说\"好\"'", Compare(f("s"), "==", text('它说"好"'))),
        ("((x))", BoolTest(f("x"))),
        (
            "android_user and order_count",
            And((BoolTest(f("android_user")), BoolTest(f("order_count")))),
        ),
    ],
)
def test_parses_every_construct(source: str, expected: Condition) -> None:
    assert parse_condition(source) == expected


def test_parses_the_examples_from_the_docs() -> None:
    cond = parse_condition(
        "category in [\"skincare\", '彩妆'] and not (amount between 100 and 200)"
    )
    assert cond == And(
        (
            InList(f("category"), (text("skincare"), text("彩妆"))),
            Not(Between(f("amount"), num(100), num(200))),
        )
    )
    cond = parse_condition('last_order_at >= date("2024-11-11") or phone is not null')
    assert cond == Or(
        (
            Compare(f("last_order_at"), ">=", Literal(date(2024, 11, 11), "date")),
            IsNull(f("phone"), negated=True),
        )
    )
    cond = parse_condition('aipl_stage == "L" and "vip" not in tags')
    assert cond == And(
        (Compare(f("aipl_stage"), "==", text("L")), Contains(f("tags"), text("vip"), True))
    )


def test_literal_details() -> None:
    cond = parse_condition('t >= date("2024-11-11") and c < 30d and n == 7 and m == 7.0')
    assert isinstance(cond, And)
    lits = [item.value for item in cond.items if isinstance(item, Compare)]
    assert lits[0].text == "2024-11-11"
    assert type(lits[0].value) is date
    assert lits[1].value == 2592000 and isinstance(lits[1].value, int)
    assert type(lits[2].value) is int and type(lits[3].value) is float


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a or b and c", Or((BoolTest(f("a")), And((BoolTest(f("b")), BoolTest(f("c"))))))),
        ("a and b or c", Or((And((BoolTest(f("a")), BoolTest(f("b")))), BoolTest(f("c"))))),
        ("(a or b) and c", And((Or((BoolTest(f("a")), BoolTest(f("b")))), BoolTest(f("c"))))),
        ("not a and b", And((Not(BoolTest(f("a"))), BoolTest(f("b"))))),
        ("not a or b", Or((Not(BoolTest(f("a"))), BoolTest(f("b"))))),
        ("not x == 1", Not(Compare(f("x"), "==", num(1)))),
        ("not not a", Not(Not(BoolTest(f("a"))))),
        ("a and b and c", And((BoolTest(f("a")), BoolTest(f("b")), BoolTest(f("c"))))),
        ("a OR b Or c", Or((BoolTest(f("a")), BoolTest(f("b")), BoolTest(f("c"))))),
        (
            "x between 1 and 2 and y",
            And((Between(f("x"), num(1), num(2)), BoolTest(f("y")))),
        ),
        (
            "not x between 1 and 2 or y is null",
            Or((Not(Between(f("x"), num(1), num(2))), IsNull(f("y")))),
        ),
    ],
)
def test_precedence(source: str, expected: Condition) -> None:
    assert parse_condition(source) == expected


def _at(source: str, span: tuple[int, int]) -> str:
    return source[span[0] : span[1]]


def test_spans_point_at_the_source() -> None:
    source = 'lifecycle == "sleeping" and  500 < total_spend or not (x between 1 and 2)'
    cond = parse_condition(source)
    assert isinstance(cond, Or) and _at(source, cond.span) == source
    left, right = cond.items
    assert isinstance(left, And)
    assert _at(source, left.span) == 'lifecycle == "sleeping" and  500 < total_spend'
    first, second = left.items
    assert isinstance(first, Compare) and isinstance(second, Compare)
    assert _at(source, first.span) == 'lifecycle == "sleeping"'
    assert _at(source, first.field.span) == "lifecycle"
    assert _at(source, first.value.span) == '"sleeping"'
    assert _at(source, second.span) == "500 < total_spend"
    assert _at(source, second.field.span) == "total_spend"
    assert _at(source, second.value.span) == "500"
    assert isinstance(right, Not) and _at(source, right.span) == "not (x between 1 and 2)"
    assert isinstance(right.item, Between)
    assert _at(source, right.item.span) == "x between 1 and 2"
    assert _at(source, right.item.high.span) == "2"


def test_spans_of_lists_dates_and_unicode() -> None:
    source = '"新客" not in tags or t < date("2024-01-01")'
    cond = parse_condition(source)
    assert isinstance(cond, Or)
    contains, compare = cond.items
    assert isinstance(contains, Contains) and isinstance(compare, Compare)
    assert _at(source, contains.span) == '"新客" not in tags'
    assert _at(source, contains.value.span) == '"新客"'
    assert _at(source, contains.field.span) == "tags"
    assert _at(source, compare.value.span) == 'date("2024-01-01")'
    source = "c in ['彩妆', 'b'] and p is not null"
    cond = parse_condition(source)
    assert isinstance(cond, And)
    in_list, is_null = cond.items
    assert isinstance(in_list, InList) and isinstance(is_null, IsNull)
    assert _at(source, in_list.span) == "c in ['彩妆', 'b']"
    assert [_at(source, v.span) for v in in_list.values] == ["'彩妆'", "'b'"]
    assert _at(source, is_null.span) == "p is not null"


def test_equality_ignores_spans() -> None:
    assert parse_condition("x == 1") == parse_condition("  x   ==   1 ")
    assert parse_condition("x == 1").span != parse_condition("  x   ==   1 ").span


# ---------------------------------------------------------------------------------------------
# Syntax errors


@pytest.mark.parametrize(
    ("source", "message", "offset", "hint"),
    [
        ("", "empty condition", 0, "write a condition"),
        ("  \t ", "empty condition", 0, "write a condition"),
        ("x ==", "expected a value after '=='", 4, None),
        ("x == and y", "expected a value after '==', found 'and'", 5, None),
        ("x = 5", "unexpected '='", 2, "use == to compare"),
        ('x == "彩妆" = 1', "unexpected '='", 10, "use == to compare"),
        ("a && b", "unexpected '&&'", 2, "use 'and'"),
        ("a || b", "unexpected '||'", 2, "use 'or'"),
        ('x == "abc', "unterminated text", 5, None),
        ("x == 'abc\\'", "unterminated text", 5, None),
        ('d > date("2024-13-01")', "invalid date '2024-13-01': month must be in 1..12", 9, None),
        ('d > date("2024-02-30")', "invalid date '2024-02-30'", 9, None),
        ('d > date("yesterday")', "'yesterday' is not a date", 9, 'date("YYYY-MM-DD")'),
        ("5 == 5", "compare a field with a value", 0, None),
        ("a == b", "compare a field with a value", 0, 'quote it: "b"'),
        ('"a" in ["a"]', "needs a field on its left", 0, None),
        ("x in y", "compare a field with a value", 0, None),
        ("(x == 5", "missing ')'", 7, "never closed"),
        ("x == 5)", "unmatched ')'", 6, None),
        ("x in (1, 2)", "expected a list like [1, 2]", 5, "square brackets"),
        ("x in [1 2]", "expected", 8, "commas"),
        ('x in [1, "a"]', "a list can't mix numbers and text", 9, None),
        ("x in [1, null]", "null is not a value here", 9, "is null"),
        ("x == null", "use 'is null' to test for a missing value", 5, "write x is null"),
        ("null != x", "use 'is not null'", 0, "write x is not null"),
        ("x == 5 and", "expected a condition after 'and'", 10, None),
        ("x between 1", "expected 'and' after '1'", 11, None),
        ("x is", "expected 'null' or 'not null' after 'is'", 4, None),
        ("x not", "expected 'in' or 'between' after 'not'", 5, None),
        ('lifecycle "sleeping"', "expected an operator", 10, "is an operator missing?"),
        ("x <> 5", "expected a value after '<'", 3, "use != for 'not equal'"),
        ('x == "\\q"', "unknown escape '\\q'", 6, None),
        ('x == "\\u12"', "four hex digits", 6, None),
        ('x == "\\ud800"', "not a character on its own", 6, None),
        ("x == 99999999999999999999", "number is too large", 5, None),
        ("x == " + "9" * 400 + ".0", "number is too large", 5, None),
        ("x（1）", "unexpected character '（'", 1, "replace the full-width '（' with '('"),
        ("x == “a”", "unexpected '“'", 5, "straight quotes"),
        ("x ! y", "unexpected '!'", 2, "!="),
        ("x == - 5", "unexpected '-'", 5, "without a space"),
        ("x" * (MAX_LENGTH + 1), "condition is too long", MAX_LENGTH, None),
        ("not " * 150 + "x", "nested too deeply", None, None),
    ],
)
def test_syntax_errors(source: str, message: str, offset: int | None, hint: str | None) -> None:
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(source)
    error = info.value
    assert message in error.message
    if offset is not None:
        assert error.offset == offset
    if hint is not None:
        assert error.hint is not None and hint in error.hint
    assert isinstance(error, ValueError)
    assert error.message in str(error)


def test_exact_error_wording() -> None:
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition("total_spend >")
    assert (info.value.message, info.value.offset, info.value.hint) == (
        "expected a value after '>'",
        13,
        None,
    )


# ---------------------------------------------------------------------------------------------
# Checking against field types

FIELDS: dict[str, FieldType] = {
    "total_spend": NUMBER,
    "lifecycle": enum("active", "silent", "sleeping", "lost"),
    "category": STRING,
    "phone": STRING,
    "tags": STRING_LIST,
    "is_friend": BOOL,
    "in_group": BOOL,
    "last_order_at": TIMESTAMP,
    "cooldown_left": DURATION,
    "event.amount": NUMBER,
}


def problems(source: str) -> list[ConditionProblem]:
    return check_condition(parse_condition(source), FIELDS)


def test_check_accepts_well_typed_conditions() -> None:
    source = (
        'lifecycle == "sleeping" and total_spend > 500 and "vip" not in tags and is_friend '
        'and last_order_at >= date("2024-11-11") and cooldown_left < 30d and cooldown_left > 5 '
        "and event.amount between 1 and 2.5 and phone is not null and category in ['a', 'b'] "
        "and is_friend != false and lifecycle in ['active', 'lost']"
    )
    assert problems(source) == []


def test_unknown_field_with_suggestion() -> None:
    assert problems("totl_spend > 5") == [
        ConditionProblem("unknown field 'totl_spend'", 0, 10, "did you mean 'total_spend'?")
    ]
    assert problems("zzz") == [ConditionProblem("unknown field 'zzz'", 0, 3, None)]


def test_enum_value_with_suggestion() -> None:
    [problem] = problems('lifecycle == "sleping"')
    assert problem.message == "lifecycle can never be 'sleping'"
    assert (problem.start, problem.end) == (13, 22)
    assert problem.hint == "did you mean 'sleeping'? allowed: active, silent, sleeping, lost"
    [problem] = problems('lifecycle in ["active", "gone"]')
    assert problem.message == "lifecycle can never be 'gone'"
    assert problem.hint == "allowed: active, silent, sleeping, lost"


@pytest.mark.parametrize(
    ("source", "message", "hint"),
    [
        ('total_spend > "500"', 'total_spend is a number, but "500" is text', "remove the quotes"),
        ("phone == 5", "phone is text, but 5 is a number", 'put text in quotes: "5"'),
        ("total_spend", "total_spend is a number, not a yes/no field", "total_spend > 0"),
        ('"vip" in total_spend', "total_spend is a number, not a list", None),
        ("5 in tags", "tags holds text, but 5 is a number", None),
        ('tags == "vip"', "tags is a list", '"vip" in tags'),
        ('tags in ["vip"]', "tags is a list", None),
        ('last_order_at > "2024-11-11"', "last_order_at is a date/time", 'date("2024-11-11")'),
        ("last_order_at > 5", "last_order_at is a date/time, but 5 is a number", None),
        ('total_spend > date("2024-01-01")', "date(...) needs a date/time field", None),
        ("total_spend < 30d", "a duration needs a duration field", None),
        ('cooldown_left < "1d"', "cooldown_left is a duration", "30d"),
        ('phone between "a" and "b"', "'between' needs a number, date/time or duration", None),
        ("is_friend between 1 and 2", "'between' needs a number", None),
        ("is_friend > true", "compare it only with == or !=", None),
        ("is_friend == 1", "is_friend is a yes/no field, but 1 is a number", "true or false"),
        ("total_spend between 1 and date('2024-01-01')", "date(...) needs a date/time", None),
    ],
)
def test_type_mismatches(source: str, message: str, hint: str | None) -> None:
    found = problems(source)
    assert len(found) == 1, found
    assert message in found[0].message
    if hint is not None:
        assert found[0].hint is not None and hint in found[0].hint


def test_problems_are_collected_and_sorted() -> None:
    source = 'category in [1, 2] or (totl_spend > 1 and lifecycle == "x") or zz'
    found = problems(source)
    assert [p.start for p in found] == sorted(p.start for p in found)
    assert [source[p.start : p.end] for p in found] == ["1", "2", "totl_spend", '"x"', "zz"]


# ---------------------------------------------------------------------------------------------
# SQL against a real sqlite database


def _epoch(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> int:
    return epoch_seconds(datetime(year, month, day, hour, minute, sec), TZ)


SQL_FIELDS: dict[str, SqlField] = {
    **{name: SqlField(f'c."{name}"', ftype) for name, ftype in FIELDS.items()},
    "event.amount": SqlField("json_extract(c.props, '$.amount')", NUMBER),
}

ROWS: list[tuple[object, ...]] = [
    # id, spend, lifecycle, category, tags, friend, in_group, last_order, cooldown, phone, props
    (1, 800.0, "sleeping", "skincare", '["vip", "新客"]', 1, 0, _epoch(2024, 11, 11), 3600,
     "13800000000", '{"amount": 300}'),
    (2, 500, "sleeping", "彩妆", "[]", 0, 1, _epoch(2024, 11, 10, 23, 59, 59), 2592000,
     None, '{"amount": 299.5}'),
    (3, None, "active", None, None, None, None, None, None, None, "{}"),
    (4, 100, "silent", "makeup", '["彩妆"]', 1, None, _epoch(2024, 11, 12, 12), 0,
     "", '{"amount": null}'),
    (5, 200, None, "Skincare", '["vip"]', 0, 0, _epoch(2024, 11, 11, 8), 2592001,
     "139", '{"amount": 1000}'),
]  # fmt: skip


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(
            'CREATE TABLE customers (id INTEGER PRIMARY KEY, "total_spend" REAL, '
            '"lifecycle" TEXT, "category" TEXT, "tags" TEXT, "is_friend" INTEGER, '
            '"in_group" INTEGER, "last_order_at" INTEGER, "cooldown_left" INTEGER, '
            '"phone" TEXT, props TEXT)'
        )
        conn.executemany(f"INSERT INTO customers VALUES ({', '.join('?' * 11)})", ROWS)
        yield conn


def select(conn: sqlite3.Connection, source: str) -> list[int]:
    sql, params = compile_to_sql(parse_condition(source), SQL_FIELDS, TZ)
    query = f"SELECT id FROM customers c WHERE {sql} ORDER BY id"
    return [row[0] for row in conn.execute(query, params)]


@pytest.mark.parametrize(
    ("source", "ids"),
    [
        ("total_spend > 500", [1]),
        ("total_spend >= 500", [1, 2]),
        ("500 < total_spend", [1]),
        ("total_spend != 500", [1, 4, 5]),
        ('lifecycle == "sleeping" and total_spend > 500', [1]),
        ('lifecycle != "sleeping"', [3, 4]),
        ('not (lifecycle == "sleeping")', [3, 4]),
        ('not (total_spend > 100 and lifecycle == "sleeping")', [3, 4]),
        ("total_spend between 100 and 500", [2, 4, 5]),
        ("total_spend not between 100 and 500", [1]),
        ("not (total_spend between 100 and 500)", [1]),
        ("category in [\"skincare\", '彩妆']", [1, 2]),
        ("category not in [\"skincare\", '彩妆']", [4, 5]),
        ('category == "skincare"', [1]),
        ("category in []", []),
        ("category not in []", [1, 2, 4, 5]),
        ("not (category in [])", [1, 2, 4, 5]),
        ('"vip" in tags', [1, 5]),
        ('"vip" not in tags', [2, 4]),
        ('not ("vip" in tags)', [2, 4]),
        ('"新客" in tags', [1]),
        ('"彩妆" in tags or category == "彩妆"', [2, 4]),
        ("is_friend", [1, 4]),
        ("not is_friend", [2, 5]),
        ("is_friend == false", [2, 5]),
        ("is_friend != true", [2, 5]),
        ("is_friend and not in_group", [1]),
        ("in_group in [true]", [2]),
        ("phone is null", [2, 3]),
        ("phone is not null", [1, 4, 5]),
        ('phone == ""', [4]),
        ('last_order_at >= date("2024-11-11")', [1, 4, 5]),
        ('last_order_at < date("2024-11-11T08:00")', [1, 2]),
        ('last_order_at between date("2024-11-11") and date("2024-11-11T08:00:00")', [1, 5]),
        ("cooldown_left < 30d", [1, 4]),
        ("cooldown_left >= 30d", [2, 5]),
        ("cooldown_left <= 1h", [1, 4]),
        ("cooldown_left > 2592000", [5]),
        ("event.amount >= 300", [1, 5]),
        ("event.amount < 300", [2]),
        ("event.amount is null", [3, 4]),
        ('lifecycle == "sleeping" or phone is not null', [1, 2, 4, 5]),
    ],
)
def test_sql_selects_the_right_rows(db: sqlite3.Connection, source: str, ids: list[int]) -> None:
    assert select(db, source) == ids


def test_sql_text_and_parameters() -> None:
    cond = parse_condition('lifecycle == "sleeping" and (total_spend > 500 or "vip" in tags)')
    sql, params = compile_to_sql(cond, SQL_FIELDS, TZ)
    assert sql == (
        '((c."lifecycle" = ?) AND ((c."total_spend" > ?) OR (CASE WHEN c."tags" IS NULL '
        'THEN NULL WHEN instr(c."tags", ?) = 0 AND instr(c."tags", \'\\\') = 0 THEN 0 '
        'ELSE EXISTS (SELECT 1 FROM json_each(c."tags") WHERE value = ?) END)))'
    )
    assert params == ["sleeping", 500, "vip", "vip"]
    sql, params = compile_to_sql(parse_condition("is_friend"), SQL_FIELDS, TZ)
    assert (sql, params) == ('(c."is_friend" = 1)', [])
    sql, params = compile_to_sql(parse_condition("is_friend == true"), SQL_FIELDS, TZ)
    assert (sql, params) == ('(c."is_friend" = ?)', [1])
    sql, params = compile_to_sql(
        parse_condition('last_order_at >= date("2024-11-11") and cooldown_left < 30d'),
        SQL_FIELDS,
        TZ,
    )
    assert params == [1731254400, 2592000]  # 2024-11-11 00:00 in Shanghai is 16:00Z the day before


def test_values_are_never_pasted_into_sql(db: sqlite3.Connection) -> None:
    evil = "x'); DROP TABLE customers; --"
    source = f"category == {json.dumps(evil)} or category in ['a\"b', \"c'd\"]"
    sql, params = compile_to_sql(parse_condition(source), SQL_FIELDS, TZ)
    assert "DROP" not in sql and "'a" not in sql
    assert params == [evil, 'a"b', "c'd"]
    assert select(db, source) == []
    assert db.execute("SELECT count(*) FROM customers").fetchone() == (5,)


def test_compile_refuses_conditions_with_problems() -> None:
    with pytest.raises(SqlCompileError) as info:
        compile_to_sql(parse_condition("totl_spend > 1"), SQL_FIELDS, TZ)
    assert info.value.problems[0].message == "unknown field 'totl_spend'"
    assert "unknown field 'totl_spend'" in str(info.value)


def test_fields_used() -> None:
    cond = parse_condition('a and (b > 1 or not "x" in c.d) and a is null')
    assert fields_used(cond) == {"a", "b", "c.d"}


def test_to_nnf_examples() -> None:
    cond = parse_condition('not (a > 1 and (not b or "x" in t)) or not c is null')
    assert to_nnf(cond) == parse_condition('a <= 1 or (b and "x" not in t) or c is not null')
    assert to_nnf(parse_condition("not not a")) == parse_condition("a")
    assert to_nnf(parse_condition("not a")) == parse_condition("a == false")
    assert to_nnf(parse_condition("not x in []")) == parse_condition("x not in []")
    assert to_nnf(parse_condition("not x not between 1 and 2")) == parse_condition(
        "x between 1 and 2"
    )


# ---------------------------------------------------------------------------------------------
# Property: to_nnf selects the same rows (and both match a three-valued reference evaluator)

P_FIELDS: dict[str, SqlField] = {
    "n": SqlField('r."n"', NUMBER),
    "s": SqlField('r."s"', STRING),
    "b": SqlField('r."b"', BOOL),
    "t": SqlField('r."t"', STRING_LIST),
    "ts": SqlField('r."ts"', TIMESTAMP),
    "d": SqlField('r."d"', DURATION),
}
P_DATES = [date(2024, 1, 1), date(2024, 1, 2), datetime(2024, 1, 1, 12)]
P_EPOCHS = [epoch_seconds(d, TZ) for d in P_DATES]

small_numbers = st.integers(-2, 2).map(num)
letters = st.sampled_from("abc").map(text)
p_dates = st.sampled_from(P_DATES).map(lambda d: Literal(d, "date"))
p_durations = st.sampled_from([0, 60, 3600]).map(lambda s: Literal(s, "duration"))


def _values(
    field: str, lits: st.SearchStrategy[Literal], ordered: bool = True
) -> st.SearchStrategy[Condition]:
    negated = st.booleans()
    name = st.just(Field(field))
    compare = st.builds(Compare, name, st.sampled_from(OPS), lits)
    in_list = st.builds(InList, name, st.lists(lits, max_size=3).map(tuple), negated)
    if not ordered:
        return compare | in_list
    return compare | in_list | st.builds(Between, name, lits, lits, negated)


p_atoms: st.SearchStrategy[Condition] = st.one_of(
    _values("n", small_numbers),
    _values("s", letters, ordered=False),
    _values("ts", p_dates),
    _values("d", p_durations | small_numbers),
    st.builds(
        Compare, st.just(Field("b")), st.sampled_from(("==", "!=")), st.booleans().map(boolean)
    ),
    st.builds(
        InList, st.just(Field("b")), st.lists(st.booleans().map(boolean), max_size=2).map(tuple)
    ),
    st.builds(BoolTest, st.just(Field("b"))),
    st.builds(Contains, st.just(Field("t")), letters, st.booleans()),
    st.builds(IsNull, st.sampled_from([Field(name) for name in P_FIELDS]), st.booleans()),
)


def _compound(children: st.SearchStrategy[Condition]) -> st.SearchStrategy[Condition]:
    items = st.lists(children, min_size=2, max_size=3).map(tuple)
    return st.one_of(items.map(And), items.map(Or), children.map(Not))


p_conditions = st.recursive(p_atoms, _compound, max_leaves=8)
p_rows = st.lists(
    st.fixed_dictionaries(
        {
            "n": st.none() | st.integers(-3, 3),
            "s": st.none() | st.sampled_from("abcd"),
            "b": st.none() | st.sampled_from([0, 1]),
            "t": st.none()
            | st.lists(st.sampled_from("abc"), max_size=3, unique=True).map(json.dumps),
            "ts": st.none() | st.sampled_from([*P_EPOCHS, P_EPOCHS[0] - 1, P_EPOCHS[1] + 1]),
            "d": st.none() | st.sampled_from([-1, 0, 1, 60, 3600, 3601]),
        }
    ),
    max_size=8,
)


def _run(conn: sqlite3.Connection, cond: Condition) -> set[int]:
    sql, params = compile_to_sql(cond, P_FIELDS, TZ)
    return {row[0] for row in conn.execute(f"SELECT id FROM r WHERE {sql}", params)}


def _sql_value(lit: Literal) -> object:
    if lit.kind == "bool":
        return int(bool(lit.value))
    if isinstance(lit.value, date):
        return epoch_seconds(lit.value, TZ)
    return lit.value


def _compare(left: object, op: str, right: object) -> bool:
    a, b = left, right
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    assert isinstance(a, int | float | str) and isinstance(b, int | float | str)
    assert type(a) is type(b) or not isinstance(a, str)
    if op == "<":
        return a < b  # type: ignore[operator]
    if op == "<=":
        return a <= b  # type: ignore[operator]
    if op == ">":
        return a > b  # type: ignore[operator]
    return a >= b  # type: ignore[operator]


def evaluate(cond: Condition, row: Mapping[str, object]) -> bool | None:
    """Kleene three-valued reference semantics (None = unknown)."""
    if isinstance(cond, And | Or):
        results = [evaluate(item, row) for item in cond.items]
        decisive = isinstance(cond, Or)
        if decisive in results:
            return decisive
        return None if None in results else not decisive
    if isinstance(cond, Not):
        inner = evaluate(cond.item, row)
        return None if inner is None else not inner
    value = row[cond.field.name]
    if isinstance(cond, IsNull):
        return (value is None) != cond.negated
    if value is None:
        return None
    if isinstance(cond, BoolTest):
        return value == 1
    if isinstance(cond, Compare):
        return _compare(value, cond.op, _sql_value(cond.value))
    if isinstance(cond, InList):
        return (value in [_sql_value(v) for v in cond.values]) != cond.negated
    if isinstance(cond, Contains):
        assert isinstance(value, str)
        return (cond.value.value in json.loads(value)) != cond.negated
    low, high = _sql_value(cond.low), _sql_value(cond.high)
    inside = _compare(value, ">=", low) and _compare(value, "<=", high)
    return inside != cond.negated


def _contains_not(cond: Condition) -> bool:
    if isinstance(cond, Not):
        return True
    if isinstance(cond, And | Or):
        return any(_contains_not(item) for item in cond.items)
    return False


@settings(max_examples=300, deadline=None)
@given(cond=p_conditions, rows=p_rows)
def test_to_nnf_selects_the_same_rows(cond: Condition, rows: list[dict[str, object]]) -> None:
    nnf = to_nnf(cond)
    assert not _contains_not(nnf)
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.execute('CREATE TABLE r (id INTEGER PRIMARY KEY, "n", "s", "b", "t", "ts", "d")')
        for i, row in enumerate(rows):
            conn.execute(
                "INSERT INTO r VALUES (?, ?, ?, ?, ?, ?, ?)", (i, *(row[k] for k in P_FIELDS))
            )
        selected = _run(conn, cond)
        assert _run(conn, nnf) == selected
    assert selected == {i for i, row in enumerate(rows) if evaluate(cond, row) is True}


# ---------------------------------------------------------------------------------------------
# Property: the parser never raises anything but ConditionSyntaxError

VALID = [
    'lifecycle == "sleeping" and total_spend > 500',
    'aipl_stage == "L" and "vip" not in tags',
    "category in [\"skincare\", '彩妆'] and not (amount between 100 and 200)",
    'last_order_at >= date("2024-11-11") or phone is not null',
    "is_friend and not in_group",
    "event.amount >= 300",
    "cooldown_left < 30d",
    'x is null or (y != -1.5 and z in [date("2024-01-01T10:00")]) or "a\\u00e9" in t',
]
NOISE = " \"'\\()[],.=<>!&|-_019abdeilnorstuwhmT\u3000\uff08\u201c\n\té彩"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    source = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(source)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "splice"]))
        piece = draw(st.text(alphabet=NOISE, min_size=1, max_size=3) | st.text(max_size=2))
        if action == "insert":
            source = source[:pos] + piece + source[pos:]
        elif action == "delete":
            source = source[:pos] + source[pos + len(piece) :]
        elif action == "replace":
            source = source[:pos] + piece + source[pos + len(piece) :]
        else:
            other = draw(st.sampled_from(VALID))
            source = source[:pos] + other[draw(st.integers(0, len(other))) :]
    return source


def _parses_or_reports(source: str) -> None:
    try:
        cond = parse_condition(source)
    except ConditionSyntaxError as error:
        assert error.message
        assert 0 <= error.offset <= max(len(source), MAX_LENGTH)
        return
    assert parse_condition(format_condition(cond)) == cond


@settings(max_examples=300, deadline=None)
@given(source=st.text(max_size=60) | st.text(alphabet=NOISE, max_size=40))
def test_parser_only_raises_syntax_errors_on_any_text(source: str) -> None:
    _parses_or_reports(source)


@settings(max_examples=400, deadline=None)
@given(source=mutated())
def test_parser_only_raises_syntax_errors_on_mutations(source: str) -> None:
    _parses_or_reports(source)


# ---------------------------------------------------------------------------------------------
# Property: format_condition round-trips through the parser

KEYWORDS = {"and", "or", "not", "in", "between", "is", "null", "true", "false"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}(\.[A-Za-z_][A-Za-z0-9_]{0,4})?", fullmatch=True)
fields = names.filter(lambda n: n.split(".")[0].lower() not in KEYWORDS).map(Field)
numbers = st.integers(-(2**63) + 1, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
literal_by_kind: dict[str, st.SearchStrategy[Literal]] = {
    "number": numbers.map(num),
    "string": st.text(max_size=12).map(text),
    "bool": st.booleans().map(boolean),
    "date": (st.dates() | st.datetimes().map(lambda d: d.replace(microsecond=0))).map(
        lambda d: Literal(d, "date")
    ),
    "duration": st.integers(0, 10**12).map(lambda s: Literal(s, "duration")),
}
any_literal = st.one_of(*literal_by_kind.values())
lists = st.sampled_from(list(literal_by_kind)).flatmap(
    lambda kind: st.lists(literal_by_kind[kind], max_size=3).map(tuple)
)
atoms: st.SearchStrategy[Condition] = st.one_of(
    st.builds(Compare, fields, st.sampled_from(OPS), any_literal),
    st.builds(InList, fields, lists, st.booleans()),
    st.builds(Contains, fields, any_literal, st.booleans()),
    st.builds(Between, fields, any_literal, any_literal, st.booleans()),
    st.builds(IsNull, fields, st.booleans()),
    st.builds(BoolTest, fields),
)
conditions = st.recursive(atoms, _compound, max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(cond=conditions)
def test_format_round_trips(cond: Condition) -> None:
    source = format_condition(cond)
    assume(len(source) <= MAX_LENGTH)
    assert parse_condition(source) == cond
    assert format_condition(parse_condition(source)) == source


@pytest.mark.parametrize(
    "tags",
    [
        None,
        "[]",
        '["vip"]',
        '["kol","vip"]',
        '["vipx"]',  # contains the text, not the element
        '["\\u0076ip"]',  # "vip" written with an escape: no byte search can see it
        '["a\\"vip\\"b"]',  # the text between escaped quotes
        '["会员","vip"]',
        '["\\u4f1a\\u5458"]',  # 会员, escaped
    ],
)
@pytest.mark.parametrize("value", ["vip", "会员", 'a"b', "x\\y"])
def test_list_membership_in_sql_is_json_membership(tags: str | None, value: str) -> None:
    """`value in tags` skips parsing a list that cannot hold `value` (a byte search); the
    answer is always json_each's, escapes and all."""
    conn = sqlite3.connect(":memory:")
    for negated in (False, True):
        text = f"{json.dumps(value, ensure_ascii=False)} {'not in' if negated else 'in'} tags"
        sql, params = compile_to_sql(parse_condition(text), SQL_FIELDS, TZ)
        got = conn.execute(f"SELECT {sql} FROM (SELECT ? AS tags) c", [*params, tags]).fetchone()
        if tags is None:
            expected = None
        else:
            found = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM json_each(?) WHERE value = ?)", (tags, value)
            ).fetchone()[0]
            expected = int(not found) if negated else found
        assert got[0] == expected, (text, tags)
