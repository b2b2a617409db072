"""The routheon-server cases: /stats and /v1/models, this project against the original and the floor.

Targets run one after another, never side by side: on two cores a second server would steal
the CPU the first one is measured with.
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


def _load(base_url: str, scenario: Scenario, target: str, profile: Profile, pid: int | None) -> list[dict]:
    slow = target == "original" and scenario.original_is_slow
    duration = profile.slow_duration_s if slow else profile.duration_s
    timeout = profile.slow_timeout_s if slow else 10
    rows = []
    for connections in profile.connections:
        request = wrk.Request(base_url + scenario.path)
        sampler = stack.RssSampler(pid) if pid else None
        if sampler:
            with sampler:
                result = wrk.run(request, connections, duration, timeout_s=timeout)
        else:
            result = wrk.run(request, connections, duration, timeout_s=timeout)
        row = {"case": scenario.name, "title": scenario.title, "path": scenario.path, "target": target,
               **result.to_json()}
        if sampler:
            row["rss_peak_mib"] = sampler.peak_mib
        log.warning("%-12s %-9s c=%-2d %9.1f req/s  p50 %s ms  p99 %s ms  failed %d",
                    scenario.name, target, connections, result.rps, result.p50_ms, result.p99_ms,
                    result.failed)
        rows.append(row)
    return rows


def run_scenario(scenario: Scenario, profile: Profile, workdir: Path, targets: tuple[str, ...]) -> list[dict]:
    rows: list[dict] = []
    with stack.Stack(workdir) as backends:
        live, hang = stack.fake_backends(backends, scenario.live, scenario.hang)
        mappings = stack.write_mappings(workdir / f"mappings-{scenario.name}",
                                        {f"bench-key-{i}": url for i, url in enumerate(live + hang)})
        floor_body: tuple[bytes, str] | None = None
        for target in targets:
            if target == "floor":
                if floor_body is None:
                    log.warning("floor skipped for %s: no server answered to copy from", scenario.name)
                    continue
                with stack.Stack(workdir) as floor:
                    base = stack.start_floor(floor, *floor_body)
                    rows += _load(base, scenario, target, profile, floor.procs[-1].pid)
                continue
            with stack.Stack(workdir) as server:
                base = stack.start_server(server, target, mappings)
                # the first answer also warms caches, as the first client after a restart would
                body, content_type = stack.fetch(base + scenario.path, timeout=profile.slow_timeout_s)
                if floor_body is None or target == "routheon":
                    floor_body = (body, content_type)
                answer = _describe(body, scenario.path)
                rows_before = len(rows)
                rows += _load(base, scenario, target, profile, server.procs[-1].pid)
                for row in rows[rows_before:]:
                    row["answer"] = answer
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
    with stack.Stack(workdir) as backends:
        live, _ = stack.fake_backends(backends, 2)
        mappings = stack.write_mappings(workdir / "mappings-startup",
                                        {f"bench-key-{i}": url for i, url in enumerate(live)})
        return {target: stack.startup_seconds(target, mappings, workdir, profile.startup_runs)
                for target in targets if target != "floor"}
