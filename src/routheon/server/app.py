"""The HTTP surface: routes, the OpenAI-error middleware, and the resources behind them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from routheon import __version__
from routheon.mappings.folder import Finding
from routheon.mappings.grants import GRANTED_MODELS_HEADER, HOP_PROBE_PATH
from routheon.mappings.format import ENTRY_POINT
from routheon.mappings.verdict import (
    DEFAULT_TRAEFIK_CONFIG,
    VerdictUnavailable,
    entry_points_of,
    find_traefik,
    traefik_off,
)
from routheon.server import errors
from routheon.server.config import ServerConfig
from routheon.server.discovery import FolderWatch
from routheon.server.hop import MAX_NONCE, HopProbe, hop_url
from routheon.server.key_models import KeyModels
from routheon.server.models import TTL, ModelCatalog
from routheon.server.stats import StatsConfig, StatsService

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", ServerConfig)
FOLDER = web.AppKey("folder", FolderWatch)
CATALOG = web.AppKey("catalog", ModelCatalog)
STATS = web.AppKey("stats", StatsService)
KEY_MODELS = web.AppKey("key_models", KeyModels)
HOP = web.AppKey("hop", HopProbe)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (and our own crashes) into OpenAI error JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPNotFound):
            return errors.not_found(request.path).response()
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = set(exc.allowed_methods)
            return errors.method_not_allowed(request.method, request.path, allowed).response(
                headers={"Allow": ", ".join(sorted(allowed))}
            )
        return errors.for_status(exc.status).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("error while answering %s %s", request.method, request.path)
        return errors.internal_error().response()


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "routheon"}


def _keyed(request: web.Request) -> bool:
    """Whether to answer for the request's key: Traefik's grants router says so, with a header.

    Asked directly (on 127.0.0.1:9080, as routheon-server 1.0.x was, where OpenAI clients send
    any key), it lists every model, as before.
    """
    return GRANTED_MODELS_HEADER in request.headers and "Authorization" in request.headers


async def _key_models(request: web.Request) -> tuple[str, ...] | None:
    """The models the request's key may use (None: no such key); only asked when it sent one."""
    return await request.app[KEY_MODELS].models_of(request.headers.getall("Authorization"))


async def list_models(request: web.Request) -> web.Response:
    if _keyed(request):  # a granted key (routheon-grants.yml): its own models
        models = await _key_models(request)
        if models is None:
            return errors.INVALID_API_KEY.response()
        return _json({"object": "list", "data": [_model_entry(model) for model in models]})
    snapshot = await request.app[CATALOG].snapshot()
    return web.Response(body=snapshot.body, content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if _keyed(request):
        models = await _key_models(request)
        if models is None:
            return errors.INVALID_API_KEY.response()
        if model_id not in models:
            return errors.model_not_found(model_id).response()
        return _json(_model_entry(model_id))
    snapshot = await request.app[CATALOG].snapshot()
    if model_id not in snapshot.by_id:
        return errors.model_not_found(model_id).response()
    return _json(snapshot.by_id[model_id])


async def stats(request: web.Request) -> web.Response:
    body = request.app[STATS].body()
    if body is None:
        return errors.stats_unavailable().response()
    return web.Response(body=body, content_type="application/json")


def _problem_json(problem: Finding, folder: Path) -> dict[str, Any]:
    where = problem.path.relative_to(folder) if problem.path.is_relative_to(folder) else problem.path
    return {"file": str(where), "line": problem.line, "message": problem.message}


async def health(request: web.Request) -> web.Response:
    """Liveness, plus what an operator must fix in the mappings folder.

    Always 200 while the process serves: a broken mapping file is no reason for a
    supervisor to restart this server. Anyone may ask through Traefik without a key, so the
    answer names files, lines and reasons, never a key or a rule (Traefik's texts are redacted
    where they enter Routheon, in verdict.ask_traefik).
    """
    folder = await request.app[FOLDER].current()
    hop = await request.app[HOP].state(hop_url(folder))
    return _json(
        {
            "status": "ok" if folder.exists and not folder.errors and hop.state != "failed" else "degraded",
            "version": __version__,
            "mappings": {
                "folder": str(folder.path),
                "exists": folder.exists,
                "files": len(folder.files),
                "problems": [_problem_json(problem, folder.path) for problem in folder.errors],
                "warnings": [_problem_json(problem, folder.path) for problem in folder.warnings],
                "traefik": dataclasses.asdict(request.app[FOLDER].verdict),
                "hop": dataclasses.asdict(hop),
            },
        }
    )


async def hop_probe(request: web.Request) -> web.Response:
    """The answer /health's hop probe expects when it comes back through Traefik (server/hop.py)."""
    nonce = request.query.get("nonce", "")
    if not 0 < len(nonce) <= MAX_NONCE:
        return errors.not_found(request.path).response()
    return _json({"hop": request.app[HOP].proof(nonce)})


async def error_page(request: web.Request) -> web.Response:
    """The body Traefik shows for a bad key (``/errors/401``) or a failing backend (502-504)."""
    text = request.match_info["status"]
    status = int(text) if text.isascii() and text.isdigit() and len(text) == 3 else 0
    if not 400 <= status <= 599:
        return errors.not_found(request.path).response()
    return errors.for_status(status, has_authorization="Authorization" in request.headers).response()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Start what the handlers share (HTTP client, folder scan, CPU sampler); stop it after."""
    config = app[CONFIG]
    traefik = find_traefik(config.traefik)
    try:
        entry_points = entry_points_of(Path(DEFAULT_TRAEFIK_CONFIG))
    except VerdictUnavailable as exc:
        log.warning("%s; judging the folder with the entry point %s", exc, ENTRY_POINT)
        entry_points = (ENTRY_POINT,)
    if traefik is None and not traefik_off(config.traefik):
        log.warning("no traefik binary found: /health reports what Routheon's reader finds, without Traefik's verdict")
    folder = FolderWatch(config.mappings, config.skip_mapping, max_age=TTL, traefik=traefik, entry_points=entry_points)
    # no pool limit: a queue for a free connection would eat into the per-backend timeout;
    # the timeout itself is applied per backend by the catalog
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))
    app[FOLDER] = folder
    app[KEY_MODELS] = KeyModels(config.mappings)
    app[HOP] = HopProbe(session, max_age=TTL)
    app[CATALOG] = ModelCatalog(folder, session, config.mapping_timeout)
    await app[STATS].start()
    await folder.current()  # reports a missing folder or broken files at start-up
    try:
        yield
    finally:
        await app[STATS].stop()
        await session.close()


def create_app(config: ServerConfig, stats_config: StatsConfig | None = None) -> web.Application:
    app = web.Application(middlewares=[openai_errors])
    app[CONFIG] = config
    app[STATS] = StatsService(stats_config)
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get(HOP_PROBE_PATH, hop_probe)
    app.router.add_route("*", "/errors/{status}", error_page)
    return app
