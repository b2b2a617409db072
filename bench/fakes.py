"""Stand-in processes: fake llama-server backends and the floor server.

Run as ``python -m bench.fakes backends --live P1,P2 --hang P3`` or
``python -m bench.fakes floor --port P --body FILE``. Each is its own process so that the
server under test never shares an event loop (or a core) with what it talks to.

The floor is the least any aiohttp server can do for a request: one handler that answers
prepared bytes. Routheon's own servers are compared against it to see what their logic costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from aiohttp import web

HOST = "127.0.0.1"


def models_payload(port: int) -> dict:
    """The shape llama-server answers on /v1/models, with a model name unique to the port."""
    name = f"bench-model-{port}.gguf"
    return {
        "models": [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                    "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
                                                  "families": [""], "parameter_size": "",
                                                  "quantization_level": ""}}],
        "object": "list",
        "data": [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "llamacpp",
                  "meta": {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576,
                           "n_params": 134515008, "size": 100000000}}],
    }


def chat_payload() -> dict:
    """A complete, non-streamed chat answer: what a proxy has to pass through untouched (the
    instant backend answers it, bench/instant_backend.cpp)."""
    return {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
        "model": "bench-model", "system_fingerprint": "bench",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello from the fake backend."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }


def _json_response(payload: dict) -> web.Response:
    body = json.dumps(payload).encode()

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handler


def backend_app(port: int) -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/models", _json_response(models_payload(port)))
    app.router.add_get("/health", _json_response({"status": "ok"}))
    return app


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read whatever comes, answer nothing: a backend stuck mid-request."""
    while await reader.read(65536):
        pass
    writer.close()


async def serve_backends(live: list[int], hang: list[int]) -> None:
    runners = []
    for port in live:
        runner = web.AppRunner(backend_app(port), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        runners.append(runner)
    servers = [await asyncio.start_server(_hang, HOST, port) for port in hang]
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
        for runner in runners:
            await runner.cleanup()


def floor_app(body: bytes, content_type: str) -> web.Application:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


def _ports(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakes")
    modes = parser.add_subparsers(dest="mode", required=True)
    backends = modes.add_parser("backends", help="fake llama-servers, live and hanging")
    backends.add_argument("--live", type=_ports, default=[])
    backends.add_argument("--hang", type=_ports, default=[])
    floor = modes.add_parser("floor", help="answer a file's bytes on every GET")
    floor.add_argument("--port", type=int, required=True)
    floor.add_argument("--body", type=Path, required=True)
    floor.add_argument("--content-type", default="application/json")
    args = parser.parse_args(argv)
    if args.mode == "backends":
        asyncio.run(serve_backends(args.live, args.hang))
    else:
        web.run_app(floor_app(args.body.read_bytes(), args.content_type), host=HOST, port=args.port,
                    access_log=None, print=None)


if __name__ == "__main__":
    main()
