"""What one key holder can send: bounded bodies and the inference API only, on both kinds of key.

The real Traefik with Routheon's plugin, in front of a backend that records every request it
receives. Each case runs for a key in a key file (its router's guard) and for a granted key
(routheon-grants.yml, through the plugin and the second hop). Traefik's memory is read with
psutil while the request is on its way, so the tests show what an upload costs the proxy that
every other key shares. Design: docs/production.md, "Request size and paths".
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from routheon.mappings.format import MAX_REQUEST_BODY_BYTES, MappingSpec, render_mapping
from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, render_grants
from support import Reply
from traefik_stack import Stack

pytestmark = pytest.mark.traefik

FILE_KEY = "sk-guard-file-0123456789"
OPENED_KEY = "sk-guard-opened-0123456789"
GRANTED_KEY = "sk-guard-granted-0123456789"
OTHER_KEY = "sk-guard-other-0123456789"
KEYS = {"key file": FILE_KEY, "granted key": GRANTED_KEY}
MODEL = "guarded-model"
MIB = 1024 * 1024
UPLOAD = 300 * MIB
# what llama-server serves beyond its inference API (llama.cpp tools/server/server.cpp, 11434)
ADMIN = [
    ("GET", "/slots"),
    ("POST", "/slots/0?action=erase"),
    ("POST", "/slots/0?action=save"),
    ("POST", "/props"),
    ("GET", "/metrics"),
    ("POST", "/models"),
    ("POST", "/models/load"),
    ("POST", "/models/unload"),
    ("GET", "/lora-adapters"),
    ("POST", "/lora-adapters"),
    ("GET", "/cors-proxy"),
    ("GET", "/tools"),
    ("GET", "/"),
    ("GET", "/%73lots"),  # /slots, percent-encoded
]
INFERENCE = [
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("GET", "/props"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/completion"),
    ("POST", "/chat/completions"),
    ("POST", "/embedding"),
    ("POST", "/infill"),
    ("POST", "/rerank"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/apply-template"),
]


@dataclass
class Recorder:
    """A backend that answers every request and records its method, path and body size."""

    received: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                size = 0
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while (chunk := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        size += len(self.rfile.read(chunk))
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    left = int(self.headers.get("Content-Length") or 0)
                    while left > 0 and (data := self.rfile.read(min(left, MIB))):
                        size, left = size + len(data), left - len(data)
                with recorder.lock:
                    recorder.received.append((self.command, self.path, size))
                body = json.dumps({"backend": "recorder", "path": self.path, "received": size}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", "recorder")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def paths(self) -> list[str]:
        """What reached the backend, but Traefik's health checks."""
        with self.lock:
            return [f"{method} {path}" for method, path, _ in self.received if (method, path) != ("GET", "/health")]

    def largest_body(self) -> int:
        with self.lock:
            return max((size for _, _, size in self.received), default=0)


@dataclass
class Guarded:
    stack: Stack
    recorder: Recorder

    @property
    def traefik(self) -> psutil.Process:
        assert self.stack.traefik is not None and self.stack.traefik.pid is not None
        return psutil.Process(self.stack.traefik.pid)

    def other_key_works(self) -> bool:
        answer = self.stack.request("/v1/chat/completions", key=OTHER_KEY, method="POST", body={"messages": []})
        return answer.status == 200 and answer.headers.get("X-Backend") == "other"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """Key files (one opening /slots), a granted key, and another key on a backend of its own."""
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), recorder.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with Stack(tmp_path_factory.mktemp("guarded")) as stack:
            other = stack.start_backend("other")
            specs = [
                MappingSpec("filed", (url,), (FILE_KEY,)),
                MappingSpec("opened", (url,), (OPENED_KEY,), allowed_paths=("/slots",)),
                MappingSpec("granted", (url,), ()),
                MappingSpec("other", (other.url,), (OTHER_KEY,)),
            ]
            for spec in specs:
                (stack.mappings / spec.file_name).write_text(render_mapping(spec))
            grants = Grants(services=(GrantedService("granted", (MODEL,)),), hop_port=stack.hop_port)
            (stack.mappings / GRANTS_FILE).write_text(render_grants(grants.grant(GRANTED_KEY, ("granted",))))
            for key in (*KEYS.values(), OPENED_KEY):
                stack.wait_for(lambda key=key: stack.backend_of(key, "/props") == "recorder")
            stack.wait_for(lambda: stack.backend_of(OTHER_KEY, "/health") == "other")
            yield Guarded(stack, recorder)
    finally:
        server.shutdown()


