"""Why did (or didn't) this customer get it? One customer, one playbook, every rule.

For each rule: each part of its condition with the customer's actual value and whether it
held (evaluated by the same SQL compiler the engine matches with), then what the policies
did — found by running the playbook exactly as `playbook run` would and rolling it back,
so the explanation can never drift from what a run does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.catalog import field_catalog
from engine.conditions.ir import And, Condition, Or, fields_used, format_condition
from engine.errors import InputError
from engine.features import build_features, iter_features
from engine.match.sql import condition_sql, fact_fields
from engine.playbook.model import Playbook, Rule
from engine.run import simulate
from engine.settings import Settings
from engine.store import Store


@dataclass(frozen=True)
class ConditionPart:
    """One part of a condition: its text, the customer's values, and whether it held."""

    text: str
    values: dict[str, Any]
    holds: bool | None  # None: unknown (a value is missing), which counts as not holding


@dataclass(frozen=True)
class RuleExplanation:
    """What happened with one rule for the customer."""

    rule_id: str
    kind: str
    condition: str | None
    holds: bool | None
    parts: list[ConditionPart]
    verdict: str
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Explanation:
    """The whole answer for one customer and one playbook."""

    customer_id: str
    playbook: str
    as_of: int
    rules: list[RuleExplanation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "customer_id": self.customer_id,
            "playbook": self.playbook,
            "as_of": self.as_of,
            "rules": [
                {
                    "rule": r.rule_id,
                    "kind": r.kind,
                    "condition": r.condition,
                    "holds": r.holds,
                    "verdict": r.verdict,
                    "parts": [
                        {"text": p.text, "values": p.values, "holds": p.holds} for p in r.parts
                    ],
                    "actions": r.actions,
                }
                for r in self.rules
            ],
        }


def explain(
    store: Store,
    settings: Settings,
    playbook: Playbook,
    customer: str,
    as_of: int,
    *,
    engine: str = "auto",
) -> Explanation:
    """Explain every rule of `playbook` for `customer` as of `as_of`."""
    features = build_features(store, settings, as_of)
    rows = list(iter_features(store, features, customer))
    if not rows:
        raise InputError(
            f"no customer {customer!r} as of that moment (not in the store, or joined later)"
        )
    row = rows[0]
    result, actions = simulate(
        store, settings, playbook, features, engine=engine, customer=customer
    )
    reports = {r.rule_id: r for r in result.rules}
    catalog = field_catalog(settings)
    explained = []
    for rule in sorted(playbook.rules, key=lambda r: r.priority):
        mine = [a for a in actions if a["rule_id"] == rule.id]
        parts, holds = [], None
        if rule.when is not None and rule.on is None:
            fields = fact_fields(catalog)
            parts = [
                _part(store, features.table, customer, atom, row, fields, settings)
                for atom in _parts(rule.when)
            ]
            holds = _holds(store, features.table, customer, rule.when, fields, settings)
        explained.append(
            RuleExplanation(
                rule.id,
                "event" if rule.on else "state",
                rule.when_text,
                holds,
                parts,
                _verdict(
                    rule, holds, mine, reports[rule.id].skipped, store, playbook.name, customer
                ),
                [
                    {
                        "type": a["type"],
                        "channel": a["channel"],
                        "status": a["status"],
                        "reason": a["reason"],
                        "detail": a["detail"],
                        "message": a["message"],
                        "scheduled_at": a["scheduled_at"],
                    }
                    for a in mine
                ],
            )
        )
    return Explanation(customer, playbook.name, as_of, explained)


def _parts(condition: Condition) -> list[Condition]:
    """The top-level parts of a condition (the terms of its outermost and / or)."""
    if isinstance(condition, And | Or):
        return list(condition.items)
    return [condition]


def _holds(
    store: Store, table: str, customer: str, condition: Condition, fields: Any, settings: Settings
) -> bool | None:
    where, values = condition_sql(condition, fields, settings.tz)
    value = store.conn.execute(
        f'SELECT ({where}) FROM temp."{table}" f WHERE f.customer_id = ?', [*values, customer]
    ).fetchone()[0]
    return None if value is None else bool(value)


def _part(
    store: Store,
    table: str,
    customer: str,
    atom: Condition,
    row: dict[str, Any],
    fields: Any,
    settings: Settings,
) -> ConditionPart:
    return ConditionPart(
        format_condition(atom),
        {name: row.get(name) for name in sorted(fields_used(atom))},
        _holds(store, table, customer, atom, fields, settings),
    )


def _verdict(
    rule: Rule,
    holds: bool | None,
    actions: list[dict[str, Any]],
    skipped: str | None,
    store: Store,
    playbook: str,
    customer: str,
) -> str:
    if skipped:
        return f"skipped: {skipped}"
    if actions:
        parts = []
        for a in actions:
            what = a["type"] + (f" ({a['channel']})" if a["channel"] else "")
            if a["status"] == "suppressed":
                parts.append(
                    f"{what}: suppressed by {a['reason']}"
                    + (f" ({a['detail']})" if a["detail"] else "")
                )
            else:
                parts.append(f"{what}: queued")
        return "; ".join(parts)
    if rule.on is not None:
        return f"no {rule.on} event of theirs in this run's window met the condition"
    if not holds:
        return "condition not met"
    state = store.conn.execute(
        "SELECT changed_at FROM rule_state WHERE playbook = ? AND rule_id = ? AND "
        "customer_id = ? AND matching = 1",
        (playbook, rule.id, customer),
    ).fetchone()
    earlier = store.conn.execute(
        "SELECT type, channel, status, reason, detail FROM actions WHERE playbook = ? AND "
        "rule_id = ? AND customer_id = ? AND decided_at = (SELECT max(decided_at) FROM "
        "actions WHERE playbook = ? AND rule_id = ? AND customer_id = ?) ORDER BY "
        "action_index",
        (playbook, rule.id, customer) * 2,
    ).fetchall()
    text = "already matching: the rule fires when a customer enters its condition"
    if state and earlier:
        decided = "; ".join(
            f"{kind}{f' ({channel})' if channel else ''}: {status}"
            + (f" by {reason}" if reason else "")
            + (f" ({detail})" if detail else "")
            for kind, channel, status, reason, detail in earlier
        )
        text += f"; when they entered: {decided}"
    return text
