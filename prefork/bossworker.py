"""``prefork.BossWorker``: Parallel::Fork::BossWorkerAsync on the prefork core.

The boss is the core's supervisor (a thread of the caller, no extra process);
jobs go through the core's queue to a fixed pool of ``worker_count`` workers;
outcomes come back through the core's queue sink.  This module only maps the
seed's vocabulary onto that, and adds what the seed lacks: a dead worker's job
returns an error naming the exit code or signal, the worker is replaced,
``pending()`` stays truthful, results can carry job ids or keep the order of
submission, ``shut_down()`` keeps uncollected results, and ``add_work`` can be
bounded.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from typing import Any, Self

from prefork import _progress
from prefork._progress import Progress, ProgressArg
from prefork._supervisor import Supervisor
from prefork._task import Task
from prefork.config import Config, load_facade_config
from prefork.errors import ConfigError, PoolShutDown, QueueFull, error_text
from prefork.strategies.resolver import import_object
from prefork.strategies.sink import Outcome, QueueSink

__all__ = ["BossWorker", "QueueFull"]


class _BossSink(QueueSink):
    """The core's queue sink, telling the boss when a job finished (room for more)."""

    def __init__(self, finished: Callable[[bool, Any], None]) -> None:
        super().__init__()
        self._finished = finished

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        super().deliver(task, ok, value)
        self._finished(ok, value)


def error_result(exc: BaseException) -> dict[str, str]:
    """The seed's error shape: ``{"ERROR": message}``, plus the type and the traceback."""
    if isinstance(exc, CancelledError):
        return {"ERROR": "cancelled: the boss was shut down before the job ran", "TYPE": "CancelledError", "TRACEBACK": ""}
    message = error_text(exc)
    cause = exc.__cause__
    tb = str(cause) if cause is not None and type(cause).__name__ == "_RemoteTraceback" else ""
    if not tb:
        tb = getattr(exc, "remote_traceback", "") or "".join(traceback.format_exception_only(type(exc), exc))
    return {"ERROR": message, "TYPE": getattr(exc, "type_name", type(exc).__name__), "TRACEBACK": tb}