def openai_error(reply: Reply, status: int, code: str) -> dict:
    assert reply.status == status, reply.body[:300]
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    return error


class Upload:
    """One POST sent over a raw socket: the answer is read while the body is still going out.

    A proxy that refuses a body answers, then closes, before the client has sent it all; a
    client that sent first and read afterwards would see a broken pipe instead of the answer.
    """

    def __init__(self, port: int, key: str, headers: list[tuple[str, str]], body: Iterator[bytes]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}"]
        self.sock.sendall(("\r\n".join([*head, *(f"{name}: {value}" for name, value in headers)]) + "\r\n\r\n").encode())
        self.sent = 0
        self.halfway = threading.Event()  # set once the sender waits at ``pause_at``
        self.go_on = threading.Event()
        self.sender = threading.Thread(target=self._send, args=(body,), daemon=True)

    def _send(self, body: Iterator[bytes]) -> None:
        try:
            for part in body:
                if part is PAUSE:
                    self.halfway.set()
                    self.go_on.wait(60)
                    continue
                self.sock.sendall(part)
                self.sent += len(part)
        except OSError:
            pass  # the proxy refused the body and closed: what these tests expect
        finally:
            self.halfway.set()

    def response(self) -> Reply:
        reply = http.client.HTTPResponse(self.sock, method="POST")
        reply.begin()
        return Reply(reply.status, dict(reply.getheaders()), reply.read())

    def close(self) -> None:
        self.go_on.set()
        self.sock.close()
        self.sender.join(60)


PAUSE = b""


def json_body(size: int) -> Iterator[bytes]:
    """A chat request of ``size`` bytes naming the granted model, sent in 1 MiB pieces."""
    head, tail = b'{"model": "' + MODEL.encode() + b'", "prompt": "', b'"}'
    yield head
    left = size - len(head) - len(tail)
    while left > 0:
        yield b"x" * min(left, MIB)
        left -= MIB
    yield tail


def chunked(parts: Iterator[bytes], pause_at: int) -> Iterator[bytes]:
    """``parts`` in chunked framing, with a PAUSE once ``pause_at`` bytes are out."""
    sent, paused = 0, False
    for part in parts:
        if not paused and sent >= pause_at:
            paused = True
            yield PAUSE
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
        sent += len(part)
    yield b"0\r\n\r\n"


