"""How a connection is served: its idle time limit, requests aiohttp's parser rejects, the access log.

aiohttp answers a request its HTTP parser rejects (a control character or a bare LF in a
header, a line over the size limit, a bad method...) without calling the application, so the
OpenAI-error middleware in app.py never sees it. aiohttp's own answer is plain text quoting
the offending bytes, and it logs them with a traceback at ERROR. Those bytes are often the
``Authorization`` header or a ``?api_key=`` query string, that is an API key, and any client
can send some of them through Traefik (which forwards headers of up to 1 MiB, so a key over
8190 bytes gets here). So the answer and the log line here say only what kind of error it
was. aiohttp's access log has the same problem with the query string, hence ``AccessLog``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from routheon.server import errors

log = logging.getLogger(__name__)

# aiohttp's defaults, named here because the error message below states them. An API key
# is far shorter; Traefik itself allows longer headers, which then end up here as a 400.
MAX_LINE = 8190

# What a rejected request did wrong, by the kind of parser error (most specific first:
# BadHttpMethod is a BadStatusLine). Never the exception's message: it quotes the request.
_REJECTIONS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, f"the request line or a header is longer than {MAX_LINE} bytes"),
    (InvalidURLError, "the request target is not a valid URL"),
    (BadHttpMethod, "the request line has no valid method"),
    (BadStatusLine, "the request line is not valid"),
    (InvalidHeader, "a header is not valid"),
    (PayloadEncodingError, "the body does not match its Content-Length or Transfer-Encoding"),
)
_REJECTED = "a header or the request line is malformed"


def rejection_reason(exc: HttpProcessingError) -> str:
    """Why the parser rejected a request, in words that never repeat the request's bytes."""
    return next((reason for kind, reason in _REJECTIONS if isinstance(exc, kind)), _REJECTED)


class AccessLog(AbstractAccessLogger):
    """One INFO line per request: ``client "METHOD /path HTTP/1.1" status bytes seconds``.

    aiohttp's ``%r`` writes the request line as sent, and a key may be sent as
    ``?api_key=``: this writes the path without the query, percent-encoded as received (so a
    line break in it cannot forge a log line), and no header.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6fs',
            request.remote,
            request.method,
            request.rel_url.raw_path,
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering errors it handles itself as OpenAI errors."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request the parser rejected, or to an exception no middleware caught.

        ``message`` is not used: for a rejected request it quotes the request's bytes.
        """
        if isinstance(exc, HttpProcessingError):
            reason = rejection_reason(exc)
            # INFO: a client's mistake, and any client can make it as often as it likes
            log.info("rejected a request that is not valid HTTP from %s: %s", request.remote, reason)
            error = errors.malformed_request(status, reason)
        else:
            log.error("error while answering a request from %s", request.remote, exc_info=exc)
            error = errors.for_status(status)
        response = error.response()
        response.force_close()  # as aiohttp does: after such an error the connection's state is unknown
        return response


def handler_factory(server: web.Server, idle_timeout: float) -> Callable[[], RequestHandler]:
    """The protocol factory for ``loop.create_server``: one ``RequestHandler`` per connection.

    ``web.AppRunner`` would build aiohttp's own handler; ``server`` (the runner's) still
    tracks the connections, so the runner's cleanup closes them as before.

    ``idle_timeout`` is aiohttp's ``keepalive_timeout``, which closes a connection that has no
    complete request for that long: idle since it was opened, idle between requests, or still
    sending its request line and headers (aiohttp has no separate limit for reading headers).
    The first of these needs an aiohttp with aio-libs/aiohttp#13681 (3.14.5 has it): before,
    the timer only started after the first answer.
    """
    return partial(
        RequestHandler,
        server,
        loop=asyncio.get_running_loop(),
        keepalive_timeout=idle_timeout,
        access_log_class=AccessLog,
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
    )
