"""/health, /stats, the error pages, access log and shutdown of the real routheon-server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import Server, running_server, serving, write_mapping
from support import request

from routheon.supervisor import eventually

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
    with serving(["--mappings", str(tmp)]) as running:
        yield running


def write_router(folder: Path, name: str, rule: str, middlewares: tuple[str, ...] = ()) -> None:
    """A mapping file with one router and its service; ``rule`` is written into a YAML double-quoted string."""
    lines = [
        "http:",
        "  routers:",
        f"    {name}:",
        f'      rule: "{rule}"',
        f"      service: {name}",
        *([f"      middlewares: [{', '.join(middlewares)}]"] if middlewares else []),
        "  services:",
        f"    {name}:",
        "      loadBalancer:",
        "        servers:",
        '          - url: "http://127.0.0.1:1"',
    ]
    (folder / f"{name}.yml").write_text("\n".join(lines) + "\n")


def key_rule(key: str) -> str:
    return f"Header(`Authorization`, `Bearer {key}`)"


def health(server: Server) -> dict:
    return request(f"{server.base}/health").json()


def problems(server: Server) -> dict[str, str]:
    return {problem["file"]: problem["message"] for problem in health(server)["mappings"]["problems"]}


def test_health_names_broken_files(tmp_path: Path, folder: Path) -> None:
    write_mapping(folder, "good.yml", "http://127.0.0.1:1").chmod(0o644)
    with serving(["--mappings", str(folder)]) as server:
        assert eventually(lambda: health(server)["mappings"]["traefik"]["state"] == "applied")
        healthy = health(server)
        assert healthy["status"] == "ok"
        assert healthy["mappings"].pop("traefik")["version"]
        assert healthy["mappings"].pop("hop") == {"state": "off", "url": "", "reason": ""}  # no grants file
        warnings = healthy["mappings"].pop("warnings")
        assert {warning["file"] for warning in warnings} == {"good.yml"}
        assert any("every user can read it" in warning["message"] for warning in warnings)
        assert any("passes request bodies on as they arrive" in warning["message"] for warning in warnings)
        assert healthy["mappings"] == {"folder": str(folder), "exists": True, "files": 1, "problems": []}
        assert healthy["version"]
        (folder / "bad.yml").write_text("http: [\n")
        assert eventually(lambda: health(server)["status"] == "degraded")
        degraded = request(f"{server.base}/health")
        assert degraded.status == 200
        (problem,) = degraded.json()["mappings"]["problems"]
        assert problem["file"] == "bad.yml" and "YAML" in problem["message"]


def test_health_reports_what_traefik_would_reject_or_misroute(tmp_path: Path, folder: Path) -> None:
    write_router(folder, "a", key_rule("KEY-shared"))
    write_router(folder, "b", key_rule("KEY-shared"))
    with serving(["--mappings", str(folder), "--log-level", "INFO"]) as server:
        assert health(server)["status"] == "degraded"
        assert problems(server) == {"b.yml": "router 'b': an API key here is also routed by 'a' in a.yml"}

        write_router(folder, "c", key_rule("KEY-c"), middlewares=("no-such-middleware",))
        assert eventually(lambda: "c.yml" in problems(server))
        assert "middleware 'no-such-middleware' is not defined" in problems(server)["c.yml"]
        assert "b.yml" in problems(server)

        write_router(folder, "b", key_rule("KEY-b"))
        write_router(folder, "c", key_rule("KEY-c"))
        assert eventually(lambda: health(server)["status"] == "ok")
        assert health(server)["mappings"]["problems"] == []
        assert health(server)["mappings"]["files"] == 3
        log = server.proc.log().splitlines()

    # each error is logged once when it appears and once when it is gone, not once per scan
    for what in ("also routed by 'a'", "'no-such-middleware' is not defined"):
        assert len([line for line in log if " WARNING " in line and what in line]) == 1
        assert len([line for line in log if " INFO " in line and "gone" in line and what in line]) == 1


def test_skipped_files_are_checked_but_not_asked(tmp_path: Path, folder: Path) -> None:
    """routheon-server.yml is no backend, but Traefik reads it: its errors count, its middleware exists."""
    write_router(folder, "routheon-server", key_rule("KEY-x"), middlewares=("also-missing",))
    (folder / "routheon-server.yml").write_text(
        (folder / "routheon-server.yml").read_text() + "  middlewares:\n    routheon-errors:\n      errors: {}\n"
    )
    write_router(folder, "a", key_rule("KEY-a"), middlewares=("routheon-errors",))
    with serving(["--mappings", str(folder)]) as server:
        assert health(server)["mappings"]["files"] == 1
        assert list(problems(server)) == ["routheon-server.yml"]
        assert "'also-missing' is not defined" in problems(server)["routheon-server.yml"]


HOSTILE = "sk-HOSTILE-0123456789"


def test_health_and_log_never_show_a_key(tmp_path: Path, folder: Path) -> None:
    """/health is reachable through Traefik without a key: not one of these keys may leak."""
    write_router(folder, "quote", key_rule(f"{HOSTILE}'q"))
    write_router(folder, "template", key_rule(f"{HOSTILE}{{{{.Name}}}}"))
    write_router(folder, "space", key_rule(f"{HOSTILE} tail"))
    write_router(folder, "regexp", f"HeaderRegexp(`Authorization`, `^Bearer {HOSTILE}.*$`)")
    write_router(folder, "escape", key_rule(f"{HOSTILE}\\q"))  # not valid YAML: an unknown escape
    write_router(folder, "shared1", key_rule(HOSTILE))
    write_router(folder, "shared2", key_rule(HOSTILE))
    write_router(folder, "opaque", f"Header(`Authorization`, `Bearer {HOSTILE}`) || Host(`{HOSTILE}`)")
    with serving(["--mappings", str(folder), "--log-level", "DEBUG"]) as server:
        answer = request(f"{server.base}/health")
        found = set(problems(server))
        log = server.proc.log()
    assert {"quote.yml", "template.yml", "space.yml", "regexp.yml", "escape.yml", "shared2.yml"} <= found
    assert "HOSTILE" not in answer.body.decode()
    assert "HOSTILE" not in log


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
    with serving(["--mappings", str(folder), "--stats-config-file", str(config)]) as server:
        stats = request(f"{server.base}/stats").json()
    assert set(stats) == {"timestamp", "cpu", "memory"}
    assert set(stats["memory"]) == {"percent"}
    assert "usage_percent" in stats["cpu"]


def test_access_log_at_info(tmp_path: Path, folder: Path) -> None:
    with serving(["--mappings", str(folder), "--log-level", "info"]) as server:
        request(f"{server.base}/v1/models", headers={"Authorization": "Bearer s3cret-KEY"})
    log = server.proc.log()
    assert any('"GET /v1/models HTTP/1.1" 200' in line for line in log.splitlines())
    assert "s3cret" not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(tmp_path: Path, folder: Path, sig: signal.Signals) -> None:
    with running_server(tmp_path, ["--mappings", str(folder)]) as server:
        request(f"{server.base}/v1/models")
        assert server.proc.stop(sig) == 0
    assert "Traceback" not in server.proc.log()


def test_health_carries_traefiks_own_verdict(tmp_path: Path, folder: Path) -> None:
    """A misspelt middleware type: Routheon's reader sees nothing wrong, Traefik rejects the folder."""
    write_router(folder, "a", key_rule("KEY-a"))
    with serving(["--mappings", str(folder)]) as server:
        assert eventually(lambda: health(server)["mappings"]["traefik"]["state"] == "applied")
        assert health(server)["status"] == "ok"
        (folder / "limits.yml").write_text("http:\n  middlewares:\n    slow:\n      rateLimiter:\n        average: 5\n")
        assert eventually(lambda: health(server)["mappings"]["traefik"]["state"] == "rejected")
        answer = health(server)
        assert answer["status"] == "degraded"
        assert "field not found, node: rateLimiter" in answer["mappings"]["traefik"]["reason"]
        assert any("rejects the whole folder" in problem["message"] for problem in answer["mappings"]["problems"])


def test_routheon_traefik_none_turns_the_verdict_off_as_the_flag_does(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to look for a binary named 'none': /health said "unavailable: cannot run none"."""
    write_router(folder, "a", key_rule("KEY-a"))
    monkeypatch.setenv("ROUTHEON_TRAEFIK", "none")
    with serving(["--mappings", str(folder)]) as server:
        answer = health(server)
        assert answer["mappings"]["traefik"] == {"state": "off", "version": "", "reason": ""}
        assert answer["status"] == "ok" and answer["mappings"]["warnings"] != []
        assert "traefik" not in server.proc.log().lower()
