"""Finding what would make Traefik ignore a mappings folder, or route a key the wrong way.

Traefik drops the whole folder when one file is invalid and only logs it, so a revoked key
keeps working and a new key never starts. This module names each such problem with its file
and line before that happens; ``routheon mapping check`` prints the findings and
routheon-server can report them on ``/health``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


from routheon.keys import InvalidKeyError, validate_key
from routheon.mappings import (
    ERRORS_MIDDLEWARE,
    HEALTH_PATH,
    KeyLines,
    MappingFile,
    MappingFormatError,
    is_mapping_name,
    parse_mapping,
    read_mapping_text,
)
from routheon.rules import selects_by_key, rule_keys

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem: where it is, how bad it is, and what to do about it."""

    path: Path
    message: str
    severity: str = ERROR
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.severity}: {self.message}"


def _check_file(path: Path) -> tuple[MappingFile | None, KeyLines | None, list[Finding]]:
    findings: list[Finding] = []
    try:
        text, mode = read_mapping_text(path)
    except FileNotFoundError:
        return None, None, []  # removed (or rotated) since the folder was listed: nothing to check
    except MappingFormatError as exc:
        return None, None, [Finding(path, str(exc))]
    except (OSError, UnicodeDecodeError) as exc:
        return None, None, [Finding(path, f"cannot read: {exc}")]
    try:
        mapping = parse_mapping(text, path)
    except MappingFormatError as exc:
        return None, None, [Finding(path, str(exc), line=exc.line)]
    lines = KeyLines(text)
    for dotted, duplicate_line in lines.duplicates:
        findings.append(Finding(path, f"{dotted} is defined twice; Traefik rejects the file", line=duplicate_line))
    for number, content in enumerate(text.splitlines(), start=1):
        if "{{" in content:
            findings.append(
                Finding(path, "'{{' starts a Go template: Traefik rewrites it before reading the file", line=number)
            )
    if mapping.key_clauses() and mode & 0o004:
        findings.append(Finding(path, "holds API keys but every user can read it (chmod o-rwx)", WARNING))
    for router in mapping.routers:
        line = lines.get("http", "routers", router.name)
        clauses = rule_keys(router.rule)
        if clauses is None:
            if selects_by_key(router.rule):
                findings.append(
                    Finding(
                        path, f"router {router.name!r}: rule not understood, its keys are not checked", WARNING, line
                    )
                )
            continue
        for clause in clauses:
            if clause.regex and not clause.literal:
                findings.append(
                    Finding(
                        path,
                        f"router {router.name!r}: HeaderRegexp rule reads the key as a regular expression,"
                        " so other keys match it too; rewrite it with `routheon mapping add`",
                        ERROR,
                        line,
                    )
                )
            elif clause.regex:
                findings.append(
                    Finding(
                        path,
                        f"router {router.name!r}: seed-format HeaderRegexp rule; it works for this key,"
                        " but Header(`Authorization`, `Bearer KEY`) matches keys literally",
                        WARNING,
                        line,
                    )
                )
            else:
                try:
                    validate_key(clause.key)
                except InvalidKeyError as exc:
                    findings.append(Finding(path, f"router {router.name!r}: {exc}", ERROR, line))
    return mapping, lines, findings


Checked = list[tuple[MappingFile, KeyLines]]
Definitions = dict[str, dict[str, list[Path]]]


def _definitions(checked: Checked) -> Definitions:
    """Which files define each router, service and middleware name."""
    defined: Definitions = {"routers": {}, "services": {}, "middlewares": {}}
    for mapping, _ in checked:
        for section, names in (
            ("routers", [router.name for router in mapping.routers]),
            ("services", [service.name for service in mapping.services]),
            ("middlewares", list(mapping.middlewares)),
        ):
            for name in names:
                defined[section].setdefault(name, []).append(mapping.path)
    return defined


def _names_defined_twice(defined: Definitions, lines_of: dict[Path, KeyLines]) -> list[Finding]:
    return [
        Finding(
            path,
            f"{section[:-1]} {name!r} is also defined in {paths[0].name}; Traefik uses only one of them",
            ERROR,
            lines_of[path].get("http", section, name),
        )
        for section, entries in defined.items()
        for name, paths in entries.items()
        for path in paths[1:]
    ]


def _dangling_references(checked: Checked, defined: Definitions) -> list[Finding]:
    """Routers naming a service or middleware no file defines: Traefik disables them."""
    findings: list[Finding] = []
    for mapping, lines in checked:
        for router in mapping.routers:
            line = lines.get("http", "routers", router.name)
            if "@" not in router.service and router.service not in defined["services"]:
                message = f"router {router.name!r}: service {router.service!r} is not defined"
                findings.append(Finding(mapping.path, message, ERROR, line))
            for middleware in router.middlewares:
                if "@" not in middleware and middleware not in defined["middlewares"]:
                    message = (
                        f"router {router.name!r}: middleware {middleware!r} is not defined,"
                        " so Traefik disables this router and its keys do not route"
                    )
                    findings.append(Finding(mapping.path, message, ERROR, line))
    return findings


