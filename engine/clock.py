"""Times as the engine keeps them: UTC epoch seconds, parsed from what operators type.

Every timestamp in the store is an integer number of seconds since the epoch (UTC).
Text becomes a timestamp here and nowhere else, so "a bare date means midnight in the
store's timezone" is one rule in one place.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.errors import UsageError

DAY = 86_400
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}
_BARE_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def get_timezone(name: str) -> ZoneInfo:
    """Return the IANA timezone called `name`, or raise UsageError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(
            f"unknown timezone {name!r} (use an IANA name like Asia/Shanghai)"
        ) from exc


def parse_duration(text: str) -> int:
    """Parse `30d`, `12h`, `45m`, `10s` or `2w` into seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use a number and s, m, h, d or w, e.g. 30d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def to_epoch(moment: datetime, tz: tzinfo) -> int:
    """Epoch seconds of `moment`; a naive datetime is read in `tz`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return int(moment.timestamp() // 1)


def parse_timestamp(text: str, tz: tzinfo, fmt: str | None = None) -> int:
    """Parse a timestamp: ISO 8601 by default, a strptime `fmt`, or `epoch` / `epoch_ms`.

    A bare date means midnight in `tz`; a time without an offset is read in `tz`.
    Raises ValueError with a short reason on anything it cannot read.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty timestamp")
    if fmt in (None, "iso", "iso8601"):
        return _parse_iso(text, tz)
    if fmt == "epoch":
        return int(float(text))
    if fmt == "epoch_ms":
        return int(float(text) // 1000)
    try:
        return to_epoch(datetime.strptime(text, fmt), tz)
    except ValueError as exc:
        raise ValueError(f"{text!r} does not match --ts-format {fmt!r}") from exc


def _parse_iso(text: str, tz: tzinfo) -> int:
    if _BARE_DATE.match(text):
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"not a date: {text!r}") from exc
        return to_epoch(datetime(day.year, day.month, day.day), tz)
    candidate = text.replace("/", "-") if re.match(r"^\d{4}/\d{2}/\d{2}", text) else text
    try:
        return to_epoch(datetime.fromisoformat(candidate), tz)
    except ValueError as exc:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from exc


_RELATIVE = re.compile(r"^today(?:\s*([-+])\s*(\S+))?$")


def parse_as_of(text: str | None, tz: tzinfo, flag: str = "--as-of") -> int:
    """The moment an `--as-of` value names: a date is the start of that day; None is now;
    `today` is the start of today, `today-12w` (any duration) that long before it and
    `today+34h` that long after it."""
    if text is None:
        return int(time.time())
    relative = _RELATIVE.match(text.strip())
    try:
        if relative:
            today = datetime.now(tz).date()
            start = to_epoch(datetime(today.year, today.month, today.day), tz)
            shift = parse_duration(relative.group(2)) if relative.group(2) else 0
            return start - shift if relative.group(1) == "-" else start + shift
        return parse_timestamp(text, tz)
    except ValueError as exc:
        raise UsageError(
            f"{flag}: {exc} (use YYYY-MM-DD, an ISO 8601 time, today or today-30d)"
        ) from exc


def local_day(epoch: int, tz: tzinfo) -> date:
    """The calendar date of `epoch` in `tz`."""
    return datetime.fromtimestamp(epoch, tz).date()


def utc_offset(epoch: int, tz: tzinfo) -> int:
    """Seconds east of UTC that `tz` is at `epoch`."""
    offset = datetime.fromtimestamp(epoch, tz).utcoffset()
    return int((offset or timedelta(0)).total_seconds())


def format_epoch(epoch: int | None, tz: tzinfo) -> str | None:
    """ISO 8601 text of `epoch` in `tz`, or None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz).isoformat()
