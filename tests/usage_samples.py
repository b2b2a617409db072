"""Usage record files as Traefik's plugin writes them (USAGE-SPEC.md, docs/usage.md), for the readers' tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# The keys whose records the tests write: neither they nor their hashes may appear in any output.
KEYS = {"alice": "sk-alice-0123456789abcd", "bob": "sk-bob-0123456789wxyz", "": "sk-unnamed-0123456789qrst"}


def record(
    who: str = "alice",
    *,
    time: str = "2026-12-08T10:00:00.000Z",
    model: str = "m1",
    code: int = 200,
    prompt: int | None = 10,
    completion: int | None = 20,
    outcome: str = "ok",
    stream: bool = False,
) -> dict[str, Any]:
    """One record of the key ``KEYS[who]``, named ``who`` (``""``: a key without a name)."""
    key = KEYS[who]
    return {
        "time": time,
        "duration_ms": 12.5,
        "key": hashlib.sha256(key.encode()).hexdigest(),
        "hint": key[-4:],
        "name": who,
        "model": model,
        "service": "s1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "code": code,
        "stream": stream,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "outcome": outcome,
    }


def line(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def append(folder: Path, name: str, *records: dict[str, Any] | bytes) -> Path:
    """Add records (dicts) or raw bytes to ``folder/name`` as the plugin appends: whole lines at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("ab") as handle:
        for item in records:
            handle.write(item if isinstance(item, bytes) else line(item))
    return path


def secrets() -> list[str]:
    """What must never be shown: every key and its sha256."""
    return [text for key in KEYS.values() for text in (key, hashlib.sha256(key.encode()).hexdigest())]
