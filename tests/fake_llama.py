"""A stand-in for llama-server: the endpoints Routheon's routing touches, and nothing more.

Every answer names the backend (``X-Backend`` header and the model id), so a test can tell
where Traefik sent a request. Streaming answers send their chunks ``--chunk-interval``
seconds apart and stamp each with the time it was sent. A streaming request with
``"hold": true`` sends its first chunk, then waits for a ``POST /release`` before the rest: a test
that receives the first chunk before releasing knows nothing on the way buffered it.

Run as a process (``python tests/fake_llama.py --port P --name N``) so that a test can stop
it like a crashed llama-server. It also takes llama-server's own command line (``--alias``
names it, the model and tuning flags are ignored), so the demo can run it as its llama-server
and it passes the demo's check of a llama-server (``POST /completion``).

With ``--close-after-stream`` it does what llama-server (cpp-httplib) does to connections: every
answer promises keep-alive (``Keep-Alive: timeout=5, max=100``), and the connection is closed
right after each streamed answer anyway. ``GET /connections`` tells how many connections it
accepted and how many requests it served (``paths``: per path; ``reused``: per path, those that
came on a connection that had served one before), that request itself not counted: a test or
the bench sees whether a proxy reuses connections, and whether it sent a request twice. ``?status=CODE`` on any path the echo
answers makes it answer that status, as a failing backend would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import weakref
from collections import Counter

from aiohttp import web
from aiohttp.typedefs import Handler

# llama-server's answer header (cpp-httplib's defaults: 5 s idle, 100 requests per connection)
KEEP_ALIVE = "timeout=5, max=100"
CONNECTIONS_PATH = "/connections"


def build_app(name: str, chunks: int, chunk_interval: float, close_after_stream: bool = False) -> web.Application:
    headers = {"X-Backend": name, **({"Keep-Alive": KEEP_ALIVE} if close_after_stream else {})}
    released = asyncio.Event()
    # requests served so far on each open connection (a closed one drops out, so a new one is
    # never taken for it)
    served: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = weakref.WeakKeyDictionary()
    counts: Counter[str] = Counter(connections=0, requests=0)
    paths: Counter[str] = Counter()
    reused: Counter[str] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if request.path != CONNECTIONS_PATH and transport is not None:
            counts["requests"] += 1
            paths[request.path] += 1
            if transport in served:
                reused[request.path] += 1
            else:
                counts["connections"] += 1
            served[transport] = served.get(transport, 0) + 1
        return await handler(request)

    async def connections(_: web.Request) -> web.Response:
        return web.json_response({**counts, "paths": paths, "reused": reused})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers=headers)

    async def models(_: web.Request) -> web.Response:
        model = {"id": name, "object": "model", "created": 0, "owned_by": "llamacpp"}
        return web.json_response({"object": "list", "data": [model]}, headers=headers)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            message = {"role": "assistant", "content": f"hello from {name}"}
            return web.json_response(
                {"object": "chat.completion", "model": name, "choices": [{"index": 0, "message": message}]},
                headers=headers,
            )
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(chunks):
            if index == 1 and body.get("hold"):
                await released.wait()
                released.clear()  # the next held stream waits for its own release
            if index:
                await asyncio.sleep(chunk_interval)
            chunk = {
                "object": "chat.completion.chunk",
                "model": name,
                "sent_at": time.time(),
                "choices": [{"index": 0, "delta": {"content": f"{index} "}}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        if close_after_stream:
            # the last chunk and the close in one go, as cpp-httplib ends a stream its provider cancels
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
        return response

    async def completion(_: web.Request) -> web.Response:
        """llama-server's own completion endpoint, as Routheon's check of a llama-server calls it."""
        return web.json_response({"content": f" {name}", "tokens_predicted": 1, "stop": True}, headers=headers)

    async def release(_: web.Request) -> web.Response:
        released.set()
        return web.json_response({"released": True}, headers=headers)

    async def echo(request: web.Request) -> web.Response:
        """Any other path; ``?sleep=SECONDS`` answers late, like an overloaded llama-server, and
        ``?status=CODE`` with that status."""
        await asyncio.sleep(float(request.query.get("sleep", 0)))
        status = int(request.query.get("status", 200))
        return web.json_response({"backend": name, "path": request.path}, status=status, headers=headers)

    app = web.Application(middlewares=[count])
    app.router.add_get(CONNECTIONS_PATH, connections)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/completion", completion)
    app.router.add_post("/release", release)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", "--alias", dest="name", default="fake-llama")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-interval", type=float, default=0.2)
    parser.add_argument("--close-after-stream", action="store_true",
                        help="close the connection after each streamed answer, as llama-server does")
    args, _llama_server_flags = parser.parse_known_args()
    web.run_app(
        build_app(args.name, args.chunks, args.chunk_interval, args.close_after_stream),
        host=args.host,
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
