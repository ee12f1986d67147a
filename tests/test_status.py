"""A pool's status snapshot (``Supervisor.status``), its totals, and ``resize``."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from prefork import TaskTimeout, WorkerLost
from prefork._supervisor import Supervisor
from prefork.config import load_config
from prefork.strategies.scaling import FixedPolicy, OnDemandPolicy, SparePolicy


def wait_for(what: Callable[[], Any], timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def napping(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fails() -> None:
    raise ValueError("no")


def dies() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def pool(**overrides: Any) -> Supervisor:
    sup = Supervisor(load_config(None, {"name": "stat", "scaling.name": "fixed", "scaling.workers": 2, **overrides}))
    sup.start()
    return sup


def test_a_busy_worker_shows_its_task_method_and_how_long_it_has_run() -> None:
    sup = pool()
    try:
        wait_for(lambda: sup.status()["totals"]["idle"] == 2)
        fut = sup.submit(napping, (1.0,))
        busy = wait_for(lambda: [w for w in sup.status()["workers"] if w["state"] == "busy"])
        assert len(busy) == 1
        w = busy[0]
        assert w["method"] == f"{__name__}:napping" and w["task"] is not None
        assert 0 <= w["running_for"] < 5 and w["pid"] in sup.pids()
        assert w["rss"] is not None and w["rss"] > 1_000_000
        later = wait_for(lambda: [x for x in sup.status()["workers"] if x["pid"] == w["pid"] and x["running_for"] > w["running_for"]])
        assert later
        idle = [x for x in sup.status()["workers"] if x["state"] == "idle"]
        assert len(idle) == 1 and idle[0]["task"] is None
        assert fut.result(10) == 1.0
        s = wait_for(lambda: (st := sup.status())["totals"]["busy"] == 0 and st)
        assert s["totals"]["completed"] == 1 and s["totals"]["submitted"] == 1
        assert sum(w["served"] for w in s["workers"]) == 1
        json.dumps(s)  # plain JSON data
    finally:
        sup.shutdown()


def test_failures_are_counted_by_kind_and_worker_exits_by_cause() -> None:
    sup = pool(**{"pool.max_tasks_per_child": 3})
    try:
        assert isinstance(sup.submit(fails).exception(10), ValueError)
        assert isinstance(sup.submit(dies).exception(10), WorkerLost)
        assert isinstance(sup.submit(napping, (5.0,), timeout=0.2).exception(10), TaskTimeout)
        for f in [sup.submit(abs, (-i,)) for i in range(10)]:
            f.result(10)
        totals = wait_for(lambda: (t := sup.status()["totals"])["exits"].get("max-tasks", 0) >= 1 and t)
        assert totals["failed"] == {"error": 1, "crash": 1, "timeout": 1, "cancelled": 0, "shutdown": 0}
        assert totals["completed"] == 10 and totals["submitted"] == 13
        assert totals["exits"]["crash"] == 1 and totals["exits"]["timeout"] == 1
        assert totals["spawned"] >= 5
    finally:
        sup.shutdown()
    final = sup.status()
    assert final["state"] == "stopped" and final["workers"] == []
    assert final["totals"]["exits"]["shutdown"] >= 1


def test_status_while_the_pool_stops_from_another_thread_never_raises() -> None:
    import threading

    sup = pool()
    seen: list[str] = []
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            while not sup.stopped:
                seen.append(sup.status()["state"])
            seen.append(sup.status()["state"])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=poll)
    t.start()
    for f in [sup.submit(abs, (-i,)) for i in range(200)]:
        f.result(10)
    sup.shutdown()
    t.join(10)
    assert not errors and seen[-1] == "stopped"


@pytest.mark.parametrize(
    ("policy", "delta", "field", "expected"),
    [
        (FixedPolicy(workers=2), 3, "workers", 5),
        (FixedPolicy(workers=2), -5, "workers", 1),
        (FixedPolicy(workers=2), 100, "workers", 8),  # the limit
        (OnDemandPolicy(pre_fork=1, max_forks=2), 3, "pre_fork", 4),
        (OnDemandPolicy(pre_fork=1, max_forks=2), 3, "max_forks", 4),
        (SparePolicy(min_spare=2, max_spare=4, max_servers=6), 1, "min_spare", 3),
        (SparePolicy(min_spare=2, max_spare=4, max_servers=6), 9, "max_spare", 6),
        (SparePolicy(min_spare=2, max_spare=4, max_servers=6), -9, "min_spare", 1),
    ],
)
def test_each_built_in_policy_resizes_within_its_limits(policy: Any, delta: int, field: str, expected: int) -> None:
    assert getattr(policy.resized(delta, 8), field) == expected


def test_resize_adds_and_removes_running_workers() -> None:
    sup = pool(**{"scaling.workers": 1, "scaling.name": "fixed"})
    try:
        wait_for(lambda: sup.status()["totals"]["idle"] == 1)
        assert sup.resize(2).workers == 3  # type: ignore[attr-defined]
        wait_for(lambda: sup.status()["totals"]["idle"] == 3)
        sup.resize(-2)
        wait_for(lambda: sup.status()["totals"]["workers"] == 1 and sup.status()["totals"]["stopping"] == 0)
        assert sup.status()["policy"] == {"name": "fixed", "workers": 1, "max_workers": 1}
    finally:
        sup.shutdown()


def test_a_policy_without_resized_is_refused_with_its_name() -> None:
    class Plain:
        name = "plain"

        def max_workers(self) -> int:
            return 1

        def decide(self, stats: Any) -> Any:
            from prefork.strategies.scaling import Decision

            return Decision(spawn=max(0, 1 - stats.alive))

    sup = Supervisor(load_config(None, {"scaling.name": "fixed", "scaling.workers": 1}))
    sup._scaler.replace_policy(Plain())
    with pytest.raises(TypeError, match="'plain' cannot be resized"):
        sup.resize(1)
    sup.shutdown()


def test_with_timing_each_outcome_lands_in_the_queue_wait_and_run_time_histograms() -> None:
    sup = pool(**{"scaling.workers": 1})
    sup.tally.timing = True
    try:
        for f in [sup.submit(napping, (0.03,)) for _ in range(3)]:
            f.result(10)
        assert isinstance(sup.submit(fails).exception(10), ValueError)
        timing = sup.status()["timing"]
        run, wait = timing["run_time"], timing["queue_wait"]
        assert run["count"] == 4 and wait["count"] == 4
        assert 0.09 <= run["sum"] < 2.0  # three naps of 30 ms, one quick failure
        i = run["buckets"].index(0.05)  # 30 ms naps fall in the (0.025, 0.05] bucket
        assert run["counts"][i] == 3
        assert wait["sum"] >= 0.03  # the second and third nap waited for the first
    finally:
        sup.shutdown()


def wait_for_file(path: str) -> None:
    end = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def title_of(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_a_task_worker_s_title_says_busy_and_the_method_while_it_runs_then_idle(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    sup = pool(**{"scaling.workers": 1, "name": "titled"})
    try:
        wait_for_idle = wait_for_status(sup, lambda s: s["totals"]["idle"] == 1)
        [pid] = [w["pid"] for w in wait_for_idle["workers"]]
        assert title_of(pid) == "titled worker"
        fut = sup.submit(wait_for_file, (gate,))
        wait_for_title = f"titled worker busy {__name__}:wait_for_file"
        end = time.monotonic() + 10
        while title_of(pid) != wait_for_title and time.monotonic() < end:
            time.sleep(0.01)
        assert title_of(pid) == wait_for_title
        open(gate, "w").close()
        fut.result(10)
        end = time.monotonic() + 10
        while title_of(pid) != "titled worker" and time.monotonic() < end:
            time.sleep(0.01)
        assert title_of(pid) == "titled worker"
    finally:
        sup.shutdown()


def wait_for_status(sup: Supervisor, ok: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = sup.status()
        if ok(s):
            return s
        time.sleep(0.01)
    raise AssertionError(f"timed out; last status {sup.status()}")
