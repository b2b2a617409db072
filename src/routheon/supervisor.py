"""Child processes for the demo, the tests and the bench: start, wait until ready, stop.

This is the one place that starts a process with ``subprocess.Popen``, so that every caller
gets the same guarantees:

- each child runs in its own session: the terminal's Ctrl-C reaches only the parent, which
  stops the children itself, and a stop takes the child's own children (a shell's ``sleep``,
  a proxy's workers) with it;
- on Linux a child also gets SIGKILL when its parent dies without cleaning up, so no
  llama-server or Traefik outlives a killed demo or test run (the kernel ties this to the
  thread that started the child: start long-lived children from a thread that outlives them);
- its output goes to a private log file, and a child that exits or never gets ready fails
  the wait at once with the tail of that log instead of a bare timeout;
- a stop is SIGTERM to the process group, a bounded wait, then SIGKILL.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from routheon.probe import http_status

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A child could not start, exited or stayed unready; the message ends with its log tail."""


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel to kill it when its parent dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def eventually(check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``check`` until it holds; whether it did within ``timeout`` seconds.

    Servers, Traefik and the kernel apply changes a moment later; the bound only keeps a
    broken process from hanging the caller. ``check`` may raise to end the wait early.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class Child:
    """One started process and the file its output goes to (``None``: a pipe the caller reads)."""

    name: str
    argv: list[str]
    log_path: Path | None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    @property
    def stdout(self) -> IO[bytes] | None:
        """The output pipe of a child started without a log file."""
        return self.popen.stdout if self.popen else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit by itself; its exit status."""
        assert self.popen is not None
        return self.popen.wait(timeout)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        """Everything the child wrote so far; still readable after it stopped."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 120.0, interval: float = 0.05) -> None:
        """Poll ``ready`` until it holds; fail at once, with the log, when the child exits."""

        def check() -> bool:
            if ready():
                return True
            if not self.running():
                raise StartError(f"{self.name} exited with {self.returncode} before {what}:\n{self.log_tail()}")
            return False

        if not eventually(check, timeout, interval):
            raise StartError(f"{self.name}: no {what} within {timeout:g}s:\n{self.log_tail()}")

    def wait_http(self, url: str, timeout: float = 120.0, any_status: bool = False) -> None:
        """Wait until ``url`` answers 200 (``any_status``: any HTTP answer at all)."""

        def ready() -> bool:
            status = http_status(url)
            return status is not None and (any_status or status == 200)

        self.wait_until(ready, f"{'an answer' if any_status else '200'} from {url}", timeout)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """``sig`` to the process group, then SIGKILL whatever is left after ``timeout``; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.send(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %gs; killing it", self.name, timeout)
                self.send(signal.SIGKILL)
                self.popen.wait()
        log.debug("stopped %s", self.name)
        return self.popen.returncode


def start_child(
    name: str,
    argv: Sequence[str],
    log_path: Path | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    """Start ``argv`` in a session of its own, its output appended to ``log_path`` (mode 0600).

    With ``log_path=None`` the output is a pipe (``Child.stdout``) for callers that read it
    as it comes. Raises StartError, caused by the OSError, when the program cannot be started at all.
    """
    child = Child(name, list(argv), log_path, dict(env or {}), cwd)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # prompts and answers may end up in a log: only the owner reads them
        output: int | IO[bytes] = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    else:
        output = subprocess.PIPE
    try:
        child.popen = subprocess.Popen(
            child.argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **child.env},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
        )
    except OSError as exc:
        raise StartError(f"cannot start {name} ({child.argv[0]}): {exc.strerror or exc}") from exc
    finally:
        if not isinstance(output, int):
            output.close()
    log.debug("started %s (pid %d): %s", name, child.pid, " ".join(child.argv))
    return child


class Supervisor:
    """A set of named children with their logs in one folder; all stopped on exit, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        """Start (or restart) the child called ``name``; its output goes to ``<log_dir>/<name>.log``."""
        previous = self.children.get(name)
        if previous is not None and previous.running():
            raise StartError(f"{name} is already running (pid {previous.pid})")
        child = start_child(name, argv, self.log_dir / f"{name}.log", env, cwd)
        self.children[name] = child
        return child

    def restart(self, name: str) -> Child:
        """Start a stopped child again with the same command line."""
        child = self.children[name]
        return self.start(name, child.argv, child.env, child.cwd)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        child = self.children.get(name)
        if child is not None:
            child.stop(timeout=timeout)

    def stop_all(self) -> None:
        """Stop every child, the most recently started first."""
        for name in reversed(list(self.children)):
            self.stop(name)

    def kill_all(self) -> None:
        """SIGKILL every child's process group now: for a second interrupt during ``stop_all``."""
        for child in self.children.values():
            if child.running():
                child.send(signal.SIGKILL)
