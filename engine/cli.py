"""The `playbook` command: a thin layer that parses flags, calls one library function,
and renders its result. Errors become a message and an exit code (0 ok, 1 invalid input
or data, 2 usage, 130 interrupted)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from engine.catalog import field_catalog
from engine.clock import format_epoch, get_timezone, local_day, parse_as_of, parse_duration
from engine.compile import compile_playbook
from engine.dryrun import dry_run, dry_run_text, steps_between
from engine.errors import PlaybookError
from engine.explain import explain as explain_customer
from engine.export import FORMATS as EXPORT_FORMATS
from engine.export import AckResult, ExportResult, ack, export
from engine.features import build_features, iter_features
from engine.ingest import KINDS, IngestOptions, ingest_file
from engine.ingest.load import IngestResult, parse_mapping
from engine.ingest.read import ByteCounter
from engine.playbook import (
    Playbook,
    check_playbook_file,
    has_errors,
    load_playbook,
    playbook_files,
)
from engine.queue import QUEUE_COLUMNS, list_actions, queue_summary
from engine.render import FORMATS, csv_text, json_line, table
from engine.report import Report, build_report
from engine.run import ENGINES, run_playbooks
from engine.schemas import load_schema
from engine.settings import Settings, load_settings, settings_path
from engine.store import Store, default_db_path, open_store

F = TypeVar("F", bound=Callable[..., Any])
TIME_COLUMNS = ("joined_at", "first_order_at", "last_order_at")
DEFAULT_FEATURE_COLUMNS = (
    "customer_id",
    "name",
    "aipl_stage",
    "lifecycle",
    "rfm_segment",
    "order_count",
    "total_spend",
    "days_since_last_order",
)


class _Failed(click.ClickException):
    """A library error, shown as its message, exiting with code 1."""


class _FailedUsage(_Failed):
    """A usage error from the library (a malformed date, mapping or name): exit code 2."""

    exit_code = 2


def _failure(message: str, exit_code: int) -> _Failed:
    return _FailedUsage(message) if exit_code == 2 else _Failed(message)


class _Group(click.Group):
    """Turns library errors into a one-line message and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PlaybookError as exc:
            raise _failure(str(exc), exc.exit_code) from exc
        except KeyboardInterrupt:
            # Everything in flight has been undone on the way out (open transactions rolled
            # back, a dry run's scratch copy deleted).
            click.echo("interrupted: nothing half-written was kept", err=True)
            sys.exit(130)


def store_options(func: F) -> F:
    """Add --db and --settings to a command."""
    func = click.option(
        "--settings",
        "settings_file",
        type=click.Path(dir_okay=False),
        help="Settings file (default: $PLAYBOOK_SETTINGS or ./playbook-settings.yaml if present).",
    )(func)
    func = click.option(
        "--db",
        "db",
        type=click.Path(dir_okay=False),
        default=default_db_path,
        show_default="$PLAYBOOK_DB or ./playbook.db",
        help="The SQLite fact store.",
    )(func)
    return func


def run_options(
    since_help: str,
    engine_default: str = "auto",
    engine_help: str = "auto: state rules in SQL, event rules in durable-rules.",
) -> Callable[[F], F]:
    """Add --engine, --since and --format (table or json) to a command that runs playbooks."""

    def add(func: F) -> F:
        func = click.option(
            "--format",
            "fmt",
            type=click.Choice(["table", "json"]),
            default="table",
            show_default=True,
        )(func)
        func = click.option("--since", help=since_help)(func)
        func = click.option(
            "--engine",
            type=click.Choice(ENGINES),
            default=engine_default,
            show_default=True,
            help=engine_help,
        )(func)
        return func

    return add


def _settings(settings_file: str | None) -> Settings:
    return load_settings(settings_path(settings_file))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="playbook-engine")
def cli() -> None:
    """Playbooks for private-domain customer operations: load customers and events,
    compute AIPL / lifecycle / RFM features, and report on them."""


