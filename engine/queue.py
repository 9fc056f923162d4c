"""Reading the action queue: rows for people and exporters, and counts for a summary."""

from __future__ import annotations

from typing import Any

from engine.store import Store

QUEUE_COLUMNS = (
    "action_id",
    "playbook",
    "rule_id",
    "customer_id",
    "type",
    "channel",
    "status",
    "reason",
    "scheduled_at",
    "message",
    "error",
)
_FILTERS = ("status", "playbook")


def _where(**filters: str | None) -> tuple[str, list[Any]]:
    clauses, values = [], []
    for name, value in filters.items():
        if value is not None and name in _FILTERS:
            clauses.append(f"{name} = ?")
            values.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", values


def list_actions(
    store: Store,
    *,
    status: str | None = None,
    playbook: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Queued actions, oldest decision first."""
    where, values = _where(status=status, playbook=playbook)
    sql = (
        f"SELECT * FROM actions{where} ORDER BY decided_at, playbook, rule_id, customer_id, "
        "action_index"
    )
    if limit is not None:
        sql += " LIMIT ?"
        values.append(limit)
    cursor = store.conn.execute(sql, values)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def queue_summary(
    store: Store, *, status: str | None = None, playbook: str | None = None
) -> list[dict[str, Any]]:
    """Counts of actions by playbook, status, suppression reason and channel."""
    where, values = _where(status=status, playbook=playbook)
    cursor = store.conn.execute(
        "SELECT playbook, status, reason, coalesce(channel, type) AS channel, "
        f"count(*) AS actions FROM actions{where} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        values,
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]
