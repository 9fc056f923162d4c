"""Field types that conditions are checked and compiled against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

FieldKind = Literal["number", "string", "bool", "timestamp", "string_list", "duration"]

FIELD_KINDS: Final[frozenset[str]] = frozenset(get_args(FieldKind))


@dataclass(frozen=True, slots=True)
class FieldType:
    """The type of a field: its kind, optional enum values (strings only) and nullability."""

    kind: FieldKind
    allowed: tuple[str, ...] | None = None
    nullable: bool = True

    def __post_init__(self) -> None:
        """Reject unknown kinds and enum values on non-string kinds."""
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"unknown field kind {self.kind!r}")
        if self.allowed is not None and self.kind not in ("string", "string_list"):
            raise ValueError("allowed values only make sense for string fields")


NUMBER: Final = FieldType("number")
STRING: Final = FieldType("string")
BOOL: Final = FieldType("bool")
TIMESTAMP: Final = FieldType("timestamp")
STRING_LIST: Final = FieldType("string_list")
DURATION: Final = FieldType("duration")


def enum(*values: str, nullable: bool = True) -> FieldType:
    """Return a string field type restricted to ``values``."""
    if not values:
        raise ValueError("an enum needs at least one value")
    return FieldType("string", allowed=tuple(values), nullable=nullable)
