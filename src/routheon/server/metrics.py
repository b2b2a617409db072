"""routheon-server's ``GET /metrics``: usage per key from the plugin's records, the backends, the
folder's verdict and this server's own requests, in Prometheus' text format.

It is served on a listener of its own (``--metrics-port``), never on the port Traefik routes
to: no mapping file names that port, so no client reaches it through Traefik, and the main
port answers ``/metrics`` with 404 like any unknown path.

Usage counters are sums over the record files (routheon.usage.records), kept in memory and
brought up to date when Prometheus scrapes, at most once per ``MIN_REFRESH`` seconds, reading
only what the files gained since the last read, in a thread: the event loop keeps answering
Traefik meanwhile. A scrape waits for that read at most ``REFRESH_WAIT`` seconds (the first
read of months of records may take longer) and otherwise answers with what was summed so far.
Counters only grow: a record file deleted later keeps its requests counted until a restart,
when they are summed again from the files that are left.

Labels never hold a key or its hash: ``name`` is the key's name or its last characters
(``…abcd``). ``model`` is what clients send, so it is capped at ``MAX_MODELS_PER_NAME`` values
per name (later ones count as ``(other)``): a client with a valid key cannot grow the scrape
without bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from routheon.mappings.folder import Folder
from routheon.mappings.grants import GRANTS_FILE
from routheon.server.app import CATALOG, FOLDER
from routheon.server.models import ModelCatalog
from routheon.usage.records import Record, RecordReader

log = logging.getLogger(__name__)

MIN_REFRESH = 1.0
REFRESH_WAIT = 2.0
MAX_MODELS_PER_NAME = 100
# The reading thread holds the GIL while it parses; Python hands it over only every 5 ms, so
# requests on the event loop wait. Measured (2 shared cores) with 300,000 records (90 MB) read
# at start-up while a client asks /health every 10 ms: /health p50 2.4 ms with nothing to read;
# during the read p50 9-11 ms, p99 31-47 ms without these pauses, p50 5-6 ms, p99 19-22 ms
# with them; the read took 3.2-5.4 s without and 4.2-5.1 s with them (3 runs each).
YIELD_EVERY = 500
YIELD_FOR = 0.001
OTHER_MODEL = "(other)"
UNMATCHED_PATH = "(unmatched)"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UsageCounters:
    """Requests and tokens per key name, model and status, summed from a usage folder's records.

    A prometheus_client collector: ``collect`` is called for each scrape (on the event loop)
    while ``refresh`` adds records in a thread, so both take ``_lock``.
    """

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self._reader = RecordReader(folder)
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}
        self._models: dict[str, set[str]] = {}
        self._skipped: dict[str, int] = {"garbage": 0, "too_long": 0}
        self._reading: asyncio.Task[None] | None = None
        self._started = float("-inf")
        self._said_missing = False
        self._said_error = ""

    async def refresh(self) -> None:
        """Read what the files gained, unless that was begun less than ``MIN_REFRESH`` s ago."""
        if self._reading is None and self._clock() - self._started >= MIN_REFRESH:
            self._started = self._clock()
            self._reading = asyncio.create_task(self._read())
        if self._reading is not None:
            # asyncio.wait, not wait_for: a scrape that gives up leaves the read running
            await asyncio.wait({self._reading}, timeout=REFRESH_WAIT)

    async def _read(self) -> None:
        try:
            await asyncio.to_thread(self._read_new)
            self._said_error = ""
        except OSError as exc:
            error = f"cannot read the usage folder {self.folder}: {exc.strerror or exc}"
            if error != self._said_error:  # once, not at every scrape
                log.warning("%s; usage counters stay as they are", error)
            self._said_error = error
        except Exception:  # a bug here must not take /metrics down for good
            log.exception("reading the usage records in %s failed", self.folder)
        finally:
            self._reading = None

    def _read_new(self) -> None:
        """In a thread: add every record not read before, and say what was skipped."""
        missing = not self.folder.is_dir()
        if missing != self._said_missing:
            self._said_missing = missing
            if missing:
                log.info("usage folder %s does not exist (yet): usage counters stay at zero", self.folder)
        before = {name: (skipped.garbage, skipped.too_long) for name, skipped in self._reader.skipped.items()}
        for count, record in enumerate(self._reader.records(), 1):
            self._add(record)
            if count % YIELD_EVERY == 0:
                time.sleep(YIELD_FOR)  # lets the event loop have the GIL (see YIELD_EVERY)
        for name, why in self._reader.new_problems.items():
            log.warning("usage records: %s: %s: skipped", self.folder / name, why)
        for name, skipped in self._reader.skipped.items():
            garbage, too_long = before.get(name, (0, 0))
            if (skipped.garbage, skipped.too_long) != (garbage, too_long):
                with self._lock:
                    self._skipped["garbage"] += skipped.garbage - garbage
                    self._skipped["too_long"] += skipped.too_long - too_long
                log.warning("usage records: %s: %s", self.folder / name, skipped.describe())

    def _model_label(self, name: str, model: str) -> str:
        models = self._models.setdefault(name, set())
        if model not in models:
            if len(models) >= MAX_MODELS_PER_NAME:
                return OTHER_MODEL
            models.add(model)
        return model

    def _add(self, record: Record) -> None:
        name = record.who
        with self._lock:
            model = self._model_label(name, record.model)
            requests = (name, model, str(record.code))
            self._requests[requests] = self._requests.get(requests, 0) + 1
            for kind, count in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens)):
                if count:
                    tokens = (name, model, kind)
                    self._tokens[tokens] = self._tokens.get(tokens, 0) + count

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            requests, tokens = dict(self._requests), dict(self._tokens)
            skipped = {(reason,): count for reason, count in self._skipped.items()}
        yield _counters(
            "routheon_key_requests",
            "Requests of each API key (name, or …last characters) per model and HTTP status sent"
            " to the client (0: the client left before a status), from the usage records",
            ("name", "model", "code"),
            requests,
        )
        yield _counters(
            "routheon_key_tokens",
            "Tokens of each API key per model as the backends' answers reported them (type: prompt or"
            " completion); requests whose answer reported none add nothing",
            ("name", "model", "type"),
            tokens,
        )
        yield _counters(
            "routheon_usage_lines_skipped",
            "Lines of the usage record files that are not records (reason: garbage or too_long)",
            ("reason",),
            skipped,
        )


def _counters(name: str, documentation: str, labels: tuple[str, ...], values: dict[tuple[str, ...], int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in sorted(values.items()):
        family.add_metric(label_values, value)
    return family


class FolderState:
    """``routheon_backend_up`` and the folder's verdict, as of the latest ``update``."""

    def __init__(self) -> None:
        self._up: dict[str, bool] = {}
        self._folder: Folder | None = None

    def update(self, folder: Folder, catalog: ModelCatalog) -> None:
        """Take the folder scan and the catalog's answers (both already brought up to date)."""
        up: dict[str, bool] = {}
        for mapping in folder.files:
            if mapping.path.name == GRANTS_FILE:  # Routheon's own services (the hop), not backends
                continue
            for service in mapping.services:
                answers = [catalog.answer(url) for url in service.urls]
                up[service.name] = up.get(service.name, False) or any(
                    answer is not None and answer.payload is not None for answer in answers
                )
        self._up, self._folder = up, folder

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "routheon_backend_up",
            "1 when a URL of the service answered /v1/models at the last look (at most a few seconds"
            " old), else 0; services of the mappings folder",
            labels=("service",),
        )
        for service, answering in sorted(self._up.items()):
            up.add_metric((service,), 1 if answering else 0)
        yield up
        if self._folder is None:
            return
        folder = self._folder
        yield GaugeMetricFamily(
            "routheon_mappings_applied",
            "1 when Traefik applies the mappings folder (nothing in it makes Traefik reject it), as in"
            " /health; 0 when the folder is missing or rejected",
            value=1 if folder.exists and not any(finding.rejects for finding in folder.errors) else 0,
        )
        yield GaugeMetricFamily(
            "routheon_mapping_errors",
            "Errors in the mappings folder, as listed under problems by /health and routheon mapping check",
            value=len(folder.errors),
        )


