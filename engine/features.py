"""Customer features as of any moment, computed set-based inside SQLite.

`build_features` materialises one row per customer who existed at the as-of moment into
a temporary table; every value uses only facts strictly before that moment, so features
as of T never change when later events arrive. No per-customer Python loop: it is one
SQL statement of aggregates, joins and window functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.catalog import source_fields, source_table
from engine.clock import DAY, utc_offset
from engine.conditions import compile_to_sql, fields_used, parse_condition
from engine.settings import CustomFeature, Settings
from engine.store import Store

FEATURE_TABLE = "features"
# A customer loaded with a WeCom external_userid has been a friend since joined_at.
_FRIEND_FROM = (
    "(CASE WHEN c.external_userid IS NOT NULL AND coalesce(c.joined_at, 0) < :t "
    "THEN coalesce(c.joined_at, 0) END)"
)
_PLACEHOLDER = re.compile(r"\?")

# One pass over each source table; the window functions rank buyers for RFM. A score is
# 1 + floor(5 * (buyers ranked strictly below) / buyers): equal values share a score, the
# lowest value scores 1 and the top fifth scores 5 (for R, "higher" means more recent).
_FEATURES_SQL = """
WITH
o AS (
  SELECT customer_id,
         count(*) AS n,
         sum(amount_cents) AS gross,
         min(ts) AS first_ts,
         max(ts) AS last_ts,
         count(DISTINCT category) AS cats,
         sum(ts >= :t30) AS n30,
         sum(CASE WHEN ts >= :t90 THEN amount_cents ELSE 0 END) AS gross90
  FROM orders WHERE ts < :t GROUP BY customer_id
),
r AS (
  -- A refund counts against the window of the order it refunds (its own time if unknown).
  SELECT f.customer_id,
         sum(f.amount_cents) AS refunded,
         sum(CASE WHEN coalesce(po.ts, f.ts) >= :t90 THEN f.amount_cents ELSE 0 END)
           AS refunded90
  FROM refunds f LEFT JOIN orders po ON po.order_id = f.order_id
  WHERE f.ts < :t GROUP BY f.customer_id
),
e AS (
  SELECT customer_id,
         max(CASE WHEN type = 'friend.added' THEN ts END) AS friend_added,
         max(CASE WHEN type = 'friend.deleted' THEN ts END) AS friend_deleted,
         sum(type = 'group.joined') - sum(type = 'group.left') AS groups
  FROM events
  WHERE ts < :t AND type IN ('friend.added', 'friend.deleted', 'group.joined', 'group.left')
  GROUP BY customer_id
){custom_ctes},
base AS MATERIALIZED (
  SELECT c.customer_id, c.name, c.external_userid, c.owner, c.phone, c.channel, c.joined_at,
         c.opted_out, c.tags,
         coalesce(o.n, 0) AS order_count,
         coalesce(o.gross, 0) - coalesce(r.refunded, 0) AS spend_cents,
         coalesce(o.gross90, 0) - coalesce(r.refunded90, 0) AS spend90_cents,
         o.first_ts AS first_order_at,
         o.last_ts AS last_order_at,
         :today - (o.last_ts + :off) / 86400 AS days_since_last_order,
         :today - (o.first_ts + :off) / 86400 AS days_since_first_order,
         coalesce(o.cats, 0) AS distinct_categories,
         coalesce(o.n30, 0) AS orders_last_30d,
         CASE WHEN coalesce(max(e.friend_added, {friend_from}), e.friend_added, {friend_from})
                   > coalesce(e.friend_deleted, -1)
              THEN 1 ELSE 0 END AS is_friend,
         CASE WHEN coalesce(e.groups, 0) > 0 THEN 1 ELSE 0 END AS in_group{custom_columns}
  FROM customers c
  LEFT JOIN o ON o.customer_id = c.customer_id
  LEFT JOIN r ON r.customer_id = c.customer_id
  LEFT JOIN e ON e.customer_id = c.customer_id{custom_joins}
  WHERE c.joined_at < :t
     OR (c.joined_at IS NULL AND c.auto_created = 0)
     OR o.customer_id IS NOT NULL OR r.customer_id IS NOT NULL
     OR EXISTS (SELECT 1 FROM events x WHERE x.customer_id = c.customer_id AND x.ts < :t)
),
stats AS (
  SELECT count(*) AS buyers,
         avg(days_since_last_order) AS mean_r,
         avg(order_count) AS mean_f,
         avg(spend_cents) AS mean_m
  FROM base WHERE order_count > 0
)
SELECT b.customer_id, b.name, b.external_userid, b.owner, b.phone, b.channel, b.joined_at,
       b.opted_out, b.tags,
       b.order_count,
       b.spend_cents / 100.0 AS total_spend,
       b.first_order_at, b.last_order_at,
       b.days_since_last_order, b.days_since_first_order,
       CASE WHEN b.order_count > 0 THEN round(b.spend_cents / 100.0 / b.order_count, 2)
       END AS avg_order_value,
       b.distinct_categories, b.orders_last_30d,
       b.spend90_cents / 100.0 AS spend_last_90d,
       b.is_friend, b.in_group{custom_select},
       CASE WHEN b.order_count > 0 AND b.spend_cents >= :loyal_cents THEN 'L'
            WHEN b.order_count > 0 THEN 'P'
            WHEN b.in_group THEN 'I'
            WHEN b.is_friend THEN 'A' END AS aipl_stage,
       CASE WHEN b.order_count = 0 THEN 'prospect'
            WHEN b.days_since_last_order <= :active THEN 'active'
            WHEN b.days_since_last_order <= :silent THEN 'silent'
            WHEN b.days_since_last_order <= :sleeping THEN 'sleeping'
            ELSE 'churned' END AS lifecycle,
       CASE WHEN b.order_count > 0 THEN 1 + 5 * (rank() OVER (
         PARTITION BY b.order_count > 0 ORDER BY b.days_since_last_order DESC) - 1) / s.buyers
       END AS rfm_r,
       CASE WHEN b.order_count > 0 THEN 1 + 5 * (rank() OVER (
         PARTITION BY b.order_count > 0 ORDER BY b.order_count) - 1) / s.buyers
       END AS rfm_f,
       CASE WHEN b.order_count > 0 THEN 1 + 5 * (rank() OVER (
         PARTITION BY b.order_count > 0 ORDER BY b.spend_cents) - 1) / s.buyers
       END AS rfm_m,
       CASE WHEN b.order_count > 0 THEN
         CASE WHEN b.spend_cents >= s.mean_m THEN 'important_' ELSE 'general_' END ||
         CASE (b.days_since_last_order <= s.mean_r) * 2 + (b.order_count >= s.mean_f)
              WHEN 3 THEN 'value' WHEN 2 THEN 'develop' WHEN 1 THEN 'retain' ELSE 'winback' END
       END AS rfm_segment
