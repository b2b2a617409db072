"""Units of routheon-server: merging, answer checks, the stats filter and config, error bodies."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from unittest import mock

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from routheon.server import errors, protocol, stats
from routheon.server.models import BackendError, merge, parse_models_answer
from routheon.server.stats import StatsConfig, StatsConfigError, collect, parse_stats_config, system_identity


def llama(*names: str, owner: str = "") -> dict:
    return {
        "models": [{"name": name, "model": name} for name in names],
        "object": "list",
        "data": [{"id": name, "object": "model", "owned_by": owner} for name in names],
    }


class TestMerge:
    def test_sorted_union_first_seen_wins(self) -> None:
        data, models = merge([llama("b", "a", owner="first"), llama("a", "c", owner="second")])
        assert [entry["id"] for entry in data] == ["a", "b", "c"]
        assert data[0]["owned_by"] == "first"
        assert [entry["model"] for entry in models] == ["a", "b", "c"]

    def test_lists_are_aligned_and_filled(self) -> None:
        openai_only = {"data": [{"id": "x"}]}
        llama_only = {"data": [], "models": [{"name": "y"}]}
        data, models = merge([openai_only, llama_only])
        assert data == [{"id": "x"}, {"id": "y"}]
        assert models == [{"model": "x", "name": "x"}, {"name": "y"}]

    def test_model_wins_over_name(self) -> None:
        _, models = merge([{"data": [], "models": [{"name": "file.gguf", "model": "alias"}]}])
        assert models == [{"name": "file.gguf", "model": "alias"}]

    def test_odd_entries_are_ignored(self) -> None:
        payload = {"data": ["text", None, {"id": ""}, {"id": None}, {"no": "id"}, {"id": "ok"}], "models": "nope"}
        data, models = merge([payload])
        assert [entry["id"] for entry in data] == ["ok"]
        assert models == [{"model": "ok", "name": "ok"}]

    def test_nothing(self) -> None:
        assert merge([]) == ([], [])


class TestParseAnswer:
    def test_llama_answer(self) -> None:
        assert parse_models_answer(json.dumps(llama("m")).encode())["data"][0]["id"] == "m"

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"<html>oops</html>", "not JSON"),
            (b"\xff\xfe\x00", "not JSON"),
            (b"[1, 2]", "list"),
            (b'"text"', "str"),
            (b'{"object": "list"}', "data"),
            (b'{"data": {"id": "m"}}', "data"),
        ],
    )
    def test_unusable_answers(self, body: bytes, reason: str) -> None:
        with pytest.raises(BackendError, match=reason):
            parse_models_answer(body)


STATS = collect(12.5, system_identity())


class TestStatsFilter:
    def test_no_config_shows_all(self) -> None:
        assert StatsConfig().apply(STATS) == STATS

    def test_sections_keep_timestamp(self) -> None:
        shown = StatsConfig(sections=frozenset({"cpu"})).apply(STATS)
        assert set(shown) == {"timestamp", "cpu"}

    def test_fields_narrow_a_section(self) -> None:
        shown = StatsConfig(fields={"memory": frozenset({"percent", "total"})}).apply(STATS)
        assert set(shown) == set(STATS) and set(shown["memory"]) == {"percent", "total"}

    def test_empty_field_list_empties_the_section(self) -> None:
        assert StatsConfig(fields={"system": frozenset()}).apply(STATS)["system"] == {}

    def test_cpu_usage_comes_from_the_sampler(self) -> None:
        assert STATS["cpu"]["usage_percent"] == 12.5


class TestCpuSampler:
    def test_starting_never_blocks_on_a_measurement(self, monkeypatch: pytest.MonkeyPatch) -> None:
        intervals = []

        def cpu_percent(interval: float | None = None) -> float:
            intervals.append(interval)
            return 37.5

        monkeypatch.setattr(psutil, "cpu_percent", cpu_percent)
        monkeypatch.setattr(stats, "FIRST_SAMPLE_AFTER", 0.01)

        async def scenario() -> tuple[float, float]:
            service = stats.StatsService()
            await service.start()
            before = json.loads(service.body())["cpu"]["usage_percent"]
            await asyncio.sleep(0.2)
            after = json.loads(service.body())["cpu"]["usage_percent"]
            await service.stop()
            return before, after

        before, after = asyncio.run(scenario())
        assert intervals and all(interval is None for interval in intervals)
        assert 0 < before <= 100 and before != 37.5, "until the first sample: the average since boot"
        assert after == 37.5


class TestStatsConfig:
    def test_full_config(self) -> None:
        config = parse_stats_config(
            "enabled_sections: [cpu, memory]\nenabled_fields:\n  memory: [percent]\n  cpu: null\n", "c.yml"
        )
        assert config.sections == {"cpu", "memory"}
        assert config.fields == {"memory": {"percent"}, "cpu": frozenset()}

    def test_fields_only_keeps_every_section(self) -> None:
        config = parse_stats_config("enabled_fields:\n  disk: [percent]\n", "c.yml")
        assert config.sections is None and set(config.apply(STATS)) == set(STATS)

    def test_empty_file_limits_nothing_and_says_so(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING):
            config = parse_stats_config("", "empty.yml")
        assert not config.limits_anything
        assert "empty.yml" in caplog.text

    def test_unknown_section_warns(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING):
            parse_stats_config("enabled_sections: [cpu, gpu]\n", "c.yml")
        assert "gpu" in caplog.text

    @pytest.mark.parametrize(
        "text",
        [
            "enabled_sections: [cpu\n",
            "just text\n",
            "enabled_sections: cpu\n",
            "enabled_sections: [1, 2]\n",
            "enabled_fields: [cpu]\n",
            "enabled_fields: []\n",
            "enabled_fields:\n  cpu: percent\n",
            "enabled: [cpu]\n",
        ],
    )
    def test_wrong_shapes_are_errors(self, text: str) -> None:
        with pytest.raises(StatsConfigError, match="c.yml"):
            parse_stats_config(text, "c.yml")

    def test_example_config_of_the_repository(self) -> None:
        example = Path(__file__).resolve().parent.parent / "stats-config.yml"
        config = parse_stats_config(example.read_text(), str(example))
        assert config.limits_anything


class TestErrors:
    def test_401_depends_on_the_header(self) -> None:
        assert errors.for_status(401, has_authorization=True).code == "invalid_api_key"
        assert errors.for_status(401).code == "missing_api_key"

    @pytest.mark.parametrize("status", [502, 503, 504])
    def test_backend_errors_are_server_errors(self, status: int) -> None:
        error = errors.for_status(status)
        assert error.status == status and error.type == "server_error" and error.code.startswith("backend_")

    def test_unnamed_status_still_has_a_body(self) -> None:
        error = errors.for_status(599)
        assert error.body()["error"]["type"] == "server_error" and error.body()["error"]["message"]


def test_an_exception_past_the_middleware_is_an_openai_error(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's own answer would be plain text; the log keeps the traceback, not the query."""

    async def scenario() -> web.StreamResponse:
        handler = protocol.RequestHandler(mock.Mock(), loop=asyncio.get_running_loop())
        request = make_mocked_request("GET", "/v1/models?api_key=sk-SECRET")
        return handler.handle_error(request, 500, RuntimeError("boom"))

    with caplog.at_level(logging.INFO):
        response = asyncio.run(scenario())
    assert isinstance(response, web.Response) and response.content_type == "application/json"
    assert response.status == 500 and json.loads(response.body)["error"]["type"] == "server_error"
    assert "boom" in caplog.text and "sk-SECRET" not in caplog.text


def test_the_grants_files_hop_is_never_asked_for_models(tmp_path: Path) -> None:
    """The grants file's one service is Traefik's hop entry point: no backend of /v1/models."""
    from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, render_grants
    from routheon.server.discovery import scan_mappings
    from routheon.server.models import backend_folder

    (tmp_path / GRANTS_FILE).write_text(render_grants(Grants(services=(GrantedService("s1", ("m1",)),))))
    (tmp_path / "s1.yml").write_text(
        "http:\n  services:\n    s1:\n      loadBalancer:\n        servers:\n          - url: http://127.0.0.1:8011\n"
    )
    assert backend_folder(scan_mappings(tmp_path, ())).backend_urls() == ["http://127.0.0.1:8011"]
