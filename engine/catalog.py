"""The field catalog: every name a condition may use, with its type and meaning.

Two catalogs live here. The customer catalog (`field_catalog`) lists the columns of the
features table — customer attributes, built-in features, model stages and the custom
features declared in settings — and is what playbook conditions resolve against. The
source catalog (`source_fields`) lists the fields of one event source (orders, refunds,
an event type) for the `where` filter and `field` of a custom feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.conditions.sql import SqlField
from engine.conditions.types import BOOL, NUMBER, STRING, STRING_LIST, TIMESTAMP, FieldType, enum
from engine.store import EVENT_TYPES, ORDER_EVENT, REFUND_EVENT

if TYPE_CHECKING:
    from engine.settings import Settings

LIFECYCLE_STAGES = ("prospect", "active", "silent", "sleeping", "churned")
AIPL_STAGES = ("A", "I", "P", "L")
RFM_SEGMENTS = (
    "important_value",
    "important_develop",
    "important_retain",
    "important_winback",
    "general_value",
    "general_develop",
    "general_retain",
    "general_winback",
)
_PROP_NAME = re.compile(r"^props\.([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class FieldInfo:
    """One name a playbook condition can use."""

    name: str
    type: FieldType
    group: str
    description: str


def _f(name: str, type_: FieldType, group: str, description: str) -> FieldInfo:
    return FieldInfo(name, type_, group, description)


BUILTIN_FIELDS: tuple[FieldInfo, ...] = (
    _f("customer_id", STRING, "customer", "The customer's id in the brand's systems."),
    _f("name", STRING, "customer", "The customer's name."),
    _f("external_userid", STRING, "customer", "WeCom external_userid (null if not a friend)."),
    _f("owner", STRING, "customer", "The staff member who owns the relationship."),
    _f("phone", STRING, "customer", "Mobile number (personal data)."),
    _f("channel", STRING, "customer", "Source channel: douyin, xiaohongshu, offline_store, ..."),
    _f("joined_at", TIMESTAMP, "customer", "When the customer joined."),
    _f("opted_out", BOOL, "customer", "The customer asked not to be contacted."),
    _f("tags", STRING_LIST, "customer", "The customer's tags."),
    _f("order_count", NUMBER, "feature", "Orders placed before the as-of moment."),
    _f("total_spend", NUMBER, "feature", "Net spend in yuan: orders minus refunds."),
    _f("first_order_at", TIMESTAMP, "feature", "Time of the first order."),
    _f("last_order_at", TIMESTAMP, "feature", "Time of the latest order."),
    _f(
        "days_since_last_order",
        NUMBER,
        "feature",
        "Calendar days from the latest order to the as-of day (store timezone).",
    ),
    _f(
        "days_since_first_order",
        NUMBER,
        "feature",
        "Calendar days from the first order to the as-of day (store timezone).",
    ),
    _f("avg_order_value", NUMBER, "feature", "Net spend per order, in yuan."),
    _f("distinct_categories", NUMBER, "feature", "Number of different categories bought."),
    _f("orders_last_30d", NUMBER, "feature", "Orders in the 30 days before the as-of moment."),
    _f(
        "spend_last_90d",
        NUMBER,
        "feature",
        "Net spend in the 90 days before the as-of moment, in yuan: orders placed in "
        "the window minus what was refunded on them.",
    ),
    _f("is_friend", BOOL, "feature", "Is a WeChat/WeCom friend of a staff member."),
    _f("in_group", BOOL, "feature", "Is in at least one community group."),
    _f(
        "aipl_stage",
        enum(*AIPL_STAGES),
        "model",
        "Highest AIPL stage reached: A friend, I in a group, P bought, L loyal spend.",
    ),
    _f(
        "lifecycle",
        enum(*LIFECYCLE_STAGES),
        "model",
        "Purchase lifecycle: prospect (no order), active, silent, sleeping, churned.",
    ),
    _f("rfm_r", NUMBER, "model", "Recency score 1-5 among buyers (5 = most recent)."),
    _f("rfm_f", NUMBER, "model", "Frequency score 1-5 among buyers (5 = most orders)."),
    _f("rfm_m", NUMBER, "model", "Monetary score 1-5 among buyers (5 = highest spend)."),
    _f(
        "rfm_segment",
        enum(*RFM_SEGMENTS),
        "model",
        "RFM 8-class grid among buyers (each of R, F, M high or low against the mean).",
    ),
)
BUILTIN_NAMES = frozenset(f.name for f in BUILTIN_FIELDS)


def field_catalog(settings: Settings) -> dict[str, FieldInfo]:
    """Every customer-level field, built-in and custom, by name."""
    catalog = {f.name: f for f in BUILTIN_FIELDS}
    for feature in settings.custom_features:
        catalog[feature.name] = FieldInfo(feature.name, feature.type, "custom", feature.description)
    return catalog


# Fields of each event source, as SQL over that source's table (aliased `s`).
_ORDER_FIELDS: dict[str, SqlField] = {
    "order_id": SqlField("s.order_id", STRING),
    "ts": SqlField("s.ts", TIMESTAMP),
    "amount": SqlField("(s.amount_cents / 100.0)", NUMBER),
    "category": SqlField("s.category", STRING),
    "sku": SqlField("s.sku", STRING),
}
_REFUND_FIELDS: dict[str, SqlField] = {
    "refund_id": SqlField("s.refund_id", STRING),
    "order_id": SqlField("s.order_id", STRING),
    "ts": SqlField("s.ts", TIMESTAMP),
    "amount": SqlField("(s.amount_cents / 100.0)", NUMBER),
}
# Properties the store's event types are known to carry (others: props.NAME, as text).
_EVENT_PROPS: dict[str, dict[str, FieldType]] = {
    "friend.added": {"owner": STRING, "channel": STRING},
    "group.joined": {"group": STRING},
    "group.left": {"group": STRING},
    "coupon.redeemed": {"coupon": STRING, "order_id": STRING, "discount": NUMBER},
    "message.replied": {"text": STRING},
    "referral.made": {"referred_customer_id": STRING},
    "balance.topped_up": {"amount": NUMBER, "bonus": NUMBER},
    "membership.bought": {"plan": STRING, "amount": NUMBER},
}


# Each source table's key column (an event's id in the facts built from it).
SOURCE_KEYS = {"orders": "order_id", "refunds": "refund_id", "events": "event_id"}


def source_table(source: str) -> str:
    """The store table that holds `source` (orders, refunds, or an event type)."""
    if source in ("orders", ORDER_EVENT):
        return "orders"
    if source in ("refunds", REFUND_EVENT):
        return "refunds"
    if source in EVENT_TYPES:
        return "events"
    raise KeyError(source)


def source_names() -> list[str]:
    """Every name a custom feature can aggregate over."""
    return ["orders", "refunds", *(t for t in EVENT_TYPES if t not in (ORDER_EVENT, REFUND_EVENT))]


def source_fields(
    source: str, extra: set[str] | frozenset[str] = frozenset()
) -> dict[str, SqlField]:
    """The fields of one event source; `extra` names `props.NAME` fields to add as text."""
    table = source_table(source)
    if table == "orders":
        fields = dict(_ORDER_FIELDS)
    elif table == "refunds":
        fields = dict(_REFUND_FIELDS)
    else:
        fields = {"event_id": SqlField("s.event_id", STRING), "ts": SqlField("s.ts", TIMESTAMP)}
        for prop, type_ in _EVENT_PROPS.get(source, {}).items():
            fields[prop] = SqlField(f"json_extract(s.props, '$.{prop}')", type_)
    for name in extra:
        match = _PROP_NAME.match(name)
        if match:
            fields[name] = SqlField(f"json_extract(s.props, '$.{match.group(1)}')", STRING)
    return fields