@cli.command()
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "tsv", "jsonl"]),
    help="File format (default: from the extension or content).",
)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="FIELD=COLUMN",
    help="Read a field from the file's own column name; repeatable.",
)
@click.option("--ts-format", help="strptime format, or epoch / epoch_ms (default ISO 8601).")
@click.option("--timezone", help="Timezone of times without an offset (default: settings).")
@click.option("--encoding", default="utf-8-sig", show_default=True, help="Text encoding.")
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False),
    help="Where to write rejected rows (default: FILE's name + .rejects).",
)
@click.option(
    "--batch-size",
    default=10_000,
    show_default=True,
    type=click.IntRange(1),
    help="Rows per committed batch.",
)
@store_options
def ingest(
    kind: str,
    file: str,
    fmt: str | None,
    mapping: tuple[str, ...],
    ts_format: str | None,
    timezone: str | None,
    encoding: str,
    rejects_path: str | None,
    batch_size: int,
    db: str,
    settings_file: str | None,
) -> None:
    """Load customers, orders, refunds or events from a CSV or JSONL FILE."""
    settings = _settings(settings_file)
    options = IngestOptions(
        format=fmt,
        mapping=parse_mapping(mapping, kind),
        ts_format=ts_format,
        tz=get_timezone(timezone) if timezone else settings.tz,
        encoding=encoding,
        batch_size=batch_size,
        rejects_path=rejects_path,
    )
    with open_store(db) as store, _progress(Path(file)) as progress:
        result = ingest_file(store, kind, file, options, progress)
    click.echo(_ingest_summary(result))
    if result.interrupted:
        click.echo(
            "interrupted: the batches above are committed; run the same command again "
            "to complete the file",
            err=True,
        )
        sys.exit(130)
    if result.rejected:
        sys.exit(1)


class _progress:
    """A progress bar on a terminal; nothing otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bar: Any = None
        self.shown = 0

    def __enter__(self) -> Callable[[ByteCounter], None] | None:
        if not sys.stderr.isatty() or not self.path.is_file():
            return None
        self.bar = click.progressbar(
            length=self.path.stat().st_size, label=self.path.name, file=sys.stderr
        )
        self.bar.__enter__()
        return self.update

    def update(self, counter: ByteCounter) -> None:
        self.bar.update(counter.read - self.shown)
        self.shown = counter.read

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _ingest_summary(result: IngestResult) -> str:
    lines = [
        f"{result.file}: {result.rows_read:,} rows read; {result.added:,} added, "
        f"{result.updated:,} updated, {result.unchanged:,} already in the store, "
        f"{result.rejected:,} rejected"
        + (
            f"; {result.customers_created:,} new customers created from {result.kind}"
            if result.customers_created
            else ""
        )
    ]
    if result.rejected:
        shown = len(result.first_rejects)
        lines.append(
            f"rejected rows (first {shown} of {result.rejected:,}; all of them are in "
            f"{result.rejects_path}):"
        )
        lines.extend(
            f"  line {r.line}: {r.reason}" if r.line else f"  {r.reason}"
            for r in result.first_rejects
        )
    return "\n".join(lines)


@cli.command()
@click.option(
    "--as-of", help="Use only events before this moment (a date = its start; default now)."
)
@click.option("--customer", help="Only this customer id.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--columns", help="Comma-separated columns for the table, or 'all'.")
@store_options
def features(
    as_of: str | None,
    customer: str | None,
    fmt: str,
    columns: str | None,
    db: str,
    settings_file: str | None,
) -> None:
    """Compute every customer's features as of a moment."""
    settings = _settings(settings_file)
    moment = parse_as_of(as_of, settings.tz)
    with open_store(db, readonly=True) as store:
        table_ = build_features(store, settings, moment)
        rows = [_readable(row, settings) for row in iter_features(store, table_, customer)]
    if customer is not None and not rows:
        raise _Failed(
            f"no customer {customer!r} as of {format_epoch(moment, settings.tz)} "
            "(not in the store, or joined later)"
        )
    names = list(rows[0]) if rows else list(field_catalog(settings))
    if fmt == "jsonl":
        for row in rows:
            click.echo(json_line(row))
    elif fmt == "csv":
        click.echo(csv_text(names, ([row[n] for n in names] for row in rows)), nl=False)
    elif customer is not None:
        click.echo(table(["field", "value"], ([n, rows[0][n]] for n in names)))
    else:
        shown = _columns(columns, names)
        click.echo(table(shown, ([row[n] for n in shown] for row in rows)))


