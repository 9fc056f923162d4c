"""Running playbooks: match -> decide -> enqueue, all the playbooks of a run in one
transaction (a crash leaves the store as before the run or with all of it; the pages the
playbooks share — queue indexes, rule state — are written once, not once per playbook).

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from engine.catalog import field_catalog, source_fields
from engine.clock import DAY, get_timezone, local_day
from engine.conditions.ir import And, Condition, Contains, Not, Or, fields_used
from engine.decide import CANDIDATES, DECISIONS, REASONS, RunDecider, scratch_table
from engine.errors import UsageError
from engine.event_facts import (
    EventPrefetch,
    EventSource,
    build_event_facts,
    worth_prefetching,
)
from engine.features import FeatureTable, build_features, decode_rows, decode_value
from engine.match.sql import condition_sql, fact_fields, match_sql
from engine.playbook.model import Playbook, Rule
from engine.playbook.templates import TemplateProblem, render, template_variables
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
    # The customers the run's tag actions touched: their tags as it left them, and which.
    tags_written: dict[str, TagWrite] = field(default_factory=dict, repr=False, compare=False)

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
    features: FeatureTable | None = None,
    prepared: Prepared | None = None,
) -> list[RunResult]:
    """Run each playbook against the store as of `as_of`; see the module docstring.

    `features`: the customers' features as of `as_of`, if already built (a simulation
    stepping through time builds them incrementally); built here otherwise. `prepared`:
    event facts and state rules' matches built ahead, over `features` (a simulation's next
    step, `engine.lookahead`); what it does not have is built here."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    check_distinct_names(playbooks)
    seen = _data_version(store)
    if features is None:
        features = build_features(store, settings, as_of)
    elif features.as_of != as_of:
        raise ValueError(f"features are as of {features.as_of}, the run as of {as_of}")
    facts = RunFacts(store, settings, features, playbooks)
    try:
        with store.transaction() as conn:
            # Features are built before the write lock is taken (so the build can use every
            # core). If another command committed since the build began (or, for features
            # handed in, since this call) — another run tagging customers — bring the tags
            # up to date before deciding anything on them.
            if _data_version(store) != seen:
                facts.copy_tags()
            if prepared is not None:
                facts.prepared = prepared
            else:
                starts = {p.name: event_start(conn, p, as_of, since) for p in playbooks}
                facts.prefetch_events(event_keys(settings, playbooks, as_of, starts))
            return [
                _execute(store, conn, settings, playbook, facts, engine, since)
                for playbook in playbooks
            ]
    finally:
        facts.close()


def event_keys(
    settings: Settings, playbooks: Sequence[Playbook], as_of: int, starts: Mapping[str, int]
) -> list[tuple[str, int]]:
    """The (event type, start) of the event facts a run of `playbooks` as of `as_of` will
    read, in the order it will first read them; `starts`: each playbook's `event_start`."""
    keys: dict[tuple[str, int], None] = {}
    for playbook in playbooks:
        start = starts[playbook.name]
        tz = playbook_tz(playbook, settings)
        for rule in sorted(playbook.rules, key=lambda r: r.priority):
            if rule.on is not None and skip_reason(rule, as_of, tz) is None:
                keys[(rule.on, start)] = None
    return list(keys)


def event_start(conn: Any, playbook: Playbook, as_of: int, since: int | None) -> int:
    """Since when a run of `playbook` reads events: where its previous run stopped; on its
    first run `since`, by default a day before `as_of`."""
    cursor = conn.execute(
        "SELECT until FROM event_cursor WHERE playbook = ?", (playbook.name,)
    ).fetchone()
    return int(cursor[0]) if cursor else (since if since is not None else as_of - DEFAULT_SINCE)


def playbook_tz(playbook: Playbook, settings: Settings) -> Any:
    """The timezone a playbook's dates and quiet hours are read in."""
    return settings.tz if playbook.timezone is None else get_timezone(playbook.timezone)


