"""Which backends exist, and what is wrong with the mappings folder, re-read at most once per interval.

The folder is re-scanned on demand rather than watched, so there is nothing to miss and
nothing to set up when the folder appears later. Each scan is one pass of
``routheon.mappings.check``: the same findings ``routheon mapping check`` prints, so there is
one definition of what is wrong with a folder. Errors are logged when they appear and when
they go away, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from routheon.mappings.check import inspect_folder
from routheon.mappings.folder import Finding, Folder

log = logging.getLogger(__name__)


def scan_mappings(path: Path, skip: Sequence[re.Pattern[str]]) -> Folder:
    """Check the whole folder, but take backends only from the files ``skip`` does not name.

    ``skip`` (routheon-server.yml at least) is about *backends*: this server must not ask
    itself, or the files someone chose to leave out, for models. Traefik, however, reads every
    file, so a broken routheon-server.yml rejects the whole folder just like any other broken
    file, and it defines the ``routheon-errors`` middleware that key routers reference: checking
    without it would report every such reference as dangling. So findings cover every file.
    """
    checked = inspect_folder(path)
    usable = tuple(
        mapping for mapping in checked.files if not any(pattern.search(mapping.path.name) for pattern in skip)
    )
    return Folder(checked.path, usable, checked.findings, checked.exists)


class FolderWatch:
    """The latest scan of a mappings folder, at most ``max_age`` seconds old when asked for."""

    def __init__(
        self,
        folder: Path,
        skip: Sequence[re.Pattern[str]],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = folder
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

    async def _rescan(self) -> Folder:
        try:
            try:
                fresh = await asyncio.to_thread(scan_mappings, self.path, self._skip)
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
