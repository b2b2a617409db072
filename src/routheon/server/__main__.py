"""``routheon-server``: parse flags, set up logging, serve until SIGTERM or SIGINT.

Exit status: 0 after a signal, 2 for a bad flag or stats config, 1 when the address cannot
be listened on. Start-up errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from routheon.server.app import create_app
from routheon.server.config import EXIT_USAGE, PROG, ServerConfig, parse_args
from routheon.server.metrics import Metrics
from routheon.server.protocol import handler_factory
from routheon.server.stats import StatsConfig, StatsConfigError, load_stats_config

log = logging.getLogger("routheon.server")

SHUTDOWN_GRACE = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


@contextlib.asynccontextmanager
async def listening(
    config: ServerConfig,
    stats_config: StatsConfig | None,
    sock: socket.socket,
    metrics_sock: socket.socket | None = None,
) -> AsyncIterator[None]:
    """Serve the app on the bound ``sock`` (and /metrics on ``metrics_sock``) for the duration of
    the block, then close their connections.

    The tests run this very code in their own process, on a thread of its own.
    """
    app = create_app(config, stats_config)
    metrics = Metrics(config.usage) if metrics_sock is not None else None
    if metrics is not None:
        metrics.measure(app)
    runners = [web.AppRunner(app, shutdown_timeout=SHUTDOWN_GRACE)]
    listeners: list[asyncio.Server] = []
    try:
        await runners[0].setup()  # first: /metrics looks at what its startup creates
        if metrics is not None:
            runners.append(web.AppRunner(metrics.app(app), shutdown_timeout=SHUTDOWN_GRACE))
            await runners[1].setup()
        for runner, bound in zip(runners, (sock, metrics_sock)):
            assert runner.server is not None  # set by setup()
            # not web.SockSite: it would serve with aiohttp's own handler (see protocol.py)
            factory = handler_factory(runner.server, config.idle_timeout)
            listeners.append(await asyncio.get_running_loop().create_server(factory, sock=bound))
        yield
    finally:
        for listener in listeners:
            listener.close()  # stop accepting; the runners' cleanup then ends the connections
        for runner in reversed(runners):
            await runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def serve(config: ServerConfig, stats_config: StatsConfig | None) -> int:
    # bind before anything starts, so a taken port is the only thing said
    try:
        sock = _bind(config.host, config.port)
    except OSError as exc:
        return _fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", 1)
    metrics_sock = None
    if config.metrics_port:
        try:
            metrics_sock = _bind(config.host, config.metrics_port)
        except OSError as exc:
            # /metrics is for monitoring; the error pages Traefik needs matter more than it
            log.error(
                "cannot listen on %s:%d for /metrics: %s; serving without /metrics"
                " (--metrics-port PORT picks another port, 0 turns it off)",
                config.host, config.metrics_port, exc.strerror or exc,
            )
    async with listening(config, stats_config, sock, metrics_sock):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("listening on http://%s:%d, mappings from %s", config.host, config.port, config.mappings)
        if metrics_sock is not None:
            log.info(
                "metrics on http://%s:%d/metrics, usage records from %s", config.host, config.metrics_port, config.usage
            )
        await stop.wait()
        log.info("shutting down")
    return 0


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    try:
        stats_config = load_stats_config(config.stats_config_file) if config.stats_config_file else None
    except StatsConfigError as exc:
        sys.exit(_fail(str(exc), EXIT_USAGE))
    try:
        sys.exit(asyncio.run(serve(config, stats_config)))
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were installed
        sys.exit(0)


if __name__ == "__main__":
    main()
