"""Writing normalised rows into the store: batched, idempotent, rejects kept."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import IO, Any

from engine.errors import InputError, UsageError
from engine.ingest.normalize import (
    CANONICAL_FIELDS,
    KINDS,
    REJECT_COLUMNS,
    REQUIRED_FIELDS,
    Normalizer,
    Record,
    RowError,
)
from engine.ingest.read import ByteCounter, FileReader, detect_format
from engine.store import Store

SHOWN_REJECTS = 5
_CUSTOMER_COLUMNS = (
    "name",
    "external_userid",
    "owner",
    "phone",
    "joined_at",
    "channel",
    "opted_out",
    "tags",
)
_INSERTS = {
    "orders": "INSERT OR IGNORE INTO orders (order_id, customer_id, ts, amount_cents, category, "
    "sku, props) VALUES (:order_id, :customer_id, :ts, :amount_cents, :category, :sku, "
    ":props)",
    "refunds": "INSERT OR IGNORE INTO refunds (refund_id, order_id, customer_id, ts, "
    "amount_cents, props) VALUES (:refund_id, :order_id, :customer_id, :ts, "
    ":amount_cents, :props)",
    "events": "INSERT OR IGNORE INTO events (event_id, customer_id, type, ts, props) VALUES "
    "(:event_id, :customer_id, :type, :ts, :props)",
}
_AUTO_CUSTOMER = "INSERT OR IGNORE INTO customers (customer_id, auto_created) VALUES (?, 1)"


@dataclass(frozen=True)
class IngestOptions:
    """How to read one file."""

    format: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    ts_format: str | None = None
    tz: tzinfo | None = None
    encoding: str = "utf-8-sig"
    batch_size: int = 10_000
    rejects_path: str | None = None


@dataclass(frozen=True)
class Reject:
    """A row that was not stored, and why."""

    line: int
    reason: str
    values: dict[str, Any]


@dataclass
class IngestResult:
    """What one ingest did."""

    kind: str
    file: str
    rows_read: int = 0
    added: int = 0
    updated: int = 0
    customers_created: int = 0
    rejected: int = 0
    first_rejects: list[Reject] = field(default_factory=list)
    rejects_path: str | None = None
    interrupted: bool = False

    @property
    def unchanged(self) -> int:
        """Rows that were already in the store exactly as given."""
        return self.rows_read - self.rejected - self.added - self.updated


def parse_mapping(pairs: list[str] | tuple[str, ...], kind: str) -> dict[str, str]:
    """Turn `field=column` pairs into a mapping, checking the field names."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise UsageError(f"--map {pair!r}: write it as field=column, e.g. customer_id=会员编号")
        if name not in CANONICAL_FIELDS[kind]:
            raise UsageError(
                f"--map {pair!r}: {kind} have no field {name!r}; they have "
                f"{', '.join(CANONICAL_FIELDS[kind])}"
            )
        mapping[name] = column
    return mapping


def ingest_file(
    store: Store,
    kind: str,
    path: str | Path,
    options: IngestOptions,
    progress: Callable[[ByteCounter], None] | None = None,
) -> IngestResult:
    """Load one file of `kind` into the store; see the package docstring."""
    if kind not in KINDS:
        raise UsageError(f"cannot ingest {kind!r}; choose one of {', '.join(KINDS)}")
    if options.tz is None:
        raise UsageError("a timezone is required")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reader = FileReader(path, detect_format(path, options.format), options.encoding)
    normalizer = Normalizer(kind, options.mapping, options.tz, options.ts_format)
    result = IngestResult(kind=kind, file=str(path))
    log_id = _log_start(store, kind, path)
    rejects = _RejectsFile(
        options.rejects_path or _default_rejects_path(path, reader.format), reader.format
    )
    batch: list[Record] = []
    try:
        for raw in reader.rows():
            if result.rows_read == 0 and reader.header is not None:
                _check_header(reader.header, kind, options.mapping, path)
            result.rows_read += 1
            try:
                batch.append(normalizer.normalize(raw.index, raw.values))
            except RowError as exc:
                _reject(result, rejects, Reject(raw.line, str(exc), raw.values))
            if len(batch) >= options.batch_size:
                _write_batch(store, batch, result, rejects)
                batch = []
                if progress:
                    progress(reader.counter)
        if batch:
            _write_batch(store, batch, result, rejects)
        if progress:
            progress(reader.counter)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        rejects.close()
        _log_finish(store, log_id, result)
    result.rejects_path = rejects.path if result.rejected else None
    if not result.rejected and options.rejects_path is None:
        rejects.remove_stale()
    return result


def _check_header(header: list[str], kind: str, mapping: dict[str, str], path: Path) -> None:
    for name, column in mapping.items():
        if column not in header:
            raise InputError(
                f"{path}: --map {name}={column}: no column {column!r}; the file "
                f"has {', '.join(header)}"
            )
    missing = [name for name in REQUIRED_FIELDS[kind] if mapping.get(name, name) not in header]
    if missing:
        hint = "; map them with --map field=column" if header else ""
        raise InputError(
            f"{path}: no {', '.join(missing)} column (the file has "
            f"{', '.join(header) or 'no columns'}){hint}"
        )


