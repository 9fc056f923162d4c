"""Dry runs and backtests: what playbooks would have done, and did it matter.

Nothing here has a second implementation of matching or policies. The store is opened
read-only and copied (SQLite's backup API) into a private scratch file; on the copy the
playbooks *run*, with `engine.run.run_playbooks`, exactly as `playbook run` would — once
(`--as-of`) or at every step from `--from` to `--to` — and the queue they write there is
then summarised. The scratch file is deleted afterwards; the real store is never written.

Stepping through time:
- before the first step, everything the copy records from that moment on is removed
  (actions decided then or later, runs as of then or later), and a simulated playbook
  whose live state is newer than the first step starts as if it had never run;
- at each step the customers' features are as of that step (built incrementally by
  `engine.features.FeatureStepper`, equal to a full build), event rules read the events
  since the previous step, and the playbooks' own simulated actions feed the cooldowns,
  caps, entry episodes and budgets of later steps, as if they had been live;
- with a second core, each step's features, event facts and the state rules' matches
  are built there one step ahead, and each step's outcomes added there after it
  (`engine.lookahead`; the same results as building them here, tested);
- the real history supplies what customers did, including after each step: that is how
  outcomes are measured (orders within `window` after the step).

Outcomes compare, per rule, the customers it would have acted on at a step with the
customers the playbook's holdout kept back from the same rule (or, when it has no holdout,
the matches that caps or an exclusive group suppressed): the share who ordered within the
window and their revenue, with the difference and a 95% confidence interval.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from engine.clock import DAY, format_epoch
from engine.decide import REASONS, QueueFilter
from engine.errors import StoreError, UsageError
from engine.features import FeatureStepper, FeatureTable, build_features
from engine.lookahead import Lookahead, worth_looking_ahead
from engine.playbook.model import Playbook
from engine.run import (
    RunResult,
    StateCondition,
    check_distinct_names,
    event_keys,
    event_needs,
    event_start,
    run_playbooks,
    state_conditions,
    write_tag_changes,
)
from engine.settings import Settings
from engine.store import Store, open_store

DEFAULT_WINDOW = 14 * DAY
TEMP_CACHE_KIB = 128 * 1024
MAX_STEPS = 1000
MIN_GROUP = 30  # customers per group below which a comparison is "too few to tell"
MIN_EVENTS = 5  # buyers and non-buyers per group needed for the normal approximation
Z95 = 1.959964


@dataclass(frozen=True)
class Outcome:
    """Targeted customers against a comparison group, for one rule."""

    comparison: str | None  # "holdout", "suppressed by caps or group", or None
    targeted: int
    targeted_buyers: int
    targeted_revenue: float
    control: int
    control_buyers: int
    control_revenue: float
    rate_difference: float | None  # targeted share who ordered - control share
    rate_ci: tuple[float, float] | None
    revenue_difference: float | None  # revenue per targeted customer - per control one
    revenue_ci: tuple[float, float] | None
    verdict: str
    incomplete_window: int  # decisions left out: their window runs past the history

    @property
    def targeted_rate(self) -> float | None:
        return self.targeted_buyers / self.targeted if self.targeted else None

    @property
    def control_rate(self) -> float | None:
        return self.control_buyers / self.control if self.control else None


@dataclass
class RuleSummary:
    """What one rule would have done over the whole simulation."""

    playbook: str
    rule: str
    kind: str
    matched: int = 0
    queued: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)
    customers: int = 0  # distinct customers with at least one queued action
    coupon_cost: float = 0.0  # face value of the coupons queued
    outcome: Outcome | None = None

    @property
    def key(self) -> str:
        return f"{self.playbook}/{self.rule}"


@dataclass(frozen=True)
class StepSummary:
    """One step of the simulation: totals and actions queued per rule."""

    as_of: int
    matched: int
    queued: int
    suppressed: int
    by_rule: dict[str, int]


@dataclass
class Simulation:
    """One set of playbooks simulated over the steps."""

    playbooks: list[dict[str, Any]]
    steps: list[StepSummary]
    rules: list[RuleSummary]
    suppression: dict[str, int]
    mix: dict[str, dict[str, int]]  # AIPL stage / lifecycle of targeted customers
    notes: list[str]

    @property
    def queued(self) -> int:
        return sum(s.queued for s in self.steps)


@dataclass
class DryRun:
    """A dry run (one step) or a backtest (many), with `--against` when asked."""

    steps: list[int]
    window: int
    engine: str
    timezone: str
    simulation: Simulation
    against: Simulation | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with stable keys (documented in docs/dry-run.md)."""
        return {
            "steps": [_iso(t, self.timezone) for t in self.steps],
            "window_days": self.window / DAY,
            "engine": self.engine,
            "timezone": self.timezone,
            "simulation": _simulation_dict(self.simulation, self.timezone),
            "against": None
            if self.against is None
            else _simulation_dict(self.against, self.timezone),
            "comparison": None if self.against is None else compare(self),
        }


