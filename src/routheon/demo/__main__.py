"""``python -m routheon.demo``: build or find everything, start the stack, wait for Ctrl-C.

With ``--prepare`` it only makes sure that llama-server and the models are in the cache and
that llama-server passes its check (what ``make test`` runs first, so that the end-to-end
tests find them).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from routheon.demo import cache_root
from routheon.demo.download import DownloadError
from routheon.demo.llama import BuildError, CheckError, proven_llama_server
from routheon.demo.models import CHECK_MODEL, DEMO_MODELS, ModelError, ensure_model
from routheon.demo.stack import Backend, Stack, StackConfig, check_entry_port
from routheon.loopback import free_port
from routheon.supervisor import StartError, Supervisor

log = logging.getLogger("routheon.demo")

KEYS = ("API_KEY-1", "API_KEY-2")
# the model names of the original project's README, answered by the demo's two models
OTHER_NAMES = (("TinyLlama_Chat",), ("mistral-tiny",))
SHARED_KEY = "API_KEY-ALL"
LLAMA_PORTS = (8011, 8012)

TRY_THIS = """\
Routheon demo is up: Traefik on {url}, routheon-server on {server}.

Chat through API_KEY-1 ({alias1}):

curl {url}/v1/chat/completions \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer API_KEY-1" \\
-d '{{
   "model": "{alias1}",
   "messages": [
      {{"role": "system", "content": "You are a concise assistant."}},
      {{"role": "user", "content": "Write a one-line Python function that prints hello."}}
   ]
 }}'

A streamed answer:

curl -N {url}/v1/chat/completions \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer API_KEY-1" \\
-d '{{"model": "{alias1}", "stream": true, "messages": [{{"role": "user", "content": "Write a haiku about the sea."}}]}}'

API_KEY-2 reaches {alias2} instead (a pretrained base model: it continues text
rather than following instructions).

One key, many models: API_KEY-ALL may use both, and the request's "model" picks
the llama-server ({alias1} or TinyLlama_Chat, {alias2} or mistral-tiny):

curl {url}/v1/chat/completions \
-H "Content-Type: application/json" \
-H "Authorization: Bearer API_KEY-ALL" \
-d '{{"model": "{alias2}", "messages": [{{"role": "user", "content": "The sea is"}}]}}'

All models (no key), the models of one key, host stats:

curl {url}/v1/models
curl {url}/v1/models -H "Authorization: Bearer API_KEY-ALL"
curl {url}/stats

Type `stop llama-server-2` and then `curl {url}/v1/models` lists one model;
`start llama-server-2` brings it back. Ctrl-C stops everything. Logs: {logs}
"""


class _Stop(Exception):
    """The first SIGINT, SIGTERM or SIGHUP: leave what the demo is doing and tear the stack down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """The demo's own signal handling, the same whatever the shell or make did to the defaults.

    - Started from a script with ``&``, the demo inherits SIGINT as ignored and Python installs
      no KeyboardInterrupt handler: ``kill -INT`` must stop it all the same.
    - The first signal raises ``_Stop``; the stack then stops its children gracefully.
    - A signal during that teardown (make passes a SIGTERM on, so it arrives twice; a second
      Ctrl-C) never interrupts it with a traceback: it kills every child at once instead, so
      that none outlives make by the seconds a graceful stop may take.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self.stopping = False

    def install(self) -> None:
        for signum in self.HANDLED:
            signal.signal(signum, self._handle)

    def begin_teardown(self) -> None:
        self.stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise _Stop(signum)
        if self.supervisor is not None:
            self.supervisor.kill_all()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m routheon.demo", description="Run the Routheon demo stack on 127.0.0.1 until Ctrl-C."
    )
    parser.add_argument("--prepare", action="store_true", help="only build/download and check llama-server and the models")
    parser.add_argument("--port", type=int, default=8080, help="Traefik's port on 127.0.0.1 (default: 8080)")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="mappings, configs, logs (default: .demo)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs for llama-server (default: 2)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every process start and stop")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def prepare(jobs: int | None) -> tuple[Path, list[Path]]:
    log.info("Getting llama-server and the demo models (cached under %s)", cache_root())
    models = [ensure_model(spec) for spec in DEMO_MODELS]  # first: the check of llama-server needs one
    binary = proven_llama_server(CHECK_MODEL.cached_path(), jobs)
    assert binary is not None, "proven_llama_server builds what is missing"
    return binary, models


def _commands(stack: Stack) -> None:
    """Read `stop NAME` / `start NAME` lines until end of input, then wait for a signal."""
    for line in sys.stdin:
        words = line.split()
        if len(words) != 2 or words[0] not in ("stop", "start"):
            if words:
                print("commands: stop llama-server-N, start llama-server-N; Ctrl-C quits", flush=True)
            continue
        action, service = words
        try:
            if action == "stop":
                stack.stop_backend(service)
            else:
                stack.start_backend(service)
        except KeyError:
            print(f"no such service {service}; try llama-server-1 or llama-server-2", flush=True)
            continue
        except StartError as exc:
            print(exc, flush=True)
            continue
        print(f"{service} {'stopped' if action == 'stop' else 'started'}", flush=True)
    signal.pause()


def run(args: argparse.Namespace, signals: _Signals) -> int:
    if not args.prepare:
        check_entry_port(args.port)
    binary, models = prepare(args.jobs)
    if args.prepare:
        return 0
    backends = tuple(
        Backend(f"llama-server-{n}", key, path, spec.alias, free_port(port), spec.server_args, other_names)
        for n, (key, path, spec, port, other_names) in enumerate(
            zip(KEYS, models, DEMO_MODELS, LLAMA_PORTS, OTHER_NAMES, strict=True), start=1
        )
    )
    config = StackConfig(
        workdir=args.workdir,
        llama_server=binary,
        backends=backends,
        entry_port=args.port,
        server_port=free_port(9080),
        hop_port=free_port(8081),
        shared_key=SHARED_KEY,
    )
    with Supervisor(args.workdir / "logs") as supervisor:
        signals.supervisor = supervisor
        stack = Stack(config, supervisor)
        try:
            stack.start()
            print(
                TRY_THIS.format(
                    url=config.entry_url,
                    server=f"http://127.0.0.1:{config.server_port}",
                    alias1=backends[0].alias,
                    alias2=backends[1].alias,
                    logs=supervisor.log_dir,
                ),
                flush=True,
            )
            _commands(stack)
        except _Stop:
            print("\nStopping the demo ...", file=sys.stderr)
        finally:
            signals.begin_teardown()
    print("Demo stopped; every process it started has exited.", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    signals = _Signals()
    signals.install()
    try:
        return run(args, signals)
    except (BuildError, CheckError, DownloadError, ModelError, StartError) as exc:
        print(f"routheon demo: error: {exc}", file=sys.stderr)
        return 1
    except _Stop as stop:  # before the stack started: while building or downloading
        print("\nInterrupted.", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
