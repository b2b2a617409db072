"""Whether Traefik's ``routheon-hop`` entry point routes granted requests, asked end to end.

The grants file names the hop's port (``routheon-grants.yml``); a file written for another
``traefik.yml`` sent every granted request to whatever held 127.0.0.1:8081, and nothing said
so. routheon-server asks the hop as the plugin does: ``GET /health`` with the header naming
the first granted service. Traefik's hop router for that service then passes it to the
service's llama-server, whose ``/health`` answers; a 404 says Traefik listens there but has no
route for the service (another Traefik, or the grants not applied). The answer is kept for
``MAX_AGE`` seconds and asked again in the background, never on a request's time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from routheon.mappings.grants import HOP_HEADER, HOP_HOST
from routheon.server.key_models import KeyModels

MAX_AGE = 5.0
TIMEOUT = 2.0
# states in which granted keys cannot be routed: /health says "degraded"
BROKEN = frozenset({"unreachable", "no-route", "unexpected"})


@dataclass(frozen=True)
class HopState:
    """What the last probe found: ``none`` (no granted service), ``checking``, ``ok``,
    ``backend-down`` (the hop routes; the service's llama-server does not answer), ``no-route``,
    ``unreachable`` or ``unexpected``."""

    state: str
    url: str = ""
    detail: str = ""

    @property
    def broken(self) -> bool:
        return self.state in BROKEN


class HopProbe:
    def __init__(self, key_models: KeyModels, session: aiohttp.ClientSession, max_age: float = MAX_AGE) -> None:
        self._key_models = key_models
        self._session = session
        self._max_age = max_age
        self._state = HopState("checking")
        self._asked_at = float("-inf")
        self._asking: asyncio.Task[None] | None = None

    def state(self) -> HopState:
        """The last answer; a new probe starts in the background when it is older than ``max_age``."""
        if self._asking is None and time.monotonic() - self._asked_at >= self._max_age:
            self._asked_at = time.monotonic()
            self._asking = asyncio.create_task(self._ask())
        return self._state

    async def current(self) -> HopState:
        """``state()``, but a broken one is asked again first: routheon-server usually starts
        before Traefik, and its first probe finds nothing listening yet. A refused connection
        answers at once; a hop that accepts and hangs costs at most ``TIMEOUT``."""
        if self._state.broken or self._state.state == "checking":
            if self._asking is None:
                self._asked_at = time.monotonic()
                self._asking = asyncio.create_task(self._ask())
            await asyncio.shield(self._asking)
        return self.state()

    async def close(self) -> None:
        if self._asking is not None:
            self._asking.cancel()

    async def _ask(self) -> None:
        try:
            self._state = await self.probe()
        finally:
            self._asking = None

    async def probe(self) -> HopState:
        grants = await self._key_models.grants()
        if not grants.services:
            return HopState("none")
        service = grants.services[0].name
        url = f"http://{HOP_HOST}:{grants.hop_port}/health"
        try:
            async with self._session.get(
                url, headers={HOP_HEADER: service}, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
            ) as answer:
                status = answer.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = "no answer in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            return HopState("unreachable", url, f"nothing answers there ({reason}): is Traefik's routheon-hop on this port?")
        if 200 <= status < 300:
            return HopState("ok", url, f"service {service!r} answered /health through the hop")
        if status in (502, 503, 504):
            return HopState("backend-down", url, f"the hop routes; service {service!r} does not answer ({status})")
        if status == 404:
            return HopState(
                "no-route", url,
                f"404: no route for service {service!r} there (another Traefik, or routheon-grants.yml not applied)",
            )
        return HopState("unexpected", url, f"answered {status} for service {service!r}'s /health")
