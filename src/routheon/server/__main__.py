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
from routheon.server.protocol import handler_factory
from routheon.server.stats import StatsConfig, StatsConfigError, load_stats_config

log = logging.getLogger("routheon.server")

SHUTDOWN_GRACE = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


@contextlib.asynccontextmanager
async def listening(config: ServerConfig, stats_config: StatsConfig | None, sock: socket.socket) -> AsyncIterator[None]:
    """Serve the app on the bound ``sock`` for the duration of the block, then close its connections.

    The tests run this very code in their own process, on a thread of its own.
    """
    runner = web.AppRunner(create_app(config, stats_config), shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    listener: asyncio.Server | None = None
    try:
        assert runner.server is not None  # set by setup()
        # not web.SockSite: it would serve with aiohttp's own handler (see protocol.py)
        factory = handler_factory(runner.server, config.idle_timeout)
        listener = await asyncio.get_running_loop().create_server(factory, sock=sock)
        yield
    finally:
        if listener is not None:
            listener.close()  # stop accepting; the runner's cleanup then ends the connections
        await runner.cleanup()


async def serve(config: ServerConfig, stats_config: StatsConfig | None) -> int:
    # bind before anything starts, so a taken port is the only thing said
    try:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.create_server((config.host, config.port), family=family)
    except OSError as exc:
        return _fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", 1)
    async with listening(config, stats_config, sock):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("listening on http://%s:%d, mappings from %s", config.host, config.port, config.mappings)
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
