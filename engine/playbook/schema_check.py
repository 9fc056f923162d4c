"""JSON Schema validation of a playbook, with messages written for operators.

jsonschema says "'prioirty' was unexpected"; operators need "unknown key 'prioirty' (did
you mean 'priority'?)" at the key's own line and column. This module turns each schema
error into such a diagnostic.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import cache
from typing import Any

import jsonschema

from engine.playbook.diagnostics import ERROR, Diagnostic, PathT, format_path
from engine.schemas import load_schema
from engine.yamlfile import Mark, YamlDoc

_ACTIONS = ("send", "invite_group", "tag", "task", "coupon")
_JSON_TYPES = {
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping (key: value)",
    "null": "nothing",
}
# What a pattern failure means, by the name of the key that failed it.
_PATTERN_HINTS = {
    "cooldown": ("is not a duration", "write a number and a unit: 30d, 12h, 45m, 2w"),
    "expires": ("is not a duration", "write a number and a unit: 7d, 12h"),
    "window": ("is not a window", "use a duration like 7d, or calendar_month / calendar_week"),
    "quiet_hours": ("is not a time range", "use HH:MM-HH:MM, e.g. 21:30-09:00"),
    "holdout": ("is not a percentage", "write it like 10%"),
    "start": ("is not a date", "use YYYY-MM-DD"),
    "end": ("is not a date", "use YYYY-MM-DD"),
    "join_url": ("is not a web link", "it must start with https:// or http://"),
    "url": ("is not a web link", "it must start with https:// or http://"),
    "id": ("is not a valid id", "use lowercase letters, digits, '-' and '_'"),
    "playbook": ("is not a valid name", "use lowercase letters, digits, '-' and '_'"),
    "group": ("is not a valid group name", "use lowercase letters, digits, '-' and '_'"),
}


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema("playbook"))


def schema_diagnostics(doc: YamlDoc) -> list[Diagnostic]:
    """Every schema violation in `doc`, as positioned diagnostics."""
    found: list[Diagnostic] = []
    for error in _validator().iter_errors(doc.data):
        found.extend(_diagnose(doc, error))
    return found


def _is_rule_when_on(error: jsonschema.ValidationError) -> bool:
    return all(
        set(getattr(sub, "validator_value", ()) or ()) <= {"when", "on"}
        for sub in error.context or []
    )


def _diagnose(doc: YamlDoc, error: jsonschema.ValidationError) -> list[Diagnostic]:
    path: PathT = tuple(error.absolute_path)
    instance: Any = error.instance
    expected: Any = error.validator_value
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator

    def at(where: PathT, message: str, hint: str | None = None, key: bool = False) -> Diagnostic:
        mark: Mark = doc.key_mark(where) if key else doc.mark(where)
        return Diagnostic(doc.file, mark.line, mark.col, format_path(where), ERROR, message, hint)

    if kind == "additionalProperties" and isinstance(instance, dict):
        known = list(schema.get("properties", {}))
        is_action = set(known) == set(_ACTIONS)
        out = []
        for extra in (k for k in instance if k not in known):
            what = "action" if is_action else "key"
            out.append(
                at(
                    (*path, extra),
                    f"unknown {what} '{extra}'",
                    _suggest(extra, known, "allowed"),
                    key=True,
                )
            )
        return out
    if kind == "required" and isinstance(instance, dict):
        missing = [k for k in expected if k not in instance]
        return [at(path, f"missing required key '{name}'") for name in missing]
    if kind == "anyOf" and _is_rule_when_on(error):
        return [at(path, "a rule needs `when` (a condition), `on` (an event type), or both")]
    if kind in ("minProperties", "maxProperties") and set(schema.get("properties", {})) == set(
        _ACTIONS
    ):
        if kind == "minProperties":
            return [at(path, "empty action", f"use one of {', '.join(_ACTIONS)}")]
        return [
            at(
                path,
                f"one action per list item, this one has {', '.join(instance)}",
                "start each action on its own '- ' line",
            )
        ]
    if kind == "minProperties":
        return [
            at(path, "must not be empty", _suggest("", list(schema.get("properties", {})), "use"))
        ]
    if kind == "enum":
        allowed = [str(v) for v in expected]
        return [
            at(
                path,
                f"{_show(instance)} is not allowed here",
                _suggest(str(instance), allowed, "use one of"),
            )
        ]
    if kind == "type":
        want = expected
        wants = [want] if isinstance(want, str) else list(want)
        return [
            at(
                path,
                f"expected {' or '.join(_JSON_TYPES.get(w, w) for w in wants)}, "
                f"got {_describe(instance)}",
                _PATTERN_HINTS.get(_key_name(path), ("", None))[1],
            )
        ]
    if kind == "pattern":
        what, hint = _PATTERN_HINTS.get(_key_name(path), ("has the wrong form", None))
        return [at(path, f"{_show(instance)} {what}", hint)]
    if kind == "propertyNames":
        return [
            at(path, f"{_show(instance)} is not a valid name", "use letters, digits, '-' and '_'")
        ]
    if kind in ("minimum", "exclusiveMinimum", "maximum"):
        bound = expected
        relation = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most"}[
            kind
        ]
        return [
            at(
                path,
                f"{_show(instance)} is too small: it must be {relation} {bound}"
                if kind != "maximum"
                else f"{_show(instance)} must be {relation} {bound}",
            )
        ]
    if kind == "minItems":
        return [at(path, "must not be empty")]
    if kind == "minLength":
        return [at(path, "must not be empty")]
    return [at(path, str(error.message))]


def _key_name(path: PathT) -> str:
    return next((str(p) for p in reversed(path) if isinstance(p, str)), "")


def _suggest(value: str, options: list[str], verb: str) -> str | None:
    close = difflib.get_close_matches(value, options, n=1, cutoff=0.6) if value else []
    if close:
        return f"did you mean '{close[0]}'?"
    return f"{verb}: {', '.join(options)}" if options else None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _describe(value: Any) -> str:
    kinds: list[tuple[type | tuple[type, ...], Callable[[Any], str]]] = [
        (bool, lambda v: str(v).lower()),
        (str, lambda v: f"text {v!r}"),
        ((int, float), lambda v: f"the number {v}"),
        (list, lambda v: "a list"),
        (dict, lambda v: "a mapping"),
    ]
    if value is None:
        return "nothing (an empty value)"
    for types, show in kinds:
        if isinstance(value, types):
            return show(value)
    return type(value).__name__
