"""A stand-in for llama-server: the endpoints Routheon's routing touches, and nothing more.

Every answer names the backend (``X-Backend`` header and the model id), so a test can tell
where Traefik sent a request. Streaming answers send their chunks ``--chunk-interval``
seconds apart and stamp each with the time it was sent. A streaming request with
``"hold": true`` sends its first chunk, then waits for a ``POST /release`` before the rest: a test
that receives the first chunk before releasing knows nothing on the way buffered it.

Run as a process (``python tests/fake_llama.py --port P --name N``) so that a test can stop
it like a crashed llama-server. It also takes llama-server's own command line (``--alias``
names it, the model and tuning flags are ignored), so the demo can run it as its llama-server.

Token counts are made up but known to tests (``usage_of``): the prompt's characters, one
completion token per chunk. As llama-server does, a stream carries its usage event
(``"choices": []``) only when asked (``stream_options.include_usage``); ``/v1/embeddings`` counts
prompt tokens only, and llama.cpp's own ``/completion`` answers ``tokens_evaluated`` and
``tokens_predicted``. A body's ``"fault"`` makes a bad backend: ``garbage`` (a broken usage
object), ``no_usage``, or ``huge`` (megabytes of text around the usage); ``trickle`` sends an
answer a few bytes at a time, so that keys and events arrive split between reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

HUGE = 4 * 1024 * 1024


def usage_of(body: dict[str, Any], chunks: int) -> dict[str, int]:
    """The usage this backend reports for a request: its prompt's characters, ``chunks`` tokens."""
    prompt = body.get("messages", body.get("prompt", body.get("input", "")))
    prompt_tokens = len(json.dumps(prompt))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks}


def with_fault(answer: dict[str, Any], fault: str | None) -> bytes:
    """``answer`` as JSON, or broken the way the request asked."""
    if fault == "no_usage":
        answer.pop("usage", None)
    elif fault == "huge":
        answer["filler"] = "x" * HUGE
        answer["more"] = "y" * HUGE
    text = json.dumps(answer)
    if fault == "garbage":
        text = text.replace('"usage": {', '"usage": {"prompt_tokens": [[[', 1)
    return text.encode()


def build_app(name: str, chunks: int, chunk_interval: float) -> web.Application:
    headers = {"X-Backend": name}
    released = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers=headers)

    async def models(_: web.Request) -> web.Response:
        model = {"id": name, "object": "model", "created": 0, "owned_by": "llamacpp"}
        return web.json_response({"object": "list", "data": [model]}, headers=headers)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = usage_of(body, chunks)
        trickle = body.get("fault") == "trickle"

        async def send(response: web.StreamResponse, data: bytes) -> None:
            for start in range(0, len(data), 3 if trickle else len(data)):
                await response.write(data[start:start + 3] if trickle else data)
                if trickle:
                    await asyncio.sleep(0.002)

        if not body.get("stream"):
            message = {"role": "assistant", "content": f"hello from {name}"}
            answer = {"object": "chat.completion", "model": name, "choices": [{"index": 0, "message": message}],
                      "usage": usage}
            data = with_fault(answer, body.get("fault"))
            if not trickle:
                return web.Response(body=data, headers=headers, content_type="application/json")
            trickled = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
            await trickled.prepare(request)
            await send(trickled, data)
            return trickled
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
            await send(response, f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            last = {"object": "chat.completion.chunk", "model": name, "choices": [], "usage": usage}
            await send(response, b"data: " + with_fault(last, body.get("fault")) + b"\n\n")
        await send(response, b"data: [DONE]\n\n")
        return response

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        usage = usage_of(body, 0)
        answer = {"object": "list", "model": name, "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                  "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}}
        return web.json_response(answer, headers=headers)

    async def completion(request: web.Request) -> web.StreamResponse:
        """llama.cpp's own endpoint: counts as tokens_evaluated / tokens_predicted, no usage."""
        body = await request.json()
        usage = usage_of(body, chunks)
        final = {"content": "" if body.get("stream") else "hello", "stop": True, "model": name,
                 "tokens_evaluated": usage["prompt_tokens"], "tokens_predicted": usage["completion_tokens"]}
        if not body.get("stream"):
            return web.json_response(final, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(chunks):
            await response.write(f"data: {json.dumps({'content': f'{index} ', 'stop': False})}\n\n".encode())
        await response.write(f"data: {json.dumps(final)}\n\n".encode())
        return response

    async def release(_: web.Request) -> web.Response:
        released.set()
        return web.json_response({"released": True}, headers=headers)

    async def echo(request: web.Request) -> web.Response:
        """Any other path; ``?sleep=SECONDS`` answers late, like an overloaded llama-server."""
        await asyncio.sleep(float(request.query.get("sleep", 0)))
        return web.json_response({"backend": name, "path": request.path}, headers=headers)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/completion", completion)
    app.router.add_post("/release", release)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", "--alias", dest="name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-interval", type=float, default=0.2)
    args, _llama_server_flags = parser.parse_known_args()
    web.run_app(
        build_app(args.name, args.chunks, args.chunk_interval),
        host=args.host,
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
