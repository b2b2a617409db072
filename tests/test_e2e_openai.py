"""End to end: the official openai SDK against Traefik, with real llama-servers behind it.

The stack is the demo's own (``routheon.demo.stack``): two llama-servers with SmolLM2 under
two aliases, mappings written by the ``routheon`` CLI, routheon-server and Traefik, all on
free loopback ports. ``make test`` builds or finds llama-server and the model first.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from bench.reuse import mixed_requests
from routheon.demo.models import SMOLLM2
from routheon.demo.stack import Backend, Stack, StackConfig
from routheon.loopback import LOOPBACK, free_port
from routheon.probe import model_ids
from routheon.supervisor import Supervisor, eventually

pytestmark = [pytest.mark.llama, pytest.mark.traefik]

KEY_1 = "e2e-key-one-3f9c2a7b41d8"
KEY_2 = "e2e-key-two-8d1e6b0c95a2"
SHARED_KEY = "e2e-key-both-5a0c7e2d19f3"
ALIAS_1 = "smollm2-one"
ALIAS_2 = "smollm2-two"
PROMPT = [{"role": "user", "content": "Say hello in five words."}]


@contextmanager
def running_stack(work: Path, binary: Path) -> Iterator[Stack]:
    """The demo's stack with two llama-servers serving SmolLM2 under two aliases, on free ports."""
    model = SMOLLM2.cached_path()
    config = StackConfig(
        workdir=work,
        llama_server=binary,
        backends=(
            Backend("llama-server-1", KEY_1, model, ALIAS_1, free_port(), other_names=("TinyLlama_Chat",)),
            Backend("llama-server-2", KEY_2, model, ALIAS_2, free_port()),
        ),
        entry_port=free_port(),
        server_port=free_port(),
        hop_port=free_port(),
        shared_key=SHARED_KEY,
        n_predict=24,
    )
    with Supervisor(work / "logs") as supervisor:
        demo = Stack(config, supervisor)
        demo.start()
        yield demo


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Stack]:
    """One stack for the tests that leave it as they found it."""
    with running_stack(tmp_path_factory.mktemp("e2e"), llama_server) as shared:
        yield shared


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{stack.config.entry_url}/v1", max_retries=0, timeout=60)


def test_each_key_lists_only_its_model(stack: Stack) -> None:
    assert [model.id for model in client(stack, KEY_1).models.list()] == [ALIAS_1]
    assert [model.id for model in client(stack, KEY_2).models.list()] == [ALIAS_2]


def test_one_key_chats_and_streams_with_both_models_by_name(stack: Stack) -> None:
    shared = client(stack, SHARED_KEY)
    assert [model.id for model in shared.models.list()] == [ALIAS_1, "TinyLlama_Chat", ALIAS_2]
    for name in (ALIAS_1, "TinyLlama_Chat", ALIAS_2):
        answer = shared.chat.completions.create(model=name, messages=PROMPT, max_tokens=8)
        assert answer.choices[0].message.content
        stream = shared.chat.completions.create(model=name, messages=PROMPT, max_tokens=8, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip()
    with pytest.raises(openai.NotFoundError) as refused:
        shared.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=8)
    assert refused.value.code == "model_not_found"


def test_without_a_key_the_list_holds_both(stack: Stack) -> None:
    # the SDK always wants a key; Omit sends the request without an Authorization header
    listed = client(stack, "unused").models.list(extra_headers={"Authorization": openai.Omit()})
    assert sorted(model.id for model in listed) == [ALIAS_1, ALIAS_2]


def test_chat_completion_answers_with_text(stack: Stack) -> None:
    answer = client(stack, KEY_1).chat.completions.create(model=ALIAS_1, messages=PROMPT, max_tokens=16)
    assert answer.choices[0].message.content.strip()
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_streaming_answers_with_text(stack: Stack) -> None:
    stream = client(stack, KEY_2).chat.completions.create(model=ALIAS_2, messages=PROMPT, max_tokens=16, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces).strip()


def test_llama_server_closes_the_connection_after_a_stream(stack: Stack) -> None:
    """Why every key's guard sends a request again that failed on a reused connection.

    llama-server answers a streamed completion with ``Keep-Alive: timeout=5, max=100`` and then
    closes the connection anyway: its stream callback returns false after the last chunk, which
    cpp-httplib takes as "cancelled". A proxy that reuses that connection sends its next request
    into a closing socket (Traefik answers 502 or 500), which Routheon's plugin replays
    (traefik.yml, docs/production.md "Connections to llama-server"). Plain answers keep the
    connection open. If this test fails after a llama.cpp upgrade, the bug is fixed there.
    """
    backend = stack.config.backends[0]
    conn = http.client.HTTPConnection(LOOPBACK, backend.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    try:
        for stream in (False, False, True):
            body = json.dumps({"messages": PROMPT, "max_tokens": 2, "stream": stream})
            conn.request("POST", "/v1/chat/completions", body, headers)
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
            assert reply.getheader("Connection") is None, "llama-server announced the close"
            assert reply.getheader("Keep-Alive"), "llama-server no longer promises keep-alive"
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps({"messages": PROMPT, "max_tokens": 2}), headers)
            conn.getresponse().read()
        except ConnectionError:
            return
    finally:
        conn.close()
    pytest.fail(f"{stack.config.llama_server} kept the connection open after a stream: the bug that "
                "the guard's replay (traefik/plugins-local/.../replay.go) works around is fixed there")


