"""The exceptions users can cause, and the exit code each one maps to.

    PlaybookError            base of every error a user can cause (exit 1)
     ├── UsageError          bad command-line input: a flag, a date, a mapping (exit 2)
     ├── InputError          an input file or its data is invalid (exit 1)
     │    └── SettingsError  the settings file is invalid
     ├── StoreError          the fact store cannot be opened, migrated or written (exit 1)
     └── RejectedRows        an ingest finished but rejected some rows (exit 1)

Library code raises these and never prints or exits; the CLI renders them.
"""

from __future__ import annotations


class PlaybookError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 1


class UsageError(PlaybookError):
    """A command-line value is malformed (a date, a --map pair, a format name)."""

    exit_code = 2


class InputError(PlaybookError):
    """An input file, or the data in it, is invalid."""


class SettingsError(InputError):
    """The settings file is invalid."""


class StoreError(PlaybookError):
    """The fact store cannot be opened, migrated or written."""
