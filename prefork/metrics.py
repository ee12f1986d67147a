"""Prometheus metrics of a pool, read from its status snapshot at scrape time.

::

    Prometheus ──GET /metrics──▶ serve_metrics' server (wsgiref in a daemon thread)
                                   │ prometheus_client's make_wsgi_app(registry)
                                   ▼
                                 PoolCollector.collect()
                                   │ get_status()  ── once per pool per scrape
                                   ▼
                                 snapshot (prefork._status: Supervisor.status, or a control-socket client)
                                   │ metric_families()
                                   ▼
                                 counters, gauges, histograms, each labelled pool="<name>"

Nothing here runs per task: the pool keeps its totals anyway (``Tally``), and
the two time histograms only when asked (``sup.tally.timing = True``; without
it they are left out of the scrape).  A scrape costs one snapshot.

Needs the optional extra ``prefork[metrics]`` (``prometheus_client``); without
it, importing this module raises one ``ModuleNotFoundError`` saying so.

A scrape while the pool cannot be read (its control socket gone, say) is
answered ``503`` with one line, and logged once: Prometheus marks the target
down (``up == 0``) instead of keeping the last numbers.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prefork.errors import MissingExtra

try:
    from prometheus_client import make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingExtra(
        "prefork.metrics needs prometheus_client, which is not installed: pip install 'prefork[metrics]'",
        name="prometheus_client",
    ) from exc

from prefork._http_server import ServedHTTP
from prefork._status import EXIT_CAUSES, FAILURE_KINDS, STATUS_VERSION
from prefork._status_page import check_bind

__all__ = ["METRICS", "MetricsServer", "PoolCollector", "StatusSource", "metric_families", "serve_metrics"]

log = logging.getLogger("prefork.metrics")

#: what feeds the metrics: ``Supervisor.status`` in the pool's process, or a client of its control socket
StatusSource = Callable[[], Mapping[str, Any]]

#: worker states, as the snapshot names them (``keepalive``: a ``prefork serve`` child between two
#: requests of a kept-alive connection; always 0 in a task pool)
WORKER_STATES: Final = ("booting", "idle", "busy", "keepalive", "stopping")
#: states a snapshot of an older prefork (same version) may lack: read as 0
_LATER_STATES: Final = frozenset({"keepalive"})
#: pool states, as the snapshot names them
POOL_STATES: Final = ("running", "stopping", "stopped", "broken")

#: every metric: name -> (type, labels besides ``pool``, help).  Counters are named
#: here without ``_total``; the exposition adds it.
METRICS: Final[dict[str, tuple[str, tuple[str, ...], str]]] = {
    "prefork_tasks_submitted": ("counter", (), "Tasks submitted to the pool."),
    "prefork_tasks_completed": ("counter", (), "Tasks that returned a value."),
    "prefork_tasks_failed": (
        "counter", ("kind",),
        "Tasks that failed, by kind: error (the task raised), crash (its worker died), timeout, cancelled, shutdown.",
    ),
    "prefork_worker_exits": (
        "counter", ("cause",),
        "Workers that left, by cause (crash, boot-failure, timeout, max-tasks, max-age, max-rss, scaled-down, ...).",
    ),
    "prefork_workers_spawned": ("counter", (), "Workers forked since the pool started."),
    "prefork_tasks_taken_back": (
        "counter", (), "Long tasks taken back from a busy worker before it started them, for an idle one.",
    ),
    "prefork_workers": ("gauge", ("state",), "Workers now, by state: booting, idle, busy, keepalive (waiting on a kept-alive connection), stopping."),
    "prefork_workers_max": ("gauge", (), "The most workers the scaling policy may run."),
    "prefork_queue_depth": ("gauge", (), "Tasks waiting for a worker."),
    "prefork_tasks_in_flight": ("gauge", (), "Tasks handed to a worker and not finished."),
    "prefork_worker_rss_bytes": ("gauge", ("slot",), "Resident memory of the worker in each scoreboard slot."),
    "prefork_pool_state": ("gauge", ("state",), "1 for the pool's state (running, stopping, stopped, broken), 0 for the others."),
    "prefork_task_queue_wait_seconds": ("histogram", (), "Time from submit to a worker starting the task."),
    "prefork_task_run_seconds": ("histogram", (), "Time a worker ran a task, to its result or failure."),
}

#: snapshot ``timing`` entry -> histogram
_HISTOGRAMS: Final = {"queue_wait": "prefork_task_queue_wait_seconds", "run_time": "prefork_task_run_seconds"}


def _family(name: str) -> Metric:
    kind, labels, doc = METRICS[name]
    names = ["pool", *labels]
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=names)
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=names)
    return HistogramMetricFamily(name, doc, labels=names)


def _get(status: Mapping[str, Any], *path: str | int) -> Any:
    value: Any = status
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"status snapshot of pool {status.get('name')!r} lacks {_dotted(path)}") from None
    return value


def _number(status: Mapping[str, Any], *path: str | int) -> float:
    value = _get(status, *path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"status snapshot of pool {status.get('name')!r}: {_dotted(path)} = {value!r} is not a count")
    return float(value)


def _mapping(status: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    value = _get(status, *path)
    if not isinstance(value, Mapping):
        raise ValueError(f"status snapshot of pool {status.get('name')!r}: {_dotted(path)} is not a mapping")
    return value


def _list(status: Mapping[str, Any], *path: str) -> list[Any]:
    value = _get(status, *path)
    if not isinstance(value, list):
        raise ValueError(f"status snapshot of pool {status.get('name')!r}: {_dotted(path)} is not a list")
    return value


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(map(str, path))


def _le(bound: float) -> str:
    return repr(float(bound))


def _check(status: Mapping[str, Any]) -> str:
    """The pool's name, once the snapshot is one this module reads."""
    if not isinstance(status, Mapping):
        raise ValueError(f"a status snapshot must be a mapping, not {type(status).__name__}")
    if status.get("version") != STATUS_VERSION:
        raise ValueError(f"status snapshot of pool {status.get('name')!r} has version {status.get('version')!r}; "
                         f"prefork.metrics reads version {STATUS_VERSION}")
    name = status.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"status snapshot: name = {name!r} is not a pool name")
    return name


