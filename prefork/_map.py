"""The map machinery of :class:`prefork.Executor`: ``map``, ``map_unordered`` and their
``options(timeout=)`` forms.

::

    input ──▶ tasks: one item each, or a chunk (the arguments as columns, run by
    │         _run_chunk in the worker, results back reversed)
    │         eager: read now, all submitted;  lazy (buffersize): _Feed submits one
    │         more task each time a result is taken
    ▼
    futures ──▶ _in_order (ordered)  or  _Arrivals + _as_completed (as they finish)
            ──▶ results; chunks flattened by _Flat, which lets go of each item it yields

Closing the iterator (or dropping it) cancels the tasks not yet yielded.
"""

from __future__ import annotations

import itertools
import queue
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

from prefork import _progress
from prefork._progress import Progress, ProgressArg

if TYPE_CHECKING:
    from prefork.executor import Executor

T = TypeVar("T")


class MapOptions(TypedDict, total=False):
    """The keyword arguments of every map (``Executor.map``, ``map_unordered``, their
    ``options()`` forms), for the typed overloads of their signatures in ``executor.py``."""

    timeout: float | None
    chunksize: int | None
    buffersize: int | None
    progress: ProgressArg


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
