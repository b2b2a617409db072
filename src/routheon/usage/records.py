"""Reading the plugin's record files safely, each from where the previous read stopped.

The files are written by another program (Traefik, as its own user) while they are read, so a
reader here must cope with whatever it finds without hanging or crashing:

- only files named ``YYYY-MM-DD.PID.jsonl`` are read, only regular files, never through a
  symbolic link (a link could point a privileged reader at any file of the host);
- only whole lines count: the part after the last newline may still be being written. It is
  read again next time; a reader that reads for good (``final``) reports it as incomplete;
- a line over ``MAX_LINE`` bytes is skipped without being held in memory (a record is about
  400 bytes: model names are capped at 256 characters);
- a line that is not a record (garbage, a truncated line glued to the next one after a crash)
  is skipped and counted, and a record after such a fragment on the same line is recovered;
- names and models are shown to people and Prometheus: characters that are not printable
  become ``?``, the key hint is cut to its last characters. The key's hash is never kept.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from routheon.mappings.grants import key_hint
from routheon.usage.when import TimeRange

FILE_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})\.\d+\.jsonl")
MAX_LINE = 64 * 1024
_CHUNK = 1024 * 1024
# Where a record starts: a line holding a fragment and then a whole record is read from here.
_RECORD_START = b'{"time":'
MASK = "\u2026"  # …, before a key's last characters
FAILED_OUTCOMES = frozenset(("error", "refused"))
# json.loads(bytes) first guesses the encoding: the plugin writes UTF-8, decoded here once
_DECODE = json.JSONDecoder().decode


class Record(NamedTuple):
    """One request of a known key, as the plugin recorded it (without the key's hash).

    A tuple: a month of records is read in seconds, and a frozen dataclass takes twice as long
    to build as this.
    """

    time: datetime
    hint: str
    name: str
    model: str
    code: int
    prompt_tokens: int | None
    completion_tokens: int | None
    outcome: str

    @property
    def who(self) -> str:
        """The key's name, or its masked last characters when it has none."""
        return self.name or MASK + self.hint

    @property
    def failed(self) -> bool:
        """An error status from the backend or Traefik, or the plugin's own refusal."""
        return self.code >= 400 or self.outcome in FAILED_OUTCOMES

    @property
    def usage_known(self) -> bool:
        return self.prompt_tokens is not None and self.completion_tokens is not None


def _shown(value: str) -> str:
    return value if value.isprintable() else "".join(char if char.isprintable() else "?" for char in value)


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name, "")
    return _shown(value) if type(value) is str else None


# a key's hint is checked once, not once per record (a folder holds few keys, many records)
_hint = lru_cache(maxsize=4096)(key_hint)


def _tokens(fields: dict[str, Any], name: str) -> int | None | bool:
    """A token count, None for unknown, or False when the field is not a count at all."""
    value = fields.get(name)
    if value is None:
        return None
    return value if type(value) is int and value >= 0 else False


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        # Python 3.10's fromisoformat does not take "Z"
        moment = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment if moment.tzinfo is timezone.utc else moment.astimezone(timezone.utc)