def compare(report: DryRun) -> list[dict[str, Any]]:
    """Per rule, the new playbooks' figures next to the old ones' (impact, not text)."""
    assert report.against is not None
    new = {r.key: r for r in report.simulation.rules}
    old = {r.key: r for r in report.against.rules}
    rows = []
    for key in list(new) + [k for k in old if k not in new]:
        a, b = new.get(key), old.get(key)
        row: dict[str, Any] = {"rule": key, "status": _presence(a, b)}
        for name in ("matched", "queued", "customers", "coupon_cost"):
            va = getattr(a, name) if a else 0
            vb = getattr(b, name) if b else 0
            row[name] = {"new": va, "old": vb, "change": round(va - vb, 2)}
        sa = sum(a.suppressed.values()) if a else 0
        sb = sum(b.suppressed.values()) if b else 0
        row["suppressed"] = {"new": sa, "old": sb, "change": sa - sb}
        rows.append(row)
    return rows


def _presence(a: RuleSummary | None, b: RuleSummary | None) -> str:
    if a is None:
        return "removed"
    if b is None:
        return "added"
    return (
        "changed"
        if (a.matched, a.queued, a.suppressed)
        != (
            b.matched,
            b.queued,
            b.suppressed,
        )
        else "same"
    )


def steps_between(start: int, end: int, every: int) -> list[int]:
    """The moments start, start + every, ... up to and including end."""
    if every <= 0:
        raise UsageError("--every must be a positive duration, e.g. 1d or 7d")
    if end < start:
        raise UsageError("--to is before --from")
    count = (end - start) // every + 1
    if count > MAX_STEPS:
        raise UsageError(f"{count} steps is too many (at most {MAX_STEPS}): use a longer --every")
    return [start + k * every for k in range(count)]


def dry_run(
    db: str | os.PathLike[str],
    settings: Settings,
    playbooks: Sequence[Playbook],
    steps: Sequence[int],
    *,
    engine: str = "sql",
    since: int | None = None,
    window: int = DEFAULT_WINDOW,
    against: Sequence[Playbook] | None = None,
    progress: Callable[[int], None] | None = None,
    incremental: bool = True,
    inspect: Callable[[Store, Simulation], None] | None = None,
    actions_csv: str | os.PathLike[str] | None = None,
) -> DryRun:
    """Simulate `playbooks` at each of `steps` on a private copy of the store at `db`.

    `engine` defaults to "sql": both matchers select exactly the same (customer, rule)
    pairs (property-tested), and SQL is much faster over many steps; "auto" or "rules"
    match as a live run does by default.
    With `against`, the same simulation runs for those playbooks too (on a fresh copy).
    `progress` is called with 1 after each step of each simulation. `incremental=False`
    builds every step's features from scratch (the benchmark's naive baseline; the
    results are the same). `inspect`, if given, is called with the scratch store (its
    queue holds the simulated actions) and the simulation, before the copy is deleted.
    `actions_csv`: write the simulated actions (of `playbooks`, not `against`) there."""
    if not steps or list(steps) != sorted(set(steps)):
        raise UsageError("steps must be distinct moments in increasing order")
    if window <= 0:
        raise UsageError("--window must be a positive duration, e.g. 14d")
    check_distinct_names(playbooks)
    if against is not None:
        check_distinct_names(against)
    runs = [playbooks] + ([against] if against is not None else [])
    simulations: list[Simulation] = []
    for books in runs:
        with scratch_copy(db, concurrent=len(steps) > 1) as store:
            simulation = _simulate(
                store, settings, books, steps, engine, since, window, progress, incremental
            )
            if inspect is not None:
                inspect(store, simulation)
            if actions_csv is not None and not simulations:
                write_actions_csv(store, actions_csv, settings)
            simulations.append(simulation)
    return DryRun(
        steps=list(steps),
        window=window,
        engine=engine,
        timezone=settings.timezone,
        simulation=simulations[0],
        against=simulations[1] if against is not None else None,
    )


