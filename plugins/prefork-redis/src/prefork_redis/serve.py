"""A prefork pool serving a Redis stream: the supervisor side of protocol v1.

``serve(pool)`` is what ``prefork run`` calls with ``app = "prefork_redis:serve"``
and ``[transport] name = "redis"``; it returns when ``stop`` is set, and on
the way out (a signal's exception included) gives back every task it holds.

A task's value is ``{"method": ..., "args": [...], "kwargs": {...}}``: the
method is a ``"module:function"`` name the pool's resolver finds (any codec)
or a function (pickle codecs).  What the loop does, and when:

- fetch: as many tasks as there are free workers, never more;
- every ``lease_ms / 3``: renew the leases of the running tasks (those lost
  are dropped: their results would be fenced off anyway), and reap tasks
  of dead hosts into the free workers;
- a result: published and acked by ``Broker.complete`` in a thread of its
  own (``complete``), so a slow Redis never stalls the pool's loop;
- a worker died (``WorkerLost``): the task is released at once, for any
  host; after ``max_deliveries`` the reaper dead-letters it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from concurrent.futures import CancelledError, Future
from typing import Any

from prefork import WorkerLost, current_worker
from prefork_redis.errors import BrokerError
from prefork_redis.records import ERROR
from prefork_redis.transport import RedisTransport

__all__ = ["serve", "task_id"]

log = logging.getLogger("prefork.redis")

_current: str | None = None  # in a worker: the id of the Redis task it runs


def task_id() -> str | None:
    """In a worker, the id of the Redis task being run (the client's
    ``future.task_id``): the key for side effects that must happen once, since
    a task may run again on another host.  None outside such a task."""
    return _current


class _WithTaskId:
    """A task's method, called in the worker with its task id readable through
    :func:`task_id`; a name is resolved by the pool's resolver, as for any task."""

    __slots__ = ("method", "task_id")

    def __init__(self, task_id: str, method: Any) -> None:
        self.task_id = task_id
        self.method = method

    def __reduce__(self) -> tuple[Any, ...]:
        return (_WithTaskId, (self.task_id, self.method))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        global _current
        worker = current_worker()
        fn = worker.resolve(self.method) if worker is not None else self.method
        _current = self.task_id
        try:
            return fn(*args, **kwargs)
        finally:
            _current = None


def serve(pool: Any, stop: threading.Event | None = None) -> int:
    """Run the tasks of the pool's Redis stream in ``pool`` until ``stop`` is set."""
    transport = pool.config.create("transport")
    if not isinstance(transport, RedisTransport):
        raise BrokerError(
            f"prefork_redis:serve needs [transport] name = \"redis\" in the configuration, not {transport.name!r}"
        )
    broker = transport.broker()
    broker.setup()
    server = _Server(pool, broker, transport.block_ms)
    try:
        server.run(stop or threading.Event())
    finally:
        server.close()
    return 0


def _error(exc: BaseException) -> dict[str, str]:
    """An exception as plain data, readable by any codec and any language."""
    text = "".join(traceback.format_exception(exc))
    remote = getattr(exc, "remote_traceback", None)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": remote or text}


