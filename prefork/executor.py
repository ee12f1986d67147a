"""``prefork.Executor``: a :class:`concurrent.futures.Executor` on the prefork core.

Beyond the standard library's pools: a per-task ``timeout`` that kills only the
stuck worker and fails only that future; a worker that dies fails only the task
it was running, with the exit code or signal, and is replaced, so the pool is
never "broken"; ``max_tasks_per_child``; every setting may also come from a
``prefork.toml``.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, TypeVar

from prefork._supervisor import Supervisor
from prefork.config import Config, load_config
from prefork.strategies.sink import FutureSink

T = TypeVar("T")


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*args) for args in chunk]


class Executor(_StdExecutor):
    """A process pool with the ``concurrent.futures`` interface.

    :param max_workers: workers to keep (default: the config's, else one per CPU).
    :param initializer: called with ``initargs`` in each worker after it starts.
    :param max_tasks_per_child: replace a worker after this many tasks.
    :param timeout: default per-task timeout in seconds (``None``: none).
    :param config: a :class:`prefork.config.Config`, or a path to a ``prefork.toml``.
    :param overrides: more settings, as in the file (``{"pool.kill_grace": 0.5}``).
    :param cancel_running: ``future.cancel()`` also stops a running task by killing its
        worker (which is replaced); tasks then go to workers one at a time.

    Leaving a ``with`` block by Ctrl-C (``KeyboardInterrupt``) cancels the queued
    tasks, gives the running ones ``pool.kill_grace`` seconds, then kills them.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        timeout: float | None = None,
        config: Config | str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        cancel_running: bool = False,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        kw: dict[str, Any] = dict(overrides or {})
        if max_workers is not None:
            kw["scaling.name"] = "fixed"
            kw["scaling.workers"] = max_workers
        if max_tasks_per_child is not None:
            kw["pool.max_tasks_per_child"] = max_tasks_per_child
        if timeout is not None:
            kw["pool.task_timeout"] = timeout
        if isinstance(config, Config):
            if kw:
                raise TypeError(
                    "Executor: give settings either as a Config object or as keyword arguments "
                    "(with config= a path), not both"
                )
        else:
            config = load_config(config, kw)
        self._sup = Supervisor(
            config, sink=FutureSink(cancel_running=cancel_running), initializer=initializer,
            initargs=tuple(initargs) if initializer else None,
        )
        self._sup.start()

    @property
    def config(self) -> Config:
        return self._sup.config  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._sup.submit(fn, args, kwargs)  # type: ignore[no-any-return]

    def options(self, *, timeout: float | None = None) -> _Options:
        """Per-task options: ``executor.options(timeout=2).submit(fn, x)``."""
        return _Options(self, timeout)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`; ``chunksize`` sends that
        many calls per task.  Results come in order; ``timeout`` counts from this call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        args = zip(*iterables, strict=False)
        futures = []
        while True:
            chunk = list(itertools.islice(args, chunksize))
            if not chunk:
                break
            futures.append(self._sup.submit(_run_chunk, (fn, chunk)))
        return _chunked_results(futures, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._sup.shutdown(wait=wait, cancel_futures=cancel_futures)

    def kill(self) -> None:
        """Stop now: kill every worker; running and queued tasks fail or are cancelled."""
        self._sup.shutdown(wait=True, cancel_futures=True, force=True)

    def terminate(self, grace: float | None = None) -> None:
        """Stop soon: cancel queued tasks, give running ones ``grace`` seconds
        (default ``pool.kill_grace``), then kill what is left."""
        self._sup.shutdown(wait=False, cancel_futures=True)
        if not self._sup.join(self.config.pool.kill_grace if grace is None else grace):
            self.kill()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C: do not sit through the queue
        else:
            self.shutdown(wait=True)

    def pids(self) -> list[int]:
        """The pids of the live workers."""
        return self._sup.pids()

    def stats(self) -> dict[str, int]:
        """Workers (booting, idle, busy), queued and in-flight tasks, forks so far."""
        return self._sup.stats()


class _Options:
    __slots__ = ("_executor", "_timeout")

    def __init__(self, executor: Executor, timeout: float | None) -> None:
        self._executor = executor
        self._timeout = timeout

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._executor._sup.submit(fn, args, kwargs, timeout=self._timeout)  # type: ignore[no-any-return]


def _chunked_results(futures: list[Future[list[T]]], deadline: float | None) -> Iterator[T]:
    try:
        futures.reverse()
        while futures:
            fut = futures.pop()
            try:
                if deadline is None:
                    chunk = fut.result()
                else:
                    chunk = fut.result(max(0.0, deadline - time.monotonic()))
            except FuturesTimeout:
                raise
            yield from chunk
    finally:
        for fut in futures:
            fut.cancel()