class _InPlace:
    """A simulation's features built on its own connection, step by step (stepped by a
    `FeatureStepper`, or from scratch); the event facts are left to the runs."""

    def __init__(
        self, store: Store, settings: Settings, steps: Sequence[int], incremental: bool
    ) -> None:
        self.store, self.settings, self.steps = store, settings, steps
        self.stepper = FeatureStepper(store, settings) if incremental else None

    def take(self, k: int) -> tuple[FeatureTable, None]:
        if self.stepper is not None:
            return self.stepper.advance(self.steps[k]), None
        return build_features(self.store, self.settings, self.steps[k]), None

    def finished(self, k: int, results: Sequence[RunResult]) -> None:
        pass

    def after(self, job: Callable[[sqlite3.Connection], None]) -> None:
        job(self.store.conn)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        if self.stepper is not None:
            self.stepper.close()


def _step_inputs(
    store: Store,
    settings: Settings,
    playbooks: Sequence[Playbook],
    steps: Sequence[int],
    engine: str,
    since: int | None,
    incremental: bool,
) -> Lookahead | _InPlace:
    """Where each step's features (and event facts) come from: built one step ahead on a
    second core (`engine.lookahead`) when there is one, else here."""
    if not worth_looking_ahead(store, len(steps)):
        return _InPlace(store, settings, steps, incremental)
    # A playbook's run at step k reads the events since its previous run (step k-1's), or
    # at the first step since its event cursor (or `since`).
    first = {p.name: event_start(store.conn, p, steps[0], since) for p in playbooks}

    def keys(k: int) -> list[tuple[str, int]]:
        starts = first if k == 0 else {n: max(t, steps[k - 1]) for n, t in first.items()}
        return event_keys(settings, playbooks, steps[k], starts)

    def conditions(k: int) -> list[StateCondition]:
        return [] if engine == "rules" else state_conditions(settings, playbooks, steps[k])

    return Lookahead(
        store, settings, steps, keys, conditions, event_needs(playbooks), incremental=incremental
    )


@contextmanager
def scratch_copy(db: str | os.PathLike[str], *, concurrent: bool = False) -> Iterator[Store]:
    """A private, writable copy of the store at `db` (opened read-only), deleted after.

    `concurrent`: another connection will read the copy while this one writes (a
    simulation's `Lookahead`): keep it in write-ahead-log mode."""
    path = Path(db)
    if not path.exists():
        raise StoreError(
            f"{path}: no such store (create one with `playbook ingest` or `playbook demo`)"
        )
    with tempfile.TemporaryDirectory(prefix="playbook-dryrun-") as folder:
        copy = Path(folder) / "scratch.db"
        try:
            source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                target = sqlite3.connect(copy)
                try:
                    source.backup(target)
                finally:
                    target.close()
            finally:
                source.close()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a playbook store ({exc})") from exc
        try:
            store = open_store(copy)
        except StoreError as exc:
            raise StoreError(str(exc).replace(str(copy), str(path))) from None
        try:
            # A scratch file needs no durability: no syncing, and no write-ahead log unless
            # a reader must not wait for the writer.
            if not concurrent:
                store.conn.execute("PRAGMA journal_mode = MEMORY")
            store.conn.execute("PRAGMA synchronous = OFF")
            # Steps re-read the temp tables (features, running totals, the run's decisions)
            # many times: give them a page cache of their own (SQLite's default is 2 MiB).
            store.conn.execute(f"PRAGMA temp.cache_size = -{TEMP_CACHE_KIB}")
            scratch_queue(store)
            yield store
        finally:
            store.close()


# What a simulation reads its queue by: a customer's actions (caps, cooldowns, whether a
# decision is already queued) and a step's runs (summaries, outcomes, totals, --actions).
SCRATCH_QUEUE_INDEXES = (
    "CREATE INDEX actions_customer_scheduled ON actions (customer_id, scheduled_at)",
    "CREATE INDEX scratch_run ON actions (run_id)",
)


