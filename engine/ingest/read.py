"""Streaming readers: a CSV or JSONL file as numbered rows, in constant memory."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine.errors import InputError, UsageError

FORMATS = ("csv", "tsv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class RawRow:
    """One data row: its ordinal (1-based), the file line it starts on, and its values."""

    index: int
    line: int
    values: dict[str, Any]


@dataclass
class ByteCounter:
    """Counts the bytes read so far, for a progress bar."""

    read: int = 0
    total: int = 0


def detect_format(path: Path, explicit: str | None) -> str:
    """The file's format: explicit, by extension, or by its first character."""
    if explicit:
        if explicit not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {explicit!r}")
        return explicit
    by_extension = _EXTENSIONS.get(path.suffix.lower())
    if by_extension:
        return by_extension
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if head.startswith(b"{") else "csv"


class _CountingReader(io.RawIOBase):
    def __init__(self, raw: IO[bytes], counter: ByteCounter) -> None:
        self._raw = raw
        self._counter = counter

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        buffer[: len(data)] = data
        self._counter.read += len(data)
        return len(data)


@dataclass
class FileReader:
    """Iterates the rows of one file; `header` is known after the first row for CSV."""

    path: Path
    format: str
    encoding: str = "utf-8-sig"
    counter: ByteCounter = field(default_factory=ByteCounter)
    header: list[str] | None = None

    def rows(self) -> Iterator[RawRow]:
        """Yield every data row; raise InputError on unreadable text or broken structure."""
        try:
            self.counter.total = self.path.stat().st_size
            raw = self.path.open("rb")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        buffered = io.BufferedReader(_CountingReader(raw, self.counter), buffer_size=1 << 16)
        text = io.TextIOWrapper(buffered, encoding=self.encoding, newline="")
        line = 0
        try:
            if self.format == "jsonl":
                yield from self._jsonl(text)
            else:
                yield from self._csv(text)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: not {self.encoding} text near byte "
                f"{self.counter.read}; try --encoding gbk"
            ) from exc
        except csv.Error as exc:
            raise InputError(f"{self.path}:{line}: broken CSV: {exc}") from exc
        finally:
            text.close()

    def _csv(self, text: IO[str]) -> Iterator[RawRow]:
        reader = csv.reader(text, delimiter="\t" if self.format == "tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            return
        self.header = [name.strip() for name in header]
        index = 0
        start = reader.line_num + 1
        for values in reader:
            if not values or all(not v.strip() for v in values):
                start = reader.line_num + 1
                continue
            index += 1
            row: dict[str, Any] = dict(zip(self.header, values, strict=False))
            if len(values) > len(self.header):
                row["__extra__"] = values[len(self.header) :]
            yield RawRow(index, start, row)
            start = reader.line_num + 1

    def _jsonl(self, text: IO[str]) -> Iterator[RawRow]:
        index = 0
        for number, content in enumerate(text, start=1):
            if not content.strip():
                continue
            index += 1
            try:
                value = json.loads(content)
            except json.JSONDecodeError as exc:
                yield RawRow(index, number, {"__error__": f"invalid JSON: {exc.msg}"})
                continue
            if not isinstance(value, dict):
                yield RawRow(index, number, {"__error__": "a line must be a JSON object"})
                continue
            yield RawRow(index, number, value)
