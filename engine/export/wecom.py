"""WeCom (企业微信) request bodies: mass-message tasks and customer tags.

Messages (`send` on channel wecom, and `invite_group`) become
`externalcontact/add_msg_template` tasks: one task per sender (the customer's owner) and
identical content (text and attachments), naming up to 10,000 customers::

    {"chat_type": "single", "sender": "zhangsan", "external_userid": ["wm...", ...],
     "text": {"content": "..."}, "attachments": [{"msgtype": "link", "link": {...}}]}

Bigger groups are split into several tasks with the same content. `text` is left out
when the message is empty and attachments carry the content; `attachments` is left out
when there are none. A message is never truncated: over 4,000 bytes of UTF-8 it is a
`Rejection`, as are more than 9 attachments.

Within one task a customer appears once: an action for an external_userid already in the
task rides along in `action_ids` (the customer gets the message once, and the action is
accounted as sent with it) instead of being rejected, so no action is ever lost.

`tag` actions become one `externalcontact/mark_tag` body each::

    {"userid": "zhangsan", "external_userid": "wm...", "add_tag": ["et..."],
     "remove_tag": ["et..."]}

with tag names mapped to WeCom tag ids through `export.wecom.tag_ids`.

The builder streams: it holds one task in memory. Grouping relies on the input order
(`ORDER`), never correctness: out-of-order input still gives correct (only smaller and
more numerous) tasks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from engine.export.model import Item, Rejection, Request, WecomConfig
from engine.playbook.model import Coupon

FIELDS: frozenset[str] = frozenset({"external_userid", "owner"})
"""Customer fields WeCom needs: who receives (external_userid) and who sends (owner)."""

ORDER: tuple[str, ...] = ("owner", "message", "attachments_key", "external_userid", "action_id")
"""The order the caller sorts items by, so one task's items are adjacent.

Every entry is an `Item` attribute except "attachments_key", which means the string
`attachments_key(item)` (canonical JSON of `item.attachments`). `sort_key(item)` gives the
whole key as a tuple. Items that are not messages (tags, other channels) may be anywhere.
Sorting by external_userid within a task puts a customer's duplicate actions next to each
other, so a task split at 10,000 never sends one customer the same message twice.
"""

SEND_ENDPOINT = "externalcontact/add_msg_template"
TAG_ENDPOINT = "externalcontact/mark_tag"
MAX_RECIPIENTS = 10_000  # external_userid per add_msg_template task
MAX_TEXT_BYTES = 4_000  # text.content, UTF-8
MAX_ATTACHMENTS = 9
MESSAGE_TYPES = ("send", "invite_group")

_Key = tuple[str, str, tuple[dict[str, Any], ...]]


def attachments_key(item: Item) -> str:
    """Canonical JSON of the item's attachments: equal attachments, equal strings."""
    return json.dumps(
        list(item.attachments), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )


def coupon_attachments(coupon: Coupon) -> tuple[dict[str, Any], ...]:
    """A coupon's attachments in the neutral `Item.attachments` shape: its `url` as a link
    titled with the coupon's description (else its code), then its mini-program card."""
    out: list[dict[str, Any]] = []
    if coupon.url:
        title = coupon.description or coupon.code
        out.append(
            {"type": "link", "title": title, "url": coupon.url, "desc": None, "picurl": None}
        )
    if coupon.miniprogram is not None:
        mini = coupon.miniprogram
        out.append(
            {
                "type": "miniprogram",
                "title": mini.title,
                "appid": mini.appid,
                "page": mini.page,
                "pic_media_id": mini.pic_media_id,
            }
        )
    return tuple(out)


def sort_key(item: Item) -> tuple[str, ...]:
    """`ORDER` as a tuple for Python-side sorting (None sorts as "", before any text)."""
    return (
        item.owner or "",
        item.message or "",
        attachments_key(item),
        item.external_userid or "",
        item.action_id,
    )


def requests(items: Iterable[Item], config: WecomConfig) -> Iterator[Request | Rejection]:
    """Request bodies for `items` (sorted by `ORDER`) and a Rejection for each unsendable one.

    Every item's action_id appears exactly once across the Requests and Rejections.
    """
    task: _Task | None = None
    checked = _Checked()
    for item in items:
        if item.type == "tag":
            yield _mark_tag(item, config.tag_ids)
            continue
        if item.type not in MESSAGE_TYPES or item.channel != "wecom":
            channel = item.channel or "no channel"
            yield Rejection(item.action_id, f"not a WeCom action ({item.type}, {channel})")
            continue
        problem = _recipient_problem(item) or checked.message(item.message, item.attachments)
        if problem is not None:
            yield Rejection(item.action_id, problem)
            continue
        assert item.owner is not None and item.external_userid is not None  # checked above
        key: _Key = (item.owner, item.message or "", item.attachments)
        if task is not None and (task.key != key or task.full(item.external_userid)):
            yield task.request()
            task = None
        if task is None:
            task = _Task(key, checked.converted)
        task.add(item.action_id, item.external_userid)
    if task is not None:
        yield task.request()


