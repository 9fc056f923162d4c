"""Dry runs and backtests: read-only, equal to real runs, state carried across steps,
no leakage from the future, outcomes against the holdout, --against."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli import cli
from engine.clock import DAY
from engine.decide import bucket
from engine.demo import generate_demo
from engine.dryrun import DryRun, Simulation, dry_run, steps_between
from engine.playbook import Playbook, load_playbook
from engine.run import run_playbooks
from engine.settings import Settings
from engine.store import Store, open_store
from tests.conftest import SHANGHAI, add_fact
from tests.test_run import T0, add_customer, add_order, playbook

SETTINGS = Settings()
PLAYBOOKS = sorted(Path("playbooks").glob("*.yaml"))
# Demo data ends here; every step below leaves a full 14-day outcome window after it.
DEMO_END = T0
COMPARED = ("customer_id", "rule_id", "trigger", "action_index", "status", "reason")


def digest(folder: Path) -> dict[str, str]:
    """Every file in `folder` with the hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dryrun")
    path = folder / "demo.db"
    with open_store(path) as store:
        generate_demo(store, customers=800, seed=4, end=DEMO_END, tz=SHANGHAI)
    return path


def books() -> list[Playbook]:
    return [load_playbook(p, SETTINGS) for p in PLAYBOOKS]


