"""Benchmark: `run_playbooks(engine="sql")` with every example playbook on a large store,
against a hand-written SQL baseline that only selects the matching (customer, rule) pairs;
and the durable-rules matcher against a bare durable-rules Host.

    .venv/bin/python bench/run.py                         # 1M customers, 5M orders
    .venv/bin/python bench/run.py --customers 20000       # quick

The store (generated once under bench/out/, reused while the sizes and generator match)
is bench/features.py's seeded store - customers, orders over two years, ~2% refunds,
friend/group events - plus, from a second seed, what the example playbooks read beyond
that: customer tags (vip, kol, member, birthday-this-month) and events that carry
properties (group joins with the group, top-ups with amount and bonus, memberships,
referrals, coupon redemptions, replies).

Each measurement runs in a fresh interpreter (peak RSS is its own); features are built
once in it (timed, but part of no figure). The SQL measurement, on a fresh copy of the
store:

  baseline  for each state rule (no `on:`; enabled and in its date window), the rule's
            condition compiled by engine.match.sql.condition_sql and run as
            `SELECT f.customer_id FROM temp.features f WHERE <condition>`, rows fetched;
            and for each event type with live rules, over the events the run reads (the
            day before AS_OF), one query with the features those rules read written out
            by hand as of right after each event (correlated subqueries on the covering
            indexes) into a temp table, from which each rule selects its pairs with the
            same compiled condition: the least any engine must do to know the same
            (customer, rule) pairs the run matches. Best of three. (Until
            2026-11-22 the baseline had the state rules only; that ratio is reported too.)
  engine    `run_playbooks(store, settings, playbooks, as_of=..., engine="sql")` for all
            playbooks together, with `engine.run.build_features` answering the full build
            with the table already built. Everything but the features build: matching,
            event facts, policies, queue writes, tags, messages; its parts are timed too.

in two scenarios, each on its own fresh copy of the store:

  daily     the run operators make every day: the playbooks already ran the day before
            (an untimed run as of AS_OF - 1 day), so state rules fire for the customers
            who entered a condition since, and event rules for the day's events. The
            ratio target applies here.
  first     the playbooks' first run ever on this store: every customer matching a state
            rule enters it at once, and every match is decided and written (millions of
            queue rows). Reported with the cost of the bare row writes for scale.

The durable-rules measurement (read-only store): every customer's features row asserted
(and retracted) through `DurableMatcher`, one matcher per playbook with its live state
rules as `playbook run --engine rules` builds them, against a bare durable-rules Host
(no dispatch threads) with the same rulesets (`compile_rulesets`) asserting and
retracting facts encoded beforehand. Customers per second for each, alternating in
chunks; both must find the SQL baseline's pairs.

A measurement that passes --time-limit is stopped; the figures then say where it was.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import features as features_bench
from _common import (
    OUT_DIR,
    REPO_ROOT,
    Figures,
    Params,
    add_phase_arguments,
    emit_json,
    engine_revision,
    io_mib,
    log,
    peak_rss_mib,
    remove_db,
    run_context,
    run_phase_here,
    run_phase_in_child,
    vm_hwm_mib,
    warm_file,
    warn_if_busy,
)

# The engine is imported only inside the phases, which run in child processes: the
# parent stays small so it cannot inflate any child's peak RSS.

SCRIPT = Path(__file__).resolve()
EXTRAS_VERSION = 1  # bump when the generated tags / extra events change
EXTRAS_SEED = 20250103
AS_OF = features_bench.AS_OF  # the features store's history ends here
AS_OF_TEXT = features_bench.AS_OF_TEXT
PLAYBOOKS = sorted((REPO_ROOT / "playbooks").glob("*.yaml"))
RATIO_TARGET = 2.0
RSS_TARGET_MIB = 1024
DURABLE_RATIO_TARGET = 1.5
BASELINE_REPEAT = 3
DEFAULT_TIME_LIMIT = 900.0
WINDOW_SECONDS = 86_400  # a first run's event rules read the day before the as-of
DAY_SECONDS = 86_400

# Tags some customers already carry (share of customers), as a SCRM would have set them.
TAG_SHARES = {"vip": 0.03, "kol": 0.005, "member": 0.01}
BIRTHDAY_SHARE_OF_VIPS = 0.08  # "birthday-this-month", set on vips at the start of a month
# Extra events per customer over their history, with the properties the catalog knows.
EXTRA_EVENTS = {
    "group.joined": 0.10,
    "balance.topped_up": 0.03,
    "membership.bought": 0.01,
    "referral.made": 0.03,
    "coupon.redeemed": 0.15,
    "message.replied": 0.40,
}
GROUPS = ("new-member-welcome", "vip-club", "skincare-lovers", "flash-sale", "makeup-tips")
TOP_UPS = ((500, 50), (1000, 100), (2000, 200), (5000, 600))
PLANS = (("annual", 199), ("quarterly", 69))
COUPONS = ("HOT20", "REPEAT15", "THIRD20", "SMALL10", "DEV30", "FRIEND50")
REPLIES = ("好的", "谢谢", "多少钱", "什么时候发货", "收到了，很好用", "有小样吗")
BATCH = 50_000

# Set in a child from --result-file: where a stopped measurement writes its figures.
_RESULT_FILE: str | None = None


def main() -> None:
    global _RESULT_FILE
    parser = argparse.ArgumentParser(
        description="Benchmark run_playbooks (engine=sql) against a bare matching query."
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument(
        "--orders", type=int, default=None, help="default: 5 per customer (5M at 1M)"
    )
    parser.add_argument(
        "--events", type=int, default=None, help="default: 1.5 per customer (1.5M at 1M)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        help="stop a measurement after this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--durable-customers",
        type=int,
        default=None,
        help="customers asserted in the durable-rules measurement (default: all)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where stores go")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the store")
    add_phase_arguments(parser)
    args = parser.parse_args()
    if args.phase:
        _RESULT_FILE = args.result_file
        run_phase_here(
            args,
            {"generate": phase_generate, "measure": phase_measure, "durable": phase_durable},
        )
        return
    run_benchmark(args)


# --------------------------------------------------------------------------- parent


def run_benchmark(args: argparse.Namespace) -> None:
    if args.customers < 1:
        raise SystemExit("--customers must be at least 1")
    if args.customers >= 1 << features_bench.CUSTOMER_BITS:
        raise SystemExit(f"--customers must be below {1 << features_bench.CUSTOMER_BITS}")
    orders = args.orders if args.orders is not None else args.customers * 5
    events = (
        args.events
        if args.events is not None
        else round(args.customers * features_bench.EVENTS_PER_CUSTOMER)
    )
    revision = engine_revision()
    machine_start = warn_if_busy("at the start")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_spec = {
        "generator": features_bench.GENERATOR_VERSION,
        "seed": features_bench.SEED,
        "as_of": AS_OF,
        "customers": args.customers,
        "orders": orders,
        "events": events,
        "refund_rate": features_bench.REFUND_RATE,
    }
    spec = {**base_spec, "extras": EXTRAS_VERSION, "extras_seed": EXTRAS_SEED}
    db = out / f"run-c{args.customers}-o{orders}-e{events}.db"
    log(
        f"run benchmark: {args.customers:,} customers, {orders:,} orders, {events:,} events, "
        f"{len(PLAYBOOKS)} playbooks, as of {AS_OF_TEXT} ({AS_OF}); store {db}"
    )
    generation: Figures | None = None
    reused = not args.regenerate and features_bench.stored_meta(db, "bench_run_spec") == spec
    if reused:
        log("store already generated with these sizes: reused (use --regenerate to rebuild)")
    else:
        log("generating the store (not part of the figures) ...")
        generation = run_phase_in_child(
            SCRIPT, "generate", {"db": str(db), "base_spec": base_spec, "spec": spec}
        )
        log(
            f"generated in {generation['seconds']:.1f}s (peak RSS {generation['peak_rss_mib']} MiB)"
        )
    counts = table_counts(db)
    log("rows: " + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    window = window_counts(db)
    log("in the event rules' window: " + ", ".join(f"{k} {n:,}" for k, n in window.items()))
    log(f"store file {db.stat().st_size / 2**20:,.0f} MiB; warming the OS page cache ...")
    log(f"read it in {warm_file(db):.1f}s")

    work = out / "run-work.db"
    scenarios: dict[str, Figures] = {}
    for scenario in ("daily", "first"):
        log(f"scenario {scenario}: copying the store for the engine run ...")
        remove_db(work)
        shutil.copyfile(db, work)
        scenarios[scenario] = run_phase_in_child(
            SCRIPT,
            "measure",
            {"db": str(work), "time_limit": args.time_limit, "scenario": scenario},
        )
        remove_db(work)
        report_sql(scenarios[scenario])
    if not (REPO_ROOT / "engine" / "match" / "durable.py").exists():  # no engine import here
        # TODO: measured as soon as engine/match/durable.py exists.
        durable: Figures = {"skipped": "engine/match/durable.py does not exist"}
    else:
        durable = run_phase_in_child(
            SCRIPT,
            "durable",
            {"db": str(db), "time_limit": args.time_limit, "customers": args.durable_customers},
        )
        report_durable(durable, scenarios["first"]["baseline_pairs"])

    figures = summarise(args, db, counts, spec, reused, generation, scenarios, durable)
    figures["events_in_window"] = window
    figures.update(run_context(revision, machine_start))
    emit_json(figures)


def report_sql(result: Figures) -> None:
    log(f"scenario {result['scenario']}:")
    log(
        f"features {result['features_s']:.2f}s (excluded); baseline best "
        f"{result['baseline_s']:.2f}s: {result['baseline_state_s']:.2f}s for "
        f"{result['baseline_pairs']:,} (customer, rule) pairs of {result['baseline_rules']} "
        f"state rules, {result['baseline_event_s']:.2f}s for "
        f"{sum(result['baseline_event_pairs'].values()):,} (customer, event) pairs of "
        f"{len(result['baseline_event_pairs'])} event rules"
    )
    if result.get("stopped"):
        log(f"run_playbooks STOPPED after {result['engine_s']:.0f}s: {result['stopped']}")
    else:
        log(
            f"run_playbooks {result['engine_s']:.2f}s ({result['queued']:,} queued, "
            f"{result['suppressed']:,} suppressed, {result['messages']:,} messages rendered)"
        )
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["parts_s"].items())
    log(f"  of which: {parts}")
    log(f"peak RSS {result['peak_rss_mib']} MiB (VmHWM {result['vm_hwm_mib']} MiB)")


def report_durable(result: Figures, sql_pairs: int) -> None:
    if result.get("stopped"):
        log(f"durable STOPPED: {result['stopped']}")
    log(
        f"durable: {result['customers']:,} customers x {result['playbooks']} playbooks "
        f"({result['rules']} state rules): DurableMatcher {result['matcher_per_s']:,.0f} "
        f"customers/s, bare Host {result['raw_per_s']:,.0f} customers/s; "
        f"peak RSS {result['peak_rss_mib']} MiB"
    )
    pairs = result["matcher_pairs"], result["raw_pairs"]
    same = "the SQL baseline's" if pairs == (sql_pairs, sql_pairs) else f"SQL: {sql_pairs:,}"
    log(f"durable pairs: matcher {pairs[0]:,}, bare Host {pairs[1]:,} ({same})")


def summarise(
    args: argparse.Namespace,
    db: Path,
    counts: dict[str, int],
    spec: dict[str, Any],
    reused: bool,
    generation: Figures | None,
    scenarios: dict[str, Figures],
    durable: Figures,
) -> Figures:
    sql, first = scenarios["daily"], scenarios["first"]
    finished = not sql.get("stopped")
    baseline_s = sql["baseline_s"]
    ratio = sql["engine_s"] / baseline_s if baseline_s else None
    state_ratio = sql["engine_s"] / sql["baseline_state_s"] if sql["baseline_state_s"] else None
    if ratio is not None:
        bound = "" if finished else "at least "
        verdict = "meets" if finished and ratio <= RATIO_TARGET else "MISSES"
        log(
            f"daily run: run_playbooks/baseline {bound}{ratio:.2f} "
            f"({verdict} target <= {RATIO_TARGET}); against the state rules' part of the "
            f"baseline alone (as measured before 2026-11-22's second session) "
            f"{bound}{state_ratio:.2f}"
        )
    first_ratio = first["engine_s"] / first["baseline_s"] if first["baseline_s"] else None
    if first_ratio is not None:
        log(
            f"first run: run_playbooks/baseline {first_ratio:.2f}; writing its "
            f"{first['queued'] + first['suppressed']:,} queue rows alone (bare INSERT of the "
            f"same rows into an empty queue) {first['write_floor_s']:.2f}s = "
            f"{first['write_floor_s'] / first['baseline_s']:.2f}x the baseline"
        )
    durable_ratio = None
    if durable.get("matcher_per_s"):
        durable_ratio = durable["raw_per_s"] / durable["matcher_per_s"]
        verdict = "meets" if durable_ratio <= DURABLE_RATIO_TARGET else "MISSES"
        log(
            f"DurableMatcher time / bare Host time {durable_ratio:.2f} "
            f"({verdict} target <= {DURABLE_RATIO_TARGET})"
        )
    peaks = [
        sql["peak_rss_mib"],
        first["peak_rss_mib"],
        *([durable["peak_rss_mib"]] if "peak_rss_mib" in durable else []),
    ]
    peak = max(peaks)
    verdict = "meets" if peak <= RSS_TARGET_MIB else "MISSES"
    log(f"peak RSS {peak} MiB ({verdict} target <= {RSS_TARGET_MIB} MiB)")
    return {
        "benchmark": "run",
        "customers": counts["customers"],
        "orders": counts["orders"],
        "refunds": counts["refunds"],
        "events": counts["events"],
        "customers_tagged": counts["customers_tagged"],
        "as_of": AS_OF_TEXT,
        "playbooks": len(PLAYBOOKS),
        "state_rules": sql["state_rules"],
        "event_rules": sql["event_rules"],
        "store": str(db),
        "store_mib": round(db.stat().st_size / 2**20, 1),
        "store_reused": reused,
        "store_spec": spec,
        "generation_s": None if generation is None else round(generation["seconds"], 2),
        "features_s": round(sql["features_s"], 3),
        "baseline_s": round(baseline_s, 3),
        "baseline_s_runs": [round(s, 3) for s in sql["baseline_s_runs"]],
        "baseline_state_s": round(sql["baseline_state_s"], 3),
        "baseline_event_s": round(sql["baseline_event_s"], 3),
        "baseline_pairs": sql["baseline_pairs"],
        "baseline_rules": sql["baseline_rules"],
        "baseline_event_pairs": sql["baseline_event_pairs"],
        "event_pairs_differ": sql["event_pairs_differ"],
        "engine_s": round(sql["engine_s"], 3),
        "engine_finished": finished,
        "engine_stopped": sql.get("stopped"),
        "time_limit_s": args.time_limit,
        "ratio_engine_to_baseline": None if ratio is None else round(ratio, 3),
        "ratio_engine_to_state_baseline": None if state_ratio is None else round(state_ratio, 3),
        "ratio_is_lower_bound": not finished,
        "ratio_target": RATIO_TARGET,
        "meets_ratio_target": finished and ratio is not None and ratio <= RATIO_TARGET,
        "schema_indexes_added_to_copy": sql["schema_added"],
        "engine_playbooks": sql["playbooks"],
        "engine_parts_s": sql["parts_s"],
        "queued": sql["queued"],
        "suppressed": sql["suppressed"],
        "messages_rendered": sql["messages"],
        "engine_peak_rss_mib": sql["peak_rss_mib"],
        "engine_vm_hwm_mib": sql["vm_hwm_mib"],
        "first_run": {
            "baseline_s": round(first["baseline_s"], 3),
            "baseline_pairs": first["baseline_pairs"],
            "engine_s": round(first["engine_s"], 3),
            "engine_finished": not first.get("stopped"),
            "ratio_engine_to_baseline": None if first_ratio is None else round(first_ratio, 3),
            "queue_rows_written": first["queued"] + first["suppressed"],
            "write_floor_s": round(first["write_floor_s"], 3),
            "engine_playbooks": first["playbooks"],
            "engine_parts_s": first["parts_s"],
            "queued": first["queued"],
            "suppressed": first["suppressed"],
            "messages_rendered": first["messages"],
            "peak_rss_mib": first["peak_rss_mib"],
        },
        "durable": durable,
        "durable_ratio_matcher_to_raw": None if durable_ratio is None else round(durable_ratio, 3),
        "durable_ratio_target": DURABLE_RATIO_TARGET,
        "meets_durable_ratio_target": durable_ratio is not None
        and durable_ratio <= DURABLE_RATIO_TARGET,
        "peak_rss_mib": peak,
        "rss_target_mib": RSS_TARGET_MIB,
        "meets_rss_target": peak <= RSS_TARGET_MIB,
        "rss_method": "ru_maxrss (RUSAGE_SELF) of each measuring child process (features "
        "build included), started via /bin/sh so it does not inherit the parent's peak; "
        "vm_hwm is a cross-check",
        "parent_peak_rss_mib": peak_rss_mib(),
        "data_shape": features_bench.stored_meta(db, "bench_shape"),
    }


def table_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        counts = {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("customers", "orders", "refunds", "events")
        }
        counts["customers_tagged"] = int(
            conn.execute("SELECT count(*) FROM customers WHERE tags != '[]'").fetchone()[0]
        )
        return counts
    finally:
        conn.close()


def window_counts(db: Path) -> dict[str, int]:
    """Orders and events in the 24 hours a first run's event rules consume, by type."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        window = {"start": AS_OF - WINDOW_SECONDS, "end": AS_OF}
        counts = {
            "order.created": int(
                conn.execute(
                    "SELECT count(*) FROM orders WHERE ts >= :start AND ts < :end", window
                ).fetchone()[0]
            )
        }
        counts.update(
            conn.execute(
                "SELECT type, count(*) FROM events WHERE ts >= :start AND ts < :end "
                "GROUP BY type ORDER BY type",
                window,
            ).fetchall()
        )
        return counts
    finally:
        conn.close()