def _write_batch(
    store: Store, batch: list[Record], result: IngestResult, rejects: _RejectsFile
) -> None:
    """Write one batch in one transaction: all of it lands, or none."""
    with store.transaction() as conn:
        for table in ("customers", "orders", "refunds", "events"):
            records = [r.values for r in batch if r.table == table]
            if not records:
                continue
            if table == "customers":
                _upsert_customers(conn, records, result)
                continue
            if table == "refunds":
                records = _resolve_refund_customers(conn, records, result, rejects)
            before = conn.total_changes
            conn.executemany(_AUTO_CUSTOMER, [(r["customer_id"],) for r in records])
            result.customers_created += conn.total_changes - before
            before = conn.total_changes
            conn.executemany(_INSERTS[table], records)
            result.added += conn.total_changes - before


def _upsert_customers(
    conn: sqlite3.Connection, records: list[dict[str, Any]], result: IngestResult
) -> None:
    """Insert new customers; update only the columns the file gives, only if they differ."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(k for k in record if k != "customer_id"), []).append(record)
    for columns, rows in groups.items():
        names = ("customer_id", *columns)
        updates = [
            f"{c} = json_patch(coalesce(customers.props, '{{}}'), excluded.props)"
            if c == "props"
            else f"{c} = excluded.{c}"
            for c in columns
        ]
        changed = [
            "json_patch(coalesce(customers.props, '{}'), excluded.props) "
            "IS NOT json(coalesce(customers.props, '{}'))"
            if c == "props"
            else f"customers.{c} IS NOT excluded.{c}"
            for c in columns
        ]
        sql = (
            f"INSERT INTO customers ({', '.join(names)}) "
            f"VALUES ({', '.join(':' + n for n in names)}) ON CONFLICT (customer_id) DO "
        )
        if columns:
            sql += (
                f"UPDATE SET {', '.join(updates)}, auto_created = 0 "
                f"WHERE customers.auto_created = 1 OR {' OR '.join(changed)}"
            )
        else:
            sql += "UPDATE SET auto_created = 0 WHERE customers.auto_created = 1"
        count_before = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        before = conn.total_changes
        conn.executemany(sql, rows)
        created = conn.execute("SELECT count(*) FROM customers").fetchone()[0] - count_before
        result.added += created
        result.updated += conn.total_changes - before - created


def _resolve_refund_customers(
    conn: sqlite3.Connection,
    records: list[dict[str, Any]],
    result: IngestResult,
    rejects: _RejectsFile,
) -> list[dict[str, Any]]:
    kept = []
    for record in records:
        if record["customer_id"] is None:
            row = conn.execute(
                "SELECT customer_id FROM orders WHERE order_id = ?", (record["order_id"],)
            ).fetchone()
            if row is None:
                _reject(
                    result,
                    rejects,
                    Reject(
                        0,
                        f"order {record['order_id']!r} is not in "
                        "the store and no customer_id is given",
                        dict(record),
                    ),
                )
                continue
            record = {**record, "customer_id": row[0]}
        kept.append(record)
    return kept


def _reject(result: IngestResult, rejects: _RejectsFile, reject: Reject) -> None:
    result.rejected += 1
    if len(result.first_rejects) < SHOWN_REJECTS:
        result.first_rejects.append(reject)
    rejects.write(reject)


def _default_rejects_path(path: Path, fmt: str) -> str:
    suffix = ".jsonl" if fmt == "jsonl" else ".csv"
    return str(path.with_name(f"{path.stem}.rejects{suffix}"))


class _RejectsFile:
    """Every rejected row, with its line and reason, in the input's own format."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.jsonl = fmt == "jsonl"
        self._handle: IO[str] | None = None
        self._csv: csv.DictWriter[str] | None = None

    def write(self, reject: Reject) -> None:
        values = {k: v for k, v in reject.values.items() if not k.startswith("__")}
        row = {REJECT_COLUMNS[0]: reject.line, REJECT_COLUMNS[1]: reject.reason, **values}
        if self._handle is None:
            try:
                self._handle = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise InputError(f"cannot write the rejects file {self.path}: {exc}") from exc
        if self.jsonl:
            self._handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return
        if self._csv is None:
            self._csv = csv.DictWriter(self._handle, fieldnames=list(row), extrasaction="ignore")
            self._csv.writeheader()
        self._csv.writerow(row)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def remove_stale(self) -> None:
        """Remove a rejects file left by an earlier load of the same file."""
        Path(self.path).unlink(missing_ok=True)


def _log_start(store: Store, kind: str, path: Path) -> int:
    with store.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO ingest_log (kind, file, started_at, status) VALUES (?, ?, ?, 'running')",
            (kind, str(path), int(time.time())),
        )
        return int(cursor.lastrowid or 0)


def _log_finish(store: Store, log_id: int, result: IngestResult) -> None:
    status = "interrupted" if result.interrupted else "done"
    with store.transaction() as conn:
        conn.execute(
            "UPDATE ingest_log SET finished_at = ?, rows_read = ?, rows_added = ?, "
            "rows_rejected = ?, status = ? WHERE id = ?",
            (int(time.time()), result.rows_read, result.added, result.rejected, status, log_id),
        )
