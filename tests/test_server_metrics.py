"""routheon-server's /metrics: usage counters equal the record files, backends, the folder's
verdict and the server's own requests, on a port of its own that Traefik never routes."""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import Backends, running_server, serving, write_mapping
from support import request
from traefik_stack import Stack
from usage_samples import append, line, record, secrets

from routheon.loopback import free_port
from routheon.server.config import parse_args
from routheon.server.metrics import MAX_MODELS_PER_NAME, OTHER_MODEL, UsageCounters
from routheon.supervisor import eventually

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ELLIPSIS = "\u2026"


def scrape(url: str) -> Samples:
    reply = request(url)
    assert reply.status == 200, reply.body
    text = reply.body.decode()
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert not any(secret in text for secret in secrets())  # no key, no hash: names and …hints
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key_counts(samples: Samples) -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
    requests: Counter[tuple[str, ...]] = Counter()
    tokens: Counter[tuple[str, ...]] = Counter()
    for (name, labels), value in samples.items():
        shown = dict(labels)
        if name == "routheon_key_requests_total":
            requests[(shown["name"], shown["model"], shown["code"])] = int(value)
        elif name == "routheon_key_tokens_total":
            tokens[(shown["name"], shown["model"], shown["type"])] = int(value)
    return requests, tokens


def expected(records: list[dict[str, Any]]) -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
    """The counters the files call for, summed here from what was written, not by routheon's reader."""
    requests: Counter[tuple[str, ...]] = Counter()
    tokens: Counter[tuple[str, ...]] = Counter()
    for fields in records:
        who = fields["name"] or ELLIPSIS + fields["hint"]
        requests[(who, fields["model"], str(fields["code"]))] += 1
        for kind in ("prompt", "completion"):
            if fields[f"{kind}_tokens"]:
                tokens[(who, fields["model"], kind)] += fields[f"{kind}_tokens"]
    return requests, tokens


def test_usage_counters_equal_the_record_files_and_follow_them(tmp_path: Path) -> None:
    usage = tmp_path / "usage"
    first = [
        record("alice", prompt=10, completion=20),
        record("alice", prompt=1, completion=2, stream=True),
        record("alice", model="m2", code=502, prompt=None, completion=None, outcome="error"),
        record("bob", time="2026-12-07T23:00:00.000Z", code=429, prompt=None, completion=None, outcome="refused"),
        record("", prompt=5, completion=0),
    ]
    append(usage, "2026-12-07.1.jsonl", first[3])
    append(usage, "2026-12-08.1.jsonl", first[0], b"garbage\n", first[1])
    late = record("bob", prompt=7, completion=8)
    cut = line(late)
    append(usage, "2026-12-08.2.jsonl", first[2], first[4], cut[:30])  # the last line is still being written
    with serving(["--mappings", str(tmp_path), "--usage", str(usage), "--traefik", "none"]) as server:
        assert server.metrics is not None
        samples = scrape(server.metrics)
        assert key_counts(samples) == expected(first)
        assert samples[("routheon_usage_lines_skipped_total", (("reason", "garbage"),))] == 1
        # the rest of the line, and another process's file: read on from where the last scrape stopped
        append(usage, "2026-12-08.2.jsonl", cut[30:])
        more = record("alice", model="m3", prompt=3, completion=4)
        append(usage, "2026-12-08.3.jsonl", more)
        assert eventually(lambda: key_counts(scrape(server.metrics)) == expected([*first, late, more]), timeout=10)
        assert "usage records: " in server.proc.log() and "not usage records" in server.proc.log()


def test_a_missing_usage_folder_is_zero_counters_without_an_error(tmp_path: Path) -> None:
    with serving(["--mappings", str(tmp_path), "--usage", str(tmp_path / "not-yet"), "--traefik", "none"]) as server:
        assert server.metrics is not None
        assert key_counts(scrape(server.metrics)) == (Counter(), Counter())
        assert "ERROR" not in server.proc.log() and "WARNING" not in server.proc.log()
        append(tmp_path / "not-yet", "2026-12-08.1.jsonl", record("alice"))  # the plugin creates it later
        assert eventually(lambda: key_counts(scrape(server.metrics)) == expected([record("alice")]), timeout=10)


def test_backends_the_folder_verdict_and_the_servers_own_requests(tmp_path: Path, backends: Backends) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_mapping(folder, "alpha.yml", backends.url("ok/alpha"))
    write_mapping(folder, "dead.yml", f"http://127.0.0.1:{free_port()}")
    with serving(["--mappings", str(folder), "--usage", str(tmp_path / "usage"), "--traefik", "none"]) as server:
        assert server.metrics is not None
        assert request(f"{server.base}/health").status == 200
        assert request(f"{server.base}/no/such/path").status == 404
        samples = scrape(server.metrics)
        assert samples[("routheon_backend_up", (("service", "alpha"),))] == 1
        assert samples[("routheon_backend_up", (("service", "dead"),))] == 0
        assert samples[("routheon_mappings_applied", ())] == 1
        assert samples[("routheon_mapping_errors", ())] == 0
        assert samples[("routheon_server_requests_total", (("code", "200"), ("path", "/health")))] >= 1
        assert samples[("routheon_server_requests_total", (("code", "404"), ("path", "(unmatched)")))] == 1
        assert samples[("routheon_server_request_duration_seconds_count", (("path", "/health"),))] >= 1
        assert ("process_resident_memory_bytes", ()) in samples
        (folder / "broken.yml").write_text("http: [\n")  # Traefik rejects the whole folder for this
        assert eventually(lambda: scrape(server.metrics)[("routheon_mappings_applied", ())] == 0, timeout=10)
        assert scrape(server.metrics)[("routheon_mapping_errors", ())] >= 1


def test_metrics_are_not_served_on_the_main_port(tmp_path: Path) -> None:
    with serving(["--mappings", str(tmp_path), "--traefik", "none"]) as server:
        assert server.metrics is not None
        main = request(f"{server.base}/metrics")
        assert main.status == 404 and main.json()["error"]["code"] == "not_found"
        assert request(server.metrics.replace("/metrics", "/health")).status == 404  # /metrics alone there


def test_model_labels_are_capped_per_name(tmp_path: Path) -> None:
    """A client with a valid key may send any model name: the scrape must not grow with them."""
    models = [f"model-{index}" for index in range(MAX_MODELS_PER_NAME + 5)]
    append(tmp_path, "2026-12-08.1.jsonl", *(record("alice", model=model) for model in models), record("bob"))
    counters = UsageCounters(tmp_path)
    asyncio.run(counters.refresh())
    requests = {
        tuple(sample.labels.values()): sample.value
        for family in counters.collect()
        if family.name == "routheon_key_requests"
        for sample in family.samples
    }
    assert requests[("alice", OTHER_MODEL, "200")] == 5
    assert len([labels for labels in requests if labels[0] == "alice"]) == MAX_MODELS_PER_NAME + 1
    assert requests[("bob", "m1", "200")] == 1  # another name has its own allowance


def test_metrics_port_zero_turns_it_off_and_a_taken_port_does_not_stop_the_server(tmp_path: Path) -> None:
    with running_server(tmp_path, ["--mappings", str(tmp_path), "--metrics-port", "0", "--log-level", "INFO"]) as server:
        assert request(f"{server.base}/health").status == 200
        assert "listening on" in server.proc.log() and "metrics on" not in server.proc.log()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with running_server(tmp_path, ["--mappings", str(tmp_path), "--metrics-port", str(port)]) as server:
            assert request(f"{server.base}/health").status == 200
            assert eventually(lambda: f"cannot listen on 127.0.0.1:{port} for /metrics" in server.proc.log())


def test_metrics_port_defaults_to_9180_on_the_same_host() -> None:
    config = parse_args(["--host", "::1"])
    assert (config.host, config.metrics_port) == ("::1", 9180)
    assert parse_args(["--metrics-port", "0"]).metrics_port == 0


@pytest.mark.traefik
def test_traefik_never_routes_metrics_to_a_client(tmp_path: Path) -> None:
    """With the shipped routheon-server.yml: no key or a bad key is a 401, a key reaches its llama-server."""
    key = "sk-metrics-test-0123456789"
    with Stack(tmp_path) as stack:
        backend = stack.start_backend("alpha")
        stack.routheon("mapping", "add", "--service", "alpha", "--url", backend.url, "--key", key, "--traefik", "none")
        stack.wait_for(lambda: stack.backend_of(key) == "alpha")
        answers = [stack.request("/metrics"), stack.request("/metrics", key="no-such-key")]
        assert [answer.status for answer in answers] == [401, 401]
        own = stack.request("/metrics", key=key)
        assert own.headers.get("X-Backend") == "alpha"  # the key's llama-server answers its own /metrics
        for answer in (*answers, own):
            assert b"routheon_" not in answer.body
        samples = scrape(f"http://127.0.0.1:{stack.metrics_port}/metrics")  # where it is served
        assert samples[("routheon_backend_up", (("service", "alpha"),))] == 1



def test_an_unreadable_usage_folder_is_said_once_and_keeps_the_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    append(tmp_path, "2026-12-08.1.jsonl", record("alice"))
    now = [0.0]
    counters = UsageCounters(tmp_path, clock=lambda: now[0])

    def requests() -> dict[tuple[str, ...], float]:
        return {
            tuple(sample.labels.values()): sample.value
            for family in counters.collect()
            if family.name == "routheon_key_requests"
            for sample in family.samples
        }

    asyncio.run(counters.refresh())
    assert requests() == {("alice", "m1", "200"): 1}

    def refused(path: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", refused)  # root reads any folder: the refusal is simulated
    for _ in range(3):
        now[0] += 1.0
        asyncio.run(counters.refresh())
    said = [r.getMessage() for r in caplog.records if "cannot read the usage folder" in r.getMessage()]
    assert said == [f"cannot read the usage folder {tmp_path}: Permission denied; usage counters stay as they are"]
    assert requests() == {("alice", "m1", "200"): 1}
