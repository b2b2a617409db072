"""``/v1/models``: ask every backend concurrently, merge their lists as 1.0.7 did, cache.

Freshness policy (documented in docs/routheon-server.md):

* each backend's answer (its model list, or why it was left out) is fresh for ``TTL`` seconds;
* a request that finds an answer older than that starts one refresh for that backend,
  shared with every other request, and meanwhile uses the previous answer as long as it is
  younger than ``TTL`` + the mapping timeout (stale-while-revalidate);
* only an answer older than that, or none at all, is waited for, and never one whose last
  attempt timed out: a hanging backend is left out until it answers again, so it cannot
  slow down request after request;
* the merged JSON body is built once per change of the answers, not once per request.

A backend that stops or starts therefore shows up within about ``TTL`` plus the timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from routheon.mappings.folder import Folder
from routheon.server.discovery import FolderWatch

log = logging.getLogger(__name__)

TTL = 2.0
MAX_BODY = 4 * 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True, eq=False)
class BackendAnswer:
    """What one backend said when last asked: its payload, or why it was left out.

    Compared by identity: a new answer means a new merge, and no request pays for a deep
    comparison of payloads.
    """

    url: str
    payload: Mapping[str, Any] | None
    error: str | None = None
    timed_out: bool = False
    at: float = 0.0


class BackendError(Exception):
    """A backend answer that cannot be used; the message says why, for the log."""


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise BackendError(f"answer of {response.content_length} bytes is over the {limit} byte limit")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise BackendError(f"answer is over the {limit} byte limit")
    return bytes(body)


def parse_models_answer(body: bytes) -> Mapping[str, Any]:
    """The payload of a ``/v1/models`` body, if it is an object with a ``data`` list."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise BackendError("answer is not JSON") from None
    if not isinstance(payload, dict):
        raise BackendError(f"answer is a JSON {type(payload).__name__}, not an object")
    if not isinstance(payload.get("data"), list):
        raise BackendError("answer has no 'data' list")
    return payload


async def fetch_models(
    session: aiohttp.ClientSession, url: str, timeout: float, clock: Callable[[], float]
) -> BackendAnswer:
    """Ask one backend for its models; every failure becomes an answer with an error."""

    async def ask() -> Mapping[str, Any]:
        async with session.get(
            f"{url}/v1/models", allow_redirects=False, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise BackendError(f"answered HTTP {response.status}")
            return parse_models_answer(await _read_capped(response, MAX_BODY))

    try:
        payload = await asyncio.wait_for(ask(), timeout)
    except asyncio.TimeoutError:
        return BackendAnswer(url, None, f"no answer within {timeout:g}s", timed_out=True, at=clock())
    except BackendError as exc:
        return BackendAnswer(url, None, str(exc), at=clock())
    except aiohttp.ClientConnectorError as exc:
        return BackendAnswer(url, None, f"cannot connect: {_reason(exc.os_error)}", at=clock())
    except aiohttp.InvalidURL:
        return BackendAnswer(url, None, "not a valid URL", at=clock())
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return BackendAnswer(url, None, f"unreachable: {exc or type(exc).__name__}", at=clock())
    return BackendAnswer(url, payload, at=clock())


def _reason(error: OSError) -> str:
    """'Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or str(error)


def _usable_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value in ("", 0):
        return None
    return str(value)


def merge(payloads: Iterable[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Merge ``/v1/models`` payloads into aligned ``data`` and ``models`` lists, as 1.0.7 does.

    An id is a ``data[].id`` or a llama.cpp ``models[].model`` (``name`` when ``model`` is
    missing). The first payload naming an id wins; ids are sorted; the two lists are aligned
    index by index, a missing entry filled in with just the id, so clients reading either
    list see the same models.
    """
    data: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for payload in payloads:
        for entry in payload.get("data") or ():
            model_id = _usable_id(entry.get("id")) if isinstance(entry, dict) else None
            if model_id is not None:
                data.setdefault(model_id, entry)
        llama_models = payload.get("models")
        for entry in llama_models if isinstance(llama_models, list) else ():
            if isinstance(entry, dict):
                model_id = _usable_id(entry.get("model")) or _usable_id(entry.get("name"))
                if model_id is not None:
                    models.setdefault(model_id, entry)
    ids = sorted(data.keys() | models.keys())
    return (
        [data.get(model_id, {"id": model_id}) for model_id in ids],
        [models.get(model_id, {"model": model_id, "name": model_id}) for model_id in ids],
    )


@dataclass(frozen=True)
class Snapshot:
    """The merged answer, serialized once and served to every request until it changes."""

    body: bytes
    by_id: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, answers: Iterable[BackendAnswer]) -> Snapshot:
        data, models = merge(answer.payload for answer in answers if answer.payload is not None)
        body = json.dumps({"object": "list", "data": data, "models": models}).encode()
        return cls(body, {str(entry["id"]): entry for entry in data})