class Metrics:
    """Everything ``/metrics`` shows, in one registry of its own (several servers may share a process in tests)."""

    def __init__(self, usage: Path) -> None:
        self.registry = CollectorRegistry()
        self.usage = UsageCounters(usage)
        self.folder = FolderState()
        for collector in (self.usage, self.folder):
            self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._requests = Counter(
            "routheon_server_requests",
            "Requests routheon-server answered on its main port, per route and status",
            ("path", "code"),
            registry=self.registry,
        )
        self._durations = Histogram(
            "routheon_server_request_duration_seconds",
            "How long routheon-server took to answer, per route",
            ("path",),
            registry=self.registry,
        )

    def measure(self, app: web.Application) -> None:
        """Count ``app``'s requests; call before ``app`` starts (its middleware list is frozen then)."""

        @web.middleware
        async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else UNMATCHED_PATH
            started = time.perf_counter()
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # what the error middleware lets through (redirects)
                self._count(path, exc.status, started)
                raise
            self._count(path, response.status, started)
            return response

        app.middlewares.insert(0, measured)

    def _count(self, path: str, status: int, started: float) -> None:
        self._requests.labels(path, str(status)).inc()
        self._durations.labels(path).observe(time.perf_counter() - started)

    def app(self, main: web.Application) -> web.Application:
        """The application of the metrics port, ``GET /metrics`` alone, about ``main`` (once it has started)."""

        async def metrics(request: web.Request) -> web.Response:
            await asyncio.gather(self.usage.refresh(), self._look_at(main))
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    async def _look_at(self, main: web.Application) -> None:
        """The folder and the backends as /health and /v1/models see them now (both cached there)."""
        folder = await main[FOLDER].current()
        await main[CATALOG].snapshot()
        self.folder.update(folder, main[CATALOG])
