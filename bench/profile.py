"""How long and how hard each case runs: the full bench or a quick check of the harness."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # a wrk run against anything that answers in milliseconds
    duration_s: int
    # a wrk run against the original where it serves about one request per second or less:
    # long enough that several requests finish even at 16 connections
    slow_duration_s: int
    slow_timeout_s: int
    connections: tuple[int, ...]
    # sequential chat requests per path for time to first token and full latency
    chat_requests: int
    # token-path requests/s: every path measured this many times, in turns, for round_s each;
    # the median round counts (LiteLLM's requests/s swing by half from one run to the next)
    rps_rounds: int
    rps_round_s: int
    startup_runs: int
    backends_many: int
    # two-token streams per path with the CPU busy, to count the ones cut short
    soak_streams: int
    # model routing and 10,000 keys (bench/modelroute.py): seconds per wrk run, rounds of every
    # path, and how many grants, revocations and starts are timed
    model_route_s: int
    model_route_rounds: int
    model_route_attempts: int
    # one-key files per folder, with and without each key's guard (bench/keyfiles.py; its
    # lengths are model_route's)
    key_files: int
    # mixed streamed and plain requests per path against a backend that closes after streams
    # (bench/reuse.py)
    reuse_requests: int


FULL = Profile("full", duration_s=8, slow_duration_s=20, slow_timeout_s=30, connections=(1, 16),
               chat_requests=100, rps_rounds=3, rps_round_s=5, startup_runs=5, backends_many=20,
               soak_streams=2000, model_route_s=4, model_route_rounds=3, model_route_attempts=3,
               key_files=1000, reuse_requests=10_000)
QUICK = Profile("quick", duration_s=1, slow_duration_s=3, slow_timeout_s=5, connections=(1, 16),
                chat_requests=3, rps_rounds=1, rps_round_s=1, startup_runs=1, backends_many=4,
                soak_streams=5, model_route_s=1, model_route_rounds=1, model_route_attempts=1,
                key_files=20, reuse_requests=200)
PROFILES = {profile.name: profile for profile in (FULL, QUICK)}
