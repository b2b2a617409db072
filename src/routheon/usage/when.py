"""``--since`` and ``--until``: ISO-8601 dates or times, UTC unless they carry an offset, or ``today``.

Ranges are half-open, ``since <= time < until``, and a date alone stands for its whole day on
either side: ``--since 2026-12-01 --until 2026-12-07`` is the first week of December, the 7th
included, as a person reading the command expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

_WHEN = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,9}))?)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:?\d{2})?)?"
)
TODAY = "today"
EXAMPLES = "a date (2026-12-08), a date and time (2026-12-08T14:30, UTC unless an offset such as Z or +01:00 follows) or 'today'"


class WhenError(ValueError):
    """A ``--since``/``--until`` value that is not a point in time; the message says what is accepted."""


def _offset(text: str) -> timezone:
    if text in ("Z", "z"):
        return timezone.utc
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise WhenError(f"offset {text} is not a UTC offset")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if text[0] == "-" else delta)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def parse_when(text: str, *, end: bool = False, now: datetime | None = None) -> datetime:
    """The instant ``text`` names, in UTC; with ``end``, a date means the end of that day.

    ``now`` is for tests: ``today`` is the UTC day of it.
    """
    value = text.strip()
    if value.lower() == TODAY:
        day = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date()
        return _midnight(day + timedelta(days=1) if end else day)
    match = _WHEN.fullmatch(value)
    if match is None:
        raise WhenError(f"{text!r} is not a point in time: give {EXAMPLES}")
    try:
        day = date.fromisoformat(match["date"])
        if match["hour"] is None:
            return _midnight(day + timedelta(days=1) if end else day)
        fraction = (match["fraction"] or "0")[:6].ljust(6, "0")
        moment = datetime(
            day.year, day.month, day.day,
            int(match["hour"]), int(match["minute"]), int(match["second"] or 0), int(fraction),
            tzinfo=_offset(match["offset"]) if match["offset"] else timezone.utc,
        )
    except WhenError as exc:
        raise WhenError(f"{text!r}: {exc}") from None
    except (ValueError, OverflowError) as exc:  # 2026-02-30, 25:00, ...
        raise WhenError(f"{text!r} is not a point in time ({exc}): give {EXAMPLES}") from None
    return moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class TimeRange:
    """``since <= time < until``; either side may be open."""

    since: datetime | None = None
    until: datetime | None = None

    @property
    def empty(self) -> bool:
        return self.since is not None and self.until is not None and self.since >= self.until

    def contains(self, moment: datetime) -> bool:
        return (self.since is None or moment >= self.since) and (self.until is None or moment < self.until)

    def may_hold(self, day: date) -> bool:
        """Whether records of this UTC day can fall in the range (record files are named by day)."""
        if self.since is not None and day < self.since.date():
            return False
        return self.until is None or _midnight(day) < self.until

    def describe(self) -> str:
        """`` since …``, `` before …``, both, or nothing, to follow a sentence."""

        def shown(moment: datetime) -> str:
            return moment.strftime("%Y-%m-%d %H:%M:%S UTC").replace(" 00:00:00 UTC", "")

        if self.since and self.until:
            return f" since {shown(self.since)} and before {shown(self.until)}"
        if self.since:
            return f" since {shown(self.since)}"
        if self.until:
            return f" before {shown(self.until)}"
        return ""
