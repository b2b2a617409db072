"""``/v1/models`` with a key: the models that key may use, read from the folder's grants file.

Traefik sends ``/v1/models`` with a Bearer key here when no key file routes the key
(``routheon-grants-models`` in routheon-grants.yml), so a client configured with one key sees
exactly the models it may name, of the services whose backends answer (the catalog's rule for
``/v1/models`` without a key). The file is re-read when its stamp (inode, size, mtime, ctime)
changes: one ``stat`` per request, so a revocation shows on the next request, never a timer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from routheon.mappings.folder import read_mapping_text
from routheon.mappings.grants import GRANTS_FILE, Grants, parse_grants
from routheon.server.discovery import Stamp, file_stamp
from routheon.server.models import ModelCatalog

log = logging.getLogger(__name__)

BEARER = "Bearer "


@dataclass(frozen=True)
class _Loaded:
    stamp: Stamp | None
    grants: Grants


class KeyModels:
    """The grants of one mappings folder, as of the last change to its grants file."""

    def __init__(self, folder: Path, catalog: ModelCatalog) -> None:
        self.path = folder / GRANTS_FILE
        self._catalog = catalog
        self._loaded = _Loaded(None, Grants())
        self._lock = asyncio.Lock()

    def _read(self, stamp: Stamp | None) -> _Loaded:
        if stamp is None:
            return _Loaded(None, Grants())
        try:
            # as every reader of the folder reads a file: no link followed, no FIFO, size capped
            text, _ = read_mapping_text(self.path)
            return _Loaded(stamp, parse_grants(text))
        except (OSError, ValueError) as exc:
            # Traefik rejects such a file too (or the plugin refuses it): no key is granted anything
            log.warning("cannot read %s: %s; no granted key is listed any models", self.path, exc)
            return _Loaded(stamp, Grants())

    async def grants(self) -> Grants:
        stamp = file_stamp(self.path)
        if stamp != self._loaded.stamp:
            async with self._lock:
                if stamp != self._loaded.stamp:
                    self._loaded = await asyncio.to_thread(self._read, stamp)
        return self._loaded.grants

    async def models_of(self, authorization: list[str]) -> tuple[str, ...] | None:
        """The models of the key in ``authorization`` (the header's values); None for no granted key.

        Exactly one ``Bearer`` value counts, as in Traefik's plugin: with two, which key a
        backend would read is anybody's guess. A service none of whose backends answers is left
        out, as ``/v1/models`` without a key leaves it out (one catalog decides for both).
        """
        if len(authorization) != 1 or not authorization[0].startswith(BEARER):
            return None
        key = authorization[0][len(BEARER):]
        grants = await self.grants()
        grant = grants.key(key) if key else None
        if grant is None:
            return None
        answering = (await self._catalog.snapshot()).services
        return grants.models_for(replace(grant, services=tuple(name for name in grant.services if name in answering)))
