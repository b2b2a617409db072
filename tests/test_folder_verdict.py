"""`routheon mapping check` agrees with Traefik: the corpus in folder_corpus.py, fed to both.

Each case is one file next to a valid key mapping. Traefik 3.7.15 (the pinned binary) decides;
`check` must report a rejection exactly when Traefik rejects, and every key Traefik routes
must be visible to Routheon or reported as one it cannot manage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from folder_corpus import ALIASES, CASES, Case, folder_with
from routheon import cli
from routheon.mappings.check import inspect_folder
from routheon.mappings.folder import read_folder
from routheon.mappings.format import MappingSpec
from routheon.mappings.store import add_mapping
from routheon.mappings.verdict import ask_traefik, find_traefik

pytestmark = pytest.mark.traefik
KEY = "sk-corpus-valid-key-0000"


def _check(folder: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli.main(["mapping", "check", "--no-connect", "--mappings", str(folder), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check_says_what_traefik_does(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    folder = folder_with(tmp_path, case, KEY)
    code, output = _check(folder, capsys)
    assert ("rejects the whole folder" not in output) == case.applied, output
    if not case.applied:
        assert code == 1
        return
    seen = {clause.key for mapping in read_folder(folder).files for _, clause in mapping.key_clauses()}
    for key in case.keys:
        if case.unmanaged:
            assert code == 1 and "cannot be listed or revoked" in output, output
        else:
            assert key in seen, output


@pytest.mark.parametrize("case", [case for case in CASES if case.applied], ids=lambda case: case.name)
def test_routheons_reader_never_calls_a_folder_traefik_applies_rejected(tmp_path: Path, case: Case) -> None:
    folder = folder_with(tmp_path, case, KEY)
    assert [str(finding) for finding in inspect_folder(folder).findings if finding.rejects] == []


def test_a_key_in_a_parked_subfolder_is_listed_and_revocable(tmp_path: Path) -> None:
    (parked,) = [case for case in CASES if case.file.startswith("disabled/")]
    folder = folder_with(tmp_path, parked, KEY)
    assert cli.main(["mapping", "remove", "--key", parked.keys[0], "--mappings", str(folder)]) == 0
    assert not (folder / parked.file).exists()


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """A billion-node expansion in 600 bytes: the reader used to walk it node by node (hours)."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "bomb.yml").write_text(ALIASES + "".join(f"z{i}: [{', '.join(['*g'] * 10)}]\n" for i in range(3)))
    script = "import sys; from routheon.mappings.check import check_folder; print(*check_folder(sys.argv[1]), sep='\\n')"
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=60)
    assert "aliases expand it to more than" in result.stdout
    verdict = ask_traefik(folder, traefik=str(find_traefik()))
    assert not verdict.applied and "excessive aliasing" in verdict.reason


def test_check_without_traefik_says_the_verdict_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    add_mapping(folder, MappingSpec("valid", ("http://127.0.0.1:8011",), (KEY,)))
    code, output = _check(folder, capsys, "--traefik", str(tmp_path / "no-such-traefik"))
    assert code == 0
    assert "warning: Traefik's verdict is missing: cannot run" in output
