"""Parse condition text into the IR; every failure is a ConditionSyntaxError."""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from datetime import date, datetime
from importlib import resources
from typing import Final

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedToken

from .errors import ConditionSyntaxError
from .ir import (
    And,
    Between,
    BoolTest,
    Compare,
    CompareOp,
    Condition,
    Contains,
    Field,
    InList,
    IsNull,
    Literal,
    LiteralKind,
    LiteralValue,
    Not,
    Or,
    Span,
)

MAX_LENGTH: Final = 2000
MAX_DEPTH: Final = 100

_PACKAGE: Final = __name__.rpartition(".")[0]
_INT64_MAX: Final = 2**63 - 1
_OPS: Final[dict[str, CompareOp]] = {
    "==": "==",
    "!=": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
}
_FLIPPED: Final[dict[CompareOp, CompareOp]] = {
    "==": "==",
    "!=": "!=",
    "<": ">",
    "<=": ">=",
    ">": "<",
    ">=": "<=",
}
_DURATION_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIMPLE_ESCAPES: Final = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_ESCAPE_HINT: Final = "known escapes: \\\" \\' \\\\ \\n \\t \\uXXXX"
_DATE_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?)?"
)
_DATE_HINT: Final = 'write date("YYYY-MM-DD") or date("YYYY-MM-DDTHH:MM:SS")'
_KIND_WORDS: Final[dict[LiteralKind, str]] = {
    "number": "numbers",
    "string": "text",
    "bool": "true/false",
    "date": "dates",
    "duration": "durations",
}
_Node = Tree[Token] | Token


@functools.cache
def _lark() -> Lark:
    grammar = resources.files(_PACKAGE).joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True)


def parse_condition(text: str) -> Condition:
    """Parse condition text into the IR, raising only ConditionSyntaxError on bad input."""
    if len(text) > MAX_LENGTH:
        message = f"condition is too long ({len(text)} characters; the limit is {MAX_LENGTH})"
        raise ConditionSyntaxError(message, MAX_LENGTH, "split it into smaller conditions")
    if not text.strip():
        raise ConditionSyntaxError(
            "empty condition", 0, "write a condition such as total_spend > 500"
        )
    try:
        tree = _lark().parse(text)
    except UnexpectedCharacters as exc:
        raise _bad_character(text, exc.pos_in_stream or 0) from None
    except UnexpectedToken as exc:
        raise _unexpected_token(text, exc) from None
    except LarkError:
        raise ConditionSyntaxError("could not understand the condition", 0) from None
    return _Builder().condition(tree, 0)


def _tokens_before(text: str, end: int) -> list[Token]:
    """Lex ``text[:end]`` (used only to word error messages)."""
    try:
        return list(_lark().lex(text[:end]))
    except LarkError:
        return []


class _Null:
    """The ``null`` keyword in a place where a value was expected."""

    def __init__(self, span: Span) -> None:
        self.span = span


