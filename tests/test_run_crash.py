"""`playbook run` under SIGKILL and under concurrent writers.

A demo store (2,000 customers) is run through all six example playbooks once, untouched,
to get the reference queue. Then:

* crash: the same run is started on fresh copies of the store as a real `playbook run`
  process and SIGKILLed at seeded random moments spread over the run (early, middle and
  late); what is left must be all the playbooks or none (the run is one transaction),
  and re-running to completion must give exactly the reference queue (every
  column but run_id), event cursors, customer tags and rule state. (A playbook that had
  committed before the kill is evaluated twice at the same as-of; its rule state is then
  a second run's: see test_rerun_at_same_as_of_adds_nothing.)
* concurrency: a second writer is refused with the store's message (exit code 1) when it
  cannot get the write lock within its busy timeout, waits when it can, and two runs at
  once never interleave inside a playbook.
* idempotence: running again at the same as-of adds nothing.

Each test runs with engine="sql" and with engine="rules" (durable-rules, skipped if
engine.match.durable does not import); both engines must also queue the same actions.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.clock import get_timezone, parse_as_of
from engine.demo import generate_demo
from engine.playbook import Playbook, load_playbook
from engine.run import RunResult, run_playbooks
from engine.settings import Settings
from engine.store import open_store

REPO = Path(__file__).resolve().parents[1]
PLAYBOOK_FILES = sorted((REPO / "playbooks").glob("*.yaml"))
TZ = get_timezone("Asia/Shanghai")
AS_OF_TEXT = "2025-06-01T00:00:00+08:00"  # inside every playbook's quiet hours
AS_OF = parse_as_of(AS_OF_TEXT, TZ)
CUSTOMERS = 2_000
DEMO_SEED = 11
ENGINES = ("sql", "rules")
TRIALS = 20  # per engine
KILL_SEED = 20250601
POLL_SECONDS = 0.005
# What the store says when a second writer gives up waiting (engine/store.py).
REFUSAL = "is another playbook command writing to it?"

# `playbook ...` in a fresh interpreter. With PB_TEST_BUSY_MS set, the store's busy timeout
# (10 s) is shortened after opening, so a refused write is quick to provoke.
CLI_CODE = """
import os, sys
import engine.cli as cli
busy = os.environ.get("PB_TEST_BUSY_MS")
if busy:
    opener = cli.open_store
    def open_store(*args, **kwargs):
        store = opener(*args, **kwargs)
        store.conn.execute(f"PRAGMA busy_timeout = {int(busy)}")
        return store
    cli.open_store = open_store
sys.argv[0] = "playbook"
cli.main()
"""

Row = tuple[Any, ...]


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Snapshot:
    """What a run leaves in a store: queue (less run_id), rule state, cursors, tags."""

    actions: dict[str, list[Row]]  # by playbook, sorted by action_id
    rule_state: dict[str, list[Row]]  # by playbook
    cursors: dict[str, int]
    tags: list[Row]  # (customer_id, tags) for customers with any tag
    runs: list[Row]  # (playbook, finished_at IS NOT NULL) of every committed run
    action_columns: tuple[str, ...]  # of the rows in `actions`

    def committed(self) -> list[str]:
        return [playbook for playbook, _finished in self.runs]


def snapshot(conn: sqlite3.Connection) -> Snapshot:
    columns = [row[1] for row in conn.execute("PRAGMA table_info(actions)") if row[1] != "run_id"]
    assert "playbook" in columns and "action_id" in columns
    select = ", ".join(f'"{c}"' for c in columns)
    actions: dict[str, list[Row]] = {}
    for row in conn.execute(f"SELECT {select} FROM actions ORDER BY action_id"):
        actions.setdefault(row[columns.index("playbook")], []).append(tuple(row))
    rule_state: dict[str, list[Row]] = {}
    for row in conn.execute(
        "SELECT playbook, rule_id, customer_id, matching, episode, changed_at FROM rule_state "
        "ORDER BY playbook, rule_id, customer_id"
    ):
        rule_state.setdefault(row[0], []).append(tuple(row))
    cursors = dict(conn.execute("SELECT playbook, until FROM event_cursor"))
    tags = conn.execute(
        "SELECT customer_id, tags FROM customers WHERE tags != '[]' ORDER BY customer_id"
    ).fetchall()
    runs = conn.execute(
        "SELECT playbook, finished_at IS NOT NULL FROM runs ORDER BY rowid"
    ).fetchall()
    return Snapshot(actions, rule_state, cursors, tags, runs, tuple(columns))


def read_snapshot(db: Path) -> Snapshot:
    conn = sqlite3.connect(db)
    try:
        return snapshot(conn)
    finally:
        conn.close()


def assert_runs_not_interleaved(conn: sqlite3.Connection) -> None:
    """Each run's actions are one contiguous block of rows, all of one playbook.

    Runs write their actions inside their own transaction and transactions are serialised,
    so another run's row can never fall between two of one run's rows.
    """
    for run_id, playbooks, first, last, n in conn.execute(
        "SELECT run_id, count(DISTINCT playbook), min(rowid), max(rowid), count(*) "
        "FROM actions GROUP BY run_id"
    ):
        assert playbooks == 1, f"run {run_id} wrote actions of {playbooks} playbooks"
        assert last - first + 1 == n, f"run {run_id}'s actions are interleaved with others"
    split = conn.execute(
        "SELECT playbook, count(DISTINCT run_id) FROM actions GROUP BY playbook "
        "HAVING count(DISTINCT run_id) > 1"
    ).fetchall()
    assert not split, f"a playbook's actions come from several runs: {split}"


def copy_store(source: Path, target: Path) -> Path:
    """A copy of a closed store (its WAL checkpointed away) under a fresh name."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    assert not Path(f"{source}-wal").exists() or Path(f"{source}-wal").stat().st_size == 0
    shutil.copyfile(source, target)
    return target


