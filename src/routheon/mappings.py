"""The Traefik mapping file format: the one place that knows how a mapping is read.

A mappings folder is Traefik's file-provider directory. Every ``*.yml``/``*.yaml`` file in it
holds routers (one API key each) and services (the llama-server URLs). routheon-server, the
``routheon`` CLI and create-mapping.sh all go through this module, so there is a single
definition of what a valid mapping is.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MAPPING_SUFFIXES = (".yml", ".yaml")


class MappingFormatError(ValueError):
    """A file that Traefik would reject, or that is not a Traefik mapping at all."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Service:
    """A Traefik ``loadBalancer`` service: the backend URLs behind one name."""

    name: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Router:
    """A Traefik router as written in a mapping file."""

    name: str
    rule: str
    service: str
    entry_points: tuple[str, ...] = ()
    middlewares: tuple[str, ...] = ()
    priority: int | None = None


@dataclass(frozen=True)
class MappingFile:
    """One parsed mapping file."""

    path: Path
    routers: tuple[Router, ...] = ()
    services: tuple[Service, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(url for service in self.services for url in service.urls)


@dataclass(frozen=True)
class MappingProblem:
    """A file in the folder that could not be used, with the reason and (if known) the line."""

    path: Path
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Folder:
    """The usable mapping files of a folder and the files that are broken."""

    path: Path
    files: tuple[MappingFile, ...] = ()
    problems: tuple[MappingProblem, ...] = ()
    exists: bool = True

    def backend_urls(self) -> list[str]:
        """Every distinct backend URL, in file order, without a trailing slash."""
        seen: dict[str, None] = {}
        for mapping in self.files:
            for url in mapping.urls:
                seen.setdefault(url.rstrip("/"), None)
        return list(seen)


def is_mapping_name(name: str) -> bool:
    """Whether Traefik's file provider would read this file (rotated ``.bak.*`` files are not)."""
    return name.endswith(MAPPING_SUFFIXES) and not name.startswith(".")


def _tuple_of_str(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise MappingFormatError(f"{what} must be a list of strings")


def _parse_services(raw: Any) -> tuple[Service, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise MappingFormatError("http.services must be a mapping of service names")
    services = []
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise MappingFormatError(f"service {name!r} must be a mapping")
        balancer = body.get("loadBalancer")
        if balancer is None:
            # weighted, mirroring and failover services hold no URLs of their own
            services.append(Service(str(name), ()))
            continue
        servers = balancer.get("servers") if isinstance(balancer, dict) else None
        if not isinstance(servers, list):
            raise MappingFormatError(f"service {name!r}: loadBalancer.servers must be a list")
        urls = []
        for server in servers:
            url = server.get("url") if isinstance(server, dict) else None
            if not isinstance(url, str) or not url:
                raise MappingFormatError(f"service {name!r}: every server needs a url")
            urls.append(url.rstrip("/"))
        services.append(Service(str(name), tuple(urls)))
    return tuple(services)


def _parse_routers(raw: Any) -> tuple[Router, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise MappingFormatError("http.routers must be a mapping of router names")
    routers = []
    for name, body in raw.items():
        if not isinstance(body, dict):
            raise MappingFormatError(f"router {name!r} must be a mapping")
        rule, service = body.get("rule"), body.get("service")
        if not isinstance(rule, str) or not isinstance(service, str):
            raise MappingFormatError(f"router {name!r} needs a rule and a service")
        priority = body.get("priority")
        if priority is not None and not isinstance(priority, int):
            raise MappingFormatError(f"router {name!r}: priority must be an integer")
        routers.append(
            Router(
                name=str(name),
                rule=rule,
                service=service,
                entry_points=_tuple_of_str(body.get("entryPoints"), f"router {name!r}: entryPoints"),
                middlewares=_tuple_of_str(body.get("middlewares"), f"router {name!r}: middlewares"),
                priority=priority,
            )
        )
    return tuple(routers)


def parse_mapping(text: str, path: Path) -> MappingFile:
    """Parse one mapping file's text; raise MappingFormatError naming the problem."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise MappingFormatError(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    if document is None:
        return MappingFile(path)
    if not isinstance(document, dict):
        raise MappingFormatError("not a Traefik mapping: the top level must be a mapping")
    http = document.get("http")
    if http is None:
        return MappingFile(path)
    if not isinstance(http, dict):
        raise MappingFormatError("not a Traefik mapping: 'http' must be a mapping")
    return MappingFile(path, _parse_routers(http.get("routers")), _parse_services(http.get("services")))


def mapping_paths(folder: Path, skip: Sequence[re.Pattern[str]] = ()) -> list[Path]:
    """The files of ``folder`` that Traefik reads, minus names matching a ``skip`` pattern."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
    return [
        folder / name
        for name in names
        if is_mapping_name(name) and not any(pattern.search(name) for pattern in skip)
    ]


def read_mapping(path: Path) -> MappingFile:
    """Read and parse one file; OSError and MappingFormatError propagate."""
    return parse_mapping(path.read_text(encoding="utf-8"), path)


def scan_folder(folder: str | os.PathLike[str], skip: Iterable[re.Pattern[str]] = ()) -> Folder:
    """Parse every mapping file of ``folder``; a broken file becomes a problem, never an exception."""
    path = Path(folder)
    try:
        paths = mapping_paths(path, tuple(skip))
    except FileNotFoundError:
        return Folder(path, exists=False)
    files: list[MappingFile] = []
    problems: list[MappingProblem] = []
    for file_path in paths:
        try:
            files.append(read_mapping(file_path))
        except MappingFormatError as exc:
            problems.append(MappingProblem(file_path, str(exc), exc.line))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(MappingProblem(file_path, f"cannot read: {exc}"))
    return Folder(path, tuple(files), tuple(problems))


__all__ = [
    "Folder",
    "MappingFile",
    "MappingFormatError",
    "MappingProblem",
    "Router",
    "Service",
    "is_mapping_name",
    "mapping_paths",
    "parse_mapping",
    "read_mapping",
    "scan_folder",
]
