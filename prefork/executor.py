"""``prefork.Executor``: a :class:`concurrent.futures.Executor` on the prefork core.

Beyond the standard library's pools: a per-task ``timeout`` that kills only the
stuck worker and fails only that future; a worker that dies fails only the task
it was running, with the exit code or signal, and is replaced, so the pool is
never "broken"; ``max_tasks_per_child``; ``map_unordered``; every setting may
also come from a ``prefork.toml``.
"""

from __future__ import annotations

import itertools
import os
import queue
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar, cast

from prefork import _lifetime, _progress
from prefork._progress import Progress, ProgressArg
from prefork._supervisor import KILL_WAIT, Supervisor
from prefork.config import Config, load_config
from prefork.strategies.sink import FutureSink

T = TypeVar("T")


def _run_chunk(fn: Callable[..., T], *columns: list[Any]) -> list[T]:
    """One chunk of a map, in the worker.  The arguments travel as columns (a list
    per iterable), which pickle faster than a list of argument tuples.  The results
    come back reversed: the caller pops them off the end, so that the chunk lets go
    of each result as it is yielded."""
    results = list(map(fn, *columns))
    results.reverse()
    return results


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
    :param scaling, transport, serializer, resolver: a strategy for this pool: an
        object (a subclass of a built-in, say: ``scaling=MyPolicy(workers=3)``), a
        class, or a registered name or ``"module:Class"`` path.
    :param progress: a bar over every task of the pool (a map's items each count
        once), its total rising as tasks are submitted, closed at shutdown: ``True``
        (when stderr is a terminal), ``"force"``, a bar or a bar factory; see
        ``docs/progress.md``.  ``map(progress=...)`` shows one map alone.

    Leaving a ``with`` block by Ctrl-C (``KeyboardInterrupt``) cancels the queued
    tasks, gives the running ones ``pool.kill_grace`` seconds, then kills them; a
    second Ctrl-C while it waits kills them at once.

    A pool that is no longer referenced and was not shut down shuts down as
    ``shutdown(wait=False)`` does (its queued tasks still run), with a
    :class:`ResourceWarning` naming the line that made it.
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

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = self._sup.submit(fn, args, kwargs)
        if self._bar is not None:
            self._bar.follow(fut)
        return fut

    def options(self, *, timeout: float | None = None) -> _Options:
        """Per-task options: ``executor.options(timeout=2).submit(fn, x)``, also ``.map``
        and ``.map_unordered`` (the timeout then applies to each call)."""
        return _Options(self, timeout)

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
        """
        return _map(self, None, fn, iterables, timeout, chunksize, buffersize, progress, ordered=True)

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
        return _map(self, None, fn, iterables, timeout, chunksize, buffersize, progress, ordered=False)

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


class _Options:
    __slots__ = ("_executor", "_timeout")

    def __init__(self, executor: Executor, timeout: float | None) -> None:
        self._executor = executor
        self._timeout = timeout

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = self._executor._sup.submit(fn, args, kwargs, timeout=self._timeout)
        if self._executor._bar is not None:
            self._executor._bar.follow(fut)
        return fut

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: ProgressArg = False,
    ) -> Iterator[T]:
        """:meth:`Executor.map` with these options; the per-task timeout applies to each item."""
        return _map(self._executor, self._timeout, fn, iterables, timeout, chunksize, buffersize, progress, ordered=True)

    def map_unordered(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        buffersize: int | None = None,
        timeout: float | None = None,
        progress: ProgressArg = False,
    ) -> Iterator[T]:
        """:meth:`Executor.map_unordered` with these options."""
        return _map(
            self._executor, self._timeout, fn, iterables, timeout, chunksize, buffersize, progress, ordered=False
        )


# -- map ----------------------------------------------------------------------------------


def _map(
    executor: Executor,
    task_timeout: float | None,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int | None,
    buffersize: int | None,
    progress: ProgressArg,
    ordered: bool,
) -> Iterator[Any]:
    if buffersize is not None:
        if not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    if chunksize is not None and chunksize < 1:
        raise ValueError("chunksize must be >= 1")
    # checked before the input is read or anything is submitted
    spec = None if progress is False else _progress.check(progress, "Executor.map" if ordered else "Executor.map_unordered")
    sup = executor._sup
    per_task = task_timeout if task_timeout is not None else sup.default_timeout
    if per_task is not None and chunksize is not None and chunksize > 1:
        raise ValueError(
            f"chunksize={chunksize} cannot be used with a per-task timeout ({per_task:g} s): the timeout "
            "limits each call, and a chunk would run its calls under the timeout of one; leave chunksize "
            "unset (each item then goes as its own task) or drop the timeout"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    submit: Callable[..., Any] = sup.submit if task_timeout is None else partial(sup.submit, timeout=task_timeout)
    bar: Progress | None = None
    feed: _Feed | None = None
    try:  # the bar is closed if anything fails (or Ctrl-C strikes) before its iterator exists
        if buffersize is None:  # consume the input now
            if len(iterables) == 1:
                columns = [list(iterables[0])]
            else:
                columns = [list(c) for c in zip(*zip(*iterables, strict=False), strict=True)] or [[] for _ in iterables]
            n = len(columns[0]) if columns else 0
            if chunksize is None:
                workers = max(1, sup.max_workers)
                small = per_task is not None or n <= AUTO_SMALL_MAP * workers
                chunksize = 1 if small else -(-n // (workers * AUTO_CHUNKS_PER_WORKER))
            if spec is not None:
                bar = spec.start(n)
            if bar is not None or executor._bar is not None:
                submit = _counting(submit, bar, executor._bar)
            if chunksize == 1:
                futures = [submit(fn, args) for args in zip(*columns, strict=True)]
            else:
                futures = [
                    submit(_run_chunk, (fn, *(c[i : i + chunksize] for c in columns))) for i in range(0, n, chunksize)
                ]
        else:  # lazily: buffersize tasks now, one more per result taken
            chunksize = chunksize or 1
            if spec is not None:
                bar = spec.start(_progress.sized_total(iterables))
            if bar is not None or executor._bar is not None:
                submit = _counting(submit, bar, executor._bar)
            feed = _Feed(executor, submit, _lazy_calls(fn, iterables, chunksize))
            futures = []
            try:
                for _ in range(buffersize):
                    if not feed(futures.append):
                        break
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        if ordered:
            results = _in_order(deque(futures), feed, deadline)
        else:
            arrivals = _Arrivals()
            for f in futures:
                f.add_done_callback(arrivals)
            results = _as_completed(set(futures), arrivals, feed, deadline)
        if bar is not None:
            results = _progress.closing(results, bar)
            weakref.finalize(results, bar.close)  # also when the iterator is dropped before its first item
        return results if chunksize == 1 else _Flat.over(results)
    except BaseException:
        if bar is not None:
            bar.close()
        raise


def _counting(submit: Callable[..., Any], *bars: Progress | None) -> Callable[..., Any]:
    """``submit``, each task of a map also followed by ``bars`` (a chunk counts as its items)."""
    follow = [bar.follow for bar in bars if bar is not None]

    def counted(method: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        fut: Future[Any] = submit(method, args)
        n = len(args[1]) if method is _run_chunk else 1  # a chunk's args: (fn, first column, ...)
        for add in follow:
            add(fut, n)
        return fut

    return counted


def _lazy_calls(fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int) -> Iterator[tuple[Any, ...]]:
    """(method, args) of each task of a lazy map, read from the input as asked for."""
    if chunksize == 1:
        for args in zip(*iterables, strict=False):
            yield fn, args
    elif len(iterables) == 1:
        it = iter(iterables[0])
        while chunk := list(itertools.islice(it, chunksize)):
            yield _run_chunk, (fn, chunk)
    else:
        rows = zip(*iterables, strict=False)
        while batch := list(itertools.islice(rows, chunksize)):
            yield _run_chunk, (fn, *map(list, zip(*batch, strict=True)))


class _Feed:
    """The lazy side of a map: submits the next task when asked.  It holds the
    Executor, so a pool stays up while a lazy map over it is being iterated."""

    __slots__ = ("_calls", "_executor", "_submit")

    def __init__(self, executor: Executor, submit: Callable[..., Any], calls: Iterator[tuple[Any, ...]]) -> None:
        self._executor = executor
        self._submit = submit
        self._calls = calls

    def __call__(self, add: Callable[[Future[Any]], Any]) -> bool:
        """Submit the next task and ``add`` its future; False once the input is exhausted."""
        call = next(self._calls, None)
        if call is None:
            return False
        add(self._submit(*call))
        return True


def _in_order(pending: deque[Future[Any]], feed: _Feed | None, deadline: float | None) -> Generator[Any, None, None]:
    try:
        while pending:
            # the future and its result are nowhere in this frame once yielded (CPython issue 14406)
            yield _result_or_cancel(pending.popleft(), deadline)
            if feed is not None:
                feed(pending.append)
    finally:
        for fut in pending:
            fut.cancel()


def _result_or_cancel(fut: Future[Any], deadline: float | None) -> Any:
    try:
        return fut.result() if deadline is None else fut.result(max(0.0, deadline - time.monotonic()))
    except BaseException:
        if not fut.done():
            fut.cancel()  # timed out or interrupted: nobody waits for it any more
        raise
    finally:
        del fut  # no cycle through a traceback


class _Arrivals:
    """Where the futures of a ``map_unordered`` go as they finish (their done-callback).

    Once the iterator is over it forwards nothing: a task that finishes later
    must not leave its future in a queue that the future's own callback holds,
    a cycle that would keep its result until the next garbage collection."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Future[Any]] | None = queue.SimpleQueue()

    def __call__(self, fut: Future[Any]) -> None:
        q = self._queue
        if q is not None:
            q.put(fut)

    def next(self, deadline: float | None) -> Future[Any]:
        assert self._queue is not None
        try:
            if deadline is None:
                return self._queue.get()
            return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError from None

    def close(self) -> None:
        self._queue = None


