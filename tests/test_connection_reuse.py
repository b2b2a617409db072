"""Connections to llama-server are reused, and no request is lost when llama-server closes one.

llama-server closes its connection after each streamed answer although it promised keep-alive;
a request Traefik sends on that pooled connection a moment later failed (500 or 502). The
backend here does the same (``fake_llama.py --close-after-stream``); two clients alternate
streamed and plain requests, with two busy loops beside them, through the shipped traefik.yml
(connection reuse on) for a key file's key and a granted key.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.request import urlopen

import pytest
from traefik_stack import Stack

from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, render_grants
from routheon.mappings.format import MappingSpec, render_mapping

FILE_KEY = "sk-reuse-file-0123456789"
GRANTED_KEY = "sk-reuse-granted-0123456789"
REQUESTS = 1000  # per client and key


def mixed_requests(port: int, key: str, client: int) -> list[str]:
    """REQUESTS requests on new client connections, streamed and plain in turn; what went wrong."""
    failures = []
    for number in range(REQUESTS):
        stream = (number + client) % 2 == 0
        body = json.dumps({"model": "alpha-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
            answer = connection.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{'stream' if stream else 'plain'} {number}: {exc!r}")
            continue
        finally:
            connection.close()
        if answer.status != 200 or (stream and b"[DONE]" not in data):
            failures.append(f"{'stream' if stream else 'plain'} {number}: {answer.status} {data[:120]!r}")
    return failures


@pytest.fixture(scope="module")
def closing(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    with Stack(tmp_path_factory.mktemp("reuse")) as stack:
        backend = stack.start_backend("alpha", chunk_interval=0.0, chunks=3, close_after_stream=True)
        (stack.mappings / "alpha.yml").write_text(render_mapping(MappingSpec("alpha", (backend.url,), (FILE_KEY,))))
        grants = Grants(services=(GrantedService("alpha", ("alpha-model",)),), hop_port=stack.hop_port)
        (stack.mappings / GRANTS_FILE).write_text(render_grants(grants.grant(GRANTED_KEY, ("alpha",))))
        for key in (FILE_KEY, GRANTED_KEY):
            stack.wait_for(lambda key=key: stack.request("/health", key=key).status == 200, what=f"{key} routed")
        yield stack


@pytest.mark.parametrize("key", [FILE_KEY, GRANTED_KEY], ids=["key-file", "granted"])
def test_no_request_is_lost_when_llama_server_closes_after_a_stream(closing: Stack, busy_cpu: None, key: str) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [failure for found in pool.map(lambda client: mixed_requests(closing.port, key, client), (0, 1))
                    for failure in found]
    assert failures == [], f"{len(failures)} of {2 * REQUESTS} failed, e.g. {failures[:3]}"


def test_plain_answers_keep_their_connection(closing: Stack) -> None:
    """The shipped traefik.yml reuses connections: 100 plain requests, a handful of connections."""
    backend = closing.backends[0]
    before = json.loads(urlopen(f"{backend.url}/connections").read())["connections"]
    for _ in range(100):
        assert closing.request("/v1/chat/completions", key=FILE_KEY, method="POST", body={"model": "m"}).status == 200
    opened = json.loads(urlopen(f"{backend.url}/connections").read())["connections"] - before
    assert opened <= 10, f"{opened} new connections for 100 requests"