def _columns(spec: str | None, names: list[str]) -> list[str]:
    if spec is None:
        return [n for n in DEFAULT_FEATURE_COLUMNS if n in names]
    if spec == "all":
        return names
    chosen = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise click.UsageError(
            f"--columns: unknown {', '.join(unknown)}; choose from {', '.join(names)}"
        )
    return chosen


def _readable(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    for name in TIME_COLUMNS:
        row[name] = format_epoch(row[name], settings.tz)
    for feature in settings.custom_features:
        if feature.type.kind == "timestamp":
            row[feature.name] = format_epoch(row[feature.name], settings.tz)
    return row


@cli.command()
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(dir_okay=False),
    help="Settings file with custom features.",
)
def fields(fmt: str, settings_file: str | None) -> None:
    """List every field a playbook condition can use."""
    catalog = field_catalog(_settings(settings_file))
    rows: list[dict[str, Any]] = [
        {
            "name": f.name,
            "type": f.type.kind,
            "values": list(f.type.allowed or ()),
            "group": f.group,
            "description": f.description,
        }
        for f in catalog.values()
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    click.echo(
        table(
            ["name", "type", "group", "description"],
            (
                [
                    r["name"],
                    "enum" if r["values"] else r["type"],
                    r["group"],
                    r["description"]
                    + (f" Values: {', '.join(r['values'])}." if r["values"] else ""),
                ]
                for r in rows
            ),
        )
    )


@cli.command()
@click.option("--as-of", help="Report as of this moment (default now).")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@store_options
def report(as_of: str | None, fmt: str, db: str, settings_file: str | None) -> None:
    """AIPL funnel, lifecycle mix, RFM classes and the seed articles' health checks."""
    settings = _settings(settings_file)
    moment = parse_as_of(as_of, settings.tz)
    with open_store(db, readonly=True) as store:
        result = build_report(store, settings, moment)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(render_report(result, settings))


def render_report(result: Report, settings: Settings) -> str:
    """The report as text tables."""
    return "\n\n".join(
        [
            f"As of {format_epoch(result.as_of, settings.tz)}: {result.customers:,} customers, "
            f"{result.buyers:,} buyers, revenue ¥{result.revenue:,.2f}",
            "AIPL funnel (reached = at this stage or beyond)\n"
            + table(
                ["stage", "reached", "now at", "conversion %"],
                ([s.stage, s.reached, s.current, s.conversion_pct] for s in result.funnel),
            ),
            "Lifecycle\n"
            + table(
                ["stage", "customers", "%"],
                ([s.name, s.customers, s.share_pct] for s in result.lifecycle),
            ),
            "RFM classes (buyers)\n"
            + table(
                ["class", "buyers", "% of buyers", "% of revenue"],
                ([s.name, s.customers, s.share_pct, s.revenue_share_pct] for s in result.rfm),
            ),
            "Health checks\n"
            + table(
                ["check", "value %", "target", "ok"],
                (
                    [
                        h.name,
                        h.value_pct,
                        h.target,
                        "" if h.ok is None else ("yes" if h.ok else "NO"),
                    ]
                    for h in result.health
                ),
            ),
        ]
    )


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: a list of {file, line, col, path, severity, message, hint}.",
)
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(dir_okay=False),
    help="Settings file (custom features are part of the field catalog).",
)
def validate(paths: tuple[str, ...], fmt: str, settings_file: str | None) -> None:
    """Check playbooks (files or folders): every problem, with file:line:col."""
    settings = _settings(settings_file)
    files = list(playbook_files(paths))
    if not files:
        raise click.UsageError(f"no playbooks (*.yaml, *.yml) in {', '.join(paths)}")
    found = [d for path in files for d in check_playbook_file(path, settings)[1]]
    if fmt == "json":
        click.echo(json.dumps([d.to_dict() for d in found], ensure_ascii=False, indent=2))
    else:
        for diagnostic in found:
            click.echo(diagnostic.format())
        errors = sum(d.severity == "error" for d in found)
        warnings = len(found) - errors
        click.echo(
            f"{len(files)} playbook{'s' if len(files) != 1 else ''} checked: "
            f"{errors} error{'s' if errors != 1 else ''}, "
            f"{warnings} warning{'s' if warnings != 1 else ''}",
            err=True,
        )
    if has_errors(found):
        sys.exit(1)


