"""Fixtures shared by several test files; pytest finds them here, so no test imports a fixture.

Helpers that are plain functions live in ``support.py`` (HTTP requests), ``server_helpers.py``
(routheon-server and its fake backends) and ``traefik_stack.py`` (a whole stack).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from server_helpers import Backends, running_backends

from routheon.mappings.grants import USAGE_ENV


@pytest.fixture(scope="session", autouse=True)
def usage_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Grants files the ``routheon`` command writes in tests name a temporary usage folder, not
    /var/lib/routheon/usage (a Traefik of a test would write its records there)."""
    saved = os.environ.get(USAGE_ENV)
    os.environ[USAGE_ENV] = str(tmp_path_factory.mktemp("usage"))
    yield
    if saved is None:
        del os.environ[USAGE_ENV]
    else:
        os.environ[USAGE_ENV] = saved


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """One fake-backend process for the whole run: ``backends.url("ok/alpha")`` is a backend base URL."""
    with running_backends(tmp_path_factory.mktemp("backends")) as running:
        yield running
