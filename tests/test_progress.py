"""Progress bars (``progress=``): Executor.map / map_unordered, the Executor's own bar,
BossWorker and Dispatcher; prefork/_progress.py; and docs/progress.md, run.

Real pools throughout.  Most tests give a *recording* bar factory (``Bars``) so
that they can check exactly what prefork did to a bar: its total, the steps it
was given, that it was closed exactly once and never touched afterwards.  Others
read real tqdm output from a pipe, a pseudo-terminal or pytest's ``capfd``.
Tasks that must stay busy wait on a gate file with a deadline of their own.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import reprlib
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm import tqdm  # type: ignore[import-untyped]

from prefork import BossWorker, Dispatcher, Executor, PreforkError, _progress
from prefork._progress import MissingExtra, bar_for_run, declared_total
from prefork.testing import wait_for_file, wait_until

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "progress.md"
WAIT = 20.0  # seconds for any one outcome on a loaded machine

# -- tasks (module level: the workers are forks and see this module) ----------------------------


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def gated(x: int, gate: str) -> int:
    wait_for_file(gate, WAIT)
    return x


def interrupt_caller_then_sleep(pid: int, gate: str) -> None:
    wait_for_file(gate, WAIT)
    os.kill(pid, signal.SIGINT)  # Ctrl-C, as the caller's terminal would send it
    time.sleep(WAIT)  # the task's own work: the pool's terminate() kills this worker long before


def job(x: int) -> int:
    if x < 0:
        raise ValueError("negative job")
    return 2 * x


def gated_job(gate: str) -> str:
    wait_for_file(gate, WAIT)
    return "ran"


def add(sender: Any, a: int, b: int) -> int:
    return a + b


def gated_request(sender: Any, gate: str) -> str:
    wait_for_file(gate, WAIT)
    return "answered"


# -- a bar that records what prefork does to it ---------------------------------------------------


class Recorder:
    """A bar: ``update`` and ``close`` as tqdm's, each call recorded."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.made_with = total
        self.n = 0
        self.closed = 0
        self.late = 0  # calls after close()
        self.threads: set[str] = set()

    def update(self, n: int = 1) -> None:
        self.late += bool(self.closed)
        self.threads.add(threading.current_thread().name)
        self.n += n

    def refresh(self) -> None:
        self.late += bool(self.closed)

    def close(self) -> None:
        self.closed += 1


class Bars:
    """A bar factory (``progress=bars``) that keeps every bar it made."""

    def __init__(self) -> None:
        self.made: list[Recorder] = []

    def __call__(self, total: int | None = None) -> Recorder:
        bar = Recorder(total)
        self.made.append(bar)
        return bar

    def only(self) -> Recorder:
        assert len(self.made) == 1, f"{len(self.made)} bars made"
        return self.made[0]


def closed_once(bar: Recorder) -> None:
    assert bar.closed == 1, f"closed {bar.closed} times"
    assert bar.late == 0, "the bar was updated after it was closed"


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefork-progress"]


@pytest.fixture(autouse=True)
def _no_bar_left_open() -> Iterator[None]:
    yield
    wait_until(lambda: not progress_threads(), timeout=WAIT, what="every bar's thread to end")


@pytest.fixture(scope="module")
def ex() -> Iterator[Executor]:
    with Executor(2) as pool:
        # both workers up before any test looks for leaked processes (the pool outlives the tests)
        wait_until(lambda: len(pool.pids()) == 2, timeout=WAIT, what="two workers")
        yield pool


def lazy(n: int) -> Iterator[int]:
    yield from range(n)


# -- Executor.map: counts, totals, one close --------------------------------------------------------

MAPS = ["map", "map_unordered"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 150),
    chunksize=st.one_of(st.none(), st.integers(1, 9)),
    buffersize=st.one_of(st.none(), st.integers(1, 6)),
    method=st.sampled_from(MAPS),
    sized=st.booleans(),
    bad=st.one_of(st.none(), st.integers(0, 149)),
)
def test_a_map_bar_counts_every_item_and_is_closed_once(
    ex: Executor, n: int, chunksize: int | None, buffersize: int | None, method: str, sized: bool, bad: int | None
) -> None:
    bars = Bars()
    items = list(range(n)) if sized else lazy(n)
    fails = bad is not None and bad < n
    results = getattr(ex, method)(
        fail_on, items, [bad if bad is not None else -1] * n, chunksize=chunksize, buffersize=buffersize, progress=bars
    )
    got: list[int] = []
    if fails:
        with pytest.raises(ValueError, match="is bad"):
            got.extend(results)
    else:
        got.extend(results)
        assert sorted(got) == list(range(n))
    bar = bars.only()
    closed_once(bar)
    assert bar.threads <= {"prefork-progress"}  # drawn from the bar's thread, never the supervisor's
    expected_total = n if (sized or buffersize is None) else None
    assert bar.made_with == expected_total
    if fails:
        assert len(got) + 1 <= bar.n <= n  # the failed item counts (with its chunk), and nothing twice
    else:
        assert bar.n == n


