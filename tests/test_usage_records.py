"""routheon.usage: reading the plugin's record files safely, summing them, and --since/--until.

What the readers promise (docs/usage.md): only whole lines count, garbage and cut-off lines are
skipped and counted, links are not followed, nothing but names and masked keys comes out.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from usage_samples import append, line, record, secrets

from routheon.usage.aggregate import Usage, matches
from routheon.usage.records import MAX_LINE, Record, RecordReader, parse_record
from routheon.usage.when import TimeRange, WhenError, parse_when

UTC = timezone.utc
DAY = "2026-12-08.4242.jsonl"


def read_all(folder: Path, span: TimeRange | None = None, final: bool = True) -> tuple[list[Record], RecordReader]:
    reader = RecordReader(folder)
    return list(reader.records(span, final=final)), reader


# --- parsing one line ---------------------------------------------------------------------------


def test_a_record_keeps_what_the_readers_show_and_not_the_keys_hash() -> None:
    parsed = parse_record(line(record("alice", prompt=12, completion=34)))
    assert parsed == Record(
        datetime(2026, 12, 8, 10, tzinfo=UTC), "abcd", "alice", "m1", 200, 12, 34, "ok"
    )
    assert not any(secret in repr(parsed) for secret in secrets())
    assert parse_record(line(record(""))).who == "\u2026qrst"  # unnamed: masked last characters


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"garbage",
        b"[1, 2]",
        b'{"time": "2026-12-08T10:00:00Z"}',  # fields missing
        line({**record(), "code": "200"}).strip(),
        line({**record(), "code": True}).strip(),
        line({**record(), "prompt_tokens": -1}).strip(),
        line({**record(), "prompt_tokens": 1.5}).strip(),
        line({**record(), "time": "yesterday"}).strip(),
        line({**record(), "time": "2026-12-08T10:00:00"}).strip(),  # no zone: not what the plugin writes
        line({**record(), "name": 7}).strip(),
        b"[" * 100_000,  # deep nesting: no RecursionError escapes
    ],
)
def test_what_is_not_a_record_is_none(text: bytes) -> None:
    assert parse_record(text) is None


def test_unknown_tokens_stay_unknown_and_offsets_are_honoured() -> None:
    parsed = parse_record(line({**record(prompt=None, completion=None), "time": "2026-12-08T11:00:00+01:00"}))
    assert parsed is not None
    assert (parsed.prompt_tokens, parsed.completion_tokens, parsed.usage_known) == (None, None, False)
    assert parsed.time == datetime(2026, 12, 8, 10, tzinfo=UTC)


def test_names_models_and_hints_cannot_carry_terminal_escapes_or_a_whole_key() -> None:
    fields = {**record(), "name": "ev\x1b[2Jil", "model": "m\x07", "hint": "sk-the-whole-key-XYZ!"}
    parsed = parse_record(line(fields))
    assert parsed is not None
    assert (parsed.name, parsed.model, parsed.hint) == ("ev?[2Jil", "m?", "XYZ?")


# --- reading files ------------------------------------------------------------------------------


def test_garbage_a_long_line_and_a_cut_off_last_line_are_skipped_and_counted(tmp_path: Path) -> None:
    append(
        tmp_path, DAY,
        record(prompt=1), b"not json at all\n", b'{"time": 1}\n', b"x" * (MAX_LINE + 1) + b"\n",
        b"\n", record(prompt=2), line(record(prompt=3))[:40],
    )
    records, reader = read_all(tmp_path)
    assert [r.prompt_tokens for r in records] == [1, 2]
    skipped = reader.skipped[DAY]
    assert (skipped.garbage, skipped.too_long, skipped.incomplete) == (2, 1, 1)
    assert "2 line(s) that are not usage records" in skipped.describe()


def test_a_line_longer_than_a_read_chunk_is_skipped_without_losing_the_next(tmp_path: Path) -> None:
    append(tmp_path, DAY, record(prompt=1), b"y" * (2 * 1024 * 1024 + 100) + b"\n", record(prompt=2))
    records, reader = read_all(tmp_path)
    assert [r.prompt_tokens for r in records] == [1, 2]
    assert (reader.skipped[DAY].too_long, reader.skipped[DAY].garbage) == (1, 0)  # its end is not a line


def test_a_record_glued_to_a_cut_off_line_is_recovered(tmp_path: Path) -> None:
    """A process killed mid-line, then a new one with the same PID (a container) appends to the file."""
    append(tmp_path, DAY, line(record(prompt=1))[:50], record(prompt=2))
    records, reader = read_all(tmp_path)
    assert [r.prompt_tokens for r in records] == [2]
    assert reader.skipped[DAY].garbage == 1


def test_each_read_goes_on_from_the_last_whole_line(tmp_path: Path) -> None:
    """routheon-server's counters: nothing read twice, a line counted once it is whole."""
    reader = RecordReader(tmp_path)
    assert list(reader.records()) == []  # no folder yet: nothing, no error
    path = append(tmp_path, DAY, record(prompt=1))
    whole = line(record(prompt=2))
    append(tmp_path, DAY, whole[:30])
    assert [r.prompt_tokens for r in reader.records()] == [1]
    assert not reader.skipped  # not final: the half line may still be being written
    append(tmp_path, DAY, whole[30:])
    assert [r.prompt_tokens for r in reader.records()] == [2]
    assert list(reader.records()) == []
    path.unlink()  # replaced by another file of the same name: read from its start
    append(tmp_path, DAY, record(prompt=3))
    assert [r.prompt_tokens for r in reader.records()] == [3]