def skip_reason(rule: Rule, as_of: int, tz: Any) -> str | None:
    """Why a rule does not run at `as_of` (disabled, not started, ended), or None."""
    if not rule.enabled:
        return "disabled"
    day = local_day(as_of, tz).isoformat()
    if rule.start and day < rule.start:
        return f"starts {rule.start}"
    if rule.end and day > rule.end:
        return f"ended {rule.end}"
    return None


class TagWrite(NamedTuple):
    """A customer's tags as a run wrote them, and which of the customer's tags it changed:
    `changed` is ",a,b," (the tags added or removed, each between commas; "," for none;
    tags never hold a comma). A customer's tags are a list, never NULL (the store's
    schema), so a test of a tag the write did not change gives what it gave before."""

    tags: str
    changed: str


def merge_tag_writes(into: dict[str, TagWrite], later: Mapping[str, TagWrite]) -> None:
    """Add `later` writes to `into`: a customer's tags are the later ones; what changed is
    what either changed."""
    for customer, write in later.items():
        before = into.get(customer)
        if before is not None:
            write = TagWrite(write.tags, before.changed + write.changed[1:])
        into[customer] = write


def write_tag_changes(
    conn: Any,
    changes: Iterable[tuple[str, str | None, str | None, str | None]],
    undo: bool = False,
    changed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Apply tag actions (customer, tags_added, tags_removed, the customer's tags now), in
    order, to the customers table — or, with `undo`, reverse them; returns each changed
    customer's tags as written. `changed`, if given, receives each one's changed tags
    (`TagWrite.changed`)."""
    tags: dict[str, set[str]] = {}
    before: dict[str, frozenset[str]] = {}
    for customer, added, removed, current in changes:
        if customer not in tags:
            before[customer] = frozenset(json.loads(current or "[]"))
        now = tags.setdefault(customer, set(before[customer]))
        add, remove = set((added or "").split(",")) - {""}, set((removed or "").split(","))
        if undo:  # the reverse of "add, then remove"
            now -= add
            now |= remove - {""}
        else:
            now |= add
            now -= remove
    written = {c: json.dumps(sorted(t), ensure_ascii=False) for c, t in tags.items()}
    if changed is not None:
        for customer, now in tags.items():
            changed[customer] = ",".join(["", *sorted(now ^ before[customer]), ""])
    conn.executemany(
        "UPDATE customers SET tags = ? WHERE customer_id = ?", ((t, c) for c, t in written.items())
    )
    return written


def copy_tags(conn: Any, table: str, source: str) -> None:
    """Copy the tags of the customers in `source` (customer_id, tags) into the facts table
    `table` (schema-qualified, e.g. 'temp."features"')."""
    conn.execute(
        f"UPDATE {table} AS f SET tags = (SELECT r.tags FROM {source} AS r "
        f"WHERE r.customer_id = f.customer_id) WHERE f.customer_id IN "
        f"(SELECT customer_id FROM {source})"
    )


def check_distinct_names(playbooks: Sequence[Playbook]) -> None:
    """Refuse two playbooks of one name: they would share entry state and event cursors."""
    seen: dict[str, str] = {}
    for playbook in playbooks:
        if playbook.name in seen:
            raise UsageError(
                f"{seen[playbook.name]} and {playbook.file} are both playbook "
                f"{playbook.name!r}: give each playbook its own name"
            )
        seen[playbook.name] = playbook.file


class Prepared(EventSource, Protocol):
    """What a run's caller built ahead over the run's features (`engine.lookahead`)."""

    def matches(self, where: str, values: Sequence[Any]) -> str | None:
        """A table (customer_id) of the features' rows satisfying the state rule
        condition compiled to `where` with `values` — with the tags the features had when
        they were built; None if not built."""
        ...

    def stale(self) -> str | None:
        """A table (customer_id, changed: as `TagWrite.changed`) of the customers whose
        tags have changed since `matches` were made (before this run), if any: a rule that
        reads those tags must judge them again."""
        ...


class StateCondition(NamedTuple):
    """A condition compiled over the features table (aliased `f`): its WHERE, the values
    bound to it, and the columns it reads."""

    where: str
    values: list[Any]
    columns: frozenset[str]


def state_conditions(
    settings: Settings, playbooks: Sequence[Playbook], as_of: int
) -> list[StateCondition]:
    """The conditions of the state rules live at `as_of`, compiled over the features table
    (`Prepared.matches` takes their matches)."""
    fields = fact_fields(field_catalog(settings))
    found = []
    for playbook in playbooks:
        tz = playbook_tz(playbook, settings)
        for rule in playbook.rules:
            if rule.on is None and skip_reason(rule, as_of, tz) is None:
                columns = frozenset() if rule.when is None else frozenset(fields_used(rule.when))
                found.append(StateCondition(*condition_sql(rule.when, fields, tz), columns))
    return found


class RunFacts:
    """What one run's playbooks are judged on: every customer's features as of the run,
    and — built once, shared by all the playbooks — each event type's facts (one row per
    event: the customer's features as of right after it, and the event's properties).

    Tag changes made by the run reach every table here before anything reads tags from
    it (`fresh_tags`), so a rule sees the tags that earlier rules (of this or an earlier
    playbook) queued; a table nothing reads tags from is not rewritten at all."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        features: FeatureTable,
        playbooks: Sequence[Playbook] | None = None,
    ) -> None:
        """`playbooks`: the ones the run judges on these facts. An event type's facts then
        carry only the features those playbooks' rules on it and their templates read
        (with every playbook unknown, all of them)."""
        self.store, self.settings, self.features = store, settings, features
        self.conn = store.conn
        self.event_tables: dict[tuple[str, int], str] = {}
        self.needs = None if playbooks is None else event_needs(playbooks)
        # The tags this run wrote are in temp.run_tags, each row with the number of the
        # write (`seq`); `applied` says up to which write each facts table has them.
        self.seq = 0
        self.applied: dict[str, int] = {features.ref: 0}
        self.prefetch: EventPrefetch | None = None  # started by this run, closed by it
        self.prepared: Prepared | None = None  # built ahead by the caller
        self.written: dict[str, TagWrite] = {}  # what the run wrote so far (`tags_written`)
        self.conn.execute("DROP TABLE IF EXISTS temp.run_tags")

    @property
    def tables(self) -> list[str]:
        """Every facts table with a `tags` column."""
        return [self.features.ref, *self.event_tables.values()]

    def copy_tags(
        self, source: str = "main.customers", tables: Sequence[str] | None = None
    ) -> None:
        """Copy the tags of the customers in `source` (customer_id, tags) — by default
        the store's — into `tables` (by default every facts table)."""
        for table in self.tables if tables is None else tables:
            copy_tags(self.conn, table, source)

    def tags_written(self, writes: Mapping[str, TagWrite]) -> None:
        """The run wrote these tags to the store: every facts table built so far lacks them
        until `fresh_tags` copies them in."""
        if not self.seq:
            self.conn.execute(
                "CREATE TEMP TABLE run_tags (customer_id TEXT PRIMARY KEY, tags TEXT, "
                "seq INTEGER, changed TEXT) WITHOUT ROWID"
            )
        self.seq += 1
        merge_tag_writes(self.written, writes)
        self.conn.executemany(
            "INSERT INTO temp.run_tags VALUES (?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE "
            "SET tags = excluded.tags, seq = excluded.seq, changed = excluded.changed",
            ((c, w.tags, self.seq, self.written[c].changed) for c, w in writes.items()),
        )

    def retagged(self) -> str | None:
        """The table (customer_id, changed, ...) of the customers this run has retagged, if
        any."""
        return "temp.run_tags" if self.seq else None

    def stale(self, prepared: Prepared, tags: frozenset[str] | None) -> str | None:
        """A table (customer_id) of the customers whose tags changed after `prepared`'s
        matches were made — before this run, or by it so far — if any: with `tags` (what
        a condition tests for, `tags_read`), only those for whom one of these changed (the
        condition is the same for the others); with None, all of them."""
        sources = [t for t in (prepared.stale(), self.retagged()) if t]
        if not sources or (tags is not None and not tags):
            return None
        tests = " OR ".join("instr(changed, ?) > 0" for _ in tags or ())
        values = [f",{tag}," for tag in sorted(tags or ())]
        scratch_table(self.conn, "stale", "customer_id TEXT PRIMARY KEY")
        found = 0
        for source in sources:
            found += self.conn.execute(
                f"INSERT OR IGNORE INTO temp.stale SELECT customer_id FROM {source}"
                + (f" WHERE {tests}" if tests else ""),
                values,
            ).rowcount
        return "temp.stale" if found else None

    def fresh_tags(self, *tables: str) -> None:
        """Bring these tables' tags up to date with what the run wrote, before reading them:
        only the customers retagged since a table was last brought up to date."""
        for table in tables:
            applied = self.applied.get(table, self.seq)
            if applied < self.seq:
                self.copy_tags(
                    f"(SELECT customer_id, tags FROM temp.run_tags WHERE seq > {applied})",
                    [table],
                )
                self.applied[table] = self.seq

    def events(self, event: str, start: int) -> str:
        """A table (schema-qualified) of one row per `event` in [start, as_of): features
        right after it; built here, or taken from what was built elsewhere."""
        known = self.event_tables.get((event, start))
        if known is not None:
            return known
        table = f"{EVENT_FACTS}_{len(self.event_tables)}"
        source = self.prepared if self.prepared is not None else self.prefetch
        ref = None if source is None else source.take(self.conn, (event, start), table)
        if ref is not None:
            applied = 0  # built from the committed store: none of the run's tags yet
        else:
            build_event_facts(
                self.store,
                self.settings,
                self.features,
                event,
                start,
                table,
                needs=self.needs,
            )
            applied = self.seq  # built from the store, which has every tag written
            self.conn.execute(f'CREATE INDEX temp."{table}_customer" ON "{table}" (customer_id)')
            ref = f'temp."{table}"'
        self.event_tables[(event, start)] = ref
        self.applied[ref] = applied
        return ref

    def prefetch_events(self, keys: Sequence[tuple[str, int]]) -> None:
        """Have these (event type, start) facts built on another core, in this order, if
        worth it. Call inside the run's transaction; `close` after it."""
        if worth_prefetching(self.store, keys, self.features.as_of):
            self.prefetch = EventPrefetch(
                self.store, self.settings, self.features, keys, self.needs
            )

    def close(self) -> None:
        """Stop and clear away prefetching (after the run's transaction)."""
        if self.prefetch is not None:
            self.prefetch.close(self.conn)
            self.prefetch = None