@pytest.mark.parametrize("method", MAPS)
def test_an_item_that_raises_is_counted(ex: Executor, method: str) -> None:
    bars = Bars()
    got: list[int] = []
    with pytest.raises(ValueError, match="item 4 is bad"):
        got.extend(getattr(ex, method)(fail_on, range(5), [4] * 5, progress=bars))
    bar = bars.only()
    closed_once(bar)
    assert bar.made_with == 5
    if method == "map":
        assert (got, bar.n) == ([0, 1, 2, 3], 5)  # items 0-3 and the failed one
    else:
        assert len(got) + 1 <= bar.n <= 5  # what came before the failure, and the failed one


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("method", MAPS)
def test_breaking_out_of_the_loop_closes_the_bar(tmp_path: Path, method: str, chunksize: int) -> None:
    bars = Bars()
    opened, gate = tmp_path / "open", str(tmp_path / "gate")
    opened.touch()
    gates = [str(opened)] * chunksize + [gate] * (12 - chunksize)  # the first task runs, the others wait
    # one task per worker at a time: a quick result must not wait in a batch behind a gated task
    with Executor(2, overrides={"pool.prefetch": 1}) as pool:
        try:
            for x in getattr(pool, method)(gated, range(12), gates, chunksize=chunksize, progress=bars):
                assert x == 0
                break
            bar = bars.only()
            closed_once(bar)  # at once: the break dropped the loop's iterator
        finally:
            Path(gate).touch()
    assert bar.made_with == 12
    assert bar.n <= chunksize  # the tasks still waiting were cancelled, and do not count


@pytest.mark.parametrize("chunksize", [1, 4])
def test_closing_or_dropping_the_iterator_closes_the_bar(ex: Executor, chunksize: int) -> None:
    bars = Bars()
    it = ex.map(square, range(40), chunksize=chunksize, progress=bars)
    assert next(it) == 0
    it.close()  # type: ignore[attr-defined]
    closed_once(bars.made[0])
    it = ex.map(square, range(40), chunksize=chunksize, progress=bars)
    del it  # never started: no generator code ran, the bar is closed anyway
    closed_once(bars.made[1])
    it = ex.map_unordered(square, lazy(40), buffersize=3, progress=bars)
    next(it)
    del it
    closed_once(bars.made[2])


def test_a_pool_shut_down_under_a_map_closes_its_bar(tmp_path: Path) -> None:
    bars = Bars()
    gate = str(tmp_path / "gate")
    with Executor(2, overrides={"pool.prefetch": 1}) as pool:
        try:
            results = pool.map(gated, range(6), [gate] * 6, progress=bars)
            wait_until(lambda: pool.stats()["busy"] == 2, timeout=WAIT, what="two tasks to run")
            pool.shutdown(wait=False, cancel_futures=True)  # the 4 queued tasks are cancelled
        finally:
            Path(gate).touch()
        assert next(results) == 0
        assert next(results) == 1
        with pytest.raises(CancelledError):
            next(results)
    bar = bars.only()
    closed_once(bar)
    assert (bar.made_with, bar.n) == (6, 2)  # cancelled tasks do not count


def test_a_pool_killed_under_a_map_closes_its_bar(tmp_path: Path) -> None:
    bars = Bars()
    gate = str(tmp_path / "gate")
    pool = Executor(2)
    try:
        results = pool.map(gated, range(6), [gate] * 6, progress=bars)
        wait_until(lambda: pool.stats()["busy"] == 2, timeout=WAIT, what="two tasks to run")
        pool.kill()
        with pytest.raises((BrokenProcessPool, CancelledError)):
            list(results)
    finally:
        Path(gate).touch()
        pool.shutdown()
    bar = bars.only()
    closed_once(bar)
    assert bar.made_with == 6
    assert 2 <= bar.n <= 6  # the killed tasks finished (failed); queued ones were cancelled


