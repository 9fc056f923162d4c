"""Customer features as of any moment, computed set-based inside SQLite.

`build_features` materialises one row per customer who existed at the as-of moment into
a temporary table; every value uses only facts strictly before that moment, so features
as of T never change when later events arrive. No per-customer Python loop: a few
set-based SQL statements (see the stages below).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.catalog import source_fields, source_table
from engine.clock import DAY, utc_offset
from engine.conditions import compile_to_sql, fields_used, parse_condition
from engine.settings import CustomFeature, Settings
from engine.store import Store

FEATURE_TABLE = "features"
KEPT_STAGES = ("o", "r")  # kept beside a full build for point builds (see FeatureTable)
MAX_WORKERS = 4
PARALLEL_MIN_ORDERS = 200_000  # below this, starting workers costs more than it saves
WORKER_CACHE_KIB = 128 * 1024
# A customer loaded with a WeCom external_userid has been a friend since joined_at.
_FRIEND_FROM = (
    "(CASE WHEN c.external_userid IS NOT NULL AND coalesce(c.joined_at, 0) < {T} "
    "THEN coalesce(c.joined_at, 0) END)"
)
_PLACEHOLDER = re.compile(r"\?")

# The build runs in stages so that nothing wide is ever sorted: per-customer aggregates of
# each source go into narrow tables keyed by customer, RFM thresholds come from those, and
# one final pass over customers joins it all into the features table.
# A refund counts against the window of the order it refunds (its own time if unknown).
_REFUNDS_SQL = """
INSERT INTO {into}"{t}__r"
SELECT {key_f}, sum(f.amount_cents),
       sum(CASE WHEN coalesce(po.ts, f.ts) >= {t90} THEN f.amount_cents ELSE 0 END)
{from_refunds}
"""
# Each column of the order totals (the `o` stage's columns, in order). Net spend folds in
# the refunds (looked up once per customer) so that later stages read one narrow table. A
# point build computes only the columns its features need (`_FEATURE_PARTS`); the others
# are NULL.
_ORDER_PARTS = {
    "n": "count(*)",
    "spend": """sum(orders.amount_cents) - coalesce((SELECT refunded FROM {into}"{t}__r" x
                                            WHERE x.customer_id = {key_o}), 0)""",
    "spend90": """sum(CASE WHEN orders.ts >= {t90} THEN orders.amount_cents ELSE 0 END)
         - coalesce((SELECT refunded90 FROM {into}"{t}__r" x
                     WHERE x.customer_id = {key_o}), 0)""",
    "first_ts": "min(orders.ts)",
    "last_ts": "max(orders.ts)",
    "days": "{today} - (max(orders.ts) + :off) / 86400",
    "days_first": "{today} - (min(orders.ts) + :off) / 86400",
    "cats": "count(DISTINCT orders.category)",
    "n30": "sum(orders.ts >= {t30})",
}
# Orders: one sequential scan and a sort by customer beats walking the (customer, ts) index
# and fetching every row from the table at random.
_ORDERS_SQL = """
INSERT INTO {into}"{t}__o"
SELECT {key_o}, {columns}
{from_orders}
"""


def _order_columns(parts: dict[str, str], wanted: AbstractSet[str] | None = None) -> str:
    """The `o` stage's columns: those `wanted` (default all) computed, the others NULL."""
    return ",\n       ".join(
        expr if wanted is None or part in wanted else "NULL" for part, expr in parts.items()
    )


