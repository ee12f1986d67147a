"""prefork.Executor when things go wrong: crashes, kills, timeouts, dead parents.

Real processes and real signals.  A task that must be running when the test acts
writes a "started" file first; a task that must block waits for a gate file with
its own deadline.  Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import faulthandler
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import prefork
from prefork import Executor
from prefork.testing import pid_alive, reaped, wait_for_file, wait_until

MODES = ["forkserver", "direct"]

# -- tasks ---------------------------------------------------------------------------------


def getpid() -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def exit_with(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    faulthandler.disable()  # pytest's handler would print a stack dump; the signal is what matters
    ctypes.string_at(0)




def mark_and_wait(started: str, gate: str, deadline: float = 10.0) -> int:
    """Append this worker's pid to ``started`` (one line per run), then wait for ``gate``."""
    with open(started, "a") as f:
        f.write(f"{os.getpid()}\n")
    return wait_for_file(gate, deadline)


def record(path: str, value: int) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def fork_grandchild_and_hang(pidfile: str, gate: str) -> None:
    """Fork a grandchild that sleeps, write its pid, then block past any timeout."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(20)  # the grandchild's whole job: outlive the task unless killed
        finally:
            os._exit(0)
    tmp = pidfile + ".tmp"
    Path(tmp).write_text(str(pid))
    os.rename(tmp, pidfile)
    wait_for_file(gate, 20)


def gate_then_exit(started: str, gate: str, code: int) -> None:
    mark_and_wait(started, gate)
    os._exit(code)


def failing_initializer(tag: str) -> None:
    raise RuntimeError(f"initializer refuses: {tag}")


LOCK = threading.Lock()


def locked_one() -> int:
    with LOCK:
        return 1


# -- helpers ---------------------------------------------------------------------------------


def _started_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _wait_started(path: Path, count: int = 1) -> list[int]:
    return wait_until(lambda: len(_started_pids(path)) >= count and _started_pids(path), timeout=10, what=f"{path.name} to show {count} start(s)")


def _wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=timeout, what=f"pids {pids} to be gone")






# -- a worker dies under a task ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_os_exit_fails_only_its_future(mode: str) -> None:
    with Executor(1, overrides={"pool.fork_from": mode}) as ex:
        pid = ex.submit(getpid).result(timeout=10)
        exc = ex.submit(exit_with, 3).exception(timeout=10)
        assert isinstance(exc, prefork.WorkerLost)
        assert isinstance(exc, BrokenProcessPool)
        assert "exit code 3" in str(exc)
        assert exc.started is True
        assert exc.exitcode == 3 and exc.pid == pid
        assert ex.submit(square, 7).result(timeout=10) == 49
        new_pid = ex.submit(getpid).result(timeout=10)
        assert new_pid != pid
        _wait_gone([pid])
        assert ex.pids() == [new_pid]


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_from_outside_fails_only_its_future(tmp_path: Path, mode: str) -> None:
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    with Executor(1, overrides={"pool.fork_from": mode}) as ex:
        try:
            victim = ex.submit(mark_and_wait, str(started), gate)
            [pid] = _wait_started(started)
            os.kill(pid, signal.SIGKILL)
            exc = victim.exception(timeout=10)
            assert isinstance(exc, prefork.WorkerLost) and isinstance(exc, BrokenProcessPool)
            assert "SIGKILL" in str(exc) and "out of memory" in str(exc)
            assert exc.started is True and exc.signal_name == "SIGKILL" and exc.pid == pid
            assert ex.submit(getpid).result(timeout=10) != pid
            assert _started_pids(started) == [pid]  # not run again
        finally:
            Path(gate).touch()


@pytest.mark.parametrize("mode", MODES)
def test_segfault_fails_only_its_future(mode: str) -> None:
    with Executor(1, overrides={"pool.fork_from": mode}) as ex:
        pid = ex.submit(getpid).result(timeout=10)
        exc = ex.submit(segfault).exception(timeout=10)
        assert isinstance(exc, prefork.WorkerLost)
        assert "SIGSEGV" in str(exc)
        assert exc.started is True and exc.signal_name == "SIGSEGV"
        assert ex.submit(square, 3).result(timeout=10) == 9
        assert ex.submit(getpid).result(timeout=10) != pid




@pytest.mark.parametrize("mode", MODES)
def test_task_sent_behind_a_crashing_task_runs_on_the_replacement(tmp_path: Path, mode: str) -> None:
    """With two tasks in flight on one worker (prefetch = 2; the default auto prefetch
    batches short tasks the same way), the second, never started, is redispatched."""
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    with Executor(1, overrides={"pool.fork_from": mode, "pool.prefetch": 2}) as ex:
        try:
            doomed = ex.submit(gate_then_exit, str(started), gate, 3)
            behind = ex.submit(record, str(tmp_path / "behind"), 7)
            [pid] = _wait_started(started)
            wait_until(behind.running, timeout=10, what="the second task to be sent to the same worker")
            Path(gate).touch()
            exc = doomed.exception(timeout=10)
            assert isinstance(exc, prefork.WorkerLost) and exc.started and exc.exitcode == 3
            assert behind.result(timeout=3) == 7  # milliseconds when it works
            assert _started_pids(tmp_path / "behind") != [pid]
            assert len(_started_pids(tmp_path / "behind")) == 1
        finally:
            Path(gate).touch()


def test_task_sent_behind_a_timed_out_task_runs_on_the_replacement(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    with Executor(1, overrides={"pool.prefetch": 2, "pool.kill_grace": 0.2}) as ex:
        try:
            stuck = ex.options(timeout=0.3).submit(mark_and_wait, str(started), gate, 30)
            behind = ex.submit(record, str(tmp_path / "behind"), 7)
            [pid] = _wait_started(started)
            wait_until(behind.running, timeout=10, what="the second task to be sent to the same worker")
            with pytest.raises(prefork.TaskTimeout):
                stuck.result(timeout=10)
            assert behind.result(timeout=3) == 7  # milliseconds when it works
            ran = _started_pids(tmp_path / "behind")
            assert len(ran) == 1 and ran != [pid]
        finally:
            Path(gate).touch()


def test_all_workers_killed_at_once_every_task_answered_once(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    with Executor(2) as ex:
        try:
            running = [ex.submit(mark_and_wait, str(started), gate) for _ in range(2)]
            victims = _wait_started(started, 2)
            assert sorted(victims) == sorted(ex.pids())
            queued = [ex.submit(record, str(tmp_path / f"task-{i}"), i) for i in range(8)]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            for fut in running:
                exc = fut.exception(timeout=10)
                assert isinstance(exc, prefork.WorkerLost) and exc.started
            assert [f.result(timeout=10) for f in queued] == list(range(8))
        finally:
            Path(gate).touch()
        for i in range(8):
            ran = _started_pids(tmp_path / f"task-{i}")
            assert len(ran) == 1, f"task {i} ran {len(ran)} times"
            assert ran[0] not in victims
        assert sorted(_started_pids(started)) == sorted(victims)  # the killed tasks did not run again
        wait_until(lambda: len(ex.pids()) == 2, timeout=10, what="two workers again")
        assert not set(ex.pids()) & set(victims)
        assert sorted(ex.map(square, range(4))) == [0, 1, 4, 9]
    _wait_gone(victims)


# -- timeouts ---------------------------------------------------------------------------------


def _check_timeout_kills_only_that_worker(ex: Executor, tmp_path: Path, submit_slow, submit_other, timeout: float) -> None:  # type: ignore[no-untyped-def]
    slow_started, other_started = tmp_path / "slow", tmp_path / "other"
    gate, other_gate = str(tmp_path / "gate"), str(tmp_path / "other-gate")
    wait_until(lambda: ex.stats()["idle"] == 2, timeout=10, what="two idle workers")
    try:
        slow = submit_slow(mark_and_wait, str(slow_started), gate, 30)
        [slow_pid] = _wait_started(slow_started)
        t0 = time.monotonic()
        other = submit_other(mark_and_wait, str(other_started), other_gate)
        [other_pid] = _wait_started(other_started)
        assert other_pid != slow_pid
        exc = slow.exception(timeout=10)
        assert isinstance(exc, prefork.TaskTimeout) and isinstance(exc, TimeoutError)
        assert time.monotonic() - t0 < timeout + 3
        assert exc.pid == slow_pid and exc.timeout == timeout
        _wait_gone([slow_pid])  # the stuck worker was killed
        assert not other.done()  # the other worker's task was not touched
        Path(other_gate).touch()
        assert other.result(timeout=10) == other_pid
        assert pid_alive(other_pid) and other_pid in ex.pids()
        wait_until(lambda: len(ex.pids()) == 2, timeout=10, what="the stuck worker's replacement")
        assert slow_pid not in ex.pids()
        assert ex.submit(square, 5).result(timeout=10) == 25
    finally:
        Path(gate).touch()
        Path(other_gate).touch()


def test_per_task_timeout_via_options(tmp_path: Path) -> None:
    with Executor(2, overrides={"pool.kill_grace": 0.2}) as ex:
        _check_timeout_kills_only_that_worker(ex, tmp_path, ex.options(timeout=0.3).submit, ex.submit, 0.3)


def test_default_timeout_from_the_constructor(tmp_path: Path) -> None:
    with Executor(2, timeout=0.5, overrides={"pool.kill_grace": 0.2}) as ex:
        assert ex.config.pool.task_timeout == 0.5
        # the other task blocks longer than the default would allow: it gets its own timeout
        _check_timeout_kills_only_that_worker(ex, tmp_path, ex.submit, ex.options(timeout=30).submit, 0.5)


def test_timeout_kills_the_tasks_grandchildren(tmp_path: Path, prefork_subreaper: None) -> None:
    pidfile, gate = tmp_path / "grandchild", str(tmp_path / "gate")
    with Executor(1, overrides={"pool.kill_grace": 0.2}) as ex:
        try:
            fut = ex.options(timeout=0.5).submit(fork_grandchild_and_hang, str(pidfile), gate)
            grandchild = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout=10, what="the grandchild's pid"))
            assert pid_alive(grandchild)
            with pytest.raises(prefork.TaskTimeout):
                fut.result(timeout=10)
            wait_until(lambda: not pid_alive(grandchild), timeout=5, what="the grandchild to be killed")
            # orphaned when its worker died, it re-parented to this test (the subreaper): reap it
            wait_until(lambda: reaped(grandchild), timeout=5, what="the grandchild to be reaped")
            assert ex.submit(square, 2).result(timeout=10) == 4
        finally:
            Path(gate).touch()


# -- boot failures ---------------------------------------------------------------------------


def test_failing_initializer_breaks_the_pool_in_bounded_time() -> None:
    t0 = time.monotonic()
    ex = Executor(1, initializer=failing_initializer, initargs=("tag-17",), overrides={"pool.max_boot_failures": 2})
    try:
        futures = [ex.submit(square, i) for i in range(3)]
        for fut in futures:
            exc = fut.exception(timeout=10)
            assert isinstance(exc, prefork.PoolBroken) and isinstance(exc, BrokenProcessPool)
            text = str(exc)
            assert "failing_initializer" in text
            assert "RuntimeError: initializer refuses: tag-17" in text
        assert time.monotonic() - t0 < 5
    finally:
        ex.shutdown()


def test_submit_to_a_broken_pool_raises_pool_broken() -> None:
    ex = Executor(1, initializer=failing_initializer, initargs=("x",), overrides={"pool.max_boot_failures": 2})
    try:
        first = ex.submit(square, 1)
        assert isinstance(first.exception(timeout=10), prefork.PoolBroken)
        # as concurrent.futures' own process pool does: a broken pool says so on submit
        with pytest.raises(prefork.PoolBroken, match="failing_initializer"):
            ex.submit(square, 2)
    finally:
        ex.shutdown()


# -- the caller dies -------------------------------------------------------------------------

_PARENT_SCRIPT = textwrap.dedent(
    """
    import atexit, json, os, signal, sys, time

    pids = []

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    @atexit.register  # registered before prefork's own handler, so it runs after it
    def report_after_prefork_exit_handler():
        print(json.dumps({"alive_after_atexit": [p for p in pids if alive(p)]}), flush=True)

    import prefork

    mode, ending = sys.argv[1], sys.argv[2]
    ex = prefork.Executor(2, overrides={"pool.fork_from": mode})
    if ending == "sigkill":
        ex.submit(time.sleep, 60)  # still running when the parent dies
    else:
        assert ex.submit(os.getpid).result(10)
    end = time.monotonic() + 10
    while len(ex.pids()) < 2 or (ending == "sigkill" and ex.stats()["busy"] < 1):
        assert time.monotonic() < end, "the workers never came up"
        time.sleep(0.01)
    server = getattr(ex._sup.spawner, "pid", None)
    pids.extend(ex.pids() + ([server] if server else []))
    print(json.dumps({"workers": ex.pids(), "server": server}), flush=True)
    if ending == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    # "exit": leave without shutdown(); prefork's atexit handler must stop the pool
    """
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ending", ["sigkill", "exit"])
def test_the_pool_dies_with_its_parent(prefork_subreaper: None, mode: str, ending: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PARENT_SCRIPT, mode, ending],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == (-signal.SIGKILL if ending == "sigkill" else 0), proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    info = lines[0]
    pids = list(info["workers"]) + ([info["server"]] if info["server"] else [])
    assert len(info["workers"]) == 2
    if ending == "exit":  # the pool was stopped and waited for before the interpreter finished
        assert lines[1:] == [{"alive_after_atexit": []}], proc.stderr
    else:
        assert len(lines) == 1  # SIGKILL: no exit handler ran
    _wait_gone(pids, timeout=2)
    # orphans re-parented to this test (the subreaper) are reaped here; others by init
    for pid in pids:
        wait_until(lambda pid=pid: reaped(pid), timeout=5, what=f"{pid} to be reaped")


# -- forking while a thread holds a lock -----------------------------------------------------


def _hold_lock_then(ex: Executor, then) -> object:  # type: ignore[no-untyped-def]
    release, taken = threading.Event(), threading.Event()

    def holder() -> None:
        with LOCK:
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(10)
        pid = ex.submit(getpid).result(timeout=10)
        exc = ex.submit(exit_with, 3).exception(timeout=10)
        assert isinstance(exc, prefork.WorkerLost)  # the replacement is forked while LOCK is held
        return then(pid)
    finally:
        release.set()
        thread.join(10)


def test_replacement_forked_while_a_thread_holds_a_lock_does_not_deadlock() -> None:
    with Executor(1) as ex:  # the fork server is forked now, before the lock is taken

        def run_locked(old_pid: int) -> None:
            assert ex.options(timeout=5).submit(locked_one).result(timeout=10) == 1
            assert ex.pids() != [old_pid]

        _hold_lock_then(ex, run_locked)


def test_direct_mode_replacement_inherits_a_held_lock() -> None:
    """The documented cost of fork_from = "direct": a fork copies a lock another thread holds."""
    with Executor(1, overrides={"pool.fork_from": "direct", "pool.kill_grace": 0.2}) as ex:

        def run_locked(old_pid: int) -> None:
            with pytest.raises(prefork.TaskTimeout):
                ex.options(timeout=0.5).submit(locked_one).result(timeout=10)

        _hold_lock_then(ex, run_locked)


def spin_in_python_forever() -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass


def sleep_in_c(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.parametrize("fn", [spin_in_python_forever, sleep_in_c])
def test_a_timeout_carries_the_stack_of_the_stuck_worker(fn: Callable[..., None]) -> None:
    with Executor(1) as ex:
        args = () if fn is spin_in_python_forever else (30,)
        with pytest.raises(prefork.TaskTimeout) as info:
            ex.options(timeout=0.3).submit(fn, *args).result(timeout=10)
    assert "stack of the stuck worker" in str(info.value)
    assert f"in {fn.__name__}" in info.value.stack
    assert "Current thread" in info.value.stack


def die_first_times(counter: str, deaths: int) -> int:
    """Dies (SIGKILL, like the OOM killer) the first ``deaths`` times it runs, then succeeds."""
    with open(counter, "a") as f:
        f.write("x")
    if len(Path(counter).read_text()) <= deaths:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def test_crash_retries_run_a_task_again_then_fail_it_as_poison(tmp_path: Path) -> None:
    with Executor(1, overrides={"pool.max_crash_retries": 2}) as ex:
        survivor = ex.submit(die_first_times, str(tmp_path / "a"), 2)
        assert survivor.result(timeout=20) in ex.pids()  # third run, on a third worker
        poison = ex.submit(die_first_times, str(tmp_path / "b"), 10)
        with pytest.raises(prefork.WorkerLost, match="poison task: 3 workers died running it") as info:
            poison.result(timeout=20)
        assert info.value.signal_name == "SIGKILL"
        assert ex.submit(os.getpid).result(timeout=10) in ex.pids()
    assert (tmp_path / "a").read_text() == "xxx" and (tmp_path / "b").read_text() == "xxx"


def test_without_crash_retries_a_crashed_task_runs_once(tmp_path: Path) -> None:
    with Executor(1) as ex, pytest.raises(prefork.WorkerLost, match="while running the task"):
        ex.submit(die_first_times, str(tmp_path / "c"), 1).result(timeout=10)
    assert (tmp_path / "c").read_text() == "x"


GROWTH: list[bytes] = []


def grow(mib: int) -> int:
    GROWTH.append(b"x" * (mib * 2**20))
    return os.getpid()


def test_a_task_worker_whose_memory_grows_is_recycled_without_losing_tasks() -> None:
    with Executor(1, overrides={"pool.max_rss_mb": 30}) as ex:
        pids = [ex.submit(grow, 25).result(timeout=10) for _ in range(6)]
    # 25 MiB per task against 30 MiB: a worker asks to be recycled after its second task; a task
    # already on its way to it still runs there (nothing is lost), so a worker runs 2 or 3.  (The
    # growth is counted from the worker's boot: memory it inherited and frees after that lowers
    # the count, by a few MiB in a large test process; 20 MiB a task left too thin a margin.)
    runs = [len(list(g)) for _, g in itertools.groupby(pids)]
    assert len(runs) >= 2 and all(n in (2, 3) for n in runs[:-1]) and sum(runs) == 6, pids
    assert len(set(pids)) == len(runs)  # a recycled worker never comes back


HEAP_FREED_BY_THE_PARENT = textwrap.dedent("""
    import itertools, os, sys
    from prefork import Executor

    GROWTH = []

    def grow(mib):
        GROWTH.append(b"x" * (mib * 2**20))
        return os.getpid()

    if __name__ == "__main__":
        # What a process that ran large payloads leaves: its allocator's mmap threshold raised
        # past 25 MiB, and 60 MiB of freed heap below a block still held (so never trimmed).
        big = b"y" * (30 * 2**20)
        del big
        blocks = [b"z" * 2**20 for _ in range(60)]
        held = b"h" * (3 * 2**20)
        del blocks
        with Executor(1, overrides={"pool.max_rss_mb": 30}) as ex:
            pids = [ex.submit(grow, 25).result(timeout=10) for _ in range(6)]
        print([len(list(g)) for _, g in itertools.groupby(pids)])
