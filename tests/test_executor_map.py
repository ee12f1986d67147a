"""Executor.map and map_unordered: results let go once yielded, per-task timeouts per
item, lazy input with ``buffersize``, results as they complete.

Every test runs real worker processes; tasks that must stay busy wait on a gate
file with their own deadline, and every wait is bounded.
"""

from __future__ import annotations

import gc
import itertools
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prefork
from prefork import Executor
from prefork.testing import wait_for_file, wait_until

# -- tasks (module level: workers are forks and see this module) ----------------------


class Box:
    """A result the caller can watch: every Box alive in this process is in LIVE."""

    def __init__(self, i: int) -> None:
        self.i = i
        LIVE.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Box, (self.i,))


LIVE: weakref.WeakSet[Box] = weakref.WeakSet()


def make_box(i: int) -> Box:
    return Box(i)


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def sleep_then(value: int, delay: float) -> int:
    time.sleep(delay)  # the task's own work, not synchronisation
    return value


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"no {x}")
    return x * 10


def step(i: int, log: str, block_at: int, gate: str) -> int:
    """Append ``i`` to ``log``; item ``block_at`` then waits for ``gate``."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if i == block_at:
        wait_for_file(gate)
    return i


def logged(log: str) -> list[int]:
    try:
        return [int(line) for line in Path(log).read_text().split()]
    except FileNotFoundError:
        return []


def gated(i: int, gate: str) -> int:
    """Item 0 waits for ``gate``; the others return at once."""
    if i == 0:
        wait_for_file(gate)
    return i


class Counted:
    """An endless input that counts the items taken from it."""

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count():
            self.taken += 1
            yield i


def _idle(ex: Executor) -> bool:
    s = ex.stats()
    return s["queued"] == 0 and s["in_flight"] == 0


def _tasks_made(ex: Executor, run: Callable[[], object]) -> int:
    """How many tasks ``run()`` submitted (the supervisor's task ids are a counter)."""
    before = next(ex._sup._ids)
    run()
    return next(ex._sup._ids) - before - 1


MAPS = ["map", "map_unordered"]


# -- results are let go once yielded (CPython issue 14406) ----------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 4])
@pytest.mark.parametrize("method", MAPS)
@pytest.mark.parametrize("buffersize", [None, 3])
def test_each_result_is_let_go_once_yielded(method: str, chunksize: int | None, buffersize: int | None) -> None:
    with Executor(2) as ex:
        results = getattr(ex, method)(make_box, range(12), chunksize=chunksize, buffersize=buffersize)
        seen = []
        for obj in results:
            seen.append(obj.i)
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None, f"result {seen[-1]} is still held after it was yielded"
        assert sorted(seen) == list(range(12))


def test_a_big_chunked_map_holds_no_more_than_it_has_not_yielded_yet() -> None:
    n, chunksize = 2000, 500
    gc.collect()
    base = len(LIVE)
    with Executor(2) as ex:
        results = ex.map(make_box, range(n), chunksize=chunksize)
        wait_until(lambda: _idle(ex), what="every chunk to be done")  # all results are here now
        i = -1
        for obj in results:  # (not enumerate: its reused result tuple would hold the last item)
            i += 1
            assert obj.i == i
            del obj
            # the results not yet yielded, and none of those yielded (none is in a cycle)
            assert len(LIVE) - base == n - i - 1


# -- a per-task timeout is per item -------------------------------------------------------


def _with_timeout(how: str, timeout: float) -> tuple[Executor, Any]:
    if how == "Executor(timeout=)":
        ex = Executor(2, timeout=timeout)
        return ex, ex
    if how == "pool.task_timeout":
        ex = Executor(2, overrides={"pool.task_timeout": timeout})
        return ex, ex
    ex = Executor(2)
    return ex, ex.options(timeout=timeout)


HOW = ["Executor(timeout=)", "pool.task_timeout", "options(timeout=)"]


@pytest.mark.parametrize("method", MAPS)
@pytest.mark.parametrize("how", HOW)
def test_with_a_per_task_timeout_a_map_sends_one_item_per_task(how: str, method: str) -> None:
    ex, pool = _with_timeout(how, 30.0)
    with ex:
        ex.submit(square, 1).result(timeout=10)
        n = 5000
        made = _tasks_made(ex, lambda: sorted(getattr(pool, method)(square, range(n))))
        assert made == n
    with Executor(2) as plain:  # without one, big maps go in chunks
        plain.submit(square, 1).result(timeout=10)
        assert _tasks_made(plain, lambda: list(getattr(plain, method)(square, range(n)))) < n


@pytest.mark.parametrize("method", MAPS)
@pytest.mark.parametrize("how", HOW)
def test_an_explicit_chunksize_with_a_per_task_timeout_is_refused(how: str, method: str) -> None:
    ex, pool = _with_timeout(how, 30.0)
    with ex:
        with pytest.raises(ValueError, match=r"chunksize=5 cannot be used with a per-task timeout \(30 s\)"):
            getattr(pool, method)(square, range(10), chunksize=5)
        with pytest.raises(ValueError, match="per-task timeout"):
            getattr(pool, method)(square, itertools.count(), chunksize=2, buffersize=4)
        assert sorted(getattr(pool, method)(square, range(10), chunksize=1)) == [i * i for i in range(10)]


def test_a_map_of_items_each_well_within_the_timeout_succeeds() -> None:
    # 40 items of 0.1 s on 2 workers: chunked (5 per task, 0.5 s) they would all time out
    with Executor(2, timeout=0.45) as ex:
        ex.submit(square, 1).result(timeout=10)
        assert list(ex.map(sleep_then, range(40), [0.1] * 40)) == list(range(40))


@pytest.mark.parametrize("method", MAPS)
def test_options_timeout_fails_the_slow_item_only(method: str) -> None:
    with Executor(2) as ex:
        results = getattr(ex.options(timeout=0.5), method)(sleep_then, [0, 1, 2], [0.0, 30.0, 0.0])
        got = []
        t0 = time.monotonic()
        with pytest.raises(prefork.TaskTimeout):
            for value in results:
                got.append(value)
        assert time.monotonic() - t0 < 10
        assert 0 in got and 1 not in got


# -- buffersize: lazy input, bounded pending -------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 3])
@pytest.mark.parametrize("method", MAPS)
def test_buffersize_reads_an_endless_input_lazily_and_keeps_pending_bounded(method: str, chunksize: int | None) -> None:
    size, per_task = 4, chunksize or 1
    source = Counted()
    gc.collect()
    base = len(LIVE)
    with Executor(2) as ex:
        results = getattr(ex, method)(make_box, source, buffersize=size, chunksize=chunksize)
        assert source.taken == size * per_task  # submitted now, as in Python 3.14; no more
        seen = []
        for obj in itertools.islice(results, 300):
            seen.append(obj.i)
            del obj
            stats = ex.stats()
            assert stats["queued"] + stats["in_flight"] <= size
            assert len(LIVE) - base <= size * per_task  # the results in the parent
            assert source.taken <= len(seen) + size * per_task
        results.close()  # type: ignore[attr-defined]
        taken = source.taken
        wait_until(lambda: _idle(ex), what="the cancelled tasks to be gone")
        assert source.taken == taken
        if method == "map":
            assert seen == list(range(300))
        else:
            assert len(set(seen)) == 300


@pytest.mark.parametrize("method", MAPS)
def test_buffersize_must_be_a_positive_int_or_none(method: str) -> None:
    with Executor(1) as ex:
        for bad in (0, -1):
            with pytest.raises(ValueError, match="buffersize"):
                getattr(ex, method)(square, range(3), buffersize=bad)
        for wrong in (1.5, "2"):
            with pytest.raises(TypeError, match="buffersize"):
                getattr(ex, method)(square, range(3), buffersize=wrong)
        assert sorted(getattr(ex, method)(square, range(5), buffersize=1)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("method", MAPS)
def test_an_error_of_a_lazy_input_is_raised_by_the_iterator_and_cancels_the_rest(method: str) -> None:
    def broken() -> Iterator[int]:
        yield from range(5)
        raise OSError("the input broke")

    with Executor(2) as ex:
        results = getattr(ex, method)(square, broken(), buffersize=2)
        got = []
        with pytest.raises(OSError, match="the input broke"):
            for value in results:
                got.append(value)
        assert len(got) <= 5
        wait_until(lambda: _idle(ex), what="the pool to be idle")


@pytest.mark.parametrize("method", MAPS)
def test_the_input_raising_while_the_first_tasks_are_submitted_cancels_them(method: str, tmp_path: Path) -> None:
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")

    def broken() -> Iterator[int]:
        yield 0
        yield 1
        raise OSError("the input broke early")

    with Executor(1, overrides={"pool.prefetch": 1}) as ex:
        try:
            with pytest.raises(OSError, match="broke early"):
                getattr(ex, method)(step, broken(), itertools.repeat(log), itertools.repeat(0), itertools.repeat(gate), buffersize=5)
        finally:
            Path(gate).touch()
        wait_until(lambda: _idle(ex), what="the pool to be idle")
    assert logged(log) in ([], [0])  # item 1 was cancelled; item 0 too, unless it had started


# -- map_unordered -----------------------------------------------------------------------------


def test_map_unordered_yields_results_as_they_complete(tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with Executor(2, overrides={"pool.prefetch": 1}) as ex:
        try:
            results = ex.map_unordered(gated, range(10), [gate] * 10)
            # item 0 holds one worker until the gate opens; the other worker does the rest
            first = [next(results) for _ in range(9)]
            assert sorted(first) == list(range(1, 10))
        finally:
            Path(gate).touch()
        assert list(results) == [0]


@pytest.mark.parametrize("chunksize", [None, 2])
def test_map_unordered_raises_a_failed_call_when_its_result_comes(chunksize: int | None) -> None:
    with Executor(2) as ex:
        got = []
        with pytest.raises(KeyError, match="no 3"):
            for value in ex.map_unordered(fail_on_three, range(6), chunksize=chunksize):
                got.append(value)
        assert set(got) <= {0, 10, 20, 40, 50}


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_unordered_timeout_counts_from_the_call(tmp_path: Path, chunksize: int) -> None:
    gate = str(tmp_path / "gate")
    with Executor(1) as ex:
        try:
            results = ex.map_unordered(wait_for_file, [gate] * 3, timeout=0.3, chunksize=chunksize)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                next(results)
            assert time.monotonic() - t0 < 5
        finally:
            Path(gate).touch()


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 120),
    extra=st.integers(0, 3),
    chunksize=st.one_of(st.none(), st.integers(1, 30)),
    buffersize=st.one_of(st.none(), st.integers(1, 8)),
)
def test_both_maps_match_the_builtin_map(n: int, extra: int, chunksize: int | None, buffersize: int | None) -> None:
    xs, ys = list(range(n)), list(range(100, 100 + n + extra))
    expected = list(map(add, xs, ys))
    with Executor(2) as ex:
        assert list(ex.map(add, iter(xs), ys, chunksize=chunksize, buffersize=buffersize)) == expected
        unordered = ex.map_unordered(add, xs, iter(ys), chunksize=chunksize, buffersize=buffersize)
        assert sorted(unordered) == expected


# -- closing early cancels the rest ----------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 2])
@pytest.mark.parametrize("buffersize", [None, 4])
@pytest.mark.parametrize("method", MAPS)
def test_closing_the_iterator_early_cancels_the_tasks_not_yet_yielded(
    tmp_path: Path, method: str, buffersize: int | None, chunksize: int
) -> None:
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    block_at = chunksize  # the first item of the second task
    n = 12
    with Executor(1, overrides={"pool.prefetch": 1}) as ex:
        try:
            results = getattr(ex, method)(
                step, range(n), [log] * n, [block_at] * n, [gate] * n, chunksize=chunksize, buffersize=buffersize
            )
            assert next(results) == 0
            wait_until(lambda: block_at in logged(log), what="the second task to start")
            results.close()
            with pytest.raises(StopIteration):
                next(results)
        finally:
            Path(gate).touch()
        wait_until(lambda: _idle(ex), what="the pool to be idle")
        assert logged(log) == list(range(block_at + chunksize))  # the first two tasks, nothing after


def test_dropping_the_iterator_cancels_the_rest_too(tmp_path: Path) -> None:
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    n = 10
    with Executor(1, overrides={"pool.prefetch": 1}) as ex:
        try:
            results = ex.map(step, range(n), [log] * n, [1] * n, [gate] * n, chunksize=1)
            assert next(results) == 0
            wait_until(lambda: 1 in logged(log), what="the second task to start")
            del results
        finally:
            Path(gate).touch()
        wait_until(lambda: _idle(ex), what="the pool to be idle")
        assert logged(log) == [0, 1]