def scratch_queue(store: Store) -> None:
    """Give a scratch copy's queue only the indexes a simulation reads.

    The store's queue is unique on `action_id`, a hash: each step's actions land all over
    that index, so a step rewrites most of its pages (a year of weekly steps spent a
    quarter of its time there). A scratch queue is written by one connection, whose runs
    never queue an action already there (`RunDecider` looks among the customer's actions
    when the copy's `QueueFilter` says it may be there), so it keeps the same columns and
    constraints without the index; the export indexes go too (nothing is exported from a
    copy)."""
    conn = store.conn
    columns = []
    for _, name, kind, notnull, default, _pk in conn.execute("PRAGMA main.table_info(actions)"):
        column = f'"{name}" {kind}' + (" NOT NULL" if notnull or name == "action_id" else "")
        if default is not None:
            column += f" DEFAULT {default}"
        columns.append(column)
    with store.transaction():
        conn.execute(f"CREATE TABLE main.scratch_actions ({', '.join(columns)})")
        conn.execute("INSERT INTO main.scratch_actions SELECT * FROM main.actions")
        conn.execute("DROP TABLE main.actions")
        conn.execute("ALTER TABLE main.scratch_actions RENAME TO actions")
        for sql in SCRATCH_QUEUE_INDEXES:
            conn.execute(sql)
    store.queue_filter = QueueFilter(conn)


def _simulate(
    store: Store,
    settings: Settings,
    playbooks: Sequence[Playbook],
    steps: Sequence[int],
    engine: str,
    since: int | None,
    window: int,
    progress: Callable[[int], None] | None,
    incremental: bool = True,
) -> Simulation:
    notes = _forget_the_future(store, playbooks, steps[0], settings)
    conn = store.conn
    conn.execute("DROP TABLE IF EXISTS temp.sim_runs")
    conn.execute("CREATE TEMP TABLE sim_runs (run_id TEXT PRIMARY KEY, as_of INTEGER)")
    conn.execute("DROP TABLE IF EXISTS temp.sim_mix")
    conn.execute("CREATE TEMP TABLE sim_mix (kind TEXT, value TEXT, n INTEGER)")
    rules: dict[str, RuleSummary] = {}
    for playbook in playbooks:
        for rule in sorted(playbook.rules, key=lambda r: r.priority):
            summary = RuleSummary(playbook.name, rule.id, "event" if rule.on else "state")
            rules[summary.key] = summary
    step_summaries = []
    outcomes, totals = _Outcomes(store, window), _Totals()
    inputs = _step_inputs(store, settings, playbooks, steps, engine, since, incremental)
    try:
        for k, moment in enumerate(steps):
            features, prepared = inputs.take(k)
            results = run_playbooks(
                store,
                settings,
                playbooks,
                as_of=moment,
                engine=engine,
                since=since,
                features=features,
                prepared=prepared,
            )
            run_ids = [r.run_id for r in results]
            step_summaries.append(_step(store, results, rules, features.ref))
            inputs.finished(k, results)
            inputs.after(partial(outcomes.add_step, as_of=moment, run_ids=run_ids))
            inputs.after(partial(totals.add_step, run_ids=run_ids))
            if progress is not None:
                progress(1)
        inputs.drain()
    finally:
        inputs.close()
    totals.summarize(playbooks, rules)
    outcomes.summarize(rules)
    suppression: Counter[str] = Counter()
    for summary in rules.values():
        suppression.update(summary.suppressed)
    mix: dict[str, dict[str, int]] = {"aipl": {}, "lifecycle": {}}
    for kind, value, n in conn.execute(
        "SELECT kind, coalesce(value, 'none'), sum(n) FROM temp.sim_mix GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        mix[kind][value] = n
    return Simulation(
        playbooks=[
            {"name": p.name, "version": p.version, "hash": p.content_hash} for p in playbooks
        ],
        steps=step_summaries,
        rules=list(rules.values()),
        suppression={r: suppression[r] for r in REASONS if suppression.get(r)},
        mix=mix,
        notes=notes,
    )


ACTION_COLUMNS = (
    "step",
    "playbook",
    "rule_id",
    "customer_id",
    "trigger",
    "type",
    "channel",
    "status",
    "reason",
    "detail",
    "coupon",
    "group_name",
    "tags_added",
    "tags_removed",
    "assign_to",
    "scheduled_at",
    "message",
)


def write_actions_csv(store: Store, path: str | os.PathLike[str], settings: Settings) -> int:
    """Write the simulation's actions (one row each, suppressed ones with their reason) as
    CSV, in step order; times in the store's timezone. Returns the number of rows."""
    tz = settings.tz
    columns = ", ".join(f"a.{c}" for c in ACTION_COLUMNS[1:])
    rows = store.conn.execute(
        f"SELECT s.as_of, {columns} FROM actions a JOIN temp.sim_runs s USING (run_id) "
        "ORDER BY s.as_of, a.playbook, a.rule_id, a.customer_id, a.trigger, a.action_index"
    )
    scheduled = ACTION_COLUMNS.index("scheduled_at")
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ACTION_COLUMNS)
        for row in rows:
            values = list(row)
            values[0] = format_epoch(values[0], tz)
            values[scheduled] = format_epoch(values[scheduled], tz)
            writer.writerow(values)
            count += 1
    return count


