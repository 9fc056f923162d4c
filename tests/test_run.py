"""Running playbooks: entry episodes, every policy, events, tags, messages, explain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import engine.event_facts as event_facts
import engine.run as run_module
from engine.cli import cli
from engine.clock import DAY, parse_as_of
from engine.decide import bucket, cap_window, next_allowed
from engine.explain import explain
from engine.playbook import Playbook, load_playbook
from engine.playbook.model import Cap
from engine.run import run_playbooks
from engine.settings import Settings
from engine.store import Store
from tests.conftest import SHANGHAI

SETTINGS = Settings()
T0 = parse_as_of("2024-06-01T10:00", SHANGHAI)


def playbook(tmp_path: Path, body: str, name: str = "p") -> Playbook:
    """A playbook from YAML text (header added), validated like any other."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"playbook: {name}\nversion: 1\n" + body, "utf-8")
    return load_playbook(path, SETTINGS)


def add_customer(
    store: Store,
    cid: str,
    *,
    friend: bool = True,
    phone: bool = True,
    opted_out: bool = False,
    tags: tuple[str, ...] = (),
) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO customers (customer_id, name, external_userid, owner, phone, "
            "joined_at, opted_out, tags) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
            (
                cid,
                f"客户{cid}",
                f"wm{cid}" if friend else None,
                "staff_li" if friend else None,
                "13800000000" if phone else None,
                int(opted_out),
                json.dumps(list(tags)),
            ),
        )


def add_order(store: Store, cid: str, ts: int, yuan: float, oid: str | None = None) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?, 'skincare', 's1', NULL)",
            (oid or f"o{cid}-{ts}", cid, ts, int(yuan * 100)),
        )


