"""The grants file: which API keys may use which services, and which models each service serves.

One key, many models (docs/model-routing.md). Routheon writes a single Traefik dynamic file,
``routheon-grants.yml``, into the mappings folder. It holds

- a router on the public entry point for every request with a Bearer key, through Routheon's
  Traefik plugin (``traefik/plugins-local``): the plugin hashes the key, reads the body's
  ``model``, picks one of the key's services and names it in ``X-Routheon-Service``;
- the plugin's tables (services → models, key hashes → services) as two blocks of text,
  one line each: Traefik decodes a string without building a node per entry, and Python
  reads 10,000 keys in 0.05 s instead of the 2.4 s a YAML mapping of them takes (PyYAML);
- per service, a router on a second, loopback-only entry point (``routheon-hop``) that sends
  requests carrying that header to the service (defined in the service's own NAME.yml);
- a router sending ``/v1/models`` with a key to routheon-server, which lists the key's models.

Keys are stored as the sha256 of the key (hex) and its last characters, for listings: the
file gives no key away, and a key can hold no character that would break the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import yaml

from routheon.mappings.format import ENTRY_POINT, ERRORS_MIDDLEWARE, FALLBACK_SUFFIX, MAX_REQUEST_BODY_BYTES
from routheon.mappings.format import PLUGIN_MODULE, PLUGIN_NAME  # noqa: F401 - verdict and bench import them from here
from routheon.mappings.format import SAFE_LOADER, InputError, guard_lines
from routheon.mappings.format import validate_service_name
from routheon.mappings.keys import validate_key

GRANTS_FILE = "routheon-grants.yml"
# The second entry point: loopback only; the plugin's requests come back to Traefik here.
HOP_ENTRY_POINT = "routheon-hop"
HOP_HOST = "127.0.0.1"
HOP_PORT = 8081
HOP_HEADER = "X-Routheon-Service"
# Set (whatever a client sent) on /v1/models requests routed by a granted key to routheon-server.
GRANTED_MODELS_HEADER = "X-Routheon-Granted-Models"
GRANTS_ROUTER = "routheon-grants"
GRANTS_MIDDLEWARE = "routheon-grants"
MODELS_ROUTER = "routheon-grants-models"
HOP_SERVICE = "routheon-hop"
# Keep-alive on the hop (Traefik's own entry point honours it): measured p50 in the docs.
HOP_IDLE_CONNECTIONS = 64
HOP_REQUEST_BODY = "routheon-hop-request-body"
HOP_ROUTER_PREFIX = "routheon-hop-"
SERVER_SERVICE = "routheon-server"
# Every router of a key file outranks both grants routers, so a key written in the original
# format keeps its route: key routers have priority len(rule) (35 or more), their fallbacks
# without error pages FALLBACK_PRIORITY (4). routheon-server.yml's 401 catch-all is 1.
MODELS_PRIORITY = 3
GRANTS_PRIORITY = 2
HINT_LENGTH = 4
BEARER_RULE = "HeaderRegexp(`Authorization`, `^Bearer `)"
MODELS_RULE = f"(Path(`/v1/models`) || PathPrefix(`/v1/models/`)) && {BEARER_RULE}"
_HASH = re.compile(r"[0-9a-f]{64}")
# Hints are shown in listings and written into a file Traefik expands as a Go template.
_HINT_CHAR = re.compile(r"[A-Za-z0-9._~+/=-]")
MAX_MODEL_NAME = 256


def key_hash(key: str) -> str:
    """The sha256 of ``key`` as lowercase hex: what the file stores and the plugin compares."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hint(key: str) -> str:
    """The last characters of ``key`` for listings (``…abcd``); other characters become ``?``."""
    return "".join(char if _HINT_CHAR.fullmatch(char) else "?" for char in key[-HINT_LENGTH:])


def validate_model_name(model: str) -> None:
    """Model names are single words of printable characters: they are whitespace-separated in the file."""
    if not model or len(model) > MAX_MODEL_NAME:
        raise InputError(f"invalid model name {model!r}: 1 to {MAX_MODEL_NAME} characters")
    if any(char.isspace() or not char.isprintable() for char in model) or "{{" in model or "}}" in model:
        raise InputError(f"invalid model name {model!r}: no whitespace, control characters, '{{{{' or '}}}}'")


