"""The supervisor's scaling step (``prefork._scaler``): no processes, a fake clock."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from prefork._scaler import Scaler
from prefork._workers import Census
from prefork.strategies.scaling import FixedPolicy, OnDemandPolicy, SparePolicy


def count(alive: int = 0, booting: int = 0, idle: int = 0, busy: int = 0, longest_idle: float = 0.0) -> Census:
    return Census(alive, booting, idle, busy, 0, longest_idle)


def test_a_tick_forks_what_the_policy_asks_up_to_max_workers() -> None:
    s = Scaler(FixedPolicy(workers=3))
    step = s.tick(10.0, count(alive=1, idle=1), queued=0)
    assert step.spawn == 2 and step.retire == 0
    assert step.stats.alive == 1 and step.stats.now == 10.0
    assert s.next_tick == 11.0  # no next_tick from the policy: look again in a second


def test_spawn_state_is_carried_to_the_next_tick() -> None:
    s = Scaler(SparePolicy(start_servers=0, min_spare=8, max_spare=10, max_servers=20))
    s.spawned(5.0)
    first = s.tick(5.0, count(alive=1, idle=1), queued=0)
    assert first.spawn == 1 and s.spawn_rate == 2  # the seed's doubling: 1, then 2...
    for _ in range(first.spawn):
        s.spawned(5.0)
    second = s.tick(6.0, count(alive=2, idle=2), queued=0)
    assert second.spawn == 2 and second.stats.spawn_rate == 2 and second.stats.spawned_total == 2
    assert second.stats.last_spawn == 5.0


def test_boot_failures_back_off_doubling_up_to_two_seconds_and_forks_wait() -> None:
    s = Scaler(FixedPolicy(workers=1))
    delays = [s.boot_failed(100.0) for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    step = s.tick(100.5, count(), queued=0)
    assert step.spawn == 0 and step.decision.spawn == 1
    assert s.next_tick <= 102.0  # asked again by the time forking is allowed
    assert s.tick(102.0, count(), queued=0).spawn == 1
    s.booted()
    assert s.boot_failures == 0


def test_one_fork_per_tick_asks_again_at_once() -> None:
    s = Scaler(FixedPolicy(workers=4), one_fork_per_tick=True)
    step = s.tick(1.0, count(), queued=0)
    assert step.spawn == 1 and s.next_tick == 1.0


def test_a_tick_is_due_at_its_time_or_while_tasks_wait_and_soon_makes_it_due() -> None:
    s = Scaler(OnDemandPolicy(pre_fork=1, max_forks=2, spawn_delay=1.0))
    s.tick(0.0, count(alive=1, idle=1), queued=0)
    assert not s.due(0.5, queued=0)
    assert s.due(0.5, queued=1)
    s.soon()
    assert s.due(0.5, queued=0)


@given(
    alive=st.integers(0, 50), idle=st.integers(0, 50), queued=st.integers(0, 1000),
    now=st.floats(0, 1e6, allow_nan=False), workers=st.integers(1, 20),
)
def test_no_tick_forks_past_max_workers_or_asks_a_negative_count(alive: int, idle: int, queued: int, now: float, workers: int) -> None:
    s = Scaler(OnDemandPolicy(pre_fork=min(2, workers), max_forks=workers, spawn_delay=0.0))
    step = s.tick(now, count(alive=alive, idle=min(idle, alive), busy=alive - min(idle, alive)), queued)
    assert 0 <= step.spawn <= max(0, workers - alive)
    assert step.retire >= 0
    assert s.next_tick >= now and not math.isnan(s.next_tick)


def test_work_waiting_outside_the_queue_reaches_the_policy_as_queued() -> None:
    """``Supervisor(waiting=...)`` (prefork serve's listen queue): the policy sees it in ``queued``;
    a waiting() that raises is logged and the policy sees the queue alone."""
    import time as _time

    from prefork._supervisor import Supervisor
    from prefork.config import load_config
    from prefork.strategies.scaling import Decision, PoolStats

    seen: list[int] = []

    class Recording:
        name = "recording"

        def max_workers(self) -> int:
            return 1

        def decide(self, stats: PoolStats) -> Decision:
            seen.append(stats.queued)
            return Decision(next_tick=0.01)

    calls = iter([7, 7, RuntimeError("kernel says no")])

    def waiting() -> int:
        value = next(calls, 3)
        if isinstance(value, BaseException):
            raise value
        return value

    sup = Supervisor(load_config(None, {"scaling.workers": 1}), threaded=False, waiting=waiting)
    sup._scaler.replace_policy(Recording())
    sup.start()
    try:
        end = _time.monotonic() + 5
        while len(seen) < 5 and _time.monotonic() < end:
            sup.step(0.02)
    finally:
        sup.shutdown()
    assert seen[:2] == [7, 7] and seen[2] == 0 and seen[3] == 3, seen
