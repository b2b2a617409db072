"""``/v1/models`` with a key: the models that key may use, read from the folder's grants file.

Traefik sends ``/v1/models`` with a Bearer key here when no key file routes the key
(``routheon-grants-models`` in routheon-grants.yml), so a client configured with one key sees
exactly the models it may name. The file is re-read when its size, inode or mtime changes
(one ``stat`` per request), never on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from routheon.mappings.grants import GRANTS_FILE, Grants, parse_grants

log = logging.getLogger(__name__)

BEARER = "Bearer "


@dataclass(frozen=True)
class _Loaded:
    signature: tuple[int, int, int] | None
    grants: Grants


class KeyModels:
    """The grants of one mappings folder, as of the last change to its grants file."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / GRANTS_FILE
        self._loaded = _Loaded(None, Grants())
        self._lock = asyncio.Lock()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return (found.st_ino, found.st_size, found.st_mtime_ns)

    def _read(self, signature: tuple[int, int, int] | None) -> _Loaded:
        if signature is None:
            return _Loaded(None, Grants())
        try:
            return _Loaded(signature, parse_grants(self.path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # Traefik rejects such a file too (or the plugin refuses it): no key is granted anything
            log.warning("cannot read %s: %s; no granted key is listed any models", self.path, exc)
            return _Loaded(signature, Grants())

    async def grants(self) -> Grants:
        signature = self._signature()
        if signature != self._loaded.signature:
            async with self._lock:
                if signature != self._loaded.signature:
                    self._loaded = await asyncio.to_thread(self._read, signature)
        return self._loaded.grants

    async def models_of(self, authorization: list[str]) -> tuple[str, ...] | None:
        """The models of the key in ``authorization`` (the header's values); None for no granted key.

        Exactly one ``Bearer`` value counts, as in Traefik's plugin: with two, which key a
        backend would read is anybody's guess.
        """
        if len(authorization) != 1 or not authorization[0].startswith(BEARER):
            return None
        key = authorization[0][len(BEARER):]
        grants = await self.grants()
        grant = grants.key(key) if key else None
        return None if grant is None else grants.models_for(grant)
