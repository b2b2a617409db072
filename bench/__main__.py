"""``python -m bench``: run the cases, print the table, write JSON (and, with --publish, the docs)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import socket
import sys
import tempfile
from pathlib import Path

from . import env, keyfiles, machine, modelroute, report, reuse, servers, tokenpath
from .profile import PROFILES

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PARTS = ("servers", "startup", "tokenpath", "reuse", "modelroute", "keyfiles")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full",
                        help="full: the published numbers (~10 min); quick: seconds, checks the harness")
    parser.add_argument("--parts", type=_csv, default=PARTS,
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--targets", type=_csv, default=servers.TARGETS,
                        help="server targets to measure (default: routheon,original,floor)")
    parser.add_argument("--only", type=_csv, default=(),
                        help="server cases to run, e.g. stats,models-hang (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/<date>-<host>.json)")
    parser.add_argument("--publish", action="store_true",
                        help="also write docs/benchmarks.md and its plots from this run")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: print the tables of a results file and rewrite the docs from it")
    parser.add_argument("--fake-llama", action="store_true",
                        help="token path against tests/fake_llama.py instead of llama-server (checks the harness)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def _save(results: dict, out: Path) -> None:
    results["goals"] = report.goals(results)
    partial = out.with_suffix(".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="bench: %(message)s")
    profile = PROFILES[args.profile]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        print(f"bench: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if args.render:
        results = json.loads(args.render.read_text())
        results["goals"] = report.goals(results)
        print(report.text_tables(results))
        print(f"docs: {report.publish(results, args.render.resolve())}")
        return 0
    env.ensure_wrk()
    started = dt.datetime.now(dt.timezone.utc)
    results: dict = {
        "started": started.isoformat(timespec="seconds"),
        "command": "make bench" if argv is None and len(sys.argv) == 1
        else "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "profile": profile.__dict__,
        "machine": machine.describe(),
    }
    # a quick run never overwrites the published numbers of a full one
    suffix = "" if profile.name == "full" else f"-{profile.name}"
    out = args.out or RESULTS / f"{started:%Y-%m-%d}-{socket.gethostname()}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="routheon-bench-") as tmp:
        workdir = Path(tmp)
        # each part is saved as soon as it is done: a later failure keeps what was measured
        if "servers" in args.parts:
            results["servers"] = servers.run_all(profile, workdir, args.targets, set(args.only) or None)
            _save(results, out)
        if "startup" in args.parts:
            results["startup"] = servers.startup(profile, workdir, args.targets)
            _save(results, out)
        if "tokenpath" in args.parts:
            results["tokenpath"] = tokenpath.run(profile, workdir, args.fake_llama)
            _save(results, out)
        if "reuse" in args.parts:
            results["reuse"] = reuse.run_profile(profile, workdir)
            _save(results, out)
        if "modelroute" in args.parts:
            results["modelroute"] = modelroute.run_profile(profile, workdir)
            _save(results, out)
        if "keyfiles" in args.parts:
            results["keyfiles"] = keyfiles.run_profile(profile, workdir)
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _save(results, out)
    print(report.text_tables(results))
    print(f"\nresults: {out}")
    if args.publish:
        print(f"docs: {report.publish(results, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
