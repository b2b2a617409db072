"""Connections that send no request, or send it too slowly, are closed after --idle-timeout.

Otherwise each holds a file descriptor for good: a few hundred of them and the server can
no longer accept a connection, Traefik's included.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from server_helpers import Server, running_server
from support import request

IDLE_TIMEOUT = 1.0  # seconds; short to keep the tests short (the default is 15)
FILE_LIMIT = 256
IDLE_CONNECTIONS = 300  # more than the server may have files open
PATIENCE = 10 * IDLE_TIMEOUT  # how long a test waits for what should take about IDLE_TIMEOUT


def address(server: Server) -> tuple[str, int]:
    parts = urlsplit(server.base)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (waiting up to PATIENCE); what it sent is ignored."""
    sock.settimeout(PATIENCE)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("connections")
    with running_server(tmp, ["--mappings", str(tmp), "--idle-timeout", str(IDLE_TIMEOUT)]) as running:
        yield running


def test_idle_connections_cannot_use_up_the_file_descriptors(tmp_path: Path) -> None:
    # no Traefik verdict: this test is about connections
    args = ["--mappings", str(tmp_path), "--idle-timeout", str(IDLE_TIMEOUT), "--traefik", "none"]
    with running_server(tmp_path, args, max_files=FILE_LIMIT) as server:
        # the kernel queues what the server cannot accept, so every connect succeeds
        idle = [socket.create_connection(address(server), timeout=PATIENCE) for _ in range(IDLE_CONNECTIONS)]
        try:
            # (On an idle machine the server runs out of descriptors first and logs "out of system
            # resource"; on a busy one it may close idle connections as fast as it accepts them.
            # Without the idle timeout it never answers: that is what fails here.)
            # queued behind the idle ones: answered once the server has closed enough of them
            assert request(f"{server.base}/health", timeout=PATIENCE).status == 200
            assert all(closed_by_server(sock) for sock in idle)
        finally:
            for sock in idle:
                sock.close()


def test_a_request_sent_too_slowly_is_cut_off(server: Server) -> None:
    """Sending a byte now and then does not keep a connection open without a complete request."""
    with socket.create_connection(address(server), timeout=PATIENCE) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        sock.settimeout(IDLE_TIMEOUT / 5)
        while time.monotonic() - started < PATIENCE:
            try:
                sock.sendall(b"x")
                if sock.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: closed as well
                break
        assert time.monotonic() - started < PATIENCE / 2


def test_a_connection_idle_after_its_request_is_closed(server: Server) -> None:
    with socket.create_connection(address(server), timeout=PATIENCE) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started < PATIENCE / 2
