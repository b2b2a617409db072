"""Starting the demo's processes and taking every one of them down again.

Each child runs in its own session, so the terminal's Ctrl-C reaches only the demo, which
then stops the children in reverse order; on Linux a child also gets SIGKILL if the demo
itself dies without cleaning up, so no llama-server or Traefik outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A child exited or stayed unhealthy; the message ends with the tail of its log."""


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel to kill it when the demo dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Child:
    """One supervised process and the log file its output goes to."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Owns the demo's children: start, wait until healthy, stop one, stop all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Start (or restart) the child called ``name``; its output goes to ``<log_dir>/<name>.log``."""
        previous = self.children.get(name)
        if previous is not None and previous.running():
            raise StartError(f"{name} is already running (pid {previous.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        child = Child(name, list(argv), self.log_dir / f"{name}.log", dict(env or {}))
        # prompts and answers may end up in a log: only the owner reads them
        descriptor = os.open(child.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "ab") as log_file:
            try:
                child.popen = subprocess.Popen(
                    child.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **child.env},
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
                )
            except OSError as exc:
                raise StartError(f"cannot start {name} ({child.argv[0]}): {exc.strerror}") from None
        self.children[name] = child
        log.debug("started %s (pid %d): %s", name, child.pid, " ".join(child.argv))
        return child

    def restart(self, name: str) -> Child:
        """Start a stopped child again with the same command line."""
        child = self.children[name]
        return self.start(name, child.argv, child.env)

    def wait_until(self, child: Child, ready: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Poll ``ready`` until it holds; fail early, with the log, if the child exits."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not child.running():
                code = child.popen.returncode if child.popen else None
                raise StartError(f"{child.name} exited with {code} before {what}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{child.name}: no {what} within {timeout:.0f}s:\n{child.log_tail()}")
            time.sleep(0.1)

    def wait_http(self, child: Child, url: str, timeout: float = 120.0) -> None:
        self.wait_until(child, lambda: http_ok(url), f"200 from {url}", timeout)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM the child's process group, then SIGKILL whatever is left after ``timeout``."""
        child = self.children.get(name)
        if child is None or child.popen is None:
            return
        if child.popen.poll() is None:
            self._signal_group(child, signal.SIGTERM)
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", name, timeout)
                self._signal_group(child, signal.SIGKILL)
                child.popen.wait()
        log.debug("stopped %s", name)

    def stop_all(self) -> None:
        """Stop every child, the most recently started first."""
        for name in reversed(list(self.children)):
            self.stop(name)

    @staticmethod
    def _signal_group(child: Child, sig: signal.Signals) -> None:
        assert child.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, sig)
