"""The routheon-server cases: /stats and /v1/models, this project against the original and the floor.

Only one target is under load at a time: on two cores a second loaded server would steal the
CPU the first one is measured with. The others sit idle meanwhile.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import stack, wrk
from .profile import Profile

log = logging.getLogger(__name__)

TARGETS = ("routheon", "original", "floor")


@dataclass(frozen=True)
class Scenario:
    """One endpoint with one set of backends behind the mappings folder."""

    name: str
    path: str
    live: int
    hang: int = 0
    # the original needs about a second or more per request here
    original_is_slow: bool = False

    @property
    def title(self) -> str:
        if self.path == "/stats":
            return "/stats"
        hang = f" + {self.hang} hanging" if self.hang else ""
        return f"/v1/models, {self.live} live{hang}"


def scenarios(profile: Profile) -> list[Scenario]:
    return [
        Scenario("stats", "/stats", live=2, original_is_slow=True),
        Scenario("models-2", "/v1/models", live=2),
        Scenario(f"models-{profile.backends_many}", "/v1/models", live=profile.backends_many),
        Scenario("models-hang", "/v1/models", live=2, hang=1, original_is_slow=True),
    ]


def _describe(body: bytes, path: str) -> dict:
    """What a user would look at in the answer: for /v1/models, which models it lists."""
    payload = json.loads(body)
    if path == "/v1/models" and isinstance(payload, dict):
        return {"models": len(payload.get("data", []))}
    return {"keys": sorted(payload)[:12] if isinstance(payload, dict) else type(payload).__name__}


def _measure(base_url: str, scenario: Scenario, target: str, connections: int, profile: Profile,
             pid: int) -> dict:
    slow = target == "original" and scenario.original_is_slow
    duration = profile.slow_duration_s if slow else profile.duration_s
    timeout = profile.slow_timeout_s if slow else 10
    with stack.RssSampler(pid) as sampler:
        result = wrk.run(wrk.Request(base_url + scenario.path), connections, duration, timeout_s=timeout)
    log.warning("%-12s %-9s c=%-2d %9.1f req/s  p50 %s ms  p99 %s ms  failed %d", scenario.name, target,
                connections, result.rps, result.p50_ms, result.p99_ms, result.failed)
    return {"case": scenario.name, "title": scenario.title, "path": scenario.path, "target": target,
            **result.to_json(), "rss_peak_mib": sampler.peak_mib}


def run_scenario(scenario: Scenario, profile: Profile, workdir: Path, targets: tuple[str, ...]) -> list[dict]:
    """Every target is started first; loads then run routheon and floor back to back per
    connection count (their ratio is a goal, so they should see the same moment of a noisy
    machine), and the original last, because it keeps working off its queue after wrk stops."""
    with stack.Stack(workdir) as stk:
        live, hang = stack.fake_backends(stk, scenario.live, scenario.hang)
        mappings = stack.write_mappings(workdir / f"mappings-{scenario.name}",
                                        {f"bench-key-{i}": url for i, url in enumerate(live + hang)})
        started: dict[str, tuple[str, int]] = {}
        answers: dict[str, dict] = {}
        bodies: dict[str, tuple[bytes, str]] = {}
        for target in (t for t in ("routheon", "original") if t in targets):
            base = stack.start_server(stk, target, mappings)
            started[target] = (base, stk.procs[-1].pid)
            # the first answer also warms caches, as the first client after a restart would
            bodies[target] = stack.fetch(base + scenario.path, timeout=profile.slow_timeout_s)
            answers[target] = _describe(bodies[target][0], scenario.path)
        if "floor" in targets:
            body = bodies.get("routheon") or bodies.get("original")
            if body is None:
                log.warning("floor skipped for %s: no server answered to copy from", scenario.name)
            else:
                started["floor"] = (stack.start_floor(stk, *body), stk.procs[-1].pid)
        order = [(connections, target) for connections in profile.connections
                 for target in ("routheon", "floor") if target in started]
        order += [(connections, "original") for connections in profile.connections if "original" in started]
        rows = []
        for connections, target in order:
            base, pid = started[target]
            row = _measure(base, scenario, target, connections, profile, pid)
            if target in answers:
                row["answer"] = answers[target]
            rows.append(row)
        return rows


def run_all(profile: Profile, workdir: Path, targets: tuple[str, ...] = TARGETS,
            only: set[str] | None = None) -> list[dict]:
    rows = []
    for scenario in scenarios(profile):
        if only and scenario.name not in only and scenario.path.strip("/") not in only:
            continue
        rows += run_scenario(scenario, profile, workdir, targets)
    return rows


def startup(profile: Profile, workdir: Path, targets: tuple[str, ...]) -> dict:
    """Exec to first answer of each target; the floor is a bare aiohttp app's."""
    stack.compile_bytecode()
    with stack.Stack(workdir) as backends:
        live, _ = stack.fake_backends(backends, 2)
        mappings = stack.write_mappings(workdir / "mappings-startup",
                                        {f"bench-key-{i}": url for i, url in enumerate(live)})
        return stack.startup_seconds(targets, mappings, workdir, profile.startup_runs)
