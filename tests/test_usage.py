"""Usage accounting in the data plane: the real Traefik with Routheon's plugin writes one record
per request of a known key, with the tokens the backend's answer reports (docs/usage.md).

The fake backend (tests/fake_llama.py) reports made-up but known token counts (``usage_of``)
and, asked by the request body, misbehaves: a broken usage object, none, megabytes of answer.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import openai
import pytest

from fake_llama import usage_of
from routheon.demo.llama import installed_binary
from routheon.demo.models import SMOLLM2
from routheon.loopback import free_port
from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, key_hash, render_grants
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.supervisor import start_child
from support import request
from traefik_stack import Backend, Stack

pytestmark = pytest.mark.traefik

KEY = "sk-usage-two-0123456789abcd"  # two services: alpha-model (alpha), dead-model (dead)
ANY_KEY = "sk-usage-any-0123456789wxyz"  # one service without declared models: any model name
CHUNKS = 5
FIELDS = [
    "time", "duration_ms", "key", "hint", "name", "model", "service", "method", "path", "code", "stream",
    "prompt_tokens", "completion_tokens", "outcome",
]
MESSAGES = [{"role": "user", "content": "Count the tokens."}]
T = TypeVar("T")


def write_service(stack: Stack, name: str, url: str) -> None:
    spec = MappingSpec(name, (url,), (f"sk-unused-{name}-0123456789",))
    (stack.mappings / f"{name}.yml").write_text(render_mapping(spec))


def usage_grants(stack: Stack) -> Grants:
    services = (GrantedService("alpha", ("alpha-model",)), GrantedService("dead", ("dead-model",)),
                GrantedService("gamma"))
    grants = Grants(services=services, hop_port=stack.hop_port, usage_dir=str(stack.workdir / "usage"))
    return grants.grant(KEY, ("alpha", "dead")).grant(ANY_KEY, ("gamma",))


def write_grants(stack: Stack, grants: Grants) -> None:
    """As Routheon writes it: a name Traefik ignores, then a rename (written in place, Traefik
    may read half a file, and a request meanwhile gets the 401 of no grants)."""
    temporary = stack.mappings / f".{GRANTS_FILE}.tmp"
    temporary.write_text(render_grants(grants))
    os.replace(temporary, stack.mappings / GRANTS_FILE)


def start(stack: Stack, chunk_interval: float = 0.01) -> Backend:
    """alpha and gamma (the same fake backend), dead (nothing listens), the grants with a usage folder."""
    backend = stack.start_backend("gamma", chunk_interval=chunk_interval, chunks=CHUNKS)
    for name in ("alpha", "gamma"):
        write_service(stack, name, backend.url)
    write_service(stack, "dead", f"http://127.0.0.1:{free_port()}")
    write_grants(stack, usage_grants(stack))
    stack.wait_for(lambda: chat(stack, ANY_KEY, {"model": "warm-up"}).status == 200)
    return backend


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("usage")) as running:
        running.usage_backend = start(running)  # type: ignore[attr-defined]
        yield running


def chat(stack: Stack, key: str, body: dict, path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    return stack.request(path, key=key, method="POST", body=body, timeout=30)


def client(stack: Stack, key: str = ANY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=30)


def records(folder: Path) -> list[dict]:
    """Every record in ``folder``; every line whole and its fields in the documented order."""
    found = []
    for path in sorted(folder.glob("*.jsonl")):
        text = path.read_text()
        assert text.endswith("\n"), path
        for line in text.splitlines():
            record = json.loads(line)
            assert list(record) == FIELDS, line
            found.append(record)
    return found


def record_of(stack: Stack, model: str) -> dict:
    """The one record of the request that named ``model`` (records reach the file a moment after)."""
    folder = stack.workdir / "usage"
    stack.wait_for(lambda: any(r["model"] == model for r in records(folder)), timeout=10, what=f"a record of {model}")
    found = [record for record in records(folder) if record["model"] == model]
    assert len(found) == 1, found
    return found[0]


def tokens(record: dict) -> tuple[int | None, int | None]:
    return record["prompt_tokens"], record["completion_tokens"]


def expected(body: dict, chunks: int = CHUNKS) -> tuple[int, int]:
    usage = usage_of(body, chunks)
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_plain_and_streamed_chats_count_what_the_backend_reports(stack: Stack) -> None:
    sdk = client(stack)
    answer = sdk.chat.completions.create(model="plain", messages=MESSAGES)
    record = record_of(stack, "plain")
    assert tokens(record) == (answer.usage.prompt_tokens, answer.usage.completion_tokens) == expected(
        {"messages": MESSAGES})
    assert record["key"] == key_hash(ANY_KEY) and record["hint"] == "wxyz" and record["name"] == ""
    assert (record["service"], record["method"], record["path"], record["code"]) == (
        "gamma", "POST", "/v1/chat/completions", 200)
    assert (record["stream"], record["outcome"]) == (False, "ok")
    assert datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) <= datetime.now(UTC)
    assert record["duration_ms"] >= 0

    # not asked for usage: Routheon asks llama-server for it and keeps the usage chunk from the
    # client, whose SDK code may read choices[0] of every chunk
    chunks = list(sdk.chat.completions.create(model="streamed", messages=MESSAGES, stream=True))
    assert len(chunks) == CHUNKS and all(chunk.choices[0].delta.content for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    record = record_of(stack, "streamed")
    assert tokens(record) == expected({"messages": MESSAGES}) and record["stream"] and record["outcome"] == "ok"

    asked = list(sdk.chat.completions.create(model="asked", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True}))
    with_usage = [chunk for chunk in asked if chunk.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].choices == [] and len(asked) == CHUNKS + 1
    assert tokens(record_of(stack, "asked")) == (with_usage[0].usage.prompt_tokens,
                                                 with_usage[0].usage.completion_tokens)


def test_a_stream_the_client_asked_usage_of_keeps_its_other_options(stack: Stack) -> None:
    body = {"model": "options", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": False, "continuous_usage_stats": False}}
    answer = chat(stack, ANY_KEY, body)
    events = [line for line in answer.body.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == CHUNKS + 1
    assert all('"choices": [{' in event for event in events[:-1])
    assert tokens(record_of(stack, "options")) == expected(body)


@pytest.mark.parametrize("asked", [False, True])
def test_streams_stay_live_through_the_meter(stack: Stack, asked: bool) -> None:
    """The backend holds the rest of the stream until released: buffered, the first chunk would
    not arrive before the client's timeout. Not timed: under CPU load chunks may come together."""
    options = {"stream_options": {"include_usage": True}} if asked else {}
    stream = iter(client(stack).chat.completions.create(model=f"held-{asked}", messages=MESSAGES, stream=True,
                                                        extra_body={"hold": True, **options}))
    first = next(stream)
    stack.usage_backend.release()  # type: ignore[attr-defined]
    rest = list(stream)
    assert first.choices[0].delta.content == "0 " and len(rest) == CHUNKS - 1 + asked
    assert record_of(stack, f"held-{asked}")["outcome"] == "ok"


