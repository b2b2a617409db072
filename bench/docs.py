"""Write docs/benchmarks.md and its plots from one run.

The prose lives in ``bench/benchmarks.md.in`` (edited by hand); every number comes from the
results file, so the page can never show figures that no run produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from . import plot, report

TEMPLATE = Path(__file__).with_name("benchmarks.md.in")


def _machine(results: dict) -> str:
    machine = results["machine"]
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, "
            f"Linux {machine['kernel']}, Python {machine['python']}; load average at start "
            f"{machine['load_average_at_start'][0]} (1 min) / {machine['load_average_at_start'][1]} (5 min)")


def write(results: dict, json_path: Path, doc: Path) -> Path:
    doc.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for name, make in (("servers", plot.servers), ("tokenpath", plot.tokenpath)):
        png = make(results, doc.parent / f"benchmarks-{name}.png")
        if png:
            images.append(f"![{name}]({png.name})")
    versions = results.get("tokenpath", {}).get("versions", {})
    text = Template(TEMPLATE.read_text()).substitute(
        goals="\n".join(report.table(["goal", "wanted", "measured", "status"], report.goal_rows(results))),
        tables=report.markdown_tables(results),
        plots="\n\n".join(images),
        machine=_machine(results),
        command=results["command"],
        started=results["started"],
        finished=results["finished"],
        profile=json.dumps(results["profile"]),
        versions=", ".join(f"{name} {value}" for name, value in versions.items()) or "–",
        json_path=json_path.relative_to(report.REPO) if json_path.is_relative_to(report.REPO) else json_path,
    )
    partial = doc.with_suffix(".md.tmp")
    partial.write_text(text)
    partial.replace(doc)
    return doc
