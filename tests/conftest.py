"""Fixtures shared by several test files; pytest finds them here, so no test imports a fixture.

Helpers that are plain functions live in ``support.py`` (HTTP requests), ``server_helpers.py``
(routheon-server and its fake backends) and ``traefik_stack.py`` (a whole stack).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_helpers import Backends, running_backends


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """One fake-backend process for the whole run: ``backends.url("ok/alpha")`` is a backend base URL."""
    with running_backends(tmp_path_factory.mktemp("backends")) as running:
        yield running
