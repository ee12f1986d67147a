"""Result sinks: where each finished task's one outcome goes, in the supervisor.

``attach(task)`` runs at submit and returns what the caller gets back (a future,
the task id...); ``claim(task)`` runs just before dispatch and may say the task
was cancelled; ``deliver(task, ok, value)`` runs exactly once per task.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import attrs

from prefork._future import LightFuture
from prefork._hooks import hookimpl
from prefork._task import Task

log = logging.getLogger("prefork.sink")


@runtime_checkable
class ResultSink(Protocol):
    """Where each task's one outcome goes, in the supervisor: ``attach`` at submit
    returns what the caller gets back, ``claim`` just before dispatch may drop the
    task, ``deliver`` runs exactly once per task (docs/plugins.md, section 7)."""

    name: ClassVar[str]

    def attach(self, task: Task) -> Any: ...

    def claim(self, task: Task) -> bool: ...

    def deliver(self, task: Task, ok: bool, value: Any) -> None: ...

    def close(self) -> None: ...


class Outcome(NamedTuple):
    """What the queue sink hands out: the task, whether it succeeded, its value or exception."""

    task: Task
    ok: bool
    value: Any


class KillableFuture(LightFuture):
    """A future whose ``cancel()`` also stops a running task, through ``killer``.

    It relies on :class:`concurrent.futures.Future`'s internal state names, which
    have been stable since Python 3.2.
    """

    def __init__(self, killer: Callable[[], None]) -> None:
        super().__init__()
        self._killer = killer

    def cancel(self) -> bool:
        with self._condition:
            running = self._state == "RUNNING"
            if running:
                self._state = "CANCELLED_AND_NOTIFIED"
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
        if not running:
            return super().cancel()
        self._killer()
        self._invoke_callbacks()
        return True


@attrs.define
class FutureSink:
    """Each task gets a :class:`concurrent.futures.Future`.

    With ``cancel_running`` a future's ``cancel()`` also stops its task while it
    runs: the supervisor kills that worker and replaces it.
    """

    name: ClassVar[str] = "future"
    cancel_running: bool = attrs.field(
        default=False, metadata={"doc": "future.cancel() kills the worker running the task (tasks then go one at a time per worker)"}
    )
    #: set by the supervisor: ``killer(task)`` stops a running task
    killer: Callable[[Task], None] | None = attrs.field(default=None, init=False, repr=False)

    def attach(self, task: Task) -> Future[Any]:
        fut: Future[Any]
        if self.cancel_running and self.killer is not None:
            killer = self.killer
            fut = KillableFuture(lambda: killer(task))
        else:
            fut = LightFuture()
        task.handle = fut
        return fut

    def claim(self, task: Task) -> bool:
        return task.handle.set_running_or_notify_cancel()  # type: ignore[no-any-return]

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        fut: Future[Any] = task.handle
        if not ok and isinstance(value, CancelledError):
            fut.cancel()
            return
        try:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        except InvalidStateError:
            pass  # cancelled while queued and already answered as cancelled

    def close(self) -> None:
        pass


@attrs.define
class QueueSink:
    """Outcomes wait in a FIFO queue for ``get()`` (blocking, with timeout, or not)."""

    name: ClassVar[str] = "queue"
    _queue: queue.SimpleQueue[Outcome] = attrs.field(init=False, factory=queue.SimpleQueue)

    def attach(self, task: Task) -> int:
        return task.id

    def claim(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        self._queue.put(Outcome(task, ok, value))

    def get(self, block: bool = True, timeout: float | None = None) -> Outcome | None:
        """The next outcome; ``None`` when not blocking (or past ``timeout``) and none is ready."""
        try:
            return self._queue.get(block, timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Outcome | None:
        return self.get(block=False)

    def qsize(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        pass


@attrs.define
class CallbackSink:
    """Call ``callback(task, ok, value)`` in the supervisor; a task's own
    ``callback`` wins over the sink's.  A callback that raises is logged with its
    traceback and does not stop the pool."""

    name: ClassVar[str] = "callback"
    callback: Callable[[Task, bool, Any], Any] | str | None = attrs.field(
        default=None, metadata={"doc": "callable(task, ok, value), or a 'module:callable' string"}
    )

    def __attrs_post_init__(self) -> None:
        if isinstance(self.callback, str):
            from prefork.strategies.resolver import import_object

            self.callback = import_object(self.callback)

    def attach(self, task: Task) -> int:
        return task.id

    def claim(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        cb = task.callback or self.callback
        if cb is None or isinstance(cb, str):
            return
        try:
            cb(task, ok, value)
        except Exception:
            log.exception("result callback %r failed for %r", cb, task)

    def close(self) -> None:
        pass


@hookimpl
def prefork_register_strategies(registry: Any) -> None:
    for cls in (FutureSink, QueueSink, CallbackSink):
        registry.register("sink", cls)
