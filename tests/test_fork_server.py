"""The fork server: where workers come from, and what happens when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import prefork
from prefork.testing import pid_alive, reaped, wait_for_file, wait_until


def mark_and_wait(started: str, gate: str, deadline: float = 10.0) -> int:
    with open(started, "a") as f:
        f.write(f"{os.getpid()}\n")
    return wait_for_file(gate, deadline)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])




def test_the_first_worker_is_the_callers_child_and_the_others_the_fork_servers() -> None:
    with prefork.Executor(2, overrides={"pool.max_tasks_per_child": 1}) as ex:
        wait_until(lambda: ex.stats()["idle"] == 2, what="two idle workers")
        server = ex._sup.spawner.pid
        assert parent_of(server) == os.getpid()
        parents = sorted(parent_of(pid) for pid in ex.pids())
        assert parents == sorted([os.getpid(), server])  # one forked here at start, one by the server
        first = ex.pids()
        for _ in range(4):  # every worker recycled: the replacements all come from the server
            ex.submit(int).result(10)
        # the last recycled worker may still be leaving (listed by pids()): wait until it has left
        wait_until(
            lambda: not set(ex.pids()) & set(first) and ex.stats()["idle"] == 2 and len(ex.pids()) == 2,
            what="replacements",
        )
        assert all(parent_of(pid) == server for pid in ex.pids())


def test_a_pool_started_from_another_thread_forks_every_worker_in_the_fork_server() -> None:
    # The parent death signal of a worker forked here would belong to that thread.
    made: list[prefork.Executor] = []
    thread = threading.Thread(target=lambda: made.append(prefork.Executor(2)))
    thread.start()
    thread.join(10)
    with made[0] as ex:
        ex.submit(int).result(10)
        wait_until(lambda: ex.stats()["idle"] == 2, what="two idle workers")
        server = ex._sup.spawner.pid
        assert all(parent_of(pid) == server for pid in ex.pids())


def test_direct_mode_forks_from_the_caller() -> None:
    with prefork.Executor(1, overrides={"pool.fork_from": "direct"}) as ex:
        ex.submit(int).result(10)
        assert [parent_of(pid) for pid in ex.pids()] == [os.getpid()]


def test_a_dead_fork_server_is_replaced_and_its_tasks_answered(prefork_subreaper: None, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    started = [tmp_path / f"started-{i}" for i in range(2)]  # one file per task: they start in either order
    ex = prefork.Executor(2)
    try:
        running = [ex.submit(mark_and_wait, str(mark), gate, 30) for mark in started]
        wait_until(lambda: all(mark.exists() and mark.read_text().endswith("\n") for mark in started), what="both tasks running")
        queued = ex.submit(os.getpid)
        old_server = ex._sup.spawner.pid
        (here,) = [p for p in ex.pids() if parent_of(p) == os.getpid()]
        (served,) = [p for p in ex.pids() if parent_of(p) == old_server]
        on_served = running[[int(mark.read_text()) for mark in started].index(served)]
        on_here = running[1 - running.index(on_served)]
        os.kill(old_server, signal.SIGKILL)
        # the server's worker dies with it; the one forked here lives on
        with pytest.raises(prefork.WorkerLost, match="unknown exit status"):
            on_served.result(10)
        new_pid = queued.result(10)  # never started: it runs on a worker of the new server
        assert new_pid not in (here, served)
        assert ex._sup.spawner.pid != old_server and parent_of(new_pid) == ex._sup.spawner.pid
        assert not pid_alive(served) or reaped(served)
        Path(gate).touch()
        assert on_here.result(10) == here
    finally:
        ex.shutdown()
    wait_until(lambda: reaped(served), what="the orphaned worker to be reaped")


def sleep_child_then_wait(out: str, gate: str) -> int:
    """Start `sleep 60` (in this worker's process group), report both pids, wait for ``gate``."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        path = os.path.join(out, f"task-{os.getpid()}")
        with open(path + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.rename(path + ".tmp", path)
        return wait_for_file(gate, 30)
    finally:
        child.kill()
        child.wait()


def test_what_the_tasks_of_a_dead_fork_servers_workers_started_is_killed(prefork_subreaper: None, tmp_path: Path) -> None:
    """The server's workers die with it (parent death signal), too fast to kill their
    own process groups: the supervisor kills those groups, so a task's subprocess
    does not outlive its worker."""
    gate = str(tmp_path / "gate")
    ex = prefork.Executor(2, overrides={"pool.prefetch": 1})
    orphans: list[int] = []
    try:
        futures = [ex.submit(sleep_child_then_wait, str(tmp_path), gate) for _ in range(2)]
        wait_until(lambda: len(list(tmp_path.glob("task-*[0-9]"))) == 2, what="both tasks running")
        sleeps = {int(p.name.split("-")[1]): int(p.read_text()) for p in tmp_path.glob("task-*[0-9]")}
        server = ex._sup.spawner.pid
        (served,) = [w for w in sleeps if parent_of(w) == server]
        (here,) = [w for w in sleeps if w != served]
        orphans = [served, sleeps[served]]
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: not pid_alive(sleeps[served]), timeout=5, what="the served worker's sleep to be killed")
        assert pid_alive(sleeps[here])  # the worker forked here, and its task, live on
        Path(gate).touch()
        results = []
        for fut in futures:
            try:
                results.append(fut.result(10))
            except prefork.WorkerLost:
                results.append(None)
        assert sorted(results, key=str) == sorted([here, None], key=str)
    finally:
        Path(gate).touch()
        ex.shutdown()
        for pid in orphans:  # re-parented to this subreaper
            if pid_alive(pid):  # only when the test failed
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: reaped(pid), what=f"{pid} to be reaped")


LOCK = threading.Lock()


def locked_one() -> int:
    with LOCK:
        return 1


def test_forks_after_a_thread_took_a_lock_do_not_inherit_it() -> None:
    release = threading.Event()
    taken = threading.Event()

    def holder() -> None:
        with LOCK:
            taken.set()
            release.wait(30)

    ex = prefork.Executor(1, overrides={"pool.max_tasks_per_child": 1})
    thread = threading.Thread(target=holder)
    try:
        ex.submit(int).result(10)  # the fork server exists: the lock was free then
        thread.start()
        assert taken.wait(10)
        # every task now runs on a worker forked while our thread holds LOCK
        assert [ex.options(timeout=5).submit(locked_one).result(10) for _ in range(3)] == [1, 1, 1]
    finally:
        release.set()
        thread.join(10)
        ex.shutdown()


def test_at_shutdown_the_fork_server_leaves_with_its_last_worker_and_that_is_no_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ex = prefork.Executor(2)
    ex.submit(int).result(10)
    wait_until(lambda: ex.stats()["idle"] == 2, what="two idle workers")
    server = ex._sup.spawner.pid
    assert any(parent_of(pid) == server for pid in ex.pids())
    with caplog.at_level("INFO", logger="prefork"):
        ex.shutdown()
    assert ex._sup.spawner.draining
    assert reaped(server)
    assert "fork server died" not in caplog.text
