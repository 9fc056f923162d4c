"""Features as of a moment, on a small dataset whose every value was computed by hand.

As of 2024-06-01 00:00 Asia/Shanghai; six buyers with days since last order 30, 91, 90,
180, 181 and 1 (mean 95.5), order counts 2,1,1,1,1,1 (mean 7/6) and net spend 400, 2100,
50, 600, 1000, 80 (mean 705).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.clock import parse_as_of
from engine.features import compute_features
from engine.settings import Settings
from engine.store import Store, open_store
from tests.conftest import SHANGHAI, add_fact, load_small_dataset

AS_OF = parse_as_of("2024-06-01", SHANGHAI)


@pytest.fixture
def features(store: Store, tmp_path: Path) -> dict[str, dict[str, Any]]:
    load_small_dataset(store, tmp_path)
    return {row["customer_id"]: row for row in compute_features(store, Settings(), AS_OF)}


def test_only_customers_who_existed_at_the_moment(features: dict[str, dict[str, Any]]) -> None:
    # 00005 joined after the as-of day; 00009 was auto-created by an order after it.
    assert sorted(features) == ["00001", "00002", "00003", "00004", "00006", "00007", "00008"]


EXPECTED = {
    #        order_count total_spend days lifecycle aipl friend group categories
    "00001": (2, 400.0, 30, "active", "P", True, True, 2),
    "00002": (1, 2100.0, 91, "sleeping", "L", True, False, 1),
    "00003": (1, 50.0, 90, "silent", "P", True, False, 1),
    "00004": (1, 600.0, 180, "sleeping", "P", True, False, 1),
    "00006": (0, 0.0, None, "prospect", "I", False, True, 0),
    "00007": (1, 1000.0, 181, "churned", "P", False, False, 1),
    "00008": (1, 80.0, 1, "active", "P", False, False, 1),
}


@pytest.mark.parametrize("customer", sorted(EXPECTED))
def test_hand_computed_features(features: dict[str, dict[str, Any]], customer: str) -> None:
    row = features[customer]
    got = (
        row["order_count"],
        row["total_spend"],
        row["days_since_last_order"],
        row["lifecycle"],
        row["aipl_stage"],
        row["is_friend"],
        row["in_group"],
        row["distinct_categories"],
    )
    assert got == EXPECTED[customer]


RFM = {
    # rfm_r, rfm_f, rfm_m, segment
    "00001": (4, 5, 2, "general_value"),
    "00002": (2, 1, 5, "important_develop"),
    "00003": (3, 1, 1, "general_develop"),
    "00004": (1, 1, 3, "general_winback"),
    "00006": (None, None, None, None),
    "00007": (1, 1, 4, "important_winback"),
    "00008": (5, 1, 1, "general_develop"),
}


@pytest.mark.parametrize("customer", sorted(RFM))
def test_rfm_scores_and_segments(features: dict[str, dict[str, Any]], customer: str) -> None:
    row = features[customer]
    assert (row["rfm_r"], row["rfm_f"], row["rfm_m"], row["rfm_segment"]) == RFM[customer]


def test_windows_and_averages(features: dict[str, dict[str, Any]]) -> None:
    first = features["00001"]
    assert first["orders_last_30d"] == 1  # 2024-05-02 10:00 is inside the 30 days
    assert first["spend_last_90d"] == 100.0
    assert first["avg_order_value"] == 200.0
    assert first["days_since_first_order"] == 183
    assert first["tags"] == ["kol", "vip"]
    refunded = features["00002"]
    # The refund (inside the window) is of an order placed 91 days ago (outside it).
    assert refunded["spend_last_90d"] == 0.0
    assert refunded["avg_order_value"] == 2100.0
    assert features["00006"]["avg_order_value"] is None
    assert features["00003"]["opted_out"] is True


def test_day_boundaries_in_the_store_timezone(features: dict[str, dict[str, Any]]) -> None:
    # o8 at 23:30 the evening before counts, 1 calendar day ago; o5 exactly at the as-of
    # moment does not count.
    assert features["00008"]["days_since_last_order"] == 1
    assert features["00003"]["order_count"] == 1


def test_a_moment_later_sees_later_orders(store: Store, tmp_path: Path) -> None:
    load_small_dataset(store, tmp_path)
    later = parse_as_of("2024-06-02", SHANGHAI)
    rows = {r["customer_id"]: r for r in compute_features(store, Settings(), later)}
    assert rows["00003"]["order_count"] == 2
    assert rows["00003"]["days_since_last_order"] == 1
    assert rows["00003"]["lifecycle"] == "active"


def test_thresholds_come_from_settings(store: Store, tmp_path: Path) -> None:
    load_small_dataset(store, tmp_path)
    strict = Settings(loyal_spend=500, active_days=10, silent_days=30, sleeping_days=90)
    rows = {r["customer_id"]: r for r in compute_features(store, strict, AS_OF)}
    assert rows["00001"]["lifecycle"] == "silent"
    assert rows["00003"]["lifecycle"] == "sleeping"
    assert rows["00002"]["lifecycle"] == "churned"
    assert rows["00004"]["aipl_stage"] == "L"


def test_one_customer(store: Store, tmp_path: Path) -> None:
    load_small_dataset(store, tmp_path)
    rows = compute_features(store, Settings(), AS_OF, customer="00002")
    assert [r["customer_id"] for r in rows] == ["00002"]
    assert rows[0]["rfm_segment"] == "important_develop"  # ranked among all buyers


_later = st.tuples(
    st.sampled_from(["00001", "00002", "00006", "00010", "00011"]),
    st.integers(min_value=0, max_value=400 * 86_400),  # seconds after the as-of moment
    st.decimals(min_value=0, max_value=5000, places=2),
    st.sampled_from(["orders", "refunds", "group.joined", "group.left", "friend.deleted"]),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(later=st.lists(_later, min_size=1, max_size=12))
def test_events_after_the_moment_never_change_features(
    tmp_path_factory: pytest.TempPathFactory, later: list[tuple[str, int, Any, str]]
) -> None:
    folder = tmp_path_factory.mktemp("pit")
    with open_store(folder / "s.db") as store:
        load_small_dataset(store, folder)
        before = compute_features(store, Settings(), AS_OF)
        with store.transaction() as conn:
            for i, (customer, delta, amount, kind) in enumerate(later):
                ts = AS_OF + delta
                cents = int(amount * 100)
                conn.execute(
                    "INSERT OR IGNORE INTO customers (customer_id, auto_created) VALUES (?, 1)",
                    (customer,),
                )
                add_fact(conn, f"late{i}", customer, kind, ts, cents)
        assert compute_features(store, Settings(), AS_OF) == before


# Eight buyers, one per RFM class, plus a friend who never bought (A) and a stranger (no
# stage). Means: 105 days, 2 orders, ¥550; "high" is at or better than the mean.
GRID = {
    # customer: (days since last order, orders, net spend in yuan, expected class)
    "b1": (10, 3, 1000, "important_value"),
    "b2": (10, 1, 1000, "important_develop"),
    "b3": (200, 3, 1000, "important_retain"),
    "b4": (200, 1, 1000, "important_winback"),
    "b5": (10, 3, 100, "general_value"),
    "b6": (10, 1, 100, "general_develop"),
    "b7": (200, 3, 100, "general_retain"),
    "b8": (200, 1, 100, "general_winback"),
}


@pytest.fixture
def grid(store: Store) -> dict[str, dict[str, Any]]:
    day = 86_400
    with store.transaction() as conn:
        for customer, (days, orders, spend, _) in GRID.items():
            conn.execute(
                "INSERT INTO customers (customer_id, joined_at) VALUES (?, 0)", (customer,)
            )
            amounts = [spend * 100 - (orders - 1) * spend * 30] + [spend * 30] * (orders - 1)
            for n, cents in enumerate(amounts):
                # The first amount is the latest order; earlier ones are a week apart.
                ts = AS_OF - days * day - n * 7 * day + 3600
                conn.execute(
                    "INSERT INTO orders VALUES (?, ?, ?, ?, 'c', 's', NULL)",
                    (f"{customer}-{n}", customer, ts, cents),
                )
        conn.execute(
            "INSERT INTO customers (customer_id, external_userid, joined_at) "
            "VALUES ('friend', 'wm1', 0), ('stranger', NULL, 0)"
        )
    return {r["customer_id"]: r for r in compute_features(store, Settings(), AS_OF)}


@pytest.mark.parametrize("customer", sorted(GRID))
def test_every_rfm_class(grid: dict[str, dict[str, Any]], customer: str) -> None:
    days, orders, spend, expected = GRID[customer]
    row = grid[customer]
    assert (row["days_since_last_order"], row["order_count"], row["total_spend"]) == (
        days,
        orders,
        spend,
    )
    assert row["rfm_segment"] == expected
    # Four buyers share each value: the lower four score 1, the upper four 1 + 5*4//8 = 3.
    assert row["rfm_r"] == (3 if days == 10 else 1)
    assert row["rfm_f"] == (3 if orders == 3 else 1)
    assert row["rfm_m"] == (3 if spend == 1000 else 1)


def test_aipl_awareness_and_no_stage(grid: dict[str, dict[str, Any]]) -> None:
    assert grid["friend"]["aipl_stage"] == "A"
    assert grid["stranger"]["aipl_stage"] is None
    assert grid["friend"]["lifecycle"] == "prospect"
    assert grid["friend"]["rfm_segment"] is None


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    buyers=st.lists(
        st.tuples(st.integers(1, 400), st.integers(1, 6), st.integers(1, 300_000)),
        min_size=1,
        max_size=40,
    )
)
def test_rfm_scores_follow_their_definition(
    tmp_path_factory: pytest.TempPathFactory, buyers: list[tuple[int, int, int]]
) -> None:
    """Score = 1 + floor(5 * (buyers strictly worse) / buyers), for any mix of ties."""
    day = 86_400
    with open_store(tmp_path_factory.mktemp("rfm") / "s.db") as store:
        with store.transaction() as conn:
            for i, (days, orders, cents) in enumerate(buyers):
                conn.execute(
                    "INSERT INTO customers (customer_id, joined_at) VALUES (?, 0)", (f"c{i}",)
                )
                for n in range(orders):
                    amount = cents if n == 0 else 0
                    conn.execute(
                        "INSERT INTO orders VALUES (?, ?, ?, ?, 'c', 's', NULL)",
                        (f"c{i}-{n}", f"c{i}", AS_OF - days * day - n * 60 + 3600, amount),
                    )
        rows = {r["customer_id"]: r for r in compute_features(store, Settings(), AS_OF)}
    total = len(buyers)

    def score(value: int, values: list[int], higher_is_better: bool) -> int:
        worse = sum(v < value if higher_is_better else v > value for v in values)
        return 1 + 5 * worse // total

    days = [b[0] for b in buyers]
    counts = [b[1] for b in buyers]
    spends = [b[2] for b in buyers]
    for i, (d, n, m) in enumerate(buyers):
        row = rows[f"c{i}"]
        assert (row["days_since_last_order"], row["order_count"]) == (d, n)
        assert row["rfm_r"] == score(d, days, higher_is_better=False)
        assert row["rfm_f"] == score(n, counts, higher_is_better=True)
        assert row["rfm_m"] == score(m, spends, higher_is_better=True)


def test_parallel_build_equals_the_single_connection_build(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import features as module
    from engine.demo import generate_demo

    generate_demo(store, customers=600, seed=3, end=AS_OF, tz=SHANGHAI)
    settings = Settings()
    monkeypatch.setattr(module, "PARALLEL_MIN_ORDERS", 10**12)
    single = compute_features(store, settings, AS_OF)
    monkeypatch.setattr(module, "PARALLEL_MIN_ORDERS", 0)
    monkeypatch.setattr(module.os, "cpu_count", lambda: 3)
    assert len(module._customer_ranges(store)) == 3
    assert compute_features(store, settings, AS_OF) == single
    # Inside an open transaction the build stays on the store's own connection.
    with store.transaction():
        assert module._customer_ranges(store) == [(None, None)]
        assert compute_features(store, settings, AS_OF) == single


def test_point_builds_equal_the_rows_of_full_builds(store: Store, tmp_path: Path) -> None:
    """Customers each as of their own moment == their rows in full builds at those moments."""
    from engine.demo import generate_demo
    from engine.features import PointsQuery, build_features, build_point_features, iter_features
    from engine.settings import load_settings

    generate_demo(store, customers=300, seed=5, end=AS_OF, tz=SHANGHAI)
    settings = load_settings(str(Path(__file__).parent.parent / "docs" / "settings.example.yaml"))
    moments = [AS_OF, AS_OF - 40 * 86_400 + 3_600, AS_OF - 200 * 86_400]
    full = {}
    for moment in moments:
        built = build_features(store, settings, moment, table=f"full{moment}")
        full[moment] = (built.rfm, {r["customer_id"]: r for r in iter_features(store, built)})
    for moment in moments:
        rfm, rows = full[moment]
        chosen = sorted(rows)[::7]
        points = build_point_features(
            store, settings, [(f"k{c}", c, moment) for c in chosen], rfm, table="pts"
        )
        got = {r.pop("point_key"): r for r in iter_features(store, points)}
        assert got == {f"k{c}": rows[c] for c in chosen}
        # The same points selected inside SQLite (PointsQuery) give the same rows.
        query = PointsQuery(
            "SELECT 'k' || customer_id AS key, customer_id, :m AS moment FROM customers "
            "WHERE customer_id IN (SELECT value FROM json_each(:chosen))",
            {"m": moment, "chosen": json.dumps(chosen)},
        )
        queried = build_point_features(store, settings, query, rfm, table="pts_q")
        assert {r.pop("point_key"): r for r in iter_features(store, queried)} == got


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from engine.demo import generate_demo

    folder = tmp_path_factory.mktemp("stepper")
    store = open_store(folder / "demo.db")
    generate_demo(store, customers=400, seed=11, end=AS_OF, tz=SHANGHAI)
    with store.transaction() as conn:  # refunds of orders, some with no order at all
        conn.execute(
            "INSERT INTO refunds SELECT 'rf' || order_id, order_id, customer_id, ts + 86400 * "
            "(rowid % 40), amount_cents / 2, NULL FROM orders WHERE rowid % 9 = 0"
        )
        conn.execute(
            "INSERT INTO refunds SELECT 'rx' || order_id, NULL, customer_id, ts + 3600, 100, "
            "NULL FROM orders WHERE rowid % 23 = 0"
        )
        # A customer known only from orders (as the orders ingest creates them): no join
        # date, no events; they exist from their first order on.
        conn.execute("INSERT INTO customers (customer_id, auto_created) VALUES ('zz-auto', 1)")
        conn.execute(
            "INSERT INTO orders SELECT 'za' || order_id, 'zz-auto', ts, amount_cents, "
            "category, sku, NULL FROM orders WHERE rowid % 97 = 0"
        )
    yield store
    store.close()


@settings(max_examples=15, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=120 * 86_400), min_size=1, max_size=6),
    start_days=st.integers(min_value=0, max_value=500),
)
def test_stepping_through_time_equals_full_builds(
    demo_store: Store, gaps: list[int], start_days: int
) -> None:
    """FeatureStepper at each moment == a full build at that moment, whatever the steps
    (shorter and longer than the 30/90-day windows, off day boundaries)."""
    from engine.features import FeatureStepper, build_features, iter_features
    from engine.settings import load_settings

    settings = load_settings(str(Path(__file__).parent.parent / "docs" / "settings.example.yaml"))
    stepper = FeatureStepper(demo_store, settings, table="stepped")
    moment = AS_OF - start_days * 86_400 - sum(gaps)
    try:
        for gap in [0, *gaps]:
            moment += gap
            stepped = stepper.advance(moment)
            full = build_features(demo_store, settings, moment, table="whole")
            assert stepped.rfm == full.rfm
            assert list(iter_features(demo_store, stepped)) == list(iter_features(demo_store, full))
    finally:
        stepper.close()


def test_stepping_counts_refunds_and_categories_at_the_edges(tmp_path: Path) -> None:
    """Refunds recorded exactly at a step, refunds of orders leaving the 90-day window
    exactly at a step (and of orders from before the window), categories seen again:
    each step equals a full build."""
    from engine.features import FeatureStepper, build_features, iter_features

    day = 86_400
    t0 = AS_OF - 200 * day
    with open_store(tmp_path / "edges.db") as store:
        conn = store.conn
        conn.execute("INSERT INTO customers (customer_id, joined_at) VALUES ('a', ?)", (t0,))
        conn.execute("INSERT INTO customers (customer_id, joined_at) VALUES ('b', ?)", (t0,))
        moments = [t0 + 10 * day * k for k in range(1, 16)]
        rows = [
            ("o1", "a", moments[0], 10_000, "skincare"),
            ("o2", "a", moments[2] - 1, 20_000, "skincare"),
            ("o3", "a", moments[3], 30_000, "makeup"),
            ("o4", "b", moments[1], 5_000, None),
            ("o5", "b", moments[4], 7_000, "makeup"),
        ]
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, 's', NULL)", rows)
        refunds = [
            ("r1", "o1", "a", moments[2], 4_000),  # at a step; its order leaves at +90d
            ("r2", "o2", "a", moments[9], 1_000),  # after its order left the window
            ("r3", None, "b", moments[5] - 1, 500),  # no order: placed at its own time
            ("r4", "o5", "b", moments[4] + 90 * day - moments[4] % day, 700),
        ]
        conn.executemany("INSERT INTO refunds VALUES (?, ?, ?, ?, ?, NULL)", refunds)
        # A moment exactly 90 days after an order: its refund leaves the window then.
        moments = sorted({*moments, moments[0] + 90 * day, moments[4] + 90 * day})
        stepper = FeatureStepper(store, Settings(), table="stepped")
        try:
            for moment in moments:
                stepped = list(iter_features(store, stepper.advance(moment)))
                full = build_features(store, Settings(), moment, table="whole")
                assert stepped == list(iter_features(store, full)), moment
        finally:
            stepper.close()


def test_a_stepper_does_not_go_back(demo_store: Store) -> None:
    from engine.features import FeatureStepper

    stepper = FeatureStepper(demo_store, Settings(), table="stepped")
    stepper.advance(AS_OF)
    with pytest.raises(ValueError, match="forward"):
        stepper.advance(AS_OF - 1)
    stepper.close()


@settings(max_examples=12, deadline=None)
@given(
    offsets=st.lists(
        st.integers(min_value=0, max_value=200 * 86_400), min_size=1, max_size=4, unique=True
    ),
    base_days=st.integers(min_value=0, max_value=300),
    stepped=st.booleans(),
)
def test_point_builds_from_a_base_equal_full_builds(
    demo_store: Store, offsets: list[int], base_days: int, stepped: bool
) -> None:
    """Points before a base build (its totals less what came after) == full builds at the
    points' moments, for moments inside and beyond the 30/90-day windows."""
    from engine.features import FeatureStepper, build_features, build_point_features
    from engine.features import iter_features as rows_of
    from engine.settings import load_settings

    settings = load_settings(str(Path(__file__).parent.parent / "docs" / "settings.example.yaml"))
    base_moment = AS_OF - base_days * 86_400
    stepper = FeatureStepper(demo_store, settings, table="stepbase") if stepped else None
    if stepper is not None:
        stepper.advance(base_moment - 45 * 86_400)
        base = stepper.advance(base_moment)
    else:
        base = build_features(demo_store, settings, base_moment, table="base")
    assert base.stages
    try:
        for offset in offsets:
            moment = base_moment - offset
            full = build_features(demo_store, settings, moment, table="at")
            rows = {r["customer_id"]: r for r in rows_of(demo_store, full)}
            chosen = sorted(rows)[::5]
            points = build_point_features(
                demo_store,
                settings,
                [(f"k{c}", c, moment) for c in chosen],
                full.rfm,
                table="pts",
                base=base,
            )
            got = {r.pop("point_key"): r for r in rows_of(demo_store, points)}
            assert got == {f"k{c}": rows[c] for c in chosen}
    finally:
        if stepper is not None:
            stepper.close()


