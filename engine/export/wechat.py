"""Official-account (公众号) template-message bodies: `message/template/send`, one per action.

    {"touser": "o6_bm...", "template_id": "ngqI...", "url": "https://...",
     "data": {"first": {"value": "..."}, "remark": {"value": "..."}}}

Each text under `export.wechat_template.data` has "{message}", "{coupon}" and "{name}"
replaced by the action's message, coupon code and the customer's name (empty when the
action has none). The substitution is one literal pass: any other brace stays as written,
nothing is looked up or evaluated, and text that comes in through a value is never
substituted again. `url` is left out when not configured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from engine.errors import UsageError
from engine.export.model import Item, Rejection, Request, WechatTemplateConfig

FIELDS: frozenset[str] = frozenset({"openid", "name"})
"""Customer fields template messages need: the openid to send to, the name to fill in."""

ORDER: tuple[str, ...] = ("action_id",)
"""Any order works (one request per action); sorting by action_id keeps output stable."""

ENDPOINT = "message/template/send"
PLACEHOLDER = re.compile(r"\{(message|coupon|name)\}")


def fill(text: str, item: Item) -> str:
    """`text` with {message}, {coupon} and {name} replaced; everything else literal."""
    values = {"message": item.message, "coupon": item.coupon, "name": item.name}
    return PLACEHOLDER.sub(lambda match: values[match.group(1)] or "", text)


def check_config(config: WechatTemplateConfig) -> None:
    """Raise UsageError naming the settings key if `config` cannot build requests."""
    if not config.template_id:
        raise UsageError(
            "template-message export needs export.wechat_template.template_id in the settings file"
        )


def requests(items: Iterable[Item], config: WechatTemplateConfig) -> Iterator[Request | Rejection]:
    """One request per wechat_template item and a Rejection for each unsendable one.

    Checks `config` at once (UsageError naming the settings key), then streams.
    """
    check_config(config)
    return _requests(items, config)


def _requests(items: Iterable[Item], config: WechatTemplateConfig) -> Iterator[Request | Rejection]:
    for item in items:
        if item.channel != "wechat_template" or item.type != "send":
            channel = item.channel or "no channel"
            yield Rejection(
                item.action_id, f"not a template-message action ({item.type}, {channel})"
            )
            continue
        if not item.openid:
            yield Rejection(
                item.action_id,
                f"customer {item.customer_id} has no official-account openid",
            )
            continue
        body: dict[str, object] = {"touser": item.openid, "template_id": config.template_id}
        if config.url:
            body["url"] = config.url
        body["data"] = {key: {"value": fill(text, item)} for key, text in config.data.items()}
        yield Request(ENDPOINT, body, (item.action_id,))