# Events: the (customer, type, ts) index covers the query, so no sort at all.
_EVENTS_SQL = """
INSERT INTO {into}"{t}__e"
SELECT {key_e},
       max(CASE WHEN ev.type = 'friend.added' THEN ev.ts END),
       max(CASE WHEN ev.type = 'friend.deleted' THEN ev.ts END),
       sum(ev.type = 'group.joined') - sum(ev.type = 'group.left')
{from_events}
"""
# Orders of points before a base build (as of :bt, stages kept): the base's totals less
# the orders in [p.t, :bt); the 90/30-day windows move from ending at :bt to ending at p.t
# (less what is after p.t, plus what is in [p.t - w, :bt - w)); categories less those
# first bought after p.t. Only the orders between a point and the base are read: once,
# into `__a` (points with later orders), which the categories and the totals both use.
_POINT_LATER = """
INSERT INTO temp."{t}__a"
SELECT p.key, p.customer_id, count(*), sum(o.amount_cents),
       sum(CASE WHEN o.ts >= max(p.t90, :bt90) THEN o.amount_cents ELSE 0 END),
       sum(o.ts >= max(p.t30, :bt30))
FROM temp."{t}__p" p JOIN orders o INDEXED BY orders_customer_ts
  ON o.customer_id = p.customer_id AND o.ts >= p.t AND o.ts < :bt
GROUP BY p.customer_id, p.key
"""
# Each column of the points' order totals (as `_ORDER_PARTS`): the base's value less what
# is between the point and the base.
_POINT_ORDER_PARTS = {
    "n": "b.n - coalesce(a.n, 0)",
    "spend": """b.spend + coalesce(br.refunded, 0) - coalesce(a.gross, 0)
         - coalesce((SELECT refunded FROM {into}"{t}__r" x WHERE x.customer_id = p.key), 0)""",
    "spend90": """b.spend90 + coalesce(br.refunded90, 0) - coalesce(a.gross90, 0)
         + coalesce((SELECT sum(o.amount_cents) FROM orders o INDEXED BY orders_customer_ts
                     WHERE o.customer_id = p.customer_id AND o.ts >= p.t90
                       AND o.ts < min(p.t, :bt90)), 0)
         - coalesce((SELECT refunded90 FROM {into}"{t}__r" x WHERE x.customer_id = p.key), 0)""",
    "first_ts": "b.first_ts",
    "last_ts": """CASE WHEN coalesce(a.n, 0) = 0 THEN b.last_ts
            ELSE (SELECT max(o.ts) FROM orders o INDEXED BY orders_customer_ts
                  WHERE o.customer_id = p.customer_id AND o.ts < p.t) END""",
    "days": """p.today - (CASE WHEN coalesce(a.n, 0) = 0 THEN b.last_ts
            ELSE (SELECT max(o.ts) FROM orders o INDEXED BY orders_customer_ts
                  WHERE o.customer_id = p.customer_id AND o.ts < p.t) END + :off) / 86400""",
    "days_first": "p.today - (b.first_ts + :off) / 86400",
    "cats": """b.cats - CASE WHEN coalesce(a.n, 0) = 0 THEN 0
                     ELSE (SELECT count(*) FROM temp."{t}__c" c
                           WHERE c.customer_id = p.customer_id AND c.first_ts >= p.t)
                END""",
    "n30": """b.n30 - coalesce(a.n30, 0)
         + coalesce((SELECT count(*) FROM orders o INDEXED BY orders_customer_ts
                     WHERE o.customer_id = p.customer_id AND o.ts >= p.t30
                       AND o.ts < min(p.t, :bt30)), 0)""",
}
_POINT_ORDERS = """
INSERT INTO {into}"{t}__o"
SELECT p.key, {columns}
FROM temp."{t}__p" p
JOIN temp."{{b}}__o" b ON b.customer_id = p.customer_id
LEFT JOIN temp."{{b}}__r" br ON br.customer_id = p.customer_id
LEFT JOIN temp."{t}__a" a ON a.key = p.key
WHERE b.n - coalesce(a.n, 0) > 0
"""
# What each computed feature reads in a point build: columns of the order totals above,
# and "e" for the friend and group events. Refunds are read for the spends, the
# categories for `cats`, the later orders (`__a`) for any order total.
_FEATURE_PARTS: dict[str, frozenset[str]] = {
    name: frozenset(parts.split())
    for name, parts in {
        "order_count": "n",
        "total_spend": "n spend",
        "first_order_at": "n first_ts",
        "last_order_at": "n last_ts",
        "days_since_last_order": "n days",
        "days_since_first_order": "n days_first",
        "avg_order_value": "n spend",
        "distinct_categories": "n cats",
        "orders_last_30d": "n n30",
        "spend_last_90d": "n spend90",
        "is_friend": "e",
        "in_group": "e",
        "aipl_stage": "n spend e",
        "lifecycle": "n days",
        "rfm_r": "n days",
        "rfm_f": "n",
        "rfm_m": "n spend",
        "rfm_segment": "n spend days",
    }.items()
}
# The customer's own columns: every build has them (deciding and exporting read them).
CUSTOMER_COLUMNS = (
    "customer_id",
    "name",
    "external_userid",
    "owner",
    "phone",
    "channel",
    "joined_at",
    "opted_out",
    "tags",
)
_SOURCES = "'friend.added', 'friend.deleted', 'group.joined', 'group.left'"
# Categories a point's customer first bought after the point (and before the base) are
# taken off the base's count: each category's first order, for the customers with orders
# after their point — one grouped read, instead of a count(DISTINCT) per point.
_POINT_CATEGORIES = """
INSERT INTO temp."{t}__c"
SELECT o.customer_id, o.category, min(o.ts)
FROM orders o INDEXED BY orders_customer_ts
WHERE o.customer_id IN (SELECT customer_id FROM temp."{t}__a")
  AND o.ts < :bt AND o.category IS NOT NULL
GROUP BY o.customer_id, o.category
"""
# The points' own tables: the points, their later orders, their customers' categories.
_POINT_TABLES = {
    "p": "key TEXT NOT NULL UNIQUE, customer_id TEXT NOT NULL, t INTEGER, t30 INTEGER, "
    "t90 INTEGER, today INTEGER, PRIMARY KEY (customer_id, key)",
    "a": "key TEXT PRIMARY KEY, customer_id TEXT, n INTEGER, gross INTEGER, "
    "gross90 INTEGER, n30 INTEGER",
    "c": "customer_id TEXT, category TEXT, first_ts INTEGER, PRIMARY KEY (customer_id, category)",
}
# How each stage reads its source: for everyone as of one moment (grouped by customer), or
# for a list of points (a customer as of their own moment, e.g. right after an event).
_FROM_ALL = {
    "key_f": "f.customer_id",
    "key_o": "orders.customer_id",
    "key_e": "ev.customer_id",
    "from_refunds": "FROM {src}refunds AS f LEFT JOIN {src}orders AS po "
    "ON po.order_id = f.order_id WHERE f.ts < :t{range_f} "
    "GROUP BY f.customer_id",
    "from_orders": "FROM {src}orders AS orders NOT INDEXED WHERE orders.ts < :t{range_o} "
    "GROUP BY orders.customer_id",
    "from_events": "FROM {src}events AS ev INDEXED BY events_customer_type_ts "
    f"WHERE ev.ts < :t AND ev.type IN ({_SOURCES}){{range_e}} "
    "GROUP BY ev.customer_id",
    "t90": ":t90",
    "t30": ":t30",
    "today": ":today",
}
_FROM_POINTS = {
    "key_f": "p.key",
    "key_o": "p.key",
    "key_e": "p.key",
    "from_refunds": 'FROM temp."{t}__p" p JOIN refunds AS f ON f.customer_id = p.customer_id '
    "AND f.ts < p.t LEFT JOIN orders AS po ON po.order_id = f.order_id "
    "GROUP BY p.customer_id, p.key",
    "from_orders": 'FROM temp."{t}__p" p JOIN orders AS orders INDEXED BY orders_customer_ts '
    "ON orders.customer_id = p.customer_id AND orders.ts < p.t GROUP BY p.customer_id, p.key",
    "from_events": 'FROM temp."{t}__p" p JOIN events AS ev INDEXED BY events_customer_type_ts '
    f"ON ev.customer_id = p.customer_id AND ev.type IN ({_SOURCES}) "
    "AND ev.ts < p.t GROUP BY p.customer_id, p.key",
    "t90": "p.t90",
    "t30": "p.t30",
    "today": "p.today",
}
_STAGES = {
    "r": "customer_id TEXT PRIMARY KEY, refunded INTEGER, refunded90 INTEGER",
    "o": "customer_id TEXT PRIMARY KEY, n INTEGER, spend INTEGER, spend90 INTEGER, "
    "first_ts INTEGER, last_ts INTEGER, days INTEGER, days_first INTEGER, cats INTEGER, "
    "n30 INTEGER",
    "e": "customer_id TEXT PRIMARY KEY, friend_added INTEGER, friend_deleted INTEGER, "
    "groups INTEGER",
}
# RFM scores are 1 + floor(5 * (buyers ranked strictly below) / buyers): equal values share
# a score, the lowest scores 1 and the top fifth 5. That is a step function of the value,
# so four thresholds per measure decide it (see `_thresholds`). R and F have few distinct
# values: one small histogram gives both. M's thresholds are read off an index of spends.
_RF_HISTOGRAM_SQL = 'SELECT days, n, count(*) FROM temp."{t}__o" GROUP BY 1, 2'
_M_INDEX_SQL = 'CREATE INDEX temp."{t}__o_spend" ON "{t}__o" (spend)'
_M_MEAN_SQL = 'SELECT avg(spend) FROM temp."{t}__o"'
_M_QUANTILE_SQL = 'SELECT spend FROM temp."{t}__o" ORDER BY spend LIMIT 1 OFFSET ?'
_SCORE = (
    "CASE WHEN o.n > 0 THEN 1 + ({v} {op} :{m}1) + ({v} {op} :{m}2) + ({v} {op} :{m}3) + "
    "({v} {op} :{m}4) END"
)
_FEATURES_SQL = """{custom_ctes}
SELECT {point_key}c.customer_id, c.name, c.external_userid, c.owner, c.phone, c.channel,
       c.joined_at, c.opted_out, c.tags,
       coalesce(o.n, 0) AS order_count,
       coalesce(o.spend, 0) / 100.0 AS total_spend,
       o.first_ts AS first_order_at,
       o.last_ts AS last_order_at,
       o.days AS days_since_last_order,
       o.days_first AS days_since_first_order,
       CASE WHEN o.n > 0 THEN round(o.spend / 100.0 / o.n, 2) END AS avg_order_value,
       coalesce(o.cats, 0) AS distinct_categories,
       coalesce(o.n30, 0) AS orders_last_30d,
       coalesce(o.spend90, 0) / 100.0 AS spend_last_90d,
       CASE WHEN coalesce(max(e.friend_added, {friend_from}), e.friend_added, {friend_from})
                 > coalesce(e.friend_deleted, -1)
            THEN 1 ELSE 0 END AS is_friend,
       CASE WHEN coalesce(e.groups, 0) > 0 THEN 1 ELSE 0 END AS in_group{custom_columns},
       CASE WHEN o.n > 0 AND o.spend >= :loyal_cents THEN 'L'
            WHEN o.n > 0 THEN 'P'
            WHEN coalesce(e.groups, 0) > 0 THEN 'I'
            WHEN coalesce(max(e.friend_added, {friend_from}), e.friend_added, {friend_from})
                 > coalesce(e.friend_deleted, -1) THEN 'A' END AS aipl_stage,
       CASE WHEN o.n IS NULL THEN 'prospect'
            WHEN o.days <= :active THEN 'active'
            WHEN o.days <= :silent THEN 'silent'
            WHEN o.days <= :sleeping THEN 'sleeping'
            ELSE 'churned' END AS lifecycle,
       {score_r} AS rfm_r,
       {score_f} AS rfm_f,
       {score_m} AS rfm_m,
       CASE WHEN o.n > 0 THEN
         CASE WHEN o.spend >= :mean_m THEN 'important_' ELSE 'general_' END ||
         CASE (o.days <= :mean_r) * 2 + (o.n >= :mean_f)
              WHEN 3 THEN 'value' WHEN 2 THEN 'develop' WHEN 1 THEN 'retain' ELSE 'winback' END
       END AS rfm_segment
FROM {from_customers}
LEFT JOIN temp."{t}__o" o ON o.customer_id = {key}
LEFT JOIN temp."{t}__e" e ON e.customer_id = {key}{custom_joins}
WHERE c.joined_at < {T}
   OR (c.joined_at IS NULL AND c.auto_created = 0)
   OR {has_orders}
   OR EXISTS (SELECT 1 FROM events x WHERE x.customer_id = c.customer_id AND x.ts < {T})
   OR EXISTS (SELECT 1 FROM refunds x WHERE x.customer_id = c.customer_id AND x.ts < {T})
"""