def actions(store: Store, **where: Any) -> list[dict[str, Any]]:
    sql = "SELECT * FROM actions"
    if where:
        sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
    cursor = store.conn.execute(
        sql + " ORDER BY decided_at, rule_id, customer_id, action_index", list(where.values())
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def empty(store: Store) -> None:
    """Forget every customer, order and run (a test trying each engine in turn)."""
    for table in ("customers", "orders", "actions", "rule_state", "event_cursor", "runs"):
        store.conn.execute(f"DELETE FROM {table}")


def run(store: Store, *books: Playbook, at: int = T0, engine: str = "sql") -> Any:
    return run_playbooks(store, SETTINGS, list(books), as_of=at, engine=engine)


def force_prefetch(monkeypatch: Any, on: bool = True) -> list[str | None]:
    """Prefetch event facts however few there are (`on`), or never; returns the list the
    runs' `take` calls append their answers to (so a prefetching test cannot pass without
    taking prefetched facts)."""
    if not on:
        monkeypatch.setattr(run_module, "worth_prefetching", lambda *args: False)
        return []
    monkeypatch.setattr(event_facts, "PREFETCH_MIN_EVENTS", 0)
    monkeypatch.setattr(event_facts.os, "cpu_count", lambda: 2)
    taken: list[str | None] = []
    take = event_facts.EventPrefetch.take

    def recorded(self: Any, *args: Any) -> str | None:
        taken.append(take(self, *args))
        return taken[-1]

    monkeypatch.setattr(event_facts.EventPrefetch, "take", recorded)
    return taken


class Prefetch:
    """Whether a test's runs prefetch event facts, and what their `take` calls answered."""

    def __init__(self, on: bool, taken: list[str | None]) -> None:
        self.on, self.taken = on, taken


@pytest.fixture(params=[False, True], ids=["serial", "prefetch"])
def prefetch(request: Any, monkeypatch: Any) -> Prefetch:
    """Event facts built by the run itself, or prefetched (forced, however few events)."""
    return Prefetch(request.param, force_prefetch(monkeypatch, request.param))


SPENDER = """
templates:
  hi: "{{ customer.name }}，你好"
rules:
  - id: big
    when: total_spend > 500
    then:
      - send: {channel: wecom, template: hi}
"""


def test_state_rules_fire_on_entry_once_per_episode(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, SPENDER)
    add_customer(store, "1")
    add_order(store, "1", T0 - 10 * DAY, 600)
    run(store, book)
    assert [a["trigger"] for a in actions(store)] == ["entry:1"]
    run(store, book, at=T0 + DAY)  # still matching: nothing new
    assert len(actions(store)) == 1
    with store.transaction() as conn:  # a refund takes them out of the condition
        conn.execute("INSERT INTO refunds VALUES ('r', NULL, '1', ?, 20000, NULL)", (T0 + DAY,))
    run(store, book, at=T0 + 2 * DAY)
    assert len(actions(store)) == 1
    add_order(store, "1", T0 + 3 * DAY, 300)  # back above 500: a second episode
    run(store, book, at=T0 + 4 * DAY)
    assert [a["trigger"] for a in actions(store)] == ["entry:1", "entry:2"]


def test_rerun_at_the_same_moment_adds_nothing(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, SPENDER)
    for i in range(5):
        add_customer(store, str(i))
        add_order(store, str(i), T0 - DAY, 900)
    first = run(store, book)[0]
    second = run(store, book)[0]
    assert (first.queued, second.queued, second.suppressed) == (5, 0, 0)
    assert len(actions(store)) == 5


def test_cooldown(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, SPENDER.replace("    then:", "    cooldown: 30d\n    then:"))
    add_customer(store, "1")
    add_order(store, "1", T0 - DAY, 600)
    run(store, book)
    with store.transaction() as conn:
        conn.execute("INSERT INTO refunds VALUES ('r', NULL, '1', ?, 20000, NULL)", (T0 + 1,))
    run(store, book, at=T0 + DAY)
    add_order(store, "1", T0 + DAY + 1, 300)
    run(store, book, at=T0 + 2 * DAY)  # re-entered within 30 days
    assert [(a["status"], a["reason"]) for a in actions(store)] == [
        ("pending", None),
        ("suppressed", "cooldown"),
    ]
    assert actions(store)[1]["detail"] == "fired within the last 30d"


GROUPED = """
templates:
  hi: "{{ customer.name }}"
rules:
  - id: second
    when: total_spend > 100
    priority: 20
    group: promo
    then:
      - send: {channel: wecom, template: hi}
  - id: first
    when: total_spend > 500
    priority: 10
    group: promo
    then:
      - send: {channel: wecom, template: hi}
"""


def test_exclusive_group_first_by_priority_wins(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, GROUPED)
    add_customer(store, "rich")
    add_order(store, "rich", T0 - DAY, 900)
    add_customer(store, "mid")
    add_order(store, "mid", T0 - DAY, 200)
    run(store, book)
    got = {
        (a["customer_id"], a["rule_id"]): (a["status"], a["reason"], a["detail"])
        for a in actions(store)
    }
    assert got == {
        ("rich", "first"): ("pending", None, None),
        ("rich", "second"): ("suppressed", "group", "lost to rule first"),
        ("mid", "second"): ("pending", None, None),
    }


CAPPED = """
caps:
  - {max: 1, window: 7d}
templates:
  hi: "{{ customer.name }}"
rules:
  - id: a
    when: total_spend > 100
    priority: 1
    then:
      - send: {channel: wecom, template: hi}
      - tag: {add: [seen]}
  - id: b
    when: order_count >= 1
    priority: 2
    then:
      - send: {channel: sms, template: hi}
"""


def test_rolling_cap_counts_this_run_and_earlier_runs(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, CAPPED)
    add_customer(store, "1")
    add_order(store, "1", T0 - DAY, 200)
    run(store, book)
    got = [(a["rule_id"], a["type"], a["status"], a["reason"]) for a in actions(store)]
    # The tag is not a message: caps do not count or stop it.
    assert got == [
        ("a", "send", "pending", None),
        ("a", "tag", "pending", None),
        ("b", "send", "suppressed", "cap"),
    ]
    assert actions(store, reason="cap")[0]["detail"] == "1 per 7d"


def test_caps_count_other_playbooks_and_expire_with_the_window(
    store: Store, tmp_path: Path
) -> None:
    one = playbook(
        tmp_path, CAPPED.replace("priority: 2", "priority: 2\n    enabled: false"), "one"
    )
    other = playbook(
        tmp_path,
        """
caps:
  - {max: 1, window: 7d}
templates:
  hi: "{{ customer.name }}"
rules:
  - id: every-order
    on: order.created
    then:
      - send: {channel: wecom, template: hi}
""",
        "other",
    )
    add_customer(store, "1")
    add_order(store, "1", T0 - 2 * DAY, 200)
    run(store, one)  # a message at T0
    add_order(store, "1", T0 + DAY, 50, oid="soon")
    run(store, other, at=T0 + 2 * DAY)  # within 7 days of the first message
    add_order(store, "1", T0 + 7 * DAY + 3600, 50, oid="later")
    run(store, other, at=T0 + 8 * DAY)
    got = [(a["trigger"], a["status"], a["reason"]) for a in actions(store, playbook="other")]
    assert got == [("event:soon", "suppressed", "cap"), ("event:later", "pending", None)]


def test_calendar_month_window_boundaries() -> None:
    cap = Cap(max=4, window="calendar_month", window_seconds=None, channel="wecom")
    jan31 = parse_as_of("2024-01-31T23:00", SHANGHAI)
    feb1 = parse_as_of("2024-02-01T00:30", SHANGHAI)
    start, end = cap_window(cap, jan31, SHANGHAI)
    assert start < parse_as_of("2024-01-01", SHANGHAI) <= start + 1
    assert end == parse_as_of("2024-02-01", SHANGHAI) - 1
    assert start < jan31 <= end and not start < feb1 <= end
    assert cap_window(cap, feb1, SHANGHAI)[0] == parse_as_of("2024-02-01", SHANGHAI) - 1


def test_calendar_month_cap_resets_on_the_first(store: Store, tmp_path: Path) -> None:
    body = """
caps:
  - {channel: wecom, max: 1, window: calendar_month}
templates:
  hi: "{{ customer.name }}"
rules:
  - id: a
    when: order_count >= 1
    priority: 1
    then:
      - send: {channel: wecom, template: hi}
  - id: b
    when: total_spend > 100
    priority: 2
    then:
      - send: {channel: wecom, template: hi}
"""
    book = playbook(tmp_path, body)
    add_customer(store, "1")
    add_order(store, "1", parse_as_of("2024-01-20", SHANGHAI), 200)
    run(store, book, at=parse_as_of("2024-01-31T20:00", SHANGHAI))
    assert [a["reason"] for a in actions(store, type="send")] == [None, "cap"]
    # b's customer leaves (a refund) and comes back in February: the cap has reset.
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO refunds VALUES ('r', NULL, '1', ?, 20000, NULL)",
            (parse_as_of("2024-01-31T21:00", SHANGHAI),),
        )
    run(store, book, at=parse_as_of("2024-01-31T22:00", SHANGHAI))
    add_order(store, "1", parse_as_of("2024-02-01T08:00", SHANGHAI), 200)
    run(store, book, at=parse_as_of("2024-02-01T10:00", SHANGHAI))
    assert [a["status"] for a in actions(store, rule_id="b")] == ["suppressed", "pending"]


