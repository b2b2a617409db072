"""Drive ``wrk`` and read its numbers back.

wrk's human summary rounds latencies to two digits and changes units as it likes, so a Lua
``done`` hook prints one machine-readable line instead; the parser only looks at that line.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

MARKER = "WRK_JSON "

# Percentiles come from wrk's own HdrHistogram, in microseconds.
_DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    "MARKER", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
""".replace('"MARKER"', json.dumps(MARKER))


@dataclass
class Request:
    """What every wrk connection sends, over and over."""

    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None


@dataclass
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and what went wrong."""

    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    errors: dict[str, int]

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx/3xx answer in time (connect errors are retried by wrk)."""
        return sum(self.errors.get(kind, 0) for kind in ("read", "write", "status", "timeout"))

    def to_json(self) -> dict:
        return {**asdict(self), "failed": self.failed}


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal that no header or body can break out of."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def lua_script(request: Request) -> str:
    """The script that sets method, headers and body, plus the machine-readable summary."""
    lines = [f"wrk.method = {_lua_string(request.method)}"]
    for name, value in request.headers.items():
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    if request.body is not None:
        lines.append(f"wrk.body = {_lua_string(request.body)}")
    return "\n".join(lines) + "\n" + _DONE_HOOK


def parse_output(stdout: str, connections: int) -> WrkResult:
    """Read the hook's line out of wrk's stdout."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER):])
            break
    else:
        raise ValueError("wrk printed no summary line (did the Lua done hook run?)")
    duration_s = raw["duration_us"] / 1e6
    done = raw["requests"]

    def ms(key: str) -> float | None:
        return raw[key] / 1000 if done else None

    return WrkResult(
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=done,
        rps=round(done / duration_s, 2) if duration_s else 0.0,
        p50_ms=ms("p50_us"),
        p90_ms=ms("p90_us"),
        p99_ms=ms("p99_us"),
        max_ms=ms("max_us"),
        errors=raw["errors"],
    )


def warm(request: Request, times: int = 10) -> None:
    """Send the request a few times first: lazy imports and cold caches are not what we measure."""
    data = request.body.encode() if request.body is not None else None
    for _ in range(times):
        req = urllib.request.Request(request.url, data=data, headers=request.headers, method=request.method)
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()


def run(request: Request, connections: int, duration_s: int, timeout_s: int = 10,
        threads: int = 1) -> WrkResult:
    """Run wrk once; one thread by default so the load generator takes at most one core."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as script:
        script.write(lua_script(request))
        script.flush()
        argv = [
            "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{round(duration_s)}s",
            f"--timeout={round(timeout_s)}s", "-s", script.name, request.url,
        ]
        log.debug("running %s", " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=duration_s + timeout_s + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_output(proc.stdout, connections)