def cli_command(db: Path, engine: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        CLI_CODE,
        "run",
        *map(str, PLAYBOOK_FILES),
        "--db",
        str(db),
        "--as-of",
        AS_OF_TEXT,
        "--engine",
        engine,
        *extra,
    ]


def cli_env(busy_ms: int | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PLAYBOOK_DB", "PLAYBOOK_SETTINGS", "PB_TEST_BUSY_MS")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if busy_ms is not None:
        env["PB_TEST_BUSY_MS"] = str(busy_ms)
    return env


def start_cli(
    db: Path, engine: str, *extra: str, busy_ms: int | None = None
) -> subprocess.Popen[str]:
    # cwd is the store's folder: no ./playbook-settings.yaml of the repository is picked up.
    return subprocess.Popen(
        cli_command(db, engine, *extra),
        cwd=db.parent,
        env=cli_env(busy_ms),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_runs(poller: sqlite3.Connection) -> int:
    return int(poller.execute("SELECT count(*) FROM runs").fetchone()[0])


def wait_for_commits(
    db: Path, proc: subprocess.Popen[str], count: int, start: float
) -> list[float]:
    """Poll the store until `count` playbooks have committed (or the process ended).

    Returns when (seconds after `start`) each commit was first seen. The polling
    connection only reads (WAL readers never block the writer) and is closed on return.
    """
    seen: list[float] = []
    poller = sqlite3.connect(db, timeout=5)
    try:
        while len(seen) < count:
            now = committed_runs(poller)
            seen.extend([time.perf_counter() - start] * (now - len(seen)))
            if len(seen) >= count or proc.poll() is not None:
                break
            time.sleep(POLL_SECONDS)
    finally:
        poller.close()
    return seen


def load_playbooks() -> list[Playbook]:
    settings = Settings()
    return [load_playbook(path, settings) for path in PLAYBOOK_FILES]


def run_in_process(db: Path, engine: str) -> list[RunResult]:
    with open_store(db) as store:
        return run_playbooks(store, Settings(), load_playbooks(), as_of=AS_OF, engine=engine)


def require_engine(engine: str) -> None:
    if engine == "rules":
        try:
            importlib.import_module("engine.match.durable")
        except ImportError as exc:  # pragma: no cover - only while the matcher is missing
            pytest.skip(f"engine.match.durable does not import: {exc}")


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    engine: str
    pristine: Path  # the demo store, never run
    reference_db: Path  # after one uninterrupted `playbook run`
    reference: Snapshot
    rerun_state: dict[str, list[Row]]  # rule_state after a second run at the same as-of
    order: list[str]  # playbook names in run order
    duration: float  # seconds of an uninterrupted `playbook run` process
    # seconds after its start at which each playbook's runs row appeared (all at the
    # run's one commit)
    commit_times: list[float]


def calibrated_run(pristine: Path, target: Path, engine: str) -> tuple[float, list[float]]:
    """One uninterrupted `playbook run` on a copy, timed, with when each playbook commits."""
    copy_store(pristine, target)
    start = time.perf_counter()
    proc = start_cli(target, engine)
    commits = wait_for_commits(target, proc, len(PLAYBOOK_FILES), start)
    out, err = proc.communicate(timeout=120)
    duration = time.perf_counter() - start
    assert proc.returncode == 0, err
    assert len(commits) == len(PLAYBOOK_FILES), (commits, out, err)
    return duration, commits


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo store, closed (no WAL), never run: copied by every test."""
    path = tmp_path_factory.mktemp("run-crash") / "pristine.db"
    with open_store(path) as store:
        generate_demo(store, customers=CUSTOMERS, seed=DEMO_SEED, end=AS_OF, tz=TZ)
    return path


@pytest.fixture(scope="module", params=ENGINES)
def world(
    request: pytest.FixtureRequest, pristine: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    engine: str = request.param
    require_engine(engine)
    folder = tmp_path_factory.mktemp(f"world-{engine}")
    # Two uninterrupted runs: the reference, a determinism check, and the timings.
    first_duration, first_commits = calibrated_run(pristine, folder / "reference.db", engine)
    duration, commits = calibrated_run(pristine, folder / "reference2.db", engine)
    reference = read_snapshot(folder / "reference.db")
    assert read_snapshot(folder / "reference2.db") == reference, "two runs differ"
    assert sum(map(len, reference.actions.values())) > 1000
    order = reference.committed()
    assert sorted(reference.actions) == sorted(order) and len(order) == len(PLAYBOOK_FILES)
    # The state a second run at the same as-of leaves (see test_rerun_at_same_as_of).
    again = copy_store(folder / "reference2.db", folder / "again.db")
    run_in_process(again, engine)
    rerun_state = read_snapshot(again).rule_state
    yield World(
        engine=engine,
        pristine=pristine,
        reference_db=folder / "reference.db",
        reference=reference,
        rerun_state=rerun_state,
        order=order,
        duration=(first_duration + duration) / 2,
        # The shorter of the two: the first run also pays for cold caches.
        commit_times=[min(a, b) for a, b in zip(first_commits, commits, strict=True)],
    )


# --------------------------------------------------------------------------- crash


def kill_targets(duration: float, trials: int, rng: random.Random) -> list[float]:
    """One moment in each of `trials` equal slices of the run, in a shuffled order."""
    targets = [duration * (i + rng.random()) / trials for i in range(trials)]
    rng.shuffle(targets)
    return targets


@dataclass(frozen=True)
class Trial:
    target: float
    anchor: int  # commits awaited before the final sleep
    killed_at: float | None  # None: the process had already finished
    committed: int


def run_and_kill(world: World, db: Path, target: float) -> Trial:
    """Start `playbook run` on `db` and SIGKILL it `target` seconds into the run.

    The run's own commits anchor the moment: the target falls between the calibrated
    commits k and k+1, so wait until k commits are seen, then sleep for the rest. On a
    loaded machine the kill then still lands in the same stretch of the run.
    """
    anchor = sum(1 for t in world.commit_times if t <= target)
    start = time.perf_counter()
    proc = start_cli(db, world.engine)
    deadline = target  # seconds after start
    if anchor:
        seen = wait_for_commits(db, proc, anchor, start)
        if len(seen) == anchor:
            deadline = seen[-1] + target - world.commit_times[anchor - 1]
    time.sleep(max(0.0, deadline - (time.perf_counter() - start)))
    killed_at: float | None = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter() - start
    proc.communicate(timeout=60)
    if killed_at is not None:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0
    return Trial(target, anchor, killed_at, committed=-1)


def test_sigkill_then_rerun_gives_the_reference_queue(world: World, tmp_path: Path) -> None:
    rng = random.Random(KILL_SEED)
    reference, order = world.reference, world.order
    trials: list[Trial] = []
    # The run commits once, near its end: kill moments are spread over the run up to
    # shortly before that commit (after it the process only prints its report and exits).
    # One run takes up to ~20% less time than another: a kill that finds the process
    # already gone is aimed again, earlier, so that TRIALS kills land.
    span = world.commit_times[-1]
    targets = kill_targets(0.9 * span, TRIALS, rng)
    number = 0
    while targets and number < 2 * TRIALS:
        target = targets.pop()
        number += 1
        db = copy_store(world.pristine, tmp_path / f"trial{number}.db")
        trial = run_and_kill(world, db, target)
        with open_store(db) as store:  # the first open after the kill recovers the WAL
            after_kill = snapshot(store.conn)
            assert_runs_not_interleaved(store.conn)
            committed = after_kill.committed()
            where = f"trial {number} (kill at {trial.killed_at}, target {target:.2f}s)"
            # All the playbooks or none, each exactly as in the reference.
            assert committed in ([], order), where
            assert all(finished for _playbook, finished in after_kill.runs), where
            assert sorted(after_kill.actions) == sorted(committed), where
            for playbook in committed:
                assert after_kill.actions[playbook] == reference.actions[playbook], where
                assert after_kill.rule_state[playbook] == reference.rule_state[playbook], where
                assert after_kill.cursors[playbook] == reference.cursors[playbook], where
            assert set(after_kill.rule_state) <= set(committed), where
            assert set(after_kill.cursors) == set(committed), where
            if trial.killed_at is None:
                assert committed == order, where
                targets.append(0.8 * target)

            run_playbooks(store, Settings(), load_playbooks(), as_of=AS_OF, engine=world.engine)
            final = snapshot(store.conn)
            assert_runs_not_interleaved(store.conn)
        assert final.actions == reference.actions, where
        assert final.cursors == reference.cursors, where
        assert final.tags == reference.tags, where
        # A playbook that committed before the kill was evaluated a second time at the same
        # as-of by the re-run; its rule state is then that of a second run (it differs from
        # a single run's only by customers whose own tag action made them leave the rule:
        # see test_rerun_at_same_as_of). The others ran once, as in the reference.
        expected_state = {
            playbook: world.rerun_state[playbook]
            if playbook in committed
            else reference.rule_state[playbook]
            for playbook in reference.rule_state
        }
        assert final.rule_state == expected_state, where
        trials.append(Trial(trial.target, trial.anchor, trial.killed_at, committed=len(committed)))

    # The kills covered the run: early, in the middle and late, nearly all before the
    # run's one commit (a kill aimed just before it may land just after).
    outcomes = sorted(t.committed for t in trials)
    kills = sorted(t.killed_at for t in trials if t.killed_at is not None)
    summary = f"committed playbooks at the kill, per trial: {outcomes}; kills at {kills}"
    assert set(outcomes) <= {0, len(order)}, summary
    assert outcomes.count(0) >= TRIALS // 2, summary
    assert len(kills) == TRIALS, summary
    thirds = {min(int(3 * k / span), 2) for k in kills}
    assert thirds == {0, 1, 2}, summary


# --------------------------------------------------------------------------- concurrency


def test_second_writer_is_refused_then_waits(world: World, tmp_path: Path) -> None:
    db = copy_store(world.pristine, tmp_path / "locked.db")
    with open_store(db) as store:
        # Refused: the lock is held longer than the second writer's (shortened) busy timeout.
        with store.transaction():
            refused = start_cli(db, world.engine, busy_ms=300)
            out, err = refused.communicate(timeout=120)
        assert refused.returncode == 1, (out, err)
        assert REFUSAL in err and "cannot start a write" in err, err
        assert store.count("actions") == 0 and store.count("runs") == 0

        # Waits: the lock is released well within the default busy timeout (10 s).
        with store.transaction():
            waiting = start_cli(db, world.engine, "--format", "json")
            time.sleep(1.5)
            assert waiting.poll() is None, "wrote while another writer held the lock"
            released = int(time.time())
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        results = json.loads(out)
        assert [r["playbook"] for r in results] == world.order
        started = store.conn.execute("SELECT min(started_at) FROM runs").fetchone()[0]
        assert started >= released
        assert_runs_not_interleaved(store.conn)
        final = snapshot(store.conn)
    assert final.actions == world.reference.actions
    assert final.rule_state == world.reference.rule_state
    assert final.cursors == world.reference.cursors


def test_two_runs_at_once_never_interleave(world: World, tmp_path: Path) -> None:
    db = copy_store(world.pristine, tmp_path / "both.db")
    procs = [start_cli(db, world.engine, "--format", "json") for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    run_ids: list[set[str]] = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode == 0:
            run_ids.append({r["run_id"] for r in json.loads(out)})
        else:  # it may only have given up waiting, with the store's message
            assert proc.returncode == 1 and REFUSAL in err, err
    assert run_ids, "neither run succeeded"
    with open_store(db) as store:
        assert_runs_not_interleaved(store.conn)
        finished = {
            run_id
            for (run_id,) in store.conn.execute(
                "SELECT run_id FROM runs WHERE finished_at IS NOT NULL"
            )
        }
        assert store.count("runs") == len(finished)
        for ids in run_ids:
            assert ids <= finished
        # Each playbook's actions were written by one of the two runs, whole.
        writers = {run_id for (run_id,) in store.conn.execute("SELECT run_id FROM actions")}
        assert writers <= set().union(*run_ids)
        final = snapshot(store.conn)
    assert final.actions == world.reference.actions
    assert final.cursors == world.reference.cursors
    assert final.tags == world.reference.tags
    # The run that waited may have built its features before the other run's tag actions
    # were committed: it notices that commit and takes the tags up before deciding, so it
    # re-evaluates the playbooks exactly as a second run at the same as-of would.
    both = len(run_ids) == 2
    assert final.rule_state == (world.rerun_state if both else world.reference.rule_state)


# --------------------------------------------------------------------------- idempotence


def test_rerun_at_same_as_of_adds_nothing(world: World, tmp_path: Path) -> None:
    db = copy_store(world.reference_db, tmp_path / "again.db")
    with open_store(db) as store:
        before = store.conn.execute("SELECT * FROM actions ORDER BY action_id").fetchall()
        assert before
        results = run_playbooks(
            store, Settings(), load_playbooks(), as_of=AS_OF, engine=world.engine
        )
        after = store.conn.execute("SELECT * FROM actions ORDER BY action_id").fetchall()
        again = snapshot(store.conn)
    assert len(after) == len(before)
    assert after == before  # not even run_id changed: nothing was rewritten
    assert [r.queued for r in results] == [0] * len(results)
    assert [r.suppressed for r in results] == [0] * len(results)
    assert again.cursors == world.reference.cursors
    assert again.tags == world.reference.tags
    assert again.rule_state == world.rerun_state
    # The second evaluation at the same moment may only record customers leaving a rule
    # because of the tag that rule itself added on the first run (e.g. loyal-thank-you
    # adds "vip" and asks for "vip" not in tags): matching 1 -> 0, same episode.
    own_tags = set(_tag_actions(world.reference))
    for playbook, rows in world.reference.rule_state.items():
        second = {row[:3]: row for row in again.rule_state[playbook]}
        assert set(second) == {row[:3] for row in rows}
        for row in rows:
            now = second[row[:3]]
            if now != row:
                assert (row[3], now[3], now[4], now[5]) == (1, 0, row[4], AS_OF), now
                assert row[:3] in own_tags, now


def _tag_actions(snap: Snapshot) -> Iterator[tuple[str, str, str]]:
    """(playbook, rule_id, customer_id) of the pending tag actions of a snapshot."""
    for rows in snap.actions.values():
        for row in rows:
            record = dict(zip(snap.action_columns, row, strict=True))
            if record["type"] == "tag" and record["status"] == "pending":
                yield record["playbook"], record["rule_id"], record["customer_id"]


# --------------------------------------------------------------------------- engines


def test_both_engines_queue_the_same(pristine: Path, tmp_path: Path) -> None:
    require_engine("rules")
    states = {}
    for engine in ENGINES:
        db = copy_store(pristine, tmp_path / f"{engine}.db")
        run_in_process(db, engine)
        states[engine] = read_snapshot(db)
    sql, rules = states["sql"], states["rules"]
    assert rules.actions == sql.actions
    assert rules.rule_state == sql.rule_state
    assert rules.cursors == sql.cursors
    assert rules.tags == sql.tags
