"""How long a pool lives: a dropped pool shuts down and says where it was made; a
second Ctrl-C kills rather than waits.

Real processes and real signals; every wait is bounded.  The Ctrl-C tests run a
script in a child Python and send SIGINT at the moment that matters (the script
marks where it is going; /proc says when its main thread sleeps there).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

import prefork
from prefork import Executor
from prefork.testing import descendants, pid_alive, reaped, wait_for_file, wait_until


def square(x: int) -> int:
    return x * x


def _gone(pid: int) -> bool:
    """Exited and reaped (by the pool, which reaps its own: not taken from it here)."""
    return not os.path.exists(f"/proc/{pid}")


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, ResourceWarning) and "prefork.Executor" in str(w.message)]


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic collector off: what goes must go by reference counting (no cycle holds it)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- a pool nobody references shuts down ----------------------------------------------


def test_dropped_pools_shut_down_and_warn_where_they_were_made(no_gc: None) -> None:
    threads, fds, children = threading.active_count(), _fd_count(), descendants(os.getpid())
    pids: set[int] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for i in range(10):
            line = sys._getframe().f_lineno + 1
            ex = Executor(2)
            assert ex.submit(square, i).result(timeout=10) == i * i
            pids |= descendants(os.getpid()) - children  # its fork server and workers
            ref = weakref.ref(ex)
            del ex
            assert ref() is None  # gone at once: nothing but the caller held it
    ours = _ours(caught)
    assert len(ours) == 10
    for w in ours:
        assert f"{__file__}:{line}" in str(w.message)
        assert (w.filename, w.lineno) == (__file__, line)  # shown as this line's warning
    assert len(pids) >= 20
    wait_until(lambda: all(_gone(pid) for pid in pids), what="the dropped pools' processes to go")
    wait_until(lambda: threading.active_count() <= threads, what="their supervisor threads to end")
    wait_until(lambda: _fd_count() <= fds, what="their descriptors to be closed")


def test_a_dropped_pool_still_answers_the_futures_it_was_given(no_gc: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ex = Executor(1)
        sup = ex._sup
        futures = [ex.submit(square, i) for i in range(20)]
        results = ex.map(square, range(20))
        del ex
        assert sup._closing  # asked to stop, as shutdown(wait=False) does
        assert [f.result(timeout=10) for f in futures] == [i * i for i in range(20)]
        assert list(results) == [i * i for i in range(20)]
        assert sup.join(10)
    assert len(_ours(caught)) == 1


@pytest.mark.parametrize("how", ["with", "shutdown", "shutdown(wait=False)", "terminate", "kill"])
def test_a_pool_shut_down_by_its_user_does_not_warn(how: str, no_gc: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ex = Executor(1)
        sup = ex._sup
        assert ex.submit(square, 3).result(timeout=10) == 9
        if how == "with":
            with ex:
                pass
        elif how == "shutdown":
            ex.shutdown()
        elif how == "shutdown(wait=False)":
            ex.shutdown(wait=False)
        else:
            getattr(ex, how)()
        del ex
        assert sup.join(10)
    assert _ours(caught) == []


def test_nothing_a_pool_hands_out_holds_it(no_gc: None) -> None:
    """Futures, map iterators, the sink's futures' callbacks: none of them references the
    Executor, so dropping it is enough.  A lazy map (buffersize) does hold it, until it
    is exhausted or closed, since it submits as it goes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ex = Executor(2, cancel_running=True)
        sup = ex._sup
        future = ex.submit(square, 2)
        future.add_done_callback(lambda f: None)
        eager = ex.map(square, range(5), chunksize=2)
        unordered = ex.map_unordered(square, range(5))
        with_options = ex.options(timeout=30).map(square, range(5))
        lazy = ex.map(square, range(100), buffersize=2)
        assert next(lazy) == 0
        holders = [type(r).__name__ for r in gc.get_referrers(ex) if not isinstance(r, type(sys._getframe()))]
        assert holders == ["_Feed"]  # the lazy map's; nothing else
        ref = weakref.ref(ex)
        del ex
        assert ref() is not None and not sup._closing
        lazy.close()  # type: ignore[attr-defined]
        assert ref() is None and sup._closing
        assert future.result(timeout=10) == 4
        assert list(eager) == list(with_options) == [0, 1, 4, 9, 16]
        assert sorted(unordered) == [0, 1, 4, 9, 16]
        assert sup.join(10)
    assert len(_ours(caught)) == 1


