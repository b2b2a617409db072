"""``/health``'s proof that the second hop of "one key, many models" works, end to end.

routheon-grants.yml sends every granted request to ``http://127.0.0.1:PORT``, Traefik's
``routheon-hop`` entry point, which trusts the header naming the service. Whether that port is
Traefik's hop, and the Traefik that reads this folder, cannot be seen from the files alone (a
hop port that differs from traefik.yml's went unnoticed; on a shared host another Traefik's
hop may listen on 8081). So /health asks: it sends a request through the grants file's hop
address with the header naming routheon-server and a fresh nonce; the grants file's probe
router (``routheon-grants-hop-probe``, hop entry point only) routes it back to this server,
which answers with an HMAC of the nonce under a secret it never sends. Only a request that
went through the hop of a Traefik reading this folder, to this very process, comes back with
the right answer. One request per ``max_age`` at most (a fraction of a millisecond on loopback),
answered by whichever /health asks first; a connection that is refused costs nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from routheon.mappings.folder import Folder
from routheon.mappings.grants import (
    GRANTS_FILE,
    HOP_ENTRY_POINT,
    HOP_HEADER,
    HOP_HOST,
    HOP_PROBE_PATH,
    HOP_SERVICE,
    SERVER_SERVICE,
)

log = logging.getLogger(__name__)

# How long /health waits for the probe: on loopback it takes well under a millisecond.
PROBE_TIMEOUT = 2.0
MAX_NONCE = 64
_READ_LIMIT = 4096


@dataclass(frozen=True)
class HopState:
    """What /health says about the hop: off (no grants file), ok, or failed (and why)."""

    state: str
    url: str = ""
    reason: str = ""


def hop_url(folder: Folder) -> str | None:
    """Where the folder's grants file sends granted requests; None without a grants file, "" if it names none."""
    for mapping in folder.files:
        if mapping.path == folder.path / GRANTS_FILE:
            return next((service.urls[0] for service in mapping.services if service.name == HOP_SERVICE and service.urls), "")
    return None


class HopProbe:
    """The latest proof of the hop, at most ``max_age`` seconds old when asked for."""

    def __init__(self, session: aiohttp.ClientSession, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._max_age = max_age
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._last: HopState | None = None
        self._asked_at = float("-inf")
        self._probing: asyncio.Task[HopState] | None = None

    def proof(self, nonce: str) -> str:
        """What this process answers for ``nonce``; no other process can compute it."""
        return hmac.new(self._secret, nonce.encode("utf-8"), hashlib.sha256).hexdigest()

    async def state(self, url: str | None) -> HopState:
        if url is None:
            return HopState("off")
        last = self._last
        if last is not None and last.url == url and self._clock() - self._asked_at < self._max_age:
            return last
        if self._probing is None:
            self._probing = asyncio.create_task(self._probe(url))
        # shielded: a client hanging up must not cancel the probe other requests wait for
        return await asyncio.shield(self._probing)

    async def _probe(self, url: str) -> HopState:
        try:
            state = await self._ask(url)
        finally:
            self._probing = None
        if state != self._last:
            if state.state == "ok":
                log.info("the hop at %s works: granted keys reach their services", url)
            else:
                log.warning("the hop at %s does not work, granted keys do not route: %s", url, state.reason)
        self._last, self._asked_at = state, self._clock()
        return state

    async def _ask(self, url: str) -> HopState:
        if not url.startswith(f"http://{HOP_HOST}:"):
            return HopState("failed", url, f"{GRANTS_FILE} sends granted requests to {url!r}, not to http://{HOP_HOST}:PORT")
        nonce = secrets.token_urlsafe(16)
        try:
            async with self._session.get(
                f"{url}{HOP_PROBE_PATH}",
                params={"nonce": nonce},
                headers={HOP_HEADER: SERVER_SERVICE},
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
                allow_redirects=False,
            ) as answer:
                status, body = answer.status, await answer.content.read(_READ_LIMIT)
        except asyncio.TimeoutError:
            return HopState("failed", url, f"no answer within {PROBE_TIMEOUT:g} s")
        except aiohttp.ClientError as exc:
            return HopState(
                "failed",
                url,
                f"cannot connect ({exc.__class__.__name__}): is Traefik running, and does its {HOP_ENTRY_POINT}"
                " entry point listen on this port? (`routheon mapping check --traefik-config FILE` compares them)",
            )
        try:
            proof = json.loads(body).get("hop")
        except (ValueError, AttributeError):
            proof = None
        if status == 200 and isinstance(proof, str) and hmac.compare_digest(proof, self.proof(nonce)):
            return HopState("ok", url)
        if status == 404:
            reason = (
                "answered 404: no router there sends the probe back here. Another Traefik's hop listens on"
                f" this port, or {GRANTS_FILE} was written before this check (`routheon mapping upgrade`"
                " rewrites it), or routheon-server.yml is not in the folder"
            )
        elif status in (502, 503, 504):
            reason = f"answered {status}: Traefik could not reach routheon-server at the URL routheon-server.yml names"
        else:
            reason = f"answered {status} without this routheon-server's proof: something else listens there"
        return HopState("failed", url, reason)
