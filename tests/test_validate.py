"""Playbook validation: the golden corpus of broken playbooks, the examples, and the CLI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cli import cli
from engine.errors import InputError
from engine.playbook import check_playbook_file, load_playbook
from engine.settings import Settings

ROOT = Path(__file__).parent.parent
BAD = sorted((ROOT / "tests" / "data" / "bad").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "playbooks").glob("*.yaml"))


def test_the_corpus_is_big_enough() -> None:
    assert len(BAD) >= 40


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_broken_playbook_gives_exactly_the_expected_diagnostics(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    relative = path.relative_to(ROOT)
    playbook, diagnostics = check_playbook_file(str(relative), Settings())
    assert playbook is None
    expected = path.with_suffix(".expected").read_text("utf-8")
    assert "".join(d.format() + "\n" for d in diagnostics) == expected


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_playbook_validates_cleanly(path: Path) -> None:
    playbook, diagnostics = check_playbook_file(path, Settings())
    assert diagnostics == []
    assert playbook is not None and playbook.rules


def test_lifecycle_playbook_model() -> None:
    playbook = load_playbook(ROOT / "playbooks" / "lifecycle.yaml", Settings())
    assert playbook.holdout == 0.10
    assert playbook.quiet_hours == (21 * 60 + 30, 9 * 60)
    assert [(c.max, c.window, c.window_seconds, c.channel) for c in playbook.caps] == [
        (2, "7d", 7 * 86_400, None),
        (4, "calendar_month", None, "wecom"),
    ]
    rules = {r.id: r for r in playbook.rules}
    assert rules["sleeping-big-promo"].cooldown_seconds == 30 * 86_400
    assert rules["sleeping-big-promo"].group == "promo"
    assert rules["third-purchase-vip"].on == "order.created"
    assert [a.kind for a in rules["loyal-thank-you"].actions] == ["tag", "task"]
    assert rules["loyal-thank-you"].priority == 100
    assert playbook.coupons["BIG50"].budget == 2000
    assert len(playbook.content_hash) == 64


def test_load_playbook_raises_with_every_error() -> None:
    with pytest.raises(InputError) as caught:
        load_playbook(ROOT / "tests" / "data" / "bad" / "55-many-problems.yaml", Settings())
    assert len(str(caught.value).splitlines()) == 8


def test_custom_features_are_valid_fields(tmp_path: Path) -> None:
    settings_file = tmp_path / "s.yaml"
    settings_file.write_text("features:\n  n_coupons: {count: coupon.redeemed}\n", "utf-8")
    playbook = tmp_path / "p.yaml"
    playbook.write_text(
        "playbook: p\nversion: 1\nrules:\n  - id: r\n    when: n_coupons >= 2\n"
        "    then:\n      - tag: {add: [coupon-lover]}\n",
        "utf-8",
    )
    from engine.settings import load_settings

    assert check_playbook_file(playbook, load_settings(str(settings_file)))[1] == []
    assert "unknown field 'n_coupons'" in check_playbook_file(playbook, Settings())[1][0].message


def test_cli_validate_text_and_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", "playbooks"])
    assert ok.exit_code == 0, ok.output
    plural = "s" if len(EXAMPLES) > 1 else ""
    assert f"{len(EXAMPLES)} playbook{plural} checked: 0 errors, 0 warnings" in ok.output
    bad = runner.invoke(
        cli, ["validate", "tests/data/bad/01-unknown-field.yaml", "playbooks/lifecycle.yaml"]
    )
    assert bad.exit_code == 1
    assert bad.output.splitlines()[0] == (
        "tests/data/bad/01-unknown-field.yaml:7:11: rules[0].when: unknown field 'totl_spend' "
        "(did you mean 'total_spend'?)"
    )
    assert "2 playbooks checked: 1 error, 0 warnings" in bad.output
    missing = runner.invoke(cli, ["validate", "nope.yaml"])
    assert missing.exit_code == 2
    assert "nope.yaml: no such file or folder" in missing.output


def test_cli_validate_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(
        cli, ["validate", "--format", "json", "tests/data/bad/55-many-problems.yaml"]
    )
    assert result.exit_code == 1
    found = json.loads(result.output)
    assert found[1] == {
        "file": "tests/data/bad/55-many-problems.yaml",
        "line": 7,
        "col": 11,
        "path": "rules[0].when",
        "severity": "error",
        "message": "unknown field 'totl_spend'",
        "hint": "did you mean 'total_spend'?",
    }
    assert [d["severity"] for d in found] == ["error"] * 8


def test_cli_schema_prints_the_shipped_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(CliRunner().invoke(cli, ["schema", "settings"]).output)["title"]


def _walk(node: object, path: str = "") -> list[tuple[str, dict[str, object]]]:
    found = []
    if isinstance(node, dict):
        if "properties" in node:
            for key, value in node["properties"].items():
                found.append((f"{path}.{key}", value))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item, path))
    return found


def test_every_schema_property_has_help_for_editors() -> None:
    schema = json.loads((ROOT / "schemas" / "playbook.schema.json").read_text("utf-8"))
    for where, prop in _walk(schema):
        assert prop.get("description"), where
        assert prop.get("examples"), where


LIFECYCLE = (ROOT / "playbooks" / "lifecycle.yaml").read_text("utf-8")
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5000)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, len(LIFECYCLE)), length=st.integers(0, 40), insert=st.text(max_size=20))
def test_validator_never_crashes_on_mangled_text(start: int, length: int, insert: str) -> None:
    text = LIFECYCLE[:start] + insert + LIFECYCLE[start + length :]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yaml"
        path.write_text(text, "utf-8")
        playbook, diagnostics = check_playbook_file(path, Settings())
    assert (playbook is None) == any(d.severity == "error" for d in diagnostics)
    for d in diagnostics:
        assert d.line >= 0 and d.col >= 0 and d.message


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_validator_never_crashes_on_odd_values(data: st.DataObject) -> None:
    document = yaml.safe_load(LIFECYCLE)
    node = document
    # Walk to a random place in the document and replace it with a random value.
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    if isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        node[data.draw(st.sampled_from(keys))] = data.draw(_values)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True), "utf-8")
        check_playbook_file(path, Settings())


def test_huge_files_are_refused_without_reading_them_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("playbook: x\n" + "# padding\n" * 120_000, "utf-8")
    playbook, diagnostics = check_playbook_file(path, Settings())
    assert playbook is None
    assert [d.message for d in diagnostics] == [
        f"file is {path.stat().st_size:,} bytes; the limit is 1,000,000"
    ]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "gbk.yaml"
    path.write_bytes("playbook: 生命周期\n".encode("gbk"))
    (diagnostic,) = check_playbook_file(path, Settings())[1]
    assert diagnostic.message.startswith("not UTF-8 text")


COUPON_LINKS = """\
playbook: p
version: 1
coupons:
  BIG50:
    value: 50
    description: 满500减50
    url: https://example.com/c/BIG50
    miniprogram:
      appid: wx8bd80126147dfAAA
      page: pages/coupon?code=BIG50
      title: 领券
      pic_media_id: MEDIA
  SMALL10: {value: 10}
