"""One key, many models: what the model-routed path costs, and what 10,000 keys cost it.

Paths to the same instant backend (bench/instant_backend.cpp), the same POST chat body:
- plain: Traefik with one bare header router for the key, no middleware (Traefik's own cost);
- per-key: traefik.yml, routheon-server.yml and a key file as ``routheon mapping add`` writes it;
- plugin-only: per-key's folder, but the key's router runs Routheon's plugin and goes straight
  to the service (no second hop): what the plugin itself costs (hash, body, header);
- model-routed: the same plus routheon-grants.yml (1 key granted two services): Routheon's
  plugin reads the body's model, the second hop routes by the header it sets;
- model-routed-usage: model-routed with usage accounting on (docs/usage.md): the plugin meters
  every answer and writes a record per request; afterwards the records are counted against the
  requests wrk completed on that path (none may be missing);
- model-routed-10k: 10,000 keys over 20 services in the grants file, one of them measured.

Latency is wrk with one connection (p50/p99), requests/s wrk with several; the paths take
turns round by round so that a noisy moment hurts all of them alike. Then, with 10,000 keys:
Traefik ready after start, one grant and one revocation applied while it runs, RSS, and what
the Python side pays to write and read such a grants file.

``python -m bench`` runs it as its ``modelroute`` part (``run_profile``: the profile sets the
lengths) and docs/benchmarks.md shows it; alone, for a look at this part only:

    .venv/bin/python -m bench.modelroute [--seconds 4] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import signal
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import yaml

from routheon.loopback import free_port, install_server_mapping, shipped_static_config
from routheon.mappings.check import inspect_folder
from routheon.mappings.format import ENTRY_POINT, MappingSpec, render_mapping
from routheon.mappings.grants import (
    GRANTS_FILE,
    PLUGIN_NAME,
    GrantedService,
    Grants,
    key_hash,
    parse_grants,
    render_grants,
)
from routheon.supervisor import Child, eventually

from . import report as bench_report
from . import stack, wrk
from .profile import Profile
from .tokenpath import bare_static_config, bearer, launch_traefik, write_bare_mappings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-bench-model-route-0123456789"
SERVICES = 20
KEYS = 10_000
# wrk connections for requests/s
CONNECTIONS = 8
BODY = json.dumps({"model": "model-01", "messages": [{"role": "user", "content": "Name three colours."}],
                   "max_tokens": 8})
POST = {"Content-Type": "application/json"}
WARM_REQUESTS = 10
KEY_HASH = key_hash(KEY)


def bench_key(index: int) -> str:
    return f"sk-bench-{index:06d}-0123456789abcdef"


def grants(keys: int, hop_port: int) -> Grants:
    """``keys`` keys over SERVICES services (model-NN each), KEY granted services 00 and 01."""
    services = tuple(GrantedService(f"svc-{n:02d}", (f"model-{n:02d}",)) for n in range(SERVICES))
    result = Grants(services=services, hop_port=hop_port).grant(KEY, ("svc-00", "svc-01"))
    for n in range(SERVICES):
        result = result.grant_all((bench_key(i) for i in range(n, keys - 1, SERVICES)), (f"svc-{n:02d}",))
    return result


def write_folder(folder: Path, backend: str, server: str, grant: Grants | None, key_file: bool) -> None:
    """routheon-server.yml, one file per service (each with an unused key) and the grants."""
    folder.mkdir(parents=True)
    install_server_mapping(folder, urlsplit(server).port or 0)
    for n in range(SERVICES if grant else 1):
        keys = (KEY,) if key_file else (f"sk-unused-{n:02d}-0123456789",)
        (folder / f"svc-{n:02d}.yml").write_text(render_mapping(MappingSpec(f"svc-{n:02d}", (backend,), keys)))
    if grant is not None:
        (folder / GRANTS_FILE).write_text(render_grants(grant))


def plugin_only_folder(folder: Path, backend: str, server: str) -> Path:
    """The per-key folder plus a router for KEY through the plugin, straight to the service."""
    write_folder(folder, backend, server, None, key_file=False)
    config = {"services": "svc-00 model-01\n", "keys": f"{KEY_HASH} hint svc-00\n"}
    dynamic = {"http": {
        "routers": {"plugin-only": {"rule": f"Header(`Authorization`, `Bearer {KEY}`)", "service": "svc-00",
                                    "entryPoints": [ENTRY_POINT], "middlewares": ["plugin-only"]}},
        "middlewares": {"plugin-only": {"plugin": {PLUGIN_NAME: config}}}}}
    (folder / "plugin-only.yml").write_text(yaml.safe_dump(dynamic))
    return folder


def replace_file(path: Path, text: str) -> None:
    """As Routheon writes: a temporary name Traefik does not read, then one rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def status(base: str, key: str) -> int:
    request = urllib.request.Request(f"{base}/v1/chat/completions", BODY.encode(), {**POST, **bearer(key)})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def seconds_until(condition: Callable[[], bool], timeout: float = 60.0) -> float:
    began = time.perf_counter()
    if not eventually(condition, timeout, interval=0.01):
        raise TimeoutError(f"not within {timeout} s")
    return time.perf_counter() - began


