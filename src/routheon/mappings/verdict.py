"""Traefik's own verdict on a mappings folder: the ``traefik`` binary, run briefly on a copy.

Whether Traefik applies a folder is decided by Traefik's parser (Go templates, Go's YAML and
TOML readers, strict field names, its duration and middleware types), and no re-implementation
agrees with it on every input: a file Routheon reads fine may make Traefik freeze the whole
folder, and the other way round. So the verdict comes from the same binary that routes: it is
started on a private copy of the folder with a throw-away static configuration (loopback
only, random ports, the file provider without watching), and asked:

- did the file provider reject the folder, and with which error (its log), or
- which routers did it build from it, with which rules, enabled or not (its API).

It takes a fraction of a second for a normal folder and is bounded by a timeout on any input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from routheon.mappings.folder import ERROR, WARNING, Finding, Folder, read_plain_file, traefik_paths
from routheon.mappings.format import (
    ENTRY_POINT,
    ERRORS_MIDDLEWARE,
    InputError,
    MappingFormatError,
    Router,
    fallback_router,
)
from routheon.mappings.grants import (
    GRANTS_FILE,
    HOP_ENTRY_POINT,
    HOP_HEADER,
    HOP_HOST,
    KEYLESS_ROUTERS,
    PLUGIN_MODULE,
    PLUGIN_NAME,
    SERVER_SERVICE,
    parse_grants,
)
from routheon.mappings.keys import redact, secrets_in
from routheon.mappings.rules import rule_keys, selects_by_key
from routheon.loopback import PLUGINS_DIR, free_port, traefik_dir
from routheon.supervisor import StartError, start_child

log = logging.getLogger(__name__)

TRAEFIK_ENV = "ROUTHEON_TRAEFIK"
# --traefik none, or $ROUTHEON_TRAEFIK=none without the flag: no verdict is asked
TRAEFIK_OFF = "none"
DEFAULT_TRAEFIK_CONFIG = "/etc/traefik/traefik.yml"
DEFAULT_TIMEOUT = 20.0
_COPY_NAME = "mappings"
_REJECTED = "Cannot start the provider *file.Provider"
_RECEIVED = "Configuration received"


# What a write command is about to do: new content per path, or None for a removal.
Changes = Mapping[Path, "bytes | None"]


class VerdictUnavailable(Exception):
    """Traefik could not be asked (not installed, would not start, no answer in time)."""


@dataclass(frozen=True)
class RouterState:
    """One HTTP router as Traefik built it from the folder."""

    name: str
    rule: str
    service: str
    entry_points: tuple[str, ...]
    enabled: bool
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """What Traefik made of a folder: applied or rejected (and why), and the routers it built."""

    version: str
    applied: bool
    reason: str = ""
    routers: tuple[RouterState, ...] = ()
    # how long Traefik took to answer, for the log
    seconds: float = field(default=0.0, compare=False)

    def describe(self) -> str:
        traefik = f"Traefik {self.version}".strip()
        if self.applied:
            return f"{traefik} applies this folder"
        return (
            f"{traefik} rejects the whole folder (a running Traefik keeps its last good state,"
            f" one started now routes nothing): {self.reason}"
        )


def traefik_off(explicit: str | None = None) -> bool:
    """Whether Traefik's verdict is turned off: the flag says 'none', or $ROUTHEON_TRAEFIK does and no flag is given.

    One answer for the routheon command and routheon-server: the variable used to turn the
    verdict off for the command only, and routheon-server tried to run a binary named 'none'.
    """
    return (explicit or os.environ.get(TRAEFIK_ENV)) == TRAEFIK_OFF


def find_traefik(explicit: str | None = None) -> str | None:
    """The traefik binary to ask: ``explicit``, else $ROUTHEON_TRAEFIK, PATH, or beside this Python.

    The last covers ``pip install '.[traefik]'`` in a virtualenv that is not activated. None
    when there is none, or when the verdict is off (``traefik_off``).
    """
    if traefik_off(explicit):
        return None
    for candidate in (explicit, os.environ.get(TRAEFIK_ENV)):
        if candidate:
            return candidate
    on_path = shutil.which("traefik")
    if on_path:
        return on_path
    beside = Path(sys.executable).parent / "traefik"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _entry_points(static_config: Path | None) -> dict[str, Any]:
    """The ``entryPoints`` section of a Traefik static file ({} when there is no file)."""
    if static_config is None or not static_config.is_file():
        return {}
    try:
        document = yaml.safe_load(static_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VerdictUnavailable(f"cannot read the Traefik static configuration {static_config}: {exc}") from None
    entry_points = document.get("entryPoints") if isinstance(document, dict) else None
    return entry_points if isinstance(entry_points, dict) else {}


def entry_points_of(static_config: Path | None) -> tuple[str, ...]:
    """The entry point names of a Traefik static file, so routers naming them are built as in production."""
    return tuple(str(name) for name in _entry_points(static_config)) or (ENTRY_POINT,)


class HopError(InputError):
    """Traefik's static file has no routheon-hop entry point that the grants file can send to."""


