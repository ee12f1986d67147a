"""A worker's life from both ends: its finalizer always runs after its initializer on a
graceful shut-down, and nothing of the pool outlives a caller killed by SIGKILL.

Real processes and real signals; every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import prefork
from prefork import BossWorker, Executor
from prefork.testing import descendants, pid_alive, reaped, wait_until

# -- every worker that ran its initializer runs its finalizer ---------------------------------


def log_event(directory: str, event: str, delay: float = 0.0) -> None:
    """Append ``event`` to ``directory/<pid>`` (one O_APPEND write: nothing interleaves)."""
    if delay:
        time.sleep(delay)
    fd = os.open(os.path.join(directory, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event}\n".encode())
    finally:
        os.close(fd)


def double(x: int) -> int:
    return 2 * x


def _events(directory: Path) -> dict[int, list[str]]:
    return {int(p.name): p.read_text().split() for p in directory.iterdir()}


def _check_pairs(directory: Path, run: str) -> int:
    """Every pid that logged ``init`` logged ``exit`` after it, once; returns how many did."""
    events = _events(directory)
    unpaired = {pid: ev for pid, ev in events.items() if ev != ["init", "exit"]}
    assert not unpaired, f"run {run}: workers whose init and exit do not pair up: {unpaired}"
    return len(events)


RUNS = 32


@pytest.mark.parametrize("mode", ["forkserver", "direct"])
def test_every_worker_that_ran_its_initializer_runs_its_finalizer(tmp_path: Path, mode: str) -> None:
    """A worker still booting when a graceful shut-down starts is stopped after its
    initializer has completed, never killed between the two: BossWorker's
    init_handler/exit_handler and Executor's initializer/pool.finalizer, many runs."""
    rng = random.Random(1234)
    t0 = time.monotonic()
    workers = 0
    for run in range(RUNS):
        # a slow initializer or finalizer in some runs: shut-down then finds the second
        # worker in its initializer, or still being forked while the first one leaves
        delay = rng.choice([0.0, 0.0, 0.002, 0.02])
        slow_exit = rng.choice([0.0, 0.0, 0.005, 0.03])
        d = tmp_path / f"boss-{run}"
        d.mkdir()
        boss = BossWorker(
            work_handler=double,
            worker_count=2,
            init_handler=functools.partial(log_event, str(d), "init", delay),
            exit_handler=functools.partial(log_event, str(d), "exit", slow_exit),
            overrides={"pool.fork_from": mode},
        )
        boss.add_work(*range(10))
        assert sorted(boss.get_result(timeout=10) for _ in range(10)) == [2 * i for i in range(10)]
        boss.shut_down()
        workers += _check_pairs(d, f"boss-{run}")

        d = tmp_path / f"executor-{run}"
        d.mkdir()
        ex = Executor(
            2,
            initializer=log_event,
            initargs=(str(d), "init", delay),
            overrides={"pool.fork_from": mode, "pool.finalizer": functools.partial(log_event, str(d), "exit", slow_exit)},
        )
        assert list(ex.map(double, range(10))) == [2 * i for i in range(10)]
        ex.shutdown()
        workers += _check_pairs(d, f"executor-{run}")
    assert workers >= 2 * RUNS  # at least the worker that ran the jobs, every time
    assert time.monotonic() - t0 < 45


class SlowServerFork:
    """A plugin that makes the fork server (not the caller) wait before each fork."""

    def __init__(self, delay: float) -> None:
        self.caller = os.getpid()
        self.delay = delay

    @prefork.hookimpl
    def prefork_before_fork(self, worker: object) -> None:
        if os.getpid() != self.caller:
            time.sleep(self.delay)


def test_a_worker_the_supervisor_gave_up_on_during_its_boot_runs_its_finalizer(tmp_path: Path) -> None:
    """Shut-down starts while the second worker's spawn is still in the fork server's
    hands: the supervisor forgets it and closes its socket when it arrives, and the
    first worker takes a while to leave.  The second one completes its initializer
    (READY then fails: broken pipe) and leaves through its finalizer; it is not
    killed when the fork server is stopped."""
    d = tmp_path / "events"
    d.mkdir()
    ex = Executor(
        2,
        initializer=log_event,
        initargs=(str(d), "init", 0.1),
        overrides={
            "pool.finalizer": functools.partial(log_event, str(d), "exit", 0.5),
            "plugins": [SlowServerFork(0.2)],
        },
    )
    t0 = time.monotonic()
    ex.shutdown()
    assert time.monotonic() - t0 < 10
    events = _events(d)
    assert len(events) == 2 and all(ev == ["init", "exit"] for ev in events.values()), events


