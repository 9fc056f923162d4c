"""The dry run as one self-contained HTML page: charts (plotly) and tables (Jinja2).

The page opens offline: plotly.js is embedded once, in the page's head, and every chart
is a plotly figure in a `<div>` with a stable id (`CHART_IDS`, plus `chart-against` with
`--against`). Everything else is rendered by a Jinja2 template with autoescaping on; text
placed inside the charts (rule ids, playbook names, reasons) is HTML-escaped too, because
plotly reads a small subset of HTML in labels and decodes entities back to the text.
"""

from __future__ import annotations

import html
import itertools
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from engine.clock import DAY, get_timezone
from engine.decide import REASONS
from engine.dryrun import DryRun, Outcome, RuleSummary, Simulation, compare, comparison_row

CHART_IDS = (
    "chart-steps",
    "chart-suppression",
    "chart-aipl",
    "chart-lifecycle",
    "chart-outcomes",
)
AGAINST_CHART_ID = "chart-against"

_AIPL = {"A": "A · aware", "I": "I · interest", "P": "P · purchase", "L": "L · loyalty"}
_LIFECYCLE = ("prospect", "active", "silent", "sleeping", "churned")
_TEMPLATE = "plotly_white"
_CONFIG = {"displaylogo": False, "responsive": True}
# plotly's, D3's and Google's qualitative palettes: 30 colours before one repeats.
_COLORS = (
    *("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A"),
    *("#19d3f3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52"),
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"),
    *("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
    *("#3366CC", "#DC3912", "#FF9900", "#109618", "#990099"),
    *("#0099C6", "#DD4477", "#66AA00", "#B82E2E", "#316395"),
)
_TARGETED, _CONTROL = "#636efa", "#FFA15A"
_BETTER, _WORSE, _UNCLEAR = "#00a36c", "#d62728", "#7f7f7f"


def write_html(report: DryRun, path: str | os.PathLike[str]) -> None:
    """Write the report as one self-contained HTML file (UTF-8) at `path`."""
    Path(path).write_text(render_html(report), encoding="utf-8")


def render_html(report: DryRun) -> str:
    """The report as one self-contained HTML page."""
    tz = get_timezone(report.timezone)
    sim = report.simulation
    when = _moment_format(report.steps, tz)
    labels = [datetime.fromtimestamp(t, tz).strftime(when) for t in report.steps]
    step_labels = [datetime.fromtimestamp(s.as_of, tz).strftime(when) for s in sim.steps]
    window_days = f"{report.window / DAY:g}"
    charts = {
        "steps": _steps_chart(sim, step_labels),
        "suppression": _suppression_chart(sim),
        "aipl": _mix_chart(
            "chart-aipl",
            "AIPL stage of targeted customers",
            _ordered(sim.mix.get("aipl", {}), list(_AIPL), _AIPL),
        ),
        "lifecycle": _mix_chart(
            "chart-lifecycle",
            "Lifecycle of targeted customers",
            _ordered(sim.mix.get("lifecycle", {}), list(_LIFECYCLE), {}),
        ),
        "outcomes": _outcomes_chart(sim, window_days),
    }
    comparison = compare(report) if report.against is not None else None
    if comparison is not None:
        charts["against"] = _against_chart(comparison)
    found = {reason for rule in sim.rules for reason, n in rule.suppressed.items() if n}
    reasons = [r for r in REASONS if r in found] + sorted(found - set(REASONS))
    if len(report.steps) == 1:
        span = f"one step, at {labels[0]}"
    else:
        span = f"{len(report.steps)} steps from {labels[0]} to {labels[-1]}"
        every = _interval(report.steps)
        if every is not None:
            span += f", every {every}"
    page = (
        _environment()
        .from_string(_PAGE)
        .render(
            title=("Dry run" if len(report.steps) == 1 else "Backtest")
            + " of "
            + ", ".join(p["name"] for p in sim.playbooks),
            plotlyjs=Markup(get_plotlyjs()),
            playbooks=_playbooks(sim),
            against_playbooks=None if report.against is None else _playbooks(report.against),
            span=span,
            window_days=window_days,
            engine=report.engine,
            timezone=report.timezone,
            queued=sim.queued,
            notes=sim.notes,
            against_notes=[] if report.against is None else report.against.notes,
            charts={name: Markup(chart) for name, chart in charts.items()},
            reasons=reasons,
            rules=[_rule_row(r, reasons) for r in sim.rules],
            totals=_totals_row(sim, reasons),
            steps=[
                [label, f"{s.matched:,}", f"{s.queued:,}", f"{s.suppressed:,}"]
                for label, s in zip(step_labels, sim.steps, strict=True)
            ],
            outcomes=[_outcome_row(r.key, r.outcome) for r in sim.rules if r.outcome is not None],
            comparison=None if comparison is None else [comparison_row(row) for row in comparison],
        )
    )
    return page


def _environment() -> jinja2.Environment:
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _label(text: str) -> str:
    """Text for a plotly label: shown literally (plotly decodes the entities back)."""
    return html.escape(str(text), quote=False)


def _moment_format(steps: Sequence[int], tz: tzinfo) -> str:
    """Dates alone when every step is a local midnight, else dates and times."""
    midnight = all(datetime.fromtimestamp(t, tz).time() == datetime.min.time() for t in steps)
    return "%Y-%m-%d" if midnight else "%Y-%m-%d %H:%M"


def _interval(steps: Sequence[int]) -> str | None:
    gaps = {b - a for a, b in itertools.pairwise(steps)}
    if len(gaps) != 1:
        return None
    gap = gaps.pop()
    if gap % DAY == 0:
        days = gap // DAY
        return "day" if days == 1 else f"{days} days"
    return f"{gap / 3600:g} hours"


def _playbooks(sim: Simulation) -> list[str]:
    return [f"{p['name']} v{p['version']}" for p in sim.playbooks]


def _figure_html(figure: go.Figure, div_id: str) -> str:
    return str(
        figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            config=_CONFIG,
            div_id=div_id,
            default_height=f"{figure.layout.height}px",
        )
    )


