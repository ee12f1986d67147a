"""Taking back a task a worker holds but has not started (issue 18).

Long tasks (5 ms or more on average) go two to a worker when the queue is deep,
so that no round trip sits between them; the second is takeable, and a worker
that runs out of work gets it instead of waiting behind the first's slow task.
Real processes: each task appends ``id pid`` to a file (O_APPEND), so that
"every task ran exactly once" is read from what the workers did.  A task that
must block waits for a gate file with its own deadline.  Every wait is bounded.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest

import prefork
from prefork import Executor, _takeback
from prefork._dispatch import LONG_TASK, SHORT_TASK, auto_prefetch, takeable
from prefork._ledger import Ledger
from prefork._task import Task
from prefork.testing import wait_for_file, wait_until

# -- tasks ---------------------------------------------------------------------------------


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def noop() -> None:
    return None


def claims() -> tuple[int, int]:
    """(this worker's pid, take-back claims it made so far)."""
    return os.getpid(), _takeback.claims


def run(path: str, tid: int, seconds: float) -> int:
    """Record that task ``tid`` ran here, then take ``seconds``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tid} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return tid


def run_gated(path: str, tid: int, gate: str) -> int:
    """Record, then wait for ``gate`` (at most 20 s)."""
    run(path, tid, 0.0)
    wait_for_file(gate, 20.0)
    return tid


def runs(path: Path) -> list[tuple[int, int]]:
    """(task id, pid) of every run recorded in ``path``."""
    if not path.exists():
        return []
    return [(int(a), int(b)) for a, b in (line.split() for line in path.read_text().splitlines())]


def warm(ex: Executor, n: int = 20) -> None:
    """Make the moving average of task time long (10 ms): prefetch with take-back."""
    assert [f.result(timeout=10) for f in [ex.submit(nap, 0.01) for _ in range(n)]] == [0.01] * n


def sup(ex: Executor) -> Any:
    return ex._sup


# -- the policy, without processes ---------------------------------------------------------


def test_long_tasks_go_two_to_a_worker_and_takeable_only_when_long() -> None:
    assert auto_prefetch(0.010, queued=10, alive=2) == 2
    assert takeable(0.010, 2) and takeable(LONG_TASK, 2)
    assert not takeable(0.010, 1)  # one at a time: nothing waits behind another task
    assert auto_prefetch(0.010, queued=2, alive=2) == 1  # a shallow queue spreads
    assert auto_prefetch(0.001, queued=10, alive=2) == 2 and not takeable(0.001, 2)  # medium: no lock
    assert auto_prefetch(SHORT_TASK / 2, queued=1000, alive=2) == 64 and not takeable(SHORT_TASK / 2, 64)
    assert not takeable(None, 2)


def test_the_ledger_takes_a_task_back_to_the_front_of_the_queue() -> None:
    ledger = Ledger()
    a, b = object(), object()
    tasks = [Task(i, noop, (), {}) for i in range(1, 5)]
    ledger.queue.append(tasks[3])
    for t in tasks[:2]:
        ledger.give(a, t, 0.0)
    ledger.give(b, tasks[2], 0.0)
    ledger.takeable.update({2, 3})
    ledger.take_back(a, tasks[1])
    assert list(ledger.queue) == [tasks[1], tasks[3]] and tasks[1].holder is None
    assert list(ledger.held(a)) == [tasks[0]] and 2 not in ledger.in_flight and ledger.takeable == {3}
    assert ledger.taken_back == 1
    assert ledger.take() is tasks[1]
    ledger.give(b, tasks[1], 0.0)  # sent again, not takeable this time
    settled = ledger.settle_death(b, last_started=3)  # it ran 3, died before 2
    assert [lost.task for lost in settled.lost] == [tasks[2]] and settled.requeued == [tasks[1]]
    assert ledger.takeable == set()


def test_random_events_leave_every_task_once_and_takeable_within_in_flight() -> None:
    """Give, answer, take back and die in a random order (seeded): each task leaves the
    ledger once, and ``takeable`` only ever names tasks in flight."""
    for seed in range(200):
        rng = random.Random(seed)
        ledger = Ledger()
        holders = [object() for _ in range(3)]
        tasks = [Task(i, noop, (), {}) for i in range(1, 30)]
        ledger.queue.extend(tasks)
        answered: collections.Counter[int] = collections.Counter()
        for _ in range(300):
            h = rng.choice(holders)
            held = ledger.held(h)
            move = rng.random()
            if move < 0.4 and ledger.queue:
                task = ledger.take()
                if task is not None:
                    ledger.give(h, task, 0.0)
                    if rng.random() < 0.5:
                        ledger.takeable.add(task.id)
            elif move < 0.7 and held:
                task = held[0]
                ledger.release(task)
                task.done = True
                answered[task.id] += 1
            elif move < 0.9 and len(held) >= 2 and held[-1].id in ledger.takeable:
                ledger.take_back(h, held[-1])
            elif move >= 0.9 and held:
                settled = ledger.settle_death(h, last_started=held[0].id)
                for lost in settled.lost:
                    lost.task.done = True
                    answered[lost.task.id] += 1
            assert ledger.takeable <= set(ledger.in_flight), seed
        for task in ledger.everything():
            answered[task.id] += 1
        assert all(answered[t.id] == 1 for t in tasks), seed


# -- real pools --------------------------------------------------------------------------


def test_long_tasks_are_prefetched_and_claimed_while_short_ones_take_no_lock() -> None:
    """The gap closes: with 10 ms tasks and a deep queue a worker holds two.  Those take
    the claim (a record lock); 500 no-op tasks afterwards take none."""
    with Executor(1) as ex:
        warm(ex)
        fs = [ex.submit(nap, 0.01) for _ in range(20)]
        wait_until(lambda: any(len(w.inflight) == 2 for w in sup(ex).workers), timeout=5,
                   what="a worker holding a second long task")
        wait(fs, timeout=10)
        assert ex.submit(claims).result(timeout=10)[1] > 0
        for _ in range(3):  # the moving average falls: tasks are short now
            assert [f.result(timeout=10) for f in [ex.submit(noop) for _ in range(100)]] == [None] * 100
        pid, before = ex.submit(claims).result(timeout=10)
        for _ in range(5):
            assert [f.result(timeout=10) for f in [ex.submit(noop) for _ in range(100)]] == [None] * 100
        assert ex.submit(claims).result(timeout=10) == (pid, before)


def test_a_task_prefetched_behind_a_long_one_is_taken_back_and_runs_elsewhere(tmp_path: Path) -> None:
    """The hostage case: X blocks (until the test opens its gate), the shorts submitted
    after it all finish while X still runs, each once; one of them had been sent to X's
    worker and was taken back."""
    log, gate = tmp_path / "runs", str(tmp_path / "gate")
    with Executor(2) as ex:
        try:
            warm(ex)
            x = ex.submit(run_gated, str(log), 0, gate)
            wait_until(lambda: runs(log), timeout=10, what="X to start")
            [(_, x_pid)] = runs(log)
            shorts = [ex.submit(run, str(log), i, 0.01) for i in range(1, 11)]
            _, pending = wait(shorts, timeout=5)
            assert not pending, "a short task waited behind X: it was not taken back"
            assert not x.done()
            assert sup(ex).ledger.taken_back >= 1
            assert sup(ex).status()["totals"]["taken_back"] == sup(ex).ledger.taken_back  # what operators see
            done = runs(log)
            assert sorted(tid for tid, _ in done) == list(range(11))
            assert all(pid != x_pid for tid, pid in done if tid)
            Path(gate).touch()
            assert x.result(timeout=20) == 0
            assert [f.result() for f in shorts] == list(range(1, 11))
            assert sorted(tid for tid, _ in runs(log)) == list(range(11))  # X's worker ran none of them
        finally:
            Path(gate).touch()


@pytest.mark.parametrize("mode", ["forkserver", "direct"])
def test_a_worker_killed_holding_a_takeable_and_a_taken_back_task(tmp_path: Path, mode: str) -> None:
    """Both workers run a blocked task and hold a takeable one; one is SIGKILLed: its
    running task fails with WorkerLost, its takeable one runs exactly once elsewhere.
    Then the same after a take-back: the task taken from the dead worker is not failed
    and does not run again."""
    log, gate = tmp_path / "runs", str(tmp_path / "gate")
    with Executor(2, overrides={"pool.fork_from": mode}) as ex:
        try:
            warm(ex)
            blocked = [ex.submit(run_gated, str(log), i, gate) for i in (0, 1)]
            wait_until(lambda: len(runs(log)) == 2, timeout=10, what="both workers running a blocked task")
            behind = [ex.submit(run, str(log), i, 0.0) for i in range(2, 6)]
            wait_until(lambda: [len(w.inflight) for w in sup(ex).workers] == [2, 2], timeout=5,
                       what="each worker holding a takeable task")
            victim = dict((tid, pid) for tid, pid in runs(log))[0]
            os.kill(victim, signal.SIGKILL)
            exc = blocked[0].exception(timeout=10)
            assert isinstance(exc, prefork.WorkerLost) and exc.started
            Path(gate).touch()
            assert blocked[1].result(timeout=10) == 1
            assert [f.result(timeout=10) for f in behind] == [2, 3, 4, 5]
            done = runs(log)
            assert sorted(tid for tid, _ in done) == list(range(6))
            assert all(pid != victim for tid, pid in done if tid >= 2)

            # a take-back, then the death of the worker it was taken from
            os.unlink(gate)
            log.unlink()
            warm(ex)
            x = ex.submit(run_gated, str(log), 10, gate)
            wait_until(lambda: runs(log), timeout=10, what="X to start")
            [(_, x_pid)] = runs(log)
            taken = sup(ex).ledger.taken_back
            shorts = [ex.submit(run, str(log), i, 0.01) for i in range(11, 21)]
            _, pending = wait(shorts, timeout=5)
            assert not pending and sup(ex).ledger.taken_back > taken
            os.kill(x_pid, signal.SIGKILL)
            exc = x.exception(timeout=10)
            assert isinstance(exc, prefork.WorkerLost) and exc.started
            assert [f.result(timeout=10) for f in shorts] == list(range(11, 21))
            assert sorted(tid for tid, _ in runs(log)) == list(range(10, 21))
        finally:
            Path(gate).touch()


def test_a_process_killed_holding_a_slots_lock_wedges_nothing(tmp_path: Path) -> None:
    """A process that dies inside the lock window (here: a helper that takes one
    worker's slot lock and is SIGKILLed) leaves nothing locked: meanwhile the other
    worker keeps running tasks and the loop keeps turning; afterwards every task ends,
    each run once."""
    log = tmp_path / "runs"
    with Executor(2) as ex:
        warm(ex)
        board = sup(ex).scoreboard
        slot = sup(ex).workers[0].slot
        helper = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, sys, time\n"
             f"fcntl.lockf({board.claims}, fcntl.LOCK_EX, 1, {slot})\n"
             "print('locked', flush=True)\ntime.sleep(30)\n"],
            pass_fds=[board.claims], stdout=subprocess.PIPE, text=True)
        try:
            assert helper.stdout is not None and helper.stdout.readline() == "locked\n"
            fs = [ex.submit(run, str(log), i, 0.01) for i in range(12)]
            # the worker of the locked slot waits to claim its first tasks; the other runs the rest
            wait_until(lambda: sum(f.done() for f in fs) >= 8, timeout=10, what="the other worker to run the rest")
            assert ex.submit(nap, 0.0).result(timeout=10) == 0.0  # the loop is not stuck
            assert sum(f.done() for f in fs) < len(fs)  # what the locked worker holds waits
        finally:
            helper.kill()
            helper.wait(timeout=10)
        assert [f.result(timeout=10) for f in fs] == list(range(12))
        done = runs(log)
        assert sorted(tid for tid, _ in done) == list(range(12))


def test_a_take_back_that_meets_a_held_slot_lock_looks_again_within_milliseconds(tmp_path: Path) -> None:
    """A take-back that finds the slot's lock held (its worker claiming, for microseconds)
    looks again in 1, 2, 4 ... at most 100 ms, not at the loop's next event or tick (up to
    1 s).  Here a helper holds the lock of X's worker while the other worker runs out of
    work: the loop keeps its sleeps short; once the lock is let go, the task held behind X
    is taken back and runs at once, elsewhere."""
    log, gate = tmp_path / "runs", str(tmp_path / "gate")
    with Executor(2) as ex:
        helper = None
        try:
            warm(ex)
            x = ex.submit(run_gated, str(log), 0, gate)
            wait_until(lambda: runs(log), timeout=10, what="X to start")
            [(_, x_pid)] = runs(log)
            [slot] = [w.slot for w in sup(ex).workers if w.pid == x_pid]
            board = sup(ex).scoreboard
            helper = subprocess.Popen(
                [sys.executable, "-c", "import fcntl, sys, time\n"
                 f"fcntl.lockf({board.claims}, fcntl.LOCK_EX, 1, {slot})\n"
                 "print('locked', flush=True)\nsys.stdin.readline()\n"
                 f"fcntl.lockf({board.claims}, fcntl.LOCK_UN, 1, {slot})\n"
                 "print('unlocked', flush=True)\ntime.sleep(30)\n"],
                pass_fds=[board.claims], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert helper.stdin is not None and helper.stdout is not None
            assert helper.stdout.readline() == "locked\n"
            shorts = [ex.submit(run, str(log), i, 0.01) for i in range(1, 5)]
            wait_until(lambda: sum(f.done() for f in shorts) == 3, timeout=10, what="the other worker's shorts")
            held = [f for f in shorts if not f.done()]
            assert len(held) == 1 and any(len(w.inflight) == 2 for w in sup(ex).workers)  # behind X
            for _ in range(3):  # while the lock is held, the loop never sleeps long
                assert sup(ex)._next_wait(time.monotonic()) <= 0.1
                time.sleep(0.05)
            assert not held[0].done()
            helper.stdin.write("go\n")
            helper.stdin.flush()
            assert helper.stdout.readline() == "unlocked\n"
            t0 = time.monotonic()
            assert held[0].result(timeout=10) in range(1, 5)
            assert time.monotonic() - t0 < 0.5, "the take-back waited for the loop's tick"
            assert not x.done() and all(pid != x_pid for tid, pid in runs(log) if tid)
            Path(gate).touch()
            assert x.result(timeout=20) == 0
            assert sorted(tid for tid, _ in runs(log)) == list(range(5))
        finally:
            Path(gate).touch()
            if helper is not None:
                helper.kill()
                helper.wait(timeout=10)


def test_mixed_lengths_every_task_runs_once_and_ends_once(tmp_path: Path) -> None:
    """Randomized (seeded) bursts of long and short tasks: take-backs happen, and every
    task runs exactly once with its own result."""
    log = tmp_path / "runs"
    rng = random.Random(18)
    with Executor(2) as ex:
        warm(ex)
        tid = 0
        futures = {}
        for _burst in range(6):
            for _ in range(rng.randint(6, 14)):
                tid += 1
                seconds = rng.choice([0.2, 0.005, 0.01, 0.01, 0.02, 0.0])
                futures[tid] = ex.submit(run, str(log), tid, seconds)
            wait(list(futures.values()), timeout=30)
        assert all(f.result(timeout=1) == t for t, f in futures.items())
        counts = collections.Counter(t for t, _ in runs(log))
        assert counts == collections.Counter(range(1, tid + 1))
        assert sup(ex).ledger.taken_back >= 1


def test_each_worker_still_runs_exactly_max_tasks_per_child(tmp_path: Path) -> None:
    """A task taken back gives its worker's budget back: every worker that was recycled
    ran exactly max_tasks_per_child tasks, take-backs or not."""
    log = tmp_path / "runs"
    budget = 6
    with Executor(2, overrides={"pool.max_tasks_per_child": budget}) as ex:
        futures = []
        for _round in range(6):
            warmups = [ex.submit(run, str(log), len(futures) + i + 1, 0.01) for i in range(4)]
            futures += warmups
            wait(warmups, timeout=10)  # the average stays long: the next burst is takeable
            futures.append(ex.submit(run, str(log), len(futures) + 1, 0.3))
            futures += [ex.submit(run, str(log), len(futures) + i + 1, 0.01) for i in range(7)]
            wait(futures, timeout=30)
        last = set(ex.pids())
        assert sup(ex).ledger.taken_back >= 1
    assert [f.result(timeout=1) for f in futures] == list(range(1, len(futures) + 1))
    done = runs(log)
    assert collections.Counter(t for t, _ in done) == collections.Counter(range(1, len(futures) + 1))
    per_pid = collections.Counter(pid for _, pid in done)
    recycled = {pid: n for pid, n in per_pid.items() if pid not in last}
    assert recycled and set(recycled.values()) == {budget}, per_pid
    assert all(per_pid[pid] <= budget for pid in last)


def test_a_task_is_taken_back_from_a_worker_told_to_leave(tmp_path: Path) -> None:
    """A reload tells every worker to leave after what it holds: the tasks waiting
    behind the two blocked ones run on the replacements, long before the gate opens."""
    log, gate = tmp_path / "runs", str(tmp_path / "gate")
    with Executor(2) as ex:
        try:
            warm(ex)
            blocked = [ex.submit(run_gated, str(log), i, gate) for i in (0, 1)]
            wait_until(lambda: len(runs(log)) == 2, timeout=10, what="both workers running a blocked task")
            old = {pid for _, pid in runs(log)}
            behind = [ex.submit(run, str(log), i, 0.0) for i in (2, 3, 4)]
            wait_until(lambda: [len(w.inflight) for w in sup(ex).workers] == [2, 2], timeout=5,
                       what="each worker holding a takeable task")
            sup(ex).retire_all("a reload")
            assert [f.result(timeout=10) for f in behind] == [2, 3, 4]
            assert not any(f.done() for f in blocked)
            assert sup(ex).ledger.taken_back >= 2
            assert all(pid not in old for tid, pid in runs(log) if tid >= 2)
            Path(gate).touch()
            assert [f.result(timeout=20) for f in blocked] == [0, 1]
            assert sorted(tid for tid, _ in runs(log)) == [0, 1, 2, 3, 4]
        finally:
            Path(gate).touch()
