"""The fork server: where workers come from, and what happens when it dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import prefork
from prefork.testing import pid_alive, reaped, wait_until


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])




def test_workers_are_children_of_the_fork_server() -> None:
    with prefork.Executor(2) as ex:
        ex.submit(int).result(10)
        server = ex._sup.spawner.pid
        assert parent_of(server) == os.getpid()
        assert all(parent_of(pid) == server for pid in ex.pids())


def test_direct_mode_forks_from_the_caller() -> None:
    with prefork.Executor(1, overrides={"pool.fork_from": "direct"}) as ex:
        ex.submit(int).result(10)
        assert [parent_of(pid) for pid in ex.pids()] == [os.getpid()]


def test_a_dead_fork_server_is_replaced_and_its_tasks_answered(prefork_subreaper: None) -> None:
    ex = prefork.Executor(1)
    try:
        running = ex.submit(time.sleep, 30)
        queued = ex.submit(os.getpid)
        wait_until(lambda: ex.stats()["busy"] == 1, what="a busy worker")
        old_server, old_worker = ex._sup.spawner.pid, ex.pids()[0]
        os.kill(old_server, signal.SIGKILL)
        with pytest.raises(prefork.WorkerLost, match="unknown exit status"):
            running.result(10)
        new_pid = queued.result(10)  # never started: it runs on a worker of the new server
        assert new_pid != old_worker
        assert ex._sup.spawner.pid != old_server
        assert not pid_alive(old_worker)
    finally:
        ex.shutdown()
    wait_until(lambda: reaped(old_worker), what="the orphaned worker to be reaped")



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
