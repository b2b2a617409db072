"""Reading a mappings folder the way Traefik's file provider walks it: one walk, one finding type.

Traefik reads every ``*.yml``, ``*.yaml`` and ``*.toml`` file of the folder and of every
subfolder, hidden ones included, in name order, and rejects the whole folder when one of them
is broken. Every reader in Routheon (``routheon mapping ...``, routheon-server's scan) goes
through ``read_folder``, so they all see the same files Traefik sees.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from routheon.mappings.format import MappingFile, MappingFormatError, parse_mapping

# Where Traefik's file provider looks by default; the variable sets another folder for every
# Routheon command and routheon-server, so --mappings need not be repeated.
DEFAULT_MAPPINGS = "/etc/traefik/mappings"
MAPPINGS_ENV = "ROUTHEON_MAPPINGS"
ERROR = "error"
WARNING = "warning"
YAML_SUFFIXES = (".yml", ".yaml")
TRAEFIK_SUFFIXES = (*YAML_SUFFIXES, ".toml")
# A key file is a few KB; the grants file holds ~100 bytes per key (16 MiB: ~150,000 keys).
MAX_MAPPING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    """One problem: where it is, how bad it is, and what to do about it.

    ``rejects`` marks a problem that makes Traefik ignore the whole folder (nothing changes
    until it is fixed); other errors misroute or disable single keys.
    """

    path: Path
    message: str
    severity: str = ERROR
    line: int | None = None
    rejects: bool = False

    def __str__(self) -> str:
        """``FILE:LINE: severity: message`` on one line, whatever the message holds."""
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.severity}: " + " ".join(self.message.split())


@dataclass(frozen=True)
class Folder:
    """The mapping files of a folder that could be read, and what is wrong with the folder."""

    path: Path
    files: tuple[MappingFile, ...] = ()
    findings: tuple[Finding, ...] = ()
    exists: bool = True

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity != ERROR)

    def backend_urls(self) -> list[str]:
        """Every distinct backend URL, in file order, without a trailing slash."""
        seen: dict[str, None] = {}
        for mapping in self.files:
            for url in mapping.urls:
                seen.setdefault(url.rstrip("/"), None)
        return list(seen)


def is_mapping_name(name: str) -> bool:
    """Whether Traefik's file provider reads this file (it goes by the extension alone).

    Rotated ``NAME.yml.bak.*`` files and ``.NAME.yml.*.tmp`` files in the making are skipped.
    """
    return name.lower().endswith(TRAEFIK_SUFFIXES)


def traefik_paths(folder: Path) -> Iterator[Path]:
    """The files Traefik reads from ``folder``, in Traefik's order (depth first, by name).

    Like Go's ``os.ReadDir``, a link to a folder is not a folder: Traefik reads it as a file.
    """
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_dir(follow_symlinks=False):
            yield from traefik_paths(Path(entry.path))
        elif is_mapping_name(entry.name):
            yield Path(entry.path)


def read_plain_file(path: Path, *, follow_links: bool = False) -> tuple[bytes, int]:
    """The bytes of a regular file of the folder and its permission bits, or MappingFormatError.

    A FIFO or a device named ``*.yml`` would otherwise block or flood every reader of the
    folder (routheon-server's scan included); no real mapping comes near the size cap. A
    symbolic link is refused unless ``follow_links`` (Traefik follows them; Routheon would
    back up and rewrite what it points to).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_links and os.path.islink(path):
            raise MappingFormatError(
                "a symbolic link: Routheon neither reads nor writes mapping files through links;"
                " put the file itself in the folder"
            ) from None
        raise exc
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise MappingFormatError("not a regular file")
        data = handle.read(MAX_MAPPING_BYTES + 1)
    if len(data) > MAX_MAPPING_BYTES:
        raise MappingFormatError(f"larger than {MAX_MAPPING_BYTES} bytes: not a mapping file")
    return data, stat.S_IMODE(status.st_mode)


def read_mapping_text(path: Path) -> tuple[str, int]:
    """The text of a mapping file and its permission bits (see ``read_plain_file``)."""
    data, mode = read_plain_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingFormatError(f"not UTF-8 text (byte {exc.start + 1})") from None
    return text, mode


def read_mapping(path: Path) -> MappingFile:
    """Read and parse one file; OSError and MappingFormatError propagate."""
    text, mode = read_mapping_text(path)
    return replace(parse_mapping(text, path), mode=mode)


def read_folder(folder: str | os.PathLike[str]) -> Folder:
    """Parse every file Traefik reads in ``folder``; a broken file becomes a finding, never an exception.

    A TOML file is left to Traefik's verdict: Routheon writes and reads YAML only.
    """
    path = Path(folder)
    try:
        paths = list(traefik_paths(path))
    except FileNotFoundError:
        return Folder(path, findings=(Finding(path, "the mappings folder does not exist"),), exists=False)
    except OSError as exc:
        return Folder(path, findings=(Finding(path, f"cannot list the folder: {exc.strerror}"),))
    files: list[MappingFile] = []
    findings: list[Finding] = []
    for file_path in paths:
        if not file_path.name.lower().endswith(YAML_SUFFIXES):
            message = "a TOML file: Routheon does not read it, so the keys it may route are not listed"
            findings.append(Finding(file_path, message, WARNING))
            continue
        try:
            files.append(read_mapping(file_path))
        except MappingFormatError as exc:
            findings.append(Finding(file_path, str(exc), line=exc.line, rejects=True))
        except FileNotFoundError:
            continue  # removed or rotated since the folder was listed
        except OSError as exc:
            findings.append(Finding(file_path, f"cannot read: {exc.strerror or exc}", rejects=True))
    return Folder(path, tuple(files), tuple(findings))
