"""The `playbook` command: exit codes and output, through click's CliRunner."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.store import open_store
from tests.conftest import load_small_dataset, write_csv


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = tmp_path / "s.db"
    with open_store(path) as store:
        load_small_dataset(store, tmp_path)
    return str(path)


def test_ingest_reports_counts(runner: CliRunner, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", ["id", "name"], [["00001", "A"], ["00002", "B"]])
    db = str(tmp_path / "new.db")
    result = runner.invoke(
        cli, ["ingest", "customers", str(path), "--map", "customer_id=id", "--db", db]
    )
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"{path}: 2 rows read; 2 added, 0 updated, 0 already in the store, 0 rejected\n"
    )
    again = runner.invoke(
        cli, ["ingest", "customers", str(path), "--map", "customer_id=id", "--db", db]
    )
    assert "0 added, 0 updated, 2 already in the store" in again.output


def test_ingest_with_rejects_exits_1_and_shows_them(runner: CliRunner, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "o.csv",
        ["customer_id", "ts", "amount"],
        [["1", "2024-01-01", "5"], ["", "2024-01-01", "5"], ["2", "soon", "5"]],
    )
    result = runner.invoke(cli, ["ingest", "orders", str(path), "--db", str(tmp_path / "s.db")])
    assert result.exit_code == 1
    rejects = tmp_path / "o.rejects.csv"
    assert result.output == (
        f"{path}: 3 rows read; 1 added, 0 updated, 0 already in the store, 2 rejected; "
        "1 new customers created from orders\n"
        f"rejected rows (first 2 of 2; all of them are in {rejects}):\n"
        "  line 3: missing customer_id\n"
        "  line 4: ts: not an ISO 8601 time: 'soon'\n"
    )
    assert rejects.exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ingest", "orders", "missing.csv"], 1, "missing.csv: no such file"),
        (["ingest", "orders", "x.csv", "--map", "amout=x"], 2, "orders have no field 'amout'"),
        (["ingest", "orders", "x.csv", "--timezone", "Mars/Base"], 2, "unknown timezone"),
        (["features", "--as-of", "last week"], 2, "--as-of: not an ISO 8601 time"),
        (["features", "--customer", "nobody"], 1, "no customer 'nobody' as of"),
        (["features", "--columns", "total_spnd"], 2, "--columns: unknown total_spnd"),
        (["ingest", "parcels", "x.csv"], 2, "'parcels' is not one of 'customers'"),
    ],
)
def test_errors_have_a_message_and_an_exit_code(
    runner: CliRunner,
    db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("x.csv").write_text("customer_id,ts,amount\n", "utf-8")
    result = runner.invoke(cli, [*args, "--db", db])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_not_a_store(runner: CliRunner, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("hello, this is not sqlite" * 100)
    result = runner.invoke(cli, ["features", "--db", str(bogus)])
    assert result.exit_code == 1
    assert "not a playbook store" in result.output


def test_features_jsonl(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        cli, ["features", "--as-of", "2024-06-01", "--format", "jsonl", "--db", db]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["customer_id"] for r in rows] == [
        "00001",
        "00002",
        "00003",
        "00004",
        "00006",
        "00007",
        "00008",
    ]
    assert rows[0]["last_order_at"] == "2024-05-02T10:00:00+08:00"
    assert rows[0]["tags"] == ["kol", "vip"]
    assert rows[1]["lifecycle"] == "sleeping"


def test_features_csv_has_every_column(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        cli, ["features", "--as-of", "2024-06-01", "--format", "csv", "--db", db]
    )
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert len(table) == 7
    assert table[0]["rfm_segment"] == "general_value"
    assert table[0]["tags"] == '["kol", "vip"]'
    assert "days_since_first_order" in table[0]


def test_features_table_for_one_customer(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        cli, ["features", "--as-of", "2024-06-01", "--customer", "00002", "--db", db]
    )
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["field", "value"]
    assert "lifecycle               sleeping" in result.output
    assert "aipl_stage              L" in result.output


def test_features_table_columns(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        cli,
        [
            "features",
            "--as-of",
            "2024-06-01",
            "--columns",
            "customer_id,name,lifecycle",
            "--db",
            db,
        ],
    )
    lines = result.output.splitlines()
    assert lines[0].split() == ["customer_id", "name", "lifecycle"]
    assert lines[2].split() == ["00001", "张三", "active"]


def test_fields_json_includes_custom_features(runner: CliRunner, tmp_path: Path) -> None:
    settings = tmp_path / "s.yaml"
    settings.write_text("features:\n  n_coupons: {count: coupon.redeemed}\n", "utf-8")
    result = runner.invoke(cli, ["fields", "--format", "json", "--settings", str(settings)])
    fields = {f["name"]: f for f in json.loads(result.output)}
    assert fields["lifecycle"]["values"] == ["prospect", "active", "silent", "sleeping", "churned"]
    assert fields["n_coupons"]["group"] == "custom"


def test_report_json_on_the_hand_computed_data(runner: CliRunner, db: str) -> None:
    result = runner.invoke(cli, ["report", "--as-of", "2024-06-01", "--format", "json", "--db", db])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["customers"], report["buyers"], report["revenue"]) == (7, 6, 4230.0)
    funnel = {s["stage"]: (s["reached"], s["current"]) for s in report["funnel"]}
    assert funnel == {"A": (7, 0), "I": (7, 1), "P": (6, 5), "L": (1, 1)}
    lifecycle = {s["name"]: s["customers"] for s in report["lifecycle"]}
    assert lifecycle == {"prospect": 1, "active": 2, "silent": 1, "sleeping": 2, "churned": 1}
    health = {h["name"]: h["value_pct"] for h in report["health"]}
    assert health["buyers with more than one category"] == 16.7
    assert health["buyers who repurchased (2+ orders)"] == 16.7
    # The top 20% of 6 buyers rounds up to 2: 2100 + 1000 of 4230.
    assert health["revenue from the top 20% of buyers"] == 73.3


def test_report_table(runner: CliRunner, db: str) -> None:
    result = runner.invoke(cli, ["report", "--as-of", "2024-06-01", "--db", db])
    assert result.exit_code == 0
    assert "AIPL funnel" in result.output and "important_develop" in result.output


def test_demo_creates_a_store_and_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    first = runner.invoke(cli, ["demo", "--customers", "300", "--as-of", "2024-06-01", "--db", db])
    assert first.exit_code == 0, first.output
    assert first.output.startswith(f"Created {db}: 300 customers")
    assert "Lifecycle" in first.output
    second = runner.invoke(cli, ["demo", "--customers", "300", "--db", db])
    assert second.exit_code == 1
    assert "already has data" in second.output
    third = runner.invoke(
        cli, ["demo", "--customers", "300", "--as-of", "2024-06-01", "--replace", "--db", db]
    )
    assert third.exit_code == 0
    assert third.output == first.output