def _stream_many(sdk: openai.OpenAI, count: int, clients: int) -> list[str]:
    """Send ``count`` two-token streams from ``clients`` threads; describe each one that broke."""

    def one(attempt: int) -> str | None:
        try:
            stream = sdk.chat.completions.create(model=ALIAS_1, messages=PROMPT, max_tokens=2, stream=True)
            finished = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
        except openai.APIError as exc:
            return f"stream {attempt}: {exc!r} <- {exc.__cause__!r}"
        if not finished or finished[-1] is None:
            return f"stream {attempt}: ended without a finish_reason"
        return None

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return [failure for failure in pool.map(one, range(count)) if failure]


@pytest.mark.parametrize("clients", [1, 2])
def test_streams_arrive_whole_with_the_cpu_busy(stack: Stack, busy_cpu: None, clients: int) -> None:
    """1,000 streamed answers through the shipped Traefik configuration, none cut short.

    Traefik's proxy (Go's net/http) cut 19 of 1,000 streams here under this load, right after
    the response headers, when the request body went to llama-server as it arrived: the server
    side closed the request body while the client side still read it (docs/production.md,
    "Streams cut short under load"). The key mappings' request-body middleware prevents it.
    """
    failures = _stream_many(client(stack, KEY_1), 1000, clients)
    assert failures == [], f"{len(failures)} of 1000 streams broke; first: {failures[0]}"


@pytest.mark.parametrize("key", [KEY_1, SHARED_KEY], ids=["key file", "granted key"])
def test_streamed_and_plain_requests_on_reused_connections_lose_none_with_the_cpu_busy(
    stack: Stack, busy_cpu: None, key: str
) -> None:
    """400 requests from two clients, streamed and plain in turn, through the shipped traefik.yml,
    which reuses its connections to llama-server: none lost to the connections llama-server
    closes after its streams (test_connection_reuse.py has the same against a stand-in)."""
    result = mixed_requests(stack.config.entry_url, {"Authorization": f"Bearer {key}"}, 400, model=ALIAS_1)
    assert result.failures == [], f"{len(result.failures)} of {result.requests} failed; first: {result.failures[:3]}"


def test_a_wrong_key_is_an_authentication_error(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        client(stack, "e2e-key-nobody-has-this").chat.completions.create(model=ALIAS_1, messages=PROMPT, max_tokens=4)
    assert raised.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(stack, KEY_1 + "x").models.list()


def test_a_stopped_llama_server_leaves_the_list_and_its_key_gets_a_5xx(stack: Stack) -> None:
    keyless = f"{stack.config.entry_url}"
    stack.stop_backend("llama-server-2")
    try:
        assert eventually(lambda: model_ids(keyless) == [ALIAS_1], timeout=15)
        with pytest.raises(openai.InternalServerError) as raised:
            client(stack, KEY_2).chat.completions.create(model=ALIAS_2, messages=PROMPT, max_tokens=4)
        assert 502 <= raised.value.status_code <= 504
        assert isinstance(raised.value.body, dict) and raised.value.body.get("message")
        # the other key is not affected
        assert [model.id for model in client(stack, KEY_1).models.list()] == [ALIAS_1]
    finally:
        stack.start_backend("llama-server-2")
    assert eventually(lambda: sorted(model_ids(keyless)) == [ALIAS_1, ALIAS_2])

    def answers() -> bool:
        try:
            reply = client(stack, KEY_2).chat.completions.create(model=ALIAS_2, messages=PROMPT, max_tokens=4)
        except openai.APIStatusError:
            return False
        return bool(reply.choices)

    assert eventually(answers)


def test_shutting_down_leaves_no_process_behind(tmp_path: Path, llama_server: Path) -> None:
    """A stack of its own, since it takes it down: the tests run in any order."""
    with running_stack(tmp_path, llama_server) as stack:
        children = list(stack.supervisor.children.values())
        pids = [child.pid for child in children]
        assert {child.name for child in children} == {"llama-server-1", "llama-server-2", "routheon-server", "traefik"}
        stack.supervisor.stop_all()
        for pid in pids:
            assert pid is not None and not Path(f"/proc/{pid}").exists(), f"pid {pid} survived"
        assert model_ids(stack.config.entry_url) == []
        assert not any(_group_alive(pid) for pid in pids if pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
