"""Every lifecycle hook fires, in the process its spec names, through a plugin
listed in the config's ``plugins = [...]``."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

import prefork
from prefork.testing import wait_until

RECORDER = textwrap.dedent('''
    import json, os
    import prefork

    def _note(event, **fields):
        with open(os.environ["HOOK_LOG"], "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\\n")

    @prefork.hookimpl
    def prefork_before_fork(worker):
        _note("before_fork", slot=worker.slot)

    @prefork.hookimpl
    def prefork_after_fork(worker):
        _note("after_fork", slot=worker.slot, child=worker.pid)

    @prefork.hookimpl
    def prefork_worker_init(worker):
        _note("worker_init", slot=worker.slot)

    @prefork.hookimpl
    def prefork_before_call(worker, task_id, args):
        _note("before_call", task=task_id, args=list(args))

    @prefork.hookimpl
    def prefork_after_call(task_id, ok):
        _note("after_call", task=task_id, ok=ok)

    @prefork.hookimpl
    def prefork_worker_exit(worker, reason):
        _note("worker_exit", reason=reason)

    @prefork.hookimpl
    def prefork_child_data(worker, data, exitcode):
        _note("child_data", data=data, child=worker.pid, exitcode=exitcode)

    @prefork.hookimpl
    def prefork_worker_exited(worker, status, reason):
        _note("worker_exited", child=worker.pid, status=status, reason=reason)

    @prefork.hookimpl
    def prefork_log(level, message):
        _note("log", level=level, message=message)
''')


def yell_and_return(x: int) -> int:
    worker = prefork.current_worker()
    assert worker is not None
    worker.yell({"from": os.getpid(), "x": x, "blob": "z" * 100_000})
    return x * 2


def fail(x: int) -> None:
    raise ValueError(x)


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "hookrecorder.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("HOOK_LOG", str(log))
    return log


def events(log: Path) -> list[dict]:  # type: ignore[type-arg]
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_hook_fires_in_its_process(recorder: Path) -> None:
    ex = prefork.Executor(1, overrides={"plugins": ["hookrecorder"], "name": "prefork-hooktest"})
    try:
        assert ex.submit(yell_and_return, 21).result(timeout=10) == 42
        with pytest.raises(ValueError):
            ex.submit(fail, 1).result(timeout=10)
        worker_pid = ex.pids()[0]
        server_pid = ex._sup.spawner.pid
        wait_until(lambda: any(e["event"] == "child_data" for e in events(recorder)), what="child data")
    finally:
        ex.shutdown()
    got = events(recorder)
    me = os.getpid()
    by = {e["event"]: e for e in got}
    # the first worker is forked by the caller at start (from the main thread); see
    # test_fork_server for the fork server's forks
    assert by["before_fork"]["pid"] == me and by["after_fork"]["pid"] == me
    assert server_pid != me
    assert by["after_fork"]["child"] == worker_pid
    assert by["worker_init"]["pid"] == worker_pid
    calls = [e for e in got if e["event"] in ("before_call", "after_call")]
    assert [(e["event"], e.get("ok")) for e in calls] == [
        ("before_call", None), ("after_call", True), ("before_call", None), ("after_call", False),
    ]
    assert calls[0]["args"] == [21] and all(e["pid"] == worker_pid for e in calls)
    assert by["child_data"]["pid"] == me
    assert by["child_data"]["data"]["x"] == 21 and len(by["child_data"]["data"]["blob"]) == 100_000
    assert by["child_data"]["child"] == worker_pid and by["child_data"]["exitcode"] is None
    assert by["worker_exit"]["pid"] == worker_pid and "stopped" in by["worker_exit"]["reason"]
    assert by["worker_exited"]["pid"] == me and by["worker_exited"]["child"] == worker_pid
    assert by["worker_exited"]["status"] == 0


def test_log_hook_hears_an_unexpected_death(recorder: Path) -> None:
    with prefork.Executor(1, overrides={"plugins": ["hookrecorder"]}) as ex:
        with pytest.raises(prefork.WorkerLost):
            ex.submit(os._exit, 9).result(timeout=10)
        wait_until(lambda: any(e["event"] == "log" for e in events(recorder)), what="log line")
    logs = [e for e in events(recorder) if e["event"] == "log"]
    assert any("died unexpectedly (exit code 9)" in e["message"] and e["level"] == 30 for e in logs)


def test_yell_outside_a_worker_has_no_handle() -> None:
    assert prefork.current_worker() is None


def test_yell_refuses_what_cannot_be_serialized(recorder: Path) -> None:
    import threading

    def yell_lock() -> str:
        try:
            prefork.current_worker().yell(threading.Lock())  # type: ignore[union-attr]
        except TypeError as exc:
            return str(exc)
        return "no error"

    with prefork.Executor(1, overrides={"plugins": ["hookrecorder"]}) as ex:
        text = ex.submit(yell_lock).result(timeout=10)
    assert text.startswith("yell: lock cannot be serialized")
