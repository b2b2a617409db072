"""Routing through the real Traefik binary, as a client and an operator see it."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from routheon.mappings.format import MappingSpec, render_mapping
from samples import SEED_MAPPING
from support import REPO, VENV_BIN
from traefik_stack import Backend, Stack

pytestmark = pytest.mark.traefik

ALPHA_KEY = "sk-alpha-0123456789abcdef"
BETA_KEY = "sk-beta-0123456789abcdef"
REGEX_KEYS = ["k.y+2$", r"^a\d*(b|c)[x]{2}?$", "{single}|;&!#:%*"]
NEAR_MISSES = ["kky+2$", "k.y+2", "k.yy2$", r"^a1bxx$", "{single}", ALPHA_KEY[:-1], ALPHA_KEY + "x", ""]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as running:
        yield running


@pytest.fixture
def two_backends(stack: Stack) -> Stack:
    alpha = stack.start_backend("alpha")
    beta = stack.start_backend("beta")
    stack.routheon("mapping", "add", "--service", "alpha", "--url", alpha.url, "--key", ALPHA_KEY)
    stack.routheon("mapping", "add", "--service", "beta", "--url", beta.url, "--key", BETA_KEY)
    stack.wait_for(lambda: stack.backend_of(ALPHA_KEY) == "alpha" and stack.backend_of(BETA_KEY) == "beta")
    return stack


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status == status, response.body
    assert response.headers.get("Content-Type", "").startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    if code is not None:
        assert error["code"] == code
    return error


def test_each_key_reaches_its_backend_with_the_openai_client(two_backends: Stack) -> None:
    for key, name in ((ALPHA_KEY, "alpha"), (BETA_KEY, "beta")):
        client = openai.OpenAI(base_url=f"{two_backends.url}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == f"hello from {name}"
    intruder = openai.OpenAI(base_url=f"{two_backends.url}/v1", api_key="sk-wrong-0123456789abcdef", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        intruder.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401


def test_a_second_authorization_header_never_rides_along_with_a_key(stack: Stack) -> None:
    """A key routes only when every Authorization header of the request holds that same key."""
    alpha, beta = stack.start_backend("alpha"), stack.start_backend("beta")
    longest = "k" * 1024  # its guard takes five expressions: Go caps how deep one may nest
    stack.routheon("mapping", "add", "--service", "alpha", "--url", alpha.url, "--key", ALPHA_KEY, "--key", longest)
    stack.routheon("mapping", "add", "--service", "beta", "--url", beta.url, "--key", BETA_KEY)
    stack.wait_for(lambda: stack.backend_of(ALPHA_KEY) == "alpha" and stack.backend_of(BETA_KEY) == "beta")

    def send(*values: str):  # type: ignore[no-untyped-def]
        return stack.send("GET", "/v1/models", [("Authorization", value) for value in values])

    assert send(f"Bearer {longest}").headers.get("X-Backend") == "alpha"
    assert send(f"Bearer {ALPHA_KEY}", f"Bearer {ALPHA_KEY}").headers.get("X-Backend") == "alpha"
    for pair in itertools.permutations([f"Bearer {ALPHA_KEY}", f"Bearer {BETA_KEY}", f"Bearer {longest}", "Basic eDp5"], 2):
        answer = send(*pair)
        assert answer.headers.get("X-Backend") is None, pair
        assert_openai_error(answer, 401, "invalid_api_key")


def test_keys_full_of_regex_characters_match_only_themselves(stack: Stack) -> None:
    backend = stack.start_backend("regex")
    args = [arg for key in REGEX_KEYS for arg in ("--key", key)]
    stack.routheon("mapping", "add", "--service", "regex", "--url", backend.url, *args)
    stack.wait_for(lambda: stack.backend_of(REGEX_KEYS[0]) == "regex")
    for key in REGEX_KEYS:
        assert stack.backend_of(key, "/v1/chat/completions") == "regex", key
    for near_miss in NEAR_MISSES:
        response = stack.request("/v1/chat/completions", key=near_miss, method="POST", body={})
        assert_openai_error(response, 401)
        assert "X-Backend" not in response.headers


def test_missing_or_unknown_key_gets_401_on_every_path(two_backends: Stack) -> None:
    paths = (("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/", "GET"), ("/stats/x", "GET"))
    for path, method in paths:
        missing = two_backends.request(path, method=method, body={} if method == "POST" else None)
        assert_openai_error(missing, 401, "missing_api_key")
        unknown = two_backends.request(path, key="sk-nope-0123456789abcdef", method=method)
        assert_openai_error(unknown, 401, "invalid_api_key")
    assert_openai_error(two_backends.request("/v1/models", key="sk-nope-0123456789abcdef"), 401, "invalid_api_key")
    assert_openai_error(two_backends.request("/stats", key="sk-nope-0123456789abcdef"), 401, "invalid_api_key")


def test_keyless_models_aggregate_and_a_key_sees_its_own(two_backends: Stack) -> None:
    def keyless_ids() -> set[str]:
        response = two_backends.request("/v1/models")
        return {model["id"] for model in response.json()["data"]} if response.status == 200 else set()

    two_backends.wait_for(lambda: keyless_ids() == {"alpha", "beta"}, what="aggregated /v1/models")
    own = two_backends.request("/v1/models", key=ALPHA_KEY).json()
    assert [model["id"] for model in own["data"]] == ["alpha"]
    health = two_backends.request("/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    assert two_backends.request("/stats").status == 200


def test_a_stopped_backend_gives_an_openai_5xx_without_the_key(two_backends: Stack) -> None:
    two_backends.backends[0].stop()
    response = two_backends.request("/v1/chat/completions", key=ALPHA_KEY, method="POST", body={"messages": []})
    error = assert_openai_error(response, response.status)
    assert response.status in (502, 503, 504)
    assert ALPHA_KEY not in response.body.decode()
    assert "not reachable" in error["message"] or "unavailable" in error["message"]
    assert two_backends.backend_of(BETA_KEY) == "beta"


def test_a_backend_that_answers_too_late_gives_an_openai_504(tmp_path: Path) -> None:
    with Stack(tmp_path, response_timeout="1s") as stack:
        backend = stack.start_backend("slow")
        stack.routheon("mapping", "add", "--service", "slow", "--url", backend.url, "--key", ALPHA_KEY)
        stack.wait_for(lambda: stack.backend_of(ALPHA_KEY, "/health") == "slow")
        response = stack.request("/v1/completions?sleep=5", key=ALPHA_KEY, method="POST", body={})
        error = assert_openai_error(response, 504, "backend_timeout")
        assert "did not answer in time" in error["message"]


def test_a_rotated_key_moves_to_its_new_backend_without_restart(two_backends: Stack) -> None:
    gamma = two_backends.start_backend("gamma")
    script = REPO / "traefik" / "create-mapping" / "create-mapping.sh"
    subprocess.run(
        [str(script), "--port", str(gamma.port), "--service", "gamma", "--api_key", ALPHA_KEY,
         "--mappings", str(two_backends.mappings)],
        check=True, capture_output=True, env={**os.environ, "ROUTHEON_BIN": str(VENV_BIN / "routheon")}, timeout=60,
    )
    two_backends.wait_for(lambda: two_backends.backend_of(ALPHA_KEY) == "gamma", what="key rotation")
    assert two_backends.backend_of(BETA_KEY) == "beta"
    two_backends.routheon("mapping", "remove", "--service", "beta")
    two_backends.wait_for(lambda: two_backends.request("/v1/models", key=BETA_KEY).status == 401, what="revocation")


def test_streamed_chunks_arrive_as_they_are_sent(stack: Stack) -> None:
    backend = stack.start_backend("stream", chunk_interval=0.1, chunks=4)
    stack.routheon("mapping", "add", "--service", "stream", "--url", backend.url, "--key", ALPHA_KEY)
    assert "routheon-errors" in (stack.mappings / "stream.yml").read_text()
    stack.wait_for(lambda: stack.backend_of(ALPHA_KEY) == "stream")
    body = json.dumps({"stream": True, "hold": True, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", "Content-Type": "application/json"}
    assert _held_stream(stack.port, backend, body, headers) == ["0 ", "1 ", "2 ", "3 "]


def _held_stream(port: int, backend: Backend, body: str, headers: dict[str, str]) -> list[str]:
    """The contents of one held stream: its first chunk must arrive before the backend is released."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        events = (line.strip()[6:] for line in response.fp if line.startswith(b"data: "))
        # The backend sends nothing more until released: a buffering proxy would never pass this.
        first = next(events, None)
        backend.release()
        if first is None:
            return []
        rest = list(itertools.takewhile(lambda data: data != b"[DONE]", events))
    finally:
        connection.close()
    return [json.loads(data)["choices"][0]["delta"]["content"] for data in (first, *rest)]


