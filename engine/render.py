"""Turning rows into text for people (aligned tables) and for programs (CSV, JSONL)."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

FORMATS = ("table", "csv", "jsonl")


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def cell(value: Any) -> str:
    """A value as table text: lists comma-joined, floats trimmed, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value)
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An aligned plain-text table; numbers right-aligned."""
    text_rows = [[cell(v) for v in row] for row in rows]
    raw_rows = [list(row) for row in text_rows]
    widths = [display_width(h) for h in headers]
    for row in text_rows:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], display_width(value))
    numeric = [
        all(_is_number(r[i]) for r in raw_rows if r[i] != "") and any(r[i] for r in raw_rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, value in enumerate(values):
            pad = " " * (widths[i] - display_width(value))
            parts.append(pad + value if numeric[i] else value + pad)
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in text_rows)
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%"))
    except ValueError:
        return False
    return True


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV with a header row; lists as JSON."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(
            [
                json.dumps(v, ensure_ascii=False) if isinstance(v, list) else "" if v is None else v
                for v in row
            ]
        )
    return buffer.getvalue()


def json_line(record: dict[str, Any]) -> str:
    """One record as a JSON line (UTF-8 kept readable)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=False)


def percent(part: float, whole: float) -> float | None:
    """`part` as a percentage of `whole`, rounded to 0.1, or None when whole is 0."""
    return round(100.0 * part / whole, 1) if whole else None
