"""``routheon usage``'s output: a table for people, a JSON list for programs."""

from __future__ import annotations

import json

from routheon.usage.aggregate import Row, Totals

COLUMNS = ("NAME", "MODEL", "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "WITHOUT USAGE")
NO_MODEL = "-"


def _numbers(totals: Totals) -> list[str]:
    return [
        str(value)
        for value in (
            totals.requests, totals.errors, totals.prompt_tokens, totals.completion_tokens, totals.unknown_usage
        )
    ]


def table(rows: list[Row], total: Totals, by_day: bool) -> str:
    """Text columns left-aligned, counts right-aligned, then a TOTAL line."""
    header = (["DAY"] if by_day else []) + list(COLUMNS)
    lines = [header]
    for row in rows:
        day = [row.day.isoformat() if row.day else ""] if by_day else []
        lines.append([*day, row.who, row.model or NO_MODEL, *_numbers(row.totals)])
    lines.append([*([""] if by_day else []), "TOTAL", "", *_numbers(total)])
    text_columns = len(header) - 5
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    out = []
    for line in lines:
        cells = [
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def as_json(rows: list[Row]) -> str:
    return json.dumps([row.json() for row in rows], indent=2)
