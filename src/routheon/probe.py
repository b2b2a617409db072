"""Asking a local HTTP service whether it is up and what it serves, without raising.

Readiness checks poll these many times a second while a process starts, so a refused
connection, a timeout or a garbled answer is an ordinary "not yet", never an exception.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def http_status(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int | None:
    """The HTTP status ``GET url`` gets right now; None when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 200 right now."""
    return http_status(url, timeout) == 200


def model_ids(url: str, key: str | None = None, timeout: float = 5.0) -> list[str]:
    """The model ids ``GET url/v1/models`` lists; [] when it does not answer 200 with a list."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{url}/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.load(response)
    except (OSError, ValueError):
        return []
    data = body.get("data") if isinstance(body, dict) else None
    return [str(item.get("id")) for item in data or [] if isinstance(item, dict)]


def post_json(url: str, body: Any, timeout: float = 5.0) -> tuple[int | None, Any]:
    """``POST url`` with a JSON body: the status and the decoded answer (None where there is none)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, raw = int(exc.code), exc.read()
    except (OSError, ValueError, http.client.HTTPException):  # refused, reset, cut short, timed out
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None
