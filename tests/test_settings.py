"""Settings: thresholds, custom features, and diagnostics that point at the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.catalog import field_catalog
from engine.clock import parse_as_of
from engine.errors import SettingsError
from engine.features import compute_features
from engine.settings import Settings, load_settings
from engine.store import Store
from tests.conftest import SHANGHAI, load_small_dataset

AS_OF = parse_as_of("2024-06-01", SHANGHAI)

CUSTOM = """\
timezone: Asia/Shanghai
aipl: {loyal_spend: 500}
features:
  skincare_orders_90d: {count: orders, where: 'category == "skincare"', within: 90d}
  spend_on_big_orders: {sum: orders, field: amount, where: "amount >= 300"}
  last_category: {last: orders, field: category}
  latest_group_join: {max: group.joined, field: ts}
  fan_club_joins: {count: group.joined, where: 'group in ["fans", "粉丝群"]'}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text, "utf-8")
    return str(path)


def test_defaults_without_a_file() -> None:
    settings = load_settings(None)
    assert (settings.loyal_spend, settings.active_days, settings.sleeping_days) == (2000, 30, 180)
    assert settings.custom_features == ()


def test_custom_features_are_computed_and_catalogued(store: Store, tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CUSTOM))
    catalog = field_catalog(settings)
    assert catalog["skincare_orders_90d"].type.kind == "number"
    assert catalog["last_category"].type.kind == "string"
    assert catalog["latest_group_join"].type.kind == "timestamp"
    assert catalog["skincare_orders_90d"].description == "count of orders in the last 90d"
    load_small_dataset(store, tmp_path)
    rows: dict[str, dict[str, Any]] = {
        r["customer_id"]: r for r in compute_features(store, settings, AS_OF)
    }
    # 00001's skincare order of 2024-05-02 is inside 90 days; 00002's of 2024-03-02 is not.
    assert rows["00001"]["skincare_orders_90d"] == 1
    assert rows["00002"]["skincare_orders_90d"] == 0
    assert rows["00001"]["spend_on_big_orders"] == 300.0
    assert rows["00002"]["spend_on_big_orders"] == 2500.0
    assert rows["00001"]["last_category"] == "skincare"
    assert rows["00006"]["last_category"] is None
    assert rows["00004"]["latest_group_join"] == parse_as_of("2024-01-01", SHANGHAI)
    assert rows["00004"]["fan_club_joins"] == 1
    assert rows["00001"]["fan_club_joins"] == 0
    assert rows["00001"]["aipl_stage"] == "P" and rows["00004"]["aipl_stage"] == "L"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "aipl: {loyal_spnd: 5}\n",
            "settings.yaml:1:8: aipl: unknown key ('loyal_spnd' was unexpected)",
        ),
        (
            "features:\n  x: {count: orders, within: 3 days}\n",
            "settings.yaml:2:30: features.x.within: '3 days' does not match '^[0-9]+[smhdw]$'",
        ),
        (
            "features:\n  x: {count: order}\n",
            "settings.yaml:2:14: features.x.count: unknown source 'order'; use one of: orders, "
            "refunds, friend.added, friend.deleted, group.joined, group.left, coupon.redeemed, "
            "message.replied, referral.made, balance.topped_up, membership.bought",
        ),
        (
            "features:\n  x: {count: orders, where: 'categroy == \"a\"'}\n",
            "settings.yaml:2:30: features.x.where: unknown field 'categroy' "
            "(did you mean 'category'?)",
        ),
        (
            "features:\n  x: {count: orders, where: 'amount > '}\n",
            "settings.yaml:2:38: features.x.where: expected a value after '>'",
        ),
        (
            "features:\n  total_spend: {count: orders}\n",
            "settings.yaml:2:16: features.total_spend: 'total_spend' is a built-in field",
        ),
        (
            "features:\n  x: {sum: orders, field: category}\n",
            "settings.yaml:2:27: features.x.field: sum needs a number field; category is string",
        ),
        ("features:\n  x: {sum: orders}\n", "settings.yaml:2:6: features.x: sum needs a field"),
        (
            "features:\n  x: {count: orders, sum: orders}\n",
            "settings.yaml:2:6: features.x: give exactly one of count, sum, min, max or last",
        ),
        (
            "lifecycle: {active_days: 100}\n",
            "settings.yaml:1:12: lifecycle: need active_days <= silent_days <= sleeping_days",
        ),
        ("timezone: Mars/Olympus\n", "settings.yaml:1:11: timezone: unknown timezone"),
        ("a: [1\n", "settings.yaml:2:1: invalid YAML"),
    ],
)
def test_problems_point_at_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    first = str(caught.value).splitlines()[0]
    assert first.split("settings.yaml", 1)[1].startswith(message.split("settings.yaml", 1)[1])


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = "features:\n  a: {count: nope}\n  b: {sum: orders}\n"
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    assert len(str(caught.value).splitlines()) == 2


