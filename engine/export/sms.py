"""SMS request bodies: Aliyun `SendBatchSms` or Tencent Cloud `SendSms`.

Phone numbers are normalised to E.164 with `phonenumbers`; a number without a country
code is read as `export.sms.default_region`. A number that is missing, does not parse,
is not a valid number, or is a valid number that cannot take SMS (a landline, toll-free,
...) is a `Rejection` naming the reason.

Aliyun (`provider: aliyun`), at most 100 numbers per request; every number carries its
own template parameters, so any messages can share a request::

    {"PhoneNumberJson": "[\\"8613800138000\\", \\"85251234567\\"]",
     "SignNameJson": "[\\"Sign\\", \\"Sign\\"]", "TemplateCode": "SMS_123",
     "TemplateParamJson": "[{\\"content\\": \\"...\\"}, {\\"content\\": \\"...\\"}]"}

Aliyun takes numbers as digits with the country code and no '+' ("8613800138000"), which
is E.164 without its '+'. The message goes under the template parameter
`export.sms.param` (default "content").

Tencent Cloud (`provider: tencent`), at most 200 numbers per request; the template
parameters are shared by every number of a request, so one request holds only items with
the identical message::

    {"PhoneNumberSet": ["+8613800138000"], "SmsSdkAppId": "1400000000",
     "SignName": "Sign", "TemplateId": "123456", "TemplateParamSet": ["..."]}

Within one request a (number, message) pair appears once: a duplicate action rides along
in `action_ids` (the customer gets the message once) and is never lost. The builder holds
one request in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import phonenumbers

from engine.errors import UsageError
from engine.export.model import Item, Rejection, Request, SmsConfig

FIELDS: frozenset[str] = frozenset({"phone"})
"""Customer fields SMS needs: only the phone number (the message is already rendered)."""

ORDER: tuple[str, ...] = ("message", "phone", "action_id")
"""The order the caller sorts items by: equal messages adjacent (a Tencent request holds
one message), and a number's duplicate actions next to each other. Aliyun works with any
order; out-of-order input still gives correct requests, only more of them."""

PROVIDERS = ("aliyun", "tencent")
ENDPOINTS = {"aliyun": "SendBatchSms", "tencent": "SendSms"}
MAX_NUMBERS = {"aliyun": 100, "tencent": 200}

_NOT_MOBILE = {
    phonenumbers.PhoneNumberType.FIXED_LINE: "a landline",
    phonenumbers.PhoneNumberType.TOLL_FREE: "a toll-free number",
    phonenumbers.PhoneNumberType.PREMIUM_RATE: "a premium-rate number",
    phonenumbers.PhoneNumberType.SHARED_COST: "a shared-cost number",
    phonenumbers.PhoneNumberType.UAN: "a company (UAN) number",
    phonenumbers.PhoneNumberType.VOICEMAIL: "a voicemail number",
    phonenumbers.PhoneNumberType.PAGER: "a pager number",
}


def sort_key(item: Item) -> tuple[str, ...]:
    """`ORDER` as a tuple for Python-side sorting (None sorts as "")."""
    return (item.message or "", item.phone or "", item.action_id)


def check_config(config: SmsConfig) -> None:
    """Raise UsageError naming the settings key if `config` cannot build requests."""
    if config.provider not in PROVIDERS:
        raise UsageError(
            f"export.sms.provider is {config.provider!r}; use one of: {', '.join(PROVIDERS)}"
        )
    needed = [("sign_name", config.sign_name), ("template_code", config.template_code)]
    if config.provider == "tencent":
        needed.append(("sdk_app_id", config.sdk_app_id))
    missing = [f"export.sms.{key}" for key, value in needed if not value]
    if missing:
        raise UsageError(
            f"SMS export via {config.provider} needs {' and '.join(missing)} in the settings file"
        )
    if config.default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise UsageError(
            f"export.sms.default_region {config.default_region!r} is not a region code "
            "like CN or HK"
        )


def e164(phone: str | None, region: str) -> str:
    """`phone` as E.164 ("+8613800138000"); ValueError says why it cannot take SMS."""
    if not phone or not phone.strip():
        raise ValueError("the customer has no phone number")
    try:
        number = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException:
        raise ValueError(f"phone {phone!r} is not a phone number ({region})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"phone {phone!r} is not a valid number ({region})")
    kind = _NOT_MOBILE.get(phonenumbers.number_type(number))
    if kind is not None:
        raise ValueError(f"phone {phone!r} is {kind}, which cannot receive SMS ({region})")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def requests(items: Iterable[Item], config: SmsConfig) -> Iterator[Request | Rejection]:
    """Request bodies for `items` (sorted by `ORDER`) and a Rejection for each unsendable one.

    Checks `config` at once (UsageError naming the settings key), then streams. Every
    item's action_id appears exactly once across the Requests and Rejections.
    """
    check_config(config)
    return _requests(items, config)


def _requests(items: Iterable[Item], config: SmsConfig) -> Iterator[Request | Rejection]:
    limit = MAX_NUMBERS[config.provider]
    tencent = config.provider == "tencent"
    batch = _Batch()
    for item in items:
        if item.channel != "sms" or item.type != "send":
            channel = item.channel or "no channel"
            yield Rejection(item.action_id, f"not an SMS action ({item.type}, {channel})")
            continue
        if not item.message:
            yield Rejection(item.action_id, "no message to send")
            continue
        try:
            number = e164(item.phone, config.default_region)
        except ValueError as exc:
            yield Rejection(item.action_id, str(exc))
            continue
        pair = (number, item.message)
        if batch.action_ids and pair not in batch.pairs:
            other_message = tencent and item.message != batch.message
            if other_message or len(batch.pairs) >= limit:
                yield _request(batch, config)
                batch = _Batch()
        batch.add(pair, item.action_id)
    if batch.action_ids:
        yield _request(batch, config)


class _Batch:
    """The request being filled: (E.164 number, message) pairs and the actions they carry."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self.action_ids: list[str] = []
        self.message: str | None = None

    def add(self, pair: tuple[str, str], action_id: str) -> None:
        self.pairs[pair] = None
        self.action_ids.append(action_id)
        self.message = pair[1]


def _request(batch: _Batch, config: SmsConfig) -> Request:
    numbers = [number for number, _ in batch.pairs]
    body: dict[str, Any]
    if config.provider == "tencent":
        body = {
            "PhoneNumberSet": numbers,
            "SmsSdkAppId": config.sdk_app_id,
            "SignName": config.sign_name,
            "TemplateId": config.template_code,
            "TemplateParamSet": [batch.message],
        }
    else:
        body = {
            "PhoneNumberJson": _json([n.removeprefix("+") for n in numbers]),
            "SignNameJson": _json([config.sign_name] * len(numbers)),
            "TemplateCode": config.template_code,
            "TemplateParamJson": _json([{config.param: m} for _, m in batch.pairs]),
        }
    return Request(ENDPOINTS[config.provider], body, tuple(batch.action_ids))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
