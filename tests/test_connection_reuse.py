"""Traefik keeps its connections to llama-server, and no request is lost to one that closes.

llama-server closes its connection right after each streamed answer although the answer
promised keep-alive; with Traefik's connection reuse a request sent on such a connection just
after a stream failed (500 or 502: 26 and 33 of 600 per kind of key in the spike of issue 21).
Each key's guard (Routheon's plugin, directly in front of the backend) marks requests
replayable for Go's transport and sends one again itself when a reused connection failed before
any byte of an answer (traefik/plugins-local/.../replay.go). The backend here is
tests/fake_llama.py closing after streams as llama-server does; the requests come from
bench/reuse.py's clients, as in ``make bench``. Design and numbers: docs/production.md,
"Connections to llama-server".
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.reuse import backend_counts, mixed_requests
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, render_grants
from traefik_stack import Backend, Stack

pytestmark = pytest.mark.traefik

FILE_KEY = "sk-reuse-file-0123456789"
GRANTED_KEY = "sk-reuse-granted-0123456789"
KEYS = {"key file": FILE_KEY, "granted key": GRANTED_KEY}
PLAIN_KEY = "sk-reuse-no-error-pages-0123456789"  # a key file written with --no-error-pages
MODEL = "closing-model"
# Per kind of key, from two clients: with reuse and no replay, about 1 in 25 failed here.
REQUESTS = 600
# Traefik's limit for a backend's response headers in this stack (a slower answer is a 504)
RESPONSE_TIMEOUT_S = 2


@dataclass
class Closing:
    stack: Stack
    backend: Backend

    def counts(self) -> dict:
        return backend_counts(self.backend.url)


@pytest.fixture(scope="module")
def closing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Closing]:
    """A backend closing after streams, reached by a key file's key and by a granted key."""
    with Stack(tmp_path_factory.mktemp("closing"), response_timeout=f"{RESPONSE_TIMEOUT_S}s") as stack:
        backend = stack.start_backend("closer", chunk_interval=0, chunks=3, close_after_stream=True)
        specs = (
            MappingSpec("closing-file", (backend.url,), (FILE_KEY,)),
            MappingSpec("closing-plain", (backend.url,), (PLAIN_KEY,), error_pages=False),
            MappingSpec("closing-granted", (backend.url,), ()),
        )
        for spec in specs:
            (stack.mappings / spec.file_name).write_text(render_mapping(spec))
        grants = Grants(services=(GrantedService("closing-granted", (MODEL,)),), hop_port=stack.hop_port)
        (stack.mappings / GRANTS_FILE).write_text(render_grants(grants.grant(GRANTED_KEY, ("closing-granted",))))
        for key in (*KEYS.values(), PLAIN_KEY):
            stack.wait_for(lambda key=key: stack.backend_of(key, "/health") == "closer")
        yield Closing(stack, backend)


@pytest.mark.parametrize("kind", KEYS)
def test_no_request_is_lost_to_a_backend_that_closes_after_streams(closing: Closing, busy_cpu: None, kind: str) -> None:
    before = closing.counts()
    result = mixed_requests(closing.stack.url, {"Authorization": f"Bearer {KEYS[kind]}"}, REQUESTS)
    connections = closing.counts()["connections"] - before["connections"]
    assert result.failures == [], f"{len(result.failures)} of {result.requests} failed; first: {result.failures[:3]}"
    # Connections are reused: each stream costs one (the backend closes it), a plain request
    # mostly none. Without reuse it is one per request.
    assert connections < result.streams + result.requests // 10, (connections, result.requests)


def test_a_held_stream_stays_live_through_the_replaying_guard(closing: Closing) -> None:
    """Chunks pass the guard as they come: the first arrives while the backend holds the rest,
    behind the errors middleware (key file, granted key) and without it."""
    for key in (*KEYS.values(), PLAIN_KEY):
        request = urllib.request.Request(
            f"{closing.stack.url}/v1/chat/completions", method="POST",
            data=json.dumps({"model": MODEL, "stream": True, "hold": True, "messages": []}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=20) as answer:
            first = answer.readline()
            closing.backend.release()
            rest = answer.read()
        assert first.startswith(b"data: ") and b'"0 "' in first
        assert rest.rstrip().endswith(b"data: [DONE]")


def sent_once(closing: Closing, key: str, path: str) -> tuple[int, dict]:
    """A POST to ``path`` on a connection Traefik reuses: how often the backend saw it, and the answer."""
    name = path.split("?")[0]
    assert closing.stack.request("/v1/reused", key=key, method="POST", body={"model": MODEL}).status == 200
    before = closing.counts()
    reply = closing.stack.request(path, key=key, method="POST", body={"model": MODEL}, timeout=30)
    after = closing.counts()
    assert after["reused"].get(name, 0) > before["reused"].get(name, 0), "no connection was reused: nothing was tested"
    return after["paths"][name] - before["paths"].get(name, 0), reply.json()


@pytest.mark.parametrize("kind", KEYS)
def test_a_backend_error_on_a_reused_connection_is_passed_on_once(closing: Closing, kind: str) -> None:
    """Only a failure before any answer is sent again: the backend's own 500 reaches the client
    as the backend sent it, and the backend saw the request once."""
    times, answer = sent_once(closing, KEYS[kind], "/v1/failing?status=500")
    assert (times, answer) == (1, {"backend": "closer", "path": "/v1/failing"})


@pytest.mark.parametrize("kind", KEYS)
def test_a_timeout_on_a_reused_connection_is_not_sent_again(closing: Closing, kind: str) -> None:
    """A backend slower than responseHeaderTimeout gets a 504 error object, after one try, not three."""
    times, answer = sent_once(closing, KEYS[kind], f"/v1/slow?sleep={RESPONSE_TIMEOUT_S + 1}")
    assert times == 1
    assert answer["error"]["code"] == "backend_timeout"
