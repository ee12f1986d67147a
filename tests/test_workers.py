"""The worker table, the workers' timers and the verdict on an exit (``prefork._workers``),
and the dispatch plan (``prefork._dispatch``): no processes.

The table is driven by random sequences of what the supervisor does to it
(hypothesis stateful testing): a slot taken for a spawn, the fork reported (a
pid), its channel watched and unwatched, the worker removed, a stale spawner
event for a slot given up.  After every step: each slot is free or held by one
worker, never both; every worker is found by its slot, pid and channel; nothing
removed is found again; only a free slot is taken.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefork._dispatch import AUTO_BATCH, auto_prefetch, fill
from prefork._ledger import Ledger
from prefork._task import Task
from prefork._workers import BOOTING, READY, RETIRING, Worker, WorkerTable, verdict

SLOTS = 5


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = WorkerTable(SLOTS)
        self.serial = 0
        self.pid = 100
        self.fd = 10
        self.live: dict[int, Worker] = {}  # by slot, as the model sees them
        self.fds: dict[Worker, int] = {}
        self.gone: list[Worker] = []

    @rule()
    def spawn(self) -> None:
        self.serial += 1
        free = sorted(set(range(SLOTS)) - set(self.live))
        w = self.table.add(self.serial, 0.0, -1)
        if not free:
            assert w is None
            return
        assert w is not None and w.slot in free, "a free slot is taken"
        self.live[w.slot] = w

    @precondition(lambda self: any(w.pid == 0 for w in self.live.values()))
    @rule(data=st.data())
    def forked(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from([w for w in self.live.values() if w.pid == 0]))
        assert self.table.current(w.slot, w.serial) is w
        self.pid += 1
        self.table.forked(w, self.pid)
        self.fd += 1
        self.table.watch(w, self.fd)
        self.fds[w] = self.fd

    @precondition(lambda self: bool(self.fds))
    @rule(data=st.data())
    def end_of_stream(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(sorted(self.fds, key=lambda w: w.slot)))
        self.table.unwatch(self.fds.pop(w))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda w: w.slot)))
        assert self.table.remove(w, self.fds.pop(w, -1))
        assert not self.table.remove(w), "removed twice"
        del self.live[w.slot]
        self.gone.append(w)

    @precondition(lambda self: bool(self.gone))
    @rule(data=st.data())
    def stale_event(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.gone))
        assert self.table.current(w.slot, w.serial) is None, "an event for a worker given up on finds nobody"

    @invariant()
    def consistent(self) -> None:
        assert len(self.table) == len(self.live)
        assert {w.slot for w in self.table.all()} == set(self.live)
        for slot, w in self.live.items():
            assert self.table.holds(w) and self.table.by_slot[slot] is w
            if w.pid:
                assert self.table.by_pid(w.pid) is w
            if w in self.fds:
                assert self.table.by_fd(self.fds[w]) is w
        for w in self.gone:
            assert not self.table.holds(w)
            if w.pid:
                assert self.table.by_pid(w.pid) is not w
        assert len(self.table._free) + len(self.live) == SLOTS
        assert len(set(self.table._free)) == len(self.table._free)


TestTable = TableMachine.TestCase
TestTable.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def worker(slot: int = 0, state: int = READY, budget: int = -1, now: float = 0.0) -> Worker:
    w = Worker(slot, slot + 1, now, budget)
    w.state = state
    return w


def test_timers_due_report_age_kill_and_boot_and_the_next_deadline() -> None:
    table = WorkerTable(4)
    old = table.add(1, 0.0, -1)
    booting = table.add(2, 5.0, -1)
    killing = table.add(3, 8.0, -1)
    assert old and booting and killing
    old.state = READY
    killing.state = READY
    killing.pid = 7
    killing.kill_at = 9.5
    assert table.next_deadline(boot_timeout=3.0) == 8.0  # the booting one's boot deadline
    due = sorted((w.slot, what) for w, what in table.due(now=10.0, boot_timeout=3.0, max_age=9.0))
    assert due == [(0, "old"), (1, "boot"), (2, "kill")]
    assert list(table.due(now=4.0, boot_timeout=3.0, max_age=0.0)) == []


@given(st.sampled_from([BOOTING, READY, RETIRING]), st.booleans(), st.booleans(), st.text(max_size=5), st.sampled_from(["", "max-tasks", "timeout"]))
def test_the_verdict_on_an_exit(state: int, closing: bool, init_failed: bool, boot_error: str, cause: str) -> None:
    w = worker(state=state)
    w.boot_error = boot_error
    w.cause = cause
    v = verdict(w, closing, init_failed, "exit code 3")
    assert v.expected == (state == RETIRING or closing)
    if v.expected:
        assert v.boot_failure == "" and v.cause == (cause or "shutdown")
    elif state == BOOTING or boot_error:
        assert v.cause == "boot-failure" and v.boot_failure
        if boot_error:
            assert v.boot_failure == boot_error
        elif init_failed:
            assert v.boot_failure == "the worker's initializer failed"
    else:
        assert v.cause == "crash" and v.boot_failure == ""


def tasks(n: int, size: int = 10) -> deque[Task]:
    out: deque[Task] = deque()
    for i in range(1, n + 1):
        t = Task(i, abs, (), {}, None, None, None)
        t.payload = b"x" * size
        out.append(t)
    return out


def plan(queue: deque[Task], ready: list[Worker], per: int, frame_bytes: int = 1 << 20, claim: Any = None) -> tuple[list[tuple[Worker, list[int]]], Ledger, list[tuple[int, BaseException]]]:
    ledger = Ledger()
    failed: list[tuple[int, BaseException]] = []
    for w in ready:
        w.inflight = ledger.held(w)
    frames = fill(queue, ready, per, frame_bytes, claim or (lambda t: True), ledger.give, lambda t, e: failed.append((t.id, e)), 0.0)
    return [(w, [tid for tid, _ in items]) for w, items in frames], ledger, failed


def test_fill_spreads_per_worker_in_fifo_order_least_loaded_first() -> None:
    a, b = worker(0), worker(1)
    frames, ledger, _ = plan(tasks(5), [a, b], per=2)
    assert frames == [(a, [1, 2]), (b, [3, 4])]
    assert [t.id for t in a.inflight] == [1, 2] and len(ledger.queue) == 0  # the queue given was consumed


def test_fill_splits_frames_at_frame_bytes_and_respects_budgets() -> None:
    a = worker(0, budget=5)
    q = tasks(8, size=100)
    frames, _, _ = plan(q, [a], per=8, frame_bytes=250)
    assert [ids for _, ids in frames] == [[1, 2], [3, 4], [5]]  # two calls per frame; the budget stops at 5
    assert a.budget == 0 and [t.id for t in q] == [6, 7, 8]


def test_fill_skips_done_and_refused_tasks_and_fails_a_raising_claim_only() -> None:
    q = tasks(4)
    q[0].done = True

    def claim(t: Task) -> bool:
        if t.id == 2:
            return False  # cancelled before it ran
        if t.id == 3:
            raise RuntimeError("sink bug")
        return True

    frames, _, failed = plan(q, [worker(0)], per=4, claim=claim)
    assert [ids for _, ids in frames] == [[4]]
    assert [tid for tid, _ in failed] == [3] and "claim() of task 3" in str(failed[0][1].__notes__)


def test_a_task_sent_back_after_a_death_is_not_claimed_again() -> None:
    q = tasks(1)
    q[0].claimed = True
    frames, _, _ = plan(q, [worker(0)], per=1, claim=lambda t: (_ for _ in ()).throw(AssertionError("claimed twice")))
    assert [ids for _, ids in frames] == [[1]]


@given(st.one_of(st.none(), st.floats(0, 1)), st.integers(0, 10_000), st.integers(0, 64))
def test_auto_prefetch_stays_between_one_and_the_batch(avg: float | None, queued: int, alive: int) -> None:
    per = auto_prefetch(avg, queued, alive)
    assert 1 <= per <= AUTO_BATCH
    if avg is None or queued <= max(alive, 1):
        assert per == 1
    elif avg >= 0.005:
        assert per == 2  # long tasks: two, the second takeable (prefork._takeback)


def test_the_next_deadline_is_inf_with_no_timer() -> None:
    table = WorkerTable(2)
    w = table.add(1, 0.0, -1)
    assert w is not None
    w.state = READY
    assert table.next_deadline(1.0) == math.inf
