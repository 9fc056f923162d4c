"""The operators' health report: AIPL funnel, lifecycle mix, RFM grid, seed health checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.catalog import AIPL_STAGES, LIFECYCLE_STAGES, RFM_SEGMENTS
from engine.features import FeatureTable, build_features
from engine.render import percent
from engine.settings import Settings
from engine.store import Store

# Targets from the seed articles (../shared/DOMAIN.md, "What operators measure").
MULTI_CATEGORY_TARGET = 10.0
REPURCHASE_TARGET = 30.0


@dataclass(frozen=True)
class FunnelStage:
    """Customers who reached an AIPL stage (or higher), and conversion from the one before."""

    stage: str
    reached: int
    current: int
    conversion_pct: float | None


@dataclass(frozen=True)
class Share:
    """A count and its share of a whole."""

    name: str
    customers: int
    share_pct: float | None
    revenue_share_pct: float | None = None


@dataclass(frozen=True)
class HealthCheck:
    """One of the seed articles' health checks, with its target."""

    name: str
    value_pct: float | None
    target: str
    ok: bool | None


@dataclass(frozen=True)
class Report:
    """Everything `playbook report` shows."""

    as_of: int
    customers: int
    buyers: int
    revenue: float
    funnel: list[FunnelStage]
    lifecycle: list[Share]
    rfm: list[Share]
    health: list[HealthCheck]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return asdict(self)


def build_report(store: Store, settings: Settings, as_of: int) -> Report:
    """Compute the report from features as of `as_of`."""
    features = build_features(store, settings, as_of)
    conn = store.conn
    t = features.ref
    customers, buyers, revenue = conn.execute(
        f"SELECT count(*), sum(order_count > 0), coalesce(sum(CASE WHEN order_count > 0 "
        f"THEN total_spend END), 0) FROM {t}"
    ).fetchone()
    buyers = int(buyers or 0)
    current = dict(conn.execute(f"SELECT aipl_stage, count(*) FROM {t} GROUP BY 1").fetchall())
    funnel: list[FunnelStage] = []
    previous: int | None = None
    for index, stage in enumerate(AIPL_STAGES):
        reached = sum(int(current.get(s, 0)) for s in AIPL_STAGES[index:])
        conversion = percent(reached, previous) if previous is not None else None
        funnel.append(FunnelStage(stage, reached, int(current.get(stage, 0)), conversion))
        previous = reached
    lifecycle_counts = dict(conn.execute(f"SELECT lifecycle, count(*) FROM {t} GROUP BY 1"))
    lifecycle = [
        Share(s, int(lifecycle_counts.get(s, 0)), percent(lifecycle_counts.get(s, 0), customers))
        for s in LIFECYCLE_STAGES
    ]
    rfm_rows = {
        row[0]: row[1:]
        for row in conn.execute(
            f"SELECT rfm_segment, count(*), sum(total_spend) FROM {t} "
            "WHERE rfm_segment IS NOT NULL GROUP BY 1"
        )
    }
    rfm = [
        Share(
            s,
            int(rfm_rows.get(s, (0, 0))[0]),
            percent(rfm_rows.get(s, (0, 0))[0], buyers),
            percent(rfm_rows.get(s, (0, 0))[1] or 0, revenue),
        )
        for s in RFM_SEGMENTS
    ]
    return Report(
        as_of,
        int(customers),
        buyers,
        round(float(revenue), 2),
        funnel,
        lifecycle,
        rfm,
        _health(store, features, buyers, float(revenue)),
    )


def _health(store: Store, features: FeatureTable, buyers: int, revenue: float) -> list[HealthCheck]:
    conn = store.conn
    t = features.ref
    multi = conn.execute(f"SELECT count(*) FROM {t} WHERE distinct_categories > 1").fetchone()[0]
    repeat = conn.execute(f"SELECT count(*) FROM {t} WHERE order_count >= 2").fetchone()[0]
    same_item = conn.execute(
        "SELECT count(DISTINCT customer_id) FROM (SELECT customer_id FROM orders "
        "WHERE ts < ? AND sku IS NOT NULL GROUP BY customer_id, sku HAVING count(*) >= 2)",
        (features.as_of,),
    ).fetchone()[0]
    top_n = -(-buyers // 5)  # the top 20% of buyers, rounded up
    top = conn.execute(
        f"SELECT coalesce(sum(total_spend), 0) FROM (SELECT total_spend FROM {t} "
        "WHERE order_count > 0 ORDER BY total_spend DESC LIMIT ?)",
        (top_n,),
    ).fetchone()[0]

    def check(name: str, value: float | None, target: float) -> HealthCheck:
        return HealthCheck(name, value, f"> {target:g}%", None if value is None else value > target)

    return [
        check("buyers with more than one category", percent(multi, buyers), MULTI_CATEGORY_TARGET),
        check("buyers who repurchased (2+ orders)", percent(repeat, buyers), REPURCHASE_TARGET),
        check(
            "buyers who bought the same item again", percent(same_item, buyers), REPURCHASE_TARGET
        ),
        HealthCheck(
            "revenue from the top 20% of buyers",
            percent(top, revenue),
            "informational (the 80/20 rule)",
            None,
        ),
    ]
