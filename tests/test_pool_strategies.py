"""The strategies working inside a real pool: sinks, resolvers, serializers, scaling."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import pytest

from prefork import MethodNotFound, RemoteTaskError, load_config
from prefork._supervisor import Supervisor
from prefork.testing import wait_until


def double(x: int) -> int:
    return 2 * x


def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class Handlers:
    @staticmethod
    def greet(name: str) -> str:
        return f"hello {name}"


def pool(**overrides: Any) -> Supervisor:
    sup = Supervisor(load_config(None, overrides))
    sup.start()
    return sup


def test_queue_sink_blocking_and_non_blocking_get() -> None:
    sup = pool(**{"sink": "queue", "scaling.workers": 2})
    try:
        sink = sup.sink
        assert sink.get(block=False) is None
        ids = [sup.submit(double, (i,)) for i in range(20)]
        outcomes = [sink.get(timeout=10) for _ in ids]
        assert sorted(o.task.id for o in outcomes) == sorted(ids)
        assert sorted(o.value for o in outcomes) == [2 * i for i in range(20)]
        assert all(o.ok for o in outcomes)
        assert sink.get_nowait() is None
        assert sink.get(timeout=0.05) is None
    finally:
        sup.shutdown()


def test_callback_sink_runs_in_the_caller_and_survives_a_failing_callback() -> None:
    seen: list[tuple[int, bool, Any, int]] = []
    done = threading.Event()

    def cb(task: Any, ok: bool, value: Any) -> None:
        seen.append((task.id, ok, value, os.getpid()))
        if len(seen) == 3:
            done.set()
        if task.args == (1,):
            raise RuntimeError("a broken callback")

    sup = pool(**{"sink.name": "callback", "sink.callback": cb, "scaling.workers": 1})
    try:
        for i in range(3):
            sup.submit(double, (i,))
        assert done.wait(10)
    finally:
        sup.shutdown()
    assert sorted(v for _, _, v, _ in seen) == [0, 2, 4]
    assert {pid for *_, pid in seen} == {os.getpid()}


def test_per_task_callback_overrides_the_sinks() -> None:
    got: list[Any] = []
    done = threading.Event()
    sup = pool(**{"sink.name": "callback", "sink.callback": lambda t, ok, v: got.append(("global", v))})
    try:
        sup.submit(double, (5,), callback=lambda t, ok, v: (got.append(("own", v)), done.set()))
        assert done.wait(10)
    finally:
        sup.shutdown()
    assert got == [("own", 10)]


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle", "json", "msgpack"])
def test_named_methods_resolve_in_the_worker(serializer: str) -> None:
    plugins = []
    if serializer == "msgpack":
        pytest.importorskip("prefork_msgpack", reason="pip install ./plugins/prefork-msgpack")
        plugins = ["prefork_msgpack"]  # the installed plugin, listed explicitly (autoload is off in tests)
    sup = pool(**{
        "plugins": plugins,
        "serializer": serializer,
        "resolver.name": "chain",
        "resolver.methods": {"twice": double, "pid": "os:getpid"},
        "resolver.classes": [Handlers, "math"],
        "sink": "future",
        "scaling.workers": 1,
    })
    try:
        assert sup.submit("twice", (4,)).result(10) == 8
        worker_pid = sup.submit("pid").result(10)
        assert worker_pid != os.getpid() and worker_pid in sup.pids()
        assert sup.submit("greet", ("ann",)).result(10) == "hello ann"
        assert sup.submit("sqrt", (16,)).result(10) == 4.0
        assert sup.submit("tests.test_pool_strategies:double", (7,)).result(10) == 14
        with pytest.raises((MethodNotFound, RemoteTaskError), match="no method named 'nothing'"):
            sup.submit("nothing").result(10)
        with pytest.raises((MethodNotFound, RemoteTaskError)):
            sup.submit("__class__").result(10)
    finally:
        sup.shutdown()


def test_json_serializer_sends_errors_as_plain_data() -> None:
    sup = pool(**{"serializer": "json", "resolver.name": "methods", "resolver.methods": {"div": "operator:truediv"}})
    try:
        with pytest.raises(RemoteTaskError) as info:
            sup.submit("div", (1, 0)).result(10)
        assert info.value.type_name == "ZeroDivisionError"
        assert "truediv" in info.value.remote_traceback or "division" in info.value.message
        with pytest.raises(TypeError, match="cannot be serialized with 'json'"):
            sup.submit("div", (object(), 1)).result(10)
        assert sup.submit("div", (1, 4)).result(10) == 0.25
    finally:
        sup.shutdown()


def test_on_demand_forks_more_spaced_by_the_delay_and_retires_idle_ones() -> None:
    sup = pool(**{
        "scaling.name": "on-demand", "scaling.pre_fork": 1, "scaling.max_forks": 3,
        "scaling.spawn_delay": 0.3, "scaling.idle_timeout": 0.5,
    })
    try:
        wait_until(lambda: sup.stats()["idle"] == 1, what="the pre-forked worker")
        t0 = time.monotonic()
        futures = [sup.submit(sleep_pid, (1.2,)) for _ in range(3)]
        wait_until(lambda: sup.stats()["workers"] == 3, timeout=5, what="three workers")
        grown = time.monotonic() - t0
        assert grown >= 0.55, f"two extra forks must be spaced by 0.3 s, took {grown:.2f}"
        assert len({f.result(10) for f in futures}) == 3
        assert sup.stats()["spawned_total"] == 3
        wait_until(lambda: sup.stats()["workers"] == 1, timeout=5, what="idle workers retired")
    finally:
        sup.shutdown()


def test_spare_policy_keeps_idle_workers_between_the_bounds() -> None:
    sup = pool(**{
        "scaling.name": "spare", "scaling.start_servers": 1, "scaling.min_spare": 2,
        "scaling.max_spare": 3, "scaling.max_servers": 6, "scaling.tick": 0.05,
    })
    try:
        wait_until(lambda: sup.stats()["idle"] >= 2, what="two spare workers")
        futures = [sup.submit(sleep_pid, (1.0,)) for _ in range(3)]
        wait_until(lambda: sup.stats()["busy"] == 3 and sup.stats()["idle"] >= 2, timeout=5, what="spares while busy")
        assert sup.stats()["workers"] <= 6
        for f in futures:
            f.result(10)
        wait_until(lambda: sup.stats()["idle"] <= 3 and sup.stats()["workers"] <= 3, timeout=5, what="surplus retired")
    finally:
        sup.shutdown()


def test_no_workers_means_tasks_run_synchronously_in_the_caller() -> None:
    sup = pool(**{"scaling.name": "on-demand", "scaling.pre_fork": 0, "scaling.max_forks": 0})
    try:
        assert sup.submit(os.getpid).result(10) == os.getpid()
        assert sup.submit(math.factorial, (5,)).result(10) == 120
        with pytest.raises(ZeroDivisionError):
            sup.submit(divmod, (1, 0)).result(10)
        assert sup.pids() == []
    finally:
        sup.shutdown()


def note_exit() -> None:
    path = os.environ["FINALIZER_DIR"]
    with open(os.path.join(path, str(os.getpid())), "a") as f:
        f.write("bye\n")


def test_finalizer_runs_once_in_every_worker_that_leaves(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINALIZER_DIR", str(tmp_path))
    sup = pool(**{"scaling.workers": 1, "pool.max_tasks_per_child": 2, "pool.finalizer": note_exit})
    try:
        pids = {sup.submit(os.getpid).result(10) for _ in range(5)}
    finally:
        sup.shutdown()
    assert len(pids) == 3  # two recycled after 2 tasks each, the third stopped by shutdown
    notes = {int(p.name): p.read_text() for p in tmp_path.iterdir()}
    assert set(notes) == pids and set(notes.values()) == {"bye\n"}