class PeakRss:
    """Traefik's largest resident size while a request is under way, sampled every 5 ms."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.before = process.memory_info().rss
        self.peak = self.before
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def growth(self) -> int:
        time.sleep(0.2)  # anything the refusal left to free or fill
        self.done.set()
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss) - self.before


def refused_upload(guarded: Guarded, kind: str, headers: list[tuple[str, str]], body: Iterator[bytes]) -> tuple[Reply, int]:
    """Send ``body`` with ``kind``'s key; the answer and how much Traefik's RSS grew meanwhile.

    While the sender waits halfway (a chunked body), another key must be served.
    """
    rss = PeakRss(guarded.traefik)
    upload = Upload(guarded.stack.port, KEYS[kind], headers, body)
    try:
        upload.sender.start()
        upload.halfway.wait(60)
        assert guarded.other_key_works(), "another key was not served while an upload was under way"
        upload.go_on.set()
        reply = upload.response()
    finally:
        upload.close()
    return reply, rss.growth()


@pytest.mark.parametrize("kind", list(KEYS))
def test_a_lying_content_length_is_refused_at_once_and_costs_nothing(guarded: Guarded, kind: str) -> None:
    """50 GB claimed, 17 bytes sent: a 413 without waiting for the rest, and no memory for the claim."""
    pid = guarded.traefik.pid
    headers = [("Content-Type", "application/json"), ("Content-Length", "50000000000")]
    reply, growth = refused_upload(guarded, kind, headers, iter([b'{"model": "x", "', PAUSE]))
    error = openai_error(reply, 413, "request_too_large")
    assert f"{MAX_REQUEST_BODY_BYTES // MIB} MiB" in error["message"]
    assert growth < 16 * MIB, f"Traefik grew by {growth / MIB:.0f} MiB for a claimed size"
    assert guarded.traefik.pid == pid and guarded.traefik.is_running()
    assert guarded.other_key_works()
    assert "POST /v1/chat/completions" not in guarded.recorder.paths()


@pytest.mark.parametrize("kind", list(KEYS))
def test_claims_under_the_limit_cost_only_what_arrives(guarded: Guarded, kind: str) -> None:
    """Eight clients claim 60 MiB each and send 17 bytes: Traefik waits for the rest without room for it."""
    rss = PeakRss(guarded.traefik)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(60 * MIB))]
    uploads = [Upload(guarded.stack.port, KEYS[kind], headers, iter([b'{"model": "x", "', PAUSE])) for _ in range(8)]
    try:
        for upload in uploads:
            upload.sender.start()
        for upload in uploads:
            upload.halfway.wait(60)
        assert guarded.other_key_works()
        time.sleep(0.5)  # the plugin has read what came and waits for more
    finally:
        for upload in uploads:
            upload.close()
    growth = rss.growth()
    assert growth < 16 * MIB, f"Traefik grew by {growth / MIB:.0f} MiB for 8 × 60 MiB claimed"
    assert "POST /v1/chat/completions" not in guarded.recorder.paths()


@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
@pytest.mark.parametrize("kind", list(KEYS))
def test_a_300_mib_body_is_refused_and_costs_less_than_twice_the_limit(
    guarded: Guarded, kind: str, framing: str
) -> None:
    """Declared (refused before a byte is read) or chunked (refused once the limit is passed)."""
    if framing == "chunked":
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        body = chunked(json_body(UPLOAD), pause_at=MAX_REQUEST_BODY_BYTES // 2)
    else:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(UPLOAD))]
        body = iter([PAUSE, *json_body(UPLOAD)])
    reply, growth = refused_upload(guarded, kind, headers, body)
    openai_error(reply, 413, "request_too_large")
    assert growth < 2 * MAX_REQUEST_BODY_BYTES, f"Traefik grew by {growth / MIB:.0f} MiB"
    assert guarded.traefik.is_running() and guarded.other_key_works()
    assert guarded.recorder.largest_body() <= MAX_REQUEST_BODY_BYTES
    assert "POST /v1/chat/completions" not in guarded.recorder.paths()


@pytest.mark.parametrize("kind", list(KEYS))
def test_a_body_at_the_limit_still_routes(guarded: Guarded, kind: str) -> None:
    body = b"".join(json_body(MAX_REQUEST_BODY_BYTES))
    reply = guarded.stack.send("POST", "/v1/completions", [("Authorization", f"Bearer {KEYS[kind]}")], body)
    assert reply.status == 200 and reply.json() == {
        "backend": "recorder", "path": "/v1/completions", "received": MAX_REQUEST_BODY_BYTES
    }


@pytest.mark.parametrize("kind", list(KEYS))
def test_admin_paths_get_a_403_and_never_reach_the_backend(guarded: Guarded, kind: str) -> None:
    before = len(guarded.recorder.paths())
    for method, path in ADMIN:
        reply = guarded.stack.request(path, key=KEYS[kind], method=method, body={"model": MODEL} if method == "POST" else None)
        error = openai_error(reply, 403, "path_not_allowed")
        assert "inference API" in error["message"], (method, path)
    assert guarded.recorder.paths()[before:] == []


@pytest.mark.parametrize("kind", list(KEYS))
def test_the_inference_api_reaches_the_backend(guarded: Guarded, kind: str) -> None:
    for method, path in INFERENCE:
        body = {"model": MODEL, "content": "hi"} if method == "POST" else None
        reply = guarded.stack.request(path, key=KEYS[kind], method=method, body=body)
        assert (reply.status, reply.headers.get("X-Backend")) == (200, "recorder"), (method, path, reply.body[:200])
    assert [entry for entry in guarded.recorder.paths() if entry.split()[1] in {p for _, p in INFERENCE}]


def test_a_key_file_opens_more_paths_for_its_own_keys_only(guarded: Guarded) -> None:
    stack = guarded.stack
    for method, path in (("GET", "/slots"), ("POST", "/slots/0?action=save")):
        assert stack.request(path, key=OPENED_KEY, method=method).headers.get("X-Backend") == "recorder", path
        openai_error(stack.request(path, key=FILE_KEY, method=method), 403, "path_not_allowed")
    openai_error(stack.request("/metrics", key=OPENED_KEY), 403, "path_not_allowed")
    assert "GET /slots" in guarded.recorder.paths()

