"""routheon-server's `/v1/models` for a granted key, in-process: exactly the models that key may
use, read from routheon-grants.yml as it changes; a key it does not know gets a 401."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from routheon.mappings.grants import GRANTED_MODELS_HEADER, GrantedService, Grants, render_grants
from routheon.server.app import create_app
from routheon.server.config import ServerConfig

BOTH = "sk-both-0123456789abcdef"
ONE = "sk-one-0123456789abcdef"
SERVICES = (GrantedService("smol", ("SmolLM2", "shared")), GrantedService("gemma", ("gemma-3-270m", "shared")))


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


def test_two_authorization_headers_are_refused(tmp_path: Path) -> None:
    assert asyncio.run(two_headers(tmp_path)) == 401
