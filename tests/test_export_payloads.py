"""Export payload builders: WeCom tasks and tags, SMS batches, template messages."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import UsageError
from engine.export import sms, wechat, wecom
from engine.export.model import (
    CUSTOMER_FIELDS,
    Item,
    Rejection,
    Request,
    SmsConfig,
    WechatTemplateConfig,
    WecomConfig,
)
from engine.playbook.model import Coupon, MiniProgram

PHONE = "13812345678"
LINK = {"type": "link", "title": "满500减50", "url": "https://e.com/c/BIG50"}
MINI = {
    "type": "miniprogram",
    "title": "领券",
    "appid": "wx8bd80126147dfAAA",
    "page": "pages/coupon?code=BIG50",
    "pic_media_id": "MEDIA",
}
ALIYUN = SmsConfig(provider="aliyun", sign_name="品牌", template_code="SMS_1")
TENCENT = SmsConfig(
    provider="tencent", sign_name="品牌", template_code="123", sdk_app_id="1400000000"
)
WECHAT = WechatTemplateConfig(template_id="TPL", data={"first": "{message}"})


def item(n: int | str = 1, **kw: Any) -> Item:
    """An item; customer n has external_userid wm<n>, owner staff1, and a phone."""
    base: dict[str, Any] = {
        "action_id": f"a{n}",
        "playbook": "p",
        "rule_id": "r",
        "customer_id": f"c{n}",
        "type": "send",
        "channel": "wecom",
        "message": "你好",
        "coupon": None,
        "group_name": None,
        "tags_added": (),
        "tags_removed": (),
        "assign_to": None,
        "note": None,
        "scheduled_at": 0,
        "expires_at": None,
        "external_userid": f"wm{n}",
        "owner": "staff1",
        "phone": PHONE,
        "openid": f"o{n}",
        "name": f"客户{n}",
    }
    base.update(kw)
    return Item(**base)


def split(out: Iterable[Request | Rejection]) -> tuple[list[Request], list[Rejection]]:
    done = list(out)
    return (
        [r for r in done if isinstance(r, Request)],
        [r for r in done if isinstance(r, Rejection)],
    )


def reasons(out: Iterable[Request | Rejection]) -> list[str]:
    return [r.reason for r in split(out)[1]]


def wecom_out(items: Iterable[Item], **config: Any) -> list[Request | Rejection]:
    return list(wecom.requests(items, WecomConfig(**config)))


def test_declared_fields_are_customer_fields_and_minimal() -> None:
    for module in (wecom, sms, wechat):
        assert set(CUSTOMER_FIELDS) >= module.FIELDS
    assert {"external_userid", "owner"} == wecom.FIELDS
    assert {"phone"} == sms.FIELDS
    assert {"openid", "name"} == wechat.FIELDS


# -- WeCom ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "sizes"), [(10_000, [10_000]), (10_001, [10_000, 1])])
def test_wecom_task_holds_at_most_10000_customers(count: int, sizes: list[int]) -> None:
    requests, rejections = split(wecom_out(item(n) for n in range(count)))
    assert rejections == []
    assert [len(r.body["external_userid"]) for r in requests] == sizes
    assert [len(r.action_ids) for r in requests] == sizes
    # Split tasks carry the same content.
    assert {json.dumps({**r.body, "external_userid": []}) for r in requests} == {
        json.dumps(
            {
                "chat_type": "single",
                "external_userid": [],
                "sender": "staff1",
                "text": {"content": "你好"},
            }
        )
    }
    assert all(r.endpoint == "externalcontact/add_msg_template" for r in requests)


def test_wecom_one_task_per_sender_content_and_attachments() -> None:
    items = [
        item(1, owner="staff1", message="A"),
        item(2, owner="staff1", message="A"),
        item(3, owner="staff1", message="A", attachments=(LINK,)),
        item(4, owner="staff1", message="B"),
        item(5, owner="staff2", message="A"),  # same text, other sender
        item(6, owner="staff2", message="A"),
    ]
    requests, _ = split(wecom_out(sorted(items, key=wecom.sort_key)))
    tasks = {
        (r.body["sender"], r.body["text"]["content"], len(r.body.get("attachments", []))): r
        for r in requests
    }
    assert len(requests) == len(tasks) == 4
    assert tasks["staff1", "A", 0].body["external_userid"] == ["wm1", "wm2"]
    assert tasks["staff1", "A", 1].body["external_userid"] == ["wm3"]
    assert tasks["staff1", "B", 0].action_ids == ("a4",)
    assert tasks["staff2", "A", 0].body["external_userid"] == ["wm5", "wm6"]


def test_wecom_same_content_for_different_senders_is_separate_tasks() -> None:
    requests, _ = split(wecom_out([item(1, owner="alice"), item(2, owner="bob")]))
    assert [(r.body["sender"], r.body["external_userid"]) for r in requests] == [
        ("alice", ["wm1"]),
        ("bob", ["wm2"]),
    ]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("a" * 4000, None),
        ("a" * 4001, "message is 4001 bytes; WeCom allows 4000"),
        ("好" * 1333 + "a", None),  # 3,999 + 1 bytes
        ("好" * 1334, "message is 4002 bytes; WeCom allows 4000"),
        ("好" * 1333 + "ab", "message is 4001 bytes; WeCom allows 4000"),
    ],
)
def test_wecom_text_limit_is_4000_utf8_bytes(message: str, reason: str | None) -> None:
    out = wecom_out([item(1, message=message)])
    if reason is None:
        (request,) = out
        assert isinstance(request, Request)
        assert request.body["text"]["content"] == message  # never truncated
    else:
        assert out == [Rejection("a1", reason)]


def test_wecom_attachments_map_to_wecom_shapes() -> None:
    link = {**LINK, "desc": "满500可用", "picurl": None}
    (request,) = wecom_out([item(1, attachments=(link, MINI))])
    assert isinstance(request, Request)
    assert request.body["attachments"] == [
        {
            "msgtype": "link",
            "link": {"title": "满500减50", "url": "https://e.com/c/BIG50", "desc": "满500可用"},
        },
        {
            "msgtype": "miniprogram",
            "miniprogram": {
                "title": "领券",
                "pic_media_id": "MEDIA",
                "appid": "wx8bd80126147dfAAA",
                "page": "pages/coupon?code=BIG50",
            },
        },
    ]


def test_wecom_attachments_only_message_has_no_text() -> None:
    (request,) = wecom_out([item(1, message="", attachments=(LINK,))])
    assert isinstance(request, Request) and "text" not in request.body
    assert reasons(wecom_out([item(1, message=None)])) == [
        "nothing to send: the message is empty and there are no attachments"
    ]


def test_wecom_at_most_9_attachments_and_well_formed_ones() -> None:
    nine = tuple({**LINK, "url": f"https://e.com/{n}"} for n in range(9))
    requests, _ = split(wecom_out([item(1, attachments=nine)]))
    assert len(requests[0].body["attachments"]) == 9
    assert reasons(wecom_out([item(1, attachments=(*nine, LINK))])) == [
        "10 attachments; WeCom allows 9"
    ]
    assert reasons(wecom_out([item(1, attachments=({"type": "link", "title": "t"},))])) == [
        "link attachment 1 has no url"
    ]
    assert reasons(wecom_out([item(1, attachments=(LINK, {"type": "image"}))])) == [
        "attachment 2 has type 'image'; WeCom takes link or miniprogram"
    ]


def test_wecom_customer_appears_once_per_task_and_no_action_is_lost() -> None:
    items = [item(1), item(2), item(2, action_id="a2-again"), item(3)]
    (request,) = wecom_out(items)
    assert isinstance(request, Request)
    assert request.body["external_userid"] == ["wm1", "wm2", "wm3"]
    assert request.action_ids == ("a1", "a2", "a2-again", "a3")


def test_wecom_duplicate_past_the_limit_rides_along_instead_of_a_second_task() -> None:
    items = [*(item(n) for n in range(10_000)), item(9_999, action_id="dup"), item(10_000)]
    requests, _ = split(wecom_out(items))
    assert [len(r.body["external_userid"]) for r in requests] == [10_000, 1]
    assert requests[0].action_ids[-1] == "dup"


def test_wecom_rejects_what_it_cannot_send() -> None:
    out = wecom_out(
        [
            item(1, owner=None),
            item(2, external_userid=None),
            item(3, channel="sms"),
            item(4, type="task", channel=None),
            item(5, type="invite_group", message="进群：https://e.com/j"),
        ]
    )
    assert [r.action_id for r in split(out)[1]] == ["a1", "a2", "a3", "a4"]
    assert reasons(out) == [
        "customer c1 has no owner (the staff member whose WeCom account sends the message)",
        "customer c2 has no WeCom external_userid",
        "not a WeCom action (send, sms)",
        "not a WeCom action (task, no channel)",
    ]
    assert isinstance(out[-1], Request) and out[-1].action_ids == ("a5",)


def test_wecom_tags_map_names_to_ids() -> None:
    config = {"tag_ids": {"vip": "et1", "near-loyal": "et2"}}
    tag = item(1, type="tag", channel=None, tags_added=("vip",), tags_removed=("near-loyal",))
    (request,) = wecom_out([tag], **config)
    assert request == Request(
        "externalcontact/mark_tag",
        {"userid": "staff1", "external_userid": "wm1", "add_tag": ["et1"], "remove_tag": ["et2"]},
        ("a1",),
    )
    unknown = item(2, type="tag", channel=None, tags_added=("vip", "kol"))
    assert wecom_out([unknown], **config) == [
        Rejection("a2", "no WeCom tag id for tag 'kol': add it under export.wecom.tag_ids")
    ]
    assert reasons(wecom_out([item(3, type="tag", channel=None, tags_added=("vip",))])) == [
        "no WeCom tag id for tag 'vip': add it under export.wecom.tag_ids"
    ]
    assert reasons(
        wecom_out([item(4, type="tag", channel=None, owner=None, tags_added=("vip",))], **config)
    ) == ["customer c4 has no owner (the staff member whose WeCom account sends the message)"]


def test_wecom_tags_between_messages_do_not_break_a_task() -> None:
    config = {"tag_ids": {"vip": "et1"}}
    tag = item("t", type="tag", channel=None, tags_added=("vip",))
    out = wecom_out([item(1), tag, item(2)], **config)
    assert [r.endpoint for r in out if isinstance(r, Request)] == [
        "externalcontact/mark_tag",
        "externalcontact/add_msg_template",
    ]
    assert split(out)[0][-1].action_ids == ("a1", "a2")


def test_coupon_attachments() -> None:
    mini = MiniProgram(appid="wx1", page="pages/c", title="领券", pic_media_id="M")
    coupon = Coupon("BIG50", 50, url="https://e.com/c", miniprogram=mini)
    attachments = wecom.coupon_attachments(coupon)
    assert attachments[0]["title"] == "BIG50"  # no description: the code
    described = Coupon("BIG50", 50, description="满500减50", url="https://e.com/c")
    assert wecom.coupon_attachments(described)[0]["title"] == "满500减50"
    assert wecom.coupon_attachments(Coupon("X", 5)) == ()
    (request,) = split(wecom_out([item(1, attachments=attachments)]))[0]
    assert request.body["attachments"] == [
        {"msgtype": "link", "link": {"title": "BIG50", "url": "https://e.com/c"}},
        {
            "msgtype": "miniprogram",
            "miniprogram": {
                "title": "领券",
                "pic_media_id": "M",
                "appid": "wx1",
                "page": "pages/c",
            },
        },
    ]


def test_attachments_key_is_canonical() -> None:
    swapped = dict(reversed(list(LINK.items())))
    assert wecom.attachments_key(item(attachments=(LINK,))) == wecom.attachments_key(
        item(attachments=(swapped,))
    )
    assert wecom.attachments_key(item()) == "[]"


_owners = st.sampled_from(["staff1", "staff2", None])
_messages = st.sampled_from(["A", "B", "好" * 1334, None])
_attachments = st.sampled_from([(), (LINK,), (LINK, MINI), (MINI,) * 10])
_kinds = st.sampled_from(
    [("send", "wecom"), ("invite_group", "wecom"), ("send", "sms"), ("tag", None)]
)


@st.composite
def wecom_items(draw: st.DrawFn) -> list[Item]:
    count = draw(st.integers(0, 40))
    out = []
    for n in range(count):
        kind, channel = draw(_kinds)
        out.append(
            item(
                n,
                type=kind,
                channel=channel,
                owner=draw(_owners),
                message=draw(_messages),
                attachments=draw(_attachments),
                external_userid=draw(st.sampled_from(["wm1", "wm2", "wm3", "wm4", None])),
                tags_added=draw(st.sampled_from([(), ("vip",), ("kol",)])),
            )
        )
    return out


@settings(max_examples=200, deadline=None)
@given(items=wecom_items(), sort=st.booleans(), limit=st.integers(1, 3))
def test_wecom_properties(items: list[Item], sort: bool, limit: int) -> None:
    if sort:
        items = sorted(items, key=wecom.sort_key)
    with mock.patch.object(wecom, "MAX_RECIPIENTS", limit):
        out = wecom_out(items, tag_ids={"vip": "et1"})
    # Every action is accounted for exactly once.
    seen = Counter(
        a for r in out for a in (r.action_ids if isinstance(r, Request) else [r.action_id])
    )
    assert seen == Counter(i.action_id for i in items)
    by_id = {i.action_id: i for i in items}
    tasks = [r for r in out if isinstance(r, Request) and r.endpoint.endswith("add_msg_template")]
    for task in tasks:
        recipients = task.body["external_userid"]
        assert 1 <= len(recipients) <= limit
        assert len(set(recipients)) == len(recipients)
        members = [by_id[a] for a in task.action_ids]
        assert {(i.owner, i.message or "", wecom.attachments_key(i)) for i in members} == {
            (
                task.body["sender"],
                task.body.get("text", {}).get("content", ""),
                wecom.attachments_key(members[0]),
            )
        }
        assert {i.external_userid for i in members} == set(recipients)
        text = task.body.get("text", {}).get("content", "")
        assert len(text.encode("utf-8")) <= 4000
        assert len(task.body.get("attachments", [])) <= 9
    if sort:  # sorted input: as few tasks as the limit allows
        groups: dict[tuple[Any, ...], set[str | None]] = {}
        for task in tasks:
            first = by_id[task.action_ids[0]]
            key = (first.owner, first.message or "", wecom.attachments_key(first))
            groups.setdefault(key, set()).update(task.body["external_userid"])
        assert len(tasks) == sum(-(-len(users) // limit) for users in groups.values())


class Counted:
    """200,000 items, counting how many have been read."""

    def __init__(self, **kw: Any) -> None:
        self.consumed = 0
        self.kw = kw

    def __iter__(self) -> Iterator[Item]:
        for n in range(200_000):
            self.consumed += 1
            yield item(n, phone=f"138{n:08d}", **self.kw)


def test_wecom_streams() -> None:
    source = Counted()
    out = wecom.requests(source, WecomConfig())
    first = next(out)
    assert isinstance(first, Request) and len(first.action_ids) == 10_000
    assert source.consumed == 10_001
    rest, rejections = split(out)
    assert rejections == [] and len(rest) == 19
    assert sum(len(r.action_ids) for r in rest) == 190_000
    assert source.consumed == 200_000


@pytest.mark.parametrize(
    ("config", "read"),
    [(ALIYUN, 101), (TENCENT, 201), (WECHAT, 1)],
    ids=["aliyun", "tencent", "wechat"],
)
def test_sms_and_wechat_stream(config: SmsConfig | WechatTemplateConfig, read: int) -> None:
    if isinstance(config, SmsConfig):
        source = Counted(channel="sms")
        first = next(sms.requests(source, config))
    else:
        source = Counted(channel="wechat_template")
        first = next(wechat.requests(source, config))
    assert isinstance(first, Request)
    assert source.consumed == read


# -- SMS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("13812345678", "+8613812345678"),
        ("+8613812345678", "+8613812345678"),
        ("8613812345678", "+8613812345678"),
        ("+86 138 1234 5678", "+8613812345678"),
        ("138-1234-5678", "+8613812345678"),
        ("0086 138 1234 5678", "+8613812345678"),
        ("+852 5123 4567", "+85251234567"),
    ],
)
def test_phone_numbers_are_normalised_to_e164(phone: str, expected: str) -> None:
    assert sms.e164(phone, "CN") == expected


@pytest.mark.parametrize(
    ("phone", "reason"),
    [
        ("12345", "phone '12345' is not a valid number (CN)"),
        ("5123 4567", "phone '5123 4567' is not a valid number (CN)"),  # HK without +852
        ("abc", "phone 'abc' is not a phone number (CN)"),
        ("010-12345678", "phone '010-12345678' is a landline, which cannot receive SMS (CN)"),
        ("", "the customer has no phone number"),
        (None, "the customer has no phone number"),
    ],
)
def test_bad_phone_numbers_are_rejected(phone: str | None, reason: str) -> None:
    assert list(sms.requests([item(1, channel="sms", phone=phone)], ALIYUN)) == [
        Rejection("a1", reason)
    ]


def test_default_region_reads_local_numbers() -> None:
    hk = SmsConfig(provider="aliyun", sign_name="s", template_code="t", default_region="HK")
    (request,) = sms.requests([item(1, channel="sms", phone="5123 4567")], hk)
    assert isinstance(request, Request)
    assert json.loads(request.body["PhoneNumberJson"]) == ["85251234567"]


@pytest.mark.parametrize(
    ("config", "count", "sizes"),
    [
        (ALIYUN, 100, [100]),
        (ALIYUN, 101, [100, 1]),
        (TENCENT, 200, [200]),
        (TENCENT, 201, [200, 1]),
    ],
)
def test_sms_batch_limits(config: SmsConfig, count: int, sizes: list[int]) -> None:
    items = (item(n, channel="sms", phone=f"138{n:08d}") for n in range(count))
    requests, rejections = split(sms.requests(items, config))
    assert rejections == []
    assert [len(r.action_ids) for r in requests] == sizes


def test_aliyun_body_has_per_number_params() -> None:
    items = [
        item(1, channel="sms", phone="138 0000 0001", message="早上好"),
        item(2, channel="sms", phone="+852 5123 4567", message="晚上好"),
    ]
    (request,) = sms.requests(items, ALIYUN)
    assert isinstance(request, Request)
    assert request.endpoint == "SendBatchSms"
    assert request.body == {
        "PhoneNumberJson": '["8613800000001","85251234567"]',
        "SignNameJson": '["品牌","品牌"]',
        "TemplateCode": "SMS_1",
        "TemplateParamJson": '[{"content":"早上好"},{"content":"晚上好"}]',
    }
    param = SmsConfig(provider="aliyun", sign_name="s", template_code="t", param="msg")
    (request,) = split(sms.requests(items[:1], param))[0]
    assert json.loads(request.body["TemplateParamJson"]) == [{"msg": "早上好"}]


def test_tencent_request_holds_one_message() -> None:
    items = [
        item(n, channel="sms", phone=f"138{n:08d}", message=m)
        for n, m in enumerate(["A", "B", "A", "B", "A"])
    ]
    requests, _ = split(sms.requests(sorted(items, key=sms.sort_key), TENCENT))
    assert [(r.body["TemplateParamSet"], len(r.body["PhoneNumberSet"])) for r in requests] == [
        (["A"], 3),
        (["B"], 2),
    ]
    assert requests[0].endpoint == "SendSms"
    assert requests[0].body["PhoneNumberSet"][0] == "+8613800000000"
    assert {k: v for k, v in requests[0].body.items() if k != "PhoneNumberSet"} == {
        "SmsSdkAppId": "1400000000",
        "SignName": "品牌",
        "TemplateId": "123",
        "TemplateParamSet": ["A"],
    }
    # Unsorted input is still correct: one message per request.
    unsorted, _ = split(sms.requests(items, TENCENT))
    assert [r.body["TemplateParamSet"] for r in unsorted] == [["A"], ["B"], ["A"], ["B"], ["A"]]


def test_sms_duplicate_number_and_message_rides_along() -> None:
    items = [item(1, channel="sms"), item(2, channel="sms", phone="+86 138 1234 5678")]
    for config in (ALIYUN, TENCENT):
        (request,) = sms.requests(items, config)
        assert isinstance(request, Request) and request.action_ids == ("a1", "a2")
    (tencent,) = split(sms.requests(items, TENCENT))[0]
    assert tencent.body["PhoneNumberSet"] == ["+8613812345678"]


def test_sms_rejects_other_channels_and_empty_messages() -> None:
    out = list(sms.requests([item(1), item(2, channel="sms", message="")], ALIYUN))
    assert out == [
        Rejection("a1", "not an SMS action (send, wecom)"),
        Rejection("a2", "no message to send"),
    ]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (SmsConfig(template_code="t"), "export.sms.sign_name"),
        (SmsConfig(sign_name="s"), "export.sms.template_code"),
        (SmsConfig(provider="tencent", sign_name="s", template_code="t"), "export.sms.sdk_app_id"),
        (SmsConfig(provider="twilio", sign_name="s", template_code="t"), "export.sms.provider"),
        (
            SmsConfig(sign_name="s", template_code="t", default_region="XX"),
            "export.sms.default_region",
        ),
    ],
)
def test_sms_config_problems_name_the_setting(config: SmsConfig, named: str) -> None:
    with pytest.raises(UsageError, match=named.replace(".", r"\.")):
        sms.requests(iter(()), config)  # raised at once, before any item is read


@st.composite
def sms_items(draw: st.DrawFn) -> list[Item]:
    phones = st.sampled_from(
        ["13800000001", "+8613800000001", "13800000002", "+85251234567", "12345", None]
    )
    return [
        item(
            n,
            channel=draw(st.sampled_from(["sms", "sms", "sms", "wecom"])),
            phone=draw(phones),
            message=draw(st.sampled_from(["A", "B", "", None])),
        )
        for n in range(draw(st.integers(0, 30)))
    ]


@settings(max_examples=200, deadline=None)
@given(items=sms_items(), sort=st.booleans(), tencent=st.booleans(), limit=st.integers(1, 3))
def test_sms_properties(items: list[Item], sort: bool, tencent: bool, limit: int) -> None:
    if sort:
        items = sorted(items, key=sms.sort_key)
    config = TENCENT if tencent else ALIYUN
    with mock.patch.dict(sms.MAX_NUMBERS, {config.provider: limit}):
        out = list(sms.requests(items, config))
    seen = Counter(
        a for r in out for a in (r.action_ids if isinstance(r, Request) else [r.action_id])
    )
    assert seen == Counter(i.action_id for i in items)
    for request in (r for r in out if isinstance(r, Request)):
        if tencent:
            numbers = request.body["PhoneNumberSet"]
            assert len(request.body["TemplateParamSet"]) == 1
            assert len(set(numbers)) == len(numbers)
        else:
            numbers = json.loads(request.body["PhoneNumberJson"])
            params = json.loads(request.body["TemplateParamJson"])
            assert len(params) == len(numbers) == len(json.loads(request.body["SignNameJson"]))
        assert 1 <= len(numbers) <= limit


# -- template messages --------------------------------------------------------------------


def test_wechat_template_body() -> None:
    config = WechatTemplateConfig(
        template_id="TPL",
        url="https://e.com/c",
        data={"first": "{message}", "keyword1": "券码 {coupon}", "remark": "{name}，谢谢"},
    )
    out = list(wechat.requests([item(1, channel="wechat_template", coupon="BIG50")], config))
    assert out == [
        Request(
            "message/template/send",
            {
                "touser": "o1",
                "template_id": "TPL",
                "url": "https://e.com/c",
                "data": {
                    "first": {"value": "你好"},
                    "keyword1": {"value": "券码 BIG50"},
                    "remark": {"value": "客户1，谢谢"},
                },
            },
            ("a1",),
        )
    ]
    (request,) = wechat.requests([item(1, channel="wechat_template")], WECHAT)
    assert isinstance(request, Request) and "url" not in request.body


def test_wechat_substitution_is_literal_and_single_pass() -> None:
    config = WechatTemplateConfig(
        template_id="TPL",
        data={"k": "{message.__class__} {0} {} {coupon} {name!r} {message}"},
    )
    item_ = item(1, channel="wechat_template", message="{name} {coupon.__init__}", coupon=None)
    (request,) = wechat.requests([item_], config)
    assert isinstance(request, Request)
    assert request.body["data"]["k"]["value"] == (
        "{message.__class__} {0} {}  {name!r} {name} {coupon.__init__}"
    )


def test_wechat_rejects_and_config() -> None:
    out = list(wechat.requests([item(1, channel="wechat_template", openid=None), item(2)], WECHAT))
    assert out == [
        Rejection("a1", "customer c1 has no official-account openid"),
        Rejection("a2", "not a template-message action (send, wecom)"),
    ]
    with pytest.raises(UsageError, match=r"export\.wechat_template\.template_id"):
        wechat.requests([], WechatTemplateConfig())


# -- PII -----------------------------------------------------------------------------------


def test_wecom_and_wechat_bodies_hold_no_phone_number() -> None:
    wecom_items_ = [
        item(1),
        item(2, attachments=(LINK,)),
        item(3, type="tag", channel=None, tags_added=("vip",)),
    ]
    bodies = [
        json.dumps(r.body, ensure_ascii=False)
        for r in wecom.requests(wecom_items_, WecomConfig(tag_ids={"vip": "et1"}))
        if isinstance(r, Request)
    ]
    config = WechatTemplateConfig(template_id="TPL", data={"a": "{message}{name}{coupon}"})
    bodies += [
        json.dumps(r.body, ensure_ascii=False)
        for r in wechat.requests([item(4, channel="wechat_template")], config)
        if isinstance(r, Request)
    ]
    assert len(bodies) == 4
    for body in bodies:
        assert PHONE not in body and PHONE[-8:] not in body and PHONE[:7] not in body