def _forget_the_future(
    store: Store, playbooks: Sequence[Playbook], start: int, settings: Settings
) -> list[str]:
    """Remove from the copy what was recorded at or after `start` (see the docstring)."""
    notes = []
    with store.transaction() as conn:
        undone = _undo_tags(conn, start)
        if undone:
            notes.append(
                f"tags changed by {undone} tag actions decided at or after the first step "
                "were undone"
            )
        gone = conn.execute("DELETE FROM actions WHERE decided_at >= ?", (start,)).rowcount
        conn.execute("DELETE FROM runs WHERE as_of >= ?", (start,))
        if gone:
            notes.append(
                f"{gone} queued actions decided at or after the first step were set aside "
                "(the simulation cannot know them yet)"
            )
        for playbook in playbooks:
            newer = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM rule_state WHERE playbook = ? AND "
                "changed_at > ?) OR EXISTS (SELECT 1 FROM event_cursor WHERE playbook = ? "
                "AND until > ?)",
                (playbook.name, start, playbook.name, start),
            ).fetchone()[0]
            if newer:
                conn.execute("DELETE FROM rule_state WHERE playbook = ?", (playbook.name,))
                conn.execute("DELETE FROM event_cursor WHERE playbook = ?", (playbook.name,))
                notes.append(
                    f"playbook {playbook.name} has live state newer than "
                    f"{format_epoch(start, settings.tz)}: simulated as if switched on then"
                )
    return notes


def _undo_tags(conn: sqlite3.Connection, start: int) -> int:
    """Reverse, newest first, the tag changes of queued tag actions decided from `start`."""
    changes = conn.execute(
        "SELECT a.customer_id, a.tags_added, a.tags_removed, c.tags FROM actions a JOIN "
        "customers c USING (customer_id) WHERE a.type = 'tag' AND a.status != 'suppressed' "
        "AND a.decided_at >= ? ORDER BY a.decided_at DESC, a.rowid DESC",
        (start,),
    ).fetchall()
    write_tag_changes(conn, changes, undo=True)
    return len(changes)


def _step(
    store: Store, results: list[RunResult], rules: dict[str, RuleSummary], features: str
) -> StepSummary:
    conn = store.conn
    by_rule: dict[str, int] = {}
    matched = queued = suppressed = 0
    for result in results:
        conn.execute("INSERT INTO temp.sim_runs VALUES (?, ?)", (result.run_id, result.as_of))
        for report in result.rules:
            summary = rules[f"{result.playbook}/{report.rule_id}"]
            summary.matched += report.matched
            summary.queued += report.queued
            for reason, n in report.suppressed.items():
                summary.suppressed[reason] = summary.suppressed.get(reason, 0) + n
            if report.queued:
                by_rule[summary.key] = report.queued
        matched += sum(r.matched for r in result.rules)
        queued += result.queued
        suppressed += result.suppressed
    run_ids = [r.run_id for r in results]
    marks = ", ".join("?" for _ in run_ids)
    # The step's targeted customers (a fraction of all), each looked up in the features.
    mix = conn.execute(
        "SELECT f.aipl_stage, f.lifecycle, count(*) FROM (SELECT DISTINCT customer_id FROM "
        f"actions WHERE run_id IN ({marks}) AND status != 'suppressed') a "
        f"CROSS JOIN {features} f ON f.customer_id = a.customer_id GROUP BY 1, 2",
        run_ids,
    ).fetchall()
    conn.executemany(
        "INSERT INTO temp.sim_mix VALUES (?, ?, ?)",
        [("aipl", aipl, n) for aipl, _, n in mix]
        + [("lifecycle", lifecycle, n) for _, lifecycle, n in mix],
    )
    as_of = results[0].as_of if results else 0
    return StepSummary(as_of, matched, queued, suppressed, by_rule)