def metric_families(*snapshots: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one scrape: one family per metric, one series per
    pool (the ``pool`` label) and label value.  Raises ``ValueError`` naming the
    pool and the field if a snapshot is not one this module reads, or if two
    snapshots come from pools of the same name (their series would collide)."""
    families = {name: _family(name) for name in METRICS}
    seen: set[str] = set()
    for status in snapshots:
        pool = _check(status)
        if pool in seen:
            raise ValueError(f"two pools named {pool!r} in one scrape: give each pool its own name (config key 'name')")
        seen.add(pool)
        _add_pool(families, pool, status)
    return [f for f in families.values() if f.samples or not snapshots]


def _add_pool(families: dict[str, Metric], pool: str, status: Mapping[str, Any]) -> None:
    def add(name: str, labels: Sequence[str], value: float) -> None:
        families[name].add_metric([pool, *labels], value)  # type: ignore[attr-defined]

    totals = ("totals",)
    add("prefork_tasks_submitted", (), _number(status, *totals, "submitted"))
    add("prefork_tasks_completed", (), _number(status, *totals, "completed"))
    failed = _mapping(status, "totals", "failed")
    for kind in dict.fromkeys([*FAILURE_KINDS, *failed]):  # every kind, zeros included, so rate() sees the first one
        add("prefork_tasks_failed", (str(kind),), _number(status, *totals, "failed", kind) if kind in failed else 0.0)
    exits = _mapping(status, "totals", "exits")
    for cause in dict.fromkeys([*EXIT_CAUSES, *exits]):
        add("prefork_worker_exits", (str(cause),), _number(status, *totals, "exits", cause) if cause in exits else 0.0)
    add("prefork_workers_spawned", (), _number(status, *totals, "spawned"))
    # a status from an older prefork (over the control socket) has no taken_back: 0
    taken = "taken_back" in _mapping(status, "totals")
    add("prefork_tasks_taken_back", (), _number(status, *totals, "taken_back") if taken else 0.0)
    for state in WORKER_STATES:
        missing = state in _LATER_STATES and state not in _mapping(status, "totals")
        add("prefork_workers", (state,), 0.0 if missing else _number(status, *totals, state))
    add("prefork_workers_max", (), _number(status, "policy", "max_workers"))
    add("prefork_queue_depth", (), _number(status, *totals, "queued"))
    add("prefork_tasks_in_flight", (), _number(status, *totals, "in_flight"))
    for i, worker in enumerate(_list(status, "workers")):
        # by slot, not pid: slots are bounded by the pool's size, pids are not (a label per pid
        # would grow a series for every worker ever forked)
        if isinstance(worker, Mapping) and worker.get("rss") is not None:
            slot = int(_number(status, "workers", i, "slot"))
            add("prefork_worker_rss_bytes", (str(slot),), _number(status, "workers", i, "rss"))
    now = status.get("state")
    if now not in POOL_STATES:
        raise ValueError(f"status snapshot of pool {pool!r}: state = {now!r} is not one of {', '.join(POOL_STATES)}")
    for state in POOL_STATES:
        add("prefork_pool_state", (state,), 1.0 if state == now else 0.0)
    timing = status.get("timing")
    if timing is None:
        return  # the pool keeps no time histograms (tally.timing is off): none are exported
    for key, name in _HISTOGRAMS.items():
        bounds = [_number(status, "timing", key, "buckets", i) for i in range(len(_list(status, "timing", key, "buckets")))]
        counts = [_number(status, "timing", key, "counts", i) for i in range(len(_list(status, "timing", key, "counts")))]
        if len(counts) != len(bounds) + 1 or bounds != sorted(set(bounds)):
            raise ValueError(f"status snapshot of pool {pool!r}: timing.{key} needs increasing bucket bounds "
                             f"and one count more than bounds (the last, +Inf); it has {len(bounds)} and {len(counts)}")
        cumulative = list(itertools.accumulate(counts))  # Prometheus buckets count every value <= le
        buckets = [(_le(b), c) for b, c in zip(bounds, cumulative, strict=False)] + [("+Inf", cumulative[-1])]
        families[name].add_metric([pool], buckets, _number(status, "timing", key, "sum"))  # type: ignore[attr-defined]


class PoolCollector(Collector):
    """A prometheus_client collector of one or more pools: at each scrape it reads
    each pool's status once and turns it into metric families (see :data:`METRICS`).

    Register it in any registry (``prometheus_client.REGISTRY.register(PoolCollector(sup.status))``)
    or let :func:`serve_metrics` serve it.  Several pools in one process go into
    one collector (their ``name`` must differ): a registry refuses two collectors
    that export the same metric names."""

    def __init__(self, *sources: StatusSource) -> None:
        if not sources:
            raise TypeError("PoolCollector needs at least one status source (e.g. a Supervisor's status method)")
        for source in sources:
            if not callable(source):
                raise TypeError(f"PoolCollector: a status source must be callable, not {type(source).__name__}")
        self.sources: tuple[StatusSource, ...] = sources

    def describe(self) -> list[Metric]:
        """The families without samples: registering never calls a source."""
        return metric_families()

    def collect(self) -> list[Metric]:
        return metric_families(*(source() for source in self.sources))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    failing = False  #: the last scrape could not read a pool (the next failure is logged quietly)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


def _guarded(app: Callable[..., Iterable[bytes]], server: list[_Server]) -> Callable[..., Iterable[bytes]]:
    """``app``, answering 503 with one line when a scrape cannot read a pool."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            body = app(environ, start_response)
        except Exception as exc:
            (log.debug if server[0].failing else log.warning)("metrics: reading the pool's status failed: %r", exc)
            server[0].failing = True
            start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"reading the pool's status failed: {exc!r}\n".encode()]
        server[0].failing = False
        return body

    return guarded


