"""The Traefik mapping file format: what one file says, and the text Routheon writes.

A mapping file holds routers (the API keys, in their rules), services (the llama-server URLs)
and middlewares. ``routheon.mappings.folder`` reads a folder of them, ``store`` writes them,
``check`` and ``verdict`` say whether Traefik will route them as intended.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from routheon.mappings.keys import mask_url, validate_key
from routheon.mappings.rules import KeyClause, header_rule, rule_keys

MAPPING_SUFFIXES = (".yml", ".yaml")
ENTRY_POINT = "llama-servers"
ERRORS_MIDDLEWARE = "routheon-errors"
# Error pages whatever order files arrive in. A key file's router uses routheon-server.yml's
# errors middleware; while that file is missing (key files are often written first), Traefik
# disables the router, and a second router for the same keys, without error pages and with a
# low priority, routes them. Once routheon-server.yml is in, the first router wins again.
# (Referencing a missing middleware disables a router: there is no optional reference.)
FALLBACK_SUFFIX = "-without-error-pages"
FALLBACK_PRIORITY = 4  # above the catch-all (1) and the grants routers (2, 3; grants.py), below any default priority
# Traefik reads a request's whole body before it proxies the request: otherwise Go's net/http
# (Traefik's proxy) cuts one or two streamed answers in a hundred under CPU load. Traefik's
# `retry` middleware is the one that does this without buffering responses (`buffering` with
# `disableResponseBuffer` cannot be set from files); it never retries: no backend sends 599.
# The cause and the numbers: docs/production.md, "Streams cut short under load".
REQUEST_BODY_SUFFIX = "-request-body"
NEVER_SENT_STATUS = "599"
HEALTH_PATH = "/health"
HEALTH_INTERVAL = "5s"
HEALTH_TIMEOUT = "3s"
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_SERVICE_NAME = 100


class InputError(ValueError):
    """A value given to Routheon (a service name, URL, entry point, timeout) that it refuses.

    A subclass of its own, so that the command line can report exactly these as one line
    and let any other ValueError, a bug, show its traceback.
    """


class MappingFormatError(ValueError):
    """A file that Traefik would reject, or that is not a Traefik mapping at all.

    ``where`` is the key path of the offending entry; ``parse_mapping`` turns it into a line.
    """

    def __init__(self, message: str, line: int | None = None, where: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.line = line
        self.where = where


# libyaml where PyYAML has it: a 900 KB grants file (10,000 keys) parses in 20 ms instead of 0.35 s.
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Traefik reads only the first YAML document of a file; the ones after a `---` are ignored.
def first_document(text: str) -> yaml.Node | None:
    """The node tree of the first document of ``text`` (YAMLError when it does not parse).

    A text libyaml refuses is read again by PyYAML's own parser, for its error messages: they
    name the offending character and nesting that is too deep, where libyaml's do not.
    """
    try:
        return next(yaml.compose_all(text, Loader=SAFE_LOADER), None)
    except yaml.YAMLError:
        if SAFE_LOADER is yaml.SafeLoader:
            raise
    return next(yaml.compose_all(text, Loader=yaml.SafeLoader), None)


# Go's YAML reader (Traefik's) refuses documents whose aliases expand them far beyond their
# size; a 400-byte "billion laughs" file would otherwise expand to billions of nodes here.
MAX_EXPANDED_NODES = 100_000


def expanded_size(root: yaml.Node) -> int:
    """How many nodes the tree has with every alias expanded, computed without expanding."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a recursive alias counts once instead of looping
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = total
        return total

    return size(root)


