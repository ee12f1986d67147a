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
``main(ARGS)``).  This module holds the simulation and the command; the trace
classes are kept in ``prefork._trace``, the result and its reports in
``prefork._simulate_report``, the options in ``prefork._simulate_cli``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

from prefork._scaler import Scaler
from prefork._simulate_cli import add_arguments, build_parser, check_number, config_from, trace_from
from prefork._simulate_report import NO_MATPLOTLIB as NO_MATPLOTLIB  # what --chart says without matplotlib
from prefork._simulate_report import BurstOutcome, Series, SimulationResult, policy_name
from prefork._trace import Burst, Service, Trace, check, finite_ge0
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

_BOOTING: Final = 0
_IDLE: Final = 1
_BUSY: Final = 2
_GONE: Final = 3
#: The shortest time between two passes of the loop (a real pass takes longer).  A policy that
#: asks to be asked again at once is asked after this, as the supervisor's clock moves on too.
_PASS: Final = 1e-6


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
    check(finite_ge0(boot_time), "boot_time", boot_time, "must be a finite number of seconds >= 0")
    horizon = trace.duration if until is None else until
    check(finite_ge0(horizon), "until", horizon, "must be a finite number of seconds >= 0")
    check(finite_ge0(stall_limit) and stall_limit > 0, "stall_limit", stall_limit, "must be a finite number of seconds > 0")
    scaler = Scaler(scaling)
    max_workers = scaler.max_workers
    if max_workers < 1:
        raise ConfigError(f"scaling policy {policy_name(scaling)!r}: max_workers() = {max_workers}: the pool would run "
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
                exc.add_note(f"prefork simulate: the scaling policy {policy_name(scaling)!r} failed at {t:g} s")
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
                    f"scaling policy {policy_name(scaling)!r}: asked to be asked again at once after "
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


# -- the command -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``prefork simulate`` with parsed ``args``; input errors raise :class:`ConfigError`."""
    check_number("--boot-time", args.boot_time)
    check_number("--until", args.until)
    policy = load_policy(config_from(args))
    trace = trace_from(args)
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
