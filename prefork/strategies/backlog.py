"""The ``backlog`` scaling policy: grow while work waits, shrink when workers idle.

uWSGI's "cheaper" backlog algorithm, for ``prefork serve`` first: the pool keeps
``min_servers`` workers, and forks more while connections wait in the listen
queue that no idle worker is about to take; a worker idle for ``idle_timeout``
seconds is retired, one per tick, back down to ``min_servers``::

    PoolStats.queued ─────────►  waiting = queued - idle - booting
    (prefork serve: connections        │
     in the listen queue, read          ├─ waiting > max_waiting, room left, a tick since the last fork:
     from the kernel by                 │     fork step, 2*step, 4*step ... (at most max_rate, at most
     prefork._listen_queue;             │     `waiting`) per tick while it lasts
     a task pool: tasks queued)         ├─ nothing queued, more than min_servers, one idle for idle_timeout:
                                        │     retire that one (one per tick)
                                        └─ else: look again in `tick` seconds

The contract with the supervisor: ``PoolStats.queued`` is the work waiting for a
worker.  In a pool that runs tasks that is the task queue; in ``prefork serve`` it
is the number of connections waiting in the listening socket's accept queue
(``Supervisor(waiting=...)`` adds it), read each time the policy is asked.  The policy reads
nothing: like every policy it is a pure function of the snapshot, and the
doubling of the fork count travels in ``spawn_rate``.

``spare`` keeps a number of idle workers ready whatever the load; ``backlog``
keeps none beyond ``min_servers`` and reacts to work that actually waits (see
docs/profiles/mpm.md, "Scaling by backlog").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from prefork._hooks import hookimpl
from prefork.errors import OptionError
from prefork.strategies.scaling import Decision, PoolStats

__all__ = ["BacklogPolicy"]


def _count(minimum: int) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise OptionError(attribute.name, value, "must be an integer")
        if value < minimum:
            raise OptionError(attribute.name, value, f"must be >= {minimum}")

    return check


def _seconds(name: str, value: Any, minimum: float) -> float:
    """``value`` as a float: a finite number of seconds >= ``minimum``, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(name, value, "must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < minimum:
        raise OptionError(name, value, f"must be a finite number of seconds >= {minimum:g}")
    return seconds


def _idle_timeout(value: Any) -> float:
    return _seconds("idle_timeout", value, 0.0)


def _tick(value: Any) -> float:
    return _seconds("tick", value, 0.001)


@attrs.frozen
class BacklogPolicy:
    """uWSGI's cheaper "backlog": ``min_servers`` workers, more while more than
    ``max_waiting`` connections (or tasks) wait beyond the idle and booting workers,
    forking ``step``, then twice as many each tick while it lasts (at most
    ``max_rate``), never more than ``max_servers``; a worker idle ``idle_timeout``
    seconds while nothing waits is retired, one per tick, down to ``min_servers``."""

    name: ClassVar[str] = "backlog"
    min_servers: int = attrs.field(default=2, validator=_count(0), metadata={
        "doc": "workers forked at start and always kept (a dead one is replaced at once)"})
    max_servers: int = attrs.field(default=16, validator=_count(1), metadata={"doc": "most workers at once"})
    max_waiting: int = attrs.field(default=0, validator=_count(0), metadata={
        "doc": "grow when more than this many connections (or queued tasks) wait beyond the idle and booting workers"})
    step: int = attrs.field(default=1, validator=_count(1), metadata={
        "doc": "workers forked at the first tick of a wait; twice as many at each next tick while it lasts"})
    max_rate: int = attrs.field(default=32, validator=_count(1), metadata={
        "doc": "most forks in one tick (the doubling stops here)"})
    idle_timeout: float = attrs.field(default=10.0, converter=_idle_timeout, metadata={
        "doc": "retire a worker beyond min_servers idle this long while nothing waits, one per tick (0: never)"})
    tick: float = attrs.field(default=1.0, converter=_tick, metadata={
        "doc": "seconds between two looks at the waiting work; at most one fork batch per tick"})

    def __attrs_post_init__(self) -> None:
        if self.min_servers > self.max_servers:
            raise OptionError("min_servers", self.min_servers, f"must be <= max_servers ({self.max_servers})")
        if self.step > self.max_rate:
            raise OptionError("step", self.step, f"must be <= max_rate ({self.max_rate})")

    def max_workers(self) -> int:
        return self.max_servers

    def decide(self, stats: PoolStats) -> Decision:
        tick = self.tick
        alive, idle = stats.alive, stats.idle
        if alive > self.max_servers:  # after update_policy or resized lowered the ceiling
            surplus = min(alive - self.max_servers, idle)
            return Decision(retire=surplus, next_tick=tick) if surplus > 0 else Decision(next_tick=tick)
        room = self.max_servers - alive
        if alive < self.min_servers:  # the start, or a worker died: at once, whatever the tick
            return Decision(spawn=self.min_servers - alive, next_tick=tick)
        waiting = stats.queued - idle - stats.booting
        if room > 0 and waiting > 0 and (waiting > self.max_waiting or alive == 0):
            # (alive == 0: min_servers = 0 and work came; under max_waiting it would wait forever)
            rate = max(1, stats.spawn_rate)
            due = tick - (stats.now - stats.last_spawn)
            # A task pool asks on every loop pass while tasks wait: the pace is kept here, not by the caller.
            if due > 0:  # forked less than a tick ago: those may be enough; keep the pace
                return Decision(spawn_rate=rate, next_tick=due)
            n = min(self.step * rate, self.max_rate, room, waiting)
            doubled = rate * 2 if self.step * rate < self.max_rate else rate
            return Decision(spawn=n, spawn_rate=doubled, next_tick=tick)
        if self.idle_timeout and stats.queued <= 0 and alive > self.min_servers and idle > 0:
            left = self.idle_timeout - stats.longest_idle
            if left <= 0:
                return Decision(retire=1, next_tick=tick)
            return Decision(next_tick=min(tick, left))
        return Decision(next_tick=tick)

    def resized(self, delta: int, limit: int) -> BacklogPolicy:
        """``delta`` more workers kept (``min_servers``), within ``limit``; ``max_servers`` grows
        with it.  Shrinking stops at one worker (at 0 only if ``min_servers`` was 0)."""
        floor = min(self.min_servers, 1)
        low = min(max(floor, self.min_servers + delta), limit)
        return attrs.evolve(self, min_servers=low, max_servers=min(max(self.max_servers, low), limit))


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("scaling", BacklogPolicy)

