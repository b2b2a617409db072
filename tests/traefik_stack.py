"""A real Routheon stack on loopback for tests: Traefik, routheon-server and fake llama-servers.

Every process listens on a free port and every file lives in a temporary folder; ``Stack``
tears all of it down. Traefik applies mapping changes a moment after they are written, so
tests wait for the routing they expect with ``Stack.wait_for`` instead of sleeping.

    with Stack(tmp_path) as stack:
        backend = stack.start_backend("alpha")
        stack.routheon("mapping", "add", "--service", "alpha", "--url", backend.url, "--key", KEY)
        stack.wait_for(lambda: stack.request("/v1/models", key=KEY).status == 200)
"""

from __future__ import annotations

import http.client
import signal
import sys
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routheon.loopback import SERVER_MAPPING as SERVER_MAPPING_NAME
from routheon.loopback import (
    LoopbackTraefik,
    free_port,
    install_plugins,
    install_server_mapping,
    shipped_static_config,
    traefik_dir,
)
from routheon.mappings.format import ENTRY_POINT
from routheon.mappings.grants import HOP_ENTRY_POINT
from routheon.supervisor import Child, eventually, start_child
from support import REPO, VENV_BIN, CliResult, Reply, request, run_routheon

FAKE_LLAMA = REPO / "tests" / "fake_llama.py"
# the shipped file, as tests read it to compare
SERVER_MAPPING = traefik_dir() / "mappings" / SERVER_MAPPING_NAME


@dataclass
class Backend:
    """A fake llama-server process."""

    name: str
    port: int
    proc: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Kill it, as a llama-server crashes: no answer in flight is waited for."""
        self.proc.stop(signal.SIGKILL)

    def release(self) -> None:
        """Let a held stream (``"hold": true``) send the rest of its chunks."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/release", method="POST"), timeout=10).close()


@dataclass
class Stack:
    """Traefik on a free port watching ``workdir/mappings``, optionally with routheon-server.

    ``response_timeout`` bounds how long Traefik waits for a backend's response headers.
    """

    workdir: Path
    with_server: bool = True
    response_timeout: str | None = None
    port: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    hop_port: int = field(default_factory=free_port)
    server: Child | None = None
    traefik: Child | None = None
    backends: list[Backend] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def mappings(self) -> Path:
        return self.workdir / "mappings"

    def _static_config(self) -> Path:
        """The shipped traefik.yml, moved to a free loopback port and this stack's folder."""
        static = shipped_static_config()
        if self.response_timeout:
            timeouts = {"responseHeaderTimeout": self.response_timeout}
            static.setdefault("serversTransport", {})["forwardingTimeouts"] = timeouts
        ports = {ENTRY_POINT: self.port, HOP_ENTRY_POINT: self.hop_port}
        loopback = LoopbackTraefik(self.mappings, ports, log_level="INFO", throttle="200ms")
        return loopback.write(self.workdir / "traefik.yml", static)

    def install_server_mapping(self) -> None:
        """The shipped routheon-server.yml, pointed at this stack's routheon-server port."""
        install_server_mapping(self.mappings, self.server_port)

    def start(self) -> Stack:
        self.mappings.mkdir(parents=True, exist_ok=True)
        if self.with_server:
            self.install_server_mapping()
            self.server = start_child(
                "routheon-server",
                [
                    str(VENV_BIN / "routheon-server"),
                    "--mappings", str(self.mappings),
                    "--port", str(self.server_port),
                    "--log-level", "INFO",
                ],
                self.workdir / "routheon-server.log",
            )
        install_plugins(self.workdir)
        self.traefik = start_child(
            "traefik",
            [str(VENV_BIN / "traefik"), f"--configFile={self._static_config()}"],
            self.workdir / "traefik.log",
            cwd=self.workdir,  # where Traefik looks for plugins-local/
        )
        # both start at once; each fails the wait with its own log if it exits
        if self.server is not None:
            self.server.wait_http(f"{self.server_url}/health", timeout=20)
        self.traefik.wait_http(self.url, timeout=20, any_status=True)
        if self.with_server:
            self.wait_for(lambda: self.request("/", key="no-such-key").status == 401)
        return self

    def stop(self) -> None:
        for backend in self.backends:
            backend.stop()
        if self.traefik is not None:
            # no test looks at Traefik's graceful stop, which waits up to 10 s for open connections
            self.traefik.stop(signal.SIGKILL)
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_backend(
        self, name: str, chunk_interval: float = 0.2, chunks: int = 5, close_after_stream: bool = False
    ) -> Backend:
        """A fake llama-server; ``close_after_stream``: it closes connections after streams, as llama-server does."""
        port = free_port()
        proc = start_child(
            f"backend-{name}",
            [
                sys.executable, str(FAKE_LLAMA),
                "--port", str(port), "--name", name,
                "--chunks", str(chunks), "--chunk-interval", str(chunk_interval),
                *(["--close-after-stream"] if close_after_stream else []),
            ],
            self.workdir / f"backend-{name}-{port}.log",
        )
        backend = Backend(name, port, proc)
        self.backends.append(backend)
        proc.wait_http(f"{backend.url}/health", timeout=20)
        return backend

    def routheon(self, *args: str, stdin: str | None = None, check: bool = True) -> CliResult:
        """Run the ``routheon`` command (in this process) against this stack's mappings folder."""
        result = run_routheon(*args, "--mappings", str(self.mappings), stdin=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"routheon {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def request(
        self,
        path: str,
        *,
        key: str | None = None,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """One request through Traefik, sent with ``key`` as the bearer token."""
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return request(self.url + path, method=method, headers=all_headers, body=body, timeout=timeout)

    def send(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> Reply:
        """One request with exactly these headers, repeated ones included, and these bytes."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.putrequest(method, path)
            for name, value in [("Content-Length", str(len(body))), *headers]:
                connection.putheader(name, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            return Reply(answer.status, dict(answer.getheaders()), answer.read())
        finally:
            connection.close()

    def backend_of(self, key: str | None, path: str = "/v1/models") -> str | None:
        """Which fake backend answered a request with ``key`` (None when none did)."""
        return self.request(path, key=key).headers.get("X-Backend")

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "routing change") -> None:
        """Like ``eventually``, but a failure says which change never came."""
        if not eventually(condition, timeout, interval=0.1):
            raise TimeoutError(f"{what} did not happen within {timeout}s")