class KeyLines:
    """The line of every mapping key of a YAML text, and the keys a mapping repeats.

    PyYAML forgets lines once a document is loaded and silently keeps the last of two equal
    keys, which Go's YAML reader (Traefik's) rejects; the node tree keeps both facts. Each
    node is visited once, so aliases cost nothing.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        self.duplicates: list[tuple[str, int]] = []
        self._seen: set[int] = set()
        try:
            root = first_document(without_template_comments(text))
            if root is not None:
                self._walk(root, ())
        except (yaml.YAMLError, RecursionError):
            pass  # the parse itself reports what is wrong with such a text

    def _walk(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*path, f"[{index}]"))
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key_path in self.lines:
                self.duplicates.append((".".join(key_path), line))
            else:
                self.lines[key_path] = line
            self._walk(value_node, key_path)

    def get(self, *path: str) -> int | None:
        return self.lines.get(path)


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
    middlewares: tuple[str, ...] = ()
    # the middlewares above that read whole request bodies before proxying, streams unbuffered
    body_readers: tuple[str, ...] = ()
    # what the file was read from, for the checks that need lines and permissions
    text: str = field(default="", repr=False, compare=False)
    mode: int = field(default=0, compare=False)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(url for service in self.services for url in service.urls)

    def key_clauses(self) -> list[tuple[Router, KeyClause]]:
        """Every key this file routes, with the router that holds it (a key may have two routers)."""
        return [(router, clause) for router in self.routers for clause in rule_keys(router.rule) or ()]

    def keys(self) -> list[str]:
        """Every key this file routes, once each, in file order."""
        return list(dict.fromkeys(clause.key for _, clause in self.key_clauses()))


@dataclass(frozen=True)
class MappingSpec:
    """What one Routheon-written mapping file says: these keys reach these llama-servers.

    Without keys the file defines the service alone, for keys granted it in the grants file
    (``routheon key add``; docs/model-routing.md).
    """

    service: str
    urls: tuple[str, ...]
    keys: tuple[str, ...]
    error_pages: bool = True
    entry_point: str = ENTRY_POINT

    @property
    def file_name(self) -> str:
        return f"{self.service}.yml"

    def validate(self) -> None:
        """Raise InputError (InvalidKeyError for keys) naming the first thing that cannot be written."""
        validate_service_name(self.service)
        if not _SERVICE_NAME.fullmatch(self.entry_point):
            raise InputError(f"invalid entry point {self.entry_point!r}: use letters, digits, '.', '_' and '-'")
        if not self.urls:
            raise InputError("a mapping needs at least one backend URL")
        for url in self.urls:
            validate_url(url)
        for key in self.keys:
            validate_key(key)
        if len(set(self.keys)) != len(self.keys):
            raise InputError("the same API key is given twice")


def validate_service_name(name: str) -> None:
    """Service names become file names and Traefik names: keep them to a safe alphabet."""
    if not _SERVICE_NAME.fullmatch(name) or len(name) > _MAX_SERVICE_NAME:
        raise InputError(
            f"invalid service name {name!r}: use letters, digits, '.', '_' and '-',"
            f" starting with a letter or digit, at most {_MAX_SERVICE_NAME} characters"
        )
    if name.lower().endswith((".yml", ".yaml", ".toml")) or ".bak" in name.lower():
        raise InputError(f"invalid service name {name!r}: it must not look like a mapping or backup file name")


def validate_url(url: str) -> None:
    """A backend URL Traefik can use, with nothing that would break the file around it.

    Credentials are refused: Traefik would send them to the backend, and every reader of the
    folder (``routheon mapping list``) would see them. A backslash is refused because parsers
    disagree on it: ``http://h:1\\@evil`` is host ``evil`` to Python and Go, ``h`` to others.
    """
    shown = mask_url(url)
    if "@" in urlsplit(url).netloc or "\\" in url:
        raise InputError(
            f"invalid backend URL {shown!r}: it holds credentials (user:password@) or a backslash;"
            " give scheme://host:port only"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"invalid backend URL {shown!r}: it must look like http://127.0.0.1:8011")
    if any(char.isspace() or char in "'\"`{}" or not char.isprintable() for char in url):
        raise InputError(f"invalid backend URL {shown!r}: it holds a character a URL cannot have here")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise InputError(f"invalid backend URL {shown!r}: the port is not a number from 1 to 65535")


def request_body_middleware(service: str) -> str:
    """The name of the middleware, defined in ``service``'s own file, that reads request bodies whole.

    Each file defines its own, so a key file works whatever else the folder holds.
    """
    return f"{service}{REQUEST_BODY_SUFFIX}"


def fallback_router(router: str) -> str:
    """The name of the router that routes ``router``'s keys while routheon-server.yml is missing."""
    return f"{router}{FALLBACK_SUFFIX}"


