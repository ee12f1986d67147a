"""What ``prefork simulate`` reports: :class:`SimulationResult` (per-task start and
finish times, worker-seconds, forks, retirements, peaks, bursts absorbed, the
pool over time as a :class:`Series`) and its three renderings, the text summary,
the JSON of ``--json`` and the chart of ``--chart``.  Public through
:mod:`prefork.simulate`, which re-exports these classes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Final

import attrs

from prefork._trace import Trace
from prefork.errors import ConfigError
from prefork.strategies.scaling import ScalingPolicy

__all__ = ["NO_MATPLOTLIB", "BurstOutcome", "Series", "SimulationResult", "policy_name", "policy_options"]

#: What ``--chart`` says when matplotlib is missing.
NO_MATPLOTLIB: Final = "--chart needs matplotlib, which is not installed: pip install 'prefork[simulate]'"


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
            "policy": {"name": policy_name(self.policy), "options": policy_options(self.policy)},
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
        options = policy_options(self.policy)
        lines = [
            f"policy        {policy_name(self.policy)}"
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
        fig.suptitle(f"{policy_name(self.policy)}: {self.trace.source}", fontsize=10)
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


def policy_name(policy: ScalingPolicy) -> str:
    """The policy's registered name, or its class's name if it has none."""
    return str(getattr(policy, "name", type(policy).__qualname__))


def policy_options(policy: ScalingPolicy) -> dict[str, Any]:
    """An attrs policy's options (its init fields) and their values; ``{}`` for another."""
    cls: Any = type(policy)
    if not attrs.has(cls):
        return {}
    return {f.name: getattr(policy, f.name) for f in attrs.fields(cls) if f.init}