def test_quiet_hours_across_midnight() -> None:
    quiet = (21 * 60 + 30, 9 * 60)
    at = lambda text: parse_as_of(text, SHANGHAI)  # noqa: E731
    assert next_allowed(at("2024-06-01T23:00"), quiet, SHANGHAI) == at("2024-06-02T09:00")
    assert next_allowed(at("2024-06-02T08:00"), quiet, SHANGHAI) == at("2024-06-02T09:00")
    assert next_allowed(at("2024-06-01T21:30"), quiet, SHANGHAI) == at("2024-06-02T09:00")
    assert next_allowed(at("2024-06-01T10:00"), quiet, SHANGHAI) == at("2024-06-01T10:00")
    assert next_allowed(at("2024-06-01T09:00"), quiet, SHANGHAI) == at("2024-06-01T09:00")
    day = (12 * 60, 14 * 60)
    assert next_allowed(at("2024-06-01T13:00"), day, SHANGHAI) == at("2024-06-01T14:00")


def test_quiet_hours_schedule_messages_not_tags(store: Store, tmp_path: Path) -> None:
    body = 'quiet_hours: "21:30-09:00"\n' + CAPPED.replace("max: 1", "max: 9")
    book = playbook(tmp_path, body)
    add_customer(store, "1")
    add_order(store, "1", T0 - DAY, 200)
    late = parse_as_of("2024-06-01T23:15", SHANGHAI)
    run(store, book, at=late)
    scheduled = {(a["rule_id"], a["type"]): a["scheduled_at"] for a in actions(store)}
    morning = parse_as_of("2024-06-02T09:00", SHANGHAI)
    assert scheduled == {("a", "send"): morning, ("a", "tag"): late, ("b", "send"): morning}


def test_holdout_share_is_within_one_percent_and_stable() -> None:
    drawn = [bucket("lifecycle", f"{i:06d}") for i in range(100_000)]
    share = sum(d < 0.10 for d in drawn) / len(drawn)
    assert 0.09 <= share <= 0.11
    assert drawn == [bucket("lifecycle", f"{i:06d}") for i in range(100_000)]
    # Another playbook draws a different control group.
    assert sum(bucket("rfm", f"{i:06d}") < 0.1 and d < 0.1 for i, d in enumerate(drawn)) < 2000


def test_holdout_customers_are_recorded_as_would_have_received(
    store: Store, tmp_path: Path
) -> None:
    book = playbook(tmp_path, "holdout: 50%\n" + SPENDER)
    for i in range(40):
        add_customer(store, f"c{i}")
        add_order(store, f"c{i}", T0 - DAY, 900)
    run(store, book)
    held = {a["customer_id"] for a in actions(store, reason="holdout")}
    assert held == {f"c{i}" for i in range(40) if bucket("p", f"c{i}") < 0.5}
    assert {a["detail"] for a in actions(store, reason="holdout")} == {
        "control group: would have received"
    }


def test_coupon_budget_per_run(store: Store, tmp_path: Path) -> None:
    body = """
coupons:
  BIG50: {value: 50, budget: 2}
templates:
  promo: "{{ customer.name }} {{ coupon.code }} 减{{ coupon.value }}"
rules:
  - id: r
    when: total_spend > 500
    then:
      - send: {channel: wecom, template: promo, coupon: BIG50}
"""
    book = playbook(tmp_path, body)
    for i in range(5):
        add_customer(store, f"c{i}")
        add_order(store, f"c{i}", T0 - DAY, 900)
    run(store, book)
    got = [(a["customer_id"], a["status"], a["reason"]) for a in actions(store)]
    assert got == [
        ("c0", "pending", None),
        ("c1", "pending", None),
        ("c2", "suppressed", "budget"),
        ("c3", "suppressed", "budget"),
        ("c4", "suppressed", "budget"),
    ]
    assert actions(store)[0]["message"] == "客户c0 BIG50 减50"