def test_a_hand_written_seed_mapping_keeps_working(stack: Stack) -> None:
    backend = stack.start_backend("seed")
    (stack.mappings / "llama-server-1.yml").write_text(SEED_MAPPING.replace("http://127.0.0.1:8011", backend.url))
    stack.wait_for(lambda: stack.backend_of("API_KEY-1") == "seed")
    listing = stack.routheon("mapping", "list").stdout
    assert "llama-server-1" in listing and backend.url in listing


def test_a_broken_file_is_reported_before_it_bites(two_backends: Stack) -> None:
    broken = two_backends.mappings / "broken.yml"
    broken.write_text('http:\n  routers:\n    x:\n      rule: "Header(`Authorization`, `Bearer a\\q`)"\n')

    def health() -> dict:
        return two_backends.request("/health").json()

    two_backends.wait_for(lambda: health()["status"] == "degraded", what="degraded /health")
    (problem,) = health()["mappings"]["problems"]
    assert problem["file"] == "broken.yml" and problem["line"] == 4
    check = two_backends.routheon("mapping", "check", "--no-connect", check=False)
    assert check.returncode == 1 and f"{broken}:4: error: not valid YAML" in check.stdout


def test_without_routheon_server_keys_still_route(tmp_path: Path) -> None:
    with Stack(tmp_path, with_server=False) as bare:
        backend = bare.start_backend("solo")
        bare.routheon("mapping", "add", "--service", "solo", "--url", backend.url, "--key", ALPHA_KEY)
        bare.wait_for(lambda: bare.backend_of(ALPHA_KEY) == "solo")
        unknown = bare.request("/v1/models", key="sk-nope-0123456789abcdef")
        assert unknown.status == 404 and "X-Backend" not in unknown.headers


def test_error_pages_do_not_depend_on_the_order_files_arrive_in(stack: Stack) -> None:
    """The original's production guide: key mappings first, routheon-server.yml copied in later."""
    (stack.mappings / "routheon-server.yml").unlink()
    stack.wait_for(lambda: stack.request("/", key="sk-nope-0123456789abcdef").status == 404, what="no catch-all")
    backend = stack.start_backend("early")
    stack.routheon("mapping", "add", "--service", "early", "--url", backend.url, "--key", ALPHA_KEY)
    stack.wait_for(lambda: stack.backend_of(ALPHA_KEY) == "early")
    backend.stop()
    down = stack.request("/v1/models", key=ALPHA_KEY)
    assert down.status in (502, 503) and down.body == b"Bad Gateway"
    stack.install_server_mapping()
    stack.wait_for(lambda: stack.request("/v1/models", key=ALPHA_KEY).body != b"Bad Gateway", what="error pages")
    assert_openai_error(stack.request("/v1/models", key=ALPHA_KEY), down.status)
    check = stack.routheon("mapping", "check", "--no-connect", check=False)
    assert check.returncode == 0 and "without OpenAI error pages" not in check.stdout


def test_backups_and_temporary_files_are_not_read_by_traefik(two_backends: Stack) -> None:
    ghost = "sk-ghost-0123456789abcdef"
    alpha = two_backends.backends[0].url
    for name in ("ghost.yml.bak.20250101-000000", ".ghost.yml.abc123.tmp", "ghost.yml.bak.20250101-000000.1"):
        (two_backends.mappings / name).write_text(render_mapping(MappingSpec("ghost", (alpha,), (ghost,))))
    (two_backends.mappings / "visible.yml").write_text(render_mapping(MappingSpec("visible", (alpha,), (ghost,))))
    two_backends.wait_for(lambda: two_backends.backend_of(ghost) == "alpha", what="visible.yml to be read")
    (two_backends.mappings / "visible.yml").unlink()
    two_backends.wait_for(lambda: two_backends.request("/v1/models", key=ghost).status == 401, what="ghost gone")


def test_keys_keep_routing_while_routheon_server_is_stopped(two_backends: Stack) -> None:
    assert two_backends.server is not None
    two_backends.server.stop()
    assert two_backends.backend_of(ALPHA_KEY) == "alpha"
    unknown = two_backends.request("/v1/models", key="sk-nope-0123456789abcdef")
    assert (unknown.status, unknown.body) == (502, b"Bad Gateway")
    two_backends.backends[0].stop()
    down = two_backends.request("/v1/models", key=ALPHA_KEY)
    assert down.status in (502, 503) and down.body == b"Bad Gateway"


def test_replicas_share_the_load_and_a_dead_one_is_left_out(stack: Stack) -> None:
    first, second = stack.start_backend("replica-1"), stack.start_backend("replica-2")
    stack.routheon("mapping", "add", "--service", "pool", "--url", first.url, "--url", second.url, "--key", ALPHA_KEY)
    seen: set[str | None] = set()
    stack.wait_for(lambda: seen.add(stack.backend_of(ALPHA_KEY)) or {"replica-1", "replica-2"} <= seen)
    first.stop()
    # The health check takes the dead replica out of the rotation within one interval.
    stack.wait_for(
        lambda: all(stack.backend_of(ALPHA_KEY) == "replica-2" for _ in range(4)), timeout=30, what="failover"
    )
