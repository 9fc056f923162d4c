"""Export: due actions to files (atomic), expiry, the state machine, receipts (`ack`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InputError, StoreError, UsageError
from engine.export import ack, export
from engine.export.core import _export_lock
from engine.settings import Settings
from engine.store import Store

SETTINGS = Settings()
NOW = 1_717_200_000  # 2024-06-01 08:00 +08:00
DAY = 86_400


def add_customer(store: Store, cid: str, **fields: Any) -> None:
    row = {
        "customer_id": cid,
        "name": f"客户{cid}",
        "external_userid": f"wm{cid}",
        "owner": "staff_li",
        "phone": "13800138000",
        "props": json.dumps({"openid": f"o{cid}"}),
    }
    row.update(fields)
    with store.transaction() as conn:
        conn.execute(
            f"INSERT INTO customers ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )


def queue_action(store: Store, action_id: str, customer: str, **fields: Any) -> None:
    """One queue row as a run would write it (pending, due at NOW - 1h unless told)."""
    row: dict[str, Any] = {
        "action_id": action_id,
        "run_id": "run1",
        "playbook": "p",
        "playbook_version": 1,
        "playbook_hash": "h",
        "rule_id": "r",
        "customer_id": customer,
        "trigger": f"entry:{action_id}",
        "action_index": 0,
        "type": "send",
        "channel": "wecom",
        "message": f"你好 {customer}",
        "decided_at": NOW - 3600,
        "scheduled_at": NOW - 3600,
        "expires_at": NOW + 7 * DAY,
        "status": "pending",
    }
    row.update(fields)
    with store.transaction() as conn:
        conn.execute(
            f"INSERT INTO actions ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text("utf-8"))))


def statuses(store: Store) -> dict[str, str]:
    return dict(store.conn.execute("SELECT action_id, status FROM actions ORDER BY 1"))


@pytest.fixture
def queued(store: Store) -> Store:
    """Three customers; a due WeCom message, an SMS, a task, a tag, one not yet due, one
    expired, one already exported."""
    for cid in ("c1", "c2", "c3"):
        add_customer(store, cid)
    queue_action(store, "a-wecom", "c1")
    queue_action(store, "a-sms", "c2", channel="sms", message="短信 c2")
    queue_action(
        store, "a-task", "c3", type="task", channel=None, assign_to="staff_wang", note="回访"
    )
    queue_action(store, "a-tag", "c1", type="tag", channel=None, message=None, tags_added="vip")
    queue_action(store, "a-later", "c2", scheduled_at=NOW + 3600)
    queue_action(store, "a-old", "c3", scheduled_at=NOW - 9 * DAY, expires_at=NOW - 2 * DAY)
    queue_action(store, "a-done", "c3", status="exported")
    return store


def test_csv_export_writes_due_actions_and_marks_them_exported(
    queued: Store, tmp_path: Path
) -> None:
    out = tmp_path / "actions.csv"
    result = export(queued, SETTINGS, "csv", out=out, now=NOW)
    rows = read_csv(out)
    assert sorted(r["action_id"] for r in rows) == ["a-sms", "a-tag", "a-task", "a-wecom"]
    assert result.exported == 4 and result.expired == 1 and result.batches == 1
    assert statuses(queued) == {
        "a-done": "exported",
        "a-later": "pending",
        "a-old": "expired",
        "a-sms": "exported",
        "a-tag": "exported",
        "a-task": "exported",
        "a-wecom": "exported",
    }
    # Personal data only where the channel needs it.
    by_id = {r["action_id"]: r for r in rows}
    assert by_id["a-sms"]["phone"] == "13800138000"
    assert by_id["a-wecom"]["phone"] == "" and by_id["a-wecom"]["external_userid"] == "wmc1"
    assert by_id["a-sms"]["external_userid"] == ""
    assert by_id["a-wecom"]["scheduled_at"].endswith("+08:00")
    # Nothing is left due: a second export writes nothing and marks nothing.
    again = export(queued, SETTINGS, "csv", out=tmp_path / "again.csv", now=NOW)
    assert again.exported == 0 and not (tmp_path / "again.csv").exists()


def test_jsonl_export_with_filters_and_limit(queued: Store, tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    result = export(queued, SETTINGS, "jsonl", out=out, channel="wecom", limit=1, now=NOW)
    records = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert [r["action_id"] for r in records] == ["a-wecom"]
    assert records[0]["message"] == "你好 c1" and records[0]["phone"] is None
    assert result.exported == 1
    assert statuses(queued)["a-sms"] == "pending"


def test_an_existing_file_is_not_overwritten_unless_asked(queued: Store, tmp_path: Path) -> None:
    out = tmp_path / "a.csv"
    out.write_text("keep me", "utf-8")
    with pytest.raises(UsageError, match="exists"):
        export(queued, SETTINGS, "csv", out=out, now=NOW)
    assert out.read_text("utf-8") == "keep me"
    assert statuses(queued)["a-wecom"] == "pending"
    export(queued, SETTINGS, "csv", out=out, overwrite=True, now=NOW)
    assert "a-wecom" in out.read_text("utf-8")


def test_tasks_export_one_csv_per_staff_member(queued: Store, tmp_path: Path) -> None:
    queue_action(
        queued, "a-task2", "c1", type="task", channel=None, assign_to="staff/li", note="送小样"
    )
    result = export(queued, SETTINGS, "tasks", out=tmp_path / "tasks", now=NOW)
    files = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert files == ["staff_li.csv", "staff_wang.csv"]
    rows = read_csv(tmp_path / "tasks" / "staff_wang.csv")
    assert [(r["customer_id"], r["name"], r["reason"]) for r in rows] == [("c3", "客户c3", "回访")]
    assert "phone" not in rows[0]
    assert result.exported == 2
    assert statuses(queued)["a-wecom"] == "pending"  # tasks only


def test_a_failed_write_leaves_no_file_and_the_actions_pending(
    queued: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a.csv"

    def broken(*_args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("engine.export.core.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        export(queued, SETTINGS, "csv", out=out, now=NOW)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    # The claimed batch is resolved by the next export: the file is not in place, so
    # its actions went back to pending and are written now.
    result = export(queued, SETTINGS, "csv", out=out, now=NOW)
    assert result.recovered == {"returned_to_pending": 4}
    assert result.exported == 4 and out.exists()


def test_a_file_renamed_before_the_crash_is_recognised(
    queued: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a.csv"
    real = Store.transaction
    calls = {"n": 0}

    def crash_on_the_last_commit(self: Store) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # expire, claim, then: mark exported
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Store, "transaction", crash_on_the_last_commit)
    with pytest.raises(KeyboardInterrupt):
        export(queued, SETTINGS, "csv", out=out, now=NOW)
    monkeypatch.undo()
    assert out.exists() and statuses(queued)["a-wecom"] == "exporting"
    result = export(queued, SETTINGS, "csv", out=tmp_path / "b.csv", now=NOW)
    assert result.recovered == {"exported": 4} and result.exported == 0
    assert statuses(queued)["a-wecom"] == "exported"


def test_usage_errors(queued: Store, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--to must be one of"):
        export(queued, SETTINGS, "fax", out=tmp_path / "x", now=NOW)
    with pytest.raises(UsageError, match="needs -o FILE"):
        export(queued, SETTINGS, "csv", now=NOW)
    with pytest.raises(UsageError, match="needs --url"):
        export(queued, SETTINGS, "webhook", now=NOW)
    with pytest.raises(UsageError, match="writes files"):
        export(queued, SETTINGS, "csv", url="http://127.0.0.1:9/", now=NOW)
    with pytest.raises(UsageError, match="no such directory"):
        export(queued, SETTINGS, "csv", out=tmp_path / "nope" / "a.csv", now=NOW)
    with pytest.raises(UsageError, match="WECOM_ACCESS_TOKEN"):
        export(queued, SETTINGS, "wecom", url="http://127.0.0.1:9", now=NOW, env={})
    with pytest.raises(UsageError, match="PLAYBOOK_WEBHOOK_SECRET"):
        export(queued, SETTINGS, "webhook", url="http://127.0.0.1:9", now=NOW, env={})
    assert statuses(queued)["a-wecom"] == "pending"


def test_one_export_at_a_time(queued: Store, tmp_path: Path) -> None:
    with (
        _export_lock(queued),
        pytest.raises(StoreError, match="another `playbook export` is running"),
    ):
        export(queued, SETTINGS, "csv", out=tmp_path / "a.csv", now=NOW)
    assert export(queued, SETTINGS, "csv", out=tmp_path / "a.csv", now=NOW).exported == 4


def test_retry_failed_puts_failed_actions_back(queued: Store, tmp_path: Path) -> None:
    with queued.transaction() as conn:
        conn.execute("UPDATE actions SET status = 'failed', error = 'x' WHERE action_id = 'a-sms'")
    first = export(queued, SETTINGS, "csv", out=tmp_path / "a.csv", now=NOW)
    assert first.exported == 3
    second = export(queued, SETTINGS, "csv", out=tmp_path / "b.csv", retry_failed=True, now=NOW)
    assert second.exported == 1 and statuses(queued)["a-sms"] == "exported"


# --------------------------------------------------------------------------- receipts


def exported(store: Store, tmp_path: Path) -> None:
    export(store, SETTINGS, "csv", out=tmp_path / "sent.csv", now=NOW)


def test_ack_csv_moves_actions_to_delivered_and_failed(queued: Store, tmp_path: Path) -> None:
    exported(queued, tmp_path)
    receipts = tmp_path / "r.csv"
    receipts.write_text(
        "action_id,status,error,at\n"
        "a-wecom,delivered,,2024-06-01T09:00:00+08:00\n"
        "a-sms,failed,号码停机,\n",
        "utf-8",
    )
    result = ack(queued, receipts, now=NOW)
    assert (result.delivered, result.failed, result.unchanged) == (1, 1, 0)
    rows = {
        r[0]: r[1:]
        for r in queued.conn.execute("SELECT action_id, status, error, result_at FROM actions")
    }
    assert rows["a-wecom"] == ("delivered", None, NOW + 3600)
    assert rows["a-sms"] == ("failed", "号码停机", NOW)
    again = ack(queued, receipts, now=NOW)
    assert again.unchanged == 2 and again.delivered == 0


def test_ack_json_and_jsonl(queued: Store, tmp_path: Path) -> None:
    exported(queued, tmp_path)
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps([{"action_id": "a-wecom", "status": "delivered"}]), "utf-8")
    assert ack(queued, as_json, now=NOW).delivered == 1
    lines = tmp_path / "r.jsonl"
    lines.write_text(
        '{"action_id": "a-sms", "status": "failed"}\n'
        '{"action_id": "a-tag", "status": "delivered"}\n',
        "utf-8",
    )
    result = ack(queued, lines, now=NOW)
    assert (result.delivered, result.failed) == (1, 1)


def test_a_bad_receipts_file_changes_nothing_and_says_where(queued: Store, tmp_path: Path) -> None:
    exported(queued, tmp_path)
    before = statuses(queued)
    receipts = tmp_path / "r.csv"
    receipts.write_text(
        "action_id,status\na-wecom,delivered\nnope,delivered\na-sms,lost\na-later,delivered\n",
        "utf-8",
    )
    with pytest.raises(InputError) as info:
        ack(queued, receipts, now=NOW)
    message = str(info.value)
    assert f"{receipts}:3: no action 'nope'" in message
    assert f"{receipts}:4: status 'lost' is not one of delivered, failed" in message
    assert f"{receipts}:5: action a-later is pending" in message
    assert "nothing was applied" in message
    assert statuses(queued) == before
    with pytest.raises(InputError, match="header needs columns action_id and status"):
        (tmp_path / "h.csv").write_text("id,state\n1,2\n", "utf-8")
        ack(queued, tmp_path / "h.csv")
    with pytest.raises(InputError, match="no such file"):
        ack(queued, tmp_path / "missing.csv")


# --------------------------------------------------------------------------- the CLI


def test_cli_export_and_ack(queued: Store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import cli

    runner = CliRunner()
    db = ["--db", queued.path, "--now", "2024-06-01T08:00:00+08:00"]
    out = tmp_path / "a.csv"
    done = runner.invoke(cli, ["export", "--to", "csv", "-o", str(out), *db])
    assert done.exit_code == 0, done.output
    assert "4 actions written to" in done.output and "1 expired" in done.output
    again = runner.invoke(cli, ["export", "--to", "csv", "-o", str(out), *db])
    assert again.exit_code == 2 and "exists; choose another name or pass --overwrite" in (
        again.output
    )
    missing = runner.invoke(cli, ["export", "--to", "webhook", "--db", queued.path])
    assert missing.exit_code == 2 and "--to webhook needs --url URL" in missing.output
    receipts = tmp_path / "r.csv"
    receipts.write_text("action_id,status\na-wecom,delivered\n", "utf-8")
    acked = runner.invoke(cli, ["ack", str(receipts), "--db", queued.path])
    assert acked.exit_code == 0 and "1 delivered, 0 failed" in acked.output
    bad = tmp_path / "bad.csv"
    bad.write_text("action_id,status\nzzz,delivered\n", "utf-8")
    refused = runner.invoke(cli, ["ack", str(bad), "--db", queued.path])
    assert refused.exit_code == 1 and f"{bad}:2: no action 'zzz'" in refused.output
    assert "Traceback" not in refused.output


def test_cli_export_exits_1_when_actions_fail(store: Store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import cli

    add_customer(store, "c1", phone="12345")
    queue_action(store, "s1", "c1", channel="sms", message="hi")
    settings = tmp_path / "s.yaml"
    settings.write_text(
        "export:\n  sms:\n    provider: aliyun\n    sign_name: 品牌\n    template_code: SMS_1\n",
        "utf-8",
    )
    result = CliRunner().invoke(
        cli,
        [
            "export",
            "--to",
            "sms",
            "-o",
            str(tmp_path / "s.jsonl"),
            "--db",
            store.path,
            "--settings",
            str(settings),
            "--now",
            "2024-06-01T08:00:00+08:00",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "1 failed" in result.output and "--retry-failed" in result.output
    assert statuses(store) == {"s1": "failed"}
    error = store.conn.execute("SELECT error FROM actions").fetchone()[0]
    assert "12345" in error


def test_queue_shows_why_an_action_failed(store: Store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import cli

    add_customer(store, "c1", external_userid=None)
    queue_action(store, "w1", "c1")
    export(store, SETTINGS, "wecom", out=tmp_path / "w.jsonl", now=NOW)
    shown = CliRunner().invoke(cli, ["queue", "--status", "failed", "--db", store.path])
    assert shown.exit_code == 0
    assert "w1" in shown.output and "external_userid" in shown.output
