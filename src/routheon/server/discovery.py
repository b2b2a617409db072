"""Which backends exist, and what is wrong with the mappings folder, checked at most once per interval.

The folder is checked on demand rather than watched, so there is nothing to miss and
nothing to set up when the folder appears later. A check is a walk of ``stat`` calls (the
folder's signature); only when the signature changed is the folder read again, in one pass of
``routheon.mappings.check``: the same findings ``routheon mapping check`` prints, so there is
one definition of what is wrong with a folder. Traefik's own verdict (``routheon.mappings.verdict``)
is asked in the background whenever the folder's files change, never on a request's time.
Errors are logged when they appear and when they go away, never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from routheon.mappings.check import inspect_folder
from routheon.mappings.folder import WARNING, Finding, Folder, is_mapping_name
from routheon.mappings.verdict import Verdict, VerdictUnavailable, ask_traefik, judged

log = logging.getLogger(__name__)


Stamp = tuple[int, int, int, int]
Signature = tuple[tuple[str, Stamp], ...]


def file_stamp(path: Path) -> Stamp | None:
    """What changes when ``path`` changes (inode, size, modification and change time); None: no such file.

    The change time moves with ``chmod`` too, which changes findings (a key file every user can
    read) without touching the content. A link is followed, as Traefik follows it; a dangling one
    is stamped itself. A file rewritten in place twice within one tick of the kernel's file
    clock (a few ms) to the same size keeps its stamp: Routheon's own writes replace the file
    (a new inode), and a hand edit is no such pair.
    """
    try:
        found = os.stat(path)
    except OSError:  # gone, or a link to nothing or in a loop: the link itself
        try:
            found = os.lstat(path)
        except OSError:
            return None
    return (found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


def folder_signature(path: Path) -> Signature | None:
    """Every folder Traefik walks and every file it reads there, stamped.

    () when there is no folder, None when it cannot be walked (then nothing is known unchanged).

    A folder's stamp changes when an entry is added, removed or renamed in it, and with its
    mode (``check`` warns about a folder others may write to); a file's when it is written to
    or its mode changes. A check is this walk: one ``scandir`` per folder and one ``stat``
    per file, no ``open``. On 1,004 key files about 25 ms, where reading and checking them
    takes 1.5 to 2 s (this machine, two busy cores).
    """
    stamped: list[tuple[str, Stamp]] = []
    failed: list[OSError] = []
    for folder, _, names in os.walk(path, onerror=failed.append):
        entries = [Path(folder)] + [Path(folder, name) for name in sorted(names) if is_mapping_name(name)]
        stamped += ((str(entry), stamp) for entry in entries if (stamp := file_stamp(entry)) is not None)
    if failed:
        return () if isinstance(failed[0], FileNotFoundError) and failed[0].filename == str(path) else None
    return tuple(stamped)


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

    def judge(self, scan: Folder, signature: Signature | None) -> tuple[Folder, VerdictState]:
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

    async def _ask(self, signature: Signature | None) -> None:
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
    """The latest scan of a mappings folder, checked at most every ``max_age`` seconds, read when it changed.

    Reading and checking the files is what costs. With 1,004 key files and 50 requests/s of
    ``/v1/models`` through Traefik (this machine, two cores shared with other work), reading
    them on every check (every 2 s) took routheon-server 23 to 30 % of a core, and the requests
    that waited for it made the p99 0.9 to 1.9 s (five runs); strace counted 2,016 opens of
    unchanged files in 13 s. A check is now a ``stat`` walk (``folder_signature``) and an
    unchanged folder is served from the last scan, the same object, so ``ModelCatalog`` has
    nothing to redo either: 5 to 7 % of a core, p99 14 to 30 ms (4 files: 6 %, 15 to 20 ms),
    and the only ``open`` is the folder's own, one ``scandir`` per check.
    """

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
        self._read: Folder | None = None  # as last read, before Traefik's verdict; None: read it again
        self._read_signature: Signature | None = None
        self._new_verdict = False

    async def current(self) -> Folder:
        """The files to take backends from, and the findings (the same object until the folder is re-read)."""
        if self._scan is not None and self._clock() - self._scanned_at < self._max_age:
            return self._scan
        if self._rescanning is None:
            self._rescanning = asyncio.create_task(self._rescan())
        # shielded: a client hanging up must not cancel the scan other requests wait for
        return await asyncio.shield(self._rescanning)

    def _expire(self) -> None:
        """A new verdict arrived: the next request takes it in (into the folder as read, not read again)."""
        self._new_verdict = True
        self._scanned_at = float("-inf")

    async def _rescan(self) -> Folder:
        try:
            fresh = await self._check()
            self._report_changes(self._scan, fresh)
            self._scan, self._scanned_at = fresh, self._clock()
            return fresh
        finally:
            self._rescanning = None

    async def _check(self) -> Folder:
        """The last scan while the folder's signature holds and no verdict came in; else the folder read again."""
        new_verdict, self._new_verdict = self._new_verdict, False
        try:
            # stamped before reading: a file changed meanwhile changes the next signature
            signature = await asyncio.to_thread(folder_signature, self.path)
            if self._read is None or signature is None or signature != self._read_signature:
                self._read = await asyncio.to_thread(scan_mappings, self.path, self._skip)
                self._read_signature = signature
            elif not new_verdict and self._scan is not None:
                return self._scan
            if self._judge is not None and self._read.exists:
                fresh, self.verdict = self._judge.judge(self._read, signature)
                return fresh
            return self._read
        except OSError as exc:  # e.g. a folder we may not list: report it like a broken file
            self._read = None
            return Folder(self.path, findings=(Finding(self.path, f"cannot list folder: {exc}"),))
        except Exception as exc:  # a scan bug must not take /v1/models and /health down with it
            log.exception("scanning %s failed", self.path)
            self._read = None
            return Folder(self.path, findings=(Finding(self.path, f"cannot scan folder: {exc}"),))

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