def _feature_names(settings: Any) -> list[str]:
    from engine.features import _FEATURE_PARTS

    return sorted(_FEATURE_PARTS) + [f.name for f in settings.custom_features]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), with_base=st.booleans())
def test_point_builds_of_some_features_equal_those_columns_of_whole_builds(
    demo_store: Store, data: st.DataObject, with_base: bool
) -> None:
    """A point build asked for some features only (`needs`): the customer's own columns and
    exactly those features, each equal to the whole build's — with or without a base."""
    from engine.features import CUSTOMER_COLUMNS, build_features, build_point_features
    from engine.features import iter_features as rows_of
    from engine.settings import load_settings

    settings_ = load_settings(str(Path(__file__).parent.parent / "docs" / "settings.example.yaml"))
    names = _feature_names(settings_)
    assert settings_.custom_features  # the example settings declare some: they are covered
    needs = frozenset(data.draw(st.lists(st.sampled_from(names), max_size=6)))
    moment = AS_OF - data.draw(st.integers(min_value=0, max_value=200)) * 86_400
    base = build_features(demo_store, settings_, AS_OF, table="base") if with_base else None
    full = build_features(demo_store, settings_, moment, table="at")
    chosen = sorted(r["customer_id"] for r in rows_of(demo_store, full))[::4]
    points = [(f"k{c}", c, moment) for c in {*chosen, "zz-auto"}]
    whole = build_point_features(demo_store, settings_, points, full.rfm, table="pts", base=base)
    some = build_point_features(
        demo_store, settings_, points, full.rfm, table="pts_some", base=base, needs=needs
    )
    kept = {"point_key", *CUSTOMER_COLUMNS, *needs}
    expected = {
        r["point_key"]: {k: v for k, v in r.items() if k in kept}
        for r in rows_of(demo_store, whole)
    }
    got = {r["point_key"]: r for r in rows_of(demo_store, some)}
    assert got == expected
    assert all(set(r) == kept for r in got.values())


def test_a_point_build_needing_an_unknown_feature_computes_everything() -> None:
    from engine.features import _FEATURE_PARTS, _POINT_ORDER_PARTS, point_parts

    settings_ = Settings()
    assert point_parts(settings_, None) is None
    assert point_parts(settings_, frozenset({"order_count", "some_future_feature"})) is None
    assert point_parts(settings_, frozenset({"order_count", "tags"})) == {"n"}
    everything = frozenset().union(*_FEATURE_PARTS.values())
    assert everything == {*_POINT_ORDER_PARTS, "e"}