@dataclass(frozen=True)
class GrantedService:
    """A service (a NAME.yml of the folder) and the model names clients may send for it.

    No models: the service answers whatever ``model`` a request names, for keys whose only
    service it is (llama-server in single-model mode ignores ``model``).
    """

    name: str
    models: tuple[str, ...] = ()

    def validate(self) -> None:
        validate_service_name(self.name)
        for model in self.models:
            validate_model_name(model)
        if len(set(self.models)) != len(self.models):
            raise InputError(f"service {self.name!r} declares a model twice")


@dataclass(frozen=True)
class KeyGrant:
    """One API key, by its hash, and the services it may use (the first serving a model wins)."""

    hash: str
    hint: str
    services: tuple[str, ...]

    @classmethod
    def of(cls, key: str, services: tuple[str, ...]) -> KeyGrant:
        validate_key(key)
        return cls(key_hash(key), key_hint(key), services)

    def validate(self) -> None:
        if not _HASH.fullmatch(self.hash):
            raise InputError(f"invalid key hash {self.hash!r}: 64 lowercase hex digits (sha256)")
        if not self.hint or len(self.hint) > HINT_LENGTH or not all(_HINT_CHAR.fullmatch(c) for c in self.hint):
            raise InputError(f"key …{self.hint}: invalid hint")
        if not self.services:
            raise InputError(f"key …{self.hint}: grants no service")
        if len(set(self.services)) != len(self.services):
            raise InputError(f"key …{self.hint}: a service is granted twice")


@dataclass(frozen=True)
class Grants:
    """Everything the grants file holds. Immutable: ``grant`` and ``revoke`` return new Grants."""

    services: tuple[GrantedService, ...] = ()
    keys: tuple[KeyGrant, ...] = ()
    hop_port: int = HOP_PORT
    entry_point: str = field(default=ENTRY_POINT)

    def service(self, name: str) -> GrantedService | None:
        return next((service for service in self.services if service.name == name), None)

    @cached_property
    def _by_hash(self) -> dict[str, KeyGrant]:
        # built once per Grants: `key add --key-file` with 10,000 keys must not scan 10,000 times
        return {grant.hash: grant for grant in self.keys}

    def key(self, key: str) -> KeyGrant | None:
        """The grant of ``key``. Always hashed: a key may itself be 64 hex digits (``openssl rand -hex 32``)."""
        return self.by_hash(key_hash(key))

    def by_hash(self, digest: str) -> KeyGrant | None:
        return self._by_hash.get(digest)

    def models_of(self, key: str) -> tuple[str, ...]:
        """The models ``key`` may name, each once, in grant order (what ``/v1/models`` lists)."""
        grant = self.key(key)
        return () if grant is None else self.models_for(grant)

    def models_for(self, grant: KeyGrant) -> tuple[str, ...]:
        found = (self.service(name) for name in grant.services)
        return tuple(dict.fromkeys(model for service in found if service for model in service.models))

    def with_service(self, service: GrantedService) -> Grants:
        """Declare ``service`` (or replace its models); its keys keep their grants."""
        service.validate()
        others = tuple(other for other in self.services if other.name != service.name)
        if len(others) == len(self.services):
            return replace(self, services=(*self.services, service))
        return replace(self, services=tuple(service if s.name == service.name else s for s in self.services))

    def grant(self, key: str, services: tuple[str, ...]) -> Grants:
        """Grant ``services`` to ``key`` on top of what it has; never revokes anything."""
        return self.grant_all((key,), services)

    def grant_all(self, keys: Iterable[str], services: tuple[str, ...]) -> Grants:
        """``grant`` for many keys in one pass (10,000 keys: a fraction of a second)."""
        for name in services:
            if self.service(name) is None:
                raise InputError(f"service {name!r} is not declared in the grants file")
        merged = dict(self._by_hash)
        for key in keys:
            old = merged.get(key_hash(key))
            merged[key_hash(key)] = KeyGrant.of(key, tuple(dict.fromkeys((*(old.services if old else ()), *services))))
        return replace(self, keys=tuple(merged.values()))

    def revoke(self, key: str, services: tuple[str, ...] | None = None) -> Grants:
        """Take ``services`` (all when None) from ``key``; a key left with none is removed."""
        return self.revoke_hash(key_hash(key), services)

    def revoke_hash(self, digest: str, services: tuple[str, ...] | None = None) -> Grants:
        """``revoke`` for the key whose sha256 is ``digest``."""
        old = self.by_hash(digest)
        if old is None:
            return self
        left = () if services is None else tuple(name for name in old.services if name not in services)
        keys = tuple(
            replace(grant, services=left) if grant.hash == old.hash else grant
            for grant in self.keys
            if grant.hash != old.hash or left
        )
        return replace(self, keys=keys)

    def validate(self) -> None:
        """Raise InputError naming the first thing the plugin would refuse."""
        if not 1 <= self.hop_port <= 65535:
            raise InputError(f"invalid hop port {self.hop_port}")
        names = [service.name for service in self.services]
        if len(set(names)) != len(names):
            raise InputError("a service is declared twice")
        for service in self.services:
            service.validate()
        hashes = [grant.hash for grant in self.keys]
        if len(set(hashes)) != len(hashes):
            raise InputError("a key is listed twice")
        for grant in self.keys:
            grant.validate()
            for name in grant.services:
                if name not in names:
                    raise InputError(f"key …{grant.hint}: service {name!r} is not declared")