class Traefiks:
    """Traefik processes on free ports, each in its own folder beside a copy of the plugin."""

    def __init__(self, stk: stack.Stack) -> None:
        self.stk = stk

    def start(self, name: str, folder: Path, bare: bool = False) -> tuple[Child, str, float]:
        """Start one; its base URL and the seconds until KEY got a 200 through it (polled
        every 10 ms: the ready time is one of the figures)."""
        static, hop_port = (bare_static_config(), None) if bare else (shipped_static_config(), self.hop_port(folder))
        return launch_traefik(self.stk, name, static, folder, lambda base: status(base, KEY) == 200, hop_port,
                              timeout=60, poll_s=0.01)

    @staticmethod
    def hop_port(folder: Path) -> int:
        grants_file = folder / GRANTS_FILE
        return parse_grants(grants_file.read_text()).hop_port if grants_file.exists() else free_port()


def rss_mib(proc: Child) -> float:
    return round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)


def measure_paths(paths: dict[str, str], seconds: int, rounds: int, connections: int) -> list[dict]:
    """Per path: median over rounds of wrk's p50/p99 (1 connection) and requests/s; with the
    requests sent in all (wrk's completed ones and the warm-up)."""
    runs: dict[str, list[tuple[wrk.WrkResult, wrk.WrkResult]]] = {name: [] for name in paths}
    requests = {name: wrk.Request(f"{base}/v1/chat/completions", "POST", {**POST, **bearer(KEY)}, BODY)
                for name, base in paths.items()}
    for request in requests.values():
        wrk.warm(request, WARM_REQUESTS)
    for index in range(rounds):
        names = list(paths)
        for name in names[index % len(names):] + names[:index % len(names)]:
            single = wrk.run(requests[name], 1, seconds)
            many = wrk.run(requests[name], connections, seconds)
            runs[name].append((single, many))
            log.warning("round %d %-18s p50 %.3f ms  p99 %.3f ms  %.0f req/s", index + 1, name,
                        single.p50_ms or 0, single.p99_ms or 0, many.rps)
    rows = []
    for name, results in runs.items():
        rows.append({
            "path": name,
            "p50_ms": round(statistics.median(r[0].p50_ms or 0 for r in results), 3),
            "p99_ms": round(statistics.median(r[0].p99_ms or 0 for r in results), 3),
            "rps": round(statistics.median(r[1].rps for r in results)),
            "connections": connections,
            "failed": sum(r[0].failed + r[1].failed for r in results),
            "requests": WARM_REQUESTS + sum(r[0].requests + r[1].requests for r in results),
        })
    return rows


def usage_records(folder: Path) -> int:
    """Records of KEY in the usage folder; every line whole."""
    lines = [line for path in folder.glob("*.jsonl") for line in path.read_text().splitlines()]
    return sum(json.loads(line)["key"] == KEY_HASH for line in lines)


def changes_applied(base: str, grants_file: Path, grant: Grants, times: int) -> dict[str, list[float]]:
    """Seconds from writing the grants file to the first request that sees a grant, a revocation."""
    applied: dict[str, list[float]] = {"grant": [], "revoke": []}
    for attempt in range(times):
        new_key = f"sk-bench-new-{attempt}-0123456789abcdef"
        for kind, text, expected in (
            ("grant", render_grants(grant.grant(new_key, ("svc-01",))), 200),
            ("revoke", render_grants(grant), 401),
        ):
            time.sleep(1.0)  # past traefik.yml's providersThrottleDuration (500ms) since the last change
            began = time.perf_counter()
            replace_file(grants_file, text)
            seconds_until(lambda: status(base, new_key) == expected)  # noqa: B023 - used at once
            applied[kind].append(round(time.perf_counter() - began, 3))
    return applied


