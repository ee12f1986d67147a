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
from typing import Any, TypeVar

from prefork._supervisor import Supervisor
from prefork.config import Config, load_config
from prefork.strategies.sink import FutureSink

T = TypeVar("T")


def _run_chunk(fn: Callable[..., T], *columns: list[Any]) -> list[T]:
    """One chunk of a map: the arguments travel as columns (a list per iterable),
    which pickle faster than a list of argument tuples."""
    return list(map(fn, *columns))


#: with no chunksize, a map sends about this many chunks to each worker (as multiprocessing.Pool)
AUTO_CHUNKS_PER_WORKER = 4
#: ... unless it has at most this many items per worker: then one item per task (balance first)
AUTO_SMALL_MAP = 16


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
        chunksize: int | None = None,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`: results in order, ``timeout``
        counted from this call, the iterables consumed now.

        ``chunksize`` calls travel in one task.  Without it the size is chosen
        from the number of items: one per task for small maps, else about
        ``AUTO_CHUNKS_PER_WORKER`` chunks per worker, as ``multiprocessing.Pool`` does.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(iterables) == 1:
            columns = [list(iterables[0])]
        else:
            columns = [list(c) for c in zip(*zip(*iterables, strict=False), strict=True)] or [[] for _ in iterables]
        n = len(columns[0]) if columns else 0
        if chunksize is None:
            workers = max(1, self._sup.max_workers)
            chunksize = 1 if n <= AUTO_SMALL_MAP * workers else -(-n // (workers * AUTO_CHUNKS_PER_WORKER))
        submit = self._sup.submit
        if chunksize == 1:
            futures = [submit(fn, args) for args in zip(*columns, strict=True)]
            return _single_results(futures, deadline)
        futures = [
            submit(_run_chunk, (fn, *(c[i : i + chunksize] for c in columns))) for i in range(0, n, chunksize)
        ]
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


def _single_results(futures: list[Future[T]], deadline: float | None) -> Iterator[T]:
    try:
        futures.reverse()
        while futures:
            fut = futures.pop()
            yield fut.result() if deadline is None else fut.result(max(0.0, deadline - time.monotonic()))
    finally:
        for fut in futures:
            fut.cancel()


def _chunked_results(futures: list[Future[list[T]]], deadline: float | None) -> Iterator[T]:
    return itertools.chain.from_iterable(_chunks(futures, deadline))  # items flow in C, not through a generator


def _chunks(futures: list[Future[list[T]]], deadline: float | None) -> Iterator[list[T]]:
    try:
        futures.reverse()
        while futures:
            fut = futures.pop()
            yield fut.result() if deadline is None else fut.result(max(0.0, deadline - time.monotonic()))
    finally:
        for fut in futures:
            fut.cancel()