# --------------------------------------------------------------------------- generate


def phase_generate(params: Params) -> Figures:
    """bench/features.py's store, then the tags and property-carrying events on top."""
    start = time.perf_counter()
    db = Path(params["db"])
    figures = features_bench.phase_generate({"db": str(db), "spec": params["base_spec"]})
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -524288")
        conn.execute("BEGIN")
        extras = write_extras(conn, params["spec"])
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('bench_run_spec', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (json.dumps(params["spec"]),),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {"seconds": time.perf_counter() - start, "base": figures, "extras": extras}


def write_extras(conn: sqlite3.Connection, spec: dict[str, Any]) -> dict[str, int]:
    rng = random.Random(spec["extras_seed"])
    step = time.perf_counter()
    customers = conn.execute(
        "SELECT customer_id, joined_at, external_userid IS NOT NULL FROM customers "
        "ORDER BY customer_id"
    ).fetchall()
    updates = []
    for customer_id, _joined, _friend in customers:
        tags = [tag for tag, share in TAG_SHARES.items() if rng.random() < share]
        if "vip" in tags and rng.random() < BIRTHDAY_SHARE_OF_VIPS:
            tags.append("birthday-this-month")
        if tags:
            updates.append((json.dumps(sorted(tags)), customer_id))
    conn.executemany("UPDATE customers SET tags = ? WHERE customer_id = ?", updates)
    log(f"  tags: {len(updates):,} customers in {time.perf_counter() - step:.1f}s")

    step = time.perf_counter()
    rows = list(extra_events(rng, customers))
    rows.sort(key=lambda row: row[3])
    sql = "INSERT INTO events (event_id, customer_id, type, ts, props) VALUES (?, ?, ?, ?, ?)"
    for first in range(0, len(rows), BATCH):
        conn.executemany(
            sql,
            (
                (f"X{number:09d}", *row)
                for number, row in enumerate(rows[first : first + BATCH], first + 1)
            ),
        )
    log(f"  extra events: {len(rows):,} in {time.perf_counter() - step:.1f}s")
    return {"customers_tagged": len(updates), "extra_events": len(rows)}


def extra_events(
    rng: random.Random, customers: list[tuple[str, int, int]]
) -> Iterator[tuple[str, str, int, str]]:
    """(customer_id, type, ts, props) rows; times lean recent, like a growing brand's."""
    ids = [c[0] for c in customers]
    for kind, per_customer in EXTRA_EVENTS.items():
        for _ in range(round(len(customers) * per_customer)):
            index = rng.randrange(len(customers))
            joined = customers[index][1]
            ts = joined + int((AS_OF - joined) * rng.random() ** 0.5)
            yield ids[index], kind, min(ts, AS_OF - 1), json.dumps(props(rng, kind, ids))


def props(rng: random.Random, kind: str, ids: list[str]) -> dict[str, Any]:
    if kind == "group.joined":
        return {"group": rng.choice(GROUPS)}
    if kind == "balance.topped_up":
        amount, bonus = rng.choice(TOP_UPS)
        return {"amount": amount, "bonus": bonus}
    if kind == "membership.bought":
        plan, amount = rng.choice(PLANS)
        return {"plan": plan, "amount": amount}
    if kind == "referral.made":
        return {"referred_customer_id": rng.choice(ids)}
    if kind == "coupon.redeemed":
        return {"coupon": rng.choice(COUPONS), "discount": rng.choice((10, 15, 20, 30))}
    return {"text": rng.choice(REPLIES)}


# --------------------------------------------------------------------------- measure


class Stopwatch:
    """Seconds spent in named parts of a measurement, and which part is running now."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parts: dict[str, float] = {}
        self.current: list[tuple[str, float]] = []
        self.figures: Figures = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.lock:
            self.current.append((name, start))
        try:
            yield
        finally:
            with self.lock:
                self.current.pop()
                self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return func(*args, **kwargs)

        return timed

    def where(self) -> str:
        now = time.perf_counter()
        with self.lock:
            return " > ".join(f"{name} ({now - since:.0f}s)" for name, since in self.current)


def start_watchdog(
    watch: Stopwatch, limit: float, finish: Callable[[Figures], None]
) -> threading.Event:
    """After `limit` seconds, write the figures so far (see `finish`) and exit the process."""
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(limit):
            return
        where = watch.where()
        with watch.lock:
            figures = dict(watch.figures)
            figures["parts_s"] = {k: round(v, 3) for k, v in watch.parts.items()}
        figures["stopped"] = f"time limit of {limit:g}s reached in {where}"
        finish(figures)
        figures.update(peak_rss_mib=peak_rss_mib(), vm_hwm_mib=vm_hwm_mib(), io=io_mib())
        log(f"  STOPPED: {figures['stopped']}")
        assert _RESULT_FILE is not None
        Path(_RESULT_FILE).write_text(json.dumps(figures), encoding="utf-8")
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    return done


def live_rules(playbook: Any, settings: Any, *, events: bool) -> tuple[Any, list[Any]]:
    """A playbook's timezone and its state rules (or event rules) a run at AS_OF evaluates."""
    from engine.clock import get_timezone, local_day

    tz = settings.tz if playbook.timezone is None else get_timezone(playbook.timezone)
    day = local_day(AS_OF, tz).isoformat()
    rules = [
        rule
        for rule in playbook.rules
        if (rule.on is not None) == events
        and rule.enabled
        and not (rule.start and day < rule.start)
        and not (rule.end and day > rule.end)
    ]
    return tz, rules


def phase_measure(params: Params) -> Figures:
    """Features once; the baseline (best of 3); then run_playbooks for all playbooks."""
    from engine.features import FeatureTable, build_features
    from engine.playbook import load_playbook
    from engine.settings import Settings
    from engine.store import open_store

    run_module: Any = importlib.import_module("engine.run")  # patched below: Any
    settings = Settings()
    playbooks = [load_playbook(path, settings) for path in PLAYBOOKS]
    watch = Stopwatch()
    figures = watch.figures
    figures["state_rules"] = sum(1 for p in playbooks for r in p.rules if r.on is None)
    figures["event_rules"] = sum(1 for p in playbooks for r in p.rules if r.on is not None)
    figures["scenario"] = params["scenario"]
    with open_store(params["db"]) as store:
        figures["schema_added"] = sync_schema(store)
        if params["scenario"] == "daily":
            log("  the day before: an untimed run of every playbook as of AS_OF - 1 day ...")
            start = time.perf_counter()
            before = run_module.run_playbooks(
                store, settings, playbooks, as_of=AS_OF - DAY_SECONDS, engine="sql"
            )
            figures["day_before"] = {
                "seconds": round(time.perf_counter() - start, 3),
                "queued": sum(r.queued for r in before),
                "suppressed": sum(r.suppressed for r in before),
            }
            log(
                f"  the day before: {figures['day_before']['queued']:,} queued in "
                f"{figures['day_before']['seconds']:.1f}s"
            )
        log(f"  building features as of {AS_OF_TEXT} (part of no figure) ...")
        start = time.perf_counter()
        built = build_features(store, settings, AS_OF)
        figures["features_s"] = time.perf_counter() - start
        figures["feature_rows"] = built.rows
        log(f"  features: {built.rows:,} rows in {figures['features_s']:.1f}s")

        runs, event_runs = [], []
        for _ in range(BASELINE_REPEAT):
            seconds, pairs, rules = baseline(store, built, playbooks, settings)
            event_seconds, event_pairs = event_baseline(store, built, playbooks, settings)
            runs.append(seconds)
            event_runs.append(event_seconds)
        totals = [a + b for a, b in zip(runs, event_runs, strict=True)]
        figures.update(
            baseline_s=min(totals),
            baseline_s_runs=totals,
            baseline_state_s=min(runs),
            baseline_event_s=min(event_runs),
            baseline_pairs=pairs,
            baseline_rules=rules,
            baseline_event_pairs=event_pairs,
        )
        log(
            f"  baseline: {pairs:,} pairs from {rules} state rules, best {min(runs):.2f}s; "
            f"{sum(event_pairs.values()):,} (customer, event) pairs from {len(event_pairs)} "
            f"event rules, best {min(event_runs):.2f}s; together best {min(totals):.2f}s"
        )

        def prebuilt(*args: Any, **kwargs: Any) -> FeatureTable:
            if not kwargs:  # run_playbooks' own build: (store, settings, as_of)
                return built
            return build_features(*args, **kwargs)

        run_module.build_features = prebuilt
        instrument(run_module, watch)
        start = time.perf_counter()

        def finish(partial: Figures) -> None:
            partial["engine_s"] = time.perf_counter() - start
            done = partial["playbooks"].values()
            partial.update(
                queued=sum(p["queued"] for p in done),
                suppressed=sum(p["suppressed"] for p in done),
            )

        stop = start_watchdog(watch, float(params["time_limit"]), finish)
        log("  run_playbooks(engine='sql') ...")
        results = run_module.run_playbooks(store, settings, playbooks, as_of=AS_OF, engine="sql")
        stop.set()
        with watch.lock:
            figures["engine_s"] = time.perf_counter() - start
            figures["queued"] = sum(r.queued for r in results)
            figures["suppressed"] = sum(r.suppressed for r in results)
            figures["parts_s"] = {k: round(v, 3) for k, v in watch.parts.items()}
        figures["event_pairs_differ"] = compare_event_pairs(results, playbooks, event_pairs)
        # The engine's peak, before the floor measurement below (which sorts a copy).
        figures.update(peak_rss_mib=peak_rss_mib(), vm_hwm_mib=vm_hwm_mib())
        if params["scenario"] == "first":
            figures["write_floor_s"] = write_floor(store)
            log(f"  bare INSERT of the same queue rows: {figures['write_floor_s']:.2f}s")
    return figures


def compare_event_pairs(
    results: list[Any], playbooks: list[Any], baseline_pairs: dict[str, int]
) -> dict[str, list[int]]:
    """Event rules whose matches in the run differ from the baseline's: {rule: [run,
    baseline]}. Expected only for rules reading tags that the run's earlier rules change."""
    from engine.run import reads_tags

    tagged = {f"{p.name}/{r.id}" for p in playbooks for r in p.rules if reads_tags(r)}
    differ = {}
    for result in results:
        for report in result.rules:
            key = f"{result.playbook}/{report.rule_id}"
            if key in baseline_pairs and report.matched != baseline_pairs[key]:
                differ[key] = [report.matched, baseline_pairs[key]]
                why = "it reads tags the run changes" if key in tagged else "WARNING"
                log(
                    f"  event rule {key}: the run matched {report.matched:,}, the baseline "
                    f"{baseline_pairs[key]:,} ({why})"
                )
    return differ


def write_floor(store: Any) -> float:
    """Seconds to INSERT the queue's rows, as they are, into an empty copy of the queue
    (same table and indexes): what writing the decisions costs with no deciding at all."""
    conn = store.conn
    conn.execute("DROP TABLE IF EXISTS floor_actions")
    conn.execute("CREATE TABLE floor_actions AS SELECT * FROM actions WHERE false")
    for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'actions' AND type = 'index' "
        "AND sql IS NOT NULL"
    ).fetchall():
        conn.execute(
            sql.replace("INDEX actions_", "INDEX floor_actions_", 1).replace(
                " ON actions ", " ON floor_actions ", 1
            )
        )
    conn.execute("CREATE UNIQUE INDEX floor_actions_id ON floor_actions (action_id)")
    conn.execute("CREATE TEMP TABLE floor_rows AS SELECT * FROM actions ORDER BY random()")
    start = time.perf_counter()
    with store.transaction() as tx:
        tx.execute(
            "INSERT INTO floor_actions SELECT * FROM temp.floor_rows "
            "ORDER BY customer_id, action_id"
        )
    seconds = time.perf_counter() - start
    conn.execute("DROP TABLE temp.floor_rows")
    conn.execute("DROP TABLE floor_actions")
    return seconds


