"""The demo stack: llama-servers, their mappings, routheon-server and Traefik on loopback.

It is wired the way an operator would wire it: mappings are written by the ``routheon``
command, Traefik's static configuration is the shipped ``traefik.yml`` with only the listen
address and the mappings folder changed (``routheon.loopback``), and routheon-server gets the
same flags the seed documents. The end-to-end tests drive this very class.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from routheon.loopback import (
    LOOPBACK,
    SERVER_MAPPING,
    STATIC_CONFIG,
    LoopbackTraefik,
    install_plugins,
    install_server_mapping,
    port_is_free,
    shipped,
    traefik_dir,
)
from routheon.mappings.format import ENTRY_POINT
from routheon.mappings.grants import HOP_ENTRY_POINT
from routheon.probe import model_ids
from routheon.supervisor import Child, StartError, Supervisor

log = logging.getLogger(__name__)

MARKER = ".routheon-demo"
STATS_CONFIG = "stats-config.yml"


@dataclass(frozen=True)
class Backend:
    """One llama-server: the service name its mapping gets, the key that reaches it, its model."""

    service: str
    key: str
    model: Path
    alias: str
    port: int
    chat_template: str | None = None
    # more names clients may send as "model" for it (the original project's, e.g. TinyLlama_Chat)
    other_names: tuple[str, ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        return (self.alias, *self.other_names)


@dataclass(frozen=True)
class StackConfig:
    """Everything the stack needs; the defaults are the seed's ports."""

    workdir: Path
    llama_server: Path
    backends: tuple[Backend, ...]
    entry_port: int = 8080
    server_port: int = 9080
    # Traefik's second, loopback-only entry point for keys granted several models
    hop_port: int = 8081
    # a key granted every backend: the request's "model" picks the llama-server
    shared_key: str | None = None
    context: int = 2048
    n_predict: int = 256
    threads: int = 1
    stats_config: Path = field(default_factory=lambda: shipped(STATS_CONFIG))
    startup_timeout: float = 120.0

    @property
    def mappings(self) -> Path:
        return self.workdir / "mappings"

    @property
    def usage(self) -> Path:
        """Where the demo's Traefik writes a usage record per request of a granted key."""
        return self.workdir / "usage"

    @property
    def entry_url(self) -> str:
        return f"http://{LOOPBACK}:{self.entry_port}"


def check_entry_port(port: int) -> None:
    """Fail with advice, before anything starts, when Traefik could not listen on ``port``."""
    if not port_is_free(port):
        raise StartError(
            f"port {port} on {LOOPBACK} is already in use: stop what listens there "
            "(another demo or Traefik?) or pick another port with --port"
        )


