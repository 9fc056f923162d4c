"""Event facts: one row per event of a type since a moment — the event's properties and the
customer's features as of right after it — the facts event rules are judged on.

A run needs them for every event type its live rules are on. Building them is the biggest
job of a daily run after matching the state rules, and it needs nothing the run writes
(tags excepted, which the run re-applies to every facts table before reading them), so on
a machine with a second core `EventPrefetch` builds them there, in the order the run will
ask for them, while the run matches and decides its first rules.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from engine.catalog import SOURCE_KEYS, source_fields, source_table
from engine.features import MAX_WORKERS, FeatureTable, PointsQuery, build_point_features
from engine.settings import Settings
from engine.store import Store, open_store

# A run prefetches when the events to judge are at least this many: below it, a second
# connection and a scratch file cost more than they save.
PREFETCH_MIN_EVENTS = 20_000
# SQLite attaches at most 10 databases to a connection; each prefetched type takes one.
PREFETCH_MAX_TYPES = 8
# The prefetching connection's page cache (KiB): it reads the orders index per customer.
PREFETCH_CACHE_KIB = 64 * 1024

Key = tuple[str, int]  # (event type, start)
# Per event type, the features its rules and templates read (None: all); None: all for all.
Needs = Mapping[str, frozenset[str] | None] | None


class EventSource(Protocol):
    """Event facts built elsewhere, handed to a run."""

    def take(self, conn: sqlite3.Connection, key: Key, table: str) -> str | None:
        """The facts of `key` (with the tags the store had when the run began), indexed by
        customer: a schema-qualified table the run may write tags into, e.g. temp.`table`
        made from them; None if this source does not have them."""
        ...


def build_event_facts(
    store: Store,
    settings: Settings,
    features: FeatureTable,
    event: str,
    start: int,
    table: str,
    *,
    needs: Needs,
    base: bool = True,
    schema: str = "temp",
) -> None:
    """Create `schema`.`table` (temp, or an attached database; replaced if there): one row
    per `event` in [start, features.as_of), with the event's properties (`event.*`,
    `event_id`, `event_ts`) and its customer's features as of right after it (only those
    `needs` names for the event type; see `build_point_features`).

    `base`: use `features` (a full build with its stages) for the order totals, instead of
    summing each customer's whole history — faster, but only on the connection that has
    `features`."""
    conn, as_of = store.conn, features.as_of
    fields = source_fields(event)
    source, where = _event_rows(event)
    key = SOURCE_KEYS[source]
    # The events never leave SQLite: read once from the store into a temp table, which
    # their points are then selected from.
    conn.execute("DROP TABLE IF EXISTS temp.event_values")
    names = ", ".join(f'"event.{name}"' for name in fields)
    conn.execute(
        f"CREATE TEMP TABLE event_values (event_id TEXT PRIMARY KEY, "
        f"event_ts INTEGER, event_customer TEXT, {names}) WITHOUT ROWID"
    )
    values = ", ".join(f.expr for f in fields.values())
    conn.execute(
        f"INSERT OR IGNORE INTO temp.event_values SELECT s.{key}, s.ts, s.customer_id, "
        f"{values} FROM {source} s WHERE {where} ORDER BY s.{key}",
        {"start": start, "as_of": as_of, "type": event},
    )
    points = build_point_features(
        store,
        settings,
        PointsQuery(
            "SELECT event_id AS key, event_customer AS customer_id, event_ts + 1 AS moment "
            "FROM temp.event_values",
            {},
        ),
        features.rfm,
        table="event_points",
        base=features if base else None,
        needs=None if needs is None else needs.get(event),
    )
    conn.execute(f'DROP TABLE IF EXISTS {schema}."{table}"')
    conn.execute(
        f'CREATE TABLE {schema}."{table}" AS SELECT f.*, v.event_id, v.event_ts, {names} '
        f'FROM temp."{points.table}" f JOIN temp.event_values v ON v.event_id = f.point_key'
    )
    conn.execute(f'DROP TABLE temp."{points.table}"')
    conn.execute("DROP TABLE temp.event_values")


def _event_rows(event: str) -> tuple[str, str]:
    """The store table holding `event`s and the condition selecting those in
    [:start, :as_of) (aliased `s`; the parameters also carry :type)."""
    source = source_table(event)
    where = "s.ts >= :start AND s.ts < :as_of"
    return source, where + (" AND s.type = :type" if source == "events" else "")


def count_events(conn: sqlite3.Connection, event: str, start: int, as_of: int) -> int:
    """How many `event`s the store has in [start, as_of) (read from the ts indexes)."""
    source, where = _event_rows(event)
    sql = f"SELECT count(*) FROM {source} s WHERE {where}"
    return int(conn.execute(sql, {"start": start, "as_of": as_of, "type": event}).fetchone()[0])


def attach_scratch(conn: sqlite3.Connection, path: Path, alias: str) -> None:
    """Attach the scratch file at `path` (created if need be) as `alias`: written without a
    journal or syncing — it is thrown away, never recovered."""
    conn.execute(f"ATTACH DATABASE ? AS {alias}", (str(path),))
    conn.execute(f"PRAGMA {alias}.journal_mode = OFF")
    conn.execute(f"PRAGMA {alias}.synchronous = OFF")


def worth_prefetching(store: Store, keys: Sequence[Key], as_of: int) -> bool:
    """A second core, enough events to pay for a second connection, and a store on disk in
    write-ahead-log mode (the live store always is): there a reader never waits for the
    run's write transaction, nor the run for it. (With a rollback journal the run, needing
    the file to itself to spill pages or commit, could wait for a reader that waits for it.)
    """
    if min(os.cpu_count() or 1, MAX_WORKERS) < 2 or store.path == ":memory:" or not keys:
        return False
    (mode,) = store.conn.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() != "wal":
        return False
    total = 0
    for event, start in keys:
        total += count_events(store.conn, event, start, as_of)
        if total >= PREFETCH_MIN_EVENTS:
            return True
    return False


class EventPrefetch:
    """Builds event facts on a connection of its own, in a thread of its own.

    Start it inside the run's write transaction: the run holds the store's write lock, so
    the committed store the prefetching connection reads cannot change under it, and it
    differs from what the run sees only by the run's own writes — queue, rule state and
    tags; the tables it hands over are marked as having none of the run's tags yet.

    Each type's table is written to a scratch file of its own, which the run attaches and
    copies from (`take`) once it is complete; `close` (after the transaction has ended)
    stops the thread and detaches and deletes the files."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        features: FeatureTable,
        keys: Sequence[Key],
        needs: Needs,
    ) -> None:
        self.path, self.settings, self.features = store.path, settings, features
        self.needs = needs
        self.scratch = tempfile.TemporaryDirectory(prefix="playbook-events-")
        self.files = {
            key: Path(self.scratch.name) / f"events{i}.db"
            for i, key in enumerate(keys[:PREFETCH_MAX_TYPES])
        }
        self.ready = {key: threading.Event() for key in self.files}
        self.errors: dict[Key, BaseException] = {}
        self.attached: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.worker: Store | None = None
        self.thread = threading.Thread(target=self._work, name="event-facts", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            with self.lock:
                if self.stopping.is_set():
                    return
                self.worker = open_store(self.path, readonly=True)
            self.worker.conn.execute(f"PRAGMA cache_size = -{PREFETCH_CACHE_KIB}")
            for key, path in self.files.items():
                if self.stopping.is_set():
                    return
                self._build(self.worker, key, path)
                self.ready[key].set()
        except BaseException as exc:  # handed to the run by `take`
            for key in self.files:
                if not self.ready[key].is_set():
                    self.errors[key] = exc
        finally:
            for event in self.ready.values():
                event.set()
            with self.lock:
                if self.worker is not None:
                    self.worker.close()
                    self.worker = None

    def _build(self, worker: Store, key: Key, path: Path) -> None:
        event, start = key
        build_event_facts(
            worker,
            self.settings,
            self.features,
            event,
            start,
            "facts",
            needs=self.needs,
            base=False,
        )
        conn = worker.conn
        attach_scratch(conn, path, "out")
        try:
            conn.execute("CREATE TABLE out.facts AS SELECT * FROM temp.facts")
        finally:
            conn.execute("DETACH DATABASE out")
        conn.execute("DROP TABLE temp.facts")

    def take(self, conn: sqlite3.Connection, key: Key, table: str) -> str | None:
        """Create temp.`table` from the prefetched facts of `key`, waiting for them if they
        are still being built; None if `key` is not prefetched."""
        path = self.files.get(key)
        if path is None:
            return None
        self.ready[key].wait()
        error = self.errors.get(key)
        if error is not None:
            raise error
        alias = f"prefetched{len(self.attached)}"
        conn.execute(f"ATTACH DATABASE ? AS {alias}", (f"{path.as_uri()}?mode=ro",))
        self.attached.append(alias)
        conn.execute(f'DROP TABLE IF EXISTS temp."{table}"')
        conn.execute(f'CREATE TEMP TABLE "{table}" AS SELECT * FROM {alias}.facts')
        conn.execute(f'CREATE INDEX temp."{table}_customer" ON "{table}" (customer_id)')
        return f'temp."{table}"'

    def close(self, conn: sqlite3.Connection) -> None:
        """Stop building (interrupting a statement under way), detach what the run copied
        from and delete the scratch files. Call it after the run's transaction ended."""
        self.stopping.set()
        with self.lock:
            if self.worker is not None:
                self.worker.conn.interrupt()
        self.thread.join()
        for alias in self.attached:
            conn.execute(f"DETACH DATABASE {alias}")
        self.attached.clear()
        self.scratch.cleanup()
