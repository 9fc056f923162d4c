"""Export: due actions leave the queue for the tools that reach customers.

    pending --> exporting --> exported     (written to a file, the file safely renamed)
                          \\-> sent         (an HTTP request the receiver accepted)
                                  --> delivered / failed   (receipts: `playbook ack`)
    pending --> expired   (not sent before the rule's `expires`; never sent late)
    pending --> suppressed (platform_limit: over WeCom's per-customer monthly limit)
    pending --> failed    (the exporter cannot send it: no phone, text too long, ...)

One export at a time per store (an OS file lock beside the store, released even when the
process is killed). Due actions are snapshotted in a temp table in the exporter's order,
then go out batch by batch:

- a file: every row is written to a temporary file beside the target, which is flushed
  and fsynced; the batch (with the file's SHA-256) and its actions are recorded as
  `exporting`; the file is renamed into place; the actions become `exported`. An
  interrupted export is resolved by the next one: if the target exists with the recorded
  hash the batch is `exported`, otherwise its actions go back to `pending`.
- HTTP: the batch's exact body is stored with its actions as `exporting`, then posted
  (retries and signing: `engine.export.http`). Accepted -> `sent`. An export killed
  mid-request leaves the batch `exporting`; the next export to the same destination posts
  the same body again with the same id (the receiver can drop the duplicate) before
  anything new — at most that one batch is sent twice, and never lost.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engine.errors import StoreError, UsageError
from engine.export.model import ExportConfig, Item, Rejection, Request
from engine.store import Store

if TYPE_CHECKING:
    from engine.settings import Settings

FORMATS = ("csv", "jsonl", "wecom", "sms", "wechat_template", "tasks", "webhook")
FILE_FORMATS = ("csv", "jsonl", "wecom", "sms", "wechat_template", "tasks")
HTTP_FORMATS = ("wecom", "webhook")
MESSAGE_TYPES = ("send", "invite_group")
DUE = "export_due"
# The export's page cache: its snapshot sort of every due action would otherwise take the
# store's 256 MiB cache again per sorter thread (1M actions peaked at 629 MiB RSS).
EXPORT_CACHE_KIB = 64 * 1024
REJECTED = "export_rejected"
WECOM_ACCESS = "externalcontact/add_msg_template"

# Which actions each format carries (besides --playbook / --channel).
_SCOPE = {
    "csv": "true",
    "jsonl": "true",
    "webhook": "true",
    "wecom": "((a.channel = 'wecom' AND a.type IN ('send', 'invite_group')) OR a.type = 'tag')",
    "sms": "a.channel = 'sms'",
    "wechat_template": "a.channel = 'wechat_template'",
    "tasks": "a.type = 'task'",
}

# Customer fields, only where the action needs them: its channel's contact id, and the
# owner for WeCom (the sender) and tasks. A flat file never carries a phone number for a
# WeCom message.
_CONTACT = {
    "name": "c.name",
    "external_userid": "CASE WHEN a.channel = 'wecom' OR a.type IN ('tag', 'task') "
    "THEN c.external_userid END",
    "owner": "CASE WHEN a.channel = 'wecom' OR a.type IN ('tag', 'task') THEN c.owner END",
    "phone": "CASE WHEN a.channel = 'sms' THEN c.phone END",
    "openid": "CASE WHEN a.channel = 'wechat_template' THEN json_extract(c.props, '$.openid') END",
}

FLAT_COLUMNS = (
    "action_id",
    "playbook",
    "rule_id",
    "customer_id",
    "type",
    "channel",
    "message",
    "coupon",
    "group_name",
    "tags_added",
    "tags_removed",
    "assign_to",
    "note",
    "attachments",
    "scheduled_at",
    "expires_at",
    "name",
    "external_userid",
    "owner",
    "phone",
    "openid",
)
TASK_COLUMNS = (
    "action_id",
    "customer_id",
    "name",
    "external_userid",
    "playbook",
    "rule_id",
    "reason",
    "suggested_message",
    "scheduled_at",
    "expires_at",
)


@dataclass
class ExportResult:
    """What one export did."""

    format: str
    destination: str
    exported: int = 0  # written to files
    sent: int = 0  # accepted over HTTP
    failed: int = 0  # rejected by the exporter or by the receiver
    suppressed: int = 0  # over a platform limit
    expired: int = 0
    recovered: dict[str, int] = field(default_factory=dict)  # from an interrupted export
    batches: int = 0
    files: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # failures by reason
    stopped: str | None = None  # why the export stopped early (endpoint gone, ...)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stable keys)."""
        return {
            "format": self.format,
            "destination": self.destination,
            "exported": self.exported,
            "sent": self.sent,
            "failed": self.failed,
            "suppressed": self.suppressed,
            "expired": self.expired,
            "recovered": dict(self.recovered),
            "batches": self.batches,
            "files": list(self.files),
            "failure_reasons": dict(self.reasons.most_common()),
            "stopped": self.stopped,
            "notes": list(self.notes),
        }


