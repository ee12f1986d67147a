"""``prefork simulate``: run a scaling policy on a fake clock against an arrival
trace, forking nothing, and report what it would do.

The policy is driven by the supervisor's own :class:`prefork._scaler.Scaler`
and shown the same :class:`prefork._workers.Census`, so what it does here is
what it does in a running pool.  The loop below is the supervisor's loop pass
with the I/O replaced by a heap of timed events::

    heap of events                      one pass at each instant t (the supervisor's loop pass)
    ──────────────                      ──────────────────────────────────────────────────────
    arrivals (the trace, in order) ──►  1. apply what happened at t: tasks arrive (queue, FIFO),
    boot done    (fork + boot_time) ──►     booted workers become idle, finished tasks free their worker
    task done    (start + service)  ──►  2. dispatch: the head of the queue to an idle worker, one task
    policy tick  (scaler.next_tick) ──►     per worker, oldest worker first (the supervisor's order)
                                         3. if scaler.due(t, queued): census -> scaler.tick -> Step:
                                            fork step.spawn workers (each boots for boot_time),
                                            retire the step.retire longest-idle idle workers at once

Events at one instant are one pass, as when the supervisor's ``select`` returns
several at once.  Not modelled: batching (several short tasks per worker),
boot failures and their backoff, worker deaths, recycling, and the MPM's one
fork per tick.

Public: :func:`simulate`, :class:`Trace` (:meth:`Trace.from_csv`,
:meth:`Trace.poisson`, :meth:`Trace.diurnal`, :meth:`Trace.from_rows`),
:class:`Service`, :class:`Burst`, :class:`SimulationResult`,
:func:`load_policy`, and the command line: :func:`build_parser`,
:func:`add_arguments`, :func:`run`, :func:`main` (``prefork simulate ARGS`` is
``main(ARGS)``).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import os
import random
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs

from prefork._scaler import Scaler
from prefork._workers import Census
from prefork.config import Config, load_config
from prefork.errors import ConfigError, PluginError
from prefork.strategies.scaling import ScalingPolicy

__all__ = [
    "Burst",
    "BurstOutcome",
    "Series",
    "Service",
    "SimulationResult",
    "Trace",
    "add_arguments",
    "build_parser",
    "load_policy",
    "main",
    "run",
    "simulate",
]

#: What ``--chart`` says when matplotlib is missing.
NO_MATPLOTLIB: Final = "--chart needs matplotlib, which is not installed: pip install 'prefork[simulate]'"

_BOOTING: Final = 0
_IDLE: Final = 1
_BUSY: Final = 2
_GONE: Final = 3
_COLUMNS: Final = ("arrival", "service")
#: The shortest time between two passes of the loop (a real pass takes longer).  A policy that
#: asks to be asked again at once is asked after this, as the supervisor's clock moves on too.
_PASS: Final = 1e-6


def _finite_ge0(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _check(ok: bool, what: str, value: object, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{what} = {value!r}: {reason}")


# -- traces -----------------------------------------------------------------------------------


@attrs.frozen
class Service:
    """How long a synthetic task runs: ``constant`` seconds, or ``exponential`` with that mean."""

    kind: Literal["constant", "exponential"]
    mean: float  #: seconds

    def __attrs_post_init__(self) -> None:
        _check(self.kind in ("constant", "exponential"), "service kind", self.kind, "must be 'constant' or 'exponential'")
        _check(_finite_ge0(self.mean), "service time", self.mean, "must be a finite number of seconds >= 0")

    @classmethod
    def constant(cls, seconds: float) -> Service:
        return cls("constant", seconds)

    @classmethod
    def exponential(cls, mean: float) -> Service:
        return cls("exponential", mean)

    @classmethod
    def parse(cls, text: str) -> Service:
        """``0.2`` or ``const:0.2`` (constant), ``exp:0.2`` (exponential, mean 0.2 s)."""
        kind, _, number = text.strip().rpartition(":")
        kinds = {"": "constant", "const": "constant", "constant": "constant", "exp": "exponential", "exponential": "exponential"}
        if kind not in kinds:
            raise ConfigError(f"--service {text!r}: expected SECONDS, const:SECONDS or exp:MEAN, for example exp:0.1")
        try:
            seconds = float(number)
        except ValueError:
            raise ConfigError(f"--service {text!r}: {number!r} is not a number of seconds") from None
        if not _finite_ge0(seconds):
            raise ConfigError(f"--service {text!r}: the time must be a finite number of seconds >= 0")
        return cls(kinds[kind], seconds)  # type: ignore[arg-type]

    def draw(self, rng: random.Random) -> float:
        if self.kind == "constant" or self.mean == 0:
            return self.mean
        return rng.expovariate(1.0 / self.mean)

    def __str__(self) -> str:
        return f"{'exp' if self.kind == 'exponential' else 'const'}:{self.mean:g}"


@attrs.frozen
class Burst:
    """``tasks`` tasks arriving at once at ``at`` seconds."""

    at: float
    tasks: int

    def __attrs_post_init__(self) -> None:
        _check(_finite_ge0(self.at), "burst time", self.at, "must be a finite number of seconds >= 0")
        _check(isinstance(self.tasks, int) and not isinstance(self.tasks, bool) and self.tasks >= 1,
               "burst size", self.tasks, "must be an integer >= 1")

    @classmethod
    def parse(cls, text: str) -> Burst:
        """``AT:N``: N tasks at AT seconds."""
        at, _, n = text.partition(":")
        try:
            at_s, tasks = float(at), int(n)
        except ValueError:
            raise ConfigError(f"--burst {text!r}: expected AT:N (N tasks arriving at once at AT seconds), for example 10:50") from None
        try:
            return cls(at_s, tasks)
        except ConfigError as exc:
            raise ConfigError(f"--burst {text!r}: {exc}") from None


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


def _burst_tuple(values: Iterable[Burst]) -> tuple[Burst, ...]:
    return tuple(values)


def _check_trace(instance: Trace, attribute: Any, value: Any) -> None:
    arrivals, services = instance.arrivals, instance.services
    if len(arrivals) != len(services):
        raise ConfigError(f"trace {instance.source}: {len(arrivals)} arrival times but {len(services)} service times")
    previous = 0.0
    for i, (a, s) in enumerate(zip(arrivals, services, strict=True)):
        _check(_finite_ge0(a), f"trace {instance.source}: task {i} arrival", a, "must be a finite number of seconds >= 0")
        _check(_finite_ge0(s), f"trace {instance.source}: task {i} service", s, "must be a finite number of seconds >= 0")
        _check(a >= previous, f"trace {instance.source}: task {i} arrival", a, "arrivals must be in order")
        previous = a


@attrs.frozen
class Trace:
    """Tasks to simulate: task ``i`` arrives ``arrivals[i]`` seconds after the pool
    starts and runs ``services[i]`` seconds.  ``duration`` is how long the trace
    lasts (the simulation runs at least that long); each of ``bursts`` is reported
    on (the time the pool takes to absorb it).  Build one with the classmethods."""

    arrivals: tuple[float, ...] = attrs.field(converter=_floats, validator=_check_trace)
    services: tuple[float, ...] = attrs.field(converter=_floats)
    duration: float
    bursts: tuple[Burst, ...] = attrs.field(default=(), converter=_burst_tuple)
    source: str = "trace"  #: where it came from, for the report

    def __attrs_post_init__(self) -> None:
        _check(_finite_ge0(self.duration), f"trace {self.source}: duration", self.duration,
               "must be a finite number of seconds >= 0")

    def __len__(self) -> int:
        return len(self.arrivals)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, float]], *, duration: float | None = None,
                  bursts: Iterable[Burst] = (), source: str = "rows") -> Trace:
        """From ``(arrival, service)`` pairs in any order (sorted by arrival, stable);
        ``duration`` defaults to the last arrival."""
        pairs = sorted(((float(a), float(s)) for a, s in rows), key=lambda p: p[0])
        if duration is None:
            duration = pairs[-1][0] if pairs else 0.0
        return cls(tuple(a for a, _ in pairs), tuple(s for _, s in pairs), duration, tuple(bursts), source)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str], *, burst_min: int = 2) -> Trace:
        """Read ``arrival,service`` rows (seconds from the pool's start; the header line
        ``arrival,service`` is optional; blank lines are skipped; rows may come in any
        order).  An instant at which ``burst_min`` or more tasks arrive is a burst.  A bad
        row raises a :class:`ConfigError` naming the file, line and column."""
        name = os.fsdecode(path)
        _check(isinstance(burst_min, int) and burst_min >= 2, "burst_min", burst_min, "must be an integer >= 2")
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read the trace: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        rows: list[tuple[float, float]] = []
        reader = csv.reader(text.splitlines(), strict=True)
        first = True
        try:
            for fields in reader:
                line = reader.line_num
                if all(not f.strip() for f in fields):
                    continue
                if len(fields) != 2:
                    raise ConfigError(f"{name}:{line}: column {min(len(fields) + 1, 3)}: expected 2 columns, "
                                      f"arrival,service (seconds); this row has {len(fields)}")
                if first and not _is_number(fields[0]):
                    first = False
                    header = [f.strip().lower() for f in fields]
                    for col, (got, want) in enumerate(zip(header, _COLUMNS, strict=True), 1):
                        if got != want:
                            raise ConfigError(f"{name}:{line}: column {col}: {fields[col - 1].strip()!r}: "
                                              "expected a number, or the header arrival,service")
                    continue
                first = False
                values = []
                for col, (field, what) in enumerate(zip(fields, _COLUMNS, strict=True), 1):
                    try:
                        value = float(field)
                    except ValueError:
                        raise ConfigError(f"{name}:{line}: column {col} ({what}): {field.strip()!r} is not a number") from None
                    if not _finite_ge0(value):
                        raise ConfigError(f"{name}:{line}: column {col} ({what}): {field.strip()!r}: "
                                          "must be a finite number of seconds >= 0")
                    values.append(value)
                rows.append((values[0], values[1]))
        except csv.Error as exc:
            raise ConfigError(f"{name}:{reader.line_num}: not valid CSV: {exc}") from None
        trace = cls.from_rows(rows, source=name)
        return attrs.evolve(trace, bursts=_bursts_in(trace.arrivals, burst_min))

    @classmethod
    def poisson(cls, rate: float, duration: float, service: Service, *, seed: int = 0,
                bursts: Iterable[Burst] = ()) -> Trace:
        """Arrivals at ``rate`` per second (a Poisson process) for ``duration`` seconds,
        plus ``bursts``; services drawn from ``service``.  Same seed, same trace."""
        _check(_finite_ge0(rate), "rate", rate, "must be a finite number of tasks per second >= 0")
        _check(_finite_ge0(duration) and duration > 0, "duration", duration, "must be a finite number of seconds > 0")
        rng = random.Random(seed)
        times: list[float] = []
        t = 0.0
        if rate > 0:
            while True:
                t += rng.expovariate(rate)
                if t >= duration:
                    break
                times.append(t)
        base = f"poisson {rate:g}/s" if rate > 0 else "no base rate"
        source = f"{base} for {duration:g} s, service {service}, seed {seed}"
        return cls._build(times, service, rng, tuple(bursts), duration, source)

    @classmethod
    def diurnal(cls, mean_rate: float, period: float, duration: float, service: Service, *, amplitude: float = 0.8,
                seed: int = 0, bursts: Iterable[Burst] = ()) -> Trace:
        """Arrivals whose rate swings as a sine around ``mean_rate`` per second:
        ``mean_rate * (1 + amplitude * sin(2 pi t / period))``, lowest at ``0.75 * period``
        and highest at ``0.25 * period``; plus ``bursts``."""
        _check(_finite_ge0(mean_rate), "rate", mean_rate, "must be a finite number of tasks per second >= 0")
        _check(_finite_ge0(period) and period > 0, "period", period, "must be a finite number of seconds > 0")
        _check(_finite_ge0(duration) and duration > 0, "duration", duration, "must be a finite number of seconds > 0")
        _check(_finite_ge0(amplitude) and amplitude <= 1, "amplitude", amplitude, "must be between 0 and 1")
        rng = random.Random(seed)
        times: list[float] = []
        peak = mean_rate * (1 + amplitude)
        t = 0.0
        if peak > 0:
            while True:  # thinning: candidates at the peak rate, each kept with probability rate(t) / peak
                t += rng.expovariate(peak)
                if t >= duration:
                    break
                if rng.random() * peak < mean_rate * (1 + amplitude * math.sin(2 * math.pi * t / period)):
                    times.append(t)
        source = (f"diurnal {mean_rate:g}/s +-{amplitude:g} over {period:g} s for {duration:g} s, "
                  f"service {service}, seed {seed}")
        return cls._build(times, service, rng, tuple(bursts), duration, source)

    @classmethod
    def _build(cls, times: list[float], service: Service, rng: random.Random, bursts: tuple[Burst, ...],
               duration: float, source: str) -> Trace:
        for b in bursts:
            _check(b.at <= duration, "burst time", b.at, f"is past the trace's duration ({duration:g} s)")
        rows = [(t, service.draw(rng)) for t in times]
        for b in bursts:
            rows.extend((b.at, service.draw(rng)) for _ in range(b.tasks))
        if bursts:
            source += ", bursts " + " ".join(f"{b.tasks}@{b.at:g}s" for b in bursts)
        return cls.from_rows(rows, duration=duration, bursts=sorted(bursts, key=lambda b: b.at), source=source)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bursts_in(arrivals: Sequence[float], minimum: int) -> tuple[Burst, ...]:
    found: list[Burst] = []
    i = 0
    while i < len(arrivals):
        j = i
        while j < len(arrivals) and arrivals[j] == arrivals[i]:
            j += 1
        if j - i >= minimum:
            found.append(Burst(arrivals[i], j - i))
        i = j
    return tuple(found)


# -- results ----------------------------------------------------------------------------------


@attrs.frozen
class BurstOutcome:
    at: float  #: when the burst arrived
    tasks: int  #: how many tasks arrived at once
    absorbed_after: float | None  #: seconds until the queue was empty again (None: not by the end)


@attrs.frozen
class Series:
    """The pool after each pass that changed it: from ``times[i]`` on, ``workers[i]``
    workers were alive (booting, idle or busy), ``busy[i]`` busy, ``queued[i]`` tasks waiting."""

    times: tuple[float, ...]
    workers: tuple[int, ...]
    busy: tuple[int, ...]
    queued: tuple[int, ...]


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@attrs.frozen
class SimulationResult:
    """What the policy did with the trace.  Times are seconds from the pool's start."""

    policy: ScalingPolicy = attrs.field(repr=False)
    trace: Trace = attrs.field(repr=False)
    boot_time: float
    end: float  #: when the simulation stopped: the last task done, and not before ``until``
    started: tuple[float, ...] = attrs.field(repr=False)  #: per task (trace order); NaN: never started
    finished: tuple[float, ...] = attrs.field(repr=False)  #: per task; NaN: never finished
    busy_worker_seconds: float
    idle_worker_seconds: float
    booting_worker_seconds: float
    fork_times: tuple[float, ...] = attrs.field(repr=False)  #: one entry per fork
    retire_times: tuple[float, ...] = attrs.field(repr=False)  #: one entry per retirement
    peak_workers: int
    peak_queue: int  #: tasks waiting after a pass's dispatch
    bursts: tuple[BurstOutcome, ...]
    series: Series = attrs.field(repr=False)
    stalled_at: float | None = None  #: tasks waited with no worker to come; the simulation gave up here

    @property
    def tasks(self) -> int:
        return len(self.started)

    @property
    def unfinished(self) -> int:
        return sum(1 for f in self.finished if f != f)

    @property
    def waits(self) -> tuple[float, ...]:
        """Queue wait of each task that started (arrival to start), in trace order."""
        return tuple(s - a for s, a in zip(self.started, self.trace.arrivals, strict=True) if s == s)

    @property
    def forks(self) -> int:
        return len(self.fork_times)

    @property
    def retirements(self) -> int:
        return len(self.retire_times)

    def wait_stats(self) -> dict[str, float]:
        waits = sorted(self.waits)
        return {
            "p50": _percentile(waits, 0.50),
            "p99": _percentile(waits, 0.99),
            "max": waits[-1] if waits else 0.0,
            "mean": math.fsum(waits) / len(waits) if waits else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        """The summary as plain data (``--json``); seconds everywhere, to the microsecond."""
        data: dict[str, Any] = _rounded({
            "policy": {"name": _policy_name(self.policy), "options": _policy_options(self.policy)},
            "trace": {"source": self.trace.source, "tasks": self.tasks, "duration": self.trace.duration},
            "boot_time": self.boot_time,
            "end": self.end,
            "tasks": self.tasks,
            "finished": self.tasks - self.unfinished,
            "unfinished": self.unfinished,
            "stalled_at": self.stalled_at,
            "queue_wait": self.wait_stats(),
            "bursts": [attrs.asdict(b) for b in self.bursts],
            "worker_seconds": {
                "busy": self.busy_worker_seconds,
                "idle": self.idle_worker_seconds,
                "booting": self.booting_worker_seconds,
            },
            "forks": self.forks,
            "retirements": self.retirements,
            "peak_workers": self.peak_workers,
            "peak_queue": self.peak_queue,
        })
        return data

    def summary(self, max_bursts: int = 10) -> str:
        """The text report ``prefork simulate`` prints."""
        w = self.wait_stats()
        options = _policy_options(self.policy)
        lines = [
            f"policy        {_policy_name(self.policy)}"
            + (f" ({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else ""),
            f"trace         {self.trace.source}: {self.tasks} tasks over {_s(self.trace.duration)}; "
            f"boot time {_s(self.boot_time)}",
            f"tasks         {self.tasks - self.unfinished} finished by {_s(self.end)}",
        ]
        if self.unfinished:
            lines.append(f"UNFINISHED    {self.unfinished} tasks: no worker came for them"
                         + (f" (stalled from {_s(self.stalled_at)}, with no worker busy or booting)"
                            if self.stalled_at is not None else ""))
        lines.append(f"queue wait    p50 {_s(w['p50'])}, p99 {_s(w['p99'])}, max {_s(w['max'])}, mean {_s(w['mean'])}")
        for b in self.bursts[:max_bursts]:
            after = f"queue empty again after {_s(b.absorbed_after)}" if b.absorbed_after is not None else "never absorbed"
            lines.append(f"burst         at {_s(b.at)}, {b.tasks} tasks: {after}")
        if len(self.bursts) > max_bursts:
            lines.append(f"burst         ... and {len(self.bursts) - max_bursts} more (see --json)")
        total = self.busy_worker_seconds + self.idle_worker_seconds + self.booting_worker_seconds
        idle_share = f" ({self.idle_worker_seconds / total:.0%} of worker time idle)" if total > 0 else ""
        lines += [
            f"worker-s      busy {self.busy_worker_seconds:.3f}, idle {self.idle_worker_seconds:.3f}, "
            f"booting {self.booting_worker_seconds:.3f}{idle_share}",
            f"workers       peak {self.peak_workers}; {self.forks} forks, {self.retirements} retirements",
            f"queue         peak {self.peak_queue} tasks",
        ]
        return "\n".join(lines) + "\n"

    def chart(self, path: str | os.PathLike[str]) -> None:
        """Draw workers, busy workers and the queue over time as a PNG (needs matplotlib,
        the ``prefork[simulate]`` extra; drawn with the Agg backend, no display used)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ConfigError(NO_MATPLOTLIB) from None
        s = self.series
        times = [*s.times, self.end]
        fig = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)  # Agg, on this figure only: the process's pyplot backend is left alone
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        top.stairs(s.workers, times, label="workers (booting, idle, busy)", color="tab:blue", linewidth=1.5)
        top.stairs(s.busy, times, label="busy workers", color="tab:orange", fill=True, alpha=0.5)
        top.set_ylabel("workers")
        top.legend(loc="upper left")
        bottom.stairs(s.queued, times, label="tasks waiting", color="tab:red", fill=True, alpha=0.5)
        bottom.set_ylabel("queue")
        bottom.set_xlabel("seconds since the pool started")
        bottom.legend(loc="upper left")
        for axes in (top, bottom):
            for b in self.bursts:
                axes.axvline(b.at, color="grey", linestyle="--", linewidth=0.8)
            axes.set_ylim(bottom=0)
            axes.grid(alpha=0.3)
        bottom.set_xlim(0, max(self.end, 1e-9))
        fig.suptitle(f"{_policy_name(self.policy)}: {self.trace.source}", fontsize=10)
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            raise ConfigError(f"--chart {os.fsdecode(path)}: cannot write it: {exc.strerror or exc}") from None


def _rounded(data: Any) -> Any:
    if isinstance(data, float):
        return round(data, 6) if math.isfinite(data) else data
    if isinstance(data, dict):
        return {key: _rounded(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_rounded(value) for value in data]
    return data


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3g} s" if abs(seconds) < 1000 else f"{seconds:.0f} s"


def _policy_name(policy: ScalingPolicy) -> str:
    return str(getattr(policy, "name", type(policy).__qualname__))


def _policy_options(policy: ScalingPolicy) -> dict[str, Any]:
    cls: Any = type(policy)
    if not attrs.has(cls):
        return {}
    return {f.name: getattr(policy, f.name) for f in attrs.fields(cls) if f.init}


# -- the policy -------------------------------------------------------------------------------


def load_policy(policy: ScalingPolicy | type | str | Mapping[str, Any] | Config) -> ScalingPolicy:
    """A scaling policy as a config names it: a registered name (``"spare"``), an import
    path (``"myapp.policies:MyPolicy"``), a ``[scaling]`` table (``{"name": "spare",
    "min_spare": 3}``), a class, a :class:`Config` (its ``[scaling]``), or an instance
    (used as it is).  Built through :func:`prefork.config.load_config`, with its checks."""
    if isinstance(policy, Config):
        found: Any = policy.create("scaling")
    elif isinstance(policy, (str, type)):
        found = load_config(None, {"scaling": policy}).create("scaling")
    elif isinstance(policy, Mapping):
        if "name" not in policy:
            raise ConfigError(f"scaling = {dict(policy)!r}: a [scaling] table needs a name, for example name = \"spare\"")
        found = load_config(None, {"scaling": dict(policy)}).create("scaling")
    else:
        found = policy
    if not isinstance(found, ScalingPolicy):
        raise ConfigError(f"{found!r} is not a scaling policy: it needs name, max_workers() and decide(stats)")
    return found


# -- the simulation ---------------------------------------------------------------------------


class _Worker:
    __slots__ = ("serial", "state", "stint")

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.state = _BOOTING
        self.stint = 0  #: bumped whenever it stops being idle: heap entries of an older stint are stale


def simulate(
    policy: ScalingPolicy | type | str | Mapping[str, Any] | Config,
    trace: Trace,
    *,
    boot_time: float = 0.05,
    until: float | None = None,
    stall_limit: float = 600.0,
) -> SimulationResult:
    """Run ``policy`` (anything :func:`load_policy` takes) against ``trace`` on a fake clock.

    Workers take ``boot_time`` seconds from fork to idle.  The simulation runs until
    every task is done and at least ``until`` seconds (default: the trace's
    duration).  If tasks wait while no worker is busy or booting for ``stall_limit``
    seconds (a policy that never forks for them), it stops and reports them unfinished.
    """
    scaling = load_policy(policy)
    _check(_finite_ge0(boot_time), "boot_time", boot_time, "must be a finite number of seconds >= 0")
    horizon = trace.duration if until is None else until
    _check(_finite_ge0(horizon), "until", horizon, "must be a finite number of seconds >= 0")
    _check(_finite_ge0(stall_limit) and stall_limit > 0, "stall_limit", stall_limit, "must be a finite number of seconds > 0")
    scaler = Scaler(scaling)
    max_workers = scaler.max_workers
    if max_workers < 1:
        raise ConfigError(f"scaling policy {_policy_name(scaling)!r}: max_workers() = {max_workers}: the pool would run "
                          "every task in the caller; there is nothing to simulate")

    arrivals, services = trace.arrivals, trace.services
    n = len(arrivals)
    nan = math.nan
    started = [nan] * n
    finished = [nan] * n
    queue: deque[int] = deque()
    events: list[tuple[float, int, _Worker, int]] = []  # (time, seq, worker, task or -1: its boot is done)
    seq = 0
    by_serial: list[tuple[int, int, _Worker]] = []  # idle workers, oldest first (the dispatch order)
    by_idle: list[tuple[float, int, int, _Worker]] = []  # idle workers, longest idle first (retired first)
    serials = 0
    booting = idle = busy = 0
    done = 0
    nxt = 0  # the next arrival
    busy_ws = idle_ws = boot_ws = 0.0
    fork_times: list[float] = []
    retire_times: list[float] = []
    peak_workers = peak_queue = 0
    s_times = array("d")
    s_workers = array("l")
    s_busy = array("l")
    s_queued = array("l")
    last = (-1, -1, -1)
    bursts = trace.bursts
    absorbed: list[float | None] = [None] * len(bursts)
    bursts_seen = bursts_done = 0
    at_once_limit = 1000 + 10 * max_workers
    at_once = 0  # passes in a row after which the policy asked to be asked again at once
    stall_from: float | None = None
    stalled_at: float | None = None
    inf = math.inf
    heappush, heappop = heapq.heappush, heapq.heappop

    t = 0.0
    first = True
    while True:
        # -- when is the next pass: an arrival, an event, or the policy's tick (never sooner than one pass)
        t_next = min(
            arrivals[nxt] if nxt < n else inf,
            events[0][0] if events else inf,
            scaler.next_tick if first else max(scaler.next_tick, t + _PASS),
        )
        first = False
        if done == n and nxt == n and t_next > horizon:
            break  # everything done, and the time asked for has passed
        if stall_from is not None and t_next - stall_from > stall_limit:
            stalled_at = stall_from
            break
        dt = t_next - t
        busy_ws += busy * dt
        idle_ws += idle * dt
        boot_ws += booting * dt
        t = t_next

        # -- 1. what happened at t
        while nxt < n and arrivals[nxt] <= t:
            queue.append(nxt)
            nxt += 1
        while events and events[0][0] <= t:
            _, _, w, task = heappop(events)
            if task < 0:  # booted: READY
                booting -= 1
                scaler.booted()
            else:  # its task is done
                if finished[task] == finished[task]:  # not NaN: an invariant the tests check
                    raise AssertionError(f"prefork simulate: task {task} finished twice (a bug)")
                finished[task] = t
                done += 1
                busy -= 1
            w.state = _IDLE
            idle += 1
            heappush(by_serial, (w.serial, w.stint, w))
            heappush(by_idle, (t, w.serial, w.stint, w))
        while bursts_seen < len(bursts) and bursts[bursts_seen].at <= t:
            bursts_seen += 1

        # -- 2. dispatch: one task per idle worker, the oldest worker first
        while queue and idle:
            _, stint, w = heappop(by_serial)
            if w.state != _IDLE or stint != w.stint:
                continue  # stale: it was given a task or retired since
            task = queue.popleft()
            started[task] = t
            w.state = _BUSY
            w.stint += 1
            idle -= 1
            busy += 1
            seq += 1
            heappush(events, (t + services[task], seq, w, task))

        # -- 3. scaling, as the supervisor's scaling step
        if scaler.due(t, len(queue)):
            longest = 0.0
            if idle:
                while by_idle[0][3].state != _IDLE or by_idle[0][2] != by_idle[0][3].stint:
                    heappop(by_idle)
                longest = t - by_idle[0][0]
            alive = booting + idle + busy
            try:
                step = scaler.tick(t, Census(alive, booting, idle, busy, 0, longest), len(queue))
            except Exception as exc:
                exc.add_note(f"prefork simulate: the scaling policy {_policy_name(scaling)!r} failed at {t:g} s")
                raise
            for _ in range(step.spawn):
                scaler.spawned(t)
                serials += 1
                w = _Worker(serials)
                booting += 1
                seq += 1
                heappush(events, (t + boot_time, seq, w, -1))
                fork_times.append(t)
            for _ in range(min(step.retire, idle)):
                while True:
                    _, _, stint, w = heappop(by_idle)
                    if w.state == _IDLE and stint == w.stint:
                        break
                w.state = _GONE
                w.stint += 1
                idle -= 1
                retire_times.append(t)

        if len(by_idle) > 64 + 4 * idle:  # mostly stale entries (workers that got a task since): drop them
            by_idle = [e for e in by_idle if e[3].state == _IDLE and e[2] == e[3].stint]
            heapq.heapify(by_idle)

        # -- what the pass left
        queued = len(queue)
        alive = booting + idle + busy
        if alive > peak_workers:
            peak_workers = alive
        if queued > peak_queue:
            peak_queue = queued
        if not queued and bursts_done < bursts_seen:
            for i in range(bursts_done, bursts_seen):
                absorbed[i] = t - bursts[i].at
            bursts_done = bursts_seen
        now_state = (alive, busy, queued)
        if now_state != last:
            last = now_state
            if s_times and s_times[-1] == t:  # a second pass at one instant: keep what it left
                s_workers[-1], s_busy[-1], s_queued[-1] = now_state
            else:
                s_times.append(t)
                s_workers.append(alive)
                s_busy.append(busy)
                s_queued.append(queued)
        if scaler.next_tick <= t:
            at_once += 1
            if at_once > at_once_limit:
                raise ConfigError(
                    f"scaling policy {_policy_name(scaling)!r}: asked to be asked again at once after "
                    f"{at_once_limit} passes in a row, at {t:g} s (does decide() return next_tick = 0 "
                    "every time?); a pool's loop would spin"
                )
        else:
            at_once = 0
        if queued and not busy and not booting:
            if stall_from is None:
                stall_from = t
        else:
            stall_from = None

    end = max(t, horizon) if stalled_at is None else t
    if end > t:
        busy_ws += busy * (end - t)
        idle_ws += idle * (end - t)
        boot_ws += booting * (end - t)
    return SimulationResult(
        policy=scaling,
        trace=trace,
        boot_time=boot_time,
        end=end,
        started=tuple(started),
        finished=tuple(finished),
        busy_worker_seconds=busy_ws,
        idle_worker_seconds=idle_ws,
        booting_worker_seconds=boot_ws,
        fork_times=tuple(fork_times),
        retire_times=tuple(retire_times),
        peak_workers=peak_workers,
        peak_queue=peak_queue,
        bursts=tuple(BurstOutcome(b.at, b.tasks, a) for b, a in zip(bursts, absorbed, strict=True)),
        series=Series(tuple(s_times), tuple(s_workers), tuple(s_busy), tuple(s_queued)),
        stalled_at=stalled_at,
    )


# -- the command line -------------------------------------------------------------------------


_SYNTHETIC_ONLY: Final = ("service", "duration", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``prefork simulate``'s options, added to ``parser`` (cli.py's subcommand, or :func:`build_parser`)."""
    policy = parser.add_argument_group("the policy (as in prefork.toml's [scaling])")
    policy.add_argument("-c", "--config", help="path to a prefork.toml whose [scaling] to simulate "
                        "(default: ./prefork.toml if present)")
    policy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set scaling.min_spare=3 (repeatable)")
    policy.add_argument("--policy", metavar="NAME", help="the scaling policy: a registered name (fixed, on-demand, "
                        "spare...) or an import path module:Class; same as --set scaling.name=NAME")
    trace = parser.add_argument_group("the trace (one of)")
    trace.add_argument("--trace", metavar="FILE.csv", help="a CSV of arrival,service rows (seconds)")
    trace.add_argument("--poisson", type=float, metavar="RATE", help="Poisson arrivals, RATE tasks per second")
    trace.add_argument("--diurnal", type=float, metavar="RATE", help="arrivals whose rate swings as a sine around RATE "
                       "tasks per second (see --period, --amplitude)")
    trace.add_argument("--burst", action="append", default=[], metavar="AT:N",
                       help="N tasks arriving at once at AT seconds (repeatable; on top of --poisson or --diurnal)")
    trace.add_argument("--burst-min", type=int, metavar="N",
                       help="--trace: N or more tasks arriving at one instant are a burst (default 2)")
    synthetic = parser.add_argument_group("synthetic traces")
    synthetic.add_argument("--service", metavar="[exp:|const:]SECONDS",
                           help="service time: exp:MEAN (exponential) or const:SECONDS (default exp:0.1)")
    synthetic.add_argument("--duration", type=float, metavar="SECONDS", help="how long arrivals come (default 60)")
    synthetic.add_argument("--period", type=float, metavar="SECONDS", help="--diurnal: one swing of the rate (default: --duration)")
    synthetic.add_argument("--amplitude", type=float, metavar="A", help="--diurnal: the swing, 0 to 1 (default 0.8)")
    synthetic.add_argument("--seed", type=int, metavar="N", help="random seed; same seed, same trace (default 0)")
    run_group = parser.add_argument_group("the run")
    run_group.add_argument("--boot-time", type=float, default=0.05, metavar="SECONDS",
                           help="seconds from fork to a worker ready for tasks (default 0.05)")
    run_group.add_argument("--until", type=float, metavar="SECONDS",
                           help="simulate at least this long (default: the trace's duration)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--chart", metavar="FILE.png", help="draw workers, busy workers and the queue over time "
                     "(needs matplotlib: pip install 'prefork[simulate]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefork simulate",
        description="Run a scaling policy on a fake clock against an arrival trace, forking nothing, "
                    "and report what it would do.",
    )
    add_arguments(parser)
    return parser


def _number(option: str, value: float | None, *, positive: bool = False) -> None:
    if value is not None and not (_finite_ge0(value) and (value > 0 or not positive)):
        raise ConfigError(f"{option} {value!r}: must be a finite number {'> 0' if positive else '>= 0'}")


def _trace_from(args: argparse.Namespace) -> Trace:
    given = [opt for opt, value in (("--trace", args.trace), ("--poisson", args.poisson), ("--diurnal", args.diurnal))
             if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: give one trace")
    if not given and not args.burst:
        raise ConfigError("no trace: give --trace FILE.csv, --poisson RATE, --diurnal RATE or --burst AT:N")
    if args.diurnal is None:
        for option in ("period", "amplitude"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} {getattr(args, option)!r}: applies to --diurnal only")
    if args.trace is not None:
        for option in (*_SYNTHETIC_ONLY, "burst"):
            if getattr(args, option) not in (None, []):
                raise ConfigError(f"--{option}: applies to synthetic traces, not to --trace {args.trace} "
                                  "(its rows give every arrival and service time)")
        if args.burst_min is not None and args.burst_min < 2:
            raise ConfigError(f"--burst-min {args.burst_min}: must be >= 2")
        return Trace.from_csv(args.trace, burst_min=2 if args.burst_min is None else args.burst_min)
    if args.burst_min is not None:
        raise ConfigError(f"--burst-min {args.burst_min}: applies to --trace only (synthetic bursts are given with --burst)")
    _number("--poisson", args.poisson)
    _number("--diurnal", args.diurnal)
    _number("--duration", args.duration, positive=True)
    _number("--period", args.period, positive=True)
    if args.amplitude is not None and not (_finite_ge0(args.amplitude) and args.amplitude <= 1):
        raise ConfigError(f"--amplitude {args.amplitude!r}: must be between 0 and 1")
    service = Service.parse(args.service) if args.service is not None else Service.exponential(0.1)
    bursts = [Burst.parse(text) for text in args.burst]
    duration = 60.0 if args.duration is None else args.duration
    for b, text in zip(bursts, args.burst, strict=True):
        if b.at > duration:
            raise ConfigError(f"--burst {text}: at {b.at:g} s, past the trace's duration ({duration:g} s; see --duration)")
    seed = 0 if args.seed is None else args.seed
    if args.diurnal is not None:
        return Trace.diurnal(args.diurnal, args.period or duration, duration, service,
                             amplitude=0.8 if args.amplitude is None else args.amplitude, seed=seed, bursts=bursts)
    return Trace.poisson(args.poisson or 0.0, duration, service, seed=seed, bursts=bursts)


def _policy_from(args: argparse.Namespace) -> ScalingPolicy:
    from prefork.cli import _config_path, _parse_set  # the other commands' -c and --set, read the same way

    overrides = _parse_set(args.set)
    if args.policy is not None:
        named = [key for key in overrides if key in ("scaling", "scaling.name")]
        if named:
            raise ConfigError(f"--policy {args.policy} and --set {named[0]}=...: name the policy once")
        overrides = {"scaling.name": args.policy, **overrides}
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a policy named by import path may live in the current directory
    return load_policy(load_config(_config_path(args.config), overrides))


def run(args: argparse.Namespace) -> int:
    """``prefork simulate`` with parsed ``args``; input errors raise :class:`ConfigError`."""
    _number("--boot-time", args.boot_time)
    _number("--until", args.until)
    policy = _policy_from(args)
    trace = _trace_from(args)
    if args.chart is not None:
        try:
            import matplotlib  # noqa: F401  (fail before the simulation, not after it)
        except ImportError:
            raise ConfigError(NO_MATPLOTLIB) from None
    result = simulate(policy, trace, boot_time=args.boot_time, until=args.until)
    if args.chart is not None:
        result.chart(args.chart)
    if args.json:
        data = result.to_json()
        if args.chart is not None:
            data["chart"] = args.chart
        sys.stdout.write(json.dumps(data, indent=2, default=repr) + "\n")
    else:
        sys.stdout.write(result.summary())
        if args.chart is not None:
            sys.stdout.write(f"chart         {args.chart}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``prefork simulate ARGS`` is ``main(ARGS)``: 0, or 2 after ``prefork: error: ...`` on stderr."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, PluginError) as exc:
        print(f"prefork: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