def tool(name: str) -> str:
    """A console script of this environment (routheon, routheon-server, traefik), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StartError(f"{name} is not installed; run `make install` (or pip install -e '.[test]')")
    return found


class Stack:
    """Start, inspect and stop the demo's processes through one Supervisor."""

    def __init__(self, config: StackConfig, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor

    # -- llama-servers -------------------------------------------------------------------

    def backend(self, service: str) -> Backend:
        for backend in self.config.backends:
            if backend.service == service:
                return backend
        raise KeyError(service)

    def llama_argv(self, backend: Backend) -> list[str]:
        cfg = self.config
        template = ["--chat-template", backend.chat_template] if backend.chat_template else []
        return [
            str(cfg.llama_server),
            "--model", str(backend.model),
            "--alias", backend.alias,
            "--host", LOOPBACK,
            "--port", str(backend.port),
            "--ctx-size", str(cfg.context),
            "--n-predict", str(cfg.n_predict),
            "--threads", str(cfg.threads),
            "--parallel", "1",
            *template,
        ]

    def start_backend(self, service: str) -> Child:
        """Start one llama-server and wait until it has loaded its model.

        When Traefik already runs, also wait until its health check lets the key through
        again, so that "started" means a client can use it.
        """
        backend = self.backend(service)
        if not port_is_free(backend.port):
            raise StartError(f"{service}: port {backend.port} is already in use")
        child = self.supervisor.start(service, self.llama_argv(backend))
        child.wait_http(f"http://{LOOPBACK}:{backend.port}/health", self.config.startup_timeout)
        traefik = self.supervisor.children.get("traefik")
        if traefik is not None and traefik.running():
            child.wait_until(
                lambda: model_ids(self.config.entry_url, backend.key) == [backend.alias],
                f"{backend.alias} through {self.config.entry_url} with its key",
                self.config.startup_timeout,
            )
        return child

    def stop_backend(self, service: str) -> None:
        self.backend(service)
        self.supervisor.stop(service)

    # -- configuration files -------------------------------------------------------------

    def _reset_mappings(self) -> None:
        """Start from an empty demo mappings folder holding only routheon-server's mapping.

        The folder is emptied only when the demo made it (a marker file says so), so that a
        mistyped ``--workdir`` cannot wipe a real mappings folder.
        """
        workdir, mappings = self.config.workdir, self.config.mappings
        if mappings.exists():
            if not (workdir / MARKER).is_file():
                raise StartError(f"{mappings} exists and was not made by the demo; choose another --workdir")
            shutil.rmtree(mappings)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / MARKER).touch()
        mappings.mkdir(mode=0o700)
        install_server_mapping(mappings, self.config.server_port)

    def _routheon(self, *args: str) -> None:
        """``routheon ARGS`` (a command that writes) on the demo's folder, judged by the demo's own
        Traefik configuration; granted keys' usage goes to the demo's own folder."""
        cfg = self.config
        argv = [
            tool("routheon"), "--quiet", *args,
            "--mappings", str(cfg.mappings),
            "--usage", str(cfg.usage.resolve()),
            "--traefik-config", str(cfg.workdir / STATIC_CONFIG),
        ]
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StartError(f"routheon {' '.join(args[:2])} failed: {result.stderr.strip()}")

    def _add_mapping(self, backend: Backend) -> None:
        models = [argument for name in backend.models for argument in ("--model", name)]
        self._routheon(
            "mapping", "add",
            "--service", backend.service,
            "--port", str(backend.port),
            "--host", f"http://{LOOPBACK}",
            "--key", backend.key,
            *models,
        )

    def _grant_shared_key(self) -> None:
        services = [argument for backend in self.config.backends for argument in ("--service", backend.service)]
        self._routheon("key", "add", str(self.config.shared_key), *services)

    def _traefik_config(self) -> Path:
        """The shipped static configuration, listening on loopback and reading the demo folder."""
        ports = {ENTRY_POINT: self.config.entry_port, HOP_ENTRY_POINT: self.config.hop_port}
        install_plugins(self.config.workdir)
        return LoopbackTraefik(self.config.mappings, ports).write(self.config.workdir / STATIC_CONFIG)

    # -- the whole stack -----------------------------------------------------------------

    def start(self) -> None:
        """Start everything and return once a request through Traefik lists every model."""
        cfg = self.config
        check_entry_port(cfg.entry_port)
        needed = (traefik_dir() / STATIC_CONFIG, traefik_dir() / "mappings" / SERVER_MAPPING, cfg.stats_config)
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            raise StartError(f"this installation of Routheon lacks its Traefik files: {', '.join(missing)}")
        self._reset_mappings()
        traefik_config = self._traefik_config()
        for backend in cfg.backends:
            log.info("Starting %s (%s) on port %d", backend.service, backend.alias, backend.port)
            self.start_backend(backend.service)
            self._add_mapping(backend)
        if cfg.shared_key is not None:
            self._grant_shared_key()
        log.info("Starting routheon-server on port %d", cfg.server_port)
        server = self.supervisor.start(
            "routheon-server",
            [
                tool("routheon-server"),
                "--mappings", str(cfg.mappings),
                "--host", LOOPBACK,
                "--port", str(cfg.server_port),
                "--stats-config-file", str(cfg.stats_config),
                "--log-level", "INFO",
            ],
        )
        server.wait_http(f"http://{LOOPBACK}:{cfg.server_port}/health", cfg.startup_timeout)
        log.info("Starting Traefik on %s", cfg.entry_url)
        traefik = self.supervisor.start(
            "traefik",
            [tool("traefik"), f"--configFile={traefik_config}"],
            cwd=cfg.workdir,  # where Traefik looks for plugins-local/
        )
        expected = sorted(backend.alias for backend in cfg.backends)
        traefik.wait_until(
            lambda: sorted(model_ids(cfg.entry_url)) == expected,
            f"{expected} listed by {cfg.entry_url}/v1/models",
            cfg.startup_timeout,
        )
