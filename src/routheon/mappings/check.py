"""Finding what would make Traefik ignore a mappings folder, or route a key the wrong way.

Traefik drops the whole folder when one file is invalid and only logs it, so a revoked key
keeps working and a new key never starts. This module names each such problem with its file
and line before that happens; ``routheon mapping check`` prints the findings and
routheon-server can report them on ``/health``.
"""

from __future__ import annotations

import http.client
import math
import os
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from routheon.mappings.folder import ERROR, WARNING, Finding, Folder, read_folder
from routheon.mappings.format import (
    ERRORS_MIDDLEWARE,
    HEALTH_PATH,
    InputError,
    KeyLines,
    MAX_REQUEST_BODY_BYTES,
    MappingFile,
    Router,
    fallback_router,
    without_template_comments,
)
from routheon.mappings.grants import (
    GRANTS_FILE,
    GRANTS_ROUTER,
    HOP_SERVICE,
    MODELS_ROUTER,
    SERVER_SERVICE,
    parse_grants,
)
from routheon.mappings.keys import InvalidKeyError, validate_key
from routheon.mappings.rules import rule_keys, selects_by_key
from routheon.mappings.keys import mask_url


def _file_findings(mapping: MappingFile, lines: KeyLines) -> list[Finding]:
    """What is wrong inside one file that parsed."""
    path = mapping.path
    findings = [
        Finding(path, f"{dotted} is defined twice; Traefik rejects the file", line=line, rejects=True)
        for dotted, line in lines.duplicates
    ]
    for number, content in enumerate(without_template_comments(mapping.text).splitlines(), start=1):
        if "{{" in content:
            message = (
                "'{{' starts a Go template: Traefik expands it before reading the file, Routheon reads"
                " the file as written"
            )
            findings.append(Finding(path, message, WARNING, number))
    if mapping.key_clauses() and mapping.mode & 0o004:
        findings.append(Finding(path, "holds API keys but every user can read it (chmod o-rwx)", WARNING))
    if is_grants(mapping):
        try:
            parse_grants(mapping.text)
        except ValueError as exc:
            findings.append(Finding(path, f"{exc} (the plugin may refuse it; rewrite it with `routheon key`)"))
    for router in mapping.routers:
        if is_grants_router(mapping, router):
            continue  # every Bearer key goes to the plugin, which checks keys by their hash
        findings += _rule_findings(path, router.name, router.rule, lines.get("http", "routers", router.name))
    return findings


def is_grants(mapping: MappingFile) -> bool:
    return mapping.path.name == GRANTS_FILE


def is_grants_router(mapping: MappingFile, router: Router) -> bool:
    """The grants file's routers for every Bearer key: their rules hold no key by design."""
    return is_grants(mapping) and router.name in (GRANTS_ROUTER, MODELS_ROUTER)


def _rule_findings(path: Path, router: str, rule: str, line: int | None) -> list[Finding]:
    clauses = rule_keys(rule)
    if clauses is None:
        if selects_by_key(rule):
            return [Finding(path, f"router {router!r}: rule not understood, its keys are not checked", WARNING, line)]
        return []
    findings = []
    for clause in clauses:
        if clause.regex and not clause.literal:
            message = (
                f"router {router!r}: HeaderRegexp rule reads the key as a regular expression,"
                " so other keys match it too; re-create it with `routheon mapping add --replace`"
            )
            findings.append(Finding(path, message, ERROR, line))
        elif clause.stale_guard:
            message = (
                f"router {router!r}: a key's guard (!HeaderRegexp) was written for another key, so Traefik refuses"
                " every request with it (was the key edited by hand?); write keys with `routheon mapping add --replace`"
            )
            findings.append(Finding(path, message, ERROR, line))
        elif clause.regex:
            message = (
                f"router {router!r}: HeaderRegexp rule in the format of routheon-server 1.0.x; it works for this key,"
                " but Header(`Authorization`, `Bearer KEY`) matches keys literally"
            )
            findings.append(Finding(path, message, WARNING, line))
        else:
            try:
                validate_key(clause.key)
            except InvalidKeyError as exc:
                findings.append(Finding(path, f"router {router!r}: {exc}", ERROR, line))
    return findings


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
                if is_grants_router(mapping, router) and router.service == SERVER_SERVICE:
                    message = (
                        f"router {router.name!r}: routheon-server.yml is not in the folder, so /v1/models with a"
                        " granted key is not answered from the grants"
                    )
                    findings.append(Finding(mapping.path, message, WARNING, line))
                    continue
                message = f"router {router.name!r}: service {router.service!r} is not defined"
                findings.append(Finding(mapping.path, message, ERROR, line))
            for middleware in router.middlewares:
                fallback = fallback_of(mapping, router)
                if middleware == ERRORS_MIDDLEWARE and middleware not in defined["middlewares"] and fallback:
                    message = (
                        f"router {router.name!r}: no file defines {ERRORS_MIDDLEWARE} (routheon-server.yml is not in"
                        f" the folder), so its keys route through {fallback.name!r}, without OpenAI error pages"
                    )
                    findings.append(Finding(mapping.path, message, WARNING, line))
                elif "@" not in middleware and middleware not in defined["middlewares"]:
                    message = (
                        f"router {router.name!r}: middleware {middleware!r} is not defined,"
                        " so Traefik disables this router and its keys do not route"
                    )
                    findings.append(Finding(mapping.path, message, ERROR, line))
    return findings