def test_opted_out_and_unreachable(store: Store, tmp_path: Path) -> None:
    body = """
templates:
  hi: "{{ customer.name }}"
rules:
  - id: r
    when: total_spend > 100
    then:
      - send: {channel: wecom, template: hi}
      - send: {channel: sms, template: hi}
      - tag: {add: [spender]}
      - task: {assign_to: owner, note: call}
"""
    book = playbook(tmp_path, body)
    add_customer(store, "ok")
    add_customer(store, "out", opted_out=True)
    add_customer(store, "stranger", friend=False, phone=False)
    for cid in ("ok", "out", "stranger"):
        add_order(store, cid, T0 - DAY, 200)
    run(store, book)
    got = {(a["customer_id"], a["type"], a["channel"]): a["reason"] for a in actions(store)}
    assert got == {
        ("ok", "send", "wecom"): None,
        ("ok", "send", "sms"): None,
        ("ok", "tag", None): None,
        ("ok", "task", None): None,
        ("out", "send", "wecom"): "opted_out",
        ("out", "send", "sms"): "opted_out",
        ("out", "tag", None): None,
        ("out", "task", None): "opted_out",
        ("stranger", "send", "wecom"): "unreachable",
        ("stranger", "send", "sms"): "unreachable",
        ("stranger", "tag", None): None,
        ("stranger", "task", None): "unreachable",
    }
    assert actions(store, customer_id="ok", type="task")[0]["assign_to"] == "staff_li"


def test_disabled_and_dated_rules_are_skipped(store: Store, tmp_path: Path) -> None:
    body = (
        SPENDER
        + """  - id: off
    when: total_spend > 500
    enabled: false
    then:
      - tag: {add: [x]}
  - id: later
    when: total_spend > 500
    start: "2024-07-01"
    then:
      - tag: {add: [y]}
"""
    )
    book = playbook(tmp_path, body)
    add_customer(store, "1")
    add_order(store, "1", T0 - DAY, 600)
    report = {r.rule_id: r.skipped for r in run(store, book)[0].rules}
    assert report == {"big": None, "off": "disabled", "later": "starts 2024-07-01"}
    assert [a["rule_id"] for a in actions(store)] == ["big"]


def test_tags_take_effect_so_later_rules_see_them(store: Store, tmp_path: Path) -> None:
    body = """
rules:
  - id: mark
    when: total_spend > 100
    priority: 1
    then:
      - tag: {add: [vip], remove: [new]}
  - id: thank-vips
    when: '"vip" in tags and "new" not in tags'
    priority: 2
    then:
      - task: {assign_to: owner, note: thank them}
"""
    book = playbook(tmp_path, body)
    add_customer(store, "1", tags=("new",))
    add_order(store, "1", T0 - DAY, 200)
    run(store, book)
    assert [a["rule_id"] for a in actions(store)] == ["mark", "thank-vips"]
    assert store.conn.execute("SELECT tags FROM customers").fetchone()[0] == '["vip"]'


def test_event_rules_see_tags_queued_earlier_in_the_run(
    store: Store, tmp_path: Path, prefetch: Prefetch
) -> None:
    """Event facts are built once per run and shared; tags queued after they were built
    (by a later rule of the same playbook, or by an earlier playbook) must still count —
    and so must tags queued before they were built, when they were built (prefetched) from
    the store as committed before the run."""
    first = playbook(
        tmp_path,
        """
rules:
  - id: any-order
    on: order.created
    priority: 1
    then:
      - task: {assign_to: owner, note: look}
  - id: mark
    when: total_spend > 100
    priority: 2
    then:
      - tag: {add: [spender]}
  - id: tagged-order
    on: order.created
    when: '"spender" in tags'
    priority: 3
    then:
      - task: {assign_to: owner, note: same playbook}
""",
        name="a",
    )
    second = playbook(
        tmp_path,
        """
rules:
  - id: tagged-order
    on: order.created
    when: '"spender" in tags and "late" not in tags'
    priority: 1
    then:
      - task: {assign_to: owner, note: next playbook}
  - id: late
    when: total_spend > 100
    priority: 2
    then:
      - tag: {add: [late]}
  - id: late-order
    on: order.created
    when: '"late" in tags'
    priority: 3
    then:
      - task: {assign_to: owner, note: after the tag}
""",
        name="b",
    )
    # Tags first, then the playbook's first event rule: its facts are built after the tag.
    third = playbook(
        tmp_path,
        """
rules:
  - id: mark
    when: total_spend > 100
    priority: 1
    then:
      - tag: {add: [early]}
  - id: early-order
    on: message.replied
    when: '"early" in tags'
    priority: 2
    then:
      - task: {assign_to: owner, note: tagged before the facts}
""",
        name="c",
    )
    for engine in ("sql", "rules", "auto"):
        empty(store)
        store.conn.execute("DELETE FROM events")
        add_customer(store, "1")
        add_order(store, "1", T0 - 3600, 200)
        store.conn.execute(
            "INSERT INTO events (event_id, customer_id, type, ts, props) "
            "VALUES ('e1', '1', 'message.replied', ?, '{}')",
            (T0 - 1800,),
        )
        run(store, first, second, third, engine=engine)
        got = sorted((a["playbook"], a["rule_id"]) for a in actions(store))
        assert got == [
            ("a", "any-order"),
            ("a", "mark"),
            ("a", "tagged-order"),
            ("b", "late"),
            ("b", "late-order"),
            ("b", "tagged-order"),
            ("c", "early-order"),
            ("c", "mark"),
        ], engine
    assert any(prefetch.taken) == prefetch.on


def test_messages_show_tags_queued_earlier_in_the_run(
    store: Store, tmp_path: Path, prefetch: Prefetch
) -> None:
    """Tags reach a facts table only when something reads them: a template reading
    `customer.tags` sees the tags the run queued, in state and in event rules alike."""
    book = playbook(
        tmp_path,
        """
templates:
  tags: "{{ customer.tags|join(',') }}"
rules:
  - id: mark
    when: order_count >= 1
    priority: 1
    then:
      - tag: {add: [buyer]}
  - id: state-message
    when: order_count >= 1
    priority: 2
    then:
      - send: {channel: wecom, template: tags}
  - id: event-message
    on: order.created
    priority: 3
    then:
      - send: {channel: wecom, template: tags}
""",
    )
    for engine in ("sql", "rules"):
        empty(store)
        add_customer(store, "1", tags=("new",))
        add_order(store, "1", T0 - 3600, 200)
        run(store, book, engine=engine)
        got = {a["rule_id"]: a["message"] for a in actions(store) if a["type"] == "send"}
        assert got == {"state-message": "buyer,new", "event-message": "buyer,new"}, engine
    assert any(prefetch.taken) == prefetch.on


def test_a_commit_during_the_features_build_is_noticed(
    store: Store, tmp_path: Path, monkeypatch: Any
) -> None:
    """Another command that tags customers and commits while this run builds its features
    (before it takes the write lock): the run decides on the tags as committed."""
    import sqlite3

    import engine.run as run_module

    book = playbook(
        tmp_path,
        """
rules:
  - id: vips
    when: '"vip" in tags'
    then:
      - task: {assign_to: owner, note: vip}
""",
    )
    add_customer(store, "1")
    real_build = run_module.build_features

    def build_while_another_writer_commits(*args: Any, **kwargs: Any) -> Any:
        built = real_build(*args, **kwargs)
        other = sqlite3.connect(store.path)
        other.execute("""UPDATE customers SET tags = '["vip"]'""")
        other.commit()
        other.close()
        return built

    monkeypatch.setattr(run_module, "build_features", build_while_another_writer_commits)
    run(store, book)
    assert [a["rule_id"] for a in actions(store)] == ["vips"]


EVENTS = """
templates:
  thanks: "感谢第{{ customer.order_count }}次下单，{{ '%.0f'|format(event.amount) }}元"
rules:
  - id: third
    on: order.created
    when: order_count == 3
    then:
      - send: {channel: wecom, template: thanks}
"""


def test_event_rules_see_features_right_after_each_event(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, EVENTS)
    add_customer(store, "1")
    for n, hours in enumerate((30, 20, 10), 1):  # orders 2 and 3 are in the last 24 hours
        add_order(store, "1", T0 - hours * 3600, 100 * n, oid=f"o{n}")
    run(store, book)
    got = [(a["trigger"], a["message"]) for a in actions(store)]
    assert got == [("event:o3", "感谢第3次下单，300元")]
    run(store, book, at=T0 + DAY)  # each event once
    assert len(actions(store)) == 1


def test_event_facts_carry_what_every_playbook_of_the_run_reads(
    store: Store, tmp_path: Path
) -> None:
    """An event type's facts are computed once per run with only the features its rules'
    conditions and their playbooks' templates read — the union over the run's playbooks."""
    from engine.run import event_needs

    spend = playbook(
        tmp_path,
        """
templates:
  spent: "{{ customer.name }}: {{ customer.total_spend }} / {{ customer.lifecycle }}"
rules:
  - id: spent
    on: order.created
    when: order_count == 2
    then:
      - send: {channel: wecom, template: spent}
""",
        name="spend",
    )
    kinds = playbook(
        tmp_path,
        """
templates:
  kinds: "{{ customer.distinct_categories }} kinds"
rules:
  - id: kinds
    on: order.created
    when: is_friend
    then:
      - send: {channel: wecom, template: kinds}
""",
        name="kinds",
    )
    assert event_needs([spend, kinds]) == {
        "order.created": {
            "order_count",
            "name",
            "total_spend",
            "lifecycle",
            "is_friend",
            "distinct_categories",
        }
    }
    add_customer(store, "1")
    add_order(store, "1", T0 - 40 * DAY, 100, oid="o1")
    add_order(store, "1", T0 - 3600, 250, oid="o2")
    add_order(store, "1", T0 - 600, 50, oid="o3")  # after o2: not in o2's facts
    run(store, spend, kinds)
    got = sorted((a["rule_id"], a["trigger"], a["message"]) for a in actions(store))
    assert got == [
        ("kinds", "event:o2", "1 kinds"),
        ("kinds", "event:o3", "1 kinds"),
        ("spent", "event:o2", "客户1: 350.0 / active"),
    ]


