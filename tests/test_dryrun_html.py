"""The dry run's HTML report: one self-contained page, its charts drawn by plotly (checked in
headless Chromium when it is installed), its text escaped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from markupsafe import escape
from plotly.offline import get_plotlyjs

from engine.cli import cli
from engine.clock import DAY, parse_as_of
from engine.demo import generate_demo
from engine.dryrun import (
    DryRun,
    Outcome,
    RuleSummary,
    Simulation,
    StepSummary,
    compare,
    dry_run,
    steps_between,
)
from engine.dryrun_html import AGAINST_CHART_ID, CHART_IDS, render_html, write_html
from engine.playbook import Playbook, load_playbook
from engine.settings import Settings
from engine.store import open_store
from tests.conftest import SHANGHAI

SETTINGS = Settings()
PLAYBOOKS = sorted(Path("playbooks").glob("*.yaml"))
AS_OF = parse_as_of("2024-06-01", SHANGHAI)  # the demo data ends here
HOSTILE_RULE = "<script>alert(1)</script>"
HOSTILE_BOOK = "品牌&<b>会员</b>"
HOSTILE_NOTE = 'note <img src=x onerror="alert(2)"> 注意'
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Bars drawn: every bar chart of a report with actions; empty charts still get their axes.
BAR_CHARTS = ("chart-steps", "chart-suppression", "chart-aipl", "chart-lifecycle")


def books() -> list[Playbook]:
    return [load_playbook(p, SETTINGS) for p in PLAYBOOKS]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dryrun-html") / "demo.db"
    with open_store(path) as store:
        generate_demo(store, customers=600, seed=5, end=AS_OF, tz=SHANGHAI)
    return path


@pytest.fixture(scope="module")
def reports(demo: Path) -> dict[str, DryRun]:
    weekly = steps_between(AS_OF - 63 * DAY, AS_OF - 21 * DAY, 7 * DAY)
    return {
        "backtest": dry_run(demo, SETTINGS, books(), weekly),
        "single": dry_run(demo, SETTINGS, books(), [AS_OF - 30 * DAY]),
        # the old playbooks lack vip-referral: its rules are "added"
        "against": dry_run(demo, SETTINGS, books(), weekly[-3:], against=books()[:-1]),
        "hostile": hostile(),
        "empty": empty(),
    }


@pytest.fixture(scope="module")
def pages(reports: dict[str, DryRun]) -> dict[str, str]:
    return {name: render_html(report) for name, report in reports.items()}


def hostile() -> DryRun:
    """A report whose every piece of text tries to be markup."""
    steps = [AS_OF - 28 * DAY, AS_OF - 21 * DAY]
    key = f"{HOSTILE_BOOK}/{HOSTILE_RULE}"
    outcome = Outcome(
        comparison="holdout",
        targeted=40,
        targeted_buyers=12,
        targeted_revenue=1200.0,
        control=35,
        control_buyers=6,
        control_revenue=500.0,
        rate_difference=12 / 40 - 6 / 35,
        rate_ci=(-0.06, 0.32),
        revenue_difference=15.7,
        revenue_ci=(-10.0, 41.4),
        verdict="no clear difference <b>&</b> 不确定",
        incomplete_window=0,
    )
    rule = RuleSummary(
        HOSTILE_BOOK,
        HOSTILE_RULE,
        "state",
        matched=45,
        queued=40,
        suppressed={"holdout": 35, "<i>reason</i>": 2},
        customers=38,
        coupon_cost=80.0,
        outcome=outcome,
    )
    sim = Simulation(
        playbooks=[{"name": HOSTILE_BOOK, "version": 3, "hash": "x"}],
        steps=[
            StepSummary(steps[0], 25, 22, 20, {key: 22}),
            StepSummary(steps[1], 20, 18, 17, {key: 18}),
        ],
        rules=[rule],
        suppression={"holdout": 35, "<i>reason</i>": 2},
        mix={"aipl": {"P": 30, "<u>x</u>": 8}, "lifecycle": {"active": 38}},
        notes=[HOSTILE_NOTE],
    )
    return DryRun(steps, 14 * DAY, "auto", "Asia/Shanghai", sim)


def empty() -> DryRun:
    """A report of playbooks that would have done nothing at all."""
    step = AS_OF - 28 * DAY
    nothing = Outcome(
        None, 0, 0, 0.0, 0, 0, 0.0, None, None, None, None, "nothing to compare with", 0
    )
    rule = RuleSummary("quiet", "never-matches", "state", outcome=nothing)
    sim = Simulation(
        playbooks=[{"name": "quiet", "version": 1, "hash": "y"}],
        steps=[StepSummary(step, 0, 0, 0, {})],
        rules=[rule],
        suppression={},
        mix={"aipl": {}, "lifecycle": {}},
        notes=[],
    )
    return DryRun([step], 14 * DAY, "auto", "Asia/Shanghai", sim)


def chart_ids(report: DryRun) -> list[str]:
    return list(CHART_IDS) + ([AGAINST_CHART_ID] if report.against is not None else [])


@pytest.mark.parametrize("name", ["backtest", "single", "against", "hostile", "empty"])
def test_the_page_is_self_contained(pages: dict[str, str], name: str) -> None:
    page = pages[name]
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page
    # Nothing is fetched: no script or stylesheet from elsewhere, no frames, no images.
    assert not re.search(r"<script[^>]*\ssrc=", page, re.IGNORECASE)
    assert not re.search(r"<link\b", page, re.IGNORECASE)
    assert not re.search(r"<(iframe|img)\b", page, re.IGNORECASE)
    assert "@import" not in page
    # plotly.js is embedded exactly once, before the first figure is drawn.
    bundle = get_plotlyjs()
    assert page.count(bundle[:400]) == 1
    assert page.count("* plotly.js v") == 1
    assert page.index(bundle[-400:]) < page.index("Plotly.newPlot(")


@pytest.mark.parametrize("name", ["backtest", "single", "against", "hostile", "empty"])
def test_every_chart_has_its_stable_id(
    reports: dict[str, DryRun], pages: dict[str, str], name: str
) -> None:
    page = pages[name]
    ids = chart_ids(reports[name])
    for chart in ids:
        assert page.count(f'<div id="{chart}" class="plotly-graph-div"') == 1, chart
    assert page.count("Plotly.newPlot(") == len(ids)
    if reports[name].against is None:
        assert AGAINST_CHART_ID not in page


@pytest.mark.parametrize("name", ["backtest", "single", "against"])
def test_header_rules_and_verdicts(
    reports: dict[str, DryRun], pages: dict[str, str], name: str
) -> None:
    report, page = reports[name], pages[name]
    assert "nothing was written to the store" in page
    assert "orders within 14 days after each step" in page
    for p in report.simulation.playbooks:
        assert f"{p['name']} v{p['version']}" in page
    for rule in report.simulation.rules:
        assert f'<td class="text key">{rule.key}</td>' in page
        assert rule.outcome is not None
        assert str(escape(rule.outcome.verdict)) in page
    for step in report.simulation.steps:
        assert f"<td>{step.queued:,}</td>" in page
    assert report.simulation.queued > 0
    assert f"{report.simulation.queued:,} actions" in page


def test_steps_in_the_header(pages: dict[str, str]) -> None:
    assert "7 steps from 2024-03-30 to 2024-05-11, every 7 days" in pages["backtest"]
    assert "one step, at 2024-05-02" in pages["single"]
    single = pages["single"].split('id="table-steps"')[1].split("</table>")[0]
    assert single.count("<tr>") == 2  # the header and the one step


def test_against_shows_the_comparison(reports: dict[str, DryRun], pages: dict[str, str]) -> None:
    report, page = reports["against"], pages["against"]
    assert report.against is not None
    rows = compare(report)
    table = page.split('id="table-against"')[1].split("</table>")[0]
    for row in rows:
        assert f'<td class="text key">{row["rule"]}</td><td class="text">{row["status"]}' in table
    assert {row["status"] for row in rows} >= {"added"}
    assert "table-against" not in pages["backtest"]
    old = ", ".join(f"{p['name']} v{p['version']}" for p in report.against.playbooks)
    assert f"<dt>against</dt><dd>{old}</dd>" in page


def test_text_is_escaped(pages: dict[str, str]) -> None:
    page = pages["hostile"]
    for text in (HOSTILE_RULE, HOSTILE_BOOK, HOSTILE_NOTE, "<i>reason</i>", "<u>x</u>", "<b>&</b>"):
        assert text not in page, text
    assert str(escape(f"{HOSTILE_BOOK}/{HOSTILE_RULE}")) in page
    assert str(escape(HOSTILE_NOTE)) in page
    assert "no clear difference &lt;b&gt;&amp;&lt;/b&gt; 不确定" in page
    assert "品牌&amp;&lt;b&gt;会员&lt;/b&gt; v3" in page
    # Inside the figures' JSON no "<" is left to close the script element early.
    for script in re.findall(r"Plotly\.newPlot\((.*?)\)\s*\};", page, re.DOTALL):
        assert "<" not in script


def test_nothing_to_show_is_said_on_the_charts(pages: dict[str, str]) -> None:
    page = pages["empty"]
    for text in (
        "nothing would have been queued",
        "nothing was suppressed",
        "no customer would have been targeted",
        "no rule has a comparison group",
    ):
        assert text in page
    assert "nothing to compare with" in page
    assert "<h2>Notes</h2>" not in page


def test_write_html_and_the_command(demo: Path, pages: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    write_html(empty(), report)
    assert report.read_text("utf-8") == pages["empty"]
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(
        cli,
        ["dry-run", "playbooks", "--db", str(demo), "--as-of", "2024-05-02", "--html", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "nothing was written to the store" in result.output
    page = out.read_text("utf-8")
    assert "one step, at 2024-05-02" in page
    assert page.count('class="plotly-graph-div"') == len(CHART_IDS)


# --- drawn in a real browser --------------------------------------------------------------


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "chromium not installed: the HTML report is not checked in a browser "
        "(apt-get install chromium, or put chromium/google-chrome on PATH)"
    )


def rendered(page: Path, profile: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran in headless Chromium, and its log."""
    done = subprocess.run(
        [
            browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1400,3000",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def charts_in(dom: str, ids: list[str]) -> dict[str, str]:
    """Each chart's part of the rendered DOM: from its div to the next chart's."""
    starts = [dom.index(f'<div id="{chart}"') for chart in ids]
    ends = [*starts[1:], dom.index("</body>")]
    return {chart: dom[a:b] for chart, a, b in zip(ids, starts, ends, strict=True)}


def bar_areas(part: str) -> list[float]:
    """The area in pixels of every bar drawn (plotly: <path d="Mx0,y0Vy1Hx1Vy0Z">)."""
    return [
        abs(float(x1) - float(x0)) * abs(float(y1) - float(y0))
        for x0, y0, y1, x1 in re.findall(
            r'<g class="point"><path d="M([-\d.]+),([-\d.]+)V([-\d.]+)H([-\d.]+)V', part
        )
    ]


@pytest.mark.parametrize("name", ["against", "hostile", "empty"])
def test_plotly_draws_every_chart_in_chromium(
    reports: dict[str, DryRun], pages: dict[str, str], name: str, tmp_path: Path
) -> None:
    browser()
    path = tmp_path / f"{name}.html"
    path.write_text(pages[name], encoding="utf-8")
    dom, log = rendered(path, tmp_path / "profile")
    report = reports[name]
    ids = chart_ids(report)
    charts = charts_in(dom, ids)
    assert "Uncaught" not in log, log[-2000:]  # no script failed
    for chart, part in charts.items():
        # plotly replaced the empty div with its drawing: SVG layers with axes.
        assert 'class="plotly-graph-div js-plotly-plot"' in part, chart
        assert part.count('<svg class="main-svg"') >= 2, chart
        assert 'class="xtick"' in part or 'class="ytick"' in part, chart
    acted = report.simulation.queued > 0
    for chart in BAR_CHARTS + ((AGAINST_CHART_ID,) if report.against else ()):
        if acted:
            assert max(bar_areas(charts[chart]), default=0) > 10, chart
    outcomes = charts["chart-outcomes"]
    if report.simulation.rules and any(
        r.outcome and r.outcome.comparison and r.outcome.targeted for r in report.simulation.rules
    ):
        assert 'class="trace bars"' in outcomes
        assert 'class="errorbar"' in outcomes  # the 95% CI of the difference
    else:
        assert ">no rule has a comparison group" in outcomes  # drawn as an annotation
    if name == "empty":
        assert ">nothing would have been queued<" in charts["chart-steps"]
    if name == "hostile":
        # The labels show the text as written (entities decoded), never as markup.
        drawn = "\n".join(re.findall(r"<text [^>]*>(.*?)</text>", dom))
        shown = "品牌&amp;&lt;b&gt;会员&lt;/b&gt;/&lt;script&gt;alert(1)&lt;/script&gt;"
        assert shown in charts["chart-steps"]  # the legend
        assert shown in charts["chart-outcomes"]  # the rule's axis label
        assert "&lt;i&gt;reason&lt;/i&gt;" in charts["chart-suppression"]
        assert "&amp;lt;" not in drawn
        assert "<script>alert(1)" not in dom
        assert "<img" not in dom
        assert ">会员<" not in dom and "&lt;b&gt;会员&lt;/b&gt;" in dom
