"""The fact store: one SQLite file of customers and their events.

This is the only module that writes SQL schema. The schema is versioned in the `meta`
table and migrated forward on open; a store written by a newer version is refused rather
than guessed at. Every timestamp is UTC epoch seconds; every amount is integer cents
(分), so sums and thresholds are exact.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils

from engine.errors import StoreError

if TYPE_CHECKING:
    from engine.decide import QueueFilter

DEFAULT_DB = "playbook.db"
SCHEMA_VERSION = 5
CACHE_KIB = 256 * 1024
# Prepared statements kept per connection (Python's default is 128): a run prepares a few
# hundred distinct ones and uses them again rule after rule, step after step.
STATEMENT_CACHE = 1024

# Event types the store understands. Orders and refunds have their own tables (they
# carry amounts); everything else lives in `events` with its properties as JSON.
ORDER_EVENT = "order.created"
REFUND_EVENT = "order.refunded"
EVENT_TYPES: dict[str, str] = {
    ORDER_EVENT: "an order was placed (amount, category, sku)",
    REFUND_EVENT: "money was refunded on an order (amount)",
    "friend.added": "the customer became a WeChat/WeCom friend of a staff member",
    "friend.deleted": "the customer deleted the staff member, or was deleted",
    "group.joined": "the customer joined a community group (社群)",
    "group.left": "the customer left a community group",
    "coupon.redeemed": "the customer used a coupon",
    "message.replied": "the customer replied to a message",
    "referral.made": "the customer brought a new customer (老带新)",
    "balance.topped_up": "the customer topped up stored value (充值)",
    "membership.bought": "the customer bought a paid membership",
}

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE customers (
            customer_id TEXT PRIMARY KEY,
            name TEXT,
            external_userid TEXT,
            owner TEXT,
            phone TEXT,
            joined_at INTEGER,
            channel TEXT,
            opted_out INTEGER NOT NULL DEFAULT 0,
            tags TEXT NOT NULL DEFAULT '[]',
            props TEXT,
            -- 1 when the row was created because an order/event named an unknown customer;
            -- such a customer exists as of T only if something happened to them before T.
            auto_created INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE orders (
            order_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            ts INTEGER NOT NULL,
            amount_cents INTEGER NOT NULL,
            category TEXT,
            sku TEXT,
            props TEXT
        )""",
        """CREATE TABLE refunds (
            refund_id TEXT PRIMARY KEY,
            order_id TEXT,
            customer_id TEXT NOT NULL,
            ts INTEGER NOT NULL,
            amount_cents INTEGER NOT NULL,
            props TEXT
        )""",
        """CREATE TABLE events (
            event_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            type TEXT NOT NULL,
            ts INTEGER NOT NULL,
            props TEXT
        )""",
        """CREATE TABLE ingest_log (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            file TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            finished_at INTEGER,
            rows_read INTEGER NOT NULL DEFAULT 0,
            rows_added INTEGER NOT NULL DEFAULT 0,
            rows_rejected INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL
        )""",
        # Features aggregate per customer before a moment: (customer_id, ts) serves both.
        "CREATE INDEX orders_customer_ts ON orders (customer_id, ts)",
        "CREATE INDEX orders_ts ON orders (ts)",
        "CREATE INDEX refunds_customer_ts ON refunds (customer_id, ts)",
        "CREATE INDEX events_customer_type_ts ON events (customer_id, type, ts)",
        "CREATE INDEX events_type_ts ON events (type, ts)",
    ],
    2: [
        # One row per execution of a playbook (`playbook run`).
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            playbook TEXT NOT NULL,
            version INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            as_of INTEGER NOT NULL,
            since INTEGER,
            engine TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            finished_at INTEGER,
            counts TEXT
        )""",
        # The action queue. `action_id` is a hash of (playbook, rule, customer, trigger,
        # action number): the same decision can never be queued twice.
        """CREATE TABLE actions (
            action_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL,
            playbook TEXT NOT NULL,
            playbook_version INTEGER NOT NULL,
            playbook_hash TEXT NOT NULL,
            rule_id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            trigger TEXT NOT NULL,
            action_index INTEGER NOT NULL,
            type TEXT NOT NULL,
            channel TEXT,
            template TEXT,
            message TEXT,
            coupon TEXT,
            group_name TEXT,
            tags_added TEXT,
            tags_removed TEXT,
            assign_to TEXT,
            note TEXT,
            decided_at INTEGER NOT NULL,
            scheduled_at INTEGER NOT NULL,
            expires_at INTEGER,
            status TEXT NOT NULL,
            reason TEXT,
            detail TEXT
        )""",
        "CREATE INDEX actions_customer_time ON actions (customer_id, scheduled_at)",
        "CREATE INDEX actions_status_time ON actions (status, scheduled_at)",
        # A run decides rule by rule and action by action: each step reads its own rows.
        "CREATE INDEX actions_run_rule ON actions (run_id, rule_id, action_index, status)",
        "CREATE INDEX actions_rule_customer ON actions "
        "(playbook, rule_id, customer_id, decided_at)",
        # Whether a customer matched a state rule at its latest evaluation, and how many
        # times they have entered it: rules fire on entry, once per episode.
        """CREATE TABLE rule_state (
            playbook TEXT NOT NULL,
            rule_id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            matching INTEGER NOT NULL,
            episode INTEGER NOT NULL,
            changed_at INTEGER NOT NULL,
            PRIMARY KEY (playbook, rule_id, customer_id)
        ) WITHOUT ROWID""",
        # Up to when each playbook's event rules have consumed events.
        """CREATE TABLE event_cursor (
            playbook TEXT PRIMARY KEY,
            until INTEGER NOT NULL
        )""",
    ],
    # Fewer, narrower queue indexes: every index is written once per decision, and a first
    # run on a big store decides millions. Runs stage their decisions in a temp table, so
    # the per-run index is gone; suppressed rows stay out of the pending index.
    3: [
        "DROP INDEX IF EXISTS actions_customer_time",
        "DROP INDEX IF EXISTS actions_status_time",
        "DROP INDEX IF EXISTS actions_run_rule",
        "DROP INDEX IF EXISTS actions_rule_customer",
        # A customer's actions: frequency caps, cooldowns, `explain`.
        "CREATE INDEX actions_customer ON actions (customer_id, playbook, rule_id, decided_at)",
        # What is due for export, and what is out awaiting acknowledgement.
        "CREATE INDEX actions_open ON actions (status, scheduled_at) "
        "WHERE status = 'pending' OR status = 'exported'",
        # A customer's orders up to a moment, read from the index alone: features right
        # after each event (event rules) and outcome windows walk it per customer.
        "DROP INDEX IF EXISTS orders_customer_ts",
        "CREATE INDEX orders_customer_ts ON orders (customer_id, ts, amount_cents, category)",
    ],
    # Export: pending -> exporting -> exported (files) or sent (HTTP accepted) ->
    # delivered / failed (receipts); expired when not sent in time.
    4: [
        # Links and mini-programs decided with the action (coupon, group join link).
        "ALTER TABLE actions ADD COLUMN attachments TEXT",
        # The export batch that carries the action (file or HTTP request).
        "ALTER TABLE actions ADD COLUMN batch_id TEXT",
        "ALTER TABLE actions ADD COLUMN exported_at INTEGER",
        "ALTER TABLE actions ADD COLUMN result_at INTEGER",
        "ALTER TABLE actions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE actions ADD COLUMN error TEXT",
        "CREATE INDEX actions_batch ON actions (batch_id) WHERE batch_id IS NOT NULL",
        "DROP INDEX IF EXISTS actions_open",
        "CREATE INDEX actions_open ON actions (status, scheduled_at) "
        "WHERE status IN ('pending', 'exporting', 'exported', 'sent')",
        # One row per file written or request posted. `body` keeps the exact bytes of an
        # HTTP request until it is accepted, so an interrupted export re-sends the same
        # request with the same id; `file_sha256` tells a renamed file from a lost one.
        """CREATE TABLE export_batches (
            batch_id TEXT PRIMARY KEY,
            format TEXT NOT NULL,
            destination TEXT NOT NULL,
            endpoint TEXT,
            status TEXT NOT NULL,
            actions INTEGER NOT NULL DEFAULT 0,
            body BLOB,
            file_sha256 TEXT,
            created_at INTEGER NOT NULL,
            finished_at INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            http_status INTEGER,
            error TEXT,
            response TEXT
        )""",
        "CREATE INDEX export_batches_status ON export_batches (status, format)",
        # HTTP endpoints that answered 410 Gone: not posted to again until re-enabled.
        """CREATE TABLE endpoints (
            url TEXT PRIMARY KEY,
            disabled_at INTEGER NOT NULL,
            reason TEXT NOT NULL
        )""",
    ],
    # A customer's actions by scheduled time: frequency caps count the messages scheduled in
    # their window, cooldowns look for the rule's actions decided (so scheduled: never
    # earlier) within the cooldown, `explain` reads one customer's. Caps then read the
    # window, not the customer's whole history, and the index is a third of the width of
    # (customer, playbook, rule, decided): every queued action writes it.
    5: [
        "DROP INDEX IF EXISTS actions_customer",
        "CREATE INDEX actions_customer_scheduled ON actions (customer_id, scheduled_at)",
    ],
}


@dataclass
class Store:
    """An open fact store. Use `open_store` to get one."""

    path: str
    db: sqlite_utils.Database
    readonly: bool = False
    # A simulation's scratch copy: what its queue may hold (`engine.decide.QueueFilter`).
    queue_filter: QueueFilter | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        """The underlying sqlite3 connection (autocommit; use `transaction`)."""
        conn: sqlite3.Connection = self.db.conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block in one write transaction: all of it is committed, or none."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(
                f"{self.path}: cannot start a write ({exc}); is another "
                "playbook command writing to it?"
            ) from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    @contextmanager
    def page_cache(self, kib: int) -> Iterator[None]:
        """Hold SQLite's page cache to `kib` KiB for a block (its sorter takes as much
        memory again per thread, so this also bounds big ORDER BYs); restored after."""
        (before,) = self.conn.execute("PRAGMA cache_size").fetchone()
        self.conn.execute(f"PRAGMA cache_size = -{int(kib)}")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA cache_size = {int(before)}")

    def schema_version(self) -> int:
        """The schema version recorded in the store (0 for a blank file)."""
        return _read_version(self.conn)

    def count(self, table: str) -> int:
        """Rows in one of the store's tables."""
        if table not in (
            "customers",
            "orders",
            "refunds",
            "events",
            "ingest_log",
            "runs",
            "actions",
            "rule_state",
            "event_cursor",
            "export_batches",
            "endpoints",
        ):
            raise ValueError(f"not a store table: {table}")
        row = self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_db_path() -> str:
    """The store path when none is given: $PLAYBOOK_DB, else ./playbook.db."""
    return os.environ.get("PLAYBOOK_DB") or DEFAULT_DB


