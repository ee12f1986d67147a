"""The stack of a stuck worker (a ``TaskTimeout``'s ``stack``, the harakiri log) shows the
worker's own frames only: from its entry point down to the task, in every thread, and
none of the frames the forking thread had (the pool's constructor, the caller's functions)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

import prefork
from prefork import mpm
from prefork._stack import ENTRY, _as_dumped, own_frames
from prefork.mpm import MPM

OURS = os.path.basename(__file__)


def frames(stack: str) -> list[tuple[str, str]]:
    """(file name, function) of each frame line of a dump, in its order."""
    out = []
    for line in stack.splitlines():
        if line.startswith('  File "'):
            path, _, name = line[len('  File "'):].partition('", line ')
            out.append((os.path.basename(path), name.split(" in ", 1)[1]))
    return out


def stuck_in_the_task(seconds: float) -> None:
    helper = threading.Thread(target=helper_in_the_task, args=(seconds,), daemon=True)
    helper.start()
    time.sleep(seconds)


def helper_in_the_task(seconds: float) -> None:
    time.sleep(seconds)


def _timeouts_from_a_pool_made_deep_down(n: int) -> list[prefork.TaskTimeout]:
    with prefork.Executor(1) as ex:  # its first worker forked by this thread, the next one by the fork server
        out = []
        for _ in range(n):
            with pytest.raises(prefork.TaskTimeout) as info:
                ex.options(timeout=0.5).submit(stuck_in_the_task, 30).result(timeout=20)
            out.append(info.value)
        return out


def _user_code_calls_it() -> list[prefork.TaskTimeout]:
    return _timeouts_from_a_pool_made_deep_down(2)


def test_a_timeout_shows_the_worker_s_frames_in_each_thread_and_none_of_the_caller_s() -> None:
    timeouts = _user_code_calls_it()
    assert len({t.pid for t in timeouts}) == 2
    for timeout in timeouts:
        blocks = [b for b in timeout.stack.split("\n\n") if b.strip()]
        [main] = [frames(b) for b in blocks if any(name == "stuck_in_the_task" for _, name in frames(b))]
        [helper] = [frames(b) for b in blocks if any(name == "helper_in_the_task" for _, name in frames(b))]
        assert main[-1] == ("_worker.py", "run_worker"), timeout.stack  # the outermost frame: the entry point
        assert ("_worker.py", "_call_loop") in main, timeout.stack
        for caller in ("_user_code_calls_it", "_timeouts_from_a_pool_made_deep_down",
                       "test_a_timeout_shows_the_worker_s_frames_in_each_thread_and_none_of_the_caller_s",
                       "__init__", "<module>", "_serve_loop"):  # fmt: skip
            assert caller not in timeout.stack, timeout.stack
        assert {file for file, _ in main} == {OURS, "_call.py", "_worker.py"}, timeout.stack
        assert helper[-1] == ("threading.py", "_bootstrap"), timeout.stack  # a thread of the worker's own: whole
        assert str(timeout).endswith(timeout.stack)


def stuck_in_a_request(flag: str) -> None:
    mpm.busy()
    with open(flag, "a") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.05)


def _children_made_deep_down(flag: Path) -> None:
    m = MPM(start_servers=1, min_spare_servers=1, max_spare_servers=1, max_servers=1,
            overrides={"scaling.tick": 0.05, "mpm.request_timeout": 0.4, "pool.kill_grace": 0.2})  # fmt: skip
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and len(flag.read_text().split() if flag.exists() else ()) < 2:
            m.whip_kids(stuck_in_a_request, (str(flag),), timeout=0.05)  # forks its first child from here
    finally:
        m.done()


def test_the_harakiri_log_shows_the_child_s_frames_and_none_of_the_caller_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="prefork.supervisor")
    flag = tmp_path / "busy"
    _children_made_deep_down(flag)
    pids = flag.read_text().split() if flag.exists() else []
    assert len(pids) >= 2, f"the stuck child was not replaced within 20 s (busy children: {pids})"
    first = int(pids[0])
    [record] = [r for r in caplog.records if f"worker {first} was busy" in r.getMessage()]
    text = record.getMessage()
    stack = frames(text)
    assert stack[0] == (OURS, "stuck_in_a_request") and stack[-1] == ("_worker.py", "run_worker"), text
    for caller in ("_children_made_deep_down", "whip_kids", "test_the_harakiri_log_shows", "<module>"):
        assert caller not in text, text


# -- own_frames on faulthandler's text ----------------------------------------------------------

ENTRY_LINE = f'  File "{ENTRY[0]}", line 294 in {ENTRY[1]}\n'


def test_only_the_frames_below_the_entry_point_go_and_only_in_the_threads_that_have_it() -> None:
    side = 'Thread 0x00007f0000000001 (most recent call first):\n  File "/x/threading.py", line 9 in _bootstrap\n'
    main = (
        "Current thread 0x00007f0000000002 (most recent call first):\n"
        '  File "/app/tasks.py", line 4 in stuck\n' + ENTRY_LINE +
        '  File "/app/main.py", line 7 in make_pool\n  File "/app/main.py", line 9 in <module>\n'
    )  # fmt: skip
    assert own_frames(side + "\n" + main) == side + "\n" + main.split(ENTRY_LINE)[0] + ENTRY_LINE
    assert own_frames(main + "\n" + side) == main.split(ENTRY_LINE)[0] + ENTRY_LINE + "\n" + side
    # faulthandler's "  ..." (a stack cut off at its depth limit) below the entry point goes too
    assert own_frames(ENTRY_LINE + '  File "/app/main.py", line 7 in f\n  ...\n') == ENTRY_LINE


def test_a_dump_without_the_entry_point_is_left_whole() -> None:
    # a function of that name elsewhere is not the entry point; nor is a stack cut off above it
    other = '  File "/app/_worker.py", line 294 in run_worker\n  File "/app/main.py", line 9 in <module>\n'
    assert own_frames(other) == other
    deep = "Current thread 0x1 (most recent call first):\n" + '  File "/app/r.py", line 2 in r\n' * 100 + "  ...\n"
    assert own_frames(deep) == deep


def test_the_entry_point_is_found_under_a_path_faulthandler_escapes(tmp_path: Path) -> None:
    path = "/srv/caf\u00e9/\u0394\t/\U0001f600/prefork/_worker.py"
    namespace: dict[str, object] = {}
    exec(compile("def run_worker(f):\n    import faulthandler; faulthandler.dump_traceback(f, all_threads=False)\n",
                 path, "exec"), namespace)  # fmt: skip
    with open(tmp_path / "dump", "w+b") as f:
        run_worker = namespace["run_worker"]
        assert callable(run_worker)
        run_worker(f)
        f.seek(0)
        dump = f.read().decode("ascii")
    [entry_line] = [line for line in dump.splitlines(keepends=True) if line.endswith(" in run_worker\n")]
    assert "\\xe9" in entry_line and "\\u0394" in entry_line and "\\U0001f600" in entry_line
    assert own_frames(dump, (_as_dumped(path), "run_worker")).endswith(entry_line)