def init_hanging_in_the_servers_workers(directory: str, caller: int) -> None:
    """An initializer that never ends in a worker the fork server forked."""
    log_event(directory, "begin")
    if os.getppid() != caller:
        time.sleep(60)
    log_event(directory, "init")


def test_a_graceful_stop_waits_for_a_worker_stuck_in_its_initializer_only_so_long(tmp_path: Path) -> None:
    """The fork server's wait for the workers the supervisor gave up on is bounded
    (``ForkServer.stop_grace``): one stuck in its initializer is killed then."""
    d = tmp_path / "events"
    d.mkdir()
    ex = Executor(
        2,
        initializer=init_hanging_in_the_servers_workers,
        initargs=(str(d), os.getpid()),
        overrides={"plugins": [SlowServerFork(0.2)]},  # shut-down begins before it forks
    )
    ex._sup.spawner.stop_grace = 1.0
    t0 = time.monotonic()
    ex.shutdown()
    assert time.monotonic() - t0 < 5
    events = sorted(_events(d).values())
    assert events == [["begin"], ["begin", "init"]], events


# -- the caller dies by SIGKILL: nothing of the pool outlives it --------------------------------

_CALLER_SCRIPT = '''
import json, multiprocessing, os, subprocess, sys, time

import prefork


def hold(path, subprocess_too):
    """A task: start `sleep 60` (in this worker's process group) if asked, then block."""
    child = subprocess.Popen(["sleep", "60"]).pid if subprocess_too else 0
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child}")
    os.rename(path + ".tmp", path)
    time.sleep(60)


if __name__ == "__main__":
    mode, out, subprocess_too, with_mp = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    ex = prefork.Executor(2, overrides={"pool.fork_from": mode, "pool.prefetch": 1})
    paths = [os.path.join(out, f"task-{i}") for i in range(2)]
    for path in paths:
        ex.submit(hold, path, subprocess_too)
    end = time.monotonic() + 20
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < end, "the tasks never started"
        time.sleep(0.01)
    tasks = [list(map(int, open(p).read().split())) for p in paths]
    mp = 0
    if with_mp:  # forked after the pool: it inherits every descriptor of this process
        proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        proc.start()
        mp = proc.pid
    server = getattr(ex._sup.spawner, "pid", None)
    print(json.dumps({"workers": [w for w, _ in tasks], "sleeps": [s for _, s in tasks if s],
                      "server": server, "mp": mp}), flush=True)
    time.sleep(60)  # the test kills us
'''


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"no line from the script within {timeout} s"
    return proc.stdout.readline()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@pytest.mark.parametrize(
    ("mode", "subprocess_too", "with_mp"),
    [
        ("forkserver", True, False),  # the caller-forked first worker's sleep, the served one's
        ("forkserver", True, True),  # ... with a multiprocessing child holding every socket
        ("direct", False, True),  # direct: workers die by PDEATHSIG (see docs/reliability.md)
    ],
)
def test_nothing_of_the_pool_outlives_a_caller_killed_by_sigkill(
    prefork_subreaper: None, tmp_path: Path, mode: str, subprocess_too: bool, with_mp: bool
) -> None:
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(_CALLER_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path), str(int(subprocess_too)), str(int(with_mp))],
        stdout=subprocess.PIPE, text=True,
    )
    recorded: set[int] = set()
    mp = 0
    try:
        info = json.loads(_read_line(proc, 30))
        mp = info["mp"]
        recorded = descendants(proc.pid) - {mp}
        pool = set(info["workers"]) | set(info["sleeps"]) | ({info["server"]} if info["server"] else set())
        assert pool <= recorded, (pool, recorded)
        if mode == "forkserver":
            assert proc.pid in {_parent_of(w) for w in info["workers"]}  # one worker is the caller's own child
        if subprocess_too:
            assert len(info["sleeps"]) == 2
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        try:
            wait_until(lambda: not [p for p in recorded if pid_alive(p)], timeout=5)
        except AssertionError:
            alive = {p: _cmdline(p) for p in recorded if pid_alive(p)}
            raise AssertionError(f"5 s after the caller's SIGKILL these still live: {alive}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if mp:  # the caller's own child, which the pool has no business killing
            try:
                os.kill(mp, signal.SIGKILL)
            except ProcessLookupError:
                pass
            recorded.add(mp)
        for pid in recorded:  # orphans come to this subreaper
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in recorded:
            wait_until(lambda pid=pid: reaped(pid), timeout=5, what=f"{pid} to be reaped")


# -- no descriptor of the pool leaks into a worker or into an exec'd child ------------------


def fd_targets(pid: int) -> dict[int, str]:
    """``ls -l /proc/<pid>/fd``: fd -> what it points to."""
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor, in our own table)
    return targets