def rendered_routers(spec: MappingSpec) -> tuple[tuple[str, tuple[str, ...], int | None], ...]:
    """``(name, middlewares, priority)`` of each router a Routheon-written file has, in file order."""
    body = request_body_middleware(spec.service)
    if not spec.keys:
        return ()
    if not spec.error_pages:
        return ((spec.service, (body,), None),)
    return (
        (spec.service, (ERRORS_MIDDLEWARE, body), None),
        (fallback_router(spec.service), (body,), FALLBACK_PRIORITY),
    )


def body_reader_lines(name: str) -> list[str]:
    """The middleware ``name`` (YAML lines under ``http.middlewares``) that reads request bodies whole.

    A ``retry`` that never retries (it only retries on a status no backend sends): Traefik
    then reads the body before proxying, which keeps streams whole under load (traefik.yml).
    """
    return [
        f"    '{name}':",
        "      retry:",
        "        attempts: 2",
        f"        status: ['{NEVER_SENT_STATUS}']",
        "        retryNonIdempotentMethod: true",
        "        disableRetryOnNetworkError: true",
        "        maxRequestBodyBytes: -1",
    ]


def render_mapping(spec: MappingSpec) -> str:
    """The text of a mapping file for ``spec``.

    Written by hand rather than by a YAML dumper so the layout stays stable and readable; every
    value that can hold user input sits in a single-quoted YAML scalar, in which only ``'`` is
    special, and ``'`` is refused in keys and URLs. ``parse_rendered`` checks the result.
    """
    spec.validate()
    name = spec.service
    lines = [
        f"# Traefik dynamic configuration: API keys that reach service {name}."
        if spec.keys
        else f"# Traefik dynamic configuration: service {name}, for the keys granted it in routheon-grants.yml.",
        "# Written by `routheon mapping add`; check the folder with `routheon mapping check`.",
        "http:",
        *(["  routers:"] if spec.keys else []),
    ]
    for router, middlewares, priority in rendered_routers(spec):
        if priority is not None:
            lines.append("    # The same keys while routheon-server.yml (error pages) is not in the folder.")
        lines += [
            f"    '{router}':",
            f"      rule: '{header_rule(spec.keys)}'",
            *([f"      priority: {priority}"] if priority is not None else []),
            f"      service: '{name}'",
            "      entryPoints:",
            f"        - {spec.entry_point}",
            "      middlewares:",
            *(f"        - '{middleware}'" for middleware in middlewares),
        ]
    if spec.keys:
        lines += [
            "  middlewares:",
            "    # Reads each request body whole before proxying; never retries (docs/production.md).",
            *body_reader_lines(request_body_middleware(name)),
        ]
    lines += [
        "  services:",
        f"    '{name}':",
        "      loadBalancer:",
        "        servers:",
        *(f"          - url: '{url}'" for url in spec.urls),
        "        healthCheck:",
        f"          path: {HEALTH_PATH}",
        f"          interval: {HEALTH_INTERVAL}",
        f"          timeout: {HEALTH_TIMEOUT}",
    ]
    return "\n".join(lines) + "\n"


def parse_rendered(text: str, spec: MappingSpec, path: Path) -> MappingFile:
    """Read rendered text back and insist it says exactly what ``spec`` asked for."""
    mapping = parse_mapping(text, path)
    expected = rendered_routers(spec)
    if (
        any([clause.key for clause in rule_keys(router.rule) or ()] != list(spec.keys) for router in mapping.routers)
        or any(clause.regex for _, clause in mapping.key_clauses())
        or [router.service for router in mapping.routers] != [spec.service] * len(expected)
        or [(router.name, router.middlewares, router.priority) for router in mapping.routers] != list(expected)
        or mapping.body_readers != ((request_body_middleware(spec.service),) if spec.keys else ())
        or mapping.urls != tuple(url.rstrip("/") for url in spec.urls)
    ):
        raise MappingFormatError("the rendered mapping does not read back as written; nothing was written")
    return mapping


