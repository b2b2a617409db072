"""routheon-server's `/v1/models` for a granted key, in-process: exactly the models that key may
use, read from routheon-grants.yml as it changes; a key it does not know gets a 401."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from routheon.mappings.grants import GRANTED_MODELS_HEADER, GrantedService, Grants, render_grants
from routheon.server.app import create_app
from routheon.server.config import ServerConfig

BOTH = "sk-both-0123456789abcdef"
ONE = "sk-one-0123456789abcdef"
SERVICES = (GrantedService("smol", ("SmolLM2", "shared")), GrantedService("gemma", ("gemma-3-270m", "shared")))
GRANTS = Grants(SERVICES).grant(BOTH, ("smol", "gemma")).grant(ONE, ("gemma",))


def write(folder: Path, grants: Grants) -> None:
    (folder / "routheon-grants.yml").write_text(render_grants(grants))


async def scenario(folder: Path) -> None:
    grants = Grants(SERVICES).grant(BOTH, ("smol", "gemma")).grant(ONE, ("gemma",))
    write(folder, grants)
    client = TestClient(TestServer(create_app(ServerConfig(mappings=folder, traefik="none")), host="127.0.0.1"))
    await client.start_server()
    try:

        async def models(key: str | None, path: str = "/v1/models", **headers: str) -> tuple[int, dict]:
            sent = {"Authorization": f"Bearer {key}", GRANTED_MODELS_HEADER: "true"} if key is not None else {}
            response = await client.get(path, headers={**sent, **headers})
            return response.status, await response.json()

        status, body = await models(BOTH)
        assert status == 200 and body["object"] == "list"
        assert [entry["id"] for entry in body["data"]] == ["SmolLM2", "shared", "gemma-3-270m"]
        status, body = await models(ONE)
        assert [entry["id"] for entry in body["data"]] == ["gemma-3-270m", "shared"]

        status, body = await models(ONE, "/v1/models/gemma-3-270m")
        assert status == 200 and body["id"] == "gemma-3-270m"
        status, body = await models(ONE, "/v1/models/SmolLM2")
        assert status == 404 and body["error"]["code"] == "model_not_found"

        for key in ("sk-unknown-0123456789abcdef", ""):
            status, body = await models(key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"

        write(folder, grants.revoke(BOTH, ("smol",)))  # a revocation shows on the next request
        status, body = await models(BOTH)
        assert [entry["id"] for entry in body["data"]] == ["gemma-3-270m", "shared"]

        status, body = await models(None)  # no key: the catalog over every backend, as before
        assert status == 200 and body["object"] == "list"
        response = await client.get("/v1/models", headers={"Authorization": "Bearer any"})  # not via Traefik
        assert response.status == 200
    finally:
        await client.close()


def test_a_granted_key_lists_exactly_its_models(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))


async def two_headers(folder: Path) -> int:
    write(folder, Grants(SERVICES).grant(ONE, ("gemma",)))
    client = TestClient(TestServer(create_app(ServerConfig(mappings=folder, traefik="none")), host="127.0.0.1"))
    await client.start_server()
    try:
        headers = [("Authorization", f"Bearer {ONE}"), ("Authorization", "Bearer other"), (GRANTED_MODELS_HEADER, "true")]
        response = await client.get("/v1/models", headers=headers)
        return response.status
    finally:
        await client.close()


@asynccontextmanager
async def server_on(folder: Path) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(create_app(ServerConfig(mappings=folder, traefik="none")), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def models(client: TestClient, key: str) -> tuple[int, dict]:
    """What Traefik's routheon-grants-models router gets for ``key``."""
    response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}", GRANTED_MODELS_HEADER: "true"})
    return response.status, await response.json()


def test_two_authorization_headers_are_refused(tmp_path: Path) -> None:
    assert asyncio.run(two_headers(tmp_path)) == 401


async def grants_through(folder: Path, make: Callable[[Path], None]) -> tuple[int, dict]:
    """What a granted key's ``/v1/models`` gets while ``make`` has put something else than a file there."""
    grants_file = folder / "routheon-grants.yml"
    make(grants_file)
    try:
        async with server_on(folder) as client:
            return await asyncio.wait_for(models(client, ONE), 10)
    finally:
        try:  # a reader stuck in opening a FIFO (the reader before this one) is let go
            os.close(os.open(grants_file, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_the_grants_file_is_read_as_every_mapping_file_is(tmp_path: Path) -> None:
    """Not through a link (Routheon reads no mapping file through one), and never a FIFO: reading one
    would wait for a writer, and every later granted request with it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write(outside, GRANTS)
    linked = tmp_path / "linked"
    linked.mkdir()
    status, body = asyncio.run(grants_through(linked, lambda path: path.symlink_to(outside / path.name)))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    status, body = asyncio.run(grants_through(fifo, os.mkfifo))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
