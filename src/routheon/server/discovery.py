"""Which backends exist, and what is wrong with the mappings folder, re-read at most once per interval.

The folder is re-scanned on demand rather than watched, so there is nothing to miss and
nothing to set up when the folder appears later. Each scan is one pass of
``routheon.mappings.check``: the same findings ``routheon mapping check`` prints, so there is
one definition of what is wrong with a folder. Traefik's own verdict (``routheon.mappings.verdict``)
is asked in the background whenever the folder's files change, never on a request's time.
Errors are logged when they appear and when they go away, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from routheon.mappings.check import inspect_folder
from routheon.mappings.folder import WARNING, Finding, Folder, traefik_paths
from routheon.mappings.verdict import Verdict, VerdictUnavailable, ask_traefik, judged

log = logging.getLogger(__name__)


Signature = tuple[tuple[str, int, int, int], ...]


def folder_signature(path: Path) -> Signature:
    """What changes when any file Traefik reads changes (name, inode, size, modification time)."""
    try:
        stats = [(file, os.stat(file)) for file in traefik_paths(path)]
    except OSError:
        return ()
    return tuple((str(file), item.st_ino, item.st_size, item.st_mtime_ns) for file, item in stats)


@dataclass(frozen=True)
class VerdictState:
    """What /health says about Traefik's verdict: off, checking, applied, rejected or unavailable."""

    state: str
    version: str = ""
    reason: str = ""


class TraefikJudge:
    """Traefik's verdict on the folder, asked in the background once per change of its files."""

    def __init__(self, folder: Path, traefik: str, entry_points: tuple[str, ...], on_verdict: Callable[[], None]) -> None:
        self._folder = folder
        self._traefik = traefik
        self._entry_points = entry_points
        self._on_verdict = on_verdict
        self._judged: Signature | None = None
        self._answer: Verdict | VerdictUnavailable | None = None
        self._asking: asyncio.Task[None] | None = None

    def judge(self, scan: Folder, signature: Signature) -> tuple[Folder, VerdictState]:
        """``scan`` with the verdict on exactly these files in it, or 'checking' while Traefik is asked."""
        if signature != self._judged or self._answer is None:
            if self._asking is None:
                self._asking = asyncio.create_task(self._ask(signature))
            return scan, VerdictState("checking")
        if isinstance(self._answer, VerdictUnavailable):
            missing = Finding(self._folder, f"Traefik's verdict is missing: {self._answer}", WARNING)
            return Folder(scan.path, scan.files, (*scan.findings, missing), scan.exists), VerdictState(
                "unavailable", reason=str(self._answer)
            )
        verdict = self._answer
        state = VerdictState("applied" if verdict.applied else "rejected", verdict.version, verdict.reason)
        return judged(scan, verdict), state

    async def _ask(self, signature: Signature) -> None:
        try:
            self._answer = await asyncio.to_thread(
                ask_traefik, self._folder, traefik=self._traefik, entry_points=self._entry_points
            )
        except VerdictUnavailable as exc:
            self._answer = exc
        except Exception as exc:  # a verdict bug must not take /health down with it
            log.exception("asking Traefik about %s failed", self._folder)
            self._answer = VerdictUnavailable(f"asking Traefik failed: {exc}")
        finally:
            self._judged, self._asking = signature, None
        self._on_verdict()


def scan_mappings(path: Path, skip: Sequence[re.Pattern[str]]) -> tuple[Folder, Signature]:
    """Check the whole folder, but take backends only from the files ``skip`` does not name.

    ``skip`` (routheon-server.yml at least) is about *backends*: this server must not ask
    itself, or the files someone chose to leave out, for models. Traefik, however, reads every
    file, so a broken routheon-server.yml rejects the whole folder just like any other broken
    file, and it defines the ``routheon-errors`` middleware that key routers reference: checking
    without it would report every such reference as dangling. So findings cover every file.
    """
    signature = folder_signature(path)
    checked = inspect_folder(path)
    usable = tuple(
        mapping for mapping in checked.files if not any(pattern.search(mapping.path.name) for pattern in skip)
    )
    return Folder(checked.path, usable, checked.findings, checked.exists), signature


class FolderWatch:
    """The latest scan of a mappings folder, at most ``max_age`` seconds old when asked for."""

    def __init__(
        self,
        folder: Path,
        skip: Sequence[re.Pattern[str]],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
        traefik: str | None = None,
        entry_points: tuple[str, ...] = (),
    ) -> None:
        self.path = folder
        self.verdict = VerdictState("off")
        self._judge = TraefikJudge(folder, traefik, entry_points, self._expire) if traefik else None
        self._skip = tuple(skip)
        self._max_age = max_age
        self._clock = clock
        self._scan: Folder | None = None
        self._scanned_at = float("-inf")
        self._rescanning: asyncio.Task[Folder] | None = None

    async def current(self) -> Folder:
        """The files to take backends from, and the findings (the same object until the folder is re-read)."""
        if self._scan is not None and self._clock() - self._scanned_at < self._max_age:
            return self._scan
        if self._rescanning is None:
            self._rescanning = asyncio.create_task(self._rescan())
        # shielded: a client hanging up must not cancel the scan other requests wait for
        return await asyncio.shield(self._rescanning)

    def _expire(self) -> None:
        """A new verdict arrived: the next request re-reads the folder and takes it in."""
        self._scanned_at = float("-inf")

    async def _rescan(self) -> Folder:
        try:
            try:
                fresh, signature = await asyncio.to_thread(scan_mappings, self.path, self._skip)
                if self._judge is not None and fresh.exists:
                    fresh, self.verdict = self._judge.judge(fresh, signature)
            except OSError as exc:  # e.g. a folder we may not list: report it like a broken file
                fresh = Folder(self.path, findings=(Finding(self.path, f"cannot list folder: {exc}"),))
            except Exception as exc:  # a scan bug must not take /v1/models and /health down with it
                log.exception("scanning %s failed", self.path)
                fresh = Folder(self.path, findings=(Finding(self.path, f"cannot scan folder: {exc}"),))
            self._report_changes(self._scan, fresh)
            self._scan, self._scanned_at = fresh, self._clock()
            return fresh
        finally:
            self._rescanning = None

    def _report_changes(self, before: Folder | None, after: Folder) -> None:
        if not after.exists and (before is None or before.exists):
            log.warning("mappings folder %s does not exist (yet): no backends until it appears", self.path)
        elif after.exists and before is not None and not before.exists:
            log.info("mappings folder %s appeared", self.path)
        # identified without the line, so an edit above a problem does not report it again
        old = {(p.path, p.message): p for p in before.errors} if before else {}
        new = {(p.path, p.message): p for p in after.errors}
        for identity, problem in new.items():
            if identity not in old:
                log.warning("mapping error: %s", problem)
        for identity, problem in old.items():
            if identity not in new:
                log.info("mapping error gone (fixed, or its file removed): %s", problem)
