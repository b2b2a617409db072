"""Turn a results dict into the stdout table, the goal check and docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else (f"{value:,.0f}×" if value >= 10 else f"{value:.2f}×")


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _find(rows: list[dict], **match: object) -> dict | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def server_rows(results: dict) -> list[list[str]]:
    """One line per case and connection count: the three targets side by side, with ratios."""
    rows = results.get("servers", [])
    lines = []
    seen: list[tuple[str, int]] = []
    for row in rows:
        key = (row["case"], row["connections"])
        if key not in seen:
            seen.append(key)
    for case, connections in seen:
        new = _find(rows, case=case, connections=connections, target="routheon") or {}
        old = _find(rows, case=case, connections=connections, target="original") or {}
        floor = _find(rows, case=case, connections=connections, target="floor") or {}
        title = (new or old or floor)["title"]
        cells = [title, str(connections)]
        for target in (new, old, floor):
            cells.append(f"{_num(target.get('rps'))} ({_num(target.get('p50_ms'), 2)} / {_num(target.get('p99_ms'), 2)})"
                         + (f" [{target['failed']} failed]" if target.get("failed") else ""))
        cells.append(_ratio(_div(new.get("rps"), old.get("rps"))))
        cells.append(f"{_div(new.get('rps'), floor.get('rps')) * 100:.0f}%" if _div(new.get("rps"), floor.get("rps")) else "–")
        lines.append(cells)
    return lines


SERVER_HEADER = ["case", "conns", "routheon req/s (p50 / p99 ms)", "original 1.0.7", "floor (aiohttp)",
                 "routheon ÷ original", "routheon ÷ floor"]


def memory_rows(results: dict) -> list[list[str]]:
    lines = []
    for row in results.get("servers", []):
        if row["target"] in ("routheon", "original") and row.get("rss_peak_mib"):
            lines.append([row["title"], str(row["connections"]), row["target"], _num(row["rss_peak_mib"])])
    return lines


def startup_rows(results: dict) -> list[list[str]]:
    startup = results.get("startup", {})
    original = startup.get("original", {}).get("median_s")
    return [[target, _num(item["median_s"] * 1000), _num(item["min_s"] * 1000), _num(item["max_s"] * 1000),
             str(item["runs"]), _ratio(_div(item["median_s"], original))] for target, item in startup.items()]


def chat_rows(results: dict) -> list[list[str]]:
    chat = results.get("tokenpath", {}).get("chat", [])
    lines = []
    for stream in (True, False):
        direct = _find(chat, path="direct", stream=stream)
        for item in chat:
            if item["stream"] != stream:
                continue
            delta = (item["p50_ms"] - direct["p50_ms"]) if direct and item is not direct else None
            paired = item.get("paired_delta_p50_ms") if item is not direct else None
            lines.append(["time to first token (stream)" if stream else "full completion", item["path"],
                          str(item["n"]), str(item.get("failed", 0)), _num(item["p50_ms"], 2), _num(item["p99_ms"], 2),
                          "–" if delta is None else f"{delta:+.2f}", "–" if paired is None else f"{paired:+.2f}"])
    return lines


def rps_rows(results: dict) -> list[list[str]]:
    rows = results.get("tokenpath", {}).get("rps", [])
    lines = []
    for row in rows:
        litellm = _find(rows, case=row["case"], connections=row["connections"], path="litellm")
        ratio = _div(row["rps"], litellm["rps"]) if litellm and row["path"] != "litellm" else None
        lines.append([row["title"], str(row["connections"]), row["path"], _num(row["rps"]),
                      _num(row["p50_ms"], 2), _num(row["p99_ms"], 2), str(row.get("failed", 0)), _ratio(ratio),
                      _num(row.get("proxy_rss_peak_mib"))])
    return lines


def stream_rows(results: dict) -> list[list[str]]:
    return [[row["path"], f"{row['streams']:,}", str(row["broken"]), f"{row['broken'] / row['streams'] * 100:.2f}%"]
            for row in results.get("tokenpath", {}).get("streams", [])]


def reuse_rows(results: dict) -> list[list[str]]:
    """bench/reuse.py's paths: lost requests and backend connections, with the streams' share
    (each stream costs a connection: the backend closes it) beside them."""
    return [[row["path"], f"{row['requests']:,}", f"{row['streams']:,}", str(row["failed"]),
             f"{row['backend_connections']:,}", f"{row['connections_per_request']:.3f}",
             f"{_beyond_streams(row):.3f}", _num(row["rps"])]
            for row in results.get("reuse", {}).get("rows", [])]


def _beyond_streams(row: dict) -> float:
    """Backend connections per request beyond the one each stream costs."""
    return max(0, row["backend_connections"] - row["streams"]) / row["requests"]


def model_route_rows(results: dict) -> list[list[str]]:
    """bench/modelroute.py's paths, each with its p50 above the single-service key's (per-key)."""
    rows = results.get("modelroute", {}).get("paths", [])
    per_key = _find(rows, path="per-key")
    lines = []
    for row in rows:
        delta = row["p50_ms"] - per_key["p50_ms"] if per_key and row is not per_key else None
        lines.append([row["path"], f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
                      "–" if delta is None else f"{delta:+.3f}", f"{_num(row['rps'])} ({row['connections']})",
                      _num(row.get("rss_mib")), str(row["failed"])])
    return lines


def key_file_rows(results: dict) -> list[list[str]]:
    """bench/keyfiles.py's two folders, each with its requests/s against the unguarded one's."""
    rows = results.get("keyfiles", {}).get("folders", [])
    unguarded = _find(rows, path="unguarded")
    lines = []
    for row in rows:
        ready = sorted(row["ready_s"])
        lines.append([row["path"], f"{row['files']:,}", _num(row["bytes"] / 1024, 0), f"{ready[(len(ready) - 1) // 2]:.2f}",
                      f"{_num(row['rss_ready_mib'])} / {_num(row['rss_mib'])}", f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
                      f"{_num(row['rps'])} ({row['connections']})",
                      _ratio(_div(row["rps"], unguarded["rps"]) if unguarded else None), str(row["failed"])])
    return lines


def _seconds(name: str, samples: list[float] | None) -> list[str]:
    if not samples:
        return [name, "–", "–", "–", "0"]
    ordered = sorted(samples)
    return [name, f"{ordered[(len(ordered) - 1) // 2]:.2f}", f"{ordered[0]:.2f}", f"{ordered[-1]:.2f}",
            str(len(ordered))]


def many_keys_rows(results: dict) -> list[list[str]]:
    """Start-up and change times with 10,000 keys (and start-up with 1, for scale)."""
    part = results.get("modelroute")
    if not part:
        return []
    keys = f"{part['keys']:,} keys"
    python = part.get("python", {})
    return [
        _seconds("Traefik ready after start, 1 key", part["ready_s"].get("model-routed")),
        _seconds(f"Traefik ready after start, {keys}", part["ready_s"].get("model-routed-10k")),
        _seconds(f"grant applied, {keys}", part["applied_s"].get("grant")),
        _seconds(f"revocation applied, {keys}", part["applied_s"].get("revoke")),
        _seconds(f"Python: parse the grants file ({_num(python.get('grants_bytes', 0) / 1024, 0)} KiB)",
                 [python["parse_grants_s"]] if "parse_grants_s" in python else None),
        _seconds("Python: read the folder as `routheon mapping check` does",
                 [python["inspect_folder_s"]] if "inspect_folder_s" in python else None),
    ]


def model_route_goals(part: dict) -> list[dict]:
    """Issue 11's goals for 10,000 keys; the worst attempt counts for the times."""
    paths = part.get("paths", [])
    one, many = _find(paths, path="model-routed"), _find(paths, path="model-routed-10k")
    added = many["p50_ms"] - one["p50_ms"] if one and many else None
    out = [_goal("10,000 keys: p50 above 1 key (model-routed)", "<= +0.3 ms", added,
                 added is not None and added <= 0.3, "–" if added is None else f"{added:+.3f} ms")]
    for kind, label in (("grant", "a grant"), ("revoke", "a revocation")):
        worst = max(part.get("applied_s", {}).get(kind) or [], default=None)
        out.append(_goal(f"10,000 keys: {label} applied", "<= 2 s", worst, worst is not None and worst <= 2,
                         "–" if worst is None else f"{worst:.2f} s"))
    worst = max(part.get("ready_s", {}).get("model-routed-10k") or [], default=None)
    out.append(_goal("10,000 keys: Traefik ready after start", "<= 5 s", worst, worst is not None and worst <= 5,
                     "–" if worst is None else f"{worst:.2f} s"))
    return out


