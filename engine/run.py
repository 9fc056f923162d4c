"""Running playbooks: match -> decide -> enqueue, one transaction per playbook.

State rules (no `on:`) fire when a customer *enters* their condition: `rule_state` keeps
who matched at the rule's previous evaluation and counts entry episodes, and the episode
is the action's trigger. Event rules fire once per event that arrived since the playbook's
previous run (`event_cursor`; on its first run, since `--since`, default 24 hours back),
judged on the customer's features as of right after the event.

By default state rules are matched in SQL and event rules by durable-rules; `engine="sql"`
or `"rules"` uses one engine for everything. Either way the candidates go through the same
policies (`engine.decide`) and into the same queue.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.catalog import field_catalog, source_fields, source_table
from engine.clock import DAY, get_timezone, local_day
from engine.conditions.ir import fields_used
from engine.decide import CANDIDATES, REASONS, RunDecider
from engine.errors import UsageError
from engine.features import (
    FeatureTable,
    build_features,
    build_point_features,
    decode_rows,
    iter_features,
)
from engine.match.sql import condition_sql, fact_fields, match_sql
from engine.playbook.model import Playbook, Rule
from engine.playbook.templates import render
from engine.settings import Settings
from engine.store import Store

ENGINES = ("auto", "sql", "rules")
DEFAULT_SINCE = DAY
EVENT_FACTS = "event_facts"


@dataclass(frozen=True)
class RuleReport:
    """What one rule did in a run."""

    rule_id: str
    kind: str  # "state" or "event"
    matched: int
    queued: int
    suppressed: dict[str, int]
    skipped: str | None = None


@dataclass(frozen=True)
class RunResult:
    """What one playbook's run did."""

    run_id: str
    playbook: str
    version: int
    as_of: int
    since: int
    engine: str
    rules: list[RuleReport] = field(default_factory=list)

    @property
    def queued(self) -> int:
        """Actions queued by the run."""
        return sum(r.queued for r in self.rules)

    @property
    def suppressed(self) -> int:
        """Matches recorded as suppressed, with a reason."""
        return sum(sum(r.suppressed.values()) for r in self.rules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stable keys)."""
        return {
            "run_id": self.run_id,
            "playbook": self.playbook,
            "version": self.version,
            "as_of": self.as_of,
            "since": self.since,
            "engine": self.engine,
            "queued": self.queued,
            "suppressed": self.suppressed,
            "rules": [
                {
                    "rule": r.rule_id,
                    "kind": r.kind,
                    "matched": r.matched,
                    "queued": r.queued,
                    "suppressed": r.suppressed,
                    "skipped": r.skipped,
                }
                for r in self.rules
            ],
        }


def run_playbooks(
    store: Store,
    settings: Settings,
    playbooks: Sequence[Playbook],
    *,
    as_of: int,
    engine: str = "auto",
    since: int | None = None,
) -> list[RunResult]:
    """Run each playbook against the store as of `as_of`; see the module docstring."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    features = build_features(store, settings, as_of)
    seen = _data_version(store)
    results = []
    for playbook in playbooks:
        with store.transaction() as conn:
            # Features are built before the write lock is taken (so the build can use
            # every core). If another command committed meanwhile — another run tagging
            # customers — bring the tags up to date before deciding anything on them.
            if _data_version(store) != seen:
                conn.execute(
                    f'UPDATE temp."{features.table}" SET tags = (SELECT c.tags FROM '
                    "customers c WHERE c.customer_id = "
                    f'temp."{features.table}".customer_id)'
                )
            results.append(_execute(store, conn, settings, playbook, features, engine, since))
        seen = _data_version(store)
    return results


def _data_version(store: Store) -> int:
    """Changes whenever another connection commits to the store."""
    return int(store.conn.execute("PRAGMA data_version").fetchone()[0])


class _Rollback(Exception):
    """Raised to undo a simulated run."""


