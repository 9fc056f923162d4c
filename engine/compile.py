"""What a playbook becomes: per rule, the SQL WHERE and the durable-rules pattern.

Both come from the same condition IR (`engine.conditions`); `playbook compile` shows them
side by side so an operator (or a reviewer) can see exactly what will run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.catalog import field_catalog, source_fields
from engine.conditions.types import FieldType
from engine.match.sql import condition_sql, fact_fields
from engine.playbook.model import Playbook
from engine.settings import Settings


@dataclass(frozen=True)
class CompiledRule:
    """One rule's SQL (over the features or event-facts table) and its bound values."""

    rule_id: str
    on: str | None
    sql: str
    values: list[Any]


@dataclass(frozen=True)
class CompiledPlaybook:
    """A playbook's rules compiled for both engines."""

    playbook: Playbook
    rules: list[CompiledRule]
    rulesets: dict[str, Any]

    def render(self) -> str:
        """Human-readable listing: SQL per rule, then the rulesets as JSON."""
        lines = [
            f"-- {self.playbook.name} v{self.playbook.version} ({self.playbook.content_hash[:12]})",
            "",
        ]
        for rule in self.rules:
            source = f"event facts of {rule.on}" if rule.on else "features"
            lines.append(f"-- rule {rule.rule_id} (over {source})")
            lines.append(f"WHERE {rule.sql}")
            if rule.values:
                lines.append(f"-- values: {json.dumps(rule.values, ensure_ascii=False)}")
            lines.append("")
        lines.append("-- durable-rules rulesets")
        lines.append(json.dumps(self.rulesets, ensure_ascii=False, indent=2))
        return "\n".join(lines)


def compile_playbook(playbook: Playbook, settings: Settings) -> CompiledPlaybook:
    """Compile every rule of `playbook` to SQL and to durable-rules rulesets."""
    from engine.match.durable import compile_rulesets

    tz = settings.tz
    catalog = field_catalog(settings)
    rules = []
    rulesets: dict[str, Any] = {}
    for rule in playbook.rules:
        sql, values = condition_sql(rule.when, fact_fields(catalog, rule.on), tz)
        rules.append(CompiledRule(rule.id, rule.on, sql, values))
    for event in sorted({r.on or "" for r in playbook.rules}):
        types: dict[str, FieldType] = {name: info.type for name, info in catalog.items()}
        if event:
            types.update({f"event.{k}": v.type for k, v in source_fields(event).items()})
        chosen = [(r.id, r.when) for r in playbook.rules if (r.on or "") == event]
        name = f"{playbook.name}.{event or 'state'}"
        rulesets.update(compile_rulesets(name, chosen, types, tz))
    return CompiledPlaybook(playbook, rules, rulesets)