def _load_playbooks(paths: tuple[str, ...], settings: Settings) -> list[Playbook]:
    return [load_playbook(path, settings) for path in playbook_files(paths)]


@cli.command()
@click.argument("playbooks", nargs=-1, required=True, type=click.Path())
@click.option("--as-of", help="Evaluate as of this moment (default now).")
@run_options(
    "On a playbook's first run, consume events from here (default: 24 hours before --as-of)."
)
@store_options
def run(
    playbooks: tuple[str, ...],
    as_of: str | None,
    engine: str,
    since: str | None,
    fmt: str,
    db: str,
    settings_file: str | None,
) -> None:
    """Run playbooks: match, apply the policies, and queue the actions."""
    settings = _settings(settings_file)
    loaded = _load_playbooks(playbooks, settings)
    moment = parse_as_of(as_of, settings.tz)
    start = parse_as_of(since, settings.tz) if since else None
    with open_store(db) as store:
        results = run_playbooks(store, settings, loaded, as_of=moment, engine=engine, since=start)
    if fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2))
        return
    for result in results:
        click.echo(
            f"{result.playbook} v{result.version} as of "
            f"{format_epoch(result.as_of, settings.tz)} (run {result.run_id[:8]}, "
            f"engine {result.engine}): {result.queued} actions queued, "
            f"{result.suppressed} suppressed"
        )
        click.echo(
            table(
                ["rule", "kind", "matched", "queued", "suppressed"],
                (
                    [
                        r.rule_id,
                        r.kind,
                        r.matched,
                        r.queued,
                        r.skipped or ", ".join(f"{k} {v}" for k, v in r.suppressed.items()),
                    ]
                    for r in result.rules
                ),
            )
        )
        click.echo()


