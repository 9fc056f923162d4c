"""Receipts: `playbook ack FILE` moves exported / sent actions to delivered or failed.

Accepted files:

- CSV with a header naming `action_id` and `status` (`delivered` or `failed`), and
  optionally `error` and `at` (ISO-8601 or epoch seconds);
- JSON (a list of such objects) or JSON Lines (one object a line);
- WeCom `externalcontact/get_groupmsg_send_result` output: an object with `detail_list`
  (each `external_userid`, `status` 0-3, `send_time`), and the `msgid` the task was created
  with (add it to the saved object, or pass `--msgid`). Status 1 is delivered; 2 (not a
  friend) and 3 (the customer already got another mass message) are failed; 0 (the staff
  member has not sent it yet) changes nothing.

A file is applied whole or not at all: any bad row is reported with its line, and nothing
is written.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.store import Store

RESULT_STATUSES = ("delivered", "failed")
ACKABLE = ("exported", "sent", "delivered", "failed")
WECOM_STATUS = {
    1: ("delivered", None),
    2: ("failed", "WeCom status 2: the customer is not the sender's friend"),
    3: ("failed", "WeCom status 3: the customer already received another mass message"),
}
MAX_PROBLEMS_SHOWN = 10


@dataclass
class AckResult:
    """What a receipts file changed."""

    file: str
    delivered: int = 0
    failed: int = 0
    unchanged: int = 0  # already in the state the receipt says
    waiting: int = 0  # WeCom status 0: not sent by the staff member yet
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stable keys)."""
        return {
            "file": self.file,
            "delivered": self.delivered,
            "failed": self.failed,
            "unchanged": self.unchanged,
            "waiting": self.waiting,
        }


@dataclass(frozen=True)
class _Receipt:
    where: str  # "file:line" for messages
    action_id: str
    status: str
    error: str | None
    at: int | None