def _goal(name: str, wanted: str, value: float | None, met: bool | None, shown: str) -> dict:
    return {"goal": name, "wanted": wanted, "value": value, "shown": shown,
            "met": None if value is None else met}


def goals(results: dict) -> list[dict]:
    """The issue's targets, each checked at every connection count measured (the worst one counts)."""
    rows = results.get("servers", [])
    out = []

    def worst_ratio(case: str, other: str) -> float | None:
        ratios = []
        for new in (r for r in rows if r["case"] == case and r["target"] == "routheon"):
            base = _find(rows, case=case, connections=new["connections"], target=other)
            ratios.append(_div(new["rps"], base["rps"]) if base else None)
        return None if not ratios or None in ratios else min(ratios)

    for case, wanted in (("stats", 200), ("models-hang", 100)):
        ratio = worst_ratio(case, "original")
        out.append(_goal(f"{case}: routheon ÷ original req/s", f">= {wanted}×", ratio,
                         ratio is not None and ratio >= wanted, _ratio(ratio)))
    many = next((r["case"] for r in rows if r["case"].startswith("models-") and r["case"][7:].isdigit()
                 and r["case"] != "models-2"), None)
    if many:
        ratio = worst_ratio(many, "original")
        out.append(_goal(f"{many}: routheon ÷ original req/s", ">= 10×", ratio,
                         ratio is not None and ratio >= 10, _ratio(ratio)))
    stats16 = _find(rows, case="stats", target="routheon", connections=16)
    if stats16:
        p99 = stats16["p99_ms"]
        out.append(_goal("stats: routheon p99 at 16 connections", "< 20 ms", p99,
                         p99 is not None and p99 < 20, f"{_num(p99, 2)} ms"))
    shares = [worst_ratio(case, "floor") for case in dict.fromkeys(
        r["case"] for r in rows if r.get("path") == "/v1/models" and r["target"] == "routheon")]
    share = None if not shares or None in shares else min(shares)
    out.append(_goal("/v1/models, every case: routheon ÷ floor req/s", ">= 50%", share,
                     share is not None and share >= 0.5, "–" if share is None else f"{share * 100:.0f}%"))
    startup = results.get("startup", {})
    if "routheon" in startup and "original" in startup:
        ratio = _div(startup["routheon"]["median_s"], startup["original"]["median_s"])
        out.append(_goal("start-up: routheon ÷ original (median, exec to first answer)", "<= 1.1×", ratio,
                         ratio is not None and ratio <= 1.1, _ratio(ratio)))
    token = results.get("tokenpath", {})
    direct = _find(token.get("chat", []), path="direct", stream=True)
    for path, label in (("traefik", "key file"), ("traefik-models", "granted key")):
        routed = _find(token.get("chat", []), path=path, stream=True)
        added = routed["p50_ms"] - direct["p50_ms"] if direct and routed else None
        out.append(_goal(f"Routheon adds to time to first token (p50), {label}", "<= +1.0 ms", added,
                         added is not None and added <= 1.0, "–" if added is None else f"{added:+.2f} ms"))
    rps = token.get("rps", [])

    def worst_chat_ratio(other: str) -> float | None:
        ratios = []
        for row in (r for r in rps if r["case"] == "chat" and r["path"] == "traefik"):
            base = _find(rps, case="chat", path=other, connections=row["connections"])
            ratios.append(_div(row["rps"], base["rps"]) if base else None)
        return None if not ratios or None in ratios else min(ratios)

    ratio = worst_chat_ratio("litellm")
    out.append(_goal("token path: Routheon (Traefik) ÷ LiteLLM req/s", ">= 30×", ratio,
                     ratio is not None and ratio >= 30, _ratio(ratio)))
    ratio = worst_chat_ratio("traefik-bare")
    out.append(_goal("token path: Routheon ÷ plain Traefik (connections reused) req/s", ">= 90%", ratio,
                     ratio is not None and ratio >= 0.9, "–" if ratio is None else f"{ratio * 100:.0f}%"))
    reuse = results.get("reuse", {}).get("rows", [])
    for path, label in (("traefik", "key file"), ("traefik-models", "granted key")):
        row = _find(reuse, path=path)
        out.append(_goal(f"requests lost to a backend closing after streams, {label}", "0",
                         None if row is None else row["failed"], row is not None and row["failed"] == 0,
                         "–" if row is None else f"{row['failed']} of {row['requests']:,}"))
        beyond = None if row is None else _beyond_streams(row)
        out.append(_goal(f"backend connections per request beyond the streams', {label}", "<= 0.1", beyond,
                         beyond is not None and beyond <= 0.1, "–" if beyond is None else f"{beyond:.3f}"))
    cut = _find(token.get("streams", []), path="traefik")
    out.append(_goal("streams broken through Routheon under CPU load", "0", None if cut is None else cut["broken"],
                     cut is not None and cut["broken"] == 0,
                     "–" if cut is None else f"{cut['broken']} of {cut['streams']:,}"))
    if "modelroute" in results:
        out += model_route_goals(results["modelroute"])
    return out