def sync_schema(store: Any) -> list[str]:
    """Create the indexes a store made by this engine now has and this copy lacks.

    The generated store is reused across engine changes, and an index added to an existing
    schema version is not created on stores already at that version.
    """
    from engine.store import open_store

    with open_store(":memory:") as fresh:
        wanted = fresh.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
    have = dict(store.conn.execute("SELECT name, sql FROM sqlite_master").fetchall())
    added = []
    for name, sql in wanted:
        if name in have and have[name] == sql:
            continue
        if name in have:
            store.conn.execute(f'DROP INDEX "{name}"')
        store.conn.execute(sql)
        added.append(name)
        what = "an older definition of" if name in have else "no"
        log(f"  WARNING: the store had {what} index {name} of the current schema: made it")
    return added


def baseline(store: Any, built: Any, playbooks: list[Any], settings: Any) -> tuple[float, int, int]:
    """Seconds to select every live state rule's matching customers; pairs; rules."""
    from engine.catalog import field_catalog
    from engine.match.sql import condition_sql, fact_fields

    fields = fact_fields(field_catalog(settings))
    pairs = rules = 0
    start = time.perf_counter()
    for playbook in playbooks:
        tz, live = live_rules(playbook, settings, events=False)
        for rule in live:
            where, values = condition_sql(rule.when, fields, tz)
            matched = store.conn.execute(
                f'SELECT f.customer_id FROM temp."{built.table}" f WHERE {where}', values
            ).fetchall()
            pairs += len(matched)
            rules += 1
    return time.perf_counter() - start, pairs, rules