class _Server:
    def __init__(self, pool: Any, broker: Any, block_ms: int) -> None:
        self.pool = pool
        self.broker = broker
        self.block_ms = block_ms
        self.running: dict[str, tuple[Any, Future[Any]]] = {}  # entry id -> (task, future)
        # a pool whose serializer carries objects gets each method wrapped with its task id
        self._wrap = bool(pool.config.create("serializer").objects)
        self._lock = threading.Lock()
        self._done: queue.SimpleQueue[tuple[Any, Future[Any]] | None] = queue.SimpleQueue()
        self._freed = threading.Event()  # a running task ended: the fetch loop may fetch again
        self._completer = threading.Thread(target=self._complete_loop, name="prefork-redis-complete", daemon=True)
        self._completer.start()

    # -- the fetch loop (the caller's thread) ---------------------------------------

    def run(self, stop: threading.Event) -> None:
        every = self.broker.lease_ms / 3000
        next_tick = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + every
            self._freed.clear()
            free = self._free()
            if free:
                wait = max(1, min(self.block_ms, int((next_tick - time.monotonic()) * 1000)))
                self._start(self.broker.fetch(free, block_ms=wait))
            else:  # every worker busy: wait until one is free (or the next tick)
                self._freed.wait(max(0.0, min(0.2, next_tick - time.monotonic())))  # 0.2: notice stop

    def _free(self) -> int:
        with self._lock:
            workers: int = self.pool.stats()["workers"]
            return max(0, workers - len(self.running))

    def _tick(self) -> None:
        with self._lock:
            held = list(self.running)
        for entry_id in self.broker.renew(held):  # renewing nothing still keeps this host alive
            with self._lock:
                lost = self.running.pop(entry_id, None)
            if lost is not None:
                log.warning("lost the lease of task %s (entry %s): another host runs it", lost[0].task_id, entry_id)
                lost[1].cancel()
        free = self._free()
        if free:
            self._start(self.broker.reap(free))

    def _start(self, tasks: list[Any]) -> None:
        for task in tasks:
            with self._lock:
                if task.entry_id in self.running:
                    continue  # already running here: keep that run
            try:
                method, args, kwargs = _call(task.decode())
            except Exception as exc:
                self._finish(task, ERROR, _error(exc))
                continue
            call = _WithTaskId(task.task_id, method) if self._wrap else method
            future = self.pool.submit(call, *args, **kwargs)
            with self._lock:
                self.running[task.entry_id] = (task, future)
            future.add_done_callback(lambda fut, task=task: self._done.put((task, fut)))

    # -- results (the completer thread) ------------------------------------------------

    def _complete_loop(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            task, fut = item
            with self._lock:
                mine = self.running.pop(task.entry_id, None) is not None
            if not mine:
                continue  # its lease was lost: another host answers it
            try:
                self._answer(task, fut)
            except Exception:
                log.exception("answering task %s failed", task.task_id)
            self._freed.set()

    def _answer(self, task: Any, fut: Future[Any]) -> None:
        try:
            value = fut.result()
        except CancelledError:
            self.broker.release(task.entry_id)
            return
        except WorkerLost as exc:
            # not this task's fault, maybe: any host may take it now; the reaper
            # dead-letters it after max_deliveries
            log.warning("task %s lost its worker (%s); released", task.task_id, exc)
            self.broker.release(task.entry_id)
            return
        except BaseException as exc:
            self._finish(task, ERROR, _error(exc))
            return
        try:
            if not self.broker.complete(task, value):
                log.warning("the result of task %s was discarded: its lease was lost to another host", task.task_id)
        except (TypeError, ValueError, OverflowError) as exc:  # the codec cannot carry the result
            error = TypeError(f"the result of task {task.task_id!r} cannot be encoded with {task.codec!r}: {exc}")
            self._finish(task, ERROR, _error(error))

    def _finish(self, task: Any, status: str, value: Any) -> None:
        self.broker.complete(task, value, status=status)

    def close(self) -> None:
        """Give back what is still held (a stop while tasks run) and leave the group."""
        with self._lock:
            held = list(self.running.values())
            self.running.clear()
        for task, fut in held:
            fut.cancel()
            try:
                self.broker.release(task.entry_id)
            except Exception:
                log.exception("releasing task %s failed", task.task_id)
        self._done.put(None)
        self._completer.join(10)
        try:
            self.broker.leave()
        except Exception:
            log.exception("leaving the consumer group failed")


def _call(value: Any) -> tuple[Any, list[Any], dict[str, Any]]:
    """``{"method", "args", "kwargs"}`` checked, with errors that say what was wrong."""
    if not isinstance(value, dict) or "method" not in value:
        raise ValueError(f'a task is {{"method": ..., "args": [...], "kwargs": {{...}}}}, not {value!r:.200}')
    method, args, kwargs = value["method"], value.get("args", []), value.get("kwargs", {})
    if not (isinstance(method, str) or callable(method)):
        raise ValueError(f"a task's method is a 'module:function' name or a function, not {method!r:.200}")
    if not isinstance(args, (list, tuple)):
        raise ValueError(f"a task's args are a list, not {args!r:.200}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"a task's kwargs are a map of names, not {kwargs!r:.200}")
    return method, list(args), kwargs