@dataclass(frozen=True)
class RfmThresholds:
    """The buyers' means and RFM score thresholds a build used (see `_rfm_parameters`)."""

    values: dict[str, Any]


@dataclass(frozen=True)
class FeatureTable:
    """A materialised features table: which table, as of when, how many customers."""

    table: str
    as_of: int
    rows: int
    rfm: RfmThresholds
    # Whether the per-customer stage tables ({table}__o, __r) are kept beside it: point
    # builds before `as_of` then read them and only the orders since (see `_POINT_ORDERS`).
    stages: bool = False
    # The database it is in: the connection's temp tables, or an attached one (a
    # simulation's step built ahead: `engine.lookahead`).
    schema: str = "temp"

    @property
    def ref(self) -> str:
        """The table's schema-qualified name, for SQL."""
        return f'{self.schema}."{self.table}"'


def _parameters(settings: Settings, as_of: int) -> dict[str, Any]:
    offset = utc_offset(as_of, settings.tz)
    return {
        "t": as_of,
        "t30": as_of - 30 * DAY,
        "t90": as_of - 90 * DAY,
        "off": offset,
        "today": (as_of + offset) // DAY,
        "loyal_cents": round(settings.loyal_spend * 100),
        "active": settings.active_days,
        "silent": settings.silent_days,
        "sleeping": settings.sleeping_days,
    }


