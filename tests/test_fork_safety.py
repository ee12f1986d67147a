"""Forking and threads on Python 3.12+ (docs/reliability.md, "Forking and threads").

Python 3.12 and later warn (``DeprecationWarning: This process ... is multi-threaded,
use of fork() may lead to deadlocks in the child``) at every ``os.fork()`` made while
the process has more than one thread.  prefork forks at a pool's start, before any
thread of its own runs, and every later worker from its single-threaded fork
server: a caller with no threads of its own never sees that warning.  Each
scenario runs in a child Python under ``-W always::DeprecationWarning`` and fails if
the warning is printed.  (Not ``-W error``: the warning is issued after the fork,
and CPython drops it silently when the filter would turn it into an exception.)
Older Pythons do not warn: there the tests are skipped (CI runs them on 3.12 and
3.13 through ``nox``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.version_info < (3, 12), reason="Python warns about fork() with threads from 3.12 on")

WARNING = "is multi-threaded, use of fork() may lead to deadlocks"

SCENARIOS = textwrap.dedent(
    """
    import os
    import sys
    import threading

    import prefork
    from prefork import mpm

    def square(x):
        return x * x

    def child_body():
        mpm.yell({"pid": os.getpid()})
        mpm.exit(0)

    def executor():
        # recycled after each task: every replacement is forked while the supervisor's thread runs
        with prefork.Executor(2, overrides={"pool.max_tasks_per_child": 1}) as pool:
            assert [pool.submit(square, x).result(30) for x in range(4)] == [0, 1, 4, 9]
            assert list(pool.map(square, range(6), progress="force")) == [0, 1, 4, 9, 16, 25]
        # a pool started after that bar was closed: no thread of the bar (nor tqdm's monitor) is left
        with prefork.Executor(1) as pool:
            assert pool.submit(square, 3).result(30) == 9

    def sequential_pools():
        # each pool forks right after the one before it shut down (its threads joined:
        # before Python 3.13 the kernel may not have let them go yet)
        for x in range(40):
            with prefork.Executor(1, progress="force") as pool:
                assert pool.submit(square, x).result(30) == x * x

    def scaling_up():
        overrides = {"scaling.name": "on-demand", "scaling.pre_fork": 1, "scaling.max_forks": 3,
                     "scaling.spawn_delay": 0.0}
        with prefork.Executor(overrides=overrides) as pool:
            assert sum(pool.map(square, range(40), chunksize=1)) == sum(x * x for x in range(40))

    def control_endpoints():
        # the control socket's thread runs while recycled workers are forked
        with prefork.Executor(1, overrides={"control.enabled": True, "pool.max_tasks_per_child": 1}) as pool:
            assert [pool.submit(square, x).result(30) for x in range(3)] == [0, 1, 4]

    def boss_worker():
        with prefork.BossWorker(work_handler=square, worker_count=2, progress="force") as boss:
            boss.add_work(*range(10))
            results = []
            while boss.pending():
                results.append(boss.get_result(timeout=30))
        assert sorted(results) == [x * x for x in range(10)]

    def dispatcher():
        answers = []
        with prefork.Dispatcher(methods={"square": lambda sender, x: x * x}, progress="force",
                                upon_result=lambda request, response: answers.append(response)) as d:
            for i in range(5):
                d.new_request({"method_name": "square", "params": [i]})
        assert sorted(answers) == [0, 1, 4, 9, 16]

    def mpm_kid_new():
        server = mpm.MPM(start_servers=2, min_spare_servers=1, max_spare_servers=2, max_servers=2)
        try:
            for _ in range(2):
                pid = server.kid_new()
                if pid == 0:
                    mpm.exit(0)
                assert pid > 0
        finally:
            server.done()

    def mpm_data_hook_process():
        # the data-hook process is forked too, and the children by the fork server
        got = []
        server = mpm.MPM(start_servers=2, min_spare_servers=0, max_spare_servers=2, max_servers=2,
                         child_data_hook=lambda pid, data, code: None, data_hook_in_main=False)
        try:
            for _ in range(20):
                if server.whip_kids(child_body, (), timeout=0.2) is None:
                    raise AssertionError("the children cannot boot")
                got.append(1)
        finally:
            server.done()

    assert threading.active_count() == 1
    globals()[sys.argv[1]]()
    assert threading.active_count() == 1, threading.enumerate()
    print("ok")
    """
)

CALLER_WITH_A_THREAD = textwrap.dedent(
    """
    import sys
    import threading

    import prefork

    def square(x):
        return x * x

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    with prefork.Executor(2, overrides={"pool.max_tasks_per_child": 1}) as pool:
        sys.stderr.write("started\\n")  # one write: a warning from another thread cannot split it
        sys.stderr.flush()
        # each task recycles its worker: 6 forks, by the fork server
        assert [pool.submit(square, x).result(30) for x in range(6)] == [x * x for x in range(6)]
        sys.stderr.write("tasks done\\n")
        sys.stderr.flush()
    stop.set()
    thread.join()
    print("ok")
    """
)


PREFORKS_OWN_THREADS = textwrap.dedent(
    """
    import os
    import signal
    import sys
    import time

    import prefork
    from prefork import mpm

    def square(x):
        return x * x

    def started():
        sys.stderr.write("started\\n")  # one write: a warning from another thread cannot split it
        sys.stderr.flush()

    def direct():
        # the supervisor's own thread forks every worker
        with prefork.Executor(1, overrides={"pool.fork_from": "direct", "pool.max_tasks_per_child": 1}) as pool:
            started()
            assert [pool.submit(square, x).result(30) for x in range(3)] == [0, 1, 4]

    def fork_server_replaced():
        with prefork.Executor(1) as pool:
            assert pool.submit(square, 2).result(30) == 4
            old = pool._sup.spawner.pid
            started()
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while pool._sup.spawner.pid in (0, old) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.submit(square, 3).result(30) == 9

    def mpm_kid_new_with_control():
        # kid_new forks in the caller's thread while the control socket's thread serves
        server = mpm.MPM(start_servers=2, min_spare_servers=1, max_spare_servers=2, max_servers=2,
                         overrides={"control.enabled": True})
        started()
        try:
            for _ in range(2):
                pid = server.kid_new()
                if pid == 0:
                    mpm.exit(0)
                assert pid > 0
        finally:
            server.done()

    def second_pool():
        # the first pool's threads (its supervisor's) run while the second one forks
        with prefork.Executor(1) as first:
            started()
            with prefork.Executor(1) as second:
                assert first.submit(square, 2).result(30) + second.submit(square, 3).result(30) == 13

    globals()[sys.argv[1]]()
    print("ok")
    """
)


def _run(tmp_path: Path, source: str, *args: str, warnings: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "scenario.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, "-W", warnings, str(script), *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "scenario",
    [
        "executor", "sequential_pools", "scaling_up", "control_endpoints", "boss_worker", "dispatcher",
        "mpm_kid_new", "mpm_data_hook_process",
    ],
)
def test_no_fork_warning_when_the_caller_has_no_threads(tmp_path: Path, scenario: str) -> None:
    proc = _run(tmp_path, SCENARIOS, scenario, warnings="always::DeprecationWarning")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert WARNING not in proc.stderr


@pytest.mark.timeout(150)
def test_a_caller_with_threads_is_warned_at_the_pools_start_only(tmp_path: Path) -> None:
    """The forks at start (the first worker and the fork server) copy a process with
    threads, and Python says so; every worker after them comes from the fork server,
    which has one thread: no warning, whatever the caller's threads do meanwhile."""
    proc = _run(tmp_path, CALLER_WITH_A_THREAD, warnings="always::DeprecationWarning")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    at_start, started, rest = proc.stderr.partition("started\n")
    during, done, _ = rest.partition("tasks done\n")
    assert started and done, proc.stderr
    assert 1 <= at_start.count(WARNING) <= 2, proc.stderr
    assert "prefork/_spawn.py" in at_start or "prefork/_fork.py" in at_start, at_start
    assert during.count(WARNING) == 0, during


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", ["direct", "fork_server_replaced", "mpm_kid_new_with_control", "second_pool"])
def test_where_prefork_forks_beside_its_own_threads_python_warns(tmp_path: Path, scenario: str) -> None:
    """The documented exceptions: ``fork_from = "direct"`` in a pool with a supervisor
    thread, the replacement of a dead fork server (forked by the supervisor's thread),
    a pool that forks in the caller (MPM's ``kid_new``) with its control socket's
    thread running, and a pool started while another one runs.  Each such fork
    copies a process with threads, and Python says so."""
    proc = _run(tmp_path, PREFORKS_OWN_THREADS, scenario, warnings="always::DeprecationWarning")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    _, started, after_start = proc.stderr.partition("started\n")
    assert started, proc.stderr
    assert WARNING in after_start, proc.stderr