FROM base b CROSS JOIN stats s
"""


@dataclass(frozen=True)
class FeatureTable:
    """A materialised features table: which table, as of when, how many customers."""

    table: str
    as_of: int
    rows: int


def features_query(settings: Settings, as_of: int) -> tuple[str, dict[str, Any]]:
    """The SQL (and its parameters) that computes every feature as of `as_of`."""
    tz = settings.tz
    offset = utc_offset(as_of, tz)
    params: dict[str, Any] = {
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
    ctes, columns, joins, select = [], [], [], []
    for index, feature in enumerate(settings.custom_features):
        alias = f"cf{index}"
        cte_sql, cte_params = _custom_feature_cte(feature, alias, settings)
        params.update(cte_params)
        ctes.append(f",\n{alias} AS (\n{cte_sql}\n)")
        default = "0" if feature.aggregate in ("count", "sum") else "NULL"
        columns.append(f',\n         coalesce({alias}.v, {default}) AS "{feature.name}"')
        joins.append(f"\n  LEFT JOIN {alias} ON {alias}.customer_id = c.customer_id")
        select.append(f',\n       b."{feature.name}"')
    sql = _FEATURES_SQL.format(
        friend_from=_FRIEND_FROM,
        custom_ctes="".join(ctes),
        custom_columns="".join(columns),
        custom_joins="".join(joins),
        custom_select="".join(select),
    )
    return sql, params


def _custom_feature_cte(
    feature: CustomFeature, alias: str, settings: Settings
) -> tuple[str, dict[str, Any]]:
    table = source_table(feature.source)
    condition = None
    names: set[str] = set()
    if feature.where:
        condition = parse_condition(feature.where)
        names = set(fields_used(condition))
    fields = source_fields(feature.source, names | ({feature.field} if feature.field else set()))
    where = ["s.ts < :t"]
    params: dict[str, Any] = {}
    if table == "events":
        where.append(f"s.type = :{alias}_type")
        params[f"{alias}_type"] = feature.source
    if feature.within_seconds is not None:
        where.append(f"s.ts >= :t - :{alias}_within")
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
    sql = (
        f"  SELECT s.customer_id, {value} AS v{extra}\n  FROM {table} s\n"
        f"  WHERE {' AND '.join(where)}\n  GROUP BY s.customer_id"
    )
    return sql, params


def build_features(
    store: Store, settings: Settings, as_of: int, *, table: str = FEATURE_TABLE
) -> FeatureTable:
    """Materialise features as of `as_of` into the temporary table `table`."""
    sql, params = features_query(settings, as_of)
    conn = store.conn
    conn.execute(f'DROP TABLE IF EXISTS temp."{table}"')
    conn.execute(f'CREATE TEMP TABLE "{table}" AS {sql}', params)
    conn.execute(f'CREATE UNIQUE INDEX temp."{table}_customer" ON "{table}" (customer_id)')
    rows = conn.execute(f'SELECT count(*) FROM temp."{table}"').fetchone()[0]
    return FeatureTable(table=table, as_of=as_of, rows=int(rows))


def iter_features(
    store: Store, features: FeatureTable, customer: str | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of a built features table, ordered by customer id, values as Python types."""
    sql = f'SELECT * FROM temp."{features.table}"'
    args: tuple[Any, ...] = ()
    if customer is not None:
        sql += " WHERE customer_id = ?"
        args = (customer,)
    cursor = store.conn.execute(sql + " ORDER BY customer_id", args)
    names = [d[0] for d in cursor.description]
    for row in cursor:
        record = dict(zip(names, row, strict=True))
        record["tags"] = json.loads(record["tags"]) if record["tags"] else []
        record["opted_out"] = bool(record["opted_out"])
        record["is_friend"] = bool(record["is_friend"])
        record["in_group"] = bool(record["in_group"])
        yield record


def compute_features(
    store: Store, settings: Settings, as_of: int, customer: str | None = None
) -> list[dict[str, Any]]:
    """Every customer's features as of `as_of` (or one customer's), as dicts."""
    table = build_features(store, settings, as_of)
    return list(iter_features(store, table, customer))