def test_a_pool_dropped_in_its_own_supervisor_thread_shuts_down(tmp_path: Path, no_gc: None) -> None:
    """The last reference goes in a future's callback, which runs in the supervisor's
    thread: the finalizer runs there, and must not wait for that thread."""
    gate = tmp_path / "gate"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        holder = [Executor(1)]
        sup = holder[0]._sup
        dropped_in: list[threading.Thread] = []

        def drop(_: object) -> None:
            holder.clear()
            dropped_in.append(threading.current_thread())

        future = holder[0].submit(wait_for_file, str(gate))
        future.add_done_callback(drop)  # before the task can end: the supervisor calls it
        gate.touch()
        assert future.result(timeout=10) > 0
        wait_until(lambda: dropped_in, what="the callback to run")
        assert dropped_in[0] is sup._thread
        assert sup.join(10)
    assert len(_ours(caught)) == 1


def test_a_pool_dropped_while_its_thread_holds_the_supervisor_lock_does_not_deadlock(no_gc: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ex = Executor(1)
        sup = ex._sup
        assert ex.submit(square, 2).result(timeout=10) == 4
        with sup._lock:  # as if the collection happened inside the supervisor's critical section
            del ex
        assert sup.join(10)
    assert len(_ours(caught)) == 1


def _in_join_of_shutdown(ident: int) -> bool:
    """The thread ``ident`` is waiting in ``Thread.join`` called by a ``shutdown``."""
    frame = sys._current_frames().get(ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    # Python 3.13 waits in C (Thread._handle.join): join is then the innermost Python frame
    waiting = "_wait_for_tstate_lock" if sys.version_info < (3, 13) else "join"
    return names[:1] == [waiting] and "shutdown" in names


def test_an_interrupted_shutdown_kills_the_running_tasks_and_raises(tmp_path: Path) -> None:
    """A KeyboardInterrupt (a second Ctrl-C) while shutdown(wait=True) waits for the
    running tasks: they are killed, the teardown is waited for (bounded), and the
    interrupt goes on."""
    gate = tmp_path / "gate"
    ex = Executor(2)
    sup = ex._sup
    futures = [ex.submit(wait_for_file, str(gate), 60.0) for _ in range(2)]
    wait_until(lambda: ex.stats()["busy"] == 2, what="both tasks to run")
    main = threading.main_thread()
    assert threading.current_thread() is main

    def interrupt() -> None:
        wait_until(lambda: _in_join_of_shutdown(main.ident or 0), what="the shutdown to wait")
        signal.pthread_kill(main.ident or 0, signal.SIGINT)

    helper = threading.Thread(target=interrupt)
    helper.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ex.shutdown(wait=True)
        assert sup.stopped  # the kill's teardown was waited for, and did not take long
        assert time.monotonic() - t0 < 5
        for future in futures:
            assert isinstance(future.exception(timeout=5), prefork.WorkerLost)
    finally:
        helper.join(15)
        gate.touch()
        sup.shutdown(wait=True)


# -- Ctrl-C, once and twice ------------------------------------------------------------------
#
# The script marks (a file) where its main thread is going; the test sends SIGINT once
# the mark is there and the main thread sleeps (in the wait the mark announced).  No
# other signal is sent meanwhile: a SIGINT that lands while the main thread is in
# another signal's handler is noticed only when its wait ends.

SCRIPT = """\
import atexit, os, sys, time
import prefork

MARKS = sys.argv[1]

def mark(name):
    open(os.path.join(MARKS, name), "w").close()

def work(seconds):
    mark(str(os.getpid()))  # started
    time.sleep(seconds)  # the task's own work
    return seconds

_terminate = prefork.Executor.terminate

def terminate(self, *args, **kwargs):  # watched, not changed
    mark("terminate")
    return _terminate(self, *args, **kwargs)

prefork.Executor.terminate = terminate
atexit.register(mark, "exiting")  # runs just before prefork's exit hook (last registered, first run)
{body}
"""

BODIES = {
    # Ctrl-C in the map: the with block's terminate() waits up to kill_grace; Ctrl-C again there kills
    "with-map-twice": """
with prefork.Executor(2, overrides={"pool.kill_grace": 60}) as ex:
    list(ex.map(work, [60] * 4, chunksize=1))
""",
    # no with block: Ctrl-C leaves the tasks to the wait at exit; Ctrl-C again there kills
    "atexit-twice": """
ex = prefork.Executor(2)
list(ex.map(work, [60] * 4, chunksize=1))
""",
    # Ctrl-C in an explicit shutdown(wait=True): kill there, and the exit does not wait again
    "shutdown-once": """
ex = prefork.Executor(2)
futures = [ex.submit(work, 60) for _ in range(4)]
mark("shutdown")
ex.shutdown(wait=True)
""",
    # the documented plain case: one Ctrl-C in a with block; kill_grace (1 s) later the tasks are killed
    "with-map-once": """
with prefork.Executor(2) as ex:
    list(ex.map(work, [60] * 4, chunksize=1))
""",
}
#: the mark to wait for before each SIGINT (None: the tasks running is enough)
MARKS: dict[str, list[str | None]] = {
    "with-map-twice": [None, "terminate"],
    "atexit-twice": [None, "exiting"],
    "shutdown-once": ["shutdown"],
    "with-map-once": [None],
}


def _main_thread_sleeps(pid: int) -> bool:
    """The child's main thread is asleep in a wait (a lock, an event: a futex)."""
    try:
        state = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{pid}/task/{pid}/wchan").read_text()
    except OSError:
        return False
    return state == "S" and ("futex" in wchan or wchan in ("", "0"))


@pytest.mark.parametrize("case", list(BODIES))
def test_ctrl_c_stops_soon_and_a_second_one_kills(case: str, tmp_path: Path, prefork_subreaper: None) -> None:
    script, marks, out = tmp_path / "script.py", tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    script.write_text(SCRIPT.format(body=BODIES[case]))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(prefork.__file__)))
    with open(out, "wb") as output:
        proc = subprocess.Popen([sys.executable, str(script), str(marks)], stdout=output, stderr=subprocess.STDOUT, env=env)
    pids: set[int] = set()
    try:
        wait_until(lambda: len([m for m in os.listdir(marks) if m.isdigit()]) == 2, what="both workers to run a task")
        pids = descendants(proc.pid)
        assert {int(m) for m in os.listdir(marks) if m.isdigit()} <= pids
        t0 = time.monotonic()
        for mark in MARKS[case]:
            wait_until(
                lambda mark=mark: (mark is None or (marks / mark).exists()) and _main_thread_sleeps(proc.pid),
                what=f"the script to wait ({mark or 'in the map'}); output:\n{out.read_text()}",
            )
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}: still running 15 s after the last Ctrl-C; output:\n{out.read_text()}")
        assert time.monotonic() - t0 < 10, out.read_text()
        assert proc.returncode == -signal.SIGINT, out.read_text()
        assert "KeyboardInterrupt" in out.read_text()
        wait_until(lambda: all(reaped(pid) for pid in pids), what="the script's pool to be gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            wait_until(lambda pid=pid: reaped(pid), timeout=10, what=f"process {pid} to be reaped")