def event_needs(playbooks: Sequence[Playbook]) -> dict[str, frozenset[str] | None]:
    """Per event type, the customer features the playbooks' rules on it read — in their
    conditions or in their playbook's templates — or None when a template reads them all."""
    needs: dict[str, set[str] | None] = {}
    for playbook in playbooks:
        templates = template_customer_fields(playbook)
        for rule in playbook.rules:
            if rule.on is None:
                continue
            used = set() if rule.when is None else fields_used(rule.when)
            known = needs.setdefault(rule.on, set())
            if known is None or templates is None:
                needs[rule.on] = None
                continue
            known |= {name for name in used if not name.startswith("event.")} | templates
    return {event: None if names is None else frozenset(names) for event, names in needs.items()}


def template_customer_fields(playbook: Playbook) -> set[str] | None:
    """The names the playbook's templates read as `customer.*`; None (every feature) if one
    reads the whole `customer` or cannot be parsed — both refused by validation."""
    wanted: set[str] = set()
    for text in playbook.templates.values():
        uses = template_variables(text)
        if isinstance(uses, TemplateProblem):
            return None
        for use in uses:
            if use.root == "customer":
                if use.attr is None:
                    return None
                wanted.add(use.attr)
    return wanted


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
            # Fresh event facts: the tables built inside this transaction go with it.
            facts = RunFacts(store, settings, features, [playbook])
            result = _execute(store, conn, settings, playbook, facts, engine, since)
            sql = f"SELECT * FROM temp.{DECISIONS}"
            args: list[Any] = []
            if customer is not None:
                sql += " WHERE customer_id = ?"
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
    facts: RunFacts,
    engine: str,
    since: int | None,
) -> RunResult:
    as_of = facts.features.as_of
    tz = playbook_tz(playbook, settings)
    run_id = uuid.uuid4().hex
    start = event_start(conn, playbook, as_of, since)
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
    decider = RunDecider(conn, playbook, run_id, as_of, tz, store.queue_filter)
    runner = _Runner(store, settings, playbook, facts, engine, decider, tz)
    reports = [
        runner.rule(rule, start) for rule in sorted(playbook.rules, key=lambda r: r.priority)
    ]
    runner.render_messages()
    decider.flush()
    conn.execute(
        "INSERT INTO event_cursor (playbook, until) VALUES (?, ?) ON CONFLICT "
        "(playbook) DO UPDATE SET until = max(until, excluded.until)",
        (playbook.name, as_of),
    )
    result = RunResult(
        run_id, playbook.name, playbook.version, as_of, start, engine, reports, runner.tagged
    )
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
        facts: RunFacts,
        engine: str,
        decider: RunDecider,
        tz: Any,
    ) -> None:
        self.store, self.conn = store, store.conn
        self.settings, self.playbook = settings, playbook
        self.facts, self.features = facts, facts.features
        self.engine, self.decider, self.tz = engine, decider, tz
        self.catalog = field_catalog(settings)
        self.event_tables: dict[str, str] = {}  # this playbook's: event type -> facts table
        self.tagged: dict[str, TagWrite] = {}  # customers whose tags this run changed
        # durable-rules matches per kind of rule (None: state rules; else the event type)
        self.durable_matches: dict[str | None, dict[str, set[str]]] = {}
        self.rules_by_id = {r.id: r for r in playbook.rules}

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
        return skip_reason(rule, self.features.as_of, self.tz)

    # -- state rules ---------------------------------------------------------------------

    def _state_candidates(self, rule: Rule) -> int:
        table = self.features.ref
        if reads_tags(rule):
            self.facts.fresh_tags(table)
        conn, name, as_of = self.conn, self.playbook.name, self.features.as_of
        scratch_table(conn, "matched", "customer_id TEXT PRIMARY KEY")
        matched = "temp.matched"
        if self.engine == "rules":
            conn.executemany(
                "INSERT INTO temp.matched VALUES (?)",
                ((c,) for c in sorted(self._durable_matches(rule, table, "customer_id"))),
            )
        else:
            matched = self._sql_matches(rule, table)
        # Entering: matched now, not matching at the rule's previous evaluation. Only they
        # are written; customers still matching are read, never rewritten.
        scratch_table(conn, "entered", "customer_id TEXT PRIMARY KEY, episode INTEGER")
        conn.execute(
            "INSERT INTO temp.entered SELECT m.customer_id, coalesce(s.episode, 0) + 1 "
            f"FROM {matched} m LEFT JOIN rule_state s ON s.playbook = ? AND s.rule_id = ? "
            "AND s.customer_id = m.customer_id WHERE s.matching IS NOT 1",
            (name, rule.id),
        )
        conn.execute(
            "INSERT INTO rule_state (playbook, rule_id, customer_id, matching, episode, "
            "changed_at) SELECT ?, ?, customer_id, 1, episode, ? FROM temp.entered WHERE true "
            "ON CONFLICT (playbook, rule_id, customer_id) DO UPDATE SET matching = 1, "
            "episode = excluded.episode, changed_at = excluded.changed_at",
            (name, rule.id, as_of),
        )
        conn.execute(
            f"INSERT INTO temp.{CANDIDATES} SELECT e.customer_id, 'entry:' || e.episode, NULL, "
            "f.opted_out, f.external_userid IS NOT NULL AND f.owner IS NOT NULL, "
            "f.phone IS NOT NULL, f.owner, NULL, NULL FROM temp.entered e "
            f"JOIN {table} f ON f.customer_id = e.customer_id"
        )
        # Leaving: matching before, not now (they may enter again later).
        conn.execute(
            "UPDATE rule_state SET matching = 0, changed_at = ? WHERE playbook = ? AND "
            "rule_id = ? AND matching = 1 AND customer_id NOT IN "
            f"(SELECT customer_id FROM {matched})",
            (as_of, name, rule.id),
        )
        return int(conn.execute(f"SELECT count(*) FROM temp.{CANDIDATES}").fetchone()[0])

    def _sql_matches(self, rule: Rule, table: str) -> str:
        """The table of the customers matching a state rule (filled here, unless the
        matches built ahead are exactly them)."""
        where, values = condition_sql(rule.when, fact_fields(self.catalog), self.tz)
        prepared = self.facts.prepared
        ahead = None if prepared is None else prepared.matches(where, values)
        if ahead is None:
            self.conn.execute(
                f"INSERT INTO temp.matched SELECT f.customer_id FROM {table} f WHERE {where}",
                values,
            )
            return "temp.matched"
        assert prepared is not None
        stale = self.facts.stale(prepared, tags_read(rule))
        if stale is None:
            return ahead
        # Matched ahead on tags some customers no longer have: theirs are judged again.
        self.conn.execute(
            f"INSERT INTO temp.matched SELECT customer_id FROM {ahead} WHERE customer_id "
            f"NOT IN (SELECT customer_id FROM {stale})"
        )
        self.conn.execute(
            f"INSERT OR IGNORE INTO temp.matched SELECT f.customer_id FROM {stale} s "
            f"CROSS JOIN {table} f ON f.customer_id = s.customer_id WHERE {where}",
            values,
        )
        return "temp.matched"

    def _fill_wanted(self, customers: Iterable[str]) -> None:
        scratch_table(self.conn, "wanted", "customer_id TEXT PRIMARY KEY")
        self.conn.executemany("INSERT INTO temp.wanted VALUES (?)", ((c,) for c in customers))

    # -- event rules ---------------------------------------------------------------------

    def _event_candidates(self, rule: Rule, start: int) -> int:
        assert rule.on is not None
        table = self._event_facts(rule.on, start)
        if reads_tags(rule):
            self.facts.fresh_tags(table)
        matched: Iterable[str]
        if self.engine == "sql":
            fields = fact_fields(self.catalog, rule.on)
            matched = match_sql(self.conn, table, "event_id", rule.when, fields, self.tz)
        else:
            matched = self._durable_matches(rule, table, "event_id")
        scratch_table(self.conn, "matched_events", "event_id TEXT PRIMARY KEY")
        self.conn.executemany(
            "INSERT OR IGNORE INTO temp.matched_events VALUES (?)", ((e,) for e in matched)
        )
        self.conn.execute(
            f"INSERT OR IGNORE INTO temp.{CANDIDATES} SELECT f.customer_id, "
            "'event:' || f.event_id, f.event_id, f.opted_out, "
            "f.external_userid IS NOT NULL AND f.owner IS NOT NULL, f.phone IS NOT NULL, "
            f"f.owner, NULL, NULL FROM {table} f "
            "JOIN temp.matched_events m ON m.event_id = f.event_id"
        )
        return int(self.conn.execute(f"SELECT count(*) FROM temp.{CANDIDATES}").fetchone()[0])

    def _durable_matches(self, rule: Rule, table: str, key: str) -> set[str]:
        """The playbook's live rules of one kind (state rules, or the rules on one event
        type) are matched in one pass over `table`'s rows (keyed by `key`); a rule that reads
        tags is matched again for the rows of customers this run has re-tagged."""
        on = rule.on
        if on not in self.durable_matches:
            rules = [r for r in self.playbook.rules if r.on == on and self._skipped(r) is None]
            if any(reads_tags(r) for r in rules):
                self.facts.fresh_tags(table)
            live = [(r.id, r.when) for r in rules]
            found: dict[str, set[str]] = {rule_id: set() for rule_id, _ in live}
            facts = ((row[key], row) for row in self._rows(table))
            name = f"{self.playbook.name}.{on or 'state'}"
            for fact_key, rule_id in self._durable(name, live, on, facts):
                found[rule_id].add(fact_key)
            self.durable_matches[on] = found
        matched = set(self.durable_matches[on].get(rule.id, set()))
        if self.tagged and reads_tags(rule):
            self._fill_wanted(self.tagged)
            rows = list(self._rows(table, "JOIN temp.wanted w USING (customer_id)"))
            again = self._durable(
                f"{self.playbook.name}.{rule.id}.retagged",
                [(rule.id, rule.when)],
                on,
                ((row[key], row) for row in rows),
            )
            matched = (matched - {row[key] for row in rows}) | {k for k, _ in again}
        return matched

    def _event_facts(self, event: str, start: int) -> str:
        """The run's facts table for `event` since `start` (built once per run)."""
        table = self.facts.events(event, start)
        self.event_tables[event] = table
        return table

    def _rows(self, table: str, join: str = "") -> Iterator[dict[str, Any]]:
        yield from decode_rows(self.conn.execute(f"SELECT f.* FROM {table} f {join}"))

    # -- durable-rules -------------------------------------------------------------------

    def _durable(
        self, name: str, rules: list[tuple[str, Any]], event: str | None, facts: Any
    ) -> list[tuple[str, str]]:
        fields = {field: info.type for field, info in self.catalog.items()}
        if event is not None:
            fields.update({f"event.{k}": v.type for k, v in source_fields(event).items()})
        found: list[tuple[str, str]] = _matcher(name, rules, fields, self.tz).match(facts)
        return found

    # -- effects -------------------------------------------------------------------------

    def _apply_tags(self, rule: Rule) -> None:
        """Queued tag actions change the customer's tags now, so later rules see them."""
        changes = self.conn.execute(
            f"SELECT d.customer_id, d.tags_added, d.tags_removed, c.tags FROM "
            f"temp.{DECISIONS} d JOIN customers c USING (customer_id) WHERE d.rule_id = ? "
            "AND d.type = 'tag' AND d.status = 'pending' ORDER BY d.customer_id, d.trigger",
            (rule.id,),
        ).fetchall()
        if not changes:
            return
        changed: dict[str, str] = {}
        current = write_tag_changes(self.conn, changes, changed=changed)
        writes = {c: TagWrite(t, changed[c]) for c, t in current.items()}
        self.facts.tags_written(writes)
        merge_tag_writes(self.tagged, writes)

    def render_messages(self) -> None:
        """Render the templates of the run's queued actions (sandboxed; strict variables).

        A message reads the customer's facts as the rule judged them: the run's features
        for state rules, the features right after the event (and the event) for event
        rules. Only the customer fields the playbook's templates use are read."""
        fixed = ["d.action_id", "d.rule_id", "d.template", "d.coupon", "d.group_name"]
        columns = self._template_columns()
        if "tags" in columns:
            self.facts.fresh_tags(self.features.ref, *self.event_tables.values())
        picked = fixed + [f'f."{c}"' for c in columns]
        pending = (
            f"FROM temp.{DECISIONS} d {{join}} "
            "WHERE d.status = 'pending' AND d.template IS NOT NULL"
        )
        queries: list[tuple[str, tuple[str, ...], bool]] = [
            (
                f"SELECT {', '.join(picked)} "
                + pending.format(join=f"JOIN {self.features.ref} f USING (customer_id)")
                + " AND d.trigger NOT LIKE 'event:%'",
                (),
                False,
            )
        ]
        for rule in self.playbook.rules:
            if rule.on is not None and rule.on in self.event_tables:
                table = self.event_tables[rule.on]
                values = [f'f."event.{n}"' for n in source_fields(rule.on)]
                join = (
                    f"JOIN {table} f ON f.customer_id = d.customer_id "
                    "AND 'event:' || f.event_id = d.trigger"
                )
                queries.append(
                    (
                        f"SELECT {', '.join(picked + values)} "
                        + pending.format(join=join)
                        + " AND d.rule_id = ?",
                        (rule.id,),
                        True,
                    )
                )
        updates = []
        for sql, args, is_event in queries:
            cursor = self.conn.execute(sql, args)
            names = [d[0] for d in cursor.description][5:]
            for action, rule_id, template, coupon, group, *values in cursor:
                updates.append(
                    (
                        render(
                            self.playbook.templates[template],
                            self._context(rule_id, coupon, group, names, values, is_event),
                        ),
                        action,
                    )
                )
        self.conn.executemany(
            f"UPDATE temp.{DECISIONS} SET message = ? WHERE action_id = ?", updates
        )

    def _template_columns(self) -> list[str]:
        """The features columns the playbook's templates read as `customer.*`."""
        present = [
            row[1]
            for row in self.conn.execute(
                f'PRAGMA {self.features.schema}.table_info("{self.features.table}")'
            )
        ]
        wanted = template_customer_fields(self.playbook)
        return present if wanted is None else [c for c in present if c in wanted]

    def _context(
        self,
        rule_id: str,
        coupon: str | None,
        group: str | None,
        names: list[str],
        values: list[Any],
        is_event: bool,
    ) -> dict[str, Any]:
        customer: dict[str, Any] = {}
        event: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
            if name.startswith("event."):
                event[name[6:]] = value
            else:
                customer[name] = decode_value(name, value)
        rule = self.rules_by_id[rule_id]
        context: dict[str, Any] = {
            "customer": customer,
            "rule": {"id": rule_id, "description": rule.description},
            "playbook": {
                "name": self.playbook.name,
                "version": self.playbook.version,
                "description": self.playbook.description,
            },
        }
        if is_event:
            context["event"] = event
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
        return context


