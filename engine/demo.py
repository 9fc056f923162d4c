"""Demo data: two years of a cosmetics brand's private-domain customers, deterministically.

`generate_demo` fills an empty store with customers who join as WeCom friends, join
community groups, buy (first orders, decaying repeat purchases, a few heavy buyers),
refund, redeem coupons, reply, refer friends, top up and buy memberships — and drift
into silence and churn, so every lifecycle stage is populated as of `end`. The same
seed, `end` and timezone always give byte-identical rows.
"""

from __future__ import annotations

import json
import random
import sqlite3
from base64 import b64encode
from bisect import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from itertools import accumulate
from typing import Any, TypeVar

from engine.clock import DAY, local_day, to_epoch
from engine.errors import InputError, UsageError
from engine.store import Store

T = TypeVar("T")
Weighted = tuple[tuple[T, ...], list[float]]


def _words(text: str) -> list[str]:
    return text.split()


def _weighted(weights: Mapping[T, float]) -> Weighted[T]:
    return tuple(weights), list(accumulate(weights.values()))


def _table(spec: str) -> Weighted[str]:
    """Parse "name:weight name:weight ..." into a weighted table."""
    return _weighted({name: float(weight) for name, weight in (w.split(":") for w in _words(spec))})


def _pick(rng: random.Random, table: Weighted[T]) -> T:
    items, cum = table
    return items[bisect(cum, rng.random() * cum[-1], 0, len(items) - 1)]


SPAN_DAYS = 730  # how far before `end` the first customers join
STAFF = _words("staff_li staff_wang staff_zhang staff_liu staff_chen staff_zhao")
CHANNELS = _table("douyin:24 xiaohongshu:20 offline_store:18 wechat_ads:16 referral:10 tmall:12")
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗郑梁谢宋唐"
GIVEN = _words("静 丽 敏 婷 雪 晓燕 思雨 欣怡 子涵 雨桐 佳琪 梦瑶 伟 磊 浩然 子轩 俊杰 一鸣")
GIVEN += _words("嘉怡 诗涵 慧 娜 芳 颖 琳 晨 悦 可欣 雅琪 文博")
CITIES = _words("上海 北京 杭州 深圳 广州 成都 南京 武汉 苏州 重庆 西安 长沙")
AGE_BANDS = _table("18-24:25 25-34:45 35-44:20 45+:10")
PHONE_PREFIXES = _words("130 131 132 133 135 136 137 138 139 150 151 152 153 155 156 158 159")
PHONE_PREFIXES += _words("166 177 180 181 182 183 185 186 187 188 189 199")
GROUPS = _table("vip-club:10 new-member-welcome:30 skincare-lovers:25 flash-sale:25 makeup-tips:10")
CATEGORIES = _table("skincare:35 makeup:25 haircare:12 fragrance:8 bodycare:14 gift_set:6")
# SKU:list price in yuan, per category. Cheaper items sell more (weight 1/sqrt(price)).
_CATALOG_SPEC = """
skincare  SK-TONER-150:159 SK-SERUM-30:399 SK-CREAM-50:599 SK-MASK-5:89 SK-EYE-15:459
makeup    MU-LIP-01:139 MU-FDN-30:259 MU-PAL-12:329 MU-MASC-01:99 MU-CUSH-15:219
haircare  HC-SHAM-500:69 HC-COND-500:79 HC-OIL-100:139 HC-SCALP-60:259 HC-TRAVEL-50:39
fragrance FR-MINI-10:129 FR-EDP-50:699 FR-EDP-100:1099
bodycare  BC-LOTION-250:99 BC-SCRUB-200:129 BC-HAND-30:39 BC-OIL-100:189
gift_set  GS-NEWYEAR:599 GS-BRIDAL:1299 GS-PRESTIGE:2999
"""


def _catalog(spec: str) -> dict[str, Weighted[tuple[str, int]]]:
    catalog = {}
    for line in spec.strip().splitlines():
        category, *items = _words(line)
        skus = [(sku, int(price)) for sku, price in (item.split(":") for item in items)]
        catalog[category] = _weighted({sku: 1 / sku[1] ** 0.5 for sku in skus})
    return catalog


