"""Command line → ``ServerConfig``.

The flags, their names and defaults are those of routheon-server 1.0.6/1.0.7, so an existing
systemd unit keeps working. Parsing is kept apart from running (as uvicorn does) so tests and
other entry points can build a ``ServerConfig`` without a command line. Every value is checked
here: a bad one stops start-up with one line on stderr instead of a traceback later.
"""

from __future__ import annotations

import argparse
import os
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from routheon import __version__
from routheon.mappings.folder import DEFAULT_MAPPINGS, MAPPINGS_ENV

PROG = "routheon-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9080
DEFAULT_SKIP = "routheon-server.yml"
DEFAULT_MAPPING_TIMEOUT = 2.0
# How long a connection may go without a complete request before it is closed. Without a
# limit (aiohttp's default is an hour) idle connections pile up until the server runs out of
# file descriptors and accepts no more, Traefik's included. 15 s still lets a client that
# asks every few seconds keep its connection; Traefik keeps idle ones up to 90 s but opens a
# new one (well under a millisecond on loopback) when this server has closed one. The same
# limit cuts off a client that sends its request headers a byte at a time.
DEFAULT_IDLE_TIMEOUT = 15.0
DEFAULT_LOG_LEVEL = "WARNING"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Fatal start-up problems exit with this, like argparse's own usage errors.
EXIT_USAGE = 2


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run, already validated."""

    mappings: Path = Path(DEFAULT_MAPPINGS)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    skip_mapping: tuple[re.Pattern[str], ...] = field(default=(re.compile(DEFAULT_SKIP),))
    mapping_timeout: float = DEFAULT_MAPPING_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    stats_config_file: Path | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    # the traefik binary that judges the folder for /health: None finds one, "none" turns it off
    traefik: str | None = None


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, as the issue asks for start-up errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, not {port}")
    return port


def _timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return seconds


def _folder(text: str) -> Path:
    """A folder name; empty is an unset variable (of the flag or $ROUTHEON_MAPPINGS), never the current folder."""
    if not text:
        raise argparse.ArgumentTypeError(
            f"empty (an unset variable? ${MAPPINGS_ENV} set to nothing counts too): give the mappings folder"
        )
    return Path(text)


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression {text!r}: {exc}") from None


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; use one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Companion of a Routheon Traefik setup: answers /v1/models with the models of every "
            "reachable llama-server named in the Traefik mapping files, /stats with host metrics, "
            "/health, and the error pages Traefik shows for bad keys and dead backends."
        ),
    )
    parser.add_argument(
        "--mappings",
        type=_folder,
        default=os.environ.get(MAPPINGS_ENV, DEFAULT_MAPPINGS),  # a string: argparse checks it with _folder
        help="folder of Traefik mapping files (*.yml, *.yaml) whose services are the backends; "
        "changes are picked up without a restart, a folder that does not exist yet is waited for "
        f"(default: ${MAPPINGS_ENV} if set, as for the routheon command, else {DEFAULT_MAPPINGS})",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on; keep 127.0.0.1 so that only Traefik on this host reaches it (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="port to listen on; must match the URL in the routheon-server.yml mapping (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-mapping",
        type=_regex,
        action="append",
        metavar="REGEX",
        help="leave out mapping files whose name matches this regular expression (searched "
        f"anywhere in the name); may be repeated; {DEFAULT_SKIP} (this server's own mapping) "
        "is always skipped",
    )
    parser.add_argument(
        "--mapping-timeout",
        type=_timeout,
        default=DEFAULT_MAPPING_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for one backend's /v1/models (fractions allowed); a backend "
        "slower than this is left out of the answer (default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_timeout,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has sent no complete request for this long: idle since it "
        "was opened or since its last answer, or sending its request too slowly (not in 1.0.6/1.0.7; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--stats-config-file",
        type=Path,
        metavar="FILE",
        help="YAML file choosing which /stats sections (enabled_sections) and fields "
        "(enabled_fields) are shown; start-up fails if it is missing or invalid "
        "(default: show everything)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=DEFAULT_LOG_LEVEL,
        help=f"logging threshold, one of {', '.join(LOG_LEVELS)}; INFO adds one access-log line per "
        "request (default: %(default)s)",
    )
    parser.add_argument(
        "--traefik",
        metavar="PATH",
        help="the traefik binary that /health asks whether it applies the mappings folder, whenever"
        " the folder's files change (default: $ROUTHEON_TRAEFIK, else traefik on PATH or beside this"
        " Python; 'none': no verdict)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse a command line; on a bad value print one line to stderr and exit 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return ServerConfig(
        mappings=args.mappings,
        host=args.host,
        port=args.port,
        skip_mapping=(re.compile(DEFAULT_SKIP), *(args.skip_mapping or ())),
        mapping_timeout=args.mapping_timeout,
        idle_timeout=args.idle_timeout,
        stats_config_file=args.stats_config_file,
        log_level=args.log_level,
        traefik=args.traefik,
    )
