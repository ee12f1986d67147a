"""prefork.Executor as a concurrent.futures.Executor: what its users rely on.

Every test runs real worker processes.  Tasks that must stay busy wait on a file
the test creates (a "gate"), each with its own deadline, so no wait is unbounded
and nothing is synchronised with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, as_completed, wait
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prefork
from prefork import Executor
from prefork.testing import pid_alive, wait_for_file, wait_until

# -- tasks (module level: workers are forks and see this module) ----------------------


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def with_kwargs(a: int, *, b: int = 0, c: int = 0) -> tuple[int, int, int]:
    return (a, b, c)


def identity(x: object) -> object:
    return x


def getpid() -> int:
    return os.getpid()


def raise_value_error_here(message: str) -> None:
    raise ValueError(message)


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"no {x}")
    return x * 10




def mark_and_wait(started: str, gate: str, deadline: float = 10.0) -> int:
    """Say it started (the file ``started`` holds the worker's pid), then wait for ``gate``."""
    Path(started).write_text(str(os.getpid()))
    return wait_for_file(gate, deadline)


def record(path: str, value: int) -> int:
    """Append one line to ``path`` (a side effect that shows each run); the worker's pid."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def record_pid(path: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def sleep_then(value: int, delay: float) -> int:
    time.sleep(delay)  # the task's own work, not synchronisation
    return value


def make_lock() -> threading.Lock:
    return threading.Lock()


class NeedsTwoArgs(Exception):
    """An exception pickle cannot rebuild: its __init__ wants two arguments, args has one."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"code {code} at {where}")
        self.code = code
        self.where = where


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs(7, "the depths")


_INIT: dict[str, object] = {"calls": 0, "tag": None}


def initializer(directory: str, tag: str) -> None:
    _INIT["calls"] = int(_INIT["calls"]) + 1  # type: ignore[call-overload]
    _INIT["tag"] = tag
    with open(os.path.join(directory, f"init-{os.getpid()}"), "a") as f:
        f.write(f"{tag}\n")


def init_state() -> tuple[int, object, object]:
    return (os.getpid(), _INIT["calls"], _INIT["tag"])


def _gate(tmp_path: Path, name: str = "gate") -> str:
    return str(tmp_path / name)


def _open(gate: str) -> None:
    Path(gate).touch()


# -- results and exceptions -------------------------------------------------------------


def test_result() -> None:
    with Executor(1) as ex:
        assert ex.submit(add, 2, 3).result(timeout=10) == 5
        assert ex.submit(square, 12).result(timeout=10) == 144


def test_kwargs_pass_through() -> None:
    with Executor(1) as ex:
        assert ex.submit(with_kwargs, 1, b=2, c=3).result(timeout=10) == (1, 2, 3)
        assert ex.submit(with_kwargs, 4, c=5).result(timeout=10) == (4, 0, 5)


def test_exception_keeps_type_message_and_remote_traceback() -> None:
    with Executor(1) as ex:
        fut = ex.submit(raise_value_error_here, "bad value 42")
        exc = fut.exception(timeout=10)
        assert type(exc) is ValueError
        assert str(exc) == "bad value 42"
        assert exc.__cause__ is not None
        remote = str(exc.__cause__)
        assert "raise_value_error_here" in remote
        assert "Traceback" in remote and "ValueError: bad value 42" in remote
        with pytest.raises(ValueError, match="bad value 42"):
            fut.result(timeout=10)


def test_exception_that_cannot_be_rebuilt_becomes_remote_task_error() -> None:
    with Executor(1) as ex:
        fut = ex.submit(raise_needs_two_args)
        exc = fut.exception(timeout=10)
        assert isinstance(exc, prefork.RemoteTaskError)
        assert exc.type_name.endswith("NeedsTwoArgs")
        assert "code 7 at the depths" in str(exc)
        assert "raise_needs_two_args" in exc.remote_traceback
        assert "NeedsTwoArgs" in exc.remote_traceback
        assert ex.submit(square, 3).result(timeout=10) == 9  # the pool goes on


# -- future states ----------------------------------------------------------------------


def test_future_states_pending_running_finished(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(1) as ex:
        first = ex.submit(wait_for_file, gate)
        second = ex.submit(square, 5)
        wait_until(first.running, timeout=10, what="the first task to run")
        assert not first.done()
        # one worker, busy: the second waits in the queue
        assert not second.running() and not second.done() and not second.cancelled()
        _open(gate)
        assert first.result(timeout=10) > 0
        assert second.result(timeout=10) == 25
        for fut in (first, second):
            assert fut.done() and not fut.running() and not fut.cancelled()


# -- as_completed and wait ----------------------------------------------------------------


def test_as_completed_yields_every_future() -> None:
    with Executor(2) as ex:
        futures = [ex.submit(square, i) for i in range(8)]
        got = [f.result() for f in as_completed(futures, timeout=10)]
        assert sorted(got) == [i * i for i in range(8)]


def test_as_completed_timeout(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(2) as ex:
        fast = ex.submit(square, 4)
        assert fast.result(timeout=10) == 16
        slow = ex.submit(wait_for_file, gate)
        seen = []
        with pytest.raises(TimeoutError):
            for fut in as_completed([slow, fast], timeout=0.3):
                seen.append(fut)
        assert seen == [fast]
        _open(gate)
        assert slow.result(timeout=10) > 0


def test_wait_first_completed(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(2) as ex:
        slow = ex.submit(wait_for_file, gate)
        fast = ex.submit(square, 3)
        done, not_done = wait([slow, fast], timeout=10, return_when=FIRST_COMPLETED)
        assert done == {fast} and not_done == {slow}
        _open(gate)
        slow.result(timeout=10)


def test_wait_all_completed_with_timeout(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(2) as ex:
        slow = ex.submit(wait_for_file, gate)
        fast = ex.submit(square, 3)
        t0 = time.monotonic()
        done, not_done = wait([slow, fast], timeout=0.3, return_when=ALL_COMPLETED)
        assert time.monotonic() - t0 < 5
        assert done == {fast} and not_done == {slow}
        _open(gate)
        done, not_done = wait([slow, fast], timeout=10, return_when=ALL_COMPLETED)
        assert done == {slow, fast} and not not_done


# -- cancellation and shutdown --------------------------------------------------------------


def test_cancel_pending_futures_never_run(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(1) as ex:
        busy = ex.submit(wait_for_file, gate)
        queued = [ex.submit(record, str(tmp_path / f"ran-{i}"), i) for i in range(4)]
        wait_until(busy.running, timeout=10, what="the gate task to run")
        assert busy.cancel() is False  # running: too late
        for fut in queued[:3]:
            assert fut.cancel() is True
            assert fut.cancelled() and fut.done()
        _open(gate)
        assert busy.result(timeout=10) > 0
        assert queued[3].result(timeout=10) == 3  # queued after the cancelled ones: they were skipped, not delayed
        # a task after them all: anything still to run has run now
        assert ex.submit(square, 2).result(timeout=10) == 4
    for i in range(3):
        assert not (tmp_path / f"ran-{i}").exists(), f"cancelled task {i} ran"
        with pytest.raises(Exception) as info:
            queued[i].result(timeout=0)
        assert type(info.value).__name__ == "CancelledError"
    assert (tmp_path / "ran-3").read_text().count("\n") == 1


def test_shutdown_cancel_futures(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    ex = Executor(1)
    stopper = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True})
    try:
        busy = ex.submit(wait_for_file, gate)
        queued = [ex.submit(record, str(tmp_path / f"ran-{i}"), i) for i in range(3)]
        wait_until(busy.running, timeout=10, what="the gate task to run")
        stopper.start()
        wait_until(lambda: all(f.cancelled() for f in queued), timeout=10, what="the queued futures to be cancelled")
        assert stopper.is_alive()  # shutdown(wait=True) waits for the running task
        _open(gate)
        stopper.join(10)
        assert not stopper.is_alive()
        assert busy.result(timeout=0) > 0  # the running task was let finish
    finally:
        _open(gate)
        if stopper.ident:
            stopper.join(10)
        ex.shutdown()
    assert not any((tmp_path / f"ran-{i}").exists() for i in range(3))


def test_shutdown_without_wait_returns_at_once_and_finishes_the_queue(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    ex = Executor(1)
    try:
        busy = ex.submit(wait_for_file, gate)
        queued = [ex.submit(record, str(tmp_path / f"ran-{i}"), i) for i in range(3)]
        wait_until(busy.running, timeout=10, what="the gate task to run")
        t0 = time.monotonic()
        ex.shutdown(wait=False)
        assert time.monotonic() - t0 < 0.5
        assert not busy.done()
        with pytest.raises(RuntimeError):
            ex.submit(square, 1)
        _open(gate)
        assert busy.result(timeout=10) > 0
        assert [f.result(timeout=10) for f in queued] == [0, 1, 2]
    finally:
        _open(gate)
    for i in range(3):
        assert (tmp_path / f"ran-{i}").read_text().count("\n") == 1
    # the workers and the fork server leave on their own: the leak check waits for that


def test_submit_after_shutdown_raises_runtime_error() -> None:
    ex = Executor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(square, 2)
    with pytest.raises(prefork.PoolShutDown):
        ex.submit(square, 2)
    ex.shutdown()  # a second shutdown is harmless


def test_context_manager_shuts_down() -> None:
    with Executor(2) as ex:
        assert ex.submit(square, 6).result(timeout=10) == 36
        pids = ex.pids()
        server = ex._sup.spawner.pid
        assert pids
    assert ex._sup.stopped
    assert not any(pid_alive(p) for p in [*pids, server])
    with pytest.raises(RuntimeError):
        ex.submit(square, 2)


# -- map ----------------------------------------------------------------------------------


def test_map() -> None:
    with Executor(2) as ex:
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]


def test_map_with_chunksize() -> None:
    with Executor(2) as ex:
        assert list(ex.map(square, range(23), chunksize=5)) == [i * i for i in range(23)]
        assert list(ex.map(square, [], chunksize=5)) == []
        with pytest.raises(ValueError):
            ex.map(square, range(3), chunksize=0)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_multiple_iterables_stop_at_the_shortest(chunksize: int) -> None:
    with Executor(2) as ex:
        assert list(ex.map(add, [1, 2, 3], [10, 20, 30, 40], chunksize=chunksize)) == [11, 22, 33]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_keeps_order_when_later_items_finish_first(chunksize: int) -> None:
    with Executor(2) as ex:
        values = list(range(6))
        delays = [0.3, 0.0, 0.0, 0.2, 0.0, 0.0]
        assert list(ex.map(sleep_then, values, delays, chunksize=chunksize)) == values


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_timeout(tmp_path: Path, chunksize: int) -> None:
    gate = _gate(tmp_path)
    with Executor(1) as ex:
        try:
            results = ex.map(wait_for_file, [gate, gate, gate], timeout=0.3, chunksize=chunksize)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                next(results)
            assert time.monotonic() - t0 < 5
        finally:
            _open(gate)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_exception_propagates_on_iteration(chunksize: int) -> None:
    with Executor(2) as ex:
        results = ex.map(fail_on_three, range(6), chunksize=chunksize)
        assert [next(results) for _ in range(3)] == [0, 10, 20]
        with pytest.raises(KeyError, match="no 3"):
            next(results)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 200), extra=st.integers(0, 3), chunksize=st.one_of(st.none(), st.integers(1, 50)))
def test_map_matches_the_builtin_map_for_any_size_and_chunking(n: int, extra: int, chunksize: int | None) -> None:
    xs, ys = list(range(n)), list(range(100, 100 + n + extra))
    with Executor(2) as ex:
        assert list(ex.map(add, xs, ys, chunksize=chunksize)) == list(map(add, xs, ys))
        assert list(ex.map(square, iter(xs), chunksize=chunksize)) == [x * x for x in xs]


def test_map_without_chunksize_sends_big_maps_in_a_few_chunks_and_small_ones_item_by_item() -> None:
    from prefork.executor import AUTO_CHUNKS_PER_WORKER, AUTO_SMALL_MAP

    with Executor(2) as ex:
        ex.submit(square, 1).result(timeout=10)
        before = next(ex._sup._ids)
        assert list(ex.map(square, range(10_000))) == [i * i for i in range(10_000)]
        assert next(ex._sup._ids) - before - 1 == 2 * AUTO_CHUNKS_PER_WORKER
        small = 2 * AUTO_SMALL_MAP
        before = next(ex._sup._ids)
        assert list(ex.map(square, range(small))) == [i * i for i in range(small)]
        assert next(ex._sup._ids) - before - 1 == small


# -- what can be sent -------------------------------------------------------------------------


def test_lambdas_and_closures() -> None:
    offset = 100

    def make_adder(n: int):  # type: ignore[no-untyped-def]
        return lambda x: x + n + offset

    with Executor(1) as ex:
        assert ex.submit(lambda x: x * 2, 21).result(timeout=10) == 42
        assert ex.submit(make_adder(5), 1).result(timeout=10) == 106
        assert list(ex.map(lambda x: -x, [1, 2])) == [-1, -2]


def test_functions_defined_after_the_pool_started() -> None:
    with Executor(1) as ex:
        ex.submit(square, 1).result(timeout=10)  # the workers exist already

        def late(x: int) -> str:
            return f"late {x} in {os.getpid() != PARENT}"

        PARENT = os.getpid()
        assert ex.submit(late, 3).result(timeout=10) == "late 3 in True"


def test_unpicklable_argument_fails_that_future_only() -> None:
    with Executor(1) as ex:
        fut = ex.submit(identity, threading.Lock())
        exc = fut.exception(timeout=10)
        assert type(exc) is TypeError  # the pickler's own error, as the standard library gives it
        assert "cannot be serialized with 'cloudpickle' (at args[0])" in " ".join(exc.__notes__)
        assert ex.submit(add, 1, 2).result(timeout=10) == 3


def test_unpicklable_result_fails_that_task_only_and_keeps_the_worker() -> None:
    with Executor(1) as ex:
        pid = ex.submit(getpid).result(timeout=10)
        exc = ex.submit(make_lock).exception(timeout=10)
        assert type(exc) is TypeError
        assert "the task's result (lock) could not be serialized" in " ".join(exc.__notes__)
        assert ex.submit(getpid).result(timeout=10) == pid  # same worker
        assert ex.pids() == [pid]


def test_asyncio_run_in_executor() -> None:
    async def main(ex: Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(ex, square, i) for i in range(4)]
        return list(await asyncio.wait_for(asyncio.gather(*calls), timeout=10))

    with Executor(2) as ex:
        assert asyncio.run(main(ex)) == [0, 1, 4, 9]


# -- workers: initializer, recycling, config, titles, introspection ---------------------------


def test_initializer_runs_once_per_worker(tmp_path: Path) -> None:
    with Executor(2, initializer=initializer, initargs=(str(tmp_path), "tag-x")) as ex:
        states = [ex.submit(init_state).result(timeout=10) for _ in range(10)]
        wait_until(lambda: ex.stats()["idle"] == 2, timeout=10, what="two idle workers")
        pids = ex.pids()
    assert all(calls == 1 and tag == "tag-x" for _, calls, tag in states)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"init-{pid}" for pid in pids)
    for pid in pids:
        assert (tmp_path / f"init-{pid}").read_text() == "tag-x\n"
    assert _INIT == {"calls": 0, "tag": None}  # never in the caller


def test_max_tasks_per_child_replaces_workers(tmp_path: Path) -> None:
    with Executor(1, max_tasks_per_child=2) as ex:
        futures = [ex.submit(record, str(tmp_path / f"task-{i}"), i) for i in range(7)]
        assert [f.result(timeout=10) for f in futures] == list(range(7))
    pids = [int((tmp_path / f"task-{i}").read_text()) for i in range(7)]
    for i in range(7):
        assert (tmp_path / f"task-{i}").read_text().count("\n") == 1, f"task {i} ran more than once"
    per_worker = Counter(pids)
    assert max(per_worker.values()) <= 2
    assert len(per_worker) >= 4


def test_config_from_a_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prefork.toml"
    path.write_text(
        'name = "filepool"\n'
        "[pool]\n"
        "kill_grace = 3.0\n"
        "task_timeout = 7.5\n"
        "[scaling]\n"
        'name = "fixed"\n'
        "workers = 1\n"
    )
    with Executor(config=path) as ex:
        assert ex.config.name == "filepool"
        assert ex.config.pool.kill_grace == 3.0
        assert ex.config.pool.task_timeout == 7.5
        assert ex.submit(square, 3).result(timeout=10) == 9
        assert len(ex.pids()) == 1
    with Executor(config=str(path), overrides={"pool.kill_grace": 0.2}) as ex:
        assert ex.config.pool.kill_grace == 0.2  # the keyword wins over the file
        assert ex.config.pool.task_timeout == 7.5  # the rest is the file's
        assert ex.submit(square, 4).result(timeout=10) == 16


@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_positive(n: int) -> None:
    with pytest.raises(ValueError):
        Executor(n)


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def test_process_titles() -> None:
    with Executor(1, overrides={"name": "titlepool"}) as ex:
        ex.submit(square, 1).result(timeout=10)
        [worker] = ex.pids()
        assert _cmdline(worker).startswith(b"titlepool worker")
        assert _cmdline(ex._sup.spawner.pid).startswith(b"titlepool forkserver")


def test_stats_and_pids(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    with Executor(2) as ex:
        wait_until(lambda: ex.stats()["idle"] == 2, timeout=10, what="two idle workers")
        stats = ex.stats()
        expected = {"workers": 2, "booting": 0, "busy": 0, "idle": 2, "queued": 0, "in_flight": 0, "spawned_total": 2}
        assert {key: stats.get(key) for key in expected} == expected
        pids = ex.pids()
        assert len(set(pids)) == 2 and all(pid_alive(p) for p in pids)
        busy = ex.submit(wait_for_file, gate)
        wait_until(lambda: ex.stats()["busy"] == 1, timeout=10, what="a busy worker")
        stats = ex.stats()
        assert (stats["busy"], stats["idle"], stats["in_flight"]) == (1, 1, 1)
        _open(gate)
        assert busy.result(timeout=10) in pids
        wait_until(lambda: ex.stats()["idle"] == 2, timeout=10, what="two idle workers again")
        assert ex.stats()["in_flight"] == 0
        assert sorted(ex.pids()) == sorted(pids)
    assert ex.pids() == []


def test_future_type() -> None:
    with Executor(1) as ex:
        fut = ex.submit(square, 2)
        assert isinstance(fut, Future)
        fut.result(timeout=10)


MAIN_SCRIPT = '''
import sys
import prefork

BIG = bytes(20_000_000)  # a script's big global: never copied into a task
SETTING = "at start"


class Point:
    def __init__(self, x):
        self.x = x


def work(p):
    return (type(p).__name__, p.x, len(BIG), SETTING)


always = sys.argv[1] == "always"
with prefork.Executor(1, overrides={"serializer.always": always}) as ex:
    SETTING = "changed after start"
    dumps = ex._sup.serializer.dumps
    print("task bytes", len(dumps((work, (Point(1),), {}))))
    print("result", ex.submit(work, Point(2)).result(timeout=30))

    def work(p):  # rebound after start: the workers cannot have this one
        return ("redefined", p.x, SETTING)

    print("task bytes", len(dumps((work, (Point(3),), {}))))
    print("result", ex.submit(work, Point(3)).result(timeout=30))
'''


@pytest.mark.parametrize("mode", ["default", "always"])
def test_main_functions_made_before_the_pool_go_by_reference(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(MAIN_SCRIPT)
    run = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    sizes = [int(line.split()[-1]) for line in lines if line.startswith("task bytes")]
    results = [line.partition(" ")[2] for line in lines if line.startswith("result")]
    if mode == "default":
        # as with multiprocessing: the workers' own copy of the function and its globals
        assert sizes[0] < 1000
        assert results[0] == "('Point', 2, 20000000, 'at start')"
    else:  # cloudpickle for everything: by value, with today's globals
        assert sizes[0] > 20_000_000
        assert results[0] == "('Point', 2, 20000000, 'changed after start')"
    # a function bound after the pool was made travels by value, in both modes
    assert sizes[1] < 20_000_000
    assert results[1] == "('redefined', 3, 'changed after start')"


def frozen_count() -> int:
    import gc

    return gc.get_freeze_count()


def test_workers_keep_inherited_objects_out_of_the_cyclic_gc() -> None:
    # A collection in a worker must not write to what it shares with its parent.
    inherited = [[i] for i in range(20_000)]
    with Executor(1) as ex:
        assert ex.submit(frozen_count).result(timeout=10) >= len(inherited)
    del inherited


def test_many_threads_submitting_one_by_one_each_get_their_own_results() -> None:
    # While the loop sleeps a submitting thread dispatches itself; threads race for that.
    errors: list[BaseException] = []

    def client(base: int) -> None:
        try:
            for i in range(300):
                assert ex.submit(square, base + i).result(timeout=10) == (base + i) ** 2
        except BaseException as exc:
            errors.append(exc)

    with Executor(2) as ex:
        threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert ex.stats()["in_flight"] == 0 and ex.stats()["queued"] == 0


def test_a_timeout_of_a_task_sent_to_an_idle_pool_fires_on_time() -> None:
    # The task reaches the worker from the submitting thread; the loop must still
    # wake for its deadline rather than sleep its full second.
    with Executor(1, overrides={"pool.kill_grace": 0.1}) as ex:
        ex.submit(square, 1).result(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(prefork.TaskTimeout):
            ex.options(timeout=0.2).submit(time.sleep, 5).result(timeout=10)
        assert time.monotonic() - t0 < 0.9


def resolve_in_worker(name: str, *args: Any) -> Any:
    worker = prefork.current_worker()
    assert worker is not None
    return worker.resolve(name)(*args)


def test_code_in_a_worker_resolves_names_as_the_pool_does() -> None:
    with Executor(1, overrides={"resolver.name": "chain", "resolver.methods": {"twice": "operator:mul"}}) as ex:
        assert ex.submit(resolve_in_worker, "twice", 2, 21).result(timeout=10) == 42
        assert ex.submit(resolve_in_worker, "math:sqrt", 16).result(timeout=10) == 4.0
        with pytest.raises(prefork.MethodNotFound, match="no method named 'nope'"):
            ex.submit(resolve_in_worker, "nope").result(timeout=10)