CATALOG = _catalog(_CATALOG_SPEC)
QUANTITY = _weighted({1: 85, 2: 12, 3: 3})
# Coupons (满X减Y): name, minimum spend, discount (yuan). The 新人券 is for first orders only.
_COUPON_SPEC = "新人券10元:59:10 满199减20:199:20 满399减50:399:50 满999减150:999:150"
COUPONS = [(n, int(lo), int(off)) for n, lo, off in (c.split(":") for c in _words(_COUPON_SPEC))]
REFUND_REASONS = _words("allergy damaged changed_mind wrong_item")
MAX_ORDER_YUAN = 2999


@dataclass(frozen=True)
class DemoSummary:
    """What `generate_demo` wrote: rows per table and the time span they cover."""

    customers: int
    orders: int
    refunds: int
    events: int
    start: int
    end: int


@dataclass
class _Order:
    ts: int
    customer_id: str
    amount_cents: int
    category: str
    sku: str
    qty: int
    coupon: tuple[str, int] | None


class _Builder:
    def __init__(self, rng: random.Random, end: int, tz: tzinfo) -> None:
        self.rng = rng
        self.end = end
        today = local_day(end, tz)
        self.midnight = [
            to_epoch(datetime.combine(today - timedelta(days=d), time()), tz)
            for d in range(SPAN_DAYS + 2)
        ]
        self.customers: list[tuple[Any, ...]] = []
        self.orders: list[_Order] = []
        self.events: list[tuple[int, str, str, str]] = []
        self.phones: set[str] = set()
        self.buyers: list[str] = []
        self.kols: list[str] = []
        self.json_cache: dict[tuple[tuple[str, Any], ...], str] = {}

    def dumps(self, props: dict[str, Any]) -> str:
        # Many props repeat ({"owner": "staff_li"}); values are str, int or None, never bool.
        key = tuple(props.items())
        text = self.json_cache.get(key)
        if text is None:
            text = self.json_cache[key] = json.dumps(
                props, ensure_ascii=False, separators=(",", ":")
            )
        return text

    def at(self, day: int, after: int = 0) -> int:
        """A waking-hours moment on the local day `day` (>= 1) days before end, after `after`."""
        ts = self.midnight[day] + 8 * 3600 + int(self.rng.random() ** 0.7 * 55_000)
        last = self.midnight[day - 1] - 1
        if ts <= after:
            ts = after + 1 + int(self.rng.random() * max(0, min(7200, last - after - 1)))
        return min(ts, last) if after < last else ts

    def event(self, ts: int, customer_id: str, kind: str, props: dict[str, Any]) -> None:
        self.events.append((ts, customer_id, kind, self.dumps(props)))

    def phone(self) -> str:
        while True:
            number = self.rng.choice(PHONE_PREFIXES) + f"{self.rng.randrange(10**8):08d}"
            if number not in self.phones:
                self.phones.add(number)
                return number

    def customer(self, customer_id: str, joined: int, join_day: int) -> None:
        rng = self.rng
        channel = _pick(rng, CHANNELS)
        if channel == "referral" and not self.buyers:
            channel = "wechat_ads"
        friend = rng.random() < (0.6 if channel == "tmall" else 0.93)
        owner = rng.choice(STAFF) if friend else None
        token = b64encode(rng.randbytes(24)).decode()[:30].replace("+", "x").replace("/", "Z")
        external = "wm" + token if friend else None
        phone = self.phone() if rng.random() < 0.85 else None
        name = rng.choice(SURNAMES) + rng.choice(GIVEN)
        opted_out = int(rng.random() < 0.03)
        age = _pick(rng, AGE_BANDS)
        gender = "F" if rng.random() < 0.82 else "M"
        props: dict[str, Any] = {"city": rng.choice(CITIES), "gender": gender, "age_band": age}
        tags: list[str] = []
        if channel == "referral":
            referrer = rng.choice(self.kols if self.kols and rng.random() < 0.4 else self.buyers)
            props["referred_by"] = referrer
            self.event(joined, referrer, "referral.made", {"referred_customer_id": customer_id})
        if friend:
            self.event(joined, customer_id, "friend.added", {"owner": owner, "channel": channel})
        if friend and rng.random() < 0.4:
            day = join_day - int(rng.expovariate(1 / 10))
            if day >= 1:
                group = _pick(rng, GROUPS)
                self.event(self.at(day, joined), customer_id, "group.joined", {"group": group})
                left_day = day - rng.randint(3, 400)
                if rng.random() < 0.2 and left_day >= 1:
                    self.event(self.at(left_day), customer_id, "group.left", {"group": group})
        orders = self.purchases(customer_id, joined, join_day)
        if orders:
            self.extras(customer_id, joined, orders, tags)
        if friend:
            self.engagement(customer_id, joined, join_day, orders, owner)
        if sum(o.amount_cents for o in orders) >= 300_000 or "member" in tags:
            tags.append("vip")
            # The brand's SCRM tags the VIPs whose birthday month it is (one in twelve);
            # chosen by id so the random stream, and everything else, stays as it was.
            if int(customer_id) % 12 == 0:
                tags.append("birthday-this-month")
        if join_day <= 30:
            tags.append("new")
        if age == "18-24" and rng.random() < 0.35:
            tags.append("student")
        row = (customer_id, name, external, owner, phone, joined, channel, opted_out)
        self.customers.append((*row, json.dumps(tags), self.dumps(props)))

    def purchases(self, customer_id: str, joined: int, join_day: int) -> list[_Order]:
        rng = self.rng
        if rng.random() >= 0.72:
            return []  # a prospect: never buys
        segment = rng.random()  # loyal / regular / occasional buyers
        if segment < 0.12:
            loyalty, gap = 0.85, rng.uniform(15, 30)
        elif segment < 0.45:
            loyalty, gap = 0.55, rng.uniform(25, 60)
        else:
            loyalty, gap = 0.25, rng.uniform(40, 110)
        favourite = _pick(rng, CATEGORIES)
        day = join_day - int(rng.expovariate(1 / 7))
        last, orders = joined, list[_Order]()
        while day >= 1:
            category = favourite if rng.random() < 0.75 else _pick(rng, CATEGORIES)
            sku, price = _pick(rng, CATALOG[category])
            qty = _pick(rng, QUANTITY)
            while qty > 1 and qty * price > MAX_ORDER_YUAN:
                qty -= 1
            yuan, coupon = qty * price, None
            usable = [c for c in COUPONS if yuan >= c[1] and (c[1] > 59 or not orders)]
            if usable and rng.random() < 0.25:
                name, _, off = rng.choice(usable)
                coupon, yuan = (name, off * 100), yuan - off
            last = self.at(day, last)
            orders.append(_Order(last, customer_id, yuan * 100, category, sku, qty, coupon))
            # Repeat with a probability that grows with each order (stickiness by the 5th).
            if rng.random() > min(0.95, loyalty + 0.03 * len(orders)):
                break
            day -= max(2, int(rng.expovariate(1 / gap)))
        self.orders.extend(orders)
        return orders

    def extras(self, customer_id: str, joined: int, orders: list[_Order], tags: list[str]) -> None:
        rng, depth = self.rng, min(len(orders), 5)
        self.buyers.append(customer_id)
        if rng.random() < 0.03 + 0.02 * depth:
            tags.append("kol")
            self.kols.append(customer_id)
        if rng.random() < 0.04 + 0.03 * depth:
            ts = min(rng.choice(orders).ts + rng.randint(60, 3600), self.end - 1)
            plan = {"plan": "annual", "amount": 199}
            self.event(ts, customer_id, "membership.bought", plan)
            tags.append("member")
        if rng.random() < 0.02 + 0.02 * depth:
            for order in rng.sample(orders, min(len(orders), rng.randint(1, 3))):
                amount = rng.choice((500, 1000, 2000, 5000)) * 100
                ts = max(order.ts - rng.randint(60, 1800), joined)
                topup = {"amount": amount // 100, "bonus": amount // 1000}
                self.event(ts, customer_id, "balance.topped_up", topup)

    def engagement(
        self, customer_id: str, joined: int, join_day: int, orders: list[_Order], owner: str | None
    ) -> None:
        rng = self.rng
        last_day = (self.end - orders[-1].ts) // DAY if orders else join_day
        quiet_from = max(1, last_day - 60)  # replies dry up two months after the last order
        if rng.random() < 0.05 and min(join_day, last_day) > 1:
            deleted_day = rng.randint(1, min(join_day, last_day) - 1)
            deleted = self.at(deleted_day, joined)
            self.event(deleted, customer_id, "friend.deleted", {"owner": owner})
            quiet_from = max(quiet_from, deleted_day + 1)
        for _ in range(rng.randint(0, 2) + min(len(orders), 6)):
            if quiet_from <= join_day and rng.random() < 0.7:
                day = rng.randint(quiet_from, join_day)
                self.event(self.at(day, joined), customer_id, "message.replied", {"owner": owner})

    def order_rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        rng = self.rng
        self.orders.sort(key=lambda o: (o.ts, o.customer_id))
        width = max(7, len(str(len(self.orders))))
        rows, refunds = [], []
        for n, o in enumerate(self.orders, 1):
            order_id = f"o{n:0{width}d}"
            props: dict[str, Any] = {"qty": o.qty}
            if o.coupon:
                props["coupon"], off = o.coupon
                used = {"coupon": o.coupon[0], "order_id": order_id, "discount": off // 100}
                self.event(o.ts, o.customer_id, "coupon.redeemed", used)
            props_json = self.dumps(props)
            rows.append(
                (order_id, o.customer_id, o.ts, o.amount_cents, o.category, o.sku, props_json)
            )
            if rng.random() < 0.04:  # refunded a few days later, fully or in part
                ts = o.ts + rng.randint(1, 10) * DAY + rng.randint(0, 8 * 3600)
                full = rng.random() < 0.65
                amount = o.amount_cents if full else o.amount_cents * rng.randint(1, 8) // 10
                kind = "full" if full else "partial"
                reason = self.dumps({"reason": rng.choice(REFUND_REASONS), "kind": kind})
                if ts < self.end:
                    refunds.append((ts, order_id, o.customer_id, amount, reason))
        refunds.sort(key=lambda r: (r[0], r[1]))
        width = max(7, len(str(len(refunds))))
        return rows, [(f"r{n:0{width}d}", *refund) for n, refund in enumerate(refunds, 1)]

    def event_rows(self) -> list[tuple[Any, ...]]:
        self.events.sort()
        width = max(7, len(str(len(self.events))))
        return [
            (f"e{n:0{width}d}", customer_id, kind, ts, props)
            for n, (ts, customer_id, kind, props) in enumerate(self.events, 1)
        ]


_CUSTOMER_COLUMNS = (
    "customer_id name external_userid owner phone joined_at channel opted_out tags props"
)


def _require_empty(conn: sqlite3.Connection, path: str) -> None:
    for table in ("customers", "orders", "refunds", "events"):
        if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
            raise InputError(f"{path} already has data; use a new --db file")


def generate_demo(
    store: Store, *, customers: int = 2000, seed: int = 7, end: int, tz: tzinfo
) -> DemoSummary:
    """Fill an empty store with deterministic demo customers covering ~2 years before `end`."""
    if customers < 0:
        raise UsageError(f"--customers must be 0 or more, not {customers}")
    _require_empty(store.conn, store.path)
    rng = random.Random(seed)
    builder = _Builder(rng, end, tz)
    # Join days lean recent (the brand grows); ids follow join order, like a real CRM.
    join_days = [
        rng.randint(1, SPAN_DAYS)
        if rng.random() < 0.3
        else max(1, int(SPAN_DAYS * (1 - rng.random() ** 0.35)))
        for _ in range(customers)
    ]
    joins = sorted((builder.at(day), day) for day in join_days)
    width = max(5, len(str(customers)))
    for n, (joined, day) in enumerate(joins, 1):
        builder.customer(f"{n:0{width}d}", joined, day)
    order_rows, refund_rows = builder.order_rows()
    event_rows = builder.event_rows()
    with store.transaction() as conn:
        _require_empty(conn, store.path)
        for table, columns, rows in (
            ("customers", _CUSTOMER_COLUMNS, builder.customers),
            ("orders", "order_id customer_id ts amount_cents category sku props", order_rows),
            ("refunds", "refund_id ts order_id customer_id amount_cents props", refund_rows),
            ("events", "event_id customer_id type ts props", event_rows),
        ):
            names = columns.split()
            marks = ", ".join("?" * len(names))
            sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})"
            conn.executemany(sql, rows)
    start = joins[0][0] if joins else end
    counts = len(builder.customers), len(order_rows), len(refund_rows), len(event_rows)
    return DemoSummary(*counts, start=start, end=end)
