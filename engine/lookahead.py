"""A simulation's inputs one step ahead, built on a second core.

A simulation (`engine.dryrun`) runs the playbooks at each of its steps on a scratch copy of
the store. What a step's run is judged on — every customer's features as of the step,
and per event type the facts of the events since the previous step — depends on the
store's history only, except for the customers' tags, which the runs themselves change.
So while the run of step k decides, `Lookahead` builds step k+1's inputs on a connection
of its own (read-only), in a thread of its own, into a scratch file: the features
(stepped, as `FeatureStepper` does; or from scratch), the event facts, and for each state
rule the customers matching its condition. Step k+1's run attaches the file and reads
them there.
Between steps the same thread runs jobs on the committed steps (`after`: a simulation's
outcomes and rule totals); so does the simulation's thread whenever it would otherwise
wait for the builder (late in a year of steps the builder is the slower of the two, and
the jobs would pile up until the end).

Tags: the builder reads the committed store, and it builds step k+1 only once the runs
up to step k-1 have committed (it is never more than one step ahead), so what it hands
over can lack only the tag changes of step k's run. `finished(k, ...)` takes the
customers those runs retagged, with their tags; `take(k+1)` copies those tags into the
features (and each event facts table as the run takes it); the run re-applies its own
tag changes as usual. A rule that reads tags judges again the customers for whom a tag it
tests for changed after its matches were made (`StepPrepared.stale`, and the run's own
retagged; `RunFacts.stale`).

The scratch copy must be in write-ahead-log mode, so that the builder's reads and the
runs' writes never wait for each other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.decide import scratch_table
from engine.event_facts import Key, Needs, attach_scratch, build_event_facts
from engine.features import (
    MAX_WORKERS,
    FeatureStepper,
    FeatureTable,
    RfmThresholds,
    build_features,
)
from engine.run import RunResult, StateCondition, TagWrite, copy_tags, merge_tag_writes
from engine.settings import Settings
from engine.store import Store, open_store

# The builder's page caches (KiB): it reads the orders indexes (main) and keeps the running
# totals and the step's features (temp).
LOOKAHEAD_CACHE_KIB = 64 * 1024
LOOKAHEAD_TEMP_CACHE_KIB = 64 * 1024
STEP_CACHE_KIB = 64 * 1024  # the simulation's cache for the step's file (its features)
ALIAS = "lookahead"
RETAGGED = "lookahead_retagged"
NARROW = "lookahead_narrow"  # the columns the state conditions read


def worth_looking_ahead(store: Store, steps: int) -> bool:
    """A second core, a store on disk in write-ahead-log mode, and a later step to build
    while a step runs."""
    if min(os.cpu_count() or 1, MAX_WORKERS) < 2 or store.path == ":memory:" or steps < 2:
        return False
    (mode,) = store.conn.execute("PRAGMA journal_mode").fetchone()
    return str(mode).lower() == "wal"


# A state rule's condition compiled to SQL over the features: (WHERE, values).
Condition = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True)
class _Built:
    """What the builder wrote for one step: the file, and how to read it."""

    path: Path
    rows: int
    rfm: RfmThresholds
    events: dict[Key, str]  # (event type, start) -> table in the file
    matches: dict[Condition, str]  # condition -> table of the customers matching it


class StepPrepared:
    """What was built ahead for one step's run (see `engine.run.Prepared`), read where it
    lies in the step's attached file: event facts (`take` first copies the previous step's
    tag changes into them) and state rules' matches (`stale`: the customers the previous
    step retagged)."""

    def __init__(
        self,
        events: dict[Key, str],
        matches: dict[Condition, str],
        retag: Callable[[str], None],
        stale: str | None,
    ) -> None:
        self.events, self.tables, self.retag = events, matches, retag
        self.stale_customers = stale

    def take(self, conn: sqlite3.Connection, key: Key, table: str) -> str | None:
        source = self.events.get(key)
        if source is None:
            return None
        ref = f'{ALIAS}."{source}"'  # read (and retagged) where it lies, like the features
        self.retag(ref)
        return ref

    def matches(self, where: str, values: Sequence[Any]) -> str | None:
        found = self.tables.get((where, tuple(values)))
        return None if found is None else f'{ALIAS}."{found}"'

    def stale(self) -> str | None:
        return self.stale_customers


class Lookahead:
    """Builds each step's features and event facts in a thread of its own, one step ahead
    of the runs (see the module docstring).

    The simulation calls, for each step k in order: `take(k)` (waits for the step's inputs
    and attaches them), the run, then `finished(k, results)` once the run has committed
    (detaches them, and lets the builder start step k+2). Work on the committed steps can
    be handed to the builder's thread too (`after`; `drain` waits for it). `close` stops the
    builder and deletes its files, whatever state it is in."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        steps: Sequence[int],
        keys: Callable[[int], list[Key]],
        conditions: Callable[[int], list[StateCondition]],
        needs: Needs,
        *,
        incremental: bool = True,
        table: str = "features",
    ) -> None:
        """`keys(k)`: the (event type, start) facts step k's run will read;
        `conditions(k)`: the compiled state rule conditions it can take matches for."""
        self.conn, self.path, self.settings = store.conn, store.path, settings
        self.steps, self.keys, self.needs = list(steps), keys, needs
        self.conditions = conditions
        self.incremental, self.table = incremental, table
        self.scratch = tempfile.TemporaryDirectory(prefix="playbook-lookahead-")
        self.built: dict[int, _Built] = {}
        self.error: BaseException | None = None
        self.finished_steps = 0  # runs committed: steps 0 .. finished_steps - 1
        self.stopping = False
        self.attached = False
        self.retagged = False  # whether the latest finished step retagged anyone
        self.jobs: list[Callable[[sqlite3.Connection], None]] = []
        self.jobs_given = self.jobs_done = 0
        self.changed = threading.Condition()
        self.worker: Store | None = None
        self.thread = threading.Thread(target=self._work, name="lookahead", daemon=True)
        self.thread.start()

    # -- the builder's thread ------------------------------------------------------------

    def _work(self) -> None:
        try:
            with self.changed:
                if self.stopping:
                    return
                self.worker = open_store(self.path, readonly=True)
            conn = self.worker.conn
            # Its temp tables (running totals, stages, event points) live in memory: they
            # are made and dropped at every step, and dropping one from a file reads back
            # every page of it.
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute(f"PRAGMA cache_size = -{LOOKAHEAD_CACHE_KIB}")
            conn.execute(f"PRAGMA temp.cache_size = -{LOOKAHEAD_TEMP_CACHE_KIB}")
            stepper = (
                FeatureStepper(self.worker, self.settings, table=self.table)
                if self.incremental
                else None
            )
            k = 0
            while True:
                with self.changed:
                    # Step k may lack only the tags of run k-1: it is built once the runs
                    # up to k-2 have committed. Building comes first, jobs after.
                    while not self.stopping and not self._can_build(k) and not self.jobs:
                        self.changed.wait()
                    if self.stopping:
                        return
                    job = None if self._can_build(k) else self.jobs.pop(0)
                if job is not None:
                    job(conn)
                    with self.changed:
                        self.jobs_done += 1
                        self.changed.notify_all()
                    continue
                built = self._build(self.worker, stepper, k, self.steps[k])
                with self.changed:
                    self.built[k] = built
                    self.changed.notify_all()
                k += 1
        except BaseException as exc:  # handed to the simulation by `take` and `drain`
            with self.changed:
                self.error = exc
                self.changed.notify_all()
        finally:
            with self.changed:
                if self.worker is not None:
                    self.worker.close()
                    self.worker = None

    def _path(self, k: int) -> Path:
        return Path(self.scratch.name) / f"step{k}.db"

    def _can_build(self, k: int) -> bool:
        return k < len(self.steps) and self.finished_steps >= k - 1

    def _build(self, worker: Store, stepper: FeatureStepper | None, k: int, moment: int) -> _Built:
        conn = worker.conn
        attach_scratch(conn, self._path(k), "out")
        try:
            conn.execute(f"PRAGMA out.cache_size = -{LOOKAHEAD_CACHE_KIB}")
            # Everything is built in the step's file, where the run reads it (see `take`).
            if stepper is not None:
                features = stepper.advance(moment, schema="out")
            else:
                features = build_features(
                    worker, self.settings, moment, table=self.table, schema="out"
                )
            events: dict[Key, str] = {}
            for key in self.keys(k):
                name = f"events{len(events)}"
                build_event_facts(
                    worker,
                    self.settings,
                    features,
                    key[0],
                    key[1],
                    name,
                    needs=self.needs,
                    schema="out",
                )
                conn.execute(f'CREATE INDEX out."{name}_customer" ON "{name}" (customer_id)')
                events[key] = name
            matches = self._match(conn, self.conditions(k))
        finally:
            conn.execute("DETACH DATABASE out")
        return _Built(self._path(k), features.rows, features.rfm, events, matches)

    def _match(
        self, conn: sqlite3.Connection, conditions: list[StateCondition]
    ) -> dict[Condition, str]:
        """Per distinct condition, a table of the customers matching it.

        The conditions read a few of the features' columns: they are copied once into a
        narrow table, which each condition then scans (a third of the time of scanning
        the wide features: the scan's cost is in reading its pages and rows)."""
        matches: dict[Condition, str] = {}
        if not conditions:
            return matches
        columns = sorted(set().union(*(c.columns for c in conditions)) - {"customer_id"})
        picked = "".join(f', "{c}"' for c in columns)
        conn.execute(f"DROP TABLE IF EXISTS temp.{NARROW}")
        conn.execute(
            f'CREATE TEMP TABLE {NARROW} AS SELECT customer_id{picked} FROM out."{self.table}"'
        )
        try:
            for where, values, _ in conditions:
                condition = (where, tuple(values))
                if condition in matches:
                    continue
                name = f"matches{len(matches)}"
                conn.execute(
                    f'CREATE TABLE out."{name}" (customer_id TEXT PRIMARY KEY) WITHOUT ROWID'
                )
                conn.execute(
                    f'INSERT INTO out."{name}" SELECT f.customer_id FROM temp.{NARROW} f '
                    f"WHERE {where}",
                    values,
                )
                matches[condition] = name
        finally:
            conn.execute(f"DROP TABLE temp.{NARROW}")
        return matches

    # -- the simulation's side -----------------------------------------------------------

    def take(self, k: int) -> tuple[FeatureTable, StepPrepared]:
        """Step k's features (with the tags the store has now), and what else was built for
        its run; waits for the builder if it is not done yet. The features stay in the
        step's file, attached (as `ALIAS`) until `finished`: copying them would cost more
        than reading them there."""
        with self.changed:
            while k not in self.built and self.error is None:
                if not self._run_a_job():  # rather than wait idle
                    self.changed.wait()
            if k not in self.built:
                assert self.error is not None
                raise self.error
            built = self.built.pop(k)
        conn = self.conn
        attach_scratch(conn, built.path, ALIAS)  # the run writes tags into it
        self.attached = True
        conn.execute(f"PRAGMA {ALIAS}.cache_size = -{STEP_CACHE_KIB}")  # and reads it often
        features = FeatureTable(
            table=self.table, as_of=self.steps[k], rows=built.rows, rfm=built.rfm, schema=ALIAS
        )
        self._retag(features.ref)
        stale = f"temp.{RETAGGED}" if self.retagged else None
        return features, StepPrepared(built.events, built.matches, self._retag, stale)

    def finished(self, k: int, results: Sequence[RunResult]) -> None:
        """Step k's runs have committed: detach the step's file, note whom they retagged
        (and their tags now), and let the builder start step k+2."""
        self._detach()
        self._path(k).unlink(missing_ok=True)
        written: dict[str, TagWrite] = {}
        for result in results:  # in the order they ran: the last one's tags are the store's
            merge_tag_writes(written, result.tags_written)
        scratch_table(self.conn, RETAGGED, "customer_id TEXT PRIMARY KEY, tags TEXT, changed TEXT")
        # One statement (outside a transaction, a row at a time would commit each one).
        self.conn.execute(
            f"INSERT INTO temp.{RETAGGED} SELECT json_extract(value, '$[0]'), "
            "json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)",
            (json.dumps([(c, w.tags, w.changed) for c, w in written.items()]),),
        )
        self.retagged = bool(written)
        with self.changed:
            self.finished_steps = k + 1
            self.changed.notify_all()

    def after(self, job: Callable[[sqlite3.Connection], None]) -> None:
        """Have `job` run on a connection that sees every committed step: the builder's,
        when it is not building a step, or the simulation's own, when it would otherwise
        wait (in `take` and `drain`). Jobs may run in any order, two at a time."""
        with self.changed:
            self.jobs.append(job)
            self.jobs_given += 1
            self.changed.notify_all()

    def drain(self) -> None:
        """Wait for every job given to `after` to have run, running some meanwhile."""
        with self.changed:
            while self.jobs_done < self.jobs_given and self.error is None:
                if not self._run_a_job():
                    self.changed.wait()
            if self.error is not None:
                raise self.error

    def _run_a_job(self) -> bool:
        """On the simulation's side, holding `changed`: run the next job waiting, if any,
        on the simulation's connection (releasing `changed` meanwhile)."""
        if not self.jobs:
            return False
        job = self.jobs.pop(0)
        self.changed.release()
        try:
            job(self.conn)
        finally:
            self.changed.acquire()
        self.jobs_done += 1
        self.changed.notify_all()
        return True

    def _retag(self, table: str) -> None:
        """Copy the tags of the customers the previous step's runs retagged (as they left
        them) into `table` (schema-qualified)."""
        if self.retagged:
            copy_tags(self.conn, table, f"temp.{RETAGGED}")

    def _detach(self) -> None:
        if self.attached:
            self.conn.execute(f"DETACH DATABASE {ALIAS}")
            self.attached = False

    def close(self) -> None:
        """Stop the builder (interrupting a statement under way), detach and delete its
        files. Call it outside a transaction."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
            if self.worker is not None:
                self.worker.conn.interrupt()
        self.thread.join()
        self._detach()
        self.conn.execute(f"DROP TABLE IF EXISTS temp.{RETAGGED}")
        self.scratch.cleanup()
