"""routheon-server's /health proves the second hop works end to end (server/hop.py).

The real Traefik with Routheon's plugin, routheon-server and the grants file: /health's probe
goes out to the hop address the grants file names and must come back through Traefik's
``routheon-hop`` entry point to the same routheon-server. Whatever else answers there (nothing,
a Traefik without the probe router, another server) is a failed hop, and /health says why.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from routheon.loopback import free_port
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.grants import GRANTS_FILE, HOP_PROBE_ROUTER, GrantedService, Grants, render_grants
from support import request
from traefik_stack import Stack

pytestmark = pytest.mark.traefik
KEY = "sk-hop-probe-0123456789ab"


def write_grants(stack: Stack, hop_port: int, text_of: Callable[[Grants], str] = render_grants) -> None:
    grants = Grants(services=(GrantedService("alpha", ("alpha-model",)),), hop_port=hop_port).grant(KEY, ("alpha",))
    (stack.mappings / GRANTS_FILE).write_text(text_of(grants))


def hop(stack: Stack) -> dict:
    return request(f"{stack.server_url}/health").json()["mappings"]["hop"]


@contextmanager
def answering(status: int, body: bytes) -> Iterator[int]:
    """Something else on a loopback port: another server where the grants file says the hop is."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def without_probe_router(grants: Grants) -> str:
    """The grants file as Routheon wrote it before /health probed the hop."""
    lines = render_grants(grants).splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if HOP_PROBE_ROUTER in line) - 1  # its comment line
    end = next(i for i in range(start + 2, len(lines)) if not lines[i].startswith("      "))
    return "".join(lines[:start] + lines[end:])


def test_health_proves_the_hop_and_says_why_it_fails(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        (stack.mappings / "alpha.yml").write_text(render_mapping(MappingSpec("alpha", ("http://127.0.0.1:9",), ())))
        health = lambda: request(f"{stack.server_url}/health").json()  # noqa: E731
        assert health()["mappings"]["hop"] == {"state": "off", "url": "", "reason": ""}  # no grants file yet

        write_grants(stack, stack.hop_port)
        stack.wait_for(lambda: hop(stack)["state"] == "ok", what="the hop probe")
        assert hop(stack) == {"state": "ok", "url": f"http://127.0.0.1:{stack.hop_port}", "reason": ""}
        assert health()["status"] == "ok"
        # anyone may ask through Traefik without a key: the same answer
        assert stack.request("/health").json()["mappings"]["hop"]["state"] == "ok"

        write_grants(stack, free_port())  # nothing listens there
        stack.wait_for(lambda: hop(stack)["state"] == "failed", what="a failed probe")
        assert "cannot connect" in hop(stack)["reason"] and health()["status"] == "degraded"

        with answering(404, b"404 page not found\n") as port:  # a Traefik hop without this folder's router
            write_grants(stack, port)
            stack.wait_for(lambda: "answered 404" in hop(stack)["reason"], what="a 404 from the probe")
        with answering(200, json.dumps({"hop": "0" * 64}).encode()) as port:  # another routheon-server's answer
            write_grants(stack, port)
            stack.wait_for(lambda: "without this routheon-server's proof" in hop(stack)["reason"], what="a wrong proof")

        write_grants(stack, stack.hop_port, without_probe_router)  # written before the probe existed
        stack.wait_for(lambda: "answered 404" in hop(stack)["reason"], what="an old grants file")
        assert "routheon mapping upgrade" in hop(stack)["reason"]
        assert stack.routheon("mapping", "upgrade").returncode == 0
        stack.wait_for(lambda: hop(stack)["state"] == "ok", what="the upgraded grants file")
        log = (tmp_path / "routheon-server.log").read_text()
        assert "the hop at" in log and "does not work, granted keys do not route" in log


def test_the_probe_answer_is_this_servers_own(tmp_path: Path) -> None:
    """Asked directly, the probe path needs a nonce, and the proof differs per process."""
    with Stack(tmp_path) as stack:
        assert request(f"{stack.server_url}/health/hop").status == 404
        first = request(f"{stack.server_url}/health/hop?nonce=abc").json()["hop"]
        assert len(first) == 64 and request(f"{stack.server_url}/health/hop?nonce=abd").json()["hop"] != first
        assert stack.request("/health/hop?nonce=abc").status == 401  # not routed on the public entry point
