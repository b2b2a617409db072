"""The token path: what Traefik with Routheon's mappings adds between a client and llama-server,
and what LiteLLM's proxy adds in the same place.

Four paths to the same backends, measured the same way:
- direct: the client talks to llama-server (or the instant backend) itself;
- traefik: Traefik with the repo's static config, routheon-server.yml (401 catch-all, error
  pages) and a key mapping as ``routheon mapping add`` writes it, errors middleware included;
- traefik-bare: Traefik with one plain router per key and nothing else (same backend
  connections as traefik.yml: reused), to tell Traefik's own cost from that of Routheon's
  routers and middlewares;
- traefik-new-conn: as traefik, but with a new connection to the backend for every request
  (``maxIdleConnsPerHost: -1``, traefik.yml's setting until issue 21), requests/s against the
  instant backend only: what reusing connections gains;
- traefik-models: the same traefik.yml with Routheon's plugin and its second hop, and a grants
  file (``routheon-grants.yml``) granting one key both backends: the request's ``model`` picks
  the backend (docs/model-routing.md);
- litellm: LiteLLM's proxy with a master key and one model per backend: it routes by model
  too, so traefik-models against litellm is the like-for-like comparison.

Latency comes from a small sequential client (the same code for every path, paths interleaved
request by request so that a noisy moment hurts all of them alike); requests/s from wrk;
streams cut short from many short streams per path, in turns, with two busy loops beside them.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from routheon.loopback import (
    LoopbackTraefik,
    free_port,
    install_plugins,
    install_server_mapping,
    shipped_static_config,
)
from routheon.mappings.format import ENTRY_POINT, MappingSpec, render_mapping
from routheon.mappings.grants import GRANTS_FILE, HOP_ENTRY_POINT, GrantedService, Grants, render_grants
from routheon.probe import http_status
from routheon.supervisor import Child

from . import env, stack, wrk
from .profile import Profile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TRAEFIK = Path(sys.executable).parent / "traefik"
LLAMA_KEY = "bench-llama-key"
FAKE_KEY = "bench-fake-key"
# granted both backends in routheon-grants.yml: the body's model decides which one answers
MODELS_KEY = "bench-models-key"
MASTER_KEY = "sk-bench-master-key"
LLAMA_MODEL = "smollm"
FAKE_MODEL = "bench-fake"
PROMPT = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 8
# idle time between two requests, as between two users: lets each proxy finish its own work
GAP_S = 0.02


@dataclass
class Route:
    """One way to reach the backends: a base URL, the key header it needs, the proxy's pid."""

    name: str
    base: str
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(model: str, stream: bool, max_tokens: int = MAX_TOKENS) -> str:
    return json.dumps({"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream})


def _delta_text(line: bytes) -> str:
    """The generated text in one SSE ``data:`` line (empty for role-only or closing chunks)."""
    payload = line[len(b"data:"):].strip()
    if not payload or payload == b"[DONE]":
        return ""
    choices = json.loads(payload).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


class ChatFailed(RuntimeError):
    """A chat request that got no usable answer: counted and shown, not fatal to the run."""


def timed_chat(route: Route, model: str, stream: bool, max_tokens: int = MAX_TOKENS) -> float:
    """Seconds to the first generated text (stream) or to the whole answer (no stream)."""
    url = urlsplit(route.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        began = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=chat_body(model, stream, max_tokens),
                     headers={"Content-Type": "application/json", **route.headers})
        response = conn.getresponse()
        if response.status != 200:
            raise ChatFailed(f"{route.name}: HTTP {response.status}: {response.read()[:300]!r}")
        if not stream:
            answer = json.loads(response.read())
            if not answer["choices"][0]["message"]["content"]:
                raise ChatFailed(f"{route.name}: empty completion")
            return time.perf_counter() - began
        first: float | None = None
        seen = []
        # read to the end so the next request never queues behind this one's generation
        while line := response.readline():
            if not line.startswith(b"data:"):
                continue
            seen.append(line)
            if line.strip() == b"data: [DONE]":
                break
            if first is None and _delta_text(line):
                first = time.perf_counter() - began
        if first is None:
            raise ChatFailed(f"{route.name}: the stream held no text: {b''.join(seen)[:400]!r}")
        return first
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        raise ChatFailed(f"{route.name}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def latency(routes: list[Route], requests: int) -> list[dict]:
    """Per path: percentiles, plus the median of its per-round difference to the first path.

    The paired difference compares requests sent within a few hundred milliseconds of each
    other, so load that comes and goes on a shared machine cancels out of it.
    """
    rows = []
    for stream in (True, False):
        # one entry per round, None where the request failed
        rounds: dict[str, list[float | None]] = {route.name: [] for route in routes}
        failures: dict[str, list[str]] = {route.name: [] for route in routes}
        for route in routes:  # warm-up: connections, prompt cache, LiteLLM's lazy imports
            timed_chat(route, LLAMA_MODEL, stream)
        for index in range(requests):
            # rotate the order so no path always follows LiteLLM's after-response work
            for route in routes[index % len(routes):] + routes[:index % len(routes)]:
                time.sleep(GAP_S)
                try:
                    rounds[route.name].append(timed_chat(route, LLAMA_MODEL, stream) * 1000)
                except ChatFailed as exc:
                    log.warning("%s", exc)
                    failures[route.name].append(str(exc))
                    rounds[route.name].append(None)
        reference = rounds[routes[0].name]
        for route in routes:
            measured = [value for value in rounds[route.name] if value is not None]
            got = measured or [float("nan")]
            deltas = [value - ref for value, ref in zip(rounds[route.name], reference)
                      if value is not None and ref is not None]
            rows.append({"path": route.name, "stream": stream, "n": len(measured),
                         "failed": len(failures[route.name]), "failures": failures[route.name][:3],
                         "p50_ms": round(statistics.median(got), 3), "p99_ms": round(_percentile(got, 99), 3),
                         "mean_ms": round(statistics.fmean(got), 3),
                         "paired_delta_p50_ms": round(statistics.median(deltas), 3) if deltas else None})
            log.warning("%-8s %-6s p50 %.2f ms  p99 %.2f ms", route.name, "stream" if stream else "full",
                        rows[-1]["p50_ms"], rows[-1]["p99_ms"])
    return rows


def broken_streams(stk: stack.Stack, routes: list[Route], count: int) -> list[dict]:
    """Per path: how many of ``count`` two-token streams broke while two busy loops ran.

    A host that runs llama-server on its CPUs is always this busy. Paths take turns request by
    request, so a noisy moment hits all of them alike. This is the measurement behind
    the key mappings' request-body guard (docs/production.md, "Streams cut short under load").
    """
    burners = [stk.start(f"busy-loop-{n}", [sys.executable, "-c", "while True: pass"]) for n in (1, 2)]
    failures: dict[str, list[str]] = {route.name: [] for route in routes}
    try:
        for index in range(count):
            for route in routes[index % len(routes):] + routes[:index % len(routes)]:
                try:
                    timed_chat(route, LLAMA_MODEL, True, max_tokens=2)
                except ChatFailed as exc:
                    failures[route.name].append(str(exc))
    finally:
        for burner in burners:
            burner.stop()
    for name, failed in failures.items():
        log.warning("%-12s %d of %d streams broke under CPU load", name, len(failed), count)
    return [{"path": name, "streams": count, "broken": len(failed), "failures": failed[:3]}
            for name, failed in failures.items()]


def _wait_ok(url: str, headers: dict[str, str], proc: Child, timeout: float) -> None:
    """Until ``url`` answers 200: Traefik answers 401/404 before it has read its mappings."""
    proc.wait_until(lambda: http_status(url, timeout=5, headers=headers) == 200, f"200 from {url}", timeout, 0.2)


def chat_ok(base: str, key: str, model: str) -> bool:
    """Whether a non-streamed chat naming ``model`` gets a 200 with text through ``base`` now."""
    try:
        timed_chat(Route("probe", base, bearer(key)), model, stream=False)
    except ChatFailed:
        return False
    return True


def launch_traefik(stk: stack.Stack, name: str, static: dict, folder: Path, ready: Callable[[str], bool],
                   hop_port: int | None = None, timeout: float = 30.0,
                   poll_s: float = 0.2) -> tuple[Child, str, float]:
    """Traefik on ``static`` moved onto loopback and ``folder``; its base URL and the seconds
    from exec until ``ready(base)`` held (Traefik answers 401/404 before it has read the folder).

    A static configuration that loads plugins (the shipped one) gets Routheon's plugin copied
    into Traefik's working directory (Traefik loads local plugins from its cwd): key files'
    guards and the grants use it. With ``hop_port`` the second entry point listens on the port
    the grants file names. Other entry points get a port of their own: two Traefiks must not
    share one.
    """
    port = free_port()
    ports = {ENTRY_POINT: port}
    # its own folder, never inside ``folder``: Traefik reads the mappings folder's subfolders too
    home = stk.workdir / f"{name}-traefik"
    home.mkdir()
    if "experimental" in static:
        install_plugins(home)
    if hop_port is not None:
        ports[HOP_ENTRY_POINT] = hop_port
    config = LoopbackTraefik(folder, ports, log_level="ERROR").write(home / "traefik.yml", static)
    base = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    proc = stk.start(name, [str(TRAEFIK), f"--configFile={config}"], cwd=home)
    proc.wait_until(lambda: ready(base), f"a routed 200 through {base}", timeout, poll_s)
    return proc, base, time.perf_counter() - began


def _run_traefik(stk: stack.Stack, name: str, static: dict, folder: Path, probe_key: str) -> tuple[Child, str]:
    """Traefik routing ``probe_key`` by its key file: ready at the first key-routed /health 200."""
    def ready(base: str) -> bool:
        return http_status(f"{base}/health", timeout=5, headers=bearer(probe_key)) == 200

    proc, base, _ = launch_traefik(stk, name, static, folder, ready)
    return proc, base


def write_traefik_mappings(stk: stack.Stack, routheon_url: str, keys: dict[str, str]) -> Path:
    """The key mappings as ``routheon mapping add`` writes them, and the repo's routheon-server.yml."""
    folder = stack.write_mappings(stk.workdir / "traefik-mappings", keys, error_pages=True)
    install_server_mapping(folder, urlsplit(routheon_url).port or 0)
    return folder


def start_traefik(stk: stack.Stack, folder: Path, keys: dict[str, str], new_conn: bool = False) -> tuple[Child, str]:
    """Traefik with the repo's own static config on the mappings in ``folder``, on free ports.

    ``new_conn`` gives every request a new connection to the backend (``maxIdleConnsPerHost:
    -1``, as traefik.yml did until issue 21), to show what reusing connections gains.
    """
    static = shipped_static_config()
    if new_conn:
        static.setdefault("serversTransport", {})["maxIdleConnsPerHost"] = -1
    proc, base = _run_traefik(stk, "traefik-new-conn" if new_conn else "traefik", static, folder, next(iter(keys)))
    _check_catch_all(base)
    return proc, base


def write_bare_mappings(folder: Path, keys: dict[str, str]) -> Path:
    """One plain header router per ``key → url`` in ``folder``: no middleware, no health check,
    no catch-all. Traefik on it costs what Traefik itself costs, without Routheon's routers."""
    folder.mkdir(parents=True)
    routers = {f"bare-{i}": {"rule": f"Header(`Authorization`, `Bearer {key}`)", "service": f"bare-{i}",
                             "entryPoints": [ENTRY_POINT]} for i, key in enumerate(keys)}
    services = {f"bare-{i}": {"loadBalancer": {"servers": [{"url": url}]}} for i, url in enumerate(keys.values())}
    (folder / "bare.yml").write_text(yaml.safe_dump({"http": {"routers": routers, "services": services}}))
    return folder


def bare_static_config() -> dict:
    """Of traefik.yml only what a plain Traefik shares with it: the providers' settings and
    those of the connections to the backends, so the comparison is the routers'."""
    static = shipped_static_config()
    return {key: static[key] for key in ("providers", "serversTransport") if key in static}


def start_bare_traefik(stk: stack.Stack, keys: dict[str, str]) -> tuple[Child, str]:
    """Traefik with nothing of Routheon's on ``write_bare_mappings``. The difference to
    ``start_traefik`` is what Routheon's routers and middlewares cost; the difference to
    direct is what Traefik itself costs."""
    folder = write_bare_mappings(stk.workdir / "traefik-bare-mappings", keys)
    return _run_traefik(stk, "traefik-bare", bare_static_config(), folder, next(iter(keys)))


def write_model_mappings(stk: stack.Stack, routheon_url: str, backends: dict[str, tuple[str, str]],
                         hop_port: int) -> Path:
    """A folder for model routing: routheon-server.yml, one key-less file per service (as
    ``routheon mapping add --model`` writes it) and the grants file giving MODELS_KEY every
    service of ``backends`` (service → (url, model)); the hop on ``hop_port``."""
    folder = stk.workdir / "traefik-models-mappings"
    folder.mkdir()
    install_server_mapping(folder, urlsplit(routheon_url).port or 0)
    for service, (url, _) in backends.items():
        spec = MappingSpec(service=service, urls=(url,), keys=())
        (folder / spec.file_name).write_text(render_mapping(spec))
    declared = tuple(GrantedService(service, (model,)) for service, (_, model) in backends.items())
    grants = Grants(services=declared, hop_port=hop_port).grant(MODELS_KEY, tuple(backends))
    (folder / GRANTS_FILE).write_text(render_grants(grants))
    return folder


def start_models_traefik(stk: stack.Stack, folder: Path, hop_port: int) -> tuple[Child, str]:
    """Traefik with the repo's static config, its plugin and hop, on a model-routing folder:
    ready once MODELS_KEY reaches the instant backend by naming its model."""
    proc, base, _ = launch_traefik(stk, "traefik-models", shipped_static_config(), folder,
                                   lambda base: chat_ok(base, MODELS_KEY, FAKE_MODEL), hop_port)
    _check_catch_all(base)
    return proc, base


def _check_catch_all(base: str) -> None:
    """Make sure Routheon's own routers are in the path: an unknown key gets its 401 JSON."""
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=b"{}", headers=bearer("no-such-key"))
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and "error" in json.loads(exc.read() or b"{}"):
            return
        raise RuntimeError(f"Traefik answered an unknown key with HTTP {exc.code}, not Routheon's 401") from exc
    raise RuntimeError("Traefik let an unknown key through: Routheon's catch-all router is not in place")


def start_litellm(stk: stack.Stack, llama_url: str, fake_url: str) -> tuple[Child, str]:
    config = {
        "model_list": [
            {"model_name": LLAMA_MODEL, "litellm_params": {"model": f"openai/{LLAMA_MODEL}",
                                                           "api_base": f"{llama_url}/v1", "api_key": "none"}},
            {"model_name": FAKE_MODEL, "litellm_params": {"model": f"openai/{FAKE_MODEL}",
                                                          "api_base": f"{fake_url}/v1", "api_key": "none"}},
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }
    path = stk.workdir / "litellm.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    # No network here: read the bundled model cost map instead of fetching it at start. One
    # worker per core, as for a production LiteLLM: Traefik uses every core too.
    env_vars = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    proc = stk.start("litellm", [str(env.litellm()), "--config", str(path), "--host", "127.0.0.1",
                                 "--port", str(port), "--num_workers", str(os.cpu_count() or 1)],
                      env_vars=env_vars)
    base = f"http://127.0.0.1:{port}"
    _wait_ok(f"{base}/health/liveliness", {}, proc, timeout=180)
    return proc, base


def start_llama(stk: stack.Stack, fake: bool) -> tuple[Child, str]:
    """The real llama-server with SmolLM2, or (``fake``, to check the harness) the test stand-in."""
    port = free_port()
    if fake:
        argv = [sys.executable, str(REPO / "tests" / "fake_llama.py"), "--port", str(port), "--name", LLAMA_MODEL,
                "--chunks", str(MAX_TOKENS), "--chunk-interval", "0.005"]
    else:
        argv = [str(env.llama_server(wait_s=1200)), "-m", str(env.smollm_model()), "--host", "127.0.0.1",
                "--port", str(port), "--alias", LLAMA_MODEL, "-c", "2048", "-np", "1", "--threads", "1"]
    proc = stk.start("llama-server", argv)
    base = f"http://127.0.0.1:{port}"
    _wait_ok(f"{base}/health", {}, proc, timeout=120)
    return proc, base


def _versions(llama_argv: list[str], fake_llama: bool) -> dict:
    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        text = (out.stdout + out.stderr).strip().splitlines()
        line = next((line for line in text if "version" in line.lower()), text[0] if text else "?")
        return " ".join(line.split())

    llama = "tests/fake_llama.py" if fake_llama else first_line([llama_argv[0], "--version"])
    return {"traefik": first_line([str(TRAEFIK), "version"]), "llama-server": llama,
            "litellm": env.LITELLM_VERSION}


def _measure(route: Route, request: wrk.Request, connections: int, seconds: int) -> tuple[wrk.WrkResult, float | None]:
    """One wrk run, with the proxy's peak RSS when the route goes through one."""
    if not route.pid:
        return wrk.run(request, connections, seconds), None
    sampler = stack.RssSampler(route.pid)
    with sampler:
        result = wrk.run(request, connections, seconds)
    return result, sampler.peak_mib


def _rps(case: str, title: str, routes: list[tuple[Route, wrk.Request]], profile: Profile) -> list[dict]:
    """Every path ``profile.rps_rounds`` times, in turns; each row is a path's median round,
    with every round's requests/s beside it and the failures of all rounds."""
    rows = []
    for _, request in routes:
        wrk.warm(request)
    for connections in profile.connections:
        rounds: dict[str, list[tuple[wrk.WrkResult, float | None]]] = {route.name: [] for route, _ in routes}
        for turn in range(profile.rps_rounds):
            # each round starts one path later, so that no path always follows the same one
            for route, request in routes[turn % len(routes):] + routes[:turn % len(routes)]:
                rounds[route.name].append(_measure(route, request, connections, profile.rps_round_s))
        for route, _ in routes:
            measured = rounds[route.name]
            results = [result for result, _ in measured]
            median_rps = statistics.median_low(result.rps for result in results)
            median = next(result for result in results if result.rps == median_rps)
            row = {"case": case, "title": title, "path": route.name, **median.to_json(),
                   "failed": sum(result.failed for result in results),
                   "rounds_rps": [result.rps for result, _ in measured]}
            peaks = [peak for _, peak in measured if peak is not None]
            if peaks:
                row["proxy_rss_peak_mib"] = max(peaks)
            rows.append(row)
            log.warning("%-7s %-8s c=%-2d %9.1f req/s (median of %s)  p50 %s ms  p99 %s ms  failed %d", case,
                        route.name, connections, median.rps, row["rounds_rps"], median.p50_ms, median.p99_ms,
                        row["failed"])
    return rows


def run(profile: Profile, workdir: Path, fake_llama: bool = False) -> dict:
    with stack.Stack(workdir) as stk:
        # first, while nothing runs yet: it may have to be compiled
        fake_url = stack.start_instant_backend(stk)
        llama, llama_url = start_llama(stk, fake_llama)
        routheon_url = stack.start_server(stk, "routheon", workdir / "traefik-mappings")
        keys = {LLAMA_KEY: llama_url, FAKE_KEY: fake_url}
        folder = write_traefik_mappings(stk, routheon_url, keys)
        traefik, traefik_url = start_traefik(stk, folder, keys)
        new_conn, new_conn_url = start_traefik(stk, folder, keys, new_conn=True)
        bare, bare_url = start_bare_traefik(stk, keys)
        hop_port = free_port()
        models_folder = write_model_mappings(stk, routheon_url, {"llama-server": (llama_url, LLAMA_MODEL),
                                                                 "instant": (fake_url, FAKE_MODEL)}, hop_port)
        models, models_url = start_models_traefik(stk, models_folder, hop_port)
        litellm, litellm_url = start_litellm(stk, llama_url, fake_url)

        direct = Route("direct", llama_url)
        via_traefik = Route("traefik", traefik_url, bearer(LLAMA_KEY), traefik.pid)
        via_bare = Route("traefik-bare", bare_url, bearer(LLAMA_KEY), bare.pid)
        via_models = Route("traefik-models", models_url, bearer(MODELS_KEY), models.pid)
        via_litellm = Route("litellm", litellm_url, bearer(MASTER_KEY), litellm.pid)
        # every request names its model; only traefik-models and litellm route by it
        paths = [direct, via_traefik, via_bare, via_models, via_litellm]
        rows_chat = latency(paths, profile.chat_requests)
        rows_streams = broken_streams(stk, paths, profile.soak_streams)

        health = [
            (direct, wrk.Request(f"{llama_url}/health")),
            (via_traefik, wrk.Request(f"{traefik_url}/health", headers=via_traefik.headers)),
            # LiteLLM proxies no /health to a backend; its cheapest key-checked route is
            # /v1/models, answered from its own config: a bound in LiteLLM's favour.
            (via_litellm, wrk.Request(f"{litellm_url}/v1/models", headers=via_litellm.headers)),
        ]
        body = chat_body(FAKE_MODEL, False)
        post = {"Content-Type": "application/json"}
        fake_key = {**post, **bearer(FAKE_KEY)}
        chat = [
            (Route("direct", fake_url), wrk.Request(f"{fake_url}/v1/chat/completions", "POST", post, body)),
            (Route("traefik", traefik_url, pid=traefik.pid),
             wrk.Request(f"{traefik_url}/v1/chat/completions", "POST", fake_key, body)),
            (Route("traefik-bare", bare_url, pid=bare.pid),
             wrk.Request(f"{bare_url}/v1/chat/completions", "POST", fake_key, body)),
            (Route("traefik-new-conn", new_conn_url, pid=new_conn.pid),
             wrk.Request(f"{new_conn_url}/v1/chat/completions", "POST", fake_key, body)),
            (via_models, wrk.Request(f"{models_url}/v1/chat/completions", "POST",
                                     {**post, **via_models.headers}, body)),
            (via_litellm, wrk.Request(f"{litellm_url}/v1/chat/completions", "POST",
                                      {**post, **via_litellm.headers}, body)),
        ]
        rows_rps = (_rps("health", "/health, key-routed", health, profile)
                    + _rps("chat", "chat completion, instant backend", chat, profile))
        return {"chat": rows_chat, "rps": rows_rps, "streams": rows_streams, "versions": _versions(llama.argv, fake_llama),
                "llama": {"backend": "tests/fake_llama.py" if fake_llama else "llama-server",
                          "model": "fake" if fake_llama else Path(llama.argv[2]).name, "max_tokens": MAX_TOKENS,
                          "threads": 1}}
