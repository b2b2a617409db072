"""The /v1/models cache policy, driven by a fake clock against in-process backends."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from server_helpers import write_mapping

from routheon.server.discovery import FolderWatch
from routheon.server.models import ModelCatalog

# the hanging backend costs one timeout of real time: keep it short (the clock is fake)
TIMEOUT = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def scenario(folder: Path) -> None:
    hits: Counter[str] = Counter()

    async def models(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits[name] += 1
        if name == "hang":
            await asyncio.Event().wait()
        return web.json_response({"object": "list", "data": [{"id": name}]})

    app = web.Application()
    app.router.add_get("/{name}/v1/models", models)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    for name in ("a", "hang"):
        write_mapping(folder, f"{name}.yml", str(server.make_url(f"/{name}")))
    clock = Clock()
    try:
        async with aiohttp.ClientSession() as session:
            catalog = ModelCatalog(FolderWatch(folder, (), max_age=2.0, clock=clock), session, TIMEOUT, clock=clock)

            # a cold start waits once; concurrent requests share that one round of questions
            first = await asyncio.gather(*(catalog.snapshot() for _ in range(20)))
            assert hits == {"a": 1, "hang": 1}
            assert all(snapshot is first[0] for snapshot in first)
            assert list(first[0].by_id) == ["a"]

            # fresh answers are served as they are: same body, no question asked
            clock.now += 1.0
            assert await catalog.snapshot() is first[0]
            assert hits == {"a": 1, "hang": 1}

            # after a long idle time the fast backend is asked again and waited for, but the
            # backend that timed out last time is not: it keeps being asked in the background
            clock.now += 100.0
            later = await asyncio.wait_for(catalog.snapshot(), TIMEOUT / 2)
            assert hits == {"a": 2, "hang": 2}
            assert list(later.by_id) == ["a"]

            # a backend removed from the folder leaves the answer
            (folder / "a.yml").unlink()
            clock.now += 100.0
            assert list((await catalog.snapshot()).by_id) == []
    finally:
        await server.close()


def test_cache_policy(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))