# The event rules' baseline: over the events a run reads (the day before AS_OF), for each
# event type with live rules, one query computes the features those rules read, written out
# by hand as they are right after each event (s: the event's row, c: its customer, b: its
# row of the prebuilt features) into a temp table; each rule then selects its pairs from
# it with its compiled condition. Only what the rules read is computed, once per event
# type, as the state rules' baseline reads one features table. A rule reading a feature
# not written out here stops the benchmark.
_EVENT_FEATURES = {
    # The prebuilt features (as of AS_OF, read as the state rules' baseline reads them)
    # less the customer's orders after the event: an index range of that day's orders.
    "order_count": [
        "b.order_count - (SELECT count(*) FROM orders o WHERE o.customer_id = s.customer_id "
        "AND o.ts > s.ts AND o.ts < :as_of) AS order_count"
    ],
    "is_friend": [
        "(SELECT max(x.ts) FROM events x WHERE x.customer_id = s.customer_id "
        "AND x.type = 'friend.added' AND x.ts <= s.ts) AS fa",
        "(SELECT max(x.ts) FROM events x WHERE x.customer_id = s.customer_id "
        "AND x.type = 'friend.deleted' AND x.ts <= s.ts) AS fd",
        "CASE WHEN c.external_userid IS NOT NULL AND coalesce(c.joined_at, 0) <= s.ts "
        "THEN coalesce(c.joined_at, 0) END AS ff",
    ],
}
_EVENT_DERIVED = {
    "is_friend": "CASE WHEN coalesce(max(fa, ff), fa, ff) > coalesce(fd, -1) THEN 1 ELSE 0 END"
}