def export(
    store: Store,
    settings: Settings,
    to: str,
    *,
    out: str | os.PathLike[str] | None = None,
    url: str | None = None,
    playbook: str | None = None,
    channel: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    overwrite: bool = False,
    reenable: bool = False,
    now: int | None = None,
    env: dict[str, str] | None = None,
    poster: Any = None,
) -> ExportResult:
    """Export the due pending actions to `to` (a format of FORMATS); see the module doc.

    `out` is the file (a directory for `tasks`), `url` the receiver (for `wecom`, the API
    base). `poster`: an `engine.export.http.Poster` to use (tests); one is made otherwise.
    """
    destination = _check_arguments(to, out, url, limit, overwrite)
    moment = int(time.time()) if now is None else now
    environ = dict(os.environ) if env is None else env
    config: ExportConfig = settings.export
    result = ExportResult(format=to, destination=destination)
    with _export_lock(store), store.page_cache(EXPORT_CACHE_KIB):
        result.recovered = _recover_files(store, moment)
        with store.transaction() as conn:
            if retry_failed:
                _retry_failed(conn, playbook, channel)
            result.expired = _expire(conn, moment)
        _snapshot(store, settings, to, playbook, channel, limit, moment)
        if to == "wecom":
            result.suppressed = _platform_limit(store, settings, config, moment)
            if not config.wecom.tag_ids:
                result.notes += _waiting_tags(store, moment, playbook, channel)
        if url is not None:
            _send(store, settings, to, destination, environ, poster, moment, result, reenable)
        else:
            assert out is not None
            _write_files(store, settings, to, Path(out), moment, result)
        store.conn.execute(f"DROP TABLE IF EXISTS temp.{DUE}")
    return result


# --------------------------------------------------------------------------- arguments


def _check_arguments(to: str, out: Any, url: str | None, limit: int | None, overwrite: bool) -> str:
    if to not in FORMATS:
        raise UsageError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    if out is not None and url is not None:
        raise UsageError("give either -o FILE or --url URL, not both")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    if url is not None:
        if to not in HTTP_FORMATS:
            raise UsageError(
                f"--to {to} writes files: give -o {'DIR' if to == 'tasks' else 'FILE'} "
                f"(only {' and '.join(HTTP_FORMATS)} can be posted to a --url)"
            )
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://, not {url!r}")
        return url.rstrip("/")
    if out is None:
        if to == "webhook":
            raise UsageError("--to webhook needs --url URL")
        raise UsageError(f"--to {to} needs -o {'DIR' if to == 'tasks' else 'FILE'}")
    path = Path(out)
    if to == "tasks":
        if path.exists() and not path.is_dir():
            raise UsageError(f"{path}: --to tasks writes one CSV per staff member into a directory")
    else:
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise UsageError(f"{path.parent}: no such directory")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists; choose another name or pass --overwrite")
    return str(path)


# --------------------------------------------------------------------------- the lock


