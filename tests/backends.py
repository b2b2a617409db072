"""Fake llama-server backends for routheon-server's tests, one mode per URL prefix.

Run ``python tests/backends.py PORT``; a mapping then points a service at
``http://127.0.0.1:PORT/<mode>/<args>`` and routheon-server asks ``<that>/v1/models``:

    ok/NAMES           llama-server's answer (``models`` and ``data``) for comma-separated names
    openai/NAMES       an OpenAI-only answer: ``data`` without llama.cpp's ``models``
    slow/SECONDS/NAMES like ok, after SECONDS
    hang               accepts the request and never answers
    garbage            200 with a body that is not JSON
    html500            500 with an HTML page
    array              a JSON array
    nodata             a JSON object without ``data``
    huge               a valid answer of about 10 MB (over routheon-server's limit)

A closed port needs no mode: it is a free port nobody listens on.
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import web

CREATED = int(time.time())


def llama_answer(names: list[str], owner: str) -> dict:
    """The shape of llama-server's ``/v1/models``; ``meta.owner`` tells which backend answered."""
    return {
        "models": [{"name": name, "model": name, "type": "model", "capabilities": ["completion"]} for name in names],
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": CREATED, "owned_by": "llamacpp", "meta": {"owner": owner}}
            for name in names
        ],
    }


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


async def models(request: web.Request) -> web.StreamResponse:
    mode, _, rest = request.match_info["spec"].partition("/")
    owner = request.match_info["spec"]
    if mode == "ok":
        return web.json_response(llama_answer(_names(rest), owner))
    if mode == "openai":
        return web.json_response({"object": "list", "data": llama_answer(_names(rest), owner)["data"]})
    if mode == "slow":
        seconds, _, names = rest.partition("/")
        await asyncio.sleep(float(seconds))
        return web.json_response(llama_answer(_names(names), owner))
    if mode == "hang":
        await asyncio.Event().wait()
    if mode == "garbage":
        return web.Response(text="this is {not json", content_type="application/json")
    if mode == "html500":
        return web.Response(
            status=500, text="<html><body><h1>500 Internal Server Error</h1></body></html>", content_type="text/html"
        )
    if mode == "array":
        return web.json_response([{"id": "from-array"}])
    if mode == "nodata":
        return web.json_response({"object": "list", "models": [{"name": "from-nodata", "model": "from-nodata"}]})
    if mode == "huge":
        answer = llama_answer(["from-huge"], owner)
        answer["data"][0]["meta"]["padding"] = "x" * (10 * 1024 * 1024)
        return web.json_response(answer)
    return web.json_response({"error": f"unknown mode {mode!r}"}, status=404)


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/{spec:.+}/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
