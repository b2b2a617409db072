"""routheon-server's `/v1/models` for a granted key, in-process: exactly the models that key may
use, read from routheon-grants.yml as it changes, of the services whose backends answer; a key it
does not know gets a 401."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from server_helpers import write_mapping

from routheon.mappings.grants import GRANTED_MODELS_HEADER, GrantedService, Grants, render_grants
from routheon.server.app import create_app
from routheon.server.config import ServerConfig

BOTH = "sk-both-0123456789abcdef"
ONE = "sk-one-0123456789abcdef"
SERVICES = (GrantedService("smol", ("SmolLM2", "shared")), GrantedService("gemma", ("gemma-3-270m", "shared")))
GRANTS = Grants(SERVICES).grant(BOTH, ("smol", "gemma")).grant(ONE, ("gemma",))


def write(folder: Path, grants: Grants) -> None:
    (folder / "routheon-grants.yml").write_text(render_grants(grants))


async def backend(name: str, port: int = 0) -> TestServer:
    """A llama-server stand-in answering ``/v1/models`` with one model, ``NAME.gguf``."""

    async def listing(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": f"{name}.gguf"}]})

    app = web.Application()
    app.router.add_get("/v1/models", listing)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    return server


@asynccontextmanager
async def server_on(folder: Path) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(create_app(ServerConfig(mappings=folder, traefik="none")), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def models(client: TestClient, key: str | None, path: str = "/v1/models") -> tuple[int, dict]:
    """What Traefik's routheon-grants-models router gets for ``key`` (None: no key, the keyless list)."""
    sent = {"Authorization": f"Bearer {key}", GRANTED_MODELS_HEADER: "true"} if key is not None else {}
    response = await client.get(path, headers=sent)
    return response.status, await response.json()


async def ids(client: TestClient, key: str | None) -> list[str]:
    status, body = await models(client, key)
    assert status == 200 and body["object"] == "list"
    return [entry["id"] for entry in body["data"]]


@asynccontextmanager
async def granted_folder(folder: Path) -> AsyncIterator[dict[str, TestServer]]:
    """GRANTS in ``folder``, each of its services in its own NAME.yml (as `routheon mapping add`
    has it) with a running backend; the backends by service, closed at the end."""
    backends = {name: await backend(name) for name in ("smol", "gemma")}
    for name, running in backends.items():
        write_mapping(folder, f"{name}.yml", f"http://127.0.0.1:{running.port}")
    write(folder, GRANTS)
    try:
        yield backends
    finally:
        for running in backends.values():
            await running.close()


async def scenario(folder: Path) -> None:
    async with granted_folder(folder), server_on(folder) as client:
        assert await ids(client, BOTH) == ["SmolLM2", "shared", "gemma-3-270m"]
        assert await ids(client, ONE) == ["gemma-3-270m", "shared"]

        status, body = await models(client, ONE, "/v1/models/gemma-3-270m")
        assert status == 200 and body["id"] == "gemma-3-270m"
        status, body = await models(client, ONE, "/v1/models/SmolLM2")
        assert status == 404 and body["error"]["code"] == "model_not_found"

        for key in ("sk-unknown-0123456789abcdef", ""):
            status, body = await models(client, key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"

        write(folder, GRANTS.revoke(BOTH, ("smol",)))  # a revocation shows on the next request
        assert await ids(client, BOTH) == ["gemma-3-270m", "shared"]

        assert await ids(client, None) == ["gemma.gguf", "smol.gguf"]  # no key: the catalog, as before
        response = await client.get("/v1/models", headers={"Authorization": "Bearer any"})  # not via Traefik
        assert response.status == 200


def test_a_granted_key_lists_exactly_its_models(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Wait for ``await check()`` to be true (the catalog asks a backend again after 2 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "the model lists did not change in time"
        await asyncio.sleep(0.1)


async def stopped_backend(folder: Path) -> None:
    async with granted_folder(folder) as backends, server_on(folder) as client:
        port = backends["gemma"].port
        assert await ids(client, None) == ["gemma.gguf", "smol.gguf"]
        assert await ids(client, BOTH) == ["SmolLM2", "shared", "gemma-3-270m"]

        await backends["gemma"].close()
        await until(lambda: _lists(client, None, ["smol.gguf"]))
        # the keyless list dropped gemma: so does every granted key's, on the same answers
        assert await ids(client, BOTH) == ["SmolLM2", "shared"]  # "shared" still served by smol
        assert await ids(client, ONE) == []
        status, body = await models(client, ONE, "/v1/models/gemma-3-270m")
        assert status == 404 and body["error"]["code"] == "model_not_found"

        backends["gemma"] = await backend("gemma", port)  # started again: listed again
        await until(lambda: _lists(client, None, ["gemma.gguf", "smol.gguf"]))
        assert await ids(client, ONE) == ["gemma-3-270m", "shared"]


async def _lists(client: TestClient, key: str | None, expected: list[str]) -> bool:
    return await ids(client, key) == expected


def test_a_stopped_backend_leaves_granted_lists_as_it_leaves_the_keyless_one(tmp_path: Path) -> None:
    asyncio.run(stopped_backend(tmp_path))


async def two_headers(folder: Path) -> int:
    write(folder, Grants(SERVICES).grant(ONE, ("gemma",)))
    async with server_on(folder) as client:
        headers = [("Authorization", f"Bearer {ONE}"), ("Authorization", "Bearer other"), (GRANTED_MODELS_HEADER, "true")]
        response = await client.get("/v1/models", headers=headers)
        return response.status


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