def queue_rows(store: Store, where: str = "", args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    columns = ", ".join(("playbook", *COMPARED, "message", "scheduled_at"))
    return store.conn.execute(
        f"SELECT {columns} FROM actions {where} ORDER BY {columns}", args
    ).fetchall()


def dry_run_queue(
    db: Path, steps: list[int], **options: Any
) -> tuple[DryRun, list[tuple[Any, ...]]]:
    """A dry run of the example playbooks, and its simulated queue (`queue_rows`)."""
    seen: dict[str, Any] = {}
    report = dry_run(
        db,
        SETTINGS,
        books(),
        steps,
        inspect=lambda store, _: seen.update(rows=queue_rows(store)),
        **options,
    )
    return report, seen["rows"]


def test_the_store_is_never_written(demo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copy(demo, folder / "s.db")
    before = digest(folder)
    result = CliRunner().invoke(
        cli,
        [
            "dry-run",
            "playbooks",
            "--db",
            str(folder / "s.db"),
            "--from",
            "2024-04-01",
            "--to",
            "2024-05-01",
            "--every",
            "7d",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nothing was written to the store" in result.output
    after = digest(folder)
    assert after["s.db"] == before["s.db"]  # the store file, byte for byte
    # Reading a WAL-mode database (even read-only) makes SQLite create its shared-memory
    # index; a write-ahead log, if one appears, stays empty: nothing was written.
    assert set(after) <= {"s.db", "s.db-wal", "s.db-shm"}
    if "s.db-wal" in after:
        assert (folder / "s.db-wal").stat().st_size == 0


def test_a_dry_run_equals_a_real_run_on_a_copy(demo: Path, tmp_path: Path) -> None:
    moment = DEMO_END - 30 * DAY
    report, rows = dry_run_queue(demo, [moment])
    shutil.copy(demo, tmp_path / "copy.db")
    with open_store(tmp_path / "copy.db") as store:
        results = run_playbooks(store, SETTINGS, books(), as_of=moment)
        assert rows == queue_rows(store)
    assert report.simulation.queued == sum(r.queued for r in results) > 0
    real = {
        (r.playbook, x.rule_id): (x.matched, x.queued, x.suppressed)
        for r in results
        for x in r.rules
    }
    simulated = {
        (r.playbook, r.rule): (r.matched, r.queued, r.suppressed) for r in report.simulation.rules
    }
    assert simulated == real


def test_caps_read_their_window_from_an_index(demo: Path) -> None:
    """A frequency cap counts a customer's actions in a window: in the simulation's copy
    (whose queue grows step after step) as in the live store, an index range, not the
    customer's whole history."""
    from engine.decide import LIVE_STATUSES, MESSAGE_KINDS

    plans: list[str] = []

    def check(store: Store, sim: Simulation) -> None:
        rows = store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM main.actions p WHERE "
            f"p.customer_id = ? AND p.status IN {LIVE_STATUSES} AND p.type IN {MESSAGE_KINDS} "
            "AND p.channel = ? AND p.scheduled_at > ? AND p.scheduled_at <= ?",
            ("c", "wecom", 0, 1),
        ).fetchall()
        plans.extend(row[-1] for row in rows)

    dry_run(demo, SETTINGS, books(), [DEMO_END - 30 * DAY], inspect=check)
    assert any("actions_customer_scheduled" in p and "scheduled_at>?" in p for p in plans), plans


def test_steps_equal_live_runs_step_by_step(demo: Path, tmp_path: Path) -> None:
    """The simulation is what running the playbooks live at every step would have done."""
    steps = steps_between(DEMO_END - 60 * DAY, DEMO_END - 15 * DAY, 7 * DAY)
    _, rows = dry_run_queue(demo, steps)
    shutil.copy(demo, tmp_path / "live.db")
    with open_store(tmp_path / "live.db") as store:
        for moment in steps:
            run_playbooks(store, SETTINGS, books(), as_of=moment)
        assert rows == queue_rows(store)


def test_state_carries_across_steps(store: Store, tmp_path: Path) -> None:
    """Cooldowns, caps and entry episodes of later steps see earlier simulated actions."""
    book = playbook(
        tmp_path,
        """
templates:
  hi: "hi {{ customer.name }}"
caps:
  - {max: 1, window: calendar_month}
rules:
  - id: every-order
    on: order.created
    cooldown: 20d
    then:
      - send: {channel: wecom, template: hi}
  - id: spender
    when: total_spend > 100
    then:
      - task: {assign_to: owner, note: call}
""",
    )
    add_customer(store, "1")
    for week in range(8):  # an order every week; steps are weekly too
        add_order(store, "1", T0 - 60 * DAY + week * 7 * DAY + 3600, 80)
    store.close()
    steps = steps_between(T0 - 60 * DAY + DAY, T0, 7 * DAY)
    seen: dict[str, Any] = {}
    report = dry_run(
        store.path,
        SETTINGS,
        [book],
        steps,
        inspect=lambda s, _: seen.update(
            rows=s.conn.execute(
                "SELECT r.as_of, a.rule_id, a.status, a.reason FROM actions a JOIN runs r "
                "USING (run_id) ORDER BY r.as_of, a.rule_id"
            ).fetchall()
        ),
    )
    rows = seen["rows"]
    sends = [(t, status, reason) for t, rule, status, reason in rows if rule == "every-order"]
    assert len(steps) == 9 and len(sends) == 8  # each order once, in the step after it
    outcomes = [(status, reason) for _, status, reason in sends]
    # First fires; the next two fall in the 20-day cooldown; then the monthly cap or
    # the cooldown stops every later one in the same month.
    assert outcomes[0] == ("pending", None)
    assert outcomes[1:3] == [("suppressed", "cooldown")] * 2
    pending = [t for t, status, _ in sends if status == "pending"]
    for a, b in itertools.pairwise(pending):
        assert b - a >= 20 * DAY
    assert any(reason == "cap" for _, _, reason in sends)
    spender = [(t, status) for t, rule, status, _ in rows if rule == "spender"]
    assert len(spender) == 1  # entered once (when spend passed 100), never again
    rule = {r.rule: r for r in report.simulation.rules}["every-order"]
    assert rule.queued == len(pending) and rule.suppressed.get("cooldown", 0) >= 2


_late = st.tuples(
    st.integers(min_value=0, max_value=40),  # customer
    st.integers(min_value=0, max_value=30 * DAY),  # seconds after the cut
    st.integers(min_value=1, max_value=900_00),  # cents
    st.sampled_from(["orders", "group.joined", "friend.deleted", "refunds"]),
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(late=st.lists(_late, min_size=1, max_size=15), cut=st.integers(0, 3))
def test_no_leakage_from_after_a_step(
    demo: Path, tmp_path_factory: pytest.TempPathFactory, late: list[Any], cut: int
) -> None:
    """Facts dated after step k never change what steps 1..k decided."""
    steps = steps_between(DEMO_END - 40 * DAY, DEMO_END - 12 * DAY, 7 * DAY)
    moment = steps[cut]
    folder = tmp_path_factory.mktemp("leak")
    shutil.copy(demo, folder / "s.db")

    def decided(path: Path) -> list[tuple[Any, ...]]:
        seen: dict[str, Any] = {}
        dry_run(
            path,
            SETTINGS,
            books(),
            steps,
            inspect=lambda s, _: seen.update(
                rows=queue_rows(s, "WHERE decided_at <= ?", (moment,))
            ),
        )
        return list(seen["rows"])

    before = decided(folder / "s.db")
    with open_store(folder / "s.db") as store, store.transaction() as conn:
        ids = [r[0] for r in conn.execute("SELECT customer_id FROM customers ORDER BY 1")]
        for i, (who, delta, cents, kind) in enumerate(late):
            customer, ts = ids[who % len(ids)], moment + delta
            add_fact(conn, f"late{i}", customer, kind, ts, cents)
    assert decided(folder / "s.db") == before


def test_against_identical_playbooks_shows_no_difference(demo: Path) -> None:
    steps = steps_between(DEMO_END - 50 * DAY, DEMO_END - 15 * DAY, 7 * DAY)
    report = dry_run(demo, SETTINGS, books(), steps, against=books())
    data = report.to_dict()
    assert data["comparison"]
    assert {row["status"] for row in data["comparison"]} == {"same"}
    for row in data["comparison"]:
        for name in ("matched", "queued", "customers", "coupon_cost", "suppressed"):
            assert row[name]["change"] == 0
    assert data["simulation"] == data["against"]


def test_against_an_edited_playbook_shows_the_impact(demo: Path, tmp_path: Path) -> None:
    text = Path("playbooks/lifecycle.yaml").read_text("utf-8")
    assert "total_spend > 500" in text
    edited = tmp_path / "lifecycle.yaml"
    edited.write_text(text.replace("total_spend > 500", "total_spend > 5000"), "utf-8")
    steps = steps_between(DEMO_END - 50 * DAY, DEMO_END - 15 * DAY, 7 * DAY)
    report = dry_run(
        demo,
        SETTINGS,
        [load_playbook(edited, SETTINGS)],
        steps,
        against=[load_playbook("playbooks/lifecycle.yaml", SETTINGS)],
    )
    rows = {row["rule"]: row for row in report.to_dict()["comparison"]}
    changed = rows["lifecycle/sleeping-big-promo"]
    assert changed["status"] == "changed"
    assert changed["matched"]["change"] < 0 and changed["coupon_cost"]["change"] < 0


OUTCOME_BOOK = """
holdout: 30%
templates:
  hi: "hi"
rules:
  - id: buyers
    when: order_count >= 1
    then:
      - send: {channel: wecom, template: hi}
"""


def test_outcomes_on_a_hand_built_history(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, OUTCOME_BOOK, name="o")
    moment = T0 - 30 * DAY
    customers = [f"c{i:03d}" for i in range(400)]
    held = {c for c in customers if bucket("o", c) < 0.3}
    bought = {c for i, c in enumerate(customers) if i % 3 == 0 or (c in held and i % 2 == 0)}
    for i, c in enumerate(customers):
        add_customer(store, c)
        add_order(store, c, moment - 10 * DAY, 50)
        if c in bought:  # 5 days after the step: inside the 14-day window
            add_order(store, c, moment + 5 * DAY, 10 + i % 7)
        if i % 4 == 0:  # 20 days after: outside it
            add_order(store, c, moment + 20 * DAY, 999)
    store.close()
    report = dry_run(store.path, SETTINGS, [book], [moment])
    outcome = report.simulation.rules[0].outcome
    assert outcome is not None
    targeted = [c for c in customers if c not in held]
    control = sorted(held)
    revenue = {c: (10 + customers.index(c) % 7) if c in bought else 0 for c in customers}
    assert outcome.comparison == "holdout"
    assert (outcome.targeted, outcome.control) == (len(targeted), len(control))
    assert outcome.targeted_buyers == len(bought - held)
    assert outcome.control_buyers == len(bought & held)
    assert outcome.targeted_revenue == sum(revenue[c] for c in targeted)
    assert outcome.control_revenue == sum(revenue[c] for c in control)
    p1, p2 = len(bought - held) / len(targeted), len(bought & held) / len(control)
    assert outcome.rate_difference == pytest.approx(p1 - p2)
    half = 1.959964 * math.sqrt(p1 * (1 - p1) / len(targeted) + p2 * (1 - p2) / len(control))
    assert outcome.rate_ci == pytest.approx((p1 - p2 - half, p1 - p2 + half))
    assert outcome.rate_ci[1] < 0  # held-out customers bought more here, by construction
    assert outcome.verdict.startswith("targeted customers ordered less")


def test_small_samples_are_called_too_small(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, OUTCOME_BOOK, name="o")
    moment = T0 - 30 * DAY
    for i in range(12):
        add_customer(store, f"s{i}")
        add_order(store, f"s{i}", moment - DAY, 50)
    add_order(store, "s0", moment + 40 * DAY, 50)  # the history goes on past the window
    store.close()
    outcome = dry_run(store.path, SETTINGS, [book], [moment]).simulation.rules[0].outcome
    assert outcome is not None
    assert outcome.verdict.startswith("too few customers to tell")
    assert outcome.rate_difference is not None  # shown, but not judged


def test_windows_past_the_history_are_left_out(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, OUTCOME_BOOK, name="o")
    for i in range(50):
        add_customer(store, f"w{i}")
        add_order(store, f"w{i}", T0 - 3 * DAY, 50)
    store.close()
    outcome = dry_run(store.path, SETTINGS, [book], [T0]).simulation.rules[0].outcome
    assert outcome is not None
    assert outcome.incomplete_window == 50 and outcome.targeted == outcome.control == 0


def test_json_output_has_stable_documented_keys(demo: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "dry-run",
            "playbooks/lifecycle.yaml",
            "--db",
            str(demo),
            "--as-of",
            "2024-05-01",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == [
        "steps",
        "window_days",
        "engine",
        "timezone",
        "simulation",
        "against",
        "comparison",
    ]
    sim = data["simulation"]
    assert list(sim) == ["playbooks", "queued", "steps", "rules", "suppression", "mix", "notes"]
    assert list(sim["rules"][0]) == [
        "rule",
        "playbook",
        "id",
        "kind",
        "matched",
        "queued",
        "suppressed",
        "customers",
        "coupon_cost",
        "outcome",
    ]
    docs = Path("docs/dry-run.md").read_text("utf-8")
    for key in [*data, *sim, *sim["rules"][0], *sim["rules"][0]["outcome"]]:
        assert f"`{key}`" in docs, key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--as-of", "2024-05-01", "--every", "7d"], "not both"),
        (["--from", "2024-05-01", "--every", "7d"], "go together"),
        ([], "say when"),
        (["--from", "2024-05-01", "--to", "2024-04-01", "--every", "7d"], "before --from"),
        (["--from", "2024-05-01", "--to", "2024-06-01", "--every", "soon"], "not a duration"),
        (["--as-of", "2024-05-01", "--window", "0d"], "--window"),
        (["--as-of", "yesterday-ish"], "yesterday-ish"),
    ],
)
def test_usage_errors(demo: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["dry-run", "playbooks", "--db", str(demo), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_missing_or_foreign_store_is_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        cli, ["dry-run", "playbooks", "--db", str(tmp_path / "no.db"), "--as-of", "2024-05-01"]
    )
    assert missing.exit_code == 1 and "no such store" in missing.output
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    junk = runner.invoke(
        cli, ["dry-run", "playbooks", "--db", str(tmp_path / "junk.db"), "--as-of", "2024-05-01"]
    )
    assert junk.exit_code == 1 and "not a playbook store" in junk.output
    assert "scratch" not in junk.output


def test_a_playbook_with_newer_live_state_starts_fresh(demo: Path, tmp_path: Path) -> None:
    shutil.copy(demo, tmp_path / "live.db")
    with open_store(tmp_path / "live.db") as store:
        run_playbooks(store, SETTINGS, books(), as_of=DEMO_END)  # live, "today"
    earlier = DEMO_END - 30 * DAY
    report = dry_run(tmp_path / "live.db", SETTINGS, books(), [earlier])
    fresh = dry_run(demo, SETTINGS, books(), [earlier])
    assert any("simulated as if switched on then" in n for n in report.simulation.notes)
    assert any("set aside" in n for n in report.simulation.notes)
    assert any("were undone" in n for n in report.simulation.notes)
    assert report.simulation.queued == fresh.simulation.queued


def test_report_dataclass_round_trip(demo: Path) -> None:
    report = dry_run(demo, SETTINGS, books()[:1], [DEMO_END - 20 * DAY])
    assert isinstance(report, DryRun)
    text = json.dumps(report.to_dict(), ensure_ascii=False)
    assert json.loads(text)["simulation"]["playbooks"][0]["name"] == books()[0].name


def test_relative_moments(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime

    from engine.clock import parse_as_of
    from engine.errors import UsageError

    today = parse_as_of(datetime.now(SHANGHAI).date().isoformat(), SHANGHAI)
    assert parse_as_of("today", SHANGHAI) == today
    assert parse_as_of("today-14d", SHANGHAI) == today - 14 * DAY
    assert parse_as_of("today - 2w", SHANGHAI) == today - 14 * DAY
    assert parse_as_of("today+34h", SHANGHAI) == today + 34 * 3600
    with pytest.raises(UsageError, match=r"^--from: not a duration"):
        parse_as_of("today-soon", SHANGHAI, "--from")


def test_a_progress_bar_on_a_terminal_only(demo: Path) -> None:
    import os
    import subprocess
    import sys

    args = [
        "dry-run",
        "playbooks/rfm.yaml",
        "--db",
        str(demo),
        "--from",
        "2024-04-01",
        "--to",
        "2024-04-15",
        "--every",
        "7d",
    ]
    command = [sys.executable, "-c", "from engine.cli import main; main()", *args]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""  # nothing in a pipe or a log
    leader, follower = os.openpty()  # stderr on a real terminal
    try:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=120
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    assert b"dry-run steps" in shown and b"3/3" in shown


def test_every_engine_simulates_the_same(demo: Path) -> None:
    steps = steps_between(DEMO_END - 40 * DAY, DEMO_END - 15 * DAY, 7 * DAY)
    found = {}
    for engine in ("sql", "auto", "rules"):
        report, rows = dry_run_queue(demo, steps, engine=engine)
        data = report.to_dict()
        data.pop("engine")
        found[engine] = (data, rows)
    assert found["sql"] == found["auto"] == found["rules"]
    assert found["sql"][0]["simulation"]["queued"] > 0


def test_two_playbooks_of_one_name_are_refused(demo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.yaml"
    copy.write_text(Path("playbooks/rfm.yaml").read_text("utf-8"), "utf-8")
    for command in (["dry-run", "--as-of", "2024-05-01"], ["run"]):
        result = CliRunner().invoke(
            cli, [*command, "playbooks/rfm.yaml", str(copy), "--db", str(demo)]
        )
        assert result.exit_code == 2, result.output
        assert "are both playbook 'rfm'" in result.output


def test_the_simulated_actions_as_csv(demo: Path, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "actions.csv"
    args = [
        "dry-run",
        "playbooks/lifecycle.yaml",
        "--db",
        str(demo),
        "--from",
        "2024-04-01",
        "--to",
        "2024-04-22",
        "--every",
        "7d",
        "--actions",
        str(out),
        "--format",
        "json",
    ]
    result = CliRunner().invoke(cli, [*args, "--against", "playbooks/lifecycle.yaml"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    with out.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    sim = data["simulation"]
    assert len(rows) == sim["queued"] + sum(sim["suppression"].values())  # one simulation
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert {r["step"] for r in rows} <= set(data["steps"])
    pending = [r for r in rows if r["status"] == "pending"]
    assert len(pending) == sim["queued"]
    assert all(r["reason"] for r in rows if r["status"] == "suppressed")
    assert any(r["message"] for r in pending)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupted_dry_run_leaves_nothing_behind(
    demo: Path, tmp_path: Path, signum: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    store = tmp_path / "s.db"
    shutil.copy(demo, store)
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    command = [
        sys.executable,
        "-c",
        "from engine.cli import main; main()",
        "dry-run",
        "playbooks",
        "--db",
        str(store),
        "--from",
        "2023-06-01",
        "--to",
        "2024-05-01",
        "--every",
        "1d",
    ]
    proc = subprocess.Popen(
        command,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(scratch.iterdir()), "the dry run never made its scratch copy"
    time.sleep(0.5)  # well into the steps
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert list(scratch.iterdir()) == []  # the scratch copy is gone
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


# -- building a step ahead on a second core (engine.lookahead) -------------------------------

AHEAD_STEPS = steps_between(DEMO_END - 70 * DAY, DEMO_END - 15 * DAY, 7 * DAY)


def simulate_with(
    demo: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool, **options: Any
) -> tuple[dict[str, Any], list[tuple[Any, ...]], Any]:
    """A simulation of the example playbooks built a step ahead or in place: its report,
    its queue, and what the lookahead handed over (event facts, matches taken)."""
    import engine.dryrun as dryrun_module
    import engine.lookahead as lookahead_module

    monkeypatch.setattr(dryrun_module, "worth_looking_ahead", lambda store, steps: ahead)
    taken = {"events": 0, "matches": 0, "steps": 0}
    take_events = lookahead_module.StepPrepared.take
    take_matches = lookahead_module.StepPrepared.matches
    take_step = lookahead_module.Lookahead.take

    def events(self: Any, conn: Any, key: Any, table: str) -> str | None:
        found = take_events(self, conn, key, table)
        taken["events"] += found is not None
        return found

    def matches(self: Any, where: str, values: Any) -> str | None:
        found = take_matches(self, where, values)
        taken["matches"] += found is not None
        return found

    def step(self: Any, k: int) -> Any:
        taken["steps"] += 1
        return take_step(self, k)

    monkeypatch.setattr(lookahead_module.StepPrepared, "take", events)
    monkeypatch.setattr(lookahead_module.StepPrepared, "matches", matches)
    monkeypatch.setattr(lookahead_module.Lookahead, "take", step)
    report, rows = dry_run_queue(demo, AHEAD_STEPS, **options)
    monkeypatch.undo()
    return report.to_dict(), rows, taken


def build_next_step_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the lookahead build step k+1 before step k's run (as it may when the run is
    slow): step k+1's features then lack the tags that run writes."""
    import engine.lookahead as lookahead_module

    take = lookahead_module.Lookahead.take

    def take_when_next_is_built(self: Any, k: int) -> Any:
        with self.changed:
            while k + 1 < len(self.steps) and k + 1 not in self.built and self.error is None:
                self.changed.wait()
        return take(self, k)

    monkeypatch.setattr(lookahead_module.Lookahead, "take", take_when_next_is_built)


@pytest.mark.parametrize("incremental", [True, False])
def test_building_a_step_ahead_changes_nothing(
    demo: Path, monkeypatch: pytest.MonkeyPatch, incremental: bool
) -> None:
    """Features, event facts and state rules' matches built on a second core while the
    previous step runs give exactly the simulation built step by step in place — also
    when the next step was built before the previous run retagged customers."""
    in_place, rows, _ = simulate_with(demo, monkeypatch, False, incremental=incremental)
    build_next_step_first(monkeypatch)
    ahead, ahead_rows, taken = simulate_with(demo, monkeypatch, True, incremental=incremental)
    assert taken["steps"] == len(AHEAD_STEPS)
    assert taken["events"] > 0 and taken["matches"] > 0
    assert ahead == in_place
    assert ahead_rows == rows
    assert in_place["simulation"]["queued"] > 0


def test_a_step_built_ahead_gets_the_tags_of_the_run_before(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above would see a lookahead that forgot to mend the tags: without it the
    tags written at one step are missing at the next (customers leave and re-enter rules
    on tags, and are acted on again)."""
    import engine.lookahead as lookahead_module

    _, rows, _ = simulate_with(demo, monkeypatch, False)
    build_next_step_first(monkeypatch)
    monkeypatch.setattr(lookahead_module.Lookahead, "_retag", lambda self, table: None)
    _, broken_rows, _ = simulate_with(demo, monkeypatch, True)
    assert broken_rows != rows


@pytest.mark.parametrize("forget", ["previous step", "this run"])
def test_a_rule_on_tags_judges_again_whom_it_was_matched_ahead_for(
    demo: Path, monkeypatch: pytest.MonkeyPatch, forget: str
) -> None:
    """Matches made ahead read the tags of the step before: a rule that reads tags would
    act on stale tags without judging again the customers retagged since (by the previous
    step, or earlier in the same step), so the tests above would see it."""
    import engine.lookahead as lookahead_module
    import engine.run as run_module

    _, rows, taken = simulate_with(demo, monkeypatch, True)
    assert taken["matches"] > 0
    build_next_step_first(monkeypatch)
    if forget == "previous step":
        monkeypatch.setattr(lookahead_module.StepPrepared, "stale", lambda self: None)
    else:
        monkeypatch.setattr(run_module.RunFacts, "retagged", lambda self: None)
    _, broken_rows, _ = simulate_with(demo, monkeypatch, True)
    assert broken_rows != rows


def test_a_failure_on_the_second_core_fails_the_dry_run_and_clears_up(
    demo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tempfile
    import threading

    import engine.dryrun as dryrun_module
    import engine.lookahead as lookahead_module

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(dryrun_module, "worth_looking_ahead", lambda store, steps: True)
    for target, name in (
        (lookahead_module, "build_event_facts"),  # while building a step
        (dryrun_module._Outcomes, "add_step"),  # in a job after a step
    ):
        with monkeypatch.context() as patch:

            def broken(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("disk on fire")

            patch.setattr(target, name, broken)
            with pytest.raises(RuntimeError, match="disk on fire"):
                dry_run(demo, SETTINGS, books(), AHEAD_STEPS)
        assert list(tmp_path.iterdir()) == []  # scratch copy and step files gone
        assert not [t for t in threading.enumerate() if t.name == "lookahead"]


def test_while_it_waits_for_a_step_the_simulation_runs_the_jobs_itself(
    demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs given to the lookahead (outcomes, totals) run once each: while the builder is
    busy with a step, the simulation waiting for it runs them on its own connection."""
    import threading

    import engine.lookahead as lookahead_module
    from engine.dryrun import scratch_copy

    jobs_done = threading.Event()
    build = lookahead_module.Lookahead._build

    def slow_build(self: Any, *args: Any) -> Any:
        assert jobs_done.wait(timeout=60), "the jobs were left waiting"
        return build(self, *args)

    monkeypatch.setattr(lookahead_module.Lookahead, "_build", slow_build)
    ran: list[tuple[int, bool]] = []
    with scratch_copy(demo, concurrent=True) as store:
        ahead = lookahead_module.Lookahead(
            store, SETTINGS, AHEAD_STEPS[:2], lambda k: [], lambda k: [], None
        )
        try:

            def job(i: int) -> Any:
                def run(conn: sqlite3.Connection) -> None:
                    conn.execute("SELECT count(*) FROM actions").fetchone()
                    ran.append((i, conn is store.conn))
                    if len(ran) == 3:
                        jobs_done.set()

                return run

            for i in range(3):
                ahead.after(job(i))
            features, _ = ahead.take(0)  # waits for the builder: runs the jobs meanwhile
            assert features.rows > 0
            ahead.finished(0, [])
            ahead.after(job(3))
            ahead.drain()
        finally:
            ahead.close()
    assert sorted(i for i, _ in ran) == [0, 1, 2, 3]
    assert all(on_simulation for i, on_simulation in ran if i < 3)


def test_when_looking_ahead_pays(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.lookahead as lookahead_module
    from engine.dryrun import scratch_copy

    monkeypatch.setattr(lookahead_module.os, "cpu_count", lambda: 2)
    with scratch_copy(demo, concurrent=True) as store:
        assert lookahead_module.worth_looking_ahead(store, 2)
        assert not lookahead_module.worth_looking_ahead(store, 1)  # nothing to build ahead
        monkeypatch.setattr(lookahead_module.os, "cpu_count", lambda: 1)
        assert not lookahead_module.worth_looking_ahead(store, 2)  # no second core
    monkeypatch.setattr(lookahead_module.os, "cpu_count", lambda: 2)
    with scratch_copy(demo) as store:  # a rollback journal: reader and writer could wait
        assert not lookahead_module.worth_looking_ahead(store, 2)


@pytest.mark.parametrize("ahead", [True, False])
def test_rule_totals_count_the_simulated_queue(
    demo: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    """Unique customers and coupon cost per rule, added step by step (on the second core
    or not), are what the simulated queue holds."""
    import engine.dryrun as dryrun_module

    monkeypatch.setattr(dryrun_module, "worth_looking_ahead", lambda store, steps: ahead)
    found: dict[str, Any] = {}

    def count(store: Store, _: Simulation) -> None:
        found["customers"] = {
            f"{p}/{r}": n
            for p, r, n in store.conn.execute(
                "SELECT playbook, rule_id, count(DISTINCT customer_id) FROM actions "
                "WHERE status != 'suppressed' GROUP BY 1, 2"
            )
        }
        found["coupons"] = store.conn.execute(
            "SELECT playbook, rule_id, coupon, count(*) FROM actions WHERE status != "
            "'suppressed' AND coupon IS NOT NULL GROUP BY 1, 2, 3"
        ).fetchall()

    playbooks = books()
    report = dry_run(demo, SETTINGS, playbooks, AHEAD_STEPS, inspect=count)
    values = {(p.name, c): coupon.value for p in playbooks for c, coupon in p.coupons.items()}
    cost: dict[str, float] = {}
    for p, r, c, n in found["coupons"]:
        cost[f"{p}/{r}"] = cost.get(f"{p}/{r}", 0) + round(n * values[(p, c)], 2)
    rules = report.simulation.rules
    assert {r.key: r.customers for r in rules if r.customers} == found["customers"]
    assert {r.key: r.coupon_cost for r in rules if r.coupon_cost} == pytest.approx(cost)
    assert sum(found["customers"].values()) > 0 and cost


def test_a_scratch_queue_has_the_columns_and_only_the_indexes_a_simulation_reads(
    demo: Path,
) -> None:
    """A simulation's queue drops the store's index on the (hashed) action id, which each
    step would rewrite all over, and the export indexes; its columns and constraints stay."""
    from engine.dryrun import SCRATCH_QUEUE_INDEXES, scratch_copy

    def columns(conn: Any) -> list[tuple[Any, ...]]:
        return [
            (name, kind, bool(notnull) or name == "action_id", default)
            for _, name, kind, notnull, default, _ in conn.execute("PRAGMA table_info(actions)")
        ]

    with open_store(demo, readonly=True) as original:
        expected = columns(original.conn)
        assert original.conn.execute("PRAGMA index_list(actions)").fetchall()
    with scratch_copy(demo) as store:
        assert columns(store.conn) == expected
        indexes = store.conn.execute("PRAGMA index_list(actions)").fetchall()
        assert sorted(name for _, name, *_ in indexes) == sorted(
            sql.split()[2] for sql in SCRATCH_QUEUE_INDEXES
        )
        assert not [i for i in indexes if i[2]]  # nothing unique
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            store.conn.execute("INSERT INTO actions (action_id) VALUES ('x')")


def forget_runs(store: Store) -> None:
    """Lose the record of which customers matched and which events were read, as if the
    runs had never happened (their actions stay queued)."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM rule_state")
        conn.execute("DELETE FROM event_cursor")


def test_a_scratch_queue_never_queues_a_decision_twice(demo: Path, tmp_path: Path) -> None:
    """Without the unique index, a run still never queues a decision already in the queue
    (its filter says which may be there, the customer's actions say which are): the same
    run repeated with its state lost queues nothing, on a scratch queue as on the store's."""
    from engine.dryrun import scratch_copy

    moment = DEMO_END - 30 * DAY
    shutil.copy(demo, tmp_path / "copy.db")
    with scratch_copy(demo) as scratch, open_store(tmp_path / "copy.db") as real:
        assert scratch.queue_filter is not None and real.queue_filter is None
        for store in (scratch, real):
            first = run_playbooks(store, SETTINGS, books(), as_of=moment)
            assert sum(r.queued for r in first) > 0
            forget_runs(store)
            again = run_playbooks(store, SETTINGS, books(), as_of=moment)
            assert sum(r.queued + r.suppressed for r in again) == 0
            assert sum(x.matched for r in again for x in r.rules) > 0
        assert queue_rows(scratch) == queue_rows(real)
        (total, ids) = scratch.conn.execute(
            "SELECT count(*), count(DISTINCT action_id) FROM actions"
        ).fetchone()
        assert total == ids > 0
    # A copy of a store whose queue already holds these decisions: its filter knows the
    # customers they are for.
    with scratch_copy(tmp_path / "copy.db") as scratch:
        assert scratch.queue_filter is not None and scratch.queue_filter.customers
        forget_runs(scratch)
        again = run_playbooks(scratch, SETTINGS, books(), as_of=moment)
        assert sum(r.queued + r.suppressed for r in again) == 0


def test_a_queue_filter_has_no_false_negatives(tmp_path: Path) -> None:
    """Every id added, and every id of a customer who had actions, is "maybe queued"."""
    from engine.decide import DECISIONS, QueueFilter, action_id

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE actions (customer_id TEXT, action_id TEXT)")
    conn.execute("INSERT INTO actions VALUES ('C1', ?)", (action_id("p", "r", "C1", "t", 0),))
    seen = QueueFilter(conn)
    ids = [action_id("p", "r", f"C{i}", "entry:1", 0) for i in range(2, 500)]
    conn.execute(f"CREATE TEMP TABLE {DECISIONS} (action_id TEXT)")
    conn.executemany(f"INSERT INTO temp.{DECISIONS} VALUES (?)", [(i,) for i in ids[:250]])
    seen.add(conn)
    assert seen.maybe_queued("C1", action_id("p", "r", "C1", "entry:9", 0))
    assert all(seen.maybe_queued("C0", i) for i in ids[:250])
    assert not any(seen.maybe_queued("C0", i) for i in ids[250:])
    (found,) = conn.execute(
        f"SELECT count(*) FROM temp.{DECISIONS} WHERE {QueueFilter.FUNCTION}('C0', action_id)"
    ).fetchone()
    assert found == 250
