"""Host metrics for ``/stats``: collection, the stats-config filter, and the CPU sampler.

Section and field names are those of routheon-server 1.0.6/1.0.7, so an existing
``--stats-config-file`` keeps hiding what it hid. CPU usage is the one value that needs two
readings over time; the original took them one second apart inside every request and so
served one request per second. Here a background task reads the CPU counters once a second
and requests only read the last value.

Nothing here runs before the server's first answer: psutil is imported where it is first used
(about 7 ms on two busy cores), the host's identity is read with the first ``/stats`` body
(``platform.processor()`` runs ``uname -p``, 12 to 18 ms), and the sampler takes its first
reading FIRST_SAMPLE_AFTER after the start (routheon-server's start-up, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SECTIONS = ("timestamp", "system", "cpu", "memory", "swap", "disk", "network", "processes")
# A config may hide anything but the moment the numbers were taken.
ALWAYS_SHOWN = "timestamp"
SAMPLE_INTERVAL = 1.0
FIRST_SAMPLE_AFTER = 0.1
NETWORK_FIELDS = ("bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "errin", "errout", "dropin", "dropout")
_GIB = 1024**3


class StatsConfigError(ValueError):
    """A stats config that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class StatsConfig:
    """Which sections, and which fields inside a section, ``/stats`` shows.

    ``sections`` None shows every section. A section named in ``fields`` shows only the
    listed fields; an empty list or null there shows the section as an empty object (as
    1.0.7 did).
    """

    sections: frozenset[str] | None = None
    fields: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def limits_anything(self) -> bool:
        return self.sections is not None or bool(self.fields)

    def apply(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        shown = {
            name: value
            for name, value in stats.items()
            if self.sections is None or name in self.sections or name == ALWAYS_SHOWN
        }
        for section, names in self.fields.items():
            value = shown.get(section)
            if isinstance(value, dict):
                shown[section] = {key: item for key, item in value.items() if key in names}
        return shown


def _string_list(value: Any, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise StatsConfigError(f"{where} must be a list of names")
    return frozenset(value)


def parse_stats_config(text: str, source: str) -> StatsConfig:
    """Validate a stats config's YAML text; unknown names are warned about, not fatal."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise StatsConfigError(f"{where}: not valid YAML: {problem}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise StatsConfigError(f"{source}: the top level must be a mapping with enabled_sections and/or enabled_fields")
    unknown_keys = sorted(str(key) for key in document if key not in ("enabled_sections", "enabled_fields"))
    if unknown_keys:
        raise StatsConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown_keys)}; use enabled_sections and enabled_fields"
        )
    sections_raw = document.get("enabled_sections")
    sections = None if sections_raw is None else _string_list(sections_raw, f"{source}: enabled_sections")
    fields_raw = document.get("enabled_fields")
    fields_raw = {} if fields_raw is None else fields_raw
    if not isinstance(fields_raw, dict):
        raise StatsConfigError(f"{source}: enabled_fields must be a mapping of section name to a list of field names")
    fields = {
        str(section): _string_list(names, f"{source}: enabled_fields.{section}")
        for section, names in fields_raw.items()
    }
    unknown = sorted((set(sections or ()) | set(fields)) - set(SECTIONS))
    if unknown:
        log.warning(
            "%s names unknown /stats section(s): %s (known: %s)", source, ", ".join(unknown), ", ".join(SECTIONS)
        )
    config = StatsConfig(sections, fields)
    if not config.limits_anything:
        log.warning("%s limits no section or field: /stats shows everything", source)
    return config


def load_stats_config(path: Path) -> StatsConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StatsConfigError(f"stats config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StatsConfigError(f"cannot read stats config file {path}: {exc}") from None
    return parse_stats_config(text, str(path))


def _gib(value: float) -> float:
    return round(value / _GIB, 2)


def _usage(total: int, used: int, free: int, percent: float) -> dict[str, Any]:
    return {
        "total": total,
        "used": used,
        "free": free,
        "percent": round(percent, 2),
        "total_gb": _gib(total),
        "used_gb": _gib(used),
        "free_gb": _gib(free),
    }


def system_identity() -> dict[str, str]:
    """The host facts that do not change while running (``processor`` may run ``uname``)."""
    return {
        "platform": platform.system(),
        "platform_release": platform.release(),
        "platform_version": platform.version(),
        "hostname": platform.node(),
        "architecture": platform.machine(),
        "processor": platform.processor(),
    }


def _percent_since_boot() -> float:
    """CPU busy share since boot: the arithmetic psutil.cpu_percent applies to two samples,
    applied to one (boot is the other)."""
    import psutil

    times = psutil.cpu_times()
    # Linux counts guest time inside user and nice already
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return 100.0 * (total - idle) / total if total > 0 else 0.0


def collect(cpu_percent: float, identity: Mapping[str, str], now: float | None = None) -> dict[str, Any]:
    """Every section of ``/stats``; all readings here are cheap, non-blocking psutil calls."""
    import psutil

    now = time.time() if now is None else now
    uptime = max(0, int(now - psutil.boot_time()))
    load = psutil.getloadavg()
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    disk = psutil.disk_usage("/")
    net = psutil.net_io_counters()
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "system": {
            **identity,
            "uptime_seconds": uptime,
            "uptime_human": f"{uptime // 86400}d {uptime % 86400 // 3600}h {uptime % 3600 // 60}m",
        },
        "cpu": {
            "usage_percent": round(cpu_percent, 2),
            "load_average": {"1min": round(load[0], 2), "5min": round(load[1], 2), "15min": round(load[2], 2)},
            "core_count": psutil.cpu_count() or 0,
            "core_count_logical": psutil.cpu_count(logical=True) or 0,
        },
        "memory": {
            **_usage(memory.total, memory.used, memory.free, memory.percent),
            "available": memory.available,
            "available_gb": _gib(memory.available),
        },
        "swap": _usage(swap.total, swap.used, swap.free, swap.percent),
        "disk": _usage(disk.total, disk.used, disk.free, disk.percent),
        "network": {name: getattr(net, name, 0) if net else 0 for name in NETWORK_FIELDS},
        "processes": {"count": len(psutil.pids())},
    }


class StatsService:
    """Serves ``/stats`` bodies: CPU sampled in the background, the rest cached for a second.

    The body is built about once per ``SAMPLE_INTERVAL`` (and after each CPU sample) whatever
    the request rate, and filtered before it is cached, so hidden values never sit in a
    response buffer.
    """

    def __init__(self, config: StatsConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config or StatsConfig()
        self._clock = clock
        self._identity: dict[str, str] | None = None
        # None until the first sample: /stats then shows the average since boot, a real value
        # rather than a made-up 0
        self._cpu_percent: float | None = None
        self._body: bytes | None = None
        self._built_at = float("-inf")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start sampling in the background; never waits for a reading."""
        self._task = asyncio.create_task(self._sample_forever(), name="cpu-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sample_forever(self) -> None:
        delay = FIRST_SAMPLE_AFTER
        await asyncio.sleep(delay)  # the server answers meanwhile
        import psutil

        psutil.cpu_percent(interval=None)  # the reference point the first sample is measured from
        while True:
            await asyncio.sleep(delay)
            delay = SAMPLE_INTERVAL
            try:
                self._cpu_percent = psutil.cpu_percent(interval=None)
                self._built_at = float("-inf")  # the next request shows the new value
            except Exception:
                log.exception("CPU sampling failed")

    def body(self) -> bytes | None:
        """The current JSON body, or None if the host could not be read."""
        now = self._clock()
        if self._body is None or now - self._built_at >= SAMPLE_INTERVAL:
            try:
                if self._identity is None:
                    self._identity = system_identity()
                cpu = self._cpu_percent if self._cpu_percent is not None else _percent_since_boot()
                stats = collect(cpu, self._identity)
            except Exception:
                log.exception("collecting host stats failed")
                return self._body
            self._body = json.dumps(self._config.apply(stats)).encode()
            self._built_at = now
        return self._body
