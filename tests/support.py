"""Shared helpers for tests that talk to real processes on loopback.

Processes themselves are started with ``routheon.supervisor`` (the demo's and the bench's
supervisor too); ports come from ``routheon.loopback``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routheon import cli

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class Reply:
    """An HTTP answer, error statuses included, as a test looks at it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    timeout: float = 30.0,
) -> Reply:
    """One request; ``body`` goes as JSON. HTTP errors are returned, not raised, so tests can look at them."""
    all_headers = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


@dataclass
class CliResult:
    """What a run of the ``routheon`` command left: its exit status and its two outputs."""

    returncode: int
    stdout: str
    stderr: str


def run_command(main: Callable[[Sequence[str]], int | None], *args: str, stdin: str | bytes | None = None) -> CliResult:
    """A command's ``main(ARGS)`` in this process, with ``stdin`` as its standard input.

    A hundred times faster than a process and the same code; not for threads, since it swaps
    the process's standard streams. An exception other than the command's own refusals
    propagates, as a traceback would end the real command.
    """
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    saved_stdin, sys.stdin = sys.stdin, fake_stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args)) or 0
            except SystemExit as exc:  # argparse's --help and usage errors, a command's sys.exit
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdin = saved_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


def run_routheon(*args: str, stdin: str | bytes | None = None) -> CliResult:
    """``routheon ARGS`` in this process."""
    return run_command(cli.main, *args, stdin=stdin)
