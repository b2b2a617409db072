"""A stand-in for llama-server: the endpoints Routheon's routing touches, and nothing more.

Every answer names the backend (``X-Backend`` header and the model id), so a test can tell
where Traefik sent a request. Streaming answers send their chunks ``--chunk-interval``
seconds apart and stamp each with the time it was sent; with ``--close-after-stream`` the
connection is closed after each streamed answer, keep-alive promised, as llama-server does. A streaming request with
``"hold": true`` sends its first chunk, then waits for a ``POST /release`` before the rest: a test
that receives the first chunk before releasing knows nothing on the way buffered it.

Run as a process (``python tests/fake_llama.py --port P --name N``) so that a test can stop
it like a crashed llama-server. It also takes llama-server's own command line (``--alias``
names it, the model and tuning flags are ignored), so the demo can run it as its llama-server
and it passes the demo's check of a llama-server (``POST /completion``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def build_app(name: str, chunks: int, chunk_interval: float, close_after_stream: bool = False) -> web.Application:
    headers = {"X-Backend": name}
    released = asyncio.Event()
    peers: set[object] = set()  # the client ends of the connections requests came on

    @web.middleware
    async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.transport is not None:
            peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    async def connections(_: web.Request) -> web.Response:
        """How many connections requests came on (a proxy that reuses them opens few)."""
        return web.json_response({"connections": len(peers)}, headers=headers)

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
        if close_after_stream and request.transport is not None:
            # as llama-server (cpp-httplib) does: keep-alive promised, the connection closed
            await response.write_eof()
            request.transport.close()
        return response

    async def completion(_: web.Request) -> web.Response:
        """llama-server's own completion endpoint, as Routheon's check of a llama-server calls it."""
        return web.json_response({"content": f" {name}", "tokens_predicted": 1, "stop": True}, headers=headers)

    async def release(_: web.Request) -> web.Response:
        released.set()
        return web.json_response({"released": True}, headers=headers)

    async def echo(request: web.Request) -> web.Response:
        """Any other path; ``?sleep=SECONDS`` answers late, like an overloaded llama-server."""
        await asyncio.sleep(float(request.query.get("sleep", 0)))
        return web.json_response({"backend": name, "path": request.path}, headers=headers)

    app = web.Application(middlewares=[count])
    app.router.add_get("/health", health)
    app.router.add_get("/connections", connections)
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
    parser.add_argument(
        "--close-after-stream", action="store_true", help="close the connection after each streamed answer"
    )
    args, _llama_server_flags = parser.parse_known_args()
    web.run_app(
        build_app(args.name, args.chunks, args.chunk_interval, args.close_after_stream),
        host=args.host,
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