def _key_router_warnings(checked: Checked, error_pages: bool) -> list[Finding]:
    """Key routers that lack what Routheon-written ones have: error pages, whole request bodies."""
    readers = {name for mapping, _ in checked for name in mapping.body_readers}
    findings: list[Finding] = []
    for mapping, lines in checked:
        for router in {router for router, _ in mapping.key_clauses()}:
            line = lines.get("http", "routers", router.name)
            if error_pages and ERRORS_MIDDLEWARE not in router.middlewares:
                message = (
                    f"router {router.name!r} does not use {ERRORS_MIDDLEWARE}: a down backend answers"
                    " plain-text 'Bad Gateway' instead of an OpenAI error (re-run `routheon mapping add`)"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
            if not readers.intersection(name.removesuffix("@file") for name in router.middlewares):
                message = (
                    f"router {router.name!r} passes request bodies on as they arrive: under CPU load Traefik"
                    " then cuts one or two streamed answers in a hundred (docs/production.md);"
                    " re-run `routheon mapping add --replace`"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
    return findings


def _shared_keys(checked: Checked, lines_of: dict[Path, KeyLines]) -> list[Finding]:
    """Keys routed by more than one router: which backend gets them is up to Traefik."""
    owners: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for mapping, _ in checked:
        for router, clause in mapping.key_clauses():
            owners[clause.key].append((mapping.path, router.name))
    findings: list[Finding] = []
    for (first_path, first_router), *others in (found for found in owners.values() if len(found) > 1):
        for path, router_name in others:
            message = f"router {router_name!r}: an API key here is also routed by {first_router!r} in {first_path.name}"
            findings.append(Finding(path, message, ERROR, lines_of[path].get("http", "routers", router_name)))
    return findings


def _cross_file(checked: Checked) -> list[Finding]:
    lines_of = {mapping.path: lines for mapping, lines in checked}
    defined = _definitions(checked)
    findings = _names_defined_twice(defined, lines_of)
    findings += _dangling_references(checked, defined)
    findings += _shared_keys(checked, lines_of)
    findings += _key_router_warnings(checked, error_pages=ERRORS_MIDDLEWARE in defined["middlewares"])
    return findings


def _reachable(url: str, timeout: float) -> str | None:
    """None when something answers HTTP at ``url``'s health path, else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + HEALTH_PATH, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)


def _connect_findings(checked: Checked, timeout: float) -> list[Finding]:
    targets = [
        (mapping.path, lines.get("http", "services", service.name), service.name, url)
        for mapping, lines in checked
        for service in mapping.services
        for url in service.urls
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(lambda target: _reachable(target[3], timeout), targets))
    return [
        Finding(path, f"service {name!r}: backend {url} does not answer: {reason}", WARNING, line)
        for (path, line, name, url), reason in zip(targets, reasons, strict=True)
        if reason is not None
    ]


@dataclass(frozen=True)
class FolderCheck:
    """One read of a folder: its findings, and the files that parsed along the way.

    routheon-server needs both every couple of seconds; getting the parsed files from the
    same pass spares it reading and parsing the folder a second time.
    """

    exists: bool
    files: tuple[MappingFile, ...]
    findings: tuple[Finding, ...]


def inspect_folder(folder: str | os.PathLike[str], *, connect: bool = False, timeout: float = 2.0) -> FolderCheck:
    """Check every file of ``folder``, as ``check_folder`` does, keeping the parsed files."""
    folder = Path(folder)
    missing = FolderCheck(False, (), (Finding(folder, "the mappings folder does not exist"),))
    if not folder.is_dir():
        return missing
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except FileNotFoundError:  # removed since is_dir() looked
        return missing
    findings: list[Finding] = []
    checked: Checked = []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            findings.append(
                Finding(path, "Traefik also reads the files in this subfolder; they are not checked", WARNING)
            )
        elif entry.name.lower().endswith(".toml"):
            findings.append(Finding(path, "Traefik reads this TOML file; it is not checked", WARNING))
        elif is_mapping_name(entry.name):
            mapping, lines, problems = _check_file(path)
            findings += problems
            if mapping is not None and lines is not None:
                checked.append((mapping, lines))
    findings += _cross_file(checked)
    if connect:
        findings += _connect_findings(checked, timeout)
    findings.sort(key=lambda finding: (finding.path.name, finding.line or 0))
    return FolderCheck(True, tuple(mapping for mapping, _ in checked), tuple(findings))


def check_folder(folder: str | os.PathLike[str], *, connect: bool = False, timeout: float = 2.0) -> list[Finding]:
    """Every problem of a mappings folder, errors and warnings, in file order."""
    return list(inspect_folder(folder, connect=connect, timeout=timeout).findings)


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(finding.severity == ERROR for finding in findings)