def test_several_processes_and_days_are_all_read(tmp_path: Path) -> None:
    append(tmp_path, "2026-12-07.10.jsonl", record(time="2026-12-07T23:59:59.999Z", prompt=1))
    append(tmp_path, "2026-12-08.10.jsonl", record(prompt=2))
    append(tmp_path, "2026-12-08.11.jsonl", record(prompt=4))
    append(tmp_path, "notes.txt", b"anything\n")
    append(tmp_path, "2026-12-08.12.jsonl.tmp", record(prompt=100))
    records, reader = read_all(tmp_path)
    assert sorted(r.prompt_tokens for r in records) == [1, 2, 4]
    assert not reader.problems and not reader.skipped
    only_8th = TimeRange(parse_when("2026-12-08"), parse_when("2026-12-08", end=True))
    assert sorted(r.prompt_tokens for r in read_all(tmp_path, only_8th)[0]) == [2, 4]


def test_links_are_not_followed(tmp_path: Path) -> None:
    outside = append(tmp_path / "elsewhere", DAY, record(prompt=99))
    folder = tmp_path / "usage"
    append(folder, "2026-12-08.1.jsonl", record(prompt=1))
    (folder / "2026-12-08.2.jsonl").symlink_to(outside)
    records, reader = read_all(folder)
    assert [r.prompt_tokens for r in records] == [1]
    assert "links are not followed" in reader.problems["2026-12-08.2.jsonl"]


def test_a_fifo_named_like_a_record_file_does_not_hang_the_reader(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / DAY)
    records, reader = read_all(tmp_path)
    assert records == [] and DAY in reader.problems


# --- summing ------------------------------------------------------------------------------------


def test_rows_per_name_and_model_with_errors_and_unknown_usage_apart() -> None:
    usage = Usage()
    for fields in (
        record("alice", prompt=10, completion=20),
        record("alice", prompt=1, completion=2),
        record("alice", model="m2", code=502, prompt=None, completion=None, outcome="error"),
        record("alice", prompt=None, completion=None, outcome="no_usage"),
        record("bob", code=429, prompt=None, completion=None, outcome="refused"),
        record("", prompt=5, completion=0),
    ):
        parsed = parse_record(line(fields))
        assert parsed is not None
        usage.add(parsed)
    rows = {(row.who, row.model): row.json() for row in usage.rows()}
    assert list(rows) == [("alice", "m1"), ("alice", "m2"), ("bob", "m1"), ("\u2026qrst", "m1")]
    assert rows[("alice", "m1")] == {
        "name": "alice", "key": "\u2026abcd", "model": "m1", "requests": 3, "errors": 0,
        "prompt_tokens": 11, "completion_tokens": 22, "unknown_usage": 1,
    }
    assert rows[("alice", "m2")]["errors"] == 1 and rows[("alice", "m2")]["unknown_usage"] == 0
    assert rows[("bob", "m1")]["errors"] == 1
    assert rows[("\u2026qrst", "m1")]["name"] == ""
    assert usage.total.json() == {
        "requests": 6, "errors": 2, "prompt_tokens": 16, "completion_tokens": 22, "unknown_usage": 1,
    }


