"""Connection reuse to a backend that closes after streams, as llama-server does: lost requests
and backend connections per request.

llama-server promises keep-alive and closes the connection right after each streamed answer;
a proxy that reuses connections sends some requests into a closing socket (traefik.yml,
docs/production.md "Connections to llama-server"). Two clients send streamed and plain chat
requests in turn, each on a new client connection, with two busy loops beside them (a host
running llama-server is always this busy), against tests/fake_llama.py ``--close-after-stream``
through three paths:

- traefik: the shipped traefik.yml (connection reuse on), routheon-server.yml and a key file as
  ``routheon mapping add`` writes it: the key file's guard marks each request replayable and
  sends it again when a reused connection failed before any answer;
- traefik-models: the same Traefik, a key granted the backend in routheon-grants.yml (the
  plugin, then the second hop's guard);
- traefik-bare: Traefik with one plain router for the key and connection reuse, nothing of
  Routheon's: what reuse alone does with such a backend.

The paths take turns round by round, so that a noisy moment hurts all of them alike. The
backend counts the connections it accepted (``GET /connections``); a stream costs one, since
the backend closes it, so the floor is the share of streams.

``python -m bench`` runs it as its ``reuse`` part; alone: ``python -m bench.reuse [--requests N]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from routheon.loopback import free_port, install_server_mapping, shipped_static_config
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.grants import GRANTS_FILE, GrantedService, Grants, render_grants

from . import stack
from .profile import PROFILES, Profile
from .tokenpath import bare_static_config, bearer, chat_body, chat_ok, launch_traefik, write_bare_mappings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
FAKE_LLAMA = REPO / "tests" / "fake_llama.py"
FILE_KEY = "sk-bench-reuse-file-0123456789"
GRANTED_KEY = "sk-bench-reuse-granted-0123456789"
MODEL = "closing-model"
CLIENTS = 2
ROUNDS = 5
# chunks per stream: what a short answer sends; none waits for the next
CHUNKS = 3


@dataclass
class Mixed:
    """What ``mixed_requests`` saw: requests sent, how many streamed, a line per failed one."""

    requests: int = 0
    streams: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def add(self, other: Mixed) -> None:
        self.requests += other.requests
        self.streams += other.streams
        self.seconds += other.seconds
        self.failures += other.failures


def one_request(base: str, headers: dict[str, str], stream: bool, model: str = MODEL) -> str | None:
    """One chat request on a new client connection; what went wrong, or None."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=chat_body(model, stream),
                     headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{'stream' if stream else 'plain'}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if response.status != 200:
        return f"{'stream' if stream else 'plain'}: HTTP {response.status}: {data[:200]!r}"
    if stream and not data.rstrip().endswith(b"data: [DONE]"):
        return f"stream: no [DONE] at its end: {data[-200:]!r}"
    if not stream:
        try:
            json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return f"plain: not a chat completion: {data[:200]!r}"
    return None


