"""Start and stop the processes a case measures, on free loopback ports.

Process handling is ``routheon.supervisor``'s, as for the demo and the tests: one definition of
how a child is started in its own session, waited for and killed with its children.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import routheon
from routheon.loopback import free_port
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.probe import http_ok
from routheon.supervisor import Child, start_child

from . import env, fakes

PYTHON = sys.executable
_LOG_NUMBERS = itertools.count()


@dataclass
class Stack(contextlib.AbstractContextManager):
    """The processes of one case; all stopped on exit, whatever happened."""

    workdir: Path
    procs: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], ready_url: str | None = None,
              timeout: float = 30.0, env_vars: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
        """Start ``argv`` (in ``cwd``); with ``ready_url``, wait until it answers (any HTTP status)."""
        proc = start_child(name, argv, self.workdir / f"{name}-{next(_LOG_NUMBERS)}.log", env_vars, cwd)
        self.procs.append(proc)
        if ready_url:
            proc.wait_http(ready_url, timeout=timeout, any_status=True)
        return proc

    def __exit__(self, *exc_info: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def fake_backends(stack: Stack, live: int, hang: int = 0) -> tuple[list[str], list[str]]:
    """``live`` answering and ``hang`` silent llama-servers in one helper process; their URLs."""
    live_ports = [free_port() for _ in range(live)]
    hang_ports = [free_port() for _ in range(hang)]
    argv = [PYTHON, "-m", "bench.fakes", "backends",
            "--live", ",".join(map(str, live_ports)), "--hang", ",".join(map(str, hang_ports))]
    proc = stack.start("backends", argv)
    for port in live_ports:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    urls = [f"http://127.0.0.1:{port}" for port in live_ports]
    return urls, [f"http://127.0.0.1:{port}" for port in hang_ports]


def write_mappings(folder: Path, backends: dict[str, str], error_pages: bool = False) -> Path:
    """One mapping file per ``key → url``, written as ``routheon mapping add`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (key, url) in enumerate(backends.items()):
        spec = MappingSpec(service=f"llama-server-{index}", urls=(url,), keys=(key,), error_pages=error_pages)
        (folder / spec.file_name).write_text(render_mapping(spec))
    return folder


def server_argv(kind: str, mappings: Path, port: int) -> list[str]:
    """The command line of routheon-server: this project's or the original from PyPI."""
    flags = ["--mappings", str(mappings), "--host", "127.0.0.1", "--port", str(port)]
    if kind == "original":
        return [str(env.original_server()), *flags]
    return [PYTHON, "-m", "routheon.server", *flags]


def start_server(stack: Stack, kind: str, mappings: Path) -> str:
    """Start a routheon-server and return its base URL once it answers."""
    port = free_port()
    # The original has no /health; any HTTP answer on a path it does not serve means it is up.
    stack.start(kind, server_argv(kind, mappings, port), ready_url=f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}"


def start_instant_backend(stack: Stack) -> str:
    """The C++ stand-in for llama-server (bench/instant_backend.cpp), answering the same bodies
    as the Python fakes; its base URL."""
    port = free_port()
    chat = stack.workdir / f"instant-chat-{port}.json"
    chat.write_text(json.dumps(fakes.chat_payload()))
    models = stack.workdir / f"instant-models-{port}.json"
    models.write_text(json.dumps(fakes.models_payload(port)))
    stack.start("instant-backend", [str(env.instant_backend()), str(port), str(chat), str(models)],
                ready_url=f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}"


def start_floor(stack: Stack, body: bytes, content_type: str) -> str:
    port = free_port()
    body_file = stack.workdir / f"floor-body-{port}"
    body_file.write_bytes(body)
    stack.start("floor", [PYTHON, "-m", "bench.fakes", "floor", "--port", str(port),
                          "--body", str(body_file), "--content-type", content_type],
                ready_url=f"http://127.0.0.1:{port}/")
    return f"http://127.0.0.1:{port}"


def fetch(url: str, timeout: float = 30.0) -> tuple[bytes, str]:
    """Body and content type of one GET (for the floor's bytes and sanity checks)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read(), response.headers.get_content_type()


class RssSampler(contextlib.AbstractContextManager):
    """Peak resident memory of a process tree while a load runs, sampled in the background."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_bytes = 0

    def _sample(self) -> int:
        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def compile_bytecode() -> None:
    """Compile routheon's modules, as ``pip install`` does, before its start-up is timed.

    The original is measured as pip installed it, with its bytecode. This checkout is an
    editable install, and with PYTHONDONTWRITEBYTECODE set (as in this project's shells) every
    start compiled routheon-server's 22 modules from source: 242 ms median from exec to first
    answer against 214 ms with bytecode, side by side (2026-12-08). An installed routheon has
    its bytecode already; compiling is then a no-op.
    """
    package = Path(routheon.__file__).resolve().parent
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(package)], check=True)


def startup_argv(kind: str, mappings: Path, port: int, floor_body: Path) -> tuple[list[str], str]:
    """How to start ``kind`` and the path of its first answer: ``/health`` for this project and
    the floor (a bare aiohttp app, the least an aiohttp server takes), ``/v1/models`` for the
    original, which has no ``/health``."""
    if kind == "floor":
        return [PYTHON, "-m", "bench.fakes", "floor", "--port", str(port), "--body", str(floor_body)], "/health"
    return server_argv(kind, mappings, port), "/v1/models" if kind == "original" else "/health"


def startup_seconds(kinds: Sequence[str], mappings: Path, workdir: Path, runs: int) -> dict[str, dict]:
    """Exec to first answer of each of ``kinds``, ``runs`` times, the kinds in turns (a noisy
    moment hurts them alike)."""
    floor_body = workdir / "startup-floor-body"
    floor_body.write_text('{"status": "ok"}')
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            port = free_port()
            argv, path = startup_argv(kind, mappings, port, floor_body)
            url = f"http://127.0.0.1:{port}{path}"
            with Stack(workdir) as stack:
                began = time.perf_counter()
                proc = stack.start(kind, argv)
                proc.wait_until(lambda: http_ok(url, timeout=5), f"200 from {url}", timeout=60, interval=0.002)
                samples[kind].append(time.perf_counter() - began)
    return {kind: {"runs": runs, "median_s": round(statistics.median(found), 4), "min_s": round(min(found), 4),
                   "max_s": round(max(found), 4)} for kind, found in samples.items()}