class _Builder:
    """Turns a Lark parse tree into IR nodes, validating what the grammar cannot."""

    def condition(self, node: _Node, depth: int) -> Condition:
        if depth > MAX_DEPTH:
            raise ConditionSyntaxError(
                f"condition is nested too deeply (more than {MAX_DEPTH} levels)",
                _span(node)[0],
                "split it into simpler conditions",
            )
        if not isinstance(node, Tree):
            raise ConditionSyntaxError("could not understand the condition", _span(node)[0])
        kind, span = str(node.data), _span(node)
        kids = node.children
        if kind in ("or_expr", "and_expr"):
            items = tuple(self.condition(c, depth + 1) for c in kids if isinstance(c, Tree))
            return And(items, span=span) if kind == "and_expr" else Or(items, span=span)
        if kind == "not_":
            return Not(self.condition(kids[-1], depth + 1), span=span)
        if kind == "bool_test":
            return BoolTest(self.field(kids[0]), span=span)
        negated = any(isinstance(c, Token) and c.type == "NOT" for c in kids)
        parts = [c for c in kids if not _is_keyword(c)]
        if kind == "comparison":
            return self.comparison(parts[0], str(parts[1]), parts[2], span)
        if kind == "membership":
            return self.membership(parts[0], parts[1], negated, span)
        if kind == "between":
            return self.between(parts[0], parts[1], parts[2], negated, span)
        if kind == "null_test":
            left = self.operand(parts[0])
            if not isinstance(left, Field):
                raise ConditionSyntaxError(
                    "'is null' needs a field on its left", span[0], "write e.g. phone is null"
                )
            return IsNull(left, negated, span=span)
        raise ConditionSyntaxError("could not understand the condition", span[0])

    def comparison(self, left: _Node, op_text: str, right: _Node, span: Span) -> Compare:
        op = _OPS[op_text]
        lhs, rhs = self.operand(left), self.operand(right)
        for side, other in ((lhs, rhs), (rhs, lhs)):
            if isinstance(side, _Null):
                raise _null_error(side, other, op)
        if isinstance(lhs, Field) and isinstance(rhs, Literal):
            return Compare(lhs, op, rhs, span=span)
        if isinstance(lhs, Literal) and isinstance(rhs, Field):
            return Compare(rhs, _FLIPPED[op], lhs, span=span)
        if isinstance(lhs, Field) and isinstance(rhs, Field):
            hint = None
            if "." not in rhs.name:
                hint = f'to compare with the text {rhs.name}, quote it: "{rhs.name}"'
            raise ConditionSyntaxError(
                "compare a field with a value, not two fields", span[0], hint
            )
        raise ConditionSyntaxError(
            "compare a field with a value, not two values",
            span[0],
            "one side must be a field name, e.g. total_spend > 500",
        )

    def membership(self, left: _Node, right: _Node, negated: bool, span: Span) -> Condition:
        lhs = self.operand(left)
        if isinstance(lhs, _Null):
            raise ConditionSyntaxError(
                "null can't be looked up with 'in'", lhs.span[0], "use 'is null' instead"
            )
        if isinstance(right, Tree) and right.data == "list":
            if not isinstance(lhs, Field):
                raise ConditionSyntaxError(
                    "'in [...]' needs a field on its left, not a value",
                    span[0],
                    'write e.g. category in ["skincare", "makeup"]',
                )
            return InList(lhs, self.values(right), negated, span=span)
        field = self.field(right)
        if not isinstance(lhs, Literal):
            raise ConditionSyntaxError(
                "compare a field with a value: 'in' needs a value before a list field",
                span[0],
                f'write e.g. "vip" in {field.name}, or {lhs.name} in ["a", "b"]',
            )
        return Contains(field, lhs, negated, span=span)

    def between(self, left: _Node, low: _Node, high: _Node, negated: bool, span: Span) -> Between:
        lhs = self.operand(left)
        if not isinstance(lhs, Field):
            raise ConditionSyntaxError(
                "'between' needs a field on its left", span[0], "write e.g. amount between 1 and 9"
            )
        return Between(lhs, self.value(low), self.value(high), negated, span=span)

    def values(self, node: Tree[Token]) -> tuple[Literal, ...]:
        values = tuple(self.value(c) for c in node.children)
        for value in values[1:]:
            if value.kind != values[0].kind:
                words = f"{_KIND_WORDS[values[0].kind]} and {_KIND_WORDS[value.kind]}"
                raise ConditionSyntaxError(
                    f"a list can't mix {words}",
                    value.span[0],
                    "put only one kind of value in a list",
                )
        return values

    def value(self, node: _Node) -> Literal:
        result = self.operand(node)
        if isinstance(result, Literal):
            return result
        if isinstance(result, _Null):
            raise ConditionSyntaxError(
                "null is not a value here", result.span[0], "test for missing values with 'is null'"
            )
        raise ConditionSyntaxError(
            f"expected a value, found the field {result.name}", result.span[0]
        )

    def field(self, node: _Node) -> Field:
        if isinstance(node, Tree) and node.data == "field" and isinstance(node.children[0], Token):
            return Field(str(node.children[0]), span=_span(node))
        raise ConditionSyntaxError("expected a field name", _span(node)[0])

    def operand(self, node: _Node) -> Field | Literal | _Null:
        span = _span(node)
        if isinstance(node, Tree):
            if node.data == "field":
                return self.field(node)
            token = node.children[-1]  # date_lit: DATE "(" STRING ")"
            assert isinstance(token, Token)
            iso = self.unescape(token)
            return Literal(_parse_date(iso, _span(token)[0]), "date", iso, span=span)
        raw = str(node)
        kind = node.type
        value: LiteralValue
        if kind == "NULL":
            return _Null(span)
        if kind == "STRING":
            return Literal(self.unescape(node), "string", raw, span=span)
        if kind in ("TRUE", "FALSE"):
            return Literal(kind == "TRUE", "bool", raw, span=span)
        if kind == "DURATION":
            value = int(raw[:-1]) * _DURATION_SECONDS[raw[-1]]
            _check_int(value, span[0])
            return Literal(value, "duration", raw, span=span)
        if kind == "NUMBER":
            value = float(raw) if "." in raw else int(raw)
            if isinstance(value, int):
                _check_int(value, span[0])
            elif not math.isfinite(value):
                raise ConditionSyntaxError("number is too large", span[0])
            return Literal(value, "number", raw, span=span)
        raise ConditionSyntaxError(f"unexpected {raw!r}", span[0])

    def unescape(self, token: Token) -> str:
        """Decode a quoted string token, reporting bad escapes at their offset."""
        body, base = str(token)[1:-1], _span(token)[0] + 1
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                if 0xD800 <= ord(ch) <= 0xDFFF:
                    raise ConditionSyntaxError("text contains an invalid character", base + i)
                out.append(ch)
                i += 1
                continue
            nxt = body[i + 1]
            if nxt in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[nxt])
                i += 2
                continue
            digits = body[i + 2 : i + 6]
            if nxt != "u":
                message = f"unknown escape '\\{nxt}' in text"
                raise ConditionSyntaxError(message, base + i, _ESCAPE_HINT)
            if len(digits) != 4 or any(d not in string.hexdigits for d in digits):
                message = "'\\u' must be followed by four hex digits, like \\u00e9"
                raise ConditionSyntaxError(message, base + i, _ESCAPE_HINT)
            code = int(digits, 16)
            if 0xD800 <= code <= 0xDFFF:
                message = f"'\\u{digits}' is not a character on its own"
                raise ConditionSyntaxError(message, base + i, "write the character itself")
            out.append(chr(code))
            i += 6
        return "".join(out)