def event_baseline(
    store: Any, built: Any, playbooks: list[Any], settings: Any
) -> tuple[float, dict[str, int]]:
    """Seconds to select every live event rule's matching (customer, event) pairs, and the
    pairs per rule ("playbook/rule")."""
    from engine.catalog import SOURCE_KEYS, field_catalog, source_fields, source_table
    from engine.conditions.ir import fields_used
    from engine.features import CUSTOMER_COLUMNS
    from engine.match.sql import condition_sql, fact_fields

    catalog = field_catalog(settings)
    by_event: dict[str, list[tuple[Any, Any, Any]]] = {}
    for playbook in playbooks:
        tz, live = live_rules(playbook, settings, events=True)
        for rule in live:
            by_event.setdefault(rule.on, []).append((playbook, rule, tz))
    pairs: dict[str, int] = {}
    conn = store.conn
    start = time.perf_counter()
    for event, rules in by_event.items():
        source = source_table(event)
        key = SOURCE_KEYS[source]
        used = set().union(*(fields_used(r.when) for _, r, _ in rules if r.when is not None))
        inner = [f"s.{key} AS event_id", "s.customer_id"]
        outer = ["*"]
        for name in sorted(used):
            if name.startswith("event."):
                inner.append(f'{source_fields(event)[name[6:]].expr} AS "{name}"')
            elif name in CUSTOMER_COLUMNS:
                inner.append(f"c.{name}")
            elif name in _EVENT_FEATURES:
                inner += _EVENT_FEATURES[name]
                if name in _EVENT_DERIVED:
                    outer.append(f'{_EVENT_DERIVED[name]} AS "{name}"')
            else:
                raise SystemExit(
                    f"the event rules' baseline has no hand-written SQL for {name!r} "
                    f"(a rule on {event}): add it to _EVENT_FEATURES"
                )
        kind = " AND s.type = :type" if source == "events" else ""
        conn.execute("DROP TABLE IF EXISTS temp.baseline_events")
        conn.execute(
            f"CREATE TEMP TABLE baseline_events AS SELECT {', '.join(outer)} FROM "
            f"(SELECT {', '.join(inner)} FROM {source} s JOIN customers c "
            f'ON c.customer_id = s.customer_id JOIN temp."{built.table}" b '
            f"ON b.customer_id = s.customer_id WHERE s.ts >= :start AND s.ts < :as_of{kind})",
            {"start": AS_OF - WINDOW_SECONDS, "as_of": AS_OF, "type": event},
        )
        for playbook, rule, tz in rules:
            where, values = condition_sql(rule.when, fact_fields(catalog, event), tz)
            matched = conn.execute(
                f"SELECT f.customer_id FROM temp.baseline_events f WHERE {where}", values
            ).fetchall()
            pairs[f"{playbook.name}/{rule.id}"] = len(matched)
        conn.execute("DROP TABLE temp.baseline_events")
    return time.perf_counter() - start, pairs


