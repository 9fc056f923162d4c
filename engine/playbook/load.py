"""Loading a playbook: YAML -> schema -> meaning, collecting every problem on the way.

`check_playbook_file` never raises for a bad playbook: it returns the diagnostics (sorted
by position) and, when there are no errors, the validated `Playbook`. `load_playbook`
is the strict form the engine uses to run one.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

from jinja2 import TemplateSyntaxError, nodes

from engine.catalog import field_catalog, source_fields
from engine.clock import get_timezone, parse_duration
from engine.conditions import (
    ConditionSyntaxError,
    check_condition,
    fields_used,
    parse_condition,
)
from engine.conditions.ir import Condition
from engine.conditions.satisfy import contradiction
from engine.conditions.types import FieldType
from engine.errors import InputError, UsageError
from engine.playbook.diagnostics import (
    ERROR,
    WARNING,
    Diagnostic,
    PathT,
    format_path,
    has_errors,
)
from engine.playbook.model import Action, Cap, Coupon, Group, MiniProgram, Playbook, Rule
from engine.playbook.schema_check import schema_diagnostics
from engine.playbook.templates import (
    COUPON_FIELDS,
    GROUP_FIELDS,
    PLAYBOOK_FIELDS,
    RULE_FIELDS,
    TemplateProblem,
    environment,
    template_variables,
)
from engine.settings import Settings
from engine.store import EVENT_TYPES
from engine.yamlfile import YamlDoc, YamlError, load_yaml_file

DEFAULT_PRIORITY = 100
DEFAULT_EXPIRES = "7d"
MAX_HOLDOUT_PCT = 50.0
WECOM_TEXT_LIMIT = 4000  # bytes, externalcontact/add_msg_template
PLAYBOOK_SUFFIXES = (".yaml", ".yml")


class PlaybookInvalid(InputError):
    """A playbook has errors; `diagnostics` lists them all."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(d.format() for d in diagnostics if d.severity == ERROR))


def load_playbook(path: str | Path, settings: Settings) -> Playbook:
    """The validated playbook at `path`; raises PlaybookInvalid listing every error."""
    playbook, diagnostics = check_playbook_file(path, settings)
    if playbook is None:
        raise PlaybookInvalid(diagnostics)
    return playbook


def playbook_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named by `paths`: files as given, folders searched for *.yaml / *.yml."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.suffix in PLAYBOOK_SUFFIXES and p.is_file()
            )
        elif path.exists():
            yield path
        else:
            raise UsageError(f"{raw}: no such file or folder")


def check_playbook_file(
    path: str | Path, settings: Settings
) -> tuple[Playbook | None, list[Diagnostic]]:
    """Validate one playbook file: (the playbook or None, every diagnostic by position)."""
    name = str(path)
    try:
        doc = load_yaml_file(path)
        raw = Path(path).read_bytes()
    except YamlError as exc:
        return None, [
            Diagnostic(name, exc.line, exc.col, "(file)", ERROR, exc.message + exc.excerpt)
        ]
    checker = _Checker(doc, settings)
    playbook = checker.run(hashlib.sha256(raw).hexdigest())
    diagnostics = sorted(set(checker.diagnostics))
    return (None if has_errors(diagnostics) else playbook), diagnostics