def test_ctrl_c_while_the_map_waits_closes_the_bar(tmp_path: Path) -> None:
    bars = Bars()
    gate = tmp_path / "gate"
    main = threading.get_ident()

    def caller_waits_for_the_result() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code.co_name != "_result_or_cancel":
            frame = frame.f_back
        return frame is not None

    def open_gate_once_the_caller_waits() -> None:
        # the task sends Ctrl-C only once the caller is in the map's wait for its result
        wait_until(caller_waits_for_the_result, timeout=WAIT, what="the caller to wait")
        gate.touch()

    helper = threading.Thread(target=open_gate_once_the_caller_waits)
    with pytest.raises(KeyboardInterrupt), Executor(1, overrides={"pool.kill_grace": 0.2}) as pool:
        results = pool.map(interrupt_caller_then_sleep, [os.getpid()], [str(gate)], progress=bars)
        helper.start()
        for _ in results:
            pass
    helper.join(WAIT)
    closed_once(bars.only())


def test_no_bar_no_thread_and_no_callback(ex: Executor) -> None:
    it = ex.map(square, range(100), buffersize=4)
    next(it)
    assert progress_threads() == []
    it.close()  # type: ignore[attr-defined]
    fut = ex.submit(square, 3)
    assert fut.result(WAIT) == 9
    assert not fut._callback_list  # type: ignore[attr-defined]  # nothing was attached to it


# -- real tqdm output: terminal, pipe, forced --------------------------------------------------------


def read_until(fd: int, done: Callable[[bytes], bool], timeout: float = WAIT) -> bytes:
    """What arrives on ``fd`` until ``done(everything so far)``; fails past ``timeout``."""
    out = b""
    end = time.monotonic() + timeout
    while not done(out):
        left = end - time.monotonic()
        assert left > 0, f"timed out; read so far: {out!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"end of output; read so far: {out!r}"
            out += chunk
    return out


def final_line(out: bytes) -> str:
    """The bar as it was left: the last \\r-separated state before the closing newline."""
    text = out.decode()
    assert text.endswith("\n"), f"the bar was left half-drawn: {text!r}"
    return text.rstrip("\r\n").rsplit("\r", 1)[-1]


@contextmanager
def stderr_to(stream: Any) -> Iterator[None]:
    """``sys.stderr`` is ``stream`` inside the block.  Set in the test's body: pytest's
    own capture sets ``sys.stderr`` again when a test's call begins, after its fixtures."""
    old = sys.stderr
    sys.stderr = stream
    try:
        yield
    finally:
        sys.stderr = old