def _layout(figure: go.Figure, title: str, height: int, **extra: Any) -> None:
    figure.update_layout(
        title={"text": _label(title), "x": 0.01},
        template=_TEMPLATE,
        height=height,
        margin={"l": 60, "r": 30, "t": 60, "b": 50},
        **extra,
    )


def _empty(figure: go.Figure, text: str) -> None:
    """Say on the chart itself that there is nothing to show."""
    figure.add_annotation(
        text=_label(text),
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"size": 16, "color": "#666"},
    )


def _steps_chart(sim: Simulation, labels: list[str]) -> str:
    """Actions queued per step, stacked by rule."""
    figure = go.Figure()
    keys = [r.key for r in sim.rules if any(s.by_rule.get(r.key) for s in sim.steps)]
    keys += sorted({k for s in sim.steps for k in s.by_rule if s.by_rule[k]} - set(keys))
    x = [_label(t) for t in labels]
    for n, key in enumerate(keys):
        figure.add_trace(
            go.Bar(
                x=x,
                y=[s.by_rule.get(key, 0) for s in sim.steps],
                name=_label(key),
                marker_color=_COLORS[n % len(_COLORS)],
                hovertemplate="%{x}: %{y:,} queued<extra>%{fullData.name}</extra>",
            )
        )
    if not keys:
        figure.add_trace(
            go.Bar(x=x, y=[0] * len(x), name="nothing queued", showlegend=False, hoverinfo="skip")
        )
        _empty(figure, "nothing would have been queued")
    _layout(
        figure,
        "Actions that would have been queued, per step and rule",
        520,
        barmode="stack",
        xaxis={"type": "category", "title": {"text": "step"}},
        yaxis={"title": {"text": "actions queued"}, "rangemode": "tozero"},
        legend={"font": {"size": 10}},
        showlegend=bool(keys),  # even for one rule: the legend says which
    )
    return _figure_html(figure, "chart-steps")


def _suppression_chart(sim: Simulation) -> str:
    """Suppressed actions by reason, over all rules and steps."""
    reasons = [r for r in REASONS if sim.suppression.get(r)]
    reasons += sorted(set(sim.suppression) - set(REASONS))
    figure = go.Figure(
        go.Bar(
            x=[_label(r) for r in reasons],
            y=[sim.suppression[r] for r in reasons],
            marker_color="#EF553B",
            text=[f"{sim.suppression[r]:,}" for r in reasons],
            textposition="outside",
            hovertemplate="%{x}: %{y:,} suppressed<extra></extra>",
        )
    )
    if not reasons:
        _empty(figure, "nothing was suppressed")
    _layout(
        figure,
        "Suppressed, by reason",
        380,
        xaxis={"type": "category", "title": {"text": "reason"}},
        yaxis={"title": {"text": "actions suppressed"}, "rangemode": "tozero"},
    )
    return _figure_html(figure, "chart-suppression")


def _ordered(
    counts: dict[str, int], order: list[str], names: dict[str, str]
) -> list[tuple[str, int]]:
    keys = [k for k in order if k in counts] + sorted(set(counts) - set(order))
    return [(names.get(k, k), counts[k]) for k in keys if counts[k]]