class _Checker:
    """The semantic checks of one document; diagnostics accumulate in `self.diagnostics`."""

    def __init__(self, doc: YamlDoc, settings: Settings) -> None:
        self.doc = doc
        self.settings = settings
        self.catalog = field_catalog(settings)
        self.diagnostics: list[Diagnostic] = [
            Diagnostic(doc.file, p.line, p.col, "(file)", ERROR, p.message) for p in doc.problems
        ]
        self.used: dict[str, set[str]] = {"templates": set(), "coupons": set(), "groups": set()}
        # Names a misspelt reference was pointed at: "never used" would only add noise.
        self.suggested: dict[str, set[str]] = {
            "templates": set(),
            "coupons": set(),
            "groups": set(),
        }

    # -- reporting -------------------------------------------------------------------

    def report(
        self,
        severity: str,
        path: PathT,
        message: str,
        hint: str | None = None,
        *,
        key: bool = False,
        offset: int | None = None,
    ) -> None:
        if offset is not None:
            mark = self.doc.mark_in_string(path, offset)
        else:
            mark = self.doc.key_mark(path) if key else self.doc.mark(path)
        self.diagnostics.append(
            Diagnostic(
                self.doc.file, mark.line, mark.col, format_path(path), severity, message, hint
            )
        )

    def error(self, path: PathT, message: str, hint: str | None = None, **kw: Any) -> None:
        self.report(ERROR, path, message, hint, **kw)

    def warning(self, path: PathT, message: str, hint: str | None = None, **kw: Any) -> None:
        self.report(WARNING, path, message, hint, **kw)

    # -- the checks --------------------------------------------------------------------

    def run(self, content_hash: str) -> Playbook | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.error(
                (),
                "a playbook is a mapping with playbook, version and rules",
                "start from playbooks/lifecycle.yaml",
            )
            return None
        self.diagnostics.extend(schema_diagnostics(self.doc))
        templates = _mapping(data.get("templates"))
        coupons = _mapping(data.get("coupons"))
        groups = _mapping(data.get("groups"))
        self.check_timezone(data.get("timezone"))
        holdout = self.check_holdout(data.get("holdout"))
        quiet = self.check_quiet_hours(data.get("quiet_hours"))
        caps = self.check_caps(data.get("caps"))
        template_uses = self.check_templates(templates)
        rules = []
        seen_ids: dict[str, int] = {}
        group_priorities: dict[tuple[str, int], str] = {}
        for index, rule in enumerate(_list(data.get("rules"))):
            if isinstance(rule, dict):
                built = self.check_rule(
                    index,
                    rule,
                    seen_ids,
                    group_priorities,
                    templates,
                    coupons,
                    groups,
                    template_uses,
                )
                if built is not None:
                    rules.append(built)
        for section in ("templates", "coupons", "groups"):
            for name in _mapping(data.get(section)):
                if name not in self.used[section] and name not in self.suggested[section]:
                    self.warning(
                        (section, name),
                        f"{section[:-1]} '{name}' is never used",
                        "remove it, or use it in a rule",
                        key=True,
                    )
        if has_errors(self.diagnostics):
            return None
        return Playbook(
            name=data["playbook"],
            version=data["version"],
            description=data.get("description", ""),
            timezone=data.get("timezone"),
            quiet_hours=quiet,
            holdout=holdout,
            caps=tuple(caps),
            coupons={code: _coupon(code, c) for code, c in coupons.items()},
            groups={
                name: Group(name, g["join_url"], g.get("description", ""))
                for name, g in groups.items()
            },
            templates=dict(templates),
            rules=tuple(rules),
            file=self.doc.file,
            content_hash=content_hash,
        )

    def check_timezone(self, value: Any) -> None:
        if not isinstance(value, str):
            return
        try:
            get_timezone(value)
        except UsageError:
            close = difflib.get_close_matches(value, sorted(available_timezones()), n=1)
            self.error(
                ("timezone",),
                f"unknown timezone '{value}'",
                f"did you mean '{close[0]}'?" if close else "use an IANA name like Asia/Shanghai",
            )

    def check_holdout(self, value: Any) -> float:
        if not isinstance(value, str) or not value.endswith("%"):
            return 0.0
        try:
            pct = float(value[:-1])
        except ValueError:
            return 0.0
        if not 0 <= pct <= MAX_HOLDOUT_PCT:
            self.error(
                ("holdout",),
                f"holdout {value} is outside 0%-50%",
                "a control group larger than half the customers leaves too few to act on",
            )
            return 0.0
        return pct / 100

    def check_quiet_hours(self, value: Any) -> tuple[int, int] | None:
        if not isinstance(value, str) or len(value) != 11:
            return None
        try:
            start, end = (int(p[:2]) * 60 + int(p[3:]) for p in value.split("-"))
        except ValueError:
            return None
        if start == end:
            self.error(
                ("quiet_hours",),
                "quiet hours start and end at the same time",
                "give a range like 21:30-09:00, or remove quiet_hours",
            )
            return None
        return start, end

    def check_caps(self, caps: Any) -> list[Cap]:
        out = []
        for index, cap in enumerate(caps if isinstance(caps, list) else []):
            if not isinstance(cap, dict) or not isinstance(cap.get("window"), str):
                continue
            window = cap["window"]
            seconds = None
            if not window.startswith("calendar_"):
                try:
                    seconds = parse_duration(window)
                except ValueError:
                    continue
                if seconds == 0:
                    self.error(("caps", index, "window"), "a cap's window must be longer than 0")
                    continue
            if isinstance(cap.get("max"), int):
                out.append(Cap(cap["max"], window, seconds, cap.get("channel")))
        return out

    def check_templates(self, templates: dict[str, Any]) -> dict[str, list[Any]]:
        uses: dict[str, list[Any]] = {}
        for name, text in templates.items():
            if not isinstance(text, str):
                continue
            found = template_variables(text)
            if isinstance(found, TemplateProblem):
                self.error(
                    ("templates", name),
                    f"template does not parse: {found.message}",
                    offset=found.offset,
                )
                continue
            uses[name] = found
            self.check_template_fields(name, found)
        return uses

    def check_rule(
        self,
        index: int,
        rule: dict[str, Any],
        seen_ids: dict[str, int],
        group_priorities: dict[tuple[str, int], str],
        templates: dict[str, Any],
        coupons: dict[str, Any],
        groups: dict[str, Any],
        template_uses: dict[str, list[Any]],
    ) -> Rule | None:
        at: PathT = ("rules", index)
        rule_id = rule.get("id")
        if isinstance(rule_id, str):
            if rule_id in seen_ids:
                self.error(
                    (*at, "id"),
                    f"duplicate rule id '{rule_id}' (also rules[{seen_ids[rule_id]}])",
                    "give every rule its own id",
                )
            else:
                seen_ids[rule_id] = index
        event = rule.get("on") if rule.get("on") in EVENT_TYPES else None
        condition = self.check_condition(at, rule.get("when"), event)
        priority = rule.get("priority", DEFAULT_PRIORITY)
        group = rule.get("group")
        enabled = rule.get("enabled", True) is not False
        if isinstance(group, str) and isinstance(priority, int) and enabled:
            other = group_priorities.get((group, priority))
            if other is not None:
                self.error(
                    (*at, "priority" if "priority" in rule else "group"),
                    f"rules '{other}' and '{rule_id}' are both in group '{group}' with "
                    f"priority {priority}; which one wins would be arbitrary",
                    "give them different priorities",
                )
            else:
                group_priorities[(group, priority)] = str(rule_id)
        cooldown = self.positive_duration(at, rule, "cooldown")
        expires = self.positive_duration(at, rule, "expires")
        self.check_dates(at, rule)
        actions = []
        for number, action in enumerate(_list(rule.get("then"))):
            if isinstance(action, dict) and len(action) == 1:
                built = self.check_action(
                    (*at, "then", number),
                    action,
                    event,
                    templates,
                    coupons,
                    groups,
                    template_uses,
                    str(rule_id),
                )
                if built is not None:
                    actions.append(built)
        if not isinstance(rule_id, str):
            return None
        return Rule(
            id=rule_id,
            when=condition,
            when_text=rule.get("when"),
            on=event,
            priority=priority if isinstance(priority, int) else DEFAULT_PRIORITY,
            group=group if isinstance(group, str) else None,
            cooldown_seconds=cooldown,
            enabled=rule.get("enabled", True) is not False,
            start=rule.get("start"),
            end=rule.get("end"),
            expires_seconds=expires or parse_duration(DEFAULT_EXPIRES),
            actions=tuple(actions),
            description=rule.get("description", ""),
        )

    def condition_fields(self, event: str | None) -> dict[str, FieldType]:
        fields = {name: info.type for name, info in self.catalog.items()}
        if event is not None:
            fields.update({f"event.{k}": v.type for k, v in source_fields(event).items()})
        return fields

    def check_condition(self, at: PathT, text: Any, event: str | None) -> Condition | None:
        if not isinstance(text, str) or not text:
            return None  # the schema reports it
        path = (*at, "when")
        try:
            condition = parse_condition(text)
        except ConditionSyntaxError as exc:
            self.error(path, exc.message, exc.hint, offset=exc.offset)
            return None
        used = fields_used(condition)
        fields = self.condition_fields(event)
        if event is not None:
            extra = {n[len("event.") :] for n in used if n.startswith("event.props.")}
            fields.update(
                {
                    f"event.{k}": v.type
                    for k, v in source_fields(event, {f"props.{e[6:]}" for e in extra}).items()
                }
            )
        problems = check_condition(condition, fields)
        for problem in problems:
            name = text[problem.start : problem.end]
            if event is None and name.startswith("event."):
                self.error(
                    path,
                    f"'{name}' is only available in rules with on:",
                    "add on: <event type>, or use a customer feature",
                    offset=problem.start,
                )
            else:
                self.error(path, problem.message, problem.hint, offset=problem.start)
        if problems:
            return None
        bad = contradiction(condition)
        if bad is not None:
            self.error(
                path,
                "this condition can never be true",
                f"the conditions on '{bad}' contradict each other",
                offset=0,
            )
            return None
        return condition

    def positive_duration(self, at: PathT, rule: dict[str, Any], key: str) -> int | None:
        value = rule.get(key)
        if not isinstance(value, str):
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            return None  # the schema already said so
        if seconds == 0:
            hint = "remove it to use the 7-day default" if key == "expires" else f"remove {key}"
            self.error((*at, key), f"{key} must be longer than 0", hint)
            return None
        return seconds

    def check_dates(self, at: PathT, rule: dict[str, Any]) -> None:
        days: dict[str, date] = {}
        for key in ("start", "end"):
            value = rule.get(key)
            if isinstance(value, str) and len(value) == 10:
                try:
                    days[key] = date.fromisoformat(value)
                except ValueError:
                    self.error((*at, key), f"'{value}' is not a real date")
        if len(days) == 2 and days["start"] > days["end"]:
            self.error((*at, "end"), f"end {days['end']} is before start {days['start']}")

    def check_action(
        self,
        at: PathT,
        action: dict[str, Any],
        event: str | None,
        templates: dict[str, Any],
        coupons: dict[str, Any],
        groups: dict[str, Any],
        template_uses: dict[str, list[Any]],
        rule_id: str,
    ) -> Action | None:
        kind, body = next(iter(action.items()))
        if not isinstance(body, dict):
            return None
        context = {"customer", "rule", "playbook"} | ({"event"} if event else set())
        coupon = body.get("code") if kind == "coupon" else body.get("coupon")
        if isinstance(coupon, str):
            self.reference(at, "coupon" if kind != "coupon" else "code", "coupons", coupon, coupons)
            context.add("coupon")
        group = body.get("group") if kind == "invite_group" else None
        if isinstance(group, str):
            self.reference(at, "group", "groups", group, groups)
            context.add("group")
        template = body.get("template")
        if isinstance(template, str) and self.reference(
            at, "template", "templates", template, templates
        ):
            self.check_template_use(
                template, template_uses.get(template, []), context, event, rule_id, kind
            )
            # Group invitations also go out as WeCom messages.
            wecom = body.get("channel") == "wecom" or kind == "invite_group"
            if wecom and isinstance(templates[template], str):
                self.check_wecom_length(template, templates[template])
        if kind == "tag":
            both = set(_strings(body.get("add"))) & set(_strings(body.get("remove")))
            if both:
                self.warning(at, f"tag {sorted(both)[0]!r} is both added and removed")
        return Action(
            kind=kind,
            channel=body.get("channel"),
            template=template if isinstance(template, str) else None,
            coupon=coupon if isinstance(coupon, str) else None,
            group=group,
            add_tags=tuple(_strings(body.get("add"))),
            remove_tags=tuple(_strings(body.get("remove"))),
            assign_to=body.get("assign_to"),
            note=body.get("note"),
        )

    def reference(
        self, at: PathT, key: str, section: str, name: str, defined: dict[str, Any]
    ) -> bool:
        if name in defined:
            self.used[section].add(name)
            return True
        close = difflib.get_close_matches(name, list(defined), n=1)
        self.suggested[section].update(close)
        hint = (
            f"did you mean '{close[0]}'?"
            if close
            else f"define it under {section}:"
            if not defined
            else f"defined {section}: {', '.join(defined)}"
        )
        self.error(
            (*at, next(iter(self._action_body(at))), key),
            f"{section[:-1]} '{name}' is not defined",
            hint,
        )
        return False

    def _action_body(self, at: PathT) -> dict[str, Any]:
        node: Any = self.doc.data
        for part in at:
            node = node[part]
        return node  # type: ignore[no-any-return]

    def check_template_fields(self, name: str, uses: list[Any]) -> None:
        """Checks that hold wherever a template is used: known variables and fields."""
        path: PathT = ("templates", name)
        attrs: dict[str, Iterable[str]] = {
            "customer": self.catalog,
            "coupon": COUPON_FIELDS,
            "group": GROUP_FIELDS,
            "rule": RULE_FIELDS,
            "playbook": PLAYBOOK_FIELDS,
            "event": (),  # depends on the rule's event type: checked where it is used
        }
        for use in uses:
            if use.root not in attrs:
                self.error(
                    path,
                    f"unknown variable '{use.root}'",
                    f"templates can use {', '.join(sorted(attrs))}",
                    offset=use.offset,
                )
            elif use.attr is None:
                example = next(iter(attrs[use.root]), "amount")
                self.error(
                    path,
                    f"'{use.root}' needs a field, e.g. {use.root}.{example}",
                    offset=use.offset,
                )
            elif use.root != "event" and use.attr not in attrs[use.root]:
                close = difflib.get_close_matches(use.attr, list(attrs[use.root]), n=1)
                self.error(
                    path,
                    f"{use.root} has no field '{use.attr}'",
                    f"did you mean '{close[0]}'?" if close else None,
                    offset=use.offset,
                )

    def check_template_use(
        self,
        name: str,
        uses: list[Any],
        context: set[str],
        event: str | None,
        rule_id: str,
        kind: str,
    ) -> None:
        """Checks that depend on the action using the template: what it makes available."""
        path: PathT = ("templates", name)
        why = {
            "coupon": "does not issue a coupon",
            "group": "is not an invite_group",
            "event": "has no on: event",
        }
        for use in uses:
            if use.attr is None or use.root not in why:
                continue
            if use.root not in context:
                self.error(
                    path,
                    f"uses {use.root}.{use.attr} but rule '{rule_id}' ({kind}) {why[use.root]}",
                    offset=use.offset,
                )
            elif use.root == "event" and event and use.attr not in source_fields(event):
                fields = list(source_fields(event))
                close = difflib.get_close_matches(use.attr, fields, n=1)
                self.error(
                    path,
                    f"{event} events have no field '{use.attr}'",
                    f"did you mean '{close[0]}'?" if close else f"they have {', '.join(fields)}",
                    offset=use.offset,
                )

    def check_wecom_length(self, name: str, text: str) -> None:
        """A WeCom template whose fixed text alone is over the limit can never be sent."""
        fixed = fixed_text(text)
        if fixed is None:
            return  # it does not parse: reported by check_templates
        size = len(fixed.encode("utf-8"))
        if size > WECOM_TEXT_LIMIT:
            what = "" if fixed == text else " of fixed text (without {{ }} values)"
            self.error(
                ("templates", name),
                f"template is {size:,} bytes{what}; WeCom mass messages "
                f"take at most {WECOM_TEXT_LIMIT:,}",
                "shorten it",
            )


def fixed_text(text: str) -> str | None:
    """The text a template always renders: `text` without its {{ }} expressions, {# #}
    comments and {% %} blocks (whose text may not render); None if it does not parse."""
    try:
        tree = environment().parse(text)
    except TemplateSyntaxError:
        return None
    return "".join(
        part.data
        for node in tree.body
        if isinstance(node, nodes.Output)
        for part in node.nodes
        if isinstance(part, nodes.TemplateData)
    )


def _coupon(code: str, spec: dict[str, Any]) -> Coupon:
    mini = spec.get("miniprogram")
    return Coupon(
        code,
        float(spec["value"]),
        float(spec.get("min_spend", 0)),
        spec.get("budget"),
        spec.get("description", ""),
        url=spec.get("url"),
        miniprogram=(
            MiniProgram(mini["appid"], mini["page"], mini["title"], mini["pic_media_id"])
            if mini is not None
            else None
        ),
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [v for v in _list(value) if isinstance(v, str)]
