"""Compatibility with the original routheon-server 1.0.7 from PyPI: same folder, same model ids.

The original is installed once into the venv the benchmarks use (``bench.env``, under
~/.cache/routheon/); a lock keeps two runs from installing it at the same time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import Backends, mapping_folder, running_server
from support import request

from bench.env import original_server
from routheon.loopback import free_port

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def original() -> Path:
    return original_server()


def test_same_model_ids_as_the_original(tmp_path: Path, backends: Backends, original: Path) -> None:
    """Only backends 1.0.7 survives: it stops answering on a JSON array or a broken file."""
    folder = mapping_folder(
        tmp_path,
        {
            "one.yml": backends.url("ok/TinyLlama_Chat"),
            "two.yaml": backends.url("ok/mistral-tiny,shared"),
            "three.yml": backends.url("ok/shared,Zeta,alpha"),
            "openai.yml": backends.url("openai/only-data"),
            "slow.yml": backends.url("slow/0.3/slowpoke"),
            "html.yml": backends.url("html500"),
            "garbage.yml": backends.url("garbage"),
            "closed.yml": f"http://127.0.0.1:{free_port()}",
            "routheon-server.yml": backends.url("ok/self"),
            "old.yml.bak.20250101-000000": backends.url("ok/archived"),
            "private.yml": backends.url("ok/private"),
        },
    )
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