class _Totals:
    """Per rule: the distinct customers it acted on over all steps and the coupons it
    queued, added step by step (like `_Outcomes`: on any connection to the store, from
    either thread of a simulation; the customers are kept here, as sets)."""

    def __init__(self) -> None:
        self.coupons: Counter[tuple[str, str, str]] = Counter()
        self.customers: dict[str, set[str]] = defaultdict(set)
        self.lock = threading.Lock()

    def add_step(self, conn: sqlite3.Connection, run_ids: Sequence[str]) -> None:
        runs = json.dumps(list(run_ids))
        # One row per rule, its customers in one JSON list: a row at a time would hand
        # the interpreter back and forth between the threads for each customer.
        acted = conn.execute(
            "SELECT playbook, rule_id, json_group_array(DISTINCT customer_id) FROM actions "
            "WHERE run_id IN (SELECT value FROM json_each(?)) AND status != 'suppressed' "
            "GROUP BY 1, 2",
            (runs,),
        ).fetchall()
        coupons = conn.execute(
            "SELECT playbook, rule_id, coupon, count(*) FROM actions WHERE run_id IN "
            "(SELECT value FROM json_each(?)) AND status != 'suppressed' AND coupon IS NOT "
            "NULL GROUP BY 1, 2, 3",
            (runs,),
        ).fetchall()
        with self.lock:
            for playbook, rule, customers in acted:
                self.customers[f"{playbook}/{rule}"].update(json.loads(customers))
            for playbook, rule, coupon, n in coupons:
                self.coupons[(playbook, rule, coupon)] += n

    def summarize(self, playbooks: Sequence[Playbook], rules: dict[str, RuleSummary]) -> None:
        values = {(p.name, code): c.value for p in playbooks for code, c in p.coupons.items()}
        for key, customers in self.customers.items():
            rules[key].customers = len(customers)
        for (playbook, rule, coupon), n in sorted(self.coupons.items()):
            cost = round(n * values.get((playbook, coupon), 0), 2)
            rules[f"{playbook}/{rule}"].coupon_cost += cost


# One row per decision of a step's runs (a rule, a customer, a trigger): whether any of its
# actions went out, whether the holdout kept it back, whether caps or a group stopped it;
# and what the customer ordered within the window after the step.
_DECISIONS_SQL = """
WITH d AS (
  SELECT a.playbook, a.rule_id, a.customer_id,
         max(a.status != 'suppressed') AS acted,
         max(a.reason = 'holdout') AS held,
         max(a.reason IN ('cap', 'group')) AS blocked
  FROM actions a WHERE a.run_id IN (SELECT value FROM json_each(:runs))
  GROUP BY a.playbook, a.rule_id, a.customer_id, a.trigger
),
-- Each customer's orders in the window, read once (a customer may have many decisions).
w AS (
  SELECT o.customer_id, count(*) AS n, sum(o.amount_cents) AS cents
  FROM orders o WHERE o.customer_id IN (SELECT customer_id FROM d)
    AND o.ts >= :as_of AND o.ts < :as_of + :window
  GROUP BY o.customer_id
)
SELECT d.playbook, d.rule_id, d.acted, d.held, d.blocked, coalesce(w.n, 0),
       coalesce(w.cents, 0)
         - (SELECT coalesce(sum(f.amount_cents), 0) FROM refunds f
          WHERE f.customer_id = d.customer_id AND f.ts >= :as_of
            AND f.ts < :as_of + :window)
FROM d LEFT JOIN w ON w.customer_id = d.customer_id
"""


@dataclass
class _Group:
    """Customers of one kind (targeted, holdout, blocked) of one rule: how many, how many
    ordered, their revenue (in cents: sums are exact in any order)."""

    n: int = 0
    buyers: int = 0
    cents: int = 0
    squares: int = 0  # sum of cents squared

    def add(self, bought: bool, cents: int) -> None:
        self.n += 1
        self.buyers += bought
        self.cents += cents
        self.squares += cents * cents

    @property
    def revenue(self) -> float:
        return self.cents / 100


