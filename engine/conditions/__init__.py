"""Condition-expression language of the rules engine.

Parse operator-written conditions (``lifecycle == "sleeping" and total_spend > 500``) into a
typed IR, check them against field types, and compile them to parameterised SQLite SQL.
"""

from .check import ConditionProblem, check_condition
from .errors import ConditionSyntaxError
from .ir import (
    And,
    Atom,
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
    Not,
    Or,
    Span,
    fields_used,
    format_condition,
    format_literal,
    to_nnf,
)
from .parser import MAX_DEPTH, MAX_LENGTH, parse_condition
from .sql import SqlCompileError, SqlField, compile_to_sql
from .types import (
    BOOL,
    DURATION,
    NUMBER,
    STRING,
    STRING_LIST,
    TIMESTAMP,
    FieldKind,
    FieldType,
    enum,
)

__all__ = [
    "BOOL",
    "DURATION",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "NUMBER",
    "STRING",
    "STRING_LIST",
    "TIMESTAMP",
    "And",
    "Atom",
    "Between",
    "BoolTest",
    "Compare",
    "CompareOp",
    "Condition",
    "ConditionProblem",
    "ConditionSyntaxError",
    "Contains",
    "Field",
    "FieldKind",
    "FieldType",
    "InList",
    "IsNull",
    "Literal",
    "LiteralKind",
    "Not",
    "Or",
    "Span",
    "SqlCompileError",
    "SqlField",
    "check_condition",
    "compile_to_sql",
    "enum",
    "fields_used",
    "format_condition",
    "format_literal",
    "parse_condition",
    "to_nnf",
]
