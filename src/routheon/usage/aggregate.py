"""Summing records per key (its name, or its masked last characters), model and, optionally, day.

Keys with the same name share a row: a name stands for a person or a service, and a rotated
key keeps it. A row lists the masked keys it sums. A row follows the name each record carries:
requests made before a key was named count under its masked key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from routheon.usage.records import MASK, Record


@dataclass
class Totals:
    """What a set of requests used. Tokens a backend did not report are not guessed: those
    requests are counted in ``unknown_usage`` (errors, which use nothing, are not)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unknown_usage: int = 0

    def add(self, record: Record) -> None:
        self.requests += 1
        if record.failed:
            self.errors += 1
        elif not record.usage_known:
            self.unknown_usage += 1
        self.prompt_tokens += record.prompt_tokens or 0
        self.completion_tokens += record.completion_tokens or 0

    @classmethod
    def of(cls, parts: Iterable[Totals]) -> Totals:
        """The sum of ``parts``."""
        total = cls()
        for part in parts:
            for name, value in vars(part).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "unknown_usage": self.unknown_usage,
        }


@dataclass
class Row:
    who: str
    name: str
    model: str
    day: date | None
    hints: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)

    @property
    def keys(self) -> str:
        """The masked keys summed here, comma-separated."""
        return ",".join(MASK + hint for hint in sorted(self.hints))

    def json(self) -> dict[str, Any]:
        day = {"day": self.day.isoformat()} if self.day is not None else {}
        return {**day, "name": self.name, "key": self.keys, "model": self.model, **self.totals.json()}


def matches(record: Record, wanted: str) -> bool:
    """Whether ``--name WANTED`` picks this record: its name, or ``…HINT`` (``...HINT``) for its key."""
    if record.name == wanted:
        return True
    for mask in (MASK, "..."):
        if wanted.startswith(mask):
            return record.hint == wanted[len(mask):]
    return False


@dataclass
class Usage:
    """Rows per key and model (and day with ``by_day``), and their total."""

    by_day: bool = False
    _rows: dict[tuple[date | None, str, str], Row] = field(default_factory=dict, init=False, repr=False)

    def add(self, record: Record) -> None:
        day = record.time.date() if self.by_day else None
        who = record.who
        row = self._rows.get((day, who, record.model))
        if row is None:
            row = self._rows[(day, who, record.model)] = Row(who, record.name, record.model, day)
        row.hints.add(record.hint)
        row.totals.add(record)

    @property
    def total(self) -> Totals:
        return Totals.of(row.totals for row in self._rows.values())

    def rows(self) -> list[Row]:
        """Oldest day first, then by key and model."""
        return [self._rows[group] for group in sorted(self._rows, key=lambda group: (group[0] or date.min, *group[1:]))]
