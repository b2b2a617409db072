"""Changing a mappings folder safely while Traefik watches it.

Traefik re-reads the folder on every change and rejects all of it when one file is invalid,
so every write here is whole-file and atomic (a temporary file in the same folder, renamed
over the target), the old content is kept as ``NAME.yml.bak.TIMESTAMP`` (a name Traefik
ignores; only the newest few per file stay, as they hold revoked keys), and a lock file
serialises concurrent writers so no mapping is lost between one writer's read and another's
write. Files that hold keys are never world-readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from routheon.mappings.folder import read_folder, read_mapping_text
from routheon.mappings.format import (
    ERRORS_MIDDLEWARE,
    FALLBACK_PRIORITY,
    InputError,
    MappingFile,
    MappingFormatError,
    MappingSpec,
    parse_mapping,
    parse_rendered,
    fallback_router,
    load_first_document,
    render_mapping,
    request_body_middleware,
    unwritten_settings,
    validate_service_name,
)
from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, parse_grants, render_grants
from routheon.mappings.keys import mask_key
from routheon.mappings.rules import join_clauses, rule_keys

log = logging.getLogger(__name__)

LOCK_NAME = ".routheon.lock"
KEY_FILE_MODE = 0o640
#: Backups kept per mapping file after a change (``--backups``, ``ROUTHEON_BACKUPS``).
DEFAULT_BACKUPS = 5
#: The names ``backup`` gives: ``NAME.yml.bak.YYYYMMDD-HHMMSS`` with ``.N`` when one second holds several.
BACKUP_NAME = re.compile(
    r"(?P<file>[^./][^/]*\.ya?ml)\.bak\.(?P<stamp>\d{8}-\d{6})(?:\.(?P<count>[1-9]\d{0,5}))?"
)


class MappingConflictError(Exception):
    """A change that would overwrite or move something; the caller must ask for it explicitly."""


class UnsafeFileError(ValueError):
    """A symbolic link or special file where Routheon writes: acting on it would reach outside the folder.

    Routheon usually runs as root; a link planted in the folder would have it copy a file it
    points to into a backup (readable by Traefik's group), or create and open files elsewhere.
    """


def _open_no_follow(path: Path, flags: int, what: str) -> int:
    """``os.open`` that refuses a symbolic link or anything but a regular file at ``path``."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(
                f"{path} is a symbolic link: Routheon never follows links in the mappings folder;"
                f" replace it with {what}"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file: replace it with {what}")
    return fd


def _refuse_unsafe(path: Path) -> None:
    """Refuse to back up, replace or remove ``path`` when it is a link or not a regular file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafeFileError(
            f"{path} is a symbolic link: Routheon neither backs up, rewrites nor removes mapping files"
            " through links; put the file itself in the folder"
        )
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{path} is not a regular file; Routheon leaves it alone")


def _read_bytes(path: Path) -> bytes:
    """The content of a mapping file, read without following a link (see ``UnsafeFileError``)."""
    with os.fdopen(_open_no_follow(path, os.O_RDONLY, "the file itself"), "rb") as handle:
        return handle.read()


@dataclass(frozen=True)
class Change:
    """One thing done to the folder, for the operator to read."""

    action: str
    path: Path
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.path}" + (f" ({self.detail})" if self.detail else "")


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder for one read-modify-write.

    The lock file is never opened through a link: one planted there would have root create or
    open a file anywhere.
    """
    fd = _open_no_follow(folder / LOCK_NAME, os.O_RDONLY | os.O_CREAT, "an empty regular file, or remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = KEY_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` in one rename, so a reader sees the old or the new file.

    The file takes the folder's group (so a Traefik running as that group can read it) and
    ``mode`` before it gets its name; the temporary name never ends in ``.yml``.
    """
    folder = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            folder_gid = folder.stat().st_gid
            if os.fstat(handle.fileno()).st_gid != folder_gid:
                try:
                    os.fchown(handle.fileno(), -1, folder_gid)
                except PermissionError:
                    log.debug("cannot give %s the folder's group %d", path, folder_gid)
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def backup(path: Path) -> Path:
    """Copy ``path`` to a fresh ``NAME.bak.TIMESTAMP`` beside it, as private as a key file.

    The copy gets mode 0640 or the original's mode where that is stricter (a 0600 file is not
    opened to the folder's group by its backup).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.bak.{stamp}")
    # past the highest ``.N`` of this second, not into a gap that pruning left: names sort by age
    taken = [
        int(match["count"] or 0)
        for name in os.listdir(path.parent)
        if (match := BACKUP_NAME.fullmatch(name)) and match["file"] == path.name and match["stamp"] == stamp
    ]
    if taken:
        target = path.with_name(f"{path.name}.bak.{stamp}.{max(taken) + 1}")
    write_atomic(target, _read_bytes(path), mode=KEY_FILE_MODE & stat.S_IMODE(path.lstat().st_mode))
    return target


def _saved(path: Path, keep: int) -> str:
    """Back ``path`` up unless no backup is to be kept; the words that say where the old content went."""
    if keep <= 0:
        return "no backup kept"
    return f"old content in {backup(path).name}"


def prune_backups(folder: Path, keep: int, files: Iterable[str] | None = None) -> list[Change]:
    """Delete all but the ``keep`` newest backups of each mapping file (of ``files`` only, when given).

    Only regular files in ``folder`` itself whose names are exactly those ``backup`` gives are
    touched: never a symlink (the link is not followed, nor removed), a subfolder, or any other
    name. Kept backups that every user could read lose that access.
    """
    if keep < 0:
        raise ValueError(f"the number of backups to keep must be 0 or more, not {keep}")
    wanted = None if files is None else set(files)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found: dict[str, list[tuple[str, int, str]]] = {}
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                match = BACKUP_NAME.fullmatch(entry.name)
                if match is None or (wanted is not None and match["file"] not in wanted):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                found.setdefault(match["file"], []).append((match["stamp"], int(match["count"] or 0), entry.name))
        changes: list[Change] = []
        for name in sorted(found):
            newest_first = sorted(found[name], reverse=True)
            for _, _, kept in newest_first[:keep]:
                try:
                    fd = os.open(kept, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError:  # replaced by a symlink meanwhile, or unreadable: leave it
                    continue
                try:
                    mode = stat.S_IMODE(os.fstat(fd).st_mode)
                    if mode & 0o007:
                        os.fchmod(fd, mode & ~0o007)
                        changes.append(Change("tightened", folder / kept, "backup mode: no world access"))
                finally:
                    os.close(fd)
            for _, _, old in newest_first[keep:]:
                os.unlink(old, dir_fd=dir_fd)
                kept_words = f"the {keep} newest kept" if keep else "none kept"
                changes.append(Change("deleted", folder / old, f"old backup of {name}; {kept_words}"))
        return changes
    finally:
        os.close(dir_fd)


def _with_pruning(folder: Path, changes: list[Change], backups: int) -> list[Change]:
    """``changes``, then the old backups of the files they touched, deleted (under the caller's lock)."""
    return changes + prune_backups(folder, backups, {change.path.name for change in changes})


def _restrict_mode(path: Path) -> bool:
    """Take away world access from an existing key file; True when it had any."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o007:
        path.chmod(mode & ~0o007)
        return True
    return False


def _parsed_files(folder: Path) -> list[MappingFile]:
    return list(read_folder(folder).files)


def _without_keys(
    path: Path, keys: set[str], used_elsewhere: set[str], keep: frozenset[str] = frozenset()
) -> dict[str, Any] | None:
    """The document of ``path`` with ``keys`` taken out of its rules; None when nothing is left.

    Routers left without a key go, and so do services no remaining router uses (but those in
    ``keep``, which the grants file routes to), and middlewares
    that no remaining router here nor any router in ``used_elsewhere``'s files uses (such as
    the file's own request-body middleware); clauses that stay are kept as written, 1.0.x-format
    ones included.
    """
    document = load_first_document(read_mapping_text(path)[0])
    http = document["http"]
    routers: dict[str, Any] = http.get("routers") or {}
    for name in list(routers):
        clauses = rule_keys(routers[name]["rule"])
        if clauses is None:
            continue
        kept = [clause.text for clause in clauses if clause.key not in keys]
        if kept:
            routers[name]["rule"] = join_clauses(kept)
        else:
            del routers[name]
    services: dict[str, Any] = http.get("services") or {}
    used = {router.get("service") for router in routers.values()} | keep
    for name in list(services):
        if name not in used:
            del services[name]
    used_here = {middleware for router in routers.values() for middleware in router.get("middlewares") or ()}
    middlewares: dict[str, Any] = http.get("middlewares") or {}
    for name in list(middlewares):
        if not {name, f"{name}@file"} & (used_here | used_elsewhere):
            del middlewares[name]
    if not routers and not middlewares and not services:
        return None
    for section in ("routers", "middlewares"):
        if not http.get(section):
            http.pop(section, None)
    return document


@dataclass(frozen=True)
class _Step:
    """One file a change will write (``data``) or retire (None), planned before anything is written."""

    path: Path
    data: bytes | None
    action: str
    detail: str = ""
    backed_up: bool = True


#: Asked under the folder lock with the content every planned step gives its file (None: the
#: file goes) before anything is written; raising stops the change with the folder untouched.
#: The write commands use it to have Traefik judge the folder as it will be.
Confirm = Callable[[Mapping[Path, bytes | None]], None]


def _apply(steps: list[_Step], confirm: Confirm | None, backups: int) -> list[Change]:
    """Write the planned steps in order, once ``confirm`` accepts their result; back up what they replace.

    ``confirm`` is asked even when there is nothing to write: an unchanged file in a folder
    Traefik rejects is not in effect either.
    """
    if confirm is not None:
        confirm({step.path: step.data for step in steps})
    changes: list[Change] = []
    for step in steps:
        detail = step.detail
        if step.backed_up and step.path.exists():
            saved = _saved(step.path, backups)
            detail = f"{detail}; {saved}" if detail else saved
        if step.data is None:
            step.path.unlink()
        else:
            write_atomic(step.path, step.data)
        changes.append(Change(step.action, step.path, detail))
    return changes


def _take_keys(
    files: Iterable[MappingFile], keys: set[str], skip: Path | None, keep: frozenset[str] = frozenset()
) -> list[_Step]:
    """Plan taking ``keys`` out of every file but ``skip``: a file is rewritten, or retired when emptied.

    Services named in ``keep`` stay defined: keys granted them in the grants file still use them.

    When one step would take away a service or middleware that a router of another file uses,
    nothing is planned: the whole change is refused.
    """
    files = list(files)
    steps: list[_Step] = []
    for mapping in files:
        if mapping.path == skip:
            continue
        found = {clause.key for _, clause in mapping.key_clauses()} & keys
        if not found:
            continue
        elsewhere = {
            middleware
            for other in files
            if other.path != mapping.path
            for router in other.routers
            for middleware in router.middlewares
        }
        document = _without_keys(mapping.path, found, elsewhere, keep)
        http = document["http"] if document is not None else {}
        kept = frozenset(http.get("services") or ()) | frozenset(http.get("middlewares") or ())
        users = _users_of(files, mapping.path, kept)
        if users:
            raise MappingConflictError(
                f"taking the key out of {mapping.path.name} removes what {', '.join(users)} use; Traefik would"
                " disable their routers: change those files first"
            )
        _refuse_unsafe(mapping.path)
        if document is None:
            steps.append(_Step(mapping.path, None, "retired", "its keys moved or removed"))
            continue
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=10**6)
        reread = parse_mapping(text, mapping.path)
        if {clause.key for _, clause in reread.key_clauses()} & found:
            raise MappingFormatError(f"{mapping.path}: could not take the key out; nothing was written")
        steps.append(_Step(mapping.path, text.encode("utf-8"), "rewrote", f"{len(found)} key(s) taken out"))
    return steps


def _users_of(files: list[MappingFile], target: Path, kept: frozenset[str] = frozenset()) -> list[str]:
    """Other files whose routers use a service or middleware that ``target`` defines.

    Names in ``kept`` stay defined after the change, so their users do not count.
    """
    provided: set[str] = set()
    for mapping in files:
        if mapping.path == target:
            provided = ({service.name for service in mapping.services} | set(mapping.middlewares)) - kept
    return sorted(
        {
            mapping.path.name
            for mapping in files
            if mapping.path != target
            for router in mapping.routers
            if router.service in provided or provided & set(router.middlewares)
        }
    )


def defines_error_pages(files: Iterable[MappingFile]) -> bool:
    """Whether some file defines the errors middleware that key routers may reference."""
    return any(ERRORS_MIDDLEWARE in mapping.middlewares for mapping in files)


def _says_the_same(mapping: MappingFile, spec: MappingSpec) -> bool:
    """Whether ``mapping`` routes what ``spec`` routes, only written in an older format.

    Such as a file of an earlier Routheon (without guards or request-body middleware) or of
    routheon-server 1.0.x with exact keys (none edited by hand out of its guard): rewriting it
    changes no one's access, so re-running the same ``mapping add`` after an upgrade rewrites
    it without ``--replace``. Anything more (other keys, URLs, entry points, middlewares, a
    priority, a setting Routheon does not write, a rule that is not only keys) needs it. The
    file may define no middleware but its request-body reader: the errors middleware is
    routheon-server.yml's, and a definition of it here may be what other files' routers use.
    """
    own = {ERRORS_MIDDLEWARE, request_body_middleware(spec.service)}
    clauses = [rule_keys(router.rule) for router in mapping.routers]
    return (
        all(found is not None for found in clauses)
        and all(clause.literal and not clause.stale_guard for found in clauses for clause in found or ())
        and mapping.keys() == list(spec.keys)
        and mapping.urls == tuple(url.rstrip("/") for url in spec.urls)
        and {service.name for service in mapping.services} == {spec.service}
        and all(
            router.service == spec.service
            and router.entry_points == (spec.entry_point,)
            and {name.removesuffix("@file") for name in router.middlewares} <= own
            and router.priority in (None, FALLBACK_PRIORITY if router.name == fallback_router(spec.service) else None)
            for router in mapping.routers
        )
        and set(mapping.middlewares) <= {request_body_middleware(spec.service)} & set(mapping.body_readers)
        and not unwritten_settings(mapping.text)
    )


def add_mapping(
    folder: Path,
    spec: MappingSpec,
    *,
    replace: bool = False,
    backups: int = DEFAULT_BACKUPS,
    confirm: Confirm | None = None,
    models: tuple[str, ...] | None = None,
    hop_port: int | None = None,
    keep_keys: bool = False,
) -> list[Change]:
    """Write ``spec`` as ``SERVICE.yml``, moving its keys out of any other file and the grants.

    Overwriting a file that routes something else (``_says_the_same``) or moving a key needs
    ``replace``. ``models`` declares the model names the service answers to in the grants file
    (None leaves them as they are);
    ``keep_keys`` gives a ``spec`` without keys the keys ``SERVICE.yml`` routes, read under
    the lock (read before it, a key revoked meanwhile would come back). Each file touched
    keeps its ``backups`` newest backups.
    """
    spec.validate()
    target = folder / spec.file_name
    with folder_lock(folder):
        files = _parsed_files(folder)
        if keep_keys and not spec.keys:
            routed = next((mapping.keys() for mapping in files if mapping.path == target), [])
            spec = dataclasses.replace(spec, keys=tuple(routed))
        own_names = {spec.service, fallback_router(spec.service)}
        for mapping in files:
            if mapping.path == target:
                continue
            names = {router.name for router in mapping.routers} | {service.name for service in mapping.services}
            if own_names & names:
                raise MappingConflictError(
                    f"{mapping.path} already defines a router or service named {spec.service!r}; "
                    "remove it or choose another --service"
                )
        before = read_grants(folder)
        grants = _on_hop_port(before, hop_port)
        elsewhere = sorted(
            {
                mapping.path.name
                for mapping in files
                if mapping.path != target
                and {clause.key for _, clause in mapping.key_clauses()} & set(spec.keys)
            }
            | ({GRANTS_FILE} if any(grants.key(key) for key in spec.keys) else set())
        )
        if elsewhere and not replace:
            raise MappingConflictError(
                f"an API key is already used in {', '.join(elsewhere)}; pass --replace to move it to {spec.service}"
            )
        text = render_mapping(spec)
        parse_rendered(text, spec, target)
        data = text.encode("utf-8")
        _refuse_unsafe(target)
        write: _Step | None = _Step(target, data, "wrote", backed_up=False)
        if target.exists():
            same = any(mapping.path == target and _says_the_same(mapping, spec) for mapping in files)
            if _read_bytes(target) == data:
                write = None
            elif not replace and not same:
                raise MappingConflictError(f"{target} exists with other content; pass --replace to replace it")
            elif users := _users_of(files, target, kept=frozenset({spec.service})):
                raise MappingConflictError(
                    f"{target.name} defines what {', '.join(users)} use; replacing it would make Traefik "
                    "disable their routers: choose another --service"
                )
            else:
                write = _Step(target, data, "upgraded" if same else "replaced")
        # Keys leave their old files before SERVICE.yml is written: a crash (kill -9) between two
        # writes leaves a key routed by no router for a moment, never by two.
        for key in spec.keys:
            grants = grants.revoke(key)
        if models is not None:
            grants = grants.with_service(GrantedService(spec.service, models))
        steps = _take_keys(files, set(spec.keys), skip=target, keep=_declared(grants))
        steps += _grants_step(folder, before, grants)
        changes = _apply(steps if write is None else [*steps, write], confirm, backups)
        if write is None:
            detail = "mode tightened to no world access" if _restrict_mode(target) else ""
            changes.append(Change("unchanged", target, detail))
        return _with_pruning(folder, changes, backups)


def remove_service(
    folder: Path,
    service: str,
    *,
    backups: int = DEFAULT_BACKUPS,
    confirm: Confirm | None = None,
    hop_port: int | None = None,
) -> list[Change]:
    """Retire ``SERVICE.yml``: its content goes to a backup, its keys stop routing, its grants go."""
    validate_service_name(service)  # never a path: "../x" must not reach a file outside the folder
    target = folder / f"{service}.yml"
    with folder_lock(folder):
        _refuse_unsafe(target)
        if not target.exists():
            raise FileNotFoundError(f"no mapping file {target}")
        files = [mapping for mapping in _parsed_files(folder) if mapping.path.name != GRANTS_FILE]
        users = _users_of(files, target)
        if users:
            raise MappingConflictError(
                f"{target.name} defines what {', '.join(users)} use; Traefik would disable their routers "
                "and their keys would stop working: change those files first"
            )
        before = read_grants(folder)
        after = _without_service(_on_hop_port(before, hop_port), service)
        steps = [*_grants_step(folder, before, after), _Step(target, None, "removed")]
        return _with_pruning(folder, _apply(steps, confirm, backups), backups)


def _spec_of(mapping: MappingFile) -> MappingSpec:
    """The spec of the keys, URLs and entry point ``mapping`` routes; InputError saying why there is none."""
    services = {service.name for service in mapping.services}
    entry_points = {router.entry_points for router in mapping.routers}
    if len(services) != 1:
        raise InputError(f"it defines {len(services)} services, where Routheon writes one per file")
    if len(entry_points) != 1 or len(next(iter(entry_points))) != 1:
        raise InputError("its routers do not all name the same one entry point")
    ((entry_point,),) = entry_points
    error_pages = not mapping.body_readers or any(
        ERRORS_MIDDLEWARE in {name.removesuffix("@file") for name in router.middlewares} for router in mapping.routers
    )
    spec = MappingSpec(services.pop(), mapping.urls, tuple(mapping.keys()), error_pages, entry_point)
    spec.validate()
    return spec


def _upgrade_of(mapping: MappingFile) -> MappingSpec | str:
    """The spec that writes what the key file ``mapping`` routes in the current format, or why
    there is none and what to do instead.

    There is one only for a file that says no more than "these keys reach these URLs"
    (``_says_the_same``) and is named after its one service; ``error_pages`` is kept off only
    where Routheon wrote it so (``--no-error-pages``: a request-body middleware and no error pages).
    """
    try:
        spec: MappingSpec | None = _spec_of(mapping)
    except ValueError as exc:
        spec, unreadable = None, str(exc)
    if spec is not None and mapping.path.name == spec.file_name and _says_the_same(mapping, spec):
        return spec
    clauses = [clause for _, clause in mapping.key_clauses()]
    settings = unwritten_settings(mapping.text)
    if any(not clause.literal for clause in clauses):
        reason = "its rule is a regular expression that matches more than its keys"
    elif any(clause.stale_guard for clause in clauses):
        reason = "a key's guard was written for another key (edited by hand)"
    elif settings:
        reason = f"it holds settings Routheon does not write ({', '.join(settings[:3])}), which a rewrite would drop"
    elif spec is None:
        reason = unreadable
    elif mapping.path.name != spec.file_name:
        return (
            f"it is not named after its service: rename it to {spec.file_name} (Traefik goes by what"
            " it holds, not by its name), then run `routheon mapping upgrade` again"
        )
    else:
        reason = "it says more than which keys reach which URLs (a middleware or priority of its own)"
    return f"{reason}; rewrite it with `routheon mapping add --replace`"


def _conflict(rendered: MappingFile, files: list[MappingFile]) -> str | None:
    """What another file routes or defines that ``rendered``, the upgraded file, would clash with.

    A key in two files reaches whichever router Traefik ranks first, by rule length: the
    guards lengthen the rule, so a rewrite could send the key elsewhere. A name defined twice
    leaves one of the definitions unused.
    """
    for other in files:
        if other.path == rendered.path:
            continue
        if shared := set(rendered.keys()) & set(other.keys()):
            return (
                f"{len(shared)} of its keys also route in {other.path}: rewritten, it could take them over;"
                " keep each key in one file (`routheon mapping add --replace` moves it)"
            )
        for section, ours, theirs in (
            ("router", rendered.routers, other.routers),
            ("service", rendered.services, other.services),
        ):
            if taken := {item.name for item in ours} & {item.name for item in theirs}:
                return f"{other.path} defines {section} {min(taken)!r}, a name the rewritten file needs"
        if taken := set(rendered.middlewares) & set(other.middlewares):
            return f"{other.path} defines middleware {min(taken)!r}, a name the rewritten file needs"
    return None


def upgrade_mappings(
    folder: Path, *, backups: int = DEFAULT_BACKUPS, confirm: Confirm | None = None, hop_port: int | None = None
) -> list[Change]:
    """Rewrite every key file in an older format as ``routheon mapping add`` writes it today.

    Files of an earlier Routheon or of routheon-server 1.0.x (``_upgrade_of``) gain what they
    lack (each key's guard, the request-body middleware, error pages), keys and URLs unchanged;
    the rest are named and left as they are: those that say more, those in subfolders (where
    Routheon does not write), and those whose rewrite would clash with another file. The grants
    file is rewritten as today's Routheon writes it (the probe router of /health's hop check),
    onto ``hop_port`` when that is given (Traefik's routheon-hop port).
    """
    with folder_lock(folder):
        steps: list[_Step] = []
        left: list[Change] = []
        files = _parsed_files(folder)
        steps += _grants_upgrade(folder, hop_port, left)
        for mapping in files:
            if mapping.path.name == GRANTS_FILE or not mapping.key_clauses():
                continue
            if mapping.path.parent != folder:
                reason = f"in a subfolder, where Routheon does not write; move it into {folder} to upgrade it"
                left.append(Change("left", mapping.path, reason))
                continue
            spec = _upgrade_of(mapping)
            if isinstance(spec, str):
                left.append(Change("left", mapping.path, spec))
                continue
            text = render_mapping(spec)
            reason = _conflict(parse_rendered(text, spec, mapping.path), files)
            if reason is not None:
                left.append(Change("left", mapping.path, reason))
                continue
            _refuse_unsafe(mapping.path)
            if _read_bytes(mapping.path) != text.encode("utf-8"):
                steps.append(_Step(mapping.path, text.encode("utf-8"), "upgraded"))
        return _with_pruning(folder, _apply(steps, confirm, backups), backups) + left


def _grants_upgrade(folder: Path, hop_port: int | None, left: list[Change]) -> list[_Step]:
    """The grants file as Routheon writes it today, when that differs from the file; a broken one is ``left``."""
    path = folder / GRANTS_FILE
    if not path.exists():
        return []
    try:
        grants = _on_hop_port(read_grants(folder), hop_port)
    except ValueError as exc:
        left.append(Change("left", path, f"{str(exc).removeprefix(f'{GRANTS_FILE}: ')}; see `routheon mapping check`"))
        return []
    _refuse_unsafe(path)
    data = render_grants(grants).encode("utf-8")
    return [] if _read_bytes(path) == data else [_Step(path, data, "upgraded")]


def prune(folder: Path, keep: int = DEFAULT_BACKUPS) -> list[Change]:
    """Delete every mapping file's backups but its ``keep`` newest, now (0 deletes them all)."""
    with folder_lock(folder):
        return prune_backups(folder, keep)


# --- grants: one key, many models (routheon-grants.yml, docs/model-routing.md) ---------------


def read_grants(folder: Path) -> Grants:
    """The folder's grants file, or empty grants when there is none; ValueError when it is broken."""
    path = folder / GRANTS_FILE
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        return Grants()
    try:
        return parse_grants(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def _grants_step(folder: Path, before: Grants, after: Grants) -> list[_Step]:
    path = folder / GRANTS_FILE
    if after == before:
        return []
    _refuse_unsafe(path)
    if not after.services and not after.keys:
        return [_Step(path, None, "removed", "no service declares models, no key is granted")] if path.exists() else []
    return [_Step(path, render_grants(after).encode("utf-8"), "rewrote" if path.exists() else "wrote")]


def _key_routes(files: Iterable[MappingFile]) -> dict[str, set[str]]:
    """Every key a key file routes, with the services it reaches there."""
    routes: dict[str, set[str]] = {}
    for mapping in files:
        for router, clause in mapping.key_clauses():
            routes.setdefault(clause.key, set()).add(router.service.removesuffix("@file"))
    return routes


def _on_hop_port(grants: Grants, hop_port: int | None) -> Grants:
    """``grants`` naming ``hop_port`` (Traefik's routheon-hop entry point), when it is known."""
    return grants if hop_port is None else replace(grants, hop_port=hop_port)


def _declared(grants: Grants) -> frozenset[str]:
    return frozenset(service.name for service in grants.services)


def _without_service(grants: Grants, service: str) -> Grants:
    """``grants`` with ``service`` gone: undeclared, and taken from every key (keys left with none go)."""
    for grant in grants.keys:
        if service in grant.services:
            grants = grants.revoke_hash(grant.hash, (service,))
    return replace(grants, services=tuple(declared for declared in grants.services if declared.name != service))


def grant_keys(
    folder: Path,
    keys: Iterable[str],
    services: Iterable[str],
    *,
    backups: int = DEFAULT_BACKUPS,
    confirm: Confirm | None = None,
    hop_port: int | None = None,
) -> list[Change]:
    """Grant ``services`` to each key on top of what it has; nothing else is revoked.

    A key a key file routes moves into the grants with its service, so one router decides for
    it; that needs the service's models declared when the key is to reach several services.
    A service not yet declared is declared without models (it answers any ``model`` for keys
    whose only service it is).
    """
    keys, services = list(dict.fromkeys(keys)), tuple(dict.fromkeys(services))
    with folder_lock(folder):
        files = _parsed_files(folder)
        defined = {service.name for mapping in files for service in mapping.services}
        missing = [name for name in services if name not in defined]
        if missing:
            raise LookupError(
                f"no mapping file defines service {missing[0]!r}: add it first"
                f" (routheon mapping add --service {missing[0]} --url URL --model NAME)"
            )
        before = read_grants(folder)
        grants = _on_hop_port(before, hop_port)
        routes = _key_routes(files)
        moved: set[str] = set()
        for key in keys:
            old = grants.key(key)
            wanted = tuple(dict.fromkeys((*sorted(routes.get(key, ())), *(old.services if old else ()), *services)))
            if key in routes:
                moved.add(key)
            undeclared = [name for name in wanted if not (grants.service(name) or GrantedService(name)).models]
            if len(wanted) > 1 and undeclared:
                raise MappingConflictError(
                    f"key {mask_key(key)} would reach {len(wanted)} services, but {undeclared[0]!r} declares no"
                    f" model to route by: declare its models first (routheon mapping add --service {undeclared[0]}"
                    " --url URL --model NAME)"
                )
            for name in wanted:
                if grants.service(name) is None:
                    grants = grants.with_service(GrantedService(name))
            grants = grants.grant(key, wanted)
        steps = _take_keys(files, moved, skip=None, keep=_declared(grants)) + _grants_step(folder, before, grants)
        return _with_pruning(folder, _apply(steps, confirm, backups), backups)


def revoke_keys(
    folder: Path,
    keys: Iterable[str],
    services: Iterable[str] | None = None,
    *,
    backups: int = DEFAULT_BACKUPS,
    confirm: Confirm | None = None,
    hop_port: int | None = None,
) -> list[Change]:
    """Take ``services`` (all when None) from each key, in the grants and in key files alike."""
    keys = set(keys)
    only = None if services is None else tuple(services)
    with folder_lock(folder):
        files = _parsed_files(folder)
        before = read_grants(folder)
        grants = _on_hop_port(before, hop_port)
        routes = _key_routes(files)
        unknown = [key for key in keys if key not in routes and grants.key(key) is None]
        if unknown:
            raise LookupError(f"{len(unknown)} of the given API keys are granted nothing and in no mapping file")
        for key in keys if only is not None else ():
            granted = routes.get(key, set()) | set(getattr(grants.key(key), "services", ()))
            absent = [name for name in only if name not in granted]
            if absent:
                raise LookupError(
                    f"key {mask_key(key)} may not use service {absent[0]!r} (it may use {', '.join(sorted(granted))});"
                    " nothing was revoked"
                )
        in_files = {key for key in keys if routes.get(key) and (only is None or routes[key] & set(only))}
        for key in keys:
            grants = grants.revoke(key, only)
        steps = _take_keys(files, in_files, skip=None, keep=_declared(grants)) + _grants_step(folder, before, grants)
        return _with_pruning(folder, _apply(steps, confirm, backups), backups)
