"""``prefork.Executor``: a :class:`concurrent.futures.Executor` on the prefork core.

Beyond the standard library's pools: a per-task ``timeout`` that kills only the
stuck worker and fails only that future; a worker that dies fails only the task
it was running, with the exit code or signal, and is replaced, so the pool is
never "broken"; ``max_tasks_per_child``; ``map_unordered``; every setting may
also come from a ``prefork.toml``.

``map`` and ``map_unordered`` (chunks, lazy input, ordering) are in ``prefork/_map.py``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from functools import partial
from typing import Any, ParamSpec, TypeVar, Unpack, overload

from prefork import _lifetime, _progress
from prefork._map import AUTO_CHUNKS_PER_WORKER as AUTO_CHUNKS_PER_WORKER
from prefork._map import AUTO_SMALL_MAP as AUTO_SMALL_MAP
from prefork._map import MapOptions, _map
from prefork._progress import Progress, ProgressArg
from prefork._supervisor import KILL_WAIT, Supervisor
from prefork.config import Config, load_config
from prefork.strategies.sink import FutureSink

T = TypeVar("T")
P = ParamSpec("P")
# the items of each iterable of a map, as builtins.map types them
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
T5 = TypeVar("T5")


class _Maps:
    """``map`` and ``map_unordered``, of an :class:`Executor` and of its ``options()``.

    Typed as ``builtins.map`` is: with one to five iterables, ``fn`` is checked
    against their items and the results get ``fn``'s return type.  ``map`` must
    also take whatever :meth:`concurrent.futures.Executor.map` takes (an Executor
    is one, and a subclass may not narrow what its base accepts), so there a ``fn``
    that does not fit its iterables falls through to that signature and only the
    result type is checked; ``map_unordered`` rejects it.  Typing only: the
    overloads cost nothing at run time.
    """

    __slots__ = ()

    def _map_target(self) -> tuple[Executor, float | None]:
        """The pool the maps run on and their per-task timeout (``options(timeout=)``)."""
        raise NotImplementedError

    @overload
    def map(self, fn: Callable[[T1], T], i1: Iterable[T1], /, **options: Unpack[MapOptions]) -> Iterator[T]: ...
    @overload
    def map(
        self, fn: Callable[[T1, T2], T], i1: Iterable[T1], i2: Iterable[T2], /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map(
        self, fn: Callable[[T1, T2, T3], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3], /,
        **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map(
        self, fn: Callable[[T1, T2, T3, T4], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3], i4: Iterable[T4],
        /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map(
        self, fn: Callable[[T1, T2, T3, T4, T5], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3],
        i4: Iterable[T4], i5: Iterable[T5], /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload  # any other call concurrent.futures.Executor.map takes
    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], **options: Unpack[MapOptions]) -> Iterator[T]: ...
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: ProgressArg = False,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map` of Python 3.14: results in
        order; ``timeout`` (seconds for the whole map) counted from this call;
        closing the iterator (or dropping it) cancels the tasks not yet yielded;
        the iterator lets go of each result once it has yielded it.

        Input: without ``buffersize`` the iterables are consumed now.  With
        ``buffersize=n`` (a positive int) they are consumed lazily, so an endless
        generator is fine: ``n`` tasks are submitted now and one more each time a
        result has been taken, so at most ``n`` tasks are pending (submitted and
        not yet yielded).  With a ``chunksize`` a task is a chunk, as for
        ``ProcessPoolExecutor``: at most ``n * chunksize`` items are pending.  A
        lazy map keeps its pool alive while the iterator is.

        Chunks: ``chunksize`` calls travel in one task.  Without it, one item per
        task for small maps (up to ``AUTO_SMALL_MAP`` items per worker) and lazy
        ones, else about ``AUTO_CHUNKS_PER_WORKER`` chunks per worker, as
        ``multiprocessing.Pool`` does.  A chunk fails as a whole: the items of a
        chunk before a failing one are not yielded.

        A per-task timeout (``Executor(timeout=)``, ``pool.task_timeout``,
        ``options(timeout=)``) limits each call: such a map sends one item per
        task, and an explicit ``chunksize`` above 1 raises ``ValueError`` (the
        chunk would run under the timeout of one call).

        Progress: ``progress=True`` shows a bar of the items done (with an error
        too) out of the input's length (unknown for a lazy map over an input
        without ``len()``) when stderr is a terminal; ``"force"`` shows it anyway;
        a bar or a bar factory also do (see ``docs/progress.md``).  The bar is
        closed once, when the iterator ends, raises, is closed or is dropped.

        ``executor.options(timeout=t).map(...)``: the same, each call limited to ``t`` seconds.
        """
        executor, per_task = self._map_target()
        return _map(executor, per_task, fn, iterables, timeout, chunksize, buffersize, progress, ordered=True)

    @overload
    def map_unordered(
        self, fn: Callable[[T1], T], i1: Iterable[T1], /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map_unordered(
        self, fn: Callable[[T1, T2], T], i1: Iterable[T1], i2: Iterable[T2], /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map_unordered(
        self, fn: Callable[[T1, T2, T3], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3], /,
        **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map_unordered(
        self, fn: Callable[[T1, T2, T3, T4], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3], i4: Iterable[T4],
        /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map_unordered(
        self, fn: Callable[[T1, T2, T3, T4, T5], T], i1: Iterable[T1], i2: Iterable[T2], i3: Iterable[T3],
        i4: Iterable[T4], i5: Iterable[T5], /, **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    @overload
    def map_unordered(
        self, fn: Callable[..., T], i1: Iterable[Any], i2: Iterable[Any], i3: Iterable[Any], i4: Iterable[Any],
        i5: Iterable[Any], i6: Iterable[Any], /, *iterables: Iterable[Any], **options: Unpack[MapOptions]
    ) -> Iterator[T]: ...
    def map_unordered(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        buffersize: int | None = None,
        timeout: float | None = None,
        progress: ProgressArg = False,
    ) -> Iterator[T]:
        """As :meth:`map`, but yields results as they come (``imap_unordered``):
        the items of a chunk in their order, chunks as they finish.  A failed call
        raises its exception when its turn comes; ``timeout`` raises
        ``TimeoutError`` when no result came by then (counted from this call)."""
        executor, per_task = self._map_target()
        return _map(executor, per_task, fn, iterables, timeout, chunksize, buffersize, progress, ordered=False)


class Executor(_Maps, _StdExecutor):
    """A process pool with the ``concurrent.futures`` interface.

    Leaving a ``with`` block by Ctrl-C (``KeyboardInterrupt``) cancels the queued
    tasks, gives the running ones ``pool.kill_grace`` seconds, then kills them; a
    second Ctrl-C while it waits kills them at once.

    A pool that is no longer referenced and was not shut down shuts down as
    ``shutdown(wait=False)`` does (its queued tasks still run), with a
    :class:`ResourceWarning` naming the line that made it.

    :param max_workers: workers to keep (default: the config's, else one per CPU).
    :param initializer: called with ``initargs`` in each worker after it starts.
    :param max_tasks_per_child: replace a worker after this many tasks.
    :param timeout: default per-task timeout in seconds (``None``: none).
    :param config: a :class:`prefork.config.Config`, or a path to a ``prefork.toml``.
    :param overrides: more settings, as in the file (``{"pool.kill_grace": 0.5}``).
    :param cancel_running: ``future.cancel()`` also stops a running task by killing its
        worker (which is replaced); tasks then go to workers one at a time.
    :param scaling: a strategy for this pool: an object (a subclass of a built-in,
        say: ``scaling=MyPolicy(workers=3)``), a class, or a registered name or
        ``"module:Class"`` path.
    :param transport: a transport, given as ``scaling`` is.
    :param serializer: a serializer, given as ``scaling`` is.
    :param resolver: a method resolver, given as ``scaling`` is.
    :param progress: a bar over every task of the pool (a map's items each count
        once), its total rising as tasks are submitted, closed at shutdown: ``True``
        (when stderr is a terminal), ``"force"``, a bar or a bar factory; see
        ``docs/progress.md``.  ``map(progress=...)`` shows one map alone.
    """

    _bar: Progress | None = None  # the pool's bar (progress=); None: no bar, nothing counted

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
        scaling: Any = None,
        transport: Any = None,
        serializer: Any = None,
        resolver: Any = None,
        progress: ProgressArg = False,
        control: bool = False,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_workers is not None and scaling is not None:
            raise TypeError("Executor: give max_workers or scaling=, not both")
        kw: dict[str, Any] = dict(overrides or {})
        strategies = {"scaling": scaling, "transport": transport, "serializer": serializer, "resolver": resolver}
        kw.update((kind, given) for kind, given in strategies.items() if given is not None)
        if max_workers is not None:
            kw["scaling.name"] = "fixed"
            kw["scaling.workers"] = max_workers
        if max_tasks_per_child is not None:
            kw["pool.max_tasks_per_child"] = max_tasks_per_child
        if timeout is not None:
            kw["pool.task_timeout"] = timeout
        if control:
            kw["control.enabled"] = True
        if isinstance(config, Config):
            if kw:
                raise TypeError(
                    "Executor: give settings either as a Config object or as keyword arguments "
                    "(with config= a path), not both"
                )
        else:
            config = load_config(config, kw)
        config.require("sink", "future", honoured=("cancel_running",), by="an Executor (results come back as futures)")
        cancel_running = cancel_running or bool(config.sink.options.get("cancel_running", False))
        pool_bar = _progress.check(progress, "Executor")
        self._sup = Supervisor(
            config, sink=FutureSink(cancel_running=cancel_running), initializer=initializer,
            initargs=tuple(initargs) if initializer else None,
        )
        self._sup.start()
        # holds the supervisor, never this object: see prefork/_lifetime.py
        self._finalizer = _lifetime.watch(self, self._sup, "prefork.Executor")
        if pool_bar is not None:
            try:
                self._bar = pool_bar.start(0, grows=True, unit="task")
            except BaseException:
                self.kill()
                raise
            # dropped without shutdown: the pool stops as shutdown(wait=False) does, and so does its bar
            weakref.finalize(self, self._bar.close_when, partial(getattr, self._sup, "stopped"))

    @property
    def config(self) -> Config:
        return self._sup.config  # type: ignore[no-any-return]

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        fut: Future[T] = self._sup.submit(fn, args, kwargs)
        if self._bar is not None:
            self._bar.follow(fut)
        return fut

    def options(self, *, timeout: float | None = None) -> _Options:
        """Per-task options: ``executor.options(timeout=2).submit(fn, x)``, also ``.map``
        and ``.map_unordered`` (the timeout then applies to each call)."""
        return _Options(self, timeout)

    def _map_target(self) -> tuple[Executor, float | None]:
        return self, None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._finalizer.detach()
        try:
            self._sup.shutdown(wait=wait, cancel_futures=cancel_futures)
        finally:
            self._end_progress(wait)

    def kill(self) -> None:
        """Stop now: kill every worker; running and queued tasks fail or are cancelled."""
        self._finalizer.detach()
        try:
            self._sup.shutdown(wait=True, cancel_futures=True, force=True)
        finally:
            self._end_progress(True)

    def terminate(self, grace: float | None = None) -> None:
        """Stop soon: cancel queued tasks, give running ones ``grace`` seconds
        (default ``pool.kill_grace``), then kill what is left.  A
        ``KeyboardInterrupt`` while waiting (a second Ctrl-C) kills them at once."""
        self._finalizer.detach()
        try:
            try:
                self._sup.shutdown(wait=False, cancel_futures=True)
                stopped = self._sup.join(self.config.pool.kill_grace if grace is None else grace)
            except KeyboardInterrupt:
                self._sup.shutdown(wait=False, force=True)
                self._sup.join(KILL_WAIT)
                raise
            if not stopped:
                self.kill()
        finally:
            self._end_progress(True)

    def _end_progress(self, now: bool) -> None:
        """Close the pool's bar: now, or once the pool has stopped (a shutdown that does not wait)."""
        progress = self._bar
        if progress is None:
            return
        sup = self._sup
        if now or sup.stopped:
            progress.close()
        else:
            progress.close_when(lambda: bool(sup.stopped))

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

    def status(self) -> dict[str, Any]:
        """The pool's status as JSON data: every worker (state, task, method, run time, memory)
        and the totals (docs/operations.md); from any thread."""
        return self._sup.status()


class _Options(_Maps):
    """What ``Executor.options()`` returns: ``submit``, ``map`` and ``map_unordered`` with those options."""

    __slots__ = ("_executor", "_timeout")

    def __init__(self, executor: Executor, timeout: float | None) -> None:
        self._executor = executor
        self._timeout = timeout

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """:meth:`Executor.submit` with these options."""
        fut: Future[T] = self._executor._sup.submit(fn, args, kwargs, timeout=self._timeout)
        if self._executor._bar is not None:
            self._executor._bar.follow(fut)
        return fut

    def _map_target(self) -> tuple[Executor, float | None]:
        return self._executor, self._timeout