def instrument(run_module: Any, watch: Stopwatch) -> None:
    """Time each playbook and the main parts of a run (the parts overlap: see the names)."""
    runner = run_module._Runner
    figures = watch.figures
    figures["playbooks"] = {}
    figures["messages"] = 0
    real_execute = run_module._execute

    def execute(store: Any, conn: Any, settings: Any, playbook: Any, *args: Any) -> Any:
        start = time.perf_counter()
        with watch.part(f"playbook {playbook.name}"):
            result = real_execute(store, conn, settings, playbook, *args)
        seconds = time.perf_counter() - start
        with watch.lock:
            figures["playbooks"][playbook.name] = {
                "seconds": round(seconds, 3),
                "queued": result.queued,
                "suppressed": result.suppressed,
            }
        log(f"    {playbook.name}: {seconds:.2f}s, {result.queued:,} queued")
        return result

    run_module._execute = execute
    real_render = runner.render_messages

    def render_messages(self: Any) -> None:
        pending = self.conn.execute(
            "SELECT count(*) FROM temp.decisions WHERE status = 'pending' AND template IS NOT NULL"
        ).fetchone()[0]
        with watch.lock:
            figures["messages"] += pending
        with watch.part("render_messages"):
            real_render(self)

    runner.render_messages = render_messages
    runner._state_candidates = watch.wrap("state rules: match", runner._state_candidates)
    runner._event_candidates = watch.wrap("event rules: facts and match", runner._event_candidates)
    run_module.RunFacts.events = watch.wrap("event rules: facts", run_module.RunFacts.events)
    runner._apply_tags = watch.wrap("apply_tags", runner._apply_tags)
    decider = run_module.RunDecider
    decider.decide = watch.wrap("decide", decider.decide)
    decider.flush = watch.wrap("enqueue (write the queue rows)", decider.flush)


