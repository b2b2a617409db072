"""PNG charts of a results dict (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

COLOURS = {"routheon": "#1f77b4", "original": "#d62728", "floor": "#7f7f7f",
           "direct": "#7f7f7f", "traefik": "#1f77b4", "traefik-bare": "#aec7e8", "traefik-new-conn": "#9467bd",
           "litellm": "#ff7f0e"}


def _bars(ax: plt.Axes, groups: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool) -> None:
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [value or 0 for value in values]
        ax.bar(xs, heights, width, label=name, color=COLOURS.get(name))
        for x, value in zip(xs, values):
            if value:
                ax.annotate(f"{value:,.0f}" if value >= 10 else f"{value:.1f}", (x, value),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def servers(results: dict, out: Path) -> Path | None:
    rows = results.get("servers", [])
    if not rows:
        return None
    connections = sorted({row["connections"] for row in rows})
    fig, axes = plt.subplots(1, len(connections), figsize=(6 * len(connections), 4.5), squeeze=False)
    for ax, conns in zip(axes[0], connections):
        titles = list(dict.fromkeys(row["title"] for row in rows if row["connections"] == conns))
        series = {}
        for target in ("routheon", "original", "floor"):
            values = [next((r["rps"] for r in rows if r["title"] == title and r["target"] == target
                            and r["connections"] == conns), None) for title in titles]
            if any(values):
                series[target] = values
        _bars(ax, [title.replace(", ", "\n") for title in titles], series, "requests/s (log scale)", log=True)
        ax.set_title(f"routheon-server, {conns} connection{'s' if conns > 1 else ''}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tokenpath(results: dict, out: Path) -> Path | None:
    token = results.get("tokenpath")
    if not token:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    chat = token["chat"]
    paths = list(dict.fromkeys(row["path"] for row in chat))
    groups = ["TTFT p50", "TTFT p99", "full p50", "full p99"]
    series = {}
    for path in paths:
        stream = next(r for r in chat if r["path"] == path and r["stream"])
        full = next(r for r in chat if r["path"] == path and not r["stream"])
        series[path] = [stream["p50_ms"], stream["p99_ms"], full["p50_ms"], full["p99_ms"]]
    _bars(left, groups, series, "milliseconds", log=False)
    left.set_title("chat latency to llama-server, sequential requests")
    rps = [row for row in token["rps"] if row["case"] == "chat"]
    connections = sorted({row["connections"] for row in rps})
    series = {path: [next((r["rps"] for r in rps if r["path"] == path and r["connections"] == c), None)
                     for c in connections] for path in dict.fromkeys(r["path"] for r in rps)}
    _bars(right, [f"{c} connection{'s' if c > 1 else ''}" for c in connections], series,
          "requests/s (log scale)", log=True)
    right.set_title("chat completions/s to an instant backend")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