def features_query(
    settings: Settings,
    as_of: int,
    table: str = FEATURE_TABLE,
    points: bool = False,
    needs: frozenset[str] | None = None,
    orders_read: bool = True,
) -> tuple[str, dict[str, Any]]:
    """The final statement of the build (and its parameters, less the buyers' statistics).

    With `points`, the statement reads a points table (`{table}__p`: key, customer, and
    the moment) instead of every customer at `as_of`, and keys its rows by `point_key`.
    With `needs`, the rows have the customer's own columns and those features only.
    `orders_read=False`: the order totals were skipped (a point build whose features read
    none), so whether the customer had ordered by the moment is read from the orders.
    """
    params = _parameters(settings, as_of)
    moment = "p.t" if points else ":t"
    key = "p.key" if points else "c.customer_id"
    ctes, columns, joins = [], [], []
    for index, feature in enumerate(settings.custom_features):
        if needs is not None and feature.name not in needs:
            continue
        alias = f"cf{index}"
        cte_sql, cte_params = _custom_feature_cte(feature, alias, settings, table, points)
        params.update(cte_params)
        ctes.append(f"{alias} AS (\n{cte_sql}\n)")
        default = "0" if feature.aggregate in ("count", "sum") else "NULL"
        columns.append(f',\n       coalesce({alias}.v, {default}) AS "{feature.name}"')
        joins.append(f"\nLEFT JOIN {alias} ON {alias}.customer_id = {key}")
    sql = _FEATURES_SQL.format(
        t=table,
        T=moment,
        key=key,
        point_key="p.key AS point_key, " if points else "",
        from_customers=(
            f'temp."{table}__p" p JOIN customers c ON c.customer_id = p.customer_id'
            if points
            else "customers c"
        ),
        friend_from=_FRIEND_FROM.format(T=moment),
        score_r=_SCORE.format(v="o.days", op="<", m="r"),
        score_f=_SCORE.format(v="o.n", op=">", m="f"),
        score_m=_SCORE.format(v="o.spend", op=">", m="m"),
        custom_ctes=f"WITH {', '.join(ctes)}" if ctes else "",
        custom_columns="".join(columns),
        custom_joins="".join(joins),
        has_orders="o.customer_id IS NOT NULL"
        if orders_read
        else f"EXISTS (SELECT 1 FROM orders x WHERE x.customer_id = c.customer_id "
        f"AND x.ts < {moment})",
    )
    if needs is not None:
        kept = [*(["point_key"] if points else []), *CUSTOMER_COLUMNS]
        kept += sorted(needs - set(CUSTOMER_COLUMNS))
        names = ", ".join(f'"{name}"' for name in kept)
        sql = f"SELECT {names} FROM ({sql})"
    return sql, params


def point_parts(settings: Settings, needs: frozenset[str] | None) -> frozenset[str] | None:
    """The parts of a point build that features `needs` read (see `_FEATURE_PARTS`), or
    None for all of them: when `needs` is None or names a feature this module does not know."""
    if needs is None:
        return None
    custom = {f.name for f in settings.custom_features}
    parts: set[str] = set()
    for name in needs:
        if name in _FEATURE_PARTS:
            parts |= _FEATURE_PARTS[name]
        elif name not in custom and name not in CUSTOMER_COLUMNS:
            return None
    return frozenset(parts)


def _custom_feature_cte(
    feature: CustomFeature, alias: str, settings: Settings, table: str, points: bool
) -> tuple[str, dict[str, Any]]:
    source = source_table(feature.source)
    condition = None
    names: set[str] = set()
    if feature.where:
        condition = parse_condition(feature.where)
        names = set(fields_used(condition))
    fields = source_fields(feature.source, names | ({feature.field} if feature.field else set()))
    moment = "p.t" if points else ":t"
    where = [f"s.ts < {moment}"]
    params: dict[str, Any] = {}
    if source == "events":
        where.append(f"s.type = :{alias}_type")
        params[f"{alias}_type"] = feature.source
    if feature.within_seconds is not None:
        where.append(f"s.ts >= {moment} - :{alias}_within")
        params[f"{alias}_within"] = feature.within_seconds
    if condition is not None:
        cond_sql, cond_params = compile_to_sql(condition, fields, settings.tz)
        counter = iter(range(len(cond_params)))
        cond_sql = _PLACEHOLDER.sub(lambda _: f":{alias}_p{next(counter)}", cond_sql)
        params.update({f"{alias}_p{i}": value for i, value in enumerate(cond_params)})
        where.append(f"({cond_sql})")
    if feature.aggregate == "count":
        value = "count(*)"
    else:
        assert feature.field is not None
        expr = fields[feature.field].expr
        value = expr if feature.aggregate == "last" else f"{feature.aggregate}({expr})"
    extra = ", max(s.ts) AS latest" if feature.aggregate == "last" else ""
    if points:
        sql = (
            f'  SELECT p.key AS customer_id, {value} AS v{extra}\n  FROM temp."{table}__p" p '
            f"JOIN {source} s ON s.customer_id = p.customer_id\n"
            f"  WHERE {' AND '.join(where)}\n  GROUP BY p.customer_id, p.key"
        )
    else:
        sql = (
            f"  SELECT s.customer_id, {value} AS v{extra}\n  FROM {source} s\n"
            f"  WHERE {' AND '.join(where)}\n  GROUP BY s.customer_id"
        )
    return sql, params


def build_features(
    store: Store,
    settings: Settings,
    as_of: int,
    *,
    table: str = FEATURE_TABLE,
    schema: str = "temp",
) -> FeatureTable:
    """Materialise every customer's features as of `as_of` into the table `table` of
    `schema` (the connection's temp tables, or an attached database)."""
    conn = store.conn
    sql, params = features_query(settings, as_of, table)
    _drop(conn, table)
    _create_stages(conn, table)
    ranges = _customer_ranges(store)
    if len(ranges) > 1:
        _aggregate_in_parallel(store, table, params, ranges)
    else:
        _aggregate(conn, table, params, into="temp.", src="", bounds=(None, None))
    return _materialise(conn, table, schema, as_of, sql, params)