# --------------------------------------------------------------------------- durable


def phase_durable(params: Params) -> Figures:
    """Customers/s through DurableMatcher and through a bare Host, in alternating chunks."""
    from durable import engine as durable_engine

    from engine.catalog import field_catalog
    from engine.conditions import fields_used
    from engine.features import build_features, iter_features
    from engine.match.durable import MARKER, DurableMatcher, compile_rulesets, fact_encoder
    from engine.playbook import load_playbook
    from engine.settings import Settings
    from engine.store import open_store

    class BareHost(durable_engine.Host):  # type: ignore[misc]
        """durable's Host without its dispatch threads (the engine's Host has none either)."""

        def _run(self) -> None:
            pass

    settings = Settings()
    catalog = {name: info.type for name, info in field_catalog(settings).items()}
    host = BareHost()
    hits: list[int] = []

    matchers: list[DurableMatcher] = []
    bare: list[tuple[list[str], Callable[..., dict[str, Any]]]] = []  # (rulesets, encoder)
    rules_total = 0
    for playbook in (load_playbook(path, settings) for path in PLAYBOOKS):
        tz, live = live_rules(playbook, settings, events=False)
        rules = [(rule.id, rule.when) for rule in live]
        rules_total += len(rules)
        matchers.append(DurableMatcher(f"{playbook.name}.state", rules, catalog, tz))
        rulesets = compile_rulesets(f"bare_{len(bare)}", rules, catalog, tz)
        for ruleset in rulesets.values():
            for rule in ruleset.values():
                index = int(rule["pri"])
                rule["run"] = recorder(hits, index)
        host.register_rulesets(rulesets)
        used = {n for _, c in rules if c is not None for n in fields_used(c)}
        encoder = fact_encoder({n: catalog[n] for n in sorted(used) if n in catalog})
        bare.append((list(rulesets), encoder))

    watch = Stopwatch()
    figures = watch.figures
    figures.update(
        playbooks=len(matchers),
        rules=rules_total,
        customers=0,
        matcher_s=0.0,
        raw_s=0.0,
        matcher_pairs=0,
        raw_pairs=0,
    )
    marks = itertools.count()
    limit = params.get("customers")
    with open_store(params["db"]):
        pass  # a reused store made by an older engine: bring its schema up to date first
    with open_store(params["db"], readonly=True) as store:
        log(f"  building features as of {AS_OF_TEXT} (part of no figure) ...")
        built = build_features(store, settings, AS_OF)
        log(f"  features: {built.rows:,} rows; asserting ...")

        def finish(partial: Figures) -> None:
            rates(partial)

        stop = start_watchdog(watch, float(params["time_limit"]), finish)
        rows = iter_features(store, built)
        for number, chunk in enumerate(chunks(rows, DURABLE_CHUNK, limit)):
            facts = [(row["customer_id"], row) for row in chunk]
            encoded = [
                [{**encode(row), MARKER: str(next(marks))} for row in chunk]
                for _names, encode in bare
            ]
            order = ("matcher", "raw") if number % 2 == 0 else ("raw", "matcher")
            for kind in order:
                start = time.perf_counter()
                if kind == "matcher":
                    with watch.part("DurableMatcher"):
                        found = sum(len(m.match(facts)) for m in matchers)
                else:
                    with watch.part("bare Host"):
                        found = assert_all(host, bare, encoded, hits, durable_engine)
                with watch.lock:
                    figures[f"{kind}_s"] += time.perf_counter() - start
                    figures[f"{kind}_pairs"] += found
            with watch.lock:
                figures["customers"] += len(chunk)
            if number % 10 == 9:
                log(f"    {figures['customers']:,} customers")
        stop.set()
    rates(figures)
    return figures


