"""Message templates: Jinja2 in a sandbox, with every variable known before anything runs.

A template may only use the variables its action will have (customer.*, coupon.* when
the action issues a coupon, group.* in invite_group, event.* in rules with `on:`,
rule.id, playbook.name); `template_variables` lists what a template uses so validation can
check it, and rendering uses StrictUndefined so a gap is an error, never an empty string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

COUPON_FIELDS = ("code", "value", "min_spend", "description")
GROUP_FIELDS = ("name", "join_url", "description")
RULE_FIELDS = ("id", "description")
PLAYBOOK_FIELDS = ("name", "version", "description")


@dataclass(frozen=True)
class VariableUse:
    """`root.attr` used in a template (attr None for the bare root), at a text offset."""

    root: str
    attr: str | None
    offset: int


@dataclass(frozen=True)
class TemplateProblem:
    """A template that does not parse: the message and the character offset."""

    message: str
    offset: int


@cache
def environment() -> SandboxedEnvironment:
    """The one sandboxed Jinja2 environment templates are parsed and rendered in."""
    return SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        # A field the customer has no value for prints as nothing, not as "None".
        finalize=lambda value: "" if value is None else value,
    )


def template_variables(text: str) -> list[VariableUse] | TemplateProblem:
    """The variables a template uses, or the syntax problem that stops it parsing."""
    found = _template_variables(text)
    return list(found) if isinstance(found, tuple) else found


@lru_cache(maxsize=1024)
def _template_variables(text: str) -> tuple[VariableUse, ...] | TemplateProblem:
    try:
        tree = environment().parse(text)
    except TemplateSyntaxError as exc:
        return TemplateProblem(exc.message or "invalid template", _line_offset(text, exc.lineno))
    free = meta.find_undeclared_variables(tree)
    uses: list[VariableUse] = []
    seen: set[tuple[str, str | None]] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        root, attr = _reference(node)
        if root is None or root not in free:
            continue
        if attr is None and any(r == root and a is not None for r, a in seen):
            continue
        if (root, attr) in seen:
            continue
        seen.add((root, attr))
        uses.append(VariableUse(root, attr, _find(text, root, attr, node.lineno)))
    # A bare name that is also used with an attribute was the attribute's parent node.
    attributed = {u.root for u in uses if u.attr is not None}
    return tuple(u for u in uses if u.attr is not None or u.root not in attributed)


def _reference(node: nodes.Node) -> tuple[str | None, str | None]:
    if isinstance(node, nodes.Name):
        return node.name, None
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
        return node.node.name, node.attr
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.node.name, node.arg.value
    return None, None


def _find(text: str, root: str, attr: str | None, lineno: int) -> int:
    if attr:
        name, key = re.escape(root), re.escape(attr)
        pattern = rf"\b{name}\s*(\.\s*{key}\b|\[\s*['\"]{key})"
    else:
        pattern = rf"\b{re.escape(root)}\b"
    match = re.search(pattern, text)
    return match.start() if match else _line_offset(text, lineno)


def _line_offset(text: str, lineno: int | None) -> int:
    lines = text.split("\n")
    return sum(len(line) + 1 for line in lines[: max((lineno or 1) - 1, 0)])


@lru_cache(maxsize=256)
def _compiled(text: str) -> Template:
    return environment().from_string(text)


def render(text: str, context: dict[str, Any]) -> str:
    """Render a template in the sandbox; a missing variable raises, never renders empty."""
    return _compiled(text).render(context)
