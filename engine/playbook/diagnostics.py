"""Diagnostics: one problem in a playbook, where it is, and how to fix it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ERROR = "error"
WARNING = "warning"

PathT = tuple[str | int, ...]


def format_path(path: PathT) -> str:
    """`("rules", 0, "when")` -> `rules[0].when`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


@dataclass(frozen=True, order=True)
class Diagnostic:
    """A problem found in a file: sortable by position."""

    file: str
    line: int
    col: int
    path: str
    severity: str
    message: str
    hint: str | None = None

    def format(self) -> str:
        """`file:line:col: path: message (hint)`; warnings say so."""
        level = "warning: " if self.severity == WARNING else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.file}:{self.line}:{self.col}: {level}{self.path}: {self.message}{hint}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (file, line, col, path, severity, message, hint)."""
        return asdict(self)


def has_errors(diagnostics: list[Diagnostic]) -> bool:
    """Whether any diagnostic is an error (warnings alone do not fail validation)."""
    return any(d.severity == ERROR for d in diagnostics)
