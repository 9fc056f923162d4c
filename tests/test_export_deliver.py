"""Export over HTTP against a real server on 127.0.0.1: webhook batches signed per Standard
Webhooks (checked with an independent implementation), WeCom tasks per sender, retries,
410, receipts; and no loss / no new duplicate ids when an export is killed mid-request."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from engine.export import ack, export
from engine.export.http import Poster, RetryPolicy
from engine.export.model import ExportConfig, WebhookConfig, WecomConfig
from engine.settings import Settings
from engine.store import Store, open_store
from tests.loopback import LoopbackServer
from tests.test_export import NOW, add_customer, queue_action, statuses

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
ENV = {"PLAYBOOK_WEBHOOK_SECRET": SECRET, "WECOM_ACCESS_TOKEN": "tok-123"}
REPO = Path(__file__).resolve().parents[1]


def settings(batch_size: int = 2, monthly_limit: int = 4) -> Settings:
    return Settings(
        export=ExportConfig(
            webhook=WebhookConfig(batch_size=batch_size, timeout=2.0, max_attempts=3),
            wecom=WecomConfig(monthly_limit=monthly_limit, tag_ids={"vip": "et-vip"}),
        )
    )


def poster(**policy: Any) -> Poster:
    fields: dict[str, Any] = {"timeout": 2.0, "max_attempts": 3, "backoff": 0.01}
    fields.update(policy)
    return Poster(RetryPolicy(**fields), sleep=lambda _s: None)


def fill(store: Store, n: int, **fields: Any) -> list[str]:
    ids = []
    for i in range(n):
        cid = f"c{i:03d}"
        add_customer(store, cid, owner="staff_li" if i % 2 else "staff_wang")
        queue_action(store, f"a{i:03d}", cid, **fields)
        ids.append(f"a{i:03d}")
    return ids


def test_webhook_batches_are_signed_and_marked_sent(store: Store, loopback: Any) -> None:
    ids = fill(store, 5)
    result = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert result.sent == 5 and result.batches == 3
    received = loopback.requests
    assert [len(r.json()["actions"]) for r in received] == [2, 2, 1]
    verifier = Webhook(SECRET)
    for request in received:
        headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
        verifier.verify(request.body, headers)  # raises if the signature is wrong
        assert request.headers["webhook-id"] == request.json()["batch_id"]
        tampered = request.body.replace(b"c0", b"c9", 1)
        with pytest.raises(Exception):  # noqa: B017 - the library's own error type
            verifier.verify(tampered, headers)
    sent_ids = [a["action_id"] for r in received for a in r.json()["actions"]]
    assert sorted(sent_ids) == ids
    # Only what a webhook consumer needs: a WeCom action carries no phone number.
    assert all(a["phone"] is None for r in received for a in r.json()["actions"])
    assert set(statuses(store).values()) == {"sent"}
    batches = store.conn.execute("SELECT status, body FROM export_batches").fetchall()
    assert batches == [("sent", None)] * 3  # bodies are dropped once accepted


def test_retries_then_accepted_keep_one_webhook_id(store: Store, loopback: Any) -> None:
    fill(store, 1)
    loopback.script(500, (429, {"Retry-After": "0"}), 200)
    result = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert result.sent == 1
    assert len({r.headers["webhook-id"] for r in loopback.requests}) == 1
    assert len(loopback.requests) == 3


def test_an_unavailable_receiver_leaves_the_batch_in_flight_for_the_same_id(
    store: Store, loopback: Any
) -> None:
    fill(store, 3)
    loopback.script(500, 500, 500)
    first = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert first.stopped is not None and "stay in flight" in first.stopped
    assert sorted(statuses(store).values()) == ["exporting", "exporting", "pending"]
    in_flight = loopback.requests[0].headers["webhook-id"]
    loopback.clear()
    second = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert second.recovered == {"resent": 2} and second.sent == 3
    assert loopback.requests[0].headers["webhook-id"] == in_flight
    assert set(statuses(store).values()) == {"sent"}


def test_410_disables_the_endpoint_and_keeps_the_actions(store: Store, loopback: Any) -> None:
    fill(store, 3)
    loopback.script(410)
    result = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert result.stopped is not None and "410" in result.stopped
    assert set(statuses(store).values()) == {"pending"}
    assert len(loopback.requests) == 1
    from engine.errors import UsageError

    with pytest.raises(UsageError, match="--reenable"):
        export(store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster())
    again = export(
        store,
        settings(),
        "webhook",
        url=loopback.url,
        now=NOW,
        env=ENV,
        poster=poster(),
        reenable=True,
    )
    assert again.sent == 3


def test_other_4xx_fail_the_batch_without_retry(store: Store, loopback: Any) -> None:
    fill(store, 3)
    loopback.script(400)
    result = export(
        store, settings(), "webhook", url=loopback.url, now=NOW, env=ENV, poster=poster()
    )
    assert len(loopback.requests) == 2  # the failed batch once, then the next one
    assert sorted(statuses(store).values()) == ["failed", "failed", "sent"]
    assert result.failed == 2 and result.sent == 1


def test_wecom_tasks_per_sender_token_from_env_and_fail_list(store: Store, loopback: Any) -> None:
    fill(store, 4, message="同一条消息")
    add_customer(store, "t1")
    queue_action(store, "tag1", "t1", type="tag", channel=None, message=None, tags_added="vip")
    loopback.default({"errcode": 0, "errmsg": "ok", "fail_list": ["wmc001"], "msgid": "m1"})
    result = export(store, settings(), "wecom", url=loopback.url, now=NOW, env=ENV, poster=poster())
    bodies = {r.path: r for r in loopback.requests}
    assert all("access_token=tok-123" in p for p in bodies)
    tasks = [r.json() for r in loopback.requests if "add_msg_template" in r.path]
    assert sorted((t["sender"], sorted(t["external_userid"])) for t in tasks) == [
        ("staff_li", ["wmc001", "wmc003"]),
        ("staff_wang", ["wmc000", "wmc002"]),
    ]
    tags = [r.json() for r in loopback.requests if "mark_tag" in r.path]
    assert tags == [
        {"userid": "staff_li", "external_userid": "wmt1", "add_tag": ["et-vip"], "remove_tag": []}
    ]
    for request in loopback.requests:  # no phone numbers in anything sent to WeCom
        assert b"13800138000" not in request.body
    assert statuses(store)["a001"] == "failed"
    assert result.sent == 4 and result.failed == 1
    # Receipts from get_groupmsg_send_result for task m1.
    results = Path(store.path).with_name("wecom-result.json")
    results.write_text(
        json.dumps(
            {
                "errcode": 0,
                "msgid": "m1",
                "detail_list": [
                    {"external_userid": "wmc003", "userid": "staff_li", "status": 1},
                    {"external_userid": "wmc000", "userid": "staff_wang", "status": 2},
                    {"external_userid": "wmc002", "userid": "staff_wang", "status": 0},
                ],
            }
        ),
        "utf-8",
    )
    receipt = ack(store, results, now=NOW)
    assert (receipt.delivered, receipt.failed, receipt.waiting) == (1, 1, 1)
    assert statuses(store)["a003"] == "delivered" and statuses(store)["a000"] == "failed"
    assert statuses(store)["a002"] == "sent"


def test_wecom_monthly_limit_is_enforced_at_export(store: Store, loopback: Any) -> None:
    add_customer(store, "c1")
    for i in range(3):
        queue_action(store, f"m{i}", "c1", message=f"消息{i}", scheduled_at=NOW - 100 + i)
    result = export(
        store,
        settings(monthly_limit=2),
        "wecom",
        url=loopback.url,
        now=NOW,
        env=ENV,
        poster=poster(),
    )
    assert result.sent == 2 and result.suppressed == 1
    row = store.conn.execute("SELECT status, reason FROM actions WHERE action_id = 'm2'").fetchone()
    assert row == ("suppressed", "platform_limit")


# --------------------------------------------------------------------------- kill -9


def _cli(db: Path, settings_file: Path, url: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from engine.cli import main; main()",
        "export",
        "--to",
        "webhook",
        "--url",
        url,
        "--db",
        str(db),
        "--settings",
        str(settings_file),
        "--now",
        "2024-06-01T08:00:00+08:00",
    ]


def test_sigkill_mid_export_loses_nothing_and_resends_only_the_batch_in_flight(
    tmp_path: Path,
) -> None:
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        "export:\n  webhook:\n    batch_size: 3\n    max_attempts: 2\n    backoff: 0.01\n",
        "utf-8",
    )
    base = tmp_path / "base.db"
    with open_store(base) as store:
        ids = fill(store, 30)
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    rng = random.Random(7)
    for trial in range(20):
        db = tmp_path / f"trial{trial}.db"
        db.write_bytes(base.read_bytes())
        with LoopbackServer(hang_seconds=30) as server:
            hang_at = rng.randint(1, 9)  # the request that never gets its answer
            server.script(*([200] * (hang_at - 1)), "hang")
            process = subprocess.Popen(
                _cli(db, settings_file, server.url),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            server.wait_for(hang_at, timeout=30)
            time.sleep(rng.random() * 0.05)
            process.send_signal(signal.SIGKILL)
            process.wait()
            first = list(server.requests)
            server.clear()
            server.default(200)
            done = subprocess.run(_cli(db, settings_file, server.url), env=env, check=False)
            assert done.returncode == 0, f"trial {trial}"
            second = list(server.requests)
        with open_store(db) as store:
            assert set(statuses(store).values()) == {"sent"}, f"trial {trial}"
        accepted = first[: hang_at - 1] + second
        got = [a["action_id"] for r in accepted for a in r.json()["actions"]]
        assert sorted(got) == ids, f"trial {trial}: every action accepted exactly once"
        # The only request sent twice is the one in flight, with the same webhook id.
        assert second[0].headers["webhook-id"] == first[-1].headers["webhook-id"]
        assert second[0].body == first[-1].body
        ids_seen = [r.headers["webhook-id"] for r in first + second]
        assert len(ids_seen) - len(set(ids_seen)) == 1