def test_embeddings_and_llama_cpp_completion_are_counted(stack: Stack) -> None:
    body = {"model": "embedded", "input": "four words of input"}
    answer = chat(stack, ANY_KEY, body, "/v1/embeddings")
    assert answer.status == 200 and answer.json()["usage"]["prompt_tokens"] == expected(body)[0]
    assert tokens(record_of(stack, "embedded")) == (expected(body)[0], 0)
    for stream in (False, True):
        body = {"model": f"native-{stream}", "prompt": "Once upon", "stream": stream}
        assert chat(stack, ANY_KEY, body, "/completion").status == 200
        record = record_of(stack, f"native-{stream}")
        assert tokens(record) == expected(body) and record["path"] == "/completion"
        assert (record["stream"], record["outcome"]) == (stream, "ok")


@pytest.mark.parametrize(("fault", "outcome"), [("garbage", "no_usage"), ("no_usage", "no_usage"), ("huge", "ok")])
def test_a_bad_backend_is_counted_as_such_and_its_answer_passes_unharmed(
    stack: Stack, fault: str, outcome: str
) -> None:
    """A broken usage object or none: tokens unknown (null), never 0; megabytes of answer after
    the usage object: read all the same. The client gets exactly what the backend sent."""
    body = {"model": f"bad-{fault}", "messages": MESSAGES, "fault": fault}
    through = chat(stack, ANY_KEY, body)
    direct = request(f"{stack.usage_backend.url}/v1/chat/completions", method="POST", body=body).body  # type: ignore[attr-defined]
    assert through.status == 200 and through.body == direct
    record = record_of(stack, f"bad-{fault}")
    assert record["outcome"] == outcome
    assert tokens(record) == ((None, None) if outcome == "no_usage" else expected(body))

    streamed = {**body, "model": f"bad-stream-{fault}", "stream": True}
    events = [event for event in chat(stack, ANY_KEY, streamed).body.split(b"\n\n") if event]
    # the usage event taken out; one of 8 MiB is no event Routheon holds back (over 64 KiB): passed on
    assert events[-1] == b"data: [DONE]" and len(events) == CHUNKS + 1 + (fault == "huge")
    record = record_of(stack, f"bad-stream-{fault}")
    assert record["outcome"] == outcome
    assert tokens(record) == ((None, None) if outcome == "no_usage" else expected(streamed))


