"""Which backends exist: the mappings folder, re-read at most once per interval.

The folder is re-scanned on demand rather than watched, so there is nothing to miss and
nothing to set up when the folder appears later. Broken files are reported when they
become broken and when they are fixed, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from routheon.mappings import Folder, MappingProblem, scan_folder

log = logging.getLogger(__name__)


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
        self._folder: Folder | None = None
        self._scanned_at = float("-inf")
        self._scan: asyncio.Task[Folder] | None = None

    async def current(self) -> Folder:
        if self._folder is not None and self._clock() - self._scanned_at < self._max_age:
            return self._folder
        if self._scan is None:
            self._scan = asyncio.create_task(self._rescan())
        # shielded: a client hanging up must not cancel the scan other requests wait for
        return await asyncio.shield(self._scan)

    async def _rescan(self) -> Folder:
        try:
            try:
                folder = await asyncio.to_thread(scan_folder, self.path, self._skip)
            except OSError as exc:  # e.g. a folder we may not list: report it like a broken file
                folder = Folder(self.path, problems=(MappingProblem(self.path, f"cannot list folder: {exc}"),))
            self._report_changes(self._folder, folder)
            self._folder, self._scanned_at = folder, self._clock()
            return folder
        finally:
            self._scan = None

    def _report_changes(self, before: Folder | None, after: Folder) -> None:
        if not after.exists and (before is None or before.exists):
            log.warning("mappings folder %s does not exist (yet): no backends until it appears", self.path)
        elif after.exists and before is not None and not before.exists:
            log.info("mappings folder %s appeared", self.path)
        old = {(p.path.name, p.message) for p in before.problems} if before else set()
        new = {(p.path.name, p.message) for p in after.problems}
        for problem in after.problems:
            if (problem.path.name, problem.message) not in old:
                log.warning("cannot use %s (skipped until fixed)", problem)
        for name in sorted({name for name, _ in old} - {name for name, _ in new}):
            log.info("mapping file %s is no longer broken (or was removed)", name)