class _Outcomes:
    """Per rule, its decisions' groups, added step by step (each step's once its runs have
    committed, on any connection to the store: a `Lookahead`'s builder does it)."""

    def __init__(self, store: Store, window: int) -> None:
        self.window = window
        # Outcome windows end at the last thing the history recorded.
        self.end = store.conn.execute(
            "SELECT max(coalesce((SELECT max(ts) FROM orders), 0), "
            "coalesce((SELECT max(ts) FROM events), 0))"
        ).fetchone()[0]
        self.groups: dict[str, dict[str, _Group]] = defaultdict(
            lambda: {"targeted": _Group(), "holdout": _Group(), "blocked": _Group()}
        )
        self.incomplete: Counter[str] = Counter()
        self.lock = threading.Lock()  # steps may be added from two threads at once

    def add_step(self, conn: sqlite3.Connection, as_of: int, run_ids: Sequence[str]) -> None:
        """Add the decisions of the runs `run_ids` (a step at `as_of`)."""
        cut = as_of + self.window > self.end
        rows = conn.execute(
            _DECISIONS_SQL,
            {"runs": json.dumps(list(run_ids)), "as_of": as_of, "window": self.window},
        ).fetchall()
        with self.lock:
            self._add(rows, cut)

    def _add(self, rows: list[Any], cut: bool) -> None:
        for playbook, rule, acted, held, blocked, orders, cents in rows:
            key = f"{playbook}/{rule}"
            if cut:
                self.incomplete[key] += 1
                continue
            group = "targeted" if acted else "holdout" if held else "blocked" if blocked else None
            if group is not None:
                self.groups[key][group].add(orders > 0, cents)

    def summarize(self, rules: dict[str, RuleSummary]) -> None:
        for key, summary in rules.items():
            g = self.groups[key]
            summary.outcome = _compare(
                g["targeted"], g["holdout"], g["blocked"], self.incomplete[key]
            )


def _compare(targeted: _Group, holdout: _Group, blocked: _Group, incomplete: int) -> Outcome:
    if holdout.n:
        comparison: str | None = "holdout"
        control = holdout
    elif blocked.n:
        comparison, control = "suppressed by caps or group", blocked
    else:
        comparison, control = None, _Group()
    rate = rate_ci = revenue = revenue_ci = None
    if comparison is None:
        verdict = "nothing to compare with: no holdout, and caps or groups stopped no match"
    elif targeted.n == 0:
        verdict = "nothing to compare: the rule would have acted on no one"
    else:
        p1, p2 = targeted.buyers / targeted.n, control.buyers / control.n
        rate = p1 - p2
        se = math.sqrt(p1 * (1 - p1) / targeted.n + p2 * (1 - p2) / control.n)
        rate_ci = (rate - Z95 * se, rate + Z95 * se)
        m1, m2 = targeted.revenue / targeted.n, control.revenue / control.n
        revenue = m1 - m2
        rse = math.sqrt(_variance(targeted) / targeted.n + _variance(control) / control.n)
        revenue_ci = (revenue - Z95 * rse, revenue + Z95 * rse)
        verdict = _verdict(targeted, control, rate, rate_ci, comparison)
    return Outcome(
        comparison=comparison,
        targeted=targeted.n,
        targeted_buyers=targeted.buyers,
        targeted_revenue=round(targeted.revenue, 2),
        control=control.n,
        control_buyers=control.buyers,
        control_revenue=round(control.revenue, 2),
        rate_difference=rate,
        rate_ci=rate_ci,
        revenue_difference=revenue,
        revenue_ci=revenue_ci,
        verdict=verdict,
        incomplete_window=incomplete,
    )


def _variance(group: _Group) -> float:
    """The sample variance of the group's revenue per customer (in yuan squared)."""
    if group.n < 2:
        return 0.0
    n = group.n
    return max(n * group.squares - group.cents * group.cents, 0) / (n * (n - 1)) / 10_000


def _verdict(
    targeted: _Group,
    control: _Group,
    rate: float,
    ci: tuple[float, float],
    comparison: str,
) -> str:
    small = [
        name
        for name, g in (("targeted", targeted), (comparison, control))
        if g.n < MIN_GROUP or g.buyers < MIN_EVENTS or g.n - g.buyers < MIN_EVENTS
    ]
    if small:
        return (
            f"too few customers to tell ({targeted.n} targeted with {targeted.buyers} "
            f"ordering, {control.n} {comparison} with {control.buyers})"
        )
    low, high = (100 * x for x in ci)
    interval = f"95% CI {low:+.1f} to {high:+.1f}"
    if low > 0:
        return f"targeted customers ordered more: {100 * rate:+.1f} pts ({interval})"
    if high < 0:
        return f"targeted customers ordered less: {100 * rate:+.1f} pts ({interval})"
    return (
        f"no clear difference: {100 * rate:+.1f} pts, 95% CI {low:+.1f} to {high:+.1f} includes 0"
    )