def _as_completed(
    pending: set[Future[Any]], arrivals: _Arrivals, feed: _Feed | None, deadline: float | None
) -> Generator[Any, None, None]:
    def add(fut: Future[Any]) -> None:
        pending.add(fut)
        fut.add_done_callback(arrivals)

    try:
        while pending:
            yield _next_done(pending, arrivals, deadline)
            if feed is not None:
                feed(add)
    finally:
        arrivals.close()
        for fut in pending:
            fut.cancel()


def _next_done(pending: set[Future[Any]], arrivals: _Arrivals, deadline: float | None) -> Any:
    fut = arrivals.next(deadline)
    pending.discard(fut)
    try:
        return fut.result()
    finally:
        del fut


def _pop_all(chunk: list[T]) -> Iterator[T]:
    """The items of a chunk (reversed in the worker) in their order, each let go by the list as it is yielded."""
    return itertools.starmap(chunk.pop, itertools.repeat((), len(chunk)))


class _Flat(itertools.chain[T]):
    """The items of the chunks a generator yields, chained in C; ``close()`` closes
    the generator (cancelling the tasks not yet yielded) as a generator's would."""

    __slots__ = ("_chunks",)
    _chunks: Generator[list[T], None, None]

    @classmethod
    def over(cls, chunks: Generator[list[T], None, None]) -> _Flat[T]:
        flat = cast("_Flat[T]", cls.from_iterable(map(_pop_all, chunks)))
        flat._chunks = chunks
        return flat

    def close(self) -> None:
        self._chunks.close()
        deque(self, maxlen=0)  # the rest of the current chunk, then nothing