def simulate(
    store: Store,
    settings: Settings,
    playbook: Playbook,
    features: FeatureTable,
    *,
    engine: str = "auto",
    since: int | None = None,
    customer: str | None = None,
) -> tuple[RunResult, list[dict[str, Any]]]:
    """Run a playbook exactly as `run` would, then undo every write.

    Returns the result and the action rows the run would have written (only `customer`'s,
    if given). The store must be writable: the run happens, inside a transaction that is
    rolled back.
    """
    captured: dict[str, Any] = {}
    try:
        with store.transaction() as conn:
            result = _execute(store, conn, settings, playbook, features, engine, since)
            sql = "SELECT * FROM actions WHERE run_id = ?"
            args: list[Any] = [result.run_id]
            if customer is not None:
                sql += " AND customer_id = ?"
                args.append(customer)
            cursor = conn.execute(sql + " ORDER BY rule_id, trigger, action_index", args)
            names = [d[0] for d in cursor.description]
            captured["rows"] = [dict(zip(names, row, strict=True)) for row in cursor]
            captured["result"] = result
            raise _Rollback
    except _Rollback:
        pass
    return captured["result"], captured["rows"]


def _execute(
    store: Store,
    conn: Any,
    settings: Settings,
    playbook: Playbook,
    features: FeatureTable,
    engine: str,
    since: int | None,
) -> RunResult:
    as_of = features.as_of
    tz = settings.tz if playbook.timezone is None else get_timezone(playbook.timezone)
    run_id = uuid.uuid4().hex
    cursor = conn.execute(
        "SELECT until FROM event_cursor WHERE playbook = ?", (playbook.name,)
    ).fetchone()
    start = cursor[0] if cursor else (since if since is not None else as_of - DEFAULT_SINCE)
    conn.execute(
        "INSERT INTO runs (run_id, playbook, version, content_hash, as_of, since, "
        "engine, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            playbook.name,
            playbook.version,
            playbook.content_hash,
            as_of,
            start,
            engine,
            int(time.time()),
        ),
    )
    decider = RunDecider(conn, playbook, run_id, as_of, tz)
    runner = _Runner(store, settings, playbook, features, engine, decider, tz)
    reports = [
        runner.rule(rule, start) for rule in sorted(playbook.rules, key=lambda r: r.priority)
    ]
    runner.render_messages()
    conn.execute(
        "INSERT INTO event_cursor (playbook, until) VALUES (?, ?) ON CONFLICT "
        "(playbook) DO UPDATE SET until = max(until, excluded.until)",
        (playbook.name, as_of),
    )
    result = RunResult(run_id, playbook.name, playbook.version, as_of, start, engine, reports)
    conn.execute(
        "UPDATE runs SET finished_at = ?, counts = ? WHERE run_id = ?",
        (int(time.time()), json.dumps(result.to_dict()["rules"]), run_id),
    )
    return result