class _Task:
    """The add_msg_template task being filled: one sender, one content."""

    def __init__(self, key: _Key, attachments: list[dict[str, Any]]) -> None:
        self.key = key
        self.attachments = attachments
        self.recipients: dict[str, None] = {}  # insertion-ordered set
        self.action_ids: list[str] = []

    def full(self, external_userid: str) -> bool:
        return len(self.recipients) >= MAX_RECIPIENTS and external_userid not in self.recipients

    def add(self, action_id: str, external_userid: str) -> None:
        self.recipients[external_userid] = None
        self.action_ids.append(action_id)

    def request(self) -> Request:
        owner, message, _ = self.key
        body: dict[str, Any] = {
            "chat_type": "single",
            "external_userid": list(self.recipients),
            "sender": owner,
        }
        if message:
            body["text"] = {"content": message}
        if self.attachments:
            body["attachments"] = self.attachments
        return Request(SEND_ENDPOINT, body, tuple(self.action_ids))


class _Checked:
    """Checks a message's text and attachments, remembering the last answer.

    Sorted input repeats the same message and attachments for a whole task, so each is
    measured and converted once per run of equal items, not once per item.
    """

    def __init__(self) -> None:
        self._text: str | None = None
        self._text_problem: str | None = None
        self._attachments: tuple[dict[str, Any], ...] | None = None
        self._attachments_problem: str | None = None
        self.converted: list[dict[str, Any]] = []

    def message(self, text: str | None, attachments: tuple[dict[str, Any], ...]) -> str | None:
        if text != self._text or self._text is None:
            self._text = text
            self._text_problem = _text_problem(text)
        if attachments != self._attachments or self._attachments is None:
            self._attachments = attachments
            converted = _convert_attachments(attachments)
            if isinstance(converted, str):
                self._attachments_problem, self.converted = converted, []
            else:
                self._attachments_problem, self.converted = None, converted
        if self._text_problem is not None:
            return self._text_problem
        if self._attachments_problem is not None:
            return self._attachments_problem
        if not text and not attachments:
            return "nothing to send: the message is empty and there are no attachments"
        return None


def _recipient_problem(item: Item) -> str | None:
    if not item.owner:
        return (
            f"customer {item.customer_id} has no owner (the staff member whose WeCom account "
            "sends the message)"
        )
    if not item.external_userid:
        return f"customer {item.customer_id} has no WeCom external_userid"
    return None


def _text_problem(text: str | None) -> str | None:
    size = len(text.encode("utf-8")) if text else 0
    if size > MAX_TEXT_BYTES:
        return f"message is {size} bytes; WeCom allows {MAX_TEXT_BYTES}"
    return None


def _convert_attachments(
    attachments: tuple[dict[str, Any], ...],
) -> list[dict[str, Any]] | str:
    """WeCom's shape of the neutral attachments, or the reason they cannot be sent."""
    if len(attachments) > MAX_ATTACHMENTS:
        return f"{len(attachments)} attachments; WeCom allows {MAX_ATTACHMENTS}"
    out = []
    needed: tuple[str, ...]
    optional: tuple[str, ...]
    for number, attachment in enumerate(attachments, 1):
        kind = attachment.get("type")
        if kind == "link":
            needed, optional = ("title", "url"), ("desc", "picurl")
        elif kind == "miniprogram":
            needed, optional = ("title", "pic_media_id", "appid", "page"), ()
        else:
            return f"attachment {number} has type {kind!r}; WeCom takes link or miniprogram"
        missing = [key for key in needed if not attachment.get(key)]
        if missing:
            return f"{kind} attachment {number} has no {', '.join(missing)}"
        fields = {key: attachment[key] for key in needed}
        fields.update({key: attachment[key] for key in optional if attachment.get(key)})
        out.append({"msgtype": kind, kind: fields})
    return out


def _mark_tag(item: Item, tag_ids: dict[str, str]) -> Request | Rejection:
    problem = _recipient_problem(item)
    if problem is not None:
        return Rejection(item.action_id, problem)
    unknown = [t for t in (*item.tags_added, *item.tags_removed) if t not in tag_ids]
    if unknown:
        names = ", ".join(f"'{name}'" for name in dict.fromkeys(unknown))
        plural = "s" if len(set(unknown)) > 1 else ""
        them = "them" if plural else "it"
        return Rejection(
            item.action_id,
            f"no WeCom tag id for tag{plural} {names}: add {them} under export.wecom.tag_ids",
        )
    if not item.tags_added and not item.tags_removed:
        return Rejection(item.action_id, "the tag action adds and removes no tags")
    body = {
        "userid": item.owner,
        "external_userid": item.external_userid,
        "add_tag": [tag_ids[t] for t in dict.fromkeys(item.tags_added)],
        "remove_tag": [tag_ids[t] for t in dict.fromkeys(item.tags_removed)],
    }
    return Request(TAG_ENDPOINT, body, (item.action_id,))
