"""Scaling policies: how many workers, when to fork, when to retire.

A policy is a pure function of a :class:`PoolStats` snapshot: ``decide(stats)``
returns a :class:`Decision` and touches nothing, so policies are tested without
processes.  State that must survive between ticks (the spare policy's spawn
rate) travels through the snapshot and the decision.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

from prefork._hooks import hookimpl
from prefork.errors import OptionError


@attrs.frozen
class PoolStats:
    """What the supervisor knows when it asks the policy."""

    now: float  #: monotonic seconds
    alive: int  #: workers booting, idle or busy (not those already told to leave)
    booting: int  #: forked, not yet ready
    idle: int  #: ready and holding no task (booting ones are not counted here)
    busy: int  #: holding at least one task
    queued: int  #: tasks waiting for a worker
    spawned_total: int = 0  #: forks so far (0: the pool is starting)
    last_spawn: float = -math.inf  #: monotonic time of the last fork
    longest_idle: float = 0.0  #: seconds the longest-idle worker has been idle
    spawn_rate: int = 1  #: carried state of the spare policy


@attrs.frozen
class Decision:
    """What a policy's ``decide`` returns: workers to fork and to retire now, and when to ask again."""

    spawn: int = 0  #: workers to fork now
    retire: int = 0  #: idle workers to stop now (never a busy one)
    spawn_rate: int = 1  #: state handed back in the next snapshot
    next_tick: float | None = None  #: ask again after this many seconds, even without events


@runtime_checkable
class ScalingPolicy(Protocol):
    """How many workers a pool keeps.  The supervisor calls ``decide`` with a
    :class:`PoolStats` snapshot when something changed (and after ``next_tick``)
    and forks or retires what the :class:`Decision` says (docs/plugins.md, section 3)."""

    name: ClassVar[str]

    def max_workers(self) -> int:
        """The most workers this policy ever keeps at once (0: run tasks in the caller)."""

    def decide(self, stats: PoolStats) -> Decision: ...

    # Optional: ``resized(delta, limit) -> ScalingPolicy``, the policy with ``delta`` more
    # (or fewer) workers and at most ``limit``: what ``prefork ctl NAME add N`` and
    # ``Supervisor.resize`` use.  A policy without it cannot be resized at run time.