@cli.command(name="dry-run")
@click.argument("playbooks", nargs=-1, required=True, type=click.Path())
@click.option("--as-of", help="One evaluation at this past moment.")
@click.option("--from", "start", help="Simulate from this moment ...")
@click.option("--to", "end", help="... to this one (inclusive) ...")
@click.option("--every", help="... one step every this long (1d, 7d, ...).")
@click.option(
    "--against",
    "against",
    multiple=True,
    type=click.Path(),
    help="Simulate these (older) playbooks too and compare, rule by rule.",
)
@click.option(
    "--window",
    default="14d",
    show_default=True,
    help="Outcomes: orders within this long after each step.",
)
@run_options(
    "Event rules' first step reads events from here (default: 24 hours before it).",
    engine_default="sql",
    engine_help="sql matches everything in SQL: the same answers as durable-rules (tested), "
    "much faster over many steps; auto or rules to match as a live run does.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report with charts to this file.",
)
@click.option(
    "--actions",
    "actions_file",
    type=click.Path(dir_okay=False),
    help="Also write every simulated action (who, what, when, or why not) as CSV.",
)
@store_options
def dry_run_command(
    playbooks: tuple[str, ...],
    as_of: str | None,
    start: str | None,
    end: str | None,
    every: str | None,
    against: tuple[str, ...],
    window: str,
    engine: str,
    since: str | None,
    fmt: str,
    html_file: str | None,
    actions_file: str | None,
    db: str,
    settings_file: str | None,
) -> None:
    """What playbooks would have done: at one past moment (--as-of) or stepping through
    history (--from/--to/--every), on a private copy of the store (never written)."""
    settings = _settings(settings_file)
    tz = settings.tz
    stepping = (start, end, every)
    if as_of is not None and any(v is not None for v in stepping):
        raise click.UsageError("use either --as-of or --from/--to/--every, not both")
    if as_of is None and not all(v is not None for v in stepping):
        if any(v is not None for v in stepping):
            raise click.UsageError("--from, --to and --every go together")
        raise click.UsageError("say when: --as-of DATE, or --from DATE --to DATE --every 7d")
    if as_of is not None:
        steps = [parse_as_of(as_of, tz)]
    else:
        assert start is not None and end is not None and every is not None
        steps = steps_between(
            parse_as_of(start, tz, "--from"), parse_as_of(end, tz, "--to"), _duration(every)
        )
    loaded = _load_playbooks(playbooks, settings)
    old = _load_playbooks(against, settings) if against else None
    simulations = 2 if old is not None else 1
    with contextlib.ExitStack() as stack:
        progress = None
        if sys.stderr.isatty():  # a bar of steps on a terminal, nothing in a pipe or log
            bar = stack.enter_context(
                click.progressbar(
                    length=len(steps) * simulations,
                    label="dry-run steps",
                    file=sys.stderr,
                    show_pos=True,
                )
            )
            progress = bar.update
        report = dry_run(
            db,
            settings,
            loaded,
            steps,
            engine=engine,
            since=parse_as_of(since, tz, "--since") if since else None,
            window=_duration(window),
            against=old,
            progress=progress,
            actions_csv=actions_file,
        )
    if actions_file is not None:
        click.echo(f"simulated actions: {actions_file}", err=True)
    if html_file is not None:
        from engine.dryrun_html import write_html

        write_html(report, html_file)
        click.echo(f"HTML report: {html_file}", err=True)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(dry_run_text(report))


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.option("--status", help="Only actions with this status (pending, suppressed, ...).")
@click.option("--playbook", help="Only this playbook's actions.")
@click.option("--summary", is_flag=True, help="Counts by playbook, status and channel.")
@click.option("--limit", type=click.IntRange(1), help="At most this many rows.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@store_options
def queue(
    status: str | None,
    playbook: str | None,
    summary: bool,
    limit: int | None,
    fmt: str,
    db: str,
    settings_file: str | None,
) -> None:
    """Show the action queue (or, with --summary, its counts)."""
    settings = _settings(settings_file)
    with open_store(db, readonly=True) as store:
        if summary:
            rows = queue_summary(store, playbook=playbook, status=status)
        else:
            rows = list_actions(store, status=status, playbook=playbook, limit=limit)
    for row in rows:
        for key in ("decided_at", "scheduled_at", "expires_at"):
            if key in row:
                row[key] = format_epoch(row[key], settings.tz)
    names = (
        list(rows[0])
        if rows
        else (["playbook", "status", "reason", "channel", "actions"] if summary else ["action_id"])
    )
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
    elif fmt == "csv":
        click.echo(csv_text(names, ([r[n] for n in names] for r in rows)), nl=False)
    else:
        shown = names if summary else [n for n in QUEUE_COLUMNS if n in names]
        click.echo(table(shown, ([r[n] for n in shown] for r in rows)))


@cli.command(name="export")
@click.option("--to", "to", type=click.Choice(EXPORT_FORMATS), required=True, help="Format / tool.")
@click.option(
    "-o",
    "--out",
    type=click.Path(),
    help="The file to write (a directory for --to tasks: one CSV per staff member).",
)
@click.option("--url", help="Post to this receiver (webhook), or this WeCom API base (wecom).")
@click.option("--playbook", help="Only this playbook's actions.")
@click.option("--channel", help="Only actions on this channel (wecom, sms, ...).")
@click.option("--limit", type=click.IntRange(1), help="At most this many actions.")
@click.option("--retry-failed", is_flag=True, help="Put failed actions back in line first.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--reenable", is_flag=True, help="Post again to a receiver that answered 410.")
@click.option("--now", "now_text", help="Export as if it were this moment (default now).")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@store_options
def export_command(
    to: str,
    out: str | None,
    url: str | None,
    playbook: str | None,
    channel: str | None,
    limit: int | None,
    retry_failed: bool,
    overwrite: bool,
    reenable: bool,
    now_text: str | None,
    fmt: str,
    db: str,
    settings_file: str | None,
) -> None:
    """Send due pending actions to a file or a messaging tool.

    Due: scheduled time reached, not expired (expired ones are marked so, never sent).
    Files are written beside the target and renamed into place; HTTP batches are signed
    (webhook), retried with backoff, and re-sent with the same id after an interruption.
    """
    settings = _settings(settings_file)
    now = parse_as_of(now_text, settings.tz, "--now") if now_text else None
    with open_store(db) as store:
        result = export(
            store,
            settings,
            to,
            out=out,
            url=url,
            playbook=playbook,
            channel=channel,
            limit=limit,
            retry_failed=retry_failed,
            overwrite=overwrite,
            reenable=reenable,
            now=now,
        )
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(_export_text(result))
    if result.stopped:
        raise _Failed(f"export stopped: {result.stopped}")
    if result.failed:
        raise _Failed(
            f"{result.failed:,} actions failed (reasons above; `playbook queue --status failed` "
            "lists them): fix the cause, then export again with --retry-failed"
        )


def _export_text(result: ExportResult) -> str:
    done = result.sent if result.sent else result.exported
    verb = (
        "sent to"
        if result.sent or result.format == "webhook" or result.destination.startswith("http")
        else "written to"
    )
    lines = [f"{done:,} actions {verb} {result.destination} ({result.format})"]
    for path in result.files:
        lines.append(f"  {path}")
    for label, value in (
        ("failed", result.failed),
        ("suppressed (platform limit)", result.suppressed),
        ("expired (not sent late)", result.expired),
    ):
        if value:
            lines.append(f"{value:,} {label}")
    for reason, count in result.reasons.most_common(5):
        lines.append(f"  {count:,} x {reason}")
    for note in result.notes:
        lines.append(note)
    for what, count in result.recovered.items():
        lines.append(f"from an interrupted export: {count:,} {what.replace('_', ' ')}")
    return "\n".join(lines)


@cli.command(name="ack")
@click.argument("receipts", type=click.Path(dir_okay=False))
@click.option("--msgid", help="The WeCom task id, if the results file does not name it.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@store_options
def ack_command(
    receipts: str, msgid: str | None, fmt: str, db: str, settings_file: str | None
) -> None:
    """Import delivery results (CSV / JSON / WeCom send results): delivered or failed."""
    with open_store(db) as store:
        result: AckResult = ack(store, receipts, msgid=msgid)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    click.echo(
        f"{result.delivered:,} delivered, {result.failed:,} failed, "
        f"{result.unchanged:,} already so"
        + (f", {result.waiting:,} not yet sent by staff" if result.waiting else "")
    )


@cli.command()
@click.argument("customer")
@click.argument("playbook_path", metavar="PLAYBOOK", type=click.Path(dir_okay=False))
@click.option("--as-of", help="Explain as of this moment (default now).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@store_options
def explain(
    customer: str,
    playbook_path: str,
    as_of: str | None,
    engine: str,
    fmt: str,
    db: str,
    settings_file: str | None,
) -> None:
    """Why did (or didn't) CUSTOMER get each rule of PLAYBOOK? Changes nothing."""
    settings = _settings(settings_file)
    playbook = load_playbook(playbook_path, settings)
    moment = parse_as_of(as_of, settings.tz)
    with open_store(db) as store:
        result = explain_customer(store, settings, playbook, customer, moment, engine=engine)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    click.echo(
        f"{customer} and {playbook.name} v{playbook.version} as of "
        f"{format_epoch(moment, settings.tz)}"
    )
    for rule in result.rules:
        click.echo(f"\n{rule.rule_id} ({rule.kind} rule): {rule.verdict}")
        if rule.condition:
            click.echo(f"  when {rule.condition}")
        for part in rule.parts:
            mark = {True: "yes", False: "no", None: "unknown"}[part.holds]
            values = ", ".join(f"{k} = {v!r}" for k, v in part.values.items())
            click.echo(f"    [{mark:>7}] {part.text}    ({values})")


@cli.command(name="compile")
@click.argument("playbook_path", metavar="PLAYBOOK", type=click.Path(dir_okay=False))
@click.option("--settings", "settings_file", type=click.Path(dir_okay=False))
def compile_(playbook_path: str, settings_file: str | None) -> None:
    """Show the SQL and the durable-rules ruleset a playbook becomes."""
    settings = _settings(settings_file)
    compiled = compile_playbook(load_playbook(playbook_path, settings), settings)
    click.echo(compiled.render())


@cli.command()
@click.argument("name", type=click.Choice(["playbook", "settings"]), default="playbook")
def schema(name: str) -> None:
    """Print the JSON Schema of playbooks (or of the settings file)."""
    click.echo(json.dumps(load_schema(name), ensure_ascii=False, indent=2))


@cli.command()
@click.option(
    "--customers",
    default=2000,
    show_default=True,
    type=click.IntRange(1),
    help="How many customers to generate.",
)
@click.option("--seed", default=7, show_default=True, help="Random seed (same seed, same data).")
@click.option("--as-of", help="The demo history ends here (default: today).")
@click.option("--replace", is_flag=True, help="Delete an existing store file first.")
@store_options
def demo(
    customers: int, seed: int, as_of: str | None, replace: bool, db: str, settings_file: str | None
) -> None:
    """Create a store of realistic demo data, then show what the engine makes of it."""
    from engine.demo import generate_demo

    settings = _settings(settings_file)
    end = parse_as_of(as_of, settings.tz) if as_of else _start_of_today(settings)
    if replace:
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
    with open_store(db) as store:
        summary = generate_demo(store, customers=customers, seed=seed, end=end, tz=settings.tz)
        click.echo(
            f"Created {db}: {_summary_text(store)} "
            f"(seed {seed}, history up to {format_epoch(end, settings.tz)})\n"
        )
        del summary
        click.echo(render_report(build_report(store, settings, end), settings))
    click.echo(
        f"\nNext: playbook features --db {db} --as-of {_day(end, settings)}  |  playbook fields"
    )


def _summary_text(store: Store) -> str:
    return ", ".join(
        f"{store.count(t):,} {t}" for t in ("customers", "orders", "refunds", "events")
    )


def _day(moment: int, settings: Settings) -> str:
    return local_day(moment, settings.tz).isoformat()


def _start_of_today(settings: Settings) -> int:
    from datetime import datetime

    today = datetime.now(settings.tz).date().isoformat()
    return parse_as_of(today, settings.tz)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C: roll back, delete scratch files


def main() -> None:
    """Entry point of the `playbook` console script."""
    signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="playbook")