def ack(
    store: Store, path: str | Path, *, msgid: str | None = None, now: int | None = None
) -> AckResult:
    """Apply a receipts file (see the module doc); all of it, or nothing."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputError(f"{file}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: cannot read it ({exc})") from exc
    moment = int(time.time()) if now is None else now
    problems: list[str] = []
    receipts, waiting = _parse(store, file, text, msgid, problems)
    current = _current_statuses(store, [r.action_id for r in receipts])
    for receipt in receipts:
        status = current.get(receipt.action_id)
        if status is None:
            problems.append(f"{receipt.where}: no action {receipt.action_id!r} in the queue")
        elif status not in ACKABLE:
            problems.append(
                f"{receipt.where}: action {receipt.action_id} is {status}, not exported or "
                "sent: a receipt cannot apply to it"
            )
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise InputError(
            "\n".join(shown)
            + (f"\n... and {more} more" if more else "")
            + f"\n{file}: nothing was applied; fix the file and run `playbook ack` again"
        )
    result = AckResult(file=str(file), waiting=waiting)
    with store.transaction() as conn:
        for receipt in receipts:
            if current[receipt.action_id] == receipt.status:
                result.unchanged += 1
                continue
            conn.execute(
                "UPDATE actions SET status = ?, result_at = ?, error = ? WHERE action_id = ?",
                (receipt.status, receipt.at or moment, receipt.error, receipt.action_id),
            )
            current[receipt.action_id] = receipt.status
            if receipt.status == "delivered":
                result.delivered += 1
            else:
                result.failed += 1
    return result


def _current_statuses(store: Store, ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        for action_id, status in store.conn.execute(
            f"SELECT action_id, status FROM actions WHERE action_id IN ({marks})", chunk
        ):
            found[action_id] = status
    return found


def _parse(
    store: Store, file: Path, text: str, msgid: str | None, problems: list[str]
) -> tuple[list[_Receipt], int]:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None
        if isinstance(whole, dict) and "detail_list" in whole:
            return _wecom(store, file, whole, msgid, problems)
        if isinstance(whole, dict):
            whole = [whole]
        if whole is None:  # JSON Lines
            return _records(file, _json_lines(file, text, problems), problems), 0
        return _records(file, [(f"{file}:1", r) for r in whole], problems), 0
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{file}: not valid JSON ({exc})") from exc
        return _records(
            file, [(f"{file}:item {i + 1}", r) for i, r in enumerate(rows)], problems
        ), 0
    return _records(file, _csv_rows(file, text, problems), problems), 0


def _json_lines(file: Path, text: str, problems: list[str]) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{file}:{number}", json.loads(line)))
        except ValueError as exc:
            problems.append(f"{file}:{number}: not valid JSON ({exc.args[0]})")
    return rows


def _csv_rows(file: Path, text: str, problems: list[str]) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("action_id", "status") if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(
            f"{file}:1: the header needs columns action_id and status (missing: "
            f"{', '.join(missing)}); or give JSON, or WeCom's get_groupmsg_send_result output"
        )
    return [(f"{file}:{reader.line_num}", row) for row in reader]


def _records(file: Path, rows: list[tuple[str, Any]], problems: list[str]) -> list[_Receipt]:
    receipts = []
    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with action_id and status")
            continue
        action_id = str(row.get("action_id") or "").strip()
        status = str(row.get("status") or "").strip().lower()
        if not action_id:
            problems.append(f"{where}: no action_id")
            continue
        if status not in RESULT_STATUSES:
            problems.append(
                f"{where}: status {row.get('status')!r} is not one of {', '.join(RESULT_STATUSES)}"
            )
            continue
        at = _moment(row.get("at"), where, problems)
        error = row.get("error") or None
        if status == "failed" and error is None:
            error = "failed (receipt)"
        receipts.append(_Receipt(where, action_id, status, str(error) if error else None, at))
    return receipts


def _moment(value: Any, where: str, problems: list[str]) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, int | float) or str(value).strip().isdigit():
        return int(float(value))
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        problems.append(f"{where}: 'at' {value!r} is neither ISO-8601 nor epoch seconds")
        return None
    if parsed.tzinfo is None:
        problems.append(f"{where}: 'at' {value!r} has no UTC offset (write e.g. +08:00)")
        return None
    return int(parsed.timestamp())


def _wecom(
    store: Store, file: Path, whole: dict[str, Any], msgid: str | None, problems: list[str]
) -> tuple[list[_Receipt], int]:
    task = msgid or whole.get("msgid")
    if not task:
        raise InputError(
            f'{file}: WeCom send results do not name their task: add "msgid" to the '
            "object or pass --msgid"
        )
    batches = [
        batch_id
        for batch_id, response in store.conn.execute(
            "SELECT batch_id, response FROM export_batches WHERE format = 'wecom' "
            "AND response IS NOT NULL AND instr(response, ?) > 0",
            (task,),
        )
        if _msgid(response) == task
    ]
    if not batches:
        raise InputError(f"{file}: no WeCom task {task!r} was sent from this store")
    by_contact: dict[str, str] = {}
    for batch_id in batches:
        for action_id, external in store.conn.execute(
            "SELECT a.action_id, c.external_userid FROM actions a JOIN customers c "
            "USING (customer_id) WHERE a.batch_id = ?",
            (batch_id,),
        ):
            by_contact[external] = action_id
    receipts, waiting = [], 0
    for index, detail in enumerate(whole.get("detail_list") or [], start=1):
        where = f"{file}:detail_list[{index}]"
        if not isinstance(detail, dict):
            problems.append(f"{where}: expected an object")
            continue
        external = detail.get("external_userid")
        code = detail.get("status")
        if code == 0:
            waiting += 1
            continue
        if code not in WECOM_STATUS:
            problems.append(f"{where}: status {code!r} is not 0, 1, 2 or 3")
            continue
        action_id = by_contact.get(str(external))
        if action_id is None:
            problems.append(f"{where}: {external!r} was not in task {task}")
            continue
        status, error = WECOM_STATUS[code]
        at = detail.get("send_time") or None
        receipts.append(_Receipt(where, action_id, status, error, int(at) if at else None))
    return receipts, waiting


def _msgid(response: str) -> str | None:
    try:
        value = json.loads(response).get("msgid")
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None
