"""A :class:`concurrent.futures.Future` that costs little until someone waits on it.

The standard future builds a ``Condition`` (an ``RLock``, a ``deque``) and two
lists in its constructor: seven objects the cyclic garbage collector tracks,
for every task.  At tens of thousands of tasks in flight the collector's passes
over them cost as much as the rest of a task's work in the caller (measured:
58k tasks/s with the stdlib future, the same run without the collector 114k).

Here the condition and the lists are made on first use.  A future that is
answered before anyone waits on it never makes them: the supervisor sets the
outcome under one module lock, and a waiter makes the condition under that same
lock, so either the setter sees the condition (and notifies through it as the
standard future does) or the waiter sees the outcome.  Everything else is the
standard future's code, which reaches the condition and lists through the
properties below.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

_MAKE = threading.Lock()
_OVER = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class LightFuture(Future[Any]):
    # A new future's state lives in these class defaults until it is first set: the
    # constructor is object's (deliberately not Future.__init__: see the module text),
    # so making one sets no attribute at all.
    _state = PENDING
    _result: Any = None
    _exception: BaseException | None = None
    _cond: threading.Condition | None = None
    _waiter_list: list[Any] | None = None
    _callback_list: list[Any] | None = None
    __init__ = object.__init__

    # -- made on first use; the standard future's methods reach them through these --

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _MAKE:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        waiters = self._waiter_list
        if waiters is None:
            with _MAKE:
                if self._waiter_list is None:
                    self._waiter_list = []
                waiters = self._waiter_list
        return waiters

    @property
    def _done_callbacks(self) -> list[Any]:
        callbacks = self._callback_list
        if callbacks is None:
            with _MAKE:
                if self._callback_list is None:
                    self._callback_list = []
                callbacks = self._callback_list
        return callbacks

    def _invoke_callbacks(self) -> None:
        if self._callback_list:
            super()._invoke_callbacks()  # type: ignore[misc]

    # -- fast paths while nobody waits ----------------------------------------------

    def _settle(self, result: Any, exception: BaseException | None) -> bool:
        """Set the outcome without a condition if none exists yet; False: use the slow path."""
        if self._cond is not None:
            return False
        with _MAKE:
            if self._cond is not None or self._state not in (PENDING, RUNNING):
                return False
            self._result = result
            self._exception = exception
            self._state = FINISHED
        self._invoke_callbacks()
        return True

    def set_result(self, result: Any) -> None:
        if not self._settle(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if exception is None or not self._settle(None, exception):
            super().set_exception(exception)

    def add_done_callback(self, fn: Any) -> None:
        """Without a condition yet and not done: listed under the module lock, which the
        outcome is set under too; so the setter runs it, or it sees the outcome and
        the standard path runs it at once."""
        if self._cond is None:
            with _MAKE:
                if self._cond is None and self._state not in _OVER:
                    if self._callback_list is None:
                        self._callback_list = []
                    self._callback_list.append(fn)
                    return
        super().add_done_callback(fn)

    def set_running_or_notify_cancel(self) -> bool:
        if self._cond is None:
            with _MAKE:
                if self._cond is None and self._state == PENDING:
                    self._state = RUNNING
                    return True
        return super().set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # no cycle through the traceback
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def done(self) -> bool:
        return self._state in _OVER

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING
