"""Deciding: which matches become actions, and why the others do not. One place, any engine.

Both matching engines hand over the same thing, a candidates table for one rule (who
matched, on what trigger, and the few facts policies need). The policies run here as set
operations inside the run's transaction, rule by rule in priority order, action by action,
so every earlier decision of the run (and every action already queued or sent by any
playbook on the store) counts against later ones:

    rule level    cooldown -> exclusive group (lost to the winner) -> holdout
    action level  opted out -> unreachable on the channel -> frequency caps -> coupon budget

A match that does not become an action is still written, with status `suppressed` and its
reason, so `playbook explain` and the run report can say why.

Decisions are staged in the temp table `decisions` (the queue's columns) while the run
works through its rules — every policy reads it together with the queue — and reach the
queue in one sorted insert at the end (`flush`): one write per action, no updates of
queue rows in place.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from engine.playbook.model import Action, Cap, Playbook, Rule

MESSAGE_KINDS = ("send", "invite_group")  # what frequency caps count: contact with a customer
CONTACT_KINDS = ("send", "invite_group", "task")  # what an opted-out customer must not get
LIVE_STATUSES = ("pending", "exporting", "exported", "sent", "delivered")
REASONS = ("cooldown", "group", "holdout", "opted_out", "unreachable", "cap", "budget")

CANDIDATES = "candidates"
DECISIONS = "decisions"
_CANDIDATE_COLUMNS = (
    "customer_id TEXT NOT NULL, trigger TEXT NOT NULL, event_id TEXT, opted_out INTEGER, "
    "has_wecom INTEGER, has_phone INTEGER, owner TEXT, rule_reason TEXT, rule_detail TEXT, "
    "PRIMARY KEY (customer_id, trigger)"
)


def scratch_table(conn: sqlite3.Connection, name: str, columns: str) -> None:
    """An empty temp table `name` (WITHOUT ROWID: `columns` must declare a primary key).

    Created once per connection and emptied after: dropping and creating it again would
    change the connection's temp schema, and every prepared statement that reads a temp
    table would have to be compiled again (a run makes hundreds per playbook)."""
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns}) WITHOUT ROWID")
    conn.execute(f"DELETE FROM temp.{name}")


def bucket(playbook: str, customer_id: str) -> float:
    """A customer's stable place in [0, 1) for one playbook: the holdout draws on it."""
    digest = hashlib.sha256(f"{playbook}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def action_id(playbook: str, rule: str, customer: str, trigger: str, index: int) -> str:
    """The deterministic id of one decision: the same decision can never be queued twice."""
    key = "\x1f".join((playbook, rule, customer, trigger, str(index)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def register_functions(conn: sqlite3.Connection) -> None:
    """Make `pb_bucket` and `pb_action_id` callable from this connection's SQL (once: a
    function defined again makes every prepared statement be compiled again)."""
    known = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM pragma_function_list WHERE name IN ('pb_bucket', 'pb_action_id')"
        )
    }
    if "pb_bucket" not in known:
        conn.create_function("pb_bucket", 2, bucket, deterministic=True)
    if "pb_action_id" not in known:
        conn.create_function("pb_action_id", 5, action_id, deterministic=True)


def next_allowed(moment: int, quiet: tuple[int, int] | None, tz: tzinfo) -> int:
    """The first moment at or after `moment` outside the quiet hours (minutes of the day)."""
    if quiet is None:
        return moment
    start, end = quiet
    local = datetime.fromtimestamp(moment, tz)
    minute = local.hour * 60 + local.minute
    inside = (start <= minute < end) if start < end else (minute >= start or minute < end)
    if not inside:
        return moment
    opening = local.replace(hour=end // 60, minute=end % 60, second=0, microsecond=0)
    if opening <= local:
        opening = (opening + timedelta(days=1)).replace(hour=end // 60, minute=end % 60)
    return int(opening.timestamp())


def cap_window(cap: Cap, moment: int, tz: tzinfo) -> tuple[int, int]:
    """The (start, end] span of scheduled times a cap counts for an action at `moment`."""
    if cap.window_seconds is not None:
        return moment - cap.window_seconds, moment
    local = datetime.fromtimestamp(moment, tz)
    if cap.window == "calendar_week":
        first = (local - timedelta(days=local.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        following = first + timedelta(days=7)
    else:
        first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (first + timedelta(days=32)).replace(day=1)
    # Calendar windows are closed at the start: shift by one second for the (start, end].
    return int(first.timestamp()) - 1, int(following.timestamp()) - 1


def channel_of(action: Action) -> str | None:
    """The channel an action reaches the customer on (group invitations go through WeCom)."""
    if action.kind == "send":
        return action.channel
    return "wecom" if action.kind == "invite_group" else None


def attachments_of(playbook: Playbook, action: Action) -> str | None:
    """What goes with the message (JSON): the coupon's link or mini-program, the group's
    join link. Exporters map this neutral shape to each tool's own."""
    found: list[dict[str, str]] = []
    if action.coupon is not None:
        coupon = playbook.coupons[action.coupon]
        title = coupon.description or f"Coupon {coupon.code}"
        if coupon.url:
            found.append({"type": "link", "title": title, "url": coupon.url})
        if coupon.miniprogram is not None:
            mini = coupon.miniprogram
            found.append(
                {
                    "type": "miniprogram",
                    "title": mini.title,
                    "appid": mini.appid,
                    "page": mini.page,
                    "pic_media_id": mini.pic_media_id,
                }
            )
    if action.group is not None:
        group = playbook.groups[action.group]
        found.append(
            {"type": "link", "title": group.description or group.name, "url": group.join_url}
        )
    return json.dumps(found, ensure_ascii=False, sort_keys=True) if found else None


class QueueFilter:
    """What a scratch queue (a simulation's: `engine.dryrun.scratch_queue`) may hold,
    kept in memory, so that a run need not look up every decision in the queue.

    Such a queue has no index on the (hashed) action id, and looking a decision up among
    its customer's actions costs more as the simulation queues more. The filter answers
    "maybe queued" for every decision of a customer who had actions before it was made,
    and for every id it has been given since (`add`, after each run's flush; a failed
    run ends the simulation and the copy). Only a "maybe" is then looked up exactly:
    false positives cost a lookup, and there are no false negatives."""

    FUNCTION = "pb_maybe_queued"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.customers = {c for (c,) in conn.execute("SELECT DISTINCT customer_id FROM actions")}
        self.ids: set[int] = set()
        conn.create_function(self.FUNCTION, 2, self.maybe_queued)

    @staticmethod
    def _key(action_id: str) -> int:
        return int(action_id[:16], 16)  # ids are hex digests: 64 bits of one

    def maybe_queued(self, customer_id: str, action_id: str) -> bool:
        return customer_id in self.customers or self._key(action_id) in self.ids

    def add(self, conn: sqlite3.Connection) -> None:
        """Note the ids of the decisions the run staged (and has just flushed)."""
        key = self._key
        self.ids.update(key(a) for (a,) in conn.execute(f"SELECT action_id FROM temp.{DECISIONS}"))


@dataclass
class RunDecider:
    """Applies a playbook's policies for one run, rule by rule, inside the run's transaction."""

    conn: sqlite3.Connection
    playbook: Playbook
    run_id: str
    as_of: int
    tz: tzinfo
    queued: QueueFilter | None = None  # a scratch queue's (else the queue is looked up)

    def __post_init__(self) -> None:
        register_functions(self.conn)
        self.scheduled_at = next_allowed(self.as_of, self.playbook.quiet_hours, self.tz)
        scratch_table(
            self.conn,
            "group_winners",
            "customer_id TEXT NOT NULL, grp TEXT NOT NULL, rule_id TEXT NOT NULL, "
            "PRIMARY KEY (customer_id, grp)",
        )
        # Kept from run to run, emptied (see `scratch_table`).
        conn = self.conn
        conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {DECISIONS} AS SELECT * FROM main.actions WHERE false"
        )
        conn.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS temp.{DECISIONS}_id ON {DECISIONS} (action_id)"
        )
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS temp.{DECISIONS}_customer ON {DECISIONS} (customer_id)"
        )
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS temp.{DECISIONS}_rule ON {DECISIONS} "
            "(rule_id, action_index, status)"
        )
        conn.execute(f"DELETE FROM temp.{DECISIONS}")

    def flush(self) -> int:
        """Write the run's decisions into the queue (in one sorted insert); returns how many.

        The staged rows stay readable in `temp.decisions` until the next decider starts."""
        cursor = self.conn.execute(
            # No decision staged is in the queue already (`_insert` looked, in this write
            # transaction): a conflict here would be an error, never a row dropped.
            f"INSERT INTO main.actions SELECT * FROM temp.{DECISIONS} "
            "ORDER BY customer_id, action_id"
        )
        if self.queued is not None:
            self.queued.add(self.conn)
        return int(cursor.rowcount)

    @staticmethod
    def new_candidates(conn: sqlite3.Connection) -> None:
        """An empty candidates table for the next rule."""
        scratch_table(conn, CANDIDATES, _CANDIDATE_COLUMNS)

    def decide(self, rule: Rule) -> Counter[str]:
        """Decide every candidate of `rule`; returns counts by status / reason."""
        self._rule_level(rule)
        for index, action in enumerate(rule.actions):
            self._insert(rule, index, action)
            channel = channel_of(action)
            if action.kind in MESSAGE_KINDS:
                for cap in self.playbook.caps:
                    if cap.channel is None or cap.channel == channel:
                        self._apply_cap(rule, index, cap)
            if action.coupon is not None:
                self._apply_budget(rule, index, action.coupon)
        return self._counts(rule)

    def _rule_level(self, rule: Rule) -> None:
        conn, params = self.conn, self._params(rule)
        if rule.cooldown_seconds:
            conn.execute(
                f"UPDATE temp.{CANDIDATES} SET rule_reason = 'cooldown', rule_detail = "
                "'fired within the last ' || :cooldown_text WHERE rule_reason IS NULL AND "
                # An action is scheduled when decided or later (quiet hours): the ones
                # decided within the cooldown are in that span of the customer's index.
                "EXISTS (SELECT 1 FROM main.actions a WHERE "
                "a.customer_id = candidates.customer_id AND "
                "a.scheduled_at > :as_of - :cooldown AND a.decided_at > :as_of - :cooldown "
                "AND a.playbook = :playbook AND a.rule_id = :rule AND "
                "a.status != 'suppressed')",
                {
                    **params,
                    "cooldown": rule.cooldown_seconds,
                    "cooldown_text": _duration_text(rule.cooldown_seconds),
                },
            )
        if rule.group is not None:
            conn.execute(
                f"UPDATE temp.{CANDIDATES} SET rule_reason = 'group', rule_detail = "
                "'lost to rule ' || (SELECT w.rule_id FROM temp.group_winners w WHERE "
                "w.customer_id = candidates.customer_id AND w.grp = :grp) "
                "WHERE rule_reason IS NULL AND EXISTS (SELECT 1 FROM temp.group_winners w "
                "WHERE w.customer_id = candidates.customer_id AND w.grp = :grp)",
                {**params, "grp": rule.group},
            )
            conn.execute(
                "INSERT OR IGNORE INTO temp.group_winners SELECT customer_id, :grp, :rule "
                f"FROM temp.{CANDIDATES} WHERE rule_reason IS NULL OR rule_reason = 'holdout'",
                {**params, "grp": rule.group},
            )
        if self.playbook.holdout > 0:
            conn.execute(
                f"UPDATE temp.{CANDIDATES} SET rule_reason = 'holdout', rule_detail = "
                "'control group: would have received' WHERE rule_reason IS NULL AND "
                "pb_bucket(:playbook, customer_id) < :holdout",
                {**params, "holdout": self.playbook.holdout},
            )
            if rule.group is not None:  # a held-out winner still wins its group
                conn.execute(
                    "INSERT OR IGNORE INTO temp.group_winners SELECT customer_id, :grp, :rule "
                    f"FROM temp.{CANDIDATES} WHERE rule_reason = 'holdout'",
                    {**params, "grp": rule.group},
                )

    def _insert(self, rule: Rule, index: int, action: Action) -> None:
        channel = channel_of(action)
        checks = []
        if action.kind in CONTACT_KINDS:
            checks.append("WHEN c.opted_out = 1 THEN 'opted_out'")
        if channel in ("wecom", "wechat_template"):
            checks.append("WHEN NOT c.has_wecom THEN 'unreachable'")
        elif channel == "sms":
            checks.append("WHEN NOT c.has_phone THEN 'unreachable'")
        if action.kind == "task" and action.assign_to == "owner":
            checks.append("WHEN c.owner IS NULL THEN 'unreachable'")
        action_reason = f"CASE {' '.join(checks)} END" if checks else "NULL"
        maybe = "" if self.queued is None else f"{QueueFilter.FUNCTION}(c.customer_id, c.id) AND"
        reason = f"coalesce(c.rule_reason, {action_reason})"
        detail = (
            f"CASE WHEN c.rule_reason IS NOT NULL THEN c.rule_detail "
            f"WHEN {action_reason} = 'unreachable' THEN :unreachable END"
        )
        self.conn.execute(
            f"INSERT INTO temp.{DECISIONS} (action_id, run_id, playbook, "
            "playbook_version, playbook_hash, rule_id, customer_id, trigger, action_index, "
            "type, channel, template, coupon, group_name, tags_added, tags_removed, "
            "assign_to, note, decided_at, scheduled_at, expires_at, status, reason, detail, "
            "attachments, attempts) "
            # Each id is hashed once (a materialised CTE), then checked against the queue.
            "WITH ids AS MATERIALIZED (SELECT pb_action_id(:playbook, :rule, customer_id, "
            f"trigger, :index) AS id, * FROM temp.{CANDIDATES}) "
            "SELECT c.id, :run, "
            ":playbook, :version, :hash, :rule, c.customer_id, c.trigger, :index, :kind, "
            ":channel, :template, :coupon, :group_name, :added, :removed, "
            "CASE WHEN :assign_to = 'owner' THEN c.owner ELSE :assign_to END, :note, "
            ":as_of, :scheduled, :scheduled + :expires, "
            f"CASE WHEN {reason} IS NULL THEN 'pending' ELSE 'suppressed' END, "
            f"{reason}, {detail}, :attachments, 0 FROM ids c "
            # The same decision already in the queue (a repeated run) is not made again.
            # (Looked up among the customer's actions too: a simulation's scratch queue is
            # indexed by customer alone, and only what its filter may hold is looked up.)
            f"WHERE NOT ({maybe} EXISTS (SELECT 1 FROM main.actions q WHERE "
            "q.action_id = c.id AND q.customer_id = c.customer_id)) "
            "ON CONFLICT (action_id) DO NOTHING",
            {
                **self._params(rule),
                "index": index,
                "kind": action.kind,
                "channel": channel,
                "template": action.template,
                "coupon": action.coupon,
                "group_name": action.group,
                "added": ",".join(action.add_tags) or None,
                "removed": ",".join(action.remove_tags) or None,
                "assign_to": action.assign_to,
                "note": action.note,
                "scheduled": self.scheduled_at if action.kind in MESSAGE_KINDS else self.as_of,
                "expires": rule.expires_seconds,
                "attachments": attachments_of(self.playbook, action),
                "unreachable": f"no {'phone' if channel == 'sms' else 'WeCom contact'} "
                f"for {channel}"
                if channel
                else "no owning staff member",
            },
        )

    def _apply_cap(self, rule: Rule, index: int, cap: Cap) -> None:
        start, end = cap_window(cap, self.scheduled_at, self.tz)
        channel_filter = "AND p.channel = :cap_channel" if cap.channel else ""
        scope = f"{cap.max} per {cap.window}" + (f" on {cap.channel}" if cap.channel else "")
        live = (
            f"p.status IN {LIVE_STATUSES} AND p.type IN {MESSAGE_KINDS} {channel_filter} "
            "AND p.scheduled_at > :start AND p.scheduled_at <= :end"
        )
        self.conn.execute(
            f"UPDATE temp.{DECISIONS} SET status = 'suppressed', reason = 'cap', "
            "detail = :scope WHERE action_id IN (SELECT a.action_id FROM (SELECT action_id, "
            "customer_id, row_number() OVER (PARTITION BY customer_id ORDER BY trigger) AS k "
            f"FROM temp.{DECISIONS} WHERE rule_id = :rule AND action_index = :index "
            "AND status = 'pending') AS a "
            "WHERE a.k + (SELECT count(*) FROM main.actions p WHERE "
            f"p.customer_id = a.customer_id AND {live}) "
            f"+ (SELECT count(*) FROM temp.{DECISIONS} p WHERE "
            f"p.customer_id = a.customer_id AND {live} "
            "AND NOT (p.rule_id = :rule AND p.action_index = :index)) > :max)",
            {
                **self._params(rule),
                "index": index,
                "scope": scope,
                "cap_channel": cap.channel,
                "start": start,
                "end": end,
                "max": cap.max,
            },
        )

    def _apply_budget(self, rule: Rule, index: int, code: str) -> None:
        coupon = self.playbook.coupons.get(code)
        if coupon is None or coupon.budget is None:
            return
        issued = self.conn.execute(
            f"SELECT count(*) FROM temp.{DECISIONS} WHERE coupon = :code AND "
            "status = 'pending' AND NOT (rule_id = :rule AND action_index = :index)",
            {**self._params(rule), "code": code, "index": index},
        ).fetchone()[0]
        self.conn.execute(
            f"UPDATE temp.{DECISIONS} SET status = 'suppressed', reason = 'budget', "
            "detail = :detail WHERE action_id IN (SELECT action_id FROM (SELECT action_id, "
            "row_number() OVER (ORDER BY customer_id, trigger) AS k "
            f"FROM temp.{DECISIONS} WHERE rule_id = :rule AND action_index = :index "
            "AND status = 'pending') WHERE k > :left)",
            {
                **self._params(rule),
                "index": index,
                "left": max(coupon.budget - issued, 0),
                "detail": f"coupon {code}: budget of {coupon.budget} per run used up",
            },
        )

    def _counts(self, rule: Rule) -> Counter[str]:
        counts: Counter[str] = Counter()
        for status, reason, n in self.conn.execute(
            f"SELECT status, reason, count(*) FROM temp.{DECISIONS} WHERE rule_id = ? "
            "GROUP BY 1, 2",
            (rule.id,),
        ):
            counts[reason if status == "suppressed" else status] += n
        return counts

    def _params(self, rule: Rule) -> dict[str, object]:
        return {
            "run": self.run_id,
            "playbook": self.playbook.name,
            "version": self.playbook.version,
            "hash": self.playbook.content_hash,
            "rule": rule.id,
            "as_of": self.as_of,
        }


def _duration_text(seconds: int) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