templates:
  t: "送你券 {{ coupon.code }}"
rules:
  - id: r
    when: is_friend
    then:
      - send: {channel: wecom, template: t, coupon: BIG50}
      - send: {channel: wecom, template: t, coupon: SMALL10}
"""


def test_coupon_url_and_miniprogram(tmp_path: Path) -> None:
    from engine.playbook.model import MiniProgram

    path = tmp_path / "p.yaml"
    path.write_text(COUPON_LINKS, "utf-8")
    playbook = load_playbook(path, Settings())
    big, small = playbook.coupons["BIG50"], playbook.coupons["SMALL10"]
    assert big.url == "https://example.com/c/BIG50"
    assert big.miniprogram == MiniProgram(
        appid="wx8bd80126147dfAAA",
        page="pages/coupon?code=BIG50",
        title="领券",
        pic_media_id="MEDIA",
    )
    assert (small.url, small.miniprogram) == (None, None)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "url: https://example.com/c/BIG50",
            "url: example.com/c/BIG50",
            "p.yaml:7:10: coupons.BIG50.url: 'example.com/c/BIG50' is not a web link "
            "(it must start with https:// or http://)",
        ),
        (
            "      page: pages/coupon?code=BIG50\n",
            "",
            "p.yaml:9:7: coupons.BIG50.miniprogram: missing required key 'page'",
        ),
        (
            "      title: 领券\n",
            "      title: 领券\n      path: x\n",
            "p.yaml:12:7: coupons.BIG50.miniprogram.path: unknown key 'path' "
            "(allowed: appid, page, title, pic_media_id)",
        ),
    ],
)
def test_coupon_link_problems_point_at_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(COUPON_LINKS.replace(old, new), "utf-8")
    playbook, diagnostics = check_playbook_file("p.yaml", Settings())
    assert playbook is None
    assert diagnostics[0].format().startswith(expected)


def _wecom_playbook(template: str, action: str) -> str:
    return (
        "playbook: p\nversion: 1\ngroups:\n  vip: {join_url: 'https://e.com/j'}\n"
        f"templates:\n  long: {json.dumps(template, ensure_ascii=False)}\n"
        f"rules:\n  - id: r\n    when: is_friend\n    then:\n      - {action}\n"
    )


SEND_WECOM = "send: {channel: wecom, template: long}"
SEND_SMS = "send: {channel: sms, template: long}"
INVITE = "invite_group: {group: vip, template: long}"
NAME = "{{ customer.name }}"


@pytest.mark.parametrize(
    ("template", "action", "size"),
    [
        ("好" * 1333 + "a" + NAME, SEND_WECOM, None),  # 4,000 bytes of fixed text
        ("好" * 1333 + "ab", SEND_WECOM, "4,001 bytes"),
        ("好" * 1334 + NAME, SEND_WECOM, "4,002 bytes of fixed text (without {{ }} values)"),
        (NAME + "a" * 4001 + NAME, INVITE, "4,001 bytes of fixed text (without {{ }} values)"),
        ("a" * 4001 + NAME, SEND_SMS, None),  # not a WeCom message
        ("a" * 3990 + NAME * 40, SEND_WECOM, None),  # only the filled-in values may be long
        ("a{% if customer.name %}" + "b" * 4001 + "{% endif %}", SEND_WECOM, None),
        ("a{# " + "b" * 4001 + " #}", SEND_WECOM, None),
    ],
)
def test_wecom_template_fixed_text_over_4000_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str, action: str, size: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(_wecom_playbook(template, action), "utf-8")
    playbook, diagnostics = check_playbook_file("p.yaml", Settings())
    if size is None:
        assert [d for d in diagnostics if d.severity == "error"] == []
        assert playbook is not None
    else:
        assert [d.format() for d in diagnostics if d.severity == "error"] == [
            f"p.yaml:6:9: templates.long: template is {size}; WeCom mass messages take at "
            "most 4,000 (shorten it)"
        ]
