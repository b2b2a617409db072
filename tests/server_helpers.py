"""What routheon-server's integration tests share: fake backends, mapping files, the server.

The server runs in the test's own process (``serving``) unless the process is the point
(``running_server``): signals, file limits, the environment, the original 1.0.7.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support import REPO, VENV_BIN

from routheon.loopback import free_port
from routheon.server.__main__ import LOG_FORMAT, listening
from routheon.server.config import parse_args
from routheon.server.stats import StatsConfig, load_stats_config
from routheon.supervisor import Child, eventually, start_child

SERVER_BIN = VENV_BIN / "routheon-server"


def write_mapping(folder: Path, name: str, url: str) -> Path:
    """A mapping file in the seed's format: one key, one service with one URL."""
    stem = name.split(".")[0]
    path = folder / name
    path.write_text(
        "http:\n"
        "  routers:\n"
        f"    {stem}:\n"
        f'      rule: "Header(`Authorization`, `Bearer KEY-{stem}`)"\n'
        f"      service: {stem}\n"
        "      entryPoints: [llama-servers]\n"
        "  services:\n"
        f"    {stem}:\n"
        "      loadBalancer:\n"
        "        servers:\n"
        f'          - url: "{url}"\n'
    )
    return path


def mapping_folder(tmp: Path, urls: dict[str, str]) -> Path:
    """``tmp/mappings`` holding a ``write_mapping`` file for each ``file name: backend URL``."""
    folder = tmp / "mappings"
    folder.mkdir()
    for name, url in urls.items():
        write_mapping(folder, name, url)
    return folder


@dataclass
class Backends:
    """The fake-backend process: ``url("ok/alpha")`` is a backend base URL."""

    port: int

    def url(self, spec: str) -> str:
        return f"http://127.0.0.1:{self.port}/{spec}"


@contextmanager
def running_backends(tmp: Path, port: int | None = None) -> Iterator[Backends]:
    port = port or free_port()
    proc = start_child("backends", [sys.executable, str(REPO / "tests" / "backends.py"), str(port)],
                       tmp / f"backends-{port}.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
        yield Backends(port)
    finally:
        proc.stop()


@dataclass
class InProcess:
    """A routheon-server running in this process: its log lines, formatted as the command writes them."""

    lines: io.StringIO

    def log(self) -> str:
        return self.lines.getvalue()


@dataclass
class Server:
    base: str
    proc: Child | InProcess
    # where /metrics is served (None: not by this server)
    metrics: str | None = None


# Starts the program named by its arguments with the open-files limit given first (a
# wrapper: start_child takes no preexec_fn of the caller's).
_WITH_FILE_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]),) * 2); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


@contextmanager
def running_server(
    tmp: Path,
    args: Sequence[str],
    binary: Path = SERVER_BIN,
    env: Mapping[str, str] | None = None,
    max_files: int | None = None,
) -> Iterator[Server]:
    """Start a routheon-server binary on a free port with ``args``; stop it afterwards.

    ``env`` is added to the environment; ``max_files`` limits the number of open files.
    """
    port = free_port()
    argv = [str(binary), "--host", "127.0.0.1", "--port", str(port), *args]
    metrics = None
    if binary == SERVER_BIN and "--metrics-port" not in args:  # 1.0.7 has no /metrics
        # a free port, not the default 9180 that every server of a parallel run would ask for
        metrics_port = free_port()
        argv += ["--metrics-port", str(metrics_port)]
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    if max_files is not None:
        argv = [sys.executable, "-c", _WITH_FILE_LIMIT, str(max_files), *argv]
    proc = start_child("routheon-server", argv, tmp / f"server-{port}.log", env)
    base = f"http://127.0.0.1:{port}"
    try:
        # the original has no /health; any HTTP answer (a 404 included) means it listens
        proc.wait_http(f"{base}/health", timeout=20, any_status=True)
        yield Server(base, proc, metrics)
    finally:
        proc.stop()


@contextmanager
def _captured_log(level: str) -> Iterator[io.StringIO]:
    """routheon-server's loggers (its own and aiohttp's access log) into a buffer, at ``level``."""
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    loggers = [logging.getLogger("routheon"), logging.getLogger("aiohttp.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
    try:
        yield lines
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(old)


@contextmanager
def serving(args: Sequence[str]) -> Iterator[Server]:
    """routheon-server in this process, on an event loop of its own thread, until the block ends.

    ``/metrics`` is served on a port of its own, whatever ``--metrics-port`` says.

    The same flags, app, connection handler and log lines as the command (``listening`` is
    what ``routheon-server`` runs), without the second it takes to start a process.
    """
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    metrics_sock = socket.create_server(("127.0.0.1", 0))
    metrics = f"http://127.0.0.1:{metrics_sock.getsockname()[1]}/metrics"
    config = parse_args(["--host", "127.0.0.1", "--port", str(port), *args])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="routheon-server", daemon=True)
    stop = asyncio.Event()
    started = threading.Event()

    async def serve(stats_config: StatsConfig | None) -> None:
        async with listening(config, stats_config, sock, metrics_sock):
            started.set()
            await stop.wait()

    with _captured_log(config.log_level) as lines:
        stats_config = load_stats_config(config.stats_config_file) if config.stats_config_file else None
        thread.start()
        running = asyncio.run_coroutine_threadsafe(serve(stats_config), loop)
        try:
            assert eventually(lambda: started.is_set() or running.done(), timeout=20), "the server did not start"
            if running.done():
                running.result()  # raises what stopped it
            yield Server(f"http://127.0.0.1:{port}", InProcess(lines), metrics)
        finally:
            loop.call_soon_threadsafe(stop.set)
            running.result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()
