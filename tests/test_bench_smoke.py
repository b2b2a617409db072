"""Keep the benchmark harness from rotting: its wrk parser, and one tiny run end to end.

No timing is asserted here; the numbers only have to exist and come from real requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from bench import fakes, keyfiles, report, stack, tokenpath, wrk
from routheon.mappings.check import inspect_folder
from routheon.mappings.grants import GRANTS_FILE, parse_grants
from support import REPO

SUMMARY = ('WRK_JSON {"requests":1500,"duration_us":3000000,"bytes":99,'
           '"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":3},'
           '"p50_us":250,"p90_us":900,"p99_us":4200,"max_us":9000}')


def test_parse_reads_the_hook_line_among_wrks_own_output() -> None:
    stdout = f"Running 3s test @ http://127.0.0.1:1/\n  1 threads and 4 connections\n{SUMMARY}\n"
    result = wrk.parse_output(stdout, connections=4)
    assert result.rps == 500.0
    assert (result.p50_ms, result.p99_ms) == (0.25, 4.2)
    assert result.failed == 6


def test_parse_without_the_hook_line_says_so() -> None:
    with pytest.raises(ValueError, match="no summary line"):
        wrk.parse_output("Requests/sec: 10\n", connections=1)


def test_no_completed_request_has_no_latency() -> None:
    result = wrk.parse_output(SUMMARY.replace('"requests":1500', '"requests":0'), connections=1)
    assert result.rps == 0 and result.p50_ms is None


def test_header_values_cannot_break_out_of_the_lua_script() -> None:
    script = wrk.lua_script(wrk.Request("http://x/", headers={"Authorization": "Bearer a]]b]=]c"}))
    assert "[==[Bearer a]]b]=]c]==]" in script


def quick_run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``python -m bench --profile quick ARGS``: it succeeded; its stdout and its results."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "quick", *args, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_quick_run_measures_routheon_against_the_floor(tmp_path) -> None:
    proc, results = quick_run(tmp_path, "--parts", "servers,startup", "--only", "models-2", "--targets", "routheon,floor")
    assert "/v1/models, 2 live" in proc.stdout
    rows = results["servers"]
    assert {(row["target"], row["connections"]) for row in rows} == {
        ("routheon", 1), ("routheon", 16), ("floor", 1), ("floor", 16)}
    assert all(row["requests"] > 0 and row["failed"] == 0 for row in rows)
    assert next(row for row in rows if row["target"] == "routheon")["answer"] == {"models": 2}
    assert set(results["startup"]) == {"routheon", "floor"}
    assert all(item["runs"] == 1 and item["median_s"] > 0 for item in results["startup"].values())
    share = next(goal for goal in results["goals"] if goal["goal"].startswith("/v1/models"))
    assert share["value"] is not None
    assert report.text_tables(results) in proc.stdout


def _server_row(case: str, target: str, connections: int, rps: float, p99: float = 5.0) -> dict:
    path = "/v1/models" if case.startswith("models") else "/stats"
    return {"case": case, "title": case, "path": path, "target": target, "connections": connections, "rps": rps,
            "p50_ms": 1.0, "p99_ms": p99, "failed": 0}


def test_goals_count_the_worst_connection_count() -> None:
    results = {"servers": [
        _server_row("stats", "routheon", 1, 3000), _server_row("stats", "original", 1, 1.0),
        _server_row("stats", "routheon", 16, 100, p99=25), _server_row("stats", "original", 16, 1.0),
        _server_row("models-2", "routheon", 1, 900), _server_row("models-2", "floor", 1, 1000),
        _server_row("models-20", "routheon", 1, 400), _server_row("models-20", "floor", 1, 1000),
    ]}
    by_name = {goal["goal"]: goal for goal in report.goals(results)}
    assert by_name["stats: routheon ÷ original req/s"]["value"] == 100
    assert by_name["stats: routheon ÷ original req/s"]["met"] is False
    assert by_name["stats: routheon p99 at 16 connections"]["met"] is False
    assert by_name["/v1/models, every case: routheon ÷ floor req/s"]["value"] == 0.4
    assert by_name["/v1/models, every case: routheon ÷ floor req/s"]["met"] is False
    assert by_name["models-hang: routheon ÷ original req/s"]["met"] is None


def test_one_broken_stream_through_routheon_misses_its_goal() -> None:
    def streams(broken: int) -> dict:
        return {"tokenpath": {"streams": [{"path": "direct", "streams": 2000, "broken": 0},
                                          {"path": "traefik", "streams": 2000, "broken": broken}]}}

    goal = "streams broken through Routheon under CPU load"
    assert {item["goal"]: item for item in report.goals(streams(0))}[goal]["met"] is True
    missed = {item["goal"]: item for item in report.goals(streams(1))}[goal]
    assert missed["met"] is False and missed["shown"] == "1 of 2,000"
    assert report.stream_rows(streams(1))[1] == ["traefik", "2,000", "1", "0.05%"]
    assert {item["goal"]: item for item in report.goals({})}[goal]["met"] is None


def _reuse(path: str, failed: int, connections: int) -> dict:
    return {"path": path, "requests": 10_000, "streams": 5_000, "failed": failed, "backend_connections": connections,
            "connections_per_request": connections / 10_000, "rps": 120.0}


def test_a_lost_request_or_a_new_connection_per_request_misses_the_reuse_goals() -> None:
    results = {"reuse": {"rows": [_reuse("traefik", 0, 5_032), _reuse("traefik-models", 1, 10_000),
                                  _reuse("traefik-bare", 74, 5_012)]}}
    goals = {item["goal"]: item for item in report.goals(results)}
    assert goals["requests lost to a backend closing after streams, key file"]["met"] is True
    assert goals["backend connections per request beyond the streams', key file"]["shown"] == "0.003"
    assert goals["requests lost to a backend closing after streams, granted key"]["shown"] == "1 of 10,000"
    assert goals["requests lost to a backend closing after streams, granted key"]["met"] is False
    assert goals["backend connections per request beyond the streams', granted key"]["met"] is False
    assert report.reuse_rows(results)[2] == ["traefik-bare", "10,000", "5,000", "74", "5,012", "0.501", "0.001", "120"]


def test_token_path_goals_hold_routheon_against_plain_traefik_and_direct() -> None:
    chat = [{"path": path, "stream": True, "p50_ms": p50} for path, p50 in
            (("direct", 16.8), ("traefik", 17.6), ("traefik-models", 18.0))]
    rps = [{"case": "chat", "path": path, "connections": 1, "rps": value} for path, value in
           (("traefik", 3000), ("traefik-bare", 3200), ("litellm", 90))]
    results = {"tokenpath": {"chat": chat, "rps": rps},
               "startup": {"routheon": {"median_s": 0.2}, "original": {"median_s": 0.146}}}
    goals = {item["goal"]: item for item in report.goals(results)}
    assert goals["Routheon adds to time to first token (p50), key file"]["met"] is True
    assert goals["Routheon adds to time to first token (p50), granted key"]["shown"] == "+1.20 ms"
    assert goals["Routheon adds to time to first token (p50), granted key"]["met"] is False
    assert goals["token path: Routheon ÷ plain Traefik (connections reused) req/s"]["shown"] == "94%"
    assert goals["token path: Routheon (Traefik) ÷ LiteLLM req/s"]["met"] is True
    assert goals["start-up: routheon ÷ original (median, exec to first answer)"]["met"] is False


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_quick_run_measures_connection_reuse(tmp_path) -> None:
    proc, results = quick_run(tmp_path, "--parts", "reuse")
    rows = results["reuse"]["rows"]
    assert [row["path"] for row in rows] == ["traefik", "traefik-models", "traefik-bare"]
    assert all(row["requests"] == 200 and row["streams"] == 100 and row["backend_connections"] > 0 for row in rows)
    assert "Connection reuse" in proc.stdout


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_instant_backend_answers_what_the_python_fakes_answer(tmp_path) -> None:
    """The C++ stand-in for llama-server builds from the pinned source and serves the bodies
    bench/fakes.py defines (compiled once into ~/.cache/routheon/bench/, half a minute)."""
    with stack.Stack(tmp_path) as stk:
        base = stack.start_instant_backend(stk)
        assert json.loads(stack.fetch(f"{base}/health")[0]) == {"status": "ok"}
        models = json.loads(stack.fetch(f"{base}/v1/models")[0])
        assert [entry["id"] for entry in models["data"]] == [f"bench-model-{base.rsplit(':', 1)[1]}.gguf"]
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=b'{"messages": []}', method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        expected = fakes.chat_payload()
        assert {**answer, "created": 0} == {**expected, "created": 0}


def _model_route(p50_one: float, p50_many: float, applied: float, ready: float) -> dict:
    paths = [{"path": name, "p50_ms": p50, "p99_ms": 2.0, "rps": 3000, "connections": 8, "failed": 0}
             for name, p50 in (("per-key", 0.4), ("model-routed", p50_one), ("model-routed-10k", p50_many))]
    return {"modelroute": {"paths": paths, "keys": 10_000, "python": {},
                           "ready_s": {"model-routed": [0.1], "model-routed-10k": [0.2, ready]},
                           "applied_s": {"grant": [0.5, applied], "revoke": [0.4]}}}


def test_ten_thousand_keys_goals_count_the_worst_attempt() -> None:
    met = {item["goal"]: item for item in report.goals(_model_route(0.5, 0.7, 1.9, 4.9))}
    assert [met[goal]["met"] for goal in (
        "10,000 keys: p50 above 1 key (model-routed)", "10,000 keys: a grant applied",
        "10,000 keys: a revocation applied", "10,000 keys: Traefik ready after start")] == [True] * 4
    missed = {item["goal"]: item for item in report.goals(_model_route(0.5, 0.81, 2.1, 5.1))}
    assert missed["10,000 keys: p50 above 1 key (model-routed)"]["shown"] == "+0.310 ms"
    assert missed["10,000 keys: a grant applied"]["met"] is False
    assert missed["10,000 keys: Traefik ready after start"]["shown"] == "5.10 s"
    assert not any(item["goal"].startswith("10,000 keys") for item in report.goals({}))


def test_model_route_table_compares_with_the_single_service_key() -> None:
    results = _model_route(0.55, 0.6, 1.0, 1.0)
    rows = report.model_route_rows(results)
    assert [row[0] for row in rows] == ["per-key", "model-routed", "model-routed-10k"]
    assert rows[0][3] == "–" and rows[1][3] == "+0.150"
    assert report.many_keys_rows(results)[3] == ["revocation applied, 10,000 keys", "0.40", "0.40", "0.40", "1"]
    assert "One key, many models" in report.markdown_tables(results)


def test_model_routed_path_grants_one_key_both_backends_by_model(tmp_path) -> None:
    """traefik-models' folder: key-less service files and a grants file naming the hop's port."""
    with stack.Stack(tmp_path) as stk:
        backends = {"llama-server": ("http://127.0.0.1:1", "smollm"), "instant": ("http://127.0.0.1:2", "fake")}
        folder = tokenpath.write_model_mappings(stk, "http://127.0.0.1:3", backends, hop_port=4567)
    grants = parse_grants((folder / GRANTS_FILE).read_text())
    assert grants.hop_port == 4567
    assert grants.models_of(tokenpath.MODELS_KEY) == ("smollm", "fake")
    assert sorted(path.name for path in folder.iterdir()) == [
        "instant.yml", "llama-server.yml", GRANTS_FILE, "routheon-server.yml"]
    assert inspect_folder(folder).errors == ()


def test_key_file_folders_differ_only_in_the_guards(tmp_path) -> None:
    folders = {guarded: keyfiles.write_folder(tmp_path / str(guarded), "http://127.0.0.1:1", "http://127.0.0.1:2", 3,
                                              guarded) for guarded in (True, False)}
    for guarded, folder in folders.items():
        mappings = inspect_folder(folder).files
        clauses = [clause for mapping in mappings for _, clause in mapping.key_clauses()]
        assert {clause.guarded for clause in clauses} == {guarded}
        assert keyfiles.KEY in {clause.key for clause in clauses}
        assert all(not mapping.urls or "healthCheck" not in mapping.path.read_text() for mapping in mappings)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_quick_run_measures_model_routing_and_ten_thousand_keys(tmp_path) -> None:
    proc, results = quick_run(tmp_path, "--parts", "modelroute,keyfiles")
    rows = results["modelroute"]["paths"]
    assert [row["path"] for row in rows] == ["plain", "per-key", "plugin-only", "model-routed", "model-routed-10k"]
    assert all(row["rps"] > 0 and row["failed"] == 0 for row in rows)
    goals = [goal for goal in results["goals"] if goal["goal"].startswith("10,000 keys")]
    assert len(goals) == 4 and all(goal["value"] is not None for goal in goals)
    folders = results["keyfiles"]["folders"]
    assert [row["path"] for row in folders] == ["guarded", "unguarded"]
    assert all(row["rps"] > 0 and row["failed"] == 0 and row["files"] == 20 for row in folders)
    assert folders[0]["bytes"] > folders[1]["bytes"]
    assert report.text_tables(results) in proc.stdout
