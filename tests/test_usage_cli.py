"""``routheon usage``, run in-process on record files written here as the plugin writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from usage_samples import append, line, record, secrets

from support import CliResult, run_routheon

ELLIPSIS = "\u2026"


@pytest.fixture
def usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two days, two Traefik processes, a garbage line and a cut-off last line; $ROUTHEON_USAGE names it."""
    folder = tmp_path / "usage"
    append(
        folder, "2026-12-07.100.jsonl",
        record("alice", time="2026-12-07T09:00:00.000Z", prompt=10, completion=20),
        record("", time="2026-12-07T23:59:59.999Z", model="m2", prompt=1, completion=1),
    )
    append(
        folder, "2026-12-08.100.jsonl",
        record("alice", time="2026-12-08T08:00:00.000Z", prompt=100, completion=200, stream=True),
        b"\x00garbage\n",
        record("alice", time="2026-12-08T09:00:00.000Z", prompt=None, completion=None, outcome="no_usage"),
    )
    append(
        folder, "2026-12-08.200.jsonl",
        record("bob", time="2026-12-08T10:00:00.000Z", code=429, prompt=None, completion=None, outcome="refused"),
        record("alice", time="2026-12-08T11:00:00.000Z", prompt=1000, completion=2000),
        line(record("alice", time="2026-12-08T12:00:00.000Z"))[:25],
    )
    monkeypatch.setenv("ROUTHEON_USAGE", str(folder))
    return folder


def usage_cmd(*args: str) -> CliResult:
    result = run_routheon("usage", *args)
    assert not any(secret in result.stdout + result.stderr for secret in secrets())
    return result


def rows(*args: str) -> list[dict[str, object]]:
    result = usage_cmd("--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_table_sums_per_key_and_model_with_a_total(usage: Path) -> None:
    result = usage_cmd()
    assert result.returncode == 0, result.stderr
    table = [text.split() for text in result.stdout.splitlines()]
    assert table == [
        ["NAME", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS", "WITHOUT", "USAGE"],
        ["alice", "m1", "4", "0", "1110", "2220", "1"],
        ["bob", "m1", "1", "1", "0", "0", "0"],
        [f"{ELLIPSIS}qrst", "m2", "1", "0", "1", "1", "0"],
        ["TOTAL", "6", "1", "1111", "2221", "1"],
    ]
    # what was skipped is said, with the file, on stderr
    assert f"{usage / '2026-12-08.100.jsonl'}: skipped 1 line(s) that are not usage records" in result.stderr
    assert f"{usage / '2026-12-08.200.jsonl'}: skipped an incomplete last line" in result.stderr


def test_json_rows_have_the_documented_fields(usage: Path) -> None:
    assert rows()[0] == {
        "name": "alice", "key": f"{ELLIPSIS}abcd", "model": "m1", "requests": 4, "errors": 0,
        "prompt_tokens": 1110, "completion_tokens": 2220, "unknown_usage": 1,
    }
    unnamed = rows("--name", f"{ELLIPSIS}qrst")
    assert [(row["name"], row["key"]) for row in unnamed] == [("", f"{ELLIPSIS}qrst")]


def test_by_day_and_a_time_range(usage: Path) -> None:
    by_day = rows("--by", "day")
    assert [(row["day"], row["key"], row["requests"]) for row in by_day] == [
        ("2026-12-07", f"{ELLIPSIS}abcd", 1),
        ("2026-12-07", f"{ELLIPSIS}qrst", 1),
        ("2026-12-08", f"{ELLIPSIS}abcd", 3),
        ("2026-12-08", f"{ELLIPSIS}wxyz", 1),
    ]
    assert [row["requests"] for row in rows("--since", "2026-12-08", "--until", "2026-12-08")] == [3, 1]
    assert [row["requests"] for row in rows("--until", "2026-12-07")] == [1, 1]  # the whole 7th
    # an offset: 10:30+01:00 is 09:30 UTC, after alice's 09:00 request
    assert [row["prompt_tokens"] for row in rows("--since", "2026-12-08T10:30+01:00", "--name", "alice")] == [1000]
    table = usage_cmd("--by", "day", "--name", "bob").stdout.splitlines()
    assert table[0].split()[:2] == ["DAY", "NAME"] and table[1].split()[:3] == ["2026-12-08", "bob", "m1"]


def test_the_usage_flag_beats_the_variable(usage: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    append(other, "2026-12-08.1.jsonl", record("bob", prompt=7))
    assert [(row["name"], row["prompt_tokens"]) for row in rows("--usage", str(other))] == [("bob", 7)]


def test_nothing_in_range_says_so(usage: Path) -> None:
    result = usage_cmd("--since", "2027-01-01")
    assert result.returncode == 0 and result.stdout == ""
    assert f"no requests recorded in {usage} since 2027-01-01" in result.stderr
    assert rows("--name", "carol") == []


def test_a_missing_folder_means_no_usage_recorded_yet(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = usage_cmd("--usage", str(missing))
    assert result.returncode == 0 and result.stdout == ""
    assert f"no usage recorded yet: {missing} does not exist" in result.stderr
    assert json.loads(usage_cmd("--usage", str(missing), "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "last tuesday"), "argument --since: 'last tuesday' is not a point in time: give a date"),
        (("--until", "2026-02-30"), "argument --until: '2026-02-30' is not a point in time"),
        (("--since", "2026-12-09", "--until", "2026-12-08"), "--since is not before --until"),
        (("--by", "week"), "argument --by: invalid choice: 'week'"),
    ],
)
def test_bad_flags_are_usage_errors(usage: Path, args: tuple[str, ...], message: str) -> None:
    result = usage_cmd(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_that_is_not_a_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = usage_cmd("--usage", str(tmp_path / "file"))
    assert result.returncode == 1 and "is not a folder" in result.stderr


def test_help_explains_when_and_the_columns() -> None:
    text = run_routheon("usage", "--help").stdout
    assert "ROUTHEON_USAGE" in text and "/var/lib/routheon/usage" in text
    assert "2026-12-08T14:30" in " ".join(text.split()) and "today" in text
