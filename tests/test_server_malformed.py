"""Requests aiohttp's HTTP parser rejects: an OpenAI error body, and no key in the answer or the log.

Such a request never reaches the application, and the bytes the parser complains about are
often the API key (in ``Authorization`` or in ``?api_key=``). Traefik forwards many of them
(headers up to 1 MiB, for one), so any client can send them. Raw sockets, because an HTTP
client library refuses to send most of these.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from server_helpers import Server, running_server

SECRET = "sk-LEAK-0123456789"
LONG = "A" * 9000  # over aiohttp's 8190-byte limit for the request line and for a header

ERRORS_401 = "GET /errors/401 HTTP/1.1\r\nHost: x\r\n"  # where Traefik sends a key it does not know

# name: the request, with every place a key may be in holding SECRET
MALFORMED = {
    "control character in the key": f"{ERRORS_401}Authorization: Bearer {SECRET}\x01\r\n\r\n",
    "bare LF in the key": f"{ERRORS_401}Authorization: Bearer {SECRET}\nx\r\n\r\n",
    "bare CR in the key": f"{ERRORS_401}Authorization: Bearer {SECRET}\rx\r\n\r\n",
    "key on a folded line": f"{ERRORS_401}Authorization: Bearer\r\n  {SECRET}\r\n\r\n",
    "no colon after the name": f"{ERRORS_401}Authorization Bearer {SECRET}\r\n\r\n",
    "space in the name": f"{ERRORS_401}Authori zation: Bearer {SECRET}\r\n\r\n",
    "key over 8190 bytes": f"{ERRORS_401}Authorization: Bearer {SECRET}{LONG}\r\n\r\n",
    "control character in the query": f"GET /v1/models?api_key={SECRET}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    "request line over 8190 bytes": f"GET /v1/models?api_key={SECRET}{LONG} HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad method": f"G@T /v1/models?api_key={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad HTTP version": f"GET /v1/models?api_key={SECRET} HTTP/1.x\r\nHost: x\r\n\r\n",
    "key as the request target": f"GET {SECRET} HTTP/1.1\r\nHost: x\r\n\r\n",
}

# aiohttp has two parsers, llhttp (C) and a pure-Python fallback, with different error messages
PARSERS = {"llhttp": {}, "python": {"AIOHTTP_NO_EXTENSIONS": "1"}}


@pytest.fixture(scope="module", params=sorted(PARSERS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server logging everything (access log included), with either of aiohttp's parsers."""
    tmp = tmp_path_factory.mktemp(f"malformed-{request.param}")
    with running_server(tmp, ["--mappings", str(tmp), "--log-level", "DEBUG"], env=PARSERS[request.param]) as running:
        yield running


def exchange(server: Server, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``, read until the server closes: status, headers (lower-case names), body."""
    address = urlsplit(server.base)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def new_log(server: Server, before: str) -> str:
    log = server.proc.log()
    assert log.startswith(before)
    return log[len(before) :]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_rejected_request_is_an_openai_error_without_the_key(server: Server, name: str) -> None:
    before = server.proc.log()
    status, headers, body = exchange(server, MALFORMED[name].encode("latin-1"))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_request")
    assert SECRET not in error["message"] and "sk-" not in json.dumps(headers)

    log = new_log(server, before)
    assert "rejected a request that is not valid HTTP" in log, "the log says what happened"
    assert " ERROR " not in log and "Traceback" not in log, "a client's mistake is no server error"
    assert SECRET not in log and "api_key" not in log


@pytest.mark.parametrize("path", ["/v1/models", "/errors/401", "/nowhere"])
def test_access_log_leaves_out_the_query_and_headers(server: Server, path: str) -> None:
    """A key may be sent as ``?api_key=``; the access log shows the path only."""
    before = server.proc.log()
    headers = f"Host: x\r\nAuthorization: Bearer {SECRET}\r\nConnection: close\r\n"
    status, _, body = exchange(server, f"GET {path}?api_key={SECRET} HTTP/1.1\r\n{headers}\r\n".encode())
    assert status in (200, 401, 404) and SECRET.encode() not in body
    log = new_log(server, before)
    assert f'"GET {path} HTTP/1.1" {status}' in log
    assert SECRET not in log and "api_key" not in log

