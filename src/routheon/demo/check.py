"""Proving a llama-server before the demo or the tests rely on it: load a model, make a token.

A llama-server can build, start and still die on its first matrix product: the one built with
``-march=native`` on an Intel CPU with AMX was killed by SIGSEGV while loading its model
(llama.cpp issue #20824), and the demo reported it only as "llama-server-1 exited with -11",
after the build and the downloads, and every llama test failed alike. The check runs the binary
once on the smallest demo model, asks for one token, and says in one message which binary
failed, how it ended and what its log said last. Its verdict is kept per binary (path, size,
modification time) under the cache folder, so the check costs its seconds once per binary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from routheon.demo import cache_root
from routheon.loopback import LOOPBACK, free_port
from routheon.mappings.store import write_atomic
from routheon.probe import post_json
from routheon.supervisor import Child, StartError, eventually, start_child

log = logging.getLogger(__name__)

# Loading SmolLM2-135M and making one token took 0.7 to 0.8 s on 2 quiet cores, 3.8 s with the
# model not yet in the page cache, 1.7 to 6.6 s with both cores busy: the bound only keeps a
# binary that hangs from holding up the demo, with room for a loaded machine.
CHECK_TIMEOUT = 30.0
# a crash during the token request: how long the dying process may take to be reaped
_DYING = 5.0
WHAT = "load {model} and generate one token"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: passed, or how it failed (with the log's last lines)."""

    ok: bool
    binary: str
    size: int
    mtime_ns: int
    seconds: float
    failure: str = ""

    def matches(self, binary: Path) -> bool:
        """Whether this verdict is about ``binary`` as it is now (not rebuilt or replaced since)."""
        try:
            stat = binary.stat()
        except OSError:
            return False
        return (self.binary, self.size, self.mtime_ns) == (str(binary.resolve()), stat.st_size, stat.st_mtime_ns)


def checks_dir() -> Path:
    """Where verdicts and the log of each binary's last check are kept."""
    return cache_root() / "checks"


def _record(binary: Path) -> Path:
    name = hashlib.sha256(str(binary.resolve()).encode()).hexdigest()[:16]
    return checks_dir() / f"{name}.json"


def log_path(binary: Path) -> Path:
    """The output of ``binary``'s last check."""
    return _record(binary).with_suffix(".log")


def cached_verdict(binary: Path) -> Verdict | None:
    """The verdict of an earlier check of this very file, if there is one."""
    try:
        verdict = Verdict(**json.loads(_record(binary).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.matches(binary) else None


def _ending(child: Child, timeout: float) -> str:
    """How the child ended, in words: a signal by its name, else the exit code."""
    code = child.returncode
    if code is None:
        return f"did not answer within {timeout:g} s and was stopped"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _failure(child: Child, url: str, timeout: float) -> str | None:
    """Why the started child does not pass, or None when it made a token."""
    deadline = time.monotonic() + timeout
    try:
        child.wait_http(f"{url}/health", timeout)
    except StartError:
        return _ending(child, timeout)
    remaining = max(deadline - time.monotonic(), 0.1)
    status, body = post_json(f"{url}/completion", {"prompt": "Hello", "n_predict": 1}, remaining)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("content"), str):
        return None
    eventually(lambda: not child.running(), _DYING)  # a crash while answering: let it be reaped
    if status is None or not child.running():
        return _ending(child, timeout)
    return f"answered POST /completion with HTTP {status} and no generated text"


def run_check(binary: Path, model: Path, timeout: float = CHECK_TIMEOUT) -> Verdict:
    """Start ``binary`` on a free loopback port with ``model``, ask for one token, stop it."""
    stat = binary.stat()
    output = log_path(binary)
    output.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    output.unlink(missing_ok=True)
    port = free_port()
    argv = [
        str(binary),
        "--model", str(model),
        "--host", LOOPBACK,
        "--port", str(port),
        "--ctx-size", "512",
        "--n-predict", "1",
        "--parallel", "1",
        # no --threads: llama.cpp's default uses every core, the threads the tests' servers use
    ]
    log.info("Checking %s (%s) ...", binary, WHAT.format(model=model.name))
    started = time.monotonic()
    try:
        child = start_child("llama-server check", argv, output)
    except StartError as exc:
        failure: str | None = f"could not be started: {exc.__cause__ or exc}"
    else:
        try:
            failure = _failure(child, f"http://{LOOPBACK}:{port}", timeout)
        finally:
            child.stop(timeout=5.0)
    seconds = round(time.monotonic() - started, 2)
    verdict = Verdict(failure is None, str(binary.resolve()), stat.st_size, stat.st_mtime_ns, seconds, failure or "")
    write_atomic(_record(binary), json.dumps(asdict(verdict), indent=1).encode())
    if verdict.ok:
        log.info("%s passed its check in %.1f s", binary, seconds)
    return verdict


def check(binary: Path, model: Path, timeout: float = CHECK_TIMEOUT) -> Verdict:
    """The cached verdict for ``binary`` as it is now, else a fresh check."""
    return cached_verdict(binary) or run_check(binary, model, timeout)


def describe(verdict: Verdict, model: Path, lines: int = 15) -> str:
    """One message for a failed check: the binary, how it ended, the end of its log."""
    binary = Path(verdict.binary)
    try:
        tail = "\n".join(log_path(binary).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        tail = "(no log)"
    return (
        f"llama-server {binary} failed its check ({WHAT.format(model=model.name)}): it {verdict.failure}.\n"
        f"The last lines of its log ({log_path(binary)}):\n{tail}\n"
        f"(The verdict is kept until the binary changes; remove {_record(binary)} to check it again.)"
    )
