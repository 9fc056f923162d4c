"""One raw row -> one canonical record, or the reason it cannot be stored."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import tzinfo
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from engine.clock import parse_timestamp
from engine.store import EVENT_TYPES, ORDER_EVENT, REFUND_EVENT

KINDS = ("customers", "orders", "refunds", "events")
CANONICAL_FIELDS: dict[str, tuple[str, ...]] = {
    "customers": (
        "customer_id",
        "name",
        "external_userid",
        "owner",
        "phone",
        "joined_at",
        "channel",
        "opted_out",
        "tags",
    ),
    "orders": ("order_id", "customer_id", "ts", "amount", "category", "sku"),
    "refunds": ("refund_id", "order_id", "customer_id", "ts", "amount"),
    "events": ("event_id", "customer_id", "type", "ts"),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id",),
    "orders": ("customer_id", "ts", "amount"),
    "refunds": ("ts", "amount"),
    "events": ("customer_id", "type", "ts"),
}
# Columns a rejects file adds; skipped when that file is fixed and loaded again.
REJECT_COLUMNS = ("reject_line", "reject_reason")
_TRUE = {"1", "true", "yes", "y", "t", "是", "true."}
_FALSE = {"0", "false", "no", "n", "f", "否", ""}
_CENT = Decimal("0.01")
_PLAIN_AMOUNT = re.compile(r"^\d{1,15}(\.\d{0,2})?$")


class RowError(ValueError):
    """A row cannot be stored; the message says why."""


@dataclass(frozen=True)
class Record:
    """A canonical row for one store table ("customers", "orders", "refunds", "events")."""

    table: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Normalizer:
    """Turns raw rows of one kind into records, with the file's own column names mapped."""

    kind: str
    mapping: dict[str, str]
    tz: tzinfo
    ts_format: str | None = None
    _columns: dict[str, str] = field(init=False, repr=False, compare=False)
    _ignored: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Resolved once per file: normalize() runs once per row.
        columns = {name: self.mapping.get(name, name) for name in CANONICAL_FIELDS[self.kind]}
        object.__setattr__(self, "_columns", columns)
        object.__setattr__(self, "_ignored", frozenset(columns.values()) | set(REJECT_COLUMNS))

    def column(self, canonical: str) -> str:
        """The file column that holds `canonical`."""
        return self._columns.get(canonical, canonical)

    def normalize(self, index: int, raw: dict[str, Any]) -> Record:
        """The canonical record for raw row number `index`; raises RowError."""
        if "__error__" in raw:
            raise RowError(str(raw["__error__"]))
        if "__extra__" in raw:
            raise RowError(f"{len(raw['__extra__'])} more values than the header has columns")
        ignored = self._ignored
        extras = {
            key: value for key, value in raw.items() if key not in ignored and not _blank(value)
        }
        get = self._getter(raw)
        if self.kind == "customers":
            return self._customer(get, raw, extras)
        if self.kind == "orders":
            return _with_id(index, "order_id", self._order(get, extras))
        if self.kind == "refunds":
            return _with_id(index, "refund_id", self._refund(get, extras))
        return self._event(index, get, extras)

    def _getter(self, raw: dict[str, Any]) -> Any:
        columns = self._columns

        def get(name: str) -> Any:
            value = raw.get(columns[name])
            if value is None or (value.__class__ is str and not value.strip()):
                return None
            return value

        return get

    def _customer(self, get: Any, raw: dict[str, Any], extras: dict[str, Any]) -> Record:
        values: dict[str, Any] = {"customer_id": _customer_id(get("customer_id"))}
        for name in ("name", "external_userid", "owner", "phone", "channel"):
            if self.column(name) in raw:
                values[name] = _text(get(name), name)
        if self.column("joined_at") in raw:
            joined = get("joined_at")
            values["joined_at"] = None if joined is None else self._time(joined, "joined_at")
        if self.column("opted_out") in raw:
            values["opted_out"] = _flag(get("opted_out"))
        if self.column("tags") in raw:
            values["tags"] = json.dumps(_tags(get("tags")), ensure_ascii=False)
        if extras:
            values["props"] = _props(extras)
        return Record("customers", values)

    def _order(self, get: Any, extras: dict[str, Any]) -> Record:
        amount = _amount(get("amount"))
        if amount < 0:
            raise RowError("negative amount (load refunds with `playbook ingest refunds`)")
        return Record(
            "orders",
            {
                "order_id": _optional_text(get("order_id"), "order_id"),
                "customer_id": _customer_id(get("customer_id")),
                "ts": self._time(get("ts"), "ts"),
                "amount_cents": amount,
                "category": _optional_text(get("category"), "category"),
                "sku": _optional_text(get("sku"), "sku"),
                "props": _props(extras) if extras else None,
            },
        )

    def _refund(self, get: Any, extras: dict[str, Any]) -> Record:
        order_id = _optional_text(get("order_id"), "order_id")
        customer = get("customer_id")
        if customer is None and order_id is None:
            raise RowError("missing customer_id (or an order_id to find the customer by)")
        return Record(
            "refunds",
            {
                "refund_id": _optional_text(get("refund_id"), "refund_id"),
                "order_id": order_id,
                # None here: the loader looks the customer up from the order.
                "customer_id": None if customer is None else _customer_id(customer),
                "ts": self._time(get("ts"), "ts"),
                "amount_cents": abs(_amount(get("amount"))),
                "props": _props(extras) if extras else None,
            },
        )

    def _event(self, index: int, get: Any, extras: dict[str, Any]) -> Record:
        type_ = get("type")
        if type_ is None:
            raise RowError("missing type")
        type_ = str(type_).strip()
        if type_ not in EVENT_TYPES:
            close = difflib.get_close_matches(type_, list(EVENT_TYPES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RowError(f"unknown event type {type_!r}{hint}")
        event_id = _optional_text(get("event_id"), "event_id")
        if type_ in (ORDER_EVENT, REFUND_EVENT):
            # An event stream may carry orders and refunds: store them in their own tables.
            inner = Normalizer(
                "orders" if type_ == ORDER_EVENT else "refunds", {}, self.tz, self.ts_format
            )
            key = "order_id" if type_ == ORDER_EVENT else "refund_id"
            raw = {**extras, "customer_id": get("customer_id"), "ts": get("ts")}
            raw.setdefault(key, event_id)
            return inner.normalize(index, raw)
        return _with_id(
            index,
            "event_id",
            Record(
                "events",
                {
                    "event_id": event_id,
                    "customer_id": _customer_id(get("customer_id")),
                    "type": type_,
                    "ts": self._time(get("ts"), "ts"),
                    "props": _props(extras) if extras else None,
                },
            ),
        )

    def _time(self, value: Any, name: str) -> int:
        if value is None:
            raise RowError(f"missing {name}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.ts_format in ("epoch", "epoch_ms"):
                return int(value // 1000) if self.ts_format == "epoch_ms" else int(value)
            raise RowError(f"{name}: {value!r} is a number; use --ts-format epoch or epoch_ms")
        try:
            return parse_timestamp(str(value), self.tz, self.ts_format)
        except ValueError as exc:
            raise RowError(f"{name}: {exc}") from exc


def _with_id(index: int, key: str, record: Record) -> Record:
    """Give an id-less row a stable id from its content and its position in the file."""
    if record.values.get(key) is not None:
        return record
    # Records of one kind always list their values in the same order.
    content = "\x1f".join([record.table, str(index), *map(repr, record.values.values())])
    digest = hashlib.blake2b(content.encode("utf-8"), digest_size=10).hexdigest()
    # Led by the time, so rows arriving in time order append to the id index rather than
    # landing at random places in it.
    return Record(record.table, {**record.values, key: f"~{record.values['ts']:011d}-{digest}"})


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _customer_id(value: Any) -> str:
    if value is None:
        raise RowError("missing customer_id")
    if isinstance(value, (bool, float | list | dict)):
        raise RowError(f"customer_id must be text or a whole number, not {value!r}")
    return str(value).strip()


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | dict):
        raise RowError(f"{name} must be text, not {type(value).__name__}")
    return str(value).strip()


def _optional_text(value: Any, name: str) -> str | None:
    return _text(value, name)


def _amount(value: Any) -> int:
    """Money as integer cents; accepts ¥/￥ and thousands separators."""
    if value is None:
        raise RowError("missing amount")
    if isinstance(value, (bool, list | dict)):
        raise RowError(f"amount: {value!r} is not a number")
    text = str(value).strip()
    if _PLAIN_AMOUNT.match(text):
        whole, _, fraction = text.partition(".")
        return int(whole) * 100 + int((fraction + "00")[:2])
    text = text.replace(",", "").replace("¥", "").replace("￥", "").strip()
    try:
        amount = Decimal(text)
    except InvalidOperation as exc:
        raise RowError(f"amount: {str(value)!r} is not a number") from exc
    if not amount.is_finite():
        raise RowError(f"amount: {str(value)!r} is not a number")
    return int((amount.quantize(_CENT, rounding=ROUND_HALF_UP) * 100).to_integral_value())


def _flag(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return int(bool(value))
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise RowError(f"opted_out: {value!r} is not true/false")


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return sorted({str(tag).strip() for tag in value if str(tag).strip()})
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RowError(f"tags: invalid JSON list: {exc.msg}") from exc
        return _tags(parsed if isinstance(parsed, list) else [parsed])
    separators = [sep for sep in ("|", ";", "，", ",") if sep in text]
    parts = text.split(separators[0]) if separators else [text]
    return sorted({part.strip() for part in parts if part.strip()})


def _props(extras: dict[str, Any]) -> str:
    return json.dumps(extras, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