@pytest.fixture
def terminal() -> Iterator[tuple[int, Any]]:
    """A pseudo-terminal of 100 columns: (its master side, a text stream on it)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with open(slave, "w", buffering=1) as stream:
        try:
            yield master, stream
        finally:
            os.close(master)


@pytest.fixture
def pipe() -> Iterator[tuple[int, Any]]:
    """A pipe: (its read end, a text stream on its write end)."""
    r, w = os.pipe()
    with open(w, "w", buffering=1) as stream:
        try:
            yield r, stream
        finally:
            os.close(r)


@pytest.mark.parametrize("method", MAPS)
def test_progress_true_draws_on_a_terminal(ex: Executor, terminal: tuple[int, Any], method: str) -> None:
    master, tty = terminal
    with stderr_to(tty):
        assert sorted(getattr(ex, method)(square, range(30), progress=True)) == [x * x for x in range(30)]
    out = read_until(master, lambda b: b"30/30" in b and b.endswith(b"\n"))
    line = final_line(out)
    assert re.search(r"100%\|.*\| 30/30 \[[\d:]+<[\d:]+, +[\d.]+it/s\]", line), line  # rate and ETA


def test_progress_true_draws_nothing_on_a_pipe(ex: Executor, pipe: tuple[int, Any]) -> None:
    r, piped = pipe
    with stderr_to(piped):
        it = ex.map(square, range(30), progress=True, buffersize=2)
        next(it)
        assert progress_threads() == []  # not a terminal: no bar at all, nothing counted
        assert list(it) == [x * x for x in range(1, 30)]
    piped.write("end\n")
    assert read_until(r, lambda b: b.endswith(b"end\n")) == b"end\n"


def test_progress_force_draws_on_a_pipe(ex: Executor, pipe: tuple[int, Any]) -> None:
    r, piped = pipe
    with stderr_to(piped):
        assert len(list(ex.map_unordered(square, lazy(25), buffersize=5, progress="force"))) == 25
    line = final_line(read_until(r, lambda b: b"25it" in b and b.endswith(b"\n")))
    assert re.match(r"25it \[[\d:]+, +[\d.]+it/s\]", line), line  # no len(): a count and a rate


@pytest.mark.parametrize("value", ["force", tqdm], ids=["force", "tqdm class"])
def test_progress_force_or_the_tqdm_class_with_capfd(ex: Executor, capfd: pytest.CaptureFixture[str], value: Any) -> None:
    assert sum(ex.map(square, range(10), progress=value)) == 285
    err = capfd.readouterr().err
    assert err.endswith("\n") and "10/10" in err.rstrip().rsplit("\r", 1)[-1], repr(err)


def test_a_waiting_bar_is_redrawn_on_a_terminal_only(
    tmp_path: Path, terminal: tuple[int, Any], pipe: tuple[int, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_progress, "IDLE_REDRAW", 0.2)
    master, tty = terminal
    gate = tmp_path / "gate"
    with Executor(1) as pool:
        with stderr_to(tty):
            results = pool.map(gated, [1], [str(gate)], progress=True)
        try:
            # nothing finishes, yet the bar is drawn again and again: its elapsed time moves
            read_until(master, lambda b: b.count(b"0/1 [") >= 3)
        finally:
            gate.touch()
        assert list(results) == [1]
    with stderr_to(pipe[1]):
        spec = _progress.check("force", "test")
    assert spec is not None
    bar = spec.start(1)
    try:
        assert not bar._idle_redraw  # in a log, each redraw would be one more line
    finally:
        bar.close()


# -- what progress= accepts ----------------------------------------------------------------------------

REJECTED = ["yes", "", "FORCE", b"force", 1, 0, 2.5, [True], {"desc": "x"}, {1}, object()]


def _rejected_by(call: Callable[[Any], Any], value: Any) -> TypeError:
    with pytest.raises(TypeError) as info:
        call(value)
    return info.value


@pytest.mark.parametrize("value", REJECTED, ids=repr)
@pytest.mark.parametrize("where", ["map", "map_unordered", "options.map", "Executor", "BossWorker", "Dispatcher"])
def test_anything_else_is_rejected_in_one_line(ex: Executor, where: str, value: Any) -> None:
    consumed: list[int] = []

    def items() -> Iterator[int]:
        consumed.append(1)
        yield 1

    calls: dict[str, Callable[[Any], Any]] = {
        "map": lambda v: ex.map(square, items(), progress=v),
        "map_unordered": lambda v: ex.map_unordered(square, items(), progress=v),
        "options.map": lambda v: ex.options(timeout=5).map(square, items(), progress=v),
        "Executor": lambda v: Executor(1, progress=v),
        "BossWorker": lambda v: BossWorker(work_handler=job, worker_count=1, progress=v),
        "Dispatcher": lambda v: Dispatcher(methods={"add": add}, progress=v),
    }
    message = str(_rejected_by(calls[where], value))
    assert "\n" not in message
    prefix = {"map": "Executor.map", "map_unordered": "Executor.map_unordered", "options.map": "Executor.map"}
    assert message.startswith(prefix.get(where, where) + ": ")  # names where
    assert f"progress={reprlib.repr(value)}" in message
    assert "'force'" in message and "update(n)" in message  # says what is accepted
    assert consumed == []  # checked before the input was read


@given(
    st.one_of(
        st.integers(), st.floats(), st.text().filter(lambda t: t != "force"), st.binary(), st.complex_numbers(),
        st.lists(st.integers()), st.tuples(st.integers()), st.sets(st.integers()), st.frozensets(st.integers()),
        st.dictionaries(st.text(), st.integers()),
    )
)
def test_no_plain_value_is_taken_for_a_bar(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        _progress.check(value, "Executor.map")
    message = str(info.value)
    assert message.startswith("Executor.map: progress=") and "\n" not in message


def test_a_factory_that_does_not_make_a_bar_is_rejected(ex: Executor) -> None:
    def not_a_bar(total: int | None = None) -> str:
        return "a string"

    with pytest.raises(TypeError, match=r"returned 'a string', which has no update\(n\) and close\(\)"):
        ex.map(square, range(3), progress=not_a_bar)


def test_a_bar_of_the_callers_own_is_updated_never_closed(ex: Executor) -> None:
    out = io.StringIO()
    with tqdm(total=30, file=out) as bar:
        assert len(list(ex.map(square, range(10), progress=bar))) == 10
        assert len(list(ex.map_unordered(square, lazy(20), buffersize=4, progress=bar))) == 20
        assert (bar.n, bar.total, bar.disable) == (30, 30, False)  # counted, total untouched, still open
    assert "30/30" in out.getvalue().rsplit("\r", 1)[-1]


def test_one_bar_of_the_callers_for_two_maps_at_once(ex: Executor) -> None:
    lengths: list[int] = []
    with tqdm(total=2000, file=io.StringIO()) as bar:

        def run() -> None:
            lengths.append(len(list(ex.map_unordered(square, range(1000), chunksize=1, progress=bar))))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert lengths == [1000, 1000]
        assert bar.n == 2000


def test_a_factory_is_called_with_the_total() -> None:
    made: list[Any] = []

    def factory(**kwargs: Any) -> Any:
        made.append(kwargs)
        return tqdm(file=io.StringIO(), **kwargs)

    with Executor(1) as pool:
        assert list(pool.map(square, range(7), progress=factory)) == [x * x for x in range(7)]
    assert made == [{"total": 7}]  # nothing else: the factory's own options are not overridden


# -- without tqdm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "force"])
def test_without_tqdm_progress_fails_with_one_clear_line(
    ex: Executor, monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, Any], value: Any
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with stderr_to(pipe[1]):  # not a terminal: True fails all the same
        _all_fail_without_tqdm(ex, value)
    bars = Bars()
    assert list(ex.map(square, range(3), progress=bars)) == [0, 1, 4]  # a bar of your own needs no tqdm
    closed_once(bars.only())
    message = "Executor.map: progress=True needs tqdm, which is not installed: pip install 'prefork[progress]'"
    assert message in DOC.read_text()  # the page shows the very line


def _all_fail_without_tqdm(ex: Executor, value: Any) -> None:
    consumed: list[int] = []

    def items() -> Iterator[int]:
        consumed.append(1)
        yield 1

    for call in (
        lambda: ex.map(square, items(), progress=value),
        lambda: Executor(1, progress=value),
        lambda: BossWorker(work_handler=job, worker_count=1, progress=value),
        lambda: Dispatcher(methods={"add": add}, progress=value),
    ):
        with pytest.raises(ImportError) as info:
            call()
        exc = info.value
        assert isinstance(exc, (MissingExtra, PreforkError))
        assert exc.name == "tqdm"
        assert str(exc).endswith("needs tqdm, which is not installed: pip install 'prefork[progress]'")
        assert "\n" not in str(exc) and exc.__cause__ is None and exc.__suppress_context__  # one line, no chain
    assert consumed == []  # on a pipe too: the same script must not work in CI and fail on a terminal


def test_a_broken_tqdm_shows_why(ex: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name == "tqdm":
                raise ImportError("cannot import name 'x' from 'colorama'", name="colorama")

    monkeypatch.delitem(sys.modules, "tqdm")
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(MissingExtra, match=r"pip install 'prefork\[progress\]'") as info:
        ex.map(square, range(3), progress="force")
    assert isinstance(info.value.__cause__, ImportError) and info.value.__cause__.name == "colorama"


# -- the Executor's own bar ---------------------------------------------------------------------------------


def test_an_executor_bar_counts_every_task_and_map_item_until_shutdown() -> None:
    bars = Bars()
    pool = Executor(2, progress=bars)
    try:
        assert [pool.submit(square, i).result(WAIT) for i in range(3)] == [0, 1, 4]
        assert pool.options(timeout=WAIT).submit(square, 5).result(WAIT) == 25
        assert sum(pool.map(square, range(100), chunksize=7)) == sum(x * x for x in range(100))
        with pytest.raises(ValueError):
            list(pool.map_unordered(fail_on, lazy(10), [9] * 10, buffersize=2))
        bar = bars.only()
        assert bar.closed == 0
    finally:
        pool.shutdown()
    closed_once(bar)
    assert bar.made_with == 0
    assert (bar.total, bar.n) == (114, 114)  # 4 tasks + 100 items + 10 items; the total grew as they came


def test_an_executor_bar_after_shutdown_without_waiting_closes_when_the_pool_stops(tmp_path: Path) -> None:
    bars = Bars()
    gate = tmp_path / "gate"
    pool = Executor(1, progress=bars)
    fut = pool.submit(gated, 1, str(gate))
    pool.shutdown(wait=False)
    bar = bars.only()
    assert bar.closed == 0  # the task still runs: the bar goes on
    gate.touch()
    assert fut.result(WAIT) == 1
    wait_until(lambda: bar.closed, timeout=WAIT, what="the bar to close")
    closed_once(bar)
    assert (bar.total, bar.n) == (1, 1)


def test_an_executor_bar_of_the_callers_own_stays_open() -> None:
    bar = Recorder(total=50)  # a total declared by the caller, as `prefork run` does
    with Executor(1, progress=bar) as pool:
        assert sum(pool.map(square, range(50), chunksize=10)) == sum(x * x for x in range(50))
    assert (bar.total, bar.n, bar.closed) == (50, 50, 0)


# -- BossWorker ----------------------------------------------------------------------------------------


def test_a_boss_bar_counts_jobs_finished_out_of_jobs_added() -> None:
    bars = Bars()
    with BossWorker(work_handler=job, worker_count=2, progress=bars) as bw:
        bw.add_work(1, 2, -3, 4, 5)
        results = [bw.get_result() for _ in range(5)]
        assert sum(1 for r in results if isinstance(r, dict) and r.get("ERROR")) == 1
        bw.add_work(6, 7, 8)
        while bw.pending():
            bw.get_result()
        bar = bars.only()
        wait_until(lambda: bar.n == 8, timeout=WAIT, what="the bar to show 8 jobs")  # drawn every 0.1 s
        assert bar.total == 8 and bar.closed == 0
    closed_once(bar)
    assert (bar.total, bar.n) == (8, 8)


def test_a_boss_shut_down_by_force_counts_only_jobs_that_ran(tmp_path: Path) -> None:
    bars = Bars()
    gate = str(tmp_path / "gate")
    bw = BossWorker(work_handler=gated_job, worker_count=1, progress=bars)
    try:
        bw.add_work(*[gate] * 4)
        wait_until(lambda: _busy(bw), timeout=WAIT, what="a job to run")
        bw.shut_down(force=True)
    finally:
        Path(gate).touch()
    results = [bw.get_result() for _ in range(4)]
    ran = sum(1 for r in results if not (isinstance(r, dict) and r.get("TYPE") == "CancelledError"))
    bar = bars.only()
    closed_once(bar)
    assert bar.total == 4
    assert bar.n == ran >= 1  # the killed job finished (with an error); cancelled ones did not


def _busy(bw: BossWorker) -> bool:
    return bool(bw._sup.stats()["busy"])


def test_a_boss_from_config_takes_a_bar() -> None:
    from prefork.config import load_facade_config

    bar = Recorder(total=3)
    config = load_facade_config("boss-worker", None, None, {"boss_worker.work_handler": job})
    bw = BossWorker.from_config(config, progress=bar)
    bw.add_work(1, 2, 3)
    while bw.pending():
        bw.get_result()
    bw.shut_down()
    assert (bar.total, bar.n, bar.closed) == (3, 3, 0)


# -- Dispatcher ----------------------------------------------------------------------------------------


def test_a_dispatcher_bar_counts_requests_answered_out_of_requests_made() -> None:
    bars = Bars()
    answers: list[Any] = []
    with Dispatcher(methods={"add": add}, upon_result=lambda req, resp: answers.append(resp), talkback=lambda line: None,
                    progress=bars) as d:
        for i in range(10):
            d.new_request({"method_name": "add", "params": [i, 1]})
        d.new_request({"method_name": "nope", "params": []})
    bar = bars.only()
    closed_once(bar)
    assert len(answers) == 11
    assert (bar.total, bar.n) == (11, 11)  # the unknown method's error counts too


def test_a_dispatcher_shut_down_without_waiting_closes_its_bar_when_stopped(tmp_path: Path) -> None:
    bars = Bars()
    gate = tmp_path / "gate"
    d = Dispatcher(methods={"gated": gated_request}, talkback=lambda line: None, progress=bars)
    d.new_request({"method_name": "gated", "params": [str(gate)]})
    d.shutdown(wait=False)
    bar = bars.only()
    assert bar.closed == 0
    gate.touch()
    wait_until(lambda: bar.closed, timeout=WAIT, what="the bar to close")
    closed_once(bar)
    assert (bar.total, bar.n) == (1, 1)


# -- prefork run: bar_for_run, declared_total ------------------------------------------------------------


def test_bar_for_run_on_a_terminal_a_pipe_and_forced(terminal: tuple[int, Any]) -> None:
    master, tty = terminal
    bar = bar_for_run(5, tty)
    assert bar is not None
    with Executor(1, progress=bar) as pool:
        list(pool.map(square, range(5)))
    bar.close()
    line = final_line(read_until(master, lambda b: b"5/5" in b and b.endswith(b"\n")))
    assert re.search(r"100%\|.*\| 5/5 \[[\d:]+<[\d:]+, +[\d.]+task/s\]", line), line
    r, w = os.pipe()
    with open(w, "w") as piped, open(r, "rb") as reader:
        assert bar_for_run(5, piped) is None
        forced = bar_for_run(None, piped, force=True)
        assert forced is not None
        forced.update(2)
        forced.close()
        piped.close()
        assert final_line(reader.read()).startswith("2task")


def test_bar_for_run_without_tqdm(monkeypatch: pytest.MonkeyPatch, terminal: tuple[int, Any]) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert bar_for_run(3, io.StringIO()) is None  # no terminal, no bar: tqdm is not needed
    for stream, force in ((terminal[1], False), (io.StringIO(), True)):
        with pytest.raises(MissingExtra, match=r"^prefork run: the progress bar needs tqdm, .*: pip install 'prefork\[progress\]'$"):
            bar_for_run(3, stream, force=force)


def test_declared_total() -> None:
    def app(pool: Any) -> None: ...

    assert declared_total(app) is None
    app.progress_total = 12  # type: ignore[attr-defined]
    assert declared_total(app) == 12
    app.progress_total = lambda: 7  # type: ignore[attr-defined]
    assert declared_total(app) == 7
    app.progress_total = lambda: None  # type: ignore[attr-defined]
    assert declared_total(app) is None
    for bad in (-1, "12", True, 2.5):
        app.progress_total = bad  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match=r"^app .*app: progress_total = .*: must be an int >= 0"):
            declared_total(app)


def test_a_bar_that_fails_is_logged_and_the_map_goes_on(ex: Executor, caplog: pytest.LogCaptureFixture) -> None:
    class Failing(Recorder):
        def update(self, n: int = 1) -> None:
            raise OSError("the terminal went away")

    bars: list[Failing] = []

    def factory(total: int | None = None) -> Failing:
        bars.append(Failing(total))
        return bars[-1]

    with caplog.at_level("ERROR", logger="prefork.progress"):
        assert sum(ex.map(square, range(20), progress=factory)) == sum(x * x for x in range(20))
    closed_once(bars[0])  # still closed, once
    assert "the terminal went away" in caplog.text


def test_sized_total() -> None:
    assert _progress.sized_total([range(5), [1, 2, 3]]) == 3
    assert _progress.sized_total([range(5), lazy(2)]) is None
    assert _progress.sized_total([]) is None


# -- docs/progress.md, run --------------------------------------------------------------------------------


def doc_blocks() -> list[tuple[int, str]]:
    """Every ```python block of the page, with its line number."""
    text = DOC.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_page_has_snippets() -> None:
    assert len(doc_blocks()) >= 4


@pytest.mark.parametrize("line,code", doc_blocks(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_snippet_of_the_page_runs(tmp_path: Path, line: int, code: str) -> None:
    """Each block runs as a script (its own process: ``__main__`` as a reader's), with
    stderr a pipe: the page says what it prints there, and the test checks it."""
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, f"docs/progress.md line {line}:\n{proc.stdout}\n{proc.stderr}"
    expected = re.findall(r"# stdout: (.*)", code)
    assert [ln for ln in proc.stdout.splitlines() if ln] == expected, f"line {line}: {proc.stdout!r}"
    err = re.search(r"# stderr: (.*)", code)
    if err:
        assert re.search(err.group(1), proc.stderr), f"line {line}: {proc.stderr!r}"
    else:
        assert proc.stderr == "", f"line {line}: {proc.stderr!r}"
