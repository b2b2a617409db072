"""/health, /stats, the error pages, access log and shutdown of the real routheon-server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import Server, eventually, request, running_server, write_mapping

ERROR_KEYS = {"message", "type", "code"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "mappings"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with an empty folder for the tests that only read answers."""
    tmp = tmp_path_factory.mktemp("plain")
    with running_server(tmp, ["--mappings", str(tmp)]) as running:
        yield running


def test_health_names_broken_files(tmp_path: Path, folder: Path) -> None:
    write_mapping(folder, "good.yml", "http://127.0.0.1:1")
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        healthy = request(f"{server.base}/health").json()
        assert healthy["status"] == "ok"
        assert healthy["mappings"] == {"folder": str(folder), "exists": True, "files": 1, "problems": []}
        assert healthy["version"]
        (folder / "bad.yml").write_text("http: [\n")
        assert eventually(lambda: request(f"{server.base}/health").json()["status"] == "degraded")
        degraded = request(f"{server.base}/health")
        assert degraded.status == 200
        (problem,) = degraded.json()["mappings"]["problems"]
        assert problem["file"] == "bad.yml" and "YAML" in problem["message"]


def test_unknown_path_and_wrong_method_are_openai_errors(server: Server) -> None:
    missing = request(f"{server.base}/v2/whatever")
    assert missing.status == 404 and set(missing.json()["error"]) == ERROR_KEYS
    wrong = request(f"{server.base}/v1/models", method="POST")
    assert wrong.status == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in wrong.headers["Allow"]
    head = request(f"{server.base}/stats", method="HEAD")
    assert head.status == 200 and head.body == b""


@pytest.mark.parametrize(
    ("status", "headers", "code", "kind"),
    [
        (401, {}, "missing_api_key", "invalid_request_error"),
        (401, {"Authorization": "Bearer s3cret-KEY"}, "invalid_api_key", "invalid_request_error"),
        (502, {"Authorization": "Bearer s3cret-KEY"}, "backend_unreachable", "server_error"),
        (503, {}, "backend_unavailable", "server_error"),
        (504, {}, "backend_timeout", "server_error"),
        (429, {}, "too_many_requests", "invalid_request_error"),
    ],
)
def test_error_pages(server: Server, status: int, headers: dict[str, str], code: str, kind: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        answer = request(f"{server.base}/errors/{status}", method=method, headers=headers)
        assert answer.status == status
        error = answer.json()["error"]
        assert (error["code"], error["type"]) == (code, kind)
        assert error["message"] and b"s3cret" not in answer.body


@pytest.mark.parametrize("status", ["200", "302", "600", "abc", "0401"])
def test_error_page_outside_4xx_5xx_is_not_found(server: Server, status: str) -> None:
    assert request(f"{server.base}/errors/{status}").status == 404


SECTIONS = {"timestamp", "system", "cpu", "memory", "swap", "disk", "network", "processes"}


def test_stats_has_the_original_sections(server: Server) -> None:
    stats = request(f"{server.base}/stats").json()
    assert set(stats) == SECTIONS
    assert set(stats["cpu"]) == {"usage_percent", "load_average", "core_count", "core_count_logical"}
    assert set(stats["cpu"]["load_average"]) == {"1min", "5min", "15min"}
    assert 0 <= stats["cpu"]["usage_percent"] <= 100
    assert {"total", "available", "used", "free", "percent", "total_gb"} <= set(stats["memory"])
    assert {"uptime_seconds", "uptime_human", "hostname", "platform"} <= set(stats["system"])
    assert stats["processes"]["count"] > 0


def test_stats_config_hides_what_it_leaves_out(tmp_path: Path, folder: Path) -> None:
    config = tmp_path / "stats-config.yml"
    config.write_text("enabled_sections: [cpu, memory]\nenabled_fields:\n  memory: [percent]\n")
    with running_server(tmp_path, ["--mappings", str(folder), "--stats-config-file", str(config)]) as server:
        stats = request(f"{server.base}/stats").json()
    assert set(stats) == {"timestamp", "cpu", "memory"}
    assert set(stats["memory"]) == {"percent"}
    assert "usage_percent" in stats["cpu"]


def test_access_log_at_info(tmp_path: Path, folder: Path) -> None:
    with running_server(tmp_path, ["--mappings", str(folder), "--log-level", "info"]) as server:
        request(f"{server.base}/v1/models", headers={"Authorization": "Bearer s3cret-KEY"})
        server.proc.stop()
    log = server.proc.log_path.read_text()
    assert any('"GET /v1/models HTTP/1.1" 200' in line for line in log.splitlines())
    assert "s3cret" not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(tmp_path: Path, folder: Path, sig: signal.Signals) -> None:
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        request(f"{server.base}/v1/models")
        assert server.proc.stop(sig) == 0
    assert "Traceback" not in server.proc.log_path.read_text()
