"""Tests for the deterministic demo data generator."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.clock import DAY, parse_timestamp
from engine.demo import DemoSummary, generate_demo
from engine.errors import InputError
from engine.store import EVENT_TYPES, ORDER_EVENT, REFUND_EVENT, Store, open_store

TZ = ZoneInfo("Asia/Shanghai")
MIDNIGHT = parse_timestamp("2024-06-01", TZ)
AFTERNOON = parse_timestamp("2024-06-01T15:30:00", TZ)  # `end` need not be a day boundary
BIG = 20_000
# table -> (primary key, id pattern)
TABLES = {
    "customers": ("customer_id", r"\d{5}"),
    "orders": ("order_id", r"o\d{7}"),
    "refunds": ("refund_id", r"r\d{7}"),
    "events": ("event_id", r"e\d{7}"),
}
CHANNELS = {"douyin", "xiaohongshu", "offline_store", "wechat_ads", "referral", "tmall"}


def _demo(path: Path, *, customers: int, seed: int = 7, end: int = MIDNIGHT) -> list[str]:
    with open_store(path) as store:
        generate_demo(store, customers=customers, seed=seed, end=end, tz=TZ)
        return list(store.conn.iterdump())


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, DemoSummary]]:
    store = open_store(tmp_path_factory.mktemp("demo") / "big.db")
    summary = generate_demo(store, customers=BIG, seed=11, end=AFTERNOON, tz=TZ)
    yield store, summary
    store.close()


def _scalar(store: Store, sql: str, *params: object) -> int:
    return int(store.conn.execute(sql, params).fetchone()[0])


def test_same_seed_gives_identical_rows(tmp_path: Path) -> None:
    first = _demo(tmp_path / "a.db", customers=3000)
    second = _demo(tmp_path / "b.db", customers=3000)
    assert len(first) > 3000
    assert first == second


def test_different_seed_or_end_differs(tmp_path: Path) -> None:
    base = _demo(tmp_path / "a.db", customers=500)
    assert _demo(tmp_path / "b.db", customers=500, seed=8) != base
    assert _demo(tmp_path / "c.db", customers=500, end=MIDNIGHT + DAY) != base


def test_refuses_a_store_with_data(tmp_path: Path) -> None:
    with open_store(tmp_path / "demo.db") as store:
        generate_demo(store, customers=50, end=MIDNIGHT, tz=TZ)
        before = store.count("events")
        with pytest.raises(InputError, match="already has data; use a new --db file"):
            generate_demo(store, customers=50, seed=9, end=MIDNIGHT, tz=TZ)
        assert store.count("customers") == 50
        assert store.count("events") == before


def test_refuses_a_store_with_only_events(tmp_path: Path) -> None:
    with open_store(tmp_path / "demo.db") as store:
        with store.transaction() as conn:
            conn.execute("INSERT INTO events VALUES ('x1', 'c1', 'friend.added', 1, '{}')")
        with pytest.raises(InputError, match="already has data"):
            generate_demo(store, customers=10, end=MIDNIGHT, tz=TZ)
        assert store.count("customers") == 0


def test_zero_customers_writes_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path / "demo.db") as store:
        summary = generate_demo(store, customers=0, end=MIDNIGHT, tz=TZ)
        assert summary == DemoSummary(0, 0, 0, 0, MIDNIGHT, MIDNIGHT)


def test_counts_and_ids(big: tuple[Store, DemoSummary]) -> None:
    store, summary = big
    for table in TABLES:
        assert store.count(table) == getattr(summary, table)
    assert summary.customers == BIG
    assert BIG < summary.orders < 4 * BIG
    assert 0.01 * summary.orders < summary.refunds < 0.1 * summary.orders
    assert summary.events > 2 * BIG
    assert summary.end == AFTERNOON
    assert AFTERNOON - 731 * DAY <= summary.start < AFTERNOON - 700 * DAY
    assert summary.start == _scalar(store, "SELECT min(joined_at) FROM customers")
    for table, (key, pattern) in TABLES.items():
        ids = [row[0] for row in store.conn.execute(f"SELECT {key} FROM {table}")]
        assert all(re.fullmatch(pattern, i) for i in ids), table
    types = {row[0] for row in store.conn.execute("SELECT DISTINCT type FROM events")}
    assert types == set(EVENT_TYPES) - {ORDER_EVENT, REFUND_EVENT}


def test_customer_fields(big: tuple[Store, DemoSummary]) -> None:
    store, _ = big
    rows = store.conn.execute(
        "SELECT name, external_userid, owner, phone, channel, opted_out, tags, props FROM customers"
    ).fetchall()
    phones = [row[3] for row in rows if row[3] is not None]
    assert 0.7 * BIG < len(phones) < BIG
    assert all(re.fullmatch(r"1[3-9]\d{9}", phone) for phone in phones)
    friends = [row for row in rows if row[1] is not None]
    assert 0.75 * BIG < len(friends) < BIG
    assert all(row[1].startswith("wm") and len(row[1]) >= 20 for row in friends)
    assert len({row[2] for row in friends}) >= 5 and all(row[2] for row in friends)
    assert {row[4] for row in rows} == CHANNELS
    assert 0.01 * BIG < sum(row[5] for row in rows) < 0.06 * BIG
    assert all(2 <= len(row[0]) <= 3 for row in rows)
    tags = {tag for row in rows for tag in json.loads(row[6])}
    assert {"vip", "kol", "new", "student"} <= tags
    assert all({"city", "gender"} <= json.loads(row[7]).keys() for row in rows)


def test_every_lifecycle_bucket_is_populated(big: tuple[Store, DemoSummary]) -> None:
    store, _ = big
    rows = store.conn.execute(
        """
        SELECT CASE
                 WHEN last IS NULL THEN 'prospect'
                 WHEN (:end - last) / 86400 <= 30 THEN 'active'
                 WHEN (:end - last) / 86400 <= 90 THEN 'silent'
                 WHEN (:end - last) / 86400 <= 180 THEN 'sleeping'
                 ELSE 'churned'
               END AS bucket, count(*)
        FROM (SELECT c.customer_id, max(o.ts) AS last
              FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id
              GROUP BY c.customer_id)
        GROUP BY bucket
        """,
        {"end": AFTERNOON},
    ).fetchall()
    buckets = dict(rows)
    assert set(buckets) == {"prospect", "active", "silent", "sleeping", "churned"}
    assert all(count >= 2000 for count in buckets.values()), buckets


def test_repeat_purchases_decay_and_loyal_customers_exist(big: tuple[Store, DemoSummary]) -> None:
    store, _ = big
    per_customer = dict(
        store.conn.execute(
            "SELECT n, count(*) FROM (SELECT count(*) AS n FROM orders GROUP BY customer_id) "
            "GROUP BY n"
        ).fetchall()
    )
    five_plus = sum(count for n, count in per_customer.items() if n >= 5)
    assert per_customer[1] > per_customer[2] > per_customer[3] > per_customer[4] > 0
    assert five_plus > 0 and max(per_customer) >= 15
    loyal = _scalar(
        store,
        "SELECT count(*) FROM (SELECT customer_id, sum(amount_cents) AS spend FROM orders "
        "GROUP BY customer_id) AS s WHERE spend - coalesce((SELECT sum(amount_cents) FROM "
        "refunds r WHERE r.customer_id = s.customer_id), 0) >= 200000",
    )
    assert loyal >= 100
    buyers = _scalar(store, "SELECT count(DISTINCT customer_id) FROM orders")
    multi = _scalar(
        store,
        "SELECT count(*) FROM (SELECT customer_id FROM orders GROUP BY customer_id "
        "HAVING count(DISTINCT category) > 1)",
    )
    assert multi > 0.1 * buyers
    low, high = store.conn.execute(
        "SELECT min(amount_cents), max(amount_cents) FROM orders"
    ).fetchone()
    assert low >= 2_000 and high <= 299_900


def test_all_timestamps_before_end_and_after_joining(big: tuple[Store, DemoSummary]) -> None:
    store, summary = big
    columns = {"customers": "joined_at", "orders": "ts", "refunds": "ts", "events": "ts"}
    for table, column in columns.items():
        assert _scalar(store, f"SELECT max({column}) FROM {table}") < AFTERNOON, table
        assert _scalar(store, f"SELECT min({column}) FROM {table}") >= summary.start, table
    for table in ("orders", "events"):
        early = _scalar(
            store,
            f"SELECT count(*) FROM {table} t JOIN customers c USING (customer_id) "
            "WHERE t.ts < c.joined_at",
        )
        assert early == 0, table


def test_refunds_match_their_orders(big: tuple[Store, DemoSummary]) -> None:
    store, _ = big
    bad = _scalar(
        store,
        "SELECT count(*) FROM refunds r LEFT JOIN orders o ON o.order_id = r.order_id "
        "WHERE o.order_id IS NULL OR o.customer_id != r.customer_id "
        "OR r.amount_cents > o.amount_cents OR r.amount_cents <= 0 OR r.ts <= o.ts",
    )
    assert bad == 0
    partial = _scalar(
        store,
        "SELECT count(*) FROM refunds r JOIN orders o USING (order_id) "
        "WHERE r.amount_cents < o.amount_cents",
    )
    assert 0 < partial < store.count("refunds")


def test_event_props(big: tuple[Store, DemoSummary]) -> None:
    store, _ = big
    referrals = store.conn.execute(
        "SELECT e.customer_id, e.props, c.customer_id FROM events e "
        "LEFT JOIN customers c ON c.customer_id = json_extract(e.props, '$.referred_customer_id') "
        "WHERE e.type = 'referral.made'"
    ).fetchall()
    assert referrals and all(row[2] is not None and row[0] < row[2] for row in referrals)
    groups = store.conn.execute(
        "SELECT count(DISTINCT customer_id) FROM events WHERE type = 'group.joined' "
        "AND json_extract(props, '$.group') IS NOT NULL"
    ).fetchone()[0]
    assert 0.3 * BIG < groups < 0.5 * BIG
    for kind, key in (("balance.topped_up", "amount"), ("coupon.redeemed", "order_id")):
        missing = _scalar(
            store,
            "SELECT count(*) FROM events WHERE type = ? AND json_extract(props, ?) IS NULL",
            kind,
            f"$.{key}",
        )
        assert missing == 0, kind