def fallback_of(mapping: MappingFile, router: Router) -> Router | None:
    """The router of the same file that routes ``router``'s keys while its error pages are missing."""
    for other in mapping.routers:
        if (
            other.name == fallback_router(router.name)
            and other.service == router.service
            and (
                other.rule == router.rule  # the grants file's hop routers: by service, not by key
                or (rule_keys(other.rule) is not None and rule_keys(other.rule) == rule_keys(router.rule))
            )
        ):
            return other
    return None


def _is_fallback(mapping: MappingFile, router: Router) -> bool:
    return any(fallback_of(mapping, other) == router for other in mapping.routers)


def _key_router_warnings(checked: Checked) -> list[Finding]:
    """Key routers that lack what Routheon-written ones have: error pages, one key per request, whole bodies."""
    readers = {name for mapping, _ in checked for name in mapping.body_readers}
    guards = {name for mapping, _ in checked for name in mapping.guards}
    findings: list[Finding] = []
    for mapping, lines in checked:
        for router in {router for router, _ in mapping.key_clauses()}:
            line = lines.get("http", "routers", router.name)
            clauses = rule_keys(router.rule) or ()
            # `mapping upgrade` rewrites exact keys; it leaves a rule that matches more to be re-created
            fix = (
                "run `routheon mapping upgrade`"
                if all(clause.literal and not clause.stale_guard for clause in clauses)
                else "re-create it with `routheon mapping add --replace`"
            )
            if ERRORS_MIDDLEWARE not in router.middlewares and not _is_fallback(mapping, router):
                message = (
                    f"router {router.name!r} does not use {ERRORS_MIDDLEWARE}: a down backend answers"
                    f" plain-text 'Bad Gateway' instead of an OpenAI error ({fix}, or"
                    " `routheon mapping add --replace` without --no-error-pages)"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
            guarded = all(clause.guarded or clause.stale_guard for clause in clauses)
            if not guarded and not _is_fallback(mapping, router):
                message = (
                    f"router {router.name!r} lets a second Authorization header ride along with one of its keys"
                    f" (Traefik matches any one value); {fix}"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
            used = {name.removesuffix("@file") for name in router.middlewares}
            if not readers & used:
                message = (
                    f"router {router.name!r} passes request bodies on as they arrive: under CPU load Traefik"
                    f" then cuts one or two streamed answers in a hundred (docs/production.md); {fix}"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
            if not guards & used:
                message = (
                    f"router {router.name!r} lets its keys reach every path of the backend (/slots, /metrics,"
                    f" POST /props) with request bodies of any size, where Routheon's guard allows the inference"
                    f" API only and {MAX_REQUEST_BODY_BYTES >> 20} MiB, and sends a request again that failed on a"
                    f" connection llama-server had closed (docs/production.md); {fix}"
                )
                findings.append(Finding(mapping.path, message, WARNING, line))
    return findings


def _shared_keys(checked: Checked, lines_of: dict[Path, KeyLines]) -> list[Finding]:
    """Keys routed to more than one service: which backend gets them is up to Traefik.

    Two routers of one file sending the same keys to one service (with and without error
    pages) are one route.
    """
    owners: dict[str, dict[tuple[Path, str], str]] = defaultdict(dict)
    for mapping, _ in checked:
        for router, clause in mapping.key_clauses():
            owners[clause.key].setdefault((mapping.path, router.service), router.name)
    findings: list[Finding] = []
    for found in (list(found.items()) for found in owners.values() if len(found) > 1):
        ((first_path, _), first_router), *others = found
        for (path, _), router_name in others:
            message = f"router {router_name!r}: an API key here is also routed by {first_router!r} in {first_path.name}"
            findings.append(Finding(path, message, ERROR, lines_of[path].get("http", "routers", router_name)))
    return findings


def _cross_file(checked: Checked) -> list[Finding]:
    lines_of = {mapping.path: lines for mapping, lines in checked}
    defined = _definitions(checked)
    findings = _names_defined_twice(defined, lines_of)
    findings += _dangling_references(checked, defined)
    findings += _shared_keys(checked, lines_of)
    findings += _key_router_warnings(checked)
    return findings


def _reachable(url: str, timeout: float) -> str | None:
    """None when something answers HTTP at ``url``'s health path, else why not.

    Credentials are left out of the request, so no error message can repeat them, and a URL
    Python cannot request (``http.client.InvalidURL``) is a reason, not a crash.
    """
    try:
        with urllib.request.urlopen(mask_url(url, "").rstrip("/") + HEALTH_PATH, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)


MAX_TIMEOUT = 3600.0


def _check_timeout(timeout: float) -> None:
    """Refuse a timeout sockets cannot take (inf, nan, huge) or that means no wait at all (0, negative)."""
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise InputError(
            f"the backend timeout (--timeout) must be more than 0 and at most {MAX_TIMEOUT:g} seconds, not {timeout:g}"
        )


def _connect_findings(checked: Checked, timeout: float) -> list[Finding]:
    _check_timeout(timeout)
    targets = [
        (mapping.path, lines.get("http", "services", service.name), service.name, url)
        for mapping, lines in checked
        for service in mapping.services
        for url in service.urls
        if not (is_grants(mapping) and service.name == HOP_SERVICE)  # Traefik itself, not a backend
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(lambda target: _reachable(target[3], timeout), targets))
    return [
        Finding(path, f"service {name!r}: backend {mask_url(url)} does not answer: {reason}", WARNING, line)
        for (path, line, name, url), reason in zip(targets, reasons, strict=True)
        if reason is not None
    ]


def _folder_mode_findings(folder: Path) -> list[Finding]:
    """The folder and subfolders Traefik reads that users other than the owner can write to.

    Whoever can add a file there can route any API key to a backend of their own (Traefik
    reads every file, and a router may outrank Routheon's). A sticky bit does not help: it
    only keeps others from removing or renaming files they do not own, not from adding one.
    """
    findings: list[Finding] = []
    for directory, _, _ in os.walk(folder):
        try:
            mode = os.lstat(directory).st_mode & 0o7777
        except OSError:
            continue
        if mode & 0o022:
            who = "every user" if mode & 0o002 else "its group"
            message = (
                f"the folder is writable by {who} (mode {mode:04o}): whoever can add a file here can route"
                f" any API key to a backend of their own; chmod go-w {directory}"
            )
            findings.append(Finding(Path(directory), message, WARNING))
    return findings


def inspect_folder(folder: str | os.PathLike[str], *, connect: bool = False, timeout: float = 2.0) -> Folder:
    """Read ``folder`` as Traefik does and add every finding: per file, across files, backends."""
    read = read_folder(folder)
    if not read.exists:
        return read
    checked: Checked = [(mapping, KeyLines(mapping.text)) for mapping in read.files]
    findings = list(read.findings)
    findings += _folder_mode_findings(read.path)
    for mapping, lines in checked:
        findings += _file_findings(mapping, lines)
    findings += _cross_file(checked)
    if connect:
        findings += _connect_findings(checked, timeout)
    findings.sort(key=lambda finding: (str(finding.path), finding.line or 0))
    return Folder(read.path, read.files, tuple(findings))


def check_folder(folder: str | os.PathLike[str], *, connect: bool = False, timeout: float = 2.0) -> list[Finding]:
    """Every problem of a mappings folder, errors and warnings, in file order."""
    return list(inspect_folder(folder, connect=connect, timeout=timeout).findings)


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(finding.severity == ERROR for finding in findings)