def _null_error(null: _Null, other: Field | Literal | _Null, op: CompareOp) -> ConditionSyntaxError:
    name = other.name if isinstance(other, Field) else "field"
    if op in ("==", "!="):
        test = "is null" if op == "==" else "is not null"
        return ConditionSyntaxError(
            f"use '{test}' to test for a missing value", null.span[0], f"write {name} {test}"
        )
    return ConditionSyntaxError(
        f"null can't be compared with '{op}'", null.span[0], "use 'is null' or 'is not null'"
    )


def _parse_date(iso: str, offset: int) -> date:
    match = _DATE_RE.fullmatch(iso)
    shown = iso if len(iso) <= 30 else iso[:27] + "..."
    if match is None:
        raise ConditionSyntaxError(f"'{shown}' is not a date", offset, _DATE_HINT)
    parts = [int(group) for group in match.groups() if group is not None]
    try:
        if len(parts) == 3:
            return date(parts[0], parts[1], parts[2])
        seconds = parts[5] if len(parts) == 6 else 0
        return datetime(parts[0], parts[1], parts[2], parts[3], parts[4], seconds)
    except ValueError as exc:
        raise ConditionSyntaxError(f"invalid date '{shown}': {exc}", offset, _DATE_HINT) from None


def _check_int(value: int, offset: int) -> None:
    if abs(value) > _INT64_MAX:
        raise ConditionSyntaxError("number is too large", offset, "numbers must fit in 64 bits")


def _is_keyword(node: _Node) -> bool:
    return isinstance(node, Token) and node.type in ("NOT", "IN", "IS", "BETWEEN", "AND")


def _span(node: _Node) -> Span:
    if isinstance(node, Token):
        return (node.start_pos or 0, node.end_pos or 0)
    meta = node.meta
    if meta.empty:
        return (0, 0)
    return (meta.start_pos, meta.end_pos)


# ---------------------------------------------------------------------------------------------
# Operator-friendly wording of Lark's errors

_VALUE_TOKENS: Final = frozenset({"NUMBER", "STRING", "DURATION", "TRUE", "FALSE", "NULL", "DATE"})
_PUNCTUATION: Final = {"LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','"}
_LIST_WORDS: Final = ("contains", "has", "includes")
_CHAR_HINTS: Final = {
    "&": "use 'and' instead",
    "|": "use 'or' instead",
    "=": "use == to compare",
    "!": "use != for 'not equal', or 'not' to negate",
    "-": "write negative numbers without a space, like -5",
    "\u201c": "put text in straight quotes \" or '",
    "\u201d": "put text in straight quotes \" or '",
    "\u2018": "put text in straight quotes \" or '",
    "\u2019": "put text in straight quotes \" or '",
}


