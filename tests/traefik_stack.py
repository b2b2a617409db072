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

import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from support import REPO, VENV_BIN, Proc, Reply, eventually, free_port, request, wait_http

STATIC_CONFIG = REPO / "traefik" / "traefik.yml"
SERVER_MAPPING = REPO / "traefik" / "mappings" / "routheon-server.yml"
FAKE_LLAMA = REPO / "tests" / "fake_llama.py"
# Traefik loads local plugins from plugins-local/ in its working directory
PLUGINS = REPO / "traefik" / "plugins-local"
HOP_ENTRY_POINT = "routheon-hop"


@dataclass
class Backend:
    """A fake llama-server process."""

    name: str
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.stop()


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
    server: Proc | None = None
    traefik: Proc | None = None
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
        config = yaml.safe_load(STATIC_CONFIG.read_text())
        config["entryPoints"]["llama-servers"]["address"] = f"127.0.0.1:{self.port}"
        config["entryPoints"][HOP_ENTRY_POINT]["address"] = f"127.0.0.1:{self.hop_port}"
        config["providers"]["file"]["directory"] = str(self.mappings)
        config["providers"]["providersThrottleDuration"] = "200ms"
        config["log"]["level"] = "INFO"
        if self.response_timeout:
            config["serversTransport"]["forwardingTimeouts"] = {"responseHeaderTimeout": self.response_timeout}
        path = self.workdir / "traefik.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def install_server_mapping(self) -> None:
        """The shipped routheon-server.yml, pointed at this stack's routheon-server port."""
        text = SERVER_MAPPING.read_text().replace(
            "http://routheon-server:9080", f"http://127.0.0.1:{self.server_port}"
        )
        (self.mappings / "routheon-server.yml").write_text(text)

    def start(self) -> Stack:
        self.mappings.mkdir(parents=True, exist_ok=True)
        if self.with_server:
            self.install_server_mapping()
            self.server = Proc(
                [
                    str(VENV_BIN / "routheon-server"),
                    "--mappings", str(self.mappings),
                    "--port", str(self.server_port),
                    "--log-level", "INFO",
                ],
                self.workdir / "routheon-server.log",
            )
            wait_http(f"{self.server_url}/health", proc=self.server.popen)
        shutil.copytree(PLUGINS, self.workdir / "plugins-local", dirs_exist_ok=True)
        self.traefik = Proc(
            [str(VENV_BIN / "traefik"), f"--configFile={self._static_config()}"],
            self.workdir / "traefik.log",
            cwd=self.workdir,
        )
        wait_http(self.url, proc=self.traefik.popen)
        if self.with_server:
            self.wait_for(lambda: self.request("/", key="no-such-key").status == 401)
        return self

    def stop(self) -> None:
        for proc in (*(backend.proc for backend in self.backends), self.traefik, self.server):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_backend(self, name: str, chunk_interval: float = 0.2, chunks: int = 5) -> Backend:
        port = free_port()
        proc = Proc(
            [
                sys.executable, str(FAKE_LLAMA),
                "--port", str(port), "--name", name,
                "--chunks", str(chunks), "--chunk-interval", str(chunk_interval),
            ],
            self.workdir / f"backend-{name}-{port}.log",
        )
        backend = Backend(name, port, proc)
        self.backends.append(backend)
        wait_http(f"{backend.url}/health", proc=proc.popen)
        return backend

    def routheon(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``routheon`` command against this stack's mappings folder."""
        argv = [str(VENV_BIN / "routheon"), *args, "--mappings", str(self.mappings)]
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
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

    def backend_of(self, key: str | None, path: str = "/v1/models") -> str | None:
        """Which fake backend answered a request with ``key`` (None when none did)."""
        return self.request(path, key=key).headers.get("X-Backend")

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "routing change") -> None:
        """Like ``eventually``, but a failure says which change never came."""
        if not eventually(condition, timeout, interval=0.1):
            raise TimeoutError(f"{what} did not happen within {timeout}s")