def hop_router(service: str) -> str:
    return f"{HOP_ROUTER_PREFIX}{service}"


def _block(lines: list[str], indent: str) -> list[str]:
    """A YAML literal block of ``lines`` (``''`` when empty: a block needs one line)."""
    if not lines:
        return ["''"]
    return ["|", *(indent + line for line in lines)]


def render_grants(grants: Grants) -> str:
    """The text of ``routheon-grants.yml``; ``parse_grants`` reads it back.

    Every name in it is validated first (service names, model names, hashes and hints have
    no quote, whitespace or template delimiter), so plain and single-quoted scalars are safe.
    """
    grants.validate()
    hop = f"http://{HOP_HOST}:{grants.hop_port}"
    lines = [
        "# Traefik dynamic configuration: which API keys may use which services, and their models.",
        "# Written by Routheon (`routheon key ...`, `routheon mapping add --model`); not by hand.",
        "# Keys are stored as sha256 (hex) and their last characters. Design: docs/model-routing.md",
        "http:",
        "  routers:",
        "    # Every Bearer key no key file routes: the plugin checks it, reads the body's model",
        f"    # and names the service in {HOP_HEADER}; the hop entry point routes on that.",
        f"    '{GRANTS_ROUTER}':",
        f"      rule: '{BEARER_RULE}'",
        f"      priority: {GRANTS_PRIORITY}",
        f"      service: '{HOP_SERVICE}'",
        "      entryPoints:",
        f"        - {grants.entry_point}",
        "      middlewares:",
        f"        - '{GRANTS_MIDDLEWARE}'",
        "    # The models a key may use, listed by routheon-server from this file.",
        f"    '{MODELS_ROUTER}':",
        f"      rule: '{MODELS_RULE}'",
        f"      priority: {MODELS_PRIORITY}",
        f"      service: '{SERVER_SERVICE}'",
        "      entryPoints:",
        f"        - {grants.entry_point}",
        "      middlewares:",
        f"        - '{MODELS_ROUTER}'",
    ]
    for service in grants.services:
        for suffix, middlewares, priority in (
            ("", (ERRORS_MIDDLEWARE, HOP_REQUEST_BODY), None),
            (FALLBACK_SUFFIX, (HOP_REQUEST_BODY,), 1),
        ):
            lines += [
                f"    '{hop_router(service.name)}{suffix}':",
                f"      rule: 'Header(`{HOP_HEADER}`, `{service.name}`)'",
                *([f"      priority: {priority}"] if priority is not None else []),
                f"      service: '{service.name}'",
                "      entryPoints:",
                f"        - {HOP_ENTRY_POINT}",
                "      middlewares:",
                *(f"        - '{middleware}'" for middleware in middlewares),
            ]
    service_lines = [" ".join((service.name, *service.models)) for service in grants.services]
    key_lines = [" ".join((grant.hash, grant.hint, *grant.services)) for grant in grants.keys]
    lines += [
        "  middlewares:",
        f"    '{GRANTS_MIDDLEWARE}':",
        "      plugin:",
        f"        {PLUGIN_NAME}:",
        "          # one line per service: NAME MODEL... (the names clients send as \"model\")",
        "          services: " + "\n".join(_block(service_lines, " " * 12)),
        "          # one line per key: SHA256-HEX LAST-CHARACTERS SERVICE...",
        "          keys: " + "\n".join(_block(key_lines, " " * 12)),
        "          # requests beyond the inference API get a 403, bodies over this many bytes a 413",
        f"          maxRequestBodyBytes: {MAX_REQUEST_BODY_BYTES}",
        "    # Tells routheon-server the request came through this router, so it lists the key's models;",
        "    # asked directly (no header, as routheon-server 1.0.x was) it lists every model.",
        f"    '{MODELS_ROUTER}':",
        "      headers:",
        "        customRequestHeaders:",
        f"          {GRANTED_MODELS_HEADER}: 'true'",
        "    # Reads each request body whole, up to the limit, before the second hop proxies it",
        "    # (docs/production.md): the hop is open to every local process.",
        *guard_lines(HOP_REQUEST_BODY),
        "  services:",
        f"    '{HOP_SERVICE}':",
        "      loadBalancer:",
        f"        serversTransport: '{HOP_SERVICE}'",
        "        servers:",
        f"          - url: '{hop}'",
        "  serversTransports:",
        "    # Traefik to itself over loopback: connections are kept, up to this many idle ones.",
        f"    '{HOP_SERVICE}':",
        f"      maxIdleConnsPerHost: {HOP_IDLE_CONNECTIONS}",
    ]
    return "\n".join(lines) + "\n"