def _mix_chart(div_id: str, title: str, items: list[tuple[str, int]]) -> str:
    """Customers targeted at each step by AIPL stage or lifecycle (summed over steps)."""
    figure = go.Figure(
        go.Bar(
            x=[_label(name) for name, _ in items],
            y=[n for _, n in items],
            marker_color="#00cc96",
            text=[f"{n:,}" for _, n in items],
            textposition="outside",
            hovertemplate="%{x}: %{y:,}<extra></extra>",
        )
    )
    if not items:
        _empty(figure, "no customer would have been targeted")
    _layout(
        figure,
        title,
        380,
        xaxis={"type": "category"},
        yaxis={"title": {"text": "customers targeted (per step, summed)"}, "rangemode": "tozero"},
    )
    return _figure_html(figure, div_id)


def _comparable(sim: Simulation) -> list[tuple[RuleSummary, Outcome]]:
    return [
        (r, r.outcome)
        for r in sim.rules
        if r.outcome is not None
        and r.outcome.comparison is not None
        and r.outcome.targeted_rate is not None
        and r.outcome.control_rate is not None
    ]


def _outcomes_chart(sim: Simulation, window_days: str) -> str:
    """Per rule: share who ordered, targeted against comparison; the difference's 95% CI."""
    rows = _comparable(sim)
    figure = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.03,
        subplot_titles=(
            f"share who ordered within {window_days} days (%)",
            "difference, percentage points (95% CI)",
        ),
    )
    names = [_label(r.key) for r, _ in rows]
    for group, color, rate, n in (
        ("targeted", _TARGETED, [o.targeted_rate for _, o in rows], [o.targeted for _, o in rows]),
        ("comparison", _CONTROL, [o.control_rate for _, o in rows], [o.control for _, o in rows]),
    ):
        figure.add_trace(
            go.Bar(
                y=names,
                x=[100 * (r or 0) for r in rate],
                orientation="h",
                name=group,
                marker_color=color,
                customdata=[
                    [m, _label(o.comparison or "")] for m, (_, o) in zip(n, rows, strict=True)
                ],
                hovertemplate=(
                    "%{y}<br>"
                    + group
                    + (" (%{customdata[1]})" if group == "comparison" else "")
                    + ": %{x:.1f}% of %{customdata[0]:,} ordered<extra></extra>"
                ),
            ),
            row=1,
            col=1,
        )
    diffs = [100 * (o.rate_difference or 0) for _, o in rows]
    lows = [100 * o.rate_ci[0] if o.rate_ci else d for (_, o), d in zip(rows, diffs, strict=True)]
    highs = [100 * o.rate_ci[1] if o.rate_ci else d for (_, o), d in zip(rows, diffs, strict=True)]
    figure.add_trace(
        go.Scatter(
            y=names,
            x=diffs,
            mode="markers",
            name="difference (95% CI)",
            marker={
                "size": 9,
                "color": [
                    {"better": _BETTER, "worse": _WORSE}.get(_tone(o), _UNCLEAR) for _, o in rows
                ],
            },
            error_x={
                "type": "data",
                "symmetric": False,
                "array": [hi - d for hi, d in zip(highs, diffs, strict=True)],
                "arrayminus": [d - lo for lo, d in zip(lows, diffs, strict=True)],
                "color": "#555",
            },
            customdata=[
                [lo, hi, _label(o.verdict)]
                for lo, hi, (_, o) in zip(lows, highs, rows, strict=True)
            ],
            hovertemplate=(
                "%{y}<br>difference %{x:+.1f} pts, 95% CI %{customdata[0]:+.1f} to "
                "%{customdata[1]:+.1f}<br>%{customdata[2]}<extra></extra>"
            ),
        ),
        row=1,
        col=2,
    )
    figure.add_vline(x=0, line_width=1, line_dash="dash", line_color="#333", row=1, col=2)
    if not rows:
        _empty(figure, "no rule has a comparison group (holdout or suppressed matches)")
    _layout(
        figure,
        "Outcomes: did the targeted customers order more than the comparison group?",
        max(380, 150 + 34 * len(rows)),
        barmode="group",
        legend={"orientation": "h", "y": -0.08 if rows else -0.2, "x": 0},
    )
    figure.update_yaxes(autorange="reversed", type="category", automargin=True)
    figure.update_xaxes(rangemode="tozero", row=1, col=1)
    figure.update_xaxes(zeroline=True, zerolinecolor="#333", row=1, col=2)
    return _figure_html(figure, "chart-outcomes")


def _against_chart(rows: list[dict[str, Any]]) -> str:
    """Per rule: actions the new playbooks would queue next to the old ones'."""
    names = [_label(f"{row['rule']} ({row['status']})") for row in rows]
    figure = go.Figure()
    for side, color in (("new", _TARGETED), ("old", "#aaaaaa")):
        figure.add_trace(
            go.Bar(
                y=names,
                x=[row["queued"][side] for row in rows],
                orientation="h",
                name=f"{side} playbooks",
                marker_color=color,
                hovertemplate="%{y}<br>" + side + ": %{x:,} queued<extra></extra>",
            )
        )
    if not rows:
        _empty(figure, "no rules on either side")
    _layout(
        figure,
        "New against old: actions that would have been queued, per rule",
        max(380, 150 + 30 * len(rows)),
        barmode="group",
        yaxis={"autorange": "reversed", "type": "category", "automargin": True},
        xaxis={"title": {"text": "actions queued"}, "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.08, "x": 0},
    )
    return _figure_html(figure, AGAINST_CHART_ID)


def _rule_row(rule: RuleSummary, reasons: Iterable[str]) -> list[Any]:
    return [
        rule.key,
        rule.kind,
        f"{rule.matched:,}",
        f"{rule.queued:,}",
        *(f"{rule.suppressed[r]:,}" if rule.suppressed.get(r) else "" for r in reasons),
        f"{rule.customers:,}",
        f"{rule.coupon_cost:,.2f}",
    ]


def _totals_row(sim: Simulation, reasons: Iterable[str]) -> list[Any]:
    suppressed = {r: sum(x.suppressed.get(r, 0) for x in sim.rules) for r in reasons}
    return [
        "total",
        "",
        f"{sum(r.matched for r in sim.rules):,}",
        f"{sum(r.queued for r in sim.rules):,}",
        *(f"{n:,}" if n else "" for n in suppressed.values()),
        "",
        f"{sum(r.coupon_cost for r in sim.rules):,.2f}",
    ]


def _tone(o: Outcome) -> str:
    """better or worse when the verdict says so (enough customers, CI clear of 0), else ""."""
    if o.verdict.startswith("targeted customers ordered more"):
        return "better"
    if o.verdict.startswith("targeted customers ordered less"):
        return "worse"
    return ""


def _share(rate: float | None) -> str:
    return "–" if rate is None else f"{100 * rate:.1f}%"


def _outcome_row(key: str, o: Outcome) -> dict[str, Any]:
    ci = o.rate_ci
    verdict = o.verdict
    if o.incomplete_window:
        verdict += f" ({o.incomplete_window} decisions too recent for a full window)"
    return {
        "tone": _tone(o),
        "cells": [
            key,
            f"{o.targeted:,}",
            _share(o.targeted_rate),
            o.comparison or "–",
            f"{o.control:,}" if o.comparison else "–",
            _share(o.control_rate),
            "–" if o.rate_difference is None else f"{100 * o.rate_difference:+.1f}",
            "–" if ci is None else f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}",
            "–" if o.revenue_difference is None else f"{o.revenue_difference:+,.2f}",
        ],
        "verdict": verdict,
    }


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC",
         "PingFang SC", "Microsoft YaHei", sans-serif; margin: 0 auto; max-width: 1400px;
         padding: 1.5rem 2rem 4rem; color: #222; line-height: 1.4; }
  h1 { margin-bottom: .3rem; }
  h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
  dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
  dl.meta dt { font-weight: 600; color: #555; }
  dl.meta dd { margin: 0; }
  .safe { display: inline-block; margin: .8rem 0; padding: .4rem .8rem; background: #e8f5e9;
          border: 1px solid #a5d6a7; border-radius: 4px; }
  .notes { background: #fff8e1; border: 1px solid #ffe082; border-radius: 4px;
           padding: .5rem 1rem .5rem 2rem; }
  .chart { margin: 1rem 0; border: 1px solid #eee; border-radius: 4px; }
  .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
  table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
  th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right;
           vertical-align: top; }
  th { background: #f5f5f5; }
  th.group { text-align: center; }
  td.text, th.text { text-align: left; }
  td.key, td.nowrap { white-space: nowrap; }
  .scroll { overflow-x: auto; }
  #table-outcomes td:nth-child(8) { white-space: nowrap; }
  tr.total td { font-weight: 600; background: #fafafa; }
  td.verdict { min-width: 22rem; }
  tr.better td.verdict { color: #00794f; }
  tr.worse td.verdict { color: #b71c1c; }
  .muted { color: #777; }
</style>
<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>
<script type="text/javascript">{{ plotlyjs }}</script>
</head>
<body>
{% macro cells(row, left, also=-1) -%}
  {% for cell in row %}<td
  {%- if loop.first %} class="text key"
  {%- elif loop.index0 < left or loop.index0 == also %} class="text"
  {%- endif %}>{{ cell }}</td>{% endfor %}
{%- endmacro %}
<h1>{{ title }}</h1>
<dl class="meta">
  <dt>playbooks</dt><dd>{{ playbooks | join(", ") }}</dd>
  {% if against_playbooks is not none %}
  <dt>against</dt><dd>{{ against_playbooks | join(", ") }}</dd>
  {% endif %}
  <dt>steps</dt><dd>{{ span }}</dd>
  <dt>outcome window</dt><dd>orders within {{ window_days }} days after each step</dd>
  <dt>engine</dt><dd>{{ engine }}</dd>
  <dt>timezone</dt><dd>{{ timezone }}</dd>
  <dt>would send</dt><dd>{{ "{:,}".format(queued) }} actions</dd>
</dl>
<div class="safe">Simulated on a private copy: nothing was written to the store.</div>
{% if notes or against_notes %}
<h2>Notes</h2>
<ul class="notes" id="notes">
  {% for note in notes %}<li>{{ note }}</li>{% endfor %}
  {% for note in against_notes %}<li>against: {{ note }}</li>{% endfor %}
</ul>
{% endif %}

<h2>Actions per step</h2>
<div class="chart">{{ charts.steps }}</div>
<div class="chart">{{ charts.suppression }}</div>
<div class="pair">
  <div class="chart">{{ charts.aipl }}</div>
  <div class="chart">{{ charts.lifecycle }}</div>
</div>

<h2>Per rule</h2>
<div class="scroll">
<table id="table-rules">
  {% set span = 2 if reasons else 1 %}
  <thead><tr>
    <th class="text" rowspan="{{ span }}">rule</th><th class="text" rowspan="{{ span }}">kind</th>
    <th rowspan="{{ span }}">matched</th><th rowspan="{{ span }}">would send</th>
    {% if reasons %}<th colspan="{{ reasons | length }}" class="group">suppressed</th>{% endif %}
    <th rowspan="{{ span }}">customers</th><th rowspan="{{ span }}">coupon cost</th>
  </tr>
  {% if reasons %}
  <tr>{% for reason in reasons %}<th>{{ reason }}</th>{% endfor %}</tr>
  {% endif %}
  </thead>
  <tbody>
  {% for row in rules %}
    <tr>{{ cells(row, 2) }}</tr>
  {% endfor %}
  <tr class="total">{{ cells(totals, 2) }}</tr>
  </tbody>
</table>
</div>
<p class="muted">customers: distinct customers with at least one action queued, over all steps.
Coupon cost: face value of the coupons queued.</p>

<h2>Per step</h2>
<div class="scroll">
<table id="table-steps">
  <thead><tr>
    <th class="text">step</th><th>matched</th><th>would send</th><th>suppressed</th>
  </tr></thead>
  <tbody>
  {% for row in steps %}
    <tr>{{ cells(row, 1) }}</tr>
  {% endfor %}
  </tbody>
</table>
</div>

<h2>Outcomes</h2>
<p>Per rule, the customers it would have acted on against the customers its playbook's holdout
kept back (or, without a holdout, the matches caps or an exclusive group suppressed): the share
who ordered within {{ window_days }} days after the step, the difference and its 95% confidence
interval.</p>
<div class="chart">{{ charts.outcomes }}</div>
<div class="scroll">
<table id="table-outcomes">
  <thead><tr>
    <th class="text">rule</th><th>targeted</th><th>ordered</th><th class="text">compared with</th>
    <th>n</th><th>ordered</th><th>difference (pts)</th><th>95% CI (pts)</th>
    <th>revenue difference per customer</th><th class="text">verdict</th>
  </tr></thead>
  <tbody>
  {% for row in outcomes %}
    <tr class="{{ row.tone }}">
      {{ cells(row.cells, 1, 3) }}
      <td class="text verdict">{{ row.verdict }}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
</div>

{% if comparison is not none %}
<h2>Against the old playbooks</h2>
<p>New figures, with the change from the old ones in brackets.</p>
<div class="chart">{{ charts.against }}</div>
<div class="scroll">
<table id="table-against">
  <thead><tr>
    <th class="text">rule</th><th class="text">status</th><th>matched</th><th>would send</th>
    <th>suppressed</th><th>customers</th><th>coupon cost</th>
  </tr></thead>
  <tbody>
  {% for row in comparison %}
    <tr>{{ cells(row, 2) }}</tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endif %}
</body>
</html>
"""
