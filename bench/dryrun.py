"""Benchmark: `engine.dryrun.dry_run` stepping every example playbook weekly through a
year of history, against one single-step dry run and against the naive simulation that
rebuilds every step's features from scratch.

    .venv/bin/python bench/dryrun.py                     # 100k customers, 1M orders, 52 steps
    .venv/bin/python bench/dryrun.py --customers 5000 --orders 50000 --steps 8   # quick

The store (generated once under bench/out/, reused while the sizes and generator match)
is bench/run.py's: bench/features.py's seeded store (customers, orders over the two years
before AS_OF, ~2% refunds, friend/group events) plus the tags and property-carrying events
the example playbooks read. The playbooks are all of playbooks/*.yaml. The steps are
weekly (what `steps_between(first, last, 7 days)` gives), the last one 15 days before the
history ends, so that every step's 14-day outcome window lies inside the history (the
window is cut at the last recorded order or event, just before AS_OF).

Measurements, each in a fresh interpreter (peak RSS is its own), the OS page cache warmed
beforehand; each is `dry_run(db, Settings(), playbooks, steps)` end to end, exactly as
`playbook dry-run` calls it - private copy of the store (SQLite backup API), the future
forgotten, features, `run_playbooks` at each step, step summaries, per-rule totals and
outcomes, scratch copy deleted:

  single      one step, the last one (`--as-of`): the features are one full build (the
              stepper's first step) and the run is the playbooks' first ever. Run twice,
              before and after the others; the best one is the figure.
  simulation  every step (`--from/--to/--every 7d`), features stepped incrementally by
              `FeatureStepper` (the library's default). Also run twice (second, and
              last), the best one the figure: this VM's speed drifts by 15-30% over
              minutes, and one run of each measured in different minutes can land on
              either side of the target by that alone. Both runs are reported.
  naive       every step with `incremental=False`: each step's features rebuilt from
              scratch by `build_features` - the baseline the stepping must beat.

Both simulations and naive must give the same `to_dict()` (checked: same_results). Targets:
simulation <= 5x single, peak RSS <= 1 GiB in every measurement. Inside each measurement
the parts are timed by wrapping the library's functions (copy, forget the future,
features, run_playbooks and, nested in it, matching / event facts / decide / enqueue /
messages / tags, step summary, totals, outcomes); per-step seconds are logged for the
first and last steps and every tenth. With two or more steps on a machine with a second
core, the simulation's lookahead thread (`engine.lookahead`) builds each step's features,
event facts and tag-free matches one step ahead and adds each step's outcomes and rule
totals: its parts are reported apart ("meanwhile on the second core"), as they overlap
the simulation's, and a step's "features" is then the time to take them in. Outcomes and
rule totals the simulation's thread ran itself while it would have waited are its own
parts "outcomes" and "rule totals", not counted as waiting. naive goes
through the same lookahead, building from scratch there: naive / simulation compares the
stepping alone.

A measurement that passes --time-limit is stopped; the figures then say where it was.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import features as features_bench
import run as run_bench
from _common import (
    OUT_DIR,
    Figures,
    Params,
    add_phase_arguments,
    emit_json,
    engine_revision,
    log,
    peak_rss_mib,
    run_context,
    run_phase_here,
    run_phase_in_child,
    warm_file,
    warn_if_busy,
)

# The engine is imported only inside the phases, which run in child processes: the
# parent stays small so it cannot inflate any child's peak RSS.

SCRIPT = Path(__file__).resolve()
AS_OF = features_bench.AS_OF  # the store's history ends just before this moment
AS_OF_TEXT = features_bench.AS_OF_TEXT
DAY_SECONDS = 86_400
WINDOW_DAYS = 14  # the dry run's default outcome window
# The last step: its window [step, step + 14 days) must end before the last recorded fact
# (just before AS_OF), or its decisions count as "incomplete window".
LAST_STEP = AS_OF - (WINDOW_DAYS + 1) * DAY_SECONDS
PLAYBOOKS = run_bench.PLAYBOOKS
RATIO_TARGET = 5.0
RSS_TARGET_MIB = 1024
DEFAULT_TIME_LIMIT = 1800.0
ORDERS_PER_CUSTOMER = 10  # 1M orders at 100k customers
LOG_FIRST_STEPS = 3
LOG_LAST_STEPS = 2
AHEAD = "second core: "  # parts run by the simulation's lookahead thread


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark a stepped dry run against one step and a naive simulation."
    )
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument(
        "--orders", type=int, default=None, help="default: 10 per customer (1M at 100k)"
    )
    parser.add_argument(
        "--events", type=int, default=None, help="default: 1.5 per customer (150k at 100k)"
    )
    parser.add_argument("--steps", type=int, default=52, help="steps (default %(default)s)")
    parser.add_argument(
        "--every-days", type=int, default=7, help="days between steps (default %(default)s)"
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "sql", "rules"),
        default="sql",
        help="dry_run's engine (default %(default)s, as `playbook dry-run`)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        help="stop a measurement after this many seconds (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where stores go")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the store")
    add_phase_arguments(parser)
    args = parser.parse_args()
    if args.phase:
        # run_bench.start_watchdog writes a stopped measurement's figures to this file.
        run_bench._RESULT_FILE = args.result_file
        run_phase_here(
            args,
            {
                "generate": run_bench.phase_generate,
                "schema": phase_schema,
                "measure": phase_measure,
            },
        )
        return
    run_benchmark(args)


# --------------------------------------------------------------------------- parent


def run_benchmark(args: argparse.Namespace) -> None:
    if args.customers < 1:
        raise SystemExit("--customers must be at least 1")
    if args.customers >= 1 << features_bench.CUSTOMER_BITS:
        raise SystemExit(f"--customers must be below {1 << features_bench.CUSTOMER_BITS}")
    if args.steps < 1 or args.every_days < 1:
        raise SystemExit("--steps and --every-days must be at least 1")
    orders = args.orders if args.orders is not None else args.customers * ORDERS_PER_CUSTOMER
    events = (
        args.events
        if args.events is not None
        else round(args.customers * features_bench.EVENTS_PER_CUSTOMER)
    )
    every = args.every_days * DAY_SECONDS
    steps = [LAST_STEP - k * every for k in reversed(range(args.steps))]
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
    spec = {**base_spec, "extras": run_bench.EXTRAS_VERSION, "extras_seed": run_bench.EXTRAS_SEED}
    db = out / f"dryrun-c{args.customers}-o{orders}-e{events}.db"
    log(
        f"dry-run benchmark: {args.customers:,} customers, {orders:,} orders, {events:,} events, "
        f"{len(PLAYBOOKS)} playbooks, {args.steps} steps every {args.every_days} days, "
        f"history to {AS_OF_TEXT}; store {db}"
    )
    generation: Figures | None = None
    reused = not args.regenerate and features_bench.stored_meta(db, "bench_run_spec") == spec
    if reused:
        log("store already generated with these sizes: reused (use --regenerate to rebuild)")
    else:
        log("generating the store (bench/run.py's generator; not part of the figures) ...")
        generation = run_phase_in_child(
            SCRIPT, "generate", {"db": str(db), "base_spec": base_spec, "spec": spec}
        )
        log(
            f"generated in {generation['seconds']:.1f}s (peak RSS {generation['peak_rss_mib']} MiB)"
        )
    schema = run_phase_in_child(SCRIPT, "schema", {"db": str(db)})
    counts = run_bench.table_counts(db)
    log("rows: " + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    log(f"store file {db.stat().st_size / 2**20:,.0f} MiB; warming the OS page cache ...")
    log(f"read it in {warm_file(db):.1f}s")

    def measure(label: str, moments: list[int], incremental: bool) -> Figures:
        log(f"{label}: dry_run over {len(moments)} step(s), incremental={incremental} ...")
        result = run_phase_in_child(
            SCRIPT,
            "measure",
            {
                "db": str(db),
                "label": label,
                "steps": moments,
                "incremental": incremental,
                "engine": args.engine,
                "time_limit": args.time_limit,
            },
        )
        report_measure(result)
        return result

    singles = [measure("single", steps[-1:], True)]
    simulations = [measure("simulation", steps, True)]
    naive = measure("naive", steps, False)
    singles.append(measure("single (again)", steps[-1:], True))
    simulations.append(measure("simulation (again)", steps, True))

    figures = summarise(
        args, db, counts, spec, reused, generation, schema, steps, singles, simulations, naive
    )
    figures.update(run_context(revision, machine_start))
    emit_json(figures)


def report_measure(result: Figures) -> None:
    label = result["label"]
    if result.get("stopped"):
        log(
            f"{label} STOPPED after {result['seconds']:.0f}s at step "
            f"{result['steps_done']}/{result['steps']}: {result['stopped']}"
        )
    else:
        log(
            f"{label}: {result['seconds']:.2f}s end to end for {result['steps']} step(s); "
            f"{result['queued']:,} queued, {result['matched']:,} matched"
        )
    parts = result["parts_s"]
    log(f"  parts: {fmt_parts({k: v for k, v in parts.items() if not k.startswith(AHEAD)})}")
    nested = fmt_parts(parts, nested=True)
    if nested:
        log(f"  inside run_playbooks: {nested}")
    ahead = {k.removeprefix(AHEAD): v for k, v in parts.items() if k.startswith(AHEAD)}
    if ahead:
        log(f"  meanwhile on the second core (lookahead): {fmt_parts(ahead)}")
    per_step = result["per_step"]
    if len(per_step["features_s"]) > 1:
        later = [
            f + r + s
            for f, r, s in zip(
                per_step["features_s"][1:],
                per_step["run_s"][1:],
                per_step["summary_s"][1:],
                strict=False,
            )
        ]
        log(
            f"  first step {step_seconds(per_step, 0):.2f}s; later steps median "
            f"{statistics.median(later):.2f}s (features "
            f"{statistics.median(per_step['features_s'][1:]):.2f}s, run_playbooks "
            f"{statistics.median(per_step['run_s'][1:]):.2f}s), max {max(later):.2f}s"
        )
    log(f"  peak RSS {result['peak_rss_mib']} MiB (VmHWM {result['vm_hwm_mib']} MiB)")


def fmt_parts(parts: dict[str, float], nested: bool = False) -> str:
    chosen = {k: v for k, v in parts.items() if k.startswith("run_playbooks > ") == nested}
    if nested:  # they finish inner first: by name, so "event facts: <type>" follow the total
        chosen = dict(sorted(chosen.items()))
    return ", ".join(f"{k.removeprefix('run_playbooks > ')} {v:.2f}s" for k, v in chosen.items())


def step_seconds(per_step: dict[str, list[float]], index: int) -> float:
    return sum(per_step[k][index] for k in ("features_s", "run_s", "summary_s"))


def summarise(
    args: argparse.Namespace,
    db: Path,
    counts: dict[str, int],
    spec: dict[str, Any],
    reused: bool,
    generation: Figures | None,
    schema: Figures,
    steps: list[int],
    singles: list[Figures],
    simulations: list[Figures],
    naive: Figures,
) -> Figures:
    finished = {
        "single": all(not s.get("stopped") for s in singles),
        "simulation": all(not s.get("stopped") for s in simulations),
        "naive": not naive.get("stopped"),
    }
    # Each measured twice, at different moments (this VM's speed drifts by minutes): the
    # faster run of each is its figure.
    single_s = min(s["seconds"] for s in singles)
    simulation = min(simulations, key=lambda s: s["seconds"])
    ratio = simulation["seconds"] / single_s if single_s else None
    speedup = (  # unknown if the simulation was stopped; a lower bound if naive was
        naive["seconds"] / simulation["seconds"]
        if finished["simulation"] and simulation["seconds"]
        else None
    )
    if finished["simulation"] and finished["naive"]:
        same: bool | None = all(s["report_sha256"] == naive["report_sha256"] for s in simulations)
        other = next((s for s in simulations if s["report_sha256"] != naive["report_sha256"]), None)
        difference = None if other is None else first_difference(other["report"], naive["report"])
    else:
        same, difference = None, "not compared: a simulation was stopped"
    runs = ", ".join(f"{s['seconds']:.2f}" for s in singles)
    sims = ", ".join(f"{s['seconds']:.2f}" for s in simulations)
    log(
        f"single {single_s:.2f}s (runs {runs}), simulation {simulation['seconds']:.2f}s "
        f"(runs {sims}), naive {naive['seconds']:.2f}s"
    )
    meets_ratio = finished["simulation"] and ratio is not None and ratio <= RATIO_TARGET
    if ratio is not None:
        bound = "" if finished["simulation"] else "at least "
        verdict = "meets" if meets_ratio else "MISSES"
        log(
            f"simulation / single {bound}{ratio:.2f} for {len(steps)} steps "
            f"({verdict} target <= {RATIO_TARGET:g})"
        )
    if speedup is not None:
        bound = "" if finished["naive"] else "at least "
        log(f"naive / simulation {bound}{speedup:.2f} (features recomputed at every step)")
    log(
        "simulations and naive give the same results"
        if same
        else f"simulations and naive DIFFER: {difference}"
        if same is False
        else f"results {difference}"
    )
    measurements = [*singles, *simulations, naive]
    peak = max(m["peak_rss_mib"] for m in measurements)
    verdict = "meets" if peak <= RSS_TARGET_MIB else "MISSES"
    log(f"peak RSS {peak} MiB ({verdict} target <= {RSS_TARGET_MIB} MiB)")
    return {
        "benchmark": "dryrun",
        "customers": counts["customers"],
        "orders": counts["orders"],
        "refunds": counts["refunds"],
        "events": counts["events"],
        "customers_tagged": counts["customers_tagged"],
        "history_to": AS_OF_TEXT,
        "playbooks": len(PLAYBOOKS),
        "rules": simulation["rules"],
        "state_rules": simulation["state_rules"],
        "event_rules": simulation["event_rules"],
        "engine": args.engine,
        "steps": len(steps),
        "every_days": args.every_days,
        "first_step": simulation["first_step"],
        "last_step": simulation["last_step"],
        "window_days": WINDOW_DAYS,
        "store": str(db),
        "store_mib": round(db.stat().st_size / 2**20, 1),
        "store_reused": reused,
        "store_spec": spec,
        "generation_s": None if generation is None else round(generation["seconds"], 2),
        "schema_indexes_added": schema["added"],
        "single_s": round(single_s, 3),
        "single_s_runs": [round(s["seconds"], 3) for s in singles],
        "simulation_s": round(simulation["seconds"], 3),
        "simulation_s_runs": [round(s["seconds"], 3) for s in simulations],
        "naive_s": round(naive["seconds"], 3),
        "finished": finished,
        "time_limit_s": args.time_limit,
        "ratio_simulation_to_single": None if ratio is None else round(ratio, 3),
        "ratio_target": RATIO_TARGET,
        "meets_ratio_target": meets_ratio,
        "speedup_naive_to_simulation": None if speedup is None else round(speedup, 3),
        "same_results": same,
        "results_difference": difference,
        "queued": {
            "single": singles[0]["queued"],
            "simulation": simulation["queued"],
            "naive": naive["queued"],
        },
        "matched": {
            "single": singles[0]["matched"],
            "simulation": simulation["matched"],
            "naive": naive["matched"],
        },
        "incomplete_window_decisions": simulation.get("incomplete_window"),
        "parts_s": {
            "single": singles[0]["parts_s"],
            "simulation": simulation["parts_s"],
            "naive": naive["parts_s"],
        },
        "per_step_s": {
            "simulation": simulation["per_step"],
            "naive": naive["per_step"],
        },
        "queued_by_step": simulation["queued_by_step"],
        "peak_rss_mib": peak,
        "peak_rss_mib_each": {m["label"]: m["peak_rss_mib"] for m in measurements},
        "vm_hwm_mib_each": {m["label"]: m["vm_hwm_mib"] for m in measurements},
        "io_mib_each": {m["label"]: m["io"] for m in measurements},
        "rss_target_mib": RSS_TARGET_MIB,
        "meets_rss_target": peak <= RSS_TARGET_MIB,
        "rss_method": "ru_maxrss (RUSAGE_SELF) of each measuring child process, started via "
        "/bin/sh so it does not inherit the parent's peak; vm_hwm is a cross-check",
        "parent_peak_rss_mib": peak_rss_mib(),
        "data_shape": features_bench.stored_meta(db, "bench_shape"),
    }


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two JSON-like values first differ (a path and both values), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if a == b else f"{path or '.'}: {str(a)[:200]} != {str(b)[:200]}"


# --------------------------------------------------------------------------- phases


def phase_schema(params: Params) -> Figures:
    """Bring a reused store's schema up to date, so every copy of it has today's indexes."""
    from engine.store import open_store

    with open_store(params["db"]) as store:
        return {"added": run_bench.sync_schema(store)}


def phase_measure(params: Params) -> Figures:
    """One `dry_run` end to end, its parts timed by wrapping the library's functions."""
    import engine.dryrun as dryrun_module
    import engine.lookahead as lookahead_module
    import engine.run as run_module
    from engine.clock import format_epoch
    from engine.features import FeatureStepper
    from engine.playbook import load_playbook
    from engine.settings import Settings

    settings = Settings()
    playbooks = [load_playbook(path, settings) for path in PLAYBOOKS]
    steps: list[int] = params["steps"]
    label: str = params["label"]
    watch = run_bench.Stopwatch()
    figures = watch.figures
    per_step: dict[str, list[float]] = {"features_s": [], "run_s": [], "summary_s": []}
    queued_by_step: list[int] = []
    rules = [r for p in playbooks for r in p.rules]
    figures.update(
        label=label,
        steps=len(steps),
        steps_done=0,
        incremental=params["incremental"],
        first_step=format_epoch(steps[0], settings.tz),
        last_step=format_epoch(steps[-1], settings.tz),
        rules=len(rules),
        state_rules=sum(1 for r in rules if r.on is None),
        event_rules=sum(1 for r in rules if r.on is not None),
        per_step=per_step,
        queued_by_step=queued_by_step,
    )

    # While it waits for the second core, the simulation runs jobs (outcomes, rule
    # totals) itself: they are its parts "outcomes" and "rule totals", not the waiting's.
    jobs_here = [0.0]

    def timed(name: str, func: Callable[..., Any], into: list[float] | None = None) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start, jobs_before = time.perf_counter(), jobs_here[0]
            with watch.part(name):
                result = func(*args, **kwargs)
            jobs = jobs_here[0] - jobs_before
            if jobs:
                with watch.lock:
                    watch.parts[name] -= jobs
            if into is not None:
                into.append(time.perf_counter() - start - jobs)
            return result

        return wrapper

    start = 0.0

    def forget(*args: Any, **kwargs: Any) -> Any:
        with watch.lock:  # from the call to here: the backup copy and opening it
            watch.parts["copy the store"] = time.perf_counter() - start
        with watch.part("forget the future"):
            return real_forget(*args, **kwargs)

    def step(*args: Any, **kwargs: Any) -> Any:
        with watch.part("step summary"):
            began = time.perf_counter()
            summary = real_step(*args, **kwargs)
            per_step["summary_s"].append(time.perf_counter() - began)
        queued_by_step.append(summary.queued)
        return summary

    def progress(_n: int) -> None:
        with watch.lock:
            figures["steps_done"] += 1
            done = figures["steps_done"]
        if done <= LOG_FIRST_STEPS or done > len(steps) - LOG_LAST_STEPS or done % 10 == 0:
            i = done - 1
            log(
                f"    step {done}/{len(steps)} {format_epoch(steps[i], settings.tz)}: "
                f"{step_seconds(per_step, i):.2f}s (features {per_step['features_s'][i]:.2f}s, "
                f"run_playbooks {per_step['run_s'][i]:.2f}s, summary "
                f"{per_step['summary_s'][i]:.2f}s), {queued_by_step[i]:,} queued"
            )

    real_forget, real_step = dryrun_module._forget_the_future, dryrun_module._step
    dryrun_module._forget_the_future = forget
    dryrun_module._step = step

    def here_or_ahead(name: str, func: Callable[..., Any]) -> Any:
        """A part of the thread it runs on: the simulation's, or the lookahead's (named
        "second core: ...", overlapping the simulation's parts: not in their sum)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ahead = threading.current_thread().name == "lookahead"
            with watch.part(f"{AHEAD}{name}" if ahead else name):
                return func(*args, **kwargs)

        return wrapper

    def per_step_only(func: Callable[..., Any]) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            result = func(*args, **kwargs)
            per_step["features_s"].append(time.perf_counter() - began)
            return result

        return wrapper

    FeatureStepper.advance = here_or_ahead("features (stepped)", FeatureStepper.advance)
    for module in (dryrun_module, lookahead_module):
        module.build_features = here_or_ahead("features (full build)", module.build_features)
    lookahead_module.build_event_facts = here_or_ahead(
        "event facts", lookahead_module.build_event_facts
    )
    real_run_a_job = lookahead_module.Lookahead._run_a_job

    def run_a_job(self: Any) -> bool:
        began = time.perf_counter()
        try:
            return bool(real_run_a_job(self))
        finally:
            jobs_here[0] += time.perf_counter() - began

    lookahead_module.Lookahead._run_a_job = run_a_job
    # A step's features: built here (in place), or taken from the second core's file.
    dryrun_module._InPlace.take = per_step_only(dryrun_module._InPlace.take)
    lookahead_module.Lookahead.take = timed(
        "features taken from the second core",
        lookahead_module.Lookahead.take,
        per_step["features_s"],
    )
    lookahead_module.Lookahead.drain = timed(
        "waiting for the second core's last jobs", lookahead_module.Lookahead.drain
    )
    dryrun_module.run_playbooks = timed(
        "run_playbooks", dryrun_module.run_playbooks, per_step["run_s"]
    )
    outcomes, totals = dryrun_module._Outcomes, dryrun_module._Totals
    outcomes.add_step = here_or_ahead("outcomes", outcomes.add_step)
    outcomes.summarize = timed("outcomes: summary", outcomes.summarize)
    totals.add_step = here_or_ahead("rule totals", totals.add_step)
    runner, decider = run_module._Runner, run_module.RunDecider
    inside = "run_playbooks > "
    # These overlap: event facts are built inside event-rule matching; decide and enqueue
    # are called from the rules' matching and after it.
    runner._state_candidates = watch.wrap(f"{inside}state rules: match", runner._state_candidates)
    runner._event_candidates = watch.wrap(
        f"{inside}event rules: facts and match", runner._event_candidates
    )
    real_events = run_module.RunFacts.events

    def events(self: Any, event: str, start: int) -> Any:
        with watch.part(f"{inside}event facts"), watch.part(f"{inside}event facts: {event}"):
            return real_events(self, event, start)

    run_module.RunFacts.events = events
    runner._apply_tags = watch.wrap(f"{inside}apply_tags", runner._apply_tags)
    runner.render_messages = watch.wrap(f"{inside}render_messages", runner.render_messages)
    decider.decide = watch.wrap(f"{inside}decide", decider.decide)
    decider.flush = watch.wrap(f"{inside}enqueue", decider.flush)

    def finish(partial: Figures) -> None:
        partial["seconds"] = time.perf_counter() - start
        partial["queued"] = sum(queued_by_step)
        partial["matched"] = None

    stop = run_bench.start_watchdog(watch, float(params["time_limit"]), finish)
    start = time.perf_counter()
    report = dryrun_module.dry_run(
        params["db"],
        settings,
        playbooks,
        steps,
        engine=params["engine"],
        progress=progress,
        incremental=params["incremental"],
    )
    seconds = time.perf_counter() - start
    stop.set()
    with watch.lock:
        parts = dict(watch.parts)
    top = [k for k in parts if not k.startswith((inside, AHEAD))]
    parts["other (scratch clean-up, set-up)"] = seconds - sum(parts[k] for k in top)
    data = report.to_dict()
    text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    simulation = report.simulation
    figures.update(
        seconds=seconds,
        parts_s={k: round(v, 3) for k, v in parts.items()},
        per_step={k: [round(v, 3) for v in values] for k, values in per_step.items()},
        queued=simulation.queued,
        matched=sum(s.matched for s in simulation.steps),
        suppressed=sum(s.suppressed for s in simulation.steps),
        incomplete_window=sum(
            r.outcome.incomplete_window for r in simulation.rules if r.outcome is not None
        ),
        notes=simulation.notes,
        report_sha256=hashlib.sha256(text.encode()).hexdigest(),
        report=data if len(steps) > 1 else None,
    )
    return figures


if __name__ == "__main__":
    main()