@contextmanager
def _export_lock(store: Store) -> Iterator[None]:
    """One export at a time per store: an OS lock, released when the process ends."""
    if store.readonly:
        raise StoreError(f"{store.path}: opened read-only; exporting writes to the queue")
    if store.path == ":memory:":
        yield
        return
    lock_path = f"{store.path}.export-lock"
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StoreError(
                f"{store.path}: another `playbook export` is running on this store; "
                "wait for it to finish"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- queue states


def _expire(conn: Any, now: int) -> int:
    cursor = conn.execute(
        "UPDATE actions SET status = 'expired', result_at = :now, "
        "error = 'not sent before it expired' WHERE status = 'pending' "
        "AND expires_at IS NOT NULL AND expires_at <= :now",
        {"now": now},
    )
    return int(cursor.rowcount)


def _filters(playbook: str | None, channel: str | None) -> tuple[str, dict[str, Any]]:
    sql, values = "", {}
    if playbook is not None:
        sql += " AND a.playbook = :playbook"
        values["playbook"] = playbook
    if channel is not None:
        sql += " AND a.channel = :channel"
        values["channel"] = channel
    return sql, values


def _retry_failed(conn: Any, playbook: str | None, channel: str | None) -> int:
    where, values = _filters(playbook, channel)
    cursor = conn.execute(
        "UPDATE actions AS a SET status = 'pending', batch_id = NULL, error = NULL, "
        f"result_at = NULL WHERE a.status = 'failed'{where}",
        values,
    )
    return int(cursor.rowcount)


def _snapshot(
    store: Store,
    settings: Settings,
    to: str,
    playbook: str | None,
    channel: str | None,
    limit: int | None,
    now: int,
) -> None:
    """The due actions this export takes, in the exporter's order, in `temp.export_due`."""
    from engine.export import sms, wechat, wecom

    fields: Iterable[str]
    order: Iterable[str]
    if to == "wecom":
        fields, order = wecom.FIELDS, wecom.ORDER
    elif to == "sms":
        fields, order = sms.FIELDS, sms.ORDER
    elif to == "wechat_template":
        fields, order = wechat.FIELDS, wechat.ORDER
    elif to == "tasks":
        fields, order = ("name", "external_userid", "owner"), ("assign_to", "scheduled_at")
    else:
        # The queue's own order (rows were written sorted by customer, run by run): a
        # batch's rows then sit on a few neighbouring pages, so marking them is cheap.
        fields, order = tuple(_CONTACT), ("seq",)
    picked = ", ".join(
        f"{_CONTACT[name] if name in fields else 'NULL'} AS {name}" for name in _CONTACT
    )
    where, values = _filters(playbook, channel)
    scope = _SCOPE[to]
    if to == "wecom" and not settings.export.wecom.tag_ids:
        # Without tag ids, tag actions cannot become mark_tag calls: they wait (pending).
        scope = "(a.channel = 'wecom' AND a.type IN ('send', 'invite_group'))"
    columns = (
        "action_id, playbook, rule_id, customer_id, type, channel, message, coupon, "
        "group_name, tags_added, tags_removed, assign_to, note, attachments, scheduled_at, "
        "expires_at"
    )

    def sort_column(name: str) -> str:
        if name == "attachments_key":  # stored canonical: equal attachments, equal text
            return "d_attachments"
        return name if name in _CONTACT else f"d_{name}"

    order_by = ", ".join(sort_column(n) for n in (*order, "customer_id", "action_id"))
    aliased = ", ".join(f"a.{c} AS d_{c}" for c in columns.split(", "))
    picked_columns = f"{aliased}, {picked}, a.rowid AS d_seq"
    conn = store.conn
    conn.execute(f"DROP TABLE IF EXISTS temp.{DUE}")
    conn.execute(
        f"CREATE TEMP TABLE {DUE} AS SELECT * FROM (SELECT {picked_columns} "
        "FROM actions a LEFT JOIN customers c ON c.customer_id = a.customer_id "
        "WHERE a.status = 'pending' AND a.scheduled_at <= :now "
        f"AND (a.expires_at IS NULL OR a.expires_at > :now) AND {scope}{where}) "
        f"ORDER BY {order_by}" + (" LIMIT :limit" if limit is not None else ""),
        {"now": now, "limit": limit, **values},
    )
    conn.execute(f"CREATE UNIQUE INDEX temp.{DUE}_id ON {DUE} (d_action_id)")
    conn.execute(f"DROP TABLE IF EXISTS temp.{REJECTED}")
    conn.execute(
        f"CREATE TEMP TABLE {REJECTED} (action_id TEXT PRIMARY KEY, reason TEXT) WITHOUT ROWID"
    )


def _waiting_tags(store: Store, now: int, playbook: str | None, channel: str | None) -> list[str]:
    where, values = _filters(playbook, channel)
    waiting = store.conn.execute(
        "SELECT count(*) FROM actions a WHERE a.status = 'pending' AND a.type = 'tag' "
        f"AND a.scheduled_at <= :now{where}",
        {"now": now, **values},
    ).fetchone()[0]
    if not waiting:
        return []
    return [
        f"{waiting:,} tag actions stay pending: map tag names to WeCom tag ids under "
        "export.wecom.tag_ids in the settings file to export them as mark_tag calls"
    ]


def _platform_limit(store: Store, settings: Settings, config: ExportConfig, now: int) -> int:
    """WeCom lets a customer receive `monthly_limit` mass messages a calendar month: the
    ones over it (counting what was exported this month) are suppressed, not sent."""
    local = datetime.fromtimestamp(now, settings.tz)
    month = int(local.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    limit = config.wecom.monthly_limit
    conn = store.conn
    with store.transaction():
        conn.execute(
            f"INSERT INTO temp.{REJECTED} SELECT d_action_id, 'platform_limit' FROM ("
            "SELECT d.d_action_id, row_number() OVER (PARTITION BY d.d_customer_id "
            "ORDER BY d.d_scheduled_at, d.d_action_id) + (SELECT count(*) FROM actions p "
            "WHERE p.customer_id = d.d_customer_id AND p.channel = 'wecom' "
            "AND p.type IN ('send', 'invite_group') "
            "AND p.status IN ('exporting', 'exported', 'sent', 'delivered') "
            f"AND p.exported_at >= :month) AS n FROM temp.{DUE} d "
            "WHERE d.d_channel = 'wecom' AND d.d_type IN ('send', 'invite_group')) "
            "WHERE n > :limit",
            {"month": month, "limit": limit},
        )
        cursor = conn.execute(
            "UPDATE actions SET status = 'suppressed', reason = 'platform_limit', "
            "detail = :detail, result_at = :now WHERE action_id IN "
            f"(SELECT action_id FROM temp.{REJECTED} WHERE reason = 'platform_limit')",
            {
                "now": now,
                "detail": f"WeCom allows {limit} mass messages per customer a calendar month",
            },
        )
        conn.execute(
            f"DELETE FROM temp.{DUE} WHERE d_action_id IN "
            f"(SELECT action_id FROM temp.{REJECTED} WHERE reason = 'platform_limit')"
        )
        conn.execute(f"DELETE FROM temp.{REJECTED}")
    return int(cursor.rowcount)


def _items(store: Store, chunk: int = 5_000) -> Iterator[Item]:
    """The snapshot's items in order, read in chunks (no cursor stays open across writes)."""
    last = 0
    conn = store.conn
    while True:
        rows = conn.execute(
            f"SELECT rowid, * FROM temp.{DUE} WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (last, chunk),
        ).fetchall()
        if not rows:
            return
        for row in rows:
            (
                rowid,
                action_id,
                playbook,
                rule_id,
                customer_id,
                type_,
                channel,
                message,
                coupon,
                group_name,
                added,
                removed,
                assign_to,
                note,
                attachments,
                scheduled_at,
                expires_at,
                name,
                external_userid,
                owner,
                phone,
                openid,
                _seq,
            ) = row
            last = rowid
            yield Item(
                action_id=action_id,
                playbook=playbook,
                rule_id=rule_id,
                customer_id=customer_id,
                type=type_,
                channel=channel,
                message=message,
                coupon=coupon,
                group_name=group_name,
                tags_added=tuple(t for t in (added or "").split(",") if t),
                tags_removed=tuple(t for t in (removed or "").split(",") if t),
                assign_to=assign_to,
                note=note,
                scheduled_at=scheduled_at,
                expires_at=expires_at,
                attachments=tuple(json.loads(attachments)) if attachments else (),
                name=name,
                external_userid=external_userid,
                owner=owner,
                phone=phone,
                openid=openid,
            )


class _Rejections:
    """Actions an exporter cannot send, kept in a temp table (there may be millions)."""

    def __init__(self, store: Store, result: ExportResult) -> None:
        self.store, self.result = store, result
        self.pending: list[tuple[str, str]] = []

    def add(self, rejection: Rejection) -> None:
        self.pending.append((rejection.action_id, rejection.reason))
        self.result.reasons[_reason_kind(rejection.reason)] += 1
        if len(self.pending) >= 5_000:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.conn.executemany(
                f"INSERT OR REPLACE INTO temp.{REJECTED} VALUES (?, ?)", self.pending
            )
            self.pending = []

    def mark_failed(self, conn: Any, now: int) -> int:
        """In the caller's transaction: the rejected actions become `failed`."""
        self.flush()
        cursor = conn.execute(
            "UPDATE actions SET status = 'failed', result_at = :now, error = "
            f"(SELECT r.reason FROM temp.{REJECTED} r WHERE r.action_id = actions.action_id) "
            f"WHERE action_id IN (SELECT action_id FROM temp.{REJECTED}) "
            "AND status = 'pending'",
            {"now": now},
        )
        conn.execute(f"DELETE FROM temp.{REJECTED}")
        return int(cursor.rowcount)


def _reason_kind(reason: str) -> str:
    """A reason without its particulars (a quoted value, a number), for counting."""
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", reason))


# --------------------------------------------------------------------------- files


class _AtomicFile:
    """A file written beside its target, fsynced, then renamed into place."""

    def __init__(self, target: Path, batch_id: str) -> None:
        self.target = target
        self.temp = target.with_name(f".{target.name}.{batch_id}.tmp")
        self.handle: IO[bytes] = open(self.temp, "wb")  # noqa: SIM115 - closed in finish
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.hash.update(data)

    def finish(self) -> str:
        """Flush and fsync the temporary file; its SHA-256."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return self.hash.hexdigest()

    def rename(self) -> None:
        os.replace(self.temp, self.target)
        _fsync_dir(self.target.parent)

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.temp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _iso(moment: int | None, settings: Settings) -> str:
    if moment is None:
        return ""
    return datetime.fromtimestamp(moment, settings.tz).isoformat()


def flat_row(item: Item, settings: Settings) -> dict[str, Any]:
    """An action as a flat record (csv, jsonl, webhook): contact fields only where its
    channel needs them (the snapshot leaves the others empty)."""
    return {
        "action_id": item.action_id,
        "playbook": item.playbook,
        "rule_id": item.rule_id,
        "customer_id": item.customer_id,
        "type": item.type,
        "channel": item.channel,
        "message": item.message,
        "coupon": item.coupon,
        "group_name": item.group_name,
        "tags_added": list(item.tags_added),
        "tags_removed": list(item.tags_removed),
        "assign_to": item.assign_to,
        "note": item.note,
        "attachments": list(item.attachments),
        "scheduled_at": _iso(item.scheduled_at, settings),
        "expires_at": _iso(item.expires_at, settings),
        "name": item.name,
        "external_userid": item.external_userid,
        "owner": item.owner,
        "phone": item.phone,
        "openid": item.openid,
    }


def _csv_line(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode("utf-8")


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return (
            json.dumps(value, ensure_ascii=False)
            if value and isinstance(value[0], dict)
            else (",".join(value))
        )
    return "" if value is None else value


def _write_files(
    store: Store, settings: Settings, to: str, out: Path, now: int, result: ExportResult
) -> None:
    batch_id = "f_" + uuid.uuid4().hex[:24]
    rejections = _Rejections(store, result)
    files: dict[str, _AtomicFile] = {}
    written = 0
    try:
        if to == "tasks":
            out.mkdir(parents=True, exist_ok=True)
            written = _write_tasks(store, settings, out, batch_id, files, rejections)
        else:
            target = files[out.name] = _AtomicFile(out, batch_id)
            written = _write_one(store, settings, to, target, rejections, batch_id)
        hashes = {name: f.finish() for name, f in files.items()}
        with store.transaction() as conn:
            result.failed += rejections.mark_failed(conn, now)
            if written:
                conn.execute(
                    "INSERT INTO export_batches (batch_id, format, destination, status, "
                    "actions, file_sha256, created_at) VALUES (?, ?, ?, 'exporting', ?, ?, ?)",
                    (batch_id, to, str(out), written, json.dumps(hashes), now),
                )
                conn.execute(
                    "UPDATE actions SET status = 'exporting', batch_id = :batch, "
                    "exported_at = :now, attempts = attempts + 1 WHERE action_id IN "
                    f"(SELECT d_action_id FROM temp.{DUE}) AND status = 'pending'",
                    {"batch": batch_id, "now": now},
                )
        if not written:
            for handle in files.values():
                handle.discard()
            return
        for handle in files.values():
            handle.rename()
        with store.transaction() as conn:
            cursor = conn.execute(
                "UPDATE actions SET status = 'exported' WHERE batch_id = ? "
                "AND status = 'exporting'",
                (batch_id,),
            )
            conn.execute(
                "UPDATE export_batches SET status = 'exported', finished_at = ? WHERE batch_id = ?",
                (now, batch_id),
            )
        result.exported += int(cursor.rowcount)
        result.batches += 1
        result.files.extend(str(f.target) for f in files.values())
    except BaseException:
        for handle in files.values():
            if handle.temp.exists():
                handle.discard()
        raise


def _write_one(
    store: Store,
    settings: Settings,
    to: str,
    target: _AtomicFile,
    rejections: _Rejections,
    batch_id: str,
) -> int:
    """Write csv / jsonl / request-body lines; the rejected leave the snapshot. Returns how
    many actions the file carries."""
    count = 0
    if to in ("csv", "jsonl"):
        if to == "csv":
            target.write(_csv_line(FLAT_COLUMNS))
        for item in _items(store):
            row = flat_row(item, settings)
            if to == "csv":
                target.write(_csv_line(_csv_value(row[c]) for c in FLAT_COLUMNS))
            else:
                target.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
            count += 1
        return count
    for output in _requests(store, to, settings.export):
        if isinstance(output, Rejection):
            rejections.add(output)
            continue
        line = {
            "batch_id": batch_id,
            "endpoint": output.endpoint,
            "action_ids": list(output.action_ids),
            "body": output.body,
        }
        target.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
        count += len(output.action_ids)
    rejections.flush()
    _drop_rejected_from_snapshot(store)
    return count


def _drop_rejected_from_snapshot(store: Store) -> None:
    store.conn.execute(
        f"DELETE FROM temp.{DUE} WHERE d_action_id IN (SELECT action_id FROM temp.{REJECTED})"
    )


def _write_tasks(
    store: Store,
    settings: Settings,
    out: Path,
    batch_id: str,
    files: dict[str, _AtomicFile],
    rejections: _Rejections,
) -> int:
    """One CSV per staff member: the customer, why, and a suggested message."""
    count = 0
    current: _AtomicFile | None = None
    for item in _items(store):
        staff = item.assign_to
        if not staff:
            rejections.add(Rejection(item.action_id, "no staff member to assign the task to"))
            continue
        name = _file_name(staff) + ".csv"
        if current is None or current.target.name != name:
            if name in files:  # cannot happen: the snapshot is ordered by staff member
                raise AssertionError(f"tasks for {staff} are not contiguous")
            target = out / name
            if target.exists():
                raise UsageError(f"{target} exists; export tasks into an empty directory")
            current = files[name] = _AtomicFile(target, batch_id)
            current.write(_csv_line(TASK_COLUMNS))
        current.write(
            _csv_line(
                [
                    item.action_id,
                    item.customer_id,
                    item.name or "",
                    item.external_userid or "",
                    item.playbook,
                    item.rule_id,
                    item.note or "",
                    item.message or "",
                    _iso(item.scheduled_at, settings),
                    _iso(item.expires_at, settings),
                ]
            )
        )
        count += 1
    _drop_rejected_from_snapshot(store)
    return count


def _file_name(staff: str) -> str:
    """A staff id as a file name: letters, digits, '-', '_' and '.' kept; others '_'."""
    cleaned = re.sub(r"[^\w.-]", "_", staff).lstrip(".")
    return cleaned or "_"


def _requests(store: Store, to: str, config: ExportConfig) -> Iterator[Request | Rejection]:
    from engine.export import sms, wechat, wecom

    items = _items(store)
    if to == "wecom":
        return wecom.requests(items, config.wecom)
    if to == "sms":
        return sms.requests(items, config.sms)
    if to == "wechat_template":
        return wechat.requests(items, config.wechat_template)
    raise AssertionError(to)


# --------------------------------------------------------------------------- recovery


def _recover_files(store: Store, now: int) -> dict[str, int]:
    """Resolve file batches an interrupted export left `exporting`: renamed into place
    (the recorded hash matches) -> exported; otherwise the actions go back to pending."""
    counts: Counter[str] = Counter()
    batches = store.conn.execute(
        "SELECT batch_id, destination, file_sha256, format FROM export_batches "
        "WHERE status = 'exporting' AND endpoint IS NULL"
    ).fetchall()
    for batch_id, destination, hashes_text, to in batches:
        hashes: dict[str, str] = json.loads(hashes_text or "{}")
        base = Path(destination)
        folder = base if to == "tasks" else base.parent
        complete = bool(hashes) and all(
            _sha256(folder / name) == digest for name, digest in hashes.items()
        )
        with store.transaction() as conn:
            if complete:
                cursor = conn.execute(
                    "UPDATE actions SET status = 'exported' WHERE batch_id = ? "
                    "AND status = 'exporting'",
                    (batch_id,),
                )
                conn.execute(
                    "UPDATE export_batches SET status = 'exported', finished_at = ? "
                    "WHERE batch_id = ?",
                    (now, batch_id),
                )
                counts["exported"] += int(cursor.rowcount)
            else:
                cursor = conn.execute(
                    "UPDATE actions SET status = 'pending', batch_id = NULL, exported_at = NULL "
                    "WHERE batch_id = ? AND status = 'exporting'",
                    (batch_id,),
                )
                conn.execute(
                    "UPDATE export_batches SET status = 'abandoned', finished_at = ?, "
                    "error = 'interrupted before the file was in place' WHERE batch_id = ?",
                    (now, batch_id),
                )
                counts["returned_to_pending"] += int(cursor.rowcount)
        for name in hashes:
            (folder / f".{name}.{batch_id}.tmp").unlink(missing_ok=True)
    return dict(counts)


# --------------------------------------------------------------------------- HTTP


def _send(
    store: Store,
    settings: Settings,
    to: str,
    destination: str,
    environ: dict[str, str],
    poster: Any,
    now: int,
    result: ExportResult,
    reenable: bool,
) -> None:
    from engine.export import http

    config = settings.export
    conn = store.conn
    gone = conn.execute(
        "SELECT disabled_at, reason FROM endpoints WHERE url = ?", (destination,)
    ).fetchone()
    if gone is not None:
        if not reenable:
            raise UsageError(
                f"{destination} was disabled on {_iso(gone[0], settings)} ({gone[1]}); "
                "pass --reenable once the receiver is back"
            )
        with store.transaction() as tx:
            tx.execute("DELETE FROM endpoints WHERE url = ?", (destination,))
    sender = _Sender(store, settings, to, destination, environ, now, result)
    own = poster is None
    post = http.Poster(http.RetryPolicy.from_config(config.webhook)) if own else poster
    try:
        # An export interrupted mid-request left its batch in flight: the same bytes, with
        # the same id, go first.
        for batch_id, endpoint, body, ids in sender.in_flight():
            result.recovered["resent"] = result.recovered.get("resent", 0) + len(ids)
            if not sender.post(post, batch_id, endpoint, body, ids):
                return
        rejections = _Rejections(store, result)
        try:
            for output in sender.requests():
                if isinstance(output, Rejection):
                    rejections.add(output)
                    continue
                batch_id, body = sender.claim(output)
                if not sender.post(post, batch_id, output.endpoint, body, output.action_ids):
                    return
        finally:
            with store.transaction() as tx:
                result.failed += rejections.mark_failed(tx, now)
    finally:
        if own:
            post.close()


class _Sender:
    """Posting one export's batches: claim, post, record the outcome."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        to: str,
        destination: str,
        environ: dict[str, str],
        now: int,
        result: ExportResult,
    ) -> None:
        from engine.export import http

        self.store, self.settings, self.to = store, settings, to
        self.destination, self.now, self.result = destination, now, result
        config = settings.export
        self.key: bytes | None = None
        self.token: str | None = None
        if to == "webhook":
            secret = environ.get(config.webhook.secret_env)
            if not secret:
                raise UsageError(
                    f"set {config.webhook.secret_env} to the endpoint's signing secret "
                    "(whsec_...): webhooks are always signed"
                )
            self.key = http.decode_secret(secret)
        else:
            self.token = environ.get(config.wecom.token_env)
            if not self.token:
                raise UsageError(
                    f"set {config.wecom.token_env} to a WeCom access token (the token is "
                    "read from the environment, never from a playbook)"
                )

    def in_flight(self) -> Iterator[tuple[str, str, bytes, tuple[str, ...]]]:
        conn = self.store.conn
        rows = conn.execute(
            "SELECT batch_id, destination, endpoint, body FROM export_batches "
            "WHERE status = 'exporting' AND endpoint IS NOT NULL AND format = ? "
            "ORDER BY created_at, batch_id",
            (self.to,),
        ).fetchall()
        for batch_id, destination, endpoint, body in rows:
            if destination != self.destination:
                elsewhere = self.result.recovered
                elsewhere["in_flight_elsewhere"] = elsewhere.get("in_flight_elsewhere", 0) + 1
                continue
            ids = tuple(
                r[0]
                for r in conn.execute(
                    "SELECT action_id FROM actions WHERE batch_id = ? AND status = 'exporting' "
                    "ORDER BY action_id",
                    (batch_id,),
                )
            )
            yield batch_id, endpoint, bytes(body), ids

    def requests(self) -> Iterator[Request | Rejection]:
        if self.to == "wecom":
            return _requests(self.store, "wecom", self.settings.export)
        return self._webhook_requests()

    def _webhook_requests(self) -> Iterator[Request]:
        size = self.settings.export.webhook.batch_size
        batch: list[dict[str, Any]] = []
        for item in _items(self.store):
            batch.append(flat_row(item, self.settings))
            if len(batch) >= size:
                yield self._webhook_request(batch)
                batch = []
        if batch:
            yield self._webhook_request(batch)

    def _webhook_request(self, rows: list[dict[str, Any]]) -> Request:
        ids = tuple(r["action_id"] for r in rows)
        return Request(endpoint="", body={"actions": rows}, action_ids=ids)

    def claim(self, request: Request) -> tuple[str, bytes]:
        """Record the batch (its exact body) and its actions as in flight."""
        digest = hashlib.sha256(
            "\x1f".join((self.to, self.destination, request.endpoint, *request.action_ids)).encode()
        ).hexdigest()
        batch_id = f"msg_{digest[:32]}"
        payload = dict(request.body)
        if self.to == "webhook":
            payload = {"batch_id": batch_id, **payload}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with self.store.transaction() as conn:
            conn.execute(
                # The same actions again after a refusal (410, 4xx, --retry-failed) make
                # the same batch: it was not taken, so it goes again under its id.
                "INSERT INTO export_batches (batch_id, format, destination, endpoint, status, "
                "actions, body, created_at) VALUES (?, ?, ?, ?, 'exporting', ?, ?, ?) "
                "ON CONFLICT (batch_id) DO UPDATE SET status = 'exporting', "
                "body = excluded.body, created_at = excluded.created_at, finished_at = NULL, "
                "http_status = NULL, error = NULL, response = NULL",
                (
                    batch_id,
                    self.to,
                    self.destination,
                    request.endpoint,
                    len(request.action_ids),
                    body,
                    self.now,
                ),
            )
            conn.executemany(
                "UPDATE actions SET status = 'exporting', batch_id = ?, exported_at = ?, "
                "attempts = attempts + 1 WHERE action_id = ? AND status = 'pending'",
                ((batch_id, self.now, a) for a in request.action_ids),
            )
        return batch_id, body

    def post(
        self, poster: Any, batch_id: str, endpoint: str, body: bytes, ids: tuple[str, ...]
    ) -> bool:
        """Post one batch and record what came of it; False: stop the export."""
        from engine.export import http

        if self.to == "webhook":
            key = self.key
            assert key is not None
            url = self.destination

            def headers() -> dict[str, str]:
                assert key is not None
                return http.webhook_headers(key, batch_id, body, int(time.time()))

            outcome = poster.send(url, body, headers, idempotency_id=batch_id)
        else:
            url = f"{self.destination}/{endpoint}?access_token={self.token}"
            outcome = poster.send(
                url,
                body,
                {"content-type": "application/json"},
                idempotency_id=batch_id,
                check=http.wecom_result,
            )
        return self._record(batch_id, endpoint, ids, outcome)

    def _record(self, batch_id: str, endpoint: str, ids: tuple[str, ...], outcome: Any) -> bool:
        result, now = self.result, self.now
        response = outcome.response.decode("utf-8", "replace") if outcome.response else None
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE export_batches SET attempts = attempts + ?, http_status = ?, "
                "error = ?, response = ? WHERE batch_id = ?",
                (outcome.attempts, outcome.http_status, outcome.error, response, batch_id),
            )
            if outcome.status == "accepted":
                refused = self._refused(endpoint, ids, response)
                cursor = conn.execute(
                    "UPDATE actions SET status = 'sent', error = NULL WHERE batch_id = ? "
                    "AND status = 'exporting'",
                    (batch_id,),
                )
                sent = int(cursor.rowcount)
                if refused:
                    conn.executemany(
                        "UPDATE actions SET status = 'failed', result_at = ?, error = ? "
                        "WHERE action_id = ? AND batch_id = ?",
                        (
                            (now, "WeCom did not take this customer (fail_list)", a, batch_id)
                            for a in refused
                        ),
                    )
                    sent -= len(refused)
                    result.failed += len(refused)
                    result.reasons["WeCom fail_list"] += len(refused)
                conn.execute(
                    "UPDATE export_batches SET status = 'sent', body = NULL, finished_at = ? "
                    "WHERE batch_id = ?",
                    (now, batch_id),
                )
                result.sent += sent
                result.batches += 1
                return True
            if outcome.status == "gone":
                conn.execute(
                    "UPDATE actions SET status = 'pending', batch_id = NULL, "
                    "exported_at = NULL WHERE batch_id = ? AND status = 'exporting'",
                    (batch_id,),
                )
                conn.execute(
                    "UPDATE export_batches SET status = 'failed', finished_at = ? "
                    "WHERE batch_id = ?",
                    (now, batch_id),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO endpoints (url, disabled_at, reason) VALUES (?, ?, ?)",
                    (self.destination, now, "410 Gone"),
                )
                result.stopped = (
                    f"{self.destination} answered 410 Gone: it is disabled and nothing more is "
                    "posted to it (the batch's actions stay pending); pass --reenable once it "
                    "is back"
                )
                return False
            if outcome.retryable:
                # Unresolved: the batch stays in flight, and goes again (same id) first thing
                # in the next export to this destination.
                result.stopped = (
                    f"{self.destination} did not accept a batch after {outcome.attempts} "
                    f"attempts ({outcome.error}); its {len(ids)} actions stay in flight and "
                    "are sent again, with the same id, by the next export"
                )
                return False
            cursor = conn.execute(
                "UPDATE actions SET status = 'failed', result_at = ?, error = ? "
                "WHERE batch_id = ? AND status = 'exporting'",
                (now, outcome.error, batch_id),
            )
            conn.execute(
                "UPDATE export_batches SET status = 'failed', finished_at = ?, body = NULL "
                "WHERE batch_id = ?",
                (now, batch_id),
            )
            failed = int(cursor.rowcount)
            result.failed += failed
            result.reasons[_reason_kind(outcome.error or "refused")] += failed
            if outcome.http_status in (401, 403):
                result.stopped = f"{self.destination} refused the credentials: {outcome.error}"
                return False
            return True

    def _refused(self, endpoint: str, ids: tuple[str, ...], response: str | None) -> list[str]:
        """WeCom's fail_list: the external_userids of a task it did not take."""
        if self.to != "wecom" or endpoint != WECOM_ACCESS or not response:
            return []
        try:
            fail_list = json.loads(response).get("fail_list") or []
        except (ValueError, AttributeError):
            return []
        if not fail_list:
            return []
        wanted = set(fail_list)
        refused = []
        for chunk_start in range(0, len(ids), 500):
            chunk = ids[chunk_start : chunk_start + 500]
            marks = ", ".join("?" for _ in chunk)
            for action_id, external in self.store.conn.execute(
                f"SELECT a.action_id, c.external_userid FROM actions a JOIN customers c "
                f"USING (customer_id) WHERE a.action_id IN ({marks})",
                chunk,
            ):
                if external in wanted:
                    refused.append(action_id)
        return refused
