"""A prefork plugin adding a result sink: tickets, and work that is dropped when late.

With the ``tickets`` sink, ``submit`` returns a ticket (the task's id) and
``sink.result(ticket, timeout)`` waits for that task's outcome: it returns the
value or raises the exception, once (the outcome is forgotten when taken).

A task that waited in the queue longer than ``max_wait`` seconds is never run:
just before it would go to a worker, ``claim`` refuses it, and its ticket's
outcome is :class:`Expired`.  That suits work nobody wants late, such as a
request whose client has given up.

Every facade fixes its own sink (an Executor's futures, a BossWorker's queue, a
Dispatcher's callbacks), so a pool with this sink is the core supervisor::

    from prefork import load_config
    from prefork._supervisor import Supervisor

    pool = Supervisor(load_config("prefork.toml"))   # with the [sink] below
    ticket = pool.submit("math:sqrt", (2.0,))
    print(pool.sink.result(ticket, timeout=10))
    pool.shutdown()

with, in ``prefork.toml``::

    plugins = ["examples.plugin_tickets_sink"]

    [sink]
    name = "tickets"
    max_wait = 2.0
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import attrs

from prefork import Task, hookimpl
from prefork.errors import OptionError


class Expired(TimeoutError):
    """The task waited in the queue longer than ``sink.max_wait`` seconds; it never ran."""


def _seconds(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also refuses NaN
        raise OptionError(attribute.name, value, "must be a number of seconds >= 0 (0: no limit)")


@attrs.define
class TicketSink:
    """Outcomes kept by ticket until taken; tasks that queued too long are dropped."""

    name: ClassVar[str] = "tickets"
    max_wait: float = attrs.field(
        default=0.0,
        converter=float,
        validator=_seconds,
        metadata={"doc": "seconds a task may wait in the queue; a later one is never run (0: no limit)"},
    )
    # State, not options (init=False): made for each pool, never compared.
    _outcomes: dict[int, tuple[bool, Any]] = attrs.field(init=False, factory=dict, eq=False, repr=False)
    _changed: threading.Condition = attrs.field(init=False, factory=threading.Condition, eq=False, repr=False)

    def attach(self, task: Task) -> int:
        # In the submitting thread, before the call is serialized: what submit() returns.
        return task.id

    def claim(self, task: Task) -> bool:
        # In the supervisor, just before the task goes to a worker; once per task.
        # (A Task made by hand, not by submit(), has no submitted_at: never late.)
        waited = time.monotonic() - task.submitted_at
        if self.max_wait and task.submitted_at and waited > self.max_wait:
            # Refused: it is never run and deliver() is never called for it,
            # so this sink settles it itself.
            why = f"task {task.id} waited {waited:.3g} s in the queue, more than sink.max_wait = {self.max_wait:g}"
            self._settle(task.id, False, Expired(why))
            return False
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        # Once per task claim() did not refuse.  Mostly in the loop thread, but a
        # submitting thread (a call that cannot be serialized) or the thread that
        # shuts the pool down (cancelled tasks) may deliver too: hence the lock.
        self._settle(task.id, ok, value)

    def _settle(self, ticket: int, ok: bool, value: Any) -> None:
        with self._changed:
            self._outcomes[ticket] = (ok, value)
            self._changed.notify_all()

    def result(self, ticket: int, timeout: float | None = None) -> Any:
        """The value of the task behind ``ticket`` (its exception is raised), waiting
        at most ``timeout`` seconds (``TimeoutError``); an outcome is taken once."""
        with self._changed:
            if not self._changed.wait_for(lambda: ticket in self._outcomes, timeout):
                raise TimeoutError(f"ticket {ticket} has no outcome after {timeout} s")
            ok, value = self._outcomes.pop(ticket)
        if ok:
            return value
        raise value

    def close(self) -> None:
        pass  # nothing to release: outcomes not taken go with the sink


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    registry.register("sink", TicketSink)
