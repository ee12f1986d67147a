"""``prefork simulate`` (``prefork.simulate``): the policy on a fake clock, through the
supervisor's own ``Scaler`` and ``Census``.

Queueing computed by hand for a fixed pool; the spare policy's doubling and the
on-demand policy's spawn_delay as their ``decide`` rules give them; a user's
policy by import path; what the policy is shown; bursts; traces from CSV (bad
rows named by line and column) and synthetic ones (seeded); the command line,
its JSON and its PNG chart; a property test over random traces and policies; a
real pool agreeing with the simulation; and docs/simulate.md, run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
import shlex
import shutil
import struct
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork import Decision, PoolStats
from prefork.config import load_config
from prefork.errors import ConfigError
from prefork.executor import Executor
from prefork.simulate import (
    NO_MATPLOTLIB,
    Burst,
    Service,
    SimulationResult,
    Trace,
    load_policy,
    main,
    simulate,
)
from prefork.strategies.scaling import FixedPolicy, OnDemandPolicy, SparePolicy
from prefork.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.* by import path, as from the project root

from examples.plugin_backlog_policy import InHandPolicy  # noqa: E402

WAIT = 30.0


def cli(*args: str) -> tuple[int, str, str]:
    """``prefork simulate ARGS``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """main() puts the current directory on sys.path (for import paths): keep that to the test,
    and run each test in its own directory (no ./prefork.toml but the test's)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


def batches(times: tuple[float, ...]) -> list[tuple[float, int]]:
    return [(round(t, 9), len(list(group))) for t, group in itertools.groupby(times)]


# -- queueing by hand ----------------------------------------------------------------------------


def test_a_fixed_pool_too_small_for_its_load_queues_as_computed_by_hand() -> None:
    # Two workers, a task every 0.1 s from t=1, each 0.3 s: task k starts when task k-2 ends
    # or when it arrives; start_2m = 1 + 0.3m, start_2m+1 = 1.1 + 0.3m, so wait_k = 0.1 * (k // 2).
    trace = Trace.from_rows([(1 + 0.1 * k, 0.3) for k in range(20)])
    r = simulate(FixedPolicy(workers=2), trace)
    assert r.waits == pytest.approx([0.1 * (k // 2) for k in range(20)])
    assert r.unfinished == 0 and r.forks == 2 and r.retirements == 0 and r.peak_workers == 2
    assert r.end == pytest.approx(1.1 + 0.3 * 9 + 0.3)  # the last task starts at 3.8
    assert r.busy_worker_seconds == pytest.approx(20 * 0.3)
    assert r.booting_worker_seconds == pytest.approx(2 * 0.05)
    assert r.idle_worker_seconds == pytest.approx(2 * (r.end - 0.05) - 6.0)
    waits = r.wait_stats()
    assert waits["p50"] == pytest.approx(0.4) and waits["p99"] == pytest.approx(0.9) and waits["max"] == pytest.approx(0.9)
    assert waits["mean"] == pytest.approx(0.45)
    # the queue is longest when the last task arrives at 2.9: by then tasks 0..13 have started
    # (start_12 = 2.8, start_13 = 2.9), tasks 14..19 wait
    assert r.peak_queue == 6


def test_a_fixed_pool_big_enough_never_queues_and_its_idle_time_is_what_is_left() -> None:
    trace = Trace.from_rows([(1 + 0.1 * k, 0.25) for k in range(20)])
    r = simulate(FixedPolicy(workers=3), trace)
    assert set(r.waits) == {0.0} and r.peak_queue == 0
    assert r.end == pytest.approx(1 + 1.9 + 0.25)
    assert r.busy_worker_seconds == pytest.approx(5.0)
    assert r.idle_worker_seconds == pytest.approx(3 * (3.15 - 0.05) - 5.0)
    assert r.series.busy[-1] == 0 and max(r.series.busy) == 3 and set(r.series.workers[1:]) == {3}


def test_a_task_waits_for_its_worker_to_boot_and_until_stretches_the_run() -> None:
    r = simulate(FixedPolicy(workers=1), Trace.from_rows([(0.0, 1.0)]), boot_time=0.25, until=10.0)
    assert r.waits == (0.25,) and r.finished == (1.25,)
    assert r.end == 10.0 and r.idle_worker_seconds == pytest.approx(10.0 - 1.25)


# -- the built-in policies' pacing ----------------------------------------------------------------


def test_the_spare_policy_forks_1_2_4_per_tick_while_short_of_spares() -> None:
    # No tasks: the policy is asked at its ticks only.  Short of min_spare = 8 it forks
    # spawn_rate workers (1, 2, 4: doubled each tick), never past max_spare spares.
    policy = SparePolicy(start_servers=0, min_spare=8, max_spare=10, max_servers=20, tick=1.0)
    r = simulate(policy, Trace.from_rows([], duration=5.5))
    assert batches(r.fork_times) == [(0.0, 1), (1.0, 2), (2.0, 4), (3.0, 3)]  # 1 + 2 + 4 = 7 < 8: then max_spare - 7
    assert r.peak_workers == 10 and r.retirements == 0 and r.end == 5.5


def test_the_spare_policy_retires_one_surplus_idle_worker_per_tick() -> None:
    policy = SparePolicy(start_servers=6, min_spare=1, max_spare=2, max_servers=10, tick=0.5)
    r = simulate(policy, Trace.from_rows([], duration=3.0))
    assert batches(r.fork_times) == [(0.0, 6)]
    # idle from 0.05; the ticks at 0.5, 1.0 ... 2.0 each retire one; 2 spares are kept
    assert [round(t, 9) for t in r.retire_times] == [0.5, 1.0, 1.5, 2.0]
    assert r.series.workers[-1] == 2


def test_the_on_demand_policy_forks_one_per_spawn_delay_while_tasks_wait() -> None:
    # Ten long tasks at t=0.  decide(): alive 0 < pre_fork 1: fork (t=0).  It boots at 0.05
    # and takes a task; nine wait, so one more fork is due at last_spawn + spawn_delay = 0.5,
    # and the policy asks to be asked then (next_tick = 0.45); and so on up to max_forks.
    policy = OnDemandPolicy(pre_fork=1, max_forks=4, spawn_delay=0.5)
    r = simulate(policy, Trace.from_rows([(0.0, 10.0)] * 10))
    assert r.fork_times == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert r.started[:4] == pytest.approx([0.05, 0.55, 1.05, 1.55])  # each right after its worker booted
    assert r.peak_workers == 4 and r.unfinished == 0


def test_the_on_demand_policy_retires_beyond_pre_fork_after_idle_timeout() -> None:
    policy = OnDemandPolicy(pre_fork=1, max_forks=3, spawn_delay=0.0, idle_timeout=2.0)
    r = simulate(policy, Trace.from_rows([(0.0, 1.0)] * 3), until=10.0)
    assert batches(r.fork_times) == [(0.0, 1), (0.05, 1), (0.1, 1)]  # one per pass: each boot is a pass
    # all idle from ~1.1; one retired when it has been idle 2 s, the next idle_timeout later
    assert r.retirements == 2
    assert r.retire_times[0] == pytest.approx(1.05 + 2.0)  # the longest idle: the first worker, done at 1.05
    assert r.retire_times[1] == pytest.approx(r.retire_times[0] + 2.0)
    assert r.series.workers[-1] == 1


# -- what the policy is shown -----------------------------------------------------------------------


@attrs.frozen
class Recorder:
    """Two workers, and a record of every snapshot it was shown."""

    name: ClassVar[str] = "recorder"
    seen: list[PoolStats] = attrs.field(factory=list, eq=False)

    def max_workers(self) -> int:
        return 2

    def decide(self, stats: PoolStats) -> Decision:
        self.seen.append(stats)
        return Decision(spawn=max(0, 2 - stats.alive), next_tick=0.5)


def test_the_policy_sees_the_census_the_supervisor_would_build() -> None:
    policy = Recorder()
    simulate(policy, Trace.from_rows([(1.0, 1.0), (1.2, 0.5), (1.3, 0.1)]), until=3.0)
    by_time = {round(s.now, 9): s for s in policy.seen}
    first = by_time[0.0]
    assert (first.alive, first.booting, first.spawned_total, first.last_spawn) == (0, 0, 0, -math.inf)
    # ticks at 0.5 s: both idle since they booted at 0.05
    s = by_time[0.5]
    assert (s.alive, s.booting, s.idle, s.busy, s.queued, s.spawned_total, s.last_spawn) == (2, 0, 2, 0, 0, 2, 0.0)
    assert s.longest_idle == pytest.approx(0.45)
    # 1.3: both busy (since 1.0 and 1.2), one task waits: a pass, and the policy is asked (tasks wait)
    s = by_time[1.3]
    assert (s.idle, s.busy, s.queued) == (0, 2, 1)
    # 1.7: the second task ends and the third starts at once; no tick (the next is at 1.8)
    assert sorted(by_time) == [0.0, 0.5, 1.0, 1.3, 1.8, 2.3, 2.8]
    s = by_time[1.8]  # the third task (0.1 s) has just ended; the first runs until 2.0
    assert (s.idle, s.busy, s.queued, s.longest_idle) == (1, 1, 0, 0.0)
    s = by_time[2.3]  # all done; the longest idle has been so since 1.8
    assert (s.idle, s.busy, s.longest_idle) == pytest.approx((2, 0, 0.5))


@attrs.frozen
class RetireAtFour:
    """Three workers; at 4 s, one retired.  Records what it was shown."""

    name: ClassVar[str] = "retire-at-four"
    seen: list[PoolStats] = attrs.field(factory=list, eq=False)

    def max_workers(self) -> int:
        return 3

    def decide(self, stats: PoolStats) -> Decision:
        self.seen.append(stats)
        if stats.spawned_total == 0:
            return Decision(spawn=3, next_tick=0.5)
        return Decision(retire=1 if stats.now == 4.0 else 0, next_tick=0.5)


@attrs.frozen
class OneEveryHalfSecond:
    """Forks one worker per tick up to three, a tick every half second.  Records what it was shown."""

    name: ClassVar[str] = "one-every-half-second"
    seen: list[PoolStats] = attrs.field(factory=list, eq=False)

    def max_workers(self) -> int:
        return 3

    def decide(self, stats: PoolStats) -> Decision:
        self.seen.append(stats)
        return Decision(spawn=1 if stats.alive < 3 else 0, next_tick=0.5)


def test_a_task_goes_to_the_idle_worker_forked_first_as_in_the_supervisor() -> None:
    # The supervisor dispatches to ready workers in the order they were forked, not by idle
    # time.  Workers 1, 2, 3 are forked at 0, 0.5 and 1.0 (ready 0.05 later).  Worker 1 runs the
    # tasks of 0.1 and 0.6 (workers 1 and 2 are idle at 0.6: worker 1 takes it) and is idle from
    # 1.5; the tasks of 2.0 and 2.5 go to workers 1 and 2.  At 3.0 the one idle worker is
    # worker 3, idle since it booted at 1.05.  (Dispatching to the last forked would leave
    # worker 1 idle since 0.3, and to the longest idle, worker 1 since 1.5.)
    policy = OneEveryHalfSecond()
    trace = Trace.from_rows([(0.1, 0.2), (0.6, 0.9), (2.0, 5.0), (2.5, 5.0)])
    simulate(policy, trace, until=3.0)
    (at_three,) = [s for s in policy.seen if s.now == 3.0]
    assert (at_three.idle, at_three.busy, at_three.longest_idle) == pytest.approx((1, 2, 3.0 - 1.05))


def test_the_longest_idle_worker_is_retired_first() -> None:
    # Workers 1, 2, 3 run tasks until 2.5, 2.0 and 1.5; at 3.0 worker 1 takes a task.
    # At 4.0 one is retired: worker 3 (idle since 1.5), not worker 2 (since 2.0).
    policy = RetireAtFour()
    simulate(policy, Trace.from_rows([(1.0, 1.5), (1.0, 1.0), (1.0, 0.5), (3.0, 3.0)]), until=6.0)
    by_time = {round(s.now, 9): s for s in policy.seen}
    assert (by_time[4.0].alive, by_time[4.0].idle, by_time[4.0].longest_idle) == pytest.approx((3, 2, 2.5))
    assert (by_time[4.5].alive, by_time[4.5].idle, by_time[4.5].longest_idle) == pytest.approx((2, 1, 2.5))


# -- bursts ------------------------------------------------------------------------------------------


def test_a_burst_is_absorbed_when_the_queue_is_empty_again() -> None:
    # 10 one-second tasks at t=5 on two workers start at 5, 5, 6, 6 ... 9, 9: the queue is empty at 9
    trace = Trace.poisson(0.0, 20.0, Service.constant(1.0), bursts=[Burst(5.0, 10)])
    r = simulate(FixedPolicy(workers=2), trace)
    (b,) = r.bursts
    assert (b.at, b.tasks, b.absorbed_after) == pytest.approx((5.0, 10, 4.0))
    assert "burst         at 5 s, 10 tasks: queue empty again after 4 s" in r.summary()


def test_a_burst_met_by_idle_workers_is_absorbed_at_once_and_one_never_absorbed_says_so() -> None:
    trace = Trace.poisson(0.0, 10.0, Service.constant(1.0), bursts=[Burst(1.0, 3), Burst(2.0, 50)])
    r = simulate(FixedPolicy(workers=3), trace, stall_limit=1.0)
    assert r.bursts[0].absorbed_after == 0.0
    assert r.bursts[1].absorbed_after == pytest.approx(16.0)  # 50 tasks, 3 at a time: the last 2 start at 18
    never = simulate(SparePolicy(start_servers=0, min_spare=0, max_spare=1), trace, stall_limit=2.0)
    assert [b.absorbed_after for b in never.bursts] == [None, None]
    assert "never absorbed" in never.summary()


# -- the policy as a config names it ------------------------------------------------------------------


POLICY_MODULE = '''
from typing import ClassVar

import attrs

from prefork import Decision, PoolStats


@attrs.frozen
class Steady:
    """Exactly n workers, asked every half second."""

    name: ClassVar[str] = "steady"
    n: int = 1

    def max_workers(self) -> int:
        return self.n

    def decide(self, stats: PoolStats) -> Decision:
        return Decision(spawn=max(0, self.n - stats.alive), next_tick=0.5)
'''


def test_a_users_policy_by_import_path_from_python_and_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "my_policies.py").write_text(POLICY_MODULE, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    trace = Trace.from_rows([(1.0, 1.0)] * 4)
    by_path = simulate("my_policies:Steady", trace)
    assert by_path.forks == 1 and by_path.waits == pytest.approx([0, 1, 2, 3])
    table = simulate({"name": "my_policies:Steady", "n": 4}, trace)
    assert table.forks == 4 and set(table.waits) == {0.0}
    # the command line: --policy and --set, as in other commands; it imports from the current directory
    sys.path.remove(str(tmp_path))
    sys.modules.pop("my_policies", None)
    (tmp_path / "trace.csv").write_text("1,1\n1,1\n1,1\n1,1\n", encoding="utf-8")
    code, out, err = cli("--policy", "my_policies:Steady", "--set", "scaling.n=2", "--trace", "trace.csv", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["policy"] == {"name": "steady", "options": {"n": 2}}
    assert data["forks"] == 2 and data["queue_wait"]["max"] == pytest.approx(1.0)
    code, out, err = cli("--policy", "my_policies:Steady", "--set", "scaling.m=2", "--trace", "trace.csv")
    assert code == 2 and err.startswith("prefork: error: ") and "scaling" in err and err.count("\n") == 1


def test_a_plugin_policy_class_and_a_config_file_work_like_everywhere_else(tmp_path: Path) -> None:
    trace = Trace.from_rows([(1.0, 2.0)] * 8)
    backlog = simulate("examples.plugin_backlog_policy:InHandPolicy", trace)
    assert isinstance(backlog.policy, InHandPolicy) and backlog.peak_workers == 2  # 8 tasks / per_worker 4
    assert simulate(InHandPolicy, trace).forks == backlog.forks  # a class, as in code
    toml = tmp_path / "prefork.toml"
    toml.write_text('[scaling]\nname = "on-demand"\npre_fork = 1\nmax_forks = 3\nspawn_delay = 0.0\n', encoding="utf-8")
    from_file = simulate(load_config(toml), trace)
    assert isinstance(from_file.policy, OnDemandPolicy) and from_file.peak_workers == 3
    (tmp_path / "t.csv").write_text("\n".join(["1,2"] * 8) + "\n", encoding="utf-8")
    # ./prefork.toml is read as by the other commands; --set changes it
    code, out, _ = cli("--trace", "t.csv", "--set", "scaling.max_forks=5", "--json")
    assert code == 0 and json.loads(out)["peak_workers"] == 5
    code, out, _ = cli("-c", str(toml), "--trace", "t.csv", "--policy", "fixed", "--json")
    assert code == 0 and json.loads(out)["policy"]["name"] == "fixed"  # its on-demand options are left behind with it


def test_policies_that_cannot_be_simulated_are_refused_with_one_line() -> None:
    trace = Trace.from_rows([(0.0, 1.0)])
    with pytest.raises(ConfigError, match=r"scaling.name = 'sparse': unknown scaling strategy; did you mean 'spare'\?"):
        simulate("sparse", trace)
    with pytest.raises(ConfigError, match=r"a \[scaling\] table needs a name"):
        simulate({"min_spare": 3}, trace)
    with pytest.raises(ConfigError, match=r"max_workers\(\) = 0: the pool would run every task in the caller"):
        simulate(OnDemandPolicy(pre_fork=0, max_forks=0), trace)
    with pytest.raises(ConfigError, match=r"is not a scaling policy"):
        load_policy(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"boot_time = -1"):
        simulate("fixed", trace, boot_time=-1)


@attrs.frozen
class Spinner:
    name: ClassVar[str] = "spinner"

    def max_workers(self) -> int:
        return 1

    def decide(self, stats: PoolStats) -> Decision:
        return Decision(spawn=1 - stats.alive, next_tick=0.0)


def test_a_policy_that_never_lets_time_pass_is_named_and_a_policy_that_starves_tasks_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"^scaling policy 'spinner': asked to be asked again at once"):
        simulate(Spinner(), Trace.from_rows([(0.0, 1.0)]))
    starving = SparePolicy(start_servers=0, min_spare=0, max_spare=1)  # never forks for waiting tasks
    r = simulate(starving, Trace.from_rows([(1.0, 0.1), (2.0, 0.1)]), stall_limit=5.0)
    assert r.unfinished == 2 and r.stalled_at == 1.0 and r.forks == 0 and r.waits == ()
    assert "UNFINISHED    2 tasks: no worker came for them (stalled from 1 s" in r.summary()
    assert r.to_json()["unfinished"] == 2


def test_a_policy_that_raises_fails_the_simulation_with_its_own_error_and_when() -> None:
    @attrs.frozen
    class Broken:
        name: ClassVar[str] = "broken"

        def max_workers(self) -> int:
            return 1

        def decide(self, stats: PoolStats) -> Decision:
            if stats.queued:
                raise ZeroDivisionError("oops")
            return Decision()

    with pytest.raises(ZeroDivisionError) as info:
        simulate(Broken(), Trace.from_rows([(3.0, 1.0)]))
    assert info.value.__notes__ == ["prefork simulate: the scaling policy 'broken' failed at 3 s"]


# -- traces -------------------------------------------------------------------------------------------


def test_a_csv_trace_header_optional_any_order_bursts_found(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("\ufeffArrival , Service\n\n3,0.5\n1,0.25\n1,0.25\n 1 , 1e-1\n2,0\n", encoding="utf-8")
    t = Trace.from_csv(path)
    assert t.arrivals == (1.0, 1.0, 1.0, 2.0, 3.0) and t.services == (0.25, 0.25, 0.1, 0.0, 0.5)
    assert t.bursts == (Burst(1.0, 3),) and t.duration == 3.0 and t.source == str(path)
    assert Trace.from_csv(path, burst_min=4).bursts == ()
    (tmp_path / "plain.csv").write_text("0,1\n", encoding="utf-8")
    assert Trace.from_csv(tmp_path / "plain.csv").arrivals == (0.0,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arrival,service\n0,0.1\n1,abc\n", "t.csv:3: column 2 (service): 'abc' is not a number"),
        ("0,0.1\n\n\nx,1\n", "t.csv:4: column 1 (arrival): 'x' is not a number"),
        ("0,0.1\n-1,1\n", "t.csv:2: column 1 (arrival): '-1': must be a finite number of seconds >= 0"),
        ("0,nan\n", "t.csv:1: column 2 (service): 'nan': must be a finite number of seconds >= 0"),
        ("0,inf\n", "t.csv:1: column 2 (service): 'inf': must be a finite number of seconds >= 0"),
        ("0,1\n1,1,1\n", "t.csv:2: column 3: expected 2 columns, arrival,service (seconds); this row has 3"),
        ("0,1\n5\n", "t.csv:2: column 2: expected 2 columns, arrival,service (seconds); this row has 1"),
        ("time,service\n0,1\n", "t.csv:1: column 1: 'time': expected a number, or the header arrival,service"),
        ("arrival,duration\n0,1\n", "t.csv:1: column 2: 'duration': expected a number, or the header arrival,service"),
        ("0,1\narrival,service\n", "t.csv:2: column 1 (arrival): 'arrival' is not a number"),
        ('0,"1\n', "t.csv:1: not valid CSV"),
    ],
)
def test_a_bad_csv_row_is_rejected_naming_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Trace.from_csv("t.csv")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    code, out, err = cli("--policy", "fixed", "--trace", "t.csv")
    assert (code, out) == (2, "") and err == f"prefork: error: {info.value}\n"


def test_an_unreadable_trace_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^missing.csv: cannot read the trace: No such file or directory$"):
        Trace.from_csv("missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"0,1\n\xff\xfe,1\n")
    with pytest.raises(ConfigError, match=r"^bin.csv: not a UTF-8 text file"):
        Trace.from_csv("bin.csv")


def test_synthetic_traces_are_seeded_and_have_the_rates_asked_for() -> None:
    service = Service.exponential(0.2)
    a = Trace.poisson(100.0, 100.0, service, seed=3)
    assert a == Trace.poisson(100.0, 100.0, service, seed=3)
    assert a != Trace.poisson(100.0, 100.0, service, seed=4)
    assert abs(len(a) - 10_000) < 5 * 100  # Poisson: sd = sqrt(10000)
    assert abs(sum(a.services) / len(a) - 0.2) < 5 * 0.2 / 100  # sd of the mean = 0.2 / sqrt(n)
    assert all(0 <= x < 100.0 for x in a.arrivals) and a.duration == 100.0
    assert set(Trace.poisson(5.0, 10.0, Service.constant(0.3)).services) == {0.3}
    # the diurnal rate is high in the first half of its period and low in the second
    d = Trace.diurnal(50.0, 100.0, 100.0, service, amplitude=1.0, seed=1)
    first = sum(1 for x in d.arrivals if x < 50.0)
    assert abs(len(d) - 5000) < 5 * math.sqrt(5000)
    assert abs(first - 5000 * (1 + 2 / math.pi) / 2) < 5 * math.sqrt(5000)  # integral of 1 + sin over the first half
    b = Trace.poisson(1.0, 30.0, Service.constant(1.0), seed=2, bursts=[Burst(10.0, 25)])
    assert b.arrivals.count(10.0) == 25 and b.bursts == (Burst(10.0, 25),)
    with pytest.raises(ConfigError, match=r"burst time = 40.0: is past the trace's duration \(30 s\)"):
        Trace.poisson(1.0, 30.0, Service.constant(1.0), bursts=[Burst(40.0, 2)])
    with pytest.raises(ConfigError, match=r"amplitude = 1.5: must be between 0 and 1"):
        Trace.diurnal(1.0, 10.0, 10.0, service, amplitude=1.5)


def test_a_trace_built_by_hand_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"task 1 arrival = 1.0: arrivals must be in order"):
        Trace((2.0, 1.0), (0.1, 0.1), 2.0)
    with pytest.raises(ConfigError, match=r"2 arrival times but 1 service times"):
        Trace((1.0, 2.0), (0.1,), 2.0)
    with pytest.raises(ConfigError, match=r"task 0 service = -0.5"):
        Trace.from_rows([(0.0, -0.5)])


# -- the command line ----------------------------------------------------------------------------------


def test_the_command_line_and_the_api_agree() -> None:
    code, out, err = cli("--policy", "spare", "--set", "scaling.min_spare=3", "--poisson", "20", "--service", "exp:0.2",
                         "--duration", "30", "--burst", "10:40", "--seed", "7", "--json")
    assert (code, err) == (0, "")
    trace = Trace.poisson(20.0, 30.0, Service.exponential(0.2), seed=7, bursts=[Burst(10.0, 40)])
    expected = simulate({"name": "spare", "min_spare": 3}, trace).to_json()
    assert json.loads(out) == json.loads(json.dumps(expected))
    assert expected["tasks"] == len(trace) and expected["bursts"][0]["tasks"] == 40
    code, text, _ = cli("--policy", "spare", "--set", "scaling.min_spare=3", "--poisson", "20", "--service", "exp:0.2",
                        "--duration", "30", "--burst", "10:40", "--seed", "7")
    assert code == 0 and text == simulate({"name": "spare", "min_spare": 3}, trace).summary()
    code, out, _ = cli("--policy", "fixed", "--diurnal", "5", "--period", "20", "--amplitude", "0.5", "--duration", "40",
                       "--service", "const:0.1", "--json")
    assert code == 0
    assert json.loads(out)["tasks"] == len(Trace.diurnal(5.0, 20.0, 40.0, Service.constant(0.1), amplitude=0.5))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no trace: give --trace FILE.csv, --poisson RATE, --diurnal RATE or --burst AT:N"),
        (("--poisson", "1", "--diurnal", "1"), "--poisson and --diurnal: give one trace"),
        (("--trace", "t.csv", "--service", "exp:1"), "--service: applies to synthetic traces, not to --trace t.csv"),
        (("--trace", "t.csv", "--burst", "1:2"), "--burst: applies to synthetic traces"),
        (("--poisson", "1", "--period", "5"), "--period 5.0: applies to --diurnal only"),
        (("--poisson", "1", "--burst-min", "3"), "--burst-min 3: applies to --trace only"),
        (("--poisson", "-1"), "--poisson -1.0: must be a finite number >= 0"),
        (("--poisson", "nan"), "--poisson nan: must be a finite number >= 0"),
        (("--poisson", "1", "--duration", "0"), "--duration 0.0: must be a finite number > 0"),
        (("--poisson", "1", "--service", "gauss:1"), "--service 'gauss:1': expected SECONDS, const:SECONDS or exp:MEAN"),
        (("--poisson", "1", "--service", "exp:-1"), "--service 'exp:-1': the time must be a finite number of seconds >= 0"),
        (("--burst", "10"), "--burst '10': expected AT:N"),
        (("--burst", "10:0"), "--burst '10:0': burst size = 0: must be an integer >= 1"),
        (("--burst", "70:5"), "--burst 70:5: at 70 s, past the trace's duration (60 s; see --duration)"),
        (("--poisson", "1", "--boot-time", "-0.1"), "--boot-time -0.1: must be a finite number >= 0"),
        (("--policy", "spare", "--set", "scaling.name=fixed", "--poisson", "1"), "--policy spare and --set scaling.name=...: name the policy once"),
        (("--set", "scaling.min_spare=3", "--poisson", "1"), "scaling.min_spare"),
        (("--set", "nonsense", "--poisson", "1"), "--set 'nonsense': expected key=value"),
    ],
)
def test_bad_command_lines_fail_with_one_line(args: tuple[str, ...], message: str) -> None:
    Path("t.csv").write_text("0,1\n", encoding="utf-8")
    code, out, err = cli(*args)
    assert (code, out) == (2, "")
    assert err.startswith("prefork: error: ") and message in err and err.count("\n") == 1, err


def test_the_text_summary_names_every_number() -> None:
    code, out, _ = cli("--policy", "on-demand", "--burst", "5:20", "--service", "const:1", "--duration", "20")
    assert code == 0
    labels = [line.split()[0] for line in out.splitlines()]
    assert labels == ["policy", "trace", "tasks", "queue", "burst", "worker-s", "workers", "queue"]
    assert "policy        on-demand (pre_fork=2, max_forks=4, spawn_delay=2.0, idle_timeout=0.0)" in out
    assert re.search(r"^queue wait    p50 \S+ s, p99 \S+ s, max \S+ s, mean \S+ s$", out, re.M)
    assert re.search(r"^worker-s      busy 20\.000, idle \S+, booting 0\.200 \(\d+% of worker time idle\)$", out, re.M)


# -- the chart ------------------------------------------------------------------------------------------


def test_the_chart_is_a_real_png_of_the_size_drawn() -> None:
    code, out, err = cli("--policy", "spare", "--poisson", "50", "--burst", "10:200", "--duration", "30", "--chart", "out.png")
    assert (code, err) == (0, "") and out.endswith("chart         out.png\n")
    data = Path("out.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 550)
    assert len(data) > 20_000  # lines, fills, labels: not an empty canvas
    code, out, _ = cli("--policy", "fixed", "--poisson", "5", "--duration", "5", "--chart", "j.png", "--json")
    assert code == 0 and json.loads(out)["chart"] == "j.png" and Path("j.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_chart_fails_with_one_line_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = cli("--policy", "fixed", "--poisson", "5", "--duration", "5", "--chart", "out.png")
    assert (code, out) == (2, "") and err == f"prefork: error: {NO_MATPLOTLIB}\n"
    assert NO_MATPLOTLIB.endswith("pip install 'prefork[simulate]'")
    assert not Path("out.png").exists()
    with pytest.raises(ConfigError, match=re.escape(NO_MATPLOTLIB)):
        simulate("fixed", Trace.from_rows([(0.0, 1.0)])).chart("x.png")


def test_the_extra_the_error_and_the_page_name_exists_and_brings_matplotlib() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(re.match(r"matplotlib\b", dep) for dep in extras["simulate"])
    assert "pip install 'prefork[simulate]'" in DOC.read_text(encoding="utf-8")
    # the test suite draws charts too: the test extra brings matplotlib (else the chart tests fail to import it)
    assert any(re.match(r"matplotlib\b", dep) for dep in extras["test"])


def test_an_unwritable_chart_is_one_line() -> None:
    code, _, err = cli("--policy", "fixed", "--poisson", "5", "--duration", "5", "--chart", "no/such/dir/x.png")
    assert code == 2 and err.startswith("prefork: error: --chart no/such/dir/x.png: cannot write it") and err.count("\n") == 1


# -- any trace, any policy --------------------------------------------------------------------------------

rows = st.lists(
    st.tuples(st.floats(0, 20, allow_subnormal=False), st.floats(0, 3, allow_subnormal=False)), max_size=40
)
seconds = st.floats(0, 2.0, allow_subnormal=False)
policies = st.one_of(
    st.builds(FixedPolicy, workers=st.integers(1, 5)),
    st.integers(0, 3).flatmap(
        lambda pre: st.builds(OnDemandPolicy, pre_fork=st.just(pre), max_forks=st.integers(max(1, pre), 6),
                              spawn_delay=seconds, idle_timeout=seconds)
    ),
    st.tuples(st.integers(1, 4), st.integers(1, 8)).flatmap(
        lambda m: st.builds(SparePolicy, start_servers=st.integers(0, m[1]), min_spare=st.just(m[0]),
                            max_spare=st.integers(m[0], 6), max_servers=st.just(m[1]), max_rate=st.integers(1, 8),
                            tick=st.floats(0.01, 2.0))
    ),
    st.integers(1, 5).flatmap(
        lambda ceiling: st.builds(InHandPolicy, floor=st.integers(0, ceiling), ceiling=st.just(ceiling),
                                  per_worker=st.integers(1, 4), idle_timeout=seconds)
    ),
)


@settings(max_examples=300, deadline=None)
@given(rows=rows, policy=policies, boot_time=st.floats(0, 0.5, allow_subnormal=False))
def test_any_trace_any_policy_every_task_finishes_once_in_order_within_max_workers(
    rows: list[tuple[float, float]], policy: Any, boot_time: float
) -> None:
    trace = Trace.from_rows(rows)
    r = simulate(policy, trace, boot_time=boot_time)
    assert r.unfinished == 0 and r.stalled_at is None  # (a second finish of one task raises in simulate)
    for a, s, started, finished in zip(trace.arrivals, trace.services, r.started, r.finished, strict=True):
        assert started >= a and finished == started + s
    assert all(w >= 0 for w in r.waits)
    assert list(r.started) == sorted(r.started)  # FIFO: tasks start in the order they arrived
    # each task's run counted once in the busy time; nobody busy who does not exist
    assert r.busy_worker_seconds == pytest.approx(math.fsum(trace.services), rel=1e-9, abs=1e-9)
    assert r.peak_workers <= policy.max_workers()
    assert all(b <= w <= policy.max_workers() for b, w in zip(r.series.busy, r.series.workers, strict=True))
    assert r.forks - r.retirements == r.series.workers[-1]
    assert r.end >= max(r.finished, default=0.0) and r.end >= trace.duration
    assert all(b.absorbed_after is not None and b.absorbed_after >= 0 for b in r.bursts)


def test_a_hundred_thousand_tasks_take_seconds_at_most() -> None:
    trace = Trace.poisson(200.0, 500.0, Service.exponential(0.1), seed=1)
    assert len(trace) > 99_000
    start = time.perf_counter()
    r = simulate(OnDemandPolicy(pre_fork=2, max_forks=30, spawn_delay=0.1, idle_timeout=2.0), trace)
    elapsed = time.perf_counter() - start
    assert r.unfinished == 0 and r.tasks == len(trace)
    assert elapsed < 10.0, f"{elapsed:.1f} s for {len(trace)} tasks"  # ~0.4 s here


# -- a real pool agrees ------------------------------------------------------------------------------------


def hold(seconds: float) -> tuple[float, float]:
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
    time.sleep(seconds)
    return start, time.monotonic()


class Run(NamedTuple):
    started: list[float]
    finished: list[float]


def overlaps(run: Run) -> tuple[bool, bool]:
    """Did the first two tasks to start run at once, and did the third start only after one ended?"""
    order = sorted(range(3), key=lambda i: run.started[i])
    a, b, c = order
    return run.started[b] < min(run.finished[a], run.finished[b]), run.started[c] >= min(run.finished[a], run.finished[b])


@pytest.mark.parametrize(
    "policy",
    [FixedPolicy(workers=2), OnDemandPolicy(pre_fork=0, max_forks=2, spawn_delay=0.0)],
    ids=["fixed-2", "on-demand-max-2"],
)
def test_a_real_pool_does_what_the_simulation_says(policy: Any) -> None:
    # Three 0.6 s tasks at once on at most two workers: two run at once, the third waits for
    # one of them, and the pool forks exactly two workers.
    sim = simulate(policy, Trace.from_rows([(1.0, 0.6)] * 3))
    sim_run = Run(list(sim.started), list(sim.finished))
    assert overlaps(sim_run) == (True, True) and sim.forks == 2
    with Executor(scaling=policy) as pool:
        if isinstance(policy, FixedPolicy):
            wait_until(lambda: pool.stats()["idle"] == 2, WAIT, what="two idle workers")
        futures = [pool.submit(hold, 0.6) for _ in range(3)]
        times = [f.result(WAIT) for f in futures]
        real = Run([t[0] for t in times], [t[1] for t in times])
        stats = pool.stats()
    first_two_at_once, third_after_an_end = overlaps(real)
    assert third_after_an_end and stats["spawned_total"] == sim.forks
    if isinstance(policy, FixedPolicy):  # both workers were idle when the tasks came, as in the simulation
        assert first_two_at_once


# -- docs/simulate.md, run --------------------------------------------------------------------------------

DOC = ROOT / "docs" / "simulate.md"


class Block(NamedTuple):
    line: int
    mark: str
    lang: str
    code: str


def doc_blocks() -> list[Block]:
    found: list[Block] = []
    lines = DOC.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        mark = re.match(r"^<!-- (.*?) -->\s*$", lines[i - 1]) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        found.append(Block(i + 1, mark.group(1) if mark else "", fence.group(1), textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"))
        i = end + 1
    return found


BLOCKS = doc_blocks()


def test_every_block_on_the_page_is_run_or_checked() -> None:
    for block in BLOCKS:
        assert block.mark in ("run", "shell", "output") or block.mark.startswith("file: "), (
            f"docs/simulate.md:{block.line}: a block no test runs; mark it (see {__name__})"
        )
    for before, block in itertools.pairwise(BLOCKS):
        if block.mark == "output":
            assert before.mark in ("run", "shell"), f"docs/simulate.md:{block.line}: output of nothing"
    assert sum(b.mark == "shell" for b in BLOCKS) >= 5 and sum(b.mark == "run" for b in BLOCKS) >= 2


def test_the_page_as_a_reader_follows_it(tmp_path: Path) -> None:
    """Top to bottom in one directory, as the page says: its files written, each command run
    and its output compared with what the page shows."""
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "trace_burst.csv", tmp_path / "examples" / "trace_burst.csv")
    ran = 0
    for block, after in itertools.zip_longest(BLOCKS, BLOCKS[1:]):
        assert block is not None
        if block.mark.startswith("file: "):
            (tmp_path / block.mark.removeprefix("file: ")).write_text(block.code, encoding="utf-8")
            continue
        if block.mark == "shell":
            (command,) = block.code.splitlines()
            words = shlex.split(command)
            assert words[:2] == ["prefork", "simulate"], f"docs/simulate.md:{block.line}"
            code, out, err = cli(*words[2:])
            shown = out + err
            assert code == (2 if err.startswith("prefork: error:") else 0), f"docs/simulate.md:{block.line}: {err}"
        elif block.mark == "run":
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(block.code, f"docs/simulate.md:{block.line}", "exec"), {"__name__": "__doc__"})
            shown = buffer.getvalue()
        else:
            continue
        ran += 1
        if after is not None and after.mark == "output":
            assert shown == after.code, f"docs/simulate.md:{after.line}: the page shows other output than it gives"
    assert ran >= 7
    assert Path("burst.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_example_trace_is_small_and_has_its_burst() -> None:
    t = Trace.from_csv(ROOT / "examples" / "trace_burst.csv")
    assert len(t) == 100 and [b.at for b in t.bursts] == [10.0]


def test_the_result_is_a_frozen_attrs_class() -> None:
    r = simulate("fixed", Trace.from_rows([(0.0, 1.0)]))
    assert isinstance(r, SimulationResult) and attrs.has(SimulationResult)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.end = 3.0  # type: ignore[misc]
