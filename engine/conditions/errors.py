"""The single exception type raised by the condition parser."""

from __future__ import annotations


class ConditionSyntaxError(ValueError):
    """A condition text could not be parsed.

    ``offset`` is the 0-based character offset into the source text where the problem was
    found; ``hint`` is an optional suggestion phrased for the operator who wrote the rule.
    """

    def __init__(self, message: str, offset: int, hint: str | None = None) -> None:
        super().__init__(message, offset, hint)
        self.message = message
        self.offset = offset
        self.hint = hint

    def __str__(self) -> str:
        """Render message, position and hint on one line."""
        text = f"{self.message} (at character {self.offset})"
        return f"{text}; hint: {self.hint}" if self.hint else text
