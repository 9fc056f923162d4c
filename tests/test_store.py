"""The fact store: creation, versioning, WAL, transactions, read-only opening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine.errors import StoreError
from engine.store import SCHEMA_VERSION, open_store


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


def test_a_schema_1_store_is_migrated_forward_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with open_store(path) as store, store.transaction() as conn:
        conn.execute("INSERT INTO customers (customer_id) VALUES ('00042')")
        # Make it look like a store written before schema 2 existed.
        for table in ("runs", "actions", "rule_state", "event_cursor"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with open_store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        assert store.count("customers") == 1
        assert store.count("actions") == 0
    with pytest.raises(StoreError, match="run any writing command"):
        with open_store(path) as store, store.transaction() as conn:
            conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
            for table in ("runs", "actions", "rule_state", "event_cursor"):
                conn.execute(f"DROP TABLE {table}")
        open_store(path, readonly=True)


def test_a_schema_2_store_gets_the_schema_3_indexes(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with open_store(path) as store, store.transaction() as conn:
        conn.execute("INSERT INTO orders VALUES ('o1', 'c1', 10, 100, 'skincare', 's', NULL)")
        # Make it look like a schema 2 store: its indexes, its version.
        for name in ("actions_customer", "actions_open", "orders_customer_ts"):
            conn.execute(f"DROP INDEX {name}")
        conn.execute("CREATE INDEX orders_customer_ts ON orders (customer_id, ts)")
        conn.execute("CREATE INDEX actions_customer_time ON actions (customer_id, scheduled_at)")
        conn.execute("CREATE INDEX actions_status_time ON actions (status, scheduled_at)")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with open_store(path) as store:
        assert store.schema_version() == 3
        indexes = dict(
            store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        )
        assert "actions_customer_time" not in indexes and "actions_status_time" not in indexes
        assert "amount_cents, category" in indexes["orders_customer_ts"]
        assert "WHERE status = 'pending'" in indexes["actions_open"]
        assert store.count("orders") == 1
