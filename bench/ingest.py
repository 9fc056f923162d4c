"""Benchmark: `ingest_file` of a large orders CSV against a bare executemany of the same rows.

    .venv/bin/python bench/ingest.py                          # 5M rows
    .venv/bin/python bench/ingest.py --rows 50000 --customers 10000   # quick

Writes (once; reused while present) a seeded orders CSV under bench/out/ with columns
order_id, customer_id, ts (ISO 8601 with +08:00 offset), amount (like 199.00), category,
sku, in time order over two years. Then, each in a fresh interpreter:

(a) `ingest_file(store, "orders", csv, IngestOptions(tz=ZoneInfo("Asia/Shanghai")))`
    into a fresh store: rows/s, peak RSS, and RSS as the file progresses (the goal is
    constant memory);
(b) the baseline: the CSV parsed into tuples first (untimed), then only
    `INSERT INTO orders (...) VALUES (?,?,?,?,?,?,?)` via executemany into a fresh store
    with the same schema, in committed batches of 10,000. It excludes parsing.

Both stores are then compared (row count and checksums) to show they hold the same rows.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import random
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from _common import (
    OUT_DIR,
    Figures,
    Params,
    add_phase_arguments,
    current_rss_mib,
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
GENERATOR_VERSION = 1  # part of the CSV's name: bump when the generated rows change
SEED = 20250102
TZ_NAME = "Asia/Shanghai"
OFFSET = 8 * 3600  # Asia/Shanghai has no DST
OFFSET_TEXT = "+08:00"
AS_OF = 1_735_660_800  # 2025-01-01T00:00:00+08:00
DAY = 86_400
SPAN = 730 * DAY
BASELINE_BATCH = 10_000
HEADER = ("order_id", "customer_id", "ts", "amount", "category", "sku")
BASELINE_INSERT = (
    "INSERT INTO orders (order_id, customer_id, ts, amount_cents, category, sku, props) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
INSERT_KEYS = ("order_id", "customer_id", "ts", "amount_cents", "category", "sku", "props")
CHECKSUM_SQL = (
    "SELECT count(*), sum(ts), sum(amount_cents), min(order_id), max(order_id), "
    "sum(length(customer_id)), sum(length(category)), sum(length(sku)), "
    "count(props) FROM orders"
)
ITEMS = (
    # (category, sku, price in yuan, weight)
    ("skincare", "SK-TONER", 159, 12),
    ("skincare", "SK-SERUM", 399, 8),
    ("skincare", "SK-CREAM", 599, 6),
    ("skincare", "SK-MASK", 89, 10),
    ("makeup", "MU-LIP", 139, 9),
    ("makeup", "MU-FDN", 259, 6),
    ("makeup", "MU-MASC", 99, 8),
    ("haircare", "HC-SHAM", 69, 7),
    ("haircare", "HC-OIL", 139, 4),
    ("fragrance", "FR-MINI", 129, 5),
    ("fragrance", "FR-EDP50", 699, 3),
    ("bodycare", "BC-LOTION", 99, 8),
    ("bodycare", "BC-HAND", 39, 6),
    ("gift_set", "GS-NEWYEAR", 599, 4),
    ("gift_set", "GS-PRESTIGE", 2999, 1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark ingest_file against executemany.")
    parser.add_argument("--rows", "--orders", dest="rows", type=int, default=5_000_000)
    parser.add_argument(
        "--customers", type=int, default=1_000_000, help="distinct customer ids in the CSV"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the CSV and stores go")
    parser.add_argument("--rewrite", action="store_true", help="write the CSV even if present")
    add_phase_arguments(parser)
    args = parser.parse_args()
    if args.phase:
        run_phase_here(
            args, {"write_csv": phase_write_csv, "ingest": phase_ingest, "baseline": phase_baseline}
        )
        return
    run_benchmark(args)


# --------------------------------------------------------------------------- parent


def run_benchmark(args: argparse.Namespace) -> None:
    if args.rows < 1 or args.customers < 1:
        raise SystemExit("--rows and --customers must be at least 1")
    revision = engine_revision()
    machine_start = warn_if_busy("at the start")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"orders-r{args.rows}-c{args.customers}-v{GENERATOR_VERSION}.csv"
    log(f"ingest benchmark: {args.rows:,} order rows, {args.customers:,} customers; {csv_path}")

    csv_write_s: float | None = None
    reused = csv_path.exists() and not args.rewrite
    if reused:
        log("CSV already written with these sizes: reused (use --rewrite to rewrite it)")
    else:
        log("writing the CSV (not part of the figures) ...")
        written = run_phase_in_child(
            SCRIPT,
            "write_csv",
            {"csv": str(csv_path), "rows": args.rows, "customers": args.customers},
        )
        csv_write_s = written["seconds"]
        log(f"written in {csv_write_s:.1f}s")
    csv_mib = csv_path.stat().st_size / 2**20
    log(f"CSV {csv_mib:,.0f} MiB; warming the OS page cache: {warm_file(csv_path):.1f}s")

    ingest_db = out / "ingest-a.db"
    baseline_db = out / "ingest-b.db"
    log("(a) ingest_file into a fresh store ...")
    ingest = run_phase_in_child(SCRIPT, "ingest", {"csv": str(csv_path), "db": str(ingest_db)})
    ingest_rate = ingest["rows_read"] / ingest["seconds"]
    log(
        f"(a) ingest_file: {ingest['rows_read']:,} rows in {ingest['seconds']:.1f}s = "
        f"{ingest_rate:,.0f} rows/s, peak RSS {ingest['peak_rss_mib']} MiB"
    )
    log("(b) baseline executemany of the same parsed rows into a fresh store ...")
    baseline = run_phase_in_child(
        SCRIPT, "baseline", {"csv": str(csv_path), "db": str(baseline_db)}
    )
    baseline_rate = baseline["rows"] / baseline["seconds"]
    log(
        f"(b) baseline: {baseline['rows']:,} rows in {baseline['seconds']:.1f}s = "
        f"{baseline_rate:,.0f} rows/s (parsing, untimed, took {baseline['parse_s']:.1f}s)"
    )

    log("comparing the two stores' orders ...")
    same = checksum(ingest_db) == checksum(baseline_db)
    log("the stores hold the same orders" if same else "WARNING: the stores' orders DIFFER")
    ratio = ingest["seconds"] / baseline["seconds"]
    log(f"ingest_file takes {ratio:.2f}x the bare executemany time (ingest includes parsing)")

    figures: Figures = {
        "benchmark": "ingest",
        "rows": args.rows,
        "customers": args.customers,
        "csv": str(csv_path),
        "csv_mib": round(csv_mib, 1),
        "csv_reused": reused,
        "csv_write_s": None if csv_write_s is None else round(csv_write_s, 2),
        **run_context(revision, machine_start),
        "ingest_s": round(ingest["seconds"], 3),
        "ingest_rows_per_s": round(ingest_rate),
        "ingest_rows_read": ingest["rows_read"],
        "ingest_rows_added": ingest["added"],
        "ingest_rows_rejected": ingest["rejected"],
        "ingest_customers_created": ingest["customers_created"],
        "ingest_peak_rss_mib": ingest["peak_rss_mib"],
        "ingest_vm_hwm_mib": ingest["vm_hwm_mib"],
        "ingest_rss_before_mib": ingest["rss_before_phase_mib"],
        "ingest_rss_mib_by_progress": ingest["rss_by_progress"],
        "sqlite_cache_size_pragma": ingest["cache_size_pragma"],
        "ingest_does": "read + normalise each row, INSERT OR IGNORE auto-created customers, "
        "INSERT OR IGNORE orders, batches of 10,000 each committed, ingest_log",
        "baseline_s": round(baseline["seconds"], 3),
        "baseline_rows_per_s": round(baseline_rate),
        "baseline_excludes_parsing": True,
        "baseline_note": "CSV parsed into tuples before timing (untimed); timed: only "
        "executemany INSERT INTO orders in committed batches of 10,000 into a fresh store "
        "with the same schema and pragmas",
        "baseline_parse_untimed_s": round(baseline["parse_s"], 2),
        "baseline_peak_rss_mib": baseline["peak_rss_mib"],
        "ingest_io_mib": ingest["io"],
        "baseline_io_mib": baseline["io"],
        "io_note": "rchar/wchar: bytes through read()/write() calls (SQLite WAL, checkpoints, "
        "temp files; the baseline's rchar includes reading the CSV to parse it)",
        "baseline_peak_rss_note": "includes every parsed row held in memory",
        "ratio_ingest_s_to_baseline_s": round(ratio, 3),
        "ratio_ingest_rate_to_baseline_rate": round(ingest_rate / baseline_rate, 3),
        "rss_method": "ru_maxrss (RUSAGE_SELF) of each child process, started via /bin/sh "
        "so it does not inherit the parent's peak; vm_hwm is a cross-check",
        "parent_peak_rss_mib": peak_rss_mib(),
        "stores_match": same,
    }
    emit_json(figures)


def checksum(db: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return tuple(conn.execute(CHECKSUM_SQL).fetchone())
    finally:
        conn.close()


# --------------------------------------------------------------------------- phases


def phase_write_csv(params: Params) -> Figures:
    """Seeded orders in time order; written to a temporary name, renamed when complete."""
    start = time.perf_counter()
    path, rows, customers = Path(params["csv"]), int(params["rows"]), int(params["customers"])
    rng = random.Random(SEED)
    width = max(7, len(str(customers)))
    cum: list[float] = []
    total = 0.0
    for *_, weight in ITEMS:
        total += weight
        cum.append(total)
    partial = path.with_name(path.name + ".partial")
    mean_gap = SPAN / rows
    ts = float(AS_OF - SPAN)
    day_text: dict[int, str] = {}
    with partial.open("w", encoding="utf-8", newline="") as handle:
        handle.write(",".join(HEADER) + "\r\n")
        lines: list[str] = []
        for number in range(1, rows + 1):
            ts = min(ts + rng.expovariate(1 / mean_gap), AS_OF - 1)
            day, seconds = divmod(int(ts) + OFFSET, DAY)
            date = day_text.get(day)
            if date is None:
                date = day_text[day] = time.strftime("%Y-%m-%d", time.gmtime(day * DAY))
            hours, rest = divmod(seconds, 3600)
            minutes, secs = divmod(rest, 60)
            pick = rng.random() * total
            item = next(i for i, edge in enumerate(cum) if pick < edge)
            category, sku, price, _weight = ITEMS[item]
            cents = price * 100 * (1 if rng.random() < 0.85 else 2)
            if rng.random() < 0.25:  # a promotion: 5-20% off, to 0.5 yuan
                cents -= int(cents * rng.uniform(0.05, 0.2)) // 50 * 50
            lines.append(
                f"O{number:010d},C{rng.randrange(1, customers + 1):0{width}d},"
                f"{date}T{hours:02d}:{minutes:02d}:{secs:02d}{OFFSET_TEXT},"
                f"{cents // 100}.{cents % 100:02d},{category},{sku}\r\n"
            )
            if len(lines) >= 100_000:
                handle.write("".join(lines))
                lines = []
                if number % 1_000_000 == 0:
                    log(f"  {number:,} rows written")
        handle.write("".join(lines))
    partial.replace(path)
    return {"seconds": time.perf_counter() - start}


def phase_ingest(params: Params) -> Figures:
    """(a) ingest_file into a fresh store, sampling RSS as the file is read."""
    from engine.ingest import IngestOptions, ingest_file
    from engine.ingest.read import ByteCounter
    from engine.store import open_store

    db = Path(params["db"])
    csv_path = Path(params["csv"])
    remove_db(db)
    samples: dict[str, float] = {}
    next_tenth = [1]

    def progress(counter: ByteCounter) -> None:
        done = counter.read / counter.total if counter.total else 1.0
        while next_tenth[0] <= 10 and done >= next_tenth[0] / 10 - 1e-9:
            rss = current_rss_mib()
            samples[f"{next_tenth[0] * 10}%"] = rss
            log(f"  ingest {next_tenth[0] * 10:3d}% of the file, RSS now {rss} MiB")
            next_tenth[0] += 1

    with open_store(db) as store:
        rss_before = peak_rss_mib()
        options = IngestOptions(tz=ZoneInfo(TZ_NAME))
        start = time.perf_counter()
        result = ingest_file(store, "orders", csv_path, options, progress)
        seconds = time.perf_counter() - start
        cache_size = store.conn.execute("PRAGMA cache_size").fetchone()[0]
    if result.interrupted or result.rejected:
        log(f"  note: interrupted={result.interrupted} rejected={result.rejected}")
    return {
        "seconds": seconds,
        "rows_read": result.rows_read,
        "added": result.added,
        "rejected": result.rejected,
        "customers_created": result.customers_created,
        "rss_before_phase_mib": rss_before,
        "rss_by_progress": samples,
        "cache_size_pragma": cache_size,
    }


def phase_baseline(params: Params) -> Figures:
    """(b) parse everything first (untimed), then time only the executemany batches."""
    from engine.store import open_store

    db = Path(params["db"])
    csv_path = Path(params["csv"])
    start = time.perf_counter()
    rows = parse_csv(csv_path)
    parse_s = time.perf_counter() - start
    check_parse(csv_path, rows)
    log(f"  parsed {len(rows):,} rows into tuples in {parse_s:.1f}s (untimed)")
    remove_db(db)
    with open_store(db) as store:
        start = time.perf_counter()
        for first in range(0, len(rows), BASELINE_BATCH):
            with store.transaction() as conn:
                conn.executemany(BASELINE_INSERT, rows[first : first + BASELINE_BATCH])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(rows), "parse_s": parse_s}


def parse_csv(path: Path) -> list[tuple[Any, ...]]:
    """The CSV's rows as store tuples, the way the engine would store them."""
    tz = ZoneInfo(TZ_NAME)
    names: dict[str, str] = {}
    rows: list[tuple[Any, ...]] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for order_id, customer_id, ts, amount, category, sku in reader:
            moment = datetime.fromisoformat(ts)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
            whole, _, fraction = amount.partition(".")
            if len(fraction) > 2:
                raise SystemExit(f"unexpected amount {amount!r}")
            cents = int(whole) * 100 + int((fraction + "00")[:2])
            rows.append(
                (
                    order_id,
                    customer_id,
                    int(moment.timestamp() // 1),
                    cents,
                    names.setdefault(category, category),
                    names.setdefault(sku, sku),
                    None,
                )
            )
    return rows


def check_parse(path: Path, rows: list[tuple[Any, ...]], sample: int = 2_000) -> None:
    """The engine's own normaliser must give the same values for the first rows."""
    from engine.ingest.normalize import Normalizer

    normalizer = Normalizer("orders", {}, ZoneInfo(TZ_NAME))
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for index, (raw, mine) in enumerate(zip(reader, rows, strict=False), 1):
            if index > sample:
                break
            values = normalizer.normalize(index, dict(raw)).values
            theirs = tuple(values[k] for k in INSERT_KEYS)
            if theirs != mine:
                sys.exit(f"baseline parse differs from the engine at row {index}: {mine} {theirs}")


if __name__ == "__main__":
    main()