def _tuple_of_str(value: Any, what: str, where: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise MappingFormatError(f"{what} must be a list of strings", where=where)


def _named_entries(raw: Any, kind: str) -> Iterator[tuple[Any, dict[str, Any], tuple[str, ...]]]:
    """``(name, body, where)`` for each entry of ``http.<kind>s``, insisting on mappings at both levels."""
    if raw is None:
        return
    section = f"{kind}s"
    if not isinstance(raw, dict):
        raise MappingFormatError(f"http.{section} must be a mapping of {kind} names", where=("http", section))
    for name, body in raw.items():
        where = ("http", section, str(name))
        if not isinstance(body, dict):
            raise MappingFormatError(f"{kind} {name!r} must be a mapping", where=where)
        yield name, body, where


def _parse_services(raw: Any) -> tuple[Service, ...]:
    services = []
    for name, body, where in _named_entries(raw, "service"):
        balancer = body.get("loadBalancer")
        if balancer is None:
            # weighted, mirroring and failover services hold no URLs of their own
            services.append(Service(str(name), ()))
            continue
        servers = balancer.get("servers") if isinstance(balancer, dict) else None
        if isinstance(servers, dict):
            servers = list(servers.values())  # Traefik's decoder takes a map for a list too
        if not isinstance(servers, list):
            raise MappingFormatError(f"service {name!r}: loadBalancer.servers must be a list", where=where)
        urls = []
        for server in servers:
            url = server.get("url") if isinstance(server, dict) else None
            if not isinstance(url, str) or not url:
                raise MappingFormatError(f"service {name!r}: every server needs a url", where=where)
            urls.append(url.rstrip("/"))
        services.append(Service(str(name), tuple(urls)))
    return tuple(services)


def _parse_routers(raw: Any) -> tuple[Router, ...]:
    routers = []
    for name, body, where in _named_entries(raw, "router"):
        rule, service = body.get("rule"), body.get("service")
        if not isinstance(rule, str) or not isinstance(service, str):
            raise MappingFormatError(f"router {name!r} needs a rule and a service", where=where)
        priority = body.get("priority")
        if priority is not None and not isinstance(priority, int):
            raise MappingFormatError(f"router {name!r}: priority must be an integer", where=where)
        routers.append(
            Router(
                name=str(name),
                rule=rule,
                service=service,
                entry_points=_tuple_of_str(body.get("entryPoints"), f"router {name!r}: entryPoints", where),
                middlewares=_tuple_of_str(body.get("middlewares"), f"router {name!r}: middlewares", where),
                priority=priority,
            )
        )
    return tuple(routers)


def parse_mapping(text: str, path: Path) -> MappingFile:
    """Parse one mapping file's text; raise MappingFormatError naming the problem and its line."""
    try:
        return _parse_document(text, path)
    except MappingFormatError as exc:
        if exc.line is None and exc.where:
            exc.line = KeyLines(text).get(*exc.where)
        raise


# Traefik expands each file as a Go template first; a comment is the one construct that needs
# no data, so it is the one this reader expands too (to nothing, keeping line numbers).
_TEMPLATE_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.DOTALL)


def without_template_comments(text: str) -> str:
    return _TEMPLATE_COMMENT.sub(lambda match: "\n" * match.group().count("\n"), text)


def load_first_document(text: str) -> Any:
    """The first YAML document of a mapping file's ``text`` as Traefik reads it: template comments
    expanded, later documents ignored, alias bombs refused (MappingFormatError); YAMLError when it
    does not parse. Every reader of a mapping file goes through it, so none disagrees with
    ``mapping check`` about what a file says."""
    root = first_document(without_template_comments(text))
    if root is None:
        return None
    if expanded_size(root) > MAX_EXPANDED_NODES:
        raise MappingFormatError(
            f"not a Traefik mapping: its aliases expand it to more than {MAX_EXPANDED_NODES} nodes"
        )
    return yaml.SafeLoader("").construct_document(root)


