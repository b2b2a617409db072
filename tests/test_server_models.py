"""/v1/models of the real routheon-server against fake backends, good and bad."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from server_helpers import (
    Backends,
    backends,
    eventually,
    model_ids,
    request,
    running_backends,
    running_server,
    write_mapping,
)
from support import free_port

__all__ = ["backends"]  # the fixture, imported for pytest


@pytest.fixture
def mixed_folder(tmp_path: Path, backends: Backends) -> Path:
    """Two good backends among every kind of bad one, a broken file, a .bak and the skipped file."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "a-ok.yml", backends.url("ok/alpha"))
    write_mapping(folder, "b-several.yaml", backends.url("ok/beta,gamma"))
    write_mapping(folder, "c-slow.yml", backends.url("slow/0.2/delta"))
    write_mapping(folder, "d-openai.yml", backends.url("openai/epsilon"))
    for mode in ("hang", "garbage", "html500", "array", "nodata", "huge"):
        write_mapping(folder, f"bad-{mode}.yml", backends.url(mode))
    write_mapping(folder, "closed.yml", f"http://127.0.0.1:{free_port()}")
    (folder / "broken.yml").write_text("http:\n  services: [\n")
    (folder / "not-traefik.yml").write_text("- just\n- a list\n")
    write_mapping(folder, "old.yml.bak.20250101-000000", backends.url("ok/from-bak"))
    write_mapping(folder, "routheon-server.yml", backends.url("ok/from-self"))
    write_mapping(folder, "private.yml", backends.url("ok/from-private"))
    return folder


def test_bad_backends_and_files_are_left_out(tmp_path: Path, mixed_folder: Path) -> None:
    args = ["--mappings", str(mixed_folder), "--mapping-timeout", "1", "--skip-mapping", "^priv"]
    with running_server(tmp_path, args) as server:
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
    assert log.count("broken.yml") == 1 and log.count("not-traefik.yml") == 1
    for mode in ("hang", "garbage", "html500", "array", "nodata", "huge"):
        assert backends_url_logged(log, mode)
    assert "Traceback" not in log


def backends_url_logged(log: str, mode: str) -> bool:
    return any(f"/{mode} left out" in line for line in log.splitlines())


def test_one_model_by_id(tmp_path: Path, backends: Backends) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "one.yml", backends.url("ok/org/model-1"))
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        found = request(f"{server.base}/v1/models/org/model-1")
        assert found.status == 200 and found.json()["id"] == "org/model-1"
        missing = request(f"{server.base}/v1/models/nope")
        assert missing.status == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_first_backend_in_url_order_wins(tmp_path: Path, backends: Backends) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    # file order and URL order disagree: the sorted URL decides, as in 1.0.7
    write_mapping(folder, "a.yml", backends.url("ok/zz,shared"))
    write_mapping(folder, "b.yml", backends.url("ok/aa,shared"))
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        body = request(f"{server.base}/v1/models").json()
    shared = next(entry for entry in body["data"] if entry["id"] == "shared")
    assert shared["meta"]["owner"] == "ok/aa,shared"
    assert [entry["id"] for entry in body["data"]] == ["aa", "shared", "zz"]


def test_folder_and_backend_changes_show_without_restart(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    port = free_port()
    with running_server(tmp_path, ["--mappings", str(folder), "--mapping-timeout", "0.5"]) as server:
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
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "hang.yml", backends.url("hang"))
    write_mapping(folder, "ok.yml", backends.url("ok/alive"))
    with running_server(tmp_path, ["--mappings", str(folder), "--mapping-timeout", "0.5"]) as server:
        for _ in range(5):
            assert model_ids(server.base) == ["alive"]


def test_openai_client_lists_models(tmp_path: Path, backends: Backends) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "ok.yml", backends.url("ok/alpha,beta"))
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["alpha", "beta"]
        assert client.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gamma")
