"""OpenAI-style error bodies, and the catalogue Traefik's error pages are drawn from.

Clients of an OpenAI-compatible endpoint (the ``openai`` SDK included) only know how to show
an error that looks like ``{"error": {"message", "type", "code"}}``. Every error this server
answers, its own or one Traefik asks it to render, goes through here so they all look alike.
Messages never repeat request headers: an API key must not end up in a body or a log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


@dataclass(frozen=True)
class ApiError:
    """One error as a client sees it: HTTP status plus the OpenAI error triple."""

    status: int
    message: str
    type: str
    code: str

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=headers,
        )


INVALID_API_KEY = ApiError(401, "Invalid API key.", INVALID_REQUEST, "invalid_api_key")
MISSING_API_KEY = ApiError(401, "Missing API key: send Authorization: Bearer KEY", INVALID_REQUEST, "missing_api_key")

# What Traefik's errors middleware asks for when a backend behind a valid key fails.
_BACKEND_ERRORS = {
    502: ApiError(
        502,
        "The model server behind this API key is not reachable; it may be stopped or still starting.",
        SERVER_ERROR,
        "backend_unreachable",
    ),
    503: ApiError(
        503,
        "The model server behind this API key is unavailable right now; try again shortly.",
        SERVER_ERROR,
        "backend_unavailable",
    ),
    504: ApiError(
        504,
        "The model server behind this API key did not answer in time.",
        SERVER_ERROR,
        "backend_timeout",
    ),
}


def _snake(phrase: str) -> str:
    return phrase.lower().replace("-", "_").replace(" ", "_").replace("'", "")


def for_status(status: int, has_authorization: bool = False) -> ApiError:
    """The error for an HTTP status, as the ``/errors/{status}`` page renders it.

    401 depends on whether the client sent a key at all: "missing" and "wrong" call for
    different fixes on the client side. Statuses without a dedicated entry fall back to
    the HTTP reason phrase, typed as a client or a server error by their class.
    """
    if status == 401:
        return INVALID_API_KEY if has_authorization else MISSING_API_KEY
    if status in _BACKEND_ERRORS:
        return _BACKEND_ERRORS[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Client error" if status < 500 else "Server error"
    kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
    return ApiError(status, f"{phrase}.", kind, _snake(phrase))


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown path: {path}", INVALID_REQUEST, "not_found")


def method_not_allowed(method: str, path: str, allowed: set[str]) -> ApiError:
    allowed_text = ", ".join(sorted(allowed)) or "none"
    return ApiError(
        405,
        f"Method {method} is not allowed on {path} (allowed: {allowed_text})",
        INVALID_REQUEST,
        "method_not_allowed",
    )


def model_not_found(model_id: str) -> ApiError:
    return ApiError(404, f"The model '{model_id}' does not exist", INVALID_REQUEST, "model_not_found")


def malformed_request(status: int, reason: str) -> ApiError:
    """A request aiohttp's HTTP parser rejected; ``reason`` must not quote the request."""
    return ApiError(status, f"Malformed HTTP request: {reason}.", INVALID_REQUEST, "malformed_request")


def internal_error() -> ApiError:
    return ApiError(500, "Internal server error; see the routheon-server log.", SERVER_ERROR, "internal_error")


def stats_unavailable() -> ApiError:
    return ApiError(
        503, "Host statistics are not collected yet; try again in a second.", SERVER_ERROR, "stats_unavailable"
    )