""")


def test_a_worker_reusing_heap_its_parent_freed_still_counts_that_growth(tmp_path: Path) -> None:
    """The worker's 25 MiB allocations fit in the heap its parent freed, which was resident
    already: without handing that back at boot, two tasks showed no growth at all."""
    script = tmp_path / "heap.py"
    script.write_text(HEAP_FREED_BY_THE_PARENT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout)
    assert len(runs) >= 2 and all(n in (2, 3) for n in runs[:-1]) and sum(runs) == 6, runs


INHERITED: list[bytes] = []


def drop_inherited() -> int:
    INHERITED.clear()  # 60 MiB the worker inherited from the caller: its memory falls below its boot
    return os.getpid()


def test_memory_a_worker_frees_of_what_it_inherited_hides_no_growth() -> None:
    """max_rss_mb counts growth from the lowest the worker has been: a worker that first
    frees 60 MiB it inherited, then grows by 25 MiB a task, still leaves after its second
    growing task (counted from its boot, the growth would stay under zero: never)."""
    INHERITED.append(b"y" * (60 * 2**20))
    try:
        with Executor(1, overrides={"pool.max_rss_mb": 30}) as ex:
            first = ex.submit(drop_inherited).result(timeout=10)
            pids = [ex.submit(grow, 25).result(timeout=10) for _ in range(4)]
    finally:
        INHERITED.clear()
    assert pids[0] == first and pids[-1] != first, (first, pids)


def test_max_worker_age_recycles_idle_and_busy_workers_after_their_tasks() -> None:
    with Executor(1, overrides={"pool.max_worker_age": 0.3}) as ex:
        first = ex.submit(os.getpid).result(timeout=10)
        slow = ex.submit(sleep_then_pid, 0.6)
        assert slow.result(timeout=10) == first  # the old worker finished what it held
        wait_until(lambda: first not in ex.pids(), what="the old worker to leave")
        assert ex.submit(os.getpid).result(timeout=10) != first


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_workers_ignore_sigint_the_supervisor_decides(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    with Executor(1) as ex:
        running = ex.submit(mark_and_wait, str(started), gate, 10)
        (pid,) = _wait_started(started)
        os.kill(pid, signal.SIGINT)  # as a terminal's Ctrl-C would, to the whole foreground group
        Path(gate).touch()
        assert running.result(timeout=10) == pid
        assert ex.pids() == [pid]


def test_cancel_running_kills_only_that_worker(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with Executor(2, cancel_running=True) as ex:
        victim = ex.submit(mark_and_wait, str(started), str(tmp_path / "never"), 30)
        (pid,) = _wait_started(started)
        other = ex.submit(sleep_then_pid, 0.3)
        t0 = time.monotonic()
        assert victim.cancel() is True
        assert victim.cancelled() and victim.done()
        with pytest.raises(CancelledError):
            victim.result(timeout=1)
        wait_until(lambda: not pid_alive(pid), timeout=5, what="the worker to be killed")
        assert time.monotonic() - t0 < 5
        assert other.result(timeout=10) != pid  # the other worker's task is untouched
        assert ex.submit(os.getpid).result(timeout=10) != pid  # and a replacement serves


def test_without_cancel_running_a_running_future_cannot_be_cancelled(tmp_path: Path) -> None:
    started = tmp_path / "started"
    gate = tmp_path / "gate"
    with Executor(1) as ex:
        fut = ex.submit(mark_and_wait, str(started), str(gate), 10)
        wait_until(started.exists, what="the task to start")
        assert fut.cancel() is False
        gate.touch()
        assert fut.result(timeout=10)


def test_ctrl_c_in_a_with_block_cancels_the_queue_and_stops_soon(tmp_path: Path) -> None:
    started = tmp_path / "started"
    t0 = 0.0
    with pytest.raises(KeyboardInterrupt), Executor(1, overrides={"pool.kill_grace": 0.3}) as ex:
        running = ex.submit(mark_and_wait, str(started), str(tmp_path / "never"), 30)
        queued = [ex.submit(os.getpid) for _ in range(5)]
        wait_until(started.exists, what="the task to start")
        t0 = time.monotonic()
        raise KeyboardInterrupt
    assert time.monotonic() - t0 < 5
    assert all(f.cancelled() for f in queued)
    assert isinstance(running.exception(timeout=1), prefork.WorkerLost)


def test_a_task_larger_than_max_frame_fails_alone_with_a_size_error() -> None:
    limit = 100_000
    with Executor(1, overrides={"transport.max_frame": limit}) as ex:
        big = ex.submit(len, b"x" * (2 * limit))
        # many tasks that fit one by one but not together: they are split over frames
        mids = [ex.submit(len, b"y" * 40_000) for _ in range(30)]
        assert [f.result(timeout=20) for f in mids] == [40_000] * 30
        exc = big.exception(timeout=10)
    assert isinstance(exc, ValueError)
    assert "more than transport.max_frame = 100000" in str(exc)


def test_payloads_past_the_record_limit_fail_alone_with_a_size_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefork import _frames

    monkeypatch.setattr(_frames, "MAX_PAYLOAD", 10_000)  # the workers fork after this: they see it too
    with Executor(1) as ex:
        too_big_call = ex.submit(len, b"x" * 20_000)
        too_big_result = ex.submit(bytes, 20_000)
        fine = ex.submit(bytes, 100)
        assert fine.result(timeout=10) == bytes(100)
        pid = ex.pids()[0]
        assert ex.submit(os.getpid).result(timeout=10) == pid  # the worker was kept
    call_error = too_big_call.exception(timeout=10)
    assert isinstance(call_error, ValueError) and "more than the 10000 bytes one call can carry" in str(call_error)
    result_error = too_big_result.exception(timeout=10)
    assert isinstance(result_error, ValueError) and "more than the 10000 bytes one result can carry" in str(result_error)


def test_task_budgets_get_jitter_so_workers_do_not_recycle_together() -> None:
    with Executor(1, overrides={"pool.max_tasks_per_child": 2, "pool.max_tasks_jitter": 3}) as ex:
        pids = [ex.submit(os.getpid).result(timeout=10) for _ in range(40)]
    runs = [len(list(g)) for _, g in itertools.groupby(pids)]
    assert all(2 <= n <= 5 for n in runs[:-1]), runs
    assert len(set(runs[:-1])) > 1, f"no jitter seen in {runs}"


def _parent_handler(signum: int, frame: Any) -> None:  # must never run in a worker
    raise AssertionError("the parent's handler ran")


def test_workers_inherit_no_handler_of_the_parent(tmp_path: Path) -> None:
    old = signal.signal(signal.SIGUSR1, _parent_handler)
    try:
        with Executor(1) as ex:
            started, gate = tmp_path / "started", str(tmp_path / "gate")
            fut = ex.submit(mark_and_wait, str(started), gate, 10)
            (pid,) = _wait_started(started)  # in user code: its death fails the task
            os.kill(pid, signal.SIGUSR1)  # default action in the worker: it dies
            exc = fut.exception(timeout=10)
        assert isinstance(exc, prefork.WorkerLost) and exc.signal_name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, old)


def big_result(n: int) -> bytes:
    return bytes([n % 256]) * (8 * 2**20)


def test_large_results_of_a_recycled_worker_are_drained_before_it_is_reaped() -> None:
    with Executor(1, overrides={"pool.max_tasks_per_child": 1}) as ex:
        results = [ex.submit(big_result, i) for i in range(4)]
        for i, fut in enumerate(results):
            assert fut.result(timeout=20) == bytes([i]) * (8 * 2**20)


def slow_boot() -> None:
    time.sleep(30)


def test_a_worker_stuck_in_boot_is_caught_by_the_boot_timeout() -> None:
    ex = Executor(1, initializer=slow_boot, overrides={"pool.boot_timeout": 0.3, "pool.max_boot_failures": 2})
    try:
        t0 = time.monotonic()
        exc = ex.submit(os.getpid).exception(timeout=20)
        assert isinstance(exc, prefork.PoolBroken)
        assert "did not finish booting within boot_timeout = 0.3 s" in str(exc)
        assert time.monotonic() - t0 < 10
    finally:
        ex.shutdown()
