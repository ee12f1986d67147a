"""A prefork plugin adding a scaling policy: one worker per few tasks in hand.

The ``in-hand`` policy sizes the pool to its work: one worker for every
``per_worker`` tasks that are waiting in the queue or running, never fewer than
``floor`` workers and never more than ``ceiling``.  A worker beyond what the
work needs is retired once it has been idle ``idle_timeout`` seconds.

Like every policy it is a pure function of a :class:`prefork.PoolStats`
snapshot: ``decide`` reads the snapshot, returns a :class:`prefork.Decision`,
and keeps nothing between calls, so it is tested without processes.

Use it from ``prefork.toml``::

    plugins = ["examples.plugin_backlog_policy"]

    [scaling]
    name = "in-hand"
    floor = 1
    ceiling = 8
    per_worker = 4
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from prefork import Decision, PoolStats, hookimpl
from prefork.errors import OptionError


def _count(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[int], value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise OptionError(attribute.name, value, f"must be an integer >= {minimum}")

    return check


def _seconds(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also refuses NaN
        raise OptionError(attribute.name, value, "must be a number of seconds >= 0")


@attrs.frozen
class InHandPolicy:
    """``ceil((queued + busy) / per_worker)`` workers, kept between ``floor`` and ``ceiling``."""

    name: ClassVar[str] = "in-hand"
    floor: int = attrs.field(default=1, validator=_count(0), metadata={"doc": "workers always kept"})
    ceiling: int = attrs.field(default=8, validator=_count(1), metadata={"doc": "most workers at once"})
    per_worker: int = attrs.field(
        default=4, validator=_count(1), metadata={"doc": "tasks (waiting or running) that justify one worker"}
    )
    idle_timeout: float = attrs.field(
        default=5.0,
        converter=float,
        validator=_seconds,
        metadata={"doc": "seconds a surplus worker may stay idle before it is retired"},
    )

    def __attrs_post_init__(self) -> None:
        if self.floor > self.ceiling:
            raise OptionError("floor", self.floor, f"must be <= ceiling ({self.ceiling})")

    def max_workers(self) -> int:
        # Asked when a pool is made: it sizes the pool's scoreboard, once.
        return self.ceiling

    def target(self, stats: PoolStats) -> int:
        """The workers the work in hand justifies, within the bounds."""
        demand = stats.queued + stats.busy  # a busy worker holds at least one task
        return min(self.ceiling, max(self.floor, math.ceil(demand / self.per_worker)))

    def decide(self, stats: PoolStats) -> Decision:
        # In the supervisor's loop, often (every pass while tasks wait): keep it quick.
        want = self.target(stats)
        if stats.alive < want:
            # `alive` counts booting workers too, so asking again before they are
            # ready does not fork them twice.
            return Decision(spawn=want - stats.alive)
        if stats.alive > want and stats.idle > 0:
            left = self.idle_timeout - stats.longest_idle
            if left <= 0:
                # One at a time; look again at once: the next one may be due too.
                return Decision(retire=1, next_tick=0.0)
            return Decision(next_tick=left)  # wake up when the longest-idle one is due
        return Decision()  # nothing to do: asked again after an event, or in a second


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("scaling", InHandPolicy)
