"""One key, many models: the real Traefik with Routheon's plugin routes a key by the body's model.

Fake backends name themselves in every answer (``X-Backend``), so each test can tell which
service a request reached. Design: docs/model-routing.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import yaml

from routheon.demo.models import SMOLLM2
from routheon.loopback import free_port
from routheon.mappings.format import FALLBACK_PRIORITY, MappingSpec, render_mapping
from routheon.mappings.grants import (
    GRANTS_FILE,
    GRANTS_PRIORITY,
    HOP_HEADER,
    MODELS_PRIORITY,
    GrantedService,
    Grants,
    render_grants,
)
from routheon.mappings.rules import header_rule
from routheon.supervisor import start_child
from support import Reply, request
from traefik_stack import SERVER_MAPPING, Stack

pytestmark = pytest.mark.traefik

BOTH_KEY = "sk-both-0123456789abcdef"
ALPHA_KEY = "sk-alpha-only-0123456789"
ANY_KEY = "sk-any-model-0123456789"  # one service without declared models: today's behaviour
OLD_KEY = "sk-old-format-0123456789"
SERVICES = (GrantedService("alpha", ("alpha-model", "alias-a")), GrantedService("beta", ("beta-model",)))


def grants_for(stack: Stack) -> Grants:
    grants = Grants(services=SERVICES, hop_port=stack.hop_port).with_service(GrantedService("gamma"))
    return grants.grant(BOTH_KEY, ("alpha", "beta")).grant(ALPHA_KEY, ("alpha",)).grant(ANY_KEY, ("gamma",))


def write_grants(stack: Stack, grants: Grants) -> None:
    (stack.mappings / GRANTS_FILE).write_text(render_grants(replace(grants, hop_port=stack.hop_port)))


def write_service(stack: Stack, name: str, url: str, keys: tuple[str, ...] = ()) -> None:
    """A service's own NAME.yml as ``routheon mapping add`` writes it (keys in the original format)."""
    spec = MappingSpec(name, (url,), keys or (f"sk-unused-{name}-0123456789",))
    (stack.mappings / f"{name}.yml").write_text(render_mapping(spec))


def chat(stack: Stack, key: str, body: object, path: str = "/v1/chat/completions") -> Reply:
    return stack.request(path, key=key, method="POST", body=body)


