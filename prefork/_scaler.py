"""The supervisor's side of scaling, with no I/O: when to ask the policy, what
its decision means for the pool now, and the state carried between ticks.

The supervisor and ``prefork simulate`` both drive a :class:`Scaler`: the
simulator on a fake clock, the supervisor on ``time.monotonic()``.  So what a
policy would do in a simulation is what it does in a running pool.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import attrs

from prefork._workers import Census
from prefork.strategies import optional
from prefork.strategies.scaling import Decision, PoolStats, ScalingPolicy


class Step(NamedTuple):
    """What one tick asks of the pool."""

    spawn: int  #: workers to fork now
    retire: int  #: idle workers to stop now (the longest idle first)
    stats: PoolStats  #: what the policy was shown
    decision: Decision  #: what it answered


class Scaler:
    """Asks ``policy`` at its ticks and turns the answer into a :class:`Step`.

    ``one_fork_per_tick`` forks at most one worker per tick and asks again at once
    (the MPM's ``kid_new`` returns one child per call).
    """

    def __init__(self, policy: ScalingPolicy, *, one_fork_per_tick: bool = False) -> None:
        self.policy = policy
        self.max_workers = policy.max_workers()
        self.one_fork_per_tick = one_fork_per_tick
        self.next_tick = 0.0  #: the policy is asked again at this time (or on an event that calls for it)
        self.spawn_rate = 1  #: carried between ticks for the policy
        self.spawned_total = 0
        self.last_spawn = -math.inf
        self.not_before = 0.0  #: no fork before this time (boot failures back off)
        self.boot_failures = 0  #: in a row
        self.ticks = 0  #: times the policy was asked

    def due(self, now: float, queued: int) -> bool:
        """Is a tick due: its time has come, or tasks wait (the policy may fork for them)."""
        return now >= self.next_tick or queued > 0

    def soon(self) -> None:
        """Ask the policy at the next pass (a worker died, was recycled, or the policy changed)."""
        self.next_tick = 0.0

    def tick(self, now: float, count: Census, queued: int) -> Step:
        """Ask the policy; the fork count is capped by ``max_workers`` and the backoff."""
        stats = PoolStats(
            now=now, alive=count.alive, booting=count.booting, idle=count.idle, busy=count.busy, queued=queued,
            spawned_total=self.spawned_total, last_spawn=self.last_spawn,
            longest_idle=count.longest_idle, spawn_rate=self.spawn_rate,
        )
        decision = self.policy.decide(stats)
        self.ticks += 1
        self.spawn_rate = decision.spawn_rate
        self.next_tick = now + (decision.next_tick if decision.next_tick is not None else 1.0)
        spawn = 0
        if decision.spawn and now >= self.not_before:
            spawn = max(0, min(decision.spawn, self.max_workers - count.alive))
            if self.one_fork_per_tick and spawn:
                spawn = 1
                self.next_tick = now
        elif decision.spawn:
            self.next_tick = min(self.next_tick, self.not_before)
        return Step(spawn, max(0, decision.retire), stats, decision)

    def spawned(self, now: float) -> None:
        """A fork was asked for at ``now``."""
        self.spawned_total += 1
        self.last_spawn = now

    def booted(self) -> None:
        """A worker finished booting: the run of boot failures is over."""
        self.boot_failures = 0

    def boot_failed(self, now: float) -> float:
        """A worker failed to boot: back off (50 ms, doubling, at most 2 s); returns the delay."""
        self.boot_failures += 1
        delay = min(2.0, 0.05 * 2.0 ** (self.boot_failures - 1))
        self.not_before = now + delay
        return delay

    def replace_policy(self, policy: ScalingPolicy) -> None:
        """Use ``policy`` from now on (its bounds are checked by the caller); asked at once."""
        self.policy = policy
        self.soon()


def evolve_policy(policy: ScalingPolicy, changes: dict[str, Any]) -> ScalingPolicy:
    """``policy`` with some options changed (``min_spare=2``...), checked by its own
    validators: any attrs policy, or one with ``evolve(**changes)``."""
    evolve = optional.evolve(policy)
    if evolve is not None:
        new: ScalingPolicy = evolve(**changes)
        return new
    if not attrs.has(type(policy)):
        raise TypeError(f"scaling policy {type(policy).__qualname__} cannot be changed while running "
                        "(it is no attrs class and has no evolve(**changes))")
    cls: Any = type(policy)  # an attrs class: checked above
    fields = attrs.fields(cls)
    unknown = sorted(set(changes) - {f.name for f in fields if f.init})
    if unknown:
        raise TypeError(f"scaling policy {getattr(policy, 'name', type(policy).__name__)!r} has no option {unknown[0]!r}")
    evolved: ScalingPolicy = attrs.evolve(cast(Any, policy), **changes)
    return evolved


__all__ = ["Scaler", "Step", "evolve_policy"]