def test_an_event_rule_reading_no_order_features_still_sees_order_only_customers(
    store: Store, tmp_path: Path
) -> None:
    """A customer known only from their orders (created by the orders ingest, no join
    date, no other events) exists as of right after their order, whether or not the rule
    reads any order feature."""
    book = playbook(
        tmp_path,
        """
rules:
  - id: big-order
    on: order.created
    when: event.amount >= 100
    then:
      - task: {assign_to: owner, note: big}
  - id: any-order
    on: order.created
    then:
      - task: {assign_to: owner, note: any}
""",
    )
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO customers (customer_id, owner, auto_created) VALUES ('o1', 'staff_li', 1)"
        )
    add_order(store, "o1", T0 - 3600, 150, oid="x1")
    for engine in ("sql", "rules"):
        store.conn.execute("DELETE FROM actions")
        store.conn.execute("DELETE FROM event_cursor")
        run(store, book, engine=engine)
        assert sorted(a["rule_id"] for a in actions(store)) == ["any-order", "big-order"], engine


def test_every_event_type_of_a_playbook_carries_its_templates_fields(tmp_path: Path) -> None:
    """Messages read the playbook's template fields from each event type's facts (one
    query per playbook), so each event type a playbook has rules on carries them all."""
    from engine.run import event_needs

    book = playbook(
        tmp_path,
        """
templates:
  spend: "{{ customer.total_spend }}"
rules:
  - id: big
    on: order.created
    when: order_count == 1
    then:
      - send: {channel: wecom, template: spend}
  - id: join
    on: group.joined
    then:
      - task: {assign_to: owner, note: joined}
""",
    )
    assert event_needs([book]) == {
        "order.created": {"order_count", "total_spend"},
        "group.joined": {"total_spend"},
    }


def test_first_run_reads_events_since(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, EVENTS.replace("order_count == 3", "order_count >= 1"))
    add_customer(store, "1")
    add_order(store, "1", T0 - 3 * DAY, 100, oid="old")
    add_order(store, "1", T0 - 3600, 100, oid="new")
    run_playbooks(store, SETTINGS, [book], as_of=T0, engine="sql", since=T0 - 5 * DAY)
    assert sorted(a["trigger"] for a in actions(store)) == ["event:new", "event:old"]


def test_explain_shows_values_and_policies(store: Store, tmp_path: Path) -> None:
    book = playbook(tmp_path, GROUPED)
    add_customer(store, "rich")
    add_order(store, "rich", T0 - DAY, 900)
    result = explain(store, SETTINGS, book, "rich", T0, engine="sql")
    by_rule = {r.rule_id: r for r in result.rules}
    assert by_rule["first"].verdict == "send (wecom): queued"
    assert by_rule["second"].verdict == "send (wecom): suppressed by group (lost to rule first)"
    assert [(p.text, p.values, p.holds) for p in by_rule["first"].parts] == [
        ("total_spend > 500", {"total_spend": 900.0}, True)
    ]
    assert actions(store) == []  # explaining changes nothing


def test_cli_run_explain_queue(store: Store, tmp_path: Path) -> None:
    book_path = tmp_path / "g.yaml"
    book_path.write_text("playbook: g\nversion: 1\n" + GROUPED, "utf-8")
    add_customer(store, "rich")
    add_order(store, "rich", T0 - DAY, 900)
    runner = CliRunner()
    db = ["--db", store.path]
    ran = runner.invoke(
        cli,
        [
            "run",
            str(book_path),
            "--as-of",
            "2024-06-01T10:00",
            "--engine",
            "sql",
            "--format",
            "json",
            *db,
        ],
    )
    assert ran.exit_code == 0, ran.output
    (result,) = json.loads(ran.output)
    assert [(r["rule"], r["matched"], r["queued"], r["suppressed"]) for r in result["rules"]] == [
        ("first", 1, 1, {}),
        ("second", 1, 0, {"group": 1}),
    ]
    listed = runner.invoke(cli, ["queue", "--format", "json", "--status", "pending", *db])
    assert [a["rule_id"] for a in json.loads(listed.output)] == ["first"]
    summary = runner.invoke(cli, ["queue", "--summary", "--format", "json", *db])
    assert {(r["status"], r["reason"], r["actions"]) for r in json.loads(summary.output)} == {
        ("pending", None, 1),
        ("suppressed", "group", 1),
    }
    explained = runner.invoke(
        cli,
        ["explain", "rich", str(book_path), "--as-of", "2024-06-01T10:00", "--engine", "sql", *db],
    )
    assert explained.exit_code == 0, explained.output
    assert (
        "second (state rule): already matching: the rule fires when a customer enters its "
        "condition; when they entered: send (wecom): suppressed by group (lost to rule first)"
    ) in explained.output
    missing = runner.invoke(cli, ["explain", "nobody", str(book_path), *db])
    assert missing.exit_code == 1 and "no customer 'nobody'" in missing.output


def daily(start: int, days: int) -> Iterator[int]:
    for day in range(days):
        yield start + day * DAY


def test_every_example_rule_fires_on_demo_data(store: Store) -> None:
    from engine.demo import generate_demo

    end = parse_as_of("2026-12-20", SHANGHAI)
    generate_demo(store, customers=2000, seed=7, end=end, tz=SHANGHAI)
    root = Path(__file__).parent.parent / "playbooks"
    books = [load_playbook(p, SETTINGS) for p in sorted(root.glob("*.yaml"))]
    assert sum(len(b.rules) for b in books) >= 20
    first = end - 45 * DAY + 10 * 3600
    run_playbooks(store, SETTINGS, books, as_of=first, engine="sql", since=first - 60 * DAY)
    for moment in daily(first + DAY, 45):
        run_playbooks(store, SETTINGS, books, as_of=moment, engine="sql")
    fired = {
        (p, r) for p, r in store.conn.execute("SELECT DISTINCT playbook, rule_id FROM actions")
    }
    missing = [(b.name, r.id) for b in books for r in b.rules if (b.name, r.id) not in fired]
    assert missing == []


DEMO_END = parse_as_of("2026-11-01", SHANGHAI)
# What a run leaves in the store: the queue (message by message), rule state, tags, cursors.
RUN_STATE = (
    "SELECT action_id, rule_id, status, reason, detail, message, scheduled_at FROM actions",
    "SELECT * FROM rule_state",
    "SELECT customer_id, tags FROM customers",
    "SELECT * FROM event_cursor",
)


def demo_store(tmp_path: Path, customers: int, seed: int) -> tuple[Path, list[Playbook]]:
    """A demo store ending at DEMO_END, and the example playbooks."""
    from engine.demo import generate_demo
    from engine.store import open_store

    pristine = tmp_path / "pristine.db"
    with open_store(pristine) as store:
        generate_demo(store, customers=customers, seed=seed, end=DEMO_END, tz=SHANGHAI)
    root = Path(__file__).parent.parent / "playbooks"
    return pristine, [load_playbook(p, SETTINGS) for p in sorted(root.glob("*.yaml"))]


def three_days(pristine: Path, copy: Path, books: list[Playbook], engine: str) -> list[Any]:
    """Run the playbooks daily for three days on a copy of `pristine`; the RUN_STATE."""
    import shutil

    from engine.store import open_store

    shutil.copy(pristine, copy)
    with open_store(copy) as store:
        for day in range(3):
            run_playbooks(
                store,
                SETTINGS,
                books,
                as_of=DEMO_END + day * DAY + 10 * 3600,
                engine=engine,
                since=DEMO_END - 7 * DAY,
            )
        # Cooldowns find a rule's recent actions by scheduled time: never before decided.
        early = "SELECT count(*) FROM actions WHERE scheduled_at < decided_at"
        assert store.conn.execute(early).fetchone()[0] == 0
        return [sorted(store.conn.execute(sql)) for sql in RUN_STATE]


def test_every_engine_queues_the_same_actions(tmp_path: Path) -> None:
    """SQL, durable-rules, and the default split agree on the whole queue, message by
    message, and on the rule state, tags and event cursors they leave."""
    pristine, books = demo_store(tmp_path, 1500, 9)
    states = {
        engine: three_days(pristine, tmp_path / f"{engine}.db", books, engine)
        for engine in ("sql", "rules", "auto")
    }
    assert states["sql"][0] and states["sql"] == states["rules"] == states["auto"]


def test_prefetched_event_facts_queue_what_the_run_builds_itself(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Event facts prefetched on another connection (forced) or built by the run itself:
    the same queue, message by message, the same rule state, tags and event cursors."""
    pristine, books = demo_store(tmp_path, 1200, 11)
    states = {}
    for on in (True, False):
        with monkeypatch.context() as patch:
            taken = force_prefetch(patch, on)
            states[on] = three_days(pristine, tmp_path / f"prefetch-{on}.db", books, "auto")
        assert any(taken) == on, "prefetched facts taken or not as forced"
    assert states[True][0] and states[True] == states[False]


def test_prefetch_failures_and_run_failures_leave_nothing_behind(
    store: Store, tmp_path: Path, monkeypatch: Any
) -> None:
    """A prefetch that fails fails the run (nothing written); a run that fails stops the
    prefetch. Either way no thread, attached file or scratch directory is left over."""
    import tempfile
    import threading

    force_prefetch(monkeypatch)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    book = playbook(
        tmp_path,
        """
rules:
  - id: any-order
    on: order.created
    then:
      - task: {assign_to: owner, note: look}
""",
    )
    add_customer(store, "1")
    add_order(store, "1", T0 - 3600, 200)
    build = event_facts.build_event_facts

    def failing(*args: Any, **kwargs: Any) -> None:
        if not kwargs.get("base", True):  # the prefetching connection's builds
            raise RuntimeError("disk full")
        build(*args, **kwargs)

    def left_over() -> list[Any]:
        attached = [r[1] for r in store.conn.execute("PRAGMA database_list")]
        threads = [t.name for t in threading.enumerate() if t.name == "event-facts"]
        return (
            [a for a in attached if a not in ("main", "temp")] + threads + list(scratch.iterdir())
        )

    def broken(*args: Any) -> None:
        raise RuntimeError("render failed")

    for module, name, replacement, message in (
        (event_facts, "build_event_facts", failing, "disk full"),
        (run_module, "_execute", broken, "render failed"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, replacement)
            with pytest.raises(RuntimeError, match=message):
                run(store, book)
        assert actions(store) == [] and store.count("runs") == 0
        assert left_over() == []
    run(store, book)  # and then the run goes through, prefetching
    assert [a["rule_id"] for a in actions(store)] == ["any-order"]
    assert left_over() == []


def test_no_prefetch_on_a_store_with_a_rollback_journal(store: Store, monkeypatch: Any) -> None:
    """Only a store in WAL mode is read by a second connection during the run: with a
    rollback journal (a dry run's scratch copy) the two could wait for each other."""
    force_prefetch(monkeypatch)
    keys = [("order.created", T0 - DAY)]
    assert event_facts.worth_prefetching(store, keys, T0)
    store.conn.execute("PRAGMA journal_mode = MEMORY")
    assert not event_facts.worth_prefetching(store, keys, T0)
    monkeypatch.setattr(event_facts.os, "cpu_count", lambda: 1)
    store.conn.execute("PRAGMA journal_mode = WAL")
    assert not event_facts.worth_prefetching(store, keys, T0)


def test_a_tag_write_says_which_tags_it_changed(store: Store) -> None:
    """Each customer's tags added or removed (net of the writes in order), between commas;
    writes merged later keep the later tags and what either changed."""
    from engine.run import TagWrite, merge_tag_writes, write_tag_changes

    changed: dict[str, str] = {}
    written = write_tag_changes(
        store.conn,
        [
            ("a", "vip", None, '["x"]'),
            ("a", None, "x", '["x"]'),  # the tags now: what the first row read, then its change
            ("b", "x", None, '["x"]'),  # had it already
            ("c", "vip", "vip", "[]"),  # added, then removed
        ],
        changed=changed,
    )
    assert written == {"a": '["vip"]', "b": '["x"]', "c": "[]"}
    assert changed == {"a": ",vip,x,", "b": ",", "c": ","}
    merged = {"a": TagWrite('["vip"]', ",vip,x,")}
    merge_tag_writes(merged, {"a": TagWrite("[]", ",vip,"), "d": TagWrite('["y"]', ",y,")})
    assert merged == {"a": TagWrite("[]", ",vip,x,vip,"), "d": TagWrite('["y"]', ",y,")}


def test_tags_a_rule_tests_for() -> None:
    """A rule that only asks whether a customer has some tags is judged again only for
    customers one of those changed for; any other use of the tags counts every change."""
    from types import SimpleNamespace

    from engine.conditions import parse_condition
    from engine.run import tags_read

    def read(text: str | None) -> frozenset[str] | None:
        when = None if text is None else parse_condition(text)
        return tags_read(SimpleNamespace(when=when))  # type: ignore[arg-type]

    assert read('"vip" in tags and not ("kol" in tags or order_count > 2)') == {"vip", "kol"}
    assert read('"vip" not in tags') == {"vip"}
    assert read("order_count > 2") == frozenset()
    assert read(None) == frozenset()
    assert read('"vip" in tags and tags is null') is None


def test_customers_judged_again_for_a_tag_rule(store: Store) -> None:
    """`RunFacts.stale`: retagged before the run (the step built ahead's `stale`) or by it,
    and — for a rule testing some tags — only those for whom one of them changed."""
    from engine.features import FeatureTable, RfmThresholds
    from engine.run import TagWrite

    conn = store.conn
    facts = run_module.RunFacts(store, SETTINGS, FeatureTable("f", 0, 0, RfmThresholds({})))
    conn.execute("CREATE TEMP TABLE before (customer_id TEXT, tags TEXT, changed TEXT)")
    conn.executemany(
        "INSERT INTO temp.before VALUES (?, ?, ?)",
        [("a", "[]", ",vip,"), ("b", "[]", ",new,vip-club,"), ("c", "[]", ",")],
    )

    class Ahead:
        def stale(self) -> str:
            return "temp.before"

    def who(tags: frozenset[str] | None) -> set[str]:
        table = facts.stale(Ahead(), tags)  # type: ignore[arg-type]
        return set() if table is None else {c for (c, *_) in conn.execute(f"SELECT * FROM {table}")}

    assert who(frozenset({"vip"})) == {"a"}  # "vip-club" is another tag
    assert who(frozenset({"vip-club", "kol"})) == {"b"}
    assert who(frozenset({"kol"})) == set()
    assert who(None) == {"a", "b", "c"}
    facts.tags_written(  # the run's own writes add to them
        {"c": TagWrite('["kol"]', ",kol,"), "a": TagWrite('["new"]', ",new,")}
    )
    assert who(frozenset({"kol"})) == {"c"}
    assert who(frozenset({"new"})) == {"a", "b"}
    assert who(frozenset({"vip"})) == {"a"}