_ADDRESS = re.compile(r"(?P<host>.*):(?P<port>\d{1,5})(?:/tcp)?")


def hop_port_of(static_config: Path) -> int:
    """The port of the ``routheon-hop`` entry point in a Traefik static file, for the grants file.

    HopError when it has none (Traefik would disable every hop router: no granted key routes)
    or when it listens beyond 127.0.0.1: the hop trusts the header that names a key's service,
    so whoever reaches it uses any service without a key (``":27181"`` is every interface).
    """
    settings = _entry_points(static_config).get(HOP_ENTRY_POINT)
    if settings is None:
        raise HopError(
            f"{static_config} has no {HOP_ENTRY_POINT} entry point, so Traefik disables the hop routers of"
            f" {GRANTS_FILE} and no granted key routes: add it as traefik/traefik.yml has it"
            f" (address: \"{HOP_HOST}:8081\", or another free port)"
        )
    address = str(settings.get("address", "")) if isinstance(settings, dict) else ""
    match = _ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise HopError(f"{static_config}: the {HOP_ENTRY_POINT} entry point's address {address!r} is not HOST:PORT")
    if match["host"] != HOP_HOST:
        where = "every interface" if match["host"] in ("", "0.0.0.0", "[::]", "::") else match["host"]
        raise HopError(
            f"{static_config}: the {HOP_ENTRY_POINT} entry point listens on {address!r} ({where}): it trusts the"
            f" {HOP_HEADER} header that names a key's service, so whoever reaches it uses any service without a"
            f" key; make it \"{HOP_HOST}:{match['port']}\" ({GRANTS_FILE} sends to {HOP_HOST} only)"
        )
    return int(match["port"])


def hop_findings(folder: Folder, static_config: Path | None) -> list[Finding]:
    """Whether the grants file sends granted requests where Traefik's routheon-hop listens.

    Written without --traefik-config, the grants file named 127.0.0.1:8081 whatever traefik.yml
    said: granted requests went to whatever listens there (on a shared host, another Traefik's
    hop, which trusts the header too). routheon-server's /health proves the hop end to end.
    """
    grants_file = next((mapping for mapping in folder.files if mapping.path == folder.path / GRANTS_FILE), None)
    if grants_file is None:
        return []
    try:
        grants = parse_grants(grants_file.text)
    except ValueError:
        return []  # reported with the file's other problems
    sends_to = f"{HOP_HOST}:{grants.hop_port}"
    if static_config is None:
        message = (
            f"sends granted requests to {sends_to}, unchecked: no Traefik static configuration to compare"
            f" (--traefik-config FILE; {DEFAULT_TRAEFIK_CONFIG} is not there). routheon-server's /health"
            " says whether the hop works"
        )
        return [Finding(grants_file.path, message, WARNING)]
    try:
        port = hop_port_of(static_config)
    except HopError as exc:
        return [Finding(static_config, str(exc))]
    if port != grants.hop_port:
        message = (
            f"sends granted requests to {sends_to}, but the {HOP_ENTRY_POINT} entry point of {static_config}"
            f" listens on {HOP_HOST}:{port}: they go to whatever listens on {sends_to}; `routheon mapping"
            f" upgrade --traefik-config {static_config}` rewrites {GRANTS_FILE} onto Traefik's port"
        )
        return [Finding(grants_file.path, message)]
    return []


def find_plugins(static_config: Path | None = None) -> Path | None:
    """The plugins-local folder holding Routheon's plugin: beside ``static_config`` (or the default
    /etc/traefik/traefik.yml), else the copy shipped with Routheon."""
    beside = [config.parent / PLUGINS_DIR for config in (static_config, Path(DEFAULT_TRAEFIK_CONFIG)) if config]
    for candidate in (*beside, traefik_dir() / PLUGINS_DIR):
        if (candidate / "src" / PLUGIN_MODULE / ".traefik.yml").is_file():
            return candidate
    return None