def test_an_answer_arriving_a_few_bytes_at_a_time_is_counted(stack: Stack) -> None:
    """Its "usage": key, numbers and events are split between writes: what each write carries
    over finds the key, and the usage event is held whole until it can be taken out."""
    body = {"model": "trickled", "messages": MESSAGES, "fault": "trickle"}
    assert chat(stack, ANY_KEY, body).json()["usage"]["prompt_tokens"] == expected(body)[0]
    assert tokens(record_of(stack, "trickled")) == expected(body)
    streamed = {**body, "model": "trickled-stream", "stream": True}
    events = [event for event in chat(stack, ANY_KEY, streamed).body.split(b"\n\n") if event]
    assert events[-1] == b"data: [DONE]" and len(events) == CHUNKS + 1
    assert all(json.loads(event.removeprefix(b"data: "))["choices"] for event in events[:-1])
    assert tokens(record_of(stack, "trickled-stream")) == expected(streamed)


def test_refusals_and_errors_of_a_known_key_are_recorded_and_unknown_keys_are_not(stack: Stack) -> None:
    assert chat(stack, KEY, {"model": "no-such-model"}).status == 404
    record = record_of(stack, "no-such-model")
    assert (record["code"], record["outcome"], record["service"], tokens(record)) == (404, "refused", "", (None, None))
    assert record["key"] == key_hash(KEY)
    assert chat(stack, KEY, {"model": "dead-model"}).status == 502
    record = record_of(stack, "dead-model")
    assert (record["code"], record["outcome"], record["service"]) == (502, "error", "dead")
    assert chat(stack, "sk-nobody-0123456789abcd", {"model": "nobody"}).status == 401
    assert chat(stack, ANY_KEY, {"model": "after-nobody"}).status == 200
    record_of(stack, "after-nobody")  # written after the unknown key's request ended
    assert not any(r["model"] == "nobody" for r in records(stack.workdir / "usage"))


