"""/v1/models of the real routheon-server against fake backends, good and bad."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from server_helpers import (
    Backends,
    mapping_folder,
    running_backends,
    serving,
    write_mapping,
)
from support import request

from routheon.loopback import free_port
from routheon.probe import model_ids
from routheon.supervisor import eventually

BAD_MODES = ("hang", "garbage", "html500", "array", "nodata", "huge")  # ways tests/backends.py misbehaves


@pytest.fixture
def mixed_folder(tmp_path: Path, backends: Backends) -> Path:
    """Two good backends among every kind of bad one, a broken file, a .bak and the skipped file."""
    folder = mapping_folder(
        tmp_path,
        {
            "a-ok.yml": backends.url("ok/alpha"),
            "b-several.yaml": backends.url("ok/beta,gamma"),
            "c-slow.yml": backends.url("slow/0.2/delta"),
            "d-openai.yml": backends.url("openai/epsilon"),
            **{f"bad-{mode}.yml": backends.url(mode) for mode in BAD_MODES},
            "closed.yml": f"http://127.0.0.1:{free_port()}",
            "old.yml.bak.20250101-000000": backends.url("ok/from-bak"),
            "routheon-server.yml": backends.url("ok/from-self"),
            "private.yml": backends.url("ok/from-private"),
        },
    )
    (folder / "broken.yml").write_text("http:\n  services: [\n")
    (folder / "not-traefik.yml").write_text("- just\n- a list\n")
    return folder


def test_bad_backends_and_files_are_left_out(tmp_path: Path, mixed_folder: Path) -> None:
    args = ["--mappings", str(mixed_folder), "--mapping-timeout", "1", "--skip-mapping", "^priv"]
    with serving(args) as server:
        answer = request(f"{server.base}/v1/models")
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
        body = answer.json()
        assert body["object"] == "list"
        assert [entry["id"] for entry in body["data"]] == ["alpha", "beta", "delta", "epsilon", "gamma"]
        # llama.cpp's list stays aligned with data, filled in where a backend had none
        assert [entry["model"] for entry in body["models"]] == ["alpha", "beta", "delta", "epsilon", "gamma"]
        assert body["models"][3] == {"model": "epsilon", "name": "epsilon"}
        for _ in range(3):
            assert model_ids(server.base) == ["alpha", "beta", "delta", "epsilon", "gamma"]
        log = server.proc.log()
    # each broken file is logged once, and so is Traefik's verdict on the folder it breaks
    lines = log.splitlines()
    assert len([line for line in lines if "broken.yml:3" in line]) == 1
    assert len([line for line in lines if "not-traefik.yml" in line]) == 1
    assert len([line for line in lines if "rejects the whole folder" in line]) == 1
    for mode in BAD_MODES:
        assert backends_url_logged(log, mode)
    assert "Traceback" not in log


def backends_url_logged(log: str, mode: str) -> bool:
    return any(f"/{mode} left out" in line for line in log.splitlines())


def test_one_model_by_id(tmp_path: Path, backends: Backends) -> None:
    folder = mapping_folder(tmp_path, {"one.yml": backends.url("ok/org/model-1")})
    with serving(["--mappings", str(folder)]) as server:
        found = request(f"{server.base}/v1/models/org/model-1")
        assert found.status == 200 and found.json()["id"] == "org/model-1"
        missing = request(f"{server.base}/v1/models/nope")
        assert missing.status == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_first_backend_in_url_order_wins(tmp_path: Path, backends: Backends) -> None:
    # file order and URL order disagree: the sorted URL decides, as in 1.0.7
    folder = mapping_folder(tmp_path, {"a.yml": backends.url("ok/zz,shared"), "b.yml": backends.url("ok/aa,shared")})
    with serving(["--mappings", str(folder)]) as server:
        body = request(f"{server.base}/v1/models").json()
    shared = next(entry for entry in body["data"] if entry["id"] == "shared")
    assert shared["meta"]["owner"] == "ok/aa,shared"
    assert [entry["id"] for entry in body["data"]] == ["aa", "shared", "zz"]


def test_folder_and_backend_changes_show_without_restart(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    port = free_port()
    with serving(["--mappings", str(folder), "--mapping-timeout", "0.5"]) as server:
        assert model_ids(server.base) == []
        assert request(f"{server.base}/health").json()["status"] == "degraded"
        folder.mkdir()
        write_mapping(folder, "m.yml", f"http://127.0.0.1:{port}/ok/late")
        with running_backends(tmp_path, port):
            assert eventually(lambda: model_ids(server.base) == ["late"])
        assert eventually(lambda: model_ids(server.base) == [])
        with running_backends(tmp_path, port):
            assert eventually(lambda: model_ids(server.base) == ["late"])
            (folder / "m.yml").unlink()
            assert eventually(lambda: model_ids(server.base) == [])
        assert "does not exist" in server.proc.log()


def test_hanging_backend_does_not_hide_the_others(tmp_path: Path, backends: Backends) -> None:
    folder = mapping_folder(tmp_path, {"hang.yml": backends.url("hang"), "ok.yml": backends.url("ok/alive")})
    with serving(["--mappings", str(folder), "--mapping-timeout", "0.5"]) as server:
        for _ in range(5):
            assert model_ids(server.base) == ["alive"]


def test_openai_client_lists_models(tmp_path: Path, backends: Backends) -> None:
    folder = mapping_folder(tmp_path, {"ok.yml": backends.url("ok/alpha,beta")})
    with serving(["--mappings", str(folder)]) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["alpha", "beta"]
        assert client.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gamma")