def _bad_character(text: str, pos: int) -> ConditionSyntaxError:
    """Describe a character that starts no token at all."""
    ch, pair = text[pos], text[pos : pos + 2]
    if ch in "\"'":
        message = f"unterminated text: the {ch} here is never closed"
        return ConditionSyntaxError(message, pos, f"end the text with {ch}; write \\{ch} inside it")
    if pair in ("&&", "||"):
        return ConditionSyntaxError(f"unexpected '{pair}'", pos, _CHAR_HINTS[ch])
    if pair in ("=<", "=>"):
        return ConditionSyntaxError("unexpected '='", pos, f"write {pair[1]}=")
    if ch in _CHAR_HINTS:
        return ConditionSyntaxError(f"unexpected '{ch}'", pos, _CHAR_HINTS[ch])
    plain = unicodedata.normalize("NFKC", ch)
    hint = None
    if plain != ch and len(plain) == 1 and plain.isascii() and plain.isprintable():
        hint = f"replace the full-width '{ch}' with '{plain}'"
    return ConditionSyntaxError(f"unexpected character {_show_char(ch)}", pos, hint)


def _unexpected_token(text: str, exc: UnexpectedToken) -> ConditionSyntaxError:
    """Describe a token the grammar does not allow where it appears."""
    token = exc.token
    at_end = token.type == "$END"
    start = len(text) if at_end else (token.start_pos or 0)
    before = _tokens_before(text, start)
    prev = before[-1] if before else None
    unclosed: list[int] = []
    for tok in before:
        if tok.type == "LPAR":
            unclosed.append(tok.start_pos or 0)
        elif tok.type == "RPAR" and unclosed:
            unclosed.pop()
    expected = _accepted(exc)
    if not unclosed:
        expected.discard("RPAR")
        if token.type == "RPAR":
            return ConditionSyntaxError("unmatched ')'", start, "remove it or add a matching '('")
    elif at_end and "RPAR" in expected:
        hint = f"the '(' at character {unclosed[-1]} is never closed"
        return ConditionSyntaxError("missing ')'", len(text.rstrip()), hint)
    message = f"expected {_describe_expected(expected)}"
    if prev is not None:
        message += f" after {_show(str(prev))}"
    if not at_end:
        message += f", found {_show(str(token))}"
    offset = (prev.end_pos or 0) if at_end and prev is not None else start
    return ConditionSyntaxError(message, offset, _token_hint(text, token, expected, prev))


def _accepted(exc: UnexpectedToken) -> set[str]:
    try:
        accepts = exc.accepts
    except LarkError:
        accepts = None
    return set(accepts or exc.expected)


def _describe_expected(expected: set[str]) -> str:
    phrases: list[str] = []
    left = set(expected)
    if {"LPAR", "NOT"} <= left:
        phrases.append("a condition")
        left -= _VALUE_TOKENS | {"LPAR", "NOT", "NAME"}
    elif left == {"STRING"}:
        return 'a quoted date like "2024-11-11"'
    elif left == {"NOT", "NULL"}:
        return "'null' or 'not null'"
    elif left & _VALUE_TOKENS:
        phrases.append("a value")
        left -= _VALUE_TOKENS | {"NAME"}
    if "LSQB" in left:
        phrases.append("a list like [1, 2]" + (" or a list field" if "NAME" in left else ""))
        left -= {"LSQB", "NAME"}
    if "NAME" in left:
        phrases.append("a field name")
    if "COMP_OP" in left:
        phrases.append(
            "an operator such as == or in"
            if "IN" in left
            else "a comparison operator (==, !=, <, <=, >, >=)"
        )
        left -= {"IN", "BETWEEN", "IS", "NOT", "AND", "OR"}
    for keyword in ("NOT", "IN", "BETWEEN", "NULL"):
        if keyword in left:
            phrases.append(f"'{keyword.lower()}'")
    if {"AND", "OR"} <= left:
        phrases.append("'and'/'or'")
    elif "AND" in left:
        phrases.append("'and'")
    phrases.extend(words for name, words in _PUNCTUATION.items() if name in left)
    if not phrases:
        return "the end of the condition"
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " or " + phrases[-1]


def _token_hint(text: str, token: Token, expected: set[str], prev: Token | None) -> str | None:
    start = token.start_pos or 0
    if token.type == "LPAR" and "LSQB" in expected:
        return "lists use square brackets: [1, 2]"
    if text[max(start - 1, 0) : start + 1] == "<>":
        return "use != for 'not equal'"
    if token.type == "NAME" and str(token).lower() in _LIST_WORDS:
        return 'to test a list field write "vip" in tags'
    if expected == {"COMMA", "RSQB"}:
        return "separate list values with commas"
    if (
        "COMP_OP" in expected
        and prev is not None
        and prev.type == "NAME"
        and (token.type in _VALUE_TOKENS or token.type == "NAME")
    ):
        return f"is an operator missing? e.g. {prev} == {token}"
    return None


def _show(value: str) -> str:
    short = value if len(value) <= 24 else value[:21] + "..."
    return "'" + "".join(c if c.isprintable() else "?" for c in short) + "'"


def _show_char(ch: str) -> str:
    return f"'{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"