class BossWorker:
    """A boss handing jobs to a fixed pool of workers; results are collected with ``get_result``.

    Every argument may also come from the ``[boss_worker]``, ``[pool]`` and
    ``[scaling]`` tables of a ``prefork.toml`` given as ``config``; keyword
    arguments win.  Handlers may be callables or ``"module:callable"`` strings.

    :param work_handler: ``work(job) -> result``, run in a worker for each job.
    :param result_handler: ``handle(result) -> result``, run in the caller by ``get_result``.
    :param init_handler: run once in each worker after it starts.
    :param exit_handler: run once in each worker as it leaves.
    :param global_timeout: seconds a job may run; past it the job's result is
        ``{"ERROR": "task timed out ..."}`` and its worker is killed and replaced.
    :param worker_count: workers to keep.
    :param ordered: ``get_result`` returns results in the order jobs were added.
    :param with_ids: ``add_work`` returns job ids and ``get_result`` returns ``(id, result)``.
    :param max_pending: most jobs added and not yet finished; at the bound
        ``add_work`` blocks, or raises :class:`QueueFull` with ``when_full="raise"``.
    :param progress: a bar of the jobs finished (with an error too; not those
        cancelled by ``shut_down(force=True)``) out of the jobs added so far,
        closed by ``shut_down()``: ``True`` (when stderr is a terminal),
        ``"force"``, a bar or a bar factory; see ``docs/progress.md``.
    """

    _bar: Progress | None = None  # the boss's bar (progress=); None: no bar, nothing counted

    def __init__(
        self,
        work_handler: Callable[[Any], Any] | str | None = None,
        result_handler: Callable[[Any], Any] | str | None = None,
        init_handler: Callable[[], Any] | str | None = None,
        exit_handler: Callable[[], Any] | str | None = None,
        global_timeout: float | None = None,
        worker_count: int | None = None,
        *,
        ordered: bool | None = None,
        with_ids: bool | None = None,
        max_pending: int | None = None,
        when_full: str | None = None,
        config: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        scaling: Any = None,
        transport: Any = None,
        serializer: Any = None,
        resolver: Any = None,
        progress: ProgressArg = False,
        control: bool = False,
    ) -> None:
        if worker_count is not None and scaling is not None:
            raise TypeError("BossWorker: give worker_count or scaling=, not both")
        settings: dict[str, Any] = {
            "scaling": scaling,
            "transport": transport,
            "serializer": serializer,
            "resolver": resolver,
            "boss_worker.work_handler": work_handler,
            "boss_worker.result_handler": result_handler,
            "boss_worker.ordered": ordered,
            "boss_worker.with_ids": with_ids,
            "boss_worker.max_pending": max_pending,
            "boss_worker.when_full": when_full,
            "pool.initializer": init_handler,
            "pool.finalizer": exit_handler,
            "pool.task_timeout": global_timeout,
            "control.enabled": True if control else None,
        }
        if worker_count is not None:
            settings.update({"scaling.name": "fixed", "scaling.workers": worker_count})
        progress_spec = _progress.check(progress, "BossWorker")
        self._setup(load_facade_config("boss-worker", config, overrides, settings), progress_spec)

    @classmethod
    def from_config(cls, config: Config, *, progress: ProgressArg = False) -> Self:
        """A boss built from an already loaded :class:`Config` (as ``prefork run`` does)."""
        self = cls.__new__(cls)
        self._setup(config, _progress.check(progress, "BossWorker"))
        return self

    def _setup(self, config: Config, progress: _progress.Spec | None) -> None:
        opts = config.boss_worker
        if not opts.work_handler:
            raise ConfigError("boss_worker.work_handler is empty: give work_handler= or set it in prefork.toml")
        self._work = opts.work_handler
        handler = opts.result_handler or None
        self._result_handler = import_object(handler) if isinstance(handler, str) else handler
        self._ordered = opts.ordered
        self._with_ids = opts.with_ids
        self._max_pending = opts.max_pending
        self._raise_when_full = opts.when_full == "raise"
        # re-entrant: a job that cannot be serialized finishes inside submit()
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)
        self._outstanding = 0  # added, not yet finished
        self._pending = 0  # added, result not yet retrieved
        self._order: list[int] = []  # ids in submission order, for ``ordered``
        self._held: dict[int, Outcome] = {}  # finished out of order, for ``ordered``
        self._closed = False
        config.require("sink", "queue", by="a BossWorker (results come back through get_result)")
        self._sink = _BossSink(self._finished)
        self._sup = Supervisor(config, sink=self._sink)
        self._sup.start()
        if progress is not None:
            self._bar = progress.start_for_pool(self, self._sup, "job")

    def _finished(self, ok: bool, value: Any) -> None:
        if self._bar is not None and (ok or not isinstance(value, CancelledError)):
            self._bar.done()
        with self._room:
            self._outstanding -= 1
            self._room.notify_all()

    # -- the seed's interface ---------------------------------------------------------

    def add_work(self, *jobs: Any) -> list[int]:
        """Queue jobs (any serializable values); returns their ids."""
        ids = []
        for job in jobs:
            with self._room:
                if self._closed:
                    raise PoolShutDown("add_work() after shut_down()")
                if self._max_pending:
                    if self._raise_when_full and self._outstanding >= self._max_pending:
                        raise QueueFull(f"{self._outstanding} jobs are outstanding (max_pending = {self._max_pending})")
                    self._room.wait_for(lambda: self._outstanding < self._max_pending or self._closed)
                    if self._closed:
                        raise PoolShutDown("add_work() after shut_down()")
                self._outstanding += 1
                self._pending += 1
                if self._bar is not None:
                    self._bar.post()  # before: a job that cannot be serialized finishes in submit()
                try:
                    task_id: int = self._sup.submit(self._work, (job,))
                except BaseException:  # refused (the pool broke, or is stopping): this job was never added
                    self._outstanding -= 1
                    self._pending -= 1
                    if self._bar is not None:
                        self._bar.post(-1)
                    self._room.notify_all()
                    raise
                if self._ordered:
                    self._order.append(task_id)
            ids.append(task_id)
        return ids

    def status(self) -> dict[str, Any]:
        """The pool's status as JSON data: every worker (state, job, run time, memory) and the
        totals (docs/operations.md); from any thread."""
        return self._sup.status()

    def pending(self) -> int:
        """Jobs added whose results have not been retrieved yet (0 when none: false)."""
        return self._pending

    def get_result(self, blocking: bool = True, timeout: float | None = None) -> Any:
        """The next result, after ``result_handler``; ``None`` when nothing is pending,
        or when not ``blocking`` (or past ``timeout``) and no result is ready."""
        if not self._pending:
            return None
        outcome = self._next(blocking, timeout)
        if outcome is None:
            return None
        with self._lock:
            self._pending = max(0, self._pending - 1)  # an outcome of a job refused as it was added is not one
        result = outcome.value if outcome.ok else error_result(outcome.value)
        if self._result_handler is not None:
            result = self._result_handler(result)
        return (outcome.task.id, result) if self._with_ids else result

    def get_result_nb(self) -> Any:
        """``get_result(blocking=False)``."""
        return self.get_result(blocking=False)

    def _next(self, blocking: bool, timeout: float | None) -> Outcome | None:
        if not self._ordered:
            return self._sink.get(blocking, timeout)
        with self._lock:
            want = self._order[0]
            held = self._held.pop(want, None)
            if held is not None:
                self._order.pop(0)
                return held
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = self._sink.get(blocking and left != 0.0, left)
            if outcome is None:
                return None
            with self._lock:
                if outcome.task.id == want:
                    self._order.pop(0)
                    return outcome
                self._held[outcome.task.id] = outcome

    def shut_down(self, force: bool = False) -> None:
        """Stop: by default after every added job has run; with ``force`` at once
        (jobs not finished get an ``ERROR`` result).  Results not yet collected stay
        available to ``get_result``.  No process is left behind either way."""
        with self._room:
            self._closed = True
            self._room.notify_all()
        try:
            self._sup.shutdown(wait=True, cancel_futures=force, force=force)
        finally:
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shut_down()

    def pids(self) -> list[int]:
        """The pids of the live workers."""
        return self._sup.pids()
