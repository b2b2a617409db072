"""Fixtures shared by several test files; pytest finds them here, so no test imports a fixture.

Helpers that are plain functions live in ``support.py`` (HTTP requests), ``server_helpers.py``
(routheon-server and its fake backends) and ``traefik_stack.py`` (a whole stack).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import Backends, running_backends

from routheon.demo.llama import BuildError, CheckError, proven_llama_server
from routheon.demo.models import CHECK_MODEL
from routheon.supervisor import Supervisor


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """One fake-backend process for the whole run: ``backends.url("ok/alpha")`` is a backend base URL."""
    with running_backends(tmp_path_factory.mktemp("backends")) as running:
        yield running


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The llama-server `make demo-assets` built or found, proven to run here (a cached verdict).

    Skips when there is none yet; one that fails its check fails every test that needs it with
    the check's message, instead of each test reporting a llama-server that died.
    """
    model = CHECK_MODEL.cached_path()
    if not model.is_file():
        pytest.skip("the demo models are missing: run `make demo-assets` first")
    try:
        binary = proven_llama_server(model, build_missing=False)
    except (BuildError, CheckError) as exc:
        pytest.fail(str(exc), pytrace=False)
    if binary is None:
        pytest.skip("llama-server is missing: run `make demo-assets` first")
    return binary


@pytest.fixture
def busy_cpu(tmp_path: Path) -> Iterator[None]:
    """Two busy loops beside the test, as on a host whose CPUs run llama-server."""
    with Supervisor(tmp_path / "busy-loops") as burners:
        for n in (1, 2):
            burners.start(f"busy-loop-{n}", [sys.executable, "-c", "while True: pass"])
        yield