class _Runner:
    """Matches one playbook's rules and feeds the candidates to the decider."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        playbook: Playbook,
        features: FeatureTable,
        engine: str,
        decider: RunDecider,
        tz: Any,
    ) -> None:
        self.store, self.conn = store, store.conn
        self.settings, self.playbook, self.features = settings, playbook, features
        self.engine, self.decider, self.tz = engine, decider, tz
        self.catalog = field_catalog(settings)
        self.event_tables: dict[str, str] = {}
        self.tagged: set[str] = set()  # customers whose tags this run changed
        self.state_matches: dict[str, set[str]] | None = None

    def rule(self, rule: Rule, start: int) -> RuleReport:
        kind = "event" if rule.on else "state"
        skipped = self._skipped(rule)
        if skipped:
            return RuleReport(rule.id, kind, 0, 0, {}, skipped)
        RunDecider.new_candidates(self.conn)
        if rule.on is None:
            matched = self._state_candidates(rule)
        else:
            matched = self._event_candidates(rule, start)
        counts = self.decider.decide(rule)
        self._apply_tags(rule)
        return RuleReport(
            rule.id,
            kind,
            matched,
            counts.get("pending", 0),
            {r: counts[r] for r in REASONS if counts.get(r)},
        )

    def _skipped(self, rule: Rule) -> str | None:
        if not rule.enabled:
            return "disabled"
        day = local_day(self.features.as_of, self.tz).isoformat()
        if rule.start and day < rule.start:
            return f"starts {rule.start}"
        if rule.end and day > rule.end:
            return f"ended {rule.end}"
        return None

    # -- state rules ---------------------------------------------------------------------

    def _state_candidates(self, rule: Rule) -> int:
        table = self.features.table
        conn, name, as_of = self.conn, self.playbook.name, self.features.as_of
        conn.execute("DROP TABLE IF EXISTS temp.matched")
        conn.execute("CREATE TEMP TABLE matched (customer_id TEXT PRIMARY KEY) WITHOUT ROWID")
        if self.engine == "rules":
            conn.executemany(
                "INSERT INTO temp.matched VALUES (?)",
                ((c,) for c in sorted(self._durable_state_matches(rule))),
            )
        else:
            where, values = condition_sql(rule.when, fact_fields(self.catalog), self.tz)
            conn.execute(
                f'INSERT INTO temp.matched SELECT f.customer_id FROM temp."{table}" f '
                f"WHERE {where}",
                values,
            )
        # Entering: matched now, not matching at the rule's previous evaluation.
        conn.execute(
            "INSERT INTO rule_state (playbook, rule_id, customer_id, matching, episode, "
            "changed_at) SELECT ?, ?, m.customer_id, 1, 1, ? FROM temp.matched m WHERE true "
            "ON CONFLICT (playbook, rule_id, customer_id) DO UPDATE SET matching = 1, "
            "episode = episode + 1, changed_at = excluded.changed_at WHERE matching = 0",
            (name, rule.id, as_of),
        )
        entered = (
            f"INSERT INTO temp.{CANDIDATES} SELECT s.customer_id, 'entry:' || s.episode, NULL, "
            "f.opted_out, f.external_userid IS NOT NULL AND f.owner IS NOT NULL, "
            "f.phone IS NOT NULL, f.owner, NULL, NULL FROM rule_state s "
            f'JOIN temp."{table}" f ON f.customer_id = s.customer_id '
            "WHERE s.playbook = ? AND s.rule_id = ? AND s.matching = 1 AND s.changed_at = ?"
        )
        conn.execute(entered, (name, rule.id, as_of))
        # Leaving: matching before, not now (they may enter again later).
        conn.execute(
            "UPDATE rule_state SET matching = 0, changed_at = ? WHERE playbook = ? AND "
            "rule_id = ? AND matching = 1 AND customer_id NOT IN "
            "(SELECT customer_id FROM temp.matched)",
            (as_of, name, rule.id),
        )
        return int(conn.execute(f"SELECT count(*) FROM temp.{CANDIDATES}").fetchone()[0])

    def _feature_facts(
        self, customers: set[str] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        if customers is None:
            for row in iter_features(self.store, self.features):
                yield row["customer_id"], row
            return
        self.conn.execute("DROP TABLE IF EXISTS temp.wanted")
        self.conn.execute("CREATE TEMP TABLE wanted (customer_id TEXT PRIMARY KEY) WITHOUT ROWID")
        self.conn.executemany("INSERT INTO temp.wanted VALUES (?)", ((c,) for c in customers))
        for row in self._rows(self.features.table, "JOIN temp.wanted w USING (customer_id)"):
            yield row["customer_id"], row

    def _durable_state_matches(self, rule: Rule) -> set[str]:
        """All state rules are matched in one pass over the customers' facts; a rule that
        reads tags is matched again for the customers this run has re-tagged."""
        if self.state_matches is None:
            live = [
                (r.id, r.when)
                for r in self.playbook.rules
                if r.on is None and self._skipped(r) is None
            ]
            self.state_matches = {rule_id: set() for rule_id, _ in live}
            for customer, rule_id in self._durable(
                f"{self.playbook.name}.state", live, None, self._feature_facts()
            ):
                self.state_matches[rule_id].add(customer)
        matched = set(self.state_matches.get(rule.id, set()))
        if self.tagged and rule.when is not None and "tags" in fields_used(rule.when):
            again = self._durable(
                f"{self.playbook.name}.{rule.id}.retagged",
                [(rule.id, rule.when)],
                None,
                self._feature_facts(self.tagged),
            )
            matched = (matched - self.tagged) | {customer for customer, _ in again}
        return matched

    # -- event rules ---------------------------------------------------------------------

    def _event_candidates(self, rule: Rule, start: int) -> int:
        assert rule.on is not None
        table = self._event_facts(rule.on, start)
        if self.engine == "sql":
            fields = fact_fields(self.catalog, rule.on)
            matched = match_sql(self.conn, table, "event_id", rule.when, fields, self.tz)
        else:
            facts = ((row["event_id"], row) for row in self._rows(table))
            matched = self._durable_match(rule, facts, rule.on)
        self.conn.execute("DROP TABLE IF EXISTS temp.matched_events")
        self.conn.execute("CREATE TEMP TABLE matched_events (event_id TEXT PRIMARY KEY)")
        self.conn.executemany(
            "INSERT OR IGNORE INTO temp.matched_events VALUES (?)", ((e,) for e in matched)
        )
        self.conn.execute(
            f"INSERT OR IGNORE INTO temp.{CANDIDATES} SELECT f.customer_id, "
            "'event:' || f.event_id, f.event_id, f.opted_out, "
            "f.external_userid IS NOT NULL AND f.owner IS NOT NULL, f.phone IS NOT NULL, "
            f'f.owner, NULL, NULL FROM temp."{table}" f '
            "JOIN temp.matched_events m ON m.event_id = f.event_id"
        )
        return int(self.conn.execute(f"SELECT count(*) FROM temp.{CANDIDATES}").fetchone()[0])

    def _event_facts(self, event: str, start: int) -> str:
        """A temp table of one row per event in [start, as_of): features as of right after."""
        if event in self.event_tables:
            return self.event_tables[event]
        table = f"{EVENT_FACTS}_{len(self.event_tables)}"
        fields = source_fields(event)
        source = source_table(event)
        key = {"orders": "order_id", "refunds": "refund_id", "events": "event_id"}[source]
        where = "s.ts >= :start AND s.ts < :as_of" + (
            " AND s.type = :type" if source == "events" else ""
        )
        columns = ", ".join(f'{f.expr} AS "event.{name}"' for name, f in fields.items())
        events = self.conn.execute(
            f"SELECT s.{key}, s.customer_id, s.ts, {columns} FROM {source} s WHERE {where} "
            "ORDER BY s.ts, s.rowid",
            {"start": start, "as_of": self.features.as_of, "type": event},
        ).fetchall()
        points = build_point_features(
            self.store,
            self.settings,
            [(event_id, customer, ts + 1) for event_id, customer, ts, *_ in events],
            self.features.rfm,
            table="event_points",
        )
        self.conn.execute("DROP TABLE IF EXISTS temp.event_values")
        columns = ", ".join(f'"event.{name}"' for name in fields)
        self.conn.execute(
            f"CREATE TEMP TABLE event_values (event_id TEXT PRIMARY KEY, "
            f"event_ts INTEGER, {columns}) WITHOUT ROWID"
        )
        marks = ", ".join("?" for _ in range(len(fields) + 2))
        self.conn.executemany(
            f"INSERT OR IGNORE INTO temp.event_values VALUES ({marks})",
            ((event_id, ts, *values) for event_id, _, ts, *values in events),
        )
        self.conn.execute(f'DROP TABLE IF EXISTS temp."{table}"')
        self.conn.execute(
            f'CREATE TEMP TABLE "{table}" AS SELECT f.*, v.* FROM temp."{points.table}" f '
            "JOIN temp.event_values v ON v.event_id = f.point_key"
        )
        self.event_tables[event] = table
        return table

    def _rows(self, table: str, join: str = "") -> Iterator[dict[str, Any]]:
        yield from decode_rows(self.conn.execute(f'SELECT f.* FROM temp."{table}" f {join}'))

    # -- durable-rules -------------------------------------------------------------------

    def _durable_match(self, rule: Rule, facts: Any, event: str | None) -> list[str]:
        found = self._durable(
            f"{self.playbook.name}.{rule.id}", [(rule.id, rule.when)], event, facts
        )
        return [key for key, _ in found]

    def _durable(
        self, name: str, rules: list[tuple[str, Any]], event: str | None, facts: Any
    ) -> list[tuple[str, str]]:
        from engine.match.durable import DurableMatcher

        fields = {field: info.type for field, info in self.catalog.items()}
        if event is not None:
            fields.update({f"event.{k}": v.type for k, v in source_fields(event).items()})
        found: list[tuple[str, str]] = DurableMatcher(name, rules, fields, self.tz).match(facts)
        return found

    # -- effects -------------------------------------------------------------------------

    def _apply_tags(self, rule: Rule) -> None:
        """Queued tag actions change the customer's tags now, so later rules see them."""
        changes = self.conn.execute(
            "SELECT customer_id, tags_added, tags_removed FROM actions WHERE run_id = ? AND "
            "rule_id = ? AND type = 'tag' AND status = 'pending'",
            (self.decider.run_id, rule.id),
        ).fetchall()
        if not changes:
            return
        current = dict(
            self.conn.execute(
                "SELECT customer_id, tags FROM customers WHERE customer_id IN "
                "(SELECT customer_id FROM actions WHERE run_id = ? AND rule_id = ? AND "
                "type = 'tag' AND status = 'pending')",
                (self.decider.run_id, rule.id),
            )
        )
        updates = []
        for customer, added, removed in changes:
            tags = set(json.loads(current.get(customer) or "[]"))
            tags |= set((added or "").split(",")) - {""}
            tags -= set((removed or "").split(","))
            text = json.dumps(sorted(tags), ensure_ascii=False)
            current[customer] = text
            updates.append((text, customer))
        self.conn.executemany("UPDATE customers SET tags = ? WHERE customer_id = ?", updates)
        self.conn.executemany(
            f'UPDATE temp."{self.features.table}" SET tags = ? WHERE customer_id = ?', updates
        )
        self.tagged.update(customer for _, customer in updates)

    def render_messages(self) -> None:
        """Render the templates of the run's queued actions (sandboxed; strict variables)."""
        pending = self.conn.execute(
            "SELECT action_id, rule_id, customer_id, trigger, template, coupon, group_name "
            "FROM actions WHERE run_id = ? AND status = 'pending' AND template IS NOT NULL",
            (self.decider.run_id,),
        ).fetchall()
        if not pending:
            return
        rules = {r.id: r for r in self.playbook.rules}
        facts = dict(self._feature_facts({p[2] for p in pending}))
        event_rows: dict[str, dict[str, Any]] = {}
        wanted = {trigger[6:] for *_, trigger, _, _, _ in pending if trigger.startswith("event:")}
        if wanted:
            self.conn.execute("DROP TABLE IF EXISTS temp.wanted_events")
            self.conn.execute("CREATE TEMP TABLE wanted_events (event_id TEXT PRIMARY KEY)")
            self.conn.executemany(
                "INSERT INTO temp.wanted_events VALUES (?)", ((e,) for e in wanted)
            )
            for table in self.event_tables.values():
                for fact in self._rows(table, "JOIN temp.wanted_events w USING (event_id)"):
                    event_rows[fact["event_id"]] = fact
        updates = []
        for action, rule_id, customer, trigger, template, coupon, group in pending:
            row: dict[str, Any] | None = (
                event_rows.get(trigger[6:]) if trigger.startswith("event:") else None
            )
            customer_row = row or facts.get(customer, {})
            context: dict[str, Any] = {
                "customer": {k: v for k, v in customer_row.items() if not k.startswith("event")},
                "rule": {"id": rule_id, "description": rules[rule_id].description},
                "playbook": {
                    "name": self.playbook.name,
                    "version": self.playbook.version,
                    "description": self.playbook.description,
                },
            }
            if row is not None:
                context["event"] = {k[6:]: v for k, v in row.items() if k.startswith("event.")}
            if coupon:
                c = self.playbook.coupons[coupon]
                context["coupon"] = {
                    "code": c.code,
                    "value": _number(c.value),
                    "min_spend": _number(c.min_spend),
                    "description": c.description,
                }
            if group:
                g = self.playbook.groups[group]
                context["group"] = {
                    "name": g.name,
                    "join_url": g.join_url,
                    "description": g.description,
                }
            updates.append((render(self.playbook.templates[template], context), action))
        self.conn.executemany("UPDATE actions SET message = ? WHERE action_id = ?", updates)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
