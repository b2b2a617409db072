"""routheon-server opens no mapping file while the folder is unchanged, however many requests come.

Issue 20 measured the opposite: with 1,004 key files under 50 requests/s of ``/v1/models``,
routheon-server read and checked every file again on each check (every 2 s), 3,400 opens in
10 s by strace. Here the real app runs in this process and every ``open`` it makes is seen
through Python's audit hook (``os.open``, ``open``, ``Path.read_text`` all raise the ``open``
event), so the count is exact, not sampled.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from server_helpers import Backends, serving
from support import request

import routheon.server.app
from routheon.loopback import install_server_mapping
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.grants import GRANTED_MODELS_HEADER, GrantedService, Grants, render_grants
from routheon.probe import model_ids
from routheon.supervisor import eventually

KEY_FILES = 1000
GRANTED = "sk-granted-0123456789abcdef"

_opened: list[str] | None = None  # the paths opened while ``opens`` records


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # for the whole process (hooks cannot be removed); it records only inside ``opens``


@contextmanager
def opens(folder: Path) -> Iterator[list[str]]:
    """The files of ``folder`` opened by any thread of this process inside the block."""
    global _opened
    seen: list[str] = []
    _opened = seen
    try:
        yield seen
    finally:
        _opened = None
        seen[:] = [path for path in seen if path.startswith(f"{folder}{os.sep}")]


def key_folder(tmp: Path, backend: str) -> Path:
    """KEY_FILES key files as ``routheon mapping add`` renders them, routheon-server.yml and a grants file."""
    folder = tmp / "mappings"
    folder.mkdir()
    install_server_mapping(folder, 9080)
    for index in range(KEY_FILES):
        spec = MappingSpec(f"svc-{index:05d}", (backend,), (f"sk-file-{index:06d}-0123456789abcdef",))
        path = folder / spec.file_name
        path.write_text(render_mapping(spec))
        path.chmod(0o640)
    grants = Grants((GrantedService("svc-00000", ("alpha-granted",)),)).grant(GRANTED, ("svc-00000",))
    (folder / "routheon-grants.yml").write_text(render_grants(grants))
    (folder / "routheon-grants.yml").chmod(0o640)
    return folder


def health(base: str) -> dict:
    return request(f"{base}/health").json()


def test_an_unchanged_folder_is_never_opened_again(
    tmp_path: Path, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = key_folder(tmp_path, backends.url("ok/alpha"))
    # the folder is checked every 0.1 s instead of every 2 s: 20 checks in the 2 s of requests below
    monkeypatch.setattr(routheon.server.app, "TTL", 0.1)
    with serving(["--mappings", str(folder), "--traefik", "none"]) as server:
        assert health(server.base)["mappings"]["files"] == KEY_FILES + 1  # read once at start
        with opens(folder) as opened:
            assert busy(server.base, seconds=2.0) > 30
        assert opened == [], f"{len(opened)} opens of unchanged files, e.g. {opened[:3]}"

        # what changes is still seen: a new file, written as Routheon writes (renamed into place) ...
        added = MappingSpec("svc-new", (backends.url("ok/beta"),), ("sk-file-new-0123456789abcdef",))
        written = folder / f".{added.file_name}.tmp"
        written.write_text(render_mapping(added))
        written.chmod(0o640)
        written.rename(folder / added.file_name)
        assert eventually(lambda: model_ids(server.base) == ["alpha", "beta"], timeout=10)
        # ... and a mode alone (chmod changes no content, size or mtime, but a finding)
        (folder / "svc-00007.yml").chmod(0o644)
        assert eventually(
            lambda: any(warning["file"] == "svc-00007.yml" for warning in health(server.base)["mappings"]["warnings"]),
            timeout=10,
        )
        with opens(folder) as opened:  # and then nothing is opened again
            busy(server.base, seconds=1.0)
        assert opened == [], f"{len(opened)} opens of unchanged files, e.g. {opened[:3]}"


def busy(base: str, seconds: float) -> int:
    """Requests of every kind that reads the folder's state, for ``seconds``; how many."""
    granted = {"Authorization": f"Bearer {GRANTED}", GRANTED_MODELS_HEADER: "true"}
    requests = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert "alpha" in model_ids(base)
        listed = request(f"{base}/v1/models", headers=granted).json()["data"]
        assert [entry["id"] for entry in listed] == ["alpha-granted"]
        assert health(base)["mappings"]["problems"] == []
        requests += 3
    return requests