def test_by_day_splits_rows_at_utc_midnight() -> None:
    usage = Usage(by_day=True)
    for time in ("2026-12-07T23:59:59.999Z", "2026-12-08T00:00:00.000Z", "2026-12-08T00:30:00.000+01:00"):
        parsed = parse_record(line(record(time=time)))
        assert parsed is not None
        usage.add(parsed)
    assert [(str(row.day), row.totals.requests) for row in usage.rows()] == [("2026-12-07", 2), ("2026-12-08", 1)]


def test_name_picks_a_name_or_a_masked_key() -> None:
    alice = parse_record(line(record("alice")))
    assert alice is not None
    assert matches(alice, "alice") and matches(alice, "\u2026abcd") and matches(alice, "...abcd")
    assert not matches(alice, "abcd") and not matches(alice, "bob") and not matches(alice, "\u2026abc")


# --- --since / --until --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2026-12-08", False, datetime(2026, 12, 8, tzinfo=UTC)),
        ("2026-12-08", True, datetime(2026, 12, 9, tzinfo=UTC)),  # a date covers its day
        ("2026-12-31", True, datetime(2027, 1, 1, tzinfo=UTC)),
        ("2026-12-08T14:30", True, datetime(2026, 12, 8, 14, 30, tzinfo=UTC)),  # UTC without an offset
        ("2026-12-08 14:30:15.25", False, datetime(2026, 12, 8, 14, 30, 15, 250000, tzinfo=UTC)),
        ("2026-12-08T14:30Z", False, datetime(2026, 12, 8, 14, 30, tzinfo=UTC)),
        ("2026-12-08T14:30+01:00", False, datetime(2026, 12, 8, 13, 30, tzinfo=UTC)),
        ("2026-12-08T00:30-0230", False, datetime(2026, 12, 8, 3, 0, tzinfo=UTC)),
    ],
)
def test_when_is_an_iso_8601_date_or_time(text: str, end: bool, expected: datetime) -> None:
    assert parse_when(text, end=end) == expected


def test_today_is_the_utc_day() -> None:
    late = datetime(2026, 12, 8, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # already the 9th in UTC
    assert parse_when("today", now=late) == datetime(2026, 12, 9, tzinfo=UTC)
    assert parse_when("Today", end=True, now=late) == datetime(2026, 12, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-12", "2026-13-01", "2026-02-30", "2026-12-08T25:00", "12/08/2026",
             "2026-12-08T10:00+25:00", "2026-12-08 garbage", "1765000000"],
)
def test_anything_else_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(WhenError, match="not a point in time|offset"):
        parse_when(text)


def test_ranges_are_half_open_and_know_which_days_they_may_hold() -> None:
    span = TimeRange(parse_when("2026-12-08T12:00"), parse_when("2026-12-09", end=True))
    assert span.contains(datetime(2026, 12, 8, 12, tzinfo=UTC))
    assert not span.contains(datetime(2026, 12, 10, tzinfo=UTC))
    assert [span.may_hold(datetime(2026, 12, day).date()) for day in (7, 8, 9, 10)] == [False, True, True, False]
    assert TimeRange(parse_when("2026-12-09"), parse_when("2026-12-08", end=True)).empty
    assert not TimeRange(parse_when("2026-12-08"), parse_when("2026-12-08", end=True)).empty


def test_a_file_that_did_not_change_is_not_opened_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """routheon-server looks at a year of files every second it is scraped: only grown ones are read."""
    append(tmp_path, "2026-12-07.1.jsonl", record(prompt=1))
    grows = append(tmp_path, DAY, record(prompt=2))
    reader = RecordReader(tmp_path)
    assert len(list(reader.records())) == 2
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *args: opened.append(Path(path).name) or real_open(path, *args))
    append(tmp_path, DAY, record(prompt=3))
    assert [r.prompt_tokens for r in reader.records()] == [3]
    assert opened == [grows.name]