def raw_post(
    stack: Stack, body: bytes, headers: list[tuple[str, str]], path: str = "/v1/chat/completions"
) -> tuple[int, str | None, bytes]:
    """A POST with exactly these headers and bytes (repeated headers, non-JSON bodies)."""
    answer = stack.send("POST", path, headers, body)
    return answer.status, answer.headers.get("X-Backend"), answer.body


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two model services (alpha, beta), one without models (gamma), and the grants file."""
    with Stack(tmp_path_factory.mktemp("routed")) as stack:
        for name in ("alpha", "beta", "gamma"):
            write_service(stack, name, stack.start_backend(name, chunk_interval=0.05).url)
        write_grants(stack, grants_for(stack))
        stack.wait_for(lambda: stack.backend_of(ALPHA_KEY, "/health") == "alpha")
        yield stack


def error_of(reply: Reply, status: int, code: str, kind: str = "invalid_request_error") -> dict:
    assert reply.status == status, reply.body
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == kind and error["message"]
    return error


def test_one_key_chats_with_two_services_by_model_and_streams_from_both(routed: Stack) -> None:
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=BOTH_KEY, max_retries=0, timeout=20)
    backends = {backend.name: backend for backend in routed.backends}
    for model, backend in (("alpha-model", "alpha"), ("alias-a", "alpha"), ("beta-model", "beta")):
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == f"hello from {backend}"
        # streamed through both hops, not buffered: the first chunk arrives while the backend holds
        # the rest (buffered, it would not arrive before the client's timeout). Not timed: under
        # CPU load a client may read chunks sent 0.2 s apart all at once.
        chunks = iter(client.chat.completions.create(model=model, messages=[], stream=True, extra_body={"hold": True}))
        first = next(chunks)
        backends[backend].release()
        assert [chunk.model for chunk in (first, *chunks)] == [backend] * 5


def test_a_key_may_not_use_a_model_of_a_service_it_was_not_granted(routed: Stack) -> None:
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=ALPHA_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="beta-model", messages=[])
    assert refused.value.code == "model_not_found"
    error_of(chat(routed, BOTH_KEY, {"model": "no-such-model"}), 404, "model_not_found")
    assert client.chat.completions.create(model="alpha-model", messages=[]).model == "alpha"


def test_a_key_with_one_service_reaches_its_inference_api_without_a_model(routed: Stack) -> None:
    for path in ("/health", "/props", "/v1/health"):
        assert routed.backend_of(ALPHA_KEY, path) == "alpha", path
    assert chat(routed, ALPHA_KEY, {"messages": []}).headers["X-Backend"] == "alpha"
    assert chat(routed, ALPHA_KEY, {"content": "hi"}, "/tokenize").headers["X-Backend"] == "alpha"
    # without declared models, whatever the model: routing as before model routing
    assert chat(routed, ANY_KEY, {"model": "TinyLlama_Chat"}).headers["X-Backend"] == "gamma"
    assert raw_post(routed, b"not json", [("Authorization", f"Bearer {ANY_KEY}")], "/v1/completions")[1] == "gamma"
    # a key with several services needs a model
    error_of(routed.request("/health", key=BOTH_KEY), 400, "model_required")


def test_v1_models_with_a_granted_key_goes_to_routheon_server(routed: Stack) -> None:
    answer = routed.request("/v1/models", key=BOTH_KEY)
    assert "X-Backend" not in answer.headers  # answered by routheon-server, not by a backend
    expected = list(grants_for(routed).models_of(BOTH_KEY))
    assert answer.status == 200 and [model["id"] for model in answer.json()["data"]] == expected
    error_of(routed.request("/v1/models", key="sk-nobody-0123456789abcdef"), 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("body", "status", "backend_or_code"),
    [
        (b'{"model": "\\u0062eta-model", "messages": []}', 200, "beta"),  # JSON escapes are decoded
        (b'{"model": "alpha-model", "model": "beta-model"}', 200, "beta"),  # the last one, as llama-server
        (b'{"model": "beta-model", "model": "alpha-model"}', 200, "alpha"),
        (b'{"MODEL": "beta-model"}', 400, "model_required"),  # field names are case-sensitive
        (b'{"model": "alpha-model", "MODEL": "beta-model"}', 200, "alpha"),
        (b'{"Model": [1], "model": "beta-model", "mOdEl": {"a": 1}}', 200, "beta"),
        (b"null", 400, "invalid_request_body"),
        (b"not json", 400, "invalid_request_body"),
        (b'["model", "alpha-model"]', 400, "invalid_request_body"),
        (b'{"model": "alpha-model"', 400, "invalid_request_body"),
        (b'{"model": "alpha-\xff"}', 400, "invalid_request_body"),  # llama-server refuses bad UTF-8 too
        (b'{"messages": []}', 400, "model_required"),
        (b"", 400, "model_required"),
        (b'{"model": 7}', 400, "invalid_request_body"),
        (b'{"model": null}', 400, "invalid_request_body"),
        (b'{"model": ["alpha-model"]}', 400, "invalid_request_body"),
    ],
)
def test_hostile_bodies(routed: Stack, body: bytes, status: int, backend_or_code: str) -> None:
    answer_status, backend, answer = raw_post(routed, body, [("Authorization", f"Bearer {BOTH_KEY}")])
    assert answer_status == status, answer
    if status == 200:
        assert backend == backend_or_code
    else:
        assert json.loads(answer)["error"]["code"] == backend_or_code


def test_a_32_mib_body_routes_by_its_model(routed: Stack) -> None:
    filler = "x" * (32 * 1024 * 1024)
    body = json.dumps({"prompt": filler, "model": "beta-model"}).encode()
    status, backend, _ = raw_post(routed, body, [("Authorization", f"Bearer {BOTH_KEY}")], "/v1/completions")
    assert (status, backend) == (200, "beta")


def test_no_client_header_steers_routing(routed: Stack) -> None:
    key = [("Authorization", f"Bearer {ALPHA_KEY}")]
    for header in (HOP_HEADER, HOP_HEADER.lower(), HOP_HEADER.replace("-", "_")):
        assert raw_post(routed, b'{"messages": []}', [*key, (header, "beta")])[1] == "alpha"
    status, backend, _ = raw_post(routed, b'{"model": "beta-model"}', [*key, (HOP_HEADER, "beta")])
    assert (status, backend) == (404, None)


def test_unknown_keys_and_two_authorization_headers_get_the_401_of_routheon_server(routed: Stack) -> None:
    expected = request(f"{routed.server_url}/errors/401", headers={"Authorization": "Bearer x"}).json()
    unknown = routed.request("/v1/chat/completions", key="sk-unknown-0123456789", method="POST", body={"model": "x"})
    assert unknown.status == 401 and unknown.json() == expected
    both = [("Authorization", f"Bearer {ALPHA_KEY}"), ("Authorization", "Bearer sk-unknown-0123456789")]
    status, backend, answer = raw_post(routed, b'{"model": "alpha-model"}', both)
    assert (status, backend) == (401, None) and json.loads(answer)["error"]["code"] == "invalid_api_key"
    assert routed.request("/health", headers={"Authorization": "Basic eDp5"}).status == 401


def test_revoking_a_service_applies_without_a_restart(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        for name in ("alpha", "beta"):
            write_service(stack, name, stack.start_backend(name).url)
        grants = Grants(services=SERVICES).grant(BOTH_KEY, ("alpha", "beta"))
        write_grants(stack, grants)
        stack.wait_for(lambda: chat(stack, BOTH_KEY, {"model": "beta-model"}).status == 200)
        pid = stack.traefik.pid
        write_grants(stack, grants.revoke(BOTH_KEY, ("beta",)))
        stack.wait_for(lambda: chat(stack, BOTH_KEY, {"model": "beta-model"}).status == 404, what="revocation")
        assert chat(stack, BOTH_KEY, {"model": "alpha-model"}).headers["X-Backend"] == "alpha"
        write_grants(stack, grants.revoke(BOTH_KEY))
        stack.wait_for(lambda: chat(stack, BOTH_KEY, {"model": "alpha-model"}).status == 401, what="removal")
        assert stack.traefik.pid == pid and stack.traefik.popen.poll() is None


def test_a_dead_backend_behind_a_granted_key_gets_an_openai_error(tmp_path: Path) -> None:
    """The hop routers carry routheon-errors: a stopped llama-server is a 502 JSON, not plain text."""
    with Stack(tmp_path) as stack:
        alpha, beta = stack.start_backend("alpha"), stack.start_backend("beta")
        for backend in (alpha, beta):
            write_service(stack, backend.name, backend.url)
        write_grants(stack, Grants(services=SERVICES).grant(BOTH_KEY, ("alpha", "beta")))
        stack.wait_for(lambda: chat(stack, BOTH_KEY, {"model": "beta-model"}).status == 200)
        beta.stop()
        error_of(chat(stack, BOTH_KEY, {"model": "beta-model"}), 502, "backend_unreachable", "server_error")
        assert chat(stack, BOTH_KEY, {"model": "alpha-model"}).headers["X-Backend"] == "alpha"


def test_router_priorities_keep_key_files_above_the_grants() -> None:
    """Key routers (priority = rule length), their fallbacks, /v1/models for keys, the plugin, the 401."""
    shortest_key_rule = len(header_rule(["k"]))
    server = yaml.safe_load(SERVER_MAPPING.read_text())["http"]["routers"]["routheon-unauthorized"]
    assert shortest_key_rule > FALLBACK_PRIORITY > MODELS_PRIORITY > GRANTS_PRIORITY > server["priority"] == 1


@pytest.mark.parametrize("grants_first", [True, False])
@pytest.mark.parametrize("with_server_file", [True, False])
def test_old_format_key_files_keep_routing_and_win_in_any_file_order(
    tmp_path: Path, grants_first: bool, with_server_file: bool
) -> None:
    """A key both in an original-format file (to beta) and in the grants (to alpha) goes to beta."""
    with Stack(tmp_path) as stack:
        alpha, beta = stack.start_backend("alpha"), stack.start_backend("beta")
        if not with_server_file:
            (stack.mappings / "routheon-server.yml").unlink()  # key routers fall back to priority 4
        grants = Grants(services=SERVICES).grant(OLD_KEY, ("alpha",)).grant(ALPHA_KEY, ("alpha",))
        writes = [
            lambda: write_service(stack, "alpha", alpha.url),
            lambda: write_grants(stack, grants),
            lambda: write_service(stack, "beta", beta.url, (OLD_KEY,)),
        ]
        for write in writes if grants_first else reversed(writes):
            write()
            time.sleep(0.6)  # Traefik applies each file before the next arrives
        stack.wait_for(lambda: stack.backend_of(ALPHA_KEY, "/health") == "alpha")
        stack.wait_for(lambda: stack.backend_of(OLD_KEY, "/health") == "beta")
        for path in ("/health", "/v1/models"):
            assert stack.backend_of(OLD_KEY, path) == "beta"
        assert chat(stack, OLD_KEY, {"model": "alpha-model"}).headers["X-Backend"] == "beta"
        if with_server_file:
            assert stack.request("/health", key="sk-unknown-0123456789").status == 401


@pytest.mark.llama
def test_openai_sdk_reaches_a_real_llama_server_by_model_name(tmp_path: Path, llama_server: Path) -> None:
    """One SmolLM2 llama-server declared as two services with a model name each."""
    binary, model = llama_server, SMOLLM2.cached_path()
    with Stack(tmp_path) as stack:
        port = free_port()
        llama = start_child(
            "llama-server",
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "1024", "-n", "16"],
            tmp_path / "llama-server.log",
        )
        try:
            llama.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
            names = {"smol-one": "smollm2-one", "smol-two": "smollm2-two"}
            for service in names:
                write_service(stack, service, f"http://127.0.0.1:{port}")
            services = tuple(GrantedService(service, (model_name,)) for service, model_name in names.items())
            grants = Grants(services=services).grant(BOTH_KEY, tuple(names)).grant(ALPHA_KEY, ("smol-one",))
            write_grants(stack, grants)
            stack.wait_for(lambda: stack.request("/health", key=ALPHA_KEY).status == 200, timeout=60)
            both = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=BOTH_KEY, max_retries=0, timeout=60)
            for model_name in names.values():
                answer = both.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}])
                assert answer.choices[0].message.content
                stream = both.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                                      stream=True)
                pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
                assert len(pieces) > 1 and "".join(pieces).strip()
            assert [listed.id for listed in both.models.list()] == list(names.values())
            one = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=ALPHA_KEY, max_retries=0, timeout=60)
            assert [listed.id for listed in one.models.list()] == ["smollm2-one"]
            with pytest.raises(openai.NotFoundError) as refused:
                one.chat.completions.create(model="smollm2-two", messages=[{"role": "user", "content": "Hi"}])
            assert refused.value.code == "model_not_found"
        finally:
            llama.stop()


def test_health_proves_the_hop_routes_and_names_one_that_does_not(tmp_path: Path) -> None:
    """Grants written for another traefik.yml send granted keys to whatever holds that port."""
    with Stack(tmp_path) as stack:
        alpha = stack.start_backend("alpha")
        write_service(stack, "alpha", alpha.url)
        write_grants(stack, Grants(services=SERVICES[:1]).grant(ALPHA_KEY, ("alpha",)))

        def hop() -> dict:
            return request(f"{stack.server_url}/health").json()["hop"]

        stack.wait_for(lambda: hop()["state"] == "ok", what="the hop proven")
        assert hop()["url"] == f"http://127.0.0.1:{stack.hop_port}/health"
        assert request(f"{stack.server_url}/health").json()["status"] == "ok"
        nobody = free_port()
        (stack.mappings / GRANTS_FILE).write_text(
            render_grants(Grants(services=SERVICES[:1], hop_port=nobody).grant(ALPHA_KEY, ("alpha",)))
        )
        stack.wait_for(lambda: hop()["state"] == "unreachable", what="the wrong hop named")
        assert request(f"{stack.server_url}/health").json()["status"] == "degraded"
