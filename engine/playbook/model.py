"""A validated playbook as the engine uses it: frozen dataclasses, no dicts inside."""

from __future__ import annotations

from dataclasses import dataclass

from engine.conditions.ir import Condition


@dataclass(frozen=True)
class Cap:
    """At most `max` actions per customer in `window` (optionally on one channel)."""

    max: int
    window: str  # "calendar_month", "calendar_week" or a rolling duration like "7d"
    window_seconds: int | None  # None for calendar windows
    channel: str | None = None


@dataclass(frozen=True)
class MiniProgram:
    """A mini-program (小程序) page, sent as a card attached to a WeCom message."""

    appid: str
    page: str
    title: str
    pic_media_id: str


@dataclass(frozen=True)
class Coupon:
    """A coupon the playbook may issue."""

    code: str
    value: float
    min_spend: float = 0.0
    budget: int | None = None
    description: str = ""
    url: str | None = None  # a link attachment: where the customer claims/uses it
    miniprogram: MiniProgram | None = None  # a mini-program card attachment


@dataclass(frozen=True)
class Group:
    """A community group customers can be invited to."""

    name: str
    join_url: str
    description: str = ""


@dataclass(frozen=True)
class Action:
    """One action of a rule. `kind` is send, invite_group, tag, task or coupon."""

    kind: str
    channel: str | None = None
    template: str | None = None
    coupon: str | None = None
    group: str | None = None
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()
    assign_to: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Rule:
    """A rule: a condition (and optionally a triggering event) and its actions."""

    id: str
    when: Condition | None
    when_text: str | None
    on: str | None
    priority: int
    group: str | None
    cooldown_seconds: int | None
    enabled: bool
    start: str | None
    end: str | None
    expires_seconds: int
    actions: tuple[Action, ...]
    description: str = ""


@dataclass(frozen=True)
class Playbook:
    """A validated playbook."""

    name: str
    version: int
    description: str
    timezone: str | None
    quiet_hours: tuple[int, int] | None  # minutes after midnight: (start, end)
    holdout: float  # a fraction, 0 to 0.5
    caps: tuple[Cap, ...]
    coupons: dict[str, Coupon]
    groups: dict[str, Group]
    templates: dict[str, str]
    rules: tuple[Rule, ...]
    file: str
    content_hash: str