def mixed_requests(base: str, headers: dict[str, str], count: int, clients: int = CLIENTS, model: str = MODEL) -> Mixed:
    """``count`` chat requests for ``model`` from ``clients`` threads, streamed and plain in
    turn (while one client streams, the other does not), each thread ``count // clients`` of them."""
    results = [Mixed() for _ in range(clients)]

    def client(number: int) -> None:
        mine = results[number]
        for index in range(count // clients):
            stream = (index + number) % 2 == 0
            mine.requests += 1
            mine.streams += stream
            failure = one_request(base, headers, stream, model)
            if failure:
                mine.failures.append(failure)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Mixed(seconds=time.perf_counter() - began)
    for result in results:
        total.add(result)
    return total


def backend_counts(url: str) -> dict:
    """What a tests/fake_llama.py backend served so far: ``connections`` accepted, ``requests``
    served, and ``paths`` (requests per path)."""
    with urllib.request.urlopen(f"{url}/connections", timeout=10) as answer:
        return json.load(answer)


def start_closing_backend(stk: stack.Stack) -> str:
    """tests/fake_llama.py closing its connection after each stream, as llama-server does; its URL."""
    port = free_port()
    stk.start("closing-backend", [sys.executable, str(FAKE_LLAMA), "--port", str(port), "--name", MODEL,
                                  "--chunks", str(CHUNKS), "--chunk-interval", "0", "--close-after-stream"],
              ready_url=f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}"


def routheon_folder(folder: Path, backend: str, server: str, hop_port: int) -> Path:
    """routheon-server.yml, a key file for FILE_KEY, and GRANTED_KEY granted the same backend."""
    folder.mkdir(parents=True)
    install_server_mapping(folder, urlsplit(server).port or 0)
    specs = (MappingSpec("closing-file", (backend,), (FILE_KEY,)), MappingSpec("closing-granted", (backend,), ()))
    for spec in specs:
        (folder / spec.file_name).write_text(render_mapping(spec))
    grants = Grants(services=(GrantedService("closing-granted", (MODEL,)),), hop_port=hop_port)
    (folder / GRANTS_FILE).write_text(render_grants(grants.grant(GRANTED_KEY, ("closing-granted",))))
    return folder


def run(requests: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    with stack.Stack(workdir) as stk:
        backend = start_closing_backend(stk)
        server = stack.start_server(stk, "routheon", workdir / "reuse-mappings")
        hop_port = free_port()
        folder = routheon_folder(workdir / "reuse-mappings", backend, server, hop_port)
        routheon, routheon_url, _ = launch_traefik(
            stk, "traefik-reuse", shipped_static_config(), folder,
            lambda base: chat_ok(base, FILE_KEY, MODEL) and chat_ok(base, GRANTED_KEY, MODEL), hop_port)
        bare_folder = write_bare_mappings(workdir / "reuse-bare-mappings", {FILE_KEY: backend})
        bare, bare_url, _ = launch_traefik(stk, "traefik-bare-reuse", bare_static_config(), bare_folder,
                                           lambda base: chat_ok(base, FILE_KEY, MODEL))
        paths = {"traefik": (routheon_url, bearer(FILE_KEY)), "traefik-models": (routheon_url, bearer(GRANTED_KEY)),
                 "traefik-bare": (bare_url, bearer(FILE_KEY))}
        seen = {name: Mixed() for name in paths}
        connections = dict.fromkeys(paths, 0)
        served = dict.fromkeys(paths, 0)
        burners = [stk.start(f"busy-loop-{n}", [sys.executable, "-c", "while True: pass"]) for n in (1, 2)]
        try:
            for turn in range(ROUNDS):
                names = list(paths)[turn % len(paths):] + list(paths)[:turn % len(paths)]
                for name in names:
                    base, headers = paths[name]
                    before = backend_counts(backend)
                    seen[name].add(mixed_requests(base, headers, requests // ROUNDS))
                    after = backend_counts(backend)
                    connections[name] += after["connections"] - before["connections"]
                    served[name] += after["requests"] - before["requests"]
        finally:
            for burner in burners:
                burner.stop()
        rows = []
        for name, mixed in seen.items():
            rows.append({"path": name, "requests": mixed.requests, "streams": mixed.streams,
                         "failed": len(mixed.failures), "failures": mixed.failures[:3],
                         "backend_connections": connections[name], "backend_requests": served[name],
                         "connections_per_request": round(connections[name] / mixed.requests, 3),
                         "rps": round(mixed.requests / mixed.seconds, 1)})
            log.warning("reuse %-15s %d of %d failed, %d backend connections (%.2f per request), %.0f req/s",
                        name, rows[-1]["failed"], mixed.requests, connections[name],
                        rows[-1]["connections_per_request"], rows[-1]["rps"])
        return {"clients": CLIENTS, "busy_loops": len(burners), "rows": rows}


def run_profile(profile: Profile, workdir: Path) -> dict:
    return run(profile.reuse_requests, workdir / "reuse")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=PROFILES["full"].reuse_requests, help="requests per path")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="bench: %(message)s")
    with tempfile.TemporaryDirectory(prefix="routheon-bench-reuse-") as tmp:
        result = run(args.requests, Path(tmp))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
