"""Compatibility with the original routheon-server 1.0.7 from PyPI: same folder, same model ids.

The original is installed once into ~/.cache/routheon/original-1.0.7 (shared with the
benchmarks); a lock keeps two test runs from installing it at the same time.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import Backends, backends, request, running_server, write_mapping
from support import free_port

__all__ = ["backends"]

ORIGINAL = Path.home() / ".cache" / "routheon" / "original-1.0.7"
ORIGINAL_BIN = ORIGINAL / "bin" / "routheon-server"

pytestmark = pytest.mark.compat


def install_original() -> Path:
    ORIGINAL.parent.mkdir(parents=True, exist_ok=True)
    with open(ORIGINAL.parent / "original-1.0.7.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ORIGINAL_BIN.exists():
            subprocess.run([sys.executable, "-m", "venv", str(ORIGINAL)], check=True)
            subprocess.run(
                [str(ORIGINAL / "bin" / "pip"), "install", "--quiet", "routheon-server==1.0.7"],
                check=True,
                timeout=600,
            )
    return ORIGINAL_BIN


@pytest.fixture(scope="module")
def original() -> Path:
    return install_original()


def test_same_model_ids_as_the_original(tmp_path: Path, backends: Backends, original: Path) -> None:
    """Only backends 1.0.7 survives: it stops answering on a JSON array or a broken file."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "one.yml", backends.url("ok/TinyLlama_Chat"))
    write_mapping(folder, "two.yaml", backends.url("ok/mistral-tiny,shared"))
    write_mapping(folder, "three.yml", backends.url("ok/shared,Zeta,alpha"))
    write_mapping(folder, "openai.yml", backends.url("openai/only-data"))
    write_mapping(folder, "slow.yml", backends.url("slow/0.3/slowpoke"))
    write_mapping(folder, "html.yml", backends.url("html500"))
    write_mapping(folder, "garbage.yml", backends.url("garbage"))
    write_mapping(folder, "closed.yml", f"http://127.0.0.1:{free_port()}")
    write_mapping(folder, "routheon-server.yml", backends.url("ok/self"))
    write_mapping(folder, "old.yml.bak.20250101-000000", backends.url("ok/archived"))
    write_mapping(folder, "private.yml", backends.url("ok/private"))
    args = ["--mappings", str(folder), "--mapping-timeout", "2", "--skip-mapping", "^priv"]
    with running_server(tmp_path, args, binary=original) as theirs:
        expected = request(f"{theirs.base}/v1/models").json()
    with running_server(tmp_path, args) as ours:
        answer = request(f"{ours.base}/v1/models").json()
    assert [entry["id"] for entry in answer["data"]] == [entry["id"] for entry in expected["data"]]
    assert answer["data"] == expected["data"] and answer["models"] == expected["models"]
    assert [entry["id"] for entry in answer["data"]] == [
        "TinyLlama_Chat",
        "Zeta",
        "alpha",
        "mistral-tiny",
        "only-data",
        "shared",
        "slowpoke",
    ]


def shape(value: object) -> object:
    """The keys of nested objects, without the values that change from call to call."""
    return {key: shape(item) for key, item in value.items()} if isinstance(value, dict) else None


def test_same_stats_fields_as_the_original(tmp_path: Path, original: Path) -> None:
    config = tmp_path / "stats-config.yml"
    config.write_text("enabled_sections: [timestamp, cpu, disk, system]\nenabled_fields:\n  disk: [percent, free]\n")
    for args in ([], ["--stats-config-file", str(config)]):
        with running_server(tmp_path, ["--mappings", str(tmp_path), *args], binary=original) as theirs:
            expected = request(f"{theirs.base}/stats").json()
        with running_server(tmp_path, ["--mappings", str(tmp_path), *args]) as ours:
            answer = request(f"{ours.base}/stats").json()
        assert shape(answer) == shape(expected)
