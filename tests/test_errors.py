"""How a worker's exit status is worded: in ``WorkerLost`` and in the supervisor's log."""

from __future__ import annotations

import os
import pickle
import signal

import pytest

from prefork.errors import WorkerLost, describe_status


def status_of(code: str) -> int:
    """The real ``waitpid`` status of a Python child running ``code``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            exec(code)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize(
    ("code", "words", "exitcode", "signal_name"),
    [("pass", "exit code 0", 0, None),
     ("os._exit(3)", "exit code 3", 3, None),
     ("os._exit(255)", "exit code 255", 255, None),
     ("os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL", None, "SIGKILL"),
     ("os.kill(os.getpid(), signal.SIGUSR1)", "killed by SIGUSR1", None, "SIGUSR1")],
)  # fmt: skip
def test_real_statuses(code: str, words: str, exitcode: int | None, signal_name: str | None) -> None:
    status = status_of(code)
    assert describe_status(status) == words
    lost = WorkerLost(42, status, started=True)
    assert (lost.exitcode, lost.signal_name) == (exitcode, signal_name)
    assert f"worker 42 died while running the task ({words})" in str(lost)


def test_a_core_dump_reads_as_its_signal() -> None:
    """A SIGSEGV that dumped core has the core bit set; the signal is what counts."""
    status = signal.SIGSEGV | 0x80  # WCOREFLAG
    assert describe_status(status) == "killed by SIGSEGV"
    lost = WorkerLost(7, status, started=False)
    assert lost.signal_name == "SIGSEGV" and lost.exitcode is None
    assert str(lost) == (
        "worker 7 died before the task started (killed by SIGSEGV): "
        "the worker crashed in native code (segmentation fault)"
    )


def test_a_sigkill_gets_its_hint_and_an_unnamed_signal_its_number() -> None:
    lost = WorkerLost(7, signal.SIGKILL, started=True, detail="more")
    assert str(lost) == (
        "worker 7 died while running the task (killed by SIGKILL): "
        "killed, possibly out of memory (or by a timeout or another process); more"
    )
    unnamed = next(n for n in range(1, 128) if n not in set(signal.Signals))
    assert describe_status(unnamed) == f"killed by signal {unnamed}"


def test_no_status_or_one_that_is_not_an_exit() -> None:
    assert describe_status(None) == "unknown exit status"
    stopped = (signal.SIGSTOP << 8) | 0x7F  # what waitpid(WUNTRACED) says of a stopped process
    assert describe_status(stopped) == f"unknown exit status (wait status {stopped:#x})"
    for status in (None, stopped):
        lost = WorkerLost(7, status, started=False)
        assert lost.exitcode is None and lost.signal_name is None and lost.hint == ""


def test_worker_lost_survives_pickling_with_its_fields() -> None:
    lost = pickle.loads(pickle.dumps(WorkerLost(9, 3 << 8, started=True, detail="d")))
    assert (lost.pid, lost.status, lost.exitcode, lost.signal_name) == (9, 3 << 8, 3, None)
    assert str(lost) == "worker 9 died while running the task (exit code 3); d"