def open_store(path: str | os.PathLike[str], *, readonly: bool = False) -> Store:
    """Open (creating and migrating if needed) the fact store at `path`."""
    path = str(path)
    if readonly and not Path(path).exists():
        raise StoreError(
            f"{path}: no such store (create one with `playbook ingest` or `playbook demo`)"
        )
    try:
        if readonly:
            conn = sqlite3.connect(
                f"{Path(path).resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                cached_statements=STATEMENT_CACHE,
            )
        else:
            conn = sqlite3.connect(path, isolation_level=None, cached_statements=STATEMENT_CACHE)
        conn.execute("PRAGMA busy_timeout = 10000")
        # Up to 256 MiB of page cache: ingest and features walk indexes far larger than
        # SQLite's 2 MiB default, and a cache that holds them saves most of the I/O.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # Let large sorts (the features build) use a second core.
        conn.execute(f"PRAGMA threads = {min(os.cpu_count() or 1, 4)}")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        version = _read_version(conn)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a playbook store ({exc})") from exc
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"{path}: written by a newer playbook-engine (schema {version}, this "
            f"one knows up to {SCHEMA_VERSION}); upgrade playbook-engine"
        )
    if version < SCHEMA_VERSION:
        if readonly:
            conn.close()
            raise StoreError(
                f"{path}: schema {version} is older than {SCHEMA_VERSION}; run any "
                "writing command (e.g. `playbook ingest`) once to migrate it"
            )
        _migrate(conn, path, version)
    return Store(path=path, db=sqlite_utils.Database(conn), readonly=readonly)


def _read_version(conn: sqlite3.Connection) -> int:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise sqlite3.DatabaseError("it has tables but no playbook schema version")
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _migrate(conn: sqlite3.Connection, path: str, version: int) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
        if version == 0:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.execute("ROLLBACK")
        raise StoreError(
            f"{path}: could not migrate schema {version} -> {SCHEMA_VERSION}: {exc}"
        ) from exc