EMPTY = Snapshot.of(())


@dataclass
class _Backend:
    answer: BackendAnswer | None = None
    refresh: asyncio.Task[BackendAnswer] | None = None


class ModelCatalog:
    """The aggregated model list of all backends named in the mappings folder."""

    def __init__(
        self,
        folder: FolderWatch,
        session: aiohttp.ClientSession,
        timeout: float,
        ttl: float = TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._folder = folder
        self._session = session
        self._timeout = timeout
        self._ttl = ttl
        self._clock = clock
        self._backends: dict[str, _Backend] = {}
        self._snapshot = EMPTY
        self._snapshot_of: tuple[BackendAnswer, ...] = ()
        self._folder_seen: Folder | None = None
        self._urls: list[str] = []
        self._fresh_until = float("-inf")

    async def snapshot(self) -> Snapshot:
        folder = await self._folder.current()
        now = self._clock()
        if folder is self._folder_seen and now < self._fresh_until:
            return self._snapshot  # the common case: nothing to look at, nothing to build
        if folder is not self._folder_seen:
            self._folder_seen = folder
            self._urls = sorted(folder.backend_urls())  # 1.0.7 visits backends in sorted URL order
            for gone in self._backends.keys() - set(self._urls):
                del self._backends[gone]
        waits = []
        for url in self._urls:
            backend = self._backends.setdefault(url, _Backend())
            answer = backend.answer
            age = now - answer.at if answer else float("inf")
            if age < self._ttl:
                continue
            refresh = self._start_refresh(url, backend)
            if answer is None or (age >= self._ttl + self._timeout and not answer.timed_out):
                waits.append(refresh)
        if waits:
            # asyncio.wait, unlike gather, leaves the shared refreshes running if we are cancelled
            await asyncio.wait(waits)
        answers = tuple(answer for url in self._urls if (answer := self._backends[url].answer) is not None)
        if answers != self._snapshot_of:
            self._snapshot, self._snapshot_of = Snapshot.of(answers), answers
        if len(answers) == len(self._urls):
            self._fresh_until = min((answer.at for answer in answers), default=float("inf")) + self._ttl
        else:
            self._fresh_until = float("-inf")
        return self._snapshot

    def answer(self, url: str) -> BackendAnswer | None:
        """What the backend at ``url`` said when last asked (None: never asked); for /metrics."""
        backend = self._backends.get(url)
        return backend.answer if backend is not None else None

    def _start_refresh(self, url: str, backend: _Backend) -> asyncio.Task[BackendAnswer]:
        if backend.refresh is None:
            backend.refresh = asyncio.create_task(self._refresh(url, backend), name=f"models {url}")
        return backend.refresh

    async def _refresh(self, url: str, backend: _Backend) -> BackendAnswer:
        try:
            answer = await fetch_models(self._session, url, self._timeout, self._clock)
            _log_change(backend.answer, answer)
            backend.answer = answer
            return answer
        finally:
            backend.refresh = None


def _log_change(before: BackendAnswer | None, after: BackendAnswer) -> None:
    if after.error is None:
        if before is not None and before.error is not None:
            log.info("backend %s answers again", after.url)
    elif before is None or before.error is None:
        log.warning("backend %s left out of /v1/models: %s", after.url, after.error)
    else:
        log.debug("backend %s still left out: %s", after.url, after.error)
