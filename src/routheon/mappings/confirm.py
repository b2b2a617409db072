"""Confirmed writes: a change is judged on the folder as it will be, before anything is written.

A revocation that Traefik never applies is worse than one that fails loudly: when one file
makes Traefik reject the folder, a running Traefik keeps its last good state and the revoked
key keeps routing. So every write command plans its change, has the result judged on a
private copy (Traefik's own verdict when a ``traefik`` binary is there, Routheon's reader
where not), and then:

- writes it when the folder as planned is applied and the files it writes have no errors;
- refuses, writing nothing, when the change itself would break the folder or its routers;
- refuses, writing nothing, when the folder is rejected already (another file is broken),
  unless forced; a forced write still fails the command, as nothing of it takes effect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from routheon.mappings.check import inspect_folder
from routheon.mappings.folder import Finding, Folder
from routheon.mappings.format import ENTRY_POINT
from routheon.mappings.verdict import (
    DEFAULT_TIMEOUT,
    Changes,
    Unreadable,
    VerdictUnavailable,
    ask_traefik,
    copy_folder,
    judged,
    private_workdir,
)

log = logging.getLogger(__name__)


_ENTRY_POINT_HINT = (
    " (the entry points Traefik has are read from --traefik-config, by default /etc/traefik/traefik.yml,"
    " or are llama-servers alone)"
)


class ChangeRefused(Exception):
    """The change was not written: the folder as planned, or as it is, would not be applied."""


@dataclass(frozen=True)
class Judge:
    """Who says whether a folder is applied: Traefik (``traefik`` is its binary) or, without one, Routheon's reader."""

    traefik: str | None
    entry_points: tuple[str, ...] = (ENTRY_POINT,)
    timeout: float = DEFAULT_TIMEOUT
    # Traefik's static file: Routheon's plugin is looked for beside it (verdict.find_plugins)
    static_config: Path | None = None
    # told why Traefik could not judge a change, which Routheon's reader alone then judges
    unjudged: Callable[[str], None] = field(default=lambda reason: log.warning("%s", reason), compare=False)

    def __call__(self, folder: Path, changes: Changes = {}) -> Folder:
        """``folder`` as it would be after ``changes``, with its findings, paths as in ``folder``."""
        with private_workdir("change") as workdir:
            copy = workdir / "mappings"
            copy.mkdir(mode=0o700)
            try:
                copy_folder(folder, copy, changes)
            except Unreadable as exc:
                return Folder(folder, findings=(Finding(folder, str(exc), rejects=True),))
            planned = inspect_folder(copy)
            if self.traefik is not None:
                try:
                    verdict = ask_traefik(
                        copy,
                        traefik=self.traefik,
                        entry_points=self.entry_points,
                        timeout=self.timeout,
                        static_config=self.static_config,
                    )
                except VerdictUnavailable as exc:
                    self.unjudged(f"Traefik's verdict is missing ({exc})")
                else:
                    planned = judged(planned, verdict)
            return _moved(planned, copy, folder)


def _moved(planned: Folder, copy: Path, folder: Path) -> Folder:
    """``planned``'s findings told about ``folder``, where the operator will look, not the private copy."""

    def place(path: Path) -> Path:
        return folder / path.relative_to(copy) if path.is_relative_to(copy) else path

    findings = tuple(
        replace(finding, path=place(finding.path), message=finding.message.replace(str(copy), str(folder)))
        for finding in planned.findings
    )
    return Folder(folder, findings=findings)


def _where(finding: Finding) -> str:
    """A finding as one line that names its file, without the severity (it is an error)."""
    return str(finding).replace(f": {finding.severity}: ", ": ", 1)


def _rejection(folder: Folder) -> Finding | None:
    return next((finding for finding in folder.errors if finding.rejects), None)


@dataclass
class Confirmation:
    """The ``confirm`` callback of the store's write functions; keeps what it learnt for the report.

    ``planned`` is the folder as judged with the change in it (None until asked); ``forced`` is
    True when the change was written into a rejected folder because ``force`` was given.
    """

    folder: Path
    judge: Judge
    force: bool = False
    planned: Folder | None = None
    forced: bool = field(default=False, init=False)

    def __call__(self, changes: Changes) -> None:
        planned = self.planned = self.judge(self.folder, changes)
        broken = [finding for finding in planned.errors if finding.rejects or finding.path in changes]
        if not broken:
            return
        current = self.judge(self.folder)
        already = _rejection(current)
        if already is None:
            raise ChangeRefused(
                "nothing was written: this change would leave "
                + "; ".join(_where(finding) for finding in broken)
                + (_ENTRY_POINT_HINT if any("entryPoint" in finding.message for finding in broken) else "")
            )
        if not self.force:
            raise ChangeRefused(
                f"nothing was written: {_where(already)}. No change takes effect there (a revocation"
                " neither) until that is fixed: fix it first, or pass --force to write anyway"
            )
        self.forced = True

    def problems_elsewhere(self) -> tuple[Finding, ...]:
        """Errors of the planned folder in files the change did not write (they were there before)."""
        if self.planned is None:
            return ()
        return tuple(finding for finding in self.planned.errors if not finding.rejects)