def python_side(folder: Path) -> dict[str, float]:
    """What Routheon's own readers pay for the 10,000-key grants file."""
    text = (folder / GRANTS_FILE).read_text()
    began = time.perf_counter()
    parsed = parse_grants(text)
    parse_s = time.perf_counter() - began
    began = time.perf_counter()
    render_grants(parsed)
    render_s = time.perf_counter() - began
    began = time.perf_counter()
    inspect_folder(folder)
    inspect_s = time.perf_counter() - began
    return {"grants_bytes": len(text.encode()), "parse_grants_s": round(parse_s, 3),
            "render_grants_s": round(render_s, 3), "inspect_folder_s": round(inspect_s, 3)}


def run(workdir: Path, seconds: int, rounds: int, connections: int, attempts: int = 3) -> dict:
    """Every path measured, then (``attempts`` times each) a grant, a revocation and a start."""
    with stack.Stack(workdir) as stk:
        backend = stack.start_instant_backend(stk)
        server = stack.start_server(stk, "routheon", workdir / "server-mappings")
        traefiks = Traefiks(stk)
        folders = {
            "plain": write_bare_mappings(workdir / "plain", {KEY: backend}),
            "per-key": workdir / "per-key",
            "plugin-only": plugin_only_folder(workdir / "plugin-only", backend, server),
            "model-routed": workdir / "model-routed",
            "model-routed-usage": workdir / "model-routed-usage",
            "model-routed-10k": workdir / "model-routed-10k",
        }
        usage = workdir / "usage"
        write_folder(folders["per-key"], backend, server, None, key_file=True)
        write_folder(folders["model-routed"], backend, server, grants(1, free_port()), key_file=False)
        write_folder(folders["model-routed-usage"], backend, server,
                     dataclasses.replace(grants(1, free_port()), usage_dir=str(usage)), key_file=False)
        many = grants(KEYS, free_port())
        write_folder(folders["model-routed-10k"], backend, server, many, key_file=False)

        started = {name: traefiks.start(name, folder, bare=name == "plain") for name, folder in folders.items()}
        paths = {name: base for name, (_, base, _) in started.items()}
        rows = measure_paths(paths, seconds, rounds, connections)
        for row in rows:
            row["rss_mib"] = rss_mib(started[row["path"]][0])
        metered = next(row for row in rows if row["path"] == "model-routed-usage")
        time.sleep(1.0)  # records reach their file within 50 ms of their request
        recorded = usage_records(usage)
        applied = changes_applied(paths["model-routed-10k"], folders["model-routed-10k"] / GRANTS_FILE, many, attempts)
        for proc, _, _ in started.values():
            proc.stop(signal.SIGKILL)
        ready = {name: [] for name in ("model-routed", "model-routed-10k")}
        for attempt in range(attempts):
            for name in ready:
                proc, _, took = traefiks.start(f"{name}-ready-{attempt}", folders[name])
                ready[name].append(round(took, 3))
                proc.stop(signal.SIGKILL)
        return {
            "paths": rows,
            "ready_s": ready,
            "applied_s": applied,
            "python": python_side(folders["model-routed-10k"]),
            # the readiness checks are recorded too: at least as many records as requests
            "usage": {"records": recorded, "requests": metered["requests"]},
            "keys": KEYS,
            "services": SERVICES,
            "settings": {"seconds": seconds, "rounds": rounds, "connections": connections, "attempts": attempts},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "cpu": platform.processor() or platform.machine()},
        }


def run_profile(profile: Profile, workdir: Path) -> dict:
    """The ``modelroute`` part of ``python -m bench``: run's lengths from the profile."""
    folder = workdir / "modelroute"
    folder.mkdir()
    return run(folder, profile.model_route_s, profile.model_route_rounds, CONNECTIONS, profile.model_route_attempts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every path, interleaved")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="wrk connections for requests/s")
    parser.add_argument("--attempts", type=int, default=3, help="grants, revocations and starts timed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "modelroute.json")
    parser.add_argument("--workdir", type=Path, default=None, help="kept for the logs (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-modelroute-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(workdir, args.seconds, args.rounds, args.connections, args.attempts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(bench_report.text_tables({"modelroute": results, "goals": bench_report.model_route_goals(results)}))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