def test_example_settings_file_loads() -> None:
    example = Path(__file__).parent.parent / "docs" / "settings.example.yaml"
    settings = load_settings(str(example))
    assert settings.custom_features


EXPORT = """\
export:
  wecom:
    token_env: MY_WECOM_TOKEN
    tag_ids: {vip: etAAA, 沉睡: etBBB}
  sms:
    provider: tencent
    sign_name: 品牌
    template_code: 1234567
    sdk_app_id: 1400000000
    default_region: HK
  wechat_template:
    template_id: TPL
    url: https://example.com/c
    data: {first: "{message}", remark: "{name}"}
  webhook: {batch_size: 100, timeout: 3, backoff: 1}
"""


def test_export_section_loads(tmp_path: Path) -> None:
    export = load_settings(write(tmp_path, EXPORT)).export
    assert export.wecom.token_env == "MY_WECOM_TOKEN"
    assert export.wecom.tag_ids == {"vip": "etAAA", "沉睡": "etBBB"}
    assert export.wecom.monthly_limit == 4  # a default
    # Numeric ids written unquoted are kept as the strings the APIs take.
    assert (export.sms.provider, export.sms.template_code, export.sms.sdk_app_id) == (
        "tencent",
        "1234567",
        "1400000000",
    )
    assert (export.sms.default_region, export.sms.param) == ("HK", "content")
    assert export.wechat_template.url == "https://example.com/c"
    assert export.wechat_template.data == {"first": "{message}", "remark": "{name}"}
    assert (export.webhook.batch_size, export.webhook.timeout) == (100, 3.0)
    assert (export.webhook.backoff, export.webhook.max_backoff) == (1.0, 60.0)


def test_export_defaults() -> None:
    for settings in (Settings(), load_settings(None)):
        assert settings.export.sms.provider == "aliyun"
        assert settings.export.wechat_template.data == {"first": "{message}"}
        assert settings.export.wecom.tag_ids == {}
    hash(Settings())  # still hashable


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "export:\n  wecom: {tag_idz: {}}\n",
            "settings.yaml:2:11: export.wecom: unknown key ('tag_idz' was unexpected)",
        ),
        ("export:\n  smss: {}\n", "settings.yaml:2:3: export: unknown key ('smss' was unexpected)"),
        (
            "export:\n  sms:\n    provider: twilio\n",
            "settings.yaml:3:15: export.sms.provider: 'twilio' is not one of",
        ),
        (
            "export:\n  sms: {default_region: ZZ}\n",
            "settings.yaml:2:25: export.sms.default_region: unknown region 'ZZ'",
        ),
        (
            "export:\n  webhook: {backoff: 10, max_backoff: 5}\n",
            "settings.yaml:2:39: export.webhook.max_backoff: need backoff <= max_backoff",
        ),
        (
            "export:\n  wechat_template:\n    template_id: T\n    data: {first: 1}\n",
            "settings.yaml:4:19: export.wechat_template.data.first: 1 is not of type 'string'",
        ),
        (
            "export:\n  wecom:\n    tag_ids: {vip: ''}\n",
            "settings.yaml:3:20: export.wecom.tag_ids.vip: '' should be non-empty",
        ),
    ],
)
def test_export_problems_point_at_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text))
    first = str(caught.value).splitlines()[0]
    assert first.split("settings.yaml", 1)[1].startswith(message.split("settings.yaml", 1)[1])