def goal_rows(results: dict) -> list[list[str]]:
    marks = {True: "met", False: "**missed**", None: "not measured"}
    return [[item["goal"], item["wanted"], item["shown"], marks[item["met"]]] for item in results.get("goals", [])]


SECTIONS = (
    ("routheon-server against the original and the floor (req/s, latency p50 / p99 in ms)", SERVER_HEADER, server_rows),
    ("Start-up: exec to first answer (ms; floor: a bare aiohttp app)", ["server", "median", "min", "max", "runs",
                                                                       "median ÷ original"], startup_rows),
    ("Peak RSS under load (MiB, process and children)", ["case", "conns", "server", "peak RSS"], memory_rows),
    ("Token path: sequential chat requests (ms)",
     ["measure", "path", "n", "failed", "p50", "p99", "p50 − direct p50", "median of paired Δ"], chat_rows),
    ("Token path: requests/s", ["case", "conns", "path", "req/s", "p50 ms", "p99 ms", "failed", "÷ LiteLLM", "proxy peak RSS MiB"], rps_rows),
    ("Token path: streams broken under CPU load (two busy loops, two-token streams, paths in turns)",
     ["path", "streams", "broken", "share"], stream_rows),
    ("Connection reuse: a backend that closes after streams, as llama-server does (two clients, "
     "streamed and plain in turn, two busy loops)",
     ["path", "requests", "streams", "failed", "backend connections", "per request", "beyond the streams'", "req/s"],
     reuse_rows),
    ("One key, many models: Traefik paths to the instant backend (wrk; p50 / p99 at 1 connection)",
     ["path", "p50 ms", "p99 ms", "p50 − per-key", "req/s (conns)", "RSS MiB", "failed"], model_route_rows),
    ("One key, many models: 10,000 keys over 20 services (s)", ["measure", "median", "min", "max", "runs"],
     many_keys_rows),
    ("Key files: one-key files with and without each key's guard against a second Authorization header",
     ["folder", "files", "KiB", "ready s (median)", "RSS MiB (ready / after load)", "p50 ms", "p99 ms", "req/s (conns)", "÷ unguarded",
      "failed"], key_file_rows),
    ("Goals from the issue", ["goal", "wanted", "measured", "status"], goal_rows),
)


def markdown_tables(results: dict, level: str = "###") -> str:
    parts = []
    for title, header, make in SECTIONS:
        rows = make(results)
        if rows:
            parts.append(f"{level} {title}\n\n" + "\n".join(table(header, rows)))
    return "\n\n".join(parts)


def text_tables(results: dict) -> str:
    """The same tables, aligned for a terminal."""
    parts = []
    for title, header, make in SECTIONS:
        rows = make(results)
        if not rows:
            continue
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def publish(results: dict, json_path: Path) -> Path:
    from . import docs

    return docs.write(results, json_path, DOC)