# durable-rules cannot unregister a ruleset: a matcher is compiled and registered once per
# process for each set of rules, and reused by every later run (a simulation's steps).
_MATCHERS: dict[tuple[Any, ...], Any] = {}
MAX_MATCHERS = 512


def reads_tags(rule: Rule) -> bool:
    """Whether the rule's condition reads the customer's tags."""
    return rule.when is not None and "tags" in fields_used(rule.when)


def tags_read(rule: Rule) -> frozenset[str] | None:
    """The tags the rule's condition tests for (`"vip" in tags`), or None if it reads the
    tags in any other way (then a change of any tag may change its verdict)."""
    return frozenset() if rule.when is None else _tags_read(rule.when)


def _tags_read(cond: Condition) -> frozenset[str] | None:
    if isinstance(cond, And | Or):
        found: frozenset[str] = frozenset()
        for item in cond.items:
            inner = _tags_read(item)
            if inner is None:
                return None
            found |= inner
        return found
    if isinstance(cond, Not):
        return _tags_read(cond.item)
    if cond.field.name != "tags":
        return frozenset()
    if isinstance(cond, Contains) and isinstance(cond.value.value, str):
        return frozenset({cond.value.value})
    return None


def _matcher(name: str, rules: list[tuple[str, Any]], fields: dict[str, Any], tz: Any) -> Any:
    from engine.match.durable import DurableMatcher

    key = (name, tuple(rules), tuple(sorted(fields.items())), str(tz))
    matcher = _MATCHERS.get(key)
    if matcher is None:
        if len(_MATCHERS) >= MAX_MATCHERS:
            _MATCHERS.pop(next(iter(_MATCHERS)))
        matcher = _MATCHERS[key] = DurableMatcher(name, rules, fields, tz)
    return matcher


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
