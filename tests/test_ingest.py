"""Ingest: formats, mapping, idempotency, rejects, batches and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.clock import get_timezone, parse_timestamp
from engine.errors import InputError, UsageError
from engine.ingest import IngestOptions, ingest_file
from engine.ingest.load import parse_mapping
from engine.store import Store, open_store
from tests.conftest import SHANGHAI, write_csv, write_jsonl

OPTS = IngestOptions(tz=SHANGHAI)
ORDER_HEADER = ["order_id", "customer_id", "ts", "amount", "category", "sku"]


def rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in store.conn.execute(sql).fetchall()]


def test_customers_keep_leading_zeros_and_extra_columns(store: Store, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "c.csv",
        ["customer_id", "name", "tags", "city"],
        [["00042", "林一", "vip, kol", "上海"]],
    )
    result = ingest_file(store, "customers", path, OPTS)
    assert (result.rows_read, result.added, result.rejected) == (1, 1, 0)
    assert rows(store, "SELECT customer_id, name, tags, props FROM customers") == [
        ("00042", "林一", '["kol", "vip"]', '{"city":"上海"}')
    ]


def test_map_reads_the_files_own_column_names(store: Store, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "o.csv",
        ["单号", "会员编号", "下单时间", "实付金额"],
        [["A1", "007", "2024-06-01 10:00:00", "¥1,299.50"]],
    )
    mapping = parse_mapping(
        ["order_id=单号", "customer_id=会员编号", "ts=下单时间", "amount=实付金额"], "orders"
    )
    ingest_file(store, "orders", path, IngestOptions(tz=SHANGHAI, mapping=mapping))
    expected_ts = parse_timestamp("2024-06-01T10:00:00+08:00", SHANGHAI)
    assert rows(store, "SELECT order_id, customer_id, ts, amount_cents FROM orders") == [
        ("A1", "007", expected_ts, 129950)
    ]


def test_bad_map_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no field 'amout'"):
        parse_mapping(["amout=金额"], "orders")
    with pytest.raises(UsageError, match="field=column"):
        parse_mapping(["amount"], "orders")


def test_orders_create_unknown_customers(store: Store, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "o.csv", ORDER_HEADER, [["o1", "00099", "2024-01-01", "10", "", ""]]
    )
    result = ingest_file(store, "orders", path, OPTS)
    assert result.customers_created == 1
    assert rows(store, "SELECT customer_id, auto_created FROM customers") == [("00099", 1)]
    # A later customers file fills the customer in and clears the flag.
    path = write_csv(tmp_path / "c.csv", ["customer_id", "name"], [["00099", "新客"]])
    ingest_file(store, "customers", path, OPTS)
    assert rows(store, "SELECT name, auto_created FROM customers") == [("新客", 0)]


def test_reingest_adds_nothing_but_identical_rows_in_one_file_are_kept(
    store: Store, tmp_path: Path
) -> None:
    same = ["", "00001", "2024-01-01T10:00:00", "99", "skincare", "s1"]
    path = write_csv(tmp_path / "o.csv", ORDER_HEADER, [same, same, same])
    first = ingest_file(store, "orders", path, OPTS)
    assert first.added == 3
    again = ingest_file(store, "orders", path, OPTS)
    assert (again.added, again.unchanged) == (0, 3)
    assert store.count("orders") == 3
    # The same rows under another file name are the same facts.
    copy = tmp_path / "copy.csv"
    copy.write_bytes(path.read_bytes())
    assert ingest_file(store, "orders", copy, OPTS).added == 0


def test_appended_file_adds_only_the_new_rows(store: Store, tmp_path: Path) -> None:
    base = [["", "00001", "2024-01-01", "10", "", ""], ["", "00002", "2024-01-02", "20", "", ""]]
    path = write_csv(tmp_path / "o.csv", ORDER_HEADER, base)
    ingest_file(store, "orders", path, OPTS)
    write_csv(path, ORDER_HEADER, [*base, ["", "00003", "2024-01-03", "30", "", ""]])
    assert ingest_file(store, "orders", path, OPTS).added == 1
    assert store.count("orders") == 3


def test_reingesting_customers_reports_no_change(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", ["customer_id", "name", "city"], [["1", "A", "北京"]])
    ingest_file(store, "customers", path, OPTS)
    again = ingest_file(store, "customers", path, OPTS)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 1)
    write_csv(path, ["customer_id", "name"], [["1", "B"]])
    changed = ingest_file(store, "customers", path, OPTS)
    assert (changed.added, changed.updated) == (0, 1)
    # Columns the file does not have are left alone.
    assert rows(store, "SELECT name, props FROM customers") == [("B", '{"city":"北京"}')]


def test_bad_rows_are_rejected_with_reasons_and_good_rows_kept(
    store: Store, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "o.csv",
        ORDER_HEADER,
        [
            ["o1", "00001", "2024-01-01", "10", "", ""],
            ["o2", "", "2024-01-01", "10", "", ""],
            ["o3", "00003", "yesterday", "10", "", ""],
            ["o4", "00004", "2024-01-01", "ten", "", ""],
            ["o5", "00005", "2024-01-01", "-5", "", ""],
            ["o6", "00006", "2024-01-01", "12.5", "", ""],
        ],
    )
    result = ingest_file(store, "orders", path, OPTS)
    assert (result.rows_read, result.added, result.rejected) == (6, 2, 4)
    assert [(r.line, r.reason) for r in result.first_rejects] == [
        (3, "missing customer_id"),
        (4, "ts: not an ISO 8601 time: 'yesterday'"),
        (5, "amount: 'ten' is not a number"),
        (6, "negative amount (load refunds with `playbook ingest refunds`)"),
    ]
    rejects = Path(result.rejects_path or "")
    assert rejects.name == "o.rejects.csv"
    text = rejects.read_text("utf-8").splitlines()
    assert text[0] == "reject_line,reject_reason,order_id,customer_id,ts,amount,category,sku"
    assert len(text) == 5
    # Fixing the rejects file and loading it stores the rest; its extra columns are ignored.
    fixed = (
        rejects.read_text("utf-8")
        .replace(",,2024", ",00002,2024")
        .replace("yesterday", "2024-01-02")
        .replace(",ten,", ",10,")
        .replace(",-5,", ",5,")
    )
    fixed_path = tmp_path / "fixed.csv"
    fixed_path.write_text(fixed, "utf-8")
    again = ingest_file(store, "orders", fixed_path, OPTS)
    assert (again.added, again.rejected) == (4, 0)
    assert rows(store, "SELECT count(*) FROM orders WHERE props IS NOT NULL") == [(0,)]


def test_unknown_event_type_suggests_the_near_miss(store: Store, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [
            {"customer_id": "1", "type": "group.joind", "ts": "2024-01-01"},
            {
                "customer_id": "1",
                "type": "coupon.redeemed",
                "ts": "2024-01-01",
                "coupon": "BIG50",
                "detail": {"k": [1, 2]},
            },
            "not an object",
            {"broken": True},
        ],
    )
    path.write_text(path.read_text() + "{oops\n")
    result = ingest_file(store, "events", path, OPTS)
    reasons = [r.reason for r in result.first_rejects]
    assert reasons[0] == "unknown event type 'group.joind' (did you mean 'group.joined'?)"
    assert reasons[1] == "a line must be a JSON object"
    assert reasons[2] == "missing type"
    assert reasons[3].startswith("invalid JSON")
    assert rows(store, "SELECT type, props FROM events") == [
        ("coupon.redeemed", '{"coupon":"BIG50","detail":{"k":[1,2]}}')
    ]
    rejects = Path(result.rejects_path or "").read_text("utf-8").splitlines()
    assert json.loads(rejects[0])["reject_line"] == 1


def test_event_streams_may_carry_orders_and_refunds(store: Store, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [
            {
                "event_id": "x1",
                "customer_id": "1",
                "type": "order.created",
                "ts": "2024-01-01",
                "amount": 88,
                "category": "makeup",
            },
            {
                "customer_id": "1",
                "type": "order.refunded",
                "ts": "2024-01-03",
                "amount": 8,
                "order_id": "x1",
            },
        ],
    )
    ingest_file(store, "events", path, OPTS)
    assert rows(store, "SELECT order_id, amount_cents, category FROM orders") == [
        ("x1", 8800, "makeup")
    ]
    assert rows(store, "SELECT order_id, amount_cents FROM refunds") == [("x1", 800)]


def test_refund_finds_its_customer_through_the_order(store: Store, tmp_path: Path) -> None:
    ingest_file(
        store,
        "orders",
        write_csv(tmp_path / "o.csv", ORDER_HEADER, [["o1", "00007", "2024-01-01", "100", "", ""]]),
        OPTS,
    )
    path = write_csv(
        tmp_path / "r.csv",
        ["order_id", "ts", "amount"],
        [["o1", "2024-01-02", "-30"], ["nope", "2024-01-02", "5"]],
    )
    result = ingest_file(store, "refunds", path, OPTS)
    assert rows(store, "SELECT customer_id, amount_cents FROM refunds") == [("00007", 3000)]
    assert result.rejected == 1
    assert "order 'nope' is not in the store" in result.first_rejects[0].reason


def test_timestamp_formats_and_timezones(store: Store, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "o.csv", ORDER_HEADER, [["o1", "1", "2024/06/01 08:00", "1", "", ""]]
    )
    ingest_file(
        store, "orders", path, IngestOptions(tz=get_timezone("UTC"), ts_format="%Y/%m/%d %H:%M")
    )
    path2 = write_csv(tmp_path / "o2.csv", ORDER_HEADER, [["o2", "1", "1717228800", "1", "", ""]])
    ingest_file(store, "orders", path2, IngestOptions(tz=SHANGHAI, ts_format="epoch"))
    path3 = write_csv(tmp_path / "o3.csv", ORDER_HEADER, [["o3", "1", "2024-06-01", "1", "", ""]])
    ingest_file(store, "orders", path3, OPTS)
    assert dict(rows(store, "SELECT order_id, ts FROM orders")) == {
        "o1": 1717228800,
        "o2": 1717228800,
        "o3": 1717228800 - 16 * 3600,
    }


def test_missing_required_column_fails_the_whole_file(store: Store, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "o.csv", ["id", "who", "when", "amount"], [["1", "2", "3", "4"]])
    with pytest.raises(InputError, match=r"no customer_id, ts column .*--map"):
        ingest_file(store, "orders", path, OPTS)
    assert store.count("orders") == 0


def test_wrong_encoding_says_what_to_do(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes("customer_id,name\n1,张三\n".encode("gbk"))
    with pytest.raises(InputError, match="try --encoding gbk"):
        ingest_file(store, "customers", path, OPTS)
    ingest_file(store, "customers", path, IngestOptions(tz=SHANGHAI, encoding="gbk"))
    assert rows(store, "SELECT name FROM customers") == [("张三",)]


def test_interrupt_keeps_whole_batches_and_a_rerun_completes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = [["", f"{i:05d}", "2024-01-01", str(i), "", ""] for i in range(1, 251)]
    path = write_csv(tmp_path / "o.csv", ORDER_HEADER, data)
    from engine.ingest import normalize

    original = normalize.Normalizer.normalize
    calls = {"n": 0}

    def flaky(self: normalize.Normalizer, index: int, raw: dict[str, object]) -> object:
        calls["n"] += 1
        if calls["n"] == 175:
            raise KeyboardInterrupt
        return original(self, index, raw)

    monkeypatch.setattr(normalize.Normalizer, "normalize", flaky)
    options = IngestOptions(tz=SHANGHAI, batch_size=50)
    result = ingest_file(store, "orders", path, options)
    assert result.interrupted
    assert store.count("orders") == 150  # three whole batches, nothing of the fourth
    monkeypatch.undo()
    ingest_file(store, "orders", path, options)
    with open_store(tmp_path / "clean.db") as clean:
        ingest_file(clean, "orders", path, options)
        assert rows(store, "SELECT * FROM orders ORDER BY 1") == rows(
            clean, "SELECT * FROM orders ORDER BY 1"
        )
    assert rows(store, "SELECT status FROM ingest_log ORDER BY id") == [("interrupted",), ("done",)]


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_mid_file_then_rerun_equals_a_clean_load(tmp_path: Path, trial: int) -> None:
    data = [
        ["", f"{i % 5000:05d}", "2024-01-01", str(i % 900), "skincare", "s"] for i in range(60_000)
    ]
    path = write_csv(tmp_path / "o.csv", ORDER_HEADER, data)
    db = tmp_path / "s.db"
    script = (
        "import sys; from engine.ingest import IngestOptions, ingest_file; "
        "from engine.store import open_store; from engine.clock import get_timezone; "
        "s = open_store(sys.argv[1]); print('ready', flush=True); "
        "ingest_file(s, 'orders', sys.argv[2], IngestOptions(tz=get_timezone('UTC'), "
        "batch_size=2000))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(db), str(path)],
        stdout=subprocess.PIPE,
        env={**os.environ},
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    time.sleep(0.05 + 0.1 * trial)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with open_store(db) as store:
        assert store.count("orders") % 2000 == 0  # only whole batches
        ingest_file(store, "orders", path, IngestOptions(tz=get_timezone("UTC")))
        assert store.count("orders") == 60_000
        assert rows(store, "SELECT sum(amount_cents), count(DISTINCT order_id) FROM orders") == [
            (sum(i % 900 for i in range(60_000)) * 100, 60_000)
        ]
