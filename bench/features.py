"""Benchmark: `build_features` on a large store against a bare SQL aggregate over orders.

    .venv/bin/python bench/features.py                       # 1M customers, 5M orders
    .venv/bin/python bench/features.py --customers 10000 --orders 50000   # quick

Generates (once; reused while the sizes and generator match) a seeded store under
bench/out/: customers, orders spread over the two years before a fixed as-of moment
(skewed counts: prospects with none, many one-order customers, a long tail of heavy
buyers), ~2% refunds and friend/group events. Then it times, alternating and at least
twice each, (a) the baseline `CREATE TEMP TABLE baseline AS SELECT customer_id, count(*),
sum(amount_cents), max(ts), count(DISTINCT category) FROM orders WHERE ts < ? GROUP BY
customer_id` and (b) `build_features(store, Settings(), as_of)`. Every timed run is a
fresh interpreter, so its peak RSS is that run's alone. The query plan goes to
bench/out/features_plan.txt. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import threading
import time
from bisect import bisect
from datetime import datetime
from itertools import accumulate
from pathlib import Path
from typing import Any, ClassVar

from _common import (
    OUT_DIR,
    Figures,
    Params,
    add_phase_arguments,
    emit_json,
    engine_revision,
    log,
    peak_rss_mib,
    remove_db,
    run_context,
    run_phase_here,
    run_phase_in_child,
    warm_file,
    warn_if_busy,
)

# The engine is imported only inside the phases, which run in child processes: the
# parent stays small so it cannot inflate any child's peak RSS.

SCRIPT = Path(__file__).resolve()
GENERATOR_VERSION = 1  # bump when the generated data changes, so stale stores are rebuilt
SEED = 20250101
AS_OF_TEXT = "2025-01-01T00:00:00+08:00"
AS_OF = int(datetime.fromisoformat(AS_OF_TEXT).timestamp())
DAY = 86_400
SPAN = 730 * DAY  # everything happens in the two years before AS_OF
RATIO_TARGET = 1.5
RSS_TARGET_MIB = 1024
BATCH = 50_000

BASELINE_SQL = (
    "CREATE TEMP TABLE baseline AS "
    "SELECT customer_id, count(*) AS n, sum(amount_cents) AS gross, max(ts) AS last_ts, "
    "count(DISTINCT category) AS cats "
    "FROM orders WHERE ts < ? GROUP BY customer_id"
)
BASELINE_SELECT = BASELINE_SQL.split(" AS ", 1)[1]

# Data shape.
PROSPECT_SHARE = 0.15  # customers with no order at all
REPEAT_SHARE = 0.55  # buyers who may order more than once (the rest order exactly once)
HEAVY_ALPHA = 1.2  # Pareto tail of repeat buyers' purchase propensity ...
HEAVY_CAP = 300.0  # ... capped so no single customer dominates
REFUND_RATE = 0.02
EVENTS_PER_CUSTOMER = 1.5
EVENT_TYPES = (
    ("friend.added", 45.0),
    ("group.joined", 30.0),
    ("group.left", 15.0),
    ("friend.deleted", 10.0),
)
CATALOG: dict[str, tuple[float, list[tuple[str, int]]]] = {
    # category: (weight, [(sku, list price in yuan)])
    "skincare": (35, [("SK-TONER", 159), ("SK-SERUM", 399), ("SK-CREAM", 599), ("SK-MASK", 89)]),
    "makeup": (25, [("MU-LIP", 139), ("MU-FDN", 259), ("MU-PAL", 329), ("MU-MASC", 99)]),
    "haircare": (12, [("HC-SHAM", 69), ("HC-COND", 79), ("HC-OIL", 139)]),
    "fragrance": (8, [("FR-MINI", 129), ("FR-EDP50", 699), ("FR-EDP100", 1099)]),
    "bodycare": (14, [("BC-LOTION", 99), ("BC-SCRUB", 129), ("BC-HAND", 39)]),
    "gift_set": (6, [("GS-NEWYEAR", 599), ("GS-PRESTIGE", 2999)]),
}
CHANNELS = ("douyin", "xiaohongshu", "offline_store", "wechat_ads", "referral", "tmall")
STAFF = ("staff_li", "staff_wang", "staff_zhang", "staff_liu", "staff_chen", "staff_zhao")
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗"
GIVEN = ("静", "丽", "敏", "婷", "雪", "晓燕", "思雨", "欣怡", "子涵", "伟", "磊", "浩然", "子轩")

# Packed integers keep 5M generated orders small and fast to sort by time.
CUSTOMER_BITS = 24
AMOUNT_BITS = 24
ITEM_BITS = 8


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark build_features against a bare aggregate."
    )
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--orders", "--rows", dest="orders", type=int, default=5_000_000)
    parser.add_argument(
        "--events", type=int, default=None, help="default: 1.5 per customer (1.5M at 1M)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each (min 2)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where stores and plans go")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the store")
    add_phase_arguments(parser)
    args = parser.parse_args()
    if args.phase:
        run_phase_here(
            args,
            {
                "generate": phase_generate,
                "profile": phase_profile,
                "time": phase_time,
            },
        )
        return
    run_benchmark(args)


# --------------------------------------------------------------------------- parent


def run_benchmark(args: argparse.Namespace) -> None:
    if args.customers < 1 or args.orders < 0:
        raise SystemExit("--customers must be at least 1 and --orders at least 0")
    if args.customers >= 1 << CUSTOMER_BITS:
        raise SystemExit(f"--customers must be below {1 << CUSTOMER_BITS}")
    events = args.events if args.events is not None else round(args.customers * EVENTS_PER_CUSTOMER)
    revision = engine_revision()
    machine_start = warn_if_busy("at the start")
    repeat = max(2, args.repeat)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "generator": GENERATOR_VERSION,
        "seed": SEED,
        "as_of": AS_OF,
        "customers": args.customers,
        "orders": args.orders,
        "events": events,
        "refund_rate": REFUND_RATE,
    }
    db = out / f"features-c{args.customers}-o{args.orders}-e{events}.db"
    log(
        f"features benchmark: {args.customers:,} customers, {args.orders:,} orders, "
        f"{events:,} events, as of {AS_OF_TEXT} ({AS_OF}); store {db}"
    )

    generation: Figures | None = None
    reused = not args.regenerate and stored_meta(db, "bench_spec") == spec
    if reused:
        log("store already generated with these sizes: reused (use --regenerate to rebuild)")
    else:
        log("generating the store (not part of the figures) ...")
        generation = run_phase_in_child(SCRIPT, "generate", {"db": str(db), "spec": spec})
        log(
            f"generated in {generation['seconds']:.1f}s (peak RSS {generation['peak_rss_mib']} MiB)"
        )
    counts = table_counts(db)
    log("rows: " + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    log(f"store file {db.stat().st_size / 2**20:,.0f} MiB; warming the OS page cache ...")
    log(f"read it in {warm_file(db):.1f}s")

    runs: dict[str, list[Figures]] = {"baseline": [], "features": []}
    for rep in range(repeat):
        order = ("baseline", "features") if rep % 2 == 0 else ("features", "baseline")
        for kind in order:
            result = run_phase_in_child(SCRIPT, "time", {"db": str(db), "kind": kind})
            runs[kind].append(result)
            log(
                f"run {rep + 1}/{repeat} {kind:8}: {result['seconds']:7.2f}s, "
                f"{result['rows']:,} rows, peak RSS {result['peak_rss_mib']} MiB"
            )

    plan_file = out / "features_plan.txt"
    log("profiling one more build statement by statement (diagnostic, not in the figures) ...")
    profile = run_phase_in_child(SCRIPT, "profile", {"db": str(db), "file": str(plan_file)})
    log(f"query plans and per-statement times written to {plan_file}")

    baseline_s = [r["seconds"] for r in runs["baseline"]]
    features_s = [r["seconds"] for r in runs["features"]]
    ratio = min(features_s) / min(baseline_s) if min(baseline_s) > 0 else None
    features_rss = max(r["peak_rss_mib"] for r in runs["features"])
    log(f"baseline best {min(baseline_s):.2f}s  (runs: {fmt_list(baseline_s)})")
    log(f"features best {min(features_s):.2f}s  (runs: {fmt_list(features_s)})")
    if ratio is not None:
        verdict = "meets" if ratio <= RATIO_TARGET else "MISSES"
        log(f"ratio features/baseline {ratio:.2f} ({verdict} target <= {RATIO_TARGET})")
    verdict = "meets" if features_rss <= RSS_TARGET_MIB else "MISSES"
    log(f"features peak RSS {features_rss} MiB ({verdict} target <= {RSS_TARGET_MIB} MiB)")

    figures: Figures = {
        "benchmark": "features",
        "customers": counts["customers"],
        "orders": counts["orders"],
        "refunds": counts["refunds"],
        "events": counts["events"],
        "as_of": AS_OF_TEXT,
        **run_context(revision, machine_start),
        "store": str(db),
        "store_mib": round(db.stat().st_size / 2**20, 1),
        "store_reused": reused,
        "generation_s": None if generation is None else round(generation["seconds"], 2),
        "baseline_s": round(min(baseline_s), 3),
        "baseline_s_runs": [round(s, 3) for s in baseline_s],
        "features_s": round(min(features_s), 3),
        "features_s_runs": [round(s, 3) for s in features_s],
        "ratio_features_to_baseline": None if ratio is None else round(ratio, 3),
        "ratio_target": RATIO_TARGET,
        "meets_ratio_target": ratio is not None and ratio <= RATIO_TARGET,
        "features_peak_rss_mib": features_rss,
        "features_peak_rss_mib_runs": [r["peak_rss_mib"] for r in runs["features"]],
        "features_rss_before_build_mib": runs["features"][0]["rss_before_phase_mib"],
        "features_vm_hwm_mib": max(r["vm_hwm_mib"] for r in runs["features"]),
        "sqlite_cache_size_pragma": runs["features"][0]["cache_size_pragma"],
        "rss_target_mib": RSS_TARGET_MIB,
        "meets_rss_target": features_rss <= RSS_TARGET_MIB,
        "baseline_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["baseline"]),
        "features_io_mib": runs["features"][-1]["io"],
        "baseline_io_mib": runs["baseline"][-1]["io"],
        "rss_method": "ru_maxrss (RUSAGE_SELF) of each timed child process, started via "
        "/bin/sh so it does not inherit the parent's peak; vm_hwm is a cross-check",
        "parent_peak_rss_mib": peak_rss_mib(),
        "feature_rows": runs["features"][0]["rows"],
        "baseline_rows": runs["baseline"][0]["rows"],
        "run_order": "alternating, each run in a fresh process, OS page cache warmed first",
        "plan_file": str(plan_file),
        "profile_total_s": round(profile["total_s"], 3),
        "profile_statements_s": profile["steps"],
        "data_shape": stored_meta(db, "bench_shape"),
    }
    emit_json(figures)


def fmt_list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def stored_meta(db: Path, key: str) -> dict[str, Any] | None:
    """What the generator recorded under `key` ("bench_spec" is written last), or None."""
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    value: dict[str, Any] | None = json.loads(row[0]) if row else None
    return value


def table_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("customers", "orders", "refunds", "events")
        }
    finally:
        conn.close()


# --------------------------------------------------------------------------- phases


def phase_profile(params: Params) -> Figures:
    """One extra build (not in the figures) with every statement explained and timed.

    In this child process every sqlite3 connection is made a TracedConnection, including
    any the engine opens itself (e.g. parallel workers); each `execute` during the build
    records EXPLAIN QUERY PLAN (taken just before it runs, so the temp tables of earlier
    stages exist), the statement's own time and its thread. This follows the engine's SQL
    whatever shape it takes (one statement, several stages, several connections).
    """
    original_connect = sqlite3.connect

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", TracedConnection)
        conn: sqlite3.Connection = original_connect(*args, **kwargs)
        return conn

    sqlite3.connect = traced_connect  # type: ignore[assignment]

    from engine.features import build_features
    from engine.settings import Settings
    from engine.store import open_store

    db, plan_file = Path(params["db"]), Path(params["file"])
    with open_store(db, readonly=True) as store:
        baseline_plan = explain(store.conn, BASELINE_SELECT, (AS_OF,))
        TracedConnection.recording = True
        start = time.perf_counter()
        table = build_features(store, Settings(), AS_OF)
        total = time.perf_counter() - start
        TracedConnection.recording = False
    steps = TracedConnection.steps
    main = threading.main_thread().name
    untraced = total - sum(float(step["seconds"]) for step in steps if step["thread"] == main)
    sections = []
    for number, step in enumerate(steps, 1):
        where = "" if step["thread"] == main else f" [{step['thread']}, own connection]"
        sections.append(
            f"### statement {number} of {len(steps)}{where}: {step['seconds']:.3f}s\n\n"
            f"{step['sql'].strip()}\n\nparameters: {json.dumps(step['params'], default=str)}"
            f"\n\n{step['plan'] or '(no query plan)'}\n"
        )
    text = (
        f"# EXPLAIN QUERY PLAN, SQLite {sqlite3.sqlite_version}, store {db}\n"
        f"# build_features(store, Settings(), as_of={AS_OF}) [{AS_OF_TEXT}]: {len(steps)} "
        f"statements, {total:.2f}s in this profiled run ({table.rows:,} rows); "
        f"{untraced:.2f}s of the main thread's time is outside its statements (Python, "
        f"waiting for worker threads, whose statements overlap in time)\n\n"
        f"## baseline ({BASELINE_SQL.split(' AS ', 1)[0]} AS ...)\n\n{BASELINE_SELECT}\n\n"
        f"{baseline_plan}\n\n## build_features, statement by statement\n\n" + "\n".join(sections)
    )
    plan_file.write_text(text, encoding="utf-8")
    for step in steps:
        if step["thread"] != main:
            step["label"] = f"[{step['thread']}] {step['label']}"
    ranked = sorted(steps, key=lambda step: -float(step["seconds"]))
    for step in ranked[:8]:
        log(f"  {step['seconds']:7.2f}s  {step['label']}")
    log(f"  {untraced:7.2f}s  (main thread outside its statements, e.g. waiting for workers)")
    # The JSON keeps the statements that took at least 1% of the build; the rest are summed.
    shown = [step for step in steps if step["seconds"] >= total / 100]
    rest = [step for step in steps if step["seconds"] < total / 100]
    figures = [[step["label"], round(float(step["seconds"]), 3)] for step in shown]
    if rest:
        rest_s = sum(float(step["seconds"]) for step in rest)
        figures.append([f"({len(rest)} other statements)", round(rest_s, 3)])
    figures.append(["(main thread outside its statements)", round(untraced, 3)])
    return {"total_s": total, "steps": figures}


class TracedConnection(sqlite3.Connection):
    """A connection that, while `recording`, explains and times each `execute`."""

    recording: ClassVar[bool] = False
    steps: ClassVar[list[dict[str, Any]]] = []

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if not TracedConnection.recording:
            return super().execute(sql, parameters)
        plan = explain(self, sql, parameters)
        start = time.perf_counter()
        cursor = super().execute(sql, parameters)
        seconds = time.perf_counter() - start
        label = " ".join(sql.split())
        TracedConnection.steps.append(
            {
                "label": label if len(label) <= 90 else label[:87] + "...",
                "sql": sql,
                # A copy: the engine may update its parameter dict after this statement.
                "params": dict(parameters) if isinstance(parameters, dict) else parameters,
                "seconds": seconds,
                "plan": plan,
                "thread": threading.current_thread().name,
            }
        )
        return cursor


def explain(conn: sqlite3.Connection, sql: str, params: Any) -> str:
    """EXPLAIN QUERY PLAN as an indented tree ('' for statements without a plan)."""
    try:
        # The base class's execute: explaining is not itself a traced statement.
        rows = sqlite3.Connection.execute(conn, "EXPLAIN QUERY PLAN " + sql, params).fetchall()
    except sqlite3.Error as exc:
        return f"(no plan: {exc})"
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _unused, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return "\n".join(lines)


def phase_time(params: Params) -> Figures:
    """One timed run (fresh process): the baseline aggregate or build_features."""
    from engine.features import build_features
    from engine.settings import Settings
    from engine.store import open_store

    db, kind = params["db"], params["kind"]
    with open_store(db, readonly=True) as store:
        rss_before = peak_rss_mib()
        if kind == "baseline":
            start = time.perf_counter()
            store.conn.execute(BASELINE_SQL, (AS_OF,))
            seconds = time.perf_counter() - start
            rows = store.conn.execute("SELECT count(*) FROM temp.baseline").fetchone()[0]
        else:
            start = time.perf_counter()
            table = build_features(store, Settings(), AS_OF)
            seconds = time.perf_counter() - start
            rows = table.rows
        cache_size = store.conn.execute("PRAGMA cache_size").fetchone()[0]
    return {
        "seconds": seconds,
        "rows": rows,
        "rss_before_phase_mib": rss_before,
        "cache_size_pragma": cache_size,
    }


def phase_generate(params: Params) -> Figures:
    """Write the seeded store (fresh process, so its memory never counts elsewhere)."""
    from engine.store import open_store

    start = time.perf_counter()
    db = Path(params["db"])
    spec: dict[str, Any] = params["spec"]
    remove_db(db)
    open_store(db).close()  # the real schema, migrated by the engine itself
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -524288")  # 512 MiB while loading
    # Load without the secondary indexes, then build them exactly as the schema declares.
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        "AND tbl_name IN ('customers', 'orders', 'refunds', 'events')"
    ).fetchall()
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    shape = Generator(spec).write(conn)
    index_start = time.perf_counter()
    for _name, sql in indexes:
        conn.execute(sql)
    log(f"  indexes built in {time.perf_counter() - index_start:.1f}s")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [("bench_shape", json.dumps(shape)), ("bench_spec", json.dumps(spec))],
    )
    conn.close()
    return {"seconds": time.perf_counter() - start, "shape": shape}


class Generator:
    """Seeded synthetic data; rows are written in time order, as a live store fills up."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.rng = random.Random(spec["seed"])
        self.n_customers: int = spec["customers"]
        self.n_orders: int = spec["orders"]
        self.n_events: int = spec["events"]
        self.refund_rate: float = spec["refund_rate"]
        width = max(7, len(str(self.n_customers)))
        self.ids = [f"C{i:0{width}d}" for i in range(1, self.n_customers + 1)]
        self.joined: list[int] = []
        items: list[tuple[str, str, int]] = []  # (category, sku, price in yuan)
        weights: list[float] = []
        for category, (weight, skus) in CATALOG.items():
            for sku, price in skus:
                items.append((category, sku, price))
                # Cheaper items sell more within a category.
                weights.append(weight / len(skus) * (300 / price) ** 0.5)
        self.items = items
        self.item_cum = list(accumulate(weights))

    def write(self, conn: sqlite3.Connection) -> dict[str, Any]:
        conn.execute("BEGIN")
        self.write_customers(conn)
        counts = self.order_counts()
        packed = self.write_orders(conn, counts)
        n_refunds = self.write_refunds(conn, packed)
        del packed
        self.write_events(conn)
        conn.execute("COMMIT")
        buyers = [n for n in counts if n]
        buyers.sort()
        return {
            "prospects": len(counts) - len(buyers),
            "one_order_customers": sum(1 for n in buyers if n == 1),
            "buyers": len(buyers),
            "median_orders_per_buyer": buyers[len(buyers) // 2] if buyers else 0,
            "p99_orders_per_buyer": buyers[int(len(buyers) * 0.99)] if buyers else 0,
            "max_orders_per_customer": buyers[-1] if buyers else 0,
            "refunds": n_refunds,
        }

    def write_customers(self, conn: sqlite3.Connection) -> None:
        rng = self.rng
        step = time.perf_counter()
        rows: list[tuple[Any, ...]] = []
        sql = (
            "INSERT INTO customers (customer_id, name, external_userid, owner, phone, "
            "joined_at, channel, opted_out, tags, props, auto_created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '[]', NULL, 0)"
        )
        for customer_id in self.ids:
            # Joins lean recent (the brand grows).
            joined = AS_OF - 1 - int(SPAN * rng.random() ** 1.3)
            self.joined.append(joined)
            friend = rng.random() < 0.7
            rows.append(
                (
                    customer_id,
                    rng.choice(SURNAMES) + rng.choice(GIVEN),
                    f"wm{rng.getrandbits(48):012x}" if friend else None,
                    rng.choice(STAFF),
                    f"1{rng.choice('3589')}{rng.randrange(10**9):09d}"
                    if rng.random() < 0.55
                    else None,
                    joined,
                    rng.choice(CHANNELS),
                    1 if rng.random() < 0.02 else 0,
                )
            )
            if len(rows) >= BATCH:
                conn.executemany(sql, rows)
                rows = []
        conn.executemany(sql, rows)
        log(f"  customers: {self.n_customers:,} in {time.perf_counter() - step:.1f}s")

    def order_counts(self) -> list[int]:
        """Orders per customer: prospects 0, one-off buyers 1, a Pareto tail of repeaters."""
        rng = self.rng
        counts = [0] * self.n_customers
        n_buyers = min(round(self.n_customers * (1 - PROSPECT_SHARE)), self.n_orders)
        buyers = rng.sample(range(self.n_customers), n_buyers)
        for index in buyers:
            counts[index] = 1
        extra = self.n_orders - n_buyers
        repeaters = buyers[: max(1, round(n_buyers * REPEAT_SHARE))] if buyers else []
        if extra and repeaters:
            cum = list(
                accumulate(min(rng.paretovariate(HEAVY_ALPHA), HEAVY_CAP) for _ in repeaters)
            )
            for index in rng.choices(repeaters, cum_weights=cum, k=extra):
                counts[index] += 1
        return counts

    def write_orders(self, conn: sqlite3.Connection, counts: list[int]) -> list[int]:
        """Generate, sort by time, insert; returns the packed orders (for refunds)."""
        rng = self.rng
        step = time.perf_counter()
        items, item_cum, last_item = self.items, self.item_cum, len(self.items) - 1
        top = item_cum[-1]
        packed: list[int] = []
        append = packed.append
        for index, count in enumerate(counts):
            if not count:
                continue
            joined = self.joined[index]
            window = AS_OF - joined
            for _ in range(count):
                ts = joined + int(rng.random() * window)
                item = bisect(item_cum, rng.random() * top, 0, last_item)
                roll = rng.random()
                qty = 1 if roll < 0.85 else (2 if roll < 0.97 else 3)
                cents = items[item][2] * 100 * qty
                if rng.random() < 0.25:  # a coupon or promotion: 5-20% off, to 0.5 yuan
                    cents -= int(cents * rng.uniform(0.05, 0.2)) // 50 * 50
                append((((ts << CUSTOMER_BITS | index) << AMOUNT_BITS | cents) << ITEM_BITS) | item)
        packed.sort()
        log(f"  orders: generated and sorted in {time.perf_counter() - step:.1f}s")
        step = time.perf_counter()
        sql = (
            "INSERT INTO orders (order_id, customer_id, ts, amount_cents, category, sku, props) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL)"
        )
        ids = self.ids
        rows: list[tuple[Any, ...]] = []
        for number, value in enumerate(packed, 1):
            ts, index, cents, item = unpack(value)
            category, sku, _price = items[item]
            rows.append((order_id(number), ids[index], ts, cents, category, sku))
            if len(rows) >= BATCH:
                conn.executemany(sql, rows)
                rows = []
        conn.executemany(sql, rows)
        log(f"  orders: {len(packed):,} inserted in {time.perf_counter() - step:.1f}s")
        return packed

    def write_refunds(self, conn: sqlite3.Connection, packed: list[int]) -> int:
        rng = self.rng
        step = time.perf_counter()
        chosen = rng.sample(range(len(packed)), round(len(packed) * self.refund_rate))
        refunds = []
        for position in chosen:
            ts, index, cents, _item = unpack(packed[position])
            when = min(ts + rng.randint(3600, 14 * DAY), AS_OF - 1)
            amount = cents if rng.random() < 0.7 else rng.randint(1, max(1, cents))
            refunds.append((when, position + 1, index, amount))
        refunds.sort()
        conn.executemany(
            "INSERT INTO refunds (refund_id, order_id, customer_id, ts, amount_cents, props) "
            "VALUES (?, ?, ?, ?, ?, NULL)",
            (
                (f"R{number:09d}", order_id(order), self.ids[index], when, amount)
                for number, (when, order, index, amount) in enumerate(refunds, 1)
            ),
        )
        log(f"  refunds: {len(refunds):,} in {time.perf_counter() - step:.1f}s")
        return len(refunds)

    def write_events(self, conn: sqlite3.Connection) -> None:
        rng = self.rng
        step = time.perf_counter()
        types = [name for name, _ in EVENT_TYPES]
        cum = list(accumulate(weight for _, weight in EVENT_TYPES))
        packed = []
        for _ in range(self.n_events):
            index = rng.randrange(self.n_customers)
            joined = self.joined[index]
            ts = joined + int(rng.random() * (AS_OF - joined))
            kind = bisect(cum, rng.random() * cum[-1], 0, len(types) - 1)
            packed.append((ts << CUSTOMER_BITS | index) << 2 | kind)
        packed.sort()
        ids = self.ids
        conn.executemany(
            "INSERT INTO events (event_id, customer_id, type, ts, props) VALUES (?, ?, ?, ?, NULL)",
            (
                (f"E{number:09d}", ids[value >> 2 & MASK_CUSTOMER], types[value & 3], value >> 26)
                for number, value in enumerate(packed, 1)
            ),
        )
        log(f"  events: {len(packed):,} in {time.perf_counter() - step:.1f}s")


MASK_CUSTOMER = (1 << CUSTOMER_BITS) - 1


def unpack(value: int) -> tuple[int, int, int, int]:
    """(ts, customer index, amount in cents, item index) of a packed order."""
    item = value & ((1 << ITEM_BITS) - 1)
    value >>= ITEM_BITS
    cents = value & ((1 << AMOUNT_BITS) - 1)
    value >>= AMOUNT_BITS
    return value >> CUSTOMER_BITS, value & MASK_CUSTOMER, cents, item


def order_id(number: int) -> str:
    return f"O{number:010d}"


if __name__ == "__main__":
    main()