DURABLE_CHUNK = 5_000


def recorder(hits: list[int], index: int) -> Callable[[Any], None]:
    """A one-argument action (durable treats a two-argument one as asynchronous)."""

    def record(_closure: Any) -> None:
        hits.append(index)

    return record


def chunks(rows: Iterator[Any], size: int, limit: int | None) -> Iterator[list[Any]]:
    taken = 0
    while limit is None or taken < limit:
        chunk = list(itertools.islice(rows, size if limit is None else min(size, limit - taken)))
        if not chunk:
            return
        taken += len(chunk)
        yield chunk


def assert_all(
    host: Any,
    bare: list[tuple[list[str], Callable[..., dict[str, Any]]]],
    encoded: list[list[dict[str, Any]]],
    hits: list[int],
    durable_engine: Any,
) -> int:
    """Assert and retract each pre-encoded fact in its playbook's rulesets; pairs found."""
    not_handled = durable_engine.MessageNotHandledException
    found = 0
    for (names, _encode), facts in zip(bare, encoded, strict=True):
        for fact in facts:
            hits.clear()
            for name in names:
                try:
                    host.assert_fact(name, fact)
                except not_handled:
                    continue
                host.retract_fact(name, fact)
            found += len(set(hits))
    return found


def rates(figures: Figures) -> None:
    customers = figures["customers"]
    for kind in ("matcher", "raw"):
        seconds = figures[f"{kind}_s"]
        figures[f"{kind}_per_s"] = customers / seconds if seconds else 0.0


if __name__ == "__main__":
    main()