def parse_record(line: bytes) -> Record | None:
    """The record on one line, or None when the line is not one."""
    try:
        fields = _DECODE(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(fields, dict):
        return None
    moment = _time(fields.get("time"))
    code = fields.get("code")
    hint, name, model, outcome = _text(fields, "hint"), _text(fields, "name"), _text(fields, "model"), _text(fields, "outcome")
    prompt, completion = _tokens(fields, "prompt_tokens"), _tokens(fields, "completion_tokens")
    if (
        moment is None
        or type(code) is not int
        or not 0 <= code <= 999
        or hint is None
        or name is None
        or model is None
        or outcome is None
        or prompt is False
        or completion is False
    ):
        return None
    return Record(moment, _hint(hint) if hint else "?", name, model, code, prompt, completion, outcome)


@dataclass
class Skipped:
    """Lines of one file that were not counted, and why."""

    garbage: int = 0
    too_long: int = 0
    incomplete: int = 0

    def __bool__(self) -> bool:
        return bool(self.garbage or self.too_long or self.incomplete)

    def describe(self) -> str:
        parts = []
        if self.garbage:
            parts.append(f"{self.garbage} line(s) that are not usage records")
        if self.too_long:
            parts.append(f"{self.too_long} line(s) over {MAX_LINE} bytes")
        if self.incomplete:
            parts.append("an incomplete last line (still being written, or cut off)")
        return "skipped " + ", ".join(parts)


@dataclass
class _FileState:
    inode: int
    offset: int = 0
    size: int = 0  # at the last read: a file of the same inode and size is not opened again
    skipping: bool = False  # inside a line over MAX_LINE: drop what comes up to its newline


@dataclass
class RecordReader:
    """The record files of one folder, each read on from where the previous ``records`` stopped.

    ``skipped`` and ``problems`` (files that cannot be read, and why) add up over calls, per
    file name; ``new_problems`` are those found by the last call, for a caller that logs them once.
    """

    folder: Path
    skipped: dict[str, Skipped] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    new_problems: dict[str, str] = field(default_factory=dict)
    _files: dict[str, _FileState] = field(default_factory=dict, init=False, repr=False)

    def records(self, span: TimeRange | None = None, *, final: bool = False) -> Iterator[Record]:
        """Every record not read before, of the files whose day ``span`` may hold.

        A folder that does not exist has no records; one that cannot be listed raises OSError.
        ``final``: nothing more is coming, so a last line without its newline is reported.
        """
        self.new_problems = {}
        if not self.folder.is_dir():
            self._files.clear()
            return
        listed = dict(self._listed(span))
        for gone in self._files.keys() - listed.keys():
            del self._files[gone]
        for name, (inode, size) in sorted(listed.items()):
            state = self._files.get(name)
            if state is None or (state.inode, state.size) != (inode, size):
                yield from self._read(name, final)

    def _listed(self, span: TimeRange | None) -> Iterator[tuple[str, tuple[int, int]]]:
        """The record files' names, with their inode and size (from lstat: no file is opened)."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                match = FILE_NAME.fullmatch(entry.name)
                if match is None:
                    continue
                if not entry.is_file(follow_symlinks=False):
                    self._problem(entry.name, "not a regular file (links are not followed)")
                    continue
                try:
                    day = date.fromisoformat(match[1])
                except ValueError:
                    day = None  # a name that is no date: read it, its records say when they are
                if span is None or day is None or span.may_hold(day):
                    try:
                        status = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    yield entry.name, (status.st_ino, status.st_size)

    def _problem(self, name: str, why: str) -> None:
        if self.problems.get(name) != why:
            self.new_problems[name] = why
        self.problems[name] = why

    def _read(self, name: str, final: bool) -> Iterator[Record]:
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._problem(name, f"cannot open it: {exc.strerror or exc}")
            return
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                self._problem(name, "not a regular file (links are not followed)")
                return
            self.problems.pop(name, None)
            state = self._files.get(name)
            if state is None or state.inode != status.st_ino or status.st_size < state.offset:
                # new, replaced, or cut shorter: what it holds now has not been counted
                state = self._files[name] = _FileState(status.st_ino)
            state.size = status.st_size
            yield from self._lines(fd, name, state, status.st_size, final)
        finally:
            os.close(fd)

    def _lines(self, fd: int, name: str, state: _FileState, size: int, final: bool) -> Iterator[Record]:
        """The records between ``state.offset`` and ``size`` (what the file held when opened)."""
        skipped = self.skipped.setdefault(name, Skipped())
        while state.offset < size:
            chunk = os.pread(fd, min(_CHUNK, size - state.offset), state.offset)
            if not chunk:
                break  # cut shorter while being read: the next call starts it over
            end = chunk.rfind(b"\n")
            if end < 0:
                if not state.skipping and len(chunk) <= MAX_LINE:
                    break  # the last line is not whole yet
                if not state.skipping:
                    skipped.too_long += 1
                state.skipping = True
                state.offset += len(chunk)
                continue
            lines = chunk[:end].split(b"\n")
            if state.skipping:
                lines[0], state.skipping = b"", False
            state.offset += end + 1
            for line in lines:
                if len(line) > MAX_LINE:
                    skipped.too_long += 1
                elif line.strip():
                    record = parse_record(line)
                    if record is None:
                        skipped.garbage += 1
                        start = line.rfind(_RECORD_START)
                        record = parse_record(line[start:]) if start > 0 else None
                    if record is not None:
                        yield record
        if final and state.offset < size and not state.skipping:
            skipped.incomplete += 1
        if not skipped:
            del self.skipped[name]