def cpu_count() -> int:
    """CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ge(minimum: float) -> Any:
    def check(instance: Any, attribute: Any, value: float) -> None:
        if value < minimum:
            raise OptionError(attribute.name, value, f"must be >= {minimum:g}")

    return check


def _int(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(attribute.name, value, "must be an integer")


@attrs.frozen
class FixedPolicy:
    """Exactly ``workers`` workers; a worker that leaves is replaced at once, and
    idle ones beyond ``workers`` (after ``resized``) are retired."""

    name: ClassVar[str] = "fixed"
    workers: int = attrs.field(default=0, validator=[_int, _ge(0)], metadata={"doc": "number of workers (0: one per CPU)"})

    def count(self) -> int:
        return self.workers or cpu_count()

    def max_workers(self) -> int:
        return self.count()

    def decide(self, stats: PoolStats) -> Decision:
        want = self.count()
        return Decision(spawn=max(0, want - stats.alive), retire=max(0, min(stats.alive - want, stats.idle)))

    def resized(self, delta: int, limit: int) -> FixedPolicy:
        """``delta`` more workers (at least 1, at most ``limit``)."""
        return attrs.evolve(self, workers=min(max(1, self.count() + delta), limit))


@attrs.frozen
class OnDemandPolicy:
    """Start ``pre_fork`` workers, fork more while tasks wait (one per
    ``spawn_delay``) up to ``max_forks``, retire idle ones after ``idle_timeout``."""

    name: ClassVar[str] = "on-demand"
    pre_fork: int = attrs.field(default=2, validator=[_int, _ge(0)], metadata={"doc": "workers forked at start and always kept"})
    max_forks: int = attrs.field(default=4, validator=[_int, _ge(0)], metadata={"doc": "most workers at once (0: run every task in the caller)"})
    spawn_delay: float = attrs.field(default=2.0, converter=float, validator=_ge(0), metadata={"doc": "seconds between two forks beyond pre_fork"})
    idle_timeout: float = attrs.field(default=0.0, converter=float, validator=_ge(0), metadata={"doc": "retire a worker beyond pre_fork idle this long (0: never)"})

    def __attrs_post_init__(self) -> None:
        if self.pre_fork > self.max_forks:
            raise OptionError("pre_fork", self.pre_fork, f"must be <= max_forks ({self.max_forks})")

    def max_workers(self) -> int:
        return self.max_forks

    def decide(self, stats: PoolStats) -> Decision:
        if stats.alive < self.pre_fork:
            return Decision(spawn=self.pre_fork - stats.alive)
        waiting = stats.queued - stats.idle - stats.booting
        if waiting > 0 and stats.alive < self.max_forks:
            due = stats.last_spawn + self.spawn_delay - stats.now
            if due <= 0:
                return Decision(spawn=1, next_tick=self.spawn_delay or None)
            return Decision(next_tick=due)
        if self.idle_timeout and stats.alive > self.pre_fork and stats.idle > 0:
            left = self.idle_timeout - stats.longest_idle
            if left <= 0:
                return Decision(retire=1, next_tick=self.idle_timeout)
            return Decision(next_tick=left)
        return Decision()

    def resized(self, delta: int, limit: int) -> OnDemandPolicy:
        """``delta`` more workers kept (``pre_fork``); ``max_forks`` grows with it, up to ``limit``."""
        pre_fork = min(max(0, self.pre_fork + delta), limit)
        return attrs.evolve(self, pre_fork=pre_fork, max_forks=min(max(self.max_forks, pre_fork), limit))


@attrs.frozen
class SparePolicy:
    """Apache prefork: keep idle workers between ``min_spare`` and ``max_spare``,
    never more than ``max_servers``; fork 1, 2, 4 ... 32 per tick while short of
    spares; retire one surplus idle worker per tick."""

    name: ClassVar[str] = "spare"
    start_servers: int = attrs.field(default=5, validator=[_int, _ge(0)], metadata={"doc": "workers forked at start"})
    min_spare: int = attrs.field(default=5, validator=[_int, _ge(0)], metadata={"doc": "fewest idle workers wanted"})
    max_spare: int = attrs.field(default=10, validator=[_int, _ge(1)], metadata={"doc": "most idle workers kept; surplus ones are retired"})
    max_servers: int = attrs.field(default=73, validator=[_int, _ge(1)], metadata={"doc": "most workers at once"})
    max_rate: int = attrs.field(default=32, validator=[_int, _ge(1)], metadata={"doc": "most forks in one tick (the doubling stops here)"})
    tick: float = attrs.field(default=1.0, converter=float, validator=_ge(0.001), metadata={"doc": "seconds between two looks at the spares"})

    def __attrs_post_init__(self) -> None:
        if self.max_spare < self.min_spare:
            raise OptionError("max_spare", self.max_spare, f"must be >= min_spare ({self.min_spare})")
        if self.start_servers > self.max_servers:
            raise OptionError("start_servers", self.start_servers, f"must be <= max_servers ({self.max_servers})")

    def max_workers(self) -> int:
        return self.max_servers

    def decide(self, stats: PoolStats) -> Decision:
        room = self.max_servers - stats.alive
        if stats.spawned_total == 0 and self.start_servers:
            return Decision(spawn=min(self.start_servers, room), next_tick=self.tick)
        spare = stats.idle + stats.booting  # a new worker counts as idle, as in the seed
        if spare > self.max_spare and stats.idle > 0:
            return Decision(retire=1, next_tick=self.tick)
        if spare < self.min_spare and room > 0:
            n = min(stats.spawn_rate, room, self.max_spare - spare)
            return Decision(spawn=n, spawn_rate=min(stats.spawn_rate * 2, self.max_rate), next_tick=self.tick)
        return Decision(next_tick=self.tick)

    def resized(self, delta: int, limit: int) -> SparePolicy:
        """Both spare bounds moved by ``delta`` (``min_spare`` at least 1), within ``max_servers`` and ``limit``."""
        top = min(self.max_servers, limit)
        low = min(max(1, self.min_spare + delta), top)
        high = min(max(low, self.max_spare + delta), top)
        return attrs.evolve(self, min_spare=low, max_spare=max(1, high))


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    for cls in (FixedPolicy, OnDemandPolicy, SparePolicy):
        registry.register("scaling", cls)