class MetricsServer(ServedHTTP):
    """The metrics endpoint :func:`serve_metrics` started: ``url``, ``port``, ``close()``."""

    __slots__ = ("_registry", "collector")

    path = "/metrics"

    def __init__(self, addr: str, collector: PoolCollector, registry: CollectorRegistry, server: _Server) -> None:
        self.collector = collector
        self._registry = registry
        super().__init__(addr, server, "prefork-metrics")

    @property
    def addr(self) -> str:
        """The address it listens on."""
        return self.host

    def _closed(self) -> None:
        self._registry.unregister(self.collector)  # the collector leaves with the endpoint


def serve_metrics(get_status: StatusSource, port: int, addr: str = "127.0.0.1", *,
                  registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve the pool's metrics at ``http://addr:port/metrics`` from a daemon thread
    (prometheus_client's ``make_wsgi_app`` on the stdlib's wsgiref).  ``port`` 0
    picks a free port (see ``.port``).  ``addr`` is loopback unless you name
    another address.  With ``registry`` (e.g. ``prometheus_client.REGISTRY``, which
    holds the process metrics and your own) the pool's collector joins it and the
    whole registry is served; otherwise a registry of the pool's metrics alone."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_metrics: port = {port!r} must be an integer from 0 to 65535 (0: any free port)")
    check_bind(addr, "serve_metrics")
    bind = addr.strip("[]")
    collector = PoolCollector(get_status)
    target = registry if registry is not None else CollectorRegistry(auto_describe=True)
    target.register(collector)
    holder: list[_Server] = []

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

    try:
        server = make_server(bind, port, _guarded(make_wsgi_app(target), holder), Server, _Quiet)
    except OSError as exc:
        target.unregister(collector)
        raise OSError(exc.errno, f"serve_metrics: cannot listen on {addr}:{port}: {exc.strerror or exc}") from exc
    holder.append(server)
    handle = MetricsServer(bind, collector, target, server)
    log.info("metrics served at %s", handle.url)
    return handle
