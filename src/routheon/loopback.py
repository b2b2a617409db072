"""Running the shipped Traefik configuration on loopback: free ports, and the two files it needs.

The demo, the tests and the bench all run the configuration an operator installs
(``traefik.yml`` and ``mappings/routheon-server.yml``), moved onto 127.0.0.1 and a folder of
their own. Only what a loopback run must change is changed: every entry point's address,
the file provider's folder, and optionally the log level and the provider throttle. Every
other section (``experimental`` with local plugins, ``serversTransport``, an entry point's
own settings, whatever later versions add) is copied as it is, so a run tests the file that
ships.

The files come from the installed package (``routheon/traefik/`` and
``routheon/stats-config.yml``, put there by the wheel build) or, in a clone, from the
repository's own ``traefik/`` folder and ``stats-config.yml``, which are their source: an
installed ``routheon`` runs the demo without a clone.
"""

from __future__ import annotations

import random
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import routheon

LOOPBACK = "127.0.0.1"
STATIC_CONFIG = "traefik.yml"
SERVER_MAPPING = "routheon-server.yml"
# Traefik loads local plugins from plugins-local/ in its working directory
PLUGINS_DIR = "plugins-local"
# the URL in the shipped routheon-server.yml: the compose service name and the default port
SHIPPED_SERVER_URL = "http://routheon-server:9080"
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# free_port picks from here up, outside the ephemeral range: above the ports services usually own
_LOWEST_PICKED = 20000
_HIGHEST_PORT = 65535
_PICKS = 50
_PORT_DRAWS = random.SystemRandom()


def shipped(relative: str) -> Path:
    """A file or folder the wheel ships inside the package (a clone: at its root, beside ``src/``)."""
    packaged = Path(str(resources.files(routheon) / relative))
    if packaged.exists():
        return packaged
    return Path(routheon.__file__).resolve().parent.parent.parent / relative


def traefik_dir() -> Path:
    """The folder holding ``traefik.yml`` and ``mappings/routheon-server.yml``."""
    return shipped("traefik")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port``; connections still closing (TIME_WAIT) do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (and ``bind(0)``)."""
    try:
        low, high = (int(part) for part in Path(_EPHEMERAL_RANGE).read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default
    return range(low, high + 1)


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nobody listens on it, else a free port outside the kernel's ephemeral range.

    A port is free only until someone binds it, and the caller's child binds it a moment
    later. A port from ``bind(0)`` lies in the ephemeral range, where every outgoing connection
    (a test's client, Traefik's connections to backends) takes its local port too: one took
    a port in that moment in a CI run with two busy loops ("address already in use" for a test
    backend, 6 errors in 450 tests). Below that range only programs that bind on purpose pick
    ports, and a random choice keeps two of them (parallel test workers) apart: drawn from the
    OS, as a test plugin that seeds ``random`` alike in every worker (pytest-randomly) made two
    workers draw the same ports, and one test's requests reached the other's backends.
    Ports above the range count too: a range set to start below 20000 leaves none below it.
    Only where the range leaves no port outside it (or none of the draws is free) does the
    kernel pick.
    """
    if preferred and port_is_free(preferred):
        return preferred
    ephemeral = ephemeral_ports()
    outside = [*range(_LOWEST_PICKED, ephemeral.start), *range(max(_LOWEST_PICKED, ephemeral.stop), _HIGHEST_PORT + 1)]
    for _ in range(_PICKS if outside else 0):
        if port_is_free(port := _PORT_DRAWS.choice(outside)):
            return port
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LoopbackTraefik:
    """What a loopback run changes in a static configuration.

    ``ports`` gives entry points their port on 127.0.0.1 (an entry point missing from the
    file is added). Entry points it does not name keep their settings but listen on a port
    the kernel picks, so a second public entry point never binds a real port in a test.
    """

    mappings: Path
    ports: Mapping[str, int] = field(default_factory=dict)
    log_level: str | None = None
    throttle: str | None = None

    def apply(self, static: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``static`` moved onto loopback; sections this class does not know stay as they are."""
        config = dict(static)
        entry_points = {name: dict(settings or {}) for name, settings in (config.get("entryPoints") or {}).items()}
        for name in self.ports:
            entry_points.setdefault(name, {})
        for name, settings in entry_points.items():
            settings["address"] = f"{LOOPBACK}:{self.ports.get(name, 0)}"
        config["entryPoints"] = entry_points
        providers = dict(config.get("providers") or {})
        providers["file"] = {**(providers.get("file") or {}), "directory": str(self.mappings.resolve()), "watch": True}
        if self.throttle is not None:
            providers["providersThrottleDuration"] = self.throttle
        config["providers"] = providers
        if self.log_level is not None:
            config["log"] = {**(config.get("log") or {}), "level": self.log_level}
        return config

    def write(self, target: Path, static: Mapping[str, Any] | None = None) -> Path:
        """Write the loopback form of ``static`` (default: the shipped traefik.yml) to ``target``."""
        if static is None:
            static = shipped_static_config()
        target.write_text(yaml.safe_dump(self.apply(static), sort_keys=False), encoding="utf-8")
        return target


def shipped_static_config() -> dict[str, Any]:
    """The shipped traefik.yml as data, for a caller that adds settings before ``LoopbackTraefik.write``."""
    return yaml.safe_load((traefik_dir() / STATIC_CONFIG).read_text(encoding="utf-8")) or {}


def install_plugins(folder: Path) -> Path:
    """Routheon's Traefik plugin in ``folder/plugins-local``: run Traefik with ``folder`` as its cwd."""
    target = folder / PLUGINS_DIR
    shutil.copytree(traefik_dir() / PLUGINS_DIR, target, dirs_exist_ok=True)
    return target


def install_server_mapping(mappings: Path, server_port: int) -> Path:
    """The shipped routheon-server.yml in ``mappings``, pointed at routheon-server on loopback."""
    template = (traefik_dir() / "mappings" / SERVER_MAPPING).read_text(encoding="utf-8")
    path = mappings / SERVER_MAPPING
    path.write_text(template.replace(SHIPPED_SERVER_URL, f"http://{LOOPBACK}:{server_port}"), encoding="utf-8")
    return path