def _materialise(
    conn: sqlite3.Connection, t: str, schema: str, as_of: int, sql: str, params: dict[str, Any]
) -> FeatureTable:
    """From the stage tables: the RFM thresholds, then `schema`.`t` (replaced if there),
    indexed by customer; the stages the point builds read are kept."""
    thresholds = RfmThresholds(_rfm_parameters(conn, t, params))
    params.update(thresholds.values)
    conn.execute(f'DROP TABLE IF EXISTS {schema}."{t}"')
    conn.execute(f'CREATE TABLE {schema}."{t}" AS {sql}', params)
    conn.execute(f'CREATE UNIQUE INDEX {schema}."{t}_customer" ON "{t}" (customer_id)')
    _drop_stages(conn, t, keep=KEPT_STAGES)
    rows = conn.execute(f'SELECT count(*) FROM {schema}."{t}"').fetchone()[0]
    return FeatureTable(
        table=t, as_of=as_of, rows=int(rows), rfm=thresholds, stages=True, schema=schema
    )


@dataclass(frozen=True)
class PointsQuery:
    """Points read by SQL inside the store: `sql` selects (key, customer_id, moment)."""

    sql: str
    params: dict[str, Any]


def build_point_features(
    store: Store,
    settings: Settings,
    points: Sequence[tuple[str, str, int]] | PointsQuery,
    rfm: RfmThresholds,
    *,
    table: str,
    base: FeatureTable | None = None,
    needs: frozenset[str] | None = None,
) -> FeatureTable:
    """Features of customers each as of their own moment: `points` are (key, customer, as_of).

    The same statements as `build_features`, reading a points table instead of every
    customer, so an event's customer is judged as of right after that event. RFM scores
    use the population's thresholds `rfm` (from a full build). Rows carry `point_key`.

    With `base` (a full build with its stages, as of no earlier than every point), each
    point's order totals are the base's less the orders between the point and the base,
    instead of every order before the point: the events of a run are the latest, and the
    customers behind them are the ones with long histories.

    `points` may be a `PointsQuery`: the points then never leave SQLite.

    With `needs` (feature names), the rows have the customer's own columns and those
    features only, and only what they read is computed: a rule on an order that asks for
    `order_count` does not pay for spends, categories or refunds.
    """
    conn = store.conn
    if isinstance(points, PointsQuery):
        (latest,) = conn.execute(
            f"SELECT max(moment) FROM ({points.sql})", points.params
        ).fetchone()
        as_of = int(latest or 0)
    else:
        as_of = max((moment for _, _, moment in points), default=0)
    parts = point_parts(settings, needs)
    wanted = set(_POINT_ORDER_PARTS) | {"e"} if parts is None else parts
    orders = wanted & set(_POINT_ORDER_PARTS)
    sql, params = features_query(
        settings, as_of, table, points=True, needs=needs, orders_read=bool(orders)
    )
    _drop(conn, table)
    _create_stages(conn, table)
    for name, columns in _POINT_TABLES.items():
        conn.execute(f'CREATE TEMP TABLE "{table}__{name}" ({columns}) WITHOUT ROWID')
    offset = params["off"]
    # In key order: appended to the table's b-tree rather than inserted all over it.
    if isinstance(points, PointsQuery):
        conn.execute(
            f'INSERT INTO temp."{table}__p" SELECT key, customer_id, moment, '
            f"moment - {30 * DAY}, moment - {90 * DAY}, (moment + :off__) / {DAY} "
            f"FROM ({points.sql}) ORDER BY key",
            {**points.params, "off__": offset},
        )
    else:
        conn.executemany(
            f'INSERT INTO temp."{table}__p" VALUES (?, ?, ?, ?, ?, ?)',
            (
                (key, customer, t, t - 30 * DAY, t - 90 * DAY, (t + offset) // DAY)
                for key, customer, t in sorted(points)
            ),
        )
    usable = base is not None and base.stages and as_of <= base.as_of
    statements = []
    if orders:
        if usable:
            statements.append(_POINT_LATER)
            if "cats" in orders:
                statements.append(_POINT_CATEGORIES)
        if orders & {"spend", "spend90"}:
            statements.append(_REFUNDS_SQL)
        template, order_parts = (
            (_POINT_ORDERS, _POINT_ORDER_PARTS) if usable else (_ORDERS_SQL, _ORDER_PARTS)
        )
        statements.append(template.replace("{columns}", _order_columns(order_parts, orders)))
    if "e" in wanted:
        statements.append(_EVENTS_SQL)
    for statement in statements:
        conn.execute(
            statement.format(t=table, into="temp.", **_FROM_POINTS).format(
                t=table, b=base.table if base is not None else ""
            ),
            {**params, **_base_parameters(base)},
        )
    params.update(rfm.values)
    conn.execute(f'CREATE TEMP TABLE "{table}" AS {sql}', params)
    conn.execute(f'CREATE UNIQUE INDEX temp."{table}_point" ON "{table}" (point_key)')
    _drop_stages(conn, table)
    for name in _POINT_TABLES:
        conn.execute(f'DROP TABLE temp."{table}__{name}"')
    rows = conn.execute(f'SELECT count(*) FROM temp."{table}"').fetchone()[0]
    return FeatureTable(table=table, as_of=as_of, rows=int(rows), rfm=rfm)


def _create_stages(conn: sqlite3.Connection, table: str, kind: str = "TEMP TABLE") -> None:
    for stage, columns in _STAGES.items():
        conn.execute(f'CREATE {kind} "{table}__{stage}" ({columns}) WITHOUT ROWID')


def _drop_stages(conn: sqlite3.Connection, table: str, keep: tuple[str, ...] = ()) -> None:
    for stage in _STAGES:
        if stage not in keep:
            conn.execute(f'DROP TABLE temp."{table}__{stage}"')


def _base_parameters(base: FeatureTable | None) -> dict[str, Any]:
    if base is None:
        return {}
    return {"bt": base.as_of, "bt30": base.as_of - 30 * DAY, "bt90": base.as_of - 90 * DAY}


Bounds = tuple[str | None, str | None]


def _aggregate(
    conn: sqlite3.Connection,
    table: str,
    params: dict[str, Any],
    *,
    into: str,
    src: str,
    bounds: Bounds,
) -> None:
    """Run the per-source stages for the customers within `bounds` (lo inclusive)."""
    lo, hi = bounds
    clauses = ([" AND {c} >= :lo"] if lo is not None else []) + (
        [" AND {c} < :hi"] if hi is not None else []
    )
    ranges = {
        f"range_{k}": "".join(clauses).format(c=column)
        for k, column in (
            ("f", "f.customer_id"),
            ("o", "orders.customer_id"),
            ("e", "ev.customer_id"),
        )
    }
    orders = _ORDERS_SQL.replace("{columns}", _order_columns(_ORDER_PARTS))
    for statement in (_REFUNDS_SQL, orders, _EVENTS_SQL):
        sql = statement.format(t=table, into=into, **_FROM_ALL)
        conn.execute(sql.format(src=src, **ranges), {**params, "lo": lo, "hi": hi})


def _customer_ranges(store: Store) -> list[Bounds]:
    """Split customers into one id range per core when the store is big enough to gain.

    Parallel stages read the committed store through their own connections, so a build
    inside an open transaction (which may hold uncommitted facts) stays on this one.
    """
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    conn = store.conn
    if workers < 2 or conn.in_transaction or store.path == ":memory:":
        return [(None, None)]
    orders = conn.execute("SELECT max(rowid) FROM orders").fetchone()[0] or 0
    if orders < PARALLEL_MIN_ORDERS:
        return [(None, None)]
    customers = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    cuts = [
        conn.execute(
            "SELECT customer_id FROM customers ORDER BY customer_id LIMIT 1 OFFSET ?",
            (customers * k // workers,),
        ).fetchone()[0]
        for k in range(1, workers)
    ]
    edges: list[str | None] = [None, *cuts, None]
    return list(itertools.pairwise(edges))


def _aggregate_in_parallel(
    store: Store, table: str, params: dict[str, Any], ranges: list[Bounds]
) -> None:
    """Each worker aggregates one customer range into its own scratch file; then merge.

    SQLite runs one statement on one core; the sort behind the orders aggregate is most of
    the build, and sorting k ranges at once on k cores divides it. Ranges are disjoint and
    ordered, so the merged stage tables are appended in key order.
    """
    source = f"{Path(store.path).resolve().as_uri()}?mode=ro"
    with tempfile.TemporaryDirectory(prefix="playbook-features-") as scratch:
        files = [Path(scratch) / f"part{i}.db" for i in range(len(ranges))]
        errors: list[BaseException] = []

        def work(path: Path, bounds: Bounds) -> None:
            try:
                worker = sqlite3.connect(path, isolation_level=None, uri=True)
                try:
                    worker.execute("PRAGMA journal_mode = OFF")
                    worker.execute("PRAGMA synchronous = OFF")
                    worker.execute(f"PRAGMA cache_size = -{WORKER_CACHE_KIB}")
                    worker.execute("ATTACH DATABASE ? AS src", (source,))
                    _create_stages(worker, table, kind="TABLE")
                    _aggregate(worker, table, params, into="", src="src.", bounds=bounds)
                finally:
                    worker.close()
            except BaseException as exc:  # re-raised in the calling thread below
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=(f, b)) for f, b in zip(files, ranges, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        conn = store.conn
        for i, path in enumerate(files):
            conn.execute(f"ATTACH DATABASE ? AS part{i}", (f"{path.as_uri()}?mode=ro",))
        try:
            for stage in _STAGES:
                union = " UNION ALL ".join(
                    f'SELECT * FROM part{i}."{table}__{stage}"' for i in range(len(files))
                )
                conn.execute(f'INSERT INTO temp."{table}__{stage}" {union}')
        finally:
            for i in range(len(files)):
                conn.execute(f"DETACH DATABASE part{i}")


def _cuts(buyers: int) -> list[int]:
    """1-based positions in ascending order whose values are the four score thresholds."""
    return [-(-k * buyers // 5) for k in range(1, 5)]  # ceil(k * buyers / 5)


def _thresholds(histogram: dict[int, int], buyers: int, descending: bool) -> list[int]:
    """Score k+1 needs a value beyond the k-th threshold (see the comment on _SCORE)."""
    values = sorted(histogram, reverse=descending)
    out: list[int] = []
    seen, cuts = 0, iter(_cuts(buyers))
    cut: int | None = next(cuts)
    for value in values:
        seen += histogram[value]
        while cut is not None and seen >= cut:
            out.append(value)
            cut = next(cuts, None)
    return out


def _rfm_parameters(conn: Any, table: str, params: dict[str, Any]) -> dict[str, Any]:
    """Buyers' means and score thresholds, from a histogram and one sort: no wide work."""
    days: dict[int, int] = {}
    counts: dict[int, int] = {}
    for day, n, customers in conn.execute(_RF_HISTOGRAM_SQL.format(t=table), params):
        days[day] = days.get(day, 0) + customers
        counts[n] = counts.get(n, 0) + customers
    buyers = sum(days.values())
    out: dict[str, Any] = {f"{m}{k}": None for m in "rfm" for k in range(1, 5)}
    out.update(mean_r=None, mean_f=None, mean_m=None)
    if not buyers:
        return out
    out["mean_r"] = sum(d * c for d, c in days.items()) / buyers
    out["mean_f"] = sum(n * c for n, c in counts.items()) / buyers
    for k, value in enumerate(_thresholds(days, buyers, descending=True), 1):
        out[f"r{k}"] = value
    for k, value in enumerate(_thresholds(counts, buyers, descending=False), 1):
        out[f"f{k}"] = value
    conn.execute(_M_INDEX_SQL.format(t=table))
    (out["mean_m"],) = conn.execute(_M_MEAN_SQL.format(t=table)).fetchone()
    for k, cut in enumerate(_cuts(buyers), 1):
        (out[f"m{k}"],) = conn.execute(_M_QUANTILE_SQL.format(t=table), (cut - 1,)).fetchone()
    return out


def _drop(conn: Any, table: str) -> None:
    conn.execute(f'DROP TABLE IF EXISTS temp."{table}"')
    for stage in (*_STAGES, *_POINT_TABLES):
        conn.execute(f'DROP TABLE IF EXISTS temp."{table}__{stage}"')


def iter_features(
    store: Store, features: FeatureTable, customer: str | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of a built features table, ordered by customer id, values as Python types."""
    sql = f'SELECT * FROM temp."{features.table}"'
    args: tuple[Any, ...] = ()
    if customer is not None:
        sql += " WHERE customer_id = ?"
        args = (customer,)
    yield from decode_rows(store.conn.execute(sql + " ORDER BY customer_id", args))


FLAGS = ("opted_out", "is_friend", "in_group")  # stored as 0/1, read as booleans


def decode_value(name: str, value: Any) -> Any:
    """A features column's value as Python reads it: tags a list, flags booleans."""
    if name == "tags":
        return json.loads(value) if value else []
    if name in FLAGS:
        return bool(value)
    return value


def decode_rows(cursor: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    """Rows of a query over a features table as dicts: tags a list, flags booleans."""
    names = [d[0] for d in cursor.description]
    for row in cursor:
        yield {name: decode_value(name, value) for name, value in zip(names, row, strict=True)}


def compute_features(
    store: Store, settings: Settings, as_of: int, customer: str | None = None
) -> list[dict[str, Any]]:
    """Every customer's features as of `as_of` (or one customer's), as dicts."""
    table = build_features(store, settings, as_of)
    return list(iter_features(store, table, customer))


# -- stepping through time -----------------------------------------------------------------

# Running totals a FeatureStepper carries from one moment to the next, and the rolling
# windows it slides: each step reads only the facts that entered (or left) them since.
_STEP_TABLES = {
    "cum_o": "customer_id TEXT PRIMARY KEY, n INTEGER, gross INTEGER, first_ts INTEGER, "
    "last_ts INTEGER, cats INTEGER",
    "cum_c": "customer_id TEXT, category TEXT, PRIMARY KEY (customer_id, category)",
    "new_c": "customer_id TEXT, category TEXT, PRIMARY KEY (customer_id, category)",
    "cum_e": "customer_id TEXT PRIMARY KEY, friend_added INTEGER, friend_deleted INTEGER, "
    "groups INTEGER",
    "win": "customer_id TEXT PRIMARY KEY, gross90 INTEGER, n30 INTEGER",
    # Refunds so far, by the time that places them in the 90-day window (`eff`: their
    # order's, else their own); per customer, all of them and those in the window.
    "rf": "eff INTEGER, refund_id TEXT, customer_id TEXT, amount INTEGER, ts INTEGER, "
    "PRIMARY KEY (eff, refund_id)",
    "cum_r": "customer_id TEXT PRIMARY KEY, refunded INTEGER",
    "win_r": "customer_id TEXT PRIMARY KEY, refunded90 INTEGER",
}
_UPSERT_ORDERS = """
INSERT INTO temp."{t}__cum_o"
SELECT customer_id, count(*), sum(amount_cents), min(ts), max(ts), 0 FROM orders {hint}
WHERE ts >= :lo AND ts < :hi GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET n = n + excluded.n, gross = gross + excluded.gross,
  first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)
"""
# A customer's distinct categories: the pairs not seen before are counted in.
_UPSERT_CATEGORIES = """
INSERT INTO temp."{t}__new_c"
SELECT DISTINCT customer_id, category FROM orders {hint}
WHERE ts >= :lo AND ts < :hi AND category IS NOT NULL AND NOT EXISTS (
  SELECT 1 FROM temp."{t}__cum_c" k
  WHERE k.customer_id = orders.customer_id AND k.category = orders.category);
INSERT INTO temp."{t}__cum_c" SELECT * FROM temp."{t}__new_c";
UPDATE temp."{t}__cum_o" AS o SET cats = o.cats + x.n
FROM (SELECT customer_id, count(*) AS n FROM temp."{t}__new_c" GROUP BY customer_id) AS x
WHERE o.customer_id = x.customer_id;
DELETE FROM temp."{t}__new_c"
"""
_UPSERT_EVENTS = f"""
INSERT INTO temp."{{t}}__cum_e"
SELECT customer_id, max(CASE WHEN type = 'friend.added' THEN ts END),
       max(CASE WHEN type = 'friend.deleted' THEN ts END),
       sum(type = 'group.joined') - sum(type = 'group.left')
FROM events WHERE type IN ({_SOURCES}) AND ts >= :lo AND ts < :hi GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET
  friend_added = coalesce(max(friend_added, excluded.friend_added), friend_added,
                          excluded.friend_added),
  friend_deleted = coalesce(max(friend_deleted, excluded.friend_deleted), friend_deleted,
                            excluded.friend_deleted),
  groups = groups + excluded.groups
"""
# Refunds recorded in [lo, hi), read once from the store; then the 90-day window moves from
# ending at lo to ending at hi: in come the new ones placed within it, out go the older
# ones it has passed.
_UPSERT_REFUNDS = f"""
INSERT INTO temp."{{t}}__rf"
SELECT coalesce(po.ts, f.ts), f.refund_id, f.customer_id, f.amount_cents, f.ts
FROM refunds f LEFT JOIN orders po ON po.order_id = f.order_id
WHERE f.ts >= :lo AND f.ts < :hi;
INSERT INTO temp."{{t}}__cum_r"
SELECT customer_id, sum(amount) FROM temp."{{t}}__rf" WHERE ts >= :lo AND ts < :hi
GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET refunded = refunded + excluded.refunded;
INSERT INTO temp."{{t}}__win_r"
SELECT customer_id, sum(amount) FROM temp."{{t}}__rf"
WHERE eff >= :hi - {90 * DAY} AND ts >= :lo AND ts < :hi GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET refunded90 = refunded90 + excluded.refunded90;
INSERT INTO temp."{{t}}__win_r"
SELECT customer_id, -sum(amount) FROM temp."{{t}}__rf"
WHERE eff >= :lo - {90 * DAY} AND eff < :hi - {90 * DAY} AND ts < :lo GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET refunded90 = refunded90 + excluded.refunded90
"""
# Orders entering (sign +1) or leaving (-1) the 90-day (spend) or 30-day (count) window.
_SLIDE_WINDOW = """
INSERT INTO temp."{t}__win"
SELECT customer_id, {spend}, {count} FROM orders WHERE ts >= :lo AND ts < :hi
GROUP BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET gross90 = gross90 + excluded.gross90,
  n30 = n30 + excluded.n30
"""
_WINDOWS = (
    (90 * DAY, {"spend": ":sign * sum(amount_cents)", "count": "0"}),
    (30 * DAY, {"spend": "0", "count": ":sign * count(*)"}),
)
# The stages `build_features` makes, from the running totals.
_STEP_STAGES = """
INSERT INTO temp."{t}__r"
SELECT c.customer_id, c.refunded, coalesce(w.refunded90, 0)
FROM temp."{t}__cum_r" c LEFT JOIN temp."{t}__win_r" w USING (customer_id);
INSERT INTO temp."{t}__o"
SELECT o.customer_id, o.n, o.gross - coalesce(r.refunded, 0),
       coalesce(w.gross90, 0) - coalesce(r.refunded90, 0), o.first_ts, o.last_ts,
       :today - (o.last_ts + :off) / 86400, :today - (o.first_ts + :off) / 86400,
       o.cats, coalesce(w.n30, 0)
FROM temp."{t}__cum_o" o LEFT JOIN temp."{t}__win" w USING (customer_id)
LEFT JOIN temp."{t}__r" r USING (customer_id);
INSERT INTO temp."{t}__e" SELECT * FROM temp."{t}__cum_e";
"""


class FeatureStepper:
    """Features at a rising sequence of moments, each step reading only what changed.

    `advance(t)` gives exactly what `build_features(store, settings, t)` gives (tested),
    but instead of aggregating every order since the beginning it keeps running totals
    per customer (orders, spend, first/last order, distinct categories, refunds, friend
    and group events) and slides the 30/90-day windows: a step reads the facts in
    [previous t, t) and those leaving the windows (the refunds, a few percent of orders,
    are found by a scan: the store has no index on their time). Custom features
    (settings) are still read whole at each step. The running totals live in temp tables
    of the store's connection.
    """

    def __init__(self, store: Store, settings: Settings, *, table: str = FEATURE_TABLE) -> None:
        self.store, self.settings, self.table = store, settings, table
        self.as_of: int | None = None
        conn = store.conn
        for name, columns in _STEP_TABLES.items():
            conn.execute(f'DROP TABLE IF EXISTS temp."{table}__{name}"')
            conn.execute(f'CREATE TEMP TABLE "{table}__{name}" ({columns}) WITHOUT ROWID')

    def advance(self, as_of: int, *, schema: str = "temp") -> FeatureTable:
        """Move to `as_of` (not before the previous moment) and build the features table,
        in `schema` (an attached database, or the connection's temp tables; a table of
        the same name there is replaced)."""
        if self.as_of is not None and as_of < self.as_of:
            raise ValueError("a FeatureStepper only moves forward in time")
        conn, t = self.store.conn, self.table
        lo = self.as_of if self.as_of is not None else -(2**62)
        # A first step reads everything: a scan beats the ts index; later steps read a slice.
        hint = "NOT INDEXED" if self.as_of is None else ""
        span = {"lo": lo, "hi": as_of}
        conn.execute(_UPSERT_ORDERS.format(t=t, hint=hint), span)
        for statement in _UPSERT_CATEGORIES.split(";"):
            conn.execute(statement.format(t=t, hint=hint), span)
        conn.execute(_UPSERT_EVENTS.format(t=t), span)
        for statement in _UPSERT_REFUNDS.split(";"):
            conn.execute(statement.format(t=t), span)
        self._slide(self.as_of, as_of)
        sql, params = features_query(self.settings, as_of, t)
        _drop(conn, t)
        _create_stages(conn, t)
        for statement in _STEP_STAGES.split(";"):
            if statement.strip():
                conn.execute(statement.format(t=t), params)
        self.as_of = as_of
        return _materialise(conn, t, schema, as_of, sql, params)

    def _slide(self, old: int | None, new: int) -> None:
        """Move the 90- and 30-day windows from ending at `old` to ending at `new`."""
        conn, t = self.store.conn, self.table
        for width, values in _WINDOWS:
            sql = _SLIDE_WINDOW.format(t=t, **values)
            if old is None:
                conn.execute(sql, {"sign": 1, "lo": new - width, "hi": new})
                continue
            # Entering: [max(old, new - w), new); leaving: [old - w, min(old, new - w)).
            conn.execute(sql, {"sign": 1, "lo": max(old, new - width), "hi": new})
            conn.execute(sql, {"sign": -1, "lo": old - width, "hi": min(old, new - width)})

    def close(self) -> None:
        """Drop the running totals and the last features table."""
        conn = self.store.conn
        for name in _STEP_TABLES:
            conn.execute(f'DROP TABLE IF EXISTS temp."{self.table}__{name}"')