def _iso(moment: int, timezone: str) -> str:
    from engine.clock import get_timezone

    return format_epoch(moment, get_timezone(timezone)) or ""


def _simulation_dict(sim: Simulation, timezone: str) -> dict[str, Any]:
    return {
        "playbooks": sim.playbooks,
        "queued": sim.queued,
        "steps": [
            {
                "as_of": _iso(s.as_of, timezone),
                "matched": s.matched,
                "queued": s.queued,
                "suppressed": s.suppressed,
                "queued_by_rule": s.by_rule,
            }
            for s in sim.steps
        ],
        "rules": [
            {
                "rule": r.key,
                "playbook": r.playbook,
                "id": r.rule,
                "kind": r.kind,
                "matched": r.matched,
                "queued": r.queued,
                "suppressed": r.suppressed,
                "customers": r.customers,
                "coupon_cost": r.coupon_cost,
                "outcome": None if r.outcome is None else _outcome_dict(r.outcome),
            }
            for r in sim.rules
        ],
        "suppression": sim.suppression,
        "mix": sim.mix,
        "notes": sim.notes,
    }


def _outcome_dict(outcome: Outcome) -> dict[str, Any]:
    data = asdict(outcome)
    data["targeted_rate"] = outcome.targeted_rate
    data["control_rate"] = outcome.control_rate
    for key in ("rate_ci", "revenue_ci"):
        if data[key] is not None:
            data[key] = list(data[key])
    return data


def dry_run_text(report: DryRun) -> str:
    """The table view: per rule, per step, outcomes; side by side with --against."""
    from engine.render import table

    tz = report.timezone
    sim = report.simulation
    first, last = _iso(report.steps[0], tz), _iso(report.steps[-1], tz)
    span = first if len(report.steps) == 1 else f"{first} to {last}, {len(report.steps)} steps"
    names = ", ".join(f"{p['name']} v{p['version']}" for p in sim.playbooks)
    out = [f"dry run of {names} ({span}); nothing was written to the store", ""]
    out += [f"note: {n}" for n in sim.notes]
    out.append(
        table(
            ["rule", "kind", "matched", "would send", "suppressed", "customers", "coupon cost"],
            (
                [
                    r.key,
                    r.kind,
                    r.matched,
                    r.queued,
                    ", ".join(f"{k} {v}" for k, v in r.suppressed.items()) or "-",
                    r.customers,
                    f"{r.coupon_cost:,.2f}",
                ]
                for r in sim.rules
            ),
        )
    )
    if len(sim.steps) > 1:
        out += [
            "",
            table(
                ["step", "matched", "would send", "suppressed"],
                ([_iso(s.as_of, tz), s.matched, s.queued, s.suppressed] for s in sim.steps),
            ),
        ]
    out += ["", f"outcomes: orders within {report.window / DAY:g} days after each step", ""]
    out.append(
        table(
            ["rule", "targeted", "ordered", "compared with", "n", "ordered", "verdict"],
            (
                [
                    r.key,
                    o.targeted,
                    _share(o.targeted_rate),
                    o.comparison or "-",
                    o.control,
                    _share(o.control_rate),
                    o.verdict
                    + (f" ({o.incomplete_window} too recent)" if o.incomplete_window else ""),
                ]
                for r in sim.rules
                if (o := r.outcome) is not None
            ),
        )
    )
    if report.against is not None:
        old = ", ".join(f"{p['name']} v{p['version']}" for p in report.against.playbooks)
        out += ["", f"against {old} (new - old):", ""]
        rows = compare(report)
        out.append(
            table(
                ["rule", "", "matched", "would send", "suppressed", "customers", "coupon cost"],
                (comparison_row(row) for row in rows),
            )
        )
    return "\n".join(out)


def _share(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _change(values: dict[str, Any], money: bool = False) -> str:
    new, change = values["new"], values["change"]
    text = f"{new:,.2f}" if money else f"{new:,}"
    if change:
        text += f" ({change:+,.2f})" if money else f" ({change:+,})"
    return text


def comparison_row(row: dict[str, Any]) -> list[str]:
    """One row of `compare` as text: each figure new, with the change when there is one."""
    return [
        row["rule"],
        row["status"],
        _change(row["matched"]),
        _change(row["queued"]),
        _change(row["suppressed"]),
        _change(row["customers"]),
        _change(row["coupon_cost"], money=True),
    ]
