"""Shared fixtures: a fresh store, and a small hand-computed dataset loaded through ingest."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from engine.clock import get_timezone
from engine.ingest import IngestOptions, ingest_file
from engine.store import Store, open_store
from tests.loopback import LoopbackServer

SHANGHAI = get_timezone("Asia/Shanghai")


def write_csv(path: Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    """Write a CSV file with a header row."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterable[Store]:
    """An empty, migrated store."""
    with open_store(tmp_path / "store.db") as opened:
        yield opened


# The hand-computed dataset, as of 2024-06-01 (Asia/Shanghai). See test_features.py.
CUSTOMERS = [
    ["00001", "张三", "wm001", "staff_li", "13800000001", "2023-01-01", "douyin", "0", "vip|kol"],
    ["00002", "李四", "wm002", "staff_li", "", "2023-02-01", "offline_store", "0", ""],
    ["00003", "王五", "", "staff_wang", "13800000003", "2023-03-01", "tmall", "1", ""],
    ["00004", "赵六", "wm004", "staff_wang", "", "2023-04-01", "xiaohongshu", "0", "new"],
    ["00005", "钱七", "wm005", "staff_li", "", "2024-07-01", "douyin", "0", ""],
    ["00006", "孙八", "", "staff_li", "", "", "", "0", ""],
    ["00007", "周九", "wm007", "staff_wang", "", "2023-05-01", "douyin", "0", ""],
]
ORDERS = [
    ["o1", "00001", "2024-05-02T10:00:00", "100", "skincare", "s1"],
    ["o2", "00001", "2023-12-01T12:00:00", "300", "makeup", "s2"],
    ["o3", "00002", "2024-03-02T09:00:00", "2500", "skincare", "s1"],
    ["o4", "00003", "2024-03-03T20:00:00", "50", "haircare", "s3"],
    ["o5", "00003", "2024-06-01T00:00:00", "70", "haircare", "s3"],
    ["o6", "00004", "2023-12-04T08:00:00", "600", "skincare", "s4"],
    ["o7", "00007", "2023-12-03T08:00:00", "1000", "fragrance", "s5"],
    ["o8", "00008", "2024-05-31T23:30:00+08:00", "80", "bodycare", "s6"],
    ["o9", "00009", "2024-06-05T10:00:00", "90", "bodycare", "s6"],
]
REFUNDS = [["r1", "o3", "00002", "2024-03-05", "400"]]
EVENTS = [
    {"customer_id": "00001", "type": "group.joined", "ts": "2024-01-01", "group": "vip-club"},
    {"customer_id": "00004", "type": "group.joined", "ts": "2024-01-01", "group": "fans"},
    {"customer_id": "00004", "type": "group.left", "ts": "2024-02-01", "group": "fans"},
    {"customer_id": "00007", "type": "friend.deleted", "ts": "2024-02-01"},
    {"customer_id": "00006", "type": "group.joined", "ts": "2024-01-01", "group": "fans"},
    {"customer_id": "00003", "type": "friend.added", "ts": "2024-01-01"},
]


def add_fact(conn: Any, key: str, customer: str, kind: str, ts: int, cents: int) -> None:
    """Insert one order ("orders"), refund ("refunds") or event (any other `kind`)."""
    if kind == "orders":
        conn.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?, 'skincare', 's1', NULL)",
            (key, customer, ts, cents),
        )
    elif kind == "refunds":
        conn.execute(
            "INSERT INTO refunds VALUES (?, NULL, ?, ?, ?, NULL)", (key, customer, ts, cents)
        )
    else:
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, NULL)", (key, customer, kind, ts))


def load_small_dataset(store: Store, folder: Path) -> None:
    """Ingest the hand-computed dataset into `store`."""
    options = IngestOptions(tz=SHANGHAI)
    header = [
        "customer_id",
        "name",
        "external_userid",
        "owner",
        "phone",
        "joined_at",
        "channel",
        "opted_out",
        "tags",
    ]
    files = [
        ("customers", write_csv(folder / "customers.csv", header, CUSTOMERS)),
        (
            "orders",
            write_csv(
                folder / "orders.csv",
                ["order_id", "customer_id", "ts", "amount", "category", "sku"],
                ORDERS,
            ),
        ),
        (
            "refunds",
            write_csv(
                folder / "refunds.csv",
                ["refund_id", "order_id", "customer_id", "ts", "amount"],
                REFUNDS,
            ),
        ),
        ("events", write_jsonl(folder / "events.jsonl", EVENTS)),
    ]
    for kind, path in files:
        result = ingest_file(store, kind, path, options)
        assert result.rejected == 0, result.first_rejects


@pytest.fixture
def loopback() -> Iterable[LoopbackServer]:
    """A started HTTP server on 127.0.0.1 that records requests (see tests/loopback.py)."""
    with LoopbackServer() as server:
        yield server