def _plumbing(targets: dict[int, str], before: set[str]) -> set[str]:
    """Sockets, pipes, pidfds, epolls and memfds not among ``before``.  (A program being
    exec'd briefly holds the libraries its loader opens: those are not the pool's.)"""
    kinds = ("socket:", "pipe:", "anon_inode:", "/memfd:")
    return {t for t in targets.values() if t.startswith(kinds) and t not in before}


def popen_and_wait(out: str, gate: str) -> int:
    """A task: start `sleep 60` with close_fds=False, report both pids, wait for ``gate``."""
    child = subprocess.Popen(["sleep", "60"], close_fds=False)
    try:
        path = os.path.join(out, f"task-{os.getpid()}")
        with open(path + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.rename(path + ".tmp", path)
        end = time.monotonic() + 20
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()
    return os.getpid()


@pytest.mark.parametrize("mode", ["forkserver", "direct"])
def test_a_worker_holds_only_its_channel_and_exec_children_inherit_no_pool_descriptor(tmp_path: Path, mode: str) -> None:
    before = set(fd_targets(os.getpid()).values())  # pytest's own: not the pool's business
    gate = str(tmp_path / "gate")
    ex = Executor(2, overrides={"pool.fork_from": mode, "pool.prefetch": 1})
    caller_sleep = None
    try:
        # Both workers forked before this thread opens anything: a direct fork (from the loop's
        # thread) copies whatever another thread of the caller holds open at that instant (the
        # directory glob() below scans, say), and that is the caller's, not the pool's.
        ex.submit(abs, -1).result(10)
        wait_until(lambda: (s := ex.stats())["workers"] == 2 and not s["booting"], what="both workers up")
        futures = [ex.submit(popen_and_wait, str(tmp_path), gate) for _ in range(2)]
        wait_until(lambda: len(list(tmp_path.glob("task-*[0-9]"))) == 2, what="both tasks running")
        # a subprocess of the caller, started after the pool, with close_fds=False as well
        caller_sleep = subprocess.Popen(["sleep", "60"], close_fds=False)
        tasks = {int(p.name.split("-")[1]): int(p.read_text()) for p in tmp_path.glob("task-*[0-9]")}
        assert set(tasks) == set(ex.pids())
        if mode == "forkserver":  # one forked by the caller, one by the fork server
            assert sorted(_parent_of(w) == os.getpid() for w in tasks) == [False, True]
        for worker, sleep in tasks.items():
            new = sorted(set(fd_targets(worker).values()) - before)
            sockets = [t for t in new if t.startswith("socket:")]
            stack = [t for t in new if t.startswith(f"/memfd:prefork-stack-{worker}")]
            claims = [t for t in new if t.startswith("/memfd:prefork-claims")]  # the take-back locks
            assert len(sockets) == 1 and len(stack) == 1 and len(claims) == 1 and len(new) == 3, f"worker {worker} holds {new}"
            assert not _plumbing(fd_targets(sleep), before), f"its exec'd child holds {fd_targets(sleep)}"
        caller_new = _plumbing(fd_targets(caller_sleep.pid), before)
        assert not caller_new, f"an exec'd child of the caller holds {caller_new}"
        Path(gate).touch()
        assert sorted(f.result(10) for f in futures) == sorted(tasks)
    finally:
        Path(gate).touch()
        if caller_sleep is not None:
            caller_sleep.kill()
            caller_sleep.wait(10)
        ex.shutdown()