def test_a_client_hanging_up_is_client_gone_with_unknown_tokens(stack: Stack) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    body = json.dumps({"model": "hung-up", "messages": MESSAGES, "stream": True, "hold": True})
    connection.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {ANY_KEY}"})
    answer = connection.getresponse()
    assert answer.status == 200 and answer.read1(100).startswith(b"data: ")
    connection.close()
    record = record_of(stack, "hung-up")
    stack.usage_backend.release()  # type: ignore[attr-defined]
    assert (record["code"], record["outcome"], tokens(record)) == (200, "client_gone", (None, None))
    # gone before the answer started: no status ever reached the client
    with socket.create_connection(("127.0.0.1", stack.port)) as raw:
        body = json.dumps({"model": "gone-early"}).encode()
        raw.sendall(b"POST /v1/slow?sleep=2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ANY_KEY.encode()
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
    record = record_of(stack, "gone-early")
    assert (record["code"], record["outcome"], tokens(record)) == (0, "client_gone", (None, None))


def test_no_record_is_lost_or_doubled_by_reloads_restarts_and_kill_9(tmp_path: Path) -> None:
    """Requests go on while the grants are rewritten (each rewrite builds the middleware anew);
    Traefik is stopped (SIGTERM) right after requests, and killed (SIGKILL) 1.5 s after others."""
    with Stack(tmp_path) as stack:
        start(stack)
        sent: list[str] = []
        failures: list[int] = []
        done = threading.Event()

        def send() -> None:
            while not done.is_set():
                model = f"reload-{len(sent)}"
                status = chat(stack, ANY_KEY, {"model": model, "messages": MESSAGES, "stream": len(sent) % 2 == 1}).status
                (sent if status == 200 else failures).append(model if status == 200 else status)

        sender = threading.Thread(target=send)
        sender.start()
        grants = usage_grants(stack)
        try:
            for number in range(5):
                grants = grants.grant(f"sk-reload-{number}-0123456789abcd", ("gamma",))
                write_grants(stack, grants)
                stack.wait_for(lambda n=number: chat(stack, f"sk-reload-{n}-0123456789abcd", {}).status == 200)
        finally:
            done.set()
            sender.join()
        assert failures == [] and len(sent) > 10
        for round_ in range(3):
            for index in range(10):
                model = f"restart-{round_}-{index}"
                assert chat(stack, ANY_KEY, {"model": model, "messages": MESSAGES}).status == 200
                sent.append(model)
            stack.restart_traefik(signal.SIGTERM)  # at once: the records of the last requests still wait
        for index in range(10):
            assert chat(stack, ANY_KEY, {"model": f"killed-{index}", "messages": MESSAGES}).status == 200
            sent.append(f"killed-{index}")
        time.sleep(1.5)
        stack.restart_traefik(signal.SIGKILL)
        models = [record["model"] for record in records(tmp_path / "usage") if record["model"] in set(sent)]
        assert sorted(models) == sorted(sent)
        files = sorted((tmp_path / "usage").iterdir())
        # one per Traefik process that recorded: the first and three restarted ones (the last got no request)
        assert len(files) == 4 and all(re.fullmatch(r"\d{4}-\d\d-\d\d\.\d+\.jsonl", path.name) for path in files)
        assert {path.stat().st_mode & 0o777 for path in files} == {0o640}
        assert (tmp_path / "usage").stat().st_mode & 0o777 == 0o750


def test_a_usage_folder_that_cannot_be_written_costs_no_request(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        start(stack)
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("a file where the folder should be\n")
        grants = replace(usage_grants(stack), usage_dir=str(blocked / "usage"))
        write_grants(stack, grants.grant("sk-usage-new-0123456789abcd", ("gamma",)))
        stack.wait_for(lambda: chat(stack, "sk-usage-new-0123456789abcd", {}).status == 200, what="the new grants")
        for index in range(20):
            answer = chat(stack, ANY_KEY, {"model": f"unwritten-{index}", "messages": MESSAGES, "stream": index % 2})
            assert answer.status == 200 and answer.body
        stack.wait_for(lambda: "usage records lost" in (tmp_path / "traefik.log").read_text(), what="the complaint")
        time.sleep(0.5)
        assert (tmp_path / "traefik.log").read_text().count("usage records lost") == 1  # once a minute at most


@pytest.mark.llama
def test_records_equal_a_real_llama_servers_usage_through_the_openai_sdk(tmp_path: Path) -> None:
    """SmolLM2 for chat and completions, a second llama-server of it for embeddings (--embeddings
    makes llama-server an embeddings-only server). Greedy decoding without the prompt cache
    makes two runs of a request generate the same tokens: the stream that did not ask for usage
    is compared with its twin that did."""
    binary, model = installed_binary(), SMOLLM2.cached_path()
    if binary is None or not model.is_file():
        pytest.skip("llama-server or the SmolLM2 model is missing: run `make demo-assets` first")
    with Stack(tmp_path) as stack:
        ports = {"smol": free_port(), "embed": free_port()}
        flags = {"smol": ["-n", "12"], "embed": ["--embeddings", "--pooling", "mean"]}
        llamas = [
            start_child(f"llama-{name}", [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                          "-c", "1024", "--parallel", "1", *flags[name]], tmp_path / f"llama-{name}.log")
            for name, port in ports.items()
        ]
        try:
            for llama, port in zip(llamas, ports.values(), strict=True):
                llama.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
                write_service(stack, llama.name.removeprefix("llama-"), f"http://127.0.0.1:{port}")
            services = (GrantedService("smol", ("smollm2",)), GrantedService("embed", ("smollm2-embed",)))
            grants = Grants(services=services, hop_port=stack.hop_port, usage_dir=str(tmp_path / "usage"))
            write_grants(stack, grants.grant(KEY, ("smol", "embed")))
            warm_up = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 1}
            stack.wait_for(lambda: chat(stack, KEY, warm_up).status == 200, timeout=60)
            sdk = client(stack, KEY)
            greedy = {"temperature": 0, "max_tokens": 12, "extra_body": {"cache_prompt": False}}
            folder = tmp_path / "usage"

            def counted(send: Callable[[], T]) -> tuple[T, dict]:
                """What ``send`` returned, and the record of its request (one client: the next one)."""
                before = len(records(folder))
                result = send()
                stack.wait_for(lambda: len(records(folder)) > before, what="the record")
                return result, records(folder)[before]

            plain, record = counted(lambda: sdk.chat.completions.create(model="smollm2", messages=MESSAGES, **greedy))
            assert tokens(record) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)

            asked, record = counted(lambda: list(sdk.chat.completions.create(
                model="smollm2", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **greedy)))
            usage_chunks = [chunk for chunk in asked if chunk.usage is not None]
            assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
            usage = usage_chunks[0].usage
            assert tokens(record) == (usage.prompt_tokens, usage.completion_tokens)

            unasked, record = counted(lambda: list(sdk.chat.completions.create(
                model="smollm2", messages=MESSAGES, stream=True, **greedy)))
            assert unasked and all(chunk.choices and chunk.usage is None for chunk in unasked)
            assert "".join(c.choices[0].delta.content or "" for c in unasked) == "".join(
                c.choices[0].delta.content or "" for c in asked if c.choices)
            assert tokens(record) == (usage.prompt_tokens, usage.completion_tokens)

            completion, record = counted(lambda: sdk.completions.create(model="smollm2", prompt="The sea is", **greedy))
            assert tokens(record) == (completion.usage.prompt_tokens, completion.usage.completion_tokens)

            native, record = counted(lambda: chat(stack, KEY, {"model": "smollm2", "prompt": "The sea is",
                                                              "n_predict": 6}, "/completion").json())
            assert tokens(record) == (native["tokens_evaluated"], native["tokens_predicted"])
            streamed, record = counted(lambda: chat(stack, KEY, {"model": "smollm2", "prompt": "The sea is",
                                                                "n_predict": 6, "stream": True}, "/completion").body)
            final = json.loads(streamed.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
            assert final["stop"] and tokens(record) == (final["tokens_evaluated"], final["tokens_predicted"])

            embedded, record = counted(lambda: sdk.embeddings.create(model="smollm2-embed", input="The sea is blue."))
            assert tokens(record) == (embedded.usage.prompt_tokens, 0) and embedded.usage.prompt_tokens > 0
            assert all(record["outcome"] == "ok" for record in records(folder)[-7:])
        finally:
            for llama in llamas:
                llama.stop()
