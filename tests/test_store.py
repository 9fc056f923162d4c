"""The fact store: creation, versioning, WAL, transactions, read-only opening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine.errors import StoreError
from engine.store import _MIGRATIONS, SCHEMA_VERSION, open_store


def test_new_store_is_migrated_in_wal_mode(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert {"customers", "orders", "refunds", "events", "ingest_log", "meta"} <= tables
        assert "orders_customer_ts" in tables


def test_reopening_keeps_data(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store, store.transaction() as conn:
        conn.execute("INSERT INTO customers (customer_id) VALUES ('00001')")
    with open_store(tmp_path / "s.db") as store:
        assert store.count("customers") == 1


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store, store.transaction() as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(StoreError, match="newer playbook-engine"):
        open_store(tmp_path / "s.db")


def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="no playbook schema version"):
        open_store(tmp_path / "other.db")


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store:
        with pytest.raises(RuntimeError), store.transaction() as conn:
            conn.execute("INSERT INTO customers (customer_id) VALUES ('00001')")
            raise RuntimeError("boom")
        assert store.count("customers") == 0


def test_read_only_store_cannot_be_written(tmp_path: Path) -> None:
    open_store(tmp_path / "s.db").close()
    with open_store(tmp_path / "s.db", readonly=True) as store:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.conn.execute("INSERT INTO customers (customer_id) VALUES ('1')")
        # Temporary tables (features) still work on a read-only store.
        store.conn.execute("CREATE TEMP TABLE t AS SELECT 1 AS x")
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.db", readonly=True)


def test_a_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    first = open_store(tmp_path / "s.db")
    second = open_store(tmp_path / "s.db")
    second.conn.execute("PRAGMA busy_timeout = 50")
    blocked = pytest.raises(StoreError, match="another playbook command")
    with first.transaction(), blocked, second.transaction():
        pass
    with second.transaction() as conn:
        conn.execute("INSERT INTO customers (customer_id) VALUES ('1')")
    first.close()
    second.close()


def store_at_version(path: Path, version: int) -> None:
    """A store exactly as an engine of schema `version` made it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for target in range(1, version + 1):
        for statement in _MIGRATIONS[target]:
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    conn.close()


def test_a_schema_1_store_is_migrated_forward_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store_at_version(path, 1)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO customers (customer_id) VALUES ('00042')")
    conn.close()
    with pytest.raises(StoreError, match="run any writing command"):
        open_store(path, readonly=True)
    with open_store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 5
        assert store.count("customers") == 1
        assert store.count("actions") == 0
        assert store.count("export_batches") == 0


def test_a_schema_2_store_gets_the_schema_3_indexes(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    store_at_version(path, 2)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO orders VALUES ('o1', 'c1', 10, 100, 'skincare', 's', NULL)")
    conn.close()
    with open_store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        indexes = dict(
            store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        )
        assert "actions_customer_time" not in indexes and "actions_status_time" not in indexes
        assert "amount_cents, category" in indexes["orders_customer_ts"]
        assert "status IN ('pending', 'exporting', 'exported', 'sent')" in indexes["actions_open"]
        assert store.count("orders") == 1


def test_a_schema_3_queue_gains_the_export_columns_keeping_its_actions(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    store_at_version(path, 3)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO actions (action_id, run_id, playbook, playbook_version, "
            "playbook_hash, rule_id, customer_id, trigger, action_index, type, decided_at, "
            "scheduled_at, status) VALUES ('a1', 'r', 'p', 1, 'h', 'x', 'c1', 'entry:1', 0, "
            "'send', 5, 5, 'pending')"
        )
    conn.close()
    with open_store(path) as store:
        row = store.conn.execute(
            "SELECT status, attempts, batch_id, attachments FROM actions"
        ).fetchone()
        assert row == ("pending", 0, None, None)
        assert store.count("endpoints") == 0


def test_page_cache_holds_the_cache_size_for_a_block_and_restores_it(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.db") as store:
        (before,) = store.conn.execute("PRAGMA cache_size").fetchone()
        with store.page_cache(4096):
            assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == -4096
        assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == before
        with pytest.raises(RuntimeError), store.page_cache(2048):
            raise RuntimeError("boom")
        assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == before


def test_a_schema_4_queue_gets_the_customer_schedule_index(tmp_path: Path) -> None:
    """Caps and cooldowns read a customer's actions by scheduled time (schema 5)."""
    path = tmp_path / "v4.db"
    store_at_version(path, 4)
    with open_store(path) as store:
        assert store.schema_version() == 5
        indexes = dict(
            store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        )
        assert "actions_customer" not in indexes
        assert "(customer_id, scheduled_at)" in indexes["actions_customer_scheduled"]