def _parse_document(text: str, path: Path) -> MappingFile:
    try:
        document = load_first_document(text)
    except RecursionError:
        raise MappingFormatError("not a Traefik mapping: nested too deeply to read") from None
    except yaml.reader.ReaderError as exc:
        # its str() spans two lines and names no line; a finding is one line, FILE:LINE first
        line = text.count("\n", 0, exc.position) + 1
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise MappingFormatError(f"not valid YAML: character #x{character:04x} is not allowed", line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise MappingFormatError(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    if document is None:
        return MappingFile(path, text=text)
    if not isinstance(document, dict):
        raise MappingFormatError("not a Traefik mapping: the top level must be a mapping")
    http = document.get("http")
    if http is None:
        return MappingFile(path, text=text)
    if not isinstance(http, dict):
        raise MappingFormatError("not a Traefik mapping: 'http' must be a mapping")
    middlewares = http.get("middlewares")
    if middlewares is not None and not isinstance(middlewares, dict):
        raise MappingFormatError(
            "http.middlewares must be a mapping of middleware names", where=("http", "middlewares")
        )
    return MappingFile(
        path,
        _parse_routers(http.get("routers")),
        _parse_services(http.get("services")),
        tuple(str(name) for name in middlewares or ()),
        tuple(str(name) for name, body in (middlewares or {}).items() if _reads_request_body_whole(body)),
        text,
    )


# The settings of the key files Routheon and routheon-server 1.0.x write (render_mapping).
_ROUTER_SETTINGS = ("rule", "service", "entryPoints", "middlewares", "priority")
_BALANCER_SETTINGS = ("servers", "healthCheck")


def unwritten_settings(text: str) -> list[str]:
    """The settings of a readable mapping file's ``text`` that ``render_mapping`` never writes.

    A rewrite would drop them and with them what they do: a router's ``tls`` (HTTPS requests
    stop matching), a service's ``serversTransport``, a health check on another path (a
    backend without ``/health`` reads as down), a certificate, a Go template (Traefik expands
    it; Routheon reads the text). Middleware definitions are the caller's to judge.
    """
    if "{{" in without_template_comments(text):
        return ["a Go template"]
    document = load_first_document(text) or {}
    http = document.get("http") or {}
    found = [str(name) for name in document if name != "http"]
    found += [f"http.{name}" for name in http if name not in ("routers", "services", "middlewares")]
    for name, router in (http.get("routers") or {}).items():
        found += [f"http.routers.{name}.{setting}" for setting in router if setting not in _ROUTER_SETTINGS]
    for name, service in (http.get("services") or {}).items():
        where = f"http.services.{name}"
        found += [f"{where}.{setting}" for setting in service if setting != "loadBalancer"]
        balancer = service.get("loadBalancer") or {}
        found += [f"{where}.loadBalancer.{setting}" for setting in balancer if setting not in _BALANCER_SETTINGS]
        servers = balancer.get("servers") or []
        for server in servers.values() if isinstance(servers, dict) else servers:
            found += [f"{where}.loadBalancer.servers.{setting}" for setting in server if setting != "url"]
        health = balancer.get("healthCheck")
        if health is not None and (not isinstance(health, dict) or health.get("path") != HEALTH_PATH):
            found.append(f"{where}.loadBalancer.healthCheck.path")
    return found


def _reads_request_body_whole(middleware: Any) -> bool:
    """Whether a middleware is a ``retry`` that reads POST bodies whole before proxying them.

    Traefik's retry keeps a copy of the body only when it may retry the request by status code:
    with ``status`` set, at least two attempts and non-idempotent methods allowed.
    """
    retry = middleware.get("retry") if isinstance(middleware, dict) else None
    return (
        isinstance(retry, dict)
        and isinstance(retry.get("attempts"), int)
        and retry["attempts"] >= 2
        and bool(retry.get("status"))
        and retry.get("retryNonIdempotentMethod") is True
    )
