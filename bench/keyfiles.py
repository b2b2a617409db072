"""Key files by the thousand: what each key's guard against a second Authorization header costs.

Every key ``routheon mapping add`` writes comes with a guard, ``!HeaderRegexp`` expressions
that refuse a request holding any other Authorization value (routheon.mappings.rules). Two
Traefiks with the repo's static config in front of the instant backend, each on a folder of
routheon-server.yml and FILES one-key files:
- guarded: the files as ``routheon mapping add`` writes them;
- unguarded: the same files with each guard taken out, as routheon-server 1.0.x's and earlier
  Routheon's rules were.

Health checks are left out of both: a thousand services checking one instant backend every
5 s would load the two cores the requests are measured on. Measured: Traefik ready after start
(exec to the first 200 for the last file's key; starts alternate between the folders), its
RSS when ready and after the load (Go lets its heap grow to twice what is live before it
collects, so the second is about twice the first), wrk p50 / p99 at one connection and requests/s at eight for that key (rounds alternate),
and the folder's size.

``python -m bench`` runs it as its ``keyfiles`` part; alone:

    .venv/bin/python -m bench.keyfiles [--files 1000] [--seconds 4] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from routheon.loopback import install_server_mapping
from routheon.mappings.format import MappingSpec, render_mapping
from routheon.mappings.rules import key_clause

from . import report as bench_report
from . import stack
from .modelroute import CONNECTIONS, KEY, Traefiks, measure_paths, rss_mib
from .profile import Profile

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("guarded", "unguarded")


def file_key(index: int, files: int) -> str:
    """The last file holds the measured key, so that Traefik must have read them all."""
    return KEY if index == files - 1 else f"sk-bench-file-{index:06d}-0123456789abcdef"


def write_folder(folder: Path, backend: str, server: str, files: int, guarded: bool) -> Path:
    folder.mkdir(parents=True)
    install_server_mapping(folder, urlsplit(server).port or 0)
    for index in range(files):
        key = file_key(index, files)
        text = render_mapping(MappingSpec(f"svc-{index:05d}", (backend,), (key,)))
        if not guarded:
            text = text.replace(key_clause(key), f"Header(`Authorization`, `Bearer {key}`)")
        text = text.split("        healthCheck:")[0]
        (folder / f"svc-{index:05d}.yml").write_text(text)
    return folder


def run(workdir: Path, files: int, seconds: int, rounds: int, attempts: int) -> dict:
    with stack.Stack(workdir) as stk:
        backend = stack.start_instant_backend(stk)
        server = stack.start_server(stk, "routheon", workdir / "server-mappings")
        traefiks = Traefiks(stk)
        folders = {name: write_folder(workdir / name, backend, server, files, name == "guarded") for name in FOLDERS}
        ready: dict[str, list[float]] = {name: [] for name in FOLDERS}
        for attempt in range(attempts - 1):
            for name in FOLDERS if attempt % 2 == 0 else FOLDERS[::-1]:
                proc, _, took = traefiks.start(f"{name}-ready-{attempt}", folders[name])
                ready[name].append(round(took, 3))
                proc.stop(signal.SIGKILL)
        started, rss_ready = {}, {}
        for name in FOLDERS:
            proc, base, took = traefiks.start(name, folders[name])
            ready[name].append(round(took, 3))
            rss_ready[name] = rss_mib(proc)
            started[name] = (proc, base)
        rows = measure_paths({name: base for name, (_, base) in started.items()}, seconds, rounds, CONNECTIONS)
        for row in rows:
            name = row["path"]
            row.update(files=files, rss_ready_mib=rss_ready[name], rss_mib=rss_mib(started[name][0]), ready_s=ready[name],
                       bytes=sum(path.stat().st_size for path in folders[name].iterdir()))
        return {"folders": rows, "files": files,
                "settings": {"seconds": seconds, "rounds": rounds, "connections": CONNECTIONS, "attempts": attempts}}


def run_profile(profile: Profile, workdir: Path) -> dict:
    """The ``keyfiles`` part of ``python -m bench``: run's lengths from the profile."""
    folder = workdir / "keyfiles"
    folder.mkdir()
    return run(folder, profile.key_files, profile.model_route_s, profile.model_route_rounds,
               profile.model_route_attempts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="one-key files in each folder")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both folders, interleaved")
    parser.add_argument("--attempts", type=int, default=3, help="starts timed per folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "keyfiles.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-keyfiles-") as temporary:
        results = run(Path(temporary), args.files, args.seconds, args.rounds, args.attempts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(bench_report.text_tables({"keyfiles": results}))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