def _load(text: str) -> Any:
    try:
        return yaml.load(text, Loader=SAFE_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise InputError(f"{GRANTS_FILE}: not valid YAML: {' '.join(str(exc).split())}") from None


def _dig(document: Any, *path: str) -> Any:
    node = document
    for step in path:
        if not isinstance(node, dict) or step not in node:
            raise InputError(f"{GRANTS_FILE}: {'.'.join(path)} is missing")
        node = node[step]
    return node


def _table(value: Any, what: str) -> list[list[str]]:
    if not isinstance(value, str):
        raise InputError(f"{GRANTS_FILE}: the {what} table must be text, one line per entry")
    return [line.split() for line in value.splitlines() if line.strip()]


def parse_grants(text: str) -> Grants:
    """Read a grants file; InputError names what is wrong (the file is never half-read)."""
    document = _load(text)
    config = _dig(document, "http", "middlewares", GRANTS_MIDDLEWARE, "plugin", PLUGIN_NAME)
    if not isinstance(config, dict):
        raise InputError(f"{GRANTS_FILE}: the plugin configuration must be a mapping")
    table = _table(config.get("services", ""), "services")
    services = tuple(GrantedService(fields[0], tuple(fields[1:])) for fields in table)
    keys = []
    for number, fields in enumerate(_table(config.get("keys", ""), "keys"), start=1):
        if len(fields) < 3:
            raise InputError(f"{GRANTS_FILE}: key line {number}: expected SHA256 HINT SERVICE...")
        keys.append(KeyGrant(fields[0], fields[1], tuple(fields[2:])))
    servers = _dig(document, "http", "services", HOP_SERVICE, "loadBalancer", "servers")
    url = servers[0].get("url") if isinstance(servers, list) and servers and isinstance(servers[0], dict) else None
    match = re.fullmatch(rf"http://{re.escape(HOP_HOST)}:(\d{{1,5}})", url) if isinstance(url, str) else None
    if match is None:
        raise InputError(f"{GRANTS_FILE}: service {HOP_SERVICE!r} must have one server http://{HOP_HOST}:PORT")
    router = _dig(document, "http", "routers", GRANTS_ROUTER)
    entry_points = router.get("entryPoints") if isinstance(router, dict) else None
    if not isinstance(entry_points, list) or len(entry_points) != 1 or not isinstance(entry_points[0], str):
        raise InputError(f"{GRANTS_FILE}: router {GRANTS_ROUTER!r} must name one entry point")
    grants = Grants(tuple(services), tuple(keys), int(match.group(1)), entry_points[0])
    grants.validate()
    return grants