def _copy_file(source: Path) -> bytes:
    """What Traefik would read from ``source`` (following links, as it does), refusing what would hang it."""
    try:
        return read_plain_file(source, follow_links=True)[0]
    except MappingFormatError as exc:
        raise Unreadable(f"{source}: {exc} (Traefik would block or fail reading it)") from None
    except OSError as exc:
        raise Unreadable(f"{source}: cannot read: {exc.strerror}") from None


class Unreadable(Exception):
    """A file Traefik could not read either: the folder is rejected without asking."""


def copy_folder(folder: Path, target: Path, changes: Changes = {}) -> list[bytes]:
    """Copy the files Traefik reads from ``folder`` into ``target``, with ``changes`` applied; their contents.

    ``changes`` maps paths inside ``folder`` to their new content, or None for a removal: the
    state a write command is about to create, checked before it is written.
    """
    contents: dict[Path, bytes | None] = {path.relative_to(folder): None for path in traefik_paths(folder)}
    for relative in contents:
        contents[relative] = _copy_file(folder / relative)
    for path, data in changes.items():
        contents[path.relative_to(folder)] = data
    for relative, data in contents.items():
        if data is None:
            continue
        destination = target / relative
        destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(data)
    return [data for data in contents.values() if data is not None]


# routheon-verdict-PID-RANDOM: the process that made it, so the next run can tell it was left behind
_PRIVATE_NAME = re.compile(r"routheon-(?:verdict|change)-(?P<pid>\d+)-[^/]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _sweep_left_copies(tmp: Path) -> None:
    """Remove the private copies a killed routheon process left in ``tmp``: they hold keys.

    Only this user's folders named after a process that is gone; a pid taken again by another
    process keeps its folder until that one ends too.
    """
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    for entry in entries:
        match = _PRIVATE_NAME.fullmatch(entry.name)
        try:
            mine = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not _alive(int(match["pid"])):
            log.debug("removing %s, left by a routheon process that was killed", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


# the private copies that exist now, for remove_private_copies
_WORKDIRS: set[Path] = set()


@contextlib.contextmanager
def private_workdir(kind: str) -> Iterator[Path]:
    """A folder only this user can enter, for a copy of the mappings folder (it holds keys).

    Removed when the block ends, on an error too, and by ``remove_private_copies`` (the
    routheon command's SIGTERM and SIGHUP handler). What a ``kill -9`` leaves is removed by the
    next routheon command or verdict of routheon-server (the name carries this process's id).
    """
    tmp = Path(tempfile.gettempdir())
    _sweep_left_copies(tmp)
    workdir = Path(tempfile.mkdtemp(prefix=f"routheon-{kind}-{os.getpid()}-", dir=tmp))  # mode 0700
    _WORKDIRS.add(workdir)
    try:
        yield workdir
    finally:
        _WORKDIRS.discard(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def remove_private_copies() -> None:
    """Remove every private copy this process holds now, for a process about to end at once."""
    for workdir in list(_WORKDIRS):
        shutil.rmtree(workdir, ignore_errors=True)


def _static_config(directory: Path, entry_points: Iterable[str], api_port: int, plugin: bool) -> dict[str, Any]:
    # the hop entry point always: the grants file's hop routers name it (found or not in the file)
    points: dict[str, Any] = {name: {"address": "127.0.0.1:0"} for name in (*entry_points, HOP_ENTRY_POINT)}
    points["traefik"] = {"address": f"127.0.0.1:{api_port}"}
    return {
        **({"experimental": {"localPlugins": {PLUGIN_NAME: {"moduleName": PLUGIN_MODULE}}}} if plugin else {}),
        "entryPoints": points,
        "providers": {"file": {"directory": str(directory), "watch": False}},
        "api": {"insecure": True, "dashboard": False},
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
        "log": {"level": "DEBUG", "format": "json"},
    }


class _LogReader(threading.Thread):
    """Reads Traefik's JSON log until the file provider either rejects the folder or delivers it."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.done = threading.Event()
        self.version = ""
        self.rejected: str | None = None
        self.config: dict[str, Any] | None = None
        self.tail: list[str] = []

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", "replace")
            self.tail = [*self.tail[-19:], line.rstrip()]
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            message = entry.get("message", "")
            if entry.get("version") and not self.version:
                self.version = str(entry["version"])
            if message == _REJECTED:
                error = str(entry.get("error", "no reason given"))
                self.rejected = "; ".join(part.strip() for part in error.splitlines() if part.strip())
                self.done.set()
            elif message == _RECEIVED and entry.get("providerName") == "file":
                self.config = entry.get("config") or {}
                self.done.set()
        self.done.set()


def _rawdata(port: int, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/rawdata", timeout=timeout) as answer:
        data = json.load(answer)
    return data if isinstance(data, dict) else {}


def _file_routers(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    routers = raw.get("routers") or {}
    return {name.removesuffix("@file"): body for name, body in routers.items() if name.endswith("@file")}


def _router_states(config: dict[str, Any], port: int, deadline: float) -> tuple[RouterState, ...]:
    """The routers of the delivered configuration, with the status Traefik gave each once it built them."""
    expected = (config.get("http") or {}).get("routers") or {}
    if not expected:
        return ()
    built: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            built = _file_routers(_rawdata(port, max(0.1, deadline - time.monotonic())))
        except (OSError, ValueError):
            built = {}
        if built and all(body.get("status") for body in built.values()):
            break
        time.sleep(0.02)
    else:
        raise VerdictUnavailable("Traefik read the folder but did not build its routers in time")
    states = []
    for name, router in expected.items():
        body = built.get(name, {})
        status = body.get("status", "disabled")
        errors = tuple(str(error) for error in body.get("error") or ())
        if not body:
            errors = errors or ("no entry point of this router exists",)
        states.append(
            RouterState(
                name=name,
                rule=str(router.get("rule", "")),
                service=str(router.get("service", "")),
                entry_points=tuple(router.get("entryPoints") or ()),
                enabled=status == "enabled",
                errors=errors,
            )
        )
    return tuple(states)


def _run(traefik: str, workdir: Path, entry_points: tuple[str, ...], timeout: float) -> Verdict:
    started = time.monotonic()
    deadline = started + timeout
    port = free_port()
    config_path = workdir / "traefik.yml"
    plugin = (workdir / PLUGINS_DIR).is_dir()
    config_path.write_text(yaml.safe_dump(_static_config(workdir / _COPY_NAME, entry_points, port, plugin)))
    try:
        process = start_child("traefik", [traefik, f"--configFile={config_path}"], log_path=None, cwd=workdir)
    except StartError as exc:
        reason = exc.__cause__.strerror if isinstance(exc.__cause__, OSError) else None
        raise VerdictUnavailable(f"cannot run {traefik}: {reason or exc}") from None
    try:
        reader = _LogReader(process.stdout)
        reader.start()
        if not reader.done.wait(timeout):
            raise VerdictUnavailable(f"Traefik gave no verdict within {timeout:g} s")
        if reader.rejected is not None:
            return Verdict(reader.version, False, reader.rejected, seconds=time.monotonic() - started)
        if reader.config is None:
            tail = "\n".join(reader.tail[-5:])
            said = f":\n{tail}" if tail else ", printing nothing"
            raise VerdictUnavailable(f"Traefik stopped before reading the folder (exit {process.returncode}){said}")
        routers = _router_states(reader.config, port, deadline)
        return Verdict(reader.version, True, routers=routers, seconds=time.monotonic() - started)
    finally:
        # at once: this Traefik serves nobody, and its graceful stop waits 10 s for connections
        process.stop(signal.SIGKILL)


def ask_traefik(
    folder: Path,
    *,
    traefik: str,
    entry_points: tuple[str, ...] = (ENTRY_POINT,),
    changes: Changes = {},
    timeout: float = DEFAULT_TIMEOUT,
    static_config: Path | None = None,
) -> Verdict:
    """Traefik's verdict on ``folder`` as it is, or as it would be after ``changes``.

    Routheon's plugin (the grants file needs it) is taken from beside ``static_config``, see
    ``find_plugins``. Raises VerdictUnavailable when Traefik cannot be asked; the copy (it
    holds keys) is private and removed in every case.
    """
    with private_workdir("verdict") as workdir:
        copy = workdir / _COPY_NAME
        copy.mkdir(mode=0o700)
        plugins = find_plugins(static_config)
        if plugins is not None:
            shutil.copytree(plugins, workdir / PLUGINS_DIR)
        try:
            contents = copy_folder(folder, copy, changes)
        except Unreadable as exc:
            return Verdict("", False, str(exc))
        except FileNotFoundError:
            raise VerdictUnavailable(f"the mappings folder {folder} does not exist") from None
        secrets = set().union(*(secrets_in(data.decode("utf-8", "replace")) for data in contents))
        try:
            try:
                verdict = _run(traefik, workdir, entry_points, timeout)
            except VerdictUnavailable as first:
                if "exit" not in str(first):
                    raise
                log.debug("Traefik did not start; trying once more on another port")
                verdict = _run(traefik, workdir, entry_points, timeout)
        except VerdictUnavailable as exc:
            raise VerdictUnavailable(_told(str(exc), secrets, copy, folder)) from None
        return _redacted(verdict, secrets, copy, folder)


def _told(text: str, secrets: set[str], copy: Path, folder: Path) -> str:
    """What Traefik wrote, as Routheon may show it: about ``folder`` (not the copy), without keys or rules."""
    return redact(text.replace(str(copy), str(folder)), secrets)


def _redacted(verdict: Verdict, secrets: set[str], copy: Path, folder: Path) -> Verdict:
    """``verdict`` with every text Traefik wrote in it ``_told``: the one way Traefik's words enter Routheon.

    A rule is taken out whole wherever its router's errors quote it (it holds keys). Routers keep
    their rules: Routheon reads keys from them, and never shows them.
    """
    secrets = secrets | {router.rule for router in verdict.routers if router.rule}
    routers = tuple(
        replace(router, errors=tuple(_told(error, secrets, copy, folder) for error in router.errors))
        for router in verdict.routers
    )
    return replace(verdict, reason=_told(verdict.reason, secrets, copy, folder), routers=routers)


def _python_routers(folder: Folder) -> dict[str, tuple[Path, Router]]:
    return {router.name: (mapping.path, router) for mapping in folder.files for router in mapping.routers}


def _flagged(findings: Iterable[Finding], router: str) -> bool:
    return any(finding.severity == ERROR and f"router {router!r}" in finding.message for finding in findings)


def _router_findings(folder: Folder, verdict: Verdict) -> list[Finding]:
    """Routers Traefik disables, and key routers whose keys Routheon cannot list or revoke."""
    known = _python_routers(folder)
    enabled = {router.name for router in verdict.routers if router.enabled}
    findings: list[Finding] = []
    for router in verdict.routers:
        path, written = known.get(router.name, (folder.path, None))
        if (
            not router.enabled
            and all(f'"{ERRORS_MIDDLEWARE}@file" does not exist' in error for error in router.errors)
            and fallback_router(router.name) in enabled
        ):
            continue  # its keys route through the fallback until routheon-server.yml is in
        grants_router = path.name == GRANTS_FILE and router.name in KEYLESS_ROUTERS
        if (
            not router.enabled
            and grants_router
            and all(f'"{SERVER_SERVICE}@file" does not exist' in error for error in router.errors)
        ):
            continue  # /v1/models for granted keys waits for routheon-server.yml; the reader warns about it
        if not router.enabled:
            if not _flagged(folder.findings, router.name):
                message = f"router {router.name!r}: Traefik disables it ({'; '.join(router.errors)})"
                findings.append(Finding(path, message))
            continue
        if not selects_by_key(router.rule) or grants_router:
            continue  # the grants routers take every Bearer key: the plugin checks them by hash
        routed = rule_keys(router.rule)
        if written is None:
            reason = "is defined where Routheon cannot read it (a TOML file, a Go template or a file it reports)"
        elif routed is None:
            reason = "has a rule Routheon cannot take keys out of; write it as Header(`Authorization`, `Bearer KEY`)"
        elif [clause.key for clause in rule_keys(written.rule) or ()] != [clause.key for clause in routed]:
            reason = "routes other keys than its file shows (a Go template changes them)"
        else:
            continue
        message = f"router {router.name!r} routes API keys but {reason}: they cannot be listed or revoked"
        findings.append(Finding(path, message))
    return findings


def judged(folder: Folder, verdict: Verdict) -> Folder:
    """``folder``'s findings with Traefik's verdict in them: Traefik decides what it rejects.

    A file Routheon's reader refuses but Traefik applies is no longer reported as rejecting the
    folder; what Traefik rejects is reported even when Routheon's reader saw nothing wrong.
    """
    findings: list[Finding] = []
    for finding in folder.findings:
        if finding.rejects and verdict.applied:
            message = f"{finding.message} (Routheon cannot read it; Traefik {verdict.version} applies it)"
            finding = Finding(finding.path, message, WARNING, finding.line)
        findings.append(finding)
    if not verdict.applied:
        findings.insert(0, Finding(folder.path, verdict.describe(), ERROR, rejects=True))
    else:
        findings += _router_findings(folder, verdict)
    return Folder(folder.path, folder.files, tuple(findings), folder.exists)
