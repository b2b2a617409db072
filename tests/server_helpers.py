"""What routheon-server's integration tests share: fake backends, mapping files, the server."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support import REPO, VENV_BIN

from routheon.loopback import free_port
from routheon.supervisor import Child, start_child

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
class Server:
    base: str
    proc: Child


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
    if max_files is not None:
        argv = [sys.executable, "-c", _WITH_FILE_LIMIT, str(max_files), *argv]
    proc = start_child("routheon-server", argv, tmp / f"server-{port}.log", env)
    base = f"http://127.0.0.1:{port}"
    try:
        # the original has no /health; any HTTP answer (a 404 included) means it listens
        proc.wait_http(f"{base}/health", timeout=20, any_status=True)
        yield Server(base, proc)
    finally:
        proc.stop()
